//! 16550A UART (vm-superio) at COM1, its output to any writer, its input from the event loop.

use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::{BusDevice, EventFdTrigger, Persist};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// The UART's registers and receive FIFO in a snapshot (vm-superio's SerialState).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

/// What a restored UART needs besides its state.
pub struct SerialArgs {
    /// The irqfd of the UART's interrupt line.
    pub interrupt: EventFdTrigger,
    /// Where the guest's output goes.
    pub out: Box<dyn Write + Send>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("the saved serial port state is refused: {0}")]
    State(String),
}

impl Persist for SerialDevice {
    type State = SerialSnapshot;
    type ConstructorArgs = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state; an oversized receive FIFO is refused by vm-superio.
    fn restore(args: SerialArgs, state: &SerialSnapshot) -> Result<Self, SerialError> {
        let SerialArgs { interrupt, out } = args;
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, interrupt, NoEvents, out)
            .map_err(|e| SerialError::State(e.to_string()))?;
        Ok(Self { uart })
    }
}

impl SerialDevice {
    /// `interrupt` is the irqfd of the UART's interrupt line.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(interrupt, out),
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: dropping console input: {e}");
                0
            }
        }
    }

    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= COM1_PORT_LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_PORT_LEN {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            // A closed console must not stop the guest; the byte is lost.
            log::debug!("serial: console output failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_to_writer_and_receives_input() {
        let out = SharedBuf::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");

        // Enable the "received data available" interrupt, then feed input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        dev.read(5, &mut byte);
        assert_eq!(byte[0] & 1, 1, "LSR must report data ready");
        dev.read(0, &mut byte);
        assert_eq!(byte[0], b'o');
        dev.read(0, &mut byte);
        assert_eq!(byte[0], b'k');
    }

    #[test]
    fn state_round_trips_with_pending_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(std::io::sink()),
        );
        dev.write(3, &[0x03]); // 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"xy");
        let saved = serde_json::to_string(&dev.save()).unwrap();
        let restored: SerialSnapshot = serde_json::from_str(&saved).unwrap();
        let args = |irq| SerialArgs {
            interrupt: EventFdTrigger::new(irq),
            out: Box::new(std::io::sink()),
        };
        let mut copy = SerialDevice::restore(args(irq), &restored).unwrap();
        assert_eq!(copy.save(), dev.save());
        let mut byte = [0u8];
        copy.read(0, &mut byte);
        assert_eq!(byte[0], b'x');
        copy.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        let mut oversized = restored.clone();
        oversized.in_buffer = vec![0; 1 << 20];
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let refused = SerialDevice::restore(args(irq2), &oversized).err().unwrap();
        assert!(
            refused.to_string().contains("serial port state"),
            "{refused}"
        );
    }
}
