//! Server plumbing every service shares: the error type and its JSON answer,
//! the token check of internal routes, body/time/concurrency limits, the
//! health and metrics routes, and `serve` with graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{BoxError, Json, Router};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tower::ServiceBuilder;

use crate::api::{Health, Problem};
use crate::config::Limits;

/// An error answer: a status code and a message for a person, sent as an
/// RFC 9457 problem details object ([`crate::api::Problem`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The problem's `type` URI reference; `about:blank` unless set.
    pub kind: &'static str,
}

/// `type` of a buy refused for lack of stock.
pub const PROBLEM_OUT_OF_STOCK: &str = "/problems/out-of-stock";
/// `type` of an Idempotency-Key reused for a different request.
pub const PROBLEM_KEY_REUSED: &str = "/problems/idempotency-key-reused";
/// `type` of a request that ran out of time.
pub const PROBLEM_TIMEOUT: &str = "/problems/timeout";

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "about:blank",
        }
    }
    /// The same error with a specific problem `type`.
    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
}

impl From<crate::api::ParseError> for ApiError {
    fn from(e: crate::api::ParseError) -> Self {
        Self::bad_request(e.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: self.kind.to_string(),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.message.clone(),
            message: self.message,
        };
        let mut res = (self.status, Json(problem)).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE
            || self.status == StatusCode::REQUEST_TIMEOUT
        {
            // The unread rest of the request may still be on the wire: this
            // connection cannot carry another request.
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

/// A JSON object body. Rejections are JSON errors with honest codes: 415
/// without `Content-Type: application/json`, 413 too large, 400 anything
/// else — including a JSON array where an object is expected (serde would
/// otherwise read `[1, 2]` as a struct's fields in order).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let mut types = req.headers().get_all(header::CONTENT_TYPE).iter();
        let json = match (types.next(), types.next()) {
            (Some(t), None) => t
                .to_str()
                .ok()
                .and_then(|t| t.split(';').next())
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")),
            _ => false,
        };
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected one Content-Type: application/json header",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rej| ApiError::new(rej.status(), rej.body_text()))?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Compares two secrets in time that depends on neither their contents nor
/// their lengths: both are hashed to fixed-length SHA-256 digests first, and
/// the digests are compared without an early exit (`subtle`).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.as_slice().ct_eq(db.as_slice()).into()
}

/// Whether `headers` carry the cluster token; the refusal if not.
fn token_refusal(token: &str, headers: &axum::http::HeaderMap) -> Option<ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let presented = match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok().and_then(|s| s.strip_prefix("Bearer ")),
        (Some(_), Some(_)) => {
            return Some(ApiError::bad_request("more than one Authorization header"));
        }
        _ => None,
    };
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => None,
        Some(_) => Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong cluster token",
        )),
        None => Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this route needs the cluster token: Authorization: Bearer <token>",
        )),
    }
}

/// Middleware of internal and admin routes: `Authorization: Bearer <cluster token>`,
/// and, when the cluster speaks TLS, a TLS connection with a client
/// certificate of the cluster CA (so the token never travels in clear text).
pub async fn require_token(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    if crate::tls::installed().is_some()
        && req.extensions().get::<Transport>() != Some(&Transport::Tls { client_cert: true })
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this route needs TLS with a certificate of the cluster's CA",
        )
        .into_response();
    }
    match token_refusal(&token, req.headers()) {
        None => next.run(req).await,
        Some(e) => e.into_response(),
    }
}

/// Adds `route_layer(require_token)` to a router of internal routes. A
/// method a route does not have is also answered only after the token
/// check, so a 405 tells nobody without the token which routes exist.
pub fn internal<S: Clone + Send + Sync + 'static>(router: Router<S>, token: &str) -> Router<S> {
    let token: Arc<str> = Arc::from(token);
    let fallback_token = token.clone();
    router
        .method_not_allowed_fallback(move |headers: axum::http::HeaderMap| {
            let refusal = token_refusal(&fallback_token, &headers);
            async move {
                refusal.unwrap_or_else(|| {
                    ApiError::new(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method not allowed on this route",
                    )
                })
            }
        })
        .route_layer(middleware::from_fn_with_state(token, require_token))
}

/// The process's Prometheus recorder (installed on first use; see [`crate::metrics`]).
pub fn metrics_handle() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    crate::metrics::handle()
}

/// Liveness, on every service.
#[utoipa::path(get, path = "/healthcheck", tag = "operations", responses((status = 200, description = "The service is up", body = Health)))]
pub async fn healthcheck() -> Json<Health> {
    Json(Health {
        message: "OK".into(),
    })
}

