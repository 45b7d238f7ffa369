//! Where whole-guest code runs: on hardware KVM directly, or re-run inside the KVM lab.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Where the suite runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The host has VT-x/AMD-V: KVM runs Linux guests here.
    HardwareKvm,
    /// Inside the KVM lab (a QEMU TCG machine with SVM, real KVM inside).
    Lab,
    /// This host's KVM cannot run Linux guests: the suite must move into the lab.
    NeedsLab,
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn detect_place() -> Place {
    if std::env::var_os("REAPVM_IN_LAB").is_some() {
        return Place::Lab;
    }
    match std::env::var("REAPVM_KVM_PLACE").as_deref() {
        Ok("lab") => return Place::NeedsLab,
        Ok("direct") => return Place::HardwareKvm,
        _ => {}
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw_virt && Path::new("/dev/kvm").exists() {
        Place::HardwareKvm
    } else {
        Place::NeedsLab
    }
}

/// lab-run.sh's exit code when the lab machine died before the command reported its own.
const LAB_MACHINE_DIED: i32 = 122;

/// Re-runs this very executable, with its arguments, inside the KVM lab.
pub fn rerun_in_lab(what: &str) -> ExitCode {
    rerun_in_lab_with(what, &[])
}

/// As `rerun_in_lab`, with extra environment for lab-run.sh (e.g. REAPVM_LAB_DISK_MIB).
pub fn rerun_in_lab_with(what: &str, env: &[(&str, &str)]) -> ExitCode {
    let lab_run = repo_root().join("resources/lab/lab-run.sh");
    println!(
        "{what}: this host's KVM cannot boot Linux (no vmx/svm; see docs/kvm-lab.md); \
         re-running it inside the KVM lab"
    );
    let exe = std::env::current_exe().expect("the test binary's own path");
    let timeout = std::env::var("REAPVM_LAB_TIMEOUT").unwrap_or_else(|_| "2400".into());
    let mem = std::env::var("REAPVM_LAB_MEM_MIB").unwrap_or_else(|_| "6144".into());
    let run_once = || {
        Command::new(&lab_run)
            .args(["--timeout", &timeout, "--mem", &mem, "--"])
            .envs(env.iter().copied())
            .arg(&exe)
            .args(std::env::args_os().skip(1))
            .status()
    };
    let mut status = run_once();
    if matches!(&status, Ok(s) if s.code() == Some(LAB_MACHINE_DIED)) {
        // The emulated machine died (not a test verdict): one fresh lab, loudly.
        eprintln!(
            "{what}: the KVM lab machine itself died before the suite finished \
             (see the kept console above); running the suite once more in a fresh lab"
        );
        status = run_once();
    }
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("{what}: the lab run failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "{what}: cannot start the KVM lab ({}): {e}",
                lab_run.display()
            );
            ExitCode::FAILURE
        }
    }
}
