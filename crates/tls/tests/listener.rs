//! The destination's listener stays available (issue 29, item 5): a stranger's connection and a
//! silent one arrive before the pinned source; both are reported and neither ends nor holds up
//! the wait, and the source's whole migration (main connection and page channels, each taken
//! through the same listener) arrives. The negative control bounds the failed attempts at 1:
//! the stranger then ends the wait with an error naming the bound, and the destination engine
//! never runs.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use livemig::engine::{Destination, Source, SourceConfig};
use livemig::link::DataSink;
use livemig_sim::{SimSpec, destination, source};
use livemig_tls::{
    AcceptPolicy, Identity, PeerListener, TlsChannel, TlsConfig, TlsError, Trust, connect,
};

fn self_signed(name: &str) -> Identity {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    Identity::from_pem(
        c.cert.pem().as_bytes(),
        c.signing_key.serialize_pem().as_bytes(),
    )
    .unwrap()
}

fn pinned(me: &Identity, peer: &Identity) -> TlsConfig {
    TlsConfig {
        identity: me.clone(),
        trust: Trust::Pinned(vec![peer.fingerprint()]),
    }
}

fn spec() -> SimSpec {
    SimSpec {
        ram: 64 << 20,
        populated: 8 << 20,
        qm_vfs: 1,
        logging_devices: 1,
        ..SimSpec::default()
    }
}

/// A refusal as the destination reported it: (address, reason).
type Reported = (String, String);

/// The destination: listens with `policy`, takes the main connection and the page channels
/// through one [`PeerListener`], and receives into the simulated platform. Reports each
/// refused connection on `reports` as it happens. Returns whether the engine ran, its result,
/// and the digests before and after.
fn destination_thread(
    l: TcpListener,
    cfg: TlsConfig,
    policy: AcceptPolicy,
    reports: mpsc::Sender<Reported>,
) -> thread::JoinHandle<(
    Result<bool, String>,
    livemig_sim::HostDigest,
    livemig_sim::HostDigest,
)> {
    thread::spawn(move || {
        let dst = destination(&spec(), true).unwrap();
        let before = dst.host.digest();
        let host = dst.host.clone();
        let mut pl = PeerListener::new(&l, &cfg, policy);
        let mut report = |r: &livemig_tls::Refusal<'_>| {
            let _ = reports.send((r.peer.clone(), r.error.to_string()));
        };
        let result = (|| {
            let main = pl.accept(None, &mut report).map_err(|e| e.to_string())?;
            let (w, r, abort) = main.split().unwrap();
            let mut d = Destination::new(dst.platform);
            let mut accept_page = || {
                let (_, r, abort) = pl
                    .accept(None, &mut report)
                    .map_err(std::io::Error::other)?
                    .split()?;
                Ok((Box::new(r) as Box<dyn Read + Send>, abort))
            };
            d.receive_channels(r, w, abort, &mut accept_page)
                .map(|_| true)
                .map_err(|e| e.chain())
        })();
        (result, before, host.digest())
    })
}

/// A stranger (a certificate the destination did not pin) tries to migrate; returns its
/// local address (what the destination reports) and its result.
fn stranger_tries(addr: std::net::SocketAddr, dst_id: &Identity) -> (String, bool) {
    let sock = TcpStream::connect(addr).unwrap();
    let me = sock.local_addr().unwrap().to_string();
    let cfg = pinned(&self_signed("stranger"), dst_id);
    // The client's handshake may complete before the server checks its certificate: its
    // first read then fails.
    let ok = connect(sock, &cfg, "destination")
        .and_then(|c| {
            let (_, mut r, _) = c.split().map_err(TlsError::Accept)?;
            let mut b = [0u8; 1];
            r.read(&mut b).map_err(TlsError::Accept)
        })
        .is_ok_and(|n| n > 0);
    (me, ok)
}

#[test]
fn a_stranger_and_a_silent_connection_first_then_the_pinned_source_migrates() {
    let (src_id, dst_id) = (self_signed("source"), self_signed("destination"));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, reports) = mpsc::channel();
    // The default policy: 16 failed attempts, 30 s per handshake.
    let dest = destination_thread(l, pinned(&dst_id, &src_id), AcceptPolicy::default(), tx);

    // A silent connection: connects, says nothing, stays open until the end.
    let silent = TcpStream::connect(addr).unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    // A stranger, refused and reported while the silent connection still waits.
    let (stranger, stranger_ok) = stranger_tries(addr, &dst_id);
    assert!(!stranger_ok, "the stranger read from the destination");
    let (who, why) = reports
        .recv_timeout(Duration::from_secs(20))
        .expect("the stranger's refusal is reported");
    assert_eq!(who, stranger, "{why}");
    assert!(why.contains("is not pinned"), "{why}");
    assert!(why.contains(&stranger), "the reason names the peer: {why}");

    // Now the pinned source, with two page channels.
    let src = source(&spec(), true).unwrap();
    let src_host = src.host.clone();
    let scfg = pinned(&src_id, &dst_id);
    let mut s = Source::new(
        src.platform,
        SourceConfig {
            channels: 2,
            ..SourceConfig::default()
        },
    );
    let main =
        TlsChannel(connect(TcpStream::connect(addr).unwrap(), &scfg, "destination").unwrap());
    let mut connect_page = |_i: u32| {
        let (w, _, abort) = connect(TcpStream::connect(addr)?, &scfg, "destination")
            .map_err(std::io::Error::other)?
            .split()?;
        Ok((Box::new(w) as Box<dyn DataSink>, abort))
    };
    let migrated = s.migrate_channels(main, &mut connect_page);
    drop(src.workload);
    let (received, before, after) = dest.join().unwrap();
    let report = migrated.unwrap_or_else(|e| panic!("source: {e}; destination: {received:?}"));
    assert!(received.unwrap(), "the destination engine did not run");
    assert!(report.bytes > 8 << 20, "{}", report.bytes);
    assert_eq!(after, src_host.digest());
    assert_ne!(after, before);
    // The silent connection was still handshaking (its 30 s run) when the source and its page
    // channels were taken: it held up nothing, was never counted as failed, and was cut when
    // the listener went.
    let more: Vec<Reported> = reports.try_iter().collect();
    assert!(
        !more.iter().any(|(a, _)| *a == silent_addr),
        "the silent connection was waited out before the source: {more:?}"
    );
    let mut b = [0u8; 1];
    let mut silent = silent;
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        silent.read(&mut b).ok(),
        Some(0),
        "the silent connection was cut"
    );
}

