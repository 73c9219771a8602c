//! The order service: turns a purchase into a catalog write and keeps a
//! durable log of the orders it handled. A request id it has handled gets
//! its first answer again; one it has not goes to the catalog primary, which
//! applies each request id at most once — so a buy retried on another order
//! replica never buys twice.

pub mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::NodeError;
use crate::api::*;
use crate::balance::{Pick, Pool};
use crate::client::{CatalogClient, Http};
use crate::config::{ClusterConfig, Role};
use crate::http::{self as h, ApiError, JsonBody, QueryArgs};

use store::OrderStore;

struct Order {
    store: OrderStore,
    catalog: Arc<Pool<CatalogClient>>,
}

type Shared = Arc<Order>;

/// Runs order node `name` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    cfg: ClusterConfig,
    name: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let node = cfg
        .node(name)
        .ok_or_else(|| NodeError::Config(format!("no node {name}")))?;
    let dir = cfg
        .data_dir(node)
        .ok_or_else(|| NodeError::Config(format!("{name} has no data_dir")))?;
    let store = OrderStore::open(&dir, &cfg.cluster_id, name)?;
    let http = Http::new(
        Some(cfg.token.clone()),
        Duration::from_millis(cfg.timing.call_timeout_ms),
    );
    let catalog = Pool::new(
        "catalog",
        cfg.nodes_of(Role::Catalog)
            .map(|n| {
                (
                    n.name.clone(),
                    CatalogClient::new(n.base_url(), http.clone()),
                )
            })
            .collect(),
        Pick::Sticky,
        Duration::from_millis(cfg.timing.retry_budget_ms).min(crate::frontend::public_budget(&cfg)),
    );
    let state: Shared = Arc::new(Order { store, catalog });
    crate::metrics::register(crate::config::Role::Order);
    let routes = Router::new()
        .route("/internal/buy", post(buy))
        .route("/log", get(log));
    let public = Router::new().route("/readyz", get(readyz));
    let app = h::finish(
        public
            .merge(h::internal(routes, &cfg.token))
            .with_state(state.clone()),
        &cfg.limits,
    );
    tracing::info!(addr = %listener.local_addr()?, data_dir = %dir.display(), "order {name} serving");
    h::serve(
        listener,
        app,
        cfg.limits.clone(),
        cfg.token.clone(),
        shutdown,
    )
    .await?;
    // Every request is answered: close the log cleanly (SQLite removes its
    // write-ahead log), unless a task still holds it.
    match Arc::try_unwrap(state) {
        Ok(order) => {
            tokio::task::spawn_blocking(move || order.store.close())
                .await
                .map_err(|e| NodeError::Config(format!("closing the order log: {e}")))??;
        }
        Err(_) => tracing::warn!(
            "the order log is still in use; the next start counts this stop as not clean"
        ),
    }
    tracing::info!("order {name} stopped");
    Ok(())
}

/// `GET /readyz`: ready when a catalog replica answers.
async fn readyz(State(o): State<Shared>) -> Result<Json<Health>, ApiError> {
    let probes = o.catalog.members().iter().map(|m| {
        let c = m.client.clone();
        async move { c.health().await.is_ok() }
    });
    crate::readiness::answer(
        (!crate::readiness::any(probes).await).then(|| "no catalog replica answers".to_string()),
    )
}

async fn buy(
    State(o): State<Shared>,
    JsonBody(req): JsonBody<OrderBuyRequest>,
) -> Result<Json<WriteResult>, ApiError> {
    if let Some(first) = o
        .store
        .get(&req.request_id)
        .await
        .map_err(ApiError::unavailable)?
    {
        tracing::debug!(request_id = %req.request_id, "request already handled; answering as before");
        return Ok(Json(first));
    }
    tracing::debug!(write_id = %req.request_id, book = %req.book_id, "buy received");
    let write = CatalogWrite {
        request_id: req.request_id.clone(),
        op: CatalogOp::Buy {
            book_id: req.book_id,
        },
    };
    let result = o
        .catalog
        .call(|c| {
            let write = write.clone();
            async move { c.write(&write).await }
        })
        .await?;
    o.store
        .record(req.request_id, result.clone())
        .await
        .map_err(ApiError::unavailable)?;
    Ok(Json(result))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogArgs {
    limit: Option<u32>,
    before: Option<u64>,
}

async fn log(
    State(o): State<Shared>,
    QueryArgs(args): QueryArgs<LogArgs>,
) -> Result<Json<OrderLogPage>, ApiError> {
    let limit = args.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    Ok(Json(
        o.store
            .page(limit, args.before)
            .await
            .map_err(ApiError::unavailable)?,
    ))
}
