//! Firecracker's configuration file (`--config-file`): the JSON keys, their defaults and
//! the checks made before anything is created.

use std::path::{Path, PathBuf};

use devices::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};

use crate::arch::layout::MAX_VCPUS;

/// Firecracker's default command line, used when `boot_args` is absent.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd swiotlb=noforce";
/// Smallest guest reapvm boots: the kernel is loaded at 16 MiB and needs room above it.
pub const MIN_MEM_SIZE_MIB: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config: `boot-source` is missing")]
    MissingBootSource,
    #[error("config: vcpu_count {0} is out of range (1 to {MAX_VCPUS})")]
    VcpuCount(u64),
    #[error("config: vcpu_count {0} with smt enabled must be 1 or even")]
    SmtOddVcpus(u8),
    #[error("config: mem_size_mib {0} is below the minimum of {MIN_MEM_SIZE_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("config: mem_size_mib {size_mib} is more than this host's {host_mib} MiB of RAM")]
    MemoryTooLarge { size_mib: u64, host_mib: u64 },
    #[error("config: vsock guest_cid {0} is reserved: use 3 or more")]
    VsockCid(u32),
    #[error("config: vsock uds_path is empty")]
    VsockPath,
    #[error("config: `{0}` is not supported by reapvm yet")]
    Unsupported(&'static str),
    #[error("config: cpu_template {0:?} is not one of None, T2, T2S, T2CL, C3, T2A")]
    CpuTemplate(String),
    #[error("config: huge_pages {0:?} is not supported (only \"None\")")]
    HugePages(String),
    #[error("config: {kind} {id:?} is empty or used twice")]
    DuplicateId { kind: &'static str, id: String },
    #[error("config: more than one drive has is_root_device set")]
    TwoRootDrives,
    #[error("config: drive {id}: {what} is not supported by reapvm")]
    DriveOption { id: String, what: &'static str },
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    MmdsNoInterfaces,
    #[error("The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface: {0:?}.")]
    MmdsInterface(String),
    #[error("The MMDS IPv4 address is not link local: {0} (use 169.254.1.0 to 169.254.254.255).")]
    MmdsIpv4(std::net::Ipv4Addr),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default)]
    pub boot_args: Option<String>,
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

impl BootSource {
    pub fn boot_args(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl MachineConfig {
    /// Checks vCPU and memory limits; `host_ram_bytes` bounds the memory.
    pub fn validate(&self, host_ram_bytes: u64) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > u64::from(MAX_VCPUS) {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(ConfigError::SmtOddVcpus(self.vcpu_count as u8));
        }
        if self.mem_size_mib < MIN_MEM_SIZE_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_size_mib));
        }
        let host_mib = host_ram_bytes >> 20;
        if self.mem_size_mib > host_mib {
            return Err(ConfigError::MemoryTooLarge {
                size_mib: self.mem_size_mib,
                host_mib,
            });
        }
        match self.cpu_template.as_deref() {
            None | Some("None" | "T2" | "T2S" | "T2CL" | "C3" | "T2A") => {}
            Some(other) => return Err(ConfigError::CpuTemplate(other.to_string())),
        }
        match self.huge_pages.as_deref() {
            None | Some("None") => {}
            Some(other) => return Err(ConfigError::HugePages(other.to_string())),
        }
        Ok(())
    }
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// One `drives[]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default)]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: Option<String>,
    #[serde(default)]
    pub io_engine: Option<String>,
    /// Firecracker's token buckets on the drive's bytes and requests.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub socket: Option<String>,
}

/// One `network-interfaces[]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    pub module: Option<String>,
}

