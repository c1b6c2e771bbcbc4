//! The reader treats its input as hostile: every truncation, every byte flip, crafted invalid
//! records and random mutations are errors naming offset, record and reason — never a panic.

mod common;

use livemig_stream::format::{HEADER_LEN, RFLAG_OPTIONAL, RecordHeader, StreamHeader, Tag, encode};
use livemig_stream::{
    Compat, DirtyCaps, End, ErrorKind, Limits, Phase, Reader, Record, SliceReader, Writer,
    WriterOptions,
};
use proptest::prelude::*;

fn read_all_slice(bytes: &[u8], limits: Limits) -> Result<(), livemig_stream::Error> {
    let mut r = SliceReader::new(bytes, limits)?;
    r.validate_all().map(drop)
}

fn read_all_stream(bytes: &[u8], limits: Limits) -> Result<(), livemig_stream::Error> {
    let mut r = Reader::new(bytes, limits)?;
    r.validate_all().map(drop)
}

fn both(
    bytes: &[u8],
) -> (
    Result<(), livemig_stream::Error>,
    Result<(), livemig_stream::Error>,
) {
    (
        read_all_slice(bytes, Limits::default()),
        read_all_stream(bytes, Limits::default()),
    )
}

#[test]
fn every_truncation_is_an_error() {
    let good = common::v1_small(true);
    assert!(read_all_slice(&good, Limits::default()).is_ok());
    for cut in 0..good.len() {
        let (a, b) = both(&good[..cut]);
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        // Both readers agree on where and why.
        assert_eq!(a.offset, b.offset, "cut {cut}: {a} / {b}");
        assert_eq!(a.record, b.record, "cut {cut}");
        assert!(
            matches!(a.kind, ErrorKind::Truncated { .. } | ErrorKind::MissingEnd),
            "cut {cut}: {a}"
        );
    }
}

#[test]
fn every_byte_flip_is_detected_with_checksums() {
    let good = common::v1_small(true);
    for at in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[at] ^= mask;
            let (a, b) = both(&bad);
            assert!(
                a.is_err() && b.is_err(),
                "flip {mask:#x} at {at} undetected"
            );
        }
    }
}

#[test]
fn every_byte_flip_without_checksums_never_panics() {
    let good = common::v1_small(false);
    let mut detected = 0;
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x55;
        let (a, _) = both(&bad);
        detected += usize::from(a.is_err());
    }
    // Without checksums payload flips pass, but every framing byte is still checked.
    assert!(detected > 0);
}

/// Builds raw streams to craft specific violations.
struct Raw {
    bytes: Vec<u8>,
    seq: u32,
    crc: bool,
}

impl Raw {
    fn new(crc: bool) -> Raw {
        Raw {
            bytes: StreamHeader::new(crc, "raw").encode().to_vec(),
            seq: 0,
            crc,
        }
    }
    fn rec_with(&mut self, tag: u16, flags: u16, seq: u32, body: &[u8]) -> &mut Raw {
        let mut rh = RecordHeader {
            tag,
            flags,
            length: body.len() as u32,
            seq,
            crc: 0,
        };
        if self.crc {
            rh.crc = rh.compute_crc(&[body]);
        }
        self.bytes.extend_from_slice(&rh.encode());
        self.bytes.extend_from_slice(body);
        self.seq = seq + 1;
        self
    }
    fn rec(&mut self, tag: Tag, body: &[u8]) -> &mut Raw {
        let seq = self.seq;
        self.rec_with(tag as u16, 0, seq, body)
    }
    fn compat(&mut self, device: u32) -> &mut Raw {
        let c = Compat {
            device,
            identity: "x",
            compat: b"",
            page_size_mask: 0x1000,
            dirty_caps: DirtyCaps(0),
            migration_flags: 1,
        };
        let mut body = encode::compat(&c).unwrap().to_vec();
        body.push(b'x');
        self.rec(Tag::Compat, &body)
    }
    fn state(&mut self, device: u32, phase: Phase, chunk: u32, data: &[u8]) -> &mut Raw {
        let mut body = encode::device_state(device, phase, chunk).to_vec();
        body.extend_from_slice(data);
        self.rec(Tag::DeviceState, &body)
    }
    fn kind(&self) -> ErrorKind {
        let e = read_all_slice(&self.bytes, Limits::default()).unwrap_err();
        let e2 = read_all_stream(&self.bytes, Limits::default()).unwrap_err();
        assert_eq!(e.to_string(), e2.to_string());
        e.kind
    }
}

