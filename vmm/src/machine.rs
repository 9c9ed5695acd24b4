//! A running VM as the rest of the VMM sees it: the handle the control API,
//! the watchdog and snapshot code share ([`Machine`]), and the hooks devices
//! implement to appear in the API ([`GuestTools`], [`IoCounterSource`]).
//!
//! Pause, resume and snapshot are serialised by one lock, so two API clients
//! cannot interleave a resume into the middle of a snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::control::ExitSignal;
use crate::cpu::gate::{GateError, VcpuGate, PAUSE_TIMEOUT};
use crate::devices::serial::SerialDevice;
use crate::memory::GuestMemory;
use crate::vm::Vm;
use crate::watchdog::WatchdogReport;

/// What the guest tools channel reports (`GET /vm/heartbeat`). Until the
/// vsock device provides a [`GuestTools`] hook, `connected` is false and
/// the rest is null.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// Whether a tools daemon is connected.
    pub connected: bool,
    /// The daemon's version string, once it said hello.
    pub tools_version: Option<String>,
    /// Milliseconds since the last tools heartbeat.
    pub ms_since_tools_heartbeat: Option<u64>,
    /// Milliseconds since the last application heartbeat (None if no
    /// application registered).
    pub ms_since_app_heartbeat: Option<u64>,
    /// Human-readable note ("guest tools not connected").
    pub note: Option<String>,
}

/// The guest tools channel, provided by the vsock device.
pub trait GuestTools: Send + Sync {
    /// Current heartbeat status.
    fn status(&self) -> HeartbeatStatus;
    /// Asks the guest to shut down cleanly; Err says why it cannot
    /// (e.g. tools not connected).
    fn request_shutdown(&self) -> Result<(), String>;
}

/// One device's I/O counters (`GET /vm/counters`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCounters {
    /// Device id, e.g. "block0", "net0".
    pub device: String,
    /// Kind: "block", "net", "vsock".
    pub kind: String,
    /// Monotonic counters since the VMM started, e.g. read_bytes,
    /// write_bytes, read_ops, write_ops, flush_ops, rx_bytes, tx_bytes,
    /// rx_packets, tx_packets.
    pub counters: BTreeMap<String, u64>,
}

/// A device that counts its I/O (implemented by virtio devices).
pub trait IoCounterSource: Send + Sync {
    /// A snapshot of the counters.
    fn counters(&self) -> DeviceCounters;
}

/// A device that must stop touching guest memory while the VM is paused
/// (virtio queue processing, tap/vsock/disk backends): a snapshot's memory
/// image and device state are only consistent if nothing writes guest RAM
/// after the vCPUs park. Both calls must be idempotent (a snapshot of a
/// VM the user already paused pauses again).
pub trait PauseHook: Send + Sync {
    /// Finish or park in-flight work; do not write guest memory until
    /// [`PauseHook::resume`].
    fn pause(&self);
    /// Carry on.
    fn resume(&self);
}

/// The running VM, shared by the event loop, the API and the watchdog.
/// Field order matters for drop: the VM fd goes before guest memory.
pub struct Machine {
    /// The configuration it runs with.
    pub config: VmConfig,
    /// The KVM VM.
    pub vm: Vm,
    /// Guest RAM.
    pub mem: GuestMemory,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// vCPU pause/save/progress.
    pub gate: Arc<VcpuGate>,
    /// Stop requests.
    pub exit: Arc<ExitSignal>,
    /// What KVM can save per vCPU.
    pub caps: Arc<crate::cpu::state::StateCaps>,
    /// When this VM (boot or restore) started.
    pub started: Instant,
    /// The snapshot it was restored from, if any.
    pub restored_from: Option<PathBuf>,
    /// The guest tools hook (set by the vsock device).
    pub guest_tools: Mutex<Option<Arc<dyn GuestTools>>>,
    /// Devices with I/O counters.
    pub io_counters: Mutex<Vec<Arc<dyn IoCounterSource>>>,
    /// Devices to quiesce on pause (after the vCPUs park; resumed before
    /// the vCPUs run again).
    pub pause_hooks: Mutex<Vec<Arc<dyn PauseHook>>>,
    /// Every virtio transport in attach order, for snapshots and migration.
    pub virtio: Mutex<Vec<Arc<Mutex<crate::devices::virtio::transport::MmioTransport>>>>,
    /// Bumped by the event loop on every iteration (read by the watchdog).
    pub loop_progress: AtomicU64,
    /// The watchdog's latest findings.
    pub watchdog: Mutex<WatchdogReport>,
    /// Live migration, when the binary installed it.
    pub migration: Option<crate::migration_hook::HookRef>,
    control: Mutex<()>,
}

