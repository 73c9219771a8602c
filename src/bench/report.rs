//! The bench's outputs: `report.md` (tables and the speed targets), SVG
//! plots, and `results.json` with every figure.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::{LatencyRow, MachineCheck, Results, TargetCheck};

/// Requests per second nginx served a static file on the reference 2-core
/// machine: the cached lookup's target.
const NGINX_STATIC_PER_SECOND: f64 = 95_000.0;
const BUY_P50_TARGET_US: u64 = 800;
const BUYS_PER_SECOND_TARGET: f64 = 8_000.0;
const FAILOVER_GAP_TARGET_MS: f64 = 300.0;
const MEMORY_TARGET_BYTES: u64 = 80 * 1024 * 1024;

/// What profiling the buy path showed, and what changed because of it
/// (taken by hand: `perf record -a -g` while wrk sent buys at 32
/// connections to a `pygmy up` store; see docs/DESIGN-NOTES.md).
const PROFILE: &str = "## What the profile showed, and what changed\n\n\
Profiled with `perf record -a -g -F 499` for 6 s while `wrk -c32` sent buys to a `pygmy up` store on this \
2-core machine (release build; the call graphs from a build with frame pointers):\n\n\
- **Both cores were busy** (97% of samples): buys are bound by CPU, not by waiting. By process: the catalog \
primary 27%, the frontend 16%, each catalog backup 11–12%, each order replica 8–9%.\n\
- **Where it goes**: SQLite 16% of all samples (the catalog replicas' steps 13%, and in them the fsyncs, \
6.5% of the machine: on this virtual machine each one exits to the device, `iowrite16`), loopback TCP sends \
10%, malloc/free 7%, parking and waking threads 5%; the rest is HTTP, JSON and the runtime, with no single \
hot spot.\n\
- **One queue stood out**: every order replica looked each buy's request id up in its log before sending it \
on, through the blocking pool and one shared SQLite connection, so its buys queued there one at a time. A \
first attempt with an id the frontend has just minted cannot be in any log: it is now marked `fresh` and not \
looked up.\n\
- So a buy costs what its internal requests and fsyncs cost, in every tier: about ten HTTP requests and four \
fsyncs. What remains to do is fewer of both per buy, not a faster function.\n\n\
Changed because of what the bench and the profile showed:\n\n\
- the catalog primary sends its appends while it persists them (steps holding only new entries), so its \
fsync and the backups' overlap: buy p50 at one connection went from 2.0 to 1.7 ms without the cache;\n\
- the catalog's driver queue allocated 100 000 slots up front (11 MB per catalog replica): now sized from \
the in-flight limit;\n\
- glibc kept freed buffers resident (its mmap threshold rises after a large free, and nothing trimmed the \
heap): nodes pin the threshold and hand free memory back every 10 s; with the queue, the store after the \
bench went from about 180 MB to about 60 MB (PSS);\n\
- memory is reported as PSS, each page once: the seven processes share one binary, whose pages a sum of \
resident sizes counts seven times;\n\
- failover: a killed primary cost ~0.9 s without a buy, and a killed *backup* ~0.7 s (the primary waits out \
its read lease). Lease and election timeout went from 500 to 200 ms, and the callers' retry backoff from up \
to 200 ms to up to 40 ms (a failover ended while callers slept): both gaps are now about 0.3 s, and the \
latency run at 128 connections starts no spurious election;\n\
- a step that only moves the commit point (and applies up to it) is no longer waited on with an fsync: \
votes, entries, truncations and snapshots still are, before anything depends on them, and a crash loses only \
what is learnt and applied again. On a run where the floor was half the usual, buy p50 at one connection \
went from 3.4–3.7 to 2.8–3.2 ms and buys at 32 connections from ~1 600 to ~1 800–2 000 /s;\n\
- every uncached lookup was one HTTP request and one read admission on a catalog replica: the frontend now \
sends the lookups that miss its cache in batches (at most two in flight; what queues meanwhile leaves \
together, read from one replica state). Uncached lookups at 64 connections went from 0.19 to about 0.5 × the \
floor;\n\
- request ids no longer accumulate: keyless buys' ids expire 30 s after they are written (past every retry budget) and idempotency keys \
after a day, by the primary's entry timestamps, so the store's memory and snapshot stay flat under any \
number of buys (see the soak);\n\
- a buy's first attempt with a freshly minted id skips the order log's lookup (above): buys at 32 \
connections went from 1 500–1 700 to 1 900–2 000 /s, and buy p50 at one connection down by about 0.35 ms \
(wrk, runs interleaved);\n\
- a write's begin no longer precedes its replication: the primary queues the begin for the caches and \
proposes the write *held* at once (replicated and made durable, not committed), and releases it once every \
cache has the begin, so the two round trips overlap. Buy p50 at one connection 2.6–3.1 → 2.4–2.5 ms, buys at \
32 connections 1 500–2 000 → 2 000–2 400 /s (wrk, runs interleaved);\n\
- a second reading counted CPU per request, each process's CPU time over the requests `wrk` completed \
(steadier than throughput on this machine): a buy at 32 connections cost about 730 µs of CPU across the \
seven processes (catalog primary 216, frontend 116, each backup 99, each order replica 66), so 8 000 buys/s \
on two cores would need 250 µs; a cached lookup cost the frontend 23 µs against 19 µs for the floor. The \
frontend's profile under lookups: about 9% of its samples in our middleware's plumbing (each `from_fn` layer \
boxes a future and clones the routes per request, and there were five), a registry lookup and a string per \
request for the request metrics, a system call per request id, and the answer's JSON rendered on every hit. \
Now one middleware admits every request (id and span, time limit, whole body, metrics, Host check), the \
metrics keep their handles, request ids come from a per-thread generator, and a cached book keeps its \
rendered JSON: CPU per cached lookup 23 → 15–16 µs, per floor request 19 → 15 µs, per uncached lookup 48 → 40 \
µs, per buy about −5%;\n\
- the heartbeat went from 25 to 15 ms: the election stagger is two heartbeats per higher id, so the next \
primary campaigns 20 ms sooner. A primary SIGKILL under load left 237–241 ms without a buy in three \
failover runs, against 265–286 ms interleaved with them; the idle store uses 10% of a core instead of 7%;\n\
- full runs showed a 120–130 ms gap without a buy while an order replica was down, where failover-only runs \
showed 6–13 ms: the catalog replicas were snapshotting (every 10 000 entries: after the latency run, 50 000 \
to 90 000 kept answers, 5–9 MB, built in 80–213 ms on the driver's thread, with nothing committing \
meanwhile). Snapshots are now built beside the driver, from a read transaction begun between two steps, \
and their bytes are not stored (the tables hold them; a replica that starts encodes them again): storing \
one took 26–80 ms on the driver's thread and now takes 7–15 ms, the log it covers deleted 500 rows a step. \
Buy p99 at 64 connections under that load went from 158 to 71–91 ms, then to 38 ms;\n\
- counting the internal requests per buy (by route, at one connection) showed 8.4 replication messages: \
each backup answered the entry and then the commit point pushed alone right after it. That push now goes \
`quiet`, answered only by a refusal (leases and progress count the answers to entries and heartbeats): \
6.4 replication messages per buy at one connection, CPU per buy about −10%, p50 about −4%; at 32 \
connections, where commit points ride with the next entries, no change beyond noise;\n\
- fourteen runtime workers for seven processes on two cores, each a thread to wake: a node now runs on one \
thread (tokio's current-thread runtime; `serve --threads N` gives more). Buys at 32 connections +6 to +13%, \
CPU per buy −7 to −13%, buy p50 at one connection −6 to −16%, uncached lookups +13 to +39% (wrk, runs \
interleaved);\n\
- CPU per process then put each backup at 82–84 µs per buy at 32 connections, much of it HTTP: each batch \
of replication messages was a request with an answer that says nothing. Replicas now keep one stream per \
peer (an HTTP upgrade, then length-prefixed frames one way; `POST` while a stream cannot open): buys at 32 \
connections +9 to +22%, CPU per buy −12 to −18% (each backup 58–61 µs), buy p50 at one connection −5 to \
−20% (wrk, runs interleaved);\n\
- the frontend's profile under cached lookups then put 6% of its CPU in the `tracing` span each request \
opened (its fields formatted into a string on every request, logged or not). The request's id, method and \
path now live in a task-local, written by the log formatter into the lines that are logged, where the span's \
were. With two stores up at once and the load alternating between them: CPU per cached lookup −11 and \
−26%, CPU per buy −5 and −7%;\n\
- the same profile showed the frontend reading \"cached\" lookups from the catalog: after a burst of buys its \
cache never filled some books again. A load generator that stops with buys in flight closes their \
connections, and the catalog dropped its part of such a buy between telling the caches the write began and \
telling them it ended (the write still committed), so the caches kept those books pending for good. The \
write now runs in a task of its own from begin to end, and so does an order replica's buy (dropped while the \
catalog committed it, the sold copy was in no order log);\n\
- the profile at 32 connections put a fifth of the machine in SQLite's commits (an fsync each) and a tenth \
in loopback sends, and each replication round (an append and an answer per backup, an fsync per replica, a \
commit point) carried 3–4 writes. The primary now proposes a write at once only when none of its writes is \
in flight; those that come meanwhile wait until they are answered, then go together in one round. With two \
stores up at once and the load alternating between them: CPU per buy at 32 connections −11 and −12%, buys \
per second +12 and +16%; one connection unchanged;\n\
- after that, the order tier was the largest (28% of the samples), its cost HTTP in and out: one request \
served and one sent per buy. Order replicas now send the buys that queue while two batches are out to the \
catalog primary in one request (`POST /internal/writes`, each write applied as if it came alone); tried \
before write groups, it moved buys by about 4%, inside noise. Measured again with two stores alternating: \
CPU per buy at 32 connections −13% (six pairs, −5 to −21%), buys per second +14%; one connection unchanged;\n\
- the profile then put the frontend first (17% of the samples), and each order replica still served one \
HTTP request per buy. Frontends now send the buys that queue while two batches are out to an order replica \
in one request (`POST /internal/buys`, each handled as if it came alone), so a batch's buys also reach the \
catalog together. With two stores alternating: CPU per buy at 32 connections −31% (six rounds), buys per \
second +18 to +35%; one connection unchanged;\n\
- the machine-wide profile then put `memmove` at 3.6% of the samples: a write's or a buy's work that runs in a \
task of its own, and each item of a batch, is 2–5 KB of future, held inline by wrappers of 5–11 KB, and each \
wrapping and the spawn copied it whole. The work now goes on the heap first: `memmove` 1.7% of the samples, \
CPU per buy −6% and buys/s +7% over eight alternating pairs;\n\
- a timeline across the seven processes (temporary timestamps at every request, batch, order log commit and \
catalog driver step, at 32 connections) showed buys moving in waves, and each tier sending the first of a \
wave alone and the rest a step behind it: a batch's items are handled by tasks that run one after another, \
and whatever took them woke at the first. The catalog's driver proposed a batch's first write alone (the \
other 17–28 waited out its replication round, 1.2–1.6 ms), the order log's writer committed the first \
order alone, the invalidation pusher sent the first end alone (the rest in two more pushes), and the \
batchers sent the first buy of a wave alone. Each now takes what is handed over on the same turn of the \
runtime (it yields once, then takes everything), the catalog's writes and releases reach its driver as one \
input, and every write taken with the first is proposed in the same step (tried before without the rest, \
below). With two stores alternating, eight pairs at 32 connections: buys/s +33 to +57% (median +41%), CPU \
per buy −21 to −37%, p50 6.7–7.3 → 4.2–4.9 ms; at 64 connections +34 to +41%; one connection unchanged;\n\
- the primary's driver thread then checksummed each buy's book row three times and upserted it, though a \
group touches each book about four times (SHA-256 was 3.4% of the thread's samples, 1.3% after). \
A step's book rows are now written once each, when its entries are applied; and an answer's outcome, read \
back for every answer a snapshot carries, is read in one pass instead of through serde's buffering of \
internally tagged enums: +1.5 to +3.7% buys/s, CPU per buy −1 to −4% over six alternating pairs (small; \
kept because it takes away work the profile showed);\n\
- `perf trace` on an order replica showed its log's writer waking the runtime once per order after each \
commit (a `oneshot` sent from outside the runtime writes to its eventfd), and the catalog's driver answered \
its writes the same way: both now hand a step's answers to a task on the runtime in one message. A write's \
end waited for the primary to apply the write, though it needs it only committed: it now leaves at commit, \
beside the apply, and a lease granted after an end carries the end's version as the floor of what the \
frontend may fill. Six alternating pairs at 32 connections: +0 to +4% buys/s; one connection, p50 −0.07 to \
−0.11 ms;\n\
- CPU per buy climbed from about 185 to 235 µs over the first 30 s of load: every 10 000 entries each \
catalog replica built snapshot bytes that encode every kept answer (180 000 at 6 000 buys/s), to send to a \
replica that lags, and none did. The core now compacts its log without bytes (the replica's tables are the \
snapshot) and has bytes built only for a backup that needs them: nine alternating pairs at 32 \
connections, +3.5 to +16% buys/s (median +9%), CPU per buy −4 to −19% (median −14%); at 64 connections +12 \
and +18%; the stores held 72 MB (PSS) before and 48 MB after the same load;\n\
- the frontend's profile under cached lookups spread its samples over a dozen crates' small functions \
(tokio, hyper, axum, serde and ours), with no hot spot: the release build is now optimised as one unit \
(`lto = \"fat\"`, `codegen-units = 1`), so calls between crates can be inlined. Two stores alternating, the \
builds' places swapped between two sets: CPU per cached lookup −13 to −34% in eight pairs (median −23%), \
lookups per second +12 to +52%, the floor +3 to +21%; CPU per buy at 32 connections −3% in the median of \
20 pairs; one connection unchanged. A clean release build takes about a minute longer.\n\n\
Where a buy's time and CPU go, from the nodes' metrics around one 8 s `wrk -c32` run before the last four changes \
(3 685 buys/s, p50 8.3 ms):\n\n\
- the frontend's `/buy` averaged 8.1 ms: 4.8 ms in its batch's call to an order replica (10.2 buys a batch), \
3.3 ms waiting for one of its two batch slots, the hop and its own work; the order replica's fsync and hops \
1.4 ms of the 4.8; the catalog primary's batch call 3.4 ms, where a write mostly waits out the round in flight \
and rides the next (about 1.5 ms each under load, 0.75 ms alone), then sends its end to the caches. 32 \
connections at 8.3 ms are Little's law's 3 850 buys/s: 8 000 needs 4 ms a buy;\n\
- CPU per buy 349 µs across the seven processes (the primary 116, each backup 52–53, the frontend 59, each \
order replica 23): 8 000 buys/s would take 2.8 cores, so the target needs both half the latency and at most \
about 200 µs a buy; about 32 system calls a buy across the store, none of them a large share alone;\n\
- a cached lookup costs the frontend 14 µs of CPU (wrk, 64 connections), as `/healthcheck` does, two thirds \
of it in the kernel's loopback TCP: one thread caps it near 71 000/s, and two threads read the same 67–70 000 \
with wrk taking 0.7 of a core.\n\n\
Tried and not kept:\n\n\
- a catalog snapshot every 40 000 entries (before compaction needed no bytes): it took 7–14% off CPU per \
buy once the kept answers filled their window, but the store held 119 MB (PSS) against 78 MB, over the \
memory target;\n\
- a catalog snapshot every 30 000 entries instead of 10 000 (building them was 3.9% of the samples): CPU per \
buy the same over eight alternating pairs, and three times the log in memory;\n\
- glibc's fast bins off (`M_MXFAST` 0; the primary's runtime thread spent 18% of its samples in `free` and \
`malloc_consolidate`): CPU per buy +1% over six alternating pairs;\n\
- proposing at once every write the catalog's driver takes with the first, rather than letting the rest \
wait a round: +8.5% buys in 13 alternating pairs, +3% in 8 more, and two full bench runs lower than the \
version without it, because a batch's writes did not yet reach the driver together (now they do, and it \
is done: above);\n\
- four batches of buys in flight per frontend instead of two: +5% buys, +4% CPU, inside noise; three, once a \
turn's buys went together: −9 to +1% buys;\n\
- two write groups in flight at the catalog primary instead of one (tried twice, the second time once a \
batch's writes reached the driver together): −1 to +7% buys over six pairs, inside noise;\n\
- database pages of 1 KiB instead of 4 KiB: the bytes written per buy halved, CPU per buy did not move (an \
fsync here costs per call, not per byte);\n\
- mimalloc in place of glibc's allocator (malloc/free are 7% of the samples): buys at 32 connections about \
10% up, inside noise, but the store after a run took 141 MB (PSS) against 57 MB, over the memory target; with \
its memory handed back at once, 65 MB and no gain left;\n\
- four glibc arenas instead of two, one tokio worker per process instead of two, and one lookup batch in \
flight instead of two: each moved CPU per request by 3% or less, or not consistently;\n\
- answering a write while its cache end travels, rather than once every cache has it: the ends then ride \
with the next writes' begins, and buys at 32 connections rose about 12% (6–27% in five interleaved pairs), \
but the simulator found a cache serving a value from before an acknowledged write, so the end still comes \
first;\n\
- heartbeats only to backups sent nothing else within the interval (entries renew the leases as heartbeats \
do): another 0.4 replication messages per buy at one connection, but with those schedules the simulator no \
longer found the stale cached read above in 40 000 tries, and that rule's teeth matter more;\n\
- CPUs kept from halting (a busy loop per CPU at `SCHED_IDLE`, which gives way to any thread at once), \
since on this virtual machine waking a halted CPU is what a wake-up costs: a pipe round trip after 0.5 ms \
asleep fell from 91–101 to 36–38 µs (p50), but a lone buy's p50 rose from 3.2–3.3 to 4.1–4.4 ms and buys at \
32 connections fell from 1 700–2 100 to about 1 500 /s (alternating runs): the host shares a busy CPU with \
its other guests, so the work slowed more than the wake-ups sped up.\n";

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn find<'a>(
    r: &'a Results,
    op: &str,
    cache: bool,
    shape: &str,
    conns: usize,
) -> Option<&'a LatencyRow> {
    r.latency.as_ref()?.rows.iter().find(|x| {
        x.op == op
            && (x.cache == cache || op == "floor")
            && x.shape == shape
            && x.connections == conns
    })
}

