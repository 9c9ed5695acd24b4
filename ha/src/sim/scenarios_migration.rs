//! Live migration through the agents: the master's plan (placement,
//! maintenance, dedicated failover hosts, admission control for a VM coming
//! from outside), a migration in flight not taken for a VM loss, and HA
//! protection following the VM to its new host.

use super::*;

fn begin(sim: &mut Sim, v: &str, to: Option<&str>, from_outside: bool) -> Result<String, String> {
    let master = sim.masters()[0].clone();
    sim.command(
        master.as_str(),
        Command::BeginMigration {
            vm: vm(v),
            to: to.map(h),
            from_outside,
        },
    )
    .map_err(|e| e.to_string())
}

fn end(sim: &mut Sim, v: &str, ok: bool) {
    let master = sim.masters()[0].clone();
    sim.command(master.as_str(), Command::EndMigration { vm: vm(v), ok })
        .unwrap();
}

/// A migration planned, carried out and ended: the master places the VM on
/// its new host, the source's reports without it are not a loss, and when
/// the new host dies the VM is restarted from there (it stays protected).
#[test]
fn migrated_vm_stays_protected_on_its_new_host() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    let master = sim.settle();
    assert_eq!(master, h("host-3"));
    assert_eq!(
        begin(&mut sim, "vm-a", Some("host-2"), false).unwrap(),
        "host-1 -> host-2"
    );
    // A second plan for the same VM is refused while the first runs.
    let err = begin(&mut sim, "vm-a", Some("host-3"), false).unwrap_err();
    assert!(err.contains("already under way"), "{err}");
    // host-2 accepts the arriving VM and does not report it meanwhile.
    sim.command("host-2", Command::AcceptIncoming { vm: vm("vm-a") })
        .unwrap();
    sim.run_secs(3);
    sim.migrate_vm("vm-a", "host-1", "host-2");
    sim.run_secs(5);
    end(&mut sim, "vm-a", true);
    sim.run_secs(15);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-2")]);
    assert!(
        sim.restart_orders().is_empty(),
        "the migration was taken for a loss: {:?}",
        sim.restart_orders()
    );
    let st = sim.hosts[&h("host-3")].agent.status();
    assert_eq!(
        st.vms[&vm("vm-a")],
        crate::types::VmProtection::Protected { host: h("host-2") }
    );
    // Protected where it now runs: its new host's failure restarts it.
    sim.crash("host-2");
    sim.run_until(Duration::from_secs(90), "vm-a restarted", |s| {
        s.running_on("vm-a").len() == 1
    });
    assert_ne!(sim.running_on("vm-a"), vec![h("host-2")]);
}

/// The source's reports stop listing the VM before the target's first
/// report arrives: while the migration is in flight that is not a loss.
#[test]
fn vm_missing_from_its_source_during_a_migration_is_not_restarted() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    begin(&mut sim, "vm-a", Some("host-2"), false).unwrap();
    sim.command("host-2", Command::AcceptIncoming { vm: vm("vm-a") })
        .unwrap();
    // Only the source hears of the switchover for a while (the target's
    // agent is slow to see its VMM run).
    let id = vm("vm-a");
    let ds = DatastoreId::new("ds1");
    let rec = sim
        .datastores
        .get_mut(&ds)
        .unwrap()
        .leases
        .get_mut(&id)
        .unwrap();
    *rec = rec.acquired_by(&h("host-2"));
    let generation = rec.generation;
    let sv = sim
        .hosts
        .get_mut(&h("host-1"))
        .unwrap()
        .vms
        .remove(&id)
        .unwrap();
    sim.feed(
        &h("host-1"),
        Input::Vm {
            vm: id.clone(),
            event: VmEvent::MigratedAway {
                to: Some(h("host-2")),
            },
        },
    );
    sim.run_secs(6);
    assert!(
        sim.restart_orders().is_empty(),
        "{:?}",
        sim.restart_orders()
    );
    let now = sim.now;
    sim.hosts.get_mut(&h("host-2")).unwrap().vms.insert(
        id.clone(),
        SimVm {
            holder: LeaseHolder::acquired(generation, now),
            next_renew: now,
            shutdown_at: sv.shutdown_at,
        },
    );
    sim.feed(
        &h("host-2"),
        Input::Vm {
            vm: id,
            event: VmEvent::PoweredOn,
        },
    );
    end(&mut sim, "vm-a", true);
    sim.run_secs(10);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-2")]);
    assert!(
        sim.restart_orders().is_empty(),
        "{:?}",
        sim.restart_orders()
    );
}

