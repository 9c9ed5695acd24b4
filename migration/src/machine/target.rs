//! The target side over a real VMM: [`IncomingHost`] answers pre-checks
//! and creates [`IncomingShell`]s (guest memory reserved, pages written as
//! they arrive), which start the received VM with `vmm::run_incoming` on
//! a thread and acknowledge only once its vCPUs run. [`run_incoming`] is
//! the library call behind `vigil run --incoming` (and, later, the HA
//! agent).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestMemory;
use vmm::snapshot::{RestoreOverrides, VmState};
use vmm::{ExitReason, RunOptions};

use crate::precheck::{self, HostFacts, Priority, VmFacts};
use crate::progress::CancelToken;
use crate::protocol::PAGE_SIZE;
use crate::target::{receive, TargetOptions};
use crate::vm::{IncomingVm, Region, TargetHost, VmError};

/// What `vigil run --incoming` is given.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// `ADDR:PORT` to listen on.
    pub listen: String,
    /// Protocol settings.
    pub target: TargetOptions,
    /// Console and name for the received VM.
    pub overrides: RestoreOverrides,
    /// API socket and the rest, for the received VM.
    pub run: RunOptions,
    /// Networks this host offers (`network=` names of NICs).
    pub networks: BTreeSet<String>,
    /// Offer guests at most the CPU features of this template (`--cpu-limit`,
    /// like an EVC baseline): a guest started with more is refused.
    pub cpu_limit: Option<vmm::config::CpuTemplateName>,
    /// Require TLS 1.3 with a client certificate from the cluster CA.
    pub tls: Option<crate::transport::TlsFiles>,
}

