//! Real processes on loopback: `TestCluster::start` writes a cluster file for
//! a fresh data directory, starts every node as a `pygmy serve` process on
//! its own loopback address, waits until each is healthy, and hands out
//! typed clients. Nodes can be killed (SIGKILL), stopped (SIGTERM) and
//! restarted. Everything is stopped when the cluster is dropped.

pub mod webdriver;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pygmy::api::*;
use pygmy::balance::{Pick, Pool};
use pygmy::client::{CatalogClient, FrontendClient, Http, OrderClient};
use pygmy::config::{ClusterConfig, Role};

pub const BIN: &str = env!("CARGO_BIN_EXE_pygmy");

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// A loopback IP no other test process uses (127.0.0.0/8 is all loopback),
/// so each test cluster can keep the store's usual ports.
pub fn unique_host() -> String {
    let pid = std::process::id();
    let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    format!(
        "127.{}.{}.{}",
        20 + pid % 200,
        (pid / 200) % 250,
        1 + n % 250
    )
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "pygmy-test-{tag}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Waits (up to 30 s) until the node at `base` answers its health check.
pub async fn wait_answering(base: String, http: &Http, what: &str) {
    let c = FrontendClient::new(base, http.clone());
    wait_until(what, Duration::from_secs(30), || {
        let c = c.clone();
        async move { c.health().await.is_ok() }
    })
    .await;
}

/// Polls `cond` until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Options {
    pub catalogs: u64,
    pub no_cache: bool,
    /// Frontends (added by `tweak`) that run with `--no-cache`.
    pub no_cache_nodes: &'static [&'static str],
    /// Environment of one node's process: (node, variable, value).
    pub env: Vec<(String, String, String)>,
    /// Environment of every node's process: (variable, value).
    pub env_all: Vec<(String, String)>,
    /// Changes to the cluster file before the nodes start.
    pub tweak: fn(&mut ClusterConfig),
    /// TLS between the nodes: certificates made by `pygmy::tls::generate`
    /// in the cluster's folder, and this process speaks TLS as the operator.
    pub tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            catalogs: 3,
            no_cache: false,
            no_cache_nodes: &[],
            env: Vec::new(),
            env_all: Vec::new(),
            tweak: |_| {},
            tls: false,
        }
    }
}

pub struct TestCluster {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub cfg: ClusterConfig,
    pub no_cache: bool,
    no_cache_nodes: &'static [&'static str],
    env: Vec<(String, String, String)>,
    env_all: Vec<(String, String)>,
    procs: HashMap<String, Child>,
    /// Carries the cluster token (harmless on public routes).
    pub http: Http,
}

impl TestCluster {
    pub async fn start(opts: Options) -> Self {
        // The test's own reqwest clients need a TLS provider (ring).
        pygmy::tls::default_provider();
        let dir = temp_dir("cluster");
        let mut cfg = ClusterConfig::local(&unique_host(), opts.catalogs);
        cfg.timing.health_interval_ms = 100;
        (opts.tweak)(&mut cfg);
        let mut tls = None;
        if opts.tls {
            let certs = dir.join("certs");
            pygmy::tls::generate(&cfg, &certs).unwrap();
            cfg.tls = Some(pygmy::config::TlsConfig { dir: certs.clone() });
            // This cluster's clients speak its TLS as the operator; the
            // process may hold clusters of other CAs too.
            tls = Some(
                pygmy::tls::load(&certs, pygmy::tls::OPERATOR)
                    .unwrap()
                    .client,
            );
        }
        let config_path = dir.join("cluster.toml");
        cfg.save(&config_path).unwrap();
        let cfg = ClusterConfig::load(&config_path).unwrap();
        let http = Http::with_tls(Some(cfg.token.clone()), Duration::from_secs(20), tls);
        let mut c = Self {
            dir,
            config_path,
            cfg,
            no_cache: opts.no_cache,
            no_cache_nodes: opts.no_cache_nodes,
            env: opts.env,
            env_all: opts.env_all,
            procs: HashMap::new(),
            http,
        };
        let names: Vec<String> = c.cfg.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &names {
            c.spawn(n);
        }
        for n in &names {
            c.wait_healthy(n).await;
        }
        // A settled cluster: the highest process id is the primary (at once,
        // or after taking over from a replica that started its election first).
        let highest = c
            .cfg
            .nodes_of(Role::Catalog)
            .max_by_key(|n| n.process_id)
            .unwrap()
            .name
            .clone();
        let h = c.catalog(&highest);
        wait_until(
            &format!("{highest} is the serving primary"),
            Duration::from_secs(30),
            || {
                let h = h.clone();
                async move {
                    h.status().await.is_ok_and(|s| s.role == "primary")
                        && h.lookup(BookId::new(1).unwrap(), None).await.is_ok()
                }
            },
        )
        .await;
        if !opts.no_cache {
            c.wait_cache_lease().await;
        }
        c
    }

