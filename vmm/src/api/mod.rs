//! The control API (V4): HTTP/1.1 + JSON on one unix socket per VM, so
//! `curl --unix-socket PATH http://localhost/vm` works.
//!
//! | method | path | does | success |
//! |---|---|---|---|
//! | GET | /vm | state (`running`, `paused`, `lease-suspended`), config, vCPUs, memory, uptime, disk lease | 200 |
//! | PUT | /vm/pause | parks every vCPU outside KVM_RUN | 200 |
//! | PUT | /vm/resume | lets them run again (409 while lease-suspended) | 200 |
//! | PUT | /vm/shutdown?timeout_s=N | graceful via guest tools, hard after N s (default 30) | 202 |
//! | PUT | /vm/snapshot `{"dir": "...", "stop": false}` | snapshot to dir, then resume (or stop) | 200 |
//! | GET | /vm/heartbeat | guest tools heartbeat status | 200 |
//! | GET | /vm/counters | per-device I/O counters | 200 |
//! | GET | /vm/watchdog | vCPU / event-loop progress | 200 |
//! | PUT | /vm/migrate `{"to": "ADDR:PORT", ...}` | starts a live migration (see `migration::vmm`) | 202 |
//! | GET | /vm/migrate | its progress, then its outcome and summary | 200 |
//! | PUT | /vm/migrate/cancel | cancels it; the VM keeps running here | 200 |
//! | POST | /vm/reset `{"reason": "..."}` (body optional) | hard reset: the guest boots again in this process, same disks and MACs; the reason is logged | 202 |
//!
//! Errors are `{"error": "..."}` with 400 (malformed request or body), 404
//! (unknown path), 405 (known path, wrong method), 409 (not possible in the
//! VM's state), 413 (too large), 500 (the VMM failed).
//!
//! Why a dedicated thread rather than an event-loop subscriber: pause
//! waits for vCPUs to park, a snapshot writes all of guest RAM, and
//! shutdown waits for the guest; none of that may stall the event loop,
//! which serves the console and (soon) virtio queues and is itself watched
//! by the watchdog. The thread acts on the VM only through [`Machine`]'s
//! small set of operations (pause, resume, snapshot, stop request), which
//! serialise among themselves. Connections are served one at a time, one
//! request each (`Connection: close`): the API is for a CLI and an agent,
//! not for throughput.

pub mod client;
pub mod http;

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::control::ExitReason;
use crate::machine::Machine;
use http::Request;

