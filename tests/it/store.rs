//! The store end to end, with real processes on loopback.

use crate::common;
use std::collections::HashSet;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::common::{Options, TestCluster};
use pygmy::api::*;
use pygmy::client::ClientError;

fn status(e: ClientError) -> u16 {
    e.status()
        .unwrap_or_else(|| panic!("expected an HTTP error status, got {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_flows_search_lookup_buy_and_see_the_new_stock_through_the_cache() {
    let c = TestCluster::start(Options::default()).await;
    let fe = c.frontend();

    let ds = fe.search("distributed-systems").await.unwrap();
    let gs = fe.search("graduate-school").await.unwrap();
    assert_eq!(ds.items.len(), 4, "{ds:?}");
    assert_eq!(gs.items.len(), 3, "{gs:?}");
    assert_eq!(ds.items["RPCs for Dummies."].get(), 2);
    assert_eq!(gs.items["Spring in Pioneer Valley."].get(), 7);
    assert!(
        fe.search("cooking").await.unwrap().items.is_empty(),
        "unknown topic: 200, no items"
    );

    let book = fe.lookup("1").await.unwrap();
    assert_eq!(
        book.title,
        "How to get a good grade in 677 in 20 minutes a day."
    );
    assert_eq!(book.stock, 1000);
    assert_eq!(f64::from(book.cost), 1000.0);

    // The second lookup is a cache hit.
    let hits = c.cache_stats().await["hits"].as_u64().unwrap();
    assert_eq!(fe.lookup("1").await.unwrap().stock, 1000);
    assert_eq!(
        c.cache_stats().await["hits"].as_u64().unwrap(),
        hits + 1,
        "second lookup must hit the cache"
    );

    let bought = fe.buy("1", None).await.unwrap();
    assert_eq!(
        bought.message,
        "successfully purchased the book How to get a good grade in 677 in 20 minutes a day."
    );
    assert_eq!(bought.book_id.get(), 1);

    // At once, through the cache: the entry was invalidated before the buy answered.
    assert_eq!(fe.lookup("1").await.unwrap().stock, 999);
    assert_eq!(fe.lookup("1").await.unwrap().stock, 999);
    assert_eq!(c.stock(1).await, 999);

    // The order is in one order replica's log.
    assert_eq!(c.order_log_len().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_4xx_and_changes_nothing() {
    let c = TestCluster::start(Options::default()).await;
    let fe = c.frontend();
    let before = c.books().await;

    for id in [
        "abc",
        "0",
        "-1",
        "1.5",
        "99999999999999999999999",
        "%20",
        "1%2F2",
    ] {
        assert_eq!(status(fe.lookup(id).await.unwrap_err()), 400, "lookup {id}");
        assert_eq!(status(fe.buy(id, None).await.unwrap_err()), 400, "buy {id}");
    }
    assert_eq!(status(fe.lookup("4242").await.unwrap_err()), 404);
    assert_eq!(status(fe.buy("4242", None).await.unwrap_err()), 404);
    assert_eq!(status(fe.search("Bad%20Topic").await.unwrap_err()), 400);
    assert_eq!(status(fe.search("a--b").await.unwrap_err()), 400);
    assert!(fe.search("no-such-topic").await.unwrap().items.is_empty());
    assert_eq!(
        status(fe.buy("1", Some("has space")).await.unwrap_err()),
        400
    );

    let raw = reqwest::Client::new();
    let fe_url = c.url("frontend");
    let cat = c.url("catalog-1");
    let order = c.url("order-1");

    // Internal routes without or with a wrong token: 401.
    let update = serde_json::json!({"id": 1, "stock": 0});
    for token in [None, Some("wrong-token-wrong-token")] {
        let mut reqs = vec![
            raw.put(format!("{cat}/catalog/update")).json(&update),
            raw.post(format!("{cat}/internal/write"))
                .json(&serde_json::json!({"request_id": "x", "op": "buy", "book_id": 1})),
            raw.get(format!("{cat}/lookup/1")),
            raw.post(format!("{order}/internal/buy"))
                .json(&serde_json::json!({"book_id": 1, "request_id": "x"})),
            raw.get(format!("{order}/log")),
            raw.post(format!("{fe_url}/internal/invalidate"))
                .json(&serde_json::json!({"epoch": 99, "seq": 0, "items": []})),
        ];
        for r in reqs.drain(..) {
            let r = match token {
                Some(t) => r.bearer_auth(t),
                None => r,
            };
            let res = r.send().await.unwrap();
            assert_eq!(res.status().as_u16(), 401, "{:?}", res.url());
        }
    }

    // Oversized and malformed bodies on the admin route, with the token.
    let auth = format!("Bearer {}", c.cfg.token);
    let huge = format!(
        "{{\"id\": 1, \"stock\": 0, \"pad\": \"{}\"}}",
        "x".repeat(1 << 20)
    );
    // The server answers 413 as soon as it knows, and closes the connection:
    // the client sees either that answer or the connection closed while it
    // was still sending.
    match raw
        .put(format!("{cat}/catalog/update"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
    {
        Ok(res) => assert_eq!(res.status().as_u16(), 413),
        Err(e) => assert!(e.is_request() && !e.is_timeout(), "oversized body: {e:?}"),
    }
    for body in [
        "{",
        "[]",
        "{\"id\": 0, \"stock\": 1}",
        "{\"id\": 1, \"stock\": -1}",
        "{\"id\": 1}",
        "{\"id\": 1, \"cost\": 0.001}",
        "{\"id\": 1, \"stock\": 1, \"evil\": 1}",
    ] {
        let res = raw
            .put(format!("{cat}/catalog/update"))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 400, "{body}");
        let msg: ErrorBody = res.json().await.unwrap();
        assert!(!msg.message.is_empty());
    }
    let res = raw
        .put(format!("{cat}/catalog/update"))
        .header("authorization", &auth)
        .body("{\"id\": 1, \"stock\": 0}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 415, "missing content type");
    let res = raw.delete(format!("{fe_url}/buy/1")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 405);

    assert_eq!(
        c.books()
            .await
            .into_iter()
            .map(|b| (b.id, b.stock, b.cost))
            .collect::<Vec<_>>(),
        before
            .into_iter()
            .map(|b| (b.id, b.stock, b.cost))
            .collect::<Vec<_>>(),
        "bad input changed the store"
    );
    assert_eq!(c.order_log_len().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_buys_of_a_book_with_stock_ten_sell_exactly_ten() {
    let c = TestCluster::start(Options::default()).await;
    c.set_stock(3, 10).await;
    let fe = c.frontend();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let fe = fe.clone();
            tokio::spawn(async move { fe.buy("3", None).await })
        })
        .collect();
    let mut sold = 0;
    let mut out_of_stock = 0;
    let mut orders = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(b) => {
                sold += 1;
                assert!(
                    orders.insert(b.order_id),
                    "order id {} given twice",
                    b.order_id
                );
            }
            Err(e) => {
                assert_eq!(status(e), 409);
                out_of_stock += 1;
            }
        }
    }
    assert_eq!((sold, out_of_stock), (10, 40));
    assert_eq!(c.stock(3).await, 0);
    assert_eq!(fe.lookup("3").await.unwrap().stock, 0);
    assert_eq!(status(fe.buy("3", None).await.unwrap_err()), 409);
}

/// Buys that reach the catalog primary while others are in flight wait for
/// those, then are proposed together. Each is still applied once.
///
/// A first buy is held in flight: one backup is paused, so the buy cannot
/// commit until that backup's lease has surely run out. Meanwhile 32
/// writers each send 4 buys in turn straight to the primary (past the
/// batching of the tiers in front, so they arrive one request each), each
/// buy twice at once with its request id; at least the first turn's reach
/// the primary while the held buy is in flight. That makes 129 orders,
/// each request id one order id, and the stock falls by 129.
///
/// Without the hold, the writers' requests could all reach the primary on
/// the turn its driver took the first of them, turn after turn, and go in
/// one step without ever waiting: whether any waited was up to timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buys_arriving_together_are_proposed_together_and_each_applied_once() {
    let c = TestCluster::start(Options::default()).await;
    c.set_stock(5, 1000).await;
    let primary = c.primary().await;
    let groups = c.metric(&primary, "pygmy_catalog_write_groups_total").await;
    let queued = c
        .metric(&primary, "pygmy_catalog_writes_queued_total")
        .await;
    let buy = |key: &str| CatalogWrite {
        request_id: RequestId::parse(key).unwrap(),
        op: CatalogOp::Buy {
            book_id: BookId::new(5).unwrap(),
        },
    };
    let order = |key: &str, r: Result<WriteResult, ClientError>| match r {
        Ok(WriteResult {
            outcome: Outcome::Bought { order_id, .. },
            ..
        }) => order_id,
        other => panic!("{key}: {other:?}"),
    };

    // The held buy: in flight at the primary (its task running there)
    // until the paused backup's lease has run out.
    let paused = c.catalogs_but(&primary)[0].clone();
    c.signal(&paused, libc::SIGSTOP);
    let held = {
        let at = c.catalog(&primary);
        tokio::spawn(async move { at.write(&buy("k:together-held")).await })
    };
    common::wait_until(
        "the held buy runs at the primary",
        Duration::from_secs(10),
        || async { c.metric(&primary, "pygmy_work_running").await >= 1.0 },
    )
    .await;

    let tasks: Vec<_> = (0..32)
        .map(|writer| {
            let at = c.catalog(&primary);
            tokio::spawn(async move {
                let mut orders = Vec::new();
                for turn in 0..4 {
                    let key = format!("k:together-{writer}-{turn}");
                    let w = buy(&key);
                    let (one, two) = tokio::join!(at.write(&w), at.write(&w));
                    let (one, two) = (order(&key, one), order(&key, two));
                    assert_eq!(one, two, "{key} got two order ids");
                    orders.push(one);
                }
                orders
            })
        })
        .collect();
    let mut ids = HashSet::new();
    ids.insert(order("k:together-held", held.await.unwrap()));
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    c.signal(&paused, libc::SIGCONT);
    assert_eq!(ids.len(), 129, "one order per request id");
    assert_eq!(c.stock(5).await, 1000 - 129);
    let groups = c.metric(&primary, "pygmy_catalog_write_groups_total").await - groups;
    let queued = c
        .metric(&primary, "pygmy_catalog_writes_queued_total")
        .await
        - queued;
    assert!(
        groups >= 1.0 && queued > groups,
        "some buys waited and went together: {queued} writes in {groups} groups"
    );
    eprintln!("{queued} writes waited, in {groups} groups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_replica_killed_during_a_stream_of_buys_is_invisible_to_clients() {
    let mut c = TestCluster::start(Options::default()).await;
    let fe = c.frontend();
    c.set_stock(5, 1_000_000).await;
    let start = c.stock(5).await;
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let fe = fe.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..60 {
                    let b = fe.buy("5", None).await.expect("no client-visible error");
                    ids.push(b.order_id);
                }
                ids
            })
        })
        .collect();
    // Kill order-2 once buys are flowing through it.
    let o2 = c.order("order-2");
    common::wait_until("order-2 has handled buys", Duration::from_secs(30), || {
        let o2 = o2.clone();
        async move { o2.log(1, None).await.is_ok_and(|p| !p.orders.is_empty()) }
    })
    .await;
    c.kill9("order-2");
    let mut all = HashSet::new();
    for s in streams {
        for id in s.await.unwrap() {
            assert!(all.insert(id), "order id {id} twice");
        }
    }
    assert_eq!(all.len(), 240);
    assert_eq!(
        c.stock(5).await,
        start - 240,
        "every acknowledged buy applied exactly once"
    );
}

