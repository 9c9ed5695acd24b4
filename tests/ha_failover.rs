//! End-to-end HA scenarios with real guests: agents as real processes in the
//! network-namespace lab (`tests/ha_lab`), VMs started through the cluster,
//! each guest running the `disk-write` workload on a disk that lives on the
//! shared datastore.
//!
//! The split-brain checker runs after every scenario: the guest's disk
//! writer tags every record with its boot (one tag per running copy) and a
//! sequence number; a tag that writes again after another copy took over
//! means two copies ran at once. During each scenario the lab also samples
//! where VMMs run and fails if one VM runs on two hosts at the same moment.

use std::path::Path;
use std::time::Duration;

mod common;
mod ha_lab;
use ha_lab::Lab;

use ha_lab::FAST_TIMINGS as TIMINGS;

/// A guest boot, with others booting at the same time, plus a failover.
const BOOT: Duration = common::GUEST_TIMEOUT;
const T: Duration = Duration::from_secs(60);

fn guest_vm(lab: &Lab, name: &str) -> String {
    common::disk_writer_vm(&lab.store("ds1").join("vms").join(name), name)
}

/// The master's view of a VM: (protection state, host).
fn vm_state(lab: &Lab, at: usize, vm: &str) -> Option<(String, String)> {
    let v = lab.status(at)?;
    let p = &v["vms"][vm];
    Some((
        p["state"].as_str()?.to_string(),
        p["host"].as_str().unwrap_or("").to_string(),
    ))
}

/// Waits until the master reports `vm` protected on a host in `hosts`, its
/// VMM runs there, and its guest has started writing; returns the host.
fn wait_running(lab: &Lab, at: usize, vm: &str, hosts: &[usize], timeout: Duration) -> usize {
    let i = lab.wait(
        &format!("{vm} protected on one of {hosts:?}"),
        timeout,
        |l| {
            let (st, h) = vm_state(l, at, vm)?;
            let i: usize = h.strip_prefix("host-")?.parse().ok()?;
            (st == "protected" && hosts.contains(&i) && l.vmm_pid(i, vm).is_some()).then_some(i)
        },
    );
    wait_writing(lab, i, vm, 1);
    i
}

/// Waits until the guest on host `i` has resumed its disk journal `n` times
/// there (the workload prints VIGIL-DISK-RESUME once per boot).
fn wait_writing(lab: &Lab, i: usize, vm: &str, n: usize) {
    let console = lab.hosts[i - 1].run_dir.join(format!("{vm}.console"));
    lab.wait(&format!("{vm}'s disk writer on host-{i}"), BOOT, |_| {
        let c = std::fs::read_to_string(&console).unwrap_or_default();
        (c.matches("VIGIL-DISK-RESUME").count() >= n).then_some(())
    });
    // The writer prints its resume line before its first record (20 a
    // second): give it time to land on the disk.
    std::thread::sleep(Duration::from_secs(1));
}

/// The split-brain checker over a VM's journal: returns the writers (boot
/// tags, in order of appearance) and panics if a writer came back after
/// another took over, or if sequence numbers went backwards.
fn check_journal(disk: &Path) -> Vec<String> {
    let (writers, records, _) = common::journal(disk);
    assert!(records > 0, "no journal records on {}", disk.display());
    writers
        .iter()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect()
}

/// Fails if `vm` has a running VMM on two hosts at once.
fn assert_single(lab: &Lab, vm: &str) {
    let on = lab.running_on(vm);
    assert!(
        on.len() <= 1,
        "{vm} runs on hosts {on:?} at once\n{}",
        lab.logs()
    );
}

