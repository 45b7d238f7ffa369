//! The guest's side of MMDS: HTTP/1.x requests read from one TCP connection, answered from
//! the data store with Firecracker's rules (V1: any GET; V2: a GET carries a token from
//! `PUT /latest/api/token`), statuses and messages. Requests are parsed with `httparse`;
//! one connection may carry many (keep-alive).

use std::time::Instant;

use super::store::{MmdsStore, MmdsVersion, OutputFormat, StoreError};

/// The largest request (head and body) a connection may send; more is answered 400 and the
/// connection closed. MMDS requests are a line and a few headers.
pub const MAX_REQUEST: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
pub const PATH_TO_TOKEN: &str = "/latest/api/token";
const TOKEN_HEADERS: [&str; 2] = ["X-metadata-token", "X-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "X-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token-ttl-seconds",
];

/// What the guest's requests were, for the metrics (named as Firecracker's `mmds` group's
/// where it has them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    /// Requests answered.
    #[serde(rename = "rx_count")]
    pub requests: u64,
    /// Requests refused as malformed (400, 413, 501 for Transfer-Encoding).
    #[serde(rename = "rx_bad_requests")]
    pub bad_requests: u64,
    /// GETs without a token (under V1 too: readiness for V2).
    #[serde(rename = "rx_no_token")]
    pub no_token: u64,
    /// GETs with a token not valid.
    #[serde(rename = "rx_invalid_token")]
    pub invalid_token: u64,
}

/// One answer, already in wire form, and whether the connection ends after it.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub bytes: Vec<u8>,
    pub close: bool,
}

struct Response {
    status: u16,
    json: bool,
    body: String,
    extra_header: Option<(String, String)>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            json: false,
            body: body.into(),
            extra_header: None,
        }
    }

    fn encode(self, http_1_0: bool, close: bool) -> Answer {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            _ => "Not Implemented",
        };
        let mut head = format!(
            "HTTP/1.{} {} {reason}\r\nServer: reapvm MMDS\r\nConnection: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            if http_1_0 { 0 } else { 1 },
            self.status,
            if close { "close" } else { "keep-alive" },
            if self.json { "application/json" } else { "text/plain" },
            self.body.len()
        );
        if self.status == 405 {
            head.push_str("Allow: GET, PUT\r\n");
        }
        if let Some((name, value)) = &self.extra_header {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        Answer { bytes, close }
    }
}

/// Requests arriving on one connection: bytes in, answers out.
#[derive(Debug, Default)]
pub struct Session {
    pending: Vec<u8>,
    closed: bool,
    /// How much of `pending` is known to hold no end of a request's head: a guest sending
    /// a byte at a time costs a scan of the new bytes, not of the whole request each time.
    searched: usize,
    /// The length of the request being received, once its head was read.
    need: Option<usize>,
}

/// Whether `bytes` hold the empty line that ends a request's head.
fn ends_head(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n')))
}

