//! Prometheus metrics: the recorder, its upkeep, the request counters, the
//! `process_*` figures, and the name of every metric with its help text.
//!
//! * Histograms have buckets ([`BUCKETS`]), so they aggregate across
//!   processes; a background thread runs the exporter's upkeep every
//!   [`UPKEEP_INTERVAL`], so recorded samples are folded into the buckets
//!   even when nothing scrapes `/metrics` (memory stays flat).
//! * Every label comes from a closed set: the matched route template (or
//!   `unmatched`), a known method (or `other`), the status class (`2xx`…),
//!   node and pool names from the cluster file, and fixed outcome names.
//!   No request can add a label value.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::Response;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Request and persist latencies, in seconds: 0.5 ms … 30 s.
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// How often histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

pub const HTTP_REQUESTS: &str = "pygmy_http_requests_total";
pub const HTTP_DURATION: &str = "pygmy_http_request_duration_seconds";
pub const CACHE_HITS: &str = "pygmy_cache_hits_total";
pub const CACHE_MISSES: &str = "pygmy_cache_misses_total";
pub const LOOKUP_BATCHES: &str = "pygmy_lookup_batches_total";
pub const LOOKUPS_BATCHED: &str = "pygmy_lookups_batched_total";
pub const WRITE_BATCHES: &str = "pygmy_write_batches_total";
pub const BUY_BATCHES: &str = "pygmy_buy_batches_total";
pub const BUYS_BATCHED: &str = "pygmy_buys_batched_total";
pub const WRITES_BATCHED: &str = "pygmy_writes_batched_total";
pub const BUYS: &str = "pygmy_buys_total";
pub const POOL_RETRIES: &str = "pygmy_pool_retries_total";
pub const POOL_HEALTHY: &str = "pygmy_pool_replica_healthy";
pub const REPL_ROLE: &str = "pygmy_replication_role";
pub const REPL_EPOCH: &str = "pygmy_replication_epoch";
pub const REPL_COMMIT: &str = "pygmy_replication_commit_version";
pub const REPL_APPLIED: &str = "pygmy_replication_applied_version";
pub const REPL_VIEW: &str = "pygmy_replication_view_size";
pub const REPL_ELECTIONS: &str = "pygmy_replication_elections_total";
pub const REPL_LEASE_REFUSALS: &str = "pygmy_replication_lease_refusals_total";
pub const CATALOG_PERSIST: &str = "pygmy_catalog_persist_duration_seconds";
pub const CATALOG_SNAPSHOT_BYTES: &str = "pygmy_catalog_snapshot_bytes";
pub const CATALOG_SNAPSHOT_ANSWERS: &str = "pygmy_catalog_snapshot_request_ids";
pub const CATALOG_ANSWERS_KEPT: &str = "pygmy_catalog_answers_kept";
pub const OPEN_CONNECTIONS: &str = "pygmy_open_connections";
pub const CONNECTIONS_SHED: &str = "pygmy_connections_shed_total";
pub const RUNTIME_THREADS: &str = "pygmy_runtime_threads";
pub const WORK_RUNNING: &str = "pygmy_work_running";
pub const WRITES_QUEUED: &str = "pygmy_catalog_writes_queued_total";
pub const WRITE_GROUPS: &str = "pygmy_catalog_write_groups_total";
pub const REPL_STREAM_FRAMES: &str = "pygmy_replication_stream_frames_total";

/// Outcomes a buy is counted under at the frontend.
pub const BUY_OUTCOMES: &[&str] = &[
    "bought",
    "out_of_stock",
    "key_reused",
    "not_found",
    "invalid",
    "failed",
];
/// Catalog replica roles (the `role` label of [`REPL_ROLE`]).
pub const ROLES: &[&str] = &["follower", "candidate", "primary", "learner"];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static STARTED: OnceLock<f64> = OnceLock::new();

/// The process's recorder, installed on first use together with its upkeep
/// thread; `None` if another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let _ = STARTED.set(start_time_seconds());
            let handle = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// The `/metrics` page: the recorder's metrics, then the `process_*` ones.
