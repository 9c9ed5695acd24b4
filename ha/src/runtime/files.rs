//! The runtime's files: the host configuration (`host.toml`), the cluster
//! file on the datastores, and the datastore layout.
//!
//! ```text
//! DATASTORE/
//!   .vigil/cluster.json        the cluster (written by `vigil cluster init`)
//!   .vigil/hb/HOST.json        each host's datastore heartbeat (ha::agent::DsRecord)
//!   .vigil/protected.json      the master's protected-VM list
//!   vms/NAME/vm.toml           the VM's config (relative paths: from this directory)
//!   vms/NAME/ha.toml           its HA settings (priority, isolation response, reservation)
//!   vms/NAME/lease             its disk lease record (JSON, see vmm::lease)
//!   vms/NAME/lease.claim.G     created exclusively by the host acquiring generation G
//! ```
//!
//! Records are replaced atomically (a temporary file renamed over them), so
//! a reader sees the old record or the new one, never half of one.

use crate::config::{ClusterConfig, HostSpec, Timings};
use crate::types::{
    DatastoreId, HostId, IsolationResponse, Resources, RestartPriority, VmConfig, VmId,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Errors reading or writing the runtime's files.
#[derive(Debug, Error)]
pub enum FileError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file does not parse.
    #[error("invalid {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// No datastore of this host holds the cluster file.
    #[error("no cluster file (.vigil/cluster.json) on any datastore of this host ({0}): run `vigil cluster init` first, or check the datastores in host.toml")]
    NoCluster(String),
    /// A datastore name that host.toml does not define.
    #[error("datastore {0} is not mounted on this host (not in host.toml [datastores])")]
    UnknownDatastore(String),
    /// Bad value.
    #[error("{0}")]
    Invalid(String),
}

/// Timing overrides in host.toml (milliseconds); unset ones keep the defaults
/// of [`Timings`]. Tests shorten them; production keeps the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingOverrides {
    /// Network heartbeat period.
    pub heartbeat_interval_ms: Option<u64>,
    /// Peer silent this long is unreachable.
    pub host_timeout_ms: Option<u64>,
    /// Election window.
    pub election_window_ms: Option<u64>,
    /// Silence before the isolation check.
    pub isolation_detect_ms: Option<u64>,
    /// Ping timeout.
    pub ping_timeout_ms: Option<u64>,
    /// Datastore heartbeat period (write and poll).
    pub ds_heartbeat_interval_ms: Option<u64>,
    /// Datastore record unchanged this long is stale.
    pub ds_liveness_timeout_ms: Option<u64>,
    /// First restart retry delay.
    pub restart_retry_base_ms: Option<u64>,
    /// Shut-down isolation response timeout.
    pub shutdown_timeout_ms: Option<u64>,
    /// Lease renewal period.
    pub lease_renew_interval_ms: Option<u64>,
    /// Lease I/O timeout.
    pub lease_io_timeout_ms: Option<u64>,
    /// Lease kill time.
    pub lease_kill_time_ms: Option<u64>,
    /// Lease stop time.
    pub lease_stop_time_ms: Option<u64>,
    /// Lease takeover time.
    pub lease_takeover_time_ms: Option<u64>,
    /// What a VMM does when it cannot renew its lease in time: `"pause"`
    /// (default) or `"power-off"`.
    pub lease_on_loss: Option<crate::lease::LeaseLoss>,
    /// Health record interval (default: hourly).
    pub summary_interval_ms: Option<u64>,
}

impl TimingOverrides {
    /// The defaults with these overrides applied.
    pub fn apply(&self) -> Timings {
        let mut t = Timings::default();
        let ms = Duration::from_millis;
        macro_rules! set {
            ($($f:ident => $($dst:ident).+),* $(,)?) => {
                $(if let Some(v) = self.$f { t.$($dst).+ = ms(v); })*
            };
        }
        set!(
            heartbeat_interval_ms => heartbeat_interval,
            host_timeout_ms => host_timeout,
            election_window_ms => election_window,
            isolation_detect_ms => isolation_detect,
            ping_timeout_ms => ping_timeout,
            ds_heartbeat_interval_ms => ds_heartbeat_interval,
            ds_heartbeat_interval_ms => ds_poll_interval,
            ds_liveness_timeout_ms => ds_liveness_timeout,
            restart_retry_base_ms => restart_retry_base,
            shutdown_timeout_ms => shutdown_timeout,
            lease_renew_interval_ms => lease.renew_interval,
            lease_io_timeout_ms => lease.io_timeout,
            lease_kill_time_ms => lease.kill_time,
            lease_stop_time_ms => lease.stop_time,
            lease_takeover_time_ms => lease.takeover_time,
            summary_interval_ms => summary_interval,
        );
        if let Some(l) = self.lease_on_loss {
            t.lease.on_loss = l;
        }
        t
    }
}

