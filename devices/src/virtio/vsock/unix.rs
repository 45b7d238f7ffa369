//! The host side of Firecracker's hybrid vsock: one Unix socket (`uds_path`) where host
//! programs connect and ask for a guest port (`CONNECT PORT\n`, answered `OK HOSTPORT\n`),
//! and `uds_path_PORT` sockets that host programs listen on for the guest's connections to
//! host port PORT.

use std::io::{ErrorKind, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Longest handshake line accepted ("CONNECT 4294967295\n" is 19 bytes).
const MAX_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error("vsock uds_path {0}: another process is listening there")]
    InUse(PathBuf),
    #[error("vsock uds_path {0}: a file that is not a socket is there; not replaced")]
    NotASocket(PathBuf),
    #[error("vsock uds_path {path}: cannot remove the stale socket: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock uds_path {path}: cannot listen: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A socket file as bound: which file it is, so that only that one is removed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFile {
    dev: u64,
    ino: u64,
}

/// Listens on `path`. A socket file nobody listens on (left by a VMM that died) is replaced;
/// a live one is not taken over, nor is anything that is not a socket.
pub fn listen(path: &Path) -> Result<(UnixListener, Option<SocketFile>), UnixError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(UnixError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(UnixError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| UnixError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| UnixError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| UnixError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    let file = std::fs::symlink_metadata(path).ok().map(|m| SocketFile {
        dev: m.dev(),
        ino: m.ino(),
    });
    Ok((listener, file))
}

/// Removes the socket file at `path` if it is still the one bound there (`file`).
pub fn remove_if_ours(path: &Path, file: Option<SocketFile>) {
    let Some(file) = file else {
        return;
    };
    let Ok(on_disk) = std::fs::symlink_metadata(path) else {
        return;
    };
    if on_disk.file_type().is_socket() && on_disk.ino() == file.ino && on_disk.dev() == file.dev {
        let _ = std::fs::remove_file(path);
    }
}

/// Where a guest's connection to host port `port` goes.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut name = uds_path.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Connects without blocking: a listener whose backlog is full refuses (EAGAIN) rather than
/// stalling the VMM's event loop.
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just created and own alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes, fd is open.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// A host connection on `uds_path` that has not finished its `CONNECT PORT\n` line.
pub struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
    /// When it is closed if the line has not come.
    pub deadline: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// The line is not complete yet.
    Pending,
    /// The guest port asked for.
    Port(u32),
    /// The peer sent something else, or hung up: it is dropped.
    Refused(String),
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            line: Vec::new(),
            deadline,
        }
    }

    /// Reads the line one byte at a time: anything the client sends after it belongs to the
    /// guest and stays in the socket.
    pub fn advance(&mut self) -> HandshakeStep {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return HandshakeStep::Refused("closed before CONNECT".into()),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) if self.line.len() >= MAX_LINE => {
                    return HandshakeStep::Refused("a line longer than CONNECT PORT".into())
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return HandshakeStep::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return HandshakeStep::Refused(e.to_string()),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> HandshakeStep {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    match text
        .strip_prefix("CONNECT ")
        .map(|p| p.trim().parse::<u32>())
    {
        Some(Ok(port)) => HandshakeStep::Port(port),
        _ => HandshakeStep::Refused(format!("{text:?} is not CONNECT PORT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reapvm-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 8080"), HandshakeStep::Port(8080));
        assert_eq!(parse_connect(b"CONNECT 52\r"), HandshakeStep::Port(52));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT x",
            b"connect 1",
            b"CONNECT 99999999999",
        ] {
            assert!(
                matches!(parse_connect(bad), HandshakeStep::Refused(_)),
                "{bad:?}"
            );
        }
    }

    /// The line is read up to its newline and no further: what follows is the guest's.
    #[test]
    fn a_handshake_leaves_the_bytes_after_its_line() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut handshake = Handshake::new(ours, Instant::now());
        theirs.write_all(b"CONNECT 80").unwrap();
        assert_eq!(handshake.advance(), HandshakeStep::Pending);
        theirs.write_all(b"80\nGET /").unwrap();
        assert_eq!(handshake.advance(), HandshakeStep::Port(8080));
        let mut rest = [0u8; 5];
        handshake.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"GET /");

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut handshake = Handshake::new(ours, Instant::now());
        theirs.write_all(&[b'A'; 40]).unwrap();
        assert!(matches!(handshake.advance(), HandshakeStep::Refused(_)));
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_kept() {
        let dir = temp_dir("listen");
        let path = dir.join("v.sock");
        let (live, _) = listen(&path).unwrap();
        match listen(&path) {
            Err(UnixError::InUse(p)) => assert_eq!(p, path),
            other => panic!("expected InUse, got {:?}", other.map(|_| ())),
        }
        drop(live);
        let (again, _) = listen(&path).unwrap();
        let stream = connect(&path).unwrap();
        drop(stream);
        drop(again);
        assert_eq!(port_path(&path, 52), dir.join("v.sock_52"));
        // Not a socket: never replaced.
        let file = dir.join("data");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(listen(&file), Err(UnixError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        // Only the socket still bound there is removed.
        let (_ours, ours) = listen(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (_theirs, theirs) = listen(&path).unwrap();
        remove_if_ours(&path, ours);
        assert!(path.exists(), "another listener's socket was removed");
        remove_if_ours(&path, theirs);
        assert!(!path.exists());
        assert!(connect(&dir.join("nobody")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
