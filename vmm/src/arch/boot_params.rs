//! The zero page (`struct boot_params`): the e820 memory map, the setup header with the
//! command line and initrd, as the 64-bit boot protocol reads them.

use devices::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    CMDLINE_START, HIMEM_START, MMIO_GAP_START, MPTABLE_START, RAM_ABOVE_GAP_START, SYSTEM_MEM_END,
    ZERO_PAGE_START,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
const BOOT_FLAG: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the e820 map needs {0} entries; the zero page holds {max}", max = E820_MAX)]
    TooManyE820Entries(usize),
    #[error("guest RAM of {0:#x} bytes is too small to hold the boot structures below 1 MiB")]
    RamTooSmall(u64),
    #[error("cannot write the zero page at {ZERO_PAGE_START:#x}: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const E820_MAX: usize = 128;

/// What the guest learns about its memory: usable RAM below the MP table, the reserved BIOS
/// area, RAM from 1 MiB to the MMIO gap, the gap itself, RAM above 4 GiB.
pub fn e820_map(ram_size: u64) -> Result<Vec<boot_e820_entry>, BootParamsError> {
    if ram_size <= HIMEM_START {
        return Err(BootParamsError::RamTooSmall(ram_size));
    }
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let low_end = ram_size.min(MMIO_GAP_START);
    let mut map = vec![
        entry(0, MPTABLE_START, E820_RAM),
        entry(MPTABLE_START, SYSTEM_MEM_END - MPTABLE_START, E820_RESERVED),
        entry(HIMEM_START, low_end - HIMEM_START, E820_RAM),
        entry(
            MMIO_GAP_START,
            RAM_ABOVE_GAP_START - MMIO_GAP_START,
            E820_RESERVED,
        ),
    ];
    if ram_size > MMIO_GAP_START {
        map.push(entry(
            RAM_ABOVE_GAP_START,
            ram_size - MMIO_GAP_START,
            E820_RAM,
        ));
    }
    Ok(map)
}

/// The kernel's location of the initrd in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Builds the zero page. `image_header` is the setup header of a bzImage (None for vmlinux);
/// `cmdline_size` counts the terminating NUL.
pub fn build(
    ram_size: u64,
    image_header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    let mut hdr = image_header.unwrap_or(setup_header {
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    });
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDR_MAGIC;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    params.hdr = hdr;

    let map = e820_map(ram_size)?;
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;
    Ok(params)
}

pub fn write(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootParamsError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_in(map: &[boot_e820_entry]) -> u64 {
        map.iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_map() {
        let map = e820_map(128 << 20).unwrap();
        assert_eq!(map.len(), 4);
        assert_eq!((map[0].addr, map[0].size), (0, 0x9fc00));
        assert_eq!(
            (map[2].addr, map[2].size),
            (0x10_0000, (128 << 20) - 0x10_0000)
        );
        assert_eq!(ram_in(&map), (128 << 20) - (0x10_0000 - 0x9fc00));
    }

    #[test]
    fn ram_beyond_the_gap_continues_at_4_gib() {
        let map = e820_map(4 << 30).unwrap();
        let high = map.last().unwrap();
        assert_eq!(
            (high.addr, high.size, high.r#type),
            (1 << 32, 1 << 30, E820_RAM)
        );
        assert_eq!(map[2].addr + map[2].size, 0xc000_0000);
    }

    #[test]
    fn header_fields() {
        let initrd = InitrdPlacement {
            addr: 0x7f0_0000,
            size: 0x1234,
        };
        let p = build(128 << 20, None, 42, Some(initrd)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x7f0_0000, 0x1234)
        );
        assert_eq!(p.e820_entries, 4);
    }

    #[test]
    fn tiny_ram_is_refused() {
        assert!(matches!(
            e820_map(0x8_0000),
            Err(BootParamsError::RamTooSmall(_))
        ));
    }
}
