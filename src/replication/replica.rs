//! The replica state machine: roles, elections, log replication, leases.
//! See the module docs of `replication` for the protocol and the driver
//! contract.
//!
//! The state is typed by role: what only a primary knows lives in
//! [`Primary`], what only a campaign needs in [`Campaign`], and a role
//! change is one assignment of [`RoleState`]. The handlers are split along
//! the same seams: `election` (pre-votes, votes, epochs), `primary`
//! (replication, view, commit, transfer) and `backup` (log matching,
//! snapshots, leases).

mod backup;
mod election;
mod primary;

use std::collections::BTreeMap;

use super::log::Log;
use super::message::{Body, Entry, EntryKind, Message, Snapshot, Version};
use super::rng::SplitMix64;
use super::storage::{HardState, Storage};
use super::{Config, NodeId, ProposeError, ReadGate, Ready, Role, Status};

use backup::SnapshotReceive;
use election::Campaign;
use primary::{Primary, Progress};

/// What the core decided that the driver has not been handed yet: the
/// next [`Replica::ready`] drains it.
#[derive(Debug, Default)]
struct Outbox {
    messages: Vec<(NodeId, Message)>,
    /// Log entries from this seq on are new or rewritten: persist them.
    persist_from: Option<u64>,
    /// Stored entries after this seq must go.
    truncate_after: Option<u64>,
    snapshot_to_install: Option<Snapshot>,
}

impl Outbox {
    fn send(&mut self, to: NodeId, msg: Message) {
        self.messages.push((to, msg));
    }

    fn persist(&mut self, from_seq: u64) {
        self.persist_from = Some(self.persist_from.map_or(from_seq, |f| f.min(from_seq)));
    }

    fn truncate(&mut self, after: u64) {
        self.truncate_after = Some(self.truncate_after.map_or(after, |t| t.min(after)));
    }
}

/// What this replica is doing, with the state only that role has.
#[derive(Debug)]
enum RoleState {
    /// A backup, or a replica that knows of no primary yet.
    Follower,
    /// Asking for pre-votes, or for votes in its new epoch.
    Campaign(Campaign),
    /// The primary of `hs.epoch`.
    Primary(Box<Primary>),
}

/// A pre-vote granted to a higher-id candidate, which lower ids with no
/// more advanced a log defer to for an election timeout.
#[derive(Clone, Copy, Debug)]
struct Deferral {
    to: NodeId,
    until: u64,
    /// The candidate's `(log_epoch, last seq)`.
    key: (u64, u64),
}

/// One replica of the catalog. See the module docs.
pub struct Replica {
    cfg: Config,
    /// `replicas.len() / 2 + 1`.
    majority: usize,
    rng: SplitMix64,
    /// Identifies this process life in echoed timestamps.
    boot: u64,
    /// Current durable state (what `ready` hands out for persisting).
    hs: HardState,
    /// What the driver has been asked to persist so far.
    persisted_hs: HardState,
    log: Log,
    /// New disk, not caught up yet: no votes, no campaigns, no reads.
    learner: bool,
    role: RoleState,
    /// Primary of `hs.epoch`, when known (ourselves while primary).
    primary_id: Option<NodeId>,
    /// Last entry handed out in `Ready::committed` (or the snapshot).
    applied: Version,
    last_now: u64,
    /// Our clock when we last accepted a message from a primary (or when a
    /// lease of ours may have started): `lease` after it we grant votes.
    last_primary_contact: Option<u64>,
    election_deadline: u64,
    /// Backup read lease, on our clock; 0 = none. Cleared on epoch change.
    lease_until: u64,
    /// Highest incarnation seen from each peer.
    known_inc: BTreeMap<NodeId, u64>,
    /// We granted a pre-vote to this higher-id candidate, whose log key
    /// was this: lower ids whose logs are no further ahead wait until the
    /// time given.
    deferred_to: Option<Deferral>,
    /// Backup: the snapshot arriving in chunks, if any.
    incoming: Option<SnapshotReceive>,
    /// A snapshot was asked of the driver and not handed back yet.
    snapshot_requested: bool,
    /// A backup needs a snapshot and the log holds no bytes for its base:
    /// the next `Ready` asks the driver for them.
    snapshot_wanted: bool,
    out: Outbox,
}

