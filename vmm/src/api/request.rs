//! Turns an HTTP method, path and body into an [`ApiRequest`], with Firecracker's paths,
//! bodies and error messages (`400 {"fault_message": ...}`).

use devices::rate_limiter::RateLimiterConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config::{
    BootSource, DriveConfig, EntropyConfig, LoggerConfig, MachineConfig, MetricsConfig, MmdsConfig,
    NetworkInterfaceConfig, VsockConfig,
};
pub use crate::restore::LoadSnapshotParams;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPath { method: String, path: String },
    #[error("The body of {method} {path} is not valid JSON for this request: {reason}")]
    Body {
        method: String,
        path: String,
        reason: String,
    },
    #[error("The id in the path ({path_id}) does not match the id in the body ({body_id}).")]
    IdMismatch { path_id: String, body_id: String },
    #[error("Empty request body for {method} {path}.")]
    EmptyBody { method: String, path: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Action {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    /// reapvm: end a REAP recording now and write the WS file.
    FinishWsRecording,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateChange {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: VmStateChange,
}

/// `PATCH /machine-config`: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u64>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

/// `PATCH /drives/{id}`: a new backing file, new rate limiter buckets, or both.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<std::path::PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{id}`: new rate limiter buckets either way.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfig,
    GetVmConfig,
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutBootSource(BootSource),
    PutDrive(DriveConfig),
    PatchDrive(DriveUpdate),
    PutNetworkInterface(NetworkInterfaceConfig),
    PatchNetworkInterface(NetworkInterfaceUpdate),
    PutLogger(LoggerConfig),
    PutEntropy(EntropyConfig),
    PutVsock(VsockConfig),
    PutCpuConfig(crate::arch::cpu_template::CustomCpuTemplate),
    PutMetrics(MetricsConfig),
    PutMmdsConfig(MmdsConfig),
    /// `PUT /mmds`: the whole MMDS document.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: a JSON merge patch over it.
    PatchMmds(serde_json::Value),
    GetMmds,
    Action(Action),
    PatchVm(VmStateChange),
    CreateSnapshot(CreateSnapshotParams),
    LoadSnapshot(LoadSnapshotParams),
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    #[serde(default)]
    pub snapshot_type: Option<String>,
    pub snapshot_path: std::path::PathBuf,
    pub mem_file_path: std::path::PathBuf,
    #[serde(default)]
    pub version: Option<String>,
}

fn body<T: DeserializeOwned>(method: &str, path: &str, bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody {
            method: method.to_string(),
            path: path.to_string(),
        });
    }
    let refused = |reason: String| ApiError::Body {
        method: method.to_string(),
        path: path.to_string(),
        reason,
    };
    // serde_path_to_error names the field a value was wrong in (`version: unknown
    // variant ...`), which serde_json alone leaves to a line and column.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        refused(if field == "." {
            inner.to_string()
        } else {
            format!("field `{field}`: {inner}")
        })
    })?;
    de.end().map_err(|e| refused(e.to_string()))?;
    Ok(value)
}

fn same_id(path_id: &str, body_id: &str) -> Result<(), ApiError> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(ApiError::IdMismatch {
            path_id: path_id.to_string(),
            body_id: body_id.to_string(),
        })
    }
}

