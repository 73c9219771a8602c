//! The operator commands of the `pygmy` binary: `status`, `orders`,
//! `update`, `lookup`, `search`, `buy`. Each finds the cluster file the same
//! way (`--config`, else `$PYGMY_CONFIG`, else `./pygmy-data/cluster.toml`)
//! and turns failures into a sentence saying what to do, with an exit code
//! from the documented set (see `EXIT_CODES` in main.rs).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use pygmy::api::{BookId, Money, NodeStatus, RequestId, UpdateRequest};
use pygmy::client::{CatalogClient, ClientError, FrontendClient, Http, OrderClient};
use pygmy::config::{ClusterConfig, NodeConfig, Role};

use crate::Output;

pub const DEFAULT_DATA_DIR: &str = "pygmy-data";
const DEFAULT_FRONTEND: &str = "http://127.0.0.1:5004";

/// Exit codes (documented in main.rs's `EXIT_CODES` and the README).
pub const EXIT_ANSWERED_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNHEALTHY: u8 = 3;
pub const EXIT_UNREACHABLE: u8 = 4;

/// A failed command: what to tell the operator, and the exit code.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub msg: String,
}

impl Fail {
    fn new(code: u8, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }

    /// A client error, said for an operator: `what` names the callee.
    fn client(what: &str, e: ClientError) -> Self {
        match e {
            ClientError::Unreachable { url, detail } => Self::new(
                EXIT_UNREACHABLE,
                format!(
                    "nothing answers at {} ({what}: {}) — is `pygmy up` running? (or point --config / --frontend at the store)",
                    url_origin(&url),
                    last_cause(&detail)
                ),
            ),
            ClientError::Status {
                status: status @ (401 | 403),
                ..
            } => Self::new(
                EXIT_ANSWERED_ERROR,
                format!(
                    "{what} refused the cluster token ({status}) — is --config the cluster file of this store?"
                ),
            ),
            ClientError::Status {
                status, message, ..
            } => Self::new(
                EXIT_ANSWERED_ERROR,
                format!("{message} ({what} answered {status})"),
            ),
            ClientError::Decode { url, detail } => Self::new(
                EXIT_ANSWERED_ERROR,
                format!(
                    "{what} gave an answer this pygmy cannot read ({url}: {detail}) — is it the same version?"
                ),
            ),
        }
    }
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Self {
        Self::new(1, format!("{e:#}"))
    }
}

/// The innermost cause of an error chain ("Connection refused (os error 111)").
fn last_cause(chain: &str) -> &str {
    chain.rsplit(": ").next().unwrap_or(chain)
}

/// `http://host:port` of a URL, without its path.
fn url_origin(url: &str) -> &str {
    let rest = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[rest..].find('/') {
        Some(i) => &url[..rest + i],
        None => url,
    }
}

/// `--config FILE` (or `$PYGMY_CONFIG`; else `./pygmy-data/cluster.toml`).
#[derive(Args, Clone, Debug)]
pub struct ConfigArg {
    /// The cluster file [default: $PYGMY_CONFIG, else ./pygmy-data/cluster.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// A cluster file named some other way than `--config`.
    pub fn file(path: PathBuf) -> Self {
        Self { config: Some(path) }
    }

    /// The path and whether it was chosen (flag or environment) or defaulted.
    fn path(&self) -> (PathBuf, bool) {
        if let Some(p) = &self.config {
            return (p.clone(), true);
        }
        match std::env::var_os("PYGMY_CONFIG") {
            Some(p) if !p.is_empty() => (PathBuf::from(p), true),
            _ => (PathBuf::from(DEFAULT_DATA_DIR).join("cluster.toml"), false),
        }
    }

    /// Loads the cluster file; a missing default says to run `pygmy up`.
    pub fn load(&self) -> Result<(PathBuf, ClusterConfig), Fail> {
        let (path, chosen) = self.path();
        if !chosen && !path.exists() {
            return Err(Fail::new(
                EXIT_USAGE,
                format!(
                    "no cluster file at ./{} — run `pygmy up` in this folder first, or pass --config FILE (or set PYGMY_CONFIG)",
                    path.display()
                ),
            ));
        }
        match ClusterConfig::load(&path) {
            Ok(cfg) => Ok((path, cfg)),
            Err(e) => Err(Fail::new(EXIT_USAGE, format!("{e}"))),
        }
    }

