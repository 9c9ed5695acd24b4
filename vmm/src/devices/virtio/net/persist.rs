//! Saved state of a NIC: its identity (MAC, logical network), the tap it
//! was attached to, and its counters. Restoring reopens the tap by name; a
//! migration target may pass another tap through the config.

use serde::{Deserialize, Serialize};

use super::device::{Net, NetCountersSnapshot};
use super::tap::Tap;
use super::NetError;
use crate::persist::Persist;

/// The NIC's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// MAC address.
    pub mac: [u8; 6],
    /// Logical network name.
    pub network: String,
    /// Tap name.
    pub tap: String,
    /// Counters, which continue across restore.
    pub counters: NetCountersSnapshot,
}

/// What restoring needs: the tap to use (None: reopen `state.tap`).
pub struct NetArgs {
    /// An already-open tap (tests, or a target host's own tap).
    pub tap: Option<Box<dyn super::device::FrameIo>>,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            network: self.network.clone(),
            tap: self.tap_name.clone(),
            counters: self.counters.snapshot(),
        }
    }

    fn restore(args: NetArgs, s: &NetState) -> Result<Self, NetError> {
        let io = match args.tap {
            Some(io) => io,
            None => Box::new(Tap::open(&s.tap)?),
        };
        let n = Net::new(s.mac, s.network.clone(), s.tap.clone(), io);
        n.counters.set(&s.counters);
        Ok(n)
    }
}
