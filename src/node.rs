//! Starting a node, one way for every service. [`Node::resolve`] looks the
//! node up in the cluster file once, with the token-carrying HTTP client
//! its calls to other nodes use; each service's `run` builds its state and
//! router from it and hands them to [`Node::serve`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::NodeError;
use crate::balance::{Pick, Pool};
use crate::client::{Http, NodeClient};
use crate::config::{ClusterConfig, NodeConfig, Role};
use crate::http as h;

/// One node of the cluster, resolved from the cluster file.
pub struct Node {
    pub name: String,
    pub cfg: ClusterConfig,
    /// This node's entry in the cluster file.
    pub entry: NodeConfig,
    /// Calls to other nodes: the cluster's token, one call's timeout.
    pub http: Http,
}

impl Node {
    /// Node `name` of `cfg`; an error names a node the file does not have.
    pub fn resolve(cfg: ClusterConfig, name: &str) -> Result<Self, NodeError> {
        let entry = cfg
            .node(name)
            .ok_or_else(|| NodeError::Config(format!("the config has no node named {name:?}")))?
            .clone();
        let http = Http::new(
            Some(cfg.token.clone()),
            Duration::from_millis(cfg.timing.call_timeout_ms),
        );
        Ok(Self {
            name: name.to_string(),
            cfg,
            entry,
            http,
        })
    }

    /// This node's data directory (catalog and order replicas have one).
    pub fn data_dir(&self) -> Result<PathBuf, NodeError> {
        self.cfg
            .data_dir(&self.entry)
            .ok_or_else(|| NodeError::Config(format!("{} has no data_dir", self.name)))
    }

    /// Typed clients of the nodes of `role` (this one left out), by name,
    /// calling through `http`.
    pub fn clients<C: NodeClient>(&self, role: Role, http: &Http) -> Vec<(String, C)> {
        self.cfg
            .nodes_of(role)
            .filter(|n| n.name != self.name)
            .map(|n| (n.name.clone(), C::connect(n.base_url(), http.clone())))
            .collect()
    }

    /// A pool over the nodes of `role`: `pick` chooses the member, and a
    /// call retries on others for up to `budget`.
    pub fn pool<C: NodeClient>(
        &self,
        role: Role,
        http: &Http,
        pick: Pick,
        budget: Duration,
    ) -> Arc<Pool<C>> {
        Pool::new(role.as_str(), self.clients(role, http), pick, budget)
    }

    /// Serves `app` (its internal routes already behind the token) on
    /// `listener` with the cluster's limits, and larger body limits for
    /// the routes named, until `shutdown` resolves and in-flight requests
    /// are answered.
    pub async fn serve(
        &self,
        listener: TcpListener,
        app: Router,
        body_limits: &[(&'static str, usize)],
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let app = h::finish(app, &self.cfg.limits, body_limits);
        h::serve(
            listener,
            app,
            self.cfg.limits.clone(),
            self.cfg.token.clone(),
            shutdown,
        )
        .await?;
        Ok(())
    }
}
