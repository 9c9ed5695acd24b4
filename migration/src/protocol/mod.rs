//! The migration wire protocol: framing, message types, version negotiation.
//!
//! One connection carries one migration. The source connects, the target
//! listens. Every message is one frame; the same framing is used in both
//! directions.
//!
//! # Sequence
//!
//! ```text
//!  source                                             target
//!    |--- Hello {versions 1..=1, capabilities} -------->|
//!    |<-- Hello {versions, capabilities} ---------------|  (or Abort: versions)
//!    |--- Precheck {VM facts: CPU, memory, disks, nets}>|
//!    |<-- PrecheckResult {failures: [] or [..]} --------|  target commits memory if priority high
//!    |--- MemoryLayout {regions} ---------------------->|
//!    |--- Pages {round 0, runs} ... ------------------->|  all of memory, zero
//!    |--- RoundEnd {0} -------------------------------->|  pages as announcements
//!    |--- Pages {round N, dirty runs} ... ------------->|  pre-copy rounds,
//!    |--- RoundEnd {N} -------------------------------->|  guest still running
//!    |<-- RoundDone {N} ---------------------------------|  (ROUND_ACK) round N in memory
//!    |        (source pauses the guest: "stun")         |
//!    |--- Pages {last round} ... ---------------------->|
//!    |   (LEASE_HANDOFF: source stops lease renewals)   |
//!    |--- State {vCPU + device blob} ------------------>|
//!    |--- Complete {pages, rounds, lease?} ------------>|  target restores; with a
//!    |                                                  |  lease claims generation
//!    |                                                  |  G+1 first, then resumes
//!    |<-- Resumed ---------------------------------------|  source may now be destroyed
//! ```
//!
//! Lease handoff (capability `LEASE_HANDOFF`, for a VM with an HA disk
//! lease): the pre-check refuses a source with a lease and a target
//! without a handoff lease spec, the reverse, and two different lease
//! records. At switchover the source, with its guest paused and drained,
//! stops renewing generation G and sends it in `Complete`. The target
//! claims G+1 with the exclusive claim file `lease.claim.G+1`, writes the
//! record naming itself, starts renewing, and only then runs the guest and
//! answers `Resumed`; a lost claim means it aborts without running the
//! guest. A source that sent the lease and then sees a failure (no
//! `Resumed`, a cut, an `Abort`) claims the same G+1: it wins and resumes
//! the guest, or loses (the target runs it) and stops without writing
//! anything; if the claim cannot be decided it keeps the guest paused,
//! lease-suspended. One claim file, one winner: at most one copy runs.
//!
//! At any point either side may send `Abort {stage, reason}` and close; the
//! source sends `Cancel` when a user cancels. The target never starts the
//! guest unless every frame up to `Complete` arrived intact, in order, with
//! every page announced in the layout.
//!
//! # Frame layout (little endian)
//!
//! ```text
//! offset size field
//!  0      4   magic     b"VGMF"
//!  4      2   type      MessageType as u16
//!  6      2   flags     reserved, must be 0
//!  8      4   length    payload bytes, <= MAX_PAYLOAD
//! 12      4   sequence  0 for the first frame in each direction, +1 per frame
//! 16      4   crc32c    CRC-32C over bytes 0..16 and the payload
//! 20      -   payload
//! ```
//!
//! The CRC covers the header too, so a flipped bit anywhere in a frame is
//! caught; the length is checked against [`MAX_PAYLOAD`] before anything is
//! allocated; the sequence number catches a lost or repeated frame on a stream
//! that was torn and re-joined. CRC-32C (Castagnoli) because it has hardware
//! support on x86-64 (SSE 4.2) and detects every 1-3 bit error in frames of
//! this size.
//!
//! Payloads: control messages (`Hello`, `Precheck`, `PrecheckResult`,
//! `Complete`, `Abort`) are JSON so fields can be added without a protocol
//! bump (unknown fields are ignored, missing optional ones default). Bulk
//! messages are binary:
//!
//! ```text
//! MemoryLayout: count u32, then count x { gpa u64, size u64 }
//! Pages:        round u32, count u32, then count x run:
//!               gpa u64, pages u32, kind u8 (0 data, 1 zero, 2 LZ4),
//!               pad [u8; 3], checksum u32 (CRC-32C of the run's
//!               uncompressed data, 0 if not in checksum mode or zero run),
//!               then for kind 0: data (pages * PAGE_SIZE bytes); for
//!               kind 2 (capability LZ4 only): length u32, then that many
//!               bytes of one LZ4 block that decompresses to exactly
//!               pages * PAGE_SIZE bytes
//! RoundEnd:     round u32
//! RoundDone:    round u32
//! State:        opaque bytes from the VMM's snapshot code
//! Resumed, Cancel: empty
//! ```

