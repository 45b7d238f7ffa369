//! CPU templates, as Firecracker takes them: a custom template (`PUT /cpu-config`, the config
//! file's `cpu-config`) masks CPUID registers and MSRs with bitmaps, and the static templates
//! (`cpu_template` `T2`, `T2S`, `T2CL`, `C3` on Intel hosts, `T2A` on AMD hosts) are custom
//! templates kept here, refused on a host of the other vendor. A template is applied to the
//! CPUID KVM supports before reapvm's own per-vCPU normalisation (topology, APIC ids, the
//! hypervisor bit), and its MSRs are written to every vCPU at boot; a snapshot keeps the
//! result (the vCPUs' CPUID and MSRs), so a restore does not apply it again.

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::cpuid::Vendor;

#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    #[error("cpu_template {0:?}: CPU vendor mismatched between actual CPU and CPU template (this host's CPU is {1:?}; T2, T2S, T2CL and C3 are Intel's, T2A is AMD's)")]
    Vendor(String, Vendor),
    #[error("cpu_template {name:?}: the current CPU model ({fms:#x}) is not permitted to apply the CPU template (needs Cascade Lake, {min:#x}, or later)")]
    Model { name: String, fms: u32, min: u32 },
    #[error("cpu_template {0:?} is not one of None, T2, T2S, T2CL, C3, T2A")]
    Unknown(String),
    #[error("the CPU template changes CPUID leaf {leaf:#x} subleaf {subleaf:#x}, which KVM does not support here")]
    CpuidLeaf { leaf: u32, subleaf: u32 },
    #[error("the CPU template needs KVM capability {0}, which this host's KVM lacks")]
    KvmCapability(u32),
    #[error("the CPU template changes MSR {0:#x}, which KVM does not let a vCPU read")]
    Msr(u32),
    #[error("KVM refused to set MSR {0:#x} to the CPU template's value")]
    MsrRefused(u32),
    #[error("cannot build the template's MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("KVM_GET_MSRS/KVM_SET_MSRS for the template's MSRs failed: {0}")]
    MsrIoctl(kvm_ioctls::Error),
    #[error("cannot read the CPU template file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("CPU template file {path}: {source}")]
    Parse {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
}

/// A register value filter: the bits `filter` selects are set to those of `value`; the
/// others are kept. Written as Firecracker's bitmap strings, most significant bit first:
/// `0`/`1` force a bit, `x` keeps it, `_` separates; a short string keeps the high bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bitmap<const BITS: u32> {
    pub filter: u64,
    pub value: u64,
}

impl<const BITS: u32> Bitmap<BITS> {
    pub fn parse(text: &str) -> Result<Self, String> {
        let digits = text.strip_prefix("0b").unwrap_or(text);
        let mut bitmap = Self::default();
        let mut bit = 0u32;
        for c in digits.bytes().rev() {
            if c == b'_' {
                continue;
            }
            if bit == BITS {
                return Err(format!("bitmap {text:?} is longer than {BITS} bits"));
            }
            match c {
                b'0' => bitmap.filter |= 1 << bit,
                b'1' => {
                    bitmap.filter |= 1 << bit;
                    bitmap.value |= 1 << bit;
                }
                b'x' => {}
                other => {
                    return Err(format!(
                        "bitmap {text:?}: {:?} is not 0, 1, x or _",
                        other as char
                    ))
                }
            }
            bit += 1;
        }
        Ok(bitmap)
    }

    pub fn apply(&self, old: u64) -> u64 {
        (old & !self.filter) | self.value
    }
}

impl<const BITS: u32> std::fmt::Display for Bitmap<BITS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("0b")?;
        for bit in (0..BITS).rev() {
            let c = match (self.filter >> bit & 1, self.value >> bit & 1) {
                (0, _) => 'x',
                (_, 0) => '0',
                _ => '1',
            };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl<'de, const BITS: u32> Deserialize<'de> for Bitmap<BITS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(D::Error::custom)
    }
}

impl<const BITS: u32> Serialize for Bitmap<BITS> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A leaf, subleaf or MSR address: a string with a `0x` or `0b` prefix, as Firecracker
/// takes them (decimal is refused there too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Number(pub u32);

