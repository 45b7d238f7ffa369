//! Counts the KVM lab's faults over many function VM boots: each boot is one attempt (no
//! retry) that ends ready (the agent answers `GET /ready`), in a guest shutdown (a triple
//! fault: reapvm's `vcpu.exit_shutdown`), stalled (not ready by the deadline) or in another
//! error. Prints one line per boot (so a lab that dies part way still leaves its counts) and
//! a table with the lab's kernel command line and KVM module parameters, for comparing lab
//! settings (docs/kvm-lab.md).
//!
//! `--vmm PATH` also boots with another VMM that takes Firecracker's command line and config
//! file (Firecracker itself, built outside this repository), alternating with reapvm boot by
//! boot, to tell the emulation's faults from reapvm's: same kernel, rootfs, config and lab.
//! `--boots N` is then N boots by each.
//!
//! `cargo bench -p vmm --bench lab_faults -- [--boots N] [--function F] [--mem-mib M]
//!  [--suite] [--deadline-s S] [--vmm PATH]`

use test_support as support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use support::function_vm::{BootFailure, FunctionVm, VmSpec};
use support::*;

struct Options {
    boots: usize,
    function: String,
    mem_mib: u64,
    suite: bool,
    deadline: Duration,
    vmm: Option<PathBuf>,
}

fn parse_options() -> Result<Options, String> {
    let mut opts = Options {
        boots: 200,
        function: "helloworld".into(),
        mem_mib: 512,
        suite: false,
        deadline: Duration::from_secs(120),
        vmm: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--boots" => {
                opts.boots = value("--boots")?
                    .parse()
                    .map_err(|e| format!("--boots: {e}"))?
            }
            "--function" => opts.function = value("--function")?,
            "--mem-mib" => {
                opts.mem_mib = value("--mem-mib")?
                    .parse()
                    .map_err(|e| format!("--mem-mib: {e}"))?
            }
            "--suite" => opts.suite = true,
            "--deadline-s" => {
                opts.deadline = Duration::from_secs(
                    value("--deadline-s")?
                        .parse()
                        .map_err(|e| format!("--deadline-s: {e}"))?,
                )
            }
            "--vmm" => {
                let path = PathBuf::from(value("--vmm")?);
                // The lab sees the host's files at the same absolute paths (not under /tmp).
                if !path.is_absolute() || !path.is_file() {
                    return Err(format!(
                        "--vmm {}: not an absolute path to a file",
                        path.display()
                    ));
                }
                opts.vmm = Some(path);
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if opts.boots == 0 {
        return Err("--boots must be at least 1".into());
    }
    Ok(opts)
}

/// The lab's kernel command line and the KVM module parameters that the experiments vary.
fn lab_settings() -> String {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut settings = vec![format!("kernel: {}", cmdline.trim())];
    for (module, param) in [
        ("kvm", "tdp_mmu"),
        ("kvm_amd", "npt"),
        ("kvm_amd", "vgif"),
        ("kvm_amd", "vls"),
    ] {
        let path = format!("/sys/module/{module}/parameters/{param}");
        let value = std::fs::read_to_string(&path).unwrap_or_else(|_| "-".into());
        settings.push(format!("{module}.{param}={}", value.trim()));
    }
    settings.join("; ")
}

#[derive(Default)]
struct Counts {
    ready: usize,
    shutdown: usize,
    stalled: usize,
    other: usize,
    ready_ms: Vec<u64>,
}

impl Counts {
    /// Counts one boot's outcome; the word its line says.
    fn add(&mut self, outcome: &Result<FunctionVm, BootFailure>, ms: u64) -> &'static str {
        match outcome {
            Ok(_) => {
                self.ready += 1;
                self.ready_ms.push(ms);
                "ready"
            }
            Err(BootFailure::GuestShutdown(_)) => {
                self.shutdown += 1;
                "GUEST SHUTDOWN"
            }
            Err(BootFailure::Stalled(_)) => {
                self.stalled += 1;
                "STALLED"
            }
            Err(BootFailure::Other(_)) => {
                self.other += 1;
                "OTHER ERROR"
            }
        }
    }

    fn print(&mut self, vmm: &str, boots: usize) {
        self.ready_ms.sort_unstable();
        let median = self
            .ready_ms
            .get(self.ready_ms.len() / 2)
            .copied()
            .unwrap_or(0);
        println!("\n{vmm}: median boot to ready {median} ms");
        println!("| outcome | boots | share |");
        println!("|---|---|---|");
        for (name, count) in [
            ("ready", self.ready),
            ("guest shutdown (triple fault)", self.shutdown),
            ("stalled", self.stalled),
            ("other error", self.other),
        ] {
            let share = 100.0 * count as f64 / boots as f64;
            println!("| {name} | {count} | {share:.1}% |");
        }
    }
}

fn main() -> ExitCode {
    let opts = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench lab_faults: {e}");
            return ExitCode::from(2);
        }
    };
    let place = detect_place();
    if place == Place::NeedsLab {
        return support::place::rerun_in_lab("lab fault count");
    }
    let guest = if opts.suite {
        GuestArtifacts::locate_suite()
    } else {
        GuestArtifacts::locate()
    };
    let guest = match guest {
        Ok(g) => g,
        Err(e) => {
            eprintln!("bench lab_faults: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut spec = VmSpec::read_only(&guest);
    spec.mem_mib = opts.mem_mib;
    spec.function = Some(opts.function.clone());
    // reapvm, and the other VMM if one is given: boots alternate between them, so both
    // meet the same lab instance and the same host load.
    let mut vmms: Vec<(String, Option<PathBuf>, Counts)> =
        vec![("reapvm".into(), None, Counts::default())];
    if let Some(path) = &opts.vmm {
        vmms.push((
            path.display().to_string(),
            Some(path.clone()),
            Counts::default(),
        ));
    }
    let where_ = match place {
        Place::Lab => format!("KVM lab ({})", lab_settings()),
        _ => "hardware KVM".into(),
    };
    let names: Vec<&str> = vmms.iter().map(|(name, ..)| name.as_str()).collect();
    println!(
        "lab fault count: {} boots of {} in {} MiB ({} rootfs) by each of {}, ready deadline {:?}; ran on: {where_}",
        opts.boots,
        opts.function,
        opts.mem_mib,
        if opts.suite { "suite" } else { "core" },
        names.join(" and "),
        opts.deadline
    );
    for i in 1..=opts.boots {
        for (name, vmm, counts) in vmms.iter_mut() {
            spec.vmm = vmm.clone();
            let scratch = Scratch::new("lab-faults");
            let started = Instant::now();
            let outcome = FunctionVm::boot_attempt(&guest, &spec, &scratch, opts.deadline);
            let ms = started.elapsed().as_millis() as u64;
            let word = counts.add(&outcome, ms);
            println!("boot {i}/{} by {name}: {word} after {ms} ms", opts.boots);
            if let Err(e) = outcome {
                let detail = match e {
                    BootFailure::GuestShutdown(e)
                    | BootFailure::Stalled(e)
                    | BootFailure::Other(e) => e,
                };
                eprintln!("boot {i} by {name}: {detail}");
            }
        }
    }
    for (name, _, counts) in vmms.iter_mut() {
        counts.print(name, opts.boots);
    }
    println!("\nran on: {where_}");
    ExitCode::SUCCESS
}
