//! Guest memory behind a userfaultfd: anonymous memory registered with a userfaultfd, each
//! first touch of a page (by the guest or by KVM on its behalf) answered by reapvm's one
//! fault loop ([`FaultLoop`]) from a [`PageSource`], or by an external process that receives
//! the userfaultfd through Firecracker's handshake (`Uffd`).

mod fault_loop;

pub use fault_loop::{
    fault_around_pages, install_page, install_range, FaultError, FaultLoop, FaultStats, FileSource,
    Installed, KeepOut, PageFault, PageSource, MAX_FAULT_AROUND_KIB,
};

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::GuestMemoryMmap;
use serde::Serialize;
use snapshot::PAGE_SIZE;
use userfaultfd::{Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::persist::MemoryRegionState;

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
    #[error("cannot start the page fault handler thread {name}: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("cannot create the event that stops the page fault handlers: {0}")]
    StopEvent(std::io::Error),
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

/// The registered regions: the one place that turns a faulting host address into a
/// memory-file offset, and back.
#[derive(Debug, Clone)]
pub struct UffdRegions(Vec<GuestRegionUffdMapping>);

impl UffdRegions {
    pub fn new(mappings: Vec<GuestRegionUffdMapping>) -> Self {
        Self(mappings)
    }

    pub fn mappings(&self) -> &[GuestRegionUffdMapping] {
        &self.0
    }

    /// The memory-file offset of the page holding host address `host`.
    pub fn offset_of(&self, host: u64) -> Option<u64> {
        let page = host & !(PAGE_SIZE as u64 - 1);
        self.mapping_of(host)
            .map(|m| m.offset + (page - m.base_host_virt_addr))
    }

    /// The region holding host address `host`.
    pub fn mapping_of(&self, host: u64) -> Option<&GuestRegionUffdMapping> {
        self.0
            .iter()
            .find(|m| host >= m.base_host_virt_addr && host - m.base_host_virt_addr < m.size as u64)
    }

    /// The host address of memory-file offset `offset`, if a region holds it.
    pub fn host_addr_of(&self, offset: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|m| offset >= m.offset && offset - m.offset < m.size as u64)
            .map(|m| m.base_host_virt_addr + (offset - m.offset))
    }
}

/// Anonymous guest memory laid out as the snapshot says, and a userfaultfd covering it. The
/// userfaultfd is non-blocking, as Firecracker makes it: handlers poll it (poll reports a
/// blocking one as always in error).
pub fn register(
    layout: &[MemoryRegionState],
) -> Result<(GuestMemoryMmap, Uffd, UffdRegions), UffdError> {
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
    Ok((mem, uffd, UffdRegions::new(mappings)))
}

/// Tells a restore's page fault handler threads (fault loops, the chunked WS installer) to
/// end, and keeps them to be joined: a failed restore must not leave them, with their
/// userfaultfd and memory file, in a VMM that stays up, and none may outlive the guest
/// memory it writes into.
pub struct HandlerStop {
    evt: vmm_sys_util::eventfd::EventFd,
    stopped: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl HandlerStop {
    pub fn new() -> Result<Arc<Self>, UffdError> {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(UffdError::StopEvent)?;
        Ok(Arc::new(Self {
            evt,
            stopped: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        }))
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.evt.write(1);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Readable once stopped (for poll).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.evt.as_raw_fd()
    }

    /// A thread to join once stopped.
    pub fn track(&self, thread: JoinHandle<()>) {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(thread);
    }

    fn join_all(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Ends the handlers and waits for them when dropped: on a restore's error paths, and with
/// the VM. Whatever holds it must drop it before the guest memory the handlers write to.
pub struct StopHandlersOnDrop(pub Arc<HandlerStop>);

impl Drop for StopHandlersOnDrop {
    fn drop(&mut self) {
        self.0.stop();
        self.0.join_all();
    }
}

/// Firecracker's handshake: the JSON list of mappings and the userfaultfd (SCM_RIGHTS) over
/// the handler's Unix socket at `path`.
pub fn send_to_external_handler(
    path: &Path,
    uffd: &Uffd,
    regions: &UffdRegions,
) -> Result<(), UffdError> {
    let stream = UnixStream::connect(path).map_err(|source| UffdError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let body = serde_json::to_vec(regions.mappings()).expect("mappings encode");
    stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map(|_| ())
        .map_err(|e| UffdError::Send {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_translate_both_ways_and_refuse_what_lies_outside() {
        let regions = UffdRegions::new(vec![
            GuestRegionUffdMapping {
                base_host_virt_addr: 0x7000_0000,
                size: 4 * PAGE_SIZE,
                offset: 0,
                page_size: PAGE_SIZE,
            },
            GuestRegionUffdMapping {
                base_host_virt_addr: 0x9000_0000,
                size: 2 * PAGE_SIZE,
                offset: 4 * PAGE_SIZE as u64,
                page_size: PAGE_SIZE,
            },
        ]);
        assert_eq!(regions.offset_of(0x7000_0000), Some(0));
        // Any address inside a page gives the page's offset.
        assert_eq!(regions.offset_of(0x7000_1234), Some(0x1000));
        assert_eq!(regions.offset_of(0x9000_1fff), Some(0x5000));
        assert_eq!(regions.offset_of(0x7000_4000), None);
        assert_eq!(regions.offset_of(0x6fff_ffff), None);
        assert_eq!(regions.host_addr_of(0x5000), Some(0x9000_1000));
        assert_eq!(regions.host_addr_of(0x6000), None);
        for offset in (0..6).map(|p| p * PAGE_SIZE as u64) {
            let host = regions.host_addr_of(offset).unwrap();
            assert_eq!(regions.offset_of(host), Some(offset));
        }
    }
}
