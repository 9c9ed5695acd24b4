//! VM disk leases (H10): pure lease arithmetic, sanlock style, so that two
//! copies of a VM never run at once even when hosts cannot talk.
//!
//! # The record
//! Each VM has a lease record on its datastore: `owner`, `generation` (bumped
//! on every takeover) and `counter` (bumped on every renewal). The owner
//! renews every `renew_interval`; a renewal is one write of the record.
//!
//! # The timing argument (no clock synchronisation)
//! Hosts never compare timestamps. Each side measures only intervals, on its
//! own monotonic clock, whose rate may differ from real time by at most `ε`
//! (`clock_rate_error`, e.g. 1%). Let `tw` be the real time at which the owner
//! *issued* its last successful renewal.
//!
//! * Owner: it measures from `tw` (issue, not completion, so a slow write
//!   cannot stretch the deadline) and must have stopped the guest, and
//!   abandoned every write it has in flight, by `stop_time` on its clock. The
//!   guest is gone `kill_time` later; an in-flight write lands at most
//!   `io_timeout` after it was issued. So nothing of the owner's touches the
//!   disks or the record after real time
//!   `tw + (stop_time + max(io_timeout, kill_time)) · (1 + ε)`.
//! * Peer: the value it sees was written at or after `tw`. It first observes
//!   that value at some real time `≥ tw`, and takes over only when it has seen
//!   the record unchanged for `takeover_time` on *its* clock, i.e. at real time
//!   `≥ tw + takeover_time · (1 − ε)`.
//!
//! Safety therefore needs
//! `takeover_time · (1 − ε) > (stop_time + max(io_timeout, kill_time)) · (1 + ε)`,
//! and liveness (a healthy owner with one slow renewal must not stop itself)
//! needs `renew_interval + io_timeout < stop_time`. The defaults (renew
//! 500 ms, I/O timeout 1 s, kill 500 ms, stop 2 s, takeover 3.5 s, ε = 1%)
//! give `3.465 s > 3.03 s`. [`LeaseTimings::validate`] checks both
//! inequalities.
//!
//! "Stopped" means: issues no guest disk write and no renewal any more. By
//! default ([`LeaseLoss::Pause`]) the VMM parks the vCPUs at `stop_time` and
//! keeps its write fence shut instead of ending the process, so a storage
//! stall longer than `stop_time - renew_interval` costs the guest a pause,
//! not its life. Such a lease-suspended owner gets the lease back only the
//! way a peer would: record unchanged for `takeover_time` on its own clock,
//! then the exclusive claim of the next generation. It is one more
//! contender of the same protocol, so the argument above is unchanged.
//!
//! A host that comes back (after a freeze, or when its storage path returns)
//! and reads a record with another generation or owner has lost the lease: its
//! copy is stale and must be powered off without another write.

use crate::time::Time;
use crate::types::HostId;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

/// Lease timing parameters; see the module documentation for the argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How often the owner renews (default 500 ms).
    pub renew_interval: Duration,
    /// A read or write not completed by then is abandoned (default 1 s).
    pub io_timeout: Duration,
    /// Time from the stop order to the guest being gone or parked (default
    /// 500 ms).
    pub kill_time: Duration,
    /// The owner stops (pauses, or powers off) its guest when its last
    /// successful renewal was issued this long ago (default 2 s).
    pub stop_time: Duration,
    /// A peer takes over a record it has seen unchanged this long (default
    /// 3.5 s).
    pub takeover_time: Duration,
    /// Maximum clock rate error, in parts per million (default 10 000 = 1%).
    pub clock_rate_error_ppm: u32,
    /// What the owner's VMM does at `stop_time`: pause the guest and
    /// re-acquire (default), or power it off.
    pub on_loss: LeaseLoss,
}

/// What a VMM does when it cannot renew its lease in time (the VMM's own
/// type: the agent writes it into the VMM's lease spec).
pub use vmm::lease::LeaseLoss;

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            renew_interval: Duration::from_millis(500),
            io_timeout: Duration::from_millis(1000),
            kill_time: Duration::from_millis(500),
            stop_time: Duration::from_millis(2000),
            takeover_time: Duration::from_millis(3500),
            clock_rate_error_ppm: 10_000,
            on_loss: LeaseLoss::Pause,
        }
    }
}

