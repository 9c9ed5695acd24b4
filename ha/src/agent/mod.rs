//! The agent state machine: one per host, I/O-free.
//!
//! Drive it with [`Agent::handle`]`(now, input)`; carry out the returned
//! [`Action`]s; feed their results back as inputs. Call it with
//! [`Input::Tick`] often (every 100 ms is plenty): every timer lives in the
//! state and fires on the first tick at or after its deadline. `now` is the
//! host's monotonic clock; it is never compared with another host's.
//!
//! # Wiring contract (what a runtime must do for each action)
//!
//! | Action | the runtime... | then feeds back |
//! |--------|----------------|-----------------|
//! | `Send { to, bytes }` | sends the bytes to `to`'s agent port (UDP/TCP; loss is tolerated) | `Message(bytes)` on the receiver |
//! | `Ping { addr }` | ICMP-pings `addr`, waits up to `Timings::ping_timeout` | `PingResult { addr, answered }` (always, also on timeout) |
//! | `WriteHeartbeat { datastores, record }` | writes `record` to this host's heartbeat file on each datastore (I/O errors: log, no input) | nothing |
//! | `ReadDatastores { datastores }` | reads every host's heartbeat file on each datastore | one `DatastoreRead` per datastore, `Err` on I/O failure |
//! | `PersistProtectedList` / `ReadProtectedList` | writes / reads the list file (readers keep the highest `version`) | `ProtectedListRead(Option<_>)` |
//! | `ReadLeases { leases }` | reads each VM's lease record | one `LeaseRead` per VM |
//! | `StartVm { vm }` | acquires the VM's lease (`lease::LeaseObserver`: waits `takeover_time` of an unchanged record), then starts the VMM | `Vm { PoweredOn }` or `Vm { StartFailed }` |
//! | `PowerOffVm` / `ShutdownVm` | acts on the VMM; releases the lease on power-off unless the reason is `StaleCopy` (with `DatastoreLost` the release may fail: the lease then lapses) | `Vm { PoweredOff }` when it is off |
//! | `ResetVm { vm, reason }` | `POST /vm/reset {"reason": reason}` on the VM's API socket (the VMM boots the guest again in the same process; the lease is kept) | nothing (the VM stays `PoweredOn`) |
//! | `CommandDone` / `Event` | answers the CLI / logs | nothing |
//!
//! Operator commands come in as `Input::Command` and are answered with one
//! `CommandDone`. Before sending `EnterMaintenance` to a slave, the CLI asks
//! the master with `CheckMaintenance { host }` (admission control decides
//! on the master; the master checks itself on `EnterMaintenance`). The
//! master's `Agent::capacity` is what `cluster status` shows.
//!
//! Unprompted, the runtime also reports, for each local VM: lease renewals
//! (`LeaseRenewed { issued_at }` every `renew_interval`), a lease read that
//! shows another owner (`LeaseLost`), crashes, and, when VM monitoring is on
//! (`ClusterConfig::monitoring_for`), guest tools heartbeats
//! (`ToolsHeartbeat`, when `GET /vm/heartbeat` shows a newer one), application
//! heartbeats (`AppHeartbeat`) and disk/network I/O (`IoActivity`, when the
//! sum of `GET /vm/counters` grew: `monitoring::IoTracker` does the
//! comparison and survives the counters' restart at a reset), polled every
//! few seconds. It also probes each datastore this host mounts (a small
//! read and write with a timeout, every few seconds) and reports
//! `DatastoreAccess { datastore, accessible }` (at least on every change)
//! for datastore-loss protection (`vmcp.rs`). At agent start it reports
//! every VM already running (`PoweredOn`) so a restarted agent adopts them.
//!
//! # Roles
//! Every host starts in `Election`; the best candidate heard during the
//! election window (`rules::election_cmp`) becomes master, the others
//! slaves. `master.rs` is what only the master does (host monitoring,
//! classification, restart queue), `placement.rs` where restarts and
//! power-ons go, `local.rs` what every host does with its own VMs (restart
//! orders, isolation responses, lease enforcement, VM monitoring),
//! `isolation.rs` isolation detection, `vmcp.rs` datastore-loss protection.
//!
//! # A failover, end to end
//! ```text
//!  slave host-1          master host-3                    slave host-2
//!   (dies)   --x        no heartbeat for host_timeout
//!                       Ping(mgmt-host-1) -> no answer
//!                       DS record unchanged ds_liveness_timeout
//!                       HostClassified(host-1, failed)
//!                       RestartQueued(vm) ... by priority
//!                       place: capacity, datastores  --RestartOrder(vm)-->
//!                                                         StartVm: wait for the
//!                                                         lease (takeover_time)
//!                                            <--VmStates(vm: on)--
//!                       VmRestarted(vm, host-2)
//! ```

