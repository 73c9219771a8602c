//! The thin driver of a catalog replica: one OS thread owns the replication
//! core ([`Replica`]) and the disk ([`Db`]). It feeds the core ticks,
//! messages and writes; persists what the core asks (before sending
//! anything that depends on it); sends the core's messages; applies
//! committed entries; answers the writes they complete; and publishes what
//! readers need (the applied state and how long this replica may serve
//! reads) so reads never wait for the thread.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::machine;
use super::store::{self, Db, State};
use crate::api::*;
use crate::replication::drive::{self, Host};
use crate::replication::{self, Message, NodeId, ProposeError, ReadGate, Replica, Role};

/// Why a write was not done.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("no book with id {0}")]
    UnknownBook(BookId),
    #[error("this replica is not the primary")]
    NotPrimary { primary: Option<NodeId> },
    /// Retry, with the same request id (here later, or at another replica).
    #[error("{0}")]
    Unavailable(String),
    /// The request id's answer window passed before its write applied: the
    /// write was refused, and the same id will be refused again.
    #[error(
        "request id {0} expired before its write was applied; it was not applied now (an earlier attempt may have been)"
    )]
    Expired(String),
}

impl WriteError {
    /// The write's begin went to the caches in another epoch (or not at
    /// all): proposing it now could expose it past a cache.
    fn epoch_changed() -> Self {
        WriteError::Unavailable("primaryship changed; retry with the same request id".into())
    }
}

/// How long the answers of request ids are kept (see
/// [`machine::Stamped`]): the primary stamps each entry with them.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub minted_id_ttl_ms: u64,
    pub idempotency_key_ttl_ms: u64,
}

impl Retention {
    /// Until when (Unix ms) the answer of `request_id`, applied at `at`, is kept.
    pub fn until(&self, request_id: &RequestId, at: u64) -> u64 {
        match request_id.minted_at() {
            Some(minted) => minted.saturating_add(self.minted_id_ttl_ms),
            None => at.saturating_add(self.idempotency_key_ttl_ms),
        }
    }
}

pub enum Input {
    Net {
        from: NodeId,
        msg: Message,
    },
    /// `epoch`: the epoch whose caches were told a write begins (see
    /// `invalidation`); a write is proposed only in that epoch.
    /// `ticket`: propose it held ([`Replica::propose_held`]) until
    /// [`Input::Begun`] with this ticket.
    Write {
        write: CatalogWrite,
        epoch: Option<u64>,
        ticket: Option<u64>,
        reply: oneshot::Sender<Result<WriteResult, WriteError>>,
        /// Told the version of the write's entry once it commits, before
        /// the step that applies it: its end may leave for the caches
        /// while the primary applies (see [`Io::tell_committed`]).
        committed: oneshot::Sender<Version>,
    },
    /// Every cache has the begin of the write proposed with `ticket`: it
    /// may commit (nothing to do if it was not proposed held).
    Begun {
        ticket: u64,
    },
    /// Every frontend cache was fenced for this epoch.
    CachesFenced {
        epoch: u64,
    },
    Status {
        reply: oneshot::Sender<replication::Status>,
    },
    /// Writes and releases handed over together, taken in one step.
    Batch(Vec<Input>),
}

/// What readers see, published by the driver after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gate {
    /// Reads may be served until this instant (driver clock, ms); `None`: not now.
    pub serve_until: Option<u64>,
    pub role: Option<Role>,
    pub epoch: u64,
    pub primary: Option<NodeId>,
    /// This replica is a primary that may answer writes (epoch start
    /// committed, old leases run out).
    pub primary_ready: bool,
    /// What a read arriving now must wait to have applied
    /// ([`Replica::read_index`]).
    pub read_index: u64,
}

/// The driver's clock: milliseconds since the process started it.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Clock(Instant::now())
    }
    pub fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What the driver thread publishes for the HTTP handlers: the applied
