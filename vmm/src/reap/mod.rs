//! REAP (record-and-prefetch) restores. Without a working-set (WS) file the restored guest's
//! memory is served on demand from the memory file while every page served is logged in
//! first-touch order; when the first invocation ends (the agent says so), the VM pauses,
//! stops, or the API asks, the logged pages are written as the WS file. With a valid WS
//! file, all of it is read at once and installed with UFFDIO_COPY / UFFDIO_ZEROPAGE before
//! the guest runs (the paper); or it is streamed: the guest resumes once the first chunk is
//! in, and the rest is read and installed while it runs. What the WS lacks is served on
//! demand.

mod install;
mod record;
mod stream;
#[cfg(test)]
mod tests;

pub use install::{
    install_all, page_offsets, spawn_chunked_install, ChunkedInstallStats, PageIndex,
};
pub use record::{Recorder, RecordingState, WsTarget};
pub use stream::{ws_size_limit, ChunkState, WsStream};

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use snapshot::touch_log::{self, Touch, TouchLog};
use snapshot::ws::{SnapshotIdentity, WsRegion};
use userfaultfd::Uffd;

use crate::metrics::{FaultSource, MemoryRestoreReport};
use crate::persist::MemoryRegionState;
use crate::uffd::{FaultLoop, FileSource, HandlerStop, UffdError, UffdRegions};
use crate::vcpu::ExitSignal;

#[derive(Debug, thiserror::Error)]
pub enum ReapError {
    #[error("a REAP thread cannot start: {0}")]
    Seccomp(String),
    #[error("cannot read the WS file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the REAP thread: {0}")]
    Thread(std::io::Error),
    #[error("the WS file {path} is {len} bytes, more than any WS of this snapshot's memory can be ({max}): not read")]
    WsTooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("WS file {path} refused: {source}")]
    Ws {
        path: PathBuf,
        source: snapshot::ws::WsError,
    },
    #[error("the WS reader thread ended without a word")]
    ReaderGone,
    #[error("cannot create the recording stop event: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

/// `reap_options` that cannot work together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReapOptionsError {
    #[error("reap_options: merge_misses does not work with chunked_install")]
    MergeWithChunked,
    #[error("reap_options: merge_misses does not work with streaming")]
    MergeWithStreaming,
    #[error("reap_options: rerecord_threshold needs merge_misses")]
    ThresholdWithoutMerge,
    #[error("reap_options: merge_misses does not work with fault_around_kib (each miss must be seen to be merged)")]
    MergeWithFaultAround,
    #[error("reap_options: {0}")]
    FaultAround(String),
}

/// How a REAP restore fetches and installs its working set (`reap_options` of
/// `PUT /snapshot/load`; all off: the paper's REAP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Stream the WS: read it chunk by chunk on a thread from the moment the load request
    /// arrives, resume the guest as soon as the first chunk is in, and install the rest
    /// while the guest runs (a fault on a WS page waits for its chunk only). Implies
    /// `fetch_in_parallel` and `chunked_install` (beyond the paper).
    pub streaming: bool,
    /// After a prefetch, log the pages still faulted on demand until the first invocation is
    /// answered and append them to the WS (not with `chunked_install` or `streaming`).
    pub merge_misses: bool,
    /// With `merge_misses`: more misses than this remove the WS instead, so the next
    /// restore records a fresh one.
    pub rerecord_threshold: Option<u64>,
    /// Fill each miss (a fault on a page outside the WS) with the aligned block of this many
    /// KiB around it, less the WS's pages (0: the faulting page alone, as the paper does).
    /// Recordings always take one page per fault.
    pub fault_around_kib: u32,
}

impl ReapOptions {
    /// Refuses combinations that cannot work.
    pub fn validate(&self) -> Result<(), ReapOptionsError> {
        if self.merge_misses && self.chunked_install {
            return Err(ReapOptionsError::MergeWithChunked);
        }
        if self.merge_misses && self.streaming {
            return Err(ReapOptionsError::MergeWithStreaming);
        }
        if self.rerecord_threshold.is_some() && !self.merge_misses {
            return Err(ReapOptionsError::ThresholdWithoutMerge);
        }
        if self.merge_misses && self.fault_around_kib != 0 {
            return Err(ReapOptionsError::MergeWithFaultAround);
        }
        crate::uffd::fault_around_pages(self.fault_around_kib)
            .map_err(ReapOptionsError::FaultAround)?;
        Ok(())
    }

