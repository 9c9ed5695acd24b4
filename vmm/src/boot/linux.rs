//! Linux 64-bit boot protocol: the zero page (`boot_params`) with the setup
//! header from the bzImage, the e820 map, command line and initrd.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::GuestAddress;

use super::BootError;
use crate::memory::{GuestMemory, MemMapEntry, CMDLINE_START, ZERO_PAGE_START};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID: we are not a registered boot loader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Used if the header does not say (older kernels).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Builds the zero page (pure, for tests).
pub fn zero_page(
    mut hdr: setup_header,
    map: &[MemMapEntry],
    initrd: Option<(u64, u64)>,
    cmdline_len: u32,
    rsdp: u64,
) -> Result<boot_params, BootError> {
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len + 1;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initrd {
        // Both below 4 GiB by construction (initrd_addr_max).
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    if map.len() > params.e820_table.len() {
        return Err(BootError::Write {
            what: "e820 map",
            source: format!("{} entries, at most {}", map.len(), params.e820_table.len()).into(),
        });
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page at its fixed address.
pub fn write_zero_page(
    mem: &GuestMemory,
    hdr: setup_header,
    map: &[MemMapEntry],
    initrd: Option<(u64, u64)>,
    cmdline_len: u32,
    rsdp: u64,
) -> Result<(), BootError> {
    let params = zero_page(hdr, map, initrd, cmdline_len, rsdp)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Write {
        what: "zero page",
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memory_map;

    #[test]
    fn e820_and_header() {
        let map = memory_map(4 << 30);
        let p = zero_page(
            setup_header::default(),
            &map,
            Some((0x3000_0000, 99)),
            10,
            0xe0000,
        )
        .unwrap();
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        assert_eq!({ last.addr }, 4 << 30);
        assert_eq!({ last.size }, 1 << 30);
        assert_eq!({ p.hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmdline_size }, 11);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
    }
}
