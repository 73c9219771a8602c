//! Deterministic simulation of the replication core: thousands of seeded
//! schedules with crashes (also between persisting and sending), partitions
//! (primary alone, a backup alone, majority/minority, one-way links), message
//! loss/duplication/reordering/delay, disk replacement and clock skew;
//! invariants checked after every step (see `sim/mod.rs`).
//!
//! Replay one schedule: `PYGMY_SIM_SEED=1234 cargo test --test it simulation`
//! (add `PYGMY_SIM_TRACE=1` for a trace). More schedules per test:
//! `PYGMY_SIM_SCHEDULES=100000 cargo test --test it simulation`.

use crate::sim::{CacheOptions, Options, Sim, env_count, env_offset, env_seed, run_many};
use pygmy::replication::UnsafeSwitches;

/// Seeds of each test start at `first`; a failure names its seed.
fn run(name: &str, first: u64, default_count: u64, make: impl Fn(u64) -> Options) {
    if let Some(seed) = env_seed() {
        // Replays only the test whose seed range holds the seed.
        if seed >= first
            && seed < first + 100_000_000
            && let Err(e) = run_many(seed, 1, &make)
        {
            panic!("{name}: {e}");
        }
        return;
    }
    let count = env_count(default_count);
    // PYGMY_SIM_SEED_OFFSET shifts every range, to explore fresh seeds.
    let first = first + env_offset();
    match run_many(first, count, &make) {
        Ok(stats) => eprintln!("{name}: {count} schedules ok: {stats:?}"),
        Err(e) => panic!("{name}: {e}\nreplay with PYGMY_SIM_SEED=<seed>"),
    }
}

#[test]
fn three_replicas_a() {
    run("3 replicas (a)", 100_000_000, 1200, |seed| {
        Options::varied(3, seed)
    });
}

#[test]
fn three_replicas_b() {
    run("3 replicas (b)", 200_000_000, 1200, |seed| {
        Options::varied(3, seed)
    });
}

#[test]
fn five_replicas_a() {
    run("5 replicas (a)", 300_000_000, 400, |seed| {
        Options::varied(5, seed)
    });
}

#[test]
fn five_replicas_b() {
    run("5 replicas (b)", 400_000_000, 400, |seed| {
        Options::varied(5, seed)
    });
}

// ----------------------------------------------------------------------
// Teeth: with one safety mechanism switched off, the simulator must find a
// violation within a bounded number of (targeted) schedules, and the same
// schedule must pass with the mechanism on.
// ----------------------------------------------------------------------

/// Searches schedules of `name`'s profile with its mechanism off until the
/// simulator reports a violation of one of the `safety` properties (the
/// failure messages' words); other failures (liveness, say) do not count.
/// The same schedule must then pass with the mechanism on.
fn find_violation(name: &str, max: u64, safety: &[&str]) {
    find_violation_from(name, 1, max, safety);
}

/// [`find_violation`] in the `max` schedules from seed `from`: for a
/// violation rare enough that a search from 1 takes too long, a range
/// where one was once found.
fn find_violation_from(name: &str, from: u64, max: u64, safety: &[&str]) {
    let mut other = None;
    for seed in from..from + max {
        if let Err(e) = Sim::new(seed, teeth_profile(name, true)).run() {
            let first = e.lines().next().unwrap_or("").to_string();
            if !safety.iter().any(|s| first.contains(s)) {
                other.get_or_insert(first);
                continue;
            }
            eprintln!(
                "teeth {name}: found at seed {seed}, after {} schedules: {first}",
                seed - from + 1
            );
            if let Err(e) = Sim::new(seed, teeth_profile(name, false)).run() {
                panic!("teeth {name}: the control run (mechanism on) fails too: {e}");
            }
            return;
        }
    }
    panic!(
        "teeth {name}: no violation of {safety:?} found in {max} schedules (first other failure: {other:?})"
    );
}

/// Long leases (2 s, 20 ms heartbeats) and few, slow faults — partitions
/// of the given kinds, no crashes or disk losses — with frequent reads: a
/// lease that outlives what it should is then wide enough to be read from.
fn long_leases(o: &mut Options, partition_kinds: [u32; 5]) {
    o.timing = Some((2000, 20, 100));
    o.partition_kinds = partition_kinds;
    o.w_crash = 0;
    o.w_disk = 0;
    o.w_partition = 4;
    o.chaos_ms = 6000;
    o.quiet_ms = 4000;
    o.read_every_ms = 2;
    o.fault_every_ms = (500, 3000);
}

