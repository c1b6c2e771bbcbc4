//! The peer is hostile (issue 19, item 4): a scripted source writes hand-encoded streams into the
//! real [`Destination`], and a scripted destination answers the real [`Source`] with lies on the
//! return path. Every case must be refused with an error that names what was wrong and where,
//! without a panic, with nothing written to guest RAM or a device that the format lets the
//! destination check first, and with the source running again (except after the stream's End,
//! where the engine's documented rule keeps it stopped with its state intact, and says so).
//!
//! The negative controls run the same scripted peers with valid bytes and show them accepted
//! (the destination writes RAM and runs the device; the source completes), so every refusal
//! here is due to the hostile bytes, not to a broken harness. Two more show the refusal check
//! itself can fail past its first assertion: a destination device given the refused record,
//! and guest RAM written before a refusal, are each caught by their own check.

mod common;

use std::io::{self, Cursor, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{NoVcpus, Quiet, Ram};
use livemig::control::{CAP_ROUND_ACKS, Message};
use livemig::device::{DeviceCompat, MigDevice, VfioMigDevice};
use livemig::engine::{
    Destination, DestinationPlatform, MigrationReport, ReceiveReport, Source, SourceConfig,
    SourceDevice, SourcePlatform,
};
use livemig::link::DataSink;
use livemig::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use livemig_stream::crc::Crc32c;
use livemig_stream::format::{
    HEADER_LEN, MINOR_ROUND_ACKS, RFLAG_OPTIONAL, RecordHeader, StreamHeader, Tag, encode,
};
use livemig_stream::{Channel, Compat, DirtyCaps, End, Limits, Phase, Round, SliceReader};
use livemig_vfio::data::{PrecopyInfo, PrecopyRound};
use livemig_vfio::sim::{SimConfig, SimDevice};
use livemig_vfio::{
    Error as VfioError, MigrationDevice, MigrationFlags, MigrationState as S, PrecopyInfoV2,
};

/// Guest RAM on both sides.
const RAM: u64 = 64 << 10;
/// What the destination's RAM holds before a migration (so a zeroed page shows too).
const FILL: u8 = 0xA5;
const IDENTITY: &str = "sim 5157:0001";
const LAYOUT: &[u8] = b"bar0 0x1000 mem32";
const FLAGS: MigrationFlags = MigrationFlags::STOP_COPY.union(MigrationFlags::PRE_COPY);
const DEVICE_ID: u32 = 0x5157_0001;

// ---------------------------------------------------------------------------------------------
// Devices

fn sim_cfg(seed: u64, device_id: u32, state_size: usize) -> SimConfig {
    SimConfig {
        state_size,
        chunk_size: 256,
        device_id,
        seed,
        ..SimConfig::new(FLAGS)
    }
}

fn adapter(sim: SimDevice) -> VfioMigDevice<SimDevice> {
    VfioMigDevice::new(
        "sim",
        DeviceCompat {
            identity: IDENTITY.into(),
            compat: LAYOUT.to_vec(),
            migration_flags: 0,
            dma_logging: false,
        },
        sim,
        MigrationFlags::all(),
    )
    .expect("the simulated device reports its flags")
}

/// The device state (STOP_COPY data) a simulated device with `cfg` produces.
fn device_state(cfg: SimConfig) -> Vec<u8> {
    let mut d = adapter(SimDevice::new(cfg));
    d.transition(S::StopCopy).expect("to STOP_COPY");
    let mut buf = Vec::new();
    d.save(&mut buf).expect("saves");
    buf
}

/// The state a source device of the destination's kind sends.
fn good_state() -> Vec<u8> {
    device_state(sim_cfg(99, DEVICE_ID, 1024))
}

/// The engine's device adapter around the simulated device, recording every byte the engine
/// hands the device to load.
struct Spy {
    inner: VfioMigDevice<SimDevice>,
    loaded: Arc<Mutex<Vec<u8>>>,
    /// Negative control only: bytes the device is given just before its reset, as if the
    /// destination had fed it the refused record before refusing it.
    leak: Option<Vec<u8>>,
}

impl MigDevice for Spy {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn compat(&self) -> DeviceCompat {
        self.inner.compat()
    }
    fn state(&self) -> Result<S, VfioError> {
        self.inner.state()
    }
    fn transition(&mut self, target: S) -> Result<(), VfioError> {
        self.inner.transition(target)
    }
    fn precopy(&mut self, sink: &mut Vec<u8>, max: u64) -> Result<PrecopyRound, VfioError> {
        self.inner.precopy(sink, max)
    }
    fn precopy_pending(&mut self) -> Result<u64, VfioError> {
        self.inner.precopy_pending()
    }
    fn precopy_info(&mut self) -> Result<PrecopyInfo, VfioError> {
        self.inner.precopy_info()
    }
    fn enable_precopy_info_v2(&mut self) -> Result<PrecopyInfoV2, VfioError> {
        self.inner.enable_precopy_info_v2()
    }
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        self.inner.stop_copy_size()
    }
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
        self.inner.save(sink)
    }
    fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError> {
        self.loaded.lock().unwrap().extend_from_slice(bytes);
        self.inner.load(bytes)
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        if let Some(leak) = self.leak.take() {
            // Still in RESUMING: the device takes the bytes like any others.
            self.load(&leak)?;
        }
        self.inner.reset()
    }
}

/// RAM with a hole: `[0, 32 KiB)` and `[48 KiB, 64 KiB)`.
struct Holey(Arc<Ram>);

const HOLE: (u64, u64) = (32 << 10, 48 << 10);

impl GuestMemory for Holey {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        vec![(0, HOLE.0), (HOLE.1, RAM - HOLE.1)]
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.0.read(gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.0.write(gpa, data)
    }
    fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.0.zero(gpa, len)
    }
}

// ---------------------------------------------------------------------------------------------
// The scripted source: streams encoded by hand (the Writer would refuse to write them)

