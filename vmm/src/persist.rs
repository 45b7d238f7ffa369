//! A whole microVM in files: the vmstate file (every piece of KVM and device state, in the
//! snapshot crate's checked envelope) and the memory file (guest RAM, region after region).

use std::fs::File;
use std::path::{Path, PathBuf};

use devices::legacy::{I8042State, SerialSnapshot};
use devices::virtio::mmio::MmioTransportState;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::vstate::{VcpuState, VmState};

pub const VMSTATE_MAGIC: &[u8; 8] = b"REAPVMST";
pub const VMSTATE_VERSION: u32 = 1;

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

/// A virtio device: where it sat on the MMIO bus and its transport's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    pub id: String,
    pub addr: u64,
    pub irq: u32,
    pub transport: MmioTransportState,
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
}

impl MicrovmState {
    /// Total size the memory file must have.
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
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let region = MemoryRegionState {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            region
        })
        .collect()
}

fn temp_beside(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes guest memory to `path` (atomically: a temporary file renamed at the end).
pub fn write_memory_file(
    mem: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
    path: &Path,
) -> Result<(), PersistError> {
    let tmp = temp_beside(path);
    let write_err = |source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut file = File::create(&tmp).map_err(write_err)?;
        for region in layout {
            mem.write_all_volatile_to(
                GuestAddress(region.guest_addr),
                &mut file,
                region.size as usize,
            )
            .map_err(|source| PersistError::Memory {
                path: path.to_path_buf(),
                source,
            })?;
        }
        file.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn write_vmstate(state: &MicrovmState, path: &Path) -> Result<(), PersistError> {
    let payload = serde_json::to_vec(state).map_err(PersistError::Encode)?;
    let bytes = snapshot::encode(VMSTATE_MAGIC, VMSTATE_VERSION, &payload);
    snapshot::write_atomic(path, &bytes).map_err(|source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read_vmstate(path: &Path) -> Result<MicrovmState, PersistError> {
    let bytes = std::fs::read(path).map_err(|source| PersistError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let payload = snapshot::decode(VMSTATE_MAGIC, VMSTATE_VERSION, &bytes).map_err(|source| {
        PersistError::Envelope {
            path: path.to_path_buf(),
            source,
        }
    })?;
    serde_json::from_slice(payload).map_err(|source| PersistError::Decode {
        path: path.to_path_buf(),
        source,
    })
}
