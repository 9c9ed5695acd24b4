//! Where restarts and operator power-ons go (H8, H12): candidate hosts,
//! placement by reservation and free capacity, the restart queue drained by
//! priority, and admission control for operator power-ons (never for
//! restarts).

use super::master::{Restart, VmEntry};
use super::{Action, Agent, CommandError, HaEvent};
use crate::admission::{self, admit, AdmissionPolicy, CapacityReport, HostCapacity};
use crate::time::Time;
use crate::types::{HostHaState, HostId, Resources, RestartPriority, VmId};
use crate::wire::{Body, PowerState, Role};

impl Agent {
    /// Hosts that may receive a restart: this master and the live slaves
    /// following it, never a host in maintenance.
    pub(super) fn placement_candidates(&self, now: Time) -> Vec<HostId> {
        let Some(m) = &self.master_state else {
            return Vec::new();
        };
        let me = &self.cfg.host;
        let mut v = vec![me.clone()];
        for (h, mon) in &m.hosts {
            let live = self.peers.get(h).is_some_and(|p| {
                self.heard_recently(p, now)
                    && p.role == Role::Slave
                    && p.master.as_ref() == Some(me)
            });
            if live && mon.state == HostHaState::Slave {
                v.push(h.clone());
            }
        }
        v
    }

    /// Why `h` cannot take `cfg` now (`None`: it can): datastores it
    /// cannot reach or does not mount, a dedicated failover host (only
    /// restarts go there), restarts already in flight, too little
    /// unreserved capacity.
    fn host_refusal(
        &self,
        h: &HostId,
        cfg: &crate::types::VmConfig,
        restart: bool,
        failover_hosts: &std::collections::BTreeSet<HostId>,
    ) -> Option<String> {
        let cluster = self.cluster();
        let m = self.master_state.as_ref()?;
        let Some(spec) = cluster.hosts.get(h) else {
            return Some(format!("{h}: not in the cluster"));
        };
        let lost = self.lost_on(h);
        if let Some(d) = cfg.datastores.iter().find(|d| lost.contains(*d)) {
            return Some(format!("{h}: cannot reach datastore {d}"));
        }
        if !restart && failover_hosts.contains(h) {
            return Some(format!("{h}: dedicated failover host"));
        }
        if !cfg.datastores.is_subset(&spec.datastores) {
            return Some(format!("{h}: does not mount the VM's datastores"));
        }
        let (used, inflight) = m.used_on(h, cluster);
        let free = spec.capacity.saturating_sub(&used);
        if inflight >= self.cfg.timings.max_concurrent_restarts_per_host {
            return Some(format!("{h}: {inflight} restarts already in flight"));
        }
        if !free.fits(&cfg.reservation) {
            return Some(format!(
                "{h}: {} MHz / {} MiB free",
                free.cpu_mhz, free.mem_mib
            ));
        }
        None
    }

    /// Why `h` takes no VM while in maintenance mode, if it is.
    fn in_maintenance(&self, h: &HostId) -> Option<String> {
        let m = self.master_state.as_ref()?;
        m.hosts
            .get(h)
            .is_some_and(|mon| mon.state == HostHaState::Maintenance)
            .then(|| {
                format!(
                    "host {h} is in maintenance mode and runs no VMs until it exits it \
                     (`vigil cluster maintenance exit {h}`)"
                )
            })
    }

    /// Why `h` cannot be chosen by name: not a live member following us.
    fn not_live(&self, now: Time, h: &HostId) -> Option<String> {
        (!self.placement_candidates(now).contains(h))
            .then(|| format!("host {h} is not a live member of this master's cluster"))
    }

