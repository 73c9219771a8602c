//! Durable state: what a replica reads back when it restarts.
//!
//! The core never writes to disk itself: it hands the driver what to persist
//! in [`crate::replication::Ready`], and reads it back through [`Storage`] in
//! [`crate::replication::Replica::new`]. [`MemStorage`] is the in-memory
//! implementation used by the simulator (and a reference for a real one).

use serde::{Deserialize, Serialize};

use super::message::{Entry, Snapshot, Version};
use super::{NodeId, Ready};

/// State that must be on disk before any message that depends on it is sent.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct HardState {
    /// Highest epoch this replica has seen. Never decreases.
    pub epoch: u64,
    /// The candidate this replica voted for in `epoch` (at most one).
    pub voted_for: Option<NodeId>,
    /// Epoch of the primary whose log this replica last installed (through
    /// that primary's `EpochStart`): the epoch of the last log entry (or of
    /// the snapshot). `log_epoch <= epoch`.
    pub log_epoch: u64,
    /// Highest committed entry known. Never decreases in memory; on disk it
    /// may lag after a crash (a new commit point alone is not synced, see
    /// [`crate::replication::Ready::sync`]). `commit.seq <=` last log index
    /// (or the snapshot's).
    pub commit: Version,
    /// The incarnation (data-dir identity) this state belongs to. A replica
    /// whose configured incarnation differs starts as a non-voting learner.
    pub incarnation: u64,
}

/// What the core reads at start-up. Implementations must return what the
/// driver persisted from every `Ready` handled so far.
pub trait Storage {
    fn hard_state(&self) -> HardState;
    /// The latest snapshot, if any (entries up to its version are compacted).
    fn snapshot(&self) -> Option<Snapshot>;
    /// Every log entry after the snapshot, in order, contiguous.
    fn entries(&self) -> Vec<Entry>;
}

/// In-memory storage. `MemStorage::bootstrap(inc)` is the disk of a member of
/// a brand-new cluster (a voter from the start); `MemStorage::default()` is a
/// blank disk, whose replica joins as a learner.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    pub hard_state: HardState,
    pub snapshot: Option<Snapshot>,
    /// Entries after `snapshot`, contiguous.
    pub entries: Vec<Entry>,
}

impl MemStorage {
    /// The disk of a replica that is part of the cluster's first
    /// configuration (all replicas start with empty logs, as voters).
    pub fn bootstrap(incarnation: u64) -> Self {
        MemStorage {
            hard_state: HardState {
                incarnation,
                ..HardState::default()
            },
            ..MemStorage::default()
        }
    }

    fn base_seq(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.version.seq)
    }

    /// Persist what a `Ready` asks for, in the order the contract requires:
    /// snapshot, hard state, truncation, entries.
    pub fn persist(&mut self, ready: &Ready) {
        if let Some(snap) = &ready.snapshot_to_install {
            let base = self.base_seq();
            self.entries
                .retain(|e| e.version.seq > snap.version.seq && e.version.seq > base);
            if self
                .entries
                .first()
                .is_some_and(|e| e.version.seq != snap.version.seq + 1)
            {
                self.entries.clear(); // not contiguous after the snapshot
            }
            self.snapshot = Some(snap.clone());
        }
        if let Some(hs) = &ready.hard_state {
            self.hard_state = hs.clone();
        }
        if let Some(t) = ready.truncate_after {
            let keep = t.saturating_sub(self.base_seq()) as usize;
            self.entries.truncate(keep);
        }
        for e in &ready.entries {
            let idx = e.version.seq.saturating_sub(self.base_seq() + 1) as usize;
            if e.version.seq <= self.base_seq() {
                continue;
            }
            self.entries.truncate(idx);
            self.entries.push(e.clone());
        }
    }

    /// The driver took a snapshot (see `Replica::snapshot_taken`), or the
    /// log was compacted (`Ready::compacted`) and this is the state
    /// machine at that point: store it and drop the entries it covers. One
    /// at the current base replaces the bytes kept for it.
    pub fn compact(&mut self, snapshot: Snapshot) {
        let base = self.base_seq();
        if snapshot.version.seq < base {
            return;
        }
        let drop = (snapshot.version.seq - base) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot = Some(snapshot);
    }
}

impl Storage for MemStorage {
    fn hard_state(&self) -> HardState {
        self.hard_state.clone()
    }
    fn snapshot(&self) -> Option<Snapshot> {
        self.snapshot.clone()
    }
    fn entries(&self) -> Vec<Entry> {
        self.entries.clone()
    }
}
