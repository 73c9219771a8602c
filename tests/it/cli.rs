//! The binary's commands: `pygmy up` and `pygmy serve` overrides.

use crate::common;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use pygmy::client::{FrontendClient, Http};
use pygmy::config::ClusterConfig;

/// A running `pygmy up`, its stdout lines arriving on a channel.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// The child leads a process group (stopped as a whole on drop).
    group: bool,
}

impl Up {
    fn start(args: &[&str], cwd: &std::path::Path) -> Self {
        let mut cmd = Command::new(common::BIN);
        cmd.arg("up")
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null());
        Self::spawn(cmd)
    }

    /// Spawns `cmd` (a `pygmy up`), reading its stdout.
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            group: false,
        }
    }

    /// Waits for a stdout line containing `needle`.
    fn expect(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "`pygmy up` never printed {needle:?}; it printed {:#?}",
                    self.seen
                ),
            }
        }
    }

    fn sigterm(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.group {
            // A shell running `pygmy up`: stop the whole job, letting
            // `pygmy up` stop its nodes, before anything is killed.
            // SAFETY: a signal to the process group of a child we started.
            unsafe { libc::killpg(self.child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_writes_the_cluster_file_runs_the_store_keeps_its_state_and_stops_cleanly() {
    let root = common::temp_dir("up");
    let data = root.join("pygmy-data");
    let host = common::unique_host();
    let mut up = Up::start(
        &["--data-dir", data.to_str().unwrap(), "--host", &host],
        &root,
    );
    up.expect("new cluster written to");
    up.expect("the store is up");

    let cfg_path = data.join("cluster.toml");
    let mode = std::fs::metadata(&cfg_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the file holding the token is private");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = ClusterConfig::parse(&text).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("token = ")),
        "token is a top-level key"
    );
    let names: Vec<&str> = cfg.nodes.iter().map(|n| n.name.as_str()).collect();
    for n in [
        "frontend",
        "order-1",
        "order-2",
        "order-3",
        "catalog-1",
        "catalog-2",
        "catalog-3",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    assert!(cfg.nodes.iter().any(|n| n.addr == format!("{host}:5004")));
    assert!(cfg.nodes.iter().any(|n| n.addr == format!("{host}:5001")));

    let fe = FrontendClient::new(
        format!("http://{host}:5004"),
        Http::new(None, Duration::from_secs(10)),
    );
    fe.buy("2", None).await.unwrap();
    assert_eq!(fe.lookup("2").await.unwrap().stock, 999);

    // `pygmy status` shows every node; catalog-3 (highest id) is the primary
    // and every replica has applied the buy. On a loaded machine a replica
    // starved past its lease starts an election, and while one runs no
    // replica knows a primary and `status` says the store is unhealthy
    // (exit 1): it is asked again until it is healthy and shows all that.
    let status = |path: std::path::PathBuf| {
        let out = Command::new(common::BIN)
            .args(["status", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (out.status, String::from_utf8(out.stdout).unwrap())
    };
    let mut text = String::new();
    let mut healthy = None;
    for _ in 0..1200 {
        let (code, out) = status(cfg_path.clone());
        text = out;
        healthy = Some(code);
        if !code.success() {
            std::thread::sleep(Duration::from_millis(25));
            continue;
        }
        let applied: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("catalog"))
            .map(|l| l.split_whitespace().nth(5).unwrap_or(""))
            .collect();
        let c3_primary = text
            .lines()
            .any(|l| l.starts_with("catalog-3") && l.contains(" primary "));
        if c3_primary && applied.len() == 3 && applied.iter().all(|a| *a == applied[0]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let healthy = healthy.expect("status ran");
    assert!(healthy.success(), "status: {healthy}\n{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .to_string()
    };
    assert!(row("catalog-3").contains(" primary "), "{text}");
    for n in ["catalog-1", "catalog-2"] {
        let r = row(n);
        assert!(
            r.contains(" backup ") && r.contains("catalog-3") && r.ends_with("yes"),
            "{text}"
        );
    }
    for n in ["frontend", "order-1", "order-2", "order-3"] {
        assert!(row(n).contains(" up "), "{text}");
    }

    up.sigterm();
    let line = up.expect("stopped —");
    assert!(line.contains("7 of 7 processes exited cleanly"), "{line}");
    assert!(up.child.wait().unwrap().success());
    assert!(fe.health().await.is_err(), "the frontend is gone");
    for port in 5001..=5007 {
        assert!(
            std::net::TcpStream::connect((host.as_str(), port)).is_err(),
            "something still listens on {host}:{port}"
        );
    }

    // Again, without --data-dir, from the folder holding pygmy-data: it says
    // which folder it uses, and the state and the token are the ones from before.
    let mut up = Up::start(&["--host", &host], &root);
    up.expect("using ./pygmy-data");
    up.expect("the store is up");
    assert_eq!(fe.lookup("2").await.unwrap().stock, 999);
    let again = ClusterConfig::parse(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(again.token, cfg.token);
    up.sigterm();
    up.expect("stopped —");
    drop(up);
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_listens_where_the_flag_or_the_environment_says() {
    let root = common::temp_dir("serve");
    let host = common::unique_host();
    let cfg = ClusterConfig::local(&host, 1);
    let path = root.join("cluster.toml");
    cfg.save(&path).unwrap();
    let http = Http::new(None, Duration::from_secs(2));

    let flag = format!("{host}:6101");
    let env = format!("{host}:6102");
    let mut by_flag = Command::new(common::BIN)
        .args([
            "serve",
            "--config",
            path.to_str().unwrap(),
            "catalog-1",
            "--listen",
            &flag,
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut by_env = Command::new(common::BIN)
        .args(["serve", "--config", path.to_str().unwrap(), "frontend"])
        .env("PYGMY_FRONTEND_LISTEN", &env)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for addr in [&flag, &env] {
        answers(addr, &http).await;
    }
    by_flag.kill().unwrap();
    by_env.kill().unwrap();
    by_flag.wait().unwrap();
    by_env.wait().unwrap();

    // A bad config is refused at start with a clear message.
    std::fs::write(&path, "cluster_id = 1").unwrap();
    let out = Command::new(common::BIN)
        .args(["serve", "--config", path.to_str().unwrap(), "catalog-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not valid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// Waits until a node answers its health check on `addr`.
async fn answers(addr: &str, http: &Http) {
    let what = format!("a node answers on {addr}");
    common::wait_answering(format!("http://{addr}"), http, &what).await;
}

/// A node runs on one thread unless told otherwise (by flag or by
/// environment), and says on `/metrics` how many it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_on_the_threads_it_is_given() {
    let root = common::temp_dir("threads");
    let host = common::unique_host();
    let cfg = ClusterConfig::local(&host, 1);
    let path = root.join("cluster.toml");
    cfg.save(&path).unwrap();
    let http = Http::new(None, Duration::from_secs(2));
    let config = path.to_str().unwrap();

    // (listen address, extra arguments, environment, threads expected)
    let cases: [(String, &[&str], Option<&str>, usize); 3] = [
        (format!("{host}:6111"), &[], None, 1),
        (format!("{host}:6112"), &["--threads", "3"], None, 3),
        (format!("{host}:6113"), &[], Some("2"), 2),
    ];
    let mut nodes = Vec::new();
    for (addr, extra, env, _) in &cases {
        let mut cmd = Command::new(common::BIN);
        cmd.args(["serve", "--config", config, "frontend", "--listen", addr])
            .args(*extra)
            .env_remove("PYGMY_THREADS")
            .stderr(Stdio::null());
        if let Some(n) = env {
            cmd.env("PYGMY_THREADS", n);
        }
        nodes.push(cmd.spawn().unwrap());
    }
    for (addr, _, _, want) in &cases {
        answers(addr, &http).await;
        let page = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let threads = page
            .lines()
            .find_map(|l| l.strip_prefix("pygmy_runtime_threads "))
            .unwrap_or_else(|| panic!("no pygmy_runtime_threads on {addr}:\n{page}"));
        assert_eq!(threads.parse::<f64>().unwrap(), *want as f64, "{addr}");
    }
    for mut n in nodes {
        n.kill().unwrap();
        n.wait().unwrap();
    }

    // No threads at all is refused at start, with the reason.
    let out = Command::new(common::BIN)
        .args(["serve", "--config", config, "frontend", "--threads", "0"])
        .env_remove("PYGMY_THREADS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--threads"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Runs `pygmy ARGS` in `cwd` with `env`; (exit code, stdout, stderr).
fn pygmy(args: &[&str], cwd: &std::path::Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(common::BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("PYGMY_CONFIG")
        .env_remove("PYGMY_FRONTEND")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_finds_the_cluster_reports_health_pages_orders_updates_and_buys_once_per_key() {
    let root = common::temp_dir("ops");
    let host = common::unique_host();
    let mut up = Up::start(&["--host", &host], &root);
    up.expect("the store is up");
    let elsewhere = common::temp_dir("ops-elsewhere");
    let cfg_path = root.join("pygmy-data").join("cluster.toml");
    let cfg_env = cfg_path.to_str().unwrap();

    // Start-up progress was shown, ending at 7/7.
    assert!(
        up.seen.iter().any(|l| l.contains("7/7 ready")),
        "{:#?}",
        up.seen
    );

    // `status` finds ./pygmy-data/cluster.toml, or $PYGMY_CONFIG, or --config.
    let settled = |cwd: &std::path::Path, env: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["status", "--output", "json"];
        args.extend_from_slice(extra);
        let (code, out, err) = pygmy(&args, cwd, env);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
        (code, v)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (code, v) = loop {
        let (code, v) = settled(&root, &[], &[]);
        let all_ready = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["ready"] == true);
        // catalog-3 is primary from the start, or takes primaryship back
        // soon after another replica won a loaded machine's first election.
        let settled = code == 0 && all_ready && v["primary"] == "catalog-3";
        if settled || std::time::Instant::now() > deadline {
            break (code, v);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["healthy"], true, "{v:#}");
    assert_eq!(v["primary"], "catalog-3", "{v:#}");
    assert_eq!(v["nodes"].as_array().unwrap().len(), 7);
    let (code, v) = settled(&elsewhere, &[("PYGMY_CONFIG", cfg_env)], &[]);
    assert_eq!((code, &v["primary"]), (0, &serde_json::json!("catalog-3")));
    let (code, v) = settled(&elsewhere, &[], &["--config", cfg_env]);
    assert_eq!((code, &v["healthy"]), (0, &serde_json::json!(true)));
    // Without a cluster file, it says what to do.
    let (code, _, err) = pygmy(&["status"], &elsewhere, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("run `pygmy up`"), "{err}");

    // `update` reads the token from the cluster file.
    let (code, out, err) = pygmy(
        &["update", "4", "--stock", "7", "--cost", "12.5"],
        &root,
        &[],
    );
    assert_eq!(code, 0, "{out} {err}");
    let (code, out, _) = pygmy(&["lookup", "4"], &root, &[]);
    assert_eq!(code, 0);
    let book: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (book["stock"].as_u64(), book["cost"].as_f64()),
        (Some(7), Some(12.5))
    );
    let (code, _, err) = pygmy(&["update", "4"], &root, &[]);
    assert_eq!(code, 2, "nothing to change is a usage error: {err}");

    // `buy` prints its key; the same key again buys nothing more.
    let (code, out, err) = pygmy(&["buy", "4"], &root, &[]);
    assert_eq!(code, 0, "{err}");
    let key = err
        .split("Idempotency-Key: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no key printed: {err}"))
        .to_string();
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (code, out, err) = pygmy(&["buy", "4", "--key", &key], &root, &[]);
    assert_eq!(code, 0, "{err}");
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(first["order_id"], again["order_id"]);
    let (_, out, _) = pygmy(&["lookup", "4"], &root, &[]);
    let book: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(book["stock"].as_u64(), Some(6), "one copy bought, not two");
    // Out of stock is an answered error: exit 1, the store's message.
    for _ in 0..6 {
        assert_eq!(pygmy(&["buy", "4"], &root, &[]).0, 0);
    }
    let (code, _, err) = pygmy(&["buy", "4"], &root, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("409"), "{err}");

    // `orders` pages one replica's log; `log` is the old name of it.
    let mut logs = Vec::new();
    let mut bought = std::collections::BTreeSet::new();
    for node in ["order-1", "order-2", "order-3"] {
        let (code, out, err) = pygmy(
            &["orders", node, "--output", "json", "--limit", "1000"],
            &root,
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let page: serde_json::Value = serde_json::from_str(&out).unwrap();
        let orders = page["orders"].as_array().unwrap();
        for o in orders {
            if o["outcome"] == "bought" {
                bought.insert(o["order_id"].as_u64().unwrap());
            }
            if o["request_id"] == format!("k:{key}") {
                assert_eq!(o["order_id"], first["order_id"], "{o}");
            }
        }
        logs.push((node, orders.len()));
    }
    assert_eq!(
        bought.len(),
        7,
        "seven copies bought, each with its own order id: {bought:?}"
    );
    let (node, n) = logs.iter().copied().max_by_key(|(_, n)| *n).unwrap();
    assert!(n >= 2, "{logs:?}");
    let (_, first_page, _) = pygmy(&["orders", node, "--limit", "1"], &root, &[]);
    let next = first_page
        .lines()
        .find_map(|l| l.strip_prefix(&format!("older: pygmy orders {node} --limit 1 --before ")))
        .unwrap_or_else(|| panic!("no next page: {first_page}"))
        .to_string();
    let (code, second_page, _) = pygmy(
        &["log", node, "--limit", "1", "--before", &next],
        &root,
        &[],
    );
    assert_eq!(code, 0);
    let rows = |t: &str| -> Vec<String> {
        t.lines()
            .skip(1)
            .filter(|l| !l.starts_with("older:"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(rows(&first_page).len(), 1, "{first_page}");
    assert_eq!(rows(&second_page).len(), 1, "{second_page}");
    assert_ne!(rows(&first_page), rows(&second_page));

    // Completions and help.
    let (code, out, _) = pygmy(&["completions", "bash"], &root, &[]);
    assert_eq!(code, 0);
    assert!(out.contains("orders") && out.contains("completions"));
    for cmd in [
        "up",
        "serve",
        "status",
        "orders",
        "update",
        "lookup",
        "search",
        "buy",
        "completions",
    ] {
        let (code, out, _) = pygmy(&[cmd, "--help"], &root, &[]);
        assert_eq!(code, 0);
        assert!(
            out.contains("Example:") && out.contains(&format!("pygmy {cmd}")),
            "{cmd}: {out}"
        );
    }
    assert!(pygmy(&["--help"], &root, &[]).1.contains("Exit codes:"));

    // Children run in process groups of their own.
    let kids = children(up.child.id());
    assert_eq!(kids.len(), 7, "{kids:?}");
    let up_group = unsafe { libc::getpgid(up.child.id() as i32) };
    for k in &kids {
        let g = unsafe { libc::getpgid(*k as i32) };
        assert_eq!(g, *k as i32, "node {k} leads its own group");
        assert_ne!(g, up_group);
    }

    // A node down: `status` says so and exits 3; nothing up: "is `pygmy up` running?".
    let order2 = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = ClusterConfig::parse(&order2).unwrap();
    let o2 = cfg.node("order-2").unwrap().addr.clone();
    for k in &kids {
        let ps = Command::new("ps")
            .args(["-o", "args=", "-p", &k.to_string()])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&ps.stdout)
            .trim_end()
            .ends_with(" order-2")
        {
            unsafe { libc::kill(*k as i32, libc::SIGKILL) };
        }
    }
    up.expect("order-2 exited");
    let (code, out, err) = pygmy(&["status"], &root, &[]);
    assert_eq!(code, 3, "{out} {err}");
    assert!(
        err.contains(&format!("order-2 at {o2} is unreachable")),
        "{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("order-2") && l.contains(" down ")),
        "{out}"
    );

    // Ctrl-C stops the tiers in order: frontend, order, catalog.
    unsafe { libc::kill(up.child.id() as i32, libc::SIGINT) };
    let f = up.expect("frontend tier stopped");
    let o = up.expect("order tier stopped");
    let c = up.expect("catalog tier stopped");
    assert!(
        o.contains("order-1") && c.contains("catalog-3"),
        "{f} {o} {c}"
    );
    up.expect("stopped —");
    assert!(up.child.wait().unwrap().success());
    let (code, _, err) = pygmy(&["lookup", "1"], &root, &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("is `pygmy up` running?"), "{err}");
    let (code, _, err) = pygmy(&["status"], &root, &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is `pygmy up` running?"), "{err}");
    drop(up);
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&elsewhere).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_fails_fast_naming_a_node_that_exits_during_start_up() {
    let root = common::temp_dir("up-fails");
    let data = root.join("pygmy-data");
    let host = common::unique_host();
    std::fs::create_dir_all(&data).unwrap();
    ClusterConfig::local(&host, 3)
        .save(&data.join("cluster.toml"))
        .unwrap();
    // order-2's port is taken: it cannot listen and exits.
    let taken = std::net::TcpListener::bind((host.as_str(), 5006)).unwrap();
    let mut child = Command::new(common::BIN)
        .args(["up", "--host", &host])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = child.wait().unwrap();
    drop(taken);
    assert!(!status.success());
    assert!(
        err.contains("order-2 exited during start-up"),
        "the failing node is named: {err}"
    );
    assert!(
        err.lines()
            .skip_while(|l| !l.contains("order-2 exited during start-up"))
            .any(|l| l.contains("cannot listen on")),
        "its last log lines are shown: {err}"
    );
    for port in 5001..=5007 {
        assert!(
            std::net::TcpStream::connect((host.as_str(), port)).is_err(),
            "the other nodes were stopped ({host}:{port} still answers)"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_separates_ready_to_serve_from_up() {
    let mut c = common::TestCluster::start(common::Options::default()).await;
    let http = Http::new(None, Duration::from_secs(5));
    let urls: std::collections::HashMap<String, String> = c
        .cfg
        .nodes
        .iter()
        .map(|n| (n.name.clone(), c.url(&n.name)))
        .collect();
    let node = |name: &str| FrontendClient::new(urls[name].clone(), http.clone());
    for n in c
        .cfg
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect::<Vec<_>>()
    {
        let client = node(&n);
        common::wait_until(&format!("{n} is ready"), Duration::from_secs(30), || {
            let client = client.clone();
            async move { client.ready().await.is_ok() }
        })
        .await;
    }
    // Two catalog replicas of three gone: the last knows no primary, so it
    // is up but not ready.
    c.kill9("catalog-3");
    c.kill9("catalog-2");
    let c1 = node("catalog-1");
    common::wait_until("catalog-1 is not ready", Duration::from_secs(30), || {
        let c1 = c1.clone();
        async move { c1.ready().await.is_err() }
    })
    .await;
    let err = c1.ready().await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    assert!(c1.health().await.is_ok(), "catalog-1 is still up");
    // No catalog at all: order and frontend are up, not ready.
    c.kill9("catalog-1");
    for n in ["order-1", "frontend"] {
        let client = node(n);
        let err = client.ready().await.unwrap_err();
        assert_eq!(err.status(), Some(503), "{n}: {err}");
        assert!(
            err.to_string().contains("no catalog replica answers"),
            "{n}: {err}"
        );
        assert!(client.health().await.is_ok(), "{n} is still up");
    }
}

/// README commands this test does not run, and why.
const README_NOT_RUN: &[(&str, &str)] = &[
    (
        "cargo install --path .",
        "the build: the test runs the binary cargo built for it, first on PATH",
    ),
    ("cargo test", "the suite this test is part of"),
    (
        "pygmy bench --anchors --out",
        "the full bench and its anchors, three minutes; tests/it/bench.rs runs it with --quick --anchors",
    ),
    (
        "cargo install cargo-fuzz",
        "fuzzing: a separate, ~20 min build",
    ),
    ("fuzz/run.sh", "fuzzing: a separate, ~20 min build"),
    (
        "deploy/build-image.sh",
        "a release build; tests/it/compose.rs builds the image with this script",
    ),
    (
        "export PYGMY_TOKEN=",
        "the compose deployment: tests/it/compose.rs brings compose.yaml up",
    ),
    (
        "docker-compose",
        "the compose deployment: tests/it/compose.rs brings compose.yaml up",
    ),
    (
        "kubectl",
        "needs a Kubernetes cluster; tests/it/k8s.rs checks the manifests",
    ),
    (
        "pygmy certs --config k8s-cluster.toml",
        "its cluster file comes from a Kubernetes ConfigMap; tests/it/tls.rs runs TLS clusters",
    ),
];

/// The README's admin example sends its update to catalog-1, a backup.
const FORWARDED_UPDATE: &str = "localhost:5001/catalog/update";

/// The commands of README.md's ```sh blocks, continuation lines joined.
fn readme_commands() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut cmds = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if !in_sh {
            in_sh = t == "```sh";
            continue;
        }
        if t == "```" {
            in_sh = false;
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(line);
        let cmd = std::mem::take(&mut pending).trim().to_string();
        if !cmd.is_empty() && !cmd.starts_with('#') {
            cmds.push(cmd);
        }
    }
    cmds
}

/// Holds an exclusive lock shared by every checkout's README test: the
/// README's examples use the store's fixed ports on 127.0.0.1.
struct PortsLock {
    _file: std::fs::File,
}

impl PortsLock {
    fn take() -> Self {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("pygmy-readme-ports.lock"))
            .unwrap();
        // SAFETY: flock on a file descriptor we own; released when it closes.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        Self { _file: f }
    }
}

#[test]
fn every_readme_shell_example_works_verbatim() {
    let cmds = readme_commands();
    let _lock = PortsLock::take();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while (5001..=5007).any(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok()) {
        assert!(
            std::time::Instant::now() < deadline,
            "something else listens on 127.0.0.1:5001-5007, which the README's examples use"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let root = common::temp_dir("readme");
    // curl fails on an error status (as the README's reader would notice it).
    std::fs::write(root.join(".curlrc"), "fail-with-body\nsilent\nshow-error\n").unwrap();
    let bin_dir = std::path::Path::new(common::BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sh = |script: &str| {
        let mut c = Command::new("sh");
        c.args(["-ec", script])
            .current_dir(&root)
            .env("PATH", &path)
            .env("CURL_HOME", &root)
            .env_remove("PYGMY_CONFIG")
            .env_remove("PYGMY_FRONTEND")
            .env_remove("PYGMY_DATA_DIR")
            .stdin(Stdio::null());
        c
    };

    let mut up: Option<Up> = None;
    let mut prelude = String::new();
    let mut ran = Vec::new();
    let mut failures = Vec::new();
    let mut forwarded: Option<String> = None;
    for cmd in &cmds {
        // `cargo run --release -- ARGS` builds and runs `pygmy ARGS`: run the
        // binary cargo built for this test (a release build here would take
        // minutes).
        let cmd = &match cmd.strip_prefix("cargo run --release -- ") {
            Some(args) => format!("pygmy {args}"),
            None => cmd.clone(),
        };
        if let Some((_, why)) = README_NOT_RUN.iter().find(|(p, _)| cmd.starts_with(p)) {
            println!("not run: {cmd} ({why})");
            continue;
        }
        if cmd == "pygmy up" || cmd.starts_with("pygmy up ") {
            // Runs until Ctrl-C: started in the background, in a process
            // group of its own as a terminal's foreground job would be.
            assert!(up.is_none(), "one `pygmy up` in the README");
            let mut c = sh(cmd);
            std::os::unix::process::CommandExt::process_group(&mut c, 0);
            let mut started = Up::spawn(c);
            started.group = true;
            started.expect("the store is up");
            up = Some(started);
            ran.push(cmd.clone());
            continue;
        }
        assert!(up.is_some(), "the README starts the store before {cmd:?}");
        let is_assignment = cmd.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        let script = format!("{prelude}{cmd}\n");
        if is_assignment {
            prelude = script.clone();
        }
        let mut child = sh(&script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        ran.push(cmd.clone());
        if !out.status.success() {
            let report = format!(
                "{cmd}\n  exit: {}\n  stdout: {}\n  stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if cmd.contains(FORWARDED_UPDATE) {
                forwarded = Some(report);
            } else {
                failures.push(report);
            }
        }
    }
    let mut up = up.expect("the README starts the store with `pygmy up`");
    // Ctrl-C: SIGINT to the foreground job's process group.
    // SAFETY: a signal to the group of the shell we started.
    unsafe { libc::killpg(up.child.id() as i32, libc::SIGINT) };
    let line = up.expect("stopped —");
    assert!(line.contains("7 of 7 processes exited cleanly"), "{line}");
    drop(up);
    std::fs::remove_dir_all(&root).unwrap();
    assert!(
        ran.iter().any(|c| c.contains("pygmy status")) && ran.len() > 8,
        "the README's examples ran: {ran:#?}"
    );
    assert!(
        failures.is_empty(),
        "README examples failed:\n{}",
        failures.join("\n")
    );
    // Marked: the README's admin example targets catalog-1, a backup. It
    // answers 200 only once backups forward writes to the primary; until
    // then it answers 421 and this assertion fails.
    assert!(
        forwarded.is_none(),
        "the README's update on a backup (catalog-1) must be forwarded to the primary and answer 200:\n{}",
        forwarded.unwrap_or_default()
    );
}
