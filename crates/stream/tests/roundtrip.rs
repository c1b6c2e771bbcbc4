//! Writer -> reader round trips: whatever the writer is asked to send, both readers return.

use livemig_stream::{
    Compat, DirtyCaps, Limits, Phase, Reader, Record, Round, SliceReader, Writer, WriterOptions,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Pages { page: u64, pattern: Vec<u8> },
    State { device: u32, data: Vec<u8> },
    Round(u32),
    Bitmap(Vec<u64>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..1 << 20, proptest::collection::vec(0u8..3, 1..20))
            .prop_map(|(page, pattern)| Op::Pages { page, pattern }),
        (0u32..3, proptest::collection::vec(any::<u8>(), 0..3000))
            .prop_map(|(device, data)| Op::State { device, data }),
        any::<u32>().prop_map(Op::Round),
        proptest::collection::vec(any::<u64>(), 1..4).prop_map(Op::Bitmap),
    ]
}

/// Pages of 1 KiB: pattern value 0 makes an all-zero page.
fn pages_of(pattern: &[u8]) -> Vec<u8> {
    pattern
        .iter()
        .enumerate()
        .flat_map(|(i, &p)| {
            (0..1024).map(move |j| {
                if p == 0 {
                    0
                } else {
                    (i * 31 + j + usize::from(p)) as u8
                }
            })
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn everything_written_is_read_back(
        ops in proptest::collection::vec(op(), 0..25),
        checksums in any::<bool>(),
        zero in any::<bool>(),
        max_record in 2048u32..20_000,
    ) {
        let opts = WriterOptions {
            checksums,
            producer: "roundtrip".into(),
            detect_zero_pages: zero,
            max_record,

            ..WriterOptions::default()
        };
        let mut w = Writer::new(Vec::new(), opts).unwrap();
        for d in 0..3 {
            w.compat(&Compat {
                device: d,
                identity: "dev",
                compat: &[d as u8; 4],
                page_size_mask: 0x1000,
                dirty_caps: DirtyCaps(DirtyCaps::IOMMU),
                migration_flags: 1,
            }).unwrap();
        }
        let mut want_pages: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut want_state: Vec<Vec<u8>> = vec![Vec::new(); 3];
        let mut want_rounds = Vec::new();
        let mut want_bitmaps = Vec::new();
        for op in &ops {
            match op {
                Op::Pages { page, pattern } => {
                    let data = pages_of(pattern);
                    w.pages(page * 1024, 1024, &data).unwrap();
                    for (i, p) in data.chunks(1024).enumerate() {
                        want_pages.push((page * 1024 + i as u64 * 1024, p.to_vec()));
                    }
                }
                Op::State { device, data } => {
                    w.device_state(*device, Phase::PreCopy, data).unwrap();
                    want_state[*device as usize].extend_from_slice(data);
                }
                Op::Round(r) => {
                    w.round(&Round { round: *r, ..Round::default() }).unwrap();
                    want_rounds.push(*r);
                }
                Op::Bitmap(words) => {
                    let span = words.len() as u64 * 64 * 4096;
                    w.dirty_bitmap(0, span, 4096, words).unwrap();
                    want_bitmaps.push(words.clone());
                }
            }
        }
        let bytes = w.finish().unwrap();

        // The zero-copy reader and the streaming reader agree with what was written.
        for streaming in [false, true] {
            let mut got_pages: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut got_state: Vec<Vec<u8>> = vec![Vec::new(); 3];
            let mut got_rounds = Vec::new();
            let mut got_bitmaps = Vec::new();
            let mut handle = |rec: Record<'_>| match rec {
                Record::Pages(p) => {
                    for (i, page) in p.payload.chunks(p.page_size as usize).enumerate() {
                        got_pages.push((p.gpa + i as u64 * u64::from(p.page_size), page.to_vec()));
                    }
                }
                Record::ZeroPages(z) => {
                    for i in 0..u64::from(z.count) {
                        got_pages.push((z.gpa + i * u64::from(z.page_size), vec![0; z.page_size as usize]));
                    }
                }
                Record::DeviceState(d) => got_state[d.device as usize].extend_from_slice(d.data),
                Record::Round(r) => got_rounds.push(r.round),
                Record::DirtyBitmap(b) => got_bitmaps.push(b.words().collect::<Vec<_>>()),
                _ => {}
            };
            if streaming {
                let mut r = Reader::new(&bytes[..], Limits::default()).unwrap();
                while let Some(rec) = r.next().unwrap() {
                    handle(rec);
                }
            } else {
                let mut r = SliceReader::new(&bytes, Limits::default()).unwrap();
                while let Some(rec) = r.next().unwrap() {
                    handle(rec);
                }
            }
            prop_assert_eq!(&got_pages, &want_pages);
            prop_assert_eq!(&got_state, &want_state);
            prop_assert_eq!(&got_rounds, &want_rounds);
            prop_assert_eq!(&got_bitmaps, &want_bitmaps);
        }
    }
}

#[test]
fn zero_pages_are_sent_without_payload() {
    let mut data = vec![0u8; 4096 * 10];
    data[4096 * 4] = 1; // page 4 is the only non-zero page
    let mut w = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
    let n = w.pages(0, 4096, &data).unwrap();
    assert_eq!((n.pages, n.zero_pages), (1, 9));
    let bytes = w.finish().unwrap();
    assert!(bytes.len() < 4096 + 400, "{} bytes", bytes.len());
    let mut r = SliceReader::new(&bytes, Limits::default()).unwrap();
    let mut kinds = Vec::new();
    while let Some(rec) = r.next().unwrap() {
        kinds.push(rec.name());
    }
    assert_eq!(kinds, ["ZeroPages", "Pages", "ZeroPages", "End"]);
}

#[test]
fn channel_then_compat_then_syncs_round_trip_and_the_rules_hold() {
    use livemig_stream::{Channel, ErrorKind};
    let ch = Channel {
        index: 0,
        count: 3,
        token: *b"0123456789abcdef",
    };
    let mut w = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
    w.channel(&ch).unwrap();
    w.compat(&Compat {
        device: 0,
        identity: "dev",
        compat: b"",
        page_size_mask: 0x1000,
        dirty_caps: DirtyCaps(0),
        migration_flags: 1,
    })
    .unwrap();
    w.sync(1).unwrap();
    assert!(
        w.channel(&ch).is_err(),
        "a Channel record after others is refused by the writer"
    );
    let bytes = w.finish().unwrap();
    let mut names = Vec::new();
    let mut rd = Reader::new(&bytes[..], Limits::default()).unwrap();
    while let Some(rec) = rd.next().unwrap() {
        match rec {
            Record::Channel(c) => assert_eq!(c, ch),
            Record::Sync(s) => assert_eq!(s.round, 1),
            _ => {}
        }
        names.push(rec.name());
    }
    assert_eq!(names, ["Channel", "Compat", "Sync", "End"]);
    let mut sr = SliceReader::new(&bytes, Limits::default()).unwrap();
    assert_eq!(sr.validate_all().unwrap().records, 3);

    // A reader refuses a Channel record that is not first, and impossible counts and indexes.
    let bad = |index: u32, count: u32| {
        livemig_stream::format::decode(
            livemig_stream::Tag::Channel as u16,
            0,
            &livemig_stream::format::encode::channel(&Channel {
                index,
                count,
                token: [0; 16],
            }),
        )
        .unwrap_err()
    };
    assert!(matches!(
        bad(0, 0),
        ErrorKind::InvalidField {
            field: "Channel count",
            ..
        }
    ));
    assert!(matches!(
        bad(4, 3),
        ErrorKind::InvalidField {
            field: "Channel index",
            ..
        }
    ));
    let mut w = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
    w.sync(1).unwrap();
    w.flush().unwrap();
    let mut bytes = w.get_mut().clone();
    let mut w2 = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
    w2.channel(&ch).unwrap();
    w2.flush().unwrap();
    // Splice: header + Sync (seq 0) + the Channel record renumbered as seq 1.
    let rec = &w2.get_mut()[48..];
    let mut rec = rec.to_vec();
    rec[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = livemig_stream::crc::crc32c(&[&rec[..12], &rec[16..]].concat());
    rec[12..16].copy_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&rec);
    let mut rd = Reader::new(&bytes[..], Limits::default()).unwrap();
    assert!(matches!(rd.next().unwrap(), Some(Record::Sync(_))));
    let e = rd.next().unwrap_err();
    assert!(
        e.to_string().contains("Channel record after other records"),
        "{e}"
    );
}
