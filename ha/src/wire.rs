//! Agent-to-agent messages and their authentication (H15).
//!
//! # Wire format
//! One datagram (or one length-prefixed frame on a stream) is one
//! [`Envelope`], serialised as JSON:
//!
//! ```text
//! {"payload":"{\"sender\":\"host-a\",\"seq\":4294967297,\"body\":{\"heartbeat\":{...}}}",
//!  "mac":"<64 hex digits>"}
//! ```
//!
//! `payload` is the JSON text of a [`Signed`] (sender, sequence number, body)
//! carried as a string, and `mac` is HMAC-SHA256 over exactly those bytes with
//! the cluster secret. MACing the bytes as sent avoids any canonical-JSON
//! question: the receiver verifies the MAC (in constant time) *before* parsing
//! the payload, so a peer without the key cannot even reach the parser with
//! chosen input beyond the outer object.
//!
//! `seq` is `incarnation << 32 | counter`: the incarnation is given to the
//! agent at start and must grow across restarts (a persisted counter, or
//! the wall-clock second of the start), so a restarted agent's first message
//! is still newer than everything it sent before. Receivers keep the last
//! `seq` per sender and drop anything not greater (replay protection).
//!
//! With one shared cluster secret, any host holding it can claim any sender
//! name; the secret is what separates the cluster from rogues. Encryption of
//! the channel (H15's second half) belongs to the transport, not to this
//! module.

use crate::types::{DatastoreId, HostId, VmConfig, VmId};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// The cluster's shared secret. Its `Debug` never shows the bytes, so it can
/// sit in structs that get logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

impl ClusterSecret {
    /// Wraps secret bytes (read from a root-only file, never the command line).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret([redacted])")
    }
}

/// A host's role as it announces it in heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Looking for a master, or competing.
    Candidate,
    /// The master of its partition.
    Master,
    /// A slave (of `Heartbeat::master`).
    Slave,
    /// In maintenance: takes no part in election or placement.
    Maintenance,
    /// HA disabled on this host: its VMs are not protected.
    Disabled,
}

/// Power state of a VM as a slave reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Running.
    On,
    /// Being started (waiting for its lease, booting).
    Starting,
    /// Powered off by the user: unprotected.
    OffByUser,
    /// Powered off by the isolation response: released for restart.
    OffByIsolation,
    /// Stopped by HA because its lease could not be renewed in time (storage
    /// lost): restart it where the datastore is reachable.
    OffByHa,
    /// Stopped because another host holds its lease: this was a stale copy,
    /// the VM runs elsewhere; never a reason to restart.
    Stale,
    /// Crashed: still protected, restart wanted.
    Crashed,
}

/// The body of an agent message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// Sent by every agent every heartbeat interval to every peer. Doubles as
    /// the election message: `datastores` is the sender's claim.
    Heartbeat {
        /// The sender's role.
        role: Role,
        /// Number of datastores the sender mounts (election rule 1).
        datastores: u32,
        /// The master the sender follows (itself if master).
        master: Option<HostId>,
    },
    /// Slave to master: the power state of its VMs (full list, so a lost
    /// message is repaired by the next one).
    VmStates {
        /// Every VM the slave knows about.
        vms: BTreeMap<VmId, PowerState>,
    },
    /// Master to slave: start this VM (after its host failed).
    RestartOrder {
        /// The VM to start.
        vm: VmConfig,
    },
    /// Slave to master: a restart order failed.
    RestartFailed {
        /// The VM.
        vm: VmId,
        /// Why (from the VMM or the lease).
        reason: String,
    },
    /// Slave to master: the datastores this host mounts but cannot reach
    /// now (full set; empty when all are back). Sent on change and with
    /// every heartbeat while non-empty or recently changed.
    DatastoreAccess {
        /// The unreachable datastores.
        lost: BTreeSet<DatastoreId>,
    },
    /// Master to slave: stop this VM, its datastore is lost here and
    /// reachable elsewhere (datastore-loss protection, response "restart").
    DatastoreLossStop {
        /// The VM.
        vm: VmId,
        /// The lost datastore.
        datastore: DatastoreId,
    },
}

/// What the MAC covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The sending host.
    pub sender: HostId,
    /// Per-sender, strictly increasing.
    pub seq: u64,
    /// The message.
    pub body: Body,
}

/// What goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// JSON of a [`Signed`], as the exact bytes the MAC covers.
    pub payload: String,
    /// Lower-case hex HMAC-SHA256 of `payload`.
    pub mac: String,
}

