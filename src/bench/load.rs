//! The load generator: plain HTTP/1.1 over hyper, one task per connection,
//! latencies in HDR histograms (microseconds).
//!
//! Three shapes:
//! * **sequential** — one request at a time, each on a new connection (what
//!   the original's client scripts did);
//! * **closed loop** — `n` keep-alive connections, each sending its next
//!   request when the last is answered;
//! * **open loop** — requests due at a fixed rate whatever the answers do;
//!   each latency is counted from when the request was *due*, so a stall
//!   shows in the tail instead of silently lowering the send rate
//!   (coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One request's answer wait at most this long; then it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request the generator sends: method, path, and a JSON body if any (no
/// headers beyond `Host`, and `Content-Type` with a body).
#[derive(Debug, Clone)]
pub struct Req {
    pub method: hyper::Method,
    pub path: String,
    pub json: Option<Bytes>,
}

impl Req {
    pub fn get(path: impl Into<String>) -> Self {
        Self {
            method: hyper::Method::GET,
            path: path.into(),
            json: None,
        }
    }
    pub fn post(path: impl Into<String>) -> Self {
        Self {
            method: hyper::Method::POST,
            path: path.into(),
            json: None,
        }
    }
    /// A POST with a JSON body.
    pub fn post_json(path: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            json: Some(body.into()),
            ..Self::post(path)
        }
    }
}

/// What to send: the `i`-th request of a run (lets runs cycle over books).
pub type Pick = Arc<dyn Fn(u64) -> Req + Send + Sync>;

/// An empty latency histogram: 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// One keep-alive connection.
struct Conn {
    send: SendRequest<Full<Bytes>>,
}

async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { send })
}

/// The outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Ok,
    /// Answered with another status.
    Status(u16),
    /// No answer: refused, reset, timed out.
    Failed,
}

impl Conn {
    /// Sends `req`, reads the whole answer. The connection is unusable
    /// afterwards unless the outcome is an answer.
    async fn send(&mut self, addr: SocketAddr, req: &Req) -> Outcome {
        let mut builder = hyper::Request::builder()
            .method(req.method.clone())
            .uri(&req.path)
            .header(hyper::header::HOST, addr.to_string());
        if req.json.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let body = Full::new(req.json.clone().unwrap_or_default());
        let request = match builder.body(body) {
            Ok(r) => r,
            Err(_) => return Outcome::Failed,
        };
        let answer = async {
            self.send.ready().await.map_err(|_| ())?;
            let resp = self.send.send_request(request).await.map_err(|_| ())?;
            let status = resp.status();
            resp.into_body().collect().await.map_err(|_| ())?;
            Ok::<_, ()>(status)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
            Ok(Ok(s)) if s.is_success() => Outcome::Ok,
            Ok(Ok(s)) => Outcome::Status(s.as_u16()),
            _ => Outcome::Failed,
        }
    }
}

/// A connection that reconnects when the server closed it (the per
/// connection request limit, an idle timeout, a restart).
struct Client {
    addr: SocketAddr,
    conn: Option<Conn>,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    async fn send(&mut self, req: &Req) -> Outcome {
        // A connection the server closed after its last answer is replaced
        // before sending: that close is not a failed request.
        if self.conn.as_ref().is_some_and(|c| c.send.is_closed()) {
            self.conn = None;
        }
        let conn = match &mut self.conn {
            Some(c) => c,
            None => match connect(self.addr).await {
                Ok(c) => self.conn.insert(c),
                Err(_) => return Outcome::Failed,
            },
        };
        let out = conn.send(self.addr, req).await;
        if out == Outcome::Failed {
            self.conn = None;
        }
        out
    }
}

/// One keep-alive connection, one request at a time, each timed.
pub struct Timed(Client);

impl Timed {
    pub fn new(addr: SocketAddr) -> Self {
        Self(Client::new(addr))
    }

    /// Sends `req`: its latency in µs, and whether it was answered 2xx.
    pub async fn once(&mut self, req: &Req) -> (u64, bool) {
        let sent = Instant::now();
        let out = self.0.send(req).await;
        (
            (sent.elapsed().as_micros() as u64).max(1),
            out == Outcome::Ok,
        )
    }
}

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub requests: u64,
    /// Answers other than 2xx.
    pub non_2xx: u64,
    /// Requests without an answer.
    pub failed: u64,
    pub seconds: f64,
    /// Answered requests (any status) per second.
    pub per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Open loop only: the rate asked for, and the latency from actually
    /// sending (the rest of the latency is waiting for a free connection or
    /// a late timer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p99_us: Option<u64>,
}

