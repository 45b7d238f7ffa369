//! WS format version 1 (reapvm before streamed REAP): read by tools (a recording's summary for
//! the replay trace export, the fuzz target), refused by restores, which record anew. Pages in
//! the order of first touch, one checksum over the whole file.
//!
//! Inside the envelope (magic `REAPWSET`, version, length, CRC-64), little-endian:
//!
//! ```text
//! identity:  vmstate_checksum u64 | memory_len u64     (the snapshot the WS belongs to)
//! counts:    page_size u32 | regions u32 | runs u32 | reserved u32
//! regions:   guest_addr u64 | size u64 | file_offset u64          (x regions)
//! runs:      file_offset u64 | pages u32 | kind u32 (0 data, 1 zero)   (x runs)
//! data:      the pages of every data run, in run order
//! ```
//!
//! A run is a stretch of pages contiguous in the memory file that were touched one after the
//! other; zero runs hold pages that were all zeroes in the snapshot and store no data.

use super::{RunKind, SnapshotIdentity, WsError, WsRegion, WsRun, WS_MAGIC};
use crate::envelope::{self};
use crate::PAGE_SIZE;

pub const VERSION: u32 = 1;

const IDENTITY_LEN: usize = 16;
const COUNTS_LEN: usize = 16;
const REGION_LEN: usize = 24;
const RUN_LEN: usize = 16;

/// A decoded WS: its runs, and where each data run's pages sit in `data`.
#[derive(Debug)]
pub struct WorkingSet<'a> {
    pub identity: SnapshotIdentity,
    pub page_size: u32,
    pub regions: Vec<WsRegion>,
    pub runs: Vec<WsRun>,
    /// The data runs' pages, in run order.
    pub data: &'a [u8],
}

impl WorkingSet<'_> {
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Each run with its bytes (None for zero runs).
    pub fn runs_with_data(&self) -> impl Iterator<Item = (WsRun, Option<&[u8]>)> + '_ {
        let page = self.page_size as usize;
        let mut at = 0usize;
        self.runs.iter().map(move |run| match run.kind {
            RunKind::Zero => (*run, None),
            RunKind::Data => {
                let len = run.pages as usize * page;
                let bytes = &self.data[at..at + len];
                at += len;
                (*run, Some(bytes))
            }
        })
    }
}

/// Groups pages (memory-file offsets, in first-touch order) into runs: consecutive entries
/// that continue each other in the file and are of the same kind join one run.
pub fn coalesce(pages: &[(u64, RunKind)], page_size: u32) -> Vec<WsRun> {
    let mut runs: Vec<WsRun> = Vec::new();
    for &(offset, kind) in pages {
        if let Some(last) = runs.last_mut() {
            let end = last.file_offset + u64::from(last.pages) * u64::from(page_size);
            if last.kind == kind && end == offset && last.pages < u32::MAX {
                last.pages += 1;
                continue;
            }
        }
        runs.push(WsRun {
            file_offset: offset,
            pages: 1,
            kind,
        });
    }
    runs
}

/// The WS file's bytes. `data` holds the data runs' pages in run order.
pub fn encode(
    identity: SnapshotIdentity,
    page_size: u32,
    regions: &[WsRegion],
    runs: &[WsRun],
    data: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(
        IDENTITY_LEN + COUNTS_LEN + regions.len() * REGION_LEN + runs.len() * RUN_LEN + data.len(),
    );
    p.extend_from_slice(&identity.vmstate_checksum.to_le_bytes());
    p.extend_from_slice(&identity.memory_len.to_le_bytes());
    p.extend_from_slice(&page_size.to_le_bytes());
    p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    p.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        p.extend_from_slice(&r.guest_addr.to_le_bytes());
        p.extend_from_slice(&r.size.to_le_bytes());
        p.extend_from_slice(&r.file_offset.to_le_bytes());
    }
    for r in runs {
        p.extend_from_slice(&r.file_offset.to_le_bytes());
        p.extend_from_slice(&r.pages.to_le_bytes());
        let kind: u32 = match r.kind {
            RunKind::Data => 0,
            RunKind::Zero => 1,
        };
        p.extend_from_slice(&kind.to_le_bytes());
    }
    p.extend_from_slice(data);
    envelope::encode(WS_MAGIC, VERSION, &p)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WsError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(WsError::Malformed(format!("{what} runs past the end")));
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self, what: &str) -> Result<u64, WsError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    fn u32(&mut self, what: &str) -> Result<u32, WsError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
}

