//! Reading a WS file into memory in one go (page-aligned, O_DIRECT where possible).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use super::ReapError;
use snapshot::PAGE_SIZE;

/// A buffer aligned for O_DIRECT reads.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: the buffer is plain owned memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads (`Deref`); writing needs `&mut self`, as for a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(capacity: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(capacity.max(PAGE_SIZE), PAGE_SIZE)
            .expect("page-aligned layout")
    }

    fn zeroed(capacity: usize) -> Self {
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            capacity: layout.size(),
            len: 0,
        }
    }

    fn spare(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds `capacity` initialized (zeroed) bytes; `len <= capacity`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(self.len),
                self.capacity - self.len,
            )
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the allocation are initialized.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

/// A WS file read into memory, and how long the read took.
pub struct FetchedWs {
    pub bytes: AlignedBuf,
    pub took: Duration,
}

/// The largest WS file a snapshot whose memory file is at `memory_path` can have (0 when
/// the memory file cannot be read: the restore then fails on it anyway).
pub fn ws_size_limit(memory_path: &Path) -> u64 {
    std::fs::metadata(memory_path)
        .map(|m| snapshot::ws::max_file_len(m.len()))
        .unwrap_or(0)
}

/// Reads the whole WS file at `path` in as few reads as the kernel allows; None if there is
/// no file there (the restore then records one). A file larger than `max_len` is refused
/// before anything is allocated for it.
pub fn fetch(path: &Path, o_direct: bool, max_len: u64) -> Result<Option<FetchedWs>, ReapError> {
    match fetch_with(path, o_direct, max_len) {
        // Some filesystems take an O_DIRECT open and then refuse the read.
        Err(ReapError::Read { source, .. })
            if o_direct && source.raw_os_error() == Some(libc::EINVAL) =>
        {
            log::warn!(
                "{}: O_DIRECT read refused here; reading it buffered",
                path.display()
            );
            fetch_with(path, false, max_len)
        }
        other => other,
    }
}

fn fetch_with(path: &Path, o_direct: bool, max_len: u64) -> Result<Option<FetchedWs>, ReapError> {
    let started = Instant::now();
    let read_err = |source| ReapError::Read {
        path: path.to_path_buf(),
        source,
    };
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    };
    let file = match open(if o_direct { libc::O_DIRECT } else { 0 }) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // tmpfs and some others refuse O_DIRECT: read through the page cache then.
        Err(e) if o_direct && e.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!(
                "{}: O_DIRECT not supported here; reading it buffered",
                path.display()
            );
            open(0).map_err(read_err)?
        }
        Err(e) => return Err(read_err(e)),
    };
    let len = file.metadata().map_err(read_err)?.len();
    if len > max_len {
        return Err(ReapError::WsTooLarge {
            path: path.to_path_buf(),
            len,
            max: max_len,
        });
    }
    let len = len as usize;
    let mut buf = AlignedBuf::zeroed(len.div_ceil(PAGE_SIZE) * PAGE_SIZE);
    loop {
        let at = buf.len as u64;
        let spare = buf.spare();
        if spare.is_empty() {
            break;
        }
        match file.read_at(spare, at) {
            Ok(0) => break,
            Ok(n) => buf.len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
        // O_DIRECT needs block-aligned offsets: a short read is the end of the file.
        if buf.len % PAGE_SIZE != 0 {
            break;
        }
    }
    buf.len = buf.len.min(len);
    Ok(Some(FetchedWs {
        bytes: buf,
        took: started.elapsed(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_reads_whole_files_and_reports_missing_ones() {
        let dir = std::env::temp_dir().join(format!("reapvm-reap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(fetch(&dir.join("none"), false, u64::MAX).unwrap().is_none());
        let path = dir.join("ws");
        let content: Vec<u8> = (0..3 * PAGE_SIZE + 123).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        for direct in [false, true] {
            let got = fetch(&path, direct, u64::MAX).unwrap().unwrap();
            assert_eq!(&got.bytes[..], &content[..], "o_direct {direct}");
        }
        // A file larger than the limit (sparse: nothing to read) is refused unread.
        let huge = dir.join("huge");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert!(matches!(
            fetch(&huge, false, 1 << 20),
            Err(ReapError::WsTooLarge { len, max, .. }) if len == 1 << 40 && max == 1 << 20
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