use serde::{Deserialize, Serialize};
use std::io;

/// Frame magic: "ViGil Migration Frame".
pub const MAGIC: [u8; 4] = *b"VGMF";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 20;
/// Largest payload accepted: a `Pages` frame of up to 1024 pages (4 MiB)
/// plus its run headers, or a state blob. Bigger state would need chunking.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Guest page size the protocol moves.
pub const PAGE_SIZE: usize = 4096;
/// Lowest protocol version this build speaks.
pub const VERSION_MIN: u16 = 1;
/// Highest protocol version this build speaks.
pub const VERSION_MAX: u16 = 1;

/// Bytes in one run header inside a `Pages` payload.
pub const RUN_HEADER_LEN: usize = 20;

/// Capability bits exchanged in `Hello`.
pub mod caps {
    /// Zero pages are announced without data.
    pub const ZERO_PAGES: u32 = 1 << 0;
    /// Each data run carries a CRC-32C of its pages, checked end to end
    /// against the target's memory after writing.
    pub const PAGE_CHECKSUM: u32 = 1 << 1;
    /// Data runs may be LZ4-compressed (kind 2), used while a bandwidth
    /// cap makes the link the bottleneck.
    pub const LZ4: u32 = 1 << 2;
    /// The target acknowledges each pre-copy round once it is in guest
    /// memory (`RoundDone`): the source stuns the guest only when the
    /// target has caught up, so what is still in flight or being written
    /// there is not downtime.
    pub const ROUND_ACK: u32 = 1 << 3;
    /// The source's HA disk lease moves with the VM: `Complete` carries
    /// it, the target claims its next generation before it runs the guest
    /// (see [`super::LeaseHandoff`]). A source holding a lease migrates
    /// only to a target that has this capability.
    pub const LEASE_HANDOFF: u32 = 1 << 4;
    /// Everything this build understands.
    pub const ALL: u32 = ZERO_PAGES | PAGE_CHECKSUM | LZ4 | ROUND_ACK | LEASE_HANDOFF;
}

