//! Putting the configured virtio devices into a VM: one MMIO window and one
//! interrupt line each, the irqfd and queue ioeventfds registered with KVM,
//! the ACPI descriptions that announce them (see `acpi` for why not the
//! kernel command line), and the handles
//! the rest of the VMM keeps (event subscribers, counters, transports for
//! quiesce and persistence).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use event_manager::MutEventSubscriber;

use super::block::persist::{BlockPersistError, BlockState};
use super::block::{Block, BlockCounters, BlockError};
use super::event_handler::QueueEvents;
use super::net::event_handler::NetEvents;
use super::net::persist::{NetArgs, NetState};
use super::net::tap::Tap;
use super::net::{Net, NetCounters, NetError};
use super::persist::{
    MmioTransportArgs, MmioTransportState, TransportPersistError, VirtioDeviceState,
};
use super::transport::{reg, MmioTransport};
use super::vsock::event_handler::VsockEvents;
use super::vsock::persist::VsockState;
use super::vsock::{ToolsStatus, Vsock, VsockError};
use super::VirtioDevice;
use crate::acpi::VirtioMmioInfo;
use crate::config::VmConfig;
use crate::devices::mmio::{
    MmioBus, VIRTIO_FIRST_IRQ, VIRTIO_LAST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::memory::GuestMemory;
use crate::persist::Persist;

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A disk could not be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A NIC could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for a virtio device: {0}")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the interrupt eventfd.
    #[error("cannot register the irqfd for virtio IRQ {irq}: {source}")]
    Irqfd {
        /// The line.
        irq: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused a queue-notify eventfd.
    #[error("cannot register the ioeventfd at {addr:#x}: {source}")]
    Ioeventfd {
        /// The QueueNotify address.
        addr: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved disk cannot be reopened as it was.
    #[error("cannot restore disk {path}: {source}")]
    BlockRestore {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: BlockPersistError,
    },
    /// A saved transport does not fit the rebuilt device.
    #[error("cannot restore the {kind} device's virtio-mmio state: {source}")]
    TransportRestore {
        /// "block", "net" or "vsock".
        kind: &'static str,
        /// Why.
        #[source]
        source: TransportPersistError,
    },
    /// The saved devices do not match the saved config.
    #[error("the saved virtio devices do not match the saved config: {0}")]
    Mismatch(String),
    /// More devices than interrupt lines.
    #[error("too many virtio devices: at most {} fit", VIRTIO_LAST_IRQ - VIRTIO_FIRST_IRQ + 1)]
    TooMany,
}

/// A disk as the rest of the VMM sees it.
pub struct BlockHandle {
    /// The disk's id (config `id`).
    pub id: String,
    /// Live I/O counters.
    pub counters: Arc<BlockCounters>,
    /// The transport (quiesce, persistence).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// A NIC as the rest of the VMM sees it.
pub struct NicHandle {
    /// The MAC address.
    pub mac: [u8; 6],
    /// The logical network name.
    pub network: String,
    /// The tap name.
    pub tap: String,
    /// Live traffic counters.
    pub counters: Arc<NetCounters>,
    /// The transport (quiesce, persistence).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Everything attached.
#[derive(Default)]
pub struct VirtioDevices {
    /// The MMIO bus holding every device window (shared with the vCPUs).
    pub bus: Arc<MmioBus>,
    /// One event-loop subscriber per device.
    pub subscribers: Vec<Subscriber>,
    /// The windows and interrupt lines, for the ACPI DSDT.
    pub acpi: Vec<VirtioMmioInfo>,
    /// Disks, in config order.
    pub blocks: Vec<BlockHandle>,
    /// NICs, in config order.
    pub nics: Vec<NicHandle>,
    /// Every transport, in attach order (MMIO address order).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The vsock device's transport, if configured.
    pub vsock: Option<Arc<Mutex<MmioTransport>>>,
    /// The guest tools channel status (needs a vsock device).
    pub tools: Option<Arc<ToolsStatus>>,
}

/// An event-loop subscriber as the instance's event manager holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

impl VirtioDevices {
    /// Stops every device from serving its queues (see
    /// [`MmioTransport::quiesce`]).
    pub fn quiesce(&self) {
        for t in &self.transports {
            t.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
        }
    }

    /// Lets every device serve its queues again.
    pub fn resume(&self) {
        for t in &self.transports {
            t.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }

    /// Requests in flight over all devices (0 once quiesced).
    pub fn in_flight(&self) -> usize {
        self.transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).in_flight())
            .sum()
    }

    fn attach(
        &mut self,
        bus: &mut MmioBus,
        vm: &VmFd,
        mem: &GuestMemory,
        dev: Box<dyn VirtioDevice>,
        saved: Option<(&'static str, &MmioTransportState)>,
    ) -> Result<(Arc<Mutex<MmioTransport>>, Vec<EventFd>), AttachError> {
        let n = self.transports.len() as u32;
        let irq = VIRTIO_FIRST_IRQ + n;
        if irq > VIRTIO_LAST_IRQ {
            return Err(AttachError::TooMany);
        }
        let base = VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_SIZE;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(AttachError::EventFd)?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|source| AttachError::Irqfd { irq, source })?;
        let mut evts = Vec::new();
        let notify = base + reg::QUEUE_NOTIFY;
        for q in 0..dev.queue_max_sizes().len() as u32 {
            let e = EventFd::new(EFD_NONBLOCK).map_err(AttachError::EventFd)?;
            vm.register_ioevent(&e, &IoEventAddress::Mmio(notify), q)
                .map_err(|source| AttachError::Ioeventfd {
                    addr: notify,
                    source,
                })?;
            evts.push(e);
        }
        let t = match saved {
            None => MmioTransport::new(dev, mem.clone(), irq_evt),
            Some((kind, state)) => {
                let args = MmioTransportArgs {
                    device: dev,
                    mem: mem.clone(),
                    irq: irq_evt,
                };
                let t = MmioTransport::restore(args, state)
                    .map_err(|source| AttachError::TransportRestore { kind, source })?;
                // Requests the guest queued before the snapshot and the
                // device had not taken yet are served as if just notified
                // (the notification itself was not saved).
                for e in &evts {
                    let _ = e.write(1);
                }
                t
            }
        };
        let t = Arc::new(Mutex::new(t));
        bus.insert(base, VIRTIO_MMIO_SIZE, t.clone());
        self.transports.push(t.clone());
        self.acpi.push(VirtioMmioInfo {
            // The window is below 4 GiB by construction.
            base: base as u32,
            len: VIRTIO_MMIO_SIZE as u32,
            gsi: irq,
        });
        tracing::debug!(base, irq, "virtio device attached");
        Ok((t, evts))
    }
}

/// The saved devices sorted by kind, checked against the config that will
/// rebuild them.
#[derive(Default)]
struct Saved<'a> {
    blocks: Vec<(&'a MmioTransportState, &'a BlockState)>,
    nets: Vec<(&'a MmioTransportState, &'a NetState)>,
    vsock: Option<(&'a MmioTransportState, &'a VsockState)>,
}

impl<'a> Saved<'a> {
    fn sort(states: &'a [VirtioDeviceState], cfg: &VmConfig) -> Result<Self, AttachError> {
        let mut s = Saved::default();
        let mut rank = 0;
        for st in states {
            // The MMIO windows follow attach order; any other order would
            // move a device under the guest's driver.
            let r = match st {
                VirtioDeviceState::Block { transport, device } => {
                    s.blocks.push((transport, device));
                    0
                }
                VirtioDeviceState::Net { transport, device } => {
                    s.nets.push((transport, device));
                    1
                }
                VirtioDeviceState::Vsock { transport, device } => {
                    if s.vsock.replace((transport, device)).is_some() {
                        return Err(AttachError::Mismatch("two vsock devices".into()));
                    }
                    2
                }
            };
            if r < rank {
                return Err(AttachError::Mismatch(format!(
                    "a {} device comes after a device attached later",
                    st.kind()
                )));
            }
            rank = r;
        }
        let (b, n, v) = (s.blocks.len(), s.nets.len(), usize::from(s.vsock.is_some()));
        let want = (
            cfg.disks.len(),
            cfg.nics.len(),
            usize::from(cfg.vsock.is_some()),
        );
        if (b, n, v) != want {
            return Err(AttachError::Mismatch(format!(
                "{b} disk(s), {n} NIC(s), {v} vsock saved; the config has {}, {}, {}",
                want.0, want.1, want.2
            )));
        }
        Ok(s)
    }
}

/// Creates and attaches every virtio device `cfg` asks for. With `saved`
/// (a restore or an incoming migration), each device is rebuilt from its
/// saved state on the backends `cfg` names (which may differ from the saved
/// ones: another tap, another vsock socket path), and every queue is served
/// once when the event loop starts.
pub fn attach_all(
    vm: &VmFd,
    mem: &GuestMemory,
    cfg: &VmConfig,
    saved: Option<&[VirtioDeviceState]>,
) -> Result<VirtioDevices, AttachError> {
    let saved = match saved {
        Some(s) => Some(Saved::sort(s, cfg)?),
        None => None,
    };
    let mut devs = VirtioDevices::default();
    let mut bus = MmioBus::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let st = saved.as_ref().and_then(|s| s.blocks.get(i));
        let b = match st {
            None => Block::new(&d.path, d.read_only, d.id.clone())?,
            Some((_, bs)) => {
                let bs = BlockState {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    id: d.id.clone(),
                    ..(*bs).clone()
                };
                Block::restore((), &bs).map_err(|source| AttachError::BlockRestore {
                    path: d.path.clone(),
                    source,
                })?
            }
        };
        let counters = b.counters();
        let ts = st.map(|(t, _)| ("block", *t));
        let (transport, evts) = devs.attach(&mut bus, vm, mem, Box::new(b), ts)?;
        devs.subscribers.push(Arc::new(Mutex::new(QueueEvents::new(
            transport.clone(),
            evts,
        ))));
        devs.blocks.push(BlockHandle {
            id: d.id.clone(),
            counters,
            transport,
        });
    }
    for (i, n) in cfg.nics.iter().enumerate() {
        let st = saved.as_ref().and_then(|s| s.nets.get(i));
        let tap = Tap::open(&n.tap)?;
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&tap);
        let dev = match st {
            None => Net::new(n.mac, n.network.clone(), n.tap.clone(), Box::new(tap)),
            Some((_, ns)) => {
                let ns = NetState {
                    mac: n.mac,
                    network: n.network.clone(),
                    tap: n.tap.clone(),
                    ..(*ns).clone()
                };
                Net::restore(
                    NetArgs {
                        tap: Some(Box::new(tap)),
                    },
                    &ns,
                )?
            }
        };
        let counters = dev.counters();
        let ts = st.map(|(t, _)| ("net", *t));
        let (transport, evts) = devs.attach(&mut bus, vm, mem, Box::new(dev), ts)?;
        devs.subscribers.push(Arc::new(Mutex::new(NetEvents::new(
            transport.clone(),
            evts,
            fd,
        ))));
        devs.nics.push(NicHandle {
            mac: n.mac,
            network: n.network.clone(),
            tap: n.tap.clone(),
            counters,
            transport,
        });
    }
    if let Some(v) = &cfg.vsock {
        let st = saved.as_ref().and_then(|s| s.vsock);
        let dev = match st {
            None => Vsock::new(v.cid, &v.socket)?,
            Some((_, vs)) => {
                let vs = VsockState {
                    cid: v.cid,
                    uds_path: v.socket.clone(),
                    ..vs.clone()
                };
                Vsock::restore((), &vs)?
            }
        };
        let tools = dev.tools();
        let listener = dev.listener_fd();
        let wake = std::os::unix::io::AsRawFd::as_raw_fd(tools.wake_fd());
        let ts = st.map(|(t, _)| ("vsock", t));
        let (transport, evts) = devs.attach(&mut bus, vm, mem, Box::new(dev), ts)?;
        devs.subscribers.push(Arc::new(Mutex::new(VsockEvents::new(
            transport.clone(),
            evts,
            listener,
            wake,
        ))));
        devs.vsock = Some(transport);
        devs.tools = Some(tools);
    }
    devs.bus = Arc::new(bus);
    Ok(devs)
}
