//! Replication messages between catalog replicas, on one long-lived
//! connection per peer and direction.
//!
//! A message used to be one `POST /internal/replication`: a request and an
//! answer (`200 OK`, which says nothing the core uses) per batch, through
//! the router and the admission middleware each time. Now a sender opens
//! `GET /internal/replication/stream?from=ID` once, with the cluster token
//! and `Upgrade: pygmy-replication`; after `101 Switching Protocols` the
//! connection carries frames one way: a batch's length (4 bytes,
//! big-endian), then the batch as the JSON a `POST` carries. TLS, the token
//! and the port are the HTTP server's, as before.
//!
//! Messages may be lost either way, as before (the core retries): a frame
//! that cannot be written in time ends the stream, and the batches that
//! follow go by `POST` until a new stream opens (tried again on the next
//! batch, then at most once per [`REOPEN_AFTER`] while opening fails). The
//! receiver keeps one stream per peer: a newer one from the same peer ends
//! the older. It reads frames until the sender closes, the replica stops, or
//! a frame is not one it accepts (too large, not a batch, from another
//! sender): then it closes the stream, and nothing of that frame is used.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{AppState, MAX_REPLICATION_BODY};
use crate::api::ReplicationBatch;
use crate::client::Http;
use crate::http::{ApiError, QueryArgs};
use crate::replication::{Message, NodeId};

/// The route a stream is opened on.
pub const PATH: &str = "/internal/replication/stream";
/// The protocol named in `Upgrade`.
pub const PROTOCOL: &str = "pygmy-replication";
/// After a stream could not be opened, batches go by `POST` for this long
/// before the next try.
pub const REOPEN_AFTER: Duration = Duration::from_secs(1);
/// A frame, once its length has come, must come whole within this.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Most messages sent in one frame (or one `POST`).
const MAX_BATCH: usize = 1024;

/// One frame: the batch's JSON, after its length.
pub fn encode(batch: &ReplicationBatch) -> Vec<u8> {
    let mut frame = vec![0u8; 4];
    serde_json::to_writer(&mut frame, batch).expect("wire types serialise");
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// Reads one frame. `Ok(None)`: the sender closed the stream between two
/// frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<ReplicationBatch>, String> {
    let mut len = [0u8; 4];
    match io.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("reading a frame: {e}")),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(format!("a frame of {len} bytes, past the limit of {max}"));
    }
    // Grown as the bytes come, not taken whole on the length's word.
    let mut body = Vec::with_capacity(len.min(64 << 10));
    let mut rest = (&mut *io).take(len as u64);
    match tokio::time::timeout(FRAME_TIMEOUT, rest.read_to_end(&mut body)).await {
        Ok(Ok(n)) if n == len => {}
        Ok(Ok(n)) => return Err(format!("reading a frame of {len} bytes: closed after {n}")),
        Ok(Err(e)) => return Err(format!("reading a frame of {len} bytes: {e}")),
        Err(_) => {
            return Err(format!(
                "a frame of {len} bytes not read within {FRAME_TIMEOUT:?}"
            ));
        }
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| format!("a frame that is not a replication batch: {e}"))
}

/// Sends what the core queues for one peer: each time, everything queued
/// as one batch, on the stream while it is open, else by `POST`.
pub async fn send_to(
    me: NodeId,
    base_url: String,
    mut queue: mpsc::UnboundedReceiver<Message>,
    http: Http,
    timeout: Duration,
) {
    let post = crate::client::Route::new(&base_url, "/internal/replication");
    let stream_url = format!("{base_url}{PATH}?from={me}");
    let mut stream: Option<Open> = None;
    let mut reopen_at = Instant::now();
    loop {
        let first = match &mut stream {
            Some(open) => tokio::select! {
                m = queue.recv() => m,
                why = open.closed() => {
                    tracing::debug!(peer = %base_url, "replication stream closed: {why}");
                    stream = None;
                    continue;
                }
            },
            None => queue.recv().await,
        };
        let Some(first) = first else { return };
        let mut messages = vec![first];
        while messages.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let batch = ReplicationBatch { from: me, messages };
        if stream.is_none() && Instant::now() >= reopen_at {
            match tokio::time::timeout(timeout, http.upgrade(stream_url.clone(), PROTOCOL)).await {
                Ok(Ok(io)) => stream = Some(Open::new(io)),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %base_url, error = %e, "no replication stream; sending by POST");
                    reopen_at = Instant::now() + REOPEN_AFTER;
                }
                Err(_) => reopen_at = Instant::now() + REOPEN_AFTER,
            }
        }
        if let Some(open) = &mut stream {
            let frame = encode(&batch);
            if frame.len() - 4 <= MAX_REPLICATION_BODY {
                if let Err(why) = open.write(&frame, timeout).await {
                    // Lost, as a message may be; the next batch opens a new stream.
                    tracing::debug!(peer = %base_url, "replication stream ended: {why}");
                    stream = None;
                }
                continue;
            }
        }
        let call = http.call_route::<_, serde_json::Value>(
            reqwest::Method::POST,
            &post,
            Some(&batch),
            &[],
        );
        let _ = tokio::time::timeout(timeout, call).await;
    }
}

