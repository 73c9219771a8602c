//! Logs and request ids.
//!
//! * `RUST_LOG` filters (default `info`); one line per event, as text or,
//!   with `--log-format json` / `PYGMY_LOG_FORMAT=json`, one JSON object.
//! * Every line of a node carries its name (`node`).
//! * Every request gets an id: the frontend mints one (or keeps a sane
//!   incoming `x-request-id`), sends it on to order and catalog in the same
//!   header, answers with it, and every line logged while handling the
//!   request carries it, as if in a `request` span with `request_id`,
//!   `method` and `path` (text: `request{request_id=… method=… path=…}:`
//!   after the level; JSON: a `spans` list holding that span). No span is
//!   made per request: the request's context is a task-local, and the event
//!   format writes it only for the lines that are logged (a `tracing` span
//!   per request formatted its fields on every request, logged or not: 6 %
//!   of the frontend's CPU serving cached lookups).
//! * Colours only on a terminal, and never when `NO_COLOR` is set.

use std::fmt;

use axum::extract::Request;
use axum::http::{HeaderValue, Method, Uri};
use axum::response::Response;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

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

/// The request a task is handling: what its log lines carry.
#[derive(Clone)]
struct RequestContext {
    id: String,
    method: Method,
    uri: Uri,
}

tokio::task_local! {
    static REQUEST: RequestContext;
}

/// The id of the request the current task is handling, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST.try_with(|r| r.id.clone()).ok()
}

/// `fut` as part of the current request (if any), for a task spawned to
/// finish the request's work: its lines and its calls carry the request's id.
pub fn carry<F: std::future::Future>(fut: F) -> impl std::future::Future<Output = F::Output> {
    let context = REQUEST.try_with(RequestContext::clone).ok();
    async move {
        match context {
            Some(c) => REQUEST.scope(c, fut).await,
            None => fut.await,
        }
    }
}

/// The current request as text, `request{request_id=… method=… path=…}`,
/// bold when `ansi`; `None` outside a request.
fn request_text(ansi: bool) -> Option<String> {
    REQUEST
        .try_with(|r| {
            let (b, i, off) = match ansi {
                true => ("\x1b[1m", "\x1b[3m", "\x1b[0m"),
                false => ("", "", ""),
            };
            let field = |name: &str, value: &dyn fmt::Display| format!("{i}{name}{off}={value}");
            format!(
                "{b}request{{{off}{} {} {}{b}}}{off}",
                field("request_id", &r.id),
                field("method", &r.method),
                field("path", &r.uri.path()),
            )
        })
        .ok()
}

/// The current request as the JSON formatter lists a span; `None` outside
/// a request.
fn request_json() -> Option<serde_json::Value> {
    REQUEST
        .try_with(|r| {
            serde_json::json!({
                "request_id": r.id,
                "method": r.method.as_str(),
                "path": r.uri.path(),
                "name": "request",
            })
        })
        .ok()
}

/// Puts `request: ` into a text line after its level (`INFO`, say, with
/// any colour codes around it), where a span's name and fields go.
fn with_request(line: &str, level: &tracing::Level, request: &str, ansi: bool) -> String {
    let colon = if ansi { "\x1b[2m:\x1b[0m" } else { ":" };
    let at = line
        .find(level.as_str())
        .and_then(|l| line[l..].find(' ').map(|sp| l + sp + 1));
    match at {
        Some(at) => format!("{}{request}{colon} {}", &line[..at], &line[at..]),
        None => line.to_owned(),
    }
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
    let node = node.map(str::to_owned);
    let _ = subscriber(filter, node, format, ansi, std::io::stderr).try_init();
}

/// The subscriber [`init`] installs, writing to `writer`.
fn subscriber<W>(
    filter: EnvFilter,
    node: Option<String>,
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(
            builder
                .event_format(Tagged {
                    node,
                    json: false,
                    // Its own colour setting too: a line with a request is
                    // formatted into a string first (see `format_event`).
                    inner: format::Format::default().with_target(false).with_ansi(ansi),
                })
                .finish(),
        ),
        LogFormat::Json => Box::new(
            builder
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
                .finish(),
        ),
    }
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
        if !self.json {
            if let Some(node) = &self.node {
                write!(writer, "node={node} ")?;
            }
            let ansi = writer.has_ansi_escapes();
            let Some(request) = request_text(ansi) else {
                return self.inner.format_event(ctx, writer, event);
            };
            let mut line = String::new();
            self.inner
                .format_event(ctx, Writer::new(&mut line), event)?;
            let level = event.metadata().level();
            return writer.write_str(&with_request(&line, level, &request, ansi));
        }
        let request = request_json();
        if self.node.is_none() && request.is_none() {
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The inner line is `{...}\n`: the node goes first, the request's
        // span list last.
        let mut line = line.as_str();
        if let Some(node) = &self.node {
            let Some(rest) = line.strip_prefix('{') else {
                return writer.write_str(line);
            };
            let node = serde_json::to_string(node).map_err(|_| fmt::Error)?;
            write!(writer, "{{\"node\":{node},")?;
            line = rest;
        } else if request.is_some() {
            writer.write_char('{')?;
            line = line.strip_prefix('{').unwrap_or(line);
        }
        match (request, line.trim_end().strip_suffix('}')) {
            (Some(r), Some(body)) => {
                let sep = if body.trim().is_empty() { "" } else { "," };
                writeln!(writer, "{body}{sep}\"spans\":[{r}]}}")
            }
            _ => writer.write_str(line),
        }
    }
}

