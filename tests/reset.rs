//! End-to-end test of the host-side VM reset (H11: what HA VM monitoring
//! does to a hung guest): the real `vigil` binary, the real guest with a
//! virtio disk and a NIC on a tap.
//!
//! 1. the guest's disk journal workload writes 3 records and the guest
//!    reports its MAC;
//! 2. `vigil vm reset --reason ...` resets it: the same VMM process boots the
//!    guest again (a second `VIGIL-BOOT-OK`), the reason is in the VMM's log;
//! 3. the new guest's journal writer resumes after the 3 records (the disk
//!    kept its data) and the guest sees the same MAC;
//! 4. `vigil vm shutdown` then powers it off with status 0.
//!
//! Needs root for the tap device (removed on drop, also when the test fails).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const BOOT_TIMEOUT: Duration = common::GUEST_TIMEOUT;
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const MAC: &str = "52:54:00:76:68:70";
const REASON: &str = "vhp-e2e: tools heartbeat lost and no I/O";

struct Tap(String);

impl Tap {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["tuntap", "add", "dev", name, "mode", "tap"])
            .status()
            .map(|s| s.success());
        assert!(
            matches!(ok, Ok(true)),
            "ip tuntap add {name} failed (this test needs root)"
        );
        let t = Tap(name.to_string());
        let _ = Command::new("ip")
            .args(["link", "set", name, "up"])
            .status();
        t
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

struct Guest {
    vm: common::Console,
    api: PathBuf,
    dir: PathBuf,
    _tap: Tap,
}

impl Guest {
    fn boot() -> Self {
        let cfg = common::guest_config();
        let dir = std::env::temp_dir().join(format!("vhp-reset-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let tap = Tap::new(&format!("vhpr{}", std::process::id() % 100_000));
        let api = dir.join("api.sock");
        let cmdline = common::guest_cmdline("vigil.run=disk-write:count=3,rate=10");
        let vm = common::Console::spawn(
            Command::new(env!("CARGO_BIN_EXE_vigil"))
                .args([
                    "run",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--console",
                    "stdio",
                ])
                .args(["--cmdline", &cmdline])
                .args(["--api-socket", api.to_str().unwrap()])
                .args(["--disk", &format!("path={}", disk.display())])
                .args(["--net", &format!("tap={},mac={MAC}", tap.0)]),
        );
        Guest {
            vm,
            api,
            dir,
            _tap: tap,
        }
    }

    /// Console and VMM log, interleaved.
    fn output(&self) -> String {
        self.vm.text()
    }

    fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> usize {
        self.vm.wait_for(needle, from, timeout)
    }

    fn type_line(&mut self, line: &str) {
        self.vm.type_line(line)
    }

    /// The MAC the guest sees on eth0, read from its shell (once the shell
    /// prompt after byte `from` is there).
    fn guest_mac(&mut self, from: usize) -> String {
        let end = self.wait_for("vigil-guest:", from, STEP_TIMEOUT);
        self.type_line("echo MAC-$(cat /sys/class/net/eth0/address)-END");
        let start = self.wait_for("\nMAC-", end, STEP_TIMEOUT);
        let stop = self.wait_for("-END", start, STEP_TIMEOUT);
        self.output()[start..stop - 4].to_string()
    }

    fn vigil(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(args)
            .arg("--api-socket")
            .arg(&self.api)
            .output()
            .unwrap()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vm.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn reset_boots_the_guest_again_with_its_disk_and_mac() {
    let _l = common::guest_lock();
    let mut g = Guest::boot();
    let first_boot = g.wait_for("VIGIL-BOOT-OK", 0, BOOT_TIMEOUT);
    g.wait_for("VIGIL-DISK-DONE seq=3", first_boot, STEP_TIMEOUT);
    let mac = g.guest_mac(first_boot);
    assert_eq!(mac, MAC, "{}", g.output());

    let mark = g.output().len();
    let out = g.vigil(&["vm", "reset", "--reason", REASON]);
    assert!(out.status.success(), "vigil vm reset failed: {out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(REASON), "{said}");

    // The same process boots the guest again: a second boot marker.
    let second_boot = g.wait_for("VIGIL-BOOT-OK", mark, BOOT_TIMEOUT);
    assert!(
        g.vm.child.try_wait().unwrap().is_none(),
        "the VMM exited on a reset:\n{}",
        g.output()
    );
    // The reason is in the VMM's log (default level: warnings).
    let log = g.output();
    assert!(
        log[mark..].contains("VM reset requested") && log[mark..].contains(REASON),
        "the reset and its reason are not logged:\n{log}"
    );
    // Same disk: the new guest's writer resumes after the 3 records.
    g.wait_for("VIGIL-DISK-RESUME pos=3 seq=4", second_boot, STEP_TIMEOUT);
    // Same MAC.
    let mac = g.guest_mac(second_boot);
    assert_eq!(mac, MAC, "{}", g.output());

    let out = g.vigil(&["vm", "shutdown"]);
    assert!(out.status.success(), "vigil vm shutdown failed: {out:?}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = g.vm.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < STEP_TIMEOUT,
            "the guest did not power off after the reset:\n{}",
            g.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "{}", g.output());
}

#[test]
fn reset_of_a_vm_that_is_not_running_is_a_precise_error() {
    let dir = std::env::temp_dir().join(format!("vhp-reset-none-{}", std::process::id()));
    let api = dir.join("api.sock");
    let o = common::vigil(
        &["vm", "reset", "--api-socket", api.to_str().unwrap()],
        common::QUICK_TIMEOUT,
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("no API socket at"), "{o:?}");
}
