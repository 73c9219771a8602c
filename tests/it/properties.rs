//! Property tests of every parser at the edge: path segments (book ids,
//! topics), money, request ids, versions, the internal JSON bodies and the
//! cluster file. Each test is named after the rule it checks; each parser
//! must never panic, whatever it is given.
//!
//! A failing case is printed shrunk; pin it as a plain `#[test]` next to the
//! parser. (Failure files are not written, so a run leaves the tree clean.)

use std::collections::BTreeSet;
use std::fmt::Debug;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use pygmy::api::{
    BookId, CatalogOp, CatalogWrite, Invalidation, InvalidationBatch, LeaseRequest, MAX_BOOK_ID,
    MAX_COST_CENTS, MAX_IDEMPOTENCY_KEY_LEN, MAX_REQUEST_ID_LEN, MAX_TOPIC_LEN, Money,
    OrderBuyRequest, RequestId, TopicSlug, UpdateRequest, Version,
};
use pygmy::config::{ClusterConfig, ConfigError};

/// `cases` cases per test, no failure files.
fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

// ------------------------------------------------------------ strategies

/// Strings near the digit space: numbers, signs, spaces, boundaries, junk.
fn numberish() -> impl Strategy<Value = String> {
    let max = i64::MAX as u64;
    prop_oneof![
        any::<String>(),
        "[0-9]{0,22}",
        "[-+ .0-9]{0,22}",
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (max - 3..=max + 3).prop_map(|n| n.to_string()),
        (0u64..4).prop_map(|n| n.to_string()),
        ("0{1,20}", 0u64..1000).prop_map(|(z, n)| format!("{z}{n}")),
        ("[-+ ]?", any::<u64>(), "[ \n]?").prop_map(|(pre, n, post)| format!("{pre}{n}{post}")),
        any::<u128>().prop_map(|n| n.to_string()),
    ]
}

fn book_id() -> impl Strategy<Value = BookId> {
    prop_oneof![1..=MAX_BOOK_ID, 1u64..100, MAX_BOOK_ID - 10..=MAX_BOOK_ID]
        .prop_map(|n| BookId::new(n).expect("in range"))
}

fn money() -> impl Strategy<Value = Money> {
    prop_oneof![
        0..=MAX_COST_CENTS,
        0u64..1000,
        MAX_COST_CENTS - 10..=MAX_COST_CENTS
    ]
    .prop_map(|c| Money::from_cents(c).expect("in range"))
}

fn request_id() -> impl Strategy<Value = RequestId> {
    "[!-~]{1,160}".prop_map(|s| RequestId::parse(&s).expect("printable"))
}

fn version() -> impl Strategy<Value = Version> {
    (any::<u64>(), any::<u64>()).prop_map(|(epoch, seq)| Version { epoch, seq })
}

fn catalog_write() -> impl Strategy<Value = CatalogWrite> {
    let op = prop_oneof![
        book_id().prop_map(|book_id| CatalogOp::Buy { book_id }),
        (
            book_id(),
            any::<Option<u64>>(),
            proptest::option::of(money())
        )
            .prop_map(|(book_id, stock, cost)| CatalogOp::Update {
                book_id,
                stock,
                cost
            }),
    ];
    (request_id(), op).prop_map(|(request_id, op)| CatalogWrite { request_id, op })
}

fn update_request() -> impl Strategy<Value = UpdateRequest> {
    (
        book_id(),
        any::<Option<u64>>(),
        proptest::option::of(money()),
        proptest::option::of(request_id()),
    )
        .prop_map(|(id, stock, cost, request_id)| UpdateRequest {
            id,
            stock,
            cost,
            request_id,
        })
}

fn order_buy_request() -> impl Strategy<Value = OrderBuyRequest> {
    (book_id(), request_id(), any::<bool>()).prop_map(|(book_id, request_id, fresh)| {
        OrderBuyRequest {
            book_id,
            request_id,
            fresh,
        }
    })
}

fn invalidation_batch() -> impl Strategy<Value = InvalidationBatch> {
    let item =
        (book_id(), version(), any::<bool>()).prop_map(|(book_id, version, begin)| Invalidation {
            book_id,
            version,
            begin,
        });
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(item, 0..6),
    )
        .prop_map(|(epoch, seq, items)| InvalidationBatch { epoch, seq, items })
}

fn lease_request() -> impl Strategy<Value = LeaseRequest> {
    any::<String>().prop_map(|frontend| LeaseRequest { frontend })
}

