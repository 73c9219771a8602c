//! Unit tests of the core, named after the rule they check (quoted from the
//! design brief's replication invariants; see `docs/DESIGN-NOTES.md`). The
//! randomized checks live in `tests/it/simulation.rs`.

use super::*;

/// A tiny synchronous network: every message is delivered at once unless
/// the link is cut (or `deliver_if` says no).
struct Net {
    nodes: Vec<Replica>,
    disks: Vec<MemStorage>,
    up: Vec<bool>,
    cut: Vec<(NodeId, NodeId)>,
    now: u64,
    applied: Vec<Vec<Entry>>,
    /// Snapshots each node was handed to install.
    installed: Vec<Vec<Snapshot>>,
    /// Snapshot bytes each node's driver was asked to build.
    built: Vec<usize>,
    /// Every snapshot chunk sent: (time, to, version, offset).
    chunks: Vec<(u64, NodeId, Version, u64)>,
    /// Messages it returns false for are lost.
    deliver_if: Option<Keep>,
    /// Every message sent, delivered or not: (to, message).
    sent: Vec<(NodeId, Message)>,
    /// Snapshot bytes are built beside the driver (as the catalog's are):
    /// asked for, they wait here until [`Net::hand_over`].
    defer_snapshots: bool,
    built_aside: Vec<Option<(Version, Vec<u8>)>>,
}

/// Which messages a [`Net`] delivers.
type Keep = Box<dyn FnMut(&Message) -> bool>;

impl Net {
    fn new(n: u64) -> Net {
        Net::with(n, |_| {})
    }

    fn with(n: u64, tune: impl Fn(&mut Config)) -> Net {
        let ids: Vec<NodeId> = (1..=n).collect();
        let disks: Vec<MemStorage> = ids.iter().map(|_| MemStorage::bootstrap(1)).collect();
        let nodes = ids
            .iter()
            .map(|&id| {
                let mut cfg = Config::new(id, 1, ids.clone(), id * 7);
                tune(&mut cfg);
                Replica::new(cfg, &disks[0], 0)
            })
            .collect();
        Net {
            nodes,
            disks,
            up: vec![true; n as usize],
            cut: Vec::new(),
            now: 0,
            applied: vec![Vec::new(); n as usize],
            installed: vec![Vec::new(); n as usize],
            built: vec![0; n as usize],
            chunks: Vec::new(),
            deliver_if: None,
            sent: Vec::new(),
            defer_snapshots: false,
            built_aside: vec![None; n as usize],
        }
    }

    /// Hands node `i` the bytes built beside its driver, as the catalog's
    /// driver does at the start of a step, before the core is advanced.
    fn hand_over(&mut self, i: usize) {
        let (version, data) = self.built_aside[i].take().expect("bytes built aside");
        let mut host = MemHost {
            disk: &mut self.disks[i],
            applied: &mut self.applied[i],
            installed: &mut self.installed[i],
            built: &mut self.built[i],
            aside: None,
            out: Vec::new(),
        };
        let Ok(()) = drive::snapshot_built(&mut self.nodes[i], &mut host, version, data);
    }

    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut msgs = Vec::new();
            for i in 0..self.nodes.len() {
                if !self.up[i] {
                    continue;
                }
                let mut host = MemHost {
                    disk: &mut self.disks[i],
                    applied: &mut self.applied[i],
                    installed: &mut self.installed[i],
                    built: &mut self.built[i],
                    aside: self.defer_snapshots.then_some(&mut self.built_aside[i]),
                    out: Vec::new(),
                };
                let Ok(_) = drive::advance(&mut self.nodes[i], &mut host);
                for (to, m) in host.out {
                    msgs.push((i as NodeId + 1, to, m));
                }
            }
            if msgs.is_empty() {
                return;
            }
            for (from, to, m) in msgs {
                if let Body::SnapshotChunk(SnapshotChunk {
                    version, offset, ..
                }) = &m.body
                {
                    self.chunks.push((self.now, to, *version, *offset));
                }
                self.sent.push((to, m.clone()));
                if self.deliver_if.as_mut().is_some_and(|keep| !keep(&m)) {
                    continue;
                }
                let t = (to - 1) as usize;
                if t < self.nodes.len() && self.up[t] && !self.cut.contains(&(from, to)) {
                    self.nodes[t].step(self.now, from, m);
                }
            }
        }
    }

    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 5;
            for i in 0..self.nodes.len() {
                if self.up[i] {
                    self.nodes[i].tick(self.now);
                }
            }
            self.pump();
        }
    }

    fn primary(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.up[i] && self.nodes[i].is_primary_ready())
    }

    fn isolate(&mut self, id: NodeId) {
        for other in 1..=self.nodes.len() as NodeId {
            if other != id {
                self.cut.push((id, other));
                self.cut.push((other, id));
            }
        }
    }

    fn restart(&mut self, i: usize) {
        let cfg = self.nodes[i].config().clone();
        self.nodes[i] = Replica::new(cfg, &self.disks[i], self.now);
        self.applied[i].clear();
        self.up[i] = true;
    }

    fn write(&mut self, p: usize, rid: &str) -> Result<Version, ProposeError> {
        let r = self.nodes[p].propose(self.now, rid.into(), vec![1]);
        self.pump();
        r
    }
}

/// The shipped driver loop's host for these tests: a disk in memory, the
/// committed entries as the state machine (its snapshot: their request
/// ids), messages collected.
struct MemHost<'a> {
    disk: &'a mut MemStorage,
    applied: &'a mut Vec<Entry>,
    installed: &'a mut Vec<Snapshot>,
    built: &'a mut usize,
    /// Where bytes built beside the driver wait (none: built at once).
    aside: Option<&'a mut Option<(Version, Vec<u8>)>>,
    out: Vec<(NodeId, Message)>,
}

impl drive::Host for MemHost<'_> {
    type Applied = Entry;
    type Error = std::convert::Infallible;
    fn persist_and_apply(&mut self, rd: &Ready) -> Result<Vec<Entry>, Self::Error> {
        self.installed.extend(rd.snapshot_to_install.clone());
        self.disk.persist(rd);
        if let Some(v) = rd.compacted {
            // This state machine (the ids applied) lives in memory: the
            // disk keeps its bytes at `v`.
            let ids: Vec<&str> = self
                .applied
                .iter()
                .chain(&rd.committed)
                .filter(|e| e.version.seq <= v.seq)
                .map(|e| e.request_id.as_str())
                .collect();
            self.disk.compact(Snapshot {
                version: v,
                data: ids.join(",").into_bytes(),
            });
        }
        Ok(rd.committed.clone())
    }
    fn publish(&mut self, _: &Replica) {}
    fn send(&mut self, to: NodeId, msg: Message) {
        self.out.push((to, msg));
    }
    fn answer(&mut self, applied: Vec<Entry>) {
        self.applied.extend(applied);
    }
    fn take_snapshot(&mut self) -> Result<Option<(Version, Vec<u8>)>, Self::Error> {
        *self.built += 1;
        let ids: Vec<&str> = self.applied.iter().map(|e| e.request_id.as_str()).collect();
        let bytes = (
            self.applied
                .last()
                .map_or(Version::default(), |e| e.version),
            ids.join(",").into_bytes(),
        );
        match &mut self.aside {
            Some(aside) => {
                **aside = Some(bytes);
                Ok(None)
            }
            None => Ok(Some(bytes)),
        }
    }
    fn store_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Self::Error> {
        self.disk.compact(snapshot.clone());
        Ok(())
    }
}

