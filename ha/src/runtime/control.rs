//! The agent's command channel: `vigil cluster status|maintenance` and
//! `vigil vm start|stop|set|list` talk to an agent over TCP on its agent port.
//!
//! ```text
//! client                                   agent
//!   connect ------------------------------>
//!          <------------------------------ {"nonce":"<32 hex>"}\n
//!   {"payload":"<request JSON>","mac":"<HMAC(secret, nonce \n payload)>"}\n -->
//!          <------------------------------ {"ok":...} | {"error":"..."} | {"redirect":"HOST"}\n
//! ```
//!
//! The MAC over a fresh nonce is what makes a request count: without the
//! cluster secret nobody can order a power-on, and a captured request cannot
//! be replayed (its nonce is spent). A non-master agent answers requests only
//! the master can serve with `redirect`, and the client asks that host.

use crate::wire::{mac_hex, verify_hex, ClusterSecret};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "cmd")]
pub enum Request {
    /// The cluster's state (master) or this host's (others redirect).
    Status,
    /// This agent's own state, never redirected.
    LocalStatus,
    /// Power a VM on (master).
    Start {
        /// The VM.
        vm: String,
        /// Where; the master places it when absent.
        host: Option<String>,
    },
    /// Power a VM off (the host running it).
    Stop {
        /// The VM.
        vm: String,
    },
    /// Change a registered VM's HA settings (master): a larger reservation
    /// of a powered-on VM passes admission control first; the master then
    /// rewrites the VM's `ha.toml` on its datastore. `None`: unchanged.
    SetVm {
        /// The VM.
        vm: String,
        /// New CPU reservation, MHz.
        cpu_mhz: Option<u64>,
        /// New memory reservation, MiB.
        mem_mib: Option<u64>,
        /// New restart priority.
        priority: Option<crate::types::RestartPriority>,
    },
    /// May `host` enter maintenance mode under admission control (master)?
    CheckMaintenance {
        /// The host.
        host: String,
        /// Its VMs will be powered off rather than moved.
        power_off: bool,
    },
    /// Enter maintenance mode (the host itself, never redirected): refused
    /// while VMs run there; the master also checks admission control.
    EnterMaintenance,
    /// Leave maintenance mode (the host itself, never redirected).
    ExitMaintenance,
    /// Plan a live migration (master): see `agent::Command::BeginMigration`.
    /// `Ok` is `{"from": HOST|null, "to": HOST}`.
    PlanMigration {
        /// The VM.
        vm: String,
        /// The target; the master places it when absent.
        host: Option<String>,
        /// The VM runs outside the cluster and comes in.
        #[serde(default)]
        from_outside: bool,
    },
    /// A planned migration ended (master).
    EndMigration {
        /// The VM.
        vm: String,
        /// The guest runs on the target.
        ok: bool,
    },
    /// Start a VMM waiting for `vm` by live migration (the target host,
    /// never redirected). `Ok` is `{"address": "IP:PORT"}` once it listens.
    Incoming {
        /// The VM.
        vm: String,
        /// The VM comes from outside the cluster (its source holds no
        /// lease): acquire the lease now, as for a power-on, instead of
        /// taking it over at switchover.
        #[serde(default)]
        from_outside: bool,
    },
    /// Stop a VMM still waiting for `vm` (the target host): the migration
    /// did not happen. A VMM whose guest already runs is left alone.
    CancelIncoming {
        /// The VM.
        vm: String,
    },
    /// Live-migrate `vm`, which runs here, to `to` (the source host):
    /// starts it through the VMM's API and returns; follow it with
    /// `MigrationStatus`.
    MigrateOut {
        /// The VM.
        vm: String,
        /// The target VMM's `IP:PORT`.
        to: String,
        /// `PUT /vm/migrate` fields besides `to` (downtime, bandwidth...).
        #[serde(default)]
        options: Value,
    },
    /// The progress or outcome of this host's outgoing migration of `vm`
    /// (`GET /vm/migrate`, kept after the VMM is gone).
    MigrationStatus {
        /// The VM.
        vm: String,
    },
    /// Cancel this host's outgoing migration of `vm`.
    CancelMigration {
        /// The VM.
        vm: String,
    },
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Done; the result.
    Ok(Value),
    /// Refused or failed.
    Error(String),
    /// Ask this host instead.
    Redirect(String),
}

