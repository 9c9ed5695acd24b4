//! Host failure and restart scenarios (H3, H4, H8, H10, H12).

use super::*;
use crate::agent::CommandError;
use crate::types::{RestartPriority, VmProtection};

fn prio(mut c: VmConfig, p: RestartPriority) -> VmConfig {
    c.priority = p;
    c
}

fn classified(sim: &Sim, master: &str, host: &str) -> Option<HostHaState> {
    sim.hosts[&h(master)]
        .agent
        .status()
        .hosts
        .get(&h(host))
        .copied()
}

#[test]
fn failed_slave_vms_restarted_by_priority() {
    let mut spec = uniform(3);
    spec.vms = vec![
        (
            prio(vmc("vm-low", 1000, 1024), RestartPriority::Low),
            "host-1",
        ),
        (
            prio(vmc("vm-high", 1000, 1024), RestartPriority::High),
            "host-1",
        ),
        (vmc("vm-med", 1000, 1024), "host-1"),
        (
            prio(vmc("vm-off", 1000, 1024), RestartPriority::Disabled),
            "host-1",
        ),
        (vmc("vm-other", 1000, 1024), "host-2"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.crash("host-1");
    let crashed = sim.now;
    sim.run_until(Duration::from_secs(20), "host-1 failed", |s| {
        classified(s, "host-3", "host-1") == Some(HostHaState::Failed)
    });
    // Silent 3 s, then the datastore record must be stale for 5 s.
    assert!(
        sim.now.since(crashed) <= Duration::from_secs(10),
        "{:?}",
        sim.now.since(crashed)
    );
    sim.run_secs(1);
    let order: Vec<VmId> = sim.restart_orders().into_iter().map(|(v, _)| v).collect();
    assert_eq!(order, vec![vm("vm-high"), vm("vm-med"), vm("vm-low")]);
    // Leases of the dead host expire after takeover_time; then all run.
    sim.run_until(Duration::from_secs(40), "restarted", |s| {
        ["vm-high", "vm-med", "vm-low"]
            .iter()
            .all(|v| s.running_on(v).len() == 1)
    });
    sim.run_secs(2);
    assert!(
        sim.running_on("vm-off").is_empty(),
        "priority disabled is never restarted"
    );
    assert_eq!(sim.running_on("vm-other"), vec![h("host-2")]);
    let st = sim.hosts[&h("host-3")].agent.status();
    assert!(matches!(
        st.vms[&vm("vm-high")],
        VmProtection::Protected { .. }
    ));
    assert_eq!(
        sim.events_where(|e| matches!(e.ev, HaEvent::VmRestarted { .. }))
            .len(),
        3
    );
}

#[test]
fn placement_respects_reservations_and_capacity() {
    let mut spec = uniform(3);
    spec.hosts[1].1 = Resources::new(16_000, 4096); // host-2: little memory
    spec.vms = vec![
        (vmc("vm-big", 2000, 8192), "host-1"),
        (vmc("vm-small", 500, 1024), "host-1"),
        (vmc("vm-filler", 500, 50_000), "host-3"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "restarted", |s| {
        s.running_on("vm-big").len() == 1 && s.running_on("vm-small").len() == 1
    });
    // host-3 has 15536 MiB free, host-2 only 4096: vm-big must go to host-3;
    // then vm-small goes where most memory is left (host-3: 7344 MiB).
    assert_eq!(
        sim.restart_orders(),
        vec![(vm("vm-big"), h("host-3")), (vm("vm-small"), h("host-3"))]
    );
}

#[test]
fn placement_requires_the_vm_datastores() {
    let mut spec = uniform(3);
    spec.hosts[1].2 = vec!["ds2", "ds3"]; // host-2 cannot see ds1
    spec.hosts[2].2 = vec!["ds1", "ds2", "ds3"];
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "restarted", |s| {
        s.running_on("vm-a").len() == 1
    });
    assert_eq!(sim.restart_orders(), vec![(vm("vm-a"), h("host-3"))]);
}

#[test]
fn capacity_exhausted_restart_pending_then_placed() {
    let mut spec = uniform(2);
    spec.vms = vec![
        (vmc("vm-a", 1000, 40_000), "host-1"),
        (vmc("vm-b", 1000, 40_000), "host-2"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-2"));
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(20), "pending reported", |s| {
        s.has_event(
            |e| matches!(&e.ev, HaEvent::RestartPending { vm, .. } if vm.as_str() == "vm-a"),
        )
    });
    let reason = sim
        .events_where(|e| matches!(e.ev, HaEvent::RestartPending { .. }))
        .into_iter()
        .find_map(|e| match e.ev {
            HaEvent::RestartPending { reason, .. } => Some(reason),
            _ => None,
        })
        .unwrap();
    assert!(
        reason.contains("needs 1000 MHz / 40000 MiB; host-2: 15000 MHz / 25536 MiB free"),
        "{reason}"
    );
    let st = sim.hosts[&h("host-2")].agent.status();
    assert!(
        matches!(&st.vms[&vm("vm-a")], VmProtection::RestartPending { reason } if reason.contains("25536"))
    );
    sim.run_secs(10);
    assert_eq!(
        sim.events_where(|e| matches!(e.ev, HaEvent::RestartPending { .. }))
            .len(),
        1,
        "reported once"
    );
    // The operator frees capacity: the pending restart goes through.
    sim.command("host-2", Command::PowerOffVm { vm: vm("vm-b") })
        .unwrap();
    sim.run_until(Duration::from_secs(40), "vm-a restarted", |s| {
        s.running_on("vm-a") == vec![h("host-2")]
    });
}

#[test]
fn concurrent_restarts_per_host_are_bounded() {
    let mut spec = uniform(3);
    spec.timings.max_concurrent_restarts_per_host = 2;
    spec.vms = (0..8)
        .map(|i| {
            (
                vmc(Box::leak(format!("vm-{i}").into_boxed_str()), 100, 100),
                "host-1",
            )
        })
        .collect();
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(20), "first orders", |s| {
        !s.restart_orders().is_empty()
    });
    sim.run_secs(2);
    // Takeover of the dead host's leases takes 20 s: at most 2 in flight on each of 2 hosts.
    assert_eq!(sim.restart_orders().len(), 4, "{:?}", sim.restart_orders());
    sim.run_until(Duration::from_secs(120), "all 8 running", |s| {
        (0..8).all(|i| s.running_on(&format!("vm-{i}")).len() == 1)
    });
    assert_eq!(sim.restart_orders().len(), 8);
}

#[test]
fn restart_retried_with_backoff() {
    let mut spec = uniform(2);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-2"));
    sim.hosts.get_mut(&h("host-2")).unwrap().fail_starts = 2;
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(90), "restarted", |s| {
        s.running_on("vm-a") == vec![h("host-2")]
    });
    let retries: Vec<(u32, Duration)> = sim
        .events
        .iter()
        .filter_map(|e| match &e.ev {
            HaEvent::RestartRetry { attempt, after, .. } => Some((*attempt, *after)),
            _ => None,
        })
        .collect();
    assert_eq!(
        retries,
        vec![(1, Duration::from_secs(2)), (2, Duration::from_secs(4))]
    );
    let ordered: Vec<Time> = sim
        .events_where(|e| matches!(e.ev, HaEvent::RestartOrdered { .. }))
        .iter()
        .map(|e| e.at)
        .collect();
    assert_eq!(ordered.len(), 3);
    assert!(ordered[2].since(ordered[1]) >= Duration::from_secs(4));
    assert_eq!(sim.starts.iter().filter(|s| s.2 == vm("vm-a")).count(), 3);
}

#[test]
fn restart_gives_up_after_max_attempts() {
    let mut spec = uniform(2);
    spec.timings.restart_max_attempts = 3;
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.hosts.get_mut(&h("host-2")).unwrap().fail_starts = 100;
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "gave up", |s| {
        s.has_event(|e| matches!(e.ev, HaEvent::RestartGaveUp { .. }))
    });
    let st = sim.hosts[&h("host-2")].agent.status();
    assert!(
        matches!(&st.vms[&vm("vm-a")], VmProtection::RestartFailed { reason } if reason.contains("VMM failed"))
    );
    sim.run_secs(30);
    assert_eq!(sim.restart_orders().len(), 3);
}

