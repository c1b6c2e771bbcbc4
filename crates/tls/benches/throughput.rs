//! The cost of TLS on a migration channel: the same bytes over loopback TCP, plain (the
//! same-run baseline) and through `livemig-tls` (pinned certificates, TLS 1.3, the split
//! stream the engine uses), written in the engine's 1 MiB pieces and read on another thread.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use livemig::link::DataSink;
use livemig_tls::{Identity, TlsConfig, Trust, accept, connect};

const BYTES: usize = 64 << 20;
const PIECE: usize = 1 << 20;

fn identity(name: &str) -> Identity {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    Identity::from_pem(
        c.cert.pem().as_bytes(),
        c.signing_key.serialize_pem().as_bytes(),
    )
    .unwrap()
}

fn drain(mut r: impl Read) -> usize {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k,
            Err(e) => panic!("{e}"),
        }
    }
}

fn bench(c: &mut Criterion) {
    let piece = vec![0x5au8; PIECE];
    let mut g = c.benchmark_group("channel_64mib");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(10);
    g.bench_function("plain_tcp", |b| {
        b.iter(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let h = thread::spawn(move || drain(l.accept().unwrap().0));
            let mut s = TcpStream::connect(addr).unwrap();
            for _ in 0..BYTES / PIECE {
                s.write_all(&piece).unwrap();
            }
            s.close().unwrap();
            assert_eq!(h.join().unwrap(), BYTES);
        })
    });
    let (src, dst) = (identity("source"), identity("destination"));
    let scfg = TlsConfig {
        identity: src.clone(),
        trust: Trust::Pinned(vec![dst.fingerprint()]),
    };
    let dcfg = TlsConfig {
        identity: dst,
        trust: Trust::Pinned(vec![src.fingerprint()]),
    };
    g.bench_function("tls13_pinned", |b| {
        b.iter(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let d = dcfg.clone();
            let h = thread::spawn(move || {
                let (_, r, _) = accept(l.accept().unwrap().0, &d).unwrap().split().unwrap();
                drain(r)
            });
            let (mut w, _, _) = connect(TcpStream::connect(addr).unwrap(), &scfg, "destination")
                .unwrap()
                .split()
                .unwrap();
            for _ in 0..BYTES / PIECE {
                w.write_all(&piece).unwrap();
            }
            w.close().unwrap();
            assert_eq!(h.join().unwrap(), BYTES);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
