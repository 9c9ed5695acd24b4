//! What every host does with its own VMs: starting them on the master's
//! order, reporting their power state, isolation responses (H9) and lease
//! enforcement (H10).

use super::{Action, Agent, CommandError, HaEvent, LocalVm, PowerOffReason, VmEvent};
use crate::lease::{HolderVerdict, LeaseHolder, LeaseLoss};
use crate::monitoring::{MonitorDecision, VmMonitor};
use crate::time::Time;
use crate::types::{HostHaState, IsolationResponse, VmConfig, VmId};
use crate::wire::{Body, PowerState};
use std::collections::BTreeMap;

impl Agent {
    /// Power state of every VM this host knows about, for the master.
    pub(super) fn local_power_states(&self) -> BTreeMap<VmId, PowerState> {
        let mut m: BTreeMap<VmId, PowerState> = self
            .local
            .iter()
            .map(|(id, v)| (id.clone(), v.power))
            .collect();
        for id in &self.starting {
            m.insert(id.clone(), PowerState::Starting);
        }
        m
    }

    /// Sends our VM states to whoever is master (ourselves included).
    pub(super) fn report_local(&mut self, now: Time, out: &mut Vec<Action>) {
        let vms = self.local_power_states();
        match (self.state, self.master.clone()) {
            (HostHaState::Master, _) => {
                let me = self.cfg.host.clone();
                self.master_vm_states(now, &me, vms, out);
            }
            (HostHaState::Slave, Some(m)) => self.send(&m, Body::VmStates { vms }, out),
            _ => {}
        }
    }

    /// Starts a VM here unless it already runs or is starting (restart
    /// orders are idempotent: a repeated order never makes a second copy).
    pub(super) fn start_local(&mut self, vm: VmConfig, out: &mut Vec<Action>) {
        let running = self
            .local
            .get(&vm.id)
            .is_some_and(|v| v.power == PowerState::On);
        if running || self.starting.contains(&vm.id) || self.incoming.contains(&vm.id) {
            return;
        }
        self.starting.insert(vm.id.clone());
        out.push(Action::StartVm { vm });
    }

    /// Accepts a VM arriving by live migration (`Command::AcceptIncoming`).
    pub(super) fn accept_incoming(&mut self, vm: VmId, out: &mut Vec<Action>) {
        let refuse = |reason: String| {
            Action::CommandDone(Err(CommandError::Migration {
                vm: vm.clone(),
                reason,
            }))
        };
        if self.state == HostHaState::Maintenance {
            out.push(refuse(format!(
                "host {} is in maintenance mode and runs no VMs",
                self.cfg.host
            )));
            return;
        }
        let here = self
            .local
            .get(&vm)
            .is_some_and(|v| v.power == PowerState::On)
            || self.starting.contains(&vm)
            || self.incoming.contains(&vm);
        if here {
            out.push(refuse(format!(
                "it already runs, starts or arrives on {}",
                self.cfg.host
            )));
            return;
        }
        self.incoming.insert(vm.clone());
        out.push(Action::CommandDone(Ok(format!(
            "{} accepts {vm}",
            self.cfg.host
        ))));
    }

    pub(super) fn user_power_off(&mut self, vm: VmId, out: &mut Vec<Action>) {
        if self
            .local
            .get(&vm)
            .is_some_and(|v| v.power == PowerState::On)
        {
            self.off_reasons.insert(vm.clone(), PowerOffReason::User);
            out.push(Action::PowerOffVm {
                vm: vm.clone(),
                reason: PowerOffReason::User,
            });
            out.push(Action::CommandDone(Ok(format!("powering off {vm}"))));
        } else {
            out.push(Action::CommandDone(Err(CommandError::NotRunningHere(vm))));
        }
    }

