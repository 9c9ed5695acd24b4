//! End-to-end tests of the control API, pause/resume and snapshot/restore:
//! the real `vigil` binary, real KVM, the real guest running the counter
//! workload (`vigil.run=counter:every=1` prints `VIGIL-COUNTER n
//! uptime_ms=<ms>` every second).
//!
//! The guest boots once (tens of seconds on an emulated-KVM host) and is
//! snapshotted with `--stop` into a base snapshot; every case then starts
//! from `vigil run --restore` of that base, which takes well under a
//! second. Tests that run a guest hold [`GUEST_LOCK`] (two cores: one guest
//! at a time). If the guest image is missing they fail saying to run
//! `make guest-image`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use common::guest_lock;

static BASE: OnceLock<PathBuf> = OnceLock::new();

const BOOT_TIMEOUT: Duration = common::GUEST_TIMEOUT;
const STEP_TIMEOUT: Duration = common::QUICK_TIMEOUT;

fn work_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vigil-api-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vigil")
}

/// A running `vigil run` with its console in a file and an API socket.
struct Vmm {
    child: Child,
    console: PathBuf,
    socket: PathBuf,
    name: String,
}

impl Vmm {
    fn start(name: &str, args: &[&str]) -> Self {
        let dir = work_dir();
        let console = dir.join(format!("{name}.console"));
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&console);
        let mut all: Vec<String> = vec![
            "run".into(),
            "--console".into(),
            format!("file:{}", console.display()),
            "--api-socket".into(),
            socket.display().to_string(),
            "--log-level".into(),
            "info".into(),
            "--log-file".into(),
            dir.join(format!("{name}.log")).display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let child = Command::new(bin())
            .args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start vigil");
        let v = Self {
            child,
            console,
            socket,
            name: name.to_string(),
        };
        v.wait_for(STEP_TIMEOUT, "the API socket", |_| v.socket.exists());
        v
    }

