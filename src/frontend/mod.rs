//! The frontend: the store's only public service. `search`, `lookup` and
//! `buy`, a read cache kept coherent by the catalog primary ([`cache`]),
//! round-robin over healthy replicas with the same request retried on
//! another replica when one fails.

mod batch;
#[doc(hidden)]
pub mod cache;
pub(crate) mod openapi;
pub(crate) mod web;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::NodeError;
use crate::api::*;
use crate::balance::{Pick, Pool};
use crate::client::{CatalogClient, Http, OrderClient};
use crate::config::{ClusterConfig, Role};
use crate::http::{self as h, ApiError, JsonBody, Segment};
use crate::node::Node;

use cache::{Cache, CacheStats};

struct Frontend {
    cache: Cache,
    /// Reads: round-robin over catalog replicas.
    catalog: Arc<Pool<CatalogClient>>,
    /// Lookups that miss the cache, batched over `catalog`.
    lookups: batch::Lookups,
    /// Buys: round-robin over order replicas.
    orders: Arc<Pool<OrderClient>>,
    /// Buys, batched over `orders`.
    buys: batch::Buys,
    /// The storefront's and the operator view's state.
    web: web::Web,
}

/// What every handler gets.
type AppState = Arc<Frontend>;

/// Options of a frontend beyond the cluster file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub no_cache: bool,
}

/// Runs frontend node `node` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    node: Node,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    crate::metrics::register(Role::Frontend);
    let (cfg, t) = (&node.cfg, &node.cfg.timing);
    // Every retry budget ends before the request timeout, so a request
    // never times out here while one of its retries still runs.
    let budget = Duration::from_millis(t.retry_budget_ms).min(public_budget(cfg));
    let catalog = node.pool(Role::Catalog, &node.http, Pick::RoundRobin, budget);
    // An order replica may itself retry the catalog for a whole budget (a
    // failover): give it that long before trying another.
    let order_http = Http::new(
        Some(cfg.token.clone()),
        Duration::from_millis(t.retry_budget_ms + t.call_timeout_ms),
    );
    let order_budget = (Duration::from_millis(t.retry_budget_ms) * 2).min(public_budget(cfg));
    let orders = node.pool(Role::Order, &order_http, Pick::RoundRobin, order_budget);
    let probe = Duration::from_millis(t.health_interval_ms);
    catalog.spawn_probe(
        probe,
        |c: CatalogClient| async move { c.health().await.is_ok() },
    );
    orders.spawn_probe(
        probe,
        |o: OrderClient| async move { o.health().await.is_ok() },
    );
    let fe: AppState = Arc::new(Frontend {
        cache: Cache::new(!opts.no_cache, cfg.limits.cache_entries)
            // The replication lease with the core's drift margin (10 %).
            .with_fence_timeout(Duration::from_millis(t.lease_ms).mul_f64(1.1)),
        web: web::Web::new(cfg, &node.name),
        lookups: batch::Lookups::spawn(catalog.clone()),
        buys: batch::Buys::spawn(orders.clone(), order_budget),
        catalog,
        orders,
    });
    web::spawn_observer(Arc::downgrade(&fe));
    if !opts.no_cache {
        let lease = Duration::from_millis(t.cache_lease_ms);
        let primary = node.pool(Role::Catalog, &node.http, Pick::Sticky, lease / 2);
        tokio::spawn(renew_lease(
            Arc::downgrade(&fe),
            primary,
            node.name.clone(),
            lease,
        ));
    }
    let app = router(fe, &cfg.token);
    tracing::info!(
        addr = %listener.local_addr()?,
        cache = if opts.no_cache { "off" } else { "on" },
        "frontend {} serving", node.name
    );
    node.serve(listener, app, &[], shutdown).await?;
    tracing::info!("frontend {} stopped", node.name);
    Ok(())
}

fn router(fe: AppState, token: &str) -> Router {
    let public = Router::new()
        .route("/search/{topic}", get(search))
        .route("/lookup/{id}", get(lookup))
        .route("/buy/{id}", post(buy))
        .route("/openapi.json", get(openapi::serve))
        .route("/readyz", get(readyz))
        .merge(web::public_routes());
    let internal = Router::new()
        .route("/internal/invalidate", post(invalidate))
        .route("/internal/cache", get(cache_stats))
        .merge(web::token_routes());
    public.merge(h::internal(internal, token)).with_state(fe)
}

