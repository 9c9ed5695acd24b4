//! VM and application monitoring (H11): when to reset a guest that stopped
//! heartbeating. Pure: the caller feeds heartbeats and I/O activity with the
//! local monotonic time and asks for a decision on each tick.
//!
//! A reset needs all of: the monitored heartbeat (guest tools or an
//! application), once seen since the VM's power-on or last reset, silent
//! for the sensitivity's failure interval, no disk and no
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
        /// Heartbeat silence before the VM is considered hung (seconds in
        /// config files).
        #[serde(with = "secs")]
        failure_interval: Duration,
        /// Window over which `max_resets` is counted (seconds).
        #[serde(with = "secs")]
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

/// What is monitored (seed 000: "Disabled", "VM Monitoring Only", "VM and
/// Application Monitoring").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitoringMode {
    /// Nothing (the default): a silent guest is never reset.
    #[default]
    Disabled,
    /// The guest tools heartbeat.
    Vm,
    /// The guest tools heartbeat and, once an application inside the guest
    /// has sent one, the application heartbeat: losing either counts.
    VmAndApplication,
}

/// Monitoring settings of one VM (or the cluster's default for every VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitoringSettings {
    /// What is monitored (default: disabled).
    pub mode: MonitoringMode,
    /// The sensitivity preset (default: medium).
    pub sensitivity: Sensitivity,
    /// Disk or network I/O within this window vetoes a reset (default 120 s).
    #[serde(with = "secs")]
    pub io_window: Duration,
    /// No reset within this time of a power-on or reset (default 120 s).
    #[serde(with = "secs")]
    pub grace_period: Duration,
    /// At most this many resets per reset window (default 3).
    pub max_resets: u32,
}

impl Default for MonitoringSettings {
    fn default() -> Self {
        Self {
            mode: MonitoringMode::Disabled,
            sensitivity: Sensitivity::Medium,
            io_window: Duration::from_secs(120),
            grace_period: Duration::from_secs(120),
            max_resets: 3,
        }
    }
}

impl MonitoringSettings {
    /// Whether anything is monitored.
    pub fn enabled(&self) -> bool {
        self.mode != MonitoringMode::Disabled
    }
}

/// Durations as whole seconds in config files.
mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// Which heartbeat was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lost {
    /// The guest tools heartbeat.
    Tools,
    /// The application heartbeat (VM and application monitoring).
    Application,
}

/// What the monitor wants done now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorDecision {
    /// Nothing to do.
    Healthy,
    /// Heartbeat lost but the VM did I/O recently, or is in its grace period.
    Suspect,
    /// Reset the VM now (the monitor has counted the reset).
    Reset {
        /// Why, for the log and the reset request: which heartbeat, for how
        /// long, and the I/O window it was idle for.
        reason: String,
    },
    /// The VM is hung but was reset `max_resets` times in the window already.
    ResetLimitReached {
        /// Resets in the current window.
        resets: u32,
    },
}

/// Turns a VMM's cumulative I/O counters into "was there I/O since the last
/// sample". A counter that goes down means the VM was reset (its devices
/// start from zero): that sample is a new baseline, not I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoTracker {
    last: Option<u64>,
}

impl IoTracker {
    /// Feeds the sum of the VM's disk and network counters (bytes and
    /// requests, any monotonic total); true if it grew since the last call.
    pub fn observe(&mut self, total: u64) -> bool {
        let grew = self.last.is_some_and(|l| total > l);
        self.last = Some(total);
        grew
    }
}

/// Per-VM monitoring state.
#[derive(Debug, Clone)]
pub struct VmMonitor {
    settings: MonitoringSettings,
    started: Time,
    /// Since when this monitor has been told about I/O: before that, I/O is
    /// unknown, so a reset needs a full I/O window watched.
    watching_since: Time,
    last_heartbeat: Option<Time>,
    last_app_heartbeat: Option<Time>,
    last_io: Option<Time>,
    resets: VecDeque<Time>,
}

