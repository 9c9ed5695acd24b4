//! `disk-write` and `disk-verify`: the disk journal workload (G4). The
//! record format, resume rule and checks are in `vigil_tools::journal`.
//!
//! `disk-write [dev=/dev/vda,rate=10,count=0,tag=TEXT,report=10]` appends
//! `rate` records per second (0: as fast as it can), each with one
//! O_DIRECT|O_DSYNC sector write, so a completed write is on the disk. The
//! tag defaults to the first 16 hex digits of the guest's boot id. Console:
//! `VIGIL-DISK-RESUME pos=<p> seq=<s> tag=<t>` at start, every `report`
//! seconds `VIGIL-DISK seq=<s>`, `VIGIL-DISK-DONE seq=<s>` after `count`
//! records (0: until the disk is full, `VIGIL-DISK-FULL seq=<s>`),
//! `VIGIL-DISK-ERROR <what> errno=<e>` on a failed write.
//!
//! `disk-verify [dev=/dev/vda]` reads the whole device and prints
//! `VIGIL-DISK-VERIFY ok|FAIL records=<n> first_seq=<s> last_seq=<s>
//! writers=<w> gaps=<g> dups=<d> bad=<b> interleaved=<i> holes=<h>`, and
//! before it, if something is wrong, `VIGIL-DISK-PROBLEM <kind> pos=<p> ...`
//! for the first problem found.

use crate::{rt, sys};
use vigil_tools::args::{parse_u64, KeyValues};
use vigil_tools::journal::{
    self, decode, encode, make_tag, tag_from_boot_id, tag_text, Problem, Record, Resume, Verifier,
    RECORD_SIZE, TAG_LEN,
};
use vigil_tools::text::Line;

/// Bytes read per system call while scanning: in a nested guest each
/// request costs ~20 ms of emulated kernel time whatever its size, and each
/// page of the buffer ~8 ms once (first touch), so a few large reads.
const SCAN: usize = 256 * 1024;

/// O_DIRECT wants buffers aligned to the logical block size.
#[repr(C, align(4096))]
struct Aligned<const N: usize>([u8; N]);

fn open_dev(dev: &[u8], flags: usize) -> Result<(i32, u64), i32> {
    match sys::open(dev, flags) {
        Ok(fd) => match sys::size_of(fd) {
            Ok(size) => Ok((fd, size as u64)),
            Err(e) => {
                error("size of", dev, e);
                Err(1)
            }
        },
        Err(e) => {
            error("open", dev, e);
            Err(1)
        }
    }
}

fn error(what: &str, dev: &[u8], e: sys::Errno) {
    rt::out(
        Line::new()
            .s("VIGIL-DISK-ERROR ")
            .s(what)
            .s(" ")
            .printable(dev)
            .s(" errno=")
            .u(e.0 as u64)
            .nl(),
    );
}

/// Reads the device from the start, handing each sector to `f` until it
/// returns false. Returns false on a read error.
fn scan(fd: i32, dev: &[u8], size: u64, mut f: impl FnMut(journal::Sector) -> bool) -> bool {
    let mut buf = Aligned([0u8; SCAN]);
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(SCAN as u64) as usize;
        let n = match sys::pread(fd, &mut buf.0[..want], off) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(sys::Errno(sys::EINTR)) => continue,
            Err(e) => {
                error("read", dev, e);
                return false;
            }
        };
        for sector in buf.0[..n].chunks_exact(RECORD_SIZE) {
            if !f(decode(sector)) {
                return true;
            }
        }
        off += (n - n % RECORD_SIZE) as u64;
        if n < RECORD_SIZE {
            return true;
        }
    }
    true
}

