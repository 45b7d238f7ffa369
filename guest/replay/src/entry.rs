//! Kernel-mode entry: the only code that runs in ring 0, kept to a few dozen instructions
//! because kernel mode is emulated (slowly) on kvm-pvm hosts. It enables SSE for user mode,
//! grants user access to the VMM's identity page tables (first GiB, 2 MiB pages), loads a
//! GDT with user segments and a TSS, and enters `user_main` in ring 3 with IOPL 3 (port I/O
//! to the VMM) and interrupts off (nothing must ever bring the CPU back to ring 0).

/// Selectors of the GDT below (RPL 3 for the user ones).
pub const USER_DATA: u64 = 0x18 | 3;
pub const USER_CODE: u64 = 0x20 | 3;
/// RFLAGS in user mode: IOPL 3, IF 0, the always-one bit 1.
pub const USER_RFLAGS: u64 = 0x3002;

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
    .code64
_start:
    cli
    mov r15, rsi                    /* the boot parameters (zero page) */
    lea rsp, [rip + {kstack} + {kstack_size}]
    /* SSE for user mode: CR0.EM off, CR0.MP on; CR4.OSFXSR and OSXMMEXCPT on. */
    mov rax, cr0
    and rax, -5
    or rax, 2
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600
    mov cr4, rax
    /* User access: PML4[0], PDPT[0] and the 512 2-MiB entries of the first GiB.
       rbx keeps the PDPT's address. */
    mov rdx, 0x000ffffffffff000
    mov rax, cr3
    and rax, rdx
    or qword ptr [rax], 4
    mov rbx, [rax]
    and rbx, rdx
    or qword ptr [rbx], 4
    mov rcx, [rbx]
    and rcx, rdx
    xor r8, r8
2:
    or qword ptr [rcx + r8 * 8], 4
    inc r8
    cmp r8, 512
    jb 2b
    /* The VMM's control page at the start of the MMIO gap (3 GiB): PDPT[3] -> our own
       page directory, whose first entry maps 2 MiB there, uncached, for user mode. */
    lea rax, [rip + {mmio_pd}]
    mov rsi, {control_base} | 0x97
    mov [rax], rsi
    or rax, 7
    mov [rbx + 24], rax
    mov rax, cr3
    mov cr3, rax
    /* The TSS descriptor (GDT entries 5 and 6) from the TSS's address. */
    lea rax, [rip + {tss}]
    lea rdi, [rip + {gdt}]
    mov rbx, rax
    shl rbx, 16
    mov rcx, 0xffffff0000
    and rbx, rcx
    or rbx, 0x67                    /* limit: 104 bytes */
    mov rcx, 0x89
    shl rcx, 40                     /* present, 64-bit TSS (available) */
    or rbx, rcx
    mov rcx, rax
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56
    or rbx, rcx
    mov [rdi + 40], rbx
    mov rcx, rax
    shr rcx, 32
    mov [rdi + 48], rcx
    /* TSS.RSP0: a kernel stack, should anything ever enter ring 0 again. */
    lea rcx, [rip + {kstack} + {kstack_size}]
    mov [rax + 4], rcx
    lea rax, [rip + {gdtr}]
    mov [rax + 2], rdi
    lgdt [rax]
    mov ax, 0x28
    ltr ax
    mov ax, {user_data}
    mov ds, ax
    mov es, ax
    /* Ring 3: iretq with SS, RSP, RFLAGS, CS, RIP. user_main is entered as if called:
       RSP + 8 aligned to 16, as the ABI expects after a call pushed its return address. */
    lea rax, [rip + {ustack} + {ustack_size} - 8]
    push {user_data}
    push rax
    push {rflags}
    push {user_code}
    lea rax, [rip + {user_main}]
    push rax
    mov rdi, r15
    iretq
"#,
    kstack = sym KERNEL_STACK,
    kstack_size = const KERNEL_STACK_SIZE,
    ustack = sym USER_STACK,
    ustack_size = const USER_STACK_SIZE,
    tss = sym TSS,
    gdt = sym GDT,
    gdtr = sym GDTR,
    user_data = const USER_DATA,
    user_code = const USER_CODE,
    rflags = const USER_RFLAGS,
    user_main = sym crate::user_main,
    mmio_pd = sym MMIO_PAGE_DIRECTORY,
    control_base = const crate::control::CONTROL_BASE,
);

/// The page directory of the 3rd GiB (only the control page's 2 MiB entry is used).
#[repr(C, align(4096))]
struct PageTable([u64; 512]);

#[no_mangle]
static mut MMIO_PAGE_DIRECTORY: PageTable = PageTable([0; 512]);

const KERNEL_STACK_SIZE: usize = 4096;
const USER_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

#[no_mangle]
static mut KERNEL_STACK: Stack<KERNEL_STACK_SIZE> = Stack([0; KERNEL_STACK_SIZE]);
#[no_mangle]
static mut USER_STACK: Stack<USER_STACK_SIZE> = Stack([0; USER_STACK_SIZE]);
/// The 64-bit TSS (104 bytes); only RSP0 is set.
#[no_mangle]
static mut TSS: [u32; 26] = [0; 26];

/// null, kernel code, kernel data, user data, user code (64-bit), TSS (two entries).
#[no_mangle]
static mut GDT: [u64; 7] = [
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00cf_f200_0000_ffff,
    0x00af_fa00_0000_ffff,
    0,
    0,
];

/// lgdt's operand: limit (u16) then base (u64, filled in at entry).
#[repr(C, packed)]
struct Gdtr {
    limit: u16,
    base: u64,
}

#[no_mangle]
static mut GDTR: Gdtr = Gdtr {
    limit: (7 * 8 - 1) as u16,
    base: 0,
};
