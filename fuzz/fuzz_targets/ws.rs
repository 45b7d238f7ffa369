//! The REAP working-set file (format version 1, the only one this reapvm reads; any other
//! version is refused by the envelope): decoded as a restore decodes it, then every run's
//! data sliced out as the installer slices it.
//!
//! Input: a mode byte, then the file. Mode bit 0 set wraps the rest in a valid envelope (so
//! the fuzzer reaches the WS decoder past the checksum); with bit 1 set too the envelope
//! says version 2, which must be refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::ws::{self, RunKind, WS_MAGIC, WS_VERSION};
use snapshot::PAGE_SIZE;

fuzz_target!(|data: &[u8]| {
    // Mode bits 0 and 1 set: a valid envelope that says version 2.
    let other_version = |mode: u8| mode & 3 == 3;
    let Some((mode, file)) = reapvm_fuzz::mode_and_file(data, WS_MAGIC, |mode| {
        WS_VERSION + u32::from(other_version(mode))
    }) else {
        return;
    };
    let other_version = other_version(mode);
    let Ok(decoded) = ws::decode_any(&file) else {
        return;
    };
    assert!(!other_version, "a WS of another version was accepted");
    // The restore path's own check against the snapshot it belongs to.
    let again = ws::decode(&file, decoded.identity, &decoded.regions).expect("same snapshot");
    assert_eq!(again.runs, decoded.runs);
    let mut data_bytes = 0usize;
    let mut pages = 0u64;
    for (run, bytes) in decoded.runs_with_data() {
        pages += u64::from(run.pages);
        let len = run.pages as usize * PAGE_SIZE;
        match (run.kind, bytes) {
            (RunKind::Data, Some(b)) => {
                assert_eq!(b.len(), len);
                data_bytes += len;
            }
            (RunKind::Zero, None) => {}
            other => panic!("run kind and data disagree: {other:?}"),
        }
        let end = run
            .file_offset
            .checked_add(len as u64)
            .expect("a run ends in u64");
        assert!(
            decoded.regions.iter().any(|r| {
                run.file_offset >= r.file_offset
                    && r.file_offset.checked_add(r.size).is_some_and(|e| end <= e)
            }),
            "run {run:?} is not inside one region"
        );
    }
    assert_eq!(data_bytes, decoded.data.len());
    assert_eq!(pages, decoded.pages());
    // What a recorder would write for the same WS decodes to it.
    let encoded = ws::encode(
        decoded.identity,
        decoded.page_size,
        &decoded.regions,
        &decoded.runs,
        decoded.data,
    );
    let round = ws::decode_any(&encoded).expect("a re-encoded WS decodes");
    assert_eq!(round.runs, decoded.runs);
    assert_eq!(round.regions, decoded.regions);
    assert_eq!(round.data, decoded.data);
});
