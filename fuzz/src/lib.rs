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
