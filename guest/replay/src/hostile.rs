//! Hostile-driver cases (boot argument `reapvm-hostile=CASE`): the guest breaks the virtio
//! rules on the VMM's first virtio-blk device in one way, reads the device status the VMM
//! then reports, and proves the device still serves after a reset with one good read whose
//! every byte it checks. It reports the status it saw as its done value; the host side
//! (tests/hostile.rs) checks it against docs/security.md and watches the VMM's API and log
//! while the guest misbehaves.
//!
//! Cases:
//! - `avail-ahead`: the available index set 1000 entries ahead of a 64-entry queue.
//! - `not-ready`: the queue notified before DRIVER_OK, and DRIVER_OK with the queue never
//!   marked ready.
//! - `descriptor-loop`: a chain whose last descriptor points back to its first.
//! - `outside-memory`: a data buffer 1 TiB up, far outside guest memory.
//! - `huge-length`: a data buffer of almost 4 GiB in a 64 MiB guest.
//! - `register-flood`: 200,000 register writes the transport must refuse (status steps
//!   back, features after FEATURES_OK, queue set-up after DRIVER_OK, odd widths,
//!   notifications of queues that do not exist).

use crate::control;
use crate::virtio::*;

/// The good read's buffer (after the rings) and size.
const BUFFER: u64 = 0x80_0000;
const GOOD_SECTORS: u64 = 8;
const GOOD_SECTOR: u64 = 5;
/// The abused chains' data buffer, inside guest memory.
const DATA: u64 = 0x90_0000;
const FLOOD_WRITES: u32 = 200_000;

/// Error codes of the control page (devices/src/legacy/replay_control.rs).
const ERR_UNKNOWN_CASE: u32 = 21;
const ERR_NOT_RETURNED: u32 = 22;
const ERR_RECOVERY_TIMEOUT: u32 = 23;
const ERR_RECOVERY_DATA: u32 = 24;

#[derive(Clone, Copy)]
enum Case {
    AvailAhead,
    NotReady,
    DescriptorLoop,
    OutsideMemory,
    HugeLength,
    RegisterFlood,
}

fn case_from(cmdline: &[u8]) -> Case {
    let key = b"reapvm-hostile=";
    let Some(at) = cmdline.windows(key.len()).position(|w| w == key) else {
        stop(ERR_UNKNOWN_CASE, 0)
    };
    let rest = &cmdline[at + key.len()..];
    let name = &rest[..rest
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(rest.len())];
    match name {
        b"avail-ahead" => Case::AvailAhead,
        b"not-ready" => Case::NotReady,
        b"descriptor-loop" => Case::DescriptorLoop,
        b"outside-memory" => Case::OutsideMemory,
        b"huge-length" => Case::HugeLength,
        b"register-flood" => Case::RegisterFlood,
        _ => stop(ERR_UNKNOWN_CASE, name.len() as u64),
    }
}

/// Polls the used ring (memory, no exits) until it reaches `index`; false on timeout.
fn wait_used(index: u16) -> bool {
    let mut spins: u64 = 0;
    while rd16(USED_RING + 2) != index {
        spins += 1;
        if spins > 2_000_000_000 {
            return false;
        }
        core::hint::spin_loop();
    }
    fence();
    true
}

/// Polls the status register (an exit each time) until `bits` are set, a bounded number of
/// times; the status last read.
fn wait_status(device: &Device, bits: u32) -> u32 {
    let mut status = device.status();
    for _ in 0..1_000_000 {
        if status & bits == bits {
            break;
        }
        status = device.status();
    }
    status
}

/// Offers the chain whose head is descriptor 0 as available entry `index` and notifies.
fn offer_head_zero(device: &Device, index: u16) {
    wr16(AVAIL_RING + 4 + u64::from(index % QUEUE_SIZE) * 2, 0);
    fence();
    wr16(AVAIL_RING + 2, index.wrapping_add(1));
    fence();
    device.notify();
}

