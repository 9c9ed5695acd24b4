//! Datastore-loss protection (H13): one host loses its path to a datastore
//! that a running VM uses while other hosts still reach it. Every step of
//! every scenario is checked for split brain by `Sim::tick`.

use super::*;
use crate::agent::PowerOffReason;
use crate::types::{DatastoreLossResponse, DatastoreLossSettings};

/// vm-a runs on `host` with its lease on ds1 and a disk on ds2.
fn spec(host: &'static str, response: DatastoreLossResponse, delay_s: u64) -> Spec {
    let mut s = uniform(3);
    let mut c = vmc("vm-a", 1000, 1024);
    c.datastores.insert(DatastoreId::new("ds2"));
    c.datastore_loss = DatastoreLossSettings {
        response,
        delay: Duration::from_secs(delay_s),
    };
    s.vms = vec![(c, host)];
    s
}

fn off_for_ds_loss(sim: &Sim) -> Vec<(Time, HostId)> {
    sim.power_offs
        .iter()
        .filter(|p| p.2 == vm("vm-a") && p.3 == PowerOffReason::DatastoreLost)
        .map(|p| (p.0, p.1.clone()))
        .collect()
}

fn responses(sim: &Sim) -> Vec<Ev> {
    sim.events_where(|e| matches!(e.ev, HaEvent::DatastoreLossResponse { .. }))
}

#[test]
fn restart_after_the_delay_on_a_host_that_reaches_the_datastore() {
    let mut sim = Sim::new(spec("host-1", DatastoreLossResponse::Restart, 30));
    assert_eq!(sim.settle(), h("host-3"));
    let cut = sim.now;
    sim.cut_datastore("host-1", "ds2", true);
    // The delay lets the datastore come back: nothing happens before it.
    sim.run_secs(28);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    assert!(off_for_ds_loss(&sim).is_empty());
    let moved = sim.run_until(Duration::from_secs(90), "vm-a elsewhere", |s| {
        let on = s.running_on("vm-a");
        on.len() == 1 && on[0] != h("host-1")
    });
    let offs = off_for_ds_loss(&sim);
    assert_eq!(offs.len(), 1, "{offs:?}");
    assert_eq!(offs[0].1, h("host-1"));
    assert!(offs[0].0.since(cut) >= Duration::from_secs(30), "{offs:?}");
    assert!(
        moved.since(cut) < Duration::from_secs(60),
        "took {:?}",
        moved.since(cut)
    );
    let r = responses(&sim);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(matches!(
        &r[0].ev,
        HaEvent::DatastoreLossResponse { host, datastore, response: DatastoreLossResponse::Restart, .. }
            if host == &h("host-1") && datastore.as_str() == "ds2"
    ));
    // The restart went to a host that reaches ds2, once, and stays there.
    let orders = sim.restart_orders();
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_ne!(orders[0].1, h("host-1"));
    sim.run_secs(60);
    assert_eq!(sim.running_on("vm-a").len(), 1);
    assert_eq!(sim.starts.iter().filter(|s| s.2 == vm("vm-a")).count(), 1);
}

#[test]
fn datastore_back_within_the_delay_changes_nothing() {
    let mut sim = Sim::new(spec("host-1", DatastoreLossResponse::Restart, 30));
    sim.settle();
    sim.cut_datastore("host-1", "ds2", true);
    sim.run_secs(20);
    sim.cut_datastore("host-1", "ds2", false);
    sim.run_secs(120);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    assert!(off_for_ds_loss(&sim).is_empty());
    assert!(responses(&sim).is_empty());
    assert!(sim.has_event(|e| matches!(e.ev, HaEvent::DatastoreAccessible { .. })));
}

#[test]
fn events_only_reports_once_and_leaves_the_vm() {
    let mut sim = Sim::new(spec("host-1", DatastoreLossResponse::EventsOnly, 10));
    sim.settle();
    sim.cut_datastore("host-1", "ds2", true);
    sim.run_secs(120);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    assert!(off_for_ds_loss(&sim).is_empty());
    let r = responses(&sim);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(matches!(
        r[0].ev,
        HaEvent::DatastoreLossResponse {
            response: DatastoreLossResponse::EventsOnly,
            ..
        }
    ));
}

#[test]
fn disabled_does_nothing() {
    let mut sim = Sim::new(spec("host-1", DatastoreLossResponse::Disabled, 0));
    sim.settle();
    sim.cut_datastore("host-1", "ds2", true);
    sim.run_secs(300);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    assert!(off_for_ds_loss(&sim).is_empty());
    assert!(responses(&sim).is_empty());
}

/// Every host lost ds2: moving the VM gains nothing, it stays (reported
/// once). When one host gets ds2 back, the VM goes there and nowhere else.
#[test]
fn no_host_reaches_it_then_one_does() {
    let mut sim = Sim::new(spec("host-1", DatastoreLossResponse::Restart, 10));
    sim.settle();
    for host in ["host-1", "host-2", "host-3"] {
        sim.cut_datastore(host, "ds2", true);
    }
    sim.run_secs(60);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
    let none = sim.events_where(|e| matches!(e.ev, HaEvent::DatastoreLossNoTarget { .. }));
    assert_eq!(none.len(), 1, "{none:?}");
    // host-3 gets it back (host-2, which would win the placement tie, has not).
    sim.cut_datastore("host-3", "ds2", false);
    sim.run_until(Duration::from_secs(90), "vm-a on host-3", |s| {
        s.running_on("vm-a") == vec![h("host-3")]
    });
    assert_eq!(sim.restart_orders(), vec![(vm("vm-a"), h("host-3"))]);
}

/// The lost datastore holds the lease: the lease stops the guest after its
/// stop time whatever the delay (it could not write anyway), and the
/// restart goes to a host that reaches ds1, once the lease has lapsed.
#[test]
fn lease_datastore_lost_restarts_elsewhere_without_split_brain() {
    let mut sim = Sim::new(spec("host-1", DatastoreLossResponse::Restart, 180));
    sim.settle();
    let cut = sim.now;
    sim.cut_datastore("host-1", "ds1", true);
    sim.run_until(Duration::from_secs(120), "vm-a elsewhere", |s| {
        let on = s.running_on("vm-a");
        on.len() == 1 && on[0] != h("host-1")
    });
    let stop = sim
        .power_offs
        .iter()
        .find(|p| p.2 == vm("vm-a"))
        .expect("stopped on host-1");
    assert_eq!(stop.1, h("host-1"));
    assert_eq!(stop.3, PowerOffReason::LeaseExpired);
    assert!(stop.0.since(cut) <= Duration::from_secs(10), "{stop:?}");
    let orders = sim.restart_orders();
    assert!(
        orders.iter().all(|(_, host)| host != &h("host-1")),
        "{orders:?}"
    );
    sim.run_secs(60);
    assert_eq!(sim.running_on("vm-a").len(), 1);
}

/// The master's own VM: the master stops it itself and restarts it on a
/// slave.
#[test]
fn master_host_loses_the_datastore() {
    let mut sim = Sim::new(spec("host-3", DatastoreLossResponse::Restart, 5));
    assert_eq!(sim.settle(), h("host-3"));
    sim.cut_datastore("host-3", "ds2", true);
    sim.run_until(Duration::from_secs(60), "vm-a elsewhere", |s| {
        let on = s.running_on("vm-a");
        on.len() == 1 && on[0] != h("host-3")
    });
    assert_eq!(off_for_ds_loss(&sim).len(), 1);
}
