//! virtio-vsock with its host side on unix sockets (Firecracker's
//! convention), plus the VMM's own endpoint for the guest tools.
//!
//! - Guest -> host: a guest connection to host CID 2, port P is forwarded to
//!   the unix socket `PATH_P`, where a host process listens.
//! - Host -> guest: a host process connects to `PATH`, writes `CONNECT P\n`;
//!   the VMM answers `OK <hostport>\n` once the guest accepted, then bridges
//!   the stream to guest port P.
//! - Port [`TOOLS_PORT`] (5252) is served inside the VMM ([`tools`]): the
//!   guest tools daemon's heartbeats land in a shared [`ToolsStatus`] that
//!   the control API reads, and `request_guest_shutdown` goes the other way.
//!
//! Files: [`packet`] (the header), [`connection`] (one stream and its
//! credit accounting), [`device`] (the device model: queues <-> connections),
//! [`event_handler`] (queue and socket events), [`persist`], [`tools`].
//!
//! Flow control is virtio-vsock's credit scheme: every packet carries the
//! sender's buffer size (`buf_alloc`) and how much it has consumed
//! (`fwd_cnt`); nobody sends more than the peer has room for. Host sockets
//! that cannot be read for lack of credit or rx buffers are taken off the
//! event loop until there is room again, so the loop never spins.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod packet;
pub mod persist;
pub mod tools;

#[cfg(test)]
mod tests;

pub use device::Vsock;
pub use tools::{AppHeartbeat, ToolsError, ToolsSnapshot, ToolsStatus};

/// virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The port the guest tools daemon connects to, served by the VMM itself.
pub const TOOLS_PORT: u32 = 5252;
/// Queue indices.
pub const RX: usize = 0;
/// Transmit queue.
pub const TX: usize = 1;
/// Event queue (transport reset events after a restore or migration).
pub const EVT: usize = 2;
/// The event id telling the guest its transport was reset.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Errors setting up the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved.
    #[error("vsock cid {0} is reserved: use 3 or more")]
    BadCid(u64),
    /// The host socket cannot be created.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create the tools eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}
