//! Datastore-loss protection (H13, vSphere's VM Component Protection): a
//! host that loses access to a datastore one of its running VMs uses, while
//! other hosts still reach it, gets that VM restarted where it is reachable.
//!
//! ```text
//!  host-1 (VM on ds2)           master                        host-2
//!  probe: ds2 lost
//!  DatastoreAccess{ds2} ----->  lost since t (master clock)
//!                               ... VM's delay, ds2 still lost,
//!                               host-2 reaches all VM datastores
//!                 <-----------  DatastoreLossStop{vm, ds2}   (response: restart)
//!  still lost? stop the guest
//!  VmStates{vm: off_by_ha} -->  restart queued; placement skips
//!                               hosts that lost ds2 ------>  RestartOrder{vm}
//!                                                             StartVm: lease
//! ```
//!
//! Per VM (`VmConfig::datastore_loss`): `disabled` (default), `events_only`
//! (an event after the delay, the VM stays), `restart`. The delay lets a
//! short outage pass. The affected host stops the guest only on its
//! master's order and only if the datastore is still lost there, so a stale
//! order after the datastore came back does nothing.
//!
//! The lease stays the fence (H10): when the lost datastore holds the VM's
//! lease, the holder cannot renew it and its VMM stops the guest after the
//! lease's `stop_time` whatever this setting says (it could not write
//! anyway): by default it pauses it (lease-suspended) and resumes it once
//! the datastore is back and the lease re-acquired. With `restart`, the
//! stop order here powers the paused copy off and the master restarts it,
//! like any VM HA stopped, on a host that reaches its datastores. The new
//! copy starts only once the lease is free or unchanged for
//! `takeover_time`, and a paused copy that finds the lease taken powers
//! itself off, so there is never a second copy.

use super::{Action, Agent, HaEvent, PowerOffReason};
use crate::time::Time;
use crate::types::{DatastoreId, DatastoreLossResponse, HostHaState, HostId, VmId};
use crate::wire::{Body, PowerState};
use std::collections::BTreeSet;
use std::time::Duration;

/// After a change, the access report rides on every heartbeat this long, so
/// one lost message does not leave the master with a stale view.
const REPORT_AFTER_CHANGE: Duration = Duration::from_secs(10);

/// A stop order not yet obeyed (the VM still reports on) is sent again
/// after this long.
const STOP_RESEND: Duration = Duration::from_secs(5);

impl Agent {
    /// The runtime's probe result for one local datastore.
    pub(super) fn on_datastore_access(
        &mut self,
        now: Time,
        datastore: DatastoreId,
        accessible: bool,
        out: &mut Vec<Action>,
    ) {
        let was_lost = self.ds_lost.contains_key(&datastore);
        if accessible != was_lost {
            return;
        }
        if accessible {
            tracing::info!(host = %self.cfg.host, datastore = %datastore, "datastore reachable again");
            self.ds_lost.remove(&datastore);
            out.push(Action::Event(HaEvent::DatastoreAccessible { datastore }));
        } else {
            tracing::warn!(host = %self.cfg.host, datastore = %datastore, "datastore not reachable");
            self.ds_lost.insert(datastore.clone(), now);
            out.push(Action::Event(HaEvent::DatastoreInaccessible { datastore }));
        }
        self.ds_access_changed = Some(now);
        self.report_ds_access(now, out);
    }

    /// Sends this host's lost datastores to the master (or records them, on
    /// the master).
    pub(super) fn report_ds_access(&mut self, now: Time, out: &mut Vec<Action>) {
        let lost: BTreeSet<DatastoreId> = self.ds_lost.keys().cloned().collect();
        match (self.state, self.master.clone()) {
            (HostHaState::Master, _) => {
                let me = self.cfg.host.clone();
                self.master_ds_access(now, &me, lost);
            }
            (HostHaState::Slave, Some(m)) => self.send(&m, Body::DatastoreAccess { lost }, out),
            _ => {}
        }
    }

    /// Whether the access report should ride on this heartbeat.
    pub(super) fn ds_access_report_due(&self, now: Time) -> bool {
        !self.ds_lost.is_empty()
            || self
                .ds_access_changed
                .is_some_and(|t| now.since(t) < REPORT_AFTER_CHANGE)
    }

    /// Master: `from` reports the datastores it cannot reach.
    pub(super) fn master_ds_access(
        &mut self,
        now: Time,
        from: &HostId,
        lost: BTreeSet<DatastoreId>,
    ) {
        let Some(m) = self.master_state.as_mut() else {
            return;
        };
        let known = m.ds_lost.entry(from.clone()).or_default();
        let before: BTreeSet<DatastoreId> = known.keys().cloned().collect();
        known.retain(|d, _| lost.contains(d));
        for d in lost {
            if !before.contains(&d) {
                tracing::warn!(host = %from, datastore = %d, "host reports a datastore unreachable");
                known.insert(d, now);
            }
        }
        if known.is_empty() {
            m.ds_lost.remove(from);
        }
        // Anything the host no longer reports lost needs no response.
        let still: BTreeSet<DatastoreId> = m
            .ds_lost
            .get(from)
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default();
        m.ds_loss_handled
            .retain(|(_, h, d), _| h != from || still.contains(d));
    }

