//! VM monitoring through the agent (H11), heartbeat datastore choice (H5),
//! and smaller behaviours.

use super::*;
use crate::monitoring::{MonitoringMode, MonitoringSettings, Sensitivity};

#[test]
fn vm_monitoring_resets_hung_guest_at_most_three_times() {
    let mut spec = uniform(2);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-1"),
    ];
    let settings = MonitoringSettings {
        mode: MonitoringMode::Vm,
        sensitivity: Sensitivity::High,
        ..Default::default()
    };
    spec.monitoring.insert(vm("vm-a"), settings);
    spec.monitoring.insert(vm("vm-b"), settings);
    let mut sim = Sim::new(spec);
    sim.settle();
    let start = sim.now;
    let hb_stop = start + Duration::from_secs(200);
    // vm-a: tools heartbeat every second until 200 s, then silence and no
    // I/O; after each reset its new boot's tools heartbeat for 5 s, then
    // hang again.
    // vm-b: heartbeat stops too, but it keeps doing disk I/O: never reset.
    while sim.now < start + Duration::from_secs(1000) {
        if sim.now.as_millis().is_multiple_of(1000) {
            let rebooted = sim
                .resets
                .last()
                .is_some_and(|r| sim.now.since(r.0) < Duration::from_secs(5));
            if rebooted {
                sim.feed(
                    &h("host-1"),
                    Input::Vm {
                        vm: vm("vm-a"),
                        event: VmEvent::ToolsHeartbeat,
                    },
                );
            }
            if sim.now < hb_stop {
                sim.feed(
                    &h("host-1"),
                    Input::Vm {
                        vm: vm("vm-a"),
                        event: VmEvent::ToolsHeartbeat,
                    },
                );
                sim.feed(
                    &h("host-1"),
                    Input::Vm {
                        vm: vm("vm-b"),
                        event: VmEvent::ToolsHeartbeat,
                    },
                );
            }
            sim.feed(
                &h("host-1"),
                Input::Vm {
                    vm: vm("vm-b"),
                    event: VmEvent::IoActivity,
                },
            );
        }
        sim.tick();
    }
    let resets: Vec<u64> = sim
        .resets
        .iter()
        .map(|r| {
            assert_eq!(r.2, vm("vm-a"));
            r.0.since(start).as_secs()
        })
        .collect();
    // 30 s after the last heartbeat, then every 120 s grace period, 3 per hour.
    assert_eq!(resets.len(), 3, "{resets:?}");
    assert!((229..=231).contains(&resets[0]), "{resets:?}");
    assert_eq!(resets[1] - resets[0], 120);
    assert_eq!(resets[2] - resets[1], 120);
    let limit = sim.events_where(|e| matches!(e.ev, HaEvent::VmResetLimitReached { .. }));
    assert_eq!(limit.len(), 1, "reported once");
    assert_eq!(
        sim.running_on("vm-a"),
        vec![h("host-1")],
        "a reset is not a failover"
    );
}

/// The cluster default turns on VM and application monitoring; one VM opts
/// out. The application in vm-a stops heartbeating while its tools go on:
/// vm-a is reset with that reason; vm-b (monitoring disabled for it) never is.
#[test]
fn cluster_default_application_monitoring_and_per_vm_opt_out() {
    let mut spec = uniform(2);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-1"),
    ];
    spec.monitoring
        .insert(vm("vm-b"), MonitoringSettings::default());
    spec.monitoring_default = MonitoringSettings {
        mode: MonitoringMode::VmAndApplication,
        sensitivity: Sensitivity::High,
        ..Default::default()
    };
    let mut sim = Sim::new(spec);
    sim.settle();
    let start = sim.now;
    while sim.now < start + Duration::from_secs(400) {
        if sim.now.as_millis().is_multiple_of(1000) {
            for v in ["vm-a", "vm-b"] {
                sim.feed(
                    &h("host-1"),
                    Input::Vm {
                        vm: vm(v),
                        event: VmEvent::ToolsHeartbeat,
                    },
                );
            }
            if sim.now < start + Duration::from_secs(200) {
                sim.feed(
                    &h("host-1"),
                    Input::Vm {
                        vm: vm("vm-a"),
                        event: VmEvent::AppHeartbeat,
                    },
                );
            }
        }
        sim.tick();
    }
    let resets = sim.events_where(|e| matches!(e.ev, HaEvent::VmReset { .. }));
    assert_eq!(resets.len(), 1, "{resets:?}");
    let HaEvent::VmReset { vm: v, reason } = &resets[0].ev else {
        unreachable!()
    };
    assert_eq!(v, &vm("vm-a"));
    assert!(
        reason.contains("no application heartbeat for 30 s"),
        "{reason}"
    );
    assert_eq!(sim.resets.len(), 1);
}

