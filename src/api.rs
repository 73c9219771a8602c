//! Wire types shared by the services, the typed clients, the CLI and the tests.
//!
//! Values that come from outside (ids, topics, money, request ids) are parsed
//! once, at the edge, into types whose constructors validate: a handler only
//! ever sees valid values, and bad input is a 4xx before anything changes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest book id accepted. Ids are positive and fit SQLite's signed integer.
pub const MAX_BOOK_ID: u64 = i64::MAX as u64;
/// Largest stock a book may hold.
pub const MAX_STOCK: u64 = 1_000_000_000;
/// Largest price, in cents (ten million of currency units).
pub const MAX_COST_CENTS: u64 = 1_000_000_000;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Longest request id (a key plus a short prefix).
pub const MAX_REQUEST_ID_LEN: usize = 160;
/// Longest accepted topic slug.
pub const MAX_TOPIC_LEN: usize = 128;

/// Why a value from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// A book id: a positive integer no larger than [`MAX_BOOK_ID`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct BookId(u64);

impl BookId {
    pub fn new(id: u64) -> Result<Self, ParseError> {
        if id == 0 || id > MAX_BOOK_ID {
            return Err(ParseError(format!(
                "book id must be a positive integer no larger than {MAX_BOOK_ID}"
            )));
        }
        Ok(Self(id))
    }

    /// Parses a path segment: digits only (no sign, no spaces, no leading `+`).
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError(format!(
                "book id must be a positive integer, got {:?}",
                truncate(s, 40)
            )));
        }
        let n: u64 = s
            .parse()
            .map_err(|_| ParseError("book id is too large".to_string()))?;
        Self::new(n)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for BookId {
    type Error = ParseError;
    fn try_from(v: u64) -> Result<Self, ParseError> {
        Self::new(v)
    }
}

impl From<BookId> for u64 {
    fn from(v: BookId) -> u64 {
        v.0
    }
}

impl fmt::Display for BookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A topic slug: lower case ASCII letters and digits, words joined by `-`.
/// `distributed-systems` is the slug of "distributed systems".
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TopicSlug(String);