#[derive(Serialize, Deserialize)]
struct Nonce {
    nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    payload: String,
    mac: String,
}

fn signed_bytes(nonce: &str, payload: &str) -> Vec<u8> {
    format!("{nonce}\n{payload}").into_bytes()
}

/// Fresh random bytes as hex.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

/// Serves one connection: challenge, verify, hand the request to `handle`.
pub fn serve(
    stream: TcpStream,
    secret: &ClusterSecret,
    handle: impl FnOnce(Request) -> Reply,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let nonce = random_hex(16)?;
    let mut w = stream.try_clone()?;
    writeln!(
        w,
        "{}",
        serde_json::to_string(&Nonce {
            nonce: nonce.clone()
        })?
    )?;
    let mut line = String::new();
    BufReader::new(stream.take_limit()).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Signed>(&line) {
        Err(_) => Reply::Error("malformed request".into()),
        Ok(s) if !verify_hex(secret, &signed_bytes(&nonce, &s.payload), &s.mac) => {
            Reply::Error("request authentication failed (wrong cluster secret?)".into())
        }
        Ok(s) => match serde_json::from_str::<Request>(&s.payload) {
            Ok(r) => handle(r),
            Err(e) => Reply::Error(format!("unknown request: {e}")),
        },
    };
    writeln!(w, "{}", serde_json::to_string(&reply)?)?;
    Ok(())
}

trait TakeLimit {
    fn take_limit(self) -> std::io::Take<TcpStream>;
}

impl TakeLimit for TcpStream {
    /// Requests are small: a peer cannot make the agent buffer more.
    fn take_limit(self) -> std::io::Take<TcpStream> {
        std::io::Read::take(self, 64 * 1024)
    }
}

/// Sends one request to the agent at `addr`.
pub fn call(addr: SocketAddr, secret: &ClusterSecret, req: &Request) -> Result<Reply, String> {
    let io = |e: std::io::Error| format!("agent at {addr}: {e}");
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut r = BufReader::new(stream.try_clone().map_err(io)?);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let n: Nonce =
        serde_json::from_str(&line).map_err(|_| format!("agent at {addr}: bad greeting"))?;
    let payload = serde_json::to_string(req).map_err(|e| e.to_string())?;
    let mac = mac_hex(secret, &signed_bytes(&n.nonce, &payload));
    let mut w = stream;
    writeln!(
        w,
        "{}",
        serde_json::to_string(&Signed { payload, mac }).map_err(|e| e.to_string())?
    )
    .map_err(io)?;
    line.clear();
    r.read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line).map_err(|_| format!("agent at {addr}: bad answer {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn authenticated_round_trip_and_wrong_key() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let k = ClusterSecret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let k2 = k.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..2 {
                let (s, _) = l.accept().unwrap();
                serve(s, &k2, |r| Reply::Ok(serde_json::to_value(r).unwrap())).unwrap();
            }
        });
        let req = Request::Start {
            vm: "vm1".into(),
            host: None,
        };
        match call(addr, &k, &req).unwrap() {
            Reply::Ok(v) => assert_eq!(v["vm"], "vm1"),
            other => panic!("{other:?}"),
        }
        let rogue = ClusterSecret::new(b"not the cluster secret at all....".to_vec());
        match call(addr, &rogue, &req).unwrap() {
            Reply::Error(e) => assert!(e.contains("authentication failed"), "{e}"),
            other => panic!("{other:?}"),
        }
        t.join().unwrap();
    }
}
