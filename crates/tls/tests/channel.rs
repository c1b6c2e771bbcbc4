//! Mutual TLS over loopback TCP: both trust modes, refusals before any migration byte, the
//! directions used at once, truncation, and whole migrations (one channel, and with page
//! channels) of the simulated platform over TLS.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use livemig::engine::{Destination, Source, SourceConfig};
use livemig::link::DataSink;
use livemig_sim::{SimSpec, destination, source};
use livemig_tls::{Fingerprint, Identity, TlsChannel, TlsConfig, TlsError, Trust, accept, connect};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A self-signed identity for `name`.
fn self_signed(name: &str) -> Identity {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    Identity::from_pem(
        c.cert.pem().as_bytes(),
        c.signing_key.serialize_pem().as_bytes(),
    )
    .unwrap()
}

/// A CA and a function issuing leaf identities from it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn issue(&self, name: &str) -> Identity {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let mut chain = cert.pem();
        chain.push_str(&self.pem);
        Identity::from_pem(chain.as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    }

    fn trust(&self) -> Trust {
        Trust::ca_from_pem(self.pem.as_bytes()).unwrap()
    }
}

fn pinned(me: &Identity, peer: &Identity) -> TlsConfig {
    TlsConfig {
        identity: me.clone(),
        trust: Trust::Pinned(vec![peer.fingerprint()]),
    }
}

/// Runs `server` on an accepted connection in a thread and `client` on a connection to it.
fn pair<S, C, T, U>(server: S, client: C) -> (T, U)
where
    S: FnOnce(TcpStream) -> T + Send + 'static,
    C: FnOnce(TcpStream) -> U,
    T: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || server(l.accept().unwrap().0));
    let u = client(TcpStream::connect(addr).unwrap());
    (h.join().unwrap(), u)
}

