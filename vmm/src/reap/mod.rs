//! REAP (record-and-prefetch) restores. Without a working-set (WS) file the restored guest's
//! memory is served on demand from the memory file while every page served is logged in
//! first-touch order; when the first invocation ends (the agent says so), the VM pauses,
//! stops, or the API asks, the logged pages are written as the WS file. With a valid WS
//! file, all of it is read at once and installed with UFFDIO_COPY / UFFDIO_ZEROPAGE before
//! the guest runs; what the WS lacks is then served on demand.

mod fetch;
mod install;
mod record;
#[cfg(test)]
mod tests;

pub use fetch::{fetch, ws_size_limit, AlignedBuf, FetchedWs};
pub use install::{install_all, spawn_chunked_install, ChunkedInstallStats, WsPages};
pub use record::{Recorder, RecordingState, WsTarget};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

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
    #[error("reap_options: rerecord_threshold needs merge_misses")]
    ThresholdWithoutMerge,
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
    /// After a prefetch, log the pages still faulted on demand until the first invocation is
    /// answered and append them to the WS (not with `chunked_install`).
    pub merge_misses: bool,
    /// With `merge_misses`: more misses than this remove the WS instead, so the next
    /// restore records a fresh one.
    pub rerecord_threshold: Option<u64>,
}

impl ReapOptions {
    /// Refuses combinations that cannot work.
    pub fn validate(&self) -> Result<(), ReapOptionsError> {
        if self.merge_misses && self.chunked_install {
            return Err(ReapOptionsError::MergeWithChunked);
        }
        if self.rerecord_threshold.is_some() && !self.merge_misses {
            return Err(ReapOptionsError::ThresholdWithoutMerge);
        }
        Ok(())
    }
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
                    spawn_chunked_install(uffd, mem, regions, ws, stop, exit)?
                } else {
                    let started = Instant::now();
                    report.pages_prefetched = install_all(&uffd, &regions, &ws);
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
                        let recorder = Recorder::spawn(uffd, mem, regions, target, stop, exit)?;
                        return Ok(ReapMemory {
                            report,
                            live: recorder.clone(),
                            recorder: Some(recorder),
                        });
                    }
                    let stats = mem.stats();
                    FaultLoop::new(uffd, regions, stop, exit, mem).spawn("fc_uffd")?;
                    stats
                };
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
    let recorder = Recorder::spawn(uffd, mem, regions, target, stop, exit)?;
    Ok(ReapMemory {
        report,
        live: recorder.clone(),
        recorder: Some(recorder),
    })
}
