//! The virtio-mmio transport with a virtio-block device behind it, driven the way a guest
//! drives it: register reads and writes, queue notifications served by the event loop,
//! guest memory (rings, descriptors, buffers) that the fuzzer controls, and snapshots of
//! the transport restored with fuzzer-altered state.
//!
//! Input: `ops: u8`, then `ops` operations of 6 bytes (`code a v:u32le`), then the first
//! bytes of guest memory (64 KiB, the rest zero). What must hold: no panic, no hang (the
//! fuzzer's timeout), and the disk never grows: every request stays inside the drive.
#![no_main]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::block::{Block, BlockArgs, BlockState, SECTOR_SIZE};
use devices::virtio::mmio::{MmioTransport, MmioTransportArgs, MmioTransportState, NOTIFY_OFFSET};
use devices::virtio::{status, Interrupt};
use devices::{BusDevice, GuestMemoryMmap, Persist};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x1_0000;
const DISK_SECTORS: u64 = 16;
const DISK_LEN: u64 = DISK_SECTORS * SECTOR_SIZE;
const OP_LEN: usize = 6;
// Where the canned driver set-up puts queue 0 (sizes up to 16 fit).
const DESC_TABLE: u32 = 0x000;
const AVAIL_RING: u32 = 0x100;
const USED_RING: u32 = 0x180;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The drive's backing file, made once per fuzzing process and unlinked at once (the
/// drive opens it through /proc/self/fd, so nothing is left behind); each run starts from
/// the same contents.
fn disk() -> &'static (PathBuf, File) {
    static DISK: OnceLock<(PathBuf, File)> = OnceLock::new();
    DISK.get_or_init(|| {
        let file = tempfile::tempfile().expect("create the fuzz disk");
        file.set_len(DISK_LEN).expect("size the fuzz disk");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (path, file)
    })
}

/// A transport with its device and the event loop that serves the device's queue.
struct Machine {
    transport: MmioTransport,
    block: Arc<Mutex<Block>>,
    events: EventManager<Subscriber>,
}

fn machine(
    mem: &GuestMemoryMmap,
    saved: Option<(&MmioTransportState, &BlockState)>,
) -> Option<Machine> {
    let (path, _) = disk();
    let block = match saved {
        None => Block::new("fuzz", path, false, Default::default()).expect("open the fuzz disk"),
        Some((_, device)) => {
            let args = BlockArgs { path: path.clone() };
            Block::restore(args, device).expect("the saved drive is the live one")
        }
    };
    let block = Arc::new(Mutex::new(block));
    let mut events = EventManager::<Subscriber>::new().expect("epoll");
    events.add_subscriber(block.clone());
    let interrupt = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ));
    let transport = match saved {
        None => MmioTransport::new(block.clone(), mem.clone(), interrupt).expect("transport"),
        Some((state, _)) => {
            let args = MmioTransportArgs {
                device: block.clone(),
                mem: mem.clone(),
                interrupt,
            };
            // A refused state is the expected answer to most alterations.
            MmioTransport::restore(args, state).ok()?
        }
    };
    Some(Machine {
        transport,
        block,
        events,
    })
}

fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// What a Linux driver does to bring the device up with one queue of `size` entries.
fn driver_init(t: &mut MmioTransport, size: u32) {
    use status::*;
    write_reg(t, 0x70, 0);
    write_reg(t, 0x70, ACKNOWLEDGE);
    write_reg(t, 0x70, ACKNOWLEDGE | DRIVER);
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, 1); // VIRTIO_F_VERSION_1, bit 32.
    write_reg(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    write_reg(t, 0x30, 0);
    write_reg(t, 0x38, size);
    write_reg(t, 0x80, DESC_TABLE);
    write_reg(t, 0x84, 0);
    write_reg(t, 0x90, AVAIL_RING);
    write_reg(t, 0x94, 0);
    write_reg(t, 0xa0, USED_RING);
    write_reg(t, 0xa4, 0);
    write_reg(t, 0x44, 1);
    write_reg(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

/// `state` with one field changed by the fuzzer: what a forged vmstate could hold.
fn alter(state: &mut MmioTransportState, field: u8, v: u32) {
    let wide = u64::from(v) | (u64::from(v) << 32);
    match field % 12 {
        0 => state.device_status ^= v,
        1 => state.driver_features ^= wide,
        2 => state.queue_select ^= v,
        3 => state.interrupt_status ^= v,
        4 => state.config_generation ^= v,
        field => {
            let Some(q) = state.queues.first_mut() else {
                return;
            };
            match field {
                5 => q.size ^= v as u16,
                6 => q.next_avail ^= v as u16,
                7 => q.next_used ^= v as u16,
                8 => q.desc_table ^= wide,
                9 => q.avail_ring ^= wide,
                10 => q.used_ring ^= wide,
                _ => q.ready = !q.ready,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ops, rest)) = data.split_first() else {
        return;
    };
    let ops_len = (usize::from(ops) * OP_LEN).min(rest.len());
    let (ops, image) = rest.split_at(ops_len);

    let (_, file) = disk();
    file.write_all_at(&[0x5a; DISK_LEN as usize], 0)
        .expect("reset the fuzz disk");
    // One guest memory per process (mapping one per run halves the speed), refilled.
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    let mem = MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory")
    });
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0)).expect("image");
    static ZEROES: [u8; MEM_SIZE] = [0; MEM_SIZE];
    mem.write_slice(&ZEROES[image.len()..], GuestAddress(image.len() as u64))
        .expect("zero the rest");
    let Some(mut m) = machine(mem, None) else {
        return;
    };

    for op in ops.chunks_exact(OP_LEN) {
        let (code, a) = (op[0], op[1]);
        let v = u32::from_le_bytes(op[2..6].try_into().expect("4 bytes"));
        match code % 8 {
            0 => write_reg(&mut m.transport, u64::from(a) * 4, v),
            1 => {
                let mut out = [0u8; 4];
                m.transport.read(u64::from(a) * 4, &mut out);
            }
            2 => {
                let mut out = [0u8; 8];
                let len = 1 + (v as usize & 7);
                m.transport
                    .read(0x100 + u64::from(a & 0x3f), &mut out[..len]);
            }
            3 => {
                let len = 1 + (v as usize >> 30);
                m.transport
                    .write(0x100 + u64::from(a & 0x3f), &v.to_le_bytes()[..len]);
            }
            4 => driver_init(&mut m.transport, 1 << (a % 5)),
            5 => {
                write_reg(&mut m.transport, NOTIFY_OFFSET, v & 1);
                m.events.run_with_timeout(0).expect("event loop");
            }
            6 => {
                let _ = mem.write_obj(v, GuestAddress(u64::from(a) * 4));
            }
            _ => {
                // A snapshot of the transport, altered, restored over a fresh device.
                let mut state = m.transport.save();
                let saved_block = m.block.lock().unwrap().save();
                alter(&mut state, a, v);
                drop(m);
                let Some(restored) = machine(mem, Some((&state, &saved_block))) else {
                    return;
                };
                assert_eq!(restored.block.lock().unwrap().save(), saved_block);
                m = restored;
                m.events.run_with_timeout(0).expect("event loop");
            }
        }
        // Requests are served on notifications and on restores (a restored active device
        // serves what is pending).
        if matches!(code % 8, 5 | 7) {
            let len = file.metadata().expect("disk metadata").len();
            assert_eq!(len, DISK_LEN, "a request wrote past the end of the drive");
        }
    }
});