pub fn render() -> Option<String> {
    let mut page = handle()?.render();
    process::render(&mut page, STARTED.get().copied());
    Some(page)
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route template, method and status class"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time to answer an HTTP request, by route template and method"
    );
    describe_counter!(CACHE_HITS, "Frontend reads answered from the cache");
    describe_counter!(
        LOOKUP_BATCHES,
        "Batches of cache-missing lookups the frontend sent to the catalog"
    );
    describe_counter!(
        LOOKUPS_BATCHED,
        "Lookups in those batches (divided by the batches: the mean batch size)"
    );
    describe_counter!(
        BUY_BATCHES,
        "Batches of buys a frontend sent to the order replicas"
    );
    describe_counter!(
        BUYS_BATCHED,
        "Buys in those batches (divided by the batches: the mean batch size)"
    );
    describe_counter!(
        WRITE_BATCHES,
        "Batches of buys an order replica sent to the catalog primary"
    );
    describe_counter!(
        WRITES_BATCHED,
        "Buys in those batches (divided by the batches: the mean batch size)"
    );
    describe_gauge!(OPEN_CONNECTIONS, "HTTP connections open on this node");
    describe_gauge!(
        RUNTIME_THREADS,
        "Threads that run this node's requests (`pygmy serve --threads`)"
    );
    describe_counter!(
        WRITES_QUEUED,
        "Writes a catalog primary held back while earlier ones were in flight, then proposed together"
    );
    describe_counter!(
        WRITE_GROUPS,
        "Groups of held-back writes a catalog primary proposed together (writes queued / groups: the mean group)"
    );
    describe_gauge!(
        WORK_RUNNING,
        "Writes (catalog) and buys (order replica) running in a task of their own, which finishes whether or not its client is still there"
    );
    describe_counter!(
        CONNECTIONS_SHED,
        "Connections closed for lack of room, and requests without the cluster token refused on the reserved connections"
    );
    describe_counter!(
        CACHE_MISSES,
        "Frontend reads that had to ask a catalog replica"
    );
    describe_counter!(BUYS, "Buys answered by the frontend, by outcome");
    describe_counter!(
        POOL_RETRIES,
        "Calls to a replica that failed and were tried again (same or another replica), by pool"
    );
    describe_gauge!(
        CATALOG_SNAPSHOT_ANSWERS,
        "Request ids whose answers the catalog replica's latest snapshot keeps"
    );
    describe_gauge!(
        CATALOG_ANSWERS_KEPT,
        "Request ids whose answers the catalog replica keeps: with the books, what a snapshot of it holds"
    );
    describe_gauge!(
        CATALOG_SNAPSHOT_BYTES,
        "Size of the catalog replica's latest snapshot (taken or installed), bytes"
    );
    describe_gauge!(
        POOL_HEALTHY,
        "1 if the replica answered its last health probe or call, else 0, by pool and replica"
    );
    describe_gauge!(
        REPL_ROLE,
        "1 for this catalog replica's current replication role, 0 for the others"
    );
    describe_gauge!(REPL_EPOCH, "The catalog replica's current epoch (term)");
    describe_gauge!(
        REPL_COMMIT,
        "Sequence number of the newest committed catalog write this replica knows of"
    );
    describe_gauge!(
        REPL_APPLIED,
        "Sequence number of the newest catalog write this replica has applied"
    );
    describe_gauge!(REPL_VIEW, "Replicas in the primary's view (0 on a backup)");
    describe_counter!(REPL_ELECTIONS, "Elections this catalog replica started");
    describe_counter!(
        REPL_STREAM_FRAMES,
        "Batches of replication messages this catalog replica read from its peers' streams"
    );
    describe_counter!(
        REPL_LEASE_REFUSALS,
        "Reads this catalog replica refused for lack of a read lease"
    );
    describe_histogram!(
        CATALOG_PERSIST,
        Unit::Seconds,
        "Time to persist one replication step to disk"
    );
}

