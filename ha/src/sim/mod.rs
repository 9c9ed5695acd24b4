//! A simulated cluster driving real [`Agent`]s: a simulated clock, a network
//! that can drop, partition and delay messages, simulated datastores
//! (heartbeat records, VM leases, the protected list, per-host access), ping,
//! and a small VMM runtime per host that honours leases like the real one
//! must. After every step it checks the split-brain invariant: no VM runs on
//! two live hosts at once, and every running copy on a host that can reach
//! storage holds the current lease.

mod runtime;
mod scenarios_election;
mod scenarios_failover;
mod scenarios_isolation;
mod scenarios_migration;
mod scenarios_misc;
mod scenarios_security;
mod scenarios_vmcp;

use crate::admission::AdmissionPolicy;
use crate::agent::{
    Action, Agent, Command, DsRecord, HaEvent, Input, PowerOffReason, ProtectedList, VmEvent,
};
use crate::config::{AgentConfig, ClusterConfig, HostSpec, Timings};
use crate::lease::{LeaseHolder, LeaseObserver, LeaseRecord};
use crate::time::Time;
use crate::types::{DatastoreId, HostHaState, HostId, Resources, VmConfig, VmId};
use crate::wire::ClusterSecret;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub(crate) const GW: &str = "10.0.0.1";
pub(crate) const SECRET: &[u8] = b"test-cluster-secret";

#[derive(Debug)]
pub(crate) struct SimVm {
    holder: LeaseHolder,
    next_renew: Time,
    shutdown_at: Option<Time>,
}

#[derive(Debug)]
pub(crate) struct SimHost {
    pub agent: Agent,
    pub up: bool,
    pub frozen: bool,
    /// Connected to the management network.
    pub mgmt: bool,
    /// Can reach the datastores.
    pub storage: bool,
    /// Datastores this host cannot reach (the others it can, if `storage`).
    pub lost_ds: BTreeSet<DatastoreId>,
    pub vms: BTreeMap<VmId, SimVm>,
    starting: BTreeMap<VmId, (LeaseObserver, Time)>,
    /// The next this-many starts fail.
    pub fail_starts: u32,
    /// The guest ignores graceful shutdown requests.
    pub shutdown_hangs: bool,
    /// The agent process is dead; the kernel (ping) and the VMMs (lease
    /// renewals) live on.
    pub agent_down: bool,
    incarnation: u32,
}

#[derive(Debug, Default)]
pub(crate) struct SimDs {
    pub hb: BTreeMap<HostId, DsRecord>,
    pub leases: BTreeMap<VmId, LeaseRecord>,
    pub protected: Option<ProtectedList>,
}

/// A recorded event.
#[derive(Debug, Clone)]
pub(crate) struct Ev {
    pub at: Time,
    pub host: HostId,
    pub ev: HaEvent,
}

pub(crate) struct Sim {
    pub now: Time,
    pub step: Duration,
    pub latency: Duration,
    pub timings: Timings,
    pub cluster: ClusterConfig,
    pub hosts: BTreeMap<HostId, SimHost>,
    pub datastores: BTreeMap<DatastoreId, SimDs>,
    /// Partition group per host; messages and pings cross no group boundary.
    pub groups: BTreeMap<HostId, u32>,
    /// Agent traffic dropped between these hosts (both directions); ICMP passes.
    pub blocked: BTreeSet<(HostId, HostId)>,
    pub gateway_up: bool,
    msgs: Vec<(Time, HostId, HostId, Vec<u8>)>,
    inputs: Vec<(Time, HostId, Input)>,
    pub events: Vec<Ev>,
    pub commands: Vec<(HostId, Result<String, crate::agent::CommandError>)>,
    /// Every StartVm carried out: (time, host, vm).
    pub starts: Vec<(Time, HostId, VmId)>,
    /// Every PowerOffVm carried out.
    pub power_offs: Vec<(Time, HostId, VmId, PowerOffReason)>,
    /// Every message sent: (from, to, bytes), for replay tests.
    pub sent: Vec<(HostId, HostId, Vec<u8>)>,
    /// Every ResetVm carried out.
    pub resets: Vec<(Time, HostId, VmId)>,
    /// Percentage of agent messages dropped at random (deterministic seed).
    pub drop_pct: u64,
    rng: u64,
}

