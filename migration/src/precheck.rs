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
//!
//! # Memory and `--priority`
//!
//! The target's reservable figure is the smaller of `MemAvailable` and the
//! room left under the memory cgroup limits of the target process
//! (`machine::reserve`). What must fit depends on the migration's
//! [`Priority`]:
//!
//! - `standard` (default): the memory the guest uses now on the source
//!   ([`VmFacts::resident_mib`], the pages that will actually be written
//!   on the target; the rest of guest memory is allocated as the guest
//!   touches it, as it was on the source). Nothing is reserved ahead: the
//!   migration proceeds, and on a host short of memory may be slow or fail
//!   (the VM then stays on the source).
//! - `high`: all of guest memory plus [`MIGRATION_BUFFER_MIB`] for the
//!   stream's buffers; the target commits (faults in) all of guest memory
//!   before it answers the pre-checks, and the source checks that it has
//!   room for its own buffers before it connects. Either side short of
//!   memory refuses; nothing moves.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Memory a migration's stream needs on each side beyond guest memory,
/// MiB: two frames of the protocol's largest payload (one being read or
/// built, one decoded or being sent).
pub const MIGRATION_BUFFER_MIB: u64 = 2 * (crate::protocol::MAX_PAYLOAD as u64 >> 20);

/// How hard a migration holds on to resources (FEATURES.md M6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Check that the memory in use fits, reserve nothing, proceed.
    #[default]
    Standard,
    /// Reserve all of guest memory and the buffers on both sides first;
    /// refuse if either cannot.
    High,
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Priority::Standard => "standard",
            Priority::High => "high",
        })
    }
}

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
    /// Set when the disk is a device node of the source host (a raw block
    /// device): then it is a host-local device (listed in
    /// [`VmFacts::host_local_devices`]) and not a datastore file.
    #[serde(default)]
    pub host_device: bool,
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
    /// Guest memory in use on the source (resident pages), MiB; `None` when
    /// the source cannot tell (it has swap), which counts as all of it.
    #[serde(default)]
    pub resident_mib: Option<u64>,
    /// The migration's priority.
    #[serde(default)]
    pub priority: Priority,
    /// vCPUs.
    pub vcpus: u32,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Network names the NICs attach to.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Devices only the source host has: disks that are the host's block
    /// devices (`disk /dev/sdb (block device 8:16)`).
    #[serde(default)]
    pub host_local_devices: Vec<String>,
    /// The HA disk lease the VM holds on the source (`vigil run --lease`).
    #[serde(default)]
    pub lease: Option<LeaseFacts>,
}

/// An HA disk lease record as one side sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaseFacts {
    /// The record's path.
    pub file: PathBuf,
    /// The generation held (source) or 0 (a target's handoff spec).
    pub generation: u64,
    /// Canonical path of the record's directory on this side, if it
    /// resolves.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Device and inode of that directory on this side.
    #[serde(default)]
    pub dir_id: Option<(u64, u64)>,
}

impl LeaseFacts {
    /// The facts of record `file` at `generation`, as seen from this host.
    pub fn of(file: &Path, generation: u64) -> Self {
        use std::os::unix::fs::MetadataExt;
        let parent = file.parent().unwrap_or(Path::new("."));
        LeaseFacts {
            file: file.to_path_buf(),
            generation,
            dir: parent.canonicalize().ok(),
            dir_id: std::fs::metadata(parent).ok().map(|m| (m.dev(), m.ino())),
        }
    }

    /// Whether `other` names the same record: the same file name in the
    /// same directory (canonical path, or device and inode).
    pub fn same_record(&self, other: &LeaseFacts) -> bool {
        self.file.file_name() == other.file.file_name()
            && (self.dir.is_some() && self.dir == other.dir
                || self.dir_id.is_some() && self.dir_id == other.dir_id)
    }
}

/// The lease a target was started with (`vigil run --incoming --lease`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostLease {
    /// The record, as the target sees it.
    pub record: LeaseFacts,
    /// `handoff = true`: take over the source's lease at switchover.
    /// `false`: the target holds a lease of its own (acquired by the agent
    /// for a VM coming from a source without one).
    pub handoff: bool,
}

