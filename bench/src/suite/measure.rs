//! One function's measurements: boot and warm invocations of a booted VM, its snapshot, the
//! REAP recording restore, and cold restores per mode.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::functions::SuiteFunction;
use super::options::Mode;
use test_support::function_vm::{FunctionVm, VmSpec, AGENT_PORT};
use test_support::http::HttpConn;
use test_support::lab_fault::{self, LabFault};
use test_support::netns::NetNs;
use test_support::restore::{
    create_snapshot, flushed_metrics, set_vm_state, wait_for_invocation_signals, Vmm,
};
use test_support::{evict_for_cold_run, guest_shut_down, wait_for_exit, GuestArtifacts, Scratch};

/// A function's snapshot files.
pub struct SnapshotFiles {
    pub dir: PathBuf,
}

impl SnapshotFiles {
    pub fn vmstate(&self) -> PathBuf {
        self.dir.join("vmstate")
    }
    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }
    /// Where the Reap backend keeps the WS by default: next to the memory file.
    pub fn ws(&self) -> PathBuf {
        self.dir.join("memory.ws")
    }
}

/// What the booted VM gave.
pub struct Booted {
    /// reapvm started to the agent's `GET /ready` (function imported).
    pub boot_ms: f64,
    /// The first invocation of the booted VM (nothing in memory yet for the handler).
    pub first_invocation_ms: f64,
    pub warm_ms: Vec<f64>,
    /// reapvm's resident memory other than guest RAM.
    pub vmm_rss_overhead_kib: u64,
}

/// One restore and its first invocation.
pub struct Restore {
    /// `PUT /snapshot/load` (resume_vm) sent to answered.
    pub load_ms: f64,
    /// Connect plus the first invocation, after the load returned.
    pub invoke_ms: f64,
    pub faults_on_demand: u64,
    pub bytes_read: u64,
    /// The backend's own account ("record", "prefetch", ...).
    pub backend_mode: String,
    pub ws_pages_recorded: u64,
    pub ws_error: Option<String>,
}

impl Restore {
    /// The cold-start latency a caller sees: load request to the function's answer.
    pub fn latency_ms(&self) -> f64 {
        self.load_ms + self.invoke_ms
    }
}

fn check_answer(f: &SuiteFunction, status: u16, body: &[u8], when: &str) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    if status != 200 || !text.starts_with(f.answer_prefix) {
        return Err(format!(
            "{} answered {status} {:?} {when}; expected 200 starting with {:?}",
            f.name,
            text.chars().take(300).collect::<String>(),
            f.answer_prefix
        ));
    }
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// reapvm's resident set minus guest RAM (the mappings of at least the guest's size).
fn vmm_rss_overhead_kib(pid: u32, guest_mib: u64) -> Result<u64, String> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let (mut total, mut size) = (0u64, 0u64);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) if size < guest_mib * 1024 => {
                total += v.parse::<u64>().unwrap_or(0)
            }
            _ => {}
        }
    }
    Ok(total)
}

/// Boots `f`, checks its answers, times warm invocations, and leaves a Full snapshot of the
/// paused VM in `files`.
pub fn boot_and_snapshot(
    guest: &GuestArtifacts,
    f: &SuiteFunction,
    runs: usize,
    files: &SnapshotFiles,
) -> Result<Booted, String> {
    let scratch = Scratch::new(&format!("suite-{}", f.name));
    let mut spec = VmSpec::read_only(guest);
    spec.function = Some(f.name.into());
    spec.mem_mib = f.mem_mib;
    spec.api = true;
    let t = Instant::now();
    let vm = FunctionVm::boot(guest, &spec, &scratch)?;
    let boot_ms = ms(t);
    let path = format!("/invoke/{}", f.name);
    let mut conn = vm.conn()?;
    let t = Instant::now();
    let (status, body) = conn.request("POST", &path, f.body)?;
    let first_invocation_ms = ms(t);
    check_answer(f, status, &body, "on its first invocation after boot")?;
    // Warm-up, then the warm runs on the same keep-alive connection.
    for _ in 0..2 {
        let (status, body) = conn.request("POST", &path, f.body)?;
        check_answer(f, status, &body, "warming up")?;
    }
    let mut warm_ms = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let (status, body) = conn.request("POST", &path, f.body)?;
        warm_ms.push(ms(t));
        check_answer(f, status, &body, "warm")?;
    }
    drop(conn);
    let vmm_rss_overhead_kib = vmm_rss_overhead_kib(vm.pid(), f.mem_mib)?;
    let socket = scratch.path("api.sock");
    // The first invocation, two warm-ups and the warm runs.
    let answered = 3 + runs as u64;
    wait_for_invocation_signals(
        &socket,
        vm.metrics_path(),
        answered,
        Duration::from_secs(60),
    )?;
    set_vm_state(&socket, "Paused")?;
    std::fs::create_dir_all(&files.dir).map_err(|e| format!("{}: {e}", files.dir.display()))?;
    let _ = std::fs::remove_file(files.ws());
    create_snapshot(&socket, "Full", &files.vmstate(), &files.memory())?;
    drop(vm);
    Ok(Booted {
        boot_ms,
        first_invocation_ms,
        warm_ms,
        vmm_rss_overhead_kib,
    })
}

