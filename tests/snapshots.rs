//! Snapshots on real KVM: a function VM with state is paused and snapshotted through the
//! API, a fresh reapvm process loads it (memory file mapped privately) and the function's
//! state carries on; damaged snapshot files are refused with 400 while the VMM stays up.

use test_support as support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use support::function_vm::{FunctionVm, VmSpec, AGENT_PORT};
use support::http::{unix_request, HttpConn};
use support::netns::NetNs;
use support::restore::{api, create_snapshot, flushed_metrics, set_vm_state, Vmm};
use support::*;

/// A counter VM, invoked twice, paused and snapshotted into `scratch`.
fn snapshot_counter_vm(
    guest: &GuestArtifacts,
    scratch: &Scratch,
) -> Result<(PathBuf, PathBuf), Failed> {
    snapshot_counter_vm_with(guest, scratch, 1)
}

fn snapshot_counter_vm_with(
    guest: &GuestArtifacts,
    scratch: &Scratch,
    vcpus: u32,
) -> Result<(PathBuf, PathBuf), Failed> {
    let mut spec = VmSpec::read_only(guest);
    spec.vcpus = vcpus;
    spec.function = Some("counter".into());
    spec.api = true;
    let vm = FunctionVm::boot(guest, &spec, scratch)?;
    for want in [b"1", b"2"] {
        let (status, body) = vm.invoke("counter", b"")?;
        check(status == 200 && body == want, || {
            format!("count: {status} {body:?}")
        })?;
    }
    let socket = scratch.path("api.sock");
    let (status, answer) = unix_request(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    check(status == 204, || format!("pause: {status} {answer}"))?;
    let vmstate = scratch.path("vmstate");
    let mem = scratch.path("memory");
    let body = serde_json::json!({"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": mem});
    let (status, answer) = unix_request(&socket, "PUT", "/snapshot/create", &body.to_string())?;
    check(status == 204, || {
        format!("snapshot/create: {status} {answer}")
    })?;
    // Guest RAM, then the trailer page naming the snapshot.
    check(std::fs::metadata(&mem)?.len() == (256 << 20) + 4096, || {
        "memory file size".into()
    })?;
    Ok((vmstate, mem))
}

/// Which memory backend a restore uses.
enum Backend {
    File,
    OnDemand,
    /// An external handler in this test process, reached over a Unix socket.
    External,
}

fn restore_and_count(backend: Backend) -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("snap");
    let (vmstate, mem) = snapshot_counter_vm(&guest, &scratch)?;
    // The original VM and its namespace are gone; the clone gets a namespace of its own.
    let ns = NetNs::with_tap("restore")?;
    let vmm = Vmm::start(&ns, &scratch.path("restore.sock"))?;
    let metrics_path = scratch.path("metrics.json");
    vmm.put_metrics(&metrics_path)?;
    let started = Instant::now();
    let (status, answer) = match backend {
        Backend::File => vmm.load_with("File", &vmstate, &mem)?,
        Backend::OnDemand => vmm.load_with("OnDemand", &vmstate, &mem)?,
        Backend::External => {
            let socket = scratch.path("uffd.sock");
            let handler = external_handler::listen(&socket, mem.clone())?;
            let answer = vmm.load_with("Uffd", &vmstate, &socket)?;
            handler.wait_connected()?;
            answer
        }
    };
    check(status == 204, || {
        format!("snapshot/load: {status} {answer}")
    })?;
    let load_time = started.elapsed();
    let (_, info) = unix_request(&vmm.socket, "GET", "/", "")?;
    check(info.contains("\"state\":\"Running\""), || info.clone())?;
    let stream = ns.connect(AGENT_PORT, Duration::from_secs(30))?;
    let mut conn = HttpConn::new(stream, Duration::from_secs(120))?;
    let (status, body) = conn.request("POST", "/invoke", b"")?;
    check(status == 200 && body == b"3", || {
        format!(
            "the restored counter answered {status} {:?} (expected 3)",
            String::from_utf8_lossy(&body)
        )
    })?;
    let (status, body) = conn.request("POST", "/invoke", b"")?;
    check(status == 200 && body == b"4", || {
        format!("next count: {status} {body:?}")
    })?;
    eprintln!("snapshot/load answered after {load_time:?} (lab time)");
    let restore = flushed_metrics(&vmm.socket, &metrics_path)?;
    let (backend, mode, serves_faults) = match backend {
        Backend::File => ("File", "file", true),
        Backend::OnDemand => ("OnDemand", "on-demand", true),
        Backend::External => ("Uffd", "external", false),
    };
    let m = &restore["memory_restore"];
    check(m["backend"] == backend && m["mode"] == mode, || {
        format!("memory_restore: {m}")
    })?;
    check(
        restore["latencies_us"]["load_snapshot"].as_u64() > Some(0)
            && m["vmstate_load_us"].as_u64() > Some(0),
        || format!("load latencies missing: {restore}"),
    )?;
    if serves_faults {
        // Two invocations of a Python function touch far more than a hundred pages; a hot
        // memory file's pages come from the page cache (minor faults), a cold one's from disk.
        let served = m["faults_on_demand"].as_u64().unwrap_or(0);
        let minor = m["minor_faults"].as_u64().unwrap_or(0);
        check(served + minor > 100, || {
            format!("faults served on demand: {m}")
        })?;
        if mode == "on-demand" {
            check(served > 100, || {
                format!("the handler served too few faults: {m}")
            })?;
        }
    }
    Ok(())
}