/// Puts next to the targets with an anchor what that anchor did in this
/// run, and the run's figure as a multiple of it (above 1 is better for
/// throughput, below 1 for latency).
fn anchor_targets(
    out: &mut [TargetCheck],
    a: &super::Anchors,
    cached64: Option<f64>,
    buy1: Option<u64>,
    buy32: Option<f64>,
) {
    use super::anchors::{ETCD, NGINX};
    type Show = fn(f64) -> String;
    let rows: [(&str, Option<f64>, Option<f64>, Show); 3] = [
        (
            CACHED_TARGET,
            a.find(NGINX, 64).map(|s| s.per_second),
            cached64,
            |n| format!("nginx: {n:.0} req/s"),
        ),
        (
            BUY_P50_TARGET,
            a.find(ETCD, 1).map(|s| s.p50_us as f64),
            buy1.map(|b| b as f64),
            |e| format!("etcd put, 1 connection: p50 {}", fmt_us(e as u64)),
        ),
        (
            BUYS_TARGET,
            a.find(ETCD, 32).map(|s| s.per_second),
            buy32,
            |e| format!("etcd puts, 32 connections: {e:.0} /s"),
        ),
    ];
    for (what, anchor, run, show) in rows {
        let Some(t) = out.iter_mut().find(|t| t.what == what) else {
            continue;
        };
        t.anchor = Some(match anchor {
            None => "not measured".into(),
            Some(x) => format!(
                "{}{}",
                show(x),
                run.map_or(String::new(), |r| format!(
                    "; this run {:.2} × it",
                    r / x.max(1e-9)
                ))
            ),
        });
    }
}

