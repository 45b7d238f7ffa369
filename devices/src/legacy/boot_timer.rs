//! The boot-complete signal: the guest writes 123 to port 0x3f0 when its init is up, and
//! the VMM logs the time since it started, as Firecracker's `--boot-timer` does.

use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::BusDevice;

pub const BOOT_TIMER_PORT: u64 = 0x3f0;
const BOOT_COMPLETE_MAGIC: u8 = 123;

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
}

impl BootTimer {
    /// `log_boot_time` logs the `Guest-boot-time` line; `ready`, if given, receives the wall
    /// time from start to the first boot-complete signal.
    pub fn new(start: StartTime, log_boot_time: bool, ready: Option<Sender<Duration>>) -> Self {
        Self {
            start,
            log_boot_time,
            ready,
        }
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
}
