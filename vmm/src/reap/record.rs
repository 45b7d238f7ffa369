//! Recording the pages a restored guest touches and writing them as a WS file.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use snapshot::touch_log::{self, Touch, TouchLog};
use snapshot::ws::{self, SnapshotIdentity, WsRegion};
use userfaultfd::Uffd;
use vmm_sys_util::eventfd::EventFd;

use super::ReapError;
use crate::metrics::FaultSource;
use crate::uffd::{
    FaultError, FaultLoop, FaultStats, FileSource, HandlerStop, Installed, PageFault, PageSource,
    UffdRegions,
};
use crate::vcpu::ExitSignal;

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
    /// Set by `abandon`: no WS is written.
    abandoned: AtomicBool,
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
    /// Merging misses into an existing WS: its recorded touches, in order, come first.
    pub base_touches: Vec<Touch>,
    /// Merging: past this many misses the WS is removed, so the next restore records anew.
    pub rerecord_above: Option<u64>,
}

impl Recorder {
    /// Starts serving faults from `file` on a thread of its own, recording each page.
    pub fn spawn(
        uffd: Arc<Uffd>,
        pages: FileSource,
        regions: Arc<UffdRegions>,
        target: WsTarget,
        handler_stop: Arc<HandlerStop>,
        exit: Option<Arc<ExitSignal>>,
    ) -> Result<Arc<Self>, ReapError> {
        let recorder = Arc::new(Self {
            recording: AtomicBool::new(true),
            abandoned: AtomicBool::new(false),
            stop_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(ReapError::EventFd)?,
            state: Mutex::new(RecordingState::Recording),
            changed: Condvar::new(),
            stats: pages.stats(),
            recorded_pages: AtomicU64::new(0),
        });
        let source = RecordingSource {
            recorder: recorder.clone(),
            // Fault-around would install pages no touch was recorded for.
            pages: pages.one_page_per_fault(),
            touched: Vec::new(),
            target: Some(target),
        };
        FaultLoop::new(uffd, regions, handler_stop, exit, source).spawn("fc_uffd_rec")?;
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

    /// Ends the recording without writing a WS (a run cut short by a fault is not the
    /// invocation's working set); a WS already written stays.
    pub fn abandon(&self, why: &str) {
        self.abandoned.store(true, Ordering::Release);
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if *state == RecordingState::Recording {
                log::warn!("REAP: recording abandoned, no WS written: {why}");
                *state = RecordingState::Failed(format!("abandoned: {why}"));
            }
        }
        self.changed.notify_all();
        self.stop(why);
    }

    fn set_state(&self, state: RecordingState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        self.changed.notify_all();
    }
}

/// The recording's page source: pages from the memory file, each one installed logged in
/// order of first touch until the recording stops; then the WS is written from the log.
struct RecordingSource {
    recorder: Arc<Recorder>,
    pages: FileSource,
    touched: Vec<Touch>,
    /// Taken when the recording stops and its WS is being written.
    target: Option<WsTarget>,
}

impl PageSource for RecordingSource {
    fn serve(&mut self, uffd: &Uffd, fault: PageFault) -> Result<Installed, FaultError> {
        // Faults after stop() (a snapshot copying memory, the guest after its answer) are
        // served, not recorded. The page is counted before it is installed: once installed,
        // the faulting thread runs on and may stop the recording or read the count.
        let record = self.recorder.recording.load(Ordering::Acquire) && self.target.is_some();
        if record {
            self.recorder.recorded_pages.fetch_add(1, Ordering::AcqRel);
        }
        let installed = self.pages.serve(uffd, fault);
        if installed.is_err() {
            self.recorder.abandon("a page could not be served");
        }
        if record {
            if matches!(installed, Ok(Installed::Now)) {
                self.touched.push(Touch {
                    file_offset: fault.offset,
                    write: fault.write,
                });
            } else {
                // Another fault installed it first and is recorded, or it failed.
                self.recorder.recorded_pages.fetch_sub(1, Ordering::AcqRel);
            }
        }
        installed
    }

    fn wake_fd(&self) -> Option<RawFd> {
        // Once the recording is written only faults (and the end) matter.
        self.target
            .as_ref()
            .map(|_| self.recorder.stop_evt.as_raw_fd())
    }

