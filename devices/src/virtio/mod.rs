//! Virtio devices over the MMIO transport (virtio 1.x, MMIO version 2).

pub mod block;
pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

/// A virtio device's own state in a snapshot, whichever kind it is (its queues are its
/// transport's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioDeviceState {
    Block(block::BlockState),
    Net(net::NetState),
}

impl From<block::BlockState> for VirtioDeviceState {
    fn from(state: block::BlockState) -> Self {
        Self::Block(state)
    }
}

impl From<net::NetState> for VirtioDeviceState {
    fn from(state: net::NetState) -> Self {
        Self::Net(state)
    }
}

/// Feature bits every reapvm device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits of the MMIO transport.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt: the MMIO InterruptStatus register and the irqfd behind it.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the driver that used buffers are ready.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: cannot raise the interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a saved InterruptStatus without raising the line (a pending interrupt is in
    /// the restored interrupt controller state).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: std::sync::Arc<Interrupt>,
    pub queues: Vec<Queue>,
    /// One notification event per queue (ioeventfd on QueueNotify), in queue order.
    pub queue_evts: Vec<EventFd>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver configured {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("cannot hand the queues to the event loop: {0}")]
    Event(std::io::Error),
    #[error("device backend: {0}")]
    Backend(String),
}

/// A virtio device behind an [`MmioTransport`].
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn offered_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called once the driver set DRIVER_OK: start serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving and forget the queues.
    fn reset(&mut self);
    /// The VM is paused: touch neither the queues nor guest memory until `resume`.
    fn pause(&mut self);
    /// Serve again, including whatever arrived while paused.
    fn resume(&mut self);
    /// The live state of the queues the device serves (None before activation): what a
    /// snapshot must carry, ring positions included.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>>;
}