const CACHED_TARGET: &str = "cached lookup, 64 connections";
const BUY_P50_TARGET: &str = "durable replicated buy, one at a time (1 connection), p50";
const BUYS_TARGET: &str = "buys, 32 connections";

/// Each speed target and where the run stands.
pub fn targets(r: &Results) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let floor64 = find(r, "floor", true, "closed", 64).map(|f| f.stats.per_second);
    let cached64 = find(r, "lookup", true, "closed", 64).map(|f| f.stats.per_second);
    let uncached64 = find(r, "lookup", false, "closed", 64).map(|f| f.stats.per_second);
    let check =
        |what: &str, target: String, measured: Option<String>, met: Option<bool>| TargetCheck {
            what: what.into(),
            target,
            measured: measured.unwrap_or_else(|| "not measured".into()),
            met,
            anchor: None,
        };
    out.push(check(
        CACHED_TARGET,
        format!(
            "≥ {:.0} req/s (nginx, static file)",
            NGINX_STATIC_PER_SECOND
        ),
        cached64.map(|c| format!("{c:.0} req/s ({:.0}%)", 100.0 * c / NGINX_STATIC_PER_SECOND)),
        cached64.map(|c| c >= NGINX_STATIC_PER_SECOND),
    ));
    let ratio = cached64.zip(floor64).map(|(c, f)| c / f);
    out.push(check(
        "cached lookup vs the floor, 64 connections",
        "≥ 0.90 × floor".into(),
        ratio.map(|x| format!("{x:.3} × floor")),
        ratio.map(|x| x >= 0.9),
    ));
    let ratio = uncached64.zip(floor64).map(|(c, f)| c / f);
    out.push(check(
        "uncached lookup (frontend → catalog) vs the floor, 64 connections",
        "≥ 0.40 × floor".into(),
        ratio.map(|x| format!("{x:.3} × floor")),
        ratio.map(|x| x >= 0.4),
    ));
    let buy1 = find(r, "buy", true, "closed", 1).map(|b| b.stats.p50_us);
    out.push(check(
        BUY_P50_TARGET,
        format!("≤ {}", fmt_us(BUY_P50_TARGET_US)),
        buy1.map(fmt_us),
        buy1.map(|b| b <= BUY_P50_TARGET_US),
    ));
    let buy32 = find(r, "buy", true, "closed", 32).map(|b| b.stats.per_second);
    out.push(check(
        BUYS_TARGET,
        format!("≥ {BUYS_PER_SECOND_TARGET:.0} /s"),
        buy32.map(|b| format!("{b:.0} /s ({:.0}%)", 100.0 * b / BUYS_PER_SECOND_TARGET)),
        buy32.map(|b| b >= BUYS_PER_SECOND_TARGET),
    ));
    let primary = r
        .failover
        .as_ref()
        .and_then(|f| f.faults.iter().find(|f| f.kind == "catalog primary"));
    out.push(check(
        "catalog primary SIGKILLed under load",
        format!(
            "0 client-visible errors, ≤ {FAILOVER_GAP_TARGET_MS:.0} ms without a successful buy"
        ),
        primary.map(|p| {
            format!(
                "{} errors, {:.0} ms without a successful buy",
                p.buy_errors + p.lookup_errors,
                p.longest_buy_gap_ms
            )
        }),
        primary.map(|p| {
            p.buy_errors + p.lookup_errors == 0 && p.longest_buy_gap_ms <= FAILOVER_GAP_TARGET_MS
        }),
    ));
    let unique = r.memory_unique_bytes.filter(|_| !r.memory.is_empty());
    out.push(check(
        &format!(
            "memory of the {}-process store after the bench (PSS summed: each page once)",
            r.memory.len()
        ),
        format!("≤ {} MB", MEMORY_TARGET_BYTES / (1024 * 1024)),
        unique.map(|u| {
            format!(
                "{} (RSS summed: {})",
                fmt_mb(u),
                fmt_mb(r.memory_total_bytes)
            )
        }),
        unique.map(|u| u <= MEMORY_TARGET_BYTES),
    ));
    if let Some(s) = &r.soak
        && s.samples.len() >= 5
    {
        // Medians of two windows, so one sample taken mid-burst decides
        // nothing: early (after the first tenth: caches filled, the first
        // answer window passed) against the last fifth.
        let n = s.samples.len();
        let window = |from: usize, to: usize, f: &dyn Fn(&super::SoakSample) -> u64| {
            let mut v: Vec<u64> = s.samples[from..to.max(from + 1)].iter().map(f).collect();
            v.sort_unstable();
            v[v.len() / 2]
        };
        let flat =
            |what: &str, f: &dyn Fn(&super::SoakSample) -> u64, show: &dyn Fn(u64) -> String| {
                let (a, b) = (window(n / 10, n * 3 / 10, f), window(n * 4 / 5, n, f));
                let growth = if a == b {
                    1.0
                } else {
                    b as f64 / a.max(1) as f64
                };
                check(
                    &format!(
                        "{what} under a soak (mixed and hostile traffic, nothing scraping metrics)"
                    ),
                    "flat (median of the last fifth ≤ 1.1 × median of the second and third tenths)"
                        .into(),
                    Some(format!(
                        "{} → {} over {:.0} s ({:+.1}%)",
                        show(a),
                        show(b),
                        s.seconds,
                        100.0 * (growth - 1.0)
                    )),
                    Some(growth <= 1.10),
                )
            };
        out.push(flat("memory", &|x| x.memory_bytes, &fmt_mb));
        out.push(flat("open file descriptors", &|x| x.open_fds, &|n| {
            n.to_string()
        }));
        out.push(flat(
            "answers a catalog replica keeps (what its snapshot holds)",
            &|x| x.answers_kept,
            &|n| n.to_string(),
        ));
    }
    if let Some(a) = &r.anchors {
        anchor_targets(&mut out, a, cached64, buy1, buy32);
    }
    out
}

