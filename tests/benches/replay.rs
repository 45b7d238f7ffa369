//! Real-speed cold starts on this machine (docs/replay.md): each function's REAP recording
//! from the suite benchmark (~/.cache/reapvm/suite/NAME) becomes a replay trace; a replay VM
//! whose memory mirrors the function's is snapshotted, then restored N times per memory
//! backend on this host's own KVM, cold (snapshot and WS files dropped from the page cache)
//! and hot, modes interleaved run by run, timing the first "invocation" (the replay). The
//! compute between touches is the function's handler timed here (bench/src/replay_compute.rs).
//!
//! `scripts/bench-replay.sh [--functions a,b] [--modes File,Uffd,Uffd-fa,REAP,REAP+,REAP-stream,REAP-stream-fa,File-tmpfs] [--runs N] [--out DIR]`

use reapvm_bench::suite as suite_bench;
use reapvm_bench::{replay_compute, replay_vm};
use test_support as support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use snapshot::replay_trace::{export, Trace};
use snapshot::touch_log::TouchLog;
use snapshot::PAGE_SIZE;
use suite_bench::options::{Mode, Options};
use suite_bench::report::{geomean, spread, spread_of, Sample, Spread};
use support::repo_root;

/// How much slower guest code runs in the KVM lab than on hardware (docs/kvm-lab.md: ~25x):
/// the old estimate of the compute between a trace's touches was the function's lab warm
/// latency divided by it; kept as a column beside the measured compute.
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
    /// The compute the trace replays: the median warm invocation of the function's handler
    /// measured here (bench/src/replay_compute.rs).
    compute_ms: f64,
    /// The old estimate, kept for comparison: the lab's warm median / LAB_SLOWDOWN (None for
    /// a recording made on hardware KVM, whose warm median is taken as it is).
    lab_estimate_ms: Option<f64>,
}

/// Warm invocations timed per function for the replay's compute (their median is used).
const COMPUTE_RUNS: usize = 11;

fn prepare(
    name: &str,
    cache: &Path,
    rootfs: &Path,
    work: &Path,
    iters_per_us: f64,
) -> Result<Prepared, String> {
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
    let ws = snapshot::ws::summarize(&ws_bytes).map_err(|e| format!("{name} WS: {e}"))?;
    let warm_ms = info["warm_median_ms"]
        .as_f64()
        .ok_or(format!("{name} info.json: no warm_median_ms"))?;
    // Lab figures are ~25x slow; a recording made on hardware KVM is taken as it is.
    let in_lab = info["ran_on"]
        .as_str()
        .is_some_and(|r| r.contains("KVM lab"));
    let lab_estimate_ms = in_lab.then_some(warm_ms / LAB_SLOWDOWN);
    let f = suite_bench::functions::find(name).ok_or(format!("unknown function {name}"))?;
    let warm = replay_compute::warm_invocations_ms(
        rootfs,
        &work.join("rootfs-mount"),
        name,
        f.body,
        COMPUTE_RUNS,
    )?;
    let compute_ms = spread(&warm).ok_or("no timings")?.median;
    // The touch log has the order of first touch and each touch's kind. Recordings made
    // before reapvm kept touch logs have none: their WS order (version 1: first touch)
    // stands, every touch a read.
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
    let touched: Vec<(u64, bool)> = match &log {
        Some(log) => log.touches.iter().map(|t| (t.file_offset, t.write)).collect(),
        None if ws.version == 1 => ws.pages().map(|p| (p, false)).collect(),
        None => {
            return Err(format!(
                "{name}: no touch log beside a version-{} WS, whose order is not the order of first touch",
                ws.version
            ))
        }
    };
    let (trace, report) = export(
        &ws.regions,
        &touched,
        &memory,
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
        lab_estimate_ms,
    })
}

fn cell(s: Option<Spread>) -> String {
    match s {
        Some(s) => format!("{:.1} ({:.1}-{:.1})", s.median, s.min, s.max),
        None => "-".into(),
    }
}

/// One restore: the suite's columns (for the tables and the chart) and the VMM's breakdown.
struct Row {
    sample: Sample,
    run: replay_vm::ReplayRun,
}

const CSV_HEADER: &str = "function,mode,page_cache,run,latency_ms,load_to_resumed_ms,vmstate_load_us,ws_fetch_us,ws_install_us,post_resume_ms,faults_on_demand,bytes_read,ws_bytes,resident_pages_after_drop";

fn csv(rows: &[Row]) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    for Row { sample: s, run: r } in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.3},{:.3},{},{},{},{:.3},{},{},{},{}",
            s.function,
            s.kind,
            s.page_cache,
            s.run,
            s.latency_ms,
            r.vmm_load_ms,
            r.vmstate_load_us,
            r.ws_fetch_us,
            r.ws_install_us,
            r.replay_ms,
            s.faults_on_demand,
            s.bytes_read,
            s.ws_bytes,
            r.resident_pages
        );
    }
    out
}

