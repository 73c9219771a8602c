//! The catalog service: the books, their stock and price, replicated over
//! the catalog replicas (primary-backup; see [`crate::replication`]).
//!
//! Reads (`/lookup`, `/search`, per replica, token required) are served from
//! the replica's applied state while the core says it may serve reads (a
//! lease), and only once it has applied the version a reader asks for.
//! Writes (`buy` from the order service, the admin's `PUT /catalog/update`)
//! take one path: the primary's log, committed on every member of its view,
//! applied, then cache invalidation at every frontend, then the answer. A
//! replica that is not the primary forwards a write to the primary and
//! relays its answer, as the original's backups did; a write marked
//! [`NO_FORWARD_HEADER`] (already forwarded once, or sent by the order
//! service, which follows the primary itself) is answered with 421 naming
//! the primary instead, so nothing is forwarded twice. A replica that knows
//! no live primary answers 503 with `Retry-After`.

pub(crate) mod codec;
pub(crate) mod driver;
#[doc(hidden)]
pub mod invalidation;
#[doc(hidden)]
pub mod machine;
pub mod seed;
#[doc(hidden)]
pub mod store;
pub(crate) mod stream;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::NodeError;
use crate::api::*;
use crate::client::{
    CatalogClient, ClientError, FrontendClient, Http, NO_FORWARD_HEADER, PRIMARY_HEADER,
};
use crate::config::Role;
use crate::http::{self as h, ApiError, JsonBody, QueryArgs, Segment};
use crate::node::Node;
use crate::replication::{self, Message, NodeId, ReadGate, Replica};

use driver::{Clock, Driver, Gate, Input, Published, WriteError};
use invalidation::{Invalidator, LeaseError};
use store::Db;

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> Self {
        let status = match &e {
            LeaseError::UnknownFrontend(_) => StatusCode::BAD_REQUEST,
            LeaseError::Withheld(_) => StatusCode::CONFLICT,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Most replication bytes in one request or stream frame. A snapshot
/// travels in chunks of 256 KiB (`replication::Config::snapshot_chunk_bytes`),
/// each message far within this.
pub const MAX_REPLICATION_BODY: usize = 256 << 20;

struct Catalog {
    name: String,
    process_id: u64,
    shared: Arc<Published>,
    /// Set once the driver runs (after the start-up decision).
    inputs: RwLock<Option<std::sync::mpsc::SyncSender<Input>>>,
    invalidator: RwLock<Option<(u64, Arc<Invalidator>)>>,
    names: HashMap<NodeId, String>,
    /// The other catalog replicas, to forward writes to the primary.
    peers: HashMap<NodeId, CatalogClient>,
    /// (epoch, commit) of the disk's hard state at start-up: what `status`
    /// reports while the replica is still starting.
    disk: (u64, Version),
    /// Names the writes proposed held until their begins reached the caches.
    tickets: std::sync::atomic::AtomicU64,
    /// For each peer, the newest replication stream it opened here (see
    /// [`stream`]): an older one ends.
    streams: HashMap<NodeId, watch::Sender<u64>>,
    /// Set when this replica stops: its replication streams end.
    stopping: watch::Sender<bool>,
    /// Writes run whole (see [`apply_whole`]).
    writes: crate::http::Whole,
    /// Writes and releases handed over on this turn of the runtime, for
    /// the driver in one input (see [`Catalog::send_soon`]).
    soon: crate::batch::Turn<Input>,
}

/// What every handler gets.
type AppState = Arc<Catalog>;

impl Catalog {
    fn send(&self, input: Input) -> Result<(), ApiError> {
        let guard = self.inputs.read().unwrap_or_else(|p| p.into_inner());
        let tx = guard
            .as_ref()
            .ok_or_else(|| ApiError::unavailable("this replica is still starting"))?;
        tx.try_send(input)
            .map_err(|_| ApiError::unavailable("this replica is overloaded, retry shortly"))
    }

    /// Hands a write or a release to the driver with every other one
    /// handed over on this turn of the runtime, in one input (see
    /// [`crate::batch::Turn`]): a batch's writes then reach the driver
    /// together and go in one replication round, where the first went
    /// alone and the rest waited a round behind it; and the releases of
    /// held writes wake the driver once, not once each.
    fn send_soon(self: &Arc<Self>, input: Input) -> Result<(), ApiError> {
        if self
            .inputs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(ApiError::unavailable("this replica is still starting"));
        }
        if self.soon.push(input) {
            let c = self.clone();
            tokio::spawn(async move { c.hand_over().await });
        }
        Ok(())
    }

    /// Sends what [`Catalog::send_soon`] gathered, as one input. A full
    /// queue refuses the writes (their callers answer 503, as for one
    /// write) and is waited out for the releases: a held write blocks
    /// every later commit, so its release must arrive.
    async fn hand_over(&self) {
        let gathered = self.soon.take().await;
        let Some(tx) = self
            .inputs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let Err(std::sync::mpsc::TrySendError::Full(Input::Batch(gathered))) =
            tx.try_send(Input::Batch(gathered))
        else {
            // Sent, or the driver is gone (and its writes and holds with it).
            return;
        };
        let mut releases = Vec::new();
        for input in gathered {
            match input {
                Input::Write { reply, .. } => {
                    let _ = reply.send(Err(WriteError::Unavailable(
                        "this replica is overloaded, retry shortly".into(),
                    )));
                }
                other => releases.push(other),
            }
        }
        if releases.is_empty() {
            return;
        }
        let mut input = Input::Batch(releases);
        loop {
            match tx.try_send(input) {
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    input = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                _ => return,
            }
        }
    }

    fn name_of(&self, id: NodeId) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// Forwards a write this replica cannot apply to the primary it follows
    /// (once: marked so the primary does not forward it again) and relays
    /// the answer.
    async fn forward(
        &self,
        primary: Option<NodeId>,
        write: &CatalogWrite,
    ) -> Result<Json<WriteResult>, RouteError> {
        let Some(client) = primary
            .filter(|p| *p != self.process_id)
            .and_then(|p| self.peers.get(&p))
        else {
            return Err(self.not_primary(primary));
        };
        let name = self.name_of(primary.unwrap_or_default());
        tracing::debug!(request_id = %write.request_id, primary = %name, "forwarding a write to the primary");
        match client.write(write).await {
            Ok(r) => Ok(Json(r)),
            Err(ClientError::Status { status, message, .. }) if (400..500).contains(&status) && status != 421 && status != 408 => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                Err(ApiError::new(status, message).into())
            }
            Err(e) => Err(ApiError::unavailable(format!(
                "{} forwarded the write to the primary {name}, which could not complete it ({}); retry with the same request id",
                self.name,
                e.status().map_or("no answer".to_string(), |s| format!("status {s}"))
            ))
            .into()),
        }
    }

    /// This replica is not the primary: see [`RouteError::NotPrimary`].
    fn not_primary(&self, primary: Option<NodeId>) -> RouteError {
        RouteError::NotPrimary {
            replica: self.name.clone(),
            primary: primary
                .filter(|p| *p != self.process_id)
                .map(|p| self.name_of(p)),
            live: self.shared.may_serve(),
        }
    }
}

