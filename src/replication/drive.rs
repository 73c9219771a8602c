//! The driver loop, once: persist, publish, send, answer, snapshot.
//!
//! Every driver of a [`Replica`] (the catalog's thread over SQLite and HTTP,
//! the unit tests' network, the simulator) implements [`Host`] and calls
//! [`advance`] after each input, so the order the contract asks for is
//! written in one place:
//!
//! 0. a primary's appends of new entries leave first, when that is all the
//!    `Ready` holds besides the entries (see [`sends_before_persisting`]):
//!    the backups persist while the primary does;
//! 1. persist what the `Ready` asks (snapshot, hard state, truncation,
//!    entries) and apply the committed entries — durably, before anything
//!    that depends on it leaves;
//! 2. publish the applied state and read index to readers, before any
//!    message leaves (a backup's acknowledgement lets the primary expose an
//!    entry, which this replica's reads must then wait for);
//! 3. send the messages;
//! 4. answer the clients whose writes were applied;
//! 5. take a snapshot when the core asks (a backup needs one), and hand it
//!    back.

use super::message::{Body, Message, Snapshot, Version};
use super::{NodeId, Ready, Replica, Role};

/// Whether a primary may send this `Ready`'s appends before its own disk
/// holds their entries, as Raft allows a leader to: its own
/// acknowledgement is counted only when the backups' answers are handled,
/// which is after this step's persist, and a primary that crashes before
/// persisting has acknowledged nothing (the entries then commit, or not,
/// as any entry a primary sent before it crashed).
///
/// Only when the `Ready` holds nothing else to make durable or to apply:
/// no hard state (an epoch or vote must be on disk before any message
/// says it), no snapshot, no truncation, and no newly committed entries —
/// so the commit point the appends carry is one this replica has already
/// applied and published (a backup may expose what the primary's own
/// reads already show, never more).
pub fn sends_before_persisting(replica: &Replica, rd: &Ready) -> bool {
    replica.role() == Role::Primary
        && rd.hard_state.is_none()
        && rd.snapshot_to_install.is_none()
        && rd.truncate_after.is_none()
        && rd.committed.is_empty()
        && !rd.entries.is_empty()
}

/// What a driver does with the core's outputs.
pub trait Host {
    /// What applying one committed entry produced, for answering clients.
    type Applied;
    type Error;
    /// Persist durably what `rd` asks, in the contract's order, apply
    /// `rd.committed` (skipping entries already applied), and record
    /// `rd.compacted`.
    fn persist_and_apply(&mut self, rd: &Ready) -> Result<Vec<Self::Applied>, Self::Error>;
    /// Readers may see the applied state and `replica`'s read index now.
    fn publish(&mut self, replica: &Replica);
    /// Send one message; loss, duplication, reordering and delay are fine.
    fn send(&mut self, to: NodeId, msg: Message);
    /// Answer the clients whose writes `applied` completes.
    fn answer(&mut self, applied: Vec<Self::Applied>);
    /// The state machine as snapshot bytes, at the version it has applied;
    /// `None` when the host builds them beside the driver instead (or is
    /// already building one) and hands them over later with
    /// [`snapshot_built`].
    fn take_snapshot(&mut self) -> Result<Option<(Version, Vec<u8>)>, Self::Error>;
    /// Keep a snapshot the core accepted (entries up to it may be dropped).
    fn store_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), Self::Error>;
}

/// Drains `replica`'s outputs and has `host` carry them out, in order.
/// Returns whether there was anything to do.
pub fn advance<H: Host>(replica: &mut Replica, host: &mut H) -> Result<bool, H::Error> {
    let mut rd = replica.ready();
    if rd.is_empty() {
        host.publish(replica);
        return Ok(false);
    }
    let everything = replica
        .config()
        .unsafe_switches
        .send_everything_before_persisting;
    if everything || sends_before_persisting(replica, &rd) {
        let (early, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut rd.messages)
            .into_iter()
            .partition(|(_, m)| everything || matches!(m.body, Body::Append(_)));
        rd.messages = rest;
        for (to, msg) in early {
            host.send(to, msg);
        }
    }
    let applied = host.persist_and_apply(&rd)?;
    host.publish(replica);
    for (to, msg) in rd.messages {
        host.send(to, msg);
    }
    host.answer(applied);
    if rd.need_snapshot
        && let Some((version, data)) = host.take_snapshot()?
    {
        snapshot_built(replica, host, version, data)?;
    }
    Ok(true)
}

/// Snapshot bytes of the state machine at `version` (at most what
/// `replica` has applied) are ready: the core takes them, and `host` keeps
/// them if the core did (a newer snapshot may have arrived meanwhile).
pub fn snapshot_built<H: Host>(
    replica: &mut Replica,
    host: &mut H,
    version: Version,
    data: Vec<u8>,
) -> Result<(), H::Error> {
    if replica.snapshot_taken(version, data.clone()) {
        host.store_snapshot(&Snapshot { version, data })?;
    }
    Ok(())
}