/// Why an incoming migration ended without a running guest, or how the
/// guest's run failed.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The listening socket.
    #[error("cannot listen for a migration on {addr}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed (the guest never ran here).
    #[error("incoming migration failed; the guest was not started here")]
    Receive(#[source] crate::target::Error),
    /// The received guest's VMM failed.
    #[error(transparent)]
    Run(#[from] vmm::Error),
    /// TLS set-up or the peer's authentication failed (the peer got
    /// nothing).
    #[error("TLS on the migration port")]
    Tls(#[source] crate::transport::TlsError),
}

/// This host, as the target's pre-checks and VM creation see it.
pub struct IncomingHost {
    opts: IncomingOptions,
    /// Guest memory committed by a `high` priority pre-check, for
    /// [`TargetHost::create_vm`].
    reserved: Mutex<Option<GuestMemory>>,
}

impl IncomingHost {
    /// A host that creates VMs with `opts`.
    pub fn new(opts: IncomingOptions) -> Self {
        Self {
            opts,
            reserved: Mutex::new(None),
        }
    }

    /// `high` priority: allocate and fault in all of guest memory now.
    fn commit(&self, vm: &VmFacts) -> Result<(), String> {
        let mem = vmm::memory::create_guest_memory(vm.memory_mib << 20)
            .map_err(|e| crate::error_chain(&e))?;
        super::reserve::commit(&mem).map_err(|e| format!("faulting it in: {e}"))?;
        tracing::info!(vm = %vm.name, mib = vm.memory_mib, "guest memory committed (priority high)");
        *self.reserved.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }
}

/// The CPU features this host offers: KVM's supported CPUID, through the
/// `limit` template's masks if one is set.
fn host_cpu_features(limit: Option<vmm::config::CpuTemplateName>) -> BTreeSet<String> {
    vmm::vm::open_kvm()
        .ok()
        .and_then(|kvm| {
            kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .ok()
        })
        .map(|c| match limit {
            None => super::cpu_features(&c),
            Some(t) => {
                let mut entries = c.as_slice().to_vec();
                vmm::cpu::templates::apply(&mut entries, vmm::cpu::templates::template(t));
                kvm_bindings::CpuId::from_entries(&entries)
                    .map(|c| super::cpu_features(&c))
                    .unwrap_or_default()
            }
        })
        .unwrap_or_default()
}

/// A template's name as the CLI and config spell it.
fn template_name(t: vmm::config::CpuTemplateName) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl TargetHost for IncomingHost {
    type Vm = IncomingShell;

    fn host_facts(&self, vm: &VmFacts) -> HostFacts {
        let room = super::reserve::reservable();
        let mut facts = precheck::host_facts_for(
            &self.opts.target.host,
            host_cpu_features(self.opts.cpu_limit),
            room.mib,
            self.opts.networks.clone(),
            vm,
        );
        facts.memory_detail = room.detail;
        facts.lease = self.opts.run.lease.as_ref().map(|l| precheck::HostLease {
            record: precheck::LeaseFacts::of(&l.file, 0),
            handoff: l.handoff,
        });
        facts.cpu_limit = self.opts.cpu_limit.map(|t| {
            format!(
                "limited to the {} CPU template by --cpu-limit",
                template_name(t)
            )
        });
        // Commit only what the figure says fits (past a cgroup limit the
        // kernel kills rather than failing the fault), and only for a VM
        // no other check refuses.
        if vm.priority == Priority::High && precheck::check_all(vm, &facts).is_empty() {
            facts.committed = Some(self.commit(vm));
        }
        facts
    }

    fn create_vm(&mut self, vm: &VmFacts, layout: &[Region]) -> Result<IncomingShell, VmError> {
        let bytes = vm.memory_mib << 20;
        let ours: Vec<Region> = vmm::memory::ram_ranges(bytes)
            .into_iter()
            .map(|(a, s)| Region { gpa: a.0, size: s })
            .collect();
        if ours != layout {
            return Err(format!(
                "the source's memory layout {layout:?} is not the one this vigil builds for \
                 {} MiB ({ours:?})",
                vm.memory_mib
            )
            .into());
        }
        let reserved = self
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let committed = reserved.is_some();
        let mem = match reserved {
            Some(m) => m,
            None => vmm::memory::create_guest_memory(bytes)?,
        };
        // The KVM VM (with its memory slots and interrupt controllers) is
        // built on a helper thread while the pages arrive, so that the
        // switchover only applies state.
        let for_vm = mem.clone();
        let prepared = std::thread::Builder::new()
            .name("prepare-vm".into())
            .spawn(move || vmm::vm::PreparedVm::new(&for_vm))?;
        Ok(IncomingShell {
            prepared: Some(prepared),
            mem: Some(mem),
            committed,
            state: None,
            overrides: self.opts.overrides.clone(),
            run: self.opts.run.clone(),
            thread: None,
        })
    }
}

/// A VM being received: its memory, then its state, then a thread running
/// it. Dropped before [`IncomingVm::start`], it frees its memory.
pub struct IncomingShell {
    /// The VM being built (declared before `mem`: a VM is dropped before
    /// the memory it maps; [`vmm::vm::PreparedVm`] holds its own handle to
    /// the same memory too).
    prepared: Option<JoinHandle<Result<vmm::vm::PreparedVm, vmm::vm::VmError>>>,
    mem: Option<GuestMemory>,
    /// The memory was committed ahead (`high` priority): zero pages are
    /// written, not discarded, so it stays committed.
    committed: bool,
    state: Option<VmState>,
    overrides: RestoreOverrides,
    run: RunOptions,
    thread: Option<JoinHandle<Result<ExitReason, vmm::Error>>>,
}

impl IncomingShell {
    fn mem(&self) -> Result<&GuestMemory, VmError> {
        self.mem
            .as_ref()
            .ok_or_else(|| "the VM has already been started".into())
    }

    /// Waits for the started guest's VMM to stop and returns why.
    pub fn wait(mut self) -> Result<ExitReason, IncomingError> {
        match self.thread.take() {
            Some(t) => match t.join() {
                Ok(r) => Ok(r?),
                Err(_) => Ok(ExitReason::VmmError("the VM thread panicked".into())),
            },
            None => Ok(ExitReason::VmmError("the VM was never started".into())),
        }
    }
}

impl IncomingVm for IncomingShell {
    fn write_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.mem()?.write_slice(data, GuestAddress(gpa))?;
        Ok(())
    }

    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), VmError> {
        let len = u64::from(pages) * PAGE_SIZE as u64;
        if self.committed {
            static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
            for p in 0..u64::from(pages) {
                self.mem()?
                    .write_slice(&ZERO, GuestAddress(gpa + p * PAGE_SIZE as u64))?;
            }
            return Ok(());
        }
        vmm::memory::discard_range(self.mem()?, gpa, len)?;
        Ok(())
    }

    /// The pages of the mapping itself: the stream is read straight into
    /// them. The guest has not run (its vCPUs start in [`start`]) and the
    /// VMM's devices do not exist yet, so nothing else touches this memory
    /// while the slice lives.
    fn pages_mut(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        use vm_memory::bitmap::Bitmap as _;
        use vm_memory::GuestMemoryBackend as _;
        let mem = self.mem.as_ref()?;
        // Inside one region, or `None` (then the bounds-checked
        // `write_pages` reports the error).
        let slice = mem.get_slice(GuestAddress(gpa), len).ok()?;
        // As `write_slice` would: the VMM's own dirty bitmap sees the write.
        slice.bitmap().mark_dirty(0, len);
        let ptr = slice.ptr_guard_mut().as_ptr();
        // SAFETY: `get_slice` checked that [gpa, gpa + len) lies inside one
        // mapped region of `mem`, which `self` owns and keeps mapped for
        // longer than the returned borrow of `self`; no vCPU has run and no
        // device exists, so no other reference to these bytes is in use
        // while the `&mut self` borrow lasts.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }

    /// A fresh anonymous mapping (`create_vm`) reads as zero.
    fn fresh_memory_is_zero(&self) -> bool {
        true
    }

    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.mem()?.read_slice(buf, GuestAddress(gpa))?;
        Ok(())
    }

    /// The claim happens in `vmm::run_incoming` once the guest's state is
    /// restored, before its vCPUs run: the spec learns the generation the
    /// source held.
    fn take_lease(&mut self, lease: &crate::vm::LeaseHandoff) -> Result<(), VmError> {
        match self.run.lease.as_mut() {
            Some(spec) if spec.handoff => {
                tracing::info!(lease = %spec.file.display(), from = %lease.owner,
                    generation = lease.generation, "lease handed over; claiming the next generation");
                spec.generation = lease.generation;
                Ok(())
            }
            _ => Err("this target was not started with a handoff lease spec".into()),
        }
    }

    fn restore_state(&mut self, blob: &[u8]) -> Result<(), VmError> {
        let state = VmState::from_slice(blob, Path::new("<migration stream>"))?;
        let total: u64 = state.memory.iter().map(|r| r.size).sum();
        let received: u64 = {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            self.mem()?.iter().map(|r| r.len()).sum()
        };
        if total != received {
            return Err(format!(
                "the state describes {total} bytes of RAM, {received} were received"
            )
            .into());
        }
        self.state = Some(state);
        Ok(())
    }

    fn start(&mut self) -> Result<(), VmError> {
        let (Some(mem), Some(state), Some(prepared)) =
            (self.mem.take(), self.state.take(), self.prepared.take())
        else {
            return Err("start before memory and state arrived".into());
        };
        let t0 = std::time::Instant::now();
        let prepared = match prepared.join() {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(Box::new(e)),
            Err(_) => return Err("the thread building the VM panicked".into()),
        };
        // The prepared VM holds the same mapping.
        drop(mem);
        // The NICs as the target attaches them (its --tap names), for the
        // announcement once the guest runs.
        let nics: Vec<(String, [u8; 6])> = match state.config.to_config(&self.overrides) {
            Ok(c) => c.nics.iter().map(|n| (n.tap.clone(), n.mac)).collect(),
            Err(e) => return Err(Box::new(e)),
        };
        let (tx, rx) = mpsc::channel();
        let mut run = self.run.clone();
        run.on_running = Some(tx);
        let overrides = self.overrides.clone();
        let t = std::thread::Builder::new()
            .name("incoming-vm".into())
            .spawn(move || vmm::snapshot::run_incoming(state, prepared, overrides, &run))?;
        // Wait until the vCPUs run (or the VMM gives up building the VM).
        tracing::debug!(
            us = t0.elapsed().as_micros() as u64,
            "timing: VM thread started"
        );
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => {
                tracing::debug!(
                    us = t0.elapsed().as_micros() as u64,
                    "timing: vCPUs running"
                );
                self.thread = Some(t);
                if !nics.is_empty() {
                    let _ = std::thread::Builder::new()
                        .name("announce".into())
                        .spawn(move || super::announce::announce(&nics));
                }
                Ok(())
            }
            Err(_) => match t.join() {
                Ok(Err(e)) => Err(Box::new(e)),
                Ok(Ok(r)) => Err(format!("the VM stopped before running: {r:?}").into()),
                Err(_) => Err("the VM thread panicked".into()),
            },
        }
    }
}

