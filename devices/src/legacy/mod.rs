//! Legacy PC devices on the port I/O bus: COM1 serial, the i8042 keyboard controller
//! (CPU reset, Ctrl-Alt-Del), the boot-complete signal port, and the signals the guest sends
//! through its console; and the replay guest's control page (MMIO).

mod boot_timer;
mod console_signal;
mod i8042;
mod replay_control;
mod serial;

pub use boot_timer::{now as start_time_now, BootTimer, StartTime, BOOT_TIMER_PORT};
pub use console_signal::{ConsoleSignalFilter, InvocationHook, InvocationSignal, INVOCATION_DONE};
pub use i8042::{I8042Args, I8042Device, I8042State, I8042_PORT, I8042_PORT_LEN};
pub use replay_control::{
    describe_error as describe_replay_error, ReplayControl, ReplayReport, ReplayStatus,
    REPLAY_CONTROL_ADDR, REPLAY_CONTROL_LEN,
};
pub use serial::{
    SerialArgs, SerialDevice, SerialError, SerialSnapshot, COM1_IRQ, COM1_PORT, COM1_PORT_LEN,
};
