//! The `pygmy` binary: parses arguments, loads config, starts logging, and
//! calls the library. The operator commands live in `ops.rs`.

mod ops;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use ops::{ConfigArg, Fail, FrontendArg};

/// Exit codes, shown by `pygmy --help` and in the README.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the store answered with an error (unknown book, out of stock, token refused, bad input),
     or a node failed
  2  bad usage: unknown command or flag, missing or unreadable cluster file
  3  `pygmy status`: the cluster is unhealthy (a node unreachable, or no primary known)
  4  nothing answered: is `pygmy up` running (or --config / --frontend pointing elsewhere)?

The cluster file is --config FILE, else $PYGMY_CONFIG, else ./pygmy-data/cluster.toml.";

#[derive(Parser)]
#[command(
    name = "pygmy",
    version,
    about = "Pygmy.com, the world's smallest bookstore — replicated, cached, fault tolerant",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole store on this machine: 1 frontend, 3 order and 3 catalog replicas, as separate processes.
    #[command(
        after_help = "Example:\n  pygmy up                      # data and cluster file in ./pygmy-data\n  pygmy up --data-dir /srv/pygmy --no-cache"
    )]
    Up {
        /// Where the cluster file and every node's data live (created on first start) [default: ./pygmy-data].
        #[arg(long, env = "PYGMY_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Run the frontend without its cache.
        #[arg(long)]
        no_cache: bool,
        /// IP the nodes of a new cluster listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
    /// Run one node of a cluster (what `pygmy up` runs for each node; use it to run nodes on other hosts).
    #[command(
        after_help = "Example:\n  pygmy serve catalog-3\n  pygmy serve --config /etc/pygmy/cluster.toml --listen 0.0.0.0:5004 frontend"
    )]
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// The node to run: frontend, order-2, catalog-1, …
        name: String,
        /// Listen here instead of the node's configured address.
        #[arg(long, env = "PYGMY_LISTEN")]
        listen: Option<SocketAddr>,
        /// Frontend only: no cache.
        #[arg(long)]
        no_cache: bool,
        /// Log lines as text or as one JSON object each.
        #[arg(long, value_enum, default_value = "text", env = "PYGMY_LOG_FORMAT")]
        log_format: pygmy::telemetry::LogFormat,
        /// Threads that run the node's requests. One (the default) serves
        /// everything on one thread, which costs the least where several
        /// nodes share a few cores; give more to a node that has cores of
        /// its own (a frontend under heavy load).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024), env = "PYGMY_THREADS")]
        threads: u16,
    },
    /// Show every node — reachable, ready and, for catalog replicas, role, epoch, primary, versions, view —
    /// probing them concurrently. Exits 3 when a node is unreachable or no primary is known.
    #[command(after_help = "Example:\n  pygmy status\n  pygmy status --output json | jq .primary")]
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show an order replica's order log, newest first, a page at a time.
    #[command(
        alias = "log",
        after_help = "Example:\n  pygmy orders                  # the first order replica's newest 20\n  pygmy orders order-2 --limit 5 --before 42"
    )]
    Orders {
        #[command(flatten)]
        config: ConfigArg,
        /// The order replica (order-1, …) [default: the first in the cluster file].
        node: Option<String>,
        /// Orders per page (1 to 1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Only orders older than this position (the `seq` column; the last page says what to pass).
        #[arg(long)]
        before: Option<u64>,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Admin: set a book's stock and/or cost (the token is read from the cluster file).
    #[command(after_help = "Example:\n  pygmy update 3 --stock 50 --cost 99.5")]
    Update(UpdateArgs),
    /// Look a book up by id (through the frontend).
    #[command(after_help = "Example:\n  pygmy lookup 1")]
    Lookup {
        /// The book's id.
        id: String,
        #[command(flatten)]
        frontend: FrontendArg,
    },
    /// Search the books of a topic (through the frontend).
    #[command(after_help = "Example:\n  pygmy search distributed-systems")]
    Search {
        /// The topic's slug: distributed-systems, graduate-school, …
        topic: String,
        #[command(flatten)]
        frontend: FrontendArg,
    },
    /// Buy one copy of a book. It sends an Idempotency-Key (generated unless --key is given) and
    /// retries with the same key, so running it again with that key after a timeout cannot buy twice.
    #[command(
        after_help = "Example:\n  pygmy buy 1\n  pygmy buy 1 --key 5f0c…       # the key a timed-out run printed: buys at most once"
    )]
    Buy {
        /// The book's id.
        id: String,
        /// The Idempotency-Key to send (printed by every run, to reuse after a timeout).
        #[arg(long, alias = "idempotency-key")]
        key: Option<String>,
        #[command(flatten)]
        frontend: FrontendArg,
    },
    /// Exit 0 when URL answers 200 within 2 s, 1 otherwise (container healthchecks: images have no curl).
    #[command(after_help = "Example:\n  pygmy healthcheck http://127.0.0.1:5001/healthcheck")]
    Healthcheck {
        #[arg(default_value = "http://127.0.0.1:5004/healthcheck")]
        url: String,
    },
    /// Make a cluster CA and, signed by it, a TLS certificate and key for every node of the cluster
    /// file and one for this CLI, in DIR (`[tls] dir = "DIR"` in the cluster file, or
    /// PYGMY_TLS_DIR, then turns TLS on between the nodes). A DIR that already holds a CA is kept.
    #[command(
        after_help = "Example:\n  pygmy certs --config deploy/cluster.toml --out deploy/certs"
    )]
    Certs {
        #[command(flatten)]
        config: ConfigArg,
        /// The folder to write to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Operator: a stopped replica's data directory was moved by copying it, and holds its latest
    /// state (not an old backup): record that these files are its own, so it starts as the same
    /// replica. Without it, a copied directory rejoins as a learner and catches up from the others.
    #[command(after_help = "Example:\n  pygmy seal /srv/pygmy/catalog-2")]
    Seal {
        /// The replica's data directory.
        data_dir: PathBuf,
    },
    /// Measure the store: latency with the cache on and off (Q1), the cost of invalidation (Q2),
    /// failover under load (Q3). Writes report.md, SVG plots and results.json into --out.
    #[command(
        after_help = "Example:\n  pygmy bench --out bench-report                 # all three, on a store it starts (about 3 min)\n  pygmy bench latency --target pygmy-data/cluster.toml --out bench-report\n  pygmy bench soak --soak 3600 --out soak-report       # an hour of mixed and hostile load; memory, descriptors, answers kept over time"
    )]
    Bench {
        /// What to run.
        #[arg(value_enum, default_value = "all")]
        scenario: pygmy::bench::Scenario,
        /// Where to write report.md, the plots and results.json.
        #[arg(long, value_name = "DIR", default_value = "bench-report")]
        out: PathBuf,
        /// Measure a running store, named by its cluster file, instead of starting one
        /// (failover is skipped: it kills processes). It buys books and restocks them.
        #[arg(long, value_name = "FILE")]
        target: Option<PathBuf>,
        /// Short runs: every figure, less time each (rough figures; for tests).
        #[arg(long)]
        quick: bool,
        /// After the scenarios, this many seconds of steady load, hostile requests beside it, with
        /// memory, open descriptors and the answers a catalog replica keeps sampled and plotted (`soak` alone: default 600).
        #[arg(long, value_name = "SECONDS")]
        soak: Option<u64>,
        /// Also measure the targets' anchors on this machine, with the same load generator, once
        /// the store stopped: nginx serving a static file, and a three-member etcd's durable put
        /// (each if installed).
        #[arg(long)]
        anchors: bool,
    },
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  pygmy completions bash > ~/.local/share/bash-completion/completions/pygmy\n  pygmy completions zsh > \"${fpath[1]}/_pygmy\""
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["stock", "cost"])))]
struct UpdateArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The book's id.
    book: String,
    /// The new stock.
    #[arg(long)]
    stock: Option<u64>,
    /// The new cost (at most two decimals).
    #[arg(long)]
    cost: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    pygmy::tune_allocator();
    let cli = Cli::parse();
    // A node runs on as many threads as it is given (one by default: see
    // `Serve::threads`); the tools (the bench's load generator among them)
    // on one per core.
    let mut builder = match &cli.command {
        Cmd::Serve { threads: 1, .. } => tokio::runtime::Builder::new_current_thread(),
        Cmd::Serve { threads, .. } => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(*threads));
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pygmy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.msg.is_empty() {
                eprintln!("pygmy: {}", f.msg);
            }
            ExitCode::from(f.code)
        }
    }
}

