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
