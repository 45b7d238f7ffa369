//! Tells the VMM the guest is up: the byte 123 to I/O port 0x3f0, Firecracker's boot-timer
//! convention.

const BOOT_COMPLETE_PORT: u16 = 0x3f0;
const BOOT_COMPLETE_MAGIC: u8 = 123;

pub fn signal_boot_complete() -> std::io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(u64::from(BOOT_COMPLETE_PORT), 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the port was granted above; writing it has no effect on this process's memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") BOOT_COMPLETE_PORT, in("al") BOOT_COMPLETE_MAGIC,
            options(nomem, nostack, preserves_flags));
    }
    Ok(())
}
