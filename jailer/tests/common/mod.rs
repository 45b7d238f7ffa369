//! What the jailer suites share: jails stocked with files for user 65534, reapvm-jailer
//! runs, the jailed VMM's API.

#![allow(dead_code)]

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use test_support as support;

pub const NOBODY: u32 = 65534;

/// A jail: its root, and the host PID of the VMM in it; the VMM is killed when dropped.
pub struct Jailed {
    pub root: PathBuf,
    pub pid: u32,
    pub cgroup_id: String,
}

impl Drop for Jailed {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a PID this test started; nothing else is touched.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/pids/reapvm/{}", self.cgroup_id));
    }
}

pub fn root_of(base: &Path, id: &str) -> PathBuf {
    base.join("reapvm").join(id).join("root")
}

/// Puts `files` (source, name in the jail) into the jail of `id`, owned by the VMM's user.
pub fn stock(base: &Path, id: &str, files: &[(&Path, &str)]) -> Result<PathBuf, String> {
    let root = root_of(base, id);
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    for (from, name) in files {
        let to = root.join(name);
        std::fs::copy(from, &to)
            .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
        chown(&to, Some(NOBODY), Some(NOBODY)).map_err(|e| e.to_string())?;
    }
    // The VMM creates its socket and metrics at the jail's root.
    chown(&root, Some(NOBODY), Some(NOBODY)).map_err(|e| e.to_string())?;
    Ok(root)
}

/// Runs reapvm-jailer for `id` (as user 65534) with `jailer_args` (which must detach it:
/// `--daemonize` or `--new-pid-ns`, for the PID file), the VMM serving /api.sock with
/// /metrics.json and `vmm_args`; waits for the socket.
pub fn jail(
    base: &Path,
    id: &str,
    jailer_args: &[&str],
    vmm_args: &[&str],
) -> Result<Jailed, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_reapvm-jailer"))
        .args(["--id", id, "--exec-file"])
        .arg(support::reapvm_bin())
        .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
        .arg("--chroot-base-dir")
        .arg(base)
        .args(jailer_args)
        .arg("--")
        .args(["--api-sock", "/api.sock", "--metrics-path", "/metrics.json"])
        .args(vmm_args)
        .output()
        .map_err(|e| format!("cannot run reapvm-jailer: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "reapvm-jailer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let root = root_of(base, id);
    let pid_file = root.join("reapvm.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| format!("{}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", pid_file.display()))?;
    let jailed = Jailed {
        root,
        pid,
        cgroup_id: id.to_string(),
    };
    support::wait_for_socket(&jailed.root.join("api.sock"), Duration::from_secs(10))?;
    Ok(jailed)
}

pub fn api(j: &Jailed, method: &str, path: &str, body: serde_json::Value) -> Result<(), String> {
    support::restore::api(&j.root.join("api.sock"), method, path, body)
}
