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

/// A message between replicas: the header every message shares (the
/// sender's `epoch`, for a pre-vote the epoch it would leave, and its
/// incarnation `inc`) and a body. [`crate::replication::Replica::step`]
/// rejects a stale header in one place and hands the body to one handler.
///
/// On the wire: `{"epoch": 3, "inc": 7, "body": {"Append": {...}}}`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub epoch: u64,
    pub inc: u64,
    pub body: Body,
}

/// What a message says; see each type.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Body {
    PreVote(PreVote),
    PreVoteReply(PreVoteReply),
    Vote(Vote),
    VoteReply(VoteReply),
    Append(Append),
    AppendReply(AppendReply),
    SnapshotChunk(SnapshotChunk),
    SnapshotChunkReply(SnapshotChunkReply),
    /// Leadership transfer: the primary of the header's epoch tells the
    /// receiver to start an election now.
    TimeoutNow,
}

/// "Would you vote for me in `epoch + 1`?" Changes nothing at the receiver.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreVote {
    pub log_epoch: u64,
    pub last_seq: u64,
}

/// The header's epoch is the epoch the pre-vote was asked in (when
/// granted), else the voter's epoch.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreVoteReply {
    pub granted: bool,
}

/// A candidate for the header's epoch asks for a vote. `transfer`: the
/// primary of the epoch before handed over to this candidate (voters skip
/// the lease check).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vote {
    pub log_epoch: u64,
    pub last_seq: u64,
    pub transfer: bool,
}

/// `lease_wait_ms`: how long, from the voter's point of view, a lease
/// granted by an earlier primary may still run (with the drift margin).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoteReply {
    pub granted: bool,
    pub lease_wait_ms: u64,
}

/// Entries (possibly none: a heartbeat) after `prev`, the commit index,
/// and a lease grant of `lease_ms` counted from `echo.at` on the
/// receiver's clock (0 = no lease).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Append {
    pub prev: Version,
    pub entries: Vec<Entry>,
    pub commit: u64,
    /// primary's clock when sent; echoed in the reply
    pub sent_at: u64,
    pub echo: Option<Echo>,
    pub lease_ms: u64,
    /// The receiver's incarnation as the sender knows it (0: unknown):
    /// a learner is promoted only by appends addressed to its own.
    pub to_inc: u64,
    /// Only a new commit point, pushed as soon as it moved: the receiver
    /// answers it only to refuse it or when it promotes a learner (the
    /// entries and heartbeats around it are answered, which is what leases
    /// and the primary's progress count). Left out on the wire when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub quiet: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `ok`: the log matched `prev`; `match_seq` is then durable and equal to
/// the primary's log. On `!ok`, `last_seq` hints where to resume.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendReply {
    pub ok: bool,
    pub match_seq: u64,
    pub last_seq: u64,
    pub learner: bool,
    pub sent_at_echo: u64,
    pub echo: Echo,
}

/// Catch-up for a backup too far behind: bytes `offset .. offset +
/// data.len()` of the primary's latest snapshot, which is `total` bytes
/// long and covers the log up to `version`. The backup answers with a
/// [`SnapshotChunkReply`], and with an [`AppendReply`] once the last chunk
/// is in (or when it already holds everything up to `version`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotChunk {
    pub version: Version,
    pub offset: u64,
    pub total: u64,
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
    /// primary's clock when sent; echoed in the reply
    pub sent_at: u64,
}

/// The backup holds the first `held` bytes of the snapshot at `version`
/// (0: none of it), so the primary sends the chunk at `held` next.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotChunkReply {
    pub version: Version,
    pub held: u64,
    pub sent_at_echo: u64,
}

impl Message {
    pub fn new(epoch: u64, inc: u64, body: impl Into<Body>) -> Self {
        Message {
            epoch,
            inc,
            body: body.into(),
        }
    }

    /// Whether every number in the message is one a real replica could send:
    /// below `SANE_LIMIT` (so no arithmetic on it can overflow; `Echo::boot`
    /// is an identifier, never computed with, and may be anything), an
    /// append's entries contiguous after `prev`, of no later epoch than the
    /// message and never an earlier one than the entry before, and a
    /// snapshot chunk's bytes inside its snapshot's length.
    /// [`crate::replication::Replica::step`] ignores anything else.
    pub fn is_sane(&self) -> bool {
        let ok = |n: u64| n < SANE_LIMIT;
        let v_ok = |v: &Version| ok(v.epoch) && ok(v.seq);
        let epoch = self.epoch;
        ok(epoch)
            && ok(self.inc)
            && match &self.body {
                Body::PreVote(PreVote {
                    log_epoch,
                    last_seq,
                })
                | Body::Vote(Vote {
                    log_epoch,
                    last_seq,
                    ..
                }) => ok(*log_epoch) && ok(*last_seq) && *log_epoch <= epoch,
                Body::PreVoteReply(_) | Body::TimeoutNow => true,
                Body::VoteReply(r) => ok(r.lease_wait_ms),
                Body::Append(a) => {
                    v_ok(&a.prev)
                        && ok(a.commit)
                        && ok(a.sent_at)
                        && ok(a.lease_ms)
                        && a.echo.is_none_or(|e| ok(e.at))
                        && a.prev.epoch <= epoch
                        && a.entries.iter().enumerate().all(|(i, e)| {
                            v_ok(&e.version)
                                && e.version.epoch <= epoch
                                && e.version.seq == a.prev.seq + 1 + i as u64
                        })
                        && a.entries
                            .windows(2)
                            .all(|w| w[0].version.epoch <= w[1].version.epoch)
                        && a.entries
                            .first()
                            .is_none_or(|e| e.version.epoch >= a.prev.epoch)
                }
                Body::AppendReply(r) => {
                    ok(r.match_seq) && ok(r.last_seq) && ok(r.sent_at_echo) && ok(r.echo.at)
                }
                Body::SnapshotChunk(c) => {
                    v_ok(&c.version)
                        && ok(c.total)
                        && ok(c.sent_at)
                        && c.version.epoch <= epoch
                        && c.offset <= c.total
                        && c.data.len() as u64 <= c.total - c.offset
                }
                Body::SnapshotChunkReply(r) => v_ok(&r.version) && ok(r.held) && ok(r.sent_at_echo),
            }
    }
}

macro_rules! body_from {
    ($($t:ident),*) => {
        $(impl From<$t> for Body {
            fn from(b: $t) -> Body {
                Body::$t(b)
            }
        })*
    };
}
body_from!(
    PreVote,
    PreVoteReply,
    Vote,
    VoteReply,
    Append,
    AppendReply,
    SnapshotChunk,
    SnapshotChunkReply
);

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