/// state, the read gate's inputs, the clock both count leases on.
pub struct Published {
    pub state: RwLock<Arc<State>>,
    /// Changes on almost every step (the lease's end, the read index): read
    /// it, do not wait on it (each wait is a wake of the runtime's thread
    /// from the driver's, on every step).
    pub gate: watch::Sender<Gate>,
    /// The role and epoch, from the gate: changes only when the
    /// primaryship does. What the cache invalidator waits on.
    pub primaryship: watch::Sender<(Option<Role>, u64)>,
    pub applied: watch::Sender<Version>,
    pub clock: Clock,
    /// The latest state digests (see [`store::DIGEST_EVERY`]), oldest first.
    pub digests: std::sync::Mutex<std::collections::VecDeque<(Version, u64)>>,
}

/// Damage found in a replica's data while running: stop serving at once,
/// say so, and start again (the same process id) so the next start sets
/// the database aside and rebuilds it from the primary as a learner.
pub fn rebuild(dir: &std::path::Path, damage: &str) -> ! {
    tracing::error!(
        data_dir = %dir.display(),
        "DAMAGED DATA: {damage}. This replica stops serving now and restarts to rebuild its data from the primary as a learner"
    );
    if let Err(e) = crate::storage::mark_damaged(dir, damage) {
        tracing::error!(error = %e, "cannot record the damage; stopping");
        std::process::exit(70);
    }
    let e = crate::storage::restart_process();
    tracing::error!(error = %e, "cannot restart; stopping");
    std::process::exit(70)
}

/// How many recent state digests a replica keeps for its peers to compare.
pub const DIGESTS_KEPT: usize = 32;

impl Published {
    pub fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this replica may serve reads now (it holds a lease).
    pub fn may_serve(&self) -> bool {
        let g = *self.gate.borrow();
        g.serve_until
            .is_some_and(|until| self.clock.now_ms() < until)
    }

    /// The applied position a read arriving now must be served at: at least
    /// `min` (what the reader already saw) and at least the read index, so
    /// the read shows every write committed anywhere before it arrived.
    /// Taken once, when the read arrives.
    pub fn read_target(&self, min: Version) -> u64 {
        min.seq.max(self.gate.borrow().read_index)
    }

    /// May this replica serve a read at applied position `target` now?
    pub fn admit(&self, target: u64) -> ReadGate {
        if !self.may_serve() {
            ReadGate::Refuse
        } else if self.applied.borrow().seq >= target {
            ReadGate::Serve
        } else {
            ReadGate::NotYet
        }
    }
}

struct Waiter {
    request_id: String,
    reply: oneshot::Sender<Result<WriteResult, WriteError>>,
    committed: Option<oneshot::Sender<Version>>,
}

/// A write waiting for the writes in flight to be answered.
struct Queued {
    request_id: String,
    op: Vec<u8>,
    /// The epoch the caches were told of it in.
    epoch: Option<u64>,
    ticket: Option<u64>,
    /// Every cache has its begin already: proposed without holding.
    begun: bool,
    /// The write and its retries that came meanwhile.
    waiters: Vec<Waiter>,
}

/// What the driver does with the core's outputs ([`drive::Host`]): the
/// disk, the published state, the network, the waiting clients.
struct Io {
    db: Db,
    state: State,
    shared: Arc<Published>,
    outbox: mpsc::UnboundedSender<(NodeId, Message)>,
    /// The answers of a step's applied writes go to their waiters together.
    answers: crate::batch::Answers<Result<WriteResult, WriteError>>,
    /// So do the commits of a step's writes, before it applies them.
    commits: crate::batch::Answers<Version>,
    /// Writes proposed here, by the seq their entry got.
    pending: HashMap<u64, Vec<Waiter>>,
    /// Request ids in flight → their seq, so a retry joins the first proposal.
    in_flight: HashMap<String, u64>,
    /// Writes proposed held, by ticket, until their begins reached the caches.
    held: HashMap<u64, replication::Version>,
    /// Writes that came while earlier ones were in flight, proposed together
    /// once those are answered (see [`Driver::propose_queued`]).
    queued: Vec<Queued>,
    names: HashMap<NodeId, String>,
    /// Persisting one step for longer than this is logged as a slow disk.
    slow: Duration,
    /// The applied state changed since it was last published.
    dirty: bool,
    /// No write of this replica's was in flight when the driver began to
    /// take the inputs it is taking now: every write among them is
    /// proposed at once, in one step (see [`Driver::propose_queued`]).
    open: bool,
    /// A snapshot being built beside the driver, and when it began.
    snapshot: Option<(Instant, std::sync::mpsc::Receiver<SnapshotBuilt>)>,
    /// The snapshot last sent to each replica, for the log (see `send`).
    sync_logged: HashMap<NodeId, SyncLogged>,
}

