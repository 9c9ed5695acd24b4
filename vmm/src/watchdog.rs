//! The host-local watchdog (V5): notices a vCPU thread or the event loop
//! that stops making progress, logs it with the vCPU's registers, and keeps
//! a report for `GET /vm/watchdog` (which the HA agent reads).
//!
//! Progress: each vCPU thread bumps a counter on every return from KVM_RUN
//! (see [`crate::cpu::gate::VcpuGate::bump`]); the event loop bumps one on
//! every iteration (it wakes at least every 500 ms).
//!
//! Idle is not stuck: a vCPU halted inside KVM (in-kernel LAPIC, HLT does
//! not exit) makes no progress for as long as the guest is idle. So when a
//! vCPU's counter has not moved since the last check, the watchdog kicks it
//! with the vCPU kick signal: a healthy thread returns from KVM_RUN with
//! EINTR, bumps its counter and goes back in. Only a counter that stays
//! still across kicks for longer than the threshold means stuck: the
//! thread is blocked inside KVM (the kick cannot get it out) or outside it
//! (a deadlock in device emulation). Parked (paused) vCPUs are not checked.
//!
//! The decision ([`Tracker`]) is plain logic over (time, counter) samples,
//! tested with made-up clocks; the thread around it does the I/O.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::machine::Machine;

/// Default: progress older than this is a stall.
pub const DEFAULT_THRESHOLD: Duration = Duration::from_secs(10);

/// One component's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Made progress within the threshold.
    Ok,
    /// Paused on purpose (vCPU parked).
    Parked,
    /// No progress for longer than the threshold.
    Stuck,
}

/// Per-vCPU line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuHealth {
    /// vCPU index.
    pub id: u32,
    /// Verdict.
    pub state: Health,
    /// The progress counter (KVM_RUN returns).
    pub progress: u64,
    /// Milliseconds since the counter last moved.
    pub ms_since_progress: u64,
}

/// The event loop's line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoopHealth {
    /// Verdict (`ok` or `stuck`).
    pub state: Option<Health>,
    /// Iterations so far.
    pub progress: u64,
    /// Milliseconds since the last iteration.
    pub ms_since_progress: u64,
}

/// What `GET /vm/watchdog` returns.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WatchdogReport {
    /// Whether the watchdog thread runs.
    pub enabled: bool,
    /// The stall threshold.
    pub threshold_ms: u64,
    /// True when nothing is stuck.
    pub healthy: bool,
    /// Per vCPU.
    pub vcpus: Vec<VcpuHealth>,
    /// The event loop.
    pub event_loop: LoopHealth,
    /// How many stalls were detected since start.
    pub incidents: u64,
    /// The latest stall, one line with the registers if they could be read.
    pub last_incident: Option<String>,
}

/// Tracks one progress counter.
#[derive(Debug, Clone, Copy)]
pub struct Tracker {
    last_value: u64,
    last_change: Instant,
}

impl Tracker {
    /// Starts tracking at `now` with the current value.
    pub fn new(now: Instant, value: u64) -> Self {
        Self {
            last_value: value,
            last_change: now,
        }
    }

    /// Feeds a sample; returns the verdict and how long since progress.
    /// `parked` counts as progress (the clock restarts on resume).
    pub fn observe(
        &mut self,
        now: Instant,
        value: u64,
        parked: bool,
        threshold: Duration,
    ) -> (Health, Duration) {
        if value != self.last_value || parked {
            self.last_value = value;
            self.last_change = now;
            let h = if parked { Health::Parked } else { Health::Ok };
            return (h, Duration::ZERO);
        }
        let idle = now.saturating_duration_since(self.last_change);
        if idle > threshold {
            (Health::Stuck, idle)
        } else {
            (Health::Ok, idle)
        }
    }
}

/// Reads a vCPU's registers through a duplicate of its fd, giving up after
/// `timeout`: KVM holds the vCPU's lock during KVM_RUN, so a vCPU stuck in
/// KVM cannot be read (the helper thread then stays blocked until the vCPU
/// returns, which is acceptable once per incident).
pub fn registers_with_timeout(fd: Arc<OwnedFd>, timeout: Duration) -> String {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("watchdog-regs".into())
        .spawn(move || {
            let _ = tx.send(read_regs(fd.as_raw_fd()));
        });
    if spawned.is_err() {
        return "(registers unavailable: cannot start a helper thread)".to_string();
    }
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        "(registers unavailable: the vCPU is blocked inside KVM_RUN and holds its lock)".to_string()
    })
}

fn read_regs(fd: i32) -> String {
    // _IOR(KVMIO, 0x81, struct kvm_regs)
    const KVM_GET_REGS: libc::c_ulong = (2 << 30)
        | ((std::mem::size_of::<kvm_bindings::kvm_regs>() as libc::c_ulong) << 16)
        | (0xAE << 8)
        | 0x81;
    let mut r = kvm_bindings::kvm_regs::default();
    // SAFETY: `fd` is a vCPU fd kept open by the caller's Arc<OwnedFd>;
    // KVM_GET_REGS writes exactly one `kvm_regs` into the valid, exclusively
    // borrowed `r`.
    let ret = unsafe { libc::ioctl(fd, KVM_GET_REGS, &mut r as *mut kvm_bindings::kvm_regs) };
    if ret != 0 {
        return format!(
            "(registers unavailable: {})",
            std::io::Error::last_os_error()
        );
    }
    format!(
        "rip={:#x} rsp={:#x} rbp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}",
        r.rip, r.rsp, r.rbp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx
    )
}

