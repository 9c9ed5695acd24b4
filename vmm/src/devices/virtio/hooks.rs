//! The virtio devices as the control API, the watchdog and snapshots see
//! them: adapters from the devices' own types to the hooks of
//! [`crate::machine`] (I/O counters, the guest tools channel, pausing).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::attach::VirtioDevices;
use super::block::BlockCounters;
use super::net::NetCounters;
use super::transport::MmioTransport;
use super::vsock::tools::ToolsStatus;
use crate::machine::{
    DeviceCounters, GuestTools, HeartbeatStatus, IoCounterSource, Machine, PauseHook,
};

/// Registers every device of `virtio` with `machine`'s hooks.
pub fn register(machine: &Machine, virtio: &VirtioDevices) {
    let mut counters = machine
        .io_counters
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for (i, b) in virtio.blocks.iter().enumerate() {
        counters.push(Arc::new(BlockSource {
            device: format!("block{i} ({})", b.id),
            counters: b.counters.clone(),
        }));
    }
    for (i, n) in virtio.nics.iter().enumerate() {
        counters.push(Arc::new(NetSource {
            device: format!("net{i} ({})", n.tap),
            counters: n.counters.clone(),
        }));
    }
    drop(counters);
    if let Some(tools) = &virtio.tools {
        *machine
            .guest_tools
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tools.clone() as Arc<dyn GuestTools>);
    }
    machine
        .pause_hooks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::new(Transports(virtio.transports.clone())));
    *machine.virtio.lock().unwrap_or_else(|p| p.into_inner()) = virtio.transports.clone();
}

/// Counter structs are plain serde data: their fields become the map.
fn as_map<T: serde::Serialize>(v: &T) -> BTreeMap<String, u64> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| v.as_u64().map(|n| (k, n)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

struct BlockSource {
    device: String,
    counters: Arc<BlockCounters>,
}

impl IoCounterSource for BlockSource {
    fn counters(&self) -> DeviceCounters {
        DeviceCounters {
            device: self.device.clone(),
            kind: "block".to_string(),
            counters: as_map(&self.counters.snapshot()),
        }
    }
}

struct NetSource {
    device: String,
    counters: Arc<NetCounters>,
}

impl IoCounterSource for NetSource {
    fn counters(&self) -> DeviceCounters {
        DeviceCounters {
            device: self.device.clone(),
            kind: "net".to_string(),
            counters: as_map(&self.counters.snapshot()),
        }
    }
}

impl GuestTools for ToolsStatus {
    fn status(&self) -> HeartbeatStatus {
        let s = self.snapshot();
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        HeartbeatStatus {
            connected: s.connected,
            tools_version: s.version,
            ms_since_tools_heartbeat: s.last_heartbeat_age.map(ms),
            ms_since_app_heartbeat: s.apps.iter().map(|a| ms(a.age)).min(),
            note: (!s.connected).then(|| "guest tools not connected".to_string()),
        }
    }

    fn request_shutdown(&self) -> Result<(), String> {
        self.request_guest_shutdown().map_err(|e| e.to_string())
    }
}

/// Pausing the VM stops every transport from serving its queues.
struct Transports(Vec<Arc<Mutex<MmioTransport>>>);

impl PauseHook for Transports {
    fn pause(&self) {
        for t in &self.0 {
            t.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
        }
    }

    fn resume(&self) {
        for t in &self.0 {
            t.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }
}
