//! WS format version 2: a header that maps every page, then the pages' data in chunks.
//!
//! The WS's pages are cut, in order of first touch, into chunks (the first small, each next
//! one twice as large up to a cap), so a streaming restore can resume the guest once the first
//! chunk is in and install the rest as it is read. Within a chunk the pages are sorted by
//! address, and touched pages with at most [`MAX_GAP_PAGES`] untouched pages between them are
//! joined into one run with those pages (stored from the memory file as the snapshot has them):
//! one install call for the lot instead of one per page. Every chunk has its own checksum
//! (XXH3-64), checked as the chunk is read; the header has its own.
//!
//! Little-endian; the header is padded with zeroes to whole pages, so that every chunk starts
//! page-aligned in the file (O_DIRECT reads, page-aligned copies):
//!
//! ```text
//! prefix:    magic "REAPWSET" | version u32 (2) | header_len u32 (bytes, with padding)
//! identity:  vmstate_checksum u64 | memory_len u64     (the snapshot the WS belongs to)
//! counts:    page_size u32 | regions u32 | chunks u32 | runs u32
//! regions:   guest_addr u64 | size u64 | file_offset u64               (x regions)
//! chunks:    runs u32 | data_pages u32 | checksum u64 (XXH3-64 of its data) (x chunks)
//! runs:      file_offset u64 | pages u32 | kind u32 (0 data, 1 zero)   (x runs, chunk by chunk)
//! header checksum: XXH3-64 of every header byte before it
//! padding to header_len
//! data:      each chunk's data pages (its data runs' pages in run order), chunk after chunk
//! ```

use std::collections::HashSet;
use std::ops::Range;

use xxhash_rust::xxh3::xxh3_64;

use super::{run_inside, RunKind, SnapshotIdentity, WsError, WsRegion, WsRun, WS_MAGIC};
use crate::PAGE_SIZE;

pub const VERSION: u32 = 2;

pub(super) const PREFIX_LEN: usize = 16;
pub(super) const FIXED_LEN: usize = PREFIX_LEN + 16 + 16;
pub(super) const REGION_LEN: usize = 24;
pub(super) const CHUNK_LEN: usize = 16;
pub(super) const RUN_LEN: usize = 16;
pub(super) const CHECKSUM_LEN: usize = 8;
/// More regions than any reapvm layout has (two): a header claiming more is refused.
const MAX_REGIONS: usize = 64;

/// Touched pages in the first chunk: small, so that a streaming restore waits little before
/// the guest resumes.
pub const FIRST_CHUNK_PAGES: usize = 64;
/// The largest chunk, in touched pages (4 MiB of them; with the gap pages it joins, a chunk
/// can store up to four times that): later chunks double up to it.
pub const MAX_CHUNK_PAGES: usize = 1024;
/// Untouched pages between two touched pages of a chunk that are stored to make one run of
/// both: copying a few pages costs less than another install call.
pub const MAX_GAP_PAGES: u64 = 3;
/// All-zero pages inside a run are stored as data unless there are at least this many in a
/// row (a zero run is one more install call).
pub const MIN_ZERO_RUN: u32 = 4;

const PAGE: u64 = PAGE_SIZE as u64;

/// One chunk: its runs (indexes into [`Header::runs`]) and where its data is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub runs: Range<usize>,
    /// Offset of the chunk's first data byte in the file (page-aligned).
    pub data_offset: u64,
    pub data_pages: u32,
    pub checksum: u64,
}

impl Chunk {
    pub fn data_len(&self) -> usize {
        self.data_pages as usize * PAGE_SIZE
    }
}

/// A decoded and checked header: the whole map of the WS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub identity: SnapshotIdentity,
    pub regions: Vec<WsRegion>,
    /// Every run, chunk after chunk.
    pub runs: Vec<WsRun>,
    pub chunks: Vec<Chunk>,
    /// Bytes before the first chunk's data (a whole number of pages).
    pub header_len: u64,
}