/// Creates the metrics a node of `role` exports, at zero, so every series
/// the dashboard names exists from the start.
pub fn register(role: crate::config::Role) {
    use crate::config::Role;
    if handle().is_none() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        metrics::gauge!(RUNTIME_THREADS).set(rt.metrics().num_workers() as f64);
    }
    match role {
        Role::Frontend => {
            metrics::counter!(CACHE_HITS).absolute(0);
            metrics::counter!(CACHE_MISSES).absolute(0);
            metrics::counter!(LOOKUP_BATCHES).absolute(0);
            metrics::counter!(LOOKUPS_BATCHED).absolute(0);
            metrics::counter!(BUY_BATCHES).absolute(0);
            metrics::counter!(BUYS_BATCHED).absolute(0);
            for o in BUY_OUTCOMES {
                metrics::counter!(BUYS, "outcome" => *o).absolute(0);
            }
            metrics::counter!(POOL_RETRIES, "pool" => "catalog").absolute(0);
            metrics::counter!(POOL_RETRIES, "pool" => "order").absolute(0);
        }
        Role::Order => {
            metrics::counter!(WRITE_BATCHES).absolute(0);
            metrics::counter!(WRITES_BATCHED).absolute(0);
            metrics::counter!(POOL_RETRIES, "pool" => "catalog").absolute(0);
        }
        Role::Catalog => {
            metrics::counter!(REPL_ELECTIONS).absolute(0);
            metrics::counter!(REPL_STREAM_FRAMES).absolute(0);
            metrics::counter!(REPL_LEASE_REFUSALS).absolute(0);
            metrics::counter!(WRITES_QUEUED).absolute(0);
            metrics::counter!(WRITE_GROUPS).absolute(0);
        }
    }
}

/// Counts one batch read from a peer's replication stream.
pub fn replication_frame() {
    metrics::counter!(REPL_STREAM_FRAMES).increment(1);
}

/// A catalog primary proposes `n` writes it held back, together.
pub fn write_group(n: usize) {
    metrics::counter!(WRITE_GROUPS).increment(1);
    metrics::counter!(WRITES_QUEUED).increment(n as u64);
}

/// Counts one buy answered with `outcome` (one of [`BUY_OUTCOMES`]).
pub fn buy(outcome: &'static str) {
    metrics::counter!(BUYS, "outcome" => outcome).increment(1);
}

/// The frontend sends one batch of `n` lookups to the catalog.
pub fn lookup_batch(n: usize) {
    metrics::counter!(LOOKUP_BATCHES).increment(1);
    metrics::counter!(LOOKUPS_BATCHED).increment(n as u64);
}

/// A frontend sends one batch of `n` buys to an order replica.
pub fn buy_batch(n: usize) {
    metrics::counter!(BUY_BATCHES).increment(1);
    metrics::counter!(BUYS_BATCHED).increment(n as u64);
}

/// An order replica sends one batch of `n` writes to the catalog primary.
pub fn write_batch(n: usize) {
    metrics::counter!(WRITE_BATCHES).increment(1);
    metrics::counter!(WRITES_BATCHED).increment(n as u64);
}

/// A replica of `pool` failed a call that will be tried again.
pub fn retry(pool: &'static str) {
    metrics::counter!(POOL_RETRIES, "pool" => pool).increment(1);
}

/// The handle of [`POOL_HEALTHY`] for one replica of a pool, to keep and
/// set on every call without looking the series up each time (the
/// recorder is installed first, so the handle is never a no-op's).
pub fn replica_health_gauge(pool: &'static str, replica: &str) -> metrics::Gauge {
    let _ = handle();
    metrics::gauge!(POOL_HEALTHY, "pool" => pool, "replica" => replica.to_owned())
}

