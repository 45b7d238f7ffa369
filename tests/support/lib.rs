//! Shared by the whole-guest KVM test suites and the benchmarks (as Cloud Hypervisor's
//! `test_infra`): where to run (hardware KVM or the KVM lab), the guest artifacts, and
//! running `reapvm` with a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

pub use libtest_mimic::{Arguments, Failed, Trial};

pub mod function_vm;
pub mod http;
pub mod lab_fault;
pub mod lab_probe;
pub mod netns;
pub mod place;
pub mod reapd;
pub mod restore;
pub use place::{detect_place, repo_root, rerun_suite_in_lab, Place};

/// Paths of the guest kernel and initramfs built by scripts/build-guest.sh.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

impl GuestArtifacts {
    /// The guest with the core rootfs (Python and the test functions).
    pub fn locate() -> Result<Self, String> {
        Self::locate_with_rootfs("REAPVM_ROOTFS", "scripts/build-guest.sh")
    }

    /// The guest with the function suite's rootfs (its libraries and every function), built
    /// by `scripts/build-guest.sh --suite`.
    pub fn locate_suite() -> Result<Self, String> {
        Self::locate_with_rootfs("REAPVM_SUITE_ROOTFS", "scripts/build-guest.sh --suite")
    }

    fn locate_with_rootfs(rootfs_key: &str, build: &str) -> Result<Self, String> {
        let env_file = repo_root().join("target/guest/guest.env");
        let from_file = std::fs::read_to_string(&env_file).unwrap_or_default();
        let lookup = |key: &str| -> Option<String> {
            std::env::var(key).ok().or_else(|| {
                from_file
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
            })
        };
        let missing = |key: &str| {
            format!(
                "guest artifacts are not built ({key} is not in {}): run scripts/test.sh, or {build}",
                env_file.display()
            )
        };
        let find = |key: &str| lookup(key).map(PathBuf::from).ok_or_else(|| missing(key));
        let kernel_dir = find("REAPVM_KERNEL_DIR")?;
        let initramfs = find("REAPVM_INITRAMFS")?;
        let rootfs = find(rootfs_key)?;
        let artifacts = Self {
            vmlinux: kernel_dir.join("vmlinux"),
            bzimage: kernel_dir.join("bzImage"),
            initramfs,
            rootfs,
        };
        for path in [
            &artifacts.vmlinux,
            &artifacts.bzimage,
            &artifacts.initramfs,
            &artifacts.rootfs,
        ] {
            if !path.is_file() {
                return Err(format!("{} does not exist: run {build}", path.display()));
            }
        }
        Ok(artifacts)
    }
}

/// Runs the suite where KVM can boot Linux: here, or by re-running this very test binary
/// inside the KVM lab. Fails (never skips) when neither is possible.
pub fn run_kvm_suite(suite: &str, trials: impl FnOnce() -> Vec<Trial>) -> ExitCode {
    let mut args = Arguments::from_args();
    if args.list {
        return libtest_mimic::run(&args, trials()).exit_code();
    }
    match detect_place() {
        Place::NeedsLab => return rerun_suite_in_lab(&format!("KVM suite `{suite}`")),
        Place::HardwareKvm => {
            println!("KVM suite `{suite}`: running directly on this host's hardware KVM")
        }
        Place::Lab => {
            println!(
                "KVM suite `{suite}`: running inside the KVM lab (QEMU TCG, emulated AMD SVM)"
            );
            // One guest at a time in the lab: its two emulated CPUs gain little from more, and
            // QEMU's nested SVM has, rarely and under load, crashed the lab's kernel or
            // triple-faulted a guest (docs/kvm-lab.md). And one test at a time is what lets
            // the lab runner tell whose output a guest fault's announcement is: libtest-mimic
            // names a test before its output only then.
            args.test_threads = Some(1);
        }
    }
    if let Err(e) = GuestArtifacts::locate() {
        eprintln!("KVM suite `{suite}`: {e}");
        return ExitCode::FAILURE;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("KVM suite `{suite}`: /dev/kvm does not exist here");
        return ExitCode::FAILURE;
    }
    libtest_mimic::run(&args, trials()).exit_code()
}