/// Checks and decodes a WS file's bytes, and that it belongs to the snapshot `expected` with
/// memory laid out as `layout`.
pub fn decode<'a>(
    bytes: &'a [u8],
    expected: SnapshotIdentity,
    layout: &[WsRegion],
) -> Result<WorkingSet<'a>, WsError> {
    let ws = decode_any(bytes)?;
    if ws.identity != expected {
        return Err(WsError::ForeignSnapshot {
            found: ws.identity.vmstate_checksum,
            found_len: ws.identity.memory_len,
            expected: expected.vmstate_checksum,
            expected_len: expected.memory_len,
        });
    }
    if ws.regions != layout {
        return Err(WsError::LayoutMismatch);
    }
    Ok(ws)
}

/// Checks and decodes a WS file's bytes, whichever snapshot it belongs to (for tools that
/// read recordings, such as the replay trace export).
pub fn decode_any(bytes: &[u8]) -> Result<WorkingSet<'_>, WsError> {
    let payload = envelope::decode(WS_MAGIC, VERSION, bytes)?;
    let mut c = Cursor {
        bytes: payload,
        at: 0,
    };
    let identity = SnapshotIdentity {
        vmstate_checksum: c.u64("identity")?,
        memory_len: c.u64("identity")?,
    };
    let page_size = c.u32("page size")?;
    if page_size as usize != PAGE_SIZE {
        return Err(WsError::Malformed(format!(
            "page size {page_size} (reapvm works in {PAGE_SIZE}-byte pages)"
        )));
    }
    let region_count = c.u32("region count")? as usize;
    let run_count = c.u32("run count")? as usize;
    c.u32("reserved")?;
    let mut regions = Vec::with_capacity(region_count.min(64));
    for _ in 0..region_count {
        regions.push(WsRegion {
            guest_addr: c.u64("region")?,
            size: c.u64("region")?,
            file_offset: c.u64("region")?,
        });
    }
    let mut runs = Vec::with_capacity(run_count.min(payload.len() / RUN_LEN));
    let mut data_pages = 0u64;
    for i in 0..run_count {
        let file_offset = c.u64("run")?;
        let pages = c.u32("run")?;
        let kind = match c.u32("run")? {
            0 => RunKind::Data,
            1 => RunKind::Zero,
            other => return Err(WsError::Malformed(format!("run {i} has kind {other}"))),
        };
        let run = WsRun {
            file_offset,
            pages,
            kind,
        };
        if !super::run_inside(&run, &regions) {
            return Err(WsError::Malformed(format!(
                "run {i} ({pages} pages at {file_offset:#x}) is not whole pages of one region"
            )));
        }
        if kind == RunKind::Data {
            data_pages += u64::from(pages);
        }
        runs.push(run);
    }
    let data_len = data_pages.checked_mul(u64::from(page_size));
    let rest = (payload.len() - c.at) as u64;
    if data_len != Some(rest) {
        return Err(WsError::Malformed(format!(
            "{rest} bytes of page data for {data_pages} data pages"
        )));
    }
    Ok(WorkingSet {
        identity,
        page_size,
        regions,
        runs,
        data: &payload[c.at..],
    })
}

#[cfg(test)]
mod tests {
    use super::super::max_file_len;
    use super::*;
    use crate::envelope::EnvelopeError;

    const ID: SnapshotIdentity = SnapshotIdentity {
        vmstate_checksum: 0xabcd,
        memory_len: 64 * 4096,
    };
    const LAYOUT: [WsRegion; 2] = [
        WsRegion {
            guest_addr: 0,
            size: 32 * 4096,
            file_offset: 0,
        },
        WsRegion {
            guest_addr: 0x1_0000_0000,
            size: 32 * 4096,
            file_offset: 32 * 4096,
        },
    ];