impl Replica {
    /// Start (or restart) from what `storage` holds.
    pub fn new(config: Config, storage: &impl Storage, now_ms: u64) -> Self {
        let mut hs = storage.hard_state();
        let log = Log::restore(storage.snapshot(), storage.entries());
        let base = log.base();
        if hs.commit.seq > log.last_seq() {
            hs.commit = log.last();
        }
        if hs.commit.seq < base.seq {
            hs.commit = base;
        }
        let ignore_inc = config.unsafe_switches.ignore_incarnation;
        let learner = hs.incarnation != config.incarnation && !ignore_inc;
        if ignore_inc {
            hs.incarnation = config.incarnation;
        }
        let majority = config.replicas.len() / 2 + 1;
        let mut rng = SplitMix64(
            config.seed ^ config.id.wrapping_mul(0x9E37_79B9) ^ config.incarnation.rotate_left(17),
        );
        let boot = rng.next_u64();
        hs.log_epoch = log.last().epoch;
        let mut r = Replica {
            majority,
            rng,
            boot,
            persisted_hs: storage.hard_state(),
            hs,
            log,
            learner,
            role: RoleState::Follower,
            primary_id: None,
            applied: base,
            last_now: now_ms,
            // We may have heard from a primary just before we went down.
            last_primary_contact: Some(now_ms),
            election_deadline: 0,
            lease_until: 0,
            known_inc: BTreeMap::new(),
            deferred_to: None,
            incoming: None,
            snapshot_requested: false,
            snapshot_wanted: false,
            out: Outbox::default(),
            cfg: config,
        };
        r.election_deadline = now_ms + r.election_delay();
        r
    }

    // ------------------------------------------------------------------
    // Inputs
    // ------------------------------------------------------------------

    /// Advance time: heartbeats, elections, view upkeep, transfers.
    pub fn tick(&mut self, now_ms: u64) {
        let now = self.advance_clock(now_ms);
        if self.primary().is_some() {
            self.primary_tick(now);
        } else if !self.learner && now >= self.election_deadline {
            self.start_prevote(now);
        }
    }

    /// Handle a message from `from`. Nonsense is ignored; never panics.
    pub fn step(&mut self, now_ms: u64, from: NodeId, msg: Message) {
        let now = self.advance_clock(now_ms);
        if from == self.cfg.id || !self.cfg.replicas.contains(&from) || !msg.is_sane() {
            return;
        }
        // Disk identity: ignore older incarnations, forget what a peer
        // acknowledged under an older one.
        let ignore_inc = self.cfg.unsafe_switches.ignore_incarnation;
        let known = self.known_inc.get(&from).copied();
        if let Some(k) = known
            && msg.inc < k
            && !ignore_inc
        {
            return;
        }
        if known.is_none_or(|k| msg.inc > k) {
            self.known_inc.insert(from, msg.inc);
            if known.is_some() && !ignore_inc {
                let next = self.log.last_seq() + 1;
                if let Some(p) = self.primary_mut().and_then(|pr| pr.peers.get_mut(&from)) {
                    *p = Progress {
                        next,
                        last_grant: p.last_grant,
                        ..Progress::default()
                    };
                }
            }
        }
        let my_key = self.log_key();
        // Fencing, in this one place: an older epoch is answered only with
        // ours; a newer one is adopted (a pre-vote never changes anything, a
        // vote while a primary is alive is ignored).
        let epoch = msg.epoch;
        if epoch < self.hs.epoch && !self.cfg.unsafe_switches.accept_stale_epoch {
            self.answer_stale(from, &msg.body);
            return;
        }
        if epoch > self.hs.epoch {
            match &msg.body {
                Body::PreVote(_) => {}
                Body::Vote(v) if !v.transfer && self.in_lease(now) => return,
                _ => self.adopt_epoch(now, epoch),
            }
        }
        match msg.body {
            Body::PreVote(v) => self.on_prevote(now, from, epoch, v, my_key),
            Body::PreVoteReply(r) => self.on_prevote_reply(now, from, epoch, r),
            Body::Vote(v) => self.on_vote(now, from, epoch, v, my_key),
            Body::VoteReply(r) => self.on_vote_reply(now, from, epoch, r),
            Body::Append(a) => self.on_append(now, from, epoch, a),
            Body::AppendReply(r) => self.on_append_reply(now, from, r),
            Body::SnapshotChunk(c) => self.on_snapshot_chunk(now, from, epoch, c),
            Body::SnapshotChunkReply(r) => self.on_snapshot_chunk_reply(now, from, r),
            Body::TimeoutNow => self.on_timeout_now(now, from, epoch),
        }
    }

