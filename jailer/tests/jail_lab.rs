//! A function VM through reapvm-jailer, where KVM boots Linux (hardware KVM or the KVM lab):
//! the counter function boots jailed (user 65534, the jail's network namespace with a tap
//! that user may attach to, the kernel and a read-only bind of the rootfs in the jail),
//! counts once, is snapshotted in the jail; a second jail restores the snapshot, and the
//! counter counts on.

mod common;

use test_support as support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use common::{api, jail, stock, Jailed, NOBODY};
use support::function_vm::AGENT_PORT;
use support::http::HttpConn;
use support::netns::{NetNs, GUEST_IP, HOST_IP, TAP};
use support::{test_boot_args, Failed, GuestArtifacts, Scratch, Trial};

/// A read-only bind mount of a file, undone when dropped.
struct BoundFile(PathBuf);

impl BoundFile {
    fn new(from: &Path, to: &Path) -> Result<Self, String> {
        std::fs::write(to, b"").map_err(|e| format!("{}: {e}", to.display()))?;
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("mount")
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "mount {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        let (from_s, to_s) = (from.to_string_lossy(), to.to_string_lossy());
        run(&["--bind", &from_s, &to_s])?;
        let bound = Self(to.to_path_buf());
        run(&["-o", "remount,bind,ro", &to_s])?;
        Ok(bound)
    }
}

impl Drop for BoundFile {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Asks the jailed agent to count, expecting `want`.
fn count(ns: &NetNs, want: &[u8]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(stream) = ns.connect(AGENT_PORT, Duration::from_secs(5)) {
            if let Ok(mut conn) = HttpConn::new(stream, Duration::from_secs(120)) {
                if let Ok((200, body)) = conn.request("POST", "/invoke", b"") {
                    return if body == want {
                        Ok(())
                    } else {
                        Err(format!(
                            "the counter answered {:?}, expected {:?}",
                            String::from_utf8_lossy(&body),
                            String::from_utf8_lossy(want)
                        ))
                    };
                }
            }
        }
        if Instant::now() > deadline {
            return Err("the jailed function VM never answered".into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn stock_function_jail(
    base: &Path,
    id: &str,
    guest: &GuestArtifacts,
    files: &[(&Path, &str)],
) -> Result<BoundFile, String> {
    let root = stock(base, id, files)?;
    BoundFile::new(&guest.rootfs, &root.join("rootfs.ext4"))
}

fn a_function_vm_boots_snapshots_and_restores_jailed() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("jail-fn");
    let base = scratch.path("jails");
    let ns = NetNs::with_tap_owned("jail", NOBODY)?;
    let netns = format!("/var/run/netns/{}", ns.name);
    let config = scratch.path("vm.json");
    let extra = format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off reapvm.function=counter");
    let body = serde_json::json!({
        "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": test_boot_args(&extra)},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": true}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:ac:10:00:02"}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
    });
    std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;
    let jailer_args = ["--netns", netns.as_str(), "--new-pid-ns", "--daemonize"];

    let id = "fn-boot";
    let _rootfs = stock_function_jail(
        &base,
        id,
        &guest,
        &[(&guest.vmlinux, "vmlinux"), (&config, "vm.json")],
    )?;
    let booted: Jailed = jail(&base, id, &jailer_args, &["--config-file", "/vm.json"])?;
    count(&ns, b"1")?;
    api(
        &booted,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    )?;
    api(
        &booted,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": "/vmstate", "mem_file_path": "/memory"}),
    )?;
    let (vmstate, memory) = (booted.root.join("vmstate"), booted.root.join("memory"));
    drop(booted);

    let id = "fn-restore";
    let _rootfs2 = stock_function_jail(
        &base,
        id,
        &guest,
        &[(&vmstate, "vmstate"), (&memory, "memory")],
    )?;
    let restored = jail(&base, id, &jailer_args, &[])?;
    api(
        &restored,
        "PUT",
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": "/vmstate",
            "mem_backend": {"backend_type": "File", "backend_path": "/memory"},
            "resume_vm": true,
        }),
    )?;
    count(&ns, b"2")?;
    Ok(())
}

fn main() -> ExitCode {
    support::run_kvm_suite("jail_lab", || {
        vec![Trial::test(
            "a_function_vm_boots_snapshots_and_restores_jailed",
            a_function_vm_boots_snapshots_and_restores_jailed,
        )]
    })
}