async fn run(cmd: Cmd) -> Result<(), Fail> {
    match cmd {
        Cmd::Up {
            data_dir,
            no_cache,
            host,
        } => {
            let data_dir = match data_dir {
                Some(d) => d,
                None => {
                    let d = PathBuf::from(ops::DEFAULT_DATA_DIR);
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
            .map_err(Fail::from)
        }
        Cmd::Serve {
            config,
            name,
            listen,
            no_cache,
            log_format,
            threads: _,
        } => {
            let shutdown = pygmy::shutdown_signal();
            let (_, cfg) = config.load()?;
            pygmy::telemetry::init(Some(&name), log_format);
            let listener = pygmy::bind(&cfg, &name, listen)
                .await
                .map_err(anyhow::Error::from)?;
            let opts = pygmy::frontend::Options { no_cache };
            pygmy::run_node(listener, cfg, &name, opts, shutdown)
                .await
                .with_context(|| format!("node {name} failed"))
                .map_err(Fail::from)
        }
        Cmd::Status { config, output } => ops::status(config, output).await,
        Cmd::Orders {
            config,
            node,
            limit,
            before,
            output,
        } => ops::orders(config, node, limit, before, output).await,
        Cmd::Update(u) => ops::update(u.config, &u.book, u.stock, u.cost).await,
        Cmd::Lookup { id, frontend } => ops::lookup(frontend, &id).await,
        Cmd::Search { topic, frontend } => ops::search(frontend, &topic).await,
        Cmd::Buy { id, key, frontend } => ops::buy(frontend, &id, key).await,
        Cmd::Healthcheck { url } => {
            let http = pygmy::client::Http::new(None, std::time::Duration::from_secs(2));
            let h: serde_json::Value = http.get(url).await.map_err(anyhow::Error::from)?;
            println!("{h}");
            Ok(())
        }
        Cmd::Certs { config, out } => {
            let (_, cfg) = config.load()?;
            let files = pygmy::tls::generate(&cfg, &out).map_err(anyhow::Error::from)?;
            if files.is_empty() {
                println!(
                    "{} already holds a cluster CA; nothing written",
                    out.display()
                );
            } else {
                println!(
                    "wrote a cluster CA and {} certificates in {} (keys readable by their owner only)",
                    files.len() / 2 - 1,
                    out.display()
                );
            }
            Ok(())
        }
        Cmd::Seal { data_dir } => {
            let file = ["catalog.sqlite", "orders.sqlite"]
                .into_iter()
                .find(|f| data_dir.join(f).is_file())
                .ok_or_else(|| {
                    anyhow::anyhow!("{} holds no replica's database", data_dir.display())
                })?;
            pygmy::seal(&data_dir, file, true).map_err(anyhow::Error::from)?;
            println!(
                "{}: {file} recorded as this replica's own; it starts as the same replica",
                data_dir.display()
            );
            Ok(())
        }
        Cmd::Bench {
            scenario,
            out,
            target,
            quick,
            soak,
            anchors,
        } => {
            let target = match target {
                Some(path) => Some(ConfigArg::file(path).load_as_operator()?),
                None => None,
            };
            let command = std::iter::once("pygmy".to_string())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" ");
            let results = pygmy::bench::run(pygmy::bench::Options {
                scenario,
                out: out.clone(),
                target,
                quick,
                soak: soak.map(std::time::Duration::from_secs),
                anchors,
                command,
            })
            .await
            .map_err(Fail::from)?;
            for t in &results.targets {
                let met = match t.met {
                    Some(true) => "met",
                    Some(false) => "NOT met",
                    None => "not measured",
                };
                println!("{:<60} {:<28} {met}", t.what, t.measured);
            }
            println!(
                "pygmy bench: report in {} ({:.0} s)",
                out.join("report.md").display(),
                results.seconds
            );
            Ok(())
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "pygmy", &mut std::io::stdout());
            Ok(())
        }
    }
}