/// A WS file's format version, from its first bytes (the magic checked).
pub fn version_of(bytes: &[u8]) -> Result<u32, WsError> {
    if bytes.len() < 12 {
        return Err(WsError::Malformed(format!(
            "{} bytes: too short for a WS file",
            bytes.len()
        )));
    }
    let found: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
    if &found != WS_MAGIC {
        return Err(WsError::Magic { found });
    }
    Ok(u32::from_le_bytes(
        bytes[8..12].try_into().expect("4 bytes"),
    ))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn u32(&mut self) -> u32 {
        let v = u32::from_le_bytes(self.bytes[self.at..self.at + 4].try_into().expect("4"));
        self.at += 4;
        v
    }

    fn u64(&mut self) -> u64 {
        let v = u64::from_le_bytes(self.bytes[self.at..self.at + 8].try_into().expect("8"));
        self.at += 8;
        v
    }
}

impl Header {
    /// The header's length as the file's first [`PREFIX_LEN`] bytes declare it (magic and
    /// version checked): how much a reader reads before [`Header::decode`].
    pub fn declared_len(prefix: &[u8]) -> Result<u64, WsError> {
        let version = version_of(prefix)?;
        if version != VERSION {
            return Err(WsError::Version {
                found: version,
                supported: VERSION,
            });
        }
        if prefix.len() < PREFIX_LEN {
            return Err(WsError::Malformed(
                "the header's prefix is cut short".into(),
            ));
        }
        let len = u64::from(u32::from_le_bytes(
            prefix[12..16].try_into().expect("4 bytes"),
        ));
        if len < FIXED_LEN as u64 || len % PAGE != 0 {
            return Err(WsError::Malformed(format!(
                "header length {len} is not a whole number of pages"
            )));
        }
        Ok(len)
    }

