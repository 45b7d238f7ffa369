//! A minimal virtio-mmio driver for the VMM's first virtio-blk device, from user mode with
//! no interrupts (completions are polled from the used ring): register access, memory
//! helpers, device set-up step by step (so a hostile case can skip or break a step), and
//! the fixed places of the rings in guest memory. Shared by the DMA check and the hostile
//! cases.

use crate::control;

pub const PAGE: u64 = 4096;
pub const SECTOR: u64 = 512;
/// The boot page tables map the first GiB only.
pub const MAPPED_END: u64 = 1 << 30;

/// The virtio-mmio windows the VMM places devices in (vmm/src/device_manager.rs).
const FIRST_DEVICE: u64 = 0xc000_1000;
const DEVICE_STRIDE: u64 = 0x1000;
const MAX_DEVICES: u64 = 8;

const MAGIC: u32 = 0x7472_6976;
const TYPE_BLOCK: u32 = 2;
pub const STATUS_ACK: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
/// VIRTIO_F_VERSION_1, in the high word of the features.
const VERSION_1_HIGH: u32 = 1;

/// Registers (virtio 1.2, 4.2.2).
pub const REG_QUEUE_SEL: u64 = 0x30;
pub const REG_QUEUE_NUM: u64 = 0x38;
pub const REG_QUEUE_READY: u64 = 0x44;
pub const REG_QUEUE_NOTIFY: u64 = 0x50;
pub const REG_STATUS: u64 = 0x70;

pub const QUEUE_SIZE: u16 = 64;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const REQ_IN: u32 = 0;

/// Where the rings, request headers and status bytes live (above the guest's own first
/// 2 MiB).
pub const DESC_TABLE: u64 = 0x40_0000;
pub const AVAIL_RING: u64 = 0x40_1000;
pub const USED_RING: u64 = 0x40_2000;
pub const HEADERS: u64 = 0x40_4000;
pub const STATUS_BYTES: u64 = 0x40_5000;
pub const RINGS_END: u64 = STATUS_BYTES + PAGE;

/// Error codes of the control page shared by both users (devices/src/legacy/replay_control.rs).
pub const ERR_NO_BLOCK_DEVICE: u32 = 10;
pub const ERR_FEATURES: u32 = 11;
pub const ERR_SMALL_DISK: u32 = 19;

/// Reports an error to the VMM and stops.
pub fn stop(code: u32, detail: u64) -> ! {
    control::write(control::DETAIL, detail as u32);
    control::write(control::ERROR, code);
    loop {
        core::hint::spin_loop();
    }
}

