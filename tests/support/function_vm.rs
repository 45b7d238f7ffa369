//! A function VM for tests: the Debian rootfs with the agent, a tap in its own network
//! namespace, `reapvm` running inside that namespace, and an HTTP connection to the agent.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::http::HttpConn;
use super::lab_fault::{self, LabFault};
use super::netns::{NetNs, GUEST_IP, HOST_IP, TAP};
use super::{
    detect_place, guest_shut_down, reapvm_bin, test_boot_args, wait_for_exit, GuestArtifacts,
    Place, Scratch,
};

pub const AGENT_PORT: u16 = 8080;
/// The slowest function boots in about 73 s in a quiet lab (cnn_serving, docs/suite/results.md);
/// two booting at once in the lab's two CPUs take about twice that.
pub const READY_DEADLINE: Duration = Duration::from_secs(200);

pub struct Drive {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Firecracker's `rate_limiter` object (None: no limit).
    pub rate_limiter: Option<serde_json::Value>,
}

pub struct VmSpec {
    pub vcpus: u32,
    pub mem_mib: u64,
    pub rootfs: PathBuf,
    pub root_read_only: bool,
    pub extra_drives: Vec<Drive>,
    /// The function `POST /invoke` serves.
    pub function: Option<String>,
    /// Serve the API on `api.sock` in the scratch folder (the VM still boots from the file).
    pub api: bool,
    /// Log dirty pages (machine-config track_dirty_pages), for Diff snapshots.
    pub track_dirty_pages: bool,
    /// The tap does not exist when reapvm starts: reapvm makes it (as Firecracker does) and
    /// the test sets it up once it appears.
    pub tap_made_by_reapvm: bool,
    /// `rx_rate_limiter` and `tx_rate_limiter` of the network interface (null: none).
    pub net_rate_limiters: [serde_json::Value; 2],
    /// The entropy device (`entropy` in the config file).
    pub entropy: bool,
    /// A vsock device for guest CID 3 with this `uds_path`.
    pub vsock: Option<PathBuf>,
    /// `machine-config.cpu_template` (a static template's name).
    pub cpu_template: Option<String>,
    /// The config file's `cpu-config` (a custom template).
    pub cpu_config: Option<serde_json::Value>,
    /// The config file's `mmds-config` (its interface is `eth0`).
    pub mmds_config: Option<serde_json::Value>,
    /// Another VMM with Firecracker's command line and config file to boot the VM instead
    /// of reapvm (Firecracker itself, built elsewhere: `lab_faults --vmm` compares the
    /// lab's faults under both).
    pub vmm: Option<PathBuf>,
}

impl VmSpec {
    /// One vCPU, 256 MiB, the shared rootfs read-only.
    pub fn read_only(guest: &GuestArtifacts) -> Self {
        Self {
            vcpus: 1,
            mem_mib: 256,
            rootfs: guest.rootfs.clone(),
            root_read_only: true,
            extra_drives: Vec::new(),
            function: None,
            api: false,
            track_dirty_pages: false,
            tap_made_by_reapvm: false,
            net_rate_limiters: [serde_json::Value::Null, serde_json::Value::Null],
            entropy: false,
            vsock: None,
            cpu_template: None,
            cpu_config: None,
            mmds_config: None,
            vmm: None,
        }
    }
}

/// A private copy of the rootfs for a guest that writes to it (sparse: only used blocks).
pub fn private_rootfs(guest: &GuestArtifacts, scratch: &Scratch) -> Result<PathBuf, String> {
    let path = scratch.path("rootfs.ext4");
    let status = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(&guest.rootfs)
        .arg(&path)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cannot copy {} to {}",
            guest.rootfs.display(),
            path.display()
        ));
    }
    Ok(path)
}

