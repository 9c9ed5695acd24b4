//! The disk writer's journal: fixed-size records appended to a raw block
//! device (/dev/vda), one per 512-byte sector, so that a record is written
//! by one sector write (atomic on real and virtual disks).
//!
//! Record layout (little endian):
//!
//! | bytes    | field                                                    |
//! |----------|----------------------------------------------------------|
//! | 0..8     | magic `VIGILJ01`                                         |
//! | 8..24    | writer tag: ASCII, zero-padded (boot id or `tag=`)       |
//! | 24..32   | sequence number, u64, first record 1                     |
//! | 32..40   | writer's uptime in ms when the record was made, u64      |
//! | 40..504  | filler derived from the sequence number                  |
//! | 504..512 | FNV-1a 64 of bytes 0..504                                |
//!
//! Record `k` (from 0) is at byte offset `k * 512`. The journal ends at the
//! first sector without the magic. A writer resumes after the last record
//! of the journal with the highest sequence number seen plus one; a torn
//! last record (magic, bad checksum) is overwritten.
//!
//! The verifier reads the whole device and reports: records, first and last
//! sequence, writers (distinct tags), gaps (a sequence jump > 1), duplicates
//! (a sequence not above the previous one), bad checksums, interleaving (a
//! tag that comes back after another writer took over: two writers at
//! once), and holes (records after the end of the journal).

/// Size of one record (one sector).
pub const RECORD_SIZE: usize = 512;
/// Start of every record.
pub const MAGIC: [u8; 8] = *b"VIGILJ01";
/// Bytes of the writer tag.
pub const TAG_LEN: usize = 16;
const SUM_AT: usize = RECORD_SIZE - 8;

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Who wrote it.
    pub tag: [u8; TAG_LEN],
    /// Sequence number.
    pub seq: u64,
    /// Writer's uptime in ms.
    pub uptime_ms: u64,
}

/// FNV-1a, 64 bit.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A tag from text (`tag=` of the writer): its first [`TAG_LEN`] bytes,
/// zero-padded.
pub fn make_tag(text: &[u8]) -> [u8; TAG_LEN] {
    let mut tag = [0u8; TAG_LEN];
    let n = text.len().min(TAG_LEN);
    tag[..n].copy_from_slice(&text[..n]);
    tag
}

/// A tag from a boot id (`0f3c9a1e-2b4d-...`): its first [`TAG_LEN`] hex
/// digits, dashes dropped.
pub fn tag_from_boot_id(boot_id: &[u8]) -> [u8; TAG_LEN] {
    let mut tag = [0u8; TAG_LEN];
    let digits = boot_id.iter().filter(|c| c.is_ascii_hexdigit());
    for (t, &c) in tag.iter_mut().zip(digits) {
        *t = c;
    }
    tag
}

/// The printable part of a tag.
pub fn tag_text(tag: &[u8; TAG_LEN]) -> &[u8] {
    let end = tag.iter().position(|&c| c == 0).unwrap_or(TAG_LEN);
    &tag[..end]
}

/// Writes `rec` into a sector buffer.
pub fn encode(rec: &Record, out: &mut [u8; RECORD_SIZE]) {
    out[0..8].copy_from_slice(&MAGIC);
    out[8..24].copy_from_slice(&rec.tag);
    out[24..32].copy_from_slice(&rec.seq.to_le_bytes());
    out[32..40].copy_from_slice(&rec.uptime_ms.to_le_bytes());
    let s = rec.seq.to_le_bytes();
    for (i, b) in out[40..SUM_AT].iter_mut().enumerate() {
        *b = s[i % 8] ^ (i as u8);
    }
    let sum = fnv1a(&out[..SUM_AT]);
    out[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

/// What one sector holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sector {
    /// No magic: not a record (the end of the journal).
    Empty,
    /// The magic but a wrong checksum: a damaged or torn record.
    Bad,
    /// A valid record.
    Valid(Record),
}

/// Decodes one sector (`data` shorter than a record is [`Sector::Empty`]).
pub fn decode(data: &[u8]) -> Sector {
    if data.len() < RECORD_SIZE || data[0..8] != MAGIC {
        return Sector::Empty;
    }
    let sum = u64::from_le_bytes(data[SUM_AT..RECORD_SIZE].try_into().unwrap_or([0; 8]));
    if fnv1a(&data[..SUM_AT]) != sum {
        return Sector::Bad;
    }
    let u = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or([0; 8]));
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&data[8..24]);
    Sector::Valid(Record {
        tag,
        seq: u(24),
        uptime_ms: u(32),
    })
}

/// Finds where a writer resumes: feed sectors from position 0 until
/// [`Resume::feed`] returns false.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Position of the next record to write.
    pub next_pos: u64,
    /// Sequence number of the next record.
    pub next_seq: u64,
    /// Whether the last sector seen was a bad record.
    last_bad: bool,
    done: bool,
}

impl Resume {
    /// Nothing seen yet: a fresh journal starts at position 0 with seq 1.
    pub fn new() -> Self {
        Resume {
            next_pos: 0,
            next_seq: 1,
            last_bad: false,
            done: false,
        }
    }

