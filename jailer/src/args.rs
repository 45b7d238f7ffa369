//! The jailer's command line: Firecracker's jailer flags, then `--` and the VMM's own.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("--id {0:?}: an id is 1 to 64 characters of letters, digits and '-'")]
    Id(String),
    #[error("--exec-file {0}: names no file")]
    ExecFile(PathBuf),
    #[error(
        "--cgroup {0:?}: expected FILE=VALUE, FILE as in controller.setting (memory.max=512M)"
    )]
    Cgroup(String),
    #[error("--resource-limit {0:?}: expected fsize=BYTES or no-file=COUNT")]
    ResourceLimit(String),
    #[error("--cgroup-version {0}: 1 or 2")]
    CgroupVersion(u8),
    #[error(
        "--parent-cgroup {0:?}: a relative path of names made of letters, digits, '-', '_' and '.'"
    )]
    ParentCgroup(String),
    #[error("--chroot-base-dir {0}: cannot be made absolute")]
    ChrootBase(PathBuf),
}

#[derive(Debug, Parser)]
#[command(
    name = "reapvm-jailer",
    version,
    about = "Start reapvm in a jail: a chroot with its own mount (and optionally PID and network) namespace, a cgroup, resource limits and an unprivileged user; Firecracker's jailer flags."
)]
pub struct Args {
    /// The microVM's id: names its jail and cgroup, and is passed to the VMM as --id.
    #[arg(long)]
    pub id: String,
    /// The VMM binary; copied into the jail and run there.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The user the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// The group the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// The jail is CHROOT_BASE_DIR/EXEC_FILE_NAME/ID/root.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Detach: a new session, standard streams to /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as PID 1 of a new PID namespace; its host PID is written to
    /// JAIL/EXEC_FILE_NAME.pid.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// The cgroup hierarchy: 1 (a mount per controller) or 2 (the unified one).
    #[arg(long, default_value_t = 1)]
    pub cgroup_version: u8,
    /// A cgroup setting FILE=VALUE (repeatable), e.g. memory.max=512M (v2) or
    /// cpu.shares=512 (v1).
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// The cgroup the jail's cgroup goes under (default: the exec file's name).
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// A resource limit RESOURCE=VALUE (repeatable): fsize (bytes) or no-file (count).
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    pub resource_limits: Vec<String>,
    /// The VMM's own arguments, after `--`.
    #[arg(last = true)]
    pub vmm_args: Vec<String>,
}

/// A checked `--cgroup` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The controller, the file's name up to its first dot (memory for memory.max).
    pub controller: String,
    pub file: String,
    pub value: String,
}

/// A checked `--resource-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceLimit {
    FileSize(u64),
    OpenFiles(u64),
}

pub fn check_id(id: &str) -> Result<(), ArgsError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ArgsError::Id(id.to_string()))
    }
}

pub fn check_parent_cgroup(parent: &str) -> Result<(), ArgsError> {
    let ok = !parent.is_empty()
        && parent.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(ArgsError::ParentCgroup(parent.to_string()))
    }
}

pub fn parse_cgroup(setting: &str) -> Result<CgroupSetting, ArgsError> {
    let bad = || ArgsError::Cgroup(setting.to_string());
    let (file, value) = setting.split_once('=').ok_or_else(bad)?;
    let (controller, _) = file.split_once('.').ok_or_else(bad)?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    if !plain(file) || controller.is_empty() || value.is_empty() || value.contains('\n') {
        return Err(bad());
    }
    Ok(CgroupSetting {
        controller: controller.to_string(),
        file: file.to_string(),
        value: value.to_string(),
    })
}

pub fn parse_resource_limit(limit: &str) -> Result<ResourceLimit, ArgsError> {
    let bad = || ArgsError::ResourceLimit(limit.to_string());
    let (name, value) = limit.split_once('=').ok_or_else(bad)?;
    let value: u64 = value.parse().map_err(|_| bad())?;
    match name {
        "fsize" => Ok(ResourceLimit::FileSize(value)),
        "no-file" => Ok(ResourceLimit::OpenFiles(value)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_plain_names() {
        assert!(check_id("fn-1").is_ok());
        assert!(check_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "..", "a b", &"a".repeat(65)] {
            assert_eq!(check_id(bad), Err(ArgsError::Id(bad.to_string())));
        }
    }

    #[test]
    fn cgroup_settings_name_a_controller_file_and_value() {
        assert_eq!(
            parse_cgroup("memory.max=512M").unwrap(),
            CgroupSetting {
                controller: "memory".into(),
                file: "memory.max".into(),
                value: "512M".into()
            }
        );
        assert_eq!(
            parse_cgroup("cpu.max=50000 100000").unwrap().value,
            "50000 100000"
        );
        for bad in [
            "memory.max",
            "max=1",
            "../x.max=1",
            "memory.max=",
            "a.b=1\n2",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parent_cgroups_stay_below_the_hierarchy() {
        assert!(check_parent_cgroup("reapvm").is_ok());
        assert!(check_parent_cgroup("a/b.c/d_e").is_ok());
        for bad in ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a b"] {
            assert!(check_parent_cgroup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resource_limits() {
        assert_eq!(
            parse_resource_limit("no-file=1024"),
            Ok(ResourceLimit::OpenFiles(1024))
        );
        assert_eq!(
            parse_resource_limit("fsize=1048576"),
            Ok(ResourceLimit::FileSize(1 << 20))
        );
        for bad in ["nofile=1", "fsize=x", "fsize"] {
            assert!(parse_resource_limit(bad).is_err(), "{bad}");
        }
    }
}
