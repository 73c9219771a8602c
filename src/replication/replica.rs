//! The replica state machine: roles, elections, log replication, leases.
//! See the module docs of `replication` for the protocol and the driver
//! contract.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::message::{Echo, Entry, EntryKind, Message, Snapshot, Version};
use super::rng::SplitMix64;
use super::storage::{HardState, Storage};
use super::{Config, NodeId, ProposeError, ReadGate, Ready, Role, Status};

/// The in-memory log: a snapshot point followed by contiguous entries.
#[derive(Clone, Debug, Default)]
struct Log {
    /// Version of the last entry covered by `snapshot` (`(0, 0)` if none).
    base: Version,
    /// Entries with seq `base.seq + 1 ..`, contiguous, epochs non-decreasing.
    entries: Vec<Entry>,
    /// The latest snapshot (its version is `base`), sent to backups that are
    /// too far behind.
    snapshot: Option<Snapshot>,
}

impl Log {
    fn last_seq(&self) -> u64 {
        self.base.seq + self.entries.len() as u64
    }
    fn last(&self) -> Version {
        self.entries.last().map_or(self.base, |e| e.version)
    }
    /// Version of the entry at `seq` (the snapshot point included).
    fn version_at(&self, seq: u64) -> Option<Version> {
        if seq == self.base.seq {
            return Some(self.base);
        }
        if seq < self.base.seq || seq > self.last_seq() {
            return None;
        }
        Some(self.entries[(seq - self.base.seq - 1) as usize].version)
    }
    fn truncate_after(&mut self, seq: u64) {
        let keep = seq.saturating_sub(self.base.seq) as usize;
        self.entries.truncate(keep);
    }
    /// Entries `from ..= to` that are in the log.
    fn slice(&self, from: u64, to: u64) -> Vec<Entry> {
        let from = from.max(self.base.seq + 1);
        let to = to.min(self.last_seq());
        if from > to {
            return Vec::new();
        }
        let a = (from - self.base.seq - 1) as usize;
        let b = (to - self.base.seq) as usize;
        self.entries[a..b].to_vec()
    }
}

/// What the primary knows about one backup (reset when its incarnation
/// changes and at every new primaryship).
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Highest seq known durable on the backup and equal to our log.
    matched: u64,
    /// Next seq to send; `matched < next`.
    next: u64,
    /// Our send time of the newest message the backup acknowledged.
    last_ack_sent_at: Option<u64>,
    /// Granted leases in our appends (member of the view).
    in_view: bool,
    /// When it last (re)joined the view.
    in_view_since: u64,
    /// Our send time of the last append that granted it a lease. It stays
    /// required for commits until `last_grant + lease × (1 + drift)`.
    last_grant: Option<u64>,
    /// Its latest timestamp, echoed back in our appends.
    echo: Option<Echo>,
    learner: bool,
    /// Our latest snapshot on its way to it (while its next entry is
    /// compacted).
    snapshot: Option<SnapshotSend>,
    /// Its log did not match at `next - 1`: send one probe at a time (no
    /// pipelining) until an append is accepted.
    probing: bool,
}

/// A snapshot streaming to one backup, one chunk in flight at a time.
#[derive(Clone, Debug)]
struct SnapshotSend {
    /// The snapshot being sent: our latest (a newer one restarts at 0).
    version: Version,
    /// Bytes the backup confirmed holding (`<=` the snapshot's length): the
    /// next chunk starts here.
    acked: u64,
    /// A chunk is out and unanswered; it is resent from `acked` once
    /// `last_sent` is a resend interval old.
    in_flight: bool,
    /// Our send time of the latest chunk.
    last_sent: u64,
}

/// A snapshot a backup is receiving: the first `data.len() <= total` bytes
/// of the one at `version` that the primary of `epoch` streams.
#[derive(Clone, Debug)]
struct SnapshotReceive {
    epoch: u64,
    version: Version,
    total: u64,
    data: Vec<u8>,
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
    role: Role,
    /// Primary of `hs.epoch`, when known.
    primary: Option<NodeId>,
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
    /// We granted a pre-vote to this higher-id candidate: lower ids wait
    /// until the time given.
    deferred_to: Option<(NodeId, u64)>,
    prevotes: BTreeSet<NodeId>,
    votes: BTreeSet<NodeId>,
    /// This campaign comes from a leadership transfer.
    transfer_campaign: bool,
    /// Candidate: when every earlier primary's lease has surely run out.
    lease_wait_until: u64,
    /// Backup: the snapshot arriving in chunks, if any.
    incoming: Option<SnapshotReceive>,
    // --- primary only ---
    peers: BTreeMap<NodeId, Progress>,
    epoch_start_seq: u64,
    writes_allowed_at: u64,
    became_primary_at: u64,
    /// (seq, append time) of uncommitted entries, to spot lagging backups.
    append_times: VecDeque<(u64, u64)>,
    /// Epoch for which the driver fenced the caches outside the core.
    caches_fenced: u64,
    /// (target, started) of a leadership transfer under way.
    transfer: Option<(NodeId, u64)>,
    last_transfer_at: Option<u64>,
    last_heartbeat: u64,
    commit_broadcast: u64,
    // --- outputs ---
    msgs: Vec<(NodeId, Message)>,
    persist_from: Option<u64>,
    truncate_after: Option<u64>,
    snapshot_to_install: Option<Snapshot>,
    snapshot_requested: bool,
}