/// An incoming request id worth keeping: 1–64 visible ASCII characters.
fn incoming_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    sane_request_id(s).then(|| s.to_owned())
}

/// Whether `s` may be taken as a request id from outside: 1 to 64
/// printable ASCII characters.
pub fn sane_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// `work` as part of request `id`, one item of a batch that came in the
/// current request: its lines carry that id (with the batch's method and
/// path), and the calls it makes send it on. The context is taken now, so
/// the future may be spawned.
pub fn in_request<F: std::future::Future>(
    id: String,
    work: F,
) -> impl std::future::Future<Output = F::Output> {
    let context = REQUEST
        .try_with(|r| RequestContext {
            id: id.clone(),
            method: r.method.clone(),
            uri: r.uri.clone(),
        })
        .unwrap_or_else(|_| RequestContext {
            id,
            method: Method::POST,
            uri: Uri::from_static("/"),
        });
    REQUEST.scope(context, work)
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
    let context = RequestContext {
        id: id.clone(),
        method: req.method().clone(),
        uri: req.uri().clone(),
    };
    let mut res = REQUEST.scope(context, run(req)).await;
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

    /// The lines `format` writes for one warning logged inside a request
    /// (`in_request`) or outside any.
    fn logged(json: bool, ansi: bool, in_request: bool) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let format = if json {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
        let subscriber = subscriber(
            EnvFilter::new("info"),
            Some("frontend".to_string()),
            format,
            ansi,
            move || out.clone(),
        );
        tracing::subscriber::with_default(subscriber, || {
            let log = || tracing::warn!(book = 3, "slow \"disk\"");
            match in_request {
                true => REQUEST.sync_scope(
                    RequestContext {
                        id: "id-7".into(),
                        method: Method::POST,
                        uri: "/buy/3?x=1".parse().unwrap(),
                    },
                    log,
                ),
                false => log(),
            }
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_line_logged_in_a_request_names_it_after_its_level() {
        let line = logged(false, false, true);
        assert!(line.starts_with("node=frontend "), "{line}");
        assert!(
            line.ends_with(
                "  WARN request{request_id=id-7 method=POST path=/buy/3}: slow \"disk\" book=3\n"
            ),
            "{line}"
        );
        let plain = logged(false, false, false);
        assert!(plain.ends_with("  WARN slow \"disk\" book=3\n"), "{plain}");
        // In colour, after the level's colour codes, and still one line.
        let coloured = logged(false, true, true);
        assert!(coloured.contains("\x1b["), "{coloured:?}");
        let bare = strip_ansi(&coloured);
        assert!(
            bare.ends_with(
                "  WARN request{request_id=id-7 method=POST path=/buy/3}: slow \"disk\" book=3\n"
            ),
            "{bare:?}"
        );
        assert_eq!(coloured.lines().count(), 1, "{coloured:?}");
    }

    #[test]
    fn a_json_line_logged_in_a_request_lists_it_as_a_span() {
        let v: serde_json::Value = serde_json::from_str(&logged(true, false, true)).unwrap();
        assert_eq!(v["node"], "frontend");
        assert_eq!(v["message"], "slow \"disk\"");
        assert_eq!(v["book"], 3);
        assert_eq!(
            v["spans"],
            serde_json::json!([{"name": "request", "request_id": "id-7", "method": "POST", "path": "/buy/3"}])
        );
        let line = logged(true, false, false);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["node"], "frontend");
        assert!(v.get("spans").is_none(), "{line}");
        assert_eq!(line.lines().count(), 1, "{line}");
    }

    #[tokio::test]
    async fn a_task_spawned_with_carry_is_part_of_the_request() {
        let context = || RequestContext {
            id: "id-9".into(),
            method: Method::PUT,
            uri: "/catalog/update".parse().unwrap(),
        };
        let carried = REQUEST
            .scope(context(), async {
                tokio::spawn(carry(async { current_request_id() }))
                    .await
                    .unwrap()
            })
            .await;
        assert_eq!(carried.as_deref(), Some("id-9"));
        // A task spawned without it is not.
        let bare = REQUEST
            .scope(context(), async {
                tokio::spawn(async { current_request_id() }).await.unwrap()
            })
            .await;
        assert_eq!(bare, None);
        // Outside a request, it changes nothing.
        assert_eq!(carry(async { current_request_id() }).await, None);
    }

    fn strip_ansi(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
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
