//! VM and application monitoring (H11): when to reset a guest that stopped
//! heartbeating. Pure: the caller feeds heartbeats and I/O activity with the
//! local monotonic time and asks for a decision on each tick.
//!
//! A reset needs all of: the monitored heartbeat (guest tools or an
//! application) silent for the sensitivity's failure interval, no disk and no
//! network I/O during the I/O window (a guest busy doing I/O is probably alive
//! but starved, and resetting it would lose work), the VM up for longer than
//! the grace period (a booting guest has no tools yet), and fewer than
//! `max_resets` resets within the reset window (a guest that keeps hanging is
//! left alone for an operator rather than reset forever).

use crate::time::Time;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// Monitoring sensitivity presets (seed 000: vSphere's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    /// 30 s without heartbeat; resets counted over 1 hour.
    High,
    /// 60 s without heartbeat; resets counted over 24 hours.
    Medium,
    /// 120 s without heartbeat; resets counted over 7 days.
    Low,
    /// Explicit values.
    Custom {
        /// Heartbeat silence before the VM is considered hung.
        failure_interval: Duration,
        /// Window over which `max_resets` is counted.
        reset_window: Duration,
    },
}

impl Sensitivity {
    /// Heartbeat silence before a reset is considered.
    pub fn failure_interval(&self) -> Duration {
        match self {
            Sensitivity::High => Duration::from_secs(30),
            Sensitivity::Medium => Duration::from_secs(60),
            Sensitivity::Low => Duration::from_secs(120),
            Sensitivity::Custom {
                failure_interval, ..
            } => *failure_interval,
        }
    }

    /// Window over which resets are counted.
    pub fn reset_window(&self) -> Duration {
        match self {
            Sensitivity::High => Duration::from_secs(3600),
            Sensitivity::Medium => Duration::from_secs(24 * 3600),
            Sensitivity::Low => Duration::from_secs(7 * 24 * 3600),
            Sensitivity::Custom { reset_window, .. } => *reset_window,
        }
    }
}

/// Monitoring settings of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitoringSettings {
    /// The sensitivity preset.
    pub sensitivity: Sensitivity,
    /// Disk or network I/O within this window vetoes a reset (default 120 s).
    pub io_window: Duration,
    /// No reset within this time of a power-on or reset (default 120 s).
    pub grace_period: Duration,
    /// At most this many resets per reset window (default 3).
    pub max_resets: u32,
}

impl Default for MonitoringSettings {
    fn default() -> Self {
        Self {
            sensitivity: Sensitivity::Medium,
            io_window: Duration::from_secs(120),
            grace_period: Duration::from_secs(120),
            max_resets: 3,
        }
    }
}

/// What the monitor wants done now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorDecision {
    /// Nothing to do.
    Healthy,
    /// Heartbeat lost but the VM did I/O recently, or is in its grace period.
    Suspect,
    /// Reset the VM now (the monitor has counted the reset).
    Reset,
    /// The VM is hung but was reset `max_resets` times in the window already.
    ResetLimitReached {
        /// Resets in the current window.
        resets: u32,
    },
}

/// Per-VM monitoring state.
#[derive(Debug, Clone)]
pub struct VmMonitor {
    settings: MonitoringSettings,
    started: Time,
    last_heartbeat: Option<Time>,
    last_io: Option<Time>,
    resets: VecDeque<Time>,
}

impl VmMonitor {
    /// Starts monitoring a VM that powered on at `now`.
    pub fn new(settings: MonitoringSettings, now: Time) -> Self {
        Self {
            settings,
            started: now,
            last_heartbeat: None,
            last_io: None,
            resets: VecDeque::new(),
        }
    }

    /// A heartbeat from the guest tools (or the monitored application).
    pub fn heartbeat(&mut self, now: Time) {
        self.last_heartbeat = Some(now);
    }

    /// Disk or network I/O was observed.
    pub fn io_activity(&mut self, now: Time) {
        self.last_io = Some(now);
    }

    /// Resets counted in the window ending at `now`.
    pub fn resets_in_window(&self, now: Time) -> u32 {
        let w = self.settings.sensitivity.reset_window();
        self.resets.iter().filter(|t| now.since(**t) < w).count() as u32
    }