#[test]
fn crafted_violations_are_named() {
    assert!(matches!(
        Raw::new(true).compat(0).kind(),
        ErrorKind::MissingEnd
    ));
    let mut r = Raw::new(true);
    r.compat(0);
    r.rec_with(Tag::ZeroPages as u16, 0, 5, &encode::pages(0, 4096, 1));
    assert!(matches!(
        r.kind(),
        ErrorKind::Sequence {
            expected: 1,
            got: 5
        }
    ));

    let mut r = Raw::new(true);
    r.rec(Tag::ZeroPages, &encode::pages(0, 4096, 1)).compat(0);
    assert!(matches!(r.kind(), ErrorKind::CompatTooLate));

    let mut r = Raw::new(true);
    r.compat(0).compat(0);
    assert!(matches!(r.kind(), ErrorKind::DuplicateDevice(0)));

    let mut r = Raw::new(true);
    r.state(4, Phase::PreCopy, 0, b"x");
    assert!(matches!(r.kind(), ErrorKind::UnknownDevice(4)));

    let mut r = Raw::new(true);
    r.compat(0)
        .state(0, Phase::PreCopy, 0, b"a")
        .state(0, Phase::PreCopy, 2, b"b");
    assert!(matches!(
        r.kind(),
        ErrorKind::ChunkSequence {
            device: 0,
            expected: 1,
            got: 2
        }
    ));

    let mut r = Raw::new(true);
    r.compat(0)
        .state(0, Phase::StopCopy, 0, b"a")
        .state(0, Phase::PreCopy, 1, b"b");
    assert!(matches!(r.kind(), ErrorKind::PhaseOrder(0)));

    let mut r = Raw::new(true);
    r.rec_with(0, 0, 0, b"");
    assert!(matches!(r.kind(), ErrorKind::ZeroTag));

    let mut r = Raw::new(true);
    r.rec_with(99, 0, 0, b"future");
    assert!(matches!(r.kind(), ErrorKind::UnknownRecord(99)));

    let mut r = Raw::new(true);
    r.rec_with(Tag::ZeroPages as u16, 0x8000, 0, &encode::pages(0, 4096, 1));
    assert!(matches!(r.kind(), ErrorKind::UnknownRecordFlags(0x8000)));

    let mut bad = encode::pages(0, 4096, 1).to_vec();
    bad[0] = 1; // gpa not page aligned
    let mut r = Raw::new(true);
    r.rec(Tag::ZeroPages, &bad);
    assert!(matches!(r.kind(), ErrorKind::InvalidField { .. }));

    let mut body = encode::device_state(0, Phase::PreCopy, 0).to_vec();
    body[6] = 1; // reserved
    let mut r = Raw::new(true);
    r.compat(0).rec(Tag::DeviceState, &body);
    assert!(matches!(r.kind(), ErrorKind::Reserved(_)));

    // Pages whose body does not hold count * page_size bytes.
    let mut body = encode::pages(0, 4096, 2).to_vec();
    body.extend_from_slice(&[0; 4096]);
    let mut r = Raw::new(true);
    r.rec(Tag::Pages, &body);
    assert!(matches!(
        r.kind(),
        ErrorKind::BodyLength { expected: 8208, .. }
    ));

    // A non-zero CRC field in a stream without checksums.
    let mut r = Raw::new(false);
    let mut rh = RecordHeader {
        tag: Tag::ZeroPages as u16,
        flags: 0,
        length: 16,
        seq: 0,
        crc: 1,
    };
    rh.crc = 5;
    r.bytes.extend_from_slice(&rh.encode());
    r.bytes.extend_from_slice(&encode::pages(0, 4096, 1));
    assert!(matches!(r.kind(), ErrorKind::UnexpectedChecksum(5)));
}

