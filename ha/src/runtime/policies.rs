//! The HA policies' I/O: what the runtime polls and carries out for VM
//! monitoring, datastore-loss protection, resets, the health record and the
//! agent's self-watchdog.
//!
//! Two helper threads feed the main loop:
//!
//! - the VM poller: every [`POLL`], for each VM running here, `GET
//!   /vm/heartbeat` (a tools or application heartbeat newer than the last
//!   poll becomes `ToolsHeartbeat` / `AppHeartbeat`) and `GET /vm/counters`
//!   (the sum of the block and net counters goes through
//!   [`IoTracker`]; growth becomes `IoActivity`). A VMM that does not answer
//!   (it is being reset, or gone) gives nothing: silence is what the
//!   monitor acts on.
//! - the datastore prober: every [`POLL`], for each datastore this host
//!   mounts, writes and reads back `.vigil/probe-HOST` on a thread of its
//!   own and reports `DatastoreAccess { accessible }`; a probe that has not
//!   finished within [`PROBE_TIMEOUT`] (a hung mount) counts as
//!   inaccessible, and no second probe is started on that datastore until
//!   the first returns.

use super::Ev;
use crate::agent::{Input, VmEvent};
use crate::health::{HostSummary, ProcSource, SummaryLog};
use crate::monitoring::IoTracker;
pub use crate::selfwatch::SelfWatch;
use crate::types::{DatastoreId, VmId};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often VMs and datastores are polled.
pub const POLL: Duration = Duration::from_secs(2);
/// A datastore probe slower than this counts as a lost datastore.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The health record file (in the run directory) and its rotation.
pub const SUMMARY_FILE: &str = "summary.log";
const SUMMARY_MAX_BYTES: u64 = 1 << 20;
const SUMMARY_KEEP: u32 = 5;
/// The agent's main loop must make progress within this.
pub const SELFWATCH_THRESHOLD: Duration = Duration::from_secs(30);

/// The VMs the poller watches (the main loop keeps it current).
pub type LocalVms = Arc<Mutex<BTreeSet<VmId>>>;