mod api;
mod isolation;
mod local;
mod master;
mod placement;
mod vmcp;

pub use api::*;

use crate::config::{AgentConfig, ClusterConfig};
use crate::lease::LeaseHolder;
use crate::rules::{election_cmp, election_winner, heartbeat_datastores};
use crate::time::Time;
use crate::types::{DatastoreId, HostHaState, HostId, VmId};
use crate::wire::{self, Body, PowerState, ReplayGuard, Role, Signed};
use master::MasterState;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// What this host knows about a peer from its heartbeats.
#[derive(Debug, Clone)]
struct Peer {
    last_heard: Time,
    role: Role,
    datastores: u32,
    master: Option<HostId>,
}

/// A VM on this host.
#[derive(Debug, Clone)]
struct LocalVm {
    power: PowerState,
    lease: Option<LeaseHolder>,
    shutdown_deadline: Option<Time>,
    /// Present when VM monitoring is enabled for it.
    monitor: Option<crate::monitoring::VmMonitor>,
    /// The hang was reported already (limit reached): do not repeat.
    limit_reported: bool,
}

/// Where the isolation check stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IsolationCheck {
    Idle {
        last_check: Option<Time>,
    },
    Pinging {
        started: Time,
        answers: BTreeMap<String, Option<bool>>,
    },
    /// Every address failed; declare after the policy delay.
    Confirmed {
        at: Time,
    },
}

/// The HA agent of one host.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    cluster: Option<ClusterConfig>,
    state: HostHaState,
    master: Option<HostId>,
    seq: u32,
    replay: ReplayGuard,
    peers: BTreeMap<HostId, Peer>,
    last_traffic: Time,
    next_heartbeat: Time,
    next_ds_write: Time,
    ds_counter: u64,
    election_started: Time,
    isolation: IsolationCheck,
    hb_datastores: Vec<DatastoreId>,
    local: BTreeMap<VmId, LocalVm>,
    starting: BTreeSet<VmId>,
    /// VMs arriving by live migration: not reported until they run here.
    incoming: BTreeSet<VmId>,
    off_reasons: BTreeMap<VmId, PowerOffReason>,
    released: BTreeSet<VmId>,
    master_state: Option<MasterState>,
    warned_no_isolation_addr: bool,
    /// Time of the latest input, for code paths that are not handed `now`.
    last_tick: Time,
    enabled_at: Time,
    next_summary: Time,
    /// Local datastores the runtime's probe finds unreachable, since when.
    ds_lost: BTreeMap<DatastoreId, Time>,
    /// When the set last changed.
    ds_access_changed: Option<Time>,
}

