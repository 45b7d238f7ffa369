//! The entropy check (`reapvm-entropy-check`): drives reapvm's virtio-rng as Linux's
//! virtio_rng driver does, from user mode with completions polled, in two rounds of 16
//! requests of 256 bytes, each into its own buffer: one at boot, then (after READY) one once
//! the VMM says go, which in a VM restored from a snapshot runs on the restored queue. Each
//! buffer must come back whole, not all one byte, unlike every other, and only its own
//! buffer may change. Done reports the number of requests checked.

use crate::control;
use crate::virtio::{
    fill, first_not, rd16, rd32, set_descriptor, stop, wr16, Device, AVAIL_RING, DESC_F_WRITE,
    PAGE, RINGS_END, USED_RING,
};

const TYPE_RNG: u32 = 4;
const REQUESTS: u16 = 32;
const ROUND: u16 = REQUESTS / 2;
const LEN: u64 = 256;
/// One buffer per request, a page apart, with the rest of each page a guard.
const BUFFERS: u64 = 0x80_0000;
const BUFFERS_END: u64 = BUFFERS + REQUESTS as u64 * PAGE;
const GUARD: u8 = 0xa5;
const POLLS: u64 = 1 << 28;

const ERR_NO_RNG: u32 = 25;
const ERR_TIMEOUT: u32 = 26;
const ERR_USED_LEN: u32 = 27;
const ERR_NOT_RANDOM: u32 = 28;
const ERR_GUARD: u32 = 29;

pub fn run() -> ! {
    let device = Device::find_type(TYPE_RNG).unwrap_or_else(|| stop(ERR_NO_RNG, 0));
    fill(crate::virtio::DESC_TABLE, RINGS_END, 0);
    fill(BUFFERS, BUFFERS_END, GUARD);
    device.negotiate();
    device.setup_queue(true);
    device.driver_ok();
    round(&device, 0);
    control::write(control::READY, 1);
    while control::read(control::GO) == 0 {
        core::hint::spin_loop();
    }
    round(&device, ROUND);
    control::console(b"entropy check: every buffer random and in place\n");
    control::write(control::DONE, u32::from(REQUESTS));
    loop {
        core::hint::spin_loop();
    }
}

/// Makes requests `first..first + ROUND` available, waits for all of them and checks them
/// against every request before them.
fn round(device: &Device, first: u16) {
    for i in first..first + ROUND {
        set_descriptor(i, buffer(i), LEN as u32, DESC_F_WRITE, 0);
        wr16(AVAIL_RING + 4 + 2 * u64::from(i), i);
    }
    crate::virtio::fence();
    wr16(AVAIL_RING + 2, first + ROUND);
    crate::virtio::fence();
    device.notify();
    let mut polls = 0;
    while rd16(USED_RING + 2) < first + ROUND {
        polls += 1;
        if polls > POLLS {
            stop(ERR_TIMEOUT, u64::from(rd16(USED_RING + 2)));
        }
        core::hint::spin_loop();
    }
    for slot in u64::from(first)..u64::from(first + ROUND) {
        let element = USED_RING + 4 + 8 * slot;
        let id = rd32(element);
        if rd32(element + 4) != LEN as u32 {
            stop(ERR_USED_LEN, u64::from(id));
        }
    }
    for i in first..first + ROUND {
        let at = buffer(i);
        // Bytes from getrandom are all GUARD (or all zero) with negligible chance.
        if first_not(at, at + LEN, GUARD).is_none() || first_not(at, at + LEN, 0).is_none() {
            stop(ERR_NOT_RANDOM, u64::from(i));
        }
        if first_not(at + LEN, at + PAGE, GUARD).is_some() {
            stop(ERR_GUARD, u64::from(i));
        }
        for j in 0..i {
            if same(at, buffer(j)) {
                stop(ERR_NOT_RANDOM, u64::from(i));
            }
        }
    }
}

fn buffer(i: u16) -> u64 {
    BUFFERS + u64::from(i) * PAGE
}

/// Whether the first 16 bytes of two buffers are equal.
fn same(a: u64, b: u64) -> bool {
    (0..16).all(|k| crate::virtio::rd8(a + k) == crate::virtio::rd8(b + k))
}