    /// Propose a write (primary only). On `Ok`, the entry has this version;
    /// answer the client when it shows up in `Ready::committed`.
    pub fn propose(
        &mut self,
        now_ms: u64,
        request_id: String,
        op: Vec<u8>,
    ) -> Result<Version, ProposeError> {
        self.propose_inner(now_ms, request_id, op, false)
    }

    /// [`Replica::propose`], but the entry does not commit (so no replica
    /// exposes it, nor anything after it) until [`Replica::release`]: it
    /// is replicated and made durable meanwhile. The catalog proposes a
    /// write held while it tells the frontends' caches the write begins,
    /// so that round trip overlaps the replication round trip. If this
    /// replica stops being primary first, a later primary commits the
    /// entry only after fencing every cache.
    pub fn propose_held(
        &mut self,
        now_ms: u64,
        request_id: String,
        op: Vec<u8>,
    ) -> Result<Version, ProposeError> {
        self.propose_inner(now_ms, request_id, op, true)
    }

    /// The entry proposed held at `v` may commit (a no-op unless this
    /// replica is still the primary of `v`'s epoch).
    pub fn release(&mut self, v: Version) {
        let epoch = self.hs.epoch;
        if let Some(p) = self.primary_mut()
            && v.epoch == epoch
            && p.held.remove(&v.seq)
        {
            self.maybe_commit();
        }
    }

    fn propose_inner(
        &mut self,
        now_ms: u64,
        request_id: String,
        op: Vec<u8>,
        held: bool,
    ) -> Result<Version, ProposeError> {
        let now = self.advance_clock(now_ms);
        let ready = self.is_primary_ready();
        let (majority, lease_ms) = (self.majority, self.cfg.lease_ms);
        let Some(p) = self.primary() else {
            return Err(ProposeError::NotPrimary {
                primary: self.primary_id,
            });
        };
        if p.transfer.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        if !ready || now < p.writes_allowed_at {
            return Err(ProposeError::NotReady);
        }
        let recent = now.saturating_sub(lease_ms);
        let acking = p
            .peers
            .values()
            .filter(|p| p.last_ack_sent_at.is_some_and(|t| t >= recent))
            .count();
        if acking + 1 < majority {
            return Err(ProposeError::NoQuorum);
        }
        let version = Version::new(self.hs.epoch, self.log.last_seq() + 1);
        self.append_local(
            now,
            Entry {
                version,
                request_id,
                kind: EntryKind::Op(op),
            },
        );
        if held && let Some(p) = self.primary_mut() {
            p.held.insert(version.seq);
        }
        self.maybe_commit();
        Ok(version)
    }

    /// The driver persisted a snapshot of its state machine at `version`
    /// (which it has applied). Compacts the log. Returns false (and changes
    /// nothing) if `version` is not an applied entry newer than the last
    /// snapshot.
    pub fn snapshot_taken(&mut self, version: Version, data: Vec<u8>) -> bool {
        self.snapshot_requested = false;
        version.seq <= self.applied.seq && self.log.compact(version, data)
    }