impl Agent {
    /// A new agent; HA starts with [`Command::EnableHa`].
    pub fn new(cfg: AgentConfig) -> Self {
        Self {
            cfg,
            cluster: None,
            state: HostHaState::Uninitialized,
            master: None,
            seq: 0,
            replay: ReplayGuard::default(),
            peers: BTreeMap::new(),
            last_traffic: Time::ZERO,
            next_heartbeat: Time::ZERO,
            next_ds_write: Time::ZERO,
            ds_counter: 0,
            election_started: Time::ZERO,
            isolation: IsolationCheck::Idle { last_check: None },
            hb_datastores: Vec::new(),
            local: BTreeMap::new(),
            starting: BTreeSet::new(),
            incoming: BTreeSet::new(),
            off_reasons: BTreeMap::new(),
            released: BTreeSet::new(),
            master_state: None,
            warned_no_isolation_addr: false,
            last_tick: Time::ZERO,
            enabled_at: Time::ZERO,
            next_summary: Time::ZERO,
            ds_lost: BTreeMap::new(),
            ds_access_changed: None,
        }
    }

    /// This host's id.
    pub fn host(&self) -> &HostId {
        &self.cfg.host
    }

    /// This host's HA state.
    pub fn state(&self) -> HostHaState {
        self.state
    }

    /// The master this host follows.
    pub fn master(&self) -> Option<&HostId> {
        self.master.as_ref()
    }

    /// The heartbeat datastores this host writes to.
    pub fn heartbeat_datastores(&self) -> &[DatastoreId] {
        &self.hb_datastores
    }

    /// The status the CLI shows.
    pub fn status(&self) -> AgentStatus {
        let (hosts, vms) = match &self.master_state {
            Some(m) => (m.host_states(&self.cfg.host), m.vm_states()),
            None => (BTreeMap::new(), BTreeMap::new()),
        };
        AgentStatus {
            host: self.cfg.host.clone(),
            state: self.state,
            master: self.master.clone(),
            hosts,
            vms,
        }
    }

    /// Feeds one input at local monotonic time `now`; returns what to do.
    pub fn handle(&mut self, now: Time, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        self.last_tick = self.last_tick.max(now);
        match input {
            Input::Command(c) => self.on_command(now, c, &mut out),
            Input::Tick => self.on_tick(now, &mut out),
            // HA disabled (or never enabled): only heartbeats go out.
            _ if self.state == HostHaState::Uninitialized => {}
            Input::Message(bytes) => self.on_message(now, &bytes, &mut out),
            Input::DatastoreRead { datastore, result } => {
                if let Some(m) = self.master_state.as_mut() {
                    m.on_ds_read(now, datastore, result);
                }
            }
            Input::PingResult { addr, answered } => self.on_ping(now, addr, answered, &mut out),
            Input::Vm { vm, event } => self.on_vm_event(now, vm, event, &mut out),
            Input::ProtectedListRead(list) => {
                if let (Some(m), Some(list)) = (self.master_state.as_mut(), list) {
                    m.merge_protected_list(list);
                }
            }
            Input::LeaseRead { vm, result } => {
                if let Some(m) = self.master_state.as_mut() {
                    m.on_lease_read(now, vm, result);
                }
            }
            Input::DatastoreAccess {
                datastore,
                accessible,
            } => self.on_datastore_access(now, datastore, accessible, &mut out),
        }
        out
    }

    fn cluster(&self) -> &ClusterConfig {
        // Only called once HA is enabled.
        self.cluster.as_ref().expect("HA enabled")
    }

    fn my_datastore_count(&self) -> u32 {
        self.cluster()
            .hosts
            .get(&self.cfg.host)
            .map_or(0, |h| h.datastores.len() as u32)
    }

    fn set_state(&mut self, to: HostHaState, out: &mut Vec<Action>) {
        if self.state != to {
            tracing::info!(host = %self.cfg.host, from = %self.state, to = %to, "HA state change");
            out.push(Action::Event(HaEvent::StateChanged {
                from: self.state,
                to,
            }));
            self.state = to;
        }
    }

