//! Socket addresses in the kernel's byte layout, built without libc.
//!
//! - `sockaddr_vm` (linux/vm_sockets.h): family u16 = 40, reserved u16,
//!   port u32, cid u32, flags u8, 3 zero bytes: 16 bytes, native endian.
//! - `sockaddr_un`: family u16 = 1, then the path; a path starting with `@`
//!   here means the abstract namespace (a NUL byte instead of the `@`, and
//!   the length counts only the name's bytes).
//! - `sockaddr_in`: family u16 = 2, port u16 big endian, IPv4 address
//!   (network order), 8 zero bytes: 16 bytes.

/// `AF_UNIX`.
pub const AF_UNIX: u16 = 1;
/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_VSOCK`.
pub const AF_VSOCK: u16 = 40;

/// Longest unix socket path (`sun_path` is 108 bytes, NUL included).
pub const UNIX_PATH_MAX: usize = 107;

/// A socket address ready for bind/connect/sendto.
#[derive(Clone, Copy)]
pub struct SockAddr {
    bytes: [u8; 112],
    len: usize,
}

impl SockAddr {
    /// The bytes to pass to the kernel.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// A vsock address.
    pub fn vsock(cid: u32, port: u32) -> Self {
        let mut a = SockAddr {
            bytes: [0; 112],
            len: 16,
        };
        a.bytes[0..2].copy_from_slice(&AF_VSOCK.to_ne_bytes());
        a.bytes[4..8].copy_from_slice(&port.to_ne_bytes());
        a.bytes[8..12].copy_from_slice(&cid.to_ne_bytes());
        a
    }

    /// A unix address: a filesystem path, or `@name` for an abstract one.
    /// `None` if it is empty, too long or holds a NUL byte.
    pub fn unix(path: &[u8]) -> Option<Self> {
        if path.is_empty() || path.len() > UNIX_PATH_MAX || path.contains(&0) {
            return None;
        }
        let mut a = SockAddr {
            bytes: [0; 112],
            len: 2 + path.len(),
        };
        a.bytes[0..2].copy_from_slice(&AF_UNIX.to_ne_bytes());
        a.bytes[2..2 + path.len()].copy_from_slice(path);
        if path[0] == b'@' {
            a.bytes[2] = 0;
        } else {
            // The terminating NUL, counted as Linux's own tools do.
            a.len += 1;
        }
        Some(a)
    }

    /// An IPv4 address and port (`addr` in host order, e.g. 0 for any).
    pub fn inet(addr: u32, port: u16) -> Self {
        let mut a = SockAddr {
            bytes: [0; 112],
            len: 16,
        };
        a.bytes[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
        a.bytes[2..4].copy_from_slice(&port.to_be_bytes());
        a.bytes[4..8].copy_from_slice(&addr.to_be_bytes());
        a
    }
}

/// Where the tools daemon connects to.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Endpoint<'a> {
    /// `vsock:CID:PORT` (the default is [`crate::proto::HOST_CID`] and
    /// [`crate::proto::VSOCK_PORT`]).
    Vsock { cid: u32, port: u32 },
    /// `unix:PATH` or `unix:@NAME`: for running the daemon on the host
    /// against a test server.
    Unix(&'a [u8]),
}

/// Parses `vsock:CID:PORT`, `vsock` (the defaults) or `unix:PATH`.
pub fn parse_endpoint(spec: &[u8]) -> Option<Endpoint<'_>> {
    if spec == b"vsock" {
        return Some(Endpoint::Vsock {
            cid: crate::proto::HOST_CID,
            port: crate::proto::VSOCK_PORT,
        });
    }
    if let Some(path) = spec.strip_prefix(b"unix:") {
        return SockAddr::unix(path).map(|_| Endpoint::Unix(path));
    }
    let rest = spec.strip_prefix(b"vsock:")?;
    let colon = rest.iter().position(|&c| c == b':')?;
    let cid = crate::args::parse_u64(&rest[..colon])?;
    let port = crate::args::parse_u64(&rest[colon + 1..])?;
    Some(Endpoint::Vsock {
        cid: u32::try_from(cid).ok()?,
        port: u32::try_from(port).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_layout() {
        let a = SockAddr::vsock(2, 1100);
        let mut want = vec![40u8, 0, 0, 0];
        want.extend_from_slice(&1100u32.to_ne_bytes());
        want.extend_from_slice(&2u32.to_ne_bytes());
        want.extend_from_slice(&[0; 4]);
        assert_eq!(a.as_bytes(), &want[..]);
    }

    #[test]
    fn unix_layout() {
        let a = SockAddr::unix(b"/tmp/s").unwrap();
        assert_eq!(a.as_bytes(), b"\x01\x00/tmp/s\x00");
        let a = SockAddr::unix(b"@vigil").unwrap();
        assert_eq!(a.as_bytes(), b"\x01\x00\x00vigil");
        assert!(SockAddr::unix(b"").is_none());
        assert!(SockAddr::unix(b"a\0b").is_none());
        assert!(SockAddr::unix(&[b'a'; 108]).is_none());
        assert!(SockAddr::unix(&[b'a'; 107]).is_some());
    }

    #[test]
    fn inet_layout() {
        let a = SockAddr::inet(0xC612_0002, 7777);
        assert_eq!(
            a.as_bytes(),
            &[2, 0, 0x1e, 0x61, 198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint(b"vsock"),
            Some(Endpoint::Vsock {
                cid: crate::proto::HOST_CID,
                port: crate::proto::VSOCK_PORT
            })
        );
        assert_eq!(
            parse_endpoint(b"vsock:3:99"),
            Some(Endpoint::Vsock { cid: 3, port: 99 })
        );
        assert_eq!(
            parse_endpoint(b"unix:/tmp/x"),
            Some(Endpoint::Unix(b"/tmp/x"))
        );
        assert_eq!(parse_endpoint(b"unix:"), None);
        assert_eq!(parse_endpoint(b"vsock:2"), None);
        assert_eq!(parse_endpoint(b"vsock:2:99999999999"), None);
        assert_eq!(parse_endpoint(b"tcp:1.2.3.4:5"), None);
    }
}
