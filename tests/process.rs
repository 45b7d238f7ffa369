//! reapvm as a process, as Firecracker's users run it: SIGTERM (and SIGINT) end it with
//! exit code 0 after a last metrics write, and the API socket is gone; before a VM exists
//! and while one runs; `--describe-snapshot` prints a vmstate's format version; a snapshot
//! load after boot configuration is refused as Firecracker refuses it; CPU templates are
//! checked at InstanceStart (another vendor's static template, a leaf KVM lacks) and a
//! custom one boots; a log FIFO nobody reads stalls no request; a refused body names its
//! field on every endpoint. On this host's own KVM with the replay guest (never the lab).

use reapvm_bench::replay_vm;
use test_support as support;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use replay_vm::ReplayVmm;
use support::{Failed, Scratch, Trial};

/// Sends `signal` to `vmm` and checks the ending: exit code 0, no socket, and a metrics
/// line written by the ending itself.
fn ends_cleanly_on(mut vmm: ReplayVmm, signal: i32) -> Result<(), String> {
    let before = vmm.metrics_text().lines().count();
    vmm.signal(signal)?;
    let status = vmm.wait_exit(Duration::from_secs(10));
    if status.and_then(|s| s.code()) != Some(0) {
        return Err(format!(
            "signal {signal}: reapvm ended with {status:?}, not exit code 0\n{}",
            vmm.log_tail()
        ));
    }
    if vmm.socket.exists() {
        return Err(format!(
            "the API socket {} was left behind",
            vmm.socket.display()
        ));
    }
    let metrics = vmm.metrics_text();
    let last = metrics.lines().last().unwrap_or_default();
    let parsed: serde_json::Value = serde_json::from_str(last)
        .map_err(|e| format!("the last metrics line is not JSON ({e}): {last:?}"))?;
    if metrics.lines().count() <= before || parsed.get("api_server").is_none() {
        return Err(format!(
            "no metrics were written on the way out ({before} lines before, now {}): {last:?}",
            metrics.lines().count()
        ));
    }
    if !vmm.log_text().contains("received: writing the metrics") {
        return Err(format!(
            "the log does not say why reapvm ended:\n{}",
            vmm.log_tail()
        ));
    }
    Ok(())
}

fn sigterm_before_a_vm_exists() -> Result<(), String> {
    let scratch = Scratch::new("process-preboot");
    let vmm = ReplayVmm::start(&scratch.dir, "preboot", None)?;
    ends_cleanly_on(vmm, libc::SIGTERM)
}

fn sigterm_and_sigint_while_a_vm_runs() -> Result<(), String> {
    for (signal, tag) in [(libc::SIGTERM, "term"), (libc::SIGINT, "int")] {
        let scratch = Scratch::new(&format!("process-running-{tag}"));
        let trace = replay_vm::synthetic_trace(8 * 256, 200);
        let trace = replay_vm::write_trace(&scratch.dir, &trace)?;
        let config = replay_vm::write_boot_config(&scratch.dir, &trace, 64)?;
        let vmm = ReplayVmm::start(&scratch.dir, tag, Some(&config))?;
        vmm.wait_for("ready", Duration::from_secs(60))?;
        ends_cleanly_on(vmm, signal).map_err(|e| format!("{tag}: {e}"))?;
    }
    Ok(())
}