/// A failed migration changes nothing: the VM stays protected where it ran.
#[test]
fn failed_migration_leaves_the_vm_where_it_ran() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    begin(&mut sim, "vm-a", Some("host-2"), false).unwrap();
    sim.command("host-2", Command::AcceptIncoming { vm: vm("vm-a") })
        .unwrap();
    sim.feed(
        &h("host-2"),
        Input::Vm {
            vm: vm("vm-a"),
            event: VmEvent::IncomingEnded,
        },
    );
    end(&mut sim, "vm-a", false);
    sim.run_secs(10);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    assert!(sim.restart_orders().is_empty());
    // The next plan is accepted again (placed by the master this time).
    let plan = begin(&mut sim, "vm-a", None, false).unwrap();
    assert!(plan.starts_with("host-1 -> host-"), "{plan}");
    assert_ne!(plan, "host-1 -> host-1");
}

/// Where a migration may not go, each refusal with its reason: the host it
/// runs on, a host in maintenance, a dedicated failover host, a host
/// without room; and a VM that does not run in the cluster.
#[test]
fn migration_refusals_name_the_reason() {
    let mut spec = uniform(4);
    spec.hosts[1].1 = Resources::new(16_000, 1024);
    spec.admission = AdmissionPolicy::DedicatedFailoverHosts([h("host-4")].into_iter().collect());
    spec.vms = vec![(vmc("vm-a", 1000, 2048), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.command("host-3", Command::EnterMaintenance).unwrap();
    sim.run_secs(5);
    let err = begin(&mut sim, "vm-a", Some("host-1"), false).unwrap_err();
    assert!(err.contains("it already runs on host-1"), "{err}");
    let err = begin(&mut sim, "vm-a", Some("host-3"), false).unwrap_err();
    assert!(err.contains("host host-3 is in maintenance mode"), "{err}");
    let err = begin(&mut sim, "vm-a", Some("host-4"), false).unwrap_err();
    assert!(err.contains("host-4: dedicated failover host"), "{err}");
    let err = begin(&mut sim, "vm-a", Some("host-2"), false).unwrap_err();
    assert!(err.contains("host-2: 16000 MHz / 1024 MiB free"), "{err}");
    // Placed by the master: nowhere to go.
    let err = begin(&mut sim, "vm-a", None, false).unwrap_err();
    assert!(err.contains("no other host can take it"), "{err}");
    // Already in the cluster: it cannot also come in from outside.
    let err = begin(&mut sim, "vm-a", Some("host-2"), true).unwrap_err();
    assert!(
        err.contains("already runs in the cluster, on host-1"),
        "{err}"
    );
    // A VM that is off is started, not migrated.
    sim.command("host-1", Command::PowerOffVm { vm: vm("vm-a") })
        .unwrap();
    sim.run_secs(3);
    let err = begin(&mut sim, "vm-a", Some("host-2"), false).unwrap_err();
    assert!(err.contains("does not run in the cluster"), "{err}");
    // The target refuses too, on its own, while in maintenance.
    let err = sim
        .command("host-3", Command::AcceptIncoming { vm: vm("vm-a") })
        .unwrap_err()
        .to_string();
    assert!(err.contains("maintenance"), "{err}");
}

/// A VM coming into the cluster from outside is a power-on for admission
/// control: refused with the arithmetic when it would break the policy,
/// admitted when it fits.
#[test]
fn migration_into_the_cluster_passes_admission_control() {
    let mut spec = uniform(3);
    spec.admission = AdmissionPolicy::PercentageReserved {
        cpu_pct: 25,
        mem_pct: 50,
    };
    spec.vms = vec![(vmc("vm-1", 4000, 40_000), "host-1")];
    let mut sim = Sim::new(spec);
    sim.settle();
    sim.command("host-1", Command::RegisterVm(vmc("big", 4000, 65_000)))
        .unwrap();
    sim.command("host-2", Command::RegisterVm(vmc("big", 4000, 65_000)))
        .unwrap();
    sim.command("host-3", Command::RegisterVm(vmc("big", 4000, 65_000)))
        .unwrap();
    sim.command("host-3", Command::RegisterVm(vmc("small", 1000, 1024)))
        .unwrap();
    // 40000 + 65000 of 196608 MiB reserved: 46 % free, 50 % needed.
    let err = begin(&mut sim, "big", Some("host-2"), true).unwrap_err();
    assert!(err.contains("admission control"), "{err}");
    assert!(err.contains("(1 - 105000/196608 MiB)"), "{err}");
    assert!(err.contains("(need 50%)"), "{err}");
    assert_eq!(
        begin(&mut sim, "small", Some("host-2"), true).unwrap(),
        "outside -> host-2"
    );
}