/// The whole file. Keys of features reapvm does not have yet parse, and are refused by
/// [`VmConfig::validate`] with a message naming them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub balloon: Option<serde_json::Value>,
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<MmdsConfig>,
    #[serde(default)]
    pub entropy: Option<EntropyConfig>,
    /// A custom CPU template (Firecracker's `cpu-config`): the template itself, or the path
    /// of a file holding it. Takes the place of `machine-config.cpu_template`.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<CpuConfigSource>,
    /// reapvm's: map the replay guest's control page (docs/replay.md) into this VM's MMIO
    /// space. Off by default: no other guest has any use for it. Kept in snapshots.
    #[serde(rename = "replay-control", default)]
    pub replay_control: bool,
}

/// MMDS (`mmds-config` in the config file, `PUT /mmds/config`): which interfaces lead to
/// it, at which address, and how the guest must ask. Kept in snapshots; the data is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: devices::mmds::MmdsVersion,
    pub network_interfaces: Vec<String>,
    #[serde(default)]
    pub ipv4_address: Option<std::net::Ipv4Addr>,
    /// Answer in EC2's IMDS format whatever the guest's Accept header says.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    pub fn ipv4(&self) -> std::net::Ipv4Addr {
        self.ipv4_address.unwrap_or(devices::mmds::DEFAULT_IPV4)
    }

    /// Whether MMDS is reachable through the interface `iface_id`.
    pub fn serves(&self, iface_id: &str) -> bool {
        self.network_interfaces.iter().any(|id| id == iface_id)
    }

    /// Firecracker's checks, against the interfaces configured.
    pub fn validate(&self, interfaces: &[NetworkInterfaceConfig]) -> Result<(), ConfigError> {
        if self.network_interfaces.is_empty() {
            return Err(ConfigError::MmdsNoInterfaces);
        }
        if let Some(id) = self
            .network_interfaces
            .iter()
            .find(|id| !interfaces.iter().any(|n| &n.iface_id == *id))
        {
            return Err(ConfigError::MmdsInterface(id.clone()));
        }
        if !devices::mmds::is_valid_mmds_ipv4(self.ipv4()) {
            return Err(ConfigError::MmdsIpv4(self.ipv4()));
        }
        Ok(())
    }
}

/// The entropy device (`entropy` in the config file, `PUT /entropy`): virtio-rng.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Firecracker's token buckets on the bytes handed out and the requests.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Where a custom CPU template comes from: a string is a file's path, an object the
/// template itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CpuConfigSource {
    Path(PathBuf),
    Inline(crate::arch::cpu_template::CustomCpuTemplate),
}

impl<'de> Deserialize<'de> for CpuConfigSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // Decided by the JSON's kind, so a bad template says what is wrong in it.
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(path) => Ok(Self::Path(path.into())),
            other => serde_json::from_value(other)
                .map(Self::Inline)
                .map_err(|e| D::Error::custom(format!("cpu-config: {e}"))),
        }
    }
}

/// The vsock device (`vsock` in the config file, `PUT /vsock`): virtio-vsock with
/// Firecracker's Unix-socket backend (docs/api.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Deprecated in Firecracker and ignored there too; kept so clients that send it work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's address (3 or more; 0-2 are reserved).
    pub guest_cid: u32,
    /// Host programs connect here (`CONNECT PORT\n`); the guest's connections to host port
    /// PORT go to `uds_path_PORT`.
    pub uds_path: PathBuf,
}

/// Where metrics go (`metrics` in the config file, `PUT /metrics`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: PathBuf,
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        if self.uds_path.as_os_str().is_empty() {
            return Err(ConfigError::VsockPath);
        }
        Ok(())
    }
}

/// The JSON of `--metadata`, for the MMDS data store.
pub fn read_metadata(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))
}