/// Pinned both ways: each side learns the other's fingerprint; 8 MiB one way while the other
/// way carries small messages at the same time; close_notify ends the stream cleanly.
#[test]
fn pinned_peers_talk_both_ways_at_once() {
    let (src, dst) = (self_signed("source"), self_signed("destination"));
    let (dcfg, scfg) = (pinned(&dst, &src), pinned(&src, &dst));
    let (src_fp, dst_fp) = (src.fingerprint(), dst.fingerprint());
    let (got, ()) = pair(
        move |sock| {
            let s = accept(sock, &dcfg).unwrap();
            assert_eq!(s.peer_fingerprint(), Some(src_fp));
            let (mut w, mut r, _) = s.split().unwrap();
            let acks = thread::spawn(move || {
                for i in 0..64u32 {
                    w.write_all(&i.to_le_bytes()).unwrap();
                }
                w.close().unwrap();
            });
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            acks.join().unwrap();
            all
        },
        move |sock| {
            let s = connect(sock, &scfg, "destination").unwrap();
            assert_eq!(s.peer_fingerprint(), Some(dst_fp));
            let (mut w, mut r, _) = s.split().unwrap();
            let reader = thread::spawn(move || {
                let mut b = Vec::new();
                r.read_to_end(&mut b).unwrap();
                b
            });
            let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
            w.write_all(&data).unwrap();
            w.close().unwrap();
            let acks = reader.join().unwrap();
            assert_eq!(acks.len(), 64 * 4);
            assert_eq!(&acks[4..8], &1u32.to_le_bytes());
        },
    );
    assert_eq!(got.len(), 8 << 20);
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

/// A source whose certificate the destination did not pin is refused inside `accept`: the
/// destination never gets a stream to read a migration from. The source, which trusts the
/// destination, learns of it as an error on its first read.
#[test]
fn an_unpinned_peer_is_refused_before_any_byte() {
    let (src, dst, stranger) = (
        self_signed("source"),
        self_signed("destination"),
        self_signed("stranger"),
    );
    let dcfg = pinned(&dst, &src);
    let scfg = pinned(&stranger, &dst);
    let (server, client) = pair(
        move |sock| accept(sock, &dcfg).map(|_| ()),
        move |sock| {
            let s = connect(sock, &scfg, "destination")?;
            let (_, mut r, _) = s.split().unwrap();
            let mut b = [0u8; 1];
            Ok::<_, TlsError>(r.read(&mut b))
        },
    );
    let e = server.unwrap_err().to_string();
    assert!(e.contains("is not pinned"), "{e}");
    assert!(e.contains(&stranger.fingerprint().to_string()), "{e}");
    // The client either fails its handshake or its first read: never reads data.
    match client {
        Err(e) => assert!(e.to_string().contains("handshake"), "{e}"),
        Ok(read) => assert!(read.is_err(), "{read:?}"),
    }
    // And the other way: a destination the source did not pin.
    let (src, dst, stranger) = (
        self_signed("source"),
        self_signed("destination"),
        self_signed("stranger"),
    );
    let dcfg = pinned(&stranger, &src);
    let scfg = pinned(&src, &dst);
    let (_, client) = pair(
        move |sock| accept(sock, &dcfg).map(|_| ()),
        move |sock| connect(sock, &scfg, "destination").map(|_| ()),
    );
    let e = client.unwrap_err().to_string();
    assert!(e.contains("is not pinned"), "{e}");
}

/// CA mode: leaves of the trusted CA (the destination's naming the host the source dials)
/// connect; a leaf of another CA is refused, and so is a destination certificate for another
/// name.
#[test]
fn ca_issued_peers_connect_and_others_are_refused() {
    let ca = Ca::new("livemig test CA");
    let other = Ca::new("someone else's CA");
    let cfg = |id: Identity, ca: &Ca| TlsConfig {
        identity: id,
        trust: ca.trust(),
    };
    let (dcfg, scfg) = (
        cfg(ca.issue("dest.example"), &ca),
        cfg(ca.issue("src.example"), &ca),
    );
    let (s, c) = pair(
        move |sock| accept(sock, &dcfg).map(|_| ()),
        move |sock| connect(sock, &scfg, "dest.example").map(|_| ()),
    );
    s.unwrap();
    c.unwrap();

    let (dcfg, scfg) = (
        cfg(ca.issue("dest.example"), &ca),
        cfg(other.issue("src.example"), &ca),
    );
    let (s, _) = pair(
        move |sock| accept(sock, &dcfg).map(|_| ()),
        move |sock| connect(sock, &scfg, "dest.example").map(|_| ()),
    );
    assert!(s.is_err(), "a leaf of another CA was accepted");

    let (dcfg, scfg) = (
        cfg(ca.issue("elsewhere.example"), &ca),
        cfg(ca.issue("src.example"), &ca),
    );
    let (_, c) = pair(
        move |sock| accept(sock, &dcfg).map(|_| ()),
        move |sock| connect(sock, &scfg, "dest.example").map(|_| ()),
    );
    let e = c.unwrap_err().to_string();
    assert!(e.contains("handshake"), "{e}");
}

/// A connection that ends without close_notify is an error, not a short stream.
#[test]
fn a_cut_connection_is_not_a_clean_end() {
    let (src, dst) = (self_signed("source"), self_signed("destination"));
    let (dcfg, scfg) = (pinned(&dst, &src), pinned(&src, &dst));
    let (read, ()) = pair(
        move |sock| {
            let (_, mut r, _) = accept(sock, &dcfg).unwrap().split().unwrap();
            let mut b = Vec::new();
            r.read_to_end(&mut b).map(|_| b)
        },
        move |sock| {
            let (mut w, _, abort) = connect(sock, &scfg, "destination")
                .unwrap()
                .split()
                .unwrap();
            w.write_all(b"partial").unwrap();
            w.flush().unwrap();
            abort();
        },
    );
    let e = read.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
}

fn spec() -> SimSpec {
    SimSpec {
        ram: 64 << 20,
        populated: 16 << 20,
        qm_vfs: 1,
        logging_devices: 1,
        ..SimSpec::default()
    }
}

/// A whole migration of the simulated platform over TLS on loopback, with two page channels
/// each on its own TLS connection: the destination's RAM and devices equal the source's.
#[test]
fn a_migration_over_tls_with_page_channels_arrives_whole() {
    let (src_id, dst_id) = (self_signed("source"), self_signed("destination"));
    let (dcfg, scfg) = (pinned(&dst_id, &src_id), pinned(&src_id, &dst_id));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = destination(&spec(), true).unwrap();
    let dst_host = dst.host.clone();
    let receiver = thread::spawn(move || {
        let mut d = Destination::new(dst.platform);
        let (w, r, abort) = accept(l.accept().unwrap().0, &dcfg)
            .unwrap()
            .split()
            .unwrap();
        let mut accept_page = || {
            let (_, r, abort) = accept(l.accept()?.0, &dcfg)
                .map_err(std::io::Error::other)?
                .split()?;
            Ok((Box::new(r) as Box<dyn Read + Send>, abort))
        };
        d.receive_channels(r, w, abort, &mut accept_page)
    });
    let src = source(&spec(), true).unwrap();
    let src_host = src.host.clone();
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
    let report = s.migrate_channels(main, &mut connect_page);
    drop(src.workload);
    let received = receiver.join().unwrap();
    let report = report.unwrap_or_else(|e| panic!("source: {e}; destination: {received:?}"));
    received.unwrap();
    assert!(report.bytes > 16 << 20, "{}", report.bytes);
    assert_eq!(src_host.digest(), dst_host.digest());
}

/// What one whole migration on one TLS connection did.
struct Attempt {
    /// The destination's `accept`: `Ok` when the source was authenticated.
    accepted: Result<(), String>,
    /// The destination engine's result (`None`: it never ran, `accept` refused the peer).
    received: Option<Result<(), String>>,
    /// The source's result.
    migrated: Result<(), String>,
    /// The destination's memory and devices before, and after.
    before: livemig_sim::HostDigest,
    after: livemig_sim::HostDigest,
    /// The source's at the end.
    source: livemig_sim::HostDigest,
}

/// A whole migration of the simulated platform on one TLS connection: a real [`Destination`]
/// receives from the stream `accept` returns, when it returns one.
fn migrate_once(dcfg: TlsConfig, scfg: TlsConfig) -> Attempt {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = destination(&spec(), true).unwrap();
    let before = dst.host.digest();
    let dst_host = dst.host.clone();
    let receiver = thread::spawn(move || {
        let conn = match accept(l.accept().unwrap().0, &dcfg) {
            Ok(c) => c,
            Err(e) => return (Err(e.to_string()), None),
        };
        let (w, r, abort) = conn.split().unwrap();
        let mut d = Destination::new(dst.platform);
        let received = d
            .receive_channels(r, w, abort, &mut || {
                Err(std::io::Error::other("no page channels"))
            })
            .map(|_| ())
            .map_err(|e| e.chain());
        (Ok(()), Some(received))
    });
    let src = source(&spec(), true).unwrap();
    let src_host = src.host.clone();
    let mut s = Source::new(src.platform, SourceConfig::default());
    let migrated = connect(TcpStream::connect(addr).unwrap(), &scfg, "destination")
        .map_err(|e| e.to_string())
        .and_then(|c| {
            s.migrate_channels(TlsChannel(c), &mut |_| {
                Err(std::io::Error::other("no page channels"))
            })
            .map(|_| ())
            .map_err(|e| e.chain())
        });
    drop(src.workload);
    let (accepted, received) = receiver.join().unwrap();
    Attempt {
        accepted,
        received,
        migrated,
        before,
        after: dst_host.digest(),
        source: src_host.digest(),
    }
}

/// The unpinned source of a whole migration: the destination's `accept` refuses it, so the
/// destination engine waiting behind it never starts and its memory and devices stay as they
/// were.
#[test]
fn a_migration_from_an_unpinned_source_never_starts() {
    let (dst_id, stranger) = (self_signed("destination"), self_signed("stranger"));
    let src_id = self_signed("source");
    let a = migrate_once(pinned(&dst_id, &src_id), pinned(&stranger, &dst_id));
    let refused = a.accepted.unwrap_err();
    assert!(refused.contains("is not pinned"), "{refused}");
    assert!(a.received.is_none(), "the destination engine ran");
    assert!(a.migrated.is_err(), "the source believed it migrated");
    assert_eq!(a.after, a.before, "the destination changed");
}

/// Negative control of the test above: the same source and destination with the source's
/// certificate pinned migrate, and the destination's digest changes (to the source's), so the
/// check `after == before` there can fail.
#[test]
fn negative_control_the_same_source_pinned_migrates_and_changes_the_destination() {
    let (dst_id, stranger) = (self_signed("destination"), self_signed("stranger"));
    let a = migrate_once(pinned(&dst_id, &stranger), pinned(&stranger, &dst_id));
    a.accepted.unwrap();
    a.received
        .expect("the destination engine ran")
        .unwrap_or_else(|e| panic!("destination: {e}; source: {:?}", a.migrated));
    a.migrated.unwrap();
    assert_ne!(
        a.after, a.before,
        "a whole migration left the destination as it was"
    );
    assert_eq!(a.after, a.source);
}

#[test]
fn fingerprint_of_an_identity_is_what_the_peer_sees() {
    let id = self_signed("x");
    let fp: Fingerprint = id.fingerprint().to_string().parse().unwrap();
    assert_eq!(fp, id.fingerprint());
}
