//! The agent's vsock listener: invocations reach a VM with no network device over vsock
//! (Firecracker's host side: `CONNECT 8080` on the VM's `uds_path`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// IOCTL_VM_SOCKETS_GET_LOCAL_CID: _IO(7, 0xb9).
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// The guest's vsock address, or None without a vsock device: the kernel's vsock core is
/// built in and takes listeners either way, but only a device gives the guest a CID.
pub fn local_cid() -> Option<u32> {
    let dev = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: the ioctl writes one u32 into `cid`, which we own.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    // 0-2 are not a guest's: a kernel with vsock loopback answers 1 without a device.
    (rc == 0 && cid != libc::VMADDR_CID_ANY && cid > 2).then_some(cid)
}

/// Listens on vsock port `port` for any CID.
pub fn listen(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is ours alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: addr is a valid sockaddr_vm and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen on our own bound socket.
    if rc < 0 || unsafe { libc::listen(fd, 128) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}