/// Why a catalog route refused.
enum RouteError {
    /// A problem the client is told as it is (4xx, or 503 to retry).
    Problem(ApiError),
    /// A write (or cache lease) only the primary takes: 421 naming the
    /// primary (also in the `Primary` header) while this replica holds a
    /// lease from it; 503 when it knows of no live primary (the last one
    /// only as a hint).
    NotPrimary {
        replica: String,
        primary: Option<String>,
        live: bool,
    },
}

impl From<ApiError> for RouteError {
    fn from(e: ApiError) -> Self {
        RouteError::Problem(e)
    }
}

impl RouteError {
    /// The problem to answer and the primary to name (in the `Primary`
    /// header of a lone write's answer, in the outcome of a batched one).
    fn problem(self) -> (ApiError, Option<String>) {
        match self {
            RouteError::Problem(e) => (e, None),
            RouteError::NotPrimary {
                replica,
                primary: Some(name),
                live,
            } => {
                let e = if live {
                    ApiError::new(
                        StatusCode::MISDIRECTED_REQUEST,
                        format!("{replica} is not the primary; {name} is"),
                    )
                } else {
                    ApiError::unavailable(format!(
                        "{replica} is not the primary and has lost contact with the last one ({name}); no majority reachable?"
                    ))
                };
                (e, Some(name))
            }
            RouteError::NotPrimary {
                replica,
                primary: None,
                ..
            } => (
                ApiError::unavailable(format!(
                    "{replica} is not the primary and knows of none yet"
                )),
                None,
            ),
        }
    }
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        let (e, primary) = self.problem();
        let mut res = e.into_response();
        if let Some(name) = primary
            && let Ok(v) = HeaderValue::from_str(&name)
        {
            res.headers_mut().insert(PRIMARY_HEADER, v);
        }
        res
    }
}

/// What start-up found on disk (see [`open_disk`]).
struct Disk {
    dir: std::path::PathBuf,
    identity: crate::storage::Identity,
    db: Db,
    state: store::State,
    /// The books this replica would found a new cluster with.
    seed_books: Vec<Book>,
}

/// Runs catalog node `node` on `listener` until `shutdown` resolves, in
/// three steps: open the disk, serve while deciding whether to found a new
/// cluster or learn from a running one, then start the replication driver.
pub async fn run(
    listener: TcpListener,
    node: Node,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    crate::metrics::register(Role::Catalog);
    let mut disk = open_disk(&node)?;
    let disk_hard_state = disk
        .db
        .hard_state()
        .map_err(crate::storage::StorageError::from)?
        .map_or((0, Version::default()), |hs| {
            (hs.epoch, store::to_api(hs.commit))
        });
    tracing::info!(
        data_dir = %disk.dir.display(),
        incarnation = disk.identity.incarnation,
        applied = %disk.state.version,
        "catalog store open{}",
        if disk.identity.fresh { " (new data directory)" } else { "" }
    );
    let names: HashMap<NodeId, String> = node
        .cfg
        .nodes_of(Role::Catalog)
        .map(|n| (n.process_id, n.name.clone()))
        .collect();
    let clock = Clock::new();
    let (gate_tx, _) = watch::channel(Gate::default());
    let (primaryship_tx, _) = watch::channel((None, 0));
    let (applied_tx, _) = watch::channel(disk.state.version);
    let shared = Arc::new(Published {
        state: RwLock::new(Arc::new(disk.state.clone())),
        gate: gate_tx,
        primaryship: primaryship_tx,
        applied: applied_tx,
        clock,
        digests: Default::default(),
    });
    let peers: Vec<(String, CatalogClient)> = node.clients(Role::Catalog, &node.http);
    let catalog: AppState = Arc::new(Catalog {
        name: node.name.clone(),
        process_id: node.entry.process_id,
        shared: shared.clone(),
        inputs: RwLock::new(None),
        invalidator: RwLock::new(None),
        names: names.clone(),
        peers: node
            .cfg
            .nodes_of(Role::Catalog)
            .filter(|n| n.name != node.name)
            .map(|n| {
                (
                    n.process_id,
                    CatalogClient::new(n.base_url(), node.http.clone()),
                )
            })
            .collect(),
        disk: disk_hard_state,
        tickets: std::sync::atomic::AtomicU64::new(0),
        soon: Default::default(),
        streams: names
            .keys()
            .filter(|id| **id != node.entry.process_id)
            .map(|id| (*id, watch::Sender::new(0)))
            .collect(),
        stopping: watch::Sender::new(false),
        writes: crate::http::Whole::new(node.cfg.limits.max_in_flight),
    });
    tracing::info!(addr = %listener.local_addr()?, "catalog {} serving", node.name);
    let node = Arc::new(node);
    let server = tokio::spawn({
        let (node, app) = (node.clone(), router(catalog.clone(), &node.cfg.token));
        async move {
            node.serve(
                listener,
                app,
                &[("/internal/replication", MAX_REPLICATION_BODY)],
                shutdown,
            )
            .await
        }
    });

    let persisted = bootstrap_or_learn(&mut disk, &peers).await?;
    let dir = disk.dir.clone();
    let driver = start(&node, &catalog, disk, persisted, names)?;
    tokio::spawn(compare_digests(
        dir.clone(),
        shared.clone(),
        peers,
        node.cfg.nodes_of(Role::Catalog).count(),
    ));

    let res = server
        .await
        .map_err(|e| NodeError::Config(format!("server task failed: {e}")))?;
    catalog.stopping.send_replace(true);
    // Stop the driver: drop the only sender of its inputs. Once it has
    // closed the database (SQLite checkpoints and removes its write-ahead
    // log), the directory is marked cleanly stopped.
    catalog
        .inputs
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let closed = tokio::time::timeout(
        DRIVER_STOP_TIMEOUT,
        tokio::task::spawn_blocking(move || driver.join()),
    )
    .await;
    if matches!(closed, Ok(Ok(Ok(())))) {
        crate::storage::mark_stopped(&dir)?;
    } else {
        tracing::warn!(
            "the replication driver did not stop in time; the next start counts this stop as not clean"
        );
    }
    res?;
    tracing::info!("catalog {} stopped", node.name);
    Ok(())
}

