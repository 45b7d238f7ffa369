//! Per-vCPU CPUID, derived from what KVM supports: APIC ids, topology (Intel leaves 4 and
//! 0xb/0x1f, AMD leaves 0x80000001/8/1d/1e), the hypervisor bit, no PMU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// The vCPU's place in the topology: `cpu_index` of `vcpu_count`, `threads_per_core` 1 or 2.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub cpu_index: u8,
    pub vcpu_count: u8,
    pub threads_per_core: u8,
}

impl Topology {
    fn cores(&self) -> u32 {
        u32::from(self.vcpu_count).div_ceil(u32::from(self.threads_per_core))
    }
}

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_INTEL: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES_AMD: u32 = 0x8000_0001;
const LEAF_SIZES_AMD: u32 = 0x8000_0008;
const LEAF_CACHE_AMD: u32 = 0x8000_001d;
const LEAF_EXT_APIC_AMD: u32 = 0x8000_001e;

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const AMD_ECX_TOPOEXT: u32 = 1 << 22;

/// Leaf 0xb/0x1f level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

pub fn vendor_of(cpuid: &CpuId) -> Vendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` things (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites KVM's supported CPUID for one vCPU. `tsc_deadline` says whether KVM can emulate
/// the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
pub fn normalize(cpuid: &mut CpuId, topo: Topology, tsc_deadline: bool) {
    let vendor = vendor_of(cpuid);
    let apic_id = u32::from(topo.cpu_index);
    let count = u32::from(topo.vcpu_count);
    let threads = u32::from(topo.threads_per_core);
    let smt_bits = bits_for(threads);
    let package_bits = bits_for(count);

    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_INTEL if vendor == Vendor::Intel => cache_sharing(entry, topo, true),
            LEAF_PMU => {
                // No guest PMU: the host's counters are not virtualised for the guest here.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = smt_bits;
                        entry.ebx = threads;
                        entry.ecx = (LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = package_bits;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_EXT_FEATURES_AMD if vendor == Vendor::Amd => {
                if count > 1 {
                    entry.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !AMD_ECX_CMP_LEGACY;
                }
                entry.ecx |= AMD_ECX_TOPOEXT;
            }
            LEAF_SIZES_AMD if vendor == Vendor::Amd => {
                // NC (cores - 1) and the APIC id bits that number them.
                entry.ecx = (entry.ecx & !0xf0ff) | (package_bits << 12) | ((count - 1) & 0xff);
            }
            LEAF_CACHE_AMD if vendor == Vendor::Amd => cache_sharing(entry, topo, false),
            LEAF_EXT_APIC_AMD if vendor == Vendor::Amd => {
                entry.eax = apic_id;
                entry.ebx = ((threads - 1) << 8) | (apic_id >> smt_bits);
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
    if vendor == Vendor::Amd
        && !cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == LEAF_EXT_APIC_AMD)
    {
        log::debug!(
            "cpuid: KVM does not report leaf 0x8000001e; topology from leaf 0x80000008 only"
        );
    }
}

/// Leaf 4 (Intel) / 0x8000001d (AMD): which vCPUs share each cache level. L1 and L2 are
/// private to a core, L3 is shared by the whole package.
fn cache_sharing(entry: &mut kvm_cpuid_entry2, topo: Topology, intel: bool) {
    let cache_type = entry.eax & 0x1f;
    if cache_type == 0 {
        return;
    }
    let level = (entry.eax >> 5) & 0x7;
    let sharing = match level {
        1 | 2 => u32::from(topo.threads_per_core),
        _ => u32::from(topo.vcpu_count),
    };
    entry.eax &= !(0xfff << 14);
    entry.eax |= ((sharing - 1) & 0xfff) << 14;
    if intel {
        // EAX[31:26]: cores in the package minus one.
        entry.eax &= !(0x3f << 26);
        entry.eax |= ((topo.cores() - 1) & 0x3f) << 26;
    }
}

/// Feature registers a snapshot's vCPUs may rely on: (leaf, subleaf, register index
/// eax=0 ebx=1 ecx=2 edx=3, bits that change at run time and are not host features).
const FEATURE_REGISTERS: &[(u32, u32, usize, u32)] = &[
    // OSXSAVE and APIC follow the guest's CR4 and APIC base.
    (LEAF_FEATURES, 0, 2, 1 << 27),
    (LEAF_FEATURES, 0, 3, 1 << 9),
    (0x7, 0, 1, 0),
    // OSPKE follows the guest's CR4.
    (0x7, 0, 2, 1 << 4),
    (0x7, 0, 3, 0),
    (0xd, 1, 0, 0),
    (LEAF_EXT_FEATURES_AMD, 0, 2, 0),
    (LEAF_EXT_FEATURES_AMD, 0, 3, 0),
];

const REGISTER_NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

fn register(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: usize) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .map(|e| [e.eax, e.ebx, e.ecx, e.edx][reg])
        .unwrap_or(0)
}

/// The feature leaves a vCPU of this host reports after being given `supported`: on
/// hardware KVM exactly `supported`, on kvm-pvm hosts the host CPU's own features too. For
/// where `/sys` is not there to tell kvm-pvm apart (a jail): a throwaway VM and vCPU ask.
pub fn vcpu_reported_features(
    kvm: &kvm_ioctls::Kvm,
    supported: &CpuId,
) -> Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
    let vm = kvm.create_vm()?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(supported)?;
    Ok(vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?
        .as_slice()
        .to_vec())
}

/// On kvm-pvm hosts, the feature leaves as this CPU's own CPUID instruction reports them: there
/// the vCPUs report (KVM_GET_CPUID2) features of the host CPU that KVM_GET_SUPPORTED_CPUID
/// does not list, and guest user code runs on that CPU natively.
/// Empty elsewhere: on hardware KVM the supported CPUID is the whole truth (the CPU may have
/// features KVM does not expose, such as state the host OS did not enable).
pub fn host_cpu_features() -> Vec<kvm_cpuid_entry2> {
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return Vec::new();
    }
    use std::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86-64 CPU and only reads identification registers.
    #[allow(unused_unsafe)]
    let (max_basic, max_ext) =
        unsafe { (__cpuid_count(0, 0).eax, __cpuid_count(0x8000_0000, 0).eax) };
    FEATURE_REGISTERS
        .iter()
        .filter(|&&(leaf, ..)| {
            if leaf >= 0x8000_0000 {
                leaf <= max_ext
            } else {
                leaf <= max_basic
            }
        })
        .map(|&(leaf, subleaf, ..)| {
            // SAFETY: as above; the leaf is within the CPU's range.
            #[allow(unused_unsafe)]
            let r = unsafe { __cpuid_count(leaf, subleaf) };
            kvm_cpuid_entry2 {
                function: leaf,
                index: subleaf,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            }
        })
        .collect()
}

/// The CPU features `saved` (a snapshotted vCPU's CPUID) has and neither `host` (KVM's
/// supported CPUID, normalized the same way) nor `cpu` (this CPU's own, `host_cpu_features`)
/// has, as "leaf 0x7.0 ebx bit 5" lines: a guest restored here could execute instructions
/// this CPU does not have.
pub fn missing_features(
    saved: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
    cpu: &[kvm_cpuid_entry2],
) -> Vec<String> {
    let mut missing = Vec::new();
    for &(leaf, subleaf, reg, dynamic) in FEATURE_REGISTERS {
        let lacking = register(saved, leaf, subleaf, reg)
            & !register(host, leaf, subleaf, reg)
            & !register(cpu, leaf, subleaf, reg)
            & !dynamic;
        for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
            missing.push(format!(
                "leaf {leaf:#x}.{subleaf} {} bit {bit}",
                REGISTER_NAMES[reg]
            ));
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendor_leaf(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 {
            function: 0,
            eax: 0x1f,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        }
    }

    fn leaf(function: u32, index: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx: 0x0008_0800,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn intel_topology_for_second_of_four_vcpus() {
        let mut cpuid = CpuId::from_entries(&[
            vendor_leaf(b"GenuineIntel"),
            leaf(1, 0, 0x806f8),
            leaf(4, 0, 0x121), // L1 data cache
            leaf(4, 3, 0x163), // L3 unified
            leaf(0xa, 0, 0x0804_0105),
            leaf(0xb, 0, 0),
            leaf(0xb, 1, 0),
            leaf(0xb, 2, 0),
        ])
        .unwrap();
        let topo = Topology {
            cpu_index: 1,
            vcpu_count: 4,
            threads_per_core: 2,
        };
        normalize(&mut cpuid, topo, true);
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 1, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let l1d = find(&cpuid, 4, 0);
        assert_eq!(
            (l1d.eax >> 14) & 0xfff,
            1,
            "L1 shared by the 2 threads of a core"
        );
        assert_eq!(l1d.eax >> 26, 1, "2 cores");
        assert_eq!(
            (find(&cpuid, 4, 3).eax >> 14) & 0xfff,
            3,
            "L3 shared by all 4"
        );
        assert_eq!(find(&cpuid, 0xa, 0).eax, 0, "no PMU");
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, 1));
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 1));
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 1));
    }

    #[test]
    fn amd_topology_single_vcpu() {
        let mut cpuid = CpuId::from_entries(&[
            vendor_leaf(b"AuthenticAMD"),
            leaf(1, 0, 0x830f10),
            leaf(0x8000_0001, 0, 0),
            leaf(0x8000_0008, 0, 0x3030),
            leaf(0x8000_001d, 0, 0x121),
            leaf(0x8000_001e, 0, 0),
        ])
        .unwrap();
        assert_eq!(vendor_of(&cpuid), Vendor::Amd);
        let topo = Topology {
            cpu_index: 0,
            vcpu_count: 1,
            threads_per_core: 1,
        };
        normalize(&mut cpuid, topo, false);
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).ecx & AMD_ECX_CMP_LEGACY, 0);
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx & 0xff, 0);
        assert_eq!((find(&cpuid, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!(find(&cpuid, 0x8000_001e, 0).ebx, 0);
    }

    #[test]
    fn amd_two_vcpus_count_cores() {
        let mut cpuid = CpuId::from_entries(&[
            vendor_leaf(b"AuthenticAMD"),
            leaf(1, 0, 0),
            leaf(0x8000_0008, 0, 0),
            leaf(0x8000_001e, 0, 0),
        ])
        .unwrap();
        normalize(
            &mut cpuid,
            Topology {
                cpu_index: 1,
                vcpu_count: 2,
                threads_per_core: 1,
            },
            true,
        );
        let sizes = find(&cpuid, 0x8000_0008, 0);
        assert_eq!((sizes.ecx & 0xff, (sizes.ecx >> 12) & 0xf), (1, 1));
        let ext = find(&cpuid, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx), (1, 1));
    }

    #[test]
    fn bits_needed() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(bits_for), [0, 1, 2, 2, 3, 5]);
    }

    #[test]
    fn features_the_host_lacks_are_named() {
        let entry = |function, index, ebx, ecx| kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        };
        // The snapshot's vCPU had AVX2 (7.0 ebx bit 5), OSXSAVE (1 ecx bit 27) and SSE4.2.
        let saved = [
            entry(1, 0, 0, (1 << 27) | (1 << 20)),
            entry(7, 0, 1 << 5, 0),
        ];
        let same = [entry(1, 0, 0, 1 << 20), entry(7, 0, 1 << 5, 0)];
        assert!(
            missing_features(&saved, &same, &[]).is_empty(),
            "OSXSAVE is run-time state"
        );
        let older = [entry(1, 0, 0, 1 << 20), entry(7, 0, 0, 0)];
        assert_eq!(
            missing_features(&saved, &older, &[]),
            vec!["leaf 0x7.0 ebx bit 5".to_string()]
        );
        assert_eq!(missing_features(&saved, &[], &[]).len(), 2);
        assert!(
            missing_features(&saved, &[], &saved).is_empty(),
            "features the CPU itself has are not missing"
        );
    }
}
