//! Wire-format tests: every message round-trips; every corruption is caught
//! and named.

use super::*;
use crate::precheck::{Failure, VmFacts};

fn samples() -> Vec<Message> {
    let page = |b: u8| vec![b; PAGE_SIZE];
    vec![
        Message::Hello(Hello::ours("host-a", caps::ALL)),
        Message::Precheck(VmFacts {
            name: "web1".into(),
            cpu_template: "baseline".into(),
            memory_mib: 512,
            vcpus: 2,
            networks: vec!["Prod".into()],
            ..Default::default()
        }),
        Message::PrecheckResult(vec![]),
        Message::PrecheckResult(vec![Failure {
            check: "network".into(),
            source: "Prod".into(),
            target: "prod".into(),
            remedy: "create it".into(),
        }]),
        Message::MemoryLayout(vec![
            Region {
                gpa: 0,
                size: 3 << 30,
            },
            Region {
                gpa: 4 << 30,
                size: 1 << 30,
            },
        ]),
        Message::Pages {
            round: 3,
            runs: vec![
                PageRun {
                    gpa: 0x1000,
                    pages: 2,
                    data: Some([page(7), page(9)].concat()),
                    checksum: 0xdead_beef,
                },
                PageRun {
                    gpa: 0x10_0000,
                    pages: 100,
                    data: None,
                    checksum: 0,
                },
            ],
        },
        Message::RoundEnd(3),
        Message::RoundDone(3),
        Message::State(vec![1, 2, 3, 4, 5]),
        Message::Complete(Complete {
            rounds: 4,
            runs: 77,
            lease: None,
        }),
        Message::Complete(Complete {
            rounds: 4,
            runs: 77,
            lease: Some(crate::protocol::LeaseHandoff {
                file: "/ds/vms/web1/lease".into(),
                owner: "host-a".into(),
                generation: 7,
            }),
        }),
        Message::Resumed,
        Message::Abort(Abort {
            stage: "precopy round 2".into(),
            reason: "disk full".into(),
        }),
        Message::Cancel,
    ]
}

fn stream(msgs: &[Message]) -> Vec<u8> {
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    for m in msgs {
        enc.send(&mut out, m).unwrap();
    }
    out
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
    let mut dec = Decoder::new();
    dec.push(bytes);
    let mut out = Vec::new();
    while let Some(m) = dec.next_message()? {
        out.push(m);
    }
    dec.finish()?;
    Ok(out)
}

#[test]
fn every_message_round_trips() {
    let msgs = samples();
    assert_eq!(decode_all(&stream(&msgs)).unwrap(), msgs);
}