fn vote(epoch: u64, log_epoch: u64, last_seq: u64) -> Message {
    Message::new(
        epoch,
        1,
        Vote {
            log_epoch,
            last_seq,
            transfer: false,
        },
    )
}

fn granted(msgs: &[(NodeId, Message)], to: NodeId) -> bool {
    msgs.iter().any(|(t, m)| {
        *t == to && matches!(m.body, Body::VoteReply(VoteReply { granted: true, .. }))
    })
}

fn fresh(id: NodeId, n: u64) -> Replica {
    Replica::new(
        Config::new(id, 1, (1..=n).collect(), 42),
        &MemStorage::bootstrap(1),
        0,
    )
}

#[test]
fn a_replica_grants_at_most_one_candidate_per_epoch() {
    // "a replica grants at most one candidate per epoch"
    let mut r = fresh(1, 3);
    r.step(10_000, 2, vote(1, 0, 0));
    assert!(granted(&r.ready().messages, 2));
    r.step(10_001, 3, vote(1, 0, 0));
    assert!(!granted(&r.ready().messages, 3));
}

#[test]
fn only_a_step_that_moves_nothing_but_the_commit_point_skips_the_sync() {
    // "A write is durable before it is acknowledged": a vote, new entries
    // and truncations are synced; a new commit point alone is learnt again
    // after a crash, so it need not wait for the disk.
    let mut r = fresh(1, 3);
    r.step(10_000, 2, vote(1, 0, 0));
    let rd = r.ready();
    assert!(rd.hard_state.is_some() && rd.sync, "a vote is synced");
    r.step(
        10_001,
        2,
        append(1, Version::default(), entries(1, 1..=2), 0),
    );
    let rd = r.ready();
    assert!(!rd.entries.is_empty() && rd.sync, "new entries are synced");
    r.step(10_002, 2, append(1, Version::new(1, 2), vec![], 2));
    let rd = r.ready();
    assert_eq!(rd.committed.len(), 2);
    assert!(rd.hard_state.is_some(), "the commit point moved");
    assert!(!rd.sync, "a new commit point alone is not waited for");
}

#[test]
fn a_commit_point_pushed_alone_goes_quiet_and_only_a_refusal_answers_it() {
    // The primary pushes a moved commit point at once, so backups apply
    // (and serve) it without waiting for the next heartbeat; that push is
    // `quiet`. Entries and heartbeats are still answered: they are what
    // the primary's progress and leases count.
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().expect("a primary");
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let log = seen.clone();
    net.deliver_if = Some(Box::new(move |m: &Message| {
        log.borrow_mut().push(m.clone());
        true
    }));
    net.write(p, "w1").expect("written");
    let appends: Vec<Append> = seen
        .borrow()
        .iter()
        .filter_map(|m| match &m.body {
            Body::Append(a) => Some(a.clone()),
            _ => None,
        })
        .collect();
    let carrying: Vec<&Append> = appends.iter().filter(|a| !a.entries.is_empty()).collect();
    let announcing: Vec<&Append> = appends.iter().filter(|a| a.quiet).collect();
    assert_eq!(carrying.len(), 2, "the entry goes to both backups");
    assert!(carrying.iter().all(|a| !a.quiet), "entries are answered");
    assert_eq!(announcing.len(), 2, "the new commit point goes to both");
    assert!(
        announcing
            .iter()
            .all(|a| a.entries.is_empty() && a.commit > carrying[0].commit)
    );
    let replies = seen
        .borrow()
        .iter()
        .filter(|m| matches!(m.body, Body::AppendReply(_)))
        .count();
    assert_eq!(
        replies, 2,
        "one answer per backup: for the entry, none for the commit point"
    );
    net.deliver_if = None;
    net.run(100);
    assert!(
        net.applied
            .iter()
            .all(|a| a.iter().any(|e| e.request_id == "w1")),
        "every replica applied the write"
    );

    // At a backup: a quiet push it matches is applied, unanswered; one it
    // cannot match is refused; a heartbeat is answered.
    let mut r = fresh(1, 3);
    r.step(
        10_000,
        2,
        append(1, Version::default(), entries(1, 1..=2), 0),
    );
    assert_eq!(r.ready().messages.len(), 1, "entries are answered");
    r.step(10_001, 2, quiet(append(1, Version::new(1, 2), vec![], 2)));
    let rd = r.ready();
    assert_eq!(rd.committed.len(), 2, "the quiet commit point is applied");
    assert!(rd.messages.is_empty(), "and not answered");
    r.step(10_002, 2, quiet(append(1, Version::new(1, 5), vec![], 2)));
    let rd = r.ready();
    assert!(
        matches!(
            rd.messages[..],
            [(
                2,
                Message {
                    body: Body::AppendReply(AppendReply { ok: false, .. }),
                    ..
                }
            )]
        ),
        "a quiet push it cannot match is refused: {:?}",
        rd.messages
    );
    r.step(10_003, 2, append(1, Version::new(1, 2), vec![], 2));
    assert_eq!(r.ready().messages.len(), 1, "a heartbeat is answered");
}

#[test]
fn the_vote_is_persisted_before_the_answer_is_sent() {
    // "persists (epoch, candidate) before it answers": the hard state and
    // the reply come out in the same Ready, and the driver persists first.
    let mut r = fresh(1, 3);
    r.step(10_000, 2, vote(1, 0, 0));
    let rd = r.ready();
    let hs = rd.hard_state.clone().expect("vote must be persisted");
    assert_eq!((hs.epoch, hs.voted_for), (1, Some(2)));
    assert!(granted(&rd.messages, 2));
    // and it survives a restart
    let mut disk = MemStorage::bootstrap(1);
    disk.persist(&rd);
    let mut r = Replica::new(Config::new(1, 1, vec![1, 2, 3], 43), &disk, 0);
    r.step(10_000, 3, vote(1, 0, 0));
    assert!(!granted(&r.ready().messages, 3));
}

#[test]
fn messages_of_an_older_epoch_are_rejected() {
    // "from then on it rejects every message of an older epoch (fencing: a
    // deposed primary cannot commit)"
    let mut r = fresh(1, 3);
    r.step(10_000, 3, vote(5, 0, 0));
    r.ready();
    let entry = Entry {
        version: Version::new(4, 1),
        request_id: "x".into(),
        kind: EntryKind::Op(vec![1]),
    };
    r.step(
        10_001,
        2,
        Message::new(
            4,
            1,
            Append {
                prev: Version::default(),
                entries: vec![entry],
                commit: 1,
                sent_at: 1,
                echo: None,
                lease_ms: 0,
                to_inc: 1,
                quiet: false,
            },
        ),
    );
    let rd = r.ready();
    assert!(rd.entries.is_empty() && rd.committed.is_empty());
    assert!(matches!(
        rd.messages[..],
        [(
            2,
            Message {
                epoch: 5,
                body: Body::AppendReply(AppendReply { ok: false, .. }),
                ..
            }
        )]
    ));
}