async fn metrics_route() -> Response {
    match crate::metrics::render() {
        Some(page) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], page).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process",
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// Refuses requests with conflicting Host headers, and HTTP/1.1 requests
/// without one (RFC 9112 §3.2). (Conflicting framing —
/// two Content-Lengths, a Transfer-Encoding that does not end in chunked —
/// is refused by hyper's parser; Transfer-Encoding with Content-Length is
/// resolved by it as RFC 9112 §6.3 says, Content-Length dropped.)
fn ambiguous(req: &Request) -> Option<Response> {
    let h = req.headers();
    let hosts = h.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Some(ApiError::bad_request("more than one Host header").into_response());
    }
    if hosts == 0 && req.version() == axum::http::Version::HTTP_11 {
        return Some(
            ApiError::bad_request("an HTTP/1.1 request needs a Host header").into_response(),
        );
    }
    None
}

/// No side effect without the whole request: every request's body is read in
/// full, up to the limit, before any handler runs. Over the limit (declared
/// or sent) is 413 and the handler never sees the request, so a route that
/// does not read its body (a buy) cannot act on a request whose body is
/// still arriving, or too large.
async fn whole_body(limits: &BodyLimits, req: Request) -> Result<Request, Response> {
    use http_body::Body as _;
    let limit = limits.for_route(
        req.extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit).into_response());
    }
    if req.body().is_end_stream() {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
        Err(e) => {
            let length_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if length_limit {
                too_large(limit).into_response()
            } else {
                ApiError::bad_request(format!("the request body could not be read: {e}"))
                    .into_response()
            })
        }
    }
}

