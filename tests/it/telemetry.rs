//! Metrics, logs and error answers as operators and clients see them, on a
//! running cluster: Prometheus conventions, the shipped dashboard's metrics,
//! bounded labels under random methods and paths, request ids across the
//! three tiers in JSON logs, problem details that never show an internal
//! address.
//!
//! Every test here runs its nodes with JSON logs and debug lines of pygmy.

use crate::common;
use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::{Options, TestCluster};
use pygmy::config::Role;

/// Nodes log JSON, with debug lines from pygmy.
fn json_logs() -> Vec<(String, String)> {
    [
        ("PYGMY_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,pygmy=debug,hyper=warn,reqwest=warn"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

async fn metrics_page(c: &TestCluster, node: &str) -> String {
    let res = reqwest::get(format!("{}/metrics", c.url(node)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// Names of the series on a page (`name` of `name{labels} value`).
fn series_names(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_prometheus_conventions_and_cover_the_dashboard() {
    let mut c = TestCluster::start(Options {
        env_all: json_logs(),
        tweak: |cfg| {
            cfg.timing.call_timeout_ms = 500;
            cfg.timing.retry_budget_ms = 1_000;
        },
        ..Options::default()
    })
    .await;
    c.frontend().buy("1", None).await.unwrap();
    c.frontend().lookup("2").await.unwrap();

    let mut all = BTreeSet::new();
    let names: Vec<String> = c.cfg.nodes.iter().map(|n| n.name.clone()).collect();
    for node in &names {
        let page = metrics_page(&c, node).await;
        let helped: BTreeSet<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
            .collect();
        for t in page.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = t.split_once(' ').unwrap();
            assert!(helped.contains(name), "{node}: {name} has no # HELP");
            assert_ne!(
                kind, "summary",
                "{node}: {name} is a summary, not a histogram"
            );
        }
        assert!(
            page.contains("pygmy_http_request_duration_seconds_bucket{"),
            "{node}: no histogram buckets:\n{page}"
        );
        assert!(
            page.contains(r#"status="2xx""#),
            "{node}: status is not a class:\n{page}"
        );
        all.extend(series_names(&page));
    }
    let fe = metrics_page(&c, "frontend").await;
    assert!(
        fe.contains(r#"pygmy_buys_total{outcome="bought"} 1"#),
        "one buy counted:\n{fe}"
    );
    assert!(
        fe.contains(r#"route="/buy/{id}""#),
        "requests are counted by route template:\n{fe}"
    );

    // Every metric the shipped dashboard queries exists.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')) {
                if word.starts_with("pygmy_") || word.starts_with("process_") {
                    queried.insert(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "the dashboard names {queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|m| !all.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no node exports: {missing:?}\nexported: {all:?}"
    );

    // The scrape config names every node of `pygmy up`.
    let scrape = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus.yml"
    ))
    .unwrap();
    for port in 5001..=5007 {
        assert!(
            scrape.contains(&format!("127.0.0.1:{port}")),
            "deploy/prometheus.yml misses port {port}"
        );
    }

    // With no catalog replica, a read is a problem details 503 that names
    // no internal address.
    for n in c.names(Role::Catalog) {
        c.kill9(&n);
    }
    let res = reqwest::get(format!("{}/search/no-such-topic-here", c.url("frontend")))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], 503);
    assert_eq!(body["title"], "Service Unavailable");
    assert_eq!(body["detail"], body["message"]);
    let text = body.to_string();
    for n in &c.cfg.nodes {
        let host = n.addr.rsplit_once(':').unwrap().0;
        assert!(
            !text.contains(host) && !text.contains(&n.name),
            "the answer shows an internal address or name: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_methods_and_paths_leave_metrics_and_memory_flat() {
    let c = TestCluster::start(Options {
        env_all: json_logs(),
        ..Options::default()
    })
    .await;
    let base = c.url("frontend");
    let pid = c.pid("frontend");
    let http = reqwest::Client::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut batch = |n: usize| {
        (0..n)
            .map(|_| {
                let len = 1 + (next() % 200) as usize;
                let method: String = (0..len)
                    .map(|_| alphabet[(next() % 26) as usize] as char)
                    .collect();
                let path = format!("/{:x}/{:x}", next(), next());
                (method, path)
            })
            .collect::<Vec<_>>()
    };
    let send = |reqs: Vec<(String, String)>| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for chunk in reqs.chunks(reqs.len().div_ceil(32)) {
                let (http, base, chunk) = (http.clone(), base.clone(), chunk.to_vec());
                tasks.spawn(async move {
                    for (m, p) in chunk {
                        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
                        let res = http
                            .request(method, format!("{base}{p}"))
                            .send()
                            .await
                            .unwrap();
                        assert!(res.status().is_client_error(), "{m} {p}: {}", res.status());
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        }
    };
    // Warm up: every label set the flood (and a scrape) can produce exists after this.
    send(batch(1_000)).await;
    metrics_page(&c, "frontend").await;
    let page_before = metrics_page(&c, "frontend").await;
    let rss_before = rss_kib(pid);
    send(batch(10_000)).await;
    let page_after = metrics_page(&c, "frontend").await;
    let rss_after = rss_kib(pid);
    let series = |p: &str| -> BTreeSet<String> {
        p.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
            .collect()
    };
    let (before, after) = (series(&page_before), series(&page_after));
    let new: Vec<&String> = after.difference(&before).collect();
    assert!(new.is_empty(), "new series appeared: {new:?}");
    assert!(
        page_after.len() <= page_before.len() + 1_024,
        "/metrics grew from {} to {} bytes",
        page_before.len(),
        page_after.len()
    );
    assert!(
        page_after.contains(r#"method="other""#),
        "unknown methods share one label:\n{page_after}"
    );
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "the frontend's RSS grew from {rss_before} KiB to {rss_after} KiB over 10 000 requests"
    );
    eprintln!(
        "/metrics {} -> {} bytes; RSS {rss_before} -> {rss_after} KiB",
        page_before.len(),
        page_after.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_follows_a_buy_through_every_tier_and_every_line_names_its_node() {
    let c = TestCluster::start(Options {
        env_all: json_logs(),
        ..Options::default()
    })
    .await;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/buy/1", c.url("frontend")))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "trace-me-42");
    // Without one, the frontend mints an id and answers with it.
    let res = http
        .get(format!("{}/lookup/1", c.url("frontend")))
        .send()
        .await
        .unwrap();
    let minted = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(minted.len(), 32, "{minted}");
    // Errors carry it too.
    let res = http
        .get(format!("{}/lookup/0", c.url("frontend")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.headers().contains_key("x-request-id"));
    assert_eq!(res.headers()["content-type"], "application/problem+json");

    let primary = c.primary().await;
    let log_of = |node: &str| std::fs::read_to_string(c.dir.join(format!("{node}.log"))).unwrap();
    let tagged = |node: &str| {
        log_of(node)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["request_id"] == "trace-me-42"))
            })
            .count()
    };
    common::wait_until(
        "the buy's lines carry its request id in all three tiers",
        Duration::from_secs(10),
        || {
            let ok = tagged("frontend") > 0
                && tagged(&primary) > 0
                && c.names(Role::Order).iter().any(|o| tagged(o) > 0);
            async move { ok }
        },
    )
    .await;
    for n in &c.cfg.nodes {
        for line in log_of(&n.name).lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", n.name));
            assert_eq!(v["node"], n.name.as_str(), "{line}");
        }
    }
}