/// The longest a frontend may spend on one public request's calls: the
/// request timeout less one call's time (and never under half of it).
pub fn public_budget(cfg: &ClusterConfig) -> Duration {
    let limit = cfg.limits.request_timeout_ms;
    Duration::from_millis(
        limit
            .saturating_sub(cfg.timing.call_timeout_ms)
            .max(limit / 2),
    )
}

/// Keeps the cache lease alive: asks the primary every quarter lease.
async fn renew_lease(
    fe: std::sync::Weak<Frontend>,
    primary: Arc<Pool<CatalogClient>>,
    name: String,
    lease: Duration,
) {
    let mut tick = tokio::time::interval(lease / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(fe) = fe.upgrade() else { return };
        let sent = Instant::now();
        match primary
            .call(|c| {
                let name = name.clone();
                async move { c.cache_lease(&name).await }
            })
            .await
        {
            Ok(grant) => {
                if failing {
                    tracing::info!(
                        epoch = grant.epoch,
                        "cache lease renewed by the catalog primary"
                    );
                }
                failing = false;
                fe.cache.renew(sent, &grant);
            }
            Err(e) => {
                if !failing {
                    tracing::info!(error = %e, "cache lease not renewed; serving reads from replicas only");
                }
                failing = true;
            }
        }
    }
}

/// `GET /readyz`: ready when a catalog replica and an order replica answer.
async fn readyz(State(fe): State<AppState>) -> Result<Json<Health>, ApiError> {
    let catalogs = fe.catalog.members().iter().map(|m| {
        let c = m.client.clone();
        async move { c.health().await.is_ok() }
    });
    let orders = fe.orders.members().iter().map(|m| {
        let c = m.client.clone();
        async move { c.health().await.is_ok() }
    });
    let (c, o) = tokio::join!(
        crate::readiness::any(catalogs.collect::<Vec<_>>()),
        crate::readiness::any(orders.collect::<Vec<_>>())
    );
    crate::readiness::answer(match (c, o) {
        (false, _) => Some("no catalog replica answers".into()),
        (_, false) => Some("no order replica answers".into()),
        _ => None,
    })
}

#[utoipa::path(
    get,
    path = "/search/{topic}",
    tag = "store",
    summary = "Books of a topic",
    params(("topic" = String, Path, description = "The topic's slug: lower-case words joined by '-'", pattern = r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length = 128, example = "distributed-systems")),
    responses(
        (status = 200, description = "Title → id of every book of the topic (none for an unknown topic)", body = SearchResponse),
        (status = 400, description = "Not a topic slug", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No catalog replica could answer in time", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "No answer within the request timeout", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn search(
    State(fe): State<AppState>,
    Segment(topic): Segment,
) -> Result<Json<Arc<SearchResponse>>, ApiError> {
    let topic = TopicSlug::parse(&topic)?;
    if let Some(hit) = fe.cache.search(&topic) {
        return Ok(Json(hit));
    }
    let ticket = fe.cache.ticket(None);
    let res = Arc::new(
        fe.catalog
            .call(|c| {
                let topic = topic.clone();
                async move { c.search(&topic).await }
            })
            .await?,
    );
    fe.cache.fill_topic(ticket, topic, res.clone());
    Ok(Json(res))
}

#[utoipa::path(
    get,
    path = "/lookup/{id}",
    tag = "store",
    summary = "One book, with its stock and cost",
    params(("id" = u64, Path, description = "The book's id", minimum = 1, maximum = 9223372036854775807_u64, example = 1)),
    responses(
        (status = 200, description = "The book", body = LookupResponse),
        (status = 400, description = "The id is not a positive integer", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such book", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No catalog replica could answer in time", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "No answer within the request timeout", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn lookup(State(fe): State<AppState>, Segment(id): Segment) -> Result<Response, ApiError> {
    let start = Instant::now();
    let res = lookup_once(&fe, &id).await;
    if res.is_ok() {
        web::count_lookup(&fe, start.elapsed());
    }
    res
}

async fn lookup_once(fe: &Frontend, id: &str) -> Result<Response, ApiError> {
    let id = BookId::parse(id)?;
    if let Some(json) = fe.cache.lookup_json(id) {
        let content_type = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )];
        return Ok((content_type, json).into_response());
    }
    let ticket = fe.cache.ticket(Some(id));
    let min = ticket.min_version;
    let res = Arc::new(
        fe.lookups
            .get(id, min)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no book with id {id}")))?,
    );
    fe.cache.fill_book(ticket, res.clone());
    Ok(Json(res).into_response())
}

fn request_id(headers: &HeaderMap) -> Result<RequestId, ApiError> {
    let mut keys = headers.get_all("idempotency-key").iter();
    match (keys.next(), keys.next()) {
        (None, _) => Ok(RequestId::mint()),
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give at most one Idempotency-Key header",
        )),
        (Some(k), None) => {
            let k = k
                .to_str()
                .map_err(|_| ApiError::bad_request("Idempotency-Key must be printable ASCII"))?;
            Ok(RequestId::from_idempotency_key(k)?)
        }
    }
}

