//! What the VMM tells the guest in the boot parameters (the zero page, Linux's layout): the
//! e820 memory map and where the initrd (the trace) is.

const E820_ENTRIES: u64 = 0x1e8;
const E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_LEN: u64 = 20;
const E820_RAM: u32 = 1;
const RAMDISK_IMAGE: u64 = 0x218;
const RAMDISK_SIZE: u64 = 0x21c;
const CMD_LINE_PTR: u64 = 0x228;
/// The longest command line read.
const CMDLINE_MAX: usize = 2048;

pub struct BootInfo {
    /// One past the highest RAM address.
    pub ram_end: u64,
    pub initrd_addr: u64,
    pub initrd_len: u64,
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the zero page is identity-mapped, readable from user mode (entry.rs), and the
    // fields read are inside it; unaligned reads are fine on x86.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

pub fn read_boot_info(zero_page: u64) -> BootInfo {
    let entries = u64::from(read::<u8>(zero_page + E820_ENTRIES)).min(128);
    let mut ram_end = 0;
    for i in 0..entries {
        let e = zero_page + E820_TABLE + i * E820_ENTRY_LEN;
        if read::<u32>(e + 16) == E820_RAM {
            ram_end = ram_end.max(read::<u64>(e) + read::<u64>(e + 8));
        }
    }
    BootInfo {
        ram_end,
        initrd_addr: u64::from(read::<u32>(zero_page + RAMDISK_IMAGE)),
        initrd_len: u64::from(read::<u32>(zero_page + RAMDISK_SIZE)),
    }
}

/// The kernel command line (up to its NUL), as the VMM wrote it below 1 GiB.
pub fn cmdline(zero_page: u64) -> &'static [u8] {
    let at = u64::from(read::<u32>(zero_page + CMD_LINE_PTR));
    if at == 0 {
        return &[];
    }
    let len = (0..CMDLINE_MAX)
        .find(|&i| read::<u8>(at + i as u64) == 0)
        .unwrap_or(CMDLINE_MAX);
    // SAFETY: `len` bytes from `at` are the command line the VMM wrote in guest RAM below
    // 1 GiB (identity-mapped for user mode, entry.rs), which nothing writes afterwards.
    unsafe { core::slice::from_raw_parts(at as *const u8, len) }
}