    pub(super) fn on_vm_event(
        &mut self,
        now: Time,
        vm: VmId,
        event: VmEvent,
        out: &mut Vec<Action>,
    ) {
        match event {
            VmEvent::PoweredOn => {
                self.starting.remove(&vm);
                self.incoming.remove(&vm);
                self.off_reasons.remove(&vm);
                let settings = self.cluster().monitoring_for(&vm);
                let monitor = settings.enabled().then(|| VmMonitor::new(settings, now));
                self.local.insert(
                    vm,
                    LocalVm {
                        power: PowerState::On,
                        lease: Some(LeaseHolder::acquired(0, now)),
                        shutdown_deadline: None,
                        monitor,
                        limit_reported: false,
                    },
                );
            }
            VmEvent::PoweredOff | VmEvent::Crashed => {
                let reason = self.off_reasons.remove(&vm);
                let power = match (&event, reason) {
                    (VmEvent::Crashed, _) => PowerState::Crashed,
                    (_, None | Some(PowerOffReason::User)) => PowerState::OffByUser,
                    (
                        _,
                        Some(
                            PowerOffReason::IsolationResponse
                            | PowerOffReason::IsolationShutdownTimeout,
                        ),
                    ) => PowerState::OffByIsolation,
                    (_, Some(PowerOffReason::StaleCopy)) => PowerState::Stale,
                    (_, Some(PowerOffReason::LeaseExpired | PowerOffReason::DatastoreLost)) => {
                        PowerState::OffByHa
                    }
                };
                if power == PowerState::OffByIsolation && self.state == HostHaState::Isolated {
                    self.released.insert(vm.clone());
                    // Publish the release at once: the master is waiting for it.
                    self.write_ds_heartbeat(out);
                }
                self.local.insert(
                    vm,
                    LocalVm {
                        power,
                        lease: None,
                        shutdown_deadline: None,
                        monitor: None,
                        limit_reported: false,
                    },
                );
            }
            VmEvent::IncomingEnded => {
                self.incoming.remove(&vm);
                return;
            }
            VmEvent::MigratedAway { to } => {
                tracing::info!(host = %self.cfg.host, vm = %vm, to = ?to, "VM migrated away");
                self.local.remove(&vm);
                self.off_reasons.remove(&vm);
            }
            VmEvent::StartFailed { reason } => {
                self.starting.remove(&vm);
                match (self.state, self.master.clone()) {
                    (HostHaState::Master, _) => {
                        let me = self.cfg.host.clone();
                        self.master_restart_failed(now, &me, vm, reason, out);
                    }
                    (HostHaState::Slave, Some(m)) => {
                        self.send(&m, Body::RestartFailed { vm, reason }, out)
                    }
                    _ => {}
                }
                return;
            }
            VmEvent::ToolsHeartbeat | VmEvent::AppHeartbeat | VmEvent::IoActivity => {
                if let Some(m) = self.local.get_mut(&vm).and_then(|v| v.monitor.as_mut()) {
                    match event {
                        VmEvent::ToolsHeartbeat => m.heartbeat(now),
                        VmEvent::AppHeartbeat => m.app_heartbeat(now),
                        _ => m.io_activity(now),
                    }
                }
                return;
            }
            VmEvent::LeaseRenewed { issued_at } => {
                let lt = self.cfg.timings.lease;
                if let Some(v) = self.local.get_mut(&vm) {
                    // Renewed after the stop time: the VMM was
                    // lease-suspended (guest paused) and holds the lease
                    // again. VM monitoring starts afresh from now, so the
                    // pause does not count as a hung guest.
                    let was_overdue = v
                        .lease
                        .as_ref()
                        .is_some_and(|l| l.check_time(now, &lt) == HolderVerdict::MustStop);
                    if let Some(h) = v.lease.as_mut() {
                        h.renewed(issued_at);
                    }
                    if was_overdue {
                        tracing::info!(host = %self.cfg.host, vm = %vm, "lease held again: guest resumed");
                        if let Some(m) = v.monitor.as_mut() {
                            m.heartbeat(now);
                            m.io_activity(now);
                        }
                    }
                }
                return;
            }
            VmEvent::LeaseLost { by, .. } => {
                if self
                    .local
                    .get(&vm)
                    .is_some_and(|v| v.power == PowerState::On)
                {
                    tracing::warn!(host = %self.cfg.host, vm = %vm, "lease taken by another host: powering off stale copy");
                    self.off_reasons
                        .insert(vm.clone(), PowerOffReason::StaleCopy);
                    out.push(Action::Event(HaEvent::StaleCopyPoweredOff {
                        vm: vm.clone(),
                        by,
                    }));
                    out.push(Action::PowerOffVm {
                        vm,
                        reason: PowerOffReason::StaleCopy,
                    });
                }
                return;
            }
        }
        self.report_local(now, out);
    }

