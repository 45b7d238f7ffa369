//! Emulated devices of a reapvm microVM and the buses that route guest accesses to them.

pub mod bus;
pub mod legacy;
pub mod tap;
pub mod trigger;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use trigger::EventFdTrigger;
