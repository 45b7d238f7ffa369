//! An interrupt or event line backed by an `EventFd`, shared with KVM (irqfd) or the event loop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Signals an event by writing 1 to an `EventFd`.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl AsRawFd for EventFdTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
