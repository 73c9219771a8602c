//! Nodes starting and stopping: a data directory whose identity is corrupt
//! or belongs to someone else is refused; SIGTERM drains in-flight requests, and no
//! acknowledged buy is lost or applied twice.

use crate::common;
use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::{Options, TestCluster};
use pygmy::config::ClusterConfig;

/// Runs `pygmy serve` for `node` and expects it to refuse to start with a
/// message containing `needle`.
fn refuses(cfg_path: &std::path::Path, node: &str, needle: &str) {
    let out = Command::new(common::BIN)
        .args(["serve", "--config", cfg_path.to_str().unwrap(), node])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{node} started on a bad data directory"
    );
    assert!(
        err.contains(needle),
        "{node}: expected {needle:?} in:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_data_directory_that_is_corrupt_or_not_its_own() {
    let mut c = TestCluster::start(Options::default()).await;
    c.frontend().buy("1", None).await.unwrap();
    c.stop("catalog-1");
    c.stop("order-1");

    // Another cluster's file pointing at the same folders.
    let mut other = c.cfg.clone();
    other.cluster_id = "another-cluster".into();
    other.base_dir = c.dir.clone();
    let other_path = c.dir.join("other.toml");
    other.save(&other_path).unwrap();
    refuses(&other_path, "catalog-1", "belongs to cluster");
    refuses(&other_path, "order-1", "belongs to cluster");

    // This cluster, but catalog-1 pointed at order-1's folder.
    let mut swapped = c.cfg.clone();
    for n in &mut swapped.nodes {
        if n.name == "catalog-1" {
            n.data_dir = Some("order-1".into());
        }
    }
    let swapped_path = c.dir.join("swapped.toml");
    swapped.save(&swapped_path).unwrap();
    refuses(&swapped_path, "catalog-1", "node order-1");

    // An identity file that is not one. (A damaged database is set aside
    // and rebuilt from the primary: tests/it/replication.rs.)
    std::fs::write(c.dir.join("catalog-1").join("identity.json"), b"{\"cluster").unwrap();
    refuses(&c.config_path, "catalog-1", "corrupt");

    // Data without its identity file.
    std::fs::remove_file(c.dir.join("order-1").join("identity.json")).unwrap();
    refuses(&c.config_path, "order-1", "corrupt");

    // The untouched ones still start.
    let cfg = ClusterConfig::load(&c.config_path).unwrap();
    assert!(cfg.node("order-2").is_some());
    c.stop("order-2");
    c.restart("order-2").await;
}