#[test]
fn maintenance_host_gets_no_restarts() {
    let mut spec = uniform(3);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-1"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.command("host-2", Command::EnterMaintenance).unwrap();
    sim.run_secs(3);
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "restarted", |s| {
        s.running_on("vm-a").len() == 1 && s.running_on("vm-b").len() == 1
    });
    assert!(
        sim.restart_orders().iter().all(|(_, t)| t == &h("host-3")),
        "{:?}",
        sim.restart_orders()
    );
}

#[test]
fn master_failure_its_vms_restarted_from_protected_list() {
    let mut spec = uniform(3);
    spec.vms = vec![
        (vmc("vm-m", 1000, 1024), "host-3"),
        (vmc("vm-s", 1000, 1024), "host-1"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    let list = sim.datastores[&DatastoreId::new("ds1")]
        .protected
        .clone()
        .unwrap();
    assert_eq!(
        list.vms.get(&vm("vm-m")),
        Some(&h("host-3")),
        "master persisted its own VM"
    );
    sim.crash("host-3");
    sim.run_until(Duration::from_secs(60), "vm-m restarted", |s| {
        s.running_on("vm-m").len() == 1
    });
    assert_eq!(sim.masters(), vec![h("host-2")]);
    assert_eq!(sim.running_on("vm-s"), vec![h("host-1")], "untouched");
}

#[test]
fn user_powered_off_vm_is_not_restarted() {
    let mut spec = uniform(2);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-1"),
    ];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.command("host-1", Command::PowerOffVm { vm: vm("vm-a") })
        .unwrap();
    sim.run_secs(3);
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "vm-b restarted", |s| {
        s.running_on("vm-b").len() == 1
    });
    sim.run_secs(10);
    assert!(sim.running_on("vm-a").is_empty());
    assert!(sim.restart_orders().iter().all(|(v, _)| v != &vm("vm-a")));
}

