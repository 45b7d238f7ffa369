//! A WS file read into memory chunk by chunk, each chunk checked against its checksum as it
//! arrives. Whoever needs a chunk (the installer, the fault handler, a restore waiting to
//! resume) waits for that chunk only. A chunk that cannot be read or fails its checksum ends
//! the reading: it and every later chunk stay unread, and their pages are served from the
//! memory file instead.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use snapshot::ws::{self, Header};
use snapshot::PAGE_SIZE;

use super::ReapError;

/// Page-aligned memory for O_DIRECT reads, handed out only in ranges that were written.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    capacity: usize,
}

// SAFETY: plain owned memory. Each range is written by one thread before it is published
// (WsStream's chunk states, Release/Acquire) and only read afterwards.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: no range is read while it is written.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(capacity: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(capacity.max(PAGE_SIZE), PAGE_SIZE)
            .expect("page-aligned layout")
    }

    /// Not zeroed: the reads fill it (a zeroed buffer cost a memset and a fault per page
    /// before the first byte was read).
    fn uninit(capacity: usize) -> Self {
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            ptr,
            capacity: layout.size(),
        }
    }

    /// Reads `len` bytes of `file` at `at` into the buffer at `offset`, whole or not at all.
    ///
    /// # Safety
    /// No one may read or write `offset..offset + len` meanwhile (it is not published yet).
    unsafe fn read_from(
        &self,
        file: &File,
        at: u64,
        offset: usize,
        len: usize,
    ) -> std::io::Result<()> {
        assert!(offset + len <= self.capacity, "read past the buffer");
        let mut done = 0;
        while done < len {
            // SAFETY: the destination lies in the allocation (asserted) and, per the contract,
            // nobody else touches it; pread writes at most `len - done` bytes there. No
            // reference to the (uninitialised) bytes is made.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    self.ptr.as_ptr().add(offset + done).cast(),
                    len - done,
                    (at + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ends at {}", at + done as u64),
                    ))
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// # Safety
    /// `offset..offset + len` must lie in the buffer and have been written by `read_from`,
    /// with that write published to this thread, and not be written again.
    unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `uninit` with this same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

const PENDING: u8 = 0;
const READY: u8 = 1;
const UNREAD: u8 = 2;

/// What became of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Read and checked: its data can be installed.
    Ready,
    /// Not read (damaged, unreadable, or the reading was stopped): serve its pages from the
    /// memory file.
    Unread,
}

/// A WS file: its checked header, and its chunks as they are read.
pub struct WsStream {
    pub header: Header,
    pub path: PathBuf,
    data: AlignedBuf,
    states: Vec<AtomicU8>,
    changed: (Mutex<()>, Condvar),
    stop: AtomicBool,
    /// Why the reading ended early, when it was not stopped on purpose.
    error: Mutex<Option<String>>,
    /// The reading ended on a chunk the file got wrong (checksum, length): the file is
    /// damaged, not only unreadable for a while.
    damaged: AtomicBool,
    /// Device and inode of the file read: it is removed when damaged only if the path still
    /// names this file (another recorder may have renamed a new one there).
    file_id: (u64, u64),
    started: Instant,
    /// Microseconds from the open to the end of the reading (every chunk read, or the
    /// reading ended early); 0 while it goes on. Set before the last chunk's fate is
    /// published.
    read_us: AtomicU64,
}

/// The file a stream reads from (kept by whoever reads, apart from the shared stream).
pub struct WsReader {
    file: File,
    o_direct: bool,
}

