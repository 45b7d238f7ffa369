//! A network namespace per instance, with the tap its guest is attached to. Every clone of a
//! snapshot has the same guest address (172.16.0.2), so each lives in its own namespace;
//! reapd reaches the guest through sockets it creates inside that namespace. Nothing is
//! added to the host's own interfaces and nothing is routed out.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};

pub const HOST_IP: &str = "172.16.0.1";
pub const GUEST_IP: &str = "172.16.0.2";
pub const TAP: &str = "tap0";
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// Every instance's tap has the same MAC: a guest restored from a snapshot has the host's
/// MAC in its ARP cache and reaches the new tap at once.
pub const HOST_TAP_MAC: &str = "02:00:ac:10:00:01";

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("cannot run ip {args}: {source}")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("ip {args} failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot open namespace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot enter namespace {name}: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot make a socket in namespace {name}: {source}")]
    Socket {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr} in namespace {name} within {waited:?}: {source}")]
    Connect {
        name: String,
        addr: SocketAddr,
        waited: Duration,
        source: std::io::Error,
    },
}

async fn ip(args: &[&str]) -> Result<String, NetNsError> {
    let joined = args.join(" ");
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|source| NetNsError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetNsError::Ip {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A named namespace (`/run/netns/NAME`). Not removed on drop: its owner removes it with
/// `remove` once the VM in it is gone (an async step that a drop cannot await).
#[derive(Debug, Clone)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates the namespace with `lo` up and `tap0` at 172.16.0.1/24, up. A failure
    /// part way removes what was made.
    pub async fn create(name: &str) -> Result<Self, NetNsError> {
        ip(&["netns", "add", name]).await?;
        let ns = Self {
            name: name.to_string(),
        };
        let setup = async {
            ns.ip(&["link", "set", "lo", "up"]).await?;
            ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]).await?;
            ns.ip(&["link", "set", TAP, "address", HOST_TAP_MAC])
                .await?;
            ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])
                .await?;
            ns.ip(&["link", "set", TAP, "up"]).await
        };
        if let Err(e) = setup.await {
            let _ = ns.remove().await;
            return Err(e);
        }
        Ok(ns)
    }

    async fn ip(&self, args: &[&str]) -> Result<String, NetNsError> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full).await
    }

    pub async fn remove(&self) -> Result<(), NetNsError> {
        ip(&["netns", "del", &self.name]).await.map(|_| ())
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The namespace's file, for a child to enter (`setns`) before it runs reapvm.
    pub fn open(&self) -> Result<File, NetNsError> {
        File::open(self.path()).map_err(|source| NetNsError::Open {
            path: self.path(),
            source,
        })
    }

    /// A TCP socket that belongs to this namespace. A socket stays in the namespace it was
    /// made in, so a short-lived thread enters the namespace (setns changes only the
    /// calling thread; a pooled thread must never be moved), makes it and ends; the socket
    /// is then used from any thread. The caller awaits the thread's answer, never joins it.
    pub async fn tcp_socket(&self) -> Result<TcpSocket, NetNsError> {
        let file = self.open()?;
        let name = self.name.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread_name = name.clone();
        std::thread::Builder::new()
            .name("reapd-netns".into())
            .spawn(move || {
                let _ = tx.send(socket_in(&file, thread_name));
            })
            .map_err(|source| NetNsError::Socket {
                name: name.clone(),
                source,
            })?;
        let made = rx.await.map_err(|_| NetNsError::Socket {
            name: name.clone(),
            source: std::io::Error::other("the socket thread ended without an answer"),
        })??;
        Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(made)))
    }
}

/// On the calling thread, which it moves into the namespace `file`: a new TCP socket.
fn socket_in(file: &File, name: String) -> Result<OwnedFd, NetNsError> {
    // SAFETY: setns on a namespace file the caller holds open; it moves only this thread,
    // a thread of its own that ends right after.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetNsError::Enter {
            name,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a plain socket(2) call; the returned descriptor is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(NetNsError::Socket {
            name,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a new socket descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to `port` on the guest from inside `ns`, retrying while the guest is not there
/// yet (no ARP answer, nothing listening) until `timeout`.
pub async fn connect_guest(
    ns: &NetNs,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, NetNsError> {
    let addr: SocketAddr = SocketAddr::new(GUEST_IP.parse().expect("guest address"), port);
    let start = Instant::now();
    loop {
        let socket = ns.tcp_socket().await?;
        let left = timeout.saturating_sub(start.elapsed());
        let attempt = match tokio::time::timeout(left, socket.connect(addr)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        };
        match attempt {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) if start.elapsed() < timeout && retriable(&e) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(source) => {
                return Err(NetNsError::Connect {
                    name: ns.name.clone(),
                    addr,
                    waited: start.elapsed(),
                    source,
                })
            }
        }
    }
}

fn retriable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::NetworkUnreachable
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Names of the namespaces that exist now.
pub async fn list() -> Result<Vec<String>, NetNsError> {
    let out = ip(&["netns", "list"]).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}
