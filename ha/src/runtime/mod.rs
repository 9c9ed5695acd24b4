//! The agent runtime: carries out [`crate::agent::Agent`]'s actions with real
//! sockets, datastore files and VMM processes, driven by `CLOCK_MONOTONIC`
//! (`vigil agent --config host.toml`).
//!
//! One thread owns the state machine and runs the loop below; helper threads
//! only turn blocking work into events on its channel:
//!
//! ```text
//!  UDP receiver ──Message──┐
//!  TCP command server ─────┤        ┌─ Send: UDP datagram to the peer's agent port
//!  ping threads ─PingResult┤        ├─ WriteHeartbeat/ReadDatastores/...: datastore files
//!  VM start threads ───────┼─> loop ┼─ StartVm: start thread (lease, then VMM)
//!  ticker (100 ms) ────────┘   │    ├─ PowerOffVm/ShutdownVm: SIGKILL / API
//!                              │    └─ CommandDone: answer the waiting command
//!       every 200 ms: VMM exits and lease renewals (from each VMM's status file)
//!       every 1 s: the lease records of VMs running elsewhere (see below)
//!       every 3 s: VMs registered on the datastores since the start
//! ```
//!
//! Agent time is `CLOCK_MONOTONIC` in milliseconds, the clock the VMMs stamp
//! their lease renewals with, so `LeaseRenewed { issued_at }` needs no
//! conversion. Datastore paths come from host.toml; the cluster (members,
//! addresses, ports, capacity) from the cluster file on the datastores.
//!
//! Every agent watches the lease records of the VMs that run elsewhere and
//! remembers since when (on its own clock) each value has been unchanged, so
//! that a restart order waits only for what is left of `takeover_time`
//! rather than all of it: the dead owner's record stopped changing when the
//! host died, usually well before the master's verdict. This is the same
//! observation `LeaseObserver` makes, only started earlier by the same host.
//!
//! Restart-safety: VMMs run in their own session and are recorded in the run
//! directory; a new agent adopts them and reports them `PoweredOn` before
//! anything else, so the master never mistakes an agent restart for a VM
//! loss. The message sequence (incarnation) is persisted there too, so
//! peers accept the new agent's messages.

pub mod control;
pub mod files;
pub mod ping;
pub mod policies;
pub mod store;
pub mod vmms;

use crate::agent::{Action, Agent, AgentStatus, Command, CommandError, Input, PowerOffReason};
use crate::config::AgentConfig;
use crate::types::{DatastoreId, HostId, VmId};
use crate::wire::ClusterSecret;
use control::{Reply, Request};
use files::{ClusterFile, FileError, HostConfig};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};
use thiserror::Error;
use vmms::{Launch, Started, Vmms};