#[test]
fn byte_at_a_time_decoding() {
    let msgs = samples();
    let bytes = stream(&msgs);
    let mut dec = Decoder::new();
    let mut got = Vec::new();
    for b in bytes {
        dec.push(&[b]);
        while let Some(m) = dec.next_message().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
}

#[test]
fn truncated_at_every_offset_is_reported() {
    for m in samples() {
        let frame = encode_frame(&m, 0).unwrap();
        for cut in 1..frame.len() {
            match decode_all(&frame[..cut]) {
                Err(ProtocolError::Truncated {
                    got, want, kind, ..
                }) => {
                    assert_eq!(got, cut);
                    if cut >= HEADER_LEN {
                        assert_eq!(want, frame.len());
                        assert_eq!(kind, m.kind().to_string());
                    }
                }
                other => panic!("{:?} cut at {cut}: {other:?}", m.kind()),
            }
        }
    }
}

#[test]
fn flipped_bit_anywhere_is_detected() {
    for m in samples() {
        let frame = encode_frame(&m, 0).unwrap();
        // Every bit of small frames; a stride through the 8 KiB page frame.
        let step = if frame.len() > 512 { 7 } else { 1 };
        for byte in (0..frame.len()).step_by(step) {
            for bit in 0..8 {
                let mut bad = frame.clone();
                bad[byte] ^= 1 << bit;
                let r = decode_all(&bad);
                assert!(
                    r.is_err(),
                    "{:?}: flip byte {byte} bit {bit} accepted: {r:?}",
                    m.kind()
                );
            }
        }
    }
}

#[test]
fn checksum_error_names_the_frame() {
    let mut bytes = stream(&samples()[..6]);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // inside the Pages frame (sequence 5)
    let e = decode_all(&bytes).unwrap_err();
    let s = e.to_string();
    assert!(
        matches!(e, ProtocolError::Checksum { sequence: 5, .. }),
        "{s}"
    );
    assert!(s.contains("frame 5 (Pages"), "{s}");
}

#[test]
fn oversized_length_rejected_before_allocation() {
    let mut frame = encode_frame(&Message::State(vec![0; 8]), 0).unwrap();
    frame[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let mut dec = Decoder::new();
    dec.push(&frame[..HEADER_LEN]); // header alone is enough to refuse
    let e = dec.next_message().unwrap_err();
    assert!(
        matches!(e, ProtocolError::Oversized { length, .. } if length == MAX_PAYLOAD + 1),
        "{e}"
    );
    assert!(e.to_string().contains("State"), "{e}");
}

#[test]
fn oversized_send_refused() {
    let e = encode_frame(&Message::State(vec![0; MAX_PAYLOAD as usize + 1]), 0).unwrap_err();
    assert!(matches!(e, ProtocolError::TooLargeToSend { .. }), "{e}");
}

/// Builds a frame with a valid CRC around arbitrary header fields.
fn raw_frame(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[test]
fn unknown_type_flags_sequence() {
    let e = decode_all(&raw_frame(999, 0, 0, b"")).unwrap_err();
    assert!(
        matches!(e, ProtocolError::UnknownType { value: 999, .. }),
        "{e}"
    );
    let e = decode_all(&raw_frame(9, 1, 0, b"")).unwrap_err();
    assert!(matches!(e, ProtocolError::BadFlags { .. }), "{e}");
    let e = decode_all(&raw_frame(9, 0, 1, b"")).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Sequence {
                expected: 0,
                found: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn wrong_magic() {
    let e = decode_all(b"GET / HTTP/1.1\r\n\r\n").unwrap_err();
    assert!(matches!(e, ProtocolError::BadMagic { .. }), "{e}");
}

#[test]
fn malformed_payloads_are_named() {
    // A Pages frame announcing a billion runs in 8 bytes: refused, no allocation.
    let mut p = Vec::new();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&1_000_000_000u32.to_le_bytes());
    let e = decode_all(&raw_frame(MessageType::Pages as u16, 0, 0, &p)).unwrap_err();
    assert!(e.to_string().contains("1000000000 runs announced"), "{e}");
    // A data run claiming more pages than the frame holds.
    let mut p = Vec::new();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&0x1000u64.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    p.extend_from_slice(&[0; 8]);
    let e = decode_all(&raw_frame(MessageType::Pages as u16, 0, 0, &p)).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Malformed {
                kind: MessageType::Pages,
                ..
            }
        ),
        "{e}"
    );
    // Bad JSON in a Hello.
    let e = decode_all(&raw_frame(1, 0, 0, b"{")).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Malformed {
                kind: MessageType::Hello,
                ..
            }
        ),
        "{e}"
    );
    // Trailing bytes after RoundEnd.
    let e = decode_all(&raw_frame(6, 0, 0, &[0; 5])).unwrap_err();
    assert!(e.to_string().contains("trailing"), "{e}");
}

#[test]
fn version_negotiation() {
    let mut a = Hello::ours("host-a", 0);
    let mut b = Hello::ours("host-b", 0);
    (a.version_min, a.version_max) = (1, 3);
    (b.version_min, b.version_max) = (2, 4);
    assert_eq!(negotiate(&a, &b), Ok(3));
    (a.version_min, a.version_max) = (1, 2);
    (b.version_min, b.version_max) = (3, 4);
    let e = negotiate(&a, &b).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "host-b ({}) speaks migration protocol 3..4, this host speaks 1..2: upgrade vigil on host-a",
            b.software
        )
    );
    // Seen from host-b, the advice points at host-a too.
    let e = negotiate(&b, &a).unwrap_err();
    assert!(e.to_string().ends_with("upgrade vigil on host-a"), "{e}");
}

#[test]
fn hello_ignores_unknown_json_fields() {
    let p = br#"{"version_min":1,"version_max":9,"capabilities":3,"host":"h","software":"vigil 9","future":true}"#;
    let m = decode_all(&raw_frame(1, 0, 0, p)).unwrap();
    assert!(matches!(&m[0], Message::Hello(h) if h.version_max == 9));
}