/// Caching frontends (`c`) read every millisecond and are now and then cut
/// off from the catalog (their leases run out unrenewed, pushes to them
/// wait); no disks lost.
fn frontends_cut_off(o: &mut Options, mut c: CacheOptions) {
    c.read_every_ms = 1;
    o.caches = Some(c);
    o.w_disk = 0;
    o.partition_kinds = [0, 0, 0, 1, 0];
    o.fault_every_ms = (100, 600);
}

/// The schedules aimed at one weakness; `broken` switches the mechanism off.
fn teeth_profile(name: &str, broken: bool) -> Options {
    let mut o = Options::new(3);
    let mut sw = UnsafeSwitches::default();
    match name {
        "vote" => {
            sw.vote_not_persisted = true;
            o.w_crash = 8;
            o.w_restart = 8;
            o.w_net = 6;
            o.partition_kinds = [4, 1, 0, 2, 1];
            o.crash_mid_ready = 0.0;
            o.fault_every_ms = (30, 300);
            o.chaos_ms = 4000;
        }
        "early_acks" => {
            sw.send_everything_before_persisting = true;
            o.w_crash = 8;
            o.w_restart = 8;
            o.crash_mid_ready = 1.0;
            o.fault_every_ms = (30, 300);
            o.chaos_ms = 4000;
        }
        "stale_epoch" => {
            sw.accept_stale_epoch = true;
            o.partition_kinds = [2, 0, 1, 1, 6];
            o.w_partition = 6;
            o.w_heal = 3;
            o.w_crash = 1;
            o.chaos_ms = 5000;
            o.fault_every_ms = (50, 200);
            o.long_delay_max_ms = 1500;
        }
        "seen_epoch" => {
            sw.compare_by_seen_epoch = true;
            o.w_crash = 6;
            o.w_restart = 6;
            o.w_net = 6;
            o.partition_kinds = [1, 3, 2, 3, 1];
            o.chaos_ms = 5000;
        }
        "epoch_start" => {
            sw.skip_epoch_start = true;
            o.read_every_ms = 4;
        }
        "truncation" => sw.no_truncate = true,
        "lease_wait" => {
            // A long lease makes the drift window wide enough to hit: the
            // old primary, cut off alone, still serves reads.
            sw.no_lease_wait = true;
            long_leases(&mut o, [1, 0, 0, 0, 0]);
            o.w_net = 0;
            o.w_heal = 2;
        }
        "backup_lease" => sw.backup_reads_without_lease = true,
        "versioned_reads" => {
            // A backup's read index alone already shows a client its own
            // writes; switch it off too, to see the version check at work.
            sw.reads_ignore_version = true;
            sw.backup_read_index_applied = true;
        }
        "read_index" => sw.backup_read_index_applied = true,
        "primary_lease" => {
            // The old primary, cut off alone, keeps serving reads.
            sw.primary_reads_without_lease = true;
            o.partition_kinds = [1, 0, 0, 0, 1];
            o.read_every_ms = 4;
        }
        "commit_lease_holders" => {
            sw.commit_ignores_lease_holders = true;
            o.read_every_ms = 4;
        }
        "lease_cap" => {
            // Five replicas split with the primary and a backup in the
            // minority: the majority elects a new primary while the
            // backup's uncapped lease from the old one still runs. Long
            // leases make that window wide.
            sw.backup_lease_uncapped = true;
            o = Options::new(5);
            long_leases(&mut o, [0, 0, 1, 0, 0]);
        }
        "drift" => {
            // Leases counted as if clocks ran at one rate: the old primary,
            // cut off alone on a slow clock, serves past what a new primary
            // waits out on a fast one.
            if broken {
                o.drift_margin = Some(0.0);
            }
            long_leases(&mut o, [1, 0, 0, 0, 0]);
            o.w_net = 0;
            o.w_heal = 2;
            o.w_pause = 0;
        }
        "pause_clock" => {
            // Long pauses of the primary; reads as soon as it wakes.
            o.reads_at_last_event = broken;
            o.w_pause = 8;
            o.w_crash = 1;
            o.partition_kinds = [1, 0, 0, 0, 1];
            o.read_every_ms = 2;
        }
        "dedupe" => {
            o.no_dedupe = broken;
            o.w_crash = 8;
            o.w_restart = 8;
        }
        "incarnation" => {
            sw.ignore_incarnation = true;
            o.relaxed_disk_policy = true;
            o.w_disk = 6;
        }
        "restored_copy" => {
            // Backups restored often, the restored disk's data possibly held
            // by just one other disk.
            o.trust_restored_copies = broken;
            o.relaxed_disk_policy = true;
            o.w_restore = 12;
            o.w_disk = 0;
            o.w_crash = 6;
            o.w_restart = 3;
            o.w_partition = 1;
            o.fault_every_ms = (40, 200);
        }
        "cache_drift" => {
            // Frontends cut off now and then (their leases run out unrenewed)
            // while writes go on; the primary counts a cache lease without
            // the drift margin.
            let mut c = CacheOptions::new(2);
            c.drift_margin = broken.then_some(0.0);
            frontends_cut_off(&mut o, c);
            o.w_partition = 8;
            o.w_crash = 1;
        }
        "starting" => {
            // Disks lost often, restarts bunched (heals restart every down
            // node at once): a blank disk asks while its peers are starting.
            o.starting_reports_blank = broken;
            o.relaxed_disk_policy = true;
            o.w_disk = 8;
            o.w_crash = 8;
            o.w_restart = 1;
            o.w_heal = 6;
            o.w_partition = 1;
            o.fault_every_ms = (40, 200);
        }
        "held_writes" => {
            // Writes commit without waiting for their begins to reach the
            // caches: a frontend serves its cached value of a book after a
            // write to it was acknowledged. Slow pushes (frontends cut off
            // now and then) widen the window.
            sw.commit_ignores_holds = true;
            frontends_cut_off(&mut o, CacheOptions::new(2));
            o.w_partition = 4;
            o.w_crash = 0;
        }
        "ends_before_answers" => {
            // As "cache_drift", with writes answered as their ends leave
            // rather than once they reached the caches.
            let mut c = CacheOptions::new(2);
            c.answer_before_end = broken;
            frontends_cut_off(&mut o, c);
            o.w_partition = 8;
            o.w_crash = 1;
        }
        "atomic_decrement" => o.check_at_propose = broken,
        "unsynced_entries" => {
            o.unsynced_entries = broken;
            o.w_crash = 8;
            o.w_restart = 8;
            o.crash_mid_ready = 1.0;
            o.fault_every_ms = (30, 300);
            o.chaos_ms = 4000;
        }
        _ => panic!("unknown teeth profile {name}"),
    }
    if broken {
        o.switches = sw;
    }
    o
}