/// Lease timings that break the safety or liveness inequality.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LeaseError {
    /// Takeover could happen while the owner may still write.
    #[error("unsafe lease timings: takeover {takeover_ms} ms (x(1-e) = {takeover_low_ms} ms) must exceed (stop + max(io timeout, kill)) x(1+e) = {owner_high_ms} ms; raise takeover_time or lower stop_time")]
    Unsafe {
        /// Configured takeover time.
        takeover_ms: u64,
        /// Its lower bound in real time.
        takeover_low_ms: u64,
        /// Upper bound of the owner's last write in real time.
        owner_high_ms: u64,
    },
    /// A healthy owner could stop itself after one slow renewal.
    #[error("lease timings would stop healthy guests: renew interval + I/O timeout = {needed_ms} ms must be below stop time {stop_ms} ms")]
    StopTooShort {
        /// renew_interval + io_timeout.
        needed_ms: u64,
        /// stop_time.
        stop_ms: u64,
    },
}

impl LeaseTimings {
    /// Checks the safety and liveness inequalities of the module docs.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let e = u128::from(self.clock_rate_error_ppm);
        let takeover = self.takeover_time.as_micros();
        let takeover_low = takeover * (1_000_000 - e) / 1_000_000;
        let owner = (self.stop_time + self.io_timeout.max(self.kill_time)).as_micros();
        let owner_high = owner * (1_000_000 + e) / 1_000_000;
        if takeover_low <= owner_high {
            return Err(LeaseError::Unsafe {
                takeover_ms: self.takeover_time.as_millis() as u64,
                takeover_low_ms: (takeover_low / 1000) as u64,
                owner_high_ms: (owner_high / 1000) as u64,
            });
        }
        let needed = self.renew_interval + self.io_timeout;
        if needed >= self.stop_time {
            return Err(LeaseError::StopTooShort {
                needed_ms: needed.as_millis() as u64,
                stop_ms: self.stop_time.as_millis() as u64,
            });
        }
        Ok(())
    }
}

/// The lease record stored next to a VM's disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder; `None` once released by a clean power-off.
    pub owner: Option<HostId>,
    /// Bumped on every acquisition: identifies one holder's tenure.
    pub generation: u64,
    /// Bumped on every renewal: shows the holder is alive.
    pub counter: u64,
}

impl LeaseRecord {
    /// The record written by `host` acquiring the lease after `self`.
    pub fn acquired_by(&self, host: &HostId) -> LeaseRecord {
        LeaseRecord {
            owner: Some(host.clone()),
            generation: self.generation + 1,
            counter: 0,
        }
    }

    /// The record written by a renewal.
    pub fn renewed(&self) -> LeaseRecord {
        LeaseRecord {
            counter: self.counter + 1,
            ..self.clone()
        }
    }

    /// The record written by a clean release.
    pub fn released(&self) -> LeaseRecord {
        LeaseRecord {
            owner: None,
            ..self.clone()
        }
    }
}

/// A would-be owner watching someone else's record (the takeover side).
#[derive(Debug, Clone, Default)]
pub struct LeaseObserver {
    seen: Option<(LeaseRecord, Time)>,
}

/// What the observer concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeoverVerdict {
    /// Free or already ours: acquire now.
    Free,
    /// Held and alive (or not watched long enough): wait until `until` at least.
    Wait {
        /// Earliest local time a takeover could be allowed.
        until: Time,
    },
    /// Unchanged for `takeover_time`: the holder has stopped; take it.
    Expired,
}

impl LeaseObserver {
    /// An observer that has already seen `rec`, unchanged, since local time
    /// `since` (this host's own earlier reads, e.g. a runtime that watches
    /// every lease on its datastores so a takeover need not start counting
    /// when the restart order arrives).
    pub fn seen_since(rec: LeaseRecord, since: Time) -> Self {
        Self {
            seen: Some((rec, since)),
        }
    }