/// Why the agent cannot start.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A configuration file.
    #[error(transparent)]
    File(#[from] FileError),
    /// This host is not in the cluster file.
    #[error("host {0} is not in the cluster file: add it with `vigil cluster init` or fix `host` in host.toml")]
    NotAMember(String),
    /// The state machine refused the configuration.
    #[error("{0}")]
    Enable(String),
    /// A socket or directory.
    #[error("cannot {what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

enum Ev {
    Input(Input),
    Started(Result<Started, (VmId, String)>),
    Control(Request, Sender<Reply>),
    /// An incoming VMM listens (or could not be started).
    Incoming(VmId, Result<Started, String>),
    /// An outgoing migration of a local VM ended (`true`: the guest runs
    /// on the target).
    MigratedOut(VmId, bool),
}

/// The running agent.
struct Runtime {
    agent: Agent,
    host: HostConfig,
    cluster: ClusterFile,
    me: HostId,
    udp: UdpSocket,
    vmms: Vmms,
    launch: Launch,
    tx: Sender<Ev>,
    shutdown_timeout: Duration,
    pending: VecDeque<Input>,
    reply: Option<Result<String, CommandError>>,
    known_vms: BTreeMap<VmId, crate::types::VmConfig>,
    /// Lease records of VMs not running here, and since when (local time)
    /// each has been seen unchanged: a restart order then only waits out
    /// what is left of the takeover time.
    watched: BTreeMap<VmId, (crate::lease::LeaseRecord, crate::time::Time)>,
    /// The VMs the monitoring poller watches (`policies.rs`).
    polled: policies::LocalVms,
    /// What VM monitoring did to this host's VMs (for `cluster status`).
    monitoring: BTreeMap<VmId, policies::MonitoringRecord>,
    /// The latest `GET /vm/migrate` of each outgoing migration, kept after
    /// the source VMM is gone so the orchestrator reads the outcome.
    migrations: std::sync::Arc<std::sync::Mutex<BTreeMap<VmId, Value>>>,
}

/// Loads host.toml and the cluster, enables HA and runs the agent until the
/// process is killed. VMMs keep running when it stops.
pub fn run(config: &Path) -> Result<(), RuntimeError> {
    let host = HostConfig::load(config)?;
    let cluster = host.cluster_file()?;
    let me = HostId::new(host.host.as_str());
    let addr = cluster
        .agent_addr(&host.host)
        .ok_or_else(|| RuntimeError::NotAMember(host.host.clone()))?;
    let secret = ClusterSecret::new(host.secret()?);
    std::fs::create_dir_all(&host.run_dir).map_err(io(format!(
        "create run directory {}",
        host.run_dir.display()
    )))?;
    let incarnation = next_incarnation(&host.run_dir)?;
    // Live migration between hosts tells a shared disk by its datastore's
    // id file: give each datastore one if nobody has yet.
    for (name, path) in &host.datastores {
        if let Err(e) = files::ensure_datastore_id(path) {
            tracing::warn!(datastore = %name, error = %e, "cannot give the datastore its id file: live migration will refuse its disks");
        }
    }
    let timings = host.timings.apply();
    let mut isolation_addrs = host.isolation_addresses.clone();
    if isolation_addrs.is_empty() {
        isolation_addrs.extend(ping::default_gateway());
    }
    let cfg = AgentConfig {
        host: me.clone(),
        isolation_addrs,
        timings: timings.clone(),
        secret: secret.clone(),
        incarnation,
    };
    let udp = UdpSocket::bind(addr).map_err(io(format!("bind UDP {addr}")))?;
    let tcp = TcpListener::bind(addr).map_err(io(format!("listen on TCP {addr}")))?;
    let (tx, rx) = mpsc::channel();
    spawn_udp(
        udp.try_clone().map_err(io("clone the UDP socket"))?,
        tx.clone(),
    );
    spawn_tcp(tcp, secret, tx.clone());
    let vigil = match &host.vigil {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(io("find the vigil executable"))?,
    };
    let known_vms = files::registered_vms(&host);
    let polled = policies::LocalVms::default();
    policies::spawn_vm_poller(host.run_dir.clone(), polled.clone(), tx.clone());
    policies::spawn_datastore_prober(host.host.clone(), host.datastores.clone(), tx.clone());
    let mut rt = Runtime {
        agent: Agent::new(cfg),
        me: me.clone(),
        launch: Launch {
            host: me.clone(),
            vigil,
            run_dir: host.run_dir.clone(),
            lease: timings.lease,
        },
        host,
        cluster,
        udp,
        vmms: Vmms::default(),
        tx,
        shutdown_timeout: timings.shutdown_timeout,
        pending: VecDeque::new(),
        reply: None,
        known_vms,
        watched: BTreeMap::new(),
        polled,
        monitoring: BTreeMap::new(),
        migrations: Default::default(),
    };
    let now = vmms::now();
    let cluster_cfg = rt.cluster.to_config(rt.known_vms.clone());
    rt.feed(now, Input::Command(Command::EnableHa(cluster_cfg)));
    if let Some(Err(e)) = rt.reply.take() {
        return Err(RuntimeError::Enable(e.to_string()));
    }
    // Adopt first: the master must hear about running VMs before anything
    // could make it think they are lost.
    for vm in rt.vmms.adopt(&rt.host.run_dir) {
        rt.feed(
            now,
            Input::Vm {
                vm,
                event: crate::agent::VmEvent::PoweredOn,
            },
        );
    }
    // Maintenance mode outlives an agent (or host) restart, as an operator
    // expects: the host stays out of HA until `maintenance exit`.
    if policies::maintenance_marked(&rt.host.run_dir) {
        match rt.command(Command::EnterMaintenance) {
            Ok(m) => {
                tracing::info!(host = %me, "maintenance mode kept from before the restart: {m}")
            }
            Err(e) => tracing::warn!(host = %me, error = %e, "cannot stay in maintenance mode"),
        }
    }
    tracing::info!(host = %me, %addr, incarnation, "agent running");
    tracing::info!(host = %me, timings = ?timings, "agent timings");
    let watch = policies::SelfWatch::start(
        policies::SELFWATCH_THRESHOLD,
        crate::selfwatch::exit_on_stall,
    )
    .map_err(io("start the agent's self-watchdog"))?;
    rt.main_loop(&rx, &watch.progress());
    watch.stop();
    Ok(())
}

fn next_incarnation(run_dir: &Path) -> Result<u32, RuntimeError> {
    let p = run_dir.join("incarnation");
    let last: u32 = std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let next = last.saturating_add(1);
    vmm::lease::write_atomic(&p, next.to_string().as_bytes()).map_err(|e| RuntimeError::Io {
        what: format!("write {}", p.display()),
        source: std::io::Error::other(e),
    })?;
    Ok(next)
}

fn spawn_udp(sock: UdpSocket, tx: Sender<Ev>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if tx
                        .send(Ev::Input(Input::Message(buf[..n].to_vec())))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "UDP receive failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
}

fn spawn_tcp(listener: TcpListener, secret: ClusterSecret, tx: Sender<Ev>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (secret, tx) = (secret.clone(), tx.clone());
            std::thread::spawn(move || {
                let res = control::serve(stream, &secret, |req| {
                    let (rtx, rrx) = mpsc::channel();
                    if tx.send(Ev::Control(req, rtx)).is_err() {
                        return Reply::Error("agent is stopping".into());
                    }
                    rrx.recv_timeout(Duration::from_secs(20))
                        .unwrap_or_else(|_| Reply::Error("agent did not answer".into()))
                });
                if let Err(e) = res {
                    tracing::debug!(error = %e, "command connection failed");
                }
            });
        }
    });
}

