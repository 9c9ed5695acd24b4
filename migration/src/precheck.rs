//! Pre-checks: can this VM run on that host? Pure functions over two sets of
//! facts, run on the target before any state moves (M5). Each failure names
//! the check, the value on each side and what to do.
//!
//! # Disk identity: datastore UUID + relative path
//!
//! A disk is "the same file" on both hosts when it lives on the same shared
//! datastore at the same path inside it. Each datastore root holds a file
//! [`DATASTORE_ID_FILE`] with a UUID written once when the datastore is
//! created; a disk's identity is that UUID plus the path relative to the
//! root. Device + inode was rejected: `st_dev` of an NFS or cluster-FS mount
//! is a number the client assigns per mount, so it differs between hosts for
//! the very same file, and a local copy on each host would pass a
//! path-only check while silently diverging. The UUID file is on the shared
//! storage itself, so a host that mounted a different export at the same
//! path sees a different UUID ("NFS storage path UUID mismatch", the 78%
//! vMotion failure).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The file at a datastore root that holds its UUID.
pub const DATASTORE_ID_FILE: &str = ".vigil-datastore";

/// Where a disk lives, comparable across hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// UUID read from the datastore's [`DATASTORE_ID_FILE`].
    pub datastore: String,
    /// Path inside the datastore.
    pub relative: PathBuf,
}

/// A disk the VM uses, as the source sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Path on the source (and, on shared storage, on the target).
    pub path: PathBuf,
    /// Identity on the source; `None` if not on a datastore.
    pub identity: Option<DiskIdentity>,
}

/// What the source knows about the VM; sent in the `Precheck` message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VmFacts {
    /// VM name, for messages.
    pub name: String,
    /// CPU template name (`baseline`, `host`).
    pub cpu_template: String,
    /// CPU feature names the guest was started with (from its CPUID).
    pub cpu_features: BTreeSet<String>,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Network names the NICs attach to.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Devices only one host has (passthrough, a local serial port...).
    #[serde(default)]
    pub host_local_devices: Vec<String>,
}

/// What the target host offers, gathered for one VM's facts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// Host name.
    pub host: String,
    /// CPU features this host can give a guest.
    pub cpu_features: BTreeSet<String>,
    /// Memory that can be reserved for a new VM, MiB.
    pub reservable_mib: u64,
    /// Identity of each of the VM's disk paths on this host (`Err`: why it
    /// could not be read).
    pub disks: Vec<(PathBuf, Result<DiskIdentity, String>)>,
    /// Networks defined on this host.
    pub networks: BTreeSet<String>,
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Check name (`cpu`, `memory`, `disk`, `network`, `device`, `version`).
    pub check: String,
    /// Value on the source.
    pub source: String,
    /// Value on the target.
    pub target: String,
    /// What to do.
    pub remedy: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: source {}, target {}: {}",
            self.check, self.source, self.target, self.remedy
        )
    }
}

