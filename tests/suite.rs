//! The vSwarm function suite on real KVM: every function answers correctly when booted and
//! when restored with each memory backend (File, Uffd, REAP recording, REAP, REAP+), and the
//! suite benchmark runs end to end (helloworld, N = 2) with the CSV rows it promises.

use reapvm_bench::suite as suite_bench;
use test_support as support;

use std::process::ExitCode;

use suite_bench::functions::{find, SuiteFunction, SUITE};
use suite_bench::measure::{boot_and_snapshot, restore_and_invoke, SnapshotFiles};
use suite_bench::options::{Mode, Options};
use support::*;

fn answers_booted_and_restored(f: &SuiteFunction) -> Result<(), String> {
    let guest = GuestArtifacts::locate_suite()?;
    let scratch = Scratch::new(&format!("suite-{}", f.name));
    let files = SnapshotFiles {
        dir: scratch.path("snapshot"),
    };
    // The KVM lab's scratch is a tmpfs, which no drop empties: restores there read files
    // already in memory (what this test checks is the answers, not the speed).
    let cold = page_cache_can_drop(&scratch.dir)?;
    // Booting checks the answers of the first and of warm invocations.
    boot_and_snapshot(&guest, f, 1, &files)?;
    for mode in [Mode::File, Mode::Uffd] {
        restore_and_invoke(f, &files, mode, cold)?;
    }
    let record = restore_and_invoke(f, &files, Mode::Reap, cold)?;
    if record.backend_mode != "record" || !files.ws().exists() {
        return Err(format!(
            "the first REAP restore did not record a WS (mode {:?})",
            record.backend_mode
        ));
    }
    for mode in [Mode::Reap, Mode::ReapPlus] {
        let r = restore_and_invoke(f, &files, mode, cold)?;
        if r.backend_mode != "prefetch" || r.ws_error.is_some() {
            return Err(format!(
                "{}: mode {:?}, WS error {:?}",
                mode.label(),
                r.backend_mode,
                r.ws_error
            ));
        }
        if r.faults_on_demand > record.faults_on_demand {
            return Err(format!(
                "{}: {} faults on demand after the prefetch, more than the {} of the recording restore",
                mode.label(),
                r.faults_on_demand,
                record.faults_on_demand
            ));
        }
    }
    Ok(())
}

fn benchmark_end_to_end() -> Result<(), String> {
    let scratch = Scratch::new("suite-bench");
    let mut args: Vec<String> = ["--functions", "helloworld", "--runs", "2"]
        .map(String::from)
        .into();
    // The benchmark refuses "cold" runs from a tmpfs (the lab's scratch): run it hot there.
    if !page_cache_can_drop(&scratch.dir)? {
        args.push("--hot".into());
    }
    let o = Options::parse(args, scratch.path("results"))?;
    let results = scratch.path("results");
    suite_bench::run(
        &o,
        &scratch.path("work"),
        &scratch.path("cache"),
        &results,
        "test",
        &[],
    )?;
    let csv = std::fs::read_to_string(results.join(suite_bench::RESULTS_CSV))
        .map_err(|e| e.to_string())?;
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let count = |kind: &str| {
        rows.iter()
            .filter(|r| r[0] == "helloworld" && r[1] == kind)
            .count()
    };
    let expected = [
        ("boot", 1),
        ("warm", 2),
        ("record", 1),
        ("File", 2),
        ("Uffd", 2),
        ("REAP", 2),
        ("REAP+", 2),
    ];
    for (kind, n) in expected {
        check_rows(count(kind) == n, || {
            format!("{n} {kind} rows expected in\n{csv}")
        })?;
    }
    check_rows(rows.len() == 12, || format!("12 rows expected in\n{csv}"))?;
    let latency = |r: &Vec<&str>| r[6].parse::<f64>().unwrap_or(-1.0);
    check_rows(rows.iter().all(|r| latency(r) > 0.0), || {
        format!("every run has a latency\n{csv}")
    })?;
    let faults = |kind: &str| {
        rows.iter()
            .filter(|r| r[1] == kind)
            .map(|r| r[7].parse::<u64>().unwrap_or(u64::MAX))
            .max()
            .unwrap_or(u64::MAX)
    };
    check_rows(faults("REAP") * 10 < faults("Uffd"), || {
        format!("REAP should fault far less than Uffd\n{csv}")
    })?;
    let md = std::fs::read_to_string(results.join(suite_bench::RESULTS_MD))
        .map_err(|e| e.to_string())?;
    check_rows(
        md.contains("| helloworld |") && md.contains("1 / 232 / 60 (3.9x)"),
        || md.clone(),
    )?;
    let svg = std::fs::read_to_string(results.join(suite_bench::RESULTS_SVG))
        .map_err(|e| e.to_string())?;
    // plotters puts a text element's content on a line of its own.
    check_rows(svg.replace('\n', "").contains(">helloworld<"), || {
        "the chart names helloworld".into()
    })?;
    for file in [
        "vmstate",
        "memory",
        "memory.ws",
        "memory.ws.touches",
        "info.json",
    ] {
        let path = scratch.path("cache").join("helloworld").join(file);
        check_rows(path.is_file(), || format!("{} kept", path.display()))?;
    }
    Ok(())
}

fn check_rows(ok: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(msg())
    }
}

fn main() -> ExitCode {
    if std::env::var_os("REAPVM_LAB_TIMEOUT").is_none() {
        // About 25 minutes in the lab when nothing goes wrong; a stalled boot (docs/kvm-lab.md)
        // costs its 200 s deadline, then its test runs again in a fresh lab.
        std::env::set_var("REAPVM_LAB_TIMEOUT", "3600");
    }
    run_kvm_suite("suite", || {
        let mut trials: Vec<Trial> = SUITE
            .iter()
            .map(|f| {
                Trial::test(
                    format!("{}_answers_booted_and_restored_with_every_backend", f.name),
                    move || {
                        answers_booted_and_restored(find(f.name).expect("suite function"))
                            .map_err(Failed::from)
                    },
                )
            })
            .collect();
        trials.push(Trial::test(
            "benchmark_runs_end_to_end_on_helloworld",
            || benchmark_end_to_end().map_err(Failed::from),
        ));
        trials
    })
}