#[test]
fn a_replica_in_lease_grants_nothing() {
    // "A replica that has heard from a live primary within its lease grants
    // nothing (pre-vote)"
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().expect("a primary");
    let backup = (p + 1) % 3;
    let e = net.nodes[backup].epoch();
    net.nodes[backup].step(
        net.now,
        1 + ((p + 2) % 3) as NodeId,
        Message::new(
            e,
            1,
            PreVote {
                log_epoch: e,
                last_seq: 1000,
            },
        ),
    );
    let rd = net.nodes[backup].ready();
    assert!(
        rd.messages
            .iter()
            .all(|(_, m)| matches!(m.body, Body::PreVoteReply(PreVoteReply { granted: false })))
    );
    net.nodes[backup].step(net.now, 1 + ((p + 2) % 3) as NodeId, vote(e + 1, e, 1000));
    assert_eq!(
        net.nodes[backup].epoch(),
        e,
        "a vote in lease does not even bump the epoch"
    );
}

#[test]
fn an_election_starts_by_itself_and_the_highest_id_wins() {
    // "With no known primary (a full restart), an election starts by
    // itself." "Among the candidates that can gather a majority, the highest
    // process id is preferred"
    for n in [3, 5] {
        let mut net = Net::new(n);
        net.run(2000);
        assert_eq!(net.primary(), Some(n as usize - 1));
    }
}

#[test]
fn a_new_primary_answers_nothing_before_its_epoch_start_commits() {
    // "The new primary installs the most advanced state of its majority,
    // then commits an epoch-start entry on its view before it answers
    // anything"
    let mut r = fresh(3, 3);
    r.tick(10_000);
    r.ready();
    r.step(
        10_001,
        2,
        Message::new(0, 1, PreVoteReply { granted: true }),
    );
    r.ready();
    r.step(
        10_002,
        2,
        Message::new(
            1,
            1,
            VoteReply {
                granted: true,
                lease_wait_ms: 0,
            },
        ),
    );
    let rd = r.ready();
    assert_eq!(r.role(), Role::Primary);
    assert!(matches!(
        rd.entries[..],
        [Entry {
            kind: EntryKind::EpochStart,
            ..
        }]
    ));
    assert!(!r.is_primary_ready());
    assert_eq!(
        r.propose(10_003, "a".into(), vec![]),
        Err(ProposeError::NotReady)
    );
    assert_eq!(r.read_gate(10_003, Version::default()), ReadGate::Refuse);
    r.step(
        10_004,
        2,
        Message::new(
            1,
            1,
            AppendReply {
                ok: true,
                match_seq: 1,
                last_seq: 1,
                learner: false,
                sent_at_echo: 10_002,
                echo: Echo { boot: 5, at: 7 },
            },
        ),
    );
    assert!(r.is_primary_ready());
    assert_eq!(
        r.propose(10_005, "a".into(), vec![]),
        Ok(Version::new(1, 2))
    );
}

#[test]
fn without_a_majority_the_primary_refuses_writes() {
    // "without one the primary answers writes with 503 rather than diverge"
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    assert!(net.write(p, "a").is_ok());
    net.isolate(p as NodeId + 1);
    net.run(600);
    assert!(matches!(
        net.write(p, "b"),
        Err(ProposeError::NoQuorum | ProposeError::NotPrimary { .. })
    ));
}

#[test]
fn a_write_commits_only_when_every_view_member_has_it() {
    // "A write commits when every member of the view has it durably"
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    let v = net.write(p, "a").unwrap();
    for i in 0..3 {
        assert!(net.applied[i].iter().any(|e| e.version == v), "node {i}");
    }
}

#[test]
fn a_held_write_and_every_write_after_it_commit_only_once_released() {
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    let held = net.nodes[p]
        .propose_held(net.now, "held".into(), vec![1])
        .unwrap();
    net.pump();
    let after = net.write(p, "after").unwrap();
    net.run(200);
    for i in 0..3 {
        let st = net.nodes[i].status();
        assert!(
            st.last.seq >= after.seq,
            "node {i} holds both entries meanwhile"
        );
        assert!(
            st.commit.seq < held.seq,
            "node {i} knows no commit past the hold"
        );
        assert!(
            !net.applied[i]
                .iter()
                .any(|e| e.version == held || e.version == after),
            "node {i} applied a write before its release"
        );
    }
    // A release of another epoch's entry at that seq changes nothing.
    net.nodes[p].release(Version::new(held.epoch + 1, held.seq));
    net.pump();
    assert!(net.applied[p].iter().all(|e| e.version != held));
    net.nodes[p].release(held);
    net.pump();
    net.run(100);
    for i in 0..3 {
        assert!(
            net.applied[i].iter().any(|e| e.version == held)
                && net.applied[i].iter().any(|e| e.version == after),
            "node {i} applies both once released"
        );
    }
}

#[test]
fn an_unmatched_suffix_is_truncated_on_catch_up() {
    // "Catch-up resumes from the last (epoch, seq) that matches the primary's
    // log and truncates everything after it"
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    net.write(p, "a").unwrap();
    net.isolate(p as NodeId + 1);
    for k in 0..5 {
        let _ = net.nodes[p].propose(net.now, format!("lost{k}"), vec![1]);
    }
    net.pump();
    net.run(3000);
    let q = net.primary().expect("a new primary");
    assert_ne!(q, p);
    net.write(q, "b").unwrap();
    net.cut.clear();
    net.run(3000);
    let logs: Vec<Vec<String>> = net
        .nodes
        .iter()
        .map(|r| {
            r.log_entries()
                .iter()
                .map(|e| e.request_id.clone())
                .collect()
        })
        .collect();
    assert!(
        logs.iter()
            .all(|l| !l.iter().any(|id| id.starts_with("lost"))),
        "{logs:?}"
    );
    assert_eq!(logs[0], logs[1]);
    assert_eq!(logs[1], logs[2]);
}

#[test]
fn a_new_disk_is_a_learner_until_caught_up() {
    // "A replica whose disk is new ... rejoins as a non-voting learner until
    // it has caught up"
    let mut r = Replica::new(
        Config::new(1, 9, vec![1, 2, 3], 1),
        &MemStorage::default(),
        0,
    );
    assert!(r.is_learner());
    r.step(10_000, 2, vote(1, 0, 0));
    assert!(!granted(&r.ready().messages, 2));
    r.tick(100_000);
    assert!(r.ready().messages.is_empty(), "a learner never campaigns");
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    let backup = (p + 1) % 3;
    net.up[backup] = false;
    net.disks[backup] = MemStorage::default();
    let mut cfg = net.nodes[backup].config().clone();
    cfg.incarnation = 2;
    net.nodes[backup] = Replica::new(cfg, &net.disks[backup], net.now);
    net.up[backup] = true;
    assert!(net.nodes[backup].is_learner());
    net.run(1000);
    assert!(!net.nodes[backup].is_learner());
}