/// What the target host offers, gathered for one VM's facts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// Host name.
    pub host: String,
    /// CPU features this host can give a guest.
    pub cpu_features: BTreeSet<String>,
    /// Why the CPU features are fewer than KVM offers (`--cpu-limit
    /// baseline`), for messages.
    pub cpu_limit: Option<String>,
    /// Memory that can be reserved for a new VM, MiB.
    pub reservable_mib: u64,
    /// Where [`HostFacts::reservable_mib`] comes from, for messages.
    pub memory_detail: String,
    /// With `high` priority: whether the target committed guest memory
    /// (`Err`: why not). `None`: nothing was committed (standard, or the
    /// figure already said no).
    pub committed: Option<Result<(), String>>,
    /// Identity of each of the VM's disk paths on this host (`Err`: why it
    /// could not be read).
    pub disks: Vec<(PathBuf, Result<DiskIdentity, String>)>,
    /// Networks defined on this host.
    pub networks: BTreeSet<String>,
    /// The lease spec the target runs with, if any.
    pub lease: Option<HostLease>,
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
        if self.check == "lease" {
            // Whole sentences on each side (see `check_lease`).
            return write!(f, "{}; {}: {}", self.source, self.target, self.remedy);
        }
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
        ..Default::default()
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
    let named: Vec<String> = missing
        .iter()
        .map(|k| match crate::machine::cpuid_names::name(k) {
            Some(n) => format!("{n} ({k})"),
            None => k.to_string(),
        })
        .collect();
    let named = named.join(", ");
    let target = match &host.cpu_limit {
        Some(l) => format!("{} ({l}) lacks {named}", host.host),
        None => format!("{} lacks {named}", host.host),
    };
    Some(fail(
        "cpu",
        format!("template {} uses {named}", vm.cpu_template),
        target,
        "start the VM with the `baseline` CPU template (power cycle), or choose a host with these features",
    ))
}

/// What the target must be able to reserve for `vm`, MiB, and how that
/// figure is made up (for messages).
pub fn memory_needed(vm: &VmFacts) -> (u64, String) {
    match vm.priority {
        Priority::High => (
            vm.memory_mib + MIGRATION_BUFFER_MIB,
            format!(
                "priority high needs all {} MiB of guest memory + {MIGRATION_BUFFER_MIB} MiB \
                 of migration buffers = {} MiB",
                vm.memory_mib,
                vm.memory_mib + MIGRATION_BUFFER_MIB
            ),
        ),
        Priority::Standard => match vm.resident_mib {
            Some(r) => {
                let r = r.min(vm.memory_mib);
                (
                    r,
                    format!(
                        "priority standard needs the {r} MiB in use of {} MiB guest memory",
                        vm.memory_mib
                    ),
                )
            }
            None => (
                vm.memory_mib,
                format!(
                    "priority standard needs all {} MiB of guest memory (in-use figure unknown)",
                    vm.memory_mib
                ),
            ),
        },
    }
}

/// The target can reserve the guest's memory (what counts depends on the
/// priority, see the module docs), and with `high` it did.
pub fn check_memory(vm: &VmFacts, host: &HostFacts) -> Option<Failure> {
    let (need, why) = memory_needed(vm);
    let remedy = |extra: &str| {
        format!(
            "free memory on {} (move or stop VMs, or raise its memory limit) or choose another \
             host{extra}",
            host.host
        )
    };
    let high_hint = if vm.priority == Priority::High {
        format!(
            ", or migrate with --priority standard (it needs only the memory in use{})",
            vm.resident_mib
                .map(|r| format!(", {} MiB", r.min(vm.memory_mib)))
                .unwrap_or_default()
        )
    } else {
        String::new()
    };
    if need > host.reservable_mib {
        return Some(fail(
            "memory",
            format!("VM {}: {why}", vm.name),
            format!(
                "{} MiB reservable on {} ({})",
                host.reservable_mib, host.host, host.memory_detail
            ),
            remedy(&high_hint),
        ));
    }
    match &host.committed {
        Some(Err(e)) => Some(fail(
            "memory",
            format!("VM {}: {why}", vm.name),
            format!(
                "{} could not commit {} MiB of guest memory: {e} ({} MiB reservable: {})",
                host.host, vm.memory_mib, host.reservable_mib, host.memory_detail
            ),
            remedy(&high_hint),
        )),
        _ => None,
    }
}

