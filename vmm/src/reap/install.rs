//! Installing a WS into userfaultfd-registered guest memory: all of it before the guest runs
//! (the paper), or in order of first touch while the guest runs (chunked).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use snapshot::ws::{self, SnapshotIdentity, WsRegion};
use snapshot::PAGE_SIZE;
use userfaultfd::Uffd;

use super::{FetchedWs, ReapError};
use crate::metrics::FaultSource;
use crate::uffd::{
    install_page, FaultError, FaultLoop, FaultStats, FileSource, HandlerStop, Installed, PageFault,
    PageSource, UffdRegions,
};
use crate::vcpu::ExitSignal;

/// Installs every run of `ws` into the registered guest memory before the guest runs (the
/// paper's REAP); returns the pages installed.
pub fn install_all(uffd: &Uffd, regions: &UffdRegions, ws: &WsPages) -> u64 {
    let mut installed = 0u64;
    for &(offset, pages, data) in &ws.runs {
        // decode() checked that each run lies inside one region of this layout.
        let Some(host) = regions.host_addr_of(offset) else {
            continue;
        };
        let len = pages as usize * ws.page_size;
        let src = data.map(|d| ws.fetched.bytes[d..].as_ptr());
        // SAFETY: the run is registered guest memory alive for the process (checked against
        // this layout by decode); `src` holds `len` bytes of the WS.
        installed += unsafe { install_range(uffd, host, src, len) };
    }
    installed
}

/// A checked WS kept in memory, with its runs looked up by memory-file offset.
pub struct WsPages {
    fetched: FetchedWs,
    page_size: usize,
    /// (file offset, pages, start of the run's data in `fetched.bytes`; None for zero runs),
    /// in order of first touch.
    runs: Vec<(u64, u32, Option<usize>)>,
    /// Indexes into `runs`, sorted by file offset.
    by_offset: Vec<usize>,
}

impl WsPages {
    /// Every page of the WS (memory-file offsets), in order of first touch.
    pub fn page_offsets(&self) -> Vec<u64> {
        self.runs
            .iter()
            .flat_map(|&(start, pages, _)| {
                (0..u64::from(pages)).map(move |i| start + i * self.page_size as u64)
            })
            .collect()
    }
}

impl WsPages {
    /// Checks `fetched` against the snapshot and indexes its runs.
    pub fn new(
        fetched: FetchedWs,
        identity: SnapshotIdentity,
        layout: &[WsRegion],
    ) -> Result<Self, ws::WsError> {
        let (page_size, runs) = {
            let ws = ws::decode(&fetched.bytes, identity, layout)?;
            let base = fetched.bytes.as_ptr() as usize;
            let runs: Vec<_> = ws
                .runs_with_data()
                .map(|(run, data)| {
                    (
                        run.file_offset,
                        run.pages,
                        data.map(|d| d.as_ptr() as usize - base),
                    )
                })
                .collect();
            (ws.page_size as usize, runs)
        };
        let mut by_offset: Vec<usize> = (0..runs.len()).collect();
        by_offset.sort_by_key(|&i| runs[i].0);
        Ok(Self {
            fetched,
            page_size,
            runs,
            by_offset,
        })
    }

    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.1)).sum()
    }

    /// The page at memory-file `offset`, if the WS has it: Some(Some(bytes)) for data,
    /// Some(None) for a zero page.
    fn page(&self, offset: u64) -> Option<Option<&[u8]>> {
        let at = self
            .by_offset
            .partition_point(|&i| self.runs[i].0 <= offset)
            .checked_sub(1)?;
        let (start, pages, data) = self.runs[self.by_offset[at]];
        let end = start + u64::from(pages) * self.page_size as u64;
        if offset >= end {
            return None;
        }
        Some(data.map(|d| {
            let from = d + (offset - start) as usize;
            &self.fetched.bytes[from..from + self.page_size]
        }))
    }
}

/// Installs `len` bytes at `host` (from `src`, or zeroes), skipping pages already present;
/// returns the pages this call installed.
///
/// # Safety
/// `[host, host + len)` must be registered guest memory that outlives the call, and `src`
/// (if given) must hold `len` readable bytes.
unsafe fn install_range(uffd: &Uffd, host: u64, src: Option<*const u8>, len: usize) -> u64 {
    let mut done = 0usize;
    let mut installed = 0u64;
    // After a failure, one page at a time until the page in the way is skipped.
    let mut single_page = false;
    while done < len {
        let step = if single_page { PAGE_SIZE } else { len - done };
        let dst = (host + done as u64) as *mut libc::c_void;
        // SAFETY: within the caller's range and source, per the contract above.
        let result = unsafe {
            match src {
                Some(p) => uffd.copy(p.add(done).cast(), dst, step, true),
                None => uffd.zeropage(dst, step, true),
            }
        };
        let progress = match result {
            Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) => n,
            Err(userfaultfd::Error::CopyFailed(_) | userfaultfd::Error::ZeropageFailed(_)) => 0,
            Err(e) => {
                log::warn!("REAP: installing at {dst:p} failed: {e}");
                0
            }
        };
        // The count comes from the kernel: never trust it past the step.
        if progress > 0 && progress <= step && progress % PAGE_SIZE == 0 {
            installed += (progress / PAGE_SIZE) as u64;
            done += progress;
            single_page = false;
        } else if single_page {
            // This page is there already (a fault got it first) or cannot be installed:
            // skip it, then go back to whole-run copies.
            done += PAGE_SIZE;
            single_page = false;
        } else {
            single_page = true;
        }
    }
    installed
}