#[test]
fn the_core_says_until_when_it_may_serve_reads_and_the_read_gate_agrees() {
    // "The core answers 'until when may I serve reads' directly": the end
    // of the interval on which the read gate serves, for the primary and
    // for every backup in its view; nothing for a replica cut off from it
    // once its lease ran out.
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().expect("a primary");
    for (i, r) in net.nodes.iter().enumerate() {
        let until = r
            .serve_until(net.now)
            .unwrap_or_else(|| panic!("node {} serves reads", i + 1));
        let v = r.applied();
        assert_eq!(r.read_gate(until - 1, v), ReadGate::Serve, "node {}", i + 1);
        assert_eq!(r.read_gate(until, v), ReadGate::Refuse, "node {}", i + 1);
        assert!(until <= net.now + r.config().lease_ms);
    }
    let backup = (p + 1) % 3;
    net.isolate(backup as NodeId + 1);
    net.run(2 * net.nodes[backup].config().lease_ms);
    assert_eq!(net.nodes[backup].serve_until(net.now), None);
    assert_eq!(
        net.nodes[backup].read_gate(net.now, Version::default()),
        ReadGate::Refuse
    );
}

#[test]
fn a_read_waits_for_the_asked_version() {
    // "a replica answers only once it has applied it (or says 'not yet')"
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    let v = net.write(p, "a").unwrap();
    assert_eq!(net.nodes[p].read_gate(net.now, v), ReadGate::Serve);
    let later = Version::new(v.epoch, v.seq + 5);
    assert_eq!(net.nodes[p].read_gate(net.now, later), ReadGate::NotYet);
    let backup = (p + 1) % 3;
    net.run(100);
    assert_eq!(net.nodes[backup].read_gate(net.now, v), ReadGate::Serve);
    net.isolate(backup as NodeId + 1);
    net.run(700);
    assert_eq!(
        net.nodes[backup].read_gate(net.now, v),
        ReadGate::Refuse,
        "lease ran out"
    );
}

#[test]
fn a_recovered_higher_id_takes_primaryship_back_after_staying_healthy() {
    // "If its id is higher than the primary's it takes primaryship back ...
    // but only after it has stayed healthy for several lease periods"
    let mut net = Net::new(3);
    net.run(2000);
    assert_eq!(net.primary(), Some(2));
    net.up[2] = false;
    net.run(2000);
    assert_eq!(net.primary(), Some(1));
    net.restart(2);
    net.run(1000);
    assert_eq!(net.primary(), Some(1), "not before takeover_after_ms");
    net.run(4000);
    assert_eq!(net.primary(), Some(2));
}

#[test]
fn nonsense_messages_are_ignored_without_panicking() {
    // "No input makes a service panic"
    let mut r = fresh(1, 3);
    let junk = Entry {
        version: Version::new(u64::MAX, u64::MAX),
        request_id: String::new(),
        kind: EntryKind::EpochStart,
    };
    let msgs = vec![
        Message::new(
            u64::MAX,
            u64::MAX,
            Append {
                prev: Version::new(u64::MAX, u64::MAX),
                entries: vec![junk.clone(), junk],
                commit: u64::MAX,
                sent_at: u64::MAX,
                echo: Some(Echo {
                    boot: 0,
                    at: u64::MAX,
                }),
                lease_ms: u64::MAX,
                to_inc: 1,
                quiet: false,
            },
        ),
        Message::new(
            u64::MAX,
            u64::MAX,
            AppendReply {
                ok: true,
                match_seq: u64::MAX,
                last_seq: u64::MAX,
                learner: false,
                sent_at_echo: u64::MAX,
                echo: Echo { boot: 1, at: 1 },
            },
        ),
        Message::new(
            0,
            0,
            SnapshotChunk {
                version: Version::new(0, 0),
                offset: 0,
                total: u64::MAX,
                data: vec![],
                sent_at: 0,
            },
        ),
        Message::new(
            u64::MAX,
            0,
            SnapshotChunkReply {
                version: Version::new(u64::MAX, 0),
                held: u64::MAX,
                sent_at_echo: 0,
            },
        ),
        Message::new(u64::MAX, 0, Body::TimeoutNow),
    ];
    for m in msgs {
        for from in [0, 1, 2, 99] {
            r.step(1, from, m.clone());
            r.tick(2);
            let _ = r.ready();
        }
    }
}

#[test]
fn a_flapping_replica_does_not_keep_deposing_the_primary() {
    // "A replica that flaps does not keep deposing the primary."
    let mut net = Net::new(3);
    net.run(2000);
    net.up[2] = false;
    net.run(2000);
    assert_eq!(net.primary(), Some(1));
    for _ in 0..8 {
        net.restart(2);
        net.run(800);
        net.up[2] = false;
        assert_eq!(net.primary(), Some(1));
        net.run(100);
    }
}

#[test]
fn messages_round_trip_through_json() {
    // "the driver will send them as JSON over HTTP"
    let e = Entry {
        version: Version::new(3, 9),
        request_id: "r-1".into(),
        kind: EntryKind::Op(vec![1, 2, 3]),
    };
    let msgs = vec![
        Message::new(
            1,
            2,
            PreVote {
                log_epoch: 1,
                last_seq: 4,
            },
        ),
        Message::new(1, 2, PreVoteReply { granted: true }),
        vote(2, 1, 4),
        Message::new(
            2,
            2,
            VoteReply {
                granted: true,
                lease_wait_ms: 50,
            },
        ),
        Message::new(
            3,
            1,
            Append {
                prev: Version::new(3, 8),
                entries: vec![e],
                commit: 8,
                sent_at: 100,
                echo: Some(Echo { boot: 7, at: 99 }),
                lease_ms: 500,
                to_inc: 1,
                quiet: false,
            },
        ),
        Message::new(
            3,
            1,
            AppendReply {
                ok: true,
                match_seq: 9,
                last_seq: 9,
                learner: false,
                sent_at_echo: 100,
                echo: Echo { boot: 7, at: 101 },
            },
        ),
        Message::new(
            3,
            1,
            SnapshotChunk {
                version: Version::new(3, 8),
                offset: 7,
                total: 12,
                data: b"state".to_vec(),
                sent_at: 5,
            },
        ),
        Message::new(
            3,
            1,
            SnapshotChunkReply {
                version: Version::new(3, 8),
                held: 12,
                sent_at_echo: 5,
            },
        ),
        Message::new(3, 1, Body::TimeoutNow),
    ];
    for m in msgs {
        let json = serde_json::to_string(&m).unwrap();
        let back: Message = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}

#[test]
fn the_fuzzers_seed_messages_are_messages() {
    // The fuzzer starts from these: they must stay in the wire format.
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/seeds/replication_message"
    );
    let mut seen = 0;
    for f in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        let one = serde_json::from_slice::<Message>(&bytes).map(|m| vec![m]);
        let batch =
            serde_json::from_slice::<crate::api::ReplicationBatch>(&bytes).map(|b| b.messages);
        let msgs = one.or(batch).expect("a message or a batch");
        assert!(msgs.iter().all(Message::is_sane));
        seen += 1;
    }
    assert!(seen >= 4);
}

