//! A backup: log matching, snapshots arriving in chunks, read leases.

use super::{Replica, RoleState};
use crate::replication::NodeId;
use crate::replication::message::{
    Append, AppendReply, Echo, Snapshot, SnapshotChunk, SnapshotChunkReply, Version,
};

/// A snapshot a backup is receiving: the first `data.len() <= total` bytes
/// of the one at `version` that the primary of `epoch` streams.
#[derive(Clone, Debug)]
pub(super) struct SnapshotReceive {
    epoch: u64,
    version: Version,
    total: u64,
    data: Vec<u8>,
}

impl Replica {
    /// `from` is the primary of our epoch: follow it, and count the
    /// contact (it holds off our elections and grants).
    fn follow(&mut self, now: u64, from: NodeId) {
        if !matches!(self.role, RoleState::Follower) || self.primary_id != Some(from) {
            self.role = RoleState::Follower;
            self.primary_id = Some(from);
        }
        self.last_primary_contact = Some(now);
        self.election_deadline = now + self.election_delay();
    }

    /// A message from the primary of `epoch` that makes us its backup.
    /// False when we are that primary ourselves (ignore the message).
    fn follow_primary(&mut self, now: u64, from: NodeId, epoch: u64) -> bool {
        if self.primary().is_some() && epoch == self.hs.epoch {
            return false; // two primaries in one epoch cannot happen
        }
        self.step_down(now); // only with accept_stale_epoch
        self.follow(now, from);
        true
    }

    fn reply_append(&mut self, to: NodeId, ok: bool, match_seq: u64, hint: u64, sent_at: u64) {
        let msg = self.message(AppendReply {
            ok,
            match_seq,
            last_seq: hint,
            learner: self.learner,
            sent_at_echo: sent_at,
            echo: Echo {
                boot: self.boot,
                at: self.last_now,
            },
        });
        self.out.send(to, msg);
    }

    pub(super) fn on_append(&mut self, now: u64, from: NodeId, epoch: u64, a: Append) {
        let Append {
            mut prev,
            mut entries,
            commit,
            sent_at,
            echo,
            lease_ms,
            to_inc,
            quiet,
        } = a;
        if self.primary().is_some() && epoch == self.hs.epoch {
            return; // two primaries in one epoch cannot happen; ignore
        }
        for (i, e) in entries.iter().enumerate() {
            if Some(e.version.seq) != prev.seq.checked_add(1 + i as u64) {
                return; // not contiguous: nonsense
            }
        }
        if prev.seq.checked_add(entries.len() as u64 + 1).is_none() {
            return;
        }
        if !self.follow_primary(now, from, epoch) {
            return;
        }
        let n = entries.len() as u64;
        let matched = prev.seq + n;
        let base = self.log.base().seq;
        if prev.seq < base {
            // Part of it is in our snapshot (committed, hence identical).
            let skip = (base - prev.seq) as usize;
            if skip >= entries.len() {
                let m = matched.min(self.log.last_seq());
                self.reply_append(from, true, m, self.log.last_seq(), sent_at);
                return;
            }
            entries.drain(..skip);
            prev = self.log.base();
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
                    self.out.truncate(s - 1);
                    if !self.log.push(e) {
                        return; // cannot happen for a sane append
                    }
                    self.out.persist(s);
                }
                None => {
                    if !self.log.push(e) {
                        return; // cannot happen for a sane append
                    }
                    self.out.persist(s);
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
        let promoted = self.learner && matched >= commit && to_me;
        if promoted {
            self.learner = false;
            self.hs.incarnation = self.cfg.incarnation;
            // The primary of this epoch won it: whatever vote the disk
            // remembers for it (a restored copy's, say) stands for this one.
            self.hs.voted_for = Some(from);
        }
        if quiet && !promoted {
            return;
        }
        self.reply_append(from, true, matched, self.log.last_seq(), sent_at);
    }

    /// Bytes `offset ..` of the snapshot at `version`, `total` bytes long.
    /// Chunks are taken in order only, from one primary and for one
    /// snapshot at a time: a chunk at offset 0 of another snapshot starts
    /// over, a repeat or a gap is ignored (the reply says where to go on),
    /// and a chunk of another snapshot that does not start it is answered
    /// with "none of it". The last chunk installs the whole snapshot.
    pub(super) fn on_snapshot_chunk(
        &mut self,
        now: u64,
        from: NodeId,
        epoch: u64,
        c: SnapshotChunk,
    ) {
        if !self.follow_primary(now, from, epoch) {
            return;
        }
        let SnapshotChunk {
            version,
            offset,
            total,
            data,
            sent_at,
        } = c;
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
        let msg = self.message(SnapshotChunkReply {
            version,
            held,
            sent_at_echo: sent_at,
        });
        self.out.send(to, msg);
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
            let keep_suffix = !self.cfg.unsafe_switches.snapshot_drops_suffix;
            if !self.log.install(snapshot.clone(), keep_suffix) {
                self.out.truncate(v.seq);
            }
            self.hs.commit = v;
            self.applied = v;
            self.out.snapshot_to_install = Some(snapshot);
            self.sync_log_epoch();
        }
        self.reply_append(from, true, v.seq, self.log.last_seq(), sent_at);
    }
}
