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
//! * [`http`]      — shared server plumbing: errors, token check, limits.
//! * [`balance`]   — round-robin over healthy replicas, retry on another.
//! * [`storage`]   — SQLite opened crash-safe, data-dir identity, group commit.
//! * [`catalog`]   — books and stock; the write path; cache invalidation.
//! * [`order`]     — purchases and the durable order log.
//! * [`frontend`]  — the public API and its cache.
//! * [`history`]   — checks what clients saw (linearizable reads, nothing lost).
//! * [`readiness`] — `/readyz`: ready to serve, not just up.
//! * [`cluster`]   — `pygmy up`: the whole store as separate processes.
//! * [`bench`]     — `pygmy bench`: latency, invalidation and failover, measured.
//! * [`metrics`]   — Prometheus metrics with bounded labels.
//! * [`telemetry`] — logs and request ids.

pub mod api;
pub mod balance;
pub mod bench;
pub mod catalog;
pub mod client;
pub mod cluster;
pub mod config;
pub mod frontend;
pub mod history;
pub mod http;
pub mod metrics;
pub mod order;
pub mod readiness;
pub mod replication;
pub mod storage;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;

use config::{ClusterConfig, Role};

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

/// Runs node `name` of `cfg` on `listener` until `shutdown` resolves.
pub async fn run_node(
    listener: tokio::net::TcpListener,
    cfg: ClusterConfig,
    name: &str,
    opts: frontend::Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let role = cfg
        .node(name)
        .ok_or_else(|| NodeError::Config(format!("the config has no node named {name:?}")))?
        .role;
    http::metrics_handle();
    if let Some(dir) = tls::dir_of(&cfg) {
        let material = tls::load(&dir, name).map_err(|e| NodeError::Config(e.to_string()))?;
        tls::install(material);
        tracing::info!(dir = %dir.display(), "TLS between nodes: on");
    }
    match role {
        Role::Frontend => frontend::run(listener, cfg, name, opts, shutdown).await,
        Role::Order => order::run(listener, cfg, name, shutdown).await,
        Role::Catalog => catalog::run(listener, cfg, name, shutdown).await,
    }
}