    /// The driver flushed every cache that earlier primaries kept coherent
    /// (see [`super::Config::fence_caches`]), as primary of `epoch`.
    pub fn caches_fenced(&mut self, epoch: u64) {
        let current = self.hs.epoch;
        if let Some(p) = self.primary_mut()
            && epoch == current
        {
            p.caches_fenced = true;
        }
    }

    /// Time never goes back for the core, whatever the caller passes.
    fn advance_clock(&mut self, now_ms: u64) -> u64 {
        self.last_now = now_ms.max(self.last_now);
        self.last_now
    }

    // ------------------------------------------------------------------
    // Outputs and queries
    // ------------------------------------------------------------------

    /// Drain what the driver must do (see the contract in the module docs).
    pub fn ready(&mut self) -> Ready {
        let now = self.last_now;
        self.flush(now);
        let mut rd = Ready {
            snapshot_to_install: self.out.snapshot_to_install.take(),
            ..Ready::default()
        };
        let mut hs = self.hs.clone();
        if self.cfg.unsafe_switches.vote_not_persisted
            && hs.voted_for.is_some_and(|v| v != self.cfg.id)
        {
            // The broken variant keeps (epoch, voted_for) of a granted vote
            // in memory only.
            hs.epoch = self.persisted_hs.epoch;
            hs.voted_for = self.persisted_hs.voted_for;
        }
        // Only a new commit point may wait for the disk (see `Ready::sync`).
        let promise = HardState {
            commit: self.persisted_hs.commit,
            ..hs.clone()
        } != self.persisted_hs;
        if hs != self.persisted_hs {
            rd.hard_state = Some(hs.clone());
            self.persisted_hs = hs;
        }
        rd.truncate_after = self.out.truncate_after.take();
        if let Some(from) = self.out.persist_from.take() {
            rd.entries = self.log.slice(from, self.log.last_seq());
        }
        rd.sync = promise
            || rd.snapshot_to_install.is_some()
            || rd.truncate_after.is_some()
            || !rd.entries.is_empty();
        rd.messages = std::mem::take(&mut self.out.messages);
        if self.hs.commit.seq > self.applied.seq {
            rd.committed = self.log.slice(self.applied.seq + 1, self.hs.commit.seq);
            self.applied = self.hs.commit;
        }
        // A want is for bytes to send. It may have been noted before bytes
        // built beside the driver were handed over (between the step that
        // noted it and this one): those meet it.
        if std::mem::take(&mut self.snapshot_wanted)
            && !self.snapshot_requested
            && self.log.snapshot().is_none()
        {
            rd.need_snapshot = true;
            self.snapshot_requested = true;
        }
        // Not while bytes are being built: they are of a version at or
        // after the log's base, and a compaction meanwhile could pass it.
        if !self.snapshot_requested
            && self.applied.seq.saturating_sub(self.log.base().seq) >= self.cfg.snapshot_threshold
            && self.log.compact_without_bytes(self.applied)
        {
            rd.compacted = Some(self.applied);
        }
        rd
    }

    /// May this replica serve a read reflecting at least `min` now?
    pub fn read_gate(&self, now_ms: u64, min: Version) -> ReadGate {
        let sw = &self.cfg.unsafe_switches;
        let have = sw.reads_ignore_version || self.applied.seq >= min.seq;
        match self.serve_until(now_ms) {
            Some(until) if now_ms < until && have => ReadGate::Serve,
            Some(until) if now_ms < until => ReadGate::NotYet,
            _ => ReadGate::Refuse,
        }
    }

    /// Until when (exclusive, on the caller's clock) this replica may serve
    /// reads, as things stand at `now_ms`: `None` when it may not serve one
    /// now. A primary serves while a majority's acknowledgements keep its
    /// lease (once ready and past every earlier lease); a backup in the
    /// view while the lease its primary granted lasts; nobody else.
    pub fn serve_until(&self, now_ms: u64) -> Option<u64> {
        let sw = &self.cfg.unsafe_switches;
        let until = match &self.role {
            RoleState::Primary(p) => {
                if !self.is_primary_ready() || now_ms < p.writes_allowed_at {
                    return None;
                }
                if sw.primary_reads_without_lease {
                    u64::MAX
                } else {
                    self.primary_lease_until()
                }
            }
            RoleState::Follower if !self.learner => {
                if sw.backup_reads_without_lease {
                    u64::MAX
                } else if self.primary_id.is_some() {
                    self.lease_until
                } else {
                    return None;
                }
            }
            _ => return None,
        };
        (now_ms < until).then_some(until)
    }

