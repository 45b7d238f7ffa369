//! Guest signals on port 0x3f0. 123: boot complete (the guest's init is up); the VMM logs
//! the time since it started, as Firecracker's `--boot-timer` does. 124: reapvm's agent
//! finished answering an invocation (REAP ends recording a working set on the first one).

use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::BusDevice;

pub const BOOT_TIMER_PORT: u64 = 0x3f0;
const BOOT_COMPLETE_MAGIC: u8 = 123;
const INVOCATION_DONE_MAGIC: u8 = 124;

/// Called when the guest reports a finished invocation.
pub type InvocationHook = Box<dyn FnMut() + Send>;

/// Wall and CPU time at which the VMM started, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct StartTime {
    pub wall_us: u64,
    pub cpu_us: u64,
}

pub struct BootTimer {
    start: StartTime,
    log_boot_time: bool,
    ready: Option<Sender<Duration>>,
    invocation_done: Option<InvocationHook>,
}

impl BootTimer {
    /// `log_boot_time` logs the `Guest-boot-time` line; `ready`, if given, receives the wall
    /// time from start to the first boot-complete signal.
    pub fn new(start: StartTime, log_boot_time: bool, ready: Option<Sender<Duration>>) -> Self {
        Self {
            start,
            log_boot_time,
            ready,
            invocation_done: None,
        }
    }

    /// Calls `hook` each time the guest reports a finished invocation.
    pub fn on_invocation_done(&mut self, hook: InvocationHook) {
        self.invocation_done = Some(hook);
    }
}

/// Microseconds of CLOCK_MONOTONIC and of the process's CPU time.
pub fn now() -> StartTime {
    StartTime {
        wall_us: clock_us(libc::CLOCK_MONOTONIC),
        cpu_us: clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
    }
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and `clock` a clock id libc knows.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [INVOCATION_DONE_MAGIC] {
            if let Some(hook) = self.invocation_done.as_mut() {
                hook();
            }
            return;
        }
        if offset != 0 || data != [BOOT_COMPLETE_MAGIC] {
            return;
        }
        let now = now();
        let wall = now.wall_us.saturating_sub(self.start.wall_us);
        let cpu = now.cpu_us.saturating_sub(self.start.cpu_us);
        if self.log_boot_time {
            log::info!(
                "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
                wall,
                wall / 1000,
                cpu,
                cpu / 1000
            );
        }
        if let Some(ready) = self.ready.take() {
            // The receiver may be gone (nobody waits for readiness); that is fine.
            let _ = ready.send(Duration::from_micros(wall));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_once_on_magic_only() {
        let (tx, rx) = std::sync::mpsc::channel();
        let start = now();
        let mut timer = BootTimer::new(start, false, Some(tx));
        timer.write(0, &[122]);
        timer.write(1, &[123]);
        timer.write(0, &[123, 0]);
        assert!(rx.try_recv().is_err());
        timer.write(0, &[123]);
        assert!(rx.try_recv().is_ok());
        timer.write(0, &[123]);
        assert!(rx.try_recv().is_err(), "readiness is reported once");
    }

    #[test]
    fn invocation_signals_reach_the_hook() {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut timer = BootTimer::new(now(), false, None);
        timer.write(0, &[124]);
        let seen = count.clone();
        timer.on_invocation_done(Box::new(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        timer.write(0, &[124]);
        timer.write(1, &[124]);
        timer.write(0, &[123]);
        timer.write(0, &[124]);
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