impl Number {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (digits, radix) = if let Some(d) = text.strip_prefix("0x") {
            (d, 16)
        } else if let Some(d) = text.strip_prefix("0b") {
            (d, 2)
        } else {
            return Err(format!(
                "{text:?}: prefix the number with 0x (hexadecimal) or 0b (binary)"
            ));
        };
        u32::from_str_radix(digits, radix)
            .map(Number)
            .map_err(|e| format!("{text:?} is not a number: {e}"))
    }
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(D::Error::custom)
    }
}

impl Serialize for Number {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidRegisterModifier {
    pub register: Register,
    pub bitmap: Bitmap<32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeafModifier {
    pub leaf: Number,
    pub subleaf: Number,
    /// KVM's CPUID entry flags (1: the subleaf is significant); they replace the entry's.
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrModifier {
    pub addr: Number,
    pub bitmap: Bitmap<64>,
}

/// A KVM capability the template needs (`"N"`), or one of the default checks it drops
/// (`"!N"`). reapvm checks its own required capabilities whatever the template says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmCapability {
    Add(u32),
    Remove(u32),
}

impl<'de> Deserialize<'de> for KvmCapability {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let (remove, digits) = match text.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let n: u32 = digits.parse().map_err(|_| {
            D::Error::custom(format!("kvm capability {text:?} is not N or !N (decimal)"))
        })?;
        Ok(if remove {
            Self::Remove(n)
        } else {
            Self::Add(n)
        })
    }
}

impl Serialize for KvmCapability {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Add(n) => s.serialize_str(&n.to_string()),
            Self::Remove(n) => s.serialize_str(&format!("!{n}")),
        }
    }
}

/// Firecracker's custom CPU template (x86_64).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCpuTemplate {
    #[serde(default)]
    pub kvm_capabilities: Vec<KvmCapability>,
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifier>,
}

impl CustomCpuTemplate {
    pub fn from_file(path: &std::path::Path) -> Result<Self, CpuTemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| CpuTemplateError::File {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| CpuTemplateError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks the capabilities the template adds.
    pub fn check_kvm(&self, kvm: &Kvm) -> Result<(), CpuTemplateError> {
        for cap in &self.kvm_capabilities {
            if let KvmCapability::Add(n) = cap {
                if kvm.check_extension_raw(u64::from(*n)) == 0 {
                    return Err(CpuTemplateError::KvmCapability(*n));
                }
            }
        }
        Ok(())
    }

    /// Masks the CPUID KVM supports; every leaf the template names must be there.
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) -> Result<(), CpuTemplateError> {
        for leaf in &self.cpuid_modifiers {
            let entry = cpuid
                .as_mut_slice()
                .iter_mut()
                .find(|e| e.function == leaf.leaf.0 && e.index == leaf.subleaf.0)
                .ok_or(CpuTemplateError::CpuidLeaf {
                    leaf: leaf.leaf.0,
                    subleaf: leaf.subleaf.0,
                })?;
            entry.flags = leaf.flags;
            for m in &leaf.modifiers {
                let reg = match m.register {
                    Register::Eax => &mut entry.eax,
                    Register::Ebx => &mut entry.ebx,
                    Register::Ecx => &mut entry.ecx,
                    Register::Edx => &mut entry.edx,
                };
                *reg = m.bitmap.apply(u64::from(*reg)) as u32;
            }
        }
        Ok(())
    }

    /// The template's MSRs as vCPU `first` has them (its CPUID set), masked: what every
    /// vCPU gets. Boot MSRs (`skip`) are the boot's.
    pub fn msr_entries(
        &self,
        first: &VcpuFd,
        skip: &[u32],
    ) -> Result<Vec<kvm_msr_entry>, CpuTemplateError> {
        // Each MSR once, its modifiers applied in order (as Firecracker stacks them).
        let mut addrs: Vec<u32> = Vec::new();
        for m in &self.msr_modifiers {
            if !skip.contains(&m.addr.0) && !addrs.contains(&m.addr.0) {
                addrs.push(m.addr.0);
            }
        }
        if addrs.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<kvm_msr_entry> = addrs
            .iter()
            .map(|index| kvm_msr_entry {
                index: *index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(CpuTemplateError::MsrList)?;
        let read = first
            .get_msrs(&mut msrs)
            .map_err(CpuTemplateError::MsrIoctl)?;
        if read < addrs.len() {
            return Err(CpuTemplateError::Msr(addrs[read]));
        }
        Ok(msrs
            .as_slice()
            .iter()
            .map(|entry| kvm_msr_entry {
                index: entry.index,
                data: self
                    .msr_modifiers
                    .iter()
                    .filter(|m| m.addr.0 == entry.index)
                    .fold(entry.data, |value, m| m.bitmap.apply(value)),
                ..Default::default()
            })
            .collect())
    }

    pub fn msr_addrs(&self) -> impl Iterator<Item = u32> + '_ {
        self.msr_modifiers.iter().map(|m| m.addr.0)
    }
}

/// Writes the template's MSRs to a vCPU.
pub fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), CpuTemplateError> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(CpuTemplateError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(CpuTemplateError::MsrIoctl)?;
    match entries.get(set) {
        Some(refused) => Err(CpuTemplateError::MsrRefused(refused.index)),
        None => Ok(()),
    }
}

