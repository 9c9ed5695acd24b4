//! Isolation, partition and split-brain scenarios (H4, H6, H7, H9, H10, H13).

use super::*;
use crate::types::{IsolationResponse, VmProtection};

fn with_response(mut c: VmConfig, r: IsolationResponse) -> VmConfig {
    c.isolation_response = r;
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

fn declared_at(sim: &Sim, host: &str) -> Option<Time> {
    sim.events
        .iter()
        .find(|e| e.host == h(host) && e.ev == HaEvent::IsolationDeclared)
        .map(|e| e.at)
}

fn freeze(sim: &mut Sim, host: &str, on: bool) {
    sim.hosts.get_mut(&h(host)).unwrap().frozen = on;
}

#[test]
fn isolated_slave_leave_powered_on_is_not_restarted() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.set_mgmt("host-1", false);
    let cut = sim.now;
    sim.run_until(Duration::from_secs(30), "isolated", |s| {
        s.state("host-1") == HostHaState::Isolated
    });
    // A slave decides after its election attempt: 3 s + 5 s + a ping.
    assert!(
        sim.now.since(cut) <= Duration::from_secs(10),
        "{:?}",
        sim.now.since(cut)
    );
    sim.run_until(Duration::from_secs(10), "master sees isolated", |s| {
        classified(s, "host-3", "host-1") == Some(HostHaState::Isolated)
    });
    assert!(
        !sim.has_event(|e| e.ev
            == HaEvent::HostClassified {
                host: h("host-1"),
                state: HostHaState::Failed
            }),
        "an isolated host is never classified failed while its datastore heartbeat lives"
    );
    sim.run_secs(60);
    assert!(sim.restart_orders().is_empty());
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    assert!(sim.has_event(|e| e.ev
        == HaEvent::IsolationResponseApplied {
            vm: vm("vm-a"),
            response: IsolationResponse::LeaveOn
        }));
    // The network returns: the host rejoins, the VM ran all along, once.
    sim.set_mgmt("host-1", true);
    sim.run_until(Duration::from_secs(10), "rejoined", |s| {
        s.state("host-1") == HostHaState::Slave
    });
    assert!(sim.has_event(|e| e.host == h("host-1") && e.ev == HaEvent::IsolationEnded));
    sim.run_secs(3);
    assert_eq!(
        sim.hosts[&h("host-3")].agent.status().vms[&vm("vm-a")],
        VmProtection::Protected { host: h("host-1") }
    );
}

