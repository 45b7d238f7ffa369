//! The Firecracker API over a Unix socket, on real KVM: configure and start a VM through it,
//! stop the guest with SendCtrlAltDel, and refuse bad requests with 400 and a fault message.

use test_support as support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::http::unix_request;
use support::*;

struct ApiVmm {
    child: Child,
    socket: PathBuf,
    console: Arc<Mutex<String>>,
}

impl ApiVmm {
    fn start(scratch: &Scratch) -> Result<Self, String> {
        let socket = scratch.path("api.sock");
        let mut child = std::process::Command::new(reapvm_bin())
            .args(["--api-sock"])
            .arg(&socket)
            .args(["--id", "api-test"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let console = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().unwrap();
        let sink = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        wait_for_socket(&socket, Duration::from_secs(10))?;
        Ok(Self {
            child,
            socket,
            console,
        })
    }

    fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        unix_request(&self.socket, method, path, body)
    }

    fn expect(&self, method: &str, path: &str, body: &str, status: u16) -> Result<String, Failed> {
        let (got, answer) = self.call(method, path, body)?;
        check(got == status, || {
            format!("{method} {path}: expected {status}, got {got} {answer}")
        })?;
        Ok(answer)
    }

    fn wait_console(&self, needle: &str, deadline: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.console.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn configure(vmm: &ApiVmm, guest: &GuestArtifacts) -> Result<(), Failed> {
    vmm.expect(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
        204,
    )?;
    let boot = serde_json::json!({
        "kernel_image_path": guest.vmlinux,
        "initrd_path": guest.initramfs,
        "boot_args": test_boot_args(""),
    });
    vmm.expect("PUT", "/boot-source", &boot.to_string(), 204)?;
    Ok(())
}

fn start_through_api_and_ctrl_alt_del() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("api-boot");
    let mut vmm = ApiVmm::start(&scratch)?;
    let info = vmm.expect("GET", "/", "", 200)?;
    check(
        info.contains("\"state\":\"Not started\"") && info.contains("\"id\":\"api-test\""),
        || info.clone(),
    )?;
    configure(&vmm, &guest)?;
    vmm.expect(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        204,
    )?;
    let info = vmm.expect("GET", "/", "", 200)?;
    check(info.contains("\"state\":\"Running\""), || info.clone())?;
    let config = vmm.expect("GET", "/vm/config", "", 200)?;
    check(config.contains("\"mem_size_mib\":128"), || config.clone())?;
    check(
        vmm.wait_console("reapvm-agent: ready", Duration::from_secs(240)),
        || {
            format!(
                "the guest never became ready:\n{}",
                vmm.console.lock().unwrap()
            )
        },
    )?;
    vmm.expect(
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
        204,
    )?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = vmm.child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(120) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = vmm.console.lock().unwrap().clone();
    check(status.and_then(|s| s.code()) == Some(0), || {
        format!("reapvm should exit 0 after Ctrl-Alt-Del, got {status:?}; console:\n{console}")
    })?;
    check(console.contains("shutdown requested"), || {
        format!("the agent never saw Ctrl-Alt-Del:\n{console}")
    })?;
    check(!Path::new(&vmm.socket).exists(), || {
        "the API socket was left behind".into()
    })
}

fn bad_requests_get_400_and_a_fault_message() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("api-bad");
    let vmm = ApiVmm::start(&scratch)?;
    let fault = |answer: &str| {
        serde_json::from_str::<serde_json::Value>(answer)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(str::to_string))
    };
    let cases: [(&str, &str, &str, &str); 6] = [
        ("PUT", "/machine-config", "{not json", "not valid JSON"),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
            "vcpu_count 0 is out of range",
        ),
        (
            "GET",
            "/nonexistent",
            "",
            "Invalid request method and/or path",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
            "/nonexistent/vmlinux",
        ),
        (
            "PUT",
            "/drives/d",
            r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": false}"#,
            "does not match",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            "`boot-source` is missing",
        ),
    ];
    for (method, path, body, want) in cases {
        let answer = vmm.expect(method, path, body, 400)?;
        check(fault(&answer).is_some_and(|m| m.contains(want)), || {
            format!("{method} {path}: fault should mention {want:?}: {answer}")
        })?;
    }
    // The VMM is still up and still configurable after all of that, and boots.
    configure(&vmm, &guest)?;
    vmm.expect(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        204,
    )?;
    let answer = vmm.expect(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128}"#,
        400,
    )?;
    check(answer.contains("not supported after starting"), || {
        answer.clone()
    })?;
    let answer = vmm.expect(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        400,
    )?;
    check(answer.contains("already running"), || answer.clone())
}

