//! One HTTP/1.1 exchange over a connected stream (hyper's client): how reapd talks to a
//! reapvm's API socket and to a guest's agent, and how reapctl talks to reapd.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("{method} {uri}: {source}")]
    Exchange {
        method: String,
        uri: String,
        source: hyper::Error,
    },
    #[error("{method} {uri}: no answer within {timeout:?}")]
    Timeout {
        method: String,
        uri: String,
        timeout: Duration,
    },
    #[error("{method} {uri}: bad request: {reason}")]
    Build {
        method: String,
        uri: String,
        reason: String,
    },
}

/// An answer: status, headers and the whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on `io` and reads the whole answer, within `timeout`.
pub async fn exchange<IO>(
    io: IO,
    method: &str,
    uri: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Answer, HttpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let work = async {
        let exchange_err = |source| HttpError::Exchange {
            method: method.to_string(),
            uri: uri.to_string(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(exchange_err)?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HttpError::Build {
                method: method.to_string(),
                uri: uri.to_string(),
                reason: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(exchange_err)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(exchange_err)?
            .to_bytes();
        driver.abort();
        Ok(Answer {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| HttpError::Timeout {
            method: method.to_string(),
            uri: uri.to_string(),
            timeout,
        })?
}

/// One request to the HTTP server on the Unix socket `socket`.
pub async fn unix_request(
    socket: &Path,
    method: &str,
    uri: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Answer, HttpError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| HttpError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    exchange(stream, method, uri, body, timeout).await
}
