//! Saved state of the virtio-mmio transport: device status, features, the
//! queues' layout and positions, interrupt status, config generation. The
//! device model's own state is saved by the device's `persist.rs`;
//! [`VirtioDeviceState`] pairs the two for one device, and [`save_all`]
//! captures every device of a VM.
//!
//! What a saved queue means for in-flight I/O: devices complete every
//! request they take from a ring before releasing the transport's lock, so
//! once quiesced, `next_avail` separates requests that are done (their
//! used-ring entries are in guest memory, their data on disk after
//! [`VirtioDevice::sync`]) from requests the device has not looked at (still
//! in the available ring, served after restore). None is lost or done
//! twice.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::block::persist::BlockState;
use super::block::Block;
use super::net::persist::NetState;
use super::net::Net;
use super::transport::MmioTransport;
use super::vsock::persist::VsockState;
use super::vsock::Vsock;
use super::VirtioDevice;
use crate::memory::GuestMemory;
use crate::persist::Persist;

/// One queue as the driver configured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Maximum size offered.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
}

/// The transport's registers and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Device status register.
    pub device_status: u32,
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub acked_features_select: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// Interrupt status.
    pub interrupt_status: u32,
    /// Config generation.
    pub config_generation: u32,
    /// The queues, in index order.
    pub queues: Vec<QueueState>,
    /// The device had given up on a corrupt queue (it stays so until the
    /// driver resets it).
    #[serde(default)]
    pub broken: bool,
}

/// One virtio device as saved: its transport and its model, in attach order
/// (disks, then NICs, then vsock: the order of the MMIO windows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VirtioDeviceState {
    /// A virtio-blk disk.
    Block {
        /// Registers and queues.
        transport: MmioTransportState,
        /// The disk.
        device: BlockState,
    },
    /// A virtio-net NIC.
    Net {
        /// Registers and queues.
        transport: MmioTransportState,
        /// The NIC.
        device: NetState,
    },
    /// The virtio-vsock device.
    Vsock {
        /// Registers and queues.
        transport: MmioTransportState,
        /// The device.
        device: VsockState,
    },
}

impl VirtioDeviceState {
    /// The transport part.
    pub fn transport(&self) -> &MmioTransportState {
        match self {
            Self::Block { transport, .. }
            | Self::Net { transport, .. }
            | Self::Vsock { transport, .. } => transport,
        }
    }

    /// "block", "net" or "vsock".
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block { .. } => "block",
            Self::Net { .. } => "net",
            Self::Vsock { .. } => "vsock",
        }
    }
}

/// Capturing a device's state failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Completed writes could not be made durable.
    #[error("cannot flush disk {id} ({path}) before saving its state: {source}")]
    Sync {
        /// The disk's id.
        id: String,
        /// Its image.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A transport holds a device model this code does not know.
    #[error("virtio device {0} has no saved-state form")]
    Unknown(usize),
}

/// Saves one quiesced device: makes its completed writes durable, then
/// captures its transport and model.
pub fn save_device(idx: usize, t: &mut MmioTransport) -> Result<VirtioDeviceState, SaveError> {
    let transport = t.save();
    let dev = t.device_mut();
    if let Err(source) = dev.sync() {
        let (id, path) = dev
            .as_any()
            .downcast_ref::<Block>()
            .map(|b| (b.id().to_string(), b.path().to_path_buf()))
            .unwrap_or_default();
        return Err(SaveError::Sync { id, path, source });
    }
    let any = t.device().as_any();
    if let Some(b) = any.downcast_ref::<Block>() {
        return Ok(VirtioDeviceState::Block {
            transport,
            device: b.save(),
        });
    }
    if let Some(n) = any.downcast_ref::<Net>() {
        return Ok(VirtioDeviceState::Net {
            transport,
            device: n.save(),
        });
    }
    if let Some(v) = any.downcast_ref::<Vsock>() {
        return Ok(VirtioDeviceState::Vsock {
            transport,
            device: v.save(),
        });
    }
    Err(SaveError::Unknown(idx))
}

/// Saves every device, in attach order. The caller has quiesced them (see
/// [`MmioTransport::quiesce`]); each transport's lock is held while it is
/// saved, so the event loop cannot be half-way through a request.
pub fn save_all(
    transports: &[Arc<Mutex<MmioTransport>>],
) -> Result<Vec<VirtioDeviceState>, SaveError> {
    transports
        .iter()
        .enumerate()
        .map(|(i, t)| save_device(i, &mut t.lock().unwrap_or_else(|p| p.into_inner())))
        .collect()
}

/// What restoring a transport needs besides its state.
pub struct MmioTransportArgs {
    /// The restored device model.
    pub device: Box<dyn VirtioDevice>,
    /// Guest memory (already restored).
    pub mem: GuestMemory,
    /// The interrupt eventfd (registered as an irqfd by the caller).
    pub irq: EventFd,
}

/// Restoring a transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportPersistError {
    /// The saved queue count differs from the device's.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// In the state.
        saved: usize,
        /// The device's.
        device: usize,
    },
    /// A saved queue is not valid in the restored guest memory.
    #[error("queue {0} is not valid in the restored guest memory")]
    InvalidQueue(usize),
}

fn save_queue(q: &Queue) -> QueueState {
    QueueState {
        max_size: q.max_size(),
        size: q.size(),
        ready: q.ready(),
        desc_table: q.desc_table(),
        avail_ring: q.avail_ring(),
        used_ring: q.used_ring(),
        next_avail: q.next_avail(),
        next_used: q.next_used(),
        event_idx: q.event_idx_enabled(),
    }
}

fn restore_queue(q: &mut Queue, s: &QueueState) {
    q.set_size(s.size);
    q.set_desc_table_address(Some(s.desc_table as u32), Some((s.desc_table >> 32) as u32));
    q.set_avail_ring_address(Some(s.avail_ring as u32), Some((s.avail_ring >> 32) as u32));
    q.set_used_ring_address(Some(s.used_ring as u32), Some((s.used_ring >> 32) as u32));
    q.set_next_avail(s.next_avail);
    q.set_next_used(s.next_used);
    q.set_event_idx(s.event_idx);
    q.set_ready(s.ready);
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = TransportPersistError;

    fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_status: self.device_status,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(save_queue).collect(),
            broken: self.is_broken(),
        }
    }

    fn restore(args: MmioTransportArgs, s: &MmioTransportState) -> Result<Self, Self::Error> {
        let mut t = MmioTransport::new(args.device, args.mem, args.irq);
        if t.queues.len() != s.queues.len() {
            return Err(TransportPersistError::QueueCount {
                saved: s.queues.len(),
                device: t.queues.len(),
            });
        }
        for (i, (q, qs)) in t.queues.iter_mut().zip(&s.queues).enumerate() {
            restore_queue(q, qs);
            if qs.ready && !q.is_valid(&t.mem) {
                return Err(TransportPersistError::InvalidQueue(i));
            }
        }
        t.device_status = s.device_status;
        t.features_select = s.features_select;
        t.acked_features_select = s.acked_features_select;
        t.acked_features = s.acked_features;
        t.queue_select = s.queue_select;
        t.interrupt_status = s.interrupt_status;
        t.config_generation = s.config_generation;
        if s.broken {
            t.set_broken();
        } else if t.device_status & super::status::DRIVER_OK != 0 {
            t.device.activate(t.acked_features);
        }
        Ok(t)
    }
}
