//! The replicated log in memory: a snapshot point followed by contiguous
//! entries. The only way to change entries; it keeps its invariants itself.

use super::message::{Entry, Snapshot, Version};

/// A snapshot point followed by entries.
///
/// Invariants (every method keeps them):
/// * `entries[i].version.seq == base.seq + 1 + i` (contiguous after the
///   snapshot point);
/// * epochs never decrease: `base.epoch <= entries[0].version.epoch <=
///   entries[1].version.epoch <= …`;
/// * `snapshot`, when present, is at `base`.
#[derive(Clone, Debug, Default)]
pub struct Log {
    base: Version,
    entries: Vec<Entry>,
    snapshot: Option<Snapshot>,
}

impl Log {
    /// The log a restarting replica holds: the stored snapshot, then the
    /// stored entries that continue it without a gap (a gap, or an entry of
    /// an earlier epoch than the one before it, ends the usable log).
    pub fn restore(snapshot: Option<Snapshot>, stored: impl IntoIterator<Item = Entry>) -> Self {
        let base = snapshot.as_ref().map_or(Version::default(), |s| s.version);
        let mut log = Log {
            base,
            entries: Vec::new(),
            snapshot,
        };
        for e in stored {
            if e.version.seq <= log.last_seq() {
                continue;
            }
            if !log.push(e) {
                break;
            }
        }
        log
    }

    /// The version the latest snapshot covers (`(0, 0)`: none).
    pub fn base(&self) -> Version {
        self.base
    }

    /// The latest snapshot, at [`Self::base`].
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// The entries after the snapshot point, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn last_seq(&self) -> u64 {
        self.base.seq + self.entries.len() as u64
    }

    pub fn last(&self) -> Version {
        self.entries.last().map_or(self.base, |e| e.version)
    }

    /// Version of the entry at `seq` (the snapshot point included).
    pub fn version_at(&self, seq: u64) -> Option<Version> {
        if seq == self.base.seq {
            return Some(self.base);
        }
        if seq < self.base.seq || seq > self.last_seq() {
            return None;
        }
        Some(self.entries[(seq - self.base.seq - 1) as usize].version)
    }

    /// Entries `from ..= to` that are in the log.
    pub fn slice(&self, from: u64, to: u64) -> Vec<Entry> {
        let from = from.max(self.base.seq + 1);
        let to = to.min(self.last_seq());
        if from > to {
            return Vec::new();
        }
        let a = (from - self.base.seq - 1) as usize;
        let b = (to - self.base.seq) as usize;
        self.entries[a..b].to_vec()
    }

    /// Appends `entry` if it continues the log (the next seq, no earlier
    /// epoch than the last entry); returns whether it did.
    #[must_use]
    pub fn push(&mut self, entry: Entry) -> bool {
        let last = self.last();
        if entry.version.seq != last.seq + 1 || entry.version.epoch < last.epoch {
            return false;
        }
        self.entries.push(entry);
        true
    }

    /// Drops the entries after `seq` (never the snapshot point).
    pub fn truncate_after(&mut self, seq: u64) {
        let keep = seq.saturating_sub(self.base.seq) as usize;
        self.entries.truncate(keep);
    }

    /// The state machine's snapshot at `version`, an entry of this log
    /// after the snapshot point (or the snapshot point itself, when the log
    /// holds no bytes for it): entries up to it are dropped. False (and
    /// nothing changes) for any other version.
    pub fn compact(&mut self, version: Version, data: Vec<u8>) -> bool {
        let fills = version == self.base && self.snapshot.is_none() && version.seq > 0;
        if !fills && (version.seq <= self.base.seq || self.version_at(version.seq) != Some(version))
        {
            return false;
        }
        let drop = (version.seq - self.base.seq) as usize;
        self.entries.drain(..drop);
        self.base = version;
        self.snapshot = Some(Snapshot { version, data });
        true
    }

    /// Drops the entries up to `version`, an entry of this log after the
    /// snapshot point, without a snapshot's bytes: the state machine is the
    /// snapshot, and bytes are built when a backup needs them
    /// ([`Self::compact`] then takes them). False (and nothing changes)
    /// for any other version.
    pub fn compact_without_bytes(&mut self, version: Version) -> bool {
        if version.seq <= self.base.seq || self.version_at(version.seq) != Some(version) {
            return false;
        }
        let drop = (version.seq - self.base.seq) as usize;
        self.entries.drain(..drop);
        self.base = version;
        self.snapshot = None;
        true
    }

    /// A snapshot from the primary replaces the log up to its version.
    /// The entries after it stay only when `keep_suffix` and the log holds
    /// the snapshot's last entry (Raft's rule); returns whether they did.
    pub fn install(&mut self, snapshot: Snapshot, keep_suffix: bool) -> bool {
        let v = snapshot.version;
        let keep = keep_suffix && self.version_at(v.seq) == Some(v);
        self.entries = if keep {
            self.slice(v.seq + 1, self.last_seq())
        } else {
            Vec::new()
        };
        self.base = v;
        self.snapshot = Some(snapshot);
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::message::EntryKind;

    fn entry(epoch: u64, seq: u64) -> Entry {
        Entry {
            version: Version::new(epoch, seq),
            request_id: format!("r{seq}"),
            kind: EntryKind::Op(vec![]),
        }
    }

    #[test]
    fn entries_are_contiguous_and_their_epochs_never_decrease() {
        let mut log = Log::default();
        assert!(log.push(entry(1, 1)));
        assert!(!log.push(entry(1, 3)), "a gap");
        assert!(!log.push(entry(1, 1)), "a repeat");
        assert!(log.push(entry(2, 2)));
        assert!(!log.push(entry(1, 3)), "an earlier epoch");
        assert_eq!(log.last(), Version::new(2, 2));
    }

    #[test]
    fn a_restored_log_ends_at_the_first_gap_after_its_snapshot() {
        let snap = Snapshot {
            version: Version::new(1, 2),
            data: vec![],
        };
        let log = Log::restore(
            Some(snap),
            [entry(1, 1), entry(1, 3), entry(1, 4), entry(1, 6)],
        );
        assert_eq!(log.base(), Version::new(1, 2));
        assert_eq!(log.last_seq(), 4);
    }

    #[test]
    fn compaction_takes_only_an_entry_of_the_log() {
        let mut log = Log::default();
        for s in 1..=4 {
            assert!(log.push(entry(1, s)));
        }
        assert!(!log.compact(Version::new(2, 3), vec![]), "another epoch");
        assert!(!log.compact(Version::new(1, 9), vec![]), "beyond the end");
        assert!(log.compact(Version::new(1, 3), vec![7]));
        assert_eq!(log.base(), Version::new(1, 3));
        assert_eq!(log.entries().len(), 1);
        assert!(!log.compact(Version::new(1, 3), vec![]), "not newer");
        assert_eq!(log.version_at(3), Some(Version::new(1, 3)));
        assert_eq!(log.version_at(2), None);
    }

    #[test]
    fn an_installed_snapshot_keeps_the_suffix_only_when_the_log_holds_its_last_entry() {
        let mut log = Log::default();
        for s in 1..=4 {
            assert!(log.push(entry(1, s)));
        }
        let at = |e, s| Snapshot {
            version: Version::new(e, s),
            data: vec![],
        };
        let mut other = log.clone();
        assert!(log.install(at(1, 2), true));
        assert_eq!((log.base().seq, log.last_seq()), (2, 4));
        assert!(!other.install(at(2, 2), true), "a different entry at 2");
        assert_eq!((other.base().seq, other.last_seq()), (2, 2));
    }
}
