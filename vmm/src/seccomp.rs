//! Per-thread seccomp filters (rust-vmm's seccompiler), as Firecracker installs them: each
//! kind of thread (the VMM thread, the API thread, the vCPUs, the userfaultfd and WS
//! threads) allows the system calls it makes and no other. A forbidden call raises SIGSYS,
//! whose handler logs the call and the thread and ends the process with exit code 148
//! (Firecracker's). The filters are compiled at start-up from seccompiler's JSON format:
//! the built-in `resources/seccomp/x86_64.json`, or `--seccomp-filter FILE`, which must
//! name the same four kinds of thread. `--no-seccomp` installs none.
//!
//! Each thread installs its own filter when it starts (the VMM thread once its VM runs,
//! after building it), so a thread spawned later by a filtered one carries both filters.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use seccompiler::{BpfMap, BpfProgram, TargetArch};

/// Exit code after a forbidden system call (Firecracker's `BadSyscall`).
pub const BAD_SYSCALL_EXIT: i32 = 148;

const BUILT_IN: &str = include_str!("../../resources/seccomp/x86_64.json");

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot read the seccomp filter file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("seccomp filters from {origin} do not compile: {reason}")]
    Compile { origin: String, reason: String },
    #[error("seccomp filters from {origin} have no filter for the {kind} thread (each of vmm, api, vcpu and uffd needs one)")]
    Missing { origin: String, kind: &'static str },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the seccomp filter of the {kind} thread: {reason}")]
    Apply { kind: &'static str, reason: String },
}

/// The kinds of thread that get a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vmm,
    Api,
    Vcpu,
    /// Fault loops and the REAP working-set threads.
    Uffd,
}

impl ThreadKind {
    const ALL: [ThreadKind; 4] = [Self::Vmm, Self::Api, Self::Vcpu, Self::Uffd];

    fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Api => "api",
            Self::Vcpu => "vcpu",
            Self::Uffd => "uffd",
        }
    }
}

/// The filters threads install; None when seccomp is off.
static FILTERS: OnceLock<Option<BpfMap>> = OnceLock::new();

/// Compiles the filters from `json`, checking every kind of thread has one.
fn compile(json: &[u8], origin: &str) -> Result<BpfMap, SeccompError> {
    let map = seccompiler::compile_from_json(json, TargetArch::x86_64).map_err(|e| {
        SeccompError::Compile {
            origin: origin.to_string(),
            reason: e.to_string(),
        }
    })?;
    for kind in ThreadKind::ALL {
        if map.get(kind.name()).is_none_or(|f| f.is_empty()) {
            return Err(SeccompError::Missing {
                origin: origin.to_string(),
                kind: kind.name(),
            });
        }
    }
    Ok(map)
}

/// Decides the filters for this process (once, before any thread that installs one
/// starts) and, unless seccomp is off, installs the SIGSYS handler.
pub fn init(disabled: bool, file: Option<&Path>) -> Result<(), SeccompError> {
    let filters = if disabled {
        None
    } else {
        let map = match file {
            Some(path) => {
                let json = std::fs::read(path).map_err(|source| SeccompError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                compile(&json, &path.display().to_string())?
            }
            None => compile(BUILT_IN.as_bytes(), "the built-in filters")?,
        };
        install_sigsys_handler()?;
        Some(map)
    };
    let _ = FILTERS.set(filters);
    Ok(())
}

fn filter_for(kind: ThreadKind) -> Option<&'static BpfProgram> {
    FILTERS.get()?.as_ref()?.get(kind.name())
}

/// Installs the calling thread's filter (nothing when seccomp is off or `init` never ran,
/// as in unit tests).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filter) = filter_for(kind) else {
        return Ok(());
    };
    seccompiler::apply_filter(filter).map_err(|e| SeccompError::Apply {
        kind: kind.name(),
        reason: e.to_string(),
    })
}

/// Byte offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64 (the `_sigsys` member of
/// the union after three ints and padding: `_call_addr` at 16, `_syscall` at 24).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose `_sigsys` member holds
    // the number of the call the filter refused at SI_SYSCALL_OFFSET.
    let syscall = unsafe { *(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the buffer; every filter
    // allows prctl.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let thread = String::from_utf8_lossy(&name[..len]);
    // Not async-signal-safe, as Firecracker's handler is not either: the process ends
    // right after, and the message is what tells the user which call to allow.
    let message = format!(
        "seccomp: thread {thread} made system call {syscall}, which its filter does not allow; exiting with code {BAD_SYSCALL_EXIT}\n"
    );
    log::error!("{}", message.trim_end());
    // SAFETY: write(2) to stderr with a valid buffer; _exit ends the process without
    // running anything else in this thread's state.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(BAD_SYSCALL_EXIT);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler for SIGSYS with a valid action; the old one is discarded.
    let r = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if r != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_filters_compile_for_every_kind_of_thread() {
        let map = compile(BUILT_IN.as_bytes(), "built-in").unwrap();
        for kind in ThreadKind::ALL {
            assert!(!map[kind.name()].is_empty(), "{}", kind.name());
        }
    }

    #[test]
    fn a_file_missing_a_kind_or_naming_an_unknown_call_is_refused() {
        let no_uffd = r#"{
            "vmm": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "read"}]},
            "api": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "read"}]},
            "vcpu": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "read"}]}
        }"#;
        assert!(matches!(
            compile(no_uffd.as_bytes(), "test"),
            Err(SeccompError::Missing { kind: "uffd", .. })
        ));
        let unknown = r#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "no_such_call"}]}}"#;
        assert!(matches!(
            compile(unknown.as_bytes(), "test"),
            Err(SeccompError::Compile { .. })
        ));
    }
}
