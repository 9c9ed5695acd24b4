//! `vigil migrate`: starts a live migration through the VM's control API
//! (`PUT /vm/migrate`), shows its progress (`GET /vm/migrate`, polled) as a
//! bar or as JSON lines, and ends with the summary; `--cancel` cancels.
//! Exit status 0 when the guest runs on the target, 1 otherwise (the VM
//! then keeps running here).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::api::client;
use vmm::control::EXIT_ERROR;

use crate::cli::{CompressArg, MigrateArgs, PriorityArg};
use crate::run::chain;

const POLL: Duration = Duration::from_millis(100);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `vigil migrate`.
pub fn migrate(args: MigrateArgs) -> i32 {
    let sock = &args.api_socket;
    if args.cancel {
        return match client::call(sock, "PUT", "/vm/migrate/cancel", None, CALL_TIMEOUT) {
            Ok(v) => {
                if args.json {
                    println!("{v}");
                } else {
                    println!("cancel requested; the VM keeps running on this host");
                }
                0
            }
            Err(e) => fail(&chain(&e)),
        };
    }
    let body = json!({
        "to": args.to,
        "downtime_ms": args.downtime_ms,
        "bandwidth_mbps": args.bandwidth,
        "max_duration_s": args.max_duration_s,
        "checksum": args.checksum,
        "compress": match args.compress {
            Some(CompressArg::On) => "on",
            Some(CompressArg::Off) => "off",
            Some(CompressArg::Auto) | None => "auto",
        },
        "priority": match args.priority {
            Some(PriorityArg::High) => "high",
            Some(PriorityArg::Standard) | None => "standard",
        },
        "tls": args.tls_cert.as_ref().map(|cert| json!({
            "cert": abs(cert),
            "key": args.tls_key.as_deref().map(abs),
            "ca": args.tls_ca.as_deref().map(abs),
            "name": args.tls_name,
        })),
    });
    if let Err(e) = client::call(sock, "PUT", "/vm/migrate", Some(&body), CALL_TIMEOUT) {
        return fail(&chain(&e));
    }
    let tty = std::io::stderr().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut last_json = Value::Null;
    loop {
        let v = match client::call(sock, "GET", "/vm/migrate", None, CALL_TIMEOUT) {
            Ok(v) => v,
            Err(e) => return fail(&format!("lost the VM's control API: {}", chain(&e))),
        };
        let state = v["state"].as_str().unwrap_or("").to_string();
        if args.json {
            if v != last_json {
                println!("{v}");
                last_json = v.clone();
            }
        } else if state == "running" && (tty || last_line.elapsed() >= Duration::from_secs(1)) {
            let line = bar(&v);
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
            last_line = Instant::now();
        }
        match state.as_str() {
            "running" => std::thread::sleep(POLL),
            "succeeded" => {
                if !args.json {
                    if tty {
                        eprintln!();
                    }
                    println!("{}", succeeded(&v));
                }
                return 0;
            }
            _ => {
                if tty && !args.json {
                    eprintln!();
                }
                return fail(&failed(&v, "the VM", "this host"));
            }
        }
    }
}

/// The VMM may run in another working directory.
fn abs(p: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1 << 20) as f64
}

/// `[#####.....]  42% precopy round 1  sent 120.0 MiB  dirty 30.1 MiB/s  downtime ~12 ms  throttle 0%`
pub(crate) fn bar(v: &Value) -> String {
    let pct = v["percent"].as_u64().unwrap_or(0).min(100) as usize;
    let filled = pct / 5;
    format!(
        "[{}{}] {pct:>3}% {:<18} sent {:>8.1} MiB  dirty {:>7.1} MiB/s  expected downtime {:>6.1} ms  throttle {}%",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        v["stage"].as_str().unwrap_or("?"),
        mib(&v["bytes_sent"]),
        v["dirty_pages_per_sec"].as_f64().unwrap_or(0.0) * 4096.0 / (1 << 20) as f64,
        v["expected_downtime_ms"].as_f64().unwrap_or(0.0),
        v["throttle"].as_u64().unwrap_or(0),
    )
}

/// What a succeeded migration's status (`GET /vm/migrate`) says: its
/// summary, or, when the target's acknowledgement was lost but the target
/// holds the VM's lease, that (there is no summary then).
pub(crate) fn succeeded(v: &Value) -> String {
    if v["ack_lost"] == true {
        format!(
            "migrated: the target's acknowledgement was lost, but the target holds the VM's \
             lease ({}): the guest runs there",
            v["lease"].as_str().unwrap_or("?")
        )
    } else {
        summary(&v["summary"])
    }
}

/// What a failed or cancelled migration's status says, and where `vm` is
/// now (`source`: the host it was to leave).
pub(crate) fn failed(v: &Value, vm: &str, source: &str) -> String {
    let err = v["error"]
        .as_str()
        .unwrap_or("migration ended without an outcome");
    if v["lease_suspended"] == true {
        format!(
            "{err}; {vm} is paused on {source}, lease-suspended: it resumes if it re-acquires \
             its lease and stops if the target holds it"
        )
    } else if v["vm_running_here"] == false {
        format!("{err}; {vm} could not be resumed on {source}")
    } else {
        format!("{err}; {vm} keeps running on {source}")
    }
}

fn summary(s: &Value) -> String {
    format!(
        "migrated: total {:.3} s, downtime {:.1} ms (measured at the source: paused until the \
         target's ack; {:.1} ms until the last byte was sent), {:.1} MiB sent, {} rounds, \
         max throttle {}%",
        s["total_s"].as_f64().unwrap_or(0.0),
        s["downtime_ms"].as_f64().unwrap_or(0.0),
        s["downtime_sent_ms"].as_f64().unwrap_or(0.0),
        mib(&s["bytes_sent"]),
        s["rounds"].as_u64().unwrap_or(0),
        s["max_throttle"].as_u64().unwrap_or(0),
    )
}

fn fail(msg: &str) -> i32 {
    eprintln!("vigil: {msg}");
    let _ = std::io::stderr().flush();
    EXIT_ERROR
}
