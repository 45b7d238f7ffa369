//! The agent's HTTP endpoints: `POST /invoke[/NAME]`, `GET /ready`, `GET /functions`,
//! `POST /shutdown`.

use std::sync::Arc;

use crate::http::{Handler, Request, Response};
use crate::runtime::{InvokeError, Runtime};
use crate::system;

pub struct AgentState {
    runtime: Runtime,
    ready: bool,
}

impl AgentState {
    pub fn new(runtime: Runtime, ready: bool) -> Self {
        Self { runtime, ready }
    }

    pub fn function_names(&self) -> Vec<&str> {
        self.runtime.names()
    }

    fn route(&self, req: &Request) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/ready") if self.ready => Response::text(200, "ready"),
            ("GET", "/ready") => {
                Response::text(503, "a function runtime failed to start; see the console")
            }
            ("GET", "/functions") => Response::text(200, self.runtime.names().join("\n")),
            ("POST", "/shutdown") => {
                std::thread::spawn(|| {
                    // Let the response leave before the machine goes down.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    system::request_shutdown();
                });
                Response::text(200, "shutting down")
            }
            ("POST", path) if path == "/invoke" || path.starts_with("/invoke/") => {
                let name = path.strip_prefix("/invoke/");
                let Some(function) = self.runtime.get(name) else {
                    return Response::text(
                        404,
                        match name {
                            Some(n) => format!("no function {n:?}"),
                            None => "no default function: use /invoke/NAME".into(),
                        },
                    );
                };
                let response = match function.invoke(&req.body) {
                    Ok(out) => Response::new(200, out),
                    Err(InvokeError::Handler(msg)) | Err(InvokeError::Worker(msg)) => {
                        Response::text(500, msg)
                    }
                };
                response.then(invocation_answered)
            }
            (_, "/ready" | "/functions" | "/shutdown" | "/invoke") => {
                Response::text(405, "method not allowed")
            }
            _ => Response::text(404, format!("no endpoint {}", req.path)),
        }
    }
}

/// Tells the VMM an invocation was answered (REAP stops recording there). Outside a reapvm
/// guest nothing happens.
fn invocation_answered() {
    let _ = crate::invocation_signal::signal_invocation_done();
}

pub fn handler(state: Arc<AgentState>) -> Arc<Handler> {
    Arc::new(move |req: &Request| state.route(req))
}
