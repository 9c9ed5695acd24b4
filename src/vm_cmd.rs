//! `vigil vm ...` and `vigil snapshot`: thin clients of a VM's control API
//! (see `vmm::api` for the endpoints). Output is a small table, or the
//! API's JSON with `--json`. Exit status 0 on success, 1 with one message
//! on stderr otherwise.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use vmm::api::client::{self, ClientError};
use vmm::control::EXIT_ERROR;

use crate::cli::{SnapshotArgs, VmAction, VmArgs};

/// Snapshots write all of guest RAM; give them time.
const LONG: Duration = Duration::from_secs(600);
const SHORT: Duration = Duration::from_secs(30);

/// Runs `vigil vm ACTION`.
pub fn vm(args: VmArgs) -> i32 {
    if matches!(
        args.action,
        VmAction::Register
            | VmAction::Start
            | VmAction::Stop
            | VmAction::Set
            | VmAction::List
            | VmAction::Migrate
    ) {
        return crate::ha_cmd::vm(args);
    }
    let Some(socket) = args.api_socket.clone() else {
        eprintln!("vigil: --api-socket PATH is required for this action");
        return EXIT_ERROR;
    };
    let mut body = None;
    let (method, path, timeout) = match args.action {
        VmAction::Info => ("GET", "/vm".to_string(), SHORT),
        VmAction::Pause => ("PUT", "/vm/pause".to_string(), SHORT),
        VmAction::Resume => ("PUT", "/vm/resume".to_string(), SHORT),
        VmAction::Shutdown => (
            "PUT",
            match args.timeout_s {
                Some(t) => format!("/vm/shutdown?timeout_s={t}"),
                None => "/vm/shutdown".to_string(),
            },
            SHORT,
        ),
        VmAction::Heartbeat => ("GET", "/vm/heartbeat".to_string(), SHORT),
        VmAction::Counters => ("GET", "/vm/counters".to_string(), SHORT),
        VmAction::Watchdog => ("GET", "/vm/watchdog".to_string(), SHORT),
        VmAction::Reset => {
            body = args.reason.as_ref().map(|r| json!({ "reason": r }));
            ("POST", "/vm/reset".to_string(), SHORT)
        }
        VmAction::Register
        | VmAction::Start
        | VmAction::Stop
        | VmAction::Set
        | VmAction::List
        | VmAction::Migrate => {
            unreachable!("handled by ha_cmd")
        }
    };
    match client::call(&socket, method, &path, body.as_ref(), timeout) {
        Ok(v) => {
            if args.json {
                println!("{v}");
            } else {
                print!("{}", render(args.action, &v));
            }
            0
        }
        Err(e) => fail(&socket, &e),
    }
}

/// Runs `vigil snapshot`.
pub fn snapshot(args: SnapshotArgs) -> i32 {
    // The VMM may run in another working directory.
    let dir = match std::path::absolute(&args.to) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vigil: cannot resolve {}: {e}", args.to.display());
            return EXIT_ERROR;
        }
    };
    let body = json!({ "dir": dir, "stop": args.stop });
    match client::call(&args.api_socket, "PUT", "/vm/snapshot", Some(&body), LONG) {
        Ok(v) => {
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "snapshot written to {} ({} MiB of RAM, {} MiB non-zero; VM paused {} ms); VM is {}",
                    dir.display(),
                    v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                    v["memory_written_bytes"].as_u64().unwrap_or(0) >> 20,
                    v["paused_ms"].as_u64().unwrap_or(0),
                    v["state"].as_str().unwrap_or("?")
                );
            }
            0
        }
        Err(e) => fail(&args.api_socket, &e),
    }
}

