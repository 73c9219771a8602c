//! The storefront (`/`) and the operator view (`/ops`), served by the
//! frontend. Their HTML, CSS and JavaScript are compiled into the binary and
//! served with an `ETag` and `Cache-Control` (no build step, no CDN).
//!
//! The operator view's data comes from an observer task: every
//! [`POLL_EVERY`] it asks each catalog replica for its `/internal/status`
//! and every other node for its health, with the cluster token, and turns
//! the changes it sees into fault events (detection, election, new view,
//! sync, takeover). Buys per second, lookup latency and the cache hit rate
//! are counted here, per second, for the last [`SERIES_LEN`] seconds.
//!
//! Without the token anyone may load the pages and the topic list; the live
//! picture (`/ops/state`) and the one admin action (`/ops/restock`) need
//! `Authorization: Bearer <token>`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use crate::api::*;
use crate::client::Http;
use crate::config::{ClusterConfig, Role};
use crate::http::{ApiError, JsonBody, Segment};

/// How often the observer polls every node.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// Seconds of traffic kept (five minutes).
pub const SERIES_LEN: usize = 300;
/// Fault events kept.
pub const EVENTS_LEN: usize = 200;
/// Timeout of one status or health poll.
const POLL_TIMEOUT: Duration = Duration::from_millis(600);

// ---------------------------------------------------------------- assets

struct Asset {
    body: Vec<u8>,
    content_type: &'static str,
    etag: String,
    cache_control: &'static str,
}

/// FNV-1a, 64 bits: enough to tell one build's asset from another's.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const STATIC: [(&str, &str, &str); 4] = [
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("web/style.css"),
    ),
    (
        "store.js",
        "text/javascript; charset=utf-8",
        include_str!("web/store.js"),
    ),
    (
        "ops.js",
        "text/javascript; charset=utf-8",
        include_str!("web/ops.js"),
    ),
    ("icon.svg", "image/svg+xml", include_str!("web/icon.svg")),
];

/// Static assets are named with a version (`?v=`) by the pages, so they may
/// be cached for a year; pages are revalidated on every load (`no-cache`).
static ASSETS: LazyLock<Vec<(&'static str, Asset)>> = LazyLock::new(|| {
    let all: String = STATIC.iter().map(|(_, _, b)| *b).collect();
    let version = format!("{:016x}", fnv(all.as_bytes()));
    let asset = |body: Vec<u8>, content_type, cache_control| Asset {
        etag: format!("\"{:016x}\"", fnv(&body)),
        body,
        content_type,
        cache_control,
    };
    let page = |html: &str| {
        asset(
            html.replace("{{v}}", &version).into_bytes(),
            "text/html; charset=utf-8",
            "no-cache",
        )
    };
    let mut v = vec![
        ("index.html", page(include_str!("web/index.html"))),
        ("ops.html", page(include_str!("web/ops.html"))),
    ];
    for (name, ctype, body) in STATIC {
        v.push((
            name,
            asset(
                body.as_bytes().to_vec(),
                ctype,
                "public, max-age=31536000, immutable",
            ),
        ));
    }
    v
});

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn serve_asset(name: &str, headers: &HeaderMap) -> Response {
    let Some((_, a)) = ASSETS.iter().find(|(n, _)| *n == name) else {
        return ApiError::not_found(format!("no asset {name}")).into_response();
    };
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == a.etag || t.trim() == "*");
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.content_type)], a.body.clone()).into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&a.etag).expect("hex etag"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(a.cache_control),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// Routes anyone may use: the pages, their assets, the topic list.
pub(super) fn public_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move { serve_asset("index.html", &h) }),
        )
        .route(
            "/ops",
            get(|h: HeaderMap| async move { serve_asset("ops.html", &h) }),
        )
        .route(
            "/static/{file}",
            get(|h: HeaderMap, Segment(f): Segment| async move { serve_asset(&f, &h) }),
        )
        .route("/topics", get(topics))
}

