//! The source side over a real VMM: [`SourceVm`] implements
//! [`MigratableVm`] for a running `vmm::machine::Machine`, and [`Outgoing`]
//! is the control API's migration hook that runs the engine on its own
//! thread, keeps its progress for `GET /vm/migrate`, cancels, and stops the
//! VM once the target has acknowledged.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};
use vmm::machine::Machine;
use vmm::migration_hook::{HookError, MigrationHook};
use vmm::ExitReason;

use crate::precheck::{self, Disk, Priority, VmFacts};
use crate::progress::{CancelToken, Progress, Stage, Summary};
use crate::source::{migrate, SourceOptions};
use crate::vm::{DirtyBitmap, MigratableVm, Region, VmError};

/// A running VM as the migration engine drives it.
pub struct SourceVm {
    m: Arc<Machine>,
    layout: Vec<Region>,
    /// Whether a non-resident page of guest memory is certainly zero
    /// (no swap on this host; see [`SourceVm::read_pages`]).
    skip_absent: bool,
    priority: Priority,
}

/// Whether this host has no swap: then a page of an anonymous private
/// mapping that is not resident was never written (or was dropped with
/// MADV_DONTNEED) and reads as zero.
fn no_swap() -> bool {
    std::fs::read_to_string("/proc/meminfo").is_ok_and(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("SwapTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            == Some(0)
    })
}

impl SourceVm {
    /// Wraps the VM.
    pub fn new(m: Arc<Machine>) -> Self {
        let layout =
            m.vm.slots()
                .iter()
                .map(|s| Region {
                    gpa: s.guest_addr,
                    size: s.size,
                })
                .collect();
        Self {
            m,
            layout,
            skip_absent: no_swap(),
            priority: Priority::Standard,
        }
    }

    /// The same, for a migration of `priority` (sent with the facts).
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Guest memory in use (resident), MiB, rounded up; `None` with swap
    /// (a swapped-out page is not resident but will be sent).
    fn resident_mib(&self) -> Option<u64> {
        if !self.skip_absent {
            return None;
        }
        let mut pages = 0u64;
        for r in &self.layout {
            // One mincore call per 64 MiB keeps the vector small.
            let mut off = 0;
            while off < r.size {
                let len = (r.size - off).min(64 << 20) as usize;
                let v = self.residency(r.gpa + off, len)?;
                pages += v.iter().filter(|b| *b & 1 != 0).count() as u64;
                off += len as u64;
            }
        }
        Some((pages * PAGE as u64).div_ceil(1 << 20))
    }

    /// Residency of each page of `[gpa, gpa + len)` (bit 0 set: resident),
    /// or None if it cannot be asked.
    fn residency(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        use vm_memory::GuestMemoryBackend as _;
        let host = self.m.mem.get_host_address(GuestAddress(gpa)).ok()?;
        // The range lies in one region (the engine reads inside one), so
        // the mapping is contiguous; mincore wants a page-aligned start,
        // which guest pages are.
        self.m.mem.get_slice(GuestAddress(gpa), len).ok()?;
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: [host, host + len) is mapped guest memory (checked by
        // get_slice above); mincore writes one byte per page into `vec`,
        // which has that many.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        (rc == 0).then_some(vec)
    }
}

const PAGE: usize = crate::protocol::PAGE_SIZE;

/// The CPU features the VM was given: KVM's supported CPUID with the VM's
/// template applied, as at boot.
fn guest_cpu_features(m: &Machine) -> std::collections::BTreeSet<String> {
    let c = &m.config;
    let cpuid = vmm::vm::open_kvm()
        .ok()
        .and_then(|kvm| {
            kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .ok()
        })
        .and_then(|sup| vmm::cpu::vcpu_cpuid(&sup, c.cpu_template, 0, c.vcpus).ok());
    cpuid.map(|c| super::cpu_features(&c)).unwrap_or_default()
}

/// `disk PATH (block device MAJ:MIN)` if `path` is a device node: a disk
/// of this host (raw passthrough), not a file on a datastore.
fn host_device(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path).ok()?;
    let ft = md.file_type();
    let kind = if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        return None;
    };
    let rdev = md.rdev();
    Some(format!(
        "disk {} ({kind} {}:{})",
        path.display(),
        libc::major(rdev),
        libc::minor(rdev)
    ))
}

