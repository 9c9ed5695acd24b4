//! Live migration through the HA agents, with real guests in the
//! network-namespace lab: `vigil vm migrate` moves a protected VM between
//! cluster hosts (the master plans it, the target's agent starts the
//! waiting VMM, the source's agent sends the VM, the lease moves with it),
//! `vigil cluster maintenance enter --migrate` evacuates a host the same
//! way, and the moved VM stays protected: its new host's failure restarts
//! it elsewhere.
//!
//! The guest runs the `disk-write` workload on a disk on the shared
//! datastore: its journal shows one writer (one boot) across the
//! migrations, and a second only after the failover.

use std::time::Duration;

mod common;
mod ha_lab;
use ha_lab::Lab;

use ha_lab::FAST_TIMINGS as TIMINGS;

const BOOT: Duration = common::GUEST_TIMEOUT;
const T: Duration = Duration::from_secs(60);

fn guest_vm(lab: &Lab, name: &str) -> String {
    common::disk_writer_vm(&lab.store("ds1").join("vms").join(name), name)
}

/// The master's view of `vm` (asked at host `at`): (state, host number).
fn protected_on(lab: &Lab, at: usize, vm: &str) -> Option<usize> {
    let v = lab.status(at)?;
    let p = &v["vms"][vm];
    if p["state"] != "protected" {
        return None;
    }
    p["host"].as_str()?.strip_prefix("host-")?.parse().ok()
}

/// The lease record on ds1: (owner, generation).
fn lease(lab: &Lab, vm: &str) -> (String, u64) {
    let p = lab.store("ds1").join("vms").join(vm).join("lease");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    (
        v["owner"].as_str().unwrap_or("").to_string(),
        v["generation"].as_u64().unwrap(),
    )
}

/// Journal records so far and the writers (boots) that wrote them.
fn journal(lab: &Lab, vm: &str) -> (usize, usize) {
    let (writers, records, _) =
        common::journal(&lab.store("ds1").join("vms").join(vm).join("disk.img"));
    (records, writers.len())
}

/// Waits until only host `i` runs `vm`, the master says so, and the guest
/// keeps writing its journal there.
fn settled_on(lab: &Lab, vm: &str, i: usize) {
    lab.wait(&format!("{vm} only on host-{i}, protected there"), T, |l| {
        (l.running_on(vm) == vec![i] && protected_on(l, 1, vm) == Some(i)).then_some(())
    });
    let (before, _) = journal(lab, vm);
    lab.wait(&format!("{vm}'s journal growing on host-{i}"), T, |l| {
        (journal(l, vm).0 > before + 10).then_some(())
    });
}

fn ha_migrate(lab: &Lab, at: usize, args: &[&str]) -> (bool, String) {
    let mut a = vec!["vm", "migrate"];
    a.extend_from_slice(args);
    let (ok, out, err) = lab.vigil(at, &a);
    (ok, format!("{out}{err}"))
}

