//! Election scenarios (H2, H7, H16).

use super::*;

fn hosts_with(names: &[(&'static str, Vec<&'static str>)]) -> Spec {
    Spec {
        hosts: names
            .iter()
            .map(|(n, ds)| (*n, Resources::new(16_000, 65_536), ds.clone()))
            .collect(),
        vms: vec![],
        timings: Timings::default(),
        admission: AdmissionPolicy::Disabled,
        monitoring: BTreeMap::new(),
        monitoring_default: Default::default(),
    }
}

#[test]
fn election_by_datastore_count() {
    let mut sim = Sim::new(hosts_with(&[
        ("host-a", vec!["ds1", "ds2"]),
        ("host-b", vec!["ds1", "ds2", "ds3"]),
        ("host-z", vec!["ds1", "ds3"]),
    ]));
    let master = sim.settle();
    assert_eq!(
        master,
        h("host-b"),
        "most datastores wins even against a higher id"
    );
    assert_eq!(sim.state("host-a"), HostHaState::Slave);
    assert_eq!(sim.hosts[&h("host-z")].agent.master(), Some(&h("host-b")));
    // Elected within the election window plus a heartbeat.
    let t = sim.events_where(|e| {
        matches!(
            e.ev,
            HaEvent::StateChanged {
                to: HostHaState::Master,
                ..
            }
        )
    })[0]
        .at;
    assert!(t <= Time::from_secs(7), "elected at {t}");
}

#[test]
fn election_tie_break_is_string_order() {
    let ds = || vec!["ds1", "ds2"];
    let mut sim = Sim::new(hosts_with(&[
        ("host-100", ds()),
        ("host-99", ds()),
        ("host-2", ds()),
        ("host-10", ds()),
    ]));
    // "host-99" > "host-2" > "host-100" > "host-10" as strings.
    assert_eq!(sim.settle(), h("host-99"));
    assert_eq!(sim.masters().len(), 1);
}

#[test]
fn master_lost_new_master_within_bound() {
    let mut sim = Sim::new(uniform(4));
    assert_eq!(sim.settle(), h("host-4"));
    sim.crash("host-4");
    let lost = sim.now;
    let t = sim.run_until(Duration::from_secs(30), "new master", |s| {
        s.masters() == vec![h("host-3")]
    });
    // host_timeout (3 s) + election window (5 s) + a heartbeat.
    assert!(
        t.since(lost) <= Duration::from_secs(10),
        "took {:?}",
        t.since(lost)
    );
    sim.run_until(Duration::from_secs(5), "slaves follow", |s| {
        ["host-1", "host-2"]
            .iter()
            .all(|x| s.hosts[&h(x)].agent.master() == Some(&h("host-3")))
    });
    // The new master classifies the old one as failed.
    sim.run_until(Duration::from_secs(15), "old master failed", |s| {
        s.hosts[&h("host-3")].agent.status().hosts.get(&h("host-4")) == Some(&HostHaState::Failed)
    });
}

#[test]
fn maintenance_host_does_not_stand_for_election() {
    let mut sim = Sim::new(uniform(3));
    assert_eq!(sim.settle(), h("host-3"));
    sim.command("host-3", Command::EnterMaintenance).unwrap();
    assert_eq!(sim.state("host-3"), HostHaState::Maintenance);
    sim.run_until(Duration::from_secs(15), "new master", |s| {
        s.masters() == vec![h("host-2")]
    });
    sim.run_secs(5);
    assert_eq!(sim.masters(), vec![h("host-2")]);
    let st = sim.hosts[&h("host-2")].agent.status();
    assert_eq!(st.hosts[&h("host-3")], HostHaState::Maintenance);
    assert_eq!(st.hosts[&h("host-1")], HostHaState::Slave);
    // Exit: host-3 rejoins as a slave; the sitting master keeps its role.
    sim.command("host-3", Command::ExitMaintenance).unwrap();
    sim.run_until(Duration::from_secs(5), "host-3 slave", |s| {
        s.state("host-3") == HostHaState::Slave
    });
    assert_eq!(sim.masters(), vec![h("host-2")]);
}