fn end_body(records: u32, stream_bytes: u64, digest: u32) -> Vec<u8> {
    encode::end(&End {
        records,
        stream_bytes,
        digest,
        ..End::default()
    })
    .to_vec()
}

#[test]
fn end_totals_digest_and_trailing_data() {
    // Correct End without checksums: totals only.
    let mut r = Raw::new(false);
    r.compat(0);
    let before = r.bytes.len() as u64;
    r.rec(Tag::End, &end_body(1, before, 0));
    read_all_slice(&r.bytes, Limits::default()).unwrap();
    let mut trailing = r.bytes.clone();
    trailing.push(0);
    assert!(matches!(
        read_all_slice(&trailing, Limits::default())
            .unwrap_err()
            .kind,
        ErrorKind::TrailingData
    ));
    assert!(matches!(
        read_all_stream(&trailing, Limits::default())
            .unwrap_err()
            .kind,
        ErrorKind::TrailingData
    ));

    let mut r = Raw::new(false);
    r.compat(0);
    let before = r.bytes.len() as u64;
    r.rec(Tag::End, &end_body(2, before, 0));
    assert!(matches!(
        r.kind(),
        ErrorKind::EndMismatch {
            field: "records",
            stated: 2,
            actual: 1
        }
    ));

    let mut r = Raw::new(true);
    r.compat(0);
    let before = r.bytes.len() as u64;
    r.rec(Tag::End, &end_body(1, before, 0x1234));
    assert!(matches!(r.kind(), ErrorKind::DigestMismatch));

    // An optional unknown record is skipped (and still checked).
    let mut w = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
    w.zero_pages(0, 4096, 1).unwrap();
    let bytes = w.finish().unwrap();
    let mut r = Raw::new(true);
    r.rec(Tag::ZeroPages, &encode::pages(0, 4096, 1));
    r.rec_with(200, RFLAG_OPTIONAL, 1, b"from the future");
    let mut sr = SliceReader::new(&r.bytes, Limits::default()).unwrap();
    sr.next().unwrap();
    assert_eq!(
        sr.next().unwrap(),
        Some(Record::Skipped {
            tag: 200,
            length: 15
        })
    );
    assert!(bytes.len() > HEADER_LEN);
}

#[test]
fn header_violations() {
    let good = StreamHeader::new(true, "x").encode();
    let mut bad = good;
    bad[0] = b'X';
    assert!(matches!(
        SliceReader::new(&bad, Limits::default()).unwrap_err().kind,
        ErrorKind::BadMagic
    ));
    // Version 2 with a valid header CRC: refused, naming both versions.
    let mut v2 = StreamHeader::new(true, "x");
    v2.major = 2;
    let e = SliceReader::new(&v2.encode(), Limits::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "at byte 0: stream format 2.0 is not supported (this reader reads version 1.x)"
    );
    // A newer minor is accepted.
    let mut minor = StreamHeader::new(true, "x");
    minor.minor = 9;
    assert!(SliceReader::new(&minor.encode(), Limits::default()).is_ok());
    let mut flags = StreamHeader::new(true, "x");
    flags.flags = 0x10;
    assert!(matches!(
        SliceReader::new(&flags.encode(), Limits::default())
            .unwrap_err()
            .kind,
        ErrorKind::UnknownStreamFlags(0x10)
    ));
    let mut crc = good;
    crc[20] ^= 1;
    assert!(matches!(
        SliceReader::new(&crc, Limits::default()).unwrap_err().kind,
        ErrorKind::HeaderChecksum
    ));
}

