//! Monotonic time as plain data, so a simulated clock can drive the agent.
//!
//! The agent never reads a clock itself: every input carries `now`. In
//! production `now` comes from a monotonic clock (`CLOCK_MONOTONIC`, which
//! never jumps with NTP); in tests it comes from the simulator. Hosts never
//! compare their `Time` values with each other: clocks are not synchronised,
//! and every timeout is measured on the local clock only (see `lease`).

use serde::{Deserialize, Serialize};
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on one host's monotonic clock, in milliseconds since an arbitrary
/// origin (the agent's start in production, zero in the simulator).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    /// The origin of the clock.
    pub const ZERO: Time = Time(0);

    /// Builds a time from milliseconds since the origin.
    pub const fn from_millis(ms: u64) -> Self {
        Time(ms)
    }

    /// Builds a time from seconds since the origin.
    pub const fn from_secs(s: u64) -> Self {
        Time(s * 1000)
    }

    /// Milliseconds since the origin.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`; zero if `earlier` is in the future, so a
    /// stale or reordered input can never make a timeout fire early.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d.as_millis() as u64))
    }
}

impl Sub<Time> for Time {
    type Output = Duration;
    fn sub(self, rhs: Time) -> Duration {
        self.since(rhs)
    }
}

impl std::fmt::Display for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_saturates() {
        assert_eq!(Time(5).since(Time(10)), Duration::ZERO);
        assert_eq!(Time(1500) - Time(500), Duration::from_secs(1));
        assert_eq!(Time::from_secs(2) + Duration::from_millis(5), Time(2005));
    }
}