    /// Decodes and checks the header at the start of `bytes` (at least its declared length):
    /// its checksum, and that its runs are whole pages inside its regions, that no two runs
    /// overlap, and that each chunk's data matches its runs.
    pub fn decode(bytes: &[u8]) -> Result<Self, WsError> {
        let header_len = Self::declared_len(bytes)?;
        if (bytes.len() as u64) < header_len {
            return Err(WsError::Malformed(format!(
                "the header is {header_len} bytes, {} present",
                bytes.len()
            )));
        }
        let header = &bytes[..header_len as usize];
        let mut c = Cursor {
            bytes: header,
            at: PREFIX_LEN,
        };
        let identity = SnapshotIdentity {
            vmstate_checksum: c.u64(),
            memory_len: c.u64(),
        };
        let page_size = c.u32();
        if page_size as usize != PAGE_SIZE {
            return Err(WsError::Malformed(format!(
                "page size {page_size} (reapvm works in {PAGE_SIZE}-byte pages)"
            )));
        }
        let (region_count, chunk_count, run_count) =
            (c.u32() as usize, c.u32() as usize, c.u32() as usize);
        if region_count > MAX_REGIONS {
            return Err(WsError::Malformed(format!("{region_count} regions")));
        }
        let need = (region_count * REGION_LEN)
            .checked_add(chunk_count.saturating_mul(CHUNK_LEN))
            .and_then(|n| n.checked_add(run_count.checked_mul(RUN_LEN)?))
            .and_then(|n| n.checked_add(FIXED_LEN + CHECKSUM_LEN))
            .filter(|&n| n <= header.len());
        let Some(need) = need else {
            return Err(WsError::Malformed(format!(
                "{region_count} regions, {chunk_count} chunks and {run_count} runs do not fit a {header_len}-byte header"
            )));
        };
        let body_end = need - CHECKSUM_LEN;
        let stored = u64::from_le_bytes(header[body_end..need].try_into().expect("8 bytes"));
        let computed = xxh3_64(&header[..body_end]);
        if stored != computed {
            return Err(WsError::HeaderChecksum { stored, computed });
        }
        let regions: Vec<WsRegion> = (0..region_count)
            .map(|_| WsRegion {
                guest_addr: c.u64(),
                size: c.u64(),
                file_offset: c.u64(),
            })
            .collect();
        // Inside the memory file: this bounds every run, and so the pages a WS can name.
        if let Some(r) = regions.iter().find(|r| {
            r.file_offset
                .checked_add(r.size)
                .is_none_or(|end| end > identity.memory_len)
        }) {
            return Err(WsError::Malformed(format!(
                "region at file offset {:#x} ({} bytes) ends past the {}-byte memory file",
                r.file_offset, r.size, identity.memory_len
            )));
        }
        let chunk_fields: Vec<(u32, u32, u64)> = (0..chunk_count)
            .map(|_| (c.u32(), c.u32(), c.u64()))
            .collect();
        let mut runs = Vec::with_capacity(run_count);
        for i in 0..run_count {
            let file_offset = c.u64();
            let pages = c.u32();
            let kind = match c.u32() {
                0 => RunKind::Data,
                1 => RunKind::Zero,
                other => return Err(WsError::Malformed(format!("run {i} has kind {other}"))),
            };
            let run = WsRun {
                file_offset,
                pages,
                kind,
            };
            if !run_inside(&run, &regions) {
                return Err(WsError::Malformed(format!(
                    "run {i} ({pages} pages at {file_offset:#x}) is not whole pages of one region"
                )));
            }
            runs.push(run);
        }
        let mut chunks = Vec::with_capacity(chunk_count);
        let (mut next_run, mut data_offset) = (0usize, header_len);
        for (i, (chunk_runs, data_pages, checksum)) in chunk_fields.into_iter().enumerate() {
            let end = next_run
                .checked_add(chunk_runs as usize)
                .filter(|&e| e <= runs.len())
                .ok_or_else(|| {
                    WsError::Malformed(format!("chunk {i} has runs past the run table"))
                })?;
            let counted: u64 = runs[next_run..end]
                .iter()
                .filter(|r| r.kind == RunKind::Data)
                .map(|r| u64::from(r.pages))
                .sum();
            if counted != u64::from(data_pages) {
                return Err(WsError::Malformed(format!(
                    "chunk {i} says {data_pages} data pages, its runs have {counted}"
                )));
            }
            chunks.push(Chunk {
                runs: next_run..end,
                data_offset,
                data_pages,
                checksum,
            });
            next_run = end;
            data_offset = data_offset
                .checked_add(u64::from(data_pages) * PAGE)
                .ok_or_else(|| WsError::Malformed(format!("chunk {i}'s data ends past 2^64")))?;
        }
        if next_run != runs.len() {
            return Err(WsError::Malformed(format!(
                "{} runs belong to no chunk",
                runs.len() - next_run
            )));
        }
        let mut by_offset: Vec<&WsRun> = runs.iter().collect();
        by_offset.sort_by_key(|r| r.file_offset);
        for pair in by_offset.windows(2) {
            if pair[0].file_offset + u64::from(pair[0].pages) * PAGE > pair[1].file_offset {
                return Err(WsError::Malformed(format!(
                    "runs at {:#x} and {:#x} overlap",
                    pair[0].file_offset, pair[1].file_offset
                )));
            }
        }
        Ok(Self {
            identity,
            regions,
            runs,
            chunks,
            header_len,
        })
    }

    /// Checks that this WS belongs to the snapshot `expected` with memory laid out as
    /// `layout`.
    pub fn check_snapshot(
        &self,
        expected: SnapshotIdentity,
        layout: &[WsRegion],
    ) -> Result<(), WsError> {
        if self.identity != expected {
            return Err(WsError::ForeignSnapshot {
                found: self.identity.vmstate_checksum,
                found_len: self.identity.memory_len,
                expected: expected.vmstate_checksum,
                expected_len: expected.memory_len,
            });
        }
        if self.regions != layout {
            return Err(WsError::LayoutMismatch);
        }
        Ok(())
    }

    /// The length the whole file must have (decode checked that it fits in a u64).
    pub fn file_len(&self) -> u64 {
        self.header_len + self.data_pages() * PAGE
    }

