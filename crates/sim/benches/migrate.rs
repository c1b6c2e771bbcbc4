//! A simulated 8 GiB guest (512 MiB populated) with two QM VFs and a DMA-logging device
//! dirtying at fixed rates, migrated over a 10 Gbit/s, 1 ms link.
//!
//! Same-run baseline: the bytes the migration must move at the least — every non-zero page
//! once plus each re-dirtied page once per round it was reported, and the device state — sent
//! raw through the same link. After the measurements it prints, for the last migration, the
//! stream bytes against that minimum and the downtime against its limit.
//!
//! `round_rate`: each pre-copy round's rate against the simulated link at 10 and 25 Gbit/s.
//! `channels`: page channels over loopback TCP against one raw TCP stream.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use livemig::engine::{Destination, MigrationReport, Source, SourceConfig};
use livemig::link::{Cut, DataSink, LinkConfig, pipe};
use livemig_sim::{self as sim, SimSpec, Vendor};

const LINK: LinkConfig = LinkConfig {
    bandwidth: 1_250_000_000,
    latency: Duration::from_millis(1),
};

fn spec() -> SimSpec {
    SimSpec {
        vendor: Vendor::Amd,
        ram: 8 << 30,
        populated: 512 << 20,
        cpu_dirty_rate: 10_000,
        dma_rate: 2_000,
        ..SimSpec::default()
    }
}

fn migrate_once() -> (Duration, MigrationReport) {
    migrate_over(&spec(), LINK)
}

/// Bytes the migration had to move at the least, by its own report.
fn minimum(r: &MigrationReport) -> u64 {
    let all = r.rounds.iter().chain(std::iter::once(&r.stop_copy));
    all.map(|x| x.pages * 4096 + x.device_bytes).sum()
}

fn raw_copy(bytes: u64) -> Duration {
    let (mut w, mut rd) = pipe(LINK, Cut::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || std::io::copy(&mut rd, &mut std::io::sink()).expect("read"));
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).expect("write");
            left -= n as u64;
        }
        w.close().expect("close");
    });
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    let last: Mutex<Option<MigrationReport>> = Mutex::new(None);
    let mut g = c.benchmark_group("migrate_8GiB");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    g.bench_function("engine", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (el, r) = migrate_once();
                total += el;
                *last.lock().unwrap() = Some(r);
            }
            total
        })
    });
    let min = last
        .lock()
        .unwrap()
        .as_ref()
        .map(minimum)
        .unwrap_or(600 << 20);
    g.bench_function("baseline_raw_copy_of_minimum", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| raw_copy(min)).sum())
    });
    g.finish();
    if let Some(r) = last.lock().unwrap().as_ref() {
        let first_nonzero = r.rounds[0].pages * 4096;
        let redirtied: u64 = r.rounds[1..]
            .iter()
            .chain(std::iter::once(&r.stop_copy))
            .map(|x| x.dirty_pages * 4096)
            .sum();
        eprintln!(
            "last migration: {} pre-copy rounds, stream {} bytes; minimum {} bytes (RAM once {} + \
             re-dirtied {} + device state); ratio {:.4}; downtime {:.1} ms of {:.1} ms limit; \
             total {:.2} s",
            r.rounds.len(),
            r.bytes,
            min,
            first_nonzero,
            redirtied,
            r.bytes as f64 / min as f64,
            r.downtime_us as f64 / 1e3,
            r.downtime_limit_us as f64 / 1e3,
            r.total_us as f64 / 1e6
        );
    }
}

/// A quiet 2 GiB guest with 512 MiB of data (no devices, no dirtying).
fn quiet_spec() -> SimSpec {
    SimSpec {
        vendor: Vendor::Amd,
        ram: 2 << 30,
        populated: 512 << 20,
        qm_vfs: 0,
        logging_devices: 0,
        cpu_dirty_rate: 0,
        dma_rate: 0,
        ..SimSpec::default()
    }
}

/// One migration of the quiet guest over loopback TCP with `channels` (1: one connection).
fn migrate_tcp(channels: u32) -> (Duration, MigrationReport) {
    use std::net::{TcpListener, TcpStream};
    let s = quiet_spec();
    let src = sim::source(&s, true).expect("source");
    let dst = sim::destination(&s, true).expect("destination");
    let cfg = SourceConfig {
        channels,
        ..SourceConfig::default()
    };
    let mut source = Source::new(src.platform, cfg);
    let mut dest = Destination::new(dst.platform);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("address");
    let t = Instant::now();
    let r = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let (main, _) = l.accept().expect("accept");
            let back = main.try_clone().expect("clone");
            let abort = main.try_clone().expect("clone");
            dest.receive_channels(
                main,
                back,
                Box::new(move || {
                    let _ = abort.shutdown(std::net::Shutdown::Both);
                }),
                &mut || {
                    let (c, _) = l.accept()?;
                    let a = c.try_clone()?;
                    Ok((
                        Box::new(c) as Box<dyn std::io::Read + Send>,
                        Box::new(move || {
                            let _ = a.shutdown(std::net::Shutdown::Both);
                        }) as livemig::transport::Abort,
                    ))
                },
            )
        });
        let main = TcpStream::connect(addr).expect("connect");
        let r = source.migrate_channels(livemig::transport::TcpChannel(main), &mut |_| {
            let c = TcpStream::connect(addr)?;
            let a = c.try_clone()?;
            Ok((
                Box::new(c) as Box<dyn DataSink>,
                Box::new(move || {
                    let _ = a.shutdown(std::net::Shutdown::Both);
                }) as livemig::transport::Abort,
            ))
        });
        d.join().expect("destination thread").expect("destination");
        r
    });
    let el = t.elapsed();
    (el, r.expect("migration"))
}