/// Keys of the internal bodies, and a few others.
const BODY_KEYS: &[&str] = &[
    "id",
    "book_id",
    "stock",
    "cost",
    "request_id",
    "op",
    "epoch",
    "seq",
    "items",
    "version",
    "frontend",
    "outcome",
    "",
];

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(BODY_KEYS).prop_map(String::from),
        1 => any::<String>(),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(i64::MAX),
            json!(i64::MAX as u64 + 1),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(MAX_COST_CENTS / 100),
        ]),
        // Non-finite floats become null.
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            0.0,
            -0.0,
            0.1,
            0.001,
            19.99,
            1e7,
            1e7 + 0.01,
            1e300,
            -1.5
        ])
        .prop_map(Value::from),
        prop::sample::select(vec![
            "buy",
            "update",
            "k:abc",
            "r:1",
            "frontend",
            "distributed-systems",
            "",
            " ",
            "a b",
        ])
        .prop_map(Value::from),
        "[ -~]{0,140}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ]
}

/// Arbitrary JSON trees, whose objects mostly use the bodies' keys.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..7)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A value for one body field: mostly of the right type and often valid.
fn field_value(key: &'static str) -> BoxedStrategy<Value> {
    let typical = match key {
        "id" | "book_id" => prop_oneof![
            (1u64..1000).prop_map(Value::from),
            prop::sample::select(vec![
                json!(0),
                json!(MAX_BOOK_ID),
                json!(MAX_BOOK_ID + 1),
                json!(1.0),
                json!("1")
            ]),
        ]
        .boxed(),
        "stock" => prop_oneof![
            any::<u64>().prop_map(Value::from),
            Just(Value::Null),
            Just(json!(-1))
        ]
        .boxed(),
        "cost" => prop_oneof![
            (0..=MAX_COST_CENTS).prop_map(|c| json!(c as f64 / 100.0)),
            prop::sample::select(vec![
                json!(0.001),
                json!(-1.0),
                json!(1e7 + 1.0),
                json!(5),
                Value::Null
            ]),
        ]
        .boxed(),
        "request_id" => prop_oneof![
            "[!-~]{1,20}".prop_map(Value::from),
            Just(json!("")),
            Just(json!("a b"))
        ]
        .boxed(),
        "op" => prop::sample::select(vec!["buy", "update", "Buy", "sell"])
            .prop_map(Value::from)
            .boxed(),
        "epoch" | "seq" => any::<u64>().prop_map(Value::from).boxed(),
        "items" => {
            let item = (1u64..1000, any::<u64>(), any::<u64>())
                .prop_map(|(b, e, q)| json!({"book_id": b, "version": {"epoch": e, "seq": q}}));
            prop::collection::vec(prop_oneof![4 => item, 1 => json_value()], 0..4)
                .prop_map(Value::Array)
                .boxed()
        }
        "frontend" => any::<String>().prop_map(Value::from).boxed(),
        _ => json_leaf().boxed(),
    };
    prop_oneof![5 => typical, 1 => json_value()].boxed()
}

/// The fields of each body (and all of them at once).
const BODY_SHAPES: &[&[&str]] = &[
    &["request_id", "op", "book_id"],
    &["request_id", "op", "book_id", "stock", "cost"],
    &["id", "stock", "cost", "request_id"],
    &["book_id", "stock", "cost", "request_id"],
    &["book_id", "request_id"],
    &["epoch", "seq", "items"],
    &["frontend"],
    BODY_KEYS,
];

/// Objects shaped like one of the bodies: each field present with
/// probability 0.9, sometimes an extra key.
fn body_shaped() -> impl Strategy<Value = Value> {
    prop::sample::select(BODY_SHAPES).prop_flat_map(|keys| {
        let fields: Vec<_> = keys
            .iter()
            .map(|&k| {
                proptest::option::weighted(
                    0.9,
                    field_value(k).prop_map(move |v| (k.to_string(), v)),
                )
            })
            .collect();
        let extra = proptest::option::weighted(0.2, (json_key(), json_value()));
        (fields, extra).prop_map(|(fields, extra)| {
            Value::Object(fields.into_iter().flatten().chain(extra).collect())
        })
    })
}

/// Top-level objects (the only thing a body may be): body-shaped or arbitrary.
fn json_object() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => body_shaped(),
        1 => prop::collection::vec((json_key(), json_value()), 0..7)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
    ]
}

/// One edit of a text: delete, insert or replace a character.
#[derive(Debug, Clone)]
enum Edit {
    Delete(Index),
    Insert(Index, char),
    Replace(Index, char),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let c = prop_oneof![
        prop::sample::select(
            "{}[]\":,.-+0123456789eE\\ \n\tnulltruefalse=#'"
                .chars()
                .collect::<Vec<_>>()
        ),
        any::<char>(),
    ];
    let edit = prop_oneof![
        any::<Index>().prop_map(Edit::Delete),
        (any::<Index>(), c.clone()).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<Index>(), c).prop_map(|(i, c)| Edit::Replace(i, c)),
    ];
    prop::collection::vec(edit, 1..5)
}

