//! Loading the guest: kernel image, initramfs, command line and the boot
//! protocol structures that tell the kernel where they are.
//!
//! Two protocols: an ELF `vmlinux` carrying a PVH entry note
//! (XEN_ELFNOTE_PHYS32_ENTRY) is entered through PVH ([`pvh`]); a `bzImage`
//! through the Linux 64-bit boot protocol ([`linux`]). An uncompressed vmlinux
//! via PVH is preferred: the guest kernel's own decompression is very slow
//! when kernel code is emulated.

pub mod linux;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::config::{VmConfig, MAX_CMDLINE_LEN};
use crate::cpu::regs::EntryMode;
use crate::memory::{low_ram_end, memory_map, GuestMemory, CMDLINE_START, HIMEM_START};

/// Page size used to align the initrd.
const PAGE_SIZE: u64 = 4096;
/// Offset of the 64-bit entry point (startup_64) in a loaded bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// bzImage xloadflags: kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file cannot be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither ELF with a PVH note nor a bzImage.
    #[error(
        "{path} is not a bootable kernel: expected an uncompressed ELF vmlinux with a PVH entry \
         note or a bzImage"
    )]
    NotAKernel {
        /// The path.
        path: PathBuf,
    },
    /// An ELF without a PVH entry point.
    #[error(
        "{path} is an ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it \
         with CONFIG_PVH=y, or boot its bzImage instead"
    )]
    NoPvhNote {
        /// The path.
        path: PathBuf,
    },
    /// A bzImage too old for the 64-bit boot protocol.
    #[error("{path} is a bzImage without a 64-bit entry point (boot protocol < 2.12)")]
    No64BitEntry {
        /// The path.
        path: PathBuf,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The path.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: loader::Error,
    },
    /// Guest memory is too small for kernel + initrd.
    #[error(
        "--memory {have_mib} MiB is too small for this kernel and initrd: they need at least \
         {need_mib} MiB ({what})"
    )]
    MemoryTooSmall {
        /// Available.
        have_mib: u64,
        /// Needed (rounded up).
        need_mib: u64,
        /// Which part did not fit.
        what: String,
    },
    /// The command line cannot be encoded.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures failed.
    #[error("cannot write {what} to guest memory: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// The error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the kernel loader found, needed to start the boot vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// How to enter the kernel.
    pub entry: EntryMode,
    /// Where the kernel image ends in guest memory.
    pub kernel_end: u64,
    /// Where the initrd was placed (address, size).
    pub initrd: Option<(u64, u64)>,
}

fn read_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BootError + 'a {
    move |source| BootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The kind of kernel image a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// ELF (vmlinux).
    Elf,
    /// bzImage (has the "HdrS" setup header magic).
    BzImage,
}

