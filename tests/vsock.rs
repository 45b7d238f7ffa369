//! virtio-vsock on real KVM with the project's Linux guest: invocations reach the agent
//! through Firecracker's host-initiated handshake (`CONNECT 8080` on the VM's `uds_path`),
//! the guest connects to a host program listening on `uds_path_PORT`, large transfers
//! both ways pass the device's credit window many times over, and both kinds of connection
//! work again in a fresh reapvm that loaded the VM's snapshot.

use test_support as support;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::Duration;

use support::function_vm::{FunctionVm, VmSpec};
use support::http::{unix_request, vsock_connect, HttpConn};
use support::netns::NetNs;
use support::restore::{create_snapshot, set_vm_state, Vmm};
use support::*;

const AGENT_VSOCK_PORT: u32 = 8080;
/// More than the device's 64 KiB credit window and the guest's 256 KiB, several times.
const BIG: usize = 3 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7) ^ ((i >> 12) as u8) ^ seed)
        .collect()
}

/// An invocation over vsock: (status, body).
fn invoke_over_vsock(
    uds_path: &Path,
    function: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let (stream, host_port) = vsock_connect(uds_path, AGENT_VSOCK_PORT)?;
    if host_port < 1 << 30 {
        return Err(format!(
            "host port {host_port} is below Firecracker's range (2^30 up)"
        ));
    }
    HttpConn::over_unix(stream, Duration::from_secs(300))?.request(
        "POST",
        &format!("/invoke/{function}"),
        body,
    )
}

/// A host program on `uds_path_PORT` for one guest connection: reads to the end, answers
/// the bytes reversed, and returns what it read.
fn host_listener(
    uds_path: &Path,
    port: u32,
) -> Result<JoinHandle<Result<Vec<u8>, String>>, String> {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("listen on {path:?}: {e}"))?;
    Ok(std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        stream
            .read_to_end(&mut got)
            .map_err(|e| format!("host listener read: {e}"))?;
        let reply: Vec<u8> = got.iter().rev().copied().collect();
        stream
            .write_all(&reply)
            .map_err(|e| format!("host listener write: {e}"))?;
        Ok(got)
    }))
}

/// The guest connects to host port `port` through `vsockping`, invoked over vsock itself,
/// sending `data`; the host listener must get `data` and the guest its reversal.
fn guest_connects_to_the_host(uds_path: &Path, port: u32, data: &[u8]) -> Result<(), String> {
    let listener = host_listener(uds_path, port)?;
    let mut body = format!("{port}\n").into_bytes();
    body.extend_from_slice(data);
    let (status, answer) = invoke_over_vsock(uds_path, "vsockping", &body)?;
    let got = listener
        .join()
        .map_err(|_| "the host listener panicked".to_string())??;
    if got != data {
        return Err(format!(
            "the host listener got {} bytes, the guest sent {}",
            got.len(),
            data.len()
        ));
    }
    let want: Vec<u8> = data.iter().rev().copied().collect();
    if status != 200 || answer != want {
        return Err(format!(
            "vsockping answered {status} with {} bytes (want {}): {:?}",
            answer.len(),
            want.len(),
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        ));
    }
    Ok(())
}

fn invocations_and_guest_connections_over_vsock() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("vsock");
    let uds_path = scratch.path("v.sock");
    let mut spec = VmSpec::read_only(&guest);
    spec.vsock = Some(uds_path.clone());
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    check(
        vm.console()
            .contains("listening on vsock port 8080 (CID 3)"),
        || vm.describe(),
    )?;
    // A small invocation, then a large answer (guest to host, past the host's credit).
    let (status, body) = invoke_over_vsock(&uds_path, "helloworld", b"vsock")
        .map_err(|e| format!("{e}\n{}", vm.describe()))?;
    check(status == 200 && body == b"Hello, vsock!", || {
        format!(
            "helloworld over vsock: {status} {:?}",
            String::from_utf8_lossy(&body)
        )
    })?;
    let (status, body) = invoke_over_vsock(&uds_path, "blob", BIG.to_string().as_bytes())?;
    let want: Vec<u8> = (0..BIG).map(|i| i as u8).collect();
    check(status == 200 && body == want, || {
        format!(
            "blob {BIG} over vsock: {status}, {} bytes, equal: {}",
            body.len(),
            body == want
        )
    })?;
    // Several invocations on one kept-alive vsock connection.
    let (stream, _) = vsock_connect(&uds_path, AGENT_VSOCK_PORT)?;
    let mut conn = HttpConn::over_unix(stream, Duration::from_secs(120))?;
    for i in 0..20 {
        let name = format!("n{i}");
        let (status, body) = conn.request("POST", "/invoke/helloworld", name.as_bytes())?;
        check(
            status == 200 && body == format!("Hello, {name}!").as_bytes(),
            || format!("invocation {i} on one connection: {status}"),
        )?;
    }
    // The guest connects out, a large body both ways (host to guest past the guest's credit).
    guest_connects_to_the_host(&uds_path, 5000, &pattern(BIG, 1))?;
    guest_connects_to_the_host(&uds_path, 5001, b"short")?;
    // A port nobody listens on: the guest's connection is refused with RST.
    let (status, body) = invoke_over_vsock(&uds_path, "vsockping", b"5999\nnobody")?;
    let text = String::from_utf8_lossy(&body);
    check(status == 500 && text.contains("Connection"), || {
        format!("a connection to an unheard port answered {status} {text}")
    })?;
    // A guest port nobody listens on: the host connection is closed without OK.
    match vsock_connect(&uds_path, 7) {
        Err(e) if e.contains("not OK") => {}
        other => return Err(format!("CONNECT 7 (no listener) gave {other:?}").into()),
    }
    // The TCP path still works beside it.
    let (status, _) = vm.invoke("helloworld", b"tcp")?;
    check(status == 200, || format!("helloworld over TCP: {status}"))
}