pub fn config_json(kernel: &Path, spec: &VmSpec) -> String {
    let mut drives = vec![serde_json::json!({
        "drive_id": "rootfs",
        "path_on_host": spec.rootfs,
        "is_root_device": true,
        "is_read_only": spec.root_read_only,
    })];
    for d in &spec.extra_drives {
        drives.push(serde_json::json!({
            "drive_id": d.id, "path_on_host": d.path, "is_root_device": false, "is_read_only": d.read_only,
            "rate_limiter": d.rate_limiter,
        }));
    }
    let mut extra = format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off");
    if let Some(f) = &spec.function {
        extra.push_str(&format!(" reapvm.function={f}"));
    }
    let mut config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": test_boot_args(&extra)},
        "drives": drives,
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:ac:10:00:02",
            "rx_rate_limiter": spec.net_rate_limiters[0], "tx_rate_limiter": spec.net_rate_limiters[1]}],
        "machine-config": {
            "vcpu_count": spec.vcpus,
            "mem_size_mib": spec.mem_mib,
            "track_dirty_pages": spec.track_dirty_pages,
        },
    });
    if spec.entropy {
        config["entropy"] = serde_json::json!({});
    }
    if let Some(name) = &spec.cpu_template {
        config["machine-config"]["cpu_template"] = serde_json::json!(name);
    }
    if let Some(template) = &spec.cpu_config {
        config["cpu-config"] = template.clone();
    }
    if let Some(mmds) = &spec.mmds_config {
        config["mmds-config"] = mmds.clone();
    }
    if let Some(uds_path) = &spec.vsock {
        config["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": uds_path});
    }
    config.to_string()
}

fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

/// How a boot that never became ready fails.
const NOT_READY: &str = "the agent was not ready";

/// Why a boot failed.
#[derive(Debug)]
pub enum BootFailure {
    /// reapvm's metrics count a guest shutdown (a triple fault).
    GuestShutdown(String),
    /// The agent did not become ready in time.
    Stalled(String),
    Other(String),
}

pub struct FunctionVm {
    pub ns: NetNs,
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    metrics_path: PathBuf,
}

impl FunctionVm {
    /// Boots the VM and waits until the agent answers `GET /ready` with 200.
    /// `scratch` holds the configuration (and whatever else the caller put there); it must
    /// outlive the VM.
    pub fn boot(guest: &GuestArtifacts, spec: &VmSpec, scratch: &Scratch) -> Result<Self, String> {
        // The lab's emulated nested SVM now and then triple-faults a booting guest or leaves
        // it stalled (docs/kvm-lab.md). Nothing here boots again: the failure is announced
        // to the lab runner, the one layer that retries (a fresh lab runs the test again).
        let (fault, err) = match Self::boot_attempt(guest, spec, scratch, READY_DEADLINE) {
            Ok(vm) => return Ok(vm),
            Err(BootFailure::GuestShutdown(e)) => (LabFault::GuestShutdown, e),
            Err(BootFailure::Stalled(e)) => (LabFault::Stalled, e),
            Err(BootFailure::Other(e)) => return Err(e),
        };
        Err(format!(
            "{}. {err}",
            lab_fault::announce(fault, "a function VM's boot")
        ))
    }

