//! A snapshot's bytes: compact binary, written row by row and checked as a
//! whole.
//!
//! ```text
//! "PYGSNAP1"  clock
//! n_books     (id cost_cents stock title topic) × n_books
//! (1 request_id epoch seq until outcome) × answers   0
//! sha256 of everything before
//! ```
//!
//! Integers are LEB128 varints, strings a varint length and UTF-8 bytes.
//! An outcome is a tag (1 bought, 2 out of stock, 3 updated) and its fields.
//! Decoding checks the digest first, then every length against what is
//! left, so damaged or hostile bytes are refused, never trusted.

use sha2::{Digest, Sha256};

use super::machine::{Answer, SnapshotData};
use crate::api::{Book, BookId, Money, Outcome, Version};

const MAGIC: &[u8; 8] = b"PYGSNAP1";
const DIGEST_LEN: usize = 32;

/// Why snapshot bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("snapshot bytes refused: {0}")]
pub struct DecodeError(String);

fn bad(why: impl Into<String>) -> DecodeError {
    DecodeError(why.into())
}

/// Builds a snapshot's bytes one answer at a time, so the answers never
/// need to be held as values all at once.
pub struct Writer {
    buf: Vec<u8>,
    answers: u64,
}

impl Writer {
    pub fn new(clock: u64, books: &[Book]) -> Self {
        let mut w = Writer {
            buf: Vec::with_capacity(64 + books.len() * 64),
            answers: 0,
        };
        w.buf.extend_from_slice(MAGIC);
        w.u64(clock);
        w.u64(books.len() as u64);
        for b in books {
            w.book(b);
        }
        w
    }

    pub fn answer(&mut self, request_id: &str, version: Version, until: u64, outcome: &Outcome) {
        self.buf.push(1);
        self.str(request_id);
        self.u64(version.epoch);
        self.u64(version.seq);
        self.u64(until);
        match outcome {
            Outcome::Bought {
                book_id,
                title,
                price,
                order_id,
            } => {
                self.buf.push(1);
                self.u64(book_id.get());
                self.str(title);
                self.u64(price.cents());
                self.u64(*order_id);
            }
            Outcome::OutOfStock { book_id, title } => {
                self.buf.push(2);
                self.u64(book_id.get());
                self.str(title);
            }
            Outcome::Updated { book } => {
                self.buf.push(3);
                self.book(book);
            }
        }
        self.answers += 1;
    }

    /// How many answers were written.
    pub fn answers(&self) -> u64 {
        self.answers
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(0);
        let digest = Sha256::digest(&self.buf);
        self.buf.extend_from_slice(&digest);
        self.buf
    }

    fn book(&mut self, b: &Book) {
        self.u64(b.id.get());
        self.u64(b.cost.cents());
        self.u64(b.stock);
        self.str(&b.title);
        self.str(&b.topic);
    }

    fn u64(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }

    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
}

#[cfg(test)]
pub fn encode(s: &SnapshotData) -> Vec<u8> {
    let mut w = Writer::new(s.clock, &s.books);
    for a in &s.applied {
        w.answer(&a.request_id, a.version, a.until, &a.outcome);
    }
    w.finish()
}

/// Checks a snapshot's header and digest without decoding it (a JSON
/// snapshot from before the binary form has no digest to check).
pub fn check(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.first() == Some(&b'{') {
        return Ok(());
    }
    checked_body(bytes).map(|_| ())
}

fn checked_body(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() < MAGIC.len() + DIGEST_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a snapshot (wrong header)"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST_LEN);
    if Sha256::digest(body).as_slice() != digest {
        return Err(bad("checksum mismatch: the bytes are damaged"));
    }
    Ok(body)
}

/// Snapshots stored before the binary form were JSON, without times.
#[derive(serde::Deserialize)]
struct JsonSnapshot {
    books: Vec<Book>,
    applied: Vec<(String, Version, Outcome)>,
}