/// What the target's pre-checks need to know about `m`.
pub fn facts(m: &Machine) -> VmFacts {
    let c = &m.config;
    let devices: Vec<Option<String>> = c.disks.iter().map(|d| host_device(&d.path)).collect();
    VmFacts {
        name: c.name.clone(),
        cpu_template: serde_json::to_value(c.cpu_template)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        cpu_features: guest_cpu_features(m),
        memory_mib: c.memory_bytes >> 20,
        vcpus: c.vcpus,
        disks: c
            .disks
            .iter()
            .zip(&devices)
            .map(|(d, dev)| Disk {
                path: std::path::absolute(&d.path).unwrap_or_else(|_| d.path.clone()),
                identity: precheck::disk_identity(&d.path).ok(),
                host_device: dev.is_some(),
            })
            .collect(),
        networks: c.nics.iter().map(|n| n.network.clone()).collect(),
        host_local_devices: devices.into_iter().flatten().collect(),
        lease: vmm::lease::held().map(|l| precheck::LeaseFacts::of(&l.file, l.generation)),
        ..Default::default()
    }
}

impl MigratableVm for SourceVm {
    fn facts(&self) -> VmFacts {
        VmFacts {
            priority: self.priority,
            resident_mib: self.resident_mib(),
            ..facts(&self.m)
        }
    }

    fn memory_layout(&self) -> Vec<Region> {
        self.layout.clone()
    }

    /// Pages that were never touched are not read (reading would fault
    /// each one in, a few microseconds apiece under nested virtualisation,
    /// most of an idle guest's migration time): without swap they are
    /// zero. A page the guest writes after `mincore` looked is in the
    /// dirty log and goes again in a later round.
    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let resident = if self.skip_absent {
            self.residency(gpa, buf.len())
        } else {
            None
        };
        let Some(resident) = resident else {
            self.m.mem.read_slice(buf, GuestAddress(gpa))?;
            return Ok(());
        };
        let len = buf.len();
        let mut i = 0;
        while i < resident.len() {
            let on = resident[i] & 1 != 0;
            let mut j = i + 1;
            while j < resident.len() && (resident[j] & 1 != 0) == on {
                j += 1;
            }
            let chunk = &mut buf[i * PAGE..(j * PAGE).min(len)];
            if on {
                self.m
                    .mem
                    .read_slice(chunk, GuestAddress(gpa + (i * PAGE) as u64))?;
            } else {
                chunk.fill(0);
            }
            i = j;
        }
        Ok(())
    }

    /// [`read_pages`](Self::read_pages) without filling the pages that
    /// were never touched: they are reported in `zero` instead, so the
    /// engine announces them without zeroing and scanning them.
    fn read_pages_sparse(
        &self,
        gpa: u64,
        buf: &mut [u8],
        zero: &mut [bool],
    ) -> Result<(), VmError> {
        let resident = if self.skip_absent {
            self.residency(gpa, buf.len())
        } else {
            None
        };
        let Some(resident) = resident else {
            zero.fill(false);
            self.m.mem.read_slice(buf, GuestAddress(gpa))?;
            return Ok(());
        };
        let len = buf.len();
        let mut i = 0;
        while i < resident.len() {
            let on = resident[i] & 1 != 0;
            let mut j = i + 1;
            while j < resident.len() && (resident[j] & 1 != 0) == on {
                j += 1;
            }
            zero[i..j].fill(!on);
            if on {
                let chunk = &mut buf[i * PAGE..(j * PAGE).min(len)];
                self.m
                    .mem
                    .read_slice(chunk, GuestAddress(gpa + (i * PAGE) as u64))?;
            }
            i = j;
        }
        Ok(())
    }

    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        // Earlier VMM writes are covered by the full copy that follows.
        let _ = vmm::memory::take_vmm_dirty(&self.m.mem);
        self.m.vm.set_dirty_logging(true)?;
        Ok(())
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError> {
        let vmm_dirty = vmm::memory::take_vmm_dirty(&self.m.mem);
        let mut words = Vec::with_capacity(self.layout.len());
        for (slot, own) in self.m.vm.slots().iter().zip(vmm_dirty) {
            let mut kvm = self.m.vm.dirty_log(slot)?;
            for (k, o) in kvm.iter_mut().zip(own) {
                *k |= o;
            }
            words.push(kvm);
        }
        Ok(DirtyBitmap::from_words(&self.layout, words))
    }

    fn stop_dirty_log(&mut self) {
        if let Err(e) = self.m.vm.set_dirty_logging(false) {
            tracing::warn!(error = %e, "cannot turn the dirty log off");
        }
    }

    fn set_throttle(&mut self, percent: u8) {
        self.m.gate.set_throttle(percent);
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.m.gate.pause(vmm::cpu::gate::PAUSE_TIMEOUT)?;
        Ok(())
    }

    fn quiesce_devices(&mut self) -> Result<(), VmError> {
        self.m.quiesce_devices();
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(vmm::snapshot::capture_bytes(&self.m)?)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.m.gate.set_throttle(0);
        self.m.resume();
        Ok(())
    }

    fn stop_lease(&mut self) -> Result<Option<crate::vm::LeaseHandoff>, VmError> {
        let held = vmm::lease::handoff_stop()?;
        Ok(held.map(|l| crate::vm::LeaseHandoff {
            file: l.file,
            owner: l.owner,
            generation: l.generation,
        }))
    }

    fn lease_sent(&mut self) {
        vmm::lease::handoff_sent();
    }

    fn keep_lease(&mut self) {
        vmm::lease::handoff_abort();
    }

    fn lease_gone(&mut self) {
        vmm::lease::handoff_done();
    }

    fn race_lease(&mut self) -> crate::vm::LeaseRace {
        match vmm::lease::handoff_race() {
            vmm::lease::Race::Won => crate::vm::LeaseRace::Won,
            vmm::lease::Race::Lost(w) => crate::vm::LeaseRace::Lost(w),
            vmm::lease::Race::Unknown(e) => crate::vm::LeaseRace::Unknown(e),
        }
    }
}

