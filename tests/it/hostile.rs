//! Hostile requests against every service: each gets a 4xx (405, 413, 431
//! included) or has its connection closed — never a 5xx, never a hang — and
//! the store's state is the same afterwards.

use crate::common;
use std::time::Duration;

use crate::common::{Options, TestCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes; returns the answer's status, or None if the server
/// closed the connection without one.
async fn raw(addr: &str, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.expect("connects");
    if s.write_all(bytes).await.is_err() {
        return None;
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server neither answered nor closed: {}",
        String::from_utf8_lossy(bytes)
    );
    let head = String::from_utf8_lossy(&buf);
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

fn req(method: &str, path: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    if !body.is_empty() {
        s.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    s.push_str("Connection: close\r\n\r\n");
    s.push_str(body);
    s.into_bytes()
}

fn assert_4xx(what: &str, status: Option<u16>) {
    if let Some(s) = status {
        assert!((400..500).contains(&s), "{what}: answered {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_and_change_nothing() {
    let c = TestCluster::start(Options {
        tweak: |cfg| {
            cfg.limits.request_timeout_ms = 1_000;
            cfg.limits.head_timeout_ms = 1_000;
        },
        ..Options::default()
    })
    .await;
    let books = c.books().await;
    let auth = format!("Authorization: Bearer {}", c.cfg.token);
    let json = "Content-Type: application/json";

    for node in ["frontend", "order-1", "catalog-1"] {
        let addr = c.cfg.node(node).unwrap().addr.clone();
        let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
        let mut add = |name: &str, bytes: Vec<u8>| cases.push((format!("{node}: {name}"), bytes));
        let a = auth.as_str();
        for path in [
            "/lookup/%00",
            "/lookup/1e3",
            "/lookup/0x10",
            "/lookup/99999999999999999999999999999999999",
            "/lookup/",
            "/lookup/1/2",
            "/lookup/..%2F..%2Fetc%2Fpasswd",
            "/../buy/1",
            "/%2e%2e/buy/1",
            "//lookup//1",
            "/search/..",
            "/search/%FF%FE",
            "/search/a%20b",
            "/buy/-1",
            "/buy/1.0",
            // Query arguments of internal routes (the public routes take none and ignore them).
            "/lookup/1?min_version=abc",
            "/lookup/1?min_version=1.99999999999999999999999",
            "/log?limit=0",
            "/log?limit=abc",
            "/log?before=-1",
        ] {
            if node == "frontend" && path.starts_with("/lookup/1?") {
                continue;
            }
            add(&format!("GET {path}"), req("GET", path, &[a], ""));
            add(&format!("POST {path}"), req("POST", path, &[a], ""));
        }
        for (m, p) in [
            ("GET", "/buy/1"),
            ("PUT", "/lookup/1"),
            ("POST", "/catalog/update"),
            ("DELETE", "/internal/write"),
            ("PATCH", "/internal/buy"),
            ("GET", "/internal/invalidate"),
        ] {
            add(&format!("{m} {p}"), req(m, p, &[a], ""));
        }
        for (p, m) in [
            ("/catalog/update", "PUT"),
            ("/internal/write", "POST"),
            ("/internal/buy", "POST"),
            ("/internal/invalidate", "POST"),
            ("/internal/cache-lease", "POST"),
            ("/internal/lookups", "POST"),
            ("/internal/writes", "POST"),
            ("/internal/buys", "POST"),
        ] {
            for body in [
                "{",
                "null",
                "[1,2]",
                "{\"id\": \"1\"}",
                "{\"book_id\": 1e400}",
                "\u{0}\u{1}",
                "{\"id\": 1, \"stock\": 18446744073709551616}",
                "{\"request_id\": \"\", \"op\": \"buy\", \"book_id\": 1}",
                "{\"request_id\": \"a b\", \"book_id\": 1}",
                "{\"frontend\": 7}",
                "{\"ids\": []}",
                "{\"ids\": [0]}",
                "{\"ids\": [1], \"min_version\": \"1.x\"}",
                "{\"ids\": [1], \"extra\": 1}",
                "{\"writes\": []}",
                "{\"writes\": {}}",
                "{\"writes\": [{\"request_id\": \"\", \"op\": \"buy\", \"book_id\": 1}]}",
                "{\"writes\": [{\"request_id\": \"k:a\", \"op\": 0, \"book_id\": 1}]}",
                "{\"writes\": [{\"request_id\": \"k:a\", \"op\": \"buy\", \"book_id\": 1}], \"x\": 1}",
                "{\"writes\": [{\"request_id\": \"k:a\", \"op\": \"buy\", \"book_id\": 1}], \"request_ids\": [\"a\", \"b\"]}",
                "{\"writes\": [{\"request_id\": \"k:a\", \"op\": \"buy\", \"book_id\": 1}], \"request_ids\": [\"a b\"]}",
                "{\"buys\": []}",
                "{\"buys\": {}}",
                "{\"buys\": [{\"request_id\": \"\", \"book_id\": 1}]}",
                "{\"buys\": [{\"request_id\": \"k:a\", \"book_id\": 0}]}",
                "{\"buys\": [{\"request_id\": \"k:a\", \"book_id\": 1, \"fresh\": 1}]}",
                "{\"buys\": [{\"request_id\": \"k:a\", \"book_id\": 1}], \"x\": 1}",
                "{\"buys\": [{\"request_id\": \"k:a\", \"book_id\": 1}], \"request_ids\": [\"a\", \"b\"]}",
            ] {
                add(&format!("{m} {p} {body:?}"), req(m, p, &[a, json], body));
            }
            let too_many = format!("{{\"ids\": [{}]}}", vec!["1"; 257].join(","));
            add(
                &format!("{m} {p} 257 ids"),
                req(m, p, &[a, json], &too_many),
            );
            let write = "{\"request_id\": \"k:many\", \"op\": \"buy\", \"book_id\": 1}";
            let too_many = format!("{{\"writes\": [{}]}}", vec![write; 129].join(","));
            add(
                &format!("{m} {p} 129 writes"),
                req(m, p, &[a, json], &too_many),
            );
            let buy = "{\"request_id\": \"k:many\", \"book_id\": 1}";
            let too_many = format!("{{\"buys\": [{}]}}", vec![buy; 129].join(","));
            add(
                &format!("{m} {p} 129 buys"),
                req(m, p, &[a, json], &too_many),
            );
            add(
                &format!("{m} {p} text/plain"),
                req(
                    m,
                    p,
                    &[a, "Content-Type: text/plain"],
                    "{\"id\": 1, \"stock\": 0}",
                ),
            );
            add(
                &format!("{m} {p} two content types"),
                req(
                    m,
                    p,
                    &[a, json, "Content-Type: text/xml"],
                    "{\"id\": 1, \"stock\": 0}",
                ),
            );
            add(
                &format!("{m} {p} no token"),
                req(m, p, &[json], "{\"id\": 1, \"stock\": 0}"),
            );
            add(
                &format!("{m} {p} two tokens"),
                req(
                    m,
                    p,
                    &[a, "Authorization: Bearer nope-nope-nope-nope", json],
                    "{\"id\": 1, \"stock\": 0}",
                ),
            );
            add(
                &format!("{m} {p} basic auth"),
                req(
                    m,
                    p,
                    &["Authorization: Basic YTpi", json],
                    "{\"id\": 1, \"stock\": 0}",
                ),
            );
            let big = format!(
                "{{\"id\": 1, \"stock\": 0, \"x\": \"{}\"}}",
                "a".repeat(200_000)
            );
            add(&format!("{m} {p} oversized"), req(m, p, &[a, json], &big));
        }
        add("conflicting content-length", b"POST /buy/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\nhello".to_vec());
        add(
            "transfer-encoding not chunked",
            b"POST /buy/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello".to_vec(),
        );
        add(
            "two hosts",
            b"POST /buy/1 HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 0\r\n\r\n".to_vec(),
        );
        add(
            "two idempotency keys",
            req(
                "POST",
                "/buy/1",
                &["Idempotency-Key: a", "Idempotency-Key: b"],
                "",
            ),
        );
        add(
            "bad idempotency key",
            req("POST", "/buy/1", &["Idempotency-Key: \u{7f}x"], ""),
        );
        add(
            "long idempotency key",
            req(
                "POST",
                "/buy/1",
                &[&format!("Idempotency-Key: {}", "k".repeat(500))],
                "",
            ),
        );
        add(
            "huge header",
            req(
                "GET",
                "/lookup/1",
                &[&format!("X-Junk: {}", "j".repeat(64 * 1024))],
                "",
            ),
        );
        let many: Vec<String> = (0..200).map(|i| format!("X-H{i}: v")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        add("too many headers", req("GET", "/lookup/1", &many, ""));
        add(
            "huge path",
            req("GET", &format!("/lookup/{}", "1".repeat(100_000)), &[], ""),
        );
        add(
            "garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
        );
        add(
            "bad version",
            b"GET /lookup/1 HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        );
        add("bad request line", b"GET\r\n\r\n".to_vec());

        for (name, bytes) in &cases {
            assert_4xx(name, raw(&addr, bytes).await);
        }

        // Slow clients: a head trickled in, and a body that never arrives.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /lookup/1 HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("a slow head is cut off")
            .unwrap_or(0);
        assert_4xx(
            &format!("{node}: slow head"),
            std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(|h| h.get(9..12))
                .and_then(|c| c.parse().ok()),
        );
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "PUT /catalog/update HTTP/1.1\r\nHost: x\r\n{auth}\r\n{json}\r\nContent-Length: 1000\r\n\r\n{{\"id\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("a slow body is cut off")
            .unwrap_or(0);
        let status = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|h| h.get(9..12))
            .and_then(|c| c.parse::<u16>().ok());
        assert_4xx(&format!("{node}: slow body"), status);

        // An idle connection (nothing sent, or nothing after an answer) is closed.
        for warm in [false, true] {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            if warm {
                s.write_all(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            }
            let closed = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(
                closed.is_ok(),
                "{node}: an idle connection (warm: {warm}) stays open"
            );
        }

        // And the node still serves.
        let ok = raw(&addr, &req("GET", "/healthcheck", &[], "")).await;
        assert_eq!(ok, Some(200), "{node} still healthy");
    }

    assert_eq!(
        c.books()
            .await
            .into_iter()
            .map(|b| (b.id, b.stock, b.cost))
            .collect::<Vec<_>>(),
        books
            .into_iter()
            .map(|b| (b.id, b.stock, b.cost))
            .collect::<Vec<_>>(),
        "hostile requests changed the store"
    );
    assert_eq!(c.order_log_len().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_503_and_retry_after_and_the_rest_is_served() {
    let c = TestCluster::start(Options {
        tweak: |cfg| cfg.limits.max_in_flight = 2,
        ..Options::default()
    })
    .await;
    let before = c.stock(4).await;
    let raw = reqwest::Client::new();
    let url = format!("{}/buy/4", c.url("frontend"));
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (raw, url) = (raw.clone(), url.clone());
            tokio::spawn(async move {
                let res = raw.post(url).send().await.unwrap();
                (
                    res.status().as_u16(),
                    res.headers().get("retry-after").is_some(),
                )
            })
        })
        .collect();
    let (mut ok, mut shed) = (0u64, 0u64);
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => ok += 1,
            (503, true) => shed += 1,
            other => panic!("neither served nor shed with Retry-After: {other:?}"),
        }
    }
    assert!(
        shed > 0,
        "nothing was shed with 40 concurrent buys and a cap of 2"
    );
    assert!(ok > 0, "nothing was served");
    assert_eq!(
        c.stock(4).await,
        before - ok,
        "exactly the served buys happened"
    );
}

/// Writes `bytes` (as far as the server reads them) and returns the status
/// of its answer.
async fn status_after(addr: &str, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.expect("connects");
    let (mut rd, mut wr) = s.split();
    let write = async {
        let _ = wr.write_all(bytes).await;
    };
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        buf
    };
    let (_, buf) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
            .await
            .expect("the server neither answered nor closed");
    let head = String::from_utf8_lossy(&buf);
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_body_limit_answers_413_and_a_buy_with_a_body_buys_nothing() {
    let c = TestCluster::start(Options::default()).await;
    let before = c.stock(1).await;
    let addr = c.cfg.node("frontend").unwrap().addr.clone();
    let big = vec![b'x'; 8 << 20];

    // An 8 MiB body, declared: 413 before the body is read, nothing bought.
    let mut declared = format!(
        "POST /buy/1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    declared.extend_from_slice(&big);
    assert_eq!(
        status_after(&addr, &declared).await,
        Some(413),
        "declared 8 MiB buy"
    );

    // The same, chunked (no length declared): 413 once the limit is passed.
    let mut chunked =
        b"POST /buy/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in big.chunks(1 << 16) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(
        status_after(&addr, &chunked).await,
        Some(413),
        "chunked 8 MiB buy"
    );

    // Any route, even one that reads no body.
    let mut lookup = format!(
        "GET /lookup/1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    lookup.extend_from_slice(&big[..1 << 16]);
    assert_eq!(
        status_after(&addr, &lookup).await,
        Some(413),
        "declared 8 MiB lookup"
    );

    // A buy with a small body it does not expect is refused.
    for (what, bytes) in [
        (
            "json body",
            req("POST", "/buy/1", &["Content-Type: application/json"], "{}"),
        ),
        ("text body", req("POST", "/buy/1", &[], "1")),
    ] {
        let status = raw(&addr, &bytes).await;
        assert!(
            status.is_some_and(|s| (400..500).contains(&s)),
            "a buy with a {what}: {status:?}"
        );
    }

    // A buy without a body still works, and only it happened.
    c.frontend().buy("1", None).await.expect("a plain buy");
    assert_eq!(c.stock(1).await, before - 1, "only the plain buy bought");
    assert_eq!(c.order_log_len().await, 1);
}

/// Sends raw bytes; returns the whole answer (head and body) as text.
async fn raw_text(addr: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connects");
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_edge_refuses_hostless_requests_hides_routes_and_bounds_replication() {
    let c = TestCluster::start(Options {
        tweak: |cfg| cfg.limits.request_timeout_ms = 1_000,
        ..Options::default()
    })
    .await;
    let auth = format!("Authorization: Bearer {}", c.cfg.token);
    let json = "Content-Type: application/json";
    let addr = |n: &str| c.cfg.node(n).unwrap().addr.clone();

    for node in ["frontend", "order-1", "catalog-1"] {
        // HTTP/1.1 needs a Host header (RFC 9112 §3.2); HTTP/1.0 does not.
        let no_host = raw(
            &addr(node),
            b"GET /healthcheck HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(no_host, Some(400), "{node}: HTTP/1.1 without Host");
        let old = raw_text(&addr(node), b"GET /healthcheck HTTP/1.0\r\n\r\n").await;
        assert!(
            old.get(8..12) == Some(" 200"),
            "{node}: HTTP/1.0 without Host answered {old}"
        );

        // Errors are problem details, with `message` kept.
        let text = raw_text(&addr(node), &req("GET", "/no/such/route", &[], "")).await;
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{text}"
        );
        let body: serde_json::Value =
            serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["status"], 404);
        assert_eq!(body["title"], "Not Found");
        assert_eq!(body["type"], "about:blank");
        assert_eq!(body["detail"], body["message"]);
    }

    // Without the token, a wrong method on an internal route is a 401 like
    // any other: no 405 tells which routes exist. With it, the 405 is honest.
    for (node, m, p) in [
        ("catalog-1", "GET", "/internal/write"),
        ("order-1", "PATCH", "/internal/buy"),
        ("frontend", "GET", "/internal/invalidate"),
        ("catalog-1", "GET", "/internal/replication"),
    ] {
        assert_eq!(
            raw(&addr(node), &req(m, p, &[], "")).await,
            Some(401),
            "{node}: {m} {p} without the token"
        );
        assert_eq!(
            raw(
                &addr(node),
                &req(m, p, &["Authorization: Bearer wrong"], "")
            )
            .await,
            Some(401),
            "{node}: {m} {p} with a wrong token"
        );
        assert_eq!(
            raw(&addr(node), &req(m, p, &[&auth], "")).await,
            Some(405),
            "{node}: {m} {p} with the token"
        );
    }

    // /internal/replication refuses unknown fields and oversized bodies.
    let cat = addr("catalog-1");
    let known = r#"{"from": 2, "messages": []}"#;
    assert_eq!(
        raw(
            &cat,
            &req("POST", "/internal/replication", &[&auth, json], known)
        )
        .await,
        Some(200),
        "the same batch without the unknown field"
    );
    let unknown = r#"{"from": 2, "messages": [], "junk": 1}"#;
    assert_eq!(
        raw(
            &cat,
            &req("POST", "/internal/replication", &[&auth, json], unknown)
        )
        .await,
        Some(400),
        "unknown field"
    );
    let known_inner = r#"{"from": 2, "messages": [{"epoch": 0, "inc": 0, "body": "TimeoutNow"}]}"#;
    assert_eq!(
        raw(
            &cat,
            &req("POST", "/internal/replication", &[&auth, json], known_inner)
        )
        .await,
        Some(200),
        "the same message without the unknown field"
    );
    let unknown_inner =
        r#"{"from": 2, "messages": [{"epoch": 0, "inc": 0, "body": "TimeoutNow", "junk": 1}]}"#;
    assert_eq!(
        raw(
            &cat,
            &req(
                "POST",
                "/internal/replication",
                &[&auth, json],
                unknown_inner
            )
        )
        .await,
        Some(400),
        "unknown field in a message"
    );
    // A declared length over the limit is refused before a byte of the body is read.
    let huge = format!(
        "POST /internal/replication HTTP/1.1\r\nHost: x\r\n{auth}\r\n{json}\r\nContent-Length: {}\r\n\r\n{{",
        pygmy::catalog::MAX_REPLICATION_BODY + 1
    );
    assert_eq!(
        raw(&cat, huge.as_bytes()).await,
        Some(413),
        "oversized replication body"
    );
    // Still a healthy replica.
    c.wait_healthy("catalog-1").await;
    c.book(1).await;
}

/// One replication frame as the wire carries it: the batch's length
/// (4 bytes, big-endian), then the batch's JSON.
fn frame(batch: &serde_json::Value) -> Vec<u8> {
    let body = serde_json::to_vec(batch).unwrap();
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend(body);
    f
}

/// Replication travels on streams: every catalog replica reads frames from
/// its peers. The stream route answers what is not a peer's stream with a
/// 4xx; a stream that sends what is not a frame of its peer is closed, and
/// nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_streams_carry_only_their_peers_frames() {
    use pygmy::config::Role;
    const FRAMES: &str = "pygmy_replication_stream_frames_total";
    let c = TestCluster::start(Options::default()).await;
    c.frontend().buy("1", None).await.unwrap();
    for name in c.names(Role::Catalog) {
        common::wait_until(
            &format!("{name} reads replication frames"),
            Duration::from_secs(30),
            || {
                let c = &c;
                let name = name.clone();
                async move { c.metric(&name, FRAMES).await > 0.0 }
            },
        )
        .await;
    }
    let books = c.books().await;
    let primary = c.primary().await;
    // A backup, and a stream in the name of the other backup: backups do
    // not stream to each other between elections, so no real stream
    // replaces the test's while it runs.
    let backups = c.catalogs_but(&primary);
    let (target, peer) = (&backups[0], &backups[1]);
    let addr = c.cfg.node(target).unwrap().addr.clone();
    let id = |n: &str| c.cfg.node(n).unwrap().process_id;
    let auth = format!("Authorization: Bearer {}", c.cfg.token);
    let open = |from: String, headers: &[&str]| {
        let mut s = format!("GET /internal/replication/stream?from={from} HTTP/1.1\r\nHost: x\r\n");
        for h in headers {
            s.push_str(h);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    };
    let upgrade = ["Connection: upgrade", "Upgrade: pygmy-replication"];
    let with_token = [upgrade[0], upgrade[1], auth.as_str()];

    for (what, request, status) in [
        (
            "without the token",
            open(id(peer).to_string(), &upgrade),
            401,
        ),
        (
            "without the upgrade",
            open(id(peer).to_string(), &[auth.as_str()]),
            426,
        ),
        (
            "from an unknown sender",
            open("999".into(), &with_token),
            400,
        ),
        (
            "from itself",
            open(id(target).to_string(), &with_token),
            400,
        ),
        ("from no number", open("x".into(), &with_token), 400),
    ] {
        assert_eq!(raw(&addr, &request).await, Some(status), "{what}");
    }

    let too_long = (pygmy::catalog::MAX_REPLICATION_BODY as u32 + 1)
        .to_be_bytes()
        .to_vec();
    let mut not_a_batch = 3u32.to_be_bytes().to_vec();
    not_a_batch.extend(b"{x}");
    let someone_elses = frame(&serde_json::json!({
        "from": id(&primary),
        "messages": [{"epoch": 0, "inc": 0, "body": "TimeoutNow"}],
    }));
    let its_own = frame(&serde_json::json!({"from": id(peer), "messages": []}));
    for (what, bad) in [
        ("a length past the limit", too_long),
        ("a frame that is not a batch", not_a_batch),
        ("another sender's batch", someone_elses),
    ] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&open(id(peer).to_string(), &with_token))
            .await
            .unwrap();
        assert_eq!(read_status(&mut s).await, Some(101), "{what}: switched");
        // The peer's own frame keeps the stream open...
        s.write_all(&its_own).await.unwrap();
        assert!(
            !closed_by_server(&mut s, Duration::from_millis(500)).await,
            "{what}: a good frame closed the stream"
        );
        // ...this one closes it.
        s.write_all(&bad).await.unwrap();
        assert!(
            closed_by_server(&mut s, Duration::from_secs(10)).await,
            "{what}: the stream stays open"
        );
    }

    // Nothing changed; the store goes on, its writes on every replica.
    assert_eq!(c.primary().await, primary);
    assert_eq!(c.books().await, books);
    c.frontend().buy("1", None).await.unwrap();
    for name in c.names(Role::Catalog) {
        let want = books[0].stock - 1;
        let cat = c.catalog(&name);
        common::wait_until(
            &format!("{name} applies the buy"),
            Duration::from_secs(30),
            || {
                let cat = cat.clone();
                async move {
                    cat.lookup(pygmy::api::BookId::new(1).unwrap(), None)
                        .await
                        .is_ok_and(|b| b.stock == want)
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_with_a_made_up_epoch_turns_the_cache_off_only_briefly() {
    let c = TestCluster::start(Options::default()).await;
    let batch = serde_json::json!({"epoch": 999, "seq": 0, "items": []});
    let res = reqwest::Client::new()
        .post(format!("{}/internal/invalidate", c.url("frontend")))
        .bearer_auth(&c.cfg.token)
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        c.cache_stats().await["lease_valid"],
        serde_json::Value::Bool(false),
        "the fence drops the lease"
    );
    // The real primary outlives the made-up epoch: the cache serves again.
    c.wait_cache_lease().await;
    c.frontend().lookup("1").await.unwrap();
    c.frontend().lookup("1").await.unwrap();
    assert!(
        c.cache_stats().await["hits"].as_u64().unwrap() >= 1,
        "cached reads again"
    );
}

/// A keep-alive connection that sent one request and read its answer.
struct Held {
    stream: TcpStream,
}

/// Reads one answer's head; its status, or None when the server closed.
async fn read_status(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        return head.split(' ').nth(1).and_then(|c| c.parse().ok());
                    }
                }
            }
        }
    })
    .await;
    read.expect("the server neither answered nor closed")
}

/// Whether the server closed `s` (reads EOF) within `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    matches!(
        tokio::time::timeout(within, s.read(&mut chunk)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

const PING: &[u8] = b"GET /healthcheck HTTP/1.1\r\nHost: pygmy\r\n\r\n";

/// More connections than the frontend's cap: the extra ones are closed at
/// once; the reserved share still serves cluster traffic (and writes keep
/// committing, invalidating the frontend's cache); the flood's connections
/// are shed once idle, and then everyone is served again, each connection
/// for a bounded number of requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_cluster_traffic_goes_on_and_idle_connections_are_shed() {
    let c = TestCluster::start(Options {
        tweak: |cfg| {
            cfg.limits.max_connections = 48;
            cfg.limits.reserved_connections = 16;
            cfg.limits.idle_timeout_ms = 1_500;
            cfg.limits.max_requests_per_connection = 5;
        },
        ..Default::default()
    })
    .await;
    let fe = c.cfg.node("frontend").unwrap().addr.clone();
    let before = c.cfg.clone();
    let public = before.limits.max_connections - before.limits.reserved_connections;

    // The flood: 150 connections, each sending one request and staying open.
    let mut held = Vec::new();
    let (mut ok, mut refused, mut closed) = (0, 0, 0);
    for _ in 0..150 {
        let mut s = TcpStream::connect(&fe).await.expect("connects");
        let answered = match s.write_all(PING).await {
            Ok(()) => read_status(&mut s).await,
            Err(_) => None,
        };
        match answered {
            Some(200) => {
                ok += 1;
                held.push(Held { stream: s });
            }
            Some(503) => refused += 1,
            Some(other) => panic!("a flood connection got {other}"),
            None => closed += 1,
        }
    }
    assert!(
        ok <= public && ok > 0,
        "at most the public share ({public}) is served: {ok}"
    );
    assert!(
        closed + refused >= 150 - before.limits.max_connections,
        "the connections over the cap are closed or refused: {ok} served, {refused} refused, {closed} closed"
    );

    // Meanwhile cluster traffic is served on the reserved share: a new
    // connection with the token gets the frontend's internal cache stats,
    // one without it is refused (503) or closed.
    let with_token = format!(
        "GET /internal/cache HTTP/1.1\r\nHost: pygmy\r\nAuthorization: Bearer {}\r\n\r\n",
        before.token
    );
    let mut s = TcpStream::connect(&fe).await.expect("connects");
    s.write_all(with_token.as_bytes()).await.unwrap();
    assert_eq!(
        read_status(&mut s).await,
        Some(200),
        "cluster traffic goes on"
    );
    let mut s = TcpStream::connect(&fe).await.expect("connects");
    let anonymous = match s.write_all(PING).await {
        Ok(()) => read_status(&mut s).await,
        Err(_) => None,
    };
    assert!(
        matches!(anonymous, None | Some(503)),
        "a public request has no room while the flood holds it: {anonymous:?}"
    );
    // Writes keep committing on every replica (each one's begin and end
    // reach the frontend's cache before it is answered).
    let start = c.stock(1).await;
    for i in 1..=5 {
        c.set_stock(1, start + i).await;
    }
    common::wait_until(
        "every catalog replica applied the writes",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for name in c.names(pygmy::config::Role::Catalog) {
                let b = c
                    .catalog(&name)
                    .lookup(pygmy::api::BookId::new(1).unwrap(), None)
                    .await;
                all &= b.is_ok_and(|b| b.stock == start + 5);
            }
            all
        },
    )
    .await;

    // The flood goes quiet: its connections are shed once idle ...
    for h in &mut held {
        assert!(
            closed_by_server(&mut h.stream, Duration::from_secs(10)).await,
            "an idle keep-alive connection is closed by the server"
        );
    }
    // ... and public requests are served again.
    // One connection serves at most `max_requests_per_connection` requests:
    // the last answer closes it.
    let mut s = TcpStream::connect(&fe).await.expect("connects");
    for _ in 0..5 {
        s.write_all(PING).await.unwrap();
        assert_eq!(read_status(&mut s).await, Some(200));
    }
    assert!(
        closed_by_server(&mut s, Duration::from_secs(5)).await,
        "the fifth answer closes the connection"
    );
    assert_eq!(c.stock(1).await, start + 5);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The stated bound of issue "exactly once with bounded memory": with
/// minted ids kept 5 s, a catalog replica's snapshot keeps what was written
/// in the last few seconds, not every buy; and its memory after 200 000
/// buys is what it was after 50 000, within 24 MiB.
const SNAPSHOT_IDS_BOUND: f64 = 60_000.0;
const RSS_GROWTH_BOUND_KIB: u64 = 24 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_keyless_buys_keep_replica_memory_and_snapshots_bounded() {
    use pygmy::api::{BookId, CatalogOp, CatalogWrite, Outcome, RequestId};
    use pygmy::config::Role;
    let c = TestCluster::start(Options {
        tweak: |cfg| {
            cfg.timing.call_timeout_ms = 500;
            cfg.timing.retry_budget_ms = 2_000;
            cfg.timing.minted_id_ttl_ms = 5_000;
        },
        ..Options::default()
    })
    .await;
    const BOOKS: u64 = 7;
    const STOCK: u64 = 100_000;
    for id in 1..=BOOKS {
        c.set_stock(id, STOCK).await;
    }
    // A client's key is kept for a day: its answer survives all of this.
    let keyed = CatalogWrite {
        request_id: RequestId::from_idempotency_key("kept-for-a-day").unwrap(),
        op: CatalogOp::Buy {
            book_id: BookId::new(1).unwrap(),
        },
    };
    let cat = c.catalog(&c.primary().await);
    let first = c.retry("a keyed buy", || cat.write(&keyed)).await;

    let sold = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let buy_many = |n: u64| {
        let c = &c;
        let sold = sold.clone();
        async move {
            const WORKERS: u64 = 48;
            let catalogs = c.catalogs();
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..WORKERS {
                let catalogs = catalogs.clone();
                let sold = sold.clone();
                tasks.spawn(async move {
                    for k in (w..n).step_by(WORKERS as usize) {
                        let write = CatalogWrite {
                            request_id: RequestId::mint(),
                            op: CatalogOp::Buy {
                                book_id: BookId::new(k % BOOKS + 1).unwrap(),
                            },
                        };
                        // The same id until it is answered: exactly once.
                        let r = common::write_at_primary(&catalogs, &write).await;
                        assert!(
                            matches!(r.outcome, Outcome::Bought { .. }),
                            "{:?}",
                            r.outcome
                        );
                        sold.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        }
    };
    let catalogs = c.names(Role::Catalog);
    let measure = |what: &'static str| {
        let c = &c;
        let catalogs = catalogs.clone();
        async move {
            let mut out = Vec::new();
            for n in &catalogs {
                let ids = c.metric(n, "pygmy_catalog_answers_kept").await;
                let bytes = c.metric(n, "pygmy_catalog_snapshot_bytes").await;
                let rss = rss_kib(c.pid(n));
                eprintln!("{what}: {n} keeps {ids} answers, snapshot {bytes} bytes; RSS {rss} KiB");
                out.push((ids, bytes, rss));
            }
            out
        }
    };
    let started = std::time::Instant::now();
    buy_many(50_000).await;
    let early = measure("after 50 000 buys").await;
    buy_many(150_000).await;
    let late = measure("after 200 000 buys").await;
    eprintln!("200 000 buys in {:.1} s", started.elapsed().as_secs_f64());

    for ((n, e), l) in catalogs.iter().zip(&early).zip(&late) {
        assert!(l.0 > 0.0, "{n} keeps the answers of the latest buys");
        assert!(
            l.0 <= SNAPSHOT_IDS_BOUND,
            "{n} keeps {} request ids' answers, what its snapshot would hold (bound {SNAPSHOT_IDS_BOUND})",
            l.0
        );
        // Its log was compacted 20 times over, and no replica lagged: no
        // snapshot bytes were built (they are built for a lagging replica).
        assert_eq!(l.1, 0.0, "{n} built snapshot bytes no replica needed");
        assert!(
            l.2 <= e.2 + RSS_GROWTH_BOUND_KIB,
            "{n}'s RSS grew from {} KiB after 50 000 buys to {} KiB after 200 000",
            e.2,
            l.2
        );
    }

    // Exactly once: the stock went down by the buys answered, no more.
    let sold = sold.load(std::sync::atomic::Ordering::Relaxed);
    let mut left = 0;
    for id in 1..=BOOKS {
        left += c.stock(id).await;
    }
    assert_eq!(BOOKS * STOCK - left, sold, "stock sold = buys answered");

    // The key's answer is still kept; a minted id past its window is
    // refused and changes nothing.
    let cat = c.catalog(&c.primary().await);
    let again = c.retry("the keyed buy again", || cat.write(&keyed)).await;
    assert_eq!(again, first, "a key is answered as before");
    let stale = CatalogWrite {
        request_id: RequestId::mint_as("r", 1000),
        op: CatalogOp::Buy {
            book_id: BookId::new(2).unwrap(),
        },
    };
    let before = c.stock(2).await;
    let err = cat.write(&stale).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(c.stock(2).await, before, "the expired write bought nothing");
}
