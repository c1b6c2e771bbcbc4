//! Multi-channel transfer: pages spread over page channels, each round closed by a Sync
//! barrier on the destination. The ordering test delays one channel so that a page re-sent on
//! a fast channel arrives before its older copy on the slow one; the negative control turns
//! the destination's barrier off and the older copy wins.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use common::{NoVcpus, Ram};

use livemig::bitmap::PageBitmap;
use livemig::engine::{
    Destination, DestinationPlatform, MigrationReport, ReceiveReport, Source, SourceConfig,
    SourcePlatform,
};
use livemig::link::{Cut, LinkConfig, migrate_local, migrate_local_channels};
use livemig::memory::{GuestMemory, PAGE_SIZE};
use livemig::tracker::{BoxError, DirtyTracker};
use livemig::{Error, Result};

const PAGES: u64 = 64;
/// The page the guest writes after round 1: in the upper half, so round 1 sends it on page
/// channel 2, and alone in round 2, so it goes on page channel 1.
const HOT: u64 = 60;

/// The guest, scripted: at each harvest after the first round it has written `HOT` once more
/// (a new byte value each time, for `writes` harvests), and the tracker reports it.
struct ScriptedGuest {
    ram: Arc<Ram>,
    harvests: u32,
    writes: u32,
}

impl DirtyTracker for ScriptedGuest {
    fn name(&self) -> String {
        "scripted guest".into()
    }
    fn start(&mut self) -> std::result::Result<(), BoxError> {
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> std::result::Result<u64, BoxError> {
        self.harvests += 1;
        // Harvest 1 is the start's; harvest 2 follows round 1.
        if self.harvests >= 2 && self.harvests < 2 + self.writes {
            let v = 0xA0 + self.harvests as u8;
            self.ram
                .write(HOT * PAGE_SIZE, &[v; PAGE_SIZE as usize])
                .map_err(|e| e.to_string())?;
            into.set(HOT);
            return Ok(1);
        }
        Ok(0)
    }
    fn stop(&mut self) -> std::result::Result<(), BoxError> {
        Ok(())
    }
}

fn platforms(writes: u32) -> (Arc<Ram>, Arc<Ram>, SourcePlatform, DestinationPlatform) {
    let src = Ram::pages(PAGES, |p| p as u8 + 1);
    let dst = Ram::pages(PAGES, |_| 0);
    let sp = SourcePlatform {
        memory: src.clone(),
        devices: Vec::new(),
        iommu: None,
        cpu: Box::new(ScriptedGuest {
            ram: src.clone(),
            harvests: 0,
            writes,
        }),
        vcpus: Box::new(NoVcpus),
        page_size_mask: 0x1000,
        viommu: None,
        dma_endpoints: Vec::new(),
    };
    let dp = DestinationPlatform {
        memory: dst.clone(),
        devices: Vec::new(),
        iommu_dirty: Vec::new(),
        page_size_mask: 0x1000,
        vcpus: None,
    };
    (src, dst, sp, dp)
}

fn fast() -> LinkConfig {
    LinkConfig {
        bandwidth: 0,
        latency: Duration::ZERO,
    }
}

fn slow() -> LinkConfig {
    LinkConfig {
        bandwidth: 0,
        latency: Duration::from_millis(500),
    }
}

fn cfg(channels: u32) -> SourceConfig {
    SourceConfig {
        channels,
        ..SourceConfig::default()
    }
}

fn run(
    channels: &[LinkConfig],
    writes: u32,
    skip_barrier: bool,
) -> (
    Arc<Ram>,
    Arc<Ram>,
    Result<MigrationReport>,
    Result<ReceiveReport>,
) {
    let (src, dst, sp, dp) = platforms(writes);
    let mut s = Source::new(sp, cfg(channels.len().max(1) as u32));
    let mut d = Destination::new(dp);
    d.x_skip_round_barrier(skip_barrier);
    let (r, dr) = if channels.is_empty() {
        migrate_local(&mut s, &mut d, fast(), &Cut::new())
    } else {
        migrate_local_channels(&mut s, &mut d, fast(), channels, &Cut::new())
    };
    common::assert_one_host(&s, &d);
    (src, dst, r, dr)
}

#[test]
fn a_page_resent_on_a_fast_channel_never_loses_to_its_older_copy_on_a_slow_one() {
    let (src, dst, r, dr) = run(&[fast(), slow()], 1, false);
    let r = r.expect("migrates");
    let dr = dr.expect("receives");
    assert_eq!(
        src.page(HOT)[0],
        0xA2,
        "the guest wrote the hot page after round 1"
    );
    assert_eq!(dst.stale_pages(&src), Vec::<u64>::new());
    // Round 1 sent every page, a later round the hot page again: 65 pages in all.
    let sent: u64 = r
        .rounds
        .iter()
        .chain([&r.stop_copy])
        .map(|x| x.pages + x.zero_pages)
        .sum();
    assert_eq!(sent, PAGES + 1, "{r:?}");
    assert_eq!(dr.pages + dr.zero_pages, PAGES + 1);
    // Bytes: the destination read what the source wrote, over all channels (End records
    // aside: the source counts up to End, the destination through it).
    assert!(dr.bytes > r.bytes, "{} vs {}", dr.bytes, r.bytes);
}

#[test]
fn negative_control_without_the_round_barrier_the_older_copy_wins() {
    let (src, dst, r, dr) = run(&[fast(), slow()], 1, true);
    r.expect("the source cannot tell");
    dr.expect("the destination cannot tell either");
    assert_eq!(
        dst.stale_pages(&src),
        vec![HOT],
        "without the barrier round 1's copy of the hot page, delayed on channel 2, lands after \
         the newer copy sent on channel 1"
    );
}

#[test]
fn one_two_and_four_channels_carry_the_same_memory() {
    for n in [0usize, 2, 4] {
        let links: Vec<LinkConfig> = (0..n).map(|_| fast()).collect();
        let (src, dst, r, dr) = run(&links, 3, false);
        let r = r.unwrap_or_else(|e| panic!("{n} channels: {}", e.chain()));
        dr.unwrap_or_else(|e| panic!("{n} channels: {}", e.chain()));
        assert_eq!(dst.stale_pages(&src), Vec::<u64>::new(), "{n} channels");
        assert!(r.timeline.len() >= 2, "{:?}", r.timeline);
        assert_eq!(r.timeline.last().unwrap().1, r.bytes);
    }
}

#[test]
fn channel_counts_that_cannot_work_are_refused_before_anything_moves() {
    for bad in [0u32, livemig::engine::MAX_CHANNELS + 1] {
        let (_, _, sp, _) = platforms(0);
        let s = Source::new(sp, cfg(bad));
        let e = s.check().unwrap_err();
        assert!(
            matches!(e, Error::Config(_)) && e.to_string().contains(&format!("channels {bad}")),
            "{e}"
        );
    }
    // Page channels need a way to open them.
    let (_, _, sp, dp) = platforms(0);
    let mut s = Source::new(sp, cfg(2));
    let mut d = Destination::new(dp);
    let (r, _) = migrate_local(&mut s, &mut d, fast(), &Cut::new());
    common::assert_one_host(&s, &d);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("migrate_channels"), "{e}");
}

