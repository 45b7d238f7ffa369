//! REAP on real KVM: a restore without a working-set (WS) file records one during the first
//! invocation; later restores install it before the guest runs and fault almost nothing on
//! demand; bad WS files are refused (the restore records a new one) and the invocation still
//! answers; a VMM killed while recording leaves no WS; recording also ends through the API.

use test_support as support;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use support::function_vm::{FunctionVm, VmSpec, AGENT_PORT};
use support::http::{unix_request, HttpConn};
use support::netns::NetNs;
use support::restore::{
    api, create_snapshot, flushed_metrics, set_vm_state, wait_for_invocation_signals, Vmm,
};
use support::*;

/// A paused function VM's snapshot: files, and the answer to `POST /invoke` with body
/// `reap` that the VM gave before it was snapshotted.
struct Snapshot {
    vmstate: PathBuf,
    mem: PathBuf,
    function: String,
    expected: Vec<u8>,
    /// A second snapshot of the same VM, taken a little later (another vmstate).
    other_vmstate: Option<PathBuf>,
}

const BODY: &[u8] = b"reap";

fn take_snapshot(
    guest: &GuestArtifacts,
    scratch: &Scratch,
    function: &str,
    second: bool,
) -> Result<Snapshot, String> {
    let mut spec = VmSpec::read_only(guest);
    spec.function = Some(function.into());
    spec.api = true;
    let vm = FunctionVm::boot(guest, &spec, scratch)?;
    let (status, _) = vm.invoke(function, b"warm")?;
    if status != 200 {
        return Err(format!("warm-up invocation of {function}: {status}"));
    }
    let (status, expected) = vm.invoke(function, BODY)?;
    if status != 200 {
        return Err(format!("invocation of {function}: {status}"));
    }
    let socket = scratch.path("api.sock");
    wait_for_invocation_signals(&socket, vm.metrics_path(), 2, Duration::from_secs(60))?;
    set_vm_state(&socket, "Paused")?;
    let (vmstate, mem) = (scratch.path("vmstate"), scratch.path("memory"));
    create_snapshot(&socket, "Full", &vmstate, &mem)?;
    let other_vmstate = if second {
        set_vm_state(&socket, "Resumed")?;
        std::thread::sleep(Duration::from_millis(200));
        set_vm_state(&socket, "Paused")?;
        let other = scratch.path("other.vmstate");
        create_snapshot(&socket, "Full", &other, &scratch.path("other.memory"))?;
        Some(other)
    } else {
        None
    };
    Ok(Snapshot {
        vmstate,
        mem,
        function: function.into(),
        expected,
        other_vmstate,
    })
}

/// A reapvm restored from a snapshot, in a namespace of its own, writing metrics.
struct Restored {
    ns: NetNs,
    vmm: Vmm,
    metrics: PathBuf,
}

fn restore(
    scratch: &Scratch,
    tag: &str,
    vmstate: &Path,
    mem_backend: serde_json::Value,
) -> Result<Restored, String> {
    let ns = NetNs::with_tap(tag)?;
    let vmm = Vmm::start(&ns, &scratch.path(&format!("{tag}.sock")))?;
    let metrics = scratch.path(&format!("{tag}.metrics"));
    vmm.put_metrics(&metrics)?;
    let body = serde_json::json!({
        "snapshot_path": vmstate,
        "mem_backend": mem_backend,
        "resume_vm": true,
    });
    let loaded = vmm.load_body(&body);
    if !matches!(loaded, Ok((204, _))) {
        return Err(format!(
            "snapshot/load ({mem_backend}): {loaded:?}\n--- reapvm ---\n{}",
            vmm.log_tail()
        ));
    }
    Ok(Restored { ns, vmm, metrics })
}

fn reap_backend(snap: &Snapshot) -> serde_json::Value {
    serde_json::json!({"backend_type": "Reap", "backend_path": snap.mem})
}

fn ws_path(snap: &Snapshot) -> PathBuf {
    let mut p = snap.mem.clone().into_os_string();
    p.push(".ws");
    p.into()
}

impl Restored {
    /// Adds what the VMM printed to an error.
    fn explain(&self, e: String) -> String {
        format!("{e}\n--- reapvm ---\n{}", self.vmm.log_tail())
    }