impl Session {
    /// Takes the bytes the guest sent, up to what [`MAX_REQUEST`] leaves room for; returns
    /// how many it took.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let room = (MAX_REQUEST + 1).saturating_sub(self.pending.len());
        let n = bytes.len().min(room);
        self.pending.extend_from_slice(&bytes[..n]);
        n
    }

    /// Bytes received and not yet answered (at most [`MAX_REQUEST`] + 1).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// How many more bytes this session takes now.
    pub fn room(&self) -> usize {
        if self.closed {
            0
        } else {
            (MAX_REQUEST + 1).saturating_sub(self.pending.len())
        }
    }

    /// The answer to the next complete request, if one has arrived. After an answer that
    /// closes, nothing more is answered.
    pub fn next_answer(
        &mut self,
        store: &mut MmdsStore,
        counts: &mut RequestCounts,
        now: Instant,
    ) -> Option<Answer> {
        if self.closed || self.pending.is_empty() {
            return None;
        }
        match self.need {
            Some(need) if self.pending.len() < need => return None,
            Some(_) => {}
            None => {
                let from = self.searched.saturating_sub(2);
                if !ends_head(&self.pending[from..]) && self.pending.len() <= MAX_REQUEST {
                    self.searched = self.pending.len();
                    return None;
                }
            }
        }
        let answer = match self.parse(store, counts, now) {
            Parsed::Incomplete => return None,
            Parsed::Answer(answer) => answer,
        };
        self.closed = answer.close;
        Some(answer)
    }

    fn parse(&mut self, store: &mut MmdsStore, counts: &mut RequestCounts, now: Instant) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let bad = |counts: &mut RequestCounts, message: String| {
            counts.bad_requests += 1;
            Parsed::Answer(Response::text(400, message).encode(false, true))
        };
        let head_len = match request.parse(&self.pending) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.pending.len() > MAX_REQUEST => {
                return bad(counts, format!("Request larger than {MAX_REQUEST} bytes."));
            }
            Ok(httparse::Status::Partial) => return Parsed::Incomplete,
            Err(e) => return bad(counts, format!("Malformed HTTP request: {e}.")),
        };
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        if header("Transfer-Encoding").is_some() {
            counts.bad_requests += 1;
            let answer = Response::text(501, "Transfer-Encoding is not supported.");
            return Parsed::Answer(answer.encode(false, true));
        }
        let body_len = match header("Content-Length").map(|v| v.parse::<usize>()) {
            None => 0,
            Some(Ok(len)) => len,
            Some(Err(_)) => return bad(counts, "Invalid Content-Length.".into()),
        };
        if head_len.saturating_add(body_len) > MAX_REQUEST {
            counts.bad_requests += 1;
            let message = format!("Request larger than {MAX_REQUEST} bytes.");
            return Parsed::Answer(Response::text(413, message).encode(false, true));
        }
        if self.pending.len() < head_len + body_len {
            self.need = Some(head_len + body_len);
            return Parsed::Incomplete;
        }
        counts.requests += 1;
        let http_1_0 = request.version == Some(0);
        let connection = header("Connection").unwrap_or_default();
        let close = connection.eq_ignore_ascii_case("close")
            || (http_1_0 && !connection.eq_ignore_ascii_case("keep-alive"));
        let method = request.method.unwrap_or_default();
        let target = request.path.unwrap_or_default();
        let response = match uri_path(target) {
            None => {
                counts.bad_requests += 1;
                Response::text(400, "Invalid URI.")
            }
            Some(path) => match method {
                "GET" => get(store, counts, target, &path, &header, now),
                "PUT" => put_token(store, target, &path, &header, now),
                _ => Response::text(405, "Not allowed HTTP method."),
            },
        };
        self.pending.drain(..head_len + body_len);
        self.need = None;
        self.searched = 0;
        Parsed::Answer(response.encode(http_1_0, close))
    }
}

enum Parsed {
    Incomplete,
    Answer(Answer),
}

/// The path of a request target (origin or absolute form), without its query, with
/// repeated slashes folded as Firecracker does; None if it has none.
fn uri_path(target: &str) -> Option<String> {
    let path = match target.strip_prefix("http://") {
        Some(rest) => &rest[rest.find('/')?..],
        None => target,
    };
    let path = path.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return None;
    }
    let mut folded = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && folded.ends_with('/')) {
            folded.push(c);
        }
    }
    Some(folded)
}

fn first_header(
    header: &dyn Fn(&str) -> Option<String>,
    names: &[&str],
) -> Option<(String, String)> {
    names
        .iter()
        .find_map(|name| Some((name.to_string(), header(name)?)))
}

