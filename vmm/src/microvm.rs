//! A running microVM: its vCPU threads and the event loop that serves devices until the
//! guest resets or a vCPU fails.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::GuestMemoryMmap;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use devices::legacy::{I8042Device, SerialDevice};
use devices::virtio::VirtioDevice;

use crate::config::VmConfig;
use crate::device_manager::AttachedDevice;
use crate::persist::SnapshotSource;
use crate::reap::{Recorder, RecordingState};
use crate::vcpu::{ExitSignal, PauseError, VcpuGroup, VmExitReason};
use crate::vm::Vm;

/// How long a pause (or a snapshot's vCPU state save) waits for every vCPU to leave KVM_RUN.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pauses and resumes a running VM: vCPUs first, then devices (and the reverse on resume),
/// so nothing touches guest memory while paused.
pub struct PauseHandle {
    vcpus: Arc<VcpuGroup>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    ws_recorder: Option<Arc<Recorder>>,
}

impl PauseHandle {
    pub fn pause(&self) -> Result<(), PauseError> {
        if let Err(e) = self.vcpus.pause(PAUSE_TIMEOUT) {
            // Do not leave some vCPUs parked and others running.
            let _ = self.vcpus.resume();
            return Err(e);
        }
        for device in &self.devices {
            device.lock().unwrap_or_else(|p| p.into_inner()).pause();
        }
        self.finish_ws_recording("the VM was paused");
        Ok(())
    }

    /// Ends a REAP recording, if one is going on; false if there is none.
    pub fn finish_ws_recording(&self, why: &str) -> bool {
        match &self.ws_recorder {
            Some(recorder) => {
                recorder.stop(why);
                true
            }
            None => false,
        }
    }

    pub fn resume(&self) -> Result<(), PauseError> {
        if !self.vcpus.is_paused() {
            return Err(PauseError::NotPaused);
        }
        for device in &self.devices {
            device.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
        self.vcpus.resume()
    }

    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }
}

/// How long a stopping VM waits for its REAP working set to be written.
const WS_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the event loop: {0}")]
    EventManager(event_manager::Error),
    #[error("event loop failed: {0}")]
    Loop(event_manager::Error),
    #[error("cannot duplicate the reset event: {0}")]
    CloneEventFd(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Turns the i8042 reset line and the vCPUs' exit reports into the end of the event loop.
struct ExitWatcher {
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit.event_fd().as_raw_fd(), self.reset_evt.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch the VM exit events: {e}");
                self.done.store(true, Ordering::Release);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            log::info!("the guest reset the CPU through the i8042 controller");
            self.exit.report(VmExitReason::GuestReset);
        } else {
            let _ = self.exit.event_fd().read();
        }
        self.done.store(true, Ordering::Release);
    }
}

pub struct MicroVm {
    // Field order is drop order: vCPU threads are joined in `run` before KVM state and guest
    // memory go away.
    pub(crate) vcpus: Arc<VcpuGroup>,
    /// A restore's userfaultfd handler threads, ended and joined with the VM: after the
    /// vCPUs (which may wait on them), before the guest memory (which they write into).
    pub(crate) _memory_handlers: Option<crate::uffd::StopHandlersOnDrop>,
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) reset_evt: EventFd,
    pub(crate) i8042: Arc<Mutex<I8042Device>>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    pub(crate) attached: Vec<AttachedDevice>,
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) config: VmConfig,
    pub(crate) cpu_vendor: String,
    pub(crate) vm: Arc<Vm>,
    pub(crate) guest_memory: GuestMemoryMmap,
    /// A REAP restore recording its working set.
    pub(crate) ws_recorder: Option<Arc<Recorder>>,
    pub(crate) _kvm: Kvm,
}

impl MicroVm {
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// What takes snapshots of this VM from the event loop.
    pub fn snapshot_source(&self) -> SnapshotSource {
        SnapshotSource {
            vm: self.vm.clone(),
            mem: self.guest_memory.clone(),
            vcpus: self.vcpus.clone(),
            serial: self.serial.clone(),
            i8042: self.i8042.clone(),
            attached: self.attached.clone(),
            config: self.config.clone(),
            cpu_vendor: self.cpu_vendor.clone(),
            ws_recorder: self.ws_recorder.clone(),
            dirty_log_lost: AtomicBool::new(false),
        }
    }

    /// The keyboard controller, for injecting Ctrl-Alt-Del.
    pub fn i8042(&self) -> Arc<Mutex<I8042Device>> {
        self.i8042.clone()
    }

    /// Adds an event-loop subscriber (e.g. the API) before `run`.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.subscribers.push(subscriber);
    }

    /// Serves devices until the VM stops, then stops and joins every vCPU thread.
    pub fn run(mut self) -> Result<VmExitReason, RunError> {
        let done = Arc::new(AtomicBool::new(false));
        let mut event_manager =
            EventManager::<Subscriber>::new().map_err(RunError::EventManager)?;
        let reset_evt = self.reset_evt.try_clone().map_err(RunError::CloneEventFd)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            exit: self.exit.clone(),
            reset_evt,
            done: done.clone(),
        })));
        for subscriber in self.subscribers.drain(..) {
            event_manager.add_subscriber(subscriber);
        }
        // The VM is built and its threads run: from here on the VMM thread only serves.
        crate::seccomp::apply(crate::seccomp::ThreadKind::Vmm)?;

        let result = loop {
            if done.load(Ordering::Acquire) {
                break Ok(());
            }
            if let Err(e) = event_manager.run() {
                break Err(RunError::Loop(e));
            }
        };
        self.stop_vcpus();
        let reason = self.exit.reason().unwrap_or(VmExitReason::Error(
            "the VM stopped without a reason".into(),
        ));
        if let Some(recorder) = &self.ws_recorder {
            if reason == VmExitReason::GuestReset {
                match recorder.finish("the VM stopped", WS_WRITE_TIMEOUT) {
                    RecordingState::Written { .. } | RecordingState::Failed(_) => {}
                    other => log::warn!("REAP: the WS file was not written in time ({other:?})"),
                }
            } else {
                // A run cut short by a fault is not the invocation's working set.
                recorder.abandon(&format!("the VM stopped: {reason}"));
            }
        }
        result?;
        Ok(reason)
    }

    fn stop_vcpus(&mut self) {
        self.vcpus.stop();
    }

    /// What pauses and resumes this VM (vCPUs and devices) from the event loop.
    pub fn pause_handle(&self) -> PauseHandle {
        PauseHandle {
            vcpus: self.vcpus.clone(),
            devices: self.devices.clone(),
            ws_recorder: self.ws_recorder.clone(),
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
