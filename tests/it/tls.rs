//! TLS between the nodes, with real processes: a cluster whose file names
//! certificates from `pygmy certs` replicates over TLS; public routes still
//! answer plain HTTP; internal routes refuse plain HTTP, TLS without a
//! client certificate, and — at the handshake — a certificate of another CA,
//! even with the right token.

use crate::common;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{Options, TestCluster, wait_until};
use pygmy::api::BookId;
use pygmy::config::Role;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_certs(path: &std::path::Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A client trusting the cluster CA in `certs`, presenting `identity`
/// (`dir`, `name`) as its certificate, or none.
fn client(certs: &std::path::Path, identity: Option<(&std::path::Path, &str)>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&certs.join("ca.pem")) {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((dir, name)) => builder
            .with_client_auth_cert(
                pem_certs(&dir.join(format!("{name}.pem"))),
                PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_speak_tls_and_refuse_anyone_without_a_certificate_of_the_cluster_ca() {
    let c = TestCluster::start(Options {
        tls: true,
        ..Default::default()
    })
    .await;
    let certs = c.dir.join("certs");
    for name in ["frontend", "order-1", "catalog-3"] {
        let log = std::fs::read_to_string(c.dir.join(format!("{name}.log"))).unwrap();
        assert!(log.contains("TLS between nodes: on"), "{name}:\n{log}");
    }
    assert!(c.url("catalog-1").starts_with("https://"));

    // The seed's flows, through the frontend over TLS (this process is the
    // operator), and the buy replicated to every catalog replica.
    let fe = c.frontend();
    let before = c.stock(1).await;
    fe.search("distributed-systems").await.unwrap();
    let bought = fe.buy("1", None).await.unwrap();
    assert_eq!(c.stock(1).await, before - 1);
    wait_until(
        "every catalog replica applied the buy",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for n in c.names(Role::Catalog) {
                let b = c.catalog(&n).lookup(BookId::new(1).unwrap(), None).await;
                all &= b.is_ok_and(|b| b.stock == before - 1);
            }
            all
        },
    )
    .await;
    assert!(bought.order_id > 0);
    // Replication travels on streams over TLS too (a stream that failed to
    // open would fall back to one POST per batch, and still replicate).
    for n in c.names(Role::Catalog) {
        let url = format!("http://{}/metrics", c.cfg.node(&n).unwrap().addr);
        wait_until(
            &format!("{n} reads replication frames"),
            Duration::from_secs(10),
            || {
                let url = url.clone();
                async move {
                    let Ok(page) = reqwest::get(url).await else {
                        return false;
                    };
                    let page = page.text().await.unwrap_or_default();
                    page.lines()
                        .find_map(|l| l.strip_prefix("pygmy_replication_stream_frames_total "))
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v > 0.0)
                }
            },
        )
        .await;
    }

    // Public routes still answer plain HTTP on the same port.
    let fe_addr = c.cfg.node("frontend").unwrap().addr.clone();
    let mut s = tokio::net::TcpStream::connect(&fe_addr).await.unwrap();
    s.write_all(b"GET /lookup/1 HTTP/1.1\r\nHost: pygmy\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Container healthchecks probe plain HTTP.
    let probe = std::process::Command::new(common::BIN)
        .args(["healthcheck", &format!("http://{fe_addr}/healthcheck")])
        .env("PYGMY_CONFIG", &c.config_path)
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    // Internal routes: the token alone is not enough.
    let token = format!("Bearer {}", c.cfg.token);
    let catalog = c.cfg.node("catalog-1").unwrap().addr.clone();
    let plain = reqwest::Client::new()
        .get(format!("http://{catalog}/internal/status"))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 403, "no token over plain HTTP");
    let anonymous = client(&certs, None)
        .get(format!("https://{catalog}/internal/status"))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 403, "TLS without a client certificate");
    let member = client(&certs, Some((&certs, "catalog-2")))
        .get(format!("https://{catalog}/internal/status"))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(member.status(), 200, "a node of the cluster");

    // A node whose certificate comes from another CA: refused at the
    // handshake, for replication as for everything else.
    let other = c.dir.join("other-ca");
    pygmy::tls::generate(&c.cfg, &other).unwrap();
    let impostor = client(&certs, Some((&other, "catalog-2")));
    let replication = impostor
        .post(format!("https://{catalog}/internal/replication"))
        .header("authorization", &token)
        .header("content-type", "application/json")
        .body(r#"{"from":2,"messages":[]}"#)
        .send()
        .await;
    assert!(
        replication.is_err(),
        "a certificate of another CA is refused: {replication:?}"
    );
    let status = impostor
        .get(format!("https://{catalog}/internal/status"))
        .header("authorization", &token)
        .send()
        .await;
    assert!(status.is_err(), "{status:?}");
    // Nothing changed.
    assert_eq!(c.stock(1).await, before - 1);
}