impl TopicSlug {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TOPIC_LEN
            && s.split('-').all(|w| {
                !w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if !ok {
            return Err(ParseError(format!(
                "topic must be lower-case words joined by '-', like distributed-systems; got {:?}",
                truncate(s, 40)
            )));
        }
        Ok(Self(s.to_string()))
    }

    /// The slug of a topic's display name: "Distributed  Systems" → `distributed-systems`.
    /// Characters other than ASCII letters and digits separate words.
    pub fn of_name(name: &str) -> Result<Self, ParseError> {
        let words: Vec<String> = name
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| w.to_ascii_lowercase())
            .collect();
        Self::parse(&words.join("-"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TopicSlug {
    type Error = ParseError;
    fn try_from(v: String) -> Result<Self, ParseError> {
        Self::parse(&v)
    }
}

impl From<TopicSlug> for String {
    fn from(v: TopicSlug) -> String {
        v.0
    }
}

impl fmt::Display for TopicSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An amount of money, held in cents; on the wire a JSON number (`1000.0`),
/// as the original answered. At most two decimals, never negative.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(try_from = "f64", into = "f64")]
pub struct Money(u64);

impl Money {
    pub fn from_cents(cents: u64) -> Result<Self, ParseError> {
        if cents > MAX_COST_CENTS {
            return Err(ParseError(format!(
                "cost must be at most {}",
                MAX_COST_CENTS / 100
            )));
        }
        Ok(Self(cents))
    }

    pub fn cents(self) -> u64 {
        self.0
    }
}

impl TryFrom<f64> for Money {
    type Error = ParseError;
    fn try_from(v: f64) -> Result<Self, ParseError> {
        if !v.is_finite() || v < 0.0 || v > (MAX_COST_CENTS / 100) as f64 {
            return Err(ParseError(format!(
                "cost must be a number between 0 and {}",
                MAX_COST_CENTS / 100
            )));
        }
        let cents = (v * 100.0).round();
        if (v * 100.0 - cents).abs() > 1e-6 {
            return Err(ParseError("cost may have at most two decimals".to_string()));
        }
        Self::from_cents(cents as u64)
    }
}

impl From<Money> for f64 {
    fn from(v: Money) -> f64 {
        v.0 as f64 / 100.0
    }
}

/// A request id: the identity of one client write, applied at most once.
/// Printable ASCII without spaces, 1..=[`MAX_REQUEST_ID_LEN`] bytes.
/// Ids from clients' keys start `k:`, minted ones `r:`, admin ones `u:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > MAX_REQUEST_ID_LEN || !s.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ParseError(format!(
                "request id must be 1 to {MAX_REQUEST_ID_LEN} printable ASCII characters without spaces"
            )));
        }
        Ok(Self(s.to_string()))
    }

    /// The request id of a client's `Idempotency-Key`: the same key gives the
    /// same id at every frontend, so a retry survives a frontend restart.
    pub fn from_idempotency_key(key: &str) -> Result<Self, ParseError> {
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ParseError(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters without spaces"
            )));
        }
        Self::parse(&format!("k:{key}"))
    }

    /// A fresh id for a write that came without a key, minted now.
    pub fn mint() -> Self {
        Self::mint_as("r", unix_ms())
    }

    /// A fresh id `<prefix>:<mint time in Unix ms>-<uuid>`. The catalog
    /// keeps the answer of a minted id only for a while after `at` (the
    /// callers' retry budget with a margin, see [`Self::minted_at`]).
    pub fn mint_as(prefix: &str, at: u64) -> Self {
        Self(format!("{prefix}:{at}-{}", uuid::Uuid::new_v4().simple()))
    }

    /// When a minted id (`r:` from a frontend, `u:` from an admin update
    /// without one) was minted; `None` for a client's key and for any id
    /// of another shape.
    pub fn minted_at(&self) -> Option<u64> {
        let rest = self
            .0
            .strip_prefix("r:")
            .or_else(|| self.0.strip_prefix("u:"))?;
        let (at, uuid) = rest.split_once('-')?;
        // Exactly what `mint_as` writes: anything else (a hyphenated uuid
        // after `u:`, say) is an id like a client's key, kept 24 h.
        let digits = |s: &str, n: std::ops::RangeInclusive<usize>, ok: fn(u8) -> bool| {
            n.contains(&s.len()) && s.bytes().all(ok)
        };
        if !digits(at, 1..=19, |b| b.is_ascii_digit())
            || !digits(uuid, 32..=32, |b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        at.parse().ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RequestId {
    type Error = ParseError;
    fn try_from(v: String) -> Result<Self, ParseError> {
        Self::parse(&v)
    }
}

impl From<RequestId> for String {
    fn from(v: RequestId) -> String {
        v.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// This machine's wall clock in Unix milliseconds (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The position of a committed write: the primary's epoch and the log's
/// sequence number. Ordered lexicographically; every read answer and every
/// write answer carries one, so caches and readers can tell old from new.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub struct Version {
    pub epoch: u64,
    pub seq: u64,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.seq)
    }
}

impl std::str::FromStr for Version {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || {
            ParseError(format!(
                "version must look like EPOCH.SEQ, got {:?}",
                truncate(s, 40)
            ))
        };
        let (e, q) = s.split_once('.').ok_or_else(bad)?;
        let digits =
            |x: &str| !x.is_empty() && x.len() <= 20 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(e) || !digits(q) {
            return Err(bad());
        }
        Ok(Version {
            epoch: e.parse().map_err(|_| bad())?,
            seq: q.parse().map_err(|_| bad())?,
        })
    }
}

/// A book as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub id: BookId,
    pub title: String,
    pub topic: String,
    pub cost: Money,
    pub stock: u64,
}

/// `GET /lookup/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LookupResponse {
    #[schema(value_type = u64, minimum = 1)]
    pub id: BookId,
    pub title: String,
    pub topic: String,
    #[schema(value_type = f64, minimum = 0)]
    pub cost: Money,
    pub stock: u64,
    /// The replica state this answer was read from.
    pub version: Version,
}

