//! The suite benchmark's command line.

use std::path::PathBuf;

use super::functions::{find, SUITE};

/// A way to restore a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Lazy mapping of the memory file (Firecracker's default; the paper's "cold").
    File,
    /// Every page on demand through userfaultfd (reapvm's OnDemand backend).
    Uffd,
    /// `Uffd` with fault-around: each fault filled with the aligned 64 KiB around it.
    UffdFaultAround,
    /// REAP as in the paper: one read of the WS file, installed before the guest runs.
    Reap,
    /// REAP with reapvm's improvements: parallel fetch, O_DIRECT, chunked install.
    ReapPlus,
    /// Streamed REAP: the guest resumes once the WS's first chunk is in; the rest is read
    /// and installed while it runs (O_DIRECT where the filesystem allows).
    ReapStream,
    /// `ReapStream` with fault-around on the misses (64 KiB, less the WS's pages).
    ReapStreamFaultAround,
    /// `File` with the memory file on a tmpfs: a memory-cached snapshot, the baseline
    /// FaaSnap compares against, and the limit for any backend reading from a file. The
    /// replay benchmark's only: in the KVM lab every snapshot file is on a tmpfs already.
    Tmpfs,
}

/// The fault-around modes' block: the host kernel's own fault-around for a mapped file
/// (`fault_around_bytes`) is 64 KiB too.
pub const FAULT_AROUND_KIB: u32 = 64;

impl Mode {
    /// The suite benchmark's modes, and its default.
    pub const ALL: [Mode; 4] = [Mode::File, Mode::Uffd, Mode::Reap, Mode::ReapPlus];
    /// Every mode a command line may name.
    pub const KNOWN: [Mode; 8] = [
        Mode::File,
        Mode::Uffd,
        Mode::UffdFaultAround,
        Mode::Reap,
        Mode::ReapPlus,
        Mode::ReapStream,
        Mode::ReapStreamFaultAround,
        Mode::Tmpfs,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Mode::File => "File",
            Mode::Uffd => "Uffd",
            Mode::UffdFaultAround => "Uffd-fa",
            Mode::Reap => "REAP",
            Mode::ReapPlus => "REAP+",
            Mode::ReapStream => "REAP-stream",
            Mode::ReapStreamFaultAround => "REAP-stream-fa",
            Mode::Tmpfs => "File-tmpfs",
        }
    }

    /// A mode by its label (or its name), any case.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::KNOWN
            .into_iter()
            .find(|m| m.label().eq_ignore_ascii_case(s) || format!("{m:?}").eq_ignore_ascii_case(s))
    }

    /// The `mem_backend` of `PUT /snapshot/load` for the memory file `mem` (for `Tmpfs`, the
    /// caller passes the copy on the tmpfs).
    pub fn backend(self, mem: &std::path::Path) -> serde_json::Value {
        match self {
            Mode::File | Mode::Tmpfs => {
                serde_json::json!({"backend_type": "File", "backend_path": mem})
            }
            Mode::Uffd => serde_json::json!({"backend_type": "OnDemand", "backend_path": mem}),
            Mode::UffdFaultAround => serde_json::json!({
                "backend_type": "OnDemand", "backend_path": mem,
                "fault_around_kib": FAULT_AROUND_KIB,
            }),
            Mode::Reap => serde_json::json!({"backend_type": "Reap", "backend_path": mem}),
            Mode::ReapPlus => serde_json::json!({
                "backend_type": "Reap", "backend_path": mem,
                "reap_options": {"fetch_in_parallel": true, "o_direct": true, "chunked_install": true},
            }),
            Mode::ReapStream => serde_json::json!({
                "backend_type": "Reap", "backend_path": mem,
                "reap_options": {"streaming": true, "o_direct": true},
            }),
            Mode::ReapStreamFaultAround => serde_json::json!({
                "backend_type": "Reap", "backend_path": mem,
                "reap_options": {"streaming": true, "o_direct": true, "fault_around_kib": FAULT_AROUND_KIB},
            }),
        }
    }

    pub fn is_reap(self) -> bool {
        matches!(
            self,
            Mode::Reap | Mode::ReapPlus | Mode::ReapStream | Mode::ReapStreamFaultAround
        )
    }
}

