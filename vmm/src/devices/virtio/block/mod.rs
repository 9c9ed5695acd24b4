//! virtio-blk backed by a raw image file.
//!
//! - [`device`]: the device model (config space, features, counters).
//! - [`request`]: parsing a descriptor chain into a request and running it.
//! - [`event_handler`]: serving a queue notification.
//! - [`persist`]: saved state.
//!
//! Durability: requests go through the host page cache, and the device
//! offers VIRTIO_BLK_F_FLUSH, so the guest's cache is write-back and every
//! flush it sends becomes an `fdatasync` completed before the request is.
//! A write the guest saw completed after a flush is on disk.

pub mod device;
pub mod event_handler;
pub mod persist;
pub mod request;

#[cfg(test)]
pub(crate) mod tests;

pub use device::{Block, BlockCounters, BlockCountersSnapshot};

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The config space's `seg_max` says how many data buffers one request
/// may have.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// The disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// The device understands flush requests.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Sector size used by the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Our one queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// Data buffers per request: a whole queue minus the header and status
/// descriptors (no indirect descriptors are offered). Without it Linux
/// sends one buffer (one page of a user buffer) per request, and every
/// request costs the guest kernel the same.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Errors setting up a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image size cannot be read.
    #[error("cannot read the size of disk image {path}: {source}")]
    Size {
        /// The image.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
