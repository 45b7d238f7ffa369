//! Soak: many snapshot and restore cycles of one replay VM on this host's own KVM (never the
//! lab), checking that nothing piles up. Two phases:
//! 1. one reapvm process boots the replay guest and takes N Full snapshots in a row (pause,
//!    snapshot into the same two paths, resume): its open file descriptors and RSS must
//!    stay flat, and no temporary file may be left;
//! 2. N restores of the last snapshot, each in a fresh reapvm process, the backend rotating
//!    through File, OnDemand and Reap (the first Reap restore records the WS, the later
//!    ones prefetch it): every replay must read back the trace's checksum, the restored
//!    processes' descriptors and RSS must stay flat, and so must this process's own
//!    descriptors.
//!
//! Every 100 cycles it prints a line; at the end, a table of the first and last figures.
//! The snapshot files live on a tmpfs (no disk wear; root needed).
//!
//! `cargo bench -p vmm --bench soak -- [--cycles N]` (default 1000)

use reapvm_bench::replay_vm;
use test_support as support;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use replay_vm::{ReplaySnapshot, ReplayVmm};

const MEM_MIB: u64 = 32;
const TRACE_PAGES: u64 = 24 * 256;
const EVERY: usize = 100;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn temps(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("reapvm-tmp"))
            .count()
    })
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Figures of one sample: (fds, RSS KiB).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    cycle: usize,
    fds: usize,
    rss_kib: u64,
}

/// Flat: at most one descriptor more at the end than at the first sample (an API
/// connection may be open when either is taken), and RSS within 10% (allocator noise) and
/// 1 MiB of it.
fn flat(first: Sample, last: Sample) -> bool {
    last.fds <= first.fds + 1 && last.rss_kib <= first.rss_kib + first.rss_kib / 10 + 1024
}

fn snapshots_in_one_process(
    dir: &Path,
    cycles: usize,
    snap: &ReplaySnapshot,
) -> Result<(Sample, Sample), String> {
    let vmm = ReplayVmm::start(dir, "soak-snapshots", Some(&dir.join("replay-vm.json")))?;
    vmm.wait_for("ready", Duration::from_secs(60))?;
    let body = serde_json::json!({"snapshot_type": "Full", "snapshot_path": snap.vmstate, "mem_file_path": snap.memory});
    let mut samples = Vec::new();
    let started = Instant::now();
    for cycle in 1..=cycles {
        vmm.api("PATCH", "/vm", serde_json::json!({"state": "Paused"}))?;
        vmm.api("PUT", "/snapshot/create", body.clone())?;
        vmm.api("PATCH", "/vm", serde_json::json!({"state": "Resumed"}))?;
        if cycle == 1 || cycle % EVERY == 0 {
            let s = Sample {
                cycle,
                fds: fds(vmm.pid()),
                rss_kib: rss_kib(vmm.pid()),
            };
            println!(
                "snapshots {cycle:>5}: reapvm fds {:>3}, RSS {:>7} KiB, vmstate {} B, memory {} B, temporaries {}, {:.1} s",
                s.fds,
                s.rss_kib,
                file_len(&snap.vmstate),
                file_len(&snap.memory),
                temps(dir),
                started.elapsed().as_secs_f64()
            );
            samples.push(s);
        }
    }
    if temps(dir) != 0 {
        return Err(format!("{} temporary files left", temps(dir)));
    }
    Ok((samples[0], *samples.last().expect("samples")))
}

