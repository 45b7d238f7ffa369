//! The lab runner's own test (`tests/support/place.rs`, the one layer that retries in the
//! KVM lab): a test that fails on a guest fault it announces (`lab_fault.rs`) runs again in
//! a fresh lab more than once, where a plain failure gets one more run. The test below
//! announces a fault in its first two runs and passes in its third: the suite passes only
//! if the announcements, carried from inside the lab to the runner, were honoured.

use test_support as support;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use support::lab_fault::{self, LabFault};
use support::place::rerun_suite_in_lab_with;
use support::{detect_place, repo_root, Arguments, Failed, Place, Trial};

/// Runs that end in an announced fault before the test passes: one more than the single
/// rerun that any failure gets.
const FAULTED_RUNS: usize = 2;

/// The marks that the test's runs so far left in `dir`, one each.
fn runs_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
            .count()
    })
}

fn announces_two_faults_then_passes() -> Result<(), Failed> {
    let var = |name: &str| {
        std::env::var_os(name).map(PathBuf::from).ok_or_else(|| {
            format!("{name} is not set: this runs in the lab, started from the host")
        })
    };
    // Earlier runs' marks reached the host's folder when their labs ended; the lab sees that
    // folder read-only at its own path.
    let earlier = var("REAPVM_LAB_OUT_DIR")?;
    let out = var("REAPVM_LAB_OUT")?;
    let this_run = runs_in(&earlier) + 1;
    let mark = out.join(format!("run-{this_run}"));
    std::fs::write(&mark, b"").map_err(|e| format!("{}: {e}", mark.display()))?;
    if this_run <= FAULTED_RUNS {
        return Err(lab_fault::announce(
            LabFault::Stalled,
            &format!("the lab runner's self-test, run {this_run}"),
        )
        .into());
    }
    println!("run {this_run}: passes after {FAULTED_RUNS} announced faults");
    Ok(())
}

fn trials() -> Vec<Trial> {
    vec![Trial::test(
        "announces_two_faults_then_passes",
        announces_two_faults_then_passes,
    )]
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    if args.list {
        return libtest_mimic::run(&args, trials()).exit_code();
    }
    match detect_place() {
        Place::HardwareKvm => {
            println!("lab runner: suites run on this host's hardware KVM, not in the lab: the lab runner is not used here");
            return ExitCode::SUCCESS;
        }
        Place::NeedsLab => return from_the_host(),
        // One thread, as every suite in the lab: the runner reads whose output an
        // announcement is from the test's name printed before it.
        Place::Lab => args.test_threads = Some(1),
    }
    libtest_mimic::run(&args, trials()).exit_code()
}

/// Runs the suite in the lab through the runner, and checks that it took exactly the runs
/// the announced faults called for.
fn from_the_host() -> ExitCode {
    // Under the repository (target/), which the lab sees at its own path wherever the
    // checkout is (one in /tmp is shared into the lab); not the host's /tmp, which it does not.
    let marks = repo_root().join(format!("target/lab-runner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&marks);
    if let Err(e) = std::fs::create_dir_all(&marks) {
        eprintln!("lab runner: {}: {e}", marks.display());
        return ExitCode::FAILURE;
    }
    let marks_s = marks.to_string_lossy().into_owned();
    let code = rerun_suite_in_lab_with(
        "lab runner self-test",
        &[("REAPVM_LAB_OUT_DIR", marks_s.as_str())],
    );
    let runs = runs_in(&marks);
    let _ = std::fs::remove_dir_all(&marks);
    if code != ExitCode::SUCCESS {
        return code;
    }
    if runs != FAULTED_RUNS + 1 {
        eprintln!(
            "lab runner: the test ran {runs} times in the lab; {} expected ({FAULTED_RUNS} announced faults, then a pass)",
            FAULTED_RUNS + 1
        );
        return ExitCode::FAILURE;
    }
    println!("lab runner: the test ran {runs} times, as its announced faults called for");
    ExitCode::SUCCESS
}