/// The longest a restored function may take to answer its invocation: the lab's slowest
/// (lr_training's recording restore, about 30 s) several times over. Longer is a stall.
const INVOCATION_DEADLINE: Duration = Duration::from_secs(180);

/// Restores `files` with `mode` in a fresh reapvm and invokes `f` once. A guest that
/// triple-faults or stalls is announced as the KVM lab's fault there (the lab runner, not
/// this code, measures again).
pub fn restore_and_invoke(
    f: &SuiteFunction,
    files: &SnapshotFiles,
    mode: Mode,
    cold: bool,
) -> Result<Restore, String> {
    let scratch = Scratch::new(&format!("suite-restore-{}", f.name));
    let metrics = scratch.path("metrics.json");
    let mut underway = Underway::default();
    restore_and_invoke_in(f, files, mode, cold, &scratch, &metrics, &mut underway).map_err(
        |message| {
            if let Some(vmm) = underway.vmm.as_mut() {
                wait_for_exit(&mut vmm.child, Duration::from_secs(5));
            }
            let fault = if guest_shut_down(&metrics) {
                LabFault::GuestShutdown
            } else if underway.stalled {
                LabFault::Stalled
            } else {
                return message;
            };
            let what = format!("{} restored with {}", f.name, mode.label());
            format!("{}. {message}", lab_fault::announce(fault, &what))
        },
    )
}

/// What a restore that fails leaves for its caller to look at.
#[derive(Default)]
struct Underway {
    /// The restored VM's reapvm, while it runs.
    vmm: Option<Vmm>,
    /// Its guest never answered the invocation.
    stalled: bool,
}

fn restore_and_invoke_in(
    f: &SuiteFunction,
    files: &SnapshotFiles,
    mode: Mode,
    cold: bool,
    scratch: &Scratch,
    metrics: &Path,
    underway: &mut Underway,
) -> Result<Restore, String> {
    if cold {
        for path in [files.vmstate(), files.memory(), files.ws()] {
            if path.exists() {
                evict_for_cold_run(&path)?;
            }
        }
    }
    let ns = NetNs::with_tap("suite")?;
    let vmm = underway
        .vmm
        .insert(Vmm::start(&ns, &scratch.path("api.sock"))?);
    std::fs::write(metrics, b"").map_err(|e| e.to_string())?;
    vmm.put_metrics(metrics)?;
    let body = serde_json::json!({
        "snapshot_path": files.vmstate(),
        "mem_backend": mode.backend(&files.memory()),
        "resume_vm": true,
    });
    let t = Instant::now();
    let loaded = vmm.load_body(&body)?;
    let load_ms = ms(t);
    if loaded.0 != 204 {
        return Err(format!(
            "{} {}: snapshot/load answered {} {}\n--- reapvm ---\n{}",
            f.name,
            mode.label(),
            loaded.0,
            loaded.1,
            vmm.log_tail()
        ));
    }
    let t = Instant::now();
    let answer = ns
        .connect(AGENT_PORT, Duration::from_secs(60))
        .and_then(|s| HttpConn::new(s, INVOCATION_DEADLINE))
        .and_then(|mut c| c.request("POST", &format!("/invoke/{}", f.name), f.body));
    let invoke_ms = ms(t);
    let (status, answer) = answer.map_err(|e| {
        underway.stalled = t.elapsed() >= INVOCATION_DEADLINE;
        format!(
            "{} {}: {e}{}\n--- reapvm ---\n{}",
            f.name,
            mode.label(),
            if underway.stalled {
                format!(" (no answer in {INVOCATION_DEADLINE:?}: the guest stalled)")
            } else {
                String::new()
            },
            vmm.log_tail()
        )
    })?;
    check_answer(
        f,
        status,
        &answer,
        &format!("after a {} restore", mode.label()),
    )?;
    let line = flushed_metrics(&vmm.socket, metrics)?;
    let m = &line["memory_restore"];
    let restore = Restore {
        load_ms,
        invoke_ms,
        faults_on_demand: m["faults_on_demand"].as_u64().unwrap_or(0),
        bytes_read: m["bytes_read"].as_u64().unwrap_or(0),
        backend_mode: m["mode"].as_str().unwrap_or("").to_string(),
        ws_pages_recorded: m["ws_pages_recorded"].as_u64().unwrap_or(0),
        ws_error: m["ws_error"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    };
    if restore.backend_mode == "record" {
        // The WS file is written once the recording ends (the answered invocation).
        let deadline = Instant::now() + Duration::from_secs(120);
        while !files.ws().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !files.ws().exists() {
            return Err(format!(
                "{}: the recording restore wrote no WS file\n{}",
                f.name,
                vmm.log_tail()
            ));
        }
    }
    underway.vmm = None;
    drop(ns);
    Ok(restore)
}