/// Frame errors: each names the message and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The first four bytes of a frame were not [`MAGIC`].
    #[error(
        "frame {sequence}: bad magic {found:02x?} (not a vigil migration stream, or it lost sync)"
    )]
    BadMagic {
        /// Expected sequence number of the frame.
        sequence: u32,
        /// What was there.
        found: [u8; 4],
    },
    /// A header's length exceeds [`MAX_PAYLOAD`].
    #[error("frame {sequence} ({kind}): payload length {length} exceeds the maximum {max}")]
    Oversized {
        /// Expected sequence number.
        sequence: u32,
        /// Type as read (maybe unknown).
        kind: String,
        /// Length as read.
        length: u32,
        /// The limit.
        max: u32,
    },
    /// CRC mismatch over header + payload.
    #[error("frame {sequence} ({kind}, {length} bytes): checksum mismatch (computed {computed:#010x}, frame says {stated:#010x}): corrupted in transit")]
    Checksum {
        /// Sequence number.
        sequence: u32,
        /// Type as read.
        kind: String,
        /// Payload length.
        length: u32,
        /// CRC we computed.
        computed: u32,
        /// CRC in the frame.
        stated: u32,
    },
    /// The type field names no message this version knows.
    #[error("frame {sequence}: unknown message type {value}")]
    UnknownType {
        /// Sequence number.
        sequence: u32,
        /// The raw value.
        value: u16,
    },
    /// Reserved flags were set.
    #[error("frame {sequence} ({kind}): unknown flags {flags:#06x}")]
    BadFlags {
        /// Sequence number.
        sequence: u32,
        /// Type.
        kind: MessageType,
        /// Flags.
        flags: u16,
    },
    /// A frame arrived out of order.
    #[error("frame {kind}: sequence {found}, expected {expected} (a frame was lost or repeated)")]
    Sequence {
        /// Type.
        kind: MessageType,
        /// Expected.
        expected: u32,
        /// Found.
        found: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside frame {sequence} ({kind}): got {got} of {want} bytes")]
    Truncated {
        /// Sequence number.
        sequence: u32,
        /// Type if the header was complete, else "header".
        kind: String,
        /// Bytes received of this frame.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// The payload of a known type did not parse.
    #[error("frame {sequence} ({kind}): malformed payload: {what}")]
    Malformed {
        /// Sequence number.
        sequence: u32,
        /// Type.
        kind: MessageType,
        /// What was wrong.
        what: String,
    },
    /// The payload would not fit one frame.
    #[error("{kind} payload of {length} bytes exceeds the frame maximum {max}")]
    TooLargeToSend {
        /// Type.
        kind: MessageType,
        /// Length.
        length: usize,
        /// Limit.
        max: u32,
    },
    /// Reading or writing the stream failed.
    #[error("migration stream I/O failed")]
    Io(#[source] io::Error),
}

/// The message types. Values are wire format: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageType {
    /// Version range and capabilities (both directions).
    Hello = 1,
    /// VM facts for pre-checks (source to target).
    Precheck = 2,
    /// Pre-check outcome (target to source).
    PrecheckResult = 3,
    /// Guest RAM regions (source to target).
    MemoryLayout = 4,
    /// Page runs (source to target).
    Pages = 5,
    /// End of one pre-copy round (source to target).
    RoundEnd = 6,
    /// vCPU + device state blob (source to target).
    State = 7,
    /// Everything sent (source to target).
    Complete = 8,
    /// The target runs the guest (target to source).
    Resumed = 9,
    /// Failure, with the stage and reason (either direction).
    Abort = 10,
    /// The user cancelled (source to target).
    Cancel = 11,
    /// A pre-copy round is in guest memory (target to source, capability
    /// ROUND_ACK).
    RoundDone = 12,
}

impl MessageType {
    fn from_u16(v: u16) -> Option<Self> {
        use MessageType::*;
        Some(match v {
            1 => Hello,
            2 => Precheck,
            3 => PrecheckResult,
            4 => MemoryLayout,
            5 => Pages,
            6 => RoundEnd,
            7 => State,
            8 => Complete,
            9 => Resumed,
            10 => Abort,
            11 => Cancel,
            12 => RoundDone,
            _ => return None,
        })
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// `Hello`: who we are and what we speak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest protocol version spoken.
    pub version_min: u16,
    /// Highest protocol version spoken.
    pub version_max: u16,
    /// [`caps`] bits offered (source) or accepted (target).
    pub capabilities: u32,
    /// Host name, for messages.
    pub host: String,
    /// Software version (`vigil x.y.z`), for messages.
    pub software: String,
}

impl Hello {
    /// Our own hello.
    pub fn ours(host: &str, capabilities: u32) -> Self {
        Hello {
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            capabilities,
            host: host.to_string(),
            software: format!("vigil {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Version negotiation failed: no common protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{peer_host} ({peer_software}) speaks migration protocol {peer_min}..{peer_max}, this host speaks {our_min}..{our_max}: {advice}")]
pub struct VersionMismatch {
    /// Peer's range.
    pub peer_min: u16,
    /// Peer's range.
    pub peer_max: u16,
    /// Ours.
    pub our_min: u16,
    /// Ours.
    pub our_max: u16,
    /// Peer's host name.
    pub peer_host: String,
    /// Peer's software version.
    pub peer_software: String,
    /// What to do.
    pub advice: String,
}

/// Picks the highest version both sides speak, or says which side to upgrade.
pub fn negotiate(ours: &Hello, peer: &Hello) -> Result<u16, VersionMismatch> {
    let lo = ours.version_min.max(peer.version_min);
    let hi = ours.version_max.min(peer.version_max);
    if lo <= hi {
        return Ok(hi);
    }
    let advice = if peer.version_min > ours.version_max {
        format!("upgrade vigil on {}", ours.host)
    } else {
        format!("upgrade vigil on {}", peer.host)
    };
    Err(VersionMismatch {
        peer_min: peer.version_min,
        peer_max: peer.version_max,
        our_min: ours.version_min,
        our_max: ours.version_max,
        peer_host: peer.host.clone(),
        peer_software: peer.software.clone(),
        advice,
    })
}

/// One guest RAM region as the protocol sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Guest physical start, page aligned.
    pub gpa: u64,
    /// Bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
}

/// One run of consecutive pages in a `Pages` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRun {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// `None`: all zero (announced without data). `Some`: the bytes.
    pub data: Option<Vec<u8>>,
    /// CRC-32C of `data` in checksum mode, else 0.
    pub checksum: u32,
}

/// `Complete`: what the source sent, so the target can cross-check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    /// Rounds sent, the last (stunned) one included.
    pub rounds: u32,
    /// Page runs sent in all rounds.
    pub runs: u64,
    /// The HA disk lease the source held, handed over with the final state
    /// (capability `LEASE_HANDOFF`; absent for a VM without a lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseHandoff>,
}

/// The lease a source hands over at switchover: its renewals have stopped,
/// its guest is paused and drained. The target claims `generation + 1`
/// (exclusive claim file beside `file`) before it runs the guest; after a
/// failure the source claims the same generation, so exactly one of them
/// runs the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHandoff {
    /// The lease record on the shared datastore (the source's path).
    pub file: std::path::PathBuf,
    /// Who holds it now (the source host).
    pub owner: String,
    /// The generation the source holds.
    pub generation: u64,
}