    /// Invokes the snapshot's function and checks the answer.
    fn invoke(&self, snap: &Snapshot) -> Result<(), String> {
        self.try_invoke(snap).map_err(|e| self.explain(e))
    }

    fn try_invoke(&self, snap: &Snapshot) -> Result<(), String> {
        let stream = self.ns.connect(AGENT_PORT, Duration::from_secs(60))?;
        let mut conn = HttpConn::new(stream, Duration::from_secs(180))?;
        let (status, body) = conn.request("POST", &format!("/invoke/{}", snap.function), BODY)?;
        if status != 200 || body != snap.expected {
            return Err(format!(
                "the restored {} answered {status} {:?}, expected {:?}",
                snap.function,
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(&snap.expected)
            ));
        }
        Ok(())
    }

    /// The `memory_restore` metrics as of now.
    fn memory_restore(&self) -> Result<serde_json::Value, String> {
        let line = flushed_metrics(&self.vmm.socket, &self.metrics).map_err(|e| self.explain(e))?;
        Ok(line["memory_restore"].clone())
    }
}

fn field(m: &serde_json::Value, name: &str) -> u64 {
    m[name].as_u64().unwrap_or(0)
}

fn wait_for_file(path: &Path, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if path.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} did not appear within {timeout:?}",
        path.display()
    ))
}

/// Record on the first restore, prefetch on the second, and compare the faults left on
/// demand with those of a plain userfaultfd restore of the same snapshot.
fn records_then_prefetches(function: &str, min_ws_pages: u64) -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new(&format!("reap-{function}"));
    let snap = take_snapshot(&guest, &scratch, function, false)?;
    let ws = ws_path(&snap);

    let recording = restore(&scratch, "rec", &snap.vmstate, reap_backend(&snap))?;
    let m = recording.memory_restore()?;
    check(m["mode"] == "record", || {
        format!("no WS yet, so record: {m}")
    })?;
    recording.invoke(&snap)?;
    wait_for_file(&ws, Duration::from_secs(60))?;
    let m = recording.memory_restore()?;
    let recorded = field(&m, "ws_pages_recorded");
    check(recorded >= min_ws_pages, || {
        format!("the WS has {recorded} pages, expected at least {min_ws_pages}: {m}")
    })?;
    // The WS installs the recorded pages and the small gaps its chunks join across.
    let installs = check_touch_log(&ws)?;
    drop(recording);

    let prefetching = restore(&scratch, "pre", &snap.vmstate, reap_backend(&snap))?;
    prefetching.invoke(&snap)?;
    // Faults as the invocation is answered (the guest goes on touching pages afterwards).
    let reap = prefetching.memory_restore()?;
    // The agent signals the answered invocation after sending the answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut later = reap.clone();
    while field(&later, "first_response_us") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        later = prefetching.memory_restore()?;
    }
    check(reap["mode"] == "prefetch", || {
        format!("a WS exists, so prefetch: {reap}")
    })?;
    check(field(&reap, "pages_prefetched") == installs, || {
        format!("{recorded} pages recorded, {installs} in the WS, prefetch installed: {reap}")
    })?;
    check(
        field(&later, "first_response_us") > 0 && field(&reap, "ws_install_us") > 0,
        || format!("time to first response and install time missing: {later}"),
    )?;
    drop(prefetching);

    let uffd = restore(
        &scratch,
        "uffd",
        &snap.vmstate,
        serde_json::json!({"backend_type": "OnDemand", "backend_path": snap.mem}),
    )?;
    uffd.invoke(&snap)?;
    let plain = uffd.memory_restore()?;
    let (left, all) = (
        field(&reap, "faults_on_demand"),
        field(&plain, "faults_on_demand"),
    );
    eprintln!(
        "{function}: WS {recorded} pages; faults on demand: userfaultfd {all}, REAP {left} (lab figures; counts are exact)"
    );
    check(all > 0 && left * 100 <= all * 3, || {
        format!("REAP left {left} faults on demand, more than 3% of userfaultfd's {all}")
    })?;
    drop(uffd);

    // Every option at once: the WS read while the state is restored, O_DIRECT where the
    // filesystem allows, installed while the guest already runs; then streamed: the guest
    // resumes once the first chunk is in.
    for (label, options) in [
        (
            "chunked",
            serde_json::json!({"fetch_in_parallel": true, "o_direct": true, "chunked_install": true}),
        ),
        (
            "streamed",
            serde_json::json!({"streaming": true, "o_direct": true}),
        ),
    ] {
        let backend = serde_json::json!({"backend_type": "Reap", "backend_path": snap.mem, "reap_options": options});
        let chunked = restore(&scratch, label, &snap.vmstate, backend)?;
        chunked.invoke(&snap)?;
        let left = field(&chunked.memory_restore()?, "faults_on_demand");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut m = chunked.memory_restore()?;
        while field(&m, "ws_install_us") == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            m = chunked.memory_restore()?;
        }
        eprintln!(
            "{function}: {label} install: {} pages in, {} of them on a fault, {left} faults from the memory file",
            field(&m, "pages_prefetched"),
            field(&m, "faults_from_ws")
        );
        check(
            m["mode"] == "prefetch"
                && m.get("ws_error").is_none()
                && field(&m, "pages_prefetched") == installs
                && field(&m, "ws_fetch_us") > 0
                && left * 100 <= all * 3,
            || format!("{label} install of {installs} pages: {m}"),
        )?;
    }
    Ok(())
}

