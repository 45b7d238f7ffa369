//! The VM-wide KVM state: PIT, kvmclock and the three interrupt controllers.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Ioctl { op, source }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

fn get_chip(vm: &VmFd, chip_id: u32, op: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(ioctl(op))?;
    Ok(chip)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        Ok(Self {
            pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        })
    }

    /// Restores into a VM created with its irqchip and PIT, before its vCPUs run.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        vm.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        // Only the clock value is restored; the flags KVM reports (e.g. TSC_STABLE) are not
        // inputs.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(ioctl("KVM_SET_IRQCHIP (PIC master)"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(ioctl("KVM_SET_IRQCHIP (PIC slave)"))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(ioctl("KVM_SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}
