//! The touch log of a REAP recording: every recorded page (memory-file offset) in the order
//! the invocation first touched it, and whether that first touch was a write. The WS file
//! keeps the pages and their order but not the access kind; the replay trace export reads
//! the kind from here. It sits beside the WS as `WS_PATH.touches`.
//!
//! Inside the envelope (magic `REAPTLOG`, version, length, CRC-64), little-endian:
//!
//! ```text
//! identity:  vmstate_checksum u64 | memory_len u64     (the snapshot recorded)
//! count:     touches u64
//! touches:   file_offset u64, bit 0 set for a write   (x touches; offsets are page-aligned)
//! ```
//!
//! Only the first touch of a page is seen: the recorder serves missing pages, and a page
//! first read and later written faults once, as a read.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::envelope::{self, EnvelopeError};
use crate::ws::SnapshotIdentity;
use crate::PAGE_SIZE;

pub const TOUCH_LOG_MAGIC: &[u8; 8] = b"REAPTLOG";
pub const TOUCH_LOG_VERSION: u32 = 1;
const WRITE_BIT: u64 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TouchLogError {
    #[error("not a usable touch log: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("touch log is malformed: {0}")]
    Malformed(String),
}

/// One recorded page and how the invocation first touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    pub file_offset: u64,
    pub write: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TouchLog {
    pub identity: SnapshotIdentity,
    /// In first-touch order.
    pub touches: Vec<Touch>,
}

/// Where the touch log of the WS at `ws_path` lives.
pub fn path_for(ws_path: &Path) -> PathBuf {
    let mut p = ws_path.as_os_str().to_owned();
    p.push(".touches");
    p.into()
}

impl TouchLog {
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(24 + self.touches.len() * 8);
        p.extend_from_slice(&self.identity.vmstate_checksum.to_le_bytes());
        p.extend_from_slice(&self.identity.memory_len.to_le_bytes());
        p.extend_from_slice(&(self.touches.len() as u64).to_le_bytes());
        for t in &self.touches {
            let word = t.file_offset | if t.write { WRITE_BIT } else { 0 };
            p.extend_from_slice(&word.to_le_bytes());
        }
        envelope::encode(TOUCH_LOG_MAGIC, TOUCH_LOG_VERSION, &p)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, TouchLogError> {
        let payload = envelope::decode(TOUCH_LOG_MAGIC, TOUCH_LOG_VERSION, bytes)?;
        let word = |i: usize| -> Option<u64> {
            let b = payload.get(i * 8..i * 8 + 8)?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        };
        let (Some(vmstate_checksum), Some(memory_len), Some(count)) = (word(0), word(1), word(2))
        else {
            return Err(TouchLogError::Malformed(format!(
                "{} bytes of payload, shorter than its 24-byte header",
                payload.len()
            )));
        };
        let present = (payload.len() - 24) as u64;
        if count.checked_mul(8) != Some(present) {
            return Err(TouchLogError::Malformed(format!(
                "{count} touches declared, {present} bytes of them present"
            )));
        }
        let page_mask = PAGE_SIZE as u64 - 1;
        let mut touches = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let w = word(3 + i).expect("length checked above");
            let file_offset = w & !WRITE_BIT;
            if file_offset & page_mask != 0 || file_offset >= memory_len {
                return Err(TouchLogError::Malformed(format!(
                    "touch {i} at {file_offset:#x} is not a page of the {memory_len}-byte memory file"
                )));
            }
            touches.push(Touch {
                file_offset,
                write: w & WRITE_BIT != 0,
            });
        }
        Ok(Self {
            identity: SnapshotIdentity {
                vmstate_checksum,
                memory_len,
            },
            touches,
        })
    }

    /// The pages (memory-file offsets) whose first touch was a write.
    pub fn first_writes(&self) -> HashSet<u64> {
        self.touches
            .iter()
            .filter(|t| t.write)
            .map(|t| t.file_offset)
            .collect()
    }
}

/// Writes a touch log atomically, as WS files are written.
pub fn write(path: &Path, log: &TouchLog) -> std::io::Result<()> {
    crate::atomic::write_atomic(path, &log.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TouchLog {
        TouchLog {
            identity: SnapshotIdentity {
                vmstate_checksum: 0xfeed,
                memory_len: 64 << 20,
            },
            touches: vec![
                Touch {
                    file_offset: 0x5000,
                    write: false,
                },
                Touch {
                    file_offset: 0x1000,
                    write: true,
                },
                Touch {
                    file_offset: (64 << 20) - 4096,
                    write: true,
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_lists_first_writes() {
        let log = sample();
        let back = TouchLog::decode(&log.encode()).unwrap();
        assert_eq!(back, log);
        let writes = back.first_writes();
        assert_eq!(writes.len(), 2);
        assert!(writes.contains(&0x1000) && !writes.contains(&0x5000));
        assert_eq!(
            path_for(Path::new("/x/memory.ws")),
            Path::new("/x/memory.ws.touches")
        );
    }

    #[test]
    fn refuses_damaged_and_impossible_logs() {
        let bytes = sample().encode();
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            TouchLog::decode(&flipped),
            Err(TouchLogError::Envelope(EnvelopeError::Checksum { .. }))
        ));
        assert!(TouchLog::decode(&bytes[..bytes.len() - 3]).is_err());
        let mut outside = sample();
        outside.touches[0].file_offset = 64 << 20;
        let err = TouchLog::decode(&outside.encode()).unwrap_err();
        assert!(err.to_string().contains("not a page of"), "{err}");
        let mut unaligned = sample();
        unaligned.touches[1].file_offset = 0x1800;
        assert!(TouchLog::decode(&unaligned.encode()).is_err());
        // A count that promises more touches than the payload holds.
        let mut p = Vec::new();
        for w in [1u64, 1 << 20, 5] {
            p.extend_from_slice(&w.to_le_bytes());
        }
        let short = envelope::encode(TOUCH_LOG_MAGIC, TOUCH_LOG_VERSION, &p);
        let err = TouchLog::decode(&short).unwrap_err();
        assert!(err.to_string().contains("5 touches declared"), "{err}");
    }
}
