//! SIGTERM and SIGINT end reapvm as a service manager or an orchestrator expects: the
//! metrics written a last time, the API socket removed, exit code 0. Without this the
//! default action killed the process mid-write and left the socket behind, so the next
//! reapvm on that path had to remove it first.

use std::path::PathBuf;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::seccomp::{self, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    #[error("cannot block SIGTERM and SIGINT: {0}")]
    Mask(Errno),
    #[error("cannot open a signalfd for SIGTERM and SIGINT: {0}")]
    SignalFd(Errno),
    #[error("cannot start the signal thread: {0}")]
    Thread(std::io::Error),
}

static API_SOCKET: OnceLock<PathBuf> = OnceLock::new();

/// The API socket this process binds, removed when a termination signal ends it (given
/// before the bind: a signal right after it must not leave the socket behind).
pub fn remove_on_termination(path: PathBuf) {
    let _ = API_SOCKET.set(path);
}

/// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread it starts after
/// this call, and starts the thread that receives them. Call it before any other thread
/// starts: a thread started earlier would take the signal's default action.
pub fn handle_termination_signals() -> Result<(), TerminateError> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(TerminateError::Mask)?;
    let fd =
        SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).map_err(TerminateError::SignalFd)?;
    std::thread::Builder::new()
        .name("fc_signal".into())
        .spawn(move || {
            if let Err(e) = seccomp::apply(ThreadKind::Vmm) {
                // Without a filter this thread would be the one unfiltered thread: end now.
                log::error!("{e}");
                std::process::exit(crate::cli::exit_code::BAD_CONFIGURATION);
            }
            loop {
                match fd.read_signal() {
                    Ok(Some(info)) => terminate(info.ssi_signo),
                    Ok(None) | Err(Errno::EINTR) => continue,
                    Err(e) => {
                        // The signals stay blocked everywhere: with nobody to read them the
                        // process could only be killed. End it now, as a signal would.
                        log::error!("cannot read termination signals ({e}): exiting");
                        terminate_with(crate::cli::exit_code::GENERIC_ERROR);
                    }
                }
            }
        })
        .map_err(TerminateError::Thread)?;
    Ok(())
}

fn terminate(signo: u32) -> ! {
    let name = i32::try_from(signo)
        .ok()
        .and_then(|n| Signal::try_from(n).ok())
        .map_or("a termination signal", Signal::as_str);
    log::info!("{name} received: writing the metrics, removing the API socket, exiting");
    terminate_with(crate::cli::exit_code::OK)
}

fn terminate_with(code: i32) -> ! {
    crate::metrics::flush_if_configured();
    if let Some(path) = API_SOCKET.get() {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(code)
}
