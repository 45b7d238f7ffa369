//! Files that appear whole or not at all. A new file is written to a temporary file beside
//! its target, created with O_EXCL (so never through a symlink someone planted) under an
//! unpredictable name, mode 0600, and locked (flock) while it is being written; `commit`
//! makes its data durable, renames it over the target and makes the rename durable. Until
//! then the target (an older snapshot, say) is untouched, and a temporary file that is
//! dropped is removed. Temporaries that a killed writer left are removed by the next writer
//! of the same target; a live writer's (its lock held) are left alone, so two writers of
//! one target (two REAP recordings of the same WS) both finish, the last rename winning.
//! Files that must change together (a snapshot's memory file and vmstate) are committed
//! together by `commit_all`: every one durable first, then the renames back to back.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Marks a temporary file in the target's folder: `.{target name}.reapvm-tmp-{random}`.
const TEMP_MARK: &str = ".reapvm-tmp-";

/// A file being written; the target is replaced only by `commit`.
pub struct PendingFile {
    temp: tempfile::NamedTempFile,
    target: PathBuf,
}

fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn temp_prefix(target: &Path) -> std::io::Result<OsString> {
    let name = target.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", target.display()),
        )
    })?;
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(TEMP_MARK);
    Ok(prefix)
}

/// flock(2) without waiting; whether the lock was taken.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor `file` owns; it changes no memory.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Removes the temporary files of `target` that no live writer holds (best effort: one
/// that cannot be removed is left, and does no harm).
fn remove_stale_temps(folder: &Path, prefix: &OsString) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    let prefix = prefix.as_encoded_bytes();
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || !entry.file_name().as_encoded_bytes().starts_with(prefix) {
            continue;
        }
        // Its writer holds the lock while it lives; a killed writer's lock died with it.
        let stale = File::open(entry.path()).is_ok_and(|f| try_lock(&f));
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl PendingFile {
    /// An empty temporary file beside `target`, locked, after removing the stale
    /// temporaries of `target`.
    pub fn beside(target: &Path) -> std::io::Result<Self> {
        let folder = folder_of(target);
        let prefix = temp_prefix(target)?;
        remove_stale_temps(folder, &prefix);
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(12)
            .tempfile_in(folder)?;
        if !try_lock(temp.as_file()) {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            temp,
            target: target.to_path_buf(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// Makes the data durable, renames the file over the target and makes the rename
    /// durable (a crash at any point leaves the old target or the new one, whole).
    pub fn commit(self) -> std::io::Result<()> {
        commit_all(vec![self]).map_err(|(_, e)| e)
    }
}

/// Commits files that belong together: all of them durable first (a failure there leaves
/// every target as it was), then the renames back to back in the given order, then the
/// folders made durable. On error, the target the error concerns, and the error.
pub fn commit_all(files: Vec<PendingFile>) -> Result<(), (PathBuf, std::io::Error)> {
    for f in &files {
        f.temp
            .as_file()
            .sync_all()
            .map_err(|e| (f.target.clone(), e))?;
    }
    let mut folders: Vec<PathBuf> = Vec::new();
    for f in files {
        let target = f.target;
        let folder = folder_of(&target).to_path_buf();
        f.temp
            .persist(&target)
            .map_err(|e| (target.clone(), e.error))?;
        if !folders.contains(&folder) {
            folders.push(folder);
        }
    }
    for folder in folders {
        File::open(&folder)
            .and_then(|d| d.sync_all())
            .map_err(|e| (folder.clone(), e))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a [`PendingFile`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut pending = PendingFile::beside(path)?;
    pending.file().write_all(bytes)?;
    pending.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reapvm-atomic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_target_changes_only_on_commit() {
        let dir = scratch("commit");
        let target = dir.join("vmstate");
        std::fs::write(&target, b"old").unwrap();
        let mut pending = PendingFile::beside(&target).unwrap();
        pending.file().write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        let mode = std::fs::metadata(pending.temp_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        pending.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(names(&dir), ["vmstate"]);
    }

    #[test]
    fn a_dropped_file_leaves_nothing_and_the_target_whole() {
        let dir = scratch("drop");
        let target = dir.join("memory");
        std::fs::write(&target, b"old").unwrap();
        let mut pending = PendingFile::beside(&target).unwrap();
        pending.file().write_all(b"half").unwrap();
        drop(pending);
        assert_eq!(names(&dir), ["memory"]);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
    }

    #[test]
    fn a_live_writers_temporary_is_left_alone_and_both_writers_finish() {
        let dir = scratch("live");
        let target = dir.join("ws");
        let mut first = PendingFile::beside(&target).unwrap();
        first.file().write_all(b"first").unwrap();
        // A second writer of the same target while the first still writes.
        let mut second = PendingFile::beside(&target).unwrap();
        assert!(first.temp_path().exists(), "the live temporary was removed");
        second.file().write_all(b"second").unwrap();
        first.commit().unwrap();
        second.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        assert_eq!(names(&dir), ["ws"]);
    }

    #[test]
    fn files_committed_together_all_land() {
        let dir = scratch("together");
        let (a, b) = (dir.join("memory"), dir.join("vmstate"));
        let mut pa = PendingFile::beside(&a).unwrap();
        let mut pb = PendingFile::beside(&b).unwrap();
        pa.file().write_all(b"m").unwrap();
        pb.file().write_all(b"v").unwrap();
        commit_all(vec![pa, pb]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"m");
        assert_eq!(std::fs::read(&b).unwrap(), b"v");
        assert_eq!(names(&dir), ["memory", "vmstate"]);
    }

    #[test]
    fn temporary_names_are_unpredictable_and_stale_ones_are_removed() {
        let dir = scratch("stale");
        let target = dir.join("vmstate");
        // What a writer killed with SIGKILL leaves; and another file that only looks alike.
        std::fs::write(dir.join(".vmstate.reapvm-tmp-abcdefabcdef"), b"x").unwrap();
        std::fs::write(dir.join(".memory.reapvm-tmp-abcdefabcdef"), b"x").unwrap();
        let a = PendingFile::beside(&target).unwrap();
        let a_name = a.temp_path().file_name().unwrap().to_owned();
        assert!(!dir.join(".vmstate.reapvm-tmp-abcdefabcdef").exists());
        assert!(dir.join(".memory.reapvm-tmp-abcdefabcdef").exists());
        drop(a);
        let b = PendingFile::beside(&target).unwrap();
        assert_ne!(b.temp_path().file_name().unwrap(), a_name);
    }
}