/// `--describe-snapshot`: the format version of a good vmstate, and a refusal naming the
/// file for a damaged one.
fn describe_snapshot_prints_the_format_version() -> Result<(), String> {
    let scratch = Scratch::new("process-describe");
    let trace = replay_vm::write_trace(&scratch.dir, &replay_vm::synthetic_trace(8 * 256, 200))?;
    let snap = replay_vm::boot_and_snapshot(&scratch.dir, &trace, 64)?;
    let describe = |path: &Path| {
        std::process::Command::new(support::reapvm_bin())
            .arg("--describe-snapshot")
            .arg(path)
            .output()
            .map_err(|e| e.to_string())
    };
    let out = describe(&snap.vmstate)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout.trim() != "v1.0.0" {
        return Err(format!(
            "a good vmstate: {:?}, stdout {stdout:?}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut bytes = std::fs::read(&snap.vmstate).map_err(|e| e.to_string())?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    let damaged = scratch.path("damaged.vmstate");
    std::fs::write(&damaged, bytes).map_err(|e| e.to_string())?;
    let out = describe(&damaged)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !stderr.contains("damaged.vmstate") || !stderr.contains("checksum") {
        return Err(format!(
            "a damaged vmstate: {:?}, stdout {:?}, stderr {stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(())
}

/// As Firecracker: a snapshot load after a boot resource was configured is refused with
/// Firecracker's words, and the VMM stays unstarted; logger and metrics set-up do not count.
fn a_load_after_boot_configuration_is_refused() -> Result<(), String> {
    let scratch = Scratch::new("process-load-after-config");
    let trace = replay_vm::write_trace(&scratch.dir, &replay_vm::synthetic_trace(8 * 256, 200))?;
    let snap = replay_vm::boot_and_snapshot(&scratch.dir, &trace, 64)?;
    let load = serde_json::json!({
        "snapshot_path": snap.vmstate,
        "mem_backend": {"backend_type": "File", "backend_path": snap.memory},
        "resume_vm": true,
    });
    let vmm = ReplayVmm::start(&scratch.dir, "configured", None)?;
    vmm.api(
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64}),
    )?;
    let (status, answer) =
        support::http::unix_request(&vmm.socket, "PUT", "/snapshot/load", &load.to_string())?;
    let words = "Loading a microVM snapshot not allowed after configuring boot-specific resources.";
    if status != 400 || !answer.contains(words) {
        return Err(format!(
            "a load after PUT /machine-config answered {status} {answer}"
        ));
    }
    let (_, info) = support::http::unix_request(&vmm.socket, "GET", "/", "")?;
    if !info.contains("Not started") {
        return Err(format!("the refused load left the VMM in {info}"));
    }
    drop(vmm);
    // Logger and metrics set-up are not boot resources: the load goes ahead.
    let vmm = ReplayVmm::start(&scratch.dir, "logged", None)?;
    vmm.api(
        "PUT",
        "/logger",
        serde_json::json!({"log_path": scratch.path("extra.log"), "level": "Info"}),
    )?;
    vmm.api("PUT", "/snapshot/load", load)?;
    vmm.wait_for("done", Duration::from_secs(60))?;
    Ok(())
}

/// vHive creates the log FIFO and opens its reader later: until then (here: never) the
/// VMM writes its log into the void and the API answers as ever.
fn a_log_fifo_nobody_reads_stalls_nothing() -> Result<(), String> {
    let scratch = Scratch::new("process-log-fifo");
    let fifo = scratch.path("log.fifo");
    let c_path =
        std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the file.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(format!("mkfifo: {}", std::io::Error::last_os_error()));
    }
    let vmm = ReplayVmm::start(&scratch.dir, "fifo", None)?;
    vmm.api(
        "PUT",
        "/logger",
        serde_json::json!({"log_path": fifo, "level": "Debug"}),
    )?;
    let started = std::time::Instant::now();
    // Each request logs a line (about 70 bytes): far more than a pipe's 64 KiB.
    for i in 0..1000 {
        let (status, info) = support::http::unix_request(&vmm.socket, "GET", "/", "")?;
        if status != 200 || !info.contains("Not started") {
            return Err(format!("GET / number {i}: {status} {info}"));
        }
        let (status, _) = support::http::unix_request(&vmm.socket, "PUT", "/bogus", "{}")?;
        if status != 400 {
            return Err(format!("PUT /bogus number {i}: {status}"));
        }
    }
    let took = started.elapsed();
    if took > Duration::from_secs(30) {
        return Err(format!(
            "2000 requests took {took:?} with a log FIFO nobody reads"
        ));
    }
    Ok(())
}

/// A body refused for a bad value names the field, on every endpoint that takes one.
fn bad_bodies_name_their_field() -> Result<(), String> {
    let scratch = Scratch::new("process-bad-bodies");
    let vmm = ReplayVmm::start(&scratch.dir, "bodies", None)?;
    let cases = [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 64}"#,
            "vcpu_count",
        ),
        ("PATCH", "/machine-config", r#"{"smt": "yes"}"#, "smt"),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": 5}"#,
            "kernel_image_path",
        ),
        (
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "/x", "is_root_device": false, "is_read_only": "no"}"#,
            "is_read_only",
        ),
        (
            "PATCH",
            "/drives/d",
            r#"{"drive_id": "d", "rate_limiter": {"ops": {"size": "many"}}}"#,
            "rate_limiter.ops.size",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": 7}"#,
            "host_dev_name",
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"refill_time": -1}}}"#,
            "tx_rate_limiter.bandwidth.refill_time",
        ),
        ("PUT", "/logger", r#"{"level": 3}"#, "level"),
        (
            "PUT",
            "/metrics",
            r#"{"metrics_path": false}"#,
            "metrics_path",
        ),
        (
            "PUT",
            "/entropy",
            r#"{"rate_limiter": {"bandwidth": {"size": -1}}}"#,
            "rate_limiter.bandwidth.size",
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": "three", "uds_path": "/v"}"#,
            "guest_cid",
        ),
        (
            "PUT",
            "/cpu-config",
            r#"{"cpuid_modifiers": "none"}"#,
            "cpuid_modifiers",
        ),
        (
            "PUT",
            "/mmds/config",
            r#"{"version": "V9", "network_interfaces": []}"#,
            "version",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Boot"}"#,
            "action_type",
        ),
        ("PATCH", "/vm", r#"{"state": "Sleeping"}"#, "state"),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": 1, "mem_file_path": "/m"}"#,
            "snapshot_path",
        ),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "resume_vm": "yes"}"#,
            "resume_vm",
        ),
    ];
    for (method, path, body, field) in cases {
        let (status, answer) = support::http::unix_request(&vmm.socket, method, path, body)?;
        if status != 400 || !answer.contains(&format!("field `{field}`")) {
            return Err(format!(
                "{method} {path} {body}: {status} {answer} (should name `{field}`)"
            ));
        }
    }
    let (_, info) = support::http::unix_request(&vmm.socket, "GET", "/", "")?;
    if !info.contains("Not started") {
        return Err(format!("after the refusals: {info}"));
    }
    Ok(())
}

