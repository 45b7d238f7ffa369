//! reapvm's seccomp filters (vmm/src/seccomp.rs), on this host's own KVM with the replay
//! guest (never in the KVM lab): every thread of a booted and of a restored VM runs filtered
//! (`Seccomp: 2` in /proc), `--no-seccomp` leaves them unfiltered, and a system call a
//! thread's filter does not allow ends reapvm with exit code 148, naming the thread and the
//! call.

use reapvm_bench::replay_vm;
use test_support as support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use replay_vm::{boot_and_snapshot, ReplayVmm};
use support::{Failed, Scratch, Trial};

const MEM_MIB: u64 = 64;

/// Each thread of process `pid`: (name, the Seccomp field of its status).
fn threads(pid: u32) -> Result<Vec<(String, String)>, String> {
    let tasks = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&tasks).map_err(|e| format!("{tasks}: {e}"))? {
        let dir = entry.map_err(|e| e.to_string())?.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), mode));
    }
    Ok(out)
}

/// Every thread of `pid` is in seccomp mode `want`, and the threads include `names`.
fn check_threads(pid: u32, want: &str, names: &[&str]) -> Result<(), String> {
    let threads = threads(pid)?;
    let wrong: Vec<_> = threads.iter().filter(|(_, mode)| mode != want).collect();
    if !wrong.is_empty() {
        return Err(format!(
            "threads not in seccomp mode {want}: {wrong:?} (all: {threads:?})"
        ));
    }
    for name in names {
        if !threads.iter().any(|(n, _)| n.starts_with(name)) {
            return Err(format!("no thread {name} among {threads:?}"));
        }
    }
    Ok(())
}

fn trace(dir: &Path) -> Result<std::path::PathBuf, String> {
    use snapshot::replay_trace::{Touch, Trace, GUEST_RESERVED_PAGES};
    let first = GUEST_RESERVED_PAGES as u32;
    let trace = Trace {
        fills: vec![(GUEST_RESERVED_PAGES, 256)],
        touches: (0..256)
            .map(|i| Touch {
                page: first + i,
                write: i % 3 == 0,
                gap: 100,
            })
            .collect(),
    };
    let path = dir.join("trace.bin");
    std::fs::write(&path, trace.encode()).map_err(|e| e.to_string())?;
    Ok(path)
}

fn every_thread_of_a_booted_and_a_restored_vm_is_filtered() -> Result<(), String> {
    let scratch = Scratch::new("seccomp-threads");
    let snap = boot_and_snapshot(&scratch.dir, &trace(&scratch.dir)?, MEM_MIB)?;
    // A booted VM: the VMM thread, the API thread and the vCPU.
    let vmm = ReplayVmm::start(
        &scratch.dir,
        "booted",
        Some(&scratch.path("replay-vm.json")),
    )?;
    vmm.wait_for("ready", Duration::from_secs(60))?;
    check_threads(vmm.pid(), "2", &["reapvm", "fc_api", "fc_vcpu"])?;
    drop(vmm);
    // A restored VM: its fault loop too.
    let vmm = ReplayVmm::start(&scratch.dir, "restored", None)?;
    let body = serde_json::json!({
        "snapshot_path": snap.vmstate,
        "mem_backend": {"backend_type": "OnDemand", "backend_path": snap.memory},
        "resume_vm": true,
    });
    vmm.api("PUT", "/snapshot/load", body)?;
    vmm.wait_for("done", Duration::from_secs(60))?;
    check_threads(vmm.pid(), "2", &["reapvm", "fc_api", "fc_vcpu", "fc_uffd"])
}

/// reapvm with `args` and an API socket in `dir`, its output in `dir/tag.log`.
fn spawn_reapvm(dir: &Path, tag: &str, args: &[&str]) -> Result<std::process::Child, String> {
    let log = std::fs::File::create(dir.join(format!("{tag}.log"))).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    Command::new(support::reapvm_bin())
        .arg("--api-sock")
        .arg(dir.join(format!("{tag}.sock")))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start reapvm: {e}"))
}

fn without_seccomp_no_thread_is_filtered() -> Result<(), String> {
    let scratch = Scratch::new("seccomp-off");
    let mut child = spawn_reapvm(&scratch.dir, "off", &["--no-seccomp"])?;
    support::wait_for_socket(&scratch.path("off.sock"), Duration::from_secs(10))?;
    let result = check_threads(child.id(), "0", &["reapvm", "fc_api"]);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn a_forbidden_system_call_ends_reapvm_with_code_148() -> Result<(), String> {
    let scratch = Scratch::new("seccomp-forbidden");
    // The built-in filters, with accept4 taken from the API thread's.
    let builtin =
        std::fs::read_to_string(support::repo_root().join("resources/seccomp/x86_64.json"))
            .map_err(|e| e.to_string())?;
    let mut filters: serde_json::Value =
        serde_json::from_str(&builtin).map_err(|e| e.to_string())?;
    let api = filters["api"]["filter"]
        .as_array_mut()
        .ok_or("the built-in filters have no api filter")?;
    api.retain(|rule| rule["syscall"] != "accept4");
    let path = scratch.path("filters.json");
    std::fs::write(&path, filters.to_string()).map_err(|e| e.to_string())?;

    let mut child = spawn_reapvm(
        &scratch.dir,
        "strict",
        &["--seccomp-filter", path.to_str().ok_or("path")?],
    )?;
    let socket = scratch.path("strict.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The kernel queues the connection; the API thread's accept4 is the forbidden call.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let status = support::wait_for_exit(&mut child, Duration::from_secs(10));
    let log = std::fs::read_to_string(scratch.path("strict.log")).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    if status.and_then(|s| s.code()) != Some(148)
        || !log.contains("thread fc_api made system call 288")
    {
        return Err(format!(
            "expected exit code 148 naming fc_api and system call 288 (accept4): exit {status:?}\n{log}"
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let trials = vec![
        Trial::test(
            "every_thread_of_a_booted_and_a_restored_vm_is_filtered",
            || every_thread_of_a_booted_and_a_restored_vm_is_filtered().map_err(Failed::from),
        ),
        Trial::test("without_seccomp_no_thread_is_filtered", || {
            without_seccomp_no_thread_is_filtered().map_err(Failed::from)
        }),
        Trial::test("a_forbidden_system_call_ends_reapvm_with_code_148", || {
            a_forbidden_system_call_ends_reapvm_with_code_148().map_err(Failed::from)
        }),
    ];
    replay_vm::run_host_suite("seccomp", trials)
}