/// Declarative cluster description.
pub(crate) struct Spec {
    pub hosts: Vec<(&'static str, Resources, Vec<&'static str>)>,
    pub vms: Vec<(VmConfig, &'static str)>,
    pub timings: Timings,
    pub admission: AdmissionPolicy,
    pub monitoring: BTreeMap<VmId, crate::monitoring::MonitoringSettings>,
    pub monitoring_default: crate::monitoring::MonitoringSettings,
}

pub(crate) fn h(s: &str) -> HostId {
    HostId::new(s)
}

pub(crate) fn vm(s: &str) -> VmId {
    VmId::new(s)
}

/// `n` hosts `host-1..n`, 16 GHz / 64 GiB each, all on ds1 and ds2.
pub(crate) fn uniform(n: usize) -> Spec {
    let names: Vec<&'static str> = (1..=n)
        .map(|i| &*Box::leak(format!("host-{i}").into_boxed_str()))
        .collect();
    Spec {
        hosts: names
            .into_iter()
            .map(|n| (n, Resources::new(16_000, 65_536), vec!["ds1", "ds2"]))
            .collect(),
        vms: vec![],
        timings: Timings {
            // The simulated VMM runtime models the power-off response to a
            // lease it cannot renew (the agent's deadline stops the guest).
            // The pause response lives in the VMM and is tested there
            // (`vmm::lease` state machine) and with real guests
            // (tests/ha_lease.rs, tests/ha_lease_pause.rs).
            lease: crate::lease::LeaseTimings {
                on_loss: crate::lease::LeaseLoss::PowerOff,
                ..Default::default()
            },
            ..Timings::default()
        },
        admission: AdmissionPolicy::Disabled,
        monitoring: BTreeMap::new(),
        monitoring_default: Default::default(),
    }
}

pub(crate) fn vmc(id: &str, cpu: u64, mem: u64) -> VmConfig {
    VmConfig::new(id, Resources::new(cpu, mem), "ds1")
}

impl Sim {
    pub fn new(spec: Spec) -> Sim {
        let hosts: BTreeMap<HostId, HostSpec> = spec
            .hosts
            .iter()
            .map(|(n, cap, ds)| {
                let spec = HostSpec {
                    mgmt_addr: format!("mgmt-{n}"),
                    capacity: *cap,
                    datastores: ds.iter().map(|d| DatastoreId::new(*d)).collect(),
                };
                (h(n), spec)
            })
            .collect();
        let cluster = ClusterConfig {
            hosts,
            vms: spec
                .vms
                .iter()
                .map(|(c, _)| (c.id.clone(), c.clone()))
                .collect(),
            admission: spec.admission.clone(),
            heartbeat_datastores: 2,
            monitoring: spec.monitoring.clone(),
            monitoring_default: spec.monitoring_default,
        };
        let mut datastores = BTreeMap::new();
        for s in cluster.hosts.values() {
            for d in &s.datastores {
                datastores.entry(d.clone()).or_insert_with(SimDs::default);
            }
        }
        let mut sim = Sim {
            now: Time::ZERO,
            step: Duration::from_millis(100),
            latency: Duration::from_millis(10),
            timings: spec.timings.clone(),
            cluster: cluster.clone(),
            hosts: BTreeMap::new(),
            datastores,
            groups: BTreeMap::new(),
            blocked: BTreeSet::new(),
            gateway_up: true,
            msgs: vec![],
            inputs: vec![],
            events: vec![],
            commands: vec![],
            starts: vec![],
            power_offs: vec![],
            sent: vec![],
            resets: vec![],
            drop_pct: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        };
        for id in cluster.hosts.keys() {
            let agent = Agent::new(sim.agent_config(id, 1));
            sim.hosts.insert(
                id.clone(),
                SimHost {
                    agent,
                    up: true,
                    frozen: false,
                    mgmt: true,
                    storage: true,
                    lost_ds: BTreeSet::new(),
                    vms: BTreeMap::new(),
                    starting: BTreeMap::new(),
                    fail_starts: 0,
                    shutdown_hangs: false,
                    agent_down: false,
                    incarnation: 1,
                },
            );
        }
        // VMs already running before HA is enabled, each holding its lease.
        for (c, host) in &spec.vms {
            sim.boot_vm(&h(host), c);
        }
        for id in cluster.hosts.keys().cloned().collect::<Vec<_>>() {
            sim.enable(&id);
        }
        sim
    }