/// What a chunked install did, read live by the metrics.
#[derive(Debug, Default)]
pub struct ChunkedInstallStats {
    /// Pages read from the memory file because the WS lacked them.
    pub file: Arc<FaultStats>,
    /// Faults answered from the WS before the installer got there.
    pub from_ws: AtomicU64,
    /// Pages the installer put in.
    pub installed: AtomicU64,
    /// When the installer finished, in microseconds after it started (0 while it runs).
    pub install_us: AtomicU64,
}

impl FaultSource for ChunkedInstallStats {
    fn faults_and_bytes(&self) -> (u64, u64) {
        self.file.faults_and_bytes()
    }

    fn prefetch_progress(&self) -> Option<(u64, u64, u64)> {
        Some((
            self.installed.load(Ordering::Relaxed) + self.from_ws.load(Ordering::Relaxed),
            self.install_us.load(Ordering::Relaxed),
            self.from_ws.load(Ordering::Relaxed),
        ))
    }
}

/// Installs `ws` in order of first touch on one thread while the fault loop serves faults:
/// from the WS when it has the page (the vCPU waits for that page only), from `file`
/// otherwise.
pub fn spawn_chunked_install(
    uffd: Arc<Uffd>,
    on_demand: FileSource,
    regions: Arc<UffdRegions>,
    ws: WsPages,
    stop: Arc<HandlerStop>,
    exit: Option<Arc<ExitSignal>>,
) -> Result<Arc<ChunkedInstallStats>, ReapError> {
    let stats = Arc::new(ChunkedInstallStats {
        file: on_demand.stats(),
        ..Default::default()
    });
    let ws = Arc::new(ws);
    {
        let (uffd, ws, regions, stats) = (uffd.clone(), ws.clone(), regions.clone(), stats.clone());
        let installer_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fc_ws_install".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Uffd) {
                    // The fault loop serves every page from the memory file instead.
                    log::error!("REAP: {e}; the WS is not installed ahead");
                    return;
                }
                let started = Instant::now();
                for &(offset, pages, data) in &ws.runs {
                    // A failed restore, or the VM gone: the memory may go next.
                    if installer_stop.is_stopped() {
                        return;
                    }
                    let Some(host) = regions.host_addr_of(offset) else {
                        continue;
                    };
                    let len = pages as usize * ws.page_size;
                    let src = data.map(|d| ws.fetched.bytes[d..].as_ptr());
                    // SAFETY: decode() checked the run lies in one region of this layout,
                    // registered; the memory outlives this thread (the HandlerStop that
                    // joins it is dropped before the guest memory); `src` has `len` bytes.
                    let n = unsafe { install_range(&uffd, host, src, len) };
                    stats.installed.fetch_add(n, Ordering::Relaxed);
                }
                stats.install_us.store(
                    started.elapsed().as_micros().max(1) as u64,
                    Ordering::Release,
                );
            })
            .map_err(ReapError::Thread)?;
        stop.track(thread);
    }
    let source = WsThenFile {
        ws: Some(ws),
        on_demand,
        stats: stats.clone(),
    };
    FaultLoop::new(uffd, regions, stop, exit, source).spawn("fc_uffd")?;
    Ok(stats)
}

/// A chunked install's page source: a WS page from the WS (the installer may not have got
/// there yet), any other page from the memory file.
struct WsThenFile {
    /// Dropped once the installer is done: every WS page is in then.
    ws: Option<Arc<WsPages>>,
    on_demand: FileSource,
    stats: Arc<ChunkedInstallStats>,
}

impl PageSource for WsThenFile {
    fn serve(&mut self, uffd: &Uffd, fault: PageFault) -> Result<Installed, FaultError> {
        if self.ws.is_some() && self.stats.install_us.load(Ordering::Acquire) != 0 {
            self.ws = None;
        }
        match self.ws.as_ref().and_then(|ws| ws.page(fault.offset)) {
            Some(data) => {
                let installed = install_page(uffd, fault.host_addr, fault.offset, data)?;
                if installed == Installed::Now {
                    self.stats.from_ws.fetch_add(1, Ordering::Relaxed);
                }
                Ok(installed)
            }
            None => self.on_demand.serve(uffd, fault),
        }
    }

    fn on_loop_failed(&mut self, why: &str) {
        log::error!("REAP: page fault handler stops: {why}");
    }
}
