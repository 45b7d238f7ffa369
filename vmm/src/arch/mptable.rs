//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! the IOAPIC and the routing of the ISA interrupts.

use vm_memory::{Bytes, GuestAddress};

use devices::GuestMemoryMmap;

use super::layout::{
    APIC_ADDR, IOAPIC_ADDR, IOAPIC_PINS, MAX_VCPUS, MPTABLE_START, SYSTEM_MEM_END,
};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURE_FPU_APIC: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit the MP table (1 to {MAX_VCPUS})")]
    VcpuCount(u8),
    #[error("the MP table ({len} bytes) does not fit below {SYSTEM_MEM_END:#x}")]
    TooLarge { len: usize },
    #[error("cannot write the MP table at {MPTABLE_START:#x}: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for a table placed at
/// `base` in guest memory.
pub fn build(vcpu_count: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpu_count));
    }
    let ioapic_id = vcpu_count + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..vcpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURE_FPU_APIC.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Bus 0, ISA IRQ `pin`, to the same IOAPIC pin; polarity and trigger as the bus says.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            IRQ_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // The PIC's output on LINT0 of every local APIC, NMIs on LINT1 of all of them.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"REAPVM  ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((base + FLOATING_POINTER_LEN as u64) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // no default configuration, no IMCR
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

pub fn setup_mptable(mem: &GuestMemoryMmap, vcpu_count: u8) -> Result<(), MptableError> {
    let bytes = build(vcpu_count, MPTABLE_START)?;
    if MPTABLE_START + bytes.len() as u64 > SYSTEM_MEM_END {
        return Err(MptableError::TooLarge { len: bytes.len() });
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 7, MAX_VCPUS] {
            let bytes = build(n, MPTABLE_START).unwrap();
            assert_eq!(&bytes[..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let table = &bytes[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let entries = u16::from_le_bytes(table[34..36].try_into().unwrap());
            assert_eq!(entries, u16::from(n) + 1 + 1 + 24 + 2);
            let processors = table[HEADER_LEN..]
                .chunks(20)
                .take(n as usize)
                .filter(|e| e[0] == ENTRY_PROCESSOR)
                .count();
            assert_eq!(processors, n as usize);
            assert_eq!(
                table[HEADER_LEN + 3] & CPU_BOOT_PROCESSOR,
                CPU_BOOT_PROCESSOR
            );
        }
    }

    #[test]
    fn largest_table_fits_the_reserved_area() {
        let bytes = build(MAX_VCPUS, MPTABLE_START).unwrap();
        assert!(MPTABLE_START + bytes.len() as u64 <= 0xa0000);
    }

    #[test]
    fn refuses_bad_vcpu_counts() {
        assert!(matches!(build(0, 0), Err(MptableError::VcpuCount(0))));
        assert!(matches!(build(33, 0), Err(MptableError::VcpuCount(33))));
    }
}
