//! Guest physical memory: the fixed layout of the low addresses, the split of
//! RAM around the 32-bit MMIO hole, and the guest memory map handed to the
//! kernel (e820 for the Linux boot protocol, the PVH memmap for PVH).
//!
//! RAM is `[0, min(size, 3 GiB))` and, for guests over 3 GiB, `[4 GiB, 4 GiB +
//! rest)`. The hole `[3 GiB, 4 GiB)` holds the IOAPIC, the local APICs, KVM's
//! TSS and identity-map pages and, later, virtio-mmio devices. Each RAM range
//! becomes one KVM memory slot (see `vm::MemorySlot`).
//!
//! Memory is a `GuestMemoryMmap<AtomicBitmap>`: the bitmap records writes the
//! VMM itself makes (device emulation), which live migration will merge with
//! KVM's per-slot dirty log.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest memory type used everywhere in the VMM.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Start of the 32-bit MMIO hole (3 GiB).
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the 32-bit MMIO hole (4 GiB): RAM resumes here.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Where the GDT used for the first instruction lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) boot IDT lives.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map table, after the module list.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux boot protocol zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot path.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, PD (identity map of the first 1 GiB).
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the Extended BIOS Data Area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the BIOS area where the RSDP must be for non-PVH boot; the
/// other ACPI tables follow it.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where high memory (the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// KVM's TSS (3 pages) on Intel; inside the hole, out of RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page on Intel, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// Errors creating guest memory or checking it against the host.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The host does not have that much memory to give.
    #[error(
        "--memory {requested_mib} MiB is more than this host can give: {available_mib} MiB \
         available (MemAvailable {mem_available_mib} MiB + SwapFree {swap_free_mib} MiB in \
         /proc/meminfo)"
    )]
    HostTooSmall {
        /// Requested guest size.
        requested_mib: u64,
        /// What we allow.
        available_mib: u64,
        /// MemAvailable.
        mem_available_mib: u64,
        /// SwapFree.
        swap_free_mib: u64,
    },
}

/// The type of a guest memory map entry (e820 numbering, also used by PVH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemType {
    /// Usable RAM (1).
    Ram = 1,
    /// Reserved (2).
    Reserved = 2,
}

/// One entry of the guest memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: MemType,
}

/// The RAM ranges for a guest of `size` bytes: one below the MMIO hole and,
/// if needed, one above it.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START),
        ]
    }
}

/// The end (exclusive) of RAM below 4 GiB; where the initrd goes below.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// The guest memory map: low RAM up to the EBDA, the BIOS area reserved (it
/// holds the ACPI tables), RAM from 1 MiB to the hole, RAM above 4 GiB.
pub fn memory_map(size: u64) -> Vec<MemMapEntry> {
    let mut map = vec![
        MemMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: MemType::Ram,
        },
        MemMapEntry {
            addr: EBDA_START,
            size: BIOS_END - EBDA_START,
            kind: MemType::Reserved,
        },
    ];
    let low_end = low_ram_end(size);
    if low_end > HIMEM_START {
        map.push(MemMapEntry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: MemType::Ram,
        });
    }
    if size > MMIO_HOLE_START {
        map.push(MemMapEntry {
            addr: MMIO_HOLE_END,
            size: size - MMIO_HOLE_START,
            kind: MemType::Ram,
        });
    }
    map
}

/// Allocates guest RAM (anonymous, private mappings) with a dirty bitmap.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        // usize is 64-bit on the only target we build for (x86_64).
        .map(|(a, s)| (a, s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: size >> 20,
        source,
    })
}

/// Takes and clears the VMM's own dirty bitmap (writes made through
/// vm-memory: device emulation, the loader): one `Vec<u64>` per region,
/// bit `i` = page `i` of that region, the layout KVM_GET_DIRTY_LOG uses.
pub fn take_vmm_dirty(mem: &GuestMemory) -> Vec<Vec<u64>> {
    use vm_memory::GuestMemoryBackend;
    mem.iter()
        .map(|r| {
            let mmap: &vm_memory::MmapRegion<AtomicBitmap> = r;
            mmap.bitmap().get_and_reset()
        })
        .collect()
}

