//! Replay VMs on this host's own KVM (docs/replay.md): the no-Linux replay guest
//! (guest/replay) with a trace as its initrd, booted, snapshotted, and restored with each
//! memory backend; the VMM's metrics say when the replay was done and what it read. No guest
//! network: the guest talks to the VMM through its MMIO control page only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use snapshot::replay_trace::{Touch, Trace, GUEST_RESERVED_PAGES};
use test_support::http::unix_request;
use test_support::{evict_for_cold_run, reapvm_bin, repo_root, wait_for_socket, Trial};

/// The replay guest as scripts/build-replay-guest.sh builds it.
pub fn replay_guest() -> Result<PathBuf, String> {
    let path = repo_root().join("target/replay/release/reapvm-replay");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} does not exist: run scripts/build-replay-guest.sh",
            path.display()
        ))
    }
}

/// Runs the suite `name` of `trials` on this host's own KVM with the replay guest (never in
/// the KVM lab: the replay guest runs in guest user mode, which kvm-pvm hosts run natively).
/// Without /dev/kvm or the replay guest the suite fails, loudly.
pub fn run_host_suite(name: &str, trials: Vec<Trial>) -> ExitCode {
    run_host_suite_with(name, trials, libtest_mimic::Arguments::from_args())
}

/// As `run_host_suite`, one test at a time (unless `--test-threads` says otherwise): for
/// tests that time their guest, which a guest of another test on a 2-core host would slow.
pub fn run_host_suite_one_at_a_time(name: &str, trials: Vec<Trial>) -> ExitCode {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads.get_or_insert(1);
    run_host_suite_with(name, trials, args)
}