/// How often a snapshot sent again and again to a replica that does not
/// answer is said at `info`.
const SYNC_LOG_EVERY: Duration = Duration::from_secs(10);

/// The snapshot last sent to one replica: its version, when that was last
/// said at `info`, and how many times it was sent again since.
struct SyncLogged {
    version: replication::Version,
    at: Instant,
    resent: u32,
}

/// What a snapshot thread sends back: the version the bytes are of, and
/// the bytes with the number of answers in them.
type SnapshotBuilt = (Version, rusqlite::Result<(Vec<u8>, u64)>);

pub struct Driver {
    replica: Replica,
    io: Io,
    inputs: std::sync::mpsc::Receiver<Input>,
    tick: Duration,
    last_status: Option<replication::Status>,
    /// Following a new primary since this applied version: log when caught up.
    syncing: Option<Version>,
    /// The books this replica founds a new cluster with, as primary of an
    /// empty catalog; and the epoch it proposed them in.
    seed: Vec<Book>,
    seed_proposed: Option<u64>,
    retention: Retention,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        replica: Replica,
        db: Db,
        state: State,
        shared: Arc<Published>,
        inputs: std::sync::mpsc::Receiver<Input>,
        outbox: mpsc::UnboundedSender<(NodeId, Message)>,
        names: HashMap<NodeId, String>,
        tick: Duration,
        seed: Vec<Book>,
        retention: Retention,
    ) -> Self {
        let slow = Duration::from_millis(replica.config().lease_ms / 8);
        Self {
            replica,
            io: Io {
                db,
                state,
                shared,
                outbox,
                answers: crate::batch::Answers::spawn(),
                commits: crate::batch::Answers::spawn(),
                pending: HashMap::new(),
                in_flight: HashMap::new(),
                held: HashMap::new(),
                queued: Vec::new(),
                names,
                slow,
                dirty: false,
                open: false,
                snapshot: None,
                sync_logged: HashMap::new(),
            },
            inputs,
            tick,
            last_status: None,
            syncing: None,
            seed,
            seed_proposed: None,
            retention,
        }
    }

    fn name(&self, id: NodeId) -> String {
        self.io.name(id)
    }

    /// Runs until every sender of inputs is gone.
    pub fn run(mut self) {
        let mut next_tick = Instant::now();
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.inputs.recv_timeout(timeout) {
                Ok(input) => {
                    // Whether the writes taken now may go at once (see
                    // `Io::open`).
                    self.io.open = self.io.pending.is_empty();
                    self.input(input);
                    // Take everything already waiting: one fsync for all of it.
                    for _ in 0..4096 {
                        match self.inputs.try_recv() {
                            Ok(i) => self.input(i),
                            Err(_) => break,
                        }
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.replica.tick(self.io.shared.clock.now_ms());
                self.maybe_seed();
                next_tick = Instant::now() + self.tick;
            }
            if let Err(e) = self.advance() {
                if let Some(damage) = crate::storage::Damaged::find(&e) {
                    self.io.damaged(&damage);
                }
                // The disk failed: nothing more can be made durable. Stop
                // rather than acknowledge what is not on disk.
                tracing::error!(error = %e, "catalog storage failed; stopping this replica");
                std::process::exit(70);
            }
        }
        // A snapshot still being read holds a second connection to the
        // database: let it finish, so this one closes last and SQLite
        // removes its write-ahead log (a clean stop).
        if let Some((_, rx)) = self.io.snapshot.take() {
            let _ = rx.recv();
        }
    }

    fn input(&mut self, input: Input) {
        let now = self.io.shared.clock.now_ms();
        match input {
            Input::Net { from, msg } => self.replica.step(now, from, msg),
            Input::Status { reply } => {
                let _ = reply.send(self.replica.status());
            }
            Input::Write {
                write,
                epoch,
                ticket,
                reply,
                committed,
            } => self.write(now, write, epoch, ticket, reply, committed),
            Input::Begun { ticket } => {
                if let Some(v) = self.io.held.remove(&ticket) {
                    self.replica.release(v);
                } else if let Some(q) = self.io.queued.iter_mut().find(|q| q.ticket == Some(ticket))
                {
                    q.begun = true;
                }
            }
            Input::CachesFenced { epoch } => self.replica.caches_fenced(epoch),
            Input::Batch(inputs) => {
                for i in inputs {
                    self.input(i);
                }
            }
        }
    }

    fn write(
        &mut self,
        now: u64,
        write: CatalogWrite,
        epoch: Option<u64>,
        ticket: Option<u64>,
        reply: oneshot::Sender<Result<WriteResult, WriteError>>,
        committed: oneshot::Sender<Version>,
    ) {
        let id = write.op.book_id();
        let rid = write.request_id.as_str().to_string();
        let at = unix_ms();
        let until = self.retention.until(&write.request_id, at);
        // Only the primary knows the catalog for sure: a replica that is
        // behind (a new disk, say) may not hold the book yet.
        if self.replica.role() != Role::Primary {
            let _ = reply.send(Err(WriteError::NotPrimary {
                primary: self.replica.status().primary,
            }));
            return;
        }
        if !self.io.state.books.contains_key(&id) {
            let _ = reply.send(Err(WriteError::UnknownBook(id)));
            return;
        }
        if self.replica.is_primary_ready() {
            match self.io.db.applied_result(&rid) {
                Ok(Some(first)) => {
                    let _ = reply.send(Ok(first));
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(damage) = crate::storage::Damaged::find(&e) {
                        drop(reply);
                        self.io.damaged(&damage);
                    }
                    let _ = reply.send(Err(WriteError::Unavailable(format!("storage: {e}"))));
                    return;
                }
            }
        }
        if epoch != Some(self.replica.epoch()) {
            let _ = reply.send(Err(WriteError::epoch_changed()));
            return;
        }
        if let Some(seq) = self.io.in_flight.get(&rid) {
            self.io.pending.entry(*seq).or_default().push(Waiter {
                request_id: rid,
                reply,
                committed: Some(committed),
            });
            return;
        }
        if let Some(q) = self.io.queued.iter_mut().find(|q| q.request_id == rid) {
            q.waiters.push(Waiter {
                request_id: rid,
                reply,
                committed: Some(committed),
            });
            return;
        }
        if until <= at.max(self.io.state.clock) {
            tracing::warn!(
                request_id = %rid,
                "refused a write whose request id's answer window had passed: a retry that arrived too late, or, if this repeats for fresh writes, the clock of the node that minted the id runs behind this one's (nodes' clocks must agree within the minted id window less the retry budget)"
            );
            let _ = reply.send(Err(WriteError::Expired(rid)));
            return;
        }
        let op = machine::Command::from(write.op).encode_stamped(at, until);
        if !self.io.open
            && !self.io.pending.is_empty()
            && self.io.queued.len() < self.replica.config().max_batch
        {
            self.io.queued.push(Queued {
                request_id: rid.clone(),
                op,
                epoch,
                ticket,
                begun: false,
                waiters: vec![Waiter {
                    request_id: rid,
                    reply,
                    committed: Some(committed),
                }],
            });
            return;
        }
        let waiters = vec![Waiter {
            request_id: rid.clone(),
            reply,
            committed: Some(committed),
        }];
        self.propose(now, rid, op, ticket, waiters);
    }

    /// Proposes one write, held under `ticket` (if any) until every cache
    /// has its begin; `waiters` are answered when it is applied.
    fn propose(
        &mut self,
        now: u64,
        rid: String,
        op: Vec<u8>,
        ticket: Option<u64>,
        waiters: Vec<Waiter>,
    ) {
        let proposed = match ticket {
            Some(_) => self.replica.propose_held(now, rid.clone(), op),
            None => self.replica.propose(now, rid.clone(), op),
        };
        match proposed {
            Ok(v) => {
                if let Some(t) = ticket {
                    self.io.held.insert(t, v);
                }
                self.io.in_flight.insert(rid, v.seq);
                self.io.pending.entry(v.seq).or_default().extend(waiters);
            }
            Err(e) => {
                let err = match e {
                    ProposeError::NotPrimary { primary } => WriteError::NotPrimary { primary },
                    e => WriteError::Unavailable(e.to_string()),
                };
                for w in waiters {
                    let _ = w.reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// Under load, writes that come while earlier ones are in flight wait
    /// for those to be answered, then go together: one entry each, in one
    /// step, so one append to each backup, one fsync on each replica and
    /// one commit carry them all, where each would have cost its own. A
    /// write that finds none in flight is proposed at once, so one alone
    /// waits no longer; and so is every write taken with it, in the same
    /// step (the writes of a batch arrive together, see
    /// `Catalog::send_soon`): "in flight" is read when the driver begins
    /// to take its inputs ([`Io::open`]). Called after each step; proposes
    /// only when nothing is in flight. Whether each may still be proposed
    /// is checked again: the primaryship may have changed while it waited.
    fn propose_queued(&mut self, now: u64) -> bool {
        if self.io.queued.is_empty() || !self.io.pending.is_empty() {
            return false;
        }
        let epoch = self.replica.epoch();
        let primary = self.replica.role() == Role::Primary;
        crate::metrics::write_group(self.io.queued.len());
        for q in std::mem::take(&mut self.io.queued) {
            if !primary {
                let primary = self.replica.status().primary;
                for w in q.waiters {
                    let _ = w.reply.send(Err(WriteError::NotPrimary { primary }));
                }
            } else if q.epoch != Some(epoch) {
                for w in q.waiters {
                    let _ = w.reply.send(Err(WriteError::epoch_changed()));
                }
            } else {
                let hold = if q.begun { None } else { q.ticket };
                self.propose(now, q.request_id, q.op, hold, q.waiters);
            }
        }
        true
    }

    /// A ready primary of an empty catalog (a new cluster) proposes its books
    /// as the log's seed entry, once per epoch: every replica gets the
    /// catalog from the log, whatever catalog file it was given.
    fn maybe_seed(&mut self) {
        let epoch = self.replica.epoch();
        if !self.io.state.books.is_empty()
            || !self.replica.is_primary_ready()
            || self.seed_proposed == Some(epoch)
        {
            return;
        }
        let cmd = machine::Command::Seed {
            books: self.seed.clone(),
        };
        if self
            .replica
            .propose(
                self.io.shared.clock.now_ms(),
                machine::SEED_REQUEST_ID.into(),
                cmd.encode(),
            )
            .is_ok()
        {
            self.seed_proposed = Some(epoch);
            tracing::info!(
                books = self.seed.len(),
                "new cluster: proposing the founding catalog"
            );
        }
    }

    /// Persist, publish, send, answer (see [`drive::advance`]).
    fn advance(&mut self) -> rusqlite::Result<()> {
        self.finish_snapshot()?;
        drive::advance(&mut self.replica, &mut self.io)?;
        self.fail_unless_primary();
        if self.propose_queued(self.io.shared.clock.now_ms()) {
            drive::advance(&mut self.replica, &mut self.io)?;
            self.fail_unless_primary();
        }
        self.log_changes();
        Ok(())
    }

    /// A replica that is not (or no longer) primary answers the writes it
    /// proposed with the primary it knows, and holds nothing.
    fn fail_unless_primary(&mut self) {
        if self.replica.role() != Role::Primary && !self.io.pending.is_empty() {
            let primary = self.replica.status().primary;
            for (_, ws) in self.io.pending.drain() {
                for w in ws {
                    let _ = w.reply.send(Err(WriteError::NotPrimary { primary }));
                }
            }
            self.io.in_flight.clear();
        }
        if self.replica.role() != Role::Primary {
            // A later primaryship holds nothing: its writes' begins are new.
            self.io.held.clear();
        }
    }

    /// Hands a snapshot built beside the driver to the core, which compacts
    /// its log up to it, and stores it.
    fn finish_snapshot(&mut self) -> rusqlite::Result<()> {
        let Some((started, rx)) = &self.io.snapshot else {
            return Ok(());
        };
        let (version, built) = match rx.try_recv() {
            Ok(b) => b,
            Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                tracing::warn!(
                    "the snapshot thread stopped without a snapshot; the next step asks again"
                );
                self.io.snapshot = None;
                return Ok(());
            }
        };
        let started = *started;
        self.io.snapshot = None;
        let (data, answers) = built?;
        let (built_in, bytes) = (started.elapsed(), data.len());
        let storing = Instant::now();
        drive::snapshot_built(
            &mut self.replica,
            &mut self.io,
            store::to_core(version),
            data,
        )?;
        self.io
            .snapshot_built(version, answers, bytes, built_in, Some(storing.elapsed()));
        Ok(())
    }

    /// One readable line per fault-tolerance event.
    fn log_changes(&mut self) {
        let now = self.replica.status();
        crate::metrics::replication(&now);
        let Some(before) = self.last_status.replace(now.clone()) else {
            tracing::info!(epoch = now.epoch, role = ?now.role, learner = now.learner, "replica started");
            return;
        };
        if now.epoch != before.epoch && now.role == Role::Candidate {
            metrics::counter!(crate::metrics::REPL_ELECTIONS).increment(1);
            tracing::info!(
                epoch = now.epoch,
                "election started for epoch {}",
                now.epoch
            );
        }
        if now.role != before.role || now.primary != before.primary {
            match (now.role, now.primary) {
                (Role::Primary, _) => tracing::info!(
                    epoch = now.epoch,
                    "election won: primary for epoch {}",
                    now.epoch
                ),
                (_, Some(p)) if Some(p) != before.primary => {
                    tracing::info!(epoch = now.epoch, primary = %self.name(p), "following primary {} in epoch {}", self.name(p), now.epoch);
                    self.syncing = Some(store::to_api(now.applied));
                }
                (_, None) if before.primary.is_some() => tracing::info!(
                    epoch = now.epoch,
                    "primary {} lost; no primary known",
                    before.primary.map(|p| self.name(p)).unwrap_or_default()
                ),
                _ => {}
            }
        }
        if now.view != before.view && now.role == Role::Primary {
            let names: Vec<String> = now.view.iter().map(|i| self.name(*i)).collect();
            for gone in before.view.iter().filter(|i| !now.view.contains(i)) {
                tracing::info!(replica = %self.name(*gone), "peer {} detected down or lagging: dropped from the view", self.name(*gone));
            }
            tracing::info!(epoch = now.epoch, view = ?names, "new view announced: {}", names.join(", "));
        }
        if let Some(from) = self.syncing
            && now.role == Role::Follower
            && now.applied >= now.commit
            && now.commit.seq > 0
        {
            self.syncing = None;
            let to = store::to_api(now.applied);
            if to != from {
                tracing::info!(from = %from, to = %to, "sync received from {}: applied {from} → {to}", now.primary.map(|p| self.name(p)).unwrap_or_default());
            } else {
                tracing::info!(at = %to, "in sync with {} at {to}", now.primary.map(|p| self.name(p)).unwrap_or_default());
            }
        }
        if now.learner != before.learner && !now.learner {
            tracing::info!("caught up: this replica (new data directory) is a voter again");
        }
        if now.transferring_to != before.transferring_to
            && let Some(t) = now.transferring_to
        {
            tracing::info!(to = %self.name(t), "takeover: handing primaryship to recovered higher-id replica {}", self.name(t));
        }
    }
}

impl Io {
    /// Damage found in this replica's data while running: stop serving at
    /// once, say so, and start again (the same process id) so the next
    /// start sets the database aside and rebuilds it from the primary.
    fn damaged(&self, damage: &str) -> ! {
        rebuild(self.db.dir(), damage)
    }

    /// Tells the writes that `rd` commits their entry's version, before the
    /// step applies them: each write's end may leave for the caches now,
    /// beside the apply, where it waited for it. The end lets a cache fill
    /// the book from reads at that version or later, and every read waits
    /// until its replica has applied as far as it asks; a lease granted
    /// once the end is counted carries the end's version as its floor
    /// (`invalidation::LinkState`), though the primary has not applied it
    /// yet. Only a waiter whose request id the entry carries is told: an
    /// entry replaced in a view change is not its write.
    fn tell_committed(&mut self, rd: &replication::Ready) {
        let mut commits = Vec::new();
        for e in &rd.committed {
            let Some(waiters) = self.pending.get_mut(&e.version.seq) else {
                continue;
            };
            for w in waiters.iter_mut().filter(|w| w.request_id == e.request_id) {
                if let Some(to) = w.committed.take() {
                    commits.push((to, store::to_api(e.version)));
                }
            }
        }
        self.commits.send(commits);
    }

    fn name(&self, id: NodeId) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("replica {id}"))
    }

    /// Logs a snapshot taken: built in `built` (beside the driver unless
    /// `stored` is `None`), kept in `stored` on the driver's thread.
    fn snapshot_built(
        &self,
        version: Version,
        answers: u64,
        bytes: usize,
        built: Duration,
        stored: Option<Duration>,
    ) {
        let stored_ms = stored.map(|d| d.as_millis() as u64);
        tracing::info!(
            version = %version,
            answers,
            bytes,
            built_ms = built.as_millis() as u64,
            stored_ms,
            "snapshot taken: {answers} answers, {} KB, built {} in {} ms{}",
            bytes / 1024,
            if stored.is_some() { "beside the driver" } else { "on the driver's thread" },
            built.as_millis(),
            stored_ms.map_or(String::new(), |ms| format!(", stored in {ms} ms")),
        );
        metrics::gauge!(crate::metrics::CATALOG_SNAPSHOT_BYTES).set(bytes as f64);
        metrics::gauge!(crate::metrics::CATALOG_SNAPSHOT_ANSWERS).set(answers as f64);
    }
}

impl Host for Io {
    type Applied = store::AppliedEntry;
    type Error = rusqlite::Error;

    /// Persists and applies in one SQLite transaction: one fsync for
    /// everything that queued up meanwhile (group commit).
    fn persist_and_apply(
        &mut self,
        rd: &replication::Ready,
    ) -> rusqlite::Result<Vec<store::AppliedEntry>> {
        if let Some(s) = &rd.snapshot_to_install {
            tracing::info!(version = %store::to_api(s.version), bytes = s.data.len(), "sync received: installing the primary's snapshot");
            metrics::gauge!(crate::metrics::CATALOG_SNAPSHOT_BYTES).set(s.data.len() as f64);
        }
        self.tell_committed(rd);
        let started = Instant::now();
        let applied = self.db.handle(rd, &mut self.state)?;
        if !self.db.checkpoints.is_empty() {
            let mut d = self
                .shared
                .digests
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for c in self.db.checkpoints.drain(..) {
                d.push_back(c);
            }
            while d.len() > DIGESTS_KEPT {
                d.pop_front();
            }
        }
        let took = started.elapsed();
        metrics::histogram!(crate::metrics::CATALOG_PERSIST).record(took.as_secs_f64());
        if took > self.slow {
            tracing::warn!(
                ms = took.as_millis() as u64,
                "slow disk: persisting one step took {} ms",
                took.as_millis()
            );
        }
        self.dirty |= !applied.is_empty() || rd.snapshot_to_install.is_some();
        if let Some(v) = rd.compacted {
            tracing::info!(
                version = %store::to_api(v),
                answers = self.state.answers,
                "log compacted: its tables are the snapshot (bytes are built only for a replica that lags)"
            );
        }
        Ok(applied)
    }

    fn publish(&mut self, replica: &Replica) {
        if std::mem::take(&mut self.dirty) {
            metrics::gauge!(crate::metrics::CATALOG_ANSWERS_KEPT).set(self.state.answers as f64);
            *self.shared.state.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(self.state.clone());
            self.shared.applied.send_replace(self.state.version);
        }
        let now = self.shared.clock.now_ms();
        let st = replica.status();
        let gate = Gate {
            serve_until: replica.serve_until(now),
            role: Some(st.role),
            epoch: st.epoch,
            primary: st.primary,
            primary_ready: replica.is_primary_ready(),
            read_index: replica.read_index(),
        };
        self.shared.gate.send_if_modified(|g| {
            let changed = *g != gate;
            *g = gate;
            changed
        });
        let primaryship = (gate.role, gate.epoch);
        self.shared.primaryship.send_if_modified(|p| {
            let changed = *p != primaryship;
            *p = primaryship;
            changed
        });
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        if let replication::Body::SnapshotChunk(replication::SnapshotChunk {
            offset: 0,
            total,
            version,
            ..
        }) = &msg.body
        {
            // The core sends the first chunk again until the replica
            // answers, every few heartbeats: to one that went down after it
            // was last heard from, until the next compaction drops the
            // bytes (the core then asks it whether it is back instead).
            // Said once per snapshot and replica, then every SYNC_LOG_EVERY
            // with the count.
            let now = Instant::now();
            let (total, version) = (*total, *version);
            let name = self.name(to);
            match self.sync_logged.get_mut(&to) {
                Some(l) if l.version == version && now < l.at + SYNC_LOG_EVERY => {
                    l.resent += 1;
                    tracing::debug!(to = %name, bytes = total, "sync sent again: snapshot (first chunk)");
                }
                Some(l) if l.version == version => {
                    let resent = std::mem::take(&mut l.resent) + 1;
                    l.at = now;
                    tracing::info!(to = %name, bytes = total, resent, "sync still unanswered: snapshot (first chunk) sent {resent} more times in {SYNC_LOG_EVERY:?} (is the replica down?)");
                }
                _ => {
                    self.sync_logged.insert(
                        to,
                        SyncLogged {
                            version,
                            at: now,
                            resent: 0,
                        },
                    );
                    tracing::info!(to = %name, bytes = total, "sync sent: snapshot to a replica too far behind (first chunk)");
                }
            }
        }
        let _ = self.outbox.send((to, msg));
    }

    fn answer(&mut self, applied: Vec<store::AppliedEntry>) {
        let mut answers = Vec::new();
        for a in applied {
            let Some(waiters) = self.pending.remove(&a.version.seq) else {
                continue;
            };
            self.in_flight.retain(|_, s| *s != a.version.seq);
            for w in waiters {
                let r = match (&a.outcome, w.request_id == a.request_id) {
                    (machine::Applied::Answered(o, first), true) => Ok(WriteResult {
                        outcome: o.clone(),
                        version: *first,
                    }),
                    (machine::Applied::Expired, true) => Err(WriteError::Expired(w.request_id)),
                    // The entry this write had was replaced in a view change.
                    _ => Err(WriteError::Unavailable(
                        "the write was superseded; retry with the same request id".into(),
                    )),
                };
                answers.push((w.reply, r));
            }
        }
        self.answers.send(answers);
    }

    /// Begins a snapshot of the applied state and builds its bytes on a
    /// thread of its own: with many answers kept (after heavy load, tens of
    /// thousands) building takes 100–200 ms, and writes would wait that
    /// long on this thread. [`Driver::finish_snapshot`] hands them over.
    fn take_snapshot(&mut self) -> rusqlite::Result<Option<(replication::Version, Vec<u8>)>> {
        if self.snapshot.is_some() {
            return Ok(None);
        }
        let read = self.db.begin_snapshot(&self.state)?;
        let version = read.version();
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("catalog-snapshot".into())
            .spawn(move || {
                let _ = tx.send((version, read.bytes()));
            });
        match spawned {
            Ok(_) => {
                self.snapshot = Some((Instant::now(), rx));
                Ok(None)
            }
            Err(e) => {
                // No thread to spare: build it here, as before.
                tracing::warn!(error = %e, "no thread for the snapshot; building it on the driver's");
                let started = Instant::now();
                let (data, answers) = self.db.snapshot_bytes(&self.state)?;
                let built = started.elapsed();
                self.snapshot_built(self.state.version, answers, data.len(), built, None);
                Ok(Some((store::to_core(self.state.version), data)))
            }
        }
    }

    fn store_snapshot(&mut self, snapshot: &replication::Snapshot) -> rusqlite::Result<()> {
        self.db.store_snapshot(snapshot)
    }
}