#[test]
fn heartbeat_datastores_prefer_shared_and_most_seen() {
    let spec = Spec {
        hosts: vec![
            (
                "host-1",
                Resources::new(1000, 1000),
                vec!["local-1", "ds-a", "ds-b", "ds-c"],
            ),
            (
                "host-2",
                Resources::new(1000, 1000),
                vec!["ds-a", "ds-b", "ds-c"],
            ),
            ("host-3", Resources::new(1000, 1000), vec!["ds-b", "ds-c"]),
            (
                "host-4",
                Resources::new(1000, 1000),
                vec!["ds-c", "local-4"],
            ),
        ],
        vms: vec![],
        timings: Timings::default(),
        admission: AdmissionPolicy::Disabled,
        monitoring: BTreeMap::new(),
        monitoring_default: Default::default(),
    };
    let mut sim = Sim::new(spec);
    let ds = |v: &[&str]| v.iter().map(|s| DatastoreId::new(*s)).collect::<Vec<_>>();
    assert_eq!(
        sim.hosts[&h("host-1")].agent.heartbeat_datastores(),
        ds(&["ds-c", "ds-b"]).as_slice()
    );
    assert_eq!(
        sim.hosts[&h("host-4")].agent.heartbeat_datastores(),
        ds(&["ds-c"]).as_slice()
    );
    // host-4 has a single shared datastore: it says so.
    assert!(sim.has_event(
        |e| e.host == h("host-4") && e.ev == HaEvent::TooFewHeartbeatDatastores { count: 1 }
    ));
    sim.settle();
    // Records land only on the chosen datastores.
    assert!(sim.datastores[&DatastoreId::new("ds-a")].hb.is_empty());
    assert_eq!(sim.datastores[&DatastoreId::new("ds-c")].hb.len(), 4);
}

#[test]
fn late_joiner_with_more_datastores_does_not_preempt() {
    let mut spec = uniform(3);
    spec.hosts[0].2 = vec!["ds1", "ds2", "ds3"];
    let mut sim = Sim::new(spec);
    // host-1 (most datastores) is down during the first election.
    sim.crash("host-1");
    assert_eq!(sim.settle(), h("host-3"));
    sim.reboot("host-1");
    sim.run_until(Duration::from_secs(10), "host-1 slave", |s| {
        s.state("host-1") == HostHaState::Slave
    });
    sim.run_secs(10);
    assert_eq!(
        sim.masters(),
        vec![h("host-3")],
        "a sitting master keeps its role"
    );
}

#[test]
fn no_isolation_address_is_reported_not_guessed() {
    let mut sim = Sim::new(uniform(2));
    sim.settle();
    let mut cfg = sim.agent_config(&h("host-1"), 9);
    cfg.isolation_addrs.clear();
    sim.hosts.get_mut(&h("host-1")).unwrap().agent = Agent::new(cfg);
    sim.enable(&h("host-1"));
    sim.set_mgmt("host-1", false);
    sim.run_secs(30);
    assert!(sim.has_event(|e| e.host == h("host-1") && e.ev == HaEvent::NoIsolationAddress));
    assert_ne!(sim.state("host-1"), HostHaState::Isolated);
}