#[test]
fn snapshot_chunks_carry_their_bytes_as_base64() {
    // "Chunk bytes go on the wire compactly: base64 in JSON, not arrays of
    // numbers."
    let m = Message::new(
        3,
        1,
        SnapshotChunk {
            version: Version::new(3, 8),
            offset: 0,
            total: 5,
            data: b"state".to_vec(),
            sent_at: 5,
        },
    );
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains(r#""data":"c3RhdGU=""#), "{json}");
    let bad = json.replace("c3RhdGU=", "not base64!");
    assert!(serde_json::from_str::<Message>(&bad).is_err());
    let numbers = json.replace(r#""c3RhdGU=""#, "[115,116,97,116,101]");
    assert!(serde_json::from_str::<Message>(&numbers).is_err());
}

#[test]
fn random_garbage_never_panics() {
    // "No panics on any message content: a message that makes no sense is
    // ignored."
    let mut rng = SplitMix64(7);
    let mut pick = |rng: &mut SplitMix64| match rng.below(4) {
        0 => 0,
        1 => u64::MAX - rng.below(3),
        2 => rng.below(10),
        _ => rng.next_u64(),
    };
    for node in 0..20u64 {
        let mut r = fresh(1 + node % 3, 3);
        for step in 0..300u64 {
            let v = |rng: &mut SplitMix64, p: &mut dyn FnMut(&mut SplitMix64) -> u64| {
                Version::new(p(rng), p(rng))
            };
            let m = match rng.below(10) {
                0 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    PreVote {
                        log_epoch: pick(&mut rng),
                        last_seq: pick(&mut rng),
                    },
                ),
                1 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    PreVoteReply {
                        granted: rng.chance(0.5),
                    },
                ),
                2 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    Vote {
                        log_epoch: pick(&mut rng),
                        last_seq: pick(&mut rng),
                        transfer: rng.chance(0.5),
                    },
                ),
                3 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    VoteReply {
                        granted: rng.chance(0.5),
                        lease_wait_ms: pick(&mut rng),
                    },
                ),
                4 => {
                    let prev = v(&mut rng, &mut pick);
                    let n = rng.below(3);
                    let entries = (0..n)
                        .map(|i| Entry {
                            version: Version::new(pick(&mut rng), prev.seq.wrapping_add(1 + i)),
                            request_id: String::new(),
                            kind: EntryKind::EpochStart,
                        })
                        .collect();
                    Message::new(
                        pick(&mut rng),
                        pick(&mut rng),
                        Append {
                            prev,
                            entries,
                            commit: pick(&mut rng),
                            sent_at: pick(&mut rng),
                            echo: Some(Echo {
                                boot: pick(&mut rng),
                                at: pick(&mut rng),
                            }),
                            lease_ms: pick(&mut rng),
                            to_inc: 1,
                            quiet: false,
                        },
                    )
                }
                5 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    AppendReply {
                        ok: rng.chance(0.5),
                        match_seq: pick(&mut rng),
                        last_seq: pick(&mut rng),
                        learner: rng.chance(0.5),
                        sent_at_echo: pick(&mut rng),
                        echo: Echo {
                            boot: pick(&mut rng),
                            at: pick(&mut rng),
                        },
                    },
                ),
                6 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    SnapshotChunk {
                        version: v(&mut rng, &mut pick),
                        offset: 0,
                        total: 0,
                        data: vec![],
                        sent_at: pick(&mut rng),
                    },
                ),
                7 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    SnapshotChunk {
                        version: v(&mut rng, &mut pick),
                        offset: pick(&mut rng),
                        total: pick(&mut rng),
                        data: vec![7; rng.below(4) as usize],
                        sent_at: pick(&mut rng),
                    },
                ),
                8 => Message::new(
                    pick(&mut rng),
                    pick(&mut rng),
                    SnapshotChunkReply {
                        version: v(&mut rng, &mut pick),
                        held: pick(&mut rng),
                        sent_at_echo: pick(&mut rng),
                    },
                ),
                _ => Message::new(pick(&mut rng), pick(&mut rng), Body::TimeoutNow),
            };
            let now = 1000 + step * 10;
            r.step(now, 1 + rng.below(3), m);
            r.tick(now + 5);
            let _ = r.propose(now + 6, "x".into(), vec![]);
            let _ = r.read_gate(now + 7, v(&mut rng, &mut pick));
            let _ = r.ready();
            let _ = r.status();
        }
    }
}

#[test]
fn a_primary_crash_costs_less_than_a_second_of_writes() {
    // Timing defaults: "fail over fast (under a second without a successful
    // write)".
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    net.write(p, "before").unwrap();
    let crashed_at = net.now;
    net.up[p] = false;
    let mut k = 0;
    loop {
        net.run(10);
        k += 1;
        if let Some(q) = net.primary() {
            let rid = format!("after{k}");
            if let Ok(v) = net.write(q, &rid) {
                net.run(10);
                if net.applied[q].iter().any(|e| e.version == v) {
                    break;
                }
            }
        }
        assert!(net.now - crashed_at < 1000, "no write for a second");
    }
    eprintln!("failover took {} ms", net.now - crashed_at);
}

#[test]
fn a_dead_backup_stalls_writes_only_until_its_lease_surely_ran_out() {
    // "A backup that lags ... is dropped from the view like a dead one,
    // after its lease."
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    let b = (p + 1) % 3;
    let v = net.write(p, "w0").unwrap();
    net.run(10);
    assert!(net.applied[p].iter().any(|e| e.version == v));
    net.up[b] = false;
    let crashed_at = net.now;
    let mut pending = Vec::new();
    for k in 1..200 {
        if let Ok(v) = net.write(p, &format!("w{k}")) {
            pending.push(v);
        }
        net.run(10);
        if net.applied[p].iter().any(|e| pending.contains(&e.version)) {
            let stall = net.now - crashed_at;
            eprintln!("a dead backup stalled commits for {stall} ms");
            let cfg = net.nodes[p].config();
            assert!(stall <= cfg.lease_ms / 4 + cfg.safe_lease_ms() + 2 * cfg.heartbeat_ms);
            assert!(stall >= cfg.lease_ms, "not before its lease ran out");
            return;
        }
    }
    panic!("writes never committed again");
}

#[test]
fn after_a_full_restart_an_election_starts_by_itself_and_nothing_is_lost() {
    // "With no known primary (a full restart), an election starts by itself."
    let mut net = Net::new(3);
    net.run(2000);
    let p = net.primary().unwrap();
    let v = net.write(p, "kept").unwrap();
    net.run(100);
    for i in 0..3 {
        net.restart(i);
    }
    net.run(3000);
    let q = net.primary().expect("a primary after the restart");
    assert!(
        net.applied[q]
            .iter()
            .any(|e| e.version == v && e.request_id == "kept")
    );
}

fn entries(epoch: u64, seqs: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    seqs.map(|seq| Entry {
        version: Version::new(epoch, seq),
        request_id: format!("r{seq}"),
        kind: EntryKind::Op(vec![1]),
    })
    .collect()
}

fn append(epoch: u64, prev: Version, entries: Vec<Entry>, commit: u64) -> Message {
    Message::new(
        epoch,
        1,
        Append {
            prev,
            entries,
            commit,
            sent_at: 1,
            echo: None,
            lease_ms: 0,
            to_inc: 1,
            quiet: false,
        },
    )
}

/// `msg`, an append, marked quiet (a commit point pushed alone).
fn quiet(mut msg: Message) -> Message {
    if let Body::Append(a) = &mut msg.body {
        a.quiet = true;
    }
    msg
}

/// Steps a message into `r` and persists what it asks on `disk`.
fn deliver(r: &mut Replica, disk: &mut MemStorage, from: NodeId, msg: Message) -> Ready {
    r.step(10, from, msg);
    let rd = r.ready();
    disk.persist(&rd);
    rd
}