    /// Takes the next sector (positions 0, 1, 2, ...); returns whether
    /// the scan should go on.
    pub fn feed(&mut self, s: Sector) -> bool {
        if self.done {
            return false;
        }
        match s {
            Sector::Empty => {
                if self.last_bad {
                    self.next_pos -= 1;
                }
                self.done = true;
                return false;
            }
            Sector::Bad => self.last_bad = true,
            Sector::Valid(r) => {
                self.last_bad = false;
                self.next_seq = self.next_seq.max(r.seq.saturating_add(1));
            }
        }
        self.next_pos += 1;
        true
    }

    /// Ends a scan that reached the end of the device.
    pub fn finish(&mut self) {
        if !self.done {
            self.feed(Sector::Empty);
        }
    }
}

/// Most distinct writer tags the verifier tells apart.
pub const MAX_WRITERS: usize = 8;

/// What the verifier found first (for a readable error line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Sequence jumped from `prev` to `seq` at `pos`.
    Gap { pos: u64, prev: u64, seq: u64 },
    /// Sequence `seq` at `pos` is not above `prev`.
    Duplicate { pos: u64, prev: u64, seq: u64 },
    /// Bad checksum at `pos`.
    Bad { pos: u64 },
    /// A writer came back at `pos` after another one had taken over.
    Interleaved { pos: u64, seq: u64 },
    /// A record at `pos` after the end of the journal.
    Hole { pos: u64 },
}