#[test]
fn disable_ha_stops_the_agent_and_commands_need_ha() {
    let mut spec = uniform(2);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.command("host-1", Command::DisableHa).unwrap();
    assert_eq!(sim.state("host-1"), HostHaState::Uninitialized);
    assert_eq!(
        sim.command("host-1", Command::EnterMaintenance)
            .unwrap_err(),
        crate::agent::CommandError::NotEnabled
    );
    // The VM keeps running; the host keeps announcing "HA disabled", so the
    // master neither classifies it nor restarts its VMs, even once it dies.
    sim.run_secs(5);
    assert_eq!(
        sim.hosts[&h("host-2")].agent.status().hosts[&h("host-1")],
        HostHaState::Uninitialized
    );
    sim.crash("host-1");
    sim.run_secs(60);
    assert!(sim.restart_orders().is_empty());
    // Re-enabling brings it back as a slave.
    sim.reboot("host-1");
    sim.run_until(Duration::from_secs(10), "slave", |s| {
        s.state("host-1") == HostHaState::Slave
    });
}

#[test]
fn hourly_summary_line() {
    let mut spec = uniform(2);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-1"),
    ];
    let mut sim = Sim::new(spec);
    sim.run_secs(3601);
    let sums: Vec<Ev> = sim.events_where(|e| matches!(e.ev, HaEvent::Summary { .. }));
    assert_eq!(sums.len(), 2, "one per host per hour");
    let s1 = sums.iter().find(|e| e.host == h("host-1")).unwrap();
    assert_eq!(
        s1.ev,
        HaEvent::Summary {
            uptime: Duration::from_secs(3600),
            state: HostHaState::Slave,
            vms_running: 2,
            vms_protected: None
        }
    );
    let s2 = sums.iter().find(|e| e.host == h("host-2")).unwrap();
    assert!(matches!(
        s2.ev,
        HaEvent::Summary {
            vms_protected: Some(2),
            vms_running: 0,
            ..
        }
    ));
}

#[test]
fn enable_ha_refuses_a_config_that_does_not_validate() {
    let mut sim = Sim::new(uniform(1));
    let mut cfg = sim.agent_config(&h("stranger"), 1);
    cfg.timings.lease.takeover_time = Duration::from_secs(1);
    let mut agent = Agent::new(cfg);
    let out = agent.handle(
        Time::ZERO,
        Input::Command(Command::EnableHa(sim.cluster.clone())),
    );
    let err = out.iter().find_map(|a| match a {
        Action::CommandDone(Err(e)) => Some(e.to_string()),
        _ => None,
    });
    let err = err.unwrap();
    assert!(
        err.starts_with(
            "cannot enable HA: invalid lease timings: unsafe lease timings: takeover 1000 ms"
        ),
        "{err}"
    );
    assert_eq!(agent.state(), HostHaState::Uninitialized);
    sim.run_secs(1);
}

#[test]
fn vm_registered_after_enable_is_powered_on_and_restarted() {
    let mut sim = Sim::new(uniform(3));
    assert_eq!(sim.settle(), h("host-3"));
    let late = vmc("vm-late", 1000, 1024);
    // Unknown until registered.
    let on = || Command::PowerOnVm {
        vm: vm("vm-late"),
        host: Some(h("host-1")),
    };
    assert_eq!(
        sim.command("host-3", on()).unwrap_err(),
        crate::agent::CommandError::UnknownVm(vm("vm-late"))
    );
    // Every agent learns of it (the runtime finds it on the datastore).
    for host in ["host-1", "host-2", "host-3"] {
        let r = sim.command(host, Command::RegisterVm(late.clone()));
        assert_eq!(r.unwrap(), "VM vm-late registered");
    }
    let mut bad = late.clone();
    bad.id = vm("vm-nowhere");
    bad.datastores = [crate::types::DatastoreId::new("ds-none")]
        .into_iter()
        .collect();
    let e = sim
        .command("host-3", Command::RegisterVm(bad))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ds-none, which no host of the cluster mounts"),
        "{e}"
    );
    sim.command("host-3", on()).unwrap();
    sim.run_until(Duration::from_secs(30), "vm-late on host-1", |s| {
        s.running_on("vm-late") == vec![h("host-1")]
    });
    sim.run_secs(3);
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(60), "vm-late restarted", |s| {
        let on = s.running_on("vm-late");
        on.len() == 1 && on[0] != h("host-1")
    });
}