/// Errors reading a disk's identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No datastore id file above the path.
    #[error("{path} is not on a datastore (no {DATASTORE_ID_FILE} in any parent directory)")]
    NoDatastore {
        /// The disk.
        path: PathBuf,
    },
    /// The path could not be resolved.
    #[error("cannot resolve {path}")]
    Resolve {
        /// The disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the identity of `path`: the nearest parent holding
/// [`DATASTORE_ID_FILE`] gives the UUID, the rest is the relative path.
pub fn disk_identity(path: &Path) -> Result<DiskIdentity, IdentityError> {
    let real = path
        .canonicalize()
        .map_err(|source| IdentityError::Resolve {
            path: path.to_path_buf(),
            source,
        })?;
    for dir in real.ancestors().skip(1) {
        if let Ok(id) = std::fs::read_to_string(dir.join(DATASTORE_ID_FILE)) {
            let relative = real.strip_prefix(dir).unwrap_or(&real).to_path_buf();
            return Ok(DiskIdentity {
                datastore: id.trim().to_string(),
                relative,
            });
        }
    }
    Err(IdentityError::NoDatastore {
        path: path.to_path_buf(),
    })
}

/// Gathers a target's facts for one VM: looks up each of its disks here.
pub fn host_facts_for(
    host: &str,
    cpu_features: BTreeSet<String>,
    reservable_mib: u64,
    networks: BTreeSet<String>,
    vm: &VmFacts,
) -> HostFacts {
    let disks = vm
        .disks
        .iter()
        .map(|d| {
            (
                d.path.clone(),
                disk_identity(&d.path).map_err(|e| e.to_string()),
            )
        })
        .collect();
    HostFacts {
        host: host.to_string(),
        cpu_features,
        reservable_mib,
        disks,
        networks,
    }
}

fn fail(
    check: &str,
    source: impl Into<String>,
    target: impl Into<String>,
    remedy: impl Into<String>,
) -> Failure {
    Failure {
        check: check.into(),
        source: source.into(),
        target: target.into(),
        remedy: remedy.into(),
    }
}

/// The target's CPU features cover the guest's.
pub fn check_cpu(vm: &VmFacts, host: &HostFacts) -> Option<Failure> {
    let missing: Vec<&str> = vm
        .cpu_features
        .difference(&host.cpu_features)
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(fail(
        "cpu",
        format!("template {} uses {}", vm.cpu_template, missing.join(",")),
        format!("{} lacks {}", host.host, missing.join(",")),
        "start the VM with the `baseline` CPU template (power cycle), or choose a host with these features",
    ))
}

/// The target can reserve the guest's memory.
pub fn check_memory(vm: &VmFacts, host: &HostFacts) -> Option<Failure> {
    (vm.memory_mib > host.reservable_mib).then(|| {
        fail(
            "memory",
            format!("{} MiB", vm.memory_mib),
            format!("{} MiB reservable on {}", host.reservable_mib, host.host),
            "free memory on the target (move or stop VMs) or choose another host",
        )
    })
}

/// Every disk is the same file on the target.
pub fn check_disks(vm: &VmFacts, host: &HostFacts) -> Vec<Failure> {
    let mut out = Vec::new();
    for d in &vm.disks {
        let path = d.path.display().to_string();
        let Some(src) = &d.identity else {
            out.push(fail(
                "disk",
                format!("{path} is on no datastore"),
                "-",
                "move the disk to a shared datastore (storage migration) first",
            ));
            continue;
        };
        let theirs = host
            .disks
            .iter()
            .find(|(p, _)| p == &d.path)
            .map(|(_, r)| r);
        match theirs {
            None | Some(Err(_)) => out.push(fail(
                "disk",
                format!("{path} on datastore {}", src.datastore),
                match theirs {
                    Some(Err(e)) => e.clone(),
                    _ => format!("{path} not looked up on {}", host.host),
                },
                format!(
                    "mount datastore {} on {} at the same path",
                    src.datastore, host.host
                ),
            )),
            Some(Ok(t)) if t != src => out.push(fail(
                "disk",
                format!("{path} = {}:{}", src.datastore, src.relative.display()),
                format!("{path} = {}:{}", t.datastore, t.relative.display()),
                format!(
                    "{} has a different datastore mounted at this path: mount datastore {} there",
                    host.host, src.datastore
                ),
            )),
            Some(Ok(_)) => {}
        }
    }
    out
}

/// Every network the NICs use exists on the target (case-sensitive).
pub fn check_networks(vm: &VmFacts, host: &HostFacts) -> Vec<Failure> {
    vm.networks
        .iter()
        .filter(|n| !host.networks.contains(*n))
        .map(|n| {
            let near = host.networks.iter().find(|h| h.eq_ignore_ascii_case(n));
            fail(
                "network",
                format!("NIC on network {n:?}"),
                match near {
                    Some(h) => format!("{} has {h:?} (names are case-sensitive)", host.host),
                    None => format!("{} has no network {n:?}", host.host),
                },
                format!("create network {n:?} on {}", host.host),
            )
        })
        .collect()
}

/// No device that only the source host has.
pub fn check_devices(vm: &VmFacts, host: &HostFacts) -> Vec<Failure> {
    vm.host_local_devices
        .iter()
        .map(|d| {
            fail(
                "device",
                format!("host-local device {d}"),
                format!("{} cannot provide it", host.host),
                format!("detach {d} from the VM before migrating"),
            )
        })
        .collect()
}

/// All checks; empty means the VM can move.
pub fn check_all(vm: &VmFacts, host: &HostFacts) -> Vec<Failure> {
    let mut out = Vec::new();
    out.extend(check_cpu(vm, host));
    out.extend(check_memory(vm, host));
    out.extend(check_disks(vm, host));
    out.extend(check_networks(vm, host));
    out.extend(check_devices(vm, host));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn id(ds: &str, rel: &str) -> DiskIdentity {
        DiskIdentity {
            datastore: ds.into(),
            relative: rel.into(),
        }
    }

    fn vm() -> VmFacts {
        VmFacts {
            name: "web1".into(),
            cpu_template: "baseline".into(),
            cpu_features: set(&["sse2", "avx2"]),
            memory_mib: 1024,
            vcpus: 2,
            disks: vec![Disk {
                path: "/srv/ds1/web1.img".into(),
                identity: Some(id("uuid-1", "web1.img")),
            }],
            networks: vec!["Prod".into()],
            host_local_devices: vec![],
        }
    }

    fn host() -> HostFacts {
        HostFacts {
            host: "host-b".into(),
            cpu_features: set(&["sse2", "avx2", "avx512f"]),
            reservable_mib: 4096,
            disks: vec![("/srv/ds1/web1.img".into(), Ok(id("uuid-1", "web1.img")))],
            networks: set(&["Prod"]),
        }
    }

    #[test]
    fn compatible_host_passes() {
        assert!(check_all(&vm(), &host()).is_empty());
    }

    #[test]
    fn each_check_names_both_sides() {
        let mut h = host();
        h.cpu_features = set(&["sse2"]);
        h.reservable_mib = 512;
        h.disks = vec![("/srv/ds1/web1.img".into(), Ok(id("uuid-2", "web1.img")))];
        h.networks = set(&["prod"]);
        let mut v = vm();
        v.host_local_devices = vec!["/dev/ttyS1".into()];
        let f = check_all(&v, &h);
        let checks: Vec<&str> = f.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(checks, ["cpu", "memory", "disk", "network", "device"]);
        assert!(f[0].target.contains("avx2"), "{}", f[0]);
        assert!(f[1].target.contains("512 MiB"), "{}", f[1]);
        assert!(
            f[2].source.contains("uuid-1") && f[2].target.contains("uuid-2"),
            "{}",
            f[2]
        );
        assert!(f[3].target.contains("case-sensitive"), "{}", f[3]);
        assert!(f[4].remedy.contains("detach /dev/ttyS1"), "{}", f[4]);
    }

    #[test]
    fn disk_missing_on_target_says_mount() {
        let mut h = host();
        h.disks = vec![("/srv/ds1/web1.img".into(), Err("no such file".into()))];
        let f = check_disks(&vm(), &h);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].remedy.contains("mount datastore uuid-1 on host-b"),
            "{}",
            f[0]
        );
    }

    #[test]
    fn identity_from_datastore_file() {
        let dir = std::env::temp_dir().join(format!("vigil-precheck-{}", std::process::id()));
        let sub = dir.join("vms");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(dir.join(DATASTORE_ID_FILE), "abc-123\n").unwrap();
        std::fs::write(sub.join("d.img"), b"x").unwrap();
        let got = disk_identity(&sub.join("d.img")).unwrap();
        assert_eq!(got, id("abc-123", "vms/d.img"));
        std::fs::remove_file(dir.join(DATASTORE_ID_FILE)).unwrap();
        assert!(matches!(
            disk_identity(&sub.join("d.img")),
            Err(IdentityError::NoDatastore { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