impl WsStream {
    /// Opens the WS file at `path` and reads and checks its header; Ok(None) when there is
    /// no file (the restore then records one). A file larger than `max_len`, or whose
    /// length is not what its header says, is refused before its data is read.
    pub fn open(
        path: &Path,
        o_direct: bool,
        max_len: u64,
    ) -> Result<Option<(WsStream, WsReader)>, ReapError> {
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
        let mut reader = match open(if o_direct { libc::O_DIRECT } else { 0 }) {
            Ok(file) => WsReader { file, o_direct },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // tmpfs and some others refuse O_DIRECT: read through the page cache then.
            Err(e) if o_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: O_DIRECT not supported here; reading it buffered",
                    path.display()
                );
                WsReader {
                    file: open(0).map_err(read_err)?,
                    o_direct: false,
                }
            }
            Err(e) => return Err(read_err(e)),
        };
        let meta = reader.file.metadata().map_err(read_err)?;
        let (len, file_id) = (meta.len(), (meta.dev(), meta.ino()));
        if len > max_len {
            return Err(ReapError::WsTooLarge {
                path: path.to_path_buf(),
                len,
                max: max_len,
            });
        }
        let bad = |source: ws::WsError| ReapError::Ws {
            path: path.to_path_buf(),
            source,
        };
        let first = AlignedBuf::uninit(PAGE_SIZE);
        // SAFETY: a buffer of this function's own, not shared.
        unsafe { reader.read(path, &first, 0, 0, PAGE_SIZE.min(len as usize)) }
            .map_err(read_err)?;
        // SAFETY: just read (whole, or the call failed above) by this thread.
        let prefix = unsafe { first.slice(0, PAGE_SIZE.min(len as usize)) };
        let header_len = Header::declared_len(prefix).map_err(bad)?;
        if header_len > len {
            return Err(bad(ws::WsError::Malformed(format!(
                "the header is {header_len} bytes, the file {len}"
            ))));
        }
        let header_buf = AlignedBuf::uninit(header_len as usize);
        // SAFETY: a buffer of this function's own, not shared.
        unsafe { reader.read(path, &header_buf, 0, 0, header_len as usize) }.map_err(read_err)?;
        // SAFETY: just read whole by this thread.
        let header =
            Header::decode(unsafe { header_buf.slice(0, header_len as usize) }).map_err(bad)?;
        if header.file_len() != len {
            return Err(bad(ws::WsError::Malformed(format!(
                "the file is {len} bytes, its header says {}",
                header.file_len()
            ))));
        }
        let states = (0..header.chunks.len())
            .map(|_| AtomicU8::new(PENDING))
            .collect();
        let stream = WsStream {
            data: AlignedBuf::uninit(header.data_pages() as usize * PAGE_SIZE),
            header,
            path: path.to_path_buf(),
            states,
            changed: (Mutex::new(()), Condvar::new()),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            damaged: AtomicBool::new(false),
            file_id,
            started,
            read_us: AtomicU64::new(0),
        };
        Ok(Some((stream, reader)))
    }

    /// Reads the chunks in order, `per_read` chunks in one read, each checked and made
    /// available as soon as it is; ends early on a failure, on `stop`, or when
    /// `still_wanted` says no one will use the chunks any more. Every chunk has its final
    /// state when this returns, or unwinds.
    pub fn read(&self, reader: &mut WsReader, per_read: usize, still_wanted: impl Fn() -> bool) {
        /// Whatever ends the reading (a panic included), no chunk stays pending: a waiter
        /// would wait for good.
        struct Settle<'a>(&'a WsStream);
        impl Drop for Settle<'_> {
            fn drop(&mut self) {
                self.0.end_from(0, None);
            }
        }
        let _settle = Settle(self);
        let chunks = self.header.chunks.len();
        let mut next = 0;
        while next < chunks {
            if self.stop.load(Ordering::Acquire) || !still_wanted() {
                // On purpose: not an error of the file.
                return;
            }
            let end = (next + per_read.max(1)).min(chunks);
            let first = &self.header.chunks[next];
            let last = &self.header.chunks[end - 1];
            let offset = (first.data_offset - self.header.header_len) as usize;
            let len = (last.data_offset - first.data_offset) as usize + last.data_len();
            // SAFETY: chunks next..end are not published: no one reads their bytes yet.
            let read =
                unsafe { reader.read(&self.path, &self.data, first.data_offset, offset, len) };
            if let Err(e) = read {
                self.end_from(next, Some(format!("reading chunk {next}: {e}")));
                return;
            }
            for i in next..end {
                let chunk = &self.header.chunks[i];
                let at = (chunk.data_offset - self.header.header_len) as usize;
                // SAFETY: chunk i's bytes were just read by this thread and are not published.
                let bytes = unsafe { self.data.slice(at, chunk.data_len()) };
                if let Err(e) = self.header.check_chunk(i, bytes) {
                    self.damaged.store(true, Ordering::Release);
                    self.end_from(i, Some(e.to_string()));
                    return;
                }
                if i + 1 == chunks {
                    // Before the last chunk is published: whoever it wakes reads the time.
                    self.finish();
                }
                self.publish(i, READY);
            }
            next = end;
        }
    }

    /// Stops the reading at the next chunk (the restore failed or refused this WS).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn publish(&self, chunk: usize, state: u8) {
        let _guard = self.changed.0.lock().unwrap_or_else(|p| p.into_inner());
        self.states[chunk].store(state, Ordering::Release);
        self.changed.1.notify_all();
    }

    /// Marks the chunks from `from` on that are still pending unread; `why` is the reason
    /// when the file is at fault (logged; the restore reports it), None when the reading
    /// was stopped on purpose.
    fn end_from(&self, from: usize, why: Option<String>) {
        // Before any chunk's fate is published: whoever it wakes reads the time.
        self.finish();
        if let Some(why) = why {
            log::warn!(
                "REAP: {}: {why}; chunks {from}.. of {} are served from the memory file",
                self.path.display(),
                self.header.chunks.len()
            );
            self.error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(why);
        }
        for chunk in from..self.header.chunks.len() {
            if self.states[chunk].load(Ordering::Acquire) == PENDING {
                self.publish(chunk, UNREAD);
            }
        }
    }

    fn finish(&self) {
        let us = self.started.elapsed().as_micros().max(1) as u64;
        let _ = self
            .read_us
            .compare_exchange(0, us, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the reading ended on a chunk the file itself got wrong (not on a read error
    /// or a stop): such a file will never serve a restore whole.
    pub fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::Acquire)
    }

    /// Whether `path` still names the file this stream read.
    pub fn is_same_file(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id)
    }

    /// Waits until chunk `chunk` is read and checked, or will not be.
    pub fn wait(&self, chunk: usize) -> ChunkState {
        loop {
            if let Some(state) = self.wait_timeout(chunk, std::time::Duration::from_secs(1)) {
                return state;
            }
        }
    }

    /// As `wait`, for at most `timeout`: None if the chunk's fate is still open then.
    pub fn wait_timeout(&self, chunk: usize, timeout: std::time::Duration) -> Option<ChunkState> {
        let state = &self.states[chunk];
        let deadline = Instant::now() + timeout;
        let mut guard = self.changed.0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match state.load(Ordering::Acquire) {
                READY => return Some(ChunkState::Ready),
                UNREAD => return Some(ChunkState::Unread),
                _ => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    guard = self
                        .changed
                        .1
                        .wait_timeout(guard, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Waits for every chunk; true when all were read and checked.
    pub fn wait_all(&self) -> bool {
        (0..self.header.chunks.len()).all(|c| self.wait(c) == ChunkState::Ready)
    }

    /// Chunk `chunk`'s data, once it is read and checked.
    pub fn chunk_data(&self, chunk: usize) -> Option<&[u8]> {
        if self.states[chunk].load(Ordering::Acquire) != READY {
            return None;
        }
        let c = &self.header.chunks[chunk];
        let at = (c.data_offset - self.header.header_len) as usize;
        // SAFETY: READY is stored (Release) only after the reader wrote and checked these
        // bytes, and they are never written again; the Acquire load above pairs with it.
        Some(unsafe { self.data.slice(at, c.data_len()) })
    }

    /// Why the reading ended early, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Microseconds from the open until every chunk was read (0 while reading).
    pub fn read_us(&self) -> u64 {
        self.read_us.load(Ordering::Acquire)
    }

    /// Bytes of the file read into memory (its header and the chunks read).
    pub fn bytes_read(&self) -> u64 {
        let data: u64 = (0..self.header.chunks.len())
            .filter(|&c| self.states[c].load(Ordering::Acquire) == READY)
            .map(|c| self.header.chunks[c].data_len() as u64)
            .sum();
        self.header.header_len + data
    }
}

impl WsReader {
    /// Reads `len` bytes at file offset `at` into `buf` at `offset`; an O_DIRECT read the
    /// filesystem refuses is done again through the page cache, on the same open file (a
    /// reopen by path could read a newer file renamed there meanwhile).
    ///
    /// # Safety
    /// No one may read or write `offset..offset + len` of `buf` meanwhile.
    unsafe fn read(
        &mut self,
        path: &Path,
        buf: &AlignedBuf,
        at: u64,
        offset: usize,
        len: usize,
    ) -> std::io::Result<()> {
        // SAFETY: per this function's contract.
        match unsafe { buf.read_from(&self.file, at, offset, len) } {
            // Some filesystems take an O_DIRECT open and then refuse the read.
            Err(e) if self.o_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: O_DIRECT read refused here; reading it buffered",
                    path.display()
                );
                let fd = self.file.as_raw_fd();
                // SAFETY: fcntl on a descriptor this reader owns; it reads its flags only.
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                if flags < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: as above; it changes the descriptor's status flags only.
                if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                self.o_direct = false;
                // SAFETY: per this function's contract.
                unsafe { buf.read_from(&self.file, at, offset, len) }
            }
            other => other,
        }
    }
}