/// A retry is answered from the order replica's own log, even with every
/// catalog replica down; a first attempt with a freshly minted id skips the
/// log (none can hold it) and goes to the catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_replica_answers_a_retry_from_its_log_and_sends_a_fresh_id_to_the_catalog() {
    let mut c = TestCluster::start(Options {
        tweak: |cfg| {
            cfg.timing.call_timeout_ms = 1000;
            cfg.timing.retry_budget_ms = 1500;
        },
        ..Options::default()
    })
    .await;
    let order = c.order("order-1");
    let req = OrderBuyRequest {
        book_id: BookId::new(4).unwrap(),
        request_id: RequestId::mint(),
        fresh: true,
    };
    let first = order.buy(&req).await.unwrap();
    assert!(matches!(first.outcome, Outcome::Bought { .. }), "{first:?}");
    for name in c.names(pygmy::config::Role::Catalog) {
        c.kill9(&name);
    }
    let retry = OrderBuyRequest {
        fresh: false,
        ..req.clone()
    };
    assert_eq!(
        order.buy(&retry).await.unwrap(),
        first,
        "a retry is answered from the log, catalog or not"
    );
    let err = order.buy(&req).await.unwrap_err();
    assert_eq!(
        status(err),
        503,
        "a fresh id is not looked up: it needs the catalog"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buy_retried_with_the_same_idempotency_key_buys_once_even_after_a_frontend_restart() {
    let mut c = TestCluster::start(Options::default()).await;
    let start = c.stock(2).await;
    let first = c.frontend().buy("2", Some("order-abc-123")).await.unwrap();
    let again = c.frontend().buy("2", Some("order-abc-123")).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(c.stock(2).await, start - 1);

    assert!(c.stop("frontend"), "frontend stops cleanly on SIGTERM");
    c.restart("frontend").await;
    let after_restart = c.frontend().buy("2", Some("order-abc-123")).await.unwrap();
    assert_eq!(after_restart.order_id, first.order_id);
    assert_eq!(c.stock(2).await, start - 1, "the retry bought nothing more");

    // The same key for another book is refused, and buys nothing.
    assert_eq!(
        status(
            c.frontend()
                .buy("3", Some("order-abc-123"))
                .await
                .unwrap_err()
        ),
        422
    );
    // A different key buys again.
    c.frontend().buy("2", Some("order-abc-124")).await.unwrap();
    assert_eq!(c.stock(2).await, start - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_racing_a_buy_never_leaves_a_stale_stock_cached() {
    let c = TestCluster::start(Options::default()).await;
    let fe = c.frontend();
    for round in 0..150 {
        // The buy before makes the racing lookup a miss that fills the cache.
        let (a, b) = tokio::join!(fe.lookup("4"), fe.buy("4", None));
        a.unwrap();
        b.unwrap();
        let truth = c.stock(4).await;
        let seen = fe.lookup("4").await.unwrap().stock;
        assert_eq!(
            seen, truth,
            "round {round}: cache serves stock {seen}, the catalog has {truth}"
        );
    }
    let stats = c.cache_stats().await;
    assert!(
        stats["hits"].as_u64().unwrap() > 0,
        "the cache was in use: {stats}"
    );
}

/// Sends 288 buys of `book`, each given up after 0 to 8 ms by its client,
/// which closes its connection: the frontend, the order replica and the
/// catalog each see their part of the request dropped, wherever it was.
/// Returns how many the client gave up on.
async fn abandon_buys(c: &TestCluster, book: u64) -> u32 {
    let url = format!("{}/buy/{book}", c.url("frontend"));
    let mut abandoned = 0;
    for round in 0..6u64 {
        let mut buys = JoinSet::new();
        for i in 0..48u64 {
            let give_up = Duration::from_micros((round * 48 + i) * 997 % 8_000);
            let client = reqwest::Client::builder().timeout(give_up).build().unwrap();
            let url = url.clone();
            buys.spawn(async move { client.post(url).send().await.is_err() });
        }
        while let Some(gave_up) = buys.join_next().await {
            abandoned += gave_up.unwrap() as u32;
        }
    }
    assert!(abandoned > 0, "no buy was abandoned");
    abandoned
}

/// The catalog's part of a buy had told every cache that a write of the
/// book began: dropped before telling them it ended (the write still
/// committed), the caches kept the book pending and never cached it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buys_their_clients_abandon_leave_the_book_cached_again() {
    let c = TestCluster::start(Options::default()).await;
    let fe = c.frontend();
    abandon_buys(&c, 5).await;
    // Once what was left of them is done, a lookup fills the cache and the
    // next one is a hit.
    common::wait_until(
        "a lookup of the book hits the cache",
        Duration::from_secs(10),
        || {
            let (c, fe) = (&c, &fe);
            async move {
                fe.lookup("5").await.unwrap();
                let hits = c.cache_stats().await["hits"].as_u64().unwrap();
                fe.lookup("5").await.unwrap();
                c.cache_stats().await["hits"].as_u64().unwrap() > hits
            }
        },
    )
    .await;
    // And what it serves is the catalog's stock.
    assert_eq!(fe.lookup("5").await.unwrap().stock, c.stock(5).await);
}

/// The order replica's part of a buy, dropped while the catalog committed
/// the write or before the order was logged, left a sold book in no order
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_buy_the_catalog_committed_is_in_an_order_log_though_its_client_gave_up() {
    let c = TestCluster::start(Options::default()).await;
    let before = c.stock(6).await;
    abandon_buys(&c, 6).await;
    common::wait_until(
        "every sold copy is in an order log",
        Duration::from_secs(10),
        || {
            let c = &c;
            async move {
                let sold = before - c.stock(6).await;
                sold > 0 && c.order_log_len().await as u64 == sold
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_without_cache_serves_every_read_from_the_catalog() {
    let c = TestCluster::start(Options {
        no_cache: true,
        ..Options::default()
    })
    .await;
    let fe = c.frontend();
    for _ in 0..3 {
        assert_eq!(fe.lookup("6").await.unwrap().stock, 1000);
    }
    fe.buy("6", None).await.unwrap();
    assert_eq!(fe.lookup("6").await.unwrap().stock, 999);
    let stats = c.cache_stats().await;
    assert_eq!(stats["enabled"], false);
    assert_eq!(stats["hits"], 0);
}

/// Lookups that miss the cache at the same time go to the catalog in
/// batches: every one of them is counted in a batch, and each still gets
/// its own book (or its own 404), as the catalog has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uncached_lookups_each_get_their_own_book_through_batches() {
    let c = TestCluster::start(Options {
        no_cache: true,
        ..Options::default()
    })
    .await;
    let truth: std::collections::HashMap<u64, LookupResponse> = c
        .books()
        .await
        .into_iter()
        .map(|b| (b.id.get(), b))
        .collect();
    let before = c.metric("frontend", "pygmy_lookups_batched_total").await;
    let fe = c.frontend();
    let asks: Vec<u64> = (0..240u64).map(|i| 1 + i % 9).collect();
    let mut tasks = JoinSet::new();
    for &id in &asks {
        let fe = fe.clone();
        tasks.spawn(async move { (id, fe.lookup(&id.to_string()).await) });
    }
    for (id, answer) in tasks.join_all().await {
        match (truth.get(&id), answer) {
            (Some(book), Ok(got)) => {
                assert_eq!(got.id, book.id, "asked for book {id}");
                assert_eq!(
                    (&got.title, &got.topic, got.cost),
                    (&book.title, &book.topic, book.cost),
                    "book {id}"
                );
            }
            (None, Err(e)) => assert_eq!(status(e), 404, "book {id} does not exist"),
            (want, got) => {
                panic!("book {id}: the catalog has {want:?}, the frontend answered {got:?}")
            }
        }
    }
    let batched = c.metric("frontend", "pygmy_lookups_batched_total").await - before;
    let batches = c.metric("frontend", "pygmy_lookup_batches_total").await;
    assert_eq!(batched, asks.len() as f64, "every miss went out in a batch");
    eprintln!("{batched} lookups in {batches} batches");
}

/// The batches (buys, then writes) a frontend and the order replicas have
/// sent, and the buys (writes) in them.
async fn batches_sent(c: &TestCluster) -> [(f64, f64); 2] {
    let mut sent = [(0.0, 0.0); 2];
    for f in c.names(pygmy::config::Role::Frontend) {
        sent[0].0 += c.metric(&f, "pygmy_buy_batches_total").await;
        sent[0].1 += c.metric(&f, "pygmy_buys_batched_total").await;
    }
    for o in c.names(pygmy::config::Role::Order) {
        sent[1].0 += c.metric(&o, "pygmy_write_batches_total").await;
        sent[1].1 += c.metric(&o, "pygmy_writes_batched_total").await;
    }
    sent
}

/// Buys that reach a frontend while its earlier batches are out go to an
/// order replica together, and those that reach an order replica while its
/// earlier batches are out go to the catalog primary together, each
/// handled as if sent alone: at both tiers every buy is counted in a batch
/// and some batches hold several; each buy gets an order of its own, and
/// the stock falls by exactly the buys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_buys_reach_the_order_replicas_and_the_catalog_in_batches_and_each_buys_once() {
    let c = TestCluster::start(Options::default()).await;
    c.set_stock(3, 500).await;
    let before = batches_sent(&c).await;
    let fe = c.frontend();
    let n = 150;
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let fe = fe.clone();
        tasks.spawn(async move { fe.buy("3", None).await });
    }
    let mut ids = HashSet::new();
    for r in tasks.join_all().await {
        let r = r.expect("every buy succeeds");
        assert_eq!(r.book_id.get(), 3);
        assert!(
            ids.insert(r.order_id),
            "order {} answered twice",
            r.order_id
        );
    }
    let after = batches_sent(&c).await;
    for (tier, (b, a)) in ["frontend", "order"].iter().zip(before.iter().zip(after)) {
        let (batches, batched) = (a.0 - b.0, a.1 - b.1);
        assert!(
            batched >= n as f64,
            "{tier}: every buy went out in a batch: {batched} of {n}"
        );
        assert!(
            batches < batched,
            "{tier}: some batch held several buys: {batched} in {batches}"
        );
        eprintln!("{tier}: {batched} buys in {batches} batches");
    }
    assert_eq!(c.stock(3).await, 500 - n as u64);
    assert_eq!(c.order_log_len().await, n);
}

/// `POST /internal/buys` at an order replica: each buy handled as if it
/// came alone, in its place in the answer: an unknown book is refused
/// there (404), a book out of stock is answered as such, and the same
/// request id twice buys once and answers the same both times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_buys_at_an_order_replica_is_handled_buy_by_buy() {
    let c = TestCluster::start(Options::default()).await;
    c.set_stock(6, 0).await;
    let order = c
        .names(pygmy::config::Role::Order)
        .into_iter()
        .next()
        .expect("an order replica");
    let buy = |id: &str, book: u64| OrderBuyRequest {
        book_id: BookId::new(book).unwrap(),
        request_id: RequestId::parse(id).unwrap(),
        fresh: false,
    };
    let batch = OrderBuyBatch {
        buys: vec![
            buy("k:buys-a", 5),
            buy("k:buys-b", 99),
            buy("k:buys-a", 5),
            buy("k:buys-c", 6),
        ],
        request_ids: Vec::new(),
    };
    let stock = c.stock(5).await;
    let at = c.order(&order);
    let reply = c.retry("the batch of buys", || at.buys(&batch)).await;
    match &reply.outcomes[..] {
        [
            WriteOutcome::Done(first),
            WriteOutcome::Refused { status: 404, .. },
            WriteOutcome::Done(again),
            WriteOutcome::Done(none_left),
        ] => {
            assert_eq!(first, again, "the same request id answers the same");
            assert!(matches!(first.outcome, Outcome::Bought { .. }), "{first:?}");
            assert!(
                matches!(none_left.outcome, Outcome::OutOfStock { .. }),
                "{none_left:?}"
            );
        }
        other => panic!("the order replica answered {other:?}"),
    }
    assert_eq!(
        c.stock(5).await,
        stock - 1,
        "one buy, however often it was sent"
    );
}

/// `POST /internal/writes` at the catalog: a replica that is not the
/// primary refuses the whole batch as it refuses one write (421 naming the
/// primary); the primary applies each write as if alone, in its place in
/// the answer: an unknown book is refused there, and the same request id
/// twice buys once and answers the same both times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_writes_is_refused_whole_by_a_backup_and_applied_write_by_write_by_the_primary()
{
    let c = TestCluster::start(Options::default()).await;
    let primary = c.primary().await;
    let backup = c
        .names(pygmy::config::Role::Catalog)
        .into_iter()
        .find(|n| *n != primary)
        .expect("a backup");
    let buy = |id: &str, book: u64| CatalogWrite {
        request_id: RequestId::parse(id).unwrap(),
        op: CatalogOp::Buy {
            book_id: BookId::new(book).unwrap(),
        },
    };
    let batch = WriteBatch {
        writes: vec![
            buy("k:batch-a", 5),
            buy("k:batch-b", 99),
            buy("k:batch-a", 5),
        ],
        request_ids: Vec::new(),
    };
    let stock = c.stock(5).await;
    match c.catalog(&backup).writes(&batch).await {
        Err(ClientError::Status {
            status: 421,
            primary: Some(p),
            ..
        }) => assert_eq!(p, primary),
        other => panic!("a backup answered a batch with {other:?}"),
    }
    assert_eq!(c.stock(5).await, stock, "the refused batch bought nothing");
    let at_primary = c.catalog(&primary);
    let reply = c
        .retry("the batch at the primary", || at_primary.writes(&batch))
        .await;
    match &reply.outcomes[..] {
        [
            WriteOutcome::Done(first),
            WriteOutcome::Refused { status: 404, .. },
            WriteOutcome::Done(again),
        ] => {
            assert_eq!(first, again, "the same request id answers the same");
            assert!(matches!(first.outcome, Outcome::Bought { .. }), "{first:?}");
        }
        other => panic!("the primary answered {other:?}"),
    }
    assert_eq!(
        c.stock(5).await,
        stock - 1,
        "one buy, however often it was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_a_restart_of_every_node() {
    let mut c = TestCluster::start(Options::default()).await;
    c.frontend().buy("7", None).await.unwrap();
    c.set_stock(6, 0).await;
    let names: Vec<String> = c.cfg.nodes.iter().map(|n| n.name.clone()).collect();
    for n in &names {
        c.kill9(n);
    }
    for n in &names {
        c.restart(n).await;
    }
    assert_eq!(c.stock(7).await, 999);
    assert_eq!(c.stock(6).await, 0);
    assert_eq!(c.order_log_len().await, 1);
    assert_eq!(status(c.frontend().buy("6", None).await.unwrap_err()), 409);
}
