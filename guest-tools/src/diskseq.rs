//! `disk-seq [dev=/dev/vda,mib=32,bs=1024]`: sequential write throughput of
//! a block device, for the virtio-blk benchmark (`bench/blk.py`).
//!
//! Writes `mib` MiB from offset 0 in `bs` KiB O_DIRECT writes, all from one
//! buffer filled once in user space, then `sync` (which reaches the device
//! as a flush). With O_DIRECT the guest kernel maps the buffer for the
//! device instead of copying it, so what is timed is the request path:
//! the guest's block layer and virtio driver, the device, the host file.
//! Prints `VIGIL-DISK-SEQ bytes=<n> ms=<t> kib_per_s=<r>` (time measured
//! with CLOCK_MONOTONIC around the writes and the sync), or
//! `VIGIL-DISK-ERROR ...`.

use crate::{rt, sys};
use vigil_tools::args::{parse_u64, KeyValues};
use vigil_tools::text::Line;

fn error(what: &str, e: u64) -> i32 {
    rt::out(
        Line::new()
            .s("VIGIL-DISK-ERROR disk-seq ")
            .s(what)
            .s(" errno=")
            .u(e)
            .nl(),
    );
    1
}

pub fn run(opts: &[u8]) -> i32 {
    let mut dev: &[u8] = b"/dev/vda";
    let (mut mib, mut bs_kib) = (32u64, 1024u64);
    for (k, v) in KeyValues::new(opts) {
        match (k, parse_u64(v)) {
            (b"dev", _) if !v.is_empty() => dev = v,
            (b"mib", Some(n)) if n > 0 => mib = n,
            // Whole pages, at most 4 MiB.
            (b"bs", Some(n)) if (4..=4096).contains(&n) && n % 4 == 0 => bs_kib = n,
            _ => return crate::bad_option("disk-seq", k, v),
        }
    }
    let fd = match sys::open(dev, sys::O_RDWR | sys::O_DIRECT) {
        Ok(fd) => fd,
        Err(e) => return error("open", e.0 as u64),
    };
    let size = match sys::size_of(fd) {
        Ok(s) => s as u64,
        Err(e) => return error("size", e.0 as u64),
    };
    let total = mib << 20;
    if total > size {
        rt::out(
            Line::new()
                .s("VIGIL-DISK-ERROR disk-seq device is smaller than mib=")
                .u(mib)
                .nl(),
        );
        return 1;
    }
    let bs = (bs_kib << 10) as usize;
    let base = match sys::mmap_populated(bs) {
        Ok(p) => p,
        Err(e) => return error("map buffer", e.0 as u64),
    };
    // SAFETY: `base` is a fresh private mapping of `bs` bytes, page aligned
    // (as O_DIRECT needs), used only through this slice.
    let buf = unsafe { core::slice::from_raw_parts_mut(base, bs) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let t0 = sys::clock_ns(sys::CLOCK_MONOTONIC);
    let mut off = 0u64;
    while off < total {
        match sys::pwrite(fd, buf, off) {
            Ok(n) if n == bs => off += bs as u64,
            Ok(_) => return error("short write", 5),
            Err(sys::Errno(sys::EINTR)) => {}
            Err(e) => return error("write", e.0 as u64),
        }
    }
    sys::sync();
    let ns = sys::clock_ns(sys::CLOCK_MONOTONIC)
        .saturating_sub(t0)
        .max(1);
    sys::close(fd);
    rt::out(
        Line::new()
            .s("VIGIL-DISK-SEQ bytes=")
            .u(total)
            .s(" ms=")
            .u(ns / 1_000_000)
            .s(" kib_per_s=")
            .u(((total as u128 * 1_000_000_000) / (ns as u128 * 1024)) as u64)
            .nl(),
    );
    0
}
