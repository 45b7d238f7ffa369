//! A minimal HTTP/1.1 client for talking to the guest agent over a kept-alive connection
//! (TCP through the VM's network, or vsock through reapvm's Unix socket).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct HttpConn {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
}

impl HttpConn {
    pub fn new(stream: TcpStream, timeout: Duration) -> Result<Self, String> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        Ok(Self {
            reader: BufReader::new(Box::new(stream)),
            writer: Box::new(writer),
        })
    }

    /// Over a vsock connection made with [`vsock_connect`].
    pub fn over_unix(stream: UnixStream, timeout: Duration) -> Result<Self, String> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        Ok(Self {
            reader: BufReader::new(Box::new(stream)),
            writer: Box::new(writer),
        })
    }

    /// Sends one request and reads the response: (status, body).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: guest\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.writer
            .write_all(head.as_bytes())
            .and_then(|_| self.writer.write_all(body))
            .map_err(|e| format!("send {method} {path}: {e}"))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("read status of {method} {path}: {e}"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?} for {method} {path}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().map_err(|_| format!("bad length {v:?}"))?;
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body of {method} {path}: {e}"))?;
        Ok((status, body))
    }
}

/// Firecracker's host-initiated vsock connection: connect to the VM's `uds_path`, ask for
/// guest port `port` (`CONNECT PORT\n`), and read reapvm's `OK HOSTPORT\n`. The stream then
/// carries the guest's bytes; the host port is returned with it.
pub fn vsock_connect(uds_path: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut stream = UnixStream::connect(uds_path)
        .map_err(|e| format!("connect {}: {e}", uds_path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("send CONNECT {port}: {e}"))?;
    // One byte at a time: what follows the line is the guest's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("read the answer to CONNECT {port}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let host_port = text
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("CONNECT {port} answered {text:?}, not OK HOSTPORT"))?;
    Ok((stream, host_port))
}

/// One request over a Unix socket (the VMM's API), `Connection: close`: (status, body).
pub fn unix_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    unix_request_bytes(socket, method, path, body.as_bytes())
}

/// The same with any body. A server that answers before the whole body is in (a body over
/// its limit) may close while it is still being written: its answer is read all the same.
pub fn unix_request_bytes(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("send {method} {path}: {e}"))?;
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| match read {
            Err(e) => format!("read the answer to {method} {path}: {e}"),
            Ok(_) => format!("bad answer to {method} {path}: {raw:?}"),
        })?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
