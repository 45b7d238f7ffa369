//! The REAP paper's table on the vSwarm function suite, with one command:
//!
//! `scripts/bench-suite.sh [--functions a,b] [--modes File,Uffd,REAP,REAP+] [--runs N] [--hot] [--out DIR]`
//! (= `cargo bench -p vmm --bench suite -- ...` after building the guest).
//!
//! Prints the markdown table and writes it with a CSV of every run and an SVG chart to
//! `--out` (default target/suite-bench); keeps each function's snapshot, memory file and WS
//! in ~/.cache/reapvm/suite/NAME. On a host whose KVM cannot boot Linux it runs in the KVM
//! lab (its figures say so).

use reapvm_bench::suite as suite_bench;
use test_support as support;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use suite_bench::options::Options;
use support::{detect_place, repo_root, Place};

fn command_line(args: &[String]) -> String {
    let shown: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    format!("scripts/bench-suite.sh {}", shown.join(" "))
        .trim_end()
        .to_string()
}

/// Moves everything in `from` into `to` (same filesystem: the lab's output lands in the cache).
fn move_contents(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for entry in entries.flatten() {
        let dest = to.join(entry.file_name());
        if dest.is_dir() {
            let _ = std::fs::remove_dir_all(&dest);
        }
        std::fs::rename(entry.path(), &dest)
            .map_err(|e| format!("move {} to {}: {e}", entry.path().display(), dest.display()))?;
    }
    Ok(())
}

/// With --merge: the rows of the earlier run in OUT/runs.csv (read before this run replaces it).
fn previous_rows(o: &Options) -> Result<Vec<suite_bench::report::Sample>, String> {
    if !o.merge {
        return Ok(Vec::new());
    }
    let path = o.out.join(suite_bench::RESULTS_CSV);
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("--merge: {}: {e}", path.display()))?;
    suite_bench::report::parse_csv(&text).map_err(|e| format!("--merge: {}: {e}", path.display()))
}

