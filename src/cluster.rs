//! `pygmy up`: the whole store on one machine, each node its own OS process
//! (`pygmy serve --config DIR/cluster.toml NAME`), their logs prefixed with
//! the node's name, all of them stopped cleanly on Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
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

struct Node {
    name: String,
    child: Child,
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
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to stop
        // the child if this process dies without stopping it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", n.name))?;
        prefix_lines(&n.name, child.stdout.take());
        prefix_lines(&n.name, child.stderr.take());
        nodes.push(Node {
            name: n.name.clone(),
            child,
        });
    }
    let shutdown = crate::http::shutdown_signal();
    tokio::pin!(shutdown);
    let ready = wait_ready(&cfg);
    tokio::select! {
        r = ready => match r {
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
    let mut running: Vec<bool> = vec![true; nodes.len()];
    loop {
        let exited = async {
            loop {
                for (i, n) in nodes.iter_mut().enumerate() {
                    if running[i]
                        && let Ok(Some(status)) = n.child.try_wait()
                    {
                        return (i, status);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            (i, status) = exited => {
                running[i] = false;
                println!("pygmy: {} exited ({status})", nodes[i].name);
                if !running.iter().any(|r| *r) {
                    bail!("every node has exited");
                }
            }
            _ = &mut shutdown => break,
        }
    }
    stop(&mut nodes).await;
    Ok(())
}

fn prefix_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(name: &str, stream: Option<R>) {
    let Some(stream) = stream else { return };
    let name = name.to_string();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{name:>10} | {line}");
        }
    });
}

async fn wait_ready(cfg: &ClusterConfig) -> anyhow::Result<()> {
    let http = Http::new(None, Duration::from_millis(500));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for n in &cfg.nodes {
        let c = FrontendClient::new(n.base_url(), http.clone());
        loop {
            if c.health().await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} did not become healthy at {} within 60 s",
                    n.name,
                    n.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // And the catalog serves: a primary holds the (founding) catalog.
    let http = Http::new(Some(cfg.token.clone()), Duration::from_millis(500));
    let catalogs: Vec<_> = cfg
        .nodes_of(Role::Catalog)
        .map(|n| crate::client::CatalogClient::new(n.base_url(), http.clone()))
        .collect();
    loop {
        for c in &catalogs {
            if c.status()
                .await
                .is_ok_and(|s| s.role == "primary" && s.books > 0)
            {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no catalog primary holds the catalog within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to every node, then wait; SIGKILL what has not stopped after 15 s.
async fn stop(nodes: &mut [Node]) {
    println!("pygmy: stopping {} processes…", nodes.len());
    for n in nodes.iter() {
        if let Some(pid) = n.child.id() {
            // SAFETY: plain syscall on a child we started and have not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    let mut clean = 0;
    for n in nodes.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(15), n.child.wait()).await {
            Ok(Ok(s)) if s.success() => clean += 1,
            Ok(Ok(s)) => println!("pygmy: {} stopped with {s}", n.name),
            Ok(Err(e)) => println!("pygmy: {}: {e}", n.name),
            Err(_) => {
                println!("pygmy: {} did not stop in 15 s; killing it", n.name);
                let _ = n.child.kill().await;
            }
        }
    }
    println!(
        "pygmy: stopped — {clean} of {} processes exited cleanly",
        nodes.len()
    );
}