    /// Whether the WS is read on a thread started with the load request.
    pub fn reads_in_parallel(&self) -> bool {
        self.fetch_in_parallel || self.streaming
    }

    /// Whether the guest runs while the WS is installed.
    pub fn installs_while_running(&self) -> bool {
        self.chunked_install || self.streaming
    }
}

/// A WS file read, or being read: Ok(None) when there is none (the restore records one).
pub type FetchedWs = Result<Option<Arc<WsStream>>, ReapError>;

/// Reads the whole WS file at `path` in this thread (the paper's REAP: one read, then each
/// chunk checked).
pub fn fetch(path: &Path, o_direct: bool, max_len: u64) -> FetchedWs {
    let Some((stream, mut reader)) = WsStream::open(path, o_direct, max_len)? else {
        return Ok(None);
    };
    stream.read(&mut reader, usize::MAX, || true);
    Ok(Some(Arc::new(stream)))
}

/// A WS file being read on its own thread.
pub struct PendingWs(mpsc::Receiver<FetchedWs>);

impl PendingWs {
    /// Waits for the file's header (not its chunks: see `WsStream::wait`).
    pub fn header_read(self) -> FetchedWs {
        self.0.recv().unwrap_or(Err(ReapError::ReaderGone))
    }
}

/// Starts reading the WS file at `path` on a thread (`fc_ws_fetch`): its header, then its
/// chunks, one per read when `streaming` (each available as soon as it is in), else all in
/// one read.
pub fn spawn_fetch(
    path: PathBuf,
    o_direct: bool,
    max_len: u64,
    streaming: bool,
) -> std::io::Result<PendingWs> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("fc_ws_fetch".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Uffd) {
                let _ = tx.send(Err(ReapError::Seccomp(e.to_string())));
                return;
            }
            match WsStream::open(&path, o_direct, max_len) {
                Ok(Some((stream, mut reader))) => {
                    let stream = Arc::new(stream);
                    // No one waiting any more (the restore failed): nothing to read for. Nor
                    // once the restore lets go of the stream (it failed or refused the WS
                    // later, or the VM is gone): this thread then holds the only reference.
                    if tx.send(Ok(Some(stream.clone()))).is_ok() {
                        let per_read = if streaming { 1 } else { usize::MAX };
                        stream.read(&mut reader, per_read, || Arc::strong_count(&stream) > 1);
                    }
                }
                other => {
                    let _ = tx.send(other.map(|_| None));
                }
            }
        })?;
    Ok(PendingWs(rx))
}

/// The touches a WS was recorded from, in order (its touch log), so that a merge adds the
/// misses to them rather than to the WS's pages, which are sorted within chunks and include
/// the gaps the chunks join. Without a usable log, the WS's own pages stand in, as reads.
fn recorded_touches(ws_path: &Path, header: &snapshot::ws::Header) -> Vec<Touch> {
    let log_path = touch_log::path_for(ws_path);
    let log = std::fs::read(&log_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| TouchLog::decode(&bytes).map_err(|e| e.to_string()))
        .and_then(|log| {
            if log.identity == header.identity {
                Ok(log)
            } else {
                Err("it belongs to another recording".into())
            }
        });
    match log {
        Ok(log) => log.touches,
        Err(why) => {
            log::warn!(
                "REAP: touch log {} not used ({why}): the WS's pages stand for its touches",
                log_path.display()
            );
            page_offsets(header)
                .into_iter()
                .map(|file_offset| Touch {
                    file_offset,
                    write: false,
                })
                .collect()
        }
    }
}

