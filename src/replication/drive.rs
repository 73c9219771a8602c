//! The driver loop, once: persist, publish, send, answer, snapshot.
//!
//! Every driver of a [`Replica`] (the catalog's thread over SQLite and HTTP,
//! the unit tests' network, the simulator) implements [`Host`] and calls
//! [`advance`] after each input, so the order the contract asks for is
//! written in one place:
//!
//! 1. persist what the `Ready` asks (snapshot, hard state, truncation,
//!    entries) and apply the committed entries — durably, before anything
//!    that depends on it leaves;
//! 2. publish the applied state and read index to readers, before any
//!    message leaves (a backup's acknowledgement lets the primary expose an
//!    entry, which this replica's reads must then wait for);
//! 3. send the messages;
//! 4. answer the clients whose writes were applied;
//! 5. take a snapshot when the core asks, and hand it back.

use super::message::{Message, Snapshot, Version};
use super::{NodeId, Ready, Replica};

/// What a driver does with the core's outputs.
pub trait Host {
    /// What applying one committed entry produced, for answering clients.
    type Applied;
    type Error;
    /// Persist durably what `rd` asks, in the contract's order, and apply
    /// `rd.committed` (skipping entries already applied).
    fn persist_and_apply(&mut self, rd: &Ready) -> Result<Vec<Self::Applied>, Self::Error>;
    /// Readers may see the applied state and `replica`'s read index now.
    fn publish(&mut self, replica: &Replica);
    /// Send one message; loss, duplication, reordering and delay are fine.
    fn send(&mut self, to: NodeId, msg: Message);
    /// Answer the clients whose writes `applied` completes.
    fn answer(&mut self, applied: Vec<Self::Applied>);
    /// The state machine as snapshot bytes, at the version it has applied.
    fn take_snapshot(&mut self) -> Result<(Version, Vec<u8>), Self::Error>;
    /// Keep a snapshot the core accepted (entries up to it may be dropped).
    fn store_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Self::Error>;
}

/// Drains `replica`'s outputs and has `host` carry them out, in order.
/// Returns whether there was anything to do.
pub fn advance<H: Host>(replica: &mut Replica, host: &mut H) -> Result<bool, H::Error> {
    let rd = replica.ready();
    if rd.is_empty() {
        host.publish(replica);
        return Ok(false);
    }
    let applied = host.persist_and_apply(&rd)?;
    host.publish(replica);
    for (to, msg) in rd.messages {
        host.send(to, msg);
    }
    host.answer(applied);
    if rd.need_snapshot {
        let (version, data) = host.take_snapshot()?;
        if replica.snapshot_taken(version, data.clone()) {
            host.store_snapshot(&Snapshot { version, data })?;
        }
    }
    Ok(true)
}