/// The recording's touch log lists the WS's touched pages in order of first touch, for the
/// same snapshot, with reads and writes among them (the invocation runs code and writes its
/// data): each chunk of the WS holds the next stretch of the log (64 pages, then twice as
/// many each chunk up to 1024), plus only pages the log does not have (the gaps a chunk
/// joins across). Returns the pages the WS installs.
fn check_touch_log(ws: &Path) -> Result<u64, Failed> {
    let ws_bytes = std::fs::read(ws).map_err(|e| format!("{}: {e}", ws.display()))?;
    let header = snapshot::ws::Header::decode(&ws_bytes).map_err(|e| e.to_string())?;
    header.check_file(&ws_bytes).map_err(|e| e.to_string())?;
    let log_path = snapshot::touch_log::path_for(ws);
    let log_bytes = std::fs::read(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let log = snapshot::touch_log::TouchLog::decode(&log_bytes).map_err(|e| e.to_string())?;
    let log_pages: Vec<u64> = log.touches.iter().map(|t| t.file_offset).collect();
    let in_log: std::collections::HashSet<u64> = log_pages.iter().copied().collect();
    let writes = log.touches.iter().filter(|t| t.write).count();
    eprintln!(
        "touch log: {} pages, {writes} first touched by a write; WS: {} pages in {} chunks",
        log_pages.len(),
        header.pages(),
        header.chunks.len()
    );
    check(log.identity == header.identity, || {
        format!(
            "the touch log is for {:?}, the WS for {:?}",
            log.identity, header.identity
        )
    })?;
    let (mut from, mut size) = (0usize, snapshot::ws::v2::FIRST_CHUNK_PAGES);
    for (i, chunk) in header.chunks.iter().enumerate() {
        let stretch: std::collections::HashSet<u64> = log_pages
            [from.min(log_pages.len())..(from + size).min(log_pages.len())]
            .iter()
            .copied()
            .collect();
        let chunk_pages: Vec<u64> = header.runs[chunk.runs.clone()]
            .iter()
            .flat_map(|r| (0..u64::from(r.pages)).map(move |p| r.file_offset + p * 4096))
            .collect();
        let touched: std::collections::HashSet<u64> = chunk_pages
            .iter()
            .copied()
            .filter(|p| in_log.contains(p))
            .collect();
        check(touched == stretch, || {
            format!(
                "chunk {i} holds {} logged pages, the log's stretch {from}..{} has {}",
                touched.len(),
                from + size,
                stretch.len()
            )
        })?;
        from += size;
        size = (size * 2).min(snapshot::ws::v2::MAX_CHUNK_PAGES);
    }
    check(from >= log_pages.len(), || {
        format!(
            "the WS's chunks end before the log's {} pages",
            log_pages.len()
        )
    })?;
    check(writes > 0 && writes < log_pages.len(), || {
        format!(
            "{writes} of {} touches are writes: expected reads and writes",
            log_pages.len()
        )
    })?;
    Ok(header.pages())
}

/// Corrupted, truncated and foreign WS files are refused with a reason; the restore records
/// a new WS instead and the invocation answers correctly.
fn bad_ws_files_are_refused() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("reap-bad");
    let snap = take_snapshot(&guest, &scratch, "helloworld", true)?;
    let other_vmstate = snap.other_vmstate.clone().expect("second snapshot");
    // A good WS for the second snapshot: for this one it is foreign.
    let foreign = scratch.path("foreign.ws");
    let other_backend = serde_json::json!({"backend_type": "Reap", "backend_path": scratch.path("other.memory"), "ws_path": foreign});
    let r = restore(&scratch, "other", &other_vmstate, other_backend)?;
    api(
        &r.vmm.socket,
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "FinishWsRecording"}),
    )?;
    wait_for_file(&foreign, Duration::from_secs(60))?;
    drop(r);
    let good = std::fs::read(&foreign)?;

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("flipped", flipped, "checksum"),
        (
            "truncated",
            good[..good.len() / 3].to_vec(),
            "its header says",
        ),
        ("foreign", good.clone(), "another snapshot"),
    ];
    for (name, bytes, reason) in cases {
        let ws = scratch.path(&format!("{name}.ws"));
        std::fs::write(&ws, &bytes)?;
        let backend =
            serde_json::json!({"backend_type": "Reap", "backend_path": snap.mem, "ws_path": ws});
        let r = restore(&scratch, name, &snap.vmstate, backend)?;
        r.invoke(&snap)?;
        let m = r.memory_restore()?;
        let error = m["ws_error"].as_str().unwrap_or("");
        check(m["mode"] == "record" && error.contains(reason), || {
            format!("{name} WS: expected a refusal mentioning {reason:?}: {m}")
        })?;
        // The bad file is replaced by a WS recorded for this snapshot.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read(&ws)? == bytes && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        check(std::fs::read(&ws)? != bytes, || {
            format!("{name} WS was not re-recorded")
        })?;
    }
    Ok(())
}