impl Replica {
    /// Start (or restart) from what `storage` holds.
    pub fn new(config: Config, storage: &impl Storage, now_ms: u64) -> Self {
        let mut hs = storage.hard_state();
        let snapshot = storage.snapshot();
        let base = snapshot.as_ref().map_or(Version::default(), |s| s.version);
        let mut entries = Vec::new();
        for e in storage.entries() {
            let expect = base.seq + 1 + entries.len() as u64;
            if e.version.seq < expect {
                continue;
            }
            if e.version.seq != expect {
                break;
            }
            entries.push(e);
        }
        let log = Log {
            base,
            entries,
            snapshot,
        };
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
            role: Role::Follower,
            primary: None,
            applied: base,
            last_now: now_ms,
            // We may have heard from a primary just before we went down.
            last_primary_contact: Some(now_ms),
            election_deadline: 0,
            lease_until: 0,
            known_inc: BTreeMap::new(),
            deferred_to: None,
            prevotes: BTreeSet::new(),
            votes: BTreeSet::new(),
            transfer_campaign: false,
            lease_wait_until: 0,
            incoming: None,
            peers: BTreeMap::new(),
            epoch_start_seq: u64::MAX,
            writes_allowed_at: u64::MAX,
            became_primary_at: 0,
            append_times: VecDeque::new(),
            caches_fenced: 0,
            transfer: None,
            last_transfer_at: None,
            last_heartbeat: 0,
            commit_broadcast: 0,
            msgs: Vec::new(),
            persist_from: None,
            truncate_after: None,
            snapshot_to_install: None,
            snapshot_requested: false,
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
        let now = now_ms.max(self.last_now);
        self.last_now = now;
        match self.role {
            Role::Primary => {
                if now >= self.last_heartbeat + self.cfg.heartbeat_ms {
                    self.last_heartbeat = now;
                    let ids: Vec<NodeId> = self.peers.keys().copied().collect();
                    for id in ids {
                        self.send_append(id, now);
                    }
                }
                self.update_view(now);
                self.maybe_commit();
                self.check_transfer(now);
                if self.role == Role::Primary {
                    let alive_until = self
                        .primary_lease_until()
                        .max(self.became_primary_at + self.cfg.lease_ms);
                    if now > alive_until.saturating_add(self.cfg.election_timeout_ms) {
                        self.step_down(now);
                    }
                }
            }
            _ => {
                if !self.learner && now >= self.election_deadline {
                    self.start_prevote(now);
                }
            }
        }
    }

