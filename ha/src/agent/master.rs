//! What only the master does: watch every host (network heartbeat, datastore
//! heartbeat, ping), classify silent ones (H4), keep the protected-VM list
//! (H3), and restart VMs by priority where capacity allows (H8).

use super::{Action, Agent, DsRecord, HaEvent, ProtectedList};
use crate::config::ClusterConfig;
use crate::lease::{LeaseRecord, LeaseTimings};
use crate::rules::{classify, heartbeat_datastores, DsEvidence};
use crate::time::Time;
use crate::types::{
    DatastoreId, HostHaState, HostId, Resources, RestartPriority, VmId, VmProtection,
};
use crate::wire::{PowerState, Role};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The master's view of one host.
#[derive(Debug, Clone)]
pub(super) struct HostMon {
    pub(super) state: HostHaState,
    /// Last time heard (or the master's start) once the host went silent.
    pub(super) silent_since: Option<Time>,
    /// Last ping sent after the host was noticed silent, and its answer.
    pub(super) ping: Option<(Time, Option<bool>)>,
    /// Heartbeat datastores of this host that the master can read.
    pub(super) hb_datastores: Vec<DatastoreId>,
    /// Per datastore: last counter seen and the local time it last changed.
    pub(super) records: BTreeMap<DatastoreId, (u64, Time)>,
    /// The state (and agents heard) the host last published on a datastore.
    pub(super) published: Option<(HostHaState, u32)>,
    /// VMs it published as released by its isolation response.
    pub(super) released: BTreeSet<VmId>,
}

/// Restart bookkeeping of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Restart {
    Idle,
    Pending {
        from: HostId,
        attempt: u32,
        not_before: Time,
        reported: Option<String>,
    },
    InFlight {
        host: HostId,
        from: HostId,
        attempt: u32,
    },
    GaveUp {
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub(super) struct VmEntry {
    pub(super) protected: bool,
    /// Where it runs, last ran, or is being restarted.
    pub(super) host: Option<HostId>,
    pub(super) power: Option<PowerState>,
    pub(super) restart: Restart,
}

/// A live migration the master planned (`Command::BeginMigration`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Migration {
    /// The source host; `None` for a VM coming from outside the cluster.
    pub(super) from: Option<HostId>,
    /// The target host.
    pub(super) to: HostId,
    /// Forgotten after this: an orchestrator that never reported the end.
    pub(super) until: Time,
    /// It ended with the guest on the target.
    pub(super) done: bool,
}

/// How long a planned migration may run before the master forgets it
/// (the migration's own hard limit is 100 s by default).
pub(super) const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
/// How long after a migration the source's reports of the VM are ignored.
pub(super) const MIGRATED_GRACE: Duration = Duration::from_secs(10);

/// Master-only state, dropped when the host stops being master.
#[derive(Debug, Clone)]
pub(super) struct MasterState {
    pub(super) since: Time,
    pub(super) list_datastores: Vec<DatastoreId>,
    pub(super) poll_datastores: Vec<DatastoreId>,
    pub(super) next_poll: Time,
    pub(super) hosts: BTreeMap<HostId, HostMon>,
    pub(super) vms: BTreeMap<VmId, VmEntry>,
    pub(super) persisted: Option<ProtectedList>,
    pub(super) list_version: u64,
    /// Lease records of VMs on unresponsive hosts: last record and when it
    /// was first seen unchanged, on this master's clock.
    pub(super) leases: BTreeMap<VmId, (LeaseRecord, Time)>,
    pub(super) ds_first_read: BTreeMap<DatastoreId, Time>,
    pub(super) ds_error: BTreeSet<DatastoreId>,
    /// Datastores each host reports unreachable, with the time this master
    /// learned it (datastore-loss protection, `vmcp.rs`).
    pub(super) ds_lost: BTreeMap<HostId, BTreeMap<DatastoreId, Time>>,
    /// Responses applied: (vm, host, datastore) -> when (stop orders are
    /// re-sent while the VM still runs there).
    pub(super) ds_loss_handled: BTreeMap<(VmId, HostId, DatastoreId), Time>,
    /// VMs reported as having no host to go to (reported once).
    pub(super) ds_loss_no_target: BTreeSet<(VmId, DatastoreId)>,
    /// Live migrations in flight, and for a few seconds after one that
    /// succeeded (the source's reports may still list the VM until its VMM
    /// is gone).
    pub(super) migrating: BTreeMap<VmId, Migration>,
}

