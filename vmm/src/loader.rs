//! Puts the guest kernel (ELF vmlinux or bzImage), its command line and the initrd into
//! guest memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use devices::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::boot_params::InitrdPlacement;
use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};

/// The 64-bit entry point of a bzImage's protected-mode code, from its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    CmdlineLoad(loader::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("initrd {path} is empty")]
    InitrdEmpty { path: PathBuf },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    InitrdRead {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the kernel went and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: u64,
    pub end: u64,
    /// The bzImage's setup header; None for a vmlinux.
    pub setup_header: Option<setup_header>,
}

pub fn open(what: &'static str, path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|source| LoaderError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads `image` as an ELF vmlinux, or as a bzImage when it has no ELF magic.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    image: &mut File,
    path: &Path,
) -> Result<LoadedKernel, LoaderError> {
    let highmem = Some(GuestAddress(HIMEM_START));
    let load_error = |source| LoaderError::Load {
        path: path.to_path_buf(),
        source,
    };
    match Elf::load(mem, None, image, highmem) {
        Ok(res) => Ok(LoadedKernel {
            entry: res.kernel_load.0,
            end: res.kernel_end,
            setup_header: None,
        }),
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber))
        | Err(loader::Error::Elf(loader::elf::Error::ReadElfHeader)) => {
            match BzImage::load(mem, None, image, highmem) {
                Ok(res) => Ok(LoadedKernel {
                    entry: res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                    end: res.kernel_end,
                    setup_header: res.setup_header,
                }),
                Err(loader::Error::Bzimage(
                    loader::bzimage::Error::InvalidBzImage
                    | loader::bzimage::Error::ReadBzImageHeader
                    | loader::bzimage::Error::Underflow,
                )) => Err(LoaderError::NotAKernel {
                    path: path.to_path_buf(),
                }),
                Err(e) => Err(load_error(e)),
            }
        }
        Err(e) => Err(load_error(e)),
    }
}

pub fn build_cmdline(args: &str) -> Result<Cmdline, LoaderError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    cmdline.insert_str(args).map_err(LoaderError::Cmdline)?;
    Ok(cmdline)
}

/// Writes the command line at its fixed address; returns its size with the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, LoaderError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(LoaderError::CmdlineLoad)?;
    let len = cmdline
        .as_cstring()
        .map_err(LoaderError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    Ok(len)
}

/// Places the initrd page-aligned at the top of low RAM (below `addr_max`, the kernel's
/// limit), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<InitrdPlacement, LoaderError> {
    let size = initrd
        .metadata()
        .map_err(|source| LoaderError::Open {
            what: "initrd",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(LoaderError::InitrdEmpty {
            path: path.to_path_buf(),
        });
    }
    let low_ram_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0);
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(snapshot::PAGE_SIZE as u64 - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
        .map_err(|source| LoaderError::InitrdRead {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(InitrdPlacement { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn temp_file(name: &str, content: &[u8]) -> (PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("reapvm-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content)
            .unwrap();
        let file = File::open(&path).unwrap();
        (path, file)
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let (path, mut file) = temp_file("garbage", &[0x42; 8192]);
        assert!(matches!(
            load_kernel(&mem, &mut file, &path),
            Err(LoaderError::NotAKernel { .. })
        ));
        let (path, mut file) = temp_file("tiny", b"hi");
        assert!(matches!(
            load_kernel(&mem, &mut file, &path),
            Err(LoaderError::NotAKernel { .. })
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let (path, mut file) = temp_file("initrd", &[7u8; 5000]);
        let placed = load_initrd(&mem, &mut file, &path, 0x200_0000 - 0x10_0000, u64::MAX).unwrap();
        assert_eq!(placed.size, 5000);
        assert_eq!(placed.addr % snapshot::PAGE_SIZE as u64, 0);
        assert!(placed.addr + placed.size <= 32 << 20);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(placed.addr + 4999))
                .unwrap(),
            7
        );

        let (path, mut file) = temp_file("huge", &vec![0u8; 2 << 20]);
        assert!(matches!(
            load_initrd(&mem, &mut file, &path, 31 << 20, u64::MAX),
            Err(LoaderError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_is_nul_terminated_at_its_address() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cmdline = build_cmdline("console=ttyS0 reboot=k").unwrap();
        let len = load_cmdline(&mem, &cmdline).unwrap();
        assert_eq!(len, "console=ttyS0 reboot=k".len() + 1);
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 reboot=k\0");
        assert!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE + 1)).is_err());
    }
}