impl LookupResponse {
    pub fn new(book: &Book, version: Version) -> Self {
        Self {
            id: book.id,
            title: book.title.clone(),
            topic: book.topic.clone(),
            cost: book.cost,
            stock: book.stock,
            version,
        }
    }
}

/// Most books one `POST /internal/lookups` may ask for.
pub const MAX_LOOKUP_BATCH: usize = 256;

/// `POST /internal/lookups` (catalog): several books read from one replica
/// state, at least at `min_version`. The frontend gathers the lookups that
/// miss its cache while an earlier batch is in flight into one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupBatch {
    pub ids: Vec<BookId>,
    #[serde(default)]
    pub min_version: Option<Version>,
}

/// The answer to a [`LookupBatch`]: one entry per id asked for, in order;
/// `None` where no such book exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupBatchReply {
    pub books: Vec<Option<LookupResponse>>,
}

/// `GET /search/{topic}`: title → id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SearchResponse {
    #[schema(value_type = std::collections::BTreeMap<String, u64>)]
    pub items: std::collections::BTreeMap<String, BookId>,
}

/// `GET /topics`: every topic of the catalog, slug → display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopicsResponse {
    pub topics: std::collections::BTreeMap<String, String>,
}

/// `POST /buy/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuyResponse {
    pub message: String,
    pub order_id: u64,
    #[schema(value_type = u64, minimum = 1)]
    pub book_id: BookId,
    pub title: String,
    #[schema(value_type = f64, minimum = 0)]
    pub price: Money,
    /// The commit version of this purchase.
    pub version: Version,
}

/// Every error answer: `{"message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub message: String,
}

/// Every error answer: an RFC 9457 problem details object
/// (`application/problem+json`). `message` repeats `detail` as an extension
/// member, so clients of the original (which read `message`) still work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI reference naming the kind of problem; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's short, fixed summary.
    pub title: String,
    pub status: u16,
    /// What happened, for a person.
    pub detail: String,
    /// Same as `detail` (what the original's clients read).
    pub message: String,
}

/// `GET /healthcheck`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub message: String,
}

// ---------------------------------------------------------------- internal

/// What a catalog write does. Ops enter the catalog's log; every replica
/// applies them in log order, so a buy's stock check and decrement are one
/// step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CatalogOp {
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
}

impl CatalogOp {
    pub fn book_id(&self) -> BookId {
        match self {
            CatalogOp::Buy { book_id } | CatalogOp::Update { book_id, .. } => *book_id,
        }
    }
}

/// A write sent to the catalog primary (by an order replica or an admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CatalogWrite {
    pub request_id: RequestId,
    #[serde(flatten)]
    pub op: CatalogOp,
}

impl<'de> Deserialize<'de> for CatalogWrite {
    /// As derived, except that `op` must be the operation's name: serde's
    /// tagged enums also take a variant's number (`"op": 0` for a buy).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            request_id: RequestId,
            #[serde(flatten)]
            op: CatalogOp,
        }
        let v = serde_json::Value::deserialize(d)?;
        if !v.get("op").is_some_and(serde_json::Value::is_string) {
            return Err(serde::de::Error::custom(
                "`op` must be \"buy\" or \"update\"",
            ));
        }
        let w: Wire = serde_json::from_value(v).map_err(serde::de::Error::custom)?;
        Ok(Self {
            request_id: w.request_id,
            op: w.op,
        })
    }
}

/// The result of applying a write, stored with its request id so a retry
/// gets the first answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Bought {
        book_id: BookId,
        title: String,
        price: Money,
        order_id: u64,
    },
    OutOfStock {
        book_id: BookId,
        title: String,
    },
    Updated {
        book: Book,
    },
}

/// An [`Outcome`]'s tag, as its `outcome` field names it.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutcomeTag {
    Bought,
    OutOfStock,
    Updated,
}

/// Every field an [`Outcome`] may have, read in one pass.
#[derive(Deserialize)]
struct OutcomeFields {
    outcome: OutcomeTag,
    book_id: Option<BookId>,
    title: Option<String>,
    price: Option<Money>,
    order_id: Option<u64>,
    book: Option<Book>,
}

