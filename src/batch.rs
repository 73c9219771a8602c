//! Requests gathered into batches for one internal call each: the
//! frontend's cache-missing lookups (one `POST /internal/lookups`), its
//! buys (one `POST /internal/buys` to an order replica) and the order
//! replicas' writes (one `POST /internal/writes` to the catalog primary).
//!
//! At most `in_flight` batches are out at once. A request that finds a
//! slot free leaves at once, with those handed over on the same turn of
//! the runtime, so a lone client waits no longer than without batching
//! (one task hop and a yield); under load, requests queue behind the busy
//! slots and leave together, and the receiving node parses, admits and
//! answers one HTTP request for many. The batch is sent after every
//! request in it arrived, so each is served as if sent alone at that
//! moment, which keeps reads linearizable.

use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::api::{WriteBatchReply, WriteOutcome, WriteResult};
use crate::client::ClientError;
use crate::http::ApiError;

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
        // Let the tasks ready to run queue theirs first (see [`Turn`]):
        // the requests of a wave arrive together, each in its
        // connection's task, and the first one's wake would have sent it
        // alone, the rest a round behind it. A lone request still leaves
        // at once: nothing else is ready, so the yield costs a turn.
        tokio::task::yield_now().await;
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

/// Items handed over on one turn of the runtime, to be passed on together
/// to a thread that owns a disk (the catalog's driver, the order log's
/// writer). Tasks that run one after another (the writes of one batch, each
/// in a task of its own) each hand one over: sent one by one, the thread
/// woke at the first and wrote it alone, and the rest waited for that
/// write (an fsync, a replication round) before they went together. The
/// first item of a turn asks its caller to spawn the task that passes them
/// on ([`Turn::push`] returns `true`); that task yields once before it
/// takes them all ([`Turn::take`]), so that the tasks ready to run add
/// theirs first (those woken from another thread, by the driver's answers,
/// would otherwise run after it).
pub(crate) struct Turn<T>(std::sync::Mutex<Vec<T>>);

impl<T> Default for Turn<T> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }
}

impl<T> Turn<T> {
    /// Adds `item`; `true` when it is the first since the last
    /// [`Turn::take`]: spawn the task that takes them.
    pub(crate) fn push(&self, item: T) -> bool {
        let mut items = self.0.lock().unwrap_or_else(|p| p.into_inner());
        items.push(item);
        items.len() == 1
    }

    /// Everything added since the last call, once the tasks ready to run
    /// have run.
    pub(crate) async fn take(&self) -> Vec<T> {
        tokio::task::yield_now().await;
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Answers from a thread outside the runtime (the catalog's driver, the
/// order log's writer) to the tasks waiting for them, handed over as one
/// message per step. Sent one by one from that thread, each answer woke the
/// runtime from outside (a write to its eventfd, a system call, and often a
/// wake of its thread before the next answer was sent); a task on the
/// runtime sends them on from inside it, where a wake is a push onto its
/// run queue.
pub(crate) struct Answers<T> {
    to_runtime: Option<mpsc::UnboundedSender<Handed<T>>>,
}

/// Answers with the waiters they are for.
type Handed<T> = Vec<(oneshot::Sender<T>, T)>;

impl<T: Send + 'static> Answers<T> {
    /// Starts the task that sends the answers on, on the runtime this is
    /// called from; outside one, answers are sent directly.
    pub(crate) fn spawn() -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Self { to_runtime: None };
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Handed<T>>();
        runtime.spawn(async move {
            while let Some(answers) = rx.recv().await {
                for (to, answer) in answers {
                    // The waiter may have gone: nobody to tell.
                    let _ = to.send(answer);
                }
            }
        });
        Self {
            to_runtime: Some(tx),
        }
    }

    /// Hands `answers` over; directly when the runtime's task is gone.
    pub(crate) fn send(&self, answers: Handed<T>) {
        if answers.is_empty() {
            return;
        }
        let answers = match &self.to_runtime {
            Some(tx) => match tx.send(answers) {
                Ok(()) => return,
                Err(mpsc::error::SendError(answers)) => answers,
            },
            None => answers,
        };
        for (to, answer) in answers {
            let _ = to.send(answer);
        }
    }
}

/// Splits a batch of items, each with the id of the request it came in,
/// into the items and the ids to send with them: every id, or none when
/// one is unknown (the receiver logs each item under its id).
pub(crate) fn with_ids<T>(batch: Vec<(T, Option<String>)>) -> (Vec<T>, Vec<String>) {
    let (items, ids): (Vec<T>, Vec<Option<String>>) = batch.into_iter().unzip();
    let ids = if ids.iter().all(Option::is_some) {
        ids.into_iter().flatten().collect()
    } else {
        Vec::new()
    };
    (items, ids)
}

/// A write's fate in a batch of writes sent to another node.
pub(crate) enum Batched {
    Done(WriteResult),
    /// Refused inside a batch that was answered: it may go alone (to be
    /// retried as a lone write is) when the refusal is retryable.
    Refused(ClientError),
    /// The batch itself failed, after the pool's whole retry budget.
    Failed(ClientError),
}

/// One [`Batched`] per write of a batch of `n` sent to `url`: its outcome
/// from `reply`, or the batch's failure for each.
pub(crate) fn answers(
    reply: Result<WriteBatchReply, ClientError>,
    n: usize,
    url: &str,
) -> Vec<Batched> {
    let reply = reply.and_then(|r| {
        if r.outcomes.len() == n {
            Ok(r.outcomes)
        } else {
            Err(ClientError::Decode {
                url: url.into(),
                detail: format!("{} outcomes for {n} writes", r.outcomes.len()),
            })
        }
    });
    match reply {
        Ok(outcomes) => outcomes
            .into_iter()
            .map(|o| match o {
                WriteOutcome::Done(r) => Batched::Done(r),
                WriteOutcome::Refused {
                    status,
                    message,
                    primary,
                } => Batched::Refused(ClientError::Status {
                    url: url.into(),
                    status,
                    message,
                    primary,
                }),
            })
            .collect(),
        Err(e) => (0..n).map(|_| Batched::Failed(e.clone())).collect(),
    }
}

/// Sends a write through `batcher` and waits for its result. One refused
/// inside an answered batch for a reason worth retrying goes `alone`
/// within `budget` from now; one the batcher did not take (it is gone)
/// goes `alone` as well.
pub(crate) async fn write<T, F, Fut>(
    batcher: &Batcher<T, Batched>,
    item: T,
    budget: Duration,
    alone: F,
) -> Result<WriteResult, ClientError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<WriteResult, ClientError>>,
{
    let deadline = tokio::time::Instant::now() + budget;
    match batcher.submit(item).await {
        Some(Batched::Done(r)) => Ok(r),
        Some(Batched::Refused(e)) if e.is_retryable() => tokio::time::timeout_at(deadline, alone())
            .await
            .unwrap_or(Err(e)),
        Some(Batched::Refused(e) | Batched::Failed(e)) => Err(e),
        None => alone().await,
    }
}

/// Checks a batch that came in: 1 to `max` items, and `request_ids` empty
/// or one id (1 to 64 printable ASCII characters) per item.
pub(crate) fn check(n: usize, max: usize, request_ids: &[String]) -> Result<(), ApiError> {
    if n == 0 || n > max {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1 to {max} items, not {n}"
        )));
    }
    if !request_ids.is_empty()
        && (request_ids.len() != n
            || !request_ids
                .iter()
                .all(|id| crate::telemetry::sane_request_id(id)))
    {
        return Err(ApiError::bad_request(
            "request_ids: one id (1 to 64 printable ASCII characters) per item, or none",
        ));
    }
    Ok(())
}