/// The source has room for its side of a `high` priority migration (its
/// stream buffers); `reservable_mib`/`detail` are the source's figure.
pub fn check_source_memory(
    vm: &VmFacts,
    source_host: &str,
    reservable_mib: u64,
    detail: &str,
) -> Option<Failure> {
    (vm.priority == Priority::High && MIGRATION_BUFFER_MIB > reservable_mib).then(|| {
        fail(
            "memory",
            format!(
                "{source_host} has {reservable_mib} MiB reservable ({detail}); priority high \
                 needs {MIGRATION_BUFFER_MIB} MiB of migration buffers here"
            ),
            "not asked (the source refuses before connecting)",
            format!(
                "free memory on {source_host} (or raise its memory limit), or migrate with \
                 --priority standard"
            ),
        )
    })
}

/// Every disk is the same file on the target.
pub fn check_disks(vm: &VmFacts, host: &HostFacts) -> Vec<Failure> {
    let mut out = Vec::new();
    // Device-node disks are the device check's (host-local devices).
    for d in vm.disks.iter().filter(|d| !d.host_device) {
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
                format!(
                    "{} cannot provide it (a device node names a different device on each host)",
                    host.host
                ),
                format!(
                    "detach {d} from the VM (or copy its data to a disk image on a shared \
                     datastore) before migrating"
                ),
            )
        })
        .collect()
}

/// The refusal of a VM with an HA disk lease by a target that cannot take
/// it over (no handoff lease spec, or a build without lease handoff).
pub fn lease_refusal(vm: &VmFacts, lease: &LeaseFacts, host: &str) -> Failure {
    fail(
        "lease",
        format!(
            "the VM holds an HA disk lease ({}, generation {})",
            lease.file.display(),
            lease.generation
        ),
        "the target has none",
        format!(
            "migrate HA-protected VMs with `vigil vm migrate {} --host {host}`, or start the \
             target with --lease and handoff = true",
            vm.name
        ),
    )
}

/// The lease moves with the VM only between a source that holds one and a
/// target started to take it over, on the same record.
pub fn check_lease(vm: &VmFacts, host: &HostFacts) -> Option<Failure> {
    let target = host.lease.as_ref().filter(|l| l.handoff);
    match (&vm.lease, target) {
        (None, None) => None,
        (Some(l), None) => Some(lease_refusal(vm, l, &host.host)),
        (None, Some(t)) => Some(fail(
            "lease",
            "the VM holds no HA disk lease",
            format!(
                "the target {} was started to take over a lease ({}, handoff = true)",
                host.host,
                t.record.file.display()
            ),
            "start the target without --lease (or with a lease acquired for it, handoff = false)",
        )),
        (Some(l), Some(t)) if !l.same_record(&t.record) => Some(fail(
            "lease",
            format!(
                "the VM's HA disk lease is {} on the source ({})",
                l.file.display(),
                l.dir
                    .as_ref()
                    .map_or("directory unresolved".into(), |d| format!(
                        "in {}",
                        d.display()
                    ))
            ),
            format!(
                "the target's handoff lease spec names {} ({})",
                t.record.file.display(),
                t.record
                    .dir
                    .as_ref()
                    .map_or("directory not found there".into(), |d| format!(
                        "in {}",
                        d.display()
                    ))
            ),
            "both must name the same lease record on the VM's shared datastore",
        )),
        (Some(_), Some(_)) => None,
    }
}

