//! Every page source on the one fault loop, with a real userfaultfd over anonymous memory
//! touched by this thread (no KVM needed): on demand, recording a WS, prefetching it all
//! first and installing it while the memory is in use.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devices::GuestMemoryMmap;
use snapshot::touch_log::{self, TouchLog};
use snapshot::ws::SnapshotIdentity;
use snapshot::PAGE_SIZE;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::metrics::{FaultSource, MemoryRestoreReport};
use crate::persist::MemoryRegionState;
use crate::uffd::{self, FaultLoop, FileSource, HandlerStop, StopHandlersOnDrop};

const PAGES: u64 = 64;
/// Pages that are all zeroes in the memory file.
const ZERO_PAGES: [u64; 3] = [5, 6, 40];

fn layout() -> Vec<MemoryRegionState> {
    // Two regions, as below and above the MMIO gap: the second starts at file page 48.
    vec![
        MemoryRegionState {
            guest_addr: 0,
            size: 48 * PAGE_SIZE as u64,
            file_offset: 0,
        },
        MemoryRegionState {
            guest_addr: 0x1_0000_0000,
            size: 16 * PAGE_SIZE as u64,
            file_offset: 48 * PAGE_SIZE as u64,
        },
    ]
}

fn guest_addr(file_page: u64) -> GuestAddress {
    let offset = file_page * PAGE_SIZE as u64;
    let r = layout()
        .into_iter()
        .find(|r| offset >= r.file_offset && offset < r.file_offset + r.size)
        .unwrap();
    GuestAddress(r.guest_addr + offset - r.file_offset)
}

