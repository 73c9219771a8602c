//! The public API's OpenAPI document, generated from the handlers and wire
//! types, served at `GET /openapi.json`.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;

use crate::api::{
    BuyResponse, Health, LookupResponse, Problem, SearchResponse, TopicsResponse, Version,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pygmy",
        description = "Pygmy.com, the world's smallest bookstore: search, lookup and buy. Errors are RFC 9457 problem details (application/problem+json: type, title, status, detail) with an honest status code; `message` repeats `detail` for the original's clients. Every answer carries an x-request-id header.",
    ),
    paths(super::search, super::lookup, super::buy, super::web::topics, crate::http::healthcheck),
    components(schemas(SearchResponse, LookupResponse, BuyResponse, TopicsResponse, Problem, Health, Version)),
    tags((name = "store", description = "The bookstore"), (name = "operations", description = "Operating the store"))
)]
pub struct ApiDoc;

/// The document as JSON (built once).
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serialises")
    })
}

pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}
