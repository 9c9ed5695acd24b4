//! Framing: one [`Message`] per frame, the header layout documented in the
//! parent module. Encoding, incremental decoding that survives read
//! timeouts, and the checks that make a torn or corrupted stream fail with
//! a precise error.

use super::{Message, MessageType, ProtocolError, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use std::io::{self, Read, Write};

/// Encodes one frame with the given sequence number.
pub fn encode_frame(msg: &Message, sequence: u32) -> Result<Vec<u8>, ProtocolError> {
    encode_raw(msg.kind(), sequence, &msg.encode_payload())
}

/// Encodes one frame of `kind` around a payload already encoded (a relay
/// forwards frames this way without decoding them).
pub fn encode_raw(
    kind: MessageType,
    sequence: u32,
    payload: &[u8],
) -> Result<Vec<u8>, ProtocolError> {
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(ProtocolError::TooLargeToSend {
            kind,
            length: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

fn kind_name(raw: u16) -> String {
    MessageType::from_u16(raw).map_or_else(|| format!("type {raw}"), |k| k.to_string())
}

/// Incremental frame decoder: feed bytes as they arrive, take whole messages
/// out. Keeps partial frames across read timeouts, so a reader can poll for
/// cancellation without losing sync.
///
/// The buffer is read into directly ([`read_message`] / [`read_frame`]
/// ask for what the frame in progress still needs) and consumed by moving
/// an offset, so a 1 MiB `Pages` frame is not copied inside the decoder;
/// [`next_frame`](Self::next_frame) lends its payload out for the target
/// to write pages straight from it.
#[derive(Debug, Default)]
pub struct Decoder {
    /// `buf[pos..end]` holds bytes received and not yet consumed; the rest
    /// is room to read into.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    next_sequence: u32,
    received: u64,
}

/// Smallest read from the stream.
const READ_CHUNK: usize = 64 * 1024;

/// A whole frame, checked (CRC, type, flags, sequence), its payload still
/// in the decoder's buffer.
#[derive(Debug)]
pub struct RawFrame<'a> {
    /// Its type.
    pub kind: MessageType,
    /// Its sequence number.
    pub sequence: u32,
    /// Its payload.
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// The payload decoded as an owned [`Message`].
    pub fn decode(&self) -> Result<Message, ProtocolError> {
        Message::decode_payload(self.kind, self.sequence, self.payload)
    }
}

impl Decoder {
    /// A decoder expecting sequence 0 first.
    pub fn new() -> Self {
        Self::default()
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Room for at least `n` more bytes after `end`, moving what is left of
    /// a frame to the front first.
    fn reserve(&mut self, n: usize) {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
        self.received += bytes.len() as u64;
    }

    /// Reads once from `r` into the buffer: what the frame in progress
    /// still needs, at least [`READ_CHUNK`]. Returns what `read` returned.
    fn fill<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<usize> {
        let want = match self.frame_len() {
            Ok(Some(total)) => total.saturating_sub(self.end - self.pos),
            _ => 0,
        }
        .max(READ_CHUNK);
        self.reserve(want);
        let n = r.read(&mut self.buf[self.end..self.end + want])?;
        self.end += n;
        self.received += n as u64;
        Ok(n)
    }

    /// Reads once from `r` into the buffer, at most `max` bytes: for a
    /// frame header, without reading into the data that may follow it.
    pub fn fill_small<R: Read + ?Sized>(&mut self, r: &mut R, max: usize) -> io::Result<usize> {
        self.reserve(max);
        let n = r.read(&mut self.buf[self.end..self.end + max])?;
        self.end += n;
        self.received += n as u64;
        Ok(n)
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// Bytes received since the decoder was made (a reader's sign of
    /// life).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// How many more bytes the frame in progress needs, at least 1 if a frame
    /// is incomplete; errors early on a bad header.
    fn frame_len(&self) -> Result<Option<usize>, ProtocolError> {
        let seq = self.next_sequence;
        let b = self.data();
        if b.len() >= 4 && b[..4] != MAGIC {
            let mut found = [0; 4];
            found.copy_from_slice(&b[..4]);
            return Err(ProtocolError::BadMagic {
                sequence: seq,
                found,
            });
        }
        if b.len() < HEADER_LEN {
            return Ok(None);
        }
        let raw_kind = u16::from_le_bytes([b[4], b[5]]);
        let length = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if length > MAX_PAYLOAD {
            return Err(ProtocolError::Oversized {
                sequence: seq,
                kind: kind_name(raw_kind),
                length,
                max: MAX_PAYLOAD,
            });
        }
        Ok(Some(HEADER_LEN + length as usize))
    }

    /// Whether a whole frame is buffered (errors early on a bad header).
    fn has_frame(&self) -> Result<bool, ProtocolError> {
        Ok(self
            .frame_len()?
            .is_some_and(|total| self.end - self.pos >= total))
    }

    /// The next whole frame, checked, its payload borrowed from the
    /// buffer; `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame<'_>>, ProtocolError> {
        if !self.has_frame()? {
            return Ok(None);
        }
        let Some(total) = self.frame_len()? else {
            return Ok(None);
        };
        let b = &self.buf[self.pos..self.pos + total];
        let stated = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        // Checksum first: any later complaint about a corrupted field would
        // be misleading.
        let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..16]), &b[HEADER_LEN..]);
        if computed != stated {
            return Err(ProtocolError::Checksum {
                sequence: self.next_sequence,
                kind: kind_name(u16::from_le_bytes([b[4], b[5]])),
                length: (total - HEADER_LEN) as u32,
                computed,
                stated,
            });
        }
        let h = self.header()?.expect("a whole frame has a header");
        let (kind, seq) = (h.kind, h.sequence);
        let start = self.pos;
        self.pos += total;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        self.next_sequence = self.next_sequence.wrapping_add(1);
        Ok(Some(RawFrame {
            kind,
            sequence: seq,
            payload: &self.buf[start + HEADER_LEN..start + total],
        }))
    }

    /// The next frame's header once its bytes are buffered, checked as far
    /// as it can be without the payload (magic, length, type, flags,
    /// sequence); its CRC covers the payload too, so it is checked by
    /// [`stream_end`](Self::stream_end) or [`next_frame`](Self::next_frame).
    pub fn header(&self) -> Result<Option<FrameHeader>, ProtocolError> {
        let Some(total) = self.frame_len()? else {
            return Ok(None);
        };
        let b = self.data();
        let seq = self.next_sequence;
        let raw_kind = u16::from_le_bytes([b[4], b[5]]);
        let kind = MessageType::from_u16(raw_kind).ok_or(ProtocolError::UnknownType {
            sequence: seq,
            value: raw_kind,
        })?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags != 0 {
            return Err(ProtocolError::BadFlags {
                sequence: seq,
                kind,
                flags,
            });
        }
        let found_seq = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if found_seq != seq {
            return Err(ProtocolError::Sequence {
                kind,
                expected: seq,
                found: found_seq,
            });
        }
        Ok(Some(FrameHeader {
            kind,
            sequence: seq,
            length: total - HEADER_LEN,
            stated: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            header_crc: crc32c::crc32c(&b[..16]),
        }))
    }

    /// Starts reading the frame whose header [`header`](Self::header)
    /// returned piece by piece (the target writes page data straight from
    /// the stream into guest memory): consumes the header. Until
    /// [`stream_end`](Self::stream_end), only the `stream_*` calls may be
    /// used.
    pub fn stream_begin(&mut self, h: &FrameHeader) -> StreamedFrame {
        self.pos += HEADER_LEN;
        StreamedFrame {
            kind: h.kind,
            sequence: h.sequence,
            length: h.length,
            left: h.length,
            crc: h.header_crc,
            stated: h.stated,
        }
    }

    /// Reads once from `r` into the buffer, at most `want` bytes and never
    /// past the end of frame `f`, so that data runs can be read straight
    /// to their destination. Returns what `read` returned.
    pub fn stream_fill<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        f: &StreamedFrame,
        want: usize,
    ) -> io::Result<usize> {
        self.fill_small(r, want.min(f.left.saturating_sub(self.buffered())).max(1))
    }

    /// Consumes `n` buffered bytes of frame `f` (the caller made sure they
    /// are buffered, with [`stream_fill`](Self::stream_fill)).
    pub fn stream_take(&mut self, f: &mut StreamedFrame, n: usize) -> Result<&[u8], ProtocolError> {
        if n > f.left {
            return Err(f.overrun(n));
        }
        assert!(n <= self.buffered(), "stream_take past the buffered bytes");
        let start = self.pos;
        self.pos += n;
        f.consumed(&self.buf[start..start + n]);
        Ok(&self.buf[start..start + n])
    }

    /// Fills part of `dst` with the next bytes of frame `f`: from the
    /// buffer if it holds any, else with one read from `r` straight into
    /// `dst`. Returns how many bytes it wrote (0: end of stream).
    pub fn stream_into<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        f: &mut StreamedFrame,
        dst: &mut [u8],
    ) -> Result<usize, StreamError> {
        if dst.len() > f.left {
            return Err(StreamError::Protocol(f.overrun(dst.len())));
        }
        let n = if self.buffered() > 0 {
            let n = dst.len().min(self.buffered());
            dst[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            n
        } else {
            let n = r.read(dst).map_err(StreamError::Io)?;
            self.received += n as u64;
            n
        };
        f.consumed(&dst[..n]);
        Ok(n)
    }

    /// Ends frame `f`: all of its payload must have been consumed, and its
    /// CRC must match; the next frame may follow.
    pub fn stream_end(&mut self, f: StreamedFrame) -> Result<(), ProtocolError> {
        if f.left != 0 {
            return Err(ProtocolError::Malformed {
                sequence: f.sequence,
                kind: f.kind,
                what: format!("{} bytes left over after its last run", f.left),
            });
        }
        if f.crc != f.stated {
            return Err(ProtocolError::Checksum {
                sequence: f.sequence,
                kind: kind_name(f.kind as u16),
                length: f.length as u32,
                computed: f.crc,
                stated: f.stated,
            });
        }
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        self.next_sequence = self.next_sequence.wrapping_add(1);
        Ok(())
    }

    /// The error for a stream that ended inside frame `f`.
    pub fn stream_truncated(&self, f: &StreamedFrame) -> ProtocolError {
        ProtocolError::Truncated {
            sequence: f.sequence,
            kind: kind_name(f.kind as u16),
            got: HEADER_LEN + f.length - f.left,
            want: HEADER_LEN + f.length,
        }
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        match self.next_frame()? {
            Some(f) => f.decode().map(Some),
            None => Ok(None),
        }
    }

    /// Call at end of stream: an error if a frame was cut short.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buffered() == 0 {
            return Ok(());
        }
        let b = self.data();
        let (kind, want) = match self.frame_len()? {
            Some(total) => (kind_name(u16::from_le_bytes([b[4], b[5]])), total),
            None => ("header".to_string(), HEADER_LEN),
        };
        Err(ProtocolError::Truncated {
            sequence: self.next_sequence,
            kind,
            got: b.len(),
            want,
        })
    }
}

