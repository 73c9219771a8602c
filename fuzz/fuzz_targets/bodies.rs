//! The internal JSON bodies (and the catalog ops kept in log entries) never
//! panic when decoded, and whatever decodes encodes and decodes back to the
//! same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pygmy::api::{
    CatalogOp, CatalogWrite, InvalidationBatch, LeaseRequest, OrderBuyRequest, UpdateRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let again = serde_json::to_vec(&v).expect("a decoded body encodes");
        let back: T = serde_json::from_slice(&again).expect("an encoded body decodes");
        assert_eq!(back, v);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<CatalogWrite>(data);
    check::<UpdateRequest>(data);
    check::<OrderBuyRequest>(data);
    check::<InvalidationBatch>(data);
    check::<LeaseRequest>(data);
    check::<CatalogOp>(data);
});
