//! Cluster settings: one TOML file describes every node; environment
//! variables (`PYGMY_…`) and flags override it; `validate` rejects bad
//! combinations at start-up.
//!
//! ```toml
//! cluster_id = "6f9…"
//! token = "…"                  # shared secret of the internal routes
//!
//! [[node]]
//! name = "catalog-1"
//! role = "catalog"
//! process_id = 1
//! addr = "127.0.0.1:5001"      # where the others reach it (host:port)
//! data_dir = "catalog-1"       # relative to this file's folder
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The kind of service a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Frontend,
    Order,
    Catalog,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Order => "order",
            Role::Catalog => "catalog",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique name: `frontend`, `order-2`, `catalog-3`, …
    pub name: String,
    pub role: Role,
    /// Unique among nodes of the same role; the highest catalog id is preferred as primary.
    pub process_id: u64,
    /// `host:port` the other nodes use to reach this one.
    pub addr: String,
    /// Socket address to listen on; defaults to `addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Data folder (order and catalog); relative paths are taken from the config file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// The cluster speaks TLS between nodes (from the cluster's `[tls]`).
    #[serde(skip)]
    pub tls: bool,
}

impl NodeConfig {
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

/// TLS between the nodes (see [`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Folder with `ca.pem` and each node's `NAME.pem` and `NAME.key`, as
    /// `pygmy certs` writes them; relative to the config file's folder.
    pub dir: PathBuf,
}

/// Timing of the frontend and of the catalog's cache leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Timeout of one internal call.
    pub call_timeout_ms: u64,
    /// How long a frontend or order replica keeps retrying one client request
    /// on other replicas; must outlast a failover.
    pub retry_budget_ms: u64,
    /// Background health probe period.
    pub health_interval_ms: u64,
    /// A frontend's cache lease: it serves cached reads only this long after
    /// the catalog primary last renewed it.
    pub cache_lease_ms: u64,
    /// Replication heartbeat period.
    pub heartbeat_ms: u64,
    /// Replication read lease.
    pub lease_ms: u64,
    /// Election timeout (without a heartbeat).
    pub election_timeout_ms: u64,
    /// A recovered higher-id catalog replica takes primaryship back after
    /// staying healthy in the view this long.
    pub takeover_after_ms: u64,
    /// How long the catalog keeps the answer of a request id the cluster
    /// minted (a buy without `Idempotency-Key`, an update without a
    /// `request_id`), counted from the minting. Only the cluster's own
    /// retries use such an id, so it need outlast just their budgets: at
    /// least `2 × (retry_budget_ms + call_timeout_ms)` (a frontend's and
    /// then an order replica's).
    pub minted_id_ttl_ms: u64,
    /// How long the catalog keeps the answer of a client's key
    /// (`Idempotency-Key`, a `request_id` in an update), counted from when
    /// it was first applied. A key reused after that is a new request.
    pub idempotency_key_ttl_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            call_timeout_ms: 2_000,
            retry_budget_ms: 8_000,
            health_interval_ms: 300,
            cache_lease_ms: 1_000,
            heartbeat_ms: 15,
            lease_ms: 200,
            election_timeout_ms: 200,
            takeover_after_ms: 2_000,
            minted_id_ttl_ms: 30_000,
            idempotency_key_ttl_ms: 24 * 3_600_000,
        }
    }
}

