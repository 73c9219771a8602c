//! The storefront and the operator view in a real headless Chromium, driven
//! over the W3C WebDriver protocol, against a real cluster. Screenshots are
//! saved under `target/tmp/screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use pygmy::api::BookId;
use pygmy::config::Role;
use serde_json::{Value, json};

use crate::common::webdriver::{self, A11Y_CHECK, Driver, PAGE_BYTES, Session};
use crate::common::{Options, TestCluster, temp_dir, wait_until};

const PAGE_LIMIT: u64 = 100 * 1024;

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
}

async fn driver() -> Option<Driver> {
    let (driver, browser) = webdriver::binaries()?;
    Some(Driver::start(&driver, &browser, temp_dir("browser")).await)
}

async fn assert_accessible(s: &Session, page: &str) {
    let problems = s.js(A11Y_CHECK, json!([])).await;
    assert_eq!(problems, json!([]), "accessibility problems on {page}");
}

async fn assert_light(s: &Session, page: &str) -> u64 {
    let bytes = s.js(PAGE_BYTES, json!([])).await.as_u64().unwrap();
    assert!(
        bytes > 1000,
        "{page}: the page's size was measured ({bytes} B)"
    );
    assert!(
        bytes < PAGE_LIMIT,
        "{page} weighs {bytes} B, over {PAGE_LIMIT}"
    );
    eprintln!("{page}: {bytes} bytes");
    bytes
}

