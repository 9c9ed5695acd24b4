//! The byte stream a migration runs over: plain TCP today; TLS (M11) plugs
//! in as another [`Channel`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// A bidirectional stream with read timeouts (so readers can poll for
/// cancellation) and a way to cut it.
pub trait Channel: Read + Write + Send {
    /// Sets how long a read may block; `None` blocks forever.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Closes both directions; the peer sees end of stream.
    fn shutdown(&mut self);
}

impl Channel for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn shutdown(&mut self) {
        // Already closed is fine: we only want it closed.
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }
}

/// Prepares a TCP stream for migration traffic: no Nagle delay on the
/// small control frames.
pub fn tune_tcp(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}
