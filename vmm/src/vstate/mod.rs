//! KVM state of a VM and its vCPUs, captured and put back in the orders KVM requires:
//! the pieces a snapshot is made of.

pub mod vcpu_state;
pub mod vm_state;

pub use vcpu_state::{complete_pending_io, VcpuState, VcpuStateError};
pub use vm_state::{VmState, VmStateError};

/// On this host's own /dev/kvm (no Linux guest needed): state saved from one VM in the
/// middle of a program, put into a brand-new VM, lets the program continue exactly.
#[cfg(test)]
mod kvm_tests {
    use super::*;
    use crate::arch::cpuid::Topology;
    use crate::arch::layout::{HIMEM_START, ZERO_PAGE_START};
    use crate::memory::create_guest_memory;
    use crate::vcpu::Vcpu;
    use crate::vm::Vm;
    use devices::Bus;
    use devices::GuestMemoryMmap;
    use kvm_ioctls::{Kvm, VcpuExit};
    use vm_memory::{Bytes, GuestAddress};

    const MEM: u64 = 16 << 20;

    fn new_vm(kvm: &Kvm) -> (Vm, GuestMemoryMmap, Vcpu) {
        let vm = Vm::new(kvm).unwrap();
        let mem = create_guest_memory(MEM).unwrap();
        vm.register_memory(&mem, false).unwrap();
        let vcpu = Vcpu::new(vm.fd(), 0, Bus::new(), Bus::new()).unwrap();
        (vm, mem, vcpu)
    }

    fn expect_out(vcpu: &mut Vcpu) -> u8 {
        match vcpu.fd_mut().run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, data) => data[0],
            other => panic!("expected an OUT to 0x3f8, got {other:?}"),
        }
    }

    #[test]
    fn a_restored_vm_continues_where_the_saved_one_stopped() {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let code = [
            0x48, 0x8b, 0x06, // mov rax, [rsi]
            0x48, 0xff, 0xc0, // inc rax
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xee, // out dx, al
            0x48, 0xff, 0xc0, // inc rax
            0xee, // out dx, al
            0xf4, // hlt
        ];
        let (vm_a, mem_a, mut vcpu_a) = new_vm(&kvm);
        mem_a.write_slice(&code, GuestAddress(HIMEM_START)).unwrap();
        mem_a
            .write_obj(0x40u64, GuestAddress(ZERO_PAGE_START))
            .unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let topo = Topology {
            cpu_index: 0,
            vcpu_count: 1,
            threads_per_core: 1,
        };
        vcpu_a
            .configure_for_boot(&mem_a, &cpuid, topo, false, HIMEM_START)
            .unwrap();
        assert_eq!(expect_out(&mut vcpu_a), 0x41);

        // The OUT is served; let KVM finish it before the state is read.
        complete_pending_io(vcpu_a.fd_mut()).unwrap();
        let msrs = vcpu_state::msrs_to_save(&kvm, vcpu_a.fd()).unwrap();
        assert!(!msrs.is_empty());
        let vcpu_json = serde_json::to_vec(&VcpuState::save(vcpu_a.fd(), &msrs).unwrap()).unwrap();
        let vm_json = serde_json::to_vec(&VmState::save(vm_a.fd()).unwrap()).unwrap();
        let mut image = vec![0u8; MEM as usize];
        mem_a.read_slice(&mut image, GuestAddress(0)).unwrap();
        drop((vcpu_a, vm_a, mem_a));

        let (vm_b, mem_b, mut vcpu_b) = new_vm(&kvm);
        mem_b.write_slice(&image, GuestAddress(0)).unwrap();
        let vm_state: VmState = serde_json::from_slice(&vm_json).unwrap();
        vm_state.restore(vm_b.fd()).unwrap();
        let vcpu_state: VcpuState = serde_json::from_slice(&vcpu_json).unwrap();
        vcpu_state.restore(vcpu_b.fd()).unwrap();
        assert_eq!(vcpu_b.fd().get_regs().unwrap().rax & 0xff, 0x41);
        assert_eq!(
            expect_out(&mut vcpu_b),
            0x42,
            "the restored VM runs the next instruction"
        );
    }
}
