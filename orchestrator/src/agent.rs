//! The guest's agent (HTTP on port 8080), reached from inside the instance's namespace.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::http::{exchange, Answer, HttpError};
use crate::netns::{connect_guest, NetNs, NetNsError};

pub const AGENT_PORT: u16 = 8080;
/// How long a function may take to answer (the suite's slowest in the KVM lab take minutes).
pub const INVOKE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] NetNsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the agent was not ready within {0:?}")]
    NotReady(Duration),
}

/// A connection to the agent, and how long it took to get (ConnectFuncClient).
pub async fn connect(ns: &NetNs, timeout: Duration) -> Result<(TcpStream, Duration), AgentError> {
    let start = Instant::now();
    let stream = connect_guest(ns, AGENT_PORT, timeout).await?;
    Ok((stream, start.elapsed()))
}

/// `POST /invoke/FUNCTION` on `stream`.
pub async fn invoke(
    stream: TcpStream,
    function: &str,
    data: Vec<u8>,
) -> Result<Answer, AgentError> {
    Ok(exchange(
        stream,
        "POST",
        &format!("/invoke/{function}"),
        data,
        INVOKE_TIMEOUT,
    )
    .await?)
}

/// Waits until the agent answers `GET /ready` with 200 (a booting guest).
pub async fn wait_ready(ns: &NetNs, timeout: Duration) -> Result<(), AgentError> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let left = timeout.saturating_sub(start.elapsed());
        if let Ok((stream, _)) = connect(ns, left.min(Duration::from_secs(5))).await {
            if let Ok(answer) =
                exchange(stream, "GET", "/ready", Vec::new(), Duration::from_secs(10)).await
            {
                if answer.status == 200 {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(AgentError::NotReady(timeout))
}
