//! `reapvm-jailer`: starts reapvm (or any VMM taking Firecracker's flags) in a jail, as
//! Firecracker's jailer does (docs/security.md). Run as root; everything the VMM opens must
//! be inside the jail, CHROOT_BASE_DIR/EXEC_FILE_NAME/ID/root, before it starts (put the
//! kernel, drives and snapshots there, readable by --uid), and every path given to the VMM
//! is a path inside it.

mod args;
mod cgroup;
mod jail;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;

use args::{check_id, parse_cgroup, parse_resource_limit, Args, ArgsError};

#[derive(Debug, thiserror::Error)]
enum JailerError {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
}

fn micros(t: std::time::Duration) -> u64 {
    u64::try_from(t.as_micros()).unwrap_or(u64::MAX)
}

fn cpu_time_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec this function owns.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

fn run(args: Args) -> Result<std::convert::Infallible, JailerError> {
    let start_us = micros(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    );
    jail::close_inherited_descriptors()?;
    check_id(&args.id)?;
    if let Some(parent) = &args.parent_cgroup {
        args::check_parent_cgroup(parent)?;
    }
    if args.cgroup_version != 1 && args.cgroup_version != 2 {
        return Err(ArgsError::CgroupVersion(args.cgroup_version).into());
    }
    let exec_name = args
        .exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ArgsError::ExecFile(args.exec_file.clone()))?
        .to_string();
    let settings = args
        .cgroups
        .iter()
        .map(|s| parse_cgroup(s))
        .collect::<Result<Vec<_>, _>>()?;
    let limits = args
        .resource_limits
        .iter()
        .map(|s| parse_resource_limit(s))
        .collect::<Result<Vec<_>, _>>()?;

    // Absolute: the jail is entered by changing into it.
    let base = std::path::absolute(&args.chroot_base_dir)
        .map_err(|_| ArgsError::ChrootBase(args.chroot_base_dir.clone()))?;
    let root = jail::root_of(&base, &exec_name, &args.id);
    jail::prepare(&root, &args.exec_file, &exec_name)?;
    let parent = args.parent_cgroup.as_deref().unwrap_or(&exec_name);
    cgroup::enter(args.cgroup_version, parent, &args.id, &settings)?;
    jail::limit_resources(&limits)?;
    if let Some(netns) = &args.netns {
        jail::join_netns(netns)?;
    }
    let devices = jail::host_devices();
    jail::enter_root(&root)?;
    jail::make_devices(args.uid, args.gid, &devices)?;
    // Written inside the jail, where the user finds the VMM's other files.
    let pid_file = std::path::PathBuf::from(format!("/{exec_name}.pid"));
    if args.new_pid_ns {
        jail::enter_pid_namespace(&pid_file)?;
    }
    if args.daemonize {
        jail::daemonize(&pid_file, args.new_pid_ns)?;
    }
    jail::drop_privileges(args.uid, args.gid)?;
    let mut vmm_args = vec![
        "--id".to_string(),
        args.id.clone(),
        "--start-time-us".into(),
        start_us.to_string(),
        "--start-time-cpu-us".into(),
        cpu_time_us().to_string(),
    ];
    vmm_args.extend(args.vmm_args.iter().cloned());
    Ok(jail::exec(&format!("/{exec_name}"), &vmm_args)?)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("reapvm-jailer: error: {e}");
            ExitCode::FAILURE
        }
    }
}