/// `target` is the request's as sent (Firecracker's messages quote it), `path` its folded
/// path.
fn get(
    store: &MmdsStore,
    counts: &mut RequestCounts,
    target: &str,
    path: &str,
    header: &dyn Fn(&str) -> Option<String>,
    now: Instant,
) -> Response {
    let token = first_header(header, &TOKEN_HEADERS).map(|(_, t)| t);
    let valid = token.as_deref().map(|t| store.token_is_valid(t, now));
    match valid {
        None => counts.no_token += 1,
        Some(false) => counts.invalid_token += 1,
        Some(true) => {}
    }
    if store.version() == MmdsVersion::V2 {
        match valid {
            None => return Response::text(401, "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to specify the session token."),
            Some(false) => return Response::text(401, "MMDS token not valid."),
            Some(true) => {}
        }
    }
    let json = header("Accept").is_some_and(|a| a.contains("application/json"));
    let format = if json {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match store.get(path, format) {
        Ok(body) => Response {
            status: 200,
            json,
            body,
            extra_header: None,
        },
        Err(StoreError::UnsupportedValueType) => {
            Response::text(501, StoreError::UnsupportedValueType.to_string())
        }
        Err(_) => Response::text(404, format!("Resource not found: {target}.")),
    }
}

fn put_token(
    store: &mut MmdsStore,
    target: &str,
    path: &str,
    header: &dyn Fn(&str) -> Option<String>,
    now: Instant,
) -> Response {
    if header("X-Forwarded-For").is_some() {
        return Response::text(400, "Unsupported header name. Key: X-Forwarded-For");
    }
    if path != PATH_TO_TOKEN {
        return Response::text(404, format!("Resource not found: {target}."));
    }
    let Some((name, value)) = first_header(header, &TTL_HEADERS) else {
        return Response::text(400, "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.");
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Response::text(400, format!("Invalid value. Key:{name}; Value:{value}"));
    };
    match store.new_token(ttl, now) {
        Ok(token) => Response {
            status: 200,
            json: false,
            body: token,
            extra_header: Some((name, ttl.to_string())),
        },
        Err(e) => Response::text(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::store::DEFAULT_SIZE_LIMIT;

    fn store(version: MmdsVersion) -> MmdsStore {
        let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
        store.configure(version, false);
        store
            .put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}))
            .unwrap();
        store
    }

    /// Sends `request` on a fresh session: (status, body, the whole answer).
    fn ask(store: &mut MmdsStore, request: &str) -> (u16, String, String) {
        let mut session = Session::default();
        assert_eq!(session.feed(request.as_bytes()), request.len());
        let mut counts = RequestCounts::default();
        let answer = session
            .next_answer(store, &mut counts, Instant::now())
            .expect("a complete request is answered");
        let text = String::from_utf8(answer.bytes).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body, text)
    }

    #[test]
    fn v1_answers_any_get_and_v2_needs_a_token() {
        let mut v1 = store(MmdsVersion::V1);
        let (status, body, _) = ask(&mut v1, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
        assert_eq!((status, body.as_str()), (200, "ami-1"));
        let (status, body, text) = ask(
            &mut v1,
            "GET //latest//meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!((status, body.as_str()), (200, r#"{"ami-id":"ami-1"}"#));
        assert!(text.contains("Content-Type: application/json"));

        let mut v2 = store(MmdsVersion::V2);
        let (status, body, _) = ask(&mut v2, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
        assert_eq!(status, 401);
        assert!(body.contains("No MMDS token provided"));
        let (status, _, _) = ask(
            &mut v2,
            "GET /latest HTTP/1.1\r\nX-metadata-token: forged\r\n\r\n",
        );
        assert_eq!(status, 401);
        let (status, token, text) = ask(
            &mut v2,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        assert_eq!(status, 200);
        assert!(text.contains("X-metadata-token-ttl-seconds: 60\r\n"));
        let (status, body, _) = ask(
            &mut v2,
            &format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nx-aws-ec2-metadata-token: {token}\r\n\r\n"),
        );
        assert_eq!((status, body.as_str()), (200, "ami-1"));
    }

    #[test]
    fn refusals_say_why() {
        let mut v2 = store(MmdsVersion::V2);
        let cases = [
            ("PUT /latest/api/token HTTP/1.1\r\n\r\n", 400, "time to live value not found"),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n", 400, "Invalid value"),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n", 400, "between 1 and 21600"),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", 400, "X-Forwarded-For"),
            ("PUT /latest/other HTTP/1.1\r\n\r\n", 404, "Resource not found: /latest/other."),
            ("DELETE /latest HTTP/1.1\r\n\r\n", 405, "Not allowed"),
            ("GET latest HTTP/1.1\r\n\r\n", 400, "Invalid URI"),
            ("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501, "Transfer-Encoding"),
            ("BAD\0 / HTTP/1.1\r\n\r\n", 400, "Malformed"),
        ];
        for (request, want_status, want_text) in cases {
            let (status, body, text) = ask(&mut v2, request);
            assert_eq!(status, want_status, "{request:?}: {text}");
            assert!(body.contains(want_text), "{request:?}: {body}");
        }
        let (_, _, text) = ask(&mut v2, "POST / HTTP/1.1\r\n\r\n");
        assert!(text.contains("Allow: GET, PUT\r\n"));
        let mut v1 = store(MmdsVersion::V1);
        let (status, body, _) = ask(&mut v1, "GET /nothing/here HTTP/1.1\r\n\r\n");
        assert_eq!(
            (status, body.as_str()),
            (404, "Resource not found: /nothing/here.")
        );
        let (_, body, _) = ask(&mut v1, "GET //nothing HTTP/1.1\r\n\r\n");
        assert_eq!(body, "Resource not found: //nothing.", "the target as sent");
    }

    #[test]
    fn one_connection_carries_requests_in_pieces_and_in_a_row() {
        let mut store = store(MmdsVersion::V1);
        let mut counts = RequestCounts::default();
        let mut session = Session::default();
        let now = Instant::now();
        session.feed(b"GET /latest/meta-data/ami-id HT");
        assert_eq!(session.next_answer(&mut store, &mut counts, now), None);
        session.feed(b"TP/1.1\r\nContent-Length: 3\r\n\r\nab");
        assert_eq!(session.next_answer(&mut store, &mut counts, now), None);
        session.feed(b"cGET / HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        let first = session.next_answer(&mut store, &mut counts, now).unwrap();
        assert!(!first.close);
        assert!(first.bytes.ends_with(b"ami-1"));
        let second = session.next_answer(&mut store, &mut counts, now).unwrap();
        assert!(second.close, "HTTP/1.0 without keep-alive closes");
        assert!(second.bytes.starts_with(b"HTTP/1.0 200"));
        assert_eq!(session.next_answer(&mut store, &mut counts, now), None);
        assert_eq!(session.room(), 0);
        assert_eq!((counts.requests, counts.no_token), (2, 2));
    }

    #[test]
    fn a_request_a_byte_at_a_time_is_answered_once_whole() {
        let mut store = store(MmdsVersion::V1);
        let mut counts = RequestCounts::default();
        let now = Instant::now();
        let mut session = Session::default();
        let request = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nContent-Length: 2\r\n\r\nxy";
        for (i, byte) in request.iter().enumerate() {
            session.feed(std::slice::from_ref(byte));
            let answer = session.next_answer(&mut store, &mut counts, now);
            assert_eq!(
                answer.is_some(),
                i + 1 == request.len(),
                "after {} bytes",
                i + 1
            );
            if let Some(answer) = answer {
                assert!(answer.bytes.ends_with(b"ami-1"));
            }
        }
        // A head ended by bare line feeds counts too.
        session.feed(b"GET / HTTP/1.1\n\n");
        assert!(session.next_answer(&mut store, &mut counts, now).is_some());
        assert_eq!(counts.requests, 2);
    }

    #[test]
    fn oversized_requests_are_refused_and_close() {
        let mut store = store(MmdsVersion::V1);
        let mut counts = RequestCounts::default();
        let now = Instant::now();
        let mut session = Session::default();
        let junk = vec![b'a'; MAX_REQUEST * 2];
        assert_eq!(session.feed(&junk), MAX_REQUEST + 1);
        let answer = session.next_answer(&mut store, &mut counts, now).unwrap();
        assert!(answer.close && answer.bytes.starts_with(b"HTTP/1.1 400"));
        let mut session = Session::default();
        session.feed(b"GET / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n");
        let answer = session.next_answer(&mut store, &mut counts, now).unwrap();
        assert!(answer.close && answer.bytes.starts_with(b"HTTP/1.1 413"));
        assert_eq!(counts.bad_requests, 2);
    }
}
