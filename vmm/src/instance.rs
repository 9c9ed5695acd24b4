//! Building one VM from its config, running it until it stops, and the
//! reboot-restart loop around that.
//!
//! Order of work, cheapest checks first so bad input fails before anything
//! is allocated: images readable and recognisable -> host has the memory ->
//! /dev/kvm usable and vCPU count within KVM's limit -> guest memory, VM,
//! ACPI, kernel -> devices -> vCPU threads -> event loop until a vCPU or
//! device asks to stop -> stop and join all vCPU threads.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::acpi::{self, AcpiError};
use crate::api::{self, ApiError, ApiServer};
use crate::boot::{self, BootError};
use crate::config::{self, ConfigError, ConsoleMode, OnReboot, VmConfig};
use crate::console::{self, ConsoleError, StdinInput, TerminalGuard};
use crate::control::{ControlError, ExitReason, ExitSignal};
use crate::cpu::gate::VcpuGate;
use crate::cpu::regs::EntryMode;
use crate::cpu::state::StateCaps;
use crate::cpu::vcpu::{vcpu_kick_signal, Vcpu, VcpuError, VcpuShared};
use crate::cpu::{self, CpuError};
use crate::devices::serial::{SerialArgs, SerialDevice, SerialError, COM1_IRQ};
use crate::devices::virtio::attach::{self, AttachError};
use crate::devices::PioBus;
use crate::machine::Machine;
use crate::memory::{self, MemoryError};
use crate::persist::Persist;
use crate::snapshot::{self, RestoreOverrides, SnapshotError, VmState};
use crate::vm::{self, Vm, VmError};
use crate::watchdog;

