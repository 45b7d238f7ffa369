//! Replay traces (docs/replay.md): a function's recorded memory behaviour in a form the
//! replay guest (guest/replay) executes in user mode. Made from a REAP recording: the WS
//! file gives the pages in first-touch order, the function's memory file says which pages
//! hold data (the replay VM fills those with non-zero data, so every backend reads what it
//! would read for the function), and the function's warm latency gives the compute time
//! spread between the touches.
//!
//! Little-endian, loaded as the replay VM's initrd:
//!
//! ```text
//! header:  magic "REAPTRC1" | page_size u32 (4096) | reserved u32 | fill_runs u64 | touches u64
//! fills:   first_page u64 | pages u64                            (x fill_runs)
//! touches: page u32 | gap u32 (bit 31: write; bits 0-30: loop iterations before the touch)
//! ```
//!
//! Pages are guest-physical page numbers. The replay guest owns the first 2 MiB (its image,
//! stacks, the boot structures) and its initrd; traces stay out of both.

use crate::ws::WsRegion;

/// The page size as the trace's arithmetic on file offsets and addresses uses it.
const PAGE: u64 = crate::PAGE_SIZE as u64;

pub const TRACE_MAGIC: &[u8; 8] = b"REAPTRC1";
pub const HEADER_LEN: usize = 32;
/// Pages below this belong to the replay guest (2 MiB).
pub const GUEST_RESERVED_PAGES: u64 = 512;
pub const WRITE_BIT: u32 = 1 << 31;
pub const MAX_GAP: u32 = WRITE_BIT - 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("not a replay trace: {0}")]
    Malformed(String),
    #[error("the trace touches page {page}, outside guest memory ({ram_pages} pages)")]
    OutsideMemory { page: u64, ram_pages: u64 },
    #[error("the trace touches page {page}, inside the replay guest's own first 2 MiB")]
    InGuestRegion { page: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    pub page: u32,
    pub write: bool,
    /// Iterations of the replay guest's two-instruction loop before this touch.
    pub gap: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// (first page, pages): pages that hold data in the recorded function's memory.
    pub fills: Vec<(u64, u64)>,
    /// In first-touch order.
    pub touches: Vec<Touch>,
}