/// Body limits: one for every route, and larger ones for named routes
/// (replication carries snapshots).
#[derive(Clone)]
struct BodyLimits {
    default: usize,
    routes: Arc<[(&'static str, usize)]>,
}

impl BodyLimits {
    fn for_route(&self, route: Option<&str>) -> usize {
        route
            .and_then(|r| self.routes.iter().find(|(p, _)| *p == r))
            .map_or(self.default, |(_, n)| *n)
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {limit} bytes"),
    )
}

async fn overloaded(err: BoxError) -> ApiError {
    if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::unavailable("overloaded, retry shortly")
    } else {
        tracing::error!(error = %err, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

/// Every request's admission, in one layer: with its id and span
/// ([`crate::telemetry::with_request_id`]) and within the time limit, the
/// whole body is read ([`whole_body`]), then the request is counted and
/// timed ([`crate::metrics::track`]) and, unless ambiguous ([`ambiguous`]),
/// routed.
///
/// Answers a request that outlasts `limits.request_timeout_ms` with a JSON
/// problem (never an empty body): 504 if the store took too long, 408 if
/// the request has a body (the client may not have sent all of it). Every
/// retry budget inside the store is cut to fit within this time, so a 504
/// only comes from a handler that is stuck. (The public routes take no
/// body; the internal ones that do are called by cluster members only.)
async fn gate(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    crate::telemetry::with_request_id(req, |req| limited(gate, req, next)).await
}

async fn limited(gate: Gate, req: Request, next: Next) -> Response {
    let limit = gate.request_timeout;
    let h = req.headers();
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    match tokio::time::timeout(limit, admitted(&gate.body, req, next)).await {
        Ok(res) => res,
        Err(_) => {
            let (status, detail) = if has_body {
                (
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request was not received and answered within {} ms",
                        limit.as_millis()
                    ),
                )
            } else {
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "no answer within {} ms; retry (a buy with the same Idempotency-Key)",
                        limit.as_millis()
                    ),
                )
            };
            let mut res = ApiError::new(status, detail)
                .kind(PROBLEM_TIMEOUT)
                .into_response();
            // The unread rest of the request may still be on the wire.
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            res
        }
    }
}

/// Inside the time limit: the whole body, then the request metrics around
/// the routes, which refuse an ambiguous request first.
async fn admitted(limits: &BodyLimits, req: Request, next: Next) -> Response {
    let req = match whole_body(limits, req).await {
        Ok(req) => req,
        Err(res) => return res,
    };
    crate::metrics::track(req, |req| async move {
        match ambiguous(&req) {
            Some(refused) => refused,
            None => next.run(req).await,
        }
    })
    .await
}

/// What [`gate`] needs: the time limit and the body limits.
#[derive(Clone)]
struct Gate {
    request_timeout: Duration,
    body: BodyLimits,
}

/// Wraps a service's routes with the shared routes and limits, with larger
/// body limits for the routes named (route template, bytes).
pub fn finish(router: Router, limits: &Limits, routes: &[(&'static str, usize)]) -> Router {
    let gate_state = Gate {
        request_timeout: Duration::from_millis(limits.request_timeout_ms),
        body: BodyLimits {
            default: limits.max_body_bytes,
            routes: routes.into(),
        },
    };
    router
        .route("/healthcheck", get(healthcheck))
        .route("/metrics", get(metrics_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        // One layer of our own for every request (each layer costs a boxed
        // future and a clone of the routes per request): see `gate`.
        .layer(middleware::from_fn_with_state(gate_state, gate))
        .layer(
            ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
                .load_shed()
                .concurrency_limit(limits.max_in_flight),
        )
}

/// Runs a request's work in a task of its own that the request awaits, so
/// that a caller who goes away (its client gave up, its connection closed)
/// cannot cut the work short halfway: a write between its begin and its end
/// at the caches, a buy between the catalog's answer and the order log.
/// The task carries the request's context (its id, for lines and calls).
/// At most `limit` such tasks run at once, counting those whose requests
/// are gone: past that, 503, as the in-flight limit answers.
#[derive(Clone)]
pub struct Whole {
    places: Arc<tokio::sync::Semaphore>,
    limit: u32,
    /// [`crate::metrics::WORK_RUNNING`].
    running: metrics::Gauge,
}

impl Whole {
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(
            1,
            tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
        );
        Self {
            places: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit: limit as u32,
            running: metrics::gauge!(crate::metrics::WORK_RUNNING),
        }
    }

    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: From<ApiError> + Send + 'static,
    {
        let permit = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::unavailable("overloaded, retry shortly"))?;
        let running = self.running.clone();
        running.increment(1.0);
        // On the heap from here: the work's future is kilobytes, and each
        // wrapper below (and spawning) would copy it whole.
        let work = Box::pin(work);
        let work = crate::telemetry::carry(async move {
            let done = work.await;
            running.decrement(1.0);
            drop(permit);
            done
        });
        tokio::spawn(work).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a request's task failed");
            Err(
                ApiError::unavailable("the request's task failed; retry with the same request id")
                    .into(),
            )
        })
    }

    /// Waits, up to `within`, until every task has finished, and takes
    /// every place: nothing runs from then on. For a node that stops, once
    /// it has answered its requests: their tasks may outlive them (their
    /// clients gave up), and what they hold (the order log) can only close
    /// after them. `false`: some still ran after `within`.
    pub async fn finish(&self, within: Duration) -> bool {
        match tokio::time::timeout(within, self.places.acquire_many(self.limit)).await {
            Ok(Ok(all)) => {
                all.forget();
                true
            }
            _ => false,
        }
    }
}

/// Most bytes of a request's head (request line and headers); more is 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time in-flight requests get to finish once shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `app` on `listener` until `shutdown` resolves; then stops
/// accepting, lets in-flight requests finish (up to [`DRAIN_TIMEOUT`]) and
/// returns. Request heads are limited in size and in time (slow clients
/// cannot hold a connection open by trickling headers). Connections are
/// bounded (see [`Limits`]): past `max_connections` a new one is closed at
/// once; the last `reserved_connections` serve only requests carrying the
/// cluster `token`, so the nodes keep talking while the port is flooded; a
/// keep-alive connection idle for `idle_timeout_ms`, or that has served
/// `max_requests_per_connection` requests, is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioTimer;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.head_timeout_ms))
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let token: Arc<str> = Arc::from(token);
    let open = Arc::new(AtomicUsize::new(0));
    let public = limits
        .max_connections
        .saturating_sub(limits.reserved_connections);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        while conns.try_join_next().is_some() {}
        let n = open.load(Ordering::Relaxed);
        if n >= limits.max_connections {
            metrics::counter!(crate::metrics::CONNECTIONS_SHED).increment(1);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ConnState::new(n >= public));
        let mut service = ConnService {
            app: app.clone(),
            conn: conn.clone(),
            token: token.clone(),
            max_requests: limits.max_requests_per_connection,
            transport: Transport::Plain,
        };
        let open_now = OpenConnection::new(open.clone());
        let builder = builder.clone();
        let stop = stop_rx.clone();
        let head_timeout = Duration::from_millis(limits.head_timeout_ms);
        conns.spawn(async move {
            let _open = open_now;
            let Some(tls) = crate::tls::installed() else {
                return drive(&builder, stream, service, conn, idle, stop).await;
            };
            // One port for both: a TLS handshake starts with 0x16, plain
            // HTTP with a method's letter.
            let mut first = [0u8; 1];
            match tokio::time::timeout(head_timeout, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == 0x16 => {}
                Ok(Ok(1)) => return drive(&builder, stream, service, conn, idle, stop).await,
                _ => return,
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
            let Ok(Ok(stream)) = tokio::time::timeout(head_timeout, acceptor.accept(stream)).await
            else {
                return; // handshake failed: a certificate of another CA, say
            };
            let client_cert = stream.get_ref().1.peer_certificates().is_some();
            service.transport = Transport::Tls { client_cert };
            drive(&builder, stream, service, conn, idle, stop).await
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!("some connections were still busy after {DRAIN_TIMEOUT:?}; closing them");
        conns.abort_all();
        // Gone once this returns: nothing of a connection (its handler's
        // state among it) outlives the server.
        while conns.join_next().await.is_some() {}
    }
    Ok(())
}

/// Serves one connection until it ends, closing it gracefully when the
/// server stops or the connection has been idle for `idle`.
async fn drive<I>(
    builder: &hyper::server::conn::http1::Builder,
    io: I,
    service: ConnService,
    conn: Arc<ConnState>,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    // Upgrades: a catalog replica's peers switch a connection to their
    // replication stream (`catalog::stream`), which then lives on its own.
    let connection = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => break,
            _ = stop.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = conn.idle_for(idle), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// How a request reached this node, in its extensions: plain HTTP, or TLS
/// with or without a client certificate of the cluster CA (the only kind
/// the handshake accepts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls { client_cert: bool },
}

/// Counts an open connection for as long as it lives.
struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnection {
    fn new(open: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        let n = open.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        metrics::gauge!(crate::metrics::OPEN_CONNECTIONS).set(n as f64);
        Self(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let n = self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) - 1;
        metrics::gauge!(crate::metrics::OPEN_CONNECTIONS).set(n as f64);
    }
}

/// One connection's use: requests served and in flight, last activity.
struct ConnState {
    /// Accepted into the reserved share: cluster traffic only.
    reserved: bool,
    served: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
    started: tokio::time::Instant,
    /// Milliseconds after `started` of the last request's start or end.
    last_active_ms: std::sync::atomic::AtomicU64,
}

impl ConnState {
    fn new(reserved: bool) -> Self {
        Self {
            reserved,
            served: Default::default(),
            in_flight: Default::default(),
            started: tokio::time::Instant::now(),
            last_active_ms: Default::default(),
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_active_ms
            .fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once no request is in flight and none came for `idle`.
    async fn idle_for(&self, idle: Duration) {
        use std::sync::atomic::Ordering;
        loop {
            let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
            let deadline = self.started + last + idle;
            tokio::time::sleep_until(deadline).await;
            let still = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed)) == last;
            if still && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                // Busy: look again after another idle period.
                tokio::time::sleep(idle).await;
            }
        }
    }
}

/// Marks a request in flight on its connection until its answer is sent
/// (or the request is dropped).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.touch();
    }
}

