//! Snapshot benchmark: Full snapshot create time, load-to-resumed time, and the first
//! invocation after a restore per memory backend, with the snapshot files hot in the page
//! cache and dropped from it (posix_fadvise DONTNEED). Medians of N runs.
//!
//! `cargo bench -p vmm --bench snapshots -- [--runs N] [--function NAME]`
//!
//! The snapshot files must be on a disk for "cold" to mean anything: in the KVM lab they go
//! to a scratch disk the lab gets for this run (QEMU reads it with O_DIRECT); on hardware
//! KVM, to target/bench-snapshots.

#[path = "../support/mod.rs"]
mod support;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use support::function_vm::{FunctionVm, VmSpec, AGENT_PORT};
use support::http::{unix_request, HttpConn};
use support::netns::NetNs;
use support::*;

struct Options {
    runs: usize,
    function: String,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 10,
        function: "helloworld".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                o.runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--runs N (N >= 1)")?
            }
            "--function" => o.function = args.next().ok_or("--function NAME")?,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Drops `path` from the page cache (it was synced when written).
fn drop_from_page_cache(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: fadvise on a descriptor we own; it only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!("posix_fadvise({}): error {rc}", path.display()));
    }
    Ok(())
}

/// Where the snapshot files go: a real disk.
fn snapshot_dir() -> PathBuf {
    let dir = match std::env::var_os("REAPVM_LAB_DISK") {
        Some(disk) => PathBuf::from(disk).join("bench-snapshots"),
        None => repo_root().join("target/bench-snapshots"),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("snapshot folder");
    dir
}

struct Restored {
    load_ms: f64,
    vmm_load_us: f64,
    first_ms: f64,
    second_ms: f64,
    faults: u64,
    minor_faults: u64,
}

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn restore_once(
    ns: &NetNs,
    dir: &Path,
    backend: &str,
    cold: bool,
    function: &str,
) -> Result<Restored, String> {
    let (vmstate, mem) = (dir.join("vmstate"), dir.join("memory"));
    if cold {
        drop_from_page_cache(&vmstate)?;
        drop_from_page_cache(&mem)?;
    }
    let socket = dir.join("restore.sock");
    let _ = std::fs::remove_file(&socket);
    let metrics = dir.join("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let vmm = Vmm(ns
        .command(reapvm_bin())
        .arg("--api-sock")
        .arg(&socket)
        .arg("--metrics-path")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?);
    wait_for_socket(&socket, Duration::from_secs(10))?;
    let body = serde_json::json!({
        "snapshot_path": vmstate,
        "mem_backend": {"backend_type": backend, "backend_path": mem},
        "resume_vm": true,
    });
    let t = Instant::now();
    let (status, answer) = unix_request(&socket, "PUT", "/snapshot/load", &body.to_string())?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    if status != 204 {
        return Err(format!("snapshot/load ({backend}): {status} {answer}"));
    }
    let t = Instant::now();
    let stream = ns.connect(AGENT_PORT, Duration::from_secs(60))?;
    let mut conn = HttpConn::new(stream, Duration::from_secs(120))?;
    let (status, _) = conn.request("POST", &format!("/invoke/{function}"), b"bench")?;
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    if status != 200 {
        return Err(format!(
            "first invocation after a {backend} restore: {status}"
        ));
    }
    let t = Instant::now();
    conn.request("POST", &format!("/invoke/{function}"), b"bench")?;
    let second_ms = t.elapsed().as_secs_f64() * 1e3;
    let (status, answer) = unix_request(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    )?;
    if status != 204 {
        return Err(format!("FlushMetrics: {status} {answer}"));
    }
    let text = std::fs::read_to_string(&metrics).map_err(|e| e.to_string())?;
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))
        .map_err(|e| format!("metrics: {e}"))?;
    let m = &line["memory_restore"];
    drop(vmm);
    Ok(Restored {
        load_ms,
        vmm_load_us: line["latencies_us"]["load_snapshot"]
            .as_f64()
            .unwrap_or(0.0),
        first_ms,
        second_ms,
        faults: m["faults_on_demand"].as_u64().unwrap_or(0),
        minor_faults: m["minor_faults"].as_u64().unwrap_or(0),
    })
}

