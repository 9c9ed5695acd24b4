//! Snapshot and restore: the whole VM's state as one serde struct
//! ([`VmState`]) plus guest RAM, written to a directory or (for live
//! migration, next) a stream.
//!
//! # Format (version [`FORMAT_VERSION`])
//!
//! A snapshot is a directory with two files:
//!
//! - `state.json`: [`VmState`] as JSON. Its first field is
//!   `format_version`; readers look at that field alone first and refuse
//!   any other version with a message naming both versions, before
//!   trying to parse the rest.
//! - `memory.bin`: guest RAM, the regions of [`VmState::memory`] back to
//!   back at their `file_offset`; zero pages are holes (sparse file). Its
//!   length must equal the end of the last region: a shorter file is
//!   reported as truncated.
//!
//! `state.json` is written last (to a temporary name, then renamed), so a
//! directory with a `state.json` holds a complete snapshot.
//!
//! What `VmState` holds: the format version and the vigil version that
//! wrote it; the VM config (without the console, which belongs to the
//! restoring host); every vCPU's state ([`crate::cpu::state::VcpuState`]:
//! cpuid, mp_state, regs, sregs, xsave or fpu, xcrs, lapic, MSRs,
//! vcpu_events, TSC kHz); the VM-wide KVM state
//! ([`crate::vm::VmKvmState`]: PIC master/slave, IOAPIC, PIT, clock); each
//! device's state ([`DeviceStates`]: COM1, and every virtio device's
//! transport registers, queues and model); the memory region table.
//!
//! # For live migration
//!
//! Source: [`Machine::pause`] (vCPUs park, then devices quiesce) or the two
//! steps apart ([`crate::cpu::gate::VcpuGate::pause`],
//! [`Machine::quiesce_devices`]) -> [`capture_bytes`] -> on failure
//! [`Machine::resume`]. Target: guest memory of the same layout, and a
//! [`crate::vm::PreparedVm`] built over it (KVM VM and memory slots) while
//! the source's pages fill it -> [`VmState::from_slice`] ->
//! [`run_incoming`], which only restores state and starts the vCPUs.
//!
//! # Changing the format
//!
//! Any change to a state struct that an older reader could not parse, or
//! that changes meaning, bumps [`FORMAT_VERSION`] and is listed in
//! `docs/SNAPSHOT.md`. A new *optional* field (`#[serde(default)]`) that
//! older snapshots lack does not need a bump.

pub mod memory;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{ConsoleMode, CpuTemplateName, OnReboot, VmConfig};
use crate::config::{DiskConfig, NicConfig, VsockConfig};
use crate::cpu::gate::GateError;
use crate::cpu::state::VcpuState;
use crate::devices::serial::SerialDeviceState;
use crate::devices::virtio::persist::{SaveError, VirtioDeviceState};
use crate::machine::Machine;
use crate::memory::GuestMemory;
use crate::persist::Persist;
use crate::vm::{VmError, VmKvmState};
pub use memory::RegionInfo;

/// The snapshot format this vigil writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this vigil reads (format 1 is format 2 without
/// virtio devices: its VMs had none).
pub const MIN_FORMAT_VERSION: u32 = 1;
/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// Refuse state files larger than this (a real one is tens of KiB per vCPU).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Errors taking, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A device's state could not be captured.
    #[error(transparent)]
    Device(#[from] SaveError),
    /// A restore override does not fit the snapshot.
    #[error("{0}")]
    Override(String),
    /// A file operation failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory has no state file.
    #[error("{0} is not a vigil snapshot: it has no {STATE_FILE}")]
    NotASnapshot(PathBuf),
    /// The state file is bigger than any real one.
    #[error("{path} is {len} bytes, more than a snapshot state file can be: it is not one")]
    TooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Written by a newer vigil.
    #[error(
        "snapshot format {found} was written by a newer vigil; this vigil reads formats \
         {MIN_FORMAT_VERSION} to {FORMAT_VERSION}: upgrade vigil or take a new snapshot"
    )]
    Newer {
        /// The snapshot's format.
        found: u32,
    },
    /// Written by an older vigil.
    #[error(
        "snapshot format {found} was written by an older vigil; this vigil reads formats \
         {MIN_FORMAT_VERSION} to {FORMAT_VERSION} only: restore it with the vigil that took it \
         (or one that reads format {found}) or take a new snapshot"
    )]
    Older {
        /// The snapshot's format.
        found: u32,
    },
    /// The state file does not parse.
    #[error("snapshot state file {path} is corrupt or truncated: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line/column).
        #[source]
        source: serde_json::Error,
    },
    /// The memory file does not have the size the state says.
    #[error(
        "snapshot memory file {path} is {len} bytes but the snapshot's region table needs \
         {want}: the file is truncated or from another snapshot"
    )]
    MemoryFileSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// Expected size.
        want: u64,
    },
    /// The state is inconsistent with itself or with the new VM.
    #[error("snapshot is inconsistent: {0}")]
    Layout(String),
    /// Guest memory access failed.
    #[error("guest memory access failed: {0}")]
    GuestMemory(String),
    /// Pausing or collecting vCPU state failed.
    #[error(transparent)]
    Vcpus(#[from] GateError),
    /// VM-wide KVM state could not be read.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The state could not be encoded.
    #[error("cannot encode the snapshot state: {0}")]
    Encode(#[source] serde_json::Error),
}

/// A disk as saved in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// Image path (absolute).
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// GET_ID value.
    pub id: String,
}

