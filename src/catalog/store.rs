//! A catalog replica's disk: SQLite (WAL, fsync on every commit) holding
//! both the replication core's durable state and the state machine.
//!
//! * `rlog`      — the replicated log (may hold an uncommitted suffix; the
//!   core says when to truncate it);
//! * `meta`      — the core's hard state, the applied version;
//! * `snapshot`  — the version of the latest snapshot: the log up to it is
//!   compacted. Its bytes are not stored: they are the state machine's
//!   tables, which hold that version or a later one, so start-up encodes
//!   them again at the applied version (a store written before this kept
//!   the bytes in the row, and they are still read);
//! * `books`     — the state machine: every book with its stock and cost;
//! * `applied`   — the applied request ids with their outcomes, each kept
//!   until the replicated clock reaches its `until` (exactly once is part of
//!   the replicated, durable state; see [`machine::Stamped`]).
//!
//! [`Db::handle`] persists one `Ready` of the core and applies its committed
//! entries in ONE transaction — one fsync for everything the core produced
//! since the last one (group commit). The in-memory copy of the books that
//! reads are served from is updated only after that commit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;

use crate::api::*;
use crate::replication::{self, Entry, EntryKind, HardState, Snapshot};

use super::codec;
use super::machine::{self, SnapshotData};
use crate::storage::Field::{Bytes, Int, Null, Text};
use crate::storage::{self, Damaged, StorageError, row_sum, verify_row};

/// The state reads are served from. Invariant: it is exactly the committed
/// content of `books` at `version`.
#[derive(Debug, Default, Clone)]
pub struct State {
    pub books: HashMap<BookId, Book>,
    /// topic slug → title → id
    pub topics: HashMap<String, BTreeMap<String, BookId>>,
    /// The last applied entry.
    pub version: Version,
    /// The replicated clock (see [`machine::Stamped`]).
    pub clock: u64,
    /// The wrapping sums of the books' and the kept answers' row
    /// checksums: with `clock`, what a replica's state digest is made of.
    pub books_sum: u64,
    pub answers_sum: u64,
    /// How many answers are kept: with the books, what a snapshot holds.
    pub answers: u64,
}

/// Every this many entries (by sequence number, so at the same entries on
/// every replica), a replica records a digest of its state.
pub const DIGEST_EVERY: u64 = 256;

