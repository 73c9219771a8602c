//! `pygmy bench --quick`: the three experiments run end to end and their
//! report holds what it promises. The figures are the report's business;
//! these tests check only what must hold at any speed: every cell measured
//! without errors, every buy invalidated its book in the cache, every fault
//! noticed and healed without a client-visible error.

use crate::common;
use std::path::Path;
use std::process::Command;

use crate::common::{Options, TestCluster};
use serde_json::Value;

fn bench(args: &[&str], out: &Path) -> Value {
    let run = Command::new(common::BIN)
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "pygmy bench {args:?} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("pygmy bench: report in"),
        "no closing line:\n{stdout}"
    );
    let json = std::fs::read_to_string(out.join("results.json")).unwrap();
    serde_json::from_str(&json).unwrap()
}

fn svg(out: &Path, name: &str) {
    let page = std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        page.contains("<svg") && page.trim_end().ends_with("</svg>"),
        "{name} is not a whole SVG"
    );
}

fn rows<'a>(r: &'a Value, op: &str, cache: bool) -> Vec<&'a Value> {
    r["latency"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["op"] == op && (op == "floor" || x["cache"] == cache))
        .collect()
}

/// Every cell of Q1 answered, and none with an error.
fn every_cell_measured(r: &Value, caches: &[bool]) {
    for op in ["floor", "search", "lookup", "buy"] {
        for &cache in caches {
            let rows = rows(r, op, cache);
            let shapes: Vec<(String, u64)> = rows
                .iter()
                .filter(|x| x["shape"] != "open")
                .map(|x| {
                    (
                        x["shape"].as_str().unwrap().to_string(),
                        x["connections"].as_u64().unwrap(),
                    )
                })
                .collect();
            for want in [
                ("sequential", 1),
                ("closed", 1),
                ("closed", 8),
                ("closed", 32),
                ("closed", 128),
            ] {
                assert!(
                    shapes.contains(&(want.0.to_string(), want.1)),
                    "{op}, cache {cache}: no {want:?} cell in {shapes:?}"
                );
            }
            for x in &rows {
                assert!(x["requests"].as_u64().unwrap() > 0, "{x}");
                assert_eq!(x["non_2xx"], 0, "{op}: answers other than 2xx: {x}");
                assert_eq!(x["failed"], 0, "{op}: requests without an answer: {x}");
                let (p50, p99, max) = (
                    x["p50_us"].as_u64().unwrap(),
                    x["p99_us"].as_u64().unwrap(),
                    x["max_us"].as_u64().unwrap(),
                );
                assert!(0 < p50 && p50 <= p99 && p99 <= max, "{x}");
                if op != "floor" && x["shape"] != "open" {
                    assert!(x["throughput_vs_floor"].as_f64().unwrap() > 0.0, "{x}");
                }
            }
        }
    }
    // Open loop, coordinated omission counted: cache on only.
    for op in ["search", "lookup", "buy"] {
        let open: Vec<_> = rows(r, op, true)
            .into_iter()
            .filter(|x| x["shape"] == "open")
            .collect();
        assert_eq!(open.len(), 1, "{op}: one open-loop cell");
        assert!(open[0]["offered_per_second"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn the_whole_bench_runs_on_a_store_it_starts_and_reports_every_figure() {
    let out = common::temp_dir("bench");
    let r = bench(&["--quick", "--anchors"], &out);

    every_cell_measured(&r, &[true, false]);

    // Q2: each buy invalidated its book: the lookup after it missed.
    let inv = &r["invalidation"];
    let rounds = inv["rounds"].as_u64().unwrap();
    assert!(rounds > 0);
    assert!(
        inv["misses_counted"].as_u64().unwrap() >= rounds,
        "a lookup after a buy was answered from the cache: {inv}"
    );
    for k in ["cached_lookup", "buy", "lookup_after_buy"] {
        assert_eq!(inv[k]["failed"], 0, "{k}: {inv}");
        assert_eq!(inv[k]["requests"].as_u64().unwrap(), rounds, "{k}");
    }
    assert!(inv["buy_p50_cache_off_us"].as_u64().is_some());

    // Q3: three faults, each noticed, healed, and invisible to clients.
    let f = &r["failover"];
    let kinds: Vec<&str> = f["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["order replica", "catalog backup", "catalog primary"]
    );
    let events: Vec<String> = f["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["what"].as_str().unwrap(),
                e["node"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(events.len(), 6, "{events:?}");
    for x in f["faults"].as_array().unwrap() {
        assert!(x["buys"].as_u64().unwrap() > 0, "{x}");
        assert_eq!(x["buy_errors"], 0, "a client saw a failed buy: {x}");
        assert_eq!(x["lookup_errors"], 0, "a client saw a failed lookup: {x}");
        assert!(x["detection_ms"].as_f64().is_some(), "not noticed: {x}");
        assert!(x["resync_ms"].as_f64().is_some(), "not back: {x}");
        assert!(x["primary_after_kill"].is_string(), "{x}");
    }
    let primary = &f["faults"][2];
    assert_ne!(
        primary["primary_after_kill"], primary["node"],
        "the killed primary cannot be primary before it restarts: {primary}"
    );
    let buckets = f["timeline"].as_array().unwrap();
    assert!(buckets.len() > 10);

    // The machine's own latencies, measured where the store kept its data.
    let m = &r["machine"];
    for k in [
        "fsync_p50_us",
        "wake_round_trip_p50_us",
        "idle_wake_round_trip_p50_us",
        "buy_floor_us",
        // Pinned on purpose, on one CPU.
        "same_cpu_wake_round_trip_p50_us",
        "buy_floor_same_cpu_us",
    ] {
        assert!(m[k].as_u64().unwrap() > 0, "{k}: {m}");
    }
    // And on two, where the tests may use two.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for k in ["cross_cpu_wake_round_trip_p50_us", "buy_floor_cross_cpu_us"] {
        if cpus >= 2 {
            assert!(m[k].as_u64().unwrap() > 0, "{k}: {m}");
        }
    }
    assert!(
        m["fsync_p50_us"].as_u64() <= m["fsync_p99_us"].as_u64(),
        "{m}"
    );
    assert!(
        m["disk"].as_str().unwrap().contains("pygmy-bench-"),
        "not the store's scratch directory: {m}"
    );

    // Memory of all seven processes, and the targets stated.
    assert_eq!(r["memory"].as_array().unwrap().len(), 7);
    assert!(r["memory_total_bytes"].as_u64().unwrap() > 0);
    let targets = r["targets"].as_array().unwrap();
    assert!(targets.len() >= 7);
    assert!(
        targets.iter().all(|t| t["measured"] != "not measured"),
        "{targets:?}"
    );

    // The anchors, measured on this machine (`.ci/run` installs nginx and
    // etcd): each without an error, each beside its target.
    let a = &r["anchors"];
    assert_eq!(a["skipped"], serde_json::json!([]), "{a}");
    for (anchor, conns) in [
        ("nginx, static file", 64),
        ("etcd, 3-member durable put", 1),
        ("etcd, 3-member durable put", 32),
    ] {
        let row = a["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["anchor"] == anchor && x["connections"] == conns)
            .unwrap_or_else(|| panic!("no {anchor} at {conns}: {a}"));
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["failed"], 0, "{row}");
        assert_eq!(row["non_2xx"], 0, "{row}");
    }
    for what in [
        "cached lookup, 64 connections",
        "durable replicated buy, one at a time (1 connection), p50",
        "buys, 32 connections",
    ] {
        let t = targets.iter().find(|t| t["what"] == what).unwrap();
        assert!(
            t["anchor"].as_str().unwrap().contains("this run"),
            "no anchor beside {what}: {t}"
        );
    }
    // Both stopped: nothing of theirs is left in the bench's folder.
    assert!(
        !std::process::Command::new("pgrep")
            .args(["-f", "pygmy-bench-.*/anchors"])
            .status()
            .unwrap()
            .success(),
        "an anchor's process outlived the bench"
    );

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "## Speed targets",
        "### The anchors",
        "| the anchor, this run |",
        "nginx version: nginx/",
        "etcd Version: ",
        "## Q1: latency, cache on and off",
        "## Q2: the cost of invalidation",
        "## Q3: failover under load",
        "## Memory after the run",
        "## What the profile showed, and what changed",
        "What this machine allows a lone buy, before any work is done",
        "when both had slept 500 µs first",
        "with both threads pinned to one CPU",
        "with every wake-up on its waker's CPU",
        "pygmy bench --quick --anchors --out",
    ] {
        assert!(report.contains(section), "report.md lacks {section:?}");
    }
    for name in [
        "throughput.svg",
        "latency.svg",
        "invalidation.svg",
        "failover.svg",
    ] {
        svg(&out, name);
        assert!(
            report.contains(&format!("({name})")),
            "report.md does not show {name}"
        );
    }
    let failover = std::fs::read_to_string(out.join("failover.svg")).unwrap();
    for e in &events {
        assert!(
            failover.contains(e.as_str()),
            "failover.svg does not mark {e:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_measures_a_running_store_named_by_its_cluster_file() {
    let c = TestCluster::start(Options::default()).await;
    let before = c.order_log_len().await;
    let out = common::temp_dir("bench-target");
    let config = c.config_path.to_str().unwrap().to_string();
    let dir = out.clone();
    let r = tokio::task::spawn_blocking(move || {
        bench(&["--quick", "--target", &config, "--soak", "2"], &dir)
    })
    .await
    .unwrap();

    // The running frontend caches: the cache-on half of Q1, and Q2.
    every_cell_measured(&r, &[true]);
    assert!(rows(&r, "lookup", false).is_empty());
    assert!(r["invalidation"]["misses_counted"].as_u64().unwrap() > 0);
    // It cannot kill the target's processes: failover is skipped, saying why.
    assert!(r["failover"].is_null());
    let skipped = r["skipped"].to_string();
    assert!(skipped.contains("failover"), "{skipped}");
    // It bought on the running store, as it said.
    assert!(c.order_log_len().await > before);
    // The soak sampled memory, descriptors and the answers kept over time,
    // beside hostile requests, none of them answered with a 5xx or not at
    // all.
    let soak = &r["soak"];
    let samples = soak["samples"].as_array().unwrap();
    assert!(samples.len() >= 2, "{soak}");
    for x in samples {
        assert!(x["memory_bytes"].as_u64().unwrap() > 0, "{x}");
        assert!(x["open_fds"].as_u64().unwrap() > 0, "{x}");
    }
    assert!(
        samples.last().unwrap()["answers_kept"].as_u64().unwrap() > 0,
        "the soak's buys left answers kept: {soak}"
    );
    assert_eq!(soak["errors"], 0, "{soak}");
    assert!(soak["hostile_requests"].as_u64().unwrap() > 0, "{soak}");
    assert_eq!(
        soak["hostile_failed"], 0,
        "a hostile request failed the server: {soak}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Soak") && report.contains("(soak.svg)"));
    svg(&out, "soak.svg");
    assert_eq!(r["store"], c.config_path.to_str().unwrap());
    // The bench cannot see a running store's disk: it measured the fsync
    // where it writes its report.
    assert_eq!(
        r["machine"]["disk"].as_str(),
        out.to_str(),
        "{}",
        r["machine"]
    );
}
