//! Agent configuration: who is in the cluster, what this host has, and every
//! timing the agent uses, with documented defaults in one struct.

use crate::admission::AdmissionPolicy;
use crate::lease::LeaseTimings;
use crate::monitoring::MonitoringSettings;
use crate::types::{DatastoreId, HostId, Resources, VmConfig};
use crate::wire::ClusterSecret;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use thiserror::Error;

/// Every timing of the agent. vSphere's value is noted where ours differs; we
/// are faster where it is safe (the lease, not these timers, prevents split
/// brain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    /// Network heartbeat period (default 1 s, as vSphere).
    pub heartbeat_interval: Duration,
    /// A peer not heard for this long is unreachable: 2 missed heartbeats
    /// (default 2 s; the master then pings it and reads its datastore
    /// heartbeats before it calls it failed).
    pub host_timeout: Duration,
    /// How long an election collects candidates before the best one claims
    /// mastership (default 5 s; vSphere 15 s).
    pub election_window: Duration,
    /// A master hearing no agent for this long checks its isolation
    /// addresses (default 5 s, as vSphere).
    pub isolation_detect: Duration,
    /// Extra wait after the isolation pings failed before the isolation
    /// response is applied (vSphere's `das.config.fdm.isolationPolicyDelaySec`;
    /// default 0).
    pub isolation_policy_delay: Duration,
    /// Pings without an answer after this long count as failed (default
    /// 500 ms: a management network answers in well under a millisecond).
    pub ping_timeout: Duration,
    /// Own datastore heartbeat write period (default 500 ms).
    pub ds_heartbeat_interval: Duration,
    /// How often the master reads heartbeat datastores (default 500 ms).
    pub ds_poll_interval: Duration,
    /// A datastore heartbeat record unchanged this long on the master's clock
    /// is stale (default 2 s: four missed writes).
    pub ds_liveness_timeout: Duration,
    /// First retry delay of a failed restart; doubled on each failure
    /// (default 2 s).
    pub restart_retry_base: Duration,
    /// Cap of the retry delay (default 60 s).
    pub restart_retry_max: Duration,
    /// Restart attempts before giving up (default 6, as vSphere's 1 + 5).
    pub restart_max_attempts: u32,
    /// Restart orders in flight per target host (default 4).
    pub max_concurrent_restarts_per_host: usize,
    /// Shut-down isolation response: hard power-off after this long
    /// (default 300 s, as vSphere's `das.isolationshutdowntimeout`).
    pub shutdown_timeout: Duration,
    /// Period of the summary log line (uptime, VMs running) that helps find
    /// leaks after the fact (seed 003; default 1 h).
    pub summary_interval: Duration,
    /// VM disk lease timings.
    pub lease: LeaseTimings,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            host_timeout: Duration::from_secs(2),
            election_window: Duration::from_secs(5),
            isolation_detect: Duration::from_secs(5),
            isolation_policy_delay: Duration::ZERO,
            ping_timeout: Duration::from_millis(500),
            ds_heartbeat_interval: Duration::from_millis(500),
            ds_poll_interval: Duration::from_millis(500),
            ds_liveness_timeout: Duration::from_secs(2),
            restart_retry_base: Duration::from_secs(2),
            restart_retry_max: Duration::from_secs(60),
            restart_max_attempts: 6,
            max_concurrent_restarts_per_host: 4,
            shutdown_timeout: Duration::from_secs(300),
            summary_interval: Duration::from_secs(3600),
            lease: LeaseTimings::default(),
        }
    }
}

/// A cluster member as every agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    /// Management address (pinged by the master when the host goes silent).
    pub mgmt_addr: String,
    /// CPU and memory available to VMs.
    pub capacity: Resources,
    /// Datastores it mounts.
    pub datastores: BTreeSet<DatastoreId>,
}

/// The cluster as handed to every agent when HA is enabled (serde, so the
/// runtime can load it from a file on the datastores).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Every member.
    pub hosts: BTreeMap<HostId, HostSpec>,
    /// Every VM HA may have to restart.
    pub vms: BTreeMap<crate::types::VmId, VmConfig>,
    /// Admission control for operator power-ons.
    pub admission: AdmissionPolicy,
    /// Wanted heartbeat datastores per host (2..=5, default 2).
    pub heartbeat_datastores: usize,
    /// VM monitoring (H11) per VM; VMs not listed get `monitoring_default`.
    pub monitoring: BTreeMap<crate::types::VmId, MonitoringSettings>,
    /// The cluster's monitoring settings for VMs without their own
    /// (default: disabled, as vSphere's).
    #[serde(default)]
    pub monitoring_default: MonitoringSettings,
}

impl ClusterConfig {
    /// The monitoring settings that apply to `vm`: its own, or the
    /// cluster's default.
    pub fn monitoring_for(&self, vm: &crate::types::VmId) -> MonitoringSettings {
        self.monitoring
            .get(vm)
            .copied()
            .unwrap_or(self.monitoring_default)
    }
}

