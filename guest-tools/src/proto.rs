//! The tools channel: a line protocol between `vigil-tools daemon` in the
//! guest and the VMM on the host. PROTOCOL.md is the same text for readers
//! who do not read Rust.
//!
//! Transport: a stream socket. In a guest, AF_VSOCK to the host
//! ([`HOST_CID`] = 2) on port [`VSOCK_PORT`]; the guest connects, the host
//! listens. For tests on the host, a unix stream socket (`--connect
//! unix:PATH`). Lines are ASCII, end with `\n` (a `\r` before it is
//! ignored), and are at most [`MAX_LINE`] bytes including the newline.
//!
//! ```text
//!   guest (vigil-tools daemon)                    host (VMM)
//!     | connect vsock 2:5252 ------------------------> |
//!     | HELLO vigil-tools <version> <boot_id> -------> |  once per connection
//!     | HB <seq> <uptime_ms> ------------------------> |  every second (G1)
//!     | APP <name> <seq> ----------------------------> |  per app heartbeat (G2)
//!     | <------------------------------------- PING    |
//!     | PONG ----------------------------------------> |
//!     | <--------------------------------- SHUTDOWN    |  (G3)
//!     | ACK SHUTDOWN --------------------------------> |  then sync, SIGTERM,
//!     |                                                |  power off
//!     | <------------------------------------ other    |
//!     | ERR unknown-command -------------------------> |
//! ```
//!
//! - `<boot_id>`: the guest kernel's random boot id
//!   (/proc/sys/kernel/random/boot_id), `-` if unreadable. A new boot id
//!   means the guest rebooted; the same one after a reconnect means the
//!   connection dropped (migration, snapshot restore) but the guest did not.
//! - `<seq>` of `HB` starts at 1 and grows by one per heartbeat for the life
//!   of the daemon, across reconnects: a jump tells the host how many
//!   heartbeats were not delivered. `<uptime_ms>` is CLOCK_BOOTTIME.
//! - `APP <name> <seq>`: application `<name>` (1-32 of `A-Za-z0-9._-`)
//!   heartbeated; `<seq>` counts that name's heartbeats since the daemon
//!   started (from 1). Heartbeats that arrive while disconnected are
//!   dropped, not queued: liveness is judged by recency.
//! - The daemon reconnects after the connection drops (read end, reset, or
//!   [`STALL_LIMIT`] heartbeats in a row that could not be sent), after
//!   250 ms, then doubling to at most 5 s between attempts.
//!
//! Applications reach the daemon with a datagram `HB <name>` (optionally
//! `\n`-terminated) sent to the unix datagram socket [`APP_SOCKET`] (an
//! abstract name), or with `vigil-tools app-heartbeat --name <name>`.

/// vsock CID of the host (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;
/// vsock port the host listens on for the tools channel.
pub const VSOCK_PORT: u32 = 5252;
/// Longest line either side sends, newline included.
pub const MAX_LINE: usize = 128;
/// Heartbeats in a row that could not be sent (no vsock credit, buffer
/// full) before the daemon drops the connection and reconnects.
pub const STALL_LIMIT: u32 = 5;
/// First reconnect delay, doubled after each failure up to [`BACKOFF_MAX_MS`].
pub const BACKOFF_MIN_MS: u64 = 250;
/// Longest delay between two connection attempts.
pub const BACKOFF_MAX_MS: u64 = 5000;
/// Abstract unix datagram socket of application heartbeats
/// (`@vigil-tools.app`; a leading `@` stands for the abstract namespace).
pub const APP_SOCKET: &str = "@vigil-tools.app";
/// Longest application name.
pub const MAX_APP_NAME: usize = 32;
/// Distinct application names the daemon counts heartbeats for.
pub const MAX_APPS: usize = 16;

use crate::text::Line;

/// A command from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCmd {
    /// `PING`: answer `PONG`.
    Ping,
    /// `SHUTDOWN`: answer `ACK SHUTDOWN`, then power the guest off.
    Shutdown,
    /// Anything else: answer `ERR unknown-command`.
    Unknown,
}

