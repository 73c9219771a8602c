//! Property tests of the replication messages at the edge: decoding any
//! bytes never panics, valid messages round-trip through JSON, and a replica
//! fed any sequence of messages (from known and unknown senders, with any
//! numbers in them) and ticks never panics and never lowers its epoch.

use proptest::prelude::*;
use pygmy::api::ReplicationBatch;
use pygmy::replication::{
    Append, AppendReply, Body, Config, Echo, Entry, EntryKind, MemStorage, Message, PreVote,
    PreVoteReply, Replica, SnapshotChunk, SnapshotChunkReply, Version, Vote, VoteReply,
};

fn num() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..8, any::<u64>(), Just(u64::MAX), Just(u64::MAX - 1)]
}

fn version() -> impl Strategy<Value = Version> {
    (num(), num()).prop_map(|(epoch, seq)| Version { epoch, seq })
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        version(),
        "[a-z:0-9]{0,12}",
        prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
    )
        .prop_map(|(version, request_id, op)| Entry {
            version,
            request_id,
            kind: match op {
                Some(bytes) => EntryKind::Op(bytes),
                None => EntryKind::EpochStart,
            },
        })
}

fn echo() -> impl Strategy<Value = Echo> {
    (num(), num()).prop_map(|(boot, at)| Echo { boot, at })
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (num(), num()).prop_map(|(log_epoch, last_seq)| PreVote {
            log_epoch,
            last_seq
        }
        .into()),
        any::<bool>().prop_map(|granted| PreVoteReply { granted }.into()),
        (num(), num(), any::<bool>()).prop_map(|(log_epoch, last_seq, transfer)| Vote {
            log_epoch,
            last_seq,
            transfer
        }
        .into()),
        (any::<bool>(), num()).prop_map(|(granted, lease_wait_ms)| VoteReply {
            granted,
            lease_wait_ms
        }
        .into()),
        (
            version(),
            prop::collection::vec(entry(), 0..4),
            num(),
            num(),
            prop::option::of(echo()),
            num(),
            num(),
            any::<bool>()
        )
            .prop_map(
                |(prev, entries, commit, sent_at, echo, lease_ms, to_inc, quiet)| Append {
                    prev,
                    entries,
                    commit,
                    sent_at,
                    echo,
                    lease_ms,
                    to_inc,
                    quiet
                }
                .into()
            ),
        (any::<bool>(), num(), num(), any::<bool>(), num(), echo()).prop_map(
            |(ok, match_seq, last_seq, learner, sent_at_echo, echo)| AppendReply {
                ok,
                match_seq,
                last_seq,
                learner,
                sent_at_echo,
                echo
            }
            .into()
        ),
        (
            version(),
            num(),
            num(),
            prop::collection::vec(any::<u8>(), 0..32),
            num()
        )
            .prop_map(|(version, offset, total, data, sent_at)| SnapshotChunk {
                version,
                offset,
                total,
                data,
                sent_at
            }
            .into()),
        (version(), num(), num()).prop_map(|(version, held, sent_at_echo)| SnapshotChunkReply {
            version,
            held,
            sent_at_echo
        }
        .into()),
        Just(Body::TimeoutNow),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        5 => (num(), num(), body()).prop_map(|(epoch, inc, body)| Message { epoch, inc, body }),
        // Appends a primary could have sent: small numbers, contiguous entries.
        4 => (1u64..6, 0u64..5, 0u64..6, 0usize..5, 0u64..10, any::<bool>()).prop_map(|(epoch, pe, ps, n, commit, lease)| {
            let pe = pe.min(epoch);
            let entries = (0..n as u64)
                .map(|i| Entry { version: Version { epoch, seq: ps + 1 + i }, request_id: format!("r{i}"), kind: EntryKind::Op(b"{}".to_vec()) })
                .collect();
            Message::new(epoch, 7, Append { prev: Version { epoch: pe, seq: ps }, entries, commit, sent_at: 10, echo: None, lease_ms: if lease { 500 } else { 0 }, to_inc: 7, quiet: false })
        }),
        // Whole small snapshots a primary could have sent.
        1 => (1u64..6, 0u64..12, prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(epoch, seq, data)| {
            Message::new(epoch, 7, SnapshotChunk { version: Version { epoch, seq }, offset: 0, total: data.len() as u64, data, sent_at: 10 })
        }),
    ]
}

#[derive(Debug, Clone)]
enum Event {
    Msg(u64, Message),
    Tick(u64),
    Propose(String),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (prop_oneof![Just(1u64), Just(2), Just(3), Just(0), Just(99)], message()).prop_map(|(from, m)| Event::Msg(from, m)),
        3 => (0u64..2_000).prop_map(Event::Tick),
        1 => "[a-z]{1,6}".prop_map(Event::Propose),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_any_bytes_as_replication_messages_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<Message>(&bytes);
        let _ = serde_json::from_slice::<ReplicationBatch>(&bytes);
    }

    #[test]
    fn decoding_any_string_as_a_replication_batch_never_panics(s in "\\PC{0,300}") {
        let _ = serde_json::from_str::<ReplicationBatch>(&s);
        let _ = serde_json::from_str::<ReplicationBatch>(&format!("{{\"from\": 1, \"messages\": [{s}]}}"));
    }

    #[test]
    fn every_message_round_trips_through_json(m in message()) {
        let text = serde_json::to_string(&m).unwrap();
        prop_assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), m);
    }

    #[test]
    fn a_replica_fed_any_messages_never_panics_and_never_lowers_its_epoch(
        id in 1u64..=3,
        events in prop::collection::vec(event(), 1..60),
    ) {
        let storage = MemStorage::bootstrap(7);
        let mut r = Replica::new(Config::new(id, 7, vec![1, 2, 3], 42), &storage, 0);
        let mut now = 0u64;
        let mut epoch = r.epoch();
        for ev in events {
            match ev {
                Event::Msg(from, m) => r.step(now, from, m),
                Event::Tick(dt) => {
                    now += dt;
                    r.tick(now);
                }
                Event::Propose(id) => {
                    let _ = r.propose(now, id, b"{}".to_vec());
                }
            }
            let _ = r.ready();
            let _ = r.read_gate(now, pygmy::replication::Version::default());
            prop_assert!(r.epoch() >= epoch, "epoch went down: {} -> {}", epoch, r.epoch());
            epoch = r.epoch();
        }
    }
}
