//! End-to-end tests of the HA agents as real processes, one network
//! namespace per host (`tests/ha_lab`): election, redirection to the master,
//! authentication, a new master when the master dies, a partition that gives
//! two masters and one after healing. No guests here (see `ha_failover.rs`).

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

fn master_seen_by(lab: &Lab, i: usize) -> Option<String> {
    let v = lab.status(i)?;
    (v["state"] == "master").then(|| v["host"].as_str().unwrap_or("").to_string())
}

fn local_state(lab: &Lab, i: usize) -> Option<String> {
    // `vigil cluster status` answers from the master; a host's own view is
    // in the master's table.
    let v = lab.status(i)?;
    v["hosts"][format!("host-{i}")].as_str().map(str::to_string)
}

#[test]
fn election_redirects_failover_of_master_and_partition() {
    let mut lab = Lab::new("el", 3, TIMINGS);
    lab.start_all();
    // Equal datastores: the lexically highest id wins; every host's CLI is
    // answered by it.
    for i in 1..=3 {
        let m = lab.wait("a master", T, |l| master_seen_by(l, i));
        assert_eq!(m, "host-3", "asked at host-{i}");
    }
    lab.wait("all three in the master's table", T, |l| {
        let v = l.status(1)?;
        (v["hosts"]["host-1"] == "slave" && v["hosts"]["host-2"] == "slave").then_some(())
    });

    // A rogue with another secret is refused.
    let rogue = lab.root.join("rogue-secret");
    std::fs::write(&rogue, "0123456789abcdef0123456789abcdef-rogue").unwrap();
    let cfg = std::fs::read_to_string(&lab.hosts[0].config).unwrap();
    let rogue_cfg = lab.root.join("rogue.toml");
    std::fs::write(
        &rogue_cfg,
        cfg.replace(
            &format!("{:?}", lab.root.join("secret")),
            &format!("{rogue:?}"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.hosts[0].ns))
        .arg(env!("CARGO_BIN_EXE_vigil"))
        .args(["cluster", "status", "--config"])
        .arg(&rogue_cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");

    // The master dies: the next best (host-2) takes over.
    lab.kill_host(3);
    let m = lab.wait("a new master", T, |l| master_seen_by(l, 1));
    assert_eq!(m, "host-2");
    lab.wait("host-3 seen as failed or unresponsive", T, |l| {
        let s = l.status(1)?;
        let st = s["hosts"]["host-3"].as_str()?.to_string();
        (st == "failed").then_some(())
    });
    // It comes back and joins as a slave: no second election.
    lab.start_agent(3);
    lab.wait("host-3 back as a slave", T, |l| {
        (local_state(l, 3)? == "slave").then_some(())
    });
    assert_eq!(master_seen_by(&lab, 3).as_deref(), Some("host-2"));

    // Partition {1} | {2, 3}: a master on each side.
    lab.partition(&[&[2, 3], &[1]]);
    lab.wait("host-1 master of its side", T, |l| {
        let v = l.status(1)?;
        (v["host"] == "host-1" && v["state"] == "master").then_some(())
    });
    assert_eq!(master_seen_by(&lab, 2).as_deref(), Some("host-2"));
    // host-2 sees host-1 partitioned (pings answer? no: different switch;
    // the datastore heartbeat is alive): not failed, so nothing of it restarts.
    lab.wait("host-1 classified by host-2", T, |l| {
        let st = l.status(2)?["hosts"]["host-1"].as_str()?.to_string();
        (st == "isolated" || st == "partitioned").then_some(())
    });
    // Heal: one master.
    lab.heal_all();
    lab.wait("a single master after healing", T, |l| {
        let masters: Vec<String> = (1..=3).filter_map(|i| master_seen_by(l, i)).collect();
        (masters.len() == 3 && masters.iter().all(|m| m == "host-2")).then_some(())
    });

    // The lab's datastore cut is for that host only: it reads nothing and
    // cannot write, the others are unaffected; healing restores it.
    let dirs: Vec<_> = lab.hosts.iter().map(|h| h.dir.join("ds/ds1")).collect();
    let own = |i: usize| dirs[i - 1].clone();
    assert!(own(1).join(".vigil/cluster.json").exists());
    lab.cut_storage(1);
    assert!(!own(1).join(".vigil/cluster.json").exists());
    assert!(std::fs::write(own(1).join("probe"), b"x").is_err());
    assert!(own(2).join(".vigil/cluster.json").exists());
    lab.wait(
        "host-1's heartbeat record going stale while host-2's moves",
        T,
        |l| {
            let hb =
                |i: usize| std::fs::read(l.store("ds1").join(format!(".vigil/hb/host-{i}.json")));
            let (a1, b1) = (hb(1).ok()?, hb(2).ok()?);
            std::thread::sleep(Duration::from_millis(1500));
            let (a2, b2) = (hb(1).ok()?, hb(2).ok()?);
            (a1 == a2 && b1 != b2).then_some(())
        },
    );
    lab.heal_storage(1);
    assert!(own(1).join(".vigil/cluster.json").exists());
}
