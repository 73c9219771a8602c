//! A checker of what clients saw: the history of buys and lookups of one
//! book, each with when it was sent and when its answer came back.
//!
//! The book's stock is a counter that only buys change, by one each. A
//! history is correct when:
//!
//! * **no client-visible error**: every operation got an answer;
//! * **no read anomaly**: a lookup that starts after another one ended never
//!   shows more stock (stock seen never goes back up); a lookup shows every
//!   buy answered before it started (at most `initial − those`); and it shows
//!   no buy that had not even been sent when it answered (at least
//!   `initial − buys sent before its answer`);
//! * **nothing lost, nothing doubled**: every successful buy has its own
//!   order id, and the stock left is exactly the initial stock less the
//!   successful buys.
//!
//! For a counter changed only by unit decrements these conditions are what
//! linearizability asks of each read: some order of the operations,
//! consistent with real time, in which every lookup shows exactly the buys
//! before it.

use std::collections::HashMap;
use std::time::Instant;

/// What a client did and saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A lookup that answered this stock.
    Lookup { stock: u64 },
    /// A buy that succeeded with this order id.
    Bought { order_id: u64 },
    /// A buy answered "out of stock".
    OutOfStock,
    /// No answer, or an error answer (`what` says which).
    Failed { what: String },
}

/// One operation: sent at `start`, answered at `end`.
#[derive(Clone, Debug)]
pub struct Event {
    pub client: usize,
    pub start: Instant,
    pub end: Instant,
    pub op: Op,
}

/// The first violation found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("client-visible error: client {client}: {what}")]
    ClientError { client: usize, what: String },
    #[error(
        "read anomaly: a lookup answered stock {later} after another lookup had already answered {earlier}"
    )]
    StockWentUp { earlier: u64, later: u64 },
    #[error(
        "read anomaly: a lookup answered stock {seen}, but {acked} buys were answered before it started (stock at most {most})"
    )]
    MissedAnsweredBuy { seen: u64, acked: u64, most: u64 },
    #[error(
        "read anomaly: a lookup answered stock {seen}, but only {sent} buys had been sent when it answered (stock at least {least})"
    )]
    ShowedUnsentBuy { seen: u64, sent: u64, least: u64 },
    #[error("doubled: order id {order_id} was answered to two buys")]
    DoubledOrder { order_id: u64 },
    #[error(
        "lost or doubled: {bought} buys succeeded from stock {initial}, but {left} are left (expected {expected})"
    )]
    WrongFinalStock {
        initial: u64,
        bought: u64,
        left: u64,
        expected: i128,
    },
}

