//! The frontend's read cache (see docs/DESIGN-NOTES.md, "Linearizable reads").
//!
//! * Bounded: at most `capacity` entries, oldest inserted evicted first.
//! * No stale fill: every value carries the version it was read at; an
//!   invalidation raises the book's *floor*, and a fill below the floor is
//!   refused. Reads after an invalidation ask replicas for at least the floor.
//! * A write's *begin* (sent by the primary as it proposes the write, which
//!   cannot commit before every cache has it) drops the book and stops
//!   caching it until the write's *end* arrives (its commit version becomes
//!   the floor): so once a write can be visible at any replica, no cache
//!   serves the value from before it.
//! * Served only under a cache lease from the catalog primary. When the
//!   lease lapses, the epoch changes, or the invalidation stream shows a gap,
//!   everything cached is dropped, and fills that started before are refused
//!   (the generation changed). A new epoch or a gap also drops the lease:
//!   nothing is cached again before the primary grants a new one, which
//!   carries the writes still begun.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::api::{
    BookId, InvalidationBatch, LeaseGrant, LookupResponse, SearchResponse, TopicSlug, Version,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Book(BookId),
    Topic(TopicSlug),
}

/// A cached book, with its answer's JSON rendered once, when it is cached:
/// a hit sends those bytes as they are.
#[derive(Debug)]
struct CachedBook {
    value: Arc<LookupResponse>,
    json: Bytes,
}

#[derive(Debug, Default)]
struct Inner {
    books: HashMap<BookId, CachedBook>,
    topics: HashMap<TopicSlug, Arc<SearchResponse>>,
    /// Insertion order, for eviction; may hold keys already removed.
    fifo: VecDeque<Key>,
    /// Lowest version a fill of the book may carry.
    floors: HashMap<BookId, Version>,
    /// Lowest version any fill may carry.
    floor_all: Version,
    /// Bumped by every flush; a fill from an older generation is refused.
    generation: u64,
    lease_until: Option<Instant>,
    epoch: Option<u64>,
    /// Seq of the next invalidation batch expected from the primary.
    expected_seq: u64,
    /// Books with writes begun and not yet ended (count per book).
    pending: HashMap<BookId, u32>,
    /// When `epoch` was learnt from an invalidation batch (a new primary's
    /// fence) rather than from a lease grant.
    fenced_at: Option<Instant>,
}

impl Inner {
    fn flush(&mut self, why: &str) {
        if !self.books.is_empty() || !self.topics.is_empty() {
            tracing::info!(
                entries = self.books.len() + self.topics.len(),
                "cache flushed: {why}"
            );
        }
        self.books.clear();
        self.topics.clear();
        self.fifo.clear();
        self.generation += 1;
    }

    /// Serve nothing cached until the primary grants a new lease.
    fn drop_lease(&mut self) {
        self.lease_until = None;
        self.pending.clear();
    }

    fn lease_valid(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|u| now < u)
    }

    fn floor(&self, id: BookId) -> Version {
        self.floors
            .get(&id)
            .copied()
            .unwrap_or_default()
            .max(self.floor_all)
    }

    fn raise_floor(&mut self, id: BookId, v: Version) {
        let f = self.floors.entry(id).or_default();
        *f = (*f).max(v);
        self.books.remove(&id);
    }

    fn make_room(&mut self, capacity: usize) {
        while self.books.len() + self.topics.len() >= capacity {
            let Some(k) = self.fifo.pop_front() else {
                break;
            };
            match k {
                Key::Book(id) => self.books.remove(&id).map(|_| ()),
                Key::Topic(t) => self.topics.remove(&t).map(|_| ()),
            };
        }
        if self.fifo.len() > 2 * capacity.max(16) {
            let (books, topics) = (&self.books, &self.topics);
            self.fifo.retain(|k| match k {
                Key::Book(id) => books.contains_key(id),
                Key::Topic(t) => topics.contains_key(t),
            });
        }
    }
}

