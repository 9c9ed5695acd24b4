//! Admission control (H12): pure arithmetic deciding whether the cluster can
//! still restart every protected VM after the failures the policy promises to
//! survive. Every refusal carries the arithmetic, so an operator can see why.
//!
//! Admission control only gates *operator* actions: a power-on ([`admit`]),
//! a reservation increase ([`admit_reservation_change`]) and entering
//! maintenance mode ([`admit_maintenance`]). A migration into the cluster
//! would be [`admit`] with the target host, but live migration does not go
//! through the agents yet, so nothing calls it for one. HA restarts after a failure
//! never consult it: refusing a restart to keep spare capacity for a
//! hypothetical second failure would be absurd while the first one is being
//! handled. [`capacity`] renders current and failover capacity under the
//! active policy for `vigil cluster status`.
//!
//! Units: CPU in MHz, memory in MiB, as reservations are written. Percentages
//! shown are rounded to the nearest percent, but the decision compares
//! exactly (86.9 % free does not satisfy an 87 % policy).

use crate::types::{HostId, Resources};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use thiserror::Error;

/// The admission-control policy of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdmissionPolicy {
    /// No check: any power-on is allowed.
    #[default]
    Disabled,
    /// Slot policy: the cluster must keep enough slots to restart every
    /// powered-on VM after losing its `n` largest hosts.
    HostFailuresTolerated(u32),
    /// Keep this percentage of the cluster's CPU and memory unreserved.
    PercentageReserved {
        /// Percent of total CPU kept free for failover.
        cpu_pct: u32,
        /// Percent of total memory kept free for failover.
        mem_pct: u32,
    },
    /// These hosts run nothing in normal operation; they only take restarts.
    DedicatedFailoverHosts(BTreeSet<HostId>),
}

/// A host as admission control sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostCapacity {
    /// The host.
    pub id: HostId,
    /// What it can give to VMs.
    pub capacity: Resources,
}

/// Why a power-on was refused; the message shows the arithmetic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdmissionError {
    /// The slot policy would be broken.
    #[error("admission control (host failures tolerated = {tolerated}): {detail}")]
    InsufficientSlots {
        /// The policy's `n`.
        tolerated: u32,
        /// The slot arithmetic.
        detail: String,
    },
    /// The percentage policy would be broken.
    #[error("admission control (percentage reserved): {detail}")]
    InsufficientPercentage {
        /// The percentage arithmetic.
        detail: String,
    },
    /// The VM was to be placed on a dedicated failover host.
    #[error("admission control (dedicated failover hosts): host {host} is a dedicated failover host and runs no VM in normal operation; choose another host")]
    DedicatedFailoverHost {
        /// The host.
        host: HostId,
    },
    /// The non-failover hosts cannot hold the VMs.
    #[error("admission control (dedicated failover hosts): {detail}")]
    InsufficientNonFailoverCapacity {
        /// The arithmetic.
        detail: String,
    },
    /// Entering maintenance mode would break the policy.
    #[error("host {host} cannot enter maintenance mode: without it, {source}")]
    Maintenance {
        /// The host.
        host: HostId,
        /// The check that fails without the host.
        #[source]
        source: Box<AdmissionError>,
    },
}

/// True if `used` of `total` leaves at least `pct` percent free, compared
/// exactly (no rounding).
fn pct_ok(used: u64, total: u64, pct: u32) -> bool {
    used <= total && u128::from(total - used) * 100 >= u128::from(pct) * u128::from(total)
}

/// The slot size: the largest CPU and the largest memory reservation among
/// powered-on VMs (they need not come from the same VM).
pub fn slot_size(vms: &[Resources]) -> Resources {
    vms.iter().fold(Resources::default(), |s, v| {
        Resources::new(s.cpu_mhz.max(v.cpu_mhz), s.mem_mib.max(v.mem_mib))
    })
}

/// Slots a host holds: `min(cpu / slot_cpu, mem / slot_mem)`. A dimension
/// with a zero slot does not limit. `None` when the slot is zero on both
/// dimensions (no reservations: slots are unbounded).
pub fn host_slots(host: &Resources, slot: &Resources) -> Option<u64> {
    let cpu = (slot.cpu_mhz > 0).then(|| host.cpu_mhz / slot.cpu_mhz);
    let mem = (slot.mem_mib > 0).then(|| host.mem_mib / slot.mem_mib);
    match (cpu, mem) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (Some(c), None) => Some(c),
        (None, Some(m)) => Some(m),
        (None, None) => None,
    }
}

