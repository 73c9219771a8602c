//! Q3: steady buys and lookups while an order replica, a catalog backup and
//! then the catalog primary are killed (SIGKILL) and restarted, one at a
//! time. A monitor polls every catalog replica's status and the frontend's
//! view of its pools, so each fault gets a detection time (the cluster
//! noticed) and a resync time (the restarted node is back in service).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::time::Instant;

use super::load::{self, Pick, Req, Sample};
use super::{BENCH_STOCK, Store};

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResults {
    pub buy_rate: f64,
    pub lookup_rate: f64,
    pub seconds: f64,
    pub events: Vec<Event>,
    pub faults: Vec<Fault>,
    /// Per 100 ms (by when requests were due): answers and latencies.
    pub timeline: Vec<Bucket>,
    /// Every request (plotted; summarised in `timeline` in results.json).
    #[serde(skip)]
    pub buys: Vec<Sample>,
    #[serde(skip)]
    pub lookups: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub at_ms: f64,
    pub buys_ok: u64,
    pub buys_failed: u64,
    pub buy_p50_ms: f64,
    pub buy_max_ms: f64,
    pub lookups_ok: u64,
    pub lookups_failed: u64,
    pub lookup_p50_ms: f64,
    pub lookup_max_ms: f64,
}

const BUCKET_MS: f64 = 100.0;

fn buckets(buys: &[Sample], lookups: &[Sample], end_ms: f64) -> Vec<Bucket> {
    let n = (end_ms / BUCKET_MS).ceil().max(0.0) as usize;
    let mut out: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            at_ms: i as f64 * BUCKET_MS,
            buys_ok: 0,
            buys_failed: 0,
            buy_p50_ms: 0.0,
            buy_max_ms: 0.0,
            lookups_ok: 0,
            lookups_failed: 0,
            lookup_p50_ms: 0.0,
            lookup_max_ms: 0.0,
        })
        .collect();
    let mut latencies: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; n];
    for (samples, is_buy) in [(buys, true), (lookups, false)] {
        for s in samples {
            let Some(b) = out.get_mut((s.at_ms / BUCKET_MS) as usize) else {
                continue;
            };
            let (ok, failed, max) = if is_buy {
                (&mut b.buys_ok, &mut b.buys_failed, &mut b.buy_max_ms)
            } else {
                (
                    &mut b.lookups_ok,
                    &mut b.lookups_failed,
                    &mut b.lookup_max_ms,
                )
            };
            if s.ok {
                *ok += 1;
            } else {
                *failed += 1;
            }
            *max = max.max(s.latency_ms);
            latencies[(s.at_ms / BUCKET_MS) as usize][usize::from(!is_buy)].push(s.latency_ms);
        }
    }
    for (b, [buy, lookup]) in out.iter_mut().zip(&mut latencies) {
        b.buy_p50_ms = median(buy);
        b.lookup_p50_ms = median(lookup);
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A kill or a restart, at `at_ms` since the run's start.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at_ms: f64,
    pub what: String,
    pub node: String,
}

/// What one kill did, as clients and the cluster saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// `order replica`, `catalog backup` or `catalog primary`.
    pub kind: String,
    pub node: String,
    /// From this kill to the next kill (or the end).
    pub window_ms: (f64, f64),
    pub buy_errors: u64,
    pub lookup_errors: u64,
    pub buys: u64,
    pub lookups: u64,
    /// The longest time without a successful buy answered, from the kill.
    pub longest_buy_gap_ms: f64,
    /// Kill → the cluster shows it noticed (order: the frontend marks the
    /// replica down; backup: the primary drops it from its view; primary: a
    /// new primary serves).
    pub detection_ms: Option<f64>,
    /// Restart → back in service (order: marked up again; catalog: in the
    /// primary's view).
    pub resync_ms: Option<f64>,
    /// The catalog primary just before the restart (after the kill).
    pub primary_after_kill: Option<String>,
    /// The catalog primary at the end of the window (after the restart).
    pub primary_after_restart: Option<String>,
}

/// One poll of the cluster.
#[derive(Debug, Clone)]
struct Snapshot {
    at_ms: f64,
    /// The serving primary and its view.
    primary: Option<(String, Vec<String>)>,
    /// Order replicas the frontend marks up.
    orders_up: Vec<String>,
}