/// Runs the watchdog for `m` until `m.exit` says stop. `vcpu_fds` are
/// duplicates of the vCPU fds (for register dumps).
pub fn run(m: Arc<Machine>, vcpu_fds: Vec<Arc<OwnedFd>>, threshold: Duration) {
    let period = (threshold / 4).max(Duration::from_millis(100));
    let n = m.gate.len() as u32;
    let start = Instant::now();
    let mut vcpus: Vec<Tracker> = (0..n)
        .map(|id| Tracker::new(start, m.gate.progress(id)))
        .collect();
    let mut lp = Tracker::new(start, m.loop_progress.load(Ordering::Relaxed));
    let mut was_stuck = vec![false; n as usize + 1];
    let mut incidents = 0u64;
    let mut last_incident: Option<String> = None;
    *m.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = WatchdogReport {
        enabled: true,
        threshold_ms: threshold.as_millis() as u64,
        healthy: true,
        ..Default::default()
    };
    while !m.exit.should_stop() {
        // Sleep in short steps so the VMM's stop does not wait a period.
        let until = Instant::now() + period;
        while Instant::now() < until && !m.exit.should_stop() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let now = Instant::now();
        let mut lines = Vec::new();
        for (id, t) in (0u32..).zip(vcpus.iter_mut()) {
            let value = m.gate.progress(id);
            let parked = m.gate.is_parked(id);
            let (state, idle) = t.observe(now, value, parked, threshold);
            if state != Health::Parked && idle >= period {
                // Idle in HLT or stuck: a kick tells them apart next time.
                m.gate.kick(id);
            }
            let i = id as usize;
            if state == Health::Stuck && !was_stuck[i] {
                let regs = vcpu_fds
                    .get(i)
                    .map(|fd| registers_with_timeout(fd.clone(), Duration::from_millis(500)))
                    .unwrap_or_default();
                let msg = format!(
                    "vCPU {id} made no progress for {} ms (threshold {} ms), kicks do not bring \
                     it out of KVM_RUN: {regs}",
                    idle.as_millis(),
                    threshold.as_millis()
                );
                tracing::error!(vm = %m.config.name, vcpu = id, registers = %regs, "{msg}");
                incidents += 1;
                last_incident = Some(msg);
            }
            was_stuck[i] = state == Health::Stuck;
            lines.push(VcpuHealth {
                id,
                state,
                progress: value,
                ms_since_progress: idle.as_millis() as u64,
            });
        }
        let lv = m.loop_progress.load(Ordering::Relaxed);
        let (lstate, lidle) = lp.observe(now, lv, false, threshold);
        let li = n as usize;
        if lstate == Health::Stuck && !was_stuck[li] {
            let msg = format!(
                "the event loop made no progress for {} ms (threshold {} ms)",
                lidle.as_millis(),
                threshold.as_millis()
            );
            tracing::error!(vm = %m.config.name, "{msg}");
            incidents += 1;
            last_incident = Some(msg);
        }
        was_stuck[li] = lstate == Health::Stuck;
        let healthy = lstate != Health::Stuck && lines.iter().all(|l| l.state != Health::Stuck);
        let report = WatchdogReport {
            enabled: true,
            threshold_ms: threshold.as_millis() as u64,
            healthy,
            vcpus: lines,
            event_loop: LoopHealth {
                state: Some(lstate),
                progress: lv,
                ms_since_progress: lidle.as_millis() as u64,
            },
            incidents,
            last_incident: last_incident.clone(),
        };
        *m.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = report;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn moving_counter_is_ok() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0, 0);
        assert_eq!(
            t.observe(t0 + Duration::from_secs(6), 1, false, T).0,
            Health::Ok
        );
        assert_eq!(
            t.observe(t0 + Duration::from_secs(12), 2, false, T).0,
            Health::Ok
        );
    }

    #[test]
    fn still_counter_becomes_stuck_after_threshold() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0, 7);
        assert_eq!(
            t.observe(t0 + Duration::from_secs(4), 7, false, T).0,
            Health::Ok
        );
        let (h, idle) = t.observe(t0 + Duration::from_secs(6), 7, false, T);
        assert_eq!(h, Health::Stuck);
        assert_eq!(idle, Duration::from_secs(6));
        // Recovers as soon as it moves.
        assert_eq!(
            t.observe(t0 + Duration::from_secs(7), 8, false, T).0,
            Health::Ok
        );
    }

    #[test]
    fn parked_is_not_stuck_and_restarts_the_clock() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0, 1);
        let (h, _) = t.observe(t0 + Duration::from_secs(60), 1, true, T);
        assert_eq!(h, Health::Parked);
        // Resumed 60 s later, no progress yet: not stuck straight away.
        assert_eq!(
            t.observe(t0 + Duration::from_secs(61), 1, false, T).0,
            Health::Ok
        );
    }

    #[test]
    fn report_json_shape() {
        let r = WatchdogReport {
            enabled: true,
            threshold_ms: 5000,
            healthy: true,
            vcpus: vec![VcpuHealth {
                id: 0,
                state: Health::Ok,
                progress: 3,
                ms_since_progress: 0,
            }],
            event_loop: LoopHealth {
                state: Some(Health::Ok),
                progress: 9,
                ms_since_progress: 1,
            },
            incidents: 0,
            last_incident: None,
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["vcpus"][0]["state"], "ok");
        assert_eq!(v["event_loop"]["state"], "ok");
        assert_eq!(v["healthy"], true);
    }
}