#[utoipa::path(
    post,
    path = "/buy/{id}",
    tag = "store",
    summary = "Buy one copy of a book",
    params(
        ("id" = u64, Path, description = "The book's id", minimum = 1, maximum = 9223372036854775807_u64, example = 1),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key get the first answer and buy nothing more. Two requests with the same key at the same time buy once: both get the first answer",  min_length = 1, max_length = 128, pattern = r"^[!-~]+$"),
    ),
    responses(
        (status = 200, description = "Bought", body = BuyResponse),
        (status = 400, description = "The id or the Idempotency-Key is malformed, or the request has a body", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The request body is over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such book", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Out of stock (`type` /problems/out-of-stock); or, rarely, the request waited inside the cluster past its answer window and was refused unapplied (an earlier attempt may have bought: look for the order before buying again)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The Idempotency-Key was already used for a different request (`type` /problems/idempotency-key-reused); nothing was bought", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No replica could complete the purchase in time; retry with the same Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "No answer within the request timeout; retry with the same Idempotency-Key", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn buy(
    State(fe): State<AppState>,
    headers: HeaderMap,
    Segment(id): Segment,
    body: axum::body::Bytes,
) -> Result<Json<BuyResponse>, ApiError> {
    let answer = buy_once(&fe, &headers, &id, &body).await;
    web::count_buy(
        &fe,
        answer
            .as_ref()
            .map_or_else(|e| e.status, |_| StatusCode::OK),
    );
    crate::metrics::buy(match &answer {
        Ok(_) => "bought",
        Err(e) if e.kind == h::PROBLEM_OUT_OF_STOCK => "out_of_stock",
        Err(e) if e.kind == h::PROBLEM_KEY_REUSED => "key_reused",
        Err(e) if e.status == StatusCode::NOT_FOUND => "not_found",
        Err(e) if e.status.is_client_error() => "invalid",
        Err(_) => "failed",
    });
    if let Err(e) = &answer {
        tracing::debug!(status = e.status.as_u16(), "buy refused: {}", e.message);
    } else {
        tracing::debug!("buy answered");
    }
    answer
}

async fn buy_once(
    fe: &Frontend,
    headers: &HeaderMap,
    id: &str,
    body: &[u8],
) -> Result<Json<BuyResponse>, ApiError> {
    // The whole request has arrived (see `http::finish`); a buy carries
    // nothing in its body, so anything there is a mistaken request.
    if !body.is_empty() {
        return Err(ApiError::bad_request(
            "POST /buy/{id} takes no body: send the book id in the path only",
        ));
    }
    let id = BookId::parse(id)?;
    let request_id = request_id(headers)?;
    // A minted id has been nowhere before its first attempt: the order
    // replica need not look for it in its log. Every later attempt (the
    // first may have reached a replica) and every client key does
    // (`batch::Buys`).
    let req = OrderBuyRequest {
        book_id: id,
        fresh: request_id.minted_at().is_some(),
        request_id,
    };
    let result = fe.buys.buy(req).await?;
    match result.outcome {
        Outcome::Bought {
            book_id,
            title,
            price,
            order_id,
        } if book_id == id => {
            fe.cache.note_write(id, result.version);
            Ok(Json(BuyResponse {
                message: format!("successfully purchased the book {title}"),
                order_id,
                book_id,
                title,
                price,
                version: result.version,
            }))
        }
        Outcome::OutOfStock { book_id, title } if book_id == id => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the book {title} is out of stock"),
        )
        .kind(h::PROBLEM_OUT_OF_STOCK)),
        // The IETF idempotency-key draft: a key reused with another payload is 422.
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was already used for a different request",
        )
        .kind(h::PROBLEM_KEY_REUSED)),
    }
}

async fn invalidate(
    State(fe): State<AppState>,
    JsonBody(batch): JsonBody<InvalidationBatch>,
) -> Json<Health> {
    fe.cache.invalidate(&batch);
    Json(Health {
        message: "OK".into(),
    })
}

async fn cache_stats(State(fe): State<AppState>) -> Json<CacheStats> {
    Json(fe.cache.stats())
}
