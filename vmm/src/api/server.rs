//! The API thread: HTTP/1.1 on a Unix socket (hyper on a single-threaded tokio runtime).
//! It parses each request, hands it to the VMM thread over a channel (waking the event loop
//! through an EventFd) and writes back the answer. It never touches the VM itself, so it
//! never blocks on a vCPU.
//!
//! A client may be slow, stalled or hostile, so every connection is served on its own task
//! within limits (`ApiLimits`): a request's head must arrive within the read timeout (an
//! idle keep-alive connection is closed after it too) and fit the header limits (else 431),
//! its body must arrive within the read timeout and fit the payload limit (else 400), and
//! connections beyond the connection limit are closed at once. One stalled client never
//! holds up another's request.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::sync::{oneshot, Semaphore};
use vmm_sys_util::eventfd::EventFd;

use super::request::{parse, ApiRequest};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API thread's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("the API thread ended before it could serve")]
    Gone,
    #[error("cannot start the API thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot duplicate the API wake-up event: {0}")]
    EventFd(std::io::Error),
}

/// What the VMM thread answers.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

impl ApiResponse {
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    pub fn ok(body: serde_json::Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    pub fn fault(message: impl std::fmt::Display) -> Self {
        Self {
            status: 400,
            body: Some(json!({ "fault_message": message.to_string() })),
        }
    }

    /// A fault with another status than 400 (Firecracker's 413 for a too-large MMDS).
    pub fn fault_with(status: u16, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            body: Some(json!({ "fault_message": message.to_string() })),
        }
    }
}

/// One request on its way to the VMM thread.
pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: oneshot::Sender<ApiResponse>,
}

/// The VMM thread's end: requests, and the event that says one is waiting.
pub struct ApiInbox {
    pub requests: Receiver<ApiMessage>,
    pub wake: EventFd,
}

/// What a client may send and hold.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Largest request body (Firecracker's `--http-api-max-payload-size`).
    pub max_payload: usize,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Bytes a request's head may take (hyper's read buffer; at least 8 KiB).
    pub max_head_bytes: usize,
    /// Header lines a request may have.
    pub max_headers: usize,
    /// Time a client has to send a request's head (or, idle, the next one) and its body.
    pub read_timeout: Duration,
}