/// Limits of every service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    /// Time a client gets to send a request's head (line and headers).
    pub head_timeout_ms: u64,
    pub max_in_flight: usize,
    /// Frontend cache capacity, in entries.
    pub cache_entries: usize,
    /// Open connections a node keeps at most; more are closed at once.
    pub max_connections: usize,
    /// Of `max_connections`, the last ones serve only requests carrying the
    /// cluster token: the nodes keep talking while the public port is flooded.
    pub reserved_connections: usize,
    /// A keep-alive connection idle this long is closed.
    pub idle_timeout_ms: u64,
    /// Requests served on one connection; the last answer closes it.
    pub max_requests_per_connection: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 15_000,
            head_timeout_ms: 10_000,
            max_in_flight: 4_096,
            cache_entries: 100_000,
            max_connections: 8_192,
            reserved_connections: 512,
            idle_timeout_ms: 30_000,
            max_requests_per_connection: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Identity of this cluster; stored in every data directory.
    pub cluster_id: String,
    /// Shared secret of the internal and admin routes (`Authorization: Bearer …`).
    pub token: String,
    /// Catalog file (JSON list of books) to seed from instead of the built-in seven books.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_file: Option<PathBuf>,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub limits: Limits,
    /// TLS between nodes; plain HTTP without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
    /// Folder the relative paths are resolved from (the config file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid cluster config: {0}")]
    Invalid(String),
    #[error("cannot write config {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ClusterConfig {
    /// The default cluster on one host: 1 frontend, 3 order and `catalogs` catalog replicas
    /// on the original's ports, data under `data_dir`.
    pub fn local(host: &str, catalogs: u64) -> Self {
        let mut nodes = vec![NodeConfig {
            name: "frontend".into(),
            role: Role::Frontend,
            process_id: 1,
            addr: format!("{host}:5004"),
            listen: None,
            data_dir: None,
            tls: false,
        }];
        for i in 1..=3u64 {
            nodes.push(NodeConfig {
                name: format!("order-{i}"),
                role: Role::Order,
                process_id: i,
                addr: format!("{host}:{}", 5004 + i),
                listen: None,
                data_dir: Some(PathBuf::from(format!("order-{i}"))),
                tls: false,
            });
        }
        for i in 1..=catalogs {
            nodes.push(NodeConfig {
                name: format!("catalog-{i}"),
                role: Role::Catalog,
                process_id: i,
                addr: format!("{host}:{}", 5000 + i),
                listen: None,
                data_dir: Some(PathBuf::from(format!("catalog-{i}"))),
                tls: false,
            });
        }
        Self {
            cluster_id: uuid::Uuid::new_v4().simple().to_string(),
            token: new_token(),
            catalog_file: None,
            timing: Timing::default(),
            limits: Limits::default(),
            tls: None,
            nodes,
            base_dir: PathBuf::from("."),
        }
    }

    /// Reads, applies `PYGMY_` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })?;
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        cfg.mark_tls();
        Ok(cfg)
    }

    /// Every node's URL speaks TLS when the cluster does.
    pub fn mark_tls(&mut self) {
        let tls = self.tls.is_some();
        for n in &mut self.nodes {
            n.tls = tls;
        }
    }

    /// `path` resolved from the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// Parses TOML text (no environment, no validation).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })
    }

    /// Writes the file, readable by its owner only (it holds the token).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        use std::io::Write;
        let text = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Invalid(format!("cannot serialise config: {e}")))?;
        let err = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::OpenOptions::new();
        f.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
        let mut f = f.open(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        Ok(())
    }

    /// `PYGMY_TOKEN`, `PYGMY_CATALOG_FILE`, and for each node
    /// `PYGMY_<NAME>_ADDR` / `PYGMY_<NAME>_LISTEN` (`<NAME>` upper-cased,
    /// `-` as `_`: `PYGMY_CATALOG_2_ADDR`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(t) = get("PYGMY_TOKEN") {
            self.token = t;
        }
        if let Some(f) = get("PYGMY_CATALOG_FILE") {
            self.catalog_file = Some(PathBuf::from(f));
        }
        if let Some(d) = get("PYGMY_TLS_DIR") {
            self.tls = Some(TlsConfig {
                dir: PathBuf::from(d),
            });
        }
        for node in &mut self.nodes {
            let key = node.name.to_ascii_uppercase().replace('-', "_");
            if let Some(a) = get(&format!("PYGMY_{key}_ADDR")) {
                node.addr = a;
            }
            if let Some(l) = get(&format!("PYGMY_{key}_LISTEN")) {
                node.listen = Some(l);
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.token.len() < 16 {
            return bad("token must be at least 16 characters".into());
        }
        if !self.token.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("token must be printable ASCII without spaces".into());
        }
        if self.cluster_id.is_empty() {
            return bad("cluster_id must not be empty".into());
        }
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for n in &self.nodes {
            if n.name.is_empty()
                || !n
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad(format!(
                    "node name {:?} must be letters, digits, '-' or '_'",
                    n.name
                ));
            }
            if !names.insert(n.name.clone()) {
                return bad(format!("node name {} appears twice", n.name));
            }
            if !ids.insert((n.role, n.process_id)) {
                return bad(format!(
                    "two {} nodes have process_id {}",
                    n.role, n.process_id
                ));
            }
            if n.process_id == 0 {
                return bad(format!("{}: process_id must be positive", n.name));
            }
            if n.addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return bad(format!("{}: addr {:?} must be host:port", n.name, n.addr));
            }
            if let Some(l) = &n.listen
                && l.parse::<SocketAddr>().is_err()
            {
                return bad(format!("{}: listen {:?} must be ip:port", n.name, l));
            }
            if matches!(n.role, Role::Order | Role::Catalog) && n.data_dir.is_none() {
                return bad(format!("{}: a {} node needs a data_dir", n.name, n.role));
            }
        }
        for role in [Role::Frontend, Role::Order, Role::Catalog] {
            if !self.nodes.iter().any(|n| n.role == role) {
                return bad(format!("the cluster needs at least one {role} node"));
            }
        }
        let t = &self.timing;
        if t.call_timeout_ms == 0 || t.health_interval_ms == 0 || t.cache_lease_ms < 10 {
            return bad("timing values must be positive (cache_lease_ms at least 10)".into());
        }
        if t.retry_budget_ms < t.call_timeout_ms {
            return bad("retry_budget_ms must be at least call_timeout_ms".into());
        }
        if t.minted_id_ttl_ms < 2 * (t.retry_budget_ms + t.call_timeout_ms) {
            return bad(
                "minted_id_ttl_ms must be at least 2 × (retry_budget_ms + call_timeout_ms)".into(),
            );
        }
        if t.idempotency_key_ttl_ms < t.minted_id_ttl_ms {
            return bad("idempotency_key_ttl_ms must be at least minted_id_ttl_ms".into());
        }
        if t.heartbeat_ms == 0 || t.lease_ms <= t.heartbeat_ms || t.election_timeout_ms < t.lease_ms
        {
            return bad("need heartbeat_ms < lease_ms <= election_timeout_ms".into());
        }
        let l = &self.limits;
        if l.max_body_bytes == 0
            || l.request_timeout_ms == 0
            || l.head_timeout_ms == 0
            || l.max_in_flight == 0
            || l.max_connections == 0
            || l.idle_timeout_ms == 0
            || l.max_requests_per_connection == 0
        {
            return bad("limits must be positive".into());
        }
        if l.reserved_connections >= l.max_connections {
            return bad("reserved_connections must be below max_connections".into());
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn nodes_of(&self, role: Role) -> impl Iterator<Item = &NodeConfig> {
        self.nodes.iter().filter(move |n| n.role == role)
    }

    /// A node's data folder, resolved against the config file's folder.
    pub fn data_dir(&self, node: &NodeConfig) -> Option<PathBuf> {
        node.data_dir.as_ref().map(|d| self.base_dir.join(d))
    }

    pub fn catalog_file(&self) -> Option<PathBuf> {
        self.catalog_file.as_ref().map(|f| self.base_dir.join(f))
    }
}