    pub(crate) fn agent_config(&self, id: &HostId, incarnation: u32) -> AgentConfig {
        AgentConfig {
            host: id.clone(),
            isolation_addrs: vec![GW.to_string()],
            timings: self.timings.clone(),
            secret: ClusterSecret::new(SECRET.to_vec()),
            incarnation,
        }
    }

    fn lease_ds(&self, vm: &VmId) -> DatastoreId {
        self.cluster
            .vms
            .get(vm)
            .and_then(|c| c.datastores.iter().next().cloned())
            .unwrap_or_else(|| DatastoreId::new("ds1"))
    }

    fn boot_vm(&mut self, host: &HostId, c: &VmConfig) {
        let ds = self.lease_ds(&c.id);
        let rec = self
            .datastores
            .entry(ds)
            .or_default()
            .leases
            .entry(c.id.clone())
            .or_insert(LeaseRecord {
                owner: None,
                generation: 0,
                counter: 0,
            });
        *rec = rec.acquired_by(host);
        let holder = LeaseHolder::acquired(rec.generation, self.now);
        let hs = self.hosts.get_mut(host).expect("host");
        hs.vms.insert(
            c.id.clone(),
            SimVm {
                holder,
                next_renew: self.now + self.timings.lease.renew_interval,
                shutdown_at: None,
            },
        );
    }

    pub(crate) fn enable(&mut self, id: &HostId) {
        let c = self.cluster.clone();
        self.feed(id, Input::Command(Command::EnableHa(c)));
        let running: Vec<VmId> = self.hosts[id].vms.keys().cloned().collect();
        for v in running {
            self.feed(
                id,
                Input::Vm {
                    vm: v,
                    event: VmEvent::PoweredOn,
                },
            );
        }
    }

    /// Hands one input to a host's agent now and carries out its actions.
    pub fn feed(&mut self, id: &HostId, input: Input) -> Vec<Action> {
        let now = self.now;
        if self.hosts[id].agent_down {
            return Vec::new();
        }
        let actions = self
            .hosts
            .get_mut(id)
            .expect("host")
            .agent
            .handle(now, input);
        for a in &actions {
            self.apply(id, a.clone());
        }
        actions
    }

    fn reachable(&self, a: &HostId, b: &HostId) -> bool {
        let (Some(x), Some(y)) = (self.hosts.get(a), self.hosts.get(b)) else {
            return false;
        };
        x.up && y.up
            && !x.frozen
            && !y.frozen
            && x.mgmt
            && y.mgmt
            && self.groups.get(a).unwrap_or(&0) == self.groups.get(b).unwrap_or(&0)
    }

    fn agent_link(&self, a: &HostId, b: &HostId) -> bool {
        self.reachable(a, b)
            && !self.blocked.contains(&(a.clone(), b.clone()))
            && !self.blocked.contains(&(b.clone(), a.clone()))
    }

    fn later(&mut self, id: &HostId, input: Input) {
        self.inputs.push((self.now + self.step, id.clone(), input));
    }