/// The byte every position of file page `page` holds (0 for the zero pages).
fn pattern(page: u64) -> u8 {
    if ZERO_PAGES.contains(&page) {
        0
    } else {
        (page as u8).wrapping_mul(7).wrapping_add(1)
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("reapvm-fault-loop-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut content = Vec::with_capacity(PAGES as usize * PAGE_SIZE);
        for page in 0..PAGES {
            content.extend(std::iter::repeat_n(pattern(page), PAGE_SIZE));
        }
        std::fs::write(dir.join("mem"), content).unwrap();
        Self(dir)
    }

    fn mem_file(&self) -> Arc<File> {
        Arc::new(File::open(self.0.join("mem")).unwrap())
    }

    fn ws_path(&self) -> PathBuf {
        self.0.join("mem.ws")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn identity() -> SnapshotIdentity {
    SnapshotIdentity {
        vmstate_checksum: 0x1234_5678,
        memory_len: PAGES * PAGE_SIZE as u64,
    }
}

/// Reads two bytes of `page` (its first and last) and checks them.
fn check_page(mem: &GuestMemoryMmap, page: u64) {
    let at = guest_addr(page);
    let first: u8 = mem.read_obj(at).unwrap();
    let last: u8 = mem
        .read_obj(at.unchecked_add(PAGE_SIZE as u64 - 1))
        .unwrap();
    assert_eq!((first, last), (pattern(page), pattern(page)), "page {page}");
}

fn restore(
    scratch: &Scratch,
    options: ReapOptions,
) -> (GuestMemoryMmap, ReapMemory, StopHandlersOnDrop) {
    restore_as(scratch, options, identity())
}

/// A REAP restore of the scratch memory file as the snapshot `identity`.
fn restore_as(
    scratch: &Scratch,
    options: ReapOptions,
    identity: SnapshotIdentity,
) -> (GuestMemoryMmap, ReapMemory, StopHandlersOnDrop) {
    let fetched = if options.reads_in_parallel() {
        spawn_fetch(scratch.ws_path(), false, u64::MAX, options.streaming)
            .unwrap()
            .header_read()
    } else {
        fetch(&scratch.ws_path(), false, u64::MAX)
    };
    restore_region(
        &layout(),
        &scratch.0.join("mem"),
        &scratch.ws_path(),
        identity,
        options,
        fetched,
    )
}

#[test]
fn on_demand_fills_each_page_once_from_the_memory_file() {
    let scratch = Scratch::new("on-demand");
    let (mem, uffd, regions) = uffd::register(&layout()).unwrap();
    let handlers = StopHandlersOnDrop(HandlerStop::new().unwrap());
    let source = FileSource::new(scratch.mem_file(), scratch.0.join("mem"));
    let stats = source.stats();
    FaultLoop::new(
        Arc::new(uffd),
        Arc::new(regions),
        handlers.0.clone(),
        None,
        source,
    )
    .spawn("test_uffd")
    .unwrap();
    for page in [3, 50, 63, 5, 3, 50] {
        check_page(&mem, page);
    }
    assert_eq!(stats.faults_and_bytes(), (4, 4 * PAGE_SIZE as u64));
}

/// Fault-around: one fault fills the aligned block around the faulting page, never past its
/// region, and a page already there (put in by someone else) is left as it is.
#[test]
fn fault_around_fills_the_aligned_block_in_one_fault() {
    let scratch = Scratch::new("fault-around");
    let (mem, uffd, regions) = uffd::register(&layout()).unwrap();
    let (uffd, regions) = (Arc::new(uffd), Arc::new(regions));
    let handlers = StopHandlersOnDrop(HandlerStop::new().unwrap());
    // 128 KiB: 32 pages. Region one is 48 pages (blocks 0-31 and 32-47), region two 16.
    let source = FileSource::new(scratch.mem_file(), scratch.0.join("mem"))
        .with_fault_around(uffd::fault_around_pages(128).unwrap(), regions.clone());
    let stats = source.stats();
    // Page 7 is put in first, with other content, as an installer would.
    let page7 = mem
        .get_host_address(guest_addr(7))
        .map(|p| p as u64)
        .unwrap();
    uffd::install_page(&uffd, page7, 7 * PAGE_SIZE as u64, Some(&[0xee; PAGE_SIZE])).unwrap();
    FaultLoop::new(uffd, regions, handlers.0.clone(), None, source)
        .spawn("test_uffd")
        .unwrap();
    check_page(&mem, 3);
    assert_eq!(stats.faults_and_bytes(), (1, 32 * PAGE_SIZE as u64));
    for page in (0..32).filter(|&p| p != 7) {
        check_page(&mem, page);
    }
    let kept: u8 = mem.read_obj(guest_addr(7)).unwrap();
    assert_eq!(kept, 0xee, "fault-around overwrote a page already there");
    // The second block of region one is clipped at its end (16 pages, not 32) ...
    check_page(&mem, 40);
    assert_eq!(stats.faults_and_bytes(), (2, 48 * PAGE_SIZE as u64));
    // ... and region two is a block of its own, whose pages all come with one fault.
    for page in (32..48).chain([60, 48, 63]) {
        check_page(&mem, page);
    }
    assert_eq!(stats.faults_and_bytes(), (3, 64 * PAGE_SIZE as u64));
}

#[test]
fn fault_around_sizes_are_checked() {
    assert_eq!(uffd::fault_around_pages(0), Ok(1));
    assert_eq!(uffd::fault_around_pages(4), Ok(1));
    assert_eq!(uffd::fault_around_pages(64), Ok(16));
    assert_eq!(uffd::fault_around_pages(2048), Ok(512));
    for bad in [2, 48, 4096] {
        let e = uffd::fault_around_pages(bad).unwrap_err();
        assert!(e.contains(&format!("is {bad}")), "{e}");
    }
    let options = ReapOptions {
        merge_misses: true,
        fault_around_kib: 64,
        ..Default::default()
    };
    assert_eq!(
        options.validate(),
        Err(ReapOptionsError::MergeWithFaultAround)
    );
}

#[test]
fn a_recording_logs_first_touches_in_order_and_a_prefetch_installs_them() {
    let scratch = Scratch::new("record");
    let touched = [10u64, 11, 12, 49, 5, 6, 30];
    let written = [11u64, 49];
    {
        let (mem, reap, _handlers) = restore(&scratch, ReapOptions::default());
        let recorder = reap.recorder.expect("no WS: a recording");
        for &page in &touched {
            if written.contains(&page) {
                mem.write_obj(pattern(page), guest_addr(page)).unwrap();
            }
            check_page(&mem, page);
        }
        // Touched again: no new record.
        check_page(&mem, 10);
        assert_eq!(recorder.recorded_pages(), touched.len() as u64);
        let state = recorder.finish("the test ends it", Duration::from_secs(10));
        assert!(
            matches!(state, RecordingState::Written { pages: 7, .. }),
            "{state:?}"
        );
        // After the end pages are served, not recorded.
        check_page(&mem, 20);
        assert_eq!(recorder.recorded_pages(), touched.len() as u64);
    }
    let log =
        TouchLog::decode(&std::fs::read(touch_log::path_for(&scratch.ws_path())).unwrap()).unwrap();
    let logged: Vec<(u64, bool)> = log
        .touches
        .iter()
        .map(|t| (t.file_offset / PAGE_SIZE as u64, t.write))
        .collect();
    let expected: Vec<(u64, bool)> = touched.iter().map(|&p| (p, written.contains(&p))).collect();
    assert_eq!(logged, expected);

    for (chunked_install, streaming) in [(false, false), (true, false), (false, true)] {
        let options = ReapOptions {
            chunked_install,
            streaming,
            ..Default::default()
        };
        let (mem, reap, _handlers) = restore(&scratch, options);
        assert_eq!(reap.report.mode, "prefetch");
        assert!(reap.recorder.is_none());
        if !options.installs_while_running() {
            // The touched pages, and 7, 8 and 9: the gap between 6 and 10 is stored and
            // installed with them (one copy instead of two).
            assert_eq!(reap.report.pages_prefetched, touched.len() as u64 + 3);
        }
        for &page in touched.iter().chain(&[0, 40, 63]) {
            check_page(&mem, page);
        }
        // Only the three pages outside the WS came from the memory file.
        assert_eq!(reap.live.faults_and_bytes().0, 3, "{options:?}");
    }

    // Misses with fault-around: the block around a miss, less the WS's pages (6 to 12 with
    // the gap pages 7 to 9) and what lies beyond them, comes in one fault; the WS's pages
    // come from the WS, never from the memory file.
    for (chunked_install, streaming) in [(false, false), (true, false), (false, true)] {
        let options = ReapOptions {
            chunked_install,
            streaming,
            fault_around_kib: 64,
            ..Default::default()
        };
        let (mem, reap, _handlers) = restore(&scratch, options);
        assert_eq!(reap.report.mode, "prefetch");
        // Page 2's block is 0-15: pages 0 to 4 (page 5 is the WS's).
        check_page(&mem, 2);
        assert_eq!(
            reap.live.faults_and_bytes(),
            (1, 5 * PAGE_SIZE as u64),
            "{options:?}"
        );
        for page in (0..5).chain(touched.iter().copied()) {
            check_page(&mem, page);
        }
        // Page 14's block: 13 to 15 (12 is the WS's).
        check_page(&mem, 14);
        check_page(&mem, 13);
        check_page(&mem, 15);
        assert_eq!(
            reap.live.faults_and_bytes(),
            (2, 8 * PAGE_SIZE as u64),
            "{options:?}"
        );
    }
}

/// A recording restore of the scratch snapshot that touches `pages` and ends: its WS and
/// touch log are written.
fn record_pages(scratch: &Scratch, pages: &[u64]) {
    let (mem, reap, _handlers) = restore(scratch, ReapOptions::default());
    for &page in pages {
        check_page(&mem, page);
    }
    let state = reap
        .recorder
        .expect("no WS: a recording")
        .finish("the test ends it", Duration::from_secs(10));
    assert!(
        matches!(state, RecordingState::Written { pages: n, .. } if n == pages.len() as u64),
        "{state:?}"
    );
}

#[test]
fn a_ws_of_another_snapshot_is_refused_and_recorded_anew() {
    let scratch = Scratch::new("foreign");
    record_pages(&scratch, &[1]);
    let foreign = SnapshotIdentity {
        vmstate_checksum: 1,
        ..identity()
    };
    let (mem, reap, _handlers) = restore_as(&scratch, ReapOptions::default(), foreign);
    assert!(
        reap.report
            .ws_error
            .as_deref()
            .is_some_and(|e| e.contains("refused")),
        "{:?}",
        reap.report.ws_error
    );
    assert!(reap.recorder.is_some());
    check_page(&mem, 2);
}

#[test]
fn an_abandoned_recording_writes_no_ws() {
    let scratch = Scratch::new("abandoned");
    let (mem, reap, _handlers) = restore(&scratch, ReapOptions::default());
    let recorder = reap.recorder.expect("no WS: a recording");
    check_page(&mem, 3);
    recorder.abandon("the test says so");
    // Stopping after an abandon changes nothing: no WS is written.
    let state = recorder.finish("the VM stopped", Duration::from_millis(300));
    assert!(
        matches!(&state, RecordingState::Failed(why) if why.contains("abandoned")),
        "{state:?}"
    );
    assert!(
        !scratch.ws_path().exists(),
        "an abandoned recording wrote a WS"
    );
    assert!(!touch_log::path_for(&scratch.ws_path()).exists());
}

/// A snapshot of one region of `pages` pages whose page N holds `byte_of(N)` throughout, in
/// a fresh folder named after `name`: (folder, memory file, layout, identity).
fn one_region_snapshot(
    name: &str,
    pages: u64,
    vmstate_checksum: u64,
    byte_of: impl Fn(u64) -> u8,
) -> (PathBuf, PathBuf, Vec<MemoryRegionState>, SnapshotIdentity) {
    let dir = std::env::temp_dir().join(format!("reapvm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem_path = dir.join("mem");
    let content: Vec<u8> = (0..pages)
        .flat_map(|p| std::iter::repeat_n(byte_of(p), PAGE_SIZE))
        .collect();
    std::fs::write(&mem_path, content).unwrap();
    let layout = vec![MemoryRegionState {
        guest_addr: 0,
        size: pages * PAGE_SIZE as u64,
        file_offset: 0,
    }];
    let identity = SnapshotIdentity {
        vmstate_checksum,
        memory_len: pages * PAGE_SIZE as u64,
    };
    (dir, mem_path, layout, identity)
}

/// A REAP restore of `layout` from the memory file `mem_path` with the WS `fetched`.
fn restore_region(
    layout: &[MemoryRegionState],
    mem_path: &std::path::Path,
    ws_path: &std::path::Path,
    identity: SnapshotIdentity,
    options: ReapOptions,
    fetched: FetchedWs,
) -> (GuestMemoryMmap, ReapMemory, StopHandlersOnDrop) {
    let (mem, uffd, regions) = uffd::register(layout).unwrap();
    let handlers = StopHandlersOnDrop(HandlerStop::new().unwrap());
    let reap = restore_memory(
        ReapSetup {
            uffd: Arc::new(uffd),
            regions: Arc::new(regions),
            mem: FileSource::new(Arc::new(File::open(mem_path).unwrap()), mem_path.into()),
            ws_path: ws_path.into(),
            options,
            identity,
            layout: ws_layout(layout),
            stop: handlers.0.clone(),
            exit: None,
        },
        fetched,
        MemoryRestoreReport::default(),
    )
    .unwrap();
    (mem, reap, handlers)
}

/// Dropping a restore's handlers (a failed restore, the VM gone) ends and joins its
/// threads, the chunked installer included, before the guest memory can go: none is left
/// writing into memory that may be mapped again for another VM.
#[test]
fn dropping_the_handlers_joins_every_handler_thread() {
    // A WS of every other page of a 64 MiB region: 8192 runs, one copy each.
    const REGION_PAGES: u64 = 16384;
    let (dir, mem_path, layout, identity) = one_region_snapshot("join", REGION_PAGES, 7, |_| 0x5a);
    let ws_path = dir.join("mem.ws");
    // One chunk of single-page runs, every other page (explicit runs: the writer would join
    // them across their one-page gaps).
    let runs: Vec<snapshot::ws::WsRun> = (0..REGION_PAGES)
        .step_by(2)
        .map(|p| snapshot::ws::WsRun {
            file_offset: p * PAGE_SIZE as u64,
            pages: 1,
            kind: snapshot::ws::RunKind::Data,
        })
        .collect();
    let data = vec![0x5au8; runs.len() * PAGE_SIZE];
    let bytes = snapshot::ws::v2::encode(identity, &ws_layout(&layout), &[(runs, data)]);
    snapshot::ws::write(&ws_path, &bytes).unwrap();
    for _ in 0..3 {
        let options = ReapOptions {
            chunked_install: true,
            ..Default::default()
        };
        let fetched = fetch(&ws_path, false, u64::MAX);
        let (_mem, reap, handlers) =
            restore_region(&layout, &mem_path, &ws_path, identity, options, fetched);
        assert_eq!(reap.report.mode, "prefetch");
        drop(handlers);
        // Joined: the installer puts nothing in any more (it was mid-way: 8192 copies).
        let installed = || {
            reap.live
                .prefetch_progress()
                .expect("a chunked install")
                .pages
        };
        let at_drop = installed();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            installed(),
            at_drop,
            "the installer ran on after its handlers were dropped"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Streaming: the guest runs once the first chunk is in. A chunk that fails its checksum
/// ends the streaming there: its pages and every later chunk's come from the memory file
/// (the guest reads the snapshot's content either way), the restore reports why, and the
/// damaged WS is removed so that the next restore records a sound one.
#[test]
fn a_damaged_chunk_while_streaming_falls_back_to_the_memory_file() {
    const REGION_PAGES: u64 = 2048;
    let byte_of = |page: u64| (page as u8).wrapping_mul(13) | 1;
    let (dir, mem_path, layout, identity) =
        one_region_snapshot("stream-bad", REGION_PAGES, 9, byte_of);
    let content = std::fs::read(&mem_path).unwrap();
    // 600 pages, 3 apart: chunks of 64, 128, 256 and 152 touched pages.
    let touched: Vec<u64> = (0..600).map(|i| i * 3 * PAGE_SIZE as u64).collect();
    let mut bytes = snapshot::ws::build(identity, &ws_layout(&layout), &touched, |off, page| {
        page.copy_from_slice(&content[off as usize..off as usize + PAGE_SIZE]);
        Ok::<_, ()>(())
    })
    .unwrap();
    let header = snapshot::ws::Header::decode(&bytes).unwrap();
    assert_eq!(header.chunks.len(), 4);
    bytes[header.chunks[2].data_offset as usize + 7] ^= 0x40;
    let ws_path = dir.join("mem.ws");
    snapshot::ws::write(&ws_path, &bytes).unwrap();

    let options = ReapOptions {
        streaming: true,
        ..Default::default()
    };
    let fetched = spawn_fetch(ws_path.clone(), false, u64::MAX, true)
        .unwrap()
        .header_read();
    let (mem, reap, handlers) =
        restore_region(&layout, &mem_path, &ws_path, identity, options, fetched);
    assert_eq!(reap.report.mode, "prefetch");
    for page in 0..REGION_PAGES {
        let got: u8 = mem
            .read_obj(GuestAddress(page * PAGE_SIZE as u64 + 5))
            .unwrap();
        assert_eq!(got, byte_of(page), "page {page}");
    }
    // The installer finishes (stopping at chunk 2), the reason is reported, the WS is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let progress = loop {
        let p = reap.live.prefetch_progress().unwrap();
        if p.install_us != 0 || std::time::Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_ne!(progress.install_us, 0, "the installer never finished");
    let why = progress.error.expect("the damaged chunk is reported");
    assert!(why.contains("chunk 2"), "{why}");
    assert!(!ws_path.exists(), "the damaged WS is still there");
    // The first two chunks were installed (or served from the WS), not read from the file:
    // of the 1448 pages outside chunks 0 and 1's runs, the file served what the guest read.
    let (from_file, _) = reap.live.faults_and_bytes();
    let from_ws_chunks: u64 = header.runs[..header.chunks[2].runs.start]
        .iter()
        .map(|r| u64::from(r.pages))
        .sum();
    assert_eq!(from_file, REGION_PAGES - from_ws_chunks);
    drop(handlers);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A merge of misses starts from the touches the WS was recorded from (its touch log), not
/// from the WS's own pages, which are sorted within chunks and include the gaps the chunks
/// join: the merged WS and log hold the recorded touches, then the misses, and nothing else.
#[test]
fn a_merge_adds_the_misses_to_the_recorded_touches() {
    let scratch = Scratch::new("merge");
    // 10 and 12 are one page apart: the WS joins them with 11 between.
    record_pages(&scratch, &[10, 12, 30]);
    let options = ReapOptions {
        merge_misses: true,
        ..Default::default()
    };
    let (mem, reap, _handlers) = restore(&scratch, options);
    assert_eq!(reap.report.pages_prefetched, 4, "10, 11, 12 and 30");
    for page in [11, 50, 20] {
        check_page(&mem, page);
    }
    let state = reap
        .recorder
        .expect("merging records the misses")
        .finish("the test ends it", Duration::from_secs(10));
    // 11 was installed with the WS: the misses are 50 and 20.
    assert!(
        matches!(state, RecordingState::Written { pages: 5, .. }),
        "{state:?}"
    );
    let log =
        TouchLog::decode(&std::fs::read(touch_log::path_for(&scratch.ws_path())).unwrap()).unwrap();
    let logged: Vec<u64> = log
        .touches
        .iter()
        .map(|t| t.file_offset / PAGE_SIZE as u64)
        .collect();
    assert_eq!(logged, vec![10, 12, 30, 50, 20]);
    let bytes = std::fs::read(scratch.ws_path()).unwrap();
    let header = snapshot::ws::Header::decode(&bytes).unwrap();
    // The touches, and 11 joined between 10 and 12: no more.
    assert_eq!(header.pages(), 6);
}
