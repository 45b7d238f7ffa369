//! The orchestrator's benchmark: cold starts through reapd per cold-start mode with vHive's
//! breakdown, warm invocations, and cold starts with 1, 2 and 4 at once (REAP), for a few
//! functions of the suite. Modes and concurrency levels are interleaved round by round.
//!
//! `cargo build --release -p vmm && cargo bench -p orchestrator --bench reapd --
//!  [--rounds N] [--functions helloworld,pyaes,image_rotate] [--modes reap,file,lazy]
//!  [--sections cold,concurrent,load] [--load RATE:SECONDS]`
//!
//! `load` runs `reapctl bench` (Poisson arrivals) on each function's REAP deployment,
//! starting from zero instances.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use orchestrator::breakdown::FIELD_NAMES;
use test_support::place::rerun_in_lab;
use test_support::reapd::{Binaries, Ran, Reapd};
use test_support::{detect_place, reapvm_bin, GuestArtifacts, Place, Scratch};

struct Args {
    rounds: usize,
    functions: Vec<String>,
    modes: Vec<String>,
    /// Which parts run: `cold` (per mode), `concurrent` (1, 2, 4 at once), `load`
    /// (`reapctl bench`, open loop).
    sections: Vec<String>,
    /// `reapctl bench`'s rate (per second) and duration (seconds).
    load: (String, String),
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rounds: 5,
        functions: ["helloworld", "pyaes", "image_rotate"]
            .map(String::from)
            .to_vec(),
        modes: ["reap", "file", "lazy"].map(String::from).to_vec(),
        sections: ["cold", "concurrent", "load"].map(String::from).to_vec(),
        load: ("2".into(), "30".into()),
    };
    let list = |v: Option<String>| -> Result<Vec<String>, String> {
        Ok(v.ok_or("a comma-separated list")?
            .split(',')
            .map(String::from)
            .collect())
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => {
                args.rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--rounds N (N >= 1)")?
            }
            "--functions" => args.functions = list(it.next())?,
            "--modes" => args.modes = list(it.next())?,
            "--sections" => args.sections = list(it.next())?,
            "--load" => {
                let v = it.next().ok_or("--load RATE:SECONDS")?;
                let (rate, secs) = v.split_once(':').ok_or("--load RATE:SECONDS")?;
                args.load = (rate.to_string(), secs.to_string());
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// The fields of reapctl's stderr line (`latency=..us LoadVMM=..us ...`), in microseconds or pages.
fn fields(ran: &Ran) -> BTreeMap<String, u64> {
    let line = ran.stderr.lines().last().unwrap_or("");
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim_end_matches("us").parse().ok()?)))
        .collect()
}

/// Whether an invocation was a cold start, and its fields.
type Served = (bool, BTreeMap<String, u64>);

/// An invocation, cold or warm.
fn invoke_any(reapd: &Reapd, name: &str) -> Result<Served, String> {
    let ran = reapd.ctl(&["invoke", name]);
    if !ran.ok {
        return Err(format!("invoke {name}: {}", ran.describe()));
    }
    Ok((ran.stderr.starts_with("cold"), fields(&ran)))
}

