//! Real-speed cold starts on this machine (docs/replay.md): each function's REAP recording
//! from the suite benchmark (~/.cache/reapvm/suite/NAME) becomes a replay trace; a replay VM
//! whose memory mirrors the function's is snapshotted, then restored N times per memory
//! backend on this host's own KVM, cold (snapshot and WS files dropped from the page cache)
//! and hot, timing the first "invocation" (the replay).
//!
//! `scripts/bench-replay.sh [--functions a,b] [--modes File,Uffd,REAP,REAP+] [--runs N] [--out DIR]`

use reapvm_bench::replay_vm;
use reapvm_bench::suite as suite_bench;
use test_support as support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use snapshot::replay_trace::{export, Trace};
use snapshot::touch_log::TouchLog;
use snapshot::PAGE_SIZE;
use suite_bench::options::{Mode, Options};
use suite_bench::report::{csv, geomean, spread_of, Sample, Spread};
use support::repo_root;

/// How much slower guest code runs in the KVM lab than on hardware (docs/kvm-lab.md: ~25x):
/// the compute between a trace's touches is the function's lab warm latency divided by it.
const LAB_SLOWDOWN: f64 = 25.0;

/// Iterations per microsecond of the replay guest's two-instruction loop, run here natively.
fn loop_iterations_per_us() -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let n: u32 = 200_000_000;
        let t = Instant::now();
        // SAFETY: the same register-only countdown loop as the replay guest's.
        unsafe {
            std::arch::asm!("2:", "sub {n:e}, 1", "jnz 2b", n = inout(reg) n => _, options(nomem, nostack));
        }
        best = best.max(f64::from(n) / (t.elapsed().as_secs_f64() * 1e6));
    }
    best
}

struct Prepared {
    trace: Trace,
    mem_mib: u64,
    ws_pages: u64,
    dropped: u64,
    /// Touches that are writes; None when the recording has no touch log (all reads).
    writes: Option<u64>,
    compute_ms: f64,
}