/// A NIC as saved in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNic {
    /// Host tap name (a restore may name another).
    pub tap: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// Logical network name.
    pub network: String,
}

/// The vsock device as saved in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVsock {
    /// Guest CID.
    pub cid: u64,
    /// Host socket path (a restore may name another).
    pub socket: PathBuf,
}

/// The VM config as saved: everything but the console (host-specific, given
/// again at restore).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// VM name.
    pub name: String,
    /// VM id.
    pub id: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Kernel path (used only if the restored guest reboots with
    /// `on_reboot = restart`).
    pub kernel: PathBuf,
    /// Initrd path (same).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (same).
    pub cmdline: String,
    /// CPU template (informational: the saved CPUID is restored as is).
    pub cpu_template: CpuTemplateName,
    /// Reboot policy.
    pub on_reboot: OnReboot,
    /// Disks, in attach order (format 2).
    #[serde(default)]
    pub disks: Vec<SavedDisk>,
    /// NICs, in attach order (format 2).
    #[serde(default)]
    pub nics: Vec<SavedNic>,
    /// The vsock device (format 2).
    #[serde(default)]
    pub vsock: Option<SavedVsock>,
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

impl SavedConfig {
    /// From a running VM's config.
    pub fn from_config(c: &VmConfig) -> Self {
        Self {
            name: c.name.clone(),
            id: c.id.clone(),
            vcpus: c.vcpus,
            memory_bytes: c.memory_bytes,
            // Absolute, so a restore from another directory can still
            // reboot the guest.
            kernel: std::path::absolute(&c.kernel).unwrap_or_else(|_| c.kernel.clone()),
            initrd: c
                .initrd
                .as_ref()
                .map(|i| std::path::absolute(i).unwrap_or_else(|_| i.clone())),
            cmdline: c.cmdline.clone(),
            cpu_template: c.cpu_template,
            on_reboot: c.on_reboot,
            disks: c
                .disks
                .iter()
                .map(|d| SavedDisk {
                    path: absolute(&d.path),
                    read_only: d.read_only,
                    id: d.id.clone(),
                })
                .collect(),
            nics: c
                .nics
                .iter()
                .map(|n| SavedNic {
                    tap: n.tap.clone(),
                    mac: n.mac,
                    network: n.network.clone(),
                })
                .collect(),
            vsock: c.vsock.as_ref().map(|v| SavedVsock {
                cid: v.cid,
                socket: absolute(&v.socket),
            }),
        }
    }

    /// Back to a runnable config, with the restoring side's overrides
    /// (refused when they name devices the VM does not have).
    pub fn to_config(&self, ov: &RestoreOverrides) -> Result<VmConfig, SnapshotError> {
        if ov.taps.len() > self.nics.len() {
            return Err(SnapshotError::Override(format!(
                "{} tap name(s) given but the snapshot's VM has {} NIC(s)",
                ov.taps.len(),
                self.nics.len()
            )));
        }
        if ov.vsock_socket.is_some() && self.vsock.is_none() {
            return Err(SnapshotError::Override(
                "a vsock socket path was given but the snapshot's VM has no vsock device".into(),
            ));
        }
        Ok(VmConfig {
            name: ov.name.clone().unwrap_or_else(|| self.name.clone()),
            id: self.id.clone(),
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpu_template: self.cpu_template,
            console: ov.console.clone().unwrap_or(ConsoleMode::Stdio),
            on_reboot: self.on_reboot,
            disks: self
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    id: d.id.clone(),
                })
                .collect(),
            nics: self
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| NicConfig {
                    tap: ov.taps.get(i).cloned().unwrap_or_else(|| n.tap.clone()),
                    mac: n.mac,
                    network: n.network.clone(),
                })
                .collect(),
            vsock: self.vsock.as_ref().map(|v| VsockConfig {
                cid: v.cid,
                socket: ov.vsock_socket.clone().unwrap_or_else(|| v.socket.clone()),
            }),
        })
    }
}