/// Checks a whole journal, sector by sector.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Valid records.
    pub records: u64,
    /// Sequence of the first valid record (0: none).
    pub first_seq: u64,
    /// Sequence of the last valid record (0: none).
    pub last_seq: u64,
    /// Sequence gaps.
    pub gaps: u64,
    /// Duplicated or regressing sequence numbers.
    pub dups: u64,
    /// Records with a bad checksum.
    pub bad: u64,
    /// Times a writer wrote again after another had taken over.
    pub interleaved: u64,
    /// Records found after the end of the journal.
    pub holes: u64,
    /// The first problem found.
    pub first_problem: Option<Problem>,
    writers: [[u8; TAG_LEN]; MAX_WRITERS],
    nwriters: usize,
    current: Option<usize>,
    pos: u64,
    ended: bool,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Verifier {
            records: 0,
            first_seq: 0,
            last_seq: 0,
            gaps: 0,
            dups: 0,
            bad: 0,
            interleaved: 0,
            holes: 0,
            first_problem: None,
            writers: [[0; TAG_LEN]; MAX_WRITERS],
            nwriters: 0,
            current: None,
            pos: 0,
            ended: false,
        }
    }

    fn problem(&mut self, p: Problem) {
        if self.first_problem.is_none() {
            self.first_problem = Some(p);
        }
    }

    /// Takes the next sector (positions 0, 1, 2, ...).
    pub fn feed(&mut self, s: Sector) {
        let pos = self.pos;
        self.pos += 1;
        match s {
            Sector::Empty => self.ended = true,
            Sector::Bad => {
                self.bad += 1;
                self.problem(Problem::Bad { pos });
            }
            Sector::Valid(r) => {
                if self.ended {
                    self.holes += 1;
                    self.problem(Problem::Hole { pos });
                    self.ended = false;
                }
                self.check_seq(pos, r.seq);
                self.check_writer(pos, &r);
                self.records += 1;
            }
        }
    }

    fn check_seq(&mut self, pos: u64, seq: u64) {
        if self.records == 0 {
            self.first_seq = seq;
        } else if seq <= self.last_seq {
            self.dups += 1;
            self.problem(Problem::Duplicate {
                pos,
                prev: self.last_seq,
                seq,
            });
        } else if seq != self.last_seq + 1 {
            self.gaps += 1;
            self.problem(Problem::Gap {
                pos,
                prev: self.last_seq,
                seq,
            });
        }
        self.last_seq = seq;
    }

    fn check_writer(&mut self, pos: u64, r: &Record) {
        let known = (0..self.nwriters).find(|&i| self.writers[i] == r.tag);
        match (known, self.current) {
            (Some(i), Some(c)) if i == c => {}
            (Some(i), _) => {
                // A writer that had been replaced writes again.
                self.interleaved += 1;
                self.problem(Problem::Interleaved { pos, seq: r.seq });
                self.current = Some(i);
            }
            (None, _) => {
                if self.nwriters < MAX_WRITERS {
                    self.writers[self.nwriters] = r.tag;
                    self.current = Some(self.nwriters);
                    self.nwriters += 1;
                } else {
                    self.current = None;
                }
            }
        }
    }

    /// Distinct writers seen (at most [`MAX_WRITERS`]).
    pub fn writers(&self) -> usize {
        self.nwriters
    }

    /// Whether the journal is whole: no gap, duplicate, bad record,
    /// interleaving or hole.
    pub fn ok(&self) -> bool {
        self.gaps == 0
            && self.dups == 0
            && self.bad == 0
            && self.interleaved == 0
            && self.holes == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(tag: &[u8], seq: u64) -> [u8; RECORD_SIZE] {
        let mut s = [0u8; RECORD_SIZE];
        encode(
            &Record {
                tag: make_tag(tag),
                seq,
                uptime_ms: 1000 + seq,
            },
            &mut s,
        );
        s
    }

    fn verify(sectors: &[[u8; RECORD_SIZE]]) -> Verifier {
        let mut v = Verifier::new();
        for s in sectors {
            v.feed(decode(s));
        }
        v
    }

    #[test]
    fn record_round_trip() {
        let s = sector(b"writer-a", 42);
        assert_eq!(&s[0..8], b"VIGILJ01");
        match decode(&s) {
            Sector::Valid(r) => {
                assert_eq!(r.seq, 42);
                assert_eq!(r.uptime_ms, 1042);
                assert_eq!(tag_text(&r.tag), b"writer-a");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damage_is_detected() {
        let mut s = sector(b"a", 1);
        s[300] ^= 1;
        assert_eq!(decode(&s), Sector::Bad);
        assert_eq!(decode(&[0u8; RECORD_SIZE]), Sector::Empty);
        assert_eq!(decode(&s[..100]), Sector::Empty);
    }

    #[test]
    fn tags_from_boot_ids() {
        let t = tag_from_boot_id(b"0f3c9a1e-2b4d-4c1a-9e0f-123456789abc\n");
        assert_eq!(tag_text(&t), b"0f3c9a1e2b4d4c1a");
        assert_eq!(tag_text(&make_tag(b"vm1")), b"vm1");
        assert_eq!(
            tag_text(&make_tag(b"0123456789abcdefXYZ")),
            b"0123456789abcdef"
        );
    }

    #[test]
    fn resume_on_empty_and_after_records() {
        let mut r = Resume::new();
        assert!(!r.feed(Sector::Empty));
        assert_eq!((r.next_pos, r.next_seq), (0, 1));

        let mut r = Resume::new();
        for seq in 1..=3 {
            assert!(r.feed(decode(&sector(b"a", seq))));
        }
        assert!(!r.feed(Sector::Empty));
        assert_eq!((r.next_pos, r.next_seq), (3, 4));
        // Nothing more is taken after the end.
        assert!(!r.feed(decode(&sector(b"a", 9))));
        assert_eq!((r.next_pos, r.next_seq), (3, 4));
    }

    #[test]
    fn resume_overwrites_a_torn_last_record() {
        let mut r = Resume::new();
        r.feed(decode(&sector(b"a", 1)));
        r.feed(Sector::Bad);
        r.feed(Sector::Empty);
        assert_eq!((r.next_pos, r.next_seq), (1, 2));
    }

    #[test]
    fn resume_at_the_end_of_a_full_device() {
        let mut r = Resume::new();
        r.feed(decode(&sector(b"a", 1)));
        r.feed(decode(&sector(b"a", 2)));
        r.finish();
        assert_eq!((r.next_pos, r.next_seq), (2, 3));
    }

    #[test]
    fn a_whole_journal_with_a_handover_is_ok() {
        let v = verify(&[
            sector(b"a", 1),
            sector(b"a", 2),
            sector(b"b", 3),
            sector(b"b", 4),
            [0; RECORD_SIZE],
            [0; RECORD_SIZE],
        ]);
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.records, v.first_seq, v.last_seq), (4, 1, 4));
        assert_eq!(v.writers(), 2);
    }

    #[test]
    fn gaps_duplicates_and_bad_records() {
        let mut bad = sector(b"a", 4);
        bad[100] ^= 0xff;
        let v = verify(&[
            sector(b"a", 1),
            sector(b"a", 3),
            sector(b"a", 3),
            bad,
            sector(b"a", 4),
        ]);
        assert!(!v.ok());
        assert_eq!((v.gaps, v.dups, v.bad), (1, 1, 1));
        assert_eq!(
            v.first_problem,
            Some(Problem::Gap {
                pos: 1,
                prev: 1,
                seq: 3
            })
        );
    }

    #[test]
    fn two_writers_interleaved() {
        let v = verify(&[
            sector(b"a", 1),
            sector(b"b", 2),
            sector(b"a", 3),
            sector(b"b", 4),
        ]);
        assert_eq!(v.interleaved, 2);
        assert_eq!(v.writers(), 2);
        assert_eq!(
            v.first_problem,
            Some(Problem::Interleaved { pos: 2, seq: 3 })
        );
        assert!(!v.ok());
    }

    #[test]
    fn split_brain_duplicate_sequence_from_two_writers() {
        let v = verify(&[sector(b"a", 1), sector(b"a", 2), sector(b"b", 2)]);
        assert_eq!(v.dups, 1);
        assert!(!v.ok());
    }

    #[test]
    fn records_after_the_end_are_a_hole() {
        let v = verify(&[sector(b"a", 1), [0; RECORD_SIZE], sector(b"a", 2)]);
        assert_eq!(v.holes, 1);
        assert_eq!(v.first_problem, Some(Problem::Hole { pos: 2 }));
    }
}