fn apply_edits(text: &str, edits: &[Edit]) -> String {
    let mut cs: Vec<char> = text.chars().collect();
    for e in edits {
        match e {
            Edit::Delete(i) if !cs.is_empty() => {
                cs.remove(i.index(cs.len()));
            }
            Edit::Insert(i, c) => cs.insert(i.index(cs.len() + 1), *c),
            Edit::Replace(i, c) if !cs.is_empty() => {
                let at = i.index(cs.len());
                cs[at] = *c;
            }
            _ => {}
        }
    }
    cs.into_iter().collect()
}

/// Text for the JSON decoders: junk, deep nesting, and valid bodies with a
/// few characters edited.
fn json_text() -> impl Strategy<Value = String> {
    let valid = prop_oneof![
        catalog_write().prop_map(|b| serde_json::to_string(&b).unwrap()),
        update_request().prop_map(|b| serde_json::to_string(&b).unwrap()),
        order_buy_request().prop_map(|b| serde_json::to_string(&b).unwrap()),
        invalidation_batch().prop_map(|b| serde_json::to_string(&b).unwrap()),
        lease_request().prop_map(|b| serde_json::to_string(&b).unwrap()),
    ];
    prop_oneof![
        any::<String>(),
        "[{}\\[\\]\":,0-9a-z_ .-]{0,64}",
        (
            1usize..3000,
            prop::sample::select(vec!["[", "{\"op\":", "{\"items\":["])
        )
            .prop_map(|(n, open)| open.repeat(n)),
        (valid, edits()).prop_map(|(text, e)| apply_edits(&text, &e)),
    ]
}

// ------------------------------------------------------------ book ids

/// The documented rule: ASCII digits only (no sign, space or `+`), at most
/// 20 of them, and the value in 1..=i64::MAX.
fn book_id_rule(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: u128 = s.parse().ok()?;
    (1..=MAX_BOOK_ID as u128).contains(&v).then_some(v as u64)
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn book_id_parse_accepts_exactly_unsigned_decimals_from_1_to_i64_max(s in numberish()) {
        let got = BookId::parse(&s).ok().map(BookId::get);
        prop_assert_eq!(got, book_id_rule(&s), "{:?}", s);
    }

    #[test]
    fn book_id_parse_round_trips_every_id(n in 1..=MAX_BOOK_ID) {
        let id = BookId::parse(&n.to_string()).map_err(fail)?;
        prop_assert_eq!(id.get(), n);
        prop_assert_eq!(id.to_string(), n.to_string());
    }

    #[test]
    fn book_id_parse_refuses_signs_and_spaces(n in 1..=MAX_BOOK_ID, pre in "[-+ \t]{1,2}", post in "[ \t\n]{0,2}") {
        let signed = format!("{pre}{n}{post}");
        prop_assert!(BookId::parse(&signed).is_err(), "accepted {:?}", signed);
        if !post.is_empty() {
            let padded = format!("{n}{post}");
            prop_assert!(BookId::parse(&padded).is_err(), "accepted {:?}", padded);
        }
    }

    #[test]
    fn book_id_serde_refuses_zero_and_above_i64_max(
        n in prop_oneof![any::<u64>(), 0u64..3, MAX_BOOK_ID - 2..=MAX_BOOK_ID + 2, u64::MAX - 2..=u64::MAX],
    ) {
        let got = serde_json::from_str::<BookId>(&n.to_string());
        prop_assert_eq!(got.is_ok(), (1..=MAX_BOOK_ID).contains(&n), "{}", n);
        if let Ok(id) = got {
            prop_assert_eq!(serde_json::to_string(&id).map_err(fail)?, n.to_string());
        }
    }

    #[test]
    fn book_id_serde_refuses_negatives_and_fractions(n in i64::MIN..0, f in any::<f64>()) {
        prop_assert!(serde_json::from_str::<BookId>(&n.to_string()).is_err());
        if f.fract() != 0.0 && f.is_finite() {
            prop_assert!(serde_json::from_str::<BookId>(&format!("{f:?}")).is_err(), "{:?}", f);
        }
    }
}

// ------------------------------------------------------------ topics

/// Lower-case ASCII alphanumeric words joined by single `-`, 1..=128 bytes.
fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOPIC_LEN
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
}

