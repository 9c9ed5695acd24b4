//! The virtio-mmio (version 2) register window of one device.
//!
//! The vCPU threads call [`MmioTransport::read`]/[`MmioTransport::write`]
//! through the MMIO bus; the event loop calls [`MmioTransport::notify`] when
//! a queue's ioeventfd fires. Both hold the device's mutex, so the device
//! model never sees concurrent calls.
//!
//! Queue notifications normally never reach [`MmioTransport::write`]: KVM
//! matches writes of the queue index to QueueNotify against the ioeventfds
//! and signals them without a VM exit. A write that does arrive (a value no
//! ioeventfd matched) is served directly.

use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{status, VirtioDevice, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemory;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// The virtio-mmio version without the legacy interface.
const VERSION: u32 = 2;
/// Our vendor id ("VGIL").
const VENDOR_ID: u32 = 0x4c49_4756;

/// Register offsets (virtio 1.2, 4.2.2).
pub mod reg {
    /// Magic value.
    pub const MAGIC: u64 = 0x000;
    /// Version.
    pub const VERSION: u64 = 0x004;
    /// Device id.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features (32 bits selected by DEVICE_FEATURES_SEL).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device features word selector.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver features word selector.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue selector.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum queue size.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Queue size.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notifier.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Config generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific config space.
    pub const CONFIG: u64 = 0x100;
}

/// The register window and queues of one virtio device.
pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemory,
    pub(super) queues: Vec<Queue>,
    irq: EventFd,
    pub(super) device_status: u32,
    pub(super) features_select: u32,
    pub(super) acked_features_select: u32,
    pub(super) acked_features: u64,
    pub(super) queue_select: u32,
    pub(super) interrupt_status: u32,
    pub(super) config_generation: u32,
    /// Set when the device hit a corrupt queue; cleared by a reset.
    broken: bool,
    /// While set, notifications are remembered but not served.
    quiesced: AtomicBool,
    /// Queues notified while quiesced.
    pending: Vec<bool>,
    /// Written by [`Self::resume`], so subscribers that stopped watching a
    /// backend while quiesced (the tap) watch it again.
    resume_evt: Option<EventFd>,
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt through `irq`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, irq: EventFd) -> Self {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        let pending = vec![false; queues.len()];
        Self {
            device,
            mem,
            queues,
            irq,
            device_status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            interrupt_status: 0,
            config_generation: 0,
            broken: false,
            quiesced: AtomicBool::new(false),
            pending,
            // Only fd exhaustion makes this fail; the device then works,
            // minus the wake-up after a quiesce.
            resume_evt: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                .map_err(|e| tracing::warn!(error = %e, "no resume eventfd for a virtio device"))
                .ok(),
        }
    }

    /// Whether the device is quiesced.
    pub fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst)
    }

    /// An eventfd that becomes readable when the device resumes.
    pub fn resume_event(&self) -> Option<EventFd> {
        self.resume_evt.as_ref().and_then(|e| e.try_clone().ok())
    }

    /// The device model (for counters and persistence).
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device model, mutably (backend events served by the event loop).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether the driver finished set-up and the device serves queues.
    pub fn is_activated(&self) -> bool {
        self.device_status & status::DRIVER_OK != 0 && !self.broken
    }

    /// Whether the device gave up on a corrupt queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Restores the "gave up" flag without telling the guest again (it was
    /// told before the snapshot; the status register says so).
    pub(super) fn set_broken(&mut self) {
        self.broken = true;
    }

    /// Stops serving queues (snapshot, migration switchover). Notifications
    /// that arrive meanwhile are remembered and served on [`Self::resume`].
    /// Requests are completed synchronously, so once this returns and the
    /// event loop is between events, nothing is in flight.
    pub fn quiesce(&mut self) {
        self.quiesced.store(true, Ordering::SeqCst);
    }

    /// Serves queues again, including notifications missed while quiesced.
    pub fn resume(&mut self) {
        self.quiesced.store(false, Ordering::SeqCst);
        if let Some(e) = &self.resume_evt {
            let _ = e.write(1);
        }
        for idx in 0..self.pending.len() {
            if std::mem::take(&mut self.pending[idx]) {
                self.notify(idx);
            }
        }
    }

    /// Requests taken from the queues and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.device.in_flight()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// A guest read at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                offset,
                len = data.len(),
                "unaligned virtio-mmio register read"
            );
            data.fill(0);
            return;
        }
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.device_status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    offset,
                    "read of a write-only or unknown virtio-mmio register"
                );
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "non-32-bit virtio-mmio register write"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::debug!(offset, "unaligned virtio-mmio register write");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        // Queue layout and features may only change before DRIVER_OK (spec
        // 4.2.3.2); later writes are a driver bug and are ignored.
        let setup = self.device_status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_select = v,
            reg::DRIVER_FEATURES_SEL => self.acked_features_select = v,
            reg::DRIVER_FEATURES if setup => {
                let offered = self.device.avail_features();
                match self.acked_features_select {
                    0 => {
                        let low = u64::from(v) & offered & 0xffff_ffff;
                        self.acked_features = (self.acked_features & !0xffff_ffff) | low;
                    }
                    1 => {
                        let high = (u64::from(v) << 32) & offered;
                        self.acked_features = (self.acked_features & 0xffff_ffff) | high;
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = v,
            reg::QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    // Sizes that are not a power of two or exceed the maximum
                    // are refused by Queue; the queue then stays invalid.
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v as usize),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW if setup => {
                self.set_addr(|q, v| q.set_desc_table_address(Some(v), None), v)
            }
            reg::QUEUE_DESC_HIGH if setup => {
                self.set_addr(|q, v| q.set_desc_table_address(None, Some(v)), v)
            }
            reg::QUEUE_AVAIL_LOW if setup => {
                self.set_addr(|q, v| q.set_avail_ring_address(Some(v), None), v)
            }
            reg::QUEUE_AVAIL_HIGH if setup => {
                self.set_addr(|q, v| q.set_avail_ring_address(None, Some(v)), v)
            }
            reg::QUEUE_USED_LOW if setup => {
                self.set_addr(|q, v| q.set_used_ring_address(Some(v), None), v)
            }
            reg::QUEUE_USED_HIGH if setup => {
                self.set_addr(|q, v| q.set_used_ring_address(None, Some(v)), v)
            }
            _ => tracing::debug!(offset, v, "virtio-mmio register write ignored"),
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.selected_queue() {
            f(q, v);
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let was_ok = self.device_status & status::DRIVER_OK != 0;
        // FEATURES_OK only sticks if the driver accepted VERSION_1: this
        // device has no legacy interface.
        let mut v = v;
        if v & status::FEATURES_OK != 0
            && self.acked_features & (1 << super::VIRTIO_F_VERSION_1) == 0
        {
            tracing::warn!("driver did not accept VIRTIO_F_VERSION_1; refusing FEATURES_OK");
            v &= !status::FEATURES_OK;
        }
        self.device_status = v | (self.device_status & status::DEVICE_NEEDS_RESET);
        if !was_ok && v & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mem = &self.mem;
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(mem))
        {
            self.mark_broken(&format!("queue {i} has an invalid layout at DRIVER_OK"));
            return;
        }
        self.device.activate(self.acked_features);
        tracing::debug!(
            device = self.device.device_type(),
            features = self.acked_features,
            "virtio device activated"
        );
    }

    /// Back to the state after power-on (the driver wrote 0 to Status).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.device_status = 0;
        self.acked_features = 0;
        self.acked_features_select = 0;
        self.features_select = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
        self.broken = false;
        self.pending.iter_mut().for_each(|p| *p = false);
    }

    fn mark_broken(&mut self, reason: &str) {
        if !self.broken {
            tracing::error!(
                device = self.device.device_type(),
                reason,
                "virtio device needs a reset; it stops serving its queues"
            );
        }
        self.broken = true;
        self.device_status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        // Tell the driver: the config-change interrupt makes Linux look at
        // the status.
        self.interrupt_status |= 2;
        self.signal();
    }

    /// Serves queue `idx` after the guest notified it.
    pub fn notify(&mut self, idx: usize) {
        if idx >= self.queues.len() {
            tracing::debug!(idx, "notification for a queue that does not exist");
            return;
        }
        if self.quiesced.load(Ordering::SeqCst) {
            self.pending[idx] = true;
            return;
        }
        if !self.is_activated() {
            return;
        }
        if !self.queues[idx].ready() {
            return;
        }
        match self.device.process_queue(idx, &mut self.queues, &self.mem) {
            Ok(true) => {
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                self.signal();
            }
            Ok(false) => {}
            Err(e) => self.mark_broken(&e.to_string()),
        }
    }

    fn signal(&self) {
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot raise virtio interrupt");
        }
    }

    /// The selected queue's addresses, for tests and debugging.
    pub fn queue_addresses(
        &self,
        idx: usize,
    ) -> Option<(GuestAddress, GuestAddress, GuestAddress)> {
        self.queues.get(idx).map(|q| {
            (
                GuestAddress(q.desc_table()),
                GuestAddress(q.avail_ring()),
                GuestAddress(q.used_ring()),
            )
        })
    }
}
