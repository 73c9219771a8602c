//! The catalog's state: books in SQLite (WAL, fsync on commit) and a copy in
//! memory that reads are served from. Every write goes through one path:
//! the writer thread applies ops in log order — the stock check and the
//! decrement of a buy are one step there — records each op with its request
//! id and outcome in the log (so a request id is applied at most once),
//! commits the batch durably, and only then publishes the new state and
//! answers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot, watch};

use crate::api::*;
use crate::storage::{self, Identity, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("no book with id {0}")]
    UnknownBook(BookId),
    #[error("this replica has not yet applied version {wanted} (it is at {at})")]
    NotYet { wanted: Version, at: Version },
    #[error("{0}")]
    Storage(String),
}

/// The state reads are served from. Invariant: it is exactly the committed
/// content of the database at `version`.
#[derive(Debug, Default)]
pub struct State {
    pub books: HashMap<BookId, Book>,
    /// topic slug → title → id
    pub topics: HashMap<String, BTreeMap<String, BookId>>,
    pub version: Version,
}

impl State {
    fn insert(&mut self, book: Book) {
        if let Ok(slug) = TopicSlug::of_name(&book.topic) {
            self.topics
                .entry(slug.as_str().to_string())
                .or_default()
                .insert(book.title.clone(), book.id);
        }
        self.books.insert(book.id, book);
    }
}

struct Job {
    write: CatalogWrite,
    reply: oneshot::Sender<Result<WriteResult, CatalogError>>,
}

pub struct CatalogStore {
    state: Arc<RwLock<State>>,
    writer: mpsc::Sender<Job>,
    applied: watch::Receiver<Version>,
    pub identity: Identity,
    pub epoch: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS books (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    topic TEXT NOT NULL,
    cost_cents INTEGER NOT NULL CHECK (cost_cents >= 0),
    stock INTEGER NOT NULL CHECK (stock >= 0)
);
-- Every applied write, in order. request_id is unique: the set of applied
-- request ids, with each one's outcome, is part of the durable state.
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    request_id TEXT NOT NULL UNIQUE,
    op TEXT NOT NULL,
    outcome TEXT NOT NULL
);
";

impl CatalogStore {
    /// Opens (or creates and seeds) the store in `dir`.
    pub fn open(dir: &Path, cluster_id: &str, node: &str, seed: impl FnOnce() -> Result<Vec<Book>, String>) -> Result<Self, StorageError> {
        let identity = storage::claim(dir, "catalog.sqlite", cluster_id, node)?;
        let conn = storage::open(dir, "catalog.sqlite")?;
        conn.execute_batch(SCHEMA)?;
        let empty: bool = conn.query_row("SELECT NOT EXISTS (SELECT 1 FROM books)", [], |r| r.get(0))?;
        if empty {
            let books = seed().map_err(StorageError::Invalid)?;
            let tx = conn.unchecked_transaction()?;
            {
                let mut ins = tx.prepare("INSERT INTO books (id, title, topic, cost_cents, stock) VALUES (?1, ?2, ?3, ?4, ?5)")?;
                for b in &books {
                    ins.execute(params![b.id.get() as i64, b.title, b.topic, b.cost.cents() as i64, b.stock as i64])?;
                }
            }
            tx.commit()?;
        }
        // A single replica starts a new epoch at every start: caches and
        // readers can tell its new writes from everything before.
        let epoch: u64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get::<_, String>(0))
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            + 1;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [epoch.to_string()],
        )?;
        let mut state = State::default();
        {
            let mut q = conn.prepare("SELECT id, title, topic, cost_cents, stock FROM books")?;
            let rows = q.query_map([], read_book)?;
            for b in rows {
                state.insert(b?);
            }
        }
        let (last_epoch, last_seq): (u64, u64) = conn.query_row(
            "SELECT COALESCE(MAX(epoch), 0), COALESCE(MAX(seq), 0) FROM log",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?;
        state.version = Version { epoch: last_epoch, seq: last_seq };
        let (applied_tx, applied) = watch::channel(state.version);
        let state = Arc::new(RwLock::new(state));
        let mut writer = Writer {
            state: state.clone(),
            applied: applied_tx,
            next_seq: last_seq + 1,
            epoch,
        };
        let writer = storage::spawn_writer(node, conn, move |conn, batch| writer.commit(conn, batch));
        Ok(Self { state, writer, applied, identity, epoch })
    }

    /// Applies a write through the log; answers once it is durable and visible.
    pub async fn write(&self, write: CatalogWrite) -> Result<WriteResult, CatalogError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Job { write, reply })
            .await
            .map_err(|_| CatalogError::Storage("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| CatalogError::Storage("the writer has stopped".into()))?
    }

    /// The version this replica has applied.
    pub fn version(&self) -> Version {
        *self.applied.borrow()
    }

    /// Waits (briefly) until the state is at least at `min`.
    pub async fn wait_for(&self, min: Version, patience: Duration) -> Result<(), CatalogError> {
        let mut rx = self.applied.clone();
        let at = *rx.borrow();
        if at >= min {
            return Ok(());
        }
        match tokio::time::timeout(patience, rx.wait_for(|v| *v >= min)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(CatalogError::NotYet { wanted: min, at: *self.applied.borrow() }),
        }
    }

    pub fn lookup(&self, id: BookId) -> Result<LookupResponse, CatalogError> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .books
            .get(&id)
            .map(|b| LookupResponse::new(b, state.version))
            .ok_or(CatalogError::UnknownBook(id))
    }

    pub fn search(&self, topic: &TopicSlug) -> SearchResponse {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        SearchResponse { items: state.topics.get(topic.as_str()).cloned().unwrap_or_default() }
    }

    pub fn contains(&self, id: BookId) -> bool {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.books.contains_key(&id)
    }
}

