//! A migration of the simulated platform over mutual TLS with pinned self-signed
//! certificates, on loopback: the destination listens through a `PeerListener`, a stranger
//! (a certificate it did not pin) connects first and is refused, then the source migrates.
//! Checks its own result: the stranger was refused and reported, the migration completed, and
//! the destination's memory and device digest equals the source's. Exits non-zero otherwise.
//!
//! `cargo run -p livemig-tls --example pinned`

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;

use livemig::engine::{Destination, Source, SourceConfig};
use livemig_sim::{SimSpec, destination, source};
use livemig_tls::{AcceptPolicy, Identity, PeerListener, TlsChannel, TlsConfig, Trust, connect};

fn self_signed(name: &str) -> Result<Identity, Box<dyn std::error::Error>> {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
    Ok(Identity::from_pem(
        c.cert.pem().as_bytes(),
        c.signing_key.serialize_pem().as_bytes(),
    )?)
}

/// `me`, accepting only `peer`'s certificate.
fn pinned(me: &Identity, peer: &Identity) -> TlsConfig {
    TlsConfig {
        identity: me.clone(),
        trust: Trust::Pinned(vec![peer.fingerprint()]),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinned: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (src_id, dst_id, stranger) = (
        self_signed("source")?,
        self_signed("destination")?,
        self_signed("stranger")?,
    );
    println!("source      {}", src_id.fingerprint());
    println!("destination {}", dst_id.fingerprint());
    println!("stranger    {}", stranger.fingerprint());
    let spec = SimSpec {
        ram: 64 << 20,
        populated: 8 << 20,
        qm_vfs: 1,
        logging_devices: 1,
        ..SimSpec::default()
    };

    // The destination: pins the source; reports every connection it refuses.
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let dcfg = pinned(&dst_id, &src_id);
    let dst = destination(&spec, true)?;
    let dst_host = dst.host.clone();
    let receiver = thread::spawn(move || -> Result<Vec<String>, String> {
        let mut refused = Vec::new();
        let mut pl = PeerListener::new(&l, &dcfg, AcceptPolicy::default());
        let main = pl
            .accept(None, &mut |r| {
                println!("destination: refused {}: {}", r.peer, r.error);
                refused.push(r.error.to_string());
            })
            .map_err(|e| e.to_string())?;
        println!(
            "destination: receiving from {} ({:?})",
            main.peer(),
            main.peer_fingerprint()
        );
        let (w, r, abort) = main.split().map_err(|e| e.to_string())?;
        let mut d = Destination::new(dst.platform);
        d.receive_channels(r, w, abort, &mut || {
            Err(std::io::Error::other("this example uses one connection"))
        })
        .map_err(|e| e.chain())?;
        Ok(refused)
    });

    // A stranger first: it trusts the destination, but the destination did not pin it.
    let s = connect(
        TcpStream::connect(addr)?,
        &pinned(&stranger, &dst_id),
        "destination",
    );
    let stranger_read = s.and_then(|c| {
        let (_, mut r, _) = c.split().map_err(livemig_tls::TlsError::Accept)?;
        r.read(&mut [0u8; 1]).map_err(livemig_tls::TlsError::Accept)
    });
    if let Ok(n @ 1..) = stranger_read {
        return Err(format!("the stranger read {n} byte(s) from the destination").into());
    }

    // The source.
    let src = source(&spec, true)?;
    let src_host = src.host.clone();
    let mut s = Source::new(src.platform, SourceConfig::default());
    let chan = TlsChannel(connect(
        TcpStream::connect(addr)?,
        &pinned(&src_id, &dst_id),
        "destination",
    )?);
    let report = s.migrate_channels(chan, &mut |_| {
        Err(std::io::Error::other("this example uses one connection"))
    });
    drop(src.workload);
    let refused = receiver
        .join()
        .map_err(|_| "the destination thread panicked")??;
    let report = report.map_err(|e| e.chain())?;
    println!(
        "migrated in {} pre-copy rounds, {:.1} MiB, downtime {} us",
        report.rounds.len(),
        report.bytes as f64 / 1048576.0,
        report.downtime_us
    );

    if !(refused.len() == 1 && refused[0].contains("is not pinned")) {
        return Err(format!("the stranger was not refused as expected: {refused:?}").into());
    }
    let (a, b) = (src_host.digest(), dst_host.digest());
    if a != b {
        return Err(format!("destination digest {b:?} differs from the source's {a:?}").into());
    }
    println!("digest equal: memory {} devices {:?}", a.memory, a.devices);
    Ok(())
}
