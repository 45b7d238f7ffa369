//! One reapvm process inside an instance's network namespace, driven through its
//! Firecracker-style API socket.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::http::{unix_request, HttpError};
use crate::netns::{NetNs, NetNsError, GUEST_IP, GUEST_MAC, HOST_IP, TAP};
use crate::spec::ColdStart;

const API_TIMEOUT: Duration = Duration::from_secs(120);
const SOCKET_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {reapvm}: {source}")]
    Spawn {
        reapvm: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error("reapvm exited ({status}) {when}; its log ends:\n{log}")]
    Exited {
        status: String,
        when: &'static str,
        log: String,
    },
    #[error("reapvm's API socket {path} did not appear within {SOCKET_WAIT:?}")]
    NoSocket { path: String },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("reapvm answered {method} {uri} with {status}: {answer}")]
    Api {
        method: &'static str,
        uri: &'static str,
        status: u16,
        answer: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read reapvm's metrics {path}: {reason}")]
    Metrics { path: String, reason: String },
}

/// The guest's kernel command line: the test-proven console and i8042 settings, a static
/// address for eth0, and the function the agent serves.
pub fn boot_args(function: &str) -> String {
    format!(
        "console=ttyS0 quiet reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp \
         i8042.dumbkbd ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off reapvm.function={function}"
    )
}

/// A Firecracker configuration file booting `function` from the read-only `rootfs`.
pub fn boot_config(
    kernel: &Path,
    rootfs: &Path,
    function: &str,
    vcpus: u32,
    mem_mib: u64,
) -> Value {
    json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args(function)},
        "drives": [{"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": true}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC}],
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
}

