//! `pygmy bench`: the original's three experiments in one command.
//!
//! * **latency** (Q1) — search, lookup and buy, cache on and off,
//!   sequential and at 1…128 connections, closed and open loop, every
//!   figure next to a trivial endpoint on the same HTTP stack (the floor);
//! * **invalidation** (Q2) — what invalidation costs a buy, and the miss
//!   that follows a buy compared with a cached lookup;
//! * **failover** (Q3) — steady buys and lookups while an order replica, a
//!   catalog backup and the catalog primary are killed (SIGKILL) and
//!   restarted in turn.
//!
//! It runs against a store it starts itself (seven processes on free
//! loopback ports) or a running one (`--target`), and writes `report.md`,
//! SVG plots and `results.json` into `--out`. The speed targets are figures
//! of the report, never assertions of a test.

mod anchors;
mod failover;
mod load;
mod machine;
mod report;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use anchors::Anchors;
pub use failover::FailoverResults;
pub use load::Stats;
use load::{Pick, Req};
pub use machine::MachineCheck;
pub use store::Store;

use crate::config::ClusterConfig;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// All three, one after the other.
    All,
    Latency,
    Invalidation,
    Failover,
    /// Only the soak (`--soak`, default 600 s): steady mixed and hostile
    /// load with memory, open descriptors and the answers kept over time.
    Soak,
}

/// How long `pygmy bench soak` runs without `--soak`.
pub const DEFAULT_SOAK: Duration = Duration::from_secs(600);

pub struct Options {
    pub scenario: Scenario,
    pub out: PathBuf,
    /// A running store's cluster file (loaded as the operator); `None`
    /// starts one.
    pub target: Option<(PathBuf, ClusterConfig)>,
    /// Short runs (for tests): every figure, less time each.
    pub quick: bool,
    /// After the scenarios, this much steady load with resident memory
    /// sampled (plotted over time).
    pub soak: Option<Duration>,
    /// Also measure the targets' anchors (nginx serving a static file, a
    /// three-member etcd's put) on this machine, once the store stopped.
    pub anchors: bool,
    /// The command line, written into the report.
    pub command: String,
}