/// Everything that can stop the VMM before or while running a guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Kernel/initrd problems.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Guest memory problems.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM problems.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// CPUID problems.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// vCPU set-up problems.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// ACPI table problems.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Console problems.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Exit signalling problems.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Control API problems.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Snapshot problems.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Serial device restore problems.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// Virtio device problems.
    #[error(transparent)]
    Virtio(#[from] AttachError),
    /// Disk lease problems.
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
    /// Event loop problems.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// The serial interrupt could not be wired.
    #[error("cannot set up the serial interrupt: {0}")]
    SerialIrq(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start vCPU thread {id}: {source}")]
    Thread {
        /// vCPU index.
        id: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Runs the VM described by `cfg` until it stops for good (power-off,
/// crash, error, or a reboot when the policy is `exit`). With
/// `on_reboot = restart`, a reboot rebuilds the VM from scratch (memory,
/// kernel, devices) in this process and boots again; a reset requested
/// through the control API (`POST /vm/reset`) does the same whatever the
/// policy. Disks and NICs come from the same config, so the guest keeps its
/// disk contents and MAC addresses.
pub fn run(cfg: &VmConfig) -> Result<ExitReason, Error> {
    run_with(cfg, &RunOptions::default())
}

/// [`run`] with options (control API socket, watchdog threshold).
pub fn run_with(cfg: &VmConfig, opts: &RunOptions) -> Result<ExitReason, Error> {
    let span = tracing::info_span!("vm", vm = %cfg.name);
    let _e = span.enter();
    preflight(cfg)?;
    let kvm = vm::open_kvm()?;
    let max = vm::kvm_max_vcpus(&kvm).min(config::MAX_VCPUS_SUPPORTED);
    config::validate_vcpus(cfg.vcpus, max)?;
    install_kick_handler()?;
    if let Some(spec) = opts.lease.as_ref().filter(|s| s.handoff) {
        return Err(crate::lease::LeaseError::HandoffOnly(spec.file.clone()).into());
    }
    // Declared before the terminal guard so it is dropped (released) last.
    let mut lease = start_lease(opts)?;
    let _terminal = match cfg.console {
        ConsoleMode::Stdio => TerminalGuard::enter()?,
        _ => None,
    };
    let mut boots = 0u32;
    loop {
        boots += 1;
        tracing::info!(stage = "boot", boots, "starting guest");
        let reason = run_once(&kvm, cfg, opts, None, &mut lease)?;
        match (&reason, cfg.on_reboot) {
            (ExitReason::Reboot, OnReboot::Restart) => {
                tracing::info!(stage = "reboot", "guest rebooted; restarting it");
            }
            (ExitReason::Reset { reason }, _) => {
                tracing::warn!(stage = "reset", %reason, boots, "guest reset from the host; booting it again");
            }
            _ => return Ok(reason),
        }
    }
}

/// Checks that need neither KVM nor memory: images readable and of a known
/// kind, host memory sufficient.
pub fn preflight(cfg: &VmConfig) -> Result<(), Error> {
    boot::check_images(cfg)?;
    memory::check_host_memory_now(cfg.memory_bytes)?;
    Ok(())
}

/// Takes over the lease the agent acquired, once the VM is known to be
/// buildable; the guard renews it until the VM ends. Nothing to start if
/// this process already holds it (an incoming migration renews it from
/// the moment it listens) or if it is a migration's handoff (taken over in
/// [`run_once`] once the guest's state is restored, before its vCPUs run).
fn start_lease(opts: &RunOptions) -> Result<Option<crate::lease::LeaseGuard>, Error> {
    match &opts.lease {
        Some(_) if crate::lease::is_active() => Ok(None),
        Some(spec) if spec.handoff => Ok(None),
        Some(spec) => Ok(Some(crate::lease::start(spec.clone())?)),
        None => Ok(None),
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), Error> {
    register_signal_handler(vcpu_kick_signal(), kick_handler).map_err(Error::Signal)
}

/// Wakes the event loop when a stop is requested.
struct ExitWatcher {
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            // The main loop polls with a timeout, so this only costs latency.
            tracing::warn!(error = ?e, "cannot watch the exit eventfd");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Options of a run that are not part of the VM's config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Serve the control API on this unix socket.
    pub api_socket: Option<PathBuf>,
    /// Watchdog stall threshold.
    pub watchdog_threshold: Duration,
    /// Live migration for the API's `/vm/migrate` routes.
    pub migration: Option<crate::migration_hook::HookRef>,
    /// Told once the vCPU threads run (an incoming migration acknowledges
    /// the source only then).
    pub on_running: Option<std::sync::mpsc::Sender<()>>,
    /// Hold this disk lease while the VM runs (HA): renew it, stop when it
    /// is lost or cannot be renewed in time, release it at the end.
    pub lease: Option<crate::lease::LeaseSpec>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            api_socket: None,
            watchdog_threshold: watchdog::DEFAULT_THRESHOLD,
            migration: None,
            on_running: None,
            lease: None,
        }
    }
}

/// Restores the snapshot in `dir` and runs it until it stops. A later
/// guest reboot with `on_reboot = restart` boots the saved kernel afresh.
pub fn run_restored(
    dir: &Path,
    overrides: RestoreOverrides,
    opts: &RunOptions,
) -> Result<ExitReason, Error> {
    if let Some(spec) = opts.lease.as_ref().filter(|s| s.handoff) {
        return Err(crate::lease::LeaseError::HandoffOnly(spec.file.clone()).into());
    }
    let state = snapshot::load(dir)?;
    run_from(state, RestoreMem::File(dir.to_path_buf()), overrides, opts)
}

/// Restores `state` into `prepared` (a VM built over memory that already
/// holds the guest's RAM: a live migration's target filled it), and runs
/// the VM until it stops.
pub fn run_incoming(
    state: VmState,
    prepared: vm::PreparedVm,
    overrides: RestoreOverrides,
    opts: &RunOptions,
) -> Result<ExitReason, Error> {
    run_from(state, RestoreMem::Filled(prepared), overrides, opts)
}

fn run_from(
    state: VmState,
    mem: RestoreMem,
    overrides: RestoreOverrides,
    opts: &RunOptions,
) -> Result<ExitReason, Error> {
    let cfg = state.config.to_config(&overrides)?;
    let span = tracing::info_span!("vm", vm = %cfg.name);
    let _e = span.enter();
    if let RestoreMem::File(_) = mem {
        memory::check_host_memory_now(cfg.memory_bytes)?;
    }
    let t0 = std::time::Instant::now();
    let kvm = vm::open_kvm()?;
    tracing::debug!(
        us = t0.elapsed().as_micros() as u64,
        "timing: /dev/kvm opened"
    );
    install_kick_handler()?;
    let mut lease = start_lease(opts)?;
    let _terminal = match cfg.console {
        ConsoleMode::Stdio => TerminalGuard::enter()?,
        _ => None,
    };
    match &mem {
        RestoreMem::File(dir) => {
            tracing::info!(stage = "restore", dir = %dir.display(), "restoring guest")
        }
        RestoreMem::Filled(_) => tracing::info!(stage = "restore", "starting incoming guest"),
    }
    let mut restore = Some(Restore { state, mem });
    loop {
        let reason = run_once(&kvm, &cfg, opts, restore.take(), &mut lease)?;
        match (&reason, cfg.on_reboot) {
            (ExitReason::Reboot, OnReboot::Restart) => {
                preflight(&cfg)?;
                tracing::info!(stage = "reboot", "guest rebooted; booting it afresh");
            }
            (ExitReason::Reset { reason }, _) => {
                preflight(&cfg)?;
                tracing::warn!(stage = "reset", %reason, "guest reset from the host; booting it afresh");
            }
            _ => return Ok(reason),
        }
    }
}

/// Where a restored VM's RAM comes from.
enum RestoreMem {
    /// A snapshot directory's memory file.
    File(PathBuf),
    /// Memory already filled, its VM already built (migration target).
    Filled(vm::PreparedVm),
}

/// A VM to rebuild from saved state.
struct Restore {
    state: VmState,
    mem: RestoreMem,
}

/// How a VM starts: a fresh boot at the kernel's entry, or from saved state.
#[derive(Clone, Copy)]
enum Start<'a> {
    Boot(EntryMode),
    Restore(&'a VmState),
}

fn run_once(
    kvm: &kvm_ioctls::Kvm,
    cfg: &VmConfig,
    opts: &RunOptions,
    restore: Option<Restore>,
    lease: &mut Option<crate::lease::LeaseGuard>,
) -> Result<ExitReason, Error> {
    // Bind first: a socket in use is a user error worth failing on before
    // any memory is allocated.
    let t0 = std::time::Instant::now();
    let api = match &opts.api_socket {
        Some(p) => Some(ApiServer::bind(p)?),
        None => None,
    };
    let (state, restored_from) = match restore {
        Some(Restore { state, mem }) => (Some(state), Some(mem)),
        None => (None, None),
    };
    let (vm, mem, restored_from) = match restored_from {
        Some(RestoreMem::Filled(p)) => (p.vm, p.mem, None),
        other => {
            let mem = memory::create_guest_memory(cfg.memory_bytes)?;
            (Vm::new(kvm, &mem)?, mem, other)
        }
    };
    tracing::debug!(us = t0.elapsed().as_micros() as u64, "timing: VM created");
    // Virtio devices come from the config; a restored VM's are rebuilt from
    // their saved state on the backends the config names (queues are
    // checked against guest memory's layout only, so RAM's contents may
    // come later).
    let saved_virtio = state.as_ref().map(|s| s.devices.virtio.as_slice());
    let mut virtio = attach::attach_all(vm.fd(), &mem, cfg, saved_virtio)?;
    tracing::debug!(
        us = t0.elapsed().as_micros() as u64,
        "timing: devices attached"
    );
    // Restore order at VM level: RAM, then the VM-wide KVM state (clock,
    // PIT, PIC/IOAPIC) before any vCPU exists, then each vCPU's state as it
    // is created (see cpu::state::restore for the per-vCPU order).
    let start = match &state {
        Some(state) => {
            if let Some(RestoreMem::File(dir)) = &restored_from {
                snapshot::memory::restore(&mem, &state.memory, &dir.join(snapshot::MEMORY_FILE))?;
            }
            vm.restore_state(&state.vm)?;
            Start::Restore(state)
        }
        None => {
            // vcpus <= 254 was validated, so this fits.
            let rsdp = acpi::write(&mem, cfg.vcpus as u8, &virtio.acpi)?;
            Start::Boot(boot::load(cfg, &mem, rsdp)?.entry)
        }
    };

    tracing::debug!(
        us = t0.elapsed().as_micros() as u64,
        "timing: VM state restored"
    );
    let exit = Arc::new(ExitSignal::new()?);
    let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::SerialIrq)?;
    vm.fd()
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| Error::SerialIrq(std::io::Error::from_raw_os_error(e.errno())))?;
    let out = console::output_for(&cfg.console)?;
    let serial = match start {
        Start::Restore(state) => {
            SerialDevice::restore(SerialArgs { irq, out }, &state.devices.serial)?
        }
        Start::Boot(_) => SerialDevice::new(irq, out),
    };
    let serial = Arc::new(Mutex::new(serial));
    let bus = Arc::new(PioBus::new(serial.clone(), exit.clone()));

    let mut events: EventManager<Subscriber> = EventManager::new().map_err(Error::EventLoop)?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })));
    if cfg.console == ConsoleMode::Stdio {
        events.add_subscriber(Arc::new(Mutex::new(StdinInput::new(serial.clone()))));
    }
    for sub in std::mem::take(&mut virtio.subscribers) {
        events.add_subscriber(sub);
    }

    let gate = Arc::new(VcpuGate::new(cfg.vcpus));
    let caps = Arc::new(StateCaps::probe(kvm));
    let shared = || VcpuShared {
        bus: bus.clone(),
        mmio: virtio.bus.clone(),
        exit: exit.clone(),
        gate: gate.clone(),
        caps: caps.clone(),
    };
    let mut vcpus = Vec::new();
    match start {
        Start::Restore(state) => {
            for s in &state.vcpus {
                vcpus.push(Vcpu::restore(vm.fd(), s, shared())?);
            }
        }
        Start::Boot(entry) => {
            let supported = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(CpuError::SupportedCpuid)?;
            for id in 0..cfg.vcpus {
                let cpuid = cpu::vcpu_cpuid(&supported, cfg.cpu_template, id, cfg.vcpus)?;
                vcpus.push(Vcpu::new(vm.fd(), id, &cpuid, &mem, entry, shared())?);
            }
        }
    }
    tracing::debug!(us = t0.elapsed().as_micros() as u64, "timing: vCPUs ready");
    let vcpu_fds: Vec<Arc<OwnedFd>> = vcpus
        .iter()
        .filter_map(|v| v.dup_fd().ok())
        .map(Arc::new)
        .collect();

    let restored_from = match restored_from {
        Some(RestoreMem::File(dir)) => Some(dir),
        _ => None,
    };
    let mut machine = Machine::new(
        cfg.clone(),
        vm,
        mem,
        serial,
        gate.clone(),
        exit.clone(),
        caps,
        restored_from,
    );
    machine.migration = opts.migration.clone();
    let machine = Arc::new(machine);
    crate::devices::virtio::hooks::register(&machine, &virtio);
    // A migration target's lease: the source handed over generation G
    // (`spec.generation`); claim G+1 now that the guest's state is
    // restored, before any vCPU runs. Lost: the guest never runs here.
    if let Some(spec) = opts.lease.as_ref().filter(|s| s.handoff) {
        if lease.is_none() && !crate::lease::is_active() {
            *lease = Some(crate::lease::take_over(spec, spec.generation)?);
        }
    }
    if opts.lease.is_some() {
        crate::lease::set_hook(Some(Arc::new(crate::machine::LeaseHook(Arc::downgrade(
            &machine,
        )))));
    }

    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for (id, vcpu) in (0u32..).zip(vcpus) {
        let name = cfg.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.run(&name));
        match spawned {
            Ok(t) => threads.push(t),
            Err(source) => {
                exit.request(ExitReason::VmmError(format!("cannot start vCPU {id}")));
                stop_vcpus(threads);
                return Err(Error::Thread { id, source });
            }
        }
    }
    gate.set_threads(threads);
    tracing::info!(
        stage = "running",
        vcpus = cfg.vcpus,
        us = t0.elapsed().as_micros() as u64,
        "guest running"
    );
    if let Some(tx) = &opts.on_running {
        let _ = tx.send(());
    }

    let api_stop = Arc::new(AtomicBool::new(false));
    let api_thread = match api {
        Some(server) => match api::spawn(server, machine.clone(), api_stop.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                exit.request(ExitReason::VmmError(format!(
                    "cannot start the API thread: {e}"
                )));
                None
            }
        },
        None => None,
    };
    let wd = {
        let m = machine.clone();
        let threshold = opts.watchdog_threshold;
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watchdog::run(m, vcpu_fds, threshold))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the watchdog; running without"))
            .ok()
    };

    while !exit.should_stop() {
        machine.loop_tick();
        if let Err(e) = events.run_with_timeout(500) {
            exit.request(ExitReason::VmmError(format!("event loop failed: {e:?}")));
        }
    }
    if opts.lease.is_some() {
        crate::lease::set_hook(None);
    }
    gate.stop();
    stop_vcpus(gate.take_threads());
    api_stop.store(true, Ordering::SeqCst);
    for t in [api_thread, wd].into_iter().flatten() {
        let _ = t.join();
    }
    // Dropping the machine drops the VM fd before guest memory (field
    // order): KVM must not see memory unmapped under a live slot.
    drop(machine);
    Ok(exit
        .reason()
        .unwrap_or_else(|| ExitReason::VmmError("VM stopped without a reason".to_string())))
}

/// Kicks every vCPU thread out of KVM_RUN until it has noticed the stop
/// flag. A kick can land just before a thread enters KVM_RUN and be lost, so
/// kicks repeat until the thread finishes.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        let name = t.thread().name().unwrap_or("vcpu").to_string();
        while !t.is_finished() {
            if let Err(e) = t.kill(vcpu_kick_signal()) {
                tracing::debug!(thread = %name, error = %e, "kick failed");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.join().is_err() {
            tracing::error!(thread = %name, "vCPU thread panicked");
        }
    }
}