#[test]
fn crashed_vm_on_live_host_is_restarted_once() {
    let mut spec = uniform(2);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    // The VMM dies; its lease is not released (crash), so the restart waits for it.
    sim.hosts
        .get_mut(&h("host-1"))
        .unwrap()
        .vms
        .remove(&vm("vm-a"));
    sim.feed(
        &h("host-1"),
        Input::Vm {
            vm: vm("vm-a"),
            event: VmEvent::Crashed,
        },
    );
    sim.run_until(Duration::from_secs(60), "restarted", |s| {
        s.running_on("vm-a").len() == 1
    });
    sim.run_secs(30);
    assert_eq!(sim.restart_orders().len(), 1);
    // Placed away from the host where it crashed when another host fits.
    assert_eq!(sim.restart_orders()[0].1, h("host-2"));
}

#[test]
fn restart_target_dies_order_is_replaced_once() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(20), "ordered", |s| {
        !s.restart_orders().is_empty()
    });
    let target = sim.restart_orders()[0].1.clone();
    assert_eq!(
        target,
        h("host-2"),
        "most free memory, then id: host-2 has no VM"
    );
    // The target dies while waiting for the lease.
    sim.crash("host-2");
    sim.run_until(Duration::from_secs(60), "running", |s| {
        s.running_on("vm-a") == vec![h("host-3")]
    });
    sim.run_secs(30);
    let orders = sim.restart_orders();
    assert_eq!(
        orders,
        vec![(vm("vm-a"), h("host-2")), (vm("vm-a"), h("host-3"))]
    );
}

