//! A small HTTP/1.1 server for the invocation path: persistent connections, Content-Length
//! and chunked request bodies, one thread per connection, over TCP or vsock.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body accepted (the network test sends 64 MiB).
pub const MAX_BODY: usize = 256 << 20;
const MAX_HEADER_LINE: usize = 8 << 10;
const MAX_HEADERS: usize = 100;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    keep_alive: bool,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    /// Runs once the response has been written to the connection.
    pub after_sent: Option<fn()>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            body: body.into(),
            content_type: "application/octet-stream",
            after_sent: None,
        }
    }

    pub fn then(mut self, after_sent: fn()) -> Self {
        self.after_sent = Some(after_sent);
        self
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into().into_bytes(),
            content_type: "text/plain; charset=utf-8",
            after_sent: None,
        }
    }
}

#[derive(Debug)]
pub enum ParseError {
    /// The peer closed the connection between requests.
    Closed,
    Bad(u16, String),
    Io,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn read_line(reader: &mut impl BufRead) -> Result<Option<String>, ParseError> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_HEADER_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|_| ParseError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_HEADER_LINE {
        return Err(ParseError::Bad(400, "header line too long".into()));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ParseError::Bad(400, "header is not UTF-8".into()))
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, ParseError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or(ParseError::Bad(400, "truncated chunk".into()))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| ParseError::Bad(400, format!("bad chunk size {size_hex:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            while read_line(reader)?.is_some_and(|l| !l.is_empty()) {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(ParseError::Bad(413, "body too large".into()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .map_err(|_| ParseError::Io)?;
        read_line(reader)?;
    }
}

pub fn parse_request(reader: &mut impl BufRead) -> Result<Request, ParseError> {
    // Tolerate stray empty lines between requests.
    let request_line = loop {
        match read_line(reader)? {
            None => return Err(ParseError::Closed),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::Bad(
            400,
            format!("bad request line {request_line:?}"),
        ));
    };
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    for _ in 0..=MAX_HEADERS {
        let line = read_line(reader)?.ok_or(ParseError::Bad(400, "truncated headers".into()))?;
        if line.is_empty() {
            let body = if chunked {
                read_chunked(reader)?
            } else {
                let len = content_length.unwrap_or(0);
                if len > MAX_BODY {
                    return Err(ParseError::Bad(
                        413,
                        format!("body of {len} bytes is too large"),
                    ));
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).map_err(|_| ParseError::Io)?;
                body
            };
            return Ok(Request {
                method: method.to_string(),
                path: target.split('?').next().unwrap_or("/").to_string(),
                body,
                keep_alive,
            });
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError::Bad(400, format!("bad header {line:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length =
                    Some(value.parse().map_err(|_| {
                        ParseError::Bad(400, format!("bad Content-Length {value:?}"))
                    })?)
            }
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => {
                if value.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
    }
    Err(ParseError::Bad(400, "too many headers".into()))
}

pub fn write_response(
    out: &mut impl Write,
    resp: &Response,
    keep_alive: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&resp.body)?;
    out.flush()
}

pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// Serves one connection's requests in turn. `stream` is a TCP socket or, for vsock (whose
/// descriptors read and write like any stream socket), a `UnixStream` over the descriptor.
fn serve_connection<S: Read + Write>(stream: S, write_half: S, handler: &Handler) {
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut writer = std::io::BufWriter::with_capacity(64 << 10, write_half);
    loop {
        match parse_request(&mut reader) {
            Ok(req) => {
                let resp = handler(&req);
                let sent = write_response(&mut writer, &resp, req.keep_alive).is_ok();
                if let (true, Some(after_sent)) = (sent, resp.after_sent) {
                    after_sent();
                }
                if !sent || !req.keep_alive {
                    return;
                }
            }
            Err(ParseError::Bad(status, msg)) => {
                let _ = write_response(&mut writer, &Response::text(status, msg), false);
                return;
            }
            Err(ParseError::Closed) | Err(ParseError::Io) => return,
        }
    }
}

/// Accepts TCP connections forever, each served on its own thread.
pub fn serve(listener: TcpListener, handler: Arc<Handler>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                // An idle client must not pin a thread forever.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
                if let Ok(write_half) = stream.try_clone() {
                    spawn_connection("http-conn", stream, write_half, handler.clone());
                }
            }
            Err(e) => eprintln!("reapvm-agent: accept failed: {e}"),
        }
    }
}

/// Accepts connections on a listening stream socket of another family (vsock) forever.
pub fn serve_fd(listener: std::os::fd::OwnedFd, handler: Arc<Handler>) {
    use std::os::fd::{AsRawFd, FromRawFd};
    loop {
        // SAFETY: accept4 on a listening socket we own; null address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                eprintln!("reapvm-agent: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        // SAFETY: fd was just returned by accept4 and is ours alone.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
        if let Ok(write_half) = stream.try_clone() {
            spawn_connection("vsock-conn", stream, write_half, handler.clone());
        }
    }
}

/// Serves one connection on a thread of its own.
fn spawn_connection<S: Read + Write + Send + 'static>(
    name: &str,
    stream: S,
    write_half: S,
    handler: Arc<Handler>,
) {
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || serve_connection(stream, write_half, &*handler));
    if let Err(e) = spawned {
        eprintln!("reapvm-agent: cannot start a connection thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, ParseError> {
        parse_request(&mut BufReader::new(raw))
    }

    #[test]
    fn content_length_body() {
        let req = parse(b"POST /invoke?x=1 HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/invoke")
        );
        assert_eq!(req.body, b"hello");
        assert!(req.keep_alive);
    }

    #[test]
    fn chunked_body_and_close() {
        let raw = b"POST /invoke HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n";
        let req = parse(raw).unwrap();
        assert_eq!(req.body, b"abcde");
        assert!(!req.keep_alive);
    }

    #[test]
    fn pipelined_requests_on_one_connection() {
        let raw = b"GET /ready HTTP/1.1\r\n\r\nGET /ready HTTP/1.0\r\n\r\n";
        let mut reader = BufReader::new(&raw[..]);
        assert!(parse_request(&mut reader).unwrap().keep_alive);
        assert!(
            !parse_request(&mut reader).unwrap().keep_alive,
            "HTTP/1.0 closes by default"
        );
        assert!(matches!(
            parse_request(&mut reader),
            Err(ParseError::Closed)
        ));
    }

    #[test]
    fn malformed_requests() {
        assert!(matches!(
            parse(b"GARBAGE\r\n\r\n"),
            Err(ParseError::Bad(400, _))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(ParseError::Bad(400, _))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n"),
            Err(ParseError::Bad(413, _))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort"),
            Err(ParseError::Io)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nNoColon\r\n\r\n"),
            Err(ParseError::Bad(400, _))
        ));
    }

    #[test]
    fn response_format() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::text(500, "boom"), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(text.contains("Content-Length: 4\r\n"));
        assert!(text.ends_with("\r\n\r\nboom"));
    }
}
