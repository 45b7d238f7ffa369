//! The replay guest's control page (see docs/replay.md): a 4 KiB MMIO window at the start of
//! the 32-bit MMIO gap through which the no-Linux replay guest, running in user mode, talks
//! to the VMM. MMIO rather than port I/O because kvm-pvm hosts do not honour IOPL in guest
//! user mode. Registers (32-bit, little-endian):
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | write | ready: the trace is checked and memory filled; waiting for go |
//! | 0x04 | read  | go: 1 in a VM restored from a snapshot, 0 in a booted one |
//! | 0x08 | write | done, with the checksum of what the replay read |
//! | 0x0c | write | error code (the guest stops); the detail register says more |
//! | 0x10 | write | detail for the next error (e.g. the offending page) |
//! | 0x14 | write | one console byte; lines go to the VMM's log |
//!
//! "done" also fires the invocation signal, so REAP records the replay's working set as it
//! records a function's first invocation.

use std::sync::{Arc, Mutex};

use super::console_signal::InvocationSignal;
use crate::BusDevice;

pub const REPLAY_CONTROL_ADDR: u64 = 0xc000_0000;
pub const REPLAY_CONTROL_LEN: u64 = 0x1000;

const READY: u64 = 0x00;
const GO: u64 = 0x04;
const DONE: u64 = 0x08;
const ERROR: u64 = 0x0c;
const DETAIL: u64 = 0x10;
const CONSOLE: u64 = 0x14;
const MAX_LINE: usize = 240;

/// What the replay guest has reported so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStatus {
    pub ready: bool,
    pub done: bool,
    pub checksum: u32,
    pub error: Option<String>,
}

/// The status, shared between the device and whoever reports it (metrics).
#[derive(Debug, Clone, Default)]
pub struct ReplayReport(Arc<Mutex<ReplayStatus>>);

