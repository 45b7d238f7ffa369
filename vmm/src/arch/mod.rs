//! x86_64 specifics of a direct 64-bit Linux boot: the guest physical layout, CPUID and MSR
//! set-up, boot registers and page tables, the MP table and the zero page.

pub mod boot_params;
pub mod cpu_template;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
