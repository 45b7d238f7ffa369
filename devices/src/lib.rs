//! Emulated devices of a reapvm microVM and the buses that route guest accesses to them.

pub mod bus;
pub mod legacy;
pub mod mmds;
pub mod persist;
pub mod rate_limiter;
pub mod tap;
pub mod trigger;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use persist::Persist;

/// Guest memory with a dirty bitmap: every write the VMM makes on the guest's behalf (device
/// buffers, used rings) is marked, so Diff snapshots catch what KVM's dirty log cannot see.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
pub use trigger::EventFdTrigger;
