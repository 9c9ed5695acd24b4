//! Saved state of a block device: its identity (id, path, read-only) and
//! counters. The image is reopened from `path` on restore: a snapshot or a
//! migration assumes the same datastore path on the other side (migration's
//! pre-checks verify that).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::{Block, BlockCountersSnapshot};
use super::BlockError;
use crate::persist::Persist;

/// The block device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// GET_ID value.
    pub id: String,
    /// Image path.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// Image size when saved, in bytes: restoring onto an image of another
    /// size would change the disk under the guest, so it is refused.
    pub size: u64,
    /// I/O counters, which continue across restore.
    pub counters: BlockCountersSnapshot,
}

/// Restoring a block device failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockPersistError {
    /// The image cannot be opened.
    #[error(transparent)]
    Open(#[from] BlockError),
    /// The image changed size since the snapshot.
    #[error("disk image {path} is {now} bytes, the snapshot saw {saved}")]
    SizeChanged {
        /// The image.
        path: PathBuf,
        /// Size now.
        now: u64,
        /// Size in the state.
        saved: u64,
    },
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = ();
    type Error = BlockPersistError;

    fn save(&self) -> BlockState {
        BlockState {
            id: self.id.clone(),
            path: self.path.clone(),
            read_only: self.read_only,
            size: self.size,
            counters: self.counters.snapshot(),
        }
    }

    fn restore(_: (), s: &BlockState) -> Result<Self, Self::Error> {
        let b = Block::new(&s.path, s.read_only, s.id.clone())?;
        if b.size != s.size {
            return Err(BlockPersistError::SizeChanged {
                path: s.path.clone(),
                now: b.size,
                saved: s.size,
            });
        }
        b.counters.set(&s.counters);
        Ok(b)
    }
}