fn topicish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9-]{0,16}",
        "[a-zA-Z0-9 _/.-]{0,24}",
        "[a-z0-9]{1,10}(-[a-z0-9]{1,10}){0,5}",
        // Around the length limit.
        "[a-z]{1,70}(-[a-z]{1,70}){0,2}",
    ]
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn topic_parse_accepts_exactly_lower_case_words_joined_by_single_dashes(s in topicish()) {
        match TopicSlug::parse(&s) {
            Ok(t) => {
                prop_assert!(is_slug(&s), "accepted {:?}", s);
                prop_assert_eq!(t.as_str(), s.as_str());
            }
            Err(_) => prop_assert!(!is_slug(&s), "refused {:?}", s),
        }
    }

    #[test]
    fn topic_of_name_gives_a_slug_that_parse_accepts_or_an_error(name in topicish()) {
        let alnum: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match TopicSlug::of_name(&name) {
            Ok(t) => {
                let again = TopicSlug::parse(t.as_str());
                prop_assert_eq!(again.as_ref(), Ok(&t));
                // Keeps every letter and digit, in order, and nothing else.
                prop_assert_eq!(t.as_str().replace('-', ""), alnum);
            }
            // Only a name without letters or digits, or longer than a slug may be, is refused.
            Err(_) => prop_assert!(alnum.is_empty() || name.len() > MAX_TOPIC_LEN, "refused {:?}", name),
        }
    }

    #[test]
    fn topic_of_name_is_idempotent_and_ignores_ascii_case(name in topicish()) {
        if let Ok(t) = TopicSlug::of_name(&name) {
            let again = TopicSlug::of_name(t.as_str());
            prop_assert_eq!(again.as_ref(), Ok(&t));
        }
        prop_assert_eq!(TopicSlug::of_name(&name.to_ascii_uppercase()), TopicSlug::of_name(&name));
    }

    #[test]
    fn topic_of_name_is_the_identity_on_slugs(s in "[a-z0-9]{1,10}(-[a-z0-9]{1,10}){0,5}") {
        let t = TopicSlug::of_name(&s).map_err(fail)?;
        prop_assert_eq!(t.as_str(), s.as_str());
    }
}

// ------------------------------------------------------------ money

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn money_accepts_only_finite_non_negative_amounts_up_to_the_maximum(v in any::<f64>()) {
        let max = (MAX_COST_CENTS / 100) as f64;
        match Money::try_from(v) {
            Ok(m) => {
                prop_assert!(v.is_finite() && v >= 0.0 && v <= max, "accepted {:?}", v);
                prop_assert!(m.cents() <= MAX_COST_CENTS);
                prop_assert!((f64::from(m) - v).abs() < 0.005, "{:?} became {:?}", v, m);
            }
            Err(_) => {
                let cents = v * 100.0;
                let whole_cents = (cents - cents.round()).abs() <= 1e-6;
                prop_assert!(!(v.is_finite() && v >= 0.0 && v <= max && whole_cents), "refused {:?}", v);
            }
        }
    }

    #[test]
    fn money_round_trips_every_amount_in_cents(c in 0..=MAX_COST_CENTS) {
        let m = Money::from_cents(c).map_err(fail)?;
        prop_assert_eq!(Money::try_from(f64::from(m)).map_err(fail)?, m);
        let text = serde_json::to_string(&m).map_err(fail)?;
        prop_assert_eq!(serde_json::from_str::<Money>(&text).map_err(fail)?, m, "{}", text);
    }

    #[test]
    fn money_refuses_negatives_nan_infinities_too_large_and_sub_cent_amounts(
        neg in prop_oneof![-1e12f64..-1e-9, -2.0f64..-1e-9],
        neg_cents in prop_oneof![1..=MAX_COST_CENTS, 1u64..200],
        big in prop_oneof![(MAX_COST_CENTS / 100) as f64 + 0.01..1e300, Just(f64::MAX)],
        c in 0..MAX_COST_CENTS / 1000,
        mills in 1u64..10,
    ) {
        prop_assert!(Money::try_from(neg).is_err());
        let whole = -(neg_cents as f64) / 100.0;
        prop_assert!(Money::try_from(whole).is_err(), "accepted {:?}", whole);
        prop_assert!(Money::try_from(big).is_err());
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            prop_assert!(Money::try_from(v).is_err());
        }
        prop_assert!(Money::from_cents(MAX_COST_CENTS + 1 + c).is_err());
        // A tenth of a cent too many.
        let v = (c * 10 + mills) as f64 / 1000.0;
        prop_assert!(Money::try_from(v).is_err(), "accepted {:?}", v);
    }

    #[test]
    fn money_json_decoding_never_panics(s in prop_oneof![
        numberish(),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        Just("1e400".to_string()),
        Just("-0".to_string()),
    ]) {
        if let Ok(m) = serde_json::from_str::<Money>(&s) {
            prop_assert!(m.cents() <= MAX_COST_CENTS, "{:?}", s);
        }
    }
}

// ------------------------------------------------------------ request ids

