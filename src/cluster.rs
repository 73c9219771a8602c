//! `pygmy up`: the whole store on one machine, each node its own OS process
//! (`pygmy serve --config DIR/cluster.toml NAME`) in its own process group,
//! their logs prefixed with the node's name. It reports start-up progress
//! ("5/7 ready", readiness being each node's `/readyz`), fails fast when a
//! child exits during start-up (naming it, with its last log lines), and on
//! Ctrl-C or SIGTERM stops the tiers in order: frontend, order, catalog.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::{FrontendClient, Http};
use crate::config::{ClusterConfig, Role};

pub struct UpOptions {
    pub data_dir: PathBuf,
    /// Host (IP) the default cluster listens on.
    pub host: String,
    pub no_cache: bool,
    /// Catalog replicas of a new cluster.
    pub catalogs: u64,
}

/// Loads `DIR/cluster.toml`, or writes a new one (with a fresh token).
pub fn load_or_create(
    dir: &Path,
    host: &str,
    catalogs: u64,
) -> anyhow::Result<(PathBuf, ClusterConfig, bool)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join("cluster.toml");
    if path.exists() {
        let cfg = ClusterConfig::load(&path)?;
        return Ok((path, cfg, false));
    }
    let cfg = ClusterConfig::local(host, catalogs);
    cfg.save(&path)?;
    let cfg = ClusterConfig::load(&path)?;
    Ok((path, cfg, true))
}

/// How long a node gets to stop after SIGTERM before it is killed: longer
/// than its drain time (`http::DRAIN_TIMEOUT`).
pub const KILL_TIMEOUT: Duration = Duration::from_secs(crate::http::DRAIN_TIMEOUT.as_secs() + 5);
/// How long start-up may take before `pygmy up` gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines kept per node, shown when it fails.
const TAIL_LINES: usize = 12;

type Tail = Arc<Mutex<VecDeque<String>>>;

struct Node {
    name: String,
    role: Role,
    child: Child,
    /// Its last log lines.
    tail: Tail,
    /// The tasks reading its output into `tail`.
    readers: Vec<tokio::task::JoinHandle<()>>,
    running: bool,
}

impl Node {
    fn last_lines(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.is_empty() {
            return "    (no output)".into();
        }
        tail.iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Its last log lines, once it exited: its output is read to its end
    /// first (for at most a second). The exit can be seen before the
    /// readers took its last lines, which then were left out.
    async fn last_lines_after_exit(&mut self) -> String {
        let readers = std::mem::take(&mut self.readers);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for r in readers {
                let _ = r.await;
            }
        })
        .await;
        self.last_lines()
    }
}

