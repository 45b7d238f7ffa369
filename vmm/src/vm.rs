//! The KVM VM: in-kernel interrupt controllers, PIT, TSS and guest memory slots.

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::KVM_TSS_ADDRESS;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed: {0}")]
    Create(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqChip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ({size:#x} bytes at {guest_addr:#x}) failed: {source}")]
    SetMemoryRegion {
        slot: u32,
        guest_addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD for GSI {gsi} failed: {source}")]
    RegisterIrqfd { gsi: u32, source: kvm_ioctls::Error },
}

pub struct Vm {
    fd: VmFd,
    /// Whether memory slots log dirty pages (for Diff snapshots); set by `register_memory`.
    tracks_dirty_pages: std::sync::atomic::AtomicBool,
}

impl Vm {
    /// Creates the VM with its interrupt controllers (PIC, IOAPIC) and PIT; these must exist
    /// before any vCPU.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTss)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Self {
            fd,
            tracks_dirty_pages: Default::default(),
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Gives every region of `mem` to KVM, one slot each, logging the pages the guest
    /// dirties when `track_dirty_pages`.
    pub fn register_memory(
        &self,
        mem: &GuestMemoryMmap,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        let flags = if track_dirty_pages {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        self.tracks_dirty_pages
            .store(track_dirty_pages, std::sync::atomic::Ordering::Relaxed);
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let guest_addr = region.start_addr().0;
            let size = region.len();
            let host_addr = region.as_ptr() as u64;
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: guest_addr,
                memory_size: size,
                userspace_addr: host_addr,
            };
            // SAFETY: the region is a live mapping of `size` bytes owned by `mem`, which the
            // caller keeps alive for as long as the VM runs (the Vmm owns both).
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| {
                VmError::SetMemoryRegion {
                    slot,
                    guest_addr,
                    size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    pub fn tracks_dirty_pages(&self) -> bool {
        self.tracks_dirty_pages
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The pages the guest dirtied in each region of `mem` since the last call (one bit per
    /// page, 64 pages per word), which KVM clears as it reports them.
    pub fn take_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = slot as u32;
                self.fd
                    .get_dirty_log(slot, region.len() as usize)
                    .map_err(|source| VmError::DirtyLog { slot, source })
            })
            .collect()
    }

    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::RegisterIrqfd { gsi, source })
    }
}