/// A stream header; `fix` edits the bytes before the header CRC is computed.
fn header_with(fix: impl FnOnce(&mut [u8; HEADER_LEN])) -> [u8; HEADER_LEN] {
    let mut h = StreamHeader {
        minor: MINOR_ROUND_ACKS,
        ..StreamHeader::new(true, "hostile peer")
    }
    .encode();
    fix(&mut h);
    let crc = livemig_stream::crc::crc32c(&h[..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A stream written record by record, with correct framing (sequence numbers, CRCs, End totals
/// and digest) unless a case breaks it on purpose.
struct Script {
    bytes: Vec<u8>,
    seq: u32,
    digest: Crc32c,
    totals: End,
}

impl Script {
    /// A checksummed stream of format 1.1 (its source reads round acknowledgements).
    fn new() -> Script {
        Script::with_header(&header_with(|_| {}))
    }

    fn with_header(h: &[u8; HEADER_LEN]) -> Script {
        let mut digest = Crc32c::new();
        digest.update(&h[44..48]);
        Script {
            bytes: h.to_vec(),
            seq: 0,
            digest,
            totals: End::default(),
        }
    }

    /// The offset the next record starts at.
    fn offset(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// "at byte N (record I)": where the next record will be reported.
    fn here(&self) -> String {
        format!("at byte {} (record {})", self.offset(), self.seq)
    }

    /// A record with every header field given (the CRC is computed over them).
    fn frame(&mut self, tag: u16, flags: u16, length: u32, seq: u32, body: &[u8]) -> &mut Script {
        let mut rh = RecordHeader {
            tag,
            flags,
            length,
            seq,
            crc: 0,
        };
        rh.crc = rh.compute_crc(&[body]);
        self.bytes.extend_from_slice(&rh.encode());
        self.bytes.extend_from_slice(body);
        self.seq = seq.wrapping_add(1);
        if tag != Tag::End as u16 {
            self.digest.update(&rh.crc.to_le_bytes());
            self.totals.records += 1;
        }
        self
    }

    fn record(&mut self, tag: u16, flags: u16, body: &[u8]) -> &mut Script {
        let seq = self.seq;
        self.frame(tag, flags, body.len() as u32, seq, body)
    }

    fn rec(&mut self, tag: Tag, body: &[u8]) -> &mut Script {
        self.record(tag as u16, 0, body)
    }

    fn compat_of(&mut self, c: &Compat<'_>) -> &mut Script {
        let mut body = encode::compat(c).expect("encodes").to_vec();
        body.extend_from_slice(c.identity.as_bytes());
        body.extend_from_slice(c.compat);
        self.rec(Tag::Compat, &body)
    }

    /// Compat for device 0, matching the destination's device.
    fn compat(&mut self) -> &mut Script {
        self.compat_of(&matching())
    }

    fn round(&mut self, round: u32) -> &mut Script {
        self.rec(
            Tag::Round,
            &encode::round(&Round {
                round,
                ..Round::default()
            }),
        )
    }

    /// `count` 4 KiB pages at `gpa`, each filled with `byte`.
    fn pages(&mut self, gpa: u64, count: u32, byte: u8) -> &mut Script {
        let mut body = encode::pages(gpa, PAGE_SIZE as u32, count).to_vec();
        body.resize(body.len() + count as usize * PAGE_SIZE as usize, byte);
        self.totals.pages += u64::from(count);
        self.rec(Tag::Pages, &body)
    }

    fn zero_pages(&mut self, gpa: u64, count: u32) -> &mut Script {
        self.totals.zero_pages += u64::from(count);
        self.rec(Tag::ZeroPages, &encode::pages(gpa, PAGE_SIZE as u32, count))
    }

    fn state(&mut self, device: u32, phase: Phase, chunk: u32, data: &[u8]) -> &mut Script {
        let mut body = encode::device_state(device, phase, chunk).to_vec();
        body.extend_from_slice(data);
        self.totals.device_bytes += data.len() as u64;
        self.rec(Tag::DeviceState, &body)
    }

    /// End with the true totals and digest.
    fn end(&mut self) -> &mut Script {
        let e = End {
            stream_bytes: self.offset(),
            digest: self.digest.finish(),
            ..self.totals
        };
        self.end_of(&e)
    }

    fn end_of(&mut self, e: &End) -> &mut Script {
        self.rec(Tag::End, &encode::end(e))
    }

    /// The true End, edited by `f`.
    fn end_with(&mut self, f: impl FnOnce(&mut End)) -> &mut Script {
        let mut e = End {
            stream_bytes: self.offset(),
            digest: self.digest.finish(),
            ..self.totals
        };
        f(&mut e);
        self.end_of(&e)
    }

    /// Raw bytes appended as they are.
    fn raw(&mut self, b: &[u8]) -> &mut Script {
        self.bytes.extend_from_slice(b);
        self
    }
}

fn matching() -> Compat<'static> {
    Compat {
        device: 0,
        identity: IDENTITY,
        compat: LAYOUT,
        page_size_mask: 0x1000,
        dirty_caps: DirtyCaps(0),
        migration_flags: FLAGS.bits() as u32,
    }
}

/// The compat section the destination accepts: Compat for its device, Round 0.
fn accepted() -> Script {
    let mut s = Script::new();
    s.compat().round(0);
    s
}

/// A whole valid migration: two pages, a zero page, round 1, the device's state, End.
fn valid(state: &[u8]) -> Script {
    let mut s = accepted();
    s.pages(0x2000, 2, 0x11)
        .zero_pages(0x8000, 1)
        .round(1)
        .state(0, Phase::StopCopy, 0, state)
        .end();
    s
}

// ---------------------------------------------------------------------------------------------
// The destination under test

struct Dest {
    d: Destination,
    ram: Arc<Ram>,
    sim: SimDevice,
    loaded: Arc<Mutex<Vec<u8>>>,
}

fn destination() -> Dest {
    build_destination(false, None)
}

fn destination_with_hole() -> Dest {
    build_destination(true, None)
}

fn build_destination(hole: bool, leak: Option<Vec<u8>>) -> Dest {
    let ram = Ram::filled(RAM as usize, FILL);
    let memory: Arc<dyn GuestMemory> = if hole {
        Arc::new(Holey(ram.clone()))
    } else {
        ram.clone()
    };
    let sim = SimDevice::new(sim_cfg(1, DEVICE_ID, 1024));
    let loaded = Arc::default();
    let spy = Spy {
        inner: adapter(sim.clone()),
        loaded: Arc::clone(&loaded),
        leak,
    };
    let d = Destination::new(DestinationPlatform {
        memory,
        devices: vec![Box::new(spy)],
        iommu_dirty: vec![false],
        page_size_mask: 0x1000,
        vcpus: None,
    });
    Dest {
        d,
        ram,
        sim,
        loaded,
    }
}

/// Every message on a return path, in order.
fn replies(mut back: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    while !back.is_empty() {
        out.push(Message::read_from(&mut back).expect("the destination writes valid frames"));
    }
    out
}

impl Dest {
    fn receive(&mut self, stream: &[u8]) -> (livemig::Result<ReceiveReport>, Vec<Message>) {
        let mut back = Vec::new();
        let r = self.d.receive(stream, &mut back);
        (r, replies(&back))
    }

    fn ram_untouched(&self) -> bool {
        self.ram.0.lock().unwrap().iter().all(|&b| b == FILL)
    }
}

/// How far a refused stream got on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At<'a> {
    /// Refused before the compat verdict: the device was never moved.
    Compat,
    /// Refused after CompatOk: the device went to RESUMING, was given no byte of the stream,
    /// and was reset.
    Receive,
    /// The device went to RESUMING and was given exactly these bytes, the device-state records
    /// the stream carried before the refused one, in order (for a refusal at or after End, or
    /// by the device's own validation when leaving RESUMING: all of them). The refused record
    /// never reached it; it never left RESUMING (not validated, never ran), the destination
    /// never reported running, and it was reset.
    Device(&'a [u8]),
}

/// Feeds `stream` to a fresh destination and checks the refusal: the error chain holds every
/// `expect` text; the destination told the source the same on the return path; guest RAM is
/// untouched; the device is RUNNING, was given no byte of the refused record (only what
/// [`At::Device`] names) and never ran with what it was given.
#[track_caller]
fn refuse(stream: &Script, at: At<'_>, expect: &[&str]) -> String {
    refuse_on(&mut destination(), stream, at, expect)
}

#[track_caller]
fn refuse_on(dest: &mut Dest, stream: &Script, at: At<'_>, expect: &[&str]) -> String {
    let (r, replies) = dest.receive(&stream.bytes);
    let e = match r {
        Ok(rep) => panic!("accepted a hostile stream (expected {expect:?}): {rep:?}"),
        Err(e) => e,
    };
    let text = e.chain();
    for want in expect {
        assert!(text.contains(want), "expected {want:?} in: {text}");
    }
    // The source hears the same reason.
    match (&e, replies.last()) {
        (livemig::Error::Refused { reason, .. }, Some(Message::CompatRefused(r))) => {
            assert_eq!(r, reason);
            assert_eq!(replies.len(), 1, "{replies:?}");
        }
        (_, Some(Message::Failed(r))) => assert_eq!(r, &text),
        other => panic!("no refusal on the return path: {other:?} ({text})"),
    }
    let arcs = dest.sim.arcs();
    match at {
        At::Compat => {
            assert!(
                !replies.contains(&Message::CompatOk),
                "{replies:?} ({text})"
            );
            assert!(arcs.is_empty(), "the device was moved: {arcs:?} ({text})");
        }
        At::Receive | At::Device(_) => {
            assert_eq!(
                replies[..2],
                [Message::Capabilities(CAP_ROUND_ACKS), Message::CompatOk],
                "{text}"
            );
            // RESUMING, then a reset: never STOP (validated) nor RUNNING with the state.
            assert_eq!(
                arcs,
                [(S::Running, S::Stop), (S::Stop, S::Resuming)],
                "{text}"
            );
        }
    }
    // The device was given what came before the refused record and nothing of it.
    let given: &[u8] = match at {
        At::Device(given) => given,
        At::Compat | At::Receive => &[],
    };
    let loaded = dest.loaded.lock().unwrap().clone();
    assert!(
        loaded == given,
        "refused data reached the device: it was given {} bytes, the {} before the refused \
         record expected ({text})",
        loaded.len(),
        given.len()
    );
    // Never ran: the destination never said so (the arcs above: never STOP nor RUNNING).
    assert!(
        !replies.iter().any(|m| matches!(m, Message::Resumed { .. })),
        "the destination reported running: {replies:?} ({text})"
    );
    assert_eq!(dest.sim.migration_state().unwrap(), S::Running, "{text}");
    assert!(dest.ram_untouched(), "guest RAM was written ({text})");
    text
}

// ---------------------------------------------------------------------------------------------
// A. Scripted source against the real Destination

#[test]
fn hostile_peer_negative_control_the_scripted_source_with_a_valid_stream_is_accepted() {
    let state = good_state();
    let mut dest = destination();
    let (r, replies) = dest.receive(&valid(&state).bytes);
    let r = r.expect("a valid scripted stream is accepted");
    assert_eq!((r.pages, r.zero_pages, r.rounds), (2, 1, 1), "{r:?}");
    assert_eq!(
        replies[..3],
        [
            Message::Capabilities(CAP_ROUND_ACKS),
            Message::CompatOk,
            Message::RoundAck {
                round: 1,
                device_load_us: 0,
                device_bytes: 0
            }
        ]
    );
    assert!(matches!(replies[3], Message::Resumed { .. }), "{replies:?}");
    // RAM written: pages 2 and 3 with data, page 8 zeroed, everything else as it was.
    assert_eq!(dest.ram.page(2), vec![0x11; PAGE_SIZE as usize]);
    assert_eq!(dest.ram.page(3), vec![0x11; PAGE_SIZE as usize]);
    assert_eq!(dest.ram.page(8), vec![0; PAGE_SIZE as usize]);
    assert_eq!(dest.ram.page(4), vec![FILL; PAGE_SIZE as usize]);
    // The device validated the state and runs with it.
    assert_eq!(dest.sim.migration_state().unwrap(), S::Running);
    assert_eq!(*dest.loaded.lock().unwrap(), state);
    let expected = SimDevice::new(sim_cfg(99, DEVICE_ID, 1024)).state_bytes();
    assert_eq!(dest.sim.state_bytes(), expected);

    // And the refusal check itself fails on this stream: the suite can fail.
    let why = refusal_check_fails(&mut destination(), &valid(&state), At::Receive, &["x"]);
    assert!(why.contains("accepted a hostile stream"), "{why}");
}

/// Runs the refusal check expecting it to fail; returns its message.
fn refusal_check_fails(dest: &mut Dest, stream: &Script, at: At<'_>, expect: &[&str]) -> String {
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        refuse_on(dest, stream, at, expect);
    }));
    let payload = caught.expect_err("the refusal check passed");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Negative control of the device check: a destination that gives its device the refused
/// record (a chunk after a refused PRE_COPY-after-STOP_COPY record, fed before the reset) fails
/// it, while every check before it passes; the same stream and device without the leak pass.
#[test]
fn hostile_peer_negative_control_a_device_given_the_refused_chunk_fails_the_check() {
    let state = good_state();
    let half = state.len() / 2;
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &state[..half])
        .state(0, Phase::PreCopy, 1, &state[half..])
        .end();
    let expect = ["device 0: PRE_COPY data after STOP_COPY data"];
    let mut leaky = build_destination(false, Some(state[half..].to_vec()));
    let why = refusal_check_fails(&mut leaky, &s, At::Device(&state[..half]), &expect);
    assert!(
        why.contains(&format!(
            "refused data reached the device: it was given {} bytes, the {half} before",
            state.len()
        )),
        "{why}"
    );
    assert_eq!(*leaky.loaded.lock().unwrap(), state, "the leak was given");
    refuse_on(
        &mut build_destination(false, None),
        &s,
        At::Device(&state[..half]),
        &expect,
    );
}

/// Negative control of the RAM check: pages before a refusal after End are written (the
/// destination applies pages as they come; the VM never runs), and the check says so while
/// every check before it passes. Without the pages the same refusal passes.
#[test]
fn hostile_peer_negative_control_ram_written_before_the_refusal_fails_the_check() {
    let state = good_state();
    let expect = ["data after the End record"];
    let mut s = accepted();
    s.pages(0x2000, 1, 0x11)
        .round(1)
        .state(0, Phase::StopCopy, 0, &state)
        .end()
        .end();
    let mut dest = destination();
    let why = refusal_check_fails(&mut dest, &s, At::Device(&state), &expect);
    assert!(why.contains("guest RAM was written"), "{why}");
    assert_eq!(dest.ram.page(2), vec![0x11; PAGE_SIZE as usize]);
    let mut s = accepted();
    s.round(1).state(0, Phase::StopCopy, 0, &state).end().end();
    refuse(&s, At::Device(&state), &expect);
}

#[test]
fn hostile_peer_source_bad_stream_header_is_refused_at_byte_0() {
    let bad_magic = header_with(|h| h[..8].copy_from_slice(b"LMIGSTRX"));
    let mut bad_crc = header_with(|_| {});
    bad_crc[44] ^= 1;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad magic",
            bad_magic.to_vec(),
            "not a livemig stream (bad magic)",
        ),
        (
            "major 2",
            header_with(|h| h[8] = 2).to_vec(),
            "stream format 2.1 is not supported",
        ),
        (
            "unknown stream flags",
            header_with(|h| h[12] = 0x3).to_vec(),
            "unknown stream flags 0x2",
        ),
        (
            "header CRC",
            bad_crc.to_vec(),
            "stream header checksum mismatch",
        ),
        (
            "reserved",
            header_with(|h| h[40] = 1).to_vec(),
            "reserved field header reserved is not zero",
        ),
        (
            "producer not UTF-8",
            header_with(|h| h[16] = 0xff).to_vec(),
            "producer name is not NUL-padded UTF-8",
        ),
        (
            "truncated header",
            header_with(|_| {})[..20].to_vec(),
            "truncated: 28 more bytes needed",
        ),
        (
            "empty stream",
            Vec::new(),
            "truncated: 48 more bytes needed",
        ),
    ];
    for (case, bytes, why) in cases {
        let mut s = Script::new();
        s.bytes = bytes;
        // A valid compat section behind the bad header changes nothing.
        let text = refuse(
            &s,
            At::Compat,
            &["compat exchange: stream: at byte 0: ", why],
        );
        println!("{case}: {text}");
    }
}