/// Sets `[gpa, gpa + len)` (page aligned, inside one region) to zero by
/// dropping the pages (`MADV_DONTNEED` on the private anonymous mapping):
/// the next access sees a fresh zero page, and a page that was never
/// touched costs nothing. Used by an incoming migration for zero pages.
pub fn discard_range(mem: &GuestMemory, gpa: u64, len: u64) -> std::io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string());
    if !gpa.is_multiple_of(4096) || !len.is_multiple_of(4096) {
        return Err(bad("range not page aligned"));
    }
    let region = mem
        .find_region(GuestAddress(gpa))
        .ok_or_else(|| bad("range outside guest memory"))?;
    let off = gpa - region.start_addr().0;
    if off.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad("range crosses the end of its memory region"));
    }
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(off))
        .map_err(|e| bad(&e.to_string()))?;
    // SAFETY: [host, host + len) lies inside one mmap'd region of guest
    // memory (checked above); MADV_DONTNEED on a private anonymous
    // mapping only replaces its pages with zero pages, it never unmaps.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Host memory figures from /proc/meminfo, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemInfo {
    /// MemAvailable.
    pub mem_available_kib: u64,
    /// SwapFree.
    pub swap_free_kib: u64,
}

/// Parses /proc/meminfo text; missing fields count as 0.
pub fn parse_meminfo(text: &str) -> HostMemInfo {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    HostMemInfo {
        mem_available_kib: field("MemAvailable"),
        swap_free_kib: field("SwapFree"),
    }
}

/// Refuses a guest larger than MemAvailable plus half the free swap: guest
/// RAM is mapped lazily, so a larger guest would start and then get the VMM
/// killed by the OOM killer at some later, confusing moment.
pub fn check_host_memory(requested: u64, info: HostMemInfo) -> Result<(), MemoryError> {
    let available = (info.mem_available_kib + info.swap_free_kib / 2) * 1024;
    if requested > available {
        return Err(MemoryError::HostTooSmall {
            requested_mib: requested >> 20,
            available_mib: available >> 20,
            mem_available_mib: info.mem_available_kib >> 10,
            swap_free_mib: info.swap_free_kib >> 10,
        });
    }
    Ok(())
}

/// Reads /proc/meminfo and applies [`check_host_memory`]. If /proc/meminfo
/// cannot be read the check is skipped (with a warning): it is advisory.
pub fn check_host_memory_now(requested: u64) -> Result<(), MemoryError> {
    match std::fs::read_to_string("/proc/meminfo") {
        Ok(t) => check_host_memory(requested, parse_meminfo(&t)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/meminfo; skipping host memory check");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let map = memory_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].size, (256 << 20) - HIMEM_START);
    }

    #[test]
    fn exactly_3g_has_no_high_range() {
        assert_eq!(ram_ranges(3 << 30).len(), 1);
        assert_eq!(memory_map(3 << 30).len(), 3);
    }

    #[test]
    fn large_guest_splits_around_hole() {
        let size = 6u64 << 30;
        let r = ram_ranges(size);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 3 << 30));
        let total: u64 = r.iter().map(|x| x.1).sum();
        assert_eq!(total, size);
        let map = memory_map(size);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(map[3].addr, MMIO_HOLE_END);
        assert_eq!(map[3].size, 3 << 30);
        assert_eq!(low_ram_end(size), MMIO_HOLE_START);
        // Nothing overlaps and everything is ordered.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn fixed_addresses_are_in_the_right_places() {
        let boot_structs = [
            BOOT_GDT_START,
            BOOT_IDT_START,
            PVH_INFO_START,
            PVH_MEMMAP_START,
            ZERO_PAGE_START,
            PML4_START,
            PDE_START,
            CMDLINE_START,
        ];
        for a in boot_structs {
            assert!(a < EBDA_START);
        }
        const { assert!(ACPI_START >= EBDA_START && ACPI_START < BIOS_END) };
        for a in [
            KVM_TSS_ADDRESS,
            KVM_IDENTITY_MAP_ADDRESS,
            IOAPIC_ADDR as u64,
            LAPIC_ADDR as u64,
        ] {
            assert!((MMIO_HOLE_START..MMIO_HOLE_END).contains(&a));
        }
    }

    #[test]
    fn guest_memory_has_split_regions() {
        use vm_memory::GuestMemoryBackend;
        // Only address space is reserved (mmap is lazy), so 5 GiB is cheap.
        let m = create_guest_memory(5 << 30).unwrap();
        assert_eq!(m.num_regions(), 2);
        assert!(m.address_in_range(GuestAddress(MMIO_HOLE_END)));
        assert!(!m.address_in_range(GuestAddress(MMIO_HOLE_START)));
    }

    #[test]
    fn meminfo() {
        let t = "MemTotal: 100 kB\nMemAvailable:    2097152 kB\nSwapFree: 1048576 kB\n";
        let i = parse_meminfo(t);
        assert_eq!(i.mem_available_kib, 2 << 20);
        assert_eq!(i.swap_free_kib, 1 << 20);
        assert!(check_host_memory(2 << 30, i).is_ok());
        let e = check_host_memory(3 << 30, i).unwrap_err().to_string();
        assert!(
            e.contains("3072 MiB") && e.contains("2560 MiB available"),
            "{e}"
        );
    }
}
