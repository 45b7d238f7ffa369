//! The one userfaultfd fault loop. It owns the waiting (poll on the userfaultfd, the stop
//! event and its source's own event), the reading of events, the turning of a faulting
//! address into a memory-file offset and the already-installed case; what goes into the page
//! is its [`PageSource`]'s business: the memory file (`OnDemand`, and REAP's misses), the WS
//! then the file (REAP's chunked install), or the file while recording a WS (REAP's record).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use snapshot::PAGE_SIZE;
use userfaultfd::{Event, ReadWrite, Uffd};

use super::{HandlerStop, UffdError, UffdRegions};
use crate::vcpu::{ExitSignal, VmExitReason};

/// A fault on a page of guest memory, as a source sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting page's host address (page-aligned).
    pub host_addr: u64,
    /// Where the page is in the memory file.
    pub offset: u64,
    /// The first touch was a write.
    pub write: bool,
}

/// What installing a page came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// This call put the page in (and woke its waiters).
    Now,
    /// Someone else (another fault, an installer thread) put it in first; its waiters were
    /// woken.
    AlreadyThere,
}

/// A page that could not be served: the VM must stop rather than run on without it (or
/// with a page that is not the snapshot's).
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("cannot read the page at offset {offset:#x} of memory file {path} ({attempts} attempts): {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        attempts: u32,
        source: std::io::Error,
    },
    #[error(
        "the kernel refused the page at {host_addr:#x} (memory file offset {offset:#x}): {source}"
    )]
    Install {
        host_addr: u64,
        offset: u64,
        source: userfaultfd::Error,
    },
}

/// Reads of a page that fail are tried this many times in all (a transient I/O error on
/// the snapshot's disk should not stop the VM; a truncated file does after these).
const READ_ATTEMPTS: u32 = 3;

/// Installs one page at `host` (from `src`, or zeroes) and wakes whoever waits on it.
/// `offset` (the page's place in the memory file) is for the error.
pub fn install_page(
    uffd: &Uffd,
    host: u64,
    offset: u64,
    src: Option<&[u8]>,
) -> Result<Installed, FaultError> {
    let dst = host as *mut libc::c_void;
    let mut again = true;
    loop {
        let result = match src {
            Some(bytes) => {
                assert_eq!(bytes.len(), PAGE_SIZE, "install_page takes one page");
                // SAFETY: `host` is a page of registered guest memory that stays mapped for
                // the life of the process (the fault loop only hands out such pages); `bytes`
                // holds one page.
                unsafe { uffd.copy(bytes.as_ptr().cast(), dst, PAGE_SIZE, true) }
            }
            // SAFETY: as above, without a source buffer.
            None => unsafe { uffd.zeropage(dst, PAGE_SIZE, true) },
        };
        return match result {
            Ok(_) => Ok(Installed::Now),
            Err(
                userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno),
            ) if errno as i32 == libc::EEXIST => {
                let _ = uffd.wake(dst, PAGE_SIZE);
                Ok(Installed::AlreadyThere)
            }
            // The address space changed under the copy: once more. (The userfaultfd crate
            // reports a copy's EAGAIN as a partial copy of the negative count.)
            Err(
                userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno),
            ) if errno as i32 == libc::EAGAIN && again => {
                again = false;
                continue;
            }
            Err(userfaultfd::Error::PartiallyCopied(_)) if again => {
                again = false;
                continue;
            }
            Err(source) => Err(FaultError::Install {
                host_addr: host,
                offset,
                source,
            }),
        };
    }
}

/// What fills faulting pages.
pub trait PageSource: Send + 'static {
    /// Puts the faulting page in; an error stops the VM.
    fn serve(&mut self, uffd: &Uffd, fault: PageFault) -> Result<Installed, FaultError>;

    /// An event of the source's own that the loop also waits on (None: nothing to wait for).
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }

    /// `wake_fd` became readable.
    fn on_wake(&mut self) {}

    /// The loop ends for good for this reason (not when told to stop): later faults will
    /// never be served.
    fn on_loop_failed(&mut self, why: &str) {
        log::error!("page fault handler stops: {why}");
    }
}

/// Counters of faults served from the memory file.
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

/// Fills each faulting page from the memory file: that page alone (the paper's lazy
/// baseline), or with fault-around the aligned block of guest memory around it.
pub struct FileSource {
    file: Arc<File>,
    path: PathBuf,
    stats: Arc<FaultStats>,
    /// One page, or one block with fault-around.
    buf: Vec<u8>,
    around: Option<FaultAround>,
}