impl VmConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks what can be checked without touching KVM; `host_ram_bytes` bounds the memory.
    pub fn validate(&self, host_ram_bytes: u64) -> Result<(), ConfigError> {
        if self.boot_source.is_none() {
            return Err(ConfigError::MissingBootSource);
        }
        self.validate_drives()?;
        self.validate_network_interfaces()?;
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(mmds) = &self.mmds_config {
            mmds.validate(&self.network_interfaces)?;
        }
        if self.balloon.is_some() {
            return Err(ConfigError::Unsupported("balloon"));
        }
        self.machine_config.validate(host_ram_bytes)
    }

    /// Checks the drives and network interfaces alone (used by the API on each PUT).
    pub fn validate_devices(&self) -> Result<(), ConfigError> {
        self.validate_drives()?;
        self.validate_network_interfaces()
    }

    fn validate_drives(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut roots = 0;
        for d in &self.drives {
            if d.drive_id.is_empty() || !seen.insert(d.drive_id.as_str()) {
                return Err(ConfigError::DuplicateId {
                    kind: "drive_id",
                    id: d.drive_id.clone(),
                });
            }
            if d.is_root_device {
                roots += 1;
            }
            let unsupported = [
                ("socket (vhost-user)", d.socket.is_some()),
                (
                    "io_engine other than Sync",
                    d.io_engine.as_deref().is_some_and(|e| e != "Sync"),
                ),
            ];
            if let Some((what, _)) = unsupported.iter().find(|(_, on)| *on) {
                return Err(ConfigError::DriveOption {
                    id: d.drive_id.clone(),
                    what,
                });
            }
        }
        if roots > 1 {
            return Err(ConfigError::TwoRootDrives);
        }
        Ok(())
    }

    fn validate_network_interfaces(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut taps = std::collections::HashSet::new();
        for n in &self.network_interfaces {
            if n.iface_id.is_empty() || !seen.insert(n.iface_id.as_str()) {
                return Err(ConfigError::DuplicateId {
                    kind: "iface_id",
                    id: n.iface_id.clone(),
                });
            }
            if !taps.insert(n.host_dev_name.as_str()) {
                return Err(ConfigError::DuplicateId {
                    kind: "host_dev_name",
                    id: n.host_dev_name.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn vcpu_count(&self) -> u8 {
        self.machine_config.vcpu_count as u8
    }

    pub fn mem_size_bytes(&self) -> u64 {
        self.machine_config.mem_size_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 8 << 30;

    fn parse(json: &str) -> Result<VmConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn firecracker_example_parses() {
        let cfg = parse(
            r#"{
              "boot-source": {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0 reboot=k", "initrd_path": null},
              "drives": [],
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false}
            }"#,
        )
        .unwrap();
        cfg.validate(HOST).unwrap();
        assert_eq!(cfg.vcpu_count(), 2);
        assert_eq!(cfg.mem_size_bytes(), 1 << 30);
        assert_eq!(
            cfg.boot_source.unwrap().boot_args(),
            "console=ttyS0 reboot=k"
        );
    }

    #[test]
    fn defaults_match_firecracker() {
        let cfg = parse(r#"{"boot-source": {"kernel_image_path": "k"}}"#).unwrap();
        cfg.validate(HOST).unwrap();
        assert_eq!(
            (cfg.vcpu_count(), cfg.machine_config.mem_size_mib),
            (1, 128)
        );
        assert_eq!(cfg.boot_source.unwrap().boot_args(), DEFAULT_BOOT_ARGS);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse(r#"{"boot-source": {"kernel_image_path": "k"}, "bogus": 1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
        let err = parse(r#"{"boot-source": {"kernel_image_path": "k", "kernel": 1}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `kernel`"), "{err}");
        assert!(parse("{not json").is_err());
        assert!(parse(r#"{"machine-config": {"vcpu_count": "two", "mem_size_mib": 1}}"#).is_err());
    }

    #[test]
    fn limits() {
        let with = |vcpus: u64, mib: u64, smt: bool| {
            let mut cfg = parse(r#"{"boot-source": {"kernel_image_path": "k"}}"#).unwrap();
            cfg.machine_config.vcpu_count = vcpus;
            cfg.machine_config.mem_size_mib = mib;
            cfg.machine_config.smt = smt;
            cfg.validate(HOST)
        };
        assert!(matches!(
            with(0, 128, false),
            Err(ConfigError::VcpuCount(0))
        ));
        assert!(matches!(
            with(33, 128, false),
            Err(ConfigError::VcpuCount(33))
        ));
        assert!(matches!(
            with(3, 128, true),
            Err(ConfigError::SmtOddVcpus(3))
        ));
        assert!(with(32, 128, false).is_ok());
        assert!(matches!(
            with(1, 8, false),
            Err(ConfigError::MemoryTooSmall(8))
        ));
        assert!(matches!(
            with(1, 16 << 10, false),
            Err(ConfigError::MemoryTooLarge { host_mib: 8192, .. })
        ));
    }

    #[test]
    fn drives_and_interfaces() {
        let cfg = parse(
            r#"{"boot-source": {"kernel_image_path": "k"},
                "drives": [{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false},
                           {"drive_id": "data", "path_on_host": "/d.img", "is_root_device": false, "rate_limiter": null}],
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}]}"#,
        )
        .unwrap();
        cfg.validate(HOST).unwrap();
        assert_eq!(cfg.drives.len(), 2);
        assert_eq!(cfg.network_interfaces[0].host_dev_name, "tap0");
        let two_roots = r#"{"boot-source": {"kernel_image_path": "k"}, "drives": [
            {"drive_id": "a", "path_on_host": "/a", "is_root_device": true},
            {"drive_id": "b", "path_on_host": "/b", "is_root_device": true}]}"#;
        assert!(matches!(
            parse(two_roots).unwrap().validate(HOST),
            Err(ConfigError::TwoRootDrives)
        ));
        let dup = r#"{"boot-source": {"kernel_image_path": "k"}, "drives": [
            {"drive_id": "a", "path_on_host": "/a", "is_root_device": false},
            {"drive_id": "a", "path_on_host": "/b", "is_root_device": false}]}"#;
        assert!(matches!(
            parse(dup).unwrap().validate(HOST),
            Err(ConfigError::DuplicateId { .. })
        ));
        let limited = r#"{"boot-source": {"kernel_image_path": "k"}, "drives": [
            {"drive_id": "a", "path_on_host": "/a", "is_root_device": false,
             "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}, "ops": null}}]}"#;
        let cfg = parse(limited).unwrap();
        cfg.validate(HOST).unwrap();
        assert_eq!(
            cfg.drives[0].rate_limiter.unwrap().bandwidth.unwrap().size,
            1048576
        );
        let bad = r#"{"boot-source": {"kernel_image_path": "k"}, "drives": [
            {"drive_id": "a", "path_on_host": "/a", "is_root_device": false, "rate_limiter": {"bandwidth": {}}}]}"#;
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.contains("missing field `size`"), "{e}");
        assert!(
            parse(r#"{"drives": [{"drive_id": "a"}]}"#).is_err(),
            "path_on_host is required"
        );
    }

    #[test]
    fn vsock_takes_firecracker_s_fields_and_checks_the_cid() {
        let with = |vsock: &str| {
            parse(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "k"}}, "vsock": {vsock}}}"#
            ))
        };
        let cfg =
            with(r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}"#).unwrap();
        cfg.validate(HOST).unwrap();
        assert_eq!(cfg.vsock.unwrap().guest_cid, 3);
        let reserved = with(r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#).unwrap();
        let e = reserved.validate(HOST).unwrap_err().to_string();
        assert!(e.contains("guest_cid 2"), "{e}");
        let empty = with(r#"{"guest_cid": 3, "uds_path": ""}"#).unwrap();
        assert!(matches!(empty.validate(HOST), Err(ConfigError::VsockPath)));
        for bad in [
            r#"{"guest_cid": 3}"#,
            r#"{"guest_cid": -1, "uds_path": "/v"}"#,
            r#"{"guest_cid": 3, "uds_path": "/v", "bogus": 1}"#,
        ] {
            assert!(with(bad).is_err(), "{bad}");
        }
    }

    /// `cpu-config` takes the template itself or the path of a file holding it.
    #[test]
    fn cpu_config_is_a_template_or_a_path() {
        let inline = parse(
            r#"{"boot-source": {"kernel_image_path": "k"}, "cpu-config": {"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b0"}]}}"#,
        )
        .unwrap();
        inline.validate(HOST).unwrap();
        assert!(matches!(
            inline.cpu_config,
            Some(CpuConfigSource::Inline(_))
        ));
        let path =
            parse(r#"{"boot-source": {"kernel_image_path": "k"}, "cpu-config": "/etc/t2.json"}"#)
                .unwrap();
        assert_eq!(
            path.cpu_config,
            Some(CpuConfigSource::Path("/etc/t2.json".into()))
        );
        let e = parse(r#"{"cpu-config": {"msr_modifiers": [{"addr": "69", "bitmap": "0b1"}]}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0x"), "the reason is kept: {e}");
        assert!(parse(r#"{"cpu-config": {"bogus": 1}}"#).is_err());
    }

    #[test]
    fn mmds_config_is_checked_as_firecracker_does() {
        let with = |mmds: &str| {
            parse(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "k"}}, "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0"}}], "mmds-config": {mmds}}}"#
            ))
        };
        let cfg = with(
            r#"{"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"}"#,
        )
        .unwrap();
        cfg.validate(HOST).unwrap();
        let mmds = cfg.mmds_config.unwrap();
        assert_eq!(mmds.version, devices::mmds::MmdsVersion::V2);
        assert_eq!(mmds.ipv4(), std::net::Ipv4Addr::new(169, 254, 170, 2));
        assert!(mmds.serves("eth0") && !mmds.serves("eth1"));
        let v1 = with(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        assert_eq!(
            v1.mmds_config.as_ref().unwrap().version,
            devices::mmds::MmdsVersion::V1
        );
        assert_eq!(v1.mmds_config.unwrap().ipv4(), devices::mmds::DEFAULT_IPV4);
        let refused = |mmds: &str| with(mmds).unwrap().validate(HOST).unwrap_err().to_string();
        assert!(refused(r#"{"network_interfaces": []}"#).contains("is empty"));
        assert!(refused(r#"{"network_interfaces": ["eth9"]}"#).contains("\"eth9\""));
        assert!(
            refused(r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#)
                .contains("10.0.0.1")
        );
        assert!(with(r#"{"network_interfaces": ["eth0"], "version": "V3"}"#).is_err());
        assert!(with(r#"{"network_interfaces": ["eth0"], "bogus": 1}"#).is_err());
    }

    #[test]
    fn later_features_are_named() {
        let cfg = parse(r#"{"boot-source": {"kernel_image_path": "k"}, "balloon": {}}"#).unwrap();
        assert!(matches!(
            cfg.validate(HOST),
            Err(ConfigError::Unsupported("balloon"))
        ));
        let cfg = parse(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#).unwrap();
        assert!(matches!(
            cfg.validate(HOST),
            Err(ConfigError::MissingBootSource)
        ));
    }

    #[test]
    fn entropy_takes_a_rate_limiter_and_no_unknown_keys() {
        let with = |entropy: &str| {
            parse(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "k"}}, "entropy": {entropy}}}"#
            ))
        };
        assert!(with("{}").unwrap().validate(HOST).is_ok());
        assert!(with(r#"{"rate_limiter": null}"#)
            .unwrap()
            .validate(HOST)
            .is_ok());
        let limited =
            with(r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#).unwrap();
        limited.validate(HOST).unwrap();
        assert!(limited.entropy.unwrap().rate_limiter.unwrap().limits());
        assert!(with(r#"{"rate": 1}"#).is_err(), "unknown keys are refused");
    }
}
