//! A network namespace per test, with a tap for the guest: all guest traffic stays inside it.
//! Created with `ip netns add`, removed when dropped.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub const HOST_IP: &str = "172.16.0.1";
pub const GUEST_IP: &str = "172.16.0.2";
pub const TAP: &str = "tap0";
/// Every host-side tap gets the same MAC, so a guest restored from a snapshot (with the
/// host's MAC in its ARP cache) reaches the tap of a new namespace at once.
pub const HOST_TAP_MAC: &str = "02:00:ac:10:00:01";

pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// A namespace with `lo` up and a tap `tap0` at 172.16.0.1/24 (the guest is .2).
    pub fn with_tap(tag: &str) -> Result<Self, String> {
        Self::with_tap_named(tag, TAP)
    }

    /// The same with the tap named `tap`.
    pub fn with_tap_named(tag: &str, tap: &str) -> Result<Self, String> {
        Self::with_tap_for(tag, tap, None)
    }

    /// The same with a tap that user `owner` may attach to (a jailed VMM's).
    pub fn with_tap_owned(tag: &str, owner: u32) -> Result<Self, String> {
        Self::with_tap_for(tag, TAP, Some(owner))
    }

    /// A namespace with `lo` up and no tap: reapvm makes it (Firecracker's TUNSETIFF), and
    /// `configure_tap` sets it up once it is there.
    pub fn without_tap(tag: &str) -> Result<Self, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "reapvm-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Gives the tap `tap`, which must exist, the host's MAC and address, and brings it up.
    pub fn configure_tap(&self, tap: &str) -> Result<(), String> {
        self.exec_ip(&["link", "set", tap, "address", HOST_TAP_MAC])?;
        self.exec_ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap])?;
        self.exec_ip(&["link", "set", tap, "up"])
    }

    /// Whether the interface `name` exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.exec_ip(&["link", "show", name]).is_ok()
    }

    fn with_tap_for(tag: &str, tap: &str, owner: Option<u32>) -> Result<Self, String> {
        let ns = Self::without_tap(tag)?;
        match owner {
            None => ns.exec_ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?,
            Some(uid) => {
                let uid = uid.to_string();
                ns.exec_ip(&[
                    "tuntap", "add", "dev", tap, "mode", "tap", "user", &uid, "group", &uid,
                ])?
            }
        }
        ns.configure_tap(tap)?;
        Ok(ns)
    }

    fn exec_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that has joined the namespace (setns affects one thread only).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
                // SAFETY: setns on a namespace file we hold open; it changes this thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| "namespace thread panicked".to_string())?
        })
    }

    /// A TCP connection to the guest made from inside the namespace.
    /// Retries until `timeout` while the guest is not there yet (no ARP answer, nothing
    /// listening): a restored guest that pages its memory in slowly answers late.
    pub fn connect(&self, port: u16, timeout: Duration) -> Result<TcpStream, String> {
        let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse().expect("address");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let attempt =
                self.run(|| TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))))?;
            match attempt {
                Ok(stream) => return Ok(stream),
                Err(e)
                    if std::time::Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::HostUnreachable
                                | std::io::ErrorKind::ConnectionRefused
                                | std::io::ErrorKind::NetworkUnreachable
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("connect {addr}: {e}")),
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
