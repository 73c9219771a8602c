//! The replication message decoder never panics, and whatever decodes
//! encodes and decodes back to the same messages. The catalog's replication
//! route decodes a `ReplicationBatch` (messages from one replica); a single
//! `Message` is decoded too, so the fuzzer reaches every variant quickly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pygmy::api::ReplicationBatch;
use pygmy::replication::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<Message>(data) {
        let _ = (m.is_sane(), m.epoch, m.inc);
        let again = serde_json::to_vec(&m).expect("a decoded message encodes");
        let back: Message = serde_json::from_slice(&again).expect("an encoded message decodes");
        assert_eq!(back, m);
    }
    if let Ok(b) = serde_json::from_slice::<ReplicationBatch>(data) {
        let again = serde_json::to_vec(&b).expect("a decoded batch encodes");
        let back: ReplicationBatch =
            serde_json::from_slice(&again).expect("an encoded batch decodes");
        assert_eq!((back.from, back.messages), (b.from, b.messages));
    }
});