    fn spawn(&mut self, name: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg(name);
        if (self.no_cache && name == "frontend") || self.no_cache_nodes.contains(&name) {
            cmd.arg("--no-cache");
        }
        for (k, v) in &self.env_all {
            cmd.env(k, v);
        }
        for (node, k, v) in &self.env {
            if node == name {
                cmd.env(k, v);
            }
        }
        if std::env::var_os("TEST_LOG").is_some() {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            cmd.stdout(log.try_clone().unwrap()).stderr(log);
        }
        let child = cmd.stdin(Stdio::null()).spawn().expect("pygmy starts");
        self.procs.insert(name.to_string(), child);
    }

    pub fn url(&self, name: &str) -> String {
        self.cfg.node(name).unwrap().base_url()
    }

    pub fn frontend(&self) -> FrontendClient {
        self.frontend_named("frontend")
    }

    pub fn frontend_named(&self, name: &str) -> FrontendClient {
        FrontendClient::new(self.url(name), self.http.clone())
    }

    pub fn catalog(&self, name: &str) -> CatalogClient {
        CatalogClient::new(self.url(name), self.http.clone())
    }

    /// Every catalog replica as one pool, written to as the order
    /// replicas write: sticky to the primary, following a replica that names
    /// another, the same request id again after a refusal (a primary whose
    /// stalled disk let its lease lapse steps down and is elected again),
    /// for up to 30 s. Exactly once whatever the retries.
    pub fn catalogs(&self) -> Arc<Pool<CatalogClient>> {
        let members = self
            .names(Role::Catalog)
            .into_iter()
            .map(|n| {
                let c = self.catalog(&n);
                (n, c)
            })
            .collect();
        Pool::new("catalog", members, Pick::Sticky, Duration::from_secs(30))
    }

    pub fn order(&self, name: &str) -> OrderClient {
        OrderClient::new(self.url(name), self.http.clone())
    }

    pub fn names(&self, role: Role) -> Vec<String> {
        self.cfg.nodes_of(role).map(|n| n.name.clone()).collect()
    }

    /// The catalog replicas other than `name`, in the cluster file's order.
    pub fn catalogs_but(&self, name: &str) -> Vec<String> {
        self.names(Role::Catalog)
            .into_iter()
            .filter(|n| n != name)
            .collect()
    }

    pub async fn wait_healthy(&self, name: &str) {
        wait_answering(self.url(name), &self.http, &format!("{name} is healthy")).await;
    }