impl MasterState {
    pub(super) fn new(now: Time, cluster: &ClusterConfig, me: &HostId) -> Self {
        let mounts = cluster
            .hosts
            .iter()
            .map(|(h, s)| (h.clone(), s.datastores.clone()))
            .collect();
        let mine = cluster
            .hosts
            .get(me)
            .map(|s| s.datastores.clone())
            .unwrap_or_default();
        let mut poll = BTreeSet::new();
        let hosts = cluster
            .hosts
            .keys()
            .filter(|h| *h != me)
            .map(|h| {
                let hb: Vec<DatastoreId> =
                    heartbeat_datastores(h, &mounts, cluster.heartbeat_datastores)
                        .into_iter()
                        .filter(|d| mine.contains(d))
                        .collect();
                poll.extend(hb.iter().cloned());
                let mon = HostMon {
                    state: HostHaState::Election,
                    silent_since: None,
                    ping: None,
                    hb_datastores: hb,
                    records: BTreeMap::new(),
                    published: None,
                    released: BTreeSet::new(),
                };
                (h.clone(), mon)
            })
            .collect();
        let shared = mine.iter().filter(|d| {
            cluster
                .hosts
                .values()
                .filter(|s| s.datastores.contains(*d))
                .count()
                > 1
        });
        Self {
            since: now,
            list_datastores: shared.cloned().collect(),
            poll_datastores: poll.into_iter().collect(),
            next_poll: now,
            hosts,
            vms: BTreeMap::new(),
            persisted: None,
            list_version: 0,
            leases: BTreeMap::new(),
            ds_first_read: BTreeMap::new(),
            ds_error: BTreeSet::new(),
            ds_lost: BTreeMap::new(),
            ds_loss_handled: BTreeMap::new(),
            ds_loss_no_target: BTreeSet::new(),
            migrating: BTreeMap::new(),
        }
    }

