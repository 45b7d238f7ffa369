//! The page reapvm appends to a memory file after guest RAM: it names the snapshot the file
//! belongs to. The vmstate carries the same id, and the loader refuses a memory file whose
//! id differs, so a vmstate is never paired with another snapshot's memory (a crash between
//! the two renames of a snapshot, or files mixed up by hand). Tools that read guest RAM by
//! the regions' offsets (the File mapping, userfaultfd handlers) never reach it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::PAGE_SIZE;

pub const TRAILER_LEN: u64 = PAGE_SIZE as u64;
const MAGIC: &[u8; 8] = b"REAPMEMF";
const VERSION: u32 = 1;

/// A snapshot's random identity, shared by its vmstate and its memory file. In the vmstate
/// it is 32 hex digits: a JSON number that large would lose bits in most JSON tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotId(pub u128);

impl serde::Serialize for SnapshotId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for SnapshotId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        if text.len() != 32 {
            return Err(serde::de::Error::custom(format!(
                "snapshot id {text:?} is not 32 hex digits"
            )));
        }
        u128::from_str_radix(&text, 16)
            .map(SnapshotId)
            .map_err(|e| serde::de::Error::custom(format!("snapshot id {text:?}: {e}")))
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl SnapshotId {
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        Ok(Self(u128::from_le_bytes(bytes)))
    }
}

/// The trailer page naming `id`.
pub fn trailer(id: SnapshotId) -> Vec<u8> {
    let mut page = vec![0u8; TRAILER_LEN as usize];
    page[..8].copy_from_slice(MAGIC);
    page[8..12].copy_from_slice(&VERSION.to_le_bytes());
    page[16..32].copy_from_slice(&id.0.to_le_bytes());
    page
}

/// What a memory file says about the snapshot it belongs to.
#[derive(Debug, PartialEq, Eq)]
pub enum TrailerRead {
    Id(SnapshotId),
    /// The file ends where guest RAM ends, or what follows is not a trailer.
    Missing,
}

/// Reads the trailer at `ram_end` (the end of the last region in the file).
pub fn read_trailer(file: &File, ram_end: u64) -> std::io::Result<TrailerRead> {
    let mut head = [0u8; 32];
    match file.read_exact_at(&mut head, ram_end) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(TrailerRead::Missing),
        Err(e) => return Err(e),
    }
    if &head[..8] != MAGIC || head[8..12] != VERSION.to_le_bytes() {
        return Ok(TrailerRead::Missing);
    }
    let id = u128::from_le_bytes(head[16..32].try_into().expect("16 bytes"));
    Ok(TrailerRead::Id(SnapshotId(id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn ids_are_hex_strings_in_json() {
        let id = SnapshotId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"0123456789abcdef0011223344556677\"");
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SnapshotId>("\"12\"").is_err());
        assert!(
            serde_json::from_str::<SnapshotId>("\"0123456789abcdef001122334455667z\"").is_err()
        );
    }

    #[test]
    fn a_trailer_reads_back_and_its_absence_is_told() {
        let path = std::env::temp_dir().join(format!("reapvm-trailer-{}", std::process::id()));
        let id = SnapshotId::random().unwrap();
        assert_ne!(id, SnapshotId::random().unwrap());
        let mut file = File::create(&path).unwrap();
        file.write_all(&[7u8; 8192]).unwrap();
        file.write_all(&trailer(id)).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_trailer(&file, 8192).unwrap(), TrailerRead::Id(id));
        // Guest RAM is not a trailer, and nothing past the end is either.
        assert_eq!(read_trailer(&file, 4096).unwrap(), TrailerRead::Missing);
        assert_eq!(
            read_trailer(&file, 8192 + 4096).unwrap(),
            TrailerRead::Missing
        );
        let _ = std::fs::remove_file(&path);
    }
}
