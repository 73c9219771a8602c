//! The catalog's replication core: a sans-IO primary-backup protocol.
//!
//! [`Replica`] is a value with synchronous methods only. Time arrives as
//! `now_ms` arguments (a monotonic clock of the calling process), randomness
//! from a seed in [`Config`], messages through [`Replica::step`], client
//! writes through [`Replica::propose`]; everything it wants done comes out of
//! [`Replica::ready`]. The same code runs under the real driver (HTTP + SQLite)
//! and under the deterministic simulator in `tests/it/simulation.rs`.
//!
//! # The protocol in one page
//!
//! Viewstamped Replication (Revisited) with the original system's rule
//! "highest process id is primary", Raft's votes and log matching, and
//! PacificA-style leases.
//!
//! * **Epochs and votes.** A candidate first asks for a *pre-vote* (which
//!   changes nothing anywhere), then for votes in `epoch + 1`. A replica
//!   grants at most one vote per epoch and the driver persists
//!   `(epoch, voted_for)` before the reply is sent (it is in the same
//!   `Ready`, and the contract persists before sending). Every message of an
//!   older epoch is rejected in one place ([`Replica::step`]), answered only
//!   with our epoch so the sender catches up: a deposed primary cannot commit.
//!   A replica that heard from a live primary within the lease grants
//!   nothing (neither pre-votes nor votes), so a partitioned replica cannot
//!   disrupt a healthy view.
//! * **Highest id preferred.** Election timeouts are ordered by id (each
//!   replica waits `2 × heartbeat` more per higher-id replica), a voter
//!   that granted a pre-vote to a higher-id candidate refuses lower-id ones
//!   for one election timeout (unless their log is further ahead: deferring
//!   to candidates that cannot win could stall every election, as the
//!   simulator found with five replicas), and a voter refuses a lower-id candidate
//!   whose log is not ahead of its own (and campaigns itself instead). A
//!   primary hands over to a higher-id replica that stayed in its view for
//!   `takeover_after_ms` (a leadership transfer), so a recovered higher-id
//!   replica takes primaryship back only after it proved healthy: a
//!   flapping replica never qualifies.
//! * **Whose state wins.** Logs are compared by `(log_epoch, last seq)`.
//!   A new primary's first entry is an `EpochStart`, appended after
//!   everything it inherited, so the epoch of a replica's last entry is the
//!   epoch of the primary whose log (through its start) the replica last
//!   installed — VR's "latest normal view" — and that is `log_epoch`. Merely
//!   hearing from a newer primary does not change it (the simulator found
//!   that counting a short prefix of a newer primary's log as "installed"
//!   loses committed entries). The new primary answers nothing (no writes,
//!   no reads, no retried requests) before its `EpochStart` commits, which
//!   commits everything it inherited; it only ever commits entries of its
//!   own epoch directly.
//! * **View and commit.** The primary grants a lease to each backup that is
//!   caught up and acknowledging: that is its *view*. An entry commits when
//!   every backup that holds (or may still hold) a lease has it durably
//!   *and* a majority of all replicas has it durably, so a committed entry is
//!   always on a majority even while the view is being rebuilt. A backup
//!   that stops acknowledging for `lease/4`, or lags by more than `lease/4`
//!   on an entry, gets no more leases and stops being required once the last
//!   lease it was granted surely ran out (`lease × (1 + drift)` after the
//!   append that granted it). Without a majority acknowledging within the
//!   lease the primary refuses writes ([`ProposeError::NoQuorum`]); without
//!   acknowledgements for `lease + election_timeout` it steps down. A commit
//!   point that moved is pushed to the view at once, so backups apply (and
//!   serve) it without waiting for the next heartbeat; such a push without
//!   entries is `quiet`, answered only by a refusal or a learner's
//!   promotion. Leases and the primary's progress count the answers to
//!   entries and heartbeats, which always come; an unanswered push can only
//!   leave the primary's picture of a backup older, the safe side.
//! * **Log matching.** Appends carry the `(epoch, seq)` of the preceding
//!   entry; a backup whose log does not match there rejects (hinting its
//!   commit point) and the primary probes backwards one message at a time. A
//!   conflicting (hence uncommitted) suffix is truncated and replaced, so an
//!   uncommitted suffix never survives a view change once the backup has
//!   caught up. Only committed entries are handed out for applying. A backup
//!   whose next entry is already compacted receives the latest snapshot,
//!   streamed in chunks of at most [`Config::snapshot_chunk_bytes`] with one
//!   chunk in flight: the backup answers each with how much of that
//!   snapshot it holds and the primary sends the next at once, or resends
//!   from the confirmed offset after `4 × heartbeat` without an answer; a
//!   newer snapshot at the primary restarts the transfer. The backup installs
//!   it only once every byte is in, so it is never in the view before.
//! * **Leases (why they are safe with bounded clock drift).** Clocks are
//!   monotonic and per process; they are never compared across machines,
//!   only durations are, and durations may differ by a rate up to
//!   `drift_margin`.
//!   - *Primary lease*: the primary counts from its own send time `T` of a
//!     heartbeat acknowledged by a majority; it serves reads until
//!     `T + lease`. Every acknowledging voter received that heartbeat after
//!     `T`, so its "last contact with a primary" is later than `T`.
//!   - *Backup lease*: only a ready primary (epoch start committed, earlier
//!     leases run out) grants them. Each reply carries the backup's own clock `S`
//!     (tagged with a per-process boot id); the primary echoes the latest `S`
//!     in the next append together with a grant of
//!     `min(lease, primary's remaining lease)`. The primary sent that append
//!     after it received the reply, i.e. after `S`, so a backup serving until
//!     `S + grant` stops before the primary's lease ends and before
//!     `send time + lease`. The primary stops requiring a backup only
//!     `lease × (1 + drift)` after the last append that granted it a lease.
//!     (Counting from the backup's *receive* time would be unsafe: a delayed
//!     heartbeat would stretch the lease past what the primary assumes.)
//!   - *New primary*: each vote reports how long, on the voter's clock, an
//!     earlier primary may still hold a lease (`last contact + lease × (1 +
//!     drift) − now`); the candidate waits that long from when it *received*
//!     the vote (later than when it was sent) before accepting writes,
//!     serving reads, granting backup leases or answering retried requests
//!     from its applied table. Any majority of voters overlaps the old primary's lease
//!     majority, and a voter's epoch only grows, so it acknowledged the old
//!     primary before it voted. A restarted replica assumes it heard from a
//!     primary at its restart.
//! * **Versioned reads.** Every commit has a version `(epoch, seq)`;
//!   [`Replica::read_gate`] answers Serve only with a lease and once the
//!   asked version is applied, NotYet when only the version is missing.
//! * **Linearizable reads.** A read waits until the replica has applied its
//!   [`Replica::read_index`], taken when the read arrives: the primary's
//!   commit point, or a backup's log end (a lease holder's log holds every
//!   committed entry, since commits wait for every lease holder). The driver
//!   publishes state and read index before it sends anything.
//! * **Caches outside the core.** With [`Config::fence_caches`], a new
//!   primary is not ready until the driver reports (through
//!   [`Replica::caches_fenced`]) that every cache earlier primaries kept
//!   coherent was flushed.
//! * **Disk identity.** A replica whose persisted incarnation differs from
//!   its configured one (a new or restored disk) is a learner: it neither
//!   votes nor campaigns nor serves reads until it caught up with a primary's
//!   commit index; it then counts as having voted for that primary in that
//!   epoch. Incarnations must grow each time a data dir is created; messages
//!   from an older incarnation than one already seen are ignored, and a
//!   primary forgets everything a peer acknowledged under an older one.
//! * **Exactly once** is a property of the log and of apply: every entry
//!   carries its request id, and the driver's state machine applies an id at
//!   most once (returning the stored result to a retry).
//!
//! # Driving the core (the contract)
//!
//! Every driver loops: give the core an event (a tick, a message, a client
//! write), then carry out [`Replica::ready`] in this order — the order
//! [`drive::advance`] writes down once for every driver:
//!
//! 1. persist durably: `snapshot_to_install` (replaces the state machine;
//!    deletes log entries up to its seq, keeps those after it),
//!    `hard_state`, `truncate_after` (delete entries with seq > it),
//!    `entries` (append or overwrite);
//! 2. only then send `messages` (loss, duplication, reordering and delay
//!    are all fine);
//! 3. apply `committed` in order (skip seq <= your applied seq), then
//!    answer the clients whose versions are now applied;
//! 4. if `compacted` is `v`: once `committed` is applied, record that the
//!    log is compacted up to `v` and drop log entries `<= v.seq` (a driver
//!    whose state machine is not durable keeps a snapshot of it at `v`);
//! 5. if `need_snapshot`: serialize the state machine at its applied
//!    version `v` (now, or beside the driver from a view of the state at
//!    `v` while later steps go on), call [`Replica::snapshot_taken`], and
//!    if it accepts, persist the snapshot; then you may drop log entries
//!    `<= v.seq`.
//!
//! Compaction costs nothing until a backup needs a snapshot: every
//! `snapshot_threshold` applied entries the core drops the log it applied
//! (`compacted`), and asks for bytes (`need_snapshot`) only for a backup
//! whose next entry is compacted and that answers; one that does not is
//! asked, with an empty append at the compacted base, until it does.
//! Building bytes at every compaction encoded every answer kept (tens of
//! thousands under load) each time, so its cost per write grew with the
//! write rate; building them for a backup that is down wasted as much.
//!
//! One replica alone, driven by hand (the doctest runs it):
//!
//! ```
//! use pygmy::replication::{Config, MemStorage, ReadGate, Replica, Role, Version};
//!
//! let mut disk = MemStorage::bootstrap(1);
//! let mut r = Replica::new(Config::new(1, 1, vec![1], 7), &disk, 0);
//! let mut applied = Vec::new();
//! let mut now = 0;
//! let mut drive = |r: &mut Replica, disk: &mut MemStorage, applied: &mut Vec<_>| {
//!     let rd = r.ready();
//!     disk.persist(&rd); // 1. durably, before anything leaves
//!     assert!(rd.messages.is_empty()); // 2. send (no peers here)
//!     applied.extend(rd.committed.iter().map(|e| e.version)); // 3. apply
//! };
//! // With no primary known, an election starts by itself; the new primary
//! // waits out any earlier primary's lease before it takes writes.
//! while !r.is_primary_ready() {
//!     now += 10;
//!     r.tick(now);
//!     drive(&mut r, &mut disk, &mut applied);
//! }
//! assert_eq!(r.role(), Role::Primary);
//! let v = r.propose(now, "req-1".into(), b"buy book 1".to_vec()).unwrap();
//! drive(&mut r, &mut disk, &mut applied);
//! assert_eq!(applied.last(), Some(&v), "committed and applied: answer the client");
//! assert_eq!(r.read_gate(now, v), ReadGate::Serve);
//! assert!(r.serve_until(now).is_some_and(|until| until > now));
//! assert_eq!(r.read_gate(now, Version::new(v.epoch, v.seq + 1)), ReadGate::NotYet);
//! ```
//!
//! A proposal's client is answered when the committed entry at its version's
//! seq carries its request id (with the result stored by apply); if another
//! entry committed there (the primary was deposed), the client retries with
//! the same request id. A read asks [`Replica::read_gate`] after applying. A primary answers a
//! retried request id from its applied table only when
//! [`Replica::is_primary_ready`]. After a restart, committed entries are
//! handed out again from the snapshot on: a driver whose state machine is
//! durable skips those it already applied.

