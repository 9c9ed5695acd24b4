//! End-to-end test of the guest tools channel (G1, G3, V4): the real `vigil`
//! binary, the real guest with `vigil-tools daemon` started by its /init,
//! talking to the VMM over virtio-vsock (CID 2, port 5252).
//!
//! One guest, driven like a user would through its serial console (a
//! busybox shell) and the control API:
//! 1. the API reports tools heartbeats once the daemon is up;
//! 2. killing the daemon in the guest makes the API report them lost;
//! 3. a restarted daemon reconnects;
//! 4. `vigil vm shutdown` powers the guest off through the tools (graceful),
//!    and `vigil run` exits with status 0.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

const BOOT_TIMEOUT: Duration = common::GUEST_TIMEOUT;
const STEP_TIMEOUT: Duration = common::QUICK_TIMEOUT;

struct Guest {
    vm: common::Console,
    api: PathBuf,
    dir: PathBuf,
}

impl Guest {
    fn boot() -> Self {
        let cfg = common::guest_config();
        let dir = std::env::temp_dir().join(format!("vigil-tools-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let api = dir.join("api.sock");
        let vsock = format!("cid=3,socket={}", dir.join("vsock").display());
        let vm = common::Console::spawn(
            Command::new(env!("CARGO_BIN_EXE_vigil"))
                .args([
                    "run",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--console",
                    "stdio",
                ])
                .args(["--api-socket", api.to_str().unwrap(), "--vsock", &vsock]),
        );
        Guest { vm, api, dir }
    }

    fn console(&self) -> String {
        self.vm.text()
    }

    fn wait_console(&self, needle: &str, from: usize, timeout: Duration) {
        self.vm.wait_for(needle, from, timeout);
    }

    fn type_line(&mut self, line: &str) {
        self.vm.type_line(line)
    }

    fn heartbeat(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["vm", "heartbeat", "--json", "--api-socket"])
            .arg(&self.api)
            .output()
            .unwrap();
        assert!(out.status.success(), "vigil vm heartbeat failed: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }

    fn wait_heartbeat(&self, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
        let start = Instant::now();
        loop {
            let hb = self.heartbeat();
            if ok(&hb) {
                return;
            }
            assert!(
                start.elapsed() < STEP_TIMEOUT,
                "the API never reported {what}; last: {hb}\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vm.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fresh(hb: &serde_json::Value) -> bool {
    hb["connected"] == true
        && hb["ms_since_tools_heartbeat"]
            .as_u64()
            .is_some_and(|ms| ms < 2000)
}

#[test]
fn tools_heartbeat_loss_reconnect_and_graceful_shutdown() {
    let mut g = Guest::boot();
    g.wait_console("VIGIL-TOOLS-CONNECTED", 0, BOOT_TIMEOUT);
    g.wait_heartbeat("a fresh tools heartbeat", fresh);
    assert!(
        g.heartbeat()["tools_version"].is_string(),
        "{}",
        g.heartbeat()
    );

    // The busybox shell on the console kills the daemon, as a user would.
    g.wait_console("vigil-guest:", 0, STEP_TIMEOUT);
    g.type_line("killall vigil-tools; echo KILLED-TOOLS");
    g.wait_console("KILLED-TOOLS\r\n", 0, STEP_TIMEOUT);
    g.wait_heartbeat("the heartbeat lost", |hb| !fresh(hb));

    // Started again, it reconnects on its own.
    let mark = g.console().len();
    g.type_line("vigil-tools daemon &");
    g.wait_console("VIGIL-TOOLS-CONNECTED", mark, STEP_TIMEOUT);
    g.wait_heartbeat("a fresh tools heartbeat after the restart", fresh);

    // Graceful shutdown goes through the tools, then the guest powers off.
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["vm", "shutdown", "--api-socket"])
        .arg(&g.api)
        .output()
        .unwrap();
    assert!(out.status.success(), "vigil vm shutdown failed: {out:?}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = g.vm.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < STEP_TIMEOUT,
            "the guest did not power off after a graceful shutdown:\n{}",
            g.console()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = g.console();
    assert!(
        console.contains("VIGIL-TOOLS-SHUTDOWN"),
        "the shutdown did not go through the tools:\n{console}"
    );
    assert_eq!(status.code(), Some(0), "{console}");
}