pub async fn run(
    store: &mut Store,
    addr: SocketAddr,
    books: &[u64],
    quick: bool,
    progress: &ProgressBar,
) -> anyhow::Result<FailoverResults> {
    progress.set_message("failover: steady load");
    store.set_cache(true).await?;
    store.restock(books, BENCH_STOCK).await?;
    let step = if quick {
        Duration::from_millis(1500)
    } else {
        Duration::from_secs(4)
    };
    let (buy_rate, lookup_rate) = if quick {
        (100.0, 200.0)
    } else {
        (400.0, 1000.0)
    };
    let t0 = Instant::now() + Duration::from_millis(100);
    let stop = Arc::new(AtomicBool::new(false));
    let books_b = books.to_vec();
    let buy: Pick =
        Arc::new(move |i| Req::post(format!("/buy/{}", books_b[i as usize % books_b.len()])));
    let books_l = books.to_vec();
    let lookup: Pick =
        Arc::new(move |i| Req::get(format!("/lookup/{}", books_l[i as usize % books_l.len()])));
    let buys = tokio::spawn(load::timeline(addr, buy, buy_rate, 32, t0, stop.clone()));
    let lookups = tokio::spawn(load::timeline(
        addr,
        lookup,
        lookup_rate,
        16,
        t0,
        stop.clone(),
    ));
    let monitor = tokio::spawn(monitor(MonitorTarget::of(store), t0, stop.clone()));

    let ms = |t: Instant| (t.saturating_duration_since(t0)).as_secs_f64() * 1e3;
    let mut events = Vec::new();
    let mut kinds = Vec::new();
    tokio::time::sleep_until(t0 + step).await;
    progress.inc(1);
    // The order replica, a backup, then the primary, each killed then
    // restarted one step later.
    for kind in ["order replica", "catalog backup", "catalog primary"] {
        let node = match kind {
            "order replica" => "order-1".to_string(),
            _ => {
                let primary = store.primary().await.map(|(n, _)| n);
                match kind {
                    "catalog primary" => primary.unwrap_or_else(|| "catalog-3".into()),
                    _ => store
                        .cfg
                        .nodes_of(crate::config::Role::Catalog)
                        .map(|n| n.name.clone())
                        .find(|n| Some(n) != primary.as_ref())
                        .unwrap_or_else(|| "catalog-1".into()),
                }
            }
        };
        progress.set_message(format!("failover: SIGKILL {node} ({kind})"));
        store.kill(&node).await?;
        events.push(Event {
            at_ms: ms(Instant::now()),
            what: "kill".into(),
            node: node.clone(),
        });
        kinds.push((kind, node.clone()));
        let next = Instant::now() + step;
        tokio::time::sleep_until(next).await;
        progress.inc(1);
        progress.set_message(format!("failover: restart {node}"));
        store.restart(&node)?;
        events.push(Event {
            at_ms: ms(Instant::now()),
            what: "restart".into(),
            node: node.clone(),
        });
        tokio::time::sleep_until(next + step).await;
        progress.inc(1);
    }
    // Let the last restart catch up under load.
    tokio::time::sleep(step).await;
    stop.store(true, Ordering::Relaxed);
    let end_ms = ms(Instant::now());
    let buys = buys.await.unwrap_or_default();
    let lookups = lookups.await.unwrap_or_default();
    let snapshots = monitor.await.unwrap_or_default();

    let mut faults = Vec::new();
    for (i, (kind, node)) in kinds.iter().enumerate() {
        let kill_ms = events[2 * i].at_ms;
        let restart_ms = events[2 * i + 1].at_ms;
        let until = events.get(2 * i + 2).map(|e| e.at_ms).unwrap_or(end_ms);
        faults.push(fault(
            kind, node, kill_ms, restart_ms, until, &buys, &lookups, &snapshots,
        ));
    }
    Ok(FailoverResults {
        buy_rate,
        lookup_rate,
        seconds: end_ms / 1e3,
        events,
        faults,
        timeline: buckets(&buys, &lookups, end_ms),
        buys,
        lookups,
    })
}

#[allow(clippy::too_many_arguments)]
fn fault(
    kind: &str,
    node: &str,
    kill_ms: f64,
    restart_ms: f64,
    until: f64,
    buys: &[Sample],
    lookups: &[Sample],
    snapshots: &[Snapshot],
) -> Fault {
    let within = |s: &&Sample| s.at_ms >= kill_ms && s.at_ms < until;
    let count = |v: &[Sample]| {
        (
            v.iter().filter(within).count() as u64,
            v.iter().filter(within).filter(|s| !s.ok).count() as u64,
        )
    };
    let (nb, eb) = count(buys);
    let (nl, el) = count(lookups);
    let after_kill = snapshots.iter().filter(|s| s.at_ms >= kill_ms);
    let after_restart = snapshots.iter().filter(|s| s.at_ms >= restart_ms);
    let primary_before = snapshots
        .iter()
        .rev()
        .find(|s| s.at_ms < kill_ms)
        .and_then(|s| s.primary.as_ref().map(|p| p.0.clone()));
    let noticed = |s: &Snapshot| match kind {
        "order replica" => !s.orders_up.iter().any(|n| n == node),
        "catalog backup" => s
            .primary
            .as_ref()
            .is_some_and(|(_, view)| !view.iter().any(|n| n == node)),
        _ => s
            .primary
            .as_ref()
            .is_some_and(|(p, _)| Some(p) != primary_before.as_ref() && p != node),
    };
    let back = |s: &Snapshot| match kind {
        "order replica" => s.orders_up.iter().any(|n| n == node),
        _ => s
            .primary
            .as_ref()
            .is_some_and(|(p, view)| p == node || view.iter().any(|n| n == node)),
    };
    let detection_ms = after_kill
        .clone()
        .find(|s| noticed(s))
        .map(|s| s.at_ms - kill_ms);
    let resync_ms = after_restart
        .clone()
        .find(|s| back(s))
        .map(|s| s.at_ms - restart_ms);
    let primary_at = |t: f64| {
        snapshots
            .iter()
            .rev()
            .find(|s| s.at_ms < t)
            .and_then(|s| s.primary.as_ref().map(|p| p.0.clone()))
    };
    Fault {
        kind: kind.into(),
        node: node.into(),
        window_ms: (kill_ms, until),
        buy_errors: eb,
        lookup_errors: el,
        buys: nb,
        lookups: nl,
        longest_buy_gap_ms: longest_gap(buys, kill_ms, until),
        detection_ms,
        resync_ms,
        primary_after_kill: primary_at(restart_ms),
        primary_after_restart: primary_at(until),
    }
}