/// An open stream, as its sender holds it.
struct Open {
    read: tokio::io::ReadHalf<reqwest::Upgraded>,
    write: tokio::io::WriteHalf<reqwest::Upgraded>,
}

impl Open {
    fn new(io: reqwest::Upgraded) -> Self {
        let (read, write) = tokio::io::split(io);
        Self { read, write }
    }

    async fn write(&mut self, frame: &[u8], timeout: Duration) -> Result<(), String> {
        let sent = async {
            self.write.write_all(frame).await?;
            self.write.flush().await
        };
        match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("a frame not written within {timeout:?}")),
        }
    }

    /// Resolves when the receiver closed the stream (it never writes on it).
    async fn closed(&mut self) -> String {
        let mut byte = [0u8; 1];
        match self.read.read(&mut byte).await {
            Ok(0) => "closed by the receiver".into(),
            Ok(_) => "the receiver wrote on it".into(),
            Err(e) => e.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamArgs {
    from: NodeId,
}

/// `GET /internal/replication/stream?from=ID`: switches the connection to
/// the replication stream of peer `ID`.
pub(super) async fn accept(
    State(c): State<AppState>,
    QueryArgs(args): QueryArgs<StreamArgs>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let wants = |name: header::HeaderName, value: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(value))
            })
        })
    };
    if !(wants(header::CONNECTION, "upgrade") && wants(header::UPGRADE, PROTOCOL)) {
        let mut refusal = ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            format!("this route switches to {PROTOCOL}: send `Connection: upgrade` and `Upgrade: {PROTOCOL}`"),
        )
        .into_response();
        refusal
            .headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
        return Ok(refusal);
    }
    let from = args.from;
    if !c.names.contains_key(&from) || from == c.process_id {
        return Err(ApiError::bad_request(format!("unknown sender {from}")));
    }
    let Some(newest) = c.streams.get(&from) else {
        return Err(ApiError::bad_request(format!("unknown sender {from}")));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let mut generation = 0;
    newest.send_modify(|g| {
        *g += 1;
        generation = *g;
    });
    tokio::spawn(async move {
        let io = match tokio::time::timeout(Duration::from_secs(5), upgrade).await {
            Ok(Ok(io)) => io,
            _ => return,
        };
        let why = receive(&c, from, generation, hyper_util::rt::TokioIo::new(io)).await;
        tracing::debug!(from = %c.name_of(from), "replication stream ended: {why}");
    });
    let mut switched = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = switched.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
    Ok(switched)
}

