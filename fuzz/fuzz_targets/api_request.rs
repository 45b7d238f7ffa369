//! The API's request parser: method, path and body as the server hands them over (the
//! HTTP framing itself is hyper's).
//!
//! Input: a method byte, the path up to the first newline, then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::request;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let Ok(path) = std::str::from_utf8(&rest[..split]) else {
        return;
    };
    let body = rest.get(split + 1..).unwrap_or_default();
    if let Err(e) = request::parse(method, path, body) {
        // Every refusal can be reported to the client.
        let _ = e.to_string();
    }
});