#[test]
fn hostile_peer_source_malformed_compat_records_are_refused_before_any_device_moves() {
    let c = encode::compat(&matching()).unwrap();
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "body shorter than the fixed part",
            Box::new(|b| b.truncate(10)),
            "Compat body is 10 bytes, expected 32",
        ),
        (
            "id_len larger than the body",
            Box::new(|b| b[4..6].copy_from_slice(&200u16.to_le_bytes())),
            "Compat body is 62 bytes, expected 249",
        ),
        (
            "compat_len at its maximum",
            Box::new(|b| b[6..8].copy_from_slice(&u16::MAX.to_le_bytes())),
            "Compat body is 62 bytes, expected 65580",
        ),
        (
            "identity not UTF-8",
            Box::new(|b| b[32] = 0xff),
            "identity is not valid UTF-8",
        ),
        (
            "page_size_mask 0",
            Box::new(|b| b[8..16].fill(0)),
            "invalid page_size_mask: 0x0",
        ),
        (
            "dirty_caps reserved bits",
            Box::new(|b| b[16] = 0x80),
            "reserved field Compat dirty_caps is not zero",
        ),
        (
            "reserved bytes",
            Box::new(|b| b[30] = 1),
            "reserved field Compat reserved is not zero",
        ),
    ];
    for (case, edit, why) in cases {
        let mut body = c.to_vec();
        body.extend_from_slice(IDENTITY.as_bytes());
        body.extend_from_slice(LAYOUT);
        edit(&mut body);
        let mut s = Script::new();
        let at = s.here();
        s.rec(Tag::Compat, &body).round(0);
        let text = refuse(
            &s,
            At::Compat,
            &[&format!("compat exchange: stream: {at}"), why],
        );
        println!("{case}: {text}");
    }
}

#[test]
fn hostile_peer_source_malformed_records_of_every_other_type_are_refused_before_use() {
    let pages_head = |gpa: u64, ps: u32, count: u32| encode::pages(gpa, ps, count).to_vec();
    let with = |mut head: Vec<u8>, extra: usize| {
        head.resize(head.len() + extra, 0x11);
        head
    };
    let mut bitmap = encode::dirty_bitmap(0, 0, 4096).to_vec();
    bitmap.extend_from_slice(&[0; 8]);
    let cases: Vec<(&str, u16, u16, Vec<u8>, &str)> = vec![
        (
            "DeviceState shorter than its fixed part",
            Tag::DeviceState as u16,
            0,
            vec![0; 8],
            "DeviceState body is 8 bytes, expected 16",
        ),
        (
            "DeviceState phase 0",
            Tag::DeviceState as u16,
            0,
            vec![0; 20],
            "invalid phase: 0x0",
        ),
        (
            "DeviceState reserved",
            Tag::DeviceState as u16,
            0,
            {
                let mut b = encode::device_state(0, Phase::StopCopy, 0).to_vec();
                b[6] = 1;
                b
            },
            "reserved field DeviceState reserved is not zero",
        ),
        (
            "Pages shorter than its fixed part",
            Tag::Pages as u16,
            0,
            vec![0; 12],
            "Pages body is 12 bytes, expected 16",
        ),
        (
            "Pages payload truncated",
            Tag::Pages as u16,
            0,
            with(pages_head(0, 4096, 1), 100),
            "Pages body is 116 bytes, expected 4112",
        ),
        (
            "Pages payload too long",
            Tag::Pages as u16,
            0,
            with(pages_head(0, 4096, 1), 4097),
            "Pages body is 4113 bytes, expected 4112",
        ),
        (
            "Pages page size not a power of two",
            Tag::Pages as u16,
            0,
            with(pages_head(0, 3000, 1), 3000),
            "invalid page_size: 0xbb8",
        ),
        (
            "Pages page size too small",
            Tag::Pages as u16,
            0,
            with(pages_head(0, 256, 1), 256),
            "invalid page_size: 0x100",
        ),
        (
            "Pages gpa not aligned",
            Tag::Pages as u16,
            0,
            with(pages_head(0x10, 4096, 1), 4096),
            "invalid gpa (not page aligned): 0x10",
        ),
        (
            "Pages count 0",
            Tag::Pages as u16,
            0,
            pages_head(0, 4096, 0),
            "invalid count: 0x0",
        ),
        (
            "ZeroPages with a payload",
            Tag::ZeroPages as u16,
            0,
            with(pages_head(0, 4096, 1), 4),
            "ZeroPages body is 20 bytes, expected 16",
        ),
        (
            "DirtyBitmap span 0",
            Tag::DirtyBitmap as u16,
            RFLAG_OPTIONAL,
            bitmap,
            "invalid iova/span: 0x0",
        ),
        (
            "Round short",
            Tag::Round as u16,
            0,
            vec![0; 50],
            "Round body is 50 bytes, expected 56",
        ),
        (
            "Round reserved",
            Tag::Round as u16,
            0,
            {
                let mut b = encode::round(&Round::default()).to_vec();
                b[5] = 1;
                b
            },
            "reserved field Round reserved is not zero",
        ),
        (
            "End short",
            Tag::End as u16,
            0,
            vec![0; 40],
            "End body is 40 bytes, expected 48",
        ),
        (
            "Sync short",
            Tag::Sync as u16,
            0,
            vec![0; 4],
            "Sync body is 4 bytes, expected 8",
        ),
        (
            "Channel count 0",
            Tag::Channel as u16,
            0,
            vec![0; 32],
            "invalid Channel count: 0x0",
        ),
        ("tag 0", 0, 0, vec![0; 8], "record tag 0 is invalid"),
        (
            "unknown record flags",
            Tag::Pages as u16,
            0x8000,
            with(pages_head(0, 4096, 1), 4096),
            "unknown record flags 0x8000",
        ),
    ];
    for (case, tag, flags, body, why) in cases {
        let mut s = accepted();
        let at = s.here();
        s.record(tag, flags, &body).end();
        let text = refuse(&s, At::Receive, &[&format!("receive: stream: {at}"), why]);
        println!("{case}: {text}");
    }
}

