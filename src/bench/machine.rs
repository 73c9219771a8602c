//! What the machine itself allows, measured before the run: how long an
//! fsync takes where the store keeps its data, and how long it takes to
//! wake a sleeping thread and hear back from it, at once and after both
//! threads slept as long as a lone buy's processes sleep between their
//! steps (on a virtual machine an idle CPU takes longer to wake).
//! Where the woken thread runs matters more than anything else here: on a
//! virtual machine, waking a thread on the waker's own CPU is a switch,
//! and waking one on another, idle CPU is an interrupt to a halted virtual
//! CPU, several times slower. Left to the scheduler, the same check read
//! either, from one run to the next, so it also measures both on purpose,
//! each thread pinned.
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
    /// The same after sleeping, both threads pinned to one CPU; none where
    /// threads cannot be pinned.
    pub same_cpu_wake_round_trip_p50_us: Option<u64>,
    pub same_cpu_wake_round_trip_p99_us: Option<u64>,
    /// The same after sleeping, the two threads pinned to two CPUs; none
    /// when the process may run on only one (or cannot pin).
    pub cross_cpu_wake_round_trip_p50_us: Option<u64>,
    pub cross_cpu_wake_round_trip_p99_us: Option<u64>,
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
    /// The same floor with every wake-up on its waker's CPU.
    pub buy_floor_same_cpu_us: Option<u64>,
    /// The same floor with every wake-up on another CPU.
    pub buy_floor_cross_cpu_us: Option<u64>,
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
    // A placement that cannot be had leaves its figures out, not the rest.
    let cpus = allowed_cpus();
    let same = cpus
        .first()
        .and_then(|&c| placed_wakes(IDLE_WAKES, IDLE, c, c).ok());
    let cross = match cpus.as_slice() {
        [a, b, ..] => placed_wakes(IDLE_WAKES, IDLE, *a, *b).ok(),
        _ => None,
    };
    let floor =
        |round_trip: u64| SERIAL_FSYNCS * fsync_p50_us + (MESSAGES + 2 * HANDOFFS) * round_trip / 2;
    Ok(MachineCheck {
        disk: dir.display().to_string(),
        fsync_p50_us,
        fsync_p99_us,
        wake_round_trip_p50_us,
        wake_round_trip_p99_us,
        idle_before_wake_us: IDLE.as_micros() as u64,
        idle_wake_round_trip_p50_us,
        idle_wake_round_trip_p99_us,
        same_cpu_wake_round_trip_p50_us: same.map(|c| c.0),
        same_cpu_wake_round_trip_p99_us: same.map(|c| c.1),
        cross_cpu_wake_round_trip_p50_us: cross.map(|c| c.0),
        cross_cpu_wake_round_trip_p99_us: cross.map(|c| c.1),
        buy_messages_in_series: MESSAGES,
        buy_disk_handoffs_in_series: HANDOFFS,
        buy_fsyncs_in_series: SERIAL_FSYNCS,
        buy_floor_us: floor(idle_wake_round_trip_p50_us),
        buy_floor_same_cpu_us: same.map(|c| floor(c.0)),
        buy_floor_cross_cpu_us: cross.map(|c| floor(c.0)),
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
    round_trips(n, idle, None)
}

/// [`wakes`] after sleeping `idle`, from a thread of its own pinned to CPU
/// `me` to a peer pinned to CPU `peer` (a fresh thread, so that no thread
/// of the caller's stays pinned). Fails if either ran anywhere else.
fn placed_wakes(n: u64, idle: Duration, me: usize, peer: usize) -> std::io::Result<(u64, u64)> {
    std::thread::Builder::new()
        .name("bench-wake-placed".into())
        .spawn(move || {
            pin_to(me)?;
            let measured = round_trips(n, Some(idle), Some(peer))?;
            check_on(me)?;
            Ok(measured)
        })?
        .join()
        .map_err(|_| std::io::Error::other("the measuring thread panicked"))?
}

fn round_trips(
    n: u64,
    idle: Option<Duration>,
    peer_cpu: Option<usize>,
) -> std::io::Result<(u64, u64)> {
    let (mut peer_in, mut to_peer) = std::io::pipe()?;
    let (mut from_peer, mut peer_out) = std::io::pipe()?;
    let peer = std::thread::Builder::new()
        .name("bench-wake".into())
        .spawn(move || -> std::io::Result<()> {
            if let Some(cpu) = peer_cpu {
                pin_to(cpu)?;
            }
            let mut b = [0u8; 1];
            // Ends when the measuring side closes its end.
            while peer_in.read_exact(&mut b).is_ok() {
                if peer_out.write_all(&b).is_err() {
                    break;
                }
            }
            match peer_cpu {
                Some(cpu) => check_on(cpu),
                None => Ok(()),
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
    // The peer's failure (it could not be pinned, or ran elsewhere) first:
    // it is why the measuring side failed, if it did.
    peer.join()
        .map_err(|_| std::io::Error::other("the woken thread panicked"))??;
    measured
}

/// The CPUs this process may run on, in order (none where that cannot be
/// read, or pinning is not available).
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set, zeroed, and the call fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// Pins the calling thread to `cpu`.
#[cfg(target_os = "linux")]
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: as in `allowed_cpus`; 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn pin_to(_cpu: usize) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "pinning a thread is not available here",
    ))
}

/// Fails unless the calling thread is on `cpu` (it was pinned there).
#[cfg(target_os = "linux")]
fn check_on(cpu: usize) -> std::io::Result<()> {
    // SAFETY: no arguments; -1 on failure.
    let on = unsafe { libc::sched_getcpu() };
    if on == cpu as i32 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "a thread pinned to CPU {cpu} ran on {on}"
        )))
    }
}