impl ReplayReport {
    pub fn status(&self) -> ReplayStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ReplayStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Why the guest stopped, from its error code and detail.
pub fn describe_error(code: u32, detail: u32) -> String {
    match code {
        1 => "the initrd is not a replay trace (bad magic or page size)".into(),
        2 => format!("the replay trace touches page {detail}, outside guest memory"),
        3 => "the replay trace is longer than the initrd that holds it (truncated)".into(),
        4 => format!("the replay trace touches page {detail}, inside the replay guest's own region (below 2 MiB or in the initrd)"),
        5 => "no initrd: the replay guest needs its trace as the initrd".into(),
        6 => format!("guest memory ends at page {detail}, beyond the first GiB the boot page tables map"),
        // The virtio-blk DMA check (guest/replay/src/virtio_check.rs).
        10 => "virtio check: no virtio-blk device found".into(),
        11 => format!("virtio check: feature negotiation or queue set-up refused (step {detail})"),
        12 => format!("virtio check: request {detail} read data that is not the disk's"),
        13 => format!("virtio check: request {detail} changed guard bytes around its buffers"),
        14 => format!("virtio check: request {detail} completed with a failed status"),
        15 => format!("virtio check: request {detail} completed with a wrong used length"),
        16 => format!("virtio check: no completion after {detail} requests (timed out)"),
        17 => format!("virtio check: memory outside every buffer changed (page {detail})"),
        18 => format!("virtio check: the used ring returned descriptor {detail}, which is not in flight"),
        19 => format!("virtio check: the disk has only {detail} sectors"),
        20 => format!("virtio check: guest memory ends at page {detail}: too small, or beyond the first GiB"),
        21 => "hostile case: no case, or an unknown one, after reapvm-hostile=".into(),
        22 => "hostile case: the device never returned the abused chain".into(),
        23 => "hostile case: the good read after the reset never completed".into(),
        24 => format!("hostile case: the good read after the reset failed (status or byte {detail:#x})"),
        // The virtio-rng check (guest/replay/src/entropy_check.rs).
        25 => "entropy check: no virtio-rng device found".into(),
        26 => format!("entropy check: only {detail} requests completed (timed out)"),
        27 => format!("entropy check: request {detail} completed with a wrong used length"),
        28 => format!("entropy check: buffer {detail} is not random (all one byte, or like another)"),
        29 => format!("entropy check: bytes past buffer {detail} changed"),
        other => format!("replay guest error {other} (detail {detail})"),
    }
}

pub struct ReplayControl {
    go: bool,
    signal: InvocationSignal,
    report: ReplayReport,
    detail: u32,
    line: Vec<u8>,
}

impl ReplayControl {
    /// `go` is what the go register answers: true in a VM restored from a snapshot.
    pub fn new(go: bool, signal: InvocationSignal, report: ReplayReport) -> Self {
        Self {
            go,
            signal,
            report,
            detail: 0,
            line: Vec::new(),
        }
    }
}

impl BusDevice for ReplayControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == GO && !data.is_empty() {
            data[0] = u8::from(self.go);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        match offset {
            READY => {
                log::info!("replay guest: ready (trace checked, memory filled)");
                self.report.update(|s| s.ready = true);
            }
            DONE => {
                log::info!("replay guest: done, checksum {value:#010x}");
                // The signal first: it stamps the restore's first_response_us, which whoever
                // sees `done` in the metrics reads next.
                self.signal.fire();
                self.report.update(|s| {
                    s.done = true;
                    s.checksum = value;
                });
            }
            DETAIL => self.detail = value,
            ERROR => {
                let why = describe_error(value, self.detail);
                log::error!("replay guest stopped: {why}");
                self.report.update(|s| s.error = Some(why));
            }
            CONSOLE => {
                let byte = value as u8;
                if byte == b'\n' || self.line.len() >= MAX_LINE {
                    log::info!("replay guest: {}", String::from_utf8_lossy(&self.line));
                    self.line.clear();
                }
                if byte != b'\n' {
                    self.line.push(byte);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn done_is_shown_after_the_signal_has_fired() {
        // Whoever polls the metrics for `done` then reads what the signal's hook stamped.
        let signal = InvocationSignal::default();
        let report = ReplayReport::default();
        let seen_done_in_hook = Arc::new(AtomicU32::new(2));
        let (r, seen) = (report.clone(), seen_done_in_hook.clone());
        signal.set_hook(Box::new(move || {
            seen.store(u32::from(r.status().done), Ordering::Relaxed);
        }));
        let mut restored = ReplayControl::new(true, signal, report.clone());
        restored.write(DONE, &7u32.to_le_bytes());
        assert_eq!(seen_done_in_hook.load(Ordering::Relaxed), 0);
        assert!(report.status().done);
    }

    #[test]
    fn go_ready_done_and_errors() {
        let fired = Arc::new(AtomicU32::new(0));
        let signal = InvocationSignal::default();
        let f = fired.clone();
        signal.set_hook(Box::new(move || {
            f.fetch_add(1, Ordering::Relaxed);
        }));
        let report = ReplayReport::default();
        let mut booted = ReplayControl::new(false, signal.clone(), report.clone());
        let mut word = [9u8; 4];
        booted.read(GO, &mut word);
        assert_eq!(word, [0; 4], "a booted VM waits");
        let mut restored = ReplayControl::new(true, signal, report.clone());
        restored.read(GO, &mut word);
        assert_eq!(u32::from_le_bytes(word), 1, "a restored VM goes");
        restored.write(READY, &1u32.to_le_bytes());
        restored.write(DONE, &0xdead_beefu32.to_le_bytes());
        let s = report.status();
        assert!(s.ready && s.done);
        assert_eq!(s.checksum, 0xdead_beef);
        assert_eq!(
            fired.load(Ordering::Relaxed),
            1,
            "done fires the invocation signal"
        );
        restored.write(DETAIL, &70_000u32.to_le_bytes());
        restored.write(ERROR, &2u32.to_le_bytes());
        assert_eq!(
            report.status().error.as_deref(),
            Some("the replay trace touches page 70000, outside guest memory")
        );
        for b in b"hello\n" {
            restored.write(CONSOLE, &u32::from(*b).to_le_bytes());
        }
        assert!(restored.line.is_empty());
    }
}