pub fn rd32(addr: u64) -> u32 {
    // SAFETY: device registers (mapped uncached by entry.rs) or RAM below 1 GiB, identity
    // mapped for user mode.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn wr32(addr: u64, value: u32) {
    // SAFETY: as in `rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

pub fn rd16(addr: u64) -> u16 {
    // SAFETY: RAM below 1 GiB, identity mapped for user mode.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

pub fn wr16(addr: u64, value: u16) {
    // SAFETY: as in `rd16`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

pub fn wr64(addr: u64, value: u64) {
    // SAFETY: as in `rd16`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

pub fn rd8(addr: u64) -> u8 {
    // SAFETY: as in `rd16`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn wr8(addr: u64, value: u8) {
    // SAFETY: as in `rd16`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

pub fn fence() {
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// Writes `byte` over `[from, to)` (volatile: no call to a memset this guest lacks).
pub fn fill(from: u64, to: u64, byte: u8) {
    let word = u64::from_ne_bytes([byte; 8]);
    let mut a = from;
    while a < to && !a.is_multiple_of(8) {
        wr8(a, byte);
        a += 1;
    }
    while a + 8 <= to {
        wr64(a, word);
        a += 8;
    }
    while a < to {
        wr8(a, byte);
        a += 1;
    }
}

/// The first address in `[from, to)` that does not hold `byte` (eight bytes at a time where
/// aligned: this runs over tens of MiB).
pub fn first_not(from: u64, to: u64, byte: u8) -> Option<u64> {
    let word = u64::from_ne_bytes([byte; 8]);
    let mut a = from;
    while a < to && !a.is_multiple_of(8) {
        if rd8(a) != byte {
            return Some(a);
        }
        a += 1;
    }
    while a + 8 <= to {
        // SAFETY: RAM below 1 GiB, identity mapped for user mode; `a` is 8-aligned.
        if unsafe { core::ptr::read_volatile(a as *const u64) } != word {
            return (a..a + 8).find(|&b| rd8(b) != byte);
        }
        a += 8;
    }
    (a..to).find(|&b| rd8(b) != byte)
}

/// The disk's byte at `offset`: the host writes the same pattern (tests/replay.rs).
pub fn disk_byte(offset: u64) -> u8 {
    let word = (offset / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    (word >> ((offset % 8) * 8)) as u8
}

pub fn set_descriptor(index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC_TABLE + u64::from(index) * 16;
    wr64(at, addr);
    wr32(at + 8, len);
    wr16(at + 12, flags);
    wr16(at + 14, next);
}

/// Writes a read request's header for the chain whose head is `head`; returns its address.
pub fn read_header(head: u16, sector: u64) -> u64 {
    let header = HEADERS + u64::from(head) * 16;
    wr32(header, REQ_IN);
    wr32(header + 4, 0);
    wr64(header + 8, sector);
    header
}

pub struct Device {
    base: u64,
}

impl Device {
    pub fn reg(&self, offset: u64) -> u64 {
        self.base + offset
    }

    /// The first virtio-blk device.
    pub fn find() -> Device {
        Self::find_type(TYPE_BLOCK).unwrap_or_else(|| stop(ERR_NO_BLOCK_DEVICE, 0))
    }

    /// The first device of virtio device type `device_type`.
    pub fn find_type(device_type: u32) -> Option<Device> {
        (0..MAX_DEVICES)
            .map(|i| FIRST_DEVICE + i * DEVICE_STRIDE)
            .find(|&base| rd32(base) == MAGIC && rd32(base + 0x08) == device_type)
            .map(|base| Device { base })
    }

    pub fn status(&self) -> u32 {
        rd32(self.reg(REG_STATUS))
    }

    pub fn set_status(&self, status: u32) {
        wr32(self.reg(REG_STATUS), status);
    }

    /// Resets the device and negotiates VERSION_1 only, up to FEATURES_OK.
    pub fn negotiate(&self) {
        self.set_status(0);
        self.set_status(STATUS_ACK);
        self.set_status(STATUS_ACK | STATUS_DRIVER);
        wr32(self.reg(0x14), 1);
        if rd32(self.reg(0x10)) & VERSION_1_HIGH == 0 {
            stop(ERR_FEATURES, 1);
        }
        wr32(self.reg(0x24), 0);
        wr32(self.reg(0x20), 0);
        wr32(self.reg(0x24), 1);
        wr32(self.reg(0x20), VERSION_1_HIGH);
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            stop(ERR_FEATURES, 2);
        }
    }

    /// Sets queue 0 up at the fixed ring addresses; marks it ready when `ready`.
    pub fn setup_queue(&self, ready: bool) {
        wr32(self.reg(REG_QUEUE_SEL), 0);
        if rd32(self.reg(0x34)) < u32::from(QUEUE_SIZE) {
            stop(ERR_FEATURES, 3);
        }
        wr32(self.reg(REG_QUEUE_NUM), u32::from(QUEUE_SIZE));
        for (low, addr) in [(0x80, DESC_TABLE), (0x90, AVAIL_RING), (0xa0, USED_RING)] {
            wr32(self.reg(low), addr as u32);
            wr32(self.reg(low + 4), (addr >> 32) as u32);
        }
        if ready {
            wr32(self.reg(REG_QUEUE_READY), 1);
        }
    }

    pub fn driver_ok(&self) {
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    /// The disk's capacity in sectors (configuration space).
    pub fn capacity(&self) -> u64 {
        u64::from(rd32(self.reg(0x100))) | (u64::from(rd32(self.reg(0x104))) << 32)
    }

    /// The whole set-up a well-behaved driver does, with rings zeroed; returns the
    /// capacity, which must hold `min_sectors`.
    pub fn start(&self, min_sectors: u64) -> u64 {
        fill(DESC_TABLE, RINGS_END, 0);
        self.negotiate();
        self.setup_queue(true);
        self.driver_ok();
        let capacity = self.capacity();
        if capacity < min_sectors {
            stop(ERR_SMALL_DISK, capacity);
        }
        capacity
    }

    pub fn notify(&self) {
        wr32(self.reg(REG_QUEUE_NOTIFY), 0);
    }
}