/// The same JSON as the derived, internally tagged form reads (the tag
/// in `outcome`, the variant's fields beside it, others ignored), read
/// straight into the fields: the derived form buffers every field first
/// (serde's `Content`) to find the tag, and outcomes are read for every
/// answer a catalog snapshot holds and every buy's answer on each tier.
impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let f = OutcomeFields::deserialize(d)?;
        fn need<T, E: Error>(v: Option<T>, field: &'static str) -> Result<T, E> {
            v.ok_or_else(|| E::missing_field(field))
        }
        Ok(match f.outcome {
            OutcomeTag::Bought => Outcome::Bought {
                book_id: need(f.book_id, "book_id")?,
                title: need(f.title, "title")?,
                price: need(f.price, "price")?,
                order_id: need(f.order_id, "order_id")?,
            },
            OutcomeTag::OutOfStock => Outcome::OutOfStock {
                book_id: need(f.book_id, "book_id")?,
                title: need(f.title, "title")?,
            },
            OutcomeTag::Updated => Outcome::Updated {
                book: need(f.book, "book")?,
            },
        })
    }
}

/// A catalog replica's state digest at a version (`GET /internal/digests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateDigest {
    pub version: Version,
    /// 16 hex digits.
    pub digest: String,
}

/// The catalog's answer to a write: the outcome and the version it committed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResult {
    pub outcome: Outcome,
    pub version: Version,
}

/// Most writes one `POST /internal/writes` may carry.
pub const MAX_WRITE_BATCH: usize = 128;

/// `POST /internal/writes` (catalog primary): writes an order replica
/// gathered while its earlier batches were in flight, each applied as if
/// sent alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBatch {
    pub writes: Vec<CatalogWrite>,
    /// The id of the request each write came in (for its log lines),
    /// aligned with `writes`; empty when none is known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

/// One write's answer in a [`WriteBatch`]: its result, or the refusal a
/// lone write would have had (status, message, and the primary a replica
/// that is not it names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum WriteOutcome {
    Done(WriteResult),
    Refused {
        status: u16,
        message: String,
        #[serde(default)]
        primary: Option<String>,
    },
}

/// The answer to a [`WriteBatch`] or an [`OrderBuyBatch`]: one outcome per
/// write, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBatchReply {
    pub outcomes: Vec<WriteOutcome>,
}

/// `PUT /catalog/update` body (the original's route): `id` or `book_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    #[serde(alias = "book_id")]
    pub id: BookId,
    #[serde(default)]
    pub stock: Option<u64>,
    #[serde(default)]
    pub cost: Option<Money>,
    #[serde(default)]
    pub request_id: Option<RequestId>,
}

/// Order service internal buy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderBuyRequest {
    pub book_id: BookId,
    pub request_id: RequestId,
    /// The frontend minted `request_id` for this request and this is its
    /// first attempt: no order log can hold it yet, so the replica does not
    /// look it up. Absent (false) on every retry and for client keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
}

/// `POST /internal/buys` (order replica): buys a frontend gathered while
/// its earlier batches were in flight, each handled as if sent alone
/// (at most [`MAX_WRITE_BATCH`]). The answer is a [`WriteBatchReply`]: one
/// outcome per buy, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderBuyBatch {
    pub buys: Vec<OrderBuyRequest>,
    /// The id of the request each buy came in (for its log lines),
    /// aligned with `buys`; empty when none is known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

/// One row of an order replica's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// Position in this replica's log (for paging).
    pub seq: u64,
    pub order_id: Option<u64>,
    pub request_id: RequestId,
    pub book_id: BookId,
    pub title: String,
    pub price: Money,
    /// RFC 3339, UTC.
    pub time: String,
    /// `bought` or `out_of_stock`.
    pub outcome: String,
    pub version: Version,
}

/// `GET /log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLogPage {
    pub orders: Vec<OrderRecord>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    pub next_before: Option<u64>,
}

/// Cache invalidations pushed by the catalog primary to a frontend, in one
/// ordered stream per frontend (`seq` counts batches within `epoch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidationBatch {
    pub epoch: u64,
    pub seq: u64,
    pub items: Vec<Invalidation>,
}

