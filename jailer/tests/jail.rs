//! reapvm-jailer with the replay guest on this host's own KVM (never the lab): reapvm runs
//! jailed (another user, its own mount and PID namespaces, the jail as its root, a cgroup,
//! a limit on open files), boots the guest from files inside the jail, snapshots it there,
//! and a second jail restores that snapshot with the File and then the OnDemand backend
//! (userfaultfd through the jail's /dev/userfaultfd, unprivileged) to the right replay.

mod common;

use reapvm_bench::replay_vm;
use test_support as support;

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use common::{api, jail, stock, Jailed, NOBODY};
use support::restore::flushed_metrics;
use support::{Failed, Scratch, Trial};

const MEM_MIB: u64 = 64;
/// Limits the checks below look for: 512 open files, the pids cgroup (v1, as this host
/// mounts it).
const LIMITS: [&str; 6] = [
    "--resource-limit",
    "no-file=512",
    "--cgroup-version",
    "1",
    "--cgroup",
    "pids.max=64",
];

/// The limits, with the VMM as PID 1 of its own PID namespace, or (false) detached by
/// --daemonize alone (the jailer forks for it, the caller sees the jailer end).
fn jailer_args(own_pid_ns: bool) -> Vec<&'static str> {
    let mut args = LIMITS.to_vec();
    if own_pid_ns {
        args.push("--new-pid-ns");
    }
    args.push("--daemonize");
    args
}

