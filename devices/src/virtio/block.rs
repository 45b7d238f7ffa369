//! virtio-block backed by a host file: read, write, flush, get-id; read-only drives answer
//! writes with an I/O error. Every request is checked (directions, lengths, bounds); a bad
//! request fails alone, with an error status when it has a status byte.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Reader, Writer};

/// The dirty bitmap of a slice of guest memory, as the descriptor readers and writers carry it.
type GuestSliceBitmap<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState};
use crate::{GuestMemoryMmap, Persist};

use super::one_queue::OneQueue;
use super::{ActivateContext, ActivateError, VirtioDevice, TYPE_BLOCK};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const ID_BYTES: usize = 20;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const REQ_IN: u32 = 0;
const REQ_OUT: u32 = 1;
const REQ_FLUSH: u32 = 4;
const REQ_GET_ID: u32 = 8;
const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;
const HEADER_LEN: usize = 16;
/// Largest single copy between the file and guest memory.
const CHUNK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open drive {id} at {path}: {source}")]
    Open {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drive {id} at {path}: its size {size} is not a multiple of {SECTOR_SIZE} bytes")]
    Size {
        id: String,
        path: PathBuf,
        size: u64,
    },
    #[error("cannot create the activation event of drive {0}: {1}")]
    Event(String, std::io::Error),
    #[error("drive {id}: {source}")]
    RateLimiter {
        id: String,
        source: RateLimiterError,
    },
    #[error("drive {id} at {path} holds {now} sectors; the snapshot's guest saw {saved}: give it the drive it had")]
    CapacityChanged {
        id: String,
        path: PathBuf,
        saved: u64,
        now: u64,
    },
}

/// A drive in a snapshot: what its guest saw of it. The backing file comes from the
/// configuration at restore time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub id: String,
    pub read_only: bool,
    pub capacity_sectors: u64,
    /// Its rate limiter's buckets and what they held (absent from older snapshots: none).
    #[serde(default)]
    pub rate_limiter: RateLimiterState,
}

/// What a restored drive needs besides its state: the file backing it now.
pub struct BlockArgs {
    pub path: PathBuf,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            id: self.id.clone(),
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            rate_limiter: self.queue.limiter().save(),
        }
    }

    /// The guest keeps the capacity it read at boot: a backing file of another size would
    /// have it read past the end or miss data, so it is refused.
    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, BlockError> {
        let limiter = RateLimiter::restore(&state.rate_limiter).map_err(|source| {
            BlockError::RateLimiter {
                id: state.id.clone(),
                source,
            }
        })?;
        let block = Self::with_limiter(&state.id, &args.path, state.read_only, limiter)?;
        if block.capacity_sectors != state.capacity_sectors {
            return Err(BlockError::CapacityChanged {
                id: state.id.clone(),
                path: args.path,
                saved: state.capacity_sectors,
                now: block.capacity_sectors,
            });
        }
        Ok(block)
    }
}

/// Opens a drive's backing file (or block device): the file and its size in sectors.
fn open_backing(id: &str, path: &Path, read_only: bool) -> Result<(File, u64), BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            id: id.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
    // The end of the file, not its metadata: a block device (a loop device, a devmapper
    // volume as vHive's container drives) has a metadata length of 0.
    let size = (&file)
        .seek(SeekFrom::End(0))
        .map_err(|source| BlockError::Open {
            id: id.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
    if size % SECTOR_SIZE != 0 {
        return Err(BlockError::Size {
            id: id.to_string(),
            path: path.to_path_buf(),
            size,
        });
    }
    Ok((file, size / SECTOR_SIZE))
}

/// The bytes a request moves, for the rate limiter: its descriptors' lengths less the
/// header and the status byte (a flush: none, one operation only).
fn data_bytes(chain: &DescriptorChain<&GuestMemoryMmap>) -> u64 {
    let total: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
    total.saturating_sub(HEADER_LEN as u64 + 1)
}

/// Why a request failed; decides the status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("request has no writable status byte; dropped")]
    NoStatus,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("{len} bytes at sector {sector} lie past the end of the drive")]
    OutOfRange { sector: u64, len: u64 },
    #[error("write to a read-only drive")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

pub struct Block {
    id: String,
    path: PathBuf,
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    queue: OneQueue,
    buffer: Vec<u8>,
}

impl Block {
    pub fn new(
        id: &str,
        path: &Path,
        read_only: bool,
        rate_limiter: RateLimiterConfig,
    ) -> Result<Self, BlockError> {
        let limiter = RateLimiter::new(rate_limiter).map_err(|source| BlockError::RateLimiter {
            id: id.to_string(),
            source,
        })?;
        Self::with_limiter(id, path, read_only, limiter)
    }