    /// The cluster file if there is one (an explicit one must load).
    fn load_optional(&self) -> Result<Option<ClusterConfig>, Fail> {
        let (path, chosen) = self.path();
        if !chosen && !path.exists() {
            return Ok(None);
        }
        let (_, cfg) = self.load()?;
        operator_tls(&cfg)?;
        Ok(Some(cfg))
    }

    /// [`ConfigArg::load`], and the operator's TLS certificate when the
    /// cluster speaks TLS.
    pub fn load_as_operator(&self) -> Result<(PathBuf, ClusterConfig), Fail> {
        let (path, cfg) = self.load()?;
        operator_tls(&cfg)?;
        Ok((path, cfg))
    }
}

/// The CLI speaks TLS to a TLS cluster with the operator's certificate.
fn operator_tls(cfg: &ClusterConfig) -> Result<(), Fail> {
    if let Some(dir) = pygmy::tls::dir_of(cfg) {
        let m = pygmy::tls::load(&dir, pygmy::tls::OPERATOR)
            .map_err(|e| Fail::from(anyhow::Error::from(e)))?;
        pygmy::tls::install(m);
    }
    Ok(())
}

/// Where the frontend is: `--frontend URL` (or `$PYGMY_FRONTEND`), else the
/// cluster file's frontend, else `http://127.0.0.1:5004`.
#[derive(Args, Clone, Debug)]
pub struct FrontendArg {
    /// The frontend's URL [default: the cluster file's frontend, else http://127.0.0.1:5004].
    #[arg(long, env = "PYGMY_FRONTEND", value_name = "URL")]
    frontend: Option<String>,
    #[command(flatten)]
    config: ConfigArg,
}

impl FrontendArg {
    fn url(&self) -> Result<String, Fail> {
        if let Some(f) = &self.frontend {
            let f = f.trim_end_matches('/');
            return Ok(if f.contains("://") {
                f.to_string()
            } else {
                format!("http://{f}")
            });
        }
        Ok(self
            .config
            .load_optional()?
            .and_then(|c| c.nodes_of(Role::Frontend).next().map(NodeConfig::base_url))
            .unwrap_or_else(|| DEFAULT_FRONTEND.to_string()))
    }

    fn client(&self, timeout: Duration) -> Result<FrontendClient, Fail> {
        Ok(FrontendClient::new(self.url()?, Http::new(None, timeout)))
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), Fail> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Fail::new(EXIT_ANSWERED_ERROR, format!("cannot print the answer: {e}")))?;
    println!("{text}");
    Ok(())
}

pub async fn lookup(fe: FrontendArg, id: &str) -> Result<(), Fail> {
    let c = fe.client(Duration::from_secs(15))?;
    match c.lookup(id).await {
        Ok(b) => print_json(&b),
        Err(e) => Err(Fail::client("the frontend", e)),
    }
}

pub async fn search(fe: FrontendArg, topic: &str) -> Result<(), Fail> {
    let c = fe.client(Duration::from_secs(15))?;
    match c.search(topic).await {
        Ok(r) => print_json(&r),
        Err(e) => Err(Fail::client("the frontend", e)),
    }
}

/// Attempts of one buy (all with the same key).
const BUY_ATTEMPTS: u32 = 4;

