//! Golden streams (fixtures/stream/) and the encoding of every record type, pinned by insta
//! snapshots: the format must never change by accident, and version-1 streams must keep
//! decoding in every later release.

mod common;

use std::fmt::Write as _;

use livemig_stream::format::{self, RFLAG_OPTIONAL, RecordHeader, Tag, encode};
#[cfg(feature = "inspect")]
use livemig_stream::inspect::inspect;
use livemig_stream::{
    Compat, DirtyCaps, End, Limits, Phase, Reader, Round, SliceReader, StreamHeader,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/stream/");
    std::fs::read(format!("{path}{name}")).unwrap()
}

fn hexdump(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "{:04x}:", i * 16);
        for b in line {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}

#[test]
fn v1_golden_decodes_with_both_readers() {
    for name in ["v1-basic.lmstream", "v1-basic-nocrc.lmstream"] {
        let bytes = fixture(name);
        let totals = SliceReader::new(&bytes, Limits::default())
            .unwrap()
            .validate_all()
            .unwrap();
        assert_eq!((totals.pages, totals.zero_pages), (5, 5), "{name}");
        let mut r = Reader::new(&bytes[..], Limits::default()).unwrap();
        assert_eq!(r.validate_all().unwrap(), totals);
    }
}

#[cfg(feature = "inspect")]
#[test]
fn v1_golden_inspection_is_stable() {
    let bytes = fixture("v1-basic.lmstream");
    let i = inspect(&bytes[..], Limits::default()).unwrap();
    assert!(i.summary.valid, "{:?}", i.summary.error);
    insta::assert_snapshot!("v1_basic_dump", i.dump);
    insta::assert_snapshot!("v1_basic_summary", i.summary.to_json());
}

/// Format tripwire: today's writer reproduces the version-1 golden bytes exactly. If a change
/// is intended, it is a new format version with new goldens, and the old ones keep decoding.
#[test]
fn writer_reproduces_the_v1_golden_bytes() {
    assert_eq!(common::v1_basic(true), fixture("v1-basic.lmstream"));
    assert_eq!(common::v1_basic(false), fixture("v1-basic-nocrc.lmstream"));
}

#[cfg(feature = "inspect")]
#[test]
fn qemu_section_fixture_inspects() {
    let bytes = fixture("qemu-vfio-section.bin");
    assert_eq!(bytes, common::qemu_sample());
    let i = inspect(&bytes[..], Limits::default()).unwrap();
    assert!(i.summary.valid);
    insta::assert_snapshot!("qemu_section_dump", i.dump);
    let chunks = livemig_stream::qemu::data_chunks(&bytes, 1 << 20).unwrap();
    assert_eq!(chunks.len(), 2);
}

/// Snapshot of one record: hex of its full encoding, then what the decoder makes of it.
fn record_snapshot(tag: Tag, flags: u16, parts: &[&[u8]]) -> String {
    let body: Vec<u8> = parts.concat();
    let mut rh = RecordHeader {
        tag: tag as u16,
        flags,
        length: body.len() as u32,
        seq: 7,
        crc: 0,
    };
    rh.crc = rh.compute_crc(&[&body]);
    let mut bytes = rh.encode().to_vec();
    bytes.extend_from_slice(&body);
    let decoded = format::decode(rh.tag, rh.flags, &body).unwrap();
    format!("{}\n{decoded:#?}\n", hexdump(&bytes))
}

#[test]
fn every_record_encoding() {
    let header = StreamHeader::new(true, "livemig snapshot").encode();
    insta::assert_snapshot!(
        "stream_header",
        format!(
            "{}\n{:#?}\n",
            hexdump(&header),
            StreamHeader::decode(&header).unwrap()
        )
    );
    let compat = Compat {
        device: 3,
        identity: "19e5:a259",
        compat: &[0xcc; 8],
        page_size_mask: 0x4020_1000,
        dirty_caps: DirtyCaps(DirtyCaps::IOMMU | DirtyCaps::DEVICE),
        migration_flags: 5,
    };
    let fixed = encode::compat(&compat).unwrap();
    insta::assert_snapshot!(
        "record_compat",
        record_snapshot(Tag::Compat, 0, &[&fixed, b"19e5:a259", &[0xcc; 8]])
    );
    insta::assert_snapshot!(
        "record_device_state",
        record_snapshot(
            Tag::DeviceState,
            0,
            &[
                &encode::device_state(3, Phase::StopCopy, 9),
                b"\x01\x02\x03"
            ]
        )
    );
    insta::assert_snapshot!(
        "record_pages",
        record_snapshot(
            Tag::Pages,
            0,
            &[&encode::pages(0x2000, 512, 1), &[0x5a; 512]]
        )
    );
    insta::assert_snapshot!(
        "record_zero_pages",
        record_snapshot(
            Tag::ZeroPages,
            0,
            &[&encode::pages(0x20_0000, 0x20_0000, 4)]
        )
    );
    insta::assert_snapshot!(
        "record_dirty_bitmap",
        record_snapshot(
            Tag::DirtyBitmap,
            RFLAG_OPTIONAL,
            &[
                &encode::dirty_bitmap(0x1000, 3 * 4096, 4096),
                &encode::words_le(&[0b101])
            ]
        )
    );
    insta::assert_snapshot!(
        "record_round",
        record_snapshot(
            Tag::Round,
            RFLAG_OPTIONAL,
            &[&encode::round(&Round {
                round: 2,
                pages: 10,
                zero_pages: 3,
                dirty_pages: 13,
                device_bytes: 96,
                stream_bytes: 50_000,
                elapsed_us: 777,
            })]
        )
    );
    insta::assert_snapshot!(
        "record_end",
        record_snapshot(
            Tag::End,
            0,
            &[&encode::end(&End {
                records: 9,
                stream_bytes: 4242,
                pages: 10,
                zero_pages: 3,
                device_bytes: 96,
                digest: 0xdead_beef,
            })]
        )
    );
}
