//! A TAP network interface opened by name, with virtio-net headers (IFF_VNET_HDR) so that
//! checksum and segmentation offloads pass straight through between the guest and the host.
//! The tap is looked up in the network namespace reapvm runs in: tests, the demo and the
//! benchmarks create a namespace (`ip netns add`) with the tap inside and start reapvm there,
//! so guest traffic never reaches the host's own interfaces.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
/// The virtio 1.x net header (`virtio_net_hdr_v1`, with num_buffers).
pub const VNET_HDR_LEN: usize = 12;
const IFNAMSIZ: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap device name {0:?} is empty, too long (max 15 bytes) or contains NUL")]
    Name(String),
    #[error("tap device {name} does not exist in this network namespace and cannot be created here: {source} (create it first, e.g. `ip tuntap add {name} mode tap`, or give reapvm CAP_NET_ADMIN)")]
    Missing {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to tap device {name} (TUNSETIFF): {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("tap device {name}: {what} failed: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap interface `name`, or, as Firecracker does, creates it (TUNSETIFF
    /// makes a missing one, with CAP_NET_ADMIN): a tap made here lives as long as the VMM
    /// holds it, and starts down and without addresses, for whoever made the namespace to
    /// configure.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        let cname = CString::new(name).map_err(|_| TapError::Name(name.to_string()))?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        let existed = unsafe { libc::if_nametoindex(cname.as_ptr()) } != 0;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // struct ifreq: the name, then the flags (a short) at offset 16.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is large enough for.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
            let name = name.to_string();
            let source = std::io::Error::last_os_error();
            return Err(if existed {
                TapError::Attach { name, source }
            } else {
                TapError::Missing { name, source }
            });
        }
        if !existed {
            log::info!("tap device {name} did not exist: created it (down, no address)");
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(tap.configure_error("TUNSETVNETHDRSZ"));
        }
        Ok(tap)
    }

    fn configure_error(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: std::io::Error::last_os_error(),
        }
    }

    /// Which offloaded (partial-checksum, TSO) frames the host may hand to the guest.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(self.configure_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (virtio-net header first); WouldBlock when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (virtio-net header first).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(TapError::Name(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(TapError::Name(_))
        ));
        assert!(matches!(Tap::open("bad\0name"), Err(TapError::Name(_))));
    }

    /// Runs `f` on a thread in a network namespace of its own (unshare affects the calling
    /// thread only): nothing it makes is seen outside, and it all goes with the thread.
    fn in_own_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare(2) with a flag; it changes only this thread's namespace.
                let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the namespace thread")
        })
    }

    fn exists(name: &str) -> bool {
        let cname = CString::new(name).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string.
        unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
    }

    #[test]
    fn a_missing_tap_is_created_and_goes_with_the_vmm() {
        in_own_netns(|| {
            assert!(!exists("reapvm-new0"));
            let tap = Tap::open("reapvm-new0").expect("TUNSETIFF creates a missing tap");
            assert!(exists("reapvm-new0"), "the tap is in the namespace");
            // A second VMM attaching to it while the first holds it is refused (busy).
            assert!(matches!(
                Tap::open("reapvm-new0"),
                Err(TapError::Attach { .. })
            ));
            drop(tap);
            assert!(!exists("reapvm-new0"), "a tap reapvm made leaves with it");
        });
    }
}