/// Why an incoming message was dropped.
#[derive(Debug, Error)]
pub enum WireError {
    /// Not an envelope at all.
    #[error("malformed message envelope")]
    Malformed(#[source] serde_json::Error),
    /// The MAC does not verify: wrong key, or tampered.
    #[error("message authentication failed (wrong cluster secret or tampered message)")]
    BadMac,
    /// MAC fine but the payload does not parse: a version mismatch.
    #[error("authenticated payload does not parse: agent versions differ?")]
    BadPayload(#[source] serde_json::Error),
    /// Sender unknown to this cluster.
    #[error("message from {0}, which is not a member of this cluster")]
    UnknownSender(HostId),
    /// Replay, or reordering of an older message.
    #[error("replayed or stale message from {sender}: seq {seq} <= last seen {last}")]
    Replay {
        /// The sender.
        sender: HostId,
        /// The message's seq.
        seq: u64,
        /// The last accepted seq.
        last: u64,
    },
    /// Serialising our own message failed (cannot happen with these types).
    #[error("cannot encode message")]
    Encode(#[source] serde_json::Error),
}

fn mac_for(secret: &ClusterSecret) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(&secret.0).expect("HMAC takes any key length")
}

/// Signs and encodes one message.
pub fn seal(secret: &ClusterSecret, signed: &Signed) -> Result<Vec<u8>, WireError> {
    let payload = serde_json::to_string(signed).map_err(WireError::Encode)?;
    let mut mac = mac_for(secret);
    mac.update(payload.as_bytes());
    let tag = hex::encode(mac.finalize().into_bytes());
    serde_json::to_vec(&Envelope { payload, mac: tag }).map_err(WireError::Encode)
}

/// Verifies the MAC (constant time) and decodes; does not check replay.
pub fn open(secret: &ClusterSecret, bytes: &[u8]) -> Result<Signed, WireError> {
    let env: Envelope = serde_json::from_slice(bytes).map_err(WireError::Malformed)?;
    let tag = hex::decode(&env.mac).map_err(|_| WireError::BadMac)?;
    let mut mac = mac_for(secret);
    mac.update(env.payload.as_bytes());
    mac.verify_slice(&tag).map_err(|_| WireError::BadMac)?;
    serde_json::from_str(&env.payload).map_err(WireError::BadPayload)
}

/// HMAC-SHA256 of `data` with the cluster secret, as lower-case hex (the
/// runtime's command channel signs challenge + request with it).
pub fn mac_hex(secret: &ClusterSecret, data: &[u8]) -> String {
    let mut mac = mac_for(secret);
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// Verifies (in constant time) a [`mac_hex`] tag.
pub fn verify_hex(secret: &ClusterSecret, data: &[u8], tag: &str) -> bool {
    let Ok(tag) = hex::decode(tag) else {
        return false;
    };
    let mut mac = mac_for(secret);
    mac.update(data);
    mac.verify_slice(&tag).is_ok()
}

/// Per-sender replay protection.
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    last: BTreeMap<HostId, u64>,
}

impl ReplayGuard {
    /// Accepts `seq` from `sender` only if greater than the last accepted one.
    pub fn accept(&mut self, sender: &HostId, seq: u64) -> Result<(), WireError> {
        match self.last.get(sender) {
            Some(&last) if seq <= last => Err(WireError::Replay {
                sender: sender.clone(),
                seq,
                last,
            }),
            _ => {
                self.last.insert(sender.clone(), seq);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Signed {
        Signed {
            sender: "host-a".into(),
            seq: 1 << 32 | 1,
            body: Body::Heartbeat {
                role: Role::Master,
                datastores: 2,
                master: Some("host-a".into()),
            },
        }
    }

    #[test]
    fn roundtrip_and_documented_shape() {
        let k = ClusterSecret::new(b"k".to_vec());
        let bytes = seal(&k, &hb()).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("{\"payload\":\"{\\\"sender\\\":\\\"host-a\\\",\\\"seq\\\":4294967297,\\\"body\\\":{\\\"heartbeat\\\":"), "{text}");
        assert_eq!(open(&k, &bytes).unwrap(), hb());
    }

    #[test]
    fn wrong_key_and_tampering_rejected() {
        let bytes = seal(&ClusterSecret::new(b"rogue".to_vec()), &hb()).unwrap();
        assert!(matches!(
            open(&ClusterSecret::new(b"k".to_vec()), &bytes),
            Err(WireError::BadMac)
        ));
        let k = ClusterSecret::new(b"k".to_vec());
        let good = String::from_utf8(seal(&k, &hb()).unwrap()).unwrap();
        let tampered = good.replace("\\\"datastores\\\":2", "\\\"datastores\\\":9");
        assert_ne!(good, tampered);
        assert!(matches!(
            open(&k, tampered.as_bytes()),
            Err(WireError::BadMac)
        ));
        assert!(matches!(open(&k, b"garbage"), Err(WireError::Malformed(_))));
    }

    #[test]
    fn replay_guard() {
        let mut g = ReplayGuard::default();
        let a = HostId::new("a");
        g.accept(&a, 5).unwrap();
        assert!(g.accept(&a, 5).is_err());
        assert!(g.accept(&a, 4).is_err());
        g.accept(&a, 6).unwrap();
        g.accept(&"b".into(), 1).unwrap();
    }

    #[test]
    fn secret_is_redacted() {
        let k = ClusterSecret::new(b"hunter2".to_vec());
        assert_eq!(format!("{k:?}"), "ClusterSecret([redacted])");
    }
}
