//! The speed targets' anchors, measured on this machine in the same run and
//! with the same load generator as the store (`pygmy bench --anchors`):
//!
//! * **nginx serving a static file** (the anchor of a cached lookup): a
//!   file the size and shape of a lookup's answer, at 64 connections;
//! * **a three-member etcd's durable put** (the anchor of a buy): one
//!   connection, and 32, to the leader's JSON gateway (`/v3/kv/put`).
//!
//! The targets are fixed figures from one day on a reference machine. A
//! virtual machine's speed moves several-fold from one day to the next, and
//! what the anchors do on the same machine in the same few minutes says how
//! much of a run's distance from a target is the machine's. Each anchor is
//! measured only if its program is installed (`nginx`, `etcd`; Debian's
//! packages `nginx` and `etcd-server`); otherwise the report says so. Both
//! run on free loopback ports in the bench's scratch folder, and are
//! stopped (each process group killed) before the bench goes on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;
use tokio::process::{Child, Command};

use super::load::{self, Pick, Req, Stats};
use super::store::free_port;

/// The anchor of a cached lookup.
pub const NGINX: &str = "nginx, static file";
/// The anchor of a buy.
pub const ETCD: &str = "etcd, 3-member durable put";

/// How long an anchor may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize)]
pub struct AnchorRow {
    /// [`NGINX`] or [`ETCD`].
    pub anchor: String,
    /// Closed loop, keep-alive connections.
    pub connections: usize,
    #[serde(flatten)]
    pub stats: Stats,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Anchors {
    /// Whether they ran with the store stopped (one the bench started), or
    /// beside a running one (`--target`), idle.
    pub store_stopped: bool,
    /// The program versions measured (`nginx version: nginx/1.22.1`, …).
    pub versions: Vec<String>,
    pub rows: Vec<AnchorRow>,
    /// Why an anchor was not measured.
    pub skipped: Vec<String>,
}

impl Anchors {
    pub fn find(&self, anchor: &str, connections: usize) -> Option<&Stats> {
        self.rows
            .iter()
            .find(|r| r.anchor == anchor && r.connections == connections)
            .map(|r| &r.stats)
    }
}

/// Measures every anchor installed, one after the other, in `dir` (created,
/// and removed afterwards). `file` is what nginx serves. Never fails: what
/// could not be measured is in [`Anchors::skipped`].
pub async fn measure(dir: &Path, file: Bytes, cell: Duration, store_stopped: bool) -> Anchors {
    let mut out = Anchors {
        store_stopped,
        ..Anchors::default()
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        out.skipped
            .push(format!("anchors: cannot create {}: {e}", dir.display()));
        return out;
    }
    match installed("nginx").await {
        Some((program, v)) => match nginx(&program, &dir.join("nginx"), file, cell).await {
            Ok(stats) => {
                out.versions.push(v);
                out.rows.push(AnchorRow {
                    anchor: NGINX.into(),
                    connections: 64,
                    stats,
                });
            }
            Err(e) => out.skipped.push(format!("{NGINX}: {e:#}")),
        },
        None => out.skipped.push(format!(
            "{NGINX}: nginx is not installed (not on PATH, nor in /usr/sbin)"
        )),
    }
    match installed("etcd").await {
        Some((program, v)) => match etcd(&program, &dir.join("etcd"), cell).await {
            Ok(rows) => {
                out.versions.push(v);
                out.rows.extend(rows);
            }
            Err(e) => out.skipped.push(format!("{ETCD}: {e:#}")),
        },
        None => out.skipped.push(format!(
            "{ETCD}: etcd is not installed (not on PATH, nor in /usr/sbin)"
        )),
    }
    let _ = std::fs::remove_dir_all(dir);
    out
}

/// Where `program` is and the first line its version flag prints: on
/// `PATH`, or in the system folders a user's `PATH` may leave out (Debian
/// puts nginx in `/usr/sbin`).
async fn installed(program: &str) -> Option<(PathBuf, String)> {
    let flag = if program == "nginx" {
        "-v"
    } else {
        "--version"
    };
    for path in [
        PathBuf::from(program),
        Path::new("/usr/sbin").join(program),
        Path::new("/usr/local/sbin").join(program),
    ] {
        let run = Command::new(&path).arg(flag).stdin(Stdio::null()).output();
        let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(10), run).await else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        // nginx prints its version on stderr.
        let text = [out.stdout, out.stderr].concat();
        let version = String::from_utf8_lossy(&text)
            .lines()
            .next()
            .map(|l| l.trim().to_string())
            .unwrap_or_default();
        return Some((path, version));
    }
    None
}

/// The processes of one anchor, each in a process group of its own:
/// [`Processes::stop`] kills each group (nginx's workers with their master)
/// and reaps them; dropped without it, each is killed.
struct Processes(Vec<Child>);

impl Processes {
    fn spawn(&mut self, cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        crate::cluster::own_process_group(cmd);
        self.0.push(cmd.spawn()?);
        Ok(())
    }

