//! Snapshot benchmark: Full snapshot create time, load-to-resumed time, and the first
//! invocation after a restore per memory backend (File, OnDemand userfaultfd, REAP record,
//! REAP prefetch and each of its options), with the snapshot and WS files hot in the page
//! cache and dropped from it (posix_fadvise DONTNEED). Medians of N runs.
//!
//! `cargo bench -p vmm --bench snapshots -- [--runs N] [--function NAME]`
//!
//! The snapshot files must be on a disk for "cold" to mean anything: in the KVM lab they go
//! to a scratch disk the lab gets for this run (QEMU reads it with O_DIRECT); on hardware
//! KVM, to target/bench-snapshots.

use test_support as support;

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
    mode: String,
    ws_fetch_us: f64,
    ws_install_us: f64,
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

/// A way to restore: its label and its `mem_backend` object.
struct Variant {
    label: &'static str,
    backend: serde_json::Value,
}

fn variants(dir: &Path) -> Vec<Variant> {
    let mem = dir.join("memory");
    let reap = |options: serde_json::Value| serde_json::json!({"backend_type": "Reap", "backend_path": mem, "reap_options": options});
    vec![
        Variant {
            label: "File",
            backend: serde_json::json!({"backend_type": "File", "backend_path": mem}),
        },
        Variant {
            label: "OnDemand (userfaultfd)",
            backend: serde_json::json!({"backend_type": "OnDemand", "backend_path": mem}),
        },
        Variant {
            label: "REAP prefetch (paper)",
            backend: reap(serde_json::json!({})),
        },
        Variant {
            label: "REAP + fetch_in_parallel",
            backend: reap(serde_json::json!({"fetch_in_parallel": true})),
        },
        Variant {
            label: "REAP + o_direct",
            backend: reap(serde_json::json!({"o_direct": true})),
        },
        Variant {
            label: "REAP + chunked_install",
            backend: reap(serde_json::json!({"chunked_install": true})),
        },
        Variant {
            label: "REAP + all three",
            backend: reap(
                serde_json::json!({"fetch_in_parallel": true, "o_direct": true, "chunked_install": true}),
            ),
        },
    ]
}

fn restore_once(
    ns: &NetNs,
    dir: &Path,
    backend: &serde_json::Value,
    cold: bool,
    function: &str,
) -> Result<Restored, String> {
    let (vmstate, mem, ws) = (
        dir.join("vmstate"),
        dir.join("memory"),
        dir.join("memory.ws"),
    );
    if cold {
        drop_from_page_cache(&vmstate)?;
        drop_from_page_cache(&mem)?;
        if ws.exists() {
            drop_from_page_cache(&ws)?;
        }
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
        "mem_backend": backend,
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
    if m["mode"] == "record" {
        // The WS is written once the invocation was answered; the next restore needs it.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ws.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(vmm);
    Ok(Restored {
        mode: m["mode"].as_str().unwrap_or("?").to_string(),
        ws_fetch_us: m["ws_fetch_us"].as_f64().unwrap_or(0.0),
        ws_install_us: m["ws_install_us"].as_f64().unwrap_or(0.0),
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
    let mut row = |label: &str, cold: bool, runs: &[Restored]| {
        let med = |f: fn(&Restored) -> f64| median(runs.iter().map(f).collect());
        rows.push(format!(
            "| {label} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
            if cold { "dropped" } else { "hot" },
            runs.len(),
            med(|r| r.load_ms),
            med(|r| r.vmm_load_us / 1e3),
            med(|r| r.ws_fetch_us / 1e3),
            med(|r| r.ws_install_us / 1e3),
            med(|r| r.first_ms),
            med(|r| r.second_ms),
            med(|r| r.faults as f64),
            med(|r| r.minor_faults as f64),
        ));
    };
    let log = |label: &str, cold: bool, i: usize, r: &Restored| {
        eprintln!(
            "  {label} {} run {}: mode {}, load {:.1} ms, first invocation {:.1} ms, {} faults on demand, {} minor",
            if cold { "cold" } else { "hot" },
            i + 1,
            r.mode,
            r.load_ms,
            r.first_ms,
            r.faults,
            r.minor_faults
        );
    };
    let ws = dir.join("memory.ws");
    for cold in [false, true] {
        // REAP's recording restore: the first after the snapshot (one run per cache state).
        let _ = std::fs::remove_file(&ws);
        let record = &variants(&dir)[2];
        let r = restore_once(&ns, &dir, &record.backend, cold, &o.function)?;
        log("REAP record", cold, 0, &r);
        if r.mode != "record" || !ws.exists() {
            return Err(format!("REAP did not record a WS (mode {})", r.mode));
        }
        row("REAP record (first restore)", cold, &[r]);
        for v in variants(&dir) {
            let mut runs = Vec::new();
            for i in 0..o.runs {
                let r = restore_once(&ns, &dir, &v.backend, cold, &o.function)?;
                log(v.label, cold, i, &r);
                runs.push(r);
            }
            row(v.label, cold, &runs);
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
    println!("| backend | page cache | runs | load-to-resumed, client (ms) | load_snapshot, VMM (ms) | WS fetch (ms) | WS install (ms) | first invocation incl. connect (ms) | second invocation (ms) | faults on demand (major for File) | minor faults |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
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
