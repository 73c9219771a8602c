//! The binary's commands: `pygmy up` and `pygmy serve` overrides.

mod common;

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
}

impl Up {
    fn start(args: &[&str], cwd: &std::path::Path) -> Self {
        let mut child = Command::new(common::BIN)
            .arg("up")
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
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
    // and every replica has applied the buy.
    let status = |path: std::path::PathBuf| {
        let out = Command::new(common::BIN)
            .args(["status", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let mut text = String::new();
    for _ in 0..1200 {
        text = status(cfg_path.clone());
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
        let c = FrontendClient::new(format!("http://{addr}"), http.clone());
        common::wait_until(
            &format!("a node answers on {addr}"),
            Duration::from_secs(30),
            || {
                let c = c.clone();
                async move { c.health().await.is_ok() }
            },
        )
        .await;
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