/// The body of `PUT /vm/migrate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Target `ADDR:PORT` (where `vigil run --incoming` listens).
    pub to: String,
    /// Downtime target in ms (default 100).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap in MB/s (10^6 bytes; default unlimited).
    #[serde(default)]
    pub bandwidth_mbps: Option<u64>,
    /// Hard limit in seconds (default 100).
    #[serde(default)]
    pub max_duration_s: Option<u64>,
    /// Verify every page end to end.
    #[serde(default)]
    pub checksum: bool,
    /// `standard` (default) or `high` (reserve on both sides first, refuse
    /// if either cannot).
    #[serde(default)]
    pub priority: Priority,
    /// `auto` (default: while a bandwidth cap applies), `on` or `off`:
    /// LZ4 compression of data pages.
    #[serde(default)]
    pub compress: crate::Compression,
    /// Encrypt and authenticate the stream with TLS 1.3 (mutual
    /// certificates from the cluster CA).
    #[serde(default)]
    pub tls: Option<TlsRequest>,
}

/// TLS material for an outgoing migration (PEM files on this host).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsRequest {
    /// This host's certificate chain.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
    /// The cluster CA.
    pub ca: std::path::PathBuf,
    /// The name the target's certificate must carry (default: the host
    /// part of `to`).
    #[serde(default)]
    pub name: Option<String>,
}

/// The host part of `ADDR:PORT` (`[v6]:port` too).
fn host_of(to: &str) -> String {
    let h = to.rsplit_once(':').map_or(to, |(h, _)| h);
    h.trim_start_matches('[').trim_end_matches(']').to_string()
}

impl MigrateRequest {
    fn options(&self, host: &str) -> Result<SourceOptions, String> {
        let mut o = SourceOptions {
            host: host.to_string(),
            page_checksum: self.checksum,
            compress: self.compress,
            ..Default::default()
        };
        if let Some(ms) = self.downtime_ms {
            if !(1..=60_000).contains(&ms) {
                return Err(format!("downtime_ms {ms} must be 1..=60000"));
            }
            o.downtime_target = Duration::from_millis(ms);
        }
        if let Some(mb) = self.bandwidth_mbps {
            if mb == 0 {
                return Err("bandwidth_mbps must be at least 1 (omit it for unlimited)".into());
            }
            o.bandwidth_cap = Some(mb.saturating_mul(1_000_000));
        }
        if let Some(s) = self.max_duration_s {
            if !(1..=86_400).contains(&s) {
                return Err(format!("max_duration_s {s} must be 1..=86400"));
            }
            o.max_duration = Duration::from_secs(s);
        }
        Ok(o)
    }
}