/// A frame header checked by [`Decoder::header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Its type.
    pub kind: MessageType,
    /// Its sequence number.
    pub sequence: u32,
    /// Payload bytes.
    pub length: usize,
    /// The CRC-32C the sender wrote (over header bytes 0..16 and the
    /// payload).
    stated: u32,
    /// CRC-32C of header bytes 0..16, continued over the payload.
    header_crc: u32,
}

/// A frame being read piece by piece ([`Decoder::stream_begin`]): how much
/// of its payload is left, and its CRC so far.
#[derive(Debug)]
pub struct StreamedFrame {
    kind: MessageType,
    sequence: u32,
    length: usize,
    left: usize,
    crc: u32,
    stated: u32,
}

impl StreamedFrame {
    /// Payload bytes not yet consumed.
    pub fn left(&self) -> usize {
        self.left
    }

    /// Its sequence number.
    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    fn consumed(&mut self, bytes: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.left -= bytes.len();
    }

    fn overrun(&self, n: usize) -> ProtocolError {
        ProtocolError::Malformed {
            sequence: self.sequence,
            kind: self.kind,
            what: format!(
                "a run needs {n} more bytes, the frame has {} left",
                self.left
            ),
        }
    }
}

/// Why [`Decoder::stream_into`] failed.
#[derive(Debug)]
pub enum StreamError {
    /// Reading the stream failed (a read timeout shows as `WouldBlock` or
    /// `TimedOut`).
    Io(io::Error),
    /// The frame broke a rule.
    Protocol(ProtocolError),
}