/// What the restoring process chooses for itself.
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    /// Console destination (default stdio).
    pub console: Option<ConsoleMode>,
    /// Name in logs (default: the saved name).
    pub name: Option<String>,
    /// Tap names for the NICs, in order (default: the saved ones; fewer
    /// names than NICs keep the rest).
    pub taps: Vec<String>,
    /// The vsock device's host socket path (default: the saved one).
    pub vsock_socket: Option<PathBuf>,
}

/// Every device's state. Devices join by adding a field here holding their
/// `Persist::State` (with `#[serde(default)]` if older snapshots lack it;
/// otherwise bump [`FORMAT_VERSION`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// Every virtio device in attach order (disks, NICs, vsock), which is
    /// also the order of their MMIO windows (format 2).
    #[serde(default)]
    pub virtio: Vec<VirtioDeviceState>,
}

/// The whole VM's state except RAM contents.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// [`FORMAT_VERSION`] of the writer. Keep first.
    pub format_version: u32,
    /// `vigil` version that wrote it (informational).
    pub vigil_version: String,
    /// The VM config.
    pub config: SavedConfig,
    /// One entry per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmKvmState,
    /// Device states.
    pub devices: DeviceStates,
    /// Guest RAM regions and where they are in the memory file.
    pub memory: Vec<RegionInfo>,
}

/// Just the version field, read before anything else.
#[derive(Deserialize)]
struct Header {
    format_version: u32,
}

impl VmState {
    /// Encodes as JSON (to a file or a migration stream).
    pub fn to_writer(&self, w: impl Write) -> Result<(), SnapshotError> {
        serde_json::to_writer(w, self).map_err(SnapshotError::Encode)
    }

    /// Decodes from JSON bytes, checking the version first. `path` names the
    /// source in errors.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self, SnapshotError> {
        let corrupt = |source| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            source,
        };
        let h: Header = serde_json::from_slice(bytes).map_err(corrupt)?;
        if h.format_version > FORMAT_VERSION {
            return Err(SnapshotError::Newer {
                found: h.format_version,
            });
        }
        if h.format_version < MIN_FORMAT_VERSION {
            return Err(SnapshotError::Older {
                found: h.format_version,
            });
        }
        let s: VmState = serde_json::from_slice(bytes).map_err(corrupt)?;
        s.check()?;
        Ok(s)
    }

    /// Consistency checks a parser cannot do.
    fn check(&self) -> Result<(), SnapshotError> {
        if self.vcpus.len() != self.config.vcpus as usize {
            return Err(SnapshotError::Layout(format!(
                "config says {} vCPUs but {} vCPU states are saved",
                self.config.vcpus,
                self.vcpus.len()
            )));
        }
        for (i, v) in (0u32..).zip(&self.vcpus) {
            if v.id != i {
                return Err(SnapshotError::Layout(format!(
                    "vCPU state {i} has id {}",
                    v.id
                )));
            }
        }
        let saved = &self.devices.virtio;
        let count = |k| saved.iter().filter(|d| d.kind() == k).count();
        let c = &self.config;
        let (b, n, v) = (count("block"), count("net"), count("vsock"));
        if (b, n, v) != (c.disks.len(), c.nics.len(), usize::from(c.vsock.is_some())) {
            return Err(SnapshotError::Layout(format!(
                "config lists {} disk(s), {} NIC(s), {} vsock but device states are saved for \
                 {b}, {n}, {v}",
                c.disks.len(),
                c.nics.len(),
                usize::from(c.vsock.is_some())
            )));
        }
        let total: u64 = self.memory.iter().map(|r| r.size).sum();
        if total != self.config.memory_bytes {
            return Err(SnapshotError::Layout(format!(
                "config says {} bytes of RAM, region table has {total}",
                self.config.memory_bytes
            )));
        }
        Ok(())
    }
}

/// What [`save`] did.
#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Guest RAM size.
    pub memory_bytes: u64,
    /// Bytes of RAM actually written (zero pages skipped).
    pub memory_written_bytes: u64,
    /// How long the VM was paused for the snapshot, in milliseconds.
    pub paused_ms: u64,
}