#[test]
fn a_single_connection_destination_refuses_a_multi_channel_source_by_name() {
    let (_, _, sp, dp) = platforms(0);
    let mut s = Source::new(sp, cfg(2));
    let mut d = Destination::new(dp);
    let (data_w, data_r) = livemig::link::pipe(fast(), Cut::new());
    let (back_w, back_r) = livemig::link::pipe(fast(), Cut::new());
    let (r, dr) = std::thread::scope(|sc| {
        let h = sc.spawn(move || d.receive(data_r, back_w));
        let r = s.migrate_channels(
            livemig::transport::LinkChannel {
                data: data_w,
                back: back_r,
                cut: Cut::new(),
            },
            &mut |_| Err(std::io::Error::other("not reached")),
        );
        (r, h.join().unwrap())
    });
    let de = dr.unwrap_err();
    assert!(
        de.to_string()
            .contains("the source uses 2 page channels; this destination takes one connection"),
        "{de}"
    );
    let se = r.unwrap_err();
    assert!(se.to_string().contains("2 page channels"), "{se}");
    assert!(!s.is_stopped(), "a refused source runs on");
}

const TOKEN: [u8; 16] = [7; 16];

fn writer() -> livemig_stream::Writer<Vec<u8>> {
    livemig_stream::Writer::new(Vec::new(), livemig_stream::WriterOptions::default()).unwrap()
}

