//! The envelope: `magic[8] | version u32 LE | payload_len u64 LE | payload | crc64 u64 LE`.

use crc::{Crc, Table, CRC_64_XZ};

// Slice-by-16 tables: working-set files are tens of MB and are checked on the restore path.
const CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);
const HEADER_LEN: usize = 8 + 4 + 8;
const TRAILER_LEN: usize = 8;
/// Bytes an envelope adds to its payload.
pub const OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("file is {len} bytes, shorter than the {min}-byte envelope")]
    TooShort { len: usize, min: usize },
    #[error("wrong magic {found:?}: not a {expected} file")]
    Magic { found: [u8; 8], expected: String },
    #[error("format version {found} is not supported (this reapvm reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error(
        "payload length {declared} does not match the file ({actual} bytes of payload present)"
    )]
    Length { declared: u64, actual: u64 },
    #[error(
        "checksum mismatch: stored {stored:#018x}, computed {computed:#018x} (file corrupted)"
    )]
    Checksum { stored: u64, computed: u64 },
}

/// Wraps `payload` in the envelope.
pub fn encode(magic: &[u8; 8], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The checksum stored in the last 8 bytes of an envelope (valid once `decode` accepted it):
/// it identifies the file's content.
pub fn stored_checksum(bytes: &[u8]) -> Option<u64> {
    let tail = bytes.get(bytes.len().checked_sub(TRAILER_LEN)?..)?;
    Some(u64::from_le_bytes(tail.try_into().ok()?))
}

/// Checks the envelope of `bytes` and returns its payload.
pub fn decode<'a>(
    magic: &[u8; 8],
    version: u32,
    bytes: &'a [u8],
) -> Result<&'a [u8], EnvelopeError> {
    let min = HEADER_LEN + TRAILER_LEN;
    if bytes.len() < min {
        return Err(EnvelopeError::TooShort {
            len: bytes.len(),
            min,
        });
    }
    let found: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
    if &found != magic {
        return Err(EnvelopeError::Magic {
            found,
            expected: String::from_utf8_lossy(magic).into_owned(),
        });
    }
    let found_version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if found_version != version {
        return Err(EnvelopeError::Version {
            found: found_version,
            supported: version,
        });
    }
    let declared = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let actual = (bytes.len() - min) as u64;
    if declared != actual {
        return Err(EnvelopeError::Length { declared, actual });
    }
    let body_end = bytes.len() - TRAILER_LEN;
    let stored = u64::from_le_bytes(bytes[body_end..].try_into().expect("8 bytes"));
    let computed = CRC64.checksum(&bytes[..body_end]);
    if stored != computed {
        return Err(EnvelopeError::Checksum { stored, computed });
    }
    Ok(&bytes[HEADER_LEN..body_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"REAPTEST";

    #[test]
    fn round_trip() {
        let bytes = encode(MAGIC, 3, b"state");
        assert_eq!(decode(MAGIC, 3, &bytes).unwrap(), b"state");
        assert_eq!(decode(MAGIC, 3, &encode(MAGIC, 3, b"")).unwrap(), b"");
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = encode(MAGIC, 1, b"some vCPU state");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                decode(MAGIC, 1, &bad).is_err(),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn precise_reasons() {
        let bytes = encode(MAGIC, 1, b"payload");
        assert!(matches!(
            decode(MAGIC, 1, &bytes[..10]),
            Err(EnvelopeError::TooShort { .. })
        ));
        assert!(matches!(
            decode(b"OTHERMAG", 1, &bytes),
            Err(EnvelopeError::Magic { .. })
        ));
        assert_eq!(
            decode(MAGIC, 2, &bytes),
            Err(EnvelopeError::Version {
                found: 1,
                supported: 2
            })
        );
        let truncated = &bytes[..bytes.len() - 1];
        assert!(matches!(
            decode(MAGIC, 1, truncated),
            Err(EnvelopeError::Length { .. })
        ));
        let mut corrupt = bytes.clone();
        corrupt[HEADER_LEN] ^= 0xff;
        assert!(matches!(
            decode(MAGIC, 1, &corrupt),
            Err(EnvelopeError::Checksum { .. })
        ));
    }
}