/// Cascade Lake's family/model/stepping, the oldest CPU `T2CL` allows (Firecracker 1.10).
const CASCADE_LAKE_FMS: u32 = 0x50657;

/// The static template `name` for a host of `vendor` whose CPUID leaf 1 EAX is `fms`.
pub fn static_template(
    name: &str,
    vendor: Vendor,
    fms: u32,
) -> Result<CustomCpuTemplate, CpuTemplateError> {
    let intel = |t: CustomCpuTemplate| match vendor {
        Vendor::Intel => Ok(t),
        other => Err(CpuTemplateError::Vendor(name.to_string(), other)),
    };
    match name {
        "T2" => intel(t2(false)),
        "T2S" => intel(t2(true)),
        "C3" => intel(c3()),
        "T2CL" => {
            let t = intel(t2cl())?;
            // Family/model/stepping without the processor type bits.
            let fms = fms & 0x0fff_3fff;
            if fms < CASCADE_LAKE_FMS {
                return Err(CpuTemplateError::Model {
                    name: name.to_string(),
                    fms,
                    min: CASCADE_LAKE_FMS,
                });
            }
            Ok(t)
        }
        "T2A" => match vendor {
            Vendor::Amd => Ok(t2a()),
            other => Err(CpuTemplateError::Vendor(name.to_string(), other)),
        },
        other => Err(CpuTemplateError::Unknown(other.to_string())),
    }
}

/// The host's CPU as its own CPUID says: the vendor and leaf 1 EAX.
pub fn host_cpu() -> (Vendor, u32) {
    // SAFETY: CPUID exists on every x86_64 CPU and only reads (`__cpuid` is a safe
    // function from Rust 1.87; the declared minimum is older).
    #[allow(unused_unsafe)]
    let (leaf0, leaf1) = unsafe { (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1)) };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    let vendor = match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    };
    (vendor, leaf1.eax)
}

fn leaf(leaf: u32, subleaf: u32, flags: u32, regs: &[(Register, &str)]) -> CpuidLeafModifier {
    CpuidLeafModifier {
        leaf: Number(leaf),
        subleaf: Number(subleaf),
        flags,
        modifiers: regs
            .iter()
            .map(|(register, bitmap)| CpuidRegisterModifier {
                register: *register,
                bitmap: Bitmap::parse(bitmap).expect("the static templates' bitmaps are valid"),
            })
            .collect(),
    }
}

fn arch_capabilities(bitmap: &str) -> MsrModifier {
    MsrModifier {
        addr: Number(0x10a),
        bitmap: Bitmap::parse(bitmap).expect("the static templates' bitmaps are valid"),
    }
}

use Register::{Eax, Ebx, Ecx, Edx};

/// The leaves T2, T2S, T2CL and T2A share (Firecracker 1.10's tables).
fn t2_common() -> Vec<CpuidLeafModifier> {
    [
        leaf(
            0x1,
            0x0,
            0,
            &[
                (Eax, "0bxxxx000000000011xx00011011110010"),
                (Ecx, "0bxxxxxxxxxxxxx0xx00xx00x0000000xx"),
                (Edx, "0b000x0xxxx00xx0xxxxx1xxxx1xxxxxxx"),
            ],
        ),
        leaf(
            0x7,
            0x0,
            1,
            &[
                (Ebx, "0b00000000000x000000x00x1xxxx0x0xx"),
                (Ecx, "0bx0xxxxxxx0xxxxx0x0x00000x0x0000x"),
                (Edx, "0bxxxxxxxxxxxxxxxxxxxxxxx0xxx000xx"),
            ],
        ),
    ]
    .into_iter()
    .chain(xsave_leaves())
    .collect()
}

