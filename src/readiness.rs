//! `GET /readyz` on every node: "ready to serve", as distinct from
//! `/healthcheck` ("the process is up"). A catalog replica is ready when it
//! knows a primary and may serve reads or forward writes; an order replica
//! when it reaches a catalog replica; the frontend when it reaches a catalog
//! and an order replica. A node that is not ready answers 503 saying why.

use std::future::Future;
use std::time::Duration;

use axum::Json;

use crate::api::Health;
use crate::http::ApiError;

/// How long a readiness probe waits for the replicas it depends on.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// The answer of `/readyz`: 200 `{"message": "ready"}`, or 503 with the reason.
pub fn answer(not_ready: Option<String>) -> Result<Json<Health>, ApiError> {
    match not_ready {
        None => Ok(Json(Health {
            message: "ready".into(),
        })),
        Some(why) => Err(ApiError::unavailable(format!("not ready: {why}"))),
    }
}

/// Whether any of `probes` answers true within [`PROBE_TIMEOUT`]; they run
/// concurrently and the first success ends the wait.
pub async fn any<F>(probes: impl IntoIterator<Item = F>) -> bool
where
    F: Future<Output = bool> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for p in probes {
        set.spawn(p);
    }
    let first = async {
        while let Some(r) = set.join_next().await {
            if matches!(r, Ok(true)) {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(PROBE_TIMEOUT, first)
        .await
        .unwrap_or(false)
}
