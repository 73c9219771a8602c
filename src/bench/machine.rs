//! What the machine itself allows, measured before the run: how long an
//! fsync takes where the store keeps its data, and how long it takes to
//! wake a sleeping thread and hear back from it, at once and after both
//! threads slept as long as a lone buy's processes sleep between their
//! steps (on a virtual machine an idle CPU takes longer to wake).
//!
//! A buy waits on both in series, whatever the code does: the catalog's
//! fsync (on every replica of its view at once) and then its order
//! replica's log's, and a wake-up at each of the ten messages on its path
//! between processes (client → frontend → order replica → primary → backup
//! → primary → frontend's cache → primary → order replica → frontend →
//! client) and at each hand-off to a disk thread and back (two at the
//! primary, one at a backup, one at the order replica). The same code reads
//! very differently on a machine whose wakes or fsyncs cost twice as much,
//! so the report gives these beside its figures.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::load::histogram;

/// The machine's own latencies, in µs.
#[derive(Debug, Clone, Serialize)]
pub struct MachineCheck {
    /// The directory the fsyncs were measured in.
    pub disk: String,
    /// A 4 KiB write in place, then `fdatasync`: the sync alone.
    pub fsync_p50_us: u64,
    pub fsync_p99_us: u64,
    /// A byte through a pipe to a thread blocked reading it, and one back:
    /// two wake-ups of a sleeping thread.
    pub wake_round_trip_p50_us: u64,
    pub wake_round_trip_p99_us: u64,
    /// The same, each round trip after both threads slept this long.
    pub idle_before_wake_us: u64,
    pub idle_wake_round_trip_p50_us: u64,
    pub idle_wake_round_trip_p99_us: u64,
    /// Messages between processes on a lone buy's path, each a wake-up.
    pub buy_messages_in_series: u64,
    /// Hand-offs to a disk thread and back on it (two wake-ups each).
    pub buy_disk_handoffs_in_series: u64,
    /// fsyncs a lone buy waits for one after the other.
    pub buy_fsyncs_in_series: u64,
    /// What those alone add up to, before any work: fsyncs at their p50,
    /// and a wake-up at half the p50 of a round trip after sleeping (a
    /// lone buy's processes sleep between their steps).
    pub buy_floor_us: u64,
}

const FSYNCS: u64 = 200;
const WAKES: u64 = 2000;
const IDLE_WAKES: u64 = 300;
/// About how long each process on a lone buy's path sleeps between its
/// steps (a timeline of one: 0.25 to 1 ms).
const IDLE: Duration = Duration::from_micros(500);
const BLOCK: usize = 4096;
/// Blocks written in turn: the file is written in place, as a write-ahead
/// log that was reset is, so no sync has to grow it.
const BLOCKS: u64 = 16;

const MESSAGES: u64 = 10;
const HANDOFFS: u64 = 4;
const SERIAL_FSYNCS: u64 = 2;

/// Measures in `dir` (a scratch file, removed after).
pub fn measure(dir: &Path) -> std::io::Result<MachineCheck> {
    let (fsync_p50_us, fsync_p99_us) = fsyncs(dir)?;
    let (wake_round_trip_p50_us, wake_round_trip_p99_us) = wakes(WAKES, None)?;
    let (idle_wake_round_trip_p50_us, idle_wake_round_trip_p99_us) = wakes(IDLE_WAKES, Some(IDLE))?;
    let buy_floor_us =
        SERIAL_FSYNCS * fsync_p50_us + (MESSAGES + 2 * HANDOFFS) * idle_wake_round_trip_p50_us / 2;
    Ok(MachineCheck {
        disk: dir.display().to_string(),
        fsync_p50_us,
        fsync_p99_us,
        wake_round_trip_p50_us,
        wake_round_trip_p99_us,
        idle_before_wake_us: IDLE.as_micros() as u64,
        idle_wake_round_trip_p50_us,
        idle_wake_round_trip_p99_us,
        buy_messages_in_series: MESSAGES,
        buy_disk_handoffs_in_series: HANDOFFS,
        buy_fsyncs_in_series: SERIAL_FSYNCS,
        buy_floor_us,
    })
}

fn fsyncs(dir: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(".pygmy-bench-fsync-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let measured = (|| {
        let block = [0x5au8; BLOCK];
        for b in 0..BLOCKS {
            file.write_all_at(&block, b * BLOCK as u64)?;
        }
        file.sync_all()?;
        let mut h = histogram();
        for i in 0..FSYNCS {
            file.write_all_at(&block, (i % BLOCKS) * BLOCK as u64)?;
            let t = Instant::now();
            file.sync_data()?;
            let _ = h.record((t.elapsed().as_micros() as u64).max(1));
        }
        Ok((h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
    })();
    drop(file);
    let _ = std::fs::remove_file(&path);
    measured
}

/// `n` round trips through pipes to a thread blocked reading, each after
/// sleeping `idle` if given (the peer sleeps as long, blocked).
fn wakes(n: u64, idle: Option<Duration>) -> std::io::Result<(u64, u64)> {
    let (mut peer_in, mut to_peer) = std::io::pipe()?;
    let (mut from_peer, mut peer_out) = std::io::pipe()?;
    let peer = std::thread::Builder::new()
        .name("bench-wake".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            // Ends when the measuring side closes its end.
            while peer_in.read_exact(&mut b).is_ok() {
                if peer_out.write_all(&b).is_err() {
                    break;
                }
            }
        })?;
    let mut h = histogram();
    let mut b = [0u8; 1];
    let measured = (|| {
        for _ in 0..n {
            if let Some(idle) = idle {
                std::thread::sleep(idle);
            }
            let t = Instant::now();
            to_peer.write_all(&b)?;
            from_peer.read_exact(&mut b)?;
            let _ = h.record((t.elapsed().as_micros() as u64).max(1));
        }
        Ok((h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
    })();
    drop(to_peer);
    let _ = peer.join();
    measured
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every figure is measured (none zero, p50 ≤ p99), the floor adds
    /// them up as it says, and the scratch file is gone.
    #[test]
    fn the_machine_check_measures_both_and_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("pygmy-machine-{}", std::process::id()));
        let m = measure(&dir).unwrap();
        assert!(
            0 < m.fsync_p50_us && m.fsync_p50_us <= m.fsync_p99_us,
            "{m:?}"
        );
        assert!(
            0 < m.wake_round_trip_p50_us && m.wake_round_trip_p50_us <= m.wake_round_trip_p99_us,
            "{m:?}"
        );
        assert!(
            0 < m.idle_wake_round_trip_p50_us
                && m.idle_wake_round_trip_p50_us <= m.idle_wake_round_trip_p99_us,
            "{m:?}"
        );
        assert_eq!(m.idle_before_wake_us, 500, "{m:?}");
        assert_eq!(
            m.buy_floor_us,
            2 * m.fsync_p50_us + 18 * m.idle_wake_round_trip_p50_us / 2,
            "{m:?}"
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        std::fs::remove_dir(&dir).unwrap();
    }
}