    /// Chooses a host for `vm`: mounts its datastores, has the reservation
    /// free, has a restart slot; most free memory first. `avoid` is used only
    /// if nothing else fits; `exclude` never (a migration's source). With
    /// dedicated failover hosts, a restart goes to one of them first, and an
    /// operator power-on never goes there.
    fn place(
        &self,
        now: Time,
        vm: &VmId,
        avoid: Option<&HostId>,
        exclude: Option<&HostId>,
        restart: bool,
    ) -> Result<HostId, String> {
        let cluster = self.cluster();
        let m = self.master_state.as_ref().ok_or("not master")?;
        let failover_hosts = match &cluster.admission {
            AdmissionPolicy::DedicatedFailoverHosts(f) => f.clone(),
            _ => Default::default(),
        };
        let cfg = cluster
            .vms
            .get(vm)
            .ok_or_else(|| format!("VM {vm} has no configuration"))?;
        let mut best: Vec<(Resources, HostId)> = Vec::new();
        let mut why = Vec::new();
        for h in self.placement_candidates(now) {
            if Some(&h) == exclude {
                continue;
            }
            match self.host_refusal(&h, cfg, restart, &failover_hosts) {
                Some(r) => why.push(r),
                None => {
                    let spec = &cluster.hosts[&h];
                    let (used, _) = m.used_on(&h, cluster);
                    best.push((spec.capacity.saturating_sub(&used), h));
                }
            }
        }
        best.sort_by(|a, b| {
            failover_hosts
                .contains(&b.1)
                .cmp(&failover_hosts.contains(&a.1))
                .then(b.0.mem_mib.cmp(&a.0.mem_mib))
                .then(b.0.cpu_mhz.cmp(&a.0.cpu_mhz))
                .then(a.1.cmp(&b.1))
        });
        let pick = best.iter().find(|(_, h)| Some(h) != avoid).or(best.first());
        match pick {
            Some((_, h)) => Ok(h.clone()),
            None => Err(format!(
                "needs {} MHz / {} MiB; {}",
                cfg.reservation.cpu_mhz,
                cfg.reservation.mem_mib,
                if why.is_empty() {
                    format!(
                        "no {}live host",
                        if exclude.is_some() { "other " } else { "" }
                    )
                } else {
                    why.join("; ")
                }
            )),
        }
    }