fn prepare(name: &str, cache: &Path, iters_per_us: f64) -> Result<Prepared, String> {
    let dir = cache.join(name);
    let read = |file: &str| {
        std::fs::read(dir.join(file)).map_err(|e| {
            format!(
                "{}: {e} (run scripts/bench-suite.sh first)",
                dir.join(file).display()
            )
        })
    };
    let info: serde_json::Value = serde_json::from_slice(&read("info.json")?)
        .map_err(|e| format!("{name} info.json: {e}"))?;
    let memory = read("memory")?;
    let ws_bytes = read("memory.ws")?;
    let ws = snapshot::ws::decode_any(&ws_bytes).map_err(|e| format!("{name} WS: {e}"))?;
    let warm_ms = info["warm_median_ms"]
        .as_f64()
        .ok_or(format!("{name} info.json: no warm_median_ms"))?;
    // Lab figures are ~25x slow; a recording made on hardware KVM is taken as it is.
    let in_lab = info["ran_on"]
        .as_str()
        .is_some_and(|r| r.contains("KVM lab"));
    let compute_ms = if in_lab {
        warm_ms / LAB_SLOWDOWN
    } else {
        warm_ms
    };
    // Recordings made before reapvm kept touch logs have none: their touches are reads.
    let log = match std::fs::read(dir.join("memory.ws.touches")) {
        Ok(bytes) => {
            let log = TouchLog::decode(&bytes).map_err(|e| format!("{name} touch log: {e}"))?;
            if log.identity != ws.identity {
                return Err(format!(
                    "{name}: the touch log belongs to another recording than memory.ws"
                ));
            }
            Some(log)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{name} touch log: {e}")),
    };
    let first_writes = log.as_ref().map(TouchLog::first_writes).unwrap_or_default();
    let (trace, report) = export(
        &ws,
        &memory,
        &first_writes,
        (compute_ms * 1e3 * iters_per_us) as u64,
    );
    let fn_mib = info["mem_size_mib"]
        .as_u64()
        .ok_or(format!("{name} info.json: no mem_size_mib"))?;
    // Room above the function's memory for the initrd (the trace), which goes at the top.
    let trace_mib = (trace.encode().len() as u64).div_ceil(1 << 20);
    let mem_mib = fn_mib + trace_mib + 4;
    trace
        .check_fits(fn_mib * (1 << 20) / PAGE_SIZE as u64)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(Prepared {
        trace,
        mem_mib,
        ws_pages: report.ws_pages,
        dropped: report.dropped_reserved,
        writes: log.map(|_| report.write_touches),
        compute_ms,
    })
}

fn cell(s: Option<Spread>) -> String {
    match s {
        Some(s) => format!("{:.1} ({:.1}-{:.1})", s.median, s.min, s.max),
        None => "-".into(),
    }
}

fn markdown(
    samples: &[Sample],
    done: &[(String, Prepared)],
    modes: &[Mode],
    command: &str,
    iters_per_us: f64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Ran on: this machine's own KVM (kvm-pvm: guest user mode runs natively; the replay runs in user mode), snapshot files on its disk. Command: `{command}`. The replay loop ran {iters_per_us:.0} iterations/us here; each trace's compute is the function's lab warm latency / {LAB_SLOWDOWN}.\n");
    for (cache, title) in [
        ("cold", "snapshot and WS files dropped from the page cache"),
        ("hot", "page cache hot"),
    ] {
        let _ = writeln!(
            out,
            "Restore to replay done, ms ({title}), median (min-max):\n"
        );
        let mut head = String::from("| function | WS pages | compute (ms) |");
        for m in modes {
            let _ = write!(head, " {} |", m.label());
        }
        head.push_str(" REAP vs File | REAP+ vs File | REAP vs Uffd | faults on demand Uffd -> REAP | load-to-resumed REAP (ms) |");
        let _ = writeln!(out, "{head}\n|{}", "---|".repeat(modes.len() + 8));
        let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
        for (name, p) in done {
            let kind = |m: Mode| {
                if cache == "cold" {
                    m.label().to_string()
                } else {
                    format!("{} hot", m.label())
                }
            };
            let lat = |m: Mode| spread_of(samples, name, &kind(m), |s| s.latency_ms);
            let mut row = format!(
                "| {name} | {} | {:.1} |",
                p.trace.touches.len(),
                p.compute_ms
            );
            for &m in modes {
                let _ = write!(row, " {} |", cell(lat(m)));
            }
            let ratio = |x: Mode, y: Mode| Some(lat(x)?.median / lat(y)?.median);
            let (r1, r2, r3) = (
                ratio(Mode::File, Mode::Reap),
                ratio(Mode::File, Mode::ReapPlus),
                ratio(Mode::Uffd, Mode::Reap),
            );
            a.extend(r1);
            b.extend(r2);
            c.extend(r3);
            let x = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}x"));
            let faults = |m: Mode| {
                spread_of(samples, name, &kind(m), |s| s.faults_on_demand as f64)
                    .map_or("-".into(), |s| format!("{:.0}", s.median))
            };
            let load = spread_of(samples, name, &kind(Mode::Reap), |s| s.load_ms);
            let _ = writeln!(
                row,
                " {} | {} | {} | {} -> {} | {} |",
                x(r1),
                x(r2),
                x(r3),
                faults(Mode::Uffd),
                faults(Mode::Reap),
                cell(load)
            );
            out.push_str(&row);
        }
        let g = |v: &[f64]| geomean(v).map_or("-".into(), |g| format!("{g:.2}x"));
        let _ = writeln!(
            out,
            "\nGeometric means ({cache}): REAP vs File {}, REAP+ vs File {}, REAP vs Uffd {}.\n",
            g(&a),
            g(&b),
            g(&c)
        );
    }
    let _ = writeln!(
        out,
        "WS pages below 2 MiB (the replay guest's own region, left out of the traces): {}.",
        done.iter()
            .map(|(n, p)| format!("{n} {}", p.dropped))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "Write touches (from each recording's touch log; \"-\": no log, every touch a read): {}.",
        done.iter()
            .map(|(n, p)| match p.writes {
                Some(w) => format!("{n} {w}"),
                None => format!("{n} -"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}

fn run(o: &Options, cache: &Path, work: &Path, command: &str) -> Result<String, String> {
    let iters_per_us = loop_iterations_per_us();
    eprintln!("[replay] the replay loop runs {iters_per_us:.0} iterations/us here");
    let mut samples = Vec::new();
    let mut done: Vec<(String, Prepared)> = Vec::new();
    for name in &o.functions {
        let p = prepare(name, cache, iters_per_us)?;
        let expected = p.trace.expected_checksum();
        let dir = work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let trace_path = dir.join("trace.bin");
        std::fs::write(&trace_path, p.trace.encode()).map_err(|e| e.to_string())?;
        eprintln!(
            "[replay] {name}: {} touches ({} writes), {} WS pages, {:.1} ms compute, {} MiB VM",
            p.trace.touches.len(),
            p.writes
                .map_or("no touch log: no".into(), |w| w.to_string()),
            p.ws_pages,
            p.compute_ms,
            p.mem_mib
        );
        let snap = replay_vm::boot_and_snapshot(&dir, &trace_path, p.mem_mib)?;
        let one = |mode: Mode, cold: bool, run: usize, kind: String| -> Result<Sample, String> {
            let r = replay_vm::restore_and_replay(&dir, &snap, mode.backend(&snap.memory), cold)?;
            if r.checksum != expected {
                return Err(format!(
                    "{name} {kind}: checksum {:#010x}, the trace says {expected:#010x}",
                    r.checksum
                ));
            }
            if kind != "record"
                && mode.is_reap()
                && (r.backend_mode != "prefetch" || r.ws_error.is_some())
            {
                return Err(format!(
                    "{name} {kind}: mode {:?}, WS error {:?}",
                    r.backend_mode, r.ws_error
                ));
            }
            Ok(Sample {
                function: name.clone(),
                kind,
                page_cache: if cold { "cold" } else { "hot" },
                run,
                load_ms: r.load_ms,
                invoke_ms: r.replay_ms,
                latency_ms: r.latency_ms(),
                faults_on_demand: r.faults_on_demand,
                bytes_read: r.bytes_read,
                ws_bytes: std::fs::metadata(snap.ws()).map(|m| m.len()).unwrap_or(0),
                vmm_rss_overhead_kib: 0,
            })
        };
        samples.push(one(Mode::Reap, true, 1, "record".into())?);
        for &mode in &o.modes {
            for run in 1..=o.runs {
                samples.push(one(mode, true, run, mode.label().into())?);
                samples.push(one(mode, false, run, format!("{} hot", mode.label()))?);
            }
            let med =
                spread_of(&samples, name, mode.label(), |s| s.latency_ms).map_or(0.0, |s| s.median);
            eprintln!("[replay] {name} {}: cold median {med:.2} ms", mode.label());
        }
        let _ = std::fs::remove_dir_all(&dir);
        done.push((name.clone(), p));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    std::fs::write(o.out.join("replay-runs.csv"), csv(&samples)).map_err(|e| e.to_string())?;
    let md = markdown(&samples, &done, &o.modes, command, iters_per_us);
    std::fs::write(o.out.join("replay-results.md"), &md).map_err(|e| e.to_string())?;
    let names: Vec<String> = done.iter().map(|(n, _)| n.clone()).collect();
    let kinds: Vec<&str> = o.modes.iter().map(|m| m.label()).collect();
    suite_bench::plot::latency_chart(&o.out.join("replay-cold-latency.svg"), &samples, &names, &kinds, "replay: restore to done, cold, median; ran on this machine's KVM (kvm-pvm, user mode native)")?;
    Ok(md)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cache = suite_bench::host_cache_dir();
    let mut o = match Options::parse(args.clone(), repo_root().join("target/replay-bench")) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("replay benchmark: {e}");
            return ExitCode::from(2);
        }
    };
    if o.out.is_relative() {
        let base = std::env::var_os("REAPVM_CALLER_DIR").map_or_else(repo_root, PathBuf::from);
        o.out = base.join(&o.out);
    }
    if !args.iter().any(|a| a == "--functions") {
        // Default: every function the suite benchmark has recorded.
        o.functions
            .retain(|f| cache.join(f).join("memory.ws").is_file());
        if o.functions.is_empty() {
            eprintln!(
                "replay benchmark: no recordings in {}: run scripts/bench-suite.sh first",
                cache.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let shown: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let command = format!("scripts/bench-replay.sh {}", shown.join(" "))
        .trim_end()
        .to_string();
    match run(
        &o,
        &cache,
        &repo_root().join("target/replay-work"),
        &command,
    ) {
        Ok(md) => {
            println!("\n{md}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("replay benchmark: {e}");
            ExitCode::FAILURE
        }
    }
}
