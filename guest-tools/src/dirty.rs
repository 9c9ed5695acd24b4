//! `dirty`: the memory dirtier (G4). Rewrites one word in every page of
//! `mib` MiB, pass after pass, at `rate` MiB/s (0: as fast as it can), and
//! checks at each page that it still holds the previous pass's stamp (see
//! `vigil_tools::pages`), as QEMU's migration test does. It also is a stall
//! meter: the longest time its loop went without running, between two
//! reads of the TSC, which after a migration or snapshot is the downtime
//! the guest saw.
//!
//! Console: `VIGIL-DIRTY-READY mib=<n> pages=<n>` once the memory is
//! faulted in; every `report` seconds `VIGIL-DIRTY pass=<p> max_gap_ms=<x>
//! max_gap_total_ms=<y> mismatches=<m>`; `VIGIL-DIRTY-STALL gap_ms=<x>`
//! right after a gap longer than `stall` ms; `VIGIL-DIRTY-MISMATCH pass=<p>
//! page=<i> found_pass=<q> found_page=<j>` for the first few lost pages of
//! a pass; `VIGIL-DIRTY-DONE passes=<p> mismatches=<m>` after `passes`
//! passes (0: forever).

use crate::{rt, sys};
use vigil_tools::args::{parse_u64, KeyValues};
use vigil_tools::pages::{due_ns, stamp, ticks_to_us, unstamp};
use vigil_tools::text::Line;

const PAGE: usize = 4096;
/// Pages between two looks at the clock for pacing and reports.
const CHUNK: usize = 256;
/// Mismatch lines printed per pass (each console line costs ~30 ms here).
const MISMATCH_LINES: u64 = 4;

fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: RDTSC only reads the time-stamp counter into edx:eax; Linux
    // lets user space execute it.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// TSC ticks against the monotonic clock, to convert gaps to time without
/// a system call in the loop (each costs ~1 ms in a nested guest).
struct Clock {
    tsc0: u64,
    ns0: u64,
    /// Ticks per millisecond, from the calibration so far.
    per_ms: u64,
}

impl Clock {
    fn new() -> Self {
        let mut c = Clock {
            tsc0: rdtsc(),
            ns0: sys::clock_ns(sys::CLOCK_MONOTONIC),
            per_ms: 1,
        };
        sys::sleep_ns(100_000_000);
        c.calibrate();
        c
    }

    /// Refines ticks per ms over the whole run so far (one clock read).
    fn calibrate(&mut self) {
        let ns = sys::clock_ns(sys::CLOCK_MONOTONIC).saturating_sub(self.ns0);
        let ticks = rdtsc().wrapping_sub(self.tsc0);
        self.per_ms = ((u128::from(ticks) * 1_000_000) / u128::from(ns.max(1))).max(1) as u64;
    }

    /// Microseconds in `ticks`.
    fn us(&self, ticks: u64) -> u64 {
        ticks_to_us(ticks, self.per_ms, 1_000_000)
    }

    /// Ticks in `ns` nanoseconds.
    fn ticks(&self, ns: u64) -> u64 {
        ((u128::from(ns) * u128::from(self.per_ms)) / 1_000_000).min(u128::from(u64::MAX)) as u64
    }
}

