//! The i8042 PS/2 controller, as much of it as a Linux guest uses: the controller
//! configuration byte, self tests, a keyboard that acknowledges commands, CPU reset
//! (command 0xfe, what `reboot=k` does) and Ctrl-Alt-Del key injection.

use std::collections::VecDeque;

use vm_superio::Trigger;

use crate::{BusDevice, EventFdTrigger, Persist};

pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const SR_OUTPUT_FULL: u8 = 0x01;
const SR_SYSTEM_FLAG: u8 = 0x04;
const SR_LAST_WAS_COMMAND: u8 = 0x08;
const SR_KEYBOARD_UNLOCKED: u8 = 0x10;

// Controller configuration byte bits.
const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands and answers (port 0x60).
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_GET_ID: u8 = 0xf2;
const KBD_ECHO: u8 = 0xee;
const KBD_ID: [u8; 2] = [0xab, 0x83];

const OUTPUT_QUEUE_MAX: usize = 64;

/// Ctrl (left), Alt (left), Delete pressed, then released; scan code set 1 (what the guest
/// sees when the controller translates) and set 2.
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// What the next byte written to the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum PendingData {
    KeyboardCommand,
    ControllerConfig,
    OutputPort,
    Swallow,
}

/// The controller's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    ctr: u8,
    status: u8,
    output: Vec<u8>,
    pending: PendingData,
}

pub struct I8042Device {
    reset: EventFdTrigger,
    kbd_interrupt: EventFdTrigger,
    ctr: u8,
    status: u8,
    output: VecDeque<u8>,
    pending: PendingData,
}

/// What a restored controller needs besides its state.
pub struct I8042Args {
    /// Fires when the guest resets the CPU.
    pub reset: EventFdTrigger,
    /// The irqfd of IRQ 1.
    pub kbd_interrupt: EventFdTrigger,
}

impl Persist for I8042Device {
    type State = I8042State;
    type ConstructorArgs = I8042Args;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            status: self.status,
            output: self.output.iter().copied().collect(),
            pending: self.pending,
        }
    }

    /// An output queue longer than the device keeps is cut.
    fn restore(args: I8042Args, state: &I8042State) -> Result<Self, Self::Error> {
        let mut device = Self::new(args.reset, args.kbd_interrupt);
        device.ctr = state.ctr;
        device.status = state.status;
        device.output = state
            .output
            .iter()
            .copied()
            .take(OUTPUT_QUEUE_MAX)
            .collect();
        device.pending = state.pending;
        Ok(device)
    }
}

impl I8042Device {
    /// `reset` fires when the guest resets the CPU; `kbd_interrupt` is the irqfd of IRQ 1.
    pub fn new(reset: EventFdTrigger, kbd_interrupt: EventFdTrigger) -> Self {
        Self {
            reset,
            kbd_interrupt,
            ctr: CTR_KBD_INTERRUPT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE,
            status: SR_SYSTEM_FLAG | SR_KEYBOARD_UNLOCKED,
            output: VecDeque::new(),
            pending: PendingData::KeyboardCommand,
        }
    }

    /// Presses and releases Ctrl-Alt-Del, as `SendCtrlAltDel` does in Firecracker.
    pub fn send_ctrl_alt_del(&mut self) {
        if self.ctr & CTR_TRANSLATE != 0 {
            self.push_keys(&CTRL_ALT_DEL_SET1);
        } else {
            self.push_keys(&CTRL_ALT_DEL_SET2);
        }
    }

    fn push_keys(&mut self, codes: &[u8]) {
        if self.ctr & CTR_KBD_DISABLED != 0 {
            return;
        }
        for &code in codes {
            self.push(code);
        }
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_QUEUE_MAX {
            log::warn!("i8042: output queue full, dropping byte {byte:#x}");
            return;
        }
        self.output.push_back(byte);
        self.raise_interrupt();
    }