/// Proof that a read started in a given cache generation.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    generation: u64,
    /// The version the read must be at least at.
    pub min_version: Option<Version>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub enabled: bool,
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub lease_valid: bool,
    pub epoch: Option<u64>,
    pub flushes: u64,
}

pub struct Cache {
    enabled: bool,
    capacity: usize,
    /// How long after a fence a grant of an older epoch is still refused:
    /// the replication lease with the drift margin.
    fence_timeout: Duration,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// The recorder's counters of the same, taken once: looking a metric up
    /// by name on every read costs more than the read. (Made after the
    /// node installed its recorder.)
    hits_metric: metrics::Counter,
    misses_metric: metrics::Counter,
}

impl Cache {
    pub fn new(enabled: bool, capacity: usize) -> Self {
        Self {
            enabled,
            capacity: capacity.max(1),
            fence_timeout: Duration::from_millis(550),
            inner: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            hits_metric: metrics::counter!(crate::metrics::CACHE_HITS),
            misses_metric: metrics::counter!(crate::metrics::CACHE_MISSES),
        }
    }

    /// Sets how long a fence holds against grants of an older epoch: the
    /// replication lease with its drift margin (default 550 ms).
    pub fn with_fence_timeout(mut self, d: Duration) -> Self {
        self.fence_timeout = d;
        self
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, hit: bool) {
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
            self.hits_metric.increment(1);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            self.misses_metric.increment(1);
        }
    }

    pub fn lookup(&self, id: BookId) -> Option<Arc<LookupResponse>> {
        self.lookup_at(id, Instant::now())
    }

    /// [`Cache::lookup`] at a given time (the simulator's clocks).
    pub fn lookup_at(&self, id: BookId, now: Instant) -> Option<Arc<LookupResponse>> {
        self.lookup_with(id, now, |b| b.value.clone())
    }

    /// [`Cache::lookup`], as the answer's JSON bytes (what the handler sends).
    pub fn lookup_json(&self, id: BookId) -> Option<Bytes> {
        self.lookup_with(id, Instant::now(), |b| b.json.clone())
    }

    fn lookup_with<T>(
        &self,
        id: BookId,
        now: Instant,
        f: impl FnOnce(&CachedBook) -> T,
    ) -> Option<T> {
        if !self.enabled {
            return None;
        }
        let v = {
            let inner = self.lock();
            if inner.lease_valid(now) {
                inner.books.get(&id).map(f)
            } else {
                None
            }
        };
        self.count(v.is_some());
        v
    }

    pub fn search(&self, topic: &TopicSlug) -> Option<Arc<SearchResponse>> {
        if !self.enabled {
            return None;
        }
        let v = {
            let inner = self.lock();
            if inner.lease_valid(Instant::now()) {
                inner.topics.get(topic).cloned()
            } else {
                None
            }
        };
        self.count(v.is_some());
        v
    }

    /// Call before reading a book from a replica.
    pub fn ticket(&self, id: Option<BookId>) -> Ticket {
        let inner = self.lock();
        let min = id
            .map(|id| inner.floor(id))
            .filter(|v| *v > Version::default());
        Ticket {
            generation: inner.generation,
            min_version: min,
        }
    }

    /// Caches a book read with `ticket`, unless something newer was announced since.
    pub fn fill_book(&self, ticket: Ticket, value: Arc<LookupResponse>) -> bool {
        self.fill_book_at(ticket, value, Instant::now())
    }

    /// [`Cache::fill_book`] at a given time.
    pub fn fill_book_at(&self, ticket: Ticket, value: Arc<LookupResponse>, now: Instant) -> bool {
        if !self.enabled {
            return false;
        }
        // Rendered before taking the lock, as `Json` would render it.
        let Ok(json) = serde_json::to_vec(&*value) else {
            return false;
        };
        let mut inner = self.lock();
        if ticket.generation != inner.generation
            || !inner.lease_valid(now)
            || value.version < inner.floor(value.id)
            || inner.pending.contains_key(&value.id)
        {
            return false;
        }
        inner.make_room(self.capacity);
        inner.fifo.push_back(Key::Book(value.id));
        let json = Bytes::from(json);
        inner.books.insert(value.id, CachedBook { value, json });
        true
    }

    /// Caches a topic's books. An empty answer (an unknown topic) is never
    /// cached: invented topics cannot push real entries out.
    pub fn fill_topic(&self, ticket: Ticket, topic: TopicSlug, value: Arc<SearchResponse>) -> bool {
        if !self.enabled || value.items.is_empty() {
            return false;
        }
        let mut inner = self.lock();
        if ticket.generation != inner.generation || !inner.lease_valid(Instant::now()) {
            return false;
        }
        inner.make_room(self.capacity);
        inner.fifo.push_back(Key::Topic(topic.clone()));
        inner.topics.insert(topic, value);
        true
    }

    /// A batch from the primary's invalidation stream.
    pub fn invalidate(&self, batch: &InvalidationBatch) {
        self.invalidate_at(batch, Instant::now())
    }

    /// [`Cache::invalidate`] at a given time.
    pub fn invalidate_at(&self, batch: &InvalidationBatch, now: Instant) {
        let mut inner = self.lock();
        // Whether this batch is the next one of the stream, so its begins
        // and ends count (otherwise they only drop entries and raise floors).
        let in_order = match inner.epoch {
            Some(e) if batch.epoch < e => return,
            Some(e) if batch.epoch == e => {
                if batch.seq > inner.expected_seq {
                    inner.flush("gap in the invalidation stream");
                    inner.drop_lease();
                    inner.expected_seq = batch.seq + 1;
                    false
                } else if batch.seq < inner.expected_seq {
                    false
                } else {
                    inner.expected_seq = batch.seq + 1;
                    true
                }
            }
            _ => {
                inner.flush("new catalog epoch");
                inner.drop_lease();
                inner.epoch = Some(batch.epoch);
                inner.fenced_at = Some(now);
                inner.expected_seq = batch.seq + 1;
                false
            }
        };
        for it in &batch.items {
            if it.begin {
                inner.books.remove(&it.book_id);
                if in_order {
                    *inner.pending.entry(it.book_id).or_default() += 1;
                }
            } else {
                inner.raise_floor(it.book_id, it.version);
                if in_order && let Some(n) = inner.pending.get_mut(&it.book_id) {
                    *n -= 1;
                    if *n == 0 {
                        inner.pending.remove(&it.book_id);
                    }
                }
            }
        }
    }

    /// This frontend saw a write commit at `version` (read your writes).
    pub fn note_write(&self, id: BookId, version: Version) {
        self.lock().raise_floor(id, version);
    }

    /// The primary granted a lease requested at `sent_at`.
    pub fn renew(&self, sent_at: Instant, grant: &LeaseGrant) {
        self.renew_at(sent_at, grant, Instant::now())
    }

    /// [`Cache::renew`] at a given time.
    pub fn renew_at(&self, sent_at: Instant, grant: &LeaseGrant, now: Instant) {
        let mut inner = self.lock();
        let new_epoch = inner.epoch != Some(grant.epoch);
        if let Some(e) = inner.epoch.filter(|e| *e > grant.epoch) {
            // A deposed primary's grant, refused while the newer epoch may
            // be real. A fence comes from a primary a majority elected, and
            // that majority acknowledges the older primary no more: its
            // lease, hence its grants, end within a lease of the fence. A
            // grant asked for later than that proves no elected primary
            // sent the fence (an epoch made up by a token holder).
            let bogus = inner
                .fenced_at
                .is_some_and(|f| sent_at > f + self.fence_timeout);
            if !bogus {
                return;
            }
            tracing::warn!(
                fenced = e,
                epoch = grant.epoch,
                "ignoring invalidation epoch {e}: the primary of epoch {} still leads",
                grant.epoch
            );
        }
        let flush = if !inner.lease_valid(now) {
            Some("cache lease had lapsed")
        } else if new_epoch {
            Some("new catalog epoch")
        } else {
            None
        };
        if flush.is_some()
            && inner.epoch == Some(grant.epoch)
            && grant.next_seq < inner.expected_seq
        {
            // Granted before batches this cache already took: its `pending`
            // lacks their begins, and those batches will not come again. A
            // later grant will do.
            return;
        }
        if let Some(why) = flush {
            // Invalidations may have been missed: nothing older than what the
            // primary had committed when it granted this lease may be cached,
            // nor any book with a write begun in the batches before the
            // grant's `next_seq`; later batches count on top.
            inner.flush(why);
            inner.floor_all = inner.floor_all.max(grant.version);
            inner.expected_seq = grant.next_seq;
            inner.pending.clear();
            for b in &grant.pending {
                *inner.pending.entry(*b).or_default() += 1;
            }
        }
        // Otherwise the stream is continuous: batches up to `next_seq` are
        // on their way, in order, and count when they arrive.
        inner.epoch = Some(grant.epoch);
        inner.fenced_at = None;
        inner.lease_until = Some(sent_at + Duration::from_millis(grant.lease_ms));
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            enabled: self.enabled,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: inner.books.len() + inner.topics.len(),
            lease_valid: inner.lease_valid(Instant::now()),
            epoch: inner.epoch,
            flushes: inner.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Invalidation, Money};

    fn book(id: u64, stock: u64, v: Version) -> Arc<LookupResponse> {
        Arc::new(LookupResponse {
            id: BookId::new(id).unwrap(),
            title: "t".into(),
            topic: "x".into(),
            cost: Money::from_cents(1).unwrap(),
            stock,
            version: v,
        })
    }

    /// A lease grant with no writes begun.
    fn grant(epoch: u64, next_seq: u64, lease_ms: u64, version: Version) -> LeaseGrant {
        LeaseGrant {
            epoch,
            next_seq,
            lease_ms,
            version,
            pending: vec![],
        }
    }

    fn v(epoch: u64, seq: u64) -> Version {
        Version { epoch, seq }
    }

    fn leased() -> Cache {
        let c = Cache::new(true, 100);
        c.renew(Instant::now(), &grant(1, 0, 60_000, v(1, 0)));
        c
    }

    #[test]
    fn a_fill_older_than_an_invalidation_is_refused() {
        let c = leased();
        let id = BookId::new(1).unwrap();
        let t = c.ticket(Some(id));
        c.invalidate(&InvalidationBatch {
            epoch: 1,
            seq: 0,
            items: vec![Invalidation {
                book_id: id,
                version: v(1, 5),
                begin: false,
            }],
        });
        assert!(!c.fill_book(t, book(1, 10, v(1, 4))), "stale fill accepted");
        assert_eq!(c.ticket(Some(id)).min_version, Some(v(1, 5)));
        assert!(c.fill_book(c.ticket(Some(id)), book(1, 9, v(1, 5))));
        assert_eq!(c.lookup(id).unwrap().stock, 9);
    }

    #[test]
    fn a_hit_sends_the_json_the_value_renders_to() {
        let c = leased();
        let id = BookId::new(1).unwrap();
        assert!(c.lookup_json(id).is_none());
        let value = book(1, 10, v(1, 2));
        assert!(c.fill_book(c.ticket(Some(id)), value.clone()));
        let json = c.lookup_json(id).unwrap();
        assert_eq!(&json[..], serde_json::to_vec(&*value).unwrap());
        let back: LookupResponse = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.stock, 10);
        // A begun write drops the rendered answer with the value.
        c.invalidate(&InvalidationBatch {
            epoch: 1,
            seq: 0,
            items: vec![Invalidation {
                book_id: id,
                version: v(1, 3),
                begin: true,
            }],
        });
        assert!(c.lookup_json(id).is_none());
    }

    #[test]
    fn nothing_is_served_without_a_lease() {
        let c = Cache::new(true, 100);
        let id = BookId::new(1).unwrap();
        assert!(!c.fill_book(c.ticket(Some(id)), book(1, 10, v(1, 1))));
        c.renew(
            Instant::now() - Duration::from_millis(50),
            &grant(1, 0, 10, v(1, 1)),
        );
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(1, 10, v(1, 1))),
            "expired lease"
        );
    }

    #[test]
    fn a_gap_in_the_stream_flushes() {
        let c = leased();
        let id = BookId::new(2).unwrap();
        assert!(c.fill_book(c.ticket(Some(id)), book(2, 10, v(1, 1))));
        c.invalidate(&InvalidationBatch {
            epoch: 1,
            seq: 0,
            items: vec![],
        });
        assert!(c.lookup(id).is_some());
        c.invalidate(&InvalidationBatch {
            epoch: 1,
            seq: 2,
            items: vec![],
        });
        assert!(c.lookup(id).is_none(), "gap must flush");
    }

    #[test]
    fn a_new_epoch_flushes_and_refuses_older_fills() {
        let c = leased();
        let id = BookId::new(3).unwrap();
        let t = c.ticket(Some(id));
        assert!(c.fill_book(t, book(3, 10, v(1, 1))));
        let t = c.ticket(Some(id));
        c.renew(Instant::now(), &grant(2, 0, 60_000, v(2, 1)));
        assert!(c.lookup(id).is_none());
        assert!(
            !c.fill_book(t, book(3, 10, v(1, 1))),
            "fill from before the flush"
        );
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = Cache::new(true, 10);
        c.renew(Instant::now(), &grant(1, 0, 60_000, v(1, 0)));
        for i in 1..=100 {
            c.fill_book(c.ticket(None), book(i, 1, v(1, 1)));
        }
        assert!(c.stats().entries <= 10);
        assert!(
            c.lookup(BookId::new(100).unwrap()).is_some(),
            "newest stays"
        );
    }

    fn batch(epoch: u64, seq: u64, items: &[(u64, bool, Version)]) -> InvalidationBatch {
        InvalidationBatch {
            epoch,
            seq,
            items: items
                .iter()
                .map(|&(id, begin, version)| Invalidation {
                    book_id: BookId::new(id).unwrap(),
                    version,
                    begin,
                })
                .collect(),
        }
    }

    #[test]
    fn a_begun_write_keeps_its_book_out_of_the_cache_until_it_ends() {
        let c = leased();
        let id = BookId::new(4).unwrap();
        assert!(c.fill_book(c.ticket(Some(id)), book(4, 10, v(1, 1))));
        c.invalidate(&batch(1, 0, &[(4, true, v(0, 0))]));
        assert!(
            c.lookup(id).is_none(),
            "a begun write drops the cached value"
        );
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(4, 10, v(1, 1))),
            "no fill while a write is begun"
        );
        c.invalidate(&batch(1, 1, &[(4, false, v(1, 2))]));
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(4, 10, v(1, 1))),
            "a fill older than the write's end"
        );
        assert!(c.fill_book(c.ticket(Some(id)), book(4, 9, v(1, 2))));
        assert_eq!(c.lookup(id).unwrap().stock, 9);
    }

    #[test]
    fn a_lease_granted_while_writes_are_begun_keeps_their_books_out() {
        let c = Cache::new(true, 100);
        let id = BookId::new(5).unwrap();
        let grant = LeaseGrant {
            epoch: 1,
            next_seq: 3,
            lease_ms: 60_000,
            version: v(1, 1),
            pending: vec![id],
        };
        c.renew(Instant::now(), &grant);
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(5, 10, v(1, 1))),
            "begun before the grant"
        );
        // A batch from before the grant changes no count…
        c.invalidate(&batch(1, 2, &[(5, false, v(1, 1))]));
        assert!(!c.fill_book(c.ticket(Some(id)), book(5, 10, v(1, 1))));
        // …the write's end, after it, does.
        c.invalidate(&batch(1, 3, &[(5, false, v(1, 2))]));
        assert!(c.fill_book(c.ticket(Some(id)), book(5, 9, v(1, 2))));
    }

    #[test]
    fn a_new_epochs_first_batch_drops_the_lease_until_the_new_primary_grants_one() {
        let c = leased();
        let id = BookId::new(6).unwrap();
        assert!(c.fill_book(c.ticket(Some(id)), book(6, 10, v(1, 1))));
        c.invalidate(&batch(2, 0, &[]));
        assert!(c.lookup(id).is_none());
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(6, 10, v(1, 1))),
            "no lease after the fence"
        );
        // A late grant of the old primary does not bring the lease back.
        c.renew(Instant::now(), &grant(1, 5, 60_000, v(1, 1)));
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(6, 10, v(1, 1))),
            "an old epoch's grant"
        );
        c.renew(Instant::now(), &grant(2, 1, 60_000, v(2, 3)));
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(6, 10, v(1, 1))),
            "below the new primary's version"
        );
        assert!(c.fill_book(c.ticket(Some(id)), book(6, 10, v(2, 3))));
    }

    #[test]
    fn unknown_topics_are_not_cached_and_cannot_push_real_entries_out() {
        let c = Cache::new(true, 10);
        c.renew(Instant::now(), &grant(1, 0, 60_000, v(1, 0)));
        let real = TopicSlug::parse("distributed-systems").unwrap();
        let mut items = std::collections::BTreeMap::new();
        items.insert("RPCs for Dummies.".to_string(), BookId::new(2).unwrap());
        assert!(c.fill_topic(
            c.ticket(None),
            real.clone(),
            Arc::new(SearchResponse { items })
        ));
        for i in 0..1000 {
            let invented = TopicSlug::parse(&format!("invented-{i}")).unwrap();
            assert!(!c.fill_topic(
                c.ticket(None),
                invented,
                Arc::new(SearchResponse {
                    items: Default::default()
                })
            ));
        }
        assert!(
            c.search(&real).is_some(),
            "a flood of invented topics pushed the real one out"
        );
        assert_eq!(c.stats().entries, 1);
    }

    #[test]
    fn a_grant_older_than_the_batches_taken_since_the_lease_lapsed_is_refused() {
        let c = Cache::new(true, 100);
        c.renew(Instant::now(), &grant(1, 0, 60_000, v(1, 0)));
        // The lease lapses (a gap drops it), then a write begins on book 1.
        c.invalidate(&batch(1, 5, &[]));
        c.invalidate(&batch(1, 6, &[(1, true, Version::default())]));
        // A grant asked for before batch 6 started (it does not list the
        // write begun in it) arrives only now.
        let mut g = grant(1, 6, 60_000, v(1, 3));
        g.pending.clear();
        c.renew(Instant::now(), &g);
        let t = c.ticket(Some(BookId::new(1).unwrap()));
        assert!(
            !c.fill_book(t, book(1, 5, v(1, 3))),
            "a book with a write begun is not cached on the word of an older grant"
        );
        // A grant that knows the stream as far as this cache does is taken.
        let mut g = grant(1, 7, 60_000, v(1, 3));
        g.pending = vec![BookId::new(1).unwrap()];
        c.renew(Instant::now(), &g);
        let t = c.ticket(Some(BookId::new(2).unwrap()));
        assert!(c.fill_book(t, book(2, 5, v(1, 3))));
        let t = c.ticket(Some(BookId::new(1).unwrap()));
        assert!(!c.fill_book(t, book(1, 5, v(1, 3))), "still begun");
    }

    #[test]
    fn a_made_up_epoch_switches_the_cache_off_only_until_the_real_primary_outlives_it() {
        let c = leased().with_fence_timeout(Duration::from_millis(550));
        let id = BookId::new(7).unwrap();
        let grant = grant(1, 9, 60_000, v(1, 3));
        c.invalidate(&batch(999, 0, &[]));
        // Right after the fence, the older primary's grant is refused: the
        // fence may come from a primary just elected.
        c.renew(Instant::now(), &grant);
        assert!(
            !c.fill_book(c.ticket(Some(id)), book(7, 1, v(1, 3))),
            "a grant of the old epoch right after a fence"
        );
        // One asked for a lease (with drift) later: no elected primary sent it.
        c.renew(Instant::now() + Duration::from_millis(600), &grant);
        assert!(
            c.fill_book(c.ticket(Some(id)), book(7, 1, v(1, 3))),
            "the cache stays off"
        );
    }
}