/// Pages that must not be filled from the memory file by fault-around (the WS's, which
/// come from the WS), by memory-file offset.
pub type KeepOut = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Serving a fault with the aligned block of guest memory around it, as the kernel's own
/// fault-around does for a mapped file: one read and one UFFDIO_COPY for many pages where the
/// guest touches neighbours, at the price of pages it may never touch.
struct FaultAround {
    /// The block's size in pages (a power of two).
    pages: u64,
    /// Where each region begins and ends: a block never crosses one.
    regions: Arc<UffdRegions>,
    keep_out: Option<KeepOut>,
}

/// The largest fault-around block: 2 MiB, a huge page.
pub const MAX_FAULT_AROUND_KIB: u32 = 2048;

/// `fault_around_kib` checked: 0 (one page per fault) or a power of two from one page
/// (4 KiB) to [`MAX_FAULT_AROUND_KIB`]; the block in pages.
pub fn fault_around_pages(kib: u32) -> Result<u64, String> {
    let page_kib = (PAGE_SIZE / 1024) as u32;
    if kib == 0 {
        return Ok(1);
    }
    if !kib.is_power_of_two() || !(page_kib..=MAX_FAULT_AROUND_KIB).contains(&kib) {
        return Err(format!(
            "fault_around_kib is {kib}: it must be 0 (one page per fault) or a power of two from {page_kib} to {MAX_FAULT_AROUND_KIB}"
        ));
    }
    Ok(u64::from(kib / page_kib))
}

impl FileSource {
    /// `path` is `file`'s, for errors. Serves one page per fault.
    pub fn new(file: Arc<File>, path: PathBuf) -> Self {
        Self {
            file,
            path,
            stats: Arc::new(FaultStats::default()),
            buf: vec![0u8; PAGE_SIZE],
            around: None,
        }
    }

    /// Serves each fault with the aligned block of `pages` pages around it (clipped to its
    /// region); 1 page is no fault-around.
    pub fn with_fault_around(mut self, pages: u64, regions: Arc<UffdRegions>) -> Self {
        if pages <= 1 {
            self.around = None;
            self.buf = vec![0u8; PAGE_SIZE];
            return self;
        }
        self.buf = vec![0u8; pages as usize * PAGE_SIZE];
        self.around = Some(FaultAround {
            pages,
            regions,
            keep_out: None,
        });
        self
    }

    /// Fault-around leaves out the pages for which `keep_out` holds (and what lies beyond
    /// them): the faulting page's neighbours up to the first such page on each side.
    pub fn keeping_out(mut self, keep_out: KeepOut) -> Self {
        if let Some(around) = &mut self.around {
            around.keep_out = Some(keep_out);
        }
        self
    }

    /// One page per fault, whatever this source was set up with (a recording must see
    /// every first touch).
    pub fn one_page_per_fault(self) -> Self {
        Self {
            buf: vec![0u8; PAGE_SIZE],
            around: None,
            ..self
        }
    }