fn run() -> Result<(), String> {
    let o = parse_args()?;
    let guest = GuestArtifacts::locate()?;
    let where_ = match detect_place() {
        Place::Lab => "KVM lab (QEMU TCG, nested SVM, snapshot files on a virtio disk read with O_DIRECT by QEMU): times are NOT hardware figures; fault counts are exact",
        _ => "hardware KVM",
    };
    println!(
        "snapshot benchmark: 1 vCPU, 256 MiB, Debian rootfs, function {}; {} runs each; ran on: {where_}",
        o.function, o.runs
    );
    let scratch = Scratch::new("bench-snap");
    let dir = snapshot_dir();
    let mut spec = VmSpec::read_only(&guest);
    spec.function = Some(o.function.clone());
    spec.api = true;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    for _ in 0..3 {
        let (status, _) = vm.invoke(&o.function, b"warmup")?;
        if status != 200 {
            return Err(format!("warm-up invocation: {status}"));
        }
    }
    let mut conn = vm.conn()?;
    let mut warm_ms = Vec::new();
    for _ in 0..o.runs {
        let t = Instant::now();
        conn.request("POST", &format!("/invoke/{}", o.function), b"bench")?;
        warm_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(conn);
    let api = scratch.path("api.sock");
    let (status, answer) = unix_request(&api, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    if status != 204 {
        return Err(format!("pause: {status} {answer}"));
    }
    let body = serde_json::json!({"snapshot_type": "Full", "snapshot_path": dir.join("vmstate"), "mem_file_path": dir.join("memory")}).to_string();
    let mut create_ms = Vec::new();
    for _ in 0..o.runs.min(5) {
        let t = Instant::now();
        let (status, answer) = unix_request(&api, "PUT", "/snapshot/create", &body)?;
        create_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if status != 204 {
            return Err(format!("snapshot/create: {status} {answer}"));
        }
    }
    drop(vm);

    let ns = NetNs::with_tap("bench")?;
    let mut rows = Vec::new();
    for backend in ["File", "OnDemand"] {
        for cold in [false, true] {
            let mut runs = Vec::new();
            for i in 0..o.runs {
                let r = restore_once(&ns, &dir, backend, cold, &o.function)?;
                eprintln!(
                    "  {backend} {} run {}: load {:.1} ms, first invocation {:.1} ms, {} faults on demand, {} minor",
                    if cold { "cold" } else { "hot" },
                    i + 1,
                    r.load_ms,
                    r.first_ms,
                    r.faults,
                    r.minor_faults
                );
                runs.push(r);
            }
            let med = |f: fn(&Restored) -> f64| median(runs.iter().map(f).collect());
            rows.push(format!(
                "| {backend} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
                if cold { "dropped" } else { "hot" },
                med(|r| r.load_ms),
                med(|r| r.vmm_load_us / 1e3),
                med(|r| r.first_ms),
                med(|r| r.second_ms),
                med(|r| r.faults as f64),
                med(|r| r.minor_faults as f64),
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!(
        "Full snapshot create (256 MiB, paused VM, files synced): median {:.0} ms of {}",
        median(create_ms.clone()),
        create_ms.len()
    );
    println!(
        "warm invocation before the snapshot (keep-alive HTTP): median {:.2} ms",
        median(warm_ms)
    );
    println!();
    println!("| backend | page cache | load-to-resumed, client (ms) | load_snapshot, VMM (ms) | first invocation incl. connect (ms) | second invocation (ms) | faults on demand (major for File) | minor faults |");
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!("\nmedians of {} runs; ran on: {where_}", o.runs);
    Ok(())
}

fn main() -> ExitCode {
    if detect_place() == Place::NeedsLab {
        return support::place::rerun_in_lab_with(
            "snapshot benchmark",
            &[("REAPVM_LAB_DISK_MIB", "2048")],
        );
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench snapshots: {e}");
            ExitCode::FAILURE
        }
    }
}