impl Runtime {
    fn main_loop(&mut self, rx: &Receiver<Ev>, progress: &crate::selfwatch::Progress) {
        let tick = Duration::from_millis(100);
        let mut next_tick = Instant::now();
        let mut next_poll = Instant::now();
        let mut next_scan = Instant::now() + Duration::from_secs(3);
        let mut next_watch = Instant::now();
        loop {
            progress.beat("main loop");
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(ev) => self.on_event(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + tick;
                self.feed(vmms::now(), Input::Tick);
            }
            if now >= next_poll {
                next_poll = now + Duration::from_millis(200);
                for (vm, event) in self.vmms.poll(&self.host.run_dir, &self.me) {
                    self.feed(vmms::now(), Input::Vm { vm, event });
                }
                if let Ok(mut p) = self.polled.lock() {
                    *p = self.vmms.running().into_iter().collect();
                }
            }
            if now >= next_watch {
                next_watch = now + Duration::from_secs(1);
                self.watch_leases();
            }
            if now >= next_scan {
                next_scan = now + Duration::from_secs(3);
                self.scan_registrations();
            }
        }
    }

    /// Reads the lease of every known VM that does not run here and keeps
    /// the first local time each record value was seen. A failed read
    /// forgets the VM: nothing is assumed about a record not seen.
    fn watch_leases(&mut self) {
        let now = vmms::now();
        let vms: Vec<(VmId, Option<PathBuf>)> = self
            .known_vms
            .values()
            .filter(|c| !self.vmms.contains(&c.id))
            .map(|c| {
                (
                    c.id.clone(),
                    c.datastores.iter().next().and_then(|d| self.ds_path(d)),
                )
            })
            .collect();
        for (vm, ds) in vms {
            let rec = ds.and_then(|p| store::read_lease(&p, vm.as_str()).ok().flatten());
            match rec {
                Some(r) => {
                    if self.watched.get(&vm).is_none_or(|(old, _)| *old != r) {
                        self.watched.insert(vm, (r, now));
                    }
                }
                None => {
                    self.watched.remove(&vm);
                }
            }
        }
    }

