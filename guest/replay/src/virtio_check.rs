//! The virtio-blk DMA check (boot argument `reapvm-virtio-check`): drives the VMM's first
//! virtio-blk device itself, from user mode, with no interrupts (it polls the used ring).
//! Reads land in buffers scattered over guest memory, split over one to three descriptors at
//! arbitrary byte boundaries, each buffer fenced by guard bytes; descriptors are recycled in
//! a shuffled order, the ring wraps thousands of times and its 16-bit indexes wrap too. Every
//! byte read is checked against the disk's known pattern, every guard byte after each
//! request, and all the memory the check does not use at the end. Done reports the number
//! of requests checked; any difference stops the guest with an error naming the request.

use crate::boot::BootInfo;
use crate::control;
use crate::virtio::*;

/// Chains in flight at most (each takes up to five descriptors).
const IN_FLIGHT: usize = 12;

/// One buffer region per in-flight slot, every 2 MiB from 8 MiB: a guard page, up to
/// `MAX_SECTORS` of data at an offset inside the next page, and guard bytes to a page after.
const REGIONS: u64 = 0x80_0000;
const REGION_STRIDE: u64 = 0x20_0000;
const MAX_SECTORS: u64 = 128;
const REGION_LEN: u64 = PAGE + PAGE + MAX_SECTORS * SECTOR + PAGE;
/// The guest's own first 2 MiB end here; what the check does not use of the rest of RAM
/// (all but the rings, headers and status bytes) holds guard bytes, checked at the end.
const OWN_END: u64 = 0x20_0000;
/// Enough RAM for every buffer region.
const RAM_NEEDED: u64 = REGIONS + IN_FLIGHT as u64 * REGION_STRIDE;
const GUARD: u8 = 0xa5;

/// Error codes of the control page (devices/src/legacy/replay_control.rs).
const ERR_DATA: u32 = 12;
const ERR_GUARD: u32 = 13;
const ERR_STATUS: u32 = 14;
const ERR_USED_LEN: u32 = 15;
const ERR_TIMEOUT: u32 = 16;
const ERR_STRAY_WRITE: u32 = 17;
const ERR_USED_ID: u32 = 18;
const ERR_MEMORY: u32 = 20;

/// xorshift64: the check's only source of variety, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A request in flight.
#[derive(Clone, Copy)]
struct Request {
    number: u32,
    head: u16,
    descriptors: [u16; 5],
    used: usize,
    sector: u64,
    len: u64,
    /// The data's pieces: (guest address, length), in order.
    pieces: [(u64, u64); 3],
    pieces_used: usize,
    slot: usize,
}

/// The descriptors not in use: a ring taken from the front and given back at a random
/// place (swapped in), so chains reuse descriptors in an order that keeps changing.
struct FreeList {
    items: [u16; QUEUE_SIZE as usize],
    head: usize,
    len: usize,
}

impl FreeList {
    fn new() -> Self {
        let mut items = [0u16; QUEUE_SIZE as usize];
        for (i, item) in items.iter_mut().enumerate() {
            *item = i as u16;
        }
        Self {
            items,
            head: 0,
            len: QUEUE_SIZE as usize,
        }
    }

    fn at(&self, i: usize) -> usize {
        (self.head + i) % self.items.len()
    }

    fn take(&mut self) -> u16 {
        let first = self.items[self.head];
        self.head = self.at(1);
        self.len -= 1;
        first
    }

    fn give(&mut self, index: u16, rng: &mut Rng) {
        let tail = self.at(self.len);
        self.items[tail] = index;
        self.len += 1;
        let other = self.at(rng.below(self.len as u64) as usize);
        self.items.swap(tail, other);
    }
}

/// The number after `key` (e.g. `requests=`) on the command line, else `default`.
fn number_from(cmdline: &[u8], key: &[u8], default: u32) -> u32 {
    let Some(at) = cmdline.windows(key.len()).position(|w| w == key) else {
        return default;
    };
    let mut n: u32 = 0;
    for &b in &cmdline[at + key.len()..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.saturating_mul(10).saturating_add(u32::from(b - b'0'));
    }
    n
}

