//! The replay: check the trace, fill the pages the recorded function had data in, say ready,
//! wait for go, then touch the pages in first-touch order with the compute between them, and
//! report the checksum of what was read. The trace format is snapshot/src/replay_trace.rs's.

use crate::boot::BootInfo;
use crate::control;

const MAGIC: &[u8; 8] = b"REAPTRC1";
const PAGE: u64 = 4096;
const HEADER_LEN: u64 = 32;
/// The replay guest's own first 2 MiB.
const RESERVED_PAGES: u64 = 512;
/// The boot page tables map the first GiB only.
const MAPPED_END: u64 = 1 << 30;
const WRITE_BIT: u32 = 1 << 31;

/// Error codes of the control page (devices/src/legacy/replay_control.rs).
const ERR_NOT_A_TRACE: u32 = 1;
const ERR_OUTSIDE_MEMORY: u32 = 2;
const ERR_TRUNCATED: u32 = 3;
const ERR_OWN_REGION: u32 = 4;
const ERR_NO_INITRD: u32 = 5;
const ERR_UNMAPPED_MEMORY: u32 = 6;

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass addresses inside guest RAM below 1 GiB, identity-mapped for user
    // mode by entry.rs.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn stop(code: u32, detail: u64) -> ! {
    control::write(control::DETAIL, detail as u32);
    control::write(control::ERROR, code);
    loop {
        core::hint::spin_loop();
    }
}

fn pattern(page: u64) -> u64 {
    page.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// `iterations` of a two-instruction loop: compute time, calibrated in instructions.
fn compute(iterations: u32) {
    if iterations == 0 {
        return;
    }
    // SAFETY: a register-only countdown loop.
    unsafe {
        core::arch::asm!("2:", "sub {n:e}, 1", "jnz 2b", n = inout(reg) iterations => _, options(nomem, nostack));
    }
}

/// A write touch as the function's first access to the page was: one write. A read then a
/// write would cost two faults on a private file mapping (the page cache's page mapped
/// read-only, then copied on write) where the real first write takes one. `lock xadd` reads
/// and writes in one instruction, which faults once, as a write.
///
/// # Safety
/// `addr` must be a mapped, writable, 8-byte-aligned guest address.
unsafe fn first_write(addr: *mut u64) -> u64 {
    let mut value: u64 = 0xa5a5;
    // SAFETY: per the contract; the instruction touches the 8 bytes at `addr` only.
    unsafe {
        core::arch::asm!("lock xadd qword ptr [{addr}], {v}", addr = in(reg) addr, v = inout(reg) value, options(nostack));
    }
    value
}

struct Trace {
    fills_at: u64,
    fills: u64,
    touches_at: u64,
    touches: u64,
}

fn parse(info: &BootInfo) -> Trace {
    if info.initrd_len == 0 {
        stop(ERR_NO_INITRD, 0);
    }
    if info.ram_end > MAPPED_END {
        stop(ERR_UNMAPPED_MEMORY, info.ram_end / PAGE);
    }
    let base = info.initrd_addr;
    if info.initrd_len < HEADER_LEN
        || read::<[u8; 8]>(base) != *MAGIC
        || u64::from(read::<u32>(base + 8)) != PAGE
    {
        stop(ERR_NOT_A_TRACE, 0);
    }
    let fills: u64 = read(base + 16);
    let touches: u64 = read(base + 24);
    let need = fills
        .checked_mul(16)
        .and_then(|f| touches.checked_mul(8).and_then(|t| t.checked_add(f)))
        .and_then(|n| n.checked_add(HEADER_LEN));
    match need {
        Some(n) if n <= info.initrd_len => {}
        _ => stop(ERR_TRUNCATED, 0),
    }
    Trace {
        fills_at: base + HEADER_LEN,
        fills,
        touches_at: base + HEADER_LEN + fills * 16,
        touches,
    }
}

/// Runs the whole replay; never returns.
pub fn run(info: &BootInfo) -> ! {
    let trace = parse(info);
    let ram_pages = info.ram_end / PAGE;
    let initrd_first = info.initrd_addr / PAGE;
    let initrd_end = (info.initrd_addr + info.initrd_len).div_ceil(PAGE);
    let own = |page: u64| page < RESERVED_PAGES || (initrd_first..initrd_end).contains(&page);
    for i in 0..trace.touches {
        let page = u64::from(read::<u32>(trace.touches_at + i * 8));
        if page >= ram_pages {
            stop(ERR_OUTSIDE_MEMORY, page);
        }
        if own(page) {
            stop(ERR_OWN_REGION, page);
        }
    }
    for i in 0..trace.fills {
        let first: u64 = read(trace.fills_at + i * 16);
        let pages: u64 = read(trace.fills_at + i * 16 + 8);
        let end = first.saturating_add(pages);
        if end > ram_pages {
            stop(ERR_OUTSIDE_MEMORY, end - 1);
        }
        for page in (first..end).filter(|&p| !own(p)) {
            // SAFETY: a RAM page below 1 GiB outside the guest's own region (checked above).
            unsafe { core::ptr::write_volatile((page * PAGE) as *mut u64, pattern(page)) };
        }
    }
    control::write(control::READY, 1);
    while control::read(control::GO) == 0 {
        core::hint::spin_loop();
    }
    let mut c = 0u64;
    for i in 0..trace.touches {
        let page = u64::from(read::<u32>(trace.touches_at + i * 8));
        let word: u32 = read(trace.touches_at + i * 8 + 4);
        compute(word & !WRITE_BIT);
        let addr = (page * PAGE) as *mut u64;
        let value = if word & WRITE_BIT != 0 {
            // SAFETY: checked above: a RAM page below 1 GiB outside the guest's own region.
            unsafe { first_write(addr) }
        } else {
            // SAFETY: as above.
            unsafe { core::ptr::read_volatile(addr) }
        };
        c = (c ^ value).rotate_left(7) ^ page;
    }
    control::write(control::DONE, (c ^ (c >> 32)) as u32);
    loop {
        core::hint::spin_loop();
    }
}
