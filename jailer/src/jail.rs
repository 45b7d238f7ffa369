//! Building the jail and entering it, step by step, as root: the jail folder with a copy
//! of the VMM, resource limits, the network namespace, a mount namespace whose root is the
//! jail (pivot_root, the host's tree detached), the device nodes the VMM needs, a PID
//! namespace, a new session, then the unprivileged user, and exec.

use std::ffi::CString;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{
    chdir, chown, fork, pivot_root, setgid, setgroups, setsid, setuid, ForkResult, Gid, Uid,
};

use crate::args::ResourceLimit;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot create the jail {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy the VMM {from} into the jail as {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("cannot open the network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("an argument holds a NUL byte: {0:?}")]
    Nul(String),
    #[error("cannot list the shared libraries of {path} with ldd: {reason}")]
    Libraries { path: PathBuf, reason: String },
    #[error("{path} in the jail is a symlink or not a folder: refusing to write through it")]
    Planted { path: PathBuf },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// The jail's root folder: BASE/EXEC_FILE_NAME/ID/root.
pub fn root_of(base: &Path, exec_name: &str, id: &str) -> PathBuf {
    base.join(exec_name).join(id).join("root")
}

/// Creates the jail folder (kept if it exists: the user may have put the guest's files
/// there) and copies the VMM in as /EXEC_NAME, with the shared libraries it links, root-
/// owned and not writable by the VMM. The jail may hold what a previous, possibly
/// compromised, VMM left there: nothing is written through a symlink in it.
pub fn prepare(root: &Path, exec_file: &Path, exec_name: &str) -> Result<(), JailError> {
    std::fs::create_dir_all(root).map_err(|source| JailError::Folder {
        path: root.to_path_buf(),
        source,
    })?;
    copy_into(root, exec_file, Path::new(exec_name))?;
    for library in shared_libraries(exec_file)? {
        let inside = library.strip_prefix("/").unwrap_or(&library).to_path_buf();
        copy_into(root, &library, &inside)?;
    }
    Ok(())
}

/// Copies `from` to `root/inside`: each folder on the way made or checked to be a real
/// folder (no symlink), whatever was at the destination unlinked, the copy created anew
/// (O_EXCL, O_NOFOLLOW) with mode 0755.
fn copy_into(root: &Path, from: &Path, inside: &Path) -> Result<(), JailError> {
    let mut at = root.to_path_buf();
    let parts: Vec<Component> = inside.components().collect();
    let Some((file_name, folders)) = parts.split_last() else {
        return Err(JailError::Planted { path: at });
    };
    for part in folders {
        let Component::Normal(part) = part else {
            return Err(JailError::Planted {
                path: at.join(part),
            });
        };
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => return Err(JailError::Planted { path: at }),
            Err(_) => std::fs::create_dir(&at).map_err(|source| JailError::Folder {
                path: at.clone(),
                source,
            })?,
        }
    }
    let to = at.join(file_name);
    let copy_err = |source| JailError::Copy {
        from: from.to_path_buf(),
        to: to.clone(),
        source,
    };
    match std::fs::symlink_metadata(&to) {
        Ok(m) if m.file_type().is_dir() => return Err(JailError::Planted { path: to }),
        Ok(_) => std::fs::remove_file(&to).map_err(copy_err)?,
        Err(_) => {}
    }
    let mut source = std::fs::File::open(from).map_err(copy_err)?;
    let mut dest = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o755)
        .open(&to)
        .map_err(copy_err)?;
    std::io::copy(&mut source, &mut dest).map_err(copy_err)?;
    dest.set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(copy_err)
}

/// The shared libraries (and the dynamic loader) `exec_file` needs, as ldd lists them;
/// none for a static binary (Firecracker's jailer expects one; a glibc build of reapvm
/// runs jailed with these copied in).
fn shared_libraries(exec_file: &Path) -> Result<Vec<PathBuf>, JailError> {
    let failed = |reason: String| JailError::Libraries {
        path: exec_file.to_path_buf(),
        reason,
    };
    let out = std::process::Command::new("ldd")
        .arg(exec_file)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd's word for a static binary (on stdout or stderr, by version).
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(failed(all.trim().to_string()));
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line.trim(),
        };
        let path = path.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        } else if line.contains("not found") {
            return Err(failed(line.trim().to_string()));
        }
    }
    Ok(libraries)
}

pub fn limit_resources(limits: &[ResourceLimit]) -> Result<(), JailError> {
    // Firecracker's jailer default: 2048 open files.
    let mut open_files = 2048;
    for limit in limits {
        match *limit {
            ResourceLimit::OpenFiles(n) => open_files = n,
            ResourceLimit::FileSize(n) => {
                setrlimit(Resource::RLIMIT_FSIZE, n, n).map_err(sys("set the file size limit"))?
            }
        }
    }
    setrlimit(Resource::RLIMIT_NOFILE, open_files, open_files)
        .map_err(sys("set the open files limit"))
}

