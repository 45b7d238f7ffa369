//! What a device with one queue (block, rng) does besides serving its requests: keeps the
//! queue the driver handed over, watches its notifications on the event loop, holds requests
//! back while its rate limiter says so, stops serving a queue the driver broke (until it
//! resets the device), and holds still while paused.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{serve_admitted, ActivateContext, ActivateError, Interrupt, RetiredEvents};
use crate::rate_limiter::RateLimiter;
use crate::GuestMemoryMmap;

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue: Queue,
    queue_evt: EventFd,
    registered: bool,
    /// The driver broke the queue: nothing is served until it resets the device.
    broken: bool,
}

pub struct OneQueue {
    /// Names the device in log lines ("virtio-block rootfs").
    name: String,
    /// Written when the queue set changes: the event loop owns epoll and picks it up.
    activate_evt: EventFd,
    active: Option<Active>,
    retired: RetiredEvents,
    paused: bool,
    limiter: RateLimiter,
}

impl OneQueue {
    pub fn new(name: String, limiter: RateLimiter) -> std::io::Result<Self> {
        Ok(Self {
            name,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            retired: RetiredEvents::default(),
            paused: false,
            limiter,
        })
    }

    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// `PATCH`: new buckets; requests held back are tried again at once.
    pub fn update_limiter(&mut self, config: crate::rate_limiter::RateLimiterConfig) {
        self.limiter.update(config);
        let _ = self.activate_evt.write(1);
    }

    pub fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 1 || ctx.queue_evts.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: ctx.queues.len(),
                want: 1,
            });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queue: ctx.queues.remove(0),
            queue_evt: ctx.queue_evts.remove(0),
            registered: false,
            broken: false,
        });
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    pub fn reset(&mut self) {
        // The queue event is unregistered by the event loop on its next wake-up.
        if let Some(active) = self.active.take().filter(|a| a.registered) {
            self.retired.retire([active.queue_evt]);
        }
        let _ = self.activate_evt.write(1);
    }

    pub fn pause(&mut self) {
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.paused = false;
        // Wake the event loop to serve requests queued while paused.
        let _ = self.activate_evt.write(1);
    }

    pub fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    /// MutEventSubscriber::init of the device.
    pub fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            log::error!("{}: cannot watch activation: {e}", self.name);
        }
        let timer = self.limiter.timer_fd();
        if let Err(e) = ops.add(Events::new_raw(timer, EventSet::IN)) {
            log::error!("{}: cannot watch the rate limiter's timer: {e}", self.name);
        }
    }

    /// MutEventSubscriber::process of the device: `serve` handles one chain and returns the
    /// bytes it wrote to the guest; `cost` says how many bytes a chain counts for against
    /// the rate limiter (each chain is also one operation).
    pub fn process(
        &mut self,
        events: Events,
        ops: &mut EventOps,
        cost: impl Fn(&DescriptorChain<&GuestMemoryMmap>) -> u64,
        serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) {
        self.retired.unregister(ops);
        if events.fd() == self.limiter.timer_fd() {
            self.limiter.on_timer();
            if !self.paused {
                self.serve_and_signal(cost, serve);
            }
            return;
        }
        if events.fd() == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            let Some(active) = self.active.as_mut() else {
                return;
            };
            if !active.registered {
                if let Err(e) = ops.add(Events::new(&active.queue_evt, EventSet::IN)) {
                    log::error!("{}: cannot watch the queue: {e}", self.name);
                }
                active.registered = true;
            }
            // Requests queued before the queue was watched, or while paused.
            if !self.paused {
                self.serve_and_signal(cost, serve);
            }
            return;
        }
        let Some(active) = self.active.as_ref() else {
            // Reset: forget the stale queue event.
            let _ = ops.remove(Events::new_raw(events.fd(), EventSet::IN));
            return;
        };
        if events.fd() != active.queue_evt.as_raw_fd() {
            let _ = ops.remove(Events::new_raw(events.fd(), EventSet::IN));
            return;
        }
        let _ = active.queue_evt.read();
        if self.paused {
            // Served on resume.
            return;
        }
        self.serve_and_signal(cost, serve);
    }

    /// Serves every available chain and interrupts the driver when it asked to be.
    fn serve_and_signal(
        &mut self,
        cost: impl Fn(&DescriptorChain<&GuestMemoryMmap>) -> u64,
        serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mem = active.mem.clone();
        let limiter = &mut self.limiter;
        let admit = |chain: &DescriptorChain<&GuestMemoryMmap>| {
            limiter.is_unlimited() || limiter.consume_request(cost(chain))
        };
        let signal = match serve_admitted(&mut active.queue, &mem, admit, serve) {
            Ok(used) => used && active.queue.needs_notification(&mem).unwrap_or(true),
            Err(e) => {
                log::error!(
                    "{}: {e}; the device stops until the driver resets it",
                    self.name
                );
                active.broken = true;
                active.interrupt.device_needs_reset();
                // Chains used before the error are returned too.
                true
            }
        };
        if signal {
            active.interrupt.signal_used_queue();
        }
    }
}