    fn scan_registrations(&mut self) {
        for (id, cfg) in files::registered_vms(&self.host) {
            if self.known_vms.get(&id) != Some(&cfg) {
                tracing::info!(vm = %id, "VM registered");
                self.known_vms.insert(id, cfg.clone());
                self.feed(vmms::now(), Input::Command(Command::RegisterVm(cfg)));
                self.reply = None;
            }
        }
    }

    fn on_event(&mut self, ev: Ev) {
        match ev {
            Ev::Input(i) => self.feed(vmms::now(), i),
            Ev::Started(Ok(s)) => {
                let vm = s.vm.clone();
                self.vmms.insert(s);
                tracing::info!(vm = %vm, "VM running");
                self.feed(
                    vmms::now(),
                    Input::Vm {
                        vm,
                        event: crate::agent::VmEvent::PoweredOn,
                    },
                );
            }
            Ev::Started(Err((vm, reason))) => {
                tracing::warn!(vm = %vm, %reason, "VM start failed");
                self.feed(
                    vmms::now(),
                    Input::Vm {
                        vm,
                        event: crate::agent::VmEvent::StartFailed { reason },
                    },
                );
            }
            Ev::Control(Request::Incoming { vm, from_outside }, reply) => {
                self.incoming(VmId::new(vm), from_outside, reply)
            }
            Ev::Control(Request::MigrateOut { vm, to, options }, reply) => {
                self.migrate_out(VmId::new(vm), to, options, reply)
            }
            Ev::Control(req, reply) => {
                let r = self.on_request(req);
                let _ = reply.send(r);
            }
            Ev::Incoming(_, Ok(s)) => self.vmms.insert(s),
            Ev::Incoming(vm, Err(e)) => {
                tracing::warn!(vm = %vm, error = %e, "incoming VMM not started");
                self.feed(
                    vmms::now(),
                    Input::Vm {
                        vm,
                        event: crate::agent::VmEvent::IncomingEnded,
                    },
                );
            }
            Ev::MigratedOut(vm, ok) => {
                if !ok {
                    self.vmms.set_migrating(&vm, false);
                }
            }
        }
    }

    /// `Request::Incoming`: this host accepts the VM (not in maintenance,
    /// not running it), then a thread starts the waiting VMM and answers
    /// with its address once it listens.
    fn incoming(&mut self, vm: VmId, from_outside: bool, reply: Sender<Reply>) {
        self.scan_registrations();
        if let Err(e) = self.command(Command::AcceptIncoming { vm: vm.clone() }) {
            let _ = reply.send(local_reply(Err(e)));
            return;
        }
        let ds = self
            .known_vms
            .get(&vm)
            .and_then(|c| c.datastores.iter().next())
            .and_then(|d| self.ds_path(d));
        let ip = self.cluster.agent_addr(self.me.as_str()).map(|a| a.ip());
        let (launch, tx, seen) = (
            self.launch.clone(),
            self.tx.clone(),
            self.watched.get(&vm).cloned(),
        );
        std::thread::spawn(move || {
            let r = match (ds, ip) {
                (Some(ds), Some(ip)) => launch.start_incoming(&vm, &ds, ip, from_outside, seen),
                (None, _) => Err(format!(
                    "VM {vm} is not registered on a datastore this host mounts"
                )),
                (_, None) => Err("this host has no address in the cluster file".into()),
            };
            match r {
                Ok((started, address)) => {
                    tracing::info!(vm = %vm, %address, "waiting for the VM by live migration");
                    let _ = tx.send(Ev::Incoming(vm, Ok(started)));
                    let _ = reply.send(Reply::Ok(json!({ "address": address })));
                }
                Err(e) => {
                    let _ = reply.send(Reply::Error(e.clone()));
                    let _ = tx.send(Ev::Incoming(vm, Err(e)));
                }
            }
        });
    }