#[test]
fn admission_control_on_power_on() {
    let mut spec = uniform(3);
    spec.admission = AdmissionPolicy::HostFailuresTolerated(1);
    // Slot = 4000 MHz / 16384 MiB: 4 slots per host, 12 in all, 8 once the
    // largest host is gone. Eight VMs run; a ninth would break the policy.
    spec.vms = (1..=9)
        .map(|i| {
            let id: &'static str = Box::leak(format!("vm-{i}").into_boxed_str());
            let host: &'static str = Box::leak(format!("host-{}", 1 + i % 3).into_boxed_str());
            (vmc(id, 4000, 16_384), host)
        })
        .collect();
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    let on9 = || Command::PowerOnVm {
        vm: vm("vm-9"),
        host: None,
    };
    sim.command("host-1", Command::PowerOffVm { vm: vm("vm-9") })
        .unwrap();
    sim.run_secs(3);
    // A slave redirects the CLI to the master.
    let err = sim.command("host-1", on9()).unwrap_err();
    assert_eq!(
        err,
        CommandError::NotMaster {
            master: Some(h("host-3"))
        }
    );
    let err = sim.command("host-3", on9()).unwrap_err().to_string();
    assert!(err.contains("slot = 4000 MHz / 16384 MiB"), "{err}");
    assert!(
        err.contains(
            "after losing the 1 largest host(s) 8 slot(s) remain, but 9 powered-on VM(s) need 9"
        ),
        "{err}"
    );
    assert!(sim.running_on("vm-9").is_empty());
    // Free a slot: the power-on is admitted and placed.
    sim.command("host-1", Command::PowerOffVm { vm: vm("vm-3") })
        .unwrap();
    sim.run_secs(3);
    let ok = sim.command("host-3", on9()).unwrap();
    assert!(ok.starts_with("starting vm-9 on "), "{ok}");
    sim.run_until(Duration::from_secs(30), "vm-9 on", |s| {
        s.running_on("vm-9").len() == 1
    });
    // Asking again is idempotent.
    let again = sim.command("host-3", on9()).unwrap();
    assert!(again.contains("already running"), "{again}");
    sim.run_secs(5);
    assert_eq!(sim.starts.iter().filter(|s| s.2 == vm("vm-9")).count(), 1);
}

#[test]
fn admission_refusal_reaches_the_operator() {
    let mut spec = uniform(2);
    spec.admission = AdmissionPolicy::PercentageReserved {
        cpu_pct: 50,
        mem_pct: 60,
    };
    spec.vms = vec![
        (vmc("vm-1", 1000, 30_000), "host-1"),
        (vmc("vm-2", 1000, 30_000), "host-2"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-2"));
    sim.command("host-2", Command::PowerOffVm { vm: vm("vm-2") })
        .unwrap();
    sim.run_secs(3);
    let err = sim
        .command(
            "host-2",
            Command::PowerOnVm {
                vm: vm("vm-2"),
                host: None,
            },
        )
        .unwrap_err();
    assert!(
        matches!(&err, CommandError::Admission(m) if m.contains("memory free (1 - 60000/131072 MiB) = 54% (need 60%)")),
        "{err}"
    );
    assert!(sim.running_on("vm-2").is_empty());
    assert_eq!(
        sim.command(
            "host-2",
            Command::PowerOnVm {
                vm: vm("nope"),
                host: None
            }
        )
        .unwrap_err(),
        CommandError::UnknownVm(vm("nope"))
    );
}

#[test]
fn admission_never_blocks_failover_restarts() {
    let mut spec = uniform(3);
    // Slot policy that is already violated: restarts must still happen.
    spec.admission = AdmissionPolicy::HostFailuresTolerated(2);
    spec.vms = (0..6)
        .map(|i| {
            (
                vmc(Box::leak(format!("vm-{i}").into_boxed_str()), 4000, 16_384),
                "host-1",
            )
        })
        .collect();
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(90), "all restarted", |s| {
        (0..6).all(|i| s.running_on(&format!("vm-{i}")).len() == 1)
    });
}

#[test]
fn master_cannot_read_datastores_no_restart() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.set_storage("host-3", false);
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(20), "unresponsive", |s| {
        classified(s, "host-3", "host-1") == Some(HostHaState::Unresponsive)
    });
    sim.run_secs(20);
    assert!(sim.restart_orders().is_empty(), "no evidence, no restart");
    // Storage back: the record is stale, the host is failed, the VM restarts.
    sim.set_storage("host-3", true);
    sim.run_until(Duration::from_secs(60), "restarted", |s| {
        s.running_on("vm-a").len() == 1
    });
}

