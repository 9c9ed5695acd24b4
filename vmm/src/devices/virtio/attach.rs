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

use super::block::{Block, BlockCounters, BlockError};
use super::event_handler::QueueEvents;
use super::net::event_handler::NetEvents;
use super::net::tap::Tap;
use super::net::{Net, NetCounters, NetError};
use super::transport::{reg, MmioTransport};
use super::vsock::event_handler::VsockEvents;
use super::vsock::{ToolsStatus, Vsock, VsockError};
use super::VirtioDevice;
use crate::acpi::VirtioMmioInfo;
use crate::config::VmConfig;
use crate::devices::mmio::{
    MmioBus, VIRTIO_FIRST_IRQ, VIRTIO_LAST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::memory::GuestMemory;

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
        let t = Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone(), irq_evt)));
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

/// Creates and attaches every virtio device `cfg` asks for.
pub fn attach_all(
    vm: &VmFd,
    mem: &GuestMemory,
    cfg: &VmConfig,
) -> Result<VirtioDevices, AttachError> {
    let mut devs = VirtioDevices::default();
    let mut bus = MmioBus::new();
    for d in &cfg.disks {
        let b = Block::new(&d.path, d.read_only, d.id.clone())?;
        let counters = b.counters();
        let (transport, evts) = devs.attach(&mut bus, vm, mem, Box::new(b))?;
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
    for n in &cfg.nics {
        let tap = Tap::open(&n.tap)?;
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&tap);
        let dev = Net::new(n.mac, n.network.clone(), n.tap.clone(), Box::new(tap));
        let counters = dev.counters();
        let (transport, evts) = devs.attach(&mut bus, vm, mem, Box::new(dev))?;
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
        let dev = Vsock::new(v.cid, &v.socket)?;
        let tools = dev.tools();
        let listener = dev.listener_fd();
        let wake = std::os::unix::io::AsRawFd::as_raw_fd(tools.wake_fd());
        let (transport, evts) = devs.attach(&mut bus, vm, mem, Box::new(dev))?;
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
