//! The bookstore's state machine: what applying one committed log entry
//! does. It is the only model of the bookstore: the SQLite store applies
//! entries through it, and so does the simulator (`tests/it/sim/`), over
//! [`MemTables`].
//!
//! Applying is deterministic, so every replica computes the same outcome:
//! * a request id applied before returns its first outcome and version and
//!   changes nothing (exactly once, also when a retry got an entry of its
//!   own);
//! * a buy checks the stock and decrements it in one step (no oversell);
//! * an update sets stock and/or cost;
//! * the seed (the cluster's first entry after its first epoch start)
//!   fills an empty catalog, so every replica starts from the books the
//!   founding primary read, whatever catalog file the others were given.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::api::{Book, BookId, CatalogOp, Money, Outcome, Version};

/// An operation as the log carries it (JSON). Buys and updates encode as
/// the wire's [`CatalogOp`] does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    Buy {
        book_id: BookId,
    },
    Update {
        book_id: BookId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stock: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost: Option<Money>,
    },
    /// The founding catalog; applied only to an empty one.
    Seed {
        books: Vec<Book>,
    },
}

impl From<CatalogOp> for Command {
    fn from(op: CatalogOp) -> Self {
        match op {
            CatalogOp::Buy { book_id } => Command::Buy { book_id },
            CatalogOp::Update {
                book_id,
                stock,
                cost,
            } => Command::Update {
                book_id,
                stock,
                cost,
            },
        }
    }
}

impl Command {
    /// The command without a time (the seed; the simulator's entries).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands serialise")
    }

    /// The command as the primary proposes it: stamped with its clock `at`
    /// (Unix ms) and until when its request id's answer is kept.
    pub fn encode_stamped(self, at: u64, until: u64) -> Vec<u8> {
        serde_json::to_vec(&Stamped {
            command: self,
            at,
            until,
        })
        .expect("commands serialise")
    }
}

/// A command with the primary's stamps. Both are carried by the entry, so
/// every replica expires the same answers at the same entry, whatever its
/// own clock or configuration says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    #[serde(flatten)]
    pub command: Command,
    /// The proposing primary's wall clock (Unix ms); 0 = unstamped. The
    /// replicated clock is the largest `at` applied so far: it never goes
    /// back, whichever primary's clock is behind.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub at: u64,
    /// Replicated time at which the request id's answer is forgotten;
    /// 0 = kept. An entry whose `until` the replicated clock has reached
    /// is refused ([`Applied::Expired`]): its id's first answer may be gone
    /// already, so applying it could apply the same request twice.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub until: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Answers kept from before entries were stamped are forgotten this long
/// after the first stamped entry (the default key window).
pub const LEGACY_ANSWERS_KEPT_MS: u64 = 24 * 3_600_000;

/// Request ids whose answers the seed entry is logged under.
pub const SEED_REQUEST_ID: &str = "seed";

/// What the state machine reads and writes: the books, and the answer each
/// applied request id got.
pub trait Tables {
    type Error;
    fn book(&mut self, id: BookId) -> Result<Option<Book>, Self::Error>;
    fn put_book(&mut self, book: &Book) -> Result<(), Self::Error>;
    fn is_empty(&mut self) -> Result<bool, Self::Error>;
    fn answer(&mut self, request_id: &str) -> Result<Option<(Outcome, Version)>, Self::Error>;
    /// Records a request id's answer, kept until the replicated clock
    /// reaches `until` (0 = kept).
    fn put_answer(
        &mut self,
        request_id: &str,
        outcome: &Outcome,
        version: Version,
        until: u64,
    ) -> Result<(), Self::Error>;
    /// The replicated clock: the largest `at` applied (0 before any).
    fn clock(&mut self) -> Result<u64, Self::Error>;
    /// Moves the replicated clock forward to `to` and forgets every answer
    /// whose `until` it reached. Answers kept without an `until` (from
    /// before stamping) get `legacy_until` when the clock starts (from 0).
    fn advance_clock(&mut self, to: u64, legacy_until: u64) -> Result<(), Self::Error>;
}

/// What applying one entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The request id's answer: its first outcome and the version it was
    /// first applied at.
    Answered(Outcome, Version),
    /// Nothing to answer: a seed, an unreadable command, an unknown book.
    Ignored,
    /// The request id's answer window had passed when its entry applied:
    /// refused, nothing changed.
    Expired,
}