/// Buys with unique Idempotency-Keys, each retried until it succeeds, while
/// `node` is stopped with SIGTERM and started again. Every key must be
/// acknowledged once, with one order id, and the stock must drop by exactly
/// the number of keys.
async fn buys_survive_sigterm_of(node: &str) {
    let mut c = TestCluster::start(Options::default()).await;
    c.set_stock(1, 1_000_000).await;
    let start = c.stock(1).await;
    let fe = c.frontend();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let fe = fe.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut orders = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) || i < 20 {
                    let key = format!("c{client}-{i}");
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    loop {
                        match fe.buy("1", Some(&key)).await {
                            Ok(b) => {
                                orders.push((key.clone(), b.order_id));
                                break;
                            }
                            Err(e) => {
                                assert!(
                                    tokio::time::Instant::now() < deadline,
                                    "{key} never succeeded: {e}"
                                );
                                assert!(e.is_retryable(), "{key}: final error {e}");
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    i += 1;
                }
                orders
            })
        })
        .collect();
    common::wait_until("buys are flowing", Duration::from_secs(30), || {
        let c = c.catalog("catalog-3");
        async move {
            c.lookup(pygmy::api::BookId::new(1).unwrap(), None)
                .await
                .is_ok_and(|b| b.stock + 10 <= start)
        }
    })
    .await;
    let node = if node == "the catalog primary" {
        c.primary().await
    } else {
        node.to_string()
    };
    let node = node.as_str();
    assert!(c.stop(node), "{node} exits cleanly on SIGTERM");
    c.restart(node).await;
    stop.store(true, Ordering::Relaxed);
    let mut keys = HashSet::new();
    let mut ids = HashSet::new();
    for t in clients {
        for (key, id) in t.await.unwrap() {
            assert!(keys.insert(key.clone()), "{key} acknowledged twice");
            assert!(ids.insert(id), "order id {id} given to two keys");
        }
    }
    assert_eq!(
        c.stock(1).await,
        start - keys.len() as u64,
        "stopping {node}: every acknowledged buy applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_frontend_loses_no_buy_and_applies_none_twice() {
    buys_survive_sigterm_of("frontend").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_an_order_replica_loses_no_buy_and_applies_none_twice() {
    buys_survive_sigterm_of("order-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_catalog_primary_loses_no_buy_and_applies_none_twice() {
    buys_survive_sigterm_of("the catalog primary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_catalog_backup_loses_no_buy_and_applies_none_twice() {
    buys_survive_sigterm_of("catalog-1").await;
}

/// A buy whose client gave up still runs at its order replica (it waits on
/// the catalog); the replica is told to stop once it has answered every
/// request. It waits for that buy to reach its order log before it closes
/// the log: the stop is clean (SQLite removed its write-ahead log) and the
/// order is in the log when the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_replica_told_to_stop_records_the_buy_its_client_gave_up_on_first() {
    let mut c = TestCluster::start(Options::default()).await;
    let catalogs = c.names(pygmy::config::Role::Catalog);
    let signal = |c: &TestCluster, sig: i32| {
        for name in &catalogs {
            c.signal(name, sig);
        }
    };
    // The catalog holds the buy: every replica paused.
    signal(&c, libc::SIGSTOP);
    let impatient = pygmy::client::Http::new(Some(c.cfg.token.clone()), Duration::from_millis(300));
    let order = pygmy::client::OrderClient::new(c.url("order-1"), impatient);
    let request_id = pygmy::api::RequestId::parse("k:given-up-at-stop").unwrap();
    let given_up = order
        .buy(&pygmy::api::OrderBuyRequest {
            book_id: pygmy::api::BookId::new(1).unwrap(),
            request_id: request_id.clone(),
            fresh: false,
        })
        .await;
    assert!(given_up.is_err(), "the client gave up: {given_up:?}");
    common::wait_until(
        "order-1 still runs the buy",
        Duration::from_secs(10),
        || async { c.metric("order-1", "pygmy_work_running").await == 1.0 },
    )
    .await;

    // Told to stop: it has no request left to answer, and stops listening.
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(c.pid("order-1") as i32, libc::SIGTERM) },
        0
    );
    let addr = c.cfg.node("order-1").unwrap().addr.clone();
    common::wait_until("order-1 stops listening", Duration::from_secs(10), || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(addr).await.is_err() }
    })
    .await;
    // The catalog answers again; the buy is still within its budget.
    signal(&c, libc::SIGCONT);
    assert!(
        tokio::task::block_in_place(|| c.stop("order-1")),
        "order-1 exits cleanly"
    );
    let dir = c.cfg.data_dir(c.cfg.node("order-1").unwrap()).unwrap();
    let log = std::fs::read_to_string(c.dir.join("order-1.log")).unwrap();
    assert!(
        !log.contains("still in use") && !dir.join("orders.sqlite-wal").exists(),
        "order-1 closed its log cleanly:\n{log}"
    );
    c.restart("order-1").await;
    let page = c.order("order-1").log(1000, None).await.unwrap();
    assert!(
        page.orders
            .iter()
            .any(|o| o.request_id == request_id && o.outcome == "bought"),
        "the buy its client gave up on is in order-1's log: {:?}",
        page.orders
    );
}