/// `host.toml`: what one agent needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// This host's id (as in the cluster file).
    pub host: String,
    /// File holding the cluster secret (keep it root-only; never on the
    /// command line).
    pub secret_file: PathBuf,
    /// Where the agent keeps its VMMs' sockets, pid files and logs; VMMs
    /// outlive the agent and a restarted agent adopts them from here.
    pub run_dir: PathBuf,
    /// Datastore name -> mounted path.
    pub datastores: BTreeMap<String, PathBuf>,
    /// Isolation addresses (IPv4); default: the default gateway.
    #[serde(default)]
    pub isolation_addresses: Vec<String>,
    /// The `vigil` binary that runs VMMs (default: this executable).
    #[serde(default)]
    pub vigil: Option<PathBuf>,
    /// Timing overrides.
    #[serde(default)]
    pub timings: TimingOverrides,
}

impl HostConfig {
    /// Reads host.toml.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| FileError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The mounted path of a datastore.
    pub fn datastore(&self, ds: &str) -> Result<&Path, FileError> {
        self.datastores
            .get(ds)
            .map(PathBuf::as_path)
            .ok_or_else(|| FileError::UnknownDatastore(ds.to_string()))
    }

    /// Reads the cluster file from the first datastore (by name) holding one.
    pub fn cluster_file(&self) -> Result<ClusterFile, FileError> {
        for path in self.datastores.values() {
            let p = path.join(".vigil/cluster.json");
            if p.exists() {
                return ClusterFile::load(&p);
            }
        }
        Err(FileError::NoCluster(
            self.datastores
                .values()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }

    /// Reads the secret file.
    pub fn secret(&self) -> Result<Vec<u8>, FileError> {
        let bytes = std::fs::read(&self.secret_file).map_err(|source| FileError::Read {
            path: self.secret_file.clone(),
            source,
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let trimmed = text.trim();
        if trimmed.len() < 32 {
            return Err(FileError::Invalid(format!(
                "secret file {} holds fewer than 32 characters: recreate it with `vigil cluster init`",
                self.secret_file.display()
            )));
        }
        Ok(trimmed.as_bytes().to_vec())
    }
}

/// One host in the cluster file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterHost {
    /// Management address (IPv4): agents talk to it and the master pings it.
    pub address: String,
    /// Agent port (UDP heartbeats, TCP commands).
    pub port: u16,
    /// CPU available to VMs, MHz.
    pub cpu_mhz: u64,
    /// Memory available to VMs, MiB.
    pub mem_mib: u64,
    /// Datastores it mounts (names).
    pub datastores: BTreeSet<String>,
}

/// The cluster file (`cluster.toml` given to `vigil cluster init`, stored as
/// `.vigil/cluster.json` on the datastore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The members.
    pub hosts: BTreeMap<String, ClusterHost>,
    /// Wanted heartbeat datastores per host (2..=5).
    #[serde(default = "two")]
    pub heartbeat_datastores: usize,
    /// Admission control policy (default: disabled).
    #[serde(default)]
    pub admission: crate::admission::AdmissionPolicy,
    /// VM monitoring for VMs without their own settings (default: disabled).
    #[serde(default)]
    pub monitoring_default: crate::monitoring::MonitoringSettings,
    /// VM monitoring per VM name.
    #[serde(default)]
    pub monitoring: BTreeMap<String, crate::monitoring::MonitoringSettings>,
}

fn two() -> usize {
    2
}

impl ClusterFile {
    /// Reads a cluster file (JSON or, for `cluster init`'s input, TOML).
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parsed: Result<Self, String> = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        let c = parsed.map_err(|reason| FileError::Parse {
            path: path.to_path_buf(),
            reason,
        })?;
        c.check().map_err(|reason| FileError::Parse {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("no hosts".into());
        }
        if !(2..=5).contains(&self.heartbeat_datastores) {
            return Err("heartbeat_datastores must be between 2 and 5".into());
        }
        for (h, spec) in &self.hosts {
            if spec.address.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(format!(
                    "host {h}: address {:?} is not an IPv4 address",
                    spec.address
                ));
            }
        }
        Ok(())
    }

    /// The agent address of a host.
    pub fn agent_addr(&self, host: &str) -> Option<std::net::SocketAddr> {
        let h = self.hosts.get(host)?;
        format!("{}:{}", h.address, h.port).parse().ok()
    }

    /// The state machine's view, with these VMs.
    pub fn to_config(&self, vms: BTreeMap<VmId, VmConfig>) -> ClusterConfig {
        ClusterConfig {
            hosts: self
                .hosts
                .iter()
                .map(|(h, s)| {
                    (
                        HostId::new(h.as_str()),
                        HostSpec {
                            mgmt_addr: s.address.clone(),
                            capacity: Resources::new(s.cpu_mhz, s.mem_mib),
                            datastores: s
                                .datastores
                                .iter()
                                .map(|d| DatastoreId::new(d.as_str()))
                                .collect(),
                        },
                    )
                })
                .collect(),
            vms,
            admission: self.admission.clone(),
            heartbeat_datastores: self.heartbeat_datastores,
            monitoring: self
                .monitoring
                .iter()
                .map(|(vm, m)| (VmId::new(vm.as_str()), *m))
                .collect(),
            monitoring_default: self.monitoring_default,
        }
    }
}

/// `vms/NAME/ha.toml`: a registered VM's HA settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmHaSettings {
    /// Restart priority.
    #[serde(default)]
    pub priority: RestartPriority,
    /// Isolation response.
    #[serde(default)]
    pub isolation_response: IsolationResponse,
    /// CPU reservation, MHz.
    #[serde(default)]
    pub cpu_mhz: u64,
    /// Memory reservation, MiB.
    #[serde(default)]
    pub mem_mib: u64,
    /// Datastore-loss protection (default: disabled).
    #[serde(default)]
    pub datastore_loss: crate::types::DatastoreLossSettings,
}

