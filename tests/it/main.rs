//! The integration tests, one crate (one binary, linked once): real
//! processes on loopback, real SQLite files, the deterministic simulator.
//! `cargo test --test it MODULE` runs one module's tests (say
//! `cargo test --test it simulation`).

mod common;
mod sim;

mod bench;
mod browser;
mod cli;
mod compose;
mod hostile;
mod k8s;
mod lifecycle;
mod linearizable;
mod metrics_upkeep;
mod properties;
mod replication;
mod replication_props;
mod schemathesis;
mod simulation;
mod store;
mod telemetry;
mod tls;