/// A scratch folder for one test, removed when dropped: in the system's temp folder, or in
/// /tmp in the KVM lab (a tmpfs there, so no drop makes its files cold).
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        let base = if std::env::var_os("REAPVM_IN_LAB").is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("reapvm-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, content).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("REAPVM_KEEP_SCRATCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a finished `reapvm` run left behind.
#[derive(Debug)]
pub struct RunOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl RunOutput {
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            if self.timed_out { " (timed out)" } else { "" },
            tail(&self.stdout, 60),
            tail(&self.stderr, 30)
        )
    }

    /// The value of `key=` in the agent's report line.
    pub fn agent_value(&self, key: &str) -> Option<String> {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("reapvm-agent: cpus="))?;
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The `reapvm` binary cargo built with the running test or benchmark (vmm's targets: cargo
/// builds the package's binaries for them into the profile folder, one above `deps/`).
pub fn reapvm_bin() -> PathBuf {
    built_bin("reapvm")
}

pub fn rebase_snap_bin() -> PathBuf {
    built_bin("rebase-snap")
}

fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running test's own path");
    let profile_dir = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in a cargo deps folder", exe.display()));
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run the suites through cargo test or cargo bench of the vmm package",
        bin.display()
    );
    bin
}

/// Runs `reapvm` with `args`, stdin from /dev/null, killing it after `deadline`.
pub fn run_reapvm(args: &[&str], deadline: Duration) -> RunOutput {
    run_command(Command::new(reapvm_bin()).args(args), deadline)
}

pub fn run_command(cmd: &mut Command, deadline: Duration) -> RunOutput {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    RunOutput {
        code: status.code(),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        timed_out,
    }
}

/// Starts `reapvm --boot-timer` on `config` (console discarded) and waits for the guest's
/// boot-complete signal. Returns the running child and the boot time in microseconds, or
/// None when the guest did not signal within `deadline`.
pub fn start_until_booted(
    config: &Path,
    deadline: Duration,
) -> Result<(std::process::Child, Option<u64>), String> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(reapvm_bin())
        .args(["--no-api", "--boot-timer", "--config-file"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start reapvm: {e}"))?;
    let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(rest) = line.split("Guest-boot-time =").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .and_then(|us| us.parse::<u64>().ok()),
                );
            }
        }
    });
    let boot_us = rx.recv_timeout(deadline).ok().flatten();
    Ok((child, boot_us))
}

/// Waits until a freshly started VMM has created its API socket.
/// Waits until the API socket takes connections. Its file appears at bind(), a moment before
/// listen(): a connection in between is refused (seen once in the KVM lab).
pub fn wait_for_socket(socket: &Path, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let last = match std::os::unix::net::UnixStream::connect(socket) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if start.elapsed() > timeout {
            return Err(format!(
                "the API socket {} takes no connections: {last}",
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boot arguments for test guests: serial console, quiet kernel, reset on reboot.
pub fn test_boot_args(extra: &str) -> String {
    format!(
        "console=ttyS0 quiet reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd {extra}"
    )
}

/// A Firecracker configuration file for a guest booting `kernel` with the agent initramfs.
pub fn vm_config(
    kernel: &Path,
    initrd: Option<&Path>,
    vcpus: u32,
    mem_mib: u64,
    boot_args: &str,
) -> String {
    serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": boot_args,
        },
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": false},
    })
    .to_string()
}

/// The trial result of a check: Err with the message becomes a test failure.
pub fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(msg().into())
    }
}

/// Drops `path` from the page cache (posix_fadvise DONTNEED), so that the next read of it is
/// a real read: the "cold" of the snapshot benchmarks. The snapshot writer synced the file.
/// Whether reapvm's metrics file at `path` counts a guest shutdown (`vcpu.exit_shutdown`:
/// KVM_EXIT_SHUTDOWN, what a triple fault gives). Counters are increments per flush, so
/// every line counts; reapvm flushes once more as it exits.
pub fn guest_shut_down(metrics_path: &Path) -> bool {
    std::fs::read_to_string(metrics_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .any(|m| m["vcpu"]["exit_shutdown"].as_u64().unwrap_or(0) > 0)
}

/// Waits up to `deadline` for `child` to exit (its last metrics flush is then written);
/// its exit status, if it did.
pub fn wait_for_exit(
    child: &mut std::process::Child,
    deadline: Duration,
) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn drop_from_page_cache(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // DONTNEED only starts the writeback of dirty pages and keeps them: a file just written
    // (a snapshot, a recorded WS) must reach the disk first or its first "cold" run is not.
    file.sync_data()
        .map_err(|e| format!("fdatasync {}: {e}", path.display()))?;
    // SAFETY: fadvise on a descriptor this function owns; it only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!(
            "posix_fadvise(DONTNEED) on {}: error {rc}",
            path.display()
        ));
    }
    Ok(())
}