#[test]
fn isolated_slave_power_off_released_then_restarted() {
    let mut spec = uniform(3);
    spec.vms = vec![
        (
            with_response(vmc("vm-off", 1000, 1024), IsolationResponse::PowerOff),
            "host-1",
        ),
        (vmc("vm-on", 1000, 1024), "host-1"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.set_mgmt("host-1", false);
    sim.run_until(Duration::from_secs(40), "restarted", |s| {
        s.running_on("vm-off").iter().any(|x| x != &h("host-1"))
    });
    let off = sim
        .power_offs
        .iter()
        .find(|p| p.2 == vm("vm-off"))
        .unwrap()
        .clone();
    assert_eq!(
        (off.1.clone(), off.3),
        (h("host-1"), PowerOffReason::IsolationResponse)
    );
    let ordered = sim.events_where(
        |e| matches!(&e.ev, HaEvent::RestartOrdered { vm: v, .. } if v.as_str() == "vm-off"),
    )[0]
    .at;
    assert!(
        ordered > off.0,
        "restart only after the release: {ordered} vs {}",
        off.0
    );
    assert!(ordered > declared_at(&sim, "host-1").unwrap());
    sim.run_secs(30);
    assert_eq!(
        sim.running_on("vm-on"),
        vec![h("host-1")],
        "leave-on VM untouched"
    );
    assert_eq!(sim.restart_orders().len(), 1);
}

#[test]
fn isolated_slave_shutdown_then_restarted() {
    let mut spec = uniform(2);
    spec.vms = vec![(
        with_response(vmc("vm-a", 1000, 1024), IsolationResponse::ShutDown),
        "host-1",
    )];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-2"));
    sim.set_mgmt("host-1", false);
    sim.run_until(Duration::from_secs(40), "restarted", |s| {
        s.running_on("vm-a") == vec![h("host-2")]
    });
    assert!(sim.power_offs.is_empty(), "graceful: no hard power-off");
    let d = declared_at(&sim, "host-1").unwrap();
    let ordered = sim.events_where(|e| matches!(e.ev, HaEvent::RestartOrdered { .. }))[0].at;
    assert!(
        ordered.since(d) >= Duration::from_secs(2),
        "waited for the guest to shut down"
    );
}

#[test]
fn isolation_shutdown_timeout_forces_power_off() {
    let mut spec = uniform(2);
    spec.timings.shutdown_timeout = Duration::from_secs(30);
    spec.vms = vec![(
        with_response(vmc("vm-a", 1000, 1024), IsolationResponse::ShutDown),
        "host-1",
    )];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.hosts.get_mut(&h("host-1")).unwrap().shutdown_hangs = true;
    sim.set_mgmt("host-1", false);
    sim.run_until(Duration::from_secs(80), "restarted", |s| {
        s.running_on("vm-a") == vec![h("host-2")]
    });
    let d = declared_at(&sim, "host-1").unwrap();
    let off = sim.power_offs[0].clone();
    assert_eq!(off.3, PowerOffReason::IsolationShutdownTimeout);
    assert_eq!(off.0.since(d), Duration::from_secs(30));
}

#[test]
fn default_shutdown_timeout_is_300s() {
    assert_eq!(
        Timings::default().shutdown_timeout,
        Duration::from_secs(300)
    );
}

#[test]
fn isolated_master_steps_aside_and_released_vms_restart() {
    let mut spec = uniform(3);
    spec.vms = vec![
        (
            with_response(vmc("vm-m", 1000, 1024), IsolationResponse::PowerOff),
            "host-3",
        ),
        (vmc("vm-keep", 1000, 1024), "host-3"),
    ];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.set_mgmt("host-3", false);
    let cut = sim.now;
    sim.run_until(Duration::from_secs(20), "master isolated", |s| {
        s.state("host-3") == HostHaState::Isolated
    });
    // A master decides in about 5 s.
    let took = sim.now.since(cut);
    assert!(
        took >= Duration::from_secs(5) && took <= Duration::from_secs(7),
        "{took:?}"
    );
    sim.run_until(Duration::from_secs(20), "new master", |s| {
        s.masters() == vec![h("host-2")]
    });
    sim.run_until(Duration::from_secs(30), "vm-m restarted", |s| {
        s.running_on("vm-m").iter().any(|x| x != &h("host-3"))
    });
    sim.run_secs(20);
    assert_eq!(
        classified(&sim, "host-2", "host-3"),
        Some(HostHaState::Isolated)
    );
    assert_eq!(sim.running_on("vm-keep"), vec![h("host-3")]);
    assert_eq!(sim.restart_orders().len(), 1);
}

#[test]
fn isolation_policy_delay_postpones_the_response() {
    let mut spec = uniform(2);
    spec.timings.isolation_policy_delay = Duration::from_secs(10);
    spec.vms = vec![(
        with_response(vmc("vm-a", 1000, 1024), IsolationResponse::PowerOff),
        "host-2",
    )];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-2"));
    sim.set_mgmt("host-2", false);
    let cut = sim.now;
    sim.run_until(Duration::from_secs(30), "isolated", |s| {
        s.state("host-2") == HostHaState::Isolated
    });
    let took = sim.now.since(cut);
    assert!(
        took >= Duration::from_secs(15) && took <= Duration::from_secs(17),
        "{took:?}"
    );
}

#[test]
fn agent_traffic_cut_but_ping_and_datastores_fine_is_partitioned() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    for other in ["host-2", "host-3"] {
        sim.blocked.insert((h("host-1"), h(other)));
    }
    sim.run_until(Duration::from_secs(20), "partitioned", |s| {
        classified(s, "host-3", "host-1") == Some(HostHaState::Partitioned)
    });
    sim.run_secs(40);
    // host-1 still reaches its gateway: it is not isolated; it leads its own partition.
    assert_eq!(sim.state("host-1"), HostHaState::Master);
    assert!(!sim.has_event(|e| e.ev == HaEvent::IsolationDeclared));
    assert!(sim.restart_orders().is_empty());
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    sim.heal();
    sim.run_until(Duration::from_secs(10), "one master", |s| {
        s.masters() == vec![h("host-3")]
    });
}

#[test]
fn gateway_down_with_agents_talking_is_not_isolation() {
    let mut spec = uniform(3);
    spec.vms = vec![(
        with_response(vmc("vm-a", 1000, 1024), IsolationResponse::PowerOff),
        "host-1",
    )];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.gateway_up = false;
    sim.run_secs(60);
    assert!(
        !sim.has_event(|e| matches!(e.ev, HaEvent::IsolationDeclared | HaEvent::IsolationCheck))
    );
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
}

#[test]
fn fully_cut_host_failed_its_vms_restarted_no_split_brain() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    // Management network and storage both gone, the host itself keeps running.
    sim.set_mgmt("host-1", false);
    sim.set_storage("host-1", false);
    sim.run_until(Duration::from_secs(20), "failed", |s| {
        classified(s, "host-3", "host-1") == Some(HostHaState::Failed)
    });
    // The cut host stops its guest when the lease cannot be renewed (8 s)...
    sim.run_until(Duration::from_secs(20), "stopped", |s| {
        s.running_on("vm-a").is_empty()
    });
    assert!(sim.has_event(
        |e| e.host == h("host-1") && e.ev == HaEvent::LeaseExpiredStop { vm: vm("vm-a") }
    ));
    // ...long before anyone can take the lease over (20 s unchanged).
    sim.run_until(Duration::from_secs(40), "restarted", |s| {
        s.running_on("vm-a").len() == 1
    });
    let target = sim.running_on("vm-a")[0].clone();
    assert_ne!(target, h("host-1"));
    sim.set_mgmt("host-1", true);
    sim.set_storage("host-1", true);
    sim.run_until(Duration::from_secs(20), "rejoined", |s| {
        s.state("host-1") == HostHaState::Slave
    });
    sim.run_secs(10);
    assert_eq!(sim.running_on("vm-a"), vec![target]);
    assert_eq!(sim.restart_orders().len(), 1);
}