pub fn decode(bytes: &[u8]) -> Result<SnapshotData, DecodeError> {
    if bytes.first() == Some(&b'{') {
        let s: JsonSnapshot =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("JSON snapshot: {e}")))?;
        return Ok(SnapshotData {
            clock: 0,
            books: s.books,
            applied: s
                .applied
                .into_iter()
                .map(|(request_id, version, outcome)| Answer {
                    request_id,
                    version,
                    outcome,
                    until: 0,
                })
                .collect(),
        });
    }
    let body = checked_body(bytes)?;
    let mut r = Reader {
        rest: &body[MAGIC.len()..],
    };
    let clock = r.u64()?;
    let n_books = r.u64()?;
    let mut books = Vec::new();
    for _ in 0..n_books {
        books.push(r.book()?);
    }
    let mut applied = Vec::new();
    loop {
        match r.byte()? {
            0 => break,
            1 => {}
            t => return Err(bad(format!("unknown record {t}"))),
        }
        let request_id = r.str()?;
        let version = Version {
            epoch: r.u64()?,
            seq: r.u64()?,
        };
        let until = r.u64()?;
        let outcome = match r.byte()? {
            1 => Outcome::Bought {
                book_id: r.book_id()?,
                title: r.str()?,
                price: r.money()?,
                order_id: r.u64()?,
            },
            2 => Outcome::OutOfStock {
                book_id: r.book_id()?,
                title: r.str()?,
            },
            3 => Outcome::Updated { book: r.book()? },
            t => return Err(bad(format!("unknown outcome {t}"))),
        };
        applied.push(Answer {
            request_id,
            version,
            outcome,
            until,
        });
    }
    if !r.rest.is_empty() {
        return Err(bad("bytes after the end"));
    }
    Ok(SnapshotData {
        clock,
        books,
        applied,
    })
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.rest.split_first().ok_or_else(|| bad("truncated"))?;
        self.rest = rest;
        Ok(b)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Err(bad("integer too large"));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("integer too long"))
    }

    fn str(&mut self) -> Result<String, DecodeError> {
        let len = usize::try_from(self.u64()?).map_err(|_| bad("string too long"))?;
        if len > self.rest.len() {
            return Err(bad("truncated string"));
        }
        let (s, rest) = self.rest.split_at(len);
        self.rest = rest;
        String::from_utf8(s.to_vec()).map_err(|_| bad("string is not UTF-8"))
    }

    fn book_id(&mut self) -> Result<BookId, DecodeError> {
        BookId::new(self.u64()?).map_err(|e| bad(e.0))
    }

    fn money(&mut self) -> Result<Money, DecodeError> {
        Money::from_cents(self.u64()?).map_err(|e| bad(e.0))
    }

    fn book(&mut self) -> Result<Book, DecodeError> {
        Ok(Book {
            id: self.book_id()?,
            cost: self.money()?,
            stock: self.u64()?,
            title: self.str()?,
            topic: self.str()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotData {
        let book = Book {
            id: BookId::new(3).unwrap(),
            title: "RPCs for Dummies.".into(),
            topic: "distributed systems".into(),
            cost: Money::from_cents(1_50).unwrap(),
            stock: 994,
        };
        let v = |seq| Version { epoch: 2, seq };
        SnapshotData {
            clock: 1_764_000_000_000,
            books: vec![book.clone()],
            applied: vec![
                Answer {
                    request_id: "k:a".into(),
                    version: v(7),
                    outcome: Outcome::Bought {
                        book_id: book.id,
                        title: book.title.clone(),
                        price: book.cost,
                        order_id: 7,
                    },
                    until: 1_764_086_400_000,
                },
                Answer {
                    request_id: "r:1764000000000-ab".into(),
                    version: v(8),
                    outcome: Outcome::OutOfStock {
                        book_id: book.id,
                        title: book.title.clone(),
                    },
                    until: 1_764_000_030_000,
                },
                Answer {
                    request_id: "u:1".into(),
                    version: v(u64::MAX),
                    outcome: Outcome::Updated { book },
                    until: 0,
                },
            ],
        }
    }

    #[test]
    fn a_snapshot_comes_back_as_it_went_in() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes).unwrap(), s);
        let json = serde_json::to_vec(&s).unwrap();
        assert!(
            bytes.len() * 2 < json.len(),
            "binary {} bytes, JSON {}",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x20;
            assert!(decode(&damaged).is_err(), "flip at {i} was accepted");
            assert!(
                decode(&bytes[..i]).is_err(),
                "truncation at {i} was accepted"
            );
        }
    }

    #[test]
    fn hostile_bytes_with_a_valid_digest_are_refused_without_panicking() {
        // Well-formed digest over nonsense: lengths and tags are checked.
        for body in [
            &b"PYGSNAP1\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"[..],
            &b"PYGSNAP1\x00\x01\x01\x01\x01\xff\xff\xff\xff\x0f"[..],
            &b"PYGSNAP1\x00\x00\x07"[..],
            &b"PYGSNAP1\x00\x00\x00\x00"[..],
        ] {
            let mut bytes = body.to_vec();
            bytes.extend_from_slice(&Sha256::digest(body));
            assert!(decode(&bytes).is_err(), "{body:?} was accepted");
        }
    }
}
