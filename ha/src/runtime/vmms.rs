//! The VMM processes of this host: started for [`crate::agent::Action::StartVm`]
//! after the lease is acquired, watched, powered off, and adopted by a
//! restarted agent.
//!
//! Each VMM is `vigil run --config DS/vms/NAME/vm.toml --lease RUN/NAME.lease.toml
//! --api-socket RUN/NAME.sock ...`, started in its own session so that it
//! outlives the agent (a stopped, crashed or upgraded agent never stops a
//! VM). `RUN/NAME.vm.json` records its pid, lease generation and datastore;
//! a new agent reads these files, checks each process is still that VMM
//! (`/proc/PID/cmdline`), and adopts it.

use super::store;
use crate::agent::VmEvent;
use crate::lease::LeaseTimings;
use crate::time::Time;
use crate::types::{HostId, VmId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a VMM waits for its VM by live migration before the agent
/// stops it: past the migration's own hard limit (100 s by default) and
/// the master's memory of the plan (180 s).
const INCOMING_TIMEOUT: Duration = Duration::from_secs(200);

/// What the run directory remembers of one VMM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmRecord {
    /// The VMM's pid.
    pub pid: i32,
    /// The lease generation it holds.
    pub generation: u64,
    /// The datastore path holding the VM.
    pub datastore: PathBuf,
}

/// One VMM the agent watches.
#[derive(Debug)]
pub struct Vmm {
    rec: VmmRecord,
    /// Present when this agent started it (then its exit status is known).
    child: Option<Child>,
    /// Last renewal time fed to the agent.
    last_renewal: u64,
    /// The agent asked for a power-off; `true` = release the lease after.
    off_requested: Option<bool>,
    /// The process is gone; waiting for the agent's power-off decision.
    dead_since: Option<Instant>,
    /// Waiting for its VM by live migration since then: not running a
    /// guest yet.
    incoming: Option<Instant>,
    /// Its VM is being migrated away: an exit with status 0 while the
    /// lease names another host is the migration's end, not a power-off.
    migrating: bool,
}

/// A VMM started by a start thread, handed to the main loop.
#[derive(Debug)]
pub struct Started {
    /// The VM.
    pub vm: VmId,
    /// Its record.
    pub rec: VmmRecord,
    /// The process.
    pub child: Child,
    /// It waits for its VM by live migration.
    pub incoming: bool,
}

/// Paths of one VM's files in the run directory.
pub struct RunFiles {
    /// API socket.
    pub socket: PathBuf,
    /// Lease spec given to `--lease`.
    pub lease_spec: PathBuf,
    /// Lease status written by the VMM.
    pub lease_status: PathBuf,
    /// The VMM record.
    pub record: PathBuf,
    /// Serial console output.
    pub console: PathBuf,
    /// VMM log.
    pub log: PathBuf,
}

/// The run-directory files of `vm`.
pub fn run_files(run_dir: &Path, vm: &VmId) -> RunFiles {
    let f = |ext: &str| run_dir.join(format!("{vm}.{ext}"));
    RunFiles {
        socket: f("sock"),
        lease_spec: f("lease.toml"),
        lease_status: f("lease-status.json"),
        record: f("vm.json"),
        console: f("console"),
        log: f("log"),
    }
}

/// `CLOCK_MONOTONIC` now, as the agent's time.
pub fn now() -> Time {
    Time::from_millis(vmm::lease::mono_ms())
}

/// Everything needed to start one VMM (moved into the start thread).
#[derive(Debug, Clone)]
pub struct Launch {
    /// This host.
    pub host: HostId,
    /// The `vigil` binary.
    pub vigil: PathBuf,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Lease timings.
    pub lease: LeaseTimings,
}