fn channel(w: &mut livemig_stream::Writer<Vec<u8>>, index: u32, count: u32, token: [u8; 16]) {
    w.channel(&livemig_stream::Channel {
        index,
        count,
        token,
    })
    .unwrap();
}

/// A forged main stream: Channel 0 of `count`, the (empty) compat section, `body`, End.
fn main_stream(count: u32, body: impl FnOnce(&mut livemig_stream::Writer<Vec<u8>>)) -> Vec<u8> {
    let mut w = writer();
    channel(&mut w, 0, count, TOKEN);
    w.round(&livemig_stream::Round::default()).unwrap();
    body(&mut w);
    w.finish().unwrap()
}

/// A forged page channel.
fn page_stream(
    index: u32,
    count: u32,
    token: [u8; 16],
    body: impl FnOnce(&mut livemig_stream::Writer<Vec<u8>>),
) -> Vec<u8> {
    let mut w = writer();
    channel(&mut w, index, count, token);
    body(&mut w);
    w.finish().unwrap()
}

/// Runs a destination over forged streams; its error, and whether any page was written.
fn receive_forged(main: Vec<u8>, mut pages: Vec<Vec<u8>>) -> (Error, bool) {
    let (_, dst, _, dp) = platforms(0);
    let mut d = Destination::new(dp);
    let mut back = Vec::new();
    pages.reverse();
    let e = d
        .receive_channels(&main[..], &mut back, Box::new(|| {}), &mut || {
            let b = pages
                .pop()
                .ok_or_else(|| std::io::Error::other("no more"))?;
            Ok((
                Box::new(std::io::Cursor::new(b)) as Box<dyn Read + Send>,
                Box::new(|| {}) as livemig::transport::Abort,
            ))
        })
        .unwrap_err();
    (e, !dst.stale_pages(&Ram::pages(PAGES, |_| 0)).is_empty())
}

fn page(w: &mut livemig_stream::Writer<Vec<u8>>, p: u64) {
    w.pages(p * PAGE_SIZE, PAGE_SIZE as u32, &[0x5A; PAGE_SIZE as usize])
        .unwrap();
}