/// Parses one line from the host (without its `\n`).
pub fn parse_host(line: &[u8]) -> HostCmd {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line {
        b"PING" => HostCmd::Ping,
        b"SHUTDOWN" => HostCmd::Shutdown,
        _ => HostCmd::Unknown,
    }
}

/// `HELLO vigil-tools <version> <boot_id>`.
pub fn hello(boot_id: &[u8]) -> Line {
    let mut l = Line::new();
    l.s("HELLO vigil-tools ").s(crate::VERSION).s(" ");
    if boot_id.is_empty() {
        l.s("-");
    } else {
        l.printable(boot_id);
    }
    l.nl();
    l
}

/// `HB <seq> <uptime_ms>`.
pub fn heartbeat(seq: u64, uptime_ms: u64) -> Line {
    let mut l = Line::new();
    l.s("HB ").u(seq).s(" ").u(uptime_ms).nl();
    l
}

/// `APP <name> <seq>`; `name` must have passed [`valid_app_name`].
pub fn app(name: &[u8], seq: u64) -> Line {
    let mut l = Line::new();
    l.s("APP ").b(name).s(" ").u(seq).nl();
    l
}

/// `PONG`.
pub const PONG: &[u8] = b"PONG\n";
/// `ACK SHUTDOWN`.
pub const ACK_SHUTDOWN: &[u8] = b"ACK SHUTDOWN\n";
/// The answer to an unknown or over-long line.
pub const ERR_UNKNOWN: &[u8] = b"ERR unknown-command\n";

/// Whether `name` may be used as an application name.
pub fn valid_app_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_APP_NAME
        && name
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
}

/// Parses an application datagram `HB <name>[\n]`; returns the name.
pub fn parse_app_datagram(d: &[u8]) -> Option<&[u8]> {
    let d = d.strip_suffix(b"\n").unwrap_or(d);
    let name = d.strip_prefix(b"HB ")?;
    valid_app_name(name).then_some(name)
}

/// The per-name heartbeat counters of the daemon (fixed size, no allocator).
pub struct AppTable {
    names: [[u8; MAX_APP_NAME]; MAX_APPS],
    lens: [u8; MAX_APPS],
    seqs: [u64; MAX_APPS],
    used: usize,
}

impl Default for AppTable {
    fn default() -> Self {
        Self::new()
    }
}

impl AppTable {
    /// An empty table.
    pub const fn new() -> Self {
        AppTable {
            names: [[0; MAX_APP_NAME]; MAX_APPS],
            lens: [0; MAX_APPS],
            seqs: [0; MAX_APPS],
            used: 0,
        }
    }

    /// Counts one heartbeat of `name` and returns its sequence number, or
    /// `None` if the table is full (or the name invalid).
    pub fn beat(&mut self, name: &[u8]) -> Option<u64> {
        if !valid_app_name(name) {
            return None;
        }
        let i = match (0..self.used).find(|&i| &self.names[i][..self.lens[i] as usize] == name) {
            Some(i) => i,
            None if self.used < MAX_APPS => {
                let i = self.used;
                self.names[i][..name.len()].copy_from_slice(name);
                self.lens[i] = name.len() as u8;
                self.used += 1;
                i
            }
            None => return None,
        };
        self.seqs[i] += 1;
        Some(self.seqs[i])
    }
}