/// The XSAVE leaves every static template masks alike: no MPX, AVX-512 or PKRU state, no
/// XSAVEC, XGETBV with ECX=1 or XSAVES.
fn xsave_leaves() -> [CpuidLeafModifier; 2] {
    [
        leaf(0xd, 0x0, 1, &[(Eax, "0bxxxxxxxxxxxxxxxxxxxxxx0x00000xxx")]),
        leaf(0xd, 0x1, 1, &[(Eax, "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxx000x")]),
    ]
}

/// A template of the T2 family: the shared leaves, its own extended leaves 0x80000001 (ECX,
/// EDX) and 0x80000008 (EBX), and IA32_ARCH_CAPABILITIES if it sets that.
fn t2_family(
    ext_ecx: &str,
    ext_edx: &str,
    sizes_ebx: &str,
    arch_caps: Option<&str>,
) -> CustomCpuTemplate {
    let mut cpuid = t2_common();
    cpuid.push(leaf(0x8000_0001, 0x0, 0, &[(Ecx, ext_ecx), (Edx, ext_edx)]));
    cpuid.push(leaf(0x8000_0008, 0x0, 0, &[(Ebx, sizes_ebx)]));
    CustomCpuTemplate {
        kvm_capabilities: Vec::new(),
        cpuid_modifiers: cpuid,
        msr_modifiers: arch_caps.map(arch_capabilities).into_iter().collect(),
    }
}

fn t2(with_arch_capabilities: bool) -> CustomCpuTemplate {
    t2_family(
        "0bxx0xxxxxxxxxxxxxxxxxxxx0xxxxxxxx",
        "0bxxxxx0xxxxxxxxxxxxxxxxxxxxxxxxxx",
        "0bxxxxxxxxxxxxxxxxxxxxxx0xxxxxxxxx",
        with_arch_capabilities
            .then_some("0b0000000000000000000000000000000000001100000010000000110001001100"),
    )
}

fn t2cl() -> CustomCpuTemplate {
    t2_family(
        "0bxx0xxxxxxxxxxxxxxxxxxxx000xxxxxx",
        "0bxxxxx00000xxxxxxxxxxxxxxxxxxxxxx",
        "0bxxxxxxxxxxxxxxxxxxxxxx0xxxxxxxxx",
        Some("0b00000000000000000000000000000000000xxx0x0000x0x0xxx0000xxxxxxxxx"),
    )
}

fn t2a() -> CustomCpuTemplate {
    t2_family(
        "0bxx0xxxxxxxxxxxxxxxxxxxx000xxx0xx",
        "0bxxxxx00xx0xxxxxxxxxxxxxxxxxxxxxx",
        "0bxxxxxxxxxxx111xxxxxxxx0xxxxxx1x0",
        None,
    )
}