/// Listens on `opts.listen`, receives one VM and runs it until it stops.
/// `on_listening` is called once the socket listens (the CLI prints it).
pub fn run_incoming(
    opts: IncomingOptions,
    on_listening: impl FnOnce(&str),
) -> Result<ExitReason, IncomingError> {
    let listen_err = |source| IncomingError::Listen {
        addr: opts.listen.clone(),
        source,
    };
    let tls = match &opts.tls {
        Some(files) => Some(crate::transport::server_config(files).map_err(IncomingError::Tls)?),
        None => None,
    };
    let listener = TcpListener::bind(&opts.listen).map_err(listen_err)?;
    // A lease the agent acquired for this VM (one coming from a source
    // without a lease) is renewed from now on, not only once memory has
    // arrived; a handoff lease is taken over at switchover instead.
    let _lease = match opts.run.lease.as_ref().filter(|l| !l.handoff) {
        Some(spec) => Some(vmm::lease::start(spec.clone()).map_err(vmm::Error::from)?),
        None => None,
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.listen.clone());
    on_listening(&local);
    let (stream, peer) = listener.accept().map_err(listen_err)?;
    drop(listener);
    tracing::info!(%peer, "incoming migration");
    let _ = crate::transport::tune_tcp(&stream);
    let target = opts.target.clone();
    let mut host = IncomingHost::new(opts);
    let cancel = CancelToken::new();
    let (shell, got) = match tls {
        None => receive(&mut host, stream, &target, &cancel),
        Some(cfg) => {
            let s = crate::transport::accept_tls(stream, cfg).map_err(IncomingError::Tls)?;
            receive(&mut host, s, &target, &cancel)
        }
    }
    .map_err(IncomingError::Receive)?;
    tracing::info!(vm = %got.name, rounds = got.rounds, data_pages = got.data_pages,
        zero_pages = got.zero_pages, "migration received; guest running");
    shell.wait()
}