    async fn stop(mut self) {
        for c in &mut self.0 {
            crate::cluster::kill(c).await;
        }
    }
}

/// nginx with one `server` serving `file`, as many workers as CPUs and
/// nothing logged per request; the faster of two cells at 64 connections.
async fn nginx(program: &Path, dir: &Path, file: Bytes, cell: Duration) -> anyhow::Result<Stats> {
    let root = dir.join("www");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("book.json"), &file)?;
    let port = free_port()?;
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\n\
         daemon off;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
           access_log off;\n\
           keepalive_requests 1000000;\n\
           default_type application/json;\n\
           client_body_temp_path {d}/tmp-body;\n\
           proxy_temp_path {d}/tmp-proxy;\n\
           fastcgi_temp_path {d}/tmp-fastcgi;\n\
           uwsgi_temp_path {d}/tmp-uwsgi;\n\
           scgi_temp_path {d}/tmp-scgi;\n\
           server {{ listen 127.0.0.1:{port}; root {root}; }}\n\
         }}\n",
        root = root.display(),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut procs = Processes(Vec::new());
    let mut cmd = Command::new(program);
    // -e: the error log before the configuration is read (the default is
    // the system's, which may not be writable).
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path);
    procs.spawn(&mut cmd, &dir.join("nginx.log"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let pick: Pick = Arc::new(|_| Req::get("/book.json"));
    let measured = async {
        answering(addr, &pick).await?;
        // Warm, then the faster of two cells (as the store's floor).
        load::closed(addr, pick.clone(), 64, cell / 4).await;
        let a = load::closed(addr, pick.clone(), 64, cell).await;
        let b = load::closed(addr, pick.clone(), 64, cell).await;
        Ok::<_, anyhow::Error>(if b.per_second > a.per_second { b } else { a })
    }
    .await;
    procs.stop().await;
    measured.with_context(|| format!("its log is {}", dir.join("error.log").display()))
}

/// Three etcd members on loopback, each with its own data folder (etcd
/// fsyncs every write before it answers, as the store does); puts of small
/// values to the leader at one connection and at 32.
async fn etcd(program: &Path, dir: &Path, cell: Duration) -> anyhow::Result<Vec<AnchorRow>> {
    std::fs::create_dir_all(dir)?;
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<std::io::Result<_>>()?;
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Processes(Vec::new());
    for (i, (client, peer)) in ports.iter().enumerate() {
        let data: PathBuf = dir.join(format!("e{i}"));
        let mut cmd = Command::new(program);
        cmd.arg("--name")
            .arg(format!("e{i}"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-cluster")
            .arg(&cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("pygmy-bench-anchor");
        procs.spawn(&mut cmd, &dir.join(format!("e{i}.log")))?;
    }
    let clients: Vec<SocketAddr> = ports
        .iter()
        .map(|(c, _)| SocketAddr::from(([127, 0, 0, 1], *c)))
        .collect();
    let measured = async {
        // Small keys and values, cycling over seven keys as buys cycle over
        // the books: {"key": "key1", "value": "value"} in base64.
        let pick: Pick = Arc::new(|i| {
            let key = [
                "a2V5MQ", "a2V5Mg", "a2V5Mw", "a2V5NA", "a2V5NQ", "a2V5Ng", "a2V5Nw",
            ][i as usize % 7];
            Req::post_json(
                "/v3/kv/put",
                format!(r#"{{"key":"{key}==","value":"dmFsdWU="}}"#),
            )
        });
        answering(clients[0], &pick).await?;
        let leader = etcd_leader(&clients).await?;
        let mut rows = Vec::new();
        for conns in [1, 32] {
            load::closed(leader, pick.clone(), conns, cell / 4).await;
            rows.push(AnchorRow {
                anchor: ETCD.into(),
                connections: conns,
                stats: load::closed(leader, pick.clone(), conns, cell).await,
            });
        }
        Ok::<_, anyhow::Error>(rows)
    }
    .await;
    procs.stop().await;
    measured.with_context(|| format!("its logs are in {}", dir.display()))
}

/// Waits until `addr` answers `pick`'s first request with a 2xx.
async fn answering(addr: SocketAddr, pick: &Pick) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + START_TIMEOUT;
    let mut conn = load::Timed::new(addr);
    loop {
        if conn.once(&pick(0)).await.1 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            bail!("{addr} did not answer within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The member that is the leader: each member's status names it, and its
/// own id (decimal strings in the JSON gateway).
async fn etcd_leader(clients: &[SocketAddr]) -> anyhow::Result<SocketAddr> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    for &addr in clients {
        let status: serde_json::Value = http
            .post(format!("http://{addr}/v3/maintenance/status"))
            .body("{}")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let me = &status["header"]["member_id"];
        if !me.is_null() && *me == status["leader"] {
            return Ok(addr);
        }
    }
    bail!("no member says it is the leader")
}