#[test]
fn master_dies_while_its_restart_order_fails() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-2")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.hosts.get_mut(&h("host-1")).unwrap().fail_starts = 1;
    sim.crash("host-2");
    sim.run_until(Duration::from_secs(20), "ordered", |s| {
        !s.restart_orders().is_empty()
    });
    assert_eq!(sim.restart_orders()[0].1, h("host-1"));
    // The master dies before host-1's failure report reaches it.
    sim.crash("host-3");
    sim.run_until(
        Duration::from_secs(90),
        "restarted by the new master",
        |s| s.running_on("vm-a") == vec![h("host-1")],
    );
    assert_eq!(sim.masters(), vec![h("host-1")]);
}

#[test]
fn two_hosts_fail_at_once() {
    let mut spec = uniform(5);
    spec.vms = vec![
        (
            prio(vmc("vm-1", 1000, 1024), RestartPriority::High),
            "host-1",
        ),
        (vmc("vm-2", 1000, 1024), "host-2"),
        (
            prio(vmc("vm-5", 1000, 1024), RestartPriority::Low),
            "host-5",
        ),
        (vmc("vm-3", 1000, 1024), "host-3"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-5"));
    // The master and a slave die together.
    sim.crash("host-5");
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(90), "all restarted", |s| {
        ["vm-1", "vm-5"].iter().all(|v| s.running_on(v).len() == 1)
    });
    assert_eq!(sim.masters(), vec![h("host-4")]);
    let order: Vec<VmId> = sim.restart_orders().into_iter().map(|(v, _)| v).collect();
    assert_eq!(order, vec![vm("vm-1"), vm("vm-5")], "high before low");
    assert_eq!(sim.running_on("vm-2"), vec![h("host-2")]);
}

#[test]
fn lossy_network_causes_no_restart_and_no_split_brain() {
    let mut spec = uniform(4);
    spec.vms = (1..=4)
        .map(|i| {
            (
                vmc(Box::leak(format!("vm-{i}").into_boxed_str()), 500, 512),
                Box::leak(format!("host-{i}").into_boxed_str()) as &str,
            )
        })
        .collect();
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.drop_pct = 30;
    sim.run_secs(300);
    // Hosts may look silent for a moment, but their datastore heartbeats and
    // pings say they live: never failed, never restarted.
    assert!(
        sim.restart_orders().is_empty(),
        "{:?}",
        sim.restart_orders()
    );
    assert!(!sim.has_event(|e| matches!(
        e.ev,
        HaEvent::HostClassified {
            state: HostHaState::Failed,
            ..
        }
    )));
    for i in 1..=4 {
        assert_eq!(
            sim.running_on(&format!("vm-{i}")),
            vec![h(&format!("host-{i}"))]
        );
    }
    sim.drop_pct = 0;
    sim.run_until(Duration::from_secs(30), "one master again", |s| {
        s.masters().len() == 1
    });
}

#[test]
fn slow_network_still_elects_and_fails_over() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    sim.latency = Duration::from_millis(700);
    assert_eq!(sim.settle(), h("host-3"));
    sim.run_secs(30);
    assert_eq!(sim.masters(), vec![h("host-3")]);
    assert!(sim.restart_orders().is_empty());
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "restarted", |s| {
        s.running_on("vm-a").len() == 1
    });
}

