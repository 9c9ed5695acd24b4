//! Framing: one [`Message`] per frame, the header layout documented in the
//! parent module. Encoding, incremental decoding that survives read
//! timeouts, and the checks that make a torn or corrupted stream fail with
//! a precise error.

use super::{Message, MessageType, ProtocolError, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use std::io::{self, Read, Write};

/// Encodes one frame with the given sequence number.
pub fn encode_frame(msg: &Message, sequence: u32) -> Result<Vec<u8>, ProtocolError> {
    let payload = msg.encode_payload();
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(ProtocolError::TooLargeToSend {
            kind: msg.kind(),
            length: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(msg.kind() as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
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
        let seq = self.next_sequence;
        let raw_kind = u16::from_le_bytes([b[4], b[5]]);
        let flags = u16::from_le_bytes([b[6], b[7]]);
        let length = (total - HEADER_LEN) as u32;
        let found_seq = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let stated = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        let payload = &b[HEADER_LEN..total];
        // Checksum first: any later complaint about a corrupted field would
        // be misleading.
        let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..16]), payload);
        if computed != stated {
            return Err(ProtocolError::Checksum {
                sequence: seq,
                kind: kind_name(raw_kind),
                length,
                computed,
                stated,
            });
        }
        let kind = MessageType::from_u16(raw_kind).ok_or(ProtocolError::UnknownType {
            sequence: seq,
            value: raw_kind,
        })?;
        if flags != 0 {
            return Err(ProtocolError::BadFlags {
                sequence: seq,
                kind,
                flags,
            });
        }
        if found_seq != seq {
            return Err(ProtocolError::Sequence {
                kind,
                expected: seq,
                found: found_seq,
            });
        }
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
        let len = frame.buf.len() - HEADER_LEN;
        if len > MAX_PAYLOAD as usize {
            return Err(ProtocolError::TooLargeToSend {
                kind: MessageType::Pages,
                length: len,
                max: MAX_PAYLOAD,
            });
        }
        let b = &mut frame.buf;
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
    buf: Vec<u8>,
    runs: u32,
    data_pages: u32,
}

/// Offset of the run count inside a `Pages` frame (header, then round).
const RUN_COUNT_AT: usize = HEADER_LEN + 4;

impl PagesFrame {
    /// An empty frame; call [`begin`](Self::begin) before adding runs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a frame of round `round`, dropping whatever it held.
    pub fn begin(&mut self, round: u32) {
        self.buf.clear();
        self.buf.resize(HEADER_LEN, 0);
        self.buf.extend_from_slice(&round.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.runs = 0;
        self.data_pages = 0;
    }

    /// Runs added since [`begin`](Self::begin).
    pub fn runs(&self) -> u32 {
        self.runs
    }

    /// Pages carried with data since [`begin`](Self::begin).
    pub fn data_pages(&self) -> u32 {
        self.data_pages
    }

    fn run_header(&mut self, gpa: u64, pages: u32, zero: bool, checksum: u32) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&pages.to_le_bytes());
        self.buf.extend_from_slice(&[u8::from(zero), 0, 0, 0]);
        self.buf.extend_from_slice(&checksum.to_le_bytes());
        self.runs += 1;
    }

    /// Adds `pages` zero pages at `gpa`, announced without data.
    pub fn push_zero(&mut self, gpa: u64, pages: u32) {
        self.run_header(gpa, pages, true, 0);
    }

    /// Adds the pages in `data` (a whole number of pages) at `gpa`, with
    /// their CRC-32C in checksum mode (else 0).
    pub fn push_data(&mut self, gpa: u64, data: &[u8], checksum: u32) {
        let pages = (data.len() / super::PAGE_SIZE) as u32;
        self.run_header(gpa, pages, false, checksum);
        self.buf.extend_from_slice(data);
        self.data_pages += pages;
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
