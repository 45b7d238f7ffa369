//! The guest's agent (HTTP on port 8080), reached from inside the instance's namespace.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::watch;

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
    #[error("the VM's reapvm exited ({0})")]
    VmExited(String),
}

/// `work` unless the VM's reapvm ends first (`exited` is its exit watch): a guest that is
/// gone never answers and never resets the connection, so without this a request to it
/// would wait out its whole timeout.
pub async fn unless_exited<T>(
    mut exited: watch::Receiver<Option<String>>,
    work: impl Future<Output = Result<T, AgentError>>,
) -> Result<T, AgentError> {
    tokio::select! {
        result = work => result,
        status = exited.wait_for(Option::is_some) => Err(AgentError::VmExited(match status {
            Ok(s) => s.clone().unwrap_or_default(),
            Err(_) => "its watcher ended".to_string(),
        })),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_to_a_vm_that_exits_ends_at_once() {
        let (tx, rx) = watch::channel(None);
        let never = std::future::pending::<Result<(), AgentError>>();
        let waiting = tokio::spawn(unless_exited(rx, never));
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send(Some("signal: 9 (SIGKILL)".into())).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        match result {
            Ok(Ok(Err(AgentError::VmExited(status)))) => assert!(status.contains("SIGKILL")),
            other => panic!("expected VmExited at once, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn work_that_ends_first_is_returned() {
        let (_tx, rx) = watch::channel(None);
        let done = async { Ok::<_, AgentError>(7) };
        assert_eq!(unless_exited(rx, done).await.unwrap(), 7);
    }
}
