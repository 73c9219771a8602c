//! Wire types: log entries, snapshots and the messages replicas exchange.
//!
//! Everything here is `Serialize + Deserialize`; the driver sends messages as
//! JSON. Every message carries the sender's `epoch` and `inc` (incarnation):
//! [`crate::replication::Replica::step`] rejects stale ones in one place.

use serde::{Deserialize, Serialize};

/// Position of a committed write: the epoch of the primary that created the
/// entry and its global log index. Ordered lexicographically.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize, Default,
)]
pub struct Version {
    pub epoch: u64,
    pub seq: u64,
}

impl Version {
    pub const fn new(epoch: u64, seq: u64) -> Self {
        Version { epoch, seq }
    }
}

/// What a log entry carries. The core never interprets `Op` bytes.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum EntryKind {
    /// An operation for the driver's state machine.
    Op(Vec<u8>),
    /// Written by a new primary before it answers anything; commits every
    /// entry it inherited.
    EpochStart,
}

/// One log entry.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// `epoch` = epoch of the primary that created it; `seq` = log index
    /// (1-based, contiguous).
    pub version: Version,
    /// The client's request id (exactly-once is enforced at apply time by the
    /// driver's state machine, which remembers applied ids and their results).
    pub request_id: String,
    pub kind: EntryKind,
}

/// A snapshot of the driver's state machine after applying every entry up to
/// and including `version` (opaque bytes, produced and consumed by the driver;
/// it must contain the applied request ids with their results).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: Version,
    pub data: Vec<u8>,
}

/// A timestamp a backup put in a reply, echoed back by the primary. `boot`
/// identifies the backup's process life (its monotonic clock restarts with
/// the process), `at` is the backup's clock when it sent the reply.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Echo {
    pub boot: u64,
    pub at: u64,
}

/// Messages between replicas. `epoch` is the sender's current epoch (for a
/// `PreVote`, the epoch it would leave), `inc` the sender's incarnation.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Message {
    /// "Would you vote for me in `epoch + 1`?" Changes nothing at the receiver.
    PreVote {
        epoch: u64,
        inc: u64,
        log_epoch: u64,
        last_seq: u64,
    },
    /// `epoch` = the epoch the pre-vote was asked in (when granted), else the
    /// voter's epoch.
    PreVoteReply { epoch: u64, inc: u64, granted: bool },
    /// A candidate for `epoch` asks for a vote. `transfer` = the primary of
    /// `epoch - 1` handed over to this candidate (voters skip the lease check).
    Vote {
        epoch: u64,
        inc: u64,
        log_epoch: u64,
        last_seq: u64,
        transfer: bool,
    },
    /// `lease_wait_ms`: how long, from the voter's point of view, a lease
    /// granted by an earlier primary may still run (with the drift margin).
    VoteReply {
        epoch: u64,
        inc: u64,
        granted: bool,
        lease_wait_ms: u64,
    },
    /// Entries (possibly none: a heartbeat) after `prev`, the commit index,
    /// and a lease grant of `lease_ms` counted from `echo.at` on the
    /// receiver's clock (0 = no lease).
    Append {
        epoch: u64,
        inc: u64,
        prev: Version,
        entries: Vec<Entry>,
        commit: u64,
        /// primary's clock when sent; echoed in the reply
        sent_at: u64,
        echo: Option<Echo>,
        lease_ms: u64,
        /// The receiver's incarnation as the sender knows it (0: unknown):
        /// a learner is promoted only by appends addressed to its own.
        #[serde(default)]
        to_inc: u64,
    },
    /// `ok`: the log matched `prev`; `match_seq` is then durable and equal to
    /// the primary's log. On `!ok`, `last_seq` hints where to resume.
    AppendReply {
        epoch: u64,
        inc: u64,
        ok: bool,
        match_seq: u64,
        last_seq: u64,
        learner: bool,
        sent_at_echo: u64,
        echo: Echo,
    },
    /// A whole snapshot in one message. Replicas now stream snapshots in
    /// [`Message::SnapshotChunk`]s and no longer send this; a backup still
    /// installs one it receives, with the same checks.
    InstallSnapshot {
        epoch: u64,
        inc: u64,
        snapshot: Snapshot,
        commit: u64,
        sent_at: u64,
    },
    /// Catch-up for a backup too far behind: bytes `offset ..
    /// offset + data.len()` of the primary's latest snapshot, which is
    /// `total` bytes long and covers the log up to `version`. The backup
    /// answers with a [`Message::SnapshotChunkReply`], and with an
    /// [`Message::AppendReply`] once the last chunk is in (or when it
    /// already holds everything up to `version`).
    SnapshotChunk {
        epoch: u64,
        inc: u64,
        version: Version,
        offset: u64,
        total: u64,
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
        /// primary's clock when sent; echoed in the reply
        sent_at: u64,
    },
    /// The backup holds the first `held` bytes of the snapshot at `version`
    /// (0: none of it), so the primary sends the chunk at `held` next.
    SnapshotChunkReply {
        epoch: u64,
        inc: u64,
        version: Version,
        held: u64,
        sent_at_echo: u64,
    },
    /// Leadership transfer: the primary of `epoch` tells the receiver to start
    /// an election now.
    TimeoutNow { epoch: u64, inc: u64 },
}