/// The slot arithmetic of a cluster, for the CLI and for refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotReport {
    /// The slot size.
    pub slot: Resources,
    /// Slots per host, in the order given.
    pub per_host: Vec<(HostId, u64)>,
    /// Total slots in the cluster.
    pub total: u64,
    /// Slots left after removing the `n` hosts with the most slots.
    pub after_failures: u64,
    /// Slots used by powered-on VMs (one each).
    pub used: u64,
}

/// Computes the slot report for `n` tolerated host failures. `None` when no
/// VM has a reservation (every slot is empty: the policy cannot refuse).
pub fn slot_report(hosts: &[HostCapacity], vms: &[Resources], n: u32) -> Option<SlotReport> {
    let slot = slot_size(vms);
    let mut per_host = Vec::with_capacity(hosts.len());
    for h in hosts {
        per_host.push((h.id.clone(), host_slots(&h.capacity, &slot)?));
    }
    let total = per_host.iter().map(|(_, s)| s).sum();
    let mut sorted: Vec<u64> = per_host.iter().map(|(_, s)| *s).collect();
    // Removing the hosts with the most slots is the worst case the policy
    // must survive.
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let after_failures = sorted.iter().skip(n as usize).sum();
    Some(SlotReport {
        slot,
        per_host,
        total,
        after_failures,
        used: vms.len() as u64,
    })
}

/// Percentage of the cluster left free after reservations, rounded to the
/// nearest percent: `(1 - reserved / total) * 100`.
pub fn free_percentage(reserved: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    let free = total.saturating_sub(reserved);
    (free * 100 + total / 2) / total
}

/// The percentage of a resource that must be kept free so that the cluster
/// survives losing its `n` largest hosts of that resource: the share of the
/// largest hosts, rounded *up* (rounding down would reserve too little).
pub fn recommended_reserve_pct(host_amounts: &[u64], n: usize) -> u64 {
    let total: u64 = host_amounts.iter().sum();
    if total == 0 {
        return 0;
    }
    let mut sorted = host_amounts.to_vec();
    sorted.sort_unstable();
    let rest: u64 = sorted.iter().take(sorted.len().saturating_sub(n)).sum();
    ((total - rest) * 100).div_ceil(total)
}

/// Decides whether `new_vm` may power on (on `target`, when known) given the
/// VMs already powered on. `Ok(())` means admitted.
pub fn admit(
    policy: &AdmissionPolicy,
    hosts: &[HostCapacity],
    powered_on: &[Resources],
    new_vm: Resources,
    target: Option<&HostId>,
) -> Result<(), AdmissionError> {
    let mut vms = powered_on.to_vec();
    vms.push(new_vm);
    match policy {
        AdmissionPolicy::Disabled => Ok(()),
        AdmissionPolicy::HostFailuresTolerated(n) => {
            let Some(r) = slot_report(hosts, &vms, *n) else {
                return Ok(());
            };
            if r.used <= r.after_failures {
                return Ok(());
            }
            let per_host: Vec<String> =
                r.per_host.iter().map(|(h, s)| format!("{h}={s}")).collect();
            Err(AdmissionError::InsufficientSlots {
                tolerated: *n,
                detail: format!(
                    "slot = {} MHz / {} MiB; slots per host: {} (total {}); after losing the {} largest host(s) {} slot(s) remain, but {} powered-on VM(s) need {}",
                    r.slot.cpu_mhz, r.slot.mem_mib, per_host.join(", "), r.total, n,
                    r.after_failures, r.used, r.used
                ),
            })
        }
        AdmissionPolicy::PercentageReserved { cpu_pct, mem_pct } => {
            let total = hosts
                .iter()
                .fold(Resources::default(), |a, h| a.add(&h.capacity));
            let used = vms.iter().fold(Resources::default(), |a, v| a.add(v));
            let cpu_free = free_percentage(used.cpu_mhz, total.cpu_mhz);
            let mem_free = free_percentage(used.mem_mib, total.mem_mib);
            if pct_ok(used.cpu_mhz, total.cpu_mhz, *cpu_pct)
                && pct_ok(used.mem_mib, total.mem_mib, *mem_pct)
            {
                return Ok(());
            }
            Err(AdmissionError::InsufficientPercentage {
                detail: format!(
                    "CPU free (1 - {}/{} MHz) = {}% (need {}%), memory free (1 - {}/{} MiB) = {}% (need {}%)",
                    used.cpu_mhz, total.cpu_mhz, cpu_free, cpu_pct, used.mem_mib, total.mem_mib,
                    mem_free, mem_pct
                ),
            })
        }
        AdmissionPolicy::DedicatedFailoverHosts(failover) => {
            if let Some(t) = target {
                if failover.contains(t) {
                    return Err(AdmissionError::DedicatedFailoverHost { host: t.clone() });
                }
            }
            let normal = hosts
                .iter()
                .filter(|h| !failover.contains(&h.id))
                .fold(Resources::default(), |a, h| a.add(&h.capacity));
            let used = vms.iter().fold(Resources::default(), |a, v| a.add(v));
            if normal.fits(&used) {
                return Ok(());
            }
            Err(AdmissionError::InsufficientNonFailoverCapacity {
                detail: format!(
                    "non-failover hosts hold {} MHz / {} MiB, powered-on VMs would reserve {} MHz / {} MiB",
                    normal.cpu_mhz, normal.mem_mib, used.cpu_mhz, used.mem_mib
                ),
            })
        }
    }
}