    pub fn data_pages(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.data_pages)).sum()
    }

    /// Every page the WS installs (gap pages included).
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Checks chunk `index`'s data against its checksum.
    pub fn check_chunk(&self, index: usize, data: &[u8]) -> Result<(), WsError> {
        let chunk = &self.chunks[index];
        if data.len() != chunk.data_len() {
            return Err(WsError::Malformed(format!(
                "chunk {index} has {} bytes of data, {} expected",
                data.len(),
                chunk.data_len()
            )));
        }
        let computed = xxh3_64(data);
        if computed != chunk.checksum {
            return Err(WsError::ChunkChecksum {
                chunk: index,
                stored: chunk.checksum,
                computed,
            });
        }
        Ok(())
    }

    /// The runs of chunk `index`, each with where its data starts in the chunk's data (None
    /// for zero runs).
    pub fn chunk_runs(&self, index: usize) -> impl Iterator<Item = (WsRun, Option<usize>)> + '_ {
        let mut at = 0usize;
        self.runs[self.chunks[index].runs.clone()]
            .iter()
            .map(move |run| match run.kind {
                RunKind::Zero => (*run, None),
                RunKind::Data => {
                    let start = at;
                    at += run.pages as usize * PAGE_SIZE;
                    (*run, Some(start))
                }
            })
    }

    /// Checks a whole file held in memory: its length and every chunk.
    pub fn check_file(&self, bytes: &[u8]) -> Result<(), WsError> {
        if bytes.len() as u64 != self.file_len() {
            return Err(WsError::Malformed(format!(
                "the file is {} bytes, its header says {}",
                bytes.len(),
                self.file_len()
            )));
        }
        for (i, chunk) in self.chunks.iter().enumerate() {
            let start = chunk.data_offset as usize;
            self.check_chunk(i, &bytes[start..start + chunk.data_len()])?;
        }
        Ok(())
    }
}

/// Builds a WS file from the pages a recording touched (memory-file offsets, in order of
/// first touch), reading each page's content (as the snapshot has it) with `read_page`.
/// Returns the file's bytes.
pub fn build<E>(
    identity: SnapshotIdentity,
    layout: &[WsRegion],
    touched: &[u64],
    mut read_page: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let mut seen = HashSet::with_capacity(touched.len());
    let touched: Vec<u64> = touched
        .iter()
        .copied()
        .filter(|&p| seen.insert(p))
        .collect();
    let mut chunks: Vec<(Vec<WsRun>, Vec<u8>)> = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for pages in chunk_pages(&touched) {
        let (mut runs, mut data) = (Vec::new(), Vec::new());
        for (start, count) in spans(pages, &seen, layout) {
            // Each page's kind, then runs: zero stretches of MIN_ZERO_RUN or more apart.
            let mut kinds = Vec::with_capacity(count as usize);
            let mut span_data = Vec::with_capacity(count as usize * PAGE_SIZE);
            for i in 0..u64::from(count) {
                read_page(start + i * PAGE, &mut page)?;
                let zero = page.iter().all(|&b| b == 0);
                kinds.push(zero);
                span_data.extend_from_slice(&page);
            }
            for (first, n, kind) in split_zero_runs(&kinds) {
                runs.push(WsRun {
                    file_offset: start + first as u64 * PAGE,
                    pages: n,
                    kind,
                });
                if kind == RunKind::Data {
                    let from = first * PAGE_SIZE;
                    data.extend_from_slice(&span_data[from..from + n as usize * PAGE_SIZE]);
                }
            }
        }
        chunks.push((runs, data));
    }
    Ok(encode(identity, layout, &chunks))
}

/// The touched pages cut into chunks: FIRST_CHUNK_PAGES, then twice as many each time, up to
/// MAX_CHUNK_PAGES.
fn chunk_pages(touched: &[u64]) -> Vec<&[u64]> {
    let mut out = Vec::new();
    let (mut rest, mut size) = (touched, FIRST_CHUNK_PAGES);
    while !rest.is_empty() {
        let (head, tail) = rest.split_at(size.min(rest.len()));
        out.push(head);
        rest = tail;
        size = (size * 2).min(MAX_CHUNK_PAGES);
    }
    out
}

