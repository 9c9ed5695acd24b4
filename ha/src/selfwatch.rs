//! The agent's watchdog on itself (H16): if the agent's main loop stops
//! making progress (a deadlock, a blocking call that never returns), the
//! stall is logged and the process exits with [`EXIT_STALLED`], so the
//! service manager (systemd `Restart=on-failure`) starts a fresh agent that
//! adopts the running VMs. VMs keep running meanwhile: each VMM is its own
//! process, which must not be in the agent's process group or cgroup
//! scope that the service manager kills (`KillMode=process`).
//!
//! How the runtime uses it:
//!
//! ```no_run
//! use std::time::Duration;
//! let watch = ha::selfwatch::SelfWatch::start(Duration::from_secs(30), ha::selfwatch::exit_on_stall)?;
//! let progress = watch.progress();
//! loop {
//!     progress.beat("tick"); // once per iteration of the main loop
//!     // ... agent.handle(now, Input::Tick), carry out the actions ...
//! #   break;
//! }
//! watch.stop(); // on a clean shutdown
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! The threshold should be several times the loop's longest legitimate
//! iteration (the agent ticks every 100 ms; its slowest action is a
//! datastore write with its own timeout of a few seconds): 30 s is the
//! suggested value.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Exit status of an agent whose main loop stalled (EX_SOFTWARE).
pub const EXIT_STALLED: i32 = 70;

/// What the watchdog saw when it fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// Time since the last beat.
    pub since_last_beat: Duration,
    /// Beats seen in all.
    pub beats: u64,
    /// What the loop said it was doing at its last beat.
    pub last_stage: &'static str,
    /// The threshold.
    pub threshold: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "agent main loop made no progress for {} ms (threshold {} ms; {} iterations before; last stage `{}`)",
            self.since_last_beat.as_millis(),
            self.threshold.as_millis(),
            self.beats,
            self.last_stage
        )
    }
}

struct Shared {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last_ms: AtomicU64,
    beats: AtomicU64,
    stage: Mutex<&'static str>,
    stopped: AtomicBool,
}

/// The handle the main loop beats on. Cheap to clone.
#[derive(Clone)]
pub struct Progress(Arc<Shared>);

impl Progress {
    /// Marks progress; `stage` names what the loop is about to do (shown if
    /// it stalls there).
    pub fn beat(&self, stage: &'static str) {
        let s = &self.0;
        s.last_ms
            .store(s.origin.elapsed().as_millis() as u64, Ordering::SeqCst);
        s.beats.fetch_add(1, Ordering::SeqCst);
        *s.stage.lock().unwrap_or_else(|p| p.into_inner()) = stage;
    }
}

/// A running self-watchdog.
pub struct SelfWatch {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The production stall handler: logs the stall and exits the process with
/// [`EXIT_STALLED`].
pub fn exit_on_stall(stall: Stall) {
    tracing::error!(%stall, "agent stalled: exiting so the service manager restarts it (VMs keep running)");
    eprintln!("vigil agent: {stall}; exiting with status {EXIT_STALLED}");
    std::process::exit(EXIT_STALLED);
}

impl SelfWatch {
    /// Starts the watchdog thread. `on_stall` runs once, on that thread,
    /// when no beat came for `threshold` (use [`exit_on_stall`]).
    pub fn start(
        threshold: Duration,
        on_stall: impl FnOnce(Stall) + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            beats: AtomicU64::new(0),
            stage: Mutex::new("start"),
            stopped: AtomicBool::new(false),
        });
        let s = shared.clone();
        let period = (threshold / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let thread = std::thread::Builder::new()
            .name("agent-selfwatch".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                if s.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let now = s.origin.elapsed().as_millis() as u64;
                let since =
                    Duration::from_millis(now.saturating_sub(s.last_ms.load(Ordering::SeqCst)));
                if since > threshold {
                    let stall = Stall {
                        since_last_beat: since,
                        beats: s.beats.load(Ordering::SeqCst),
                        last_stage: *s.stage.lock().unwrap_or_else(|p| p.into_inner()),
                        threshold,
                    };
                    tracing::error!(%stall, "agent main loop stalled");
                    on_stall(stall);
                    return;
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The handle to beat on.
    pub fn progress(&self) -> Progress {
        Progress(self.shared.clone())
    }

    /// Stops watching (clean shutdown) and waits for the thread.
    pub fn stop(mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A loop that beats, then really blocks on a lock held elsewhere: the
    /// watchdog fires once, naming the stage it stalled in; it did not fire
    /// while the loop was beating.
    #[test]
    fn fires_when_the_loop_really_stalls() {
        let (tx, rx) = mpsc::channel();
        let watch = SelfWatch::start(Duration::from_millis(600), move |s| {
            tx.send(s).unwrap();
        })
        .unwrap();
        let progress = watch.progress();
        let lock = Arc::new(Mutex::new(()));
        let held = lock.lock().unwrap();
        let l2 = lock.clone();
        let main_loop = std::thread::spawn(move || {
            for _ in 0..40 {
                progress.beat("tick");
                std::thread::sleep(Duration::from_millis(50));
            }
            progress.beat("write heartbeat");
            // Stalls here: the lock is held by the test until it has seen
            // the watchdog fire.
            let _g = l2.lock().unwrap();
        });
        // 40 beats 50 ms apart: 2 s, over three thresholds, without firing.
        assert!(
            rx.recv_timeout(Duration::from_millis(1800)).is_err(),
            "fired while the loop was beating"
        );
        let stall = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the watchdog did not fire on a stalled loop");
        assert_eq!(stall.beats, 41);
        assert_eq!(stall.last_stage, "write heartbeat");
        assert!(stall.since_last_beat > Duration::from_millis(600));
        assert!(
            stall
                .to_string()
                .starts_with("agent main loop made no progress for "),
            "{stall}"
        );
        drop(held);
        main_loop.join().unwrap();
        watch.stop();
    }

    #[test]
    fn stop_prevents_firing() {
        let (tx, rx) = mpsc::channel::<Stall>();
        let watch = SelfWatch::start(Duration::from_millis(50), move |s| {
            tx.send(s).unwrap();
        })
        .unwrap();
        watch.progress().beat("tick");
        watch.stop();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    }

    /// The real exit path: this test binary runs itself as a child whose
    /// loop stalls; the child exits with EXIT_STALLED and says why.
    #[test]
    fn stalled_process_exits_non_zero() {
        if std::env::var_os("VHP_SELFWATCH_CHILD").is_some() {
            let watch = SelfWatch::start(Duration::from_millis(200), exit_on_stall).unwrap();
            watch.progress().beat("tick");
            // The main loop never beats again.
            std::thread::sleep(Duration::from_secs(30));
            unreachable!("the watchdog should have exited the process");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "selfwatch::tests::stalled_process_exits_non_zero",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VHP_SELFWATCH_CHILD", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(EXIT_STALLED), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("vigil agent: agent main loop made no progress for")
                && err.contains("last stage `tick`")
                && err.contains("exiting with status 70"),
            "{err}"
        );
    }
}
