//! What the fuzz targets of checksummed formats share: how an input becomes a file.

/// Splits a fuzz input into its mode byte and the file it stands for. With mode bit 0 set,
/// the rest is wrapped in a valid envelope of `magic` (version `version(mode)`), so that
/// mutations reach the decoder behind the checksum; clear, the rest is the file as it is.
pub fn mode_and_file(
    data: &[u8],
    magic: &[u8; 8],
    version: impl FnOnce(u8) -> u32,
) -> Option<(u8, Vec<u8>)> {
    let (&mode, rest) = data.split_first()?;
    let file = if mode & 1 == 1 {
        snapshot::encode(magic, version(mode), rest)
    } else {
        rest.to_vec()
    };
    Some((mode, file))
}

/// Rewrites the checksums of a WS file of format version 2 (docs/reap.md) to match its
/// content, as far as its counts can be read: every chunk's whose data lies in the file,
/// then the header's. Mutated fields then reach the header's decoder and the chunk checks
/// instead of stopping at a checksum.
pub fn fix_ws_v2_checksums(file: &mut [u8]) {
    use xxhash_rust::xxh3::xxh3_64;
    const FIXED: usize = 48;
    let u32_at = |f: &[u8], at: usize| u32::from_le_bytes(f[at..at + 4].try_into().unwrap());
    if file.len() < FIXED {
        return;
    }
    let header_len = u32_at(file, 12) as usize;
    let (regions, chunks, runs) = (
        u32_at(file, 36) as usize,
        u32_at(file, 40) as usize,
        u32_at(file, 44) as usize,
    );
    let Some(need) = regions
        .checked_mul(24)
        .and_then(|r| chunks.checked_mul(16)?.checked_add(r))
        .and_then(|n| runs.checked_mul(16)?.checked_add(n))
        .and_then(|n| n.checked_add(FIXED + 8))
        .filter(|&n| n <= file.len())
    else {
        return;
    };
    let chunk_table = FIXED + regions * 24;
    let mut data_at = header_len;
    for c in 0..chunks {
        let entry = chunk_table + c * 16;
        let pages = u32_at(file, entry + 4) as usize;
        let Some(end) = pages
            .checked_mul(4096)
            .and_then(|len| data_at.checked_add(len))
            .filter(|&end| end <= file.len())
        else {
            break;
        };
        let sum = xxh3_64(&file[data_at..end]);
        file[entry + 8..entry + 16].copy_from_slice(&sum.to_le_bytes());
        data_at = end;
    }
    let sum = xxh3_64(&file[..need - 8]);
    file[need - 8..need].copy_from_slice(&sum.to_le_bytes());
}