/// Writes frames with consecutive sequence numbers.
#[derive(Debug, Default)]
pub struct Encoder {
    next_sequence: u32,
}

impl Encoder {
    /// An encoder starting at sequence 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Completes `frame` (header, run count, sequence number, CRC) and
    /// writes it; returns the bytes written. The frame must have been
    /// started with [`PagesFrame::begin`].
    pub fn send_pages<W: Write + ?Sized>(
        &mut self,
        w: &mut W,
        frame: &mut PagesFrame,
    ) -> Result<usize, ProtocolError> {
        let len = frame.len - HEADER_LEN;
        if len > MAX_PAYLOAD as usize {
            return Err(ProtocolError::TooLargeToSend {
                kind: MessageType::Pages,
                length: len,
                max: MAX_PAYLOAD,
            });
        }
        let b = &mut frame.buf[..frame.len];
        b[RUN_COUNT_AT..RUN_COUNT_AT + 4].copy_from_slice(&frame.runs.to_le_bytes());
        b[..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&(MessageType::Pages as u16).to_le_bytes());
        b[6..8].copy_from_slice(&0u16.to_le_bytes());
        b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        b[12..16].copy_from_slice(&self.next_sequence.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..16]), &b[HEADER_LEN..]);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        w.write_all(b).map_err(ProtocolError::Io)?;
        self.next_sequence = self.next_sequence.wrapping_add(1);
        Ok(b.len())
    }

    /// Encodes `msg` and writes it; returns the bytes written.
    pub fn send<W: Write + ?Sized>(
        &mut self,
        w: &mut W,
        msg: &Message,
    ) -> Result<usize, ProtocolError> {
        let frame = encode_frame(msg, self.next_sequence)?;
        w.write_all(&frame).map_err(ProtocolError::Io)?;
        self.next_sequence = self.next_sequence.wrapping_add(1);
        Ok(frame.len())
    }
}