    /// Master: datastores `host` has reported lost.
    pub(super) fn lost_on(&self, host: &HostId) -> BTreeSet<DatastoreId> {
        self.master_state
            .as_ref()
            .and_then(|m| m.ds_lost.get(host))
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Master: applies each VM's datastore-loss response once its delay has
    /// passed.
    pub(super) fn tick_datastore_loss(&mut self, now: Time, out: &mut Vec<Action>) {
        let Some(m) = self.master_state.as_ref() else {
            return;
        };
        if m.ds_lost.is_empty() {
            return;
        }
        let cluster = self.cluster().clone();
        // (vm, host, datastore, lost since) for running VMs on hosts that
        // lost one of their datastores.
        let mut affected = Vec::new();
        for (id, e) in &m.vms {
            let (Some(host), Some(PowerState::On)) = (&e.host, e.power) else {
                continue;
            };
            let Some(cfg) = cluster.vms.get(id) else {
                continue;
            };
            if cfg.datastore_loss.response == DatastoreLossResponse::Disabled {
                continue;
            }
            for (d, since) in m.ds_lost.get(host).into_iter().flatten() {
                if cfg.datastores.contains(d) && now.since(*since) >= cfg.datastore_loss.delay {
                    affected.push((id.clone(), host.clone(), d.clone()));
                }
            }
        }
        let candidates = self.placement_candidates(now);
        for (vm, host, d) in affected {
            let cfg = &cluster.vms[&vm];
            let key = (vm.clone(), host.clone(), d.clone());
            let prior = self
                .master_state
                .as_ref()
                .and_then(|m| m.ds_loss_handled.get(&key).copied());
            let target_exists = candidates.iter().any(|c| {
                c != &host
                    && cluster
                        .hosts
                        .get(c)
                        .is_some_and(|s| cfg.datastores.is_subset(&s.datastores))
                    && self.lost_on(c).is_disjoint(&cfg.datastores)
            });
            let m = self.master_state.as_mut().expect("master");
            if !target_exists {
                if m.ds_loss_no_target.insert((vm.clone(), d.clone())) {
                    tracing::warn!(vm = %vm, host = %host, datastore = %d, "datastore lost, and no other host reaches the VM's datastores: VM left in place");
                    out.push(Action::Event(HaEvent::DatastoreLossNoTarget {
                        vm: vm.clone(),
                        datastore: d.clone(),
                    }));
                }
                continue;
            }
            m.ds_loss_no_target.remove(&(vm.clone(), d.clone()));
            let response = cfg.datastore_loss.response;
            match (response, prior) {
                (DatastoreLossResponse::EventsOnly, Some(_)) => {}
                (DatastoreLossResponse::Restart, Some(t)) if now.since(t) < STOP_RESEND => {}
                _ => {
                    if prior.is_none() {
                        tracing::warn!(vm = %vm, host = %host, datastore = %d, ?response, "datastore lost on the VM's host and reachable elsewhere");
                        out.push(Action::Event(HaEvent::DatastoreLossResponse {
                            vm: vm.clone(),
                            host: host.clone(),
                            datastore: d.clone(),
                            response,
                        }));
                    }
                    m.ds_loss_handled.insert(key, now);
                    if response == DatastoreLossResponse::Restart {
                        if host == self.cfg.host {
                            self.on_datastore_loss_stop(vm, d, out);
                        } else {
                            self.send(&host, Body::DatastoreLossStop { vm, datastore: d }, out);
                        }
                    }
                }
            }
        }
    }

    /// This host's master ordered a VM stopped for datastore loss: obey if
    /// the datastore is still lost here and the VM runs here.
    pub(super) fn on_datastore_loss_stop(
        &mut self,
        vm: VmId,
        datastore: DatastoreId,
        out: &mut Vec<Action>,
    ) {
        let runs = self
            .local
            .get(&vm)
            .is_some_and(|v| v.power == PowerState::On);
        if !runs || !self.ds_lost.contains_key(&datastore) || self.off_reasons.contains_key(&vm) {
            return;
        }
        tracing::warn!(host = %self.cfg.host, vm = %vm, datastore = %datastore, "stopping guest: its datastore is lost here and reachable elsewhere");
        self.off_reasons
            .insert(vm.clone(), PowerOffReason::DatastoreLost);
        out.push(Action::Event(HaEvent::DatastoreLossStopped {
            vm: vm.clone(),
            datastore,
        }));
        out.push(Action::PowerOffVm {
            vm,
            reason: PowerOffReason::DatastoreLost,
        });
    }
}
