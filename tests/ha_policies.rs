//! End-to-end tests of the HA policies carried out by real agents in the
//! lab (`tests/ha_lab`):
//!
//! - admission control refuses an operator power-on that would break the
//!   cluster's policy, with the arithmetic, and `cluster status` shows the
//!   capacity under that policy (no guest boots: the refused VM never
//!   starts, and the test fails if it does);
//! - `vigil vm set`: a reservation increase of a running VM that would
//!   break the policy is refused with the arithmetic (registration and VM
//!   unchanged); one that fits is accepted, counts in `cluster status` and
//!   makes a later power-on break the policy (one VMM starts, its guest
//!   need not finish booting);
//! - maintenance mode: refused by admission control with the arithmetic,
//!   refused while a VM runs on the host, accepted with `--power-off`; the
//!   host shows `maintenance` and a power-on there is refused; `exit`
//!   brings it back (one VMM starts, its guest need not finish booting);
//! - VM monitoring through the agents, with real guests whose tools daemon
//!   really dies (the `stop-tools` workload SIGKILLs it in every boot): an
//!   idle guest is reset after the failure interval, at most 3 times in the
//!   reset window, then left alone and reported; a guest that keeps writing
//!   to its disk is not reset;
//! - application monitoring: a guest whose application stops heartbeating
//!   (`app-heartbeat` workload with a count) is reset, its tools still up.
//!
//! Monitoring uses short custom timings: a 30 s grace period, a 10 s
//! failure interval and a 10 s I/O window. A heartbeat is monitored only
//! once seen since the (re)start, so a cold boot that takes minutes on a
//! busy nested-KVM host is not reset for the tools' silence.

use std::time::{Duration, Instant};

mod common;
mod ha_lab;
use ha_lab::Lab;
use serde_json::{json, Value};

/// Fast timings for tests only (the lease timings validate).
const TIMINGS: &str = "heartbeat_interval_ms = 200\nhost_timeout_ms = 1000\n\
    election_window_ms = 1000\nisolation_detect_ms = 2000\nping_timeout_ms = 500\n\
    ds_heartbeat_interval_ms = 300\nds_liveness_timeout_ms = 1500\n\
    lease_renew_interval_ms = 500\nlease_io_timeout_ms = 500\nlease_kill_time_ms = 500\n\
    lease_stop_time_ms = 2000\nlease_takeover_time_ms = 3000";

const T: Duration = Duration::from_secs(60);

/// Monitoring timings (see the module comment).
const GRACE_S: u64 = 30;
const FAILURE_S: u64 = 10;
const IO_WINDOW_S: u64 = 10;
/// The tools daemon dies this long after the workloads start (right after
/// the boot marker): past the tools' first heartbeats.
const KILL_AFTER_S: u64 = 15;

/// Sets the cluster's admission policy in the cluster file the agents read
/// at start (what `cluster init` would have copied from cluster.toml).
fn set_admission(lab: &Lab, policy: Value) {
    lab.set_cluster_key("admission", policy);
}

/// Monitoring settings with the short test timings.
fn monitoring(mode: &str) -> Value {
    json!({
        "mode": mode,
        "sensitivity": {"custom": {"failure_interval": FAILURE_S, "reset_window": 3600}},
        "io_window": IO_WINDOW_S,
        "grace_period": GRACE_S,
        "max_resets": 3,
    })
}

/// Starts the lab's agents and waits for a master with every other host
/// its slave, counted in its capacity; returns the master's index.
fn start(lab: &mut Lab) -> usize {
    lab.start_all();
    let n = lab.hosts.len();
    lab.wait("a master with every other host its slave", T, |l| {
        let v = l.status(1)?;
        let m: usize = v["master"].as_str()?.strip_prefix("host-")?.parse().ok()?;
        // ... and counts them all (a slave is a placement candidate once
        // the master has heard it follow).
        let all = format!("on {n} host(s)");
        ((1..=n)
            .filter(|&i| i != m)
            .all(|i| v["hosts"][format!("host-{i}")] == "slave")
            && v["capacity"]["text"].as_str()?.contains(&all))
        .then_some(m)
    })
}