/// `app` as served on one connection: the reserved share's token check and
/// the per-connection request count.
#[derive(Clone)]
struct ConnService {
    app: Router,
    conn: Arc<ConnState>,
    token: Arc<str>,
    max_requests: u64,
    transport: Transport,
}

impl tower::Service<axum::http::Request<hyper::body::Incoming>> for ConnService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Response, std::convert::Infallible>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        use std::sync::atomic::Ordering;
        use tower::ServiceExt;
        req.extensions_mut().insert(self.transport);
        let conn = self.conn.clone();
        let n = conn.served.fetch_add(1, Ordering::Relaxed) + 1;
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        conn.touch();
        let in_flight = InFlight(conn.clone());
        let last = n >= self.max_requests;
        if conn.reserved && token_refusal(&self.token, req.headers()).is_some() {
            metrics::counter!(crate::metrics::CONNECTIONS_SHED).increment(1);
            let mut resp = ApiError::unavailable(
                "too many open connections: this one serves cluster traffic only; try again shortly",
            )
            .into_response();
            close_after(&mut resp);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            drop(in_flight);
            return Box::pin(std::future::ready(Ok(resp)));
        }
        let app = self.app.clone();
        Box::pin(async move {
            let _in_flight = in_flight;
            let mut resp = match app.oneshot(req.map(axum::body::Body::new)).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            if last {
                close_after(&mut resp);
            }
            Ok(resp)
        })
    }
}

