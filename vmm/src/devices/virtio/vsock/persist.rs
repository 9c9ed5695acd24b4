//! Saved state of the vsock device.
//!
//! Connections do not survive a snapshot or a migration: their host ends
//! are sockets of this process. What is saved is the CID, the socket path
//! and the list of open connections (for the log); on restore the device
//! sends the guest a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue
//! (as soon as the guest has an event buffer there), so the guest resets
//! every connection at once and its applications reconnect, as the tools
//! daemon does. Keeping connections would need the host ends to reconnect
//! through the VMM and the byte counters to be carried over: not done.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::Vsock;
use super::VsockError;
use crate::persist::Persist;

/// The vsock device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub cid: u64,
    /// The host socket path.
    pub uds_path: PathBuf,
    /// Open connections as (host port, guest port): the guest is told to
    /// drop them on restore.
    pub connections: Vec<(u32, u32)>,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = ();
    type Error = VsockError;

    fn save(&self) -> VsockState {
        let mut connections: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        connections.sort_unstable();
        VsockState {
            cid: self.cid,
            uds_path: self.uds_path.clone(),
            connections,
        }
    }

    fn restore(_: (), s: &VsockState) -> Result<Self, VsockError> {
        let mut v = Vsock::new(s.cid, &s.uds_path)?;
        tracing::info!(
            cid = s.cid,
            connections = s.connections.len(),
            "vsock restored; the guest will be told to reset its connections"
        );
        // Also with no connection open: a guest socket may be half-way
        // through connecting, and the guest must re-read its CID anyway.
        v.transport_reset_pending = true;
        Ok(v)
    }
}
