//! One vCPU: configuration before the first run, and the run loop that turns
//! KVM exits into device accesses or VM exit reasons. Each vCPU runs on its
//! own thread; the main thread stops them by setting the shared
//! [`ExitSignal`] and kicking each thread with [`vcpu_kick_signal`], which
//! makes a blocked KVM_RUN return EINTR.

use std::sync::Arc;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::gate::VcpuGate;
use super::regs::{self, EntryMode, RegsError};
use super::state::{self, StateCaps, StateError, VcpuState};
use crate::control::{ExitReason, ExitSignal};
use crate::devices::mmio::MmioBus;
use crate::devices::PioBus;
use crate::memory::GuestMemory;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {id}: KVM {op} failed: {source}")]
    Ioctl {
        /// vCPU index.
        id: u32,
        /// Which operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Restoring saved state failed.
    #[error(transparent)]
    Restore(#[from] StateError),
    /// Register set-up failed.
    #[error("vCPU {id}: {source}")]
    Regs {
        /// vCPU index.
        id: u32,
        /// What failed.
        #[source]
        source: RegsError,
    },
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn vcpu_kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// A configured vCPU, ready to be moved to its thread.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    exit: Arc<ExitSignal>,
    gate: Arc<VcpuGate>,
    caps: Arc<StateCaps>,
}

/// What a vCPU shares with the rest of the VMM.
pub struct VcpuShared {
    /// Port I/O routing.
    pub bus: Arc<PioBus>,
    /// MMIO routing (virtio-mmio devices).
    pub mmio: Arc<MmioBus>,
    /// Stop requests.
    pub exit: Arc<ExitSignal>,
    /// Pause/save requests and progress.
    pub gate: Arc<VcpuGate>,
    /// What state KVM can save.
    pub caps: Arc<StateCaps>,
}

/// What the run loop decided after one exit, once the borrow of the kvm_run
/// area has ended.
enum Next {
    Continue,
    Stop(ExitReason),
}

impl Vcpu {
    /// Creates vCPU `id` and sets its CPUID, MSRs, FPU and LAPIC; the boot
    /// vCPU (id 0) also gets the entry registers. Application processors
    /// wait for INIT/SIPI in the in-kernel LAPIC, which sets their state.
    // One argument per thing a vCPU needs; grouping them would only move the
    // list into a struct built for this call.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &VmFd,
        id: u32,
        cpuid: &CpuId,
        mem: &GuestMemory,
        entry: EntryMode,
        shared: VcpuShared,
    ) -> Result<Self, VcpuError> {
        let ioctl = |op| move |source| VcpuError::Ioctl { id, op, source };
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let regs_err = |source| VcpuError::Regs { id, source };
        regs::setup_msrs(&fd).map_err(regs_err)?;
        regs::setup_fpu(&fd).map_err(regs_err)?;
        regs::setup_lapic(&fd).map_err(regs_err)?;
        if id == 0 {
            regs::setup_boot_cpu(&fd, mem, entry).map_err(regs_err)?;
        }
        Ok(Self::with(id, fd, shared))
    }

    /// Creates vCPU `state.id` and loads saved state into it (see
    /// [`state::restore`] for the order).
    pub fn restore(vm: &VmFd, state: &VcpuState, shared: VcpuShared) -> Result<Self, VcpuError> {
        let id = state.id;
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Ioctl {
                id,
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        state::restore(&fd, state)?;
        Ok(Self::with(id, fd, shared))
    }

    /// A duplicate of the vCPU fd (for the watchdog's register dump).
    pub fn dup_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the raw fd belongs to `self.fd`, which is open for the
        // duration of this borrow; the clone gets its own descriptor.
        let b = unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) };
        b.try_clone_to_owned()
    }

    fn with(id: u32, fd: VcpuFd, s: VcpuShared) -> Self {
        Self {
            id,
            fd,
            bus: s.bus,
            mmio: s.mmio,
            exit: s.exit,
            gate: s.gate,
            caps: s.caps,
        }
    }

    /// Runs until the VM is asked to stop. Never panics on guest behaviour:
    /// every exit is either handled, ignored with a log, or turned into an
    /// [`ExitReason`].
    pub fn run(mut self, vm_name: &str) {
        let span = tracing::info_span!("vcpu", vm = vm_name, vcpu = self.id);
        let _e = span.enter();
        tracing::debug!(stage = "run", "vCPU thread started");
        if self.id == 0 {
            // CLOCK_MONOTONIC is what a benchmark harness can read too, so it
            // can measure process start to first KVM_RUN from outside.
            tracing::info!(
                stage = "first-run",
                monotonic_ns = monotonic_ns(),
                "boot vCPU entering KVM_RUN"
            );
        }
        let mut last_throttle = std::time::Instant::now();
        while !self.exit.should_stop() {
            if self.gate.pause_requested() {
                let (fd, id, caps) = (&self.fd, self.id, &self.caps);
                self.gate
                    .park(id, || state::save(fd, id, caps).map_err(|e| e.to_string()));
                continue;
            }
            let next = self.run_once();
            self.gate.bump(self.id);
            // At most one throttle sleep per slice of running, however
            // often the guest exits.
            if self.gate.throttle() > 0 && last_throttle.elapsed() >= super::gate::THROTTLE_SLICE {
                self.gate.throttle_sleep();
                last_throttle = std::time::Instant::now();
            }
            match next {
                Next::Continue => {}
                Next::Stop(reason) => {
                    self.exit.request(reason);
                    break;
                }
            }
        }
        tracing::debug!(stage = "stop", "vCPU thread stopped");
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.bus.read(id, port, data);
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.bus.write(id, port, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(id, addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(id, addr, data);
                Next::Continue
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel irqchip; harmless otherwise.
                tracing::debug!("HLT exit");
                Next::Continue
            }
            Ok(VcpuExit::Shutdown) => self.crash("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => self.crash(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            )),
            Ok(VcpuExit::InternalError) => {
                let (sub, insn) = self.internal_error_info();
                let insn = insn
                    .map(|b| format!(" at instruction bytes [{b}]"))
                    .unwrap_or_default();
                self.crash(format!(
                    "KVM_EXIT_INTERNAL_ERROR suberror {sub} ({}){insn}: the host could not run a \
                     guest instruction",
                    suberror_name(sub)
                ))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(ExitReason::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(ExitReason::Reboot),
                other => self.crash(format!("KVM system event {other}")),
            },
            Ok(other) => {
                tracing::debug!(exit = ?other, "unhandled vCPU exit ignored");
                Next::Continue
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Stop(ExitReason::VmmError(format!(
                "vCPU {id}: KVM_RUN failed: {e}"
            ))),
        }
    }

    /// The internal error's suberror and, for emulation failures where KVM
    /// reports them, the bytes of the instruction it could not emulate (the
    /// quickest way to see which instruction a guest must avoid).
    fn internal_error_info(&mut self) -> (u32, Option<String>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills the `internal` member of the union (suberror first).
        let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
        if sub != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return (sub, None);
        }
        // SAFETY: for KVM_INTERNAL_ERROR_EMULATION KVM fills the
        // `emulation_failure` layout of the same union; the instruction
        // bytes are valid only when the flag says so, which we check.
        let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
        if ef.flags & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            == 0
        {
            return (sub, None);
        }
        // SAFETY: the union has a single member.
        let bytes = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
        let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
        let hex: Vec<String> = bytes.insn_bytes[..n]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (sub, Some(hex.join(" ")))
    }

    fn crash(&self, reason: String) -> Next {
        let registers = describe_registers(&self.fd);
        tracing::error!(vcpu = self.id, %reason, %registers, "guest crashed");
        Next::Stop(ExitReason::Crash {
            vcpu: self.id,
            reason,
            registers,
        })
    }
}

/// The host's CLOCK_MONOTONIC in nanoseconds.
fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, owned `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap_or(0)
}

fn suberror_name(sub: u32) -> &'static str {
    match sub {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        _ => "other",
    }
}

/// One line with the registers that tell where a guest died.
pub fn describe_registers(fd: &VcpuFd) -> String {
    let regs = match fd.get_regs() {
        Ok(r) => format!(
            "rip={:#x} rsp={:#x} rbp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
            r.rip, r.rsp, r.rbp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
        ),
        Err(e) => format!("(regs unavailable: {e})"),
    };
    let sregs = match fd.get_sregs() {
        Ok(s) => format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(base={:#x} l={} db={}) ss={:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.ss.selector
        ),
        Err(e) => format!("(sregs unavailable: {e})"),
    };
    format!("{regs} {sregs}")
}