/// Switches that break the state machine on purpose, so the simulator can
/// show it finds the resulting violation. All `false` in production.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// A buy decrements without checking the stock (the original's bug:
    /// it checked at the primary before writing, in another step).
    pub decrement_unchecked: bool,
    /// A request id applied before is applied again (no dedupe at apply).
    pub no_dedupe: bool,
    /// An entry is applied even when its id's answer window has passed.
    pub apply_expired: bool,
}

/// Applies the committed entry at `version` with `request_id` and encoded
/// `command`. Returns the answer for the request id: its first outcome and
/// the version it was first applied at; `None` for a seed, an unreadable
/// command, an unknown book (which change nothing) and an expired entry.
pub fn apply<T: Tables>(
    t: &mut T,
    request_id: &str,
    command: &[u8],
    version: Version,
    sw: Switches,
) -> Result<Option<(Outcome, Version)>, T::Error> {
    Ok(match apply_entry(t, request_id, command, version, sw)? {
        Applied::Answered(o, v) => Some((o, v)),
        Applied::Ignored | Applied::Expired => None,
    })
}

/// [`apply`], saying also whether an entry was refused as expired.
pub fn apply_entry<T: Tables>(
    t: &mut T,
    request_id: &str,
    command: &[u8],
    version: Version,
    sw: Switches,
) -> Result<Applied, T::Error> {
    let stamped = serde_json::from_slice::<Stamped>(command).ok();
    if let Some(s) = &stamped
        && s.at > t.clock()?
    {
        t.advance_clock(s.at, s.at.saturating_add(LEGACY_ANSWERS_KEPT_MS))?;
    }
    if let Some((o, v)) = t.answer(request_id)?
        && !sw.no_dedupe
    {
        return Ok(Applied::Answered(o, v));
    }
    let Some(Stamped { command, until, .. }) = stamped else {
        return Ok(Applied::Ignored);
    };
    if until != 0 && until <= t.clock()? && !sw.apply_expired {
        return Ok(Applied::Expired);
    }
    let id = match command {
        Command::Seed { books } => {
            if t.is_empty()? {
                for b in &books {
                    t.put_book(b)?;
                }
            }
            return Ok(Applied::Ignored);
        }
        Command::Buy { book_id } | Command::Update { book_id, .. } => book_id,
    };
    let Some(mut book) = t.book(id)? else {
        return Ok(Applied::Ignored);
    };
    let outcome = match command {
        Command::Buy { .. } if book.stock > 0 || sw.decrement_unchecked => {
            book.stock = book.stock.wrapping_sub(1);
            Outcome::Bought {
                book_id: id,
                title: book.title.clone(),
                price: book.cost,
                order_id: version.seq,
            }
        }
        Command::Buy { .. } => Outcome::OutOfStock {
            book_id: id,
            title: book.title.clone(),
        },
        Command::Update { stock, cost, .. } => {
            if let Some(s) = stock {
                book.stock = s;
            }
            if let Some(c) = cost {
                book.cost = c;
            }
            Outcome::Updated { book: book.clone() }
        }
        Command::Seed { .. } => unreachable!("handled above"),
    };
    if !matches!(outcome, Outcome::OutOfStock { .. }) {
        t.put_book(&book)?;
    }
    if sw.no_dedupe
        && let Some((o, v)) = t.answer(request_id)?
    {
        return Ok(Applied::Answered(o, v));
    }
    t.put_answer(request_id, &outcome, version, until)?;
    Ok(Applied::Answered(outcome, version))
}

/// The state machine's content, as a snapshot carries it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SnapshotData {
    /// The replicated clock.
    pub clock: u64,
    pub books: Vec<Book>,
    /// The answers still kept.
    pub applied: Vec<Answer>,
}

/// A request id's kept answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub request_id: String,
    pub version: Version,
    pub outcome: Outcome,
    /// Replicated time it is forgotten at; 0 = kept.
    pub until: u64,
}

/// The tables in memory: the simulator's bookstore.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemTables {
    pub books: BTreeMap<BookId, Book>,
    pub answers: HashMap<String, (Outcome, Version)>,
    /// `until` of the answers that have one, in expiry order.
    expiry: BTreeSet<(u64, String)>,
    clock: u64,
}

