//! Installing a WS into userfaultfd-registered guest memory: all of it before the guest runs
//! (the paper), or chunk by chunk while the guest runs (chunked install, streaming).
//!
//! Runs are installed without waking anyone (UFFDIO_COPY_MODE_DONTWAKE), and each chunk ends
//! with one wake over guest memory, as vHive's REAP does: a vCPU waiting on a page the chunk
//! brought goes on, one waiting on another page faults again and is served then.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use snapshot::ws::Header;
use snapshot::PAGE_SIZE;
use userfaultfd::Uffd;

use super::stream::{ChunkState, WsStream};
use super::ReapError;
use crate::metrics::{FaultSource, PrefetchProgress};
use crate::uffd::{
    install_page, install_range, FaultError, FaultLoop, FaultStats, FileSource, HandlerStop,
    Installed, PageFault, PageSource, UffdRegions,
};
use crate::vcpu::ExitSignal;

/// Installs every chunk of `stream` (all read and checked) before the guest runs (the
/// paper's REAP); returns the pages installed.
pub fn install_all(uffd: &Uffd, regions: &UffdRegions, stream: &WsStream) -> u64 {
    let installed = (0..stream.header.chunks.len())
        .map(|chunk| install_chunk(uffd, regions, stream, chunk))
        .sum();
    wake_all(uffd, regions);
    installed
}

/// Installs chunk `chunk` (read and checked) without waking anyone; returns the pages this
/// call installed.
fn install_chunk(uffd: &Uffd, regions: &UffdRegions, stream: &WsStream, chunk: usize) -> u64 {
    let Some(data) = stream.chunk_data(chunk) else {
        return 0;
    };
    let mut installed = 0;
    for (run, at) in stream.header.chunk_runs(chunk) {
        // The header was checked: each run lies inside one region of this layout.
        let Some(host) = regions.host_addr_of(run.file_offset) else {
            continue;
        };
        let len = run.pages as usize * PAGE_SIZE;
        let src = at.map(|at| data[at..at + len].as_ptr());
        // SAFETY: the run is registered guest memory that outlives the call (the handler
        // threads are joined before guest memory goes); `src` holds `len` bytes of the chunk.
        installed += unsafe { install_range(uffd, host, src, len) };
    }
    installed
}

/// Wakes whoever waits on a fault anywhere in guest memory.
fn wake_all(uffd: &Uffd, regions: &UffdRegions) {
    for m in regions.mappings() {
        if let Err(e) = uffd.wake(m.base_host_virt_addr as *mut libc::c_void, m.size) {
            log::warn!("REAP: waking faults in guest memory failed: {e}");
        }
    }
}

/// The WS's runs by memory-file offset: which chunk holds a page, and where in the chunk's
/// data (None for a zero page).
pub struct PageIndex {
    /// (file offset, pages, chunk, start of the run's data in the chunk), by file offset.
    runs: Vec<(u64, u32, usize, Option<usize>)>,
}

impl PageIndex {
    pub fn new(header: &Header) -> Self {
        let mut runs: Vec<_> = (0..header.chunks.len())
            .flat_map(|chunk| {
                header
                    .chunk_runs(chunk)
                    .map(move |(run, at)| (run.file_offset, run.pages, chunk, at))
            })
            .collect();
        runs.sort_unstable_by_key(|r| r.0);
        Self { runs }
    }

    /// Whether memory-file `offset` is a page of the WS.
    pub fn contains(&self, offset: u64) -> bool {
        self.find(offset).is_some()
    }

    /// The chunk holding memory-file `offset` and where its page is in the chunk's data.
    fn find(&self, offset: u64) -> Option<(usize, Option<usize>)> {
        let at = self
            .runs
            .partition_point(|r| r.0 <= offset)
            .checked_sub(1)?;
        let (start, pages, chunk, data) = self.runs[at];
        let into = offset - start;
        if into >= u64::from(pages) * PAGE_SIZE as u64 {
            return None;
        }
        Some((chunk, data.map(|d| d + into as usize)))
    }
}

