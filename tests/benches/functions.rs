//! Function VM benchmark: boot to ready with the Debian rootfs, warm invocation latency
//! (median and p99), block read throughput (guest side), network throughput through the agent.
//!
//! `cargo bench -p vmm --bench functions -- [--boots N] [--invocations N]`

use test_support as support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use support::function_vm::{Drive, FunctionVm, VmSpec};
use support::*;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn run() -> Result<(), String> {
    let mut boots = 5usize;
    let mut invocations = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--boots" => {
                boots = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--boots N")?
            }
            "--invocations" => {
                invocations = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--invocations N")?
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let guest = GuestArtifacts::locate()?;
    let where_ = match detect_place() {
        Place::Lab => {
            "KVM lab (QEMU TCG, nested SVM): latencies and throughputs are NOT hardware figures"
        }
        _ => "hardware KVM",
    };
    println!("function VM benchmark: 1 vCPU, 256 MiB, Debian rootfs (read-only), helloworld; ran on: {where_}");

    let scratch = Scratch::new("bench-fn");
    let data = scratch.path("data.img");
    let file = std::fs::File::create(&data).map_err(|e| e.to_string())?;
    file.set_len(64 << 20).map_err(|e| e.to_string())?;
    let mut spec = VmSpec::read_only(&guest);
    spec.function = Some("helloworld".into());
    spec.extra_drives.push(Drive {
        id: "data".into(),
        path: data,
        read_only: true,
        rate_limiter: None,
    });

    let mut ready_ms = Vec::new();
    let mut last = None;
    for i in 0..boots {
        // One VM at a time: a running one would slow the next boot down.
        drop(last.take());
        let start = Instant::now();
        let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
        ready_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "  boot {}/{boots}: ready after {:.0} ms",
            i + 1,
            ready_ms[i]
        );
        last = Some(vm);
    }
    let vm = last.ok_or("--boots must be at least 1")?;

    let mut conn = vm.conn()?;
    for _ in 0..20 {
        conn.request("POST", "/invoke", b"warmup")?;
    }
    let mut lat_us = Vec::with_capacity(invocations);
    for i in 0..invocations {
        let t = Instant::now();
        let (status, body) = conn.request("POST", "/invoke", format!("n{i}").as_bytes())?;
        lat_us.push(t.elapsed().as_secs_f64() * 1e6);
        if status != 200 || body != format!("Hello, n{i}!").as_bytes() {
            return Err(format!("invocation {i} answered {status}"));
        }
    }
    lat_us.sort_by(f64::total_cmp);

    let (status, body) = vm.invoke("readblock", b"/dev/vdb")?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut parts = text.split_whitespace();
    let (bytes, secs): (f64, f64) = match (
        parts.next().and_then(|v| v.parse().ok()),
        parts.next().and_then(|v| v.parse().ok()),
    ) {
        (Some(b), Some(s)) if status == 200 => (b, s),
        _ => return Err(format!("readblock answered {status}: {text}")),
    };

    const NET: usize = 32 << 20;
    let payload = vec![0x5au8; NET];
    let t = Instant::now();
    let (s1, _) = vm.invoke("sha256", &payload)?;
    let up = t.elapsed();
    let t = Instant::now();
    let (s2, down_body) = vm.invoke("blob", NET.to_string().as_bytes())?;
    let down = t.elapsed();
    if s1 != 200 || s2 != 200 || down_body.len() != NET {
        return Err("network transfer failed".into());
    }
    let mibps = |d: Duration| NET as f64 / (1 << 20) as f64 / d.as_secs_f64();

    ready_ms.sort_by(f64::total_cmp);
    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| boot to agent ready (VMM start to GET /ready = 200), median of {boots} (min, max) | {:.0} ms ({:.0}, {:.0}) |",
        percentile(&ready_ms, 0.5),
        ready_ms[0],
        ready_ms[ready_ms.len() - 1]
    );
    println!(
        "| warm invocation latency, helloworld over keep-alive HTTP, median / p99 of {invocations} | {:.0} us / {:.0} us |",
        percentile(&lat_us, 0.5),
        percentile(&lat_us, 0.99)
    );
    println!(
        "| block read throughput (guest reads 64 MiB of /dev/vdb, page cache dropped) | {:.1} MiB/s |",
        bytes / (1 << 20) as f64 / secs
    );
    println!(
        "| network host->guest (32 MiB body to sha256, incl. hashing) | {:.1} MiB/s |",
        mibps(up)
    );
    println!(
        "| network guest->host (32 MiB from blob, incl. generation) | {:.1} MiB/s |",
        mibps(down)
    );
    println!("\nran on: {where_}");
    Ok(())
}

fn main() -> ExitCode {
    if detect_place() == Place::NeedsLab {
        return support::place::rerun_in_lab("function VM benchmark");
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench functions: {e}");
            ExitCode::FAILURE
        }
    }
}