/// The baseline: `bytes` through one loopback TCP connection.
fn raw_tcp(bytes: u64) -> Duration {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("address");
    let t = Instant::now();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let (mut c, _) = l.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 20];
            while c.read(&mut buf).expect("read") > 0 {}
        });
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            c.write_all(&chunk[..n]).expect("write");
            left -= n as u64;
        }
    });
    t.elapsed()
}

/// Page channels over loopback TCP: 1, 2 and 4, against one raw TCP stream of the same bytes.
fn channels(c: &mut Criterion) {
    let mut g = c.benchmark_group("channels_loopback_2GiB_512MiB_data");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let bytes = Mutex::new(0u64);
    for n in [1u32, 2, 4] {
        g.bench_function(format!("{n}_channel(s)"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (el, r) = migrate_tcp(n);
                    total += el;
                    *bytes.lock().unwrap() = r.bytes;
                }
                total
            })
        });
    }
    let b = *bytes.lock().unwrap();
    g.bench_function("baseline_raw_tcp_of_the_stream_bytes", |bch| {
        bch.iter_custom(|iters| (0..iters).map(|_| raw_tcp(b)).sum())
    });
    g.finish();
}

/// One migration of `spec` over the simulated link `link`.
fn migrate_over(spec: &SimSpec, link: LinkConfig) -> (Duration, MigrationReport) {
    let src = sim::source(spec, true).expect("source");
    let dst = sim::destination(spec, true).expect("destination");
    let mut source = Source::new(src.platform, SourceConfig::default());
    let mut dest = Destination::new(dst.platform);
    // The workload's writers get going before the clock starts.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let (r, d) = sim::migrate_local(&mut source, &mut dest, link, &Cut::new());
    let el = t.elapsed();
    let r = r.expect("migration");
    d.expect("destination");
    drop(src.workload);
    src.host.compare(&dst.host).expect("bit for bit");
    (el, r)
}

/// Each round's rate against the simulated link's: a 4 GiB guest with 1 GiB of data, with
/// the default devices and dirtying and with everything idle, at 10 and 25 Gbit/s (1 ms). After
/// the measurements it prints every round of the last migration of each case: bytes, time,
/// rate and its ratio to the link. A round smaller than a few bandwidth-delay products cannot
/// reach the link's rate (its time is mostly the link's latency); the first round is the one
/// that moves the data.
fn round_rate(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_rate_4GiB_1GiB_data");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let busy = SimSpec {
        ram: 4 << 30,
        populated: 1 << 30,
        ..SimSpec::default()
    };
    let idle = SimSpec {
        qm_vfs: 0,
        logging_devices: 0,
        cpu_dirty_rate: 0,
        dma_rate: 0,
        ..busy.clone()
    };
    let mut last = Vec::new();
    for (what, spec) in [("busy", &busy), ("idle", &idle)] {
        for gbit in [10u64, 25] {
            let link = LinkConfig {
                bandwidth: gbit * 1_000_000_000 / 8,
                latency: Duration::from_millis(1),
            };
            let name = format!("{what}_{gbit}Gbit");
            let report = Mutex::new(None);
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (el, r) = migrate_over(spec, link);
                        total += el;
                        *report.lock().unwrap() = Some(r);
                    }
                    total
                })
            });
            if let Some(r) = report.into_inner().unwrap() {
                last.push((name, link, r));
            }
        }
    }
    g.finish();
    for (name, link, r) in last {
        for x in &r.rounds {
            let rate = x.bytes as f64 * 1e6 / x.elapsed_us.max(1) as f64;
            eprintln!(
                "{name}: round {} {} bytes in {:.1} ms: {:.2} Gbit/s, {:.2}x the link",
                x.round,
                x.bytes,
                x.elapsed_us as f64 / 1e3,
                rate * 8.0 / 1e9,
                rate / link.bandwidth as f64
            );
        }
    }
}

criterion_group!(benches, bench, channels, round_rate);
criterion_main!(benches);
