//! The VMM's replay control page (MMIO at the start of the 32-bit MMIO gap; see
//! devices/src/legacy/replay_control.rs). User-mode port I/O is not an option: kvm-pvm
//! hosts do not honour IOPL for guest user mode, while MMIO exits work from any ring.

pub const CONTROL_BASE: u64 = 0xc000_0000;
pub const READY: u64 = 0x00;
pub const GO: u64 = 0x04;
pub const DONE: u64 = 0x08;
pub const ERROR: u64 = 0x0c;
pub const DETAIL: u64 = 0x10;
pub const CONSOLE: u64 = 0x14;

pub fn write(register: u64, value: u32) {
    // SAFETY: the control page is device memory mapped by entry.rs; a write to it only
    // reaches the VMM.
    unsafe { core::ptr::write_volatile((CONTROL_BASE + register) as *mut u32, value) };
}

pub fn read(register: u64) -> u32 {
    // SAFETY: as in `write`; the VMM answers the read.
    unsafe { core::ptr::read_volatile((CONTROL_BASE + register) as *const u32) }
}

/// A message on the VMM's console, byte by byte.
pub fn console(bytes: &[u8]) {
    for &b in bytes {
        write(CONSOLE, u32::from(b));
    }
}
