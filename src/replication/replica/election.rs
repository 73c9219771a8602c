//! Epochs and elections: pre-votes, votes, whose log wins, stepping down.

use std::collections::BTreeSet;

use super::{Deferral, Replica, RoleState};
use crate::replication::NodeId;
use crate::replication::message::{
    AppendReply, Body, Echo, PreVote, PreVoteReply, Vote, VoteReply,
};

/// A campaign under way: a pre-vote (which changes nothing anywhere), then
/// a candidacy in `hs.epoch`.
#[derive(Debug)]
pub(super) struct Campaign {
    /// Still asking for pre-votes.
    pub(super) pre: bool,
    /// Who granted this phase (ourselves included).
    pub(super) granted: BTreeSet<NodeId>,
    /// Candidate: when every earlier primary's lease has surely run out.
    pub(super) lease_wait_until: u64,
}

impl Replica {
    /// `log_epoch` is the epoch of the last entry. Every primary's first
    /// entry is its `EpochStart`, written after everything it inherited, so
    /// this is the epoch of the primary whose log (through its start) this
    /// replica last installed; merely hearing from a primary changes nothing.
    pub(super) fn sync_log_epoch(&mut self) {
        self.hs.log_epoch = self.log.last().epoch;
    }

    /// `(log_epoch, last seq)`: what "more advanced" means.
    pub(super) fn log_key(&self) -> (u64, u64) {
        let e = if self.cfg.unsafe_switches.compare_by_seen_epoch {
            self.hs.epoch
        } else {
            self.hs.log_epoch
        };
        (e, self.log.last_seq())
    }