/// The longest time in `[from, until)` with no successful answer.
fn longest_gap(samples: &[Sample], from: f64, until: f64) -> f64 {
    let mut done: Vec<f64> = samples
        .iter()
        .filter(|s| s.ok && s.done_ms >= from && s.done_ms < until)
        .map(|s| s.done_ms)
        .collect();
    done.sort_by(f64::total_cmp);
    let mut last = from;
    let mut gap: f64 = 0.0;
    for d in done {
        gap = gap.max(d - last);
        last = d;
    }
    gap.max(until - last)
}

struct MonitorTarget {
    catalogs: Vec<(String, crate::client::CatalogClient)>,
    frontend_metrics: String,
    http: crate::client::Http,
}

impl MonitorTarget {
    fn of(store: &Store) -> Self {
        let http =
            crate::client::Http::new(Some(store.cfg.token.clone()), Duration::from_millis(250));
        Self {
            catalogs: store
                .cfg
                .nodes_of(crate::config::Role::Catalog)
                .map(|n| {
                    (
                        n.name.clone(),
                        crate::client::CatalogClient::new(n.base_url(), http.clone()),
                    )
                })
                .collect(),
            frontend_metrics: format!("{}/metrics", store.frontend().base_url()),
            http,
        }
    }
}

/// Polls every 25 ms until `stop`.
async fn monitor(t: MonitorTarget, t0: Instant, stop: Arc<AtomicBool>) -> Vec<Snapshot> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let at = Instant::now();
        let statuses = crate::cluster::join_all(t.catalogs.iter().map(|(name, c)| {
            let (name, c) = (name.clone(), c.clone());
            async move { c.status().await.ok().map(|s| (name, s)) }
        }))
        .await;
        let primary = statuses
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.role == "primary")
            .max_by_key(|(_, s)| s.epoch)
            .map(|(n, s)| (n, s.view));
        let orders_up = match t.http.text(t.frontend_metrics.clone()).await {
            Ok(page) => orders_up(&page),
            Err(_) => Vec::new(),
        };
        out.push(Snapshot {
            at_ms: at.saturating_duration_since(t0).as_secs_f64() * 1e3,
            primary,
            orders_up,
        });
        tokio::time::sleep_until(at + Duration::from_millis(25)).await;
    }
    out
}

/// Order replicas the frontend's pool marks healthy, from its metrics.
fn orders_up(page: &str) -> Vec<String> {
    page.lines()
        .filter(|l| l.starts_with(crate::metrics::POOL_HEALTHY) && l.contains("pool=\"order\""))
        .filter(|l| l.trim_end().ends_with(" 1"))
        .filter_map(|l| {
            let start = l.find("replica=\"")? + "replica=\"".len();
            let end = start + l[start..].find('"')?;
            Some(l[start..end].to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(done_ms: f64, ok: bool) -> Sample {
        Sample {
            at_ms: done_ms - 1.0,
            latency_ms: 1.0,
            ok,
            done_ms,
            status: if ok { 200 } else { 503 },
        }
    }

    #[test]
    fn the_longest_gap_counts_failures_as_no_answer_and_runs_to_the_window_edges() {
        let s = [
            sample(110.0, true),
            sample(150.0, false),
            sample(400.0, true),
            sample(420.0, true),
        ];
        // 110 → 400: the failed answer in between does not close the gap.
        assert_eq!(longest_gap(&s, 100.0, 500.0), 290.0);
        // From the window's start to the first success.
        assert_eq!(longest_gap(&s, 0.0, 430.0), 290.0);
        // Nothing succeeded: the whole window.
        assert_eq!(longest_gap(&s[1..2], 100.0, 300.0), 200.0);
    }

    #[test]
    fn healthy_order_replicas_are_read_from_the_frontends_metrics() {
        let page = "pygmy_pool_replica_healthy{pool=\"order\",replica=\"order-1\"} 0\n\
                    pygmy_pool_replica_healthy{pool=\"order\",replica=\"order-2\"} 1\n\
                    pygmy_pool_replica_healthy{pool=\"catalog\",replica=\"catalog-1\"} 1\n";
        assert_eq!(orders_up(page), vec!["order-2".to_string()]);
    }
}