/// An order log emptied, or deleted, while its replica was down is
/// reported, with how many orders are gone; buys go on, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_or_deleted_order_log_is_reported_and_buys_go_on() {
    let mut c = TestCluster::start(Options::default()).await;
    // The frontend spreads buys over the order replicas.
    let mut bought = 0;
    let held = loop {
        c.frontend().buy("1", None).await.unwrap();
        bought += 1;
        let held = c
            .order("order-1")
            .log(1000, None)
            .await
            .unwrap()
            .orders
            .len();
        if held >= 3 {
            break held;
        }
        assert!(bought < 100, "order-1 took no buys");
    };
    let dir = c.cfg.data_dir(c.cfg.node("order-1").unwrap()).unwrap();
    let log_of = |c: &TestCluster| std::fs::read_to_string(c.dir.join("order-1.log")).unwrap();

    // Emptied: every row deleted while it was down.
    assert!(c.stop("order-1"));
    let db = rusqlite::Connection::open(dir.join("orders.sqlite")).unwrap();
    db.execute("DELETE FROM orders", []).unwrap();
    drop(db);
    c.restart("order-1").await;
    let log = log_of(&c);
    assert!(
        log.contains(&format!("the order log lost {held} of the {held} orders")),
        "it says how many orders are gone:\n{log}"
    );

    // Deleted: the file gone.
    assert!(c.stop("order-1"));
    for f in ["orders.sqlite", "orders.sqlite-wal", "orders.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    c.restart("order-1").await;
    let log = log_of(&c);
    assert!(
        log.contains("the order log file is gone"),
        "it says the log is gone:\n{log}"
    );

    // Its write-ahead log deleted after a crash (a clean stop removes it).
    c.frontend().buy("1", None).await.unwrap();
    c.kill9("order-1");
    let wal = dir.join("orders.sqlite-wal");
    assert!(
        wal.exists(),
        "a crashed SQLite database keeps its write-ahead log"
    );
    std::fs::remove_file(&wal).unwrap();
    let _ = std::fs::remove_file(dir.join("orders.sqlite-shm"));
    c.restart("order-1").await;
    let log = log_of(&c);
    assert!(
        log.contains("the order log's write-ahead log is missing after a stop that was not clean"),
        "it says the write-ahead log is gone:\n{log}"
    );

    // A replica that merely restarts, cleanly or after a crash, says
    // nothing of the kind.
    let before = log_of(&c).len();
    assert!(c.stop("order-1"));
    assert!(!wal.exists(), "a clean stop closes the order log");
    c.restart("order-1").await;
    c.kill9("order-1");
    c.restart("order-1").await;
    let after = log_of(&c)[before..].to_string();
    for word in [
        "order log lost",
        "order log file is gone",
        "write-ahead log is missing",
    ] {
        assert!(!after.contains(word), "{word:?}:\n{after}");
    }

    // Buys go on, each once, through every order replica.
    let stock = c.stock(1).await;
    for _ in 0..9 {
        c.frontend().buy("1", None).await.unwrap();
    }
    assert_eq!(c.stock(1).await, stock - 9);
}

/// An order whose row was changed on disk while its replica was down (a
/// title rewritten, its checksum left as it was) is refused at start-up:
/// it is moved aside for the operator, said loudly, never served in the
/// log's pages; the rest of the log stays; a retry of that buy is
/// answered as before (by the catalog), and the damage is not counted
/// as lost orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_order_row_is_refused_never_served_and_its_buy_still_answers() {
    let mut c = TestCluster::start(Options::default()).await;
    let mut first = std::collections::HashMap::new();
    let mut k = 0;
    let held = loop {
        let key = format!("order-row-{k}");
        k += 1;
        let r = c.frontend().buy("1", Some(&key)).await.unwrap();
        first.insert(format!("k:{key}"), r.order_id);
        let page = c.order("order-1").log(1000, None).await.unwrap();
        if page.orders.len() >= 3 {
            break page.orders;
        }
        assert!(k < 100, "order-1 took no buys");
    };
    let victim = held[1].request_id.to_string();
    let dir = c.cfg.data_dir(c.cfg.node("order-1").unwrap()).unwrap();
    assert!(c.stop("order-1"));
    let db = rusqlite::Connection::open(dir.join("orders.sqlite")).unwrap();
    let changed = db
        .execute(
            "UPDATE orders SET title = 'Forged Title' WHERE request_id = ?1",
            [&victim],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    c.restart("order-1").await;
    let log = std::fs::read_to_string(c.dir.join("order-1.log")).unwrap();
    assert!(
        log.contains("DAMAGED DATA: 1 order(s) in the log do not match their checksums"),
        "it says an order is damaged:\n{log}"
    );
    assert!(
        !log.contains("the order log lost"),
        "a damaged order is not reported lost:\n{log}"
    );
    let page = c.order("order-1").log(1000, None).await.unwrap();
    assert!(
        page.orders.iter().all(|o| o.title != "Forged Title"),
        "the damaged order is never served: {page:?}"
    );
    assert_eq!(
        page.orders.len(),
        held.len() - 1,
        "every other order is still there"
    );
    let key = victim.strip_prefix("k:").unwrap();
    let again = c.frontend().buy("1", Some(key)).await.unwrap();
    assert_eq!(
        again.order_id, first[&victim],
        "a retry of the damaged order's buy is answered as before"
    );

    // A second start finds nothing more: the damaged row was set aside.
    assert!(c.stop("order-1"));
    let before = std::fs::read_to_string(c.dir.join("order-1.log"))
        .unwrap()
        .len();
    c.restart("order-1").await;
    let after = std::fs::read_to_string(c.dir.join("order-1.log")).unwrap()[before..].to_string();
    assert!(!after.contains("DAMAGED DATA"), "{after}");
}