/// The static template of the vendor this host is not, for the refusal.
fn other_vendor_template() -> &'static str {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo.contains("GenuineIntel") {
        "T2A"
    } else {
        "T2"
    }
}

/// As Firecracker: a static template of the other vendor is refused at InstanceStart with
/// Firecracker's words, a custom template naming a CPUID leaf KVM lacks is refused naming
/// it, and each refusal leaves the VMM configurable; a custom template KVM takes boots the
/// guest, and `GET /vm/config` shows it.
fn cpu_templates_are_checked_at_instance_start() -> Result<(), String> {
    let scratch = Scratch::new("process-cpu-template");
    let trace = replay_vm::write_trace(&scratch.dir, &replay_vm::synthetic_trace(8 * 256, 200))?;
    let vmm = ReplayVmm::start(&scratch.dir, "templates", None)?;
    vmm.api(
        "PUT",
        "/boot-source",
        serde_json::json!({"kernel_image_path": replay_vm::replay_guest()?, "initrd_path": trace, "boot_args": "reapvm-replay"}),
    )?;
    let start = || {
        support::http::unix_request(
            &vmm.socket,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        )
    };
    let template = other_vendor_template();
    vmm.api(
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": template}),
    )?;
    let (status, answer) = start()?;
    if status != 400 || !answer.contains("CPU vendor mismatched") {
        return Err(format!(
            "InstanceStart with {template} on this host: {status} {answer}"
        ));
    }
    let missing = serde_json::json!({"cpuid_modifiers": [{"leaf": "0x4fffffff", "subleaf": "0x0", "flags": 0,
        "modifiers": [{"register": "eax", "bitmap": "0b1"}]}]});
    vmm.api("PUT", "/cpu-config", missing)?;
    let (status, answer) = start()?;
    if status != 400 || !answer.contains("0x4fffffff") {
        return Err(format!(
            "InstanceStart with a leaf KVM lacks: {status} {answer}"
        ));
    }
    drop(vmm);
    // Stepping 9 in leaf 1, from the config file: a change KVM takes; the guest runs.
    let config_path = replay_vm::write_boot_config(&scratch.dir, &trace, 64)?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    config["cpu-config"] = serde_json::json!({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
        "modifiers": [{"register": "eax", "bitmap": "0b1001"}]}]});
    std::fs::write(&config_path, config.to_string()).map_err(|e| e.to_string())?;
    let vmm = ReplayVmm::start(&scratch.dir, "custom", Some(&config_path))?;
    vmm.wait_for("ready", Duration::from_secs(60))?;
    let (_, shown) = support::http::unix_request(&vmm.socket, "GET", "/vm/config", "")?;
    if !shown.contains("\"cpu-config\"") || !shown.contains("\"leaf\":\"0x1\"") {
        return Err(format!(
            "GET /vm/config does not show the template: {shown}"
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let trials = vec![
        Trial::test("sigterm_before_a_vm_exists", || {
            sigterm_before_a_vm_exists().map_err(Failed::from)
        }),
        Trial::test("sigterm_and_sigint_while_a_vm_runs", || {
            sigterm_and_sigint_while_a_vm_runs().map_err(Failed::from)
        }),
        Trial::test("a_load_after_boot_configuration_is_refused", || {
            a_load_after_boot_configuration_is_refused().map_err(Failed::from)
        }),
        Trial::test("cpu_templates_are_checked_at_instance_start", || {
            cpu_templates_are_checked_at_instance_start().map_err(Failed::from)
        }),
        Trial::test("describe_snapshot_prints_the_format_version", || {
            describe_snapshot_prints_the_format_version().map_err(Failed::from)
        }),
        Trial::test("a_log_fifo_nobody_reads_stalls_nothing", || {
            a_log_fifo_nobody_reads_stalls_nothing().map_err(Failed::from)
        }),
        Trial::test("bad_bodies_name_their_field", || {
            bad_bodies_name_their_field().map_err(Failed::from)
        }),
    ];
    replay_vm::run_host_suite("process", trials)
}
