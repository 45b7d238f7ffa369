//! Tells the VMM an invocation was answered: an APC escape sequence written to the serial
//! console (/dev/ttyS0), which reapvm takes out of the console output. The guest kernel
//! does the port I/O, so any agent thread can send it and a snapshot taken while it is on
//! its way does no harm (a user-mode `out` paused across a snapshot is not that robust).

use std::io::Write;
use std::sync::Mutex;

/// Must match devices::legacy::INVOCATION_DONE in the VMM.
const INVOCATION_DONE: &[u8] = b"\x1b_reapvm:invoked\x1b\\";
const CONSOLE: &str = "/dev/ttyS0";

pub fn signal_invocation_done() -> std::io::Result<()> {
    // Only the guest's init talks to the VMM: the same binary run on a host must not write
    // to the host's serial port.
    if std::process::id() != 1 {
        return Err(std::io::Error::other("not the guest's init (PID 1)"));
    }
    static CONSOLE_FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);
    let mut console = CONSOLE_FILE.lock().unwrap_or_else(|p| p.into_inner());
    if console.is_none() {
        use std::os::unix::fs::OpenOptionsExt;
        *console = Some(
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(CONSOLE)?,
        );
    }
    // One write: the tty layer keeps it together.
    console
        .as_mut()
        .expect("opened above")
        .write_all(INVOCATION_DONE)
}
