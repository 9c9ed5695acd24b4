//! The KVM VM: opening /dev/kvm with errors a user can act on, the VM file
//! descriptor, guest memory registered as KVM memory slots, and the in-kernel
//! interrupt controllers and PIT.
//!
//! Each RAM range is one KVM slot, and the slot table ([`MemorySlot`]) is kept
//! so that live migration can turn on `KVM_MEM_LOG_DIRTY_PAGES` and read the
//! dirty log slot by slot without re-deriving the layout.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemory, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors talking to KVM at the VM level.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm does not exist.
    #[error(
        "/dev/kvm does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) and check \
         that the machine supports virtualisation (VT-x/AMD-V enabled in the firmware)"
    )]
    KvmMissing,
    /// /dev/kvm exists but we may not open it.
    #[error(
        "permission denied opening /dev/kvm: add this user to the `kvm` group (then log in \
         again) or run as root"
    )]
    KvmPermission,
    /// Any other failure opening /dev/kvm.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// KVM API version mismatch.
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// A KVM capability the VMM needs is missing.
    #[error("KVM on this host lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A VM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// Which operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { op, source }
}

/// Opens /dev/kvm, turning the common failures into actionable messages.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::KvmMissing,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(e),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
        (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
        (kvm_ioctls::Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// The highest number of vCPUs KVM lets one VM have.
pub fn kvm_max_vcpus(kvm: &Kvm) -> u32 {
    u32::try_from(kvm.get_max_vcpus()).unwrap_or(1)
}

/// One KVM memory slot: a RAM range and where it is mapped in the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// VMM virtual address of the mapping.
    pub host_addr: u64,
    /// KVM flags (0 now; KVM_MEM_LOG_DIRTY_PAGES during migration).
    pub flags: u32,
}

/// A KVM VM built ahead of a restore, with the guest memory it was
/// registered with. A live migration's target builds it while memory
/// arrives (creating a VM costs 15-25 ms on a nested host), so that the
/// switchover only applies state. Fields drop in order: the VM fd before
/// the memory its slots point into.
pub struct PreparedVm {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemory,
}

impl PreparedVm {
    /// Opens /dev/kvm and creates the VM over `mem` (a clone of the caller's
    /// handle: the same mapping).
    pub fn new(mem: &GuestMemory) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        Ok(Self {
            vm: Vm::new(&kvm, mem)?,
            mem: mem.clone(),
        })
    }

    /// The guest memory the VM was built over.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }
}

/// A KVM VM with its memory registered and interrupt controllers created.
pub struct Vm {
    fd: VmFd,
    slots: Vec<MemorySlot>,
    /// Whether the slots carry KVM_MEM_LOG_DIRTY_PAGES (live migration);
    /// `slots[..].flags` record the flags they were created with.
    dirty_logging: std::sync::atomic::AtomicBool,
}

impl Vm {
    /// Creates the VM, sets the Intel TSS/identity-map addresses, the
    /// in-kernel IRQ chip (PIC+IOAPIC+LAPICs) and PIT, and registers guest
    /// memory. The order matters: the TSS address must be set before the
    /// first vCPU runs and the IRQ chip before any vCPU is created.
    pub fn new(kvm: &Kvm, memory: &GuestMemory) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // A dummy speaker port keeps port 0x61 in the kernel too.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let mut vm = Vm {
            fd,
            slots: Vec::new(),
            dirty_logging: std::sync::atomic::AtomicBool::new(false),
        };
        vm.register_memory(memory)?;
        Ok(vm)
    }

    fn register_memory(&mut self, memory: &GuestMemory) -> Result<(), VmError> {
        for (i, region) in memory.iter().enumerate() {
            let slot = MemorySlot {
                slot: i as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as u64,
                flags: 0,
            };
            let r = kvm_userspace_memory_region {
                slot: slot.slot,
                flags: slot.flags,
                guest_phys_addr: slot.guest_addr,
                memory_size: slot.size,
                userspace_addr: slot.host_addr,
            };
            // SAFETY: the mapping [host_addr, host_addr + size) belongs to
            // `memory`, which the caller keeps alive for as long as the VM
            // (both live in `VmInstance`, memory dropped after the VM fd), and
            // slots do not overlap since vm-memory regions do not.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
            tracing::debug!(
                slot = slot.slot,
                guest_addr = slot.guest_addr,
                size = slot.size,
                "memory slot"
            );
            self.slots.push(slot);
        }
        Ok(())
    }

    /// The KVM VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The memory slots, in guest address order.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// Turns KVM's dirty page log on or off on every slot (live migration)
    /// by re-registering each slot with or without
    /// `KVM_MEM_LOG_DIRTY_PAGES`; the mapping itself does not change, so
    /// this is safe while vCPUs run. Turning it on clears the log.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for slot in &self.slots {
            let r = kvm_userspace_memory_region {
                slot: slot.slot,
                flags,
                guest_phys_addr: slot.guest_addr,
                memory_size: slot.size,
                userspace_addr: slot.host_addr,
            };
            // SAFETY: the same slot, range and mapping as registered in
            // `register_memory` (still alive: guest memory outlives the VM
            // fd); only the flags change.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
        }
        self.dirty_logging
            .store(on, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Whether the dirty log is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// KVM_GET_DIRTY_LOG for one slot: bit `i` = page `i` of the slot was
    /// written by the guest since the previous call (which it clears).
    pub fn dirty_log(&self, slot: &MemorySlot) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot.slot, slot.size as usize)
            .map_err(ioctl("KVM_GET_DIRTY_LOG"))
    }
}

/// The VM-wide KVM state a snapshot carries: the in-kernel PIC pair and
/// IOAPIC, the PIT, and the KVM clock (kvmclock's base).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmKvmState {
    /// KVM_GET_IRQCHIP chip 0.
    pub pic_master: kvm_irqchip,
    /// KVM_GET_IRQCHIP chip 1.
    pub pic_slave: kvm_irqchip,
    /// KVM_GET_IRQCHIP chip 2.
    pub ioapic: kvm_irqchip,
    /// KVM_GET_PIT2.
    pub pit: kvm_pit_state2,
    /// KVM_GET_CLOCK.
    pub clock: kvm_clock_data,
}

impl Vm {
    /// Reads the VM-wide state. vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmKvmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(ioctl("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmKvmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the VM-wide state into a fresh VM, before its vCPUs are
    /// created. The clock goes first so the PIT and the guest's kvmclock
    /// continue from the saved time rather than from the time the snapshot
    /// was taken plus the time it spent on disk.
    pub fn restore_state(&self, s: &VmKvmState) -> Result<(), VmError> {
        // KVM rejects flags it reports but does not accept back
        // (KVM_CLOCK_TSC_STABLE, REALTIME, HOST_TSC).
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        self.fd.set_pit2(&s.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd.set_irqchip(c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