fn acked(rd: &Ready) -> Option<(bool, u64)> {
    rd.messages.iter().find_map(|(_, m)| match &m.body {
        Body::AppendReply(AppendReply { ok, match_seq, .. }) => Some((*ok, *match_seq)),
        _ => None,
    })
}

/// The exact order: a pipelined append is overtaken by the next one, which
/// is rejected; the primary answers the rejection with a snapshot; the older
/// append arrives, then a duplicate of the newer one (both acknowledged:
/// the primary may count this copy of 13..14 toward a commit); then the
/// snapshot, at 12. Returns the backup, its disk, and the highest seq it
/// acknowledged as durable.
fn snapshot_overtaken(drop_suffix: bool) -> (Replica, MemStorage, u64) {
    let mut disk = MemStorage::bootstrap(1);
    let mut cfg = Config::new(1, 1, vec![1, 2, 3], 7);
    cfg.unsafe_switches.snapshot_drops_suffix = drop_suffix;
    cfg.snapshot_chunk_bytes = 7;
    let mut b = Replica::new(cfg, &disk, 0);
    let rd = deliver(
        &mut b,
        &mut disk,
        3,
        append(1, Version::default(), entries(1, 1..=10), 0),
    );
    assert_eq!(acked(&rd), Some((true, 10)));
    let rd = deliver(
        &mut b,
        &mut disk,
        3,
        append(1, Version::new(1, 12), entries(1, 13..=14), 10),
    );
    assert_eq!(
        acked(&rd).map(|a| a.0),
        Some(false),
        "overtaking append rejected"
    );
    let rd = deliver(
        &mut b,
        &mut disk,
        3,
        append(1, Version::new(1, 10), entries(1, 11..=12), 10),
    );
    assert_eq!(acked(&rd), Some((true, 12)));
    let rd = deliver(
        &mut b,
        &mut disk,
        3,
        append(1, Version::new(1, 12), entries(1, 13..=14), 10),
    );
    assert_eq!(acked(&rd), Some((true, 14)));
    let v = Version::new(1, 12);
    let data = b"state at 12";
    let rd = deliver(&mut b, &mut disk, 3, chunk(1, v, 0, 11, &data[..7]));
    assert_eq!(chunk_reply(&rd), Some((v, 7)));
    assert!(rd.snapshot_to_install.is_none());
    let rd = deliver(&mut b, &mut disk, 3, chunk(1, v, 7, 11, &data[7..]));
    assert!(rd.snapshot_to_install.is_some());
    (b, disk, 14)
}

#[test]
fn a_snapshot_whose_last_entry_the_log_holds_keeps_the_entries_after_it() {
    // "If the log already holds the snapshot's last entry, the suffix after
    // it stays, on disk too" (Raft's InstallSnapshot rule).
    let (b, disk, acked) = snapshot_overtaken(false);
    assert_eq!(
        b.status().last,
        Version::new(1, acked),
        "the acknowledged suffix stays in memory"
    );
    assert_eq!(b.snapshot_version(), Version::new(1, 12));
    let on_disk: Vec<u64> = disk.entries.iter().map(|e| e.version.seq).collect();
    assert_eq!(on_disk, vec![13, 14], "and on disk");
    let b = Replica::new(Config::new(1, 1, vec![1, 2, 3], 8), &disk, 100);
    assert_eq!(b.status().last, Version::new(1, 14), "and after a restart");
}

#[test]
fn teeth_a_snapshot_that_drops_the_suffix_loses_acknowledged_entries() {
    // With the rule switched off, the backup no longer holds entries it
    // acknowledged as durable: a phantom copy the primary may commit on.
    let (b, disk, acked) = snapshot_overtaken(true);
    let held = b.status().last.seq;
    assert!(
        held < acked,
        "acknowledged up to {acked}, holds up to {held}: no entry was lost"
    );
    assert!(
        disk.entries.iter().all(|e| e.version.seq <= held),
        "the disk lost them too"
    );
}

#[test]
fn a_snapshot_whose_last_entry_the_log_does_not_hold_replaces_the_whole_log() {
    let mut disk = MemStorage::bootstrap(1);
    let mut b = Replica::new(Config::new(1, 1, vec![1, 2, 3], 7), &disk, 0);
    // An uncommitted suffix of epoch 1 that epoch 2 replaced.
    deliver(
        &mut b,
        &mut disk,
        3,
        append(1, Version::default(), entries(1, 1..=14), 0),
    );
    let snap = Snapshot {
        version: Version::new(2, 12),
        data: b"state at 12".to_vec(),
    };
    deliver(
        &mut b,
        &mut disk,
        2,
        chunk(2, snap.version, 0, snap.data.len() as u64, &snap.data),
    );
    assert_eq!(
        b.status().last,
        Version::new(2, 12),
        "nothing of the old log survives"
    );
    assert!(
        disk.entries.is_empty(),
        "on disk either: {:?}",
        disk.entries
    );
    let b = Replica::new(Config::new(1, 1, vec![1, 2, 3], 8), &disk, 100);
    assert_eq!(b.status().last, Version::new(2, 12));
}

fn chunk(epoch: u64, version: Version, offset: u64, total: u64, data: &[u8]) -> Message {
    Message::new(
        epoch,
        1,
        SnapshotChunk {
            version,
            offset,
            total,
            data: data.to_vec(),
            sent_at: 2,
        },
    )
}

/// What a backup said it holds of which snapshot.
fn chunk_reply(rd: &Ready) -> Option<(Version, u64)> {
    rd.messages.iter().find_map(|(_, m)| match &m.body {
        Body::SnapshotChunkReply(SnapshotChunkReply { version, held, .. }) => {
            Some((*version, *held))
        }
        _ => None,
    })
}

/// Three replicas with 7-byte chunks and a snapshot every 5 entries, after
/// their first election.
fn tiny_snapshots() -> Net {
    let mut net = Net::with(3, |c| {
        c.snapshot_chunk_bytes = 7;
        c.snapshot_threshold = 5;
    });
    net.run(2000);
    net
}

/// [`tiny_snapshots`]; replica 1 was down while the primary (3) wrote and
/// compacted, and is back up now, too far behind for appends.
fn lagging_backup() -> Net {
    let mut net = tiny_snapshots();
    assert_eq!(net.primary(), Some(2));
    net.up[0] = false;
    for i in 0..12 {
        net.write(2, &format!("w{i}")).unwrap();
    }
    net.run(1000);
    assert!(
        net.nodes[2].snapshot_version().seq > 2,
        "the primary compacted"
    );
    net.restart(0);
    net
}

/// The primary's latest snapshot.
fn latest_snapshot(net: &Net) -> Snapshot {
    net.disks[2].snapshot.clone().expect("a snapshot")
}

/// Offsets of the chunks sent to `to`, in order.
fn offsets_to(net: &Net, to: NodeId) -> Vec<u64> {
    net.chunks
        .iter()
        .filter(|c| c.1 == to)
        .map(|c| c.3)
        .collect()
}

