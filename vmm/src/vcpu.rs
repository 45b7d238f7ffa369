//! vCPUs: boot configuration, and one thread each running KVM_RUN and routing its exits to
//! the buses until the VM stops.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{I8042_PORT, I8042_PORT_LEN};
use devices::Bus;
use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::cpuid::{self, Topology};
use crate::arch::{lapic, msr, regs};
use crate::vstate::{self, VcpuState};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {index} failed: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_CPUID2 on vCPU {index} failed: {source}")]
    SetCpuid {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index} MSRs: {source}")]
    Msrs { index: u8, source: msr::MsrError },
    #[error("vCPU {index} registers: {source}")]
    Regs { index: u8, source: regs::RegsError },
    #[error("vCPU {index} local APIC: {source}")]
    Lapic {
        index: u8,
        source: lapic::LapicError,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
}

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest reset or powered off the machine (i8042 reset line, or a KVM reset or
    /// shutdown system event): a normal end, exit code 0.
    GuestReset,
    /// A vCPU left KVM_RUN with KVM_EXIT_SHUTDOWN (or HLT): the guest shut the machine down
    /// without a reset line, as a triple fault does. Exit code 0, as Firecracker's; the
    /// metrics count it (`vcpu.exit_shutdown`) so it can be told from a reset.
    GuestShutdown { vcpu: u8, place: GuestPlace },
    /// A vCPU met something it cannot continue from.
    Vcpu(VcpuRunError),
    /// A page of guest memory could not be served (its memory file could not be read, the
    /// kernel refused the page, the fault handler died): the guest must not run on with a
    /// page that is not what the snapshot had.
    GuestMemory(String),
    /// Any other part of the VMM stopped the VM.
    Error(String),
}

impl std::fmt::Display for VmExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestReset => write!(f, "the guest reset the machine"),
            Self::GuestShutdown { vcpu, place } => {
                write!(f, "vCPU {vcpu}: the guest shut the machine down{place}")
            }
            Self::Vcpu(e) => write!(f, "{e}"),
            Self::GuestMemory(why) => write!(f, "guest memory: {why}"),
            Self::Error(e) => write!(f, "{e}"),
        }
    }
}

/// Where a vCPU was when the guest shut the machine down (to trace an unexpected triple
/// fault), if its registers could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestPlace(Option<[u64; 6]>);

impl std::fmt::Display for GuestPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some([rip, rsp, cr0, cr2, cr3, cr4]) => write!(
                f,
                " (rip {rip:#x} rsp {rsp:#x} cr0 {cr0:#x} cr2 {cr2:#x} cr3 {cr3:#x} cr4 {cr4:#x})"
            ),
            None => Ok(()),
        }
    }
}

/// Why a vCPU could not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuRunError {
    #[error(
        "vCPU {vcpu}: KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on CPU {cpu}"
    )]
    FailEntry { vcpu: u8, reason: u64, cpu: u32 },
    #[error("vCPU {vcpu}: KVM_EXIT_INTERNAL_ERROR (suberror {suberror}): KVM could not emulate the guest's instruction")]
    InternalError { vcpu: u8, suberror: u32 },
    #[error("vCPU {vcpu}: unexpected system event {kind}")]
    SystemEvent { vcpu: u8, kind: u32 },
    #[error("vCPU {vcpu}: unhandled KVM exit {exit}")]
    UnhandledExit { vcpu: u8, exit: String },
    #[error("vCPU {vcpu}: KVM_RUN failed: {source}")]
    Run { vcpu: u8, source: kvm_ioctls::Error },
}