/// Sniffs the image type from its first bytes.
pub fn kernel_kind(head: &[u8]) -> Option<KernelKind> {
    if head.starts_with(b"\x7fELF") {
        Some(KernelKind::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelKind::BzImage)
    } else {
        None
    }
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Opens and sniffs the kernel and checks that the initrd is readable,
/// without touching guest memory: bad paths fail before KVM is opened.
pub fn check_images(cfg: &VmConfig) -> Result<KernelKind, BootError> {
    let mut f = File::open(&cfg.kernel).map_err(read_err("kernel", &cfg.kernel))?;
    if f.metadata()
        .map_err(read_err("kernel", &cfg.kernel))?
        .is_dir()
    {
        return Err(read_err("kernel", &cfg.kernel)(
            std::io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    let mut head = vec![0u8; 0x210];
    let n = read_up_to(&mut f, &mut head).map_err(read_err("kernel", &cfg.kernel))?;
    let kind = kernel_kind(&head[..n]).ok_or_else(|| BootError::NotAKernel {
        path: cfg.kernel.clone(),
    })?;
    if let Some(p) = &cfg.initrd {
        let f = File::open(p).map_err(read_err("initrd", p))?;
        if f.metadata().map_err(read_err("initrd", p))?.is_dir() {
            return Err(read_err("initrd", p)(std::io::Error::from_raw_os_error(
                libc::EISDIR,
            )));
        }
    }
    Ok(kind)
}

/// The end (physical address + memory size) of the highest PT_LOAD segment
/// of an ELF64 image, or `None` if the headers cannot be read (the loader
/// will then report the problem).
fn elf_load_end(f: &mut File) -> Option<u64> {
    const PT_LOAD: u32 = 1;
    let mut eh = [0u8; 64];
    f.seek(SeekFrom::Start(0)).ok()?;
    f.read_exact(&mut eh).ok()?;
    let phoff = u64::from_le_bytes(eh[32..40].try_into().ok()?);
    let phentsize = u64::from(u16::from_le_bytes(eh[54..56].try_into().ok()?));
    let phnum = u16::from_le_bytes(eh[56..58].try_into().ok()?);
    if phentsize < 56 {
        return None;
    }
    let mut end = 0u64;
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(
            phoff.checked_add(i.checked_mul(phentsize)?)?,
        ))
        .ok()?;
        f.read_exact(&mut ph).ok()?;
        if u32::from_le_bytes(ph[0..4].try_into().ok()?) != PT_LOAD {
            continue;
        }
        let paddr = u64::from_le_bytes(ph[24..32].try_into().ok()?);
        let memsz = u64::from_le_bytes(ph[40..48].try_into().ok()?);
        end = end.max(paddr.checked_add(memsz)?);
    }
    f.seek(SeekFrom::Start(0)).ok()?;
    Some(end)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads kernel, initrd and command line and writes the boot protocol
/// structures. `rsdp` is the ACPI RSDP address (already written).
pub fn load(cfg: &VmConfig, mem: &GuestMemory, rsdp: u64) -> Result<BootInfo, BootError> {
    let kind = check_images(cfg)?;
    let mut kf = File::open(&cfg.kernel).map_err(read_err("kernel", &cfg.kernel))?;
    let klen = kf
        .seek(SeekFrom::End(0))
        .map_err(read_err("kernel", &cfg.kernel))?;
    let mem_size = cfg.memory_bytes;
    // Where the image ends once loaded: for an ELF its highest PT_LOAD
    // (including BSS); for a bzImage the file size from 1 MiB (the
    // decompressed size is checked after the header is read).
    let (image_end, what) = match kind {
        KernelKind::Elf => match elf_load_end(&mut kf) {
            Some(end) => (end, format!("the kernel's ELF segments end at {end:#x}")),
            None => (HIMEM_START + klen, format!("kernel image of {klen} bytes")),
        },
        KernelKind::BzImage => (
            HIMEM_START + klen,
            format!("kernel image of {klen} bytes loaded at 1 MiB"),
        ),
    };
    if image_end > low_ram_end(mem_size) {
        return Err(BootError::MemoryTooSmall {
            have_mib: mem_size >> 20,
            need_mib: mib_up(image_end),
            what,
        });
    }
    let load_err = |source| BootError::Load {
        path: cfg.kernel.clone(),
        source,
    };
    let (entry, kernel_end, setup_header) = match kind {
        KernelKind::Elf => {
            let r =
                Elf::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (EntryMode::Pvh(a.0), r.kernel_end, None),
                _ => {
                    return Err(BootError::NoPvhNote {
                        path: cfg.kernel.clone(),
                    })
                }
            }
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: cfg.kernel.clone(),
                });
            }
            let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            // The bzImage decompresses itself; make sure the result fits.
            let need = r.kernel_load.0.max(hdr.pref_address) + u64::from(hdr.init_size);
            if need > low_ram_end(mem_size) {
                return Err(BootError::MemoryTooSmall {
                    have_mib: mem_size >> 20,
                    need_mib: mib_up(need),
                    what: format!("the kernel decompresses to {} bytes", { hdr.init_size }),
                });
            }
            (EntryMode::Linux64(entry), r.kernel_end, Some(hdr))
        }
    };

    let initrd_max = match setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => u64::MAX,
    };
    let initrd = match &cfg.initrd {
        Some(p) => Some(load_initrd(p, mem, mem_size, kernel_end, initrd_max)?),
        None => None,
    };

    let cmdline = Cmdline::try_from(&cfg.cmdline, MAX_CMDLINE_LEN).map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| {
        BootError::Write {
            what: "command line",
            source: Box::new(e),
        }
    })?;
    let cmdline_len = cfg.cmdline.len() as u32;
    let map = memory_map(mem_size);
    match (entry, setup_header) {
        (EntryMode::Pvh(_), _) => pvh::write_start_info(mem, &map, initrd, rsdp)?,
        (EntryMode::Linux64(_), hdr) => linux::write_zero_page(
            mem,
            hdr.unwrap_or_default(),
            &map,
            initrd,
            cmdline_len,
            rsdp,
        )?,
    }
    tracing::info!(stage = "boot", ?entry, kernel_end, ?initrd, "guest loaded");
    Ok(BootInfo {
        entry,
        kernel_end,
        initrd,
    })
}

/// Places the initrd at the top of low RAM (below `max`), page aligned,
/// above the kernel.
fn load_initrd(
    path: &Path,
    mem: &GuestMemory,
    mem_size: u64,
    kernel_end: u64,
    max: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(read_err("initrd", path))?;
    let size = f.metadata().map_err(read_err("initrd", path))?.len();
    let top = low_ram_end(mem_size).min(max);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let kernel_top = kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = match addr {
        Some(a) if a >= kernel_top => a,
        _ => {
            return Err(BootError::MemoryTooSmall {
                have_mib: mem_size >> 20,
                need_mib: mib_up(kernel_top + size + PAGE_SIZE),
                what: format!(
                    "kernel ends at {kernel_top:#x}, initrd {} is {size} bytes",
                    path.display()
                ),
            })
        }
    };
    let len = usize::try_from(size).map_err(|_| BootError::MemoryTooSmall {
        have_mib: mem_size >> 20,
        need_mib: mib_up(size),
        what: "initrd too large".to_string(),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| BootError::Write {
            what: "initrd",
            source: Box::new(e),
        })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff() {
        assert_eq!(kernel_kind(b"\x7fELF\x02\x01"), Some(KernelKind::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_kind(&bz), Some(KernelKind::BzImage));
        assert_eq!(kernel_kind(b"#!/bin/sh\n"), None);
        assert_eq!(kernel_kind(&[]), None);
    }
}