    /// Feeds one read of the record, at local time `now`, and decides.
    pub fn observe(
        &mut self,
        now: Time,
        rec: &LeaseRecord,
        me: &HostId,
        t: &LeaseTimings,
    ) -> TakeoverVerdict {
        if rec.owner.is_none() || rec.owner.as_ref() == Some(me) {
            return TakeoverVerdict::Free;
        }
        match &self.seen {
            Some((r, since)) if r == rec => {
                if now.since(*since) >= t.takeover_time {
                    TakeoverVerdict::Expired
                } else {
                    TakeoverVerdict::Wait {
                        until: *since + t.takeover_time,
                    }
                }
            }
            // First sight, or the record moved: the clock restarts.
            _ => {
                self.seen = Some((rec.clone(), now));
                TakeoverVerdict::Wait {
                    until: now + t.takeover_time,
                }
            }
        }
    }
}

/// The owner's side: when it must stop, and whether it still holds the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The generation this host acquired.
    pub generation: u64,
    /// Local time at which the last successful renewal (or the acquisition)
    /// was issued.
    pub last_renewal_issued: Time,
}

/// What a holder must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderVerdict {
    /// Keep running.
    Valid,
    /// Not renewed for `stop_time`: stop the guest now (a peer may take over).
    MustStop,
    /// The record names another owner or generation: this copy is stale.
    Lost {
        /// Who holds it now.
        by: Option<HostId>,
        /// Their generation.
        generation: u64,
    },
}

impl LeaseHolder {
    /// The holder state right after acquiring `generation` with a write
    /// issued at `issued`.
    pub fn acquired(generation: u64, issued: Time) -> Self {
        Self {
            generation,
            last_renewal_issued: issued,
        }
    }

    /// A renewal issued at `issued` succeeded.
    pub fn renewed(&mut self, issued: Time) {
        self.last_renewal_issued = self.last_renewal_issued.max(issued);
    }

    /// Whether the guest may keep running at `now`.
    pub fn check_time(&self, now: Time, t: &LeaseTimings) -> HolderVerdict {
        if now.since(self.last_renewal_issued) >= t.stop_time {
            HolderVerdict::MustStop
        } else {
            HolderVerdict::Valid
        }
    }

