//! The bookstore's state machine: what applying one committed log entry
//! does. It is the only model of the bookstore: the SQLite store applies
//! entries through it, and so does the simulator (`tests/sim/`), over
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

use std::collections::{BTreeMap, HashMap};

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
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands serialise")
    }
}

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
    fn put_answer(
        &mut self,
        request_id: &str,
        outcome: &Outcome,
        version: Version,
    ) -> Result<(), Self::Error>;
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
}

/// Applies the committed entry at `version` with `request_id` and encoded
/// `command`. Returns the answer for the request id: its first outcome and
/// the version it was first applied at; `None` for a seed, an unreadable
/// command or an unknown book (which change nothing).
pub fn apply<T: Tables>(
    t: &mut T,
    request_id: &str,
    command: &[u8],
    version: Version,
    sw: Switches,
) -> Result<Option<(Outcome, Version)>, T::Error> {
    if let Some(first) = t.answer(request_id)?
        && !sw.no_dedupe
    {
        return Ok(Some(first));
    }
    let Ok(cmd) = serde_json::from_slice::<Command>(command) else {
        return Ok(None);
    };
    let id = match cmd {
        Command::Seed { books } => {
            if t.is_empty()? {
                for b in &books {
                    t.put_book(b)?;
                }
            }
            return Ok(None);
        }
        Command::Buy { book_id } | Command::Update { book_id, .. } => book_id,
    };
    let Some(mut book) = t.book(id)? else {
        return Ok(None);
    };
    let outcome = match cmd {
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
        && let Some(first) = t.answer(request_id)?
    {
        return Ok(Some(first));
    }
    t.put_answer(request_id, &outcome, version)?;
    Ok(Some((outcome, version)))
}

/// The state machine's content, as a snapshot carries it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SnapshotData {
    pub books: Vec<Book>,
    /// request id, version, outcome
    pub applied: Vec<(String, Version, Outcome)>,
}

/// The tables in memory: the simulator's bookstore.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemTables {
    pub books: BTreeMap<BookId, Book>,
    pub answers: HashMap<String, (Outcome, Version)>,
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
    ) -> Result<(), Self::Error> {
        self.answers
            .insert(request_id.to_string(), (outcome.clone(), version));
        Ok(())
    }
}

impl MemTables {
    pub fn to_snapshot(&self) -> SnapshotData {
        let mut applied: Vec<_> = self
            .answers
            .iter()
            .map(|(r, (o, v))| (r.clone(), *v, o.clone()))
            .collect();
        applied.sort_by(|a, b| a.0.cmp(&b.0));
        SnapshotData {
            books: self.books.values().cloned().collect(),
            applied,
        }
    }

    pub fn from_snapshot(s: SnapshotData) -> Self {
        MemTables {
            books: s.books.into_iter().map(|b| (b.id, b)).collect(),
            answers: s.applied.into_iter().map(|(r, v, o)| (r, (o, v))).collect(),
        }
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