/// How long a migrated source waits for a client to read the outcome
/// before it exits (the CLI polls every 100 ms).
const LINGER: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Shared {
    status: Value,
    cancel: Option<CancelToken>,
    running: bool,
}

/// The control API's migration hook (installed by `vigil run`).
pub struct Outgoing {
    host: String,
    shared: Arc<Mutex<Shared>>,
    outcome_read: Arc<AtomicBool>,
}

impl Outgoing {
    /// A hook for this host.
    pub fn new(host: &str) -> Self {
        Self {
            host: host.to_string(),
            shared: Arc::new(Mutex::new(Shared {
                status: json!({ "state": "none" }),
                ..Default::default()
            })),
            outcome_read: Arc::new(AtomicBool::new(false)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bad(status: u16, message: impl Into<String>) -> HookError {
    HookError {
        status,
        message: message.into(),
    }
}

/// Progress as the API reports it.
pub fn progress_json(to: &str, p: &Progress) -> Value {
    json!({
        "state": "running",
        "to": to,
        "stage": p.stage.to_string(),
        "percent": p.percent,
        "bytes_sent": p.bytes_sent,
        "dirty_pages_per_sec": p.dirty_pages_per_sec,
        "bandwidth_bytes_per_sec": p.bandwidth,
        "remaining_pages": p.remaining_pages,
        "expected_downtime_ms": p.expected_downtime.as_secs_f64() * 1e3,
        "throttle": p.throttle,
    })
}

/// A summary as the API reports it.
pub fn summary_json(s: &Summary) -> Value {
    json!({
        "total_s": s.total.as_secs_f64(),
        "downtime_ms": s.downtime.as_secs_f64() * 1e3,
        "downtime_sent_ms": s.downtime_sent.as_secs_f64() * 1e3,
        "bytes_sent": s.bytes_sent,
        "rounds": s.rounds,
        "data_pages": s.data_pages,
        "zero_pages": s.zero_pages,
        "max_throttle": s.max_throttle,
        "last_round_pages": s.last_round_pages,
        "first_pass_bytes": s.first_pass_bytes,
        "first_pass_s": s.first_pass.as_secs_f64(),
    })
}

fn connect(to: &str) -> Result<TcpStream, HookError> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|e| bad(400, format!("target `{to}` is not ADDR:PORT ({e})")))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => {
                let _ = crate::transport::tune_tcp(&s);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(bad(
        502,
        format!(
            "cannot connect to the target {to}: {}: is `vigil run --incoming tcp:{to}` running there?",
            last.map_or_else(|| "no address".to_string(), |e| e.to_string())
        ),
    ))
}

impl MigrationHook for Outgoing {
    fn start(&self, m: &Arc<Machine>, body: &[u8]) -> Result<Value, HookError> {
        let req: MigrateRequest = serde_json::from_slice(body).map_err(|e| {
            bad(
                400,
                format!(
                    "bad migrate request body ({e}): send {{\"to\": \"ADDR:PORT\", \"downtime_ms\": \
                     100, \"bandwidth_mbps\": null, \"checksum\": false}}"
                ),
            )
        })?;
        let opts = req.options(&self.host).map_err(|e| bad(400, e))?;
        let tls = match &req.tls {
            None => None,
            Some(t) => {
                let files = crate::transport::TlsFiles {
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                    ca: t.ca.clone(),
                };
                let cfg = crate::transport::client_config(&files)
                    .map_err(|e| bad(400, crate::error_chain(&e)))?;
                Some((cfg, t.name.clone().unwrap_or_else(|| host_of(&req.to))))
            }
        };
        if m.gate.is_paused() {
            return Err(bad(
                409,
                "the VM is paused: resume it before migrating (a migration resumes it on failure)",
            ));
        }
        if self.lock().running {
            return Err(bad(409, "a migration of this VM is already running"));
        }
        if req.priority == Priority::High {
            let room = super::reserve::reservable();
            let vm = VmFacts {
                priority: req.priority,
                ..facts(m)
            };
            if let Some(f) = precheck::check_source_memory(&vm, &self.host, room.mib, &room.detail)
            {
                return Err(bad(
                    507,
                    format!(
                        "migration refused before connecting: pre-check failed on the source: \
                         {f}; the VM keeps running on this host"
                    ),
                ));
            }
        }
        let stream = connect(&req.to)?;
        let cancel = CancelToken::new();
        {
            let mut g = self.lock();
            if g.running {
                return Err(bad(409, "a migration of this VM is already running"));
            }
            g.running = true;
            g.cancel = Some(cancel.clone());
            g.status =
                json!({ "state": "running", "to": req.to, "stage": "connect", "percent": 0 });
        }
        self.outcome_read.store(false, Ordering::SeqCst);
        let shared = self.shared.clone();
        let outcome_read = self.outcome_read.clone();
        let m = m.clone();
        let to = req.to.clone();
        let priority = req.priority;
        let spawned = std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                let span = tracing::info_span!("migrate", vm = %m.config.name, to = %to);
                let _e = span.enter();
                let mut vm = SourceVm::new(m.clone()).with_priority(priority);
                let sh = shared.clone();
                let to2 = to.clone();
                let mut progress = |p: &Progress| {
                    if p.stage != Stage::Failed {
                        sh.lock().unwrap_or_else(|p| p.into_inner()).status =
                            progress_json(&to2, p);
                    }
                };
                let result = match tls {
                    None => migrate(&mut vm, stream, &opts, &cancel, &mut progress),
                    Some((cfg, name)) => match crate::transport::connect_tls(stream, &name, cfg) {
                        Ok(s) => migrate(&mut vm, s, &opts, &cancel, &mut progress),
                        Err(e) => {
                            let error =
                                format!("migration failed at connect: {}", crate::error_chain(&e));
                            tracing::warn!(%error, "TLS handshake failed; the VM runs here");
                            let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
                            g.status = json!({ "state": "failed", "to": to, "stage": "connect",
                                               "error": error, "vm_running_here": true });
                            g.running = false;
                            g.cancel = None;
                            return;
                        }
                    },
                };
                let done = match &result {
                    Ok(s) => {
                        tracing::info!(downtime_ms = s.downtime.as_millis() as u64, "migrated");
                        json!({ "state": "succeeded", "to": to, "stage": "done", "percent": 100,
                                "summary": summary_json(s) })
                    }
                    Err(f) if f.target_holds_lease().is_some() => {
                        let why = f.target_holds_lease().unwrap_or_default().to_string();
                        tracing::warn!(error = %f.report(), %why,
                            "the target holds the VM's lease: the guest runs there; stopping here without touching the lease");
                        json!({ "state": "succeeded", "to": to, "stage": "done", "percent": 100,
                                "ack_lost": true, "lease": why, "error": f.report() })
                    }
                    Err(f) => {
                        tracing::warn!(error = %f.report(), "migration failed; the VM runs here");
                        let state = if matches!(f.error, crate::source::Error::Cancelled) {
                            "cancelled"
                        } else {
                            "failed"
                        };
                        json!({ "state": state, "to": to, "stage": f.stage.to_string(),
                                "error": f.report(),
                                "vm_running_here": f.resume_error.is_none() && f.lease_suspended().is_none(),
                                "lease_suspended": f.lease_suspended().is_some() })
                    }
                };
                {
                    let mut g = shared.lock().unwrap_or_else(|p| p.into_inner());
                    g.status = done;
                    g.running = false;
                    g.cancel = None;
                }
                let moved = match &result {
                    Ok(_) => true,
                    Err(f) => f.target_holds_lease().is_some(),
                };
                if moved {
                    // The guest runs on the target: give the client a moment
                    // to read the summary, then stop (memory freed, disks
                    // closed by the process exit).
                    let t0 = Instant::now();
                    while !outcome_read.load(Ordering::SeqCst) && t0.elapsed() < LINGER {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    m.exit.request(ExitReason::Migrated);
                    m.gate.stop();
                }
            });
        if let Err(e) = spawned {
            let mut g = self.lock();
            g.running = false;
            g.cancel = None;
            return Err(bad(500, format!("cannot start the migration thread: {e}")));
        }
        Ok(json!({ "state": "running", "to": req.to }))
    }

    fn status(&self) -> Value {
        let v = self.lock().status.clone();
        if v["state"] == "succeeded" {
            self.outcome_read.store(true, Ordering::SeqCst);
        }
        v
    }

    fn cancel(&self) -> Result<Value, HookError> {
        let g = self.lock();
        match &g.cancel {
            Some(c) => {
                c.cancel();
                Ok(json!({ "state": "cancelling" }))
            }
            None => Err(bad(409, "no migration is running")),
        }
    }
}
