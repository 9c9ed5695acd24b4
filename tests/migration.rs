//! End-to-end live migration: the real `vigil` binary, real KVM, a real
//! guest, source and target VMM processes on this host over loopback TCP.
//!
//! The guest runs two workloads (see README.md): `dirty` rewrites a word in
//! every page of a 32 MiB buffer pass after pass, flat out, and checks that
//! each page still holds the previous pass's stamp (a page the migration
//! lost shows as `VIGIL-DIRTY-MISMATCH`); it also reports the longest gap
//! its loop saw (the guest-side downtime meter). `counter` prints
//! `VIGIL-COUNTER n uptime_ms=` every second (continuity, and kvmclock: the
//! guest's uptime must not go backwards or jump).
//!
//! The guest boots once into a base snapshot (`--stop`); every case restores
//! it as the source (well under a second), starts a target with
//! `vigil run --incoming`, and migrates. Failure cases go through a small
//! TCP relay in this file that can cut, truncate or corrupt the stream, and
//! each checks that the guest keeps running on the source with its memory
//! intact and that the target exits without ever running it. Tests hold the
//! guest lock (one guest at a time) and use ports 47200-47299. Two cases run
//! the source with an HA disk lease (`--lease`): it moves to a target started
//! with a handoff lease spec, and a target without one refuses it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod common;

use common::guest_lock;

static BASE: OnceLock<PathBuf> = OnceLock::new();

const BOOT_TIMEOUT: Duration = common::GUEST_TIMEOUT;
const STEP_TIMEOUT: Duration = common::QUICK_TIMEOUT;
/// A migration of the 128 MiB test guest takes well under a second at full
/// speed; bandwidth-capped cases take tens of seconds.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(200);