pub async fn buy(fe: FrontendArg, id: &str, key: Option<String>) -> Result<(), Fail> {
    let key = key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if let Err(e) = RequestId::from_idempotency_key(&key) {
        return Err(Fail::new(EXIT_USAGE, format!("--key: {e}")));
    }
    eprintln!(
        "pygmy: Idempotency-Key: {key} (if this run fails or times out, `pygmy buy {id} --key {key}` retries it without buying twice)"
    );
    // Longer than the frontend's own retries of an order replica.
    let c = fe.client(Duration::from_secs(30))?;
    let mut backoff = Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match c.buy(id, Some(&key)).await {
            Ok(r) => return print_json(&r),
            Err(e) if e.is_retryable() && attempt < BUY_ATTEMPTS => {
                let why = match &e {
                    ClientError::Unreachable { url, detail } => {
                        format!(
                            "nothing answers at {}: {}",
                            url_origin(url),
                            last_cause(detail)
                        )
                    }
                    other => other.to_string(),
                };
                eprintln!("pygmy: attempt {attempt} failed ({why}); retrying with the same key");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(e) => {
                let mut f = Fail::client("the frontend", e);
                f.msg.push_str(&format!(
                    "\n  to retry this purchase: pygmy buy {id} --key {key}"
                ));
                return Err(f);
            }
        }
    }
}

pub async fn update(
    config: ConfigArg,
    book: &str,
    stock: Option<u64>,
    cost: Option<f64>,
) -> Result<(), Fail> {
    let (_, cfg) = config.load_as_operator()?;
    let id = BookId::parse(book).map_err(|e| Fail::new(EXIT_USAGE, format!("BOOK: {e}")))?;
    let cost = cost
        .map(Money::try_from)
        .transpose()
        .map_err(|e| Fail::new(EXIT_USAGE, format!("--cost: {e}")))?;
    let request_id = RequestId::mint_as("u", pygmy::api::unix_ms());
    let req = UpdateRequest {
        id,
        stock,
        cost,
        request_id: Some(request_id),
    };
    let http = Http::new(
        Some(cfg.token.clone()),
        Duration::from_millis(cfg.timing.call_timeout_ms),
    );
    // Highest process id first (the usual primary); a backup names the
    // primary and the pool follows it. The request id makes retries safe.
    let pool = pygmy::client::catalog_admin_pool(&cfg, http);
    let req = &req;
    match pool.call(|c| async move { c.update(req).await }).await {
        Ok(r) => print_json(&r),
        Err(e) => Err(Fail::client("the catalog", e)),
    }
}

pub async fn orders(
    config: ConfigArg,
    node: Option<String>,
    limit: u32,
    before: Option<u64>,
    output: Output,
) -> Result<(), Fail> {
    let (_, cfg) = config.load_as_operator()?;
    let node = match &node {
        Some(n) => cfg
            .node(n)
            .filter(|n| n.role == Role::Order)
            .ok_or_else(|| {
                let names: Vec<&str> = cfg.nodes_of(Role::Order).map(|n| n.name.as_str()).collect();
                Fail::new(
                    EXIT_USAGE,
                    format!(
                        "{n} is not an order replica of this cluster; they are: {}",
                        names.join(", ")
                    ),
                )
            })?,
        None => cfg
            .nodes_of(Role::Order)
            .next()
            .ok_or_else(|| Fail::new(EXIT_USAGE, "the cluster file has no order replica"))?,
    };
    let http = Http::new(Some(cfg.token.clone()), Duration::from_secs(5));
    let page = OrderClient::new(node.base_url(), http)
        .log(limit, before)
        .await
        .map_err(|e| Fail::client(&node.name, e))?;
    if output == Output::Json {
        return print_json(&page);
    }
    println!(
        "{:>6} {:>8} {:>5} {:<34} {:>8} {:<13} {:<20} request",
        "seq", "order", "book", "title", "price", "outcome", "time"
    );
    for o in &page.orders {
        let title: String = o.title.chars().take(34).collect();
        println!(
            "{:>6} {:>8} {:>5} {:<34} {:>8.2} {:<13} {:<20} {}",
            o.seq,
            o.order_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            o.book_id.to_string(),
            title,
            f64::from(o.price),
            o.outcome,
            o.time.get(..19).unwrap_or(&o.time),
            o.request_id
        );
    }
    if page.orders.is_empty() {
        println!("(no orders on {})", node.name);
    }
    if let Some(b) = page.next_before {
        println!(
            "older: pygmy orders {} --limit {limit} --before {b}",
            node.name
        );
    }
    Ok(())
}