impl Message {
    /// The sender's epoch.
    pub fn epoch(&self) -> u64 {
        match self {
            Message::PreVote { epoch, .. }
            | Message::PreVoteReply { epoch, .. }
            | Message::Vote { epoch, .. }
            | Message::VoteReply { epoch, .. }
            | Message::Append { epoch, .. }
            | Message::AppendReply { epoch, .. }
            | Message::InstallSnapshot { epoch, .. }
            | Message::SnapshotChunk { epoch, .. }
            | Message::SnapshotChunkReply { epoch, .. }
            | Message::TimeoutNow { epoch, .. } => *epoch,
        }
    }

    /// The sender's incarnation.
    pub fn inc(&self) -> u64 {
        match self {
            Message::PreVote { inc, .. }
            | Message::PreVoteReply { inc, .. }
            | Message::Vote { inc, .. }
            | Message::VoteReply { inc, .. }
            | Message::Append { inc, .. }
            | Message::AppendReply { inc, .. }
            | Message::InstallSnapshot { inc, .. }
            | Message::SnapshotChunk { inc, .. }
            | Message::SnapshotChunkReply { inc, .. }
            | Message::TimeoutNow { inc, .. } => *inc,
        }
    }

    /// Whether every number in the message is one a real replica could send:
    /// below [`SANE_LIMIT`] (so no arithmetic on it can overflow; `Echo::boot`
    /// is an identifier, never computed with, and may be anything), an
    /// append's entries contiguous after `prev`, of no later epoch than the
    /// message, and a snapshot chunk's bytes inside its snapshot's length.
    /// [`crate::replication::Replica::step`] ignores anything else.
    pub fn is_sane(&self) -> bool {
        let ok = |n: u64| n < SANE_LIMIT;
        let v_ok = |v: &Version| ok(v.epoch) && ok(v.seq);
        match self {
            Message::PreVote {
                epoch,
                inc,
                log_epoch,
                last_seq,
            }
            | Message::Vote {
                epoch,
                inc,
                log_epoch,
                last_seq,
                ..
            } => ok(*epoch) && ok(*inc) && ok(*log_epoch) && ok(*last_seq) && log_epoch <= epoch,
            Message::PreVoteReply { epoch, inc, .. } | Message::TimeoutNow { epoch, inc } => {
                ok(*epoch) && ok(*inc)
            }
            Message::VoteReply {
                epoch,
                inc,
                lease_wait_ms,
                ..
            } => ok(*epoch) && ok(*inc) && ok(*lease_wait_ms),
            Message::Append {
                epoch,
                inc,
                prev,
                entries,
                commit,
                sent_at,
                echo,
                lease_ms,
                ..
            } => {
                ok(*epoch)
                    && ok(*inc)
                    && v_ok(prev)
                    && ok(*commit)
                    && ok(*sent_at)
                    && ok(*lease_ms)
                    && echo.is_none_or(|e| ok(e.at))
                    && prev.epoch <= *epoch
                    && entries.iter().enumerate().all(|(i, e)| {
                        v_ok(&e.version)
                            && e.version.epoch <= *epoch
                            && e.version.seq == prev.seq + 1 + i as u64
                    })
                    && entries
                        .windows(2)
                        .all(|w| w[0].version.epoch <= w[1].version.epoch)
                    && entries
                        .first()
                        .is_none_or(|e| e.version.epoch >= prev.epoch)
            }
            Message::AppendReply {
                epoch,
                inc,
                match_seq,
                last_seq,
                sent_at_echo,
                echo,
                ..
            } => {
                ok(*epoch)
                    && ok(*inc)
                    && ok(*match_seq)
                    && ok(*last_seq)
                    && ok(*sent_at_echo)
                    && ok(echo.at)
            }
            Message::InstallSnapshot {
                epoch,
                inc,
                snapshot,
                commit,
                sent_at,
            } => {
                ok(*epoch)
                    && ok(*inc)
                    && v_ok(&snapshot.version)
                    && ok(*commit)
                    && ok(*sent_at)
                    && snapshot.version.epoch <= *epoch
            }
            Message::SnapshotChunk {
                epoch,
                inc,
                version,
                offset,
                total,
                data,
                sent_at,
            } => {
                ok(*epoch)
                    && ok(*inc)
                    && v_ok(version)
                    && ok(*total)
                    && ok(*sent_at)
                    && version.epoch <= *epoch
                    && offset <= total
                    && data.len() as u64 <= total - offset
            }
            Message::SnapshotChunkReply {
                epoch,
                inc,
                version,
                held,
                sent_at_echo,
            } => ok(*epoch) && ok(*inc) && v_ok(version) && ok(*held) && ok(*sent_at_echo),
        }
    }
}

/// Numbers in messages stay below this (2^62): far beyond any real epoch,
/// sequence number, incarnation or clock reading.
pub const SANE_LIMIT: u64 = 1 << 62;

/// Bytes as base64 text on the wire: JSON would spell a `Vec<u8>` as an
/// array of numbers, about 3.5 characters a byte; base64 takes 1.33.
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_str(Base64Visitor)
    }

    struct Base64Visitor;

    impl de::Visitor<'_> for Base64Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("base64 text")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
            STANDARD.decode(text).map_err(E::custom)
        }
    }
}
