//! Serving the request queue when the guest notifies it: take every
//! available chain, run it, complete it. Requests finish before this
//! returns, so a quiesced device has nothing in flight.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::device::{Block, BlockCounters};
use super::request::{parse, status_address, VIRTIO_BLK_S_IOERR};
use crate::devices::virtio::DeviceError;
use crate::memory::GuestMemory;

impl Block {
    /// Serves all available requests of `queue`; returns whether any was
    /// completed. A ring whose indices make no sense is a [`DeviceError`].
    pub fn serve(
        &mut self,
        idx: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let broken = |reason: String| DeviceError::BrokenQueue { queue: idx, reason };
        // The avail index may not run more than a queue's worth ahead of us;
        // a guest that says otherwise has a corrupt ring.
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| broken(format!("cannot read the available ring: {e}")))?;
        if (avail - Wrapping(queue.next_avail())).0 > queue.size() {
            return Err(broken(format!(
                "available index {} is more than a queue ahead of {}",
                avail.0,
                queue.next_avail()
            )));
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // The walker stops at loops (TTL = queue size) and at descriptors
            // outside memory, so this is bounded.
            let descs: Vec<Descriptor> = chain.collect();
            let capacity = self.capacity_sectors();
            let (status, len, addr) = match parse(&descs, mem, capacity) {
                Ok(req) => {
                    let (s, l) = self.execute(&req, mem);
                    (s, l, Some(req.status))
                }
                Err(e) => {
                    tracing::debug!(disk = %self.id, error = %e, "malformed virtio-blk request");
                    BlockCounters::add(&self.counters.errors, 1);
                    let addr = status_address(&descs, mem);
                    (VIRTIO_BLK_S_IOERR, u32::from(addr.is_some()), addr)
                }
            };
            if let Some(a) = addr {
                if let Err(e) = mem.write_obj(status, a) {
                    tracing::debug!(error = %e, "cannot write virtio-blk status");
                }
            }
            queue
                .add_used(mem, head, len)
                .map_err(|e| broken(format!("cannot write the used ring: {e}")))?;
            used = true;
        }
        Ok(used)
    }
}
