//! A fixed-capacity line builder: the guest binary has no allocator and no
//! `core::fmt` (which would cost KiB of initramfs), so messages are built
//! piece by piece. Text past the capacity is dropped, never an error: a
//! console line or a protocol line is short by construction.

/// One line of text under construction.
pub struct Line {
    buf: [u8; Line::CAP],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// Capacity in bytes.
    pub const CAP: usize = 256;

    /// An empty line.
    pub const fn new() -> Self {
        Line {
            buf: [0; Line::CAP],
            len: 0,
        }
    }

    /// Appends bytes (truncated at the capacity).
    pub fn b(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(Self::CAP - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    /// Appends a string.
    pub fn s(&mut self, s: &str) -> &mut Self {
        self.b(s.as_bytes())
    }

    /// Appends an unsigned decimal number.
    pub fn u(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.b(&digits[i..])
    }

    /// Appends a signed decimal number.
    pub fn i(&mut self, v: i64) -> &mut Self {
        if v < 0 {
            self.s("-");
        }
        self.u(v.unsigned_abs())
    }

    /// Appends `thousandths / 1000` with three decimals (`1234` -> `1.234`).
    pub fn milli(&mut self, thousandths: u64) -> &mut Self {
        self.u(thousandths / 1000).s(".");
        let frac = thousandths % 1000;
        if frac < 100 {
            self.s("0");
        }
        if frac < 10 {
            self.s("0");
        }
        self.u(frac)
    }

    /// Appends bytes, replacing anything but printable ASCII with `?`, so
    /// that data read from a disk or a peer cannot garble the console.
    pub fn printable(&mut self, bytes: &[u8]) -> &mut Self {
        for &c in bytes {
            let c = if (0x21..0x7f).contains(&c) { c } else { b'?' };
            self.b(&[c]);
        }
        self
    }

    /// Appends a newline.
    pub fn nl(&mut self) -> &mut Self {
        self.b(b"\n")
    }

    /// The text so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Number of bytes so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the line is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_text() {
        let mut l = Line::new();
        l.s("HB ")
            .u(0)
            .s(" ")
            .u(18446744073709551615)
            .s(" ")
            .i(-42)
            .nl();
        assert_eq!(l.as_bytes(), b"HB 0 18446744073709551615 -42\n");
    }

    #[test]
    fn milli() {
        let mut l = Line::new();
        l.milli(1234)
            .s(" ")
            .milli(5)
            .s(" ")
            .milli(70)
            .s(" ")
            .milli(0);
        assert_eq!(l.as_bytes(), b"1.234 0.005 0.070 0.000");
    }

    #[test]
    fn truncates_at_capacity() {
        let mut l = Line::new();
        for _ in 0..100 {
            l.s("abcd");
        }
        assert_eq!(l.len(), Line::CAP);
    }

    #[test]
    fn printable_masks_control_bytes() {
        let mut l = Line::new();
        l.printable(b"a\x1b[2J b\n");
        assert_eq!(l.as_bytes(), b"a?[2J?b?");
    }
}
