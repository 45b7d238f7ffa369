//! Where things live in guest physical memory (Firecracker's choices, see
//! shared/x86-boot-facts.md) and the MMIO window the devices use.

/// Boot GDT and IDT.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`); its address is passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (and frame pointer).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the first GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line and its maximum length (the guest kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP table; [MPTABLE_START, SYSTEM_MEM_END) is reserved in the e820 map.
pub const MPTABLE_START: u64 = 0x9fc00;
pub const SYSTEM_MEM_END: u64 = 0xe0000;
/// Kernel image and everything above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO window: devices live here, RAM skips it and continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_SIZE: u64 = 0x4000_0000;
pub const RAM_ABOVE_GAP_START: u64 = 0x1_0000_0000;
/// Interrupt controllers.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM's three-page TSS region (KVM_SET_TSS_ADDR), inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IRQ lines the IOAPIC routes (the MP table lists them all).
pub const IOAPIC_PINS: u8 = 24;
/// Largest vCPU count the boot layout supports (the MP table must fit below 0xa0000).
pub const MAX_VCPUS: u8 = 32;