/// Checks `events` (in any order) against an `initial` stock and the stock
/// `left` once every operation was answered.
pub fn check(initial: u64, events: &[Event], left: u64) -> Result<(), Violation> {
    if let Some(e) = events.iter().find(|e| matches!(e.op, Op::Failed { .. })) {
        let Op::Failed { what } = &e.op else {
            unreachable!()
        };
        return Err(Violation::ClientError {
            client: e.client,
            what: what.clone(),
        });
    }
    let mut orders = HashMap::new();
    for e in events {
        if let Op::Bought { order_id } = e.op
            && orders.insert(order_id, ()).is_some()
        {
            return Err(Violation::DoubledOrder { order_id });
        }
    }
    let is_buy = |e: &&Event| !matches!(e.op, Op::Lookup { .. });
    // Answer times of successful buys, and send times of every buy, sorted.
    let mut acked: Vec<Instant> = events
        .iter()
        .filter(|e| matches!(e.op, Op::Bought { .. }))
        .map(|e| e.end)
        .collect();
    acked.sort();
    let mut sent: Vec<Instant> = events.iter().filter(is_buy).map(|e| e.start).collect();
    sent.sort();
    let mut lookups: Vec<(&Event, u64)> = events
        .iter()
        .filter_map(|e| match e.op {
            Op::Lookup { stock } => Some((e, stock)),
            _ => None,
        })
        .collect();
    for &(e, seen) in &lookups {
        let before = acked.partition_point(|t| *t < e.start) as u64;
        let most = initial.saturating_sub(before);
        if seen > most {
            return Err(Violation::MissedAnsweredBuy {
                seen,
                acked: before,
                most,
            });
        }
        let could = sent.partition_point(|t| *t <= e.end) as u64;
        let least = initial.saturating_sub(could);
        if seen < least {
            return Err(Violation::ShowedUnsentBuy {
                seen,
                sent: could,
                least,
            });
        }
    }
    // Stock never goes back up: for lookups in start order, compare with the
    // lowest stock among those that ended before this one started.
    lookups.sort_by_key(|(e, _)| e.start);
    let mut by_end: Vec<(Instant, u64)> = lookups.iter().map(|(e, s)| (e.end, *s)).collect();
    by_end.sort();
    let mut i = 0;
    let mut lowest: Option<u64> = None;
    for &(e, seen) in &lookups {
        while i < by_end.len() && by_end[i].0 < e.start {
            lowest = Some(lowest.map_or(by_end[i].1, |l| l.min(by_end[i].1)));
            i += 1;
        }
        if let Some(l) = lowest
            && seen > l
        {
            return Err(Violation::StockWentUp {
                earlier: l,
                later: seen,
            });
        }
    }
    let bought = acked.len() as u64;
    let expected = initial as i128 - bought as i128;
    if left as i128 != expected {
        return Err(Violation::WrongFinalStock {
            initial,
            bought,
            left,
            expected,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Builds events from (client, start ms, end ms, op) on one clock.
    fn history(ops: &[(usize, u64, u64, Op)]) -> Vec<Event> {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        ops.iter()
            .map(|(c, s, e, op)| Event {
                client: *c,
                start: at(*s),
                end: at(*e),
                op: op.clone(),
            })
            .collect()
    }

    fn lookup(stock: u64) -> Op {
        Op::Lookup { stock }
    }

    fn bought(order_id: u64) -> Op {
        Op::Bought { order_id }
    }

    #[test]
    fn a_correct_history_with_concurrent_operations_passes() {
        let h = history(&[
            (0, 0, 10, lookup(10)),
            (1, 5, 30, bought(1)),
            // Concurrent with the buy: either value is fine.
            (2, 6, 12, lookup(10)),
            (3, 8, 20, lookup(9)),
            (0, 31, 40, lookup(9)),
            (1, 32, 50, bought(2)),
            (2, 51, 60, lookup(8)),
        ]);
        assert_eq!(check(10, &h, 8), Ok(()));
    }

    #[test]
    fn stock_that_goes_back_up_is_a_read_anomaly() {
        let h = history(&[
            (1, 0, 50, bought(1)),
            (0, 5, 10, lookup(9)),
            // Starts after the lookup that showed the buy, while the buy is
            // still unanswered: it must show it too.
            (2, 11, 20, lookup(10)),
        ]);
        assert_eq!(
            check(10, &h, 9),
            Err(Violation::StockWentUp {
                earlier: 9,
                later: 10
            })
        );
    }

    #[test]
    fn a_lookup_that_misses_an_answered_buy_is_a_read_anomaly() {
        let h = history(&[(1, 0, 10, bought(1)), (0, 11, 20, lookup(10))]);
        assert_eq!(
            check(10, &h, 9),
            Err(Violation::MissedAnsweredBuy {
                seen: 10,
                acked: 1,
                most: 9
            })
        );
    }

    #[test]
    fn a_lookup_that_shows_a_buy_not_yet_sent_is_a_read_anomaly() {
        let h = history(&[(0, 0, 10, lookup(9)), (1, 11, 20, bought(1))]);
        assert_eq!(
            check(10, &h, 9),
            Err(Violation::ShowedUnsentBuy {
                seen: 9,
                sent: 0,
                least: 10
            })
        );
    }

    #[test]
    fn a_lost_buy_is_found_in_the_stock_left() {
        let h = history(&[(1, 0, 10, bought(1)), (1, 11, 20, bought(2))]);
        assert_eq!(
            check(10, &h, 9),
            Err(Violation::WrongFinalStock {
                initial: 10,
                bought: 2,
                left: 9,
                expected: 8
            })
        );
    }

    #[test]
    fn a_doubled_buy_is_found_in_the_stock_left_and_in_order_ids() {
        let h = history(&[(1, 0, 10, bought(1))]);
        assert!(matches!(
            check(10, &h, 8),
            Err(Violation::WrongFinalStock { .. })
        ));
        let h = history(&[(1, 0, 10, bought(7)), (2, 0, 10, bought(7))]);
        assert_eq!(
            check(10, &h, 8),
            Err(Violation::DoubledOrder { order_id: 7 })
        );
    }

    #[test]
    fn a_client_visible_error_fails_the_history() {
        let h = history(&[(3, 0, 10, Op::Failed { what: "503".into() })]);
        assert_eq!(
            check(10, &h, 10),
            Err(Violation::ClientError {
                client: 3,
                what: "503".into()
            })
        );
    }
}