//!
//! # Timing defaults
//!
//! Heartbeat 50 ms, lease 500 ms, election timeout 500 ms (plus 100 ms per
//! higher-id replica and up to 50 ms jitter), drift margin 0.1, takeover
//! after 2 s (four leases). A primary crash costs about one lease plus one
//! round of pre-vote/vote/epoch-start (≈ 0.6–0.8 s without a successful
//! write), a dead backup stalls commits for at most `lease/4 + lease × 1.1`
//! (≈ 0.7 s); ten heartbeats per lease keep a busy machine from flapping.
//!
//! # Tests
//!
//! Unit tests (`tests.rs`) are named after the rule they check. The seeded
//! simulator (`tests/it/simulation.rs`, `tests/it/sim/`) runs thousands of
//! schedules with crashes, partitions, message loss/duplication/reordering,
//! disk replacement and clock skew; its "teeth" tests switch off one
//! mechanism at a time through [`UnsafeSwitches`] and assert that the
//! simulator finds a violation of the property it protects (and that the
//! same schedule passes with the mechanism on).

pub mod drive;
mod log;
mod message;
mod replica;
mod rng;
mod storage;

#[cfg(test)]
mod tests;

pub use message::{
    Append, AppendReply, Body, Echo, Entry, EntryKind, Message, PreVote, PreVoteReply, Snapshot,
    SnapshotChunk, SnapshotChunkReply, Version, Vote, VoteReply,
};
pub use replica::Replica;
pub use rng::SplitMix64;
pub use storage::{HardState, MemStorage, Storage};

