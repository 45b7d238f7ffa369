//! MMDS on real KVM with the project's Linux guest: a program in the guest reads the
//! metadata the host put through the API, over TCP to 169.254.169.254 through its network
//! interface, with V1's plain GETs and V2's session tokens; a PATCH is seen at once; and a
//! fresh reapvm that loaded the VM's snapshot keeps MMDS's configuration (V2, its address)
//! but not its data or tokens, as Firecracker does.

use test_support as support;

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use support::function_vm::{FunctionVm, VmSpec, AGENT_PORT};
use support::http::{unix_request, HttpConn};
use support::netns::NetNs;
use support::restore::{api, create_snapshot, set_vm_state, Vmm};
use support::*;

/// An invocation of the guest's `mmds` function: (status, body).
type Invoke<'a> = dyn FnMut(&[u8]) -> Result<(u16, Vec<u8>), String> + 'a;

/// What the guest's `mmds` function answered: its JSON.
fn read_in_guest(invoke: &mut Invoke<'_>, ask: Value) -> Result<Value, String> {
    let (status, body) = invoke(ask.to_string().as_bytes())?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(format!("the mmds function answered {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))
}

fn expect(answer: &Value, status: u64, body: &str) -> Result<(), String> {
    if answer["status"] == status && answer["body"] == body {
        Ok(())
    } else {
        Err(format!("wanted {status} {body:?}, the guest read {answer}"))
    }
}

fn mmds_v1_reads_and_updates_from_the_guest() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("mmds-v1");
    let mut spec = VmSpec::read_only(&guest);
    spec.api = true;
    spec.mmds_config = Some(json!({"network_interfaces": ["eth0"]}));
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let socket = scratch.path("api.sock");
    let metadata = json!({"latest": {"meta-data": {"ami-id": "ami-12345678",
        "local-hostname": "fn-1", "count": 3}}});
    api(&socket, "PUT", "/mmds", metadata.clone())?;
    let (_, stored) = unix_request(&socket, "GET", "/mmds", "")?;
    check(
        serde_json::from_str::<Value>(&stored).ok() == Some(metadata),
        || format!("GET /mmds: {stored}"),
    )?;
    let mut invoke = |body: &[u8]| vm.invoke("mmds", body);
    let read = read_in_guest(&mut invoke, json!({"path": "/latest/meta-data/ami-id"}))?;
    expect(&read, 200, "ami-12345678").map_err(|e| format!("{e}\n{}", vm.describe()))?;
    // IMDS text lists an object's keys; JSON on request.
    let read = read_in_guest(&mut invoke, json!({"path": "/latest/meta-data/"}))?;
    expect(&read, 200, "ami-id\ncount\nlocal-hostname")?;
    let read = read_in_guest(
        &mut invoke,
        json!({"path": "/latest/meta-data/count", "accept": "application/json"}),
    )?;
    expect(&read, 200, "3")?;
    let read = read_in_guest(&mut invoke, json!({"path": "/latest/nothing"}))?;
    expect(&read, 404, "Resource not found: /latest/nothing.")?;
    // A PATCH is what the next read sees.
    api(
        &socket,
        "PATCH",
        "/mmds",
        json!({"latest": {"meta-data": {"ami-id": "ami-87654321", "count": null}}}),
    )?;
    let read = read_in_guest(&mut invoke, json!({"path": "/latest/meta-data/ami-id"}))?;
    expect(&read, 200, "ami-87654321")?;
    let read = read_in_guest(&mut invoke, json!({"path": "/latest/meta-data"}))?;
    expect(&read, 200, "ami-id\nlocal-hostname")?;
    // The interface still carries the guest's other traffic.
    let (status, _) = vm.invoke("helloworld", b"net")?;
    check(status == 200, || format!("helloworld after MMDS: {status}"))?;
    let metrics = support::restore::flushed_metrics(&socket, vm.metrics_path())?;
    check(metrics["mmds"]["rx_count"].as_u64() >= Some(6), || {
        format!("MMDS metrics: {}", metrics["mmds"])
    })?;
    Ok(())
}

fn mmds_v2_tokens_and_a_snapshot_load() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("mmds-v2");
    let mut spec = VmSpec::read_only(&guest);
    spec.api = true;
    spec.function = Some("mmds".into());
    spec.mmds_config = Some(json!({"version": "V2", "network_interfaces": ["eth0"],
        "ipv4_address": "169.254.170.2"}));
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let socket = scratch.path("api.sock");
    api(&socket, "PUT", "/mmds", json!({"secret": "before"}))?;
    let address = "169.254.170.2";
    let mut invoke = |body: &[u8]| vm.invoke("mmds", body);
    let read = read_in_guest(&mut invoke, json!({"path": "/secret", "address": address}))?;
    check(read["status"] == 401, || {
        format!("V2 without a token: {read}")
    })?;
    let read = read_in_guest(
        &mut invoke,
        json!({"path": "/secret", "address": address, "token": "forged"}),
    )?;
    check(read["status"] == 401, || {
        format!("V2 with a forged token: {read}")
    })?;
    let read = read_in_guest(
        &mut invoke,
        json!({"path": "/secret", "address": address, "token_ttl": 600}),
    )?;
    check(read["token_status"] == 200, || format!("token: {read}"))?;
    expect(&read, 200, "before")?;
    let old_token = read["token"].as_str().unwrap_or_default().to_string();
    set_vm_state(&socket, "Paused")?;
    let vmstate = scratch.path("vmstate");
    let mem = scratch.path("memory");
    create_snapshot(&socket, "Full", &vmstate, &mem)?;
    drop(vm);

    let ns = NetNs::with_tap("mmds-restore")?;
    let vmm = Vmm::start(&ns, &scratch.path("restore.sock"))?;
    let (status, answer) = vmm.load(&vmstate, &mem)?;
    check(status == 204, || {
        format!("snapshot/load: {status} {answer}\n{}", vmm.log_tail())
    })?;
    let (_, config) = unix_request(&vmm.socket, "GET", "/vm/config", "")?;
    let config: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
    check(
        config["mmds-config"]["version"] == "V2"
            && config["mmds-config"]["ipv4_address"] == address,
        || format!("the restored mmds-config: {}", config["mmds-config"]),
    )?;
    let (_, data) = unix_request(&vmm.socket, "GET", "/mmds", "")?;
    check(data.trim() == "{}", || {
        format!("the data store came with the snapshot: {data}")
    })?;
    api(&vmm.socket, "PUT", "/mmds", json!({"secret": "after"}))?;
    let mut invoke = |body: &[u8]| -> Result<(u16, Vec<u8>), String> {
        let stream = ns.connect(AGENT_PORT, Duration::from_secs(30))?;
        HttpConn::new(stream, Duration::from_secs(120))?.request("POST", "/invoke", body)
    };
    let read = read_in_guest(
        &mut invoke,
        json!({"path": "/secret", "address": address, "token": old_token}),
    )
    .map_err(|e| format!("{e}\n{}", vmm.log_tail()))?;
    check(read["status"] == 401, || {
        format!("a token from before the snapshot: {read}")
    })?;
    let read = read_in_guest(
        &mut invoke,
        json!({"path": "/secret", "address": address, "token_ttl": 60}),
    )?;
    expect(&read, 200, "after")?;
    Ok(())
}

fn main() -> ExitCode {
    run_kvm_suite("mmds", || {
        vec![
            Trial::test("mmds_v1_reads_and_updates_from_the_guest", || {
                mmds_v1_reads_and_updates_from_the_guest()
            }),
            Trial::test("mmds_v2_tokens_and_a_snapshot_load", || {
                mmds_v2_tokens_and_a_snapshot_load()
            }),
        ]
    })
}