/// With --merge: this run's rows (now in OUT/runs.csv) and the earlier run's, as one report.
fn merge_into_out(
    o: &Options,
    previous: &[suite_bench::report::Sample],
    command: &str,
) -> Result<(), String> {
    let path = o.out.join(suite_bench::RESULTS_CSV);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let new = suite_bench::report::parse_csv(&text)?;
    let (all, covered) = suite_bench::merge(previous, &new);
    let kept: Vec<&String> = covered
        .iter()
        .filter(|f| !o.functions.contains(f))
        .collect();
    let command = format!(
        "{command} (rows of {} kept from the earlier run in runs.csv)",
        kept.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let md = suite_bench::write_results(&all, o, &covered, &o.out, &command)?;
    println!("\nmerged report:\n\n{md}");
    Ok(())
}

fn in_lab_from_host(o: &Options) -> ExitCode {
    let previous = match previous_rows(o) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("suite benchmark: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cache = suite_bench::host_cache_dir();
    let staging = cache.with_file_name(format!("suite-lab-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    if std::env::var_os("REAPVM_LAB_TIMEOUT").is_none() {
        // About a minute per lab restore at most, plus boots: generous, the lab is slow.
        let restores = o.functions.len() * (o.modes.len() * o.runs + 1);
        let secs = 1200 + 60 * restores + 300 * o.functions.len();
        std::env::set_var("REAPVM_LAB_TIMEOUT", secs.to_string());
    }
    let staging_s = staging.to_string_lossy().into_owned();
    let code = support::place::rerun_in_lab_with(
        "suite benchmark",
        &[
            ("REAPVM_LAB_DISK_MIB", "4096"),
            ("REAPVM_LAB_OUT_DIR", &staging_s),
        ],
    );
    let mut moved = Ok(());
    if staging.join("results").is_dir() {
        moved = moved.and(move_contents(&staging.join("results"), &o.out));
    }
    if staging.join("cache").is_dir() {
        moved = moved.and(move_contents(&staging.join("cache"), &cache));
    }
    let _ = std::fs::remove_dir_all(&staging);
    // Also after a failed run: its finished functions' rows join the earlier ones.
    if o.merge && moved.is_ok() && o.out.join(suite_bench::RESULTS_CSV).is_file() {
        moved = merge_into_out(
            o,
            &previous,
            &command_line(&std::env::args().skip(1).collect::<Vec<_>>()),
        );
    }
    match moved {
        Ok(()) => {
            println!(
                "results in {}; snapshots and WS files in {}",
                o.out.display(),
                cache.display()
            );
            code
        }
        Err(e) => {
            eprintln!("suite benchmark: {e}");
            ExitCode::FAILURE
        }
    }
}

/// In the lab, the rows an earlier lab run of this very benchmark finished before a lab
/// fault ended it (the lab runner then runs it whole again in a fresh lab): they wait in the
/// host's staging folder, which the lab sees read-only at the same path.
fn earlier_lab_rows() -> Result<Vec<suite_bench::report::Sample>, String> {
    let Some(staging) = std::env::var_os("REAPVM_LAB_OUT_DIR") else {
        return Ok(Vec::new());
    };
    if detect_place() != Place::Lab {
        return Ok(Vec::new());
    }
    let path = PathBuf::from(staging)
        .join("results")
        .join(suite_bench::RESULTS_CSV);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("an earlier lab run's {}: {e}", path.display())),
    };
    // Written whole and renamed, so it parses; if it does not, nothing of it is trusted.
    Ok(suite_bench::report::parse_csv(&text).unwrap_or_else(|e| {
        eprintln!(
            "suite benchmark: WARNING: an earlier lab run's {} cannot be read ({e}); \
             measuring every function again",
            path.display()
        );
        Vec::new()
    }))
}

/// --report-only: OUT's table and chart written again from OUT/runs.csv.
fn report_again(o: &Options, command: &str) -> Result<(), String> {
    let path = o.out.join(suite_bench::RESULTS_CSV);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let rows =
        suite_bench::report::parse_csv(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let (all, covered) = suite_bench::merge(&[], &rows);
    // The CSV's restore modes, in the order they first ran.
    let mut modes = Vec::new();
    for row in &all {
        if let Some(mode) = suite_bench::options::Mode::parse(&row.kind) {
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
    }
    let runs = all.iter().map(|s| s.run).max().unwrap_or(1);
    let hot = all.iter().any(|s| s.page_cache == "hot");
    let o = Options {
        modes,
        runs,
        hot,
        functions: covered.clone(),
        out: o.out.clone(),
        merge: false,
        report_only: true,
    };
    let md = suite_bench::write_results(&all, &o, &covered, &o.out, command)?;
    println!("{md}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match Options::parse(args.clone(), repo_root().join("target/suite-bench")) {
        Ok(mut o) => {
            // cargo runs benchmarks in the package's folder: a relative --out means the
            // caller's folder (scripts/bench-suite.sh says which), else the repository's.
            if o.out.is_relative() {
                let base =
                    std::env::var_os("REAPVM_CALLER_DIR").map_or_else(repo_root, PathBuf::from);
                o.out = base.join(&o.out);
            }
            o
        }
        Err(e) => {
            eprintln!("suite benchmark: {e}");
            return ExitCode::from(2);
        }
    };
    if o.report_only {
        return match report_again(&o, &command_line(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("suite benchmark: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (work, cache, results) = match detect_place() {
        Place::NeedsLab => return in_lab_from_host(&o),
        Place::Lab => {
            let (Some(out), Some(disk)) = (
                std::env::var_os("REAPVM_LAB_OUT"),
                std::env::var_os("REAPVM_LAB_DISK"),
            ) else {
                eprintln!("suite benchmark: in the lab it needs REAPVM_LAB_OUT and REAPVM_LAB_DISK (run it from the host)");
                return ExitCode::FAILURE;
            };
            let out = PathBuf::from(out);
            (
                PathBuf::from(disk).join("suite-work"),
                out.join("cache"),
                out.join("results"),
            )
        }
        Place::HardwareKvm => (
            repo_root().join("target/suite-work"),
            suite_bench::host_cache_dir(),
            o.out.clone(),
        ),
    };
    println!(
        "suite benchmark: {} functions, modes {}, {} runs each, page cache {}; ran on: {}",
        o.functions.len(),
        o.modes
            .iter()
            .map(|m| m.label())
            .collect::<Vec<_>>()
            .join(","),
        o.runs,
        if o.hot {
            "hot"
        } else {
            "dropped before every restore"
        },
        suite_bench::place_label()
    );
    let command = command_line(&args);
    // On hardware KVM the results go straight to --out: keep the earlier rows first.
    let previous = match (detect_place(), previous_rows(&o)) {
        (Place::HardwareKvm, Ok(rows)) => rows,
        (Place::HardwareKvm, Err(e)) => {
            eprintln!("suite benchmark: {e}");
            return ExitCode::FAILURE;
        }
        _ => Vec::new(),
    };
    let earlier = match earlier_lab_rows() {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("suite benchmark: {e}");
            return ExitCode::FAILURE;
        }
    };
    match suite_bench::run(&o, &work, &cache, &results, &command, &earlier) {
        Ok(samples) => {
            let done: Vec<String> = o.functions.clone();
            match suite_bench::write_results(&samples, &o, &done, &results, &command) {
                Ok(md) => {
                    println!("\n{md}");
                    if o.merge && detect_place() == Place::HardwareKvm {
                        if let Err(e) = merge_into_out(&o, &previous, &command) {
                            eprintln!("suite benchmark: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("suite benchmark: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("suite benchmark: {e}");
            // The functions finished before the failure keep the earlier run's rows company.
            if o.merge
                && detect_place() == Place::HardwareKvm
                && results.join(suite_bench::RESULTS_CSV).is_file()
            {
                if let Err(e) = merge_into_out(&o, &previous, &command) {
                    eprintln!("suite benchmark: {e}");
                }
            }
            ExitCode::FAILURE
        }
    }
}