/// What the replay guest writes into a filled page (its first word): never zero.
pub fn pattern(page: u64) -> u64 {
    page.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

impl Trace {
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER_LEN + self.fills.len() * 16 + self.touches.len() * 8);
        out.extend_from_slice(TRACE_MAGIC);
        out.extend_from_slice(&(crate::PAGE_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.fills.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.touches.len() as u64).to_le_bytes());
        for &(first, pages) in &self.fills {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
        }
        for t in &self.touches {
            out.extend_from_slice(&t.page.to_le_bytes());
            let word = t.gap.min(MAX_GAP) | if t.write { WRITE_BIT } else { 0 };
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, TraceError> {
        let bad = |what: String| TraceError::Malformed(what);
        if bytes.len() < HEADER_LEN || &bytes[..8] != TRACE_MAGIC {
            return Err(bad("no REAPTRC1 header".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if u64::from(u32_at(8)) != PAGE {
            return Err(bad(format!("page size {}", u32_at(8))));
        }
        let (fills, touches) = (u64_at(16), u64_at(24));
        let need = fills
            .checked_mul(16)
            .and_then(|f| touches.checked_mul(8).and_then(|t| t.checked_add(f)))
            .and_then(|n| n.checked_add(HEADER_LEN as u64));
        if need != Some(bytes.len() as u64) {
            return Err(bad(format!(
                "{} bytes for {fills} fill runs and {touches} touches",
                bytes.len()
            )));
        }
        let mut at = HEADER_LEN;
        let mut trace = Trace::default();
        for _ in 0..fills {
            trace.fills.push((u64_at(at), u64_at(at + 8)));
            at += 16;
        }
        for _ in 0..touches {
            let word = u32_at(at + 4);
            trace.touches.push(Touch {
                page: u32_at(at),
                write: word & WRITE_BIT != 0,
                gap: word & MAX_GAP,
            });
            at += 8;
        }
        Ok(trace)
    }

    /// Refuses a trace a VM with `ram_pages` pages of memory cannot replay.
    /// Also refuses what would make the checksum ambiguous: a page touched twice, fill runs
    /// that overlap.
    pub fn check_fits(&self, ram_pages: u64) -> Result<(), TraceError> {
        for &(first, n) in &self.fills {
            let last = first.saturating_add(n.max(1) - 1);
            if last >= ram_pages {
                return Err(TraceError::OutsideMemory {
                    page: last,
                    ram_pages,
                });
            }
        }
        for t in &self.touches {
            if u64::from(t.page) >= ram_pages {
                return Err(TraceError::OutsideMemory {
                    page: u64::from(t.page),
                    ram_pages,
                });
            }
        }
        let mut fills = self.fills.clone();
        fills.sort_unstable();
        if fills.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(TraceError::Malformed("fill runs overlap".into()));
        }
        let mut pages: Vec<u32> = self.touches.iter().map(|t| t.page).collect();
        pages.sort_unstable();
        if let Some(w) = pages.windows(2).find(|w| w[0] == w[1]) {
            return Err(TraceError::Malformed(format!(
                "page {} is touched twice (a trace lists first touches)",
                w[0]
            )));
        }
        if let Some(t) = self
            .touches
            .iter()
            .find(|t| u64::from(t.page) < GUEST_RESERVED_PAGES)
        {
            return Err(TraceError::InGuestRegion {
                page: u64::from(t.page),
            });
        }
        Ok(())
    }

    /// The checksum the replay guest reports: what it reads from each touched page, in order.
    pub fn expected_checksum(&self) -> u32 {
        let mut fills = self.fills.clone();
        fills.sort_unstable();
        let filled = |page: u64| {
            page >= GUEST_RESERVED_PAGES
                && match fills.partition_point(|&(first, _)| first <= page) {
                    0 => false,
                    i => page < fills[i - 1].0 + fills[i - 1].1,
                }
        };
        let mut c = 0u64;
        for t in &self.touches {
            let page = u64::from(t.page);
            let value = if filled(page) { pattern(page) } else { 0 };
            c = (c ^ value).rotate_left(7) ^ page;
        }
        (c ^ (c >> 32)) as u32
    }

    pub fn total_gap(&self) -> u64 {
        self.touches.iter().map(|t| u64::from(t.gap)).sum()
    }
}

/// How a recording became a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportReport {
    pub ws_pages: u64,
    /// WS pages in the replay guest's own first 2 MiB, left out of the trace (the replay
    /// guest touches its own pages anyway).
    pub dropped_reserved: u64,
    pub filled_pages: u64,
    /// Touches that are writes (the touch log's first writes).
    pub write_touches: u64,
}

/// Makes a trace from a recording: its memory layout (`regions`, from the WS), the pages it
/// touched (memory-file offsets, in order of first touch, each with whether that touch was
/// a write: from its touch log), the function's memory file content (`memory`, as the
/// snapshot wrote it), and `gap_iterations` of compute spread evenly before the touches.
pub fn export(
    regions: &[WsRegion],
    touched: &[(u64, bool)],
    memory: &[u8],
    gap_iterations: u64,
) -> (Trace, ExportReport) {
    let page = crate::PAGE_SIZE;
    let to_guest_page = |file_offset: u64| {
        regions
            .iter()
            .find(|r| file_offset >= r.file_offset && file_offset < r.file_offset + r.size)
            .map(|r| (r.guest_addr + (file_offset - r.file_offset)) / PAGE)
    };
    let mut report = ExportReport::default();
    let mut pages = Vec::new();
    for &(offset, write) in touched {
        report.ws_pages += 1;
        let Some(gp) = to_guest_page(offset) else {
            continue;
        };
        if gp < GUEST_RESERVED_PAGES {
            report.dropped_reserved += 1;
            continue;
        }
        report.write_touches += u64::from(write);
        pages.push((gp, write));
    }
    let per_touch = if pages.is_empty() {
        0
    } else {
        gap_iterations / pages.len() as u64
    };
    let touches = pages
        .iter()
        .map(|&(p, write)| Touch {
            page: p as u32,
            write,
            gap: per_touch.min(u64::from(MAX_GAP)) as u32,
        })
        .collect();
    let mut fills: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        let start = r.file_offset as usize;
        let end = (r.file_offset + r.size).min(memory.len() as u64) as usize;
        let mut offset = start;
        while offset + page <= end {
            if memory[offset..offset + page].iter().any(|&b| b != 0) {
                let gp = (r.guest_addr + (offset - start) as u64) / PAGE;
                if gp >= GUEST_RESERVED_PAGES {
                    report.filled_pages += 1;
                    match fills.last_mut() {
                        Some((first, n)) if *first + *n == gp => *n += 1,
                        _ => fills.push((gp, 1)),
                    }
                }
            }
            offset += page;
        }
    }
    (Trace { fills, touches }, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Trace {
        Trace {
            fills: vec![(600, 4), (1000, 1)],
            touches: vec![
                Touch {
                    page: 601,
                    write: false,
                    gap: 10,
                },
                Touch {
                    page: 700,
                    write: true,
                    gap: 0,
                },
                Touch {
                    page: 1000,
                    write: false,
                    gap: MAX_GAP,
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_refuses_bad_bytes() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 2 * 16 + 3 * 8);
        assert_eq!(Trace::decode(&bytes).unwrap(), t);
        assert!(
            Trace::decode(&bytes[..bytes.len() - 1]).is_err(),
            "truncated"
        );
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(Trace::decode(&wrong).is_err(), "bad magic");
        let mut huge = bytes;
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Trace::decode(&huge).is_err(), "counts that overflow");
    }

    #[test]
    fn refuses_traces_outside_memory_or_in_the_guest_region() {
        let t = sample();
        assert!(t.check_fits(2000).is_ok());
        assert_eq!(
            t.check_fits(1000),
            Err(TraceError::OutsideMemory {
                page: 1000,
                ram_pages: 1000
            })
        );
        let mut low = sample();
        low.touches[0].page = 5;
        assert_eq!(
            low.check_fits(2000),
            Err(TraceError::InGuestRegion { page: 5 })
        );
    }

    #[test]
    fn checksum_depends_on_order_and_on_what_is_filled() {
        let t = sample();
        let mut swapped = t.clone();
        swapped.touches.swap(0, 1);
        assert_ne!(t.expected_checksum(), swapped.expected_checksum());
        let mut unfilled = t.clone();
        unfilled.fills.clear();
        assert_ne!(t.expected_checksum(), unfilled.expected_checksum());
        // By hand: 601 filled, 700 not, 1000 filled.
        let mut c = 0u64;
        for (page, value) in [(601u64, pattern(601)), (700, 0), (1000, pattern(1000))] {
            c = (c ^ value).rotate_left(7) ^ page;
        }
        assert_eq!(t.expected_checksum(), (c ^ (c >> 32)) as u32);
    }

    #[test]
    fn exports_touch_order_writes_fills_and_gaps() {
        // 1 MiB of memory: pages 600.. hold data; touched 601, 600 (a write), then 10 (in the
        // replay guest's own region: dropped, though a write).
        let page = crate::PAGE_SIZE;
        let mut memory = vec![0u8; 1024 * page];
        for p in [600usize, 601, 602, 900] {
            memory[p * page + 17] = 1;
        }
        let regions = [WsRegion {
            guest_addr: 0,
            size: memory.len() as u64,
            file_offset: 0,
        }];
        let touched = [(601 * PAGE, false), (600 * PAGE, true), (10 * PAGE, true)];
        let (trace, report) = export(&regions, &touched, &memory, 1000);
        assert_eq!(
            trace
                .touches
                .iter()
                .map(|t| (t.page, t.write))
                .collect::<Vec<_>>(),
            vec![(601, false), (600, true)]
        );
        assert!(trace.touches.iter().all(|t| t.gap == 500));
        assert_eq!(trace.fills, vec![(600, 3), (900, 1)]);
        assert_eq!(
            report,
            ExportReport {
                ws_pages: 3,
                dropped_reserved: 1,
                filled_pages: 4,
                write_touches: 1,
            }
        );
    }
}
