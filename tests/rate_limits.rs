//! Firecracker's rate limiters on reapvm's devices, driven at real speed on this host's own
//! KVM by the replay guest's virtio-blk check (every read 4 KiB, so the bytes moved are
//! known): a drive's bandwidth and operations buckets hold the guest to the configured rate
//! and `PATCH /drives` on the running VM changes the buckets at once. The guest checks
//! every byte it reads, so a held-back request that came back wrong fails too.
//!
//! A limited check is timed whole, from its VMM's start: it can never beat the time its
//! bucket allows, whatever the host's load, so a shorter time is a leak. It must not take
//! more than that time (plus 20%) beyond an unlimited check's, run just before it. The
//! tests run one at a time: their guests would slow each other's on a 2-core host.

use reapvm_bench::replay_vm;
use test_support as support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use replay_vm::ReplayVmm;
use support::{Failed, Scratch, Trial};

const MEM_MIB: u64 = 64;
/// Every read of the check: 8 sectors.
const READ_BYTES: u64 = 4096;

/// A replay guest running the virtio-blk check over a 16 MiB pattern disk whose drive has
/// `rate_limiter`: its VMM, and when it was started.
fn start_check(
    scratch: &Scratch,
    tag: &str,
    requests: u64,
    rate_limiter: serde_json::Value,
) -> Result<(ReplayVmm, Instant), String> {
    let disk = scratch.path("disk.img");
    if !disk.exists() {
        replay_vm::write_pattern_disk(&disk, 16)?;
    }
    let config = scratch.path(&format!("vm-{tag}.json"));
    let body = serde_json::json!({
        "boot-source": {
            "kernel_image_path": replay_vm::replay_guest()?,
            "boot_args": format!("reapvm-virtio-check requests={requests} sectors={}", READ_BYTES / 512),
        },
        "drives": [{"drive_id": "check", "path_on_host": disk, "is_root_device": false,
                    "is_read_only": true, "rate_limiter": rate_limiter}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
        "replay-control": true,
    });
    std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let vmm = ReplayVmm::start(&scratch.dir, tag, Some(&config))?;
    Ok((vmm, started))
}

/// Waits for the check to end with every request checked.
fn wait_done(vmm: &ReplayVmm, requests: u64, timeout: Duration) -> Result<(), String> {
    let m = vmm.wait_for("done", timeout)?;
    let checked = m["replay"]["checksum"].as_u64().unwrap_or(0);
    if checked != requests {
        return Err(format!(
            "the guest checked {checked} requests, expected {requests}\n{}",
            vmm.log_tail()
        ));
    }
    Ok(())
}

/// The times of the check without a limiter and then with `rate_limiter`, in seconds.
#[derive(Clone, Copy)]
struct CheckTimes {
    free: f64,
    limited: f64,
}

fn time_checks(
    scratch: &Scratch,
    tag: &str,
    requests: u64,
    rate_limiter: serde_json::Value,
) -> Result<CheckTimes, String> {
    let mut times = Vec::new();
    for (run, limiter) in [("free", serde_json::Value::Null), (tag, rate_limiter)] {
        let (vmm, started) = start_check(scratch, run, requests, limiter)?;
        wait_done(&vmm, requests, Duration::from_secs(60))?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(CheckTimes {
        free: times[0],
        limited: times[1],
    })
}

/// The limited check took at least `allowed` seconds (its bucket's time: a shorter one is a
/// leak, which no load can cause) and at most 20% more than that beyond the free check.
fn held_to_rate(what: &str, times: &CheckTimes, allowed: f64) -> Result<(), String> {
    let CheckTimes { free, limited } = *times;
    if limited < allowed {
        return Err(format!(
            "{what}: the limited check took {limited:.2} s, less than the {allowed:.2} s its \
             bucket allows: the limiter let requests through early"
        ));
    }
    if limited - free > allowed * 1.2 {
        return Err(format!(
            "{what}: the limited check took {limited:.2} s, {:.2} s more than the free one \
             ({free:.2} s); its bucket allows {allowed:.2} s (20% more at most)",
            limited - free
        ));
    }
    Ok(())
}

/// 5 MiB/s (512 KiB refilled every 100 ms): 1500 reads of 4 KiB, the first 512 KiB at once.
fn a_bandwidth_bucket_holds_reads_to_its_rate() -> Result<(), String> {
    let scratch = Scratch::new("rate-bandwidth");
    let (size, refill_ms, requests) = (512 * 1024u64, 100u64, 1500u64);
    let limiter = serde_json::json!({"bandwidth": {"size": size, "refill_time": refill_ms}});
    let times = time_checks(&scratch, "bandwidth", requests, limiter)?;
    let rate = size as f64 * 1000.0 / refill_ms as f64;
    let allowed = (requests * READ_BYTES - size) as f64 / rate;
    held_to_rate("bandwidth", &times, allowed)
}

/// 1000 requests a second (100 every 100 ms), plus a one-time burst of 200: 1500 reads.
fn an_operations_bucket_and_its_burst_hold_requests_to_their_rate() -> Result<(), String> {
    let scratch = Scratch::new("rate-ops");
    let (size, burst, refill_ms, requests) = (100u64, 200u64, 100u64, 1500u64);
    let limiter = serde_json::json!({"ops": {"size": size, "one_time_burst": burst, "refill_time": refill_ms}});
    let times = time_checks(&scratch, "ops", requests, limiter)?;
    let rate = size as f64 * 1000.0 / refill_ms as f64;
    let allowed = (requests - size - burst) as f64 / rate;
    held_to_rate("operations", &times, allowed)
}

/// A drive held to 10 requests a second would take minutes; a PATCH that lifts the limit
/// lets the check finish at once, and the configuration says so.
fn patching_a_running_drive_changes_its_limit() -> Result<(), String> {
    let scratch = Scratch::new("rate-patch");
    let requests = 1500;
    let (vmm, started) = start_check(&scratch, "free", requests, serde_json::Value::Null)?;
    wait_done(&vmm, requests, Duration::from_secs(60))?;
    let free = started.elapsed();
    drop(vmm);
    let limiter = serde_json::json!({"ops": {"size": 10, "refill_time": 1000}});
    let (vmm, _) = start_check(&scratch, "patch", requests, limiter)?;
    // Held back: not done in twice the time the check takes without a limit (nor 1 s).
    let held = (free * 2).max(Duration::from_secs(1));
    if vmm.wait_for("done", held).is_ok() {
        return Err(format!(
            "the check finished within {held:?} under a limit of 10 requests a second"
        ));
    }
    vmm.api(
        "PATCH",
        "/drives/check",
        serde_json::json!({"drive_id": "check", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}),
    )?;
    wait_done(&vmm, requests, Duration::from_secs(20))?;
    let (status, body) = support::http::unix_request(&vmm.socket, "GET", "/vm/config", "")?;
    let config: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let ops = &config["drives"][0]["rate_limiter"]["ops"];
    if status != 200 || ops["size"] != 0 {
        return Err(format!("GET /vm/config after the PATCH: {status} {body}"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let trials = vec![
        Trial::test("a_bandwidth_bucket_holds_reads_to_its_rate", || {
            a_bandwidth_bucket_holds_reads_to_its_rate().map_err(Failed::from)
        }),
        Trial::test(
            "an_operations_bucket_and_its_burst_hold_requests_to_their_rate",
            || {
                an_operations_bucket_and_its_burst_hold_requests_to_their_rate()
                    .map_err(Failed::from)
            },
        ),
        Trial::test("patching_a_running_drive_changes_its_limit", || {
            patching_a_running_drive_changes_its_limit().map_err(Failed::from)
        }),
    ];
    replay_vm::run_host_suite_one_at_a_time("rate limits", trials)
}
