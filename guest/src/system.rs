//! The init duties: kernel filesystems, a console on stdout, reaping orphans, rebooting.

use std::ffi::CString;

/// What to do once the guest is up.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Stay,
    Reboot,
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

/// Init's last duty: collect every orphan that exits, forever.
pub fn reap_forever() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            // No children right now: sleep until a signal (SIGCHLD) arrives.
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }
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
