//! Feeds the VMM's standard input to the guest's serial console, as Firecracker does.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

pub struct StdinToSerial {
    serial: Arc<Mutex<SerialDevice>>,
    pending: Vec<u8>,
}

impl StdinToSerial {
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self {
            serial,
            pending: Vec::new(),
        }
    }

    fn stdin_fd() -> i32 {
        std::io::stdin().as_raw_fd()
    }
}

impl MutEventSubscriber for StdinToSerial {
    fn init(&mut self, ops: &mut EventOps) {
        // /dev/null, regular files and a closed stdin cannot be polled: no console input then.
        if let Err(e) = ops.add(Events::new_raw(Self::stdin_fd(), EventSet::IN)) {
            log::debug!("console input disabled: stdin cannot be polled ({e})");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            std::io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // End of input or hang-up: stop watching, the guest keeps running.
            let _ = ops.remove(Events::new_raw(Self::stdin_fd(), EventSet::IN));
            return;
        }
        self.pending.extend_from_slice(&buf[..n]);
        let taken = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(&self.pending);
        if taken < self.pending.len() {
            // The guest is not reading its console; drop what does not fit rather than
            // buffer without bound.
            log::debug!(
                "serial receive FIFO full, dropping {} bytes of input",
                self.pending.len() - taken
            );
        }
        self.pending.clear();
    }
}
