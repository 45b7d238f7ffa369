//! Virtio devices over the MMIO transport (virtio 1.x, MMIO version 2).

pub mod block;
pub mod mmio;
pub mod net;
mod one_queue;
pub mod rng;
pub mod vsock;

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

/// A virtio device's own state in a snapshot, whichever kind it is (its queues are its
/// transport's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioDeviceState {
    Block(block::BlockState),
    Net(net::NetState),
    Rng(rng::RngState),
    Vsock(vsock::VsockState),
}

impl From<block::BlockState> for VirtioDeviceState {
    fn from(state: block::BlockState) -> Self {
        Self::Block(state)
    }
}

impl From<rng::RngState> for VirtioDeviceState {
    fn from(state: rng::RngState) -> Self {
        Self::Rng(state)
    }
}

impl From<vsock::VsockState> for VirtioDeviceState {
    fn from(state: vsock::VsockState) -> Self {
        Self::Vsock(state)
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
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

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

/// What a device signals its driver: the MMIO InterruptStatus register, the irqfd behind
/// it, and whether the device stopped serving until the driver resets it.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// The device met a driver error it cannot serve past: the transport reports
    /// DEVICE_NEEDS_RESET until the driver resets the device, and a configuration-change
    /// interrupt tells the driver (virtio 1.2, 2.1.2).
    pub fn device_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal(INT_CONFIG_CHANGE);
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The driver reset the device: no interrupt pending, nothing to report.
    pub fn clear(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
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

/// Why a device stopped serving a queue: its driver broke the ring's rules, and only a
/// reset brings the device back. virtio-queue's own pop only logs these and reports no
/// chain, while its notification check keeps saying there is one: a device that trusted
/// both would spin forever.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the driver's available index {avail} is {ahead} entries ahead of the device's {next}, more than the queue's {size}")]
    AvailAhead {
        avail: u16,
        next: u16,
        ahead: u16,
        size: u16,
    },
    #[error("cannot read the queue: {0}")]
    Access(#[from] virtio_queue::Error),
    #[error("the chain at available index {next} could not be read")]
    Pop { next: u16 },
}

/// The next chain the driver made available, none when there is none, or why the queue
/// cannot be served any more.
pub fn pop_checked<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, QueueError> {
    let avail = queue.avail_idx(mem, Ordering::Acquire)?;
    let next = queue.next_avail();
    let ahead = (avail - Wrapping(next)).0;
    if ahead > queue.size() {
        return Err(QueueError::AvailAhead {
            avail: avail.0,
            next,
            ahead,
            size: queue.size(),
        });
    }
    if ahead == 0 {
        return Ok(None);
    }
    queue
        .pop_descriptor_chain(mem)
        .map(Some)
        .ok_or(QueueError::Pop { next })
}

/// Serves every chain the driver made available, with notifications off while serving
/// (virtio 1.2, 2.7.10); `serve` handles one chain and says how many bytes it wrote to the
/// guest. Whether any chain was used, or why the queue cannot be served any more.
pub fn serve_available<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
) -> Result<bool, QueueError> {
    serve_admitted(queue, mem, |_| true, serve)
}

/// [`serve_available`] for a device that may hold requests back (a rate limiter): a chain
/// `admit` refuses stays first in the queue, and serving stops there, with notifications
/// off: whoever refused it wakes the device to try again.
pub fn serve_admitted<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mut admit: impl FnMut(&DescriptorChain<&'m GuestMemoryMmap>) -> bool,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = pop_checked(queue, mem)? {
            if !admit(&chain) {
                virtio_queue::QueueOwnedT::go_to_previous_position(queue);
                return Ok(used_any);
            }
            let head = chain.head_index();
            let written = serve(chain);
            // Only a head outside the ring fails here (the rings were checked at
            // activation): that chain alone is lost.
            if let Err(e) = queue.add_used(mem, head, written) {
                log::warn!("virtio: cannot return the chain at descriptor {head}: {e}");
            }
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            return Ok(used_any);
        }
    }
}

/// Queue events of an activation that ended (a reset). The event loop must stop watching
/// them while they are still open: epoll keeps the entry of a closed descriptor whose file
/// is open elsewhere (the transport's own copy), and a guest that notified the reset device
/// would then wake the loop for ever, its removal failing on the closed descriptor. Kept
/// until the device's next wake-up, unregistered there, then dropped.
#[derive(Default)]
pub struct RetiredEvents(Vec<EventFd>);

impl RetiredEvents {
    pub fn retire(&mut self, events: impl IntoIterator<Item = EventFd>) {
        self.0.extend(events);
    }

    pub fn unregister(&mut self, ops: &mut event_manager::EventOps) {
        for evt in self.0.drain(..) {
            let _ = ops.remove(event_manager::Events::new(
                &evt,
                event_manager::EventSet::IN,
            ));
        }
    }
}