#[test]
fn hostile_peer_source_checksums_and_sequence_numbers_are_enforced() {
    // A record whose CRC does not match its contents (one payload byte changed after the CRC).
    let mut s = accepted();
    let at = s.here();
    s.pages(0, 1, 0x11);
    let last = s.bytes.len() - 1;
    s.bytes[last] ^= 0x40;
    s.end();
    let text = refuse(&s, At::Receive, &[&at, "checksum mismatch: record says"]);
    println!("crc: {text}");

    // A lost record: the sequence number skips.
    let mut s = accepted();
    let at = s.here();
    s.frame(
        Tag::Round as u16,
        0,
        56,
        5,
        &encode::round(&Round::default()),
    );
    refuse(
        &s,
        At::Receive,
        &[&at, "record sequence number 5, expected 2"],
    );

    // A replayed record: the sequence number repeats.
    let mut s = accepted();
    let at = s.here();
    let body = encode::round(&Round::default());
    s.frame(Tag::Round as u16, 0, 56, 1, &body);
    refuse(
        &s,
        At::Receive,
        &[&at, "record sequence number 1, expected 2"],
    );

    // A non-zero CRC field in a stream without checksums.
    let mut s = Script::with_header(&StreamHeader::new(false, "hostile").encode());
    s.compat();
    // Script computes a CRC for every record: in a stream without checksums that is refused.
    refuse(
        &s,
        At::Compat,
        &[
            "at byte 48 (record 0)",
            "checksum field is 0x",
            "without checksums",
        ],
    );
}

#[test]
fn hostile_peer_source_truncation_anywhere_is_refused_and_the_device_never_runs() {
    let state = good_state();
    let full = valid(&state).bytes;
    // Where the Pages record (the first that writes RAM) ends: before it nothing is written.
    let mut p = accepted();
    let pages_at = p.offset() as usize;
    p.pages(0x2000, 2, 0x11);
    let pages_end = p.offset() as usize;
    let mut cuts: Vec<usize> = (0..pages_at + 24).collect();
    cuts.extend((pages_at + 24..full.len()).step_by(61));
    cuts.extend(full.len() - 64..full.len());
    for cut in cuts {
        let mut dest = destination();
        let (r, replies) = dest.receive(&full[..cut]);
        let e = r.expect_err("a truncated stream is refused");
        let text = e.chain();
        assert!(
            text.contains("truncated:") || text.contains("stream ends without an End record"),
            "cut {cut}: {text}"
        );
        assert!(text.contains("at byte "), "cut {cut}: {text}");
        assert_eq!(
            replies.last(),
            Some(&Message::Failed(text.clone())),
            "cut {cut}"
        );
        // The device never validated nor ran the state.
        assert!(
            !dest.sim.arcs().contains(&(S::Resuming, S::Stop)),
            "cut {cut}: {text}"
        );
        assert_eq!(dest.sim.migration_state().unwrap(), S::Running, "cut {cut}");
        if cut < pages_end {
            assert!(dest.ram_untouched(), "cut {cut}: RAM written: {text}");
        }
        assert!(!replies.iter().any(|m| matches!(m, Message::Resumed { .. })));
    }
}

#[test]
fn hostile_peer_source_out_of_order_records_are_refused() {
    let state = good_state();

    // Pages before the compat section ended: RAM is never written before the verdict.
    let mut s = Script::new();
    s.compat();
    let at = s.here();
    s.pages(0, 1, 0x11).round(0).end();
    refuse(
        &s,
        At::Compat,
        &[&format!(
            "compat exchange: protocol: {at}: Pages before the end of the compat section"
        )],
    );
    // Pages before any Compat.
    let mut s = Script::new();
    s.pages(0, 1, 0x11).compat().round(0);
    refuse(
        &s,
        At::Compat,
        &[
            "compat exchange: protocol: at byte 48 (record 0): Pages before the end of the compat \
           section",
        ],
    );
    // Device state before Round 0.
    let mut s = Script::new();
    s.compat();
    let at = s.here();
    s.state(0, Phase::StopCopy, 0, &state).round(0).end();
    refuse(
        &s,
        At::Compat,
        &[&format!(
            "{at}: DeviceState before the end of the compat section"
        )],
    );
    // Device state before its Compat.
    let mut s = Script::new();
    let at = s.here();
    s.state(0, Phase::StopCopy, 0, &state).compat().round(0);
    refuse(&s, At::Compat, &[&at, "device 0 has no Compat record"]);
    // Compat after the compat section.
    let mut s = accepted();
    let at = s.here();
    s.compat_of(&Compat {
        device: 1,
        ..matching()
    });
    refuse(
        &s,
        At::Receive,
        &[
            &at,
            "Compat record after other records: compatibility data must come first",
        ],
    );
    // Devices announced out of order.
    let mut s = Script::new();
    s.compat_of(&Compat {
        device: 1,
        ..matching()
    })
    .round(0);
    refuse(
        &s,
        At::Compat,
        &[
            "compat exchange: protocol: at byte 48 (record 0): Compat for device 1 where device 0 \
           was expected",
        ],
    );
    // End in the compat section.
    let mut s = Script::new();
    s.compat();
    let at = s.here();
    s.end();
    refuse(
        &s,
        At::Compat,
        &[&format!(
            "compat exchange: protocol: {at}: End before the end of the compat section"
        )],
    );
    // A compat section that never ends.
    let mut s = Script::new();
    s.compat();
    refuse(
        &s,
        At::Compat,
        &[
            "compat exchange: stream: ",
            "stream ends without an End record",
        ],
    );
    // Rounds out of order.
    let mut s = accepted();
    let at = s.here();
    s.round(2).state(0, Phase::StopCopy, 0, &state).end();
    refuse(
        &s,
        At::Receive,
        &[&format!(
            "receive: protocol: {at}: Round 2 where round 1 was expected"
        )],
    );
    // End twice: nothing may follow End, and the device never runs.
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &state).end();
    let at = s.offset();
    s.end();
    let text = refuse(
        &s,
        At::Device(&state),
        &[&format!(
            "receive: stream: at byte {at}: data after the End record"
        )],
    );
    println!("End twice: {text}");
    // A record after End.
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &state)
        .end()
        .pages(0, 1, 0x11);
    refuse(&s, At::Device(&state), &["data after the End record"]);
    // A few stray bytes after End.
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &state).end().raw(&[0]);
    refuse(&s, At::Device(&state), &["data after the End record"]);
    // PRE_COPY state after STOP_COPY state.
    let mut s = accepted();
    let half = state.len() / 2;
    s.state(0, Phase::StopCopy, 0, &state[..half]);
    let at = s.here();
    s.state(0, Phase::PreCopy, 1, &state[half..]).end();
    refuse(
        &s,
        At::Device(&state[..half]),
        &[&at, "device 0: PRE_COPY data after STOP_COPY data"],
    );
    // A Sync (a page channel's record) on the one connection.
    let mut s = accepted();
    let at = s.here();
    s.rec(Tag::Sync, &encode::sync(&livemig_stream::Sync { round: 1 }))
        .end();
    refuse(
        &s,
        At::Receive,
        &[&format!("receive: protocol: {at}: unexpected Sync record")],
    );
    // A Channel record anywhere but first.
    let mut s = Script::new();
    let c = Channel {
        index: 0,
        count: 2,
        token: [7; 16],
    };
    s.compat();
    let at = s.here();
    s.rec(Tag::Channel, &encode::channel(&c)).round(0);
    refuse(
        &s,
        At::Compat,
        &[
            &at,
            "Channel record after other records: it must be the stream's first record",
        ],
    );
    // A multi-channel source on a destination taking one connection.
    let mut s = Script::new();
    s.rec(Tag::Channel, &encode::channel(&c)).compat().round(0);
    refuse(
        &s,
        At::Compat,
        &["the source uses 2 page channels; this destination takes one connection"],
    );
    // End without the device's state: the device never leaves RESUMING for STOP.
    let mut s = accepted();
    s.round(1).end();
    refuse(
        &s,
        At::Receive,
        &["resume: protocol: no STOP_COPY state for device 0"],
    );
}