/// `Abort`: why a side gives up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// Stage the sender was in.
    pub stage: String,
    /// Human-readable reason.
    pub reason: String,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// See [`MessageType::Hello`].
    Hello(Hello),
    /// See [`MessageType::Precheck`].
    Precheck(crate::precheck::VmFacts),
    /// See [`MessageType::PrecheckResult`].
    PrecheckResult(Vec<crate::precheck::Failure>),
    /// See [`MessageType::MemoryLayout`].
    MemoryLayout(Vec<Region>),
    /// See [`MessageType::Pages`].
    Pages {
        /// Round number (0 = the full copy).
        round: u32,
        /// Runs.
        runs: Vec<PageRun>,
    },
    /// See [`MessageType::RoundEnd`].
    RoundEnd(u32),
    /// See [`MessageType::State`].
    State(Vec<u8>),
    /// See [`MessageType::Complete`].
    Complete(Complete),
    /// See [`MessageType::Resumed`].
    Resumed,
    /// See [`MessageType::Abort`].
    Abort(Abort),
    /// See [`MessageType::Cancel`].
    Cancel,
    /// See [`MessageType::RoundDone`].
    RoundDone(u32),
}

impl Message {
    /// The wire type.
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::Precheck(_) => MessageType::Precheck,
            Message::PrecheckResult(_) => MessageType::PrecheckResult,
            Message::MemoryLayout(_) => MessageType::MemoryLayout,
            Message::Pages { .. } => MessageType::Pages,
            Message::RoundEnd(_) => MessageType::RoundEnd,
            Message::State(_) => MessageType::State,
            Message::Complete(_) => MessageType::Complete,
            Message::Resumed => MessageType::Resumed,
            Message::Abort(_) => MessageType::Abort,
            Message::Cancel => MessageType::Cancel,
            Message::RoundDone(_) => MessageType::RoundDone,
        }
    }

    /// The payload bytes.
    pub fn encode_payload(&self) -> Vec<u8> {
        fn json<T: Serialize>(v: &T) -> Vec<u8> {
            // Serialising plain structs of strings and numbers cannot fail.
            serde_json::to_vec(v).unwrap_or_default()
        }
        match self {
            Message::Hello(h) => json(h),
            Message::Precheck(f) => json(f),
            Message::PrecheckResult(r) => json(r),
            Message::Complete(c) => json(c),
            Message::Abort(a) => json(a),
            Message::MemoryLayout(regions) => {
                let mut out = Vec::with_capacity(4 + 16 * regions.len());
                out.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                for r in regions {
                    out.extend_from_slice(&r.gpa.to_le_bytes());
                    out.extend_from_slice(&r.size.to_le_bytes());
                }
                out
            }
            Message::Pages { round, runs } => {
                let data: usize = runs
                    .iter()
                    .map(|r| RUN_HEADER_LEN + r.data.as_ref().map_or(0, Vec::len))
                    .sum();
                let mut out = Vec::with_capacity(8 + data);
                out.extend_from_slice(&round.to_le_bytes());
                out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
                for r in runs {
                    out.extend_from_slice(&r.gpa.to_le_bytes());
                    out.extend_from_slice(&r.pages.to_le_bytes());
                    out.push(u8::from(r.data.is_none()));
                    out.extend_from_slice(&[0; 3]);
                    out.extend_from_slice(&r.checksum.to_le_bytes());
                    if let Some(d) = &r.data {
                        out.extend_from_slice(d);
                    }
                }
                out
            }
            Message::RoundEnd(n) | Message::RoundDone(n) => n.to_le_bytes().to_vec(),
            Message::State(blob) => blob.clone(),
            Message::Resumed | Message::Cancel => Vec::new(),
        }
    }

    /// Parses a payload of type `kind`.
    pub fn decode_payload(
        kind: MessageType,
        sequence: u32,
        p: &[u8],
    ) -> Result<Self, ProtocolError> {
        let bad = |what: String| ProtocolError::Malformed {
            sequence,
            kind,
            what,
        };
        fn json<T: for<'a> Deserialize<'a>>(p: &[u8]) -> Result<T, String> {
            serde_json::from_slice(p).map_err(|e| e.to_string())
        }
        let mut cur = Cursor { buf: p, pos: 0 };
        let msg = match kind {
            MessageType::Hello => Message::Hello(json(p).map_err(bad)?),
            MessageType::Precheck => Message::Precheck(json(p).map_err(bad)?),
            MessageType::PrecheckResult => Message::PrecheckResult(json(p).map_err(bad)?),
            MessageType::Complete => Message::Complete(json(p).map_err(bad)?),
            MessageType::Abort => Message::Abort(json(p).map_err(bad)?),
            MessageType::MemoryLayout => {
                let n = cur.u32().map_err(&bad)? as usize;
                // Each region is 16 bytes: bound n by what is really there.
                if n > cur.remaining() / 16 {
                    return Err(bad(format!(
                        "{n} regions announced, room for {}",
                        cur.remaining() / 16
                    )));
                }
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    let gpa = cur.u64().map_err(&bad)?;
                    let size = cur.u64().map_err(&bad)?;
                    regions.push(Region { gpa, size });
                }
                cur.end().map_err(&bad)?;
                Message::MemoryLayout(regions)
            }
            MessageType::Pages => {
                let (round, runs) = parse_pages(sequence, p)?;
                Message::Pages {
                    round,
                    runs: runs
                        .into_iter()
                        .map(|r| PageRun {
                            gpa: r.gpa,
                            pages: r.pages,
                            data: r.data.map(<[u8]>::to_vec),
                            checksum: r.checksum,
                        })
                        .collect(),
                }
            }
            MessageType::RoundEnd => {
                let n = cur.u32().map_err(&bad)?;
                cur.end().map_err(&bad)?;
                Message::RoundEnd(n)
            }
            MessageType::State => Message::State(p.to_vec()),
            MessageType::Resumed => {
                cur.end().map_err(&bad)?;
                Message::Resumed
            }
            MessageType::Cancel => {
                cur.end().map_err(&bad)?;
                Message::Cancel
            }
            MessageType::RoundDone => {
                let n = cur.u32().map_err(&bad)?;
                cur.end().map_err(&bad)?;
                Message::RoundDone(n)
            }
        };
        Ok(msg)
    }
}