#[test]
fn protected_vm_migrates_between_hosts_with_its_lease_and_stays_protected() {
    common::require_kvm();
    let _g = common::guest_lock();
    let mut lab = Lab::new("mig", 3, TIMINGS);
    lab.start_all();
    lab.wait("host-3 master", T, |l| {
        let v = l.status(1)?;
        (v["host"] == "host-3"
            && v["hosts"]["host-1"] == "slave"
            && v["hosts"]["host-2"] == "slave")
            .then_some(())
    });
    let toml = guest_vm(&lab, "mig");
    lab.register("mig", &toml, &[]);
    let mut started = false;
    for _ in 0..20 {
        let (ok, out, err) = lab.vigil(1, &["vm", "start", "mig", "--host", "host-1"]);
        if ok {
            started = true;
            break;
        }
        assert!(
            format!("{out}{err}").contains("not a live member"),
            "{out}{err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(started, "vm start mig");
    lab.wait("mig writing on host-1", BOOT, |l| {
        (l.console(1, "mig").contains("VIGIL-DISK-RESUME") && journal(l, "mig").0 > 5).then_some(())
    });
    settled_on(&lab, "mig", 1);
    let (owner, gen1) = lease(&lab, "mig");
    assert_eq!(owner, "host-1");

    // Refused, with the reason, and nothing moves: where it already runs.
    let (ok, out) = ha_migrate(&lab, 2, &["mig", "--host", "host-1"]);
    assert!(!ok && out.contains("it already runs on host-1"), "{out}");
    assert_eq!(lab.running_on("mig"), vec![1]);

    // A migration cancelled half-way (capped at 1 MB/s so it is still
    // copying): the VM keeps running on host-1 under the same lease, the
    // VMM waiting on host-2 is stopped, nothing restarts it anywhere.
    let h2 = &lab.hosts[1];
    let slow = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", h2.ns))
        .arg(env!("CARGO_BIN_EXE_vigil"))
        .args([
            "vm",
            "migrate",
            "mig",
            "--host",
            "host-2",
            "--bandwidth",
            "1",
            "--config",
        ])
        .arg(&h2.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    lab.wait("the slow migration copying", T, |l| {
        (l.running_on("mig") == vec![1, 2]).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let (ok, out, err) = lab.vigil(3, &["vm", "migrate", "mig", "--cancel"]);
    assert!(ok, "cancel: {out}{err}");
    let slow = slow.wait_with_output().unwrap();
    let slow_out = format!(
        "{}{}",
        String::from_utf8_lossy(&slow.stdout),
        String::from_utf8_lossy(&slow.stderr)
    );
    assert!(!slow.status.success(), "{slow_out}");
    eprintln!("cancelled migration:\n{slow_out}");
    assert!(
        slow_out.contains("mig keeps running on host-1"),
        "{slow_out}"
    );
    lab.wait("the waiting VMM on host-2 stopped", T, |l| {
        (l.running_on("mig") == vec![1]).then_some(())
    });
    settled_on(&lab, "mig", 1);
    assert_eq!(lease(&lab, "mig"), ("host-1".to_string(), gen1));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        lab.running_on("mig"),
        vec![1],
        "restarted after a cancelled migration"
    );
    assert_eq!(journal(&lab, "mig").1, 1);

    // host-1 -> host-2, asked at host-2 (any host may ask).
    let (ok, out) = ha_migrate(&lab, 2, &["mig", "--host", "host-2"]);
    assert!(ok, "vm migrate: {out}\n{}", lab.logs());
    eprintln!("vigil vm migrate mig --host host-2:\n{out}");
    assert!(
        out.contains("migrated: total") && out.contains("mig runs on host-2"),
        "{out}"
    );
    settled_on(&lab, "mig", 2);
    let (owner, gen2) = lease(&lab, "mig");
    assert_eq!(
        (owner.as_str(), gen2),
        ("host-2", gen1 + 1),
        "the lease moved with the VM"
    );
    // The same boot kept writing: one writer, no restart anywhere.
    assert_eq!(
        journal(&lab, "mig").1,
        1,
        "the guest rebooted or a second copy wrote"
    );
    assert!(
        !lab.console(2, "mig").contains("VIGIL-DISK-RESUME"),
        "the guest booted again on host-2"
    );
    // The source's agent knows it is gone; nobody restarts it.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(lab.running_on("mig"), vec![2]);
    assert_eq!(protected_on(&lab, 1, "mig"), Some(2));

    // Maintenance mode with --migrate evacuates host-2 by live migration.
    let (ok, out, err) = lab.vigil(
        1,
        &["cluster", "maintenance", "enter", "host-2", "--migrate"],
    );
    assert!(
        ok,
        "maintenance enter --migrate: {out}{err}\n{}",
        lab.logs()
    );
    assert!(out.contains("host-2: in maintenance"), "{out}");
    let now_on = lab.wait("mig evacuated from host-2", T, |l| {
        let on = l.running_on("mig");
        (on.len() == 1 && on[0] != 2).then(|| on[0])
    });
    settled_on(&lab, "mig", now_on);
    assert_eq!(
        journal(&lab, "mig").1,
        1,
        "the evacuation rebooted the guest"
    );
    assert_eq!(lease(&lab, "mig"), (format!("host-{now_on}"), gen1 + 2));

    // Still protected where it went: that host's failure restarts it on
    // the remaining one (host-2 is in maintenance).
    let other = if now_on == 1 { 3 } else { 1 };
    lab.kill_host(now_on);
    // (host `other` may hold the console of an earlier run: the journal
    // says when the restarted guest writes.)
    lab.wait(
        "mig restarted after its host died, writing",
        BOOT + T,
        |l| (l.running_on("mig") == vec![other] && journal(l, "mig").1 == 2).then_some(()),
    );
    lab.wait("mig protected on its new host", T, |l| {
        (protected_on(l, other, "mig") == Some(other)).then_some(())
    });
}

/// A VM started by hand on host-1, outside the cluster, comes in by live
/// migration: admission control refuses it with the arithmetic while its
/// reservation breaks the policy (the VM keeps running where it was),
/// admits it once the reservation fits, and the cluster protects it on
/// host-2 from then on with a lease the target acquired.
#[test]
fn vm_from_outside_the_cluster_comes_in_under_admission_control() {
    common::require_kvm();
    let _g = common::guest_lock();
    let mut lab = Lab::new("min", 3, TIMINGS);
    // 3 hosts of 4000 MHz: at most 4800 MHz may be reserved.
    lab.set_cluster_key(
        "admission",
        serde_json::json!({"percentage_reserved": {"cpu_pct": 60, "mem_pct": 0}}),
    );
    lab.start_all();
    lab.wait("host-3 master", T, |l| {
        let v = l.status(1)?;
        (v["host"] == "host-3"
            && v["hosts"]["host-1"] == "slave"
            && v["hosts"]["host-2"] == "slave")
            .then_some(())
    });
    let toml = guest_vm(&lab, "out");
    lab.register("out", &toml, &["--cpu-mhz", "6000", "--mem-mib", "128"]);
    // Started by hand in host-1's network namespace: no agent knows it.
    let h1 = &lab.hosts[0];
    let sock = h1.dir.join("out-by-hand.sock");
    let console = h1.dir.join("out-by-hand.console");
    let mut vmm = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", h1.ns))
        .arg(env!("CARGO_BIN_EXE_vigil"))
        .args(["run", "--config"])
        .arg(lab.store("ds1").join("vms/out/vm.toml"))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    lab.wait("the hand-started guest writing", BOOT, |l| {
        let c = std::fs::read_to_string(&console).unwrap_or_default();
        (c.contains("VIGIL-DISK-RESUME") && journal(l, "out").0 > 5).then_some(())
    });
    let sock_s = sock.to_str().unwrap();

    // 6000 MHz would leave (1 - 6000/12000) = 50 % free: refused, and the
    // VM keeps running outside.
    let (ok, out) = ha_migrate(
        &lab,
        1,
        &["out", "--api-socket", sock_s, "--host", "host-2"],
    );
    assert!(!ok, "{out}");
    eprintln!("refused migration into the cluster:\n{out}");
    assert!(
        out.contains("admission control") && out.contains("(1 - 6000/12000 MHz) = 50% (need 60%)"),
        "{out}"
    );
    assert!(vmm.try_wait().unwrap().is_none(), "the refused VM stopped");
    assert!(lab.running_on("out").is_empty());

    // A reservation that fits: admitted, migrated, protected on host-2.
    let (ok, out, err) = lab.vigil(1, &["vm", "set", "out", "--cpu-mhz", "1000"]);
    assert!(ok, "{out}{err}");
    let mut moved = (false, String::new());
    for _ in 0..10 {
        // The master reads the new settings at its next scan (3 s).
        moved = ha_migrate(
            &lab,
            1,
            &["out", "--api-socket", sock_s, "--host", "host-2"],
        );
        if moved.0 || !moved.1.contains("6000") {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(moved.0, "{}\n{}", moved.1, lab.logs());
    assert!(moved.1.contains("out runs on host-2"), "{}", moved.1);
    let status = lab.wait("the hand-started VMM gone", T, |_| vmm.try_wait().unwrap());
    assert!(status.success(), "the source VMM ended with {status}");
    settled_on(&lab, "out", 2);
    let (owner, _) = lease(&lab, "out");
    assert_eq!(owner, "host-2");
    assert_eq!(
        journal(&lab, "out").1,
        1,
        "the guest rebooted or a second copy wrote"
    );
}
