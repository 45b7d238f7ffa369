//! Guest memory served by userfaultfd: anonymous memory registered with a userfaultfd, each
//! first touch of a page (by the guest or by KVM on its behalf) filled from the memory file,
//! either by a built-in handler thread (`OnDemand`) or by an external process that receives
//! the userfaultfd through Firecracker's handshake (`Uffd`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::GuestMemoryMmap;
use serde::Serialize;
use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::persist::MemoryRegionState;

pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0} (needs root or vm.unprivileged_userfaultfd=1)")]
    Create(userfaultfd::Error),
    #[error("cannot register guest memory at {addr:#x} with the userfaultfd: {source}")]
    Register {
        addr: u64,
        source: userfaultfd::Error,
    },
    #[error("cannot map anonymous guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    #[error("cannot start the page fault handler thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot connect to the page fault handler at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot hand the userfaultfd to the handler at {path}: {source}")]
    Send {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One guest region as Firecracker describes it to an external handler.
#[derive(Debug, Clone, Serialize)]
pub struct GuestRegionUffdMapping {
    pub base_host_virt_addr: u64,
    pub size: usize,
    pub offset: u64,
    pub page_size: usize,
}

/// Anonymous guest memory laid out as the snapshot says, and a userfaultfd covering it. The
/// userfaultfd is non-blocking, as Firecracker makes it: handlers poll it (poll reports a
/// blocking one as always in error).
pub fn register(
    layout: &[MemoryRegionState],
) -> Result<(GuestMemoryMmap, Uffd, Vec<GuestRegionUffdMapping>), UffdError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(UffdError::Map)?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // KVM touches guest memory from the kernel: its faults must reach us too.
        .user_mode_only(false)
        .create()
        .map_err(UffdError::Create)?;
    let mut mappings = Vec::with_capacity(layout.len());
    for (region, saved) in mem.iter().zip(layout) {
        let host = region.as_ptr();
        uffd.register(host.cast(), region.len() as usize)
            .map_err(|source| UffdError::Register {
                addr: saved.guest_addr,
                source,
            })?;
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: host as u64,
            size: region.len() as usize,
            offset: saved.file_offset,
            page_size: PAGE_SIZE,
        });
    }
    Ok((mem, uffd, mappings))
}

/// Counters of the built-in handler.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub faults: AtomicU64,
    pub bytes_read: AtomicU64,
}

impl crate::metrics::FaultSource for FaultStats {
    fn faults_and_bytes(&self) -> (u64, u64) {
        (
            self.faults.load(Ordering::Relaxed),
            self.bytes_read.load(Ordering::Relaxed),
        )
    }
}

/// Tells a restore's page fault handler threads to end (a failed restore must not leave
/// them, with their userfaultfd and memory file, in a VMM that stays up).
pub struct HandlerStop(vmm_sys_util::eventfd::EventFd);

impl HandlerStop {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self(vmm_sys_util::eventfd::EventFd::new(
            libc::EFD_NONBLOCK,
        )?)))
    }

    pub fn stop(&self) {
        let _ = self.0.write(1);
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Ends the handlers when dropped: on a restore's error paths, and with the VM.
pub struct StopHandlersOnDrop(pub Arc<HandlerStop>);

impl Drop for StopHandlersOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Serves faults from `file` on a thread of its own, until `stop`.
pub fn spawn_on_demand_handler(
    uffd: Uffd,
    file: File,
    mappings: Vec<GuestRegionUffdMapping>,
    stop: Arc<HandlerStop>,
) -> Result<Arc<FaultStats>, UffdError> {
    let stats = Arc::new(FaultStats::default());
    let thread_stats = stats.clone();
    std::thread::Builder::new()
        .name("fc_uffd".into())
        .spawn(move || serve_faults(&uffd, &file, &mappings, &thread_stats, &stop))
        .map_err(UffdError::Thread)?;
    Ok(stats)
}

fn serve_faults(
    uffd: &Uffd,
    file: &File,
    mappings: &[GuestRegionUffdMapping],
    stats: &FaultStats,
    stop: &HandlerStop,
) {
    let mut page = vec![0u8; PAGE_SIZE];
    loop {
        match wait_for_fault(uffd.as_raw_fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::error!("page fault handler stops: {e}");
                return;
            }
        }
        loop {
            match uffd.read_event() {
                Ok(Some(event)) => {
                    serve_event(uffd, file, mappings, stats, &mut page, event);
                }
                Ok(None) => break,
                Err(e) => {
                    log::error!("page fault handler stops: {e}");
                    return;
                }
            }
        }
    }
}

/// Waits until the userfaultfd `uffd_fd` has an event (true) or the handler is told to
/// stop (false), retrying on signals.
pub fn wait_for_fault(uffd_fd: std::os::fd::RawFd, stop: &HandlerStop) -> std::io::Result<bool> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for descriptors the caller keeps open.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc >= 0 {
            return Ok(fds[1].revents & libc::POLLIN == 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The host address of memory-file offset `offset`, if a region holds it.
pub fn host_addr_of(mappings: &[GuestRegionUffdMapping], offset: u64) -> Option<u64> {
    mappings
        .iter()
        .find(|m| offset >= m.offset && offset < m.offset + m.size as u64)
        .map(|m| m.base_host_virt_addr + (offset - m.offset))
}

/// Serves one userfaultfd event: a missing page is filled from `file`. Returns the memory
/// file offset of the page this call installed (None for other events, for a page someone
/// else installed first, and on failure).
pub fn serve_event(
    uffd: &Uffd,
    file: &File,
    mappings: &[GuestRegionUffdMapping],
    stats: &FaultStats,
    page: &mut [u8],
    event: Event,
) -> Option<u64> {
    let Event::Pagefault { addr, .. } = event else {
        return None;
    };
    let addr = (addr as u64) & !(PAGE_SIZE as u64 - 1);
    let Some(m) = mappings
        .iter()
        .find(|m| addr >= m.base_host_virt_addr && addr < m.base_host_virt_addr + m.size as u64)
    else {
        log::error!("page fault at {addr:#x} outside guest memory");
        return None;
    };
    let offset = m.offset + (addr - m.base_host_virt_addr);
    if let Err(e) = file.read_exact_at(page, offset) {
        log::error!("cannot read page at offset {offset:#x} of the memory file: {e}");
        page.fill(0);
    }
    stats.faults.fetch_add(1, Ordering::Relaxed);
    stats
        .bytes_read
        .fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
    // SAFETY: `addr` is a page of a registered guest region that is still mapped (the
    // regions live as long as the process); `page` holds PAGE_SIZE bytes.
    match unsafe { uffd.copy(page.as_ptr().cast(), addr as *mut _, PAGE_SIZE, true) } {
        Ok(_) => Some(offset),
        // Another fault on the same page got there first: just wake the waiters.
        Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
            let _ = uffd.wake(addr as *mut _, PAGE_SIZE);
            None
        }
        Err(e) => {
            log::error!("UFFDIO_COPY at {addr:#x} failed: {e}");
            None
        }
    }
}

/// Firecracker's handshake: the JSON list of mappings and the userfaultfd (SCM_RIGHTS) over
/// the handler's Unix socket at `path`.
pub fn send_to_external_handler(
    path: &Path,
    uffd: &Uffd,
    mappings: &[GuestRegionUffdMapping],
) -> Result<(), UffdError> {
    let stream = UnixStream::connect(path).map_err(|source| UffdError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let body = serde_json::to_vec(mappings).expect("mappings encode");
    stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map(|_| ())
        .map_err(|e| UffdError::Send {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })
}