#[test]
fn the_log_is_compacted_without_snapshot_bytes_until_a_backup_needs_them() {
    // "Compaction costs nothing until a backup needs a snapshot."
    let mut net = tiny_snapshots();
    let p = net.primary().expect("a primary");
    for i in 0..12 {
        net.write(p, &format!("w{i}")).unwrap();
    }
    net.run(500);
    for (i, node) in net.nodes.iter().enumerate() {
        assert!(
            node.snapshot_version().seq >= 5,
            "replica {} compacted",
            i + 1
        );
        assert!(
            net.disks[i].entries.len() < 12,
            "replica {} dropped the compacted entries from its disk",
            i + 1
        );
    }
    assert_eq!(
        net.built,
        vec![0, 0, 0],
        "no bytes while every backup keeps up"
    );
    // A backup too far behind: the primary has its driver build bytes, at
    // what it applied by then, and sends them.
    let mut net = lagging_backup();
    net.run(500);
    assert!(
        net.built[2] >= 1,
        "the primary built bytes for the lagging backup"
    );
    assert_eq!(net.built[..2], [0, 0], "the backups built none");
    let snap = latest_snapshot(&net);
    assert_eq!(net.installed[0].last(), Some(&snap));
    assert_eq!(net.nodes[0].status().last, net.nodes[2].status().last);
}

#[test]
fn a_backup_that_is_down_costs_no_snapshot_bytes_until_it_answers() {
    // "Bytes are built for a backup the primary heard from lately. One it
    // did not is asked (an empty append at the primary's base) once a
    // resend interval, and its answer makes it one it heard from."
    let mut net = tiny_snapshots();
    assert_eq!(net.primary(), Some(2));
    net.up[0] = false;
    net.run(500);
    for round in 0..4 {
        for i in 0..6 {
            net.write(2, &format!("w{round}-{i}")).unwrap();
        }
        net.run(300);
    }
    assert!(
        net.nodes[2].snapshot_version().seq >= 20,
        "the primary compacted several times while the backup was down"
    );
    assert_eq!(net.built, vec![0, 0, 0], "no bytes built for nobody");
    let probes = net
        .sent
        .iter()
        .filter(|(to, m)| {
            *to == 1
                && matches!(&m.body, Body::Append(a) if a.entries.is_empty() && a.prev.seq >= 5)
        })
        .count();
    assert!(probes > 0, "the down backup was probed");
    net.restart(0);
    net.run(500);
    assert_eq!(net.built[2], 1, "bytes once, when it answered");
    let snap = latest_snapshot(&net);
    assert_eq!(net.installed[0], vec![snap], "installed once");
    assert_eq!(net.nodes[0].status().last, net.nodes[2].status().last);
    assert!(
        net.nodes[2].status().view.contains(&1),
        "caught up and in the view again"
    );
}

#[test]
fn bytes_built_beside_the_driver_are_asked_for_once() {
    // "A primary asks its driver for snapshot bytes once for a backup that
    // needs them": a heartbeat that found none while they were built, just
    // before they were handed over, is answered by them, not by building
    // them again.
    let mut net = lagging_backup();
    net.defer_snapshots = true;
    let mut waited = 0;
    while net.built[2] == 0 {
        assert!(waited < 2_000, "the primary never asked for bytes");
        net.run(5);
        waited += 5;
    }
    // Heartbeats while the bytes are built (the core, not yet advanced,
    // finds none to send), then the bytes, then the step.
    for _ in 0..20 {
        net.now += 5;
        net.nodes[2].tick(net.now);
    }
    net.hand_over(2);
    net.pump();
    net.run(500);
    assert_eq!(net.built[2], 1, "the bytes were built again");
    let snap = latest_snapshot(&net);
    assert_eq!(net.installed[0], vec![snap], "installed once");
    assert_eq!(net.nodes[0].status().last, net.nodes[2].status().last);
}

#[test]
fn a_snapshot_larger_than_a_chunk_reaches_a_lagging_backup_in_chunks_and_is_installed_once() {
    // "A snapshot is sent in chunks of at most `snapshot_chunk_bytes`;
    // only when the last chunk is in does the backup hand the whole
    // snapshot to the driver."
    let mut net = lagging_backup();
    net.run(500);
    let snap = latest_snapshot(&net);
    assert!(snap.data.len() > 3 * 7, "{} bytes", snap.data.len());
    assert_eq!(net.installed[0], vec![snap.clone()], "once, byte-identical");
    let expect: Vec<u64> = (0..snap.data.len() as u64).step_by(7).collect();
    assert_eq!(offsets_to(&net, 1), expect, "each chunk once, in order");
    assert_eq!(net.nodes[0].status().last, net.nodes[2].status().last);
    assert!(
        net.nodes[2].status().view.contains(&1),
        "caught up and in the view after the install"
    );
}

#[test]
fn a_lost_chunk_is_resent_from_the_confirmed_offset_after_the_resend_interval() {
    // "The primary resends from the confirmed offset when no reply came
    // within the resend interval (4 × heartbeat)."
    let mut net = lagging_backup();
    let mut lost = false;
    net.deliver_if = Some(Box::new(move |m| {
        let lose = !lost
            && matches!(
                m.body,
                Body::SnapshotChunk(SnapshotChunk { offset: 14, .. })
            );
        lost |= lose;
        !lose
    }));
    net.run(150);
    assert!(
        net.installed[0].is_empty(),
        "not before the lost chunk is in"
    );
    assert!(
        !net.nodes[2].status().view.contains(&1),
        "not in the view before the install"
    );
    net.run(500);
    let snap = latest_snapshot(&net);
    assert_eq!(net.installed[0], vec![snap.clone()], "once, byte-identical");
    let resent: Vec<u64> = net
        .chunks
        .iter()
        .filter(|c| c.1 == 1 && c.3 == 14)
        .map(|c| c.0)
        .collect();
    assert_eq!(resent.len(), 2, "sent, lost, resent: {resent:?}");
    let hb = net.nodes[2].config().heartbeat_ms;
    let gap = resent[1] - resent[0];
    assert!(
        (4 * hb..=5 * hb).contains(&gap),
        "resent {gap} ms after it was lost"
    );
    let offsets = offsets_to(&net, 1);
    assert_eq!(
        offsets.iter().filter(|o| **o < 14).count(),
        2,
        "what was confirmed is not sent again: {offsets:?}"
    );
}

