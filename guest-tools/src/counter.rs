//! `counter`: prints `VIGIL-COUNTER <n> uptime_ms=<ms>` every few seconds,
//! from 1, so that a snapshot/restore or migration test can see that the
//! guest goes on where it was (no restart, no repeat, no long stop).

use crate::{rt, sys};
use vigil_tools::args::{parse_u64, KeyValues};
use vigil_tools::text::Line;

pub fn run(opts: &[u8]) -> i32 {
    let mut every_s = 2;
    for (k, v) in KeyValues::new(opts) {
        match (k, parse_u64(v)) {
            (b"every", Some(n)) if n > 0 => every_s = n,
            _ => return crate::bad_option("counter", k, v),
        }
    }
    let step = every_s * 1_000_000_000;
    let mut next = sys::clock_ns(sys::CLOCK_MONOTONIC);
    let mut n: u64 = 0;
    loop {
        n += 1;
        let mut l = Line::new();
        l.s("VIGIL-COUNTER ")
            .u(n)
            .s(" uptime_ms=")
            .u(sys::clock_ns(sys::CLOCK_BOOTTIME) / 1_000_000)
            .nl();
        rt::out(&l);
        next += step;
        let now = sys::clock_ns(sys::CLOCK_MONOTONIC);
        if now > next {
            // Suspended (snapshot, migration): count on from now rather
            // than print a burst of catch-up lines.
            next = now;
        }
        sys::sleep_until_ns(next);
    }
}
