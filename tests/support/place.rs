//! Where whole-guest code runs: on hardware KVM directly, or re-run inside the KVM lab.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use super::lab_fault;

/// Where the suite runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The host has VT-x/AMD-V: KVM runs Linux guests here.
    HardwareKvm,
    /// Inside the KVM lab (a QEMU TCG machine with SVM, real KVM inside).
    Lab,
    /// This host's KVM cannot run Linux guests: the suite must move into the lab.
    NeedsLab,
}

/// The repository's root (this crate is tests/support in it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/support sits two folders below the repository's root")
        .to_path_buf()
}

pub fn detect_place() -> Place {
    if std::env::var_os("REAPVM_IN_LAB").is_some() {
        return Place::Lab;
    }
    match std::env::var("REAPVM_KVM_PLACE").as_deref() {
        Ok("lab") => return Place::NeedsLab,
        Ok("direct") => return Place::HardwareKvm,
        _ => {}
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw_virt && Path::new("/dev/kvm").exists() {
        Place::HardwareKvm
    } else {
        Place::NeedsLab
    }
}

/// lab-run.sh's exit code when the lab machine died before the command reported its own.
const LAB_MACHINE_DIED: i32 = 122;
/// lab-run.sh's exit code when the lab's own kernel stopped taking timer interrupts on a CPU
/// (its RCU said so on its console) and the lab was stopped.
const LAB_TIMER_LOST: i32 = 123;
/// Lab runs in all before a suite or benchmark is given up.
const LAB_ATTEMPTS: usize = 6;
/// More runs, each in a fresh lab, for a test whose run failed on a guest fault it announced
/// as the lab emulation's (lab_fault.rs): as many as the boots the lab once got.
const LAB_FAULT_RERUNS: usize = 3;

/// What happens to a run that the lab's own faults cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Run the whole command again (benchmarks: they keep their own partial results), after
    /// a lab fault or a guest fault the benchmark announced.
    Whole,
    /// A libtest suite: run again only the tests that have not reported a verdict.
    UnfinishedTests,
}

/// Re-runs this very executable, with its arguments, inside the KVM lab.
pub fn rerun_in_lab(what: &str) -> ExitCode {
    rerun_in_lab_with(what, &[])
}

/// As `rerun_in_lab`, for a libtest suite: after a lab fault, a fresh lab runs only the
/// tests that had not finished, so a fault late in a long suite costs little.
pub fn rerun_suite_in_lab(what: &str) -> ExitCode {
    rerun(what, &[], Retry::UnfinishedTests)
}

/// As `rerun_suite_in_lab`, with extra environment for lab-run.sh (e.g. REAPVM_LAB_OUT_DIR).
pub fn rerun_suite_in_lab_with(what: &str, env: &[(&str, &str)]) -> ExitCode {
    rerun(what, env, Retry::UnfinishedTests)
}

/// As `rerun_in_lab`, with extra environment for lab-run.sh (e.g. REAPVM_LAB_DISK_MIB).
pub fn rerun_in_lab_with(what: &str, env: &[(&str, &str)]) -> ExitCode {
    rerun(what, env, Retry::Whole)
}