#[test]
fn teeth_persisted_votes() {
    find_violation(
        "vote",
        6000,
        &["two primaries in epoch", "divergence", "lost at node"],
    );
}

/// A primary's appends leave before its own persist (the crash-before-
/// persist schedules exercise that); everything else a step sends must wait
/// for the disk, or an acknowledged entry is lost with a crash.
#[test]
fn teeth_answers_wait_for_the_disk() {
    find_violation("early_acks", 6000, &["divergence", "lost at node"]);
}

/// Only a step that moves nothing but the commit point may skip waiting
/// for the disk (`Ready::sync`): with new entries written unsynced too, a
/// crash takes entries the node acknowledged, and a committed write is
/// lost.
#[test]
fn teeth_entries_are_synced_before_they_are_acknowledged() {
    find_violation("unsynced_entries", 3000, &["divergence", "lost at node"]);
}

/// Without fencing, a deposed primary's messages count as current: it
/// keeps replicas following it, and one of them serves reads that lack
/// entries the new primary committed (or logs diverge). The log type
/// refuses entries of an older epoch after newer ones, so the read is what
/// breaks first.
#[test]
fn teeth_fencing_by_epoch() {
    find_violation(
        "stale_epoch",
        4000,
        &[
            "divergence",
            "two primaries in epoch",
            "lost at node",
            "lacks committed entries",
        ],
    );
}

#[test]
fn teeth_compare_by_log_epoch() {
    find_violation("seen_epoch", 3000, &["divergence", "lost at node"]);
}