/// A VMM killed while recording leaves no WS file; two VMMs recording the same snapshot at
/// once leave one WS that a third restore prefetches; recording ends on PATCH /vm Paused.
fn interrupted_and_concurrent_recordings() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("reap-rec");
    let snap = take_snapshot(&guest, &scratch, "helloworld", false)?;
    let ws = ws_path(&snap);

    let killed = restore(&scratch, "killed", &snap.vmstate, reap_backend(&snap))?;
    let status = std::process::Command::new("kill")
        .args(["-9", &killed.vmm.pid().to_string()])
        .status()?;
    check(status.success(), || "kill -9 failed".into())?;
    drop(killed);
    std::thread::sleep(Duration::from_millis(500));
    check(!ws.exists(), || {
        "a VMM killed while recording left a WS file".into()
    })?;

    let first = restore(&scratch, "rec1", &snap.vmstate, reap_backend(&snap))?;
    let second = restore(&scratch, "rec2", &snap.vmstate, reap_backend(&snap))?;
    first.invoke(&snap)?;
    api(
        &second.vmm.socket,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    )?;
    let m = second.memory_restore()?;
    check(m["mode"] == "record", || format!("second recorder: {m}"))?;
    wait_for_file(&ws, Duration::from_secs(60))?;
    drop(first);
    drop(second);

    let third = restore(&scratch, "third", &snap.vmstate, reap_backend(&snap))?;
    third.invoke(&snap)?;
    let m = third.memory_restore()?;
    check(
        m["mode"] == "prefetch" && field(&m, "pages_prefetched") > 0,
        || format!("after two recordings the WS must load: {m}"),
    )?;
    let (status, answer) = unix_request(
        &third.vmm.socket,
        "PUT",
        "/actions",
        r#"{"action_type": "FinishWsRecording"}"#,
    )?;
    check(
        status == 400 && answer.contains("No REAP working set"),
        || format!("FinishWsRecording without a recording: {status} {answer}"),
    )?;
    drop(third);

    // Option combinations that cannot work are refused before anything is built.
    let ns = NetNs::with_tap("opts")?;
    let vmm = Vmm::start(&ns, &scratch.path("opts.sock"))?;
    for (options, reason) in [
        (
            serde_json::json!({"merge_misses": true, "chunked_install": true}),
            "chunked_install",
        ),
        (
            serde_json::json!({"rerecord_threshold": 5}),
            "needs merge_misses",
        ),
        (
            serde_json::json!({"prefetch_everything": true}),
            "unknown field",
        ),
    ] {
        let body = serde_json::json!({
            "snapshot_path": snap.vmstate,
            "mem_backend": {"backend_type": "Reap", "backend_path": snap.mem, "reap_options": options},
            "resume_vm": true,
        });
        let (status, answer) = vmm.load_body(&body)?;
        check(status == 400 && answer.contains(reason), || {
            format!("reap_options {options}: {status} {answer}")
        })?;
    }
    let (status, info) = unix_request(&vmm.socket, "GET", "/", "")?;
    check(status == 200 && info.contains("Not started"), || {
        format!("the VMM must stay up: {status} {info}")
    })
}

