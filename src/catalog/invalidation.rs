//! Cache leases and invalidations, the catalog primary's side (see docs/DESIGN-NOTES.md, "Linearizable reads").
//!
//! A frontend serves cached reads only while it holds a cache lease. It asks
//! the primary for one and counts it from when it *sent* the request; the
//! primary counts it from when it granted it, which is later, so the primary
//! never believes a lease over that the frontend still uses.
//!
//! Before a write to a book can commit, the primary tells every frontend
//! holding a lease that the book has a write *begun*: the frontend drops it
//! and serves it from the cache no more (no hits, no fills). The write is
//! proposed *held* as its begin is queued: it is replicated and made durable
//! while the begin travels, and commits only once the begin reached every
//! frontend ([`crate::replication::Replica::propose_held`]). After the write
//! commits (or is refused), and before its client is answered, the primary
//! sends its *end* with the version it committed at: the frontend may cache
//! the book again, from reads at that version or later. So no frontend
//! serves a value from its cache once a newer one may be visible anywhere:
//! a write becomes visible when it commits, after its begin reached every
//! cache. Each frontend has one pusher task, so its invalidations travel in
//! order, batched, with a sequence number per batch; the writes begun and
//! not ended in the batches already numbered travel with every lease grant,
//! for a frontend that had no lease when their begins were sent.
//!
//! A new primary first sends every frontend an empty batch of its epoch:
//! the frontend flushes its cache and drops its lease, so it serves nothing
//! cached until the new primary grants a lease, which it does only once
//! ready. The primary is not ready (it exposes nothing it inherited) before
//! that batch reached every frontend or the frontend's earlier lease surely
//! ran out ([`Invalidator::fence`]). When a push fails, the primary withholds new
//! leases from that frontend and waits until the lease it granted has surely
//! run out; the frontend, finding its lease lapsed, flushes its cache before
//! it serves from it again. So a write is answered only once every frontend
//! either dropped the old value or stopped serving from cache — and a dead
//! frontend delays writes by at most one lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::api::{BookId, Invalidation, InvalidationBatch, LeaseGrant, Version};
use crate::client::FrontendClient;

/// The primary's side of one frontend's cache lease and invalidation
/// stream, without I/O: the push loop below and the simulator drive it.
#[derive(Debug, Default)]
pub struct LinkState {
    /// When the lease last granted to this frontend has surely run out.
    lease_expiry: Option<Instant>,
    /// No lease is granted before this instant (a push failed).
    withheld_until: Option<Instant>,
    /// Seq of the next batch pushed.
    next_seq: u64,
    /// Writes begun and not ended in the batches before `next_seq`.
    pending: HashMap<BookId, u32>,
    /// The highest version an end in those batches carried: a lease
    /// granted now lets the frontend fill from reads at this version or
    /// later only. An end leaves once its write commits, possibly before
    /// the primary has applied it, so the primary's applied version (what
    /// a grant otherwise carries) may still be below it; a frontend that
    /// took such a grant without the end (it held no lease when the end
    /// went) could have filled the book from a read begun before the write.
    ended: Version,
}

impl LinkState {
    /// A new primary's link: the frontend is treated as holding a lease
    /// from an earlier primary for `assumed` from `now`.
    pub fn new(now: Instant, assumed: Duration) -> Self {
        LinkState {
            lease_expiry: Some(now + assumed),
            ..LinkState::default()
        }
    }

    /// Grants a lease of `lease` at `now`, which the primary counts as
    /// lasting `lease_with_drift` (the frontend's clock may run slower),
    /// unless the frontend missed invalidations still being waited out.
    pub fn grant(
        &mut self,
        now: Instant,
        lease: Duration,
        lease_with_drift: Duration,
        epoch: u64,
        version: Version,
    ) -> Result<LeaseGrant, LeaseError> {
        if let Some(until) = self.withheld_until {
            if until > now {
                return Err(LeaseError::Withheld((until - now).as_millis() as u64 + 1));
            }
            self.withheld_until = None;
        }
        let expiry = now + lease_with_drift;
        self.lease_expiry = Some(self.lease_expiry.map_or(expiry, |e| e.max(expiry)));
        let pending = self
            .pending
            .iter()
            .flat_map(|(b, n)| std::iter::repeat_n(*b, *n as usize))
            .collect();
        Ok(LeaseGrant {
            epoch,
            next_seq: self.next_seq,
            lease_ms: lease.as_millis() as u64,
            version: version.max(self.ended),
            pending,
        })
    }

    /// A batch of `items` is to be pushed at `now`: `Some((seq, expiry))`
    /// to send it, delivered before `expiry` or failed; `None` when no
    /// lease is out (the frontend serves nothing cached): done already.
    pub fn start_batch(&mut self, items: &[Invalidation], now: Instant) -> Option<(u64, Instant)> {
        self.count(items);
        match self.lease_expiry {
            Some(e) if e > now => {
                let seq = self.next_seq;
                self.next_seq += 1;
                Some((seq, e))
            }
            _ => None,
        }
    }

