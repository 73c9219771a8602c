//! The catalog service: the books, their stock and price.
//!
//! Reads (`/lookup`, `/search`, per replica, token required) are served from
//! the replica's applied state, gated by [`CatalogStore::wait_for`] so a
//! reader can ask for at least the version of a write it saw. Writes (`buy`
//! from the order service, the admin's `PUT /catalog/update`) take one
//! path: the primary's log ([`store`]), then cache invalidation at every
//! frontend ([`invalidation`]), then the answer.

pub mod invalidation;
pub mod seed;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::api::*;
use crate::client::{FrontendClient, Http};
use crate::config::{ClusterConfig, Role};
use crate::http::{self as h, ApiError, JsonBody, QueryArgs, Segment};
use crate::NodeError;

use invalidation::{Invalidator, LeaseError};
use store::{CatalogError, CatalogStore};

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        let status = match &e {
            CatalogError::UnknownBook(_) => StatusCode::NOT_FOUND,
            CatalogError::NotYet { .. } | CatalogError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> Self {
        let status = match &e {
            LeaseError::UnknownFrontend(_) => StatusCode::BAD_REQUEST,
            LeaseError::Withheld(_) => StatusCode::CONFLICT,
        };
        ApiError::new(status, e.to_string())
    }
}

struct Catalog {
    name: String,
    process_id: u64,
    store: CatalogStore,
    invalidator: Invalidator,
}

type Shared = Arc<Catalog>;

/// Runs catalog node `name` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    cfg: ClusterConfig,
    name: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let node = cfg.node(name).ok_or_else(|| NodeError::Config(format!("no node {name}")))?.clone();
    let dir = cfg.data_dir(&node).ok_or_else(|| NodeError::Config(format!("{name} has no data_dir")))?;
    let catalog_file = cfg.catalog_file();
    let store = CatalogStore::open(&dir, &cfg.cluster_id, name, || match &catalog_file {
        Some(f) => seed::load_books(f),
        None => Ok(seed::default_books()),
    })?;
    tracing::info!(
        data_dir = %dir.display(),
        incarnation = store.identity.incarnation,
        version = %store.version(),
        "catalog store open{}",
        if store.identity.fresh { " (new data directory, seeded)" } else { "" }
    );
    let http = Http::new(Some(cfg.token.clone()), Duration::from_millis(cfg.timing.call_timeout_ms));
    let frontends = cfg
        .nodes_of(Role::Frontend)
        .map(|n| (n.name.clone(), FrontendClient::new(n.base_url(), http.clone())))
        .collect();
    let invalidator = Invalidator::new(frontends, Duration::from_millis(cfg.timing.cache_lease_ms), store.epoch);
    let state: Shared = Arc::new(Catalog { name: name.to_string(), process_id: node.process_id, store, invalidator });
    let app = h::finish(router(state, &cfg.token), &cfg.limits);
    tracing::info!(addr = %listener.local_addr()?, "catalog {name} serving (primary)");
    h::serve(listener, app, &cfg.limits, shutdown).await?;
    tracing::info!("catalog {name} stopped");
    Ok(())
}

fn router(state: Shared, token: &str) -> Router {
    let internal = Router::new()
        .route("/lookup/{id}", get(lookup))
        .route("/search/{topic}", get(search))
        .route("/internal/write", post(write))
        .route("/catalog/update", put(update))
        .route("/internal/cache-lease", post(cache_lease))
        .route("/internal/status", get(status));
    h::internal(internal, token).with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupArgs {
    min_version: Option<String>,
}

async fn lookup(
    State(c): State<Shared>,
    Segment(id): Segment,
    QueryArgs(args): QueryArgs<LookupArgs>,
) -> Result<Json<LookupResponse>, ApiError> {
    let id = BookId::parse(&id)?;
    if let Some(v) = args.min_version {
        let min: Version = v.parse()?;
        c.store.wait_for(min, Duration::from_millis(500)).await?;
    }
    Ok(Json(c.store.lookup(id)?))
}

async fn search(State(c): State<Shared>, Segment(topic): Segment) -> Result<Json<SearchResponse>, ApiError> {
    let topic = TopicSlug::parse(&topic)?;
    Ok(Json(c.store.search(&topic)))
}

/// The one write path: log (durable), then invalidate caches, then answer.
/// A retried request id gets its first answer, and its invalidation again.
async fn apply(c: &Catalog, write: CatalogWrite) -> Result<WriteResult, ApiError> {
    let id = write.op.book_id();
    if !c.store.contains(id) {
        return Err(CatalogError::UnknownBook(id).into());
    }
    let request_id = write.request_id.clone();
    let result = c.store.write(write).await?;
    if !matches!(result.outcome, Outcome::OutOfStock { .. }) {
        let book_id = match &result.outcome {
            Outcome::Bought { book_id, .. } | Outcome::OutOfStock { book_id, .. } => *book_id,
            Outcome::Updated { book } => book.id,
        };
        c.invalidator.invalidate(Invalidation { book_id, version: result.version }).await;
    }
    tracing::debug!(%request_id, version = %result.version, "write applied");
    Ok(result)
}

async fn write(State(c): State<Shared>, JsonBody(w): JsonBody<CatalogWrite>) -> Result<Json<WriteResult>, ApiError> {
    Ok(Json(apply(&c, w).await?))
}

async fn update(State(c): State<Shared>, JsonBody(u): JsonBody<UpdateRequest>) -> Result<Json<WriteResult>, ApiError> {
    if u.stock.is_none() && u.cost.is_none() {
        return Err(ApiError::bad_request("nothing to update: give stock and/or cost"));
    }
    if u.stock.is_some_and(|s| s > MAX_STOCK) {
        return Err(ApiError::bad_request(format!("stock must be at most {MAX_STOCK}")));
    }
    let request_id = match u.request_id {
        Some(r) => r,
        None => RequestId::parse(&format!("u:{}", uuid::Uuid::new_v4().simple()))?,
    };
    let w = CatalogWrite { request_id, op: CatalogOp::Update { book_id: u.id, stock: u.stock, cost: u.cost } };
    Ok(Json(apply(&c, w).await?))
}

async fn cache_lease(State(c): State<Shared>, JsonBody(r): JsonBody<LeaseRequest>) -> Result<Json<LeaseGrant>, ApiError> {
    Ok(Json(c.invalidator.grant(&r.frontend, c.store.version())?))
}

async fn status(State(c): State<Shared>) -> Json<NodeStatus> {
    Json(NodeStatus {
        name: c.name.clone(),
        role: "primary".into(),
        process_id: c.process_id,
        epoch: c.store.epoch,
        primary: Some(c.name.clone()),
        applied: c.store.version(),
        in_view: true,
        view: vec![c.name.clone()],
    })
}
