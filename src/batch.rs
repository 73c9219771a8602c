//! Requests gathered into batches for one internal call each: the
//! frontend's cache-missing lookups (one `POST /internal/lookups`).
//!
//! At most `in_flight` batches are out at once. A request that finds a
//! slot free leaves at once, alone, so a lone client waits no longer than
//! without batching (one task hop); under load, requests queue behind the
//! busy slots and leave together, and the receiving node parses, admits
//! and answers one HTTP request for many. The batch is sent after every
//! request in it arrived, so each is served as if sent alone at that
//! moment, which keeps reads linearizable.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

struct Waiting<T, R> {
    item: T,
    answer: oneshot::Sender<R>,
}

/// The handle requests go through; the gathering task ends when it is
/// dropped.
pub(crate) struct Batcher<T, R> {
    queue: mpsc::Sender<Waiting<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the gathering task. `send` takes a batch of at most `max`
    /// items and returns one answer per item, in order.
    pub(crate) fn spawn<F, Fut>(in_flight: usize, max: usize, send: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (queue, waiting) = mpsc::channel(4 * max);
        tokio::spawn(gather(waiting, in_flight, max, send));
        Self { queue }
    }

    /// Queues `item` for the next batch and waits for its answer; `None`
    /// when the batcher is gone (the node is stopping) or `send` gave no
    /// answer for it.
    pub(crate) async fn submit(&self, item: T) -> Option<R> {
        let (answer, reply) = oneshot::channel();
        self.queue.send(Waiting { item, answer }).await.ok()?;
        reply.await.ok()
    }
}

async fn gather<T, R, F, Fut>(
    mut waiting: mpsc::Receiver<Waiting<T, R>>,
    in_flight: usize,
    max: usize,
    send: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight.max(1)));
    loop {
        // A slot first, then the requests: whatever queued while every
        // slot was busy leaves together.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = waiting.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match waiting.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let (items, answers): (Vec<T>, Vec<oneshot::Sender<R>>) =
            batch.into_iter().map(|w| (w.item, w.answer)).unzip();
        let sent = send(items);
        tokio::spawn(async move {
            for (answer, r) in answers.into_iter().zip(sent.await) {
                // The requester may have gone: nobody to tell.
                let _ = answer.send(r);
            }
            drop(slot);
        });
    }
}
