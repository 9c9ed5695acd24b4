//! ACPI tables: RSDP, XSDT, FADT, MADT and DSDT, written into the BIOS area
//! (0xe0000..) of guest memory.
//!
//! Why ACPI at all: in this VMM Linux can only power off through ACPI. Without
//! it, `poweroff` ends in a `hlt` loop with interrupts off, which KVM handles
//! in the kernel, so the VMM would never learn the guest is done. With a
//! hardware-reduced FADT, Linux powers off by writing SLP_TYP|SLP_EN to the
//! FADT's sleep control register (an I/O port we trap, see
//! `devices::legacy::AcpiPm`) and reboots by writing the reset value to the
//! FADT's reset register. The same tables (the MADT) are how Linux finds the
//! other vCPUs, so one mechanism gives both power control and SMP.
//!
//! Hardware-reduced ACPI also means no PM timer, no GPE blocks and no SCI to
//! emulate. The RSDP is at the start of the BIOS area, where Linux's legacy
//! scan finds it for the bzImage path; PVH passes its address in
//! `hvm_start_info.rsdp_paddr` and the zero page carries it too.
//!
//! Virtio-mmio devices are described in the DSDT (`LNRO0005`, the id Linux's
//! virtio_mmio driver matches, with the window and the interrupt), not with
//! `virtio_mmio.device=` on the command line: hardware-reduced ACPI means no
//! legacy PIC, so Linux has no IRQ numbers 0-15 and allocates its IRQ numbers
//! per GSI as ACPI describes them; a command-line device naming IRQ 5 fails
//! its probe with -EINVAL.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::legacy::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
};
use crate::devices::serial::{COM1_IRQ, COM1_PORT};
use crate::memory::{GuestMemory, ACPI_START, BIOS_END, IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: [u8; 6] = *b"VIGIL ";
const OEM_TABLE_ID: [u8; 8] = *b"VIGILVMM";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5; we do
/// not emulate one and Linux would poll it), and no 8042 (bit 1 clear).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// Errors building or writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(u64),
    /// Writing to guest memory failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The tables and where each goes; the first is the RSDP.
pub struct AcpiTables {
    /// (guest address, bytes) for each table.
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A virtio-mmio device window to describe to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioInfo {
    /// Window base (below 4 GiB).
    pub base: u32,
    /// Window length.
    pub len: u32,
    /// Interrupt line (IOAPIC GSI), edge-triggered, active high.
    pub gsi: u32,
}

fn dsdt(virtio: &[VirtioMmioInfo]) -> Vec<u8> {
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&ACPI_S5_SLEEP_TYPE]));
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq]));
    let com1 = Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    // Name objects serialise their value at once, so they can outlive the
    // temporaries they were built from.
    let parts: Vec<(String, [Name; 3])> = virtio
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mem = Memory32Fixed::new(true, v.base, v.len);
            let irq = Interrupt::new(true, true, false, false, v.gsi);
            (
                format!("VR{i:02X}"),
                [
                    Name::new("_HID".into(), &"LNRO0005"),
                    Name::new("_UID".into(), &(i as u32)),
                    Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq])),
                ],
            )
        })
        .collect();
    let virtio_devs: Vec<Device> = parts
        .iter()
        .map(|(name, [hid, uid, crs])| {
            Device::new(name.as_str().into(), vec![hid as &dyn Aml, uid, crs])
        })
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(virtio_devs.iter().map(|d| d as &dyn Aml));
    let sb = Scope::new("_SB_".into(), children);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    sb.to_aml_bytes(&mut body);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn io_reg(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Power and sleep buttons are not fixed hardware.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.sleep_control_reg = io_reg(ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_reg(ACPI_SLEEP_STATUS_PORT);
    b.reset_reg = io_reg(ACPI_RESET_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    bytes_of(&b.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // KVM's default GSI routing maps ISA IRQs 0-15 one to one onto IOAPIC
    // pins, which is also what Linux assumes without interrupt source
    // overrides, so none are needed.
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    bytes_of(&m)
}

fn align16(x: u64) -> u64 {
    x.next_multiple_of(16)
}

/// Builds all tables for `vcpus` vCPUs and the `virtio` devices, laid out
/// from [`ACPI_START`].
pub fn build(vcpus: u8, virtio: &[VirtioMmioInfo]) -> Result<AcpiTables, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align16(rsdp_addr + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let a = next;
        next = align16(a + len as u64);
        a
    };
    let dsdt = dsdt(virtio);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(vcpus);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt.len());
    if next > BIOS_END {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables {
        tables: vec![
            (rsdp_addr, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

/// Builds and writes the tables; returns the RSDP address.
pub fn write(mem: &GuestMemory, vcpus: u8, virtio: &[VirtioMmioInfo]) -> Result<u64, AcpiError> {
    let t = build(vcpus, virtio)?;
    for (addr, bytes) in &t.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(t.tables[0].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn checksums_and_lengths() {
        let t = build(4, &[]).unwrap();
        let (_, rsdp) = &t.tables[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (_, tbl) in &t.tables[1..] {
            assert_eq!(sum(tbl), 0, "{:?}", std::str::from_utf8(&tbl[..4]));
            assert_eq!(u32_at(tbl, 4) as usize, tbl.len());
        }
    }

    #[test]
    fn pointers_chain() {
        let t = build(2, &[]).unwrap();
        let find = |sig: &[u8]| t.tables.iter().find(|(_, b)| &b[..4] == sig).unwrap();
        let (xsdt_addr, xsdt) = find(b"XSDT");
        assert_eq!(u64_at(&t.tables[0].1, 24), *xsdt_addr);
        let (fadt_addr, fadt) = find(b"FACP");
        let (madt_addr, _) = find(b"APIC");
        assert_eq!(u64_at(xsdt, 36), *fadt_addr);
        assert_eq!(u64_at(xsdt, 44), *madt_addr);
        let (dsdt_addr, _) = find(b"DSDT");
        assert_eq!(u64_at(fadt, 140), *dsdt_addr, "X_DSDT");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(u32_at(fadt, 112) & (1 << 10), 0, "RESET_REG_SUP");
        // Sleep control register GAS at 244: system I/O, our port.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), u64::from(ACPI_SLEEP_CONTROL_PORT));
        // Reset register GAS at 116, value at 128.
        assert_eq!(u64_at(fadt, 120), u64::from(ACPI_RESET_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        for (a, b) in &t.tables {
            assert!(*a >= ACPI_START && a + b.len() as u64 <= BIOS_END);
        }
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu() {
        let m = madt(3);
        // Header 44 bytes, then 3 LAPIC (8 bytes) and one IOAPIC (12 bytes).
        assert_eq!(m.len(), 44 + 3 * 8 + 12);
        for i in 0..3 {
            let o = 44 + i * 8;
            assert_eq!((m[o], m[o + 1], m[o + 3]), (0, 8, i as u8));
        }
        assert_eq!(m[44 + 24], 1, "IOAPIC entry");
        assert_eq!(u32_at(&m, 36), LAPIC_ADDR);
    }

    #[test]
    fn dsdt_has_s5_and_com1() {
        let d = dsdt(&[]);
        let has = |n: &[u8]| d.windows(n.len()).any(|w| w == n);
        assert!(has(b"_S5_"));
        assert!(has(b"COM1"));
        assert!(has(b"_CRS"));
        assert!(!has(b"LNRO0005"));
    }

    #[test]
    fn dsdt_describes_virtio_mmio_devices() {
        let v = [
            VirtioMmioInfo {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            VirtioMmioInfo {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let d = dsdt(&v);
        let has = |n: &[u8]| d.windows(n.len()).any(|w| w == n);
        assert!(has(b"LNRO0005"));
        assert!(has(b"VR00") && has(b"VR01"));
        // Memory32Fixed descriptor: tag 0x86, length 9, read-write, base, len.
        let mut m = vec![0x86, 9, 0, 1];
        m.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        m.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(has(&m));
        assert_eq!(sum(&d), 0, "checksum");
    }
}