/// The catalog replica's replication state.
pub fn replication(st: &crate::replication::Status) {
    let role = match (st.role, st.learner) {
        (_, true) => "learner",
        (crate::replication::Role::Primary, _) => "primary",
        (crate::replication::Role::Candidate, _) => "candidate",
        _ => "follower",
    };
    for r in ROLES {
        metrics::gauge!(REPL_ROLE, "role" => *r).set(if *r == role { 1.0 } else { 0.0 });
    }
    metrics::gauge!(REPL_EPOCH).set(st.epoch as f64);
    metrics::gauge!(REPL_COMMIT).set(st.commit.seq as f64);
    metrics::gauge!(REPL_APPLIED).set(st.applied.seq as f64);
    metrics::gauge!(REPL_VIEW).set(st.view.len() as f64);
}

/// The method as a label: one of the standard methods, else `other`.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The status class as a label: `1xx` … `5xx`.
pub fn status_label(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Counts and times every request under bounded labels: `run` answers it.
pub async fn track<F, Fut>(req: Request, run: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let start = Instant::now();
    // Route templates are the router's own strings: a fixed set.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = method_label(req.method());
    let res = run(req).await;
    let route = route.as_ref().map_or("unmatched", |p| p.as_str());
    let status = status_label(res.status().as_u16());
    let elapsed = start.elapsed().as_secs_f64();
    let record = |h: &mut RouteHandles| {
        h.counter(route, method, status).increment(1);
        h.histogram(route, method).record(elapsed);
    };
    if !matches!(HANDLE.get(), Some(Some(_))) {
        // No recorder of ours (yet): a handle kept now would stay a no-op.
        record(&mut RouteHandles::default());
        return res;
    }
    REQUEST_HANDLES.with_borrow_mut(|h| match h.get_mut(route) {
        Some(h) => record(h),
        None => record(h.entry(route.into()).or_default()),
    });
    res
}

thread_local! {
    /// The request metrics' handles, by route: looking a labelled metric up
    /// in the recorder's registry builds its key and hashes it; a request
    /// only needs the handle. The labels are a closed set (see the module
    /// docs), so these maps stay small.
    static REQUEST_HANDLES: std::cell::RefCell<std::collections::HashMap<Box<str>, RouteHandles>> =
        Default::default();
}

#[derive(Default)]
struct RouteHandles {
    counters: Vec<(&'static str, &'static str, metrics::Counter)>,
    histograms: Vec<(&'static str, metrics::Histogram)>,
}

impl RouteHandles {
    fn counter(
        &mut self,
        route: &str,
        method: &'static str,
        status: &'static str,
    ) -> &metrics::Counter {
        let at = match self
            .counters
            .iter()
            .position(|(m, s, _)| *m == method && *s == status)
        {
            Some(at) => at,
            None => {
                let c = metrics::counter!(HTTP_REQUESTS, "route" => route.to_owned(), "method" => method, "status" => status);
                self.counters.push((method, status, c));
                self.counters.len() - 1
            }
        };
        &self.counters[at].2
    }

    fn histogram(&mut self, route: &str, method: &'static str) -> &metrics::Histogram {
        let at = match self.histograms.iter().position(|(m, _)| *m == method) {
            Some(at) => at,
            None => {
                let h = metrics::histogram!(HTTP_DURATION, "route" => route.to_owned(), "method" => method);
                self.histograms.push((method, h));
                self.histograms.len() - 1
            }
        };
        &self.histograms[at].1
    }
}

fn start_time_seconds() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    process::uptime_seconds().map(|up| now - up).unwrap_or(now)
}

/// `process_*` metrics as the Prometheus client libraries name them, read
/// from `/proc` on Linux (elsewhere only the start time is known).
mod process {
    use std::fmt::Write;

    fn metric(page: &mut String, name: &str, kind: &str, help: &str, value: f64) {
        let _ = write!(
            page,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    }

    pub fn render(page: &mut String, started: Option<f64>) {
        if let Some(s) = started {
            metric(
                page,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                s,
            );
        }
        #[cfg(target_os = "linux")]
        linux::render(page);
    }

    pub fn uptime_seconds() -> Option<f64> {
        #[cfg(target_os = "linux")]
        {
            linux::uptime_seconds()
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }

    #[cfg(target_os = "linux")]
    mod linux {
        use super::metric;

        fn ticks_per_second() -> f64 {
            // SAFETY: sysconf only reads a system constant.
            let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            if t > 0 { t as f64 } else { 100.0 }
        }

        fn page_size() -> f64 {
            // SAFETY: sysconf only reads a system constant.
            let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if p > 0 { p as f64 } else { 4096.0 }
        }

        /// Fields of `/proc/self/stat` after the command name, numbered as
        /// in proc(5) (field 3, the state, is the first).
        fn stat_fields() -> Option<Vec<String>> {
            let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            Some(rest.split_whitespace().map(str::to_owned).collect())
        }

        fn field(fields: &[String], n: usize) -> Option<f64> {
            fields.get(n - 3)?.parse().ok()
        }

        /// `KEY   123 kB` from a `/proc` status-like page.
        fn kilobytes(page: &str, key: &str) -> Option<f64> {
            page.lines()
                .find_map(|l| l.strip_prefix(key))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        }

        pub fn uptime_seconds() -> Option<f64> {
            let fields = stat_fields()?;
            let started_ticks = field(&fields, 22)?;
            let boot_uptime: f64 = std::fs::read_to_string("/proc/uptime")
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(boot_uptime - started_ticks / ticks_per_second())
        }

        pub fn render(page: &mut String) {
            if let Some(fields) = stat_fields() {
                if let (Some(u), Some(s)) = (field(&fields, 14), field(&fields, 15)) {
                    let cpu = (u + s) / ticks_per_second();
                    metric(
                        page,
                        "process_cpu_seconds_total",
                        "counter",
                        "Total user and system CPU time spent in seconds.",
                        cpu,
                    );
                }
                if let Some(v) = field(&fields, 23) {
                    metric(
                        page,
                        "process_virtual_memory_bytes",
                        "gauge",
                        "Virtual memory size in bytes.",
                        v,
                    );
                }
                if let Some(rss) = field(&fields, 24) {
                    metric(
                        page,
                        "process_resident_memory_bytes",
                        "gauge",
                        "Resident memory size in bytes.",
                        rss * page_size(),
                    );
                }
            }
            // Several processes of one binary share its mapped pages: the
            // proportional set size counts each shared page once across
            // them, so summing it over the store's processes is honest
            // (summing resident sizes counts the binary once per process).
            if let Ok(rollup) = std::fs::read_to_string("/proc/self/smaps_rollup") {
                for (key, name, help) in [
                    (
                        "Pss:",
                        "pygmy_process_proportional_memory_bytes",
                        "Proportional set size in bytes: resident memory, each page shared with other processes divided among them.",
                    ),
                    (
                        "Anonymous:",
                        "pygmy_process_anonymous_memory_bytes",
                        "Resident anonymous memory (heap, stacks) in bytes: the part no other process shares.",
                    ),
                ] {
                    if let Some(kb) = kilobytes(&rollup, key) {
                        metric(page, name, "gauge", help, kb * 1024.0);
                    }
                }
            }
            if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
                metric(
                    page,
                    "process_open_fds",
                    "gauge",
                    "Number of open file descriptors.",
                    dir.count() as f64,
                );
            }
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into the struct we own.
            if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
                metric(
                    page,
                    "process_max_fds",
                    "gauge",
                    "Maximum number of open file descriptors.",
                    lim.rlim_cur as f64,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_closed_sets() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(
            method_label(&Method::from_bytes(b"FROBNICATE").unwrap()),
            "other"
        );
        assert_eq!(status_label(404), "4xx");
        assert_eq!(status_label(999), "5xx");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_read_from_proc() {
        let mut page = String::new();
        process::render(&mut page, Some(1.0));
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            "pygmy_process_proportional_memory_bytes",
            "pygmy_process_anonymous_memory_bytes",
        ] {
            let line = page
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing:\n{page}"));
            let v: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
            assert!(
                v > 0.0 || (name == "process_cpu_seconds_total" && v == 0.0),
                "{line}"
            );
        }
        assert!(process::uptime_seconds().unwrap() >= 0.0);
    }
}