#[test]
fn chunks_out_of_order_or_of_another_snapshot_do_not_corrupt_the_buffer() {
    // "The backup accumulates chunks of one snapshot, in order; anything
    // else is ignored or starts over, and never mixes into it."
    let mut disk = MemStorage::bootstrap(1);
    let mut cfg = Config::new(1, 1, vec![1, 2, 3], 7);
    cfg.snapshot_chunk_bytes = 7;
    let mut b = Replica::new(cfg, &disk, 0);
    let data = b"0123456789abcdefghijk";
    let (v, other) = (Version::new(2, 12), Version::new(2, 9));
    let n = data.len() as u64;
    let mut step = |m: Message, reply: Option<(Version, u64)>, what: &str| {
        let rd = deliver(&mut b, &mut disk, 3, m);
        assert_eq!(chunk_reply(&rd), reply, "{what}");
        assert!(rd.snapshot_to_install.is_none(), "{what}");
    };
    step(
        chunk(2, other, 0, 14, b"OTHER.."),
        Some((other, 7)),
        "a first",
    );
    step(
        chunk(2, v, 0, n, &data[..7]),
        Some((v, 7)),
        "another's start",
    );
    step(chunk(2, v, 14, n, &data[14..]), Some((v, 7)), "a gap");
    step(chunk(2, v, 0, n, b"XXXXXXX"), Some((v, 7)), "a repeat");
    step(
        chunk(2, v, 7, n + 1, b"XXXXXXX"),
        Some((v, 0)),
        "another total",
    );
    step(
        chunk(2, other, 7, 14, b"XXXXXXX"),
        Some((other, 0)),
        "the first's rest",
    );
    step(chunk(1, v, 7, n, b"XXXXXXX"), None, "an older epoch");
    step(
        chunk(2, v, 7, n, &data[7..14]),
        Some((v, 14)),
        "the next chunk",
    );
    step(
        chunk(2, v, 7, n, b"XXXXXXX"),
        Some((v, 14)),
        "a repeat, other bytes",
    );
    step(chunk(2, v, 15, n, b"XXXXXX"), Some((v, 14)), "a gap of one");
    step(
        chunk(2, v, 14, n, b"XXXXXXXX"),
        None,
        "past the end: nonsense",
    );
    step(
        chunk(2, v, n + 1, n, b""),
        None,
        "beyond the total: nonsense",
    );
    let rd = deliver(&mut b, &mut disk, 3, chunk(2, v, 14, n, &data[14..]));
    let want = Snapshot {
        version: v,
        data: data.to_vec(),
    };
    assert_eq!(rd.snapshot_to_install, Some(want.clone()));
    assert_eq!(acked(&rd), Some((true, 12)), "acknowledged up to it");
    assert_eq!(disk.snapshot, Some(want));
    let rd = deliver(&mut b, &mut disk, 3, chunk(2, v, 14, n, &data[14..]));
    assert!(rd.snapshot_to_install.is_none(), "installed exactly once");
    assert_eq!(acked(&rd), Some((true, 12)));
}

#[test]
fn a_backup_refuses_a_snapshot_longer_than_its_bound() {
    // "A total larger than a sane bound relative to the config drops it."
    let mut disk = MemStorage::bootstrap(1);
    let mut cfg = Config::new(1, 1, vec![1, 2, 3], 7);
    cfg.snapshot_chunk_bytes = 7;
    let bound = cfg.max_snapshot_bytes();
    let mut b = Replica::new(cfg, &disk, 0);
    let v = Version::new(2, 12);
    let rd = deliver(&mut b, &mut disk, 3, chunk(2, v, 0, bound + 1, b"0123456"));
    assert_eq!(chunk_reply(&rd), None);
    let rd = deliver(&mut b, &mut disk, 3, chunk(2, v, 0, bound, b"0123456"));
    assert_eq!(chunk_reply(&rd), Some((v, 7)));
}

#[test]
fn a_newer_snapshot_at_the_primary_restarts_the_transfer() {
    // "A new snapshot version at the primary (it compacted again) restarts
    // the transfer from 0."
    let mut net = lagging_backup();
    net.deliver_if = Some(Box::new(
        |m| !matches!(&m.body, Body::SnapshotChunk(SnapshotChunk { offset, .. }) if *offset >= 14),
    ));
    net.run(100);
    let first = latest_snapshot(&net);
    for i in 0..6 {
        net.write(2, &format!("x{i}")).unwrap();
    }
    net.run(300);
    let second = latest_snapshot(&net);
    assert!(second.version > first.version, "compacted again");
    assert!(net.installed[0].is_empty());
    net.deliver_if = None;
    net.run(500);
    assert_eq!(
        net.installed[0],
        vec![second.clone()],
        "the newer one, once"
    );
    let to_1: Vec<(Version, u64)> = net
        .chunks
        .iter()
        .filter(|c| c.1 == 1)
        .map(|c| (c.2, c.3))
        .collect();
    let restart = to_1
        .iter()
        .position(|c| c.0 == second.version)
        .expect("the newer snapshot was sent");
    assert_eq!(to_1[restart].1, 0, "from the start: {to_1:?}");
    assert!(
        to_1[..restart].contains(&(first.version, 7)),
        "after part of the older one: {to_1:?}"
    );
}

#[test]
fn any_chunk_numbers_from_the_network_are_handled() {
    // "Nothing panics on hostile input: any offset/total/version
    // combination from the network is handled."
    let sane = super::message::SANE_LIMIT;
    let nums = [0, 1, 6, 7, 8, 20, 21, 22, sane - 1, sane, u64::MAX];
    let versions = [
        Version::new(0, 0),
        Version::new(1, 5),
        Version::new(2, 12),
        Version::new(9, u64::MAX),
    ];
    let mut disk = MemStorage::bootstrap(1);
    let mut cfg = Config::new(1, 1, vec![1, 2, 3], 7);
    cfg.snapshot_chunk_bytes = 7;
    let mut b = Replica::new(cfg, &disk, 0);
    for v in versions {
        for offset in nums {
            for total in nums {
                for len in [0, 1, 7, 9] {
                    deliver(
                        &mut b,
                        &mut disk,
                        3,
                        chunk(2, v, offset, total, &vec![1; len]),
                    );
                }
            }
        }
    }
    // A primary in the middle of a transfer, fed any answer.
    let mut net = lagging_backup();
    net.deliver_if = Some(Box::new(
        |m| !matches!(&m.body, Body::SnapshotChunk(SnapshotChunk { offset, .. }) if *offset >= 14),
    ));
    net.run(100);
    let snap = latest_snapshot(&net);
    let epoch = net.nodes[2].epoch();
    for version in versions.into_iter().chain([snap.version]) {
        for held in nums {
            for sent_at_echo in nums {
                let m = Message::new(
                    epoch,
                    1,
                    SnapshotChunkReply {
                        version,
                        held,
                        sent_at_echo,
                    },
                );
                net.nodes[2].step(net.now, 1, m);
                net.pump();
            }
        }
    }
    net.deliver_if = None;
    net.run(1000);
    assert_eq!(
        net.installed[0],
        vec![latest_snapshot(&net)],
        "and the transfer still completes"
    );
}

/// A learner on a new disk (incarnation 2) fed an append that shows it
/// caught up, addressed to `to_inc`; returns whether it is still a learner.
fn learner_after_append(to_inc: u64, promote_on_any: bool) -> bool {
    let mut disk = MemStorage::default();
    let mut cfg = Config::new(1, 2, vec![1, 2, 3], 7);
    cfg.unsafe_switches.promote_on_any_append = promote_on_any;
    let mut r = Replica::new(cfg, &disk, 0);
    assert!(r.is_learner());
    let msg = Message::new(
        1,
        1,
        Append {
            prev: Version::default(),
            entries: entries(1, 1..=3),
            commit: 3,
            sent_at: 1,
            echo: None,
            lease_ms: 0,
            to_inc,
            quiet: false,
        },
    );
    deliver(&mut r, &mut disk, 3, msg);
    r.is_learner()
}

#[test]
fn a_learner_is_promoted_only_by_appends_addressed_to_its_own_incarnation() {
    // One sent to the disk it replaced (say delayed in the network) says
    // nothing about what this disk holds relative to the primary now.
    assert!(
        learner_after_append(1, false),
        "promoted by an append addressed to the old disk"
    );
    assert!(
        !learner_after_append(2, false),
        "not promoted by one addressed to it"
    );
}