#[test]
fn dead_agent_with_running_vms_is_unresponsive_not_failed() {
    let mut spec = uniform(3);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-1"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    // The agent process dies; the host answers ping and the VMMs keep
    // renewing their leases.
    sim.hosts.get_mut(&h("host-1")).unwrap().agent_down = true;
    sim.run_until(Duration::from_secs(20), "unresponsive", |s| {
        classified(s, "host-3", "host-1") == Some(HostHaState::Unresponsive)
    });
    sim.run_secs(60);
    assert!(
        sim.restart_orders().is_empty(),
        "{:?}",
        sim.restart_orders()
    );
    // One VMM dies too (its lease is no longer renewed): only that VM restarts.
    sim.hosts
        .get_mut(&h("host-1"))
        .unwrap()
        .vms
        .remove(&vm("vm-b"));
    sim.run_until(Duration::from_secs(60), "vm-b restarted", |s| {
        s.running_on("vm-b").len() == 1
    });
    assert_eq!(sim.restart_orders().len(), 1);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    // The agent comes back and adopts vm-a; nothing else happens.
    sim.restart_agent("host-1");
    sim.run_until(Duration::from_secs(10), "slave again", |s| {
        s.state("host-1") == HostHaState::Slave
    });
    sim.run_secs(10);
    assert!(sim.has_event(|e| e.ev == HaEvent::HostRecovered { host: h("host-1") }));
    assert_eq!(sim.restart_orders().len(), 1);
    assert_eq!(
        sim.hosts[&h("host-3")].agent.status().vms[&vm("vm-a")],
        VmProtection::Protected { host: h("host-1") }
    );
}

#[test]
fn agent_restart_adopts_its_running_vms() {
    let mut spec = uniform(2);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.hosts.get_mut(&h("host-1")).unwrap().agent_down = true;
    sim.run_secs(2);
    sim.restart_agent("host-1");
    sim.run_until(Duration::from_secs(15), "slave again", |s| {
        s.state("host-1") == HostHaState::Slave
    });
    sim.run_secs(20);
    assert!(sim.restart_orders().is_empty());
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
}

#[test]
fn scarce_capacity_goes_to_the_highest_priority() {
    let mut spec = uniform(2);
    spec.vms = vec![
        (
            prio(vmc("vm-a-low", 1000, 40_000), RestartPriority::Low),
            "host-1",
        ),
        (
            prio(vmc("vm-z-high", 1000, 40_000), RestartPriority::High),
            "host-1",
        ),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-2"));
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "high restarted", |s| {
        s.running_on("vm-z-high").len() == 1
    });
    sim.run_secs(10);
    assert!(sim.running_on("vm-a-low").is_empty());
    let st = sim.hosts[&h("host-2")].agent.status();
    assert!(
        matches!(
            &st.vms[&vm("vm-a-low")],
            VmProtection::RestartPending { .. }
        ),
        "{st:?}"
    );
    assert_eq!(sim.restart_orders(), vec![(vm("vm-z-high"), h("host-2"))]);
}

/// Dedicated failover hosts (H12): an operator power-on never lands there,
/// a restart goes there first.
#[test]
fn dedicated_failover_host_takes_restarts_not_power_ons() {
    let mut spec = uniform(3);
    spec.admission = AdmissionPolicy::DedicatedFailoverHosts([h("host-1")].into_iter().collect());
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-2"),
        (vmc("vm-b", 1000, 1024), "host-3"),
    ];
    let mut sim = Sim::new(spec);
    let master = sim.settle();
    assert_eq!(master, h("host-3"));
    // With vm-b off, host-1 and host-3 are both empty and host-1 would win
    // the tie; a power-on is placed elsewhere, and naming host-1 is refused.
    sim.command("host-3", Command::PowerOffVm { vm: vm("vm-b") })
        .unwrap();
    sim.run_secs(3);
    let err = sim
        .command(
            "host-3",
            Command::PowerOnVm {
                vm: vm("vm-b"),
                host: Some(h("host-1")),
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("host-1 is a dedicated failover host"), "{err}");
    let ok = sim
        .command(
            "host-3",
            Command::PowerOnVm {
                vm: vm("vm-b"),
                host: None,
            },
        )
        .unwrap();
    assert!(!ok.contains("host-1"), "{ok}");
    sim.run_until(Duration::from_secs(30), "vm-b on", |s| {
        s.running_on("vm-b").len() == 1
    });
    assert_ne!(sim.running_on("vm-b"), vec![h("host-1")]);
    assert_eq!(sim.running_on("vm-b"), vec![h("host-3")]);

    // A small failover host: by free memory, host-3 would take vm-a's
    // restart; the failover host takes it first.
    let mut spec = uniform(3);
    spec.hosts[0].1 = Resources::new(4000, 4096);
    spec.admission = AdmissionPolicy::DedicatedFailoverHosts([h("host-1")].into_iter().collect());
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-2")];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.crash("host-2");
    sim.run_until(Duration::from_secs(90), "vm-a restarted", |s| {
        s.running_on("vm-a").len() == 1
    });
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
}