/// A real guest VM on ds1 with the tools channel (vsock), the given
/// workloads and, if `disk`, a 4 MiB disk on the datastore.
fn guest_vm(lab: &Lab, name: &str, run: &str, disk: bool) -> String {
    let cfg = common::guest_config();
    let out = cfg.parent().unwrap().join("out");
    let dir = lab.store("ds1").join("vms").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut toml = format!(
        "name = {name:?}\nvcpus = 1\nmemory = \"128M\"\nkernel = {:?}\ninitrd = {:?}\n\
         cmdline = {:?}\n[vsock]\ncid = 3\nsocket = \"unused.vsock\"\n",
        out.join("vmlinux"),
        out.join("initramfs.cpio"),
        common::guest_cmdline(&format!("vigil.run={run}")),
    );
    if disk {
        let f = std::fs::File::create(dir.join("disk.img")).unwrap();
        f.set_len(4 << 20).unwrap();
        toml.push_str("[[disks]]\npath = \"disk.img\"\n");
    }
    toml
}

/// Powers `vm` on at host `i` through the cluster (retrying while the
/// master has not yet heard host `i` as its slave).
fn start_vm(lab: &Lab, vm: &str, i: usize) {
    let h = format!("host-{i}");
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

fn count(s: &str, needle: &str) -> usize {
    s.matches(needle).count()
}

/// Milliseconds since the VMM last heard the guest's tools (None: never,
/// or the API did not answer).
fn ms_since_tools(lab: &Lab, i: usize, vm: &str) -> Option<u64> {
    let hb = vmm::api::client::call(
        &lab.api_socket(i, vm),
        "GET",
        "/vm/heartbeat",
        None,
        Duration::from_secs(5),
    )
    .ok()?;
    hb["ms_since_tools_heartbeat"].as_u64()
}

/// Resets the VMM of `vm` on host `i` carried out for VM monitoring, as
/// its log records them (with the reason).
fn vmm_resets(lab: &Lab, i: usize, vm: &str) -> usize {
    let log = std::fs::read_to_string(lab.hosts[i - 1].run_dir.join(format!("{vm}.log")))
        .unwrap_or_default();
    log.lines()
        .filter(|l| {
            l.contains("guest reset from the host; booting it again")
                && l.contains("reason=VM monitoring: no ")
        })
        .count()
}

/// What `cluster status --json` reports VM monitoring did to `vm`.
fn monitoring_record(lab: &Lab, vm: &str) -> Option<Value> {
    let v = lab.status(1)?;
    let r = v["monitoring"][vm].clone();
    (!r.is_null()).then_some(r)
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

/// Maintenance mode through the real agents. Two hosts of 4000 MHz; the
/// policy keeps 60 % of the CPU free; VM `web` reserves 2000 MHz and runs
/// on host-1 (8000 MHz in all: 75 % free).
#[test]
fn maintenance_is_refused_by_admission_with_the_arithmetic_and_a_host_in_it_runs_no_vms() {
    let _g = common::guest_lock();
    let mut lab = Lab::new("mnt", 2, TIMINGS);
    set_admission(
        &lab,
        json!({"percentage_reserved": {"cpu_pct": 60, "mem_pct": 0}}),
    );
    start(&mut lab);
    let toml = guest_vm(&lab, "web", "counter:every=60", false);
    lab.register("web", &toml, &["--cpu-mhz", "2000", "--mem-mib", "128"]);
    start_vm(&lab, "web", 1);
    lab.wait("web's VMM on host-1", T, |l| l.vmm_pid(1, "web"));
    lab.wait("web protected on host-1", T, |l| {
        let v = l.status(2)?;
        (v["vms"]["web"]["state"] == "protected" && v["vms"]["web"]["host"] == "host-1")
            .then_some(())
    });

    // host-2 out: host-1 alone keeps (1 - 2000/4000) = 50 % < 60 %.
    let (ok, out, err) = lab.vigil(2, &["cluster", "maintenance", "enter", "host-2"]);
    let msg = format!("{out}{err}");
    eprintln!("host-2 refused: {msg}");
    assert!(!ok, "maintenance accepted: {msg}");
    assert!(
        msg.contains("host host-2 cannot enter maintenance mode: without it, admission control (percentage reserved)")
            && msg.contains("(1 - 2000/4000 MHz) = 50% (need 60%)"),
        "the refusal does not show the arithmetic: {msg}"
    );
    // host-1 out with web moved to host-2: the same arithmetic.
    let (ok, out, err) = lab.vigil(2, &["cluster", "maintenance", "enter", "host-1"]);
    let msg = format!("{out}{err}");
    assert!(
        !ok && msg.contains("(1 - 2000/4000 MHz) = 50% (need 60%)"),
        "{msg}"
    );
    let v = lab.status(1).unwrap();
    assert_ne!(v["hosts"]["host-1"], "maintenance", "{v}");
    assert_ne!(v["hosts"]["host-2"], "maintenance", "{v}");
    assert_eq!(lab.running_on("web"), vec![1]);

    // With --power-off, web no longer counts: host-1 may go; web is
    // powered off first (unprotected, as `vm stop` does).
    let (ok, out, err) = lab.vigil(
        1,
        &["cluster", "maintenance", "enter", "host-1", "--power-off"],
    );
    let msg = format!("{out}{err}");
    eprintln!("host-1 with --power-off: {msg}");
    assert!(ok, "maintenance with --power-off refused: {msg}");
    assert!(msg.contains("powered off web"), "{msg}");
    assert!(lab.running_on("web").is_empty(), "{}", lab.logs());
    let v = lab.wait("host-1 in maintenance", T, |l| {
        let v = l.status(2)?;
        (v["hosts"]["host-1"] == "maintenance").then_some(v)
    });
    assert_ne!(v["vms"]["web"]["state"], "protected", "{v}");
    let (_, text, _) = lab.vigil(2, &["cluster", "status"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("host-1") && l.contains("maintenance")),
        "{text}"
    );

    // A power-on there is refused, saying why; nothing starts.
    let (ok, out, err) = lab.vigil(2, &["vm", "start", "web", "--host", "host-1"]);
    let msg = format!("{out}{err}");
    assert!(!ok, "{msg}");
    assert!(msg.contains("host host-1 is in maintenance mode"), "{msg}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.running_on("web").is_empty());
    // Maintenance survives an agent restart.
    lab.kill_agent(1);
    lab.start_agent(1);
    std::thread::sleep(Duration::from_secs(5));
    lab.wait(
        "host-1 still in maintenance after its agent restarted",
        T,
        |l| {
            let v = l.status(2)?;
            (v["hosts"]["host-1"] == "maintenance").then_some(())
        },
    );

    // Out of maintenance: a slave again, and web may run there again.
    let (ok, out, err) = lab.vigil(2, &["cluster", "maintenance", "exit", "host-1"]);
    assert!(ok, "{out}{err}");
    lab.wait("host-1 a slave again, counted in the capacity", T, |l| {
        let v = l.status(2)?;
        (v["hosts"]["host-1"] == "slave"
            && v["capacity"]["text"]
                .as_str()?
                .contains("8000 MHz / 2048 MiB on 2 host(s)"))
        .then_some(())
    });
    start_vm(&lab, "web", 1);
    lab.wait("web's VMM on host-1 again", T, |l| l.vmm_pid(1, "web"));

    // Without a policy in the way, a host running a VM still refuses
    // maintenance without --power-off, naming the VM; web keeps running.
    // (The policy is read at agent start; the VMM is adopted.)
    lab.kill_agent(1);
    lab.kill_agent(2);
    set_admission(&lab, json!("disabled"));
    start(&mut lab);
    let (ok, out, err) = lab.vigil(2, &["cluster", "maintenance", "enter", "host-1"]);
    let msg = format!("{out}{err}");
    eprintln!("host-1 running web: {msg}");
    assert!(!ok, "{msg}");
    assert!(
        msg.contains("host host-1 cannot enter maintenance mode while VMs run on it (web)"),
        "{msg}"
    );
    assert_eq!(lab.running_on("web"), vec![1]);
    assert_eq!(lab.status(2).unwrap()["hosts"]["host-1"], "slave");
}

/// The console of boot `n` (1-based) of a guest whose console holds
/// several boots (a reset keeps the console file and the VMM).
fn boot_segment(console: &str, n: usize) -> Option<&str> {
    console.split("VIGIL-BOOT-OK").nth(n)
}

#[test]
fn vm_monitoring_resets_an_idle_guest_whose_tools_died_at_most_three_times() {
    let _g = common::guest_lock();
    let mut lab = Lab::new("mon", 2, TIMINGS);
    lab.set_cluster_key("monitoring", json!({ "hung": monitoring("vm") }));
    let master = start(&mut lab);
    let i = if master == 1 { 2 } else { 1 };
    let toml = guest_vm(
        &lab,
        "hung",
        &format!("stop-tools:after={KILL_AFTER_S}"),
        false,
    );
    lab.register("hung", &toml, &[]);
    start_vm(&lab, "hung", i);
    let pid = lab.wait("hung's VMM", T, |l| l.vmm_pid(i, "hung"));

    let mut resets_at = Vec::new();
    for n in 1..=3 {
        // The tools came up in this boot, then the workload killed them.
        let killed = lab.wait(
            &format!("boot {n}: tools up, then killed"),
            common::GUEST_TIMEOUT,
            |l| {
                let c = l.console(i, "hung");
                let seg = boot_segment(&c, n)?;
                let up = seg.find("VIGIL-TOOLS-CONNECTED")?;
                (seg[up..].contains("VIGIL-TOOLS-KILLED") && count(&c, "VIGIL-BOOT-OK") == n)
                    .then(Instant::now)
            },
        );
        if n == 1 {
            // The daemon is really gone: the VMM hears nothing from it.
            lab.wait("the tools heartbeat to stop", T, |l| {
                ms_since_tools(l, i, "hung").filter(|ms| *ms >= 3000)
            });
        }
        // Reset: the VMM boots the guest again, in the same process.
        lab.wait(&format!("reset {n}"), Duration::from_secs(120), |l| {
            (vmm_resets(l, i, "hung") >= n).then_some(())
        });
        let after = killed.elapsed();
        eprintln!("reset {n}: {after:?} after the kill was seen");
        assert!(
            after >= Duration::from_secs(FAILURE_S - 1),
            "reset {n} only {after:?} after the tools died"
        );
        assert!(
            after <= Duration::from_secs(FAILURE_S + 20),
            "reset {n} {after:?} after the tools died"
        );
        resets_at.push(Instant::now());
        assert_eq!(lab.vmm_pid(i, "hung"), Some(pid), "not a reset in place");
        let rec = lab.wait("the reset in cluster status", T, |l| {
            monitoring_record(l, "hung").filter(|r| r["resets"] == n)
        });
        let reason = rec["last_reason"].as_str().unwrap_or("");
        assert!(
            reason.starts_with("VM monitoring: no guest tools heartbeat for")
                && reason.contains(&format!("reset {n} of at most 3 per 3600 s")),
            "{rec}"
        );
        assert_eq!(rec["host"], format!("host-{i}"), "{rec}");
        assert_eq!(rec["limit_reached"], false, "{rec}");
    }
    // The agent logged each reset with its reason, and so did the VMM.
    let log = lab.agent_log(i);
    assert_eq!(count(&log, "resetting guest"), 3, "{log}");
    assert_eq!(vmm_resets(&lab, i, "hung"), 3);

    // The 4th hang within the window: left alone and reported.
    lab.wait("boot 4: tools killed", common::GUEST_TIMEOUT, |l| {
        let c = l.console(i, "hung");
        boot_segment(&c, 4)?
            .contains("VIGIL-TOOLS-KILLED")
            .then_some(())
    });
    let rec = lab.wait(
        "the reset limit in cluster status",
        Duration::from_secs(120),
        |l| monitoring_record(l, "hung").filter(|r| r["limit_reached"] == true),
    );
    assert_eq!(rec["resets"], 3, "{rec}");
    // Well past when a 4th reset would have come: none.
    std::thread::sleep(Duration::from_secs(FAILURE_S + IO_WINDOW_S + 5));
    assert_eq!(count(&lab.console(i, "hung"), "VIGIL-BOOT-OK"), 4);
    assert_eq!(vmm_resets(&lab, i, "hung"), 3);
    assert_eq!(lab.vmm_pid(i, "hung"), Some(pid));
    assert!(
        lab.agent_log(i)
            .contains("resets are used up: left alone for an operator"),
        "{}",
        lab.logs()
    );
    let (_, text, _) = lab.vigil(1, &["cluster", "status"]);
    assert!(
        text.contains("VM MONITORING") && text.contains("reset limit reached: left alone"),
        "{text}"
    );
    // Resets came at least the grace period apart (each boot has one).
    for w in resets_at.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_secs(GRACE_S - 5),
            "{resets_at:?}"
        );
    }
}

#[test]
fn a_guest_whose_tools_died_but_which_keeps_writing_its_disk_is_not_reset() {
    let _g = common::guest_lock();
    let mut lab = Lab::new("busy", 2, TIMINGS);
    lab.set_cluster_key("monitoring", json!({ "busy": monitoring("vm") }));
    let master = start(&mut lab);
    let i = if master == 1 { 2 } else { 1 };
    let run = format!("disk-write:dev=/dev/vda,rate=2,report=600+stop-tools:after={KILL_AFTER_S}");
    let toml = guest_vm(&lab, "busy", &run, true);
    lab.register("busy", &toml, &[]);
    start_vm(&lab, "busy", i);
    lab.wait("tools up, then killed", common::GUEST_TIMEOUT, |l| {
        let c = l.console(i, "busy");
        let up = c.find("VIGIL-TOOLS-CONNECTED")?;
        c[up..].contains("VIGIL-TOOLS-KILLED").then_some(())
    });
    let disk = lab.store("ds1").join("vms/busy/disk.img");
    let journal = |d: &std::path::Path| {
        std::fs::read(d)
            .unwrap()
            .chunks(512)
            .take_while(|r| r.starts_with(b"VIGILJ01"))
            .count()
    };
    let before = journal(&disk);
    // An idle guest would be reset FAILURE_S (+ a poll) after the kill,
    // once past the grace period; watch well beyond both.
    let end = Instant::now() + Duration::from_secs(GRACE_S + FAILURE_S + IO_WINDOW_S);
    while Instant::now() < end {
        assert_eq!(vmm_resets(&lab, i, "busy"), 0, "reset while writing");
        std::thread::sleep(Duration::from_secs(1));
    }
    let silent = ms_since_tools(&lab, i, "busy").unwrap_or(0);
    assert!(silent >= 30_000, "the tools were not silent: {silent} ms");
    let after = journal(&disk);
    assert!(
        after > before + 20,
        "the guest did not keep writing: {before} -> {after}"
    );
    assert!(monitoring_record(&lab, "busy").is_none());
    assert_eq!(count(&lab.console(i, "busy"), "VIGIL-BOOT-OK"), 1);
    assert_eq!(count(&lab.agent_log(i), "resetting guest"), 0);
}

#[test]
fn application_monitoring_resets_a_guest_whose_application_stopped_heartbeating() {
    let _g = common::guest_lock();
    let mut lab = Lab::new("app", 2, TIMINGS);
    lab.set_cluster_key(
        "monitoring",
        json!({ "app": monitoring("vm_and_application") }),
    );
    let master = start(&mut lab);
    let i = if master == 1 { 2 } else { 1 };
    // 45 beats, one a second: the application "hangs" ~45 s into the boot,
    // past the grace period's first half; the tools keep running.
    let toml = guest_vm(
        &lab,
        "app",
        "app-heartbeat:name=web,every=1,count=45",
        false,
    );
    lab.register("app", &toml, &[]);
    start_vm(&lab, "app", i);
    let stopped = lab.wait("the application's last beat", common::GUEST_TIMEOUT, |l| {
        l.console(i, "app")
            .contains("VIGIL-APP-HEARTBEAT-DONE sent=45")
            .then(Instant::now)
    });
    lab.wait("the reset", Duration::from_secs(120), |l| {
        (vmm_resets(l, i, "app") >= 1).then_some(())
    });
    let after = stopped.elapsed();
    eprintln!("reset {after:?} after the application's last beat was seen");
    // The last beat went out about a second before its DONE line.
    assert!(after >= Duration::from_secs(FAILURE_S - 2), "{after:?}");
    assert!(after <= Duration::from_secs(FAILURE_S + 20), "{after:?}");
    let rec = lab.wait("the reset in cluster status", T, |l| {
        monitoring_record(l, "app").filter(|r| r["resets"] == 1)
    });
    let reason = rec["last_reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("VM monitoring: no application heartbeat for"),
        "{rec}"
    );
    // The tools were alive until the reset: only the application was lost.
    lab.wait("the second boot", common::GUEST_TIMEOUT, |l| {
        (count(&l.console(i, "app"), "VIGIL-BOOT-OK") >= 2).then_some(())
    });
    let c = lab.console(i, "app");
    let first = boot_segment(&c, 1).unwrap();
    assert!(first.contains("VIGIL-TOOLS-CONNECTED"), "{c}");
    assert!(!first.contains("VIGIL-TOOLS-KILLED"), "{c}");
}

/// `vigil vm set` through the real agents. Two hosts of 4000 MHz; the
/// policy keeps 60 % of the CPU free; VM `web` reserves 2000 MHz and runs
/// on host-1 (8000 MHz in all: 75 % free).
#[test]
fn a_reservation_increase_that_breaks_the_admission_policy_is_refused_and_one_that_fits_counts() {
    let _g = common::guest_lock();
    let mut lab = Lab::new("res", 2, TIMINGS);
    set_admission(
        &lab,
        json!({"percentage_reserved": {"cpu_pct": 60, "mem_pct": 0}}),
    );
    let m = start(&mut lab);
    // Asked at the other host, the request is redirected to the master.
    let other = if m == 1 { 2 } else { 1 };
    let toml = guest_vm(&lab, "web", "counter:every=60", false);
    lab.register("web", &toml, &["--cpu-mhz", "2000", "--mem-mib", "128"]);
    start_vm(&lab, "web", 1);
    lab.wait("web's VMM on host-1", T, |l| l.vmm_pid(1, "web"));
    lab.wait("web protected on host-1", T, |l| {
        let v = l.status(m)?;
        (v["vms"]["web"]["state"] == "protected" && v["vms"]["web"]["host"] == "host-1")
            .then_some(())
    });
    let pid = lab.vmm_pid(1, "web").unwrap();
    let ha_toml = lab.store("ds1").join("vms/web/ha.toml");
    let before = std::fs::read_to_string(&ha_toml).unwrap();
    let capacity = |lab: &Lab| {
        let (ok, out, err) = lab.vigil(other, &["cluster", "status"]);
        assert!(ok, "cluster status: {out}{err}");
        out
    };
    let out = capacity(&lab);
    assert!(
        out.contains("1 powered-on VM(s) reserve 2000 MHz / 128 MiB"),
        "{out}"
    );

    // 4000 MHz would leave (1 - 4000/8000) = 50 % free, under 60 %.
    let (ok, out, err) = lab.vigil(other, &["vm", "set", "web", "--cpu-mhz", "4000"]);
    let msg = format!("{out}{err}");
    eprintln!("increase to 4000 MHz refused: {msg}");
    assert!(!ok, "the increase was accepted: {msg}");
    assert!(
        msg.contains("VM web keeps its reservation: admission control (percentage reserved)")
            && msg.contains("CPU free (1 - 4000/8000 MHz) = 50% (need 60%)"),
        "the refusal does not show the arithmetic: {msg}"
    );
    assert_eq!(std::fs::read_to_string(&ha_toml).unwrap(), before);
    assert_eq!(lab.running_on("web"), vec![1]);
    assert_eq!(lab.vmm_pid(1, "web"), Some(pid), "web's VMM changed");
    let out = capacity(&lab);
    assert!(
        out.contains("1 powered-on VM(s) reserve 2000 MHz / 128 MiB"),
        "{out}"
    );

    // 3000 MHz leaves 62.5 % free: accepted, written, counted.
    let (ok, out, err) = lab.vigil(other, &["vm", "set", "web", "--cpu-mhz", "3000"]);
    let msg = format!("{out}{err}");
    eprintln!("increase to 3000 MHz: {msg}");
    assert!(ok, "the increase was refused: {msg}");
    assert!(
        msg.contains("VM web: reservation 2000 MHz / 128 MiB -> 3000 MHz / 128 MiB"),
        "{msg}"
    );
    let after = std::fs::read_to_string(&ha_toml).unwrap();
    assert!(after.contains("cpu_mhz = 3000"), "{after}");
    assert!(after.contains("mem_mib = 128"), "{after}");
    let out = capacity(&lab);
    eprintln!("{out}");
    assert!(
        out.contains("1 powered-on VM(s) reserve 3000 MHz / 128 MiB"),
        "{out}"
    );
    assert_eq!(lab.vmm_pid(1, "web"), Some(pid), "web's VMM changed");

    // 500 MHz more would have fitted beside 2000 (2500/8000: 69 % free),
    // but not beside 3000: (1 - 3500/8000) = 56 %.
    let cfg = common_vm(&lab, "extra");
    lab.register("extra", &cfg, &["--cpu-mhz", "500", "--mem-mib", "64"]);
    let (ok, out, err) = lab.vigil(other, &["vm", "start", "extra", "--host", "host-2"]);
    let msg = format!("{out}{err}");
    eprintln!("power-on refused: {msg}");
    assert!(!ok, "the power-on was accepted: {msg}");
    assert!(
        msg.contains("CPU free (1 - 3500/8000 MHz) = 56% (need 60%)"),
        "{msg}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.running_on("extra").is_empty(), "{}", lab.logs());

    // A decrease is always accepted.
    let (ok, out, err) = lab.vigil(other, &["vm", "set", "web", "--cpu-mhz", "1000"]);
    assert!(ok, "the decrease was refused: {out}{err}");
    let out = capacity(&lab);
    assert!(
        out.contains("1 powered-on VM(s) reserve 1000 MHz / 128 MiB"),
        "{out}"
    );
}