    fn apply(&mut self, id: &HostId, a: Action) {
        let now = self.now;
        match a {
            Action::Send { to, bytes } => {
                self.sent.push((id.clone(), to.clone(), bytes.clone()));
                // xorshift64: reproducible loss without a dependency.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let dropped = self.rng % 100 < self.drop_pct;
                if self.agent_link(id, &to) && !dropped {
                    self.msgs.push((now + self.latency, id.clone(), to, bytes));
                }
            }
            Action::Ping { addr } => {
                let me = &self.hosts[id];
                let answered = if addr == GW {
                    me.mgmt && self.gateway_up
                } else {
                    self.cluster
                        .hosts
                        .iter()
                        .find(|(_, s)| s.mgmt_addr == addr)
                        .is_some_and(|(t, _)| self.reachable(id, t))
                };
                self.later(id, Input::PingResult { addr, answered });
            }
            Action::WriteHeartbeat { datastores, record } => {
                if self.hosts[id].storage {
                    for d in datastores {
                        if self.ds_ok(id, &d) {
                            self.datastores
                                .entry(d)
                                .or_default()
                                .hb
                                .insert(id.clone(), record.clone());
                        }
                    }
                }
            }
            Action::ReadDatastores { datastores } => {
                for d in datastores {
                    let ok = self.ds_ok(id, &d);
                    let result = if ok {
                        Ok(self
                            .datastores
                            .get(&d)
                            .map(|s| s.hb.values().cloned().collect())
                            .unwrap_or_default())
                    } else {
                        Err(format!("{d}: I/O error"))
                    };
                    self.later(
                        id,
                        Input::DatastoreRead {
                            datastore: d,
                            result,
                        },
                    );
                }
            }
            Action::PersistProtectedList { datastores, list } => {
                for d in datastores {
                    if self.ds_ok(id, &d) {
                        self.datastores.entry(d).or_default().protected = Some(list.clone());
                    }
                }
            }
            Action::ReadProtectedList { datastores } => {
                let list = if self.hosts[id].storage {
                    datastores
                        .iter()
                        .filter(|d| self.ds_ok(id, d))
                        .filter_map(|d| self.datastores.get(d).and_then(|s| s.protected.clone()))
                        .max_by_key(|l| l.version)
                } else {
                    None
                };
                self.later(id, Input::ProtectedListRead(list));
            }
            Action::ReadLeases { leases } => {
                for (v, d) in leases {
                    let ok = self.ds_ok(id, &d);
                    let result = if ok {
                        Ok(self
                            .datastores
                            .get(&d)
                            .and_then(|s| s.leases.get(&v))
                            .cloned())
                    } else {
                        Err(format!("{d}: I/O error"))
                    };
                    self.later(id, Input::LeaseRead { vm: v, result });
                }
            }
            Action::StartVm { vm } => {
                // Order-level split-brain check: never start a VM while a
                // copy runs on a live host that still reaches storage (its
                // lease is alive). Copies on cut or frozen hosts are fenced by
                // the lease instead, which `check_invariants` verifies.
                let lease_ds = self.lease_ds(&vm.id);
                for (other, hs) in &self.hosts {
                    let live = hs.up
                        && !hs.frozen
                        && self.ds_ok(other, &lease_ds)
                        && hs.vms.contains_key(&vm.id);
                    assert!(
                        !(live && other != id),
                        "t={now}: {} ordered on {id} while running on live {other}",
                        vm.id
                    );
                }
                self.starts.push((now, id.clone(), vm.id.clone()));
                let hs = self.hosts.get_mut(id).expect("host");
                if hs.fail_starts > 0 {
                    hs.fail_starts -= 1;
                    self.later(
                        id,
                        Input::Vm {
                            vm: vm.id,
                            event: VmEvent::StartFailed {
                                reason: "VMM failed to start".into(),
                            },
                        },
                    );
                } else {
                    hs.starting.insert(vm.id, (LeaseObserver::default(), now));
                }
            }
            Action::PowerOffVm { vm, reason } => {
                self.power_offs.push((now, id.clone(), vm.clone(), reason));
                self.stop_vm(id, &vm, reason != PowerOffReason::StaleCopy);
            }
            Action::ShutdownVm { vm } => {
                let hangs = self.hosts[id].shutdown_hangs;
                if let Some(v) = self.hosts.get_mut(id).expect("host").vms.get_mut(&vm) {
                    if !hangs {
                        v.shutdown_at = Some(now + Duration::from_secs(2));
                    }
                }
            }
            Action::ResetVm { vm, .. } => self.resets.push((now, id.clone(), vm)),
            Action::CommandDone(r) => self.commands.push((id.clone(), r)),
            Action::Event(ev) => self.events.push(Ev {
                at: now,
                host: id.clone(),
                ev,
            }),
        }
    }