/// Claims the data directory and opens the store, verified row by row:
/// what it holds, and whether it is still the disk this replica promised
/// its peers (a copy, a lost write-ahead log or damage each give it a new
/// incarnation, to rejoin as a learner).
fn open_disk(node: &Node) -> Result<Disk, NodeError> {
    let dir = node.data_dir()?;
    let cfg = &node.cfg;
    let mut identity = crate::storage::claim(&dir, "catalog.sqlite", &cfg.cluster_id, &node.name)?;
    if identity.copied {
        tracing::warn!(
            data_dir = %dir.display(),
            incarnation = identity.incarnation,
            "this data directory's database is not the file it last wrote: it was restored from a copy (or copied), so it may hold less than this replica acknowledged; rejoining as a learner under a new incarnation until caught up (after moving a stopped replica's latest data by copying it, `pygmy seal` says it is the same)"
        );
    }
    // The books this replica would found a new cluster with (read now, so a
    // bad catalog file stops the start); a running cluster's come from its log.
    let seed_books = match cfg.catalog_file() {
        Some(f) => seed::load_books(&f).map_err(NodeError::Config)?,
        None => seed::default_books(),
    };
    // SQLite deletes the write-ahead log when the database closes cleanly,
    // and only then: missing after a stop that was not clean, it was
    // deleted, with the transactions it held (acknowledged entries).
    let wal_present = dir.join("catalog.sqlite-wal").exists();
    let unclean = crate::storage::mark_running(&dir)?;
    if unclean && !wal_present && !identity.fresh && dir.join("catalog.sqlite").exists() {
        identity = crate::storage::renew(&dir, &identity)?;
        tracing::warn!(
            data_dir = %dir.display(),
            incarnation = identity.incarnation,
            "the database's write-ahead log is missing after a stop that was not clean: the transactions it held are lost, so this replica may hold less than it acknowledged; rejoining as a learner under a new incarnation until caught up"
        );
    }
    let db = open_verified(&dir)?;
    crate::storage::seal(&dir, "catalog.sqlite", false)?;
    let state = db
        .load_state()
        .map_err(crate::storage::StorageError::from)?;
    Ok(Disk {
        dir,
        identity,
        db,
        state,
        seed_books,
    })
}

/// The start-up decision: a blank disk is a member of a brand-new cluster
/// (every peer blank too) or a replaced disk, which rejoins as a non-voting
/// learner until caught up; a disk that lost its data or whose log is
/// damaged takes a new incarnation. Returns what the core starts from.
async fn bootstrap_or_learn(
    disk: &mut Disk,
    peers: &[(String, CatalogClient)],
) -> Result<store::Persisted, NodeError> {
    let dir = &disk.dir;
    let blank = disk
        .db
        .is_blank()
        .map_err(crate::storage::StorageError::from)?;
    if blank && !disk.identity.fresh {
        // Emptied (or deleted) next to its identity: what this replica
        // acknowledged is gone, so it must not answer as the same disk.
        disk.identity = crate::storage::renew(dir, &disk.identity)?;
        crate::storage::seal(dir, "catalog.sqlite", true)?;
        tracing::warn!(
            data_dir = %dir.display(),
            incarnation = disk.identity.incarnation,
            "the database is empty but the data directory has served before: its data was lost; starting under a new incarnation"
        );
    }
    if blank {
        if new_cluster(peers).await {
            disk.db
                .bootstrap(&replication::HardState {
                    incarnation: disk.identity.incarnation,
                    ..Default::default()
                })
                .map_err(crate::storage::StorageError::from)?;
            tracing::info!("first start of a new cluster: joining as a voting member");
        } else {
            tracing::info!(
                "new data directory in a running cluster: joining as a learner until caught up"
            );
        }
    }
    let persisted = disk
        .db
        .load_persisted()
        .map_err(crate::storage::StorageError::from)?;
    if let Some(damage) = log_damage(&persisted) {
        disk.identity = crate::storage::renew(dir, &disk.identity)?;
        crate::storage::seal(dir, "catalog.sqlite", true)?;
        tracing::warn!(
            data_dir = %dir.display(),
            incarnation = disk.identity.incarnation,
            "the replication log is damaged ({damage}): this replica may hold less than it acknowledged; rejoining as a learner under a new incarnation until caught up"
        );
    }
    Ok(persisted)
}