use serde::{Deserialize, Serialize};

/// The process id of a replica; the highest live one is preferred as primary.
pub type NodeId = u64;

/// Switches that disable one safety mechanism each, so the simulator can show
/// that it finds the resulting violations. All `false` in production.
#[doc(hidden)]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsafeSwitches {
    /// Keep `(epoch, voted_for)` of a granted vote in memory only.
    pub vote_not_persisted: bool,
    /// Accept messages of an older epoch as if current.
    pub accept_stale_epoch: bool,
    /// Compare logs by the highest epoch seen instead of `log_epoch`.
    pub compare_by_seen_epoch: bool,
    /// A new primary writes no `EpochStart` and is ready at once.
    pub skip_epoch_start: bool,
    /// Keep conflicting / unmatched suffixes instead of truncating them.
    pub no_truncate: bool,
    /// A new primary does not wait for the old leases to run out.
    pub no_lease_wait: bool,
    /// Backups serve reads without a lease.
    pub backup_reads_without_lease: bool,
    /// The read gate ignores the asked minimum version.
    pub reads_ignore_version: bool,
    /// Incarnations are ignored: a new disk votes at once, old acks count.
    pub ignore_incarnation: bool,
    /// A backup's read index is what it has applied, not the end of its log.
    pub backup_read_index_applied: bool,
    /// Installing a snapshot drops the whole log, even entries after the
    /// snapshot's last one that the log already holds (and acknowledged).
    pub snapshot_drops_suffix: bool,
    /// The primary serves reads without a majority's recent acknowledgement.
    pub primary_reads_without_lease: bool,
    /// Commits wait for a majority only, not for every backup that holds
    /// (or may still hold) a lease.
    pub commit_ignores_lease_holders: bool,
    /// Backup leases are not capped at what is left of the primary's.
    pub backup_lease_uncapped: bool,
    /// Every message of a step leaves before the step's persist, not only a
    /// primary's appends: a backup acknowledges, a voter grants, before its
    /// disk holds what it answers for.
    pub send_everything_before_persisting: bool,
    /// A learner is promoted by any append that shows it caught up, even one
    /// addressed to an earlier incarnation of its disk.
    pub promote_on_any_append: bool,
    /// A voter that granted a pre-vote to a higher id refuses every lower
    /// id for an election timeout, even one whose log is further ahead.
    pub defer_regardless_of_logs: bool,
    /// Held entries commit as if released at once.
    pub commit_ignores_holds: bool,
}

