//! virtio-rng (virtio 1.2, 5.4), Firecracker's entropy device: one queue of writable
//! buffers, each filled from the host's getrandom(2). A guest that has it has entropy at
//! boot (the kernel's hw_random core seeds its pool from it) instead of waiting for it.

use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io::Write;

use virtio_queue::{DescriptorChain, Writer};

use super::one_queue::OneQueue;
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_RNG};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState};
use crate::{GuestMemoryMmap, Persist};

const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets: a driver asking for more gets this much and asks again.
const MAX_REQUEST: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot create the activation event of the entropy device: {0}")]
    Event(std::io::Error),
    #[error("the entropy device: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

/// The entropy device in a snapshot: it has no state beyond its transport's.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// Its rate limiter's buckets and what they held (absent from older snapshots: none).
    #[serde(default)]
    pub rate_limiter: RateLimiterState,
}

pub struct Rng {
    queue: OneQueue,
    buffer: Vec<u8>,
}

impl Rng {
    pub fn new(rate_limiter: RateLimiterConfig) -> Result<Self, RngError> {
        Self::with_limiter(RateLimiter::new(rate_limiter)?)
    }

    fn with_limiter(limiter: RateLimiter) -> Result<Self, RngError> {
        Ok(Self {
            queue: OneQueue::new("virtio-rng".into(), limiter).map_err(RngError::Event)?,
            buffer: Vec::new(),
        })
    }
}

impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs = ();
    type Error = RngError;

    fn save(&self) -> RngState {
        RngState {
            rate_limiter: self.queue.limiter().save(),
        }
    }

    fn restore(_args: (), state: &RngState) -> Result<Self, RngError> {
        Self::with_limiter(RateLimiter::restore(&state.rate_limiter)?)
    }
}

/// The bytes a request asks for, for the rate limiter (as many as `fill` would give).
fn requested_bytes(chain: &DescriptorChain<&GuestMemoryMmap>) -> u64 {
    let writable: u64 = chain
        .clone()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    writable.min(MAX_REQUEST as u64)
}

/// Fills the chain's writable buffers with random bytes; returns how many it wrote.
fn fill(buffer: &mut Vec<u8>, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
    let mem = chain.memory();
    let Ok(mut writer) = Writer::new(mem, chain.clone()) else {
        log::warn!("virtio-rng: request with buffers outside guest memory dropped");
        return 0;
    };
    let len = writer.available_bytes().min(MAX_REQUEST);
    buffer.resize(len, 0);
    if let Err(e) = getrandom::fill(&mut buffer[..len]) {
        // Nothing is handed out rather than bytes that are not random.
        log::error!("virtio-rng: getrandom failed: {e}");
        return 0;
    }
    match writer.write_all(&buffer[..len]) {
        Ok(()) => len as u32,
        Err(e) => {
            log::warn!("virtio-rng: cannot write to the guest's buffer: {e}");
            0
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn offered_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-rng: ignoring config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.queue.activate(ctx)
    }

    fn reset(&mut self) {
        self.queue.reset();
    }

    fn pause(&mut self) {
        self.queue.pause();
    }

    fn resume(&mut self) {
        self.queue.resume();
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.queue.queue_states()
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.queue.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let buffer = &mut self.buffer;
        self.queue
            .process(events, ops, requested_bytes, |chain| fill(buffer, chain));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// A snapshot keeps the entropy device's rate limiter, buckets and budget; one from
    /// before rate limiters restores with none.
    #[test]
    fn a_snapshot_keeps_the_rate_limiter() {
        let config: RateLimiterConfig =
            serde_json::from_str(r#"{"ops": {"size": 4, "refill_time": 50}}"#).unwrap();
        let saved = Rng::new(config).unwrap().save();
        let json = serde_json::to_string(&saved).unwrap();
        let restored = Rng::restore((), &serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.queue.limiter().config(), config);
        assert_eq!(restored.save(), saved);
        let old = Rng::restore((), &serde_json::from_str("{}").unwrap()).unwrap();
        assert!(old.queue.limiter().is_unlimited());
    }

    #[test]
    fn writable_buffers_get_random_bytes_and_readable_ones_nothing() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue
            .build_desc_chain(&[desc(0x10_0000, 256, true), desc(0x20_0000, 256, true)])
            .unwrap();
        let mut buffer = Vec::new();
        assert_eq!(fill(&mut buffer, chain), 512);
        let mut a = [0u8; 256];
        let mut b = [0u8; 256];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
        assert_ne!(a, [0u8; 256]);
        assert_ne!(a, b, "two buffers got the same bytes");

        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue
            .build_desc_chain(&[desc(0x30_0000, 256, false)])
            .unwrap();
        assert_eq!(fill(&mut buffer, chain), 0);
        let mut c = [0u8; 256];
        mem.read_slice(&mut c, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(c, [0u8; 256], "a readable buffer is not written");
    }

    /// A guest that resets the device and then notifies its queue (the transport's copy of
    /// the queue event stays open) must not keep waking the event loop: before the reset's
    /// queue event was unregistered while still open, every loop turn fired it again.
    #[test]
    fn a_notify_after_a_reset_wakes_the_loop_once_at_most() {
        use crate::virtio::{ActivateContext, Interrupt};
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::{Arc, Mutex};
        use vmm_sys_util::eventfd::EventFd;

        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let transport_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new(RateLimiterConfig::default()).unwrap()));
        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        events.add_subscriber(rng.clone());
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let ctx = ActivateContext {
            mem: mem.clone(),
            interrupt,
            queues: vec![mock.create_queue().unwrap()],
            queue_evts: vec![transport_evt.try_clone().unwrap()],
            acked_features: 0,
        };
        rng.lock().unwrap().activate(ctx).unwrap();
        events.run_with_timeout(0).unwrap();
        rng.lock().unwrap().reset();
        events.run_with_timeout(0).unwrap();
        transport_evt.write(1).unwrap();
        let woken: usize = (0..5).map(|_| events.run_with_timeout(0).unwrap()).sum();
        assert!(woken <= 1, "one notify woke the event loop {woken} times");
    }

    #[test]
    fn a_request_is_capped_and_a_buffer_outside_memory_is_dropped() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue
            .build_desc_chain(&[desc(0x10_0000, 1 << 20, true)])
            .unwrap();
        let mut buffer = Vec::new();
        assert_eq!(fill(&mut buffer, chain), MAX_REQUEST as u32);
        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue
            .build_desc_chain(&[desc(0xffff_0000, 256, true)])
            .unwrap();
        assert_eq!(fill(&mut buffer, chain), 0);
    }
}