fn proc_field(pid: u32, file: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or("")
        .to_string()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// What the jail must have done to the VMM process (`own_pid_ns`: with --new-pid-ns).
fn check_confined(j: &Jailed, id: &str, own_pid_ns: bool) -> Result<(), String> {
    let uid = proc_field(j.pid, "status", "Uid:");
    let fields: Vec<&str> = uid.split_whitespace().collect();
    if fields.len() < 5 || fields[1..].iter().any(|f| *f != NOBODY.to_string()) {
        return Err(format!("the VMM runs as {uid:?}, not as {NOBODY}"));
    }
    for kind in ["mnt", "pid"] {
        let separate = ns(&j.pid.to_string(), kind) != ns("self", kind);
        if separate != (kind == "mnt" || own_pid_ns) {
            return Err(format!(
                "the VMM's {kind} namespace is {} this test's",
                if separate { "not" } else { "" }
            ));
        }
    }
    let limit = proc_field(j.pid, "limits", "Max open files");
    if limit.split_whitespace().nth(3) != Some("512") {
        return Err(format!("open files limit: {limit:?}"));
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", j.pid)).unwrap_or_default();
    if !cgroups
        .lines()
        .any(|l| l.ends_with(&format!(":pids:/reapvm/{id}")))
    {
        return Err(format!(
            "the VMM is not in the pids cgroup reapvm/{id}:\n{cgroups}"
        ));
    }
    // Its root is the jail: a file only the jail has is at its root.
    let seen = std::fs::read_dir(format!("/proc/{}/root", j.pid))
        .map_err(|e| e.to_string())?
        .flatten()
        .any(|e| e.file_name() == "reapvm.pid");
    if !seen {
        return Err("the VMM's root is not the jail".into());
    }
    Ok(())
}

/// The replay guest's report, from the jail's metrics file.
fn replay_state(j: &Jailed) -> Result<serde_json::Value, String> {
    let m = flushed_metrics(&j.root.join("api.sock"), &j.root.join("metrics.json"))?;
    Ok(m["replay"].clone())
}

fn wait_replay(j: &Jailed, field: &str) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = replay_state(j)?;
        if let Some(e) = r["error"].as_str().filter(|e| !e.is_empty()) {
            return Err(format!("the replay guest stopped: {e}"));
        }
        if r[field] == true {
            return Ok(r);
        }
        if Instant::now() > deadline {
            return Err(format!("the replay guest was not {field} after 60 s: {r}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn boots_snapshots_and_restores_in_jails() -> Result<(), String> {
    let scratch = Scratch::new("jailer");
    let base = scratch.path("jails");
    let trace = replay_vm::synthetic_trace(56 * 256, 2000);
    let trace_path = replay_vm::write_trace(&scratch.dir, &trace)?;
    let guest = replay_vm::replay_guest()?;
    let config = scratch.path("vm.json");
    let body = serde_json::json!({
        "boot-source": {"kernel_image_path": "/replay.elf", "initrd_path": "/trace.bin", "boot_args": "reapvm-replay"},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
        "replay-control": true,
    });
    std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;

    let id = "replay-boot";
    stock(
        &base,
        id,
        &[
            (&guest, "replay.elf"),
            (&trace_path, "trace.bin"),
            (&config, "vm.json"),
        ],
    )?;
    let booted = jail(
        &base,
        id,
        &jailer_args(true),
        &["--config-file", "/vm.json"],
    )?;
    check_confined(&booted, id, true)?;
    wait_replay(&booted, "ready")?;
    api(
        &booted,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    )?;
    api(
        &booted,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": "/vmstate", "mem_file_path": "/memory"}),
    )?;
    let (vmstate, memory) = (booted.root.join("vmstate"), booted.root.join("memory"));
    drop(booted);

    for (n, backend) in ["File", "OnDemand"].iter().enumerate() {
        let id = format!("replay-restore-{n}");
        stock(&base, &id, &[(&vmstate, "vmstate"), (&memory, "memory")])?;
        let restored = jail(&base, &id, &jailer_args(false), &[])?;
        check_confined(&restored, &id, false)?;
        api(
            &restored,
            "PUT",
            "/snapshot/load",
            serde_json::json!({
                "snapshot_path": "/vmstate",
                "mem_backend": {"backend_type": backend, "backend_path": "/memory"},
                "resume_vm": true,
            }),
        )
        .map_err(|e| format!("{backend}: {e}"))?;
        let r = wait_replay(&restored, "done")?;
        let checksum = r["checksum"].as_u64().unwrap_or(0) as u32;
        if checksum != trace.expected_checksum() {
            return Err(format!(
                "{backend}: the jailed restore replayed to {checksum:#x}, expected {:#x}",
                trace.expected_checksum()
            ));
        }
    }
    Ok(())
}

/// A jail used before may hold what its VMM (perhaps taken over by its guest) planted:
/// the jailer, as root, never writes through a symlink in it.
fn a_reused_jail_is_never_written_through_a_symlink() -> Result<(), String> {
    let scratch = Scratch::new("jailer-planted");
    let base = scratch.path("jails");
    let id = "planted";
    let root = stock(&base, id, &[])?;
    let victim = scratch.path("victim.txt");
    std::fs::write(&victim, b"precious").map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(&victim, root.join("reapvm")).map_err(|e| e.to_string())?;
    let jailed = jail(&base, id, &["--daemonize"], &[])?;
    drop(jailed);
    if std::fs::read(&victim).map_err(|e| e.to_string())? != b"precious" {
        return Err("the jailer wrote the VMM through a planted symlink".into());
    }
    let copied = std::fs::symlink_metadata(root.join("reapvm")).map_err(|e| e.to_string())?;
    if !copied.file_type().is_file() {
        return Err("the VMM in the jail is not a plain file".into());
    }
    // A planted folder on the way to the shared libraries: refused, nothing written.
    let victim_dir = scratch.path("victim-dir");
    std::fs::create_dir_all(&victim_dir).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(root.join("lib"));
    std::os::unix::fs::symlink(&victim_dir, root.join("lib")).map_err(|e| e.to_string())?;
    match jail(&base, id, &["--daemonize"], &[]) {
        Err(e) if e.contains("is a symlink or not a folder") => {}
        Err(e) => return Err(format!("refused for another reason: {e}")),
        Ok(_) => return Err("the jailer went through a planted lib symlink".into()),
    }
    let written = std::fs::read_dir(&victim_dir)
        .map_err(|e| e.to_string())?
        .count();
    if written != 0 {
        return Err(format!(
            "{written} files written through the planted symlink"
        ));
    }
    Ok(())
}

/// The cgroup v2 mount point, from /proc/mounts.
fn unified_hierarchy() -> Result<std::path::PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| std::path::PathBuf::from(f[1]))
        .ok_or_else(|| "no cgroup v2 hierarchy is mounted on this host".to_string())
}

/// Removes a jail's cgroup folder once its VMM is gone (a cgroup with no process in it),
/// and its parent when no other jail is left in it.
struct CgroupDir(std::path::PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// `--cgroup-version 2`: the VMM runs in PARENT/ID of the unified hierarchy with the
/// controller enabled down to it and the limit written. This host's v2 hierarchy has one
/// controller its v1 mounts do not hold, hugetlb; the limit is one 2 MiB page.
fn the_unified_hierarchy_holds_the_jail_with_its_limit() -> Result<(), String> {
    let unified = unified_hierarchy()?;
    let controllers = std::fs::read_to_string(unified.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", unified.display()))?;
    if !controllers.split_whitespace().any(|c| c == "hugetlb") {
        return Err(format!(
            "the cgroup v2 hierarchy at {} has no hugetlb controller ({controllers:?}): this test needs one controller there",
            unified.display()
        ));
    }
    let scratch = Scratch::new("jailer-cgroup2");
    let base = scratch.path("jails");
    let id = "cgroup-v2";
    stock(&base, id, &[])?;
    let dir = CgroupDir(unified.join("reapvm").join(id));
    let jailed = jail(
        &base,
        id,
        &[
            "--cgroup-version",
            "2",
            "--cgroup",
            "hugetlb.2MB.max=2097152",
            "--new-pid-ns",
            "--daemonize",
        ],
        &[],
    )?;
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", jailed.pid))
        .map_err(|e| e.to_string())?;
    if !cgroups.lines().any(|l| l == format!("0::/reapvm/{id}")) {
        return Err(format!(
            "the VMM is not in the v2 cgroup reapvm/{id}:\n{cgroups}"
        ));
    }
    let limit =
        std::fs::read_to_string(dir.0.join("hugetlb.2MB.max")).map_err(|e| e.to_string())?;
    if limit.trim() != "2097152" {
        return Err(format!(
            "hugetlb.2MB.max holds {limit:?}, not the jailer's 2097152"
        ));
    }
    let enabled = std::fs::read_to_string(unified.join("reapvm/cgroup.subtree_control"))
        .map_err(|e| e.to_string())?;
    if !enabled.split_whitespace().any(|c| c == "hugetlb") {
        return Err(format!("hugetlb is not enabled for the jails: {enabled:?}"));
    }
    drop(jailed);
    drop(dir);
    Ok(())
}

/// A v1 cpuset cgroup starts empty, and nothing can join it until it has CPUs and memory
/// nodes: the jailer gives the new levels their parent's, then writes the setting.
fn a_v1_cpuset_jail_gets_its_parents_memory_nodes() -> Result<(), String> {
    let scratch = Scratch::new("jailer-cpuset");
    let base = scratch.path("jails");
    let id = "cpuset-v1";
    stock(&base, id, &[])?;
    let dir = CgroupDir(Path::new("/sys/fs/cgroup/cpuset/reapvm").join(id));
    let jailed = jail(
        &base,
        id,
        &[
            "--cgroup-version",
            "1",
            "--cgroup",
            "cpuset.cpus=0",
            "--daemonize",
        ],
        &[],
    )?;
    let cpus = proc_field(jailed.pid, "status", "Cpus_allowed_list:");
    if cpus.split_whitespace().nth(1) != Some("0") {
        return Err(format!("the VMM may run on {cpus:?}, not on CPU 0 alone"));
    }
    let mems = std::fs::read_to_string(dir.0.join("cpuset.mems")).map_err(|e| e.to_string())?;
    let host_mems =
        std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.mems").map_err(|e| e.to_string())?;
    if mems.trim().is_empty() || mems.trim() != host_mems.trim() {
        return Err(format!(
            "the jail's memory nodes are {mems:?}, the host's {host_mems:?}"
        ));
    }
    drop(jailed);
    drop(dir);
    Ok(())
}

fn bad_arguments_are_refused_before_anything_is_made() -> Result<(), String> {
    let scratch = Scratch::new("jailer-bad");
    let base = scratch.path("jails");
    for (args, says) in [
        (vec!["--id", "../escape"], "--id \"../escape\""),
        (
            vec!["--id", "ok", "--cgroup", "memory"],
            "--cgroup \"memory\"",
        ),
        (
            vec!["--id", "ok", "--resource-limit", "nofile=1"],
            "--resource-limit",
        ),
        (
            vec!["--id", "ok", "--cgroup-version", "3"],
            "--cgroup-version 3",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_reapvm-jailer"))
            .args(&args)
            .args(["--exec-file", "/bin/true", "--uid", "1", "--gid", "1"])
            .arg("--chroot-base-dir")
            .arg(&base)
            .output()
            .map_err(|e| e.to_string())?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains(says) {
            return Err(format!(
                "{args:?}: expected a refusal naming {says:?}, got {stderr}"
            ));
        }
        if base.exists() {
            return Err(format!(
                "{args:?}: the jail folder was made before the refusal"
            ));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let trials = vec![
        Trial::test("boots_snapshots_and_restores_in_jails", || {
            boots_snapshots_and_restores_in_jails().map_err(Failed::from)
        }),
        Trial::test("a_reused_jail_is_never_written_through_a_symlink", || {
            a_reused_jail_is_never_written_through_a_symlink().map_err(Failed::from)
        }),
        Trial::test(
            "the_unified_hierarchy_holds_the_jail_with_its_limit",
            || the_unified_hierarchy_holds_the_jail_with_its_limit().map_err(Failed::from),
        ),
        Trial::test("a_v1_cpuset_jail_gets_its_parents_memory_nodes", || {
            a_v1_cpuset_jail_gets_its_parents_memory_nodes().map_err(Failed::from)
        }),
        Trial::test("bad_arguments_are_refused_before_anything_is_made", || {
            bad_arguments_are_refused_before_anything_is_made().map_err(Failed::from)
        }),
    ];
    replay_vm::run_host_suite("jailer", trials)
}