/// Routes that need the cluster token: the live picture and restocking.
pub(super) fn token_routes() -> Router<AppState> {
    Router::new()
        .route("/ops/state", get(ops_state))
        .route("/ops/restock", post(restock))
}

/// `GET /topics`: slug → display name. Topics never change while the
/// catalog runs, so the first answer is kept.
#[utoipa::path(
    get,
    path = "/topics",
    tag = "store",
    summary = "Every topic",
    responses(
        (status = 200, description = "Topic slug → display name", body = TopicsResponse),
        (status = 503, description = "No catalog replica could answer in time", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "No answer within the request timeout", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn topics(
    State(fe): State<AppState>,
) -> Result<Json<Arc<TopicsResponse>>, ApiError> {
    let t = fe
        .web
        .topics
        .get_or_try_init(|| async {
            fe.catalog
                .call(|c| async move { c.topics().await })
                .await
                .map(Arc::new)
        })
        .await?;
    Ok(Json(t.clone()))
}

async fn ops_state(State(fe): State<AppState>) -> Json<OpsState> {
    Json(fe.web.snapshot())
}

/// `POST /ops/restock` (token): set a book's stock and/or price at the
/// catalog primary. Retried with one request id, so it applies once.
async fn restock(
    State(fe): State<AppState>,
    JsonBody(mut u): JsonBody<UpdateRequest>,
) -> Result<Json<WriteResult>, ApiError> {
    if u.stock.is_none() && u.cost.is_none() {
        return Err(ApiError::bad_request(
            "nothing to update: give stock and/or cost",
        ));
    }
    if u.stock.is_some_and(|s| s > MAX_STOCK) {
        return Err(ApiError::bad_request(format!(
            "stock must be at most {MAX_STOCK}"
        )));
    }
    if u.request_id.is_none() {
        u.request_id = Some(RequestId::mint_as("u", crate::api::unix_ms()));
    }
    let res = fe
        .catalog
        .call(|c| {
            let u = u.clone();
            async move { c.update(&u).await }
        })
        .await?;
    fe.cache.note_write(u.id, res.version);
    Ok(Json(res))
}

// ---------------------------------------------------------------- traffic

/// Counters of the current second, swapped out once a second.
#[derive(Default)]
struct Meter {
    buys: AtomicU64,
    failed_buys: AtomicU64,
    lookups: AtomicU64,
    lookup_us_sum: AtomicU64,
    lookup_us_max: AtomicU64,
}

/// Counts a buy's answer for the operator view: answered, or failed with
/// a 5xx (no replica could complete it in time). The handler calls it,
/// rather than a layer on every public route, so nothing else pays for it.
pub(super) fn count_buy(fe: &super::Frontend, status: StatusCode) {
    let m = &fe.web.meter;
    if status.is_success() {
        m.buys.fetch_add(1, Ordering::Relaxed);
    } else if status.is_server_error() {
        m.failed_buys.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts an answered lookup and how long the handler took.
pub(super) fn count_lookup(fe: &super::Frontend, took: std::time::Duration) {
    let m = &fe.web.meter;
    let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    m.lookups.fetch_add(1, Ordering::Relaxed);
    m.lookup_us_sum.fetch_add(us, Ordering::Relaxed);
    m.lookup_us_max.fetch_max(us, Ordering::Relaxed);
}

/// One second of traffic.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at_ms: u64,
    pub buys: u64,
    /// Buys answered 5xx (no replica could complete them in time).
    pub failed_buys: u64,
    pub lookups: u64,
    pub lookup_ms_avg: Option<f64>,
    pub lookup_ms_max: Option<f64>,
    /// Hits / (hits + misses) of the frontend cache in that second.
    pub cache_hit_rate: Option<f64>,
}

// ---------------------------------------------------------------- nodes and events

/// One node as the observer last saw it. Fields other than `reachable`
/// keep their last known values while a node does not answer.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// `frontend`, `order`, or the catalog replica's role.
    pub role: String,
    pub process_id: u64,
    pub reachable: bool,
    /// Whether the observer has heard from it at least once.
    pub seen: bool,
    pub error: Option<String>,
    pub epoch: Option<u64>,
    pub primary: Option<String>,
    pub applied: Option<Version>,
    pub commit: Option<Version>,
    pub in_view: Option<bool>,
    pub view: Vec<String>,
    /// Entries the primary has committed that this replica has not applied.
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub at_ms: u64,
    /// `detection`, `election`, `new view`, `sync`, `takeover`, `recovery`, `start`.
    pub kind: &'static str,
    pub node: String,
    pub text: String,
}

/// `GET /ops/state`.
#[derive(Debug, Clone, Serialize)]
pub struct OpsState {
    pub at_ms: u64,
    pub poll_ms: u64,
    /// The serving primary: reachable, role primary, highest epoch.
    pub primary: Option<String>,
    pub epoch: Option<u64>,
    pub nodes: Vec<NodeView>,
    pub series: Vec<Sample>,
    pub events: Vec<Event>,
}

struct Target {
    name: String,
    role: Role,
    process_id: u64,
    url: String,
}

#[derive(Default)]
struct Live {
    nodes: Vec<NodeView>,
    events: VecDeque<Event>,
    series: VecDeque<Sample>,
    last_primary: Option<String>,
}

/// The web pages' state, held by the frontend.
pub struct Web {
    /// This frontend's name (observed from inside).
    me: String,
    targets: Vec<Target>,
    http: Http,
    topics: tokio::sync::OnceCell<Arc<TopicsResponse>>,
    meter: Meter,
    live: Mutex<Live>,
}

impl Web {
    pub fn new(cfg: &ClusterConfig, me: &str) -> Self {
        let targets: Vec<Target> = cfg
            .nodes
            .iter()
            .map(|n| Target {
                name: n.name.clone(),
                role: n.role,
                process_id: n.process_id,
                url: n.base_url(),
            })
            .collect();
        let nodes = targets
            .iter()
            .map(|t| NodeView {
                name: t.name.clone(),
                role: role_name(t.role).into(),
                process_id: t.process_id,
                ..Default::default()
            })
            .collect();
        Self {
            me: me.to_string(),
            targets,
            http: Http::new(Some(cfg.token.clone()), POLL_TIMEOUT),
            topics: tokio::sync::OnceCell::new(),
            meter: Meter::default(),
            live: Mutex::new(Live {
                nodes,
                ..Default::default()
            }),
        }
    }

    fn snapshot(&self) -> OpsState {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let primary = serving_primary(&live.nodes);
        OpsState {
            at_ms: now_ms(),
            poll_ms: POLL_EVERY.as_millis() as u64,
            epoch: primary.and_then(|p| p.epoch),
            primary: primary.map(|p| p.name.clone()),
            nodes: live.nodes.clone(),
            series: live.series.iter().cloned().collect(),
            events: live.events.iter().cloned().collect(),
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Frontend => "frontend",
        Role::Order => "order",
        Role::Catalog => "catalog",
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn serving_primary(nodes: &[NodeView]) -> Option<&NodeView> {
    nodes
        .iter()
        .filter(|n| n.reachable && n.role == "primary")
        .max_by_key(|n| n.epoch)
}

/// Fills in every catalog replica's lag behind the serving primary.
fn fill_lag(nodes: &mut [NodeView]) {
    let commit = serving_primary(nodes).and_then(|p| p.commit);
    for n in nodes.iter_mut().filter(|n| n.applied.is_some()) {
        n.lag = match (commit, n.applied, n.reachable) {
            (Some(c), Some(a), true) => Some(c.seq.saturating_sub(a.seq)),
            _ => None,
        };
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "nobody".into()
    } else {
        v.join(", ")
    }
}

fn ver(v: Option<Version>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

/// The fault events that explain how `prev` became `next` (same nodes, same
/// order); `last_primary` is the last serving primary seen before `next`.
pub fn derive_events(
    prev: &[NodeView],
    next: &[NodeView],
    last_primary: Option<&str>,
    at_ms: u64,
) -> Vec<Event> {
    let mut out = Vec::new();
    let mut ev = |kind, node: &str, text: String| {
        out.push(Event {
            at_ms,
            kind,
            node: node.to_string(),
            text,
        })
    };
    if prev.iter().all(|n| !n.seen) && next.iter().any(|n| n.seen) {
        let p = serving_primary(next);
        let text = match p {
            Some(p) => format!(
                "observing {} nodes; primary {} (epoch {}), view {}",
                next.len(),
                p.name,
                p.epoch.unwrap_or(0),
                list(&p.view)
            ),
            None => format!("observing {} nodes; no primary yet", next.len()),
        };
        ev("start", "frontend", text);
        return out;
    }
    for (p, n) in prev.iter().zip(next) {
        if p.reachable && !n.reachable {
            let why = n.error.clone().unwrap_or_default();
            ev(
                "detection",
                &n.name,
                format!("{} stopped answering ({why})", n.name),
            );
            continue;
        }
        if !n.reachable {
            continue;
        }
        if p.seen && !p.reachable {
            ev(
                "recovery",
                &n.name,
                format!("{} answers again, as {}", n.name, n.role),
            );
        }
        if n.applied.is_none() {
            continue; // not a catalog replica
        }
        if n.role == "candidate" && p.role != "candidate" {
            ev(
                "election",
                &n.name,
                format!(
                    "{} started an election (epoch {})",
                    n.name,
                    n.epoch.unwrap_or(0)
                ),
            );
        }
        if n.role != "primary" && n.primary.is_none() && p.primary.is_some() && p.reachable {
            let was = p.primary.clone().unwrap_or_default();
            ev(
                "detection",
                &n.name,
                format!("{} lost contact with its primary {was}", n.name),
            );
        }
        let new_primary = n.role == "primary" && (p.role != "primary" || p.epoch != n.epoch);
        if new_primary {
            let epoch = n.epoch.unwrap_or(0);
            match last_primary.filter(|o| *o != n.name) {
                Some(o) if next.iter().any(|x| x.name == o && x.reachable) => ev(
                    "takeover",
                    &n.name,
                    format!("{} took primaryship over from {o} (epoch {epoch})", n.name),
                ),
                _ => ev(
                    "election",
                    &n.name,
                    format!("{} won the election: primary for epoch {epoch}", n.name),
                ),
            }
        }
        if n.role == "primary" && (new_primary || n.view != p.view) {
            ev(
                "new view",
                &n.name,
                format!(
                    "new view of {} (epoch {}): {}",
                    n.name,
                    n.epoch.unwrap_or(0),
                    list(&n.view)
                ),
            );
        }
        if n.role == "backup"
            && n.in_view == Some(true)
            && (p.in_view != Some(true) || !p.reachable)
        {
            let with = n.primary.clone().unwrap_or_else(|| "?".into());
            ev(
                "sync",
                &n.name,
                format!(
                    "{} in sync with {with}: applied {} → {}",
                    n.name,
                    ver(p.applied),
                    ver(n.applied)
                ),
            );
        }
    }
    out
}

/// Starts the observer; it stops when the frontend is dropped.
pub(super) fn spawn_observer(fe: Weak<super::Frontend>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sample = Instant::now();
        let mut last_cache = (0u64, 0u64);
        loop {
            tick.tick().await;
            let Some(fe) = fe.upgrade() else { return };
            let mut next = poll_all(&fe).await;
            fill_lag(&mut next);
            let now = now_ms();
            let sample = (last_sample.elapsed() >= Duration::from_secs(1)).then(|| {
                last_sample = Instant::now();
                let s = fe.cache.stats();
                let (hits, misses) = (
                    s.hits.saturating_sub(last_cache.0),
                    s.misses.saturating_sub(last_cache.1),
                );
                last_cache = (s.hits, s.misses);
                take_sample(&fe.web.meter, now, hits, misses)
            });
            let mut live = fe.web.live.lock().unwrap_or_else(|p| p.into_inner());
            let last = live.last_primary.clone();
            for e in derive_events(&live.nodes, &next, last.as_deref(), now) {
                tracing::info!(kind = e.kind, "observed: {}", e.text);
                live.events.push_back(e);
            }
            while live.events.len() > EVENTS_LEN {
                live.events.pop_front();
            }
            if let Some(p) = serving_primary(&next) {
                live.last_primary = Some(p.name.clone());
            }
            live.nodes = next;
            if let Some(s) = sample {
                live.series.push_back(s);
                while live.series.len() > SERIES_LEN {
                    live.series.pop_front();
                }
            }
        }
    });
}

fn take_sample(m: &Meter, at_ms: u64, hits: u64, misses: u64) -> Sample {
    let lookups = m.lookups.swap(0, Ordering::Relaxed);
    let sum = m.lookup_us_sum.swap(0, Ordering::Relaxed);
    let max = m.lookup_us_max.swap(0, Ordering::Relaxed);
    Sample {
        at_ms,
        buys: m.buys.swap(0, Ordering::Relaxed),
        failed_buys: m.failed_buys.swap(0, Ordering::Relaxed),
        lookups,
        lookup_ms_avg: (lookups > 0).then(|| sum as f64 / lookups as f64 / 1000.0),
        lookup_ms_max: (lookups > 0).then(|| max as f64 / 1000.0),
        cache_hit_rate: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
    }
}

/// Asks every node at once; a node that does not answer keeps its last
/// known fields, marked unreachable.
async fn poll_all(fe: &super::Frontend) -> Vec<NodeView> {
    let web = &fe.web;
    let prev = web
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .nodes
        .clone();
    let mut set = tokio::task::JoinSet::new();
    for (i, t) in web.targets.iter().enumerate() {
        let (http, url, role) = (web.http.clone(), t.url.clone(), t.role);
        set.spawn(async move {
            let res: Result<Option<NodeStatus>, String> = match role {
                Role::Catalog => http
                    .get::<NodeStatus>(format!("{url}/internal/status"))
                    .await
                    .map(Some),
                _ => http
                    .get::<Health>(format!("{url}/healthcheck"))
                    .await
                    .map(|_| None),
            }
            .map_err(|e| short_error(&e));
            (i, res)
        });
    }
    let mut next = prev;
    while let Some(joined) = set.join_next().await {
        let Ok((i, res)) = joined else { continue };
        let n = &mut next[i];
        match res {
            Ok(status) => {
                n.reachable = true;
                n.seen = true;
                n.error = None;
                if let Some(s) = status {
                    n.role = s.role.to_string();
                    n.epoch = Some(s.epoch);
                    n.primary = s.primary;
                    n.applied = Some(s.applied);
                    n.commit = Some(s.commit);
                    n.in_view = Some(s.in_view);
                    n.view = s.view;
                }
            }
            Err(e) => {
                n.reachable = false;
                n.error = Some(e);
            }
        }
    }
    if let Some(me) = web.targets.iter().position(|t| t.name == web.me) {
        let s = fe.cache.stats();
        let n = &mut next[me];
        n.reachable = true;
        n.seen = true;
        n.error = None;
        n.epoch = s.epoch;
        n.in_view = Some(s.lease_valid);
    }
    next
}

fn short_error(e: &crate::client::ClientError) -> String {
    use crate::client::ClientError as E;
    match e {
        E::Unreachable { detail, .. } if detail.contains("refused") => "connection refused".into(),
        E::Unreachable { detail, .. }
            if detail.contains("timed out") || detail.contains("timeout") =>
        {
            "no answer in time".into()
        }
        E::Unreachable { .. } => "unreachable".into(),
        E::Status { status, .. } => format!("answered {status}"),
        E::Decode { .. } => "unreadable answer".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat(
        name: &str,
        role: &str,
        epoch: u64,
        primary: Option<&str>,
        view: &[&str],
        in_view: bool,
    ) -> NodeView {
        NodeView {
            name: name.into(),
            role: role.into(),
            reachable: true,
            seen: true,
            epoch: Some(epoch),
            primary: primary.map(Into::into),
            applied: Some(Version { epoch, seq: 5 }),
            commit: Some(Version { epoch, seq: 5 }),
            in_view: Some(in_view),
            view: view.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn kinds(ev: &[Event]) -> Vec<(&str, &str)> {
        ev.iter().map(|e| (e.kind, e.node.as_str())).collect()
    }

    #[test]
    fn a_killed_primary_is_detected_then_replaced_by_election_and_a_new_view() {
        let before = vec![
            cat("catalog-1", "backup", 1, Some("catalog-3"), &[], true),
            cat("catalog-2", "backup", 1, Some("catalog-3"), &[], true),
            cat(
                "catalog-3",
                "primary",
                1,
                Some("catalog-3"),
                &["catalog-3", "catalog-2", "catalog-1"],
                true,
            ),
        ];
        let mut down = before.clone();
        down[2].reachable = false;
        down[1].primary = None;
        down[1].in_view = Some(false);
        assert_eq!(
            kinds(&derive_events(&before, &down, Some("catalog-3"), 1)),
            [("detection", "catalog-2"), ("detection", "catalog-3")]
        );
        let mut elected = down.clone();
        elected[1] = cat(
            "catalog-2",
            "primary",
            2,
            Some("catalog-2"),
            &["catalog-2", "catalog-1"],
            true,
        );
        elected[0] = cat("catalog-1", "backup", 2, Some("catalog-2"), &[], true);
        let ev = derive_events(&down, &elected, Some("catalog-3"), 2);
        assert_eq!(
            kinds(&ev),
            [("election", "catalog-2"), ("new view", "catalog-2")]
        );
        assert!(
            ev[1].text.ends_with("catalog-2, catalog-1"),
            "{}",
            ev[1].text
        );
    }

    #[test]
    fn a_recovered_higher_replica_syncs_then_takes_over() {
        let mut before = vec![
            cat(
                "catalog-2",
                "primary",
                2,
                Some("catalog-2"),
                &["catalog-2"],
                true,
            ),
            cat(
                "catalog-3",
                "primary",
                1,
                Some("catalog-3"),
                &["catalog-3"],
                true,
            ),
        ];
        before[1].reachable = false;
        let mut back = before.clone();
        back[1] = cat("catalog-3", "backup", 2, Some("catalog-2"), &[], true);
        back[0].view = vec!["catalog-2".into(), "catalog-3".into()];
        assert_eq!(
            kinds(&derive_events(&before, &back, Some("catalog-2"), 1)),
            [
                ("new view", "catalog-2"),
                ("recovery", "catalog-3"),
                ("sync", "catalog-3")
            ]
        );
        let mut taken = back.clone();
        taken[1] = cat(
            "catalog-3",
            "primary",
            3,
            Some("catalog-3"),
            &["catalog-3", "catalog-2"],
            true,
        );
        taken[0] = cat("catalog-2", "backup", 3, Some("catalog-3"), &[], true);
        assert_eq!(
            kinds(&derive_events(&back, &taken, Some("catalog-2"), 2)),
            [("takeover", "catalog-3"), ("new view", "catalog-3")]
        );
    }

    #[test]
    fn steady_state_makes_no_events() {
        let a = vec![cat("catalog-1", "backup", 1, Some("catalog-3"), &[], true)];
        assert!(derive_events(&a, &a, Some("catalog-3"), 1).is_empty());
    }

    #[test]
    fn fnv_tells_contents_apart() {
        assert_ne!(fnv(b"a"), fnv(b"b"));
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
    }
}