/// Printable ASCII without spaces, 1..=`max` bytes.
fn is_token(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

fn is_request_id(s: &str) -> bool {
    is_token(s, MAX_REQUEST_ID_LEN)
}

fn request_idish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,20}",
        "[!-~]{120,132}",
        "[!-~]{155,165}",
        "[!-~\t\n\u{7f}\u{e9}]{1,20}",
    ]
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn request_id_parse_accepts_exactly_1_to_160_printable_ascii_without_spaces(s in request_idish()) {
        match RequestId::parse(&s) {
            Ok(id) => {
                prop_assert!(is_request_id(&s), "accepted {:?}", s);
                prop_assert_eq!(id.as_str(), s.as_str());
            }
            Err(_) => prop_assert!(!is_request_id(&s), "refused {:?}", s),
        }
    }

    #[test]
    fn idempotency_keys_of_1_to_128_printable_ascii_give_distinct_valid_request_ids(a in request_idish(), b in request_idish()) {
        for key in [&a, &b] {
            match RequestId::from_idempotency_key(key) {
                Ok(id) => {
                    prop_assert!(is_token(key, MAX_IDEMPOTENCY_KEY_LEN), "accepted key {:?}", key);
                    prop_assert!(is_request_id(id.as_str()), "gave {:?}", id);
                    prop_assert_eq!(id.as_str(), format!("k:{key}"));
                }
                // Every key of 1..=128 printable characters is accepted, prefix and all.
                Err(_) => prop_assert!(!is_token(key, MAX_IDEMPOTENCY_KEY_LEN), "refused key {:?}", key),
            }
        }
        if let (Ok(x), Ok(y)) = (RequestId::from_idempotency_key(&a), RequestId::from_idempotency_key(&b)) {
            prop_assert_eq!(x == y, a == b);
        }
    }

    #[test]
    fn request_id_serde_uses_the_same_rule(s in request_idish()) {
        let text = serde_json::to_string(&s).map_err(fail)?;
        let got = serde_json::from_str::<RequestId>(&text);
        prop_assert_eq!(got.is_ok(), is_request_id(&s));
    }
}

// ------------------------------------------------------------ versions

fn versionish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9.]{0,12}",
        "[-+ 0-9.]{0,12}",
        (numberish(), numberish()).prop_map(|(a, b)| format!("{a}.{b}")),
        version().prop_map(|v| v.to_string()),
    ]
}

/// The canonical decimal of a u64 (no leading zeros, sign or space).
fn canonical_u64(s: &str) -> Option<u64> {
    s.parse::<u64>().ok().filter(|n| n.to_string() == s)
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn version_parse_accepts_epoch_dot_seq_in_digits_only(s in versionish()) {
        match s.parse::<Version>() {
            Ok(v) => {
                let (e, q) = s.split_once('.').expect("accepted without a dot");
                let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
                prop_assert!(digits(e) && digits(q), "accepted {:?}", s);
                prop_assert_eq!(e.parse::<u64>().ok(), Some(v.epoch));
                prop_assert_eq!(q.parse::<u64>().ok(), Some(v.seq));
            }
            Err(_) => {
                let canonical = s
                    .split_once('.')
                    .is_some_and(|(e, q)| canonical_u64(e).is_some() && canonical_u64(q).is_some());
                prop_assert!(!canonical, "refused {:?}", s);
            }
        }
    }

    #[test]
    fn version_display_and_from_str_round_trip(v in version()) {
        prop_assert_eq!(v.to_string().parse::<Version>().map_err(fail)?, v);
        let json = serde_json::to_string(&v).map_err(fail)?;
        prop_assert_eq!(serde_json::from_str::<Version>(&json).map_err(fail)?, v);
    }

    #[test]
    fn versions_order_by_epoch_then_seq(a in version(), b in version(), small in (0u64..3, 0u64..3)) {
        prop_assert_eq!(a.cmp(&b), (a.epoch, a.seq).cmp(&(b.epoch, b.seq)));
        // Small values, so equal epochs are common.
        let c = Version { epoch: small.0, seq: small.1 };
        let d = Version { epoch: small.1, seq: small.0 };
        prop_assert_eq!(c.cmp(&d), (c.epoch, c.seq).cmp(&(d.epoch, d.seq)));
    }
}

// ------------------------------------------------------------ JSON bodies

/// Decodes `text` as `T`; when it decodes, the value must survive
/// `to_string`/`from_str` unchanged.
fn decode<T>(text: &str) -> Result<Option<T>, TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    match serde_json::from_str::<T>(text) {
        Ok(t) => {
            let again = serde_json::to_string(&t).map_err(fail)?;
            let back: T = serde_json::from_str(&again)
                .map_err(|e| fail(format!("{again} does not decode: {e}")))?;
            prop_assert_eq!(&back, &t);
            Ok(Some(t))
        }
        Err(_) => Ok(None),
    }
}