#[test]
fn hostile_peer_source_duplicated_records_are_refused() {
    let state = good_state();
    // The same device announced twice.
    let mut s = Script::new();
    s.compat();
    let at = s.here();
    s.compat().round(0);
    refuse(&s, At::Compat, &[&at, "device 0 announced twice"]);
    // A device-state chunk repeated (same chunk number): refused before the device sees it.
    let mut s = accepted();
    let half = state.len() / 2;
    s.state(0, Phase::StopCopy, 0, &state[..half]);
    let at = s.here();
    s.state(0, Phase::StopCopy, 0, &state[..half]).end();
    // Only the first chunk reached the device.
    refuse(
        &s,
        At::Device(&state[..half]),
        &[&at, "device 0: chunk 0, expected 1"],
    );
    // The whole STOP_COPY state twice, as chunks 0 and 1 (the stream format allows any
    // segmentation): the device's own validation refuses it when leaving RESUMING.
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &state)
        .state(0, Phase::StopCopy, 1, &state)
        .end();
    refuse(
        &s,
        At::Device(&[state.as_slice(), &state].concat()),
        &["resume: device 0 (sim): ", "bytes after the end record"],
    );
    // Round 0 (the end of the compat section) again.
    let mut s = accepted();
    let at = s.here();
    s.round(0).state(0, Phase::StopCopy, 0, &state).end();
    refuse(
        &s,
        At::Receive,
        &[&format!(
            "receive: protocol: {at}: Round 0 where round 1 was expected"
        )],
    );
    // A round repeated.
    let mut s = accepted();
    s.round(1);
    let at = s.here();
    s.round(1).state(0, Phase::StopCopy, 0, &state).end();
    refuse(
        &s,
        At::Receive,
        &[&format!(
            "receive: protocol: {at}: Round 1 where round 2 was expected"
        )],
    );
}

#[test]
fn hostile_peer_source_overflowing_lengths_and_counts_are_refused_before_allocating() {
    let max = Limits::default().max_record;
    for (length, why) in [
        (
            u32::MAX,
            format!("record body of 4294967295 bytes exceeds the limit of {max}"),
        ),
        (
            max as u32 + 1,
            format!(
                "record body of {} bytes exceeds the limit of {max}",
                max + 1
            ),
        ),
    ] {
        // The header claims the length; the body is not there (nothing is allocated for it).
        let mut s = accepted();
        let at = s.here();
        let seq = s.seq;
        s.frame(Tag::Pages as u16, 0, length, seq, &[]);
        let t = std::time::Instant::now();
        refuse(&s, At::Receive, &[&at, &why]);
        assert!(t.elapsed().as_secs() < 2, "refused before reading a body");
    }
    // An unknown optional record is bounded too.
    let mut s = accepted();
    let seq = s.seq;
    s.frame(77, RFLAG_OPTIONAL, u32::MAX, seq, &[]);
    refuse(
        &s,
        At::Receive,
        &["record body of 4294967295 bytes exceeds"],
    );

    // count * page_size far beyond the body: (2^32 - 1) pages of 1 GiB.
    let mut s = accepted();
    let at = s.here();
    s.rec(Tag::Pages, &encode::pages(0, 1 << 30, u32::MAX));
    let claimed = 16 + u64::from(u32::MAX) * (1 << 30);
    refuse(
        &s,
        At::Receive,
        &[&at, &format!("Pages body is 16 bytes, expected {claimed}")],
    );
    // gpa + count * page_size overflowing u64.
    for tag in [Tag::Pages, Tag::ZeroPages] {
        let mut s = accepted();
        s.rec(tag, &encode::pages(u64::MAX - 4095, 4096, 2));
        refuse(
            &s,
            At::Receive,
            &["invalid gpa + count * page_size (overflows): 0xfffffffffffff000"],
        );
    }
    // A zero range of 2^62 bytes that does not overflow: refused as outside RAM, nothing zeroed.
    let mut s = accepted();
    s.rec(Tag::ZeroPages, &encode::pages(0, 1 << 30, u32::MAX))
        .end();
    refuse(
        &s,
        At::Receive,
        &[&format!(
            "receive: protocol: {}: ZeroPages at 0x0 (+0x3fffffffc0000000 bytes) outside guest \
             RAM (0x0..0x10000)",
            accepted().here()
        )],
    );
    // A dirty bitmap whose span overflows.
    let mut s = accepted();
    let mut b = encode::dirty_bitmap(8192, u64::MAX - 4095, 4096).to_vec();
    b.extend_from_slice(&[0; 8]);
    s.record(Tag::DirtyBitmap as u16, RFLAG_OPTIONAL, &b);
    refuse(&s, At::Receive, &["invalid iova/span: 0xfffffffffffff000"]);
    // End totals at their maximum: the device was given the whole state, then the End refused.
    let state = good_state();
    for (field, edit) in [
        (
            "records",
            Box::new(|e: &mut End| e.records = u32::MAX) as Box<dyn Fn(&mut End)>,
        ),
        (
            "stream_bytes",
            Box::new(|e: &mut End| e.stream_bytes = u64::MAX),
        ),
        ("pages", Box::new(|e: &mut End| e.pages = u64::MAX)),
        (
            "zero_pages",
            Box::new(|e: &mut End| e.zero_pages = u64::MAX),
        ),
        (
            "device_bytes",
            Box::new(|e: &mut End| e.device_bytes = u64::MAX),
        ),
    ] {
        let mut s = accepted();
        s.state(0, Phase::StopCopy, 0, &state).end_with(edit);
        let text = refuse(
            &s,
            At::Device(&state),
            &[&format!(
                "End says {field} = {}",
                if field == "records" {
                    u64::from(u32::MAX)
                } else {
                    u64::MAX
                }
            )],
        );
        assert!(text.contains("but the stream has"), "{text}");
    }
    // The digest wrong.
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &state)
        .end_with(|e| e.digest ^= 1);
    refuse(&s, At::Device(&state), &["whole-stream digest mismatch"]);
}

#[test]
fn hostile_peer_source_unknown_tags_mandatory_refused_optional_skipped() {
    let state = good_state();
    // Mandatory, in the compat section and later.
    let mut s = Script::new();
    s.compat();
    let at = s.here();
    s.record(77, 0, b"whatever").round(0);
    refuse(
        &s,
        At::Compat,
        &[&at, "unknown record type 77, not marked optional"],
    );
    let mut s = accepted();
    let at = s.here();
    s.record(0xffff, 0, b"").end();
    refuse(
        &s,
        At::Receive,
        &[&at, "unknown record type 65535, not marked optional"],
    );
    // Optional with a bad CRC: checked before it is skipped.
    let mut s = accepted();
    let at = s.here();
    s.record(77, RFLAG_OPTIONAL, b"whatever");
    let last = s.bytes.len() - 1;
    s.bytes[last] ^= 1;
    refuse(&s, At::Receive, &[&at, "checksum mismatch"]);

    // Optional ones are skipped wherever they are (the format's rule), and the migration
    // completes.
    let mut s = Script::new();
    s.record(77, RFLAG_OPTIONAL, b"from a newer source")
        .compat()
        .record(78, RFLAG_OPTIONAL, b"")
        .round(0)
        .record(79, RFLAG_OPTIONAL, &[0; 4096])
        .pages(0, 1, 0x22)
        .round(1)
        .state(0, Phase::StopCopy, 0, &state)
        .record(80, RFLAG_OPTIONAL, b"x")
        .end();
    // Compat after an optional record counts as after other records.
    let mut dest = destination();
    let (r, _) = dest.receive(&s.bytes);
    let text = r.expect_err("Compat must come first").chain();
    assert!(text.contains("Compat record after other records"), "{text}");
    let mut s2 = Script::new();
    s2.compat()
        .record(78, RFLAG_OPTIONAL, b"")
        .round(0)
        .record(79, RFLAG_OPTIONAL, &[0; 4096])
        .pages(0, 1, 0x22)
        .round(1)
        .state(0, Phase::StopCopy, 0, &state)
        .record(80, RFLAG_OPTIONAL, b"x")
        .end();
    let mut dest = destination();
    let (r, replies) = dest.receive(&s2.bytes);
    let r = r.unwrap_or_else(|e| panic!("optional records are skipped: {}", e.chain()));
    assert_eq!((r.pages, r.rounds), (1, 1));
    assert_eq!(dest.ram.page(0), vec![0x22; PAGE_SIZE as usize]);
    assert!(matches!(replies.last(), Some(Message::Resumed { .. })));
}

#[test]
fn hostile_peer_source_compat_that_lies_about_the_device_is_refused_before_anything_moves() {
    let cases: Vec<(&str, Vec<Compat<'static>>, &str)> = vec![
        (
            "another device kind (vendor:device, driver)",
            vec![Compat {
                identity: "19e5:a256 hisi_acc_vfio_pci",
                ..matching()
            }],
            "device 0: identity \"19e5:a256 hisi_acc_vfio_pci\" on the source, \"sim 5157:0001\" \
             on the destination",
        ),
        (
            "another BAR layout",
            vec![Compat {
                compat: b"bar0 0x2000 mem64",
                ..matching()
            }],
            "device 0 (sim 5157:0001): bar0 0x2000 mem64 on the source; bar0 0x1000 mem32 on \
             the destination",
        ),
        (
            "a binary compat block",
            vec![Compat {
                compat: &[0xde, 0xad],
                ..matching()
            }],
            "compatibility block differs (source dead, destination \"bar0 0x1000 mem32\")",
        ),
        (
            "a migration feature the device lacks",
            vec![Compat {
                migration_flags: (FLAGS | MigrationFlags::P2P).bits() as u32,
                ..matching()
            }],
            "device 0 (sim 5157:0001): the source uses P2P which the destination device lacks",
        ),
        (
            "IOMMU pages the destination cannot map",
            vec![Compat {
                page_size_mask: 1 << 21,
                ..matching()
            }],
            "the destination IOMMU cannot map 2048 KiB pages the source uses",
        ),
        (
            "more devices",
            vec![
                matching(),
                Compat {
                    device: 1,
                    ..matching()
                },
            ],
            "the source has 2 device(s), the destination 1",
        ),
        (
            "no device",
            vec![],
            "the source has 0 device(s), the destination 1",
        ),
    ];
    for (case, compats, why) in cases {
        let mut s = Script::new();
        for c in &compats {
            s.compat_of(c);
        }
        s.round(0).pages(0, 1, 0x11).end();
        let text = refuse(
            &s,
            At::Compat,
            &["compat exchange: the destination refused: ", why],
        );
        println!("{case}: {text}");
    }
}

