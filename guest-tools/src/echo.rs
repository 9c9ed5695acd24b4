//! `echo [port=7777]`: a UDP and TCP echo server on every address of the
//! guest (the network is configured by `ip=` on the kernel command line).
//! Console: `VIGIL-ECHO-READY port=<p>` once both sockets listen.

use crate::{rt, sys};
use sys::PollFd;
use vigil_tools::addr::{SockAddr, AF_INET};
use vigil_tools::args::{parse_u64, KeyValues};
use vigil_tools::text::Line;

/// TCP clients served at once; more wait in the listen backlog.
const CLIENTS: usize = 8;

fn listen_on(ty: usize, port: u16) -> Result<i32, sys::Errno> {
    let fd = sys::socket(AF_INET, ty)?;
    sys::set_reuseaddr(fd);
    let r = sys::bind(fd, SockAddr::inet(0, port).as_bytes()).and_then(|_| {
        if ty == sys::SOCK_STREAM {
            sys::listen(fd, 16)
        } else {
            Ok(0)
        }
    });
    match r {
        Ok(_) => Ok(fd),
        Err(e) => {
            sys::close(fd);
            Err(e)
        }
    }
}

pub fn run(opts: &[u8]) -> i32 {
    let mut port = 7777u16;
    for (k, v) in KeyValues::new(opts) {
        match (k, parse_u64(v).and_then(|n| u16::try_from(n).ok())) {
            (b"port", Some(p)) if p > 0 => port = p,
            _ => return crate::bad_option("echo", k, v),
        }
    }
    sys::ignore_sigpipe();
    let (udp, tcp) = match (
        listen_on(sys::SOCK_DGRAM, port),
        listen_on(sys::SOCK_STREAM, port),
    ) {
        (Ok(u), Ok(t)) => (u, t),
        (Err(e), _) | (_, Err(e)) => {
            rt::warn_errno("echo: cannot listen", e);
            return 1;
        }
    };
    rt::out(
        Line::new()
            .s("VIGIL-ECHO-READY port=")
            .u(u64::from(port))
            .nl(),
    );

    let mut clients = [-1i32; CLIENTS];
    let mut buf = [0u8; 2048];
    loop {
        let mut fds = [PollFd {
            fd: -1,
            events: sys::POLLIN,
            revents: 0,
        }; CLIENTS + 2];
        fds[0].fd = udp;
        // Stop accepting while every client slot is taken.
        fds[1].fd = if clients.contains(&-1) { tcp } else { -1 };
        for (f, &c) in fds[2..].iter_mut().zip(&clients) {
            f.fd = c;
        }
        if sys::poll(&mut fds, -1).is_err() {
            continue;
        }
        if fds[0].revents != 0 {
            let mut from = [0u8; 32];
            if let Ok((n, alen)) = sys::recvfrom(udp, &mut buf, sys::MSG_DONTWAIT, &mut from) {
                let _ = sys::sendto(udp, &buf[..n], sys::MSG_DONTWAIT, &from[..alen]);
            }
        }
        if fds[1].revents != 0 {
            if let Ok(fd) = sys::accept(tcp) {
                match clients.iter_mut().find(|c| **c == -1) {
                    Some(slot) => *slot = fd,
                    None => sys::close(fd),
                }
            }
        }
        for (f, c) in fds[2..].iter().zip(clients.iter_mut()) {
            if f.revents == 0 || *c == -1 {
                continue;
            }
            let done = match sys::read(*c, &mut buf) {
                Ok(0) => true,
                Ok(n) => sys::write_all(*c, &buf[..n]).is_err(),
                Err(sys::Errno(sys::EINTR)) => false,
                Err(_) => true,
            };
            if done {
                sys::close(*c);
                *c = -1;
            }
        }
    }
}
