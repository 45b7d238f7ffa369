//! Boot benchmark: VMM start to the guest's boot-complete signal over N boots (median, min,
//! max), and the VMM's own resident memory beyond guest RAM.
//!
//! `cargo bench -p vmm --bench boot -- [--runs N] [--vcpus N] [--mem-mib N] [--kernel vmlinux|bzImage]`

use test_support as support;

use std::process::ExitCode;
use std::time::Duration;

use support::*;

struct Options {
    runs: usize,
    vcpus: u32,
    mem_mib: u64,
    bzimage: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut opts = Options {
        runs: 20,
        vcpus: 1,
        mem_mib: 128,
        bzimage: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--runs" => {
                opts.runs = value("--runs")?
                    .parse()
                    .map_err(|e| format!("--runs: {e}"))?
            }
            "--vcpus" => {
                opts.vcpus = value("--vcpus")?
                    .parse()
                    .map_err(|e| format!("--vcpus: {e}"))?
            }
            "--mem-mib" => {
                opts.mem_mib = value("--mem-mib")?
                    .parse()
                    .map_err(|e| format!("--mem-mib: {e}"))?
            }
            "--kernel" => opts.bzimage = value("--kernel")? == "bzImage",
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if opts.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(opts)
}

/// Resident KiB of every mapping except the guest RAM mapping (anonymous, `guest_bytes` long).
fn vmm_rss_kib(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                continue;
            };
            let path = fields.nth(4);
            is_guest = end - start == guest_bytes && path.is_none();
        } else if first == "Rss:" && !is_guest {
            total += fields.next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

struct Sample {
    boot_us: u64,
    rss_kib: Option<u64>,
}

fn boot_once(config: &std::path::Path, mem_mib: u64) -> Result<Sample, String> {
    let (mut child, boot_us) = start_until_booted(config, Duration::from_secs(240))?;
    // Let the guest settle so the RSS reflects a booted, idle VM.
    std::thread::sleep(Duration::from_millis(300));
    let rss_kib = vmm_rss_kib(child.id(), mem_mib << 20);
    let _ = child.kill();
    let _ = child.wait();
    match boot_us {
        Some(boot_us) => Ok(Sample { boot_us, rss_kib }),
        None => Err("the guest did not signal boot completion within 240 s".into()),
    }
}

fn median(sorted: &[u64]) -> u64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

fn main() -> ExitCode {
    let opts = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench boot: {e}");
            return ExitCode::from(2);
        }
    };
    let place = detect_place();
    if place == Place::NeedsLab {
        return support::place::rerun_in_lab("boot benchmark");
    }
    let guest = match GuestArtifacts::locate() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("bench boot: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kernel = if opts.bzimage {
        &guest.bzimage
    } else {
        &guest.vmlinux
    };
    let scratch = Scratch::new("bench-boot");
    let config = scratch.write(
        "vm.json",
        vm_config(
            kernel,
            Some(&guest.initramfs),
            opts.vcpus,
            opts.mem_mib,
            &test_boot_args("reapvm.exit=stay"),
        ),
    );
    let where_ = match place {
        Place::Lab => "KVM lab (QEMU TCG, nested SVM): boot times are NOT hardware times",
        _ => "hardware KVM",
    };
    println!(
        "boot benchmark: {} boots, {} vCPU(s), {} MiB, {}, initramfs agent; ran on: {where_}",
        opts.runs,
        opts.vcpus,
        opts.mem_mib,
        kernel.file_name().unwrap().to_string_lossy()
    );
    let mut boots = Vec::new();
    let mut rss = Vec::new();
    for i in 0..opts.runs {
        match boot_once(&config, opts.mem_mib) {
            Ok(s) => {
                eprintln!(
                    "  boot {}/{}: {} us, VMM RSS {:?} KiB",
                    i + 1,
                    opts.runs,
                    s.boot_us,
                    s.rss_kib
                );
                boots.push(s.boot_us);
                rss.extend(s.rss_kib);
            }
            Err(e) => {
                eprintln!("bench boot: run {}: {e}", i + 1);
                return ExitCode::FAILURE;
            }
        }
    }
    boots.sort_unstable();
    rss.sort_unstable();
    println!();
    println!("| metric | median | min | max | target (hardware KVM) |");
    println!("|---|---|---|---|---|");
    println!(
        "| VMM start to boot-complete (ms) | {:.1} | {:.1} | {:.1} | <= 125 |",
        median(&boots) as f64 / 1000.0,
        boots[0] as f64 / 1000.0,
        boots[boots.len() - 1] as f64 / 1000.0
    );
    if !rss.is_empty() {
        println!(
            "| VMM RSS beyond guest memory (MiB) | {:.2} | {:.2} | {:.2} | <= 5 |",
            median(&rss) as f64 / 1024.0,
            rss[0] as f64 / 1024.0,
            rss[rss.len() - 1] as f64 / 1024.0
        );
    }
    println!("\nran on: {where_}");
    ExitCode::SUCCESS
}