fn vsock_works_again_after_a_snapshot_load() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("vsock-snap");
    let uds_path = scratch.path("v.sock");
    let mut spec = VmSpec::read_only(&guest);
    spec.vsock = Some(uds_path.clone());
    spec.function = Some("counter".into());
    spec.api = true;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let (status, body) = invoke_over_vsock(&uds_path, "counter", b"")
        .map_err(|e| format!("{e}\n{}", vm.describe()))?;
    check(status == 200 && body == b"1", || {
        format!("count over vsock: {status} {body:?}")
    })?;
    // A connection open when the snapshot is taken: the restored guest must drop it.
    let (open, _) = vsock_connect(&uds_path, AGENT_VSOCK_PORT)?;
    let socket = scratch.path("api.sock");
    set_vm_state(&socket, "Paused")?;
    let vmstate = scratch.path("vmstate");
    let mem = scratch.path("memory");
    create_snapshot(&socket, "Full", &vmstate, &mem)?;
    // The original keeps its connections: resumed, the open one still works.
    set_vm_state(&socket, "Resumed")?;
    let mut kept = HttpConn::over_unix(open, Duration::from_secs(60))?;
    let (status, body) = kept.request("POST", "/invoke/counter", b"")?;
    check(status == 200 && body == b"2", || {
        format!("the original's open connection after the snapshot: {status} {body:?}")
    })?;
    drop(vm);
    // A fresh reapvm loads it, listening where vsock_override says.
    let ns = NetNs::with_tap("vsock-restore")?;
    let vmm = Vmm::start(&ns, &scratch.path("restore.sock"))?;
    let new_uds = scratch.path("v2.sock");
    let debug_log = scratch.path("debug.log");
    std::fs::write(&debug_log, "")?;
    support::restore::api(
        &vmm.socket,
        "PUT",
        "/logger",
        serde_json::json!({"log_path": debug_log, "level": "Debug"}),
    )?;
    let load = serde_json::json!({
        "snapshot_path": vmstate,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "vsock_override": {"uds_path": new_uds},
        "resume_vm": false,
    });
    let (status, answer) = vmm.load_body(&load)?;
    check(status == 204, || {
        format!("snapshot/load: {status} {answer}\n{}", vmm.log_tail())
    })?;
    // Loaded paused: the devices are paused too, and the guest is told nothing yet.
    std::thread::sleep(Duration::from_secs(1));
    let log = std::fs::read_to_string(&debug_log)?;
    check(!log.contains("transport was reset"), || {
        format!("a paused VM's vsock device wrote to the guest:\n{log}")
    })?;
    set_vm_state(&vmm.socket, "Resumed")?;
    let (status, body) = invoke_over_vsock(&new_uds, "counter", b"").map_err(|e| {
        format!(
            "{e}\n{}\n{}",
            std::fs::read_to_string(&debug_log).unwrap_or_default(),
            vmm.log_tail()
        )
    })?;
    check(status == 200 && body == b"2", || {
        format!("the restored counter over vsock: {status} {body:?} (want 2)")
    })?;
    guest_connects_to_the_host(&new_uds, 5002, &pattern(300 << 10, 2))
        .map_err(|e| format!("{e}\n{}", vmm.log_tail()))?;
    let log = std::fs::read_to_string(&debug_log)?;
    check(
        log.contains("the guest was told its transport was reset")
            && log.contains("the guest handled the transport reset"),
        || format!("the transport reset is not in the log:\n{log}"),
    )?;
    // GET /vm/config shows where the device listens now.
    let (_, config) = unix_request(&vmm.socket, "GET", "/vm/config", "")?;
    check(config.contains(&*new_uds.to_string_lossy()), || {
        config.clone()
    })?;
    Ok(())
}

fn main() -> ExitCode {
    run_kvm_suite("vsock", || {
        vec![
            Trial::test("invocations_and_guest_connections_over_vsock", || {
                invocations_and_guest_connections_over_vsock()
            }),
            Trial::test("vsock_works_again_after_a_snapshot_load", || {
                vsock_works_again_after_a_snapshot_load()
            }),
        ]
    })
}