    /// `Request::MigrateOut`: starts the VMM's migration to `to` and
    /// follows it (`GET /vm/migrate`) in a thread until it ends; the
    /// outcome stays readable with `MigrationStatus`.
    fn migrate_out(&mut self, vm: VmId, to: String, options: Value, reply: Sender<Reply>) {
        if !self.vmms.set_migrating(&vm, true) {
            let _ = reply.send(Reply::Error(CommandError::NotRunningHere(vm).to_string()));
            return;
        }
        let mut body = match options {
            Value::Object(m) => Value::Object(m),
            _ => json!({}),
        };
        body["to"] = Value::String(to.clone());
        let sock = vmms::run_files(&self.host.run_dir, &vm).socket;
        let (tx, shared) = (self.tx.clone(), self.migrations.clone());
        if let Ok(mut m) = shared.lock() {
            m.insert(
                vm.clone(),
                json!({ "state": "running", "to": to, "stage": "connect" }),
            );
        }
        std::thread::spawn(move || {
            let set = |v: Value| {
                if let Ok(mut m) = shared.lock() {
                    m.insert(vm.clone(), v);
                }
            };
            if let Err(e) = vmm::api::client::call(
                &sock,
                "PUT",
                "/vm/migrate",
                Some(&body),
                Duration::from_secs(30),
            ) {
                let msg = e.to_string();
                set(
                    json!({ "state": "failed", "to": to, "stage": "connect", "error": msg,
                            "vm_running_here": true }),
                );
                let _ = reply.send(Reply::Error(msg));
                let _ = tx.send(Ev::MigratedOut(vm, false));
                return;
            }
            let _ = reply.send(Reply::Ok(json!({ "state": "running", "to": to })));
            let mut failures = 0;
            loop {
                std::thread::sleep(Duration::from_millis(100));
                match vmm::api::client::call(
                    &sock,
                    "GET",
                    "/vm/migrate",
                    None,
                    Duration::from_secs(5),
                ) {
                    Ok(v) => {
                        failures = 0;
                        let state = v["state"].as_str().unwrap_or("").to_string();
                        set(v);
                        if state != "running" {
                            let _ = tx.send(Ev::MigratedOut(vm, state == "succeeded"));
                            return;
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        if failures >= 20 {
                            set(json!({ "state": "unknown", "to": to,
                                        "error": format!("the source VMM stopped answering: {e}") }));
                            let _ = tx.send(Ev::MigratedOut(vm, false));
                            return;
                        }
                    }
                }
            }
        });
    }

    fn command(&mut self, c: Command) -> Result<String, CommandError> {
        self.reply = None;
        self.feed(vmms::now(), Input::Command(c));
        self.reply
            .take()
            .unwrap_or_else(|| Ok("accepted".to_string()))
    }

    fn on_request(&mut self, req: Request) -> Reply {
        match req {
            Request::LocalStatus => Reply::Ok(self.status_json()),
            Request::Status => match self.agent.master() {
                Some(m)
                    if m != &self.me && self.agent.state() != crate::types::HostHaState::Master =>
                {
                    Reply::Redirect(m.to_string())
                }
                _ => Reply::Ok(self.status_json()),
            },
            Request::Start { vm, host } => {
                // A VM registered a moment ago may not have been scanned yet.
                self.scan_registrations();
                let r = self.command(Command::PowerOnVm {
                    vm: VmId::new(vm),
                    host: host.map(HostId::new),
                });
                to_reply(r)
            }
            Request::Stop { vm } => {
                to_reply(self.command(Command::PowerOffVm { vm: VmId::new(vm) }))
            }
            Request::SetVm {
                vm,
                cpu_mhz,
                mem_mib,
                priority,
            } => self.set_vm(&vm, cpu_mhz, mem_mib, priority),
            Request::CheckMaintenance { host, power_off } => {
                to_reply(self.command(Command::CheckMaintenance {
                    host: HostId::new(host),
                    power_off,
                }))
            }
            Request::EnterMaintenance => {
                let r = self.command(Command::EnterMaintenance);
                if r.is_ok() {
                    policies::mark_maintenance(&self.host.run_dir, true);
                    tracing::warn!(host = %self.me, "in maintenance mode: no VMs run or restart here");
                }
                local_reply(r)
            }
            Request::PlanMigration {
                vm,
                host,
                from_outside,
            } => {
                self.scan_registrations();
                let vm = VmId::new(vm);
                let r = self.command(Command::BeginMigration {
                    vm: vm.clone(),
                    to: host.map(HostId::new),
                    from_outside,
                });
                match (r, self.agent.planned_migration(&vm)) {
                    (Ok(_), Some((from, to))) => Reply::Ok(json!({ "from": from, "to": to })),
                    (Ok(m), None) => Reply::Error(format!("internal: {m}, but no plan kept")),
                    (Err(e), _) => to_reply(Err(e)),
                }
            }
            Request::EndMigration { vm, ok } => to_reply(self.command(Command::EndMigration {
                vm: VmId::new(vm),
                ok,
            })),
            Request::CancelIncoming { vm } => {
                let vm = VmId::new(vm);
                if self.vmms.cancel_incoming(&vm) {
                    Reply::Ok(Value::String(format!("stopped the VMM waiting for {vm}")))
                } else {
                    Reply::Ok(Value::String(format!("no VMM waits for {vm} here")))
                }
            }
            Request::MigrationStatus { vm } => {
                let v = self
                    .migrations
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&VmId::new(vm.as_str())).cloned());
                match v {
                    Some(v) => Reply::Ok(v),
                    None => Reply::Error(format!("no migration of {vm} from this host")),
                }
            }
            Request::CancelMigration { vm } => {
                let sock = vmms::run_files(&self.host.run_dir, &VmId::new(vm.as_str())).socket;
                match vmm::api::client::call(
                    &sock,
                    "PUT",
                    "/vm/migrate/cancel",
                    None,
                    Duration::from_secs(5),
                ) {
                    Ok(v) => Reply::Ok(v),
                    Err(e) => Reply::Error(format!("cannot cancel the migration of {vm}: {e}")),
                }
            }
            Request::Incoming { .. } | Request::MigrateOut { .. } => {
                Reply::Error("internal: handled asynchronously".into())
            }
            Request::ExitMaintenance => {
                let r = self.command(Command::ExitMaintenance);
                if r.is_ok() {
                    policies::mark_maintenance(&self.host.run_dir, false);
                    tracing::info!(host = %self.me, "out of maintenance mode");
                }
                local_reply(r)
            }
        }
    }

    /// `vigil vm set` (master only): admission control checks a larger
    /// reservation of a powered-on VM, then the VM's `ha.toml` on its
    /// datastore is rewritten and the cluster view updated from it (the
    /// other agents see the file at their next scan). A refusal or a failed
    /// write changes nothing.
    fn set_vm(
        &mut self,
        vm: &str,
        cpu_mhz: Option<u64>,
        mem_mib: Option<u64>,
        priority: Option<crate::types::RestartPriority>,
    ) -> Reply {
        if self.agent.state() != crate::types::HostHaState::Master {
            return match self.agent.master() {
                Some(m) if m != &self.me => Reply::Redirect(m.to_string()),
                _ => Reply::Error(CommandError::NotMaster { master: None }.to_string()),
            };
        }
        // A VM registered a moment ago may not have been scanned yet.
        self.scan_registrations();
        let id = VmId::new(vm);
        let Some(path) = self.known_vms.get(&id).and_then(|c| {
            let ds = c.datastores.iter().next()?;
            Some(files::vm_dir(&self.ds_path(ds)?, vm).join("ha.toml"))
        }) else {
            return Reply::Error(CommandError::UnknownVm(id).to_string());
        };
        let old = match files::VmHaSettings::load(&path) {
            Ok(s) => s,
            Err(e) => return Reply::Error(format!("cannot read VM {vm}'s settings: {e}")),
        };
        let new = old.changed(cpu_mhz, mem_mib, priority);
        let change = old.describe_change(&new);
        if new == old {
            return Reply::Ok(Value::String(format!("VM {vm}: unchanged")));
        }
        let reservation = crate::types::Resources::new(new.cpu_mhz, new.mem_mib);
        let note = match self.command(Command::CheckReservation {
            vm: id.clone(),
            reservation,
        }) {
            Ok(note) => note,
            Err(e) => return to_reply(Err(e)),
        };
        if let Err(e) = new.store(&path) {
            return Reply::Error(format!(
                "VM {vm} keeps its settings: cannot write them: {e}"
            ));
        }
        tracing::info!(vm = %id, %change, "VM settings changed");
        self.scan_registrations();
        Reply::Ok(Value::String(format!("VM {vm}: {change} ({note})")))
    }

    fn status_json(&self) -> Value {
        let s: AgentStatus = self.agent.status();
        json!({
            "host": s.host,
            "state": s.state,
            "master": s.master,
            "hosts": s.hosts,
            "vms": s.vms,
            "local_vms": self.vmms.running(),
            "monitoring": self.monitoring,
            "capacity": self.agent.capacity(vmms::now()).map(|c| json!({
                "report": c,
                "text": c.to_string(),
            })),
        })
    }

    /// Feeds one input and carries out the actions (and the inputs they
    /// produce at once, such as datastore reads).
    fn feed(&mut self, now: crate::time::Time, input: Input) {
        self.pending.push_back(input);
        while let Some(i) = self.pending.pop_front() {
            for a in self.agent.handle(now, i) {
                self.act(a);
            }
        }
    }

    fn ds_path(&self, ds: &DatastoreId) -> Option<PathBuf> {
        self.host.datastores.get(ds.as_str()).cloned()
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Send { to, bytes } => {
                if let Some(addr) = self.cluster.agent_addr(to.as_str()) {
                    if let Err(e) = self.udp.send_to(&bytes, addr) {
                        tracing::debug!(to = %to, error = %e, "send failed");
                    }
                }
            }
            Action::Ping { addr } => {
                let tx = self.tx.clone();
                let timeout = self.agent_ping_timeout();
                std::thread::spawn(move || {
                    let answered = ping::ping(&addr, timeout);
                    let _ = tx.send(Ev::Input(Input::PingResult { addr, answered }));
                });
            }
            Action::WriteHeartbeat { datastores, record } => {
                for ds in datastores {
                    let Some(p) = self.ds_path(&ds) else { continue };
                    if let Err(e) = store::write_heartbeat(&p, &record) {
                        tracing::warn!(datastore = %ds, error = %e, "heartbeat write failed");
                    }
                }
            }
            Action::ReadDatastores { datastores } => {
                for ds in datastores {
                    let result = match self.ds_path(&ds) {
                        Some(p) => store::read_heartbeats(&p),
                        None => Err("not mounted here".into()),
                    };
                    self.pending.push_back(Input::DatastoreRead {
                        datastore: ds,
                        result,
                    });
                }
            }
            Action::PersistProtectedList { datastores, list } => {
                for ds in datastores {
                    let Some(p) = self.ds_path(&ds) else { continue };
                    if let Err(e) = store::write_protected(&p, &list) {
                        tracing::warn!(datastore = %ds, error = %e, "protected list write failed");
                    }
                }
            }
            Action::ReadProtectedList { datastores } => {
                let best = datastores
                    .iter()
                    .filter_map(|ds| self.ds_path(ds))
                    .filter_map(|p| store::read_protected(&p).ok().flatten())
                    .max_by_key(|l| l.version);
                self.pending.push_back(Input::ProtectedListRead(best));
            }
            Action::ReadLeases { leases } => {
                for (vm, ds) in leases {
                    let result = match self.ds_path(&ds) {
                        Some(p) => store::read_lease(&p, vm.as_str()),
                        None => Err("not mounted here".into()),
                    };
                    self.pending.push_back(Input::LeaseRead { vm, result });
                }
            }
            Action::StartVm { vm } => {
                let ds = vm.datastores.iter().next().and_then(|d| self.ds_path(d));
                let tx = self.tx.clone();
                let launch = self.launch.clone();
                let id = vm.id.clone();
                let seen = self.watched.get(&id).cloned();
                std::thread::spawn(move || {
                    let r = match ds {
                        Some(ds) => launch.start(&id, &ds, seen),
                        None => Err("the VM's datastore is not mounted on this host".into()),
                    };
                    let _ = tx.send(Ev::Started(r.map_err(|e| (id, e))));
                });
            }
            Action::PowerOffVm { vm, reason } => {
                tracing::info!(vm = %vm, ?reason, "powering off");
                if !self
                    .vmms
                    .power_off(&vm, reason != PowerOffReason::StaleCopy)
                {
                    self.pending.push_back(Input::Vm {
                        vm,
                        event: crate::agent::VmEvent::PoweredOff,
                    });
                }
            }
            Action::ShutdownVm { vm } => {
                let run_dir = self.host.run_dir.clone();
                let t = self.shutdown_timeout;
                std::thread::spawn(move || Vmms::shutdown_at(&run_dir, &vm, t));
            }
            Action::ResetVm { vm, reason } => policies::reset(&self.host.run_dir, vm, reason),
            Action::CommandDone(r) => self.reply = Some(r),
            Action::Event(crate::agent::HaEvent::Summary {
                uptime,
                state,
                vms_running,
                vms_protected,
            }) => policies::write_summary(
                &self.host.run_dir,
                &self.host.host,
                &self.vmms.pids(),
                &state.to_string(),
                uptime,
                vms_running,
                vms_protected,
            ),
            Action::Event(e) => {
                policies::record_monitoring(&mut self.monitoring, &e);
                tracing::info!(host = %self.me, event = ?e, "HA event")
            }
        }
    }

    fn agent_ping_timeout(&self) -> Duration {
        self.host.timings.apply().ping_timeout
    }
}