/// A running reapvm. `stop` ends it; a watcher task reaps it and reports its exit, so a VM
/// that dies on its own (SIGKILL, a guest shutdown) is seen at once.
pub struct Vmm {
    pub pid: u32,
    pub api_socket: PathBuf,
    pub metrics_path: PathBuf,
    pub log_path: PathBuf,
    /// When the process was started (the breakdown's LoadVMM starts here).
    pub started: Instant,
    exited: watch::Receiver<Option<String>>,
    kill: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

impl Vmm {
    /// Starts reapvm in `ns`, its files in `dir`; boots at once from `config` when given,
    /// else waits for a snapshot load. Returns at once (record `pid` before anything can
    /// fail); `wait_for_api` waits for its API socket.
    pub async fn spawn(
        reapvm: &Path,
        dir: &Path,
        ns: &NetNs,
        config: Option<&Value>,
    ) -> Result<Self, VmmError> {
        let api_socket = dir.join("api.sock");
        let metrics_path = dir.join("metrics.json");
        let log_path = dir.join("reapvm.log");
        let write = |path: &Path, bytes: &[u8]| {
            std::fs::write(path, bytes).map_err(|source| VmmError::Write {
                path: path.display().to_string(),
                source,
            })
        };
        let log = std::fs::File::create(&log_path).map_err(|source| VmmError::Write {
            path: log_path.display().to_string(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| VmmError::Write {
            path: log_path.display().to_string(),
            source,
        })?;
        let mut command = tokio::process::Command::new(reapvm);
        command
            .arg("--api-sock")
            .arg(&api_socket)
            .arg("--metrics-path")
            .arg(&metrics_path);
        if let Some(config) = config {
            let path = dir.join("vm.json");
            write(&path, config.to_string().as_bytes())?;
            command.arg("--config-file").arg(path);
        }
        let ns_file = ns.open()?;
        let ns_fd = ns_file.as_raw_fd();
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the child between fork and exec and only makes the
        // setns system call (async-signal-safe) on a descriptor the parent keeps open
        // until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = command.spawn().map_err(|source| VmmError::Spawn {
            reapvm: reapvm.display().to_string(),
            source,
        })?;
        drop(ns_file);
        let pid = child.id().unwrap_or(0);
        let (exit_tx, exited) = watch::channel(None);
        let (kill, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let text = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown: {e}"),
            };
            let _ = exit_tx.send(Some(text));
        });
        Ok(Self {
            pid,
            api_socket,
            metrics_path,
            log_path,
            started,
            exited,
            kill: std::sync::Mutex::new(Some(kill)),
        })
    }

    /// Waits until the API socket accepts connections (a socket file is there a moment
    /// before reapvm listens on it).
    pub async fn wait_for_api(&self) -> Result<(), VmmError> {
        while self.started.elapsed() < SOCKET_WAIT {
            if let Some(status) = self.exit_status() {
                return Err(self.exited_error(status, "before its API socket accepted"));
            }
            if tokio::net::UnixStream::connect(&self.api_socket)
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Err(VmmError::NoSocket {
            path: self.api_socket.display().to_string(),
        })
    }

    /// How the process ended, once it has.
    pub fn exit_status(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// How the process ended, waiting up to `wait` for it: a failed API call may be seen
    /// a moment before the process is reaped.
    pub async fn exited_within(&self, wait: Duration) -> Option<String> {
        let mut exited = self.exited.clone();
        let _ = tokio::time::timeout(wait, exited.wait_for(Option::is_some)).await;
        self.exit_status()
    }

    /// A receiver that changes when the process ends.
    pub fn exit_watch(&self) -> watch::Receiver<Option<String>> {
        self.exited.clone()
    }

    pub fn exited_error(&self, status: String, when: &'static str) -> VmmError {
        VmmError::Exited {
            status,
            when,
            log: self.log_tail(30),
        }
    }

    /// The last `lines` lines of reapvm's console and log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills reapvm and waits until it has been reaped.
    pub async fn stop(&self) {
        let kill = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(kill) = kill {
            let _ = kill.send(());
        }
        let mut exited = self.exited.clone();
        let _ = exited.wait_for(Option::is_some).await;
    }

    async fn api(
        &self,
        method: &'static str,
        uri: &'static str,
        body: Value,
    ) -> Result<Value, VmmError> {
        let answer = unix_request(
            &self.api_socket,
            method,
            uri,
            body.to_string().into_bytes(),
            API_TIMEOUT,
        )
        .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                return Err(match self.exited_within(Duration::from_millis(500)).await {
                    Some(status) => self.exited_error(status, "during an API call"),
                    None => e.into(),
                })
            }
        };
        if !(200..300).contains(&answer.status) {
            return Err(VmmError::Api {
                method,
                uri,
                status: answer.status,
                answer: answer.text(),
            });
        }
        Ok(serde_json::from_slice(&answer.body).unwrap_or(Value::Null))
    }

    /// Restores the snapshot (`vmstate`, `memory`) with `mode`'s backend and resumes it.
    pub async fn load_snapshot(
        &self,
        mode: ColdStart,
        vmstate: &Path,
        memory: &Path,
        ws: &Path,
    ) -> Result<(), VmmError> {
        let backend_type = mode.backend_type().unwrap_or("File");
        let mut backend = json!({"backend_type": backend_type, "backend_path": memory});
        if mode == ColdStart::Reap {
            backend["ws_path"] = json!(ws);
        }
        self.api(
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": vmstate, "mem_backend": backend, "resume_vm": true}),
        )
        .await
        .map(|_| ())
    }

    pub async fn pause(&self) -> Result<(), VmmError> {
        self.api("PATCH", "/vm", json!({"state": "Paused"}))
            .await
            .map(|_| ())
    }

    /// A Full snapshot of the paused VM.
    pub async fn snapshot(&self, vmstate: &Path, memory: &Path) -> Result<(), VmmError> {
        self.api(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": memory}),
        )
        .await
        .map(|_| ())
    }

    /// Has reapvm write a metrics line and returns it.
    pub async fn metrics(&self) -> Result<Value, VmmError> {
        self.api("PUT", "/actions", json!({"action_type": "FlushMetrics"}))
            .await?;
        let path = self.metrics_path.display().to_string();
        let text = tokio::fs::read_to_string(&self.metrics_path)
            .await
            .map_err(|e| VmmError::Metrics {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let last = text.lines().last().ok_or_else(|| VmmError::Metrics {
            path: path.clone(),
            reason: "the file is empty".into(),
        })?;
        serde_json::from_str(last).map_err(|e| VmmError::Metrics {
            path,
            reason: e.to_string(),
        })
    }

    /// Waits until reapvm has seen `count` answered-invocation signals from the agent: a
    /// snapshot taken before the last one is out would carry it, and a REAP recording from
    /// that snapshot would end before any invocation (docs/reap.md).
    pub async fn wait_for_invocation_signals(
        &self,
        count: u64,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let start = Instant::now();
        loop {
            let seen = self.metrics().await?["agent"]["invocations_signalled"]
                .as_u64()
                .unwrap_or(0);
            if seen >= count {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(VmmError::Metrics {
                    path: self.metrics_path.display().to_string(),
                    reason: format!(
                        "{seen} invocation signals from the agent after {timeout:?}, expected {count}"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