pub fn run(opts: &[u8]) -> i32 {
    let (mut mib, mut rate, mut report_s, mut stall_ms, mut passes) =
        (64u64, 0u64, 10u64, 500u64, 0u64);
    for (k, v) in KeyValues::new(opts) {
        let n = parse_u64(v);
        match (k, n) {
            (b"mib", Some(n)) if n > 0 && n < (1 << 20) => mib = n,
            (b"rate", Some(n)) => rate = n,
            (b"report", Some(n)) if n > 0 => report_s = n,
            (b"stall", Some(n)) if n > 0 => stall_ms = n,
            (b"passes", Some(n)) => passes = n,
            _ => return crate::bad_option("dirty", k, v),
        }
    }
    let pages = (mib as usize) * (1 << 20) / PAGE;
    let base = match sys::mmap_populated(pages * PAGE) {
        Ok(p) => p,
        Err(e) => {
            rt::warn_errno("dirty: cannot map memory", e);
            return 1;
        }
    };
    let clock = Clock::new();
    rt::out(
        Line::new()
            .s("VIGIL-DIRTY-READY mib=")
            .u(mib)
            .s(" pages=")
            .u(pages as u64)
            .nl(),
    );

    let rate_bytes = rate << 20;
    let mut clock = clock;
    let mut pace_tsc0 = rdtsc();
    let mut paced_bytes = 0u64;
    let mut mismatches = 0u64;
    // Longest gap in ticks since the last report; longest of all in us
    // (converted when seen, as the calibration goes on improving).
    let (mut gap_max, mut gap_total_us) = (0u64, 0u64);
    let mut next_report = pace_tsc0 + clock.ticks(report_s * 1_000_000_000);
    let mut last = rdtsc();
    let mut pass = 0u64;
    while passes == 0 || pass < passes {
        pass += 1;
        let mut pass_mismatches = 0u64;
        for first in (0..pages).step_by(CHUNK) {
            for i in first..(first + CHUNK).min(pages) {
                // SAFETY: page i < pages lies inside the mapping of
                // pages * PAGE bytes made above, which is never unmapped;
                // the word is 8-aligned (page-aligned) and only this
                // thread touches it. Volatile: the stores are the point.
                let word = unsafe { base.add(i * PAGE) as *mut u64 };
                // SAFETY: as above.
                let found = unsafe { word.read_volatile() };
                if found != stamp(pass - 1, i as u64) {
                    pass_mismatches += 1;
                    if pass_mismatches <= MISMATCH_LINES {
                        let (fp, fi) = unstamp(found);
                        rt::out(
                            Line::new()
                                .s("VIGIL-DIRTY-MISMATCH pass=")
                                .u(pass)
                                .s(" page=")
                                .u(i as u64)
                                .s(" found_pass=")
                                .u(fp)
                                .s(" found_page=")
                                .u(fi)
                                .nl(),
                        );
                        last = rdtsc();
                    }
                }
                // SAFETY: as above.
                unsafe { word.write_volatile(stamp(pass, i as u64)) };
                let t = rdtsc();
                gap_max = gap_max.max(t.wrapping_sub(last));
                last = t;
            }
            // Once per chunk: stall, pacing and report checks, in TSC
            // ticks; system calls only to sleep or to report.
            if clock.us(gap_max) > stall_ms * 1000 {
                rt::out(
                    Line::new()
                        .s("VIGIL-DIRTY-STALL gap_ms=")
                        .milli(clock.us(gap_max))
                        .nl(),
                );
                gap_total_us = gap_total_us.max(clock.us(gap_max));
                gap_max = 0;
                last = rdtsc();
            }
            paced_bytes += (CHUNK * PAGE) as u64;
            let now = rdtsc();
            if rate_bytes != 0 {
                let due = pace_tsc0.wrapping_add(clock.ticks(due_ns(paced_bytes, rate_bytes)));
                if due > now && clock.us(due - now) >= 10_000 {
                    sys::sleep_ns(clock.us(due - now) * 1000);
                    last = rdtsc();
                } else if now > due && clock.us(now - due) > 1_000_000 {
                    // Far behind (stalled): do not burst to catch up.
                    pace_tsc0 = now;
                    paced_bytes = 0;
                }
            }
            if now >= next_report {
                clock.calibrate();
                gap_total_us = gap_total_us.max(clock.us(gap_max));
                rt::out(
                    Line::new()
                        .s("VIGIL-DIRTY pass=")
                        .u(pass)
                        .s(" max_gap_ms=")
                        .milli(clock.us(gap_max))
                        .s(" max_gap_total_ms=")
                        .milli(gap_total_us)
                        .s(" mismatches=")
                        .u(mismatches + pass_mismatches)
                        .nl(),
                );
                gap_max = 0;
                next_report = rdtsc() + clock.ticks(report_s * 1_000_000_000);
                last = rdtsc();
            }
        }
        mismatches += pass_mismatches;
    }
    rt::out(
        Line::new()
            .s("VIGIL-DIRTY-DONE passes=")
            .u(pass)
            .s(" mismatches=")
            .u(mismatches)
            .nl(),
    );
    i32::from(mismatches != 0)
}
