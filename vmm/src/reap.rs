//! REAP (record-and-prefetch) restores. Without a working-set (WS) file the restored guest's
//! memory is served on demand from the memory file while every page served is logged in
//! first-touch order; when the first invocation ends (the agent says so), the VM pauses,
//! stops, or the API asks, the logged pages are written as the WS file. With a valid WS
//! file, all of it is read at once and installed with UFFDIO_COPY / UFFDIO_ZEROPAGE before
//! the guest runs; what the WS lacks is then served on demand.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use snapshot::ws::{self, RunKind, SnapshotIdentity, WsRegion};
use userfaultfd::Uffd;
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::{FaultSource, MemoryRestoreReport};
use crate::persist::MemoryRegionState;
use crate::uffd_backend::{self, FaultStats, GuestRegionUffdMapping, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum ReapError {
    #[error("cannot read the WS file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the REAP thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot create the recording stop event: {0}")]
    EventFd(std::io::Error),
}

/// How a REAP restore fetches and installs its working set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapOptions {
    /// Read the WS file with O_DIRECT (bypassing the page cache; where the filesystem
    /// supports it).
    pub o_direct: bool,
    /// Read the WS file while the vmstate, KVM and device state are restored, rather than
    /// after (beyond the paper).
    pub fetch_in_parallel: bool,
    /// Let the vCPUs run at once while a thread installs the WS in order of first touch; a
    /// vCPU that faults on a WS page not yet installed gets it from the WS at once (beyond
    /// the paper, which installs all of it first).
    pub chunked_install: bool,
    /// After a prefetch, log the pages still faulted on demand until the first invocation is
    /// answered and append them to the WS (not with `chunked_install`).
    pub merge_misses: bool,
    /// With `merge_misses`: more misses than this remove the WS instead, so the next
    /// restore records a fresh one.
    pub rerecord_threshold: Option<u64>,
}

/// The snapshot's regions as the WS file records them.
pub fn ws_layout(layout: &[MemoryRegionState]) -> Vec<WsRegion> {
    layout
        .iter()
        .map(|r| WsRegion {
            guest_addr: r.guest_addr,
            size: r.size,
            file_offset: r.file_offset,
        })
        .collect()
}

/// A buffer aligned for O_DIRECT reads.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: the buffer is plain owned memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (`Deref`); writing needs `&mut self`, as for a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(capacity: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(capacity.max(PAGE_SIZE), PAGE_SIZE)
            .expect("page-aligned layout")
    }

    fn zeroed(capacity: usize) -> Self {
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            capacity: layout.size(),
            len: 0,
        }
    }

    fn spare(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds `capacity` initialized (zeroed) bytes; `len <= capacity`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(self.len),
                self.capacity - self.len,
            )
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the allocation are initialized.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

/// A WS file read into memory, and how long the read took.
pub struct FetchedWs {
    pub bytes: AlignedBuf,
    pub took: Duration,
}

/// Reads the whole WS file at `path` in as few reads as the kernel allows; None if there is
/// no file there (the restore then records one).
pub fn fetch(path: &Path, o_direct: bool) -> Result<Option<FetchedWs>, ReapError> {
    let started = Instant::now();
    let read_err = |source| ReapError::Read {
        path: path.to_path_buf(),
        source,
    };
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    };
    let file = match open(if o_direct { libc::O_DIRECT } else { 0 }) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // tmpfs and some others refuse O_DIRECT: read through the page cache then.
        Err(e) if o_direct && e.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!(
                "{}: O_DIRECT not supported here; reading it buffered",
                path.display()
            );
            open(0).map_err(read_err)?
        }
        Err(e) => return Err(read_err(e)),
    };
    let len = file.metadata().map_err(read_err)?.len() as usize;
    let mut buf = AlignedBuf::zeroed(len.div_ceil(PAGE_SIZE) * PAGE_SIZE);
    loop {
        let at = buf.len as u64;
        let spare = buf.spare();
        if spare.is_empty() {
            break;
        }
        match file.read_at(spare, at) {
            Ok(0) => break,
            Ok(n) => buf.len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
        // O_DIRECT needs block-aligned offsets: a short read is the end of the file.
        if buf.len % PAGE_SIZE != 0 {
            break;
        }
    }
    buf.len = buf.len.min(len);
    Ok(Some(FetchedWs {
        bytes: buf,
        took: started.elapsed(),
    }))
}