/// Decodes `text` as every body type; checks what a decoded body says about `text`.
fn decode_all(text: &str) -> Result<(), TestCaseError> {
    let keys = || -> BTreeSet<String> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => BTreeSet::new(),
        }
    };
    let subset = |allowed: &[&str]| keys().iter().all(|k| allowed.contains(&k.as_str()));
    if decode::<UpdateRequest>(text)?.is_some() {
        prop_assert!(
            subset(&["id", "book_id", "stock", "cost", "request_id"]),
            "{}",
            text
        );
    }
    if decode::<OrderBuyRequest>(text)?.is_some() {
        prop_assert!(subset(&["book_id", "request_id", "fresh"]), "{}", text);
    }
    if decode::<LeaseRequest>(text)?.is_some() {
        prop_assert!(subset(&["frontend"]), "{}", text);
    }
    if let Some(w) = decode::<CatalogWrite>(text)? {
        let v: Value = serde_json::from_str(text).map_err(fail)?;
        let op = match w.op {
            CatalogOp::Buy { .. } => "buy",
            CatalogOp::Update { .. } => "update",
        };
        prop_assert_eq!(v.get("op").and_then(Value::as_str), Some(op));
        prop_assert_eq!(
            v.get("request_id").and_then(Value::as_str),
            Some(w.request_id.as_str())
        );
    }
    decode::<InvalidationBatch>(text)?;
    Ok(())
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn json_bodies_never_panic_on_arbitrary_text(text in json_text()) {
        decode_all(&text)?;
        decode_all(text.trim_start_matches(['[', '{']))?;
    }

    #[test]
    fn json_bodies_never_panic_on_arbitrary_json_values(v in prop_oneof![json_object(), json_value()]) {
        decode_all(&v.to_string())?;
        decode_all(&serde_json::to_string_pretty(&v).map_err(fail)?)?;
    }

    #[test]
    fn json_bodies_decoded_from_values_match_those_decoded_from_text(v in json_object()) {
        let text = v.to_string();
        macro_rules! same {
            ($t:ty) => {
                let from_value = serde_json::from_value::<$t>(v.clone()).ok();
                let from_text = serde_json::from_str::<$t>(&text).ok();
                prop_assert_eq!(from_value, from_text, "{}", text);
            };
        }
        same!(UpdateRequest);
        same!(OrderBuyRequest);
        same!(CatalogWrite);
        same!(InvalidationBatch);
        same!(LeaseRequest);
    }
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn valid_bodies_round_trip_through_json(
        w in catalog_write(),
        u in update_request(),
        o in order_buy_request(),
        b in invalidation_batch(),
        l in lease_request(),
    ) {
        prop_assert_eq!(decode::<CatalogWrite>(&serde_json::to_string(&w).map_err(fail)?)?, Some(w));
        prop_assert_eq!(decode::<UpdateRequest>(&serde_json::to_string(&u).map_err(fail)?)?, Some(u));
        prop_assert_eq!(decode::<OrderBuyRequest>(&serde_json::to_string(&o).map_err(fail)?)?, Some(o));
        prop_assert_eq!(decode::<InvalidationBatch>(&serde_json::to_string(&b).map_err(fail)?)?, Some(b));
        prop_assert_eq!(decode::<LeaseRequest>(&serde_json::to_string(&l).map_err(fail)?)?, Some(l));
    }

    #[test]
    fn update_request_takes_id_or_book_id(id in book_id(), stock in any::<Option<u64>>()) {
        let a: UpdateRequest = serde_json::from_value(json!({"id": id, "stock": stock})).map_err(fail)?;
        let b: UpdateRequest = serde_json::from_value(json!({"book_id": id, "stock": stock})).map_err(fail)?;
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.id, id);
        let both = serde_json::from_value::<UpdateRequest>(json!({"id": id, "book_id": id}));
        prop_assert!(both.is_err(), "{:?}", both);
    }
}

// ------------------------------------------------------------ cluster config

/// `cfg` written with `toml::to_string_pretty` parses back equal.
fn round_trips(cfg: &ClusterConfig) -> Result<(), TestCaseError> {
    let text = toml::to_string_pretty(cfg).map_err(fail)?;
    let mut back = ClusterConfig::parse(&text).map_err(|e| fail(format!("{e}\n{text}")))?;
    back.base_dir = cfg.base_dir.clone();
    prop_assert_eq!(&back, cfg, "{}", text);
    Ok(())
}

/// Parses `text`; a parsed config validates without panicking and round-trips.
/// Returns whether it parsed.
fn parse_config(text: &str) -> Result<bool, TestCaseError> {
    match ClusterConfig::parse(text) {
        Ok(cfg) => {
            let _ = cfg.validate();
            round_trips(&cfg)?;
            Ok(true)
        }
        Err(e) => {
            prop_assert!(matches!(e, ConfigError::Parse { .. }), "{:?}", e);
            Ok(false)
        }
    }
}

