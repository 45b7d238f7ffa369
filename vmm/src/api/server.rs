//! The API thread: HTTP/1.1 on a Unix socket (tiny_http). It parses each request, hands it
//! to the VMM thread over a channel (waking the event loop through an EventFd) and writes
//! back the answer. It never touches the VM itself, so it never blocks on a vCPU.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use super::request::{parse, ApiError, ApiRequest};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the API socket {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
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
}

/// One request on its way to the VMM thread.
pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: Sender<ApiResponse>,
}

/// The VMM thread's end: requests, and the event that says one is waiting.
pub struct ApiInbox {
    pub requests: Receiver<ApiMessage>,
    pub wake: EventFd,
}

fn respond(request: tiny_http::Request, response: &ApiResponse) {
    let m = &crate::metrics::metrics().api_server;
    m.requests.inc();
    if response.status >= 400 {
        m.faults.inc();
    }
    let body = response
        .body
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let mut http = tiny_http::Response::from_string(body).with_status_code(response.status);
    if response.body.is_some() {
        if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "application/json") {
            http = http.with_header(h);
        }
    }
    if let Err(e) = request.respond(http) {
        log::debug!("API: cannot send the response: {e}");
    }
}

fn serve(server: tiny_http::Server, max_payload: usize, to_vmm: Sender<ApiMessage>, wake: EventFd) {
    for mut request in server.incoming_requests() {
        let method = request.method().as_str().to_string();
        let path = request.url().to_string();
        if request.body_length().is_some_and(|len| len > max_payload) {
            let len = request.body_length().unwrap_or(0);
            respond(
                request,
                &ApiResponse::fault(format!(
                    "Request payload with size {len} is larger than the limit of {max_payload} allowed by server."
                )),
            );
            continue;
        }
        let mut body = Vec::new();
        let read = request
            .as_reader()
            .take(max_payload as u64 + 1)
            .read_to_end(&mut body);
        if read.is_err() || body.len() > max_payload {
            respond(
                request,
                &ApiResponse::fault("The request body could not be read or is too large."),
            );
            continue;
        }
        let parsed: Result<ApiRequest, ApiError> = parse(&method, &path, &body);
        let response = match parsed {
            Err(e) => ApiResponse::fault(e),
            Ok(api_request) => {
                log::info!("API: {method} {path}");
                let (reply, answer) = channel();
                let sent = to_vmm.send(ApiMessage {
                    request: api_request,
                    reply,
                });
                if sent.is_err() || wake.write(1).is_err() {
                    ApiResponse {
                        status: 500,
                        body: Some(json!({"fault_message": "The VMM is shutting down."})),
                    }
                } else {
                    answer.recv().unwrap_or(ApiResponse {
                        status: 500,
                        body: Some(json!({"fault_message": "The VMM stopped before answering."})),
                    })
                }
            }
        };
        respond(request, &response);
    }
}

/// Binds the socket and starts the API thread. A socket file nobody listens on (left by a
/// VMM that was killed) is replaced; a live one is an error.
pub fn start(path: &Path, max_payload: usize) -> Result<(ApiInbox, JoinHandle<()>), ServerError> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let server = tiny_http::Server::http_unix(path).map_err(|e| ServerError::Bind {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (to_vmm, requests) = channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::EventFd)?;
    let wake_api = wake.try_clone().map_err(ServerError::EventFd)?;
    let handle = std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || serve(server, max_payload, to_vmm, wake_api))
        .map_err(ServerError::Spawn)?;
    Ok((ApiInbox { requests, wake }, handle))
}