    fn on_wake(&mut self) {
        let _ = self.recorder.stop_evt.read();
        let Some(target) = self.target.take() else {
            return;
        };
        if self.recorder.abandoned.load(Ordering::Acquire) {
            return;
        }
        self.recorder.set_state(RecordingState::Writing);
        let pages = std::mem::take(&mut self.touched);
        let writer = self.recorder.clone();
        let file = self.pages.file().clone();
        let spawned = std::thread::Builder::new()
            .name("fc_ws_writer".into())
            .spawn(move || {
                let result = crate::seccomp::apply(crate::seccomp::ThreadKind::Uffd)
                    .map_err(|e| e.to_string())
                    .and_then(|()| finish_ws(&file, &pages, &target));
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
            self.recorder.set_state(RecordingState::Failed(format!(
                "cannot start the WS writer: {e}"
            )));
        }
    }

    /// A recording still going on will never be written.
    fn on_loop_failed(&mut self, why: &str) {
        log::error!("REAP: page fault handler stops: {why}");
        let mut state = self
            .recorder
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *state == RecordingState::Recording {
            *state = RecordingState::Failed(format!("the page fault handler stopped: {why}"));
        }
        self.recorder.changed.notify_all();
    }
}

/// What ending a recording writes: a WS of the touched pages and its touch log; when
/// merging misses into an existing WS, that WS's touches then the misses (in the touch log
/// too), or no WS at all past the re-record threshold. Returns the pages recorded in the WS
/// written.
fn finish_ws(mem_file: &File, touched: &[Touch], target: &WsTarget) -> Result<u64, String> {
    let offsets: Vec<u64> = touched.iter().map(|t| t.file_offset).collect();
    if target.base_touches.is_empty() {
        // The log first: whoever sees the WS appear finds its log there too.
        write_touch_log(touched, target);
        write_ws(mem_file, &offsets, target)?;
        return Ok(touched.len() as u64);
    }
    let misses = touched.len() as u64;
    if target.rerecord_above.is_some_and(|limit| misses > limit) {
        std::fs::remove_file(&target.path)
            .map_err(|e| format!("cannot remove the WS {}: {e}", target.path.display()))?;
        let _ = std::fs::remove_file(touch_log::path_for(&target.path));
        log::info!(
            "REAP: {misses} pages missed the WS, past the re-record threshold: {} removed, the next restore records a new one",
            target.path.display()
        );
        return Ok(0);
    }
    if misses == 0 {
        return Ok(target.base_touches.len() as u64);
    }
    let mut all = target.base_touches.clone();
    all.extend_from_slice(touched);
    let pages: Vec<u64> = all.iter().map(|t| t.file_offset).collect();
    write_touch_log(&all, target);
    write_ws(mem_file, &pages, target)?;
    log::info!("REAP: {misses} missed pages merged into the WS");
    Ok(pages.len() as u64)
}

/// Writes the touch log beside the WS. The WS is what restores need: a log that cannot be
/// written is reported, and the recording stands.
fn write_touch_log(touched: &[Touch], target: &WsTarget) {
    let path = touch_log::path_for(&target.path);
    let log = TouchLog {
        identity: target.identity,
        touches: touched.to_vec(),
    };
    match touch_log::write(&path, &log) {
        Ok(()) => log::info!(
            "REAP: touch log of {} pages ({} first touched by a write) written to {}",
            touched.len(),
            touched.iter().filter(|t| t.write).count(),
            path.display()
        ),
        Err(e) => {
            log::warn!("REAP: cannot write the touch log {}: {e}", path.display());
            // An earlier recording's log must not pass for this one's.
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Writes the WS file for the pages at `offsets` (memory-file offsets in first-touch order),
/// their contents taken from the memory file as the snapshot has them.
fn write_ws(mem_file: &File, offsets: &[u64], target: &WsTarget) -> Result<(), String> {
    let started = Instant::now();
    let bytes = ws::build(target.identity, &target.layout, offsets, |offset, page| {
        mem_file
            .read_exact_at(page, offset)
            .map_err(|e| format!("cannot read page {offset:#x} of the memory file: {e}"))
    })?;
    ws::write(&target.path, &bytes)
        .map_err(|e| format!("cannot write the WS file {}: {e}", target.path.display()))?;
    let header = ws::Header::decode(&bytes).map_err(|e| format!("the WS just built: {e}"))?;
    log::info!(
        "REAP: WS of {} touched pages ({} installed with the gaps joined, {} stored) in {} chunks and {} runs, {} KiB, written to {} in {} ms",
        offsets.len(),
        header.pages(),
        header.data_pages(),
        header.chunks.len(),
        header.runs.len(),
        bytes.len() / 1024,
        target.path.display(),
        started.elapsed().as_millis()
    );
    Ok(())
}
