//! `daemon`: the tools daemon (G1-G3) and `app-heartbeat`, its client for
//! applications. The wire protocol is in `vigil_tools::proto` and
//! PROTOCOL.md. One thread, one poll loop: the host connection, the
//! application datagram socket and two deadlines (next heartbeat, next
//! connection attempt).
//!
//! Console markers: `VIGIL-TOOLS-UP <version>` at start,
//! `VIGIL-TOOLS-CONNECTED` on each (re)connection, `VIGIL-TOOLS-SHUTDOWN`
//! (or `VIGIL-TOOLS-SHUTDOWN dry-run`) when the host asks to power off.

use crate::rt::{self, Args};
use crate::sys::{self, Errno, PollFd};
use vigil_tools::addr::{parse_endpoint, Endpoint, SockAddr, AF_UNIX, AF_VSOCK};
use vigil_tools::args::parse_u64;
use vigil_tools::proto::{self, HostCmd, Input, LineReader};
use vigil_tools::text::Line;

struct Opts<'a> {
    endpoint: Endpoint<'a>,
    app_socket: &'a [u8],
    interval_ms: u64,
    dry_run: bool,
}

/// Parses the daemon's options; the error is the message to print.
#[allow(clippy::result_large_err)] // once, at start-up, on the stack
fn parse_opts(args: Args) -> Result<Opts<'static>, Line> {
    let mut o = Opts {
        endpoint: Endpoint::Vsock {
            cid: proto::HOST_CID,
            port: proto::VSOCK_PORT,
        },
        app_socket: proto::APP_SOCKET.as_bytes(),
        interval_ms: 1000,
        dry_run: false,
    };
    let mut i = 2;
    while let Some(a) = args.get(i) {
        let val = args.get(i + 1);
        let mut err = Line::new();
        match (a, val) {
            (b"--dry-run-poweroff", _) => {
                o.dry_run = true;
                i += 1;
                continue;
            }
            (b"--connect", Some(v)) => match parse_endpoint(v) {
                Some(e) => o.endpoint = e,
                None => {
                    err.s("bad --connect '").printable(v).s("'");
                    return Err(err);
                }
            },
            (b"--app-socket", Some(v)) if SockAddr::unix(v).is_some() => o.app_socket = v,
            (b"--interval-ms", Some(v)) if parse_u64(v).is_some_and(|n| n > 0) => {
                o.interval_ms = parse_u64(v).unwrap_or(1000)
            }
            _ => {
                err.s("bad option '").printable(a).s("'");
                return Err(err);
            }
        }
        i += 2;
    }
    Ok(o)
}

/// The connection to the host and what we know about it.
struct Conn {
    fd: i32,
    lines: LineReader,
    /// Heartbeats in a row that could not be sent.
    stalled: u32,
}

fn connect(ep: &Endpoint<'_>) -> Result<i32, Errno> {
    let (family, addr) = match *ep {
        Endpoint::Vsock { cid, port } => (AF_VSOCK, SockAddr::vsock(cid, port)),
        Endpoint::Unix(path) => (AF_UNIX, SockAddr::unix(path).ok_or(Errno(22))?),
    };
    let fd = sys::socket(family, sys::SOCK_STREAM)?;
    match sys::connect(fd, addr.as_bytes()) {
        Ok(_) => Ok(fd),
        Err(e) => {
            sys::close(fd);
            Err(e)
        }
    }
}