/// Three uniform hosts under "percentage reserved" (CPU 25 %, memory
/// 40 %), vm-1 on host-1 and vm-2 on host-2 reserving 4000 MHz / 40000 MiB
/// each; settled, with host-3 the master.
fn reserved_pair_cluster() -> Sim {
    let mut spec = uniform(3);
    spec.admission = AdmissionPolicy::PercentageReserved {
        cpu_pct: 25,
        mem_pct: 40,
    };
    spec.vms = vec![
        (vmc("vm-1", 4000, 40_000), "host-1"),
        (vmc("vm-2", 4000, 40_000), "host-2"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.run_secs(3);
    sim
}

/// Entering maintenance mode is refused by admission control with the
/// arithmetic, and the master shows current and failover capacity.
#[test]
fn maintenance_refused_by_admission_and_capacity_shown() {
    let mut sim = reserved_pair_cluster();
    let cap = sim.hosts[&h("host-3")]
        .agent
        .capacity(sim.now)
        .expect("master")
        .to_string();
    assert!(
        cap.contains(
            "48000 MHz / 196608 MiB on 3 host(s); 2 powered-on VM(s) reserve 8000 MHz / 80000 MiB"
        ),
        "{cap}"
    );
    assert!(cap.contains("memory 59% free (need 40%)"), "{cap}");
    assert!(sim.hosts[&h("host-1")].agent.capacity(sim.now).is_none());
    // Without any one host, 80000 of 131072 MiB is reserved: 39 % free.
    let err = sim
        .command(
            "host-3",
            Command::CheckMaintenance {
                host: h("host-1"),
                power_off: false,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host host-1 cannot enter maintenance mode: without it, admission control (percentage reserved)"),
        "{err}"
    );
    assert!(
        err.contains("memory free (1 - 80000/131072 MiB) = 39% (need 40%)"),
        "{err}"
    );
    let err = sim
        .command("host-3", Command::EnterMaintenance)
        .unwrap_err();
    assert!(matches!(err, CommandError::Admission(_)), "{err}");
    assert_eq!(sim.hosts[&h("host-3")].agent.state(), HostHaState::Master);
    // A slave cannot decide; it names the master.
    assert_eq!(
        sim.command(
            "host-1",
            Command::CheckMaintenance {
                host: h("host-1"),
                power_off: false,
            }
        )
        .unwrap_err(),
        CommandError::NotMaster {
            master: Some(h("host-3"))
        }
    );
    // With one VM off, there is room: allowed.
    sim.command("host-2", Command::PowerOffVm { vm: vm("vm-2") })
        .unwrap();
    sim.run_secs(3);
    let ok = sim
        .command(
            "host-3",
            Command::CheckMaintenance {
                host: h("host-1"),
                power_off: false,
            },
        )
        .unwrap();
    assert_eq!(ok, "host-1 may enter maintenance mode");
}

/// Maintenance mode: refused while VMs run on the host; the admission
/// check counts the host's VMs as moved, unless they are to be powered off;
/// once the host is in maintenance the master shows it, refuses a power-on
/// there and places nothing on it; exiting brings it back.
#[test]
fn maintenance_needs_an_empty_host_and_takes_no_vms() {
    let mut sim = reserved_pair_cluster();
    let check = |sim: &mut Sim, power_off| {
        sim.command(
            "host-3",
            Command::CheckMaintenance {
                host: h("host-1"),
                power_off,
            },
        )
    };
    // vm-1 moved to the others: 80000 of 131072 MiB reserved, 39 % free.
    let err = check(&mut sim, false).unwrap_err().to_string();
    assert!(
        err.contains("(1 - 80000/131072 MiB) = 39% (need 40%)"),
        "{err}"
    );
    // vm-1 powered off instead: only vm-2's 40000 MiB count.
    assert_eq!(
        check(&mut sim, true).unwrap(),
        "host-1 may enter maintenance mode"
    );
    // vm-1 still runs on host-1: refused, naming it.
    let err = sim
        .command("host-1", Command::EnterMaintenance)
        .unwrap_err();
    assert!(
        matches!(&err, CommandError::MaintenanceBusy { vms, .. } if vms == "vm-1"),
        "{err}"
    );
    assert_eq!(sim.state("host-1"), HostHaState::Slave);
    sim.command("host-1", Command::PowerOffVm { vm: vm("vm-1") })
        .unwrap();
    sim.run_secs(3);
    assert_eq!(
        sim.command("host-1", Command::EnterMaintenance).unwrap(),
        "in maintenance"
    );
    sim.run_secs(3);
    assert_eq!(
        sim.hosts[&h("host-3")].agent.status().hosts[&h("host-1")],
        HostHaState::Maintenance
    );
    let err = sim
        .command(
            "host-3",
            Command::PowerOnVm {
                vm: vm("vm-1"),
                host: Some(h("host-1")),
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("host-1 is in maintenance mode"), "{err}");
    // Placed by the master: admission counts host-2 and host-3 only.
    let err = sim
        .command(
            "host-3",
            Command::PowerOnVm {
                vm: vm("vm-1"),
                host: None,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(1 - 80000/131072 MiB) = 39% (need 40%)"),
        "{err}"
    );
    assert!(sim.running_on("vm-1").is_empty());
    sim.command("host-1", Command::ExitMaintenance).unwrap();
    sim.run_secs(10);
    assert_eq!(sim.state("host-1"), HostHaState::Slave);
}

/// A reservation change (`vigil vm set`): the master checks a larger
/// reservation of a powered-on VM against the policy with the arithmetic;
/// a decrease, or any change of a powered-off VM, is admitted; a slave
/// names the master. Once registered, the new reservation counts.
#[test]
fn reservation_increase_checked_by_admission_on_the_master() {
    let mut sim = reserved_pair_cluster();
    let check = |sim: &mut Sim, host: &str, name: &str, cpu, mem| {
        sim.command(
            host,
            Command::CheckReservation {
                vm: vm(name),
                reservation: Resources::new(cpu, mem),
            },
        )
    };
    // 80000 + 40000 of 196608 MiB reserved: 39 % free.
    let err = check(&mut sim, "host-3", "vm-1", 4000, 80_000)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("VM vm-1 keeps its reservation: admission control (percentage reserved)"),
        "{err}"
    );
    assert!(
        err.contains("memory free (1 - 120000/196608 MiB) = 39% (need 40%)"),
        "{err}"
    );
    assert_eq!(
        check(&mut sim, "host-3", "vm-1", 4000, 70_000).unwrap(),
        "vm-1 runs; admission control admits the larger reservation"
    );
    assert_eq!(
        check(&mut sim, "host-3", "vm-1", 1000, 10_000).unwrap(),
        "vm-1 runs; a smaller reservation is always admitted"
    );
    assert_eq!(
        check(&mut sim, "host-1", "vm-1", 4000, 70_000).unwrap_err(),
        CommandError::NotMaster {
            master: Some(h("host-3"))
        }
    );
    assert_eq!(
        check(&mut sim, "host-3", "vm-9", 1, 1).unwrap_err(),
        CommandError::UnknownVm(vm("vm-9"))
    );
    // The accepted change registered: it counts from then on.
    sim.command("host-3", Command::RegisterVm(vmc("vm-1", 4000, 70_000)))
        .unwrap();
    let cap = sim.hosts[&h("host-3")]
        .agent
        .capacity(sim.now)
        .expect("master")
        .to_string();
    assert!(
        cap.contains("2 powered-on VM(s) reserve 8000 MHz / 110000 MiB"),
        "{cap}"
    );
    // Powered off, vm-2 reserves nothing: any size is admitted until it
    // is powered on again.
    sim.command("host-2", Command::PowerOffVm { vm: vm("vm-2") })
        .unwrap();
    sim.run_secs(3);
    assert_eq!(
        check(&mut sim, "host-3", "vm-2", 4000, 190_000).unwrap(),
        "vm-2 is powered off: its reservation counts from its next power-on"
    );
}
