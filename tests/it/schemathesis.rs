//! Schemathesis against a running frontend: it reads `GET /openapi.json`,
//! generates valid and invalid requests for every public operation, and
//! checks that each gets a documented answer matching its schema — and never
//! a 5xx.
//!
//! Uses `st` from PATH (`.ci/run` installs it); otherwise installs the pinned
//! version into a virtualenv under the target folder, so `cargo test` works
//! on a fresh machine with Python 3.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{Options, TestCluster};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";

fn schemathesis() -> PathBuf {
    let on_path = Command::new("st").arg("--version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return PathBuf::from("st");
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-venv");
    let st = venv.join("bin/st");
    if !st.exists() {
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(ok.success(), "python3 -m venv failed");
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", SCHEMATHESIS])
            .status()
            .expect("pip runs");
        assert!(ok.success(), "pip install {SCHEMATHESIS} failed");
    }
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_every_answer_documented_and_no_server_error() {
    let st = schemathesis();
    let c = TestCluster::start(Options::default()).await;
    let url = format!("{}/openapi.json", c.url("frontend"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .args([
                "--config-file",
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/schemathesis.toml"),
            ])
            .args([
                "run",
                &url,
                "--checks",
                "all",
                "--max-examples",
                "100",
                "--seed",
                "20261124",
                "--no-color",
            ])
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("passed"), "schemathesis ran no test:\n{text}");
    // It exercised the store for real: some buys went through.
    let logged = c.order_log_len().await;
    assert!(logged > 0, "no buy reached the order service:\n{text}");
}
