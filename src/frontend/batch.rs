//! Lookups that miss the cache, and buys, gathered into batches
//! ([`crate::batch`]): one `POST /internal/lookups` answers every lookup
//! that arrived while the earlier batches were in flight. That is where an
//! uncached lookup spent most of its time: an HTTP request and a read
//! admission on a catalog replica for every lookup. Buys go the same way
//! to the order replicas (`POST /internal/buys`), each handled there as if
//! it came alone.
//!
//! Linearizable as before: a batch is sent after every lookup in it was
//! received, and its replica reads from one state that shows every write
//! committed before the batch arrived and is at least at each lookup's
//! `min_version` (the batch asks for the greatest).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::api::{
    BookId, LookupBatch, LookupResponse, MAX_LOOKUP_BATCH, MAX_WRITE_BATCH, OrderBuyBatch,
    OrderBuyRequest, Version, WriteResult,
};
use crate::balance::Pool;
use crate::batch::{Batched, Batcher};
use crate::client::{CatalogClient, ClientError, OrderClient};

/// Batches out at once: one is gathered while the other is answered. On two
/// cores, two gave the most lookups per second (`pygmy bench latency`: 64
/// connections without the cache, 0.54 × the floor; four slots, 0.38 ×;
/// no batching, 0.19 ×); a lone lookup leaves at once either way.
const IN_FLIGHT: usize = 2;

/// `None`: no such book.
type Answer = Result<Option<LookupResponse>, ClientError>;

/// The handle lookups go through; the gathering task ends when it is dropped.
pub(crate) struct Lookups(Batcher<(BookId, Option<Version>), Answer>);

impl Lookups {
    /// Starts the task that sends batches to `catalog`.
    pub(crate) fn spawn(catalog: Arc<Pool<CatalogClient>>) -> Self {
        Self(Batcher::spawn(IN_FLIGHT, MAX_LOOKUP_BATCH, move |batch| {
            send(catalog.clone(), batch)
        }))
    }

    /// Reads book `id` from a catalog replica, at least at `min`.
    pub(crate) async fn get(&self, id: BookId, min: Option<Version>) -> Answer {
        self.0.submit((id, min)).await.unwrap_or_else(|| {
            Err(ClientError::Unreachable {
                url: "catalog".into(),
                detail: "the frontend is shutting down".into(),
            })
        })
    }
}

/// Sends one batch (retried on other replicas as any read): one answer per
/// lookup, in order.
async fn send(
    catalog: Arc<Pool<CatalogClient>>,
    batch: Vec<(BookId, Option<Version>)>,
) -> Vec<Answer> {
    crate::metrics::lookup_batch(batch.len());
    let ask = LookupBatch {
        ids: batch.iter().map(|(id, _)| *id).collect(),
        min_version: batch.iter().filter_map(|(_, min)| *min).max(),
    };
    let ask = &ask;
    let reply = catalog
        .call(|c| async move { c.lookups(ask).await })
        .await
        .and_then(|r| {
            if r.books.len() == batch.len() {
                Ok(r.books)
            } else {
                Err(ClientError::Decode {
                    url: "catalog /internal/lookups".into(),
                    detail: format!("{} answers for {} books", r.books.len(), batch.len()),
                })
            }
        });
    match reply {
        Ok(books) => books.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e); batch.len()],
    }
}

/// The handle buys go through; the gathering task ends when it is dropped.
pub(crate) struct Buys {
    /// Each buy with the id of the request it came in.
    batcher: Batcher<(OrderBuyRequest, Option<String>), Batched>,
    orders: Arc<Pool<OrderClient>>,
    /// The order pool's retry budget: a buy refused inside a batch is
    /// retried alone only within it.
    budget: Duration,
}

impl Buys {
    /// Starts the task that sends batches to `orders`.
    pub(crate) fn spawn(orders: Arc<Pool<OrderClient>>, budget: Duration) -> Self {
        let batcher = Batcher::spawn(IN_FLIGHT, MAX_WRITE_BATCH, {
            let orders = orders.clone();
            move |batch| send_buys(orders.clone(), batch)
        });
        Self {
            batcher,
            orders,
            budget,
        }
    }

    /// Buys through an order replica, in the next batch; alone when
    /// refused inside one for a reason worth retrying.
    pub(crate) async fn buy(&self, req: OrderBuyRequest) -> Result<WriteResult, ClientError> {
        let traced = (req.clone(), crate::telemetry::current_request_id());
        let orders = &self.orders;
        // Its batch may have reached a replica: not fresh any more.
        let req = OrderBuyRequest {
            fresh: false,
            ..req
        };
        let req = &req;
        let alone = || async move { orders.call(|o| async move { o.buy(req).await }).await };
        crate::batch::write(&self.batcher, traced, self.budget, alone).await
    }
}

/// Sends one batch of buys (round-robin over the order replicas, retried
/// on another as a lone buy is): one answer per buy, in order. A buy is
/// `fresh` on the batch's first attempt only, as a lone one.
async fn send_buys(
    orders: Arc<Pool<OrderClient>>,
    batch: Vec<(OrderBuyRequest, Option<String>)>,
) -> Vec<Batched> {
    let n = batch.len();
    crate::metrics::buy_batch(n);
    let (buys, request_ids) = crate::batch::with_ids(batch);
    let sent = AtomicBool::new(false);
    let (buys, request_ids, sent) = (&buys, &request_ids, &sent);
    let reply = orders
        .call(|o| {
            let first = !sent.swap(true, Ordering::Relaxed);
            let ask = OrderBuyBatch {
                buys: buys
                    .iter()
                    .map(|b| OrderBuyRequest {
                        fresh: b.fresh && first,
                        ..b.clone()
                    })
                    .collect(),
                request_ids: request_ids.clone(),
            };
            async move { o.buys(&ask).await }
        })
        .await;
    crate::batch::answers(reply, n, "order /internal/buys")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balance::Pick;

    /// A catalog that cannot be reached: every lookup queued behind the
    /// batches gets the error, none waits forever, and the gathering task
    /// goes on to the next batch.
    #[tokio::test]
    async fn every_lookup_in_a_failed_batch_gets_the_error() {
        let pool = crate::client::unreachable_catalog(Pick::RoundRobin);
        let lookups = Arc::new(Lookups::spawn(pool));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..=20u64 {
            let lookups = lookups.clone();
            tasks.spawn(async move { lookups.get(BookId::new(i).unwrap(), None).await });
        }
        let answers = tokio::time::timeout(Duration::from_secs(10), tasks.join_all())
            .await
            .expect("every lookup is answered");
        assert_eq!(answers.len(), 20);
        for a in answers {
            assert!(
                matches!(a, Err(ClientError::Unreachable { .. })),
                "expected unreachable, got {a:?}"
            );
        }
        assert!(
            lookups
                .get(BookId::new(1).unwrap(), None)
                .await
                .is_err_and(|e| e.is_retryable()),
            "the next batch goes out too"
        );
    }
}