/// A chunk's pages sorted by address and joined into spans (start, pages): touched pages at
/// most MAX_GAP_PAGES apart in one region join, with the pages between them, unless one of
/// those belongs to the WS (it is in another chunk: a page is stored once).
fn spans(pages: &[u64], in_ws: &HashSet<u64>, layout: &[WsRegion]) -> Vec<(u64, u32)> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    let region_of = |p: u64| {
        layout
            .iter()
            .position(|r| p >= r.file_offset && p - r.file_offset < r.size)
    };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut last_region = None;
    for p in sorted {
        let region = region_of(p);
        if let Some((start, count)) = out.last_mut() {
            let end = *start + u64::from(*count) * PAGE;
            let joinable = region == last_region
                && p >= end
                && (p - end) / PAGE <= MAX_GAP_PAGES
                && (end..p).step_by(PAGE_SIZE).all(|g| !in_ws.contains(&g))
                && *count < u32::MAX - MAX_GAP_PAGES as u32;
            if joinable {
                *count = ((p - *start) / PAGE) as u32 + 1;
                continue;
            }
        }
        out.push((p, 1));
        last_region = region;
    }
    out
}

/// Splits a span's pages (true: all zero) into runs (first page, pages, kind): zero stretches
/// of at least MIN_ZERO_RUN pages are zero runs, the rest is data.
fn split_zero_runs(zero: &[bool]) -> Vec<(usize, u32, RunKind)> {
    let mut out: Vec<(usize, u32, RunKind)> = Vec::new();
    let mut i = 0;
    while i < zero.len() {
        let stretch = zero[i..].iter().take_while(|&&z| z).count();
        let kind = if stretch >= MIN_ZERO_RUN as usize {
            RunKind::Zero
        } else {
            RunKind::Data
        };
        let n = match kind {
            RunKind::Zero => stretch,
            // Data up to the next zero stretch long enough to stand alone.
            RunKind::Data => {
                let mut j = i;
                while j < zero.len() {
                    let z = zero[j..].iter().take_while(|&&z| z).count();
                    if z >= MIN_ZERO_RUN as usize {
                        break;
                    }
                    j += z.max(1);
                }
                j - i
            }
        };
        out.push((i, n as u32, kind));
        i += n;
    }
    out
}

