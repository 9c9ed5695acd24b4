//! The capacity report of `vigil cluster status`: current capacity and what
//! the active admission-control policy still admits.

use super::{free_percentage, slot_report, AdmissionPolicy, HostCapacity, SlotReport};
use crate::types::{HostId, Resources};
use serde::Serialize;
use std::collections::BTreeSet;

/// What the cluster can still take under its policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum FailoverCapacity {
    /// No policy: nothing is kept for failover.
    Disabled,
    /// Slot policy.
    Slots {
        /// Host failures tolerated.
        tolerated: u32,
        /// The arithmetic; `None` when no VM has a reservation.
        report: Option<SlotReport>,
        /// Further slot-sized VMs that may power on (negative: over by that
        /// many; `None`: unbounded).
        available: Option<i64>,
    },
    /// Percentage policy.
    Percentage {
        /// CPU kept free, percent.
        cpu_pct: u32,
        /// Memory kept free, percent.
        mem_pct: u32,
        /// CPU free now, rounded percent.
        cpu_free_pct: u64,
        /// Memory free now, rounded percent.
        mem_free_pct: u64,
        /// What power-ons may still reserve before the policy is reached.
        headroom: Resources,
    },
    /// Dedicated failover hosts.
    Dedicated {
        /// The failover hosts.
        failover_hosts: BTreeSet<HostId>,
        /// Their capacity (kept for restarts).
        failover_capacity: Resources,
        /// The other hosts' capacity.
        normal_capacity: Resources,
        /// What power-ons may still reserve on the other hosts.
        headroom: Resources,
    },
}

/// Current and failover capacity of a cluster, for `vigil cluster status`.
/// `Display` renders it as a few lines of text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapacityReport {
    /// Hosts counted (live, not in maintenance).
    pub hosts: usize,
    /// Their total capacity.
    pub total: Resources,
    /// Powered-on VMs.
    pub vms: usize,
    /// Their reservations.
    pub reserved: Resources,
    /// Under the active policy.
    pub failover: FailoverCapacity,
}

/// Computes the [`CapacityReport`] of `hosts` running `powered_on` VMs.
pub fn capacity(
    policy: &AdmissionPolicy,
    hosts: &[HostCapacity],
    powered_on: &[Resources],
) -> CapacityReport {
    let sum =
        |it: &mut dyn Iterator<Item = Resources>| it.fold(Resources::default(), |a, r| a.add(&r));
    let total = sum(&mut hosts.iter().map(|h| h.capacity));
    let reserved = sum(&mut powered_on.iter().copied());
    let failover = match policy {
        AdmissionPolicy::Disabled => FailoverCapacity::Disabled,
        AdmissionPolicy::HostFailuresTolerated(n) => {
            let report = slot_report(hosts, powered_on, *n);
            let available = report
                .as_ref()
                .map(|r| r.after_failures as i64 - r.used as i64);
            FailoverCapacity::Slots {
                tolerated: *n,
                report,
                available,
            }
        }
        AdmissionPolicy::PercentageReserved { cpu_pct, mem_pct } => {
            let allowed =
                |t: u64, pct: u32| t - (u128::from(t) * u128::from(pct)).div_ceil(100) as u64;
            FailoverCapacity::Percentage {
                cpu_pct: *cpu_pct,
                mem_pct: *mem_pct,
                cpu_free_pct: free_percentage(reserved.cpu_mhz, total.cpu_mhz),
                mem_free_pct: free_percentage(reserved.mem_mib, total.mem_mib),
                headroom: Resources::new(
                    allowed(total.cpu_mhz, (*cpu_pct).min(100)),
                    allowed(total.mem_mib, (*mem_pct).min(100)),
                )
                .saturating_sub(&reserved),
            }
        }
        AdmissionPolicy::DedicatedFailoverHosts(f) => {
            let failover_capacity = sum(&mut hosts
                .iter()
                .filter(|h| f.contains(&h.id))
                .map(|h| h.capacity));
            let normal_capacity = total.saturating_sub(&failover_capacity);
            FailoverCapacity::Dedicated {
                failover_hosts: f.clone(),
                failover_capacity,
                normal_capacity,
                headroom: normal_capacity.saturating_sub(&reserved),
            }
        }
    };
    CapacityReport {
        hosts: hosts.len(),
        total,
        vms: powered_on.len(),
        reserved,
        failover,
    }
}

fn res(r: &Resources) -> String {
    format!("{} MHz / {} MiB", r.cpu_mhz, r.mem_mib)
}

