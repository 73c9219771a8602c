//! The primary: replication to backups, the view, commits, leadership
//! transfer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{Replica, RoleState};
use crate::replication::NodeId;
use crate::replication::message::{
    Append, AppendReply, Body, Echo, Entry, EntryKind, SnapshotChunk, SnapshotChunkReply, Version,
};

/// What only a primary knows. Created whole when a replica wins an
/// election ([`Replica::become_primary`]) and dropped whole when it steps
/// down, so no field outlives its primaryship.
#[derive(Debug)]
pub(super) struct Primary {
    /// What we know about each backup.
    pub(super) peers: BTreeMap<NodeId, Progress>,
    /// Seq of our `EpochStart` entry (0 with `skip_epoch_start`).
    pub(super) epoch_start_seq: u64,
    /// Writes, reads and backup leases wait until every earlier primary's
    /// lease surely ran out.
    pub(super) writes_allowed_at: u64,
    pub(super) became_at: u64,
    /// (seq, append time) of uncommitted entries, to spot lagging backups.
    pub(super) append_times: VecDeque<(u64, u64)>,
    /// The driver fenced every cache earlier primaries kept coherent.
    pub(super) caches_fenced: bool,
    /// (target, started) of a leadership transfer under way.
    pub(super) transfer: Option<(NodeId, u64)>,
    /// When a transfer last started or gave up (or we became primary).
    pub(super) last_transfer_at: u64,
    pub(super) last_heartbeat: u64,
    /// The commit point the backups were last sent.
    pub(super) commit_broadcast: u64,
    /// Seqs of entries proposed held ([`Replica::propose_held`]) and not
    /// yet released: nothing at or after the first commits.
    pub(super) held: BTreeSet<u64>,
}

/// What the primary knows about one backup (reset when its incarnation
/// changes).
#[derive(Clone, Debug, Default)]
pub(super) struct Progress {
    /// Highest seq known durable on the backup and equal to our log.
    pub(super) matched: u64,
    /// Next seq to send; `matched < next`.
    pub(super) next: u64,
    /// Our send time of the newest message the backup acknowledged.
    pub(super) last_ack_sent_at: Option<u64>,
    /// Granted leases in our appends (member of the view).
    pub(super) in_view: bool,
    /// When it last (re)joined the view.
    pub(super) in_view_since: u64,
    /// Our send time of the last append that granted it a lease. It stays
    /// required for commits until `last_grant + lease × (1 + drift)`.
    pub(super) last_grant: Option<u64>,
    /// Its latest timestamp, echoed back in our appends.
    pub(super) echo: Option<Echo>,
    pub(super) learner: bool,
    /// Our latest snapshot on its way to it (while its next entry is
    /// compacted).
    pub(super) snapshot: Option<SnapshotSend>,
    /// Its log did not match at `next - 1`: send one probe at a time (no
    /// pipelining) until an append is accepted.
    pub(super) probing: bool,
    /// When an answer from it last arrived (our clock), however late.
    pub(super) heard_at: Option<u64>,
    /// When we last asked it whether it is there, while its next entry was
    /// compacted and we had not heard from it (see `send_snapshot_chunk`).
    pub(super) asked_at: Option<u64>,
}

impl Progress {
    /// An acknowledgement of what we sent at `sent_at_echo` arrived.
    fn acked(&mut self, sent_at_echo: u64, now: u64) {
        self.heard_at = Some(now);
        if sent_at_echo <= now && sent_at_echo > 0 {
            self.last_ack_sent_at = Some(
                self.last_ack_sent_at
                    .map_or(sent_at_echo, |t| t.max(sent_at_echo)),
            );
        }
    }
}

/// A snapshot streaming to one backup, one chunk in flight at a time.
#[derive(Clone, Debug)]
pub(super) struct SnapshotSend {
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

impl Replica {
    /// We won the election of `hs.epoch`: become its primary, write the
    /// epoch-start entry, and tell every backup.
    pub(super) fn become_primary(&mut self, now: u64) {
        let lease_wait_until = match &self.role {
            RoleState::Campaign(c) => c.lease_wait_until,
            _ => now,
        };
        let next = self.log.last_seq() + 1;
        let skip_start = self.cfg.unsafe_switches.skip_epoch_start;
        self.role = RoleState::Primary(Box::new(Primary {
            peers: self
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
                .collect(),
            epoch_start_seq: if skip_start { 0 } else { next },
            writes_allowed_at: if self.cfg.unsafe_switches.no_lease_wait {
                now
            } else {
                lease_wait_until.max(now)
            },
            became_at: now,
            append_times: VecDeque::new(),
            caches_fenced: false,
            transfer: None,
            last_transfer_at: now,
            last_heartbeat: now,
            commit_broadcast: self.hs.commit.seq,
            held: BTreeSet::new(),
        }));
        self.primary_id = Some(self.cfg.id);
        self.incoming = None;
        if !skip_start {
            let version = Version::new(self.hs.epoch, next);
            self.append_local(
                now,
                Entry {
                    version,
                    request_id: format!("epoch-start-{}", self.hs.epoch),
                    kind: EntryKind::EpochStart,
                },
            );
        }
        self.send_appends(now);
        self.maybe_commit();
    }