fn invoke(reapd: &Reapd, name: &str, expect_cold: bool) -> Result<BTreeMap<String, u64>, String> {
    let ran = reapd.ctl(&["invoke", name]);
    let cold = ran.stderr.starts_with("cold");
    if !ran.ok || cold != expect_cold {
        return Err(format!(
            "invoke {name} (expected {}): {}",
            if expect_cold { "cold" } else { "warm" },
            ran.describe()
        ));
    }
    Ok(fields(&ran))
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

fn scale_to_zero(reapd: &Reapd, name: &str) -> Result<(), String> {
    let ran = reapd.ctl(&["scale-to-zero", name]);
    if ran.ok {
        Ok(())
    } else {
        Err(format!("scale-to-zero {name}: {}", ran.describe()))
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let guest = GuestArtifacts::locate_suite()?;
    let place = match detect_place() {
        Place::Lab => "the KVM lab (QEMU TCG, nested SVM): latencies are NOT hardware figures",
        _ => "hardware KVM",
    };
    println!(
        "reapd benchmark: {} rounds, functions {}, modes {}; 1 vCPU, 256 MiB; ran on {place}",
        args.rounds,
        args.functions.join(","),
        args.modes.join(",")
    );
    let scratch = Scratch::new("bench-reapd");
    let bins = Binaries {
        reapd: PathBuf::from(env!("CARGO_BIN_EXE_reapd")),
        reapctl: PathBuf::from(env!("CARGO_BIN_EXE_reapctl")),
    };
    let extra = [
        "--reapvm".to_string(),
        reapvm_bin().display().to_string(),
        "--kernel".into(),
        guest.vmlinux.display().to_string(),
        "--rootfs".into(),
        guest.rootfs.display().to_string(),
    ];
    let reapd = Reapd::start(&bins, &scratch.dir, &extra)?;
    let name = |f: &str, m: &str| format!("{}-{m}", f.replace('_', "-"));
    let section = |name: &str| args.sections.iter().any(|s| s == name);

    for f in &args.functions {
        for m in &args.modes {
            let ran = reapd.ctl(&[
                "deploy",
                &name(f, m),
                "--function",
                f,
                "--cold-start",
                m,
                "--max-instances",
                "4",
                "--keep-alive",
                "3600",
            ]);
            if !ran.ok {
                return Err(format!(
                    "deploy {f} {m}: {}\n{}",
                    ran.describe(),
                    reapd.log_text()
                ));
            }
            eprintln!("deployed {f} ({m})");
        }
    }

    // Cold starts per mode, interleaved: every round restores each function in each mode
    // once, then invokes the instance again warm. REAP's first cold start records.
    let mut cold: BTreeMap<(String, String), Vec<BTreeMap<String, u64>>> = BTreeMap::new();
    let mut warm: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    let mut record: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for f in args
        .functions
        .iter()
        .filter(|_| args.modes.iter().any(|m| m == "reap") && section("cold"))
    {
        record.insert(f.clone(), invoke(&reapd, &name(f, "reap"), true)?);
        scale_to_zero(&reapd, &name(f, "reap"))?;
    }
    for round in (0..args.rounds).filter(|_| section("cold")) {
        for f in &args.functions {
            for m in &args.modes {
                let n = name(f, m);
                scale_to_zero(&reapd, &n)?;
                let c = invoke(&reapd, &n, true)?;
                let w = invoke(&reapd, &n, false)?;
                cold.entry((f.clone(), m.clone())).or_default().push(c);
                warm.entry((f.clone(), m.clone()))
                    .or_default()
                    .push(w.get("latency").copied().unwrap_or(0));
            }
        }
        eprintln!(
            "round {}/{} of cold starts per mode done",
            round + 1,
            args.rounds
        );
    }

    // Concurrent cold starts from one snapshot and WS (REAP): 1, 2 and 4 at once.
    let levels = [1usize, 2, 4];
    let mut concurrent: BTreeMap<(String, usize), Vec<u64>> = BTreeMap::new();
    let mut late_warm: BTreeMap<(String, usize), usize> = BTreeMap::new();
    if args.modes.iter().any(|m| m == "reap") && section("concurrent") {
        for round in 0..args.rounds {
            for f in &args.functions {
                for &k in &levels {
                    let n = name(f, "reap");
                    scale_to_zero(&reapd, &n)?;
                    let runs: Vec<Result<Served, String>> = std::thread::scope(|s| {
                        let handles: Vec<_> =
                            (0..k).map(|_| s.spawn(|| invoke_any(&reapd, &n))).collect();
                        handles.into_iter().map(|h| h.join().unwrap()).collect()
                    });
                    // A reapctl that started late may find an instance another just freed:
                    // a warm start, counted apart, not a cold one.
                    for r in runs {
                        let (cold, fields) = r?;
                        let latency = fields.get("latency").copied().unwrap_or(0);
                        if cold {
                            concurrent.entry((f.clone(), k)).or_default().push(latency);
                        } else {
                            *late_warm.entry((f.clone(), k)).or_default() += 1;
                        }
                    }
                }
            }
            eprintln!(
                "round {}/{} of concurrent cold starts done",
                round + 1,
                args.rounds
            );
        }
    }

    if section("cold") {
        println!("\nCold starts through reapd (median of {} per cell, the record row one cold start; times in ms, ServeUnique and RecPages in pages); warm: the invocation after it", args.rounds);
        print!(
            "{:<14} {:<9} {:>9} {:>9}",
            "function", "mode", "cold", "warm"
        );
        for p in FIELD_NAMES {
            print!(" {:>17}", p);
        }
        println!();
        let row = |f: &str, label: &str, samples: &[BTreeMap<String, u64>], warm: Option<u64>| {
            let med = |key: &str| {
                median(
                    samples
                        .iter()
                        .map(|s| s.get(key).copied().unwrap_or(0))
                        .collect(),
                )
            };
            print!(
                "{:<14} {:<9} {:>9} {:>9}",
                f,
                label,
                ms(med("latency")),
                warm.map(ms).unwrap_or_else(|| "-".into())
            );
            for p in FIELD_NAMES {
                let v = med(p);
                let shown = if p == "ServeUnique" || p == "RecPages" {
                    v.to_string()
                } else {
                    ms(v)
                };
                print!(" {:>17}", shown);
            }
            println!();
        };
        for f in &args.functions {
            if let Some(r) = record.get(f) {
                row(f, "record", std::slice::from_ref(r), None);
            }
            for m in &args.modes {
                let key = (f.clone(), m.clone());
                let label = if m == "reap" { "prefetch" } else { m.as_str() };
                row(f, label, &cold[&key], Some(median(warm[&key].clone())));
            }
        }
    }
    if !concurrent.is_empty() {
        println!("\nREAP cold starts at once from one snapshot and WS (each's latency as reapctl saw it; median and max over {} rounds, ms)", args.rounds);
        println!(
            "{:<14} {:>8} {:>10} {:>10} {:>11}",
            "function", "at once", "median", "max", "late warm"
        );
        for ((f, k), v) in &concurrent {
            println!(
                "{:<14} {:>8} {:>10} {:>10} {:>11}",
                f,
                k,
                ms(median(v.clone())),
                ms(v.iter().copied().max().unwrap_or(0)),
                late_warm.get(&(f.clone(), *k)).copied().unwrap_or(0)
            );
        }
    }
    if section("load") && args.modes.iter().any(|m| m == "reap") {
        let (rate, secs) = &args.load;
        println!(
            "\nOpen-loop load: `reapctl bench NAME --rate {rate} --duration {secs}` on each function's REAP deployment, from zero instances (keep-alive 3600 s)"
        );
        for f in &args.functions {
            let n = name(f, "reap");
            scale_to_zero(&reapd, &n)?;
            let out = scratch.dir.join(format!("load-{n}")).display().to_string();
            let ran = reapd.ctl(&[
                "bench",
                &n,
                "--rate",
                rate,
                "--duration",
                secs,
                "--out",
                &out,
            ]);
            if !ran.ok {
                return Err(format!("bench {n}: {}", ran.describe()));
            }
            for line in ran.stdout.lines().filter(|l| !l.starts_with("wrote ")) {
                println!("  {line}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    if detect_place() == Place::NeedsLab {
        return rerun_in_lab("reapd benchmark");
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench reapd: {e}");
            ExitCode::FAILURE
        }
    }
}
