//! VM monitoring (H11) against a real guest: the decision core
//! (`ha::monitoring::VmMonitor` and `IoTracker`) fed once a second from the
//! real VMM's control API, as the agent runtime will feed it (tools
//! heartbeat from `GET /vm/heartbeat`, block and net counters from
//! `GET /vm/counters`), and its resets carried out with `POST /vm/reset`.
//! The agent process itself is not involved; its wiring is tested on the
//! simulated cluster in `ha/src/sim/`.
//!
//! One guest, with the tools daemon, a disk and short custom timings:
//! 1. the daemon is killed from the console while a disk writer runs: no
//!    reset while the guest writes; reset once it has been idle for the
//!    I/O window;
//! 2. in each new boot the daemon is killed again in an idle guest: reset
//!    after the failure interval, up to 3 resets in the window;
//! 3. the 4th hang in the window is left alone (reset limit reached).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ha::monitoring::{
    IoTracker, MonitorDecision, MonitoringMode, MonitoringSettings, Sensitivity, VmMonitor,
};
use ha::time::Time;
use vmm::api::client;

mod common;

const FAILURE: Duration = Duration::from_secs(10);
const IO_WINDOW: Duration = Duration::from_secs(15);
/// Covers a guest boot on a busy nested-KVM host (tools up in ~20-40 s on
/// an idle 2-core machine, 50-60 s with other guests booting beside it).
const GRACE: Duration = Duration::from_secs(90);
const STEP_TIMEOUT: Duration = Duration::from_secs(240);

struct Guest {
    vm: common::Console,
    api: PathBuf,
    dir: PathBuf,
}