/// Default `timeout_s` of PUT /vm/shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process listens on the path.
    #[error(
        "{0} is in use by another running VMM: choose another --api-socket path or stop that VM"
    )]
    InUse(PathBuf),
    /// bind/listen failed.
    #[error("cannot listen on API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The listening socket; removed from the file system on drop.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path`. A stale socket file (nobody listening) is replaced;
    /// a live one is refused.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves requests until `stop` is set (checked every 200 ms).
    pub fn serve(&self, m: &Arc<Machine>, stop: &AtomicBool) {
        tracing::info!(socket = %self.path.display(), "control API listening");
        while !stop.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((stream, _)) => handle_connection(m, stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn handle_connection(m: &Arc<Machine>, mut stream: UnixStream) {
    // Accepted sockets inherit non-blocking mode on some systems.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let (status, body, after) = match http::read_request(&mut stream) {
        Ok(req) => {
            tracing::debug!(method = %req.method, path = %req.path, "API request");
            route(m, &req)
        }
        Err(e) => match e.status() {
            Some(s) => (s, json!({ "error": e.to_string() }), None),
            None => return,
        },
    };
    if let Err(e) = http::write_json(&mut stream, status, &body) {
        tracing::debug!(error = %e, "API response not delivered");
    }
    drop(stream);
    if let Some(f) = after {
        f();
    }
}

type After = Option<Box<dyn FnOnce()>>;

fn err(status: u16, msg: impl Into<String>) -> (u16, Value, After) {
    (status, json!({ "error": msg.into() }), None)
}

fn ok(v: Value) -> (u16, Value, After) {
    (200, v, None)
}

/// Routes one request. Public for tests.
pub fn route(m: &Arc<Machine>, req: &Request) -> (u16, Value, After) {
    let known: &[(&str, &str)] = &[
        ("/vm", "GET"),
        ("/vm/pause", "PUT"),
        ("/vm/resume", "PUT"),
        ("/vm/shutdown", "PUT"),
        ("/vm/snapshot", "PUT"),
        ("/vm/heartbeat", "GET"),
        ("/vm/counters", "GET"),
        ("/vm/watchdog", "GET"),
        ("/vm/migrate", "GET"),
        ("/vm/migrate", "PUT"),
        ("/vm/migrate/cancel", "PUT"),
        ("/vm/reset", "POST"),
    ];
    let path = req.path.trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    match known
        .iter()
        .find(|(p, m)| *p == path && *m == req.method)
        .or_else(|| known.iter().find(|(p, _)| *p == path))
    {
        None => {
            return err(
                404,
                format!(
                    "no such endpoint {path}: the API has {}",
                    known
                        .iter()
                        .map(|(p, m)| format!("{m} {p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        }
        Some((_, want)) if *want != req.method => {
            return err(405, format!("{path} takes {want}, not {}", req.method))
        }
        Some(_) => {}
    }
    match path {
        "/vm" => ok(info(m)),
        "/vm/pause" => match m.pause() {
            Ok(()) => ok(json!({ "state": m.state_name() })),
            Err(e) => err(409, e.to_string()),
        },
        "/vm/resume" if crate::lease::is_suspended() => err(
            409,
            "the VM is lease-suspended (its disk lease could not be renewed in time): it \
             resumes on its own once the lease is held again, or powers off if another host \
             took it over",
        ),
        "/vm/resume" => {
            m.resume();
            ok(json!({ "state": m.state_name() }))
        }
        "/vm/shutdown" => shutdown(m, req),
        "/vm/snapshot" => snapshot(m, req),
        "/vm/heartbeat" => ok(json!(m.heartbeat())),
        "/vm/counters" => ok(json!({ "devices": m.counters() })),
        "/vm/watchdog" => ok(json!(*m.watchdog.lock().unwrap_or_else(|p| p.into_inner()))),
        "/vm/migrate" | "/vm/migrate/cancel" => migrate(m, req, path),
        "/vm/reset" => reset(m, req),
        _ => err(404, format!("no such endpoint {path}")),
    }
}

fn migrate(m: &Arc<Machine>, req: &Request, path: &str) -> (u16, Value, After) {
    let Some(hook) = m.migration.clone() else {
        return err(
            409,
            "this VMM was started without live migration support (run it with `vigil run`)",
        );
    };
    let answer = match (path, req.method.as_str()) {
        ("/vm/migrate", "GET") => Ok((200, hook.0.status())),
        ("/vm/migrate", _) => hook.0.start(m, &req.body).map(|v| (202, v)),
        _ => hook.0.cancel().map(|v| (200, v)),
    };
    match answer {
        Ok((status, v)) => (status, v, None),
        Err(e) => err(e.status, e.message),
    }
}

fn info(m: &Machine) -> Value {
    let c = &m.config;
    json!({
        "id": c.id,
        "name": c.name,
        "state": m.state_name(),
        "vcpus": c.vcpus,
        "memory_mib": c.memory_bytes >> 20,
        "uptime_s": m.started.elapsed().as_secs_f64(),
        "restored_from": m.restored_from,
        "lease": crate::lease::info(),
        "config": {
            "kernel": c.kernel,
            "initrd": c.initrd,
            "cmdline": c.cmdline,
            "cpu_template": c.cpu_template,
            "on_reboot": c.on_reboot,
            "console": c.console.to_string(),
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: PathBuf,
    #[serde(default)]
    stop: bool,
}

fn snapshot(m: &Arc<Machine>, req: &Request) -> (u16, Value, After) {
    let body: SnapshotBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            return err(
                400,
                format!(
                    "bad snapshot request body ({e}): send {{\"dir\": \"/path/to/dir\", \"stop\": \
                     false}}"
                ),
            )
        }
    };
    if !body.dir.is_absolute() {
        return err(
            400,
            format!(
                "snapshot dir `{}` must be an absolute path (the VMM's working directory is not \
                 the client's)",
                body.dir.display()
            ),
        );
    }
    let _g = m.control_lock();
    let was_paused = m.gate.is_paused();
    let result = crate::snapshot::save(m, &body.dir);
    match result {
        Ok(report) => {
            let mut v = json!(report);
            if body.stop {
                v["state"] = json!("stopped");
                let m2 = m.clone();
                return (
                    200,
                    v,
                    Some(Box::new(move || {
                        m2.exit.request(ExitReason::Snapshotted);
                        m2.gate.stop();
                    })),
                );
            }
            if !was_paused {
                m.resume_locked();
            }
            v["state"] = json!(m.state_name());
            ok(v)
        }
        Err(e) => {
            if !was_paused {
                m.resume_locked();
            }
            err(
                500,
                format!("snapshot to {} failed: {e}", body.dir.display()),
            )
        }
    }
}

/// Default reason of a reset whose request names none.
pub const DEFAULT_RESET_REASON: &str = "requested through the control API";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    #[serde(default)]
    reason: Option<String>,
}

/// The reason of a reset request: the body's `reason`, or the default for an
/// empty body. Control characters are replaced so the log stays one line.
fn reset_reason(body: &[u8]) -> Result<String, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DEFAULT_RESET_REASON.to_string());
    }
    let b: ResetBody = serde_json::from_slice(body).map_err(|e| {
        format!("bad reset request body ({e}): send nothing, or {{\"reason\": \"why\"}}")
    })?;
    let reason = b
        .reason
        .map(|r| r.trim().replace(char::is_control, " "))
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_RESET_REASON.to_string());
    if reason.len() > 512 {
        return Err(format!(
            "reset reason is {} bytes long; at most 512",
            reason.len()
        ));
    }
    Ok(reason)
}

fn reset(m: &Arc<Machine>, req: &Request) -> (u16, Value, After) {
    let reason = match reset_reason(&req.body) {
        Ok(r) => r,
        Err(e) => return err(400, e),
    };
    if m.exit.should_stop() {
        return err(
            409,
            "the VM is already stopping; a reset needs a running (or paused) VM",
        );
    }
    tracing::warn!(%reason, "VM reset requested");
    let m2 = m.clone();
    let r2 = reason.clone();
    (
        202,
        json!({ "state": "resetting", "reason": reason,
                "note": "the guest is stopped and booted again in this process; the API socket is back once the new guest runs" }),
        Some(Box::new(move || {
            m2.exit.request(ExitReason::Reset { reason: r2 });
            m2.gate.stop();
        })),
    )
}

fn shutdown(m: &Arc<Machine>, req: &Request) -> (u16, Value, After) {
    let timeout_s = match req.query_param("timeout_s") {
        None => DEFAULT_SHUTDOWN_TIMEOUT_S,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n <= 3600 => n,
            _ => {
                return err(
                    400,
                    format!("timeout_s `{v}` must be a whole number of seconds, 0..=3600"),
                )
            }
        },
    };
    let tools = m
        .guest_tools
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let graceful = tools.map(|t| t.request_shutdown());
    let m2 = m.clone();
    match graceful {
        Some(Ok(())) => {
            // The guest was asked; if it has not powered off by the
            // deadline, pull the plug.
            let after: After = Some(Box::new(move || {
                let _ = std::thread::Builder::new()
                    .name("shutdown-timer".into())
                    .spawn(move || {
                        let deadline = std::time::Instant::now() + Duration::from_secs(timeout_s);
                        while std::time::Instant::now() < deadline {
                            if m2.exit.should_stop() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        tracing::warn!(timeout_s, "guest did not shut down in time; powering off");
                        m2.exit.request(ExitReason::HostPowerOff);
                        m2.gate.stop();
                    });
            }));
            (
                202,
                json!({ "method": "graceful", "timeout_s": timeout_s,
                        "note": "the guest tools were asked to shut down; hard power-off after the timeout" }),
                after,
            )
        }
        other => {
            let why = match other {
                Some(Err(e)) => format!("guest tools refused the shutdown request ({e})"),
                _ => "guest tools not connected".to_string(),
            };
            let after: After = Some(Box::new(move || {
                m2.exit.request(ExitReason::HostPowerOff);
                m2.gate.stop();
            }));
            (
                202,
                json!({ "method": "hard", "timeout_s": timeout_s,
                        "note": format!("{why}, and this VM has no ACPI power button (no GED device): powering off now") }),
                after,
            )
        }
    }
}

/// Runs the API server on its own thread until `stop`.
pub fn spawn(
    server: ApiServer,
    m: Arc<Machine>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || server.serve(&m, &stop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_reason_from_body() {
        assert_eq!(reset_reason(b"").unwrap(), DEFAULT_RESET_REASON);
        assert_eq!(reset_reason(b" \r\n").unwrap(), DEFAULT_RESET_REASON);
        assert_eq!(reset_reason(b"{}").unwrap(), DEFAULT_RESET_REASON);
        assert_eq!(
            reset_reason(br#"{"reason": "tools heartbeat lost\nno I/O"}"#).unwrap(),
            "tools heartbeat lost no I/O"
        );
        let e = reset_reason(br#"{"why": 1}"#).unwrap_err();
        assert!(e.starts_with("bad reset request body"), "{e}");
        let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(600));
        assert!(reset_reason(long.as_bytes())
            .unwrap_err()
            .contains("600 bytes"));
    }
}