impl Tables for MemTables {
    type Error = std::convert::Infallible;
    fn book(&mut self, id: BookId) -> Result<Option<Book>, Self::Error> {
        Ok(self.books.get(&id).cloned())
    }
    fn put_book(&mut self, book: &Book) -> Result<(), Self::Error> {
        self.books.insert(book.id, book.clone());
        Ok(())
    }
    fn is_empty(&mut self) -> Result<bool, Self::Error> {
        Ok(self.books.is_empty())
    }
    fn answer(&mut self, request_id: &str) -> Result<Option<(Outcome, Version)>, Self::Error> {
        Ok(self.answers.get(request_id).cloned())
    }
    fn put_answer(
        &mut self,
        request_id: &str,
        outcome: &Outcome,
        version: Version,
        until: u64,
    ) -> Result<(), Self::Error> {
        self.answers
            .insert(request_id.to_string(), (outcome.clone(), version));
        if until != 0 {
            self.expiry.insert((until, request_id.to_string()));
        }
        Ok(())
    }
    fn clock(&mut self) -> Result<u64, Self::Error> {
        Ok(self.clock)
    }
    fn advance_clock(&mut self, to: u64, legacy_until: u64) -> Result<(), Self::Error> {
        if self.clock == 0 {
            let timed: HashSet<&String> = self.expiry.iter().map(|(_, r)| r).collect();
            let legacy: Vec<String> = self
                .answers
                .keys()
                .filter(|r| !timed.contains(r))
                .cloned()
                .collect();
            for r in legacy {
                self.expiry.insert((legacy_until, r));
            }
        }
        self.clock = self.clock.max(to);
        while let Some((until, _)) = self.expiry.first()
            && *until <= self.clock
        {
            let (_, r) = self.expiry.pop_first().expect("not empty");
            self.answers.remove(&r);
        }
        Ok(())
    }
}

impl MemTables {
    pub fn to_snapshot(&self) -> SnapshotData {
        let until: HashMap<&String, u64> = self.expiry.iter().map(|(u, r)| (r, *u)).collect();
        let mut applied: Vec<_> = self
            .answers
            .iter()
            .map(|(r, (o, v))| Answer {
                request_id: r.clone(),
                version: *v,
                outcome: o.clone(),
                until: until.get(r).copied().unwrap_or(0),
            })
            .collect();
        applied.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        SnapshotData {
            clock: self.clock,
            books: self.books.values().cloned().collect(),
            applied,
        }
    }

