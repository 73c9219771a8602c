//! A catalog replica's disk: SQLite (WAL, fsync on every commit) holding
//! both the replication core's durable state and the state machine.
//!
//! * `rlog`      — the replicated log (may hold an uncommitted suffix; the
//!   core says when to truncate it);
//! * `meta`      — the core's hard state, the applied version;
//! * `snapshot`  — the latest snapshot (the log before it is compacted);
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
use crate::storage::{self, StorageError};

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS books (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    topic TEXT NOT NULL,
    cost_cents INTEGER NOT NULL CHECK (cost_cents >= 0),
    stock INTEGER NOT NULL CHECK (stock >= 0)
);
CREATE TABLE IF NOT EXISTS applied (
    request_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    until INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rlog (
    seq INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    op TEXT
);
CREATE TABLE IF NOT EXISTS snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL
);
";

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
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("wire types serialise")
}

fn corrupt(what: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(format!("corrupt catalog data: {what}").into())
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
        Ok(Self { conn })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> rusqlite::Result<Option<T>> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        v.map(|v| serde_json::from_str(&v).map_err(corrupt))
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
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('hard_state', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [to_json(hs)],
        )?;
        Ok(())
    }

    pub fn load_state(&self) -> rusqlite::Result<State> {
        let mut state = State::default();
        let mut q = self
            .conn
            .prepare("SELECT id, title, topic, cost_cents, stock FROM books")?;
        for b in q.query_map([], read_book)? {
            state.insert(b?);
        }
        state.version = self.meta("applied")?.unwrap_or_default();
        state.clock = self.meta("clock")?.unwrap_or_default();
        Ok(state)
    }

    pub fn load_persisted(&self) -> rusqlite::Result<Persisted> {
        let hard_state = self.meta("hard_state")?.unwrap_or_default();
        let snapshot = self
            .conn
            .query_row(
                "SELECT epoch, seq, data FROM snapshot WHERE id = 1",
                [],
                |r| {
                    Ok(Snapshot {
                        version: to_core(version_of(r.get(0)?, r.get(1)?)),
                        data: r.get(2)?,
                    })
                },
            )
            .optional()?;
        let mut entries = Vec::new();
        let mut q = self
            .conn
            .prepare("SELECT seq, epoch, request_id, op FROM rlog ORDER BY seq")?;
        let rows = q.query_map([], |r| {
            let op: Option<String> = r.get(3)?;
            Ok(Entry {
                version: to_core(version_of(r.get(1)?, r.get(0)?)),
                request_id: r.get(2)?,
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
        let row: Option<(String, i64, i64)> = self
            .conn
            .prepare_cached("SELECT outcome, epoch, seq FROM applied WHERE request_id = ?1")?
            .query_row([request_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        row.map(|(o, e, s)| {
            Ok(WriteResult {
                outcome: serde_json::from_str(&o).map_err(corrupt)?,
                version: version_of(e, s),
            })
        })
        .transpose()
    }

    /// Persists a `Ready` and applies its committed entries, in one
    /// transaction; then brings `state` up to date. Entries at or below the
    /// applied version (handed out again after a restart) are skipped.
    pub fn handle(
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
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('hard_state', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [to_json(hs)],
            )?;
        }
        if let Some(t) = rd.truncate_after {
            tx.execute("DELETE FROM rlog WHERE seq > ?1", [t as i64])?;
        }
        if !rd.entries.is_empty() {
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO rlog (seq, epoch, request_id, op) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for e in &rd.entries {
                let op = match &e.kind {
                    EntryKind::Op(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
                    EntryKind::EpochStart => None,
                };
                ins.execute(params![
                    e.version.seq as i64,
                    e.version.epoch as i64,
                    e.request_id,
                    op
                ])?;
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
            tx.query_row("SELECT value FROM meta WHERE key = 'clock'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .map(|v| v.parse().map_err(corrupt))
            .transpose()?
            .unwrap_or(0)
        } else {
            state.clock
        };
        let mut tables = SqlTables {
            tx: &tx,
            state,
            changed: HashMap::new(),
            reloaded: reload,
            clock,
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
            applied.push(AppliedEntry {
                version: v,
                request_id: e.request_id.clone(),
                outcome,
            });
        }
        let changed = std::mem::take(&mut tables.changed);
        let new_clock = tables.clock;
        if new_clock != clock {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('clock', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [new_clock.to_string()],
            )?;
        }
        if version != state.version || reload {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('applied', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [to_json(&version)],
            )?;
        }
        tx.commit()?;
        if reload {
            *state = self.load_state()?;
        } else {
            for (_, b) in changed {
                state.insert(b);
            }
            state.version = version;
            state.clock = new_clock;
        }
        Ok(applied)
    }

    /// The state machine at its applied version, as snapshot bytes
    /// ([`codec`]), with the number of answers it holds.
    pub fn snapshot_bytes(&self, state: &State) -> rusqlite::Result<(Vec<u8>, u64)> {
        let mut books: Vec<Book> = state.books.values().cloned().collect();
        books.sort_by_key(|b| b.id);
        let mut w = codec::Writer::new(state.clock, &books);
        let mut q = self.conn.prepare(
            "SELECT request_id, epoch, seq, until, outcome FROM applied ORDER BY request_id",
        )?;
        let mut rows = q.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let outcome: Outcome =
                serde_json::from_str(r.get_ref(4)?.as_str()?).map_err(corrupt)?;
            w.answer(
                &id,
                version_of(r.get(1)?, r.get(2)?),
                r.get::<_, i64>(3)? as u64,
                &outcome,
            );
        }
        let n = w.answers();
        Ok((w.finish(), n))
    }

    /// Stores a snapshot taken at `version` and drops the log it covers.
    pub fn store_snapshot(&mut self, snap: &Snapshot) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO snapshot (id, epoch, seq, data) VALUES (1, ?1, ?2, ?3)",
            params![
                snap.version.epoch as i64,
                snap.version.seq as i64,
                snap.data
            ],
        )?;
        tx.execute(
            "DELETE FROM rlog WHERE seq <= ?1",
            [snap.version.seq as i64],
        )?;
        tx.commit()
    }
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
        "INSERT INTO books (id, title, topic, cost_cents, stock) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for b in books {
        ins.execute(params![
            b.id.get() as i64,
            b.title,
            b.topic,
            b.cost.cents() as i64,
            b.stock as i64
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
    let mut ins = tx.prepare(
        "INSERT INTO applied (request_id, epoch, seq, outcome, until) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for a in &data.applied {
        ins.execute(params![
            a.request_id,
            a.version.epoch as i64,
            a.version.seq as i64,
            to_json(&a.outcome),
            a.until as i64
        ])?;
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('clock', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [data.clock.to_string()],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO snapshot (id, epoch, seq, data) VALUES (1, ?1, ?2, ?3)",
        params![
            snap.version.epoch as i64,
            snap.version.seq as i64,
            snap.data
        ],
    )?;
    Ok(())
}

/// The state machine's tables inside one transaction: books read from the
/// published state (or the database, after a snapshot reloaded it), with
/// the changes of this transaction on top.
struct SqlTables<'a> {
    tx: &'a Transaction<'a>,
    state: &'a State,
    changed: HashMap<BookId, Book>,
    reloaded: bool,
    clock: u64,
}

impl machine::Tables for SqlTables<'_> {
    type Error = rusqlite::Error;

    fn book(&mut self, id: BookId) -> rusqlite::Result<Option<Book>> {
        match self.changed.get(&id) {
            Some(b) => Ok(Some(b.clone())),
            None if self.reloaded => self
                .tx
                .prepare_cached(
                    "SELECT id, title, topic, cost_cents, stock FROM books WHERE id = ?1",
                )?
                .query_row([id.get() as i64], read_book)
                .optional(),
            None => Ok(self.state.books.get(&id).cloned()),
        }
    }

    fn put_book(&mut self, b: &Book) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO books (id, title, topic, cost_cents, stock) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET stock = excluded.stock, cost_cents = excluded.cost_cents",
            )?
            .execute(params![b.id.get() as i64, b.title, b.topic, b.cost.cents() as i64, b.stock as i64])?;
        self.changed.insert(b.id, b.clone());
        Ok(())
    }

    fn is_empty(&mut self) -> rusqlite::Result<bool> {
        self.tx
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM books)", [], |r| r.get(0))
    }

    fn answer(&mut self, request_id: &str) -> rusqlite::Result<Option<(Outcome, Version)>> {
        let stored: Option<(String, i64, i64)> = self
            .tx
            .prepare_cached("SELECT outcome, epoch, seq FROM applied WHERE request_id = ?1")?
            .query_row([request_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        stored
            .map(|(o, e, s)| Ok((serde_json::from_str(&o).map_err(corrupt)?, version_of(e, s))))
            .transpose()
    }

    fn put_answer(
        &mut self,
        request_id: &str,
        outcome: &Outcome,
        version: Version,
        until: u64,
    ) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO applied (request_id, epoch, seq, outcome, until) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                request_id,
                version.epoch as i64,
                version.seq as i64,
                to_json(outcome),
                until as i64
            ])?;
        Ok(())
    }

    fn clock(&mut self) -> rusqlite::Result<u64> {
        Ok(self.clock)
    }

    fn advance_clock(&mut self, to: u64, legacy_until: u64) -> rusqlite::Result<()> {
        if self.clock == 0 {
            self.tx
                .prepare_cached("UPDATE applied SET until = ?1 WHERE until = 0")?
                .execute([legacy_until as i64])?;
        }
        self.clock = self.clock.max(to);
        self.tx
            .prepare_cached("DELETE FROM applied WHERE until > 0 AND until <= ?1")?
            .execute([self.clock as i64])?;
        Ok(())
    }
}

fn read_book(r: &rusqlite::Row<'_>) -> rusqlite::Result<Book> {
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

    #[test]
    fn a_retry_applied_under_an_entry_of_its_own_gets_the_first_entrys_answer() {
        // "A retried request whose first entry is committed but not yet
        // applied gets the first entry's answer: the same order_id and
        // version." The retry was proposed again (a new primary did not yet
        // know the first had committed); applying it answers as the first.
        let dir =
            std::env::temp_dir().join(format!("pygmy-store-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::storage::claim(&dir, "catalog.sqlite", "c", "catalog-1").unwrap();
        let mut db = Db::open(&dir).unwrap();
        let mut state = db.load_state().unwrap();
        let seed = machine::Command::Seed {
            books: crate::catalog::seed::default_books(),
        };
        let buy = machine::Command::Buy {
            book_id: BookId::new(1).unwrap(),
        };
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
}