impl Guest {
    fn boot() -> Self {
        let cfg = common::guest_config();
        let dir = std::env::temp_dir().join(format!("vhp-monitor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let api = dir.join("api.sock");
        let vm = common::Console::spawn(
            Command::new(env!("CARGO_BIN_EXE_vigil"))
                .args([
                    "run",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--console",
                    "stdio",
                ])
                .args(["--api-socket", api.to_str().unwrap()])
                .args(["--disk", &format!("path={}", disk.display())])
                .args([
                    "--vsock",
                    &format!("cid=3,socket={}", dir.join("vsock").display()),
                ]),
        );
        Guest { vm, api, dir }
    }

    fn output(&self) -> String {
        self.vm.text()
    }

    fn type_line(&mut self, line: &str) {
        self.vm.type_line(line)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vm.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the agent runtime does for one VM, once a second.
struct Watcher {
    monitor: VmMonitor,
    io: IoTracker,
    origin: Instant,
    resets: Vec<(Instant, String)>,
    limit_reached: bool,
    last_io: Option<Instant>,
}

impl Watcher {
    fn new() -> Self {
        let settings = MonitoringSettings {
            mode: MonitoringMode::Vm,
            sensitivity: Sensitivity::Custom {
                failure_interval: FAILURE,
                reset_window: Duration::from_secs(3600),
            },
            io_window: IO_WINDOW,
            grace_period: GRACE,
            max_resets: 3,
        };
        Self {
            monitor: VmMonitor::new(settings, Time::ZERO),
            io: IoTracker::default(),
            origin: Instant::now(),
            resets: Vec::new(),
            limit_reached: false,
            last_io: None,
        }
    }

    fn step(&mut self, g: &Guest) {
        let now = Time::from_millis(self.origin.elapsed().as_millis() as u64);
        let short = Duration::from_secs(5);
        // The API socket is briefly gone while a reset rebuilds the VM.
        if let Ok(hb) = client::call(&g.api, "GET", "/vm/heartbeat", None, short) {
            if hb["ms_since_tools_heartbeat"]
                .as_u64()
                .is_some_and(|ms| ms < 1500)
            {
                self.monitor.heartbeat(now);
            }
        }
        if let Ok(c) = client::call(&g.api, "GET", "/vm/counters", None, short) {
            let total: u64 = c["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["kind"] == "block" || d["kind"] == "net")
                .flat_map(|d| d["counters"].as_object().into_iter().flatten())
                .filter_map(|(_, v)| v.as_u64())
                .sum();
            if self.io.observe(total) {
                self.monitor.io_activity(now);
                self.last_io = Some(Instant::now());
            }
        }
        match self.monitor.evaluate(now) {
            MonitorDecision::Reset { reason } => {
                let body = serde_json::json!({ "reason": reason });
                let r = client::call(&g.api, "POST", "/vm/reset", Some(&body), short);
                assert!(r.is_ok(), "reset failed: {r:?}\n{}", g.output());
                self.resets.push((Instant::now(), reason));
            }
            MonitorDecision::ResetLimitReached { resets } => {
                assert_eq!(resets, 3);
                self.limit_reached = true;
            }
            _ => {}
        }
    }

    /// Steps once a second until `done` (or panics after `timeout`).
    fn run_until(
        &mut self,
        g: &Guest,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Self, &str) -> bool,
    ) {
        let start = Instant::now();
        loop {
            self.step(g);
            if done(self, &g.output()) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; resets {:?}\n{}",
                self.resets,
                g.output()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn count(s: &str, needle: &str) -> usize {
    s.matches(needle).count()
}

/// Boot number `n` is up: its tools connected and its shell prompts.
fn booted_with_tools(o: &str, n: usize) -> bool {
    count(o, "VIGIL-BOOT-OK") == n
        && o.rsplit("VIGIL-BOOT-OK")
            .next()
            .is_some_and(|t| t.contains("VIGIL-TOOLS-CONNECTED") && t.contains("vigil-guest:"))
}

#[test]
fn monitoring_resets_a_hung_idle_guest_spares_a_busy_one_and_stops_at_three() {
    let _l = common::guest_lock();
    let mut g = Guest::boot();
    let mut w = Watcher::new();

    // 1. Tools killed while a disk writer runs (2 records/s for 20 s).
    w.run_until(
        &g,
        "the tools and a shell",
        common::GUEST_TIMEOUT,
        |_, o| booted_with_tools(o, 1),
    );
    // Short lines: the serial console takes 64 bytes of input at a time.
    g.type_line("killall vigil-tools");
    let t = Instant::now();
    w.run_until(&g, "a pause", STEP_TIMEOUT, |_, _| {
        t.elapsed() > Duration::from_secs(2)
    });
    g.type_line("vigil-tools disk-write rate=2,count=40 &");
    w.run_until(&g, "the writer done", STEP_TIMEOUT, |_, o| {
        o.contains("VIGIL-DISK-DONE seq=40")
    });
    let writer_done = Instant::now();
    assert!(
        w.resets.is_empty(),
        "reset while the guest was writing to its disk: {:?}",
        w.resets
    );
    assert!(
        w.last_io.is_some(),
        "the disk writes were not seen in the counters"
    );
    w.run_until(&g, "the first reset", STEP_TIMEOUT, |w, _| {
        !w.resets.is_empty()
    });
    let (at, reason) = w.resets[0].clone();
    // Not before the I/O window after the last write (the writer's last
    // record came within a second or two of its DONE line).
    assert!(
        at.duration_since(writer_done) + Duration::from_secs(2) >= IO_WINDOW,
        "reset {:?} after the writer finished, I/O window {IO_WINDOW:?}",
        at.duration_since(writer_done)
    );
    assert!(
        reason.starts_with("VM monitoring: no guest tools heartbeat for"),
        "{reason}"
    );

    // 2. Resets 2 and 3: each new boot's daemon is killed in an idle guest.
    for n in 2..=3 {
        w.run_until(
            &g,
            "the next boot's tools",
            common::GUEST_TIMEOUT,
            |_, o| booted_with_tools(o, n),
        );
        let killed = Instant::now();
        g.type_line("killall vigil-tools");
        w.run_until(&g, "the next reset", STEP_TIMEOUT, |w, _| {
            w.resets.len() == n
        });
        let after = w.resets[n - 1].0.duration_since(killed);
        assert!(
            after >= FAILURE - Duration::from_secs(1),
            "reset {n} only {after:?} after the kill"
        );
    }
    assert_eq!(
        count(&g.output(), "VIGIL-BOOT-OK"),
        3,
        "the guest did not boot once per reset"
    );

    // 3. The 4th hang within the window: left alone and reported.
    w.run_until(&g, "the 4th boot's tools", common::GUEST_TIMEOUT, |_, o| {
        booted_with_tools(o, 4)
    });
    g.type_line("killall vigil-tools");
    let start = Instant::now();
    w.run_until(&g, "the limit", STEP_TIMEOUT, |w, _| w.limit_reached);
    // Well past the point a reset would have come: still none.
    w.run_until(&g, "a quiet while", Duration::from_secs(180), |_, _| {
        start.elapsed() > GRACE + FAILURE + IO_WINDOW
    });
    assert_eq!(w.resets.len(), 3, "{:?}", w.resets);
    assert_eq!(count(&g.output(), "VIGIL-BOOT-OK"), 4);
    assert!(g.vm.child.try_wait().unwrap().is_none(), "{}", g.output());
}