    fn with_limiter(
        id: &str,
        path: &Path,
        read_only: bool,
        limiter: RateLimiter,
    ) -> Result<Self, BlockError> {
        let (file, capacity_sectors) = open_backing(id, path, read_only)?;
        Ok(Self {
            id: id.to_string(),
            path: path.to_path_buf(),
            file,
            read_only,
            capacity_sectors,
            queue: OneQueue::new(format!("virtio-block {id}"), limiter)
                .map_err(|e| BlockError::Event(id.to_string(), e))?,
            buffer: Vec::new(),
        })
    }

    /// `PATCH /drives` after boot: the drive is now backed by `path` (opened as this drive
    /// was: read-only or not), with that file's size. The caller tells the guest through the
    /// transport (a configuration change) so that it reads the new capacity.
    pub fn swap_file(&mut self, path: &Path) -> Result<(), BlockError> {
        let (file, capacity_sectors) = open_backing(&self.id, path, self.read_only)?;
        self.file = file;
        self.capacity_sectors = capacity_sectors;
        self.path = path.to_path_buf();
        Ok(())
    }

    /// `PATCH /drives`: new buckets for the rate limiter (those not given stay).
    pub fn update_rate_limiter(&mut self, config: RateLimiterConfig) {
        self.queue.update_limiter(config);
    }

    pub fn rate_limiter(&self) -> RateLimiterConfig {
        self.queue.limiter().config()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn config_space(&self) -> [u8; 8] {
        self.capacity_sectors.to_le_bytes()
    }
}

/// Parses and executes one request; returns the number of bytes written to the guest.
fn serve_request(
    file: &File,
    read_only: bool,
    capacity_sectors: u64,
    id: &str,
    buffer: &mut Vec<u8>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let (mut reader, mut writer) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
    {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            log::warn!("virtio-block {id}: request with descriptors outside guest memory dropped");
            return 0;
        }
    };
    let writable = writer.available_bytes();
    if writable == 0 {
        log::warn!("virtio-block {id}: {}", RequestError::NoStatus);
        return 0;
    }
    let mut status_writer = match writer.split_at(writable - 1) {
        Ok(s) => s,
        Err(_) => return 0,
    };
    let (status, data_len) = match execute(
        file,
        read_only,
        capacity_sectors,
        id,
        buffer,
        &mut reader,
        &mut writer,
    ) {
        Ok(n) => (STATUS_OK, n),
        Err(e) => {
            log::debug!("virtio-block {id}: {e}");
            let status = match e {
                RequestError::Unsupported(_) => STATUS_UNSUPP,
                _ => STATUS_IOERR,
            };
            (status, 0)
        }
    };
    if status_writer.write_all(&[status]).is_err() {
        return 0;
    }
    (data_len + 1) as u32
}

fn check_range(sector: u64, len: u64, capacity_sectors: u64) -> Result<u64, RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::Malformed(
            "data length is not a multiple of 512",
        ));
    }
    let end = sector
        .checked_add(len / SECTOR_SIZE)
        .ok_or(RequestError::OutOfRange { sector, len })?;
    if end > capacity_sectors {
        return Err(RequestError::OutOfRange { sector, len });
    }
    Ok(sector * SECTOR_SIZE)
}