/// The largest WS file a snapshot whose memory file is at `memory_path` can have (0 when
/// the memory file cannot be read: the restore then fails on it anyway).
pub fn ws_size_limit(memory_path: &Path) -> u64 {
    std::fs::metadata(memory_path)
        .map(|m| ws::max_file_len(m.len()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::ws::{SnapshotIdentity, WsRegion};

    const ID: SnapshotIdentity = SnapshotIdentity {
        vmstate_checksum: 3,
        memory_len: 8192 * 4096,
    };
    const LAYOUT: [WsRegion; 1] = [WsRegion {
        guest_addr: 0,
        size: 8192 * 4096,
        file_offset: 0,
    }];

    fn ws_file(dir: &Path, touched: &[u64]) -> (PathBuf, Vec<u8>) {
        let offsets: Vec<u64> = touched.iter().map(|p| p * PAGE_SIZE as u64).collect();
        let bytes = ws::build(ID, &LAYOUT, &offsets, |offset, page: &mut [u8]| {
            page.fill((offset / PAGE_SIZE as u64) as u8 | 1);
            Ok::<_, ()>(())
        })
        .unwrap();
        let path = dir.join("ws");
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reapvm-stream-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn chunks_arrive_checked_whole_or_in_one_read() {
        let dir = scratch("read");
        // Every third page: 2000 pages in 6 chunks.
        let touched: Vec<u64> = (0..2000).map(|p| p * 3).collect();
        let (path, bytes) = ws_file(&dir, &touched);
        assert!(WsStream::open(&dir.join("none"), false, u64::MAX)
            .unwrap()
            .is_none());
        for (direct, per_read) in [(false, 1), (true, 1), (false, usize::MAX), (true, 3)] {
            let (stream, mut reader) = WsStream::open(&path, direct, u64::MAX).unwrap().unwrap();
            assert!(stream.chunk_data(0).is_none(), "nothing is read yet");
            stream.read(&mut reader, per_read, || true);
            assert!(stream.wait_all());
            for (i, c) in stream.header.chunks.iter().enumerate() {
                let file = &bytes[c.data_offset as usize..][..c.data_len()];
                assert_eq!(stream.chunk_data(i).unwrap(), file, "chunk {i}");
            }
            assert!(stream.read_us() > 0 && stream.error().is_none());
            assert_eq!(stream.bytes_read(), bytes.len() as u64);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_chunk_ends_the_reading_there() {
        let dir = scratch("damaged");
        let touched: Vec<u64> = (0..2000).map(|p| p * 3).collect();
        let (path, mut bytes) = ws_file(&dir, &touched);
        let header = Header::decode(&bytes).unwrap();
        bytes[header.chunks[2].data_offset as usize + 100] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (stream, mut reader) = WsStream::open(&path, false, u64::MAX).unwrap().unwrap();
        // Waiters see each chunk's fate as it is decided.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let states = [stream.wait(1), stream.wait(2), stream.wait(5)];
                // The reading's time is set before the fates that end it are published.
                (states, stream.read_us())
            });
            stream.read(&mut reader, 1, || true);
            let (states, read_us) = waiter.join().unwrap();
            assert_eq!(
                states,
                [ChunkState::Ready, ChunkState::Unread, ChunkState::Unread]
            );
            assert!(read_us > 0, "a waiter woken by the end saw no reading time");
        });
        assert!(stream.chunk_data(1).is_some() && stream.chunk_data(2).is_none());
        assert!(!stream.wait_all());
        let why = stream.error().unwrap();
        assert!(why.contains("chunk 2"), "{why}");
        assert!(stream.is_damaged());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reading_no_one_wants_any_more_ends_without_blaming_the_file() {
        let dir = scratch("unwanted");
        let touched: Vec<u64> = (0..500).map(|p| p * 3).collect();
        let (path, _) = ws_file(&dir, &touched);
        let (stream, mut reader) = WsStream::open(&path, false, u64::MAX).unwrap().unwrap();
        stream.read(&mut reader, 1, || false);
        // Every chunk has its fate (no waiter hangs), and the file is not called damaged.
        assert_eq!(stream.wait(0), ChunkState::Unread);
        assert!(!stream.wait_all());
        assert!(stream.error().is_none() && !stream.is_damaged());
        assert!(stream.is_same_file(&path));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_headers_and_lengths_are_refused_before_the_data() {
        let dir = scratch("bad");
        let (path, bytes) = ws_file(&dir, &[1, 2, 3]);
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = WsStream::open(&path, false, u64::MAX).err().unwrap();
        assert!(err.to_string().contains("its header says"), "{err}");
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            WsStream::open(&path, false, 100),
            Err(ReapError::WsTooLarge { .. })
        ));
        let mut v1 = bytes.clone();
        v1[8] = 1;
        std::fs::write(&path, &v1).unwrap();
        let err = WsStream::open(&path, false, u64::MAX).err().unwrap();
        assert!(err.to_string().contains("version 1"), "{err}");
        std::fs::write(&path, b"REAP").unwrap();
        assert!(WsStream::open(&path, false, u64::MAX).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