/// A [`PageRun`] whose data is borrowed from a received frame (the
/// target writes it to guest memory from there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRunRef<'a> {
    /// Guest physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// `None`: all zero. `Some`: the bytes.
    pub data: Option<&'a [u8]>,
    /// CRC-32C of `data` in checksum mode, else 0.
    pub checksum: u32,
}

/// Parses a `Pages` payload (frame `sequence`) without copying its data:
/// the round and every run, all checked before any is returned.
pub fn parse_pages(sequence: u32, p: &[u8]) -> Result<(u32, Vec<PageRunRef<'_>>), ProtocolError> {
    let kind = MessageType::Pages;
    let bad = |what: String| ProtocolError::Malformed {
        sequence,
        kind,
        what,
    };
    let mut cur = Cursor { buf: p, pos: 0 };
    let round = cur.u32().map_err(&bad)?;
    let n = cur.u32().map_err(&bad)? as usize;
    if n > cur.remaining() / RUN_HEADER_LEN {
        return Err(bad(format!(
            "{n} runs announced, room for {}",
            cur.remaining() / RUN_HEADER_LEN
        )));
    }
    let mut runs = Vec::with_capacity(n);
    for i in 0..n {
        let h = parse_run_header(sequence, i, cur.take(RUN_HEADER_LEN).map_err(&bad)?)?;
        if h.lz4 {
            // Only the target's streaming reader decompresses.
            return Err(bad(format!(
                "run {i} at {:#x}: an LZ4 run in a frame decoded whole",
                h.gpa
            )));
        }
        let data = match h.data_len {
            Some(len) => Some(
                cur.take(len)
                    .map_err(|e| bad(format!("run {i} at {:#x}: {e}", h.gpa)))?,
            ),
            None => None,
        };
        runs.push(PageRunRef {
            gpa: h.gpa,
            pages: h.pages,
            data,
            checksum: h.checksum,
        });
    }
    cur.end().map_err(&bad)?;
    Ok((round, runs))
}