/// A `Pages` frame built in place, in one buffer reused from frame to
/// frame: the bytes are exactly those [`encode_frame`] produces for the
/// equivalent [`Message::Pages`], without a `Vec` per run and the copies
/// from runs to payload to frame. The source's hot path.
#[derive(Debug, Default)]
pub struct PagesFrame {
    /// `buf[..len]` is the frame; the rest is room kept from larger
    /// frames (initialized once, so pages can be read straight into it).
    buf: Vec<u8>,
    len: usize,
    runs: u32,
    data_pages: u32,
    /// Room to compress a run into.
    lz4: Vec<u8>,
}

/// Offset of the run count inside a `Pages` frame (header, then round).
const RUN_COUNT_AT: usize = HEADER_LEN + 4;

impl PagesFrame {
    /// An empty frame; call [`begin`](Self::begin) before adding runs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allocates, and writes to, room for frames of up to `pages` data
    /// pages, so the memory is committed now rather than on the first
    /// frame (a `high` priority migration reserves before it connects).
    pub fn commit(&mut self, pages: u32) {
        let len = pages as usize * super::PAGE_SIZE;
        let frame = HEADER_LEN + 8 + len + pages as usize * (super::RUN_HEADER_LEN + 4);
        self.len = 0;
        self.buf.clear();
        self.buf.resize(frame, 0);
        self.lz4.clear();
        self.lz4
            .resize(lz4_flex::block::get_maximum_output_size(len), 0);
    }

    /// Starts a frame of round `round`, dropping whatever it held.
    pub fn begin(&mut self, round: u32) {
        self.len = HEADER_LEN;
        self.room(8);
        self.put(&round.to_le_bytes());
        self.put(&0u32.to_le_bytes());
        self.runs = 0;
        self.data_pages = 0;
    }

