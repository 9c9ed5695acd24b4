//! End-to-end tests of the VMM's disk lease (H10): the real `vigil run
//! --lease` with the real guest. The VMM renews the record while the guest
//! runs, stops the guest (exit status 5) at once when another host has taken
//! the lease, and on its own when it cannot renew for `stop_time`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use vmm::lease::LeaseRecord as Record;

fn mono_ms() -> u64 {
    vmm::lease::mono_ms()
}

struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_record(p: &Path, r: &Record) {
    vmm::lease::write_record(p, r).unwrap();
}

fn read_record(p: &Path) -> Option<Record> {
    vmm::lease::read_record(p).ok().flatten()
}

/// Starts a guest holding generation 1 of a fresh lease (renew 300 ms,
/// I/O timeout 300 ms, stop 1500 ms).
fn start(name: &str) -> (Vm, PathBuf) {
    let cfg = common::guest_config();
    let dir = std::env::temp_dir().join(format!("vha-lease-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lease = dir.join("vm.lease");
    write_record(
        &lease,
        &Record {
            owner: Some("host-a".into()),
            generation: 1,
            counter: 0,
        },
    );
    let spec = dir.join("lease.toml");
    std::fs::write(
        &spec,
        format!(
            "file = {:?}\nowner = \"host-a\"\ngeneration = 1\nacquired_mono_ms = {}\n\
             renew_interval_ms = 300\nio_timeout_ms = 300\nstop_time_ms = 1500\nstatus = {:?}\n",
            lease,
            mono_ms(),
            dir.join("status.json")
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--console", "none", "--lease"])
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start vigil");
    (Vm { child, dir }, lease)
}

fn wait_exit(vm: &mut Vm, timeout: Duration) -> (Option<i32>, Instant, String) {
    let start = Instant::now();
    loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            vm.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (s.code(), Instant::now(), err);
        }
        assert!(
            start.elapsed() < timeout,
            "the VMM did not stop in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the VMM has renewed the record a few times.
fn wait_renewals(lease: &Path, vm: &mut Vm) {
    let start = Instant::now();
    loop {
        if let Some(r) = read_record(lease) {
            if r.counter >= 3 {
                assert_eq!(r.owner.as_deref(), Some("host-a"));
                assert_eq!(r.generation, 1);
                return;
            }
        }
        if let Some(s) = vm.child.try_wait().unwrap() {
            panic!("the VMM exited ({s}) before renewing its lease");
        }
        assert!(start.elapsed() < common::QUICK_TIMEOUT, "no lease renewals");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn vmm_renews_its_lease_and_stops_when_it_is_taken() {
    let _g = common::guest_lock();
    let (mut vm, lease) = start("taken");
    wait_renewals(&lease, &mut vm);
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.dir.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "held");
    let taken = Record {
        owner: Some("host-b".into()),
        generation: 2,
        counter: 0,
    };
    let t0 = Instant::now();
    write_record(&lease, &taken);
    let (code, at, err) = wait_exit(&mut vm, Duration::from_secs(10));
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("lease taken by host-b generation 2"), "{err}");
    // Noticed on the next renewal (every 300 ms), not at the stop time.
    assert!(at - t0 < Duration::from_millis(1200), "{:?}", at - t0);
    // The stale copy wrote nothing over the new owner's record.
    assert_eq!(read_record(&lease), Some(taken));
}

#[test]
fn vmm_stops_its_guest_when_it_cannot_renew_in_time() {
    let _g = common::guest_lock();
    let (mut vm, lease) = start("expire");
    wait_renewals(&lease, &mut vm);
    // The record becomes unreadable (a directory where the file was): every
    // read fails, as when the datastore is cut off.
    let last = read_record(&lease).unwrap();
    let cut = Instant::now();
    std::fs::remove_file(&lease).unwrap();
    std::fs::create_dir(&lease).unwrap();
    let (code, at, err) = wait_exit(&mut vm, Duration::from_secs(10));
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("not renewed for 1500 ms"), "{err}");
    // The last successful renewal was issued at most one renew interval
    // (plus the I/O) before the cut: the guest stops within stop_time of it.
    let after_cut = at - cut;
    assert!(
        after_cut <= Duration::from_millis(1500 + 200),
        "{after_cut:?}"
    );
    assert!(
        after_cut >= Duration::from_millis(1500 - 300 - 300 - 50),
        "{after_cut:?}"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.dir.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "expired");
    assert!(last.counter >= 3);
}

/// A guest with a disk running the `disk-write` journal workload, holding
/// generation 1 of a fresh lease with `on_loss = "pause"` (renew 300 ms,
/// I/O timeout 300 ms, stop 1500 ms, takeover 2500 ms), its control API on
/// `DIR/api.sock` and its console in `DIR/console`.
fn start_pausing(name: &str) -> (Vm, PathBuf) {
    let cfg = common::guest_config();
    let out = cfg.parent().unwrap().join("out");
    let dir = std::env::temp_dir().join(format!("vha-lease-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::File::create(dir.join("disk.img"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let vm_toml = dir.join("vm.toml");
    std::fs::write(
        &vm_toml,
        format!(
            "name = {name:?}\nvcpus = 1\nmemory = \"128M\"\nkernel = {:?}\ninitrd = {:?}\n\
             cmdline = {:?}\n[[disks]]\npath = \"disk.img\"\n",
            out.join("vmlinux"),
            out.join("initramfs.cpio"),
            common::guest_cmdline("vigil.run=disk-write:dev=/dev/vda,rate=20,report=60"),
        ),
    )
    .unwrap();
    let lease = dir.join("vm.lease");
    write_record(
        &lease,
        &Record {
            owner: Some("host-a".into()),
            generation: 1,
            counter: 0,
        },
    );
    let spec = dir.join("lease.toml");
    std::fs::write(
        &spec,
        format!(
            "file = {:?}\nowner = \"host-a\"\ngeneration = 1\nacquired_mono_ms = {}\n\
             renew_interval_ms = 300\nio_timeout_ms = 300\nstop_time_ms = 1500\n\
             takeover_time_ms = 2500\non_loss = \"pause\"\nstatus = {:?}\n",
            lease,
            mono_ms(),
            dir.join("status.json")
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["run", "--config"])
        .arg(&vm_toml)
        .arg("--console")
        .arg(format!("file:{}", dir.join("console").display()))
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .arg("--lease")
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start vigil");
    (Vm { child, dir }, lease)
}

fn vm_info(vm: &Vm) -> serde_json::Value {
    vmm::api::client::call(
        &vm.dir.join("api.sock"),
        "GET",
        "/vm",
        None,
        Duration::from_secs(5),
    )
    .expect("GET /vm")
}

fn wait_for<T>(
    vm: &mut Vm,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&Vm) -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f(vm) {
            return v;
        }
        if let Some(s) = vm.child.try_wait().unwrap() {
            panic!("the VMM exited ({s}) while waiting for {what}");
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the pausing guest until its journal has a few records; returns
/// the journal's record count then.
fn boot_writing(vm: &mut Vm) -> usize {
    let console = vm.dir.join("console");
    wait_for(vm, "the guest's disk writer", common::GUEST_TIMEOUT, |_| {
        let c = std::fs::read_to_string(&console).unwrap_or_default();
        c.contains("VIGIL-DISK-RESUME").then_some(())
    });
    let disk = vm.dir.join("disk.img");
    wait_for(vm, "journal records", common::QUICK_TIMEOUT, |_| {
        let n = common::journal(&disk).1;
        (n >= 5).then_some(n)
    })
}

/// Cuts the record off (a directory where the file was: every read fails,
/// as with a datastore out of reach) and waits for the lease-suspension;
/// returns the record as it was and how long the suspension took.
fn cut_until_suspended(vm: &mut Vm, lease: &Path) -> (Record, Duration) {
    let last = read_record(lease).unwrap();
    let cut = Instant::now();
    std::fs::remove_file(lease).unwrap();
    std::fs::create_dir(lease).unwrap();
    wait_for(vm, "lease-suspended", Duration::from_secs(10), |vm| {
        (vm_info(vm)["state"] == "lease-suspended").then_some(())
    });
    (last, cut.elapsed())
}

#[test]
fn a_storage_stall_pauses_the_guest_which_resumes_after_reacquiring_its_lease() {
    let _g = common::guest_lock();
    let (mut vm, lease) = start_pausing("pause");
    boot_writing(&mut vm);
    let disk = vm.dir.join("disk.img");
    let (last, took) = cut_until_suspended(&mut vm, &lease);
    // Paused at the stop time (1500 ms after the last renewal, issued at
    // most one renew interval plus I/O before the cut; the guest is parked
    // 250 ms ahead of it), not killed.
    assert!(
        took >= Duration::from_millis(1500 - 250 - 300 - 300 - 50)
            && took <= Duration::from_millis(2500),
        "{took:?}"
    );
    let info = vm_info(&vm);
    assert_eq!(info["lease"]["state"], "suspended", "{info}");
    assert_eq!(info["lease"]["generation"], 1, "{info}");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.dir.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "suspended");
    // Nobody but the lease may resume it.
    let e = vmm::api::client::call(
        &vm.dir.join("api.sock"),
        "PUT",
        "/vm/resume",
        None,
        Duration::from_secs(5),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lease-suspended"), "{e}");
    // Nothing is written while suspended.
    let (writers, at_pause, _) = common::journal(&disk);
    assert_eq!(writers.len(), 1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        common::journal(&disk).1,
        at_pause,
        "the journal grew while lease-suspended"
    );
    assert_eq!(vm_info(&vm)["state"], "lease-suspended");
    // Storage returns with the record as it was: nobody took over. The VMM
    // must watch it unchanged for the takeover time, then claim generation 2.
    std::fs::remove_dir(&lease).unwrap();
    write_record(&lease, &last);
    let back = Instant::now();
    wait_for(
        &mut vm,
        "the guest running again",
        Duration::from_secs(20),
        |vm| (vm_info(vm)["state"] == "running").then_some(()),
    );
    let resumed_after = back.elapsed();
    assert!(
        resumed_after >= Duration::from_millis(2500),
        "resumed {resumed_after:?} after the record came back, before the takeover time"
    );
    let now = read_record(&lease).unwrap();
    assert_eq!(now.owner.as_deref(), Some("host-a"));
    assert_eq!(now.generation, 2, "{now:?}");
    assert!(vm.dir.join("vm.lease.claim.2").exists());
    let info = vm_info(&vm);
    assert_eq!(info["lease"]["state"], "held", "{info}");
    assert_eq!(info["lease"]["generation"], 2, "{info}");
    assert_eq!(info["lease"]["resumptions"], 1, "{info}");
    // The same boot carries on writing: one writer, sequence continuing, no
    // second VIGIL-DISK-RESUME (the guest was not reset).
    wait_for(
        &mut vm,
        "journal records after the resume",
        common::QUICK_TIMEOUT,
        |_| (common::journal(&disk).1 >= at_pause + 5).then_some(()),
    );
    let (writers, _, _) = common::journal(&disk);
    assert_eq!(writers.len(), 1, "the guest was restarted");
    let console = std::fs::read_to_string(vm.dir.join("console")).unwrap();
    assert_eq!(console.matches("VIGIL-DISK-RESUME").count(), 1, "{console}");
    assert!(vm.child.try_wait().unwrap().is_none());
}

#[test]
fn a_lease_suspended_vmm_whose_lease_was_taken_powers_off_without_a_write() {
    let _g = common::guest_lock();
    let (mut vm, lease) = start_pausing("paused-taken");
    boot_writing(&mut vm);
    let disk = vm.dir.join("disk.img");
    cut_until_suspended(&mut vm, &lease);
    let (_, at_pause, _) = common::journal(&disk);
    // Meanwhile a peer waited out the takeover time and took generation 2.
    std::fs::remove_dir(&lease).unwrap();
    std::fs::write(vm.dir.join("vm.lease.claim.2"), "host-b").unwrap();
    let taken = Record {
        owner: Some("host-b".into()),
        generation: 2,
        counter: 4,
    };
    write_record(&lease, &taken);
    let t0 = Instant::now();
    let (code, at, err) = wait_exit(&mut vm, Duration::from_secs(10));
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("lease taken by host-b generation 2"), "{err}");
    // Seen on its next read of the record (every 300 ms).
    assert!(at - t0 < Duration::from_millis(1500), "{:?}", at - t0);
    assert_eq!(read_record(&lease), Some(taken));
    assert_eq!(
        common::journal(&disk).1,
        at_pause,
        "the stale copy wrote to its disk"
    );
}
