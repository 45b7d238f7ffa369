//! A hostile guest against reapvm's virtio-mmio block device, at real speed on this host's
//! own KVM (the replay guest in user mode, as tests/replay.rs; never in the KVM lab). Each
//! case boots the guest with `reapvm-hostile=CASE` (guest/replay/src/hostile.rs): it
//! breaks the virtio rules one way, reports the device status reapvm then shows, and reads
//! good data after a reset. Meanwhile this side asks the API `GET /` every few
//! milliseconds. Each case checks what docs/security.md promises: the device ends as
//! documented, it serves again after a reset, the API answers within 100 ms throughout,
//! and the log stays small.

use reapvm_bench::replay_vm;
use test_support as support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use replay_vm::ReplayVmm;
use support::{Failed, Scratch, Trial};

const MEM_MIB: u64 = 64;
/// Slowest `GET /` answer allowed while the guest misbehaves.
const API_DEADLINE: Duration = Duration::from_millis(100);
/// Largest log a case may leave: a few dozen lines, whatever the guest does.
const MAX_LOG_BYTES: usize = 32 << 10;

/// DRIVER_OK and the steps before it (ACKNOWLEDGE, DRIVER, FEATURES_OK).
const RUNNING: u64 = 0x0f;
const NEEDS_RESET: u64 = 0x40;

struct Case {
    name: &'static str,
    /// The device status the guest must see after its abuse.
    status: u64,
    /// A line the log must hold: reapvm said what the guest did (None: a chain that fails
    /// alone is not worth a line at the default level).
    logged: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        name: "avail-ahead",
        status: RUNNING | NEEDS_RESET,
        logged: Some("entries ahead of the device's 0, more than the queue's 64"),
    },
    Case {
        name: "not-ready",
        status: RUNNING | NEEDS_RESET,
        logged: Some("queue 0 is not ready or not valid"),
    },
    Case {
        name: "descriptor-loop",
        status: RUNNING,
        logged: None,
    },
    Case {
        name: "outside-memory",
        status: RUNNING,
        logged: Some("descriptors outside guest memory"),
    },
    Case {
        name: "huge-length",
        status: RUNNING,
        logged: Some("descriptors outside guest memory"),
    },
    Case {
        name: "register-flood",
        status: RUNNING,
        logged: Some("further lines from this place are suppressed"),
    },
];

fn run_case(case: &Case) -> Result<(), String> {
    let scratch = Scratch::new(&format!("hostile-{}", case.name));
    let disk = scratch.path("disk.img");
    replay_vm::write_pattern_disk(&disk, 1)?;
    let config = scratch.path("vm.json");
    let body = serde_json::json!({
        "boot-source": {
            "kernel_image_path": replay_vm::replay_guest()?,
            "boot_args": format!("reapvm-hostile={}", case.name),
        },
        "drives": [{"drive_id": "disk", "path_on_host": disk, "is_root_device": false, "is_read_only": true}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
        "replay-control": true,
    });
    std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;
    let vmm = ReplayVmm::start(&scratch.dir, case.name, Some(&config))?;

    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut asked = 0u32;
    let seen = loop {
        let t = Instant::now();
        let (status, answer) = support::http::unix_request(&vmm.socket, "GET", "/", "")?;
        slowest = slowest.max(t.elapsed());
        asked += 1;
        if status != 200 {
            return Err(format!("GET / answered {status} {answer}"));
        }
        let metrics = vmm.metrics()?;
        let replay = &metrics["replay"];
        if let Some(error) = replay["error"].as_str().filter(|e| !e.is_empty()) {
            return Err(format!(
                "the guest stopped: {error}\n--- reapvm ---\n{}",
                vmm.log_tail()
            ));
        }
        if replay["done"] == true {
            break replay["checksum"].as_u64().unwrap_or(u64::MAX);
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "the guest did not finish within 120 s (the device never served again?)\n--- reapvm ---\n{}",
                vmm.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = vmm.log_text();
    let mut problems = Vec::new();
    if seen != case.status {
        problems.push(format!(
            "the guest saw device status {seen:#x}, expected {:#x}",
            case.status
        ));
    }
    if slowest > API_DEADLINE {
        problems.push(format!(
            "the slowest of {asked} GET / took {slowest:?} (at most {API_DEADLINE:?})"
        ));
    }
    if log.len() > MAX_LOG_BYTES {
        problems.push(format!(
            "the log grew to {} bytes (at most {MAX_LOG_BYTES}); its most frequent lines:\n{}",
            log.len(),
            most_frequent_lines(&log)
        ));
    }
    if let Some(line) = case.logged.filter(|line| !log.contains(line)) {
        problems.push(format!("the log does not say {line:?}"));
    }
    if !log.contains("hostile case: device served again after reset") {
        problems.push("the guest's closing line is missing from the log".into());
    }
    if problems.is_empty() {
        println!(
            "{}: status {seen:#x}, {asked} GET / (slowest {slowest:?}), log {} bytes",
            case.name,
            log.len()
        );
        Ok(())
    } else {
        Err(format!(
            "{}: {}\n--- reapvm ---\n{}",
            case.name,
            problems.join("; "),
            vmm.log_tail()
        ))
    }
}

/// The five most frequent log lines, timestamps left out, with their counts.
fn most_frequent_lines(log: &str) -> String {
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    for line in log.lines() {
        let message = line.split_once(' ').map_or(line, |(_, rest)| rest);
        *counts.entry(message).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .iter()
        .take(5)
        .map(|(line, n)| format!("{n:>8}  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn main() -> ExitCode {
    let trials = CASES
        .iter()
        .map(|case| {
            Trial::test(
                format!("hostile_{}", case.name.replace('-', "_")),
                move || run_case(case).map_err(Failed::from),
            )
        })
        .collect();
    replay_vm::run_host_suite("hostile", trials)
}