fn c3() -> CustomCpuTemplate {
    CustomCpuTemplate {
        kvm_capabilities: Vec::new(),
        cpuid_modifiers: [
            leaf(
                0x1,
                0x0,
                0,
                &[
                    (Eax, "0bxxxx000000000011xx00011011100100"),
                    (Ecx, "0bxxxxxxxxx0xxxxxx00x000x0xx0000xx"),
                    (Edx, "0b0x0x0xxxx00xx0xxxxx1xxxx1xxxxxxx"),
                ],
            ),
            leaf(
                0x7,
                0x0,
                1,
                &[
                    (Ebx, "0b000000000x0x000000x000x0xx0000xx"),
                    (Ecx, "0bx0xxxxxxx0xxxxx0x0xx0xxxxxx0000x"),
                    (Edx, "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxx00xx"),
                ],
            ),
            leaf(
                0x8000_0001,
                0x0,
                0,
                &[
                    (Ecx, "0bxxxxxxxxxxxxxxxxxxxxxxx0xx0xxxxx"),
                    (Edx, "0bxxxxx0xxxxxxxxxxxxxxxxxxxxxxxxxx"),
                ],
            ),
        ]
        .into_iter()
        .chain(xsave_leaves())
        .collect(),
        msr_modifiers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_read_from_the_least_significant_bit() {
        let b = Bitmap::<32>::parse("0b1x0_1").unwrap();
        assert_eq!((b.filter, b.value), (0b1011, 0b1001));
        assert_eq!(b.apply(0b0110), 0b1101);
        assert_eq!(b.to_string().len(), 34);
        assert_eq!(Bitmap::<32>::parse(&b.to_string()).unwrap(), b);
        assert!(Bitmap::<32>::parse(&"x".repeat(33)).is_err());
        assert!(Bitmap::<64>::parse(&"x".repeat(64)).is_ok());
        let e = Bitmap::<32>::parse("0b102").unwrap_err();
        assert!(e.contains("'2'"), "{e}");
    }

    #[test]
    fn numbers_need_their_prefix() {
        assert_eq!(Number::parse("0x80000001").unwrap(), Number(0x8000_0001));
        assert_eq!(Number::parse("0b101").unwrap(), Number(5));
        let e = Number::parse("69").unwrap_err();
        assert!(e.contains("0x"), "{e}");
        assert!(Number::parse("0xzz").is_err());
    }

    /// Firecracker's documented form parses; unknown keys and registers are refused.
    #[test]
    fn a_custom_template_parses_and_refuses_what_it_does_not_know() {
        let json = r#"{
            "kvm_capabilities": ["171", "!56"],
            "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0bx0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}],
            "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b0"}]
        }"#;
        let t: CustomCpuTemplate = serde_json::from_str(json).unwrap();
        assert_eq!(
            t.kvm_capabilities,
            [KvmCapability::Add(171), KvmCapability::Remove(56)]
        );
        assert_eq!(t.cpuid_modifiers[0].modifiers[0].bitmap.filter, 1 << 30);
        let again: CustomCpuTemplate =
            serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(again, t);
        for bad in [
            r#"{"vcpu_features": []}"#,
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [{"register": "esi", "bitmap": "0b1"}]}]}"#,
            r#"{"msr_modifiers": [{"addr": "266", "bitmap": "0b1"}]}"#,
            r#"{"kvm_capabilities": [56]}"#,
        ] {
            assert!(
                serde_json::from_str::<CustomCpuTemplate>(bad).is_err(),
                "{bad}"
            );
        }
    }

    /// The static templates' bitmaps say what Firecracker 1.10's tables say, as masks and
    /// values (the two were transcribed separately).
    #[test]
    fn static_templates_match_firecracker_s_masks() {
        let find = |t: &CustomCpuTemplate, l: u32, s: u32, r: Register| {
            let m = t
                .cpuid_modifiers
                .iter()
                .find(|x| x.leaf.0 == l && x.subleaf.0 == s)
                .unwrap();
            let b = m.modifiers.iter().find(|x| x.register == r).unwrap().bitmap;
            (b.filter as u32, b.value as u32)
        };
        let t2 = t2(false);
        assert_eq!(find(&t2, 0x1, 0, Eax), (0x0fff_3fff, 0x0003_06f2));
        assert_eq!(find(&t2, 0x1, 0, Ecx), (0x0004_cdfc, 0));
        assert_eq!(find(&t2, 0x1, 0, Edx), (0xe864_1080, 0x0000_1080));
        assert_eq!(find(&t2, 0x7, 0, Ebx), (0xffef_da14, 0x0000_0200));
        assert_eq!(find(&t2, 0x7, 0, Ecx), (0x4041_5f5e, 0));
        assert_eq!(find(&t2, 0x7, 0, Edx), (0x0000_011c, 0));
        assert_eq!(find(&t2, 0xd, 0, Eax), (0x0000_02f8, 0));
        assert_eq!(find(&t2, 0xd, 1, Eax), (0x0000_000e, 0));
        assert_eq!(find(&t2, 0x8000_0001, 0, Ecx), (0x2000_0100, 0));
        assert_eq!(find(&t2, 0x8000_0001, 0, Edx), (0x0400_0000, 0));
        assert_eq!(find(&t2, 0x8000_0008, 0, Ebx), (0x0000_0200, 0));
        let t2a = t2a();
        assert_eq!(find(&t2a, 0x8000_0001, 0, Ecx), (0x2000_01c4, 0));
        assert_eq!(find(&t2a, 0x8000_0001, 0, Edx), (0x0640_0000, 0));
        assert_eq!(find(&t2a, 0x8000_0008, 0, Ebx), (0x001c_0205, 0x001c_0004));
        let t2cl = t2cl();
        assert_eq!(find(&t2cl, 0x8000_0001, 0, Ecx), (0x2000_01c0, 0));
        assert_eq!(find(&t2cl, 0x8000_0001, 0, Edx), (0x07c0_0000, 0));
        let msr = t2cl.msr_modifiers[0].bitmap;
        assert_eq!((msr.filter, msr.value), (0xffff_ffff_e2f5_1e00, 0));
        let msr = super::t2(true).msr_modifiers[0].bitmap;
        assert_eq!((msr.filter, msr.value), (u64::MAX, 0x0c08_0c4c));
        let c3 = c3();
        assert_eq!(find(&c3, 0x1, 0, Eax), (0x0fff_3fff, 0x0003_06e4));
        assert_eq!(find(&c3, 0x1, 0, Ecx), (0x0040_dd3c, 0));
        assert_eq!(find(&c3, 0x1, 0, Edx), (0xa864_1080, 0x0000_1080));
        assert_eq!(find(&c3, 0x7, 0, Ebx), (0xffaf_dd3c, 0));
        assert_eq!(find(&c3, 0x7, 0, Ecx), (0x4041_481e, 0));
        assert_eq!(find(&c3, 0x7, 0, Edx), (0x0000_000c, 0));
        assert_eq!(find(&c3, 0x8000_0001, 0, Ecx), (0x0000_0120, 0));
    }

    #[test]
    fn a_template_of_the_other_vendor_or_an_older_model_is_refused() {
        let e = static_template("T2A", Vendor::Intel, 0x50657)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPU vendor mismatched"), "{e}");
        for name in ["T2", "T2S", "C3", "T2CL"] {
            assert!(matches!(
                static_template(name, Vendor::Amd, 0xa00f11),
                Err(CpuTemplateError::Vendor(..))
            ));
        }
        assert!(static_template("T2A", Vendor::Amd, 0xa00f11).is_ok());
        assert!(matches!(
            static_template("T2CL", Vendor::Intel, 0x50654),
            Err(CpuTemplateError::Model { .. })
        ));
        assert!(static_template("T2CL", Vendor::Intel, 0x606a6).is_ok());
        assert!(matches!(
            static_template("T3", Vendor::Intel, 0),
            Err(CpuTemplateError::Unknown(_))
        ));
    }

    #[test]
    fn applying_masks_the_named_leaves_and_refuses_a_missing_one() {
        let mut cpuid = CpuId::from_entries(&[kvm_bindings::kvm_cpuid_entry2 {
            function: 0x1,
            index: 0,
            ecx: 0xffff_ffff,
            ..Default::default()
        }])
        .unwrap();
        let t: CustomCpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b0x1"}]}]}"#,
        )
        .unwrap();
        t.apply_cpuid(&mut cpuid).unwrap();
        assert_eq!(cpuid.as_slice()[0].ecx, 0xffff_fffb);
        let missing: CustomCpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 1, "modifiers": []}]}"#,
        )
        .unwrap();
        assert!(matches!(
            missing.apply_cpuid(&mut cpuid),
            Err(CpuTemplateError::CpuidLeaf {
                leaf: 7,
                subleaf: 0
            })
        ));
    }

    /// Modifiers of one MSR stack, applied in order to the value vCPU 0 has (this host's
    /// KVM; SYSENTER_CS starts at 0).
    #[test]
    fn modifiers_of_one_msr_stack() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let t: CustomCpuTemplate = serde_json::from_str(
            r#"{"msr_modifiers": [{"addr": "0x174", "bitmap": "0b1"}, {"addr": "0x174", "bitmap": "0b1x"}]}"#,
        )
        .unwrap();
        let entries = t.msr_entries(&vcpu, &[]).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].index, entries[0].data), (0x174, 0b11));
        assert!(
            t.msr_entries(&vcpu, &[0x174]).unwrap().is_empty(),
            "a boot MSR stays the boot's"
        );
        set_msrs(&vcpu, &entries).unwrap();
    }
}