#[test]
fn limits_refuse_before_allocating() {
    // A record claiming a 4 GiB body in a tiny input.
    let mut raw = StreamHeader::new(true, "x").encode().to_vec();
    raw.extend_from_slice(
        &RecordHeader {
            tag: Tag::Pages as u16,
            flags: 0,
            length: u32::MAX,
            seq: 0,
            crc: 0,
        }
        .encode(),
    );
    let limits = Limits {
        max_record: 1 << 20,
        ..Limits::default()
    };
    let e = read_all_stream(&raw, limits).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::RecordTooLarge { .. }), "{e}");
    assert_eq!((e.offset, e.record), (HEADER_LEN as u64, Some(0)));
    // Device state over its limit.
    let mut w = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
    w.compat(&Compat {
        device: 0,
        identity: "x",
        compat: b"",
        page_size_mask: 0x1000,
        dirty_caps: DirtyCaps(0),
        migration_flags: 1,
    })
    .unwrap();
    w.device_state(0, Phase::StopCopy, &[1; 5000]).unwrap();
    let bytes = w.finish().unwrap();
    let tight = Limits {
        max_device_state: 4096,
        ..Limits::default()
    };
    assert!(matches!(
        read_all_slice(&bytes, tight).unwrap_err().kind,
        ErrorKind::DeviceStateLimit { device: 0, .. }
    ));
    let small_total = Limits {
        max_total: 100,
        ..Limits::default()
    };
    assert!(matches!(
        read_all_stream(&bytes, small_total).unwrap_err().kind,
        ErrorKind::StreamLimit { max: 100 }
    ));
    // The streaming reader's buffer grows with the data actually received.
    let mut truncated = StreamHeader::new(true, "x").encode().to_vec();
    truncated.extend_from_slice(
        &RecordHeader {
            tag: Tag::Pages as u16,
            flags: 0,
            length: 60 << 20,
            seq: 0,
            crc: 0,
        }
        .encode(),
    );
    truncated.extend_from_slice(&[0; 100]);
    let mut r = Reader::new(&truncated[..], Limits::default()).unwrap();
    assert!(r.next().is_err());
    assert!(
        r.buffer_capacity() <= (1 << 20) + 1024,
        "{}",
        r.buffer_capacity()
    );
}

#[test]
fn writer_refuses_what_readers_would_refuse() {
    let mut w = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
    assert!(w.device_state(0, Phase::PreCopy, b"x").is_err());
    w.zero_pages(0, 4096, 1).unwrap();
    let e = w
        .compat(&Compat {
            device: 0,
            identity: "x",
            compat: b"",
            page_size_mask: 0x1000,
            dirty_caps: DirtyCaps(0),
            migration_flags: 1,
        })
        .unwrap_err();
    assert!(
        e.to_string().contains("compatibility data must come first"),
        "{e}"
    );
    assert!(w.pages(1, 4096, &[0; 4096]).is_err());
    assert!(w.pages(0, 1000, &[0; 1000]).is_err());
    assert!(w.pages(0, 4096, &[0; 100]).is_err());
    assert!(w.dirty_bitmap(0, 4096 * 3, 4096, &[0b1000]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random mutations of a valid stream: errors, never panics.
    #[test]
    fn mutations_never_panic(
        edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..8)
    ) {
        let mut bytes = common::v1_small(true);
        for (at, value, op) in edits {
            let at = usize::from(at) % bytes.len();
            match op {
                0 => bytes[at] = value,
                1 => { bytes.insert(at, value); }
                _ => { bytes.remove(at); }
            }
        }
        let _ = both(&bytes);
    }

    /// Arbitrary bytes after a valid header: errors, never panics.
    #[test]
    fn garbage_after_header_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut bytes = StreamHeader::new(true, "x").encode().to_vec();
        bytes.extend_from_slice(&tail);
        let _ = both(&bytes);
        let mut bytes = StreamHeader::new(false, "x").encode().to_vec();
        bytes.extend_from_slice(&tail);
        let _ = both(&bytes);
    }
}