/// Settings of one replica. Durations are in milliseconds of the driver's
/// monotonic clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// This replica's process id; must be in `replicas`.
    pub id: NodeId,
    /// Identity of this replica's data dir; must grow whenever a data dir is
    /// created anew (new or restored disk).
    pub incarnation: u64,
    /// All replica ids of the cluster (fixed membership).
    pub replicas: Vec<NodeId>,
    /// Primary sends appends/heartbeats this often. Default 50.
    pub heartbeat_ms: u64,
    /// Lease length. Default 500.
    pub lease_ms: u64,
    /// A follower that heard nothing from a primary for this long (plus its
    /// id-ordered delay) starts a pre-vote. Default 500 (= lease).
    pub election_timeout_ms: u64,
    /// Bound on the relative rate difference of clocks. Default 0.1.
    pub drift_margin: f64,
    /// A higher-id backup continuously in the view this long takes
    /// primaryship back. Default 2000 (4 leases).
    pub takeover_after_ms: u64,
    /// Most entries per append message. Default 256.
    pub max_batch: usize,
    /// Compact the log (`Ready::compacted`) when this many applied entries
    /// are not yet compacted. Default 10 000.
    pub snapshot_threshold: u64,
    /// Largest snapshot chunk a primary sends (bytes; 0 counts as 1). A
    /// backup takes snapshots of up to [`MAX_SNAPSHOT_CHUNKS`] of them.
    /// Default 256 KiB.
    pub snapshot_chunk_bytes: usize,
    /// Seed of the core's PRNG. Must differ at every process start.
    pub seed: u64,
    /// A new primary is not ready (exposes nothing, answers nothing) until
    /// the driver calls [`Replica::caches_fenced`] for its epoch: caches
    /// outside the core that earlier primaries kept coherent are flushed.
    pub fence_caches: bool,
    #[doc(hidden)]
    pub unsafe_switches: UnsafeSwitches,
}

impl Config {
    /// Defaults for a replica `id` of `replicas`.
    pub fn new(id: NodeId, incarnation: u64, replicas: Vec<NodeId>, seed: u64) -> Self {
        Config {
            id,
            incarnation,
            replicas,
            heartbeat_ms: 50,
            lease_ms: 500,
            election_timeout_ms: 500,
            drift_margin: 0.1,
            takeover_after_ms: 2000,
            max_batch: 256,
            snapshot_threshold: 10_000,
            snapshot_chunk_bytes: 256 * 1024,
            seed,
            fence_caches: false,
            unsafe_switches: UnsafeSwitches::default(),
        }
    }