/// This run's work directory (snapshots, logs, disks), shared by its tests.
/// libtest has no hook at the end of a run, so the first call removes the
/// directories of earlier runs whose process is gone (~115 MiB each).
fn work_dir() -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    let tmp = std::env::temp_dir();
    SWEEP.call_once(|| {
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("vmg-e2e-") else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| {
                p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()
            }) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = tmp.join(format!("vmg-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vigil")
}

/// A `vigil` process (source VMM, target VMM) with its console in a file;
/// killed on drop.
struct Vmm {
    child: Child,
    console: PathBuf,
    socket: PathBuf,
    name: String,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Vmm {
    fn spawn(name: &str, args: &[&str]) -> Self {
        Self::spawn_with(name, args, &[], None)
    }

    /// `spawn`, with the command run through `prefix` (e.g. `unshare ...`)
    /// and, if given, in the memory cgroup whose `cgroup.procs` is `procs`
    /// (joined before exec, so all of the VMM's memory is charged there).
    fn spawn_with(name: &str, args: &[&str], prefix: &[String], procs: Option<PathBuf>) -> Self {
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
        let mut cmd = match prefix.split_first() {
            None => Command::new(bin()),
            Some((p0, rest)) => {
                let mut c = Command::new(p0);
                c.args(rest).arg(bin());
                c
            }
        };
        if let Some(procs) = procs {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure only opens, writes and closes a file
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || std::fs::write(&procs, "0"));
            }
        }
        let mut child = cmd
            .args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start vigil");
        let (stderr, _) = common::reader(child.stderr.take().unwrap());
        Self {
            child,
            console,
            socket,
            name: name.to_string(),
            stderr,
        }
    }

    fn boot() -> Self {
        let cmdline = common::guest_cmdline(
            "vigil.tools=off vigil.run=dirty:mib=32,rate=0,report=1+counter:every=1",
        );
        let cfg = common::guest_config();
        let v = Self::spawn(
            "boot",
            &["--config", cfg.to_str().unwrap(), "--cmdline", &cmdline],
        );
        v.wait_for(BOOT_TIMEOUT, "the dirtier's first report", |v| {
            dirty_reports(&v.console_text()).len() >= 2 && v.last_counter().is_some()
        });
        v
    }

    /// The base snapshot restored as a source VM, running (its dirtier has
    /// reported since the restore).
    fn source(name: &str) -> Self {
        let v = Self::spawn(name, &["--restore", base_snapshot().to_str().unwrap()]);
        v.wait_for(STEP_TIMEOUT, "the restored dirtier's report", |v| {
            !dirty_reports(&v.console_text()).is_empty()
        });
        v
    }

    /// A target listening on `port`.
    fn target(name: &str, port: u16) -> Self {
        Self::target_with(name, port, &[])
    }

    /// A target listening on `port` with more `vigil run` flags.
    fn target_with(name: &str, port: u16, extra: &[&str]) -> Self {
        Self::target_in(name, port, extra, &[], None)
    }

    /// A target listening on `port`, started through `prefix` and in a
    /// memory cgroup (see [`Vmm::spawn_with`]).
    fn target_in(
        name: &str,
        port: u16,
        extra: &[&str],
        prefix: &[String],
        procs: Option<PathBuf>,
    ) -> Self {
        let listen = format!("tcp:127.0.0.1:{port}");
        let mut args = vec!["--incoming", listen.as_str()];
        args.extend_from_slice(extra);
        let v = Self::spawn_with(name, &args, prefix, procs);
        v.wait_for(STEP_TIMEOUT, "the target to listen", |v| {
            v.stderr_text()
                .contains("waiting for an incoming migration")
        });
        v
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    fn last_counter(&self) -> Option<(u64, u64)> {
        counters(&self.console_text()).last().copied()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn wait_for(&self, timeout: Duration, what: &str, mut ok: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < timeout,
                "{}: timed out after {timeout:?} waiting for {what}; stderr:\n{}\nconsole:\n{}",
                self.name,
                self.stderr_text(),
                self.console_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// Starts `vigil migrate --json` against this VM in the background.
    fn migrate_bg(&self, port: u16, extra: &[&str]) -> Child {
        Command::new(bin())
            .args(["migrate", "--json", "--to", &format!("127.0.0.1:{port}")])
            .args(extra)
            .arg("--api-socket")
            .arg(&self.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits for the process to end; its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vigil migrate` run to its end: status, JSON lines, stderr.
struct MigrateRun {
    code: Option<i32>,
    lines: Vec<serde_json::Value>,
    stderr: String,
}

impl std::fmt::Debug for MigrateRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\nstderr: {}\n", self.code, self.stderr)?;
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

impl MigrateRun {
    fn last(&self) -> &serde_json::Value {
        self.lines.last().expect("vigil migrate printed no JSON")
    }
}

fn finish(child: Child, timeout: Duration) -> MigrateRun {
    let mut child = child;
    let (out, t_out) = common::reader(child.stdout.take().unwrap());
    let (err, t_err) = common::reader(child.stderr.take().unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = t_out.join();
    let _ = t_err.join();
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err.lock().unwrap()).into_owned();
    MigrateRun {
        code: status.and_then(|s| s.code()),
        lines: text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        stderr,
    }
}

/// `(pass, max_gap_ms, mismatches)` of every `VIGIL-DIRTY` report
/// (`max_gap_ms`: the longest the loop did not run since the previous
/// report).
fn dirty_reports(console: &str) -> Vec<(u64, f64, u64)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("VIGIL-DIRTY pass="))
        .filter_map(|r| {
            let mut it = r.split_whitespace();
            let pass = it.next()?.parse().ok()?;
            let gap = it.next()?.strip_prefix("max_gap_ms=")?.parse().ok()?;
            let _total = it.next()?;
            let mm = it.next()?.strip_prefix("mismatches=")?.parse().ok()?;
            Some((pass, gap, mm))
        })
        .collect()
}

/// `(n, uptime_ms)` of every complete `VIGIL-COUNTER` line.
fn counters(console: &str) -> Vec<(u64, u64)> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("VIGIL-COUNTER "))
        .filter_map(|r| {
            let (n, up) = r.split_once(" uptime_ms=")?;
            Some((n.parse().ok()?, up.trim().parse().ok()?))
        })
        .collect()
}

/// The guest's memory is intact on this console: no mismatch reported.
fn assert_no_lost_pages(who: &str, console: &str) {
    assert!(
        !console.contains("VIGIL-DIRTY-MISMATCH"),
        "{who}: the dirtier found stale pages (a lost dirty page):\n{console}"
    );
    for (pass, _, mm) in dirty_reports(console) {
        assert_eq!(mm, 0, "{who}: mismatches at pass {pass}:\n{console}");
    }
}

/// The base snapshot: the guest booted once with both workloads running,
/// stopped by `vigil snapshot --stop`. Call with the guest lock held.
fn base_snapshot() -> PathBuf {
    if let Some(p) = BASE.get() {
        return p.clone();
    }
    let vm = Vmm::boot();
    let dir = work_dir().join("base");
    let (code, out, err) = vm.cli(&["snapshot", "--to", dir.to_str().unwrap(), "--stop"]);
    assert_eq!(code, 0, "snapshot failed: {out}{err}");
    let mut vm = vm;
    assert_eq!(vm.wait_exit(STEP_TIMEOUT), Some(0), "{}", vm.stderr_text());
    BASE.get_or_init(|| dir).clone()
}

/// After a failed migration: the source VMM still runs the guest (new
/// dirtier reports and counters after `since`, memory intact), and the
/// target exited with status 1 without ever running it (empty console).
fn assert_source_survived(src: &mut Vmm, tgt: Option<&mut Vmm>) {
    let before = dirty_reports(&src.console_text()).len();
    let counter = src.last_counter().map(|c| c.0);
    src.wait_for(STEP_TIMEOUT, "the source guest to go on", |v| {
        dirty_reports(&v.console_text()).len() >= before + 2
            && v.last_counter().map(|c| c.0) > counter
    });
    assert!(src.running(), "the source VMM exited");
    assert_no_lost_pages("source", &src.console_text());
    assert_consecutive(&src.console_text());
    if let Some(t) = tgt {
        assert_eq!(
            t.wait_exit(STEP_TIMEOUT),
            Some(1),
            "target should exit with status 1; stderr:\n{}",
            t.stderr_text()
        );
        assert!(
            t.console_text().is_empty(),
            "the target ran the guest:\n{}",
            t.console_text()
        );
    }
}

fn assert_consecutive(console: &str) {
    let c: Vec<u64> = counters(console).iter().map(|c| c.0).collect();
    for w in c.windows(2) {
        assert_eq!(w[1], w[0] + 1, "counter sequence {c:?} broken:\n{console}");
    }
}

/// Migrates a source restored from the base snapshot to a new target on
/// `port` with `extra` flags, checks everything a successful migration
/// promises, and returns the summary.
fn migrate_and_verify(name: &str, port: u16, extra: &[&str]) -> serde_json::Value {
    let mut src = Vmm::source(&format!("{name}-src"));
    let mut tgt = Vmm::target(&format!("{name}-tgt"), port);
    let run = finish(src.migrate_bg(port, extra), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(0), "vigil migrate failed: {run:?}");
    let last = run.last();
    assert_eq!(last["state"], "succeeded", "{run:?}");
    assert!(
        run.lines.iter().any(|l| l["state"] == "running"),
        "no progress line: {run:?}"
    );
    let summary = last["summary"].clone();
    for k in [
        "total_s",
        "downtime_ms",
        "bytes_sent",
        "rounds",
        "max_throttle",
    ] {
        assert!(summary.get(k).is_some(), "summary lacks {k}: {summary}");
    }

    // The source stops once the target acknowledged.
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "source VMM after migrating: {}",
        src.stderr_text()
    );
    let src_console = src.console_text();
    assert_no_lost_pages("source", &src_console);

    // The target runs the same guest: its dirtier goes on verifying every
    // page each pass, and reports twice more with no mismatch.
    tgt.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
        dirty_reports(&v.console_text()).len() >= 2 && v.last_counter().is_some()
    });
    assert!(tgt.running(), "target VMM exited: {}", tgt.stderr_text());
    let tgt_console = tgt.console_text();
    assert_no_lost_pages("target", &tgt_console);
    let src_passes = dirty_reports(&src_console).last().map_or(0, |r| r.0);
    let tgt_first = dirty_reports(&tgt_console)[0].0;
    assert!(
        tgt_first > src_passes,
        "the dirtier restarted on the target (pass {tgt_first} after {src_passes})"
    );

    // The counter continues (not restarted), and the guest's clock neither
    // goes backwards nor jumps: a 1 s counter's next line comes about 1 s
    // of guest uptime later.
    let (sn, sup) = *counters(&src_console).last().expect("source counter");
    let (tn, tup) = counters(&tgt_console)[0];
    assert!(
        tn == sn + 1 || tn == sn + 2,
        "counter went from {sn} on the source to {tn} on the target"
    );
    let step = tup as i64 - sup as i64;
    let expect = 1000 * (tn - sn) as i64;
    assert!(
        (expect - 500..=expect + 1500).contains(&step),
        "guest uptime moved by {step} ms over {} counter steps (kvmclock)",
        tn - sn
    );
    assert_consecutive(&tgt_console);
    // The guest-side downtime meter: the longest gap the dirtier's loop saw
    // in the report interval that spans the switchover.
    let meter = dirty_reports(&tgt_console)[0].1;
    eprintln!(
        "{name}: total {:.3} s, downtime {:.1} ms at the source, guest stall meter {meter} ms, \
         {} bytes, {} rounds, max throttle {}%",
        summary["total_s"].as_f64().unwrap_or(0.0),
        summary["downtime_ms"].as_f64().unwrap_or(0.0),
        summary["bytes_sent"],
        summary["rounds"],
        summary["max_throttle"]
    );
    summary
}

#[test]
fn dirtying_guest_migrates_with_every_page_intact() {
    let _g = guest_lock();
    let s = migrate_and_verify("full", 47201, &["--checksum"]);
    assert_eq!(s["max_throttle"], 0, "unlimited link: no throttle needed");
}

#[test]
fn dirty_rate_above_the_link_converges_by_throttling() {
    let _g = guest_lock();
    // 32 MiB rewritten flat out, over a 40 MB/s link: the dirty set never
    // fits 100 ms without slowing the guest. Uncompressed: the dirtier's
    // pages (one word in 4 KiB) would shrink ~100x in LZ4 and fit the link.
    let s = migrate_and_verify(
        "throttled",
        47202,
        &["--bandwidth", "40", "--compress", "off"],
    );
    assert!(
        s["max_throttle"].as_u64().unwrap_or(0) > 0,
        "auto-converge never throttled: {s}"
    );
}

#[test]
fn compressed_migration_keeps_every_page_intact() {
    let _g = guest_lock();
    // LZ4 on every round before the stun, each page checked end to end
    // against the CRC of its uncompressed bytes.
    let s = migrate_and_verify("lz4", 47218, &["--compress", "on", "--checksum"]);
    let raw = s["data_pages"].as_u64().unwrap() * 4096;
    let sent = s["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < raw / 2,
        "{sent} bytes sent for {raw} bytes of data pages: {s}"
    );
}

/// A TCP relay between the source and the target that can cut, truncate
/// or corrupt the source's stream after `after` bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// Close both directions (a cut connection / truncated stream).
    Cut,
    /// Flip one bit of the byte at that offset, then carry on.
    Corrupt,
}

struct Relay {
    forwarded: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
}

impl Relay {
    /// Listens on `listen`, relays one connection to `to`.
    fn start(listen: u16, to: u16, fault: Fault, after: u64) -> Self {
        let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (fw, dn) = (forwarded.clone(), done.clone());
        std::thread::spawn(move || {
            let Ok((a, _)) = l.accept() else { return };
            let b = TcpStream::connect(("127.0.0.1", to)).unwrap();
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            // Target to source: plain copy.
            std::thread::spawn(move || pump(b2, a2));
            let (mut a, mut b) = (a, b);
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            let mut faulted = false;
            loop {
                let n = match a.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &mut buf[..n];
                if !faulted && total + n as u64 > after {
                    let at = (after - total) as usize;
                    faulted = true;
                    match fault {
                        Fault::Cut => {
                            let _ = b.write_all(&chunk[..at]);
                            let _ = a.shutdown(Shutdown::Both);
                            let _ = b.shutdown(Shutdown::Both);
                            break;
                        }
                        Fault::Corrupt => chunk[at] ^= 0x10,
                    }
                }
                if b.write_all(chunk).is_err() {
                    break;
                }
                total += n as u64;
                fw.store(total, Ordering::SeqCst);
            }
            let _ = b.shutdown(Shutdown::Write);
            dn.store(true, Ordering::SeqCst);
        });
        Self { forwarded, done }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Runs a migration through a faulty relay and checks it fails with
/// `expect` in the error while the guest stays on the source.
fn fault_case(name: &str, port: u16, fault: Fault, after: u64, expect: &str) {
    let _g = guest_lock();
    let mut src = Vmm::source(&format!("{name}-src"));
    let mut tgt = Vmm::target(&format!("{name}-tgt"), port);
    let relay = Relay::start(port + 50, port, fault, after);
    let run = finish(src.migrate_bg(port + 50, &[]), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(1), "the migration should fail: {run:?}");
    assert!(
        run.stderr.contains(expect),
        "error should mention `{expect}`: {run:?}"
    );
    assert!(
        run.stderr.contains("the VM keeps running on this host"),
        "{run:?}"
    );
    assert!(relay.forwarded.load(Ordering::SeqCst) > 0 || relay.done.load(Ordering::SeqCst));
    assert_source_survived(&mut src, Some(&mut tgt));
}

#[test]
fn connection_cut_during_precopy_leaves_the_guest_on_the_source() {
    // 4 MiB into the stream: in the full copy.
    fault_case(
        "cut",
        47203,
        Fault::Cut,
        4 << 20,
        "migration failed at precopy",
    );
}

#[test]
fn corrupted_stream_is_detected_and_the_guest_stays() {
    fault_case(
        "corrupt",
        47204,
        Fault::Corrupt,
        2 << 20,
        "migration failed",
    );
}

#[test]
fn truncated_handshake_fails_cleanly() {
    // Cut inside the first frames (hello / pre-checks).
    fault_case("trunc", 47205, Fault::Cut, 40, "migration failed at");
}

/// Reads one whole frame (header + payload) as raw bytes, or None at EOF.
fn read_frame(r: &mut TcpStream) -> Option<Vec<u8>> {
    let mut f = vec![0u8; migration::protocol::HEADER_LEN];
    r.read_exact(&mut f).ok()?;
    let len = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
    f.resize(migration::protocol::HEADER_LEN + len, 0);
    r.read_exact(&mut f[migration::protocol::HEADER_LEN..])
        .ok()?;
    Some(f)
}

fn frame_type(f: &[u8]) -> u16 {
    u16::from_le_bytes([f[4], f[5]])
}

/// What a frame relay does with one frame: pass it on (possibly
/// rewritten), or cut both directions.
type FrameHook = Box<dyn FnMut(Vec<u8>) -> Option<Vec<u8>> + Send>;

/// A relay that forwards whole frames, giving each to a hook per direction
/// (the wire layout is documented in `migration::protocol`).
fn frame_relay(listen: u16, to: u16, mut src_hook: FrameHook, mut tgt_hook: FrameHook) {
    let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            while let Some(f) = read_frame(&mut b2) {
                match tgt_hook(f) {
                    Some(f) if a2.write_all(&f).is_ok() => {}
                    _ => break,
                }
            }
            let _ = a2.shutdown(Shutdown::Both);
            let _ = b2.shutdown(Shutdown::Both);
        });
        let (mut a, mut b) = (a, b);
        while let Some(f) = read_frame(&mut a) {
            match src_hook(f) {
                Some(f) if b.write_all(&f).is_ok() => {}
                _ => break,
            }
        }
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    });
}

/// A source-side frame hook that kills the target VMM (`pid`, a child of
/// this process not yet reaped) when the source sends a `kind` frame, and
/// drops that frame; the flag says it happened.
fn kill_target_on(
    pid: u32,
    kind: migration::protocol::MessageType,
) -> (Arc<AtomicBool>, FrameHook) {
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    let hook: FrameHook = Box::new(move |f| {
        if frame_type(&f) == kind as u16 {
            // SAFETY: kill(2) on the target VMM's pid, a child of this
            // process that has not been reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            k.store(true, Ordering::SeqCst);
            return None;
        }
        Some(f)
    });
    (killed, hook)
}

#[test]
fn target_killed_during_switchover_keeps_the_guest_on_the_source() {
    let _g = guest_lock();
    let mut src = Vmm::source("killsw-src");
    let mut tgt = Vmm::target("killsw-tgt", 47210);
    // The source's State frame goes out while the guest is paused on the
    // source (stun done, switchover): kill the target right then.
    let (killed, on_src) = kill_target_on(tgt.child.id(), migration::protocol::MessageType::State);
    frame_relay(47260, 47210, on_src, Box::new(Some));
    let run = finish(src.migrate_bg(47260, &[]), MIGRATE_TIMEOUT);
    assert!(
        killed.load(Ordering::SeqCst),
        "never reached switchover: {run:?}"
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("migration failed at switchover"),
        "{run:?}"
    );
    assert!(
        tgt.wait_exit(STEP_TIMEOUT).is_none(),
        "the target was killed"
    );
    assert!(tgt.console_text().is_empty(), "the target ran the guest");
    assert_source_survived(&mut src, None);
}

#[test]
fn version_mismatch_names_both_sides_and_the_guest_stays() {
    let _g = guest_lock();
    let mut src = Vmm::source("version-src");
    let mut tgt = Vmm::target("version-tgt", 47211);
    // The target's Hello rewritten as a newer vigil's would be: it speaks
    // only a protocol version this source does not know.
    let newer = migration::protocol::VERSION_MAX + 1;
    let mut enc = migration::protocol::Encoder::new();
    let on_tgt: FrameHook = Box::new(move |f| {
        let mut dec = migration::protocol::Decoder::new();
        dec.push(&f);
        let m = dec.next_message().ok()??;
        let m = match m {
            migration::protocol::Message::Hello(mut h) => {
                h.version_min = newer;
                h.version_max = newer;
                migration::protocol::Message::Hello(h)
            }
            other => other,
        };
        let mut out = Vec::new();
        enc.send(&mut out, &m).ok()?;
        Some(out)
    });
    frame_relay(47261, 47211, Box::new(Some), on_tgt);
    let run = finish(src.migrate_bg(47261, &[]), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("migration failed at connect"),
        "{run:?}"
    );
    let v = migration::protocol::VERSION_MAX;
    for want in [format!("{newer}"), format!("{v}")] {
        assert!(
            run.stderr.contains(&want),
            "error should name version {want}: {run:?}"
        );
    }
    assert_source_survived(&mut src, Some(&mut tgt));
}

/// A slow migration (capped link) to cancel or break while it copies.
fn slow_migration(name: &str, port: u16) -> (Vmm, Vmm, Child) {
    let src = Vmm::source(&format!("{name}-src"));
    let tgt = Vmm::target(&format!("{name}-tgt"), port);
    // Uncompressed, so it stays slow whatever the guest's pages hold.
    let child = src.migrate_bg(port, &["--bandwidth", "5", "--compress", "off"]);
    // Wait until memory is moving.
    tgt.wait_for(STEP_TIMEOUT, "pre-copy to start", |_| {
        std::fs::read_to_string(work_dir().join(format!("{name}-tgt.log")))
            .unwrap_or_default()
            .contains("receiving memory")
    });
    std::thread::sleep(Duration::from_millis(500));
    (src, tgt, child)
}

#[test]
fn cancel_during_precopy_keeps_the_guest_on_the_source() {
    let _g = guest_lock();
    let (mut src, mut tgt, child) = slow_migration("cancel", 47206);
    let (code, out, err) = src.cli(&["migrate", "--cancel"]);
    assert_eq!(code, 0, "cancel: {out}{err}");
    let run = finish(child, MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.last()["state"], "cancelled", "{run:?}");
    assert!(run.stderr.contains("cancelled"), "{run:?}");
    assert_source_survived(&mut src, Some(&mut tgt));
    // Nothing left to cancel.
    let (code, _, err) = src.cli(&["migrate", "--cancel"]);
    assert_eq!(code, 1);
    assert!(err.contains("no migration is running"), "{err}");
}

#[test]
fn target_killed_during_precopy_keeps_the_guest_on_the_source() {
    let _g = guest_lock();
    let (mut src, mut tgt, child) = slow_migration("kill", 47207);
    let _ = tgt.child.kill();
    let _ = tgt.child.wait();
    let run = finish(child, MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.last()["state"], "failed", "{run:?}");
    assert!(
        run.stderr.contains("migration failed at precopy"),
        "{run:?}"
    );
    assert_source_survived(&mut src, None);
}

#[test]
fn no_target_listening_is_one_clear_error() {
    let _g = guest_lock();
    let mut src = Vmm::source("refused-src");
    let run = finish(src.migrate_bg(47208, &[]), STEP_TIMEOUT);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("cannot connect to the target 127.0.0.1:47208"),
        "{run:?}"
    );
    assert_source_survived(&mut src, None);
}

#[test]
fn incoming_flag_is_validated() {
    let o = common::vigil(&["run", "--incoming", "127.0.0.1:47209"], STEP_TIMEOUT);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("must be tcp:ADDR:PORT"), "{o:?}");
}

/// A bridge with two taps (the source's and the target's ports, as two
/// hosts' uplinks to one switch would be) and 198.18.147.1/24 on the
/// bridge; removed on drop, also when the test fails.
struct TestNet {
    bridge: String,
    taps: [String; 2],
}

impl TestNet {
    fn new() -> Self {
        let n = std::process::id() % 10_000;
        let net = TestNet {
            bridge: format!("vmgbr{n}"),
            taps: [format!("vmgs{n}"), format!("vmgt{n}")],
        };
        net.cleanup();
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().map(|s| s.success());
            assert!(
                matches!(ok, Ok(true)),
                "ip {args:?} failed (this test needs root)"
            );
        };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&["addr", "add", "198.18.147.1/24", "dev", &net.bridge]);
        ip(&["link", "set", &net.bridge, "up"]);
        for t in &net.taps {
            ip(&["tuntap", "add", "dev", t, "mode", "tap"]);
            ip(&["link", "set", t, "master", &net.bridge]);
            ip(&["link", "set", t, "up"]);
        }
        net
    }

    fn cleanup(&self) {
        for dev in self.taps.iter().chain([&self.bridge]) {
            let _ = Command::new("ip")
                .args(["link", "del", dev])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Sends `msg` on the echo connection and reads the echo back.
fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// The disk writer's journal on the host side (layout in
/// guest-tools/src/journal.rs): the sequence numbers of the records, in
/// disk order, each with a valid checksum.
fn journal_seqs(img: &std::path::Path) -> Vec<u64> {
    let data = std::fs::read(img).unwrap();
    let mut seqs = Vec::new();
    for rec in data.chunks(512) {
        if &rec[..8] != b"VIGILJ01" {
            break;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in &rec[..504] {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let sum = u64::from_le_bytes(rec[504..512].try_into().unwrap());
        if sum != h {
            break; // a torn last record
        }
        seqs.push(u64::from_le_bytes(rec[24..32].try_into().unwrap()));
    }
    seqs
}

fn disk_seqs(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("VIGIL-DISK seq="))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn vm_with_disk_nic_and_vsock_migrates_keeping_disk_connection_and_identity() {
    let _g = guest_lock();
    let net = TestNet::new();
    let dir = work_dir();
    // A shared datastore (here: one directory both "hosts" see).
    let ds = dir.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::write(
        ds.join(migration::precheck::DATASTORE_ID_FILE),
        format!("vmg-ds-{}\n", std::process::id()),
    )
    .unwrap();
    let img = ds.join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();

    let cmdline = common::guest_cmdline(
        "ip=198.18.147.2::198.18.147.1:255.255.255.0::eth0:off \
         vigil.run=disk-write:rate=20,report=1+echo+counter:every=1+dirty:mib=16,report=1",
    );
    let cfg = common::guest_config();
    let mac = "52:54:00:47:20:01";
    let mut src = Vmm::spawn(
        "dev-src",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--disk",
            &format!("path={}", img.display()),
            "--net",
            &format!("tap={},mac={mac},network=lab", net.taps[0]),
            "--vsock",
            &format!("cid=3,socket={}", dir.join("dev-src.vsock").display()),
        ],
    );
    src.wait_for(BOOT_TIMEOUT, "the workloads", |v| {
        let c = v.console_text();
        c.contains("VIGIL-ECHO-READY") && disk_seqs(&c).len() >= 2 && !dirty_reports(&c).is_empty()
    });
    // One TCP connection to the guest's echo server, kept across the move.
    let mut conn = {
        let start = Instant::now();
        loop {
            match TcpStream::connect_timeout(
                &"198.18.147.2:7777".parse().unwrap(),
                Duration::from_secs(5),
            ) {
                Ok(c) => break c,
                Err(e) if start.elapsed() > STEP_TIMEOUT => panic!("cannot reach the guest: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(echo(&mut conn, b"before\n").unwrap(), b"before\n");

    // Pre-checks: the target names the network `Lab`, the VM uses `lab`.
    let tap_t = net.taps[1].as_str();
    let mut bad = Vmm::target_with("dev-bad", 47212, &["--network", "Lab", "--tap", tap_t]);
    let run = finish(src.migrate_bg(47212, &[]), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("migration failed at precheck"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("network") && run.stderr.contains("lab") && run.stderr.contains("Lab"),
        "the error should name the check and both values: {run:?}"
    );
    assert_eq!(
        bad.wait_exit(STEP_TIMEOUT),
        Some(1),
        "{}",
        bad.stderr_text()
    );
    assert!(bad.console_text().is_empty());
    assert!(src.running());
    assert_eq!(echo(&mut conn, b"still\n").unwrap(), b"still\n");

    // The real move.
    let vsock_t = dir.join("dev-tgt.vsock");
    let mut tgt = Vmm::target_with(
        "dev-tgt",
        47213,
        &[
            "--network",
            "lab",
            "--tap",
            tap_t,
            "--vsock-socket",
            vsock_t.to_str().unwrap(),
        ],
    );
    let run = finish(src.migrate_bg(47213, &[]), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "{}",
        src.stderr_text()
    );

    // The same connection answers from the target (the RARP announcement
    // moved the guest's MAC to the target's bridge port).
    assert_eq!(
        echo(&mut conn, b"after\n").unwrap_or_else(|e| panic!(
            "the echo connection broke after migrating: {e}\ntarget:\n{}",
            tgt.console_text()
        )),
        b"after\n"
    );

    // Disk writer, counter and memory go on.
    let src_console = src.console_text();
    tgt.wait_for(STEP_TIMEOUT, "the workloads on the target", |v| {
        let c = v.console_text();
        disk_seqs(&c).len() >= 3 && dirty_reports(&c).len() >= 2 && v.last_counter().is_some()
    });
    let tgt_console = tgt.console_text();
    for c in [&src_console, &tgt_console] {
        assert!(!c.contains("VIGIL-DISK-ERROR"), "{c}");
        assert_no_lost_pages("guest", c);
    }
    let (s_last, t_first) = (
        *disk_seqs(&src_console).last().unwrap(),
        disk_seqs(&tgt_console)[0],
    );
    assert!(
        t_first > s_last,
        "disk writer went from {s_last} to {t_first}"
    );
    let (sn, _) = *counters(&src_console).last().unwrap();
    let (tn, _) = counters(&tgt_console)[0];
    assert!(tn == sn + 1 || tn == sn + 2, "counter {sn} -> {tn}");
    // The tools daemon talks to the target's VMM over the migrated vsock
    // device.
    tgt.wait_for(STEP_TIMEOUT, "guest tools heartbeats on the target", |v| {
        let (code, out, _) = v.cli(&["vm", "heartbeat", "--json"]);
        code == 0
            && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|h| h["connected"] == true)
    });

    // Stop the target; every record on the disk is there once, in order.
    let _ = tgt.child.kill();
    let _ = tgt.child.wait();
    let seqs = journal_seqs(&img);
    assert!(seqs.len() as u64 >= *disk_seqs(&tgt_console).last().unwrap());
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(
            *s,
            i as u64 + 1,
            "journal has a gap or a duplicate at record {i}"
        );
    }
    drop(net);
}

#[test]
fn two_vms_migrate_at_once_each_on_its_own_connection() {
    let _g = guest_lock();
    let mut srcs = [Vmm::source("two-a-src"), Vmm::source("two-b-src")];
    let mut tgts = [
        Vmm::target("two-a-tgt", 47214),
        Vmm::target("two-b-tgt", 47215),
    ];
    let runs: Vec<Child> = srcs
        .iter()
        .zip([47214, 47215])
        .map(|(s, port)| s.migrate_bg(port, &["--checksum"]))
        .collect();
    let runs: Vec<MigrateRun> = runs
        .into_iter()
        .map(|c| finish(c, MIGRATE_TIMEOUT))
        .collect();
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.code, Some(0), "VM {i}: {run:?}");
        assert_eq!(run.last()["state"], "succeeded", "VM {i}: {run:?}");
    }
    for (s, t) in srcs.iter_mut().zip(tgts.iter_mut()) {
        assert_eq!(s.wait_exit(STEP_TIMEOUT), Some(0), "{}", s.stderr_text());
        t.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
            dirty_reports(&v.console_text()).len() >= 2
        });
        assert!(t.running(), "{}", t.stderr_text());
        assert_no_lost_pages("target", &t.console_text());
        assert_consecutive(&t.console_text());
    }
}

/// A CA and host certificates made with rcgen: (cert, key, ca) paths.
fn tls_files(dir: &std::path::Path, ca_name: &str, hosts: &[&str]) -> Vec<[String; 3]> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let ca_path = dir.join(format!("{ca_name}.crt"));
    std::fs::write(&ca_path, ca_pem).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    hosts
        .iter()
        .map(|h| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![h.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let (c, k) = (
                dir.join(format!("{ca_name}-{h}.crt")),
                dir.join(format!("{ca_name}-{h}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            [c, k, ca_path.clone()].map(|p| p.display().to_string())
        })
        .collect()
}

fn tls_flags(f: &[String; 3]) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        f[0].clone(),
        "--tls-key".into(),
        f[1].clone(),
        "--tls-ca".into(),
        f[2].clone(),
    ]
}

#[test]
fn tls_migration_is_intact_and_a_stranger_gets_nothing() {
    let _g = guest_lock();
    let dir = work_dir().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = tls_files(&dir, "cluster", &["vmg-source", "vmg-target"]);
    let other = tls_files(&dir, "other", &["vmg-source"]);
    let target_flags = tls_flags(&cluster[1]);
    let target_args: Vec<&str> = target_flags.iter().map(String::as_str).collect();

    let mut src = Vmm::source("tls-src");
    // A source whose certificate another CA signed: refused, nothing sent.
    let mut tgt = Vmm::target_with("tls-stranger-tgt", 47216, &target_args);
    let mut flags = tls_flags(&other[0]);
    flags.extend(["--tls-name".to_string(), "vmg-target".to_string()]);
    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
    let run = finish(src.migrate_bg(47216, &f), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("TLS handshake"), "{run:?}");
    assert_eq!(
        tgt.wait_exit(STEP_TIMEOUT),
        Some(1),
        "{}",
        tgt.stderr_text()
    );
    assert!(tgt.stderr_text().contains("TLS"), "{}", tgt.stderr_text());
    assert!(tgt.console_text().is_empty());
    assert_source_survived(&mut src, None);

    // The cluster's own certificates: the migration goes through, intact.
    let mut tgt = Vmm::target_with("tls-tgt", 47217, &target_args);
    let mut flags = tls_flags(&cluster[0]);
    flags.extend(["--tls-name".to_string(), "vmg-target".to_string()]);
    flags.push("--checksum".into());
    let f: Vec<&str> = flags.iter().map(String::as_str).collect();
    let run = finish(src.migrate_bg(47217, &f), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "{}",
        src.stderr_text()
    );
    tgt.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
        dirty_reports(&v.console_text()).len() >= 2
    });
    assert!(tgt.running());
    assert_no_lost_pages("target", &tgt.console_text());
}

// ---------------------------------------------------------------------
// Pre-checks (M5) and --priority (M6): each check refusing a real guest,
// which keeps running on the source with nothing lost.
// ---------------------------------------------------------------------

/// A memory cgroup under this test process's own, with a limit; removed
/// on drop (its processes must have exited). cgroup v2 when its hierarchy
/// has the memory controller, else the v1 memory hierarchy (hosts that
/// mount the controllers the v1 way, as this project's test machines do).
struct MemCgroup {
    dir: PathBuf,
}

impl MemCgroup {
    fn new(tag: &str, limit_mib: u64) -> Self {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let field = |pred: &dyn Fn(&str) -> bool| {
            cgroup.lines().find_map(|l| {
                let mut it = l.splitn(3, ':');
                let (_, c, p) = (it.next()?, it.next()?, it.next()?);
                pred(c).then(|| p.trim_start_matches('/').to_string())
            })
        };
        let v2_root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|r| {
                std::fs::read_to_string(r.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
            });
        let (parent, max_file) = match v2_root {
            Some(root) => (
                root.join(field(&|c| c.is_empty()).unwrap_or_default()),
                "memory.max",
            ),
            None => (
                PathBuf::from("/sys/fs/cgroup/memory")
                    .join(field(&|c| c.split(',').any(|x| x == "memory")).unwrap_or_default()),
                "memory.limit_in_bytes",
            ),
        };
        let dir = parent.join(format!("vmg-e2e-{}-{tag}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create memory cgroup {}: {e} (this test needs root and a writable \
                 cgroup v2 with the memory controller, or a v1 memory hierarchy)",
                dir.display()
            )
        });
        std::fs::write(dir.join(max_file), format!("{}", limit_mib << 20))
            .unwrap_or_else(|e| panic!("cannot set {}/{max_file}: {e}", dir.display()));
        Self { dir }
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Processes killed just now may take a moment to leave.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.dir.display());
    }
}

/// `vigil migrate` to `port` that the target's pre-checks refuse: exit 1,
/// the precheck stage named, each of `want` in the error.
fn refused(src: &Vmm, port: u16, extra: &[&str], want: &[&str]) -> String {
    let run = finish(src.migrate_bg(port, extra), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.last()["state"], "failed", "{run:?}");
    assert!(
        run.stderr
            .contains("migration failed at precheck: pre-checks failed on the target"),
        "{run:?}"
    );
    for w in want {
        assert!(
            run.stderr.contains(w),
            "the error should say {w:?}: {run:?}"
        );
    }
    assert!(
        run.stderr.contains("the VM keeps running on this host"),
        "{run:?}"
    );
    eprintln!("refused as expected: {}", run.stderr.trim());
    run.stderr
}

#[test]
fn memory_precheck_and_priority_high_versus_standard() {
    let _g = guest_lock();
    let mut src = Vmm::source("mem-src");

    // A target whose memory cgroup leaves less than the guest uses now:
    // even standard priority is refused, with both sides' figures.
    let tiny = MemCgroup::new("tiny", 24);
    let mut tgt = Vmm::target_in("mem-tiny-tgt", 47230, &[], &[], Some(tiny.procs()));
    let err = refused(
        &src,
        47230,
        &[],
        &[
            "memory: source VM default: priority standard needs the ",
            "MiB in use of 128 MiB guest memory",
            "MiB reservable on",
            "limit 24 MiB",
            "MemAvailable",
            "free memory on",
        ],
    );
    let in_use: u64 = err
        .split("needs the ")
        .nth(1)
        .and_then(|r| r.split(" MiB in use").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no in-use figure: {err}"));
    assert!(
        (32..=128).contains(&in_use),
        "the guest's 32 MiB dirtier buffer alone is resident, yet in use = {in_use} MiB: {err}"
    );
    assert_source_survived(&mut src, Some(&mut tgt));
    drop(tgt);
    drop(tiny);

    // A target with room for what the guest uses, not for all of guest
    // memory and the buffers: high is refused (and told about standard) ...
    let mid = MemCgroup::new("mid", 144);
    let mut tgt = Vmm::target_in("mem-high-tgt", 47231, &[], &[], Some(mid.procs()));
    refused(
        &src,
        47231,
        &["--priority", "high"],
        &[
            "priority high needs all 128 MiB of guest memory + 32 MiB of migration buffers = 160 MiB",
            "limit 144 MiB",
            "or migrate with --priority standard",
        ],
    );
    assert_source_survived(&mut src, Some(&mut tgt));
    drop(tgt);

    // ... and standard proceeds: the guest runs on that target, intact.
    let mut tgt = Vmm::target_in("mem-std-tgt", 47232, &[], &[], Some(mid.procs()));
    let run = finish(
        src.migrate_bg(47232, &["--priority", "standard"]),
        MIGRATE_TIMEOUT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "{}",
        src.stderr_text()
    );
    let src_console = src.console_text();
    tgt.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
        dirty_reports(&v.console_text()).len() >= 2 && v.last_counter().is_some()
    });
    assert!(tgt.running(), "{}", tgt.stderr_text());
    assert_no_lost_pages("target", &tgt.console_text());
    let (sn, _) = *counters(&src_console).last().unwrap();
    let (tn, _) = counters(&tgt.console_text())[0];
    assert!(tn == sn + 1 || tn == sn + 2, "counter {sn} -> {tn}");

    // High priority to a target with room: it commits all of guest memory
    // before pre-copy, and the guest moves on.
    let far = Vmm::target("mem-roomy-tgt", 47233);
    let run = finish(
        tgt.migrate_bg(47233, &["--priority", "high"]),
        MIGRATE_TIMEOUT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let log = std::fs::read_to_string(work_dir().join("mem-roomy-tgt.log")).unwrap_or_default();
    assert!(
        log.contains("guest memory committed (priority high)"),
        "the target did not commit guest memory:\n{log}"
    );
    assert_eq!(
        tgt.wait_exit(STEP_TIMEOUT),
        Some(0),
        "{}",
        tgt.stderr_text()
    );
    far.wait_for(
        STEP_TIMEOUT,
        "two dirtier reports after the second move",
        |v| dirty_reports(&v.console_text()).len() >= 2,
    );
    assert_no_lost_pages("second target", &far.console_text());
    drop(tgt);
    drop(mid);
}

static BASE_HOST_CPU_DISK: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

/// A second base snapshot: the guest booted with the `host` CPU template
/// and a disk on a datastore. Returns (snapshot, datastore directory).
fn host_cpu_disk_snapshot() -> (PathBuf, PathBuf) {
    if let Some(p) = BASE_HOST_CPU_DISK.get() {
        return p.clone();
    }
    let dir = work_dir();
    let ds = dir.join("ds-pre");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::write(
        ds.join(migration::precheck::DATASTORE_ID_FILE),
        format!("vmg-ds-pre-{}\n", std::process::id()),
    )
    .unwrap();
    std::fs::write(ds.join("disk.img"), vec![0u8; 4 << 20]).unwrap();
    let cmdline = common::guest_cmdline(
        "vigil.tools=off vigil.run=dirty:mib=32,rate=0,report=1+counter:every=1",
    );
    let cfg = common::guest_config();
    let disk = format!("path={}", ds.join("disk.img").display());
    let vm = Vmm::spawn(
        "hostcpu-boot",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--cpu-template",
            "host",
            "--disk",
            &disk,
        ],
    );
    vm.wait_for(BOOT_TIMEOUT, "the dirtier's first report", |v| {
        dirty_reports(&v.console_text()).len() >= 2 && v.last_counter().is_some()
    });
    let snap = dir.join("base-hostcpu");
    let (code, out, err) = vm.cli(&["snapshot", "--to", snap.to_str().unwrap(), "--stop"]);
    assert_eq!(code, 0, "snapshot failed: {out}{err}");
    let mut vm = vm;
    assert_eq!(vm.wait_exit(STEP_TIMEOUT), Some(0), "{}", vm.stderr_text());
    BASE_HOST_CPU_DISK.get_or_init(|| (snap, ds)).clone()
}

fn host_cpu_disk_source(name: &str) -> (Vmm, PathBuf) {
    let (snap, ds) = host_cpu_disk_snapshot();
    let v = Vmm::spawn(name, &["--restore", snap.to_str().unwrap()]);
    v.wait_for(STEP_TIMEOUT, "the restored dirtier's report", |v| {
        !dirty_reports(&v.console_text()).is_empty()
    });
    (v, ds)
}

#[test]
fn cpu_limit_on_the_target_refuses_a_host_template_guest() {
    let _g = guest_lock();
    let (mut src, _) = host_cpu_disk_source("cpu-src");
    let mut tgt = Vmm::target_with("cpu-tgt", 47234, &["--cpu-limit", "baseline"]);
    let err = refused(
        &src,
        47234,
        &[],
        &[
            "cpu: source template host uses ",
            "limited to the baseline CPU template by --cpu-limit) lacks ",
            "start the VM with the `baseline` CPU template",
        ],
    );
    // The missing features are named, not only numbered: every feature
    // the baseline template hides that KVM here offers.
    assert!(
        err.contains(" (cpuid.0x") && !err.contains("lacks (cpuid"),
        "features should read `avx2 (cpuid.0x7.0.ebx[5])`: {err}"
    );
    assert!(!err.contains("disk:") && !err.contains("memory:"), "{err}");
    assert_source_survived(&mut src, Some(&mut tgt));
}

/// `unshare` prefix: the target sees `over` mounted at `at` (another
/// host's view of the datastore path).
fn other_mount(over: &std::path::Path, at: &std::path::Path) -> Vec<String> {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"",
        "sh",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([over.display().to_string(), at.display().to_string()])
    .collect()
}

#[test]
fn disk_precheck_refuses_a_missing_or_different_datastore() {
    let _g = guest_lock();
    let (mut src, ds) = host_cpu_disk_source("disk-src");
    let ds_id = format!("vmg-ds-pre-{}", std::process::id());
    let disk = ds.join("disk.img").display().to_string();

    // The target host has nothing mounted at the datastore's path.
    let empty = work_dir().join("not-mounted");
    std::fs::create_dir_all(&empty).unwrap();
    let mut tgt = Vmm::target_in("disk-none-tgt", 47235, &[], &other_mount(&empty, &ds), None);
    refused(
        &src,
        47235,
        &[],
        &[
            &format!("disk: source {disk} on datastore {ds_id}"),
            &format!("target cannot resolve {disk}"),
            &format!("mount datastore {ds_id} on "),
        ],
    );
    assert_source_survived(&mut src, Some(&mut tgt));

    // The target has another datastore at that path, with a file of the
    // same name: the same path is not the same disk.
    let other = work_dir().join("other-ds");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join(migration::precheck::DATASTORE_ID_FILE),
        "vmg-other-datastore\n",
    )
    .unwrap();
    std::fs::write(other.join("disk.img"), vec![0u8; 4 << 20]).unwrap();
    let mut tgt = Vmm::target_in(
        "disk-other-tgt",
        47236,
        &[],
        &other_mount(&other, &ds),
        None,
    );
    refused(
        &src,
        47236,
        &[],
        &[
            &format!("disk: source {disk} = {ds_id}:disk.img"),
            &format!("target {disk} = vmg-other-datastore:disk.img"),
            &format!(
                "has a different datastore mounted at this path: mount datastore {ds_id} there"
            ),
        ],
    );
    assert_source_survived(&mut src, Some(&mut tgt));
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_host_block_device_disk_is_refused_as_host_local() {
    let _g = guest_lock();
    let img = work_dir().join("raw-device.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
        .expect("losetup");
    assert!(
        out.status.success(),
        "cannot attach a loop device (the test needs root and /dev/loop-control): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let cmdline = common::guest_cmdline(
        "vigil.tools=off vigil.run=dirty:mib=8,rate=0,report=1+counter:every=1",
    );
    let cfg = common::guest_config();
    let mut src = Vmm::spawn(
        "dev-local-src",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--disk",
            &format!("path={}", dev.0),
        ],
    );
    src.wait_for(BOOT_TIMEOUT, "the guest's workloads", |v| {
        !dirty_reports(&v.console_text()).is_empty() && v.last_counter().is_some()
    });
    let mut tgt = Vmm::target("dev-local-tgt", 47237);
    // The console has the guest shell's prompt among the first counter
    // lines: continuity is checked from here on.
    let from = src.console_text().len();
    let err = refused(
        &src,
        47237,
        &[],
        &[
            &format!(
                "device: source host-local device disk {} (block device 7:",
                dev.0
            ),
            "cannot provide it",
            &format!("detach disk {}", dev.0),
        ],
    );
    // One failure for the device, not a second one calling it a disk off
    // any datastore.
    assert!(!err.contains("is on no datastore"), "{err}");
    let counter = src.last_counter().map(|c| c.0);
    let reports = dirty_reports(&src.console_text()).len();
    src.wait_for(STEP_TIMEOUT, "the source guest to go on", |v| {
        dirty_reports(&v.console_text()).len() >= reports + 2
            && v.last_counter().map(|c| c.0) > counter
    });
    assert!(src.running(), "the source VMM exited");
    assert_no_lost_pages("source", &src.console_text());
    assert_consecutive(&src.console_text()[from..]);
    assert_eq!(
        tgt.wait_exit(STEP_TIMEOUT),
        Some(1),
        "{}",
        tgt.stderr_text()
    );
    assert!(tgt.console_text().is_empty(), "the target ran the guest");
    drop(src);
    drop(dev);
}

#[test]
fn priority_high_is_refused_by_a_source_without_room_for_its_buffers() {
    let _g = guest_lock();
    // The running source joins a memory cgroup that leaves it less room
    // than a high-priority migration's buffers (charges made before the
    // move stay where they were, so the guest's memory does not count).
    let cg = MemCgroup::new("srcroom", 24);
    let mut src = Vmm::source("src-room-src");
    std::fs::write(cg.procs(), src.child.id().to_string()).unwrap();
    let mut tgt = Vmm::target("src-room-tgt", 47238);
    let run = finish(
        src.migrate_bg(47238, &["--priority", "high"]),
        MIGRATE_TIMEOUT,
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    let want = format!(
        "priority high needs {} MiB of migration buffers here",
        migration::precheck::MIGRATION_BUFFER_MIB
    );
    for w in [
        "migration refused before connecting: pre-check failed on the source: memory: source ",
        "limit 24 MiB",
        want.as_str(),
        "target not asked",
        "or migrate with --priority standard",
        "the VM keeps running on this host",
    ] {
        assert!(
            run.stderr.contains(w),
            "the error should say {w:?}: {run:?}"
        );
    }
    eprintln!("refused as expected: {}", run.stderr.trim());
    // Nothing reached the target: it still waits.
    assert!(tgt.running(), "{}", tgt.stderr_text());
    assert_source_survived(&mut src, None);
    // Standard priority reserves nothing on the source: it moves.
    let run = finish(src.migrate_bg(47238, &[]), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "{}",
        src.stderr_text()
    );
    tgt.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
        dirty_reports(&v.console_text()).len() >= 2
    });
    assert_no_lost_pages("target", &tgt.console_text());
    drop(src);
    drop(cg);
}

/// A datastore directory for a lease: the record `vm.lease` held by
/// `host-a` at generation 1, and two lease specs: `src.toml` (host-a,
/// generation 1, acquired when the source starts) and `tgt.toml` (host-b,
/// `handoff = true`).
/// Renew 300 ms, I/O timeout 300 ms, stop 3000 ms.
struct LeaseDir {
    dir: PathBuf,
}

impl LeaseDir {
    fn new(name: &str) -> Self {
        let dir = work_dir().join(format!("{name}-ds"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = Self { dir };
        vmm::lease::write_record(
            &d.record(),
            &vmm::lease::LeaseRecord {
                owner: Some("host-a".into()),
                generation: 1,
                counter: 0,
            },
        )
        .unwrap();
        std::fs::write(d.spec("tgt"), d.spec_text("host-b", 0, 0, true)).unwrap();
        d
    }

    fn spec_text(&self, owner: &str, generation: u64, acquired: u64, handoff: bool) -> String {
        format!(
            "file = {:?}\nowner = {owner:?}\ngeneration = {generation}\n\
             acquired_mono_ms = {acquired}\nrenew_interval_ms = 300\nio_timeout_ms = 300\n\
             stop_time_ms = 3000\nhandoff = {handoff}\n",
            self.record()
        )
    }

    /// The source's spec, acquired now (the agent writes it right before
    /// it starts the VMM).
    fn source_spec(&self) -> PathBuf {
        let p = self.spec("src");
        let status = self.dir.join("src-status.json");
        let text = self.spec_text("host-a", 1, vmm::lease::mono_ms(), false);
        std::fs::write(&p, format!("{text}status = {status:?}\n")).unwrap();
        p
    }

    fn record(&self) -> PathBuf {
        self.dir.join("vm.lease")
    }

    fn spec(&self, which: &str) -> PathBuf {
        self.dir.join(format!("{which}.toml"))
    }

    fn read(&self) -> vmm::lease::LeaseRecord {
        vmm::lease::read_record(&self.record())
            .unwrap()
            .expect("no lease record")
    }

    /// Waits until the record names `owner` at `generation` with a counter
    /// above `above`; returns the counter.
    fn renewed(&self, owner: &str, generation: u64, above: u64) -> u64 {
        let start = Instant::now();
        loop {
            let r = self.read();
            if r.owner.as_deref() == Some(owner) && r.generation == generation && r.counter > above
            {
                return r.counter;
            }
            assert!(
                start.elapsed() < STEP_TIMEOUT,
                "the lease is not renewed by {owner} at generation {generation}: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The base snapshot restored as a source VM holding the lease of `ds`.
fn leased_source(name: &str, ds: &LeaseDir) -> Vmm {
    let snap = base_snapshot();
    let spec = ds.source_spec();
    let v = Vmm::spawn(
        name,
        &[
            "--restore",
            snap.to_str().unwrap(),
            "--lease",
            spec.to_str().unwrap(),
        ],
    );
    v.wait_for(STEP_TIMEOUT, "the restored dirtier's report", |v| {
        !dirty_reports(&v.console_text()).is_empty()
    });
    v
}

#[test]
fn the_lease_moves_with_the_vm_to_a_handoff_target() {
    let _g = guest_lock();
    let ds = LeaseDir::new("lease-move");
    let mut src = leased_source("lease-move-src", &ds);
    ds.renewed("host-a", 1, 2);
    let tgt_spec = ds.spec("tgt");
    let mut tgt = Vmm::target_with(
        "lease-move-tgt",
        47290,
        &["--lease", tgt_spec.to_str().unwrap()],
    );
    // The target holds no lease while it waits.
    assert_eq!(ds.read().owner.as_deref(), Some("host-a"));
    let run = finish(src.migrate_bg(47290, &[]), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(0), "vigil migrate failed: {run:?}");
    assert_eq!(run.last()["state"], "succeeded", "{run:?}");
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "source VMM after migrating: {}",
        src.stderr_text()
    );
    // The target claimed generation 2 (the claim file is its own) and keeps
    // renewing it; the source, gone, released nothing.
    let c1 = ds.renewed("host-b", 2, 0);
    let c2 = ds.renewed("host-b", 2, c1 + 2);
    assert!(c2 > c1);
    let claim = std::fs::read_to_string(ds.dir.join("vm.lease.claim.2")).unwrap();
    assert!(claim.starts_with("host-b vmm "), "{claim}");
    assert!(!ds.dir.join("vm.lease.claim.3").exists());
    // What the source's agent reads last.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ds.dir.join("src-status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "handed-over", "{status}");
    assert_eq!(status["generation"], 1, "{status}");
    // The guest goes on on the target, its counter continuing.
    tgt.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
        dirty_reports(&v.console_text()).len() >= 2 && v.last_counter().is_some()
    });
    assert!(tgt.running(), "target VMM exited: {}", tgt.stderr_text());
    let (sn, _) = *counters(&src.console_text())
        .last()
        .expect("source counter");
    let (tn, _) = counters(&tgt.console_text())[0];
    assert!(
        tn == sn + 1 || tn == sn + 2,
        "counter went from {sn} on the source to {tn} on the target"
    );
    assert_no_lost_pages("source", &src.console_text());
    assert_no_lost_pages("target", &tgt.console_text());
    assert_consecutive(&tgt.console_text());
}

#[test]
fn a_leased_vm_is_refused_by_a_target_without_a_lease() {
    let _g = guest_lock();
    let ds = LeaseDir::new("lease-refused");
    let mut src = leased_source("lease-refused-src", &ds);
    let c0 = ds.renewed("host-a", 1, 1);
    let mut tgt = Vmm::target("lease-refused-tgt", 47291);
    let record = ds.record();
    refused(
        &src,
        47291,
        &[],
        &[
            &format!(
                "the VM holds an HA disk lease ({}, generation 1); the target has none: migrate \
             HA-protected VMs with `vigil vm migrate",
                record.display()
            ),
            "or start the target with --lease and handoff = true",
        ],
    );
    assert_source_survived(&mut src, Some(&mut tgt));
    // Still the source's lease, still renewed.
    ds.renewed("host-a", 1, c0 + 2);
    assert!(!ds.dir.join("vm.lease.claim.2").exists());
}

#[test]
fn an_incoming_vmm_renews_a_lease_of_its_own_from_the_moment_it_listens() {
    let _g = guest_lock();
    let ds = LeaseDir::new("lease-own");
    // The agent acquired generation 5 for a VM coming from a source
    // without a lease.
    vmm::lease::write_record(
        &ds.record(),
        &vmm::lease::LeaseRecord {
            owner: Some("host-b".into()),
            generation: 5,
            counter: 0,
        },
    )
    .unwrap();
    let mut src = Vmm::source("lease-own-src");
    let spec = ds.spec("own");
    std::fs::write(
        &spec,
        ds.spec_text("host-b", 5, vmm::lease::mono_ms(), false),
    )
    .unwrap();
    let mut tgt = Vmm::target_with("lease-own-tgt", 47292, &["--lease", spec.to_str().unwrap()]);
    // Renewed while no memory has arrived yet (longer than the stop time).
    std::thread::sleep(Duration::from_millis(3500));
    let c0 = ds.renewed("host-b", 5, 5);
    let run = finish(src.migrate_bg(47292, &[]), MIGRATE_TIMEOUT);
    assert_eq!(run.code, Some(0), "vigil migrate failed: {run:?}");
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "{}",
        src.stderr_text()
    );
    tgt.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
        dirty_reports(&v.console_text()).len() >= 2
    });
    assert!(tgt.running(), "target VMM exited: {}", tgt.stderr_text());
    ds.renewed("host-b", 5, c0 + 2);
    assert!(!ds.dir.join("vm.lease.claim.6").exists());
}

