//! reapvm's snapshot files. Every file starts with a self-describing envelope (magic, format
//! version, payload length) and ends with a CRC-64 of everything before it, so a truncated,
//! corrupted, foreign or newer file is refused with a precise reason before it is used.

pub mod atomic;
pub mod diff;
pub mod envelope;
pub mod memory_file;
pub mod replay_trace;
pub mod touch_log;
pub mod ws;

/// The only page size reapvm's guest memory, snapshots, WS files and traces use.
pub const PAGE_SIZE: usize = 4096;

pub use atomic::{commit_all, write_atomic, PendingFile};
pub use envelope::{decode, encode, EnvelopeError};