impl VmHaSettings {
    /// These settings with the given ones replaced (`None`: kept).
    pub fn changed(
        &self,
        cpu_mhz: Option<u64>,
        mem_mib: Option<u64>,
        priority: Option<RestartPriority>,
    ) -> Self {
        Self {
            cpu_mhz: cpu_mhz.unwrap_or(self.cpu_mhz),
            mem_mib: mem_mib.unwrap_or(self.mem_mib),
            priority: priority.unwrap_or(self.priority),
            ..self.clone()
        }
    }

    /// What changes from `self` to `new`, for the operator:
    /// `reservation 2000 MHz / 128 MiB -> 3000 MHz / 128 MiB` and/or
    /// `priority medium -> high`; `unchanged` if nothing does.
    pub fn describe_change(&self, new: &Self) -> String {
        let mut parts = Vec::new();
        if (self.cpu_mhz, self.mem_mib) != (new.cpu_mhz, new.mem_mib) {
            parts.push(format!(
                "reservation {} MHz / {} MiB -> {} MHz / {} MiB",
                self.cpu_mhz, self.mem_mib, new.cpu_mhz, new.mem_mib
            ));
        }
        if self.priority != new.priority {
            let name = |p: RestartPriority| {
                serde_json::to_value(p)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            };
            parts.push(format!(
                "priority {} -> {}",
                name(self.priority),
                name(new.priority)
            ));
        }
        if parts.is_empty() {
            "unchanged".into()
        } else {
            parts.join(", ")
        }
    }

    /// Reads a VM's `ha.toml`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes a VM's `ha.toml` atomically (a reader sees the old settings
    /// or the new ones, never a mix).
    pub fn store(&self, path: &Path) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        vmm::lease::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The datastore id file live migration's pre-checks read to tell that a
/// disk is the same file on both hosts (`migration::precheck`, which owns
/// the format: one UUID line at the datastore's root).
pub const DATASTORE_ID_FILE: &str = ".vigil-datastore";

/// Gives the datastore at `ds_path` its id file if it has none: a random
/// id, created exclusively, so that hosts mounting it at once agree on the
/// first one written. Returns the id.
pub fn ensure_datastore_id(ds_path: &Path) -> std::io::Result<String> {
    use std::io::Write as _;
    let p = ds_path.join(DATASTORE_ID_FILE);
    if let Ok(id) = std::fs::read_to_string(&p) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_string());
        }
    }
    let hex = super::control::random_hex(16)?;
    let id = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
    {
        Ok(mut f) => {
            f.write_all(format!("{id}\n").as_bytes())?;
            f.sync_all()?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another host won; its id may still be on its way to the disk.
            for _ in 0..50 {
                let got = std::fs::read_to_string(&p)?;
                if !got.trim().is_empty() {
                    return Ok(got.trim().to_string());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::io::Error::other(format!(
                "{} stays empty",
                p.display()
            )))
        }
        Err(e) => Err(e),
    }
}

/// The directory of a VM on its datastore.
pub fn vm_dir(ds_path: &Path, vm: &str) -> PathBuf {
    ds_path.join("vms").join(vm)
}

