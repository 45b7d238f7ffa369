//! Firecracker's clients drive reapvm unmodified. Firecracker's Python client from PyPI
//! (`firecracker-python`, installed by `resources/clients/build-python-client.sh`)
//! configures a VM with vsock, MMDS V2 and a drive rate limiter through its own API class
//! (`tests/clients/firecracker_python.py`), starts it, snapshots it, and loads the snapshot
//! into a fresh reapvm; in between, the guest answers over TCP and vsock and reads MMDS.

use test_support as support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::function_vm::AGENT_PORT;
use support::http::{vsock_connect, HttpConn};
use support::netns::{NetNs, GUEST_IP, HOST_IP, TAP};
use support::restore::Vmm;
use support::*;

const AGENT_VSOCK_PORT: u32 = 8080;
const GUEST_MAC: &str = "06:00:ac:10:00:02";

/// The client's interpreter, from `target/clients/clients.env` (or `REAPVM_PYTHON_CLIENT`).
fn python_client() -> Result<PathBuf, String> {
    let env_file = repo_root().join("target/clients/clients.env");
    let python = std::env::var("REAPVM_PYTHON_CLIENT").ok().or_else(|| {
        std::fs::read_to_string(&env_file)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("REAPVM_PYTHON_CLIENT=").map(str::to_string))
    });
    match python.map(PathBuf::from) {
        Some(path) if path.exists() => Ok(path),
        _ => Err(format!(
            "Firecracker's Python client is not installed ({} names none that exists): run \
             scripts/test.sh, or resources/clients/build-python-client.sh",
            env_file.display()
        )),
    }
}

/// One step of `tests/clients/firecracker_python.py`: the VM's configuration it printed.
fn client_step(python: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<Value, String> {
    let script = repo_root().join("tests/clients/firecracker_python.py");
    let out = Command::new(python)
        .arg(&script)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "the Python client's step {:?} failed ({}):\n{stdout}\n{}",
            args[0].as_ref(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("the client printed {last:?}: {e}"))
}

fn wait_ready(ns: &NetNs, vmm: &Vmm, deadline: Duration) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Ok(stream) = ns.connect(AGENT_PORT, Duration::from_secs(1)) {
            if let Ok(mut conn) = HttpConn::new(stream, Duration::from_secs(30)) {
                if let Ok((200, _)) = conn.request("GET", "/ready", b"") {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!(
        "the agent was not ready after {deadline:?}\n{}",
        vmm.log_tail()
    ))
}

/// The guest's `mmds` function reads `/latest/meta-data/ami-id`: with a V2 token, or
/// (`with_token` false) without one, which V2 refuses.
fn ami_id_in_guest(ns: &NetNs, with_token: bool) -> Result<String, String> {
    let stream = ns.connect(AGENT_PORT, Duration::from_secs(30))?;
    let mut ask = json!({"path": "/latest/meta-data/ami-id"});
    if with_token {
        ask["token_ttl"] = json!(60);
    }
    let (status, body) = HttpConn::new(stream, Duration::from_secs(120))?.request(
        "POST",
        "/invoke/mmds",
        ask.to_string().as_bytes(),
    )?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let answer: Value = serde_json::from_str(&text)
        .map_err(|_| format!("the mmds function answered {status}: {text}"))?;
    let want = if with_token { 200 } else { 401 };
    if answer["status"] != want {
        return Err(format!("MMDS answered the guest (wanted {want}): {answer}"));
    }
    Ok(answer["body"].as_str().unwrap_or_default().to_string())
}

fn hello_over_vsock(uds_path: &Path) -> Result<String, String> {
    let (stream, _) = vsock_connect(uds_path, AGENT_VSOCK_PORT)?;
    let (status, body) = HttpConn::over_unix(stream, Duration::from_secs(120))?.request(
        "POST",
        "/invoke/helloworld",
        b"vsock",
    )?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(format!("helloworld over vsock: {status} {text}"));
    }
    Ok(text)
}

fn firecracker_python_client_drives_a_vm() -> Result<(), Failed> {
    let python = python_client()?;
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("pyclient");
    let ns = NetNs::with_tap("pyclient")?;
    let uds_path = scratch.path("v.sock");
    let log_path = scratch.path("reapvm.log");
    let boot_args = test_boot_args(&format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"));
    let spec = json!({
        "kernel": guest.vmlinux, "boot_args": boot_args, "rootfs": guest.rootfs,
        "tap": TAP, "guest_mac": GUEST_MAC, "uds_path": uds_path, "log_path": log_path,
        "mem_mib": 256,
        "metadata": {"latest": {"meta-data": {"ami-id": "ami-before"}}},
    });
    let spec_path = scratch.write("spec.json", spec.to_string());

    let vmm = Vmm::start(&ns, &scratch.path("api.sock"))?;
    let config = client_step(&python, &[&"configure", &vmm.socket, &spec_path])?;
    let limiter = &config["drives"][0]["rate_limiter"];
    check(
        limiter["bandwidth"]["size"] == 64 << 20 && limiter["ops"]["size"] == 20000,
        || format!("the drive's rate limiter in GET /vm/config: {limiter}"),
    )?;
    check(config["mmds-config"]["version"] == "V2", || {
        format!("mmds-config: {}", config["mmds-config"])
    })?;
    wait_ready(&ns, &vmm, Duration::from_secs(200))?;
    let ami = ami_id_in_guest(&ns, true).map_err(|e| format!("{e}\n{}", vmm.log_tail()))?;
    check(ami == "ami-before", || format!("the guest read {ami:?}"))?;
    ami_id_in_guest(&ns, false)?;
    let hello = hello_over_vsock(&uds_path)?;
    check(hello.contains("vsock"), || format!("helloworld: {hello}"))?;

    let vmstate = scratch.path("vmstate");
    let mem = scratch.path("memory");
    client_step(&python, &[&"snapshot", &vmm.socket, &vmstate, &mem])?;
    drop(vmm);

    let vmm = Vmm::start(&ns, &scratch.path("restore.sock"))?;
    let metadata = json!({"latest": {"meta-data": {"ami-id": "ami-after"}}}).to_string();
    let config = client_step(
        &python,
        &[&"load", &vmm.socket, &vmstate, &mem, &metadata, &TAP],
    )
    .map_err(|e| format!("{e}\n{}", vmm.log_tail()))?;
    check(config["vsock"]["guest_cid"] == 3, || {
        format!("the restored VM's vsock: {}", config["vsock"])
    })?;
    let ami = ami_id_in_guest(&ns, true).map_err(|e| format!("{e}\n{}", vmm.log_tail()))?;
    check(ami == "ami-after", || {
        format!("after the load the guest read {ami:?}")
    })?;
    let hello = hello_over_vsock(&uds_path)?;
    check(hello.contains("vsock"), || format!("helloworld: {hello}"))?;
    Ok(())
}

fn main() -> ExitCode {
    run_kvm_suite("clients", || {
        vec![Trial::test("firecracker_python_client_drives_a_vm", || {
            firecracker_python_client_drives_a_vm()
        })]
    })
}