/// Collects the first reason any part of the VM gives for stopping and wakes the event loop.
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<VmExitReason>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    pub fn report(&self, reason: VmExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the event loop for a VM exit: {e}");
        }
    }

    pub fn reason(&self) -> Option<VmExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio_bus: Bus,
    mmio_bus: Bus,
    /// The i8042's CPU reset line (an event fd the controller raises): a vCPU that raised
    /// it stops at once, as a reset CPU would, instead of running on into the guest's
    /// fallbacks (with `reboot=k` Linux tries a triple fault next, which is no fault).
    reset_line: Option<EventFd>,
    /// The MSRs a saved state of this vCPU carries.
    msrs_to_save: Arc<Vec<u32>>,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8, pio_bus: Bus, mmio_bus: Bus) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            pio_bus,
            mmio_bus,
            reset_line: None,
            msrs_to_save: Arc::new(Vec::new()),
        })
    }

    /// Gives the vCPU the i8042's reset line (see `reset_line`).
    pub fn set_reset_line(&mut self, line: EventFd) {
        self.reset_line = Some(line);
    }

    /// Whether the reset line has been raised (looked at without consuming it: the event
    /// loop reads it to end the VM).
    fn reset_raised(&self) -> bool {
        let Some(line) = &self.reset_line else {
            return false;
        };
        let mut fd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(line),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for an event fd this vCPU owns; a zero timeout.
        let rc = unsafe { libc::poll(&mut fd, 1, 0) };
        rc > 0 && fd.revents & libc::POLLIN != 0
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Puts back a saved KVM state (instead of `configure_for_boot`).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), vstate::VcpuStateError> {
        state.restore(&self.fd)
    }

    /// Which MSRs this vCPU's saved state carries (see `vstate::vcpu_state::msrs_to_save`).
    pub fn set_msrs_to_save(&mut self, msrs: Arc<Vec<u32>>) {
        self.msrs_to_save = msrs;
    }

    /// Sets CPUID, boot MSRs, registers for the 64-bit entry at `entry`, FPU and LAPIC LINTs,
    /// in this order (CPUID first: KVM checks MSRs and XSAVE state against it).
    pub fn configure_for_boot(
        &self,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        topology: Topology,
        tsc_deadline: bool,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let mut cpuid = supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, topology, tsc_deadline);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::SetCpuid { index, source })?;
        msr::set_boot_msrs(&self.fd).map_err(|source| VcpuError::Msrs { index, source })?;
        let regs_err = |source| VcpuError::Regs { index, source };
        regs::setup_regs(&self.fd, entry).map_err(regs_err)?;
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        regs::setup_sregs(mem, &self.fd).map_err(regs_err)?;
        lapic::set_lint(&self.fd).map_err(|source| VcpuError::Lapic { index, source })
    }

    /// Starts the vCPU's thread. It runs, pauses and stops as `control` says (the thread is
    /// kicked out of KVM_RUN to notice), or until the VM stops (reported to `exit`).
    pub fn start(
        self,
        control: Arc<RunControl>,
        exit: Arc<ExitSignal>,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        control.thread_started();
        let thread_control = control.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("fc_vcpu {index}"))
            .spawn(move || {
                self.run(&thread_control, &exit);
                thread_control.thread_exited();
            });
        match spawned {
            Ok(thread) => Ok(VcpuHandle { thread }),
            Err(source) => {
                control.thread_exited();
                Err(VcpuError::Spawn { index, source })
            }
        }
    }

    fn run(mut self, control: &RunControl, exit: &ExitSignal) {
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
            exit.report(VmExitReason::Error(format!("vCPU {}: {e}", self.index)));
            return;
        }
        KVM_RUN.with(|ptr| ptr.set(self.fd.get_kvm_run() as *mut kvm_run));
        while control.wait_until_runnable(&mut self) {
            match self.run_once() {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    exit.report(reason);
                    break;
                }
                Err(e) => {
                    crate::metrics::metrics().vcpu.failures.inc();
                    exit.report(VmExitReason::Vcpu(e));
                    break;
                }
            }
        }
        KVM_RUN.with(|ptr| ptr.set(std::ptr::null_mut()));
    }

    /// One KVM_RUN and the handling of its exit; Some(reason) when the VM must stop.
    fn run_once(&mut self) -> Result<Option<VmExitReason>, VcpuRunError> {
        let vcpu = self.index;
        let counts = &crate::metrics::metrics().vcpu;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                counts.exit_io_in.inc();
                if !self.pio_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Ok(None)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                counts.exit_io_out.inc();
                self.pio_bus.write(u64::from(port), data);
                let i8042 = I8042_PORT..I8042_PORT + I8042_PORT_LEN;
                if i8042.contains(&u64::from(port)) && self.reset_raised() {
                    return Ok(Some(VmExitReason::GuestReset));
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                counts.exit_mmio_read.inc();
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                counts.exit_mmio_write.inc();
                self.mmio_bus.write(addr, data);
                Ok(None)
            }
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Hlt) => {
                counts.exit_shutdown.inc();
                let place = match (self.fd.get_regs(), self.fd.get_sregs()) {
                    (Ok(r), Ok(s)) => GuestPlace(Some([r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4])),
                    _ => GuestPlace(None),
                };
                let reason = VmExitReason::GuestShutdown { vcpu, place };
                log::info!("{reason}");
                Ok(Some(reason))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET | kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Ok(Some(VmExitReason::GuestReset))
                }
                kind => Err(VcpuRunError::SystemEvent { vcpu, kind }),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Err(VcpuRunError::FailEntry { vcpu, reason, cpu })
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Err(VcpuRunError::InternalError { vcpu, suberror })
            }
            Ok(other) => Err(VcpuRunError::UnhandledExit {
                vcpu,
                exit: format!("{other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Ok(None)
            }
            Err(source) => Err(VcpuRunError::Run { vcpu, source }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct RunState {
    desired: Desired,
    /// vCPU threads alive, and how many of them are parked in the paused state.
    live: usize,
    parked: usize,
    /// Bumped to ask parked vCPUs for their state; each answers in `saved[index]`.
    save_generation: u64,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// Tells the vCPU threads whether to run, pause or stop, and lets the VMM wait until they
/// have all paused.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<RunState>,
    changed: Condvar,
    /// True while the desired state is not Run: lets the vCPU loop skip the lock on every
    /// exit. Set before the kick, so a vCPU that missed it is caught by immediate_exit.
    attention: AtomicBool,
}

impl Default for RunControl {
    fn default() -> Self {
        Self::new()
    }
}

impl RunControl {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(RunState {
                desired: Desired::Run,
                live: 0,
                parked: 0,
                save_generation: 0,
                saved: Vec::new(),
            }),
            changed: Condvar::new(),
            attention: AtomicBool::new(false),
        }
    }

    /// vCPUs that park as soon as they start (a restored VM loaded with `resume_vm: false`).
    pub fn new_paused() -> Self {
        let control = Self::new();
        control.set(Desired::Pause);
        control
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn thread_started(&self) {
        self.lock().live += 1;
    }

    fn thread_exited(&self) {
        self.lock().live -= 1;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between KVM_RUNs: parks while paused; false when it must stop.
    /// `vcpu` is the calling thread's vCPU: before parking it finishes the exit it served
    /// (so its registers are those of the next instruction), and while parked it answers
    /// state-save requests.
    fn wait_until_runnable(&self, vcpu: &mut Vcpu) -> bool {
        if !self.attention.load(Ordering::Acquire) {
            return true;
        }
        let mut state = self.lock();
        let mut parked = false;
        let mut answered_generation = state.save_generation;
        loop {
            match state.desired {
                Desired::Run => break,
                Desired::Stop => break,
                Desired::Pause if !parked => {
                    drop(state);
                    if let Err(e) = vstate::complete_pending_io(&mut vcpu.fd) {
                        log::warn!("vCPU {}: {e}", vcpu.index);
                    }
                    state = self.lock();
                    parked = true;
                    state.parked += 1;
                    self.changed.notify_all();
                }
                Desired::Pause if state.save_generation != answered_generation => {
                    answered_generation = state.save_generation;
                    drop(state);
                    let saved =
                        VcpuState::save(&vcpu.fd, &vcpu.msrs_to_save).map_err(|e| e.to_string());
                    state = self.lock();
                    if let Some(slot) = state.saved.get_mut(usize::from(vcpu.index)) {
                        *slot = Some(saved);
                    }
                    self.changed.notify_all();
                }
                Desired::Pause => {
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
        if parked {
            state.parked -= 1;
        }
        state.desired == Desired::Run
    }

    fn set(&self, desired: Desired) {
        let mut state = self.lock();
        state.desired = desired;
        self.attention
            .store(desired != Desired::Run, Ordering::Release);
        drop(state);
        self.changed.notify_all();
    }

    /// Waits until every live vCPU thread is parked; false on timeout.
    fn wait_all_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.parked < state.live {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    pub fn is_paused(&self) -> bool {
        self.lock().desired == Desired::Pause
    }

    /// Asks every parked vCPU for its KVM state and waits for all `count` answers.
    fn collect_states(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, PauseError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        if state.desired != Desired::Pause || state.parked < state.live {
            return Err(PauseError::NotPaused);
        }
        state.saved = (0..count).map(|_| None).collect();
        state.save_generation += 1;
        self.changed.notify_all();
        while state.saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PauseError::Timeout(timeout));
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut states = Vec::with_capacity(count);
        for (index, slot) in state.saved.drain(..).enumerate() {
            match slot.expect("all answered") {
                Ok(s) => states.push(s),
                Err(reason) => return Err(PauseError::Save { index, reason }),
            }
        }
        Ok(states)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the vCPUs did not pause within {0:?}")]
    Timeout(Duration),
    #[error("the microVM is not paused")]
    NotPaused,
    #[error("cannot save the state of vCPU {index}: {reason}")]
    Save { index: usize, reason: String },
}

/// The vCPU threads of one VM, shared by the event loop and the API.
pub struct VcpuGroup {
    control: Arc<RunControl>,
    handles: Mutex<Vec<VcpuHandle>>,
}

impl VcpuGroup {
    pub fn new(control: Arc<RunControl>) -> Self {
        Self {
            control,
            handles: Mutex::new(Vec::new()),
        }
    }

    pub fn push(&self, handle: VcpuHandle) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    fn kick_all(&self) {
        for handle in self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            handle.kick();
        }
    }

    /// Stops every vCPU between two KVM_RUNs. An exit in flight is handled first (the thread
    /// finishes the exit it is serving before it looks at the request); the kick makes a
    /// running KVM_RUN return at once.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        self.control.set(Desired::Pause);
        self.kick_all();
        if self.control.wait_all_parked(timeout) {
            Ok(())
        } else {
            Err(PauseError::Timeout(timeout))
        }
    }

    pub fn resume(&self) -> Result<(), PauseError> {
        if !self.control.is_paused() {
            return Err(PauseError::NotPaused);
        }
        self.control.set(Desired::Run);
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// The KVM state of every vCPU, in index order; the VM must be paused.
    pub fn save_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, PauseError> {
        let count = self.handles.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.control.collect_states(count, timeout)
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&self) {
        self.control.set(Desired::Stop);
        self.kick_all();
        let handles: Vec<VcpuHandle> = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for handle in handles {
            handle.join();
        }
    }
}

pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts KVM_RUN so that the thread sees a pause or stop request.
    pub fn kick(&self) {
        if self.thread.is_finished() {
            return;
        }
        if let Err(e) = self.thread.kill(kick_signal()) {
            log::warn!("cannot signal a vCPU thread: {e}");
        }
    }

    pub fn join(self) {
        if self.thread.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

thread_local! {
    /// The running vCPU's kvm_run page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit makes a KVM_RUN that is about to start return EINTR at once, so a
    // kick that lands between the run-state check and KVM_RUN is not lost.
    KVM_RUN.with(|ptr| {
        let run = ptr.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its vCPU's kvm_run mapping and reset
            // to null before the mapping can go away; a signal handler runs on this thread.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result =
            register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler);
    });
    result
}

/// These run on this host's own /dev/kvm (no Linux guest needed) and fail when it is absent.
#[cfg(test)]
mod kvm_tests {
    use super::*;
    use crate::arch::layout::{HIMEM_START, ZERO_PAGE_START};
    use crate::memory::create_guest_memory;
    use crate::vm::Vm;
    use kvm_ioctls::Kvm;
    use vm_memory::{Bytes, GuestAddress};

    fn boot_vcpu(code: &[u8]) -> (Kvm, Vm, GuestMemoryMmap, Vcpu) {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let vm = Vm::new(&kvm).unwrap();
        let mem = create_guest_memory(64 << 20).unwrap();
        vm.register_memory(&mem, false).unwrap();
        mem.write_slice(code, GuestAddress(HIMEM_START)).unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let vcpu = Vcpu::new(vm.fd(), 0, Bus::new(), Bus::new()).unwrap();
        let topo = Topology {
            cpu_index: 0,
            vcpu_count: 1,
            threads_per_core: 1,
        };
        vcpu.configure_for_boot(&mem, &cpuid, topo, false, HIMEM_START)
            .unwrap();
        (kvm, vm, mem, vcpu)
    }

    #[test]
    fn boot_state_is_64_bit_long_mode() {
        let (_kvm, _vm, _mem, vcpu) = boot_vcpu(&[0xf4]);
        let sregs = vcpu.fd().get_sregs().unwrap();
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001, "PG and PE");
        assert_eq!(sregs.efer & 0x500, 0x500, "LME and LMA");
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
        let regs = vcpu.fd().get_regs().unwrap();
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (HIMEM_START, ZERO_PAGE_START, 0x8ff0)
        );
        // MXCSR is not compared: kvm-pvm hosts report it as 0 through KVM_GET_FPU.
        assert_eq!(vcpu.fd().get_fpu().unwrap().fcw, 0x37f);
    }

    /// A vCPU thread running a guest loop pauses, answers state requests while parked, and
    /// resumes where it stopped.
    #[test]
    fn running_vcpu_pauses_saves_and_resumes() {
        let code = [
            0x48, 0xff, 0xc0, // inc rax
            0xeb, 0xfb, // jmp back to the inc
        ];
        let (kvm, _vm, _mem, mut vcpu) = boot_vcpu(&code);
        let msrs = crate::vstate::vcpu_state::msrs_to_save(&kvm, vcpu.fd()).unwrap();
        vcpu.set_msrs_to_save(Arc::new(msrs));
        let control = Arc::new(RunControl::new());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let group = VcpuGroup::new(control.clone());
        group.push(vcpu.start(control, exit.clone()).unwrap());
        let count = |group: &VcpuGroup| {
            std::thread::sleep(Duration::from_millis(200));
            group.pause(Duration::from_secs(5)).expect("pause");
            let states = group.save_states(Duration::from_secs(5)).expect("save");
            states[0].regs.rax
        };
        let first = count(&group);
        assert!(first > 0, "the loop ran before the pause");
        let again = group.save_states(Duration::from_secs(5)).unwrap()[0]
            .regs
            .rax;
        assert_eq!(again, first, "nothing runs while paused");
        group.resume().unwrap();
        let second = count(&group);
        assert!(
            second > first,
            "the loop went on after resume ({first} -> {second})"
        );
        assert!(matches!(group.resume(), Ok(())));
        group.stop();
        assert_eq!(exit.reason(), None, "pausing is not an exit");
    }

    /// Runs real guest code in the boot state: a 64-bit load through RSI (zero page), a
    /// push/pop on the boot stack, and an OUT to the serial port that KVM hands back to us.
    #[test]
    fn guest_code_runs_in_the_boot_state() {
        let code = [
            0x48, 0x8b, 0x06, // mov rax, [rsi]
            0x50, // push rax
            0x5b, // pop rbx
            0x88, 0xd8, // mov al, bl
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xee, // out dx, al
            0xf4, // hlt
        ];
        let (_kvm, _vm, mem, mut vcpu) = boot_vcpu(&code);
        mem.write_obj(0x5au64, GuestAddress(ZERO_PAGE_START))
            .unwrap();
        match vcpu.fd.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, 0x3f8);
                assert_eq!(data, &[0x5a]);
            }
            other => panic!("expected the guest's OUT to 0x3f8, got {other:?}"),
        }
    }

    /// A guest that pulses the i8042's reset line stops its vCPU at once with a reset, as
    /// a reset CPU would: the triple fault after it (what `reboot=k` Linux tries next) is
    /// never reached, so a reboot is not counted as a guest shutdown.
    #[test]
    fn the_i8042_reset_line_stops_the_vcpu_with_a_reset() {
        let code = [
            0xb0, 0xfe, // mov al, 0xfe (pulse the CPU reset line)
            0xe6, 0x64, // out 0x64, al
            0x0f, 0x0b, // ud2: a triple fault, if the vCPU ran on
        ];
        let (_kvm, _vm, _mem, mut vcpu) = boot_vcpu(&code);
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i8042 = devices::legacy::I8042Device::new(
            devices::EventFdTrigger::new(line.try_clone().unwrap()),
            devices::EventFdTrigger::new(irq),
        );
        vcpu.pio_bus
            .insert(Arc::new(Mutex::new(i8042)), I8042_PORT, I8042_PORT_LEN)
            .unwrap();
        vcpu.set_reset_line(line.try_clone().unwrap());
        let reason = loop {
            match vcpu.run_once() {
                Ok(None) => continue,
                other => break other,
            }
        };
        assert!(
            matches!(reason, Ok(Some(VmExitReason::GuestReset))),
            "{reason:?}"
        );
        assert_eq!(
            line.read().unwrap(),
            1,
            "the event loop still sees the reset"
        );
    }

    /// A triple fault (an exception with no IDT to deliver it through) ends the VM with a
    /// typed guest shutdown, counted in the metrics, not with an error.
    #[test]
    fn a_triple_fault_is_a_guest_shutdown() {
        let code = [0x0f, 0x0b]; // ud2: #UD with an empty IDT, then #DF, then shutdown
        let (_kvm, _vm, _mem, mut vcpu) = boot_vcpu(&code);
        let before = crate::metrics::metrics().vcpu.exit_shutdown.total();
        match vcpu.run_once() {
            Ok(Some(VmExitReason::GuestShutdown { vcpu: 0, place })) => {
                assert!(place.to_string().contains("rip"), "{place}");
            }
            other => panic!("expected a guest shutdown, got {other:?}"),
        }
        assert!(crate::metrics::metrics().vcpu.exit_shutdown.total() > before);
    }
}