/// Pausing stops the guest (an invocation sent while paused gets no answer) and resuming
/// lets it finish, with the function's state intact.
fn pause_and_resume_a_function_vm() -> Result<(), Failed> {
    use support::function_vm::{FunctionVm, VmSpec};
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("api-pause");
    let mut spec = VmSpec::read_only(&guest);
    spec.function = Some("counter".into());
    spec.api = true;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let socket = scratch.path("api.sock");
    let api = |method: &str, path: &str, body: &str| unix_request(&socket, method, path, body);
    let (status, body) = vm.invoke("counter", b"")?;
    check(status == 200 && body == b"1", || {
        format!("first count: {status} {body:?}")
    })?;

    // Connect first: a paused guest cannot answer a TCP handshake either.
    let mut conn = vm.conn()?;
    let (status, answer) = api("PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    check(status == 204, || format!("pause: {status} {answer}"))?;
    let (_, info) = api("GET", "/", "")?;
    check(info.contains("\"state\":\"Paused\""), || info.clone())?;

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(conn.request("POST", "/invoke", b""));
    });
    std::thread::sleep(Duration::from_secs(3));
    check(rx.try_recv().is_err(), || {
        "a paused guest answered an invocation".into()
    })?;

    let (status, answer) = api("PATCH", "/vm", r#"{"state": "Resumed"}"#)?;
    check(status == 204, || format!("resume: {status} {answer}"))?;
    let answered = rx
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| "no answer after resume")??;
    check(answered == (200, b"2".to_vec()), || {
        format!("count after resume: {answered:?}")
    })?;
    let (status, body) = vm.invoke("counter", b"")?;
    check(status == 200 && body == b"3", || {
        format!("third count: {status} {body:?}")
    })?;
    let (status, answer) = api("PATCH", "/vm", r#"{"state": "Resumed"}"#)?;
    check(status == 400 && answer.contains("not paused"), || {
        format!("resume twice: {status} {answer}")
    })
}

fn live_socket_is_not_taken_over() -> Result<(), Failed> {
    let scratch = Scratch::new("api-busy");
    let first = ApiVmm::start(&scratch)?;
    let out = run_command(
        std::process::Command::new(reapvm_bin())
            .args(["--api-sock"])
            .arg(&first.socket),
        Duration::from_secs(30),
    );
    check(
        out.code == Some(1) && out.stderr.contains("cannot bind the API socket"),
        || out.describe(),
    )?;
    first.expect("GET", "/", "", 200).map(|_| ())
}

fn main() -> ExitCode {
    run_kvm_suite("api", || {
        vec![
            Trial::test(
                "start_through_api_and_ctrl_alt_del",
                start_through_api_and_ctrl_alt_del,
            ),
            Trial::test(
                "bad_requests_get_400_and_a_fault_message",
                bad_requests_get_400_and_a_fault_message,
            ),
            Trial::test(
                "live_socket_is_not_taken_over",
                live_socket_is_not_taken_over,
            ),
            Trial::test(
                "pause_and_resume_a_function_vm",
                pause_and_resume_a_function_vm,
            ),
        ]
    })
}
