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
        br#"{"format_version":3,"vcpus":[]}"#,
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
            "snapshot format 3 was written by a newer vigil; this vigil reads formats 1 to 2: \
             upgrade vigil or take a new snapshot"
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

/// Extracts `name` from an uncompressed newc cpio archive (the guest's
/// initramfs), so the host can run the guest's `vigil-tools`.
fn cpio_file(archive: &[u8], name: &str) -> Option<Vec<u8>> {
    let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
    let align = |n: usize| (n + 3) & !3;
    let mut at = 0;
    while archive.get(at..at + 6)? == b"070701" {
        let h = archive.get(at..at + 110)?;
        let size = hex(&h[54..62])?;
        let namesize = hex(&h[94..102])?;
        let n = archive.get(at + 110..at + 110 + namesize - 1)?;
        let data = align(at + 110 + namesize);
        if n == name.as_bytes() {
            return archive.get(data..data + size).map(<[u8]>::to_vec);
        }
        if n == b"TRAILER!!!" {
            return None;
        }
        at = align(data + size);
    }
    None
}

/// Runs the guest's `vigil-tools disk-verify` on a disk image on the host
/// and returns its verdict line.
fn verify_disk(work: &Path, image: &Path) -> String {
    let tools = work.join("vigil-tools");
    if !tools.exists() {
        let initrd = common::repo().join("guest-images/out/initramfs.cpio");
        let cpio = std::fs::read(&initrd).unwrap();
        let bin = cpio_file(&cpio, "bin/vigil-tools").expect("vigil-tools in the initramfs");
        std::fs::write(&tools, bin).unwrap();
        let mut p = std::fs::metadata(&tools).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
        std::fs::set_permissions(&tools, p).unwrap();
    }
    let out = Command::new(&tools)
        .arg("disk-verify")
        .arg(format!("dev={}", image.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("VIGIL-DISK-VERIFY"))
        .unwrap_or_else(|| panic!("no verdict from disk-verify: {text}"))
        .to_string()
}

/// `key=value` from a marker line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Host taps for the device snapshot test, removed on drop (also when the
/// test fails). Both get the same MAC so that the guest's ARP entry for the
/// host stays right when the restored VM is attached to the second one.
struct Taps(Vec<String>);

const TAP_MAC: &str = "02:76:64:73:00:01";
const HOST_IP: &str = "198.18.71.1/24";
const GUEST_IP: [u8; 4] = [198, 18, 71, 2];

fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().map(|s| s.success());
    assert!(
        matches!(ok, Ok(true)),
        "ip {args:?} failed (this test needs root)"
    );
}

impl Taps {
    fn add(&mut self, name: &str) {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(Stdio::null())
            .status();
        self.0.push(name.to_string());
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        ip(&["link", "set", "dev", name, "address", TAP_MAC]);
        ip(&["addr", "add", HOST_IP, "dev", name]);
        ip(&["link", "set", name, "up"]);
    }

    fn remove(&mut self, name: &str) {
        ip(&["link", "del", name]);
        self.0.retain(|t| t != name);
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        for t in &self.0 {
            let _ = Command::new("ip").args(["link", "del", t]).status();
        }
    }
}