/// Starts the replication core on its own thread (the driver), the
/// transport to the peers and the primary's cache invalidation; writes
/// reach the driver from then on. Returns the driver's thread.
fn start(
    node: &Node,
    catalog: &AppState,
    disk: Disk,
    persisted: store::Persisted,
    names: HashMap<NodeId, String>,
) -> Result<std::thread::JoinHandle<()>, NodeError> {
    let Disk {
        db,
        state,
        identity,
        seed_books,
        ..
    } = disk;
    let cfg = &node.cfg;
    let t = &cfg.timing;
    let mut rcfg = replication::Config::new(
        node.entry.process_id,
        identity.incarnation,
        cfg.nodes_of(Role::Catalog).map(|n| n.process_id).collect(),
        uuid::Uuid::new_v4().as_u64_pair().0,
    );
    rcfg.heartbeat_ms = t.heartbeat_ms;
    rcfg.lease_ms = t.lease_ms;
    rcfg.election_timeout_ms = t.election_timeout_ms;
    rcfg.takeover_after_ms = t.takeover_after_ms;
    rcfg.fence_caches = true;
    let drift = rcfg.drift_margin;
    let replica = Replica::new(rcfg, &persisted, catalog.shared.clock.now_ms());
    // The bytes the replica starts with (it encodes them from its tables
    // when its log is compacted); more are built only for a replica that
    // lags.
    metrics::gauge!(crate::metrics::CATALOG_SNAPSHOT_BYTES)
        .set(persisted.snapshot.as_ref().map_or(0, |s| s.data.len()) as f64);
    // The driver's queue: a bounded channel allocates all its slots up
    // front, so its bound is what a node can have in flight (requests are
    // capped at `max_in_flight`), with room for replication batches.
    let (inputs_tx, inputs_rx) =
        std::sync::mpsc::sync_channel(cfg.limits.max_in_flight.max(64) * 2);
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    tokio::spawn(transport(
        node.entry.process_id,
        outbox_rx,
        cfg.nodes_of(Role::Catalog)
            .filter(|n| n.name != node.name)
            .cloned()
            .collect(),
        node.http.clone(),
        t.call_timeout_ms,
    ));
    let tick = Duration::from_millis((t.heartbeat_ms / 5).clamp(1, 10));
    let driver = Driver::new(
        replica,
        db,
        state,
        catalog.shared.clone(),
        inputs_rx,
        outbox_tx,
        names,
        tick,
        seed_books,
        driver::Retention {
            minted_id_ttl_ms: t.minted_id_ttl_ms,
            idempotency_key_ttl_ms: t.idempotency_key_ttl_ms,
        },
    );
    let driver = std::thread::Builder::new()
        .name(format!("{}-driver", node.name))
        .spawn(move || driver.run())
        .map_err(NodeError::Io)?;
    *catalog.inputs.write().unwrap_or_else(|p| p.into_inner()) = Some(inputs_tx);
    tokio::spawn(manage_invalidator(
        Arc::downgrade(catalog),
        node.clients::<FrontendClient>(Role::Frontend, &node.http),
        Duration::from_millis(t.cache_lease_ms),
        Duration::from_millis(t.lease_ms),
        drift,
    ));
    Ok(driver)
}

/// How long a stopping catalog waits for its driver to close the database.
const DRIVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the store and reads every row back against its checksum. Damage
/// (found now, or marked by this replica while it ran) sets the database
/// aside for the operator and starts from an empty one: the replica then
/// rejoins as a learner under a new incarnation and catches up from the
/// primary, and serves nothing it read from the damaged file.
fn open_verified(dir: &std::path::Path) -> Result<Db, NodeError> {
    use crate::storage::{Damaged, StorageError};
    let reason = match crate::storage::damaged_mark(dir) {
        Some(r) => format!("found while running: {r}"),
        None => match Db::open(dir) {
            Ok(db) => match db.verify_all() {
                Ok(()) => return Ok(db),
                Err(e) => match Damaged::find(&e) {
                    Some(r) => r,
                    None => return Err(StorageError::from(e).into()),
                },
            },
            Err(StorageError::Corrupt { source, .. }) => {
                format!("SQLite finds the file damaged: {source}")
            }
            Err(StorageError::Sqlite(e)) if Damaged::find(&e).is_some() => {
                Damaged::find(&e).unwrap_or_default()
            }
            Err(e) => return Err(e.into()),
        },
    };
    let aside = crate::storage::set_aside(dir, "catalog.sqlite")?;
    tracing::error!(
        data_dir = %dir.display(),
        set_aside_as = %aside,
        "DAMAGED DATA: {reason}. Nothing from it will be served: the database was set aside (kept for inspection) and this replica starts empty, rejoining as a learner under a new incarnation to catch up from the primary"
    );
    Ok(Db::open(dir)?)
}

/// What is wrong with a persisted replication log, if anything: entries
/// missing after the snapshot or between entries, or a commit point past
/// the end (a log truncated from outside). The core would start from the
/// intact prefix; the replica must not count as the disk that acknowledged
/// the rest.
fn log_damage(p: &store::Persisted) -> Option<String> {
    let base = p.snapshot.as_ref().map_or(0, |s| s.version.seq);
    let mut expect = base + 1;
    for e in p.entries.iter().filter(|e| e.version.seq > base) {
        if e.version.seq != expect {
            return Some(format!(
                "entries {expect}..{} are missing",
                e.version.seq - 1
            ));
        }
        expect += 1;
    }
    let last = expect - 1;
    (p.hard_state.commit.seq > last).then(|| {
        format!(
            "it ends at {last}, before its commit point {}",
            p.hard_state.commit.seq
        )
    })
}

