//! virtio-net on a host tap device.
//!
//! - [`tap`]: opening /dev/net/tun (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).
//! - [`device`]: the device model (MAC in config space, counters) and the
//!   frame paths between the queues and the tap.
//! - [`event_handler`]: queue and tap events.
//! - [`persist`]: saved state (MAC, network name, tap name, counters).
//!
//! No offloads are offered: frames are at most MTU-sized, the 12-byte virtio
//! header (virtio 1.x layout) passes through the tap unchanged. The MAC is
//! the guest's network identity (migration announces it); `network` is the
//! logical network (port group) name that migration pre-checks compare.

pub mod device;
pub mod event_handler;
pub mod persist;
pub mod tap;

#[cfg(test)]
mod tests;

pub use device::{Net, NetCounters, NetCountersSnapshot};

/// virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// The device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Size of the virtio-net header with VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Receive queue.
pub const RX: usize = 0;
/// Transmit queue.
pub const TX: usize = 1;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame accepted (header + 64 KiB), whatever the MTU.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65536;

/// Errors setting up a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// The tap cannot be attached or configured.
    #[error("cannot set up tap {tap} ({op}): {source}")]
    Tap {
        /// Tap name.
        tap: String,
        /// Which ioctl.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
