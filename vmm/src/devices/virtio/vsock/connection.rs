//! One vsock stream between a guest port and a host endpoint, with the
//! credit accounting of both directions.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// Our receive buffer per connection, advertised as `buf_alloc`: the most
/// guest data we hold for a host socket that is not reading.
pub const OUR_BUF_ALLOC: u32 = 256 * 1024;
/// Most host data buffered for the guest per connection; beyond it the host
/// socket is not read until the guest has taken some.
pub const TO_GUEST_CAP: usize = 64 * 1024;

/// The host end.
#[derive(Debug)]
pub enum Backend {
    /// A unix stream to a host process.
    Unix(UnixStream),
    /// The VMM's tools endpoint (port 5252).
    Tools,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// One stream.
#[derive(Debug)]
pub struct Connection {
    /// Port on the guest side.
    pub guest_port: u32,
    /// Port on the host side (the guest's destination port, or the port the
    /// VMM allocated for a host-initiated connection).
    pub host_port: u32,
    /// The host end.
    pub backend: Backend,
    /// Life-cycle state.
    pub state: ConnState,
    /// Event-loop token of the host socket.
    pub token: u32,
    /// Guest bytes consumed by the host end (our `fwd_cnt`).
    pub fwd_cnt: u32,
    /// The `fwd_cnt` last reported to the guest.
    pub fwd_reported: u32,
    /// The guest's receive buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed of what we sent.
    pub peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    pub tx_cnt: u32,
    /// Host data waiting for rx buffers or guest credit.
    pub to_guest: VecDeque<u8>,
    /// Guest data the host socket has not taken yet.
    pub to_host: Vec<u8>,
    /// The host end closed its side.
    pub host_eof: bool,
    /// SHUTDOWN sent to the guest after host EOF.
    pub shutdown_sent: bool,
    /// Partial line for the tools endpoint.
    pub line: Vec<u8>,
}

impl Connection {
    /// A new connection in `state`.
    pub fn new(
        guest_port: u32,
        host_port: u32,
        backend: Backend,
        state: ConnState,
        token: u32,
    ) -> Self {
        Self {
            guest_port,
            host_port,
            backend,
            state,
            token,
            fwd_cnt: 0,
            fwd_reported: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            to_guest: VecDeque::new(),
            to_host: Vec::new(),
            host_eof: false,
            shutdown_sent: false,
            line: Vec::new(),
        }
    }

    /// How many bytes the guest has room for. A guest reporting nonsense
    /// (more consumed than sent) gets no extra credit.
    pub fn peer_credit(&self) -> u32 {
        let unacked = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(unacked)
    }

    /// The host socket, if any.
    pub fn fd(&self) -> Option<RawFd> {
        match &self.backend {
            Backend::Unix(s) => Some(s.as_raw_fd()),
            Backend::Tools => None,
        }
    }

    /// Whether the host socket should be read now.
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && self.to_guest.len() < TO_GUEST_CAP
    }

    /// Whether there is guest data waiting for the host socket.
    pub fn wants_write(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Writes what the host socket takes of `to_host`. Err means the host
    /// end is gone.
    pub fn flush_to_host(&mut self) -> std::io::Result<()> {
        let Backend::Unix(s) = &mut self.backend else {
            self.to_host.clear();
            return Ok(());
        };
        while !self.to_host.is_empty() {
            match s.write(&self.to_host) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads from the host socket into `to_guest` up to the cap. Err means
    /// the host end is broken; EOF sets `host_eof`.
    pub fn fill_from_host(&mut self) -> std::io::Result<()> {
        let Backend::Unix(s) = &mut self.backend else {
            return Ok(());
        };
        let mut buf = [0u8; 16 * 1024];
        while self.to_guest.len() < TO_GUEST_CAP {
            let room = (TO_GUEST_CAP - self.to_guest.len()).min(buf.len());
            match s.read(&mut buf[..room]) {
                Ok(0) => {
                    self.host_eof = true;
                    break;
                }
                Ok(n) => self.to_guest.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