/// One run's header inside a `Pages` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunHeader {
    /// First page's guest address.
    pub gpa: u64,
    /// Pages in the run (at least 1).
    pub pages: u32,
    /// Bytes of data the run stands for (`None`: a zero run, no data).
    pub data_len: Option<usize>,
    /// The data comes as one LZ4 block after a `u32` length (kind 2).
    pub lz4: bool,
    /// The data's CRC-32C in checksum mode, else 0.
    pub checksum: u32,
}

/// Parses run `i`'s header (`RUN_HEADER_LEN` bytes) of `Pages` frame
/// `sequence`.
pub fn parse_run_header(sequence: u32, i: usize, b: &[u8]) -> Result<RunHeader, ProtocolError> {
    let bad = |what: String| ProtocolError::Malformed {
        sequence,
        kind: MessageType::Pages,
        what,
    };
    if b.len() != RUN_HEADER_LEN {
        return Err(bad(format!("run {i}: header of {} bytes", b.len())));
    }
    let gpa = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let pages = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    let kind = b[12];
    let checksum = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    if pages == 0 {
        return Err(bad(format!("run {i} at {gpa:#x} has 0 pages")));
    }
    let len = || {
        (pages as usize)
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| bad(format!("run {i}: {pages} pages overflow")))
    };
    let (data_len, lz4) = match kind {
        0 => (Some(len()?), false),
        1 => (None, false),
        2 => (Some(len()?), true),
        k => return Err(bad(format!("run {i} at {gpa:#x}: unknown kind {k}"))),
    };
    Ok(RunHeader {
        gpa,
        pages,
        data_len,
        lz4,
        checksum,
    })
}

/// Bounds-checked little-endian reader over a payload.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn end(&self) -> Result<(), String> {
        if self.remaining() != 0 {
            return Err(format!(
                "{} trailing bytes at offset {}",
                self.remaining(),
                self.pos
            ));
        }
        Ok(())
    }
}

mod frame;
pub use frame::{
    encode_frame, encode_raw, poll_frame, read_frame, read_message, Decoder, Encoder, FrameHeader,
    PagesFrame, RawFrame, StreamError, StreamedFrame,
};

#[cfg(test)]
mod tests;
