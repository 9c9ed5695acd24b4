//! Isolation detection (H6) and recovery: a host that hears no agent pings
//! its isolation addresses; if none answers it declares itself isolated,
//! publishes it on its heartbeat datastores and applies each VM's isolation
//! response (see `local.rs`). A slave gets here only after its election
//! attempt (it becomes a master of one first), so it decides after
//! host_timeout + election_window + ping; a master after isolation_detect +
//! ping; both plus the optional isolation_policy_delay.

use super::{Action, Agent, HaEvent, IsolationCheck};
use crate::config::MAX_ISOLATION_ADDRS;
use crate::time::Time;
use crate::types::HostHaState;

impl Agent {
    pub(super) fn tick_isolation(&mut self, now: Time, out: &mut Vec<Action>) {
        let t = &self.cfg.timings;
        let silent = now.since(self.last_traffic) >= t.isolation_detect;
        let alone = self.cluster().hosts.len() <= 1;
        match self.isolation.clone() {
            IsolationCheck::Idle { last_check } => {
                let due = last_check.is_none_or(|c| now.since(c) >= t.isolation_detect);
                if (silent && !alone && due) || (self.state == HostHaState::Isolated && due) {
                    let addrs: Vec<String> = self
                        .cfg
                        .isolation_addrs
                        .iter()
                        .take(MAX_ISOLATION_ADDRS)
                        .cloned()
                        .collect();
                    if addrs.is_empty() {
                        if !self.warned_no_isolation_addr {
                            self.warned_no_isolation_addr = true;
                            out.push(Action::Event(HaEvent::NoIsolationAddress));
                        }
                        return;
                    }
                    if self.state != HostHaState::Isolated {
                        out.push(Action::Event(HaEvent::IsolationCheck));
                    }
                    for a in &addrs {
                        out.push(Action::Ping { addr: a.clone() });
                    }
                    self.isolation = IsolationCheck::Pinging {
                        started: now,
                        answers: addrs.into_iter().map(|a| (a, None)).collect(),
                    };
                }
            }
            IsolationCheck::Pinging { started, answers } => {
                if now.since(started) >= t.ping_timeout
                    && answers.values().all(|a| *a != Some(true))
                {
                    self.isolation_pings_failed(now, out);
                }
            }
            IsolationCheck::Confirmed { at } => {
                if now.since(at) >= t.isolation_policy_delay {
                    self.isolation = IsolationCheck::Idle {
                        last_check: Some(now),
                    };
                    if self.state != HostHaState::Isolated
                        && now.since(self.last_traffic) >= t.isolation_detect
                    {
                        self.declare_isolated(now, out);
                    }
                }
            }
        }
    }

    fn isolation_pings_failed(&mut self, now: Time, out: &mut Vec<Action>) {
        if self.state == HostHaState::Isolated {
            self.isolation = IsolationCheck::Idle {
                last_check: Some(now),
            };
        } else {
            self.isolation = IsolationCheck::Confirmed { at: now };
            // With no policy delay, declare on this same step.
            self.tick_isolation(now, out);
        }
    }

    pub(super) fn on_ping(
        &mut self,
        now: Time,
        addr: String,
        answered: bool,
        out: &mut Vec<Action>,
    ) {
        if let IsolationCheck::Pinging { answers, .. } = &mut self.isolation {
            if let Some(slot) = answers.get_mut(&addr) {
                *slot = Some(answered);
                if answered {
                    self.isolation = IsolationCheck::Idle {
                        last_check: Some(now),
                    };
                    if self.state == HostHaState::Isolated {
                        // The network is back even if no agent talks yet.
                        out.push(Action::Event(HaEvent::IsolationEnded));
                        self.released.clear();
                        self.start_election(now, out);
                    }
                } else if answers.values().all(|a| *a == Some(false)) {
                    self.isolation_pings_failed(now, out);
                }
                return;
            }
        }
        if let (Some(m), Some(c)) = (self.master_state.as_mut(), self.cluster.as_ref()) {
            m.on_ping(&addr, answered, c);
        }
    }

    pub(super) fn declare_isolated(&mut self, now: Time, out: &mut Vec<Action>) {
        tracing::warn!(host = %self.cfg.host, "host isolated");
        self.master_state = None;
        self.master = None;
        self.set_state(HostHaState::Isolated, out);
        out.push(Action::Event(HaEvent::IsolationDeclared));
        self.apply_isolation_responses(now, out);
        // Publish at once: the master waits for this record to restart
        // released VMs.
        self.write_ds_heartbeat(out);
    }
}
