//! The `pygmy` binary: parses arguments, loads config, starts logging, and
//! calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use pygmy::client::{CatalogClient, FrontendClient, Http, OrderClient};
use pygmy::config::{ClusterConfig, Role};

#[derive(Parser)]
#[command(
    name = "pygmy",
    version,
    about = "Pygmy.com, the world's smallest bookstore — replicated, cached, fault tolerant"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole store on this machine: 1 frontend, 3 order and the catalog replicas, as separate processes.
    Up {
        /// Where the cluster file and every node's data live (created on first start).
        #[arg(long, env = "PYGMY_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Run the frontend without its cache.
        #[arg(long)]
        no_cache: bool,
        /// IP the nodes of a new cluster listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
    /// Run one node of a cluster.
    Serve {
        /// The cluster file.
        #[arg(long, env = "PYGMY_CONFIG")]
        config: PathBuf,
        /// The node to run: frontend, order-2, catalog-1, …
        name: String,
        /// Listen here instead of the node's configured address.
        #[arg(long, env = "PYGMY_LISTEN")]
        listen: Option<SocketAddr>,
        /// Frontend only: no cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Show every node: reachable or not and, for catalog replicas, role, epoch, primary, applied version, view.
    Status {
        #[arg(long, env = "PYGMY_CONFIG")]
        config: PathBuf,
    },
    /// Show an order replica's log, newest first.
    Log {
        #[arg(long, env = "PYGMY_CONFIG")]
        config: PathBuf,
        /// The order node (order-1, …).
        name: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Client calls against a frontend.
    Lookup {
        id: String,
        #[arg(long, default_value = "http://127.0.0.1:5004", env = "PYGMY_FRONTEND")]
        frontend: String,
    },
    Search {
        topic: String,
        #[arg(long, default_value = "http://127.0.0.1:5004", env = "PYGMY_FRONTEND")]
        frontend: String,
    },
    Buy {
        id: String,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:5004", env = "PYGMY_FRONTEND")]
        frontend: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Up {
                data_dir,
                no_cache,
                host,
            } => {
                let data_dir = match data_dir {
                    Some(d) => d,
                    None => {
                        let d = PathBuf::from("pygmy-data");
                        println!("pygmy: no --data-dir given; using ./{}", d.display());
                        d
                    }
                };
                pygmy::cluster::up(pygmy::cluster::UpOptions {
                    data_dir,
                    host,
                    no_cache,
                    catalogs: 3,
                })
                .await
            }
            Cmd::Serve {
                config,
                name,
                listen,
                no_cache,
            } => {
                pygmy::telemetry::init(Some(&name));
                let cfg = ClusterConfig::load(&config)?;
                let listener = pygmy::bind(&cfg, &name, listen).await?;
                let opts = pygmy::frontend::Options { no_cache };
                pygmy::run_node(listener, cfg, &name, opts, pygmy::http::shutdown_signal())
                    .await
                    .with_context(|| format!("node {name} failed"))
            }
            Cmd::Status { config } => status(ClusterConfig::load(&config)?).await,
            Cmd::Log {
                config,
                name,
                limit,
            } => {
                let cfg = ClusterConfig::load(&config)?;
                let node = cfg.node(&name).context("no such node")?;
                let http = Http::new(Some(cfg.token.clone()), Duration::from_secs(5));
                let page = OrderClient::new(node.base_url(), http)
                    .log(limit, None)
                    .await?;
                println!("{}", serde_json::to_string_pretty(&page)?);
                Ok(())
            }
            Cmd::Lookup { id, frontend } => print(client(&frontend).lookup(&id).await),
            Cmd::Search { topic, frontend } => print(client(&frontend).search(&topic).await),
            Cmd::Buy {
                id,
                idempotency_key,
                frontend,
            } => print(client(&frontend).buy(&id, idempotency_key.as_deref()).await),
        }
    })
}

fn client(base: &str) -> FrontendClient {
    FrontendClient::new(
        base.trim_end_matches('/'),
        Http::new(None, Duration::from_secs(15)),
    )
}

fn print<T: serde::Serialize>(r: Result<T, pygmy::client::ClientError>) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&r?)?);
    Ok(())
}

async fn status(cfg: ClusterConfig) -> anyhow::Result<()> {
    let http = Http::new(Some(cfg.token.clone()), Duration::from_secs(2));
    println!(
        "{:<12} {:<9} {:<10} {:>6} {:<12} {:>12} {:>12} {:<8} reachable",
        "node", "kind", "role", "epoch", "primary", "applied", "committed", "in view"
    );
    for n in &cfg.nodes {
        let reach = FrontendClient::new(n.base_url(), http.clone())
            .health()
            .await
            .is_ok();
        let row = |role: &str,
                   epoch: String,
                   primary: &str,
                   applied: String,
                   commit: String,
                   in_view: &str| {
            println!(
                "{:<12} {:<9} {:<10} {:>6} {:<12} {:>12} {:>12} {:<8} {}",
                n.name,
                n.role.to_string(),
                role,
                epoch,
                primary,
                applied,
                commit,
                in_view,
                if reach { "yes" } else { "no" }
            )
        };
        match (n.role, reach) {
            (Role::Catalog, true) => match CatalogClient::new(n.base_url(), http.clone())
                .status()
                .await
            {
                Ok(s) => row(
                    &s.role,
                    s.epoch.to_string(),
                    s.primary.as_deref().unwrap_or("-"),
                    s.applied.to_string(),
                    s.commit.to_string(),
                    if s.in_view { "yes" } else { "no" },
                ),
                Err(e) => row(
                    &format!("? ({e})"),
                    "-".into(),
                    "-",
                    "-".into(),
                    "-".into(),
                    "-",
                ),
            },
            (_, true) => row("up", "-".into(), "-", "-".into(), "-".into(), "-"),
            (_, false) => row("down", "-".into(), "-", "-".into(), "-".into(), "-"),
        }
    }
    Ok(())
}
