//! The one choice of where a restored VM's memory comes from: the memory file mapped
//! (`File`), or anonymous memory behind a userfaultfd whose faults reapvm's fault loop serves
//! (`OnDemand`, `Reap`) or an external handler serves (`Uffd`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::GuestMemoryMmap;
use snapshot::memory_file::{SnapshotId, TrailerRead};
use snapshot::PAGE_SIZE;

use super::backend::MemoryBackend;
use crate::metrics::{self, FaultSource, MemoryRestoreReport};
use crate::persist::{MemoryRegionState, MicrovmState};
use crate::reap::{self, PendingWs, ReapError, Recorder};
use crate::uffd::{self, FaultLoop, FileSource, HandlerStop, StopHandlersOnDrop, UffdError};
use crate::vcpu::ExitSignal;

#[derive(Debug, thiserror::Error)]
pub enum MemoryRestoreError {
    #[error("cannot open memory file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory file {path} is {have} bytes; the snapshot needs {want} (truncated?)")]
    Short { path: PathBuf, have: u64, want: u64 },
    #[error("memory file {path} belongs to snapshot {found}, not to this vmstate's snapshot {want}: give the memory file written with the vmstate")]
    OtherSnapshot {
        path: PathBuf,
        found: String,
        want: SnapshotId,
    },
    #[error("cannot read the trailer of memory file {path}: {source}")]
    Trailer {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot map memory file {path}: {source}")]
    Map {
        path: PathBuf,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("memory file {path}: {source}")]
    Dup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory region at {guest_addr:#x} overflows the guest address space")]
    RegionOverflow { guest_addr: u64 },
    #[error("bad memory layout in the snapshot: {0}")]
    Layout(vm_memory::GuestRegionCollectionError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Reap(#[from] ReapError),
}

/// What a restore knows about its snapshot when it sets up memory.
pub struct MemoryRestoreContext {
    /// How long reading and checking the vmstate took (reported in the restore metrics).
    pub vmstate_load: Duration,
    /// The vmstate's checksum: which snapshot this is (a WS file must belong to it).
    pub vmstate_checksum: u64,
    /// `Reap`: the WS file read started before the vmstate was (fetch_in_parallel,
    /// streaming).
    pub ws_prefetch: Option<PendingWs>,
}

/// A restored VM's memory and what serves its faults.
pub struct RestoredMemory {
    /// Ends and joins the fault loop threads when dropped (with the VM, or on a failed
    /// restore): first, as fields drop in order, so before the memory they write into.
    pub handlers: StopHandlersOnDrop,
    pub guest_memory: GuestMemoryMmap,
    pub report: MemoryRestoreReport,
    /// Where the metrics read live fault counts (None: an external handler has them).
    pub live_faults: Option<Arc<dyn FaultSource>>,
    /// Set when this restore records a REAP working set.
    pub recorder: Option<Arc<Recorder>>,
}

/// Sets up the restored VM's memory with `backend`.
pub fn guest_memory(
    backend: &MemoryBackend,
    state: &MicrovmState,
    context: MemoryRestoreContext,
    exit: &Arc<ExitSignal>,
) -> Result<RestoredMemory, MemoryRestoreError> {
    let mem_file = match backend.mem_path() {
        Some(path) => Some(open_memory_file(
            path,
            state.memory_file_len(),
            state.memory_id,
        )?),
        None => None,
    };
    let mut report = MemoryRestoreReport {
        backend: backend.name().into(),
        vmstate_load_us: context.vmstate_load.as_micros() as u64,
        ..Default::default()
    };
    // Until the VM owns it, dropping this (any error below) ends the fault loop threads.
    let handlers = StopHandlersOnDrop(HandlerStop::new()?);
    let stop = handlers.0.clone();
    let restored = |guest_memory, report, live_faults, recorder| RestoredMemory {
        guest_memory,
        report,
        live_faults,
        recorder,
        handlers,
    };
    match (backend, mem_file) {
        (MemoryBackend::File { backend_path }, Some(file)) => {
            report.mode = "file".into();
            let live: Arc<dyn FaultSource> =
                Arc::new(MajorFaultsSince(metrics::process_faults().major));
            let mem = map_memory_file(&file, backend_path, &state.memory)?;
            Ok(restored(mem, report, Some(live), None))
        }
        (
            MemoryBackend::OnDemand {
                backend_path,
                fault_around_kib,
            },
            Some(file),
        ) => {
            report.mode = "on-demand".into();
            let (mem, uffd, regions) = uffd::register(&state.memory)?;
            let regions = Arc::new(regions);
            // Checked when the request was parsed.
            let block = uffd::fault_around_pages(*fault_around_kib).unwrap_or(1);
            let source = FileSource::new(Arc::new(file), backend_path.clone())
                .with_fault_around(block, regions.clone());
            let live: Arc<dyn FaultSource> = source.stats();
            FaultLoop::new(Arc::new(uffd), regions, stop, Some(exit.clone()), source)
                .spawn("fc_uffd")?;
            Ok(restored(mem, report, Some(live), None))
        }
        (MemoryBackend::Uffd { backend_path }, _) => {
            report.mode = "external".into();
            let (mem, uffd, regions) = uffd::register(&state.memory)?;
            uffd::send_to_external_handler(backend_path, &uffd, &regions)?;
            // The external handler alone knows what it served.
            Ok(restored(mem, report, None, None))
        }
        (MemoryBackend::Reap { backend_path, .. }, Some(file)) => {
            report.mode = "record".into();
            let (ws_path, options) = backend.reap().expect("a Reap backend");
            let (mem, uffd, regions) = uffd::register(&state.memory)?;
            let identity = snapshot::ws::SnapshotIdentity {
                vmstate_checksum: context.vmstate_checksum,
                memory_len: state.memory_file_len(),
            };
            let fetched = match context.ws_prefetch {
                Some(pending) => pending.header_read(),
                None => reap::fetch(
                    &ws_path,
                    options.o_direct,
                    reap::ws_size_limit(backend_path),
                ),
            };
            let reap = reap::restore_memory(
                reap::ReapSetup {
                    uffd: Arc::new(uffd),
                    regions: Arc::new(regions),
                    mem: FileSource::new(Arc::new(file), backend_path.clone()),
                    ws_path,
                    options,
                    identity,
                    layout: reap::ws_layout(&state.memory),
                    stop,
                    exit: Some(exit.clone()),
                },
                fetched,
                report,
            )?;
            Ok(restored(mem, reap.report, Some(reap.live), reap.recorder))
        }
        (
            MemoryBackend::File { .. }
            | MemoryBackend::OnDemand { .. }
            | MemoryBackend::Reap { .. },
            None,
        ) => {
            unreachable!("mem_path() gives these backends a memory file")
        }
    }
}

/// Counts the `File` backend's on-demand faults: the host kernel serves them from the
/// memory file as major faults of this process.
struct MajorFaultsSince(u64);

impl FaultSource for MajorFaultsSince {
    fn faults_and_bytes(&self) -> (u64, u64) {
        let faults = metrics::process_faults().major.saturating_sub(self.0);
        (faults, faults * PAGE_SIZE as u64)
    }
}

/// Opens the memory file, checking it holds all `want` bytes of guest RAM and, when the
/// vmstate names its snapshot (`id`), that the file's trailer names the same one.
fn open_memory_file(
    path: &Path,
    want: u64,
    id: Option<SnapshotId>,
) -> Result<File, MemoryRestoreError> {
    let file = File::open(path).map_err(|source| MemoryRestoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let have = file.metadata().map(|m| m.len()).unwrap_or(0);
    if have < want {
        return Err(MemoryRestoreError::Short {
            path: path.to_path_buf(),
            have,
            want,
        });
    }
    if let Some(id) = id {
        let found = match snapshot::memory_file::read_trailer(&file, want) {
            Ok(TrailerRead::Id(found)) if found == id => return Ok(file),
            Ok(TrailerRead::Id(found)) => found.to_string(),
            Ok(TrailerRead::Missing) => "none (it has no reapvm trailer after guest RAM)".into(),
            Err(source) => {
                return Err(MemoryRestoreError::Trailer {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        return Err(MemoryRestoreError::OtherSnapshot {
            path: path.to_path_buf(),
            found,
            want: id,
        });
    }
    Ok(file)
}

/// Maps each region of the memory file privately: reads come from the file (paged in by
/// the host kernel on first touch), writes stay in this process.
fn map_memory_file(
    file: &File,
    path: &Path,
    layout: &[MemoryRegionState],
) -> Result<GuestMemoryMmap, MemoryRestoreError> {
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        let fd = file.try_clone().map_err(|source| MemoryRestoreError::Dup {
            path: path.to_path_buf(),
            source,
        })?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(fd, r.file_offset)),
            r.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryRestoreError::Map {
            path: path.to_path_buf(),
            source,
        })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or(
            MemoryRestoreError::RegionOverflow {
                guest_addr: r.guest_addr,
            },
        )?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryRestoreError::Layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn file_backend_maps_the_memory_file_privately() {
        let dir = std::env::temp_dir().join(format!("reapvm-restore-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let mut content = vec![0u8; 3 * PAGE_SIZE];
        content[PAGE_SIZE + 7] = 0x5a;
        content[2 * PAGE_SIZE] = 0xa5;
        std::fs::write(&path, &content).unwrap();
        let file = open_memory_file(&path, content.len() as u64, None).unwrap();
        let layout = [
            MemoryRegionState {
                guest_addr: 0,
                size: PAGE_SIZE as u64 * 2,
                file_offset: 0,
            },
            MemoryRegionState {
                guest_addr: 0x10_0000,
                size: PAGE_SIZE as u64,
                file_offset: 2 * PAGE_SIZE as u64,
            },
        ];
        let mem = map_memory_file(&file, &path, &layout).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(PAGE_SIZE as u64 + 7))
                .unwrap(),
            0x5a
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xa5);
        // Writes stay in this process: the snapshot's file is never changed.
        mem.write_obj(0xffu8, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), content);
        let short = open_memory_file(&path, 4 * PAGE_SIZE as u64, None).unwrap_err();
        assert!(short.to_string().contains("truncated"), "{short}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_memory_file_of_another_snapshot_is_refused() {
        use snapshot::memory_file::trailer;
        let dir = std::env::temp_dir().join(format!("reapvm-trailer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ram = 2 * PAGE_SIZE as u64;
        let ours = SnapshotId::random().unwrap();
        let theirs = SnapshotId::random().unwrap();
        let write = |name: &str, id: Option<SnapshotId>| {
            let path = dir.join(name);
            let mut bytes = vec![0x11u8; ram as usize];
            if let Some(id) = id {
                bytes.extend(trailer(id));
            }
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let good = write("ours", Some(ours));
        open_memory_file(&good, ram, Some(ours)).unwrap();
        let other = write("theirs", Some(theirs));
        let e = open_memory_file(&other, ram, Some(ours)).unwrap_err();
        assert!(
            e.to_string().contains(&theirs.to_string())
                && e.to_string().contains(&ours.to_string()),
            "{e}"
        );
        let bare = write("bare", None);
        let e = open_memory_file(&bare, ram, Some(ours)).unwrap_err();
        assert!(e.to_string().contains("no reapvm trailer"), "{e}");
        // A vmstate from before trailers names no snapshot: any memory file of the size loads.
        open_memory_file(&bare, ram, None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