#[test]
fn teeth_epoch_start_entry() {
    find_violation("epoch_start", 2000, &["stale read at primary"]);
}

#[test]
fn teeth_suffix_truncation() {
    find_violation("truncation", 1000, &["divergence"]);
}

#[test]
fn teeth_new_primary_waits_out_old_leases() {
    find_violation("lease_wait", 1000, &["stale read at primary"]);
}

#[test]
fn teeth_backups_read_only_with_lease() {
    find_violation("backup_lease", 1000, &["stale read at backup"]);
}

#[test]
fn teeth_versioned_reads() {
    find_violation("versioned_reads", 1000, &["read your writes"]);
}

#[test]
fn teeth_incarnation_ids() {
    find_violation(
        "incarnation",
        2000,
        &["two primaries in epoch", "divergence", "lost at node"],
    );
}

#[test]
fn teeth_atomic_decrement_at_apply() {
    find_violation("atomic_decrement", 1000, &["oversell"]);
}

#[test]
fn teeth_primary_reads_only_with_its_lease() {
    find_violation("primary_lease", 2000, &["stale read at primary"]);
}

#[test]
fn teeth_commits_wait_for_every_lease_holder() {
    find_violation(
        "commit_lease_holders",
        2000,
        &["lacks committed entries", "stale read at backup"],
    );
}

#[test]
fn teeth_backup_leases_are_capped_at_the_primarys() {
    // Found at seed 1121 since commit points pushed alone go unanswered
    // (fewer messages, other schedules); within the first 1 000 before.
    find_violation_from(
        "lease_cap",
        1001,
        1000,
        &["stale read at backup", "lacks committed entries"],
    );
}

#[test]
fn teeth_apply_dedupes_request_ids() {
    find_violation("dedupe", 2000, &["exactly once broken"]);
}

#[test]
fn three_replicas_stop_the_world_pauses() {
    run("3 replicas, pauses", 600_000_000, 300, |_| {
        let mut o = Options::new(3);
        o.w_pause = 6;
        o.read_every_ms = 5;
        o
    });
}

#[test]
fn teeth_leases_allow_for_clock_drift() {
    find_violation("drift", 1000, &["stale read", "lacks committed entries"]);
}

#[test]
fn teeth_a_paused_replica_checks_its_lease_when_it_serves() {
    find_violation("pause_clock", 2000, &["stale read"]);
}

#[test]
fn three_replicas_tiny_snapshots_heavy_reordering() {
    run("3 replicas, tiny snapshots", 500_000_000, 400, |_| {
        Options::tiny_snapshots(3)
    });
}

/// Snapshots built beside the driver (as the catalog builds them): the
/// core takes bytes of a version older than what it has applied since.
#[test]
fn three_replicas_deferred_snapshots() {
    run("3 replicas, deferred snapshots", 800_000_000, 300, |seed| {
        let mut o = Options::varied(3, seed);
        o.deferred_snapshots = true;
        o
    });
    run(
        "3 replicas, tiny deferred snapshots",
        810_000_000,
        300,
        |_| {
            let mut o = Options::tiny_snapshots(3);
            o.deferred_snapshots = true;
            o
        },
    );
}

/// Disks put back to older copies of themselves (restored backups) rejoin
/// as learners: no vote, no part in a commit, until caught up.
#[test]
fn three_replicas_restored_copies() {
    run("3 replicas, restored copies", 700_000_000, 200, |seed| {
        let mut o = Options::varied(3, seed);
        o.w_restore = 4;
        o
    });
    run(
        "3 replicas, restores aimed at lost data",
        720_000_000,
        200,
        |_| teeth_profile("restored_copy", false),
    );
}

#[test]
fn five_replicas_restored_copies() {
    run("5 replicas, restored copies", 710_000_000, 100, |seed| {
        let mut o = Options::varied(5, seed);
        o.w_restore = 4;
        o.relaxed_disk_policy = true;
        o
    });
}