#[test]
fn hostile_peer_source_device_state_for_a_device_not_there_or_of_another_kind() {
    // An index no Compat announced.
    for device in [1, 7, u32::MAX] {
        let mut s = accepted();
        let at = s.here();
        s.state(device, Phase::StopCopy, 0, &good_state()).end();
        refuse(
            &s,
            At::Receive,
            &[&at, &format!("device {device} has no Compat record")],
        );
    }
    // The compat block matched, but the state is another device's (the compat lied): the
    // device refuses it when leaving RESUMING, and never runs.
    let other = device_state(sim_cfg(99, 0x5157_0002, 1024));
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &other).end();
    refuse(
        &s,
        At::Device(&other),
        &[
            "resume: device 0 (sim): ",
            "stream is for device id 0x51570002, this device is 0x51570001",
        ],
    );
    // The same kind with another state layout.
    let other = device_state(sim_cfg(99, DEVICE_ID, 2048));
    let mut s = accepted();
    s.state(0, Phase::StopCopy, 0, &other).end();
    refuse(
        &s,
        At::Device(&other),
        &["stream geometry 2048/256 differs from device 1024/256"],
    );
}

#[test]
fn hostile_peer_source_pages_outside_guest_ram_are_refused_before_any_write() {
    let ram = "outside guest RAM (0x0..0x10000)";
    let holey = "outside guest RAM (0x0..0x8000, 0xc000..0x10000)";
    let cases: Vec<(&str, bool, Script, String)> = vec![
        (
            "past the end",
            false,
            {
                let mut s = accepted();
                s.pages(RAM, 1, 0x11);
                s
            },
            format!("Pages at 0x10000 (+0x1000 bytes) {ram}"),
        ),
        (
            "straddling the end",
            false,
            {
                let mut s = accepted();
                s.pages(RAM - 4096, 2, 0x11);
                s
            },
            format!("Pages at 0xf000 (+0x2000 bytes) {ram}"),
        ),
        (
            "far past the end",
            false,
            {
                let mut s = accepted();
                s.pages(u64::MAX - 4095, 1, 0x11);
                s
            },
            format!("Pages at 0xfffffffffffff000 (+0x1000 bytes) {ram}"),
        ),
        (
            "zero pages past the end",
            false,
            {
                let mut s = accepted();
                s.zero_pages(RAM, 16);
                s
            },
            format!("ZeroPages at 0x10000 (+0x10000 bytes) {ram}"),
        ),
        (
            "in the hole",
            true,
            {
                let mut s = accepted();
                s.pages(HOLE.0, 1, 0x11);
                s
            },
            format!("Pages at 0x8000 (+0x1000 bytes) {holey}"),
        ),
        (
            "across the hole",
            true,
            {
                let mut s = accepted();
                s.pages(HOLE.0 - 4096, 6, 0x11);
                s
            },
            format!("Pages at 0x7000 (+0x6000 bytes) {holey}"),
        ),
        (
            "zero pages in the hole",
            true,
            {
                let mut s = accepted();
                s.zero_pages(HOLE.0 + 4096, 1);
                s
            },
            format!("ZeroPages at 0x9000 (+0x1000 bytes) {holey}"),
        ),
    ];
    for (case, hole, mut s, why) in cases {
        s.end();
        let mut dest = if hole {
            destination_with_hole()
        } else {
            destination()
        };
        let at = accepted().here();
        let text = refuse_on(
            &mut dest,
            &s,
            At::Receive,
            &[&format!("receive: protocol: {at}: {why}")],
        );
        println!("{case}: {text}");
    }
    // gpa + length overflowing u64 is refused by the stream reader (see the overflow test);
    // RAM on both sides of the hole is accepted (the control).
    let mut s = accepted();
    s.pages(HOLE.0 - 4096, 1, 0x11)
        .pages(HOLE.1, 1, 0x12)
        .state(0, Phase::StopCopy, 0, &good_state())
        .end();
    let mut dest = destination_with_hole();
    let (r, _) = dest.receive(&s.bytes);
    r.unwrap_or_else(|e| panic!("pages next to the hole are RAM: {}", e.chain()));
    assert_eq!(dest.ram.page(7)[0], 0x11);
    assert_eq!(dest.ram.page(12)[0], 0x12);
}

#[test]
fn hostile_peer_source_device_reported_sizes_that_overflow() {
    // The device's own stream (the sim's: a 24-byte header, then chunks `tag offset len bytes
    // crc`) with sizes near their maximum: the device refuses them on leaving RESUMING.
    let state = good_state();
    let mut huge_len = state.clone();
    huge_len[24 + 5..24 + 9].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut huge_off = state.clone();
    huge_off[24 + 1..24 + 5].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
    let mut huge_size = state.clone();
    huge_size[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    for (case, data, why) in [
        (
            "chunk length 2^32-1",
            huge_len,
            "chunk at byte 24 runs past the stream end",
        ),
        (
            "chunk offset 2^32-2",
            huge_off,
            "chunk at byte 24 writes outside the device state",
        ),
        (
            "state size 2^32-1",
            huge_size,
            "stream geometry 4294967295/256 differs",
        ),
    ] {
        let mut s = accepted();
        s.state(0, Phase::StopCopy, 0, &data).end();
        let text = refuse(&s, At::Device(&data), &["resume: device 0 (sim): ", why]);
        println!("{case}: {text}");
    }
    // Round statistics at their maximum are statistics: the destination does not compute
    // with them (no overflow), acknowledges the round with its own counts, and goes on.
    let mut s = accepted();
    s.rec(
        Tag::Round,
        &encode::round(&Round {
            round: 1,
            pages: u64::MAX,
            zero_pages: u64::MAX,
            dirty_pages: u64::MAX,
            device_bytes: u64::MAX,
            stream_bytes: u64::MAX,
            elapsed_us: u64::MAX,
        }),
    )
    .state(0, Phase::StopCopy, 0, &state)
    .end();
    let mut dest = destination();
    let (r, replies) = dest.receive(&s.bytes);
    r.unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(
        replies[2],
        Message::RoundAck {
            round: 1,
            device_load_us: 0,
            device_bytes: 0
        }
    );
}

#[test]
fn hostile_peer_source_page_channel_skips_optional_records_and_places_its_refusals() {
    use livemig::engine::x_receive_page_channel;
    let token = [3; 16];
    let opened = || {
        let mut s = Script::new();
        s.rec(
            Tag::Channel,
            &encode::channel(&Channel {
                index: 1,
                count: 1,
                token,
            }),
        );
        s
    };
    let sync = |round| encode::sync(&livemig_stream::Sync { round });
    // The control: an optional record of an unknown type is skipped and the pages land.
    let mut s = opened();
    s.record(77, RFLAG_OPTIONAL, b"from a newer source")
        .pages(0x1000, 1, 0x33)
        .rec(Tag::Sync, &sync(1))
        .end();
    let ram = Ram::filled(RAM as usize, FILL);
    x_receive_page_channel(s.bytes.clone(), token, &*ram)
        .unwrap_or_else(|e| panic!("optional records are skipped: {}", e.chain()));
    assert_eq!(ram.page(1), vec![0x33; PAGE_SIZE as usize]);

    let mut past_end = opened();
    let at1 = past_end.here();
    past_end.pages(RAM, 1, 0x33).end();
    let mut bad_sync = opened();
    let at2 = bad_sync.here();
    bad_sync.rec(Tag::Sync, &sync(2)).end();
    let mut compat = opened();
    let at3 = compat.here();
    compat.compat().end();
    let mut mandatory = opened();
    let at4 = mandatory.here();
    mandatory.record(77, 0, b"").end();
    for (case, s, want) in [
        (
            "pages past the end of RAM",
            past_end,
            format!(
                "page channel 1: receive: protocol: {at1}: Pages at 0x10000 (+0x1000 bytes) \
                 outside guest RAM (0x0..0x10000)"
            ),
        ),
        (
            "a round skipped",
            bad_sync,
            format!(
                "page channel 1: receive: protocol: {at2}: Sync for round 2 where round 1 ends"
            ),
        ),
        (
            "a Compat record",
            compat,
            format!(
                "page channel 1: receive: protocol: {at3}: unexpected Compat record on a page channel"
            ),
        ),
        (
            "an unknown mandatory record",
            mandatory,
            format!("page channel 1: receive: stream: {at4}: unknown record type 77"),
        ),
    ] {
        let ram = Ram::filled(RAM as usize, FILL);
        let e = x_receive_page_channel(s.bytes, token, &*ram).expect_err(case);
        let text = e.chain();
        assert!(text.contains(&want), "{case}: expected {want:?} in: {text}");
        assert!(
            ram.0.lock().unwrap().iter().all(|&b| b == FILL),
            "{case}: RAM written"
        );
        println!("{case}: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// B. Scripted destination against the real Source

/// The source's data direction, readable after the migration.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DataSink for Sink {
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Src {
    s: Source,
    sim: SimDevice,
    sink: Sink,
}

/// The scripted destination's return path: its script, then the end of the connection or
/// silence. A silent peer would leave a read blocked for good; here the read fails at once and
/// is recorded, so a test sees whether the source waited on a peer it had already refused.
struct Peer {
    script: Cursor<Vec<u8>>,
    closes: bool,
    waited: Arc<AtomicBool>,
}

impl io::Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.script.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.closes {
            self.waited.store(true, Ordering::SeqCst);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the scripted destination says nothing more (a real one would leave this read \
                 blocked)",
            ));
        }
        Ok(n)
    }
}