/// The first and last sample of each backend in the restore phase.
type PerBackend = Vec<(&'static str, Sample, Sample)>;

fn restores_in_fresh_processes(
    dir: &Path,
    cycles: usize,
    snap: &ReplaySnapshot,
    expected: u32,
) -> Result<(PerBackend, usize, usize), String> {
    let own_first = fds(std::process::id());
    let backends = ["File", "OnDemand", "Reap"];
    let _ = std::fs::remove_file(snap.ws());
    let mut samples: Vec<(&'static str, Sample)> = Vec::new();
    let started = Instant::now();
    for cycle in 1..=cycles {
        let backend = backends[(cycle - 1) % backends.len()];
        let vmm = ReplayVmm::start(dir, "soak-restore", None)?;
        let body = serde_json::json!({
            "snapshot_path": snap.vmstate,
            "mem_backend": {"backend_type": backend, "backend_path": snap.memory},
            "resume_vm": true,
        });
        vmm.api("PUT", "/snapshot/load", body)?;
        let m = vmm.wait_for("done", Duration::from_secs(60))?;
        let checksum = m["replay"]["checksum"].as_u64().unwrap_or(0) as u32;
        if checksum != expected {
            return Err(format!(
                "restore {cycle} ({backend}) replayed to {checksum:#x}, expected {expected:#x}"
            ));
        }
        // Each backend's first restore, and every 100th: RSS differs by backend, so only
        // samples of one backend are compared.
        if cycle <= backends.len() || cycle % EVERY == 0 {
            let s = Sample {
                cycle,
                fds: fds(vmm.pid()),
                rss_kib: rss_kib(vmm.pid()),
            };
            println!(
                "restores  {cycle:>5}: {backend:<8} reapvm fds {:>3}, RSS {:>7} KiB; this process fds {}; {:.1} s",
                s.fds,
                s.rss_kib,
                fds(std::process::id()),
                started.elapsed().as_secs_f64()
            );
            samples.push((backend, s));
        }
        if backend == "Reap" && cycle <= backends.len() {
            // The first Reap restore records: wait for its WS before the next one uses it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !snap.ws().exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let per_backend = backends
        .iter()
        .filter_map(|&b| {
            let mut of = samples
                .iter()
                .filter(|(name, _)| *name == b)
                .map(|(_, s)| *s);
            let first = of.next()?;
            Some((b, first, of.next_back().unwrap_or(first)))
        })
        .collect();
    Ok((per_backend, own_first, fds(std::process::id())))
}

fn run(cycles: usize) -> Result<bool, String> {
    let scratch = support::Scratch::new("soak");
    let dir = scratch.path("files");
    let _tmpfs = support::TmpfsMount::new(&dir, 4 * MEM_MIB)?;
    let trace = replay_vm::synthetic_trace(TRACE_PAGES, 2000);
    trace.check_fits(MEM_MIB * 256).map_err(|e| e.to_string())?;
    let trace_path = replay_vm::write_trace(&scratch.dir, &trace)?;
    let snap = replay_vm::boot_and_snapshot(&dir, &trace_path, MEM_MIB)?;
    println!("soak: {cycles} cycles per phase, replay guest of {MEM_MIB} MiB, this host's KVM");
    let (s1, s2) = snapshots_in_one_process(&dir, cycles, &snap)?;
    // The last snapshot was taken after the replay guest said ready: restores replay it.
    let (restores, own1, own2) =
        restores_in_fresh_processes(&dir, cycles, &snap, trace.expected_checksum())?;
    println!();
    println!("| phase | first: fds, RSS KiB | last: fds, RSS KiB | flat |");
    println!("|---|---|---|---|");
    let row = |name: &str, a: Sample, b: Sample| {
        println!(
            "| {name} | {} ({}), {} | {} ({}), {} | {} |",
            a.fds,
            a.cycle,
            a.rss_kib,
            b.fds,
            b.cycle,
            b.rss_kib,
            if flat(a, b) { "yes" } else { "NO" }
        );
    };
    row("snapshots in one process", s1, s2);
    for &(backend, first, last) in &restores {
        row(
            &format!("restores with {backend}, each process"),
            first,
            last,
        );
    }
    println!(
        "| this process's fds | {own1} | {own2} | {} |",
        if own1 == own2 { "yes" } else { "NO" }
    );
    let restores_flat = restores.iter().all(|&(_, a, b)| flat(a, b));
    Ok(flat(s1, s2) && restores_flat && own1 == own2)
}

fn main() -> ExitCode {
    let mut cycles = 1000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cycles" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => cycles = n,
                _ => {
                    eprintln!("soak: --cycles needs a positive number");
                    return ExitCode::FAILURE;
                }
            },
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => {
                eprintln!("soak: unknown argument {other}");
                return ExitCode::FAILURE;
            }
        }
    }
    match run(cycles) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("soak: something grew (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}