pub fn write(dir: &Path, r: &Results) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(dir.join("results.json"), json).context("writing results.json")?;
    let mut plots = Vec::new();
    let plot = |name: &str,
                f: &dyn Fn(&Path) -> PlotResult,
                plots: &mut Vec<String>|
     -> anyhow::Result<()> {
        f(&dir.join(name)).map_err(|e| anyhow::anyhow!("plotting {name}: {e}"))?;
        plots.push(name.to_string());
        Ok(())
    };
    if let Some(l) = &r.latency {
        plot(
            "throughput.svg",
            &|p| latency_plot(p, &l.rows, true),
            &mut plots,
        )?;
        plot(
            "latency.svg",
            &|p| latency_plot(p, &l.rows, false),
            &mut plots,
        )?;
    }
    if let Some(i) = &r.invalidation {
        plot("invalidation.svg", &|p| invalidation_plot(p, i), &mut plots)?;
    }
    if let Some(f) = &r.failover {
        plot("failover.svg", &|p| failover_plot(p, f), &mut plots)?;
    }
    if let Some(s) = &r.soak {
        plot("soak.svg", &|p| soak_plot(p, s), &mut plots)?;
    }
    std::fs::write(dir.join("report.md"), markdown(r)).context("writing report.md")?;
    Ok(())
}