    /// One boot: the agent must answer within `ready_deadline`.
    pub fn boot_attempt(
        guest: &GuestArtifacts,
        spec: &VmSpec,
        scratch: &Scratch,
        ready_deadline: Duration,
    ) -> Result<Self, BootFailure> {
        let ns = if spec.tap_made_by_reapvm {
            NetNs::without_tap("fn")
        } else {
            NetNs::with_tap("fn")
        }
        .map_err(BootFailure::Other)?;
        let config = scratch.write("vm.json", config_json(&guest.vmlinux, spec));
        // Metrics from the start: a guest shutdown is counted there (and at exit).
        let metrics_path = scratch.path("reapvm-metrics.json");
        let _ = std::fs::remove_file(&metrics_path);
        let mut command = ns.command(spec.vmm.clone().unwrap_or_else(reapvm_bin));
        command.arg("--metrics-path").arg(&metrics_path);
        if spec.api {
            command.arg("--api-sock").arg(scratch.path("api.sock"));
        } else {
            command.arg("--no-api");
        }
        let mut child = command
            .args(["--boot-timer", "--config-file"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BootFailure::Other(format!("cannot start reapvm: {e}")))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), stdout.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        let mut vm = Self {
            ns,
            child,
            stdout,
            stderr,
            metrics_path,
        };
        if spec.tap_made_by_reapvm {
            vm.configure_created_tap().map_err(BootFailure::Other)?;
        }
        match vm.wait_ready(ready_deadline) {
            Ok(()) => Ok(vm),
            Err(e) => {
                wait_for_exit(&mut vm.child, Duration::from_secs(5));
                // Only another VMM's log is searched: reapvm's output carries the guest's
                // console, which a guest could fill with any words.
                let other_vmm_saw_it = spec.vmm.is_some() && vm.firecracker_saw_a_shutdown();
                if guest_shut_down(&vm.metrics_path) || other_vmm_saw_it {
                    Err(BootFailure::GuestShutdown(e))
                } else if e.contains(NOT_READY) {
                    Err(BootFailure::Stalled(e))
                } else {
                    Err(BootFailure::Other(e))
                }
            }
        }
    }

    /// Firecracker has no metric of its own for a guest shutdown: it logs the KVM exit as
    /// unexpected and stops (its `vcpu.failures` counts every kind of failed exit).
    fn firecracker_saw_a_shutdown(&self) -> bool {
        let logged = |output: &Mutex<Vec<u8>>| {
            let bytes = output.lock().unwrap_or_else(|p| p.into_inner());
            String::from_utf8_lossy(&bytes).contains("Unexpected exit reason on vcpu run: Shutdown")
        };
        logged(&self.stdout) || logged(&self.stderr)
    }

    /// Where reapvm writes this VM's metrics (set on its command line: `PUT /metrics` would
    /// be refused).
    pub fn metrics_path(&self) -> &Path {
        &self.metrics_path
    }

    /// Waits for reapvm to make the tap, then sets it up for the guest.
    fn configure_created_tap(&mut self) -> Result<(), String> {
        let start = Instant::now();
        while !self.ns.has_link(TAP) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "reapvm exited ({status}) before making tap {TAP}; {}",
                    self.describe()
                ));
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "reapvm made no tap {TAP} in 60 s; {}",
                    self.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.ns.configure_tap(TAP)
    }

    fn wait_ready(&mut self, deadline: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the VMM exited ({status}) before the agent was ready; {}",
                    self.describe()
                ));
            }
            if let Ok(mut conn) = self.conn() {
                if let Ok((200, _)) = conn.request("GET", "/ready", b"") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let lab_state = if detect_place() == Place::Lab {
            super::lab_probe::describe_stall(self.child.id())
        } else {
            String::new()
        };
        Err(format!(
            "{NOT_READY} after {deadline:?}; {}\n{lab_state}",
            self.describe()
        ))
    }

    /// The reapvm process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn conn(&self) -> Result<HttpConn, String> {
        let stream = self.ns.connect(AGENT_PORT, Duration::from_secs(5))?;
        HttpConn::new(stream, Duration::from_secs(300))
    }

    pub fn invoke(&self, function: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        self.conn()?
            .request("POST", &format!("/invoke/{function}"), body)
    }

    /// Asks the agent to shut the guest down; returns reapvm's exit code.
    pub fn shutdown(mut self, deadline: Duration) -> Result<Option<i32>, String> {
        let (status, _) = self.conn()?.request("POST", "/shutdown", b"")?;
        if status != 200 {
            return Err(format!("/shutdown answered {status}"));
        }
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "reapvm still running {deadline:?} after /shutdown; {}",
            self.describe()
        ))
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn describe(&self) -> String {
        let out = self.console();
        let err = String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned();
        let tail = |s: &str, n: usize| {
            s.lines()
                .rev()
                .take(n)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- console ---\n{}\n--- reapvm ---\n{}",
            tail(&out, 40),
            tail(&err, 20)
        )
    }
}

impl Drop for FunctionVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