    /// No longer primary (deposed, out of touch, or handing over): follow,
    /// knowing no primary yet. Does nothing unless we are the primary.
    pub(super) fn step_down(&mut self, now: u64) {
        if self.primary().is_none() {
            return;
        }
        // Our own lease started at most `lease` before it ends.
        let lease_start = self
            .primary_lease_until()
            .min(now + self.cfg.lease_ms)
            .saturating_sub(self.cfg.lease_ms);
        let prev = self.last_primary_contact.unwrap_or(0);
        self.last_primary_contact = Some(prev.max(lease_start));
        self.role = RoleState::Follower;
        self.primary_id = None;
        self.election_deadline = now + self.election_delay();
    }

    /// A primary's tick: heartbeats, view upkeep, commits, transfers, and
    /// stepping down when nobody answered for too long.
    pub(super) fn primary_tick(&mut self, now: u64) {
        let heartbeat = self.cfg.heartbeat_ms;
        if let Some(p) = self.primary_mut()
            && now >= p.last_heartbeat + heartbeat
        {
            p.last_heartbeat = now;
            self.send_appends(now);
        }
        self.update_view(now);
        self.maybe_commit();
        self.check_transfer(now);
        if let Some(p) = self.primary() {
            let alive_until = self
                .primary_lease_until()
                .max(p.became_at + self.cfg.lease_ms);
            if now > alive_until.saturating_add(self.cfg.election_timeout_ms) {
                self.step_down(now);
            }
        }
    }

    pub(super) fn append_local(&mut self, now: u64, entry: Entry) {
        let seq = entry.version.seq;
        if !self.log.push(entry) {
            return;
        }
        self.sync_log_epoch();
        self.out.persist(seq);
        if let Some(p) = self.primary_mut() {
            p.append_times.push_back((seq, now));
        }
    }

    /// Until when a majority acknowledged us (our clock); 0 unless primary.
    pub(super) fn primary_lease_until(&self) -> u64 {
        let Some(p) = self.primary() else {
            return 0;
        };
        if self.majority <= 1 {
            return u64::MAX;
        }
        kth_largest(
            p.peers.values().filter_map(|p| p.last_ack_sent_at),
            self.majority - 2,
        )
        .map_or(0, |t| t + self.cfg.lease_ms)
    }

    fn is_active(&self, p: &Progress, now: u64) -> bool {
        p.last_ack_sent_at
            .is_some_and(|t| t + self.cfg.lease_ms / 2 >= now)
    }

    /// An append (or heartbeat, or snapshot chunk) to every backup.
    fn send_appends(&mut self, now: u64) {
        let ids: Vec<NodeId> = match self.primary() {
            Some(p) => p.peers.keys().copied().collect(),
            None => return,
        };
        for id in ids {
            self.send_append(id, now, false);
        }
    }

    /// Send what `id` misses (or a heartbeat; or, when its next entry is
    /// compacted, the next snapshot chunk). Optimistically advances `next`
    /// for active backups so entries are pipelined. `announce`: sent only
    /// because the commit point moved; without entries it goes `quiet`.
    fn send_append(&mut self, id: NodeId, now: u64, announce: bool) {
        let last = self.log.last_seq();
        // Backups read only what a ready primary could serve: not before our
        // epoch start committed and earlier leases ran out.
        let lease_left = if self.is_primary_ready()
            && self.primary().is_some_and(|p| now >= p.writes_allowed_at)
        {
            self.primary_lease_until().saturating_sub(now)
        } else {
            0
        };
        let active = match self.primary().and_then(|p| p.peers.get(&id)) {
            Some(p) => self.is_active(p, now),
            None => return,
        };
        let base = self.log.base().seq;
        let (max_batch, lease_cap) = (self.cfg.max_batch.max(1) as u64, self.cfg.lease_ms);
        let uncapped = self.cfg.unsafe_switches.backup_lease_uncapped;
        let to_inc = self.known_inc.get(&id).copied().unwrap_or(0);
        let RoleState::Primary(pr) = &mut self.role else {
            return;
        };
        let Some(p) = pr.peers.get_mut(&id) else {
            return;
        };
        p.next = p.next.clamp(p.matched + 1, last + 1);
        if p.next <= base {
            self.send_snapshot_chunk(id, now);
            return;
        }
        p.snapshot = None;
        let prev_seq = p.next - 1;
        let Some(prev) = self.log.version_at(prev_seq) else {
            return;
        };
        let to = last.min(prev_seq + max_batch);
        let entries = self.log.slice(p.next, to);
        let quiet = announce && entries.is_empty();
        let mut lease_ms = 0;
        if p.in_view && p.echo.is_some() {
            lease_ms = lease_cap.min(lease_left);
            if uncapped && lease_left > 0 {
                lease_ms = lease_cap;
            }
            if lease_ms > 0 {
                p.last_grant = Some(now);
            }
        }
        if active && !p.probing {
            p.next = to + 1;
        }
        let body = Append {
            prev,
            entries,
            commit: self.hs.commit.seq,
            sent_at: now,
            echo: if lease_ms > 0 { p.echo } else { None },
            lease_ms,
            to_inc,
            quiet,
        };
        let msg = self.message(body);
        self.out.send(id, msg);
    }