    /// The largest snapshot a backup accepts (bytes): anything longer is
    /// taken for nonsense, so a hostile `total` cannot make it buffer
    /// without bound.
    pub fn max_snapshot_bytes(&self) -> u64 {
        (self.snapshot_chunk_bytes.max(1) as u64).saturating_mul(MAX_SNAPSHOT_CHUNKS)
    }

    /// `lease × (1 + drift_margin)`: how long a lease may run on another
    /// clock.
    pub fn safe_lease_ms(&self) -> u64 {
        (self.lease_ms as f64 * (1.0 + self.drift_margin)).ceil() as u64
    }
}

/// A snapshot longer than this many chunks is refused (16 GiB at the
/// default chunk size).
pub const MAX_SNAPSHOT_CHUNKS: u64 = 1 << 16;

/// Why a write was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProposeError {
    /// Ask `primary` (when known) instead.
    NotPrimary { primary: Option<NodeId> },
    /// No majority reachable: answer 503.
    NoQuorum,
    /// Leadership transfer under way: retry with the same request id.
    TransferInProgress,
    /// New primary not ready yet (epoch start not committed or old leases
    /// not yet expired): retry with the same request id.
    NotReady,
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposeError::NotPrimary { primary: Some(p) } => write!(f, "not primary (try {p})"),
            ProposeError::NotPrimary { primary: None } => write!(f, "not primary (none known)"),
            ProposeError::NoQuorum => write!(f, "no majority of replicas reachable"),
            ProposeError::TransferInProgress => write!(f, "leadership transfer in progress"),
            ProposeError::NotReady => write!(f, "primary not ready yet"),
        }
    }
}

impl std::error::Error for ProposeError {}

/// Answer of [`Replica::read_gate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadGate {
    /// Read the applied state now.
    Serve,
    /// In sync, but the asked version is not applied yet: retry or ask
    /// another replica.
    NotYet,
    /// No lease / not in sync: this replica may not serve reads (503).
    Refuse,
}

/// A replica's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Primary,
}

/// Snapshot of a replica's state, for `pygmy status` and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub learner: bool,
    pub epoch: u64,
    pub primary: Option<NodeId>,
    pub log_epoch: u64,
    pub last: Version,
    pub commit: Version,
    pub applied: Version,
    /// The primary and the backups it currently grants leases to (empty on
    /// a backup). While backups catch up it may be smaller than a majority;
    /// commits then still wait for a majority of durable copies.
    pub view: Vec<NodeId>,
    pub transferring_to: Option<NodeId>,
}

/// Everything the driver must do after an input, in the order of the
/// contract (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ready {
    /// Replace the state machine with this snapshot and delete the log
    /// entries it covers (those after it stay, unless `truncate_after`
    /// deletes them too).
    pub snapshot_to_install: Option<Snapshot>,
    /// Persist (before sending anything).
    pub hard_state: Option<HardState>,
    /// Delete persisted entries with `seq >` this.
    pub truncate_after: Option<u64>,
    /// Append (overwriting any entry with the same seq), durably.
    pub entries: Vec<Entry>,
    /// Send after persisting.
    pub messages: Vec<(NodeId, Message)>,
    /// Apply in order after persisting.
    pub committed: Vec<Entry>,
    /// Take a snapshot and call `Replica::snapshot_taken`: a backup needs
    /// one (its next entry is compacted) and the core holds no bytes.
    pub need_snapshot: bool,
    /// The log is compacted up to this version, which `committed` reaches
    /// (the state machine, once it applied them, is the snapshot at it):
    /// record that, and drop persisted entries `<=` its seq. No bytes are
    /// built: they are asked for (`need_snapshot`) only when a backup
    /// needs them, and then at whatever version is applied by then.
    pub compacted: Option<Version>,
    /// What this `Ready` persists must be on disk (fsync'd) before anything
    /// that depends on it leaves. False when all it persists is a later
    /// commit point (and the state applied up to it): losing that in a
    /// crash loses nothing anyone was promised — the commit point is learnt
    /// again and committed entries are applied again — so a driver may
    /// write it without waiting for the disk; its next synced write makes
    /// it durable with everything before it.
    pub sync: bool,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.snapshot_to_install.is_none()
            && self.hard_state.is_none()
            && self.truncate_after.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.committed.is_empty()
            && !self.need_snapshot
            && self.compacted.is_none()
    }
}