fn to_reply(r: Result<String, CommandError>) -> Reply {
    match r {
        Ok(m) => Reply::Ok(Value::String(m)),
        Err(CommandError::NotMaster { master: Some(m) }) => Reply::Redirect(m.to_string()),
        Err(e) => Reply::Error(e.to_string()),
    }
}

/// A reply from this host itself: never a redirect (maintenance mode is
/// the host's own state, whoever is master).
fn local_reply(r: Result<String, CommandError>) -> Reply {
    match r {
        Ok(m) => Reply::Ok(Value::String(m)),
        Err(e) => Reply::Error(e.to_string()),
    }
}

/// Sends `req` to this host's agent and follows redirects (at most two):
/// what `vigil cluster status` and `vigil vm start|stop|list` do.
pub fn ask(host: &HostConfig, req: &Request) -> Result<(String, Value), String> {
    let cluster = host.cluster_file().map_err(|e| e.to_string())?;
    let secret = ClusterSecret::new(host.secret().map_err(|e| e.to_string())?);
    ask_at(&cluster, &secret, &host.host, req)
}

/// [`ask`] starting at a given host.
pub fn ask_at(
    cluster: &ClusterFile,
    secret: &ClusterSecret,
    first: &str,
    req: &Request,
) -> Result<(String, Value), String> {
    let mut target = first.to_string();
    for _ in 0..3 {
        let addr: SocketAddr = cluster
            .agent_addr(&target)
            .ok_or_else(|| format!("host {target} is not in the cluster file"))?;
        match control::call(addr, secret, req)? {
            Reply::Ok(v) => return Ok((target, v)),
            Reply::Error(e) => return Err(format!("{target}: {e}")),
            Reply::Redirect(h) => target = h,
        }
    }
    Err("too many redirects (an election is under way?): try again".into())
}

impl Vmms {
    /// [`Vmms::shutdown`] without a `Vmms` (from a helper thread).
    pub fn shutdown_at(run_dir: &Path, vm: &VmId, timeout: Duration) {
        Vmms::default().shutdown(run_dir, vm, timeout);
    }
}
