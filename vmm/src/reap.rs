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

use snapshot::ws::{self, RunKind, SnapshotIdentity, WorkingSet, WsRegion};
use userfaultfd::Uffd;
use vmm_sys_util::eventfd::EventFd;

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

/// Installs every run of `ws` into the registered guest memory; returns the pages installed.
pub fn install(uffd: &Uffd, mappings: &[GuestRegionUffdMapping], ws: &WorkingSet<'_>) -> u64 {
    let mut installed = 0u64;
    for (run, data) in ws.runs_with_data() {
        let len = run.pages as usize * ws.page_size as usize;
        // decode() checked that each run lies inside one region of this layout.
        let Some(host) = uffd_backend::host_addr_of(mappings, run.file_offset) else {
            continue;
        };
        let result = match data {
            // SAFETY: [host, host+len) is registered guest memory (one region, checked by
            // decode against the same layout) that lives as long as the process; `data`
            // holds `len` bytes.
            Some(bytes) => unsafe { uffd.copy(bytes.as_ptr().cast(), host as *mut _, len, true) },
            // SAFETY: as above, for a range of registered guest memory.
            None => unsafe { uffd.zeropage(host as *mut _, len, true) },
        };
        match result {
            Ok(_) => installed += u64::from(run.pages),
            // Pages someone already faulted in stay as they are; the rest arrive on demand.
            Err(e) => log::warn!(
                "REAP: installing {} pages at file offset {:#x} failed: {e}",
                run.pages,
                run.file_offset
            ),
        }
    }
    installed
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

impl crate::metrics::FaultSource for Recorder {
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
                            let result = write_ws(&file, &pages, &target);
                            writer.set_state(match result {
                                Ok(()) => RecordingState::Written {
                                    pages: pages.len() as u64,
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