pub async fn up(opts: UpOptions) -> anyhow::Result<()> {
    let (path, cfg, created) = load_or_create(&opts.data_dir, &opts.host, opts.catalogs)?;
    if created {
        println!(
            "pygmy: new cluster written to {} — the cluster token (for internal and admin routes) is its `token` key; the file is readable by you only",
            path.display()
        );
    } else {
        println!(
            "pygmy: using cluster {} (token in its `token` key)",
            path.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find the pygmy executable")?;
    let mut order: Vec<&crate::config::NodeConfig> = cfg.nodes.iter().collect();
    order.sort_by_key(|n| match n.role {
        Role::Catalog => 0,
        Role::Order => 1,
        Role::Frontend => 2,
    });
    let mut nodes = Vec::new();
    for n in order {
        let mut cmd = Command::new(&exe);
        cmd.arg("serve").arg("--config").arg(&path).arg(&n.name);
        if n.role == Role::Frontend && opts.no_cache {
            cmd.arg("--no-cache");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        own_process_group(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut nodes).await;
                return Err(e).with_context(|| format!("cannot start {}", n.name));
            }
        };
        let tail: Tail = Arc::default();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(prefix_lines(&n.name, out, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(prefix_lines(&n.name, err, tail.clone()));
        }
        nodes.push(Node {
            name: n.name.clone(),
            role: n.role,
            child,
            tail,
            readers,
            running: true,
        });
    }
    let shutdown = crate::http::shutdown_signal();
    tokio::pin!(shutdown);
    tokio::select! {
        r = start_up(&cfg, &mut nodes) => match r {
            Ok(()) => {
                let fe = cfg.nodes_of(Role::Frontend).next().map(|n| n.addr.clone()).unwrap_or_default();
                println!(
                    "pygmy: the store is up — {} processes; frontend at http://{fe} (cache {}); data in {}. Ctrl-C stops it.",
                    nodes.len(),
                    if opts.no_cache { "off" } else { "on" },
                    opts.data_dir.display()
                );
            }
            Err(e) => {
                stop(&mut nodes).await;
                return Err(e);
            }
        },
        _ = &mut shutdown => {
            stop(&mut nodes).await;
            return Ok(());
        }
    }
    // Run until told to stop; a node that exits is reported, the rest go on.
    loop {
        tokio::select! {
            i = exited(&mut nodes) => {
                nodes[i].running = false;
                let status = nodes[i].child.try_wait().ok().flatten();
                let last = nodes[i].last_lines_after_exit().await;
                println!(
                    "pygmy: {} exited ({}); its last lines:\n{}",
                    nodes[i].name,
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    last
                );
                if !nodes.iter().any(|n| n.running) {
                    bail!("every node has exited");
                }
            }
            _ = &mut shutdown => break,
        }
    }
    stop(&mut nodes).await;
    Ok(())
}

/// Puts the child in a process group of its own, so a Ctrl-C at the
/// terminal reaches `pygmy up` alone, which then stops the nodes in order.
/// On Linux the child is also told to stop if `pygmy up` dies without
/// stopping it.
pub(crate) fn own_process_group(cmd: &mut Command) {
    #[cfg(unix)]
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to stop
    // the child if this process dies without stopping it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    #[cfg(not(unix))]
    let _ = cmd;
}

/// Resolves with the index of a running node that has exited.
async fn exited(nodes: &mut [Node]) -> usize {
    loop {
        for (i, n) in nodes.iter_mut().enumerate() {
            if n.running && matches!(n.child.try_wait(), Ok(Some(_))) {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Relays a node's output, each line prefixed with its name, keeping its
/// last lines in `tail`; the task ends at the end of the output.
fn prefix_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    name: &str,
    stream: R,
    tail: Tail,
) -> tokio::task::JoinHandle<()> {
    let name = name.to_string();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{name:>10} | {line}");
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    })
}

/// Waits until every node answers `/readyz`, printing progress; fails at
/// once if a node exits, and after [`START_TIMEOUT`] if one is not ready.
async fn start_up(cfg: &ClusterConfig, nodes: &mut [Node]) -> anyhow::Result<()> {
    let http = Http::new(None, Duration::from_millis(1500));
    let token_http = Http::new(Some(cfg.token.clone()), Duration::from_millis(1500));
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let total = nodes.len();
    let mut ready = vec![false; total];
    let mut shown = usize::MAX;
    loop {
        for n in nodes.iter_mut() {
            if let Ok(Some(status)) = n.child.try_wait() {
                n.running = false;
                let last = n.last_lines_after_exit().await;
                bail!(
                    "{} exited during start-up ({status}); its last lines:\n{}",
                    n.name,
                    last
                );
            }
        }
        let probes = nodes.iter().zip(&ready).map(|(n, r)| {
            let c = cfg
                .node(&n.name)
                .map(|c| FrontendClient::new(c.base_url(), http.clone()));
            let r = *r;
            async move {
                match c {
                    _ if r => true,
                    Some(c) => c.ready().await.is_ok(),
                    None => false,
                }
            }
        });
        let now: Vec<bool> = join_all(probes).await;
        ready = now;
        let count = ready.iter().filter(|r| **r).count();
        if count != shown {
            shown = count;
            let waiting: Vec<&str> = nodes
                .iter()
                .zip(&ready)
                .filter(|(_, r)| !**r)
                .map(|(n, _)| n.name.as_str())
                .collect();
            if waiting.is_empty() {
                println!("pygmy: {count}/{total} ready");
            } else {
                println!(
                    "pygmy: {count}/{total} ready (waiting for {})",
                    waiting.join(", ")
                );
            }
        }
        // And the catalog serves: a primary holds the (founding) catalog.
        if count == total && catalog_held(cfg, &token_http).await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            if count == total {
                bail!(
                    "no catalog primary holds the catalog within {} s",
                    START_TIMEOUT.as_secs()
                );
            }
            let late: Vec<String> = nodes
                .iter()
                .zip(&ready)
                .filter(|(_, r)| !**r)
                .map(|(n, _)| format!("{} — its last lines:\n{}", n.name, n.last_lines()))
                .collect();
            bail!(
                "not ready within {} s: {}",
                START_TIMEOUT.as_secs(),
                late.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a catalog primary holds the catalog (its founding books).
async fn catalog_held(cfg: &ClusterConfig, http: &Http) -> bool {
    let probes = cfg.nodes_of(Role::Catalog).map(|n| {
        let c = crate::client::CatalogClient::new(n.base_url(), http.clone());
        async move {
            c.status()
                .await
                .is_ok_and(|s| s.role == "primary" && s.books > 0)
        }
    });
    join_all(probes).await.into_iter().any(|held| held)
}

/// Runs `futs` concurrently, answers in order.
pub(crate) async fn join_all<T: Send + 'static>(
    futs: impl IntoIterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a concurrent probe does not panic"));
    }
    out
}

/// Stops the nodes tier by tier — frontend, then order, then catalog — so
/// no tier loses the one it calls while draining: SIGTERM to each node's
/// process group, then up to [`KILL_TIMEOUT`] for it to exit, then SIGKILL.
async fn stop(nodes: &mut [Node]) {
    println!("pygmy: stopping {} processes…", nodes.len());
    let mut clean = 0;
    for role in [Role::Frontend, Role::Order, Role::Catalog] {
        let mut tier: Vec<&mut Node> = nodes.iter_mut().filter(|n| n.role == role).collect();
        for n in tier.iter_mut() {
            terminate(&mut n.child);
        }
        let waits = tier.into_iter().map(|n| async move {
            let ok = match tokio::time::timeout(KILL_TIMEOUT, n.child.wait()).await {
                Ok(Ok(s)) if s.success() => true,
                Ok(Ok(s)) => {
                    if n.running {
                        println!("pygmy: {} stopped with {s}", n.name);
                    }
                    false
                }
                Ok(Err(e)) => {
                    println!("pygmy: {}: {e}", n.name);
                    false
                }
                Err(_) => {
                    println!(
                        "pygmy: {} did not stop in {} s; killing it",
                        n.name,
                        KILL_TIMEOUT.as_secs()
                    );
                    kill(&mut n.child).await;
                    false
                }
            };
            (ok, n.name.clone())
        });
        let mut names = Vec::new();
        for (ok, name) in join_local(waits).await {
            clean += usize::from(ok);
            names.push(name);
        }
        if !names.is_empty() {
            println!("pygmy: {role} tier stopped: {}", names.join(", "));
        }
    }
    println!(
        "pygmy: stopped — {clean} of {} processes exited cleanly",
        nodes.len()
    );
}

/// Awaits borrowed futures concurrently (they cannot be spawned).
async fn join_local<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// SIGTERM to the child's process group (the child and anything it started).
pub(crate) fn terminate(child: &mut Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // SAFETY: plain syscall on the process group of a child we started
        // and have not reaped (its pid is its group's id).
        unsafe {
            libc::killpg(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    #[cfg(not(unix))]
    let _ = child.start_kill();
}

/// SIGKILL to the child's process group, then reap it.
pub(crate) async fn kill(child: &mut Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // SAFETY: as in `terminate`.
        unsafe {
            libc::killpg(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}