pub fn write(opts: &[u8]) -> i32 {
    let mut dev: &[u8] = b"/dev/vda";
    let (mut rate, mut count, mut report_s) = (10u64, 0u64, 10u64);
    let mut idbuf = [0u8; 64];
    let mut tag = tag_from_boot_id(crate::boot_id(&mut idbuf));
    for (k, v) in KeyValues::new(opts) {
        match (k, parse_u64(v)) {
            (b"dev", _) if !v.is_empty() => dev = v,
            (b"rate", Some(n)) => rate = n,
            (b"count", Some(n)) => count = n,
            (b"report", Some(n)) if n > 0 => report_s = n,
            (b"tag", _) if !v.is_empty() && v.len() <= TAG_LEN => tag = make_tag(v),
            _ => return crate::bad_option("disk-write", k, v),
        }
    }
    let (fd, size) = match open_dev(dev, sys::O_RDWR | sys::O_DIRECT | sys::O_DSYNC) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut resume = Resume::new();
    if !scan(fd, dev, size, |s| resume.feed(s)) {
        return 1;
    }
    resume.finish();
    rt::out(
        Line::new()
            .s("VIGIL-DISK-RESUME pos=")
            .u(resume.next_pos)
            .s(" seq=")
            .u(resume.next_seq)
            .s(" tag=")
            .printable(tag_text(&tag))
            .nl(),
    );

    let capacity = size / RECORD_SIZE as u64;
    let mut sector = Aligned([0u8; RECORD_SIZE]);
    let (mut pos, mut seq) = (resume.next_pos, resume.next_seq);
    let step_ns = 1_000_000_000u64.checked_div(rate).unwrap_or(0);
    let mut next = sys::clock_ns(sys::CLOCK_MONOTONIC);
    let mut next_report = next + report_s * 1_000_000_000;
    let mut written = 0u64;
    loop {
        if pos >= capacity {
            rt::out(Line::new().s("VIGIL-DISK-FULL seq=").u(seq - 1).nl());
            return 0;
        }
        let rec = Record {
            tag,
            seq,
            uptime_ms: sys::clock_ns(sys::CLOCK_BOOTTIME) / 1_000_000,
        };
        encode(&rec, &mut sector.0);
        match sys::pwrite(fd, &sector.0, pos * RECORD_SIZE as u64) {
            Ok(RECORD_SIZE) => {}
            Ok(_) => {
                error("short write", dev, sys::Errno(5));
                return 1;
            }
            Err(sys::Errno(sys::EINTR)) => continue,
            Err(e) => {
                error("write", dev, e);
                return 1;
            }
        }
        written += 1;
        let now = sys::clock_ns(sys::CLOCK_MONOTONIC);
        if (count != 0 && written >= count) || now >= next_report {
            rt::out(
                Line::new()
                    .s(if count != 0 && written >= count {
                        "VIGIL-DISK-DONE seq="
                    } else {
                        "VIGIL-DISK seq="
                    })
                    .u(seq)
                    .nl(),
            );
            if count != 0 && written >= count {
                return 0;
            }
            next_report = now + report_s * 1_000_000_000;
        }
        pos += 1;
        seq += 1;
        if step_ns != 0 {
            next += step_ns;
            if now > next + 1_000_000_000 {
                next = now; // stalled: no burst to catch up
            }
            sys::sleep_until_ns(next);
        }
    }
}

pub fn verify(opts: &[u8]) -> i32 {
    let mut dev: &[u8] = b"/dev/vda";
    for (k, v) in KeyValues::new(opts) {
        match k {
            b"dev" if !v.is_empty() => dev = v,
            _ => return crate::bad_option("disk-verify", k, v),
        }
    }
    let (fd, size) = match open_dev(dev, sys::O_RDONLY | sys::O_DIRECT) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut v = Verifier::new();
    if !scan(fd, dev, size, |s| {
        v.feed(s);
        true
    }) {
        return 1;
    }
    if let Some(p) = v.first_problem {
        let mut l = Line::new();
        l.s("VIGIL-DISK-PROBLEM ");
        match p {
            Problem::Gap { pos, prev, seq } => {
                l.s("gap pos=").u(pos).s(" prev=").u(prev).s(" seq=").u(seq)
            }
            Problem::Duplicate { pos, prev, seq } => l
                .s("duplicate pos=")
                .u(pos)
                .s(" prev=")
                .u(prev)
                .s(" seq=")
                .u(seq),
            Problem::Bad { pos } => l.s("bad-checksum pos=").u(pos),
            Problem::Interleaved { pos, seq } => l.s("interleaved pos=").u(pos).s(" seq=").u(seq),
            Problem::Hole { pos } => l.s("hole pos=").u(pos),
        };
        rt::out(l.nl());
    }
    rt::out(
        Line::new()
            .s("VIGIL-DISK-VERIFY ")
            .s(if v.ok() { "ok" } else { "FAIL" })
            .s(" records=")
            .u(v.records)
            .s(" first_seq=")
            .u(v.first_seq)
            .s(" last_seq=")
            .u(v.last_seq)
            .s(" writers=")
            .u(v.writers() as u64)
            .s(" gaps=")
            .u(v.gaps)
            .s(" dups=")
            .u(v.dups)
            .s(" bad=")
            .u(v.bad)
            .s(" interleaved=")
            .u(v.interleaved)
            .s(" holes=")
            .u(v.holes)
            .nl(),
    );
    i32::from(!v.ok())
}
