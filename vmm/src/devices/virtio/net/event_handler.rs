//! The NIC's event-loop subscriber: the two queue ioeventfds and the tap.

use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::Net;
use super::RX;
use crate::devices::virtio::transport::MmioTransport;

/// Token of the tap fd (queues use their index).
const TAP_TOKEN: u32 = 8;
/// Token of the transport's resume eventfd.
const RESUME_TOKEN: u32 = 9;

/// Serves queue notifications and tap readiness for one NIC.
pub struct NetEvents {
    transport: Arc<Mutex<MmioTransport>>,
    evts: Vec<EventFd>,
    tap: RawFd,
    tap_watched: bool,
    resume: Option<EventFd>,
}

impl NetEvents {
    /// Watches `evts[i]` for queue `i`, and `tap`.
    pub fn new(transport: Arc<Mutex<MmioTransport>>, evts: Vec<EventFd>, tap: RawFd) -> Self {
        let resume = transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume_event();
        Self {
            transport,
            evts,
            tap,
            tap_watched: true,
            resume,
        }
    }
}

impl MutEventSubscriber for NetEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in (0u32..).zip(&self.evts) {
            if let Err(err) = ops.add(Events::with_data(e, i, EventSet::IN)) {
                tracing::error!(queue = i, error = ?err, "cannot watch a net queue eventfd");
            }
        }
        if let Err(err) = ops.add(Events::with_data_raw(self.tap, TAP_TOKEN, EventSet::IN)) {
            tracing::error!(error = ?err, "cannot watch the tap");
        }
        if let Some(r) = &self.resume {
            if let Err(err) = ops.add(Events::with_data(r, RESUME_TOKEN, EventSet::IN)) {
                tracing::warn!(error = ?err, "cannot watch the resume eventfd");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let tok = events.data();
        let transport = self.transport.clone();
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        match self.evts.get(tok as usize) {
            Some(evt) => {
                let _ = evt.read();
                t.notify(tok as usize);
            }
            None => {
                if tok == RESUME_TOKEN {
                    if let Some(r) = &self.resume {
                        let _ = r.read();
                    }
                }
                t.notify(RX);
            }
        }
        let want = !t.is_quiesced()
            && t.device()
                .as_any()
                .downcast_ref::<Net>()
                .is_some_and(Net::wants_tap);
        // A frame waiting for rx buffers, or a quiesced device: stop watching
        // the tap so the loop does not spin; the guest's rx notification or
        // the resume eventfd brings it back.
        if want != self.tap_watched {
            let ev = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            if let Err(e) = ops.modify(Events::with_data_raw(self.tap, TAP_TOKEN, ev)) {
                tracing::debug!(error = ?e, "cannot change tap interest");
            }
            self.tap_watched = want;
        }
    }
}
