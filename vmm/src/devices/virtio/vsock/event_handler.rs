//! The vsock device's event-loop subscriber: its three queue ioeventfds, the
//! listening socket, the tools wake-up eventfd and every host stream.

use std::collections::HashSet;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{FdChange, Vsock, LISTENER_TOKEN, TOOLS_TOKEN};
use super::RX;
use crate::devices::virtio::transport::MmioTransport;

/// Serves queue notifications and host socket events for one vsock device.
pub struct VsockEvents {
    transport: Arc<Mutex<MmioTransport>>,
    evts: Vec<EventFd>,
    listener: RawFd,
    tools_wake: RawFd,
    watched: HashSet<RawFd>,
}

impl VsockEvents {
    /// Watches `evts[i]` for queue `i` plus the device's host sockets.
    pub fn new(
        transport: Arc<Mutex<MmioTransport>>,
        evts: Vec<EventFd>,
        listener: RawFd,
        tools_wake: RawFd,
    ) -> Self {
        Self {
            transport,
            evts,
            listener,
            tools_wake,
            watched: HashSet::new(),
        }
    }

    fn apply(&mut self, ops: &mut EventOps, changes: Vec<FdChange>) {
        for ch in changes {
            tracing::trace!(change = ?ch, "vsock fd change");
            let r = match ch {
                FdChange::Set(fd, tok, ev) => {
                    let e = Events::with_data_raw(fd, tok, ev);
                    if self.watched.insert(fd) {
                        ops.add(e)
                    } else {
                        ops.modify(e)
                    }
                }
                FdChange::Remove(fd) => {
                    if self.watched.remove(&fd) {
                        ops.remove(Events::empty_raw(fd))
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(e) = r {
                tracing::debug!(change = ?ch, error = ?e, "vsock fd registration failed");
            }
        }
    }
}

impl MutEventSubscriber for VsockEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in (0u32..).zip(&self.evts) {
            if let Err(err) = ops.add(Events::with_data(e, i, EventSet::IN)) {
                tracing::error!(queue = i, error = ?err, "cannot watch a vsock queue eventfd");
            }
        }
        for (fd, tok) in [
            (self.listener, LISTENER_TOKEN),
            (self.tools_wake, TOOLS_TOKEN),
        ] {
            if let Err(err) = ops.add(Events::with_data_raw(fd, tok, EventSet::IN)) {
                tracing::error!(error = ?err, "cannot watch the vsock listener or tools eventfd");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let tok = events.data();
        let transport = self.transport.clone();
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(evt) = self.evts.get(tok as usize) {
            let _ = evt.read();
            t.notify(tok as usize);
        } else {
            if let Some(v) = t.device_mut().as_any_mut().downcast_mut::<Vsock>() {
                v.on_event(tok, events.event_set());
            }
            // Host data or control packets may be waiting for rx buffers.
            t.notify(RX);
        }
        let changes = match t.device_mut().as_any_mut().downcast_mut::<Vsock>() {
            Some(v) => v.take_fd_changes(),
            None => Vec::new(),
        };
        self.apply(ops, changes);
        if let Some(v) = t.device_mut().as_any_mut().downcast_mut::<Vsock>() {
            v.bury();
        }
    }
}