/// `begin`: a write to the book is about to be proposed; serve it from the
/// cache no more until the matching end. Otherwise (an end): that write is
/// over (committed at `version`, or refused); a cached value older than
/// `version` is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    pub book_id: BookId,
    pub version: Version,
    #[serde(default)]
    pub begin: bool,
}

/// A frontend asks the catalog primary for a cache lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub frontend: String,
}

/// The primary grants a cache lease: the frontend may serve cached reads for
/// `lease_ms`, counted from when it *sent* the request. `next_seq` is the seq
/// the next invalidation batch to this frontend will carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub epoch: u64,
    pub next_seq: u64,
    pub lease_ms: u64,
    pub version: Version,
    /// Books with writes begun but not ended in the batches before
    /// `next_seq` (once per write): not to be served from the cache until
    /// their ends arrive.
    #[serde(default)]
    pub pending: Vec<BookId>,
}

/// A catalog replica's role, as its status reports it (lower case on the
/// wire: `"primary"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaRole {
    Primary,
    Backup,
    /// Campaigning (or asking whether it may).
    Candidate,
    /// A new or restored disk catching up: no vote, no part in commits.
    Learner,
    /// Still opening its disk.
    Starting,
    /// A role this version does not know (a newer node's).
    #[serde(other)]
    Unknown,
}

impl ReplicaRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaRole::Primary => "primary",
            ReplicaRole::Backup => "backup",
            ReplicaRole::Candidate => "candidate",
            ReplicaRole::Learner => "learner",
            ReplicaRole::Starting => "starting",
            ReplicaRole::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ReplicaRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `status.role == "primary"` reads as the wire does.
impl PartialEq<&str> for ReplicaRole {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A catalog replica's view of itself, for `pygmy status` and the tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: ReplicaRole,
    pub process_id: u64,
    pub epoch: u64,
    /// The primary this replica follows (itself when primary).
    pub primary: Option<String>,
    /// The last applied entry.
    pub applied: Version,
    /// The last committed entry this replica knows of.
    pub commit: Version,
    /// Primary: the view it keeps; backup: whether it holds a lease (serves reads).
    pub in_view: bool,
    /// The primary's view: itself and the backups in sync (empty on a backup).
    pub view: Vec<String>,
    /// Books in this replica's applied catalog (0 until a new cluster's
    /// founding catalog is applied).
    #[serde(default)]
    pub books: u64,
}