const CONFIG_KEYS: &[&str] = &[
    "cluster_id",
    "token",
    "catalog_file",
    "name",
    "role",
    "process_id",
    "addr",
    "listen",
    "data_dir",
    "call_timeout_ms",
    "retry_budget_ms",
    "health_interval_ms",
    "cache_lease_ms",
    "heartbeat_ms",
    "lease_ms",
    "election_timeout_ms",
    "max_body_bytes",
    "request_timeout_ms",
    "head_timeout_ms",
    "max_in_flight",
    "cache_entries",
    "takeover_after_ms",
    "node",
    "timing",
    "limits",
];

fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "5004",
            "65535",
            "65536",
            "18446744073709551615",
            "9223372036854775807",
            "true",
            "false",
            "inf",
            "nan",
            "-0.0",
            "1.5",
            "1e3",
            "0x10",
            "0o7",
            "0b1",
            "1_000",
            "1979-05-27T07:32:00Z",
            "1979-05-27",
            "07:32:00",
            "\"catalog\"",
            "\"order\"",
            "\"frontend\"",
            "\"127.0.0.1:5001\"",
            "\"0.0.0.0:0\"",
            "\"[::1]:1\"",
            "\"catalog-1\"",
            "\"\"",
            "\"\\u0000\"",
            "\"\\uD800\"",
            "'''a\nb'''",
            "\"\"\"\n\"\"\"",
        ])
        .prop_map(String::from),
        "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
        "[ -&(-~]{0,24}".prop_map(|s| format!("'{s}'")),
        "[ -~]{0,12}",
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(CONFIG_KEYS), inner), 0..4).prop_map(
                |kv| {
                    let kv: Vec<String> =
                        kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{ {} }}", kv.join(", "))
                }
            ),
        ]
    })
}

/// Small numbers and short strings: values a cluster file might really hold.
fn plausible_toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![0u64, 1, 2, 5, 9, 10, 50, 499, 500, 501, 65535, 65536])
            .prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "",
            "x",
            "short",
            "catalog-1",
            "order-1",
            "frontend",
            "a b",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "host:port",
            "[::1]:5004",
            "0.0.0.0:5001",
            "catalog",
            "order",
        ])
        .prop_map(|s| format!("{s:?}")),
    ]
}

fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => prop::sample::select(vec![
            "[timing]", "[limits]", "[[node]]", "[node]", "[[timing]]", "[x]", "[[node.x]]",
            "[timing.x]", "", "#", "[", "]]",
        ])
        .prop_map(String::from),
        4 => (prop::sample::select(CONFIG_KEYS), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => ("[a-z_.\"]{1,12}", toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => any::<String>(),
    ]
}

/// A local cluster with a fixed identity, so cases are reproducible.
fn fixed_local(host: &str, catalogs: u64) -> ClusterConfig {
    let mut cfg = ClusterConfig::local(host, catalogs);
    cfg.cluster_id = "0123456789abcdef0123456789abcdef".into();
    cfg.token = "fedcba9876543210fedcba9876543210".into();
    cfg
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "127.0.0.1",
            "localhost",
            "[::1]",
            "0.0.0.0",
            "catalog.svc"
        ])
        .prop_map(String::from),
        "[a-z][a-z0-9-]{0,15}(\\.[a-z][a-z0-9-]{0,15}){0,3}",
        any::<[u8; 4]>().prop_map(|b| format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])),
    ]
}

/// A change that makes a valid cluster invalid, and a word of the reason.
#[derive(Debug, Clone)]
enum Breakage {
    DuplicateName(Index, Index),
    PortOutOfRange(Index, u64),
    PortMissing(Index),
    ListenOutOfRange(Index, u64),
    ZeroProcessId(Index),
    ShortToken(String),
}

fn breakage() -> impl Strategy<Value = Breakage> {
    prop_oneof![
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Breakage::DuplicateName(a, b)),
        (
            any::<Index>(),
            prop_oneof![65536u64..100_000, 65536..=u64::MAX]
        )
            .prop_map(|(i, p)| Breakage::PortOutOfRange(i, p)),
        any::<Index>().prop_map(Breakage::PortMissing),
        (any::<Index>(), 65536u64..1_000_000).prop_map(|(i, p)| Breakage::ListenOutOfRange(i, p)),
        any::<Index>().prop_map(Breakage::ZeroProcessId),
        "[!-~]{0,15}".prop_map(Breakage::ShortToken),
    ]
}