impl Launch {
    /// Acquires the lease (waiting out a live or recently live holder, as
    /// `lease::LeaseObserver` decides), writes the lease spec and starts the
    /// VMM; returns once its API answers.
    pub fn start(
        &self,
        vm: &VmId,
        ds: &Path,
        seen: Option<(crate::lease::LeaseRecord, Time)>,
    ) -> Result<Started, String> {
        let (generation, issued) = self.acquire(vm, ds, seen)?;
        match self.spawn(vm, ds, generation, issued) {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = store::release_lease(ds, vm.as_str(), &self.host, generation);
                Err(e)
            }
        }
    }

    /// Acquires `vm`'s lease once `lease::LeaseObserver` says it is free or
    /// expired: the generation held and when the claim was issued.
    fn acquire(
        &self,
        vm: &VmId,
        ds: &Path,
        seen: Option<(crate::lease::LeaseRecord, Time)>,
    ) -> Result<(u64, Time), String> {
        let mut obs = match seen {
            Some((rec, since)) => crate::lease::LeaseObserver::seen_since(rec, since),
            None => crate::lease::LeaseObserver::default(),
        };
        let began = now();
        let give_up = self.lease.takeover_time * 3;
        let rec = loop {
            let rec = store::read_lease(ds, vm.as_str())?.unwrap_or(crate::lease::LeaseRecord {
                owner: None,
                generation: 0,
                counter: 0,
            });
            match obs.observe(now(), &rec, &self.host, &self.lease) {
                crate::lease::TakeoverVerdict::Free | crate::lease::TakeoverVerdict::Expired => {
                    break rec
                }
                crate::lease::TakeoverVerdict::Wait { .. } => {
                    if now().since(began) >= give_up {
                        return Err(format!(
                            "lease held by a live owner ({:?}, generation {})",
                            rec.owner.map(|h| h.to_string()),
                            rec.generation
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let issued = now();
        let held = store::acquire_lease(ds, vm.as_str(), &rec, &self.host)?;
        tracing::info!(vm = %vm, generation = held.generation, "lease acquired");
        Ok((held.generation, issued))
    }

    /// The `--lease` spec for a VMM holding `generation`.
    fn lease_spec(
        &self,
        vm: &VmId,
        ds: &Path,
        generation: u64,
        issued: Time,
        files: &RunFiles,
    ) -> vmm::lease::LeaseSpec {
        vmm::lease::LeaseSpec {
            file: store::lease_path(ds, vm.as_str()),
            owner: self.host.to_string(),
            generation,
            acquired_mono_ms: issued.as_millis(),
            renew_interval_ms: self.lease.renew_interval.as_millis() as u64,
            io_timeout_ms: self.lease.io_timeout.as_millis() as u64,
            stop_time_ms: self.lease.stop_time.as_millis() as u64,
            status: Some(files.lease_status.clone()),
            on_loss: self.lease.on_loss,
            takeover_time_ms: self.lease.takeover_time.as_millis() as u64,
            handoff: false,
        }
    }

    fn spawn(
        &self,
        vm: &VmId,
        ds: &Path,
        generation: u64,
        issued: Time,
    ) -> Result<Started, String> {
        let files = run_files(&self.run_dir, vm);
        let cfg_path = super::files::vm_dir(ds, vm.as_str()).join("vm.toml");
        let cfg = vmm::VmConfig::load(Some(&cfg_path), Default::default())
            .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let spec = self.lease_spec(vm, ds, generation, issued, &files);
        let text = toml::to_string(&spec).map_err(|e| e.to_string())?;
        std::fs::write(&files.lease_spec, text)
            .map_err(|e| format!("{}: {e}", files.lease_spec.display()))?;
        let _ = std::fs::remove_file(&files.lease_status);
        let out = std::fs::File::create(files.log.with_extension("out"))
            .map_err(|e| format!("{}: {e}", files.log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        // The guest learns where it runs (its disk writer tags records with it).
        let cmdline = format!("{} vigil.host={}", cfg.cmdline, self.host);
        let mut cmd = Command::new(&self.vigil);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--name")
            .arg(vm.as_str())
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--console")
            .arg(format!("file:{}", files.console.display()))
            .arg("--api-socket")
            .arg(&files.socket)
            .arg("--lease")
            .arg(&files.lease_spec)
            .arg("--log-level")
            .arg("info")
            .arg("--log-file")
            .arg(&files.log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // A guest tools channel gets its host socket in the run directory:
        // host-local, never on the shared datastore.
        if let Some(v) = &cfg.vsock {
            cmd.arg("--vsock").arg(format!(
                "cid={},socket={}",
                v.cid,
                run_dir_vsock(&self.run_dir, vm).display()
            ));
        }
        // SAFETY: setsid is async-signal-safe; the VMM gets its own session
        // so signals aimed at the agent's process group never reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.vigil.display()))?;
        let rec = VmmRecord {
            pid: child.id() as i32,
            generation,
            datastore: ds.to_path_buf(),
        };
        super::files::write_json(&files.record, &rec).map_err(|e| e.to_string())?;
        // Running = the API answers (it starts after the vCPUs do).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let _ = std::fs::remove_file(&files.record);
                let log =
                    std::fs::read_to_string(files.log.with_extension("out")).unwrap_or_default();
                return Err(format!(
                    "VMM exited ({status}): {}",
                    log.lines().last().unwrap_or("no message")
                ));
            }
            if vmm::api::client::call(&files.socket, "GET", "/vm", None, Duration::from_secs(2))
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&files.record);
                return Err("VMM did not answer on its API socket within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Started {
            vm: vm.clone(),
            rec,
            child,
            incoming: false,
        })
    }

    /// Starts a VMM waiting for `vm` by live migration on `ip` (a free
    /// port) and returns it with the address it listens on. The VM's
    /// config, disks and state come with the migration; this host gives
    /// its console file, API socket and vsock socket. Its lease: with
    /// `from_outside` (the source holds none) acquired now as for a
    /// power-on; otherwise taken over from the source at switchover
    /// (`handoff`), so that exactly one copy holds it.
    pub fn start_incoming(
        &self,
        vm: &VmId,
        ds: &Path,
        ip: std::net::IpAddr,
        from_outside: bool,
        seen: Option<(crate::lease::LeaseRecord, Time)>,
    ) -> Result<(Started, String), String> {
        let (generation, issued) = if from_outside {
            self.acquire(vm, ds, seen)?
        } else {
            (0, Time::ZERO)
        };
        let r = self.spawn_incoming(vm, ds, ip, generation, issued);
        if r.is_err() && from_outside {
            let _ = store::release_lease(ds, vm.as_str(), &self.host, generation);
        }
        r
    }

    fn spawn_incoming(
        &self,
        vm: &VmId,
        ds: &Path,
        ip: std::net::IpAddr,
        generation: u64,
        issued: Time,
    ) -> Result<(Started, String), String> {
        let files = run_files(&self.run_dir, vm);
        let mut spec = self.lease_spec(vm, ds, generation, issued, &files);
        spec.handoff = generation == 0;
        let text = toml::to_string(&spec).map_err(|e| e.to_string())?;
        std::fs::write(&files.lease_spec, text)
            .map_err(|e| format!("{}: {e}", files.lease_spec.display()))?;
        let _ = std::fs::remove_file(&files.lease_status);
        let out_path = files.log.with_extension("out");
        let out =
            std::fs::File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.vigil);
        cmd.arg("run")
            .arg("--incoming")
            .arg(format!("tcp:{}", std::net::SocketAddr::new(ip, 0)))
            .arg("--name")
            .arg(vm.as_str())
            .arg("--console")
            .arg(format!("file:{}", files.console.display()))
            .arg("--api-socket")
            .arg(&files.socket)
            .arg("--lease")
            .arg(&files.lease_spec)
            .arg("--log-level")
            .arg("info")
            .arg("--log-file")
            .arg(&files.log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // The guest tools channel's host socket goes to this host's run
        // directory (the VM's registered config says whether it has one).
        let cfg_path = super::files::vm_dir(ds, vm.as_str()).join("vm.toml");
        let cfg = vmm::VmConfig::load(Some(&cfg_path), Default::default())
            .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        if cfg.vsock.is_some() {
            cmd.arg("--vsock-socket")
                .arg(run_dir_vsock(&self.run_dir, vm));
        }
        // SAFETY: as in `spawn`.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.vigil.display()))?;
        let rec = VmmRecord {
            pid: child.id() as i32,
            generation,
            datastore: ds.to_path_buf(),
        };
        super::files::write_json(&files.record, &rec).map_err(|e| e.to_string())?;
        const READY: &str = "waiting for an incoming migration on tcp:";
        let deadline = Instant::now() + Duration::from_secs(30);
        let address = loop {
            let log = std::fs::read_to_string(&out_path).unwrap_or_default();
            if let Some(a) = log
                .lines()
                .find_map(|l| l.split_once(READY).map(|(_, a)| a.trim().to_string()))
            {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let _ = std::fs::remove_file(&files.record);
                return Err(format!(
                    "the incoming VMM exited ({status}): {}",
                    log.lines().last().unwrap_or("no message")
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&files.record);
                return Err("the incoming VMM did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok((
            Started {
                vm: vm.clone(),
                rec,
                child,
                incoming: true,
            },
            address,
        ))
    }
}

/// The host end of a VM's vsock device.
pub fn run_dir_vsock(run_dir: &Path, vm: &VmId) -> PathBuf {
    run_dir.join(format!("{vm}.vsock"))
}

/// Whether `pid` is a live `vigil run` holding a lease.
fn is_vmm(pid: i32) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    alive && args.contains(&&b"run"[..]) && args.contains(&&b"--lease"[..])
}

/// The VMMs of this host.
#[derive(Debug, Default)]
pub struct Vmms {
    procs: BTreeMap<VmId, Vmm>,
}

impl Vmms {
    /// Adopts the VMMs recorded in `run_dir` that still run.
    pub fn adopt(&mut self, run_dir: &Path) -> Vec<VmId> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(run_dir) else {
            return found;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(vm) = name.strip_suffix(".vm.json") else {
                continue;
            };
            let rec: Option<VmmRecord> = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match rec {
                Some(rec) if is_vmm(rec.pid) => {
                    tracing::info!(vm, pid = rec.pid, "adopting running VMM");
                    let vm = VmId::new(vm);
                    self.procs.insert(
                        vm.clone(),
                        Vmm {
                            rec,
                            child: None,
                            last_renewal: 0,
                            off_requested: None,
                            dead_since: None,
                            incoming: None,
                            migrating: false,
                        },
                    );
                    found.push(vm);
                }
                _ => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        found
    }

    /// Takes over a freshly started VMM.
    pub fn insert(&mut self, s: Started) {
        self.procs.insert(
            s.vm,
            Vmm {
                rec: s.rec,
                child: Some(s.child),
                last_renewal: 0,
                off_requested: None,
                dead_since: None,
                incoming: s.incoming.then(Instant::now),
                migrating: false,
            },
        );
    }

    /// The VMs with a process (running, or dead and not yet reported).
    pub fn running(&self) -> Vec<VmId> {
        self.procs.keys().cloned().collect()
    }

    /// Each VMM's VM name and pid (for the health record).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .map(|(vm, v)| (vm.to_string(), v.rec.pid as u32))
            .collect()
    }

    /// The API socket of a VM, if it runs here.
    pub fn contains(&self, vm: &VmId) -> bool {
        self.procs.contains_key(vm)
    }

    /// Marks `vm`'s VMM as migrating away (or not any more). False if no
    /// VMM of it runs here with a guest.
    pub fn set_migrating(&mut self, vm: &VmId, on: bool) -> bool {
        match self.procs.get_mut(vm) {
            Some(p) if p.incoming.is_none() && p.dead_since.is_none() => {
                p.migrating = on;
                true
            }
            _ => false,
        }
    }

    /// Stops a VMM still waiting for `vm` by migration (its guest never
    /// ran). False if there is none, or its guest already runs.
    pub fn cancel_incoming(&mut self, vm: &VmId) -> bool {
        match self.procs.get(vm) {
            Some(p) if p.incoming.is_some() => {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(p.rec.pid, libc::SIGKILL) };
                true
            }
            _ => false,
        }
    }

    /// Kills the VMM (hard power-off). Returns false if no such VM runs here.
    pub fn power_off(&mut self, vm: &VmId, release: bool) -> bool {
        let Some(p) = self.procs.get_mut(vm) else {
            return false;
        };
        p.off_requested = Some(release);
        if p.dead_since.is_none() {
            // SAFETY: kill(2) on a pid we recorded; checked to be our VMM
            // (our child, or verified through /proc at adoption).
            unsafe { libc::kill(p.rec.pid, libc::SIGKILL) };
        }
        true
    }

    /// Asks the guest to shut down through the VMM's API (guest tools).
    pub fn shutdown(&self, run_dir: &Path, vm: &VmId, timeout: Duration) {
        let sock = run_files(run_dir, vm).socket;
        let path = format!("/vm/shutdown?timeout_s={}", timeout.as_secs().max(1));
        if let Err(e) = vmm::api::client::call(&sock, "PUT", &path, None, Duration::from_secs(10)) {
            tracing::warn!(vm = %vm, error = %e, "shutdown request failed");
        }
    }

    /// Checks every VMM: renewals to report, exits. Returns the events to feed.
    pub fn poll(&mut self, run_dir: &Path, me: &HostId) -> Vec<(VmId, VmEvent)> {
        let mut events = Vec::new();
        let mut gone = Vec::new();
        for (vm, p) in &mut self.procs {
            let files = run_files(run_dir, vm);
            if let Some(since) = p.incoming {
                if since.elapsed() > INCOMING_TIMEOUT && p.dead_since.is_none() {
                    // Nobody sent the VM (the orchestrator went away before
                    // the source started): stop waiting, so a lease
                    // acquired for it does not stay held.
                    tracing::warn!(vm = %vm, "no migration arrived within {INCOMING_TIMEOUT:?}: stopping the waiting VMM");
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(p.rec.pid, libc::SIGKILL) };
                    p.dead_since = Some(Instant::now());
                }
                let exited = match &mut p.child {
                    Some(c) => !matches!(c.try_wait(), Ok(None)),
                    None => !is_vmm(p.rec.pid),
                };
                if exited {
                    // The guest never ran here: nothing to report but the end.
                    tracing::info!(vm = %vm, "incoming VMM ended without running the guest");
                    if p.rec.generation > 0 {
                        // Acquired for a VM from outside the cluster.
                        let _ = store::release_lease(
                            &p.rec.datastore,
                            vm.as_str(),
                            me,
                            p.rec.generation,
                        );
                    }
                    events.push((vm.clone(), VmEvent::IncomingEnded));
                    gone.push(vm.clone());
                    continue;
                }
                // Running = the API answers (it starts after the vCPUs do,
                // once the migration has completed and the lease is held).
                if vmm::api::client::call(
                    &files.socket,
                    "GET",
                    "/vm",
                    None,
                    Duration::from_millis(300),
                )
                .is_err()
                {
                    continue;
                }
                let st: Option<vmm::lease::LeaseStatus> = std::fs::read(&files.lease_status)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(st) = st.filter(|st| st.state == "held") {
                    p.rec.generation = st.generation;
                }
                p.incoming = None;
                if let Err(e) = super::files::write_json(&files.record, &p.rec) {
                    tracing::warn!(vm = %vm, error = %e, "cannot update the VMM record");
                }
                tracing::info!(vm = %vm, generation = p.rec.generation, "migrated VM runs here");
                events.push((vm.clone(), VmEvent::PoweredOn));
                continue;
            }
            let status: Option<vmm::lease::LeaseStatus> = std::fs::read(&files.lease_status)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(st) = &status {
                // A lease-suspended VMM that re-acquired its lease holds the
                // next generation: remember it (a restarted agent adopts
                // the VMM with it).
                if st.state == "held" && st.generation > p.rec.generation {
                    tracing::info!(vm = %vm, generation = st.generation, "VMM re-acquired its lease");
                    p.rec.generation = st.generation;
                    if let Err(e) = super::files::write_json(&files.record, &p.rec) {
                        tracing::warn!(vm = %vm, error = %e, "cannot update the VMM record");
                    }
                }
                if st.state == "held"
                    && st.generation == p.rec.generation
                    && st.last_renewal_issued_mono_ms > p.last_renewal
                {
                    p.last_renewal = st.last_renewal_issued_mono_ms;
                    events.push((
                        vm.clone(),
                        VmEvent::LeaseRenewed {
                            issued_at: Time::from_millis(st.last_renewal_issued_mono_ms),
                        },
                    ));
                }
            }
            if p.dead_since.is_none() {
                let exit = match &mut p.child {
                    Some(c) => match c.try_wait() {
                        Ok(Some(s)) => Some(s.code()),
                        _ => None,
                    },
                    None => (!is_vmm(p.rec.pid)).then_some(None),
                };
                let Some(code) = exit else { continue };
                p.dead_since = Some(Instant::now());
                let lease_state = status.as_ref().map(|s| s.state.as_str());
                tracing::info!(vm = %vm, ?code, ?lease_state, "VMM exited");
                let lease_owner = || {
                    store::read_lease(&p.rec.datastore, vm.as_str())
                        .ok()
                        .flatten()
                        .and_then(|r| r.owner)
                };
                if p.off_requested.is_some() {
                    // We killed it: reported below.
                } else if (p.migrating || lease_state == Some("handed-over"))
                    && code.unwrap_or(0) == 0
                {
                    match lease_owner() {
                        Some(h) if &h != me => {
                            // The target holds the lease: the VM runs there.
                            events.push((vm.clone(), VmEvent::MigratedAway { to: Some(h) }));
                            gone.push(vm.clone());
                            continue;
                        }
                        _ => {
                            events.push((vm.clone(), VmEvent::PoweredOff));
                            gone.push(vm.clone());
                            continue;
                        }
                    }
                } else if code == Some(vmm::control::EXIT_LEASE)
                    || lease_state == Some("lost")
                    || lease_state == Some("expired")
                {
                    if lease_state == Some("lost") {
                        let rec = store::read_lease(&p.rec.datastore, vm.as_str())
                            .ok()
                            .flatten();
                        let (by, generation) = rec.map_or((None, 0), |r| (r.owner, r.generation));
                        events.push((vm.clone(), VmEvent::LeaseLost { by, generation }));
                    }
                    // Expired: the agent's own deadline (fed from the same
                    // renewals) orders the power-off; reported then.
                    continue;
                } else if code == Some(0)
                    || (code.is_none() && p.child.is_none() && guest_powered_off(&files.log))
                {
                    events.push((vm.clone(), VmEvent::PoweredOff));
                    gone.push(vm.clone());
                    continue;
                } else {
                    events.push((vm.clone(), VmEvent::Crashed));
                    gone.push(vm.clone());
                    continue;
                }
            }
            if let Some(release) = p.off_requested {
                if release {
                    if let Err(e) =
                        store::release_lease(&p.rec.datastore, vm.as_str(), me, p.rec.generation)
                    {
                        tracing::warn!(vm = %vm, error = %e, "cannot release the lease");
                    }
                }
                events.push((vm.clone(), VmEvent::PoweredOff));
                gone.push(vm.clone());
            } else if p
                .dead_since
                .is_some_and(|t| t.elapsed() > Duration::from_secs(5))
            {
                // Nobody decided (e.g. the lease expired while the agent did
                // not hear of it): a VM that stopped unasked is a crash.
                events.push((vm.clone(), VmEvent::Crashed));
                gone.push(vm.clone());
            }
        }
        for vm in gone {
            self.procs.remove(&vm);
            let f = run_files(run_dir, &vm);
            let _ = std::fs::remove_file(f.record);
        }
        events
    }
}

/// For an adopted VMM (not our child, exit status unknown): did its log say
/// the guest powered off?
fn guest_powered_off(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| {
        t.lines().rev().take(20).any(|l| {
            l.contains("guest powered off") || l.contains("powered off through the control API")
        })
    })
}