    /// Stream our latest snapshot to `id`, whose next entry is compacted:
    /// the chunk at the offset it confirmed, unless one is in flight and not
    /// yet a resend interval (`4 × heartbeat`) old.
    fn send_snapshot_chunk(&mut self, id: NodeId, now: u64) {
        let resend = 4 * self.cfg.heartbeat_ms;
        let chunk_bytes = self.cfg.snapshot_chunk_bytes.max(1);
        let Some(snap) = self.log.snapshot() else {
            // Compacted without bytes. For a backup we heard from lately
            // (within a lease, or two resend intervals), the driver builds
            // them (at what it has applied by then), and the next
            // heartbeat sends them. One we did not (down, cut off) would
            // never receive them, and they would be built again at every
            // compaction until it is back: it is asked instead, once a
            // resend interval, with an empty append at our base. Its
            // answer, however late, makes it one we heard from (a
            // refusal), or shows it holds our base and needs no snapshot.
            let lately = self.cfg.lease_ms.max(2 * resend);
            let heard = self
                .primary()
                .and_then(|pr| pr.peers.get(&id))
                .and_then(|p| p.heard_at)
                .is_some_and(|t| now <= t.saturating_add(lately));
            if heard {
                self.snapshot_wanted = true;
            } else {
                self.ask_at_base(id, now, resend);
            }
            return;
        };
        let RoleState::Primary(pr) = &mut self.role else {
            return;
        };
        let Some(p) = pr.peers.get_mut(&id) else {
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
        if t.in_flight && now < t.last_sent.saturating_add(resend) {
            return;
        }
        let total = snap.data.len();
        let from = usize::try_from(t.acked).map_or(total, |a| a.min(total));
        let to = from + chunk_bytes.min(total - from);
        t.in_flight = true;
        t.last_sent = now;
        let body = SnapshotChunk {
            version: snap.version,
            offset: from as u64,
            total: total as u64,
            data: snap.data[from..to].to_vec(),
            sent_at: now,
        };
        let msg = self.message(body);
        self.out.send(id, msg);
    }

    /// An empty append at our base to `id`, unless one went less than
    /// `every` ago: answered whether or not its log holds the base.
    fn ask_at_base(&mut self, id: NodeId, now: u64, every: u64) {
        let prev = self.log.base();
        let commit = self.hs.commit.seq;
        let to_inc = self.known_inc.get(&id).copied().unwrap_or(0);
        let Some(p) = self.primary_mut().and_then(|pr| pr.peers.get_mut(&id)) else {
            return;
        };
        if p.asked_at.is_some_and(|t| now < t.saturating_add(every)) {
            return;
        }
        p.asked_at = Some(now);
        let msg = self.message(Append {
            prev,
            entries: Vec::new(),
            commit,
            sent_at: now,
            echo: None,
            lease_ms: 0,
            to_inc,
            quiet: false,
        });
        self.out.send(id, msg);
    }

    /// A backup holds `held` bytes of the snapshot at `version`. More than
    /// it confirmed before: send the next chunk at once. Less, in answer to
    /// our latest chunk: it lost what it had (a restart), so go on from
    /// there. Anything else (a duplicate, an older snapshot, a stale
    /// answer) changes nothing.
    pub(super) fn on_snapshot_chunk_reply(
        &mut self,
        now: u64,
        from: NodeId,
        r: SnapshotChunkReply,
    ) {
        let total = self.log.snapshot().map_or(0, |s| s.data.len() as u64);
        let Some(p) = self.primary_mut().and_then(|pr| pr.peers.get_mut(&from)) else {
            return;
        };
        p.acked(r.sent_at_echo, now);
        let Some(t) = p.snapshot.as_mut() else {
            return;
        };
        if t.version != r.version || r.held > total {
            return;
        }
        let progress = r.held > t.acked;
        let lost = r.held < t.acked && r.sent_at_echo >= t.last_sent;
        if progress || lost {
            t.acked = r.held;
            t.in_flight = false;
            self.send_snapshot_chunk(from, now);
        }
    }

    /// Pipeline new entries and new commit points to active backups.
    pub(super) fn flush(&mut self, now: u64) {
        let last = self.log.last_seq();
        let commit = self.hs.commit.seq;
        let Some(pr) = self.primary() else {
            return;
        };
        let commit_moved = commit > pr.commit_broadcast;
        let due: Vec<NodeId> = self
            .cfg
            .replicas
            .iter()
            .filter(|id| {
                pr.peers.get(id).is_some_and(|p| {
                    self.is_active(p, now) && !p.probing && (p.next <= last || commit_moved)
                })
            })
            .copied()
            .collect();
        for id in due {
            self.send_append(id, now, true);
        }
        if let Some(pr) = self.primary_mut() {
            pr.commit_broadcast = commit;
        }
    }

    pub(super) fn on_append_reply(&mut self, now: u64, from: NodeId, r: AppendReply) {
        let last = self.log.last_seq();
        let Some(p) = self.primary_mut().and_then(|pr| pr.peers.get_mut(&from)) else {
            return;
        };
        p.acked(r.sent_at_echo, now);
        let newer = match p.echo {
            Some(old) => old.boot != r.echo.boot || r.echo.at >= old.at,
            None => true,
        };
        if newer {
            p.echo = Some(r.echo);
        }
        p.learner = r.learner;
        if r.ok {
            p.probing = false;
            let m = r.match_seq.min(last);
            if m > p.matched {
                p.matched = m;
            }
            if p.next <= p.matched {
                p.next = p.matched + 1;
            }
        } else {
            // Back off; resend at once only when that made progress (a
            // duplicated or stale rejection must not multiply messages).
            let resume = r.last_seq.saturating_add(1).max(p.matched + 1);
            if r.sent_at_echo > 0 {
                p.probing = true;
            }
            if resume < p.next {
                p.next = resume;
                if r.sent_at_echo > 0 {
                    self.send_append(from, now, false);
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
        let Some(pr) = self.primary_mut() else {
            return;
        };
        for p in pr.peers.values_mut() {
            let acking = p.last_ack_sent_at.is_some_and(|t| t >= stale_before);
            let lagging = pr
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
    pub(super) fn maybe_commit(&mut self) {
        let now = self.last_now;
        let safe = self.cfg.safe_lease_ms();
        let ignore_holders = self.cfg.unsafe_switches.commit_ignores_lease_holders;
        let Some(pr) = self.primary() else {
            return;
        };
        let mut cand = self.log.last_seq();
        for p in pr.peers.values() {
            let required = p.in_view || p.last_grant.is_some_and(|g| now < g + safe);
            if required && !ignore_holders {
                cand = cand.min(p.matched);
            }
        }
        // A held entry becomes visible only once the driver released it.
        if let Some(first) = pr.held.first()
            && !self.cfg.unsafe_switches.commit_ignores_holds
        {
            cand = cand.min(first - 1);
        }
        if self.majority > 1 {
            // Only voters count toward the majority: a learner (a new disk, or
            // one restored from an old copy) is not in sync until promoted.
            let voters = pr.peers.values().filter(|p| !p.learner);
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
        if let Some(pr) = self.primary_mut() {
            while pr.append_times.front().is_some_and(|(s, _)| *s <= cand) {
                pr.append_times.pop_front();
            }
        }
    }

    /// Hand primaryship to a higher-id backup that proved healthy (the
    /// original's "recovered primary takes over"), once every write in
    /// flight is drained to it; give up after an election timeout.
    fn check_transfer(&mut self, now: u64) {
        let last = self.log.last_seq();
        let commit = self.hs.commit.seq;
        let ready = self.is_primary_ready();
        let (me, after, timeout) = (
            self.cfg.id,
            self.cfg.takeover_after_ms,
            self.cfg.election_timeout_ms,
        );
        let Some(pr) = self.primary_mut() else {
            return;
        };
        if let Some((target, started)) = pr.transfer {
            if now > started + timeout {
                pr.transfer = None;
                pr.last_transfer_at = now;
                return;
            }
            let drained =
                commit == last && pr.peers.get(&target).is_some_and(|p| p.matched == last);
            if drained {
                let msg = self.message(Body::TimeoutNow);
                self.out.send(target, msg);
                self.step_down(now);
                self.primary_id = Some(target);
            }
            return;
        }
        if !ready || now < pr.writes_allowed_at || now < pr.last_transfer_at + after {
            return;
        }
        let target = pr
            .peers
            .iter()
            .filter(|(id, p)| {
                **id > me && p.in_view && !p.learner && now >= p.in_view_since + after
            })
            .map(|(id, _)| *id)
            .max();
        if let Some(t) = target {
            pr.transfer = Some((t, now));
        }
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