fn fail(socket: &Path, e: &ClientError) -> i32 {
    match e {
        ClientError::Api { .. } => eprintln!("vigil: VM at {}: {e}", socket.display()),
        _ => eprintln!("vigil: {}", crate::run::chain(e)),
    }
    EXIT_ERROR
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

/// The human-readable form of an API answer.
fn render(action: VmAction, v: &Value) -> String {
    match action {
        VmAction::Info => table(&[
            ("id", s(&v["id"])),
            ("name", s(&v["name"])),
            ("state", s(&v["state"])),
            ("vcpus", s(&v["vcpus"])),
            ("memory", format!("{} MiB", s(&v["memory_mib"]))),
            (
                "uptime",
                format!("{:.1} s", v["uptime_s"].as_f64().unwrap_or(0.0)),
            ),
            ("restored from", s(&v["restored_from"])),
            ("kernel", s(&v["config"]["kernel"])),
            ("cmdline", s(&v["config"]["cmdline"])),
            ("console", s(&v["config"]["console"])),
        ]),
        VmAction::Pause | VmAction::Resume => format!("VM is {}\n", s(&v["state"])),
        VmAction::Shutdown => format!("shutdown: {} ({})\n", s(&v["method"]), s(&v["note"])),
        VmAction::Reset => format!("reset: {} ({})\n", s(&v["reason"]), s(&v["note"])),
        VmAction::Heartbeat => {
            let ms = |k: &str| match v[k].as_u64() {
                Some(n) => format!("{:.1} s ago", n as f64 / 1000.0),
                None => "-".to_string(),
            };
            let mut rows = vec![
                ("tools connected", s(&v["connected"])),
                ("tools version", s(&v["tools_version"])),
                ("tools heartbeat", ms("ms_since_tools_heartbeat")),
                ("app heartbeat", ms("ms_since_app_heartbeat")),
            ];
            if !v["note"].is_null() {
                rows.push(("note", s(&v["note"])));
            }
            table(&rows)
        }
        VmAction::Counters => {
            let devs = v["devices"].as_array().cloned().unwrap_or_default();
            if devs.is_empty() {
                return "no devices with I/O counters\n".to_string();
            }
            let mut out = format!(
                "{:<10} {:<6} {:<16} {:>16}\n",
                "DEVICE", "KIND", "COUNTER", "VALUE"
            );
            for d in devs {
                if let Some(c) = d["counters"].as_object() {
                    for (k, n) in c {
                        out.push_str(&format!(
                            "{:<10} {:<6} {:<16} {:>16}\n",
                            s(&d["device"]),
                            s(&d["kind"]),
                            k,
                            s(n)
                        ));
                    }
                }
            }
            out
        }
        VmAction::Watchdog => {
            let mut out = format!(
                "healthy: {}  (threshold {} ms, {} incidents)\n",
                s(&v["healthy"]),
                s(&v["threshold_ms"]),
                s(&v["incidents"])
            );
            out.push_str(&format!(
                "{:<10} {:<8} {:>12} {:>18}\n",
                "WHAT", "STATE", "PROGRESS", "MS SINCE PROGRESS"
            ));
            for c in v["vcpus"].as_array().cloned().unwrap_or_default() {
                out.push_str(&format!(
                    "{:<10} {:<8} {:>12} {:>18}\n",
                    format!("vcpu{}", s(&c["id"])),
                    s(&c["state"]),
                    s(&c["progress"]),
                    s(&c["ms_since_progress"])
                ));
            }
            let l = &v["event_loop"];
            out.push_str(&format!(
                "{:<10} {:<8} {:>12} {:>18}\n",
                "loop",
                s(&l["state"]),
                s(&l["progress"]),
                s(&l["ms_since_progress"])
            ));
            if !v["last_incident"].is_null() {
                out.push_str(&format!("last incident: {}\n", s(&v["last_incident"])));
            }
            out
        }
        VmAction::Register
        | VmAction::Start
        | VmAction::Stop
        | VmAction::Set
        | VmAction::List
        | VmAction::Migrate => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_tables() {
        let v = json!({"id":"a","name":"a","state":"paused","vcpus":1,"memory_mib":128,
                       "uptime_s":1.5,"restored_from":null,"config":{"kernel":"/k","cmdline":"c","console":"none"}});
        let t = render(VmAction::Info, &v);
        assert!(t.contains("state          paused"), "{t}");
        let h = render(
            VmAction::Heartbeat,
            &json!({"connected":false,"tools_version":null,"ms_since_tools_heartbeat":null,
                    "ms_since_app_heartbeat":null,"note":"guest tools not connected"}),
        );
        assert!(h.contains("tools connected  false"), "{h}");
        assert!(h.contains("guest tools not connected"), "{h}");
        assert_eq!(
            render(VmAction::Counters, &json!({"devices":[]})),
            "no devices with I/O counters\n"
        );
        let c = render(
            VmAction::Counters,
            &json!({"devices":[{"device":"block0","kind":"block","counters":{"read_bytes":4096}}]}),
        );
        assert!(c.contains("block0") && c.contains("4096"), "{c}");
    }
}
