//! The virtio-blk device model: config space, features, the image file and
//! I/O counters.

use std::any::Any;
use std::fs::{File, OpenOptions};
use std::io::Seek;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::{
    BlockError, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_ID_BLOCK,
};
use crate::devices::virtio::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

/// I/O counters of one disk, shared with whoever reports them (the control
/// API, HA's I/O-activity check). Updated by the event loop, read anywhere.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Read requests completed.
    pub read_ops: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
    /// Write requests completed.
    pub write_ops: AtomicU64,
    /// Flush requests completed.
    pub flushes: AtomicU64,
    /// Requests that failed (bad request, I/O error, write to a read-only disk).
    pub errors: AtomicU64,
}

/// A plain copy of [`BlockCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCountersSnapshot {
    /// Bytes read.
    pub read_bytes: u64,
    /// Read requests.
    pub read_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Write requests.
    pub write_ops: u64,
    /// Flushes.
    pub flushes: u64,
    /// Failed requests.
    pub errors: u64,
}

impl BlockCounters {
    /// The current values.
    pub fn snapshot(&self) -> BlockCountersSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlockCountersSnapshot {
            read_bytes: l(&self.read_bytes),
            read_ops: l(&self.read_ops),
            write_bytes: l(&self.write_bytes),
            write_ops: l(&self.write_ops),
            flushes: l(&self.flushes),
            errors: l(&self.errors),
        }
    }

    /// Sets all counters (restore).
    pub fn set(&self, s: &BlockCountersSnapshot) {
        let st = |a: &AtomicU64, v| a.store(v, Ordering::Relaxed);
        st(&self.read_bytes, s.read_bytes);
        st(&self.read_ops, s.read_ops);
        st(&self.write_bytes, s.write_bytes);
        st(&self.write_ops, s.write_ops);
        st(&self.flushes, s.flushes);
        st(&self.errors, s.errors);
    }

    pub(super) fn add(a: &AtomicU64, v: u64) {
        a.fetch_add(v, Ordering::Relaxed);
    }
}

/// A virtio-blk device on a raw image file.
pub struct Block {
    pub(super) id: String,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
    pub(super) file: File,
    /// Image size in bytes (rounded down to whole sectors for the guest).
    pub(super) size: u64,
    pub(super) counters: Arc<BlockCounters>,
    queue_sizes: [u16; 1],
}

impl Block {
    /// Opens `path` (read-only if `read_only`). `id` is what GET_ID returns
    /// (at most 20 bytes are visible to the guest).
    pub fn new(path: &Path, read_only: bool, id: String) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        // Seeking to the end sizes a block device too (its metadata says 0).
        let size = (&file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            id,
            path: path.to_path_buf(),
            read_only,
            file,
            size,
            counters: Arc::new(BlockCounters::default()),
            queue_sizes: [QUEUE_SIZE],
        })
    }

    /// The counters, to be read by the control API.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// The disk's id (GET_ID).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the guest may write.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `capacity` (le64 at 0) and `seg_max` (le32 at 12); `size_max` (8)
        // and the rest belong to features we do not offer.
        let mut cap = [0u8; 16];
        cap[..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        cap[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| cap.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        idx: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match queues.get_mut(idx) {
            Some(q) => self.serve(idx, q, mem),
            None => Ok(false),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