/// Captures the state of `m` (whose vCPUs must be paused: use
/// [`Machine::pause`] first) without touching the disk. Quiesces the
/// devices if they are not yet (idempotent) and makes the disks' completed
/// writes durable before their state is taken.
pub fn capture(m: &Machine) -> Result<VmState, SnapshotError> {
    let vcpus = m.gate.collect_states(crate::cpu::gate::PAUSE_TIMEOUT)?;
    m.quiesce_devices();
    let vm = m.vm.save_state()?;
    let serial = m.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
    let transports = m.virtio.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let virtio = crate::devices::virtio::persist::save_all(&transports)?;
    Ok(VmState {
        format_version: FORMAT_VERSION,
        vigil_version: env!("CARGO_PKG_VERSION").to_string(),
        config: SavedConfig::from_config(&m.config),
        vcpus,
        vm,
        devices: DeviceStates { serial, virtio },
        memory: memory::regions(&m.mem),
    })
}

/// [`capture`] encoded as the bytes a migration sends (the same JSON as
/// `state.json`).
pub fn capture_bytes(m: &Machine) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Vec::new();
    capture(m)?.to_writer(&mut out)?;
    Ok(out)
}

/// Guest memory with the layout `state` was saved from, for a migration
/// target to fill before [`run_incoming`].
pub fn guest_memory(state: &VmState) -> Result<GuestMemory, crate::Error> {
    let mem = crate::memory::create_guest_memory(state.config.memory_bytes)?;
    memory::check_layout(&mem, &state.memory)?;
    Ok(mem)
}

/// Restores `state` into `prepared` (a VM built with
/// [`crate::vm::PreparedVm::new`] over memory already holding the guest's
/// RAM) and runs the VM until it stops, like [`restore`].
pub fn run_incoming(
    state: VmState,
    prepared: crate::vm::PreparedVm,
    overrides: RestoreOverrides,
    opts: &crate::instance::RunOptions,
) -> Result<crate::ExitReason, crate::Error> {
    crate::instance::run_incoming(state, prepared, overrides, opts)
}

/// Writes a snapshot of `m` to `dir` (created if missing). Pauses the VM
/// (vCPUs, then devices' [`crate::machine::PauseHook`]s) if it is running
/// and leaves it paused: the caller resumes or stops it. The caller holds
/// [`Machine::control_lock`].
pub fn save(m: &Machine, dir: &Path) -> Result<SaveReport, SnapshotError> {
    let t0 = Instant::now();
    m.pause_locked()?;
    fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
        path: dir.to_path_buf(),
        what: "create directory",
        source,
    })?;
    let state = capture(m)?;
    // A stale state file would make a half-written directory look whole.
    let state_path = dir.join(STATE_FILE);
    if state_path.exists() {
        fs::remove_file(&state_path).map_err(|source| SnapshotError::Io {
            path: state_path.clone(),
            what: "remove old",
            source,
        })?;
    }
    let written = memory::save(&m.mem, &dir.join(MEMORY_FILE))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { path, what, source }
    };
    let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
    state.to_writer(std::io::BufWriter::new(&mut f))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    fs::rename(&tmp, &state_path).map_err(io("rename", &tmp))?;
    Ok(SaveReport {
        dir: dir.to_path_buf(),
        memory_bytes: m.config.memory_bytes,
        memory_written_bytes: written,
        paused_ms: t0.elapsed().as_millis() as u64,
    })
}

/// Reads and checks `dir/state.json` (not the memory file).
pub fn load(dir: &Path) -> Result<VmState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let meta = fs::metadata(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            SnapshotError::NotASnapshot(dir.to_path_buf())
        } else {
            SnapshotError::Io {
                path: path.clone(),
                what: "read",
                source,
            }
        }
    })?;
    if meta.len() > MAX_STATE_BYTES {
        return Err(SnapshotError::TooBig {
            path,
            len: meta.len(),
        });
    }
    let bytes = fs::read(&path).map_err(|source| SnapshotError::Io {
        path: path.clone(),
        what: "read",
        source,
    })?;
    VmState::from_slice(&bytes, &path)
}

/// Restores the VM saved in `dir` and runs it until it stops (see
/// [`crate::instance::run_restored`]).
pub fn restore(
    dir: &Path,
    overrides: RestoreOverrides,
    opts: &crate::instance::RunOptions,
) -> Result<crate::ExitReason, crate::Error> {
    crate::instance::run_restored(dir, overrides, opts)
}

#[cfg(test)]
mod tests;