/// Drops `path` from the page cache for a cold run and checks with mincore that it left:
/// a page or two may be read back at once by someone else (a backup, an indexer); more
/// than 1% means the drop did not work and the run would not be cold. Returns the pages
/// still resident.
pub fn evict_for_cold_run(path: &Path) -> Result<u64, String> {
    if !page_cache_can_drop(path)? {
        return Err(format!(
            "{} is on a tmpfs, whose pages never leave memory: no run from it is cold (put \
             the snapshot on a disk; in the KVM lab, REAPVM_LAB_DISK_MIB gives one)",
            path.display()
        ));
    }
    drop_from_page_cache(path)?;
    let (resident, total) = resident_pages(path)?;
    if resident * 100 > total {
        return Err(format!(
            "{}: {resident} of {total} pages still in the page cache after the drop: this run \
             would not be cold",
            path.display()
        ));
    }
    Ok(resident)
}

/// Whether `path` lies on a filesystem whose pages a drop can evict: not a tmpfs or ramfs
/// (the KVM lab's /tmp is one), where the page cache is the file itself.
pub fn page_cache_can_drop(path: &Path) -> Result<bool, String> {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a NUL in the path", path.display()))?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs the call fills; both outlive the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(format!(
            "statfs of {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let fs_type = fs.f_type as i64;
    Ok(fs_type != TMPFS_MAGIC && fs_type != RAMFS_MAGIC)
}

/// How many of `path`'s pages are in the page cache now (mincore), and how many it has: a
/// cold run checks that the drop above really emptied it.
pub fn resident_pages(path: &Path) -> Result<(u64, u64), String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len() as usize;
    if len == 0 {
        return Ok((0, 0));
    }
    let page = 4096usize;
    let pages = len.div_ceil(page);
    // SAFETY: a fresh read-only shared mapping of a file this function holds open; it is
    // only passed to mincore and unmapped below, never read through.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(format!(
            "mmap of {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` maps `len` bytes (page-aligned by mmap); `vec` has one byte per page.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(format!("mincore of {}: {err}", path.display()));
    }
    let resident = vec.iter().filter(|&&b| b & 1 != 0).count() as u64;
    Ok((resident, pages as u64))
}

/// A tmpfs of a fixed size mounted on a folder (to run a writer out of space), unmounted
/// when dropped. Needs root, as the KVM suites do.
pub struct TmpfsMount {
    at: PathBuf,
}

impl TmpfsMount {
    pub fn new(at: &Path, size_mib: u64) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0700"))
            .arg("reapvm-test")
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mounting a {size_mib} MiB tmpfs on {} failed (root needed): {}",
                at.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            at: at.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        // Lazy: a process still holding a file there cannot keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

#[cfg(test)]
mod page_cache_tests {
    use super::*;

    #[test]
    fn a_dropped_file_has_no_resident_pages() {
        // Under target/: a disk here, where a drop evicts (a tmpfs would keep every page).
        let dir = repo_root().join("target/test-support-page-cache");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("file-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 64 * 4096]).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let _ = std::fs::read(&path).unwrap();
        let (resident, total) = resident_pages(&path).unwrap();
        assert_eq!(total, 64);
        assert!(resident > 0, "a file just read is cached");
        drop_from_page_cache(&path).unwrap();
        assert_eq!(resident_pages(&path).unwrap(), (0, 64));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_on_a_tmpfs_is_refused_a_cold_run() {
        let dir = Path::new("/dev/shm");
        assert!(!page_cache_can_drop(dir).unwrap(), "/dev/shm is a tmpfs");
        let path = dir.join(format!("reapvm-test-support-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 4 * 4096]).unwrap();
        let err = evict_for_cold_run(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("is on a tmpfs"), "{err}");
        let disk = repo_root().join("target");
        assert!(page_cache_can_drop(&disk).unwrap(), "target/ is on a disk");
    }

    #[test]
    fn a_file_just_written_leaves_the_cache_for_a_cold_run() {
        let dir = repo_root().join("target/test-support-page-cache");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("dirty-{}", std::process::id()));
        // Written and not synced: its pages are dirty, which DONTNEED alone would keep.
        std::fs::write(&path, vec![9u8; 256 * 4096]).unwrap();
        assert_eq!(evict_for_cold_run(&path).unwrap(), 0);
        assert_eq!(resident_pages(&path).unwrap(), (0, 256));
        std::fs::remove_file(&path).unwrap();
    }
}
