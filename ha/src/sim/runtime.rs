//! The simulated per-host VMM runtime: what the real one must do around the
//! agent. It renews each running VM's lease and checks it is still ours
//! (reporting `LeaseLost` when not), acquires leases for starts with the
//! takeover rule of `crate::lease`, and carries out graceful shutdowns.

use super::{Sim, SimVm};
use crate::agent::{Input, VmEvent};
use crate::lease::{LeaseHolder, LeaseRecord, TakeoverVerdict};
use crate::time::Time;
use crate::types::{HostId, VmId};
use std::time::Duration;

impl Sim {
    pub(super) fn stop_vm(&mut self, id: &HostId, vm: &VmId, release: bool) {
        let ds = self.lease_ds(vm);
        let storage = self.ds_ok(id, &ds);
        if let Some(v) = self.hosts.get_mut(id).expect("host").vms.remove(vm) {
            if release && storage {
                if let Some(rec) = self
                    .datastores
                    .get_mut(&ds)
                    .and_then(|s| s.leases.get_mut(vm))
                {
                    if rec.owner.as_ref() == Some(id) && rec.generation == v.holder.generation {
                        *rec = rec.released();
                    }
                }
            }
            self.later(
                id,
                Input::Vm {
                    vm: vm.clone(),
                    event: VmEvent::PoweredOff,
                },
            );
        }
    }

    /// The per-host VMM runtime: lease renewal and checks, lease
    /// acquisition for starts, graceful shutdowns.
    pub(super) fn runtime(&mut self, id: &HostId) {
        let now = self.now;
        let lt = self.timings.lease;
        if !self.hosts[id].storage {
            return self.runtime_starts_without_storage(id);
        }
        let running: Vec<VmId> = self.hosts[id].vms.keys().cloned().collect();
        for v in running {
            let ds = self.lease_ds(&v);
            if !self.ds_ok(id, &ds) {
                // Renewals fail: the agent's lease deadline stops the guest.
                let shut = self.hosts[id].vms[&v].shutdown_at;
                if shut.is_some_and(|t| now >= t) {
                    self.stop_vm(id, &v, true);
                }
                continue;
            }
            let rec = self
                .datastores
                .get(&ds)
                .and_then(|s| s.leases.get(&v))
                .cloned();
            let (gen, due, shut) = {
                let sv = &self.hosts[id].vms[&v];
                (sv.holder.generation, now >= sv.next_renew, sv.shutdown_at)
            };
            let ours = rec
                .as_ref()
                .is_some_and(|r| r.owner.as_ref() == Some(id) && r.generation == gen);
            if !ours {
                let (by, generation) = rec.map(|r| (r.owner, r.generation)).unwrap_or((None, 0));
                self.feed(
                    id,
                    Input::Vm {
                        vm: v.clone(),
                        event: VmEvent::LeaseLost { by, generation },
                    },
                );
                continue;
            }
            if shut.is_some_and(|t| now >= t) {
                self.stop_vm(id, &v, true);
                continue;
            }
            if due {
                let r = self
                    .datastores
                    .get_mut(&ds)
                    .and_then(|s| s.leases.get_mut(&v))
                    .expect("ours");
                *r = r.renewed();
                let sv = self
                    .hosts
                    .get_mut(id)
                    .expect("host")
                    .vms
                    .get_mut(&v)
                    .expect("vm");
                sv.holder.renewed(now);
                sv.next_renew = now + lt.renew_interval;
                self.feed(
                    id,
                    Input::Vm {
                        vm: v.clone(),
                        event: VmEvent::LeaseRenewed { issued_at: now },
                    },
                );
            }
        }
        let starting: Vec<VmId> = self.hosts[id].starting.keys().cloned().collect();
        for v in starting {
            let ds = self.lease_ds(&v);
            if !self.ds_ok(id, &ds) {
                let since = self.hosts[id].starting[&v].1;
                if now.since(since) >= Duration::from_secs(10) {
                    self.hosts.get_mut(id).expect("host").starting.remove(&v);
                    self.feed(
                        id,
                        Input::Vm {
                            vm: v,
                            event: VmEvent::StartFailed {
                                reason: "datastore unreachable".into(),
                            },
                        },
                    );
                }
                continue;
            }
            let rec = self
                .datastores
                .entry(ds.clone())
                .or_default()
                .leases
                .get(&v)
                .cloned()
                .unwrap_or(LeaseRecord {
                    owner: None,
                    generation: 0,
                    counter: 0,
                });
            let hs = self.hosts.get_mut(id).expect("host");
            let (obs, since) = hs.starting.get_mut(&v).expect("starting");
            let since = *since;
            match obs.observe(now, &rec, id, &lt) {
                TakeoverVerdict::Free | TakeoverVerdict::Expired => {
                    hs.starting.remove(&v);
                    let new = rec.acquired_by(id);
                    let holder = LeaseHolder::acquired(new.generation, now);
                    hs.vms.insert(
                        v.clone(),
                        SimVm {
                            holder,
                            next_renew: now + lt.renew_interval,
                            shutdown_at: None,
                        },
                    );
                    self.datastores
                        .get_mut(&ds)
                        .expect("ds")
                        .leases
                        .insert(v.clone(), new);
                    self.feed(
                        id,
                        Input::Vm {
                            vm: v,
                            event: VmEvent::PoweredOn,
                        },
                    );
                }
                TakeoverVerdict::Wait { .. } => {
                    if now.since(since) >= lt.takeover_time * 3 {
                        hs.starting.remove(&v);
                        self.feed(
                            id,
                            Input::Vm {
                                vm: v,
                                event: VmEvent::StartFailed {
                                    reason: "lease held by a live owner".into(),
                                },
                            },
                        );
                    }
                }
            }
        }
    }

    fn runtime_starts_without_storage(&mut self, id: &HostId) {
        let now = self.now;
        let starting: Vec<(VmId, Time)> = self.hosts[id]
            .starting
            .iter()
            .map(|(v, (_, t))| (v.clone(), *t))
            .collect();
        for (v, since) in starting {
            if now.since(since) >= Duration::from_secs(10) {
                self.hosts.get_mut(id).expect("host").starting.remove(&v);
                self.feed(
                    id,
                    Input::Vm {
                        vm: v,
                        event: VmEvent::StartFailed {
                            reason: "datastore unreachable".into(),
                        },
                    },
                );
            }
        }
    }
}