#[test]
fn a_leased_source_reclaims_its_lease_when_the_target_dies_before_claiming() {
    let _g = guest_lock();
    let ds = LeaseDir::new("lease-race-won");
    let mut src = leased_source("lease-won-src", &ds);
    ds.renewed("host-a", 1, 1);
    let tgt_spec = ds.spec("tgt");
    let mut tgt = Vmm::target_with(
        "lease-won-tgt",
        47294,
        &["--lease", tgt_spec.to_str().unwrap()],
    );
    // `Complete` carries the lease: the source has sent it once the frame
    // is written; the target dies before it can claim generation 2.
    let (killed, on_src) =
        kill_target_on(tgt.child.id(), migration::protocol::MessageType::Complete);
    frame_relay(47293, 47294, on_src, Box::new(Some));
    let run = finish(src.migrate_bg(47293, &[]), MIGRATE_TIMEOUT);
    assert!(
        killed.load(Ordering::SeqCst),
        "never reached Complete: {run:?}"
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("the VM keeps running on this host"),
        "{run:?}"
    );
    assert!(
        tgt.wait_exit(STEP_TIMEOUT).is_none(),
        "the target was killed"
    );
    // The source won the claim of generation 2 and runs the guest under it.
    let claim = std::fs::read_to_string(ds.dir.join("vm.lease.claim.2")).unwrap();
    assert!(claim.starts_with("host-a vmm "), "{claim}");
    let c = ds.renewed("host-a", 2, 0);
    assert_source_survived(&mut src, None);
    ds.renewed("host-a", 2, c + 2);
}

