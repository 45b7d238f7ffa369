//! Counts the KVM lab's faults over many function VM boots: each boot is one attempt (no
//! retry) that ends ready (the agent answers `GET /ready`), in a guest shutdown (a triple
//! fault: reapvm's `vcpu.exit_shutdown`), stalled (not ready by the deadline) or in another
//! error. Prints one line per boot (so a lab that dies part way still leaves its counts) and
//! a table with the lab's kernel command line and KVM module parameters, for comparing lab
//! settings (docs/kvm-lab.md).
//!
//! `cargo bench -p vmm --bench lab_faults -- [--boots N] [--function F] [--mem-mib M]
//!  [--suite] [--deadline-s S]`

use test_support as support;

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
}

fn parse_options() -> Result<Options, String> {
    let mut opts = Options {
        boots: 200,
        function: "helloworld".into(),
        mem_mib: 512,
        suite: false,
        deadline: Duration::from_secs(120),
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
    let where_ = match place {
        Place::Lab => format!("KVM lab ({})", lab_settings()),
        _ => "hardware KVM".into(),
    };
    println!(
        "lab fault count: {} boots of {} in {} MiB ({} rootfs), ready deadline {:?}; ran on: {where_}",
        opts.boots,
        opts.function,
        opts.mem_mib,
        if opts.suite { "suite" } else { "core" },
        opts.deadline
    );
    let mut counts = Counts::default();
    for i in 1..=opts.boots {
        let scratch = Scratch::new("lab-faults");
        let started = Instant::now();
        let outcome = FunctionVm::boot_attempt(&guest, &spec, &scratch, opts.deadline);
        let ms = started.elapsed().as_millis() as u64;
        let word = match &outcome {
            Ok(_) => {
                counts.ready += 1;
                counts.ready_ms.push(ms);
                "ready"
            }
            Err(BootFailure::GuestShutdown(_)) => {
                counts.shutdown += 1;
                "GUEST SHUTDOWN"
            }
            Err(BootFailure::Stalled(_)) => {
                counts.stalled += 1;
                "STALLED"
            }
            Err(BootFailure::Other(_)) => {
                counts.other += 1;
                "OTHER ERROR"
            }
        };
        println!("boot {i}/{}: {word} after {ms} ms", opts.boots);
        if let Err(e) = outcome {
            let detail = match e {
                BootFailure::GuestShutdown(e) | BootFailure::Stalled(e) | BootFailure::Other(e) => {
                    e
                }
            };
            eprintln!("boot {i}: {detail}");
        }
    }
    counts.ready_ms.sort_unstable();
    let median = counts
        .ready_ms
        .get(counts.ready_ms.len() / 2)
        .copied()
        .unwrap_or(0);
    let n = opts.boots as f64;
    println!();
    println!("| outcome | boots | share |");
    println!("|---|---|---|");
    for (name, count) in [
        ("ready", counts.ready),
        ("guest shutdown (triple fault)", counts.shutdown),
        ("stalled", counts.stalled),
        ("other error", counts.other),
    ] {
        println!("| {name} | {count} | {:.1}% |", 100.0 * count as f64 / n);
    }
    println!("\nmedian boot to ready: {median} ms; ran on: {where_}");
    ExitCode::SUCCESS
}
