//! Guest RAM: anonymous host memory laid out around the 32-bit MMIO gap.

use vm_memory::GuestAddress;

use devices::GuestMemoryMmap;

use crate::arch::layout::{MMIO_GAP_START, RAM_ABOVE_GAP_START};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Map {
        size_mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Guest physical ranges holding `ram_size` bytes: below the gap, then from 4 GiB.
pub fn ram_ranges(ram_size: u64) -> Vec<(GuestAddress, usize)> {
    if ram_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), ram_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(RAM_ABOVE_GAP_START),
                (ram_size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// Maps anonymous, lazily-populated memory (MAP_NORESERVE) for each range.
pub fn create_guest_memory(ram_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(ram_size)).map_err(|source| MemoryError::Map {
        size_mib: ram_size >> 20,
        source,
    })
}

/// Physical memory of the host, in bytes.
pub fn host_ram_bytes() -> u64 {
    // SAFETY: sysconf takes no pointers; it returns -1 on error, handled below.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page_size <= 0 {
        return u64::MAX;
    }
    pages as u64 * page_size as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_around_the_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
        assert_eq!(
            ram_ranges(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(1 << 32), 2 << 30)]
        );
    }

    #[test]
    fn maps_split_memory() {
        use vm_memory::GuestMemoryBackend;
        let mem = create_guest_memory((3 << 30) + (64 << 20)).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress((1 << 32) + (64 << 20) - 1)));
        assert!(!mem.address_in_range(GuestAddress(0xd000_0000)));
    }
}