/// Reads peer `from`'s frames until the stream ends; says why it ended.
async fn receive<R: AsyncRead + Unpin>(
    c: &AppState,
    from: NodeId,
    generation: u64,
    mut io: R,
) -> String {
    let mut stopping = c.stopping.subscribe();
    let mut newest = c.streams[&from].subscribe();
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut io, MAX_REPLICATION_BODY) => f,
            _ = stopping.wait_for(|s| *s) => return "this replica stops".into(),
            _ = newest.wait_for(|g| *g != generation) => {
                return "a newer stream from the same peer".into();
            }
        };
        let batch = match frame {
            Ok(Some(b)) => b,
            Ok(None) => return "closed by the sender".into(),
            Err(e) => {
                tracing::warn!(from = %c.name_of(from), "closing a replication stream: {e}");
                return e;
            }
        };
        if batch.from != from {
            tracing::warn!(
                from = %c.name_of(from),
                "closing a replication stream: a frame from {} on the stream of {from}",
                batch.from
            );
            return format!("a frame from {} on the stream of {from}", batch.from);
        }
        crate::metrics::replication_frame();
        for msg in batch.messages {
            // Refused (still starting, or overloaded): lost, as a refused
            // POST's messages are.
            if c.send(super::Input::Net { from, msg }).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Body;
    use axum::Router;
    use axum::routing::{get, post};

    fn message(epoch: u64) -> Message {
        Message {
            epoch,
            inc: 1,
            body: Body::TimeoutNow,
        }
    }

    /// A peer on a real socket: what it received, and how (`"post"` or
    /// `"stream"`). With `streams`, it takes streams, closing each after
    /// its first frame; without, it is a replica of before streams.
    /// A sender (replica 7) to the peer at `url`: what is queued goes there.
    fn sender(url: String) -> mpsc::UnboundedSender<Message> {
        let (q, queue) = mpsc::unbounded_channel();
        let http = Http::with_tls(None, Duration::from_secs(2), None);
        tokio::spawn(send_to(7, url, queue, http, Duration::from_secs(2)));
        q
    }

    async fn peer(streams: bool) -> (String, mpsc::UnboundedReceiver<(&'static str, Vec<u64>)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let epochs = |b: &ReplicationBatch| b.messages.iter().map(|m| m.epoch).collect::<Vec<_>>();
        let posted = tx.clone();
        let mut app = Router::new().route(
            "/internal/replication",
            post(move |axum::Json(b): axum::Json<ReplicationBatch>| {
                let _ = posted.send(("post", epochs(&b)));
                async { axum::Json(serde_json::json!({"message": "OK"})) }
            }),
        );
        if streams {
            app = app.route(
                PATH,
                get(move |mut req: Request| {
                    let tx = tx.clone();
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = hyper_util::rt::TokioIo::new(upgrade.await.unwrap());
                        if let Ok(Some(b)) = read_frame(&mut io, 1 << 20).await {
                            let _ = tx.send(("stream", epochs(&b)));
                        }
                    });
                    async {
                        let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
                        r.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        r.headers_mut()
                            .insert(header::UPGRADE, HeaderValue::from_static(PROTOCOL));
                        r
                    }
                }),
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, rx)
    }

    async fn next(
        rx: &mut mpsc::UnboundedReceiver<(&'static str, Vec<u64>)>,
    ) -> (&'static str, Vec<u64>) {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the peer receives within 10 s")
            .expect("the peer runs")
    }

    /// Batches go on a stream; once the receiver closes it, a new one is
    /// opened (the message written while the close was on its way is lost,
    /// as a message may be; the core sends again).
    #[tokio::test]
    async fn batches_go_on_a_stream_and_a_closed_stream_is_opened_again() {
        let (url, mut got) = peer(true).await;
        let q = sender(url);
        // The peer closes each stream after one frame: three frames are
        // three streams.
        let mut frames = 0;
        for epoch in 1..=100 {
            q.send(message(epoch)).unwrap();
            if let Ok(Some((how, _))) =
                tokio::time::timeout(Duration::from_millis(500), got.recv()).await
            {
                assert_eq!(how, "stream", "epoch {epoch}");
                frames += 1;
                if frames == 3 {
                    return;
                }
            }
        }
        panic!("{frames} frames in 100 sends: a closed stream was not opened again");
    }

    /// A peer that does not know streams (a replica of an older version)
    /// gets every batch by POST.
    #[tokio::test]
    async fn a_peer_without_streams_gets_its_batches_by_post() {
        let (url, mut got) = peer(false).await;
        let q = sender(url);
        for epoch in 1..=3 {
            q.send(message(epoch)).unwrap();
            assert_eq!(next(&mut got).await, ("post", vec![epoch]));
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_a_bad_one_is_refused_whole() {
        let batch = ReplicationBatch {
            from: 7,
            messages: Vec::new(),
        };
        let mut wire = encode(&batch);
        wire.extend(encode(&ReplicationBatch {
            from: 8,
            messages: Vec::new(),
        }));
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r, 1024).await.unwrap().unwrap().from, 7);
        assert_eq!(read_frame(&mut r, 1024).await.unwrap().unwrap().from, 8);
        assert!(
            read_frame(&mut r, 1024).await.unwrap().is_none(),
            "closed between frames"
        );

        // Past the limit: refused before reading the body.
        let big = encode(&batch);
        let err = read_frame(&mut &big[..], big.len() - 5).await.unwrap_err();
        assert!(err.contains("past the limit"), "{err}");
        // Cut inside a frame.
        let err = read_frame(&mut &big[..big.len() - 1], 1024)
            .await
            .unwrap_err();
        assert!(err.contains("closed after"), "{err}");
        // Not a batch.
        let mut junk = 3u32.to_be_bytes().to_vec();
        junk.extend(b"{x}");
        let err = read_frame(&mut &junk[..], 1024).await.unwrap_err();
        assert!(err.contains("not a replication batch"), "{err}");
    }
}
