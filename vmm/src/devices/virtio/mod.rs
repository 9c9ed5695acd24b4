//! Virtio devices over the MMIO transport (virtio 1.x, virtio-mmio version 2).
//!
//! - [`transport`]: the register window, feature negotiation, queue set-up,
//!   interrupt status; one per device.
//! - [`event_handler`]: the event-loop subscriber that turns a queue's
//!   ioeventfd into a call to the device.
//! - [`persist`]: the transport's saved state.
//! - one folder per device ([`block`]) with `device.rs`, `event_handler.rs`
//!   and `persist.rs`.
//!
//! Guest-controlled data (descriptor chains, ring indices, register values)
//! is hostile: a bad request fails with the device's error status; a queue
//! that cannot be trusted any more marks the device as needing a reset
//! (logged once). Nothing the guest writes may panic the VMM.

pub mod attach;
pub mod block;
pub mod event_handler;
pub mod hooks;
pub mod net;
pub mod persist;
pub mod transport;
pub mod vsock;

#[cfg(test)]
mod tests;

use std::any::Any;

use virtio_queue::Queue;

use crate::memory::GuestMemory;

/// Device feature bit: the device complies with virtio 1.x.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;

/// Why a device stopped serving a queue.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The ring itself is corrupt (bad index, unreadable ring): the device
    /// needs a reset.
    #[error("queue {queue}: {reason}")]
    BrokenQueue {
        /// Queue index.
        queue: usize,
        /// What was wrong.
        reason: String,
    },
}

/// What a device model provides to the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 1 = net, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific config space at `offset`. Out-of-range
    /// bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the config space; devices without writable fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "config write ignored");
    }
    /// Called once the driver set DRIVER_OK with the features it accepted.
    fn activate(&mut self, _acked_features: u64) {}
    /// Serves queue `idx` after a notification (devices whose queues depend
    /// on each other, like vsock's rx and tx, get all of them). Returns
    /// whether a used ring changed (the transport then interrupts the guest).
    fn process_queue(
        &mut self,
        idx: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError>;
    /// Forgets per-activation state (the driver wrote 0 to Status).
    fn reset(&mut self) {}
    /// Makes every request the guest has seen completed durable (a disk's
    /// `fdatasync`). Called with the device quiesced, before its state is
    /// captured for a snapshot or a migration.
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Requests taken from a queue and not yet completed. Devices that finish
    /// each request before `process_queue` returns always report 0.
    fn in_flight(&self) -> usize {
        0
    }
    /// For callers that need the concrete device (persistence, counters).
    fn as_any(&self) -> &dyn Any;
    /// Mutable access to the concrete device (backend events).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}