    /// The log position a read arriving now must wait for (apply up to it)
    /// before it is served, so that it shows every write committed anywhere
    /// before it arrived.
    ///
    /// A primary exposes an entry when it commits it, so its read index is
    /// its commit point. A backup learns of commits only later, but while it
    /// holds a lease its log already holds every committed entry: an entry
    /// commits only once every backup that holds (or may still hold) a lease
    /// has it durably, and a backup joins the view only once it holds the
    /// whole log. So a backup's read index is the end of its log; the read
    /// waits until the commit point (learnt from the next append) has
    /// reached it, about one round trip.
    pub fn read_index(&self) -> u64 {
        match self.role {
            RoleState::Primary(_) => self.hs.commit.seq,
            _ if self.cfg.unsafe_switches.backup_read_index_applied => self.applied.seq,
            _ => self.log.last_seq(),
        }
    }

    /// Primary whose epoch-start entry committed: it knows every entry
    /// committed before it, so it may answer retried requests.
    ///
    /// Also false until every earlier primary's lease surely ran out (as of
    /// the last time given to the replica): answering a retried write from
    /// the applied table acknowledges it, and an old primary may still be
    /// serving reads that do not show it.
    pub fn is_primary_ready(&self) -> bool {
        self.primary().is_some_and(|p| {
            self.hs.commit.seq >= p.epoch_start_seq
                && (self.hs.commit.epoch == self.hs.epoch
                    || self.cfg.unsafe_switches.skip_epoch_start)
                && self.last_now >= p.writes_allowed_at
                && (!self.cfg.fence_caches || p.caches_fenced)
        })
    }

    pub fn status(&self) -> Status {
        let view = match self.primary() {
            Some(p) => std::iter::once(self.cfg.id)
                .chain(p.peers.iter().filter(|(_, p)| p.in_view).map(|(id, _)| *id))
                .collect(),
            None => Vec::new(),
        };
        Status {
            id: self.cfg.id,
            role: self.role(),
            learner: self.learner,
            epoch: self.hs.epoch,
            primary: self.primary_id,
            log_epoch: self.hs.log_epoch,
            last: self.log.last(),
            commit: self.hs.commit,
            applied: self.applied,
            view,
            transferring_to: self.primary().and_then(|p| p.transfer.map(|(t, _)| t)),
        }
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn role(&self) -> Role {
        match &self.role {
            RoleState::Follower => Role::Follower,
            RoleState::Campaign(c) if c.pre => Role::PreCandidate,
            RoleState::Campaign(_) => Role::Candidate,
            RoleState::Primary(_) => Role::Primary,
        }
    }

    /// Highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.hs.epoch
    }

    /// Last entry handed out for applying.
    pub fn applied(&self) -> Version {
        self.applied
    }

    pub fn is_learner(&self) -> bool {
        self.learner
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Entries currently in the in-memory log (after the snapshot).
    pub fn log_entries(&self) -> &[Entry] {
        self.log.entries()
    }

    /// Version of the last entry covered by the latest snapshot.
    pub fn snapshot_version(&self) -> Version {
        self.log.base()
    }

    fn primary(&self) -> Option<&Primary> {
        match &self.role {
            RoleState::Primary(p) => Some(p),
            _ => None,
        }
    }

    fn primary_mut(&mut self) -> Option<&mut Primary> {
        match &mut self.role {
            RoleState::Primary(p) => Some(p),
            _ => None,
        }
    }

    /// A message from us, with our header.
    fn message(&self, body: impl Into<Body>) -> Message {
        Message::new(self.hs.epoch, self.cfg.incarnation, body)
    }
}
