//! The virtio-net device model: frames from the tx queue go to the tap,
//! frames from the tap go into rx buffers.

use std::any::Any;
use std::io::{self, ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::tap::Tap;
use super::{MAX_FRAME, QUEUE_SIZE, RX, TX, VIRTIO_ID_NET, VIRTIO_NET_F_MAC, VNET_HDR_LEN};
use crate::devices::virtio::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

/// Where frames go on the host: the tap, or a stand-in in tests.
pub trait FrameIo: Send {
    /// Reads one frame; `WouldBlock` when there is none.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, buf)
    }
}

/// Traffic counters of one NIC, shared with the control API and HA's
/// I/O-activity check.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest (without the virtio header).
    pub rx_bytes: AtomicU64,
    /// Frames sent by the guest.
    pub tx_packets: AtomicU64,
    /// Bytes sent by the guest.
    pub tx_bytes: AtomicU64,
    /// Frames from the tap dropped (rx buffer too small, unreadable).
    pub rx_dropped: AtomicU64,
    /// Frames from the guest dropped (malformed, tap write failed).
    pub tx_dropped: AtomicU64,
}

/// A plain copy of [`NetCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCountersSnapshot {
    /// Frames in.
    pub rx_packets: u64,
    /// Bytes in.
    pub rx_bytes: u64,
    /// Frames out.
    pub tx_packets: u64,
    /// Bytes out.
    pub tx_bytes: u64,
    /// Frames in dropped.
    pub rx_dropped: u64,
    /// Frames out dropped.
    pub tx_dropped: u64,
}

impl NetCounters {
    /// The current values.
    pub fn snapshot(&self) -> NetCountersSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCountersSnapshot {
            rx_packets: l(&self.rx_packets),
            rx_bytes: l(&self.rx_bytes),
            tx_packets: l(&self.tx_packets),
            tx_bytes: l(&self.tx_bytes),
            rx_dropped: l(&self.rx_dropped),
            tx_dropped: l(&self.tx_dropped),
        }
    }

    /// Sets all counters (restore).
    pub fn set(&self, s: &NetCountersSnapshot) {
        let st = |a: &AtomicU64, v| a.store(v, Ordering::Relaxed);
        st(&self.rx_packets, s.rx_packets);
        st(&self.rx_bytes, s.rx_bytes);
        st(&self.tx_packets, s.tx_packets);
        st(&self.tx_bytes, s.tx_bytes);
        st(&self.rx_dropped, s.rx_dropped);
        st(&self.tx_dropped, s.tx_dropped);
    }
}

fn add(a: &AtomicU64, v: u64) {
    a.fetch_add(v, Ordering::Relaxed);
}

/// A virtio-net device.
pub struct Net {
    pub(super) mac: [u8; 6],
    pub(super) network: String,
    pub(super) tap_name: String,
    io: Box<dyn FrameIo>,
    pub(super) counters: Arc<NetCounters>,
    /// A frame read from the tap that waits for an rx buffer.
    pending: Option<Vec<u8>>,
    queue_sizes: [u16; 2],
}

impl Net {
    /// A NIC with `mac` on logical network `network`, frames through `io`
    /// (the tap named `tap_name`).
    pub fn new(mac: [u8; 6], network: String, tap_name: String, io: Box<dyn FrameIo>) -> Self {
        Self {
            mac,
            network,
            tap_name,
            io,
            counters: Arc::new(NetCounters::default()),
            pending: None,
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }

    /// The MAC address (the guest's identity).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The logical network name.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The tap name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    /// The counters, to be read by the control API.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Whether the tap should be read: not while a frame waits for an rx
    /// buffer (the event loop takes the tap off epoll, so it cannot spin).
    pub fn wants_tap(&self) -> bool {
        self.pending.is_none()
    }

    fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut frame = Vec::with_capacity(2048);
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            frame.clear();
            let ok = match chain.reader(mem) {
                Ok(mut r) if (VNET_HDR_LEN..=MAX_FRAME).contains(&r.available_bytes()) => {
                    frame.resize(r.available_bytes(), 0);
                    r.read_exact(&mut frame).is_ok()
                }
                _ => false,
            };
            if ok {
                match self.io.write_frame(&frame) {
                    Ok(_) => {
                        add(&self.counters.tx_packets, 1);
                        add(&self.counters.tx_bytes, (frame.len() - VNET_HDR_LEN) as u64);
                    }
                    Err(e) => {
                        tracing::debug!(tap = %self.tap_name, error = %e, "tap write failed");
                        add(&self.counters.tx_dropped, 1);
                    }
                }
            } else {
                add(&self.counters.tx_dropped, 1);
            }
            q.add_used(mem, head, 0)
                .map_err(|e| DeviceError::BrokenQueue {
                    queue: TX,
                    reason: format!("cannot write the used ring: {e}"),
                })?;
            used = true;
        }
        Ok(used)
    }

    /// Moves frames from the tap into rx buffers until either runs out.
    pub(super) fn process_rx(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => {
                    let mut buf = vec![0u8; MAX_FRAME];
                    match self.io.read_frame(&mut buf) {
                        Ok(n) if n > VNET_HDR_LEN => {
                            buf.truncate(n);
                            buf
                        }
                        Ok(_) => continue,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::debug!(tap = %self.tap_name, error = %e, "tap read failed");
                            add(&self.counters.rx_dropped, 1);
                            break;
                        }
                    }
                }
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let mut frame = frame;
            // num_buffers = 1 (the v1 header always has the field).
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let delivered = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => w.write_all(&frame).is_ok(),
                // Too small for the frame (mergeable buffers are not
                // offered) or outside guest memory.
                _ => false,
            };
            let written = if delivered {
                add(&self.counters.rx_packets, 1);
                add(&self.counters.rx_bytes, (frame.len() - VNET_HDR_LEN) as u64);
                frame.len() as u32
            } else {
                add(&self.counters.rx_dropped, 1);
                0
            };
            q.add_used(mem, head, written)
                .map_err(|e| DeviceError::BrokenQueue {
                    queue: RX,
                    reason: format!("cannot write the used ring: {e}"),
                })?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MAC)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6] at offset 0; the rest belongs to features not offered.
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.mac.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        idx: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        if idx == TX {
            if let Some(q) = queues.get_mut(TX) {
                used |= self.process_tx(q, mem)?;
            }
        }
        // Also after tx: a reply may already be waiting in the tap.
        if let Some(q) = queues.get_mut(RX) {
            used |= self.process_rx(q, mem)?;
        }
        Ok(used)
    }

    fn reset(&mut self) {
        self.pending = None;
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
