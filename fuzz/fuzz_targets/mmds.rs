//! MMDS's guest-facing side: the HTTP requests a guest sends, in any bytes and any pieces,
//! and the frames it sends to the MMDS address (ARP, IPv4, anything).
//!
//! Input: pieces separated by 0xff bytes. A piece starting with 0 is bytes of one HTTP
//! connection (fed to one session); with 1, an IPv4 packet sent to MMDS in an Ethernet
//! frame; otherwise a whole Ethernet frame, taken if it is addressed to MMDS.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::mmds::http::{RequestCounts, Session, MAX_REQUEST};
use devices::mmds::{
    MmdsStack, MmdsStore, MmdsVersion, DEFAULT_IPV4, DEFAULT_SIZE_LIMIT, MMDS_MAC,
};
use libfuzzer_sys::fuzz_target;

const GUEST_MAC: [u8; 6] = [6, 0, 0xac, 0x10, 0, 2];

fuzz_target!(|data: &[u8]| {
    let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
    store.configure(MmdsVersion::V2, false);
    let document = serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3}}});
    store.put(document).expect("a small document fits");
    let store = Arc::new(Mutex::new(store));
    let mut stack = MmdsStack::new(DEFAULT_IPV4, store.clone());
    let mut session = Session::default();
    let mut counts = RequestCounts::default();
    let now = Instant::now();
    for piece in data.split(|&b| b == 0xff) {
        match piece.split_first() {
            Some((0, bytes)) => {
                session.feed(bytes);
                let mut store = store.lock().unwrap();
                while let Some(answer) = session.next_answer(&mut store, &mut counts, now) {
                    assert!(answer.bytes.starts_with(b"HTTP/1."), "an answer is HTTP");
                }
                assert!(
                    session.pending_len() <= MAX_REQUEST + 1,
                    "a session stays bounded"
                );
            }
            Some((1, packet)) => {
                let mut frame = Vec::with_capacity(14 + packet.len());
                frame.extend_from_slice(&MMDS_MAC);
                frame.extend_from_slice(&GUEST_MAC);
                frame.extend_from_slice(&[0x08, 0x00]);
                frame.extend_from_slice(packet);
                if stack.is_mmds_frame(&frame) {
                    stack.receive_frame(&frame, now);
                }
            }
            Some((_, frame)) if stack.is_mmds_frame(frame) => stack.receive_frame(frame, now),
            _ => {}
        }
        while let Some(frame) = stack.next_frame(now) {
            assert!(
                frame.len() >= 14 && frame[6..12] == MMDS_MAC,
                "from MMDS's address"
            );
        }
    }
});