/// A replica's state digest: what replicas compare at the same version.
pub fn digest(clock: u64, books_sum: u64, answers_sum: u64) -> u64 {
    row_sum(
        "digest",
        &[
            Int(clock as i64),
            Int(books_sum as i64),
            Int(answers_sum as i64),
        ],
    ) as u64
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

    pub fn lookup(&self, id: BookId) -> Option<LookupResponse> {
        self.books
            .get(&id)
            .map(|b| LookupResponse::new(b, self.version))
    }

    pub fn search(&self, topic: &TopicSlug) -> SearchResponse {
        SearchResponse {
            items: self.topics.get(topic.as_str()).cloned().unwrap_or_default(),
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, sum INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS books (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    topic TEXT NOT NULL,
    cost_cents INTEGER NOT NULL CHECK (cost_cents >= 0),
    stock INTEGER NOT NULL CHECK (stock >= 0),
    sum INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS applied (
    request_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    until INTEGER NOT NULL DEFAULT 0,
    sum INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rlog (
    seq INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    op TEXT,
    sum INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    sum INTEGER NOT NULL DEFAULT 0
);
";

// Every row carries `sum`, its checksum (`storage::row_sum`), written with
// it and verified whenever it is read: at start-up every row is read.

fn book_sum(b: &Book) -> i64 {
    row_sum(
        "books",
        &[
            Int(b.id.get() as i64),
            Text(&b.title),
            Text(&b.topic),
            Int(b.cost.cents() as i64),
            Int(b.stock as i64),
        ],
    )
}

fn answer_sum(request_id: &str, epoch: i64, seq: i64, outcome: &str, until: i64) -> i64 {
    row_sum(
        "applied",
        &[
            Text(request_id),
            Int(epoch),
            Int(seq),
            Text(outcome),
            Int(until),
        ],
    )
}

fn rlog_sum(seq: i64, epoch: i64, request_id: &str, op: Option<&str>) -> i64 {
    row_sum(
        "rlog",
        &[
            Int(seq),
            Int(epoch),
            Text(request_id),
            op.map_or(Null, Text),
        ],
    )
}

fn meta_sum(key: &str, value: &str) -> i64 {
    row_sum("meta", &[Text(key), Text(value)])
}

fn snapshot_sum(epoch: i64, seq: i64, data: &[u8]) -> i64 {
    row_sum("snapshot", &[Int(epoch), Int(seq), Bytes(data)])
}

fn put_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value, sum) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO UPDATE SET value = excluded.value, sum = excluded.sum",
    )?
    .execute(params![key, value, meta_sum(key, value)])?;
    Ok(())
}

/// Records that the log is compacted up to `version`. The snapshot's bytes
/// stay out of the row: writing megabytes (after heavy load, tens of
/// thousands of kept answers) through the write-ahead log stalled the
/// driver for tens of milliseconds, and the tables already hold them.
fn put_snapshot(conn: &Connection, version: replication::Version) -> rusqlite::Result<()> {
    let (e, q) = (version.epoch as i64, version.seq as i64);
    conn.execute(
        "INSERT OR REPLACE INTO snapshot (id, epoch, seq, data, sum) VALUES (1, ?1, ?2, x'', ?3)",
        params![e, q, snapshot_sum(e, q, &[])],
    )?;
    Ok(())
}

fn put_answer_row(
    conn: &Connection,
    request_id: &str,
    version: Version,
    outcome: &Outcome,
    until: u64,
) -> rusqlite::Result<i64> {
    let (e, q, o, u) = (
        version.epoch as i64,
        version.seq as i64,
        to_json(outcome),
        until as i64,
    );
    let sum = answer_sum(request_id, e, q, &o, u);
    conn.prepare_cached(
        "INSERT INTO applied (request_id, epoch, seq, outcome, until, sum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![request_id, e, q, o, u, sum])?;
    Ok(sum)
}

/// A kept answer read back (`epoch, seq, outcome, until, sum`) and verified.
fn read_answer(r: &rusqlite::Row<'_>, request_id: &str) -> rusqlite::Result<(Outcome, Version)> {
    let (e, q, o, u, sum): (i64, i64, String, i64, i64) =
        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
    verify_row(
        "applied",
        &[Text(request_id), Int(e), Int(q), Text(&o), Int(u)],
        sum,
    )?;
    Ok((serde_json::from_str(&o).map_err(corrupt)?, version_of(e, q)))
}

/// The wrapping sums of the stored books' and answers' checksums.
/// With how many answers are kept, read in the same pass.
fn sums(conn: &Connection) -> rusqlite::Result<(u64, u64, u64)> {
    let total = |sql: &str| -> rusqlite::Result<(u64, u64)> {
        let mut q = conn.prepare_cached(sql)?;
        let mut rows = q.query([])?;
        let (mut t, mut n) = (0u64, 0u64);
        while let Some(r) = rows.next()? {
            t = t.wrapping_add(r.get::<_, i64>(0)? as u64);
            n += 1;
        }
        Ok((t, n))
    };
    let (books, _) = total("SELECT sum FROM books")?;
    let (answers, kept) = total("SELECT sum FROM applied")?;
    Ok((books, answers, kept))
}

/// Computes the checksum of every row of a store written before rows had
/// one (its `sum` columns were just added).
fn add_sums(conn: &Connection) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    let books: Vec<Book> = tx
        .prepare("SELECT id, title, topic, cost_cents, stock FROM books")?
        .query_map([], read_book_fields)?
        .collect::<rusqlite::Result<_>>()?;
    for b in &books {
        tx.execute(
            "UPDATE books SET sum = ?2 WHERE id = ?1",
            params![b.id.get() as i64, book_sum(b)],
        )?;
    }
    let rows: Vec<(String, i64, i64, String, i64)> = tx
        .prepare("SELECT request_id, epoch, seq, outcome, until FROM applied")?
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (id, e, q, o, u) in &rows {
        tx.execute(
            "UPDATE applied SET sum = ?2 WHERE request_id = ?1",
            params![id, answer_sum(id, *e, *q, o, *u)],
        )?;
    }
    let rows: Vec<(i64, i64, String, Option<String>)> = tx
        .prepare("SELECT seq, epoch, request_id, op FROM rlog")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (q, e, id, op) in &rows {
        tx.execute(
            "UPDATE rlog SET sum = ?2 WHERE seq = ?1",
            params![q, rlog_sum(*q, *e, id, op.as_deref())],
        )?;
    }
    let rows: Vec<(String, String)> = tx
        .prepare("SELECT key, value FROM meta")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (k, v) in &rows {
        tx.execute(
            "UPDATE meta SET sum = ?2 WHERE key = ?1",
            params![k, meta_sum(k, v)],
        )?;
    }
    let snap: Option<(i64, i64, Vec<u8>)> = tx
        .query_row(
            "SELECT epoch, seq, data FROM snapshot WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((e, q, d)) = snap {
        tx.execute(
            "UPDATE snapshot SET sum = ?1 WHERE id = 1",
            [snapshot_sum(e, q, &d)],
        )?;
    }
    tx.commit()
}

/// What the core reads back at start-up.
#[derive(Debug, Default)]
pub struct Persisted {
    pub hard_state: HardState,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
}

impl replication::Storage for Persisted {
    fn hard_state(&self) -> HardState {
        self.hard_state.clone()
    }
    fn snapshot(&self) -> Option<Snapshot> {
        self.snapshot.clone()
    }
    fn entries(&self) -> Vec<Entry> {
        self.entries.clone()
    }
}

/// One committed entry as applied: its outcome, when it was an operation.
#[derive(Debug)]
pub struct AppliedEntry {
    pub version: Version,
    pub request_id: String,
    /// `Ignored` for an epoch start, or an op on an unknown book. For a
    /// request id applied before (a retry that got an entry of its own), the
    /// first entry's outcome and version: the answer is the same every time.
    pub outcome: machine::Applied,
}

pub struct Db {
    conn: Connection,
    dir: std::path::PathBuf,
    /// State digests recorded since the driver last took them.
    pub checkpoints: Vec<(Version, u64)>,
    /// The log up to here is compacted (a snapshot covers it) but may still
    /// hold rows: each step deletes a few of them ([`TRIM_PER_STEP`]).
    trim_to: Option<u64>,
}

/// How many compacted log rows a step deletes. Deleting the 10 000 a
/// snapshot covers at once took 10–20 ms of the driver's thread; spread
/// over the steps that follow, each pays for a few hundred. Rows left
/// behind by a crash are skipped at start-up (they precede the snapshot)
/// and deleted after the next one.
const TRIM_PER_STEP: i64 = 500;

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("wire types serialise")
}

fn corrupt(what: impl std::fmt::Display) -> rusqlite::Error {
    Damaged(format!("catalog data: {what}")).into_sqlite()
}

fn version_of(epoch: i64, seq: i64) -> Version {
    Version {
        epoch: epoch as u64,
        seq: seq as u64,
    }
}

impl Db {
    /// Opens (or creates) the store in `dir`. A new store holds no books:
    /// they arrive through the replicated log (the founding primary's seed
    /// entry, or a snapshot), so every replica holds the same catalog.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let conn = storage::open(dir, "catalog.sqlite")?;
        conn.execute_batch(SCHEMA)?;
        // Stores from before answers expired lack the column.
        let has_until: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('applied') WHERE name = 'until')",
            [],
            |r| r.get(0),
        )?;
        if !has_until {
            conn.execute_batch("ALTER TABLE applied ADD COLUMN until INTEGER NOT NULL DEFAULT 0")?;
        }
        conn.execute_batch("CREATE INDEX IF NOT EXISTS applied_until ON applied (until)")?;
        let has_sums: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('books') WHERE name = 'sum')",
            [],
            |r| r.get(0),
        )?;
        if !has_sums {
            conn.execute_batch(
                "ALTER TABLE meta ADD COLUMN sum INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE books ADD COLUMN sum INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE applied ADD COLUMN sum INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE rlog ADD COLUMN sum INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE snapshot ADD COLUMN sum INTEGER NOT NULL DEFAULT 0;",
            )?;
            add_sums(&conn)?;
        }
        Ok(Self {
            conn,
            dir: dir.to_path_buf(),
            checkpoints: Vec::new(),
            trim_to: None,
        })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> rusqlite::Result<Option<T>> {
        let v: Option<(String, i64)> = self
            .conn
            .query_row("SELECT value, sum FROM meta WHERE key = ?1", [key], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        v.map(|(v, sum)| {
            verify_row("meta", &[Text(key), Text(&v)], sum)?;
            serde_json::from_str(&v).map_err(corrupt)
        })
        .transpose()
    }

    /// Whether the core never persisted anything here.
    pub fn is_blank(&self) -> rusqlite::Result<bool> {
        Ok(self.hard_state()?.is_none())
    }

    /// The core's persisted hard state, if it ever persisted one.
    pub fn hard_state(&self) -> rusqlite::Result<Option<HardState>> {
        self.meta::<HardState>("hard_state")
    }

    /// Records the hard state of a member of a brand-new cluster.
    pub fn bootstrap(&mut self, hs: &HardState) -> rusqlite::Result<()> {
        put_meta(&self.conn, "hard_state", &to_json(hs))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every row and checks it against its checksum (and the
    /// snapshot against its digest): what start-up does before serving.
    pub fn verify_all(&self) -> rusqlite::Result<()> {
        self.load_state()?;
        // Every answer is read and checked below: the snapshot they make
        // need not be encoded here as well.
        self.read_persisted(false)?;
        let mut q = self
            .conn
            .prepare("SELECT epoch, seq, outcome, until, sum, request_id FROM applied")?;
        let mut rows = q.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(5)?;
            read_answer(r, &id)?;
        }
        Ok(())
    }

    pub fn load_state(&self) -> rusqlite::Result<State> {
        let mut state = State::default();
        let mut q = self
            .conn
            .prepare("SELECT id, title, topic, cost_cents, stock, sum FROM books")?;
        for b in q.query_map([], read_book)? {
            state.insert(b?);
        }
        state.version = self.meta("applied")?.unwrap_or_default();
        state.clock = self.meta("clock")?.unwrap_or_default();
        (state.books_sum, state.answers_sum, state.answers) = sums(&self.conn)?;
        Ok(state)
    }

    pub fn load_persisted(&self) -> rusqlite::Result<Persisted> {
        self.read_persisted(true)
    }

    /// [`Db::load_persisted`]; without `encode`, a snapshot recorded by its
    /// version only is checked against the tables but not encoded (its
    /// bytes are then empty).
    fn read_persisted(&self, encode: bool) -> rusqlite::Result<Persisted> {
        let hard_state = self.meta("hard_state")?.unwrap_or_default();
        let stored = self
            .conn
            .query_row(
                "SELECT epoch, seq, data, sum FROM snapshot WHERE id = 1",
                [],
                |r| {
                    let (e, q, data): (i64, i64, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
                    verify_row("snapshot", &[Int(e), Int(q), Bytes(&data)], r.get(3)?)?;
                    Ok(Snapshot {
                        version: to_core(version_of(e, q)),
                        data,
                    })
                },
            )
            .optional()?;
        let snapshot = match stored {
            // Bytes kept in the row (a store written before they were not).
            Some(s) if !s.data.is_empty() => {
                codec::check(&s.data).map_err(corrupt)?;
                Some(s)
            }
            // The log is compacted up to `s.version`: the snapshot is the
            // tables, at the version they were applied to (that one or
            // later; the core drops the entries it covers).
            Some(s) => {
                let applied: Version = self.meta("applied")?.unwrap_or_default();
                if applied.seq < s.version.seq {
                    return Err(corrupt(format!(
                        "the tables are at {applied}, before the compacted log's end {}",
                        to_api(s.version)
                    )));
                }
                // Only the bytes need the books and the answers read.
                let data = match encode {
                    true => self.snapshot_bytes(&self.load_state()?)?.0,
                    false => Vec::new(),
                };
                Some(Snapshot {
                    version: to_core(applied),
                    data,
                })
            }
            None => None,
        };
        let mut entries = Vec::new();
        let mut q = self
            .conn
            .prepare("SELECT seq, epoch, request_id, op, sum FROM rlog ORDER BY seq")?;
        let rows = q.query_map([], |r| {
            let op: Option<String> = r.get(3)?;
            let rid: String = r.get(2)?;
            verify_row(
                "rlog",
                &[
                    Int(r.get(0)?),
                    Int(r.get(1)?),
                    Text(&rid),
                    op.as_deref().map_or(Null, Text),
                ],
                r.get(4)?,
            )?;
            Ok(Entry {
                version: to_core(version_of(r.get(1)?, r.get(0)?)),
                request_id: rid,
                kind: match op {
                    Some(op) => EntryKind::Op(op.into_bytes()),
                    None => EntryKind::EpochStart,
                },
            })
        })?;
        for e in rows {
            entries.push(e?);
        }
        Ok(Persisted {
            hard_state,
            snapshot,
            entries,
        })
    }

    /// The answer a request id got, if it was applied.
    pub fn applied_result(&self, request_id: &str) -> rusqlite::Result<Option<WriteResult>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT epoch, seq, outcome, until, sum FROM applied WHERE request_id = ?1",
            )?
            .query_row([request_id], |r| read_answer(r, request_id))
            .optional()?
            .map(|(outcome, version)| WriteResult { outcome, version }))
    }

    /// Persists a `Ready` and applies its committed entries, in one
    /// transaction; then brings `state` up to date. Entries at or below the
    /// applied version (handed out again after a restart) are skipped.
    pub fn handle(
        &mut self,
        rd: &replication::Ready,
        state: &mut State,
    ) -> rusqlite::Result<Vec<AppliedEntry>> {
        if rd.snapshot_to_install.is_none()
            && rd.hard_state.is_none()
            && rd.truncate_after.is_none()
            && rd.entries.is_empty()
            && rd.committed.is_empty()
            && rd.compacted.is_none()
        {
            return Ok(Vec::new()); // only messages to send
        }
        // A `Ready` that only moves the commit point (and applies up to it)
        // is not waited for: it becomes durable with the next synced
        // transaction (the WAL is synced up to its end), and a crash before
        // then loses only what is learnt and applied again.
        if !rd.sync {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let result = self.handle_in_transaction(rd, state);
        if !rd.sync {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        result
    }

    fn handle_in_transaction(
        &mut self,
        rd: &replication::Ready,
        state: &mut State,
    ) -> rusqlite::Result<Vec<AppliedEntry>> {
        let tx = self.conn.transaction()?;
        let mut reload = false;
        if let Some(snap) = &rd.snapshot_to_install {
            install_snapshot(&tx, snap)?;
            reload = true;
        }
        if let Some(hs) = &rd.hard_state {
            put_meta(&tx, "hard_state", &to_json(hs))?;
        }
        if let Some(t) = rd.truncate_after {
            tx.execute("DELETE FROM rlog WHERE seq > ?1", [t as i64])?;
        }
        if let Some(to) = self.trim_to {
            let first: Option<i64> = tx
                .prepare_cached("SELECT min(seq) FROM rlog")?
                .query_row([], |r| r.get(0))?;
            match first {
                Some(f) if f <= to as i64 => {
                    tx.prepare_cached("DELETE FROM rlog WHERE seq <= ?1")?
                        .execute([(f + TRIM_PER_STEP - 1).min(to as i64)])?;
                }
                _ => self.trim_to = None,
            }
        }
        if !rd.entries.is_empty() {
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO rlog (seq, epoch, request_id, op, sum) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for e in &rd.entries {
                let op = match &e.kind {
                    EntryKind::Op(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
                    EntryKind::EpochStart => None,
                };
                let (q, ep) = (e.version.seq as i64, e.version.epoch as i64);
                let sum = rlog_sum(q, ep, &e.request_id, op.as_deref());
                ins.execute(params![q, ep, e.request_id, op, sum])?;
            }
        }
        let mut applied = Vec::new();
        let mut version = if reload {
            rd.snapshot_to_install
                .as_ref()
                .map(|s| to_api(s.version))
                .unwrap_or_default()
        } else {
            state.version
        };
        let clock = if reload {
            tx.query_row("SELECT value, sum FROM meta WHERE key = 'clock'", [], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()?
            .map(|(v, sum)| {
                verify_row("meta", &[Text("clock"), Text(&v)], sum)?;
                v.parse().map_err(corrupt)
            })
            .transpose()?
            .unwrap_or(0)
        } else {
            state.clock
        };
        let (books_sum, answers_sum, answers) = if reload {
            sums(&tx)?
        } else {
            (state.books_sum, state.answers_sum, state.answers)
        };
        let mut tables = SqlTables {
            tx: &tx,
            state,
            changed: HashMap::new(),
            unstored: HashMap::new(),
            reloaded: reload,
            clock,
            books_sum,
            answers_sum,
            answers,
        };
        for e in &rd.committed {
            if e.version.seq <= version.seq {
                continue;
            }
            let v = to_api(e.version);
            let outcome = match &e.kind {
                EntryKind::EpochStart => machine::Applied::Ignored,
                EntryKind::Op(bytes) => machine::apply_entry(
                    &mut tables,
                    &e.request_id,
                    bytes,
                    v,
                    machine::Switches::default(),
                )?,
            };
            version = v;
            if v.seq.is_multiple_of(DIGEST_EVERY) {
                tables.store_books()?;
                let d = digest(tables.clock, tables.books_sum, tables.answers_sum);
                self.checkpoints.push((v, d));
            }
            applied.push(AppliedEntry {
                version: v,
                request_id: e.request_id.clone(),
                outcome,
            });
        }
        tables.store_books()?;
        let changed = std::mem::take(&mut tables.changed);
        let new_clock = tables.clock;
        let new_sums = (tables.books_sum, tables.answers_sum);
        let new_answers = tables.answers;
        if new_clock != clock {
            put_meta(&tx, "clock", &new_clock.to_string())?;
        }
        if version != state.version || reload {
            put_meta(&tx, "applied", &to_json(&version))?;
        }
        if let Some(v) = rd.compacted {
            // The tables, at `v` or later, are the snapshot: no bytes.
            put_snapshot(&tx, v)?;
        }
        tx.commit()?;
        if let Some(v) = rd.compacted {
            // The steps that follow delete the log it covers, a few rows each.
            self.trim_to = Some(v.seq);
        }
        if reload {
            *state = self.load_state()?;
        } else {
            for (_, b) in changed {
                state.insert(b);
            }
            state.version = version;
            state.clock = new_clock;
            (state.books_sum, state.answers_sum) = new_sums;
            state.answers = new_answers;
        }
        Ok(applied)
    }

    /// The state machine at its applied version, as snapshot bytes
    /// ([`codec`]), with the number of answers it holds.
    pub fn snapshot_bytes(&self, state: &State) -> rusqlite::Result<(Vec<u8>, u64)> {
        encode_snapshot(&self.conn, state.clock, &sorted_books(state))
    }

    /// Begins reading a snapshot of the state at its applied version on a
    /// second connection, so that another thread can build the bytes while
    /// this one goes on writing: call it between two steps (when the
    /// database holds exactly `state`). The read transaction's first read
    /// fixes what it sees; WAL keeps that version readable until it ends.
    pub fn begin_snapshot(&self, state: &State) -> rusqlite::Result<SnapshotRead> {
        let conn = Connection::open(self.dir.join("catalog.sqlite"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch("PRAGMA query_only = 1; BEGIN")?;
        conn.query_row("SELECT count(*) FROM applied", [], |_| Ok(()))?;
        Ok(SnapshotRead {
            conn,
            clock: state.clock,
            books: sorted_books(state),
            version: state.version,
        })
    }

    /// Records a snapshot taken at `version`; the steps that follow delete
    /// the log it covers, a few rows each.
    pub fn store_snapshot(&mut self, snap: &Snapshot) -> rusqlite::Result<()> {
        put_snapshot(&self.conn, snap.version)?;
        self.trim_to = Some(snap.version.seq);
        Ok(())
    }
}

/// A snapshot being read beside the driver ([`Db::begin_snapshot`]).
pub struct SnapshotRead {
    conn: Connection,
    clock: u64,
    books: Vec<Book>,
    version: Version,
}

impl SnapshotRead {
    /// The snapshot bytes at [`SnapshotRead::version`], with the number of
    /// answers they hold. Runs on any thread.
    pub fn bytes(self) -> rusqlite::Result<(Vec<u8>, u64)> {
        let out = encode_snapshot(&self.conn, self.clock, &self.books);
        self.conn.execute_batch("COMMIT")?;
        out
    }

    /// The applied version the snapshot is of.
    pub fn version(&self) -> Version {
        self.version
    }
}

fn sorted_books(state: &State) -> Vec<Book> {
    let mut books: Vec<Book> = state.books.values().cloned().collect();
    books.sort_by_key(|b| b.id);
    books
}

/// The books and every kept answer (read from `conn`, each row checked
/// against its checksum) as snapshot bytes.
fn encode_snapshot(
    conn: &Connection,
    clock: u64,
    books: &[Book],
) -> rusqlite::Result<(Vec<u8>, u64)> {
    let mut w = codec::Writer::new(clock, books);
    let mut q = conn.prepare(
        "SELECT epoch, seq, outcome, until, sum, request_id FROM applied ORDER BY request_id",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        let id: String = r.get(5)?;
        let until = r.get::<_, i64>(3)? as u64;
        let (outcome, version) = read_answer(r, &id)?;
        w.answer(&id, version, until, &outcome);
    }
    let n = w.answers();
    Ok((w.finish(), n))
}

pub fn to_api(v: replication::Version) -> Version {
    Version {
        epoch: v.epoch,
        seq: v.seq,
    }
}

pub fn to_core(v: Version) -> replication::Version {
    replication::Version {
        epoch: v.epoch,
        seq: v.seq,
    }
}

fn insert_books(tx: &Transaction<'_>, books: &[Book]) -> rusqlite::Result<()> {
    let mut ins = tx.prepare(
        "INSERT INTO books (id, title, topic, cost_cents, stock, sum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for b in books {
        ins.execute(params![
            b.id.get() as i64,
            b.title,
            b.topic,
            b.cost.cents() as i64,
            b.stock as i64,
            book_sum(b)
        ])?;
    }
    Ok(())
}

fn install_snapshot(tx: &Transaction<'_>, snap: &Snapshot) -> rusqlite::Result<()> {
    let data: SnapshotData = codec::decode(&snap.data).map_err(corrupt)?;
    tx.execute("DELETE FROM books", [])?;
    tx.execute("DELETE FROM applied", [])?;
    // Entries after the snapshot stay (the core truncates them separately
    // when they do not follow it).
    tx.execute(
        "DELETE FROM rlog WHERE seq <= ?1",
        [snap.version.seq as i64],
    )?;
    insert_books(tx, &data.books)?;
    for a in &data.applied {
        put_answer_row(tx, &a.request_id, a.version, &a.outcome, a.until)?;
    }
    put_meta(tx, "clock", &data.clock.to_string())?;
    put_snapshot(tx, snap.version)?;
    Ok(())
}

/// The state machine's tables inside one transaction: books read from the
/// published state (or the database, after a snapshot reloaded it), with
/// the changes of this transaction on top.
struct SqlTables<'a> {
    tx: &'a Transaction<'a>,
    state: &'a State,
    /// Each book written in this transaction, as last written.
    changed: HashMap<BookId, Book>,
    /// The books written since their rows were last stored, with the
    /// checksum of the row stored before (`None`: no row): a group of
    /// writes touches each book many times, and its row is written and
    /// checksummed once, when the group's writes are all applied or a
    /// digest needs `books_sum` (see [`SqlTables::store_books`]).
    unstored: HashMap<BookId, Option<i64>>,
    reloaded: bool,
    clock: u64,
    books_sum: u64,
    answers_sum: u64,
    answers: u64,
}

impl machine::Tables for SqlTables<'_> {
    type Error = rusqlite::Error;

    fn book(&mut self, id: BookId) -> rusqlite::Result<Option<Book>> {
        match self.changed.get(&id) {
            Some(b) => Ok(Some(b.clone())),
            None if self.reloaded => self
                .tx
                .prepare_cached(
                    "SELECT id, title, topic, cost_cents, stock, sum FROM books WHERE id = ?1",
                )?
                .query_row([id.get() as i64], read_book)
                .optional(),
            None => Ok(self.state.books.get(&id).cloned()),
        }
    }

    fn put_book(&mut self, b: &Book) -> rusqlite::Result<()> {
        if !self.unstored.contains_key(&b.id) {
            let stored = machine::Tables::book(self, b.id)?.map(|old| book_sum(&old));
            self.unstored.insert(b.id, stored);
        }
        self.changed.insert(b.id, b.clone());
        Ok(())
    }

    fn is_empty(&mut self) -> rusqlite::Result<bool> {
        if !self.changed.is_empty() {
            return Ok(false);
        }
        self.tx
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM books)", [], |r| r.get(0))
    }

    fn answer(&mut self, request_id: &str) -> rusqlite::Result<Option<(Outcome, Version)>> {
        self.tx
            .prepare_cached(
                "SELECT epoch, seq, outcome, until, sum FROM applied WHERE request_id = ?1",
            )?
            .query_row([request_id], |r| read_answer(r, request_id))
            .optional()
    }

    fn put_answer(
        &mut self,
        request_id: &str,
        outcome: &Outcome,
        version: Version,
        until: u64,
    ) -> rusqlite::Result<()> {
        let sum = put_answer_row(self.tx, request_id, version, outcome, until)?;
        self.answers_sum = self.answers_sum.wrapping_add(sum as u64);
        self.answers += 1;
        Ok(())
    }

    fn clock(&mut self) -> rusqlite::Result<u64> {
        Ok(self.clock)
    }

    fn advance_clock(&mut self, to: u64, legacy_until: u64) -> rusqlite::Result<()> {
        if self.clock == 0 {
            let legacy: Vec<(String, i64, i64, String, i64)> = self
                .tx
                .prepare_cached(
                    "SELECT request_id, epoch, seq, outcome, sum FROM applied WHERE until = 0",
                )?
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let u = legacy_until as i64;
            for (id, e, q, o, sum) in &legacy {
                verify_row(
                    "applied",
                    &[Text(id), Int(*e), Int(*q), Text(o), Int(0)],
                    *sum,
                )?;
                let new = answer_sum(id, *e, *q, o, u);
                self.tx
                    .prepare_cached(
                        "UPDATE applied SET until = ?2, sum = ?3 WHERE request_id = ?1",
                    )?
                    .execute(params![id, u, new])?;
                self.answers_sum = self
                    .answers_sum
                    .wrapping_sub(*sum as u64)
                    .wrapping_add(new as u64);
            }
        }
        self.clock = self.clock.max(to);
        {
            let mut q = self
                .tx
                .prepare_cached("SELECT sum FROM applied WHERE until > 0 AND until <= ?1")?;
            let mut rows = q.query([self.clock as i64])?;
            while let Some(r) = rows.next()? {
                self.answers_sum = self.answers_sum.wrapping_sub(r.get::<_, i64>(0)? as u64);
                self.answers = self.answers.saturating_sub(1);
            }
        }
        self.tx
            .prepare_cached("DELETE FROM applied WHERE until > 0 AND until <= ?1")?
            .execute([self.clock as i64])?;
        Ok(())
    }
}

impl SqlTables<'_> {
    /// Stores the rows of the books written since they were last stored,
    /// each once with its checksum, and counts them in `books_sum`.
    fn store_books(&mut self) -> rusqlite::Result<()> {
        for (id, before) in std::mem::take(&mut self.unstored) {
            let Some(b) = self.changed.get(&id) else {
                continue;
            };
            let sum = book_sum(b);
            if let Some(before) = before {
                self.books_sum = self.books_sum.wrapping_sub(before as u64);
            }
            self.books_sum = self.books_sum.wrapping_add(sum as u64);
            self.tx
                .prepare_cached(
                    "INSERT INTO books (id, title, topic, cost_cents, stock, sum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (id) DO UPDATE SET title = excluded.title, topic = excluded.topic,
                       stock = excluded.stock, cost_cents = excluded.cost_cents, sum = excluded.sum",
                )?
                .execute(params![b.id.get() as i64, b.title, b.topic, b.cost.cents() as i64, b.stock as i64, sum])?;
        }
        Ok(())
    }
}

/// A book row's checksum (exported for tests that damage a store the way
/// only a bug could: content changed with a matching checksum).
#[doc(hidden)]
pub fn book_row_sum(b: &Book) -> i64 {
    book_sum(b)
}

/// A book row (with its `sum` column last) read back and verified.
fn read_book(r: &rusqlite::Row<'_>) -> rusqlite::Result<Book> {
    let b = read_book_fields(r)?;
    let stored: i64 = r.get(5)?;
    if book_sum(&b) != stored {
        return Err(
            Damaged(format!("book {}'s row does not match its checksum", b.id)).into_sqlite(),
        );
    }
    Ok(b)
}

fn read_book_fields(r: &rusqlite::Row<'_>) -> rusqlite::Result<Book> {
    let id: i64 = r.get(0)?;
    let cost: i64 = r.get(3)?;
    let stock: i64 = r.get(4)?;
    Ok(Book {
        id: BookId::new(id as u64).map_err(|e| corrupt(e.0))?,
        title: r.get(1)?,
        topic: r.get(2)?,
        cost: Money::from_cents(cost as u64).map_err(|e| corrupt(e.0))?,
        stock: u64::try_from(stock).map_err(|_| corrupt("negative stock"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{Entry, EntryKind, Ready};

    fn entry(epoch: u64, seq: u64, rid: &str, op: Option<&machine::Command>) -> Entry {
        Entry {
            version: replication::Version::new(epoch, seq),
            request_id: rid.to_string(),
            kind: match op {
                Some(op) => EntryKind::Op(op.encode()),
                None => EntryKind::EpochStart,
            },
        }
    }

    /// An empty catalog database in a directory of its own, and its state.
    fn fresh_db() -> (std::path::PathBuf, Db, State) {
        let dir =
            std::env::temp_dir().join(format!("pygmy-store-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::storage::claim(&dir, "catalog.sqlite", "c", "catalog-1").unwrap();
        let db = Db::open(&dir).unwrap();
        let state = db.load_state().unwrap();
        (dir, db, state)
    }

    /// The founding catalog, and a buy of book 1.
    fn seed_and_buy() -> (machine::Command, machine::Command) {
        let seed = machine::Command::Seed {
            books: crate::catalog::seed::default_books(),
        };
        let buy = machine::Command::Buy {
            book_id: BookId::new(1).unwrap(),
        };
        (seed, buy)
    }

    /// The log's first two entries: epoch 1 begins, the founding catalog.
    fn founding(seed: &machine::Command) -> Vec<Entry> {
        vec![
            entry(1, 1, "epoch-start-1", None),
            entry(1, 2, machine::SEED_REQUEST_ID, Some(seed)),
        ]
    }

    /// One step that persists `log` and applies all of it.
    fn commit(db: &mut Db, state: &mut State, log: Vec<Entry>) {
        let rd = Ready {
            entries: log.clone(),
            committed: log,
            ..Ready::default()
        };
        db.handle(&rd, state).unwrap();
    }

    #[test]
    fn a_retry_applied_under_an_entry_of_its_own_gets_the_first_entrys_answer() {
        // "A retried request whose first entry is committed but not yet
        // applied gets the first entry's answer: the same order_id and
        // version." The retry was proposed again (a new primary did not yet
        // know the first had committed); applying it answers as the first.
        let (dir, mut db, mut state) = fresh_db();
        let (seed, buy) = seed_and_buy();
        let log = vec![
            entry(1, 1, "epoch-start-1", None),
            entry(1, 2, machine::SEED_REQUEST_ID, Some(&seed)),
            entry(1, 3, "k:once", Some(&buy)),
            entry(2, 4, "epoch-start-2", None),
            entry(2, 5, "k:once", Some(&buy)),
        ];
        let rd = Ready {
            entries: log.clone(),
            committed: log,
            ..Ready::default()
        };
        let applied = db.handle(&rd, &mut state).unwrap();
        let answer = |i: usize| match applied[i].outcome.clone() {
            machine::Applied::Answered(o, v) => (o, v),
            other => panic!("entry {i}: {other:?}"),
        };
        let first = answer(2);
        let again = answer(4);
        assert_eq!(first.1, Version { epoch: 1, seq: 3 });
        assert_eq!(
            again, first,
            "the retry's own entry answers as the first one did"
        );
        assert!(
            matches!(first.0, Outcome::Bought { order_id: 3, .. }),
            "{first:?}"
        );
        assert_eq!(
            state.books[&BookId::new(1).unwrap()].stock,
            999,
            "bought once"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_snapshot_read_beside_the_driver_is_of_the_version_it_began_at() {
        let (dir, mut db, mut state) = fresh_db();
        let (seed, buy) = seed_and_buy();
        let mut first = founding(&seed);
        first.push(entry(1, 3, "k:a", Some(&buy)));
        commit(&mut db, &mut state, first);
        let at = state.clone();
        let expected = db.snapshot_bytes(&at).unwrap();
        let read = db.begin_snapshot(&state).unwrap();
        assert_eq!(read.version(), Version { epoch: 1, seq: 3 });
        // The driver goes on: another buy applies before the bytes are built.
        commit(&mut db, &mut state, vec![entry(1, 4, "k:b", Some(&buy))]);
        let later = db.snapshot_bytes(&state).unwrap();
        assert_ne!(later, expected, "the later write shows in a later snapshot");
        let built = std::thread::spawn(move || read.bytes())
            .join()
            .unwrap()
            .unwrap();
        assert!(
            built == expected,
            "the snapshot read beside shows the state it began at: {} answers, {} expected",
            built.1,
            expected.1
        );
        let decoded = codec::decode(&built.0).unwrap();
        assert_eq!(
            decoded
                .books
                .iter()
                .find(|b| b.id.get() == 1)
                .unwrap()
                .stock,
            999
        );
        assert_eq!(decoded.applied.len(), expected.1 as usize);
        // Its connection is gone: the driver's writes go on.
        commit(&mut db, &mut state, vec![entry(1, 5, "k:c", Some(&buy))]);
        assert_eq!(state.books[&BookId::new(1).unwrap()].stock, 997);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stored_snapshot_is_rebuilt_from_the_tables_at_their_version_on_restart() {
        let (dir, mut db, mut state) = fresh_db();
        let (seed, buy) = seed_and_buy();
        let mut log = founding(&seed);
        log.push(entry(1, 3, "k:a", Some(&buy)));
        log.push(entry(1, 4, "k:b", Some(&buy)));
        // Committed and applied up to 4; entry 5 is in the log only.
        commit(&mut db, &mut state, log);
        let uncommitted = Ready {
            entries: vec![entry(1, 5, "k:c", Some(&buy))],
            ..Ready::default()
        };
        db.handle(&uncommitted, &mut state).unwrap();
        // A snapshot taken at 3 (built beside the driver while 4 applied).
        let v3 = replication::Version::new(1, 3);
        db.store_snapshot(&Snapshot {
            version: v3,
            data: b"not kept".to_vec(),
        })
        .unwrap();
        let stored: Vec<u8> = db
            .conn
            .query_row("SELECT data FROM snapshot WHERE id = 1", [], |r| r.get(0))
            .unwrap();
        assert!(stored.is_empty(), "the bytes are not written again");
        let first = |db: &Db| -> i64 {
            db.conn
                .query_row("SELECT min(seq) FROM rlog", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(first(&db), 1, "the covered log is deleted by later steps");
        drop(db);

        let db = Db::open(&dir).unwrap();
        let p = db.load_persisted().unwrap();
        let snap = p.snapshot.expect("a snapshot after compaction");
        assert_eq!(
            snap.version,
            replication::Version::new(1, 4),
            "the snapshot is of the applied tables, later than the one stored"
        );
        assert_eq!(snap.data, db.snapshot_bytes(&state).unwrap().0);
        let data = codec::decode(&snap.data).unwrap();
        assert_eq!(
            data.books.iter().find(|b| b.id.get() == 1).unwrap().stock,
            998,
            "both applied buys are in it"
        );
        let seqs: Vec<u64> = p.entries.iter().map(|e| e.version.seq).collect();
        assert_eq!(
            seqs,
            vec![1, 2, 3, 4, 5],
            "the whole log is read back (the core skips what the snapshot covers)"
        );

        // The tables cannot be older than the log's compacted end.
        db.conn
            .execute(
                "UPDATE snapshot SET seq = 9, sum = ?1 WHERE id = 1",
                [snapshot_sum(1, 9, &[])],
            )
            .unwrap();
        let err = db.load_persisted().unwrap_err();
        assert!(Damaged::find(&err).is_some(), "{err}");
        let err = db.verify_all().unwrap_err();
        assert!(
            Damaged::find(&err).is_some(),
            "start-up's check finds it: {err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_log_a_snapshot_covers_is_deleted_a_few_rows_per_step() {
        let (dir, mut db, mut state) = fresh_db();
        let (seed, buy) = seed_and_buy();
        let n = 2 * TRIM_PER_STEP as u64 + 10;
        let mut log = founding(&seed);
        log.extend((3..=n).map(|q| entry(1, q, &format!("k:{q}"), Some(&buy))));
        commit(&mut db, &mut state, log);
        db.store_snapshot(&Snapshot {
            version: replication::Version::new(1, n - 5),
            data: Vec::new(),
        })
        .unwrap();
        let rows = |db: &Db| -> (i64, i64) {
            db.conn
                .query_row("SELECT min(seq), count(*) FROM rlog", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap()
        };
        assert_eq!(rows(&db), (1, n as i64), "nothing deleted while storing");
        let mut q = n;
        let mut next = |db: &mut Db, state: &mut State| {
            q += 1;
            commit(db, state, vec![entry(1, q, &format!("k:{q}"), Some(&buy))]);
        };
        next(&mut db, &mut state);
        assert_eq!(rows(&db).0, 1 + TRIM_PER_STEP, "one step deletes its share");
        next(&mut db, &mut state);
        next(&mut db, &mut state);
        assert_eq!(
            rows(&db),
            (n as i64 - 4, 8),
            "the covered log is gone; what follows the snapshot stays"
        );
        next(&mut db, &mut state);
        assert_eq!(rows(&db).0, n as i64 - 4, "nothing past the snapshot");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