impl Stats {
    fn new(h: &Histogram<u64>, non_2xx: u64, failed: u64, seconds: f64) -> Self {
        let requests = h.len();
        Self {
            requests,
            non_2xx,
            failed,
            seconds,
            per_second: (requests - failed.min(requests)) as f64 / seconds.max(1e-9),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
            offered_per_second: None,
            service_p50_us: None,
            service_p99_us: None,
        }
    }

    /// Figures of latencies recorded one at a time; `failed` of them had
    /// no 2xx answer.
    pub fn of_histogram(h: &Histogram<u64>, failed: u64) -> Self {
        let seconds = h.mean() * h.len() as f64 / 1e6;
        Self::new(h, 0, failed, seconds)
    }

    pub fn errors(&self) -> u64 {
        self.non_2xx + self.failed
    }
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    service: Option<Histogram<u64>>,
    non_2xx: u64,
    failed: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: Some(histogram()),
            service: Some(histogram()),
            ..Self::default()
        }
    }
    fn record(&mut self, latency: Duration, service: Duration, out: Outcome) {
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        if let Some(h) = &mut self.hist {
            h.saturating_record(us(latency));
        }
        if let Some(h) = &mut self.service {
            h.saturating_record(us(service));
        }
        match out {
            Outcome::Ok => {}
            Outcome::Status(_) => self.non_2xx += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
    fn merge(&mut self, other: Tally) {
        if let (Some(a), Some(b)) = (&mut self.hist, other.hist) {
            let _ = a.add(b);
        }
        if let (Some(a), Some(b)) = (&mut self.service, other.service) {
            let _ = a.add(b);
        }
        self.non_2xx += other.non_2xx;
        self.failed += other.failed;
    }
}

/// Untimed requests first, so connections are open and caches warm.
const WARMUP: Duration = Duration::from_millis(200);

/// `conns` keep-alive connections, each sending back to back for `length`.
/// A request counts when it is sent inside the window. A connection whose
/// warm-up request outlasts the whole window (a stall under load) sends
/// one more, so every connection counts at least one; the window then
/// stretches to that send.
pub async fn closed(addr: SocketAddr, pick: Pick, conns: usize, length: Duration) -> Stats {
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + WARMUP;
    let end = start + length;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let pick = pick.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut client = Client::new(addr);
                let mut tally = Tally::new();
                let mut last_sent = end;
                loop {
                    let req = pick(counter.fetch_add(1, Ordering::Relaxed));
                    let sent = Instant::now();
                    let counted = tally.hist.as_ref().is_some_and(|h| !h.is_empty());
                    if sent >= end && counted {
                        break;
                    }
                    let out = client.send(&req).await;
                    if sent >= start {
                        let took = sent.elapsed();
                        tally.record(took, took, out);
                        last_sent = last_sent.max(sent);
                    }
                }
                (tally, last_sent)
            })
        })
        .collect();
    let mut all = Tally::new();
    let mut last_sent = end;
    for t in tasks {
        if let Ok((t, sent)) = t.await {
            all.merge(t);
            last_sent = last_sent.max(sent);
        }
    }
    stats_of(all, (last_sent - start).as_secs_f64())
}

/// One request at a time, each on a new connection, for `length`.
pub async fn sequential(addr: SocketAddr, pick: Pick, length: Duration) -> Stats {
    let end = Instant::now() + length;
    let mut tally = Tally::new();
    let mut i = 0;
    let started = Instant::now();
    while Instant::now() < end {
        let req = pick(i);
        i += 1;
        let sent = Instant::now();
        let out = Client::new(addr).send(&req).await;
        let took = sent.elapsed();
        tally.record(took, took, out);
    }
    let seconds = started.elapsed().as_secs_f64();
    stats_of(tally, seconds)
}