/// 256 random bits, hex.
pub fn new_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_cluster_round_trips_through_toml() {
        let cfg = ClusterConfig::local("127.0.0.1", 3);
        cfg.validate().unwrap();
        let text = toml::to_string_pretty(&cfg).unwrap();
        assert!(text.starts_with("cluster_id"), "{text}");
        assert!(
            text.contains("\ntoken = "),
            "token must be a top-level key: {text}"
        );
        let back = ClusterConfig::parse(&text).unwrap();
        assert_eq!(back.nodes, cfg.nodes);
        assert_eq!(back.token, cfg.token);
    }

    #[test]
    fn env_overrides_addresses_and_token() {
        let mut cfg = ClusterConfig::local("127.0.0.1", 1);
        cfg.apply_env(|k| match k {
            "PYGMY_CATALOG_1_ADDR" => Some("catalog-1.svc:5001".into()),
            "PYGMY_CATALOG_1_LISTEN" => Some("0.0.0.0:5001".into()),
            "PYGMY_TOKEN" => Some("x".repeat(32)),
            _ => None,
        });
        let c = cfg.node("catalog-1").unwrap();
        assert_eq!(c.addr, "catalog-1.svc:5001");
        assert_eq!(c.listen.as_deref(), Some("0.0.0.0:5001"));
        assert_eq!(cfg.token, "x".repeat(32));
        cfg.validate().unwrap();
    }

    #[test]
    fn validate_rejects_bad_clusters() {
        let mut cfg = ClusterConfig::local("127.0.0.1", 1);
        cfg.nodes.push(cfg.nodes[1].clone());
        assert!(cfg.validate().is_err(), "duplicate names");
        let mut cfg = ClusterConfig::local("127.0.0.1", 1);
        cfg.token = "short".into();
        assert!(cfg.validate().is_err());
        let mut cfg = ClusterConfig::local("127.0.0.1", 1);
        cfg.nodes.retain(|n| n.role != Role::Catalog);
        assert!(cfg.validate().is_err());
        let mut cfg = ClusterConfig::local("127.0.0.1", 1);
        cfg.nodes[0].addr = "nowhere".into();
        assert!(cfg.validate().is_err());
        assert!(ClusterConfig::parse("cluster_id = 3").is_err());
    }
}