#[derive(Debug)]
pub struct Options {
    pub functions: Vec<String>,
    pub modes: Vec<Mode>,
    pub runs: usize,
    /// Leave the snapshot and WS files in the page cache (no posix_fadvise DONTNEED).
    pub hot: bool,
    /// Where the table, the CSV and the chart go.
    pub out: PathBuf,
    /// Keep the rows of other functions already in OUT/runs.csv (re-run a few functions).
    pub merge: bool,
    /// Run nothing: write OUT's table and chart again from OUT/runs.csv (after a change to
    /// the report), with the modes the CSV holds.
    pub report_only: bool,
}

pub const USAGE: &str = "usage: suite [--functions a,b,..] [--modes File,Uffd,Uffd-fa,REAP,REAP+,REAP-stream,REAP-stream-fa,File-tmpfs] [--runs N] [--hot] [--out DIR] [--merge] [--report-only]";

impl Options {
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        default_out: PathBuf,
    ) -> Result<Self, String> {
        let mut o = Options {
            functions: SUITE.iter().map(|f| f.name.to_string()).collect(),
            modes: Mode::ALL.to_vec(),
            runs: 10,
            hot: false,
            out: default_out,
            merge: false,
            report_only: false,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value =
                |flag: &str| args.next().ok_or(format!("{flag} needs a value; {USAGE}"));
            match a.as_str() {
                "--functions" => {
                    let list = value("--functions")?;
                    o.functions = list
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    if let Some(bad) = o.functions.iter().find(|f| find(f).is_none()) {
                        let known: Vec<&str> = SUITE.iter().map(|f| f.name).collect();
                        return Err(format!(
                            "unknown function {bad:?}; the suite has {}",
                            known.join(",")
                        ));
                    }
                }
                "--modes" => {
                    let list = value("--modes")?;
                    o.modes = Vec::new();
                    for m in list.split(',').filter(|s| !s.is_empty()) {
                        let mode = Mode::parse(m).ok_or(format!(
                            "unknown mode {m:?}; modes are File,Uffd,Uffd-fa,REAP,REAP+,REAP-stream,REAP-stream-fa,File-tmpfs"
                        ))?;
                        if !o.modes.contains(&mode) {
                            o.modes.push(mode);
                        }
                    }
                }
                "--runs" => {
                    let v = value("--runs")?;
                    o.runs = v
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or(format!("--runs {v:?}: a number >= 1"))?;
                }
                "--hot" => o.hot = true,
                "--merge" => o.merge = true,
                "--report-only" => o.report_only = true,
                "--out" => o.out = PathBuf::from(value("--out")?),
                // cargo bench passes --bench to harness-less benchmarks.
                "--bench" => {}
                other => return Err(format!("unknown argument {other:?}; {USAGE}")),
            }
        }
        if o.functions.is_empty() || o.modes.is_empty() {
            return Err(format!("no functions or no modes to run; {USAGE}"));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse(args.iter().map(|s| s.to_string()), PathBuf::from("out"))
    }

    #[test]
    fn defaults_are_the_whole_suite_ten_runs_cold() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.functions.len(), 10);
        assert_eq!(o.modes, Mode::ALL.to_vec());
        assert_eq!((o.runs, o.hot), (10, false));
    }

    #[test]
    fn selects_one_cell() {
        let o = parse(&[
            "--functions",
            "pyaes",
            "--modes",
            "reap+,file",
            "--runs",
            "2",
            "--hot",
            "--bench",
        ])
        .unwrap();
        assert_eq!(o.functions, vec!["pyaes"]);
        assert_eq!(o.modes, vec![Mode::ReapPlus, Mode::File]);
        assert_eq!((o.runs, o.hot), (2, true));
    }

    #[test]
    fn refuses_bad_input_with_the_reason() {
        assert!(parse(&["--functions", "nope"])
            .unwrap_err()
            .contains("nope"));
        assert!(parse(&["--modes", "Fast"]).unwrap_err().contains("Fast"));
        assert!(parse(&["--runs", "0"]).unwrap_err().contains("--runs"));
        assert!(parse(&["--runs"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--frobnicate"]).unwrap_err().contains("frobnicate"));
    }
}
