//! `PUT /snapshot/load` as parsed once at the API edge: which memory backend, with which
//! files and options. Nothing past this module looks at the request's JSON again.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::reap::ReapOptions;

/// Where a restored VM's memory comes from (`mem_backend`, tagged by `backend_type` as in
/// Firecracker's API; `Reap` is reapvm's).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend_type", deny_unknown_fields)]
pub enum MemoryBackend {
    /// The memory file mapped MAP_PRIVATE: the host kernel pages it in on fault.
    File { backend_path: PathBuf },
    /// Anonymous memory behind a userfaultfd; reapvm's own fault loop fills each faulting
    /// page from the memory file.
    OnDemand {
        backend_path: PathBuf,
        /// Fill each fault with the aligned block of this many KiB around it (0: the
        /// faulting page alone, the paper's lazy baseline).
        #[serde(default)]
        fault_around_kib: u32,
    },
    /// Anonymous memory behind a userfaultfd handed to an external handler listening on this
    /// Unix socket (Firecracker's handshake).
    Uffd { backend_path: PathBuf },
    /// REAP: with a valid WS file, the working set installed before the guest runs and the
    /// rest on demand; without one, on demand while recording the WS.
    Reap {
        backend_path: PathBuf,
        /// The WS file (default: the memory file's path with `.ws` appended).
        #[serde(default)]
        ws_path: Option<PathBuf>,
        #[serde(default)]
        reap_options: ReapOptions,
    },
}