impl Machine {
    /// Puts the pieces together.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: VmConfig,
        vm: Vm,
        mem: GuestMemory,
        serial: Arc<Mutex<SerialDevice>>,
        gate: Arc<VcpuGate>,
        exit: Arc<ExitSignal>,
        caps: Arc<crate::cpu::state::StateCaps>,
        restored_from: Option<PathBuf>,
    ) -> Self {
        Self {
            config,
            vm,
            mem,
            serial,
            gate,
            exit,
            caps,
            started: Instant::now(),
            restored_from,
            guest_tools: Mutex::new(None),
            io_counters: Mutex::new(Vec::new()),
            pause_hooks: Mutex::new(Vec::new()),
            virtio: Mutex::new(Vec::new()),
            loop_progress: AtomicU64::new(0),
            watchdog: Mutex::new(WatchdogReport::default()),
            migration: None,
            control: Mutex::new(()),
        }
    }

    /// Serialises pause/resume/snapshot.
    pub fn control_lock(&self) -> MutexGuard<'_, ()> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pauses all vCPUs (returns when they are parked), then the devices.
    pub fn pause(&self) -> Result<(), GateError> {
        let _g = self.control_lock();
        self.pause_locked()
    }

    /// Resumes the devices, then all vCPUs.
    pub fn resume(&self) {
        let _g = self.control_lock();
        self.resume_locked();
    }

    fn hooks(&self) -> Vec<Arc<dyn PauseHook>> {
        self.pause_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// [`Self::pause`] for callers that hold [`Self::control_lock`].
    pub fn pause_locked(&self) -> Result<(), GateError> {
        self.gate.pause(PAUSE_TIMEOUT)?;
        self.quiesce_devices();
        Ok(())
    }

    /// [`Self::resume`] for callers that hold [`Self::control_lock`].
    /// Does nothing while the VM is lease-suspended: only the lease lets
    /// such a VM run again (a snapshot or a cancelled migration that
    /// resumes "what it paused" must not undo the lease's pause).
    pub fn resume_locked(&self) {
        if crate::lease::is_suspended() {
            tracing::info!("VM is lease-suspended: it stays paused");
            return;
        }
        self.resume_devices();
        self.gate.resume();
    }

    /// Stops every device from touching guest memory (the second step of a
    /// pause, after the vCPUs park; live migration calls it on its own).
    /// Returns once no device is in the middle of a request. Idempotent.
    pub fn quiesce_devices(&self) {
        for h in self.hooks() {
            h.pause();
        }
    }

    /// Undoes [`Self::quiesce_devices`]; notifications that arrived
    /// meanwhile are served. Idempotent.
    pub fn resume_devices(&self) {
        for h in self.hooks() {
            h.resume();
        }
    }

    /// "lease-suspended", "paused" or "running".
    pub fn state_name(&self) -> &'static str {
        if crate::lease::is_suspended() && self.gate.is_paused() {
            "lease-suspended"
        } else if self.gate.is_paused() {
            "paused"
        } else {
            "running"
        }
    }

    /// Heartbeat status from the tools hook, or "not connected".
    pub fn heartbeat(&self) -> HeartbeatStatus {
        let tools = self
            .guest_tools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tools {
            Some(t) => t.status(),
            None => HeartbeatStatus {
                note: Some("guest tools not connected".to_string()),
                ..Default::default()
            },
        }
    }

    /// Counters of every registered device.
    pub fn counters(&self) -> Vec<DeviceCounters> {
        self.io_counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.counters())
            .collect()
    }

    /// Bumps the event loop's progress counter.
    pub fn loop_tick(&self) {
        self.loop_progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the disk lease does to a machine: pause it when the lease cannot
/// be renewed in time, resume it when the lease is held again.
pub struct LeaseHook(pub std::sync::Weak<Machine>);

impl crate::lease::SuspendHook for LeaseHook {
    fn suspend(&self) -> bool {
        let Some(m) = self.0.upgrade() else {
            return false;
        };
        let _g = m.control_lock();
        let was_running = !m.gate.is_paused();
        match m.pause_locked() {
            Ok(()) => tracing::warn!("guest paused: lease-suspended"),
            // The write fence still refuses every disk write.
            Err(e) => tracing::error!(error = %e, "cannot pause the lease-suspended guest"),
        }
        was_running
    }

    fn resume(&self) {
        if let Some(m) = self.0.upgrade() {
            m.resume();
            tracing::warn!("guest resumed: lease held again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_json_shape_until_tools_connect() {
        let v = serde_json::to_value(HeartbeatStatus {
            note: Some("guest tools not connected".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "connected": false,
                "tools_version": null,
                "ms_since_tools_heartbeat": null,
                "ms_since_app_heartbeat": null,
                "note": "guest tools not connected",
            })
        );
    }

    #[test]
    fn counters_json_shape() {
        let c = DeviceCounters {
            device: "block0".into(),
            kind: "block".into(),
            counters: [("read_bytes".to_string(), 4096u64)].into_iter().collect(),
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"device": "block0", "kind": "block", "counters": {"read_bytes": 4096}})
        );
    }
}