/// The speed-ups the tables show: (mode, baseline). Against File-tmpfs, a memory-cached
/// snapshot, they say how close a backend gets to the limit.
const RATIOS: [(Mode, Mode); 8] = [
    (Mode::Reap, Mode::File),
    (Mode::ReapPlus, Mode::File),
    (Mode::ReapStream, Mode::File),
    (Mode::Reap, Mode::Uffd),
    (Mode::UffdFaultAround, Mode::Uffd),
    (Mode::ReapStreamFaultAround, Mode::ReapStream),
    (Mode::Reap, Mode::Tmpfs),
    (Mode::ReapStream, Mode::Tmpfs),
];

fn ratio_name(x: Mode, y: Mode) -> String {
    format!("{} vs {}", x.label(), y.label())
}

fn markdown(
    rows: &[Row],
    done: &[(String, Prepared)],
    modes: &[Mode],
    command: &str,
    iters_per_us: f64,
) -> String {
    let samples: Vec<Sample> = rows.iter().map(|r| r.sample.clone()).collect();
    let samples = &samples[..];
    let mut out = String::new();
    let _ = writeln!(out, "Ran on: this machine's own KVM (kvm-pvm: guest user mode runs natively; the replay runs in user mode), snapshot files on its disk. Command: `{command}`. Modes ran interleaved (each run: every mode cold, then hot). The replay loop ran {iters_per_us:.0} iterations/us here. Each trace's compute is the median of {COMPUTE_RUNS} warm invocations of the function's handler timed here, in a chroot of the suite rootfs on one CPU (\"compute\"); \"lab estimate\" is the old figure, the lab's warm median / {LAB_SLOWDOWN}. A write touch is one locked read-and-write (one fault), as the function's first write was.\n");
    let kind_of = |m: Mode, cache: &str| {
        if cache == "cold" {
            m.label().to_string()
        } else {
            format!("{} hot", m.label())
        }
    };
    for (cache, title) in [
        (
            "cold",
            "snapshot and WS files dropped from the page cache, checked with mincore",
        ),
        ("hot", "page cache hot"),
    ] {
        let _ = writeln!(
            out,
            "Restore to replay done, ms ({title}), median (min-max):\n"
        );
        let mut head = String::from(
            "| function | touched pages | writes | compute (ms) | lab estimate (ms) |",
        );
        for m in modes {
            let _ = write!(head, " {} |", m.label());
        }
        for (x, y) in RATIOS {
            let _ = write!(head, " {} |", ratio_name(x, y));
        }
        head.push_str(" faults on demand Uffd -> REAP |");
        let _ = writeln!(
            out,
            "{head}\n|{}",
            "---|".repeat(modes.len() + RATIOS.len() + 6)
        );
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); RATIOS.len()];
        for (name, p) in done {
            let lat = |m: Mode| spread_of(samples, name, &kind_of(m, cache), |s| s.latency_ms);
            let mut row = format!(
                "| {name} | {} | {} | {:.1} | {} |",
                p.trace.touches.len(),
                p.writes.map_or("-".into(), |w| w.to_string()),
                p.compute_ms,
                p.lab_estimate_ms.map_or("-".into(), |e| format!("{e:.1}"))
            );
            for &m in modes {
                let _ = write!(row, " {} |", cell(lat(m)));
            }
            for (all, (x, y)) in ratios.iter_mut().zip(RATIOS) {
                // How many times faster x's mode is than y's: y's latency over x's.
                let r = lat(y)
                    .zip(lat(x))
                    .map(|(slow, fast)| slow.median / fast.median);
                all.extend(r);
                let _ = write!(row, " {} |", r.map_or("-".into(), |r| format!("{r:.2}x")));
            }
            let faults = |m: Mode| {
                spread_of(samples, name, &kind_of(m, cache), |s| {
                    s.faults_on_demand as f64
                })
                .map_or("-".into(), |s| format!("{:.0}", s.median))
            };
            let _ = writeln!(row, " {} -> {} |", faults(Mode::Uffd), faults(Mode::Reap));
            out.push_str(&row);
        }
        let means: Vec<String> = RATIOS
            .iter()
            .zip(&ratios)
            .filter_map(|(&(x, y), v)| geomean(v).map(|g| format!("{} {g:.2}x", ratio_name(x, y))))
            .collect();
        let _ = writeln!(
            out,
            "\nGeometric means ({cache}): {}. (\"A vs B\": how many times faster A is than B; a \"vs File-tmpfs\" below 1.00x is how far from a memory-cached snapshot.)\n",
            means.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "Where the cold time went, medians in ms (load-to-resumed = the VMM's load_snapshot, of which vmstate, WS fetch and, unless chunked, WS install; after resume = resume to the replay's done):\n"
    );
    let _ = writeln!(
        out,
        "| function | mode | load-to-resumed | vmstate | WS fetch | WS install | after resume |\n|---|---|---|---|---|---|---|"
    );
    for (name, _) in done {
        for &m in modes {
            let of = |f: fn(&replay_vm::ReplayRun) -> f64| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|r| r.sample.function == *name && r.sample.kind == m.label())
                    .map(|r| f(&r.run))
                    .collect();
                spread(&v).map_or("-".into(), |s| format!("{:.2}", s.median))
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                m.label(),
                of(|r| r.vmm_load_ms),
                of(|r| r.vmstate_load_us as f64 / 1e3),
                of(|r| r.ws_fetch_us as f64 / 1e3),
                of(|r| r.ws_install_us as f64 / 1e3),
                of(|r| r.replay_ms),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nWS pages below 2 MiB (the replay guest's own region, left out of the traces): {}.",
        done.iter()
            .map(|(n, p)| format!("{n} {}", p.dropped))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}

/// A copy of a snapshot's memory file on a tmpfs (the File-tmpfs baseline), removed when
/// dropped.
struct TmpfsCopy {
    dir: PathBuf,
    memory: PathBuf,
}

impl TmpfsCopy {
    fn new(memory: &Path, name: &str) -> Result<Self, String> {
        let shm = Path::new("/dev/shm");
        // SAFETY: statfs writes into the zeroed struct it is given; the path is a C string.
        let is_tmpfs = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c"/dev/shm".as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
        };
        if !is_tmpfs {
            return Err("/dev/shm is not a tmpfs here: the File-tmpfs baseline needs one".into());
        }
        let dir = shm.join(format!("reapvm-replay-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let copy = Self {
            memory: dir.join("memory"),
            dir,
        };
        std::fs::copy(memory, &copy.memory)
            .map_err(|e| format!("copying {} to the tmpfs: {e}", memory.display()))?;
        Ok(copy)
    }
}

impl Drop for TmpfsCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(o: &Options, cache: &Path, work: &Path, command: &str) -> Result<String, String> {
    let rootfs = support::GuestArtifacts::locate_suite()?.rootfs;
    let iters_per_us = loop_iterations_per_us();
    eprintln!("[replay] the replay loop runs {iters_per_us:.0} iterations/us here");
    let mut rows: Vec<Row> = Vec::new();
    let mut done: Vec<(String, Prepared)> = Vec::new();
    for name in &o.functions {
        let p = prepare(name, cache, &rootfs, work, iters_per_us)?;
        let expected = p.trace.expected_checksum();
        let dir = work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let trace_path = dir.join("trace.bin");
        std::fs::write(&trace_path, p.trace.encode()).map_err(|e| e.to_string())?;
        eprintln!(
            "[replay] {name}: {} touches ({} writes), {} WS pages, {:.1} ms compute measured ({} lab estimate), {} MiB VM",
            p.trace.touches.len(),
            p.writes
                .map_or("no touch log: no".into(), |w| w.to_string()),
            p.ws_pages,
            p.compute_ms,
            p.lab_estimate_ms.map_or("no".into(), |e| format!("{e:.1} ms")),
            p.mem_mib
        );
        let snap = replay_vm::boot_and_snapshot(&dir, &trace_path, p.mem_mib)?;
        let tmpfs = if o.modes.contains(&Mode::Tmpfs) {
            Some(TmpfsCopy::new(&snap.memory, name)?)
        } else {
            None
        };
        let mut one = |mode: Mode, cold: bool, run: usize, kind: String| -> Result<(), String> {
            let memory = match (&tmpfs, mode) {
                (Some(t), Mode::Tmpfs) => t.memory.clone(),
                _ => snap.memory.clone(),
            };
            let r = replay_vm::restore_and_replay(&dir, &snap, mode.backend(&memory), cold)?;
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
            let sample = Sample {
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
            };
            rows.push(Row { sample, run: r });
            Ok(())
        };
        one(Mode::Reap, true, 1, "record".into())?;
        // Round robin: a slow minute of this host (another job, the disk's own work) lands
        // on every mode alike instead of on one mode's block of runs.
        for run in 1..=o.runs {
            for &mode in &o.modes {
                one(mode, true, run, mode.label().into())?;
                one(mode, false, run, format!("{} hot", mode.label()))?;
            }
        }
        for &mode in &o.modes {
            let med = rows
                .iter()
                .filter(|r| r.sample.function == *name && r.sample.kind == mode.label())
                .map(|r| r.sample.latency_ms)
                .collect::<Vec<_>>();
            let med = spread(&med).map_or(0.0, |s| s.median);
            eprintln!("[replay] {name} {}: cold median {med:.2} ms", mode.label());
        }
        drop(tmpfs);
        let _ = std::fs::remove_dir_all(&dir);
        done.push((name.clone(), p));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    std::fs::write(o.out.join("replay-runs.csv"), csv(&rows)).map_err(|e| e.to_string())?;
    let md = markdown(&rows, &done, &o.modes, command, iters_per_us);
    std::fs::write(o.out.join("replay-results.md"), &md).map_err(|e| e.to_string())?;
    let names: Vec<String> = done.iter().map(|(n, _)| n.clone()).collect();
    let kinds: Vec<&str> = o.modes.iter().map(|m| m.label()).collect();
    let samples: Vec<Sample> = rows.into_iter().map(|r| r.sample).collect();
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
    if !args.iter().any(|a| a == "--modes") {
        o.modes.extend([Mode::ReapStream, Mode::Tmpfs]);
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
