//! One ICMP echo (IPv4, raw socket: the agent runs as root), for the
//! master's check of a silent host and for isolation addresses.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one echo request to `addr`; true if the reply came within `timeout`.
/// Errors (bad address, no permission) count as no answer and are logged.
pub fn ping(addr: &str, timeout: Duration) -> bool {
    match ping_inner(addr, timeout) {
        Ok(answered) => answered,
        Err(e) => {
            tracing::warn!(addr, error = %e, "ping failed");
            false
        }
    }
}

fn ping_inner(addr: &str, timeout: Duration) -> Result<bool, String> {
    let ip: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr} is not an IPv4 address"))?;
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // Concurrent pings share the raw socket's view of every reply: each
    // gets its own identifier.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let id = (std::process::id() as u16).wrapping_add(
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_mul(7919),
    );
    let seq: u16 = 1;
    let mut pkt = [0u8; 16];
    pkt[0] = 8; // echo request
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..16].copy_from_slice(b"vigil-ha");
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    use std::os::fd::AsRawFd;
    // SAFETY: `pkt` and `sa` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            owned.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        // Unreachable network and the like: no answer.
        return Ok(false);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd: owned.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if r <= 0 {
            continue;
        }
        // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
        let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                owned.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if n <= 0 {
            continue;
        }
        let pkt = &buf[..n as usize];
        // Raw IPv4 sockets deliver the IP header too.
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        if pkt.len() < ihl + 8 || u32::from_be(from.sin_addr.s_addr) != u32::from(ip) {
            continue;
        }
        let icmp = &pkt[ihl..];
        if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
            return Ok(true);
        }
    }
}

/// The default gateway from /proc/net/route (the default isolation address).
pub fn default_gateway() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[1] == "00000000" {
            let gw = u32::from_str_radix(f[2], 16).ok()?;
            if gw != 0 {
                return Some(Ipv4Addr::from(u32::from_be(gw)).to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_packet() {
        // Echo request, id 1, seq 1, no data: checksum 0xf7fd.
        let mut p = [8u8, 0, 0, 0, 0, 1, 0, 1];
        let c = checksum(&p);
        assert_eq!(c, 0xf7fd);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&p), 0);
    }

    #[test]
    fn loopback_answers() {
        assert!(ping("127.0.0.1", Duration::from_secs(2)));
        assert!(!ping("not-an-address", Duration::from_millis(10)));
    }
}
