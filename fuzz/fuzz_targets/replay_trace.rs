//! The replay trace the replay VM loads as its initrd: decoded, then checked against a
//! guest's memory as the replay benchmark checks it before it boots the trace.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::replay_trace::{Trace, GUEST_RESERVED_PAGES};

fuzz_target!(|data: &[u8]| {
    let Ok(trace) = Trace::decode(data) else {
        return;
    };
    let again = Trace::decode(&trace.encode()).expect("a re-encoded trace decodes");
    assert_eq!(again, trace);
    // A 64 MiB replay VM, as the benchmark sizes the smallest.
    let ram_pages = 64 * 256;
    if trace.check_fits(ram_pages).is_ok() {
        for t in &trace.touches {
            let page = u64::from(t.page);
            assert!((GUEST_RESERVED_PAGES..ram_pages).contains(&page));
        }
        for &(first, pages) in &trace.fills {
            assert!(first.checked_add(pages).is_some_and(|end| end <= ram_pages));
        }
        // What the benchmark compares the guest's report with.
        let _ = trace.expected_checksum();
    }
});