impl std::fmt::Display for CapacityReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "current capacity: {} on {} host(s); {} powered-on VM(s) reserve {} ({}% CPU, {}% memory); free {}",
            res(&self.total),
            self.hosts,
            self.vms,
            res(&self.reserved),
            100 - free_percentage(self.reserved.cpu_mhz, self.total.cpu_mhz).min(100),
            100 - free_percentage(self.reserved.mem_mib, self.total.mem_mib).min(100),
            res(&self.total.saturating_sub(&self.reserved)),
        )?;
        match &self.failover {
            FailoverCapacity::Disabled => writeln!(
                f,
                "admission control: disabled (power-ons are not checked; nothing is kept for failover)"
            ),
            FailoverCapacity::Slots {
                tolerated,
                report: None,
                ..
            } => writeln!(
                f,
                "admission control: host failures tolerated = {tolerated}; no VM has a reservation, so slots are empty and every power-on is admitted"
            ),
            FailoverCapacity::Slots {
                tolerated,
                report: Some(r),
                available,
            } => {
                let per_host: Vec<String> =
                    r.per_host.iter().map(|(h, s)| format!("{h}={s}")).collect();
                writeln!(
                    f,
                    "admission control: host failures tolerated = {tolerated}; slot = {}; slots per host: {} (total {})",
                    res(&r.slot),
                    per_host.join(", "),
                    r.total
                )?;
                let avail = available.unwrap_or(0);
                writeln!(
                    f,
                    "failover capacity: {} slot(s) after losing the {tolerated} largest host(s), {} used; {}",
                    r.after_failures,
                    r.used,
                    if avail >= 0 {
                        format!("{avail} more slot-sized VM(s) may power on")
                    } else {
                        format!("over by {} slot(s): the policy is not met (restarts after a failure may not all fit)", -avail)
                    }
                )
            }
            FailoverCapacity::Percentage {
                cpu_pct,
                mem_pct,
                cpu_free_pct,
                mem_free_pct,
                headroom,
            } => writeln!(
                f,
                "admission control: percentage reserved (CPU {cpu_pct}%, memory {mem_pct}%)\nfailover capacity: CPU {cpu_free_pct}% free (need {cpu_pct}%), memory {mem_free_pct}% free (need {mem_pct}%); power-ons may still reserve {}",
                res(headroom)
            ),
            FailoverCapacity::Dedicated {
                failover_hosts,
                failover_capacity,
                normal_capacity,
                headroom,
            } => writeln!(
                f,
                "admission control: dedicated failover hosts {} ({} kept for restarts)\nfailover capacity: other hosts hold {}; power-ons may still reserve {}",
                failover_hosts
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                res(failover_capacity),
                res(normal_capacity),
                res(headroom)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::admit;
    use super::super::tests::{seed_hosts, seed_vms};
    use super::*;

    #[test]
    fn capacity_report_for_each_policy() {
        let hosts = seed_hosts();
        let vms = seed_vms();
        let r = capacity(&AdmissionPolicy::HostFailuresTolerated(1), &hosts, &vms);
        let t = r.to_string();
        assert!(t.starts_with("current capacity: 36000 MHz / 151552 MiB on 3 host(s); 3 powered-on VM(s) reserve 7000 MHz / 12288 MiB (19% CPU, 8% memory)"), "{t}");
        assert!(
            t.contains(
                "slot = 4000 MHz / 6144 MiB; slots per host: host1=1, host2=1, host3=2 (total 4)"
            ),
            "{t}"
        );
        assert!(
            t.contains("2 slot(s) after losing the 1 largest host(s), 3 used; over by 1 slot(s)"),
            "{t}"
        );
        let r = capacity(
            &AdmissionPolicy::HostFailuresTolerated(0),
            &hosts,
            &vms[..1],
        );
        assert!(
            r.to_string()
                .contains("6 slot(s) after losing the 0 largest host(s), 1 used; 5 more slot-sized VM(s) may power on"),
            "{r}"
        );

        let p = AdmissionPolicy::PercentageReserved {
            cpu_pct: 25,
            mem_pct: 87,
        };
        let r = capacity(&p, &hosts, &vms);
        let t = r.to_string();
        assert!(
            t.contains("CPU 81% free (need 25%), memory 92% free (need 87%)"),
            "{t}"
        );
        // 36000 * 75 % = 27000 - 7000 = 20000 MHz; 151552 - ceil(151552 * 0.87) = 19701 - 12288 = 7413 MiB.
        assert!(
            t.contains("power-ons may still reserve 20000 MHz / 7413 MiB"),
            "{t}"
        );
        // The headroom is exact: reserving it is admitted, one MiB more is not.
        assert!(admit(&p, &hosts, &vms, Resources::new(0, 7413), None).is_ok());
        assert!(admit(&p, &hosts, &vms, Resources::new(0, 7414), None).is_err());

        let d = AdmissionPolicy::DedicatedFailoverHosts(["host1".into()].into_iter().collect());
        let t = capacity(&d, &hosts, &vms).to_string();
        assert!(
            t.contains("dedicated failover hosts host1 (4000 MHz / 131072 MiB kept for restarts)"),
            "{t}"
        );
        assert!(t.contains("other hosts hold 32000 MHz / 20480 MiB; power-ons may still reserve 25000 MHz / 8192 MiB"), "{t}");
        let t = capacity(&AdmissionPolicy::Disabled, &hosts, &[]).to_string();
        assert!(t.contains("admission control: disabled"), "{t}");
        let t = capacity(
            &AdmissionPolicy::HostFailuresTolerated(1),
            &hosts,
            &[Resources::default()],
        )
        .to_string();
        assert!(t.contains("no VM has a reservation"), "{t}");
    }
}