    fn boot_counter() -> Self {
        let cfg = common::guest_config();
        let vm = vmm::VmConfig::load(Some(&cfg), Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", cfg.display()));
        let cmdline = format!(
            "{} vigil.tools=off vigil.run=counter:every=1 vigil.test=run",
            vm.cmdline
        );
        Self::start(
            "boot",
            &["--config", cfg.to_str().unwrap(), "--cmdline", &cmdline],
        )
    }

    fn restore(name: &str, dir: &Path) -> Self {
        Self::start(name, &["--restore", dir.to_str().unwrap()])
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn counters(&self) -> Vec<u64> {
        counters(&self.console_text())
    }

    fn last_counter(&self) -> Option<u64> {
        self.counters().last().copied()
    }

    fn wait_for(&self, timeout: Duration, what: &str, mut ok: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < timeout,
                "{}: timed out after {timeout:?} waiting for {what}; console:\n{}",
                self.name,
                self.console_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_counter_above(&self, n: Option<u64>, timeout: Duration) -> u64 {
        self.wait_for(timeout, "the counter to advance", |v| {
            v.last_counter().is_some_and(|c| n.is_none_or(|n| c > n))
        });
        self.last_counter().unwrap()
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .arg("--api-socket")
            .arg(&self.socket)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let (code, out, err) = self.cli(&a);
        assert_eq!(code, 0, "vigil {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Waits for the process to end; returns its status and stderr.
    fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (s.code(), err);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return (None, "timed out".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn power_off(self) {
        let (code, _, err) = self.cli(&["vm", "shutdown"]);
        assert_eq!(code, 0, "{err}");
        let (status, err) = self.wait_exit(STEP_TIMEOUT);
        assert_eq!(status, Some(0), "{err}");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn counters(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("VIGIL-COUNTER "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Asserts the console's counter lines go 0, 1, 2... with no restart and
/// no gap: a restored guest continues where the snapshot stopped it.
fn assert_consecutive(console: &str) {
    let c = counters(console);
    assert!(c.len() >= 2, "too few counter lines:\n{console}");
    for w in c.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "counter sequence {c:?} is not consecutive:\n{console}"
        );
    }
}

/// The base snapshot: the counter guest, booted once, stopped at counter
/// >= 2. Call with the guest lock held.
fn base_snapshot() -> PathBuf {
    if let Some(p) = BASE.get() {
        return p.clone();
    }
    let vm = Vmm::boot_counter();
    vm.wait_counter_above(Some(1), BOOT_TIMEOUT);
    let dir = work_dir().join("base");
    let (code, out, err) = vm.cli(&["snapshot", "--to", dir.to_str().unwrap(), "--stop"]);
    assert_eq!(code, 0, "snapshot failed: {out}{err}");
    let (status, err) = vm.wait_exit(STEP_TIMEOUT);
    assert_eq!(status, Some(0), "VMM after snapshot --stop: {err}");
    BASE.get_or_init(|| dir).clone()
}

fn raw_request(socket: &Path, bytes: &[u8]) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).expect("a JSON body"))
}

#[test]
fn pause_stops_the_counter_and_resume_continues_it() {
    let _g = guest_lock();
    let base = base_snapshot();
    let vm = Vmm::restore("pause", &base);
    let c = vm.wait_counter_above(None, STEP_TIMEOUT);
    assert_eq!(vm.json(&["vm", "pause"])["state"], "paused");
    assert_eq!(vm.json(&["vm", "info"])["state"], "paused");
    let frozen = vm.last_counter().unwrap();
    assert!(frozen >= c);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        vm.last_counter(),
        Some(frozen),
        "the counter moved while paused"
    );
    let wd = vm.json(&["vm", "watchdog"]);
    assert_eq!(wd["vcpus"][0]["state"], "parked", "{wd}");
    assert_eq!(vm.json(&["vm", "resume"])["state"], "running");
    vm.wait_counter_above(Some(frozen), STEP_TIMEOUT);
    // The counter keeps an absolute schedule, so after a pause it may print
    // its next values back to back: what matters is that the line after the
    // frozen one is frozen + 1 (no restart, no skipped value).
    let c = vm.counters();
    let at = c
        .iter()
        .rposition(|&x| x == frozen)
        .expect("the frozen value");
    assert_eq!(
        c.get(at + 1),
        Some(&(frozen + 1)),
        "resume continues from where it stopped: {c:?}"
    );
    vm.power_off();
}

#[test]
fn snapshot_and_restore_continue_the_counter() {
    let _g = guest_lock();
    let base = base_snapshot();
    let base_console = std::fs::read_to_string(work_dir().join("boot.console")).unwrap();
    let vm = Vmm::restore("first", &base);
    let first = vm.wait_counter_above(None, STEP_TIMEOUT);
    // The snapshot may have caught a line half-printed: the restored guest
    // prints the rest, so the two consoles are compared joined.
    assert_consecutive(&format!("{base_console}{}", vm.console_text()));
    let info = vm.json(&["vm", "info"]);
    assert_eq!(info["restored_from"], base.to_str().unwrap());
    // A snapshot that keeps running, then one that stops.
    let dir_run = work_dir().join("snap-running");
    let r = vm.json(&["snapshot", "--to", dir_run.to_str().unwrap()]);
    assert_eq!(r["state"], "running", "{r}");
    let c = vm.wait_counter_above(Some(first), STEP_TIMEOUT);
    let dir = work_dir().join("snap-stopped");
    let r = vm.json(&["snapshot", "--to", dir.to_str().unwrap(), "--stop"]);
    assert_eq!(r["state"], "stopped", "{r}");
    let last = vm.last_counter().unwrap();
    assert!(last >= c);
    let vm_console = vm.console_text();
    let (status, err) = vm.wait_exit(STEP_TIMEOUT);
    assert_eq!(status, Some(0), "{err}");

    let again = Vmm::restore("second", &dir);
    again.wait_counter_above(Some(last), STEP_TIMEOUT);
    assert_consecutive(&format!("{}{}", vm_console, again.console_text()));
    again.power_off();
}

#[test]
fn snapshot_of_another_format_version_is_refused() {
    // No guest needed: the version is checked before anything else.
    let dir = work_dir().join("v2");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("state.json"),
        br#"{"format_version":2,"vcpus":[]}"#,
    )
    .unwrap();
    let out = Command::new(bin())
        .args([
            "run",
            "--restore",
            dir.to_str().unwrap(),
            "--console",
            "none",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "snapshot format 2 was written by a newer vigil; this vigil reads format 1: upgrade \
             vigil or take a new snapshot"
        ),
        "{err}"
    );
    std::fs::write(
        dir.join("state.json"),
        br#"{"format_version":1,"vigil_vers"#,
    )
    .unwrap();
    let out = Command::new(bin())
        .args([
            "run",
            "--restore",
            dir.to_str().unwrap(),
            "--console",
            "none",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is corrupt or truncated"), "{err}");
    assert_eq!(err.lines().count(), 1, "one message: {err}");
}

#[test]
fn truncated_memory_file_is_refused() {
    let _g = guest_lock();
    let base = base_snapshot();
    let dir = work_dir().join("truncated");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(base.join("state.json"), dir.join("state.json")).unwrap();
    std::fs::copy(base.join("memory.bin"), dir.join("memory.bin")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory.bin"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    let out = Command::new(bin())
        .args([
            "run",
            "--restore",
            dir.to_str().unwrap(),
            "--console",
            "none",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is 1048576 bytes but") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn api_errors_are_json_with_proper_statuses() {
    let _g = guest_lock();
    let base = base_snapshot();
    let vm = Vmm::restore("errors", &base);
    let s = &vm.socket;
    let (st, v) = raw_request(s, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(st, 404);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no such endpoint /nope"),
        "{v}"
    );
    let (st, v) = raw_request(s, b"\x01\x02 not http\r\n\r\n");
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .starts_with("malformed HTTP request"));
    let (st, _) = raw_request(s, b"DELETE /vm HTTP/1.1\r\n\r\n");
    assert_eq!(st, 405);
    let big = format!(
        "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    );
    let (st, _) = raw_request(s, big.as_bytes());
    assert_eq!(st, 413);
    let (st, v) = raw_request(
        s,
        b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 7\r\n\r\n{\"x\":1}",
    );
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("\"dir\""), "{v}");
    let (st, v) = raw_request(
        s,
        b"PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"dir\":\"x\"}",
    );
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("absolute"), "{v}");
    let (st, _) = raw_request(s, b"PUT /vm/shutdown?timeout_s=soon HTTP/1.1\r\n\r\n");
    assert_eq!(st, 400);
    // Still serving after all that, and the guest still runs.
    let hb = vm.json(&["vm", "heartbeat"]);
    assert_eq!(hb["connected"], false);
    assert_eq!(hb["note"], "guest tools not connected");
    assert_eq!(
        vm.json(&["vm", "counters"])["devices"],
        serde_json::json!([])
    );
    let c = vm.wait_counter_above(None, STEP_TIMEOUT);
    vm.wait_counter_above(Some(c), STEP_TIMEOUT);
    vm.power_off();
}

#[test]
fn cli_without_a_vmm_says_so() {
    let dir = work_dir();
    let missing = dir.join("missing.sock");
    let out = Command::new(bin())
        .args(["vm", "info", "--api-socket", missing.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no API socket at"), "{err}");
    // A socket file nobody listens on any more.
    let stale = dir.join("stale.sock");
    let _ = std::fs::remove_file(&stale);
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = Command::new(bin())
        .args([
            "snapshot",
            "--api-socket",
            stale.to_str().unwrap(),
            "--to",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no VMM is listening on"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn watchdog_does_not_flag_an_idle_guest() {
    // The counter guest sleeps in HLT most of each second; with a 1 s
    // threshold the watchdog must tell idle (a kick brings the vCPU out of
    // KVM_RUN) from stuck.
    let _g = guest_lock();
    let base = base_snapshot();
    let vm = Vmm::start(
        "watchdog",
        &[
            "--restore",
            base.to_str().unwrap(),
            "--watchdog-threshold-s",
            "1",
        ],
    );
    let c = vm.wait_counter_above(None, STEP_TIMEOUT);
    std::thread::sleep(Duration::from_secs(4));
    let wd = vm.json(&["vm", "watchdog"]);
    assert_eq!(wd["enabled"], true, "{wd}");
    assert_eq!(wd["threshold_ms"], 1000, "{wd}");
    assert_eq!(wd["healthy"], true, "{wd}");
    assert_eq!(wd["incidents"], 0, "{wd}");
    assert_eq!(wd["vcpus"][0]["state"], "ok", "{wd}");
    assert_eq!(wd["event_loop"]["state"], "ok", "{wd}");
    let (code, table, _) = vm.cli(&["vm", "watchdog"]);
    assert_eq!(code, 0);
    assert!(table.contains("healthy: true"), "{table}");
    vm.wait_counter_above(Some(c), STEP_TIMEOUT);
    vm.power_off();
}
