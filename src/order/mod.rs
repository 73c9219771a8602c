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
use crate::batch::{Batched, Batcher};
use crate::client::CatalogClient;
use crate::config::Role;
use crate::http::{self as h, ApiError, JsonBody, QueryArgs};
use crate::node::Node;

use store::OrderStore;

struct Order {
    store: OrderStore,
    catalog: Arc<Pool<CatalogClient>>,
    buys: h::Whole,
    /// Each write with the id of the request it came in.
    writes: Batcher<(CatalogWrite, Option<String>), Batched>,
    /// The catalog pool's retry budget: a write refused inside a batch is
    /// retried alone only within what is left of it.
    budget: Duration,
}

/// Batches of writes out to the catalog primary at once: one is gathered
/// while the other is answered (as the frontend's lookups).
const WRITE_SLOTS: usize = 2;

/// Sends one batch to the primary (followed, and retried, as a lone write
/// is): one answer per write, in order.
async fn send_writes(
    catalog: Arc<Pool<CatalogClient>>,
    batch: Vec<(CatalogWrite, Option<String>)>,
) -> Vec<Batched> {
    let n = batch.len();
    crate::metrics::write_batch(n);
    let (writes, request_ids) = crate::batch::with_ids(batch);
    let ask = WriteBatch {
        writes,
        request_ids,
    };
    let ask = &ask;
    let reply = catalog.call(|c| async move { c.writes(ask).await }).await;
    crate::batch::answers(reply, n, "catalog /internal/writes")
}

/// What every handler gets.
type AppState = Arc<Order>;

/// Runs order node `node` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    node: Node,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let dir = node.data_dir()?;
    let store = OrderStore::open(&dir, &node.cfg.cluster_id, &node.name)?;
    let budget = Duration::from_millis(node.cfg.timing.retry_budget_ms)
        .min(crate::frontend::public_budget(&node.cfg));
    let catalog = node.pool(Role::Catalog, &node.http, Pick::Sticky, budget);
    let writes = Batcher::spawn(WRITE_SLOTS, MAX_WRITE_BATCH, {
        let catalog = catalog.clone();
        move |batch| send_writes(catalog.clone(), batch)
    });
    crate::metrics::register(Role::Order);
    let buys = h::Whole::new(node.cfg.limits.max_in_flight);
    let state: AppState = Arc::new(Order {
        store,
        catalog,
        buys,
        writes,
        budget,
    });
    let app = router(state.clone(), &node.cfg.token);
    tracing::info!(addr = %listener.local_addr()?, data_dir = %dir.display(), "order {} serving", node.name);
    node.serve(listener, app, &[], shutdown).await?;
    // Every request is answered, but a buy whose client gave up may still
    // run: it ends within the retry budget (each call within the call
    // timeout), so wait that long for it to reach the log. Then close the
    // log cleanly (SQLite removes its write-ahead log).
    let within = budget + Duration::from_millis(node.cfg.timing.call_timeout_ms);
    if !state.buys.finish(within).await {
        tracing::warn!(
            "buys whose clients gave up still ran {} ms after the last request was answered",
            within.as_millis()
        );
    }
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
    tracing::info!("order {} stopped", node.name);
    Ok(())
}

fn router(state: AppState, token: &str) -> Router {
    let internal = Router::new()
        .route("/internal/buy", post(buy))
        .route("/internal/buys", post(buys))
        .route("/log", get(log));
    let public = Router::new().route("/readyz", get(readyz));
    public.merge(h::internal(internal, token)).with_state(state)
}

/// `GET /readyz`: ready when a catalog replica answers.
async fn readyz(State(o): State<AppState>) -> Result<Json<Health>, ApiError> {
    let probes = o.catalog.members().iter().map(|m| {
        let c = m.client.clone();
        async move { c.health().await.is_ok() }
    });
    crate::readiness::answer(
        (!crate::readiness::any(probes).await).then(|| "no catalog replica answers".to_string()),
    )
}

/// `POST /internal/buy`, in a task of its own that the request awaits: a
/// caller that goes away (its client gave up) must not cut a buy short
/// between the catalog's answer and the order log, or a buy the catalog
/// committed would be in no order log.
async fn buy(
    State(o): State<AppState>,
    JsonBody(req): JsonBody<OrderBuyRequest>,
) -> Result<Json<WriteResult>, ApiError> {
    run_buy(o, req).await
}

/// Runs one buy in a task of its own (see [`buy`]).
async fn run_buy(o: AppState, req: OrderBuyRequest) -> Result<Json<WriteResult>, ApiError> {
    let buys = o.buys.clone();
    buys.run(async move { buy_whole(&o, req).await }).await
}

/// `POST /internal/buys`: each buy handled as `/internal/buy` handles one
/// (in a task of its own that ends though the batch's caller gives up),
/// all at once, so that their writes share the next batches to the
/// catalog; one outcome per buy, in order.
async fn buys(
    State(o): State<AppState>,
    JsonBody(b): JsonBody<OrderBuyBatch>,
) -> Result<Json<WriteBatchReply>, ApiError> {
    crate::batch::check(b.buys.len(), MAX_WRITE_BATCH, &b.request_ids)?;
    let outcomes = crate::batch::run_all(b.buys, b.request_ids, |req| run_buy(o.clone(), req))
        .await
        .into_iter()
        .map(|r| match r {
            Some(Ok(Json(done))) => WriteOutcome::Done(done),
            Some(Err(e)) => WriteOutcome::Refused {
                status: e.status.as_u16(),
                message: e.message,
                primary: None,
            },
            None => WriteOutcome::Refused {
                status: 503,
                message: "the buy's task failed; retry with the same request id".into(),
                primary: None,
            },
        })
        .collect();
    Ok(Json(WriteBatchReply { outcomes }))
}

async fn buy_whole(o: &AppState, req: OrderBuyRequest) -> Result<Json<WriteResult>, ApiError> {
    // A fresh id was minted for this very request: no log holds it.
    let first = if req.fresh {
        None
    } else {
        o.store
            .get(&req.request_id)
            .await
            .map_err(ApiError::unavailable)?
    };
    if let Some(first) = first {
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
    let traced = (write.clone(), crate::telemetry::current_request_id());
    let catalog = &o.catalog;
    let alone = || async move {
        catalog
            .call(|c| {
                let write = write.clone();
                async move { c.write(&write).await }
            })
            .await
    };
    let result = crate::batch::write(&o.writes, traced, o.budget, alone).await?;
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
    State(o): State<AppState>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Pick;
    use crate::client::ClientError;

    /// A catalog that cannot be reached: every write of the batch gets the
    /// batch's error, marked as the batch's (it is not retried alone: the
    /// pool already spent its budget on it).
    #[tokio::test]
    async fn every_write_in_a_failed_batch_gets_the_batchs_error() {
        let pool = crate::client::unreachable_catalog(Pick::Sticky);
        let writes: Vec<(CatalogWrite, Option<String>)> = (1..=5u64)
            .map(|i| {
                let w = CatalogWrite {
                    request_id: RequestId::parse(&format!("k:w{i}")).unwrap(),
                    op: CatalogOp::Buy {
                        book_id: BookId::new(i).unwrap(),
                    },
                };
                (w, Some(format!("trace-{i}")))
            })
            .collect();
        let answers = tokio::time::timeout(Duration::from_secs(10), send_writes(pool, writes))
            .await
            .expect("the batch is answered");
        assert_eq!(answers.len(), 5, "one answer per write");
        for a in answers {
            assert!(
                matches!(a, Batched::Failed(ClientError::Unreachable { .. })),
                "expected the batch's failure"
            );
        }
    }
}
