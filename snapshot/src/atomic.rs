//! Files that appear whole or not at all. A new file is written to a temporary file beside
//! its target, created with O_EXCL (so never through a symlink someone planted) under an
//! unpredictable name, mode 0600; `commit` makes its data durable, renames it over the
//! target and makes the rename durable. Until then the target (an older snapshot, say) is
//! untouched, and a temporary file that is dropped is removed. Temporaries that a writer
//! killed before it could remove them are removed by the next writer of the same target.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
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

/// Removes the temporary files a killed writer of `target` left (best effort: one that
/// cannot be removed is left, and does no harm).
fn remove_stale_temps(folder: &Path, prefix: &OsString) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    let prefix = prefix.as_encoded_bytes();
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && entry.file_name().as_encoded_bytes().starts_with(prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl PendingFile {
    /// An empty temporary file beside `target`, after removing the stale temporaries of
    /// `target`.
    pub fn beside(target: &Path) -> std::io::Result<Self> {
        let folder = folder_of(target);
        let prefix = temp_prefix(target)?;
        remove_stale_temps(folder, &prefix);
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(12)
            .tempfile_in(folder)?;
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
        self.temp.as_file().sync_all()?;
        let target = self.target;
        self.temp.persist(&target).map_err(|e| e.error)?;
        File::open(folder_of(&target))?.sync_all()
    }
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