#[test]
fn page_channels_that_do_not_belong_or_disagree_are_refused_by_name() {
    type Case<'a> = (&'a str, Vec<u8>, Vec<Vec<u8>>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "another migration's token",
            main_stream(2, |_| {}),
            vec![
                page_stream(1, 2, [9; 16], |w| page(w, 1)),
                page_stream(2, 2, TOKEN, |_| {}),
            ],
            "page channel 1 of 2 does not belong to this migration",
        ),
        (
            "an index past the count",
            main_stream(2, |_| {}),
            vec![
                page_stream(3, 3, TOKEN, |_| {}),
                page_stream(2, 2, TOKEN, |_| {}),
            ],
            "page channel 3 of 3 does not belong",
        ),
        (
            "the same index twice",
            main_stream(2, |_| {}),
            vec![
                page_stream(1, 2, TOKEN, |_| {}),
                page_stream(1, 2, TOKEN, |_| {}),
            ],
            "page channel 1 connected twice",
        ),
        (
            "no Channel record first",
            main_stream(2, |_| {}),
            vec![
                {
                    let mut w = writer();
                    page(&mut w, 1);
                    w.finish().unwrap()
                },
                page_stream(2, 2, TOKEN, |_| {}),
            ],
            "a page channel began with Pages, not a Channel record",
        ),
        (
            "a skipped round",
            main_stream(2, |_| {}),
            vec![
                page_stream(1, 2, TOKEN, |w| w.sync(2).unwrap()),
                page_stream(2, 2, TOKEN, |w| w.sync(1).unwrap()),
            ],
            "Sync for round 2 where round 1 ends",
        ),
        (
            "a channel that ends a round early",
            main_stream(2, |_| {}),
            vec![
                page_stream(1, 2, TOKEN, |w| w.sync(1).unwrap()),
                page_stream(2, 2, TOKEN, |w| {
                    w.sync(1).unwrap();
                    w.sync(2).unwrap();
                }),
            ],
            "page channel 2 ended round 2 while another page channel had already sent End",
        ),
        (
            "pages on the main channel",
            main_stream(2, |w| page(w, 3)),
            vec![
                page_stream(1, 2, TOKEN, |_| {}),
                page_stream(2, 2, TOKEN, |_| {}),
            ],
            "pages on the main channel of a multi-channel migration",
        ),
        (
            "a page outside guest RAM",
            main_stream(2, |_| {}),
            vec![
                page_stream(1, 2, TOKEN, |w| page(w, PAGES)),
                page_stream(2, 2, TOKEN, |_| {}),
            ],
            "Pages at 0x40000 (+0x1000 bytes) outside guest RAM",
        ),
        (
            "a main channel that claims to be page channel 1",
            page_stream(1, 2, TOKEN, |_| {}),
            vec![],
            "the first connection is page channel 1 of 2",
        ),
    ];
    for (what, main, pages, want) in cases {
        let (e, written) = receive_forged(main, pages);
        assert!(e.chain().contains(want), "{what}: {}", e.chain());
        assert!(!written, "{what}: nothing may reach guest RAM");
    }
}

/// The return path's messages in `bytes`.
fn messages(bytes: &[u8]) -> Vec<livemig::control::Message> {
    let mut r = bytes;
    let mut v = Vec::new();
    while !r.is_empty() {
        v.push(livemig::control::Message::read_from(&mut r).unwrap());
    }
    v
}

#[test]
fn round_acks_go_only_to_a_source_that_reads_them() {
    use livemig::control::{CAP_ROUND_ACKS, Message};
    for minor in [0u16, 1] {
        let mut w = livemig_stream::Writer::new(
            Vec::new(),
            livemig_stream::WriterOptions {
                minor,
                ..Default::default()
            },
        )
        .unwrap();
        w.round(&livemig_stream::Round::default()).unwrap();
        w.round(&livemig_stream::Round {
            round: 1,
            ..Default::default()
        })
        .unwrap();
        let stream = w.finish().unwrap();
        let (_, _, _, dp) = platforms(0);
        let mut back = Vec::new();
        Destination::new(dp)
            .receive(&stream[..], &mut back)
            .unwrap();
        let got = messages(&back);
        if minor == 0 {
            // An older source (format 1.0) gets the base protocol only.
            assert!(
                matches!(got[..], [Message::CompatOk, Message::Resumed { .. }]),
                "{got:?}"
            );
        } else {
            assert!(
                matches!(
                    got[..],
                    [
                        Message::Capabilities(CAP_ROUND_ACKS),
                        Message::CompatOk,
                        Message::RoundAck { round: 1, .. },
                        Message::Resumed { .. }
                    ]
                ),
                "{got:?}"
            );
        }
    }
}

#[test]
fn a_source_migrates_to_a_destination_that_does_not_acknowledge_rounds() {
    use livemig::control::Message;
    // An older destination: reads the stream, answers CompatOk after the compat section and
    // Resumed after End, never a capability or an acknowledgement.
    let (_, _, sp, _) = platforms(1);
    let mut s = Source::new(sp, SourceConfig::default());
    let (data_w, data_r) = livemig::link::pipe(fast(), Cut::new());
    let (mut back_w, back_r) = livemig::link::pipe(fast(), Cut::new());
    let r = std::thread::scope(|sc| {
        sc.spawn(move || {
            let mut rd = livemig_stream::Reader::new(data_r, Default::default()).unwrap();
            while let Some(rec) = rd.next().unwrap() {
                match rec {
                    livemig_stream::Record::Round(r) if r.round == 0 => {
                        Message::CompatOk.write_to(&mut back_w).unwrap()
                    }
                    livemig_stream::Record::End(_) => {
                        Message::Resumed {
                            load_us: 1,
                            run_us: 1,
                        }
                        .write_to(&mut back_w)
                        .unwrap();
                        break;
                    }
                    _ => {}
                }
            }
        });
        s.migrate(data_w, back_r)
    });
    let r = r.unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(r.drain_us, 0, "nothing to wait for");
}