fn rerun(what: &str, env: &[(&str, &str)], retry: Retry) -> ExitCode {
    let lab_run = repo_root().join("resources/lab/lab-run.sh");
    println!(
        "{what}: this host's KVM cannot boot Linux (no vmx/svm; see docs/kvm-lab.md); \
         re-running it inside the KVM lab"
    );
    let exe = std::env::current_exe().expect("the test binary's own path");
    let timeout = std::env::var("REAPVM_LAB_TIMEOUT").unwrap_or_else(|_| "2400".into());
    let mem = std::env::var("REAPVM_LAB_MEM_MIB").unwrap_or_else(|_| "6144".into());
    let mut runs = LabRuns::new(retry);
    loop {
        let mut skips = Vec::new();
        if retry == Retry::UnfinishedTests && runs.attempt > 1 {
            for name in runs.verdicts.safe_skips(&list_tests(&exe)) {
                skips.extend(["--skip".to_string(), name]);
            }
        }
        runs.start_run();
        let mut child = match Command::new(&lab_run)
            .args(["--timeout", &timeout, "--mem", &mem, "--"])
            .envs(env.iter().copied())
            .env(lab_fault::TOKEN_ENV, runs.verdicts.token())
            .arg(&exe)
            .args(std::env::args_os().skip(1))
            .args(&skips)
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!(
                    "{what}: cannot start the KVM lab ({}): {e}",
                    lab_run.display()
                );
                return ExitCode::FAILURE;
            }
        };
        if let Some(out) = child.stdout.take() {
            // Passed through line by line, as it comes: the lab's runs take minutes.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("{line}");
                runs.verdicts.feed(&line);
            }
        }
        let status = match child.wait() {
            Ok(status) => status,
            Err(e) => {
                eprintln!("{what}: lost the KVM lab's process: {e}");
                return ExitCode::FAILURE;
            }
        };
        let end = runs.run_end(status.code());
        match runs.after_run(what, end, &status.to_string()) {
            Next::Pass(said) => {
                if let Some(said) = said {
                    println!("{said}");
                }
                return ExitCode::SUCCESS;
            }
            Next::Fail(why) => {
                eprintln!("{why}");
                return ExitCode::FAILURE;
            }
            Next::RunAgain(warning) => eprintln!("{warning}"),
        }
    }
}

/// How one lab run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    /// The command exited with success.
    Passed,
    /// The command exited with a failure of its own.
    Failed,
    /// The lab machine failed under it (lab-run.sh's 122 or 123), or a benchmark failed on
    /// a guest fault it announced: not a verdict.
    LabFault(&'static str),
}

/// What follows a lab run, with what to say about it.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Pass(Option<String>),
    Fail(String),
    RunAgain(String),
}

/// The retry rules, apart from the processes they drive: the one layer that retries in the
/// lab (docs/kvm-lab.md). Nothing inside the lab retries.
#[derive(Debug)]
struct LabRuns {
    retry: Retry,
    verdicts: TestVerdicts,
    /// The lab run under way, from 1.
    attempt: usize,
    /// Lab faults in a row that added no verdict.
    runs_without_progress: usize,
    failures_before: usize,
    finished_before: usize,
}

impl LabRuns {
    fn new(retry: Retry) -> Self {
        LabRuns {
            retry,
            verdicts: TestVerdicts::new(lab_fault::new_token()),
            attempt: 1,
            runs_without_progress: 0,
            failures_before: 0,
            finished_before: 0,
        }
    }

    /// Called as each lab run starts.
    fn start_run(&mut self) {
        self.verdicts.start_run();
        self.failures_before = self.verdicts.failed.len();
        self.finished_before = self.verdicts.finished().count();
    }

    /// How a lab run that lab-run.sh ended with `code` ended.
    fn run_end(&self, code: Option<i32>) -> RunEnd {
        match code {
            Some(LAB_MACHINE_DIED) => {
                RunEnd::LabFault("the KVM lab machine itself died (see its kept console above)")
            }
            Some(LAB_TIMER_LOST) => {
                RunEnd::LabFault("the KVM lab's kernel lost a CPU's timer (see above)")
            }
            Some(0) => RunEnd::Passed,
            _ if self.retry == Retry::Whole && self.verdicts.fault_announced_outside_tests() => {
                RunEnd::LabFault("a guest faulted in the lab's emulation (announced above)")
            }
            _ => RunEnd::Failed,
        }
    }

