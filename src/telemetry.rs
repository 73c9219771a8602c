//! Structured logs: `RUST_LOG` filters (default `info`), one line per event.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, tagging every line with `node` when given.
pub fn init(node: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,reqwest=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match node {
        Some(_) => {
            let _ = builder.try_init();
        }
        None => {
            let _ = builder.without_time().try_init();
        }
    }
}