    /// Reads `len` bytes at `offset` into the buffer, trying again a few times.
    fn read(&mut self, offset: u64, len: usize) -> Result<(), FaultError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.file.read_exact_at(&mut self.buf[..len], offset) {
                Ok(()) => return Ok(()),
                Err(source) if attempts >= READ_ATTEMPTS => {
                    return Err(FaultError::Read {
                        path: self.path.clone(),
                        offset,
                        attempts,
                        source,
                    })
                }
                Err(e) => {
                    log::warn!(
                        "reading the page at offset {offset:#x} of {} failed ({e}); trying again",
                        self.path.display()
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10 * u64::from(attempts)));
                }
            }
        }
    }

    pub fn stats(&self) -> Arc<FaultStats> {
        self.stats.clone()
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

impl FileSource {
    /// The block fault-around fills for `fault`: (host address, memory-file offset, pages),
    /// the faulting page included.
    fn block_around(&self, fault: &PageFault) -> (u64, u64, u64) {
        let page = PAGE_SIZE as u64;
        let Some(around) = &self.around else {
            return (fault.host_addr, fault.offset, 1);
        };
        let Some(region) = around.regions.mapping_of(fault.host_addr) else {
            return (fault.host_addr, fault.offset, 1);
        };
        // Aligned in guest-physical terms: a region starts on a block boundary of the guest.
        let into = (fault.host_addr - region.base_host_virt_addr) / page;
        let region_pages = region.size as u64 / page;
        let mut first = into & !(around.pages - 1);
        let mut end = (first + around.pages).min(region_pages);
        if let Some(keep_out) = &around.keep_out {
            let offset_of = |p: u64| region.offset + p * page;
            if let Some(last_out) = (first..into).rev().find(|&p| keep_out(offset_of(p))) {
                first = last_out + 1;
            }
            if let Some(next_out) = (into + 1..end).find(|&p| keep_out(offset_of(p))) {
                end = next_out;
            }
        }
        (
            region.base_host_virt_addr + first * page,
            region.offset + first * page,
            end - first,
        )
    }
}

impl PageSource for FileSource {
    fn serve(&mut self, uffd: &Uffd, fault: PageFault) -> Result<Installed, FaultError> {
        let (host, offset, pages) = self.block_around(&fault);
        let len = pages as usize * PAGE_SIZE;
        self.read(offset, len)?;
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        if pages == 1 {
            return install_page(uffd, fault.host_addr, fault.offset, Some(&self.buf));
        }
        // The whole block in one copy, waking its waiters: the common case.
        // SAFETY: the block lies inside one registered region of guest memory, which stays
        // mapped while the fault loop runs; the buffer holds `len` bytes.
        let copied = unsafe {
            uffd.copy(
                self.buf.as_ptr().cast(),
                host as *mut libc::c_void,
                len,
                true,
            )
        };
        if matches!(copied, Ok(n) if n == len) {
            return Ok(Installed::Now);
        }
        // Some page of the block was there already: the rest around it, then the faulting
        // page on its own so that it is served (or its failure stops the VM) exactly as
        // without fault-around.
        // SAFETY: as above.
        unsafe { install_range(uffd, host, Some(self.buf.as_ptr()), len) };
        let at = (fault.host_addr - host) as usize;
        let installed = install_page(
            uffd,
            fault.host_addr,
            fault.offset,
            Some(&self.buf[at..at + PAGE_SIZE]),
        );
        let _ = uffd.wake(host as *mut libc::c_void, len);
        installed
    }
}

/// Installs `len` bytes at `host` (from `src`, or zeroes) without waking, skipping pages
/// already present; returns the pages this call installed.
///
/// # Safety
/// `[host, host + len)` must be registered guest memory that outlives the call, and `src`
/// (if given) must hold `len` readable bytes.
pub unsafe fn install_range(uffd: &Uffd, host: u64, src: Option<*const u8>, len: usize) -> u64 {
    let mut done = 0usize;
    let mut installed = 0u64;
    // After a failure, one page at a time until the page in the way is skipped.
    let mut single_page = false;
    while done < len {
        let step = if single_page { PAGE_SIZE } else { len - done };
        let dst = (host + done as u64) as *mut libc::c_void;
        // SAFETY: within the caller's range and source, per the contract above.
        let result = unsafe {
            match src {
                Some(p) => uffd.copy(p.add(done).cast(), dst, step, false),
                None => uffd.zeropage(dst, step, false),
            }
        };
        let progress = match result {
            Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) => n,
            Err(userfaultfd::Error::CopyFailed(_) | userfaultfd::Error::ZeropageFailed(_)) => 0,
            Err(e) => {
                log::warn!("installing at {dst:p} failed: {e}");
                0
            }
        };
        // The count comes from the kernel: never trust it past the step.
        if progress > 0 && progress <= step && progress % PAGE_SIZE == 0 {
            installed += (progress / PAGE_SIZE) as u64;
            done += progress;
            single_page = false;
        } else if single_page {
            // This page is there already (a fault got it first) or cannot be installed:
            // skip it, then go back to whole-run copies.
            done += PAGE_SIZE;
            single_page = false;
        } else {
            single_page = true;
        }
    }
    installed
}

/// Serves the page faults of one userfaultfd from one source, on a thread of its own, until
/// the restore's stop event fires. A page it cannot serve, or its own failure, stops the VM
/// through `exit` (the guest never runs on without the page, or with another one).
pub struct FaultLoop<S: PageSource> {
    uffd: Arc<Uffd>,
    regions: Arc<UffdRegions>,
    stop: Arc<HandlerStop>,
    exit: Option<Arc<ExitSignal>>,
    /// The VM was told to stop (once is enough).
    stopping: bool,
    source: S,
}

