//! Lookups that miss the cache, gathered into batches ([`crate::batch`]):
//! one `POST /internal/lookups` answers every lookup that arrived while the
//! earlier batches were in flight. That is where an uncached lookup spent
//! most of its time: an HTTP request and a read admission on a catalog
//! replica for every lookup.
//!
//! Linearizable as before: a batch is sent after every lookup in it was
//! received, and its replica reads from one state that shows every write
//! committed before the batch arrived and is at least at each lookup's
//! `min_version` (the batch asks for the greatest).

use std::sync::Arc;

use crate::api::{BookId, LookupBatch, LookupResponse, MAX_LOOKUP_BATCH, Version};
use crate::balance::Pool;
use crate::batch::Batcher;
use crate::client::{CatalogClient, ClientError};

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
