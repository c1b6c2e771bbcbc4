//! A source that trickles its stream (a byte every 20 ms: every read completes long before any
//! per-read timeout) holds a destination no longer than its phase deadline: the connection is
//! aborted, the devices are not touched, and the error names the phase and the deadline. The
//! negative control is the same trickle with no phase deadline: the destination is still
//! receiving when the positive test's bound has long passed.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::Ram;
use livemig::Error;
use livemig::engine::{Destination, DestinationPlatform};
use livemig::error::Phase;
use livemig_stream::{Compat, DirtyCaps, Writer, WriterOptions};

const LIMIT: Duration = Duration::from_millis(500);

/// The start of a real stream: its header and a Compat record.
fn stream_start() -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out, WriterOptions::default()).unwrap();
    w.compat(&Compat {
        device: 0,
        identity: "a device that takes its time",
        compat: &[0; 64],
        page_size_mask: 0x1000,
        dirty_caps: DirtyCaps::default(),
        migration_flags: 1,
    })
    .unwrap();
    w.flush().unwrap();
    drop(w);
    out
}

/// Trickles the start of a stream to a destination with `deadline`, then keeps the connection
/// open and silent; returns the destination's result and how long it took (or `None` if it
/// had not returned after 3 s).
fn run(deadline: Option<Duration>) -> Option<(livemig::Result<()>, Duration)> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let bytes = stream_start();
    let src = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        for b in &bytes {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Then silence, the connection kept open (the per-read timeout is 5 s).
        thread::sleep(Duration::from_secs(4));
    });
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut d = Destination::new(DestinationPlatform {
            memory: Ram::filled(64 << 10, 0),
            devices: Vec::new(),
            iommu_dirty: Vec::new(),
            page_size_mask: 0x1000,
            vcpus: None,
        });
        d.set_phase_deadline(deadline);
        let back = s.try_clone().unwrap();
        let abort = s.try_clone().unwrap();
        let t0 = Instant::now();
        let r = d.receive_channels(
            s,
            back,
            Box::new(move || {
                let _ = abort.shutdown(std::net::Shutdown::Both);
            }),
            &mut || Err(std::io::Error::other("no page channels")),
        );
        let _ = tx.send((r.map(drop), t0.elapsed()));
    });
    let got = rx.recv_timeout(Duration::from_secs(3)).ok();
    drop(src);
    got
}

#[test]
fn a_trickling_source_is_cut_off_at_the_phase_deadline() {
    let (r, took) = run(Some(LIMIT)).expect("the destination returned");
    match r {
        Err(Error::Deadline { phase, reason }) => {
            assert_eq!(phase, Phase::Compat);
            assert!(reason.contains("phase deadline of 0.5 s"), "{reason}");
        }
        other => panic!("expected the phase deadline, got {other:?}"),
    }
    assert!(took < LIMIT + Duration::from_millis(500), "took {took:?}");
}

/// Negative control: without a phase deadline the trickle keeps the destination receiving
/// past 3 s (six times the limit), though every single read completes.
#[test]
fn negative_control_without_a_phase_deadline_the_trickle_holds_the_destination() {
    assert!(run(None).is_none(), "the destination gave up on its own");
}