/// A voter that granted a pre-vote to a higher id defers lower ids for an
/// election timeout, but never one whose log is further ahead: in this
/// schedule (5 replicas, the primary's disk lost) replica 1 defers to 4
/// and 4 to 3, neither of which can win (2 holds entries they lack), and
/// with the switch every election keeps failing after the faults heal.
#[test]
fn teeth_deferral_yields_to_a_log_further_ahead() {
    // 710 004 331 until commit points pushed alone went unanswered (fewer
    // messages, other schedules); rare: the one found in about 93 000 seeds.
    let seed = 710_053_476;
    let profile = |broken: bool| {
        let mut o = Options::varied(5, seed);
        o.w_restore = 4;
        o.relaxed_disk_policy = true;
        o.switches.defer_regardless_of_logs = broken;
        o
    };
    let e = Sim::new(seed, profile(true))
        .run()
        .expect_err("deferring regardless of logs keeps every election from finishing");
    assert!(e.contains("liveness: no write acknowledged"), "{e}");
    if let Err(e) = Sim::new(seed, profile(false)).run() {
        panic!("the same schedule with deferral yielding to longer logs: {e}");
    }
}

#[test]
fn teeth_restored_copies_rejoin_as_learners() {
    find_violation(
        "restored_copy",
        3000,
        &["two primaries in epoch", "divergence", "lost at node"],
    );
}

/// "Starting" is not "blank": a blank disk whose peers are still starting
/// must not found a new cluster.
#[test]
fn teeth_a_starting_replica_is_not_taken_for_a_blank_one() {
    find_violation(
        "starting",
        3000,
        &["two primaries in epoch", "divergence", "lost at node"],
    );
}

/// Frontend caches under every fault: no read served from a cache misses
/// a write a client already saw.
#[test]
fn three_replicas_with_frontend_caches() {
    run(
        "3 replicas, 2 caching frontends",
        740_000_000,
        200,
        |seed| {
            let mut o = Options::varied(3, seed);
            o.caches = Some(CacheOptions::new(2));
            o
        },
    );
    run(
        "3 replicas, caching frontends cut off",
        750_000_000,
        150,
        |_| teeth_profile("cache_drift", false),
    );
}

#[test]
fn five_replicas_with_frontend_caches() {
    run("5 replicas, 2 caching frontends", 760_000_000, 80, |seed| {
        let mut o = Options::varied(5, seed);
        o.caches = Some(CacheOptions::new(2));
        o
    });
}

#[test]
fn teeth_cache_leases_allow_for_clock_drift() {
    find_violation("cache_drift", 2000, &["stale read from cache"]);
}

/// A new primary's fence clears what a frontend counted as begun while the
/// old primary can still commit: answered before its end arrived, a write's
/// book can be filled from a read that began before it committed.
#[test]
fn teeth_writes_are_answered_only_once_their_ends_reached_the_caches() {
    // Rare: found once in 3 000 fresh schedules of the cache profiles, at
    // 759 002 709; at 759 001 158 since commit points pushed alone go
    // unanswered (fewer messages, other schedules).
    find_violation_from(
        "ends_before_answers",
        759_001_001,
        1000,
        &["stale read from cache"],
    );
}

#[test]
fn teeth_writes_commit_only_once_their_begins_reached_the_caches() {
    find_violation("held_writes", 2000, &["stale read from cache"]);
}

#[test]
fn three_replicas_blank_disks_asking_starting_peers() {
    run(
        "3 replicas, blank disks and starting peers",
        730_000_000,
        200,
        |_| teeth_profile("starting", false),
    );
}

#[test]
fn teeth_backup_reads_wait_for_their_read_index() {
    find_violation("read_index", 1000, &["stale read at backup"]);
}

/// Probe (not run by default): the safe protocol under the relaxed disk
/// policy, where a replaced disk may hold entries only one other disk has.
#[test]
#[ignore]
fn probe_relaxed_disk_policy() {
    run("relaxed disk policy", 900_000_000, 1000, |_| {
        teeth_profile("incarnation", false)
    });
}

/// Replays one teeth profile's schedule with the mechanism on:
/// `PROBE_PROFILE=lease_cap PROBE_SEED=349 PYGMY_SIM_TRACE=1 cargo test
/// --test it simulation -- --ignored probe_replay_teeth_control`.
#[test]
#[ignore]
fn probe_replay_teeth_control() {
    let name = std::env::var("PROBE_PROFILE").unwrap();
    let seed: u64 = std::env::var("PROBE_SEED").unwrap().parse().unwrap();
    if let Err(e) = Sim::new(seed, teeth_profile(&name, false)).run() {
        panic!("{e}");
    }
}
