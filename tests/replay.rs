//! The replay guest on this host's own KVM (directly, never in the KVM lab: it runs in guest
//! user mode, which kvm-pvm hosts run natively): it boots, is snapshotted, and every memory
//! backend restores it to a replay that reads back exactly what the trace says (checksum);
//! REAP's prefetch serves its pages without faults; a trace outside guest memory is refused.

use reapvm_bench::replay_vm;
use test_support as support;

use std::path::Path;
use std::process::ExitCode;

use replay_vm::{boot_and_snapshot, restore_and_replay, ReplayVmm};
use snapshot::replay_trace::{Touch, Trace, TraceError, GUEST_RESERVED_PAGES};
use support::{Failed, Scratch, Trial};

const MEM_MIB: u64 = 64;
/// Pages the synthetic trace may use: 2 MiB .. 56 MiB (the initrd sits at the top).
const TRACE_PAGES: u64 = 56 * 256;

/// A function-like trace: data in most pages, 3000 touches in a seeded order, some writes.
fn synthetic_trace() -> Trace {
    replay_vm::synthetic_trace(TRACE_PAGES, 3000)
}

fn write_trace(dir: &Path, trace: &Trace) -> Result<std::path::PathBuf, String> {
    replay_vm::write_trace(dir, trace)
}

