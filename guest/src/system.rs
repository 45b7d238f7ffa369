//! The init duties: kernel filesystems, a console on stdout, reaping orphans, rebooting.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};

/// What to do once the guest is up.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Stay,
    Reboot,
}

/// The value of `key=` on the kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix(key)?.strip_prefix('='))
}

impl ExitAction {
    pub fn from_cmdline(cmdline: &str) -> Self {
        match cmdline
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix("reapvm.exit="))
        {
            Some("reboot") | Some("poweroff") => ExitAction::Reboot,
            _ => ExitAction::Stay,
        }
    }
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) {
    let _ = std::fs::create_dir_all(target);
    let (Ok(src), Ok(tgt), Ok(fs)) = (
        CString::new(source),
        CString::new(target),
        CString::new(fstype),
    ) else {
        return;
    };
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // Already mounted (devtmpfs by the kernel) is fine.
        if err.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("reapvm-agent: mount {fstype} on {target}: {err}");
        }
    }
}

pub fn mount_kernel_filesystems() {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nodev);
    mount("sysfs", "/sys", "sysfs", nodev);
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID);
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
    );
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
    );
    mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV);
    mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV);
}

/// The kernel gives init no stdio when the initramfs lacks /dev/console; take it from
/// devtmpfs then.
pub fn ensure_console() {
    // SAFETY: fcntl F_GETFD on a descriptor number has no memory effects.
    let stdout_ok = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if stdout_ok {
        return;
    }
    let path = c"/dev/console";
    // SAFETY: `path` is a valid C string; the returned descriptor is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        // SAFETY: dup2 between descriptors this process owns.
        unsafe { libc::dup2(fd, target) };
    }
    if fd > 2 {
        // SAFETY: `fd` is ours and no longer needed after duplication.
        unsafe { libc::close(fd) };
    }
}

pub fn reboot() -> ! {
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // SAFETY: sync and reboot take no pointers; as init we may reboot the machine.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on error; init must not exit.
    eprintln!(
        "reapvm-agent: reboot failed: {}",
        std::io::Error::last_os_error()
    );
    reap_forever()
}

static SHUTDOWN_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_shutdown_signal(_: libc::c_int) {
    SHUTDOWN_REQUESTED.store(true, Ordering::SeqCst);
}

/// Ctrl-Alt-Del (the kernel sends SIGINT to init once CAD is off) and SIGTERM shut down
/// cleanly. PID 1 ignores signals it has no handler for, so install them.
pub fn handle_shutdown_signals() {
    // SAFETY: reboot(CAD_OFF) only changes how the kernel treats Ctrl-Alt-Del.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores an atomic; no
        // SA_RESTART, so a blocked waitpid returns and sees the request.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_shutdown_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Init's last duty: collect every orphan that exits, until a shutdown is requested.
pub fn reap_forever() -> ! {
    loop {
        if SHUTDOWN_REQUESTED.load(Ordering::SeqCst) {
            println!("reapvm-agent: shutdown requested, syncing and rebooting");
            reboot();
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            // No children right now: sleep until a signal arrives.
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }
}

/// Asks the init loop to shut down (used by the agent's `/shutdown` endpoint).
pub fn request_shutdown() {
    SHUTDOWN_REQUESTED.store(true, Ordering::SeqCst);
    // Wake the init thread out of waitpid/pause.
    // SAFETY: kill to our own process.
    unsafe { libc::kill(std::process::id() as i32, libc::SIGTERM) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_action_from_cmdline() {
        assert_eq!(
            ExitAction::from_cmdline("console=ttyS0 reapvm.exit=reboot"),
            ExitAction::Reboot
        );
        assert_eq!(ExitAction::from_cmdline("console=ttyS0"), ExitAction::Stay);
        assert_eq!(
            ExitAction::from_cmdline("reapvm.exit=stay quiet"),
            ExitAction::Stay
        );
    }
}