/// Runs `work` for every item of a batch that came in, all at once, each
/// in a task of its own under the id of the request it came in (when
/// `request_ids` has one): the outputs in order, `None` for a task that
/// failed.
pub(crate) async fn run_all<T, F, Fut>(
    items: Vec<T>,
    request_ids: Vec<String>,
    work: F,
) -> Vec<Option<Fut::Output>>
where
    F: Fn(T) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let n = items.len();
    let mut ids = request_ids.into_iter();
    let mut running = tokio::task::JoinSet::new();
    for (i, item) in items.into_iter().enumerate() {
        // On the heap: an item's work is kilobytes of future, which the
        // wrappers below and spawning would each copy whole.
        let one = Box::pin(work(item));
        let one = async move { (i, one.await) };
        match ids.next() {
            Some(id) => running.spawn(crate::telemetry::in_request(id, one)),
            None => running.spawn(one),
        };
    }
    let mut slots: Vec<Option<Fut::Output>> = std::iter::repeat_with(|| None).take(n).collect();
    while let Some(done) = running.join_next().await {
        if let Ok((i, r)) = done {
            slots[i] = Some(r);
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::api::{BookId, Outcome, Version};

    fn refused(status: u16) -> ClientError {
        ClientError::Status {
            url: "peer /internal/writes".into(),
            status,
            message: format!("refused with {status}"),
            primary: None,
        }
    }

    fn result(order_id: u64) -> WriteResult {
        WriteResult {
            outcome: Outcome::OutOfStock {
                book_id: BookId::new(order_id).unwrap(),
                title: "t".into(),
            },
            version: Version { epoch: 1, seq: 1 },
        }
    }

    /// A write refused inside an answered batch goes alone only when the
    /// refusal is worth retrying (a 503, not a 404), and a batch that
    /// failed as a whole is not sent again alone: the pool already spent
    /// its budget on it.
    #[tokio::test]
    async fn only_a_retryable_refusal_inside_a_batch_goes_alone() {
        let batcher: Batcher<u16, Batched> =
            Batcher::spawn(2, 8, |statuses: Vec<u16>| async move {
                statuses
                    .into_iter()
                    .map(|s| match s {
                        0 => Batched::Failed(refused(503)),
                        s => Batched::Refused(refused(s)),
                    })
                    .collect()
            });
        let alone = Arc::new(AtomicUsize::new(0));
        let send_alone = || {
            let alone = alone.clone();
            async move {
                alone.fetch_add(1, Ordering::SeqCst);
                Ok(result(7))
            }
        };
        let budget = Duration::from_secs(5);
        let r = write(&batcher, 503, budget, send_alone).await;
        assert_eq!(r.ok(), Some(result(7)), "a 503 inside the batch went alone");
        assert_eq!(alone.load(Ordering::SeqCst), 1);
        let r = write(&batcher, 404, budget, send_alone).await;
        assert!(matches!(r, Err(ClientError::Status { status: 404, .. })));
        let r = write(&batcher, 0, budget, send_alone).await;
        assert!(matches!(r, Err(ClientError::Status { status: 503, .. })));
        assert_eq!(alone.load(Ordering::SeqCst), 1, "nothing else went alone");
    }

    /// A reply with more or fewer outcomes than writes fails every write
    /// of the batch, as an answer that cannot be read.
    #[test]
    fn a_reply_of_the_wrong_length_fails_every_write() {
        let reply = WriteBatchReply {
            outcomes: vec![WriteOutcome::Done(result(1))],
        };
        let answers = answers(Ok(reply), 3, "peer /internal/writes");
        assert_eq!(answers.len(), 3);
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Batched::Failed(ClientError::Decode { .. })))
        );
    }
}
