//! The event-loop side of a virtio device: one subscriber per device,
//! watching that device's queue ioeventfds (registered with KVM on the
//! QueueNotify address, matching the queue index).

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::transport::MmioTransport;

/// Turns queue ioeventfds into [`MmioTransport::notify`] calls.
pub struct QueueEvents {
    transport: Arc<Mutex<MmioTransport>>,
    evts: Vec<EventFd>,
}

impl QueueEvents {
    /// Watches `evts[i]` for queue `i` of `transport`.
    pub fn new(transport: Arc<Mutex<MmioTransport>>, evts: Vec<EventFd>) -> Self {
        Self { transport, evts }
    }
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in (0u32..).zip(&self.evts) {
            if let Err(err) = ops.add(Events::with_data(e, i, EventSet::IN)) {
                tracing::error!(queue = i, error = ?err, "cannot watch a virtio queue eventfd");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let idx = events.data() as usize;
        let Some(evt) = self.evts.get(idx) else {
            return;
        };
        // Non-blocking: a spurious wake-up reads EAGAIN and serves nothing
        // new, which is harmless.
        let _ = evt.read();
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify(idx);
    }
}