    /// Compares a fresh read of the record with what this host holds.
    pub fn check_record(&self, me: &HostId, rec: &LeaseRecord) -> HolderVerdict {
        if rec.owner.as_ref() == Some(me) && rec.generation == self.generation {
            HolderVerdict::Valid
        } else {
            HolderVerdict::Lost {
                by: rec.owner.clone(),
                generation: rec.generation,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HostId {
        HostId::new(s)
    }

    /// Long timings (renew 2 s, I/O 3 s, kill 2 s, stop 8 s, takeover 20 s)
    /// whose round numbers keep the tests readable.
    fn long() -> LeaseTimings {
        LeaseTimings {
            renew_interval: Duration::from_secs(2),
            io_timeout: Duration::from_secs(3),
            kill_time: Duration::from_secs(2),
            stop_time: Duration::from_secs(8),
            takeover_time: Duration::from_secs(20),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_safe() {
        LeaseTimings::default().validate().unwrap();
        long().validate().unwrap();
        // The defaults' margin: takeover x 0.99 = 3465 ms against
        // (stop + max(io, kill)) x 1.01 = 3030 ms.
        let t = LeaseTimings::default();
        let low = t.takeover_time.as_millis() as f64 * 0.99;
        let high = (t.stop_time + t.io_timeout.max(t.kill_time)).as_millis() as f64 * 1.01;
        assert!(low - high > 400.0, "{low} vs {high}");
    }

    #[test]
    fn unsafe_timings_refused_with_arithmetic() {
        let t = LeaseTimings {
            takeover_time: Duration::from_secs(11),
            ..long()
        };
        let err = t.validate().unwrap_err().to_string();
        assert!(
            err.contains("10890 ms") && err.contains("11110 ms"),
            "{err}"
        );
        let t = LeaseTimings {
            stop_time: Duration::from_secs(5),
            ..long()
        };
        assert!(matches!(t.validate(), Err(LeaseError::StopTooShort { .. })));
    }

    #[test]
    fn takeover_needs_unchanged_record_for_takeover_time() {
        let t = long();
        let me = h("b");
        let mut obs = LeaseObserver::default();
        let rec = LeaseRecord {
            owner: Some(h("a")),
            generation: 3,
            counter: 7,
        };
        assert_eq!(
            obs.observe(Time::from_secs(100), &rec, &me, &t),
            TakeoverVerdict::Wait {
                until: Time::from_secs(120)
            }
        );
        // The owner renews at 110: the clock restarts.
        let rec2 = rec.renewed();
        assert_eq!(
            obs.observe(Time::from_secs(110), &rec2, &me, &t),
            TakeoverVerdict::Wait {
                until: Time::from_secs(130)
            }
        );
        assert_eq!(
            obs.observe(Time::from_secs(129), &rec2, &me, &t),
            TakeoverVerdict::Wait {
                until: Time::from_secs(130)
            }
        );
        assert_eq!(
            obs.observe(Time::from_secs(130), &rec2, &me, &t),
            TakeoverVerdict::Expired
        );
        let taken = rec2.acquired_by(&me);
        assert_eq!(taken.generation, 4);
        assert_eq!(
            obs.observe(Time::from_secs(131), &taken, &me, &t),
            TakeoverVerdict::Free
        );
        assert_eq!(
            obs.observe(Time::from_secs(0), &rec.released(), &me, &t),
            TakeoverVerdict::Free
        );
    }

    #[test]
    fn observation_can_start_before_the_order() {
        let t = long();
        let rec = LeaseRecord {
            owner: Some(h("a")),
            generation: 1,
            counter: 5,
        };
        let mut obs = LeaseObserver::seen_since(rec.clone(), Time::from_secs(100));
        assert_eq!(
            obs.observe(Time::from_secs(119), &rec, &h("b"), &t),
            TakeoverVerdict::Wait {
                until: Time::from_secs(120)
            }
        );
        assert_eq!(
            obs.observe(Time::from_secs(120), &rec, &h("b"), &t),
            TakeoverVerdict::Expired
        );
        // A renewal seen later restarts the count.
        let mut obs = LeaseObserver::seen_since(rec.clone(), Time::from_secs(100));
        assert_eq!(
            obs.observe(Time::from_secs(125), &rec.renewed(), &h("b"), &t),
            TakeoverVerdict::Wait {
                until: Time::from_secs(145)
            }
        );
    }

    #[test]
    fn holder_stops_before_any_takeover() {
        let t = LeaseTimings::default();
        // Owner clock runs 1% slow, peer clock 1% fast (worst case): real
        // times are owner_local * 1.01 and peer_local * 0.99 from a common origin.
        let mut holder = LeaseHolder::acquired(1, Time::ZERO);
        holder.renewed(Time::from_secs(10));
        let mut stop_local = None;
        for ms in (10_000..30_000).step_by(10) {
            if holder.check_time(Time(ms), &t) == HolderVerdict::MustStop {
                stop_local = Some(ms);
                break;
            }
        }
        let stop_real = stop_local.unwrap() as f64 * 1.01
            + (t.io_timeout.max(t.kill_time).as_millis() as f64) * 1.01;
        // The peer saw the record written at real 10 s at the earliest.
        let takeover_real = 10_000.0 + t.takeover_time.as_millis() as f64 * 0.99;
        assert!(stop_real < takeover_real, "{stop_real} vs {takeover_real}");
    }

    #[test]
    fn returning_holder_detects_lost_lease() {
        let holder = LeaseHolder::acquired(4, Time::ZERO);
        let mine = LeaseRecord {
            owner: Some(h("a")),
            generation: 4,
            counter: 9,
        };
        assert_eq!(holder.check_record(&h("a"), &mine), HolderVerdict::Valid);
        let taken = mine.acquired_by(&h("b"));
        assert_eq!(
            holder.check_record(&h("a"), &taken),
            HolderVerdict::Lost {
                by: Some(h("b")),
                generation: 5
            }
        );
    }
}