/// After a prefetch, `merge_misses` appends the pages still faulted on demand to the WS;
/// past `rerecord_threshold` misses the WS is dropped and the next restore records anew.
fn misses_are_merged_or_rerecorded() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("reap-merge");
    let snap = take_snapshot(&guest, &scratch, "helloworld", false)?;
    let ws = ws_path(&snap);
    let recording = restore(&scratch, "rec", &snap.vmstate, reap_backend(&snap))?;
    recording.invoke(&snap)?;
    wait_for_file(&ws, Duration::from_secs(60))?;
    drop(recording);
    let recorded = std::fs::read(&ws)?;

    let with = |options: serde_json::Value| serde_json::json!({"backend_type": "Reap", "backend_path": snap.mem, "reap_options": options});
    let merging = restore(
        &scratch,
        "merge",
        &snap.vmstate,
        with(serde_json::json!({"merge_misses": true})),
    )?;
    merging.invoke(&snap)?;
    let m = merging.memory_restore()?;
    // The misses logged until the invocation was answered: what the merge writes. (Faults
    // on demand may count one more, taken after the answer and not merged.)
    let misses = field(&m, "ws_pages_recorded");
    check(m["mode"] == "prefetch", || format!("merge restore: {m}"))?;
    // The merged WS is written once the invocation is answered (at once if nothing missed).
    let deadline = Instant::now() + Duration::from_secs(60);
    while misses > 0 && std::fs::read(&ws)? == recorded && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(merging);
    let prefetch = restore(&scratch, "after", &snap.vmstate, reap_backend(&snap))?;
    prefetch.invoke(&snap)?;
    let m = prefetch.memory_restore()?;
    let before = field(&m, "pages_prefetched");
    eprintln!("merge: {misses} misses merged; the WS now installs {before} pages");
    check(
        m["mode"] == "prefetch" && (misses == 0 || std::fs::read(&ws)? != recorded),
        || format!("{misses} misses were not merged: {m}"),
    )?;
    drop(prefetch);

    let strict = restore(
        &scratch,
        "strict",
        &snap.vmstate,
        with(serde_json::json!({"merge_misses": true, "rerecord_threshold": 0})),
    )?;
    strict.invoke(&snap)?;
    let misses = field(&strict.memory_restore()?, "ws_pages_recorded");
    let deadline = Instant::now() + Duration::from_secs(60);
    while misses > 0 && ws.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(strict);
    check(misses == 0 || !ws.exists(), || {
        format!("{misses} misses passed a threshold of 0, but the WS stayed")
    })?;
    if misses > 0 {
        let next = restore(&scratch, "next", &snap.vmstate, reap_backend(&snap))?;
        next.invoke(&snap)?;
        let m = next.memory_restore()?;
        check(m["mode"] == "record", || {
            format!("after the WS was dropped the next restore records: {m}")
        })?;
    }
    Ok(())
}

fn main() -> ExitCode {
    run_kvm_suite("reap", || {
        vec![
            Trial::test("helloworld_records_then_prefetches", || {
                records_then_prefetches("helloworld", 100)
            }),
            Trial::test("large_working_set_records_then_prefetches", || {
                // 32 MiB of data: at least 8192 pages.
                records_then_prefetches("bigdata", 8192)
            }),
            Trial::test("bad_ws_files_are_refused", bad_ws_files_are_refused),
            Trial::test(
                "misses_are_merged_or_rerecorded",
                misses_are_merged_or_rerecorded,
            ),
            Trial::test(
                "interrupted_and_concurrent_recordings",
                interrupted_and_concurrent_recordings,
            ),
        ]
    })
}
