//! The REAP paper's experiment on the vSwarm function suite: for each function, boot, warm
//! up, snapshot, record the WS (REAP's first restore), then N cold restores per mode and N
//! warm invocations. Shared by the benchmark command (tests/benches/suite.rs) and its CI test
//! (tests/suite.rs).

pub mod functions;
pub mod measure;
pub mod options;
pub mod plot;
pub mod report;

use std::path::{Path, PathBuf};

use functions::find;
use measure::{boot_and_snapshot, restore_and_invoke, SnapshotFiles};
use options::{Mode, Options};
use report::Sample;

use snapshot::touch_log;

use test_support::{detect_place, GuestArtifacts, Place};

pub const RESULTS_CSV: &str = "runs.csv";
pub const RESULTS_MD: &str = "results.md";
pub const RESULTS_SVG: &str = "cold-latency.svg";

/// Where the figures come from, said with every table.
pub fn place_label() -> &'static str {
    match detect_place() {
        // A host whose KVM cannot boot Linux ran the suite in the lab (its report is
        // written again on the host after --merge).
        Place::Lab | Place::NeedsLab => "the KVM lab (QEMU TCG emulating an AMD machine with nested SVM, real KVM inside; snapshot files on a virtio disk that QEMU reads with O_DIRECT): latencies are NOT hardware latencies, fault counts and WS sizes are exact",
        _ => "hardware KVM",
    }
}

/// The host folder that keeps each function's snapshot, memory file and WS for later use
/// (the replay benchmark).
pub fn host_cache_dir() -> PathBuf {
    let base = std::env::var_os("REAPVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/reapvm")
        });
    base.join("suite")
}