/// A batch of replication messages from one replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationBatch {
    pub from: u64,
    pub messages: Vec<crate::replication::Message>,
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outcomes read back as written, and what the derived, internally
    /// tagged form refused is refused: an unknown tag, a missing tag, a
    /// missing field, a field of the wrong type.
    #[test]
    fn outcomes_read_back_as_written_and_malformed_ones_are_refused() {
        let book = Book {
            id: BookId::new(3).unwrap(),
            title: "A \"quoted\" title".into(),
            topic: "Distributed systems".into(),
            cost: Money::from_cents(1999).unwrap(),
            stock: 7,
        };
        for o in [
            Outcome::Bought {
                book_id: book.id,
                title: book.title.clone(),
                price: book.cost,
                order_id: 42,
            },
            Outcome::OutOfStock {
                book_id: book.id,
                title: book.title.clone(),
            },
            Outcome::Updated { book: book.clone() },
        ] {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), o, "{json}");
        }
        let ok = r#"{"outcome":"out_of_stock","book_id":3,"title":"t","extra":[1,2]}"#;
        assert!(
            serde_json::from_str::<Outcome>(ok).is_ok(),
            "other fields are ignored"
        );
        for bad in [
            r#"{"outcome":"stolen","book_id":3,"title":"t"}"#,
            r#"{"book_id":3,"title":"t"}"#,
            r#"{"outcome":"bought","book_id":3,"title":"t","price":1.5}"#,
            r#"{"outcome":"bought","book_id":0,"title":"t","price":1.5,"order_id":1}"#,
            r#"{"outcome":"updated","book_id":3}"#,
            r#"{"outcome":"out_of_stock","book_id":"3","title":"t"}"#,
            r#"{"outcome":"out_of_stock","book_id":3,"title":null}"#,
            r#"["bought",3]"#,
        ] {
            assert!(
                serde_json::from_str::<Outcome>(bad).is_err(),
                "{bad} was read"
            );
        }
    }

    #[test]
    fn replica_roles_are_lower_case_words_on_the_wire() {
        for (role, word) in [
            (ReplicaRole::Primary, "primary"),
            (ReplicaRole::Backup, "backup"),
            (ReplicaRole::Candidate, "candidate"),
            (ReplicaRole::Learner, "learner"),
            (ReplicaRole::Starting, "starting"),
        ] {
            assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{word}\""));
            assert_eq!(
                serde_json::from_str::<ReplicaRole>(&format!("\"{word}\"")).unwrap(),
                role
            );
            assert!(role == word);
        }
        assert_eq!(
            serde_json::from_str::<ReplicaRole>("\"observer\"").unwrap(),
            ReplicaRole::Unknown
        );
    }

    #[test]
    fn only_ids_shaped_as_minted_carry_a_mint_time() {
        // A minted id's answer is kept only a while after its mint time, so
        // an id merely starting like one (an operator's `u:<uuid>`) must
        // not be read as minted in 1970 and refused as expired.
        assert_eq!(
            RequestId::mint_as("u", 1_700_000_000_000).minted_at(),
            Some(1_700_000_000_000)
        );
        assert_eq!(RequestId::mint_as("r", 7).minted_at(), Some(7));
        for other in [
            "u:31075536-c721-4625-97b8-c47a99e9909c",
            "u:31075536c7214625-97b8c47a99e9909c",
            "r:12-0123456789abcdef0123456789ABCDEF",
            "r:-0123456789abcdef0123456789abcdef",
            "r:1x-0123456789abcdef0123456789abcdef",
            "k:12-0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(
                RequestId::parse(other).unwrap().minted_at(),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn a_catalog_write_names_its_operation() {
        let ok: CatalogWrite =
            serde_json::from_str(r#"{"request_id":"a","op":"buy","book_id":1}"#).unwrap();
        assert_eq!(ok.op.book_id().get(), 1);
        for bad in [
            r#"{"request_id":"a","op":0,"book_id":1}"#,
            r#"{"request_id":"a","op":1,"book_id":1}"#,
            r#"{"request_id":"a","book_id":1}"#,
        ] {
            assert!(serde_json::from_str::<CatalogWrite>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn book_ids_are_positive_integers() {
        assert_eq!(BookId::parse("7").unwrap().get(), 7);
        for bad in [
            "0",
            "-1",
            "+1",
            "abc",
            "",
            " 1",
            "1.0",
            "99999999999999999999",
            "9223372036854775808",
        ] {
            assert!(BookId::parse(bad).is_err(), "{bad}");
        }
        assert!(BookId::parse("9223372036854775807").is_ok());
    }

    #[test]
    fn topic_slugs_are_lower_case_words() {
        assert_eq!(
            TopicSlug::of_name("distributed systems").unwrap().as_str(),
            "distributed-systems"
        );
        assert_eq!(
            TopicSlug::of_name("Graduate  School").unwrap().as_str(),
            "graduate-school"
        );
        for bad in ["", "-a", "a-", "a--b", "A", "a b", "a/b", "..", "é"] {
            assert!(TopicSlug::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn money_has_at_most_two_decimals() {
        assert_eq!(Money::try_from(1000.0).unwrap().cents(), 100_000);
        assert_eq!(Money::try_from(0.1).unwrap().cents(), 10);
        assert!(Money::try_from(0.001).is_err());
        assert!(Money::try_from(-1.0).is_err());
        assert!(Money::try_from(f64::NAN).is_err());
        assert!(Money::try_from(1e300).is_err());
    }

    #[test]
    fn versions_order_by_epoch_then_seq() {
        let a = Version { epoch: 1, seq: 100 };
        let b = Version { epoch: 2, seq: 1 };
        assert!(a < b);
        assert_eq!("2.1".parse::<Version>().unwrap(), b);
        assert!("2".parse::<Version>().is_err());
        assert!("a.1".parse::<Version>().is_err());
    }
}