/// Every VM registered on the datastores of `host`, as the state machine
/// wants them. Unreadable entries are skipped with a warning.
pub fn registered_vms(host: &HostConfig) -> BTreeMap<VmId, VmConfig> {
    let mut out = BTreeMap::new();
    for (ds, path) in &host.datastores {
        let Ok(entries) = std::fs::read_dir(path.join("vms")) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path().join("ha.toml");
            let settings: VmHaSettings = match std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| toml::from_str(&t).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(error) => {
                    tracing::debug!(file = %p.display(), %error, "skipping VM entry");
                    continue;
                }
            };
            out.insert(
                VmId::new(name.as_str()),
                VmConfig {
                    id: VmId::new(name.as_str()),
                    reservation: Resources::new(settings.cpu_mhz, settings.mem_mib),
                    priority: settings.priority,
                    isolation_response: settings.isolation_response,
                    datastores: [DatastoreId::new(ds.as_str())].into_iter().collect(),
                    datastore_loss: settings.datastore_loss,
                },
            );
        }
    }
    out
}

/// Writes `value` as JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| FileError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| FileError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    vmm::lease::write_atomic(path, &bytes).map_err(|reason| FileError::Write {
        path: path.to_path_buf(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_file_parses_and_checks() {
        let d = std::env::temp_dir().join(format!("vha-files-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("cluster.toml");
        std::fs::write(
            &p,
            "[hosts.host-a]\naddress = \"198.19.77.2\"\nport = 47300\ncpu_mhz = 4000\nmem_mib = 4096\ndatastores = [\"ds1\", \"ds2\"]\n",
        )
        .unwrap();
        let c = ClusterFile::load(&p).unwrap();
        assert_eq!(c.heartbeat_datastores, 2);
        assert_eq!(
            c.agent_addr("host-a").unwrap().to_string(),
            "198.19.77.2:47300"
        );
        let cfg = c.to_config(BTreeMap::new());
        assert_eq!(cfg.hosts[&HostId::new("host-a")].datastores.len(), 2);
        std::fs::write(
            &p,
            "[hosts.host-a]\naddress = \"nowhere\"\nport = 1\ncpu_mhz = 1\nmem_mib = 1\ndatastores = []\n",
        )
        .unwrap();
        let e = ClusterFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("is not an IPv4 address"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn timing_overrides_apply() {
        let o = TimingOverrides {
            heartbeat_interval_ms: Some(100),
            lease_takeover_time_ms: Some(4000),
            ..Default::default()
        };
        let t = o.apply();
        assert_eq!(t.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(t.lease.takeover_time, Duration::from_secs(4));
        assert_eq!(t.host_timeout, Timings::default().host_timeout);
    }

    #[test]
    fn ha_settings_change_only_what_is_given_and_round_trip_atomically() {
        let old = VmHaSettings {
            priority: RestartPriority::Medium,
            isolation_response: IsolationResponse::PowerOff,
            cpu_mhz: 2000,
            mem_mib: 128,
            datastore_loss: Default::default(),
        };
        assert_eq!(old.changed(None, None, None), old);
        assert_eq!(old.describe_change(&old), "unchanged");
        let new = old.changed(Some(3000), None, Some(RestartPriority::High));
        assert_eq!((new.cpu_mhz, new.mem_mib), (3000, 128));
        assert_eq!(new.priority, RestartPriority::High);
        assert_eq!(new.isolation_response, IsolationResponse::PowerOff);
        assert_eq!(
            old.describe_change(&new),
            "reservation 2000 MHz / 128 MiB -> 3000 MHz / 128 MiB, priority medium -> high"
        );
        let dir = std::env::temp_dir().join(format!("vigil-ha-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ha.toml");
        new.store(&p).unwrap();
        assert_eq!(VmHaSettings::load(&p).unwrap(), new);
        let e = VmHaSettings::load(&dir.join("missing.toml")).unwrap_err();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn datastore_id_is_written_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("vigil-dsid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = ensure_datastore_id(&dir).unwrap();
        assert_eq!(a.len(), 36, "{a}");
        assert_eq!(ensure_datastore_id(&dir).unwrap(), a);
        let on_disk = std::fs::read_to_string(dir.join(DATASTORE_ID_FILE)).unwrap();
        assert_eq!(on_disk.trim(), a);
        // One written by someone else is kept as it is.
        std::fs::write(dir.join(DATASTORE_ID_FILE), "given-id\n").unwrap();
        assert_eq!(ensure_datastore_id(&dir).unwrap(), "given-id");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