fn every_backend_replays_the_trace() -> Result<(), String> {
    let scratch = Scratch::new("replay");
    let trace = synthetic_trace();
    trace.check_fits(MEM_MIB * 256).map_err(|e| e.to_string())?;
    let expected = trace.expected_checksum();
    let snap = boot_and_snapshot(&scratch.dir, &write_trace(&scratch.dir, &trace)?, MEM_MIB)?;
    let mem = &snap.memory;
    let backends = [
        (
            "File",
            serde_json::json!({"backend_type": "File", "backend_path": mem}),
            None,
        ),
        (
            "OnDemand",
            serde_json::json!({"backend_type": "OnDemand", "backend_path": mem}),
            None,
        ),
        (
            "OnDemand (fault-around)",
            serde_json::json!({"backend_type": "OnDemand", "backend_path": mem, "fault_around_kib": 64}),
            None,
        ),
        (
            "Reap (record)",
            serde_json::json!({"backend_type": "Reap", "backend_path": mem}),
            Some("record"),
        ),
        (
            "Reap (prefetch)",
            serde_json::json!({"backend_type": "Reap", "backend_path": mem}),
            Some("prefetch"),
        ),
        (
            "Reap (prefetch, all options)",
            serde_json::json!({"backend_type": "Reap", "backend_path": mem,
                "reap_options": {"fetch_in_parallel": true, "o_direct": true, "chunked_install": true}}),
            Some("prefetch"),
        ),
        (
            "Reap (prefetch, streamed)",
            serde_json::json!({"backend_type": "Reap", "backend_path": mem,
                "reap_options": {"streaming": true, "o_direct": true}}),
            Some("prefetch"),
        ),
        (
            "Reap (prefetch, streamed, fault-around)",
            serde_json::json!({"backend_type": "Reap", "backend_path": mem,
                "reap_options": {"streaming": true, "o_direct": true, "fault_around_kib": 64}}),
            Some("prefetch"),
        ),
    ];
    let mut on_demand_faults = 0;
    for (label, backend, mode) in backends {
        let run = restore_and_replay(&scratch.dir, &snap, backend, true)?;
        if run.checksum != expected {
            return Err(format!(
                "{label}: checksum {:#010x}, the trace says {expected:#010x}",
                run.checksum
            ));
        }
        if let Some(mode) = mode {
            if run.backend_mode != mode || run.ws_error.is_some() {
                return Err(format!(
                    "{label}: mode {:?}, WS error {:?}",
                    run.backend_mode, run.ws_error
                ));
            }
        }
        match label {
            "OnDemand" => {
                on_demand_faults = run.faults_on_demand;
                // Every touched page (and the guest's own few) comes through userfaultfd.
                if on_demand_faults < trace.touches.len() as u64 {
                    return Err(format!(
                        "OnDemand served {on_demand_faults} faults for {} touches",
                        trace.touches.len()
                    ));
                }
            }
            // A fifth of the pages touched, scattered: most 64 KiB blocks hold several
            // touched pages, which one fault brings in together.
            "OnDemand (fault-around)"
                if run.faults_on_demand * 2 > on_demand_faults
                    || run.bytes_read < run.faults_on_demand * 8 * 4096 =>
            {
                return Err(format!(
                    "{label}: {} faults reading {} bytes, against OnDemand's {on_demand_faults} faults: no fault-around",
                    run.faults_on_demand, run.bytes_read
                ));
            }
            "Reap (prefetch)"
            | "Reap (prefetch, streamed)"
            | "Reap (prefetch, streamed, fault-around)"
                if run.faults_on_demand * 100 > on_demand_faults * 3 =>
            {
                return Err(format!(
                    "{label} left {} faults on demand, over 3% of OnDemand's {on_demand_faults}",
                    run.faults_on_demand
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A write touch replays as the function's first write did: one fault on a private file
/// mapping. A read then a write would take two (the cached page mapped read-only, then
/// copied on write), doubling File's faults for the 80-98% of touches that are writes.
fn a_write_touch_faults_once_with_file() -> Result<(), String> {
    let scratch = Scratch::new("replay-writes");
    // Pages 17 apart: the host's fault-around (16 pages) cannot map one touch's page while
    // serving another's, so every page's faults are its own.
    let pages: Vec<u64> = (GUEST_RESERVED_PAGES..TRACE_PAGES).step_by(17).collect();
    let trace = Trace {
        fills: pages.iter().map(|&p| (p, 1)).collect(),
        touches: pages
            .iter()
            .map(|&page| Touch {
                page: page as u32,
                write: true,
                gap: 2000,
            })
            .collect(),
    };
    let expected = trace.expected_checksum();
    let snap = boot_and_snapshot(&scratch.dir, &write_trace(&scratch.dir, &trace)?, MEM_MIB)?;
    let backend = serde_json::json!({"backend_type": "File", "backend_path": snap.memory});
    let run = restore_and_replay(&scratch.dir, &snap, backend, true)?;
    if run.checksum != expected {
        return Err(format!(
            "checksum {:#010x}, expected {expected:#010x}",
            run.checksum
        ));
    }
    let touches = trace.touches.len() as u64;
    // One fault per touched page (a few may have been mapped during the load), plus the
    // VMM's own few; a read then a write would take about twice as many.
    if run.minor_faults < touches / 2 || run.minor_faults > touches + touches / 4 {
        return Err(format!(
            "{} minor faults for {touches} write touches (one each expected)",
            run.minor_faults
        ));
    }
    Ok(())
}

fn a_trace_outside_guest_memory_is_refused() -> Result<(), String> {
    let scratch = Scratch::new("replay-outside");
    let mut trace = synthetic_trace();
    let beyond = (MEM_MIB * 256 + 10) as u32;
    trace.touches.push(Touch {
        page: beyond,
        write: false,
        gap: 0,
    });
    // The host side refuses it...
    match trace.check_fits(MEM_MIB * 256) {
        Err(TraceError::OutsideMemory { page, .. }) if page == u64::from(beyond) => {}
        other => return Err(format!("check_fits: {other:?}")),
    }
    // ...and so does the guest, which stops before it says ready, and the VMM says why.
    let path = write_trace(&scratch.dir, &trace)?;
    let config = |replay_control: bool| -> Result<std::path::PathBuf, String> {
        let config = scratch.path(&format!("vm-{replay_control}.json"));
        let body = serde_json::json!({
            "boot-source": {"kernel_image_path": replay_vm::replay_guest()?, "initrd_path": path, "boot_args": ""},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
            "replay-control": replay_control,
        });
        std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;
        Ok(config)
    };
    let vmm = ReplayVmm::start(&scratch.dir, "boot", Some(&config(true)?))?;
    match vmm.wait_for("ready", std::time::Duration::from_secs(30)) {
        Err(e) if e.contains(&format!("touches page {beyond}, outside guest memory")) => {}
        Err(e) => return Err(format!("unexpected error: {e}")),
        Ok(_) => return Err("the guest accepted a trace outside its memory".into()),
    }
    drop(vmm);
    // Without `replay-control` the VM has no control page: the guest's report goes nowhere.
    let vmm = ReplayVmm::start(&scratch.dir, "no-control", Some(&config(false)?))?;
    match vmm.wait_for("ready", std::time::Duration::from_secs(3)) {
        Err(e) if e.contains("was not ready after") => Ok(()),
        other => Err(format!(
            "a VM without replay-control had the replay control page: {other:?}"
        )),
    }
}

/// reapvm's virtio-blk, driven by the replay guest's DMA check at real speed on this host's
/// KVM: 70,000 reads (past the 16-bit ring index wrap) into scattered buffers split over
/// up to three descriptors, descriptors recycled shuffled; every byte read and every guard
/// byte around the buffers and in the rest of guest memory checked by the guest.
fn virtio_block_dma_lands_only_in_its_buffers() -> Result<(), String> {
    const REQUESTS: u32 = 70_000;
    let scratch = Scratch::new("virtio-check");
    let disk = scratch.path("disk.img");
    replay_vm::write_pattern_disk(&disk, 16)?;
    let config = scratch.path("vm.json");
    let body = serde_json::json!({
        "boot-source": {
            "kernel_image_path": replay_vm::replay_guest()?,
            "boot_args": format!("reapvm-virtio-check requests={REQUESTS}"),
        },
        "drives": [{"drive_id": "check", "path_on_host": disk, "is_root_device": false, "is_read_only": true}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
        "replay-control": true,
    });
    std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;
    let vmm = ReplayVmm::start(&scratch.dir, "check", Some(&config))?;
    let m = vmm.wait_for("done", std::time::Duration::from_secs(300))?;
    let checked = m["replay"]["checksum"].as_u64().unwrap_or(0);
    if checked != u64::from(REQUESTS) {
        return Err(format!(
            "the guest checked {checked} requests, expected {REQUESTS}\n{}",
            vmm.log_tail()
        ));
    }
    Ok(())
}

/// reapvm's virtio-rng (`entropy`), driven by the replay guest's entropy check at real
/// speed on this host's KVM: 16 requests at boot, then a snapshot, then 16 more in the
/// restored VM on the restored queue; every buffer random, whole and in place. The device
/// has a rate limiter (4 requests at once, then 4 each time its timer fires, every 100 ms):
/// requests wait for it, and the restored VM's configuration still has it.
fn virtio_rng_serves_a_booted_and_a_restored_guest() -> Result<(), String> {
    let scratch = Scratch::new("entropy");
    let config = scratch.path("vm.json");
    let body = serde_json::json!({
        "boot-source": {
            "kernel_image_path": replay_vm::replay_guest()?,
            "boot_args": "reapvm-entropy-check",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
        "entropy": {"rate_limiter": {"ops": {"size": 4, "refill_time": 50}}},
        "replay-control": true,
    });
    std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;
    let snap = replay_vm::boot_config_and_snapshot(&scratch.dir, &config)?;
    let vmm = ReplayVmm::start(&scratch.dir, "restored", None)?;
    vmm.api(
        "PUT",
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": snap.vmstate,
            "mem_backend": {"backend_type": "File", "backend_path": snap.memory},
            "resume_vm": true,
        }),
    )?;
    let m = vmm.wait_for("done", std::time::Duration::from_secs(60))?;
    let checked = m["replay"]["checksum"].as_u64().unwrap_or(0);
    if checked != 32 {
        return Err(format!(
            "the guest checked {checked} entropy requests, expected 32\n{}",
            vmm.log_tail()
        ));
    }
    let (_, body) = support::http::unix_request(&vmm.socket, "GET", "/vm/config", "")?;
    let config: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let ops = &config["entropy"]["rate_limiter"]["ops"];
    if ops["size"] != 4 || ops["refill_time"] != 50 {
        return Err(format!(
            "the restored VM's configuration lost the rate limiter: {body}"
        ));
    }
    Ok(())
}

/// vHive's `container_snapshot_path`: the container's drive is backed by another file at
/// load time (in vHive a devmapper device whose snapshot-time path is gone). The load gives
/// it to the one drive besides the root drive: without it the gone file fails the load, with
/// it the VM runs and its configuration names the new file; a file of another size is
/// refused, naming it (the guest saw the old size).
fn container_snapshot_path_backs_the_container_drive() -> Result<(), String> {
    let scratch = Scratch::new("container-drive");
    let trace = synthetic_trace();
    let trace_path = write_trace(&scratch.dir, &trace)?;
    let at_snapshot = scratch.path("ctr-at-snapshot.img");
    replay_vm::write_pattern_disk(&at_snapshot, 1)?;
    let config = scratch.path("vm.json");
    let body = serde_json::json!({
        "boot-source": {"kernel_image_path": replay_vm::replay_guest()?, "initrd_path": trace_path, "boot_args": "reapvm-replay"},
        "drives": [{"drive_id": "ctr", "path_on_host": at_snapshot, "is_root_device": false, "is_read_only": true}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
        "replay-control": true,
    });
    std::fs::write(&config, body.to_string()).map_err(|e| e.to_string())?;
    let snap = replay_vm::boot_config_and_snapshot(&scratch.dir, &config)?;
    let now = scratch.path("ctr-now.img");
    std::fs::rename(&at_snapshot, &now).map_err(|e| e.to_string())?;
    let other_size = scratch.path("ctr-other-size.img");
    replay_vm::write_pattern_disk(&other_size, 2)?;
    let load = |vmm: &ReplayVmm, container: Option<&Path>| {
        let mut body = serde_json::json!({
            "snapshot_path": snap.vmstate,
            "mem_backend": {"backend_type": "File", "backend_path": snap.memory},
            "resume_vm": true,
        });
        if let Some(path) = container {
            body["container_snapshot_path"] = serde_json::json!(path);
        }
        support::http::unix_request(&vmm.socket, "PUT", "/snapshot/load", &body.to_string())
    };
    let vmm = ReplayVmm::start(&scratch.dir, "load", None)?;
    for (container, gone_or_wrong) in [(None, &at_snapshot), (Some(&other_size), &other_size)] {
        let (status, answer) = load(&vmm, container.map(|p| p.as_path()))?;
        if status != 400 || !answer.contains(&gone_or_wrong.display().to_string()) {
            return Err(format!(
                "a load with container_snapshot_path {container:?} answered {status} {answer}, expected 400 naming {}",
                gone_or_wrong.display()
            ));
        }
    }
    let (status, answer) = load(&vmm, Some(&now))?;
    if status != 204 {
        return Err(format!(
            "the load with the new file answered {status} {answer}"
        ));
    }
    let m = vmm.wait_for("done", std::time::Duration::from_secs(60))?;
    let checksum = m["replay"]["checksum"].as_u64().unwrap_or(0) as u32;
    if checksum != trace.expected_checksum() {
        return Err(format!("the restored VM replayed to {checksum:#x}"));
    }
    let (_, body) = support::http::unix_request(&vmm.socket, "GET", "/vm/config", "")?;
    let config: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    if config["drives"][0]["path_on_host"] != serde_json::json!(now) {
        return Err(format!("GET /vm/config after the load: {body}"));
    }
    Ok(())
}

/// A memory file that cannot be read any more while a restored VM runs (truncated under
/// it) stops the VM with the file and the offset named, for each backend whose fault loop
/// reads it: the guest never runs on with a zero page where its data was.
fn an_unreadable_memory_file_stops_the_vm() -> Result<(), String> {
    let scratch = Scratch::new("replay-truncated");
    let trace = synthetic_trace();
    let snap = boot_and_snapshot(&scratch.dir, &write_trace(&scratch.dir, &trace)?, MEM_MIB)?;
    for backend in ["OnDemand", "Reap"] {
        let mem = scratch.path(&format!("memory-{backend}"));
        std::fs::copy(&snap.memory, &mem).map_err(|e| format!("{}: {e}", mem.display()))?;
        let mut vmm = ReplayVmm::start(&scratch.dir, backend, None)?;
        let body = serde_json::json!({
            "snapshot_path": snap.vmstate,
            "mem_backend": {"backend_type": backend, "backend_path": mem},
            "resume_vm": false,
        });
        vmm.api("PUT", "/snapshot/load", body)?;
        // The replay guest's own 2 MiB stay readable; every page the trace touches does not.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&mem)
            .and_then(|f| f.set_len(2 << 20))
            .map_err(|e| format!("truncating {}: {e}", mem.display()))?;
        vmm.api("PATCH", "/vm", serde_json::json!({"state": "Resumed"}))?;
        let status = vmm.wait_exit(std::time::Duration::from_secs(30));
        let log = vmm.log_tail();
        let named = format!("of memory file {}", mem.display());
        if status.and_then(|s| s.code()) != Some(1)
            || !log.contains("cannot read the page at offset")
            || !log.contains(&named)
        {
            return Err(format!(
                "{backend}: expected reapvm to stop with exit code 1 naming {} and the offset; exit {status:?}\n{log}",
                mem.display()
            ));
        }
    }
    Ok(())
}

/// A snapshot that runs out of space (a small tmpfs) fails naming the file, leaves no
/// temporary file, and leaves the previous snapshot in the same paths whole: it loads and
/// replays to the right checksum.
fn a_snapshot_that_runs_out_of_space_leaves_the_previous_one() -> Result<(), String> {
    let scratch = Scratch::new("replay-enospc");
    let trace = synthetic_trace();
    let trace_path = write_trace(&scratch.dir, &trace)?;
    // Room for one snapshot of the 64 MiB guest, not for a second beside it.
    let small = scratch.path("small");
    let _mount = support::TmpfsMount::new(&small, MEM_MIB + MEM_MIB / 2)?;
    let snap = boot_and_snapshot(&small, &trace_path, MEM_MIB)?;
    let before = std::fs::read(&snap.vmstate).map_err(|e| e.to_string())?;

    let vmm = ReplayVmm::start(&small, "again", Some(&small.join("replay-vm.json")))?;
    vmm.wait_for("ready", std::time::Duration::from_secs(60))?;
    vmm.api("PATCH", "/vm", serde_json::json!({"state": "Paused"}))?;
    let body = serde_json::json!({"snapshot_type": "Full", "snapshot_path": snap.vmstate, "mem_file_path": snap.memory});
    let (status, answer) =
        support::http::unix_request(&vmm.socket, "PUT", "/snapshot/create", &body.to_string())?;
    if status != 400 || !answer.contains("No space left") {
        return Err(format!(
            "a snapshot into a full tmpfs answered {status} {answer}, expected 400 naming ENOSPC"
        ));
    }
    drop(vmm);
    let temps: Vec<String> = std::fs::read_dir(&small)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.contains("reapvm-tmp"))
        .collect();
    if !temps.is_empty() {
        return Err(format!("temporary files left: {temps:?}"));
    }
    if std::fs::read(&snap.vmstate).map_err(|e| e.to_string())? != before {
        return Err("the previous vmstate changed".into());
    }
    let backend = serde_json::json!({"backend_type": "File", "backend_path": snap.memory});
    let run = restore_and_replay(&small, &snap, backend, false)?;
    if run.checksum != trace.expected_checksum() {
        return Err(format!(
            "the previous snapshot replayed to checksum {:#x}, expected {:#x}",
            run.checksum,
            trace.expected_checksum()
        ));
    }
    Ok(())
}

/// What a forgery is called, what it does to the vmstate, and what the refusal must say.
type Forgery = (&'static str, fn(&mut serde_json::Value), &'static str);

/// A vmstate is untrusted: one whose configuration is not valid, or whose memory regions
/// are not those its configuration gives, is refused with the reason (its checksum made
/// right, as a forger would), and the VMM stays up for a good one.
fn a_forged_vmstate_is_refused() -> Result<(), String> {
    let scratch = Scratch::new("replay-forged");
    let trace = synthetic_trace();
    let snap = boot_and_snapshot(&scratch.dir, &write_trace(&scratch.dir, &trace)?, MEM_MIB)?;
    let bytes = std::fs::read(&snap.vmstate).map_err(|e| e.to_string())?;
    let payload = snapshot::decode(b"REAPVMST", 1, &bytes).map_err(|e| e.to_string())?;
    let good: serde_json::Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let forgeries: [Forgery; 3] = [
        (
            "no vCPU",
            |s| s["config"]["machine-config"]["vcpu_count"] = 0.into(),
            "configuration is not valid",
        ),
        (
            "a region one page larger",
            |s| {
                let size = s["memory"][0]["size"].as_u64().unwrap_or(0);
                s["memory"][0]["size"] = (size + 4096).into();
            },
            "memory regions",
        ),
        (
            "twice the memory in the configuration",
            |s| s["config"]["machine-config"]["mem_size_mib"] = (2 * MEM_MIB).into(),
            "memory regions",
        ),
    ];
    let vmm = ReplayVmm::start(&scratch.dir, "forged", None)?;
    for (what, forge, reason) in forgeries {
        let mut state = good.clone();
        forge(&mut state);
        let path = scratch.path("forged.vmstate");
        let encoded = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
        std::fs::write(&path, snapshot::encode(b"REAPVMST", 1, &encoded))
            .map_err(|e| e.to_string())?;
        let body = serde_json::json!({
            "snapshot_path": path,
            "mem_backend": {"backend_type": "File", "backend_path": snap.memory},
        });
        let (status, answer) =
            support::http::unix_request(&vmm.socket, "PUT", "/snapshot/load", &body.to_string())?;
        if status != 400 || !answer.contains(reason) {
            return Err(format!(
                "{what}: expected 400 saying {reason:?}, got {status} {answer}"
            ));
        }
    }
    let body = serde_json::json!({
        "snapshot_path": snap.vmstate,
        "mem_backend": {"backend_type": "File", "backend_path": snap.memory},
        "resume_vm": true,
    });
    vmm.api("PUT", "/snapshot/load", body)?;
    let m = vmm.wait_for("done", std::time::Duration::from_secs(60))?;
    let checksum = m["replay"]["checksum"].as_u64().unwrap_or(0) as u32;
    if checksum != trace.expected_checksum() {
        return Err(format!("the good snapshot replayed to {checksum:#x}"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let trials = vec![
        Trial::test("a_forged_vmstate_is_refused", || {
            a_forged_vmstate_is_refused().map_err(Failed::from)
        }),
        Trial::test(
            "a_snapshot_that_runs_out_of_space_leaves_the_previous_one",
            || a_snapshot_that_runs_out_of_space_leaves_the_previous_one().map_err(Failed::from),
        ),
        Trial::test("an_unreadable_memory_file_stops_the_vm", || {
            an_unreadable_memory_file_stops_the_vm().map_err(Failed::from)
        }),
        Trial::test("virtio_block_dma_lands_only_in_its_buffers", || {
            virtio_block_dma_lands_only_in_its_buffers().map_err(Failed::from)
        }),
        Trial::test("virtio_rng_serves_a_booted_and_a_restored_guest", || {
            virtio_rng_serves_a_booted_and_a_restored_guest().map_err(Failed::from)
        }),
        Trial::test(
            "every_backend_replays_the_trace_with_the_right_checksum",
            || every_backend_replays_the_trace().map_err(Failed::from),
        ),
        Trial::test("a_write_touch_faults_once_with_file", || {
            a_write_touch_faults_once_with_file().map_err(Failed::from)
        }),
        Trial::test("container_snapshot_path_backs_the_container_drive", || {
            container_snapshot_path_backs_the_container_drive().map_err(Failed::from)
        }),
        Trial::test("a_trace_outside_guest_memory_is_refused", || {
            a_trace_outside_guest_memory_is_refused().map_err(Failed::from)
        }),
    ];
    replay_vm::run_host_suite("replay", trials)
}