fn read_book(r: &rusqlite::Row<'_>) -> rusqlite::Result<Book> {
    let bad = |i, what: &str| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Integer, what.into());
    let id: i64 = r.get(0)?;
    let cost: i64 = r.get(3)?;
    let stock: i64 = r.get(4)?;
    Ok(Book {
        id: BookId::new(id as u64).map_err(|e| bad(0, &e.0))?,
        title: r.get(1)?,
        topic: r.get(2)?,
        cost: Money::from_cents(cost as u64).map_err(|e| bad(3, &e.0))?,
        stock: u64::try_from(stock).map_err(|_| bad(4, "negative stock"))?,
    })
}

/// The writer thread's state.
struct Writer {
    state: Arc<RwLock<State>>,
    applied: watch::Sender<Version>,
    /// The seq the next logged op gets.
    next_seq: u64,
    epoch: u64,
}

impl Writer {
    fn commit(&mut self, conn: &mut Connection, batch: Vec<Job>) {
        let start_seq = self.next_seq;
        let mut overlay: HashMap<BookId, Book> = HashMap::new();
        let mut fresh: HashMap<RequestId, WriteResult> = HashMap::new();
        let outcome = (|| -> rusqlite::Result<Vec<Result<WriteResult, CatalogError>>> {
            let tx = conn.transaction()?;
            let mut results = Vec::with_capacity(batch.len());
            {
                let shared = self.state.clone();
                let state = shared.read().unwrap_or_else(|p| p.into_inner());
                for job in &batch {
                    results.push(self.apply(&tx, &state, &mut overlay, &mut fresh, &job.write)?);
                }
            }
            tx.commit()?;
            Ok(results)
        })();
        match outcome {
            Ok(results) => {
                if !overlay.is_empty() || self.next_seq != start_seq {
                    let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                    for (id, book) in overlay {
                        state.books.insert(id, book);
                    }
                    state.version = Version { epoch: self.epoch, seq: self.next_seq - 1 };
                    let v = state.version;
                    drop(state);
                    self.applied.send_replace(v);
                }
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                self.next_seq = start_seq;
                tracing::error!(error = %e, "catalog commit failed; {} writes refused", batch.len());
                for job in batch {
                    let _ = job.reply.send(Err(CatalogError::Storage(format!("commit failed: {e}"))));
                }
            }
        }
    }

    /// Applies one op inside the batch's transaction. The inner `Err` is an
    /// answer to the client (unknown book); the outer one aborts the batch.
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        state: &State,
        overlay: &mut HashMap<BookId, Book>,
        fresh: &mut HashMap<RequestId, WriteResult>,
        write: &CatalogWrite,
    ) -> rusqlite::Result<Result<WriteResult, CatalogError>> {
        if let Some(r) = fresh.get(&write.request_id) {
            return Ok(Ok(r.clone()));
        }
        let stored: Option<(String, i64, i64)> = tx
            .prepare_cached("SELECT outcome, epoch, seq FROM log WHERE request_id = ?1")?
            .query_row([write.request_id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((outcome, epoch, seq)) = stored {
            let outcome: Outcome = serde_json::from_str(&outcome)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            let version = Version { epoch: epoch as u64, seq: seq as u64 };
            return Ok(Ok(WriteResult { outcome, version }));
        }
        let id = write.op.book_id();
        let Some(mut book) = overlay.get(&id).or_else(|| state.books.get(&id)).cloned() else {
            return Ok(Err(CatalogError::UnknownBook(id)));
        };
        let seq = self.next_seq;
        let version = Version { epoch: self.epoch, seq };
        let outcome = match &write.op {
            CatalogOp::Buy { .. } if book.stock > 0 => {
                book.stock -= 1;
                Outcome::Bought { book_id: id, title: book.title.clone(), price: book.cost, order_id: seq }
            }
            CatalogOp::Buy { .. } => Outcome::OutOfStock { book_id: id, title: book.title.clone() },
            CatalogOp::Update { stock, cost, .. } => {
                if let Some(s) = stock {
                    book.stock = *s;
                }
                if let Some(c) = cost {
                    book.cost = *c;
                }
                Outcome::Updated { book: book.clone() }
            }
        };
        if !matches!(outcome, Outcome::OutOfStock { .. }) {
            tx.prepare_cached("UPDATE books SET stock = ?1, cost_cents = ?2 WHERE id = ?3")?
                .execute(params![book.stock as i64, book.cost.cents() as i64, id.get() as i64])?;
            overlay.insert(id, book);
        }
        tx.prepare_cached("INSERT INTO log (seq, epoch, request_id, op, outcome) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![
                seq as i64,
                self.epoch as i64,
                write.request_id.as_str(),
                to_json(&write.op),
                to_json(&outcome)
            ])?;
        self.next_seq += 1;
        let result = WriteResult { outcome, version };
        fresh.insert(write.request_id.clone(), result.clone());
        Ok(Ok(result))
    }
}

fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("wire types serialise")
}