/// Everything a run measured (`results.json`).
#[derive(Debug, Serialize)]
pub struct Results {
    pub command: String,
    pub started_unix: u64,
    pub seconds: f64,
    pub quick: bool,
    pub cpus: usize,
    /// The machine's own fsync and wake-up latencies, measured before the
    /// store was started (`None`, with the reason in `skipped`, when they
    /// could not be).
    pub machine: Option<MachineCheck>,
    /// `started by the bench`, or the target's cluster file.
    pub store: String,
    pub latency: Option<LatencyResults>,
    pub invalidation: Option<InvalidationResults>,
    pub failover: Option<FailoverResults>,
    /// Why a scenario did not run.
    pub skipped: Vec<String>,
    /// Memory of every node after the run, bytes.
    pub memory: Vec<NodeMemory>,
    /// Sum of the nodes' resident sizes: counts the pages of the binary
    /// they share once per process.
    pub memory_total_bytes: u64,
    /// Sum of the nodes' proportional set sizes: each shared page once.
    pub memory_unique_bytes: Option<u64>,
    pub soak: Option<SoakResults>,
    /// The targets' anchors measured in this run (`--anchors`).
    pub anchors: Option<Anchors>,
    pub targets: Vec<TargetCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeMemory {
    pub node: String,
    pub rss_bytes: Option<u64>,
    /// Proportional set size: shared pages divided among their sharers.
    pub pss_bytes: Option<u64>,
    /// Heap and stacks: what no other process shares.
    pub anonymous_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// The answers a catalog replica keeps: with the books, what a
    /// snapshot of it holds (bytes are built only for a replica that lags).
    pub answers_kept: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResults {
    pub cell_seconds: f64,
    pub rows: Vec<LatencyRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    /// `floor`, `search`, `lookup` or `buy`.
    pub op: String,
    /// Whether the frontend cached (the floor does not use it).
    pub cache: bool,
    /// `sequential` (a new connection per request), `closed` or `open`.
    pub shape: String,
    pub connections: usize,
    #[serde(flatten)]
    pub stats: Stats,
    /// Throughput over the floor's at the same shape and connections.
    pub throughput_vs_floor: Option<f64>,
    /// p50 latency over the floor's.
    pub p50_vs_floor: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InvalidationResults {
    pub rounds: usize,
    /// A lookup the cache answers.
    pub cached_lookup: Stats,
    /// The buy that invalidates the book.
    pub buy: Stats,
    /// The first lookup after that buy.
    pub lookup_after_buy: Stats,
    /// Cache misses the frontend counted during the rounds (one per round
    /// when every buy invalidated its book, and nothing else missed).
    pub misses_counted: Option<u64>,
    /// Buys with the cache on (invalidation on the path) and off, from the
    /// latency scenario, when both ran.
    pub buy_p50_cache_on_us: Option<u64>,
    pub buy_p50_cache_off_us: Option<u64>,
    pub buys_per_second_cache_on_32: Option<f64>,
    pub buys_per_second_cache_off_32: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakResults {
    pub seconds: f64,
    /// The nodes sampled, in the order of each sample's `node_memory_bytes`.
    pub nodes: Vec<String>,
    pub samples: Vec<SoakSample>,
    /// Legitimate requests (lookups, searches, buys), and those that failed.
    pub requests: u64,
    pub errors: u64,
    /// Hostile requests (made-up topics and books, bad ids, unknown routes
    /// and methods), and those answered with a 5xx or not at all (each
    /// should get a 4xx, or 200 with nothing for a made-up topic).
    pub hostile_requests: u64,
    pub hostile_failed: u64,
}

/// The whole store at one moment of a soak.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSample {
    pub at_s: f64,
    /// Sum of proportional set sizes (resident sizes where unknown).
    pub memory_bytes: u64,
    pub open_fds: u64,
    /// The most answers a catalog replica keeps.
    pub answers_kept: u64,
    /// Each node's memory (PSS, else RSS), in the order of `SoakResults::nodes`.
    pub node_memory_bytes: Vec<u64>,
}

/// One speed target and where the run stands.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
    /// What the target's anchor did in this run (`--anchors`), and the
    /// run's figure against it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
}

/// How long after the last load the store's memory is read: longer than
/// the nodes' trim period.
const MEMORY_SETTLE: Duration = Duration::from_secs(12);

/// The latency scenario's connection counts (0: sequential).
const LEVELS: [usize; 6] = [0, 1, 8, 32, 64, 128];

pub async fn run(mut opts: Options) -> anyhow::Result<Results> {
    if opts.scenario == Scenario::Soak && opts.soak.is_none() {
        opts.soak = Some(DEFAULT_SOAK);
    }
    crate::tls::default_provider();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let began = std::time::Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cell = if opts.quick {
        Duration::from_millis(250)
    } else {
        Duration::from_millis(1500)
    };
    let runs = |s: Scenario| opts.scenario == Scenario::All || opts.scenario == s;
    let progress = ProgressBar::new(
        u64::from(runs(Scenario::Latency)) * (LEVELS.len() as u64 * 8 + 3)
            + u64::from(runs(Scenario::Invalidation))
            + u64::from(runs(Scenario::Failover)) * 7
            + u64::from(opts.soak.is_some())
            + u64::from(opts.anchors),
    );
    progress.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let scratch = std::env::temp_dir().join(format!("pygmy-bench-{}", std::process::id()));
    // Where the store keeps its data: the bench's scratch directory, or for
    // a running store (whose disk the bench cannot see) the report's.
    progress.set_message("measuring the machine");
    let disk = if opts.target.is_some() {
        opts.out.clone()
    } else {
        scratch.clone()
    };
    let mut skipped = Vec::new();
    let measured = tokio::task::spawn_blocking(move || machine::measure(&disk))
        .await
        .map_err(std::io::Error::other)
        .and_then(|m| m);
    let machine = match measured {
        Ok(m) => Some(m),
        Err(e) => {
            skipped.push(format!("the machine's fsync and wake-up latencies: {e}"));
            None
        }
    };
    progress.set_message("starting the store");
    let (mut store, store_name) = match &opts.target {
        Some((path, cfg)) => (Store::target(cfg.clone()), path.display().to_string()),
        None => (
            Store::start(&scratch).await?,
            "started by the bench (7 processes on loopback)".to_string(),
        ),
    };
    let outcome = scenarios(&opts, &mut store, &progress, cell, runs).await;
    if outcome.is_ok() && !opts.quick {
        // Memory once the load is over: nodes hand freed memory back to the
        // system every 10 s (`trim_memory_every`).
        progress.set_message("memory, after the load");
        tokio::time::sleep(MEMORY_SETTLE).await;
    }
    let memory = store.memory().await;
    let failed = outcome.is_err();
    if failed && let Some(dir) = store.dir() {
        eprintln!(
            "pygmy bench: the store's logs are kept in {}",
            dir.display()
        );
    }
    store.stop(failed).await;
    let (latency, invalidation, failover, soak, not_run) = outcome?;
    skipped.extend(not_run);
    let anchors = if opts.anchors {
        // With the store stopped, the machine is the anchors' alone (a
        // target's store is still there, idle).
        progress.set_message("anchors: nginx and etcd on this machine");
        let stopped = opts.target.is_none();
        let a = anchors::measure(&scratch.join("anchors"), anchor_file(), cell, stopped).await;
        progress.inc(1);
        Some(a)
    } else {
        None
    };
    progress.finish_and_clear();
    let memory_total_bytes = memory.iter().filter_map(|m| m.rss_bytes).sum();
    let memory_unique_bytes = memory.iter().map(|m| m.pss_bytes).sum::<Option<u64>>();
    let mut results = Results {
        command: opts.command.clone(),
        started_unix,
        seconds: began.elapsed().as_secs_f64(),
        quick: opts.quick,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        machine,
        store: store_name,
        latency,
        invalidation,
        failover,
        skipped,
        memory,
        memory_total_bytes,
        memory_unique_bytes,
        soak,
        anchors,
        targets: Vec::new(),
    };
    results.targets = report::targets(&results);
    report::write(&opts.out, &results)?;
    Ok(results)
}

type Outcome = (
    Option<LatencyResults>,
    Option<InvalidationResults>,
    Option<FailoverResults>,
    Option<SoakResults>,
    Vec<String>,
);

async fn scenarios(
    opts: &Options,
    store: &mut Store,
    progress: &ProgressBar,
    cell: Duration,
    runs: impl Fn(Scenario) -> bool,
) -> anyhow::Result<Outcome> {
    let (books, topics) = store.books_and_topics().await?;
    let mut skipped = Vec::new();
    let addr = store.frontend_addr().await?;
    let mut latency = None;
    if runs(Scenario::Latency) {
        latency = Some(
            latency_scenario(store, addr, &books, &topics, cell, progress, &mut skipped).await?,
        );
    }
    let mut invalidation = None;
    if runs(Scenario::Invalidation) {
        progress.set_message("invalidation: buy, then look up");
        if store.owns_processes() {
            store.set_cache(true).await?;
        }
        if store.cache_on().await {
            let rounds = if opts.quick { 40 } else { 400 };
            let mut inv = invalidation_scenario(store, addr, &books, rounds).await?;
            if let Some(l) = &latency {
                let find = |cache: bool, conns: usize| {
                    l.rows.iter().find(|r| {
                        r.op == "buy"
                            && r.cache == cache
                            && r.shape == "closed"
                            && r.connections == conns
                    })
                };
                inv.buy_p50_cache_on_us = find(true, 1).map(|r| r.stats.p50_us);
                inv.buy_p50_cache_off_us = find(false, 1).map(|r| r.stats.p50_us);
                inv.buys_per_second_cache_on_32 = find(true, 32).map(|r| r.stats.per_second);
                inv.buys_per_second_cache_off_32 = find(false, 32).map(|r| r.stats.per_second);
            }
            invalidation = Some(inv);
        } else {
            skipped.push("invalidation: the target's frontend does not cache".into());
        }
        progress.inc(1);
    }
    let mut fail = None;
    if runs(Scenario::Failover) {
        if store.owns_processes() {
            fail = Some(failover::run(store, addr, &books, opts.quick, progress).await?);
        } else {
            skipped.push(
                "failover: it kills and restarts processes, so it runs on a store the bench starts (no --target)"
                    .into(),
            );
            progress.inc(7);
        }
    }
    let mut soak = None;
    if let Some(length) = opts.soak {
        progress.set_message(format!("soak: {} s of steady load", length.as_secs()));
        soak = Some(soak_scenario(store, addr, &books, &topics, length).await?);
        progress.inc(1);
    }
    Ok((latency, invalidation, fail, soak, skipped))
}

/// What nginx serves as the cached lookup's anchor: a lookup's answer, of
/// the first book of the default catalog.
fn anchor_file() -> bytes::Bytes {
    let books = crate::catalog::seed::default_books();
    let version = crate::api::Version {
        epoch: 1,
        seq: 100_000,
    };
    books
        .first()
        .and_then(|b| serde_json::to_vec(&crate::api::LookupResponse::new(b, version)).ok())
        .unwrap_or_default()
        .into()
}

fn pick_floor() -> Pick {
    Arc::new(|_| Req::get("/healthcheck"))
}

fn pick_lookup(books: &[u64]) -> Pick {
    let books = books.to_vec();
    Arc::new(move |i| Req::get(format!("/lookup/{}", books[i as usize % books.len()])))
}

fn pick_search(topics: &[String]) -> Pick {
    let topics = topics.to_vec();
    Arc::new(move |i| Req::get(format!("/search/{}", topics[i as usize % topics.len()])))
}

fn pick_buy(books: &[u64]) -> Pick {
    let books = books.to_vec();
    Arc::new(move |i| Req::post(format!("/buy/{}", books[i as usize % books.len()])))
}

/// Stock set before buying, so no buy of the bench runs out.
const BENCH_STOCK: u64 = 1_000_000_000;

async fn measure(addr: SocketAddr, pick: Pick, conns: usize, cell: Duration) -> Stats {
    if conns == 0 {
        load::sequential(addr, pick, cell).await
    } else {
        load::closed(addr, pick, conns, cell).await
    }
}

#[allow(clippy::too_many_arguments)]
async fn latency_scenario(
    store: &mut Store,
    addr: SocketAddr,
    books: &[u64],
    topics: &[String],
    cell: Duration,
    progress: &ProgressBar,
    skipped: &mut Vec<String>,
) -> anyhow::Result<LatencyResults> {
    store.restock(books, BENCH_STOCK).await?;
    let mut rows: Vec<LatencyRow> = Vec::new();
    let ops: [(&str, Pick); 3] = [
        ("search", pick_search(topics)),
        ("lookup", pick_lookup(books)),
        ("buy", pick_buy(books)),
    ];
    // The floor first (it does not touch the cache), and again at the end.
    for &conns in &LEVELS {
        progress.set_message(format!("latency: floor, {}", shape_name(conns)));
        let stats = measure(addr, pick_floor(), conns, cell).await;
        rows.push(row("floor", true, conns, stats));
        progress.inc(1);
    }
    let modes: Vec<bool> = if store.owns_processes() {
        vec![true, false]
    } else {
        let on = store.cache_on().await;
        skipped.push(format!(
            "latency with the cache {}: the bench cannot restart a running store's frontend",
            if on { "off" } else { "on" }
        ));
        vec![on]
    };
    for cache in modes {
        if store.owns_processes() {
            progress.set_message(format!("restarting the frontend, cache {}", on_off(cache)));
            store.set_cache(cache).await?;
        }
        for (op, pick) in &ops {
            for &conns in &LEVELS {
                progress.set_message(format!(
                    "latency: {op}, cache {}, {}",
                    on_off(cache),
                    shape_name(conns)
                ));
                let stats = measure(addr, pick.clone(), conns, cell).await;
                rows.push(row(op, cache, conns, stats));
                progress.inc(1);
            }
        }
        if !cache {
            continue;
        }
        // Open loop, cache on: each operation at 70% of what 32 closed-loop
        // connections reached, over 64 connections.
        for (op, pick) in &ops {
            progress.set_message(format!("latency: {op}, open loop"));
            let closed = rows
                .iter()
                .find(|r| r.op == *op && r.cache && r.shape == "closed" && r.connections == 32)
                .map(|r| r.stats.per_second)
                .unwrap_or(100.0);
            let stats = load::open(addr, pick.clone(), closed * 0.7, 64, cell * 2).await;
            let mut r = row(op, cache, 64, stats);
            r.shape = "open".into();
            rows.push(r);
            progress.inc(1);
        }
    }
    // The floor again: a cell measured while the machine was slow would
    // flatter every ratio to it, so each keeps the faster of its two runs
    // (ratios can only come out lower for it).
    for &conns in &LEVELS {
        progress.set_message(format!("latency: floor again, {}", shape_name(conns)));
        let again = row(
            "floor",
            true,
            conns,
            measure(addr, pick_floor(), conns, cell).await,
        );
        if let Some(first) = rows.iter_mut().find(|r| {
            r.op == "floor" && r.shape == again.shape && r.connections == again.connections
        }) && again.stats.per_second > first.stats.per_second
        {
            *first = again;
        }
        progress.inc(1);
    }
    // Ratios to the floor at the same shape and connections.
    let floor: Vec<LatencyRow> = rows.iter().filter(|r| r.op == "floor").cloned().collect();
    for r in rows.iter_mut().filter(|r| r.op != "floor") {
        let f = floor
            .iter()
            .find(|f| f.connections == r.connections && (f.shape == r.shape || r.shape == "open"));
        if let Some(f) = f {
            if r.shape != "open" {
                r.throughput_vs_floor = Some(r.stats.per_second / f.stats.per_second.max(1e-9));
            }
            r.p50_vs_floor = Some(r.stats.p50_us as f64 / f.stats.p50_us.max(1) as f64);
        }
    }
    Ok(LatencyResults {
        cell_seconds: cell.as_secs_f64(),
        rows,
    })
}

fn row(op: &str, cache: bool, conns: usize, stats: Stats) -> LatencyRow {
    LatencyRow {
        op: op.into(),
        cache,
        shape: if conns == 0 { "sequential" } else { "closed" }.into(),
        connections: conns.max(1),
        stats,
        throughput_vs_floor: None,
        p50_vs_floor: None,
    }
}

fn shape_name(conns: usize) -> String {
    if conns == 0 {
        "sequential".into()
    } else {
        format!("{conns} connections")
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// Rounds of: a cached lookup, a buy of that book, the lookup right after.
async fn invalidation_scenario(
    store: &Store,
    addr: SocketAddr,
    books: &[u64],
    rounds: usize,
) -> anyhow::Result<InvalidationResults> {
    store.restock(books, BENCH_STOCK).await?;
    let book = books[0];
    let lookup: Pick = Arc::new(move |_| Req::get(format!("/lookup/{book}")));
    let buy: Pick = Arc::new(move |_| Req::post(format!("/buy/{book}")));
    // Warm: the cache holds a lease and the book.
    load::closed(addr, lookup.clone(), 1, Duration::from_millis(100)).await;
    let misses = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v["misses"].as_u64());
    let before = misses(&store.cache_stats().await);
    let mut hit = load::histogram();
    let mut bought = load::histogram();
    let mut after = load::histogram();
    let mut tallies = [(0u64, 0u64); 3];
    let mut conn = load::Timed::new(addr);
    for _ in 0..rounds {
        for (i, (h, pick)) in [
            (&mut hit, &lookup),
            (&mut bought, &buy),
            (&mut after, &lookup),
        ]
        .into_iter()
        .enumerate()
        {
            let (us, ok) = conn.once(&pick(0)).await;
            h.saturating_record(us);
            tallies[i].0 += 1;
            tallies[i].1 += u64::from(!ok);
        }
    }
    let after_stats = misses(&store.cache_stats().await);
    let stats =
        |h: &hdrhistogram::Histogram<u64>, (_, bad): (u64, u64)| load::Stats::of_histogram(h, bad);
    Ok(InvalidationResults {
        rounds,
        cached_lookup: stats(&hit, tallies[0]),
        buy: stats(&bought, tallies[1]),
        lookup_after_buy: stats(&after, tallies[2]),
        misses_counted: before.zip(after_stats).map(|(b, a)| a.saturating_sub(b)),
        buy_p50_cache_on_us: None,
        buy_p50_cache_off_us: None,
        buys_per_second_cache_on_32: None,
        buys_per_second_cache_off_32: None,
    })
}

/// Steady lookups and buys for `length`, resident memory sampled.
async fn soak_scenario(
    store: &Store,
    addr: SocketAddr,
    books: &[u64],
    topics: &[String],
    length: Duration,
) -> anyhow::Result<SoakResults> {
    store.restock(books, BENCH_STOCK).await?;
    let t0 = tokio::time::Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let books_v = books.to_vec();
    let topics_v = topics.to_vec();
    let mixed: Pick = Arc::new(move |i| match i % 10 {
        0 => Req::post(format!(
            "/buy/{}",
            books_v[(i / 10) as usize % books_v.len()]
        )),
        1..=3 => Req::get(format!("/search/{}", topics_v[i as usize % topics_v.len()])),
        _ => Req::get(format!("/lookup/{}", books_v[i as usize % books_v.len()])),
    });
    let load = tokio::spawn(load::timeline(addr, mixed, 2_000.0, 32, t0, stop.clone()));
    let hostile = tokio::spawn(load::timeline(
        addr,
        pick_hostile(),
        200.0,
        8,
        t0,
        stop.clone(),
    ));
    let mut samples = Vec::new();
    let every = (length / 60).max(Duration::from_millis(500));
    let sample = |m: Vec<NodeMemory>| SoakSample {
        at_s: t0.elapsed().as_secs_f64(),
        memory_bytes: m.iter().filter_map(|n| n.pss_bytes.or(n.rss_bytes)).sum(),
        open_fds: m.iter().filter_map(|n| n.open_fds).sum(),
        answers_kept: m.iter().filter_map(|n| n.answers_kept).max().unwrap_or(0),
        node_memory_bytes: m
            .iter()
            .map(|n| n.pss_bytes.or(n.rss_bytes).unwrap_or(0))
            .collect(),
    };
    let nodes = store.memory().await.into_iter().map(|n| n.node).collect();
    while t0.elapsed() < length {
        samples.push(sample(store.memory().await));
        tokio::time::sleep(every).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let legit = load.await.unwrap_or_default();
    let hostile = hostile.await.unwrap_or_default();
    samples.push(sample(store.memory().await));
    Ok(SoakResults {
        seconds: t0.elapsed().as_secs_f64(),
        nodes,
        samples,
        requests: legit.len() as u64,
        errors: legit.iter().filter(|s| !s.ok).count() as u64,
        hostile_requests: hostile.len() as u64,
        hostile_failed: hostile
            .iter()
            .filter(|s| s.status == 0 || s.status >= 500)
            .count() as u64,
    })
}

/// Requests an outsider might send: made-up topics (each new, to flood
/// the cache), books that do not exist, ids that are not ids, routes and
/// methods that do not exist. Each must get a 4xx (a made-up topic: 200
/// with nothing) and change nothing.
fn pick_hostile() -> Pick {
    Arc::new(|i| match i % 6 {
        0 => Req::get(format!("/search/made-up-topic-{i}")),
        1 => Req::get(format!("/lookup/{}", 1_000_000 + i)),
        2 => Req::post("/buy/0"),
        3 => Req::get(format!("/lookup/not-a-number-{i}")),
        4 => Req::get(format!("/no/such/route/{i}")),
        _ => Req {
            method: hyper::Method::from_bytes(b"FROBNICATE").expect("a valid token"),
            path: "/lookup/1".into(),
            json: None,
        },
    })
}
