//! After a migration the guest's MACs sit behind other switch ports: the
//! target announces each NIC's MAC with RARP broadcasts from the NIC's tap,
//! as QEMU does (5 rounds, 50 ms apart, then 100 ms more per round), so
//! bridges and switches learn the new port before the guest sends
//! anything itself (M3).
//!
//! The frames must enter the host network from the tap's device side,
//! exactly as the guest's own frames do, so they are written to the tap's
//! file descriptor, which the NIC device holds in this process. The
//! descriptor is found by its interface name (TUNGETIFF on the process's
//! /dev/net/tun descriptors); a write of one frame is atomic, so it cannot
//! interleave with the device's own writes.

use std::time::Duration;

/// Rounds and gaps, as QEMU's `qemu_announce_self` defaults.
pub const ROUNDS: u32 = 5;
/// First gap.
pub const INITIAL: Duration = Duration::from_millis(50);
/// Added to the gap after each round.
pub const STEP: Duration = Duration::from_millis(100);

/// The virtio-net header the tap expects before each frame
/// (`IFF_VNET_HDR`, 12 bytes: no offloads).
const VNET_HDR_LEN: usize = 12;

/// A RARP "reverse request" broadcast from `mac` (what QEMU sends), padded
/// to the Ethernet minimum, behind a zero virtio-net header.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // ETH_P_RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]); // Ethernet/IPv4, op 3
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(VNET_HDR_LEN + 60, 0);
    f
}

const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// This process's descriptor of the tap named `name`.
fn tap_fd(name: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(entry.path()).ok()?.as_os_str() != "/dev/net/tun" {
            continue;
        }
        let mut ifr = [0u8; 40];
        // SAFETY: TUNGETIFF writes one `struct ifreq` (40 bytes) through the
        // pointer, which points at a 40-byte buffer we own; `fd` is a
        // /dev/net/tun descriptor of this process (a stale number fails
        // with EBADF, which we skip).
        if unsafe { libc::ioctl(fd, TUNGETIFF, ifr.as_mut_ptr()) } < 0 {
            continue;
        }
        let end = ifr[..16].iter().position(|b| *b == 0).unwrap_or(16);
        if &ifr[..end] == name.as_bytes() {
            return Some(fd);
        }
    }
    None
}

/// Announces each `(tap, mac)`; runs for about 1.25 s, so call it on its
/// own thread. Taps that cannot be found or written are logged.
pub fn announce(nics: &[(String, [u8; 6])]) {
    let mut gap = INITIAL;
    for round in 0..ROUNDS {
        for (tap, mac) in nics {
            let Some(fd) = tap_fd(tap) else {
                tracing::warn!(%tap, "cannot announce the guest's MAC: tap not open here");
                continue;
            };
            let frame = rarp_frame(*mac);
            // SAFETY: writes `frame.len()` bytes from a live buffer to `fd`,
            // the tap descriptor the NIC device holds open while the VM
            // runs (were it closed meanwhile, the write would only fail).
            let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
            if n < 0 {
                tracing::warn!(%tap, round, error = %std::io::Error::last_os_error(), "RARP announce failed");
            }
        }
        if round + 1 < ROUNDS {
            std::thread::sleep(gap);
            gap += STEP;
        }
    }
    tracing::info!(
        nics = nics.len(),
        rounds = ROUNDS,
        "announced the guest's MACs"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 12 + 60);
        let e = &f[12..];
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3], "reverse request");
        assert_eq!(&e[22..28], &mac);
        assert_eq!(&e[32..38], &mac);
    }
}