#[test]
fn partition_two_masters_then_heal_to_one() {
    let mut spec = uniform(4);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-4"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-4"));
    sim.partition(&["host-1", "host-2"]);
    sim.run_until(Duration::from_secs(20), "two masters", |s| {
        s.masters().len() == 2
    });
    assert_eq!(sim.masters(), vec![h("host-2"), h("host-4")]);
    // Each master sees the other side alive on the datastores: partitioned.
    sim.run_until(Duration::from_secs(20), "classified", |s| {
        let a = s.hosts[&h("host-4")].agent.status();
        let b = s.hosts[&h("host-2")].agent.status();
        a.hosts.get(&h("host-1")) == Some(&HostHaState::Partitioned)
            && b.hosts.get(&h("host-4")) == Some(&HostHaState::Partitioned)
    });
    sim.run_secs(30);
    assert!(
        sim.restart_orders().is_empty(),
        "no restart across a partition: {:?}",
        sim.restart_orders()
    );
    sim.heal();
    sim.run_until(Duration::from_secs(10), "one master", |s| {
        s.masters().len() == 1
    });
    assert_eq!(sim.masters(), vec![h("host-4")]);
    assert!(sim.has_event(|e| e.host == h("host-2")
        && e.ev
            == HaEvent::SteppedDown {
                for_master: h("host-4")
            }));
    sim.run_until(Duration::from_secs(10), "all follow host-4", |s| {
        ["host-1", "host-2", "host-3"]
            .iter()
            .all(|x| s.hosts[&h(x)].agent.master() == Some(&h("host-4")))
    });
    sim.run_secs(3);
    let st = sim.hosts[&h("host-4")].agent.status();
    assert!(
        st.hosts
            .values()
            .all(|s| matches!(s, HostHaState::Slave | HostHaState::Master)),
        "{st:?}"
    );
    assert_eq!(
        st.vms[&vm("vm-a")],
        crate::types::VmProtection::Protected { host: h("host-1") }
    );
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
}

#[test]
fn rebooted_host_rejoins_as_slave() {
    let mut sim = Sim::new(uniform(3));
    assert_eq!(sim.settle(), h("host-3"));
    sim.crash("host-1");
    sim.run_until(Duration::from_secs(15), "host-1 failed", |s| {
        s.hosts[&h("host-3")].agent.status().hosts.get(&h("host-1")) == Some(&HostHaState::Failed)
    });
    sim.reboot("host-1");
    sim.run_until(Duration::from_secs(10), "host-1 slave", |s| {
        s.state("host-1") == HostHaState::Slave
    });
    sim.run_secs(2);
    assert!(sim.has_event(|e| e.ev == HaEvent::HostRecovered { host: h("host-1") }));
    assert_eq!(
        sim.hosts[&h("host-3")].agent.status().hosts[&h("host-1")],
        HostHaState::Slave
    );
}

#[test]
fn status_shows_host_and_vm_states() {
    let mut spec = uniform(2);
    spec.vms = vec![
        (vmc("vm-a", 1000, 1024), "host-1"),
        (vmc("vm-b", 1000, 1024), "host-2"),
    ];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.command("host-1", Command::PowerOffVm { vm: vm("vm-a") })
        .unwrap();
    sim.run_secs(3);
    let st = sim.hosts[&h("host-2")].agent.status();
    assert_eq!(st.state, HostHaState::Master);
    assert_eq!(st.master, Some(h("host-2")));
    assert_eq!(st.hosts[&h("host-1")], HostHaState::Slave);
    assert_eq!(st.vms[&vm("vm-a")], crate::types::VmProtection::Unprotected);
    assert_eq!(
        st.vms[&vm("vm-b")],
        crate::types::VmProtection::Protected { host: h("host-2") }
    );
    // Slaves show their own state and their master, not the cluster table.
    let s1 = sim.hosts[&h("host-1")].agent.status();
    assert_eq!(
        (s1.state, s1.master.clone(), s1.hosts.len()),
        (HostHaState::Slave, Some(h("host-2")), 0)
    );
    assert_eq!(HostHaState::Partitioned.to_string(), "partitioned");
}

#[test]
fn three_way_partition_heals_to_the_best_master() {
    let mut sim = Sim::new(uniform(6));
    assert_eq!(sim.settle(), h("host-6"));
    sim.groups.insert(h("host-1"), 1);
    sim.groups.insert(h("host-2"), 1);
    sim.groups.insert(h("host-3"), 2);
    sim.groups.insert(h("host-4"), 2);
    sim.run_until(Duration::from_secs(20), "three masters", |s| {
        s.masters().len() == 3
    });
    assert_eq!(sim.masters(), vec![h("host-2"), h("host-4"), h("host-6")]);
    sim.run_secs(20);
    assert!(sim.restart_orders().is_empty());
    sim.heal();
    sim.run_until(Duration::from_secs(10), "one master", |s| {
        s.masters().len() == 1
    });
    assert_eq!(sim.masters(), vec![h("host-6")]);
    sim.run_until(Duration::from_secs(10), "all slaves of host-6", |s| {
        (1..=5).all(|i| s.hosts[&h(&format!("host-{i}"))].agent.master() == Some(&h("host-6")))
    });
}
