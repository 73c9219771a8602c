//! Typed clients of the three services, used by the services themselves,
//! the CLI, the bench and the tests. Connections are pooled and kept alive;
//! every call has a timeout.

use std::time::Duration;

use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::*;

/// Header a catalog replica that is not the primary sets to name the one it follows.
pub const PRIMARY_HEADER: &str = "x-pygmy-primary";

/// Header on a catalog write that must not be forwarded: a replica that is
/// not the primary answers it with 421 naming the primary instead. Set by a
/// replica that forwards a write (so a write is forwarded at most once and
/// can never loop) and by the order service, which follows the primary
/// itself.
pub const NO_FORWARD_HEADER: &str = "x-pygmy-no-forward";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Not reached, or no answer in time: try another replica.
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// An answer with an error status.
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
        /// The primary named by a replica that is not it.
        primary: Option<String>,
    },
    /// An answer we cannot read.
    #[error("bad answer from {url}: {detail}")]
    Decode { url: String, detail: String },
}

impl ClientError {
    /// Whether the same request may succeed on another replica (or later).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Decode { .. } => true,
            ClientError::Status { status, .. } => {
                *status >= 500 || *status == 421 || *status == 408 || *status == 429
            }
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One pooled HTTP client with the cluster token (if any) and a per-call timeout.
#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
    /// `Bearer <token>`, built once.
    auth: Option<reqwest::header::HeaderValue>,
}

impl Http {
    /// A client speaking this process's TLS ([`crate::tls::install`]), if any.
    pub fn new(token: Option<String>, timeout: Duration) -> Self {
        Self::with_tls(
            token,
            timeout,
            crate::tls::installed().map(|m| m.client.clone()),
        )
    }