    /// The batch sent with `expiry` was not delivered: no lease is granted
    /// before the returned instant, when the batch counts as done.
    pub fn push_failed(&mut self, expiry: Instant) -> Instant {
        let until = self.lease_expiry.unwrap_or(expiry).max(expiry);
        self.withheld_until = Some(until);
        until
    }

    fn count(&mut self, items: &[Invalidation]) {
        for it in items {
            if it.begin {
                *self.pending.entry(it.book_id).or_default() += 1;
            } else {
                self.ended = self.ended.max(it.version);
                if let Some(n) = self.pending.get_mut(&it.book_id) {
                    *n -= 1;
                    if *n == 0 {
                        self.pending.remove(&it.book_id);
                    }
                }
            }
        }
    }
}

struct Pending {
    /// None: an empty batch (the new epoch's fence).
    item: Option<Invalidation>,
    done: oneshot::Sender<()>,
}

struct Link {
    name: String,
    state: Arc<Mutex<LinkState>>,
    queue: mpsc::UnboundedSender<Pending>,
}

/// The set of frontends a catalog primary keeps caches coherent at.
pub struct Invalidator {
    links: Vec<Arc<Link>>,
    lease: Duration,
    /// `lease × (1 + drift)`: how long a lease granted now may run on the
    /// frontend's clock, measured on ours.
    lease_with_drift: Duration,
    epoch: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("unknown frontend {0:?}")]
    UnknownFrontend(String),
    #[error(
        "cache lease withheld for {0} ms: this frontend missed invalidations and must let its cache lapse"
    )]
    Withheld(u64),
}

impl Invalidator {
    /// `assumed`: how long every frontend is treated as holding a lease
    /// from an earlier primary.
    pub fn new(
        frontends: Vec<(String, FrontendClient)>,
        lease: Duration,
        drift: f64,
        assumed: Duration,
        epoch: u64,
    ) -> Self {
        let links = frontends
            .into_iter()
            .map(|(name, client)| {
                let (queue, rx) = mpsc::unbounded_channel();
                // The previous primary may have granted a lease just before it
                // stopped: treat every frontend as leased until that one surely ran out.
                let state = Arc::new(Mutex::new(LinkState::new(now(), assumed)));
                tokio::spawn(push_loop(name.clone(), state.clone(), client, rx, epoch));
                Arc::new(Link { name, state, queue })
            })
            .collect();
        Self {
            links,
            lease,
            lease_with_drift: lease.mul_f64(1.0 + drift),
            epoch,
        }
    }

    /// Grants `frontend` a cache lease, unless it missed invalidations that
    /// the primary is still waiting out.
    pub fn grant(&self, frontend: &str, version: Version) -> Result<LeaseGrant, LeaseError> {
        let link = self
            .links
            .iter()
            .find(|l| l.name == frontend)
            .ok_or_else(|| LeaseError::UnknownFrontend(frontend.to_string()))?;
        let mut st = link.state.lock().unwrap_or_else(|p| p.into_inner());
        // The frontend counts `lease` on its own clock, which may run slower
        // than ours by up to the drift margin.
        st.grant(
            now(),
            self.lease,
            self.lease_with_drift,
            self.epoch,
            version,
        )
    }

    /// A write to `book` is about to be proposed: its begin is queued for
    /// every frontend now, before anything queued after this call; the
    /// returned future ends once every frontend stopped serving the book
    /// from its cache (or surely stopped serving from its cache at all).
    /// Each begin needs its [`Invalidator::end`].
    pub fn begin(&self, book: BookId) -> impl std::future::Future<Output = ()> + Send + 'static {
        let waits = self.enqueue(Some(Invalidation {
            book_id: book,
            version: Version::default(),
            begin: true,
        }));
        wait_all(waits)
    }

    /// The write begun on `book` is over: committed at `version` (or
    /// refused; `version` is then any applied version). Returns once every
    /// frontend has it or surely stopped serving from its cache.
    pub async fn end(&self, book: BookId, version: Version) {
        self.end_queued(book, version).await
    }

    /// [`Invalidator::end`], queued at once (before anything queued after
    /// this call) rather than when first polled.
    pub fn end_queued(
        &self,
        book: BookId,
        version: Version,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        wait_all(self.enqueue(Some(Invalidation {
            book_id: book,
            version,
            begin: false,
        })))
    }

    /// The new epoch's first batch: returns once every frontend flushed its
    /// cache and dropped its lease, or its lease surely ran out.
    pub async fn fence(&self) {
        self.push(None).await
    }

    async fn push(&self, item: Option<Invalidation>) {
        wait_all(self.enqueue(item)).await
    }

    fn enqueue(&self, item: Option<Invalidation>) -> Vec<oneshot::Receiver<()>> {
        let mut waits = Vec::with_capacity(self.links.len());
        for link in &self.links {
            let (done, rx) = oneshot::channel();
            if link.queue.send(Pending { item, done }).is_ok() {
                waits.push(rx);
            }
        }
        waits
    }
}

