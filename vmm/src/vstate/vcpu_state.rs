//! A vCPU's complete KVM state. Saved with mp_state first and vcpu_events last; restored
//! with CPUID first (KVM checks everything else against it), MSRs after the LAPIC, events
//! last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the {what} list: {source}")]
    Fam {
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
    #[error("KVM_SET_MSRS restored {set} of {total} MSRs; MSR {index:#x} was refused")]
    Msrs {
        set: usize,
        total: usize,
        index: u32,
    },
}

fn ioctl(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { op, source }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// None where KVM cannot report the guest TSC frequency.
    pub tsc_khz: Option<u32>,
}

/// The MSRs this host's KVM lets us read, out of those it lists (KVM_GET_MSR_INDEX_LIST):
/// what a snapshot of one of its vCPUs must carry.
pub fn msrs_to_save(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut readable = Vec::new();
    for index in listed.as_slice() {
        let mut probe = Msrs::from_entries(&[kvm_msr_entry {
            index: *index,
            ..Default::default()
        }])
        .map_err(|source| VcpuStateError::Fam {
            what: "MSR",
            source,
        })?;
        if vcpu.get_msrs(&mut probe).map_err(ioctl("KVM_GET_MSRS"))? == 1 {
            readable.push(*index);
        }
    }
    Ok(readable)
}

/// Lets KVM finish an exit that userspace served (an I/O read's data, an OUT's completion)
/// by entering KVM_RUN with `immediate_exit` set: the vCPU does not run guest code, but its
/// registers afterwards are those of the next instruction. Needed before saving state.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), VcpuStateError> {
    vcpu.set_kvm_immediate_exit(1);
    let result = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(_) => Ok(()),
        Err(e) => Err(VcpuStateError::Ioctl {
            op: "KVM_RUN (immediate exit)",
            source: e,
        }),
    };
    vcpu.set_kvm_immediate_exit(0);
    result
}

impl VcpuState {
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, VcpuStateError> {
        let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let debug_regs = vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|index| kvm_msr_entry {
                index: *index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Vec::with_capacity(entries.len());
        // KVM_GET_MSRS takes at most KVM_MAX_MSR_ENTRIES at a time.
        for chunk in entries.chunks(255) {
            let mut batch = Msrs::from_entries(chunk).map_err(|source| VcpuStateError::Fam {
                what: "MSR",
                source,
            })?;
            let read = vcpu.get_msrs(&mut batch).map_err(ioctl("KVM_GET_MSRS"))?;
            msrs.extend_from_slice(&batch.as_slice()[..read]);
        }
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| VcpuStateError::Fam {
            what: "CPUID",
            source,
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            // Keep the guest's TSC rate; a host that cannot scale it keeps its own.
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                log::warn!(
                    "cannot set the guest TSC to {khz} kHz ({e}); it runs at the host's rate"
                );
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a complete kvm_xsave as KVM_GET_XSAVE returned it, the
        // legacy 4 KiB layout KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(ioctl("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(255) {
            let batch = Msrs::from_entries(chunk).map_err(|source| VcpuStateError::Fam {
                what: "MSR",
                source,
            })?;
            let set = vcpu.set_msrs(&batch).map_err(ioctl("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(VcpuStateError::Msrs {
                    set,
                    total: chunk.len(),
                    index: chunk[set].index,
                });
            }
        }
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        // Tells the guest's kvmclock that the vCPU was stopped, so its watchdogs stay calm.
        if let Err(e) = vcpu.kvmclock_ctrl() {
            log::debug!("KVM_KVMCLOCK_CTRL: {e} (harmless)");
        }
        Ok(())
    }
}