impl ApiLimits {
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            max_connections: 16,
            max_head_bytes: 16 << 10,
            max_headers: 32,
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// What every connection's task shares.
struct Shared {
    limits: ApiLimits,
    to_vmm: Sender<ApiMessage>,
    wake: EventFd,
}

fn response(answer: &ApiResponse) -> hyper::Response<Full<Bytes>> {
    let m = &crate::metrics::metrics().api_server;
    m.requests.inc();
    if answer.status >= 400 {
        m.faults.inc();
    }
    let body = answer
        .body
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let mut http = hyper::Response::new(Full::new(Bytes::from(body)));
    *http.status_mut() = hyper::StatusCode::from_u16(answer.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if answer.body.is_some() {
        http.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    http
}

fn shutting_down(message: &str) -> ApiResponse {
    ApiResponse {
        status: 500,
        body: Some(json!({ "fault_message": message })),
    }
}

/// Reads the whole body within the payload limit and the read timeout.
async fn read_body(request: hyper::Request<Incoming>, limits: ApiLimits) -> Result<Bytes, String> {
    let max = limits.max_payload;
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > max as u64) {
        return Err(format!(
            "Request payload with size {len} is larger than the limit of {max} allowed by server."
        ));
    }
    let collect = Limited::new(request.into_body(), max).collect();
    match tokio::time::timeout(limits.read_timeout, collect).await {
        Err(_) => Err(format!(
            "The request body did not arrive within {} s.",
            limits.read_timeout.as_secs()
        )),
        Ok(Err(_)) => Err("The request body could not be read or is too large.".into()),
        Ok(Ok(body)) => Ok(body.to_bytes()),
    }
}

async fn handle(
    request: hyper::Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = request.method().as_str().to_string();
    let path = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_string(),
        |p| p.as_str().to_string(),
    );
    let body = match read_body(request, shared.limits).await {
        Ok(body) => body,
        Err(fault) => {
            // The rest of a body that was refused may still be on its way: close.
            let mut answer = response(&ApiResponse::fault(fault));
            answer.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            return Ok(answer);
        }
    };
    let api_request = match parse(&method, &path, &body) {
        Ok(r) => r,
        Err(e) => return Ok(response(&ApiResponse::fault(e))),
    };
    log::info!("API: {method} {path}");
    let (reply, answer) = oneshot::channel();
    let sent = shared.to_vmm.send(ApiMessage {
        request: api_request,
        reply,
    });
    let answer = if sent.is_err() || shared.wake.write(1).is_err() {
        shutting_down("The VMM is shutting down.")
    } else {
        answer
            .await
            .unwrap_or_else(|_| shutting_down("The VMM stopped before answering."))
    };
    Ok(response(&answer))
}

async fn serve(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    let limits = shared.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: let some connections end first.
                log::warn!("API: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log::warn!(
                "API: {} connections open, the limit: a new one is closed",
                limits.max_connections
            );
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(request, shared.clone()));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.read_timeout)
                .max_buf_size(limits.max_head_bytes)
                .max_headers(limits.max_headers)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                log::debug!("API: connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// Binds the socket and starts the API thread. A socket file nobody listens on (left by a
/// VMM that was killed) is replaced; a live one is an error.
pub fn start(path: &Path, limits: ApiLimits) -> Result<(ApiInbox, JoinHandle<()>), ServerError> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ServerError::Runtime)?;
    let (to_vmm, requests) = channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::EventFd)?;
    let shared = Arc::new(Shared {
        limits,
        to_vmm,
        wake: wake.try_clone().map_err(ServerError::EventFd)?,
    });
    let (ready, filtered) = channel();
    let handle = std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || {
            let applied = crate::seccomp::apply(crate::seccomp::ThreadKind::Api);
            let ok = applied.is_ok();
            let _ = ready.send(applied);
            if !ok {
                return;
            }
            runtime.block_on(async move {
                match tokio::net::UnixListener::from_std(listener) {
                    Ok(listener) => serve(listener, shared).await,
                    Err(e) => log::error!("API: cannot serve the socket: {e}"),
                }
            })
        })
        .map_err(ServerError::Spawn)?;
    filtered.recv().map_err(|_| ServerError::Gone)??;
    Ok((ApiInbox { requests, wake }, handle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// A server on a fresh socket, with a stand-in for the VMM thread that answers every
    /// request it is handed.
    fn server(name: &str, limits: ApiLimits) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reapvm-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let (inbox, _thread) = start(&socket, limits).unwrap();
        std::thread::spawn(move || {
            while let Ok(message) = inbox.requests.recv() {
                let _ = message
                    .reply
                    .send(ApiResponse::ok(json!({"state": "Not started"})));
            }
        });
        socket
    }

    fn limits() -> ApiLimits {
        ApiLimits {
            read_timeout: Duration::from_secs(1),
            ..ApiLimits::new(1024)
        }
    }

    /// Sends `raw` on a new connection and reads until the server closes it.
    fn exchange(socket: &Path, raw: &[u8]) -> String {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = stream.write_all(raw);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

    /// GET / answered 200, and how long it took.
    fn timed_get(socket: &Path) -> Duration {
        let t = Instant::now();
        let answer = exchange(socket, GET);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("Not started"), "{answer}");
        t.elapsed()
    }

    #[test]
    fn a_client_stalled_mid_body_holds_up_no_one() {
        let socket = server("stalled", limits());
        let mut stalled = UnixStream::connect(&socket).unwrap();
        stalled
            .write_all(
                b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"act",
            )
            .unwrap();
        assert!(timed_get(&socket) < Duration::from_millis(500));
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stalled.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("did not arrive within 1 s"), "{answer}");
    }

    #[test]
    fn a_head_past_the_limit_is_refused_and_others_go_on() {
        let socket = server("big-head", limits());
        let mut raw = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 64 << 10));
        raw.extend(b"\r\n\r\n");
        let answer = exchange(&socket, &raw);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let mut many = b"GET / HTTP/1.1\r\nHost: localhost\r\n".to_vec();
        for i in 0..64 {
            many.extend(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        let answer = exchange(&socket, &many);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        timed_get(&socket);
    }

    #[test]
    fn an_oversized_body_is_refused() {
        let socket = server("big-body", limits());
        let body = vec![b'x'; 2048];
        let mut raw =
            b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2048\r\n\r\n".to_vec();
        raw.extend(&body);
        let answer = exchange(&socket, &raw);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.contains("size 2048 is larger than the limit of 1024"),
            "{answer}"
        );
        // Without a length: chunked, cut by the limit as it arrives.
        let mut raw =
            b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"
                .to_vec();
        raw.extend(&body);
        raw.extend(b"\r\n0\r\n\r\n");
        let answer = exchange(&socket, &raw);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("too large"), "{answer}");
    }

    #[test]
    fn connections_past_the_limit_are_closed_until_idle_ones_time_out() {
        let socket = server(
            "many",
            ApiLimits {
                max_connections: 2,
                ..limits()
            },
        );
        let idle: Vec<UnixStream> = (0..2)
            .map(|_| UnixStream::connect(&socket).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let refused = exchange(&socket, GET);
        assert_eq!(refused, "", "a third connection is closed unanswered");
        // The idle ones are closed after the read timeout, which frees their slots.
        std::thread::sleep(Duration::from_millis(1500));
        timed_get(&socket);
        drop(idle);
    }
}
