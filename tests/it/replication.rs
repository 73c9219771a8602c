//! Catalog replication with real processes: kill -9 the primary or a
//! backup during a stream of buys and reads; lose two of three replicas.

use crate::common;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::{Options, TestCluster, wait_until};
use pygmy::api::{BookId, CatalogOp, CatalogWrite, Outcome, RequestId, WriteResult};
use pygmy::client::FrontendClient;
use pygmy::config::Role;
use tokio::task::JoinHandle;

/// Clients buying book 1 and reading books 1..=7 through the frontend until
/// told to stop. Any error is client-visible, and fails the test.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    buyers: Vec<JoinHandle<Vec<u64>>>,
    readers: Vec<JoinHandle<u64>>,
}

impl Load {
    fn start(fe: FrontendClient, buyers: usize, readers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let buyers = (0..buyers)
            .map(|_| {
                let (fe, stop, acked) = (fe.clone(), stop.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let b = fe
                            .buy("1", None)
                            .await
                            .unwrap_or_else(|e| panic!("client-visible buy error: {e}"));
                        ids.push(b.order_id);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    ids
                })
            })
            .collect();
        let readers = (0..readers)
            .map(|r| {
                let (fe, stop) = (fe.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = (n + r as u64) % 7 + 1;
                        fe.lookup(&id.to_string())
                            .await
                            .unwrap_or_else(|e| panic!("client-visible lookup error: {e}"));
                        if n % 5 == 0 {
                            fe.search("graduate-school")
                                .await
                                .unwrap_or_else(|e| panic!("client-visible search error: {e}"));
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        Self {
            stop,
            acked,
            buyers,
            readers,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    async fn wait_for_more(&self, n: u64) {
        let target = self.acked() + n;
        let acked = self.acked.clone();
        wait_until(
            &format!("{n} more buys are acknowledged"),
            Duration::from_secs(30),
            || {
                let acked = acked.clone();
                async move { acked.load(Ordering::Relaxed) >= target }
            },
        )
        .await;
    }

    /// Stops the clients; returns the order ids acknowledged.
    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut ids = Vec::new();
        for b in self.buyers {
            ids.extend(b.await.unwrap());
        }
        for r in self.readers {
            assert!(r.await.unwrap() > 0, "a reader read nothing");
        }
        ids
    }
}

async fn role(c: &TestCluster, name: &str) -> Option<String> {
    c.catalog(name)
        .status()
        .await
        .ok()
        .map(|s| s.role.to_string())
}

/// Waits until every running catalog replica has applied the same version
/// and holds the same stock of every book.
async fn converged(c: &TestCluster) {
    let names: Vec<String> = c
        .names(pygmy::config::Role::Catalog)
        .into_iter()
        .filter(|n| c.is_running(n))
        .collect();
    let clients: Vec<_> = names.iter().map(|n| c.catalog(n)).collect();
    wait_until(
        "the catalog replicas converge",
        Duration::from_secs(30),
        || {
            let clients = clients.clone();
            async move {
                let mut states = Vec::new();
                for cl in &clients {
                    let Ok(s) = cl.status().await else {
                        return false;
                    };
                    let mut stocks = Vec::new();
                    for id in 1..=7 {
                        match cl.lookup(BookId::new(id).unwrap(), Some(s.applied)).await {
                            Ok(b) => stocks.push((b.stock, b.cost)),
                            Err(_) => return false,
                        }
                    }
                    states.push((s.applied, stocks));
                }
                states.windows(2).all(|w| w[0] == w[1])
            }
        },
    )
    .await;
}

fn exactly_once(ids: &[u64]) -> usize {
    let set: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(set.len(), ids.len(), "an order id was acknowledged twice");
    set.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_during_buys_is_hidden_from_clients_and_it_takes_primaryship_back_when_it_returns()
 {
    let mut c = TestCluster::start(Options::default()).await;
    // The highest process id is primary: at once, or — if another replica
    // started its election first — by taking over soon after.
    wait_until(
        "catalog-3, the highest process id, is primary",
        Duration::from_secs(30),
        || {
            let c3 = c.catalog("catalog-3");
            async move { c3.status().await.is_ok_and(|s| s.role == "primary") }
        },
    )
    .await;
    assert_eq!(c.primary().await, "catalog-3");
    c.set_stock(1, 1_000_000).await;
    let start = c.stock(1).await;
    let load = Load::start(c.frontend(), 4, 2);
    load.wait_for_more(30).await;

    c.kill9("catalog-3");
    load.wait_for_more(30).await;
    // Usually catalog-2 (the next-highest id campaigns first), but a voter
    // grants a lower id whose log is ahead of its own: catalog-1 wins when
    // the primary's last append reached it alone.
    let next = c.primary().await;
    assert!(
        next == "catalog-2" || next == "catalog-1",
        "a surviving replica serves writes, not {next}"
    );

    c.restart("catalog-3").await;
    wait_until(
        "catalog-3 catches up and takes primaryship back",
        Duration::from_secs(30),
        || {
            let c3 = c.catalog("catalog-3");
            async move { c3.status().await.is_ok_and(|s| s.role == "primary") }
        },
    )
    .await;
    load.wait_for_more(30).await;
    let ids = load.finish().await;

    let n = exactly_once(&ids);
    assert_eq!(
        c.stock(1).await,
        start - n as u64,
        "every acknowledged buy applied exactly once, none lost"
    );
    converged(&c).await;
    assert_eq!(role(&c, "catalog-2").await.as_deref(), Some("backup"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backup_during_buys_is_hidden_from_clients_and_it_catches_up_when_it_returns() {
    let mut c = TestCluster::start(Options::default()).await;
    c.set_stock(1, 1_000_000).await;
    let start = c.stock(1).await;
    let load = Load::start(c.frontend(), 4, 2);
    load.wait_for_more(30).await;

    c.kill9("catalog-1");
    load.wait_for_more(50).await;
    assert_eq!(
        c.primary().await,
        "catalog-3",
        "a backup's crash does not move the primary"
    );

    c.restart("catalog-1").await;
    load.wait_for_more(30).await;
    let ids = load.finish().await;

    let n = exactly_once(&ids);
    assert_eq!(c.stock(1).await, start - n as u64);
    converged(&c).await;
    let s = c.catalog("catalog-3").status().await.unwrap();
    wait_until(
        "catalog-1 is back in the primary's view",
        Duration::from_secs(30),
        || {
            let c3 = c.catalog("catalog-3");
            async move {
                c3.status()
                    .await
                    .is_ok_and(|s| s.view.contains(&"catalog-1".to_string()))
            }
        },
    )
    .await;
    assert_eq!(s.role, "primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_majority_writes_answer_503_reads_last_until_the_lease_and_all_resumes_when_one_returns()
 {
    let mut c = TestCluster::start(Options {
        // A lease long enough that "right after the crash" is surely within it.
        tweak: |cfg| {
            cfg.timing.lease_ms = 3_000;
            cfg.timing.election_timeout_ms = 3_000;
            cfg.timing.retry_budget_ms = 12_000;
            cfg.timing.takeover_after_ms = 6_000;
        },
        ..Options::default()
    })
    .await;
    c.frontend().buy("2", None).await.unwrap();
    let before = c.stock(2).await;
    let survivor = c.catalog("catalog-1");
    // catalog-1 holds a lease from the primary.
    wait_until("catalog-1 serves reads", Duration::from_secs(30), || {
        let s = survivor.clone();
        async move { s.lookup(BookId::new(2).unwrap(), None).await.is_ok() }
    })
    .await;

    c.kill9("catalog-3");
    c.kill9("catalog-2");
    // Reads keep working while its lease lasts…
    assert_eq!(
        survivor
            .lookup(BookId::new(2).unwrap(), None)
            .await
            .unwrap()
            .stock,
        before
    );
    // …and stop once it has run out; writes never go through.
    wait_until(
        "catalog-1's lease runs out",
        Duration::from_secs(30),
        || {
            let s = survivor.clone();
            async move {
                s.lookup(BookId::new(2).unwrap(), None)
                    .await
                    .is_err_and(|e| e.status() == Some(503))
            }
        },
    )
    .await;
    let w = CatalogWrite {
        request_id: RequestId::parse("r:no-majority").unwrap(),
        op: CatalogOp::Buy {
            book_id: BookId::new(2).unwrap(),
        },
    };
    let err = survivor.write(&w).await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    // The original's admin route, which a live backup would forward: no
    // live primary to forward to, so 503 with Retry-After.
    let res = reqwest::Client::new()
        .put(format!("{}/catalog/update", c.url("catalog-1")))
        .bearer_auth(&c.cfg.token)
        .json(&serde_json::json!({"id": 2, "stock": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 503);
    assert!(
        res.headers().contains_key("retry-after"),
        "503 without Retry-After"
    );

    // One replica returns: a majority again; writes and reads resume.
    c.restart("catalog-2").await;
    let bought = c.frontend().buy("2", Some("after-majority")).await.unwrap();
    assert_eq!(bought.book_id.get(), 2);
    assert_eq!(
        c.stock(2).await,
        before - 1,
        "the refused write did not happen"
    );
    c.restart("catalog-3").await;
    converged(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_forwards_writes_to_the_primary_once_and_relays_the_answer() {
    let c = TestCluster::start(Options::default()).await;
    let primary = c.primary().await;
    let backup = c.catalogs_but(&primary).remove(0);
    let book = BookId::new(3).unwrap();

    // The original's admin route at a backup, as the README shows it.
    let res = reqwest::Client::new()
        .put(format!("{}/catalog/update", c.url(&backup)))
        .bearer_auth(&c.cfg.token)
        .header("Content-Type", "application/json")
        .body(r#"{"id": 3, "stock": 50, "cost": 99.5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status().as_u16(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let b = c.book(3).await;
    assert_eq!(
        (b.stock, b.cost.cents()),
        (50, 9950),
        "the primary applied the forwarded update"
    );

    // An internal write at a backup is forwarded too, and answered as the primary answered.
    let w = CatalogWrite {
        request_id: RequestId::parse("r:forwarded-buy").unwrap(),
        op: CatalogOp::Buy { book_id: book },
    };
    let res = reqwest::Client::new()
        .post(format!("{}/internal/write", c.url(&backup)))
        .bearer_auth(&c.cfg.token)
        .json(&w)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let first: WriteResult = res.json().await.unwrap();
    assert!(matches!(first.outcome, Outcome::Bought { .. }), "{first:?}");
    assert_eq!(c.stock(3).await, 49);
    // The same request id again, straight at the primary: the first answer, nothing more bought.
    let again = c.catalog(&primary).write(&w).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(c.stock(3).await, 49);

    // A write marked as not to be forwarded (as a forwarded one is) is not
    // forwarded again: 421 naming the primary, and nothing happens.
    let w2 = CatalogWrite {
        request_id: RequestId::parse("r:not-forwarded").unwrap(),
        op: CatalogOp::Buy { book_id: book },
    };
    match c.catalog(&backup).write(&w2).await {
        Err(pygmy::client::ClientError::Status {
            status: 421,
            primary: Some(p),
            ..
        }) => assert_eq!(p, primary),
        other => panic!("expected 421 naming {primary}: {other:?}"),
    }
    assert_eq!(c.stock(3).await, 49, "a write refused with 421 did nothing");
}

/// (id, title, stock) of books 1..=4 as `replica` holds them (None: unknown).
async fn catalog_of(c: &TestCluster, replica: &str) -> Option<Vec<Option<(u64, String, u64)>>> {
    let r = c.catalog(replica);
    let mut out = Vec::new();
    for id in 1..=4 {
        match r.lookup(BookId::new(id).unwrap(), None).await {
            Ok(b) => out.push(Some((id, b.title, b.stock))),
            Err(e) if e.status() == Some(404) => out.push(None),
            Err(_) => return None,
        }
    }
    Some(out)
}

/// Polls `replica`'s catalog until `done` holds of it (30 s at most).
async fn catalog_when(
    c: &TestCluster,
    replica: &str,
    done: impl Fn(&[Option<(u64, String, u64)>]) -> bool,
) -> Vec<Option<(u64, String, u64)>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held = catalog_of(c, replica).await;
        if let Some(h) = held
            && done(&h)
        {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{replica}'s catalog: {:?}",
            catalog_of(c, replica).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_given_different_catalog_files_all_hold_the_founding_catalog() {
    let dir = common::temp_dir("catalog-files");
    let file = |name: &str, books: &[(u64, &str, u64)]| {
        let list: Vec<_> = books
            .iter()
            .map(|(id, title, stock)| serde_json::json!({"id": id, "title": title, "topic": "test books", "cost": 1.5, "stock": stock}))
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
        path.to_str().unwrap().to_string()
    };
    let a = file(
        "a.json",
        &[(1, "A one", 11), (2, "A two", 12), (3, "A three", 13)],
    );
    let b = file(
        "b.json",
        &[(1, "B one", 21), (2, "B two", 22), (4, "B four", 24)],
    );
    let env = |node: &str, f: &str| {
        (
            node.to_string(),
            "PYGMY_CATALOG_FILE".to_string(),
            f.to_string(),
        )
    };
    let mut c = TestCluster::start(Options {
        env: vec![
            env("catalog-1", &b),
            env("catalog-2", &a),
            env("catalog-3", &a),
        ],
        ..Options::default()
    })
    .await;
    let expect_a = vec![
        Some((1, "A one".to_string(), 11)),
        Some((2, "A two".to_string(), 12)),
        Some((3, "A three".to_string(), 13)),
        None,
    ];
    // Every replica holds the founding primary's catalog (catalog-3's file).
    for r in c.names(Role::Catalog) {
        assert_eq!(
            catalog_when(&c, &r, |_| true).await,
            expect_a,
            "{r}'s catalog"
        );
    }
    // A replacement disk for catalog-1, still given the other file, learns
    // the catalog from the log too.
    c.kill9("catalog-1");
    std::fs::remove_dir_all(c.dir.join("catalog-1")).unwrap();
    c.restart("catalog-1").await;
    c.frontend()
        .buy("2", Some("after-replacement"))
        .await
        .unwrap();
    let held = catalog_when(&c, "catalog-1", |h| {
        h[1].as_ref().is_some_and(|b| b.2 == 11)
    })
    .await;
    let mut expect = expect_a.clone();
    expect[1] = Some((2, "A two".to_string(), 11));
    assert_eq!(held, expect);
}

fn incarnation(dir: &std::path::Path) -> u64 {
    let id: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("identity.json")).unwrap()).unwrap();
    id["incarnation"].as_u64().unwrap()
}

/// `cp -a`, the way an operator takes and restores a cold backup.
fn cp_a(from: &std::path::Path, to: &std::path::Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

/// A backup whose data directory is put back to an older copy of itself
/// (a restored backup) has forgotten buys it acknowledged and votes it
/// cast. It rejoins as a learner under a new incarnation: while the
/// primary is down it is no voter (the other backup cannot be elected with
/// it), and once a primary is back it catches up and becomes a backup
/// again; nothing acknowledged is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_from_an_old_copy_rejoins_as_a_learner_and_never_votes_before_it_caught_up()
 {
    let mut c = TestCluster::start(Options::default()).await;
    c.set_stock(1, 1_000_000).await;
    let start = c.stock(1).await;
    let dir = c.cfg.data_dir(c.cfg.node("catalog-1").unwrap()).unwrap();
    let backup = c.dir.join("catalog-1-backup");
    assert!(c.stop("catalog-1"));
    cp_a(&dir, &backup);
    c.restart("catalog-1").await;
    let inc = incarnation(&dir);

    // Buys after the backup was taken: the copy lacks them.
    let load = Load::start(c.frontend(), 4, 1);
    load.wait_for_more(60).await;
    let ids = load.finish().await;
    let n = exactly_once(&ids);
    converged(&c).await;

    // Restore the old copy while the primary is down too.
    assert!(c.stop("catalog-1"));
    assert!(c.stop("catalog-3"));
    std::fs::remove_dir_all(&dir).unwrap();
    cp_a(&backup, &dir);
    c.restart("catalog-1").await;
    assert!(
        incarnation(&dir) > inc,
        "a restored copy gets a new incarnation"
    );
    wait_until(
        "catalog-1 is a learner",
        Duration::from_secs(10),
        || async { role(&c, "catalog-1").await.as_deref() == Some("learner") },
    )
    .await;
    let log = std::fs::read_to_string(c.dir.join("catalog-1.log")).unwrap();
    assert!(
        log.contains("restored from a copy"),
        "the restore is logged:\n{log}"
    );
    // catalog-2 holds every buy and would win an election with one more
    // vote: the learner's must not count. Watch several election timeouts.
    let watch = Duration::from_millis(6 * c.cfg.timing.election_timeout_ms.max(200));
    let until = std::time::Instant::now() + watch;
    while std::time::Instant::now() < until {
        assert_ne!(
            role(&c, "catalog-2").await.as_deref(),
            Some("primary"),
            "catalog-2 was elected with a restored copy's vote"
        );
        assert_eq!(role(&c, "catalog-1").await.as_deref(), Some("learner"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The primary returns: the copy catches up and becomes a backup again.
    c.restart("catalog-3").await;
    wait_until(
        "catalog-1 caught up and is a backup again",
        Duration::from_secs(30),
        || async { role(&c, "catalog-1").await.as_deref() == Some("backup") },
    )
    .await;
    converged(&c).await;
    assert_eq!(c.stock(1).await, start - n as u64, "no buy lost or doubled");
}

/// A catalog database emptied (or deleted) next to its `identity.json`
/// lost what the replica acknowledged: the replica says so, takes a new
/// incarnation, is no member of the primary's view while it is a learner,
/// and catches up from the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_catalog_database_rejoins_under_a_new_incarnation_and_catches_up() {
    damaged_backup_rejoins(
        |dir| {
            // Emptied in place (same file), its write-ahead log gone.
            std::fs::File::create(dir.join("catalog.sqlite")).unwrap();
            for f in ["catalog.sqlite-wal", "catalog.sqlite-shm"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        },
        false,
        "its data was lost",
    )
    .await;
}

/// Waits until catalog-1 has taken a new incarnation (newer than `inc`)
/// and its log says `needle` (it answers health checks while it still
/// opens its disk).
async fn said_so(c: &TestCluster, dir: &std::path::Path, inc: u64, needle: &str) {
    let log = || std::fs::read_to_string(c.dir.join("catalog-1.log")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(incarnation(dir) > inc && log().contains(needle)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new incarnation and {needle:?} in:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Catches a catalog replica that `damage` harmed while it was down: it
/// says `needle`, takes a new incarnation, and catches up as a backup,
/// with no buy lost or doubled.
async fn damaged_backup_rejoins(damage: impl FnOnce(&std::path::Path), kill: bool, needle: &str) {
    damaged_backup_rejoins_after(0, damage, kill, needle).await;
}

/// `damaged_backup_rejoins`, after `writes` more buys straight at the
/// primary (enough, say, for every replica to have taken a snapshot).
/// From the restart until the end, every replica's answers are watched:
/// two answers for a book at the same version must agree, so a replica
/// serving damaged data is caught.
async fn damaged_backup_rejoins_after(
    writes: u64,
    damage: impl FnOnce(&std::path::Path),
    kill: bool,
    needle: &str,
) {
    let mut c = TestCluster::start(Options::default()).await;
    c.set_stock(1, 1_000_000).await;
    c.set_stock(2, 1_000_000).await;
    let start = c.stock(1).await;
    let load = Load::start(c.frontend(), 4, 1);
    load.wait_for_more(40).await;
    let ids = load.finish().await;
    let mut n = exactly_once(&ids);
    n += buy_at_primary(&c, writes).await;
    let dir = c.cfg.data_dir(c.cfg.node("catalog-1").unwrap()).unwrap();
    let inc = incarnation(&dir);
    if kill {
        c.kill9("catalog-1");
    } else {
        assert!(c.stop("catalog-1"));
    }
    damage(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_answers(
        c.names(Role::Catalog)
            .iter()
            .map(|n| (n.clone(), c.catalog(n)))
            .collect(),
        stop.clone(),
    ));
    c.restart("catalog-1").await;
    said_so(&c, &dir, inc, needle).await;
    if std::fs::read_to_string(c.dir.join("catalog-1.log"))
        .unwrap()
        .contains("DAMAGED DATA")
    {
        let kept = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("catalog.sqlite.damaged-")
            });
        assert!(kept, "the damaged database is kept for inspection");
    }
    wait_until(
        "catalog-1 caught up and is a backup in the primary's view",
        Duration::from_secs(30),
        || async {
            let view = c.catalog("catalog-3").status().await.map(|s| s.view);
            role(&c, "catalog-1").await.as_deref() == Some("backup")
                && view.is_ok_and(|v| v.contains(&"catalog-1".to_string()))
        },
    )
    .await;
    converged(&c).await;
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await.unwrap();
    assert!(seen > 0, "the watcher saw answers");
    assert_eq!(c.stock(1).await, start - n as u64, "no buy lost or doubled");
}

/// `writes` keyless buys of book 1 straight at the primary, 32 at a time;
/// returns how many bought.
async fn buy_at_primary(c: &TestCluster, writes: u64) -> usize {
    let catalogs = c.catalogs();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..32 {
        let catalogs = catalogs.clone();
        tasks.spawn(async move {
            let mut bought = 0;
            for _ in (w..writes).step_by(32) {
                let write = CatalogWrite {
                    request_id: RequestId::mint(),
                    op: CatalogOp::Buy {
                        book_id: BookId::new(1).unwrap(),
                    },
                };
                let r = common::write_at_primary(&catalogs, &write).await;
                assert!(matches!(r.outcome, Outcome::Bought { .. }));
                bought += 1;
            }
            bought
        });
    }
    let mut n = 0;
    while let Some(b) = tasks.join_next().await {
        n += b.unwrap();
    }
    n
}

/// Damage no checksum can see (a book's row changed together with its
/// checksum, as only a bug or a deliberate edit could): the replica's
/// state digest at the next checkpoint differs from what both other
/// replicas agree on, so it stops serving, says so, and rebuilds from the
/// primary under a new incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_state_digest_differs_from_the_majority_stops_serving_and_rebuilds() {
    let mut c = TestCluster::start(Options::default()).await;
    c.set_stock(1, 1_000_000).await;
    let dir = c.cfg.data_dir(c.cfg.node("catalog-1").unwrap()).unwrap();
    let inc = incarnation(&dir);
    assert!(c.stop("catalog-1"));
    {
        let db = rusqlite::Connection::open(dir.join("catalog.sqlite")).unwrap();
        let mut book = pygmy::catalog::seed::default_books()
            .into_iter()
            .find(|b| b.id.get() == 2)
            .unwrap();
        book.stock = db
            .query_row("SELECT stock FROM books WHERE id = 2", [], |r| r.get(0))
            .unwrap();
        book.stock += 9_000;
        let sum = pygmy::catalog::store::book_row_sum(&book);
        let changed = db
            .execute(
                "UPDATE books SET stock = ?1, sum = ?2 WHERE id = 2",
                rusqlite::params![book.stock as i64, sum],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }
    c.restart("catalog-1").await;
    // Enough writes for every replica to pass a digest checkpoint.
    buy_at_primary(&c, 2 * pygmy::catalog::store::DIGEST_EVERY).await;
    said_so(&c, &dir, inc, "state digest at version").await;
    wait_until(
        "catalog-1 rebuilt and is a backup in the primary's view",
        Duration::from_secs(30),
        || async {
            let view = c.catalog("catalog-3").status().await.map(|s| s.view);
            role(&c, "catalog-1").await.as_deref() == Some("backup")
                && view.is_ok_and(|v| v.contains(&"catalog-1".to_string()))
        },
    )
    .await;
    converged(&c).await;
    let id = BookId::new(2).unwrap();
    let good = c.catalog("catalog-3").lookup(id, None).await.unwrap();
    wait_until(
        "catalog-1 serves book 2 as the others do",
        Duration::from_secs(10),
        || async {
            c.catalog("catalog-1")
                .lookup(id, Some(good.version))
                .await
                .is_ok_and(|b| b.stock == good.stock)
        },
    )
    .await;
}

/// Reads every book from every replica until `stop`; panics if two
/// answers for a book at the same version differ, or a title is not one
/// the store has. Returns how many answers it saw.
async fn watch_answers(
    replicas: Vec<(String, pygmy::client::CatalogClient)>,
    stop: Arc<AtomicBool>,
) -> usize {
    let titles: HashSet<String> = pygmy::catalog::seed::default_books()
        .into_iter()
        .map(|b| b.title)
        .collect();
    let mut at: std::collections::HashMap<(u64, String), (String, u64, String)> =
        std::collections::HashMap::new();
    let mut seen = 0;
    while !stop.load(Ordering::Relaxed) {
        for (name, r) in &replicas {
            for id in 1..=7 {
                let Ok(b) = r.lookup(BookId::new(id).unwrap(), None).await else {
                    continue;
                };
                seen += 1;
                assert!(
                    titles.contains(&b.title),
                    "{name} served title {:?}",
                    b.title
                );
                let key = (id, b.version.to_string());
                let now = (b.title.clone(), b.stock, name.clone());
                let first = at.entry(key.clone()).or_insert_with(|| now.clone());
                assert!(
                    first.0 == now.0 && first.1 == now.1,
                    "book {id} at version {}: {} served {:?} stock {}, {} served {:?} stock {}",
                    key.1,
                    first.2,
                    first.0,
                    first.1,
                    now.2,
                    now.0,
                    now.1
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

/// Three bytes of a book's title changed inside a stopped backup's
/// database file (as the attack on the original did): the row no longer
/// matches its checksum, so the replica refuses its data at start-up,
/// sets it aside and rebuilds from the primary; nobody reads the damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_a_stopped_replicas_rows_is_refused_and_repaired() {
    damaged_backup_rejoins(
        |dir| {
            let path = dir.join("catalog.sqlite");
            let mut bytes = std::fs::read(&path).unwrap();
            let needle = b"RPCs for Dummies.";
            let mut flipped = 0;
            for i in 0..bytes.len() - needle.len() {
                if &bytes[i..i + needle.len()] == needle {
                    bytes[i + 14] = b'z';
                    flipped += 1;
                }
            }
            assert!(flipped > 0, "the title is in the file");
            std::fs::write(&path, bytes).unwrap();
        },
        false,
        "DAMAGED DATA",
    )
    .await;
}

/// A database file whose first page was overwritten: SQLite cannot open
/// it. It is set aside (kept for inspection) and the replica rebuilds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_sqlite_cannot_read_is_set_aside_and_rebuilt() {
    damaged_backup_rejoins(
        |dir| {
            let db = dir.join("catalog.sqlite");
            let mut bytes = std::fs::read(&db).unwrap();
            for b in bytes.iter_mut().take(4096) {
                *b = 0xA5;
            }
            std::fs::write(&db, &bytes).unwrap();
        },
        false,
        "SQLite finds the file damaged",
    )
    .await;
}

/// A log entry changed on disk (a buy of book 1 made a buy of book 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_log_entry_is_refused_and_repaired() {
    damaged_backup_rejoins(
        |dir| {
            let db = rusqlite::Connection::open(dir.join("catalog.sqlite")).unwrap();
            let changed = db
                .execute(
                    "UPDATE rlog SET op = replace(op, '\"book_id\":1', '\"book_id\":2')
                     WHERE seq = (SELECT max(seq) FROM rlog WHERE op LIKE '%\"book_id\":1%')",
                    [],
                )
                .unwrap();
            assert_eq!(changed, 1);
        },
        false,
        "DAMAGED DATA",
    )
    .await;
}

/// A byte flipped, after the log was compacted (10 000 writes), in a kept
/// answer: one of the rows a stopped replica's snapshot is rebuilt from at
/// start-up (the stored snapshot records only its version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_what_a_snapshot_is_rebuilt_from_is_refused_and_repaired() {
    damaged_backup_rejoins_after(
        10_500,
        |dir| {
            let db = rusqlite::Connection::open(dir.join("catalog.sqlite")).unwrap();
            let (seq, bytes): (i64, i64) = db
                .query_row(
                    "SELECT seq, length(data) FROM snapshot WHERE id = 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert!(seq > 0, "the log was compacted");
            assert_eq!(bytes, 0, "the snapshot's bytes are not stored");
            let changed = db
                .execute(
                    "UPDATE applied SET until = until + 1 WHERE rowid = (SELECT min(rowid) FROM applied)",
                    [],
                )
                .unwrap();
            assert_eq!(changed, 1);
        },
        false,
        "DAMAGED DATA",
    )
    .await;
}

/// Replicas restarted after compacting their logs (10 000 writes) rebuild
/// their snapshots from their tables: a backup killed while buys go on,
/// then the primary, each rejoins under the incarnation it had (nothing
/// was damaged) and every replica ends with the same stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_restarted_after_compacting_their_logs_rebuild_their_snapshots_and_rejoin() {
    let mut c = TestCluster::start(Options::default()).await;
    c.set_stock(1, 1_000_000).await;
    let start = c.stock(1).await;
    let mut n = buy_at_primary(&c, 10_500).await;
    for name in ["catalog-1", "catalog-3"] {
        let dir = c.cfg.data_dir(c.cfg.node(name).unwrap()).unwrap();
        let inc = incarnation(&dir);
        let path = c.dir.join(format!("{name}.log"));
        let log = || std::fs::read_to_string(&path).unwrap();
        assert!(log().contains("log compacted"), "{name} compacted its log");
        c.kill9(name);
        // Buys go on while it is down, so it comes back behind.
        let load = Load::start(c.frontend(), 4, 1);
        load.wait_for_more(40).await;
        n += exactly_once(&load.finish().await);
        c.restart(name).await;
        wait_until(
            &format!("{name} is back in the primary's view"),
            Duration::from_secs(30),
            || async {
                let mut views = Vec::new();
                for p in c.names(pygmy::config::Role::Catalog) {
                    if let Ok(s) = c.catalog(&p).status().await
                        && s.role == "primary"
                    {
                        views.push(s.view);
                    }
                }
                views.iter().any(|v| v.contains(&name.to_string()))
            },
        )
        .await;
        assert_eq!(incarnation(&dir), inc, "{name} found nothing damaged");
        assert!(!log().contains("DAMAGED DATA"), "{}", log());
        converged(&c).await;
    }
    assert_eq!(c.stock(1).await, start - n as u64, "no buy lost or doubled");
}

/// A write-ahead log deleted after a crash took committed transactions
/// with it: the replica must not answer as the disk that acknowledged them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_whose_write_ahead_log_went_missing_after_a_crash_rejoins_as_a_learner() {
    damaged_backup_rejoins(
        |dir| {
            assert!(
                dir.join("catalog.sqlite-wal").exists(),
                "a crashed SQLite database keeps its write-ahead log"
            );
            for f in ["catalog.sqlite-wal", "catalog.sqlite-shm"] {
                std::fs::remove_file(dir.join(f)).unwrap();
            }
        },
        true,
        "write-ahead log is missing after a stop that was not clean",
    )
    .await;
}

/// A replication log cut short from outside (its last entries deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_whose_replication_log_was_truncated_rejoins_as_a_learner() {
    damaged_backup_rejoins(
        |dir| {
            let db = rusqlite::Connection::open(dir.join("catalog.sqlite")).unwrap();
            let cut = db
                .execute(
                    "DELETE FROM rlog WHERE seq > (SELECT max(seq) - 5 FROM rlog)",
                    [],
                )
                .unwrap();
            assert_eq!(cut, 5);
        },
        false,
        "the replication log is damaged (it ends at",
    )
    .await;
}

/// A clean stop and start is not damage: same incarnation, no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_stopped_cleanly_restarts_as_the_same_replica() {
    let mut c = TestCluster::start(Options::default()).await;
    c.frontend().buy("1", None).await.unwrap();
    let dir = c.cfg.data_dir(c.cfg.node("catalog-1").unwrap()).unwrap();
    let inc = incarnation(&dir);
    assert!(c.stop("catalog-1"));
    assert!(
        !dir.join("catalog.sqlite-wal").exists(),
        "a clean stop closes the database (SQLite removes its write-ahead log)"
    );
    c.restart("catalog-1").await;
    c.kill9("catalog-1");
    c.restart("catalog-1").await;
    assert_eq!(incarnation(&dir), inc);
    let log = std::fs::read_to_string(c.dir.join("catalog-1.log")).unwrap();
    for word in [
        "write-ahead log is missing",
        "log is damaged",
        "data was lost",
    ] {
        assert!(!log.contains(word), "{word:?} after a clean stop:\n{log}");
    }
}

/// A backup that is down while the primary compacts its log past it would
/// need a snapshot, but could not take one: the primary builds none for it.
/// It asks instead, every few heartbeats, with an empty append at its
/// compacted base, until the backup answers; then it builds one, once, and
/// the backup catches up. In the backup's place meanwhile, a server that
/// answers everything 503 (as a replica still starting) counts the asks
/// and the chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_is_down_is_asked_and_sent_no_snapshot_until_it_answers() {
    let mut c = TestCluster::start(Options::default()).await;
    c.set_stock(1, 1_000_000).await;
    let primary = c.primary().await;
    let victim = c.catalogs_but(&primary).remove(0);
    c.kill9(&victim);
    let asks = Arc::new(AtomicU64::new(0));
    let chunks = Arc::new(AtomicU64::new(0));
    let (asked, sent) = (asks.clone(), chunks.clone());
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let (asked, sent) = (asked.clone(), sent.clone());
        async move {
            if let Ok(batch) = serde_json::from_slice::<serde_json::Value>(&body) {
                for m in batch["messages"].as_array().into_iter().flatten() {
                    let append = &m["body"]["Append"];
                    let at_base = append["prev"]["seq"].as_u64().is_some_and(|s| s >= 10_000);
                    if at_base && append["entries"].as_array().is_some_and(|e| e.is_empty()) {
                        asked.fetch_add(1, Ordering::Relaxed);
                    }
                    if m["body"]["SnapshotChunk"].is_object() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    });
    let listener = tokio::net::TcpListener::bind(&c.cfg.node(&victim).unwrap().addr)
        .await
        .unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // Past the snapshot threshold (10 000 entries): the primary compacts
    // its log beyond what the backup holds.
    let bought = buy_at_primary(&c, 10_500).await;
    let log_path = c.dir.join(format!("{primary}.log"));
    let log = || std::fs::read_to_string(&log_path).unwrap();
    wait_until(
        "the primary asks the backup again and again",
        Duration::from_secs(30),
        || async { asks.load(Ordering::Relaxed) >= 20 },
    )
    .await;
    assert!(log().contains("log compacted"), "the primary compacted");
    assert_eq!(
        chunks.load(Ordering::Relaxed),
        0,
        "a snapshot chunk went to a replica that never answered"
    );
    for said in ["snapshot taken", "sync sent"] {
        assert!(
            !log().contains(said),
            "{said:?} for a replica that never answered:\n{}",
            log()
        );
    }
    server.abort();
    let _ = server.await;

    // Back, it answers the next ask: one snapshot, and it catches up.
    c.restart(&victim).await;
    wait_until(
        "the backup caught up and is in the primary's view",
        Duration::from_secs(30),
        || async {
            let view = c.catalog(&primary).status().await.map(|s| s.view);
            role(&c, &victim).await.as_deref() == Some("backup")
                && view.is_ok_and(|v| v.contains(&victim))
        },
    )
    .await;
    converged(&c).await;
    let taken = log().matches("snapshot taken").count();
    assert_eq!(
        taken,
        1,
        "bytes built once, for the replica back:\n{}",
        log()
    );
    assert_eq!(c.stock(1).await, 1_000_000 - bought as u64);
}
