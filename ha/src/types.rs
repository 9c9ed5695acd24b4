//! Plain data shared by every module: identifiers, resources, per-VM HA
//! settings and the states the CLI shows (H16).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// Builds the identifier from anything string-like.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A host's identifier. Ordered as a string ("host-99" > "host-100"),
    /// which is what the election tie-break uses (H2).
    HostId
);
string_id!(
    /// A VM's identifier, unique in the cluster.
    VmId
);
string_id!(
    /// A shared datastore's identifier (a directory mounted on several hosts).
    DatastoreId
);

/// CPU (MHz) and memory (MiB) amounts: host capacity or VM reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in MHz.
    pub cpu_mhz: u64,
    /// Memory in MiB.
    pub mem_mib: u64,
}

impl Resources {
    /// Builds an amount from MHz and MiB.
    pub const fn new(cpu_mhz: u64, mem_mib: u64) -> Self {
        Self { cpu_mhz, mem_mib }
    }

    /// True if `need` fits in `self` on both dimensions.
    pub fn fits(&self, need: &Resources) -> bool {
        need.cpu_mhz <= self.cpu_mhz && need.mem_mib <= self.mem_mib
    }

    /// `self - other`, floored at zero on each dimension.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources::new(
            self.cpu_mhz.saturating_sub(other.cpu_mhz),
            self.mem_mib.saturating_sub(other.mem_mib),
        )
    }

    /// `self + other`.
    pub fn add(&self, other: &Resources) -> Resources {
        Resources::new(self.cpu_mhz + other.cpu_mhz, self.mem_mib + other.mem_mib)
    }
}

/// Restart priority of a VM after a host failure (H8). Ordered: higher
/// priorities compare greater and are restarted first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RestartPriority {
    /// Never restarted by HA.
    Disabled,
    /// Restarted after medium and high.
    Low,
    /// The default.
    #[default]
    Medium,
    /// Restarted first.
    High,
}

/// What an isolated host does with a VM (H9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationResponse {
    /// Keep the VM running (the default): the master will not restart it.
    #[default]
    LeaveOn,
    /// Power the VM off at once, so the master can restart it elsewhere.
    PowerOff,
    /// Ask the guest to shut down, power off after the shutdown timeout.
    ShutDown,
}

/// What HA does with a VM whose host lost access to one of the VM's
/// datastores while other hosts still reach it (H13, vSphere's VM Component
/// Protection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatastoreLossResponse {
    /// Nothing beyond the lease: the guest waits for its storage (default).
    #[default]
    Disabled,
    /// Log an event after the delay; the VM stays where it is.
    EventsOnly,
    /// After the delay, stop the guest on the affected host and restart it
    /// on a host that reaches all of its datastores.
    Restart,
}

/// Datastore-loss protection settings of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatastoreLossSettings {
    /// The response (default: disabled).
    pub response: DatastoreLossResponse,
    /// How long the datastore has to come back before the response applies
    /// (default 180 s, vSphere's VM failover delay), in seconds in config
    /// files.
    #[serde(with = "secs")]
    pub delay: std::time::Duration,
}

impl Default for DatastoreLossSettings {
    fn default() -> Self {
        Self {
            response: DatastoreLossResponse::Disabled,
            delay: std::time::Duration::from_secs(180),
        }
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

/// A VM's HA-relevant configuration, as the master knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// The VM.
    pub id: VmId,
    /// CPU and memory reservation: placement and admission use these.
    pub reservation: Resources,
    /// Restart priority.
    pub priority: RestartPriority,
    /// Isolation response.
    pub isolation_response: IsolationResponse,
    /// Datastores holding the VM's disks: a restart target must mount all.
    pub datastores: BTreeSet<DatastoreId>,
    /// Datastore-loss protection (H13).
    #[serde(default)]
    pub datastore_loss: DatastoreLossSettings,
}

impl VmConfig {
    /// A VM with medium priority, leave-on isolation response, on one datastore.
    pub fn new(id: &str, reservation: Resources, datastore: &str) -> Self {
        Self {
            id: VmId::new(id),
            reservation,
            priority: RestartPriority::Medium,
            isolation_response: IsolationResponse::LeaveOn,
            datastores: [DatastoreId::new(datastore)].into_iter().collect(),
            datastore_loss: DatastoreLossSettings::default(),
        }
    }
}

/// A host's HA state, as shown by the CLI (H16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostHaState {
    /// HA is not enabled on this host.
    Uninitialized,
    /// Looking for a master or competing to be one.
    Election,
    /// The master of its partition.
    Master,
    /// A slave reporting to a master.
    Slave,
    /// Hears no agent and no isolation address answers.
    Isolated,
    /// Seen by a master as reachable by ping and datastore but not by agent
    /// traffic: it is in another network partition.
    Partitioned,
    /// Seen by a master as unreachable by agent traffic, ping and datastore.
    Failed,
    /// Answers ping but has no agent traffic and no datastore heartbeat.
    Unresponsive,
    /// Left HA for maintenance: no restarts are placed on it.
    Maintenance,
}

impl fmt::Display for HostHaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            HostHaState::Uninitialized => "uninitialized",
            HostHaState::Election => "election",
            HostHaState::Master => "master",
            HostHaState::Slave => "slave",
            HostHaState::Isolated => "isolated",
            HostHaState::Partitioned => "partitioned",
            HostHaState::Failed => "failed",
            HostHaState::Unresponsive => "unresponsive",
            HostHaState::Maintenance => "maintenance",
        };
        f.write_str(s)
    }
}

/// A VM's protection state, as the master reports it (H16).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmProtection {
    /// Powered off by the user, or HA disabled for it: HA does nothing.
    Unprotected,
    /// Running on a host the master monitors.
    Protected {
        /// Where it runs.
        host: HostId,
    },
    /// Its host failed or released it; a restart is queued.
    RestartPending {
        /// Why it has not been placed yet ("no host has 4096 MiB free"...).
        reason: String,
    },
    /// A restart order is out to `host`.
    Restarting {
        /// The target host.
        host: HostId,
    },
    /// Every retry failed; an operator must act.
    RestartFailed {
        /// The last failure.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn datastore_loss_settings_from_config_text() {
        let c: VmConfig = serde_json::from_str(
            r#"{"id": "vm-a", "reservation": {"cpu_mhz": 1000, "mem_mib": 512},
                "priority": "high", "isolation_response": "leave_on", "datastores": ["ds1"],
                "datastore_loss": {"response": "restart", "delay": 60}}"#,
        )
        .unwrap();
        assert_eq!(c.datastore_loss.response, DatastoreLossResponse::Restart);
        assert_eq!(c.datastore_loss.delay, Duration::from_secs(60));
        // Absent: disabled, 180 s.
        let c: VmConfig = serde_json::from_str(
            r#"{"id": "vm-a", "reservation": {"cpu_mhz": 0, "mem_mib": 0},
                "priority": "low", "isolation_response": "power_off", "datastores": []}"#,
        )
        .unwrap();
        assert_eq!(c.datastore_loss, DatastoreLossSettings::default());
        assert_eq!(c.datastore_loss.delay, Duration::from_secs(180));
        let e = serde_json::from_str::<DatastoreLossSettings>(r#"{"response": "migrate"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown variant `migrate`"), "{e}");
    }
}
