//! Writing a snapshot of a paused VM: the vmstate file and the memory file (Full or Diff).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{I8042Device, SerialDevice};
use devices::{GuestMemoryMmap, Persist};

use super::{DeviceState, MicrovmState, PersistError};
use crate::config::VmConfig;
use crate::device_manager::AttachedDevice;
use crate::microvm::PAUSE_TIMEOUT;
use crate::reap::Recorder;
use crate::vcpu::{PauseError, VcpuGroup};
use crate::vm::Vm;
use crate::vstate::{VmState, VmStateError};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the microVM must be paused first")]
    NotPaused,
    #[error(transparent)]
    Vcpus(#[from] PauseError),
    #[error(transparent)]
    Vm(#[from] VmStateError),
    #[error(transparent)]
    DirtyLog(#[from] crate::vm::VmError),
    #[error(transparent)]
    Files(#[from] PersistError),
    #[error("a Diff snapshot needs dirty page tracking: set track_dirty_pages in machine-config (or enable_diff_snapshots when loading)")]
    NotTracking,
    #[error("a previous snapshot failed after reading the dirty log: take a Full snapshot before the next Diff")]
    DirtyLogLost,
    #[error("cannot draw the snapshot's random id: {0}")]
    Id(std::io::Error),
}

/// What a snapshot's memory file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// The pages dirtied since the last snapshot (or since boot or restore).
    Diff,
}

/// Everything a snapshot reads, shared with the running VM.
pub struct SnapshotSource {
    pub(crate) vm: Arc<Vm>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vcpus: Arc<VcpuGroup>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) i8042: Arc<Mutex<I8042Device>>,
    pub(crate) attached: Vec<AttachedDevice>,
    pub(crate) config: VmConfig,
    pub(crate) cpu_vendor: String,
    pub(crate) ws_recorder: Option<Arc<Recorder>>,
    /// A snapshot failed after it had taken (and so cleared) KVM's dirty log: a Diff would
    /// miss those pages until a Full snapshot succeeds.
    pub(crate) dirty_log_lost: AtomicBool,
}

impl SnapshotSource {
    /// Writes a snapshot of the paused VM. Both files are written beside their targets and
    /// renamed into place only once both are complete, the memory file first: a failure
    /// (a full disk, say) leaves the previous snapshot as it was, and a crash between the
    /// two renames leaves a vmstate whose memory file names another snapshot, which the
    /// loader refuses (`snapshot::memory_file`).
    pub fn create(
        &self,
        kind: SnapshotKind,
        vmstate_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<(), SnapshotError> {
        if !self.vcpus.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        if kind == SnapshotKind::Diff && !self.vm.tracks_dirty_pages() {
            return Err(SnapshotError::NotTracking);
        }
        if kind == SnapshotKind::Diff && self.dirty_log_lost.load(Ordering::Acquire) {
            return Err(SnapshotError::DirtyLogLost);
        }
        // Copying memory faults every page in: none of that belongs in a working set.
        if let Some(recorder) = &self.ws_recorder {
            recorder.stop("a snapshot is being taken");
        }
        let vcpus = self.vcpus.save_states(PAUSE_TIMEOUT)?;
        let vm = VmState::save(self.vm.fd())?;
        let devices = self
            .attached
            .iter()
            .map(|attached| DeviceState {
                id: attached.slot.id.clone(),
                addr: attached.slot.addr,
                irq: attached.slot.irq,
                transport: attached
                    .transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .save(),
                device: Some(attached.device_state()),
            })
            .collect();
        let memory = super::memory_layout(&self.mem);
        let id = snapshot::memory_file::SnapshotId::random().map_err(SnapshotError::Id)?;
        let state = MicrovmState {
            config: self.config.clone(),
            cpu_vendor: self.cpu_vendor.clone(),
            memory: memory.clone(),
            vm,
            vcpus,
            serial: self.serial.lock().unwrap_or_else(|p| p.into_inner()).save(),
            i8042: self.i8042.lock().unwrap_or_else(|p| p.into_inner()).save(),
            devices,
            memory_id: Some(id),
        };
        // Taking the log also clears it: the next Diff starts from this snapshot.
        let kvm_dirty = if self.vm.tracks_dirty_pages() {
            Some(self.vm.take_dirty_log(&self.mem)?)
        } else {
            None
        };
        let content = match (kind, &kvm_dirty) {
            (SnapshotKind::Diff, Some(log)) => super::MemoryContent::Dirty(log),
            _ => super::MemoryContent::Full,
        };
        let written = super::write_memory_file(&self.mem, &memory, content, id, mem_path).and_then(
            |memory_file| {
                let vmstate = super::write_vmstate(&state, vmstate_path)?;
                super::commit_snapshot(memory_file, vmstate)
            },
        );
        if kvm_dirty.is_some() {
            match written {
                Ok(()) => {
                    super::reset_vmm_dirty_bitmap(&self.mem);
                    self.dirty_log_lost.store(false, Ordering::Release);
                }
                Err(_) => self.dirty_log_lost.store(true, Ordering::Release),
            }
        }
        written?;
        Ok(())
    }
}