    /// Lease deadlines and shut-down timeouts of local VMs.
    pub(super) fn tick_local(&mut self, now: Time, out: &mut Vec<Action>) {
        let lt = self.cfg.timings.lease;
        let mut stops = Vec::new();
        let mut resets = Vec::new();
        // VMs whose lease datastore this host's probe has found lost for
        // longer than a short stall: `stop_time + 2 x takeover_time`.
        let outage = lt.stop_time + lt.takeover_time * 2;
        let lease_ds_lost: Vec<VmId> = self
            .cluster
            .as_ref()
            .map(|c| {
                c.vms
                    .iter()
                    .filter(|(_, v)| {
                        v.datastores.iter().next().is_some_and(|d| {
                            self.ds_lost
                                .get(d)
                                .is_some_and(|since| now.since(*since) >= outage)
                        })
                    })
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        for (id, v) in &mut self.local {
            // A power-off already ordered needs no second one; a graceful
            // shutdown still needs its deadline (and the lease) watched.
            let off_ordered = self.off_reasons.contains_key(id);
            if v.power != PowerState::On || (off_ordered && v.shutdown_deadline.is_none()) {
                continue;
            }
            let overdue = v
                .lease
                .as_ref()
                .is_some_and(|l| l.check_time(now, &lt) == HolderVerdict::MustStop);
            // Paused, and the lease's datastore out of reach here for longer
            // than a stall: the VM is better restarted where its disks are
            // (the master does so once it hears the VM is off) than left
            // paused for as long as the outage lasts.
            let paused_for_good = overdue && lease_ds_lost.contains(id);
            if overdue && (lt.on_loss == LeaseLoss::PowerOff || paused_for_good) {
                stops.push((id.clone(), PowerOffReason::LeaseExpired));
            } else if v.shutdown_deadline.is_some_and(|d| now >= d) {
                v.shutdown_deadline = None;
                stops.push((id.clone(), PowerOffReason::IsolationShutdownTimeout));
            } else if overdue {
                // The VMM has paused the guest itself (lease-suspended) and
                // is re-acquiring; it powers the guest off if a peer took
                // the lease. Killing it here would turn a storage stall
                // into a dead guest, and a silent paused guest is not hung:
                // VM monitoring waits.
            } else if let (false, Some(m)) = (off_ordered, v.monitor.as_mut()) {
                match m.evaluate(now) {
                    MonitorDecision::Reset { reason } => {
                        v.limit_reported = false;
                        resets.push(HaEvent::VmReset {
                            vm: id.clone(),
                            reason,
                        });
                    }
                    MonitorDecision::ResetLimitReached { resets: n } if !v.limit_reported => {
                        v.limit_reported = true;
                        resets.push(HaEvent::VmResetLimitReached {
                            vm: id.clone(),
                            resets: n,
                        });
                    }
                    _ => {}
                }
            }
        }
        for ev in resets {
            match &ev {
                HaEvent::VmReset { vm, reason } => {
                    tracing::warn!(host = %self.cfg.host, vm = %vm, %reason, "resetting guest");
                    out.push(Action::ResetVm {
                        vm: vm.clone(),
                        reason: reason.clone(),
                    });
                }
                HaEvent::VmResetLimitReached { vm, resets } => {
                    tracing::error!(host = %self.cfg.host, vm = %vm, resets, "guest hung again but its resets are used up: left alone for an operator");
                }
                _ => {}
            }
            out.push(Action::Event(ev));
        }
        for (vm, reason) in stops {
            if reason == PowerOffReason::LeaseExpired {
                tracing::warn!(host = %self.cfg.host, vm = %vm, "lease not renewed in time: stopping guest");
                out.push(Action::Event(HaEvent::LeaseExpiredStop { vm: vm.clone() }));
            }
            self.off_reasons.insert(vm.clone(), reason);
            out.push(Action::PowerOffVm { vm, reason });
        }
    }

    /// Applies each running VM's isolation response (H9).
    pub(super) fn apply_isolation_responses(&mut self, now: Time, out: &mut Vec<Action>) {
        let running: Vec<VmId> = self
            .local
            .iter()
            .filter(|(_, v)| v.power == PowerState::On)
            .map(|(id, _)| id.clone())
            .collect();
        for vm in running {
            let response = self
                .cluster()
                .vms
                .get(&vm)
                .map(|c| c.isolation_response)
                .unwrap_or_default();
            out.push(Action::Event(HaEvent::IsolationResponseApplied {
                vm: vm.clone(),
                response,
            }));
            match response {
                IsolationResponse::LeaveOn => {}
                IsolationResponse::PowerOff => {
                    self.off_reasons
                        .insert(vm.clone(), PowerOffReason::IsolationResponse);
                    out.push(Action::PowerOffVm {
                        vm,
                        reason: PowerOffReason::IsolationResponse,
                    });
                }
                IsolationResponse::ShutDown => {
                    self.off_reasons
                        .insert(vm.clone(), PowerOffReason::IsolationResponse);
                    if let Some(v) = self.local.get_mut(&vm) {
                        v.shutdown_deadline = Some(now + self.cfg.timings.shutdown_timeout);
                    }
                    out.push(Action::ShutdownVm { vm });
                }
            }
        }
    }
}