#[test]
fn pages_frame_built_in_place_is_byte_for_byte_the_message() {
    let page = |b: u8| vec![b; PAGE_SIZE];
    let msg = Message::Pages {
        round: 3,
        runs: vec![
            PageRun {
                gpa: 0x1000,
                pages: 2,
                data: Some([page(7), page(9)].concat()),
                checksum: 0xdead_beef,
            },
            PageRun {
                gpa: 0x10_0000,
                pages: 100,
                data: None,
                checksum: 0,
            },
            PageRun {
                gpa: 0x20_0000,
                pages: 1,
                data: Some(page(1)),
                checksum: 0,
            },
        ],
    };
    // After another frame, so the sequence number is not 0.
    let mut enc = Encoder::new();
    let mut expected = Vec::new();
    enc.send(&mut expected, &Message::RoundEnd(2)).unwrap();
    enc.send(&mut expected, &msg).unwrap();

    let mut enc = Encoder::new();
    let mut got = Vec::new();
    enc.send(&mut got, &Message::RoundEnd(2)).unwrap();
    let mut f = PagesFrame::new();
    // Leftovers of an earlier frame must not leak into the next one.
    f.begin(9);
    f.push_zero(0x5000, 3);
    f.begin(3);
    f.push_data(0x1000, &[page(7), page(9)].concat(), 0xdead_beef);
    f.push_zero(0x10_0000, 100);
    f.push_data(0x20_0000, &page(1), 0);
    assert_eq!((f.runs(), f.data_pages()), (3, 3));
    let n = enc.send_pages(&mut got, &mut f).unwrap();
    assert_eq!(n, got.len() - (expected.len() - n));
    assert_eq!(got, expected);
    assert_eq!(decode_all(&got).unwrap()[1], msg);
}

/// Pages read straight into a frame and turned into runs in place give the
/// same bytes as the runs pushed one by one, for every shape of zero and
/// data pages in a read (leading, trailing, alternating, all of one kind),
/// after an earlier read in the same frame and after a bigger frame.
#[test]
fn pages_read_in_place_are_byte_for_byte_the_pushed_runs() {
    let shapes: [&[bool]; 6] = [
        &[false, false, true, true, false],
        &[true, false, true, false, true, false],
        &[true, true, true],
        &[false, false, false, false],
        &[false],
        &[true, false, false, true, true, true, false],
    ];
    let mut in_place = PagesFrame::new();
    // A bigger frame first, so stale bytes sit in the room it leaves.
    in_place.begin(0);
    in_place.push_data(0, &vec![0xee; 64 * PAGE_SIZE], 0);
    for checksums in [false, true] {
        in_place.begin(4);
        let mut pushed = PagesFrame::new();
        pushed.begin(4);
        for (k, zero) in shapes.iter().enumerate() {
            let gpa = 0x10_0000 * (k as u64 + 1);
            let pages: Vec<Vec<u8>> = (0..zero.len())
                .map(|i| {
                    vec![
                        if zero[i] {
                            0xaa
                        } else {
                            (k * 16 + i + 1) as u8
                        };
                        PAGE_SIZE
                    ]
                })
                .collect();
            let area = in_place.read_area(zero.len());
            for (dst, src) in area.chunks_exact_mut(PAGE_SIZE).zip(&pages) {
                dst.copy_from_slice(src);
            }
            let counts = in_place.finish_read(gpa, zero, checksums);
            let (mut d, mut z, mut r) = (0, 0, 0);
            let mut i = 0;
            while i < zero.len() {
                let mut j = i + 1;
                while j < zero.len() && zero[j] == zero[i] {
                    j += 1;
                }
                let at = gpa + (i * PAGE_SIZE) as u64;
                if zero[i] {
                    pushed.push_zero(at, (j - i) as u32);
                    z += j - i;
                } else {
                    let data = pages[i..j].concat();
                    let crc = if checksums { crc32c::crc32c(&data) } else { 0 };
                    pushed.push_data(at, &data, crc);
                    d += j - i;
                }
                r += 1;
                i = j;
            }
            assert_eq!(counts, (d as u32, z as u32, r), "shape {k}");
        }
        assert_eq!(
            (in_place.runs(), in_place.data_pages()),
            (pushed.runs(), pushed.data_pages())
        );
        let (mut a, mut b) = (Vec::new(), Vec::new());
        Encoder::new().send_pages(&mut a, &mut in_place).unwrap();
        Encoder::new().send_pages(&mut b, &mut pushed).unwrap();
        assert_eq!(a, b, "checksums {checksums}");
    }
}
