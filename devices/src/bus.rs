//! Address buses (port I/O and MMIO) that route a vCPU's access to the device owning the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`]. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error(
        "bus range {base:#x}+{len:#x} overlaps a device already at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping address ranges, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    // base -> (len, device)
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let end = base + (len - 1);
        // Only the closest range starting at or before `end` can overlap.
        if let Some((&other_base, &(other_len, _))) = self.devices.range(..=end).next_back() {
            if other_base + (other_len - 1) >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len,
                });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((offset, device))
    }

    /// Reads from the device at `addr`; returns false when no device owns it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; returns false when no device owns it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panicking vCPU thread still holds consistent
/// register state (every access completes before it returns), so keep serving it.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        fill: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.fill.wrapping_add(offset as u8));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder(fill: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            last_write: None,
            fill,
        }))
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = recorder(0x10);
        let b = recorder(0x20);
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();

        let mut byte = [0u8];
        assert!(bus.read(0x3fa, &mut byte));
        assert_eq!(byte[0], 0x12);
        assert!(bus.read(0x64, &mut byte));
        assert_eq!(byte[0], 0x24);
        assert!(!bus.read(0x65, &mut byte));
        assert!(!bus.read(0x3f7, &mut byte));

        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((7, vec![7])));
        assert!(!bus.write(0x400, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(0), 0x1000, 0x1000).unwrap();
        assert!(matches!(
            bus.insert(recorder(0), 0x1fff, 1),
            Err(BusError::Overlap {
                other_base: 0x1000,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(recorder(0), 0x800, 0x801),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(recorder(0), 0x800, 0x800).unwrap();
        bus.insert(recorder(0), 0x2000, 1).unwrap();
        assert_eq!(
            bus.insert(recorder(0), 5, 0),
            Err(BusError::InvalidRange { base: 5, len: 0 })
        );
        assert!(matches!(
            bus.insert(recorder(0), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