    pub(super) fn on_ds_read(
        &mut self,
        now: Time,
        ds: DatastoreId,
        result: Result<Vec<DsRecord>, String>,
    ) {
        let records = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(datastore = %ds, error = %e, "heartbeat datastore unreadable");
                self.ds_error.insert(ds);
                return;
            }
        };
        self.ds_error.remove(&ds);
        self.ds_first_read.entry(ds.clone()).or_insert(now);
        for rec in records {
            let Some(mon) = self.hosts.get_mut(&rec.host) else {
                continue;
            };
            if !mon.hb_datastores.contains(&ds) {
                continue;
            }
            match mon.records.get(&ds) {
                Some((c, _)) if *c == rec.counter => {}
                _ => {
                    mon.records.insert(ds.clone(), (rec.counter, now));
                    mon.published = Some((rec.state, rec.peers_heard));
                    mon.released = rec.released;
                }
            }
        }
    }

    pub(super) fn on_ping(&mut self, addr: &str, answered: bool, cluster: &ClusterConfig) {
        for (h, mon) in &mut self.hosts {
            if cluster.hosts.get(h).is_some_and(|s| s.mgmt_addr == addr) {
                if let Some((_, ans)) = &mut mon.ping {
                    *ans = Some(answered);
                }
            }
        }
    }

    pub(super) fn on_lease_read(
        &mut self,
        now: Time,
        vm: VmId,
        result: Result<Option<LeaseRecord>, String>,
    ) {
        match result {
            Ok(rec) => {
                let rec = rec.unwrap_or(LeaseRecord {
                    owner: None,
                    generation: 0,
                    counter: 0,
                });
                match self.leases.get(&vm) {
                    Some((r, _)) if *r == rec => {}
                    _ => {
                        self.leases.insert(vm, (rec, now));
                    }
                }
            }
            // Unreadable: no evidence either way.
            Err(_) => {
                self.leases.remove(&vm);
            }
        }
    }

    /// True when `vm`'s lease shows its copy on `host` has stopped: released,
    /// held by someone else, or not renewed for `stop_time + io_timeout`.
    fn lease_stopped(&self, vm: &VmId, host: &HostId, now: Time, t: &LeaseTimings) -> bool {
        match self.leases.get(vm) {
            Some((rec, since)) => {
                rec.owner.as_ref() != Some(host) || now.since(*since) >= t.stop_time + t.io_timeout
            }
            None => false,
        }
    }

    pub(super) fn merge_protected_list(&mut self, list: ProtectedList) {
        // Our next write must supersede what we read.
        self.list_version = self.list_version.max(list.version);
        for (vm, host) in list.vms {
            let e = self.vms.entry(vm).or_insert(VmEntry {
                protected: false,
                host: None,
                power: None,
                restart: Restart::Idle,
            });
            if e.power.is_none() && e.host.is_none() {
                e.protected = true;
                e.host = Some(host);
            }
        }
    }

    fn ds_evidence(
        &self,
        mon: &HostMon,
        noticed: Time,
        now: Time,
        liveness: Duration,
    ) -> Option<DsEvidence> {
        let readable: Vec<&DatastoreId> = mon
            .hb_datastores
            .iter()
            .filter(|d| !self.ds_error.contains(*d) && self.ds_first_read.contains_key(*d))
            .collect();
        if readable.is_empty() {
            return Some(DsEvidence::Unknown);
        }
        let mut all_stale = true;
        for d in readable {
            match mon.records.get(d) {
                // A change seen after the host went silent, and recent.
                Some((_, changed)) if *changed >= noticed && now.since(*changed) < liveness => {
                    return Some(DsEvidence::Alive);
                }
                Some((_, changed)) if now.since(*changed) >= liveness => {}
                None if now.since(self.ds_first_read[d]) >= liveness => {}
                _ => all_stale = false,
            }
        }
        all_stale.then_some(DsEvidence::Stale)
    }

    pub(super) fn host_states(&self, me: &HostId) -> BTreeMap<HostId, HostHaState> {
        let mut m: BTreeMap<HostId, HostHaState> = self
            .hosts
            .iter()
            .map(|(h, s)| (h.clone(), s.state))
            .collect();
        m.insert(me.clone(), HostHaState::Master);
        m
    }

    pub(super) fn vm_states(&self) -> BTreeMap<VmId, VmProtection> {
        self.vms
            .iter()
            .map(|(id, e)| {
                let p = match (&e.restart, e.protected, &e.host) {
                    (Restart::Pending { reported, .. }, _, _) => VmProtection::RestartPending {
                        reason: reported.clone().unwrap_or_else(|| "queued".into()),
                    },
                    (Restart::InFlight { host, .. }, _, _) => {
                        VmProtection::Restarting { host: host.clone() }
                    }
                    (Restart::GaveUp { reason }, _, _) => VmProtection::RestartFailed {
                        reason: reason.clone(),
                    },
                    (Restart::Idle, true, Some(h)) => VmProtection::Protected { host: h.clone() },
                    _ => VmProtection::Unprotected,
                };
                (id.clone(), p)
            })
            .collect()
    }

    pub(super) fn used_on(&self, host: &HostId, cluster: &ClusterConfig) -> (Resources, usize) {
        let mut used = Resources::default();
        let mut inflight = 0;
        for (id, e) in &self.vms {
            let here = e.host.as_ref() == Some(host);
            let flying = matches!(&e.restart, Restart::InFlight { host: h, .. } if h == host);
            if flying {
                inflight += 1;
            }
            if here && (flying || e.power == Some(PowerState::On)) {
                if let Some(c) = cluster.vms.get(id) {
                    used = used.add(&c.reservation);
                }
            }
        }
        (used, inflight)
    }

    pub(super) fn protected_count(&self) -> usize {
        self.vms.values().filter(|e| e.protected).count()
    }

    fn protected_list(&self) -> ProtectedList {
        ProtectedList {
            version: self.list_version,
            vms: self
                .vms
                .iter()
                .filter(|(_, e)| e.protected)
                .filter_map(|(id, e)| e.host.clone().map(|h| (id.clone(), h)))
                .collect(),
        }
    }
}

fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(20);
    (base * (1u32 << shift)).min(max)
}

impl Agent {
    pub(super) fn queue_restart(
        m: &mut MasterState,
        cluster: &ClusterConfig,
        now: Time,
        vm: &VmId,
        from: &HostId,
        out: &mut Vec<Action>,
    ) {
        let prio = cluster.vms.get(vm).map(|c| c.priority).unwrap_or_default();
        let Some(e) = m.vms.get_mut(vm) else { return };
        if !e.protected || prio == RestartPriority::Disabled {
            return;
        }
        let attempt = match &e.restart {
            Restart::Idle => 0,
            // The target of an in-flight order failed: re-place it.
            Restart::InFlight { host, attempt, .. } if host == from => *attempt,
            _ => return,
        };
        tracing::info!(vm = %vm, host = %from, "restart queued");
        out.push(Action::Event(HaEvent::RestartQueued {
            vm: vm.clone(),
            from: from.clone(),
        }));
        e.restart = Restart::Pending {
            from: from.clone(),
            attempt,
            not_before: now,
            reported: None,
        };
    }

    /// Merges a host's VM power states (a slave's report, or our own).
    pub(super) fn master_vm_states(
        &mut self,
        now: Time,
        from: &HostId,
        vms: BTreeMap<VmId, PowerState>,
        out: &mut Vec<Action>,
    ) {
        let Some(mut m) = self.master_state.take() else {
            return;
        };
        let cluster = self.cluster.clone().expect("HA enabled");
        let reported: std::collections::BTreeSet<VmId> = vms.keys().cloned().collect();
        for (vm, ps) in vms {
            let e = m.vms.entry(vm.clone()).or_insert(VmEntry {
                protected: false,
                host: None,
                power: None,
                restart: Restart::Idle,
            });
            match ps {
                PowerState::On
                    if m.migrating
                        .get(&vm)
                        .is_some_and(|g| g.done && g.from.as_ref() == Some(from)) =>
                {
                    // The source's VMM lingers a moment after the target
                    // took over: the VM is the target's.
                }
                PowerState::On => {
                    if let Restart::InFlight { host, attempt, .. } = &e.restart {
                        if host == from && *attempt > 0 {
                            out.push(Action::Event(HaEvent::VmRestarted {
                                vm: vm.clone(),
                                host: from.clone(),
                            }));
                        }
                    }
                    // Running somewhere: nothing to restart, whatever was queued.
                    e.restart = Restart::Idle;
                    e.protected = true;
                    e.host = Some(from.clone());
                    e.power = Some(ps);
                }
                PowerState::OffByUser => {
                    if e.host.as_ref() == Some(from) || e.host.is_none() {
                        e.protected = false;
                        e.power = Some(ps);
                        e.restart = Restart::Idle;
                    }
                }
                // The copy that runs reports On; nothing to do here.
                PowerState::Stale => {}
                PowerState::Starting => {
                    // A start ordered by us or by a previous master: it
                    // belongs to `from` until it reports On or a failure.
                    e.protected = true;
                    e.host = Some(from.clone());
                    e.power = Some(ps);
                }
                PowerState::OffByIsolation | PowerState::OffByHa | PowerState::Crashed => {
                    if e.host.as_ref() == Some(from) && e.power != Some(ps) {
                        e.power = Some(ps);
                        Self::queue_restart(&mut m, &cluster, now, &vm, from, out);
                    }
                }
            }
        }
        // Reports are complete lists: a protected VM we place on `from` that
        // `from` does not know is not running there (its start failed while
        // the master that ordered it died, or the protected list is all we
        // had). Restart it; the lease stops a copy we might be wrong about.
        let missing: Vec<VmId> = m
            .vms
            .iter()
            .filter(|(id, e)| {
                e.protected
                    && e.host.as_ref() == Some(from)
                    && e.restart == Restart::Idle
                    && !reported.contains(*id)
                    && !m.migrating.contains_key(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for vm in missing {
            if let Some(e) = m.vms.get_mut(&vm) {
                e.power = None;
            }
            Self::queue_restart(&mut m, &cluster, now, &vm, from, out);
        }
        self.master_state = Some(m);
        self.persist_if_changed(out);
    }

    pub(super) fn persist_if_changed(&mut self, out: &mut Vec<Action>) {
        let Some(m) = self.master_state.as_mut() else {
            return;
        };
        let mut list = m.protected_list();
        if m.persisted.as_ref().map(|p| &p.vms) != Some(&list.vms) {
            m.list_version += 1;
            list.version = m.list_version;
            out.push(Action::PersistProtectedList {
                datastores: m.list_datastores.clone(),
                list: list.clone(),
            });
            m.persisted = Some(list);
        }
    }

    pub(super) fn master_restart_failed(
        &mut self,
        now: Time,
        from: &HostId,
        vm: VmId,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        let t = self.cfg.timings.clone();
        let Some(m) = self.master_state.as_mut() else {
            return;
        };
        let Some(e) = m.vms.get_mut(&vm) else { return };
        let Restart::InFlight {
            host,
            from: origin,
            attempt,
        } = e.restart.clone()
        else {
            return;
        };
        if &host != from {
            return;
        }
        e.host = Some(origin.clone());
        if attempt == 0 {
            // An operator power-on that failed: report, do not retry.
            e.protected = false;
            e.restart = Restart::Idle;
            out.push(Action::Event(HaEvent::RestartGaveUp { vm, reason }));
        } else if attempt >= t.restart_max_attempts {
            tracing::error!(vm = %vm, reason = %reason, "restart gave up");
            out.push(Action::Event(HaEvent::RestartGaveUp {
                vm,
                reason: reason.clone(),
            }));
            e.restart = Restart::GaveUp { reason };
        } else {
            let after = backoff(t.restart_retry_base, t.restart_retry_max, attempt);
            out.push(Action::Event(HaEvent::RestartRetry {
                vm,
                attempt,
                after,
                reason,
            }));
            e.restart = Restart::Pending {
                from: origin,
                attempt,
                not_before: now + after,
                reported: None,
            };
        }
    }

    pub(super) fn tick_master(&mut self, now: Time, out: &mut Vec<Action>) {
        // Two masters (healed partition): the loser by the election rule
        // steps down (also done on receipt; this covers a missed message).
        if let Some((best, n)) = self.masters_heard(now).into_iter().next() {
            if crate::rules::election_cmp((&best, n), (&self.cfg.host, self.my_datastore_count()))
                == std::cmp::Ordering::Greater
            {
                out.push(Action::Event(HaEvent::SteppedDown {
                    for_master: best.clone(),
                }));
                self.become_slave(now, best, out);
                return;
            }
        }
        let Some(mut m) = self.master_state.take() else {
            return;
        };
        let cluster = self.cluster.clone().expect("HA enabled");
        let t = self.cfg.timings.clone();
        m.migrating.retain(|vm, g| {
            let keep = now < g.until;
            if !keep && !g.done {
                tracing::warn!(vm = %vm, to = %g.to, "a planned migration never reported its end: forgotten");
            }
            keep
        });
        let poll_due = now >= m.next_poll;
        if poll_due {
            m.next_poll = now + t.ds_poll_interval;
            if !m.poll_datastores.is_empty() {
                out.push(Action::ReadDatastores {
                    datastores: m.poll_datastores.clone(),
                });
            }
        }
        let mut lease_reads: Vec<(VmId, DatastoreId)> = Vec::new();
        let hosts: Vec<HostId> = m.hosts.keys().cloned().collect();
        for h in hosts {
            let peer = self.peers.get(&h).cloned();
            let heard = peer.as_ref().is_some_and(|p| self.heard_recently(p, now));
            let mon = m.hosts.get_mut(&h).expect("listed");
            if heard {
                let p = peer.expect("heard");
                let new = match p.role {
                    Role::Maintenance => HostHaState::Maintenance,
                    Role::Disabled => HostHaState::Uninitialized,
                    Role::Master => HostHaState::Master,
                    _ => HostHaState::Slave,
                };
                if matches!(
                    mon.state,
                    HostHaState::Failed
                        | HostHaState::Isolated
                        | HostHaState::Partitioned
                        | HostHaState::Unresponsive
                ) {
                    out.push(Action::Event(HaEvent::HostRecovered { host: h.clone() }));
                }
                mon.state = new;
                mon.silent_since = None;
                mon.ping = None;
                continue;
            }
            let silent_since = *mon
                .silent_since
                .get_or_insert(peer.map_or(m.since, |p| p.last_heard.max(m.since)));
            let noticed = silent_since + t.host_timeout;
            // A host that left HA (maintenance, HA disabled) and then went
            // silent is not classified: its VMs are not HA's to restart.
            if now < noticed
                || matches!(
                    mon.state,
                    HostHaState::Maintenance | HostHaState::Uninitialized
                )
            {
                continue;
            }
            // Ping the management address; re-ping every host_timeout.
            let resend = match mon.ping {
                None => true,
                Some((sent, _)) => now.since(sent) >= t.host_timeout,
            };
            let last_answer = match mon.ping {
                Some((sent, Some(a))) if sent >= noticed => Some(a),
                Some((sent, None)) if sent >= noticed && now.since(sent) >= t.ping_timeout => {
                    Some(false)
                }
                _ => None,
            };
            if resend {
                if let Some(spec) = cluster.hosts.get(&h) {
                    out.push(Action::Ping {
                        addr: spec.mgmt_addr.clone(),
                    });
                }
                let keep = last_answer;
                let mon = m.hosts.get_mut(&h).expect("listed");
                mon.ping = Some((now, keep));
            }
            let mon = m.hosts.get(&h).expect("listed").clone();
            let Some(ping) = last_answer else { continue };
            let Some(ds) = m.ds_evidence(&mon, noticed, now, t.ds_liveness_timeout) else {
                continue;
            };
            let new = classify(ping, ds, mon.published);
            if new != mon.state {
                tracing::warn!(host = %h, state = %new, ping, ds = ?ds, "host classified");
                out.push(Action::Event(HaEvent::HostClassified {
                    host: h.clone(),
                    state: new,
                }));
                m.hosts.get_mut(&h).expect("listed").state = new;
            }
            let restartable: Vec<VmId> = match new {
                HostHaState::Failed => m
                    .vms
                    .iter()
                    .filter(|(_, e)| {
                        e.host.as_ref() == Some(&h) && e.power != Some(PowerState::OffByUser)
                    })
                    .map(|(id, _)| id.clone())
                    .collect(),
                // Only what the isolated host itself said it powered off.
                HostHaState::Isolated => mon
                    .released
                    .iter()
                    .filter(|vm| m.vms.get(*vm).is_some_and(|e| e.host.as_ref() == Some(&h)))
                    .cloned()
                    .collect(),
                // The agent may be dead while its VMs run: go by their leases.
                HostHaState::Unresponsive => {
                    let on_host: Vec<VmId> = m
                        .vms
                        .iter()
                        .filter(|(_, e)| {
                            e.protected
                                && e.host.as_ref() == Some(&h)
                                && e.restart == Restart::Idle
                                && e.power != Some(PowerState::OffByUser)
                        })
                        .map(|(id, _)| id.clone())
                        .collect();
                    for vm in &on_host {
                        if let Some(ds) =
                            cluster.vms.get(vm).and_then(|c| c.datastores.iter().next())
                        {
                            lease_reads.push((vm.clone(), ds.clone()));
                        }
                    }
                    on_host
                        .into_iter()
                        .filter(|vm| m.lease_stopped(vm, &h, now, &t.lease))
                        .collect()
                }
                _ => Vec::new(),
            };
            for vm in restartable {
                Self::queue_restart(&mut m, &cluster, now, &vm, &h, out);
            }
        }
        if poll_due && !lease_reads.is_empty() {
            out.push(Action::ReadLeases {
                leases: lease_reads,
            });
        }
        self.master_state = Some(m);
        self.run_placement(now, out);
        self.persist_if_changed(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        let v: Vec<u64> = (1..=7).map(|a| backoff(b, max, a).as_secs()).collect();
        assert_eq!(v, vec![2, 4, 8, 16, 32, 60, 60]);
    }
}