/// All checks; empty means the VM can move.
pub fn check_all(vm: &VmFacts, host: &HostFacts) -> Vec<Failure> {
    let mut out = Vec::new();
    out.extend(check_cpu(vm, host));
    out.extend(check_memory(vm, host));
    out.extend(check_disks(vm, host));
    out.extend(check_networks(vm, host));
    out.extend(check_devices(vm, host));
    out.extend(check_lease(vm, host));
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
                host_device: false,
            }],
            networks: vec!["Prod".into()],
            host_local_devices: vec![],
            ..Default::default()
        }
    }

    fn host() -> HostFacts {
        HostFacts {
            host: "host-b".into(),
            cpu_features: set(&["sse2", "avx2", "avx512f"]),
            reservable_mib: 4096,
            disks: vec![("/srv/ds1/web1.img".into(), Ok(id("uuid-1", "web1.img")))],
            networks: set(&["Prod"]),
            memory_detail: "MemAvailable 4096 MiB".into(),
            ..Default::default()
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
    fn standard_needs_what_is_in_use_high_needs_all_and_buffers() {
        let mut v = vm();
        v.resident_mib = Some(300);
        let mut h = host();
        h.reservable_mib = 512;
        assert_eq!(
            check_memory(&v, &h),
            None,
            "standard: 300 MiB in use fits 512"
        );
        v.priority = Priority::High;
        let f = check_memory(&v, &h).expect("high: 1024 + buffers does not fit 512");
        let need = 1024 + MIGRATION_BUFFER_MIB;
        assert!(f.source.contains(&format!("= {need} MiB")), "{f}");
        assert!(
            f.target
                .contains("512 MiB reservable on host-b (MemAvailable"),
            "{f}"
        );
        assert!(f.remedy.contains("--priority standard"), "{f}");
        assert!(f.remedy.contains("300 MiB"), "{f}");
        // Standard without an in-use figure (a source with swap) needs all.
        v.priority = Priority::Standard;
        v.resident_mib = None;
        let f = check_memory(&v, &h).expect("1024 MiB does not fit 512");
        assert!(f.source.contains("all 1024 MiB"), "{f}");
        assert!(!f.remedy.contains("--priority"), "{f}");
    }

    #[test]
    fn high_fails_when_the_target_could_not_commit() {
        let mut v = vm();
        v.priority = Priority::High;
        let mut h = host();
        h.committed = Some(Ok(()));
        assert_eq!(check_memory(&v, &h), None);
        h.committed = Some(Err("Cannot allocate memory".into()));
        let f = check_memory(&v, &h).unwrap();
        assert!(f.target.contains("could not commit 1024 MiB"), "{f}");
        assert!(f.target.contains("Cannot allocate memory"), "{f}");
    }

    #[test]
    fn source_checks_its_buffers_only_with_high() {
        let mut v = vm();
        assert_eq!(
            check_source_memory(&v, "host-a", 1, "MemAvailable 1 MiB"),
            None
        );
        v.priority = Priority::High;
        let f = check_source_memory(&v, "host-a", 1, "MemAvailable 1 MiB").unwrap();
        assert_eq!(f.check, "memory");
        assert!(
            f.source
                .contains("host-a has 1 MiB reservable (MemAvailable 1 MiB)")
                && f.source.contains(&format!("{MIGRATION_BUFFER_MIB} MiB")),
            "{f}"
        );
        assert_eq!(
            check_source_memory(&v, "host-a", MIGRATION_BUFFER_MIB, "x"),
            None
        );
    }

    #[test]
    fn a_device_node_disk_is_a_host_local_device_not_a_disk_failure() {
        let mut v = vm();
        v.disks.push(Disk {
            path: "/dev/loop7".into(),
            identity: None,
            host_device: true,
        });
        v.host_local_devices = vec!["disk /dev/loop7 (block device 7:7)".into()];
        let f = check_all(&v, &host());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].check, "device");
        assert!(
            f[0].source.contains("/dev/loop7 (block device 7:7)"),
            "{}",
            f[0]
        );
        assert!(f[0].remedy.contains("detach disk /dev/loop7"), "{}", f[0]);
    }

    #[test]
    fn cpu_failure_names_features_and_the_limit() {
        let mut v = vm();
        v.cpu_template = "host".into();
        v.cpu_features = set(&["cpuid.0x7.0.ebx[5]", "cpuid.0x1.0.edx[26]"]);
        let mut h = host();
        h.cpu_features = set(&["cpuid.0x1.0.edx[26]"]);
        h.cpu_limit = Some("limited to the baseline CPU template by --cpu-limit".into());
        let f = check_cpu(&v, &h).unwrap();
        assert!(
            f.source
                .contains("template host uses avx2 (cpuid.0x7.0.ebx[5])"),
            "{f}"
        );
        assert!(f.target.contains("--cpu-limit) lacks avx2"), "{f}");
        assert!(!f.target.contains("sse2"), "{f}");
    }

    #[test]
    fn priority_defaults_to_standard_on_the_wire() {
        let v: VmFacts = serde_json::from_str(
            r#"{"name":"a","cpu_template":"baseline",
            "cpu_features":[],"memory_mib":64,"vcpus":1}"#,
        )
        .unwrap();
        assert_eq!((v.priority, v.resident_mib), (Priority::Standard, None));
        let v: VmFacts = serde_json::from_str(
            r#"{"name":"a","cpu_template":"baseline",
            "cpu_features":[],"memory_mib":64,"vcpus":1,"priority":"high"}"#,
        )
        .unwrap();
        assert_eq!(v.priority, Priority::High);
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
