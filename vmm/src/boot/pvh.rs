//! PVH boot: `hvm_start_info` with the command line, the initrd as module 0,
//! the memory map and the ACPI RSDP address.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::BootError;
use crate::memory::{
    GuestMemory, MemMapEntry, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
};

/// `hvm_start_info.magic` ("xEn3" with the top bit of each byte flipped).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Builds the start info structure (pure, for tests).
pub fn start_info(
    map: &[MemMapEntry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (info, memmap, modules)
}

/// Writes start info, memory map and module list to their fixed addresses.
pub fn write_start_info(
    mem: &GuestMemory,
    map: &[MemMapEntry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let (info, memmap, modules) = start_info(map, initrd, rsdp);
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem).map_err(|e| {
        BootError::Write {
            what: "PVH start info",
            source: Box::new(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memory_map;
    use vm_memory::Bytes;

    #[test]
    fn start_info_fields() {
        let map = memory_map(5 << 30);
        let (info, memmap, modules) = start_info(&map, Some((0x1000_0000, 4096)), 0xe0000);
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(memmap.last().unwrap().addr, 4 << 30);
        assert_eq!(modules[0].paddr, 0x1000_0000);
        let (info, _, modules) = start_info(&map, None, 0xe0000);
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, modules.len()),
            (0, 0, 0)
        );
    }

    #[test]
    fn written_to_memory() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        write_start_info(&mem, &memory_map(64 << 20), Some((0x200_0000, 10)), 0xe0000).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(m.size, 10);
        // The module list must not run into the memory map.
        assert!(
            PVH_MODLIST_START + std::mem::size_of::<hvm_modlist_entry>() as u64 <= PVH_MEMMAP_START
        );
    }
}