fn run_host_suite_with(name: &str, trials: Vec<Trial>, args: libtest_mimic::Arguments) -> ExitCode {
    if !args.list {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("{name} suite: /dev/kvm does not exist here");
            return ExitCode::FAILURE;
        }
        if let Err(e) = replay_guest() {
            eprintln!("{name} suite: {e}");
            return ExitCode::FAILURE;
        }
        println!("{name} suite: running directly on this host's KVM");
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// A function-like trace over pages below `trace_pages`: data in most pages, `touches`
/// distinct pages touched in a seeded order, one in four a write.
pub fn synthetic_trace(trace_pages: u64, touches: usize) -> Trace {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let fills = (GUEST_RESERVED_PAGES..trace_pages)
        .step_by(64)
        .map(|first| (first, 40))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut list = Vec::new();
    while list.len() < touches {
        let page = GUEST_RESERVED_PAGES + next() % (trace_pages - GUEST_RESERVED_PAGES);
        if seen.insert(page) {
            list.push(Touch {
                page: page as u32,
                write: next() % 4 == 0,
                gap: 2000,
            });
        }
    }
    Trace {
        fills,
        touches: list,
    }
}

/// Writes `trace` to `dir/trace.bin` (the replay guest's initrd).
pub fn write_trace(dir: &Path, trace: &Trace) -> Result<PathBuf, String> {
    let path = dir.join("trace.bin");
    std::fs::write(&path, trace.encode()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Writes a disk of `mib` MiB holding the pattern the replay guest's virtio checks expect
/// (guest/replay/src/virtio.rs, `disk_byte`).
pub fn write_pattern_disk(path: &Path, mib: u64) -> Result<(), String> {
    let bytes: Vec<u8> = (0..(mib << 20) / 8)
        .flat_map(|word: u64| {
            (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03).to_le_bytes()
        })
        .collect();
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A reapvm process with its API socket and metrics file in `dir`, killed when dropped.
pub struct ReplayVmm {
    child: Child,
    pub socket: PathBuf,
    metrics: PathBuf,
    log: PathBuf,
}

impl Drop for ReplayVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ReplayVmm {
    /// Starts reapvm (with `config`, a config file, or waiting for the API).
    pub fn start(dir: &Path, tag: &str, config: Option<&Path>) -> Result<Self, String> {
        let socket = dir.join(format!("{tag}.sock"));
        let metrics = dir.join(format!("{tag}.metrics"));
        let log = dir.join(format!("{tag}.log"));
        let _ = std::fs::remove_file(&socket);
        std::fs::write(&metrics, b"").map_err(|e| format!("{}: {e}", metrics.display()))?;
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(reapvm_bin());
        cmd.arg("--api-sock")
            .arg(&socket)
            .arg("--metrics-path")
            .arg(&metrics);
        if let Some(config) = config {
            cmd.arg("--config-file").arg(config);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start reapvm: {e}"))?;
        let vmm = Self {
            child,
            socket,
            metrics,
            log,
        };
        wait_for_socket(&vmm.socket, Duration::from_secs(10))?;
        Ok(vmm)
    }

    pub fn api(&self, method: &str, path: &str, body: serde_json::Value) -> Result<(), String> {
        let (status, answer) = unix_request(&self.socket, method, path, &body.to_string())?;
        if status != 204 {
            return Err(format!(
                "{method} {path}: {status} {answer}\n--- reapvm ---\n{}",
                self.log_tail()
            ));
        }
        Ok(())
    }

    /// The metrics as of now (FlushMetrics, then the last line).
    pub fn metrics(&self) -> Result<serde_json::Value, String> {
        self.api(
            "PUT",
            "/actions",
            serde_json::json!({"action_type": "FlushMetrics"}),
        )?;
        let text = std::fs::read_to_string(&self.metrics).map_err(|e| e.to_string())?;
        let last = text.lines().last().ok_or("no metrics written")?;
        serde_json::from_str(last).map_err(|e| format!("metrics line {last:?}: {e}"))
    }

    /// Polls the metrics until the replay guest reported `field` (ready or done), or an error.
    pub fn wait_for(&self, field: &str, timeout: Duration) -> Result<serde_json::Value, String> {
        let start = Instant::now();
        loop {
            let m = self.metrics()?;
            let replay = &m["replay"];
            if let Some(error) = replay["error"].as_str().filter(|e| !e.is_empty()) {
                return Err(format!("the replay guest stopped: {error}"));
            }
            if replay[field] == true {
                return Ok(m);
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "the replay guest was not {field} after {timeout:?}\n--- reapvm ---\n{}",
                    self.log_tail()
                ));
            }
            // Not too often: each poll costs the VMM a metrics flush on a busy 2-core host.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` to the reapvm process.
    pub fn signal(&self, signal: i32) -> Result<(), String> {
        // SAFETY: kill(2) on the PID of a child this struct owns and has not reaped.
        if unsafe { libc::kill(self.child.id() as i32, signal) } != 0 {
            return Err(format!("kill: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The metrics file's contents.
    pub fn metrics_text(&self) -> String {
        std::fs::read_to_string(&self.metrics).unwrap_or_default()
    }

    /// Waits up to `timeout` for reapvm to exit by itself; its exit status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        test_support::wait_for_exit(&mut self.child, timeout)
    }

    /// Everything reapvm logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The files of a replay VM's snapshot.
pub struct ReplaySnapshot {
    pub vmstate: PathBuf,
    pub memory: PathBuf,
}

impl ReplaySnapshot {
    pub fn ws(&self) -> PathBuf {
        let mut p = self.memory.as_os_str().to_owned();
        p.push(".ws");
        p.into()
    }
}

/// Writes `dir/replay-vm.json`, the configuration that boots the replay guest with `trace`
/// (a file) in `mem_mib` of memory; returns its path.
pub fn write_boot_config(dir: &Path, trace: &Path, mem_mib: u64) -> Result<PathBuf, String> {
    let config = dir.join("replay-vm.json");
    let body = serde_json::json!({
        "boot-source": {"kernel_image_path": replay_guest()?, "initrd_path": trace, "boot_args": "reapvm-replay"},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
        "replay-control": true,
    });
    std::fs::write(&config, body.to_string()).map_err(|e| format!("{}: {e}", config.display()))?;
    Ok(config)
}

/// Boots the replay guest with `trace` (a file) in `mem_mib` of memory, waits until it is
/// ready (trace checked, memory filled), and snapshots it paused into `dir`.
pub fn boot_and_snapshot(dir: &Path, trace: &Path, mem_mib: u64) -> Result<ReplaySnapshot, String> {
    let config = write_boot_config(dir, trace, mem_mib)?;
    boot_config_and_snapshot(dir, &config)
}

/// Boots the replay guest with the configuration file `config`, waits until it is ready,
/// and snapshots it paused into `dir`.
pub fn boot_config_and_snapshot(dir: &Path, config: &Path) -> Result<ReplaySnapshot, String> {
    let vmm = ReplayVmm::start(dir, "boot", Some(config))?;
    vmm.wait_for("ready", Duration::from_secs(60))?;
    let snap = ReplaySnapshot {
        vmstate: dir.join("vmstate"),
        memory: dir.join("memory"),
    };
    let _ = std::fs::remove_file(snap.ws());
    vmm.api("PATCH", "/vm", serde_json::json!({"state": "Paused"}))?;
    vmm.api(
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": snap.vmstate, "mem_file_path": snap.memory}),
    )?;
    Ok(snap)
}

/// One restore and its replay.
#[derive(Debug, Clone)]
pub struct ReplayRun {
    /// PUT /snapshot/load (resume_vm) sent to answered, at the client.
    pub load_ms: f64,
    /// The VMM's own account: load_snapshot latency, then restore to "done".
    pub vmm_load_ms: f64,
    pub replay_ms: f64,
    pub checksum: u32,
    pub faults_on_demand: u64,
    pub bytes_read: u64,
    pub backend_mode: String,
    pub ws_error: Option<String>,
    /// Where the load's time went, as the VMM measured it: the vmstate read and decoded,
    /// the WS read and checked, the WS installed (before the resume unless chunked).
    pub vmstate_load_us: u64,
    pub ws_fetch_us: u64,
    pub ws_install_us: u64,
    /// The VMM's minor page faults from the restore to now (for File: the host faults that
    /// mapped the memory file's pages).
    pub minor_faults: u64,
    /// Pages of the snapshot and WS files still in the page cache after a cold run's drop
    /// (mincore): 0 when the run was really cold.
    pub resident_pages: u64,
}

impl ReplayRun {
    /// PUT /snapshot/load to the replay's end, as the VMM measured it.
    pub fn latency_ms(&self) -> f64 {
        self.vmm_load_ms + self.replay_ms
    }
}

/// Restores `snap` with `backend` (a mem_backend object) in a fresh reapvm and waits for the
/// replay to finish. `cold` drops the snapshot and WS files from the page cache first.
pub fn restore_and_replay(
    dir: &Path,
    snap: &ReplaySnapshot,
    backend: serde_json::Value,
    cold: bool,
) -> Result<ReplayRun, String> {
    let mut resident_pages = 0;
    if cold {
        for path in [&snap.vmstate, &snap.memory, &snap.ws()] {
            if path.exists() {
                resident_pages += evict_for_cold_run(path)?;
            }
        }
    }
    let vmm = ReplayVmm::start(dir, "restore", None)?;
    let body = serde_json::json!({"snapshot_path": snap.vmstate, "mem_backend": backend, "resume_vm": true});
    let t = Instant::now();
    let (status, answer) = unix_request(&vmm.socket, "PUT", "/snapshot/load", &body.to_string())?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    if status != 204 {
        return Err(format!(
            "snapshot/load ({backend}): {status} {answer}\n--- reapvm ---\n{}",
            vmm.log_tail()
        ));
    }
    let m = vmm.wait_for("done", Duration::from_secs(120))?;
    let r = &m["memory_restore"];
    let run = ReplayRun {
        load_ms,
        vmm_load_ms: m["latencies_us"]["load_snapshot"].as_f64().unwrap_or(0.0) / 1e3,
        replay_ms: r["first_response_us"].as_f64().unwrap_or(0.0) / 1e3,
        checksum: m["replay"]["checksum"].as_u64().unwrap_or(0) as u32,
        faults_on_demand: r["faults_on_demand"].as_u64().unwrap_or(0),
        bytes_read: r["bytes_read"].as_u64().unwrap_or(0),
        backend_mode: r["mode"].as_str().unwrap_or("").to_string(),
        ws_error: r["ws_error"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        vmstate_load_us: r["vmstate_load_us"].as_u64().unwrap_or(0),
        ws_fetch_us: r["ws_fetch_us"].as_u64().unwrap_or(0),
        ws_install_us: r["ws_install_us"].as_u64().unwrap_or(0),
        minor_faults: r["minor_faults"].as_u64().unwrap_or(0),
        resident_pages,
    };
    if run.replay_ms <= 0.0 {
        return Err(format!(
            "the VMM reported no time from the restore to the replay's end\n{}",
            vmm.log_tail()
        ));
    }
    if run.backend_mode == "record" {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !snap.ws().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !snap.ws().exists() {
            return Err(format!(
                "the recording restore wrote no WS\n{}",
                vmm.log_tail()
            ));
        }
    }
    Ok(run)
}