/// The file for `chunks` (each: its runs and its data runs' pages in run order).
pub fn encode(
    identity: SnapshotIdentity,
    layout: &[WsRegion],
    chunks: &[(Vec<WsRun>, Vec<u8>)],
) -> Vec<u8> {
    let run_count: usize = chunks.iter().map(|(r, _)| r.len()).sum();
    let need = FIXED_LEN
        + layout.len() * REGION_LEN
        + chunks.len() * CHUNK_LEN
        + run_count * RUN_LEN
        + CHECKSUM_LEN;
    let header_len = need.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let data_len: usize = chunks.iter().map(|(_, d)| d.len()).sum();
    let mut out = Vec::with_capacity(header_len + data_len);
    out.extend_from_slice(WS_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header_len as u32).to_le_bytes());
    out.extend_from_slice(&identity.vmstate_checksum.to_le_bytes());
    out.extend_from_slice(&identity.memory_len.to_le_bytes());
    out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(layout.len() as u32).to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    out.extend_from_slice(&(run_count as u32).to_le_bytes());
    for r in layout {
        out.extend_from_slice(&r.guest_addr.to_le_bytes());
        out.extend_from_slice(&r.size.to_le_bytes());
        out.extend_from_slice(&r.file_offset.to_le_bytes());
    }
    for (runs, data) in chunks {
        out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        out.extend_from_slice(&((data.len() / PAGE_SIZE) as u32).to_le_bytes());
        out.extend_from_slice(&xxh3_64(data).to_le_bytes());
    }
    for (runs, _) in chunks {
        for r in runs {
            out.extend_from_slice(&r.file_offset.to_le_bytes());
            out.extend_from_slice(&r.pages.to_le_bytes());
            let kind: u32 = match r.kind {
                RunKind::Data => 0,
                RunKind::Zero => 1,
            };
            out.extend_from_slice(&kind.to_le_bytes());
        }
    }
    let checksum = xxh3_64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out.resize(header_len, 0);
    for (_, data) in chunks {
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: SnapshotIdentity = SnapshotIdentity {
        vmstate_checksum: 0xabcd,
        memory_len: 4096 * 4096,
    };
    const LAYOUT: [WsRegion; 2] = [
        WsRegion {
            guest_addr: 0,
            size: 2048 * 4096,
            file_offset: 0,
        },
        WsRegion {
            guest_addr: 0x1_0000_0000,
            size: 2048 * 4096,
            file_offset: 2048 * 4096,
        },
    ];

    /// A memory file whose page N holds N+1 (as u32) in its first bytes, and zeroes in pages
    /// that are multiples of 100.
    fn read_page(offset: u64, page: &mut [u8]) -> Result<(), String> {
        page.fill(0);
        let n = offset / PAGE;
        if n % 100 != 0 {
            page[..4].copy_from_slice(&(n as u32 + 1).to_le_bytes());
        }
        Ok(())
    }

    fn file(touched_pages: &[u64]) -> Vec<u8> {
        let touched: Vec<u64> = touched_pages.iter().map(|p| p * PAGE).collect();
        build(ID, &LAYOUT, &touched, read_page).unwrap()
    }

    /// Every page the file installs, with the content it installs (None for zero runs).
    fn installed(bytes: &[u8]) -> Vec<(u64, Option<u32>)> {
        let h = Header::decode(bytes).unwrap();
        h.check_file(bytes).unwrap();
        let mut out = Vec::new();
        for (i, chunk) in h.chunks.iter().enumerate() {
            let data = &bytes[chunk.data_offset as usize..][..chunk.data_len()];
            for (run, at) in h.chunk_runs(i) {
                for p in 0..u64::from(run.pages) {
                    let content = at.map(|a| {
                        let at = a + p as usize * PAGE_SIZE;
                        u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
                    });
                    out.push((run.file_offset / PAGE + p, content));
                }
            }
        }
        out
    }

    #[test]
    fn chunks_follow_first_touch_and_sort_and_join_within() {
        // 64 pages for the first chunk, given in reverse order, 10 apart with one gap of 2.
        let mut first: Vec<u64> = (0..63).map(|i| 1000 - i * 10).collect();
        first.push(1002);
        let second = [5u64, 3, 2050, 9];
        let touched: Vec<u64> = first.iter().chain(second.iter()).copied().collect();
        let bytes = file(&touched);
        let h = Header::decode(&bytes).unwrap();
        assert_eq!(h.header_len % PAGE, 0);
        assert_eq!(h.chunks.len(), 2);
        assert_eq!(h.chunks[0].data_offset, h.header_len);
        // The first chunk by address: 380, 390, ... 1000, 1002: 1000 and 1002 join (gap 1).
        let runs0: Vec<(u64, u32)> = h.runs[h.chunks[0].runs.clone()]
            .iter()
            .map(|r| (r.file_offset / PAGE, r.pages))
            .collect();
        assert_eq!(runs0.first(), Some(&(380, 1)));
        assert_eq!(runs0.last(), Some(&(1000, 3)));
        // The second: 3 and 5 join with 4 between; 9 joins them too (gap of 3); 2050 is in
        // the other region.
        let runs1: Vec<(u64, u32)> = h.runs[h.chunks[1].runs.clone()]
            .iter()
            .map(|r| (r.file_offset / PAGE, r.pages))
            .collect();
        assert_eq!(runs1, vec![(3, 7), (2050, 1)]);
        // What is installed is each page's own content, gap pages included.
        for (page, content) in installed(&bytes) {
            let expected = if page % 100 == 0 { 0 } else { page as u32 + 1 };
            assert_eq!(content.unwrap_or(0), expected, "page {page}");
        }
        assert_eq!(h.pages(), 65 + 8);
    }

    #[test]
    fn a_gap_page_of_another_chunk_is_not_stored_twice() {
        // 60 is in the first chunk; 59 and 61 (second chunk) must not join across it.
        let mut touched: Vec<u64> = (0..63).map(|i| 200 + i * 10).collect();
        touched.insert(0, 60);
        touched.extend([59, 61]);
        let bytes = file(&touched);
        let pages: Vec<u64> = installed(&bytes).iter().map(|p| p.0).collect();
        assert_eq!(pages.iter().filter(|&&p| p == 60).count(), 1);
        assert!(pages.contains(&59) && pages.contains(&61));
    }

    #[test]
    fn long_zero_stretches_are_zero_runs_short_ones_data() {
        assert_eq!(
            split_zero_runs(&[false, true, true, false, true, true, true, true, false]),
            vec![
                (0, 4, RunKind::Data),
                (4, 4, RunKind::Zero),
                (8, 1, RunKind::Data)
            ]
        );
        assert_eq!(split_zero_runs(&[true]), vec![(0, 1, RunKind::Data)]);
        assert_eq!(split_zero_runs(&[]), vec![]);
    }

    #[test]
    fn chunk_sizes_double_up_to_the_cap() {
        let touched: Vec<u64> = (0..5000).collect();
        let sizes: Vec<usize> = chunk_pages(&touched).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![64, 128, 256, 512, 1024, 1024, 1024, 968]);
    }

    #[test]
    fn damaged_foreign_and_inconsistent_files_are_refused() {
        let touched: Vec<u64> = (1..300).map(|p| p * 7).collect();
        let bytes = file(&touched);
        let h = Header::decode(&bytes).unwrap();
        assert!(matches!(
            h.check_snapshot(
                SnapshotIdentity {
                    vmstate_checksum: 1,
                    ..ID
                },
                &LAYOUT
            ),
            Err(WsError::ForeignSnapshot { .. })
        ));
        assert_eq!(
            h.check_snapshot(ID, &LAYOUT[..1]),
            Err(WsError::LayoutMismatch)
        );
        // A flipped byte in the header, in a chunk, a cut file.
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(matches!(
            Header::decode(&bad),
            Err(WsError::HeaderChecksum { .. })
        ));
        let mut bad = bytes.clone();
        let last = h.chunks.len() - 1;
        bad[h.chunks[last].data_offset as usize + 5] ^= 1;
        assert!(matches!(
            h.check_file(&bad),
            Err(WsError::ChunkChecksum { chunk, .. }) if chunk == last
        ));
        assert!(matches!(
            h.check_file(&bytes[..bytes.len() - 4096]),
            Err(WsError::Malformed(_))
        ));
        assert!(Header::decode(&bytes[..100]).is_err());
        // Version 1, and not a WS at all.
        let mut v1 = bytes.clone();
        v1[8] = 1;
        assert_eq!(
            Header::decode(&v1),
            Err(WsError::Version {
                found: 1,
                supported: 2
            })
        );
        assert!(matches!(
            Header::decode(b"REAPTLOG\x02\0\0\0\0\x10\0\0"),
            Err(WsError::Magic { .. })
        ));
        // Overlapping runs and runs outside memory, in otherwise well-formed files.
        let run = |page: u64, pages: u32| WsRun {
            file_offset: page * PAGE,
            pages,
            kind: RunKind::Zero,
        };
        let overlap = encode(ID, &LAYOUT, &[(vec![run(10, 4), run(12, 1)], vec![])]);
        assert!(
            matches!(Header::decode(&overlap), Err(WsError::Malformed(m)) if m.contains("overlap"))
        );
        let outside = encode(ID, &LAYOUT, &[(vec![run(4095, 2)], vec![])]);
        assert!(matches!(
            Header::decode(&outside),
            Err(WsError::Malformed(_))
        ));
        // A chunk whose data pages disagree with its runs.
        let data_run = WsRun {
            kind: RunKind::Data,
            ..run(3, 1)
        };
        let wrong = encode(ID, &LAYOUT, &[(vec![data_run], vec![0u8; 2 * PAGE_SIZE])]);
        assert!(matches!(Header::decode(&wrong), Err(WsError::Malformed(_))));
    }

    #[test]
    fn the_largest_possible_ws_fits_the_bound() {
        // Every page touched, in reverse order, each with data.
        let memory_len = ID.memory_len;
        let touched: Vec<u64> = (0..memory_len / PAGE).rev().map(|p| p * PAGE).collect();
        let bytes = build(ID, &LAYOUT, &touched, |_, page: &mut [u8]| {
            page.fill(9);
            Ok::<_, ()>(())
        })
        .unwrap();
        Header::decode(&bytes).unwrap().check_file(&bytes).unwrap();
        assert!(bytes.len() as u64 <= super::super::max_file_len(memory_len));
    }
}