/// Decides whether a powered-on VM's reservation may grow from what it is
/// to `new`: `others` are the other powered-on VMs, `host` where it runs.
pub fn admit_reservation_change(
    policy: &AdmissionPolicy,
    hosts: &[HostCapacity],
    others: &[Resources],
    new: Resources,
    host: Option<&HostId>,
) -> Result<(), AdmissionError> {
    // Where the VM already runs is not a new placement: a VM left on a
    // dedicated failover host (after a failover) may still change.
    let target = match policy {
        AdmissionPolicy::DedicatedFailoverHosts(_) => None,
        _ => host,
    };
    admit(policy, hosts, others, new, target)
}

/// Decides whether `host` may enter maintenance mode: the cluster without
/// it must still satisfy the policy for every powered-on VM (its own VMs
/// are migrated to the others first). A dedicated failover host may always
/// leave (it runs nothing), but the policy then has one fewer to restart on.
pub fn admit_maintenance(
    policy: &AdmissionPolicy,
    hosts: &[HostCapacity],
    powered_on: &[Resources],
    host: &HostId,
) -> Result<(), AdmissionError> {
    let rest: Vec<HostCapacity> = hosts.iter().filter(|h| &h.id != host).cloned().collect();
    let Some((last, before)) = powered_on.split_last() else {
        return Ok(());
    };
    admit(policy, &rest, before, *last, None).map_err(|e| AdmissionError::Maintenance {
        host: host.clone(),
        source: Box::new(e),
    })
}