/// Requests due at `rate` per second for `length`, sent over up to `conns`
/// connections; each latency counts from when its request was due.
pub async fn open(
    addr: SocketAddr,
    pick: Pick,
    rate: f64,
    conns: usize,
    length: Duration,
) -> Stats {
    let rate = rate.max(1.0);
    let counter = Arc::new(AtomicU64::new(0));
    // Warm the connections up (untimed) before the schedule starts.
    let start = Instant::now() + WARMUP;
    let total = (rate * length.as_secs_f64()).ceil() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let pick = pick.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut client = Client::new(addr);
                let _ = client.send(&pick(0)).await;
                let mut tally = Tally::new();
                loop {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let due = start + interval.mul_f64(i as f64);
                    tokio::time::sleep_until(due).await;
                    let req = pick(i);
                    let sent = Instant::now();
                    let out = client.send(&req).await;
                    tally.record(due.elapsed(), sent.elapsed(), out);
                }
                tally
            })
        })
        .collect();
    let mut stats = finish(tasks, length).await;
    stats.offered_per_second = Some(rate);
    stats
}

async fn finish(tasks: Vec<tokio::task::JoinHandle<Tally>>, length: Duration) -> Stats {
    let mut all = Tally::new();
    for t in tasks {
        if let Ok(t) = t.await {
            all.merge(t);
        }
    }
    stats_of(all, length.as_secs_f64())
}

fn stats_of(t: Tally, seconds: f64) -> Stats {
    let hist = t.hist.unwrap_or_else(histogram);
    let mut s = Stats::new(&hist, t.non_2xx, t.failed, seconds);
    if let Some(svc) = &t.service
        && svc != &hist
    {
        s.service_p50_us = Some(svc.value_at_quantile(0.5));
        s.service_p99_us = Some(svc.value_at_quantile(0.99));
    }
    s
}

/// A timeline sample: when a request was due (since the run's start), how
/// long it took, and whether it succeeded.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub at_ms: f64,
    pub latency_ms: f64,
    pub ok: bool,
    /// When it was answered (since the run's start).
    #[serde(skip)]
    pub done_ms: f64,
    /// The answer's status (0: none).
    #[serde(skip)]
    pub status: u16,
}

/// Open loop at `rate` per second until `stop` is set, keeping every
/// request's [`Sample`] (for plots over time). `t0` is the run's start.
pub async fn timeline(
    addr: SocketAddr,
    pick: Pick,
    rate: f64,
    conns: usize,
    t0: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Sample> {
    let counter = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let pick = pick.clone();
            let counter = counter.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = Client::new(addr);
                let mut samples = Vec::new();
                loop {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let due = t0 + interval.mul_f64(i as f64);
                    tokio::time::sleep_until(due).await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let out = client.send(&pick(i)).await;
                    let done = Instant::now();
                    samples.push(Sample {
                        at_ms: (due - t0).as_secs_f64() * 1e3,
                        latency_ms: (done - due).as_secs_f64() * 1e3,
                        ok: out == Outcome::Ok,
                        done_ms: (done - t0).as_secs_f64() * 1e3,
                        status: match out {
                            Outcome::Ok => 200,
                            Outcome::Status(s) => s,
                            Outcome::Failed => 0,
                        },
                    });
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(s) = t.await {
            all.extend(s);
        }
    }
    all.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_only_answered_requests_as_throughput() {
        let mut t = Tally::new();
        t.record(
            Duration::from_millis(1),
            Duration::from_millis(1),
            Outcome::Ok,
        );
        t.record(
            Duration::from_millis(3),
            Duration::from_millis(3),
            Outcome::Status(503),
        );
        t.record(
            Duration::from_millis(9),
            Duration::from_millis(9),
            Outcome::Failed,
        );
        let s = stats_of(t, 1.0);
        assert_eq!((s.requests, s.non_2xx, s.failed), (3, 1, 1));
        assert_eq!(s.errors(), 2);
        assert!((s.per_second - 2.0).abs() < 1e-9);
        assert!(s.max_us >= 9_000 && s.max_us < 9_100, "{}", s.max_us);
        assert!(s.p50_us >= 3_000 && s.p50_us < 3_010, "{}", s.p50_us);
        // Same latencies from due and from sending: no open-loop split.
        assert_eq!(s.service_p50_us, None);
    }
}
