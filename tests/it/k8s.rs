//! The Kubernetes manifests in deploy/k8s agree with the cluster file they
//! carry (every node a pod or Service of the right name, port and process
//! id) and pass the Kubernetes schemas (`kubernetes-validate --strict`,
//! which bundles them: no network needed; `.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use pygmy::config::{ClusterConfig, Role};
use serde_json::Value;

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "manifests: {files:?}");
    files
}

/// Every document of every manifest, as JSON (PyYAML comes with kubernetes-validate).
fn documents() -> Vec<Value> {
    let mut docs = Vec::new();
    for f in manifests() {
        let out = Command::new("python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            ])
            .arg(&f)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        docs.extend(v);
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The pod template's container: its port, probes and args.
fn check_container(what: &str, workload: &Value, port: u64) -> Value {
    let c = &workload["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["ports"][0]["containerPort"], port,
        "{what}: containerPort"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["path"], "/healthcheck",
            "{what}: {probe}"
        );
        assert_eq!(c[probe]["httpGet"]["port"], port, "{what}: {probe} port");
    }
    let env = c["env"].as_array().unwrap();
    let token = env
        .iter()
        .find(|e| e["name"] == "PYGMY_TOKEN")
        .expect("PYGMY_TOKEN from a Secret");
    assert!(
        token["valueFrom"]["secretKeyRef"].is_object(),
        "{what}: the token comes from a Secret"
    );
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(
        mounts.iter().any(|m| m["mountPath"] == "/etc/pygmy"),
        "{what}: the cluster file is mounted"
    );
    // TLS between the pods: PYGMY_TLS_DIR names a mount of the Secret
    // `pygmy-tls` (what `pygmy certs` makes).
    let tls_dir = env
        .iter()
        .find(|e| e["name"] == "PYGMY_TLS_DIR")
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{what}: PYGMY_TLS_DIR"));
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"] == tls_dir)
        .unwrap_or_else(|| panic!("{what}: {tls_dir} is mounted"));
    let volumes = workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let volume = volumes
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("{what}: the certificates' volume"));
    assert_eq!(
        volume["secret"]["secretName"], "pygmy-tls",
        "{what}: the certificates come from the Secret pygmy-tls"
    );
    c.clone()
}

#[test]
fn the_manifests_match_the_cluster_file() {
    let docs = documents();
    let cm = find(&docs, "ConfigMap", "pygmy-cluster");
    let mut cfg = ClusterConfig::parse(cm["data"]["cluster.toml"].as_str().unwrap()).unwrap();
    cfg.apply_env(|k| (k == "PYGMY_TOKEN").then(|| "t".repeat(32)));
    cfg.validate().unwrap();

    // Catalog and order: a StatefulSet each; pod NAME-i is node NAME-i with process id i+1,
    // reached at NAME-i.SERVICE:PORT, SERVICE being the StatefulSet's headless Service.
    for (role, set) in [(Role::Catalog, "catalog"), (Role::Order, "order")] {
        let sts = find(&docs, "StatefulSet", set);
        let nodes: Vec<_> = cfg.nodes_of(role).collect();
        assert_eq!(
            sts["spec"]["replicas"],
            nodes.len() as u64,
            "{set}: one pod per node"
        );
        let service = sts["spec"]["serviceName"].as_str().unwrap();
        let svc = find(&docs, "Service", service);
        assert_eq!(
            svc["spec"]["clusterIP"], "None",
            "{set}: a headless Service gives stable pod names"
        );
        let labels = &sts["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "{set}: the Service selects the pods");
        }
        let port = port_of(&nodes[0].addr);
        assert_eq!(svc["spec"]["ports"][0]["port"], port);
        let c = check_container(set, sts, port);
        assert_eq!(
            c["args"],
            serde_json::json!(["serve", "$(POD_NAME)"]),
            "{set}: the pod name is the node name"
        );
        let pod_name = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "POD_NAME")
            .unwrap();
        assert_eq!(
            pod_name["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert!(
            sts["spec"]["volumeClaimTemplates"]
                .as_array()
                .is_some_and(|v| !v.is_empty()),
            "{set}: a volume each"
        );
        let mut ids: Vec<u64> = Vec::new();
        for n in &nodes {
            let ordinal = n.process_id - 1;
            assert_eq!(
                n.name,
                format!("{set}-{ordinal}"),
                "pod {set}-{ordinal} must be process id {}",
                n.process_id
            );
            assert_eq!(
                n.addr,
                format!("{}.{service}:{port}", n.name),
                "{}: address",
                n.name
            );
            assert_eq!(
                n.listen.as_deref(),
                Some(format!("0.0.0.0:{port}").as_str()),
                "{}: listen",
                n.name
            );
            assert_eq!(
                n.data_dir.as_deref(),
                Some(Path::new("/data")),
                "{}: data on the volume",
                n.name
            );
            ids.push(n.process_id);
        }
        ids.sort();
        assert_eq!(
            ids,
            (1..=nodes.len() as u64).collect::<Vec<_>>(),
            "{set}: ids are the ordinals + 1"
        );
    }

    // The frontend: a Deployment behind a Service of its node's name and port.
    let fe = cfg.node("frontend").unwrap();
    let port = port_of(&fe.addr);
    assert_eq!(fe.addr, format!("frontend:{port}"));
    let svc = find(&docs, "Service", "frontend");
    assert_eq!(svc["spec"]["ports"][0]["port"], port);
    let dep = find(&docs, "Deployment", "frontend");
    let c = check_container("frontend", dep, port);
    assert_eq!(c["args"], serde_json::json!(["serve", "frontend"]));
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(files)
        .output()
        .expect(
            "kubernetes-validate is on PATH (.ci/run installs it: pip install kubernetes-validate)",
        )
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    let out = validate(&manifests());
    assert!(
        out.status.success(),
        "kubernetes-validate rejects the manifests:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The validator has teeth: a misspelt field in the StatefulSet is refused.
    let dir = std::env::temp_dir().join(format!("pygmy-k8s-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("catalog.yaml");
    let text = std::fs::read_to_string(k8s_dir().join("catalog.yaml")).unwrap();
    assert!(text.contains("serviceName:"));
    std::fs::write(&bad, text.replace("serviceName:", "servicName:")).unwrap();
    let out = validate(std::slice::from_ref(&bad));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        !out.status.success(),
        "a misspelt field passed the schema check"
    );
}