/// The progress view a display reads: at each round's end every dirty page of the round has
/// been counted as sent, on one connection and over page channels, and at the end the bytes
/// are the report's.
#[test]
fn the_progress_view_counts_every_page_of_each_round() {
    for channels in [vec![], vec![fast(), fast()]] {
        let (_src, _dst, sp, dp) = platforms(2);
        let mut s = Source::new(sp, cfg(channels.len().max(1) as u32));
        let view = s.progress_view();
        assert_eq!(view.snapshot(), Default::default());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (v, log) = (view.clone(), seen.clone());
        s.on_event(move |e| {
            if let livemig::engine::Event::Round(r) = e {
                log.lock()
                    .unwrap()
                    .push((r.round, r.dirty_pages, v.snapshot()));
            }
        });
        let mut d = Destination::new(dp);
        let (r, dr) = if channels.is_empty() {
            migrate_local(&mut s, &mut d, fast(), &Cut::new())
        } else {
            migrate_local_channels(&mut s, &mut d, fast(), &channels, &Cut::new())
        };
        common::assert_one_host(&s, &d);
        let r = r.expect("migrates");
        dr.expect("receives");
        let seen = seen.lock().unwrap();
        assert!(seen.len() >= 2, "{seen:?}");
        assert_eq!(seen[0].1, PAGES, "round 1 sends every page");
        for (round, dirty, snap) in seen.iter() {
            assert_eq!(
                (snap.round, snap.round_pages, snap.round_done),
                (*round, *dirty, *dirty),
                "{channels:?}"
            );
        }
        let end = view.snapshot();
        assert_eq!(end.round, r.stop_copy.round);
        assert_eq!(end.bytes, r.bytes, "{channels:?}");
        assert!(
            s.is_stopped(),
            "a migrated source stays stopped (the VM runs there now)"
        );
    }
}

/// The destination reports what it held to receive (issue 19: memory bounded and reported):
/// one record buffer per connection, never above the record limit, within the reported bound;
/// with a smaller limit set, a record above it is refused by name before it is buffered.
#[test]
fn the_destination_reports_its_buffers_within_the_bound_its_limits_set() {
    for channels in [Vec::new(), vec![fast(), fast()]] {
        let (_, _, r, dr) = run(&channels, 0, false);
        r.expect("migrates");
        let m = dr.expect("receives").memory;
        let connections = 1 + channels.len() as u64;
        let limit = livemig_stream::Limits::default().max_record;
        assert!(m.record_buffers > 0, "{m:?}");
        assert!(m.record_buffers <= connections * limit, "{m:?}");
        assert_eq!(m.bound, connections * limit, "no devices: no descriptors");
        assert!(m.record_buffers + m.compat <= m.bound, "{m:?}");
    }
    // A destination that takes records of at most 64 KiB: the source's 1 MiB page batches are
    // refused at their header.
    let (_, _, sp, dp) = platforms(0);
    let mut s = Source::new(sp, cfg(1));
    let mut d = Destination::new(dp);
    d.set_limits(livemig_stream::Limits {
        max_record: 64 << 10,
        ..livemig_stream::Limits::default()
    });
    let (r, dr) = migrate_local(&mut s, &mut d, fast(), &Cut::new());
    common::assert_one_host(&s, &d);
    let e = livemig::error::chain(&dr.expect_err("a record above the limit"));
    assert!(e.contains("exceeds the limit of 65536"), "{e}");
    r.expect_err("the source sees the refusal");
    assert!(!s.is_stopped());
}
