//! Authentication scenarios (H15): a rogue without the cluster secret
//! cannot win an election, fake a heartbeat or order a restart; replays are
//! dropped; the secret never shows in logs.

use super::*;
use crate::wire::{seal, Body, Role, Signed};

fn forged(key: &[u8], sender: &str, seq: u64, body: Body) -> Vec<u8> {
    seal(
        &ClusterSecret::new(key.to_vec()),
        &Signed {
            sender: h(sender),
            seq,
            body,
        },
    )
    .unwrap()
}

fn master_claim() -> Body {
    Body::Heartbeat {
        role: Role::Master,
        datastores: 99,
        master: None,
    }
}

fn inject_all(sim: &mut Sim, bytes: &[u8]) {
    let ids: Vec<HostId> = sim
        .hosts
        .iter()
        .filter(|(_, s)| s.up)
        .map(|(h, _)| h.clone())
        .collect();
    for id in ids {
        sim.feed(&id, Input::Message(bytes.to_vec()));
    }
}

fn rejections(sim: &Sim) -> Vec<String> {
    sim.events
        .iter()
        .filter_map(|e| match &e.ev {
            HaEvent::MessageRejected { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn rogue_cannot_win_an_election() {
    let mut sim = Sim::new(uniform(3));
    let mut seq = 1u64 << 40;
    for _ in 0..100 {
        seq += 1;
        // Wrong key, claiming to be a member; and right-looking but unknown sender.
        inject_all(
            &mut sim,
            &forged(b"guessed-key", "host-1", seq, master_claim()),
        );
        inject_all(
            &mut sim,
            &forged(b"guessed-key", "rogue-99", seq, master_claim()),
        );
        sim.tick();
    }
    assert_eq!(sim.masters(), vec![h("host-3")]);
    assert!(sim
        .hosts
        .values()
        .all(|s| s.agent.master() == Some(&h("host-3"))));
    let r = rejections(&sim);
    assert!(
        r.iter().all(|m| m.contains("authentication failed")),
        "{r:?}"
    );
    assert_eq!(r.len(), 600);
}

#[test]
fn insider_key_with_unknown_sender_is_rejected() {
    let mut sim = Sim::new(uniform(2));
    sim.settle();
    inject_all(&mut sim, &forged(SECRET, "host-99", 1, master_claim()));
    let r = rejections(&sim);
    assert_eq!(r.len(), 2);
    assert!(r[0].contains("host-99, which is not a member"), "{r:?}");
    sim.run_secs(5);
    assert_eq!(sim.masters(), vec![h("host-2")]);
}

#[test]
fn rogue_cannot_fake_the_heartbeat_of_a_dead_master() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-3")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    sim.crash("host-3");
    let mut seq = 1u64 << 40;
    let body = Body::Heartbeat {
        role: Role::Master,
        datastores: 2,
        master: Some(h("host-3")),
    };
    let end = sim.now + Duration::from_secs(60);
    while sim.now < end && sim.running_on("vm-a").is_empty() {
        seq += 1;
        inject_all(&mut sim, &forged(b"wrong", "host-3", seq, body.clone()));
        sim.tick();
    }
    assert_eq!(sim.masters(), vec![h("host-2")]);
    assert_eq!(
        sim.running_on("vm-a").len(),
        1,
        "the dead master's VM was restarted"
    );
}

#[test]
fn replayed_messages_are_ignored() {
    let mut sim = Sim::new(uniform(3));
    assert_eq!(sim.settle(), h("host-3"));
    let captured: Vec<(HostId, Vec<u8>)> = sim
        .sent
        .iter()
        .filter(|(f, _, _)| f == &h("host-3"))
        .map(|(_, to, b)| (to.clone(), b.clone()))
        .collect();
    assert!(!captured.is_empty());
    sim.crash("host-3");
    let end = sim.now + Duration::from_secs(15);
    while sim.now < end {
        // Re-send everything the master ever said, every step.
        for (to, b) in captured.iter().rev().take(20) {
            if sim.hosts[to].up {
                sim.feed(to, Input::Message(b.clone()));
            }
        }
        sim.tick();
    }
    assert_eq!(
        sim.masters(),
        vec![h("host-2")],
        "replays did not keep the dead master alive"
    );
    assert!(rejections(&sim)
        .iter()
        .any(|r| r.contains("replayed or stale message from host-3")));
}

#[test]
fn tampered_message_is_rejected() {
    let mut sim = Sim::new(uniform(2));
    sim.settle();
    let (_, to, bytes) = sim
        .sent
        .iter()
        .rev()
        .find(|(f, _, _)| f == &h("host-1"))
        .unwrap()
        .clone();
    let text = String::from_utf8(bytes)
        .unwrap()
        .replace("\\\"seq\\\":", "\\\"seq\\\":9");
    sim.feed(&to, Input::Message(text.into_bytes()));
    assert!(rejections(&sim)
        .iter()
        .any(|r| r.contains("authentication failed")));
}

#[test]
fn rogue_cannot_order_a_restart() {
    let mut spec = uniform(3);
    spec.vms = vec![(vmc("vm-a", 1000, 1024), "host-1")];
    let mut sim = Sim::new(spec);
    assert_eq!(sim.settle(), h("host-3"));
    let order = Body::RestartOrder {
        vm: vmc("vm-a", 1000, 1024),
    };
    // Without the key, pretending to be the master.
    sim.feed(
        &h("host-2"),
        Input::Message(forged(b"wrong", "host-3", 1 << 50, order.clone())),
    );
    // With the key but from a slave: only the master may order.
    sim.feed(
        &h("host-2"),
        Input::Message(forged(SECRET, "host-1", 1 << 50, order)),
    );
    sim.run_secs(5);
    assert!(sim.starts.is_empty(), "{:?}", sim.starts);
    assert_eq!(sim.running_on("vm-a"), vec![h("host-1")]);
}

#[test]
fn secret_never_in_debug_output_or_events() {
    let mut sim = Sim::new(uniform(2));
    sim.settle();
    inject_all(&mut sim, &forged(b"x", "host-1", 1, master_claim()));
    let secret = std::str::from_utf8(SECRET).unwrap();
    for s in sim.hosts.values() {
        let dbg = format!("{:?}", s.agent);
        assert!(!dbg.contains(secret));
        assert!(dbg.contains("[redacted]"));
    }
    assert!(!format!("{:?}", sim.events).contains(secret));
}
