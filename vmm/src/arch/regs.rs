//! vCPU registers for the 64-bit boot protocol: general registers, the boot GDT and IDT,
//! identity-mapped page tables for the first GiB, control registers and the FPU.

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, BOOT_GDT};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_PRESENT_RW_HUGE: u64 = 0x83;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("cannot write the boot {what} at {addr:#x} into guest memory: {source}")]
    WriteMemory {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// RIP at the kernel's 64-bit entry, RSI at the zero page, a stack below the page tables.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry)).map_err(RegsError::SetRegs)
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

fn write_u64(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    value: u64,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

/// Writes the GDT and an empty IDT into guest memory; points `sregs` at them with CS, the
/// data segments and TR loaded from the GDT.
fn setup_gdt(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write_u64(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *entry)?;
    }
    write_u64(mem, "IDT", BOOT_IDT_START, 0)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = gdt::kvm_segment_from_gdt(BOOT_GDT[gdt::CODE_INDEX as usize], gdt::CODE_INDEX);
    let data = gdt::kvm_segment_from_gdt(BOOT_GDT[gdt::DATA_INDEX as usize], gdt::DATA_INDEX);
    let tss = gdt::kvm_segment_from_gdt(BOOT_GDT[gdt::TSS_INDEX as usize], gdt::TSS_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages: PML4[0] -> PDPT[0] -> 512 PD entries.
fn setup_page_tables(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    write_u64(mem, "PML4", PML4_START, PDPTE_START | PAGE_PRESENT_RW)?;
    write_u64(mem, "PDPT", PDPTE_START, PDE_START | PAGE_PRESENT_RW)?;
    for i in 0..512u64 {
        write_u64(
            mem,
            "PD",
            PDE_START + i * 8,
            (i << 21) | PAGE_PRESENT_RW_HUGE,
        )?;
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    setup_gdt(mem, &mut sregs)?;
    setup_page_tables(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = memory();
        let mut sregs = kvm_sregs::default();
        setup_page_tables(&mem, &mut sregs).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        let pd_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pml4, 0xa003);
        assert_eq!(pdpt, 0xb003);
        assert_eq!(pd_last, (511 << 21) | 0x83);
        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
        assert_eq!(sregs.cr3, 0x9000);
    }

    #[test]
    fn gdt_lands_in_memory_and_segments_point_at_it() {
        let mem = memory();
        let mut sregs = kvm_sregs::default();
        setup_gdt(&mem, &mut sregs).unwrap();
        for (i, entry) in BOOT_GDT.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *entry);
        }
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 7));
        assert_eq!(
            (sregs.cs.selector, sregs.ss.selector, sregs.tr.selector),
            (8, 0x10, 0x18)
        );
    }

    #[test]
    fn entry_registers() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rbp),
            (0x100_0000, 0x7000, 0x8ff0, 0x8ff0)
        );
        assert_eq!(regs.rflags, 2);
    }
}
