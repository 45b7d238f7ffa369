//! The orchestrator as a user runs it: reapd in its own state dir and socket, reapctl as a
//! command, raw HTTP for what reapctl never sends. The binaries' paths come from the
//! orchestrator's tests (`env!("CARGO_BIN_EXE_...")` is theirs).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the orchestrator's binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub reapd: PathBuf,
    pub reapctl: PathBuf,
}

pub struct Reapd {
    pub child: Child,
    bins: Binaries,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

/// What a reapctl run printed.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn describe(&self) -> String {
        format!(
            "ok={} stdout={:?} stderr={:?}",
            self.ok, self.stdout, self.stderr
        )
    }
}

impl Reapd {
    /// Starts reapd with its state and socket in `dir`, and `extra` flags.
    pub fn start(bins: &Binaries, dir: &Path, extra: &[String]) -> Result<Self, String> {
        let socket = dir.join("reapd.sock");
        let state_dir = dir.join("state");
        let mut args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ];
        args.extend_from_slice(extra);
        let log = dir.join("reapd.log");
        let child = Self::spawn(&bins.reapd, &args, &log)?;
        let reapd = Self {
            child,
            bins: bins.clone(),
            socket,
            state_dir,
            log,
            args,
        };
        reapd.wait_listening()?;
        Ok(reapd)
    }

    fn spawn(reapd: &Path, args: &[String], log: &Path) -> Result<Child, String> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        Command::new(reapd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start reapd: {e}"))
    }

    fn wait_listening(&self) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "reapd did not listen within 30 s; {}",
            self.log_text()
        ))
    }

    /// Starts reapd again with the same flags (after it ended).
    pub fn restart(&mut self) -> Result<(), String> {
        self.child = Self::spawn(&self.bins.reapd, &self.args, &self.log)?;
        self.wait_listening()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `reapctl --socket SOCKET ARGS...`, killed after 15 minutes (a cold start in
    /// the KVM lab takes seconds; a hang must end the test, not the CI job).
    pub fn ctl(&self, args: &[&str]) -> Ran {
        self.ctl_within(args, Duration::from_secs(900))
    }

    /// The same with a deadline of one's own.
    pub fn ctl_within(&self, args: &[&str], deadline: Duration) -> Ran {
        let mut cmd = Command::new(&self.bins.reapctl);
        cmd.arg("--socket").arg(&self.socket).args(args);
        let out = crate::run_command(&mut cmd, deadline);
        let mut stderr = out.stderr;
        if out.timed_out {
            stderr.push_str(&format!(
                "\n(reapctl killed: no answer within {deadline:?})"
            ));
        }
        Ran {
            ok: out.code == Some(0),
            stdout: out.stdout,
            stderr,
        }
    }

    /// One HTTP/1.1 request to reapd, as written (reapctl never sends a malformed or
    /// oversized one); returns (status, body).
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, String), String> {
        crate::http::unix_request_bytes(&self.socket, method, path, body)
    }

    /// Sends `signal` to reapd and waits for it to end; returns its exit code.
    pub fn signal_and_wait(&mut self, signal: i32) -> Result<Option<i32>, String> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("reapd still runs 120 s after signal {signal}"))
    }

    /// The network namespaces whose names start with `prefix`.
    pub fn namespaces_like(prefix: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Reapd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal_and_wait(libc::SIGTERM);
        }
    }
}
