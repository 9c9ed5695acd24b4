//! The memory dirtier's pure parts: what each page must hold, and pacing.
//!
//! Pass `p` (from 1) walks every page `i`, checks that its first word holds
//! `stamp(p - 1, i)` and writes `stamp(p, i)`. A page that lost a write (not
//! copied by a migration's last round, or restored from an older snapshot)
//! still holds an older stamp and is reported. The page index in the low
//! half also catches a page that holds another page's contents.

/// The word page `page` holds after pass `pass` (pass 0: fresh zero pages).
pub fn stamp(pass: u64, page: u64) -> u64 {
    if pass == 0 {
        0
    } else {
        (pass << 32) | (page & 0xffff_ffff)
    }
}

/// Splits a stamp found in a page into (pass, page) for the error message.
pub fn unstamp(word: u64) -> (u64, u64) {
    (word >> 32, word & 0xffff_ffff)
}

/// Nanoseconds after the start of pacing by which `bytes` should have
/// been written at `rate` bytes per second (0: unlimited, always 0).
pub fn due_ns(bytes: u64, rate: u64) -> u64 {
    if rate == 0 {
        return 0;
    }
    ((u128::from(bytes) * 1_000_000_000) / u128::from(rate)).min(u128::from(u64::MAX)) as u64
}

/// Converts `delta` TSC ticks to microseconds, given that `ticks` ticks
/// were counted over `ns` nanoseconds of the monotonic clock.
pub fn ticks_to_us(delta: u64, ticks: u64, ns: u64) -> u64 {
    if ticks == 0 {
        return 0;
    }
    ((u128::from(delta) * u128::from(ns)) / (u128::from(ticks) * 1000)).min(u128::from(u64::MAX))
        as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(stamp(0, 5), 0);
        assert_eq!(stamp(1, 5), (1 << 32) | 5);
        assert_eq!(unstamp(stamp(7, 123)), (7, 123));
        assert_ne!(stamp(2, 1), stamp(1, 1));
        assert_ne!(stamp(2, 1), stamp(2, 2));
    }

    #[test]
    fn pacing() {
        assert_eq!(due_ns(1 << 20, 0), 0);
        assert_eq!(due_ns(1 << 20, 1 << 20), 1_000_000_000);
        assert_eq!(due_ns(3 << 20, 2 << 20), 1_500_000_000);
        assert_eq!(due_ns(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn tsc_conversion() {
        // 3 GHz: 3000 ticks per us.
        assert_eq!(ticks_to_us(3_000_000, 3_000_000_000, 1_000_000_000), 1000);
        // As the dirtier uses it: ticks per ms over 1e6 ns.
        assert_eq!(ticks_to_us(6_000, 3_000_000, 1_000_000), 2);
        assert_eq!(ticks_to_us(5, 0, 1), 0);
    }
}