impl MemoryBackend {
    /// The backend's name as the API and the metrics spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::File { .. } => "File",
            Self::OnDemand { .. } => "OnDemand",
            Self::Uffd { .. } => "Uffd",
            Self::Reap { .. } => "Reap",
        }
    }

    /// The memory file this backend reads (None for `Uffd`, whose handler has it).
    pub fn mem_path(&self) -> Option<&Path> {
        match self {
            Self::File { backend_path }
            | Self::OnDemand { backend_path, .. }
            | Self::Reap { backend_path, .. } => Some(backend_path),
            Self::Uffd { .. } => None,
        }
    }

    /// `Reap`: the WS file and the options.
    pub fn reap(&self) -> Option<(PathBuf, ReapOptions)> {
        match self {
            Self::Reap {
                backend_path,
                ws_path,
                reap_options,
            } => {
                let ws_path = ws_path.clone().unwrap_or_else(|| {
                    let mut p = backend_path.clone().into_os_string();
                    p.push(".ws");
                    p.into()
                });
                Some((ws_path, *reap_options))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `vsock_override` on load: the restored vsock device listens here instead of its saved
/// `uds_path` (which the snapshotted VM may still hold).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "LoadSnapshotBody")]
pub struct LoadSnapshotParams {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemoryBackend,
    /// Log dirty pages, for Diff snapshots of the restored VM.
    pub track_dirty_pages: bool,
    /// Run the vCPUs at once (else they wait for PATCH /vm Resumed).
    pub resume_vm: bool,
    pub network_overrides: Vec<NetworkOverride>,
    pub vsock_override: Option<VsockOverride>,
    /// vHive's field: the file (a devmapper device, in vHive) now backing the container's
    /// drive, whose path at snapshot time is gone. reapvm gives it to the one drive that is
    /// not the root drive.
    pub container_snapshot_path: Option<PathBuf>,
}

/// `PUT /snapshot/load` as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadSnapshotBody {
    snapshot_path: PathBuf,
    /// Firecracker's older form of `mem_backend: {File, path}`.
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    enable_diff_snapshots: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    /// vHive's Firecracker fork sends it on every load (empty: none).
    #[serde(default)]
    container_snapshot_path: Option<PathBuf>,
}

impl TryFrom<LoadSnapshotBody> for LoadSnapshotParams {
    type Error = String;

    fn try_from(body: LoadSnapshotBody) -> Result<Self, String> {
        let mem_backend = match (body.mem_backend, body.mem_file_path) {
            (Some(backend), None) => backend,
            (None, Some(backend_path)) => MemoryBackend::File { backend_path },
            (Some(_), Some(_)) => return Err("give mem_backend or mem_file_path, not both".into()),
            (None, None) => return Err("mem_backend (or mem_file_path) is missing".into()),
        };
        if let Some((_, options)) = mem_backend.reap() {
            options.validate().map_err(|e| e.to_string())?;
        }
        if let MemoryBackend::OnDemand {
            fault_around_kib, ..
        } = mem_backend
        {
            crate::uffd::fault_around_pages(fault_around_kib)?;
        }
        Ok(Self {
            snapshot_path: body.snapshot_path,
            mem_backend,
            track_dirty_pages: body.enable_diff_snapshots || body.track_dirty_pages,
            resume_vm: body.resume_vm,
            network_overrides: body.network_overrides,
            vsock_override: body.vsock_override,
            container_snapshot_path: body
                .container_snapshot_path
                .filter(|p| !p.as_os_str().is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LoadSnapshotParams, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn each_backend_parses_with_its_own_fields() {
        let p = parse(r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#)
            .unwrap();
        assert_eq!(
            p.mem_backend,
            MemoryBackend::File {
                backend_path: "/m".into()
            }
        );
        assert!(!p.resume_vm && !p.track_dirty_pages);
        assert_eq!(p.container_snapshot_path, None);
        let p = parse(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "container_snapshot_path": "/dev/mapper/snap-1"}"#)
            .unwrap();
        assert_eq!(
            p.container_snapshot_path,
            Some(PathBuf::from("/dev/mapper/snap-1"))
        );
        let p = parse(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "container_snapshot_path": ""}"#,
        )
        .unwrap();
        assert_eq!(p.container_snapshot_path, None, "empty: none");
        let p = parse(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
        )
        .unwrap();
        assert_eq!(p.mem_backend.name(), "File");
        assert!(p.track_dirty_pages);
        let p = parse(r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "OnDemand", "backend_path": "/m", "fault_around_kib": 64}}"#)
            .unwrap();
        assert_eq!(
            p.mem_backend,
            MemoryBackend::OnDemand {
                backend_path: "/m".into(),
                fault_around_kib: 64
            }
        );
        let p = parse(r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/sock"}}"#)
            .unwrap();
        assert_eq!(p.mem_backend.mem_path(), None);
        let p = parse(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                "reap_options": {"chunked_install": true}}, "resume_vm": true}"#,
        )
        .unwrap();
        let (ws_path, options) = p.mem_backend.reap().unwrap();
        assert_eq!(ws_path, PathBuf::from("/m.ws"));
        assert!(options.chunked_install && !options.o_direct);
        let p = parse(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                "reap_options": {"streaming": true}}}"#,
        )
        .unwrap();
        let (_, options) = p.mem_backend.reap().unwrap();
        assert!(
            options.streaming && options.reads_in_parallel() && options.installs_while_running()
        );
        let p = parse(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m", "ws_path": "/w"}}"#,
        )
        .unwrap();
        assert_eq!(
            p.mem_backend.reap().unwrap(),
            (PathBuf::from("/w"), ReapOptions::default())
        );
    }

    #[test]
    fn bad_bodies_are_refused_with_the_reason() {
        for (json, reason) in [
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Lazy", "backend_path": "/m"}}"#,
                "unknown variant `Lazy`",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m", "ws_path": "/w"}}"#,
                "unknown field `ws_path`",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "OnDemand", "backend_path": "/m", "reap_options": {}}}"#,
                "unknown field `reap_options`",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                    "reap_options": {"merge_misses": true, "chunked_install": true}}}"#,
                "merge_misses does not work with chunked_install",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                    "reap_options": {"merge_misses": true, "streaming": true}}}"#,
                "merge_misses does not work with streaming",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                    "reap_options": {"rerecord_threshold": 5}}}"#,
                "needs merge_misses",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                    "reap_options": {"prefetch_everything": true}}}"#,
                "unknown field `prefetch_everything`",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
                "not both",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "OnDemand", "backend_path": "/m", "fault_around_kib": 100}}"#,
                "fault_around_kib is 100",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                    "reap_options": {"fault_around_kib": 4096}}}"#,
                "fault_around_kib is 4096",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Reap", "backend_path": "/m",
                    "reap_options": {"fault_around_kib": 64, "merge_misses": true}}}"#,
                "merge_misses does not work with fault_around_kib",
            ),
            (r#"{"snapshot_path": "/s"}"#, "is missing"),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "bogus": 1}"#,
                "unknown field `bogus`",
            ),
        ] {
            let e = parse(json).unwrap_err();
            assert!(e.contains(reason), "{json}: {e}");
        }
    }
}