/// Console entries at level SEVERE (errors), as text.
async fn console_errors(s: &Session) -> Vec<String> {
    s.console()
        .await
        .into_iter()
        .filter(|e| e["level"] == json!("SEVERE"))
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A buy's result shown in `s` (waits until it is final).
async fn buy_outcome(s: &Session) -> String {
    s.wait_js(
        "the buy has an outcome",
        "const t = document.querySelector('#buy-result')?.textContent || ''; \
         return /Bought|out of stock/.test(t) ? t : null;",
        json!([]),
    )
    .await
    .as_str()
    .unwrap()
    .to_string()
}

/// Waits until the book shown has exactly `n` in stock.
async fn wait_stock(s: &Session, n: u64) {
    s.wait_js(
        &format!("the stock shown is {n}"),
        "return document.querySelector('#book-stock')?.textContent === arguments[0];",
        json!([n.to_string()]),
    )
    .await;
}

async fn shown_stock(s: &Session) -> u64 {
    s.text("#book-stock").await.unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storefront_browse_search_buy_in_a_browser() {
    let Some(driver) = driver().await else { return };
    let cluster = TestCluster::start(Options::default()).await;
    let fe = cluster.url("frontend");
    let phone = driver.session(390, 844).await;

    // Home: both topics, every book, light and accessible.
    phone.goto(&format!("{fe}/")).await;
    phone.wait_text("#topics", "distributed systems").await;
    phone.wait_text("#topics", "graduate school").await;
    phone.wait_text("#view", "Spring in Pioneer Valley.").await;
    let width = phone.js("return window.innerWidth;", json!([])).await;
    assert_eq!(width, json!(390), "a phone-sized screen");
    assert_accessible(&phone, "the storefront").await;
    assert_light(&phone, "the storefront").await;
    phone.screenshot(&shots().join("storefront-home.png")).await;

    // Browse a topic.
    phone
        .click("#topics a[data-topic=distributed-systems]")
        .await;
    phone
        .wait_text("#view-title", "Books on distributed systems")
        .await;
    let list = phone.text("#view").await.unwrap();
    assert!(
        list.contains("RPCs for Dummies.") && !list.contains("Spring in Pioneer Valley."),
        "{list}"
    );

    // Search with the keyboard only: type, Enter.
    phone.type_into("#q", "graduate\u{E007}").await;
    phone.wait_text("#view-title", "Search: graduate").await;
    let found = phone.text("#view").await.unwrap();
    assert!(
        found.contains("Xen and the Art of Surviving Graduate School."),
        "{found}"
    );
    assert!(
        found.contains("Cooking for the Impatient Graduate Student."),
        "{found}"
    );
    assert!(!found.contains("RPCs for Dummies."), "{found}");

    // Keyboard focus is visible.
    phone.press("\u{E004}").await;
    let outline = phone
        .js(
            "const e = document.activeElement; return e === document.body ? null : getComputedStyle(e).outlineStyle;",
            json!([]),
        )
        .await;
    assert_eq!(
        outline,
        json!("solid"),
        "the focused element shows an outline"
    );

    // Open a book: title, topic, price, stock; buy it; the stock drops.
    phone.click("a[href='#/book/3']").await;
    phone
        .wait_text(
            "#book-title",
            "Xen and the Art of Surviving Graduate School.",
        )
        .await;
    assert_eq!(phone.text("#book-price").await.unwrap(), "$100.00");
    phone.wait_text("#view", "graduate school").await;
    let before = shown_stock(&phone).await;
    assert_eq!(before, cluster.stock(3).await);
    assert_accessible(&phone, "a book").await;
    phone.click("#buy").await;
    assert!(buy_outcome(&phone).await.contains("Bought “Xen"));
    wait_stock(&phone, before - 1).await;
    assert_eq!(cluster.stock(3).await, before - 1);
    phone.screenshot(&shots().join("storefront-book.png")).await;
    assert_eq!(
        console_errors(&phone).await,
        Vec::<String>::new(),
        "console errors while shopping"
    );

    // A double click buys once.
    let orders = cluster.order_log_len().await;
    phone
        .js(
            "const b = document.getElementById('buy'); b.click(); b.click();",
            json!([]),
        )
        .await;
    phone.wait_text("#buy-result", "Bought").await;
    wait_stock(&phone, before - 2).await;
    assert_eq!(cluster.stock(3).await, before - 2);
    assert_eq!(
        cluster.order_log_len().await,
        orders + 1,
        "one order for a double click"
    );

    // A reload during a purchase: the buy was sent (key K) but the answer
    // was lost; after the reload, finishing it buys nothing more.
    let key = format!("web-reload-{}", uuid::Uuid::new_v4().simple());
    let first = cluster.frontend().buy("3", Some(&key)).await.unwrap();
    phone
        .js(
            "sessionStorage.setItem('pygmy-buy-3', arguments[0]);",
            json!([key]),
        )
        .await;
    phone.refresh().await;
    phone.wait_text("#buy-result", "got no answer").await;
    let stock = shown_stock(&phone).await;
    assert_eq!(stock, before - 3);
    phone.click("#buy").await;
    let msg = buy_outcome(&phone).await;
    assert!(
        msg.contains(&format!("Order number {}", first.order_id)),
        "the same order: {msg}"
    );
    assert_eq!(
        cluster.stock(3).await,
        before - 3,
        "the reload bought nothing more"
    );
    assert_eq!(
        phone
            .js("return sessionStorage.getItem('pygmy-buy-3');", json!([]))
            .await,
        Value::Null
    );

    // An unknown book, and one out of stock: clear messages.
    phone.goto(&format!("{fe}/#/book/999")).await;
    phone
        .wait_text("#view", "There is no book number 999")
        .await;
    assert_accessible(&phone, "an unknown book").await;
    phone.goto(&format!("{fe}/#/book/%E0%A4")).await;
    phone.wait_text("#view", "There is no book number").await;
    cluster.set_stock(5, 0).await;
    phone.goto(&format!("{fe}/#/book/5")).await;
    wait_stock(&phone, 0).await;
    // With the keyboard: focus the button, press Enter.
    phone
        .js("document.getElementById('buy').focus();", json!([]))
        .await;
    phone.press("\u{E007}").await;
    assert!(buy_outcome(&phone).await.contains("is out of stock"));
    assert_eq!(cluster.stock(5).await, 0);

    // The last copy, bought from two browsers at once: exactly one succeeds.
    cluster.set_stock(2, 1).await;
    let desktop = driver.session(1280, 900).await;
    for s in [&phone, &desktop] {
        s.goto(&format!("{fe}/#/book/2")).await;
        s.wait_text("#book-title", "RPCs for Dummies.").await;
        wait_stock(s, 1).await;
    }
    tokio::join!(phone.click("#buy"), desktop.click("#buy"));
    let (a, b) = tokio::join!(buy_outcome(&phone), buy_outcome(&desktop));
    let bought = [&a, &b].iter().filter(|m| m.contains("Bought")).count();
    let sold_out = [&a, &b]
        .iter()
        .filter(|m| m.contains("out of stock"))
        .count();
    assert_eq!(
        (bought, sold_out),
        (1, 1),
        "one buys, one is told it is sold out: {a:?} / {b:?}"
    );
    assert_eq!(cluster.stock(2).await, 0);
    desktop
        .screenshot(&shots().join("storefront-sold-out.png"))
        .await;

    // Only the deliberate 404 and 409 answers were logged, as failed loads.
    for s in [&phone, &desktop] {
        for e in console_errors(s).await {
            assert!(
                e.contains("Failed to load resource") && (e.contains("404") || e.contains("409")),
                "unexpected console error: {e}"
            );
        }
    }

    // Caching headers: pages revalidate by ETag, versioned assets are immutable.
    let http = reqwest::Client::new();
    let page = http.get(format!("{fe}/")).send().await.unwrap();
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let etag = page.headers()["etag"].clone();
    let html = page.text().await.unwrap();
    let again = http
        .get(format!("{fe}/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let js = html
        .split("src=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let asset = http.get(format!("{fe}{js}")).send().await.unwrap();
    assert_eq!(asset.status(), 200);
    assert!(
        asset.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert!(
        asset.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    phone.close().await;
    desktop.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_view_shows_a_failover_as_it_happens() {
    let Some(driver) = driver().await else { return };
    // A short retry budget, so a buy without a catalog majority gets its 503 soon.
    let mut cluster = TestCluster::start(Options {
        tweak: |c| c.timing.retry_budget_ms = c.timing.call_timeout_ms,
        ..Options::default()
    })
    .await;
    let fe = cluster.url("frontend");
    let http = reqwest::Client::new();

    // Without the token: the page, but no data and no admin action.
    let state = http.get(format!("{fe}/ops/state")).send().await.unwrap();
    assert_eq!(state.status(), 401);
    let restock = http
        .post(format!("{fe}/ops/restock"))
        .json(&json!({"id": 1, "stock": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(restock.status(), 401);

    let s = driver.session(1280, 1500).await;
    s.goto(&format!("{fe}/ops")).await;
    s.element("#token").await;
    assert_accessible(&s, "the operator sign-in").await;
    s.type_into("#token", "not-the-token").await;
    s.click("#token-form button").await;
    s.wait_text("#login-msg", "not accepted").await;
    s.type_into("#token", &cluster.cfg.token).await;
    s.click("#token-form button").await;

    let first = cluster.primary().await;
    s.wait_text("#primary-name", &first).await;
    s.wait_js(
        "all seven nodes are up",
        "return document.querySelectorAll('#nodes tbody tr[data-reachable=true]').length === 7;",
        json!([]),
    )
    .await;
    s.wait_text("#events", "observing 7 nodes").await;

    // Some traffic for the charts.
    let shop = cluster.frontend();
    for i in 0..20 {
        shop.lookup(&(1 + i % 7).to_string()).await.unwrap();
    }
    for _ in 0..3 {
        shop.buy("1", None).await.unwrap();
    }
    s.wait_js(
        "the charts show buys",
        "return !document.querySelector('#chart-buys .now').textContent.startsWith('–') && \
                document.querySelector('#chart-buys svg polyline').getAttribute('points').length > 0;",
        json!([]),
    )
    .await;
    s.wait_js(
        "the hit rate is drawn",
        "return /%/.test(document.querySelector('#chart-hits .now').textContent);",
        json!([]),
    )
    .await;
    assert_accessible(&s, "the operator view").await;
    assert_light(&s, "the operator view").await;
    s.screenshot(&shots().join("ops-steady.png")).await;

    // kill -9 the catalog primary: the view shows it down, the election and the new primary.
    cluster.kill9(&first);
    let row = format!("#nodes tr[data-node={first}][data-reachable=false]");
    s.wait_js(
        "the old primary is shown down",
        "return !!document.querySelector(arguments[0]);",
        json!([row]),
    )
    .await;
    let next = cluster.primary().await;
    assert_ne!(next, first);
    s.wait_text("#primary-name", &next).await;
    s.wait_text("#events", &format!("{first} stopped answering"))
        .await;
    s.wait_text("#events", &format!("{next} won the election"))
        .await;
    s.wait_text("#events", &format!("new view of {next}")).await;
    let role = s
        .js(
            "return document.querySelector(`#nodes tr[data-node=${arguments[0]}]`).dataset.role;",
            json!([next]),
        )
        .await;
    assert_eq!(role, json!("primary"));
    s.screenshot(&shots().join("ops-failover.png")).await;

    // The admin action works with the token, through the new primary.
    s.type_into("#restock-id", "4").await;
    s.type_into("#restock-stock", "77").await;
    s.click("#restock button").await;
    s.wait_text("#restock-msg", "now has 77 in stock").await;
    assert_eq!(cluster.stock(4).await, 77);

    // The old primary comes back, catches up, and takes over again.
    cluster.restart(&first).await;
    let highest = cluster.names(Role::Catalog).into_iter().max().unwrap();
    assert_eq!(highest, first);
    s.wait_text("#events", &format!("{first} answers again"))
        .await;
    s.wait_text("#events", &format!("{first} in sync with {next}"))
        .await;
    s.wait_text(
        "#events",
        &format!("{first} took primaryship over from {next}"),
    )
    .await;
    s.wait_text("#primary-name", &first).await;
    let c = cluster.catalog(&first);
    wait_until(
        "the restarted primary serves",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move {
                c.lookup(BookId::new(4).unwrap(), None)
                    .await
                    .is_ok_and(|b| b.stock == 77)
            }
        },
    )
    .await;

    // Without a catalog majority a shopper is told the store is failing
    // over; once it is back, finishing the purchase buys exactly once.
    let shopper = driver.session(1280, 800).await;
    shopper.goto(&format!("{fe}/#/book/6")).await;
    shopper
        .wait_text("#book-title", "Why theory classes are so hard.")
        .await;
    let stock = shown_stock(&shopper).await;
    let orders = cluster.order_log_len().await;
    let others = cluster.catalogs_but(&first);
    cluster.kill9(&first);
    cluster.kill9(&others[1]);
    s.wait_text("#primary-name", "none").await;
    shopper.click("#buy").await;
    shopper
        .wait_text("#buy-result", "switching over to a backup")
        .await;
    assert_eq!(shopper.text("#buy").await.unwrap(), "Finish purchase");
    assert_accessible(&shopper, "a buy during a failover").await;
    shopper
        .screenshot(&shots().join("storefront-failing-over.png"))
        .await;
    s.screenshot(&shots().join("ops-no-majority.png")).await;
    cluster.restart(&others[1]).await;
    s.wait_js(
        "a primary is back",
        "return ['none', ''].indexOf(document.querySelector('#primary-name')?.textContent ?? '') < 0;",
        json!([]),
    )
    .await;
    shopper.click("#buy").await;
    let outcome = buy_outcome(&shopper).await;
    assert!(outcome.contains("Bought"), "{outcome}");
    wait_stock(&shopper, stock - 1).await;
    assert_eq!(cluster.stock(6).await, stock - 1, "bought exactly once");
    assert_eq!(cluster.order_log_len().await, orders + 1);
    shopper.close().await;

    let errors = console_errors(&s).await;
    assert!(
        errors
            .iter()
            .all(|e| e.contains("/ops/state") && e.contains("401")),
        "only the refused wrong token may be logged: {errors:?}"
    );
    s.close().await;
}
