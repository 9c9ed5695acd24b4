//! End-to-end tests of the lease's pause (H10) with real agents and real
//! guests in the namespace lab (`tests/ha_lab`): a host whose datastore
//! access is cut cannot renew its VM's lease, so its VMM parks the guest at
//! the stop time (lease-suspended) instead of killing it.
//!
//! - A stall shorter than the agent's outage limit (`stop_time + 2 x
//!   takeover_time`) and with nobody restarting the VM: the guest resumes in
//!   place once the VMM has re-acquired its lease (next generation), same
//!   process, same boot, its disk journal carrying on.
//! - A long stall while the host's agent is dead: the master restarts the VM
//!   on a peer (the lease lapsed); the paused copy on the cut host never
//!   writes, and when its storage returns it finds the lease taken and
//!   powers itself off. The journal shows two writers, one after the other.

use std::time::{Duration, Instant};

mod common;
mod ha_lab;
use ha_lab::Lab;

/// Fast detection for tests; the lease keeps its pause default.
const TIMINGS: &str = "heartbeat_interval_ms = 200\nhost_timeout_ms = 1000\n\
    election_window_ms = 1000\nisolation_detect_ms = 2000\nping_timeout_ms = 500\n\
    ds_heartbeat_interval_ms = 300\nds_liveness_timeout_ms = 1500\n\
    restart_retry_base_ms = 1000\nshutdown_timeout_ms = 5000\n\
    lease_renew_interval_ms = 500\nlease_io_timeout_ms = 500\nlease_kill_time_ms = 500\n\
    lease_stop_time_ms = 2000\nlease_takeover_time_ms = 3000";

const BOOT: Duration = common::GUEST_TIMEOUT;
const T: Duration = Duration::from_secs(60);

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

fn guest_vm(lab: &Lab, name: &str) -> String {
    common::disk_writer_vm(&lab.store("ds1").join("vms").join(name), name)
}

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

fn console(lab: &Lab, i: usize, vm: &str) -> String {
    std::fs::read_to_string(lab.hosts[i - 1].run_dir.join(format!("{vm}.console")))
        .unwrap_or_default()
}

/// Waits until the guest on host `i` has started its disk journal `n` times.
fn wait_writing(lab: &Lab, i: usize, vm: &str, n: usize) {
    lab.wait(&format!("{vm}'s disk writer on host-{i}"), BOOT, |l| {
        (console(l, i, vm).matches("VIGIL-DISK-RESUME").count() >= n).then_some(())
    });
}

/// The VMM's own view (`GET /vm`) on host `i`.
fn vmm_state(lab: &Lab, i: usize, vm: &str) -> Option<String> {
    let sock = lab.hosts[i - 1].run_dir.join(format!("{vm}.sock"));
    let v = vmm::api::client::call(&sock, "GET", "/vm", None, Duration::from_secs(2)).ok()?;
    v["state"].as_str().map(str::to_string)
}

fn lease(lab: &Lab, vm: &str) -> vmm::lease::LeaseRecord {
    vmm::lease::read_record(&lab.store("ds1").join(format!("vms/{vm}/lease")))
        .unwrap()
        .unwrap()
}

