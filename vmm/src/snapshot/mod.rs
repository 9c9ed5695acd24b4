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
//! device's state ([`DeviceStates`]); the memory region table.
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
use crate::cpu::gate::GateError;
use crate::cpu::state::VcpuState;
use crate::devices::serial::SerialDeviceState;
use crate::machine::Machine;
use crate::persist::Persist;
use crate::vm::{VmError, VmKvmState};
pub use memory::RegionInfo;

/// The snapshot format this vigil writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// Refuse state files larger than this (a real one is tens of KiB per vCPU).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Errors taking, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM has devices whose state snapshots do not carry yet.
    #[error(
        "cannot snapshot VM {vm}: it has virtio devices ({devices}), whose state snapshots do \
         not carry yet; snapshot a VM without --disk/--net/--vsock"
    )]
    DevicesNotSaved {
        /// The VM's name.
        vm: String,
        /// Which devices.
        devices: String,
    },
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
        "snapshot format {found} was written by a newer vigil; this vigil reads format \
         {FORMAT_VERSION}: upgrade vigil or take a new snapshot"
    )]
    Newer {
        /// The snapshot's format.
        found: u32,
    },
    /// Written by an older vigil.
    #[error(
        "snapshot format {found} was written by an older vigil; this vigil reads format \
         {FORMAT_VERSION} only: restore it with the vigil that took it (or one that reads \
         format {found}) or take a new snapshot"
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
        }
    }

    /// Back to a runnable config, with the restoring side's overrides.
    pub fn to_config(&self, ov: &RestoreOverrides) -> VmConfig {
        VmConfig {
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
            // Snapshots of VMs with virtio devices are refused (see
            // `check_devices`), so a restored VM has none.
            disks: Vec::new(),
            nics: Vec::new(),
            vsock: None,
        }
    }
}

/// What the restoring process chooses for itself.
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    /// Console destination (default stdio).
    pub console: Option<ConsoleMode>,
    /// Name in logs (default: the saved name).
    pub name: Option<String>,
}

/// Every device's state. Devices join by adding a field here holding their
/// `Persist::State` (with `#[serde(default)]` if older snapshots lack it;
/// otherwise bump [`FORMAT_VERSION`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
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
        match h.format_version.cmp(&FORMAT_VERSION) {
            std::cmp::Ordering::Greater => {
                return Err(SnapshotError::Newer {
                    found: h.format_version,
                })
            }
            std::cmp::Ordering::Less => {
                return Err(SnapshotError::Older {
                    found: h.format_version,
                })
            }
            std::cmp::Ordering::Equal => {}
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

/// Captures the state of `m` (which must be paused: use
/// [`Machine::pause`] first) without touching the disk.
pub fn capture(m: &Machine) -> Result<VmState, SnapshotError> {
    check_devices(&m.config)?;
    let vcpus = m.gate.collect_states(crate::cpu::gate::PAUSE_TIMEOUT)?;
    let vm = m.vm.save_state()?;
    let serial = m.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
    Ok(VmState {
        format_version: FORMAT_VERSION,
        vigil_version: env!("CARGO_PKG_VERSION").to_string(),
        config: SavedConfig::from_config(&m.config),
        vcpus,
        vm,
        devices: DeviceStates { serial },
        memory: memory::regions(&m.mem),
    })
}

/// Refuses VMs with virtio devices: the devices implement `Persist`, but
/// their state is not in [`DeviceStates`] yet, and a guest restored without
/// its devices' queue state would find them broken.
fn check_devices(c: &VmConfig) -> Result<(), SnapshotError> {
    let mut devices = Vec::new();
    devices.extend(c.disks.iter().map(|d| format!("disk {}", d.path.display())));
    devices.extend(c.nics.iter().map(|n| format!("nic {}", n.tap)));
    devices.extend(c.vsock.iter().map(|v| format!("vsock cid {}", v.cid)));
    if devices.is_empty() {
        return Ok(());
    }
    Err(SnapshotError::DevicesNotSaved {
        vm: c.name.clone(),
        devices: devices.join(", "),
    })
}

/// Writes a snapshot of `m` to `dir` (created if missing). Pauses the VM
/// (vCPUs, then devices' [`crate::machine::PauseHook`]s) if it is running
/// and leaves it paused: the caller resumes or stops it. The caller holds
/// [`Machine::control_lock`].
pub fn save(m: &Machine, dir: &Path) -> Result<SaveReport, SnapshotError> {
    check_devices(&m.config)?;
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