async fn wait_all(waits: Vec<oneshot::Receiver<()>>) {
    for w in waits {
        let _ = w.await;
    }
}

/// Ends when the invalidator (the only holder of the queue's sender) is dropped.
async fn push_loop(
    name: String,
    state: Arc<Mutex<LinkState>>,
    client: FrontendClient,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    epoch: u64,
) {
    while let Some(first) = rx.recv().await {
        // Let the tasks ready to run queue theirs first: the writes the
        // driver answers together wake one by one, each queuing its end,
        // and the first one's wake would have sent its end alone, the rest
        // a push later (see `crate::batch::Turn`).
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let items: Vec<Invalidation> = batch.iter().filter_map(|p| p.item).collect();
        let started = state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .start_batch(&items, now());
        // None: no lease out, the frontend is not serving from its cache.
        let Some((seq, expiry)) = started else {
            finish(batch);
            continue;
        };
        let msg = InvalidationBatch { epoch, seq, items };
        let delivered = matches!(
            tokio::time::timeout_at(expiry.into(), client.invalidate(&msg)).await,
            Ok(Ok(_))
        );
        if !delivered {
            let until = state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_failed(expiry);
            tracing::info!(
                frontend = %name,
                wait_ms = until.saturating_duration_since(now()).as_millis() as u64,
                "frontend not reachable for cache invalidation; waiting out its cache lease"
            );
            tokio::time::sleep_until(until.into()).await;
        }
        finish(batch);
    }
}

/// The runtime's clock (which tests may pause) as a `std` instant.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn finish(batch: Vec<Pending>) {
    for p in batch {
        let _ = p.done.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Http;

    /// The handler queues a write's begin, then proposes the write held and
    /// may push its end (a refused write) before it awaits the begin: the
    /// begin must already be ahead of that end in the frontend's stream, or
    /// the frontend would count a begin that never ends.
    #[tokio::test]
    async fn a_begin_is_queued_when_called_ahead_of_what_is_queued_after_it() {
        let fe = FrontendClient::new(
            "http://127.0.0.1:9",
            Http::new(None, Duration::from_millis(100)),
        );
        let inv = Invalidator::new(
            vec![("frontend".into(), fe)],
            Duration::from_millis(1000),
            0.1,
            Duration::ZERO,
            1,
        );
        let book = BookId::new(1).unwrap();
        let begun = inv.begin(book);
        inv.end(book, Version::default()).await;
        begun.await;
        let st = inv.links[0].state.lock().unwrap();
        assert!(
            st.pending.is_empty(),
            "the end arrived before its begin: {:?} left begun",
            st.pending
        );
    }

    /// An end leaves once its write commits, before the primary applies
    /// it: a lease granted meanwhile, to a frontend that held none when the
    /// end went (so it never had the begin either), must not let it fill
    /// the book from a read older than the write.
    #[test]
    fn a_lease_granted_after_an_end_lets_no_fill_below_its_version() {
        let now = Instant::now();
        let lease = Duration::from_millis(1000);
        let mut st = LinkState::new(now, Duration::ZERO);
        let book = BookId::new(3).unwrap();
        let write = Version { epoch: 2, seq: 40 };
        let applied = Version { epoch: 2, seq: 39 };
        for begin in [true, false] {
            let item = Invalidation {
                book_id: book,
                version: if begin { Version::default() } else { write },
                begin,
            };
            assert_eq!(st.start_batch(&[item], now), None, "no lease is out");
        }
        let g = st.grant(now, lease, lease, 2, applied).unwrap();
        assert!(g.pending.is_empty(), "the write has ended: {:?}", g.pending);
        assert_eq!(
            g.version, write,
            "the grant lets the frontend fill from reads before the ended write"
        );
        let later = Version { epoch: 2, seq: 41 };
        let g = st.grant(now, lease, lease, 2, later).unwrap();
        assert_eq!(
            g.version, later,
            "a grant carries the applied version once past the end"
        );
    }

    #[tokio::test]
    async fn a_granted_cache_lease_is_waited_out_with_the_drift_margin() {
        let fe = FrontendClient::new(
            "http://127.0.0.1:9",
            Http::new(None, Duration::from_millis(100)),
        );
        let lease = Duration::from_millis(1000);
        let inv = Invalidator::new(vec![("frontend".into(), fe)], lease, 0.1, Duration::ZERO, 1);
        let before = Instant::now();
        inv.grant("frontend", Version::default()).unwrap();
        let expiry = inv.links[0].state.lock().unwrap().lease_expiry.unwrap();
        assert!(
            expiry >= before + Duration::from_millis(1100),
            "the primary may stop waiting before a slow clock's lease ends"
        );
    }
}