/// Sends one whole line without blocking; an error means the connection is
/// unusable (a partial line would corrupt the stream).
fn send_line(c: &mut Conn, line: &[u8]) -> Result<(), Errno> {
    let mut rest = line;
    let mut tries = 0;
    while !rest.is_empty() {
        match sys::sendto(c.fd, rest, sys::MSG_DONTWAIT | sys::MSG_NOSIGNAL, &[]) {
            Ok(n) => rest = &rest[n..],
            Err(Errno(sys::EINTR)) => {}
            Err(Errno(sys::EAGAIN)) if rest.len() == line.len() => return Err(Errno(sys::EAGAIN)),
            Err(Errno(sys::EAGAIN)) if tries < 100 => {
                tries += 1;
                sys::sleep_ns(10_000_000);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Powers the guest off as the host asked (G3).
fn shutdown(opts: &Opts<'_>) -> ! {
    // Never power off the machine we run on when driven through a unix
    // socket: that is the daemon running on a host, under test.
    power_off_guest(opts.dry_run || matches!(opts.endpoint, Endpoint::Unix(_)))
}

/// The clean power-off: sync, SIGTERM to every process, a grace period,
/// SIGKILL, sync, power off. With `dry`, only the console line and exit 0.
pub fn power_off_guest(dry: bool) -> ! {
    let mut l = Line::new();
    l.s("VIGIL-TOOLS-SHUTDOWN");
    if dry {
        l.s(" dry-run");
    }
    rt::out(l.nl());
    if dry {
        sys::exit(0);
    }
    sys::sync();
    // -1: every process but init and ourselves.
    let _ = sys::kill(-1, sys::SIGTERM);
    sys::sleep_ns(2_000_000_000);
    let _ = sys::kill(-1, sys::SIGKILL);
    sys::sync();
    let e = sys::power_off().err().unwrap_or(Errno(0));
    rt::warn_errno("power off failed", e);
    sys::exit(1)
}

/// Handles what the host sent; returns false if the connection must go.
fn on_host_input(c: &mut Conn, opts: &Opts<'_>) -> bool {
    let mut buf = [0u8; 512];
    let n = match sys::recvfrom(c.fd, &mut buf, sys::MSG_DONTWAIT, &mut []) {
        Ok((0, _)) => return false,
        Ok((n, _)) => n,
        Err(Errno(sys::EAGAIN)) | Err(Errno(sys::EINTR)) => return true,
        Err(_) => return false,
    };
    let mut cmds = [HostCmd::Unknown; 64];
    let mut ncmds = 0;
    c.lines.feed(&buf[..n], |input| {
        let cmd = match input {
            Input::Line(l) => proto::parse_host(l),
            Input::TooLong => HostCmd::Unknown,
        };
        if ncmds < cmds.len() {
            cmds[ncmds] = cmd;
            ncmds += 1;
        }
    });
    for cmd in &cmds[..ncmds] {
        let reply = match cmd {
            HostCmd::Ping => proto::PONG,
            HostCmd::Shutdown => proto::ACK_SHUTDOWN,
            HostCmd::Unknown => proto::ERR_UNKNOWN,
        };
        if send_line(c, reply).is_err() {
            return false;
        }
        if *cmd == HostCmd::Shutdown {
            shutdown(opts);
        }
    }
    true
}

/// Opens the application heartbeat socket, or -1 (the daemon still
/// heartbeats for the guest without it).
fn open_app_socket(path: &[u8]) -> i32 {
    let Some(addr) = SockAddr::unix(path) else {
        return -1;
    };
    let fd = match sys::socket(AF_UNIX, sys::SOCK_DGRAM | sys::SOCK_NONBLOCK) {
        Ok(fd) => fd,
        Err(e) => {
            rt::warn_errno("app socket", e);
            return -1;
        }
    };
    if let Err(e) = sys::bind(fd, addr.as_bytes()) {
        rt::warn_errno("app socket bind", e);
        sys::close(fd);
        return -1;
    }
    fd
}

pub fn run(args: Args) -> i32 {
    let opts = match parse_opts(args) {
        Ok(o) => o,
        Err(l) => {
            rt::warn(&l);
            return 2;
        }
    };
    sys::ignore_sigpipe();
    let mut idbuf = [0u8; 64];
    let hello = proto::hello(crate::boot_id(&mut idbuf));
    let app_fd = open_app_socket(opts.app_socket);
    let mut apps = proto::AppTable::new();

    let mut l = Line::new();
    l.s("VIGIL-TOOLS-UP ").s(vigil_tools::VERSION).nl();
    rt::out(&l);

    let mut conn: Option<Conn> = None;
    let mut backoff = proto::BACKOFF_MIN_MS;
    let mut next_connect = 0u64;
    let mut next_hb = 0u64;
    let mut hb_seq = 0u64;
    loop {
        let now = sys::now_ms();
        if conn.is_none() && now >= next_connect {
            if let Ok(fd) = connect(&opts.endpoint) {
                let mut c = Conn {
                    fd,
                    lines: LineReader::new(),
                    stalled: 0,
                };
                if send_line(&mut c, hello.as_bytes()).is_ok() {
                    rt::out(Line::new().s("VIGIL-TOOLS-CONNECTED").nl());
                    backoff = proto::BACKOFF_MIN_MS;
                    next_hb = now;
                    conn = Some(c);
                } else {
                    sys::close(fd);
                }
            }
            if conn.is_none() {
                next_connect = now + backoff;
                backoff = (backoff * 2).min(proto::BACKOFF_MAX_MS);
            }
        }
        if let Some(c) = conn.as_mut() {
            if now >= next_hb {
                hb_seq += 1;
                let up = sys::clock_ns(sys::CLOCK_BOOTTIME) / 1_000_000;
                match send_line(c, proto::heartbeat(hb_seq, up).as_bytes()) {
                    Ok(()) => c.stalled = 0,
                    Err(Errno(sys::EAGAIN)) => c.stalled += 1,
                    Err(_) => c.stalled = u32::MAX,
                }
                next_hb = next_hb.saturating_add(opts.interval_ms).max(now + 1);
                if c.stalled >= proto::STALL_LIMIT {
                    drop_conn(&mut conn, &mut next_connect, now);
                }
            }
        }

        let deadline = if conn.is_some() {
            next_hb
        } else {
            next_connect
        };
        let timeout = deadline.saturating_sub(sys::now_ms()).min(60_000) as i32;
        let mut fds = [
            PollFd {
                fd: conn.as_ref().map_or(-1, |c| c.fd),
                events: sys::POLLIN,
                revents: 0,
            },
            PollFd {
                fd: app_fd,
                events: sys::POLLIN,
                revents: 0,
            },
        ];
        if sys::poll(&mut fds, timeout).is_err() {
            continue;
        }
        if fds[0].revents != 0 {
            let keep = conn.as_mut().is_some_and(|c| on_host_input(c, &opts));
            if !keep {
                drop_conn(&mut conn, &mut next_connect, sys::now_ms());
            }
        }
        if fds[1].revents != 0 {
            relay_app_heartbeats(app_fd, &mut apps, &mut conn);
        }
    }
}

fn drop_conn(conn: &mut Option<Conn>, next_connect: &mut u64, now: u64) {
    if let Some(c) = conn.take() {
        sys::close(c.fd);
    }
    *next_connect = now + proto::BACKOFF_MIN_MS;
}

fn relay_app_heartbeats(fd: i32, apps: &mut proto::AppTable, conn: &mut Option<Conn>) {
    let mut buf = [0u8; 128];
    // At most a few per wake-up, so a flood cannot starve the host link.
    for _ in 0..64 {
        let n = match sys::recvfrom(fd, &mut buf, sys::MSG_DONTWAIT, &mut []) {
            Ok((n, _)) => n,
            Err(_) => return,
        };
        let Some(name) = proto::parse_app_datagram(&buf[..n]) else {
            continue;
        };
        let Some(seq) = apps.beat(name) else {
            continue;
        };
        if let Some(c) = conn.as_mut() {
            let line = proto::app(name, seq);
            if let Err(e) = send_line(c, line.as_bytes()) {
                if e != Errno(sys::EAGAIN) {
                    let mut nc = 0;
                    drop_conn(conn, &mut nc, 0);
                    return;
                }
            }
        }
    }
}

/// `app-heartbeat`: sends `HB <name>` to the daemon, once or every few
/// seconds. Exits 1 if the daemon is not there. As a workload (one
/// key=value list) it beats every `every` seconds (default 1), `count`
/// times (default 0: forever), waits for the daemon's socket at start, and
/// prints `VIGIL-APP-HEARTBEAT-DONE sent=N` when it stops beating.
pub fn app_heartbeat(args: Args) -> i32 {
    let mut name: &[u8] = b"app";
    let mut socket: &[u8] = proto::APP_SOCKET.as_bytes();
    let mut every = 0u64;
    let mut count = 1u64;
    let mut i = 2;
    // As a workload (`vigil.run=app-heartbeat:name=web,every=2,count=10`)
    // the options come as one key=value list.
    let workload = args.get(2).is_some_and(|a| !a.starts_with(b"--"));
    if let Some(list) = args.get(2).filter(|_| workload) {
        count = 0;
        for (k, v) in vigil_tools::args::KeyValues::new(list) {
            match (k, parse_u64(v)) {
                (b"name", _) if proto::valid_app_name(v) => name = v,
                (b"socket", _) if SockAddr::unix(v).is_some() => socket = v,
                (b"every", Some(n)) => every = n,
                (b"count", Some(n)) => count = n,
                _ => return crate::bad_option("app-heartbeat", k, v),
            }
        }
        if every == 0 {
            every = 1;
        }
        i = args.len();
    }
    while let Some(a) = args.get(i) {
        let v = args.get(i + 1).unwrap_or(b"");
        match a {
            b"--name" if proto::valid_app_name(v) => name = v,
            b"--socket" if SockAddr::unix(v).is_some() => socket = v,
            b"--every" if parse_u64(v).is_some() => {
                every = parse_u64(v).unwrap_or(0);
                if count == 1 {
                    count = 0;
                }
            }
            b"--count" if parse_u64(v).is_some() => count = parse_u64(v).unwrap_or(1),
            _ => {
                let mut l = Line::new();
                l.s("app-heartbeat: bad option '")
                    .printable(a)
                    .s(" ")
                    .printable(v)
                    .s("' (names: 1-32 of A-Za-z0-9._-)");
                rt::warn(&l);
                return 2;
            }
        }
        i += 2;
    }
    let Some(addr) = SockAddr::unix(socket) else {
        return 2;
    };
    let fd = match sys::socket(AF_UNIX, sys::SOCK_DGRAM) {
        Ok(fd) => fd,
        Err(e) => {
            rt::warn_errno("app-heartbeat: socket", e);
            return 1;
        }
    };
    let mut msg = Line::new();
    msg.s("HB ").b(name).nl();
    let mut sent = 0u64;
    loop {
        match sys::sendto(fd, msg.as_bytes(), sys::MSG_NOSIGNAL, addr.as_bytes()) {
            Ok(_) => sent += 1,
            // A workload starts with the daemon and may be first: it waits
            // for the daemon's socket rather than fail.
            Err(_) if workload && sent == 0 => {}
            Err(e) => {
                rt::warn_errno("app-heartbeat: the tools daemon is not listening", e);
                return 1;
            }
        }
        if (count != 0 && sent >= count) || every == 0 {
            if workload {
                let mut l = Line::new();
                l.s("VIGIL-APP-HEARTBEAT-DONE sent=").u(sent).nl();
                rt::out(&l);
            }
            return 0;
        }
        sys::sleep_ns(every * 1_000_000_000);
    }
}
