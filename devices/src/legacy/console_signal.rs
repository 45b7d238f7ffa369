//! Signals the guest sends through its serial console: reapvm's agent writes an APC escape
//! sequence (`ESC _ reapvm:invoked ESC \`, which terminals ignore) to /dev/ttyS0 when it has
//! answered an invocation. The guest kernel does the port I/O, so the signal works from any
//! agent thread, and a snapshot taken while it is being written harms nothing (the VMM that
//! restores sees only the rest of that one sequence, prints it, and signals nothing). The
//! sequence is taken out of the console output and reported to a hook (REAP ends recording
//! a working set there).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the agent writes after answering an invocation.
pub const INVOCATION_DONE: &[u8] = b"\x1b_reapvm:invoked\x1b\\";

/// Called when the guest reports a finished invocation.
pub type InvocationHook = Box<dyn FnMut() + Send>;

/// Where a hook for the invocation signal can be set after the console exists.
#[derive(Clone, Default)]
pub struct InvocationSignal {
    hook: Arc<Mutex<Option<InvocationHook>>>,
    /// Signals seen since this VMM started (metrics: an orchestrator waits for its last
    /// invocation's signal before it snapshots, so that the signal cannot come out after a
    /// restore and end a recording at once).
    seen: Arc<AtomicU64>,
}

impl InvocationSignal {
    pub fn set_hook(&self, hook: InvocationHook) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Signals seen so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    pub(crate) fn fire(&self) {
        self.seen.fetch_add(1, Ordering::AcqRel);
        if let Some(hook) = self.hook.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            hook();
        }
    }
}

/// Passes console bytes to `inner`, except signal sequences, which go to the hook.
pub struct ConsoleSignalFilter<W: Write> {
    inner: W,
    /// How many bytes of INVOCATION_DONE the latest output matched (held back meanwhile).
    matched: usize,
    signal: InvocationSignal,
}

impl<W: Write> ConsoleSignalFilter<W> {
    pub fn new(inner: W, signal: InvocationSignal) -> Self {
        Self {
            inner,
            matched: 0,
            signal,
        }
    }

    fn push(&mut self, byte: u8) -> std::io::Result<()> {
        if byte == INVOCATION_DONE[self.matched] {
            self.matched += 1;
            if self.matched == INVOCATION_DONE.len() {
                self.matched = 0;
                self.signal.fire();
            }
            return Ok(());
        }
        // Not the sequence after all: keep the longest tail of what was held back plus this
        // byte that can still begin the sequence, and release the rest.
        let held = self.matched;
        let mut seen = INVOCATION_DONE[..held].to_vec();
        seen.push(byte);
        let keep = (1..=seen.len().min(INVOCATION_DONE.len() - 1))
            .rev()
            .find(|&k| seen[seen.len() - k..] == INVOCATION_DONE[..k])
            .unwrap_or(0);
        self.matched = keep;
        self.inner.write_all(&seen[..seen.len() - keep])
    }
}

impl<W: Write> Write for ConsoleSignalFilter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.push(b)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn signals_are_taken_out_and_everything_else_passes() {
        let sink = Sink::default();
        let signal = InvocationSignal::default();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        signal.set_hook(Box::new(move || {
            seen.fetch_add(1, Ordering::Relaxed);
        }));
        let mut filter = ConsoleSignalFilter::new(sink.clone(), signal);
        let mut input = b"boot\r\n\x1b[1mbold\x1b[0m ".to_vec();
        input.extend_from_slice(INVOCATION_DONE);
        input.extend_from_slice(b"after\x1b_reapvm:nope\x1b\\");
        // A signal written one byte at a time, as the UART sends it.
        for &b in INVOCATION_DONE {
            filter.write_all(&[b]).unwrap();
        }
        filter.write_all(&input).unwrap();
        filter.write_all(b"\x1b\x1b_reapvm:invoked\x1b\\!").unwrap();
        // A sequence cut short right before its closing byte, then a whole one.
        filter
            .write_all(b"\x1b_reapvm:invoked\x1b\x1b_reapvm:invoked\x1b\\")
            .unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 4);
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            b"boot\r\n\x1b[1mbold\x1b[0m after\x1b_reapvm:nope\x1b\\\x1b!\x1b_reapvm:invoked\x1b"
        );
    }
}