    /// Called once the run's output is read and it has exited with `status`.
    fn after_run(&mut self, what: &str, end: RunEnd, status: &str) -> Next {
        let suite = self.retry == Retry::UnfinishedTests;
        let new_failures = self.verdicts.failed.len() > self.failures_before;
        let progressed = self.verdicts.finished().count() > self.finished_before;
        match end {
            RunEnd::Failed
                if suite
                    && new_failures
                    && self.verdicts.all_failures_retryable()
                    && self.attempt < LAB_ATTEMPTS =>
            {
                // The lab's emulation corrupts guests now and then (docs/kvm-lab.md), so a
                // failure there is not conclusive alone: the failed tests run again in a
                // fresh lab, up to LAB_FAULT_RERUNS times for a guest fault they announced,
                // once for any other failure. Their earlier failures stay in the output above.
                self.attempt += 1;
                self.runs_without_progress = 0;
                let again = self.verdicts.retry_failures();
                Next::RunAgain(format!(
                    "WARNING: {what}: {} test(s) failed in the KVM lab ({}); the lab's \
                     emulation faults make a failure there inconclusive, so they run again in \
                     a fresh lab (attempt {} of {LAB_ATTEMPTS}; a test gets {LAB_FAULT_RERUNS} \
                     more runs after guest faults it announced, one after any other failure)",
                    again.len(),
                    again.join(", "),
                    self.attempt
                ))
            }
            RunEnd::Passed | RunEnd::Failed => {
                if end == RunEnd::Passed && !self.verdicts.any_failed() {
                    return Next::Pass((self.attempt > 1).then(|| {
                        format!(
                            "{what}: passed over {} lab runs ({} test verdicts seen)",
                            self.attempt,
                            self.verdicts.finished().count()
                        )
                    }));
                }
                if self.verdicts.any_failed() {
                    return Next::Fail(format!(
                        "{what}: failed in the KVM lab: {} (the last lab run: {status})",
                        self.verdicts.failed.join(", ")
                    ));
                }
                Next::Fail(format!("{what}: the lab run failed ({status})"))
            }
            RunEnd::LabFault(fault) => {
                // A lab fault that keeps a suite from any new verdict twice in a row (a test
                // that may be what kills the lab) ends it; one after some progress is tried
                // again. A benchmark shows no verdicts (it keeps its own partial results):
                // only the number of lab runs bounds it.
                if progressed || !suite {
                    self.runs_without_progress = 0;
                } else {
                    self.runs_without_progress += 1;
                }
                if self.attempt >= LAB_ATTEMPTS || self.runs_without_progress >= 2 {
                    return Next::Fail(format!(
                        "{what}: {fault}, before the run finished, in {} lab run(s); giving up",
                        self.attempt
                    ));
                }
                self.attempt += 1;
                if !suite {
                    return Next::RunAgain(format!(
                        "WARNING: {what}: {fault}, before the run finished (not a verdict on \
                         reapvm); running it once more in a fresh lab (attempt {} of \
                         {LAB_ATTEMPTS})",
                        self.attempt
                    ));
                }
                // A test that failed in a run the lab's own fault cut short is as
                // inconclusive as the run (a lab losing its timers fails tests before it
                // dies): it runs again in the next lab, as after a clean run.
                let again = if new_failures {
                    self.verdicts.retry_failures()
                } else {
                    Vec::new()
                };
                let mut warning = format!(
                    "WARNING: {what}: {fault}, before the suite finished (not a verdict on \
                     reapvm); {} test(s) have their verdict ({} failed), the rest run in a \
                     fresh lab (attempt {} of {LAB_ATTEMPTS})",
                    self.verdicts.finished().count(),
                    self.verdicts.failed.len(),
                    self.attempt
                );
                if !again.is_empty() {
                    warning.push_str(&format!(
                        "; {} test(s) that failed in the run it cut short run again there ({})",
                        again.len(),
                        again.join(", ")
                    ));
                }
                Next::RunAgain(warning)
            }
        }
    }
}