/// A silent connection whose handshake time runs out is reported with the reason and the
/// address, and the wait goes on: the source connecting after it is taken.
#[test]
fn a_silent_connection_that_times_out_is_reported_and_the_wait_goes_on() {
    let (src_id, dst_id) = (self_signed("source"), self_signed("destination"));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = pinned(&dst_id, &src_id);
    let (tx, reports) = mpsc::channel();
    let dest = thread::spawn(move || {
        let mut pl = PeerListener::new(
            &l,
            &cfg,
            AcceptPolicy {
                max_failures: 2,
                handshake_timeout: Duration::from_millis(200),
            },
        );
        let r = pl.accept(None, &mut |r| {
            let _ = tx.send((r.peer.clone(), r.error.to_string(), r.failures));
        });
        (r.map(|t| t.peer_fingerprint()), pl.failures())
    });
    let silent = TcpStream::connect(addr).unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let (who, why, n) = reports.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!((who.as_str(), n), (silent_addr.as_str(), 1), "{why}");
    assert!(why.contains("sent no handshake within 200ms"), "{why}");
    let c = connect(
        TcpStream::connect(addr).unwrap(),
        &pinned(&src_id, &dst_id),
        "destination",
    )
    .unwrap();
    let (taken, failures) = dest.join().unwrap();
    assert_eq!(taken.unwrap(), Some(src_id.fingerprint()));
    assert_eq!(failures, 1);
    drop((c, silent));
}

/// Negative control: the bound at 1 failed attempt. The stranger's refusal ends the wait with
/// an error naming the bound; the destination engine never runs and nothing changes.
#[test]
fn negative_control_with_one_attempt_allowed_the_stranger_ends_the_wait() {
    let (src_id, dst_id) = (self_signed("source"), self_signed("destination"));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, reports) = mpsc::channel();
    let dest = destination_thread(
        l,
        pinned(&dst_id, &src_id),
        AcceptPolicy {
            max_failures: 1,
            ..AcceptPolicy::default()
        },
        tx,
    );
    let (stranger, _) = stranger_tries(addr, &dst_id);
    let (received, before, after) = dest.join().unwrap();
    let e = received.unwrap_err();
    assert!(
        e.contains("1 connection(s) failed the TLS handshake, the bound of failed attempts"),
        "{e}"
    );
    assert_eq!(after, before);
    let (who, why) = reports.try_recv().unwrap();
    assert_eq!(who, stranger);
    assert!(why.contains("is not pinned"), "{why}");
}

/// Two authenticated connections handshaking at once (a main connection and the page channel
/// dialed right behind it): the first accept returns one, and the other is not cut but
/// returned by the next accept. Under a listener that dropped the rest at its first success,
/// the second accept would wait until its deadline.
#[test]
fn connections_handshaking_together_are_each_returned_by_an_accept() {
    let (src_id, dst_id) = (self_signed("source"), self_signed("destination"));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Both in the listener's backlog before the first accept: both handshake at once.
    let socks = [
        TcpStream::connect(addr).unwrap(),
        TcpStream::connect(addr).unwrap(),
    ];
    let scfg = pinned(&src_id, &dst_id);
    let clients: Vec<_> = socks
        .into_iter()
        .map(|s| {
            let scfg = scfg.clone();
            thread::spawn(move || connect(s, &scfg, "destination").map(|c| c.peer().to_string()))
        })
        .collect();
    let cfg = pinned(&dst_id, &src_id);
    let mut pl = PeerListener::new(&l, &cfg, AcceptPolicy::default());
    let deadline = || Some(std::time::Instant::now() + Duration::from_secs(10));
    let mut no_refusal = |r: &livemig_tls::Refusal<'_>| panic!("refused {}: {}", r.peer, r.error);
    let a = pl.accept(deadline(), &mut no_refusal).unwrap();
    let b = pl
        .accept(deadline(), &mut no_refusal)
        .expect("the second connection was kept for the next accept");
    assert_ne!(a.peer(), b.peer());
    for c in clients {
        c.join().unwrap().unwrap();
    }
    assert_eq!(pl.failures(), 0);
}