    fn seal(&mut self, to: &HostId, body: Body) -> Option<Action> {
        self.seq = self.seq.saturating_add(1);
        let signed = Signed {
            sender: self.cfg.host.clone(),
            seq: u64::from(self.cfg.incarnation) << 32 | u64::from(self.seq),
            body,
        };
        match wire::seal(&self.cfg.secret, &signed) {
            Ok(bytes) => Some(Action::Send {
                to: to.clone(),
                bytes,
            }),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode message");
                None
            }
        }
    }

    fn send(&mut self, to: &HostId, body: Body, out: &mut Vec<Action>) {
        if to == &self.cfg.host {
            return;
        }
        if let Some(a) = self.seal(to, body) {
            out.push(a);
        }
    }

    fn role(&self) -> Role {
        match self.state {
            HostHaState::Master => Role::Master,
            HostHaState::Slave => Role::Slave,
            HostHaState::Maintenance => Role::Maintenance,
            HostHaState::Uninitialized => Role::Disabled,
            _ => Role::Candidate,
        }
    }

    fn on_command(&mut self, now: Time, cmd: Command, out: &mut Vec<Action>) {
        if !matches!(cmd, Command::EnableHa(_)) && self.state == HostHaState::Uninitialized {
            out.push(Action::CommandDone(Err(CommandError::NotEnabled)));
            return;
        }
        match cmd {
            Command::EnableHa(cluster) => {
                if let Err(e) = self.cfg.validate(&cluster) {
                    // The operator sees the whole chain, sources included.
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(c) = src {
                        msg = format!("{msg}: {c}");
                        src = c.source();
                    }
                    out.push(Action::CommandDone(Err(CommandError::InvalidConfig(msg))));
                    return;
                }
                self.enabled_at = now;
                self.next_summary = now + self.cfg.timings.summary_interval;
                let mounts = cluster
                    .hosts
                    .iter()
                    .map(|(h, s)| (h.clone(), s.datastores.clone()))
                    .collect();
                self.hb_datastores =
                    heartbeat_datastores(&self.cfg.host, &mounts, cluster.heartbeat_datastores);
                if self.hb_datastores.len() < 2 {
                    out.push(Action::Event(HaEvent::TooFewHeartbeatDatastores {
                        count: self.hb_datastores.len(),
                    }));
                }
                self.cluster = Some(cluster);
                self.start_election(now, out);
                self.last_traffic = now;
                out.push(Action::CommandDone(Ok("HA enabled".into())));
            }
            Command::DisableHa => {
                // The cluster view is kept so heartbeats keep saying "HA
                // disabled here": the master then leaves this host's VMs
                // alone instead of taking its silence for a failure.
                self.master_state = None;
                self.master = None;
                self.set_state(HostHaState::Uninitialized, out);
                out.push(Action::CommandDone(Ok("HA disabled".into())));
            }
            Command::EnterMaintenance => {
                if self.state == HostHaState::Maintenance {
                    out.push(Action::CommandDone(Ok("already in maintenance".into())));
                    return;
                }
                let busy: Vec<String> = self
                    .local_power_states()
                    .into_iter()
                    .filter(|(_, p)| matches!(p, PowerState::On | PowerState::Starting))
                    .map(|(vm, _)| vm.to_string())
                    .chain(self.incoming.iter().map(|vm| format!("{vm} (arriving)")))
                    .collect();
                if !busy.is_empty() {
                    out.push(Action::CommandDone(Err(CommandError::MaintenanceBusy {
                        host: self.cfg.host.clone(),
                        vms: busy.join(", "),
                    })));
                    return;
                }
                if self.state == HostHaState::Master {
                    // Nothing runs here (checked above): whatever the
                    // master's view still places on this host is off.
                    let me = self.cfg.host.clone();
                    if let Err(e) = self.check_maintenance(now, &me, true) {
                        out.push(Action::CommandDone(Err(e)));
                        return;
                    }
                }
                self.master_state = None;
                self.master = None;
                self.set_state(HostHaState::Maintenance, out);
                out.push(Action::CommandDone(Ok("in maintenance".into())));
            }
            Command::ExitMaintenance => {
                if self.state == HostHaState::Maintenance {
                    self.start_election(now, out);
                }
                out.push(Action::CommandDone(Ok("out of maintenance".into())));
            }
            Command::RegisterVm(vm) => {
                let cluster = self.cluster.as_mut().expect("HA enabled");
                match vm
                    .datastores
                    .iter()
                    .find(|d| !cluster.hosts.values().any(|h| h.datastores.contains(*d)))
                {
                    Some(d) => out.push(Action::CommandDone(Err(CommandError::InvalidConfig(
                        format!(
                            "VM {} is on datastore {d}, which no host of the cluster mounts",
                            vm.id
                        ),
                    )))),
                    None => {
                        let msg = format!("VM {} registered", vm.id);
                        cluster.vms.insert(vm.id.clone(), vm);
                        out.push(Action::CommandDone(Ok(msg)));
                    }
                }
            }
            Command::CheckMaintenance { host, power_off } => {
                let r = self
                    .check_maintenance(now, &host, power_off)
                    .map(|()| format!("{host} may enter maintenance mode"));
                out.push(Action::CommandDone(r));
            }
            Command::CheckReservation { vm, reservation } => {
                out.push(Action::CommandDone(self.check_reservation(
                    now,
                    &vm,
                    reservation,
                )));
            }
            Command::PowerOffVm { vm } => self.user_power_off(vm, out),
            Command::BeginMigration {
                vm,
                to,
                from_outside,
            } => {
                let r = self.begin_migration(now, vm, to, from_outside);
                out.push(Action::CommandDone(r));
            }
            Command::EndMigration { vm, ok } => {
                let r = self.end_migration(now, vm, ok, out);
                out.push(Action::CommandDone(r));
            }
            Command::AcceptIncoming { vm } => self.accept_incoming(vm, out),
            Command::PowerOnVm { vm, host } => self.user_power_on(now, vm, host, out),
        }
    }

    fn start_election(&mut self, now: Time, out: &mut Vec<Action>) {
        self.master_state = None;
        self.master = None;
        self.election_started = now;
        self.set_state(HostHaState::Election, out);
    }

    fn heard_recently(&self, p: &Peer, now: Time) -> bool {
        now.since(p.last_heard) < self.cfg.timings.host_timeout
    }

    fn on_tick(&mut self, now: Time, out: &mut Vec<Action>) {
        if self.cluster.is_none() {
            return;
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.cfg.timings.heartbeat_interval;
            self.broadcast_heartbeat(out);
        }
        if self.state == HostHaState::Uninitialized {
            return;
        }
        if now >= self.next_ds_write {
            self.next_ds_write = now + self.cfg.timings.ds_heartbeat_interval;
            self.write_ds_heartbeat(out);
        }
        match self.state {
            HostHaState::Election => self.tick_election(now, out),
            HostHaState::Slave => self.tick_slave(now, out),
            HostHaState::Master => {
                self.tick_master(now, out);
                self.tick_datastore_loss(now, out);
            }
            _ => {}
        }
        if matches!(self.state, HostHaState::Master | HostHaState::Isolated) {
            self.tick_isolation(now, out);
        }
        self.tick_local(now, out);
        if now >= self.next_summary {
            self.next_summary = now + self.cfg.timings.summary_interval;
            let vms_running = self
                .local
                .values()
                .filter(|v| v.power == PowerState::On)
                .count();
            let vms_protected = self.master_state.as_ref().map(|m| m.protected_count());
            let ev = HaEvent::Summary {
                uptime: now.since(self.enabled_at),
                state: self.state,
                vms_running,
                vms_protected,
            };
            tracing::info!(host = %self.cfg.host, uptime_s = now.since(self.enabled_at).as_secs(), state = %self.state, vms_running, "hourly summary");
            out.push(Action::Event(ev));
        }
    }

    fn broadcast_heartbeat(&mut self, out: &mut Vec<Action>) {
        let body = Body::Heartbeat {
            role: self.role(),
            datastores: self.my_datastore_count(),
            master: self.master.clone(),
        };
        let peers: Vec<HostId> = self
            .cluster()
            .hosts
            .keys()
            .filter(|h| **h != self.cfg.host)
            .cloned()
            .collect();
        for p in peers {
            self.send(&p, body.clone(), out);
        }
        // Full VM lists every heartbeat: a lost report is repaired by the
        // next, and the master can tell a VM is missing (see master.rs).
        if matches!(self.state, HostHaState::Slave | HostHaState::Master) {
            let now = self.last_tick;
            self.report_local(now, out);
            if self.ds_access_report_due(now) {
                self.report_ds_access(now, out);
            }
        }
    }

    fn write_ds_heartbeat(&mut self, out: &mut Vec<Action>) {
        if self.hb_datastores.is_empty() {
            return;
        }
        self.ds_counter += 1;
        let now = self.last_tick;
        let peers_heard = self
            .peers
            .values()
            .filter(|p| self.heard_recently(p, now))
            .count() as u32;
        out.push(Action::WriteHeartbeat {
            datastores: self.hb_datastores.clone(),
            record: DsRecord {
                host: self.cfg.host.clone(),
                counter: self.ds_counter,
                state: self.state,
                peers_heard,
                released: self.released.clone(),
            },
        });
    }

    /// Masters heard recently, best first.
    fn masters_heard(&self, now: Time) -> Vec<(HostId, u32)> {
        let mut v: Vec<(HostId, u32)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.role == Role::Master && self.heard_recently(p, now))
            .map(|(h, p)| (h.clone(), p.datastores))
            .collect();
        v.sort_by(|a, b| election_cmp((&b.0, b.1), (&a.0, a.1)));
        v
    }

    fn become_slave(&mut self, now: Time, master: HostId, out: &mut Vec<Action>) {
        self.master_state = None;
        self.master = Some(master.clone());
        self.set_state(HostHaState::Slave, out);
        out.push(Action::Event(HaEvent::JoinedMaster {
            master: master.clone(),
        }));
        // Report at once so the new master has our VMs before it classifies.
        let vms = self.local_power_states();
        self.send(&master, Body::VmStates { vms }, out);
        self.isolation = IsolationCheck::Idle {
            last_check: Some(now),
        };
    }

    fn tick_election(&mut self, now: Time, out: &mut Vec<Action>) {
        if let Some((m, _)) = self.masters_heard(now).into_iter().next() {
            self.become_slave(now, m, out);
            return;
        }
        let elapsed = now.since(self.election_started);
        if elapsed < self.cfg.timings.election_window {
            return;
        }
        let me = (self.cfg.host.clone(), self.my_datastore_count());
        let cands: Vec<(HostId, u32)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.role == Role::Candidate && self.heard_recently(p, now))
            .map(|(h, p)| (h.clone(), p.datastores))
            .chain(std::iter::once(me))
            .collect();
        let winner = election_winner(cands.iter().map(|(h, n)| (h, *n))).cloned();
        if winner.as_ref() == Some(&self.cfg.host) {
            self.become_master(now, out);
        } else if elapsed >= self.cfg.timings.election_window * 3 {
            // The winner never claimed (died mid-election): start over.
            self.election_started = now;
        }
    }

    fn become_master(&mut self, now: Time, out: &mut Vec<Action>) {
        self.master = Some(self.cfg.host.clone());
        self.set_state(HostHaState::Master, out);
        let m = MasterState::new(now, self.cluster(), &self.cfg.host);
        let ds = m.list_datastores.clone();
        self.master_state = Some(m);
        out.push(Action::ReadProtectedList { datastores: ds });
        let vms = self.local_power_states();
        let me = self.cfg.host.clone();
        self.master_vm_states(now, &me, vms, out);
    }

    fn tick_slave(&mut self, now: Time, out: &mut Vec<Action>) {
        let best = self.masters_heard(now).into_iter().next();
        let current = self.master.clone();
        let current_ok = current
            .as_ref()
            .and_then(|m| self.peers.get(m))
            .is_some_and(|p| p.role == Role::Master && self.heard_recently(p, now));
        match best {
            Some((b, _)) if Some(&b) != current.as_ref() => {
                // Two masters (a healed partition, or ours stepped down):
                // follow the best one.
                let better = !current_ok
                    || current
                        .as_ref()
                        .and_then(|c| self.peers.get(c))
                        .is_some_and(|cp| {
                            let bn = self.peers.get(&b).map_or(0, |p| p.datastores);
                            let c = current.as_ref().expect("checked");
                            election_cmp((&b, bn), (c, cp.datastores)) == Ordering::Greater
                        });
                if better {
                    self.become_slave(now, b, out);
                }
            }
            _ if !current_ok => self.start_election(now, out),
            _ => {}
        }
    }

    fn on_message(&mut self, now: Time, bytes: &[u8], out: &mut Vec<Action>) {
        let signed = match wire::open(&self.cfg.secret, bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(host = %self.cfg.host, error = %e, "message rejected");
                out.push(Action::Event(HaEvent::MessageRejected {
                    reason: e.to_string(),
                }));
                return;
            }
        };
        if !self.cluster().hosts.contains_key(&signed.sender) || signed.sender == self.cfg.host {
            let e = wire::WireError::UnknownSender(signed.sender);
            out.push(Action::Event(HaEvent::MessageRejected {
                reason: e.to_string(),
            }));
            return;
        }
        if let Err(e) = self.replay.accept(&signed.sender, signed.seq) {
            out.push(Action::Event(HaEvent::MessageRejected {
                reason: e.to_string(),
            }));
            return;
        }
        let from = signed.sender;
        self.last_traffic = now;
        if self.state == HostHaState::Isolated {
            out.push(Action::Event(HaEvent::IsolationEnded));
            self.released.clear();
            self.isolation = IsolationCheck::Idle {
                last_check: Some(now),
            };
            self.start_election(now, out);
        }
        match signed.body {
            Body::Heartbeat {
                role,
                datastores,
                master,
            } => {
                self.peers.insert(
                    from.clone(),
                    Peer {
                        last_heard: now,
                        role,
                        datastores,
                        master,
                    },
                );
                if self.state == HostHaState::Master && role == Role::Master {
                    let me = (&self.cfg.host, self.my_datastore_count());
                    if election_cmp((&from, datastores), me) == Ordering::Greater {
                        out.push(Action::Event(HaEvent::SteppedDown {
                            for_master: from.clone(),
                        }));
                        self.become_slave(now, from, out);
                    }
                }
            }
            Body::VmStates { vms } => {
                if let Some(p) = self.peers.get_mut(&from) {
                    p.last_heard = now;
                }
                if self.state == HostHaState::Master {
                    self.master_vm_states(now, &from, vms, out);
                }
            }
            Body::RestartOrder { vm } => {
                // Only our master may order; anyone else is ignored.
                if self.master.as_ref() == Some(&from) && self.state == HostHaState::Slave {
                    self.start_local(vm, out);
                }
            }
            Body::RestartFailed { vm, reason } => {
                if self.state == HostHaState::Master {
                    self.master_restart_failed(now, &from, vm, reason, out);
                }
            }
            Body::DatastoreAccess { lost } => {
                if self.state == HostHaState::Master {
                    self.master_ds_access(now, &from, lost);
                }
            }
            Body::DatastoreLossStop { vm, datastore } => {
                // Only our master may order.
                if self.master.as_ref() == Some(&from) && self.state == HostHaState::Slave {
                    self.on_datastore_loss_stop(vm, datastore, out);
                }
            }
        }
    }
}
