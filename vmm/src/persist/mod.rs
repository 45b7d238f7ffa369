//! A whole microVM in files: the vmstate file (every piece of KVM and device state, in the
//! snapshot crate's checked envelope) and the memory file (guest RAM, region after region,
//! then a trailer page naming the snapshot, `snapshot::memory_file`). `create` writes them
//! from a paused VM; `crate::restore` reads them back.

mod create;

pub use create::{SnapshotError, SnapshotKind, SnapshotSource};

use std::fs::File;
use std::path::{Path, PathBuf};

use devices::legacy::{I8042State, SerialSnapshot};
use devices::virtio::mmio::MmioTransportState;
use devices::virtio::VirtioDeviceState;
use devices::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use snapshot::memory_file::SnapshotId;
use snapshot::PendingFile;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::vstate::{VcpuState, VmState};

pub const VMSTATE_MAGIC: &[u8; 8] = b"REAPVMST";
pub const VMSTATE_VERSION: u32 = 1;
use snapshot::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read snapshot file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot file {path} is not a usable reapvm vmstate: {source}")]
    Envelope {
        path: PathBuf,
        source: snapshot::EnvelopeError,
    },
    #[error("snapshot file {path}: its state does not decode: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot encode the microVM state: {0}")]
    Encode(serde_json::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy guest memory to {path}: {source}")]
    Memory {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
}

/// One guest RAM region and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// A virtio device: where it sat on the MMIO bus, its transport's state and its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    pub id: String,
    pub addr: u64,
    pub irq: u32,
    pub transport: MmioTransportState,
    /// None in vmstates written before devices saved their own state: the device is then
    /// built from the configuration alone.
    #[serde(default)]
    pub device: Option<VirtioDeviceState>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    pub config: VmConfig,
    /// The CPU vendor the state was taken on: CPUID and MSRs do not carry across vendors.
    pub cpu_vendor: String,
    pub memory: Vec<MemoryRegionState>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub i8042: I8042State,
    pub devices: Vec<DeviceState>,
    /// The id in the memory file's trailer (None in vmstates written before memory files
    /// had one: their memory file is then not checked).
    #[serde(default)]
    pub memory_id: Option<SnapshotId>,
}

impl MicrovmState {
    /// Where guest RAM ends in the memory file (its trailer follows).
    pub fn memory_file_len(&self) -> u64 {
        self.memory
            .iter()
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap_or(0)
    }
}

/// The regions of `mem`, laid out one after the other in the memory file.
pub fn memory_layout(mem: &GuestMemoryMmap) -> Vec<MemoryRegionState> {
    layout_of(mem.iter().map(|r| (r.start_addr().0, r.len())))
}

/// Guest ranges (address, size) laid out one after the other in the memory file.
pub fn layout_of(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<MemoryRegionState> {
    let mut offset = 0;
    ranges
        .map(|(guest_addr, size)| {
            let region = MemoryRegionState {
                guest_addr,
                size,
                file_offset: offset,
            };
            offset += size;
            region
        })
        .collect()
}

/// Which pages of guest memory a memory file holds.
pub enum MemoryContent<'a> {
    /// All of them.
    Full,
    /// Only those dirtied since the last snapshot: per region, KVM's dirty log (one bit per
    /// page) together with the VMM's own dirty bitmap. The rest of the file is holes.
    Dirty(&'a [Vec<u64>]),
}

/// Guest pages per dirty-log word.
const PAGES_PER_WORD: usize = 64;

/// The runs (first page, page count) of pages of `region` dirtied by the guest (`kvm_log`)
/// or by the VMM (the region's bitmap).
fn dirty_runs(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
    kvm_log: &[u64],
) -> Vec<(usize, usize)> {
    use vm_memory::bitmap::Bitmap;
    let vmm_dirty = vmm_bitmap(region);
    let pages = region.len() as usize / PAGE_SIZE;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for page in 0..pages {
        let by_guest = kvm_log
            .get(page / PAGES_PER_WORD)
            .is_some_and(|w| w & (1 << (page % PAGES_PER_WORD)) != 0);
        let dirty = by_guest || vmm_dirty.dirty_at(page * PAGE_SIZE);
        if !dirty {
            continue;
        }
        match runs.last_mut() {
            Some((first, count)) if *first + *count == page => *count += 1,
            _ => runs.push((page, 1)),
        }
    }
    runs
}

/// The whole-region dirty bitmap (the region trait's `bitmap()` gives a slice view).
fn vmm_bitmap(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> &vm_memory::bitmap::AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// Forgets every page marked dirty by the VMM (after a snapshot).
pub fn reset_vmm_dirty_bitmap(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        vmm_bitmap(region).reset();
    }
}

/// Writes guest memory and the trailer naming `id` for `path`, into a temporary file that
/// replaces `path` on commit. A `Dirty` file has the full size with only the dirty pages
/// (and the trailer) written: apply it onto the base memory file with `rebase-snap`
/// before loading.
pub fn write_memory_file(
    mem: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
    content: MemoryContent<'_>,
    id: SnapshotId,
    path: &Path,
) -> Result<PendingFile, PersistError> {
    use std::io::{Seek, SeekFrom, Write};
    let write_err = |source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    };
    let copy = |file: &mut File, guest_addr: u64, len: usize| {
        mem.write_all_volatile_to(GuestAddress(guest_addr), file, len)
            .map_err(|source| PersistError::Memory {
                path: path.to_path_buf(),
                source,
            })
    };
    let ram_end = layout.iter().map(|r| r.file_offset + r.size).max();
    let ram_end = ram_end.unwrap_or(0);
    let mut pending = PendingFile::beside(path).map_err(write_err)?;
    let file = pending.file();
    match content {
        MemoryContent::Full => {
            for region in layout {
                copy(file, region.guest_addr, region.size as usize)?;
            }
        }
        MemoryContent::Dirty(kvm_logs) => {
            file.set_len(ram_end).map_err(write_err)?;
            for (index, (saved, region)) in layout.iter().zip(mem.iter()).enumerate() {
                let log = kvm_logs.get(index).map(Vec::as_slice).unwrap_or(&[]);
                for (first, count) in dirty_runs(region, log) {
                    let offset = (first * PAGE_SIZE) as u64;
                    file.seek(SeekFrom::Start(saved.file_offset + offset))
                        .map_err(write_err)?;
                    copy(file, saved.guest_addr + offset, count * PAGE_SIZE)?;
                }
            }
        }
    }
    file.seek(SeekFrom::Start(ram_end)).map_err(write_err)?;
    file.write_all(&snapshot::memory_file::trailer(id))
        .map_err(write_err)?;
    Ok(pending)
}