/// Whether this blank replica is part of a cluster's first start: every
/// peer that answers is blank as well (epoch 0), and enough answer to make
/// a majority with us. Any peer with history makes us a learner.
async fn new_cluster(peers: &[(String, CatalogClient)]) -> bool {
    loop {
        let mut answers = Vec::with_capacity(peers.len());
        for (_, p) in peers {
            let s = p.status().await;
            answers.push(s.ok().map(|s| (s.epoch, s.commit.seq)));
        }
        if let Some(founding) = founds_new_cluster(&answers) {
            return founding;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The start-up decision of a blank replica from its peers' answers
/// (`(epoch, commit seq)` of each peer's disk, `None`: no answer): `false`
/// (a learner) as soon as one has history; `true` (a founding voter) once
/// every peer answered blank; `None`: ask again. A peer that is itself
/// still starting reports what its disk holds, never a blank it has not
/// checked. Every peer, not a majority: a peer answering blank may be a
/// member that never caught up, while the cluster's history lives on a
/// peer that does not answer now; founding with it would lose that history.
pub fn founds_new_cluster(answers: &[Option<(u64, u64)>]) -> Option<bool> {
    let needed = answers.len();
    let mut blank = 0;
    for a in answers.iter().flatten() {
        match a {
            (0, 0) => blank += 1,
            _ => return Some(false),
        }
    }
    (blank >= needed).then_some(true)
}

/// Sends the core's messages: one task per peer, each sending what has
/// queued up as one batch, on a stream ([`stream::send_to`]). Lost
/// messages are fine (the core retries).
async fn transport(
    me: NodeId,
    mut outbox: mpsc::UnboundedReceiver<(NodeId, Message)>,
    peers: Vec<crate::config::NodeConfig>,
    http: Http,
    timeout_ms: u64,
) {
    let mut queues: HashMap<NodeId, mpsc::UnboundedSender<Message>> = HashMap::new();
    for p in peers {
        let (tx, rx) = mpsc::unbounded_channel::<Message>();
        queues.insert(p.process_id, tx);
        tokio::spawn(stream::send_to(
            me,
            p.base_url(),
            rx,
            http.clone(),
            Duration::from_millis(timeout_ms),
        ));
    }
    while let Some((to, msg)) = outbox.recv().await {
        if let Some(q) = queues.get(&to) {
            let _ = q.send(msg);
        }
    }
}

/// Keeps an invalidator while this replica is primary, a new one for each
/// epoch. It first fences every frontend (flush, drop the lease; see
/// `invalidation`), and only then tells the core it may become ready. Until
/// the fence reached a frontend, that frontend is assumed to hold a cache
/// lease from an earlier primary for as long as one can last: granted at
/// most a replication lease from now (the earlier primary's read lease),
/// lasting a cache lease.
async fn manage_invalidator(
    catalog: std::sync::Weak<Catalog>,
    frontends: Vec<(String, FrontendClient)>,
    lease: Duration,
    replication_lease: Duration,
    drift: f64,
) {
    let Some(c) = catalog.upgrade() else { return };
    let mut primaryship = c.shared.primaryship.subscribe();
    drop(c);
    loop {
        let (role, epoch) = *primaryship.borrow_and_update();
        let Some(c) = catalog.upgrade() else { return };
        {
            let mut inv = c.invalidator.write().unwrap_or_else(|p| p.into_inner());
            let current = inv.as_ref().map(|(e, _)| *e);
            let primary = role == Some(replication::Role::Primary);
            if primary && current != Some(epoch) {
                let assumed = (lease + replication_lease).mul_f64(1.0 + drift);
                let new = Arc::new(Invalidator::new(
                    frontends.clone(),
                    lease,
                    drift,
                    assumed,
                    epoch,
                ));
                *inv = Some((epoch, new.clone()));
                let weak = catalog.clone();
                tokio::spawn(async move {
                    new.fence().await;
                    if let Some(c) = weak.upgrade() {
                        let _ = c.send(Input::CachesFenced { epoch });
                    }
                });
            } else if !primary {
                *inv = None;
            }
        }
        drop(c);
        if primaryship.changed().await.is_err() {
            return;
        }
    }
}

fn router(state: AppState, token: &str) -> Router {
    let internal = Router::new()
        .route("/lookup/{id}", get(lookup))
        .route("/internal/lookups", post(lookups))
        .route("/search/{topic}", get(search))
        .route("/topics", get(topics))
        .route("/internal/write", post(write))
        .route("/internal/writes", post(writes))
        .route("/catalog/update", put(update))
        .route("/internal/cache-lease", post(cache_lease))
        .route("/internal/status", get(status))
        .route("/internal/digests", get(digests))
        .route(
            "/internal/replication",
            post(replication_in).layer(axum::extract::DefaultBodyLimit::max(MAX_REPLICATION_BODY)),
        )
        .route(stream::PATH, get(stream::accept));
    let public = Router::new().route("/readyz", get(readyz));
    public.merge(h::internal(internal, token)).with_state(state)
}

/// `GET /readyz`: ready when this replica knows a primary and either is that
/// primary, ready for writes, or holds a lease to serve reads (and forwards
/// writes to the primary).
async fn readyz(State(c): State<AppState>) -> Result<Json<Health>, ApiError> {
    let g = *c.shared.gate.borrow();
    let serves = c.shared.may_serve();
    crate::readiness::answer(match (g.primary, g.primary_ready || serves) {
        (None, _) => Some(format!("{} knows no primary", c.name)),
        (Some(_), false) => Some(format!("{} may not serve yet (no lease)", c.name)),
        (Some(_), true) => None,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupArgs {
    min_version: Option<String>,
}

/// Waits until this replica may serve a read at least at `min` that shows
/// every write committed anywhere before the read arrived.
async fn readable_state(c: &Catalog, min: Version) -> Result<Arc<store::State>, ApiError> {
    let mut applied = c.shared.applied.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    let target = c.shared.read_target(min);
    loop {
        match c.shared.admit(target) {
            ReadGate::Serve => return Ok(c.shared.state()),
            ReadGate::Refuse => {
                metrics::counter!(crate::metrics::REPL_LEASE_REFUSALS).increment(1);
                return Err(ApiError::unavailable(format!(
                    "{} may not serve reads now (no lease)",
                    c.name
                )));
            }
            ReadGate::NotYet => {
                if tokio::time::timeout_at(deadline, applied.changed())
                    .await
                    .is_err()
                {
                    return Err(ApiError::unavailable(format!(
                        "{} has not yet applied position {target} (it is at {})",
                        c.name,
                        *c.shared.applied.borrow()
                    )));
                }
            }
        }
    }
}

async fn lookup(
    State(c): State<AppState>,
    Segment(id): Segment,
    QueryArgs(args): QueryArgs<LookupArgs>,
) -> Result<Json<LookupResponse>, ApiError> {
    let id = BookId::parse(&id)?;
    let min = match args.min_version {
        Some(v) => v.parse()?,
        None => Version::default(),
    };
    let state = readable_state(&c, min).await?;
    state
        .lookup(id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no book with id {id}")))
}

/// `POST /internal/lookups`: every book asked for, read from one state.
async fn lookups(
    State(c): State<AppState>,
    JsonBody(batch): JsonBody<LookupBatch>,
) -> Result<Json<LookupBatchReply>, ApiError> {
    if batch.ids.is_empty() || batch.ids.len() > MAX_LOOKUP_BATCH {
        return Err(ApiError::bad_request(format!(
            "ask for 1 to {MAX_LOOKUP_BATCH} books, not {}",
            batch.ids.len()
        )));
    }
    let state = readable_state(&c, batch.min_version.unwrap_or_default()).await?;
    Ok(Json(LookupBatchReply {
        books: batch.ids.iter().map(|id| state.lookup(*id)).collect(),
    }))
}

async fn search(
    State(c): State<AppState>,
    Segment(topic): Segment,
) -> Result<Json<SearchResponse>, ApiError> {
    let topic = TopicSlug::parse(&topic)?;
    let state = readable_state(&c, Version::default()).await?;
    Ok(Json(state.search(&topic)))
}

/// Every topic: slug → display name.
async fn topics(State(c): State<AppState>) -> Result<Json<TopicsResponse>, ApiError> {
    let state = readable_state(&c, Version::default()).await?;
    let topics = state
        .books
        .values()
        .filter_map(|b| {
            Some((
                TopicSlug::of_name(&b.topic).ok()?.to_string(),
                b.topic.clone(),
            ))
        })
        .collect();
    Ok(Json(TopicsResponse { topics }))
}

/// The one write path: the replicated log (committed on the view, applied),
/// then cache invalidation at every frontend, then the answer. A retried
/// request id gets its first answer, and its invalidation again.
async fn apply(
    c: &AppState,
    write: CatalogWrite,
    may_forward: bool,
) -> Result<Json<WriteResult>, RouteError> {
    let book = write.op.book_id();
    // Only a primary holds an invalidator. Every cache must have the
    // write's begin before the write can commit (and so become visible):
    // the begin is queued first, the write is proposed *held* meanwhile
    // (replicated and made durable, not committed), and released once
    // every cache has the begin — the two round trips overlap.
    let inv = c
        .invalidator
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let held = inv.as_ref().map(|(_, inv)| {
        let ticket = c.tickets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (ticket, inv.begin(book))
    });
    let (reply, mut rx) = oneshot::channel();
    let (committed, mut committed_rx) = oneshot::channel();
    let forwardable = may_forward.then(|| write.clone());
    let epoch = inv.as_ref().map(|(e, _)| *e);
    let ticket = held.as_ref().map(|(t, _)| *t);
    if let Err(e) = c.send_soon(Input::Write {
        write,
        epoch,
        ticket,
        reply,
        committed,
    }) {
        end_refused(&inv, book, *c.shared.applied.borrow());
        return Err(e.into());
    }
    if let Some((ticket, begun)) = held {
        // Not tied to this request: a client that goes away must not leave
        // its write held.
        let weak = Arc::downgrade(c);
        tokio::spawn(async move {
            begun.await;
            if let Some(c) = weak.upgrade() {
                let _ = c.send_soon(Input::Begun { ticket });
            }
        });
    }
    // The write's end leaves for the caches as soon as its entry commits,
    // while the primary applies it (see `driver::Io::tell_committed`); a
    // write answered without committing here (a retry answered from
    // before, a refusal) sends its end once answered, as before.
    let mut ended = None;
    let mut commit_heard = false;
    let answer = loop {
        tokio::select! {
            biased;
            v = &mut committed_rx, if !commit_heard => {
                commit_heard = true;
                if let (Ok(v), Some((_, inv))) = (v, inv.as_ref()) {
                    ended = Some(inv.end_queued(book, v));
                }
            }
            r = &mut rx => break r,
        }
    };
    let result = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            if ended.is_none() {
                end_refused(&inv, book, *c.shared.applied.borrow());
            }
            return match e {
                WriteError::NotPrimary { primary } => match forwardable {
                    Some(w) => c.forward(primary, &w).await,
                    None => Err(c.not_primary(primary)),
                },
                WriteError::UnknownBook(id) => {
                    Err(ApiError::not_found(format!("no book with id {id}")).into())
                }
                WriteError::Unavailable(why) => Err(ApiError::unavailable(why).into()),
                e @ WriteError::Expired(_) => Err(ApiError::conflict(e.to_string()).into()),
            };
        }
        Err(_) => {
            if ended.is_none() {
                end_refused(&inv, book, *c.shared.applied.borrow());
            }
            return Err(ApiError::unavailable("this replica is stopping").into());
        }
    };
    match (inv, ended) {
        // The write's end reaches every cache before its client is answered.
        (Some(_), Some(ended)) => ended.await,
        (Some((_, inv)), None) => inv.end(book, result.version).await,
        // Committed, but no longer primary: the next primary answers the
        // retry (same request id) and invalidates then.
        (None, _) => {
            return Err(ApiError::unavailable(
                "primaryship changed; retry with the same request id",
            )
            .into());
        }
    }
    Ok(Json(result))
}

/// The end of a write begun at the caches and answered without committing
/// here: nobody waits for it (`version`: any applied version).
fn end_refused(inv: &Option<(u64, Arc<Invalidator>)>, book: BookId, version: Version) {
    if let Some((_, inv)) = inv {
        // Queued now; its delivery is not waited for.
        drop(inv.end_queued(book, version));
    }
}

/// [`apply`] in a task of its own, which the caller awaits: a caller that
/// goes away (its client gave up, its connection closed) must not cut a
/// write short between its begin at the caches and its end. The write may
/// still commit, and without its end every cache would keep the book
/// pending, never caching it again.
async fn apply_whole(
    c: &AppState,
    write: CatalogWrite,
    may_forward: bool,
) -> Result<Json<WriteResult>, RouteError> {
    let c2 = c.clone();
    c.writes
        .run(async move { apply(&c2, write, may_forward).await })
        .await
}

/// Whether the sender allows this write to be forwarded to the primary.
fn may_forward(headers: &HeaderMap) -> bool {
    !headers.contains_key(NO_FORWARD_HEADER)
}

async fn write(
    State(c): State<AppState>,
    headers: HeaderMap,
    JsonBody(w): JsonBody<CatalogWrite>,
) -> Result<Json<WriteResult>, RouteError> {
    tracing::debug!(write_id = %w.request_id, "write received");
    apply_whole(&c, w, may_forward(&headers)).await
}

/// `POST /internal/writes`: each write applied here as if it came alone
/// (never forwarded), all at once, so they share the primary's next
/// appends; one outcome per write, in order. A replica that is not the
/// primary refuses the whole batch as it refuses one write (421 naming the
/// primary), so the caller follows the primary with the batch.
async fn writes(
    State(c): State<AppState>,
    JsonBody(b): JsonBody<WriteBatch>,
) -> Result<Json<WriteBatchReply>, RouteError> {
    crate::batch::check(b.writes.len(), MAX_WRITE_BATCH, &b.request_ids)?;
    let results: Vec<Result<Json<WriteResult>, RouteError>> =
        crate::batch::run_all(b.writes, b.request_ids, |w| {
            let c = c.clone();
            async move {
                tracing::debug!(write_id = %w.request_id, "write received (in a batch)");
                apply_whole(&c, w, false).await
            }
        })
        .await
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(ApiError::unavailable(
                    "the write's task failed; retry with the same request id",
                )
                .into())
            })
        })
        .collect();
    let refused_whole = results
        .iter()
        .all(|r| matches!(r, Err(RouteError::NotPrimary { .. })));
    let mut results = results.into_iter();
    if refused_whole && let Some(Err(e)) = results.next() {
        return Err(e);
    }
    let outcomes = results
        .map(|r| match r {
            Ok(Json(done)) => WriteOutcome::Done(done),
            Err(e) => {
                let (e, primary) = e.problem();
                WriteOutcome::Refused {
                    status: e.status.as_u16(),
                    message: e.message,
                    primary,
                }
            }
        })
        .collect();
    Ok(Json(WriteBatchReply { outcomes }))
}

async fn update(
    State(c): State<AppState>,
    headers: HeaderMap,
    JsonBody(u): JsonBody<UpdateRequest>,
) -> Result<Json<WriteResult>, RouteError> {
    if u.stock.is_none() && u.cost.is_none() {
        return Err(ApiError::bad_request("nothing to update: give stock and/or cost").into());
    }
    if u.stock.is_some_and(|s| s > MAX_STOCK) {
        return Err(ApiError::bad_request(format!("stock must be at most {MAX_STOCK}")).into());
    }
    let request_id = match u.request_id {
        Some(r) => r,
        None => RequestId::mint_as("u", unix_ms()),
    };
    let w = CatalogWrite {
        request_id,
        op: CatalogOp::Update {
            book_id: u.id,
            stock: u.stock,
            cost: u.cost,
        },
    };
    apply_whole(&c, w, may_forward(&headers)).await
}

async fn cache_lease(
    State(c): State<AppState>,
    JsonBody(r): JsonBody<LeaseRequest>,
) -> Result<Json<LeaseGrant>, RouteError> {
    let g = *c.shared.gate.borrow();
    let inv = c
        .invalidator
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match inv {
        // A catalog not yet seeded has nothing to cache (an empty search
        // cached now would hide the books once the seed commits).
        Some((epoch, inv))
            if g.primary_ready
                && g.epoch == epoch
                && c.shared.may_serve()
                && !c.shared.state().books.is_empty() =>
        {
            let version = *c.shared.applied.borrow();
            inv.grant(&r.frontend, version)
                .map(Json)
                .map_err(|e| ApiError::from(e).into())
        }
        _ => Err(c.not_primary(g.primary)),
    }
}

/// `GET /internal/digests`: this replica's latest state digests.
async fn digests(State(c): State<AppState>) -> Json<Vec<StateDigest>> {
    let d = c.shared.digests.lock().unwrap_or_else(|p| p.into_inner());
    Json(
        d.iter()
            .map(|(version, digest)| StateDigest {
                version: *version,
                digest: format!("{digest:016x}"),
            })
            .collect(),
    )
}

/// Compares this replica's state digests with its peers' at the same
/// versions, every second (as etcd's corruption check does). When a
/// majority of the replicas agree on another digest, this replica's state
/// is the damaged one: it stops serving and rebuilds ([`driver::rebuild`]).
/// A difference no majority settles is logged loudly.
async fn compare_digests(
    dir: std::path::PathBuf,
    shared: Arc<Published>,
    peers: Vec<(String, CatalogClient)>,
    replicas: usize,
) {
    let majority = replicas / 2 + 1;
    let mut reported = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mine: Vec<(Version, u64)> = shared
            .digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if mine.is_empty() {
            continue;
        }
        let mut theirs = Vec::new();
        for (name, p) in &peers {
            if let Ok(list) = p.digests().await {
                let m: HashMap<Version, String> =
                    list.into_iter().map(|d| (d.version, d.digest)).collect();
                theirs.push((name, m));
            }
        }
        for (v, d) in &mine {
            let d = format!("{d:016x}");
            let mut others: HashMap<&String, Vec<&String>> = HashMap::new();
            for (name, m) in &theirs {
                if let Some(x) = m.get(v) {
                    others.entry(x).or_default().push(name);
                }
            }
            if let Some((x, who)) = others
                .iter()
                .find(|(x, who)| ***x != d && who.len() >= majority)
            {
                let why = format!(
                    "this replica's state digest at version {v} is {d}, but {} agree on {x}: its state differs from the cluster's",
                    who.iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(" and ")
                );
                let dir = dir.clone();
                let _ = tokio::task::spawn_blocking(move || driver::rebuild(&dir, &why)).await;
            }
            if others.keys().any(|x| **x != d) && reported.insert(*v) {
                tracing::error!(
                    version = %v,
                    digest = %d,
                    others = ?others,
                    "DAMAGED DATA on some replica: state digests differ at the same version and no majority says which is damaged"
                );
            }
        }
    }
}