#[test]
fn a_short_storage_stall_pauses_the_guest_which_resumes_in_place() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("lp-short");
    let toml = guest_vm(&lab, "vm1");
    lab.register("vm1", &toml, &[]);
    start_vm(&lab, "vm1", 1);
    wait_writing(&lab, 1, "vm1", 1);
    let pid = lab.vmm_pid(1, "vm1").unwrap();
    let before = lease(&lab, "vm1");
    let disk = lab.store("ds1").join("vms/vm1/disk.img");

    let cut = Instant::now();
    lab.cut_storage(1);
    lab.wait(
        "vm1 lease-suspended on host-1",
        Duration::from_secs(10),
        |l| (vmm_state(l, 1, "vm1").as_deref() == Some("lease-suspended")).then_some(()),
    );
    let (_, at_pause, _) = common::journal(&disk);
    // The stall lasts 3 s: past the stop time (2 s), far below the agent's
    // outage limit (2 s + 2 x 3 s), and nobody is told to restart the VM.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(cut.elapsed()));
    assert_eq!(
        common::journal(&disk).1,
        at_pause,
        "the journal grew while lease-suspended"
    );
    lab.heal_storage(1);
    let back = Instant::now();
    lab.wait("vm1 running again on host-1", T, |l| {
        assert!(
            l.running_on("vm1") == vec![1],
            "vm1 runs on {:?}",
            l.running_on("vm1")
        );
        (vmm_state(l, 1, "vm1").as_deref() == Some("running")).then_some(())
    });
    // Re-acquired as a peer would: unchanged for the takeover time, then
    // the next generation.
    assert!(
        back.elapsed() >= Duration::from_millis(3000),
        "{:?}",
        back.elapsed()
    );
    let after = lease(&lab, "vm1");
    assert_eq!(after.owner.as_deref(), Some("host-1"));
    assert_eq!(
        after.generation,
        before.generation + 1,
        "{before:?} {after:?}"
    );
    // Same process, same boot: the journal carries on with one writer.
    assert_eq!(lab.vmm_pid(1, "vm1"), Some(pid));
    lab.wait("journal records after the resume", T, |_| {
        (common::journal(&disk).1 >= at_pause + 5).then_some(())
    });
    let (writers, _, _) = common::journal(&disk);
    assert_eq!(writers.len(), 1, "the guest was restarted");
    assert_eq!(
        console(&lab, 1, "vm1").matches("VIGIL-DISK-RESUME").count(),
        1
    );
    // The cluster still has it protected on host-1; the agent renewals
    // resumed and no restart was ordered.
    lab.wait("vm1 protected on host-1", T, |l| {
        let v = l.status(2)?;
        (v["vms"]["vm1"]["state"] == "protected" && v["vms"]["vm1"]["host"] == "host-1")
            .then_some(())
    });
    let agent = std::fs::read_to_string(lab.hosts[0].dir.join("agent.log")).unwrap();
    assert!(!agent.contains("LeaseExpiredStop"), "{agent}");
    assert_eq!(lab.running_on("vm1"), vec![1]);
}

#[test]
fn a_paused_copy_whose_vm_was_restarted_elsewhere_powers_off_when_storage_returns() {
    let _g = common::guest_lock();
    let mut lab = start_cluster("lp-long");
    let toml = guest_vm(&lab, "vm2");
    lab.register("vm2", &toml, &[]);
    start_vm(&lab, "vm2", 1);
    wait_writing(&lab, 1, "vm2", 1);
    let stale = lab.vmm_pid(1, "vm2").unwrap();
    let disk = lab.store("ds1").join("vms/vm2/disk.img");

    // host-1's agent dies and its storage goes: nobody on host-1 can stop
    // the VM but its VMM, which pauses it at the stop time. The master finds
    // host-1 unresponsive and restarts the VM once its lease has lapsed.
    lab.kill_agent(1);
    lab.cut_storage(1);
    let to = lab.wait("vm2 restarted on a peer", BOOT, |l| {
        let on = l.running_on("vm2");
        if on.len() > 1 {
            // Two processes, but the old one must be parked.
            assert_eq!(
                vmm_state(l, 1, "vm2").as_deref(),
                Some("lease-suspended"),
                "vm2 runs on {on:?}"
            );
        }
        on.into_iter().find(|&h| h != 1)
    });
    wait_writing(&lab, to, "vm2", 1);
    assert_eq!(lab.vmm_pid(1, "vm2"), Some(stale));
    assert_eq!(
        vmm_state(&lab, 1, "vm2").as_deref(),
        Some("lease-suspended")
    );
    let taken = lease(&lab, "vm2");
    assert_eq!(taken.owner, Some(format!("host-{to}")));

    // Storage returns: the paused copy reads the new owner and powers off
    // without a write.
    lab.heal_storage(1);
    lab.wait("the stale copy on host-1 gone", T, |l| {
        l.vmm_pid(1, "vm2").is_none().then_some(())
    });
    let out = std::fs::read_to_string(lab.hosts[0].run_dir.join("vm2.out")).unwrap_or_default();
    assert!(
        out.contains(&format!(
            "lease taken by host-{to} generation {}",
            taken.generation
        )),
        "{out}"
    );
    let now = lease(&lab, "vm2");
    assert_eq!(now.owner, Some(format!("host-{to}")));
    assert_eq!(now.generation, taken.generation);
    lab.wait("journal records from the new copy", T, |_| {
        (common::journal(&disk).0.len() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    lab.kill_host(to);
    let (writers, _, _) = common::journal(&disk);
    assert_eq!(writers.len(), 2);
}
