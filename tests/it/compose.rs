//! The compose deployment for real: builds the image (deploy/build-image.sh
//! from the binary this test run built), brings compose.yaml up under a
//! project name of its own, runs the store's flows against it, kills the
//! catalog primary's container during a stream of buys, restarts it,
//! disconnects a backup from the network and reconnects it, and checks that
//! every replica ends with the same state and every acknowledged buy applied
//! once. Traffic goes only to the containers' addresses on the network this
//! test creates and to the frontend's port published on 127.0.0.1.
//! Everything it creates (containers, network, volumes, image) is removed
//! when it ends, failed or not. Without a Docker engine it says so and skips.

use crate::common;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::{BIN, wait_until};
use pygmy::api::*;
use pygmy::client::{CatalogClient, FrontendClient, Http};

const CATALOGS: [(&str, u16); 3] = [
    ("catalog-1", 5001),
    ("catalog-2", 5002),
    ("catalog-3", 5003),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker compose` (v2 plugin) or `docker-compose`, whichever answers.
fn compose_command() -> Option<Vec<String>> {
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if ok(Command::new("docker").args(["compose", "version"])) {
        Some(vec!["docker".into(), "compose".into()])
    } else if ok(Command::new("docker-compose").arg("version")) {
        Some(vec!["docker-compose".into()])
    } else {
        None
    }
}

/// The project, its image and its token; `down -v` and `rmi` on drop.
struct Deployment {
    compose: Vec<String>,
    project: String,
    image: String,
    token: String,
    ids: std::sync::Mutex<HashMap<String, String>>,
    /// The cluster's certificates, copied out of its `certs` volume: the
    /// test calls the replicas' internal routes as the operator, over TLS.
    certs: PathBuf,
}

impl Deployment {
    fn compose(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.project, "-f"])
            .arg(repo().join("compose.yaml"))
            .args(args)
            .current_dir(repo())
            .env("PYGMY_TOKEN", &self.token)
            .env("PYGMY_IMAGE", &self.image)
            .env("PYGMY_PUBLISH", "127.0.0.1:");
        c
    }

    /// The service's container id (it stays the same across `docker start`).
    fn container(&self, service: &str) -> String {
        let mut ids = self.ids.lock().unwrap();
        ids.entry(service.to_string())
            .or_insert_with(|| {
                let id = text(run(&mut self.compose(&["ps", "-q", service])));
                assert!(!id.is_empty(), "no container for {service}");
                id
            })
            .clone()
    }

    fn network(&self) -> String {
        format!("{}_store", self.project)
    }

    /// The service's address on the project's network (it may change on restart).
    fn ip(&self, service: &str) -> String {
        let tpl = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network()
        );
        let ip = text(run(Command::new("docker").args([
            "inspect",
            "-f",
            &tpl,
            &self.container(service),
        ])));
        assert!(
            !ip.is_empty(),
            "{service} has no address on {}",
            self.network()
        );
        ip
    }

    /// A client of replica `name` over TLS with the operator's certificate,
    /// verifying the replica's certificate for its name (resolved to its
    /// address on the network).
    fn catalog(&self, name: &str) -> CatalogClient {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let port = CATALOGS.iter().find(|(n, _)| *n == name).unwrap().1;
        let pem = |f: &str| self.certs.join(f);
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pem("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(pem("operator.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(pem("operator.key")).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        let addr = format!("{}:{port}", self.ip(name)).parse().unwrap();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .resolve(name, addr)
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        CatalogClient::new(
            format!("https://{name}:{port}"),
            Http::from_client(client, Some(self.token.clone())),
        )
    }

    fn frontend(&self) -> FrontendClient {
        let hostport = text(run(&mut self.compose(&["port", "frontend", "5004"])));
        assert!(
            hostport.starts_with("127.0.0.1:"),
            "frontend published on {hostport}"
        );
        FrontendClient::new(
            format!("http://{hostport}"),
            Http::new(None, Duration::from_secs(15)),
        )
    }

    fn running(&self, service: &str) -> bool {
        let id = self.container(service);
        text(run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{.State.Running}}",
            &id,
        ]))) == "true"
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(o) = self
                .compose(&["logs", "--no-color", "--tail", "40"])
                .output()
        {
            eprintln!("{}", String::from_utf8_lossy(&o.stdout));
        }
        let _ = self
            .compose(&["down", "-v", "--remove-orphans", "-t", "2"])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// Name of the catalog replica that calls itself primary and serves a read.
async fn primary(d: &Deployment, among: &[&str]) -> Option<String> {
    for name in among {
        let c = d.catalog(name);
        if let Ok(s) = c.status().await
            && s.role == "primary"
            && c.lookup(BookId::new(1).unwrap(), None).await.is_ok()
        {
            return Some(name.to_string());
        }
    }
    None
}

/// Every book as `name` holds it, if it serves reads now.
async fn books(c: &CatalogClient) -> Option<Vec<(u64, u64, Money)>> {
    let mut out = Vec::new();
    for id in 1..=7 {
        let b = c.lookup(BookId::new(id).unwrap(), None).await.ok()?;
        out.push((id, b.stock, b.cost));
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_deployment_serves_fails_over_and_converges() {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    if !engine.as_ref().map(|o| o.status.success()).unwrap_or(false) {
        println!(
            "SKIPPED the compose deployment test: no Docker engine answers `docker info` here"
        );
        return;
    }
    let Some(compose) = compose_command() else {
        println!(
            "SKIPPED the compose deployment test: neither `docker compose` nor `docker-compose` is installed"
        );
        return;
    };
    let project = format!(
        "pygmytest{}",
        uuid::Uuid::new_v4().simple().to_string().get(..10).unwrap()
    );
    let d = Deployment {
        compose,
        image: format!("pygmy-test:{project}"),
        project,
        token: pygmy::config::new_token(),
        ids: Default::default(),
        certs: common::temp_dir("compose-certs"),
    };

    // The image, from the binary this run built, by the users' script.
    run(Command::new(repo().join("deploy/build-image.sh"))
        .arg(&d.image)
        .env("PYGMY_BIN", BIN)
        .current_dir(repo()));
    run(&mut d.compose(&["up", "-d"]));
    // The nodes speak TLS with the certificates the `certs` service made.
    run(Command::new("docker").args([
        "cp",
        &format!("{}:/certs/.", d.container("certs")),
        &d.certs.display().to_string(),
    ]));
    pygmy::tls::default_provider();

    // Every container turns healthy through its /healthcheck probe.
    let services = [
        "frontend",
        "order-1",
        "order-2",
        "order-3",
        "catalog-1",
        "catalog-2",
        "catalog-3",
    ];
    wait_until(
        "every container is healthy",
        Duration::from_secs(90),
        || async {
            services.iter().all(|s| {
                let id = d.container(s);
                text(run(Command::new("docker").args([
                    "inspect",
                    "-f",
                    "{{.State.Health.Status}}",
                    &id,
                ]))) == "healthy"
            })
        },
    )
    .await;

    // Between the nodes it is TLS only: the token over plain HTTP is refused.
    let plain = reqwest::Client::new()
        .get(format!("http://{}:5001/internal/status", d.ip("catalog-1")))
        .header("authorization", format!("Bearer {}", d.token))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("catalog-1 answers plain HTTP on its public routes' port");
    assert_eq!(plain.status(), 403, "internal routes need TLS");
    assert!(
        d.catalog("catalog-1").status().await.is_ok(),
        "over TLS they answer"
    );

    let all = ["catalog-1", "catalog-2", "catalog-3"];
    wait_until(
        "catalog-3 (highest id) is primary",
        Duration::from_secs(30),
        || async { primary(&d, &all).await.as_deref() == Some("catalog-3") },
    )
    .await;

    // The store's flows through the published frontend.
    let front = d.frontend();
    let found = front.search("distributed-systems").await.unwrap();
    assert!(
        found
            .items
            .values()
            .any(|id| *id == BookId::new(1).unwrap()),
        "search: {found:?}"
    );
    let before = front.lookup("1").await.unwrap();
    assert_eq!(
        before.title,
        "How to get a good grade in 677 in 20 minutes a day."
    );
    let bought = front.buy("1", Some("compose-first")).await.unwrap();
    assert!(
        bought
            .message
            .starts_with("successfully purchased the book"),
        "{bought:?}"
    );
    wait_until(
        "the buy shows in lookup",
        Duration::from_secs(10),
        || async {
            front
                .lookup("1")
                .await
                .map(|b| b.stock + 1 == before.stock)
                .unwrap_or(false)
        },
    )
    .await;
    assert_eq!(front.lookup("0").await.unwrap_err().status(), Some(400));

    // Enough stock of book 2 for the stream, set at the primary.
    const STOCK: u64 = 10_000;
    const MAX_BUYS: u64 = 5_000;
    let update = UpdateRequest {
        id: BookId::new(2).unwrap(),
        stock: Some(STOCK),
        cost: None,
        request_id: None,
    };
    d.catalog("catalog-3").update(&update).await.unwrap();

    // A stream of buys, each with its own key; every one must be answered 200.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(std::sync::Mutex::new(None::<String>));
    let stream = {
        let (front, acked, stop, failed) =
            (front.clone(), acked.clone(), stop.clone(), failed.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < MAX_BUYS {
                let key = format!("compose-stream-{i}");
                match front.buy("2", Some(&key)).await {
                    Ok(_) => acked.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        *failed.lock().unwrap() =
                            Some(format!("buy {i} failed during the faults: {e}"));
                        return;
                    }
                };
                i += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let acked_now = || {
        if let Some(e) = failed.lock().unwrap().as_ref() {
            panic!("{e}");
        }
        acked.load(Ordering::SeqCst)
    };
    wait_until("the stream is buying", Duration::from_secs(20), || async {
        acked_now() >= 5
    })
    .await;

    // Kill the primary's container; catalog-2 takes over, buys keep succeeding.
    run(Command::new("docker").args(["kill", &d.container("catalog-3")]));
    assert!(!d.running("catalog-3"));
    wait_until("catalog-2 takes over", Duration::from_secs(30), || async {
        primary(&d, &["catalog-2", "catalog-1"]).await.as_deref() == Some("catalog-2")
    })
    .await;
    let at_failover = acked_now();
    wait_until(
        "buys go on after the failover",
        Duration::from_secs(30),
        || async { acked_now() >= at_failover + 10 },
    )
    .await;

    // Restart it: it catches up, then takes primaryship back.
    run(Command::new("docker").args(["start", &d.container("catalog-3")]));
    wait_until(
        "catalog-3 takes primaryship back",
        Duration::from_secs(60),
        || async { primary(&d, &all).await.as_deref() == Some("catalog-3") },
    )
    .await;
    let at_takeover = acked_now();
    wait_until(
        "buys go on after the takeover",
        Duration::from_secs(30),
        || async { acked_now() >= at_takeover + 10 },
    )
    .await;

    // Cut a backup off the network, buy on, reconnect it.
    let backup = d.container("catalog-1");
    run(Command::new("docker").args(["network", "disconnect", &d.network(), &backup]));
    let cut = d.catalog("catalog-3");
    wait_until(
        "the primary drops catalog-1 from its view",
        Duration::from_secs(30),
        || async {
            cut.status()
                .await
                .map(|s| !s.view.iter().any(|v| v == "catalog-1"))
                .unwrap_or(false)
        },
    )
    .await;
    let at_cut = acked_now();
    wait_until(
        "buys go on without catalog-1",
        Duration::from_secs(30),
        || async { acked_now() >= at_cut + 10 },
    )
    .await;
    run(Command::new("docker").args([
        "network",
        "connect",
        "--alias",
        "catalog-1",
        &d.network(),
        &backup,
    ]));
    wait_until(
        "catalog-1 is back in the view",
        Duration::from_secs(60),
        || async {
            d.catalog("catalog-3")
                .status()
                .await
                .map(|s| s.view.iter().any(|v| v == "catalog-1"))
                .unwrap_or(false)
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    stream.await.unwrap();
    let n = acked_now();
    assert!(n >= 35, "the stream bought only {n}");

    // Every replica answers the same books; book 2 lost exactly the acknowledged buys.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let mut seen: HashMap<&str, Vec<(u64, u64, Money)>> = HashMap::new();
        for name in all {
            if let Some(b) = books(&d.catalog(name)).await {
                seen.insert(name, b);
            }
        }
        if seen.len() == all.len() && seen.values().all(|b| b == &seen["catalog-3"]) {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas still differ after 60 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stock2 = seen["catalog-3"].iter().find(|b| b.0 == 2).unwrap().1;
    assert_eq!(
        stock2,
        STOCK - n,
        "{n} acknowledged buys of book 2, stock {stock2}"
    );

    // Retrying an acknowledged key buys nothing more.
    front.buy("2", Some("compose-stream-0")).await.unwrap();
    wait_until("the primary answers", Duration::from_secs(10), || async {
        d.catalog("catalog-3")
            .lookup(BookId::new(2).unwrap(), None)
            .await
            .is_ok()
    })
    .await;
    let again = d
        .catalog("catalog-3")
        .lookup(BookId::new(2).unwrap(), None)
        .await
        .unwrap();
    assert_eq!(again.stock, STOCK - n, "a retried key bought again");
}
