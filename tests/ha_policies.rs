//! End-to-end tests of the HA policies carried out by real agents in the
//! lab (`tests/ha_lab`): admission control refuses an operator power-on
//! that would break the cluster's policy, with the arithmetic, and `cluster
//! status` shows the capacity under that policy. No guest boots here: the
//! refused VM never starts (the test fails if it does).

use std::time::Duration;

mod ha_lab;
use ha_lab::Lab;

/// Fast timings for tests only (the lease timings validate).
const TIMINGS: &str = "heartbeat_interval_ms = 200\nhost_timeout_ms = 1000\n\
    election_window_ms = 1000\nisolation_detect_ms = 2000\nping_timeout_ms = 500\n\
    ds_heartbeat_interval_ms = 300\nds_liveness_timeout_ms = 1500\n\
    lease_renew_interval_ms = 500\nlease_io_timeout_ms = 500\nlease_kill_time_ms = 500\n\
    lease_stop_time_ms = 2000\nlease_takeover_time_ms = 3000";

const T: Duration = Duration::from_secs(60);

/// Sets the cluster's admission policy in the cluster file the agents read
/// at start (what `cluster init` would have copied from cluster.toml).
fn set_admission(lab: &Lab, policy: serde_json::Value) {
    let f = lab.store("ds1").join(".vigil/cluster.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    c["admission"] = policy;
    std::fs::write(&f, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
}

#[test]
fn a_power_on_that_breaks_the_admission_policy_is_refused_with_the_arithmetic() {
    let mut lab = Lab::new("adm", 2, TIMINGS);
    // Two hosts of 4000 MHz / 1024 MiB; 70 % of the CPU must stay free.
    set_admission(
        &lab,
        serde_json::json!({"percentage_reserved": {"cpu_pct": 70, "mem_pct": 10}}),
    );
    lab.start_all();
    lab.wait("host-2 master with host-1 a slave", T, |l| {
        let v = l.status(1)?;
        (v["host"] == "host-2" && v["hosts"]["host-1"] == "slave").then_some(())
    });

    // The capacity report under the active policy, as the CLI prints it,
    // once the master counts both hosts.
    let out = lab.wait("both hosts in the capacity report", T, |l| {
        let (ok, out, _) = l.vigil(1, &["cluster", "status"]);
        (ok && out.contains("8000 MHz / 2048 MiB on 2 host(s)")).then_some(out)
    });
    assert!(out.contains("CAPACITY"), "no capacity report:\n{out}");
    assert!(
        out.contains("percentage reserved (CPU 70%"),
        "the active policy is not shown:\n{out}"
    );

    // 3000 MHz would fit on either host, but leaves 5000 of 8000 MHz
    // (62.5 %) unreserved, under the 70 % the policy keeps.
    let cfg = common_vm(&lab, "big");
    lab.register("big", &cfg, &["--cpu-mhz", "3000", "--mem-mib", "100"]);
    let mut refusal = String::new();
    for _ in 0..20 {
        let (ok, out, err) = lab.vigil(1, &["vm", "start", "big", "--host", "host-1"]);
        assert!(!ok, "the power-on was accepted:\n{out}{err}");
        refusal = format!("{out}{err}");
        if !refusal.contains("not a live member") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("refused as expected: {refusal}");
    assert!(
        refusal.contains("admission control (percentage reserved)"),
        "{refusal}"
    );
    assert!(
        refusal.contains("3000") && refusal.contains("8000") && refusal.contains("70"),
        "the refusal does not show the arithmetic: {refusal}"
    );
    // Nothing started anywhere.
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.running_on("big").is_empty(), "{}", lab.logs());
    let v = lab.status(1).unwrap();
    assert_ne!(v["vms"]["big"]["state"], "protected", "{v}");
}

/// A registrable VM config (its files exist; it is never started here).
fn common_vm(lab: &Lab, name: &str) -> String {
    let dir = lab.store("ds1").join("vms").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = lab.root.join("vmlinux-placeholder");
    std::fs::write(&kernel, b"never booted").unwrap();
    format!("name = {name:?}\nvcpus = 1\nmemory = \"128M\"\nkernel = {kernel:?}\n")
}