/// A TCP round trip with the guest's echo workload over the tap.
fn echo(msg: &str) -> Result<String, String> {
    use std::net::{SocketAddr, TcpStream};
    let addr = SocketAddr::from((GUEST_IP, 7777));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(20)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn echo_retrying(msg: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        match echo(msg) {
            Ok(got) => {
                assert_eq!(got, msg);
                return;
            }
            Err(e) if start.elapsed() > timeout => panic!("echo over the tap failed: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn wait_tools(vm: &Vmm, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let hb = vm.json(&["vm", "heartbeat"]);
        if hb["connected"] == true
            && hb["ms_since_tools_heartbeat"]
                .as_u64()
                .is_some_and(|ms| ms < 5000)
        {
            return hb;
        }
        assert!(
            start.elapsed() < timeout,
            "guest tools did not (re)connect: {hb}\n{}",
            vm.console_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn block_counter(vm: &Vmm, name: &str) -> u64 {
    let c = vm.json(&["vm", "counters"]);
    c["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "block"))
        .and_then(|d| d["counters"][name].as_u64())
        .unwrap_or_else(|| panic!("no block counter {name}: {c}"))
}

#[test]
fn snapshot_with_disk_tap_and_vsock_restores_on_other_backends() {
    let _g = guest_lock();
    let work = work_dir().join("devices");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let image = work.join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let id = std::process::id() % 10_000;
    let (tap_a, tap_b) = (format!("vdsa{id}"), format!("vdsb{id}"));
    let mut taps = Taps(Vec::new());
    taps.add(&tap_a);

    let cfg = common::guest_config();
    let base = vmm::VmConfig::load(Some(&cfg), Default::default()).unwrap();
    let cmdline = format!(
        "{} ip=198.18.71.2::198.18.71.1:255.255.255.0::eth0:off \
         vigil.run=counter:every=1+disk-write:rate=5,report=1+echo vigil.test=run",
        base.cmdline
    );
    let disk = format!("path={},id=vds-disk", image.display());
    let net = format!("tap={tap_a},mac=52:54:00:71:00:02,network=lab");
    let vsock = format!("cid=3,socket={}", work.join("v.sock").display());
    let vm = Vmm::start(
        "devices",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--disk",
            &disk,
            "--net",
            &net,
            "--vsock",
            &vsock,
        ],
    );
    vm.wait_counter_above(Some(1), BOOT_TIMEOUT);
    vm.wait_for(BOOT_TIMEOUT, "the echo server and the disk writer", |v| {
        let c = v.console_text();
        c.contains("VIGIL-ECHO-READY") && c.contains("VIGIL-DISK seq=")
    });
    wait_tools(&vm, BOOT_TIMEOUT);
    echo_retrying("vds-before\n", STEP_TIMEOUT);
    let writes_before = block_counter(&vm, "write_ops");
    assert!(writes_before > 0);

    let snap = work.join("snap");
    let r = vm.json(&["snapshot", "--to", snap.to_str().unwrap(), "--stop"]);
    assert_eq!(r["state"], "stopped", "{r}");
    let before_console = vm.console_text();
    let (status, err) = vm.wait_exit(STEP_TIMEOUT);
    assert_eq!(status, Some(0), "{err}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).unwrap()).unwrap();
    let kinds: Vec<&str> = state["devices"]["virtio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["block", "net", "vsock"], "{}", state["devices"]);
    // Every write the guest saw completed is in the image now.
    let verdict = verify_disk(&work, &image);
    assert!(verdict.starts_with("VIGIL-DISK-VERIFY ok"), "{verdict}");
    let seq_at_snapshot = field(&verdict, "last_seq");

    // Restore on another tap and another vsock socket path.
    taps.remove(&tap_a);
    taps.add(&tap_b);
    let vsock2 = work.join("v2.sock");
    let again = Vmm::start(
        "devices-restored",
        &[
            "--restore",
            snap.to_str().unwrap(),
            "--tap",
            &tap_b,
            "--vsock-socket",
            vsock2.to_str().unwrap(),
        ],
    );
    let last = counters(&before_console).last().copied().unwrap();
    again.wait_counter_above(Some(last + 1), STEP_TIMEOUT);
    assert_consecutive(&format!("{before_console}{}", again.console_text()));
    // The tools daemon's connection was reset; it reconnects.
    wait_tools(&again, STEP_TIMEOUT);
    assert!(vsock2.exists(), "the vsock socket moved");
    echo_retrying("vds-after\n", STEP_TIMEOUT);
    // The disk writer carries on past the snapshot; counters continue.
    again.wait_for(STEP_TIMEOUT, "disk records after the restore", |v| {
        v.console_text()
            .lines()
            .filter_map(|l| l.strip_prefix("VIGIL-DISK seq="))
            .filter_map(|s| s.trim().parse::<u64>().ok())
            .any(|s| s > seq_at_snapshot + 5)
    });
    assert!(block_counter(&again, "write_ops") > writes_before);
    again.power_off();

    let verdict = verify_disk(&work, &image);
    assert!(verdict.starts_with("VIGIL-DISK-VERIFY ok"), "{verdict}");
    assert_eq!(field(&verdict, "writers"), 1, "{verdict}");
    assert_eq!(field(&verdict, "gaps"), 0, "{verdict}");
    assert_eq!(field(&verdict, "dups"), 0, "{verdict}");
    assert!(
        field(&verdict, "last_seq") > seq_at_snapshot + 5,
        "{verdict}"
    );
    drop(taps);
    let _ = std::fs::remove_dir_all(&work);
}