/// The verdicts of a libtest run's tests, read from its output ("test NAME ... ok", with
/// whatever the test printed before the verdict, and colour codes, in between), and the
/// guest faults they announced (lab_fault.rs) with this lab run's token.
#[derive(Debug)]
pub struct TestVerdicts {
    token: String,
    current: Option<String>,
    passed: Vec<String>,
    failed: Vec<String>,
    /// Tests that announced a guest fault of the lab's emulation in their latest run.
    announced: Vec<String>,
    /// A guest fault announced in this lab run outside any test (a benchmark's).
    announced_outside_tests: bool,
    /// Tests that failed in the lab other than on an announced guest fault and were given
    /// their one more run.
    retried: Vec<String>,
    /// Tests given more runs after failing on guest faults they announced, with how many.
    fault_reruns: HashMap<String, usize>,
}

impl TestVerdicts {
    pub fn new(token: String) -> Self {
        TestVerdicts {
            token,
            current: None,
            passed: Vec::new(),
            failed: Vec::new(),
            announced: Vec::new(),
            announced_outside_tests: false,
            retried: Vec::new(),
            fault_reruns: HashMap::new(),
        }
    }

    /// The token that a guest fault's announcement carries in this runner's lab runs.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Called as each lab run starts: a test cut short there runs from its start again.
    pub fn start_run(&mut self) {
        self.current = None;
        self.announced_outside_tests = false;
    }

    pub fn feed(&mut self, line: &str) {
        let plain = strip_ansi(line);
        let mut verdict = plain.trim();
        if let Some((name, rest)) = plain
            .strip_prefix("test ")
            .and_then(|rest| rest.split_once(" ..."))
        {
            let name = name.trim().to_string();
            self.announced.retain(|t| *t != name);
            self.current = Some(name);
            verdict = rest.trim();
        }
        if lab_fault::announced_in(&plain, &self.token) {
            match &self.current {
                Some(name) => self.announced.push(name.clone()),
                None => self.announced_outside_tests = true,
            }
        }
        // Only a line that is the verdict alone counts: a test's own output that merely ends
        // in "ok" must not pass it (a missed verdict only makes a retry run the test again).
        let Some(name) = self.current.take() else {
            return;
        };
        match verdict {
            "ok" => self.passed.push(name),
            "FAILED" => self.failed.push(name),
            _ => self.current = Some(name),
        }
    }

    /// Tests that passed or failed (not those that were running when the run was cut short).
    pub fn finished(&self) -> impl Iterator<Item = &str> {
        self.passed.iter().chain(&self.failed).map(String::as_str)
    }

    /// Finished tests that `--skip` (a substring match) can leave out without also leaving
    /// out an unfinished test of `all` whose name contains theirs.
    pub fn safe_skips(&self, all: &[String]) -> Vec<String> {
        if all.is_empty() {
            // The suite's list is unknown: no skip is known to be safe.
            return Vec::new();
        }
        let finished: Vec<&str> = self.finished().collect();
        let unfinished: Vec<&String> = all
            .iter()
            .filter(|t| !finished.contains(&t.as_str()))
            .collect();
        finished
            .iter()
            .filter(|name| !unfinished.iter().any(|t| t.contains(**name)))
            .map(|name| name.to_string())
            .collect()
    }

    /// Whether a benchmark (no test running) announced a guest fault in this lab run.
    pub fn fault_announced_outside_tests(&self) -> bool {
        self.announced_outside_tests
    }

    /// Whether `test`'s failure gets another run: after a guest fault it announced, while it
    /// has had fewer than LAB_FAULT_RERUNS such runs; after any other failure, once. The two
    /// budgets are apart: a test's plain failure after faults still gets its one more run.
    fn may_run_again(&self, test: &str) -> bool {
        if self.announced.iter().any(|t| t == test) {
            self.fault_reruns.get(test).copied().unwrap_or(0) < LAB_FAULT_RERUNS
        } else {
            !self.retried.iter().any(|t| t == test)
        }
    }

    /// Whether every failed test gets another run.
    pub fn all_failures_retryable(&self) -> bool {
        self.failed.iter().all(|t| self.may_run_again(t))
    }