async fn status(State(c): State<AppState>) -> Result<Json<NodeStatus>, ApiError> {
    let (reply, rx) = oneshot::channel();
    if c.send(Input::Status { reply }).is_err() {
        // Still starting: report what the disk holds (a blank disk only if
        // it is blank), so a blank peer deciding whether it founds a new
        // cluster never takes a starting replica with history for blank.
        return Ok(Json(NodeStatus {
            name: c.name.clone(),
            role: ReplicaRole::Starting,
            process_id: c.process_id,
            epoch: c.disk.0,
            primary: None,
            applied: *c.shared.applied.borrow(),
            commit: c.disk.1,
            in_view: false,
            view: vec![],
            books: c.shared.state().books.len() as u64,
        }));
    }
    let s = rx
        .await
        .map_err(|_| ApiError::unavailable("this replica is stopping"))?;
    let role = match s.role {
        _ if s.learner => ReplicaRole::Learner,
        replication::Role::Primary => ReplicaRole::Primary,
        replication::Role::Follower => ReplicaRole::Backup,
        replication::Role::PreCandidate | replication::Role::Candidate => ReplicaRole::Candidate,
    };
    Ok(Json(NodeStatus {
        name: c.name.clone(),
        role,
        process_id: c.process_id,
        epoch: s.epoch,
        primary: s.primary.map(|p| c.name_of(p)),
        applied: store::to_api(s.applied),
        commit: store::to_api(s.commit),
        in_view: c.shared.may_serve(),
        view: s.view.iter().map(|p| c.name_of(*p)).collect(),
        books: c.shared.state().books.len() as u64,
    }))
}