/// What [`LineReader::feed`] hands out.
#[derive(Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// A complete line, without its `\n`.
    Line(&'a [u8]),
    /// A line longer than [`MAX_LINE`] was discarded.
    TooLong,
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
pub struct LineReader {
    buf: [u8; MAX_LINE],
    len: usize,
    discarding: bool,
}

impl Default for LineReader {
    fn default() -> Self {
        Self::new()
    }
}

impl LineReader {
    /// An empty reader.
    pub const fn new() -> Self {
        LineReader {
            buf: [0; MAX_LINE],
            len: 0,
            discarding: false,
        }
    }

    /// Consumes `data`, calling `f` for each complete line; a partial line
    /// is kept for the next call.
    pub fn feed(&mut self, data: &[u8], mut f: impl FnMut(Input<'_>)) {
        for &c in data {
            if c == b'\n' {
                if self.discarding {
                    self.discarding = false;
                    f(Input::TooLong);
                } else {
                    f(Input::Line(&self.buf[..self.len]));
                }
                self.len = 0;
            } else if self.discarding {
            } else if self.len + 1 < MAX_LINE {
                self.buf[self.len] = c;
                self.len += 1;
            } else {
                self.discarding = true;
                self.len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_messages() {
        assert_eq!(
            hello(b"0f3c-11").as_bytes(),
            format!("HELLO vigil-tools {} 0f3c-11\n", crate::VERSION).as_bytes()
        );
        assert!(hello(b"").as_bytes().ends_with(b" -\n"));
        assert_eq!(heartbeat(7, 12345).as_bytes(), b"HB 7 12345\n");
        assert_eq!(app(b"db", 3).as_bytes(), b"APP db 3\n");
        assert!(hello(&[b'a'; 36]).len() <= MAX_LINE);
    }

    #[test]
    fn host_commands() {
        assert_eq!(parse_host(b"PING"), HostCmd::Ping);
        assert_eq!(parse_host(b"SHUTDOWN\r"), HostCmd::Shutdown);
        assert_eq!(parse_host(b"shutdown"), HostCmd::Unknown);
        assert_eq!(parse_host(b"SHUTDOWN now"), HostCmd::Unknown);
        assert_eq!(parse_host(b""), HostCmd::Unknown);
    }

    #[test]
    fn line_reader_splits_and_keeps_partial_lines() {
        let mut r = LineReader::new();
        let mut got = Vec::new();
        r.feed(b"PI", |i| got.push(format!("{i:?}")));
        assert!(got.is_empty());
        r.feed(b"NG\nSHUT", |i| got.push(format!("{i:?}")));
        r.feed(b"DOWN\n", |i| got.push(format!("{i:?}")));
        assert_eq!(
            got,
            vec![
                format!("{:?}", Input::Line(b"PING")),
                format!("{:?}", Input::Line(b"SHUTDOWN"))
            ]
        );
    }

    #[test]
    fn line_reader_discards_overlong_lines() {
        let mut r = LineReader::new();
        let mut got = Vec::new();
        let long = vec![b'x'; 300];
        r.feed(&long, |i| got.push(format!("{i:?}")));
        r.feed(b"\nPING\n", |i| got.push(format!("{i:?}")));
        assert_eq!(
            got,
            vec![
                format!("{:?}", Input::TooLong),
                format!("{:?}", Input::Line(b"PING"))
            ]
        );
    }

    #[test]
    fn app_datagrams() {
        assert_eq!(parse_app_datagram(b"HB web\n"), Some(&b"web"[..]));
        assert_eq!(parse_app_datagram(b"HB db-1.x_y"), Some(&b"db-1.x_y"[..]));
        assert_eq!(parse_app_datagram(b"HB "), None);
        assert_eq!(parse_app_datagram(b"HB a b"), None);
        assert_eq!(parse_app_datagram(&[b'H', b'B', b' ', 0xff]), None);
        assert_eq!(parse_app_datagram(b"HELLO"), None);
        let long = [b'a'; MAX_APP_NAME + 1];
        assert!(!valid_app_name(&long));
        assert!(valid_app_name(&long[..MAX_APP_NAME]));
    }

    #[test]
    fn app_table_counts_per_name_and_fills_up() {
        let mut t = AppTable::new();
        assert_eq!(t.beat(b"a"), Some(1));
        assert_eq!(t.beat(b"b"), Some(1));
        assert_eq!(t.beat(b"a"), Some(2));
        for i in 0..MAX_APPS - 2 {
            assert_eq!(t.beat(format!("n{i}").as_bytes()), Some(1));
        }
        assert_eq!(t.beat(b"one-too-many"), None);
        assert_eq!(t.beat(b"a"), Some(3));
        assert_eq!(t.beat(b"bad name"), None);
    }
}
