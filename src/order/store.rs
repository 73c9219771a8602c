//! An order replica's durable log of the orders it handled (SQLite, WAL,
//! fsync on commit, group commit).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::api::*;
use crate::storage::{self, StorageError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    order_id INTEGER,
    book_id INTEGER NOT NULL,
    title TEXT NOT NULL,
    price_cents INTEGER NOT NULL,
    time TEXT NOT NULL,
    outcome TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    vseq INTEGER NOT NULL,
    result TEXT NOT NULL,
    sum INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS damaged_orders (
    seq INTEGER PRIMARY KEY,
    row TEXT NOT NULL,
    found_at TEXT NOT NULL
);
";

/// The stored fields of one order, in column order after `seq` (what its
/// checksum covers).
struct Row {
    request_id: String,
    order_id: Option<i64>,
    book_id: i64,
    title: String,
    price_cents: i64,
    time: String,
    outcome: String,
    epoch: i64,
    vseq: i64,
    result: String,
}

const ROW_COLUMNS: &str =
    "request_id, order_id, book_id, title, price_cents, time, outcome, epoch, vseq, result";

impl Row {
    /// Reads `ROW_COLUMNS` starting at column `at`.
    fn read(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Self> {
        Ok(Self {
            request_id: r.get(at)?,
            order_id: r.get(at + 1)?,
            book_id: r.get(at + 2)?,
            title: r.get(at + 3)?,
            price_cents: r.get(at + 4)?,
            time: r.get(at + 5)?,
            outcome: r.get(at + 6)?,
            epoch: r.get(at + 7)?,
            vseq: r.get(at + 8)?,
            result: r.get(at + 9)?,
        })
    }

    fn sum(&self) -> i64 {
        use storage::Field::{Int, Null, Text};
        storage::row_sum(
            "orders",
            &[
                Text(&self.request_id),
                self.order_id.map_or(Null, Int),
                Int(self.book_id),
                Text(&self.title),
                Int(self.price_cents),
                Text(&self.time),
                Text(&self.outcome),
                Int(self.epoch),
                Int(self.vseq),
                Text(&self.result),
            ],
        )
    }

    /// The row as a person reads it, for the damaged-rows table.
    fn describe(&self) -> String {
        format!(
            "request_id={} order_id={:?} book_id={} title={:?} price_cents={} time={} outcome={} version={}.{} result={}",
            self.request_id,
            self.order_id,
            self.book_id,
            self.title,
            self.price_cents,
            self.time,
            self.outcome,
            self.epoch,
            self.vseq,
            self.result
        )
    }
}

/// Adds checksums to a log written before rows had them, then checks every
/// row: a row that does not match its checksum is moved to
/// `damaged_orders` (kept for the operator, never served). Returns how
/// many were moved now.
fn verify_rows(conn: &mut Connection) -> rusqlite::Result<u64> {
    let has_sum: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('orders') WHERE name = 'sum')",
        [],
        |r| r.get(0),
    )?;
    let tx = conn.transaction()?;
    if !has_sum {
        tx.execute_batch("ALTER TABLE orders ADD COLUMN sum INTEGER NOT NULL DEFAULT 0")?;
    }
    let rows: Vec<(i64, Row, i64)> = tx
        .prepare(&format!("SELECT seq, {ROW_COLUMNS}, sum FROM orders"))?
        .query_map([], |r| Ok((r.get(0)?, Row::read(r, 1)?, r.get(11)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let now = storage::now_rfc3339();
    let mut damaged = 0;
    for (seq, row, stored) in rows {
        if !has_sum {
            tx.execute(
                "UPDATE orders SET sum = ?2 WHERE seq = ?1",
                params![seq, row.sum()],
            )?;
        } else if row.sum() != stored {
            tx.execute(
                "INSERT OR REPLACE INTO damaged_orders (seq, row, found_at) VALUES (?1, ?2, ?3)",
                params![seq, row.describe(), now],
            )?;
            tx.execute("DELETE FROM orders WHERE seq = ?1", [seq])?;
            damaged += 1;
        }
    }
    tx.commit()?;
    Ok(damaged)
}

/// Orders missing from the log, and how many it ever recorded: the log is
/// append-only, and `AUTOINCREMENT` keeps its highest sequence number even
/// when rows are deleted.
fn lost_orders(conn: &Connection) -> rusqlite::Result<Option<(u64, u64)>> {
    let ever: i64 = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'orders'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let held: i64 = conn.query_row(
        "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM damaged_orders)",
        [],
        |r| r.get(0),
    )?;
    Ok((ever > held).then(|| ((ever - held) as u64, ever as u64)))
}

struct Job {
    request_id: RequestId,
    result: WriteResult,
    reply: oneshot::Sender<Result<(), String>>,
}

pub struct OrderStore {
    writer: mpsc::Sender<Vec<Job>>,
    /// Orders recorded on this turn of the runtime, for the writer in one
    /// message (see [`crate::batch::Turn`]): the buys of a batch are
    /// answered together and record their orders one after another, and
    /// the writer committed the first alone, the rest after its fsync.
    jobs: Arc<crate::batch::Turn<Job>>,
    writer_thread: std::thread::JoinHandle<()>,
    reader: Arc<Mutex<Connection>>,
    dir: std::path::PathBuf,
}

impl OrderStore {
    pub fn open(dir: &Path, cluster_id: &str, node: &str) -> Result<Self, StorageError> {
        let identity = storage::claim(dir, "orders.sqlite", cluster_id, node)?;
        // SQLite removes the write-ahead log when the database closes
        // cleanly, and only then (see `storage::mark_running`).
        let wal_present = dir.join("orders.sqlite-wal").exists();
        let unclean = storage::mark_running(dir)?;
        let wal_lost = unclean && !wal_present && !identity.fresh && !identity.missing;
        let mut conn = storage::open(dir, "orders.sqlite")?;
        conn.execute_batch(SCHEMA)?;
        let damaged = verify_rows(&mut conn)?;
        storage::seal(dir, "orders.sqlite", false)?;
        // What the order log holds is also what survives of it: say so
        // loudly when orders are gone. Buys are not affected: the catalog
        // keeps each buy's answer for its window, so a retry of a lost order
        // gets it again, and the other order replicas' logs are their own.
        const UNAFFECTED: &str = "buys are unaffected: the catalog keeps each buy's answer for its window (a client's Idempotency-Key for 24 h by default), so a retry of a lost order is answered as before";
        if identity.missing {
            tracing::error!(
                data_dir = %dir.display(),
                "the order log file is gone (deleted while this replica was down): the orders it recorded are lost from this log; starting a new, empty one; {UNAFFECTED}"
            );
        } else if identity.copied {
            tracing::warn!(
                data_dir = %dir.display(),
                "this data directory's order log is not the file it last wrote: it was restored from a copy (or copied); orders taken since that copy are only on the other order replicas"
            );
        }
        if wal_lost {
            tracing::error!(
                data_dir = %dir.display(),
                "the order log's write-ahead log is missing after a stop that was not clean: orders recorded since its last checkpoint are lost from this log; {UNAFFECTED}"
            );
        }
        if damaged > 0 {
            tracing::error!(
                data_dir = %dir.display(),
                damaged,
                "DAMAGED DATA: {damaged} order(s) in the log do not match their checksums: they were moved to the table damaged_orders (kept for inspection) and are never served; the rest of the log is intact; {UNAFFECTED}"
            );
        }
        if let Some((lost, ever)) = lost_orders(&conn)? {
            tracing::error!(
                data_dir = %dir.display(),
                lost,
                "the order log lost {lost} of the {ever} orders it recorded (rows deleted while this replica was down); {UNAFFECTED}"
            );
        }
        let reader = storage::open(dir, "orders.sqlite")?;
        let answers = crate::batch::Answers::spawn();
        let (writer, writer_thread) =
            storage::spawn_writer(node, conn, move |conn, batch| commit(conn, batch, &answers));
        Ok(Self {
            writer,
            jobs: Default::default(),
            writer_thread,
            reader: Arc::new(Mutex::new(reader)),
            dir: dir.to_path_buf(),
        })
    }

    /// Closes the log (the writer finishes what it was given) and records
    /// the clean stop. Blocks: call from a blocking task.
    pub fn close(self) -> Result<(), StorageError> {
        let Self {
            writer,
            writer_thread,
            reader,
            dir,
            ..
        } = self;
        drop(writer);
        let joined = writer_thread.join().is_ok();
        drop(reader);
        if joined {
            storage::mark_stopped(&dir)?;
        }
        Ok(())
    }

    /// The answer this replica gave `request_id` before, if any.
    pub async fn get(&self, request_id: &RequestId) -> Result<Option<WriteResult>, String> {
        let reader = self.reader.clone();
        let rid = request_id.as_str().to_string();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            let row: Option<(Row, i64)> = conn
                .prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS}, sum FROM orders WHERE request_id = ?1"
                ))
                .and_then(|mut q| {
                    q.query_row([rid], |r| Ok((Row::read(r, 0)?, r.get(10)?)))
                        .optional()
                })
                .map_err(|e| e.to_string())?;
            match row {
                Some((row, sum)) if row.sum() == sum => serde_json::from_str(&row.result)
                    .map(Some)
                    .map_err(|e| e.to_string()),
                Some((row, _)) => {
                    // Not served: the caller asks the catalog, which
                    // keeps the buy's answer for its window.
                    tracing::error!(
                        request_id = %row.request_id,
                        "DAMAGED DATA: an order in the log does not match its checksum; it is not served"
                    );
                    Ok(None)
                }
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Records an order durably; returns after the commit.
    pub async fn record(&self, request_id: RequestId, result: WriteResult) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request_id,
            result,
            reply,
        };
        if self.jobs.push(job) {
            let (jobs, writer) = (self.jobs.clone(), self.writer.clone());
            // A writer that stopped drops the jobs, and their callers hear so.
            tokio::spawn(async move { writer.send(jobs.take().await).await });
        }
        rx.await
            .map_err(|_| "the order log writer has stopped".to_string())?
    }

    /// Newest first; `before` is a `seq` from an earlier page.
    pub async fn page(&self, limit: u32, before: Option<u64>) -> Result<OrderLogPage, String> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
            let mut q = conn
                .prepare_cached(&format!(
                    "SELECT seq, {ROW_COLUMNS}, sum FROM orders WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"
                ))
                .map_err(|e| e.to_string())?;
            let rows = q
                .query_map(params![before, limit as i64 + 1], |r| {
                    Ok((r.get::<_, i64>(0)?, Row::read(r, 1)?, r.get::<_, i64>(11)?))
                })
                .map_err(|e| e.to_string())?;
            let mut orders = Vec::new();
            for row in rows {
                let (seq, row, sum) = row.map_err(|e| e.to_string())?;
                if row.sum() != sum {
                    tracing::error!(
                        seq,
                        "DAMAGED DATA: an order in the log does not match its checksum; it is left out of the log's pages"
                    );
                    continue;
                }
                orders.push(OrderRecord {
                    seq: seq as u64,
                    order_id: row.order_id.map(|o| o as u64),
                    request_id: RequestId::parse(&row.request_id).map_err(|e| e.0)?,
                    book_id: BookId::new(row.book_id as u64).map_err(|e| e.0)?,
                    title: row.title,
                    price: Money::from_cents(row.price_cents as u64).map_err(|e| e.0)?,
                    time: row.time,
                    outcome: row.outcome,
                    version: Version { epoch: row.epoch as u64, seq: row.vseq as u64 },
                });
            }
            let next_before = if orders.len() > limit as usize {
                orders.truncate(limit as usize);
                orders.last().map(|o| o.seq)
            } else {
                None
            };
            Ok(OrderLogPage { orders, next_before })
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

fn commit(
    conn: &mut Connection,
    batch: Vec<Job>,
    answers: &crate::batch::Answers<Result<(), String>>,
) {
    let res = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO orders ({ROW_COLUMNS}, sum)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))?;
            let now = storage::now_rfc3339();
            for j in &batch {
                let (order_id, book_id, title, price, outcome) = match &j.result.outcome {
                    Outcome::Bought {
                        book_id,
                        title,
                        price,
                        order_id,
                    } => (
                        Some(*order_id as i64),
                        *book_id,
                        title.as_str(),
                        price.cents(),
                        "bought",
                    ),
                    Outcome::OutOfStock { book_id, title } => {
                        (None, *book_id, title.as_str(), 0, "out_of_stock")
                    }
                    Outcome::Updated { book } => (
                        None,
                        book.id,
                        book.title.as_str(),
                        book.cost.cents(),
                        "updated",
                    ),
                };
                let row = Row {
                    request_id: j.request_id.as_str().to_string(),
                    order_id,
                    book_id: book_id.get() as i64,
                    title: title.to_string(),
                    price_cents: price as i64,
                    time: now.clone(),
                    outcome: outcome.to_string(),
                    epoch: j.result.version.epoch as i64,
                    vseq: j.result.version.seq as i64,
                    result: serde_json::to_string(&j.result).expect("wire types serialise"),
                };
                ins.execute(params![
                    row.request_id,
                    row.order_id,
                    row.book_id,
                    row.title,
                    row.price_cents,
                    row.time,
                    row.outcome,
                    row.epoch,
                    row.vseq,
                    row.result,
                    row.sum(),
                ])?;
            }
        }
        tx.commit()
    })();
    let answer = res.map_err(|e| format!("order log commit failed: {e}"));
    if let Err(e) = &answer {
        tracing::error!("{e}");
    }
    answers.send(
        batch
            .into_iter()
            .map(|j| (j.reply, answer.clone()))
            .collect(),
    );
}