pub fn fmt_us(us: u64) -> String {
    if us < 10_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.1} ms", us as f64 / 1e3)
    }
}

fn fmt_mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / (1024.0 * 1024.0))
}

fn opt_ratio(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.2}×")).unwrap_or_else(|| "—".into())
}

/// The machine check's pinned round trips, for the report's header:
/// empty where threads could not be pinned.
fn placed_wakes(mc: &MachineCheck) -> String {
    let mut s = String::new();
    if let (Some(p50), Some(p99)) = (
        mc.same_cpu_wake_round_trip_p50_us,
        mc.same_cpu_wake_round_trip_p99_us,
    ) {
        let _ = write!(
            s,
            "; after sleeping, with both threads pinned to one CPU p50 {p50} µs (p99 {p99} µs)"
        );
        if let (Some(p50), Some(p99)) = (
            mc.cross_cpu_wake_round_trip_p50_us,
            mc.cross_cpu_wake_round_trip_p99_us,
        ) {
            let _ = write!(s, ", and pinned to two CPUs p50 {p50} µs (p99 {p99} µs)");
        }
    }
    s
}

/// The lone buy's floor with every wake-up placed, for the floor's
/// paragraph: empty where threads could not be pinned.
fn placed_floors(mc: &MachineCheck) -> String {
    match (mc.buy_floor_same_cpu_us, mc.buy_floor_cross_cpu_us) {
        (Some(same), Some(cross)) => format!(
            "; {} with every wake-up on its waker's CPU, {} with every one on another CPU",
            fmt_us(same),
            fmt_us(cross)
        ),
        (Some(same), None) => format!("; {} with every wake-up on its waker's CPU", fmt_us(same)),
        _ => String::new(),
    }
}

/// The anchors' own figures, the programs measured, and what was not.
fn anchors_section(m: &mut String, a: &super::Anchors) {
    let _ = writeln!(m, "### The anchors\n");
    let _ = writeln!(
        m,
        "Measured {}, with the bench's own load generator (closed loop, keep-alive \
         connections; the faster of two cells for nginx): nginx serving a file the size and shape of a \
         lookup's answer, as many workers as CPUs; three etcd members on loopback, each fsyncing every \
         write before it answers, taking puts of small values at the leader's JSON gateway.\n",
        if a.store_stopped {
            "after the store stopped"
        } else {
            "while the target store ran, idle"
        }
    );
    for v in &a.versions {
        let _ = writeln!(m, "- `{v}`");
    }
    for s in &a.skipped {
        let _ = writeln!(m, "- not measured: {s}");
    }
    if !a.versions.is_empty() || !a.skipped.is_empty() {
        m.push('\n');
    }
    if !a.rows.is_empty() {
        let _ = writeln!(
            m,
            "| anchor | conns | req/s | p50 | p90 | p99 | max | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for x in &a.rows {
            let _ = writeln!(
                m,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                x.anchor,
                x.connections,
                x.stats.per_second,
                fmt_us(x.stats.p50_us),
                fmt_us(x.stats.p90_us),
                fmt_us(x.stats.p99_us),
                fmt_us(x.stats.max_us),
                x.stats.errors(),
            );
        }
        m.push('\n');
    }
}