    pub(super) fn run_placement(&mut self, now: Time, out: &mut Vec<Action>) {
        let cluster = self.cluster.clone().expect("HA enabled");
        let Some(m) = self.master_state.as_ref() else {
            return;
        };
        let mut due: Vec<(RestartPriority, VmId, HostId, u32)> = m
            .vms
            .iter()
            .filter_map(|(id, e)| match &e.restart {
                Restart::Pending {
                    from,
                    attempt,
                    not_before,
                    ..
                } if *not_before <= now => {
                    let prio = cluster.vms.get(id).map(|c| c.priority).unwrap_or_default();
                    Some((prio, id.clone(), from.clone(), *attempt))
                }
                _ => None,
            })
            .collect();
        // Higher priority first; VM id keeps the order deterministic.
        due.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, vm, from, attempt) in due {
            match self.place(now, &vm, Some(&from), None, true) {
                Ok(target) => {
                    let attempt = attempt + 1;
                    let m = self.master_state.as_mut().expect("master");
                    let e = m.vms.get_mut(&vm).expect("listed");
                    e.restart = Restart::InFlight {
                        host: target.clone(),
                        from,
                        attempt,
                    };
                    e.host = Some(target.clone());
                    e.power = None;
                    tracing::info!(vm = %vm, host = %target, attempt, "restart ordered");
                    out.push(Action::Event(HaEvent::RestartOrdered {
                        vm: vm.clone(),
                        host: target.clone(),
                        attempt,
                    }));
                    self.order_start(&vm, &target, out);
                }
                Err(reason) => {
                    let m = self.master_state.as_mut().expect("master");
                    let e = m.vms.get_mut(&vm).expect("listed");
                    if let Restart::Pending { reported, .. } = &mut e.restart {
                        if reported.as_deref() != Some(reason.as_str()) {
                            *reported = Some(reason.clone());
                            out.push(Action::Event(HaEvent::RestartPending { vm, reason }));
                        }
                    }
                }
            }
        }
    }

    fn order_start(&mut self, vm: &VmId, target: &HostId, out: &mut Vec<Action>) {
        let Some(cfg) = self.cluster().vms.get(vm).cloned() else {
            return;
        };
        if target == &self.cfg.host {
            self.start_local(cfg, out);
        } else {
            self.send(target, Body::RestartOrder { vm: cfg }, out);
        }
    }

    /// What admission control counts (master only): the live hosts that may
    /// take VMs, and the reservations of VMs powered on or starting.
    fn admission_inputs(&self, now: Time) -> (Vec<HostCapacity>, Vec<Resources>) {
        let cluster = self.cluster();
        let hosts = self
            .placement_candidates(now)
            .iter()
            .filter_map(|h| {
                cluster.hosts.get(h).map(|s| HostCapacity {
                    id: h.clone(),
                    capacity: s.capacity,
                })
            })
            .collect();
        (hosts, self.powered_on_reservations(|_| true))
    }

    /// The reservations of VMs powered on or starting (master only), on
    /// the hosts `keep` accepts (`None`: no host known).
    fn powered_on_reservations(&self, keep: impl Fn(Option<&HostId>) -> bool) -> Vec<Resources> {
        let cluster = self.cluster();
        self.master_state
            .iter()
            .flat_map(|m| m.vms.iter())
            .filter(|(_, e)| {
                e.power == Some(PowerState::On) || matches!(e.restart, Restart::InFlight { .. })
            })
            .filter(|(_, e)| keep(e.host.as_ref()))
            .filter_map(|(id, _)| cluster.vms.get(id).map(|c| c.reservation))
            .collect()
    }

    /// Current and failover capacity under the active admission policy, for
    /// `vigil cluster status` (master only; `None` elsewhere). Print it with
    /// `Display`, or serialise it.
    pub fn capacity(&self, now: Time) -> Option<CapacityReport> {
        if self.state != HostHaState::Master {
            return None;
        }
        let (hosts, powered_on) = self.admission_inputs(now);
        Some(admission::capacity(
            &self.cluster().admission,
            &hosts,
            &powered_on,
        ))
    }

    /// Whether `host` may enter maintenance mode under admission control
    /// (master only). Its VMs count as moved to the other hosts, unless
    /// `power_off` (they will be off, so they no longer count).
    pub(super) fn check_maintenance(
        &self,
        now: Time,
        host: &HostId,
        power_off: bool,
    ) -> Result<(), CommandError> {
        if self.state != HostHaState::Master {
            return Err(CommandError::NotMaster {
                master: self.master.clone(),
            });
        }
        let (hosts, _) = self.admission_inputs(now);
        let powered_on = self.powered_on_reservations(|h| !(power_off && h == Some(host)));
        admission::admit_maintenance(&self.cluster().admission, &hosts, &powered_on, host)
            .map_err(|e| CommandError::Admission(e.to_string()))
    }

    /// Whether `vm`'s reservation may become `new` (master only): see
    /// `Command::CheckReservation`. `Ok` says why it is allowed.
    pub(super) fn check_reservation(
        &self,
        now: Time,
        vm: &VmId,
        new: Resources,
    ) -> Result<String, CommandError> {
        if self.state != HostHaState::Master {
            return Err(CommandError::NotMaster {
                master: self.master.clone(),
            });
        }
        let cluster = self.cluster();
        let Some(old) = cluster.vms.get(vm).map(|c| c.reservation) else {
            return Err(CommandError::UnknownVm(vm.clone()));
        };
        let running = self
            .master_state
            .iter()
            .flat_map(|m| m.vms.get(vm))
            .find(|e| {
                e.power == Some(PowerState::On) || matches!(e.restart, Restart::InFlight { .. })
            });
        let Some(entry) = running else {
            return Ok(format!(
                "{vm} is powered off: its reservation counts from its next power-on"
            ));
        };
        if new.cpu_mhz <= old.cpu_mhz && new.mem_mib <= old.mem_mib {
            return Ok(format!(
                "{vm} runs; a smaller reservation is always admitted"
            ));
        }
        let (hosts, _) = self.admission_inputs(now);
        let others = self.powered_on_reservations_except(vm);
        admission::admit_reservation_change(
            &cluster.admission,
            &hosts,
            &others,
            new,
            entry.host.as_ref(),
        )
        .map_err(|e| CommandError::Admission(format!("VM {vm} keeps its reservation: {e}")))?;
        Ok(format!(
            "{vm} runs; admission control admits the larger reservation"
        ))
    }

    /// The reservations of every VM but `vm` powered on or starting
    /// (master only).
    fn powered_on_reservations_except(&self, vm: &VmId) -> Vec<Resources> {
        let cluster = self.cluster();
        self.master_state
            .iter()
            .flat_map(|m| m.vms.iter())
            .filter(|(id, e)| {
                *id != vm
                    && (e.power == Some(PowerState::On)
                        || matches!(e.restart, Restart::InFlight { .. }))
            })
            .filter_map(|(id, _)| cluster.vms.get(id).map(|c| c.reservation))
            .collect()
    }

    /// Operator power-on: admission control, then placement (master only).
    pub(super) fn user_power_on(
        &mut self,
        now: Time,
        vm: VmId,
        host: Option<HostId>,
        out: &mut Vec<Action>,
    ) {
        if self.state != HostHaState::Master {
            out.push(Action::CommandDone(Err(CommandError::NotMaster {
                master: self.master.clone(),
            })));
            return;
        }
        let cluster = self.cluster.clone().expect("HA enabled");
        let Some(cfg) = cluster.vms.get(&vm).cloned() else {
            out.push(Action::CommandDone(Err(CommandError::UnknownVm(vm))));
            return;
        };
        let m = self.master_state.as_ref().expect("master");
        if let Some(e) = m.vms.get(&vm) {
            if e.power == Some(PowerState::On) || matches!(e.restart, Restart::InFlight { .. }) {
                let h = e.host.clone().map(|h| h.to_string()).unwrap_or_default();
                out.push(Action::CommandDone(Ok(format!(
                    "{vm} is already running or starting on {h}"
                ))));
                return;
            }
        }
        if let Some(reason) = host.as_ref().and_then(|h| self.in_maintenance(h)) {
            out.push(Action::CommandDone(Err(CommandError::NoPlacement {
                vm,
                reason,
            })));
            return;
        }
        let (hosts, powered_on) = self.admission_inputs(now);
        if let Err(e) = admit(
            &cluster.admission,
            &hosts,
            &powered_on,
            cfg.reservation,
            host.as_ref(),
        ) {
            out.push(Action::CommandDone(Err(CommandError::Admission(
                e.to_string(),
            ))));
            return;
        }
        let target = match host {
            Some(h) => match self.not_live(now, &h) {
                None => h,
                Some(reason) => {
                    out.push(Action::CommandDone(Err(CommandError::NoPlacement {
                        vm,
                        reason,
                    })));
                    return;
                }
            },
            None => match self.place(now, &vm, None, None, false) {
                Ok(h) => h,
                Err(reason) => {
                    out.push(Action::CommandDone(Err(CommandError::NoPlacement {
                        vm,
                        reason,
                    })));
                    return;
                }
            },
        };
        let m = self.master_state.as_mut().expect("master");
        let e = m.vms.entry(vm.clone()).or_insert(VmEntry {
            protected: false,
            host: None,
            power: None,
            restart: Restart::Idle,
        });
        e.protected = true;
        e.host = Some(target.clone());
        e.restart = Restart::InFlight {
            host: target.clone(),
            from: target.clone(),
            attempt: 0,
        };
        out.push(Action::CommandDone(Ok(format!(
            "starting {vm} on {target}"
        ))));
        self.order_start(&vm, &target, out);
    }

    /// Plans a live migration (master only): see `Command::BeginMigration`.
    /// Within the cluster the totals admission control judges do not
    /// change, so the target only needs what a power-on there would (live,
    /// not in maintenance, not a dedicated failover host, the VM's
    /// datastores reachable, its reservation free); a VM coming from
    /// outside is also a power-on for admission control.
    pub(super) fn begin_migration(
        &mut self,
        now: Time,
        vm: VmId,
        to: Option<HostId>,
        from_outside: bool,
    ) -> Result<String, CommandError> {
        if self.state != HostHaState::Master {
            return Err(CommandError::NotMaster {
                master: self.master.clone(),
            });
        }
        let refuse = |reason: String| CommandError::Migration {
            vm: vm.clone(),
            reason,
        };
        let cluster = self.cluster.clone().expect("HA enabled");
        let Some(cfg) = cluster.vms.get(&vm).cloned() else {
            return Err(CommandError::UnknownVm(vm));
        };
        let m = self.master_state.as_ref().expect("master");
        if let Some(g) = m.migrating.get(&vm).filter(|g| !g.done) {
            return Err(refuse(format!(
                "a migration to {} is already under way",
                g.to
            )));
        }
        let entry = m.vms.get(&vm);
        if entry.is_some_and(|e| {
            matches!(
                e.restart,
                Restart::InFlight { .. } | Restart::Pending { .. }
            )
        }) {
            return Err(refuse(
                "it is being started or restarted: wait until it runs".into(),
            ));
        }
        let running_on = entry
            .filter(|e| e.power == Some(PowerState::On))
            .and_then(|e| e.host.clone());
        let from = match (from_outside, running_on) {
            (false, Some(h)) => Some(h),
            (false, None) => {
                return Err(refuse(
                    "it does not run in the cluster: start it with `vigil vm start`, or bring a \
                     VM running outside the cluster in with `vigil vm migrate NAME --api-socket PATH`"
                        .into(),
                ))
            }
            (true, Some(h)) => {
                return Err(refuse(format!(
                    "it already runs in the cluster, on {h}: another copy cannot come in"
                )))
            }
            (true, None) => None,
        };
        if from_outside {
            // A power-on for admission control, judged first as for one.
            let (hosts, powered_on) = self.admission_inputs(now);
            admit(
                &cluster.admission,
                &hosts,
                &powered_on,
                cfg.reservation,
                to.as_ref(),
            )
            .map_err(|e| refuse(e.to_string()))?;
        }
        let target = match to {
            Some(h) if Some(&h) == from.as_ref() => {
                return Err(refuse(format!("it already runs on {h}")))
            }
            Some(h) => {
                if let Some(r) = self.in_maintenance(&h).or_else(|| self.not_live(now, &h)) {
                    return Err(refuse(r));
                }
                let failover_hosts = match &cluster.admission {
                    AdmissionPolicy::DedicatedFailoverHosts(f) => f.clone(),
                    _ => Default::default(),
                };
                if let Some(r) = self.host_refusal(&h, &cfg, false, &failover_hosts) {
                    return Err(refuse(format!("the target cannot take it: {r}")));
                }
                h
            }
            None => self
                .place(now, &vm, None, from.as_ref(), false)
                .map_err(|r| refuse(format!("no other host can take it: {r}")))?,
        };
        let m = self.master_state.as_mut().expect("master");
        m.migrating.insert(
            vm.clone(),
            super::master::Migration {
                from: from.clone(),
                to: target.clone(),
                until: now + super::master::MIGRATION_TIMEOUT,
                done: false,
            },
        );
        tracing::info!(vm = %vm, from = ?from, to = %target, "migration planned");
        Ok(format!(
            "{} -> {target}",
            from.map_or_else(|| "outside".to_string(), |h| h.to_string())
        ))
    }

    /// The migration of `vm` the master has planned and not yet seen end:
    /// (source, `None` for a VM from outside the cluster; target).
    pub fn planned_migration(&self, vm: &VmId) -> Option<(Option<HostId>, HostId)> {
        let g = self.master_state.as_ref()?.migrating.get(vm)?;
        (!g.done).then(|| (g.from.clone(), g.to.clone()))
    }

    /// A planned migration ended (master only).
    pub(super) fn end_migration(
        &mut self,
        now: Time,
        vm: VmId,
        ok: bool,
        out: &mut Vec<Action>,
    ) -> Result<String, CommandError> {
        if self.state != HostHaState::Master {
            return Err(CommandError::NotMaster {
                master: self.master.clone(),
            });
        }
        let m = self.master_state.as_mut().expect("master");
        let Some(g) = m.migrating.get_mut(&vm) else {
            return Ok(format!("no migration of {vm} is known here"));
        };
        if !ok {
            m.migrating.remove(&vm);
            return Ok(format!("{vm}: migration failed; it stays where it ran"));
        }
        g.done = true;
        g.until = now + super::master::MIGRATED_GRACE;
        let to = g.to.clone();
        let e = m.vms.entry(vm.clone()).or_insert(VmEntry {
            protected: false,
            host: None,
            power: None,
            restart: Restart::Idle,
        });
        e.protected = true;
        e.host = Some(to.clone());
        e.power = Some(PowerState::On);
        e.restart = Restart::Idle;
        self.persist_if_changed(out);
        Ok(format!("{vm} runs on {to}"))
    }
}
