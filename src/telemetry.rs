//! Logs and request ids.
//!
//! * `RUST_LOG` filters (default `info`); one line per event, as text or,
//!   with `--log-format json` / `PYGMY_LOG_FORMAT=json`, one JSON object.
//! * Every line of a node carries its name (`node`).
//! * Every request gets an id: the frontend mints one (or keeps a sane
//!   incoming `x-request-id`), sends it on to order and catalog in the same
//!   header, answers with it, and every line logged while handling the
//!   request carries it (a `request` span with `request_id`).
//! * Colours only on a terminal, and never when `NO_COLOR` is set.

use std::fmt;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::response::Response;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// The request id header, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request the current task is handling, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// Whether logs may use colours: a terminal, and `NO_COLOR` unset or empty.
pub fn use_colour(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber, tagging every line with `node` when given.
pub fn init(node: Option<&str>, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,reqwest=warn"));
    let ansi = format == LogFormat::Text
        && use_colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let node = node.map(str::to_owned);
    let _ = match format {
        LogFormat::Text => builder
            .event_format(Tagged {
                node,
                json: false,
                inner: format::Format::default().with_target(false),
            })
            .try_init(),
        LogFormat::Json => builder
            .event_format(Tagged {
                node,
                json: true,
                inner: format::Format::default()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true),
            })
            .fmt_fields(format::JsonFields::new())
            .try_init(),
    };
}

/// An event format that adds the node's name to every line.
struct Tagged<F> {
    node: Option<String>,
    json: bool,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Tagged<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let Some(node) = &self.node else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "node={node} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The inner line is `{...}\n`: add the node as the first member.
        let node = serde_json::to_string(node).map_err(|_| fmt::Error)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"node\":{node},{rest}"),
            None => writer.write_str(&line),
        }
    }
}

/// An incoming request id worth keeping: 1–64 visible ASCII characters.
fn incoming_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| s.to_owned())
}

/// A new request id: a random (version 4) UUID, in hex. Its bits come
/// from a per-thread generator (seeded once per thread from the system's
/// randomness), not a system call per request: an id correlates logs, it
/// guards nothing.
fn mint_id() -> String {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
        .into_uuid()
        .simple()
        .to_string()
}

/// Gives the request an id, runs `run` (which answers it) inside a
/// `request` span and the task-local the typed clients read, and answers
/// with the id.
pub async fn with_request_id<F, Fut>(req: Request, run: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let mut ids = req.headers().get_all(REQUEST_ID_HEADER).iter();
    let id = match (ids.next(), ids.next()) {
        (Some(v), None) => incoming_id(v),
        _ => None,
    }
    .unwrap_or_else(mint_id);
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut res = REQUEST_ID
        .scope(id.clone(), run(req).instrument(span))
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_turns_colours_off() {
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None));
        assert!(!use_colour(true, Some("1".into())));
        assert!(
            use_colour(true, Some("".into())),
            "an empty NO_COLOR does not count"
        );
    }

    #[test]
    fn minted_ids_are_version_4_uuids_and_differ() {
        let (a, b) = (mint_id(), mint_id());
        assert_ne!(a, b);
        for id in [a, b] {
            let u = uuid::Uuid::parse_str(&id).unwrap();
            assert_eq!(u.get_version_num(), 4, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert!(incoming_id(&HeaderValue::from_str(&id).unwrap()).is_some());
        }
    }

    #[test]
    fn only_sane_incoming_ids_are_kept() {
        assert_eq!(
            incoming_id(&HeaderValue::from_static("abc-123")),
            Some("abc-123".into())
        );
        assert_eq!(incoming_id(&HeaderValue::from_static("a b")), None);
        assert_eq!(
            incoming_id(&HeaderValue::from_str(&"x".repeat(65)).unwrap()),
            None
        );
    }
}