    fn sample() -> Vec<u8> {
        let touched = [
            (5 * 4096, RunKind::Data),
            (6 * 4096, RunKind::Data),
            (7 * 4096, RunKind::Zero),
            (40 * 4096, RunKind::Data),
            (2 * 4096, RunKind::Data),
        ];
        let runs = coalesce(&touched, 4096);
        let mut data = Vec::new();
        for (i, (_, kind)) in touched.iter().enumerate() {
            if *kind == RunKind::Data {
                data.extend(std::iter::repeat_n(i as u8 + 1, 4096));
            }
        }
        encode(ID, 4096, &LAYOUT, &runs, &data)
    }

    #[test]
    fn coalesces_in_touch_order_and_round_trips() {
        let bytes = sample();
        let ws = decode(&bytes, ID, &LAYOUT).unwrap();
        let runs: Vec<_> = ws
            .runs
            .iter()
            .map(|r| (r.file_offset / 4096, r.pages, r.kind))
            .collect();
        assert_eq!(
            runs,
            vec![
                (5, 2, RunKind::Data),
                (7, 1, RunKind::Zero),
                (40, 1, RunKind::Data),
                (2, 1, RunKind::Data)
            ]
        );
        assert_eq!(ws.pages(), 5);
        let with: Vec<_> = ws.runs_with_data().collect();
        assert_eq!(with[0].1.unwrap().len(), 2 * 4096);
        assert_eq!(with[0].1.unwrap()[4096], 2);
        assert!(with[1].1.is_none());
        assert_eq!(with[3].1.unwrap()[0], 5);
    }

    #[test]
    fn foreign_damaged_and_inconsistent_files_are_refused() {
        let bytes = sample();
        let other = SnapshotIdentity {
            vmstate_checksum: 0x1234,
            ..ID
        };
        assert!(matches!(
            decode(&bytes, other, &LAYOUT),
            Err(WsError::ForeignSnapshot { .. })
        ));
        assert_eq!(
            decode(&bytes, ID, &LAYOUT[..1]).unwrap_err(),
            WsError::LayoutMismatch
        );
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n / 2] ^= 1;
        assert!(matches!(
            decode(&flipped, ID, &LAYOUT),
            Err(WsError::Envelope(EnvelopeError::Checksum { .. }))
        ));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 100], ID, &LAYOUT),
            Err(WsError::Envelope(_))
        ));
        // A run outside the memory, in an otherwise well-formed file.
        let runs = [WsRun {
            file_offset: 63 * 4096,
            pages: 2,
            kind: RunKind::Zero,
        }];
        let bad = encode(ID, 4096, &LAYOUT, &runs, &[]);
        assert!(matches!(
            decode(&bad, ID, &LAYOUT),
            Err(WsError::Malformed(_))
        ));
        // Data that does not match the runs.
        let runs = [WsRun {
            file_offset: 0,
            pages: 1,
            kind: RunKind::Data,
        }];
        let short = encode(ID, 4096, &LAYOUT, &runs, &[0u8; 100]);
        assert!(matches!(
            decode(&short, ID, &LAYOUT),
            Err(WsError::Malformed(_))
        ));
        // A region whose end overflows, with a run "inside" it past the wrap: refused,
        // without an overflow (a panic in a debug build).
        let wrapping = [WsRegion {
            guest_addr: 0,
            size: u64::MAX,
            file_offset: 4096,
        }];
        let runs = [WsRun {
            file_offset: 8192,
            pages: 1,
            kind: RunKind::Zero,
        }];
        let bad = encode(ID, 4096, &wrapping, &runs, &[]);
        assert!(matches!(decode_any(&bad), Err(WsError::Malformed(_))));
    }

    #[test]
    fn the_largest_possible_ws_fits_the_bound() {
        // Every page of the memory in a run of its own, all with data, in reverse order.
        let memory_len = ID.memory_len;
        let runs: Vec<WsRun> = (0..memory_len / 4096)
            .rev()
            .map(|p| WsRun {
                file_offset: p * 4096,
                pages: 1,
                kind: RunKind::Data,
            })
            .collect();
        let data = vec![7u8; memory_len as usize];
        let bytes = encode(ID, 4096, &LAYOUT, &runs, &data);
        decode(&bytes, ID, &LAYOUT).unwrap();
        assert!(bytes.len() as u64 <= max_file_len(memory_len));
        assert!(max_file_len(memory_len) < 2 * memory_len);
        assert_eq!(max_file_len(u64::MAX), u64::MAX, "saturates");
    }
}