/// A scripted return path: its bytes, and whether the connection closes after them.
type Back = (Vec<u8>, bool);

/// A return path that ends after `script`.
fn closes(script: Vec<u8>) -> Back {
    (script, true)
}

/// A return path that goes silent after `script`.
fn stalls(script: Vec<u8>) -> Back {
    (script, false)
}

fn source() -> Src {
    let sim = SimDevice::new(sim_cfg(7, DEVICE_ID, 1024));
    let platform = SourcePlatform {
        memory: Ram::filled(RAM as usize, 0x3C),
        devices: vec![SourceDevice {
            dev: Box::new(adapter(sim.clone())),
            iommu_dirty: Err("no DMA".into()),
            dma_log: None,
            does_dma: false,
        }],
        iommu: None,
        cpu: Box::new(Quiet),
        vcpus: Box::new(NoVcpus),
        page_size_mask: 0x1000,
        viommu: None,
        dma_endpoints: Vec::new(),
    };
    let cfg = SourceConfig {
        max_rounds: 3,
        ..SourceConfig::default()
    };
    Src {
        s: Source::new(platform, cfg),
        sim,
        sink: Sink::default(),
    }
}

/// Return-path bytes: `msgs` framed, then `raw` as it is.
fn script(msgs: &[Message], raw: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for m in msgs {
        m.write_to(&mut b).unwrap();
    }
    b.extend_from_slice(raw);
    b
}

/// A frame with any type and payload (the length field says the payload's length).
fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = b"LMRP".to_vec();
    b.push(ty);
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn ack(round: u32) -> Message {
    Message::RoundAck {
        round,
        device_load_us: 0,
        device_bytes: 0,
    }
}

const CAPS: Message = Message::Capabilities(CAP_ROUND_ACKS);

impl Src {
    /// Migrates against `back` (a script, and whether the connection then closes); returns
    /// the outcome and whether the source read on after the script (waited on silence).
    fn run(&mut self, back: Back) -> (livemig::Result<MigrationReport>, bool) {
        let waited = Arc::new(AtomicBool::new(false));
        let peer = Peer {
            script: Cursor::new(back.0),
            closes: back.1,
            waited: Arc::clone(&waited),
        };
        let r = self.s.migrate(self.sink.clone(), peer);
        (r, waited.load(Ordering::SeqCst))
    }

    /// The records the source wrote, by name, up to the stream's end or first error.
    fn sent(&self) -> Vec<&'static str> {
        let bytes = self.sink.0.lock().unwrap().clone();
        let mut r = SliceReader::new(&bytes, Limits::default()).expect("a valid header");
        let mut names = Vec::new();
        while let Ok(Some(rec)) = r.next() {
            names.push(rec.name());
        }
        names
    }

    fn device_state(&self) -> S {
        self.sim.migration_state().unwrap()
    }
}

/// Runs the source against `back`; checks the refusal names `expect`, that the source did not
/// wait on the peer after refusing it, and that it runs again with its device in RUNNING.
/// Returns the error text and the source.
#[track_caller]
fn source_refuses(back: Back, expect: &[&str]) -> (String, Src) {
    let mut src = source();
    let (r, waited) = src.run(back);
    let e = match r {
        Ok(r) => panic!("the source accepted a lying destination ({expect:?}): {r:?}"),
        Err(e) => e,
    };
    let text = e.chain();
    for want in expect {
        assert!(text.contains(want), "expected {want:?} in: {text}");
    }
    assert!(
        !waited,
        "the source waited on a destination it had refused (a silent one would hold it): {text}"
    );
    assert!(
        !matches!(e, livemig::Error::RecoveryFailed { .. }),
        "{text}"
    );
    assert!(!src.s.is_stopped(), "the source must run again: {text}");
    assert_eq!(src.device_state(), S::Running, "{text}");
    assert!(!src.sent().contains(&"End"), "{text}");
    (text, src)
}

#[test]
fn hostile_peer_negative_control_a_valid_scripted_destination_lets_the_source_complete() {
    let resumed = Message::Resumed {
        load_us: 10,
        run_us: 5,
    };
    for (case, back) in [
        (
            "no acknowledgements",
            stalls(script(&[Message::CompatOk, resumed.clone()], &[])),
        ),
        (
            "round acknowledgements",
            stalls(script(
                &[CAPS, Message::CompatOk, ack(1), ack(2), ack(3), resumed],
                &[],
            )),
        ),
    ] {
        let mut src = source();
        let (r, waited) = src.run(back);
        let r = r.unwrap_or_else(|e| panic!("{case}: {}", e.chain()));
        assert!(!waited, "{case}");
        assert!(src.s.is_stopped(), "{case}: the VM runs at the destination");
        assert_eq!(src.device_state(), S::Stop, "{case}");
        assert_eq!(r.downtime_phases.destination_load_us, 10, "{case}");
        // The source wrote a whole valid stream.
        let bytes = src.sink.0.lock().unwrap().clone();
        SliceReader::new(&bytes, Limits::default())
            .and_then(|mut r| r.validate_all())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(src.sent().last(), Some(&"End"), "{case}");
    }
    // And the refusal check itself fails on a valid destination: the suite can fail.
    let caught = std::panic::catch_unwind(|| {
        source_refuses(
            stalls(script(
                &[
                    Message::CompatOk,
                    Message::Resumed {
                        load_us: 0,
                        run_us: 0,
                    },
                ],
                &[],
            )),
            &["anything"],
        );
    });
    assert!(
        caught.is_err(),
        "source_refuses() passed a valid destination"
    );
}

#[test]
fn hostile_peer_destination_lies_in_the_compat_answer_and_nothing_moves() {
    let mut oversized = b"LMRP\x02".to_vec();
    oversized.extend_from_slice(&u32::MAX.to_le_bytes());
    let ok = script(&[Message::CompatOk], &[]);
    let cases: Vec<(&str, Back, Vec<&str>)> = vec![
        (
            "garbage magic",
            stalls(b"HTTP/1.1 200 OK\r\n".to_vec()),
            vec![
                "compat exchange: link return path: ",
                "bad magic [48, 54, 54, 50]",
            ],
        ),
        (
            "unknown type",
            stalls(frame(9, b"")),
            vec![
                "compat exchange: link return path: ",
                "unknown message type 9",
            ],
        ),
        (
            "oversized length",
            stalls(oversized),
            vec!["message type 2 claims 4294967295 bytes (limit 65536)"],
        ),
        (
            "CompatOk with a payload",
            stalls(frame(1, b"x")),
            vec!["message type 1 with a 1-byte payload"],
        ),
        (
            "Capabilities twice",
            stalls(script(&[CAPS, CAPS, Message::CompatOk], &[])),
            vec!["compat exchange: protocol: expected the compat answer, got Capabilities(1)"],
        ),
        (
            "Resumed before anything was sent",
            stalls(script(
                &[Message::Resumed {
                    load_us: 0,
                    run_us: 0,
                }],
                &[],
            )),
            vec!["compat exchange: protocol: expected the compat answer, got Resumed"],
        ),
        (
            "a round acknowledged before the compat answer",
            stalls(script(&[CAPS, ack(1), Message::CompatOk], &[])),
            vec!["compat exchange: protocol: expected the compat answer, got RoundAck"],
        ),
        (
            "Failed with invalid UTF-8",
            stalls(frame(4, b"\xff\xfe device on fire")),
            vec![
                "compat exchange: link return path: ",
                "message type 4 is not UTF-8",
            ],
        ),
        (
            "CompatRefused with invalid UTF-8",
            stalls(frame(2, b"\xc3\x28")),
            vec!["message type 2 is not UTF-8"],
        ),
        (
            "EOF before any answer",
            closes(Vec::new()),
            vec!["compat exchange: link return path: ", "closed before"],
        ),
        (
            "EOF inside a frame header",
            closes(ok[..5].to_vec()),
            vec![
                "compat exchange: link return path: ",
                "inside a frame header (5 of 9 bytes)",
            ],
        ),
        (
            "EOF inside a payload",
            closes(frame(4, b"the reason is")[..14].to_vec()),
            vec!["inside a type-4 message (5 of 13 payload bytes)"],
        ),
    ];
    for (case, back, expect) in cases {
        let (text, src) = source_refuses(back, &expect);
        // Nothing moved: the device never left RUNNING, and the source sent its descriptors
        // and nothing else.
        assert!(src.sim.arcs().is_empty(), "{case}: {:?}", src.sim.arcs());
        assert_eq!(src.sent(), ["Compat", "Round"], "{case}");
        println!("{case}: {text}");
    }
}