/// The queues a device with several of them (net, vsock) serves while active, and what it
/// needs to serve them.
pub(crate) struct ActiveQueues<const N: usize> {
    pub mem: GuestMemoryMmap,
    pub interrupt: std::sync::Arc<Interrupt>,
    pub queues: [Queue; N],
    pub queue_evts: [EventFd; N],
    /// The queue events are on the event loop.
    pub registered: bool,
    /// The driver broke a queue: nothing is served until it resets the device.
    pub broken: bool,
}

impl<const N: usize> ActiveQueues<N> {
    pub fn new(ctx: ActivateContext) -> Result<Self, ActivateError> {
        let got = ctx.queues.len();
        let (Ok(queues), Ok(queue_evts)) = (
            <[Queue; N]>::try_from(ctx.queues),
            <[EventFd; N]>::try_from(ctx.queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { got, want: N });
        };
        Ok(Self {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues,
            queue_evts,
            registered: false,
            broken: false,
        })
    }

    /// Puts the queue events on the event loop, once per activation.
    pub fn register(&mut self, ops: &mut event_manager::EventOps, device: &str) {
        if self.registered {
            return;
        }
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(event_manager::Events::new(evt, event_manager::EventSet::IN)) {
                log::error!("{device}: cannot watch a queue: {e}");
            }
        }
        self.registered = true;
    }

    /// Stops serving every queue after the driver broke `queue`'s rules.
    pub fn stop(&mut self, device: &str, queue: &str, e: &QueueError) {
        log::error!("{device}: {queue} queue: {e}; the device stops until the driver resets it");
        self.broken = true;
        self.interrupt.device_needs_reset();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// Runs `serve_available` on a thread: a loop that never ends fails the test instead
    /// of hanging it. Returns the result and how many chains were served.
    fn serve_with_deadline(
        mem: &GuestMemoryMmap,
        mut queue: Queue,
    ) -> (Result<bool, QueueError>, u32) {
        let mem = mem.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut served = 0;
            let result = serve_available(&mut queue, &mem, |_| {
                served += 1;
                0
            });
            let _ = tx.send((result, served));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("serve_available did not return: the queue kept it spinning")
    }

    fn queue_with_chains(
        mem: &GuestMemoryMmap,
        chains: u16,
    ) -> MockSplitQueue<'_, GuestMemoryMmap> {
        let mock = MockSplitQueue::new(mem, 16);
        let descs: Vec<RawDescriptor> = (0..chains)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    0x10_0000 + u64::from(i) * 0x100,
                    16,
                    0,
                    0,
                ))
            })
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        mock
    }

    #[test]
    fn every_available_chain_is_served_once() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mock = queue_with_chains(&mem, 3);
        let (result, served) = serve_with_deadline(&mem, mock.create_queue().unwrap());
        assert!(matches!(result, Ok(true)));
        assert_eq!(served, 3);
        assert_eq!(mock.used().idx().load(), 3);
    }

    /// A chain the rate limiter refuses stays first in the queue: served next time, once,
    /// in order.
    #[test]
    fn a_refused_chain_waits_in_the_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mock = queue_with_chains(&mem, 3);
        let mut queue = mock.create_queue().unwrap();
        let mut heads = Vec::new();
        let mut allowed = 1;
        let admit = |_: &DescriptorChain<&GuestMemoryMmap>| {
            if allowed == 0 {
                return false;
            }
            allowed -= 1;
            true
        };
        let used = serve_admitted(&mut queue, &mem, admit, |c| {
            heads.push(c.head_index());
            0
        })
        .unwrap();
        assert!(used);
        assert_eq!(heads, [0]);
        assert_eq!(mock.used().idx().load(), 1);
        serve_admitted(
            &mut queue,
            &mem,
            |_| true,
            |c| {
                heads.push(c.head_index());
                0
            },
        )
        .unwrap();
        assert_eq!(heads, [0, 1, 2]);
        assert_eq!(mock.used().idx().load(), 3);
    }

    #[test]
    fn an_available_index_beyond_the_queue_size_stops_serving() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mock = queue_with_chains(&mem, 1);
        // 17 entries ahead of a 16-entry queue: no driver can have made that many available.
        mock.avail().idx().store(17);
        let (result, served) = serve_with_deadline(&mem, mock.create_queue().unwrap());
        match result {
            Err(QueueError::AvailAhead {
                avail: 17,
                next: 0,
                ahead: 17,
                size: 16,
            }) => {}
            other => panic!("expected AvailAhead, got {other:?}"),
        }
        assert_eq!(served, 0);
        assert_eq!(mock.used().idx().load(), 0, "nothing returned to the guest");
    }

    #[test]
    fn the_needs_reset_flag_interrupts_and_clears_on_reset() {
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        interrupt.device_needs_reset();
        assert!(interrupt.needs_reset());
        assert_eq!(interrupt.status() & INT_CONFIG_CHANGE, INT_CONFIG_CHANGE);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1, "the line was raised");
        interrupt.clear();
        assert!(!interrupt.needs_reset());
        assert_eq!(interrupt.status(), 0);
    }
}
