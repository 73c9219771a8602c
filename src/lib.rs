//! pygmy — Pygmy.com, "the world's smallest bookstore": a three-tier online
//! store whose tiers are separate services, replicated, cached and fault
//! tolerant.
//!
//! ```text
//! client ──HTTP──> frontend ──> order replicas ──> catalog primary ──> SQLite
//!                   │ cache     (order log)        │ one write path: log,
//!                   │                              │ invalidate, answer
//!                   └────────── reads ───────────> catalog replicas
//! ```
//!
//! Module map:
//!
//! * [`config`]    — the cluster file: nodes, roles, addresses, token, timing.
//! * [`api`]       — wire types, parsed once at the edge (ids, topics, money).
//! * [`client`]    — typed clients of the three services (pooled, timeouts).
//! * `http`        — shared server plumbing: errors, token check, limits.
//! * [`balance`]   — round-robin over healthy replicas, retry on another.
//! * `batch`       — requests gathered into one internal call per batch (the frontend's uncached lookups).
//! * `storage`     — SQLite opened crash-safe, data-dir identity, group
//!   commit, row checksums, damaged data set aside.
//! * [`replication`] — the catalog's replication core: a sans-IO state
//!   machine (log, elections, primary, backup), its driver contract, and
//!   the loop every driver shares ([`replication::drive`]).
//! * [`catalog`]   — books and stock; the write path; cache invalidation;
//!   the driver that runs the replication core over SQLite and HTTP.
//! * `order`       — purchases and the durable order log.
//! * [`frontend`]  — the public API and its cache.
//! * [`history`]   — checks what clients saw (linearizable reads, nothing lost).
//! * `readiness` — `/readyz`: ready to serve, not just up.
//! * `node`        — one way to start a node: resolve it, build, serve.
//! * [`cluster`]   — `pygmy up`: the whole store as separate processes.
//! * [`bench`](mod@bench)     — `pygmy bench`: latency, invalidation and failover, measured.
//! * [`metrics`]   — Prometheus metrics with bounded labels.
//! * [`telemetry`] — logs and request ids.
//! * [`tls`]       — the cluster's CA and node certificates; TLS between nodes.

pub mod api;
#[doc(hidden)]
pub mod balance;
pub(crate) mod batch;
pub mod bench;
pub mod catalog;
pub mod client;
pub mod cluster;
pub mod config;
pub mod frontend;
#[doc(hidden)]
pub mod history;
pub(crate) mod http;
#[doc(hidden)]
pub mod metrics;
pub(crate) mod node;
pub(crate) mod order;
pub(crate) mod readiness;
pub mod replication;
pub(crate) mod storage;
pub mod telemetry;
pub mod tls;

pub use http::shutdown_signal;
pub use storage::seal;

use std::net::SocketAddr;

use config::{ClusterConfig, Role};

/// Tunes glibc's allocator for long-running nodes; call before any thread
/// starts. By default glibc raises its mmap threshold after a large buffer
/// is freed, so later large buffers (a snapshot, a big response) come from
/// the heap and stay resident after they are freed; and it makes up to
/// eight arenas per core. `pygmy bench` measured both: a fixed 128 KiB
/// threshold and two arenas took the seven-process store from 126 MB to
/// 95 MB (PSS) after its latency run. Elsewhere (musl, other systems)
/// nothing to do.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called at start-up,
    // before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory the allocator holds free back to the system, every
/// `every`: after a burst of load (a few hundred connections' buffers, a
/// snapshot) glibc keeps the freed pages resident until told. Measured by
/// `pygmy bench`: after its buys at 128 connections, the frontend went from
/// 18 MB to 5 MB of heap. A no-op where the allocator is not glibc's.
pub fn trim_memory_every(every: std::time::Duration) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = every;
}

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Binds node `name`'s listening address: `listen` if given, else the node's
/// `listen`, else its `addr`.
pub async fn bind(
    cfg: &ClusterConfig,
    name: &str,
    listen: Option<SocketAddr>,
) -> Result<tokio::net::TcpListener, NodeError> {
    let node = cfg
        .node(name)
        .ok_or_else(|| NodeError::Config(format!("the config has no node named {name:?}")))?;
    let addr = match (listen, &node.listen) {
        (Some(a), _) => a.to_string(),
        (None, Some(l)) => l.clone(),
        (None, None) => node.addr.clone(),
    };
    tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| NodeError::Config(format!("{name}: cannot listen on {addr}: {e}")))
}

/// Runs node `name` of `cfg` on `listener` until `shutdown` resolves: the
/// node is resolved once (`node::Node`), then its service runs.
pub async fn run_node(
    listener: tokio::net::TcpListener,
    cfg: ClusterConfig,
    name: &str,
    opts: frontend::Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    if cfg.node(name).is_none() {
        return Err(NodeError::Config(format!(
            "the config has no node named {name:?}"
        )));
    }
    // TLS before the node: its HTTP client takes the material when built.
    if let Some(dir) = tls::dir_of(&cfg) {
        let material = tls::load(&dir, name).map_err(|e| NodeError::Config(e.to_string()))?;
        tls::install(material);
        tracing::info!(dir = %dir.display(), "TLS between nodes: on");
    }
    let node = node::Node::resolve(cfg, name)?;
    http::metrics_handle();
    trim_memory_every(std::time::Duration::from_secs(10));
    match node.entry.role {
        Role::Frontend => frontend::run(listener, node, opts, shutdown).await,
        Role::Order => order::run(listener, node, shutdown).await,
        Role::Catalog => catalog::run(listener, node, shutdown).await,
    }
}