    fn raise_interrupt(&self) {
        if self.ctr & CTR_KBD_INTERRUPT != 0 {
            if let Err(e) = self.kbd_interrupt.trigger() {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    fn status(&self) -> u8 {
        let mut status = self.status;
        if !self.output.is_empty() {
            status |= SR_OUTPUT_FULL;
        }
        status
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SR_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR => self.pending = PendingData::ControllerConfig,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            // There is no mouse: the aux port's clock line reads as stuck low.
            CMD_AUX_TEST => self.push(0x01),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            // A20 enabled, CPU not in reset.
            CMD_READ_OUTPUT_PORT => self.push(0x03),
            CMD_WRITE_OUTPUT_PORT => self.pending = PendingData::OutputPort,
            CMD_WRITE_AUX_OUTPUT | CMD_WRITE_AUX => self.pending = PendingData::Swallow,
            CMD_RESET_CPU => {
                if let Err(e) = self.reset.trigger() {
                    log::error!("i8042: cannot signal the CPU reset: {e}");
                }
            }
            other => log::debug!("i8042: ignoring controller command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SR_LAST_WAS_COMMAND;
        let pending = std::mem::replace(&mut self.pending, PendingData::KeyboardCommand);
        match pending {
            PendingData::ControllerConfig => {
                self.ctr = byte;
                if byte & CTR_SYSTEM_FLAG != 0 {
                    self.status |= SR_SYSTEM_FLAG;
                } else {
                    self.status &= !SR_SYSTEM_FLAG;
                }
            }
            // Bit 0 low in the output port holds the CPU in reset.
            PendingData::OutputPort if byte & 0x01 == 0 => self.command(CMD_RESET_CPU),
            PendingData::OutputPort | PendingData::Swallow => {}
            PendingData::KeyboardCommand => self.keyboard_command(byte),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            KBD_RESET => {
                self.output.clear();
                self.push(KBD_ACK);
                self.push(KBD_SELF_TEST_PASSED);
            }
            KBD_GET_ID => {
                self.push(KBD_ACK);
                self.push(KBD_ID[0]);
                self.push(KBD_ID[1]);
            }
            KBD_ECHO => self.push(KBD_ECHO),
            // LEDs, typematic rate, scan set, enable, disable...: acknowledged, nothing to do.
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => {
                let byte = self.output.pop_front().unwrap_or(0);
                if !self.output.is_empty() {
                    self.raise_interrupt();
                }
                byte
            }
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            DATA_OFFSET => self.data(data[0]),
            COMMAND_OFFSET => self.command(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> (I8042Device, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042Device::new(
            EventFdTrigger::new(reset.try_clone().unwrap()),
            EventFdTrigger::new(irq.try_clone().unwrap()),
        );
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042Device, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_fires_reset_event() {
        let (mut dev, reset, _) = device();
        assert!(reset.read().is_err(), "no reset before the command");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
        // Pulling the output port's reset line low does the same.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0x02]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn controller_config_round_trips() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x45]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(
            read(&mut dev, COMMAND_OFFSET) & SR_OUTPUT_FULL,
            SR_OUTPUT_FULL
        );
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x45);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SR_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_answers_and_interrupts() {
        let (mut dev, _, irq) = device();
        dev.write(DATA_OFFSET, &[KBD_RESET]);
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_SELF_TEST_PASSED);
        dev.write(DATA_OFFSET, &[0xed]);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
    }

    #[test]
    fn state_round_trips() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x45]);
        dev.write(DATA_OFFSET, &[KBD_GET_ID]);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        let saved = serde_json::to_string(&dev.save()).unwrap();
        let trigger = || EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let args = I8042Args {
            reset: trigger(),
            kbd_interrupt: trigger(),
        };
        let Ok(mut copy) = I8042Device::restore(args, &serde_json::from_str(&saved).unwrap());
        assert_eq!(copy.save(), dev.save());
        // The pending CTR write and the queued keyboard answer carry over.
        copy.write(DATA_OFFSET, &[0x47]);
        assert_eq!(read(&mut copy, DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut copy, DATA_OFFSET), KBD_ID[0]);
        copy.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        read(&mut copy, DATA_OFFSET);
        assert_eq!(read(&mut copy, DATA_OFFSET), 0x47);
    }

    #[test]
    fn ctrl_alt_del_follows_translation() {
        let (mut dev, _, _) = device();
        dev.send_ctrl_alt_del();
        let set1: Vec<u8> = (0..8).map(|_| read(&mut dev, DATA_OFFSET)).collect();
        assert_eq!(set1, CTRL_ALT_DEL_SET1);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CTR_KBD_INTERRUPT]);
        dev.send_ctrl_alt_del();
        let set2: Vec<u8> = (0..11).map(|_| read(&mut dev, DATA_OFFSET)).collect();
        assert_eq!(set2, CTRL_ALT_DEL_SET2);
    }
}