fn copy_into(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

/// Keeps a function's snapshot files and what the replay needs to know about them.
fn keep_in_cache(
    files: &SnapshotFiles,
    cache: &Path,
    name: &str,
    info: serde_json::Value,
) -> Result<(), String> {
    let dir = cache.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (src, file) in [
        (files.vmstate(), "vmstate"),
        (files.memory(), "memory"),
        (files.ws(), "memory.ws"),
        (touch_log::path_for(&files.ws()), "memory.ws.touches"),
    ] {
        copy_into(&src, &dir.join(file))?;
    }
    std::fs::write(
        dir.join("info.json"),
        serde_json::to_string_pretty(&info).unwrap_or_default(),
    )
    .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes the CSV, the markdown report and the chart of what was measured so far.
pub fn write_results(
    samples: &[Sample],
    o: &Options,
    done: &[String],
    results: &Path,
    command: &str,
) -> Result<String, String> {
    std::fs::create_dir_all(results).map_err(|e| format!("{}: {e}", results.display()))?;
    // Whole files only, written beside and renamed: a lab that dies mid-write (its output
    // folder is kept) must leave the last good file, which a later lab run resumes from.
    let write = |name: &str, text: &str| {
        let path = results.join(name);
        let part = results.join(format!("{name}.part"));
        std::fs::write(&part, text)
            .and_then(|()| std::fs::rename(&part, &path))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    write(RESULTS_CSV, &report::csv(samples))?;
    let md = report::markdown(samples, done, &o.modes, place_label(), command);
    write(RESULTS_MD, &md)?;
    let mut kinds = vec!["warm"];
    kinds.extend(o.modes.iter().map(|m| m.label()));
    let title = format!(
        "cold-start latency, median of {} ({}), ran on: {}",
        o.runs,
        if o.hot {
            "page cache hot"
        } else {
            "page cache dropped"
        },
        if detect_place() == Place::Lab {
            "KVM lab (not hardware times)"
        } else {
            "hardware KVM"
        }
    );
    plot::latency_chart(&results.join(RESULTS_SVG), samples, done, &kinds, &title)?;
    Ok(md)
}

/// The rows of `previous` (an earlier runs.csv) for functions this run did not measure,
/// then this run's, in the suite's order; and the functions they cover.
pub fn merge(previous: &[Sample], new: &[Sample]) -> (Vec<Sample>, Vec<String>) {
    let rerun: Vec<&str> = new.iter().map(|s| s.function.as_str()).collect();
    let mut all: Vec<Sample> = previous
        .iter()
        .filter(|s| !rerun.contains(&s.function.as_str()))
        .cloned()
        .collect();
    all.extend(new.iter().cloned());
    let order = |name: &str| {
        functions::SUITE
            .iter()
            .position(|f| f.name == name)
            .unwrap_or(usize::MAX)
    };
    all.sort_by_key(|s| order(&s.function));
    let mut covered: Vec<String> = all.iter().map(|s| s.function.clone()).collect();
    covered.dedup();
    (all, covered)
}

/// Whether `earlier` holds every row that measuring `function` with `o` makes: its boot, its
/// warm invocations, REAP's recording restore and each mode's runs. Anything less is
/// measured again.
pub fn finished_earlier(earlier: &[Sample], o: &Options, function: &str) -> bool {
    let count = |kind: &str| {
        earlier
            .iter()
            .filter(|s| s.function == function && s.kind == kind)
            .count()
    };
    count("boot") == 1
        && count("warm") == o.runs
        && count("record") == 1
        && o.modes.iter().all(|m| count(m.label()) == o.runs)
}

/// Runs the suite and returns its samples. Snapshots are made under `work` (a real disk),
/// kept in `cache`; results go to `results` after every function. The functions that
/// `earlier` (what an earlier lab run of this benchmark finished before a lab fault ended
/// it) covers are not measured again: their rows and kept snapshots stand.
pub fn run(
    o: &Options,
    work: &Path,
    cache: &Path,
    results: &Path,
    command: &str,
    earlier: &[Sample],
) -> Result<Vec<Sample>, String> {
    if o.modes.contains(&Mode::Tmpfs) {
        return Err(format!(
            "mode {} is the replay benchmark's (scripts/bench-replay.sh): in the KVM lab every \
             snapshot file is on a tmpfs already",
            Mode::Tmpfs.label()
        ));
    }
    let guest = GuestArtifacts::locate_suite()?;
    let cache_state = if o.hot { "hot" } else { "cold" };
    let mut samples: Vec<Sample> = Vec::new();
    let mut done: Vec<String> = Vec::new();
    let total = o.functions.len();
    for (index, name) in o.functions.iter().enumerate() {
        let f = find(name).ok_or(format!("unknown function {name}"))?;
        let progress = |what: &str| eprintln!("[suite {}/{total}] {name}: {what}", index + 1);
        if finished_earlier(earlier, o, name) {
            samples.extend(earlier.iter().filter(|s| &s.function == name).cloned());
            done.push(name.clone());
            progress("measured by an earlier lab run of this benchmark; kept");
            continue;
        }
        let files = SnapshotFiles {
            dir: work.join(name),
        };
        let _ = std::fs::remove_dir_all(&files.dir);
        progress("booting, warm invocations, snapshot");
        let booted = boot_and_snapshot(&guest, f, o.runs, &files)?;
        let base = |kind: &str, run: usize| Sample {
            function: name.clone(),
            kind: kind.into(),
            page_cache: "-",
            run,
            load_ms: 0.0,
            invoke_ms: 0.0,
            latency_ms: 0.0,
            faults_on_demand: 0,
            bytes_read: 0,
            ws_bytes: 0,
            vmm_rss_overhead_kib: 0,
        };
        samples.push(Sample {
            invoke_ms: booted.first_invocation_ms,
            latency_ms: booted.boot_ms,
            vmm_rss_overhead_kib: booted.vmm_rss_overhead_kib,
            ..base("boot", 1)
        });
        for (i, &w) in booted.warm_ms.iter().enumerate() {
            samples.push(Sample {
                invoke_ms: w,
                latency_ms: w,
                ..base("warm", i + 1)
            });
        }
        let warm =
            report::spread_of(&samples, name, "warm", |s| s.latency_ms).map_or(0.0, |s| s.median);
        progress(&format!(
            "booted in {:.0} ms, first invocation {:.0} ms, warm median {warm:.1} ms, VMM RSS overhead {} KiB",
            booted.boot_ms, booted.first_invocation_ms, booted.vmm_rss_overhead_kib
        ));
        let to_sample = |kind: &str, run: usize, r: &measure::Restore, ws_bytes: u64| Sample {
            function: name.clone(),
            kind: kind.into(),
            page_cache: cache_state,
            run,
            load_ms: r.load_ms,
            invoke_ms: r.invoke_ms,
            latency_ms: r.latency_ms(),
            faults_on_demand: r.faults_on_demand,
            bytes_read: r.bytes_read,
            ws_bytes,
            vmm_rss_overhead_kib: 0,
        };
        // REAP's first restore records the WS (the paper's "record" run).
        let r = restore_and_invoke(f, &files, Mode::Reap, !o.hot)?;
        if r.backend_mode != "record" {
            return Err(format!(
                "{name}: the first REAP restore did not record (mode {:?})",
                r.backend_mode
            ));
        }
        let ws_bytes = std::fs::metadata(files.ws()).map(|m| m.len()).unwrap_or(0);
        progress(&format!(
            "REAP recording restore: {:.0} ms, {} pages recorded, WS file {:.1} MB",
            r.latency_ms(),
            r.ws_pages_recorded,
            ws_bytes as f64 / 1e6
        ));
        samples.push(to_sample("record", 1, &r, ws_bytes));
        // Round robin, not in blocks: a drift in the lab (its page cache, a neighbour's
        // load) then weighs on every mode alike.
        for run in 1..=o.runs {
            for &mode in &o.modes {
                let r = restore_and_invoke(f, &files, mode, !o.hot)?;
                if mode.is_reap() && (r.backend_mode != "prefetch" || r.ws_error.is_some()) {
                    return Err(format!(
                        "{name} {}: expected a prefetch from the recorded WS, got mode {:?} ({:?})",
                        mode.label(),
                        r.backend_mode,
                        r.ws_error
                    ));
                }
                progress(&format!(
                    "{} {cache_state} {run}/{}: {:.0} ms (load {:.1} ms), {} faults on demand, {:.1} MB read",
                    mode.label(),
                    o.runs,
                    r.latency_ms(),
                    r.load_ms,
                    r.faults_on_demand,
                    r.bytes_read as f64 / 1e6
                ));
                samples.push(to_sample(
                    mode.label(),
                    run,
                    &r,
                    if mode.is_reap() { ws_bytes } else { 0 },
                ));
            }
        }
        let info = serde_json::json!({
            "function": name,
            "mem_size_mib": f.mem_mib,
            "vcpu_count": 1,
            "warm_median_ms": warm,
            "ws_pages_recorded": r.ws_pages_recorded,
            "ws_bytes": ws_bytes,
            "rootfs": guest.rootfs,
            "ran_on": place_label(),
        });
        keep_in_cache(&files, cache, name, info)?;
        let _ = std::fs::remove_dir_all(&files.dir);
        done.push(name.clone());
        write_results(&samples, o, &done, results, command)?;
        progress(&format!(
            "done; snapshot, memory file and WS kept in {}",
            cache.join(name).display()
        ));
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::options::Options;
    use super::report::Sample;

    fn row(function: &str, kind: &str, run: usize) -> Sample {
        Sample {
            function: function.into(),
            kind: kind.into(),
            page_cache: "cold",
            run,
            load_ms: 1.0,
            invoke_ms: 1.0,
            latency_ms: 2.0,
            faults_on_demand: 0,
            bytes_read: 0,
            ws_bytes: 0,
            vmm_rss_overhead_kib: 0,
        }
    }

    #[test]
    fn only_a_function_with_all_its_rows_counts_as_finished_earlier() {
        let args = [
            "--functions",
            "helloworld,pyaes",
            "--modes",
            "File,REAP",
            "--runs",
            "2",
        ];
        let o = Options::parse(args.map(String::from), "out".into()).unwrap();
        let mut rows = vec![row("helloworld", "boot", 1), row("helloworld", "record", 1)];
        for run in 1..=2 {
            for kind in ["warm", "File", "REAP"] {
                rows.push(row("helloworld", kind, run));
            }
        }
        assert!(super::finished_earlier(&rows, &o, "helloworld"));
        assert!(!super::finished_earlier(&rows, &o, "pyaes"));
        // A file cut short after a row: the function is measured again.
        rows.pop();
        assert!(!super::finished_earlier(&rows, &o, "helloworld"));
        // Rows of other runs' settings (more runs, another mode) are not this run's.
        let three = ["--modes", "File,REAP", "--runs", "3"];
        let o3 = Options::parse(three.map(String::from), "out".into()).unwrap();
        assert!(!super::finished_earlier(&rows, &o3, "helloworld"));
    }

    #[test]
    fn a_host_that_needs_the_lab_labels_its_figures_as_the_labs() {
        // The report of a --merge is written on the host after the lab run: its figures
        // are still the lab's. (The only test here that sets the variable.)
        std::env::set_var("REAPVM_KVM_PLACE", "lab");
        assert!(super::place_label().starts_with("the KVM lab"));
        std::env::set_var("REAPVM_KVM_PLACE", "direct");
        assert_eq!(super::place_label(), "hardware KVM");
        std::env::remove_var("REAPVM_KVM_PLACE");
    }
}
