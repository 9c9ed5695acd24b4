//! The guest tools channel: port 5252 served by the VMM itself.
//!
//! The in-guest tools daemon connects to CID 2 port 5252 and speaks lines:
//! `HELLO vigil-tools <version>`, `HB <seq> <uptime_ms>` every second,
//! `APP <name> <seq>` for application heartbeats, and answers the host's
//! `SHUTDOWN` with `ACK SHUTDOWN` and `PING` with `PONG`.
//!
//! [`ToolsStatus`] is the shared view: the event loop writes it, the control
//! API (or HA monitoring) reads [`ToolsStatus::snapshot`] and calls
//! [`ToolsStatus::request_guest_shutdown`] from any thread.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Longest line accepted from the guest; longer ones are dropped.
pub const MAX_LINE: usize = 512;
/// Most application names tracked (a guest cannot grow the map forever).
pub const MAX_APPS: usize = 64;

/// Why a request to the guest tools could not be sent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ToolsError {
    /// No tools connection.
    #[error("the guest tools are not connected (no vsock connection to port 5252)")]
    NotConnected,
}

/// One application's last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppHeartbeat {
    /// The name the application registered.
    pub name: String,
    /// Its last sequence number.
    pub seq: u64,
    /// When it arrived (wall clock).
    pub at: SystemTime,
    /// How long ago.
    pub age: Duration,
}

/// A plain copy of the tools status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolsSnapshot {
    /// A tools connection is open now.
    pub connected: bool,
    /// The version from HELLO.
    pub version: Option<String>,
    /// When the last `HB` arrived.
    pub last_heartbeat: Option<SystemTime>,
    /// How long ago.
    pub last_heartbeat_age: Option<Duration>,
    /// Its sequence number.
    pub heartbeat_seq: u64,
    /// The guest uptime it reported, in ms.
    pub guest_uptime_ms: u64,
    /// Application heartbeats, by name.
    pub apps: Vec<AppHeartbeat>,
    /// A shutdown request was sent and not yet acknowledged.
    pub shutdown_pending: bool,
    /// The guest acknowledged a shutdown request.
    pub shutdown_acked: bool,
    /// PONGs received.
    pub pongs: u64,
}

#[derive(Default)]
struct Inner {
    connected: bool,
    version: Option<String>,
    last_hb: Option<(Instant, SystemTime)>,
    hb_seq: u64,
    uptime_ms: u64,
    apps: BTreeMap<String, (u64, Instant, SystemTime)>,
    /// Lines the host wants sent to the guest.
    outbox: Vec<String>,
    shutdown_pending: bool,
    shutdown_acked: bool,
    pongs: u64,
}

/// Shared between the vsock device (writer) and the control API (reader).
pub struct ToolsStatus {
    inner: Mutex<Inner>,
    /// Wakes the event loop when the host queued a line for the guest.
    wake: EventFd,
}

impl ToolsStatus {
    /// A status with nothing connected.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner::default()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state as plain data.
    pub fn snapshot(&self) -> ToolsSnapshot {
        let g = self.lock();
        let now = Instant::now();
        ToolsSnapshot {
            connected: g.connected,
            version: g.version.clone(),
            last_heartbeat: g.last_hb.map(|(_, w)| w),
            last_heartbeat_age: g.last_hb.map(|(i, _)| now.duration_since(i)),
            heartbeat_seq: g.hb_seq,
            guest_uptime_ms: g.uptime_ms,
            apps: g
                .apps
                .iter()
                .map(|(name, (seq, i, w))| AppHeartbeat {
                    name: name.clone(),
                    seq: *seq,
                    at: *w,
                    age: now.duration_since(*i),
                })
                .collect(),
            shutdown_pending: g.shutdown_pending,
            shutdown_acked: g.shutdown_acked,
            pongs: g.pongs,
        }
    }

    /// Asks the guest tools to shut the guest down (they answer
    /// `ACK SHUTDOWN`, visible in the snapshot, then power off).
    pub fn request_guest_shutdown(&self) -> Result<(), ToolsError> {
        self.send_line("SHUTDOWN")?;
        let mut g = self.lock();
        g.shutdown_pending = true;
        g.shutdown_acked = false;
        Ok(())
    }

    /// Sends `PING`; the answer counts in `pongs`.
    pub fn ping(&self) -> Result<(), ToolsError> {
        self.send_line("PING")
    }

    fn send_line(&self, line: &str) -> Result<(), ToolsError> {
        let mut g = self.lock();
        if !g.connected {
            return Err(ToolsError::NotConnected);
        }
        g.outbox.push(format!("{line}\n"));
        drop(g);
        let _ = self.wake.write(1);
        Ok(())
    }

    /// The eventfd the event loop watches for host requests.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub(super) fn set_connected(&self, c: bool) {
        let mut g = self.lock();
        g.connected = c;
        if !c {
            g.outbox.clear();
            g.shutdown_pending = false;
        }
    }

    pub(super) fn take_outbox(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().outbox)
    }

    /// Handles one line from the guest (without the newline). Returns the
    /// answer to send back, if any. Unknown lines are ignored.
    pub(super) fn handle_line(&self, line: &str) -> Option<&'static str> {
        let mut it = line.split_ascii_whitespace();
        let mut g = self.lock();
        match (it.next(), it.next(), it.next()) {
            (Some("HELLO"), Some("vigil-tools"), Some(v)) => {
                g.version = Some(v.chars().take(64).collect());
            }
            (Some("HB"), Some(seq), Some(up)) => {
                g.last_hb = Some((Instant::now(), SystemTime::now()));
                g.hb_seq = seq.parse().unwrap_or(g.hb_seq);
                g.uptime_ms = up.parse().unwrap_or(g.uptime_ms);
            }
            (Some("APP"), Some(name), Some(seq)) => {
                let seq = seq.parse().unwrap_or(0);
                if g.apps.len() < MAX_APPS || g.apps.contains_key(name) {
                    let name: String = name.chars().take(64).collect();
                    g.apps
                        .insert(name, (seq, Instant::now(), SystemTime::now()));
                }
            }
            (Some("ACK"), Some("SHUTDOWN"), None) => {
                g.shutdown_pending = false;
                g.shutdown_acked = true;
            }
            (Some("PONG"), None, None) => g.pongs += 1,
            (Some("PING"), None, None) => return Some("PONG\n"),
            _ => tracing::debug!(line, "unknown tools line ignored"),
        }
        None
    }
}