fn markdown(r: &Results) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# pygmy bench report\n");
    let _ = writeln!(m, "Made by:\n\n```sh\n{}\n```\n", r.command);
    let _ = writeln!(
        m,
        "- store: {}\n- machine: {} CPUs; the store, and the load generator, share them",
        r.store, r.cpus
    );
    if let Some(mc) = &r.machine {
        let _ = writeln!(
            m,
            "- its own latencies, measured before the store started: an fsync of 4 KiB in `{}` p50 {} (p99 {}); \
             a sleeping thread woken and answering, through pipes, p50 {} µs (p99 {} µs) back to back, \
             and p50 {} µs (p99 {} µs) when both had slept {} µs first{}",
            mc.disk,
            fmt_us(mc.fsync_p50_us),
            fmt_us(mc.fsync_p99_us),
            mc.wake_round_trip_p50_us,
            mc.wake_round_trip_p99_us,
            mc.idle_wake_round_trip_p50_us,
            mc.idle_wake_round_trip_p99_us,
            mc.idle_before_wake_us,
            placed_wakes(mc),
        );
    }
    let _ = writeln!(
        m,
        "- run took {:.0} s{}\n",
        r.seconds,
        if r.quick {
            " (`--quick`: short cells, figures are rough)"
        } else {
            ""
        }
    );
    for s in &r.skipped {
        let _ = writeln!(m, "- not run: {s}");
    }
    if !r.skipped.is_empty() {
        m.push('\n');
    }

    let _ = writeln!(m, "## Speed targets\n");
    if r.anchors.is_some() {
        let _ = writeln!(
            m,
            "The targets are fixed figures, from one day on a reference machine; the anchors beside them \
             were measured on this machine in this run (see \"The anchors\", below).\n"
        );
        let _ = writeln!(
            m,
            "| | target | this run | met | the anchor, this run |\n|---|---|---|---|---|"
        );
    } else {
        let _ = writeln!(m, "| | target | this run | met |\n|---|---|---|---|");
    }
    for t in &r.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = write!(m, "| {} | {} | {} | {met} |", t.what, t.target, t.measured);
        if r.anchors.is_some() {
            let _ = write!(m, " {} |", t.anchor.as_deref().unwrap_or("—"));
        }
        m.push('\n');
    }
    m.push('\n');
    if let Some(a) = &r.anchors {
        anchors_section(&mut m, a);
    }
    if let Some(mc) = &r.machine {
        let _ = writeln!(
            m,
            "What this machine allows a lone buy, before any work is done: it waits for {} fsyncs one after \
             the other (the catalog's, on every replica of its view at once, then its order replica's log's) \
             and for a wake-up at each of the {} messages on its path between processes and at both ends of \
             its {} hand-offs to a disk thread, {} wake-ups in all, each of a process that slept since its \
             last step. At this run's p50s (above: the fsync, and half the round trip after {} µs asleep) \
             that is {} of the {} target{}.\n",
            mc.buy_fsyncs_in_series,
            mc.buy_messages_in_series,
            mc.buy_disk_handoffs_in_series,
            mc.buy_messages_in_series + 2 * mc.buy_disk_handoffs_in_series,
            mc.idle_before_wake_us,
            fmt_us(mc.buy_floor_us),
            fmt_us(BUY_P50_TARGET_US),
            placed_floors(mc),
        );
    }

    if let Some(l) = &r.latency {
        let _ = writeln!(m, "## Q1: latency, cache on and off\n");
        let _ = writeln!(
            m,
            "Each cell ran {:.2} s after a short untimed warm-up. *sequential*: one request at a time, each on a new \
             connection (as the original's client did); *closed*: keep-alive connections, each sending when answered; \
             *open*: requests due at a fixed rate (70% of the closed loop's at 32 connections), latency counted from \
             when each was due, so a stall is not hidden by a slower send rate (coordinated omission). \
             The floor is `GET /healthcheck` on the frontend: the same HTTP stack, no work; each of its cells ran \
             before and after everything else, and the faster run is kept, so a slow moment cannot flatter the \
             ratios. \"× floor\" divides by the floor's figure at the same shape and connections.\n",
            l.cell_seconds
        );
        let _ = writeln!(
            m,
            "![throughput](throughput.svg)\n\n![latency](latency.svg)\n"
        );
        let _ = writeln!(
            m,
            "| op | cache | shape | conns | req/s | req/s × floor | p50 | p90 | p99 | max | p50 × floor | errors |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for x in &l.rows {
            let shape = match (&x.shape[..], x.stats.offered_per_second) {
                ("open", Some(o)) => format!("open @ {o:.0}/s"),
                (s, _) => s.to_string(),
            };
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                x.op,
                if x.op == "floor" {
                    "—"
                } else if x.cache {
                    "on"
                } else {
                    "off"
                },
                shape,
                x.connections,
                x.stats.per_second,
                opt_ratio(x.throughput_vs_floor),
                fmt_us(x.stats.p50_us),
                fmt_us(x.stats.p90_us),
                fmt_us(x.stats.p99_us),
                fmt_us(x.stats.max_us),
                opt_ratio(x.p50_vs_floor),
                x.stats.errors()
            );
        }
        let open: Vec<&LatencyRow> = l.rows.iter().filter(|x| x.shape == "open").collect();
        if !open.is_empty() {
            let _ = writeln!(
                m,
                "\nOpen loop, from sending rather than from when due (the difference is time waiting for a free \
                 connection or a late timer; the timer's resolution is 1 ms):\n"
            );
            for x in open {
                let _ = writeln!(
                    m,
                    "- {}: p50 {}, p99 {}",
                    x.op,
                    x.stats
                        .service_p50_us
                        .map(fmt_us)
                        .unwrap_or_else(|| "—".into()),
                    x.stats
                        .service_p99_us
                        .map(fmt_us)
                        .unwrap_or_else(|| "—".into()),
                );
            }
        }
        m.push('\n');
    }

    if let Some(i) = &r.invalidation {
        let _ = writeln!(m, "## Q2: the cost of invalidation\n");
        let _ = writeln!(
            m,
            "{} rounds, one keep-alive connection: look a book up (the cache answers), buy it (the catalog \
             primary invalidates it in the frontend's cache before it answers), look it up again (a miss, then \
             cached again).\n",
            i.rounds
        );
        let _ = writeln!(m, "![invalidation](invalidation.svg)\n");
        let _ = writeln!(
            m,
            "| request | p50 | p90 | p99 | max | errors |\n|---|---:|---:|---:|---:|---:|"
        );
        for (name, s) in [
            ("cached lookup", &i.cached_lookup),
            ("buy (invalidates)", &i.buy),
            ("first lookup after the buy", &i.lookup_after_buy),
        ] {
            let _ = writeln!(
                m,
                "| {name} | {} | {} | {} | {} | {} |",
                fmt_us(s.p50_us),
                fmt_us(s.p90_us),
                fmt_us(s.p99_us),
                fmt_us(s.max_us),
                s.errors()
            );
        }
        let _ = writeln!(
            m,
            "\n- the miss after a buy costs {:.1}× a cached lookup (p50)",
            i.lookup_after_buy.p50_us as f64 / i.cached_lookup.p50_us.max(1) as f64
        );
        if let Some(n) = i.misses_counted {
            let _ = writeln!(
                m,
                "- cache misses the frontend counted: {n} (rounds: {})",
                i.rounds
            );
        }
        if let (Some(on), Some(off)) = (i.buy_p50_cache_on_us, i.buy_p50_cache_off_us) {
            let _ = writeln!(
                m,
                "- buy p50 at 1 connection: {} with the cache (invalidation on the path), {} without ({:+.0} µs)",
                fmt_us(on),
                fmt_us(off),
                on as f64 - off as f64
            );
        }
        if let (Some(on), Some(off)) = (
            i.buys_per_second_cache_on_32,
            i.buys_per_second_cache_off_32,
        ) {
            let _ = writeln!(
                m,
                "- buys at 32 connections: {on:.0}/s with the cache, {off:.0}/s without ({:+.1}%)",
                100.0 * (on / off.max(1e-9) - 1.0)
            );
        }
        m.push('\n');
    }

    if let Some(f) = &r.failover {
        let _ = writeln!(m, "## Q3: failover under load\n");
        let _ = writeln!(
            m,
            "Buys due at {:.0}/s and lookups at {:.0}/s (open loop) for {:.0} s while, one at a time, a node is \
             SIGKILLed and restarted. Latency counts from when each request was due.\n",
            f.buy_rate, f.lookup_rate, f.seconds
        );
        let _ = writeln!(m, "![failover](failover.svg)\n");
        let _ = writeln!(
            m,
            "| killed | node | buys | failed buys | lookups | failed lookups | longest without a buy | detected after | back in service after restart | primary after the kill | primary after the restart |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        let ms = |x: Option<f64>| {
            x.map(|v| format!("{v:.0} ms"))
                .unwrap_or_else(|| "—".into())
        };
        for x in &f.faults {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {:.0} ms | {} | {} | {} | {} |",
                x.kind,
                x.node,
                x.buys,
                x.buy_errors,
                x.lookups,
                x.lookup_errors,
                x.longest_buy_gap_ms,
                ms(x.detection_ms),
                ms(x.resync_ms),
                x.primary_after_kill.as_deref().unwrap_or("none"),
                x.primary_after_restart.as_deref().unwrap_or("none")
            );
        }
        let _ = writeln!(
            m,
            "\nDetected: order replica — the frontend marks it down; catalog backup — the primary drops it from its \
             view; catalog primary — another replica serves as primary. Back in service: the frontend marks the \
             order replica up; a catalog replica is in the primary's view (in sync). Polled every 25 ms.\n"
        );
        let _ = writeln!(m, "Events:\n");
        for e in &f.events {
            let _ = writeln!(m, "- {:.2} s: {} {}", e.at_ms / 1e3, e.what, e.node);
        }
        m.push('\n');
    }

    let _ = writeln!(m, "## Memory after the run\n");
    let _ = writeln!(
        m,
        "Read 12 s after the last load (nodes hand freed memory back every 10 s). \
         The processes run one binary, and share its mapped pages: a resident size (RSS) counts them in every \
         process, a proportional set size (PSS) divides each shared page among its sharers, so the PSS sum is the \
         memory the store takes. Anonymous memory is each process's own heap and stacks.\n"
    );
    let _ = writeln!(m, "| node | RSS | PSS | anonymous |\n|---|---:|---:|---:|");
    let mb = |b: Option<u64>| b.map(fmt_mb).unwrap_or_else(|| "—".into());
    for n in &r.memory {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} |",
            n.node,
            mb(n.rss_bytes),
            mb(n.pss_bytes),
            mb(n.anonymous_bytes)
        );
    }
    let _ = writeln!(
        m,
        "| **total** | **{}** | **{}** | **{}** |\n",
        fmt_mb(r.memory_total_bytes),
        mb(r.memory_unique_bytes),
        mb(r.memory
            .iter()
            .map(|n| n.anonymous_bytes)
            .sum::<Option<u64>>())
    );

    m.push_str(PROFILE);
    m.push('\n');

    if let Some(s) = &r.soak {
        let _ = writeln!(m, "## Soak\n");
        let _ = writeln!(
            m,
            "{:.0} s of mixed lookups, searches and buys (2 000/s due) beside hostile requests (200/s: made-up topics \
             and books, ids that are not ids, unknown routes and methods), nothing scraping metrics but this \
             sampler: {} legitimate requests, {} failed; {} hostile, {} of them answered with a 5xx or not at all. A \
             catalog replica keeps only the answers still inside their window (what its snapshot holds), so \
             their number levels off once the first window has passed.\n\n\
             ![soak](soak.svg)\n",
            s.seconds, s.requests, s.errors, s.hostile_requests, s.hostile_failed
        );
    }
    m
}