async fn replication_in(
    State(c): State<AppState>,
    JsonBody(batch): JsonBody<ReplicationBatch>,
) -> Result<Json<Health>, ApiError> {
    if !c.names.contains_key(&batch.from) || batch.from == c.process_id {
        return Err(ApiError::bad_request(format!(
            "unknown sender {}",
            batch.from
        )));
    }
    for msg in batch.messages {
        c.send(Input::Net {
            from: batch.from,
            msg,
        })?;
    }
    Ok(Json(Health {
        message: "OK".into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::founds_new_cluster;

    #[test]
    fn a_blank_disk_founds_a_cluster_only_with_every_peer_blank_and_none_with_history() {
        assert_eq!(
            founds_new_cluster(&[Some((0, 0)), Some((0, 0))]),
            Some(true),
            "every peer blank: a new cluster"
        );
        assert_eq!(
            founds_new_cluster(&[Some((0, 0)), None]),
            None,
            "a peer that does not answer may hold the cluster's history: ask again"
        );
        assert_eq!(
            founds_new_cluster(&[None, None]),
            None,
            "nobody answered: ask again"
        );
        assert_eq!(
            founds_new_cluster(&[Some((0, 0)), Some((3, 40))]),
            Some(false),
            "a peer with history"
        );
        assert_eq!(
            founds_new_cluster(&[Some((2, 0)), None]),
            Some(false),
            "an epoch is history too"
        );
        assert_eq!(
            founds_new_cluster(&[Some((0, 0)), Some((0, 0)), Some((0, 0)), None]),
            None,
            "five replicas need all four peers"
        );
        assert_eq!(
            founds_new_cluster(&[Some((0, 0)); 4]),
            Some(true),
            "five blank replicas found it"
        );
    }
}