impl VmMonitor {
    /// Starts monitoring a VM that powered on at `now`.
    pub fn new(settings: MonitoringSettings, now: Time) -> Self {
        Self {
            settings,
            started: now,
            watching_since: now,
            last_heartbeat: None,
            last_app_heartbeat: None,
            last_io: None,
            resets: VecDeque::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &MonitoringSettings {
        &self.settings
    }

    /// A heartbeat from the guest tools.
    pub fn heartbeat(&mut self, now: Time) {
        self.last_heartbeat = Some(now);
    }

    /// A heartbeat from the monitored application (ignored unless the mode
    /// is VM and application monitoring).
    pub fn app_heartbeat(&mut self, now: Time) {
        self.last_app_heartbeat = Some(now);
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

    /// The heartbeat lost at `now`, if any, and for how long.
    fn lost(&self, now: Time) -> Option<(Lost, Duration)> {
        let limit = self.settings.sensitivity.failure_interval();
        // A heartbeat is monitored once it has been seen since the power-on
        // (or last reset), as vSphere monitors a VM whose tools heartbeat
        // has turned green: a guest still booting (however slowly) or
        // without tools is never reset for their silence.
        if let Some(hb) = self.last_heartbeat.filter(|t| *t >= self.started) {
            let tools = now.since(hb);
            if tools >= limit {
                return Some((Lost::Tools, tools));
            }
        }
        // An application is monitored once it has heartbeat since the last
        // (re)start: a guest without such an application is not reset for it.
        if self.settings.mode == MonitoringMode::VmAndApplication {
            if let Some(app) = self.last_app_heartbeat.filter(|t| *t >= self.started) {
                let silent = now.since(app);
                if silent >= limit {
                    return Some((Lost::Application, silent));
                }
            }
        }
        None
    }

    /// Decides what to do at `now`.
    pub fn evaluate(&mut self, now: Time) -> MonitorDecision {
        let s = self.settings;
        if !s.enabled() {
            return MonitorDecision::Healthy;
        }
        let Some((lost, silent)) = self.lost(now) else {
            return MonitorDecision::Healthy;
        };
        if now.since(self.started) < s.grace_period {
            return MonitorDecision::Suspect;
        }
        if now.since(self.watching_since) < s.io_window {
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
        self.last_app_heartbeat = None;
        let what = match lost {
            Lost::Tools => "guest tools heartbeat",
            Lost::Application => "application heartbeat",
        };
        MonitorDecision::Reset {
            reason: format!(
                "VM monitoring: no {what} for {} s and no disk or network I/O for {} s (reset {} of at most {} per {} s)",
                silent.as_secs(),
                s.io_window.as_secs(),
                self.resets.len(),
                s.max_resets,
                w.as_secs()
            ),
        }
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
            mode: MonitoringMode::Vm,
            sensitivity: sens,
            ..Default::default()
        }
    }

    fn is_reset(d: &MonitorDecision) -> bool {
        matches!(d, MonitorDecision::Reset { .. })
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
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        assert_eq!(decisions[0].0, 230);
        let MonitorDecision::Reset { reason } = &decisions[0].1 else {
            panic!("{decisions:?}")
        };
        assert_eq!(
            reason,
            "VM monitoring: no guest tools heartbeat for 30 s and no disk or network I/O for 120 s \
             (reset 1 of at most 3 per 3600 s)"
        );
    }

    #[test]
    fn io_vetoes_reset() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        m.heartbeat(secs(150));
        m.io_activity(secs(170));
        assert_eq!(m.evaluate(secs(185)), MonitorDecision::Suspect);
        // 120 s I/O window after the last I/O at 170 s ends at 290 s.
        assert_eq!(m.evaluate(secs(289)), MonitorDecision::Suspect);
        assert!(is_reset(&m.evaluate(secs(290))));
    }

    #[test]
    fn grace_period_after_boot() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        // One heartbeat at 5 s, then silence: suspect from 35 s, reset only
        // once the 120 s grace ends.
        m.heartbeat(secs(5));
        assert_eq!(m.evaluate(secs(34)), MonitorDecision::Healthy);
        assert_eq!(m.evaluate(secs(35)), MonitorDecision::Suspect);
        assert_eq!(m.evaluate(secs(119)), MonitorDecision::Suspect);
        assert!(is_reset(&m.evaluate(secs(120))));
    }

    /// A guest that has not heartbeat since its power-on (still booting, or
    /// no tools) is not monitored: never reset, however long it takes.
    #[test]
    fn no_reset_before_the_first_heartbeat() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        for t in 0..5000 {
            assert_eq!(m.evaluate(secs(t)), MonitorDecision::Healthy, "at {t}");
        }
        // After a reset, the old boot's heartbeat does not count either.
        m.heartbeat(secs(5000));
        assert!(is_reset(&m.evaluate(secs(5030))));
        for t in 5031..6000 {
            assert_eq!(m.evaluate(secs(t)), MonitorDecision::Healthy, "at {t}");
        }
    }

    #[test]
    fn at_most_three_resets_per_window() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        let mut resets = vec![];
        // Each boot's tools heartbeat once, 1 s into the boot, then hang.
        let mut boot = 0;
        for t in 0..4000 {
            if t == boot + 1 {
                m.heartbeat(secs(t));
            }
            match m.evaluate(secs(t)) {
                MonitorDecision::Reset { .. } => {
                    resets.push(t);
                    boot = t;
                }
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
            mode: MonitoringMode::Vm,
            sensitivity: sens,
            io_window: Duration::from_secs(5),
            grace_period: Duration::from_secs(0),
            max_resets: 1,
        };
        let mut m = VmMonitor::new(s, secs(0));
        m.heartbeat(secs(0));
        assert!(is_reset(&m.evaluate(secs(10))));
        m.heartbeat(secs(10));
        assert_eq!(
            m.evaluate(secs(20)),
            MonitorDecision::ResetLimitReached { resets: 1 }
        );
        assert!(is_reset(&m.evaluate(secs(70))));
    }

