//! Restoring snapshots in fresh reapvm processes, and the API calls around it.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use super::http::unix_request;
use super::netns::NetNs;
use super::{reapvm_bin, wait_for_socket};

/// A reapvm waiting on its API socket, inside `ns`.
pub struct Vmm {
    pub child: Child,
    pub socket: PathBuf,
}

impl Vmm {
    /// Starts reapvm; its console and log go to `SOCKET.log` (see `log_tail`).
    pub fn start(ns: &NetNs, socket: &Path) -> Result<Self, String> {
        let _ = std::fs::remove_file(socket);
        let log = std::fs::File::create(Self::log_path(socket)).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = ns
            .command(reapvm_bin())
            .arg("--api-sock")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| e.to_string())?;
        wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(Self {
            child,
            socket: socket.to_path_buf(),
        })
    }

    /// `PUT /metrics`: reapvm writes its metrics to `path` (read them with `flushed_metrics`).
    pub fn put_metrics(&self, path: &Path) -> Result<(), String> {
        put_metrics(&self.socket, path)
    }

    /// `PUT /snapshot/load` with `body` as given.
    pub fn load_body(&self, body: &serde_json::Value) -> Result<(u16, String), String> {
        unix_request(&self.socket, "PUT", "/snapshot/load", &body.to_string())
    }

    fn log_path(socket: &Path) -> PathBuf {
        let mut p = socket.as_os_str().to_owned();
        p.push(".log");
        p.into()
    }

    /// The last lines reapvm printed (console and log), for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(Self::log_path(&self.socket)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(70)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn load(&self, vmstate: &Path, mem: &Path) -> Result<(u16, String), String> {
        self.load_with("File", vmstate, mem)
    }

    pub fn load_with(
        &self,
        backend: &str,
        vmstate: &Path,
        backend_path: &Path,
    ) -> Result<(u16, String), String> {
        let body = serde_json::json!({
            "snapshot_path": vmstate,
            "mem_backend": {"backend_type": backend, "backend_path": backend_path},
            "resume_vm": true,
        });
        unix_request(&self.socket, "PUT", "/snapshot/load", &body.to_string())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks the VMM to flush its metrics and returns the last line written.
pub fn flushed_metrics(socket: &Path, metrics_path: &Path) -> Result<serde_json::Value, String> {
    let (status, answer) = unix_request(
        socket,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    )?;
    if status != 204 {
        return Err(format!("FlushMetrics: {status} {answer}"));
    }
    let text = std::fs::read_to_string(metrics_path).map_err(|e| e.to_string())?;
    let last = text.lines().last().ok_or("the metrics file is empty")?;
    serde_json::from_str(last).map_err(|e| format!("metrics line {last:?}: {e}"))
}

pub fn api(socket: &Path, method: &str, path: &str, body: serde_json::Value) -> Result<(), String> {
    let (status, answer) = unix_request(socket, method, path, &body.to_string())?;
    if status != 204 {
        return Err(format!("{method} {path}: {status} {answer}"));
    }
    Ok(())
}

/// `PATCH /vm` to Paused or Resumed.
pub fn set_vm_state(socket: &Path, state: &str) -> Result<(), String> {
    api(
        socket,
        "PATCH",
        "/vm",
        serde_json::json!({ "state": state }),
    )
}

/// `PUT /snapshot/create` of `kind` (Full or Diff) into `vmstate` and `mem`.
pub fn create_snapshot(
    socket: &Path,
    kind: &str,
    vmstate: &Path,
    mem: &Path,
) -> Result<(), String> {
    api(
        socket,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": kind, "snapshot_path": vmstate, "mem_file_path": mem}),
    )
}

/// `PUT /metrics` on the API at `socket`: reapvm writes its metrics to `path`.
pub fn put_metrics(socket: &Path, path: &Path) -> Result<(), String> {
    api(
        socket,
        "PUT",
        "/metrics",
        serde_json::json!({ "metrics_path": path }),
    )
}

/// Waits until reapvm has seen `answered` invocation signals from the agent (metrics
/// `agent.invocations_signalled`; reapvm writes its metrics to `metrics_path` already). The
/// agent signals after it sends an answer: a snapshot taken before the signal is out would
/// carry it, and its restore would see it at once and end a REAP recording before any
/// invocation.
pub fn wait_for_invocation_signals(
    socket: &Path,
    metrics_path: &Path,
    answered: u64,
    timeout: Duration,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        let m = flushed_metrics(socket, metrics_path)?;
        let seen = m["agent"]["invocations_signalled"].as_u64().unwrap_or(0);
        if seen >= answered {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "reapvm saw {seen} invocation signals from the agent after {timeout:?}, expected {answered}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
