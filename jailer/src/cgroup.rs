//! The jail's cgroup: PARENT/ID under the hierarchy of each controller the settings name
//! (v1: one mount per controller) or under the unified hierarchy (v2, with the controllers
//! enabled down to it), the settings written, and the jailer's process moved in (the VMM
//! it becomes, and its children, stay there).

use std::path::{Path, PathBuf};

use crate::args::CgroupSetting;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/mounts: {0}")]
    Mounts(std::io::Error),
    #[error("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")]
    NoUnified,
    #[error("no cgroup v1 hierarchy has the {0} controller")]
    NoController(String),
    #[error("the cgroup v2 controller {controller} is not available in {path}")]
    Unavailable { controller: String, path: PathBuf },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Mount points of cgroup hierarchies: (mount point, type, options) from /proc/mounts.
fn cgroup_mounts() -> Result<Vec<(PathBuf, String, String)>, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(CgroupError::Mounts)?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind, options) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            kind.starts_with("cgroup")
                .then(|| (PathBuf::from(point), kind.to_string(), options.to_string()))
        })
        .collect())
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn create(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// Puts this process in the cgroup `parent/id` with `settings` (nothing when there are
/// none, as Firecracker's jailer). Returns the cgroup folders it made.
pub fn enter(
    version: u8,
    parent: &str,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<Vec<PathBuf>, CgroupError> {
    if settings.is_empty() {
        return Ok(Vec::new());
    }
    let mounts = cgroup_mounts()?;
    let pid = std::process::id().to_string();
    if version == 2 {
        let root = mounts
            .iter()
            .find(|(_, kind, _)| kind == "cgroup2")
            .map(|(point, _, _)| point.clone())
            .ok_or(CgroupError::NoUnified)?;
        // Each controller must be enabled in every ancestor's subtree_control.
        let mut controllers: Vec<&str> = settings.iter().map(|s| s.controller.as_str()).collect();
        controllers.sort_unstable();
        controllers.dedup();
        let available =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        for controller in &controllers {
            if !available.split_whitespace().any(|c| c == *controller) {
                return Err(CgroupError::Unavailable {
                    controller: controller.to_string(),
                    path: root.clone(),
                });
            }
        }
        let enable: String = controllers.iter().map(|c| format!("+{c} ")).collect();
        let mut at = root.clone();
        write(&at.join("cgroup.subtree_control"), enable.trim_end())?;
        for part in Path::new(parent).components() {
            at.push(part);
            create(&at)?;
            write(&at.join("cgroup.subtree_control"), enable.trim_end())?;
        }
        let jail = at.join(id);
        create(&jail)?;
        for s in settings {
            write(&jail.join(&s.file), &s.value)?;
        }
        write(&jail.join("cgroup.procs"), &pid)?;
        return Ok(vec![jail]);
    }
    let mut made = Vec::new();
    for s in settings {
        let point = mounts
            .iter()
            .find(|(_, kind, options)| {
                kind == "cgroup" && options.split(',').any(|o| o == s.controller)
            })
            .map(|(point, _, _)| point.clone())
            .ok_or_else(|| CgroupError::NoController(s.controller.clone()))?;
        let jail = point.join(parent).join(id);
        create(&jail)?;
        if s.controller == "cpuset" {
            inherit_cpuset(&point, &jail)?;
        }
        write(&jail.join(&s.file), &s.value)?;
        if !made.contains(&jail) {
            write(&jail.join("tasks"), &pid)?;
            made.push(jail);
        }
    }
    Ok(made)
}

/// A v1 cpuset cgroup starts with no CPUs and no memory nodes, and no task can join it
/// until it has both (ENOSPC): each level from the hierarchy's root down to `jail` that
/// has none takes its parent's, as Firecracker's jailer does.
fn inherit_cpuset(root: &Path, jail: &Path) -> Result<(), CgroupError> {
    let Ok(below) = jail.strip_prefix(root) else {
        return Ok(());
    };
    let mut parent = root.to_path_buf();
    for part in below.components() {
        let child = parent.join(part);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own_path = child.join(file);
            let own = std::fs::read_to_string(&own_path).map_err(|source| CgroupError::Read {
                path: own_path.clone(),
                source,
            })?;
            if own.trim().is_empty() {
                let from = parent.join(file);
                let value = std::fs::read_to_string(&from)
                    .map_err(|source| CgroupError::Read { path: from, source })?;
                write(&child.join(file), value.trim())?;
            }
        }
        parent = child;
    }
    Ok(())
}