/// What one agent needs to start.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host.
    pub host: HostId,
    /// Isolation addresses (default gateway by default; at most 10 are used).
    pub isolation_addrs: Vec<String>,
    /// Timings.
    pub timings: Timings,
    /// The cluster secret for message authentication.
    pub secret: ClusterSecret,
    /// Grows across agent restarts; the high half of message sequence numbers.
    pub incarnation: u32,
}

/// The most isolation addresses used (vSphere's `das.isolationaddress1..10`).
pub const MAX_ISOLATION_ADDRS: usize = 10;

/// A configuration the agent cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A timing relation the failure detection relies on is broken.
    #[error("invalid HA timings: {0}")]
    Timings(String),
    /// The lease timings are unsafe or would stop healthy guests.
    #[error("invalid lease timings")]
    Lease(#[source] crate::lease::LeaseError),
    /// This host is not in the cluster.
    #[error("host {0} is not a member of the cluster configuration: add it or fix the host id")]
    NotAMember(HostId),
    /// A VM lives on a datastore no host mounts.
    #[error("VM {vm} is on datastore {datastore}, which no host of the cluster mounts")]
    UnknownDatastore {
        /// The VM.
        vm: crate::types::VmId,
        /// The datastore.
        datastore: DatastoreId,
    },
    /// Too many isolation addresses.
    #[error("{0} isolation addresses configured; at most {MAX_ISOLATION_ADDRS} are used")]
    TooManyIsolationAddrs(usize),
}

impl Timings {
    /// Checks the relations between timings that detection relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Timings(m.to_string()));
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must be > 0");
        }
        if self.host_timeout < self.heartbeat_interval * 2 {
            return bad("host_timeout must cover at least two heartbeat intervals");
        }
        if self.ds_liveness_timeout < self.ds_heartbeat_interval * 2 {
            return bad("ds_liveness_timeout must cover at least two datastore heartbeat writes");
        }
        if self.election_window < self.heartbeat_interval * 2 {
            return bad("election_window must cover at least two heartbeat intervals");
        }
        self.lease.validate().map_err(ConfigError::Lease)
    }
}

impl AgentConfig {
    /// Checks this agent's configuration against the cluster's.
    pub fn validate(&self, cluster: &ClusterConfig) -> Result<(), ConfigError> {
        self.timings.validate()?;
        if !cluster.hosts.contains_key(&self.host) {
            return Err(ConfigError::NotAMember(self.host.clone()));
        }
        if self.isolation_addrs.len() > MAX_ISOLATION_ADDRS {
            return Err(ConfigError::TooManyIsolationAddrs(
                self.isolation_addrs.len(),
            ));
        }
        for vm in cluster.vms.values() {
            for ds in &vm.datastores {
                if !cluster.hosts.values().any(|h| h.datastores.contains(ds)) {
                    return Err(ConfigError::UnknownDatastore {
                        vm: vm.id.clone(),
                        datastore: ds.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterConfig {
        let spec = HostSpec {
            mgmt_addr: "10.0.0.2".into(),
            capacity: Resources::new(1000, 1000),
            datastores: [DatastoreId::new("ds1")].into_iter().collect(),
        };
        ClusterConfig {
            hosts: [(HostId::new("a"), spec)].into_iter().collect(),
            vms: BTreeMap::new(),
            admission: AdmissionPolicy::Disabled,
            heartbeat_datastores: 2,
            monitoring: BTreeMap::new(),
            monitoring_default: MonitoringSettings::default(),
        }
    }

    fn agent(host: &str) -> AgentConfig {
        AgentConfig {
            host: HostId::new(host),
            isolation_addrs: vec!["10.0.0.1".into()],
            timings: Timings::default(),
            secret: ClusterSecret::new(b"k".to_vec()),
            incarnation: 1,
        }
    }

    #[test]
    fn defaults_validate() {
        agent("a").validate(&cluster()).unwrap();
    }

    #[test]
    fn bad_configs_say_what_to_fix() {
        assert_eq!(
            agent("b").validate(&cluster()),
            Err(ConfigError::NotAMember(HostId::new("b")))
        );
        let mut a = agent("a");
        a.timings.host_timeout = Duration::from_millis(1500);
        a.timings.heartbeat_interval = Duration::from_secs(1);
        assert!(matches!(
            a.validate(&cluster()),
            Err(ConfigError::Timings(_))
        ));
        let mut a = agent("a");
        a.timings.lease.takeover_time = Duration::from_secs(3);
        assert!(matches!(a.validate(&cluster()), Err(ConfigError::Lease(_))));
        let mut c = cluster();
        let vm = VmConfig::new("vm", Resources::default(), "ds9");
        c.vms.insert(vm.id.clone(), vm);
        let e = agent("a").validate(&c).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM vm is on datastore ds9, which no host of the cluster mounts"
        );
    }

    #[test]
    fn cluster_config_roundtrips_through_json() {
        let mut c = cluster();
        c.admission = AdmissionPolicy::PercentageReserved {
            cpu_pct: 25,
            mem_pct: 25,
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains("\"percentage_reserved\":{\"cpu_pct\":25"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<ClusterConfig>(&text).unwrap(), c);
        // The secret is never part of anything serialisable or printable.
        assert!(format!("{:?}", agent("a")).contains("[redacted]"));
    }
}