/// How long the VMM may take to stop after a page could not be served before this process
/// exits by itself: a VMM thread (not a vCPU) waiting on that page cannot be kicked out.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl<S: PageSource> FaultLoop<S> {
    /// `exit` is the VM's (None where there is no VM, as in unit tests: then only logged).
    pub fn new(
        uffd: Arc<Uffd>,
        regions: Arc<UffdRegions>,
        stop: Arc<HandlerStop>,
        exit: Option<Arc<ExitSignal>>,
        source: S,
    ) -> Self {
        Self {
            uffd,
            regions,
            stop,
            exit,
            stopping: false,
            source,
        }
    }

    /// Stops the VM for `why`; if the VMM has not exited after STOP_GRACE, exits it.
    fn stop_vm(&mut self, why: String) {
        log::error!("stopping the VM: {why}");
        let Some(exit) = &self.exit else {
            return;
        };
        if std::mem::replace(&mut self.stopping, true) {
            return;
        }
        exit.report(VmExitReason::GuestMemory(why.clone()));
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name("fc_uffd_stop".into())
            .spawn(move || {
                // The VM stopping drops the handlers, which says the VMM is on its way out.
                let deadline = std::time::Instant::now() + STOP_GRACE;
                while std::time::Instant::now() < deadline {
                    if stop.is_stopped() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                log::error!("the VMM did not stop within {STOP_GRACE:?} of: {why}; exiting");
                crate::metrics::flush_if_configured();
                eprintln!("reapvm: error: the VM stopped: guest memory: {why}");
                std::process::exit(1);
            });
        if let Err(e) = spawned {
            log::error!("cannot start the stop watchdog: {e}");
        }
    }

    /// Runs the loop on a thread named `name`, joined when its `HandlerStop` is dropped.
    pub fn spawn(self, name: &'static str) -> Result<(), UffdError> {
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || self.run())
            .map_err(|source| UffdError::Thread { name, source })?;
        stop.track(thread);
        Ok(())
    }

    fn run(mut self) {
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Uffd) {
            self.stop_vm(e.to_string());
            return;
        }
        if let Err(why) = self.serve_until_stopped() {
            self.source.on_loop_failed(&why);
            self.stop_vm(format!("the page fault handler stopped: {why}"));
        }
    }

    /// Ok when told to stop; Err with the reason when the loop cannot go on.
    fn serve_until_stopped(&mut self) -> Result<(), String> {
        loop {
            let wake_fd = self.source.wake_fd();
            let mut fds =
                [self.uffd.as_raw_fd(), self.stop.fd(), wake_fd.unwrap_or(-1)].map(|fd| {
                    libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    }
                });
            let nfds = if wake_fd.is_some() { 3 } else { 2 };
            // SAFETY: `fds` holds `nfds` valid pollfd entries for descriptors kept open by
            // this loop (the userfaultfd, the stop event) and its source (its own event).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds as libc::nfds_t, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll failed: {e}"));
            }
            if fds[1].revents & libc::POLLIN != 0 {
                // The restore failed or the VM is gone.
                return Ok(());
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err("the userfaultfd reports an error".into());
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.drain_events()?;
            }
            if nfds == 3 && fds[2].revents & libc::POLLIN != 0 {
                self.source.on_wake();
            }
        }
    }

    /// Serves every event waiting on the userfaultfd.
    fn drain_events(&mut self) -> Result<(), String> {
        loop {
            match self.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, rw, .. })) => {
                    let host = addr as u64;
                    let Some(offset) = self.regions.offset_of(host) else {
                        // Nothing can serve it: whoever faulted would wait forever.
                        self.stop_vm(format!("a page fault at {host:#x}, outside guest memory"));
                        continue;
                    };
                    let fault = PageFault {
                        host_addr: host & !(PAGE_SIZE as u64 - 1),
                        offset,
                        write: matches!(rw, ReadWrite::Write),
                    };
                    if let Err(e) = self.source.serve(&self.uffd, fault) {
                        // The page stays missing: whoever waits on it waits until the VM
                        // stops (vCPUs are kicked out; the watchdog ends the rest).
                        self.stop_vm(e.to_string());
                    }
                }
                // Registered without fork/remap/remove events: none of those arrive.
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