    /// Makes `buf[len..len + n]` exist.
    fn room(&mut self, n: usize) {
        if self.buf.len() < self.len + n {
            self.buf.resize(self.len + n, 0);
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn header_at(&mut self, at: usize, gpa: u64, pages: u32, kind: u8, checksum: u32) {
        let h = &mut self.buf[at..at + super::RUN_HEADER_LEN];
        h[..8].copy_from_slice(&gpa.to_le_bytes());
        h[8..12].copy_from_slice(&pages.to_le_bytes());
        h[12..16].copy_from_slice(&[kind, 0, 0, 0]);
        h[16..20].copy_from_slice(&checksum.to_le_bytes());
    }

    /// Room after the frame's end for `pages` pages, preceded by room for
    /// a run header: the source reads guest memory straight into it (one
    /// copy instead of two), then calls [`finish_read`](Self::finish_read).
    pub fn read_area(&mut self, pages: usize) -> &mut [u8] {
        let len = pages * super::PAGE_SIZE;
        self.room(super::RUN_HEADER_LEN + len);
        let at = self.len + super::RUN_HEADER_LEN;
        &mut self.buf[at..at + len]
    }

    /// Turns the pages read into [`read_area`](Self::read_area) (`zero`:
    /// one flag per page, set for pages to announce as zero) into runs in
    /// place: zero runs become headers, data runs keep their bytes, moved
    /// down over the zero pages before them. With `checksums`, each data
    /// run carries its CRC-32C. Returns (data pages, zero pages, runs).
    ///
    /// In place is safe because the write position never passes the read
    /// position: it starts one run header before the first page, a data
    /// run adds a header and its pages, and a zero run adds a header but
    /// removes at least one page (4096 bytes) of input.
    pub fn finish_read(&mut self, gpa: u64, zero: &[bool], checksums: bool) -> (u32, u32, u32) {
        const PAGE: usize = super::PAGE_SIZE;
        const RH: usize = super::RUN_HEADER_LEN;
        let data0 = self.len + RH;
        let mut w = self.len;
        let (mut data, mut zeros, mut runs) = (0, 0, 0);
        let mut i = 0;
        while i < zero.len() {
            let z = zero[i];
            let mut j = i + 1;
            while j < zero.len() && zero[j] == z {
                j += 1;
            }
            let count = (j - i) as u32;
            let at = gpa + (i * PAGE) as u64;
            if z {
                self.header_at(w, at, count, 1, 0);
                w += RH;
                zeros += count;
            } else {
                let (src, len) = (data0 + i * PAGE, (j - i) * PAGE);
                if src != w + RH {
                    self.buf.copy_within(src..src + len, w + RH);
                }
                let checksum = if checksums {
                    crc32c::crc32c(&self.buf[w + RH..w + RH + len])
                } else {
                    0
                };
                self.header_at(w, at, count, 0, checksum);
                w += RH + len;
                data += count;
            }
            runs += 1;
            i = j;
        }
        self.len = w;
        self.runs += runs;
        self.data_pages += data;
        (data, zeros, runs)
    }

    /// Runs added since [`begin`](Self::begin).
    pub fn runs(&self) -> u32 {
        self.runs
    }

    /// Pages carried with data since [`begin`](Self::begin).
    pub fn data_pages(&self) -> u32 {
        self.data_pages
    }

    fn run_header(&mut self, gpa: u64, pages: u32, kind: u8, checksum: u32) {
        self.room(super::RUN_HEADER_LEN);
        self.header_at(self.len, gpa, pages, kind, checksum);
        self.len += super::RUN_HEADER_LEN;
        self.runs += 1;
    }

    /// Adds `pages` zero pages at `gpa`, announced without data.
    pub fn push_zero(&mut self, gpa: u64, pages: u32) {
        self.run_header(gpa, pages, 1, 0);
    }

    /// Adds the pages in `data` (a whole number of pages) at `gpa`, with
    /// their CRC-32C in checksum mode (else 0).
    pub fn push_data(&mut self, gpa: u64, data: &[u8], checksum: u32) {
        let pages = (data.len() / super::PAGE_SIZE) as u32;
        self.run_header(gpa, pages, 0, checksum);
        self.put(data);
        self.data_pages += pages;
    }

    /// Adds the pages in `data` at `gpa` as one LZ4 block if that makes
    /// them smaller by at least an eighth, else as they are (capability
    /// LZ4 only). `checksum` is of the uncompressed data.
    pub fn push_data_lz4(&mut self, gpa: u64, data: &[u8], checksum: u32) {
        let room = lz4_flex::block::get_maximum_output_size(data.len());
        self.lz4.resize(room, 0);
        match lz4_flex::block::compress_into(data, &mut self.lz4) {
            Ok(n) if n + 4 < data.len() - data.len() / 8 => {
                let pages = (data.len() / super::PAGE_SIZE) as u32;
                self.run_header(gpa, pages, 2, checksum);
                self.put(&(n as u32).to_le_bytes());
                let lz4 = std::mem::take(&mut self.lz4);
                self.put(&lz4[..n]);
                self.lz4 = lz4;
                self.data_pages += pages;
            }
            _ => self.push_data(gpa, data, checksum),
        }
    }
}

/// Reads one message, blocking until it is complete. `Ok(None)` if the
/// stream's read timeout expired with no whole message yet (partial bytes
/// stay in the decoder). A clean end of stream between frames is
/// `UnexpectedEof`; inside a frame it is [`ProtocolError::Truncated`].
pub fn read_message<R: Read + ?Sized>(
    r: &mut R,
    dec: &mut Decoder,
) -> Result<Option<Message>, ProtocolError> {
    match read_frame(r, dec)? {
        Some(f) => f.decode().map(Some),
        None => Ok(None),
    }
}

/// [`read_message`] without decoding: the next whole frame, checked, its
/// payload borrowed from the decoder.
pub fn read_frame<'d, R: Read + ?Sized>(
    r: &mut R,
    dec: &'d mut Decoder,
) -> Result<Option<RawFrame<'d>>, ProtocolError> {
    if poll_frame(r, dec)? {
        dec.next_frame()
    } else {
        Ok(None)
    }
}

/// Reads until `dec` holds a whole frame (true) or the stream's read
/// timeout expires first (false); errors as [`read_message`]. The frame
/// is then taken with [`Decoder::next_frame`].
pub fn poll_frame<R: Read + ?Sized>(r: &mut R, dec: &mut Decoder) -> Result<bool, ProtocolError> {
    while !dec.has_frame()? {
        match dec.fill(r) {
            Ok(0) => {
                dec.finish()?;
                return Err(ProtocolError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection",
                )));
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(true)
}
