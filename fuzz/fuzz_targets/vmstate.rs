//! The vmstate file as the restore path reads it: envelope, JSON state, then the checks a
//! restore makes before it touches KVM (configuration, memory layout, vCPU count), then the
//! memory file's size the backends derive from a state that passed.
//!
//! Input: a mode byte, then the file. Mode bit 0 set wraps the rest in a valid envelope, so
//! the fuzzer reaches the state decoder past the checksum; clear, the bytes are the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::persist::{self, VMSTATE_MAGIC, VMSTATE_VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((_, file)) = reapvm_fuzz::mode_and_file(data, VMSTATE_MAGIC, |_| VMSTATE_VERSION)
    else {
        return;
    };
    let Ok((state, checksum)) = persist::decode_vmstate(&file, Path::new("fuzz.vmstate")) else {
        return;
    };
    assert_eq!(
        Some(checksum),
        snapshot::envelope::stored_checksum(&file),
        "an accepted vmstate is identified by its stored checksum"
    );
    if vmm::restore::check_saved_state(&state).is_ok() {
        // What the memory backends size the memory file by, once the state passed.
        let _ = state.memory_file_len();
    }
});