/// Installs every run of `ws` into the registered guest memory before the guest runs (the
/// paper's REAP); returns the pages installed.
pub fn install_all(uffd: &Uffd, mappings: &[GuestRegionUffdMapping], ws: &WsPages) -> u64 {
    let mut installed = 0u64;
    for &(offset, pages, data) in &ws.runs {
        // decode() checked that each run lies inside one region of this layout.
        let Some(host) = uffd_backend::host_addr_of(mappings, offset) else {
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
    let mut page_by_page = false;
    while done < len {
        let step = if page_by_page { PAGE_SIZE } else { len - done };
        let dst = (host + done as u64) as *mut libc::c_void;
        // SAFETY: within the caller's range and source, per the contract above.
        let result = unsafe {
            match src {
                Some(p) => uffd.copy(p.add(done).cast(), dst, step, true),
                None => uffd.zeropage(dst, step, true),
            }
        };
        match result {
            Ok(n) if n > 0 => {
                installed += (n / PAGE_SIZE) as u64;
                done += n;
            }
            Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 => {
                installed += (n / PAGE_SIZE) as u64;
                done += n;
            }
            // The page is there already (a fault got it first), or a zero run stopped part
            // way (the crate does not say where): go on page by page.
            Ok(_)
            | Err(userfaultfd::Error::PartiallyCopied(_))
            | Err(userfaultfd::Error::CopyFailed(_))
            | Err(userfaultfd::Error::ZeropageFailed(_)) => {
                if page_by_page {
                    done += PAGE_SIZE;
                }
                page_by_page = true;
            }
            Err(e) => {
                log::warn!("REAP: installing at {dst:p} failed: {e}");
                done += PAGE_SIZE;
                page_by_page = true;
            }
        }
    }
    installed
}

/// What a chunked install did, read live by the metrics.
#[derive(Debug, Default)]
pub struct ChunkedInstallStats {
    /// Pages read from the memory file because the WS lacked them.
    pub file: FaultStats,
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

/// Installs `ws` in order of first touch on one thread while another serves faults: from
/// the WS when it has the page (the vCPU waits for that page only), from `file` otherwise.
pub fn spawn_chunked_install(
    uffd: Uffd,
    file: File,
    mappings: Vec<GuestRegionUffdMapping>,
    ws: WsPages,
) -> Result<Arc<ChunkedInstallStats>, ReapError> {
    let stats = Arc::new(ChunkedInstallStats::default());
    let uffd = Arc::new(uffd);
    let ws = Arc::new(ws);
    let mappings = Arc::new(mappings);
    {
        let (uffd, ws, mappings, stats) =
            (uffd.clone(), ws.clone(), mappings.clone(), stats.clone());
        std::thread::Builder::new()
            .name("fc_ws_install".into())
            .spawn(move || {
                let started = Instant::now();
                for &(offset, pages, data) in &ws.runs {
                    let Some(host) = uffd_backend::host_addr_of(&mappings, offset) else {
                        continue;
                    };
                    let len = pages as usize * ws.page_size;
                    let src = data.map(|d| ws.fetched.bytes[d..].as_ptr());
                    // SAFETY: decode() checked the run lies in one region of this layout,
                    // registered and alive for the process; `src` has `len` bytes.
                    let n = unsafe { install_range(&uffd, host, src, len) };
                    stats.installed.fetch_add(n, Ordering::Relaxed);
                }
                stats.install_us.store(
                    started.elapsed().as_micros().max(1) as u64,
                    Ordering::Relaxed,
                );
            })
            .map_err(ReapError::Thread)?;
    }
    let thread_stats = stats.clone();
    std::thread::Builder::new()
        .name("fc_uffd".into())
        .spawn(move || serve_with_ws(&uffd, &file, &mappings, &ws, &thread_stats))
        .map_err(ReapError::Thread)?;
    Ok(stats)
}

fn serve_with_ws(
    uffd: &Uffd,
    file: &File,
    mappings: &[GuestRegionUffdMapping],
    ws: &WsPages,
    stats: &ChunkedInstallStats,
) {
    let mut page = vec![0u8; PAGE_SIZE];
    loop {
        if let Err(e) = uffd_backend::wait_readable(uffd.as_raw_fd()) {
            log::error!("REAP: page fault handler stops: {e}");
            return;
        }
        loop {
            let event = match uffd.read_event() {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => {
                    log::error!("REAP: page fault handler stops: {e}");
                    return;
                }
            };
            let userfaultfd::Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let addr = addr as u64 & !(PAGE_SIZE as u64 - 1);
            let offset = mappings
                .iter()
                .find(|m| {
                    addr >= m.base_host_virt_addr && addr < m.base_host_virt_addr + m.size as u64
                })
                .map(|m| m.offset + (addr - m.base_host_virt_addr));
            match offset.and_then(|o| ws.page(o)) {
                Some(data) => {
                    // SAFETY: `addr` is a page of registered guest memory; `data` is a page.
                    let n =
                        unsafe { install_range(uffd, addr, data.map(<[u8]>::as_ptr), PAGE_SIZE) };
                    if n == 0 {
                        // The installer got there first: wake whoever waits.
                        let _ = uffd.wake(addr as *mut _, PAGE_SIZE);
                    }
                    stats.from_ws.fetch_add(n, Ordering::Relaxed);
                }
                None => {
                    let _ = uffd_backend::serve_event(
                        uffd,
                        file,
                        mappings,
                        &stats.file,
                        &mut page,
                        event,
                    );
                }
            }
        }
    }
}

/// What a REAP restore works with.
pub struct ReapSetup {
    pub uffd: Uffd,
    pub mappings: Vec<GuestRegionUffdMapping>,
    pub file: File,
    pub ws_path: PathBuf,
    pub options: ReapOptions,
    pub identity: SnapshotIdentity,
    pub layout: Vec<WsRegion>,
}

/// How a REAP restore serves memory, for the metrics and the VM.
pub struct ReapMemory {
    pub report: MemoryRestoreReport,
    pub live: Arc<dyn FaultSource>,
    /// Set when this restore records a WS.
    pub recorder: Option<Arc<Recorder>>,
}

/// Prefetches the fetched WS (all of it now, or in the background with `chunked_install`)
/// and serves the rest on demand; without a usable WS, records one. `report` arrives with
/// the backend, mode `record` and the vmstate time filled in.
pub fn restore_memory(
    setup: ReapSetup,
    fetched: Result<Option<FetchedWs>, ReapError>,
    mut report: MemoryRestoreReport,
) -> Result<ReapMemory, ReapError> {
    let ReapSetup {
        uffd,
        mappings,
        file,
        ws_path,
        options,
        identity,
        layout,
    } = setup;
    let refused = |report: &mut MemoryRestoreReport, why: String| {
        log::warn!("REAP: {why}; recording a new WS");
        report.ws_error = Some(why);
    };
    let fetched = fetched.unwrap_or_else(|e| {
        refused(&mut report, e.to_string());
        None
    });
    if let Some(fetched) = fetched {
        report.bytes_read = fetched.bytes.len() as u64;
        let read_time = fetched.took;
        let checking = Instant::now();
        match WsPages::new(fetched, identity, &layout) {
            Ok(ws) => {
                // Fetching means having the WS in memory and checked.
                report.ws_fetch_us = (read_time + checking.elapsed()).as_micros() as u64;
                report.mode = "prefetch".into();
                let live: Arc<dyn FaultSource> = if options.chunked_install {
                    log::info!(
                        "REAP: installing {} pages of {} while the guest runs",
                        ws.pages(),
                        ws_path.display()
                    );
                    spawn_chunked_install(uffd, file, mappings, ws)?
                } else {
                    let started = Instant::now();
                    report.pages_prefetched = install_all(&uffd, &mappings, &ws);
                    report.ws_install_us = started.elapsed().as_micros() as u64;
                    log::info!(
                        "REAP: {} pages of {} installed in {} us (WS read and checked in {} us)",
                        report.pages_prefetched,
                        ws_path.display(),
                        report.ws_install_us,
                        report.ws_fetch_us
                    );
                    if options.merge_misses {
                        // The misses are recorded like a WS, behind the existing one.
                        let target = WsTarget {
                            path: ws_path,
                            identity,
                            layout,
                            base_pages: ws.page_offsets(),
                            rerecord_above: options.rerecord_threshold,
                        };
                        let recorder = Recorder::spawn(uffd, file, mappings, target)?;
                        return Ok(ReapMemory {
                            report,
                            live: recorder.clone(),
                            recorder: Some(recorder),
                        });
                    }
                    uffd_backend::spawn_on_demand_handler(uffd, file, mappings)
                        .map_err(|e| ReapError::Thread(std::io::Error::other(e.to_string())))?
                };
                if options.merge_misses && options.chunked_install {
                    log::warn!("REAP: merge_misses is not available with chunked_install");
                }
                return Ok(ReapMemory {
                    report,
                    live,
                    recorder: None,
                });
            }
            Err(e) => refused(
                &mut report,
                format!("WS file {} refused: {e}", ws_path.display()),
            ),
        }
    }
    let target = WsTarget {
        path: ws_path,
        identity,
        layout,
        base_pages: Vec::new(),
        rerecord_above: None,
    };
    let recorder = Recorder::spawn(uffd, file, mappings, target)?;
    Ok(ReapMemory {
        report,
        live: recorder.clone(),
        recorder: Some(recorder),
    })
}

/// Where a recording stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordingState {
    Recording,
    /// The WS is being written.
    Writing,
    Written {
        pages: u64,
        path: PathBuf,
    },
    Failed(String),
}

/// Records the pages a restored guest touches and writes them as a WS file when told to.
pub struct Recorder {
    recording: AtomicBool,
    stop_evt: EventFd,
    state: Mutex<RecordingState>,
    changed: Condvar,
    pub stats: Arc<FaultStats>,
    recorded_pages: AtomicU64,
}

impl FaultSource for Recorder {
    fn faults_and_bytes(&self) -> (u64, u64) {
        self.stats.faults_and_bytes()
    }

    fn recorded_pages(&self) -> u64 {
        self.recorded_pages.load(Ordering::Relaxed)
    }
}

/// What the recording writer needs to turn page offsets into the WS file.
pub struct WsTarget {
    pub path: PathBuf,
    pub identity: SnapshotIdentity,
    pub layout: Vec<WsRegion>,
    /// Merging misses into an existing WS: its pages, in order, come first.
    pub base_pages: Vec<u64>,
    /// Merging: past this many misses the WS is removed, so the next restore records anew.
    pub rerecord_above: Option<u64>,
}

impl Recorder {
    /// Starts serving faults from `file` on a thread of its own, recording each page.
    pub fn spawn(
        uffd: Uffd,
        file: File,
        mappings: Vec<GuestRegionUffdMapping>,
        target: WsTarget,
    ) -> Result<Arc<Self>, ReapError> {
        let recorder = Arc::new(Self {
            recording: AtomicBool::new(true),
            stop_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(ReapError::EventFd)?,
            state: Mutex::new(RecordingState::Recording),
            changed: Condvar::new(),
            stats: Arc::new(FaultStats::default()),
            recorded_pages: AtomicU64::new(0),
        });
        let thread_recorder = recorder.clone();
        std::thread::Builder::new()
            .name("fc_uffd_rec".into())
            .spawn(move || thread_recorder.serve(&uffd, file, &mappings, target))
            .map_err(ReapError::Thread)?;
        Ok(recorder)
    }

    /// Ends the recording (once; later calls do nothing): the WS file is written in the
    /// background while faults go on being served.
    pub fn stop(&self, why: &str) {
        if self.recording.swap(false, Ordering::AcqRel) {
            log::info!("REAP: recording ends ({why})");
            let _ = self.stop_evt.write(1);
        }
    }

    pub fn state(&self) -> RecordingState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Pages recorded so far.
    pub fn recorded_pages(&self) -> u64 {
        self.recorded_pages.load(Ordering::Relaxed)
    }

    /// Stops the recording and waits up to `timeout` for the WS file to be written.
    pub fn finish(&self, why: &str, timeout: Duration) -> RecordingState {
        self.stop(why);
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while matches!(*state, RecordingState::Recording | RecordingState::Writing) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.clone()
    }

    fn set_state(&self, state: RecordingState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        self.changed.notify_all();
    }

    fn serve(
        self: Arc<Self>,
        uffd: &Uffd,
        file: File,
        mappings: &[GuestRegionUffdMapping],
        target: WsTarget,
    ) {
        let file = Arc::new(file);
        let mut page = vec![0u8; PAGE_SIZE];
        let mut touched: Vec<u64> = Vec::new();
        let mut target = Some(target);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop_evt.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Once the recording is written only faults matter.
            let nfds = if target.is_some() { 2 } else { 1 };
            // SAFETY: `fds` holds `nfds` valid pollfd entries for descriptors we own.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("REAP: page fault handler stops: poll failed: {e}");
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                log::error!("REAP: the userfaultfd reports an error; page fault handler stops");
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                loop {
                    match uffd.read_event() {
                        Ok(Some(event)) => {
                            let served = uffd_backend::serve_event(
                                uffd,
                                &file,
                                mappings,
                                &self.stats,
                                &mut page,
                                event,
                            );
                            if let (Some(offset), true) = (served, target.is_some()) {
                                touched.push(offset);
                                self.recorded_pages.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            log::error!("REAP: page fault handler stops: {e}");
                            return;
                        }
                    }
                }
            }
            if nfds == 2 && fds[1].revents & libc::POLLIN != 0 {
                let _ = self.stop_evt.read();
                if let Some(target) = target.take() {
                    self.set_state(RecordingState::Writing);
                    let pages = std::mem::take(&mut touched);
                    let writer = self.clone();
                    let file = file.clone();
                    let spawned = std::thread::Builder::new()
                        .name("fc_ws_writer".into())
                        .spawn(move || {
                            let result = finish_ws(&file, &pages, &target);
                            writer.set_state(match result {
                                Ok(pages) => RecordingState::Written {
                                    pages,
                                    path: target.path.clone(),
                                },
                                Err(e) => {
                                    log::error!("REAP: {e}");
                                    RecordingState::Failed(e)
                                }
                            });
                        });
                    if let Err(e) = spawned {
                        self.set_state(RecordingState::Failed(format!(
                            "cannot start the WS writer: {e}"
                        )));
                    }
                }
            }
        }
    }
}

/// What ending a recording writes: a WS of the touched pages; when merging misses into an
/// existing WS, that WS's pages then the misses, or no WS at all past the re-record
/// threshold. Returns the pages in the WS written.
fn finish_ws(mem_file: &File, touched: &[u64], target: &WsTarget) -> Result<u64, String> {
    if target.base_pages.is_empty() {
        write_ws(mem_file, touched, target)?;
        return Ok(touched.len() as u64);
    }
    let misses = touched.len() as u64;
    if target.rerecord_above.is_some_and(|limit| misses > limit) {
        std::fs::remove_file(&target.path)
            .map_err(|e| format!("cannot remove the WS {}: {e}", target.path.display()))?;
        log::info!(
            "REAP: {misses} pages missed the WS, past the re-record threshold: {} removed, the next restore records a new one",
            target.path.display()
        );
        return Ok(0);
    }
    if misses == 0 {
        return Ok(target.base_pages.len() as u64);
    }
    let mut pages = target.base_pages.clone();
    pages.extend_from_slice(touched);
    write_ws(mem_file, &pages, target)?;
    log::info!("REAP: {misses} missed pages merged into the WS");
    Ok(pages.len() as u64)
}

/// Writes the WS file for the pages at `offsets` (memory-file offsets in first-touch order),
/// their contents taken from the memory file as the snapshot has them.
fn write_ws(mem_file: &File, offsets: &[u64], target: &WsTarget) -> Result<(), String> {
    let started = Instant::now();
    let mut pages = Vec::with_capacity(offsets.len());
    let mut data = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for &offset in offsets {
        mem_file
            .read_exact_at(&mut page, offset)
            .map_err(|e| format!("cannot read page {offset:#x} of the memory file: {e}"))?;
        if page.iter().all(|&b| b == 0) {
            pages.push((offset, RunKind::Zero));
        } else {
            pages.push((offset, RunKind::Data));
            data.extend_from_slice(&page);
        }
    }
    let runs = ws::coalesce(&pages, PAGE_SIZE as u32);
    let bytes = ws::encode(
        target.identity,
        PAGE_SIZE as u32,
        &target.layout,
        &runs,
        &data,
    );
    ws::write(&target.path, &bytes)
        .map_err(|e| format!("cannot write the WS file {}: {e}", target.path.display()))?;
    log::info!(
        "REAP: WS of {} pages ({} zero) in {} runs, {} KiB, written to {} in {} ms",
        offsets.len(),
        offsets.len() - data.len() / PAGE_SIZE,
        runs.len(),
        bytes.len() / 1024,
        target.path.display(),
        started.elapsed().as_millis()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_reads_whole_files_and_reports_missing_ones() {
        let dir = std::env::temp_dir().join(format!("reapvm-reap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(fetch(&dir.join("none"), false).unwrap().is_none());
        let path = dir.join("ws");
        let content: Vec<u8> = (0..3 * PAGE_SIZE + 123).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        for direct in [false, true] {
            let got = fetch(&path, direct).unwrap().unwrap();
            assert_eq!(&got.bytes[..], &content[..], "o_direct {direct}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