/// Whether `stream` can be prefetched by this restore: it belongs to this snapshot, and what
/// must be in before the guest runs is in (every chunk; with streaming, the first one).
fn usable(
    stream: &WsStream,
    identity: SnapshotIdentity,
    layout: &[WsRegion],
    options: ReapOptions,
) -> Result<(), String> {
    let refused = |why: String| format!("WS file {} refused: {why}", stream.path.display());
    stream
        .header
        .check_snapshot(identity, layout)
        .map_err(|e| refused(e.to_string()))?;
    let in_before_resume = if options.streaming {
        stream.header.chunks.is_empty() || stream.wait(0) == ChunkState::Ready
    } else {
        stream.wait_all()
    };
    if !in_before_resume {
        return Err(refused(
            stream
                .error()
                .unwrap_or_else(|| "it could not be read".into()),
        ));
    }
    Ok(())
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

/// What a REAP restore works with.
pub struct ReapSetup {
    pub uffd: Arc<Uffd>,
    pub regions: Arc<UffdRegions>,
    /// The memory file: what the WS lacks, and the recording's pages, come from it.
    pub mem: FileSource,
    pub ws_path: PathBuf,
    pub options: ReapOptions,
    pub identity: SnapshotIdentity,
    pub layout: Vec<WsRegion>,
    /// Ends the handler threads (a failed restore, the VM gone).
    pub stop: Arc<HandlerStop>,
    /// A page that cannot be served stops the VM through it (None: no VM, only logged).
    pub exit: Option<Arc<ExitSignal>>,
}

/// How a REAP restore serves memory, for the metrics and the VM.
pub struct ReapMemory {
    pub report: MemoryRestoreReport,
    pub live: Arc<dyn FaultSource>,
    /// Set when this restore records a WS.
    pub recorder: Option<Arc<Recorder>>,
}

/// Prefetches the fetched WS (all of it now; or in the background, read already or as it
/// streams in) and serves the rest on demand; without a usable WS, records one. `report`
/// arrives with the backend, mode `record` and the vmstate time filled in.
pub fn restore_memory(
    setup: ReapSetup,
    fetched: FetchedWs,
    mut report: MemoryRestoreReport,
) -> Result<ReapMemory, ReapError> {
    let ReapSetup {
        uffd,
        regions,
        mem,
        ws_path,
        options,
        identity,
        layout,
        stop,
        exit,
    } = setup;
    let refused = |report: &mut MemoryRestoreReport, why: String| {
        log::warn!("REAP: {why}; recording a new WS");
        report.ws_error = Some(why);
    };
    let fetched = fetched.unwrap_or_else(|e| {
        refused(&mut report, e.to_string());
        None
    });
    if let Some(stream) = fetched {
        match usable(&stream, identity, &layout, options) {
            Ok(()) => {
                report.bytes_read = stream.bytes_read();
                report.ws_fetch_us = stream.read_us();
                report.mode = "prefetch".into();
                let ws_pages = Arc::new(PageIndex::new(&stream.header));
                let misses = {
                    // Checked when the request was parsed.
                    let block =
                        crate::uffd::fault_around_pages(options.fault_around_kib).unwrap_or(1);
                    let ws_pages = ws_pages.clone();
                    mem.with_fault_around(block, regions.clone())
                        .keeping_out(Arc::new(move |offset| ws_pages.contains(offset)))
                };
                let live: Arc<dyn FaultSource> = if options.installs_while_running() {
                    log::info!(
                        "REAP: installing {} pages of {} while the guest runs{}",
                        stream.header.pages(),
                        ws_path.display(),
                        if options.streaming {
                            " (streamed: the rest is still being read)"
                        } else {
                            ""
                        }
                    );
                    spawn_chunked_install(uffd, misses, regions, stream, ws_pages, stop, exit)?
                } else {
                    let started = Instant::now();
                    report.pages_prefetched = install_all(&uffd, &regions, &stream);
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
                            base_touches: recorded_touches(&ws_path, &stream.header),
                            path: ws_path,
                            identity,
                            layout,
                            rerecord_above: options.rerecord_threshold,
                        };
                        let recorder = Recorder::spawn(uffd, misses, regions, target, stop, exit)?;
                        return Ok(ReapMemory {
                            report,
                            live: recorder.clone(),
                            recorder: Some(recorder),
                        });
                    }
                    let stats = misses.stats();
                    FaultLoop::new(uffd, regions, stop, exit, misses).spawn("fc_uffd")?;
                    stats
                };
                return Ok(ReapMemory {
                    report,
                    live,
                    recorder: None,
                });
            }
            Err(why) => {
                stream.stop();
                refused(&mut report, why);
            }
        }
    }
    let target = WsTarget {
        path: ws_path,
        identity,
        layout,
        base_touches: Vec::new(),
        rerecord_above: None,
    };
    let recorder = Recorder::spawn(uffd, mem, regions, target, stop, exit)?;
    Ok(ReapMemory {
        report,
        live: recorder.clone(),
        recorder: Some(recorder),
    })
}