    pub fn from_snapshot(s: SnapshotData) -> Self {
        let mut t = MemTables {
            books: s.books.into_iter().map(|b| (b.id, b)).collect(),
            clock: s.clock,
            ..MemTables::default()
        };
        for a in s.applied {
            if a.until != 0 {
                t.expiry.insert((a.until, a.request_id.clone()));
            }
            t.answers.insert(a.request_id, (a.outcome, a.version));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(stock: u64) -> MemTables {
        let mut t = MemTables::default();
        let book = Book {
            id: BookId::new(1).unwrap(),
            title: "t".into(),
            topic: "x".into(),
            cost: Money::from_cents(100).unwrap(),
            stock,
        };
        t.put_book(&book).unwrap();
        t
    }

    fn buy() -> Vec<u8> {
        Command::Buy {
            book_id: BookId::new(1).unwrap(),
        }
        .encode()
    }

    fn v(seq: u64) -> Version {
        Version { epoch: 1, seq }
    }

    #[test]
    fn a_buy_checks_and_decrements_in_one_step() {
        let mut t = store(1);
        let (o, _) = apply(&mut t, "a", &buy(), v(1), Switches::default())
            .unwrap()
            .unwrap();
        assert!(matches!(o, Outcome::Bought { order_id: 1, .. }));
        let (o, _) = apply(&mut t, "b", &buy(), v(2), Switches::default())
            .unwrap()
            .unwrap();
        assert!(matches!(o, Outcome::OutOfStock { .. }));
        assert_eq!(t.books[&BookId::new(1).unwrap()].stock, 0);
    }

    #[test]
    fn a_request_id_applied_before_gets_its_first_answer_and_changes_nothing() {
        let mut t = store(5);
        let first = apply(&mut t, "a", &buy(), v(1), Switches::default()).unwrap();
        let again = apply(&mut t, "a", &buy(), v(7), Switches::default()).unwrap();
        assert_eq!(again, first);
        assert_eq!(again.unwrap().1, v(1));
        assert_eq!(t.books[&BookId::new(1).unwrap()].stock, 4);
    }

    fn stamped_buy(at: u64, until: u64) -> Vec<u8> {
        Command::Buy {
            book_id: BookId::new(1).unwrap(),
        }
        .encode_stamped(at, until)
    }

    fn stock(t: &MemTables) -> u64 {
        t.books[&BookId::new(1).unwrap()].stock
    }

    #[test]
    fn an_answer_is_forgotten_once_the_replicated_clock_reaches_its_until_and_a_late_retry_is_refused()
     {
        let sw = Switches::default();
        let mut t = store(5);
        let first = apply_entry(&mut t, "r:1000-a", &stamped_buy(1_000, 2_000), v(1), sw).unwrap();
        assert!(matches!(first, Applied::Answered(..)));
        // Before its until, a retry gets the first answer.
        let again = apply_entry(&mut t, "r:1000-a", &stamped_buy(1_999, 2_000), v(2), sw).unwrap();
        assert_eq!(again, first);
        assert_eq!(stock(&t), 4);
        // Another write moves the clock past it: forgotten.
        apply_entry(&mut t, "k:b", &stamped_buy(2_500, 90_000), v(3), sw).unwrap();
        assert!(!t.answers.contains_key("r:1000-a"));
        assert!(t.answers.contains_key("k:b"));
        assert_eq!(stock(&t), 3);
        // A retry stamped by a primary whose clock is behind is still
        // refused: the replicated clock does not go back.
        let late = apply_entry(&mut t, "r:1000-a", &stamped_buy(1_500, 2_000), v(4), sw).unwrap();
        assert_eq!(late, Applied::Expired);
        assert_eq!(stock(&t), 3, "the late retry bought nothing");
        assert_eq!(t.clock().unwrap(), 2_500);
        // The switch that skips the refusal buys twice: what it guards.
        let sw = Switches {
            apply_expired: true,
            ..sw
        };
        apply_entry(&mut t, "r:1000-a", &stamped_buy(1_500, 2_000), v(5), sw).unwrap();
        assert_eq!(stock(&t), 2);
    }

    #[test]
    fn a_key_reused_after_its_window_is_a_new_request() {
        let sw = Switches::default();
        let mut t = store(5);
        apply_entry(&mut t, "k:x", &stamped_buy(1_000, 2_000), v(1), sw).unwrap();
        apply_entry(&mut t, "k:y", &stamped_buy(3_000, 4_000), v(2), sw).unwrap();
        let reused = apply_entry(&mut t, "k:x", &stamped_buy(3_001, 4_001), v(3), sw).unwrap();
        assert!(
            matches!(&reused, Applied::Answered(_, at) if *at == v(3)),
            "{reused:?}"
        );
        assert_eq!(stock(&t), 2);
    }

    #[test]
    fn answers_from_before_stamping_get_the_legacy_window_when_the_clock_starts() {
        let sw = Switches::default();
        let mut t = store(5);
        apply(&mut t, "old", &buy(), v(1), sw).unwrap();
        apply_entry(&mut t, "k:new", &stamped_buy(10_000, 20_000), v(2), sw).unwrap();
        let snap = t.to_snapshot();
        let old = snap.applied.iter().find(|a| a.request_id == "old").unwrap();
        assert_eq!(old.until, 10_000 + LEGACY_ANSWERS_KEPT_MS);
        assert_eq!(MemTables::from_snapshot(snap.clone()).to_snapshot(), snap);
        apply_entry(
            &mut t,
            "k:late",
            &stamped_buy(old.until, u64::MAX),
            v(3),
            sw,
        )
        .unwrap();
        assert!(!t.answers.contains_key("old"));
    }

    #[test]
    fn the_seed_fills_only_an_empty_catalog() {
        let mut t = MemTables::default();
        let seed = |stock| {
            Command::Seed {
                books: store(stock).books.into_values().collect(),
            }
            .encode()
        };
        assert_eq!(
            apply(&mut t, SEED_REQUEST_ID, &seed(7), v(2), Switches::default()).unwrap(),
            None
        );
        assert_eq!(t.books[&BookId::new(1).unwrap()].stock, 7);
        apply(&mut t, "seed-again", &seed(9), v(3), Switches::default()).unwrap();
        assert_eq!(
            t.books[&BookId::new(1).unwrap()].stock,
            7,
            "a second seed changes nothing"
        );
    }

    #[test]
    fn log_commands_read_the_wire_ops_bytes() {
        let op = CatalogOp::Update {
            book_id: BookId::new(3).unwrap(),
            stock: Some(2),
            cost: None,
        };
        let bytes = serde_json::to_vec(&op).unwrap();
        assert_eq!(
            serde_json::from_slice::<Command>(&bytes).unwrap(),
            Command::from(op)
        );
    }
}