#[cfg(not(target_os = "linux"))]
fn check_on(_cpu: usize) -> std::io::Result<()> {
    Ok(())
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
        let floor = |round_trip: u64| 2 * m.fsync_p50_us + 18 * round_trip / 2;
        assert_eq!(
            m.buy_floor_us,
            floor(m.idle_wake_round_trip_p50_us),
            "{m:?}"
        );
        // Placed on purpose wherever threads can be pinned: on one CPU,
        // and on two when the process may use two.
        let cpus = allowed_cpus();
        if cfg!(target_os = "linux") {
            assert!(!cpus.is_empty(), "no CPU to run on?");
        }
        for (p50, p99, floor_of, present) in [
            (
                m.same_cpu_wake_round_trip_p50_us,
                m.same_cpu_wake_round_trip_p99_us,
                m.buy_floor_same_cpu_us,
                !cpus.is_empty(),
            ),
            (
                m.cross_cpu_wake_round_trip_p50_us,
                m.cross_cpu_wake_round_trip_p99_us,
                m.buy_floor_cross_cpu_us,
                cpus.len() >= 2,
            ),
        ] {
            assert_eq!(p50.is_some(), present, "{m:?}");
            if let (Some(p50), Some(p99)) = (p50, p99) {
                assert!(0 < p50 && p50 <= p99, "{m:?}");
                assert_eq!(floor_of, Some(floor(p50)), "{m:?}");
            } else {
                assert_eq!(floor_of, None, "{m:?}");
            }
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        std::fs::remove_dir(&dir).unwrap();
    }

    /// A thread that cannot be pinned where it was asked to run makes the
    /// placed measurement fail: its figure would otherwise be the
    /// scheduler's placement, reported as a chosen one.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_placement_that_does_not_take_is_an_error_not_a_figure() {
        let cpus = allowed_cpus();
        let nowhere = (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|c| !cpus.contains(c))
            .expect("some CPU number this process may not use");
        let here = cpus[0];
        let idle = Duration::from_micros(50);
        // The peer cannot go there, then the measuring side cannot.
        assert!(placed_wakes(20, idle, here, nowhere).is_err());
        assert!(placed_wakes(20, idle, nowhere, here).is_err());
        // Where it may run, it measures.
        let (p50, p99) = placed_wakes(20, idle, here, here).unwrap();
        assert!(0 < p50 && p50 <= p99);
    }
}
