//! The touch log beside a WS (`WS.touches`), as the replay-trace export reads it.
//!
//! Input: a mode byte, then the file; mode bit 0 set wraps the rest in a valid envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::touch_log::{TouchLog, TOUCH_LOG_MAGIC, TOUCH_LOG_VERSION};
use snapshot::PAGE_SIZE;

fuzz_target!(|data: &[u8]| {
    let Some((_, file)) = reapvm_fuzz::mode_and_file(data, TOUCH_LOG_MAGIC, |_| TOUCH_LOG_VERSION)
    else {
        return;
    };
    let Ok(log) = TouchLog::decode(&file) else {
        return;
    };
    for t in &log.touches {
        assert_eq!(t.file_offset % PAGE_SIZE as u64, 0);
        assert!(t.file_offset < log.identity.memory_len);
    }
    assert_eq!(
        log.encode(),
        file,
        "an accepted touch log re-encodes to itself"
    );
});