    /// Advances the clock by one step.
    pub fn tick(&mut self) {
        self.now = self.now + self.step;
        let now = self.now;
        let due: Vec<_> = {
            let (d, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.msgs)
                .into_iter()
                .partition(|m| m.0 <= now);
            self.msgs = rest;
            d
        };
        for (_, from, to, bytes) in due {
            if self.agent_link(&from, &to) {
                self.feed(&to, Input::Message(bytes));
            }
        }
        let due: Vec<_> = {
            let (d, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.inputs)
                .into_iter()
                .partition(|m| m.0 <= now);
            self.inputs = rest;
            d
        };
        for (_, to, input) in due {
            if self.hosts[&to].up && !self.hosts[&to].frozen {
                self.feed(&to, input);
            }
        }
        let ids: Vec<HostId> = self.hosts.keys().cloned().collect();
        for id in ids {
            if self.hosts[&id].up && !self.hosts[&id].frozen {
                self.runtime(&id);
                self.feed(&id, Input::Tick);
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&self) {
        let mut running: BTreeMap<&VmId, Vec<&HostId>> = BTreeMap::new();
        for (id, hs) in &self.hosts {
            if !hs.up || hs.frozen {
                continue;
            }
            for (v, sv) in &hs.vms {
                running.entry(v).or_default().push(id);
                if self.ds_ok(id, &self.lease_ds(v)) {
                    let rec = self
                        .datastores
                        .get(&self.lease_ds(v))
                        .and_then(|s| s.leases.get(v));
                    let ok = rec.is_some_and(|r| {
                        r.owner.as_ref() == Some(id) && r.generation == sv.holder.generation
                    });
                    assert!(
                        ok,
                        "t={}: {v} runs on {id} without holding its lease ({rec:?})",
                        self.now
                    );
                }
            }
        }
        for (v, hosts) in running {
            assert!(
                hosts.len() <= 1,
                "t={}: split brain: {v} runs on {hosts:?}",
                self.now
            );
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.tick();
        }
    }

    pub fn run_secs(&mut self, s: u64) {
        self.run_for(Duration::from_secs(s));
    }

    /// Runs until `pred` holds; panics after `max`.
    pub fn run_until(&mut self, max: Duration, what: &str, pred: impl Fn(&Sim) -> bool) -> Time {
        let end = self.now + max;
        while !pred(self) {
            assert!(
                self.now < end,
                "t={}: timed out waiting for {what}",
                self.now
            );
            self.tick();
        }
        self.now
    }

    pub fn state(&self, id: &str) -> HostHaState {
        self.hosts[&h(id)].agent.state()
    }

    /// Hosts currently in the master state (up ones).
    pub fn masters(&self) -> Vec<HostId> {
        self.hosts
            .iter()
            .filter(|(_, s)| s.up && s.agent.state() == HostHaState::Master)
            .map(|(h, _)| h.clone())
            .collect()
    }

    pub fn running_on(&self, v: &str) -> Vec<HostId> {
        self.hosts
            .iter()
            .filter(|(_, s)| s.up && s.vms.contains_key(&vm(v)))
            .map(|(h, _)| h.clone())
            .collect()
    }

    pub fn events_where(&self, f: impl Fn(&Ev) -> bool) -> Vec<Ev> {
        self.events.iter().filter(|e| f(e)).cloned().collect()
    }

    pub fn has_event(&self, f: impl Fn(&Ev) -> bool) -> bool {
        self.events.iter().any(f)
    }

    /// Restart orders in the order they were issued: (vm, target).
    pub fn restart_orders(&self) -> Vec<(VmId, HostId)> {
        self.events
            .iter()
            .filter_map(|e| match &e.ev {
                HaEvent::RestartOrdered { vm, host, .. } => Some((vm.clone(), host.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn crash(&mut self, id: &str) {
        let hs = self.hosts.get_mut(&h(id)).expect("host");
        hs.up = false;
        hs.vms.clear();
        hs.starting.clear();
    }

    /// Restarts only the agent process: VMs keep running and are adopted.
    pub fn restart_agent(&mut self, id: &str) {
        let inc = self.hosts[&h(id)].incarnation + 1;
        let cfg = self.agent_config(&h(id), inc);
        let hs = self.hosts.get_mut(&h(id)).expect("host");
        hs.agent = Agent::new(cfg);
        hs.incarnation = inc;
        hs.agent_down = false;
        self.enable(&h(id));
    }

    /// Boots a crashed host again: a fresh agent (next incarnation), no VMs.
    pub fn reboot(&mut self, id: &str) {
        let inc = self.hosts[&h(id)].incarnation + 1;
        let cfg = self.agent_config(&h(id), inc);
        let hs = self.hosts.get_mut(&h(id)).expect("host");
        hs.agent = Agent::new(cfg);
        hs.incarnation = inc;
        hs.up = true;
        self.enable(&h(id));
    }

    pub fn set_mgmt(&mut self, id: &str, on: bool) {
        self.hosts.get_mut(&h(id)).expect("host").mgmt = on;
    }

    pub fn set_storage(&mut self, id: &str, on: bool) {
        self.hosts.get_mut(&h(id)).expect("host").storage = on;
    }

    /// Whether host `id` reaches datastore `d` now.
    pub fn ds_ok(&self, id: &HostId, d: &DatastoreId) -> bool {
        let hs = &self.hosts[id];
        hs.storage && !hs.lost_ds.contains(d) && self.cluster.hosts[id].datastores.contains(d)
    }

    /// Cuts (or restores) one host's path to one datastore; its runtime's
    /// probe reports the change to its agent at once.
    pub fn cut_datastore(&mut self, id: &str, d: &str, cut: bool) {
        let ds = DatastoreId::new(d);
        let hs = self.hosts.get_mut(&h(id)).expect("host");
        if cut {
            hs.lost_ds.insert(ds.clone());
        } else {
            hs.lost_ds.remove(&ds);
        }
        self.feed(
            &h(id),
            Input::DatastoreAccess {
                datastore: ds,
                accessible: !cut,
            },
        );
    }

    pub fn partition(&mut self, side_b: &[&str]) {
        for s in side_b {
            self.groups.insert(h(s), 1);
        }
    }

    pub fn heal(&mut self) {
        self.groups.clear();
        self.blocked.clear();
    }

    pub fn command(&mut self, id: &str, c: Command) -> Result<String, crate::agent::CommandError> {
        let actions = self.feed(&h(id), Input::Command(c));
        actions
            .into_iter()
            .find_map(|a| match a {
                Action::CommandDone(r) => Some(r),
                _ => None,
            })
            .expect("every command is answered")
    }

    /// A live migration's switchover as the VMMs do it: the target claims
    /// the next lease generation, the guest runs there and no longer on
    /// the source; each agent hears it as its runtime reports it (the
    /// target: `PoweredOn`; the source: `MigratedAway`).
    pub fn migrate_vm(&mut self, v: &str, from: &str, to: &str) {
        let (id, from, to) = (vm(v), h(from), h(to));
        let ds = self.lease_ds(&id);
        let rec = self
            .datastores
            .entry(ds)
            .or_default()
            .leases
            .get_mut(&id)
            .expect("the VM holds a lease");
        *rec = rec.acquired_by(&to);
        let holder = LeaseHolder::acquired(rec.generation, self.now);
        let sv = self
            .hosts
            .get_mut(&from)
            .expect("host")
            .vms
            .remove(&id)
            .expect("the VM runs on the source");
        self.hosts.get_mut(&to).expect("host").vms.insert(
            id.clone(),
            SimVm {
                holder,
                next_renew: self.now + self.timings.lease.renew_interval,
                shutdown_at: sv.shutdown_at,
            },
        );
        self.feed(
            &to,
            Input::Vm {
                vm: id.clone(),
                event: VmEvent::PoweredOn,
            },
        );
        self.feed(
            &from,
            Input::Vm {
                vm: id,
                event: VmEvent::MigratedAway {
                    to: Some(to.clone()),
                },
            },
        );
    }

    /// Waits for the first stable master of a fresh cluster.
    pub fn settle(&mut self) -> HostId {
        self.run_until(Duration::from_secs(20), "one master and all slaves", |s| {
            s.masters().len() == 1
                && s.hosts
                    .values()
                    .filter(|h| h.up)
                    .all(|h| matches!(h.agent.state(), HostHaState::Master | HostHaState::Slave))
        });
        // Let slaves report their VMs.
        self.run_secs(2);
        self.masters()[0].clone()
    }
}