/// Writes the vmstate for `path` into a temporary file that replaces `path` on commit.
pub fn write_vmstate(state: &MicrovmState, path: &Path) -> Result<PendingFile, PersistError> {
    use std::io::Write;
    let payload = serde_json::to_vec(state).map_err(PersistError::Encode)?;
    let bytes = snapshot::encode(VMSTATE_MAGIC, VMSTATE_VERSION, &payload);
    let write_err = |source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut pending = PendingFile::beside(path).map_err(write_err)?;
    pending.file().write_all(&bytes).map_err(write_err)?;
    Ok(pending)
}

/// Replaces the targets of a snapshot's pending files: both made durable first (a failure
/// there leaves the previous snapshot whole), then the memory file renamed, then the
/// vmstate, so a vmstate never names memory that is not in place yet.
pub fn commit_snapshot(memory: PendingFile, vmstate: PendingFile) -> Result<(), PersistError> {
    snapshot::commit_all(vec![memory, vmstate])
        .map_err(|(path, source)| PersistError::Write { path, source })
}

/// The state in the vmstate file at `path`, and the file's checksum (which identifies the
/// snapshot).
pub fn read_vmstate(path: &Path) -> Result<(MicrovmState, u64), PersistError> {
    let bytes = std::fs::read(path).map_err(|source| PersistError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode_vmstate(&bytes, path)
}

/// The state in a vmstate file's `bytes` (read from `path`, which errors name), and the
/// file's checksum. The state is decoded, not yet checked: see `restore::check_saved_state`.
pub fn decode_vmstate(bytes: &[u8], path: &Path) -> Result<(MicrovmState, u64), PersistError> {
    let payload = snapshot::decode(VMSTATE_MAGIC, VMSTATE_VERSION, bytes).map_err(|source| {
        PersistError::Envelope {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let state = serde_json::from_slice(payload).map_err(|source| PersistError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((
        state,
        snapshot::envelope::stored_checksum(bytes).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_diff_file_holds_the_pages_dirtied_by_guest_or_vmm_and_only_those() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 * PAGE_SIZE),
            (GuestAddress(0x10_0000), 8 * PAGE_SIZE),
        ])
        .unwrap();
        let layout = memory_layout(&mem);
        // The VMM writes page 3 of the first region (a device buffer, say).
        mem.write_slice(&[0xab; 16], GuestAddress(3 * PAGE_SIZE as u64))
            .unwrap();
        // KVM reports page 1 of the second region as dirtied by the guest.
        let kvm_log = vec![vec![0u64], vec![1 << 1]];
        let dir = std::env::temp_dir().join(format!("reapvm-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("diff.mem");
        let id = SnapshotId::random().unwrap();
        write_memory_file(&mem, &layout, MemoryContent::Dirty(&kvm_log), id, &path)
            .unwrap()
            .commit()
            .unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(
            file.metadata().unwrap().len(),
            24 * PAGE_SIZE as u64 + snapshot::memory_file::TRAILER_LEN
        );
        assert_eq!(
            snapshot::memory_file::read_trailer(&file, 24 * PAGE_SIZE as u64).unwrap(),
            snapshot::memory_file::TrailerRead::Id(id)
        );
        let extents = snapshot::diff::data_extents(&file, &path, 24 * PAGE_SIZE as u64).unwrap();
        let data: u64 = extents.iter().map(|(_, len)| len).sum();
        assert!(
            data <= 2 * PAGE_SIZE as u64 || extents.len() <= 2,
            "only two pages hold data: {extents:?}"
        );
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 3 * PAGE_SIZE as u64).unwrap();
        assert_eq!(byte[0], 0xab);

        reset_vmm_dirty_bitmap(&mem);
        let none = vec![vec![0u64], vec![0u64]];
        write_memory_file(&mem, &layout, MemoryContent::Dirty(&none), id, &path)
            .unwrap()
            .commit()
            .unwrap();
        let file = File::open(&path).unwrap();
        let extents = snapshot::diff::data_extents(&file, &path, 24 * PAGE_SIZE as u64).unwrap();
        assert!(
            extents.is_empty(),
            "nothing dirty after a reset: {extents:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