/// Starts the VM poller.
pub(super) fn spawn_vm_poller(run_dir: PathBuf, vms: LocalVms, tx: Sender<Ev>) {
    std::thread::spawn(move || {
        let mut io: BTreeMap<VmId, IoTracker> = BTreeMap::new();
        loop {
            std::thread::sleep(POLL);
            let list: Vec<VmId> = vms.lock().map(|v| v.iter().cloned().collect()).unwrap();
            io.retain(|vm, _| list.contains(vm));
            for vm in list {
                let sock = super::vmms::run_files(&run_dir, &vm).socket;
                let tracker = io.entry(vm.clone()).or_default();
                for event in poll_vm(&sock, tracker) {
                    let input = Input::Vm {
                        vm: vm.clone(),
                        event,
                    };
                    if tx.send(Ev::Input(input)).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// One poll of one VM's API.
fn poll_vm(sock: &Path, io: &mut IoTracker) -> Vec<VmEvent> {
    let t = Duration::from_secs(2);
    let mut out = Vec::new();
    if let Ok(hb) = vmm::api::client::call(sock, "GET", "/vm/heartbeat", None, t) {
        out.extend(heartbeat_events(&hb));
    }
    if let Ok(c) = vmm::api::client::call(sock, "GET", "/vm/counters", None, t) {
        if io.observe(io_total(&c)) {
            out.push(VmEvent::IoActivity);
        }
    }
    out
}

/// Heartbeats newer than one poll interval (plus a second of slack).
fn heartbeat_events(hb: &Value) -> Vec<VmEvent> {
    let fresh = |k: &str| {
        hb[k]
            .as_u64()
            .is_some_and(|ms| ms < POLL.as_millis() as u64 + 1000)
    };
    let mut out = Vec::new();
    if fresh("ms_since_tools_heartbeat") {
        out.push(VmEvent::ToolsHeartbeat);
    }
    if fresh("ms_since_app_heartbeat") {
        out.push(VmEvent::AppHeartbeat);
    }
    out
}

/// The sum of every block and net device counter in `GET /vm/counters`.
fn io_total(c: &Value) -> u64 {
    c["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["kind"] == "block" || d["kind"] == "net")
        .flat_map(|d| d["counters"].as_object().into_iter().flatten())
        .filter_map(|(_, v)| v.as_u64())
        .fold(0u64, u64::wrapping_add)
}

/// Starts the datastore prober.
pub(super) fn spawn_datastore_prober(
    host: String,
    datastores: BTreeMap<String, PathBuf>,
    tx: Sender<Ev>,
) {
    std::thread::spawn(move || {
        let busy: BTreeMap<String, Arc<AtomicBool>> = datastores
            .keys()
            .map(|d| (d.clone(), Arc::new(AtomicBool::new(false))))
            .collect();
        loop {
            for (ds, path) in &datastores {
                let accessible = probe(&host, path, &busy[ds]);
                let input = Input::DatastoreAccess {
                    datastore: DatastoreId::new(ds.as_str()),
                    accessible,
                };
                if tx.send(Ev::Input(input)).is_err() {
                    return;
                }
            }
            std::thread::sleep(POLL);
        }
    });
}

/// Writes and reads back a probe file, on its own thread, within
/// [`PROBE_TIMEOUT`]. A probe still stuck from an earlier round fails at
/// once.
fn probe(host: &str, ds: &Path, busy: &Arc<AtomicBool>) -> bool {
    if busy.swap(true, Ordering::SeqCst) {
        return false;
    }
    let (rtx, rrx) = mpsc::channel();
    let path = ds.join(".vigil").join(format!("probe-{host}"));
    let busy2 = busy.clone();
    std::thread::spawn(move || {
        let stamp = format!("{:?}\n", std::time::SystemTime::now());
        let ok = std::fs::create_dir_all(path.parent().expect("has a parent")).is_ok()
            && vmm::lease::write_atomic(&path, stamp.as_bytes()).is_ok()
            && std::fs::read(&path).is_ok_and(|b| b == stamp.as_bytes());
        busy2.store(false, Ordering::SeqCst);
        let _ = rtx.send(ok);
    });
    rrx.recv_timeout(PROBE_TIMEOUT).unwrap_or(false)
}

/// `POST /vm/reset {"reason": reason}` on a helper thread: the VMM boots
/// the guest again in the same process and keeps its lease.
pub(super) fn reset(run_dir: &Path, vm: VmId, reason: String) {
    let sock = super::vmms::run_files(run_dir, &vm).socket;
    std::thread::spawn(move || {
        let body = json!({ "reason": reason });
        match vmm::api::client::call(
            &sock,
            "POST",
            "/vm/reset",
            Some(&body),
            Duration::from_secs(30),
        ) {
            Ok(_) => tracing::warn!(vm = %vm, %reason, "VM reset"),
            Err(e) => tracing::warn!(vm = %vm, %reason, error = %e, "VM reset failed"),
        }
    });
}

/// What VM monitoring did to one local VM since this agent started: shown
/// by `vigil cluster status` (asked of every host).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MonitoringRecord {
    /// Resets carried out.
    pub resets: u32,
    /// The last reset's reason.
    pub last_reason: Option<String>,
    /// When (seconds since the Unix epoch).
    pub last_reset_unix: Option<u64>,
    /// The guest hung again after its resets in the window were used up:
    /// it is left alone for an operator.
    pub limit_reached: bool,
}

/// Keeps the monitoring record of the VM a reset event names.
pub(super) fn record_monitoring(
    records: &mut BTreeMap<VmId, MonitoringRecord>,
    e: &crate::agent::HaEvent,
) {
    use crate::agent::HaEvent;
    match e {
        HaEvent::VmReset { vm, reason } => {
            let r = records.entry(vm.clone()).or_default();
            r.resets += 1;
            r.last_reason = Some(reason.clone());
            r.last_reset_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            r.limit_reached = false;
        }
        HaEvent::VmResetLimitReached { vm, .. } => {
            records.entry(vm.clone()).or_default().limit_reached = true;
        }
        _ => {}
    }
}

/// The maintenance-mode marker in the run directory.
const MAINTENANCE_FILE: &str = "maintenance";

/// Whether this host was left in maintenance mode.
pub(super) fn maintenance_marked(run_dir: &Path) -> bool {
    run_dir.join(MAINTENANCE_FILE).exists()
}

/// Records (or clears) maintenance mode so that it survives a restart.
pub(super) fn mark_maintenance(run_dir: &Path, on: bool) {
    let p = run_dir.join(MAINTENANCE_FILE);
    let r = if on {
        vmm::lease::write_atomic(&p, b"maintenance\n").map_err(|e| e.to_string())
    } else {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
            _ => Ok(()),
        }
    };
    if let Err(e) = r {
        tracing::warn!(file = %p.display(), error = %e, "cannot record maintenance mode");
    }
}

/// Writes the health record for an `HaEvent::Summary` to the log and to
/// the rotating summary file in the run directory.
pub(super) fn write_summary(
    run_dir: &Path,
    host: &str,
    vmms: &[(String, u32)],
    state: &str,
    uptime: Duration,
    running: usize,
    protected: Option<usize>,
) {
    let line = HostSummary::collect(
        &ProcSource::system(),
        host,
        std::process::id(),
        vmms,
        crate::health::DEFAULT_TOP,
    )
    .map(|s| s.with_agent_view(state, uptime, running, protected).line());
    match line {
        Ok(line) => {
            tracing::info!(target: "vigil::health", "{line}");
            let mut log =
                SummaryLog::new(run_dir.join(SUMMARY_FILE), SUMMARY_MAX_BYTES, SUMMARY_KEEP);
            if let Err(e) = log.append(&line) {
                tracing::warn!(error = %e, "cannot write the health record");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot collect the health record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_fresh_within_one_poll() {
        let hb = json!({"ms_since_tools_heartbeat": 900, "ms_since_app_heartbeat": 60000});
        assert_eq!(heartbeat_events(&hb), vec![VmEvent::ToolsHeartbeat]);
        let hb = json!({"ms_since_tools_heartbeat": null, "ms_since_app_heartbeat": 10});
        assert_eq!(heartbeat_events(&hb), vec![VmEvent::AppHeartbeat]);
        assert!(heartbeat_events(&json!({})).is_empty());
    }

    #[test]
    fn io_total_sums_block_and_net_only() {
        let c = json!({"devices": [
            {"device": "vda", "kind": "block", "counters": {"read_bytes": 10, "write_bytes": 5}},
            {"device": "eth0", "kind": "net", "counters": {"rx_bytes": 7}},
            {"device": "vsock", "kind": "vsock", "counters": {"rx_bytes": 1000}},
        ]});
        assert_eq!(io_total(&c), 22);
    }

    #[test]
    fn monitoring_records_count_resets_and_the_limit() {
        use crate::agent::HaEvent;
        let mut r = BTreeMap::new();
        let vm = VmId::new("vm1");
        for n in 1..=2 {
            let reason = format!("reset {n}");
            record_monitoring(
                &mut r,
                &HaEvent::VmReset {
                    vm: vm.clone(),
                    reason,
                },
            );
        }
        record_monitoring(
            &mut r,
            &HaEvent::VmResetLimitReached {
                vm: vm.clone(),
                resets: 2,
            },
        );
        let rec = &r[&vm];
        assert_eq!(rec.resets, 2);
        assert_eq!(rec.last_reason.as_deref(), Some("reset 2"));
        assert!(rec.limit_reached && rec.last_reset_unix.is_some());
    }

    #[test]
    fn maintenance_marker_round_trip() {
        let dir = std::env::temp_dir().join(format!("vigil-maint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!maintenance_marked(&dir));
        mark_maintenance(&dir, true);
        assert!(maintenance_marked(&dir));
        mark_maintenance(&dir, false);
        mark_maintenance(&dir, false);
        assert!(!maintenance_marked(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn probe_reports_a_writable_datastore_and_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("vigil-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let busy = Arc::new(AtomicBool::new(false));
        assert!(probe("h1", &dir, &busy));
        assert!(!busy.load(Ordering::SeqCst));
        // A plain file where the datastore directory should be: no write.
        let file = dir.join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert!(!probe("h1", &file, &busy));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