/// Waits `d` while checking, every 200 ms, that `vm` never runs twice.
fn watch(lab: &Lab, vm: &str, d: Duration) {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        assert_single(lab, vm);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_cluster(name: &str) -> Lab {
    let mut lab = Lab::new(name, 3, TIMINGS);
    lab.start_all();
    lab.wait("host-3 master", T, |l| {
        let v = l.status(1)?;
        (v["host"] == "host-3"
            && v["hosts"]["host-1"] == "slave"
            && v["hosts"]["host-2"] == "slave")
            .then_some(())
    });
    lab
}

/// Powers `vm` on at `host` through the cluster. Right after an election
/// the master may not have heard the slave's first heartbeat as a slave:
/// such refusals are retried for a few seconds.
fn start_vm(lab: &Lab, vm: &str, host: usize) {
    let h = format!("host-{host}");
    let mut last = String::new();
    for _ in 0..20 {
        let (ok, out, err) = lab.vigil(1, &["vm", "start", vm, "--host", &h]);
        if ok {
            return;
        }
        last = format!("{out}{err}");
        assert!(last.contains("not a live member"), "vm start {vm}: {last}");
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("vm start {vm}: {last}");
}

#[test]
fn failed_host_vm_restarts_on_a_peer_and_a_restarted_agent_adopts_its_vmm() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("fo");
    let toml = guest_vm(&lab, "vm1");
    lab.register("vm1", &toml, &["--priority", "high"]);
    start_vm(&lab, "vm1", 1);
    wait_running(&lab, 1, "vm1", &[1], BOOT);
    let pid = lab.vmm_pid(1, "vm1").unwrap();

    // The agent dies: the VM keeps running and renewing its lease; the new
    // agent adopts the same VMM process.
    lab.kill_agent(1);
    let lease = lab.store("ds1").join("vms/vm1/lease");
    let before = vmm::lease::read_record(&lease).unwrap().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = vmm::lease::read_record(&lease).unwrap().unwrap();
    assert_eq!(
        lab.vmm_pid(1, "vm1"),
        Some(pid),
        "the VMM died with its agent"
    );
    assert!(after.counter > before.counter, "the VMM stopped renewing");
    lab.start_agent(1);
    lab.wait("vm1 adopted by the new agent", T, |l| {
        let v = l.status(1)?;
        (v["hosts"]["host-1"] == "slave" && v["vms"]["vm1"]["host"] == "host-1").then_some(())
    });
    assert_eq!(lab.vmm_pid(1, "vm1"), Some(pid));
    watch(&lab, "vm1", Duration::from_secs(3));

    // The host dies: the master restarts the VM on a peer, after the lease
    // takeover time.
    wait_writing(&lab, 1, "vm1", 1);
    lab.kill_host(1);
    let end = std::time::Instant::now() + BOOT;
    let to = loop {
        assert_single(&lab, "vm1");
        if let Some((st, h)) = vm_state(&lab, 2, "vm1") {
            if st == "protected" && (h == "host-2" || h == "host-3") {
                break h.strip_prefix("host-").unwrap().parse::<usize>().unwrap();
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "vm1 not restarted\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rec = vmm::lease::read_record(&lease).unwrap().unwrap();
    assert_eq!(rec.owner.as_deref(), Some(format!("host-{to}").as_str()));
    assert_eq!(rec.generation, 2);
    wait_writing(&lab, to, "vm1", 1);
    watch(&lab, "vm1", Duration::from_secs(2));
    lab.kill_host(to);
    let writers = check_journal(&lab.store("ds1").join("vms/vm1/disk.img"));
    assert_eq!(writers.len(), 2, "one writer per copy: {writers:?}");
}

#[test]
fn master_failure_new_master_restarts_its_vm() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("ma");
    let toml = guest_vm(&lab, "vm2");
    lab.register("vm2", &toml, &[]);
    start_vm(&lab, "vm2", 3);
    wait_running(&lab, 1, "vm2", &[3], BOOT);
    // The first copy's records must be on the disk before its host dies, or
    // the journal cannot show two writers.
    wait_writing(&lab, 3, "vm2", 1);
    lab.kill_host(3);
    lab.wait("host-2 master", T, |l| {
        let v = l.status(1)?;
        (v["host"] == "host-2").then_some(())
    });
    let end = std::time::Instant::now() + BOOT;
    let to = loop {
        assert_single(&lab, "vm2");
        if let Some((st, h)) = vm_state(&lab, 1, "vm2") {
            if st == "protected" && (h == "host-1" || h == "host-2") {
                break h.strip_prefix("host-").unwrap().parse::<usize>().unwrap();
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "vm2 not restarted\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    wait_writing(&lab, to, "vm2", 1);
    lab.kill_host(to);
    let writers = check_journal(&lab.store("ds1").join("vms/vm2/disk.img"));
    assert_eq!(writers.len(), 2, "{writers:?}");
}

fn host_of(lab: &Lab, at: usize, vm: &str) -> Option<(String, usize)> {
    let (st, h) = vm_state(lab, at, vm)?;
    Some((st, h.strip_prefix("host-")?.parse().ok()?))
}

#[test]
fn isolated_host_applies_each_isolation_response() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("is");
    for (vm, resp) in [
        ("vm-off", "power-off"),
        ("vm-shut", "shut-down"),
        ("vm-on", "leave-on"),
    ] {
        let toml = guest_vm(&lab, vm);
        lab.register(vm, &toml, &["--isolation-response", resp]);
        start_vm(&lab, vm, 1);
    }
    for vm in ["vm-off", "vm-shut", "vm-on"] {
        wait_running(&lab, 2, vm, &[1], BOOT);
    }
    lab.cut_network(1);
    // host-1 hears nobody and its isolation address does not answer.
    let log = lab.hosts[0].dir.join("agent.log");
    lab.wait("host-1 declares itself isolated", T, |_| {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        l.contains("IsolationDeclared").then_some(())
    });
    // Power-off and shut-down (no guest tools in this guest: the VMM powers
    // it off at once) release the VMs: they run again on a peer.
    let end = std::time::Instant::now() + BOOT;
    let mut moved = std::collections::BTreeMap::new();
    while moved.len() < 2 {
        for vm in ["vm-off", "vm-shut", "vm-on"] {
            assert_single(&lab, vm);
        }
        for vm in ["vm-off", "vm-shut"] {
            if let Some((st, h)) = host_of(&lab, 2, vm) {
                if st == "protected" && h != 1 && lab.vmm_pid(h, vm).is_some() {
                    moved.insert(vm, h);
                }
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "released VMs not restarted\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lab.vmm_pid(1, "vm-off").is_none() && lab.vmm_pid(1, "vm-shut").is_none());
    // Leave-on: still running on the isolated host, never restarted.
    watch(&lab, "vm-on", Duration::from_secs(8));
    assert_eq!(lab.running_on("vm-on"), vec![1]);
    // The isolation ends: host-1 rejoins; every VM runs once.
    lab.heal_network(1);
    lab.wait("host-1 back as a slave", T, |l| {
        (l.status(2)?["hosts"]["host-1"] == "slave").then_some(())
    });
    for vm in ["vm-off", "vm-shut", "vm-on"] {
        assert_single(&lab, vm);
        assert_eq!(lab.running_on(vm).len(), 1, "{vm}");
    }
    for (vm, h) in &moved {
        wait_writing(&lab, *h, vm, 1);
    }
    for i in 1..=3 {
        lab.kill_host(i);
    }
    for vm in ["vm-off", "vm-shut"] {
        let w = check_journal(&lab.store("ds1").join(format!("vms/{vm}/disk.img")));
        assert_eq!(w.len(), 2, "{vm}: {w:?}");
    }
    let w = check_journal(&lab.store("ds1").join("vms/vm-on/disk.img"));
    assert_eq!(w.len(), 1, "vm-on: {w:?}");
}

#[test]
fn partition_gives_two_masters_then_one_and_no_vm_runs_twice() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("pa");
    let toml = guest_vm(&lab, "vm3");
    lab.register("vm3", &toml, &[]);
    start_vm(&lab, "vm3", 1);
    wait_running(&lab, 2, "vm3", &[1], BOOT);
    lab.partition(&[&[2, 3], &[1]]);
    lab.wait("a master on each side", T, |l| {
        let a = l.status(1)?;
        let b = l.status(2)?;
        (a["host"] == "host-1" && a["state"] == "master" && b["host"] == "host-3").then_some(())
    });
    // The VM keeps running on host-1 (its lease is renewed); the other side
    // does not restart it.
    watch(&lab, "vm3", Duration::from_secs(10));
    assert_eq!(lab.running_on("vm3"), vec![1]);
    lab.heal_all();
    lab.wait("one master after healing", T, |l| {
        let ms: Vec<String> = (1..=3)
            .filter_map(|i| {
                l.status(i)
                    .map(|v| v["host"].as_str().unwrap_or("").to_string())
            })
            .collect();
        (ms.len() == 3 && ms.iter().all(|m| m == "host-3")).then_some(())
    });
    lab.wait("vm3 protected on host-1 in the healed cluster", T, |l| {
        let (st, h) = host_of(l, 3, "vm3")?;
        (st == "protected" && h == 1).then_some(())
    });
    watch(&lab, "vm3", Duration::from_secs(3));
    lab.kill_host(1);
    let w = check_journal(&lab.store("ds1").join("vms/vm3/disk.img"));
    assert_eq!(w.len(), 1, "{w:?}");
}

#[test]
fn frozen_host_returns_and_powers_off_its_stale_copy() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("fr");
    let toml = guest_vm(&lab, "vm4");
    lab.register("vm4", &toml, &[]);
    start_vm(&lab, "vm4", 1);
    wait_running(&lab, 2, "vm4", &[1], BOOT);
    assert!(lab.vmm_pid(1, "vm4").is_some());
    // host-1 hangs (every process stopped; its kernel still answers pings):
    // the master sees it unresponsive, waits for the lease to go stale, and
    // restarts the VM elsewhere.
    lab.freeze_host(1);
    let to = lab.wait("vm4 restarted on a peer", BOOT, |l| {
        let (st, h) = host_of(l, 2, "vm4")?;
        (st == "protected" && h != 1 && l.vmm_pid(h, "vm4").is_some()).then_some(h)
    });
    wait_writing(&lab, to, "vm4", 1);
    // host-1 comes back: its VMM finds the lease past its stop time / taken
    // and ends without another disk write.
    lab.thaw_host(1);
    lab.wait("the stale copy gone", T, |l| {
        l.vmm_pid(1, "vm4").is_none().then_some(())
    });
    let lease = vmm::lease::read_record(&lab.store("ds1").join("vms/vm4/lease"))
        .unwrap()
        .unwrap();
    assert_eq!(lease.owner, Some(format!("host-{to}")));
    watch(&lab, "vm4", Duration::from_secs(3));
    lab.kill_host(to);
    let w = check_journal(&lab.store("ds1").join("vms/vm4/disk.img"));
    assert_eq!(w.len(), 2, "{w:?}");
}

#[test]
fn host_that_loses_its_datastore_stops_its_vm_and_a_peer_runs_it() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("ds");
    let toml = guest_vm(&lab, "vm5");
    lab.register("vm5", &toml, &[]);
    start_vm(&lab, "vm5", 1);
    wait_running(&lab, 2, "vm5", &[1], BOOT);
    // host-1 keeps its network but loses the datastores: its VMM cannot
    // renew the lease and stops the guest at the stop time; the master
    // restarts the VM where the datastore is reachable.
    lab.cut_storage(1);
    let to = {
        let end = std::time::Instant::now() + BOOT;
        loop {
            assert_single(&lab, "vm5");
            if let Some((st, h)) = host_of(&lab, 2, "vm5") {
                if st == "protected" && h != 1 && lab.vmm_pid(h, "vm5").is_some() {
                    break h;
                }
            }
            assert!(
                std::time::Instant::now() < end,
                "vm5 not restarted\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Stopped for its lease, by the VMM itself or by its agent, whichever
    // noticed the stop time first (both count from the same renewal).
    let vmm_out = std::fs::read_to_string(lab.hosts[0].run_dir.join("vm5.out")).unwrap_or_default();
    let agent = std::fs::read_to_string(lab.hosts[0].dir.join("agent.log")).unwrap_or_default();
    assert!(
        vmm_out.contains("not renewed for 2000 ms") || agent.contains("LeaseExpiredStop"),
        "{vmm_out}\n{agent}"
    );
    wait_writing(&lab, to, "vm5", 1);
    lab.heal_storage(1);
    watch(&lab, "vm5", Duration::from_secs(3));
    lab.kill_host(to);
    let w = check_journal(&lab.store("ds1").join("vms/vm5/disk.img"));
    assert_eq!(w.len(), 2, "{w:?}");
}

/// The VMs the master ordered restarted, in the order of its log's
/// "restart ordered" lines (first order of each VM; a retry would repeat it).
fn restart_orders(master_log: &str) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for line in master_log.lines().filter(|l| l.contains("restart ordered")) {
        let vm = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("vm="))
            .unwrap_or_else(|| panic!("a restart order without its VM: {line}"));
        if !order.iter().any(|v| v == vm) {
            order.push(vm.to_string());
        }
    }
    order
}

/// H8, restart priority: four VMs run on host-1 with priorities high,
/// medium, low and disabled; host-1 dies. The master classifies it failed,
/// queues its VMs (not the disabled one) and places them in one pass,
/// highest priority first. With the default of 4 concurrent restarts per
/// host and two peers, no restart waits for a slot: the three orders go out
/// in the same pass, so what the test checks is their order in the master's
/// log, not their timing (the guests then boot at the same time and may
/// finish in any order). The names sort opposite to the priorities (the
/// runtime breaks ties by name), and the VMs are registered in yet another
/// order, so neither can pass for the priority order.
#[test]
fn failed_host_vms_restart_on_peers_by_priority_and_disabled_stays_off() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("pr");
    let vms = [
        ("b-medium", "medium"),
        ("d-disabled", "disabled"),
        ("a-low", "low"),
        ("c-high", "high"),
    ];
    for (vm, prio) in vms {
        let toml = guest_vm(&lab, vm);
        lab.register(vm, &toml, &["--priority", prio]);
        start_vm(&lab, vm, 1);
    }
    for (vm, _) in vms {
        wait_running(&lab, 2, vm, &[1], BOOT);
    }

    lab.kill_host(1);
    let restarted = ["c-high", "b-medium", "a-low"];
    let mut on = std::collections::BTreeMap::new();
    let end = std::time::Instant::now() + BOOT;
    while on.len() < restarted.len() {
        for (vm, _) in vms {
            assert_single(&lab, vm);
        }
        for vm in restarted {
            if let Some((st, h)) = host_of(&lab, 2, vm) {
                if st == "protected" && h != 1 && lab.vmm_pid(h, vm).is_some() {
                    on.insert(vm, h);
                }
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "restarted so far: {on:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (vm, h) in &on {
        wait_writing(&lab, *h, vm, 1);
    }

    // The master (host-3 throughout) ordered the restarts by priority.
    assert_eq!(lab.status(2).unwrap()["host"], "host-3");
    let log = lab.agent_log(3);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("restart ordered") || l.contains("restart queued"))
        .collect();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("RestartQueued") || l.contains("RestartOrdered"))
        .collect();
    println!("master's restart lines:\n{}", lines.join("\n"));
    assert_eq!(
        restart_orders(&log),
        restarted,
        "restart orders not by priority\n{}",
        lines.join("\n")
    );

    // The disabled VM: never queued nor ordered, runs nowhere, and stays
    // off while the others run (they have booted since: well past the
    // moment it would have been restarted).
    for (vm, _) in vms {
        watch(&lab, vm, Duration::from_secs(2));
    }
    watch(&lab, "d-disabled", Duration::from_secs(10));
    assert!(
        !lines.iter().any(|l| l.contains("vm=d-disabled")),
        "the disabled VM was queued or ordered:\n{}",
        lines.join("\n")
    );
    assert!(
        !events.iter().any(|l| l.contains("d-disabled")),
        "a restart event for the disabled VM:\n{}",
        events.join("\n")
    );
    assert_eq!(lab.running_on("d-disabled"), Vec::<usize>::new());
    let (st, h) = vm_state(&lab, 2, "d-disabled").unwrap();
    assert!(
        !["restarting", "restart_pending"].contains(&st.as_str()) && h != "host-2" && h != "host-3",
        "the disabled VM is {st} on {h}"
    );
    for (vm, h) in &on {
        assert_eq!(lab.running_on(vm), vec![*h], "{vm}");
    }

    for i in [2, 3] {
        lab.kill_host(i);
    }
    for vm in restarted {
        let w = check_journal(&lab.store("ds1").join(format!("vms/{vm}/disk.img")));
        assert_eq!(w.len(), 2, "{vm}: {w:?}");
    }
    let w = check_journal(&lab.store("ds1").join("vms/d-disabled/disk.img"));
    assert_eq!(w.len(), 1, "d-disabled: {w:?}");
}
