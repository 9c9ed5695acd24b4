//! Argument parsing shared by the subcommands and by `/init`, which passes
//! the workload options of `vigil.run=NAME:key=value,key=value` on the
//! kernel command line straight through as one argument.

/// Parses an unsigned decimal number (no sign, no spaces, no overflow).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

/// Iterates over `key=value` pairs of a comma-separated list; a bare `key`
/// yields an empty value, empty items are skipped.
pub struct KeyValues<'a> {
    rest: &'a [u8],
}

impl<'a> KeyValues<'a> {
    /// Starts iterating over `list`.
    pub fn new(list: &'a [u8]) -> Self {
        KeyValues { rest: list }
    }
}

impl<'a> Iterator for KeyValues<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let end = self
                .rest
                .iter()
                .position(|&c| c == b',')
                .unwrap_or(self.rest.len());
            let item = &self.rest[..end];
            self.rest = if end < self.rest.len() {
                &self.rest[end + 1..]
            } else {
                &[]
            };
            if item.is_empty() {
                continue;
            }
            return Some(match item.iter().position(|&c| c == b'=') {
                Some(eq) => (&item[..eq], &item[eq + 1..]),
                None => (item, &[][..]),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"64"), Some(64));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"1k"), None);
    }

    #[test]
    fn key_values() {
        let v: Vec<_> = KeyValues::new(b"mib=64,,rate=0,verbose,tag=").collect();
        assert_eq!(
            v,
            vec![
                (&b"mib"[..], &b"64"[..]),
                (&b"rate"[..], &b"0"[..]),
                (&b"verbose"[..], &b""[..]),
                (&b"tag"[..], &b""[..]),
            ]
        );
        assert_eq!(KeyValues::new(b"").count(), 0);
    }
}
