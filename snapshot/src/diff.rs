//! Diff memory files: full-size sparse files in which only the pages dirtied since the
//! previous snapshot hold data. Applying one onto its base memory file (the previous
//! snapshot's) gives the memory of the Diff snapshot, as Firecracker's `rebase-snap` does.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the diff file {diff} is {diff_len} bytes but the base file {base} is {base_len}: not the same VM's memory")]
    SizeMismatch {
        base: PathBuf,
        base_len: u64,
        diff: PathBuf,
        diff_len: u64,
    },
    #[error("cannot find the data in {path} (SEEK_DATA/SEEK_HOLE at {offset:#x}): {source}")]
    Seek {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("cannot copy {len} bytes at {offset:#x} from {diff} into {base}: {source}")]
    Copy {
        base: PathBuf,
        diff: PathBuf,
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
}

/// `lseek` with SEEK_DATA or SEEK_HOLE; None at the end of the file (ENXIO).
fn seek(file: &File, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor `file` owns; it only moves the file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// The (offset, length) extents of `file` that hold data, up to `len`.
pub fn data_extents(file: &File, path: &Path, len: u64) -> Result<Vec<(u64, u64)>, DiffError> {
    let seek_err = |offset| {
        move |source| DiffError::Seek {
            path: path.to_path_buf(),
            offset,
            source,
        }
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < len {
        let Some(start) = seek(file, offset, libc::SEEK_DATA).map_err(seek_err(offset))? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)
            .map_err(seek_err(start))?
            .unwrap_or(len)
            .min(len);
        if end > start {
            extents.push((start, end - start));
        }
        offset = end;
    }
    Ok(extents)
}

/// Writes every data extent of the diff file at `diff` into the base file at `base`, in
/// place; returns the bytes copied.
pub fn apply_diff(base: &Path, diff: &Path) -> Result<u64, DiffError> {
    let open_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiffError::Open { path, source }
    };
    let diff_file = File::open(diff).map_err(open_err(diff))?;
    let base_file = OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(open_err(base))?;
    let len_of = |f: &File, p: &Path| f.metadata().map(|m| m.len()).map_err(open_err(p));
    let (diff_len, base_len) = (len_of(&diff_file, diff)?, len_of(&base_file, base)?);
    if diff_len != base_len {
        return Err(DiffError::SizeMismatch {
            base: base.to_path_buf(),
            base_len,
            diff: diff.to_path_buf(),
            diff_len,
        });
    }
    let mut copied = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (start, len) in data_extents(&diff_file, diff, diff_len)? {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            let at = start + done;
            diff_file
                .read_exact_at(&mut buf[..n], at)
                .and_then(|()| base_file.write_all_at(&buf[..n], at))
                .map_err(|source| DiffError::Copy {
                    base: base.to_path_buf(),
                    diff: diff.to_path_buf(),
                    offset: at,
                    len: n as u64,
                    source,
                })?;
            done += n as u64;
        }
        copied += len;
    }
    base_file.sync_all().map_err(open_err(base))?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_land_on_the_base_and_holes_leave_it_alone() {
        let dir = std::env::temp_dir().join(format!("reapvm-diff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, diff) = (dir.join("base"), dir.join("diff"));
        const LEN: usize = 64 * 4096;
        std::fs::write(&base, vec![1u8; LEN]).unwrap();
        let d = File::create(&diff).unwrap();
        d.set_len(LEN as u64).unwrap();
        // Far apart, so that even a filesystem with large allocation blocks keeps a hole
        // between them.
        d.write_all_at(&[7u8; 4096], 4096).unwrap();
        d.write_all_at(&[9u8; 8192], 48 * 4096).unwrap();
        d.sync_all().unwrap();
        let copied = apply_diff(&base, &diff).unwrap();
        let merged = std::fs::read(&base).unwrap();
        assert!(merged[4096..8192].iter().all(|&b| b == 7));
        assert!(merged[48 * 4096..50 * 4096].iter().all(|&b| b == 9));
        assert!(merged[..4096].iter().all(|&b| b == 1));
        assert!(merged[20 * 4096..40 * 4096].iter().all(|&b| b == 1));
        assert!(copied >= 3 * 4096 && copied < LEN as u64, "copied {copied}");

        std::fs::write(&diff, [0u8; 10]).unwrap();
        assert!(matches!(
            apply_diff(&base, &diff),
            Err(DiffError::SizeMismatch { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