/// Applies `b`; returns a word the error must contain.
fn break_cluster(cfg: &mut ClusterConfig, host: &str, b: &Breakage) -> &'static str {
    let n = cfg.nodes.len();
    match b {
        Breakage::DuplicateName(a, c) => {
            let from = a.index(n);
            let to = (from + 1 + c.index(n - 1)) % n;
            cfg.nodes[to].name = cfg.nodes[from].name.clone();
            "twice"
        }
        Breakage::PortOutOfRange(i, p) => {
            cfg.nodes[i.index(n)].addr = format!("{host}:{p}");
            "addr"
        }
        Breakage::PortMissing(i) => {
            cfg.nodes[i.index(n)].addr = host.replace(':', "");
            "addr"
        }
        Breakage::ListenOutOfRange(i, p) => {
            cfg.nodes[i.index(n)].listen = Some(format!("127.0.0.1:{p}"));
            "listen"
        }
        Breakage::ZeroProcessId(i) => {
            cfg.nodes[i.index(n)].process_id = 0;
            "process_id"
        }
        Breakage::ShortToken(t) => {
            cfg.token = t.clone();
            "token"
        }
    }
}

/// One change to a line of a valid cluster file.
#[derive(Debug, Clone)]
enum LineEdit {
    Drop(Index),
    /// A value of a plausible type, so the file often still parses.
    SetPlausible(Index, String),
    Duplicate(Index),
    SetValue(Index, String),
    Insert(Index, String),
    Swap(Index, Index),
}

fn line_edits() -> impl Strategy<Value = Vec<LineEdit>> {
    let edit = prop_oneof![
        1 => any::<Index>().prop_map(LineEdit::Drop),
        1 => any::<Index>().prop_map(LineEdit::Duplicate),
        4 => (any::<Index>(), toml_value()).prop_map(|(i, v)| LineEdit::SetValue(i, v)),
        4 => (any::<Index>(), plausible_toml_value()).prop_map(|(i, v)| LineEdit::SetPlausible(i, v)),
        2 => (any::<Index>(), toml_line()).prop_map(|(i, l)| LineEdit::Insert(i, l)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| LineEdit::Swap(a, b)),
    ];
    prop::collection::vec(edit, 0..4)
}

fn apply_line_edits(text: &str, edits: &[LineEdit]) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for e in edits {
        let n = lines.len();
        match e {
            LineEdit::Drop(i) if n > 0 => {
                lines.remove(i.index(n));
            }
            LineEdit::Duplicate(i) if n > 0 => {
                let at = i.index(n);
                lines.insert(at, lines[at].clone());
            }
            LineEdit::SetValue(i, v) | LineEdit::SetPlausible(i, v) if n > 0 => {
                let at = i.index(n);
                if let Some((k, _)) = lines[at].split_once(" = ") {
                    lines[at] = format!("{k} = {v}");
                }
            }
            LineEdit::Insert(i, l) => lines.insert(i.index(n + 1), l.clone()),
            LineEdit::Swap(a, b) if n > 0 => lines.swap(a.index(n), b.index(n)),
            _ => {}
        }
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn config_parse_never_panics_on_arbitrary_text(text in prop_oneof![any::<String>(), "[ -~\n]{0,200}"]) {
        parse_config(&text)?;
    }

    #[test]
    fn config_parse_never_panics_on_toml_like_documents(lines in prop::collection::vec(toml_line(), 0..16)) {
        parse_config(&lines.join("\n"))?;
    }

    #[test]
    fn config_parse_never_panics_on_edited_cluster_files(catalogs in 1u64..=5, edits in line_edits()) {
        let text = toml::to_string_pretty(&fixed_local("127.0.0.1", catalogs)).map_err(fail)?;
        let edited = apply_line_edits(&text, &edits);
        let parsed = parse_config(&edited)?;
        if edits.is_empty() {
            prop_assert!(parsed, "the unedited file must parse:\n{}", edited);
        }
    }
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn local_clusters_validate_and_round_trip_through_toml(host in host(), catalogs in 1u64..=5) {
        let cfg = ClusterConfig::local(&host, catalogs);
        cfg.validate().map_err(fail)?;
        prop_assert_eq!(cfg.nodes.len() as u64, 4 + catalogs);
        round_trips(&cfg)?;
    }

    #[test]
    fn validate_refuses_duplicate_names_bad_ports_zero_ids_and_short_tokens(
        host in host(),
        catalogs in 1u64..=5,
        b in breakage(),
    ) {
        let mut cfg = fixed_local(&host, catalogs);
        let reason = break_cluster(&mut cfg, &host, &b);
        match cfg.validate() {
            Err(ConfigError::Invalid(m)) => prop_assert!(m.contains(reason), "{:?} refused for {:?}", b, m),
            other => prop_assert!(false, "{:?} gave {:?}", b, other),
        }
        // Refused clusters still round-trip: the file format is not the validator.
        round_trips(&cfg)?;
    }
}