    /// Decides what to do at `now`.
    pub fn evaluate(&mut self, now: Time) -> MonitorDecision {
        let s = self.settings;
        // Silence is measured from the last heartbeat, or from the power-on
        // (or last reset) when the guest never heartbeat since.
        let since_hb = now.since(
            self.last_heartbeat
                .unwrap_or(self.started)
                .max(self.started),
        );
        if since_hb < s.sensitivity.failure_interval() {
            return MonitorDecision::Healthy;
        }
        if now.since(self.started) < s.grace_period {
            return MonitorDecision::Suspect;
        }
        if let Some(io) = self.last_io {
            if now.since(io) < s.io_window {
                return MonitorDecision::Suspect;
            }
        }
        let w = s.sensitivity.reset_window();
        while self.resets.front().is_some_and(|t| now.since(*t) >= w) {
            self.resets.pop_front();
        }
        if self.resets.len() as u32 >= s.max_resets {
            return MonitorDecision::ResetLimitReached {
                resets: self.resets.len() as u32,
            };
        }
        self.resets.push_back(now);
        // A reset reboots the guest: a new grace period starts.
        self.started = now;
        self.last_heartbeat = None;
        MonitorDecision::Reset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Time {
        Time::from_secs(s)
    }

    fn settings(sens: Sensitivity) -> MonitoringSettings {
        MonitoringSettings {
            sensitivity: sens,
            ..Default::default()
        }
    }

    #[test]
    fn presets() {
        assert_eq!(
            Sensitivity::High.failure_interval(),
            Duration::from_secs(30)
        );
        assert_eq!(Sensitivity::High.reset_window(), Duration::from_secs(3600));
        assert_eq!(
            Sensitivity::Medium.failure_interval(),
            Duration::from_secs(60)
        );
        assert_eq!(
            Sensitivity::Low.reset_window(),
            Duration::from_secs(7 * 86400)
        );
    }

    /// Simulated clock: heartbeats stop at 200 s; a high-sensitivity monitor
    /// resets at 230 s, not before, and not during the grace period.
    #[test]
    fn reset_after_heartbeat_loss_without_io() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        let mut decisions = vec![];
        for t in 0..=240 {
            if t <= 200 {
                m.heartbeat(secs(t));
            }
            let d = m.evaluate(secs(t));
            if d != MonitorDecision::Healthy {
                decisions.push((t, d));
            }
        }
        assert_eq!(decisions, vec![(230, MonitorDecision::Reset)]);
    }

    #[test]
    fn io_vetoes_reset() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        m.heartbeat(secs(150));
        m.io_activity(secs(170));
        assert_eq!(m.evaluate(secs(185)), MonitorDecision::Suspect);
        // 120 s I/O window after the last I/O at 170 s ends at 290 s.
        assert_eq!(m.evaluate(secs(289)), MonitorDecision::Suspect);
        assert_eq!(m.evaluate(secs(290)), MonitorDecision::Reset);
    }

    #[test]
    fn grace_period_after_boot() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        // Never heartbeat: suspect from 30 s, reset only once the 120 s grace ends.
        assert_eq!(m.evaluate(secs(29)), MonitorDecision::Healthy);
        assert_eq!(m.evaluate(secs(30)), MonitorDecision::Suspect);
        assert_eq!(m.evaluate(secs(119)), MonitorDecision::Suspect);
        assert_eq!(m.evaluate(secs(120)), MonitorDecision::Reset);
    }

    #[test]
    fn at_most_three_resets_per_window() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        let mut resets = vec![];
        for t in 0..4000 {
            match m.evaluate(secs(t)) {
                MonitorDecision::Reset => resets.push(t),
                MonitorDecision::ResetLimitReached { resets } => assert_eq!(resets, 3),
                _ => {}
            }
        }
        // Each reset starts a new 120 s grace: resets at 120, 240, 360; then
        // the limit holds until the sliding 1 h window frees a slot (3720 =
        // 120 + 3600, then 3840, 3960).
        assert_eq!(resets, vec![120, 240, 360, 3720, 3840, 3960]);
        assert_eq!(m.resets_in_window(secs(3721)), 3);
    }

    #[test]
    fn custom_sensitivity() {
        let sens = Sensitivity::Custom {
            failure_interval: Duration::from_secs(10),
            reset_window: Duration::from_secs(60),
        };
        let s = MonitoringSettings {
            sensitivity: sens,
            io_window: Duration::from_secs(5),
            grace_period: Duration::from_secs(0),
            max_resets: 1,
        };
        let mut m = VmMonitor::new(s, secs(0));
        assert_eq!(m.evaluate(secs(10)), MonitorDecision::Reset);
        assert_eq!(
            m.evaluate(secs(20)),
            MonitorDecision::ResetLimitReached { resets: 1 }
        );
        assert_eq!(m.evaluate(secs(70)), MonitorDecision::Reset);
    }
}
