//! What clients see is linearizable: 8 clients buy and look up one book
//! through two frontends (one with its cache, one `--no-cache`) while the
//! catalog primary is killed -9 and restarted and the caching frontend is
//! killed and restarted. The history of every operation, with when it was
//! sent and answered, is checked by `pygmy::history::check`: no read
//! anomaly, nothing lost, nothing doubled, no client-visible error.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Options, TestCluster, wait_until};
use pygmy::api::BookId;
use pygmy::client::FrontendClient;
use pygmy::config::{NodeConfig, Role};
use pygmy::history::{Event, Op, check};

const BOOK: u64 = 1;
const INITIAL: u64 = 100_000;
const CLIENTS: usize = 8;

struct Shared {
    stop: AtomicBool,
    /// The caching frontend is being restarted: send nothing to it.
    fe1_down: AtomicBool,
    fe1_in_flight: AtomicUsize,
    bought: AtomicU64,
    looked_up: [AtomicU64; 2],
    events: Mutex<Vec<Event>>,
}

async fn client(i: usize, fes: [FrontendClient; 2], sh: Arc<Shared>) {
    let mut n: u64 = 0;
    while !sh.stop.load(Ordering::Relaxed) {
        n += 1;
        let mut which = (i + n as usize) % 2;
        if which == 0 {
            sh.fe1_in_flight.fetch_add(1, Ordering::SeqCst);
            if sh.fe1_down.load(Ordering::SeqCst) {
                sh.fe1_in_flight.fetch_sub(1, Ordering::SeqCst);
                which = 1;
            }
        }
        let fe = &fes[which];
        let buy = (n + i as u64).is_multiple_of(3);
        let start = Instant::now();
        let op = if buy {
            match fe
                .buy(&BOOK.to_string(), Some(&format!("lin-{i}-{n}")))
                .await
            {
                Ok(r) => Op::Bought {
                    order_id: r.order_id,
                },
                Err(e) if e.status() == Some(409) => Op::OutOfStock,
                Err(e) => Op::Failed {
                    what: format!("buy through frontend {}: {e}", which + 1),
                },
            }
        } else {
            match fe.lookup(&BOOK.to_string()).await {
                Ok(r) => Op::Lookup { stock: r.stock },
                Err(e) => Op::Failed {
                    what: format!("lookup through frontend {}: {e}", which + 1),
                },
            }
        };
        let end = Instant::now();
        if which == 0 {
            sh.fe1_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        match op {
            Op::Bought { .. } => {
                sh.bought.fetch_add(1, Ordering::Relaxed);
            }
            Op::Lookup { .. } => {
                sh.looked_up[which].fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        sh.events.lock().unwrap().push(Event {
            client: i,
            start,
            end,
            op,
        });
    }
}

/// Waits until `more` further buys succeeded.
async fn buys(sh: &Shared, more: u64) {
    let target = sh.bought.load(Ordering::Relaxed) + more;
    wait_until(
        &format!("{target} buys succeeded"),
        Duration::from_secs(60),
        || async { sh.bought.load(Ordering::Relaxed) >= target },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buys_and_lookups_through_two_frontends_are_linearizable_across_a_primary_crash_and_a_frontend_restart()
 {
    let mut c = TestCluster::start(Options {
        tweak: |cfg| {
            let host = cfg
                .node("frontend")
                .unwrap()
                .addr
                .rsplit_once(':')
                .unwrap()
                .0
                .to_string();
            cfg.nodes.push(NodeConfig {
                name: "frontend-2".into(),
                role: Role::Frontend,
                process_id: 2,
                addr: format!("{host}:5008"),
                listen: None,
                data_dir: None,
                tls: false,
            });
        },
        no_cache_nodes: &["frontend-2"],
        ..Options::default()
    })
    .await;
    c.set_stock(BOOK, INITIAL).await;
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        fe1_down: AtomicBool::new(false),
        fe1_in_flight: AtomicUsize::new(0),
        bought: AtomicU64::new(0),
        looked_up: [AtomicU64::new(0), AtomicU64::new(0)],
        events: Mutex::new(Vec::new()),
    });
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client(
                i,
                [c.frontend(), c.frontend_named("frontend-2")],
                sh.clone(),
            ))
        })
        .collect();

    buys(&sh, 30).await;
    let primary = c.primary().await;
    c.kill9(&primary);
    buys(&sh, 40).await;
    c.restart(&primary).await;
    // It catches up and takes primaryship back (the highest process id).
    wait_until(
        &format!("{primary} is primary again"),
        Duration::from_secs(60),
        || {
            let p = c.catalog(&primary);
            async move {
                p.status().await.is_ok_and(|s| s.role == "primary")
                    && p.lookup(BookId::new(BOOK).unwrap(), None).await.is_ok()
            }
        },
    )
    .await;
    buys(&sh, 30).await;

    // Restart the caching frontend: its reads must be right from the start.
    sh.fe1_down.store(true, Ordering::SeqCst);
    wait_until(
        "requests to frontend 1 drained",
        Duration::from_secs(60),
        || async { sh.fe1_in_flight.load(Ordering::SeqCst) == 0 },
    )
    .await;
    c.kill9("frontend");
    c.restart("frontend").await;
    sh.fe1_down.store(false, Ordering::SeqCst);
    buys(&sh, 40).await;

    sh.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // The stock left, once every replica holds the same.
    let replicas: Vec<_> = c
        .names(Role::Catalog)
        .into_iter()
        .map(|n| c.catalog(&n))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let mut seen = Vec::new();
        for r in &replicas {
            if let Ok(b) = r.lookup(BookId::new(BOOK).unwrap(), None).await {
                seen.push(b.stock);
            }
        }
        if seen.len() == replicas.len() && seen.windows(2).all(|w| w[0] == w[1]) {
            break seen[0];
        }
        assert!(
            Instant::now() < deadline,
            "the replicas do not converge: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let events = sh.events.lock().unwrap().clone();
    let looked = [
        sh.looked_up[0].load(Ordering::Relaxed),
        sh.looked_up[1].load(Ordering::Relaxed),
    ];
    assert!(
        looked[0] > 50 && looked[1] > 50,
        "lookups through each frontend: {looked:?}"
    );
    if let Err(v) = check(INITIAL, &events, left) {
        panic!("{v} (history of {} operations)", events.len());
    }
    eprintln!(
        "{} operations checked: {} buys, lookups {looked:?} (frontend, frontend-2 without cache)",
        events.len(),
        sh.bought.load(Ordering::Relaxed)
    );
}
