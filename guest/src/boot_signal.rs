//! Signals to the VMM on I/O port 0x3f0: 123 when the guest is up (Firecracker's boot-timer
//! convention), 124 when an invocation has been answered (reapvm ends recording a REAP
//! working set on the first one after a restore).

const SIGNAL_PORT: u16 = 0x3f0;
const BOOT_COMPLETE_MAGIC: u8 = 123;
const INVOCATION_DONE_MAGIC: u8 = 124;

pub fn signal_boot_complete() -> std::io::Result<()> {
    signal(BOOT_COMPLETE_MAGIC)
}

pub fn signal_invocation_done() -> std::io::Result<()> {
    signal(INVOCATION_DONE_MAGIC)
}

fn signal(magic: u8) -> std::io::Result<()> {
    // Only the guest's init talks to the VMM: the same binary run on a host (tests, as root)
    // must never write to a real I/O port.
    if std::process::id() != 1 {
        return Err(std::io::Error::other("not the guest's init (PID 1)"));
    }
    // SAFETY: ioperm only changes this thread's I/O permission bitmap.
    if unsafe { libc::ioperm(u64::from(SIGNAL_PORT), 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the port was granted above; writing it has no effect on this process's memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") SIGNAL_PORT, in("al") magic,
            options(nomem, nostack, preserves_flags));
    }
    Ok(())
}