/// A read request (header, one data buffer of `len` bytes at `data`, status byte) whose
/// last descriptor links back to the first when `looped`; offered and waited for.
fn abused_read(device: &Device, data: u64, len: u32, looped: bool) {
    let header = read_header(0, 0);
    set_descriptor(0, header, 16, DESC_F_NEXT, 1);
    set_descriptor(1, data, len, DESC_F_WRITE | DESC_F_NEXT, 2);
    let last_flags = if looped {
        DESC_F_WRITE | DESC_F_NEXT
    } else {
        DESC_F_WRITE
    };
    set_descriptor(2, STATUS_BYTES, 1, last_flags, 0);
    offer_head_zero(device, 0);
    if !wait_used(1) {
        stop(ERR_NOT_RETURNED, 0);
    }
}

/// Register writes a driver must never make once the device runs, in turn.
fn flood(device: &Device) {
    for i in 0..FLOOD_WRITES {
        match i % 6 {
            // Status stepping back to ACKNOWLEDGE alone.
            0 => device.set_status(STATUS_ACK),
            // Driver features after FEATURES_OK.
            1 => wr32(device.reg(0x20), 0xffff_ffff),
            // Queue size after DRIVER_OK.
            2 => wr32(device.reg(REG_QUEUE_NUM), 3),
            // A one-byte write to the status register.
            // SAFETY: the device's register page, mapped uncached by entry.rs.
            3 => unsafe { core::ptr::write_volatile(device.reg(REG_STATUS) as *mut u8, 0) },
            // Notification of a queue the device does not have.
            4 => wr32(device.reg(REG_QUEUE_NOTIFY), 7),
            // A register that does not exist.
            _ => wr32(device.reg(0xe0), i),
        }
    }
}

/// Resets the device, sets it up as a good driver does, reads `GOOD_SECTORS` and checks
/// every byte against the disk's pattern.
fn good_read(device: &Device) {
    device.start(GOOD_SECTOR + GOOD_SECTORS);
    let len = GOOD_SECTORS * SECTOR;
    fill(BUFFER, BUFFER + len, 0);
    wr8(STATUS_BYTES, 0xff);
    let header = read_header(0, GOOD_SECTOR);
    set_descriptor(0, header, 16, DESC_F_NEXT, 1);
    set_descriptor(1, BUFFER, len as u32, DESC_F_WRITE | DESC_F_NEXT, 2);
    set_descriptor(2, STATUS_BYTES, 1, DESC_F_WRITE, 0);
    offer_head_zero(device, 0);
    if !wait_used(1) {
        stop(ERR_RECOVERY_TIMEOUT, 0);
    }
    if rd8(STATUS_BYTES) != 0 {
        stop(ERR_RECOVERY_DATA, u64::from(rd8(STATUS_BYTES)));
    }
    let disk = GOOD_SECTOR * SECTOR;
    if let Some(at) = (0..len).find(|&i| rd8(BUFFER + i) != disk_byte(disk + i)) {
        stop(ERR_RECOVERY_DATA, 0x100 + at);
    }
}

/// Runs the case named on the command line; never returns.
pub fn run(cmdline: &[u8]) -> ! {
    let case = case_from(cmdline);
    let device = Device::find();
    let seen = match case {
        Case::AvailAhead => {
            device.start(GOOD_SECTOR + GOOD_SECTORS);
            wr16(AVAIL_RING + 2, 1000);
            fence();
            device.notify();
            wait_status(&device, STATUS_NEEDS_RESET)
        }
        Case::NotReady => {
            fill(DESC_TABLE, RINGS_END, 0);
            device.negotiate();
            device.setup_queue(false);
            device.notify();
            device.driver_ok();
            device.notify();
            device.status()
        }
        Case::DescriptorLoop => {
            device.start(GOOD_SECTOR + GOOD_SECTORS);
            abused_read(&device, DATA, 512, true);
            device.status()
        }
        Case::OutsideMemory => {
            device.start(GOOD_SECTOR + GOOD_SECTORS);
            abused_read(&device, 1 << 40, 512, false);
            device.status()
        }
        Case::HugeLength => {
            device.start(GOOD_SECTOR + GOOD_SECTORS);
            abused_read(&device, DATA, 0xffff_f000, false);
            device.status()
        }
        Case::RegisterFlood => {
            device.start(GOOD_SECTOR + GOOD_SECTORS);
            flood(&device);
            device.status()
        }
    };
    good_read(&device);
    control::console(b"hostile case: device served again after reset\n");
    control::write(control::DONE, seen);
    loop {
        core::hint::spin_loop();
    }
}
