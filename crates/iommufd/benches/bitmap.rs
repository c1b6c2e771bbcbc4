//! DirtyBitmap throughput over 1 TiB of IOVA at 4 KiB (a 32 MiB bitmap), next to a plain read
//! of the same bytes measured in the same run.
//!
//! Dirty patterns: 1% and 50% of pages, in runs whose lengths are drawn uniformly from 1..=127
//! pages (mean 64) — guest and device writes cluster — plus a uniformly random 1% as the
//! sparse worst case for run iteration. Throughput is bytes of bitmap per second.
//!
//! `cargo bench -p livemig-iommufd --bench bitmap`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use livemig_iommufd::DirtyBitmap;

const PAGE: u64 = 4096;
const SPAN: u64 = 1 << 40; // 1 TiB

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `fraction` of pages dirty, in clustered runs (mean 64 pages) or singly at random.
fn pattern(fraction: f64, clustered: bool, seed: u64) -> DirtyBitmap {
    let mut bm = DirtyBitmap::new(0, SPAN, PAGE).unwrap();
    let pages = SPAN / PAGE;
    let mut rng = seed;
    let mut at = 0u64;
    if clustered {
        let mean_run = 64.0;
        let mean_gap = mean_run * (1.0 - fraction) / fraction;
        while at < pages {
            let gap = (xorshift(&mut rng) % (2 * mean_gap as u64 + 1)).max(1);
            at += gap;
            let run = 1 + xorshift(&mut rng) % 127;
            if at >= pages {
                break;
            }
            let run = run.min(pages - at);
            bm.set_range(at * PAGE, run * PAGE).unwrap();
            at += run;
        }
    } else {
        let threshold = (fraction * u64::MAX as f64) as u64;
        for p in 0..pages {
            if xorshift(&mut rng) < threshold {
                bm.set_range(p * PAGE, PAGE).unwrap();
            }
        }
    }
    bm
}

/// The baseline: read every word once (the least work that touches all the bytes).
fn plain_read(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |acc, &w| acc ^ w)
}

fn bench(c: &mut Criterion) {
    let bytes = SPAN / PAGE / 8;
    let cases = [
        ("1pct_clustered", pattern(0.01, true, 1)),
        ("50pct_clustered", pattern(0.50, true, 2)),
        ("1pct_random", pattern(0.01, false, 3)),
    ];
    let mut g = c.benchmark_group("bitmap_1TiB_4K");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("plain_read", |b| {
        b.iter(|| black_box(plain_read(black_box(cases[0].1.words()))))
    });
    for (name, bm) in &cases {
        let dirty = bm.count() as f64 / (SPAN / PAGE) as f64;
        eprintln!(
            "{name}: {:.2}% dirty, {} runs",
            dirty * 100.0,
            bm.runs().count()
        );
        g.bench_function(format!("runs/{name}"), |b| {
            b.iter(|| {
                let mut n = 0u64;
                for r in black_box(bm).runs() {
                    n = n.wrapping_add(r.length);
                }
                black_box(n)
            })
        });
    }

    // Union reads two bitmaps and writes one: its baseline is a plain read of both inputs.
    g.throughput(Throughput::Bytes(2 * bytes));
    g.bench_function("plain_read_two", |b| {
        b.iter(|| {
            black_box(plain_read(black_box(cases[0].1.words())))
                ^ black_box(plain_read(black_box(cases[1].1.words())))
        })
    });
    let mut acc = cases[0].1.clone();
    g.bench_function("union/1pct_into_50pct", |b| {
        b.iter(|| {
            acc.union(black_box(&cases[1].1)).unwrap();
            black_box(acc.words().len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