#[test]
fn hostile_peer_destination_lies_during_pre_copy_and_the_source_runs_again() {
    let huge = Message::RoundAck {
        round: 1,
        device_load_us: 0,
        device_bytes: u64::MAX,
    };
    let slow = Message::RoundAck {
        round: 1,
        device_load_us: u64::MAX,
        device_bytes: 1,
    };
    let resumed = Message::Resumed {
        load_us: 0,
        run_us: 0,
    };
    let pre = [CAPS, Message::CompatOk];
    let with = |tail: &[Message], raw: &[u8]| {
        let mut m = pre.to_vec();
        m.extend_from_slice(tail);
        stalls(script(&m, raw))
    };
    let cases: Vec<(&str, Back, Vec<&str>)> = vec![
        (
            "Capabilities after CompatOk",
            with(&[CAPS], &[]),
            vec![
                "pre-copy round 1: protocol: expected a round acknowledgement, got Capabilities(1)",
            ],
        ),
        (
            "CompatOk twice",
            with(&[Message::CompatOk], &[]),
            vec!["pre-copy round 1: protocol: expected a round acknowledgement, got CompatOk"],
        ),
        (
            "Resumed before End",
            with(&[resumed], &[]),
            vec!["pre-copy round 1: protocol: expected a round acknowledgement, got Resumed"],
        ),
        (
            "a round never sent acknowledged",
            with(&[ack(99)], &[]),
            vec![
                "pre-copy round 1: protocol: the destination acknowledged round 99 after round 0 \
                 (waiting for round 1)",
            ],
        ),
        (
            "round 0 acknowledged",
            with(&[ack(0)], &[]),
            vec!["the destination acknowledged round 0 after round 0"],
        ),
        (
            "more device bytes loaded than sent",
            with(&[huge], &[]),
            vec![
                "pre-copy round 1: protocol: the destination says its devices loaded \
                 18446744073709551615 bytes in round 1; the source sent",
            ],
        ),
        (
            "device load time longer than the migration",
            with(&[slow], &[]),
            vec![
                "pre-copy round 1: protocol: the destination says its devices spent \
                 18446744073709551615 us loading round 1",
            ],
        ),
        (
            "Failed with invalid UTF-8",
            with(&[], &frame(4, b"\xff")),
            vec![
                "pre-copy round 1: link return path: ",
                "message type 4 is not UTF-8",
            ],
        ),
        (
            "garbage",
            with(&[], b"\0\0\0\0\0\0\0\0\0"),
            vec![
                "pre-copy round 1: link return path: ",
                "bad magic [00, 00, 00, 00]",
            ],
        ),
        (
            "EOF inside a frame",
            closes(with(&[], &script(&[ack(1)], &[])[..20]).0),
            vec![
                "pre-copy round 1: link return path: ",
                "inside a type-6 message (11 of 24",
            ],
        ),
        (
            "EOF",
            closes(with(&[], &[]).0),
            vec!["pre-copy round 1: link return path: ", "closed before"],
        ),
    ];
    for (case, back, expect) in cases {
        let (text, src) = source_refuses(back, &expect);
        // The device had moved (PRE_COPY) and is back in RUNNING.
        let arcs = src.sim.arcs();
        assert_eq!(arcs.first(), Some(&(S::Running, S::PreCopy)), "{case}");
        assert_eq!(arcs.last(), Some(&(S::PreCopy, S::Running)), "{case}");
        assert!(src.sent().contains(&"Pages"), "{case}");
        println!("{case}: {text}");
    }
}

#[test]
fn hostile_peer_destination_lies_after_end_leave_the_source_stopped_with_its_state_intact() {
    let unknown = "the destination's outcome is unknown, so the source stays stopped with its \
                   state intact";
    let ok = [Message::CompatOk];
    let cases: Vec<(&str, Back, Vec<String>)> = vec![
        (
            "garbage",
            stalls(script(&ok, b"garbage!!")),
            vec![
                format!(
                    "handover: link lost after the stream ended ({unknown}; resume it only once the destination is known not to run)"
                ),
                "bad magic".into(),
            ],
        ),
        (
            "EOF",
            closes(script(&ok, &[])),
            vec![
                format!("handover: link lost after the stream ended ({unknown}"),
                "closed before".into(),
            ],
        ),
        (
            "EOF inside a frame",
            closes(script(&ok, b"LMRP\x03\x10\0\0\0\x01")),
            vec![
                format!("({unknown}"),
                "inside a type-3 message (1 of 16 payload bytes)".into(),
            ],
        ),
        (
            "Failed with invalid UTF-8",
            stalls(script(&ok, &frame(4, b"\xff"))),
            vec![format!("({unknown}"), "message type 4 is not UTF-8".into()],
        ),
        (
            "CompatOk again",
            stalls(script(&[Message::CompatOk, Message::CompatOk], &[])),
            vec![format!(
                "handover: protocol: expected Resumed or Failed, got CompatOk; {unknown}"
            )],
        ),
        (
            "Capabilities after CompatOk",
            stalls(script(&[Message::CompatOk, CAPS], &[])),
            vec![format!(
                "expected Resumed or Failed, got Capabilities(1); {unknown}"
            )],
        ),
        (
            "CompatRefused after End",
            stalls(script(
                &[Message::CompatOk, Message::CompatRefused("no".into())],
                &[],
            )),
            vec![format!(
                "expected Resumed or Failed, got CompatRefused(\"no\"); {unknown}"
            )],
        ),
    ];
    for (case, back, expect) in cases {
        let mut src = source();
        let (r, waited) = src.run(back);
        let text = r.expect_err(case).chain();
        assert!(!waited, "{case}: {text}");
        for want in &expect {
            assert!(
                text.contains(want.as_str()),
                "{case}: expected {want:?} in: {text}"
            );
        }
        // The documented rule: stopped, state intact (the device holds its STOP_COPY state),
        // the whole stream sent.
        assert!(src.s.is_stopped(), "{case}: {text}");
        assert_eq!(src.device_state(), S::StopCopy, "{case}");
        assert_eq!(src.sent().last(), Some(&"End"), "{case}");
        // Once the operator knows the destination did not start, the source resumes.
        src.s
            .resume()
            .unwrap_or_else(|e| panic!("{case}: {}", e.chain()));
        assert!(!src.s.is_stopped(), "{case}");
        assert_eq!(src.device_state(), S::Running, "{case}");
        println!("{case}: {text}");
    }
}

#[test]
fn hostile_peer_destination_failed_after_end_resumes_the_source() {
    let (text, src) = {
        let mut src = source();
        let (r, waited) = src.run(stalls(script(
            &[
                Message::CompatOk,
                Message::Failed("resume: device 0: EIO".into()),
            ],
            &[],
        )));
        assert!(!waited);
        (r.expect_err("the destination failed").chain(), src)
    };
    assert!(
        text.contains("handover: the destination failed: resume: device 0: EIO"),
        "{text}"
    );
    assert!(!src.s.is_stopped(), "{text}");
    assert_eq!(src.device_state(), S::Running);
}

#[test]
fn hostile_peer_destination_undecided_after_end_leaves_the_source_stopped_until_its_caller_decides()
{
    let mut src = source();
    let (r, waited) = src.run(stalls(script(
        &[
            Message::CompatOk,
            Message::Undecided("resume: device 0: reset failed: EIO".into()),
        ],
        &[],
    )));
    assert!(!waited);
    let e = r.expect_err("undecided");
    let text = e.chain();
    assert!(matches!(e, livemig::Error::Undecided { .. }), "{text}");
    assert!(
        text.contains("the destination says: resume: device 0: reset failed: EIO"),
        "{text}"
    );
    // Neither side runs, and the source's decision says why.
    assert!(src.s.is_stopped(), "{text}");
    assert_eq!(src.s.outcome().runs, livemig::engine::Runs::Undecided);
    assert!(
        src.s.outcome().why.contains("reset failed"),
        "{:?}",
        src.s.outcome()
    );
    assert_eq!(src.device_state(), S::StopCopy);
    // The caller gives the VM up here: it never runs on this side again.
    src.s.discard().expect("discard");
    assert_eq!(src.s.outcome().runs, livemig::engine::Runs::NotHere);
    assert_eq!(src.device_state(), S::Stop);
    assert!(src.s.resume().is_err(), "a discarded source resumed");
}

#[test]
fn hostile_peer_destination_undecided_before_end_lets_the_source_run_on() {
    // Before End the destination starts nothing, so Undecided then is as Failed: the source's
    // pre-copy ends and it runs on.
    let (text, src) = source_refuses(
        stalls(script(
            &[
                CAPS,
                Message::CompatOk,
                Message::Undecided("receive: device 0: reset failed".into()),
            ],
            &[],
        )),
        &["pre-copy round 1: the destination failed: receive: device 0: reset failed"],
    );
    assert!(!src.s.is_stopped(), "{text}");
    assert_eq!(src.s.outcome().runs, livemig::engine::Runs::Here);
}
