//! The MMIO bus: routes vCPU MMIO exits to the virtio-mmio transports.
//!
//! Addresses no device claims are ignored (reads return zeros) with a trace
//! log: a guest probing the hole must never bring the VMM down.

use std::sync::{Arc, Mutex};

use super::virtio::transport::MmioTransport;

/// Base of the first virtio-mmio window: low in the 32-bit MMIO hole, far
/// from the IOAPIC (0xfec00000) and the local APICs (0xfee00000).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each device's window (registers + config space fit in 4 KiB).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First interrupt line handed to virtio devices (COM1 uses 4).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Last usable interrupt line: the IOAPIC has 24 inputs.
pub const VIRTIO_LAST_IRQ: u32 = 23;

/// One device window.
struct Window {
    base: u64,
    len: u64,
    dev: Arc<Mutex<MmioTransport>>,
}

/// Routes MMIO from vCPU exits to devices. Shared by all vCPU threads.
#[derive(Default)]
pub struct MmioBus {
    windows: Vec<Window>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base + len)`. Windows are laid out by the
    /// instance so they never overlap.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<MmioTransport>>) {
        self.windows.push(Window { base, len, dev });
    }

    fn find(&self, addr: u64) -> Option<(&Window, u64)> {
        self.windows
            .iter()
            .find(|w| addr >= w.base && addr - w.base < w.len)
            .map(|w| (w, addr - w.base))
    }

    /// A guest read of `data.len()` bytes at `addr`.
    pub fn read(&self, vcpu: u32, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((w, off)) => w
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(off, data),
            None => {
                data.fill(0);
                tracing::trace!(
                    vcpu,
                    addr,
                    len = data.len(),
                    "MMIO read from unclaimed address"
                );
            }
        }
    }

    /// A guest write of `data` at `addr`.
    pub fn write(&self, vcpu: u32, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((w, off)) => w
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(off, data),
            None => tracing::trace!(vcpu, addr, ?data, "MMIO write to unclaimed address"),
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::devices::virtio::block::tests::{memory, temp_image};
    use crate::devices::virtio::block::Block;

    #[test]
    fn routes_to_windows_and_ignores_the_rest() {
        let path = temp_image(1 << 20);
        let blk = Block::new(&path, false, "m".into()).unwrap();
        let t = MmioTransport::new(Box::new(blk), memory(), EventFd::new(EFD_NONBLOCK).unwrap());
        let mut bus = MmioBus::new();
        bus.insert(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(t)));
        let mut b = [0xffu8; 4];
        bus.read(0, VIRTIO_MMIO_BASE, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x7472_6976, "magic");
        let mut b = [0xffu8; 4];
        bus.read(0, VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE, &mut b);
        assert_eq!(b, [0; 4], "unclaimed reads are zeros");
        bus.read(0, u64::MAX - 1, &mut b);
        bus.write(0, 0xfee0_0000, &[1, 2, 3, 4]);
        bus.write(0, VIRTIO_MMIO_BASE + 0xfff, &[1]);
        std::fs::remove_file(path).unwrap();
    }
}