/// Every page of the WS (memory-file offsets), in file order (chunks in order of first
/// touch, by address within each).
pub fn page_offsets(header: &Header) -> Vec<u64> {
    header
        .runs
        .iter()
        .flat_map(|r| (0..u64::from(r.pages)).map(move |i| r.file_offset + i * PAGE_SIZE as u64))
        .collect()
}

/// What a chunked install did, read live by the metrics.
pub struct ChunkedInstallStats {
    /// Pages read from the memory file because the WS lacked them (or could not give them).
    pub file: Arc<FaultStats>,
    /// Faults answered from the WS before the installer got there.
    pub from_ws: AtomicU64,
    /// Pages the installer put in.
    pub installed: AtomicU64,
    /// When the installer finished, in microseconds after it started (0 while it runs).
    pub install_us: AtomicU64,
    /// The installer has ended, whichever way (its thread could not start its filter, it
    /// was stopped, or it is done): the fault loop lets go of the WS then.
    installer_ended: AtomicBool,
    /// The stream while it is in use (weak: the metrics must not keep the WS in memory once
    /// it is installed), and what it said when the installer let go of it.
    stream: Weak<WsStream>,
    at_end: Mutex<Option<StreamEnd>>,
}

/// A stream's figures, kept once its buffer is freed.
#[derive(Clone)]
struct StreamEnd {
    read_us: u64,
    bytes_read: u64,
    error: Option<String>,
}

impl StreamEnd {
    fn of(stream: &WsStream) -> Self {
        Self {
            read_us: stream.read_us(),
            bytes_read: stream.bytes_read(),
            error: stream.error(),
        }
    }
}

impl FaultSource for ChunkedInstallStats {
    fn faults_and_bytes(&self) -> (u64, u64) {
        self.file.faults_and_bytes()
    }

    fn prefetch_progress(&self) -> Option<PrefetchProgress> {
        let from_ws = self.from_ws.load(Ordering::Relaxed);
        let stream = match self.stream.upgrade() {
            Some(live) => StreamEnd::of(&live),
            None => self
                .at_end
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()?,
        };
        Some(PrefetchProgress {
            pages: self.installed.load(Ordering::Relaxed) + from_ws,
            install_us: self.install_us.load(Ordering::Relaxed),
            from_ws,
            fetch_us: stream.read_us,
            ws_bytes_read: stream.bytes_read,
            error: stream.error,
        })
    }
}

/// Installs `stream` chunk by chunk, in order of first touch, on one thread while the
/// guest runs and the fault loop serves faults: a WS page from its chunk (waiting for that
/// chunk to be read if need be, not for the whole WS; the one fault loop thread serves no
/// other fault meanwhile, and the chunks come in order), any other page from `on_demand`.
/// Chunks that could not be read are served from `on_demand` too.
pub fn spawn_chunked_install(
    uffd: Arc<Uffd>,
    on_demand: FileSource,
    regions: Arc<UffdRegions>,
    stream: Arc<WsStream>,
    index: Arc<PageIndex>,
    stop: Arc<HandlerStop>,
    exit: Option<Arc<ExitSignal>>,
) -> Result<Arc<ChunkedInstallStats>, ReapError> {
    let stats = Arc::new(ChunkedInstallStats {
        file: on_demand.stats(),
        from_ws: AtomicU64::new(0),
        installed: AtomicU64::new(0),
        install_us: AtomicU64::new(0),
        installer_ended: AtomicBool::new(false),
        stream: Arc::downgrade(&stream),
        at_end: Mutex::new(Some(StreamEnd::of(&stream))),
    });
    {
        let (uffd, stream, regions, stats) =
            (uffd.clone(), stream.clone(), regions.clone(), stats.clone());
        let installer_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fc_ws_install".into())
            .spawn(move || {
                /// However the installer ends, the fault loop stops waiting on chunks and
                /// the WS buffer can go.
                struct Ended<'a>(&'a ChunkedInstallStats);
                impl Drop for Ended<'_> {
                    fn drop(&mut self) {
                        self.0.installer_ended.store(true, Ordering::Release);
                    }
                }
                let _ended = Ended(&stats);
                if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Uffd) {
                    // The fault loop serves every page from the memory file.
                    log::error!("REAP: {e}; the WS is not installed");
                    return;
                }
                let started = Instant::now();
                for chunk in 0..stream.header.chunks.len() {
                    let state = loop {
                        // A failed restore, or the VM gone: the memory may go next.
                        if installer_stop.is_stopped() {
                            stream.stop();
                            return;
                        }
                        if let Some(state) = stream.wait_timeout(chunk, Duration::from_millis(50)) {
                            break state;
                        }
                    };
                    if state == ChunkState::Unread {
                        forget_damaged_ws(&stream);
                        break;
                    }
                    let n = install_chunk(&uffd, &regions, &stream, chunk);
                    wake_all(&uffd, &regions);
                    stats.installed.fetch_add(n, Ordering::Relaxed);
                }
                // The reading is over for good once the installer has every chunk's fate.
                *stats.at_end.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(StreamEnd::of(&stream));
                stats.install_us.store(
                    started.elapsed().as_micros().max(1) as u64,
                    Ordering::Release,
                );
            })
            .map_err(ReapError::Thread)?;
        stop.track(thread);
    }
    let source = WsThenFile {
        stream: Some(stream),
        index,
        on_demand,
        stats: stats.clone(),
    };
    FaultLoop::new(uffd, regions, stop, exit, source).spawn("fc_uffd")?;
    Ok(stats)
}

