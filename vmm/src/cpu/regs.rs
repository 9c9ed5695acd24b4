//! The register state a vCPU starts in, for each boot protocol.
//!
//! PVH enters the kernel in 32-bit protected mode with paging off, RBX
//! pointing at `hvm_start_info`. The Linux 64-bit boot protocol enters in long
//! mode with an identity map of the first GiB, RSI pointing at the zero page.
//! Both need a GDT whose descriptors match the hidden segment state we load,
//! because the kernel may reload segments before it installs its own GDT.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{
    GuestMemory, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode at this address.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode at this address.
    Linux64(u64),
}

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables to guest memory failed.
    #[error("cannot write boot {what} to guest memory: {source}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A register ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { op, source }
}

/// A GDT descriptor from flags (access byte + granularity nibble), base, limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The hidden segment state matching GDT entry `index`.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn gdt_for(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        // 32-bit code: D=1, G=1.
        EntryMode::Pvh(_) => gdt_entry(0xc09b, 0, 0xfffff),
        // 64-bit code: L=1.
        EntryMode::Linux64(_) => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        // 32-bit busy TSS; never used but VMX wants a valid TR.
        gdt_entry(0x008b, 0, 0x67),
    ]
}

fn write_mem<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::Memory { what, source })
}

/// Writes the boot GDT and IDT (and, for 64-bit entry, the page tables) and
/// computes the special registers.
pub fn boot_sregs(
    mem: &GuestMemory,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = gdt_for(mode);
    for (i, e) in gdt.iter().enumerate() {
        write_mem(mem, *e, BOOT_GDT_START + 8 * i as u64, "GDT")?;
    }
    write_mem(mem, 0u64, BOOT_IDT_START, "IDT")?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    match mode {
        EntryMode::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64(_) => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel,
/// boot structures and initrd pointers until Linux builds its own tables.
fn write_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    write_mem(mem, PDPTE_START | 0x03, PML4_START, "PML4")?;
    write_mem(mem, PDE_START | 0x03, PDPTE_START, "PDPTE")?;
    for i in 0..512u64 {
        write_mem(mem, (i << 21) | 0x83, PDE_START + i * 8, "PDE")?;
    }
    Ok(())
}

/// General registers at the entry point.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Pvh(entry) => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        EntryMode::Linux64(entry) => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Sets the full boot register state on the boot vCPU.
pub fn setup_boot_cpu(vcpu: &VcpuFd, mem: &GuestMemory, mode: EntryMode) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let sregs = boot_sregs(mem, mode, sregs)?;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(mode))
        .map_err(ioctl("KVM_SET_REGS"))?;
    Ok(())
}

/// FPU defaults (x87 control word and MXCSR as after FNINIT / reset).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
}

/// MSRs with values a BIOS would leave: syscall MSRs cleared, fast strings
/// on, MTRRs enabled with write-back default (without it Linux maps all of
/// RAM uncached).
pub const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),               // IA32_SYSENTER_CS
    (0x175, 0),               // IA32_SYSENTER_ESP
    (0x176, 0),               // IA32_SYSENTER_EIP
    (0xc000_0081, 0),         // STAR
    (0xc000_0082, 0),         // LSTAR
    (0xc000_0083, 0),         // CSTAR
    (0xc000_0084, 0),         // SYSCALL_MASK
    (0xc000_0102, 0),         // KERNEL_GS_BASE
    (0x10, 0),                // IA32_TSC
    (0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 0x6), // MTRRdefType: enabled, WB
];

/// Sets [`BOOT_MSRS`]. An MSR the host refuses is logged, not fatal: these
/// are conveniences, and nested hosts differ in which they accept.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    for &(index, data) in BOOT_MSRS {
        let entries = [kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }];
        let msrs = match Msrs::from_entries(&entries) {
            Ok(m) => m,
            Err(_) => continue,
        };
        match vcpu.set_msrs(&msrs) {
            Ok(1) => {}
            Ok(_) => tracing::debug!(msr = index, "host refused boot MSR"),
            Err(e) => tracing::debug!(msr = index, error = %e, "host refused boot MSR"),
        }
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware does, so
/// the legacy PIC path works before Linux switches to the IOAPIC.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = u32::from_le_bytes(b);
        let v = (v & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!(
            (s.selector, s.type_, s.l, s.db, s.g, s.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let d = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((d.selector, d.type_, d.db, d.s), (16, 3, 1, 1));
        let pvh = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((pvh.l, pvh.db), (0, 1));
    }

    #[test]
    fn sregs_per_mode() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let s = boot_sregs(&mem, EntryMode::Pvh(0x100_0000), kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, 0);
        let s = boot_sregs(&mem, EntryMode::Linux64(0x100_200), kvm_sregs::default()).unwrap();
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr3, PML4_START);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
        assert_eq!(boot_regs(EntryMode::Pvh(7)).rbx, PVH_INFO_START);
        assert_eq!(boot_regs(EntryMode::Linux64(7)).rsi, ZERO_PAGE_START);
    }
}