fn count_once(vm: &FunctionVm, want: &[u8]) -> Result<(), String> {
    let (status, body) = vm.invoke("counter", b"")?;
    if status != 200 || body != want {
        return Err(format!(
            "counter answered {status} {:?}, expected {:?}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(want)
        ));
    }
    Ok(())
}

/// Full snapshot at count 1, Diff snapshot at count 2; the Diff's memory applied onto the
/// Full one (rebase-snap) restores a guest that counts on from 2.
fn diff_snapshot_on_top_of_a_full_one() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("snap-diff");
    let mut spec = VmSpec::read_only(&guest);
    spec.function = Some("counter".into());
    spec.api = true;
    spec.track_dirty_pages = true;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let socket = scratch.path("api.sock");
    count_once(&vm, b"1")?;
    set_vm_state(&socket, "Paused")?;
    let (full_state, full_mem) = (scratch.path("full.vmstate"), scratch.path("full.mem"));
    create_snapshot(&socket, "Full", &full_state, &full_mem)?;
    set_vm_state(&socket, "Resumed")?;
    count_once(&vm, b"2")?;
    set_vm_state(&socket, "Paused")?;
    let (diff_state, diff_mem) = (scratch.path("diff.vmstate"), scratch.path("diff.mem"));
    create_snapshot(&socket, "Diff", &diff_state, &diff_mem)?;
    // The same paused VM in full, to hold the rebased memory against.
    let (_, whole_mem) = (scratch.path("whole.vmstate"), scratch.path("whole.mem"));
    create_snapshot(&socket, "Full", &scratch.path("whole.vmstate"), &whole_mem)?;
    drop(vm);

    // The Diff file is sparse: it holds the dirtied pages only.
    let allocated = std::fs::metadata(&diff_mem)?.blocks() * 512;
    check(allocated < (64 << 20), || {
        format!("the Diff memory file has {allocated} bytes allocated; 256 MiB of RAM")
    })?;
    let merged = scratch.path("merged.mem");
    std::fs::copy(&full_mem, &merged)?;
    let out = std::process::Command::new(rebase_snap_bin())
        .arg("--base-file")
        .arg(&merged)
        .arg("--diff-file")
        .arg(&diff_mem)
        .output()?;
    check(out.status.success(), || {
        format!("rebase-snap: {}", String::from_utf8_lossy(&out.stderr))
    })?;
    let (rebased, whole) = (std::fs::read(&merged)?, std::fs::read(&whole_mem)?);
    // Guest RAM is all but the last page, the trailer naming the file's snapshot: the
    // rebased file's must name the Diff's snapshot, whose vmstate it is loaded with.
    let ram_pages = whole.len() / 4096 - 1;
    let diff_trailer = {
        use std::os::unix::fs::FileExt;
        let mut page = vec![0u8; 4096];
        std::fs::File::open(&diff_mem)?.read_exact_at(&mut page, (ram_pages * 4096) as u64)?;
        page
    };
    check(rebased[ram_pages * 4096..] == diff_trailer[..], || {
        "the rebased memory file does not carry the Diff's trailer".into()
    })?;
    let differing: Vec<usize> = (0..ram_pages)
        .filter(|p| rebased[p * 4096..(p + 1) * 4096] != whole[p * 4096..(p + 1) * 4096])
        .collect();
    check(differing.is_empty(), || {
        format!(
            "{} pages of Full + Diff differ from a Full snapshot of the same paused VM (dirty pages missed), first at file offsets {:x?}",
            differing.len(),
            differing.iter().take(8).map(|p| p * 4096).collect::<Vec<_>>()
        )
    })?;

    let ns = NetNs::with_tap("diff")?;
    let vmm = Vmm::start(&ns, &scratch.path("restore.sock"))?;
    let (status, answer) = vmm.load(&diff_state, &merged)?;
    check(status == 204, || {
        format!("load the Diff: {status} {answer}")
    })?;
    let stream = ns.connect(AGENT_PORT, Duration::from_secs(30))?;
    let mut conn = HttpConn::new(stream, Duration::from_secs(120))?;
    let (status, body) = conn.request("POST", "/invoke", b"")?;
    check(status == 200 && body == b"3", || {
        format!(
            "the VM restored from Full + Diff answered {status} {:?} (expected 3)",
            String::from_utf8_lossy(&body)
        )
    })
}

