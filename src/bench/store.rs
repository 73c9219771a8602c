//! The store under test: one the bench starts itself (seven `pygmy serve`
//! processes on free loopback ports, in a scratch folder), or a running one
//! named by its cluster file (`--target`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::api::{BookId, NodeStatus, RequestId, UpdateRequest};
use crate::client::{CatalogClient, FrontendClient, Http};
use crate::config::{ClusterConfig, NodeConfig, Role};

/// How long the store may take to become ready (start or restart).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Store {
    pub cfg: ClusterConfig,
    /// Token-carrying client for status, metrics and restocking.
    pub http: Http,
    local: Option<Local>,
}

/// Processes the bench started.
struct Local {
    exe: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    children: BTreeMap<String, Child>,
    no_cache: bool,
}

impl Store {
    /// A running store: the bench measures it, and cannot restart or kill
    /// its processes.
    pub fn target(cfg: ClusterConfig) -> Self {
        let http = Http::new(Some(cfg.token.clone()), Duration::from_secs(5));
        Self {
            cfg,
            http,
            local: None,
        }
    }

    /// Starts a new store of seven processes in `dir` (created; removed by
    /// [`Store::stop`]) on free loopback ports, and waits until it serves.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cfg = ClusterConfig::local("127.0.0.1", 3);
        for n in &mut cfg.nodes {
            n.addr = format!("127.0.0.1:{}", free_port()?);
        }
        let config = dir.join("cluster.toml");
        cfg.save(&config)?;
        let cfg = ClusterConfig::load(&config)?;
        let exe = std::env::current_exe().context("cannot find the pygmy executable")?;
        let http = Http::new(Some(cfg.token.clone()), Duration::from_secs(5));
        let mut store = Self {
            cfg,
            http,
            local: Some(Local {
                exe,
                dir: dir.to_path_buf(),
                config,
                children: BTreeMap::new(),
                no_cache: false,
            }),
        };
        let names: Vec<String> = store.cfg.nodes.iter().map(|n| n.name.clone()).collect();
        for name in &names {
            store.spawn(name)?;
        }
        store.wait_ready(&names).await?;
        Ok(store)
    }

    /// Whether the bench runs the processes (and so may kill and restart them).
    pub fn owns_processes(&self) -> bool {
        self.local.is_some()
    }

    fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(local) = &mut self.local else {
            bail!("the bench does not run {name}");
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(local.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&local.exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(&local.config)
            .arg(name);
        if local.no_cache && name == "frontend" {
            cmd.arg("--no-cache");
        }
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        crate::cluster::own_process_group(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        local.children.insert(name.to_string(), child);
        Ok(())
    }

    /// SIGKILL, no warning: a crash.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(local) = &mut self.local else {
            bail!("the bench does not run {name}");
        };
        let Some(mut child) = local.children.remove(name) else {
            bail!("{name} is not running");
        };
        crate::cluster::kill(&mut child).await;
        Ok(())
    }

    /// Starts a killed node again (does not wait for it).
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        self.spawn(name)
    }

    /// Restarts the frontend with its cache on or off, and waits until it
    /// is ready. Only for a store the bench runs.
    pub async fn set_cache(&mut self, on: bool) -> anyhow::Result<()> {
        let Some(local) = &mut self.local else {
            bail!("the bench cannot restart a running store's frontend");
        };
        if local.no_cache != on && local.children.contains_key("frontend") {
            return Ok(());
        }
        local.no_cache = !on;
        if let Some(mut child) = local.children.remove("frontend") {
            crate::cluster::terminate(&mut child);
            if tokio::time::timeout(crate::cluster::KILL_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                crate::cluster::kill(&mut child).await;
            }
        }
        self.spawn("frontend")?;
        self.wait_ready(&["frontend".to_string()]).await
    }

    /// Whether the frontend caches (from its `/internal/cache`).
    pub async fn cache_on(&self) -> bool {
        self.cache_stats()
            .await
            .is_some_and(|s| s["enabled"].as_bool() == Some(true))
    }

    pub async fn cache_stats(&self) -> Option<serde_json::Value> {
        let url = format!("{}/internal/cache", self.frontend().base_url());
        self.http.get::<serde_json::Value>(url).await.ok()
    }

    /// Waits until every named node answers `/readyz` and a catalog primary
    /// holds the catalog.
    pub async fn wait_ready(&self, names: &[String]) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let mut waiting = Vec::new();
            for name in names {
                let Some(n) = self.cfg.node(name) else {
                    bail!("no node {name}");
                };
                let ready = FrontendClient::new(n.base_url(), self.http.clone())
                    .ready()
                    .await
                    .is_ok();
                if !ready {
                    waiting.push(name.as_str());
                }
            }
            if waiting.is_empty() && self.primary().await.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the store is not ready within {} s (waiting for {})",
                    READY_TIMEOUT.as_secs(),
                    if waiting.is_empty() {
                        "a catalog primary".to_string()
                    } else {
                        waiting.join(", ")
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn frontend(&self) -> &NodeConfig {
        self.cfg
            .nodes_of(Role::Frontend)
            .next()
            .expect("a validated cluster file has a frontend")
    }

    /// The frontend's socket address (the load generator speaks plain HTTP
    /// to it: public routes take plain HTTP also when TLS is on).
    pub async fn frontend_addr(&self) -> anyhow::Result<SocketAddr> {
        let addr = &self.frontend().addr;
        tokio::net::lookup_host(addr)
            .await?
            .next()
            .with_context(|| format!("{addr} resolves to nothing"))
    }

    /// Every catalog replica's status (`None` when it does not answer).
    pub async fn catalog_statuses(&self) -> Vec<(String, Option<NodeStatus>)> {
        let probes = self.cfg.nodes_of(Role::Catalog).map(|n| {
            let c = CatalogClient::new(n.base_url(), self.http.clone());
            let name = n.name.clone();
            async move { (name, c.status().await.ok()) }
        });
        crate::cluster::join_all(probes).await
    }

    /// The catalog primary holding the catalog, with the highest epoch seen.
    pub async fn primary(&self) -> Option<(String, NodeStatus)> {
        self.catalog_statuses()
            .await
            .into_iter()
            .filter_map(|(n, s)| s.map(|s| (n, s)))
            .filter(|(_, s)| s.role == "primary" && s.books > 0)
            .max_by_key(|(_, s)| s.epoch)
    }

    /// The catalog's book ids and topics (from the frontend).
    pub async fn books_and_topics(&self) -> anyhow::Result<(Vec<u64>, Vec<String>)> {
        let fe = FrontendClient::new(self.frontend().base_url(), self.http.clone());
        let http = &self.http;
        let topics: crate::api::TopicsResponse = http
            .get(format!("{}/topics", self.frontend().base_url()))
            .await
            .context("GET /topics")?;
        let mut books = Vec::new();
        let mut slugs = Vec::new();
        for slug in topics.topics.keys() {
            slugs.push(slug.clone());
            let found = fe.search(slug).await.context("search")?;
            books.extend(found.items.values().map(|id| id.get()));
        }
        books.sort_unstable();
        books.dedup();
        if books.is_empty() {
            bail!("the catalog holds no books");
        }
        Ok((books, slugs))
    }

    /// Sets every book's stock to `stock` (an admin update through the
    /// catalog primary), so buys do not run out during the bench.
    pub async fn restock(&self, books: &[u64], stock: u64) -> anyhow::Result<()> {
        let pool = crate::client::catalog_admin_pool(&self.cfg, self.http.clone());
        for &b in books {
            let req = UpdateRequest {
                id: BookId::parse(&b.to_string())?,
                stock: Some(stock),
                cost: None,
                request_id: Some(RequestId::mint_as("u", crate::api::unix_ms())),
            };
            let req = &req;
            pool.call(|c| async move { c.update(req).await })
                .await
                .with_context(|| format!("restocking book {b}"))?;
        }
        Ok(())
    }

    /// Memory of every node, from its `/metrics`.
    pub async fn memory(&self) -> Vec<super::NodeMemory> {
        let probes = self.cfg.nodes.iter().map(|n| {
            let url = format!("{}/metrics", n.base_url());
            let http = self.http.clone();
            let node = n.name.clone();
            async move {
                let page = http.text(url).await.ok();
                let get = |name| page.as_deref().and_then(|p| gauge(p, name));
                super::NodeMemory {
                    node,
                    rss_bytes: get("process_resident_memory_bytes"),
                    pss_bytes: get("pygmy_process_proportional_memory_bytes"),
                    anonymous_bytes: get("pygmy_process_anonymous_memory_bytes"),
                    open_fds: get("process_open_fds"),
                    answers_kept: get(crate::metrics::CATALOG_ANSWERS_KEPT),
                }
            }
        });
        crate::cluster::join_all(probes).await
    }

    /// Stops the processes the bench started and removes their folder
    /// (kept when `keep`, for its logs).
    pub async fn stop(mut self, keep: bool) {
        let Some(local) = self.local.take() else {
            return;
        };
        let mut children: Vec<Child> = local.children.into_values().collect();
        for c in &mut children {
            crate::cluster::terminate(c);
        }
        for c in &mut children {
            if tokio::time::timeout(crate::cluster::KILL_TIMEOUT, c.wait())
                .await
                .is_err()
            {
                crate::cluster::kill(c).await;
            }
        }
        if !keep {
            let _ = std::fs::remove_dir_all(&local.dir);
        }
    }

    /// The scratch folder of a store the bench runs.
    pub fn dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.dir.as_path())
    }
}

/// An unlabelled gauge's value from a Prometheus page.
fn gauge(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

pub(super) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn resident_memory_is_read_from_the_metrics_page() {
        let page = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes 16801792\n";
        assert_eq!(
            super::gauge(page, "process_resident_memory_bytes"),
            Some(16_801_792)
        );
        assert_eq!(super::gauge(page, "process_resident"), None);
        assert_eq!(
            super::gauge(
                "process_cpu_seconds_total 3\n",
                "process_resident_memory_bytes"
            ),
            None
        );
    }
}
