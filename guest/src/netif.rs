//! Brings up the loopback interface (eth0 is configured by the kernel's `ip=`).

pub fn bring_up(name: &str) -> std::io::Result<()> {
    // SAFETY: socket() takes no pointers; the descriptor is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ifreq = [0u8; 40];
    let n = name.len().min(15);
    ifreq[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: SIOCGIFFLAGS fills the flags of the 40-byte struct ifreq we own.
    let mut rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, ifreq.as_mut_ptr()) };
    if rc == 0 {
        let flags = i16::from_ne_bytes([ifreq[16], ifreq[17]]) | libc::IFF_UP as i16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: as above, SIOCSIFFLAGS reads the same struct.
        rc = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, ifreq.as_mut_ptr()) };
    }
    let result = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    result
}