pub fn join_netns(path: &Path) -> Result<(), JailError> {
    let file = std::fs::File::open(path).map_err(|source| JailError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    setns(file, CloneFlags::CLONE_NEWNET).map_err(sys(format!(
        "join the network namespace {}",
        path.display()
    )))
}

/// A mount namespace whose root is `root`: its mounts made slaves (nothing mounted in the
/// jail reaches the host; the host's later mounts still reach the jail's copy of them,
/// which is detached below), the jail becomes the root with pivot_root, and the old root
/// is detached.
pub fn enter_root(root: &Path) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("create a mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("make the jail's mounts slaves of the host's"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("bind {} onto itself", root.display())))?;
    chdir(root).map_err(sys(format!("enter {}", root.display())))?;
    let old = "old_root";
    std::fs::create_dir_all(root.join(old)).map_err(|source| JailError::Folder {
        path: root.join(old),
        source,
    })?;
    pivot_root(".", old).map_err(sys("pivot_root into the jail"))?;
    chdir("/").map_err(sys("enter the jail's root"))?;
    umount2(old, MntFlags::MNT_DETACH).map_err(sys("detach the host's tree"))?;
    std::fs::remove_dir(old).map_err(|source| JailError::Folder {
        path: PathBuf::from(old),
        source,
    })
}

/// The device nodes the VMM opens, made inside the jail for its user: KVM, the tap clone
/// device, and /dev/userfaultfd where the host has it (unprivileged userfaultfd for guest
/// memory faults goes through it). Before the host's tree is gone, whether the host has
/// each is known from `host_has`.
pub fn make_devices(uid: u32, gid: u32, host_has: &[(&str, u64, u64)]) -> Result<(), JailError> {
    for dir in ["/dev", "/dev/net"] {
        std::fs::create_dir_all(dir).map_err(|source| JailError::Folder {
            path: PathBuf::from(dir),
            source,
        })?;
    }
    for &(path, major, minor) in host_has {
        let _ = std::fs::remove_file(path);
        mknod(
            path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(major, minor),
        )
        .map_err(sys(format!("create {path}")))?;
        chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(sys(format!("give {path} to the VMM's user")))?;
    }
    Ok(())
}

/// The device nodes of `DEVICES` this host has, with their numbers.
pub fn host_devices() -> Vec<(&'static str, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/net/tun", "/dev/userfaultfd"];
    DEVICES
        .iter()
        .filter_map(|&path| {
            let rdev = std::fs::metadata(path).ok()?.rdev();
            Some((
                path,
                u64::from(nix::sys::stat::major(rdev) as u32),
                u64::from(nix::sys::stat::minor(rdev) as u32),
            ))
        })
        .collect()
}

/// Forks: the child goes on to become the VMM, the parent writes the child's host PID to
/// `pid_file` and exits.
fn fork_on(pid_file: &Path, what: &str) -> Result<(), JailError> {
    // SAFETY: the jailer is single-threaded (no thread was ever started), so the child may
    // allocate and use the standard library until it execs.
    match unsafe { fork() }.map_err(sys(what))? {
        ForkResult::Child => Ok(()),
        ForkResult::Parent { child } => {
            let written = std::fs::write(pid_file, child.to_string());
            std::process::exit(if written.is_ok() { 0 } else { 1 });
        }
    }
}

/// A new PID namespace: the jailer forks; the child (PID 1 there) goes on to become the
/// VMM, the parent writes its host PID to `pid_file` and exits.
pub fn enter_pid_namespace(pid_file: &Path) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("create a PID namespace"))?;
    fork_on(pid_file, "fork into the PID namespace")
}

/// Detaches: unless the jailer already forked into a PID namespace, it forks (the parent
/// writing the child's PID to `pid_file` and exiting, so whoever started the jailer sees
/// it end); then a new session (a forked child never leads a process group, so setsid
/// works), the standard streams on /dev/null (made in the jail for this).
pub fn daemonize(pid_file: &Path, already_forked: bool) -> Result<(), JailError> {
    if !already_forked {
        fork_on(pid_file, "fork to detach")?;
    }
    setsid().map_err(sys("start a new session"))?;
    let _ = std::fs::remove_file("/dev/null");
    mknod(
        "/dev/null",
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .map_err(sys("create /dev/null"))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| JailError::Folder {
            path: PathBuf::from("/dev/null"),
            source,
        })?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors from one this function owns.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) } < 0 {
            return Err(JailError::Sys {
                what: "redirect the standard streams".into(),
                source: nix::Error::last(),
            });
        }
    }
    Ok(())
}

pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    setgroups(&[]).map_err(sys("drop the supplementary groups"))?;
    setgid(Gid::from_raw(gid)).map_err(sys(format!("become group {gid}")))?;
    setuid(Uid::from_raw(uid)).map_err(sys(format!("become user {uid}")))
}

/// Closes every descriptor above the standard three: one the caller left open (a folder,
/// say) would let the VMM reach outside the jail.
pub fn close_inherited_descriptors() -> Result<(), JailError> {
    // SAFETY: close_range(2) takes no pointers; it only closes descriptors 3 and up.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        return Err(JailError::Sys {
            what: "close the inherited descriptors".into(),
            source: nix::Error::last(),
        });
    }
    Ok(())
}

/// Replaces the jailer with the VMM at `program` (a path inside the jail), with an empty
/// environment (nothing of root's reaches it).
pub fn exec(program: &str, args: &[String]) -> Result<std::convert::Infallible, JailError> {
    let c = |s: &str| CString::new(s).map_err(|_| JailError::Nul(s.to_string()));
    let program = c(program)?;
    let mut argv = vec![program.clone()];
    for a in args {
        argv.push(c(a)?);
    }
    let env: [CString; 0] = [];
    nix::unistd::execve(&program, &argv, &env).map_err(sys("run the VMM"))
}
