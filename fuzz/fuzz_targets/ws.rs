//! The REAP working-set file, format version 2 (the one restores read): its header decoded
//! as a restore decodes it, checked against its own snapshot, every chunk checked, and each
//! run's data sliced out as the installer slices it; and any version summarised as tools
//! read it.
//!
//! Input: a mode byte, then the file. Mode bit 0 set rewrites the file's checksums (the
//! header's, and each chunk's whose data is in the file) to match, so that mutations reach
//! the decoder and the chunk checks behind them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::ws::{self, Header, RunKind};
use snapshot::PAGE_SIZE;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut file = rest.to_vec();
    if mode & 1 == 1 {
        reapvm_fuzz::fix_ws_v2_checksums(&mut file);
    }
    // Tools read any version; a file they accept has its runs inside its regions.
    if let Ok(summary) = ws::summarize(&file) {
        for run in &summary.runs {
            let end = run.file_offset + u64::from(run.pages) * PAGE_SIZE as u64;
            assert!(
                summary
                    .regions
                    .iter()
                    .any(|r| run.file_offset >= r.file_offset && end - r.file_offset <= r.size),
                "run {run:?} outside the regions"
            );
        }
    }
    let Ok(header) = Header::decode(&file) else {
        return;
    };
    header
        .check_snapshot(header.identity, &header.regions)
        .expect("a WS belongs to its own snapshot");
    assert_eq!(header.header_len % PAGE_SIZE as u64, 0);
    let whole = header.check_file(&file).is_ok();
    let mut pages = 0u64;
    for (i, chunk) in header.chunks.iter().enumerate() {
        let mut data_end = 0usize;
        for (run, at) in header.chunk_runs(i) {
            pages += u64::from(run.pages);
            let len = run.pages as usize * PAGE_SIZE;
            match (run.kind, at) {
                (RunKind::Data, Some(at)) => {
                    assert_eq!(at, data_end, "data runs follow each other");
                    data_end = at + len;
                }
                (RunKind::Zero, None) => {}
                other => panic!("run kind and data disagree: {other:?}"),
            }
            let end = run
                .file_offset
                .checked_add(len as u64)
                .expect("a run ends in u64");
            assert!(
                header
                    .regions
                    .iter()
                    .any(|r| run.file_offset >= r.file_offset
                        && r.file_offset.checked_add(r.size).is_some_and(|e| end <= e)),
                "run {run:?} is not inside one region"
            );
        }
        assert_eq!(
            data_end,
            chunk.data_len(),
            "chunk {i}'s data is its data runs'"
        );
    }
    assert_eq!(pages, header.pages());
    if whole {
        // What a recorder writes for the same chunks decodes to the same map.
        let chunks: Vec<_> = header
            .chunks
            .iter()
            .map(|c| {
                let data = file[c.data_offset as usize..][..c.data_len()].to_vec();
                (header.runs[c.runs.clone()].to_vec(), data)
            })
            .collect();
        let encoded = ws::v2::encode(header.identity, &header.regions, &chunks);
        let round = Header::decode(&encoded).expect("a re-encoded WS decodes");
        round.check_file(&encoded).expect("and its chunks check");
        assert_eq!(round.runs, header.runs);
        assert_eq!(round.regions, header.regions);
        assert_eq!(
            round
                .chunks
                .iter()
                .map(|c| (c.runs.clone(), c.checksum))
                .collect::<Vec<_>>(),
            header
                .chunks
                .iter()
                .map(|c| (c.runs.clone(), c.checksum))
                .collect::<Vec<_>>()
        );
    }
});