#[test]
fn frozen_host_returns_and_powers_off_stale_copy() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    // The whole host stalls (a hung kernel, a paused VM host): no ticks, no
    // renewals, no answers; its guest does not run either.
    freeze(&mut sim, "host-1", true);
    sim.run_until(Duration::from_secs(60), "restarted", |s| {
        s.running_on("vm-a").iter().any(|x| x != &h("host-1"))
    });
    let target = sim
        .running_on("vm-a")
        .into_iter()
        .find(|x| x != &h("host-1"))
        .unwrap();
    freeze(&mut sim, "host-1", false);
    sim.tick();
    assert!(sim.has_event(|e| e.host == h("host-1") && matches!(&e.ev, HaEvent::StaleCopyPoweredOff { vm: v, by } if v.as_str() == "vm-a" && by.as_ref() == Some(&target))));
    assert_eq!(sim.running_on("vm-a"), vec![target.clone()]);
    let p = sim.power_offs.iter().find(|p| p.1 == h("host-1")).unwrap();
    assert_eq!(p.3, PowerOffReason::StaleCopy);
    sim.run_secs(20);
    assert_eq!(sim.running_on("vm-a"), vec![target]);
    assert_eq!(
        sim.restart_orders().len(),
        1,
        "the stale copy's power-off triggers no restart"
    );
}

#[test]
fn storage_loss_on_one_host_restarts_its_vms_elsewhere() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.set_storage("host-1", false);
    sim.run_until(Duration::from_secs(60), "restarted elsewhere", |s| {
        s.running_on("vm-a").iter().any(|x| x != &h("host-1"))
    });
    assert!(sim.has_event(|e| e.ev == HaEvent::LeaseExpiredStop { vm: vm("vm-a") }));
    assert_eq!(
        sim.state("host-1"),
        HostHaState::Slave,
        "network fine: still a slave"
    );
    assert_ne!(sim.restart_orders()[0].1, h("host-1"));
}

#[test]
fn stale_copy_report_race_causes_no_restart() {
    use crate::wire::{seal, Body, PowerState, Signed};
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-2")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    // A returning host's last words before its lease check: "vm-a is on
    // here", then "vm-a stopped, stale". The master must not restart vm-a.
    let key = ClusterSecret::new(SECRET.to_vec());
    for (i, ps) in [PowerState::On, PowerState::Stale].into_iter().enumerate() {
        let body = Body::VmStates {
            vms: [(vm("vm-a"), ps)].into_iter().collect(),
        };
        let signed = Signed {
            sender: h("host-1"),
            seq: (7 << 32) + i as u64,
            body,
        };
        sim.feed(&h("host-3"), Input::Message(seal(&key, &signed).unwrap()));
    }
    sim.run_secs(10);
    assert!(
        sim.restart_orders().is_empty(),
        "{:?}",
        sim.restart_orders()
    );
    assert_eq!(
        sim.hosts[&h("host-3")].agent.status().vms[&vm("vm-a")],
        VmProtection::Protected { host: h("host-2") },
        "the real copy's next report wins"
    );
}