mod capacity;
pub use capacity::{capacity, CapacityReport, FailoverCapacity};

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const GHZ: u64 = 1000;
    const GB: u64 = 1024;

    pub(super) fn seed_hosts() -> Vec<HostCapacity> {
        vec![
            HostCapacity {
                id: "host1".into(),
                capacity: Resources::new(4 * GHZ, 128 * GB),
            },
            HostCapacity {
                id: "host2".into(),
                capacity: Resources::new(24 * GHZ, 6 * GB),
            },
            HostCapacity {
                id: "host3".into(),
                capacity: Resources::new(8 * GHZ, 14 * GB),
            },
        ]
    }

    pub(super) fn seed_vms() -> Vec<Resources> {
        vec![
            Resources::new(4 * GHZ, 2 * GB),
            Resources::new(2 * GHZ, 4 * GB),
            Resources::new(GHZ, 6 * GB),
        ]
    }

    /// Seed 000's worked example: slot = 4 GHz / 6 GB, slots 1 / 1 / 2.
    #[test]
    fn seed_example_slots() {
        let r = slot_report(&seed_hosts(), &seed_vms(), 1).unwrap();
        assert_eq!(r.slot, Resources::new(4 * GHZ, 6 * GB));
        let slots: Vec<u64> = r.per_host.iter().map(|(_, s)| *s).collect();
        assert_eq!(slots, vec![1, 1, 2]);
        assert_eq!(r.total, 4);
        // Losing host3 (2 slots) leaves 2 slots for 3 VMs: the cluster does
        // not tolerate one host failure with these VMs.
        assert_eq!(r.after_failures, 2);
        assert_eq!(r.used, 3);
    }

    /// Seed 000's percentages. RAM: (1 - 12/148) = 92%, and 87% must be
    /// reserved to survive losing the 128 GB host: 1 - (6+14)/148.
    /// CPU: the seed writes (1 - 7/34) = 79%, but its own table sums to
    /// 4+24+8 = 36 GHz, so the arithmetic gives (1 - 7/36) = 81%; 79% is
    /// what a 34 GHz cluster would give, which we check too.
    #[test]
    fn seed_example_percentages() {
        assert_eq!(free_percentage(12 * GB, 148 * GB), 92);
        assert_eq!(free_percentage(7, 34), 79);
        assert_eq!(free_percentage(7 * GHZ, 36 * GHZ), 81);
        assert_eq!(recommended_reserve_pct(&[128, 6, 14], 1), 87);
    }

    #[test]
    fn slot_policy_refusal_shows_arithmetic() {
        let hosts = seed_hosts();
        let vms = &seed_vms()[..2];
        // Two VMs fit in the 2 slots left after losing host3; the third does not.
        let third = seed_vms()[2];
        assert!(admit(
            &AdmissionPolicy::HostFailuresTolerated(1),
            &hosts,
            &vms[..1],
            vms[1],
            None
        )
        .is_ok());
        let err = admit(
            &AdmissionPolicy::HostFailuresTolerated(1),
            &hosts,
            vms,
            third,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("slot = 4000 MHz / 6144 MiB"), "{err}");
        assert!(err.contains("host1=1, host2=1, host3=2 (total 4)"), "{err}");
        assert!(
            err.contains("2 slot(s) remain, but 3 powered-on VM(s)"),
            "{err}"
        );
    }

    #[test]
    fn percentage_policy() {
        let hosts = seed_hosts();
        let p = AdmissionPolicy::PercentageReserved {
            cpu_pct: 25,
            mem_pct: 87,
        };
        let vms = seed_vms();
        assert!(admit(&p, &hosts, &vms[..2], vms[2], None).is_ok());
        let big = Resources::new(GHZ, 10 * GB);
        let err = admit(&p, &hosts, &vms, big, None).unwrap_err().to_string();
        assert!(
            err.contains("memory free (1 - 22528/151552 MiB) = 85% (need 87%)"),
            "{err}"
        );
    }

    #[test]
    fn no_reservations_never_refused() {
        let hosts = seed_hosts();
        let zero = vec![Resources::default(); 50];
        assert_eq!(slot_report(&hosts, &zero, 1), None);
        assert!(admit(
            &AdmissionPolicy::HostFailuresTolerated(2),
            &hosts,
            &zero,
            Resources::default(),
            None
        )
        .is_ok());
        // Memory-only reservations: CPU does not limit.
        assert_eq!(
            host_slots(&Resources::new(0, 8 * GB), &Resources::new(0, 2 * GB)),
            Some(4)
        );
    }

    #[test]
    fn one_host_larger_than_the_rest() {
        let hosts = vec![
            HostCapacity {
                id: "big".into(),
                capacity: Resources::new(64 * GHZ, 512 * GB),
            },
            HostCapacity {
                id: "a".into(),
                capacity: Resources::new(8 * GHZ, 32 * GB),
            },
            HostCapacity {
                id: "b".into(),
                capacity: Resources::new(8 * GHZ, 32 * GB),
            },
        ];
        let vms = vec![Resources::new(GHZ, 4 * GB); 15];
        let r = slot_report(&hosts, &vms, 1).unwrap();
        assert_eq!(
            r.per_host.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            vec![64, 8, 8]
        );
        // Losing "big" leaves 16 slots: 16 VMs fit, a 17th does not.
        assert_eq!(r.after_failures, 16);
        let p = AdmissionPolicy::HostFailuresTolerated(1);
        assert!(admit(&p, &hosts, &vms, Resources::new(GHZ, 4 * GB), None).is_ok());
        let mut more = vms.clone();
        more.push(Resources::new(GHZ, 4 * GB));
        assert!(admit(&p, &hosts, &more, Resources::new(GHZ, 4 * GB), None).is_err());
        assert_eq!(recommended_reserve_pct(&[512, 32, 32], 1), 89);
    }

    #[test]
    fn dedicated_failover_hosts() {
        let hosts = seed_hosts();
        let p = AdmissionPolicy::DedicatedFailoverHosts(["host1".into()].into_iter().collect());
        let vm = Resources::new(GHZ, GB);
        let err = admit(&p, &hosts, &[], vm, Some(&"host1".into())).unwrap_err();
        assert!(matches!(err, AdmissionError::DedicatedFailoverHost { .. }));
        assert!(admit(&p, &hosts, &[], vm, Some(&"host3".into())).is_ok());
        // host2 + host3 hold 20 GB: 21 GB of reservations is refused.
        let err = admit(&p, &hosts, &[Resources::new(GHZ, 20 * GB)], vm, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("non-failover hosts hold 32000 MHz / 20480 MiB"),
            "{err}"
        );
    }

    #[test]
    fn disabled_admits_everything() {
        assert!(admit(
            &AdmissionPolicy::Disabled,
            &[],
            &[],
            Resources::new(1 << 40, 1 << 40),
            None
        )
        .is_ok());
    }

    #[test]
    fn percentage_compares_exactly() {
        let hosts = vec![HostCapacity {
            id: "a".into(),
            capacity: Resources::new(1000, 1000),
        }];
        let p = AdmissionPolicy::PercentageReserved {
            cpu_pct: 0,
            mem_pct: 87,
        };
        // 130 of 1000 leaves 87.0 %: admitted; 131 leaves 86.9 %, shown
        // rounded as 87 %, but refused.
        assert!(admit(&p, &hosts, &[], Resources::new(0, 130), None).is_ok());
        let e = admit(&p, &hosts, &[], Resources::new(0, 131), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("memory free (1 - 131/1000 MiB) = 87% (need 87%)"),
            "{e}"
        );
        // No hosts at all: any reservation is refused.
        assert!(admit(&p, &[], &[], Resources::new(0, 1), None).is_err());
    }

    #[test]
    fn reservation_increase_and_migration_in() {
        let hosts = seed_hosts();
        let p = AdmissionPolicy::HostFailuresTolerated(1);
        let vms = seed_vms();
        // VM1 and VM2 run; VM2 growing from 2 GHz / 4 GB to 2 GHz / 7 GB
        // makes the slot 4 GHz / 7 GB: 1 + 0 + 2 slots, 1 after losing host3,
        // for 2 VMs.
        let e = admit_reservation_change(
            &p,
            &hosts,
            &vms[..1],
            Resources::new(2 * GHZ, 7 * GB),
            Some(&"host3".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("slot = 4000 MHz / 7168 MiB"), "{e}");
        assert!(e.contains("host1=1, host2=0, host3=2 (total 3)"), "{e}");
        assert!(
            e.contains("1 slot(s) remain, but 2 powered-on VM(s)"),
            "{e}"
        );
        assert!(admit_reservation_change(
            &p,
            &hosts,
            &vms[..1],
            Resources::new(2 * GHZ, 5 * GB),
            None
        )
        .is_ok());
        // A VM migrating in lands on a named host: a dedicated failover host
        // refuses it like a power-on.
        let d = AdmissionPolicy::DedicatedFailoverHosts(["host1".into()].into_iter().collect());
        assert!(matches!(
            admit(&d, &hosts, &[], vms[0], Some(&"host1".into())),
            Err(AdmissionError::DedicatedFailoverHost { .. })
        ));
        // ...but a VM already there (after a failover) may change its reservation.
        assert!(admit_reservation_change(&d, &hosts, &[], vms[0], Some(&"host1".into())).is_ok());
    }

    #[test]
    fn maintenance_mode_refused_with_the_reason() {
        let hosts = seed_hosts();
        let p = AdmissionPolicy::PercentageReserved {
            cpu_pct: 25,
            mem_pct: 50,
        };
        let vms = seed_vms();
        // Without host1 (128 GB), 12 GB of 20 GB is reserved: 40 % free < 50 %.
        let e = admit_maintenance(&p, &hosts, &vms, &"host1".into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host host1 cannot enter maintenance mode: without it, admission control (percentage \
             reserved): CPU free (1 - 7000/32000 MHz) = 78% (need 25%), memory free (1 - \
             12288/20480 MiB) = 40% (need 50%)"
        );
        // host2 may go: 12 of 142 GB reserved.
        assert!(admit_maintenance(&p, &hosts, &vms, &"host2".into()).is_ok());
        // Nothing powered on: always allowed.
        assert!(admit_maintenance(&p, &hosts, &[], &"host1".into()).is_ok());
    }
}
