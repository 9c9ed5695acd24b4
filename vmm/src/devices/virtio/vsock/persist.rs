//! Saved state of the vsock device.
//!
//! Connections do not survive a snapshot or a migration: their host ends
//! are sockets of this process. What is saved is the CID, the socket path
//! and the list of open connections; on restore each of them is reset
//! (RST queued to the guest, sent as soon as the guest has rx buffers), so
//! guest applications see a reset connection and reconnect, as the tools
//! daemon does. Keeping connections would need the host ends to reconnect
//! through the VMM and the byte counters to be carried over: not done.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::connection::{Backend, ConnState, Connection};
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
    /// Open connections as (host port, guest port): reset on restore.
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
        for &(host_port, guest_port) in &s.connections {
            // A placeholder so reset() has something to reset.
            let c = Connection::new(
                guest_port,
                host_port,
                Backend::Tools,
                ConnState::Established,
                0,
            );
            v.conns.insert((host_port, guest_port), c);
        }
        v.reset_all();
        // The placeholders were not real tools connections.
        v.tools().set_connected(false);
        Ok(v)
    }
}
