//! The fuzz targets' seeds (fuzz/seeds/TARGET/) decode and pass the checks their targets
//! run. A seed starting with a mode byte of 1 is a payload the target wraps in a valid
//! envelope (docs/fuzzing.md).

use std::path::{Path, PathBuf};

use snapshot::replay_trace::Trace;
use snapshot::touch_log::{TouchLog, TOUCH_LOG_MAGIC, TOUCH_LOG_VERSION};
use snapshot::ws;
use vmm::persist::{VMSTATE_MAGIC, VMSTATE_VERSION};

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// The file a seed stands for, as the target builds it from the mode byte.
fn file(seed: &[u8], magic: &[u8; 8], version: u32) -> Vec<u8> {
    match seed.split_first() {
        Some((1, payload)) => snapshot::encode(magic, version, payload),
        Some((0, raw)) => raw.to_vec(),
        _ => panic!("a seed starts with mode byte 0 or 1"),
    }
}

#[test]
fn vmstate_seeds_are_states_a_restore_accepts() {
    for (path, seed) in seeds("vmstate") {
        let bytes = file(&seed, VMSTATE_MAGIC, VMSTATE_VERSION);
        let (state, _) = vmm::persist::decode_vmstate(&bytes, &path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        vmm::restore::check_saved_state(&state)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!state.vcpus.is_empty());
    }
}

#[test]
fn ws_seeds_are_whole_files_a_restore_reads() {
    for (path, seed) in seeds("ws") {
        // The ws target's seeds are files as they are (mode 0): its mode 1 rewrites checksums.
        let Some((0, bytes)) = seed.split_first() else {
            panic!("{}: a ws seed starts with mode byte 0", path.display());
        };
        let header = ws::Header::decode(bytes)
            .and_then(|h| h.check_file(bytes).map(|()| h))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(header.pages() > 0, "{}", path.display());
    }
}

#[test]
fn touch_log_seeds_decode() {
    for (path, seed) in seeds("touch_log") {
        let log = TouchLog::decode(&file(&seed, TOUCH_LOG_MAGIC, TOUCH_LOG_VERSION))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!log.touches.is_empty(), "{}", path.display());
    }
}

#[test]
fn replay_trace_seeds_fit_the_fuzzed_guest() {
    for (path, seed) in seeds("replay_trace") {
        let trace = Trace::decode(&seed).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        trace
            .check_fits(64 * 256)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn api_request_seeds_parse() {
    const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"];
    for (path, seed) in seeds("api_request") {
        let method = METHODS[usize::from(seed[0]) % METHODS.len()];
        let text = std::str::from_utf8(&seed[1..]).unwrap();
        let (uri, body) = text.split_once('\n').unwrap();
        vmm::api::request::parse(method, uri, body.as_bytes())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// Each piece of an `mmds` seed reaches what it is for: HTTP pieces are whole requests the
/// session answers, frames are taken by the stack and answered (an ARP reply, a SYN-ACK).
#[test]
fn mmds_seeds_are_answered() {
    use devices::mmds::http::{RequestCounts, Session};
    use devices::mmds::{MmdsStack, MmdsStore, DEFAULT_IPV4, DEFAULT_SIZE_LIMIT, MMDS_MAC};
    use std::sync::{Arc, Mutex};
    let now = std::time::Instant::now();
    for (path, seed) in seeds("mmds") {
        let store = Arc::new(Mutex::new(MmdsStore::new(DEFAULT_SIZE_LIMIT)));
        let mut stack = MmdsStack::new(DEFAULT_IPV4, store.clone());
        for piece in seed.split(|&b| b == 0xff) {
            let (&kind, bytes) = piece.split_first().expect("no empty piece");
            if kind == 0 {
                let mut session = Session::default();
                session.feed(bytes);
                let answer = session.next_answer(
                    &mut store.lock().unwrap(),
                    &mut RequestCounts::default(),
                    now,
                );
                assert!(
                    answer.is_some(),
                    "{}: an HTTP piece is not answered",
                    path.display()
                );
                continue;
            }
            let frame = if kind == 1 {
                let mut f = MMDS_MAC.to_vec();
                f.extend_from_slice(&[6, 0, 0xac, 0x10, 0, 2, 0x08, 0x00]);
                f.extend_from_slice(bytes);
                f
            } else {
                bytes.to_vec()
            };
            assert!(
                stack.is_mmds_frame(&frame),
                "{}: a frame not for MMDS",
                path.display()
            );
            stack.receive_frame(&frame, now);
            assert!(
                stack.next_frame(now).is_some(),
                "{}: a frame MMDS does not answer",
                path.display()
            );
        }
    }
}