/// Lines of the latency plots: operation, cache, colour (cache off dashed).
const SERIES: [(&str, bool, RGBColor); 7] = [
    ("floor", true, BLACK),
    ("lookup", true, RGBColor(0, 150, 60)),
    ("lookup", false, RGBColor(0, 150, 60)),
    ("search", true, RGBColor(30, 90, 220)),
    ("search", false, RGBColor(30, 90, 220)),
    ("buy", true, RGBColor(180, 30, 160)),
    ("buy", false, RGBColor(180, 30, 160)),
];

/// Requests per second (or p50 latency) against connections, one line per
/// operation and cache setting; log scale.
fn latency_plot(path: &Path, rows: &[LatencyRow], throughput: bool) -> PlotResult {
    let levels: Vec<usize> = {
        let mut l: Vec<usize> = rows
            .iter()
            .filter(|r| r.shape == "closed")
            .map(|r| r.connections)
            .collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    let value = |r: &LatencyRow| {
        if throughput {
            r.stats.per_second.max(1.0)
        } else {
            (r.stats.p50_us as f64 / 1e3).max(0.001)
        }
    };
    let closed: Vec<&LatencyRow> = rows.iter().filter(|r| r.shape == "closed").collect();
    let max = closed.iter().map(|r| value(r)).fold(1.0, f64::max) * 2.0;
    let min = closed
        .iter()
        .map(|r| value(r))
        .fold(f64::MAX, f64::min)
        .min(max)
        / 2.0;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = if throughput {
        "Throughput by connections (closed loop)"
    } else {
        "p50 latency by connections (closed loop)"
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.3f64..(levels.len() as f64 - 0.7), (min..max).log_scale())?;
    let labels = levels.clone();
    chart
        .configure_mesh()
        .x_labels(levels.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels
                    .get(i as usize)
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("connections")
        .y_desc(if throughput {
            "requests / s"
        } else {
            "p50, ms"
        })
        .draw()?;
    for (op, cache, color) in SERIES.iter() {
        let points: Vec<(f64, f64)> = closed
            .iter()
            .filter(|r| r.op == *op && (r.cache == *cache || *op == "floor"))
            .filter_map(|r| {
                levels
                    .iter()
                    .position(|l| *l == r.connections)
                    .map(|x| (x as f64, value(r)))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let style = ShapeStyle::from(color).stroke_width(2);
        let name = if *op == "floor" {
            "floor (/healthcheck)".to_string()
        } else {
            format!("{op}, cache {}", if *cache { "on" } else { "off (dashed)" })
        };
        let drawn = if *cache {
            chart.draw_series(LineSeries::new(points.clone(), style))?
        } else {
            chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))?
        };
        drawn
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, style.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn invalidation_plot(path: &Path, i: &super::InvalidationResults) -> PlotResult {
    let bars = [
        ("cached lookup", &i.cached_lookup),
        ("buy", &i.buy),
        ("lookup after buy", &i.lookup_after_buy),
    ];
    let max = bars
        .iter()
        .map(|(_, s)| s.p99_us as f64 / 1e3)
        .fold(0.01, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (700, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Invalidation: p50 (dark) and p99 (light)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..3f64, 0f64..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(7)
        .x_label_formatter(&|x| {
            let k = x - x.floor();
            if (k - 0.5).abs() < 0.01 {
                bars.get(x.floor() as usize)
                    .map(|b| b.0.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ms")
        .draw()?;
    for (k, (_, s)) in bars.iter().enumerate() {
        let x = k as f64;
        let p50 = s.p50_us as f64 / 1e3;
        let p99 = s.p99_us as f64 / 1e3;
        chart.draw_series([
            Rectangle::new([(x + 0.15, 0.0), (x + 0.5, p50)], BLUE.filled()),
            Rectangle::new([(x + 0.5, 0.0), (x + 0.85, p99)], BLUE.mix(0.35).filled()),
        ])?;
    }
    root.present()?;
    Ok(())
}

fn failover_plot(path: &Path, f: &super::FailoverResults) -> PlotResult {
    let end = f.seconds.max(0.1);
    let max_ms = f
        .timeline
        .iter()
        .map(|b| b.buy_max_ms.max(b.lookup_max_ms))
        .fold(1.0, f64::max)
        * 2.0;
    let root = SVGBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency over time: kills (red) and restarts (green); failed requests as red crosses",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..end, (0.05f64..max_ms).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("latency per 100 ms, ms")
        .draw()?;
    let at = |b: &super::failover::Bucket| b.at_ms / 1e3 + 0.05;
    let lines = [
        ("buy, max", RED.mix(0.6), true, true),
        ("buy, p50", BLUE.to_rgba(), true, false),
        ("lookup, max", MAGENTA.mix(0.5), false, true),
        ("lookup, p50", GREEN.mix(0.8), false, false),
    ];
    for (name, color, buy, max) in lines {
        let pts: Vec<(f64, f64)> = f
            .timeline
            .iter()
            .filter(|b| {
                if buy {
                    b.buys_ok + b.buys_failed > 0
                } else {
                    b.lookups_ok + b.lookups_failed > 0
                }
            })
            .map(|b| {
                let v = match (buy, max) {
                    (true, true) => b.buy_max_ms,
                    (true, false) => b.buy_p50_ms,
                    (false, true) => b.lookup_max_ms,
                    (false, false) => b.lookup_p50_ms,
                };
                (at(b), v.max(0.05))
            })
            .collect();
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(pts, style))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart.draw_series(
        f.timeline
            .iter()
            .filter(|b| b.buys_failed + b.lookups_failed > 0)
            .map(|b| Cross::new((at(b), max_ms / 1.5), 6, RED.stroke_width(2))),
    )?;
    for e in &f.events {
        let x = e.at_ms / 1e3;
        let color = if e.what == "kill" { RED } else { GREEN };
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, 0.05), (x, max_ms)],
            color.stroke_width(1),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{} {}", e.what, e.node),
            (
                x + 0.05,
                if e.what == "kill" {
                    max_ms / 3.0
                } else {
                    max_ms / 6.0
                },
            ),
            ("sans-serif", 13).into_font().color(&color),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn soak_plot(path: &Path, s: &super::SoakResults) -> PlotResult {
    let end = s.samples.last().map(|p| p.at_s).unwrap_or(1.0).max(1.0);
    let root = SVGBackend::new(path, (900, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&super::SoakSample) -> f64>);
    let series: [Series; 3] = [
        (
            "Memory of the whole store (PSS summed)",
            "MB",
            Box::new(|p| p.memory_bytes as f64 / 1048576.0),
        ),
        (
            "Open file descriptors (all nodes)",
            "fds",
            Box::new(|p| p.open_fds as f64),
        ),
        (
            "Answers a catalog replica keeps (what its snapshot holds)",
            "answers",
            Box::new(|p| p.answers_kept as f64),
        ),
    ];
    for (panel, (title, unit, value)) in panels.iter().zip(series.iter()) {
        let max = s.samples.iter().map(value).fold(1.0, f64::max) * 1.25;
        let mut chart = ChartBuilder::on(panel)
            .caption(*title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..end, 0f64..max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(*unit)
            .draw()?;
        chart.draw_series(LineSeries::new(
            s.samples.iter().map(|p| (p.at_s, value(p))),
            BLUE.stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::anchors::{AnchorRow, Anchors, ETCD, NGINX};

    fn stats(per_second: f64, p50_us: u64) -> crate::bench::Stats {
        let mut h = crate::bench::load::histogram();
        h.record(p50_us).unwrap();
        let mut s = crate::bench::Stats::of_histogram(&h, 0);
        s.per_second = per_second;
        s
    }

    fn target(what: &str) -> TargetCheck {
        TargetCheck {
            what: what.into(),
            target: String::new(),
            measured: String::new(),
            met: None,
            anchor: None,
        }
    }

    #[test]
    fn each_anchored_target_shows_its_anchor_and_the_run_as_a_multiple_of_it() {
        let mut out = vec![
            target(CACHED_TARGET),
            target(BUY_P50_TARGET),
            target(BUYS_TARGET),
            target("memory"),
        ];
        let row = |anchor: &str, connections, stats| AnchorRow {
            anchor: anchor.into(),
            connections,
            stats,
        };
        let a = Anchors {
            store_stopped: true,
            versions: Vec::new(),
            rows: vec![
                row(NGINX, 64, stats(50_000.0, 1_000)),
                row(ETCD, 1, stats(700.0, 1_400)),
            ],
            skipped: Vec::new(),
        };
        anchor_targets(&mut out, &a, Some(40_000.0), Some(2_800), Some(3_000.0));
        assert_eq!(
            out[0].anchor.as_deref(),
            Some("nginx: 50000 req/s; this run 0.80 × it")
        );
        let buy = out[1].anchor.as_deref().unwrap();
        assert!(buy.starts_with("etcd put, 1 connection: p50 1.4"), "{buy}");
        assert!(buy.ends_with("; this run 2.00 × it"), "{buy}");
        // No etcd cell at 32 connections: said, not made up.
        assert_eq!(out[2].anchor.as_deref(), Some("not measured"));
        // A target without an anchor gets no column entry.
        assert_eq!(out[3].anchor, None);
    }
}