#[test]
fn a_lost_ack_leaves_the_guest_with_the_target_that_holds_the_lease() {
    let _g = guest_lock();
    let ds = LeaseDir::new("lease-race-lost");
    let mut src = leased_source("lease-lost-src", &ds);
    ds.renewed("host-a", 1, 1);
    let tgt_spec = ds.spec("tgt");
    let mut tgt = Vmm::target_with(
        "lease-lost-tgt",
        47296,
        &["--lease", tgt_spec.to_str().unwrap()],
    );
    let cut = Arc::new(AtomicBool::new(false));
    let c = cut.clone();
    // The target claimed generation 2 and runs the guest; its ack is lost.
    let on_tgt: FrameHook = Box::new(move |f| {
        if frame_type(&f) == migration::protocol::MessageType::Resumed as u16 {
            c.store(true, Ordering::SeqCst);
            return None;
        }
        Some(f)
    });
    frame_relay(47295, 47296, Box::new(Some), on_tgt);
    let run = finish(src.migrate_bg(47295, &[]), MIGRATE_TIMEOUT);
    assert!(cut.load(Ordering::SeqCst), "never reached Resumed: {run:?}");
    // The source lost the race: it stops as migrated, without a write.
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.last()["state"], "succeeded", "{run:?}");
    assert_eq!(run.last()["ack_lost"], true, "{run:?}");
    assert_eq!(
        src.wait_exit(STEP_TIMEOUT),
        Some(0),
        "source VMM: {}",
        src.stderr_text()
    );
    let claim = std::fs::read_to_string(ds.dir.join("vm.lease.claim.2")).unwrap();
    assert!(claim.starts_with("host-b vmm "), "{claim}");
    let c1 = ds.renewed("host-b", 2, 0);
    tgt.wait_for(STEP_TIMEOUT, "two dirtier reports on the target", |v| {
        dirty_reports(&v.console_text()).len() >= 2 && v.last_counter().is_some()
    });
    assert!(tgt.running(), "target VMM exited: {}", tgt.stderr_text());
    assert_no_lost_pages("target", &tgt.console_text());
    assert_consecutive(&tgt.console_text());
    ds.renewed("host-b", 2, c1 + 2);
}
