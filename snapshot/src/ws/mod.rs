//! The working-set (WS) file of REAP: the guest pages one invocation touched after a restore,
//! stored so that a later restore can read them in bulk and install them, before the guest
//! runs or while it runs (streamed). Restores read and write version 2 ([`v2`]): chunks in
//! order of first touch, each with its own checksum, so a reader can check and install each
//! as soon as it is read. Version 1 ([`v1`]) is still read by tools.

pub mod v1;
pub mod v2;

use std::path::Path;

use crate::envelope::EnvelopeError;
use crate::PAGE_SIZE;

pub use v2::{build, Chunk, Header};

pub const WS_MAGIC: &[u8; 8] = b"REAPWSET";
/// The version restores read and recordings write.
pub const WS_VERSION: u32 = v2::VERSION;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsError {
    #[error("not a usable WS file: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("wrong magic {found:?}: not a WS file")]
    Magic { found: [u8; 8] },
    #[error("WS format version {found} is not read by restores (this reapvm writes and reads version {supported}; the restore records a new WS)")]
    Version { found: u32, supported: u32 },
    #[error("WS file is malformed: {0}")]
    Malformed(String),
    #[error("the WS header's checksum does not match (stored {stored:#018x}, computed {computed:#018x}): the file is damaged")]
    HeaderChecksum { stored: u64, computed: u64 },
    #[error("chunk {chunk} of the WS has checksum {computed:#018x}, the header says {stored:#018x}: the file is damaged")]
    ChunkChecksum {
        chunk: usize,
        stored: u64,
        computed: u64,
    },
    #[error("the WS file belongs to another snapshot (vmstate checksum {found:#018x}, memory {found_len} bytes; this snapshot: {expected:#018x}, {expected_len} bytes)")]
    ForeignSnapshot {
        found: u64,
        found_len: u64,
        expected: u64,
        expected_len: u64,
    },
    #[error("the WS file's memory layout differs from the snapshot's")]
    LayoutMismatch,
}

/// Which snapshot a WS belongs to: the checksum of its vmstate and the size of its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotIdentity {
    pub vmstate_checksum: u64,
    pub memory_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Data,
    Zero,
}

/// `pages` pages from `file_offset` of the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsRun {
    pub file_offset: u64,
    pub pages: u32,
    pub kind: RunKind,
}

/// The largest WS file a snapshot with `memory_len` bytes of memory file can have, in any
/// version: every page with its data in a run and a chunk of its own, and 64 regions (reapvm
/// lays out two at most). A reader refuses a larger file before it reads (or allocates)
/// anything.
pub fn max_file_len(memory_len: u64) -> u64 {
    let pages = memory_len.div_ceil(PAGE_SIZE as u64);
    let fixed = (v2::FIXED_LEN + 64 * v2::REGION_LEN + v2::CHECKSUM_LEN + PAGE_SIZE) as u64;
    pages
        .saturating_mul((v2::RUN_LEN + v2::CHUNK_LEN) as u64)
        .saturating_add(memory_len)
        .saturating_add(fixed)
}

/// What a tool reads from a WS file of any version, fully checked: the snapshot it belongs
/// to, its layout and its runs in file order: first-touch order for version 1; for version
/// 2, chunk after chunk in first-touch order, by address within a chunk, with the gap pages
/// a chunk stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSummary {
    pub version: u32,
    pub identity: SnapshotIdentity,
    pub regions: Vec<WsRegion>,
    pub runs: Vec<WsRun>,
}

impl WsSummary {
    /// Every page (memory-file offset) in file order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|r| {
            (0..u64::from(r.pages)).map(move |i| r.file_offset + i * PAGE_SIZE as u64)
        })
    }
}

pub fn summarize(bytes: &[u8]) -> Result<WsSummary, WsError> {
    let version = v2::version_of(bytes)?;
    let (identity, regions, runs) = match version {
        v1::VERSION => {
            let ws = v1::decode_any(bytes)?;
            (ws.identity, ws.regions, ws.runs)
        }
        _ => {
            let header = Header::decode(bytes)?;
            header.check_file(bytes)?;
            (header.identity, header.regions, header.runs)
        }
    };
    Ok(WsSummary {
        version,
        identity,
        regions,
        runs,
    })
}

/// Writes a WS file atomically (temporary file, fsync, rename): readers see a complete file
/// or none, whoever else records at the same time.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::atomic::write_atomic(path, bytes)
}

/// Whether `run` lies in one region of `regions` (whole pages, no overflow).
fn run_inside(run: &WsRun, regions: &[WsRegion]) -> bool {
    let len = u64::from(run.pages) * PAGE_SIZE as u64;
    run.pages > 0
        && run.file_offset % PAGE_SIZE as u64 == 0
        && regions.iter().any(|r| {
            let region_end = r.file_offset.checked_add(r.size);
            run.file_offset >= r.file_offset
                && run
                    .file_offset
                    .checked_add(len)
                    .zip(region_end)
                    .is_some_and(|(end, region_end)| end <= region_end)
        })
}