    /// Failed tests that may run again (`may_run_again`) no longer count as finished; the
    /// others stay failed. Returns those moved.
    pub fn retry_failures(&mut self) -> Vec<String> {
        let (again, stay): (Vec<String>, Vec<String>) = std::mem::take(&mut self.failed)
            .into_iter()
            .partition(|t| self.may_run_again(t));
        self.failed = stay;
        for test in &again {
            if self.announced.contains(test) {
                *self.fault_reruns.entry(test.clone()).or_default() += 1;
            } else {
                self.retried.push(test.clone());
            }
        }
        // A test `--skip` could not leave out (its name is part of an unfinished one's) may
        // have passed before: it is unfinished again until its next run.
        self.passed.retain(|t| !again.contains(t));
        again
    }

    pub fn any_failed(&self) -> bool {
        !self.failed.is_empty()
    }
}

/// The names of the tests this run selects (its own `--list`, which never enters the lab).
fn list_tests(exe: &Path) -> Vec<String> {
    let listed = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--list")
        .stderr(Stdio::inherit())
        .output();
    let Ok(listed) = listed else {
        return Vec::new();
    };
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences (colours): ESC '[' parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::{LabRuns, Next, Retry, RunEnd, LAB_ATTEMPTS, LAB_FAULT_RERUNS};

    const FAULT: RunEnd = RunEnd::LabFault("the lab died");

    /// A test's line announcing a guest fault with this runner's token.
    fn announced(runs: &LabRuns, test: &str) -> String {
        format!(
            "test {test} ... [reapvm lab fault {}] boot: the guest stalled",
            runs.verdicts.token()
        )
    }

    /// One lab run that prints `lines` and ends with `end`.
    fn run(runs: &mut LabRuns, lines: &[&str], end: RunEnd) -> Next {
        runs.start_run();
        for line in lines {
            runs.verdicts.feed(line);
        }
        runs.after_run("suite", end, "exit status")
    }

    fn again(next: &Next) -> bool {
        matches!(next, Next::RunAgain(_))
    }

    #[test]
    fn a_failure_in_a_run_a_lab_fault_cut_short_gets_its_rerun() {
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        let next = run(&mut runs, &["test a ... ok", "test b ... FAILED"], FAULT);
        assert!(
            matches!(&next, Next::RunAgain(w) if w.contains("(b)")),
            "{next:?}"
        );
        let next = run(
            &mut runs,
            &["test b ... ok", "test c ... ok"],
            RunEnd::Passed,
        );
        assert!(matches!(next, Next::Pass(Some(_))), "{next:?}");
    }

    #[test]
    fn a_second_failure_fails_whatever_the_runs_that_saw_them() {
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        assert!(again(&run(&mut runs, &["test b ... FAILED"], FAULT)));
        let next = run(&mut runs, &["test b ... FAILED"], RunEnd::Failed);
        assert!(
            matches!(&next, Next::Fail(w) if w.contains(": b ")),
            "{next:?}"
        );

        // Its second failure in a run a fault cut short, then a clean last run: still failed.
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        assert!(again(&run(
            &mut runs,
            &["test b ... FAILED"],
            RunEnd::Failed
        )));
        assert!(again(&run(&mut runs, &["test b ... FAILED"], FAULT)));
        let next = run(&mut runs, &["test c ... ok"], RunEnd::Passed);
        assert!(
            matches!(&next, Next::Fail(w) if w.contains(": b ")),
            "{next:?}"
        );
    }

    #[test]
    fn faults_give_up_after_the_last_run_or_two_in_a_row_without_a_verdict() {
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        let tests = ["a", "b", "c", "d", "e", "f"];
        for test in &tests[..LAB_ATTEMPTS - 1] {
            let line = format!("test {test} ... ok");
            assert!(again(&run(&mut runs, &[&line], FAULT)));
        }
        let next = run(&mut runs, &["test f ... FAILED"], FAULT);
        assert!(
            matches!(&next, Next::Fail(w) if w.contains("giving up")),
            "{next:?}"
        );

        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        assert!(again(&run(&mut runs, &[], FAULT)));
        let next = run(&mut runs, &[], FAULT);
        assert!(
            matches!(&next, Next::Fail(w) if w.contains("giving up")),
            "{next:?}"
        );
    }

    #[test]
    fn a_clean_run_with_first_failures_counts_as_progress() {
        // Fault without a verdict, a run whose failures get their rerun, another fault
        // without a verdict: not two faults in a row, so a fourth run follows.
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        assert!(again(&run(&mut runs, &[], FAULT)));
        assert!(again(&run(
            &mut runs,
            &["test a ... FAILED"],
            RunEnd::Failed
        )));
        assert!(again(&run(&mut runs, &[], FAULT)));
        let next = run(&mut runs, &["test a ... ok"], RunEnd::Passed);
        assert!(matches!(next, Next::Pass(Some(_))), "{next:?}");
    }

    #[test]
    fn a_benchmark_runs_again_only_after_a_lab_fault() {
        let mut runs = LabRuns::new(Retry::Whole);
        assert!(again(&run(&mut runs, &[], FAULT)));
        assert!(matches!(run(&mut runs, &[], RunEnd::Failed), Next::Fail(_)));
        let mut runs = LabRuns::new(Retry::Whole);
        assert_eq!(run(&mut runs, &[], RunEnd::Passed), Next::Pass(None));
        // Faults in a row do not end a benchmark (it keeps what it finished); the last run does.
        let mut runs = LabRuns::new(Retry::Whole);
        for _ in 1..LAB_ATTEMPTS {
            assert!(again(&run(&mut runs, &[], FAULT)));
        }
        assert!(matches!(run(&mut runs, &[], FAULT), Next::Fail(_)));
    }

    #[test]
    fn a_benchmark_that_announced_a_guest_fault_runs_again() {
        let mut runs = LabRuns::new(Retry::Whole);
        runs.start_run();
        assert_eq!(runs.run_end(Some(1)), RunEnd::Failed);
        let line = format!(
            "[reapvm lab fault {}] lr_serving restored with REAP: the guest stalled",
            runs.verdicts.token()
        );
        runs.verdicts.feed(&line);
        let end = runs.run_end(Some(1));
        assert!(matches!(end, RunEnd::LabFault(_)), "{end:?}");
        assert!(again(&runs.after_run("bench", end, "exit status: 1")));
        // The next run starts clean: a failure there without an announcement is final.
        runs.start_run();
        let end = runs.run_end(Some(1));
        assert_eq!(end, RunEnd::Failed);
        assert!(matches!(
            runs.after_run("bench", end, "exit status: 1"),
            Next::Fail(_)
        ));
    }

    #[test]
    fn lab_run_exit_codes() {
        let runs = LabRuns::new(Retry::UnfinishedTests);
        assert_eq!(runs.run_end(Some(0)), RunEnd::Passed);
        assert_eq!(runs.run_end(Some(101)), RunEnd::Failed);
        assert_eq!(runs.run_end(None), RunEnd::Failed);
        assert!(matches!(runs.run_end(Some(122)), RunEnd::LabFault(_)));
        assert!(matches!(runs.run_end(Some(123)), RunEnd::LabFault(_)));
    }

    #[test]
    fn a_test_failing_on_guest_faults_it_announced_gets_more_runs() {
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        let fault = announced(&runs, "b");
        for rerun in 1..=LAB_FAULT_RERUNS {
            let next = run(
                &mut runs,
                &["test a ... ok", &fault, "FAILED"],
                RunEnd::Failed,
            );
            assert!(
                matches!(&next, Next::RunAgain(w) if w.contains("(b)")),
                "rerun {rerun}: {next:?}"
            );
        }
        // Its fourth failure on a fault is final.
        let next = run(&mut runs, &[&fault, "FAILED"], RunEnd::Failed);
        assert!(
            matches!(&next, Next::Fail(w) if w.contains(": b ")),
            "{next:?}"
        );

        // Faults, then a pass: the suite passes.
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        let fault = announced(&runs, "b");
        assert!(again(&run(&mut runs, &[&fault, "FAILED"], RunEnd::Failed)));
        assert!(again(&run(&mut runs, &[&fault, "FAILED"], RunEnd::Failed)));
        let next = run(&mut runs, &["test b ... ok"], RunEnd::Passed);
        assert!(matches!(next, Next::Pass(Some(_))), "{next:?}");
    }

    #[test]
    fn an_announcement_without_the_token_or_from_an_earlier_run_is_not_a_fault() {
        // A guest's console, printed by the failing test, saying the words without the token.
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        let forged = "test b ... [reapvm lab fault ] boot: the guest stalled";
        assert!(again(&run(&mut runs, &[forged, "FAILED"], RunEnd::Failed)));
        let next = run(&mut runs, &[forged, "FAILED"], RunEnd::Failed);
        assert!(matches!(next, Next::Fail(_)), "{next:?}");

        // A fault announced in one run does not excuse the test's plain failure in the next.
        let mut runs = LabRuns::new(Retry::UnfinishedTests);
        let fault = announced(&runs, "b");
        assert!(again(&run(&mut runs, &[&fault, "FAILED"], RunEnd::Failed)));
        assert!(again(&run(
            &mut runs,
            &["test b ... FAILED"],
            RunEnd::Failed
        )));
        let next = run(&mut runs, &["test b ... FAILED"], RunEnd::Failed);
        assert!(matches!(next, Next::Fail(_)), "{next:?}");
    }

    #[test]
    fn verdicts_from_libtest_output() {
        let mut v = super::TestVerdicts::new("t0ken".into());
        for line in [
            "running 5 tests",
            "test restored_with_file_backend     ... snapshot/load answered after 2ms (lab time)",
            "\u{1b}[32mok\u{1b}[0m",
            "test damaged_snapshots_are_refused ... \u{1b}[32mok\u{1b}[0m",
            "test lr_serving_answers ... reapvm-agent: starting workers",
            "reapvm-agent: cpus=1 ok",
            "  ok",
            "test broken_one ... \u{1b}[31mFAILED\u{1b}[0m",
            "test cut_short ... booting",
            "the agent said ok",
            "test result: ok. 3 passed; 1 failed",
        ] {
            v.feed(line);
        }
        assert_eq!(
            v.finished().collect::<Vec<_>>(),
            [
                "restored_with_file_backend",
                "damaged_snapshots_are_refused",
                "lr_serving_answers",
                "broken_one"
            ]
        );
        assert_eq!(v.passed.len(), 3);
        let all = [
            "restored_with_file_backend",
            "restored_with_file_backend_twice",
            "damaged_snapshots_are_refused",
            "lr_serving_answers",
            "broken_one",
            "cut_short",
        ]
        .map(String::from);
        // The first is also part of an unfinished test's name: skipping it would skip both.
        assert_eq!(
            v.safe_skips(&all),
            [
                "damaged_snapshots_are_refused",
                "lr_serving_answers",
                "broken_one"
            ]
        );
        assert!(v.any_failed());
        assert_eq!(v.current.as_deref(), Some("cut_short"));
        // A failed test's second run: it is no longer finished, so it is neither skipped nor
        // counted as failed until it fails again.
        assert!(v.all_failures_retryable());
        assert_eq!(v.retry_failures(), ["broken_one"]);
        assert!(!v.any_failed());
        assert_eq!(
            v.safe_skips(&all),
            ["damaged_snapshots_are_refused", "lr_serving_answers"]
        );
        // Its second failure is final, whatever the run that saw it; another test's first
        // failure still gets its one more run.
        v.feed("test broken_one ... FAILED");
        v.feed("test cut_short ... FAILED");
        assert!(!v.all_failures_retryable());
        assert_eq!(v.retry_failures(), ["cut_short"]);
        assert!(v.any_failed());
        assert_eq!(v.failed, ["broken_one"]);
    }
}