/// A Diff snapshot of a VM that does not track dirty pages is refused, and the VM runs on.
fn diff_snapshot_needs_dirty_tracking() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("snap-nodiff");
    let mut spec = VmSpec::read_only(&guest);
    spec.function = Some("counter".into());
    spec.api = true;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let socket = scratch.path("api.sock");
    set_vm_state(&socket, "Paused")?;
    let body = serde_json::json!({"snapshot_type": "Diff", "snapshot_path": scratch.path("s"), "mem_file_path": scratch.path("m")});
    let (status, answer) = unix_request(&socket, "PUT", "/snapshot/create", &body.to_string())?;
    check(
        status == 400 && answer.contains("track_dirty_pages"),
        || format!("Diff without tracking: {status} {answer}"),
    )?;
    check(!scratch.path("s").exists(), || "a vmstate was left".into())?;
    set_vm_state(&socket, "Resumed")?;
    count_once(&vm, b"1")?;
    Ok(())
}

/// A VMM killed while it writes a snapshot over an earlier one leaves the earlier one
/// whole: both its files untouched, so it loads and counts on from where it was taken; the
/// killed writer's temporary files are removed by the next snapshot into the same paths.
fn a_vmm_killed_mid_snapshot_leaves_the_previous_one_loadable() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("snap-kill");
    let mut spec = VmSpec::read_only(&guest);
    spec.function = Some("counter".into());
    spec.api = true;
    spec.mem_mib = 512;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let socket = scratch.path("api.sock");
    let (vmstate, mem) = (scratch.path("vmstate"), scratch.path("memory"));
    let body = serde_json::json!({"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": mem});
    count_once(&vm, b"1")?;
    set_vm_state(&socket, "Paused")?;
    api(&socket, "PUT", "/snapshot/create", body.clone())?;
    let first_vmstate = std::fs::read(&vmstate)?;
    set_vm_state(&socket, "Resumed")?;
    count_once(&vm, b"2")?;
    set_vm_state(&socket, "Paused")?;

    let temps = |prefix: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&scratch.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let request = {
        let socket = socket.clone();
        let body = body.clone();
        std::thread::spawn(move || {
            unix_request(&socket, "PUT", "/snapshot/create", &body.to_string())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while temps(".memory.reapvm-tmp-").is_empty()
        && !request.is_finished()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    check(!temps(".memory.reapvm-tmp-").is_empty(), || {
        "the second snapshot finished (or never started) before it could be interrupted".into()
    })?;
    let killed = std::process::Command::new("kill")
        .args(["-9", &vm.pid().to_string()])
        .status()?;
    check(killed.success(), || "kill -9 failed".into())?;
    let answer = request.join().map_err(|_| "the request thread panicked")?;
    check(
        answer.is_err() || answer.as_ref().is_ok_and(|(s, _)| *s != 204),
        || format!("the interrupted snapshot was reported written: {answer:?}"),
    )?;
    drop(vm);
    check(std::fs::read(&vmstate)? == first_vmstate, || {
        "the interrupted snapshot changed the previous vmstate".into()
    })?;

    let ns = NetNs::with_tap("kill")?;
    let vmm = Vmm::start(&ns, &scratch.path("restore.sock"))?;
    let (status, answer) = vmm.load(&vmstate, &mem)?;
    check(status == 204, || {
        format!("loading the previous snapshot after the kill: {status} {answer}")
    })?;
    let stream = ns.connect(AGENT_PORT, Duration::from_secs(30))?;
    let mut conn = HttpConn::new(stream, Duration::from_secs(120))?;
    let (status, body) = conn.request("POST", "/invoke", b"")?;
    check(status == 200 && body == b"2", || {
        format!(
            "the previous snapshot's counter answered {status} {:?} (expected 2)",
            String::from_utf8_lossy(&body)
        )
    })?;
    // The next snapshot into the same paths removes what the killed writer left.
    set_vm_state(&vmm.socket, "Paused")?;
    api(
        &vmm.socket,
        "PUT",
        "/snapshot/create",
        body_for(&vmstate, &mem),
    )?;
    check(temps(".memory.reapvm-tmp-").is_empty(), || {
        format!(
            "stale temporary files left: {:?}",
            temps(".memory.reapvm-tmp-")
        )
    })
}

fn body_for(vmstate: &Path, mem: &Path) -> serde_json::Value {
    serde_json::json!({"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": mem})
}

/// An external page-fault handler speaking Firecracker's handshake: it receives the region
/// list (JSON) and the userfaultfd over a Unix socket, then fills faulting pages from the
/// memory file.
mod external_handler {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};
    use std::sync::mpsc::{channel, Receiver};
    use std::time::Duration;

    use userfaultfd::{Event, Uffd};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    /// A guest region: host address, size, offset in the memory file.
    type Region = (u64, u64, u64);

    pub struct Handler {
        connected: Receiver<Result<(), String>>,
    }

    impl Handler {
        pub fn wait_connected(&self) -> Result<(), String> {
            self.connected
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| "the VMM never handed over its userfaultfd".to_string())?
        }
    }

    pub fn listen(socket: &Path, mem_file: PathBuf) -> Result<Handler, String> {
        let listener =
            UnixListener::bind(socket).map_err(|e| format!("bind {}: {e}", socket.display()))?;
        let (tx, connected) = channel();
        std::thread::spawn(move || {
            let setup = (|| -> Result<(Uffd, Vec<Region>), String> {
                let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 4096];
                let (n, fd) = stream
                    .recv_with_fd(&mut buf[..])
                    .map_err(|e| e.to_string())?;
                let fd = fd.ok_or("no file descriptor came with the handshake")?;
                // SAFETY: the descriptor just arrived over SCM_RIGHTS and is a userfaultfd.
                let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
                let regions: serde_json::Value =
                    serde_json::from_slice(&buf[..n]).map_err(|e| e.to_string())?;
                let regions = regions
                    .as_array()
                    .ok_or("the handshake is not a JSON list")?
                    .iter()
                    .map(|r| {
                        let field = |k: &str| r[k].as_u64().ok_or(format!("mapping without {k}"));
                        assert_eq!(field("page_size")?, 4096);
                        Ok((
                            field("base_host_virt_addr")?,
                            field("size")?,
                            field("offset")?,
                        ))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok((uffd, regions))
            })();
            let (uffd, regions) = match setup {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let file = std::fs::File::open(&mem_file).expect("memory file");
            let mut page = vec![0u8; 4096];
            while let Ok(event) = uffd.read_event() {
                let Some(event) = event else {
                    // Firecracker hands over a non-blocking userfaultfd: wait for a fault.
                    let mut pfd = libc::pollfd {
                        fd: uffd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the userfaultfd this thread owns.
                    unsafe { libc::poll(&mut pfd, 1, -1) };
                    continue;
                };
                let Event::Pagefault { addr, .. } = event else {
                    continue;
                };
                let addr = addr as u64 & !4095;
                let Some((base, _, offset)) = regions
                    .iter()
                    .find(|(b, size, _)| addr >= *b && addr < b + size)
                else {
                    continue;
                };
                file.read_exact_at(&mut page, offset + (addr - base))
                    .expect("read the memory file");
                // SAFETY: `addr` is a page of a region the VMM registered; `page` is 4 KiB.
                if unsafe { uffd.copy(page.as_ptr().cast(), addr as *mut _, 4096, true) }.is_err() {
                    let _ = uffd.wake(addr as *mut _, 4096);
                }
            }
        });
        Ok(Handler { connected })
    }
}

/// Four clones of one 2-vCPU snapshot run at once, each with its own tap (renamed through
/// network_overrides) in its own namespace, and each continues the count on its own.
fn four_clones_of_a_two_vcpu_snapshot() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("clones");
    let (vmstate, mem) = snapshot_counter_vm_with(&guest, &scratch, 2)?;
    let mut clones = Vec::new();
    for i in 0..4 {
        let tap = format!("clone{i}");
        let ns = NetNs::with_tap_named("clone", &tap)?;
        let vmm = Vmm::start(&ns, &scratch.path(&format!("clone{i}.sock")))?;
        let body = serde_json::json!({
            "snapshot_path": vmstate,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": tap}],
        });
        let (status, answer) =
            unix_request(&vmm.socket, "PUT", "/snapshot/load", &body.to_string())?;
        check(status == 204, || {
            format!("clone {i}: snapshot/load: {status} {answer}")
        })?;
        clones.push((ns, vmm));
    }
    for (i, (ns, _vmm)) in clones.iter().enumerate() {
        let stream = ns.connect(AGENT_PORT, Duration::from_secs(60))?;
        let mut conn = HttpConn::new(stream, Duration::from_secs(120))?;
        for want in [b"3", b"4"] {
            let (status, body) = conn.request("POST", "/invoke", b"")?;
            check(status == 200 && body == want, || {
                format!(
                    "clone {i} answered {status} {:?}, expected {:?}",
                    String::from_utf8_lossy(&body),
                    want
                )
            })?;
        }
    }
    Ok(())
}

fn damaged_snapshots_are_refused() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("snap-bad");
    let (vmstate, mem) = snapshot_counter_vm(&guest, &scratch)?;
    let good = std::fs::read(&vmstate)?;
    let ns = NetNs::with_tap("bad")?;
    let vmm = Vmm::start(&ns, &scratch.path("bad.sock"))?;

    let flipped = scratch.path("flipped");
    let mut bytes = good.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&flipped, &bytes)?;
    let (status, answer) = vmm.load(&flipped, &mem)?;
    check(
        status == 400 && answer.contains("checksum mismatch"),
        || format!("flipped byte: {status} {answer}"),
    )?;

    let wrong_version = scratch.path("version");
    let mut bytes = good.clone();
    bytes[8] = 99;
    std::fs::write(&wrong_version, &bytes)?;
    let (status, answer) = vmm.load(&wrong_version, &mem)?;
    check(
        status == 400 && answer.contains("format version 99"),
        || format!("wrong version: {status} {answer}"),
    )?;

    let truncated = scratch.path("truncated-memory");
    let file = std::fs::File::create(&truncated)?;
    file.set_len(64 << 20)?;
    let (status, answer) = vmm.load(&vmstate, &truncated)?;
    check(status == 400 && answer.contains("truncated"), || {
        format!("truncated memory: {status} {answer}")
    })?;

    // A snapshot that fails late (a device at another MMIO address than its slot), after
    // the memory backend started its fault handler: the handler must go with the failure.
    let bytes = std::fs::read(&vmstate)?;
    let payload = snapshot::decode(b"REAPVMST", 1, &bytes).map_err(|e| e.to_string())?;
    let mut state: serde_json::Value = serde_json::from_slice(payload)?;
    let addr = state["devices"][0]["addr"]
        .as_u64()
        .ok_or("no device address")?;
    state["devices"][0]["addr"] = serde_json::json!(addr + 0x1000);
    let moved = scratch.path("moved-device");
    std::fs::write(
        &moved,
        snapshot::encode(b"REAPVMST", 1, &serde_json::to_vec(&state)?),
    )?;
    for _ in 0..3 {
        let (status, answer) = vmm.load_with("OnDemand", &moved, &mem)?;
        check(status == 400 && answer.contains("landed at"), || {
            format!("a moved device: {status} {answer}")
        })?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", vmm.pid()))?
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    let handlers = names.iter().filter(|name| name.trim() == "fc_uffd").count();
    check(handlers == 0, || {
        format!("{handlers} page fault handler threads outlived their failed restores: {names:?}")
    })?;

    let (status, info) = unix_request(&vmm.socket, "GET", "/", "")?;
    check(status == 200 && info.contains("Not started"), || {
        format!("the VMM must stay up: {status} {info}")
    })
}

fn main() -> ExitCode {
    run_kvm_suite("snapshots", || {
        vec![
            Trial::test("restored_with_file_backend_continues_its_state", || {
                restore_and_count(Backend::File)
            }),
            Trial::test("restored_with_on_demand_uffd_continues_its_state", || {
                restore_and_count(Backend::OnDemand)
            }),
            Trial::test("restored_through_an_external_uffd_handler", || {
                restore_and_count(Backend::External)
            }),
            Trial::test(
                "four_clones_of_a_two_vcpu_snapshot",
                four_clones_of_a_two_vcpu_snapshot,
            ),
            Trial::test(
                "damaged_snapshots_are_refused",
                damaged_snapshots_are_refused,
            ),
            Trial::test(
                "diff_snapshot_on_top_of_a_full_one",
                diff_snapshot_on_top_of_a_full_one,
            ),
            Trial::test(
                "diff_snapshot_needs_dirty_tracking",
                diff_snapshot_needs_dirty_tracking,
            ),
            Trial::test(
                "a_vmm_killed_mid_snapshot_leaves_the_previous_one_loadable",
                a_vmm_killed_mid_snapshot_leaves_the_previous_one_loadable,
            ),
        ]
    })
}