/// Runs the check; never returns.
pub fn run(info: &BootInfo, cmdline: &[u8]) -> ! {
    let total = number_from(cmdline, b"requests=", 70_000);
    // `sectors=N` (1 to MAX_SECTORS): every read that long, so that a host test knows the
    // bytes moved (a rate limiter's); else mostly small reads with now and then a large one.
    let fixed_sectors = u64::from(number_from(cmdline, b"sectors=", 0)).min(MAX_SECTORS);
    if info.ram_end > MAPPED_END || info.ram_end < RAM_NEEDED {
        stop(ERR_MEMORY, info.ram_end / PAGE);
    }
    let device = Device::find();
    fill(OWN_END, DESC_TABLE, GUARD);
    fill(RINGS_END, info.ram_end, GUARD);
    let capacity = device.start(4 * MAX_SECTORS);
    control::console(b"virtio check: device ready\n");

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut free = FreeList::new();
    let mut slots_free = [true; IN_FLIGHT];
    let mut flight: [Option<Request>; IN_FLIGHT] = [None; IN_FLIGHT];
    let mut avail_idx: u16 = 0;
    let mut used_seen: u16 = 0;
    let mut submitted: u32 = 0;
    let mut checked: u32 = 0;
    while checked < total {
        // Submit a batch of up to IN_FLIGHT requests, then notify once.
        let mut batch = 0;
        while submitted < total && free.len >= 5 {
            let Some(slot) = slots_free.iter().position(|&f| f) else {
                break;
            };
            // Mostly small reads, now and then a large one.
            let sectors = if fixed_sectors > 0 {
                fixed_sectors
            } else if rng.below(16) == 0 {
                1 + rng.below(MAX_SECTORS)
            } else {
                1 + rng.below(8)
            };
            let sector = rng.below(capacity - sectors + 1);
            let len = sectors * SECTOR;
            let region = REGIONS + slot as u64 * REGION_STRIDE;
            let start = region + PAGE + rng.below(PAGE / 8) * 8;
            // One to three pieces, split at arbitrary byte offsets, with guard bytes (up to
            // 512) between them.
            let mut pieces = [(0u64, 0u64); 3];
            let pieces_used = 1 + rng.below(3) as usize;
            let (mut at, mut addr) = (0, start);
            for (i, piece) in pieces.iter_mut().enumerate().take(pieces_used) {
                let left = len - at;
                let this = if i + 1 == pieces_used {
                    left
                } else {
                    1 + rng.below(left - (pieces_used - 1 - i) as u64)
                };
                *piece = (addr, this);
                at += this;
                addr += this + rng.below(513);
            }
            let mut request = Request {
                number: submitted,
                head: 0,
                descriptors: [0; 5],
                used: 2 + pieces_used,
                sector,
                len,
                pieces,
                pieces_used,
                slot,
            };
            for d in request.descriptors.iter_mut().take(request.used) {
                *d = free.take();
            }
            let head = request.descriptors[0];
            request.head = head;
            let header = read_header(head, sector);
            let status = STATUS_BYTES + u64::from(head);
            wr8(status, 0xff);
            set_descriptor(head, header, 16, DESC_F_NEXT, request.descriptors[1]);
            for (i, &(addr, piece_len)) in pieces.iter().enumerate().take(pieces_used) {
                set_descriptor(
                    request.descriptors[1 + i],
                    addr,
                    piece_len as u32,
                    DESC_F_WRITE | DESC_F_NEXT,
                    request.descriptors[2 + i],
                );
            }
            set_descriptor(
                request.descriptors[request.used - 1],
                status,
                1,
                DESC_F_WRITE,
                0,
            );
            wr16(AVAIL_RING + 4 + u64::from(avail_idx % QUEUE_SIZE) * 2, head);
            avail_idx = avail_idx.wrapping_add(1);
            fence();
            wr16(AVAIL_RING + 2, avail_idx);
            slots_free[slot] = false;
            flight[slot] = Some(request);
            submitted += 1;
            batch += 1;
        }
        if batch > 0 {
            fence();
            device.notify();
        }
        // Wait for at least one completion, then check every one there is.
        let mut spins: u64 = 0;
        while rd16(USED_RING + 2) == used_seen {
            spins += 1;
            if spins > 4_000_000_000 {
                stop(ERR_TIMEOUT, u64::from(checked));
            }
            core::hint::spin_loop();
        }
        fence();
        let used_now = rd16(USED_RING + 2);
        while used_seen != used_now {
            let elem = USED_RING + 4 + u64::from(used_seen % QUEUE_SIZE) * 8;
            let id = rd32(elem);
            let written = rd32(elem + 4);
            used_seen = used_seen.wrapping_add(1);
            let Some(slot) = flight
                .iter()
                .position(|r| r.is_some_and(|r| u32::from(r.head) == id))
            else {
                stop(ERR_USED_ID, u64::from(id));
            };
            let Some(request) = flight[slot].take() else {
                stop(ERR_USED_ID, u64::from(id));
            };
            check(&request);
            if u64::from(written) != request.len + 1 {
                stop(ERR_USED_LEN, u64::from(request.number));
            }
            for &d in request.descriptors.iter().take(request.used) {
                free.give(d, &mut rng);
            }
            slots_free[request.slot] = true;
            checked += 1;
        }
    }
    let stray = first_not(OWN_END, DESC_TABLE, GUARD).or(first_not(RINGS_END, info.ram_end, GUARD));
    if let Some(stray) = stray {
        stop(ERR_STRAY_WRITE, stray / PAGE);
    }
    control::console(b"virtio check: every byte as expected\n");
    control::write(control::DONE, checked);
    loop {
        core::hint::spin_loop();
    }
}

/// Checks one completed request: its status, every byte of its data against the disk, the
/// guard bytes around and between its pieces; then puts the guard bytes back.
fn check(request: &Request) {
    let status = STATUS_BYTES + u64::from(request.head);
    if rd8(status) != 0 {
        stop(ERR_STATUS, u64::from(request.number));
    }
    let mut disk = request.sector * SECTOR;
    for &(addr, len) in request.pieces.iter().take(request.pieces_used) {
        for a in addr..addr + len {
            if rd8(a) != disk_byte(disk) {
                stop(ERR_DATA, u64::from(request.number));
            }
            disk += 1;
        }
    }
    // Everything in the region around and between the pieces is guard.
    let region = REGIONS + request.slot as u64 * REGION_STRIDE;
    let mut from = region;
    for &(addr, len) in request.pieces.iter().take(request.pieces_used) {
        if first_not(from, addr, GUARD).is_some() {
            stop(ERR_GUARD, u64::from(request.number));
        }
        fill(addr, addr + len, GUARD);
        from = addr + len;
    }
    if first_not(from, region + REGION_LEN, GUARD).is_some() {
        stop(ERR_GUARD, u64::from(request.number));
    }
}