/// A WS whose reading ended on a damaged chunk after the guest resumed is removed, so that
/// the next restore records a sound one (a restore before the resume records at once). The
/// guest gets the rest of its pages from the memory file. A chunk that could not be read
/// (an I/O error) leaves the file: it may read well next time.
fn forget_damaged_ws(stream: &WsStream) {
    let Some(why) = stream.error() else {
        return;
    };
    if !stream.is_damaged() {
        return;
    }
    // Another recorder may have renamed a sound WS to this path since it was opened.
    if !stream.is_same_file(&stream.path) {
        return;
    }
    match std::fs::remove_file(&stream.path) {
        Ok(()) => log::warn!(
            "REAP: {} removed ({why}): the next restore records a new WS",
            stream.path.display()
        ),
        Err(e) => log::warn!(
            "REAP: {} ({why}) could not be removed: {e}",
            stream.path.display()
        ),
    }
}

/// A chunked install's page source: a WS page from its chunk (the installer may not have
/// got there yet), any other page from the memory file.
struct WsThenFile {
    /// Dropped once the installer has ended: every WS page it could install is in then
    /// (and if it could not run, the memory file serves them).
    stream: Option<Arc<WsStream>>,
    index: Arc<PageIndex>,
    on_demand: FileSource,
    stats: Arc<ChunkedInstallStats>,
}

impl PageSource for WsThenFile {
    fn serve(&mut self, uffd: &Uffd, fault: PageFault) -> Result<Installed, FaultError> {
        if self.stream.is_some() && self.stats.installer_ended.load(Ordering::Acquire) {
            self.stream = None;
        }
        let Some(stream) = self.stream.as_ref() else {
            return self.on_demand.serve(uffd, fault);
        };
        let Some((chunk, at)) = self.index.find(fault.offset) else {
            return self.on_demand.serve(uffd, fault);
        };
        if stream.wait(chunk) == ChunkState::Unread {
            return self.on_demand.serve(uffd, fault);
        }
        let data = stream
            .chunk_data(chunk)
            .map(|bytes| at.map(|at| &bytes[at..at + PAGE_SIZE]));
        let Some(page) = data else {
            return self.on_demand.serve(uffd, fault);
        };
        let installed = install_page(uffd, fault.host_addr, fault.offset, page)?;
        if installed == Installed::Now {
            self.stats.from_ws.fetch_add(1, Ordering::Relaxed);
        }
        Ok(installed)
    }

    fn on_loop_failed(&mut self, why: &str) {
        log::error!("REAP: page fault handler stops: {why}");
    }
}