    /// Base timeout plus `2 × heartbeat` per higher-id replica, plus jitter.
    pub(super) fn election_delay(&mut self) -> u64 {
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
    pub(super) fn in_lease(&self, now: u64) -> bool {
        if self.primary().is_some() {
            return now < self.primary_lease_until();
        }
        self.last_primary_contact
            .is_some_and(|t| now < t + self.cfg.lease_ms)
    }

    /// How long an earlier primary's lease may still run, from our view.
    pub(super) fn lease_wait_ms(&self, now: u64) -> u64 {
        self.last_primary_contact
            .map_or(0, |t| (t + self.cfg.safe_lease_ms()).saturating_sub(now))
    }

    /// A newer epoch: follow it, knowing no primary of it yet.
    pub(super) fn adopt_epoch(&mut self, now: u64, epoch: u64) {
        if self.primary().is_some() {
            self.step_down(now);
        }
        self.hs.epoch = epoch;
        self.hs.voted_for = None;
        self.role = RoleState::Follower;
        self.primary_id = None;
        self.lease_until = 0;
        self.incoming = None;
    }

    /// A message of an older epoch is answered only with ours (so its
    /// sender catches up), and only when it asks for an answer.
    pub(super) fn answer_stale(&mut self, to: NodeId, body: &Body) {
        let reply: Body = match body {
            Body::PreVote(_) => PreVoteReply { granted: false }.into(),
            Body::Vote(_) => VoteReply {
                granted: false,
                lease_wait_ms: 0,
            }
            .into(),
            Body::Append(_) | Body::SnapshotChunk(_) => AppendReply {
                ok: false,
                match_seq: 0,
                last_seq: self.log.last_seq(),
                learner: self.learner,
                sent_at_echo: 0,
                echo: Echo {
                    boot: self.boot,
                    at: self.last_now,
                },
            }
            .into(),
            _ => return,
        };
        let msg = self.message(reply);
        self.out.send(to, msg);
    }

    pub(super) fn on_prevote(
        &mut self,
        now: u64,
        from: NodeId,
        epoch: u64,
        v: PreVote,
        mine: (u64, u64),
    ) {
        let cand = (v.log_epoch, v.last_seq);
        let mut grant = !self.learner && cand >= mine && !self.in_lease(now);
        if grant
            && let Some(d) = self.deferred_to
            && d.to > from
            && now < d.until
            && (cand <= d.key || self.cfg.unsafe_switches.defer_regardless_of_logs)
        {
            // Highest id preferred, but never over a log further ahead: a
            // higher id that lacks entries may never gather a majority, and
            // deferring to it (each candidate to the next) can keep every
            // election from finishing.
            grant = false;
        }
        let candidate = matches!(&self.role, RoleState::Campaign(c) if !c.pre);
        if grant && from < self.cfg.id && mine >= cand && !candidate {
            // We are at least as advanced and preferred: lead ourselves.
            grant = false;
            self.election_deadline = self.election_deadline.min(now);
        }
        if grant {
            let renew = match self.deferred_to {
                Some(d) => from >= d.to || now >= d.until,
                None => true,
            };
            if renew {
                self.deferred_to = Some(Deferral {
                    to: from,
                    until: now + self.cfg.election_timeout_ms,
                    key: cand,
                });
            }
        }
        let reply_epoch = if grant { epoch } else { self.hs.epoch };
        let msg = crate::replication::Message::new(
            reply_epoch,
            self.cfg.incarnation,
            PreVoteReply { granted: grant },
        );
        self.out.send(from, msg);
    }

    pub(super) fn on_prevote_reply(&mut self, now: u64, from: NodeId, epoch: u64, r: PreVoteReply) {
        let majority = self.majority;
        if let RoleState::Campaign(c) = &mut self.role
            && c.pre
            && r.granted
            && epoch == self.hs.epoch
        {
            c.granted.insert(from);
            if c.granted.len() >= majority {
                self.campaign(now, false);
            }
        }
    }

    pub(super) fn on_vote(
        &mut self,
        now: u64,
        from: NodeId,
        epoch: u64,
        v: Vote,
        mine: (u64, u64),
    ) {
        let cand = (v.log_epoch, v.last_seq);
        let grant = !self.learner
            && epoch == self.hs.epoch
            && self.hs.voted_for.is_none_or(|x| x == from)
            && cand >= mine
            && (v.transfer || !self.in_lease(now));
        if grant {
            self.hs.voted_for = Some(from);
            self.election_deadline = now + self.election_delay();
        }
        let msg = self.message(VoteReply {
            granted: grant,
            lease_wait_ms: self.lease_wait_ms(now),
        });
        self.out.send(from, msg);
    }

    pub(super) fn on_vote_reply(&mut self, now: u64, from: NodeId, epoch: u64, r: VoteReply) {
        let (majority, safe_lease) = (self.majority, self.cfg.safe_lease_ms());
        if let RoleState::Campaign(c) = &mut self.role
            && !c.pre
            && r.granted
            && epoch == self.hs.epoch
        {
            c.granted.insert(from);
            let wait = r.lease_wait_ms.min(safe_lease);
            c.lease_wait_until = c.lease_wait_until.max(now + wait);
            if c.granted.len() >= majority {
                self.become_primary(now);
            }
        }
    }

    /// Leadership transfer: our primary asks us to campaign now.
    pub(super) fn on_timeout_now(&mut self, now: u64, from: NodeId, epoch: u64) {
        if epoch == self.hs.epoch
            && self.primary_id == Some(from)
            && matches!(self.role, RoleState::Follower)
            && !self.learner
        {
            self.campaign(now, true);
        }
    }

    pub(super) fn start_prevote(&mut self, now: u64) {
        if self.learner {
            return;
        }
        self.primary_id = None;
        self.role = RoleState::Campaign(Campaign {
            pre: true,
            granted: BTreeSet::from([self.cfg.id]),
            lease_wait_until: 0,
        });
        self.election_deadline = now + self.election_delay();
        if self.majority <= 1 {
            self.campaign(now, false);
            return;
        }
        let (log_epoch, last_seq) = self.log_key();
        self.broadcast(PreVote {
            log_epoch,
            last_seq,
        });
    }

    /// Stand as a candidate in the next epoch (voting for ourselves).
    pub(super) fn campaign(&mut self, now: u64, transfer: bool) {
        self.hs.epoch = self.hs.epoch.saturating_add(1);
        self.hs.voted_for = Some(self.cfg.id);
        self.primary_id = None;
        self.lease_until = 0;
        self.role = RoleState::Campaign(Campaign {
            pre: false,
            granted: BTreeSet::from([self.cfg.id]),
            lease_wait_until: now + self.lease_wait_ms(now),
        });
        self.election_deadline = now + self.election_delay();
        if self.majority <= 1 {
            self.become_primary(now);
            return;
        }
        let (log_epoch, last_seq) = self.log_key();
        self.broadcast(Vote {
            log_epoch,
            last_seq,
            transfer,
        });
    }

    pub(super) fn broadcast(&mut self, body: impl Into<Body>) {
        let msg = self.message(body);
        for &r in &self.cfg.replicas {
            if r != self.cfg.id {
                self.out.send(r, msg.clone());
            }
        }
    }
}