fn execute(
    file: &File,
    read_only: bool,
    capacity_sectors: u64,
    id: &str,
    buffer: &mut Vec<u8>,
    reader: &mut Reader<'_, GuestSliceBitmap<'_>>,
    writer: &mut Writer<'_, GuestSliceBitmap<'_>>,
) -> Result<usize, RequestError> {
    let mut header = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(|_| RequestError::Malformed("header shorter than 16 bytes"))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    match kind {
        REQ_IN => {
            let len = writer.available_bytes();
            let mut offset = check_range(sector, len as u64, capacity_sectors)?;
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK);
                buffer.resize(n, 0);
                file.read_exact_at(&mut buffer[..n], offset)
                    .map_err(RequestError::Io)?;
                writer.write_all(&buffer[..n]).map_err(RequestError::Io)?;
                offset += n as u64;
                left -= n;
            }
            Ok(len)
        }
        REQ_OUT => {
            if read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let mut offset = check_range(sector, len as u64, capacity_sectors)?;
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK);
                buffer.resize(n, 0);
                reader
                    .read_exact(&mut buffer[..n])
                    .map_err(RequestError::Io)?;
                file.write_all_at(&buffer[..n], offset)
                    .map_err(RequestError::Io)?;
                offset += n as u64;
                left -= n;
            }
            Ok(0)
        }
        REQ_FLUSH => {
            if !read_only {
                file.sync_data().map_err(RequestError::Io)?;
            }
            Ok(0)
        }
        REQ_GET_ID => {
            let mut bytes = [0u8; ID_BYTES];
            let src = id.as_bytes();
            let n = src.len().min(ID_BYTES);
            bytes[..n].copy_from_slice(&src[..n]);
            let room = writer.available_bytes().min(ID_BYTES);
            writer.write_all(&bytes[..room]).map_err(RequestError::Io)?;
            Ok(room)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn offered_features(&self) -> u64 {
        let mut features = VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        let start = offset as usize;
        data.fill(0);
        if let Some(src) = config.get(start..(start + data.len()).min(config.len())) {
            data[..src.len()].copy_from_slice(src);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!(
            "virtio-block {}: ignoring config write at {offset:#x}",
            self.id
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.queue.activate(ctx)
    }

    fn reset(&mut self) {
        self.queue.reset();
    }

    fn pause(&mut self) {
        self.queue.pause();
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.queue.queue_states()
    }

    fn resume(&mut self) {
        self.queue.resume();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.queue.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (file, read_only, capacity, id, buffer) = (
            &self.file,
            self.read_only,
            self.capacity_sectors,
            &self.id,
            &mut self.buffer,
        );
        self.queue.process(events, ops, data_bytes, |chain| {
            let mem = chain.memory();
            serve_request(file, read_only, capacity, id, buffer, mem, chain.clone())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Fixture {
        mem: GuestMemoryMmap,
        file: File,
        path: PathBuf,
    }

    fn fixture(name: &str, sectors: u64) -> Fixture {
        let dir = std::env::temp_dir().join(format!("reapvm-blk-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk");
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        std::fs::write(&path, content).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        Fixture {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
            file,
            path,
        }
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs one request made of `descs`; returns (used length, status byte).
    fn run(f: &Fixture, read_only: bool, descs: &[RawDescriptor]) -> (u32, u8) {
        let queue = MockSplitQueue::new(&f.mem, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        let mut buffer = Vec::new();
        f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let len = serve_request(&f.file, read_only, 8, "rootfs", &mut buffer, &f.mem, chain);
        (len, f.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    #[test]
    fn read_write_flush_get_id() {
        let f = fixture("rw", 8);
        header(&f.mem, REQ_IN, 2);
        let (len, status) = run(
            &f,
            false,
            &[
                desc(HDR, 16, false),
                desc(DATA, 1024, true),
                desc(STATUS, 1, true),
            ],
        );
        assert_eq!((len, status), (1025, STATUS_OK));
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 2);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), 3);

        f.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        header(&f.mem, REQ_OUT, 7);
        let (len, status) = run(
            &f,
            false,
            &[
                desc(HDR, 16, false),
                desc(DATA, 512, false),
                desc(STATUS, 1, true),
            ],
        );
        assert_eq!((len, status), (1, STATUS_OK));
        let on_disk = std::fs::read(&f.path).unwrap();
        assert!(on_disk[7 * 512..].iter().all(|b| *b == 0xaa));

        header(&f.mem, REQ_FLUSH, 0);
        assert_eq!(
            run(&f, false, &[desc(HDR, 16, false), desc(STATUS, 1, true)]).1,
            STATUS_OK
        );

        header(&f.mem, REQ_GET_ID, 0);
        let (len, status) = run(
            &f,
            false,
            &[
                desc(HDR, 16, false),
                desc(DATA, 20, true),
                desc(STATUS, 1, true),
            ],
        );
        assert_eq!((len, status), (21, STATUS_OK));
        let mut id = [0u8; 6];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"rootfs");
    }

    #[test]
    fn bad_requests_fail_alone() {
        let f = fixture("bad", 8);
        // Past the end of the disk.
        header(&f.mem, REQ_IN, 7);
        let r = run(
            &f,
            false,
            &[
                desc(HDR, 16, false),
                desc(DATA, 1024, true),
                desc(STATUS, 1, true),
            ],
        );
        assert_eq!(r, (1, STATUS_IOERR));
        // Sector number that overflows.
        header(&f.mem, REQ_IN, u64::MAX);
        assert_eq!(
            run(
                &f,
                false,
                &[
                    desc(HDR, 16, false),
                    desc(DATA, 512, true),
                    desc(STATUS, 1, true)
                ]
            )
            .1,
            STATUS_IOERR
        );
        // Length not a multiple of a sector.
        header(&f.mem, REQ_IN, 0);
        assert_eq!(
            run(
                &f,
                false,
                &[
                    desc(HDR, 16, false),
                    desc(DATA, 100, true),
                    desc(STATUS, 1, true)
                ]
            )
            .1,
            STATUS_IOERR
        );
        // Write to a read-only drive.
        header(&f.mem, REQ_OUT, 0);
        assert_eq!(
            run(
                &f,
                true,
                &[
                    desc(HDR, 16, false),
                    desc(DATA, 512, false),
                    desc(STATUS, 1, true)
                ]
            )
            .1,
            STATUS_IOERR
        );
        assert_eq!(std::fs::read(&f.path).unwrap()[0], 0, "nothing written");
        // Unknown request type.
        header(&f.mem, 99, 0);
        assert_eq!(
            run(&f, false, &[desc(HDR, 16, false), desc(STATUS, 1, true)]).1,
            STATUS_UNSUPP
        );
        // Short header.
        header(&f.mem, REQ_IN, 0);
        assert_eq!(
            run(&f, false, &[desc(HDR, 8, false), desc(STATUS, 1, true)]).1,
            STATUS_IOERR
        );
        // No writable status byte: nothing to report, nothing used.
        header(&f.mem, REQ_FLUSH, 0);
        assert_eq!(run(&f, false, &[desc(HDR, 16, false)]).0, 0);
        // Data descriptor outside guest memory.
        header(&f.mem, REQ_IN, 0);
        assert_eq!(
            run(
                &f,
                false,
                &[
                    desc(HDR, 16, false),
                    desc(0xffff_0000, 512, true),
                    desc(STATUS, 1, true)
                ]
            )
            .0,
            0
        );
    }

    #[test]
    fn config_reports_capacity_and_features() {
        let f = fixture("cfg", 8);
        let rw = Block::new("d", &f.path, false, RateLimiterConfig::default()).unwrap();
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut tail = [0xffu8; 4];
        rw.read_config(6, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0]);
        assert_eq!(rw.offered_features() & VIRTIO_BLK_F_RO, 0);
        let ro = Block::new("d", &f.path, true, RateLimiterConfig::default()).unwrap();
        assert_ne!(ro.offered_features() & VIRTIO_BLK_F_RO, 0);
        std::fs::write(&f.path, [0u8; 700]).unwrap();
        assert!(matches!(
            Block::new("d", &f.path, false, RateLimiterConfig::default()),
            Err(BlockError::Size { .. })
        ));
        assert!(matches!(
            Block::new(
                "d",
                Path::new("/nonexistent/disk"),
                false,
                RateLimiterConfig::default()
            ),
            Err(BlockError::Open { .. })
        ));
    }

    /// A loop device over a file, detached when dropped.
    struct LoopDevice(PathBuf);

    impl LoopDevice {
        fn over(file: &Path) -> Self {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .expect("run losetup (util-linux)");
            assert!(
                out.status.success(),
                "losetup --find --show {}: {} (this test needs root and a free loop device)",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            Self(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn a_block_device_is_a_drive_of_its_own_size() {
        let f = fixture("loop", 64);
        let device = LoopDevice::over(&f.path);
        let block = Block::new("rootfs", &device.0, false, RateLimiterConfig::default()).unwrap();
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(
            u64::from_le_bytes(cap),
            64,
            "capacity of {}",
            device.0.display()
        );
        // A read through the device returns the file's sectors.
        header(&f.mem, REQ_IN, 40);
        let queue = MockSplitQueue::new(&f.mem, 16);
        let chain = queue
            .build_desc_chain(&[
                desc(HDR, 16, false),
                desc(DATA, 1024, true),
                desc(STATUS, 1, true),
            ])
            .unwrap();
        let mut buffer = Vec::new();
        let len = serve_request(&block.file, false, 64, "rootfs", &mut buffer, &f.mem, chain);
        assert_eq!(len, 1025);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 40);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), 41);
        assert_eq!(
            f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            STATUS_OK
        );
    }

    #[test]
    fn saved_state_restores_the_drive_the_guest_saw_and_refuses_another_size() {
        let f = fixture("persist", 8);
        let limiter: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 4096, "refill_time": 100}, "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}"#,
        )
        .unwrap();
        let saved = Block::new("data", &f.path, true, limiter).unwrap().save();
        let json = serde_json::to_string(&saved).unwrap();
        let state: BlockState = serde_json::from_str(&json).unwrap();
        // A snapshot from before rate limiters: none.
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("rate_limiter");
        let old: BlockState = serde_json::from_value(old).unwrap();
        assert!(Block::restore(
            BlockArgs {
                path: f.path.clone()
            },
            &old
        )
        .unwrap()
        .rate_limiter()
        .bandwidth
        .is_none());
        let args = || BlockArgs {
            path: f.path.clone(),
        };
        let restored = Block::restore(args(), &state).unwrap();
        assert_eq!(restored.save(), saved);
        assert_eq!(restored.rate_limiter(), limiter);
        assert_eq!(restored.id(), "data");
        assert_ne!(restored.offered_features() & VIRTIO_BLK_F_RO, 0);
        std::fs::write(&f.path, vec![0u8; 16 * SECTOR_SIZE as usize]).unwrap();
        let e = Block::restore(args(), &state).err().unwrap();
        assert!(
            matches!(
                e,
                BlockError::CapacityChanged {
                    saved: 8,
                    now: 16,
                    ..
                }
            ),
            "{e}"
        );
    }
}