    /// A client speaking the TLS given (`None`: plain HTTP only), whatever
    /// this process installed: a test process talks to clusters of
    /// different CAs at once.
    pub fn with_tls(
        token: Option<String>,
        timeout: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        crate::tls::default_provider();
        let tls = match tls {
            Some(c) => (*c).clone(),
            None => crate::tls::no_roots_client(),
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_millis(500)))
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            // A node answers; it never sends a call elsewhere. A redirect
            // is its answer (an error), not a place to take the call to.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the HTTP client builds with static settings");
        Self::from_client(client, token)
    }

    /// Opens a connection to `url` and switches it to `protocol` (an HTTP/1.1
    /// upgrade, with the token): what is written on it afterwards is that
    /// protocol's. The answer must be `101 Switching Protocols`.
    pub async fn upgrade(
        &self,
        url: String,
        protocol: &'static str,
    ) -> Result<reqwest::Upgraded, ClientError> {
        let req = self
            .client
            .get(&url)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, protocol);
        let unreachable = unreachable(&url);
        let res = self.with_token(req).send().await.map_err(unreachable)?;
        let status = res.status();
        if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Err(ClientError::Status {
                url: url.clone(),
                status: status.as_u16(),
                message: format!("did not switch to {protocol}"),
                primary: None,
            });
        }
        res.upgrade().await.map_err(unreachable)
    }

    /// An `Http` over a client configured elsewhere (its own TLS roots or
    /// name resolution, say).
    pub fn from_client(client: reqwest::Client, token: Option<String>) -> Self {
        let auth = token.as_ref().and_then(|t| {
            let mut v = reqwest::header::HeaderValue::try_from(format!("Bearer {t}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Self { client, auth }
    }

    /// `req` with the cluster token, if this client has one.
    fn with_token(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some(auth) => req.header(reqwest::header::AUTHORIZATION, auth.clone()),
            None => req,
        }
    }

    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        url: String,
        body: Option<&B>,
        headers: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        match reqwest::Url::parse(&url) {
            Ok(parsed) => self.call_at(method, &parsed, body, headers).await,
            Err(e) => Err(ClientError::Unreachable {
                url,
                detail: format!("not a URL: {e}"),
            }),
        }
    }

    /// [`Http::call`] to a [`Route`], parsed once.
    pub async fn call_route<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        route: &Route,
        body: Option<&B>,
        headers: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        match &route.parsed {
            Some(at) => self.call_at(method, at, body, headers).await,
            None => self.call(method, route.text.clone(), body, headers).await,
        }
    }

    async fn call_at<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        at: &reqwest::Url,
        body: Option<&B>,
        headers: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        let url = || at.to_string();
        let mut req = self.with_token(self.client.request(method, at.clone()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(id) = crate::telemetry::current_request_id() {
            req = req.header(crate::telemetry::REQUEST_ID_HEADER, id);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.map_err(|e| ClientError::Unreachable {
            url: url(),
            detail: error_chain(&e),
        })?;
        let status = res.status();
        let primary = res
            .headers()
            .get(PRIMARY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = res.bytes().await.map_err(|e| ClientError::Unreachable {
            url: url(),
            detail: error_chain(&e),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(ClientError::Status {
                url: url(),
                status: status.as_u16(),
                message,
                primary,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url: url(),
            detail: e.to_string(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, url: String) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, url, None, &[]).await
    }

    /// GETs a page that is not JSON (`/metrics`).
    pub async fn text(&self, url: String) -> Result<String, ClientError> {
        let unreachable = unreachable(&url);
        let req = self.with_token(self.client.get(&url));
        let res = req.send().await.map_err(unreachable)?;
        let status = res.status();
        let body = res.text().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(ClientError::Status {
                url,
                status: status.as_u16(),
                message: body.chars().take(200).collect(),
                primary: None,
            });
        }
        Ok(body)
    }
}

/// The catalog replicas, highest process id (the usual primary) first,
/// sticking to the one that answered and following redirects to the
/// primary: how operator writes reach the catalog.
pub fn catalog_admin_pool(
    cfg: &crate::config::ClusterConfig,
    http: Http,
) -> std::sync::Arc<crate::balance::Pool<CatalogClient>> {
    let mut catalogs: Vec<&crate::config::NodeConfig> =
        cfg.nodes_of(crate::config::Role::Catalog).collect();
    catalogs.sort_by_key(|n| std::cmp::Reverse(n.process_id));
    let members = catalogs
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                CatalogClient::new(n.base_url(), http.clone()),
            )
        })
        .collect();
    crate::balance::Pool::new(
        "catalog",
        members,
        crate::balance::Pick::Sticky,
        Duration::from_millis(cfg.timing.retry_budget_ms),
    )
}

/// How a failed request to `url` is told.
fn unreachable(url: &str) -> impl Fn(reqwest::Error) -> ClientError + Copy + '_ {
    move |e| ClientError::Unreachable {
        url: url.to_string(),
        detail: error_chain(&e),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A URL called on every request, parsed once (parsing maps the host
/// through IDNA each time). One that does not parse is called as text,
/// to fail as any call to it would.
#[derive(Debug)]
pub struct Route {
    text: String,
    parsed: Option<reqwest::Url>,
}

impl Route {
    pub fn new(base: &str, path: &str) -> Self {
        let text = format!("{base}{path}");
        let parsed = reqwest::Url::parse(&text).ok();
        Self { text, parsed }
    }
}

/// A typed client of one node, made from the node's base URL and the HTTP
/// client its calls go through.
pub trait NodeClient: Clone + Send + Sync + 'static {
    fn connect(base: String, http: Http) -> Self;
}

macro_rules! node_client {
    ($($t:ident),*) => {
        $(impl NodeClient for $t {
            fn connect(base: String, http: Http) -> Self {
                Self::new(base, http)
            }
        })*
    };
}
node_client!(CatalogClient, OrderClient, FrontendClient);

/// A catalog replica (internal routes: token required).
#[derive(Clone, Debug)]
pub struct CatalogClient {
    pub base: String,
    http: Http,
    write: std::sync::Arc<Route>,
    lookups: std::sync::Arc<Route>,
}

impl CatalogClient {
    pub fn new(base: impl Into<String>, http: Http) -> Self {
        let base = base.into();
        Self {
            write: std::sync::Arc::new(Route::new(&base, "/internal/write")),
            lookups: std::sync::Arc::new(Route::new(&base, "/internal/lookups")),
            base,
            http,
        }
    }

    /// Reads a book from this replica's state, at least at version `min`.
    pub async fn lookup(
        &self,
        id: BookId,
        min: Option<Version>,
    ) -> Result<LookupResponse, ClientError> {
        let url = match min {
            Some(v) => format!("{}/lookup/{id}?min_version={v}", self.base),
            None => format!("{}/lookup/{id}", self.base),
        };
        self.http.get(url).await
    }

    /// Reads several books from one state of this replica, at least at
    /// `batch.min_version`.
    pub async fn lookups(&self, batch: &LookupBatch) -> Result<LookupBatchReply, ClientError> {
        self.http
            .call_route(Method::POST, &self.lookups, Some(batch), &[])
            .await
    }

    pub async fn search(&self, topic: &TopicSlug) -> Result<SearchResponse, ClientError> {
        self.http.get(format!("{}/search/{topic}", self.base)).await
    }

    pub async fn topics(&self) -> Result<TopicsResponse, ClientError> {
        self.http.get(format!("{}/topics", self.base)).await
    }

    /// Sends a write to this replica, to be applied there only: a replica
    /// that is not the primary answers 421 naming the primary (it does not
    /// forward it). The order service and forwarding replicas use this.
    pub async fn write(&self, w: &CatalogWrite) -> Result<WriteResult, ClientError> {
        let headers = [(NO_FORWARD_HEADER, "1")];
        self.http
            .call_route(Method::POST, &self.write, Some(w), &headers)
            .await
    }

    /// Sends writes to this replica, each applied there only, as
    /// [`CatalogClient::write`] sends one.
    pub async fn writes(&self, b: &WriteBatch) -> Result<WriteBatchReply, ClientError> {
        self.http
            .call(
                Method::POST,
                format!("{}/internal/writes", self.base),
                Some(b),
                &[(NO_FORWARD_HEADER, "1")],
            )
            .await
    }

    /// The replica's latest state digests.
    pub async fn digests(&self) -> Result<Vec<StateDigest>, ClientError> {
        self.http
            .get(format!("{}/internal/digests", self.base))
            .await
    }

    /// The original's admin route. Any replica takes it: one that is not
    /// the primary forwards it there and relays the answer.
    pub async fn update(&self, u: &UpdateRequest) -> Result<WriteResult, ClientError> {
        self.http
            .call(
                Method::PUT,
                format!("{}/catalog/update", self.base),
                Some(u),
                &[],
            )
            .await
    }

    /// `update`, to be applied at this replica only (no forwarding).
    pub async fn update_here(&self, u: &UpdateRequest) -> Result<WriteResult, ClientError> {
        self.http
            .call(
                Method::PUT,
                format!("{}/catalog/update", self.base),
                Some(u),
                &[(NO_FORWARD_HEADER, "1")],
            )
            .await
    }

    pub async fn cache_lease(&self, frontend: &str) -> Result<LeaseGrant, ClientError> {
        let body = LeaseRequest {
            frontend: frontend.to_string(),
        };
        self.http
            .call(
                Method::POST,
                format!("{}/internal/cache-lease", self.base),
                Some(&body),
                &[],
            )
            .await
    }

    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        self.http
            .get(format!("{}/internal/status", self.base))
            .await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.http.get(format!("{}/healthcheck", self.base)).await
    }
}

/// An order replica (internal routes: token required).
#[derive(Clone, Debug)]
pub struct OrderClient {
    pub base: String,
    http: Http,
    buy: std::sync::Arc<Route>,
    buys: std::sync::Arc<Route>,
}

impl OrderClient {
    pub fn new(base: impl Into<String>, http: Http) -> Self {
        let base = base.into();
        let buy = std::sync::Arc::new(Route::new(&base, "/internal/buy"));
        let buys = std::sync::Arc::new(Route::new(&base, "/internal/buys"));
        Self {
            base,
            http,
            buy,
            buys,
        }
    }

    /// Sends buys gathered in a batch, each handled there as
    /// [`OrderClient::buy`] sends one.
    pub async fn buys(&self, b: &OrderBuyBatch) -> Result<WriteBatchReply, ClientError> {
        self.http
            .call_route(Method::POST, &self.buys, Some(b), &[])
            .await
    }

    pub async fn buy(&self, req: &OrderBuyRequest) -> Result<WriteResult, ClientError> {
        self.http
            .call_route(Method::POST, &self.buy, Some(req), &[])
            .await
    }

    pub async fn log(&self, limit: u32, before: Option<u64>) -> Result<OrderLogPage, ClientError> {
        let url = match before {
            Some(b) => format!("{}/log?limit={limit}&before={b}", self.base),
            None => format!("{}/log?limit={limit}", self.base),
        };
        self.http.get(url).await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.http.get(format!("{}/healthcheck", self.base)).await
    }
}

/// The public frontend.
#[derive(Clone, Debug)]
pub struct FrontendClient {
    pub base: String,
    http: Http,
    invalidate: std::sync::Arc<Route>,
}

impl FrontendClient {
    pub fn new(base: impl Into<String>, http: Http) -> Self {
        let base = base.into();
        let invalidate = std::sync::Arc::new(Route::new(&base, "/internal/invalidate"));
        Self {
            base,
            http,
            invalidate,
        }
    }

    pub async fn search(&self, topic: &str) -> Result<SearchResponse, ClientError> {
        self.http.get(format!("{}/search/{topic}", self.base)).await
    }

    pub async fn lookup(&self, id: &str) -> Result<LookupResponse, ClientError> {
        self.http.get(format!("{}/lookup/{id}", self.base)).await
    }

    pub async fn buy(
        &self,
        id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<BuyResponse, ClientError> {
        let headers: Vec<(&str, &str)> = idempotency_key
            .map(|k| ("idempotency-key", k))
            .into_iter()
            .collect();
        self.http
            .call::<(), BuyResponse>(
                Method::POST,
                format!("{}/buy/{id}", self.base),
                None,
                &headers,
            )
            .await
    }

    /// Pushes cache invalidations (the catalog primary's call; token required).
    pub async fn invalidate(&self, batch: &InvalidationBatch) -> Result<Health, ClientError> {
        self.http
            .call_route(Method::POST, &self.invalidate, Some(batch), &[])
            .await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.http.get(format!("{}/healthcheck", self.base)).await
    }

    /// `GET /readyz` of any node (not only a frontend): ready to serve.
    pub async fn ready(&self) -> Result<Health, ClientError> {
        self.http.get(format!("{}/readyz", self.base)).await
    }
}

/// A pool of one catalog replica at a port nothing listens on (bound, then
/// closed): every call fails as unreachable, fast.
#[cfg(test)]
pub(crate) fn unreachable_catalog(
    pick: crate::balance::Pick,
) -> std::sync::Arc<crate::balance::Pool<CatalogClient>> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let http = Http::with_tls(None, Duration::from_millis(200), None);
    crate::balance::Pool::new(
        "catalog",
        vec![(
            "catalog-1".into(),
            CatalogClient::new(format!("http://{addr}"), http),
        )],
        pick,
        Duration::from_millis(100),
    )
}

#[cfg(test)]
mod tests {
    use super::{ClientError, Http};
    use reqwest::Method;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A call answered with a redirect ends there, as an error naming the
    /// status: the client does not take the call (and the cluster token) to
    /// the place named.
    #[tokio::test]
    async fn a_redirect_is_an_answer_not_followed() {
        crate::tls::default_provider();
        let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let redirecting = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = format!("http://{}/internal/write", elsewhere.local_addr().unwrap());
        let at = format!(
            "http://{}/internal/write",
            redirecting.local_addr().unwrap()
        );
        tokio::spawn(async move {
            let (mut conn, _) = redirecting.accept().await.unwrap();
            let mut head = vec![0u8; 4096];
            let _ = conn.read(&mut head).await.unwrap();
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n"
            );
            conn.write_all(answer.as_bytes()).await.unwrap();
            let _ = conn.read(&mut head).await;
        });
        let http = Http::with_tls(Some("secret".into()), Duration::from_secs(5), None);
        let res = http
            .call::<_, serde_json::Value>(Method::POST, at, Some(&serde_json::json!({})), &[])
            .await;
        assert!(
            matches!(res, Err(ClientError::Status { status: 307, .. })),
            "{res:?}"
        );
        let followed = tokio::time::timeout(Duration::from_millis(200), elsewhere.accept()).await;
        assert!(followed.is_err(), "the redirect was followed");
    }
}