    /// Handle a message from `from`. Nonsense is ignored; never panics.
    pub fn step(&mut self, now_ms: u64, from: NodeId, msg: Message) {
        let now = now_ms.max(self.last_now);
        self.last_now = now;
        if from == self.cfg.id || !self.cfg.replicas.contains(&from) || !msg.is_sane() {
            return;
        }
        // Disk identity: ignore older incarnations, forget what a peer
        // acknowledged under an older one.
        let ignore_inc = self.cfg.unsafe_switches.ignore_incarnation;
        let inc = msg.inc();
        let known = self.known_inc.get(&from).copied();
        if let Some(k) = known
            && inc < k
            && !ignore_inc
        {
            return;
        }
        if known.is_none_or(|k| inc > k) {
            self.known_inc.insert(from, inc);
            if known.is_some() && !ignore_inc {
                let next = self.log.last_seq() + 1;
                if let Some(p) = self.peers.get_mut(&from) {
                    let last_grant = p.last_grant;
                    *p = Progress {
                        next,
                        last_grant,
                        ..Progress::default()
                    };
                }
            }
        }
        let my_key = self.log_key();
        // Fencing, in this one place: an older epoch is answered only with
        // ours; a newer one is adopted (a pre-vote never changes anything, a
        // vote while a primary is alive is ignored).
        let epoch = msg.epoch();
        if epoch < self.hs.epoch && !self.cfg.unsafe_switches.accept_stale_epoch {
            self.answer_stale(from, &msg);
            return;
        }
        if epoch > self.hs.epoch {
            match &msg {
                Message::PreVote { .. } => {}
                Message::Vote {
                    transfer: false, ..
                } if self.in_lease(now) => return,
                _ => self.adopt_epoch(now, epoch),
            }
        }
        match msg {
            Message::PreVote {
                epoch,
                log_epoch,
                last_seq,
                ..
            } => self.on_prevote(now, from, epoch, (log_epoch, last_seq), my_key),
            Message::PreVoteReply { epoch, granted, .. } => {
                if self.role == Role::PreCandidate && granted && epoch == self.hs.epoch {
                    self.prevotes.insert(from);
                    if self.prevotes.len() >= self.majority {
                        self.campaign(now, false);
                    }
                }
            }
            Message::Vote {
                epoch,
                log_epoch,
                last_seq,
                transfer,
                ..
            } => self.on_vote(now, from, epoch, (log_epoch, last_seq), transfer, my_key),
            Message::VoteReply {
                epoch,
                granted,
                lease_wait_ms,
                ..
            } => {
                if self.role == Role::Candidate && granted && epoch == self.hs.epoch {
                    self.votes.insert(from);
                    let wait = lease_wait_ms.min(self.cfg.safe_lease_ms());
                    self.lease_wait_until = self.lease_wait_until.max(now + wait);
                    if self.votes.len() >= self.majority {
                        self.become_primary(now);
                    }
                }
            }
            Message::Append {
                epoch,
                prev,
                entries,
                commit,
                sent_at,
                echo,
                lease_ms,
                to_inc,
                ..
            } => self.on_append(
                now, from, epoch, prev, entries, commit, sent_at, echo, lease_ms, to_inc,
            ),
            Message::AppendReply {
                ok,
                match_seq,
                last_seq,
                learner,
                sent_at_echo,
                echo,
                ..
            } => self.on_append_reply(
                now,
                from,
                ok,
                match_seq,
                last_seq,
                learner,
                sent_at_echo,
                echo,
            ),
            Message::InstallSnapshot {
                epoch,
                snapshot,
                sent_at,
                ..
            } => {
                if self.follow_snapshot_sender(now, from, epoch) {
                    self.incoming = None;
                    self.install_snapshot(from, snapshot, sent_at);
                }
            }
            Message::SnapshotChunk {
                epoch,
                version,
                offset,
                total,
                data,
                sent_at,
                ..
            } => {
                if self.follow_snapshot_sender(now, from, epoch) {
                    self.on_snapshot_chunk(from, epoch, version, offset, total, data, sent_at);
                }
            }
            Message::SnapshotChunkReply {
                version,
                held,
                sent_at_echo,
                ..
            } => self.on_snapshot_chunk_reply(now, from, version, held, sent_at_echo),
            Message::TimeoutNow { epoch, .. } => {
                if epoch == self.hs.epoch
                    && self.primary == Some(from)
                    && self.role == Role::Follower
                    && !self.learner
                {
                    self.campaign(now, true);
                }
            }
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
        let now = now_ms.max(self.last_now);
        self.last_now = now;
        if self.role != Role::Primary {
            return Err(ProposeError::NotPrimary {
                primary: self.primary,
            });
        }
        if self.transfer.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        if !self.is_primary_ready() || now < self.writes_allowed_at {
            return Err(ProposeError::NotReady);
        }
        let recent = now.saturating_sub(self.cfg.lease_ms);
        let acking = self
            .peers
            .values()
            .filter(|p| p.last_ack_sent_at.is_some_and(|t| t >= recent))
            .count();
        if acking + 1 < self.majority {
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
        self.maybe_commit();
        Ok(version)
    }

    /// The driver persisted a snapshot of its state machine at `version`
    /// (which it has applied). Compacts the log. Returns false (and changes
    /// nothing) if `version` is not an applied entry newer than the last
    /// snapshot.
    pub fn snapshot_taken(&mut self, version: Version, data: Vec<u8>) -> bool {
        self.snapshot_requested = false;
        if version.seq <= self.log.base.seq
            || version.seq > self.applied.seq
            || self.log.version_at(version.seq) != Some(version)
        {
            return false;
        }
        let drop = (version.seq - self.log.base.seq) as usize;
        self.log.entries.drain(..drop);
        self.log.base = version;
        self.log.snapshot = Some(Snapshot { version, data });
        true
    }

    // ------------------------------------------------------------------
    // Outputs and queries
    // ------------------------------------------------------------------

    /// Drain what the driver must do (see the contract in the module docs).
    pub fn ready(&mut self) -> Ready {
        let now = self.last_now;
        self.flush(now);
        let mut rd = Ready {
            snapshot_to_install: self.snapshot_to_install.take(),
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
        if hs != self.persisted_hs {
            rd.hard_state = Some(hs.clone());
            self.persisted_hs = hs;
        }
        rd.truncate_after = self.truncate_after.take();
        if let Some(from) = self.persist_from.take() {
            rd.entries = self.log.slice(from, self.log.last_seq());
        }
        rd.messages = std::mem::take(&mut self.msgs);
        if self.hs.commit.seq > self.applied.seq {
            rd.committed = self.log.slice(self.applied.seq + 1, self.hs.commit.seq);
            self.applied = self.hs.commit;
        }
        if !self.snapshot_requested
            && self.applied.seq.saturating_sub(self.log.base.seq) >= self.cfg.snapshot_threshold
        {
            rd.need_snapshot = true;
            self.snapshot_requested = true;
        }
        rd
    }

    /// May this replica serve a read reflecting at least `min` now?
    pub fn read_gate(&self, now_ms: u64, min: Version) -> ReadGate {
        let sw = &self.cfg.unsafe_switches;
        let have = sw.reads_ignore_version || self.applied.seq >= min.seq;
        let answer = |have: bool| {
            if have {
                ReadGate::Serve
            } else {
                ReadGate::NotYet
            }
        };
        match self.role {
            Role::Primary => {
                if self.is_primary_ready()
                    && now_ms >= self.writes_allowed_at
                    && (now_ms < self.primary_lease_until()
                        || self.cfg.unsafe_switches.primary_reads_without_lease)
                {
                    answer(have)
                } else {
                    ReadGate::Refuse
                }
            }
            Role::Follower if !self.learner => {
                if sw.backup_reads_without_lease
                    || (self.primary.is_some() && now_ms < self.lease_until)
                {
                    answer(have)
                } else {
                    ReadGate::Refuse
                }
            }
            _ => ReadGate::Refuse,
        }
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
            Role::Primary => self.hs.commit.seq,
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
        self.epoch_start_committed()
            && self.last_now >= self.writes_allowed_at
            && (!self.cfg.fence_caches || self.caches_fenced == self.hs.epoch)
    }

    /// The driver flushed every cache that earlier primaries kept coherent
    /// (see [`super::Config::fence_caches`]), as primary of `epoch`.
    pub fn caches_fenced(&mut self, epoch: u64) {
        if self.role == Role::Primary && epoch == self.hs.epoch {
            self.caches_fenced = epoch;
        }
    }

    fn epoch_start_committed(&self) -> bool {
        self.role == Role::Primary
            && self.hs.commit.seq >= self.epoch_start_seq
            && (self.hs.commit.epoch == self.hs.epoch || self.cfg.unsafe_switches.skip_epoch_start)
    }

    pub fn status(&self) -> Status {
        let view = if self.role == Role::Primary {
            std::iter::once(self.cfg.id)
                .chain(
                    self.peers
                        .iter()
                        .filter(|(_, p)| p.in_view)
                        .map(|(id, _)| *id),
                )
                .collect()
        } else {
            Vec::new()
        };
        Status {
            id: self.cfg.id,
            role: self.role,
            learner: self.learner,
            epoch: self.hs.epoch,
            primary: self.primary,
            log_epoch: self.hs.log_epoch,
            last: self.log.last(),
            commit: self.hs.commit,
            applied: self.applied,
            view,
            transferring_to: self.transfer.map(|(t, _)| t),
        }
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    pub fn role(&self) -> Role {
        self.role
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
        &self.log.entries
    }

    /// Version of the last entry covered by the latest snapshot.
    pub fn snapshot_version(&self) -> Version {
        self.log.base
    }

    // ------------------------------------------------------------------
    // Elections
    // ------------------------------------------------------------------

    /// `log_epoch` is the epoch of the last entry. Every primary's first
    /// entry is its `EpochStart`, written after everything it inherited, so
    /// this is the epoch of the primary whose log (through its start) this
    /// replica last installed; merely hearing from a primary changes nothing.
    fn sync_log_epoch(&mut self) {
        let e = self.log.last().epoch;
        if self.hs.log_epoch != e {
            self.hs.log_epoch = e;
        }
    }

    /// `(log_epoch, last seq)`: what "more advanced" means.
    fn log_key(&self) -> (u64, u64) {
        let e = if self.cfg.unsafe_switches.compare_by_seen_epoch {
            self.hs.epoch
        } else {
            self.hs.log_epoch
        };
        (e, self.log.last_seq())
    }

    /// Base timeout plus `2 × heartbeat` per higher-id replica, plus jitter.
    fn election_delay(&mut self) -> u64 {
        let rank = self
            .cfg
            .replicas
            .iter()
            .filter(|&&r| r > self.cfg.id)
            .count() as u64;
        self.cfg.election_timeout_ms
            + rank * 2 * self.cfg.heartbeat_ms
            + self.rng.below(self.cfg.heartbeat_ms.max(1))
    }

    /// Heard from a live primary (or are one) within the lease.
    fn in_lease(&self, now: u64) -> bool {
        if self.role == Role::Primary {
            return now < self.primary_lease_until();
        }
        self.last_primary_contact
            .is_some_and(|t| now < t + self.cfg.lease_ms)
    }

    /// How long an earlier primary's lease may still run, from our view.
    fn lease_wait_ms(&self, now: u64) -> u64 {
        self.last_primary_contact
            .map_or(0, |t| (t + self.cfg.safe_lease_ms()).saturating_sub(now))
    }

    fn adopt_epoch(&mut self, now: u64, epoch: u64) {
        if self.role == Role::Primary {
            self.step_down(now);
        }
        self.hs.epoch = epoch;
        self.hs.voted_for = None;
        self.role = Role::Follower;
        self.primary = None;
        self.lease_until = 0;
        self.incoming = None;
        self.prevotes.clear();
        self.votes.clear();
    }

    fn step_down(&mut self, now: u64) {
        if self.role == Role::Primary {
            // Our own lease started at most `lease` before it ends.
            let lease_start = self
                .primary_lease_until()
                .min(now + self.cfg.lease_ms)
                .saturating_sub(self.cfg.lease_ms);
            let prev = self.last_primary_contact.unwrap_or(0);
            self.last_primary_contact = Some(prev.max(lease_start));
        }
        self.role = Role::Follower;
        self.primary = None;
        self.peers.clear();
        self.transfer = None;
        self.append_times.clear();
        self.epoch_start_seq = u64::MAX;
        self.writes_allowed_at = u64::MAX;
        self.election_deadline = now + self.election_delay();
    }

    fn answer_stale(&mut self, to: NodeId, msg: &Message) {
        let (epoch, inc) = (self.hs.epoch, self.cfg.incarnation);
        let reply = match msg {
            Message::PreVote { .. } => Message::PreVoteReply {
                epoch,
                inc,
                granted: false,
            },
            Message::Vote { .. } => Message::VoteReply {
                epoch,
                inc,
                granted: false,
                lease_wait_ms: 0,
            },
            Message::Append { .. }
            | Message::InstallSnapshot { .. }
            | Message::SnapshotChunk { .. } => Message::AppendReply {
                epoch,
                inc,
                ok: false,
                match_seq: 0,
                last_seq: self.log.last_seq(),
                learner: self.learner,
                sent_at_echo: 0,
                echo: Echo {
                    boot: self.boot,
                    at: self.last_now,
                },
            },
            _ => return,
        };
        self.msgs.push((to, reply));
    }

    fn on_prevote(
        &mut self,
        now: u64,
        from: NodeId,
        epoch: u64,
        cand: (u64, u64),
        mine: (u64, u64),
    ) {
        let mut grant = !self.learner && cand >= mine && !self.in_lease(now);
        if grant
            && let Some((h, until)) = self.deferred_to
            && h > from
            && now < until
        {
            grant = false;
        }
        if grant && from < self.cfg.id && mine >= cand && self.role != Role::Candidate {
            // We are at least as advanced and preferred: lead ourselves.
            grant = false;
            self.election_deadline = self.election_deadline.min(now);
        }
        if grant {
            let renew = match self.deferred_to {
                Some((h, until)) => from >= h || now >= until,
                None => true,
            };
            if renew {
                self.deferred_to = Some((from, now + self.cfg.election_timeout_ms));
            }
        }
        let reply_epoch = if grant { epoch } else { self.hs.epoch };
        self.msgs.push((
            from,
            Message::PreVoteReply {
                epoch: reply_epoch,
                inc: self.cfg.incarnation,
                granted: grant,
            },
        ));
    }

    fn on_vote(
        &mut self,
        now: u64,
        from: NodeId,
        epoch: u64,
        cand: (u64, u64),
        transfer: bool,
        mine: (u64, u64),
    ) {
        let grant = !self.learner
            && epoch == self.hs.epoch
            && self.hs.voted_for.is_none_or(|v| v == from)
            && cand >= mine
            && (transfer || !self.in_lease(now));
        if grant {
            self.hs.voted_for = Some(from);
            self.election_deadline = now + self.election_delay();
        }
        self.msgs.push((
            from,
            Message::VoteReply {
                epoch: self.hs.epoch,
                inc: self.cfg.incarnation,
                granted: grant,
                lease_wait_ms: self.lease_wait_ms(now),
            },
        ));
    }

    fn start_prevote(&mut self, now: u64) {
        if self.learner {
            return;
        }
        self.role = Role::PreCandidate;
        self.primary = None;
        self.prevotes.clear();
        self.prevotes.insert(self.cfg.id);
        self.election_deadline = now + self.election_delay();
        if self.prevotes.len() >= self.majority {
            self.campaign(now, false);
            return;
        }
        let (log_epoch, last_seq) = self.log_key();
        let msg = Message::PreVote {
            epoch: self.hs.epoch,
            inc: self.cfg.incarnation,
            log_epoch,
            last_seq,
        };
        self.broadcast(msg);
    }

    fn campaign(&mut self, now: u64, transfer: bool) {
        self.hs.epoch = self.hs.epoch.saturating_add(1);
        self.hs.voted_for = Some(self.cfg.id);
        self.role = Role::Candidate;
        self.primary = None;
        self.lease_until = 0;
        self.votes.clear();
        self.votes.insert(self.cfg.id);
        self.transfer_campaign = transfer;
        self.lease_wait_until = now + self.lease_wait_ms(now);
        self.election_deadline = now + self.election_delay();
        if self.votes.len() >= self.majority {
            self.become_primary(now);
            return;
        }
        let (log_epoch, last_seq) = self.log_key();
        let msg = Message::Vote {
            epoch: self.hs.epoch,
            inc: self.cfg.incarnation,
            log_epoch,
            last_seq,
            transfer,
        };
        self.broadcast(msg);
    }

    fn become_primary(&mut self, now: u64) {
        self.role = Role::Primary;
        self.primary = Some(self.cfg.id);
        self.incoming = None;
        self.became_primary_at = now;
        self.transfer = None;
        self.last_transfer_at = Some(now);
        self.append_times.clear();
        self.writes_allowed_at = if self.cfg.unsafe_switches.no_lease_wait {
            now
        } else {
            self.lease_wait_until.max(now)
        };
        let next = self.log.last_seq() + 1;
        self.peers = self
            .cfg
            .replicas
            .iter()
            .filter(|&&r| r != self.cfg.id)
            .map(|&r| {
                (
                    r,
                    Progress {
                        next,
                        ..Progress::default()
                    },
                )
            })
            .collect();
        if self.cfg.unsafe_switches.skip_epoch_start {
            self.epoch_start_seq = 0;
        } else {
            let version = Version::new(self.hs.epoch, next);
            self.epoch_start_seq = next;
            self.append_local(
                now,
                Entry {
                    version,
                    request_id: format!("epoch-start-{}", self.hs.epoch),
                    kind: EntryKind::EpochStart,
                },
            );
        }
        self.last_heartbeat = now;
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        for id in ids {
            self.send_append(id, now);
        }
        self.maybe_commit();
    }

    fn broadcast(&mut self, msg: Message) {
        for &r in &self.cfg.replicas {
            if r != self.cfg.id {
                self.msgs.push((r, msg.clone()));
            }
        }
    }

    // ------------------------------------------------------------------
    // Primary: replication, view, commit, transfer
    // ------------------------------------------------------------------

    fn append_local(&mut self, now: u64, entry: Entry) {
        let seq = entry.version.seq;
        self.log.entries.push(entry);
        self.sync_log_epoch();
        self.persist_from = Some(self.persist_from.map_or(seq, |f| f.min(seq)));
        self.append_times.push_back((seq, now));
    }

    /// Until when a majority acknowledged us (our clock).
    fn primary_lease_until(&self) -> u64 {
        if self.role != Role::Primary {
            return 0;
        }
        if self.majority <= 1 {
            return u64::MAX;
        }
        kth_largest(
            self.peers.values().filter_map(|p| p.last_ack_sent_at),
            self.majority - 2,
        )
        .map_or(0, |t| t + self.cfg.lease_ms)
    }

    fn is_active(&self, p: &Progress, now: u64) -> bool {
        p.last_ack_sent_at
            .is_some_and(|t| t + self.cfg.lease_ms / 2 >= now)
    }

    /// Send what `id` misses (or a heartbeat; or, when its next entry is
    /// compacted, the next snapshot chunk). Optimistically advances `next`
    /// for active backups so entries are pipelined.
    fn send_append(&mut self, id: NodeId, now: u64) {
        let last = self.log.last_seq();
        // Backups read only what a ready primary could serve: not before our
        // epoch start committed and earlier leases ran out.
        let lease_left = if self.is_primary_ready() && now >= self.writes_allowed_at {
            self.primary_lease_until().saturating_sub(now)
        } else {
            0
        };
        let active = match self.peers.get(&id) {
            Some(p) => self.is_active(p, now),
            None => return,
        };
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        p.next = p.next.clamp(p.matched + 1, last + 1);
        if p.next <= self.log.base.seq {
            self.send_snapshot_chunk(id, now);
            return;
        }
        p.snapshot = None;
        let prev_seq = p.next - 1;
        let Some(prev) = self.log.version_at(prev_seq) else {
            return;
        };
        let to = last.min(prev_seq + self.cfg.max_batch.max(1) as u64);
        let entries = self.log.slice(p.next, to);
        let mut lease_ms = 0;
        if p.in_view && p.echo.is_some() {
            lease_ms = self.cfg.lease_ms.min(lease_left);
            if self.cfg.unsafe_switches.backup_lease_uncapped && lease_left > 0 {
                lease_ms = self.cfg.lease_ms;
            }
            if lease_ms > 0 {
                p.last_grant = Some(now);
            }
        }
        if active && !p.probing {
            p.next = to + 1;
        }
        let msg = Message::Append {
            epoch: self.hs.epoch,
            inc: self.cfg.incarnation,
            prev,
            entries,
            commit: self.hs.commit.seq,
            sent_at: now,
            echo: if lease_ms > 0 { p.echo } else { None },
            lease_ms,
            to_inc: self.known_inc.get(&id).copied().unwrap_or(0),
        };
        self.msgs.push((id, msg));
    }

    /// Stream our latest snapshot to `id`, whose next entry is compacted:
    /// the chunk at the offset it confirmed, unless one is in flight and not
    /// yet a resend interval (`4 × heartbeat`) old.
    fn send_snapshot_chunk(&mut self, id: NodeId, now: u64) {
        let Some(snap) = &self.log.snapshot else {
            return;
        };
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let t = match &mut p.snapshot {
            Some(t) if t.version == snap.version => t,
            slot => slot.insert(SnapshotSend {
                version: snap.version,
                acked: 0,
                in_flight: false,
                last_sent: 0,
            }),
        };
        let resend = 4 * self.cfg.heartbeat_ms;
        if t.in_flight && now < t.last_sent.saturating_add(resend) {
            return;
        }
        let total = snap.data.len();
        let from = usize::try_from(t.acked).map_or(total, |a| a.min(total));
        let to = from + self.cfg.snapshot_chunk_bytes.max(1).min(total - from);
        t.in_flight = true;
        t.last_sent = now;
        let msg = Message::SnapshotChunk {
            epoch: self.hs.epoch,
            inc: self.cfg.incarnation,
            version: snap.version,
            offset: from as u64,
            total: total as u64,
            data: snap.data[from..to].to_vec(),
            sent_at: now,
        };
        self.msgs.push((id, msg));
    }

    /// A backup holds `held` bytes of the snapshot at `version`. More than
    /// it confirmed before: send the next chunk at once. Less, in answer to
    /// our latest chunk: it lost what it had (a restart), so go on from
    /// there. Anything else (a duplicate, an older snapshot, a stale
    /// answer) changes nothing.
    fn on_snapshot_chunk_reply(
        &mut self,
        now: u64,
        from: NodeId,
        version: Version,
        held: u64,
        sent_at_echo: u64,
    ) {
        if self.role != Role::Primary {
            return;
        }
        let total = self
            .log
            .snapshot
            .as_ref()
            .map_or(0, |s| s.data.len() as u64);
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if sent_at_echo <= now && sent_at_echo > 0 {
            p.last_ack_sent_at = Some(
                p.last_ack_sent_at
                    .map_or(sent_at_echo, |t| t.max(sent_at_echo)),
            );
        }
        let Some(t) = p.snapshot.as_mut() else {
            return;
        };
        if t.version != version || held > total {
            return;
        }
        let progress = held > t.acked;
        let lost = held < t.acked && sent_at_echo >= t.last_sent;
        if progress || lost {
            t.acked = held;
            t.in_flight = false;
            self.send_snapshot_chunk(from, now);
        }
    }

    /// Pipeline new entries and new commit points to active backups.
    fn flush(&mut self, now: u64) {
        if self.role != Role::Primary {
            return;
        }
        let last = self.log.last_seq();
        let commit_moved = self.hs.commit.seq > self.commit_broadcast;
        for k in 0..self.cfg.replicas.len() {
            let id = self.cfg.replicas[k];
            let Some(p) = self.peers.get(&id) else {
                continue;
            };
            if !self.is_active(p, now) || p.probing {
                continue;
            }
            if p.next <= last || commit_moved {
                self.send_append(id, now);
            }
        }
        self.commit_broadcast = self.hs.commit.seq;
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append_reply(
        &mut self,
        now: u64,
        from: NodeId,
        ok: bool,
        match_seq: u64,
        hint: u64,
        learner: bool,
        sent_at_echo: u64,
        echo: Echo,
    ) {
        if self.role != Role::Primary {
            return;
        }
        let last = self.log.last_seq();
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if sent_at_echo <= now && sent_at_echo > 0 {
            p.last_ack_sent_at = Some(
                p.last_ack_sent_at
                    .map_or(sent_at_echo, |t| t.max(sent_at_echo)),
            );
        }
        let newer = match p.echo {
            Some(old) => old.boot != echo.boot || echo.at >= old.at,
            None => true,
        };
        if newer {
            p.echo = Some(echo);
        }
        p.learner = learner;
        if ok {
            p.probing = false;
            let m = match_seq.min(last);
            if m > p.matched {
                p.matched = m;
            }
            if p.next <= p.matched {
                p.next = p.matched + 1;
            }
        } else {
            // Back off; resend at once only when that made progress (a
            // duplicated or stale rejection must not multiply messages).
            let resume = hint.saturating_add(1).max(p.matched + 1);
            if sent_at_echo > 0 {
                p.probing = true;
            }
            if resume < p.next {
                p.next = resume;
                if sent_at_echo > 0 {
                    self.send_append(from, now);
                }
            }
        }
        self.update_view(now);
        self.maybe_commit();
    }

    fn update_view(&mut self, now: u64) {
        let quarter = self.cfg.lease_ms / 4;
        let last = self.log.last_seq();
        let stale_before = now.saturating_sub(quarter);
        for p in self.peers.values_mut() {
            let acking = p.last_ack_sent_at.is_some_and(|t| t >= stale_before);
            let lagging = self
                .append_times
                .iter()
                .find(|(seq, _)| *seq > p.matched)
                .is_some_and(|(_, t)| *t < stale_before);
            // A learner is not in sync (and serves no reads) until promoted.
            let healthy = acking && !lagging && p.echo.is_some() && !p.learner;
            if p.in_view && !healthy {
                p.in_view = false;
            } else if !p.in_view && healthy && p.matched == last {
                p.in_view = true;
                p.in_view_since = now;
            }
        }
    }

    /// Commit the highest entry of our epoch that every required backup and
    /// a majority hold durably.
    fn maybe_commit(&mut self) {
        if self.role != Role::Primary {
            return;
        }
        let now = self.last_now;
        let safe = self.cfg.safe_lease_ms();
        let mut cand = self.log.last_seq();
        for p in self.peers.values() {
            let required = p.in_view || p.last_grant.is_some_and(|g| now < g + safe);
            if required && !self.cfg.unsafe_switches.commit_ignores_lease_holders {
                cand = cand.min(p.matched);
            }
        }
        if self.majority > 1 {
            // Only voters count toward the majority: a learner (a new disk, or
            // one restored from an old copy) is not in sync until promoted.
            let voters = self.peers.values().filter(|p| !p.learner);
            let quorum = kth_largest(voters.map(|p| p.matched), self.majority - 2);
            cand = cand.min(quorum.unwrap_or(0));
        }
        if cand <= self.hs.commit.seq {
            return;
        }
        let Some(v) = self.log.version_at(cand) else {
            return;
        };
        if v.epoch != self.hs.epoch {
            return;
        }
        self.hs.commit = v;
        while self.append_times.front().is_some_and(|(s, _)| *s <= cand) {
            self.append_times.pop_front();
        }
    }

    fn check_transfer(&mut self, now: u64) {
        let last = self.log.last_seq();
        if let Some((target, started)) = self.transfer {
            if now > started + self.cfg.election_timeout_ms {
                self.transfer = None;
                self.last_transfer_at = Some(now);
                return;
            }
            let drained = self.hs.commit.seq == last
                && self.peers.get(&target).is_some_and(|p| p.matched == last);
            if drained {
                self.msgs.push((
                    target,
                    Message::TimeoutNow {
                        epoch: self.hs.epoch,
                        inc: self.cfg.incarnation,
                    },
                ));
                self.step_down(now);
                self.primary = Some(target);
            }
            return;
        }
        if !self.is_primary_ready() || now < self.writes_allowed_at {
            return;
        }
        if self
            .last_transfer_at
            .is_some_and(|t| now < t + self.cfg.takeover_after_ms)
        {
            return;
        }
        let me = self.cfg.id;
        let after = self.cfg.takeover_after_ms;
        let target = self
            .peers
            .iter()
            .filter(|(id, p)| {
                **id > me && p.in_view && !p.learner && now >= p.in_view_since + after
            })
            .map(|(id, _)| *id)
            .max();
        if let Some(t) = target {
            self.transfer = Some((t, now));
        }
    }

    // ------------------------------------------------------------------
    // Backup: log matching, snapshots, leases
    // ------------------------------------------------------------------

    fn follow(&mut self, now: u64, from: NodeId) {
        if self.role != Role::Follower || self.primary != Some(from) {
            self.role = Role::Follower;
            self.primary = Some(from);
            self.prevotes.clear();
            self.votes.clear();
        }
        self.last_primary_contact = Some(now);
        self.election_deadline = now + self.election_delay();
    }

    fn reply_append(&mut self, to: NodeId, ok: bool, match_seq: u64, hint: u64, sent_at: u64) {
        let msg = Message::AppendReply {
            epoch: self.hs.epoch,
            inc: self.cfg.incarnation,
            ok,
            match_seq,
            last_seq: hint,
            learner: self.learner,
            sent_at_echo: sent_at,
            echo: Echo {
                boot: self.boot,
                at: self.last_now,
            },
        };
        self.msgs.push((to, msg));
    }

    fn mark_truncate(&mut self, after: u64) {
        self.truncate_after = Some(self.truncate_after.map_or(after, |t| t.min(after)));
    }

    fn mark_persist(&mut self, seq: u64) {
        self.persist_from = Some(self.persist_from.map_or(seq, |f| f.min(seq)));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append(
        &mut self,
        now: u64,
        from: NodeId,
        epoch: u64,
        prev: Version,
        mut entries: Vec<Entry>,
        commit: u64,
        sent_at: u64,
        echo: Option<Echo>,
        lease_ms: u64,
        to_inc: u64,
    ) {
        if self.role == Role::Primary && epoch == self.hs.epoch {
            return; // two primaries in one epoch cannot happen; ignore
        }
        if self.role == Role::Primary {
            self.step_down(now); // only with accept_stale_epoch
        }
        for (i, e) in entries.iter().enumerate() {
            if Some(e.version.seq) != prev.seq.checked_add(1 + i as u64) {
                return; // not contiguous: nonsense
            }
        }
        if prev.seq.checked_add(entries.len() as u64 + 1).is_none() {
            return;
        }
        self.follow(now, from);
        let n = entries.len() as u64;
        let matched = prev.seq + n;
        let mut prev = prev;
        let base = self.log.base.seq;
        if prev.seq < base {
            // Part of it is in our snapshot (committed, hence identical).
            let skip = (base - prev.seq) as usize;
            if skip >= entries.len() {
                let m = matched.min(self.log.last_seq());
                self.reply_append(from, true, m, self.log.last_seq(), sent_at);
                return;
            }
            entries.drain(..skip);
            prev = self.log.base;
        }
        match self.log.version_at(prev.seq) {
            None => {
                let hint = self.log.last_seq();
                self.reply_append(from, false, 0, hint, sent_at);
                return;
            }
            Some(v) if v != prev => {
                let hint = self.hs.commit.seq.min(prev.seq.saturating_sub(1));
                self.reply_append(from, false, 0, hint, sent_at);
                return;
            }
            Some(_) => {}
        }
        let no_truncate = self.cfg.unsafe_switches.no_truncate;
        for e in entries {
            let s = e.version.seq;
            match self.log.version_at(s) {
                Some(v) if v == e.version => {}
                Some(_) => {
                    if s <= self.hs.commit.seq || no_truncate {
                        continue; // never rewrite a committed entry
                    }
                    self.log.truncate_after(s - 1);
                    self.mark_truncate(s - 1);
                    self.log.entries.push(e);
                    self.mark_persist(s);
                }
                None => {
                    self.log.entries.push(e);
                    self.mark_persist(s);
                }
            }
        }
        self.sync_log_epoch();
        let new_commit = commit.min(matched).min(self.log.last_seq());
        if new_commit > self.hs.commit.seq
            && let Some(v) = self.log.version_at(new_commit)
        {
            self.hs.commit = v;
        }
        if lease_ms > 0
            && let Some(echo) = echo
            && echo.boot == self.boot
            && echo.at <= now
        {
            let until = echo.at.saturating_add(lease_ms.min(self.cfg.lease_ms));
            self.lease_until = self.lease_until.max(until);
        }
        // Promoted only by an append addressed to this disk: one sent to an
        // earlier incarnation (delayed in the network) says nothing about
        // what this disk holds relative to the primary's commit point now.
        let to_me =
            to_inc == self.cfg.incarnation || self.cfg.unsafe_switches.promote_on_any_append;
        if self.learner && matched >= commit && to_me {
            self.learner = false;
            self.hs.incarnation = self.cfg.incarnation;
            // The primary of this epoch won it: whatever vote the disk
            // remembers for it (a restored copy's, say) stands for this one.
            self.hs.voted_for = Some(from);
        }
        self.reply_append(from, true, matched, self.log.last_seq(), sent_at);
    }

    /// A snapshot (or a chunk of one) from the primary of `epoch`: follow
    /// it. False when we are that primary ourselves (ignore the message).
    fn follow_snapshot_sender(&mut self, now: u64, from: NodeId, epoch: u64) -> bool {
        if self.role == Role::Primary && epoch == self.hs.epoch {
            return false;
        }
        if self.role == Role::Primary {
            self.step_down(now);
        }
        self.follow(now, from);
        true
    }

    /// Bytes `offset ..` of the snapshot at `version`, `total` bytes long.
    /// Chunks are taken in order only, from one primary and for one
    /// snapshot at a time: a chunk at offset 0 of another snapshot starts
    /// over, a repeat or a gap is ignored (the reply says where to go on),
    /// and a chunk of another snapshot that does not start it is answered
    /// with "none of it". The last chunk installs the whole snapshot.
    #[allow(clippy::too_many_arguments)]
    fn on_snapshot_chunk(
        &mut self,
        from: NodeId,
        epoch: u64,
        version: Version,
        offset: u64,
        total: u64,
        data: Vec<u8>,
        sent_at: u64,
    ) {
        if self
            .incoming
            .as_ref()
            .is_some_and(|b| b.version.seq <= self.hs.commit.seq)
        {
            self.incoming = None;
        }
        if version.seq <= self.hs.commit.seq {
            // Nothing to install: the log holds (committed, hence as the
            // primary's) everything up to `version`.
            self.reply_append(from, true, version.seq, self.log.last_seq(), sent_at);
            return;
        }
        if total > self.cfg.max_snapshot_bytes() {
            return;
        }
        match &mut self.incoming {
            Some(b) if (b.epoch, b.version, b.total) == (epoch, version, total) => {
                if offset == b.data.len() as u64 {
                    b.data.extend_from_slice(&data);
                }
            }
            slot if offset == 0 => {
                *slot = Some(SnapshotReceive {
                    epoch,
                    version,
                    total,
                    data,
                });
            }
            _ => {
                self.reply_snapshot_chunk(from, version, 0, sent_at);
                return;
            }
        }
        // `incoming` is now this snapshot (`data.len() <= total - offset`
        // holds for every sane chunk).
        if let Some(b) = self.incoming.take_if(|b| b.data.len() as u64 == b.total) {
            self.install_snapshot(
                from,
                Snapshot {
                    version,
                    data: b.data,
                },
                sent_at,
            );
            return;
        }
        let held = self.incoming.as_ref().map_or(0, |b| b.data.len() as u64);
        self.reply_snapshot_chunk(from, version, held, sent_at);
    }

    fn reply_snapshot_chunk(&mut self, to: NodeId, version: Version, held: u64, sent_at: u64) {
        let msg = Message::SnapshotChunkReply {
            epoch: self.hs.epoch,
            inc: self.cfg.incarnation,
            version,
            held,
            sent_at_echo: sent_at,
        };
        self.msgs.push((to, msg));
    }

    /// Install a whole snapshot from the primary `from` (when it is newer
    /// than our commit point) and acknowledge the log up to it.
    fn install_snapshot(&mut self, from: NodeId, snapshot: Snapshot, sent_at: u64) {
        let v = snapshot.version;
        if v.seq > self.hs.commit.seq {
            // Raft's rule: when the log already holds the snapshot's last
            // entry, the entries after it stay (this replica may have
            // acknowledged them: an append can overtake the snapshot sent
            // for an older rejection); otherwise the whole log goes.
            let keep = self.log.version_at(v.seq) == Some(v)
                && !self.cfg.unsafe_switches.snapshot_drops_suffix;
            let suffix = if keep {
                self.log.slice(v.seq + 1, self.log.last_seq())
            } else {
                Vec::new()
            };
            if !keep {
                self.mark_truncate(v.seq);
            }
            self.log = Log {
                base: v,
                entries: suffix,
                snapshot: Some(snapshot.clone()),
            };
            self.hs.commit = v;
            self.applied = v;
            self.snapshot_to_install = Some(snapshot);
            self.sync_log_epoch();
        }
        self.reply_append(from, true, v.seq, self.log.last_seq(), sent_at);
    }
}

/// The `k`-th largest (0-based) of `values`, without allocating for small
/// clusters.
fn kth_largest(values: impl Iterator<Item = u64>, k: usize) -> Option<u64> {
    let mut buf = [0u64; 16];
    let mut n = 0;
    let mut spill: Vec<u64> = Vec::new();
    for v in values {
        if n < buf.len() {
            buf[n] = v;
            n += 1;
        } else {
            spill.push(v);
        }
    }
    if spill.is_empty() {
        let s = &mut buf[..n];
        s.sort_unstable_by(|a, b| b.cmp(a));
        s.get(k).copied()
    } else {
        spill.extend_from_slice(&buf);
        spill.sort_unstable_by(|a, b| b.cmp(a));
        spill.get(k).copied()
    }
}