fn close_after(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Resolves on SIGTERM or Ctrl-C. Both are caught from this call on, not
/// from the future's first poll: a server polls it only between accepting
/// connections, so a stop sent as soon as the node answered could
/// otherwise find no handler and kill the process outright (no drain, no
/// clean close of its database).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {},
            _ = wait(int) => {},
        }
    }
}

/// One path segment (`{id}`, `{topic}`), its rejection a JSON 400.
pub struct Segment(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Segment {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(s)) => Ok(Segment(s)),
            Err(rej) => Err(ApiError::bad_request(rej.body_text())),
        }
    }
}

/// `Query<T>` whose rejection is a JSON 400.
pub struct QueryArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(QueryArgs(v)),
            Err(rej) => Err(ApiError::bad_request(rej.body_text())),
        }
    }
}

impl From<crate::client::ClientError> for ApiError {
    /// A final 4xx from a downstream replica passes through; anything else
    /// (no replica answered within the retry budget) is a 503.
    fn from(e: crate::client::ClientError) -> Self {
        match &e {
            crate::client::ClientError::Status {
                status: s @ (400 | 404 | 409 | 422),
                message,
                ..
            } if !e.is_retryable() => {
                let status = StatusCode::from_u16(*s).unwrap_or(StatusCode::BAD_REQUEST);
                ApiError::new(status, message.clone())
            }
            _ => {
                // The error names internal addresses: log it, never answer with it.
                tracing::warn!(error = %e, "no replica could serve the request");
                ApiError::unavailable("no replica could serve the request in time; retry shortly")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    /// Starts work through `whole` that waits for the sender returned, and
    /// abandons its caller; the flag is set when the work ends.
    async fn abandoned(
        whole: &super::Whole,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let caller = tokio::spawn({
            let (whole, done) = (whole.clone(), done.clone());
            async move {
                whole
                    .run(async move {
                        let _ = wait.await;
                        done.store(true, Ordering::SeqCst);
                        Ok::<_, super::ApiError>(())
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        (go, done)
    }

    /// Work run whole finishes though its caller went away, and keeps its
    /// place under the limit until it does: a second caller meanwhile is
    /// refused with 503, a third after it finished is served.
    #[tokio::test]
    async fn work_run_whole_outlives_its_caller_and_counts_until_done() {
        use super::{ApiError, Whole};
        use std::sync::atomic::Ordering;
        let whole = Whole::new(1);
        let (go, done) = abandoned(&whole).await;
        let refused = whole.run(async { Ok::<_, ApiError>(()) }).await;
        assert_eq!(
            refused.unwrap_err().status,
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        go.send(()).unwrap();
        // The abandoned work finishes, and its place comes free.
        for _ in 0..1000 {
            if done.load(Ordering::SeqCst)
                && whole.run(async { Ok::<_, ApiError>(7) }).await.ok() == Some(7)
            {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the abandoned work did not finish, or its place did not come free");
    }

    /// A node that stops waits for work whose caller went away: `finish`
    /// returns false while it runs, true once it ended, and from then on
    /// no new work starts (503).
    #[tokio::test]
    async fn finishing_waits_for_abandoned_work_then_refuses_more() {
        use super::{ApiError, Whole};
        use std::time::Duration;
        let whole = Whole::new(4);
        let (go, _) = abandoned(&whole).await;
        assert!(
            !whole.finish(Duration::from_millis(50)).await,
            "the work waits on `go`: it cannot have finished"
        );
        go.send(()).unwrap();
        assert!(whole.finish(Duration::from_secs(10)).await);
        let refused = whole.run(async { Ok::<_, ApiError>(()) }).await;
        assert_eq!(
            refused.unwrap_err().status,
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
    }

    /// A stop sent before the shutdown future is first polled is caught,
    /// not fatal: with the handler registered on the first poll, this
    /// SIGTERM would kill the test process.
    #[tokio::test]
    async fn a_sigterm_before_the_shutdown_future_is_polled_stops_it() {
        let shutdown = super::shutdown_signal();
        // SAFETY: raising a signal this process now handles.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        tokio::time::timeout(std::time::Duration::from_secs(10), shutdown)
            .await
            .expect("the SIGTERM sent before the first poll resolves the future");
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
        // Lengths that differ by a multiple of 65 536 are still different.
        let long = [b"abc".as_slice(), &[0u8; 65_536]].concat();
        assert!(!constant_time_eq(b"abc", &long));
        assert!(!constant_time_eq(&long, b"abc"));
    }
}