    /// Waits until the frontend holds a cache lease from the catalog primary.
    pub async fn wait_cache_lease(&self) {
        let http = self.http.clone();
        let url = format!("{}/internal/cache", self.url("frontend"));
        wait_until(
            "the frontend holds a cache lease",
            Duration::from_secs(30),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    http.get::<serde_json::Value>(url)
                        .await
                        .is_ok_and(|s| s["lease_valid"] == serde_json::Value::Bool(true))
                }
            },
        )
        .await;
    }

    pub async fn cache_stats(&self) -> serde_json::Value {
        self.http
            .get(format!("{}/internal/cache", self.url("frontend")))
            .await
            .unwrap()
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill9(&mut self, name: &str) {
        let mut child = self.procs.remove(name).expect("node is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM; returns whether it exited successfully.
    pub fn stop(&mut self, name: &str) -> bool {
        let mut child = self.procs.remove(name).expect("node is running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child.wait().unwrap().success()
    }

    pub async fn restart(&mut self, name: &str) {
        self.spawn(name);
        self.wait_healthy(name).await;
    }

    pub fn pid(&self, name: &str) -> u32 {
        self.procs[name].id()
    }

    /// Sends `sig` to `name`'s process (`SIGSTOP` pauses it, `SIGCONT`
    /// lets it go on).
    pub fn signal(&self, name: &str, sig: i32) {
        // SAFETY: a plain syscall on a child this harness started.
        assert_eq!(unsafe { libc::kill(self.pid(name) as i32, sig) }, 0);
    }

    /// Whether `name`'s process is running (as far as this harness knows).
    pub fn is_running(&self, name: &str) -> bool {
        self.procs.contains_key(name)
    }

    /// The catalog replica that is primary and serves, waiting for one.
    pub async fn primary(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            for name in self.names(Role::Catalog) {
                if !self.is_running(&name) {
                    continue;
                }
                let c = self.catalog(&name);
                if let Ok(s) = c.status().await
                    && s.role == "primary"
                    && c.lookup(BookId::new(1).unwrap(), None).await.is_ok()
                {
                    return name;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no catalog primary within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls `f` until it succeeds (30 s at most).
    pub async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, pygmy::client::ClientError>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{what}: still failing after 30 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// A metric's value on a node's `/metrics` page (the first series of
    /// that name).
    pub async fn metric(&self, node: &str, name: &str) -> f64 {
        let page = reqwest::get(format!("{}/metrics", self.url(node)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        page.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("{node} has no {name}"))
    }

    /// A book as the catalog primary holds it.
    pub async fn book(&self, id: u64) -> LookupResponse {
        let p = self.primary().await;
        let c = self.catalog(&p);
        self.retry("read from the primary", || {
            c.lookup(BookId::new(id).unwrap(), None)
        })
        .await
    }

    /// Every book as the catalog primary holds it.
    pub async fn books(&self) -> Vec<LookupResponse> {
        let mut out = Vec::new();
        for id in 1..=7 {
            out.push(self.book(id).await);
        }
        out
    }

    pub async fn stock(&self, id: u64) -> u64 {
        self.book(id).await.stock
    }

    pub async fn set_stock(&self, id: u64, stock: u64) {
        let p = self.primary().await;
        let c = self.catalog(&p);
        let u = UpdateRequest {
            id: BookId::new(id).unwrap(),
            stock: Some(stock),
            cost: None,
            request_id: None,
        };
        self.retry("update at the primary", || c.update(&u)).await;
    }

    /// Total orders in every order replica's log.
    pub async fn order_log_len(&self) -> usize {
        let mut n = 0;
        for name in self.names(Role::Order) {
            if !self.procs.contains_key(&name) {
                continue;
            }
            let mut before = None;
            loop {
                let page = self.order(&name).log(1000, before).await.unwrap();
                n += page.orders.len();
                match page.next_before {
                    Some(b) => before = Some(b),
                    None => break,
                }
            }
        }
        n
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("test cluster logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Applies `write` through `catalogs` (see [`TestCluster::catalogs`]).
pub async fn write_at_primary(catalogs: &Pool<CatalogClient>, write: &CatalogWrite) -> WriteResult {
    catalogs
        .call(|c| async move { c.write(write).await })
        .await
        .unwrap_or_else(|e| panic!("write {}: still failing after 30 s: {e}", write.request_id))
}