    #[test]
    fn disabled_never_resets() {
        let mut m = VmMonitor::new(MonitoringSettings::default(), secs(0));
        assert!(!MonitoringSettings::default().enabled());
        for t in 0..10_000 {
            assert_eq!(m.evaluate(secs(t)), MonitorDecision::Healthy);
        }
    }

    /// Heartbeat lost while the guest keeps doing I/O: never reset, however
    /// long it lasts; reset one I/O window after the I/O stops.
    #[test]
    fn steady_io_keeps_a_silent_guest_alive() {
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        m.heartbeat(secs(0));
        for t in 0..3000 {
            if t % 10 == 0 && t < 2000 {
                m.io_activity(secs(t));
            }
            let d = m.evaluate(secs(t));
            if t < 2110 {
                assert!(!is_reset(&d), "reset at {t} despite I/O at {}", t - t % 10);
            } else {
                assert!(is_reset(&d), "no reset at {t}: {d:?}");
                return;
            }
        }
    }

    #[test]
    fn application_heartbeat_counts_once_seen() {
        let s = MonitoringSettings {
            mode: MonitoringMode::VmAndApplication,
            sensitivity: Sensitivity::High,
            ..Default::default()
        };
        // Tools heartbeat all along; no application ever heartbeats: no reset.
        let mut m = VmMonitor::new(s, secs(0));
        for t in 0..1000 {
            m.heartbeat(secs(t));
            assert_eq!(m.evaluate(secs(t)), MonitorDecision::Healthy);
        }
        // The application heartbeats until 300 s, then stops while the tools
        // keep going: reset 30 s later, naming the application.
        let mut m = VmMonitor::new(s, secs(0));
        let mut reset = None;
        for t in 0..1000 {
            m.heartbeat(secs(t));
            if t <= 300 {
                m.app_heartbeat(secs(t));
            }
            if let MonitorDecision::Reset { reason } = m.evaluate(secs(t)) {
                reset = Some((t, reason));
                break;
            }
        }
        let (t, reason) = reset.expect("reset");
        assert_eq!(t, 330);
        assert!(
            reason.contains("no application heartbeat for 30 s"),
            "{reason}"
        );
        // With VM monitoring only, the application is not watched.
        let mut m = VmMonitor::new(settings(Sensitivity::High), secs(0));
        m.app_heartbeat(secs(1));
        for t in 0..1000 {
            m.heartbeat(secs(t));
            assert_eq!(m.evaluate(secs(t)), MonitorDecision::Healthy);
        }
    }

    /// A monitor that starts late (an agent restarted next to a running VM)
    /// has not seen the last I/O window: it waits a whole window first.
    #[test]
    fn io_must_be_watched_for_a_whole_window() {
        let s = MonitoringSettings {
            mode: MonitoringMode::Vm,
            sensitivity: Sensitivity::High,
            grace_period: Duration::ZERO,
            ..Default::default()
        };
        let mut m = VmMonitor::new(s, secs(1000));
        m.heartbeat(secs(1000));
        assert_eq!(m.evaluate(secs(1030)), MonitorDecision::Suspect);
        assert_eq!(m.evaluate(secs(1119)), MonitorDecision::Suspect);
        assert!(is_reset(&m.evaluate(secs(1120))));
    }

    #[test]
    fn io_tracker_survives_counter_reset() {
        let mut io = IoTracker::default();
        assert!(!io.observe(500), "first sample is a baseline");
        assert!(!io.observe(500));
        assert!(io.observe(501));
        // The VM was reset: its counters start again from zero.
        assert!(!io.observe(3));
        assert!(io.observe(4));
    }

    #[test]
    fn settings_from_config_text() {
        let s: MonitoringSettings =
            serde_json::from_str(r#"{"mode": "vm_and_application", "sensitivity": "high"}"#)
                .unwrap();
        assert_eq!(s.mode, MonitoringMode::VmAndApplication);
        assert_eq!(s.io_window, Duration::from_secs(120));
        assert_eq!(s.grace_period, Duration::from_secs(120));
        assert_eq!(s.max_resets, 3);
        let c: MonitoringSettings = serde_json::from_str(
            r#"{"mode": "vm", "sensitivity": {"custom": {"failure_interval": 15, "reset_window": 600}},
                "io_window": 20, "grace_period": 40, "max_resets": 2}"#,
        )
        .unwrap();
        assert_eq!(c.sensitivity.failure_interval(), Duration::from_secs(15));
        assert_eq!(c.sensitivity.reset_window(), Duration::from_secs(600));
        assert_eq!(c.io_window, Duration::from_secs(20));
        assert_eq!(
            serde_json::from_str::<MonitoringSettings>(&serde_json::to_string(&c).unwrap())
                .unwrap(),
            c
        );
        let e = serde_json::from_str::<MonitoringSettings>(r#"{"mode": "on"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `on`"), "{e}");
    }
}