/// Parses one API request. `path` may carry a query string, which is ignored.
pub fn parse(method: &str, path: &str, bytes: &[u8]) -> Result<ApiRequest, ApiError> {
    let path = path.split('?').next().unwrap_or("");
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let m = method;
    let invalid = || ApiError::InvalidPath {
        method: method.to_string(),
        path: path.to_string(),
    };
    let request = match (method, segments.as_slice()) {
        ("GET", [] | [""]) => ApiRequest::GetInstanceInfo,
        ("GET", ["version"]) => ApiRequest::GetVersion,
        ("GET", ["machine-config"]) => ApiRequest::GetMachineConfig,
        ("GET", ["vm", "config"]) => ApiRequest::GetVmConfig,
        ("PUT", ["machine-config"]) => ApiRequest::PutMachineConfig(body(m, path, bytes)?),
        ("PATCH", ["machine-config"]) => ApiRequest::PatchMachineConfig(body(m, path, bytes)?),
        ("PUT", ["boot-source"]) => ApiRequest::PutBootSource(body(m, path, bytes)?),
        ("PUT", ["drives", id]) if !id.is_empty() => {
            let drive: DriveConfig = body(m, path, bytes)?;
            same_id(id, &drive.drive_id)?;
            ApiRequest::PutDrive(drive)
        }
        ("PATCH", ["drives", id]) if !id.is_empty() => {
            let update: DriveUpdate = body(m, path, bytes)?;
            same_id(id, &update.drive_id)?;
            ApiRequest::PatchDrive(update)
        }
        ("PATCH", ["network-interfaces", id]) if !id.is_empty() => {
            let update: NetworkInterfaceUpdate = body(m, path, bytes)?;
            same_id(id, &update.iface_id)?;
            ApiRequest::PatchNetworkInterface(update)
        }
        ("PUT", ["network-interfaces", id]) if !id.is_empty() => {
            let iface: NetworkInterfaceConfig = body(m, path, bytes)?;
            same_id(id, &iface.iface_id)?;
            ApiRequest::PutNetworkInterface(iface)
        }
        ("PUT", ["logger"]) => ApiRequest::PutLogger(body(m, path, bytes)?),
        ("PUT", ["metrics"]) => ApiRequest::PutMetrics(body(m, path, bytes)?),
        ("PUT", ["entropy"]) => ApiRequest::PutEntropy(body(m, path, bytes)?),
        ("PUT", ["vsock"]) => ApiRequest::PutVsock(body(m, path, bytes)?),
        ("PUT", ["cpu-config"]) => ApiRequest::PutCpuConfig(body(m, path, bytes)?),
        ("PUT", ["mmds", "config"]) => ApiRequest::PutMmdsConfig(body(m, path, bytes)?),
        ("PUT", ["mmds"]) => ApiRequest::PutMmds(body(m, path, bytes)?),
        ("PATCH", ["mmds"]) => ApiRequest::PatchMmds(body(m, path, bytes)?),
        ("GET", ["mmds"]) => ApiRequest::GetMmds,
        ("PUT", ["actions"]) => ApiRequest::Action(body::<ActionBody>(m, path, bytes)?.action_type),
        ("PATCH", ["vm"]) => ApiRequest::PatchVm(body::<VmBody>(m, path, bytes)?.state),
        ("PUT", ["snapshot", "create"]) => ApiRequest::CreateSnapshot(body(m, path, bytes)?),
        ("PUT", ["snapshot", "load"]) => ApiRequest::LoadSnapshot(body(m, path, bytes)?),
        _ => return Err(invalid()),
    };
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gets() {
        assert_eq!(parse("GET", "/", b""), Ok(ApiRequest::GetInstanceInfo));
        assert_eq!(parse("GET", "/version", b""), Ok(ApiRequest::GetVersion));
        assert_eq!(
            parse("GET", "/machine-config", b""),
            Ok(ApiRequest::GetMachineConfig)
        );
        assert_eq!(parse("GET", "/vm/config", b""), Ok(ApiRequest::GetVmConfig));
    }

    #[test]
    fn firecracker_bodies() {
        let r = parse(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        )
        .unwrap();
        assert!(matches!(r, ApiRequest::PutBootSource(b) if b.boot_args() == "console=ttyS0"));
        let r = parse(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}"#,
        )
        .unwrap();
        assert!(matches!(r, ApiRequest::PutDrive(d) if d.is_root_device));
        let r = parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap();
        assert_eq!(r, ApiRequest::Action(Action::InstanceStart));
        let r = parse("PATCH", "/vm", br#"{"state": "Paused"}"#).unwrap();
        assert_eq!(r, ApiRequest::PatchVm(VmStateChange::Paused));
        let r = parse("PATCH", "/machine-config", br#"{"vcpu_count": 2}"#).unwrap();
        assert!(
            matches!(r, ApiRequest::PatchMachineConfig(u) if u.vcpu_count == Some(2) && u.mem_size_mib.is_none())
        );
        let r = parse("PUT", "/metrics", br#"{"metrics_path": "/m"}"#).unwrap();
        assert!(matches!(r, ApiRequest::PutMetrics(_)));
        assert_eq!(
            parse("PUT", "/entropy", br#"{"rate_limiter": null}"#),
            Ok(ApiRequest::PutEntropy(EntropyConfig { rate_limiter: None }))
        );
        assert!(parse("PUT", "/entropy", br#"{"bogus": 1}"#).is_err());
        let r = parse(
            "PUT",
            "/mmds/config",
            br#"{"version": "V2", "network_interfaces": ["eth0"]}"#,
        );
        assert!(matches!(r, Ok(ApiRequest::PutMmdsConfig(c)) if c.network_interfaces == ["eth0"]));
        let e = parse(
            "PUT",
            "/mmds/config",
            br#"{"version": "V9", "network_interfaces": []}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("field `version`") && e.contains("V9"), "{e}");
        let e = parse(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": "two", "mem_size_mib": 1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("field `vcpu_count`"), "{e}");
        let e = parse("PUT", "/drives/d", br#"{"drive_id": "d", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": -1}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("field `rate_limiter.bandwidth.size`"), "{e}");
        assert!(parse("PUT", "/entropy", b"{} trailing").is_err());
        assert!(matches!(
            parse("PUT", "/mmds", br#"{"latest": {}}"#),
            Ok(ApiRequest::PutMmds(v)) if v["latest"].is_object()
        ));
        assert!(matches!(
            parse("PATCH", "/mmds", b"{}"),
            Ok(ApiRequest::PatchMmds(_))
        ));
        assert!(parse("PUT", "/mmds", b"{not json").is_err());
        assert!(parse("PUT", "/mmds", b"").is_err());
        assert_eq!(parse("GET", "/mmds", b""), Ok(ApiRequest::GetMmds));
        let r = parse(
            "PUT",
            "/vsock",
            br#"{"guest_cid": 3, "uds_path": "/v.sock"}"#,
        )
        .unwrap();
        assert!(matches!(r, ApiRequest::PutVsock(v) if v.guest_cid == 3));
        let e = parse("PUT", "/vsock", br#"{"guest_cid": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("uds_path"), "{e}");
        let e = parse(
            "PUT",
            "/vsock",
            br#"{"guest_cid": 3, "uds_path": "/v", "cid": 1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cid"), "{e}");
        let r = parse(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
        )
        .unwrap();
        assert!(matches!(r, ApiRequest::LoadSnapshot(_)));
        let r = parse(
            "PATCH",
            "/drives/data",
            br#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#,
        )
        .unwrap();
        assert!(matches!(r, ApiRequest::PatchDrive(u)
            if u.path_on_host.is_none() && u.rate_limiter.unwrap().ops.unwrap().size == 100));
        let r = parse(
            "PATCH",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 1, "one_time_burst": 5, "refill_time": 10}}}"#,
        )
        .unwrap();
        assert!(matches!(r, ApiRequest::PatchNetworkInterface(u)
            if u.rx_rate_limiter.is_none() && u.tx_rate_limiter.unwrap().bandwidth.unwrap().one_time_burst == Some(5)));
    }

    #[test]
    fn patches_name_the_bad_field() {
        for (path, body, reason) in [
            (
                "/drives/a",
                r#"{"drive_id": "a", "is_read_only": true}"#,
                "unknown field `is_read_only`",
            ),
            (
                "/drives/a",
                r#"{"drive_id": "a", "rate_limiter": {"bandwidth": {"size": 1}}}"#,
                "missing field `refill_time`",
            ),
            (
                "/drives/a",
                r#"{"drive_id": "a", "rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}}"#,
                "invalid value: integer `-1`",
            ),
            (
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "tap1"}"#,
                "unknown field `host_dev_name`",
            ),
            (
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1, "burst": 2}}}"#,
                "unknown field `burst`",
            ),
        ] {
            let e = parse("PATCH", path, body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(reason), "{body}: {e}");
        }
        assert_eq!(
            parse("PATCH", "/drives/a", br#"{"drive_id": "b"}"#),
            Err(ApiError::IdMismatch {
                path_id: "a".into(),
                body_id: "b".into()
            })
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse(
            "PUT",
            "/drives/a",
            br#"{"drive_id": "b", "path_on_host": "/r", "is_root_device": false}"#,
        );
        assert_eq!(
            e,
            Err(ApiError::IdMismatch {
                path_id: "a".into(),
                body_id: "b".into()
            })
        );
        let e = parse("PUT", "/actions", br#"{"action_type": "Reboot"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `Reboot`"), "{e}");
        let e = parse(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 2, "mem_size_mib": 128, "bogus": 1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        assert!(matches!(
            parse("PUT", "/boot-source", b""),
            Err(ApiError::EmptyBody { .. })
        ));
        assert!(matches!(
            parse("DELETE", "/drives/a", b""),
            Err(ApiError::InvalidPath { .. })
        ));
        assert!(matches!(
            parse("GET", "/nope", b""),
            Err(ApiError::InvalidPath { .. })
        ));
        assert!(matches!(
            parse("PUT", "/drives/", b"{}"),
            Err(ApiError::InvalidPath { .. })
        ));
        assert!(matches!(
            parse("PUT", "/boot-source", b"{not json"),
            Err(ApiError::Body { .. })
        ));
    }
}