/// One node as `pygmy status` saw it.
#[derive(Serialize)]
struct NodeReport {
    name: String,
    kind: String,
    addr: String,
    reachable: bool,
    /// Its `/readyz` answered 200.
    ready: bool,
    /// Catalog replicas: their replication status.
    #[serde(skip_serializing_if = "Option::is_none")]
    catalog: Option<NodeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct StatusReport {
    healthy: bool,
    /// The primary the reachable catalog replicas name (the highest epoch's).
    primary: Option<String>,
    problems: Vec<String>,
    nodes: Vec<NodeReport>,
}

async fn probe(n: NodeConfig, http: Http) -> NodeReport {
    let any = FrontendClient::new(n.base_url(), http.clone());
    let (health, ready) = tokio::join!(any.health(), any.ready());
    let mut report = NodeReport {
        name: n.name.clone(),
        kind: n.role.to_string(),
        addr: n.addr.clone(),
        reachable: health.is_ok(),
        ready: ready.is_ok(),
        catalog: None,
        error: health.err().map(|e| e.to_string()),
    };
    if n.role == Role::Catalog && report.reachable {
        match CatalogClient::new(n.base_url(), http).status().await {
            Ok(s) => report.catalog = Some(s),
            Err(e) => report.error = Some(e.to_string()),
        }
    }
    report
}

pub async fn status(config: ConfigArg, output: Output) -> Result<(), Fail> {
    let (_, cfg) = config.load_as_operator()?;
    let http = Http::new(Some(cfg.token.clone()), Duration::from_secs(2));
    let tasks: Vec<_> = cfg
        .nodes
        .iter()
        .map(|n| tokio::spawn(probe(n.clone(), http.clone())))
        .collect();
    let mut nodes = Vec::with_capacity(tasks.len());
    for t in tasks {
        nodes.push(
            t.await
                .map_err(|e| Fail::new(EXIT_ANSWERED_ERROR, format!("probe failed: {e}")))?,
        );
    }
    let mut problems: Vec<String> = nodes
        .iter()
        .filter(|n| !n.reachable)
        .map(|n| format!("{} at {} is unreachable", n.name, n.addr))
        .collect();
    let primary = nodes
        .iter()
        .filter_map(|n| n.catalog.as_ref())
        .filter(|s| s.primary.is_some())
        .max_by_key(|s| s.epoch)
        .and_then(|s| s.primary.clone());
    if primary.is_none() {
        problems.push("no catalog replica knows a primary".into());
    }
    let report = StatusReport {
        healthy: problems.is_empty(),
        primary,
        problems,
        nodes,
    };
    match output {
        Output::Json => print_json(&report)?,
        Output::Table => print_table(&report),
    }
    if report.healthy {
        return Ok(());
    }
    let unreachable = report.nodes.iter().all(|n| !n.reachable);
    Err(Fail::new(
        EXIT_UNHEALTHY,
        if unreachable {
            "unhealthy: no node answers — is `pygmy up` running?".to_string()
        } else {
            format!("unhealthy: {}", report.problems.join("; "))
        },
    ))
}

fn print_table(r: &StatusReport) {
    println!(
        "{:<12} {:<9} {:<10} {:>6} {:<12} {:>12} {:>12} {:<8} {:<6} reachable",
        "node", "kind", "role", "epoch", "primary", "applied", "committed", "in view", "ready"
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    for n in &r.nodes {
        let (role, epoch, primary, applied, commit, in_view) = match (&n.catalog, n.reachable) {
            (Some(s), _) => (
                s.role.to_string(),
                s.epoch.to_string(),
                s.primary.clone().unwrap_or_else(|| "-".into()),
                s.applied.to_string(),
                s.commit.to_string(),
                yes(s.in_view),
            ),
            (None, true) if n.kind == "catalog" => (
                "?".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-",
            ),
            (None, true) => (
                "up".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-",
            ),
            (None, false) => (
                "down".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-",
            ),
        };
        println!(
            "{:<12} {:<9} {:<10} {:>6} {:<12} {:>12} {:>12} {:<8} {:<6} {}",
            n.name,
            n.kind,
            role,
            epoch,
            primary,
            applied,
            commit,
            in_view,
            yes(n.ready),
            yes(n.reachable)
        );
    }
}
