//! Write + read 1 GiB of 4 KiB pages through an in-memory pipe, next to a memcpy of the same
//! bytes in the same run.
//!
//! The pipe is a byte buffer the writer appends to and the consumer drains after every 256 KiB
//! of pages, decoding records in place with the sans-IO `Decoder` and copying each payload to
//! its place in the destination memory — what a migration destination does. Source and
//! destination are 1 GiB each, pre-faulted.
//!
//! `cargo bench -p livemig-stream --bench stream`

use std::cell::RefCell;
use std::hint::black_box;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use livemig_stream::{Decoder, Limits, Record, Writer, WriterOptions};

const TOTAL: usize = 1 << 30;
const PAGE: usize = 4096;
const CHUNK: usize = 256 << 10;

#[derive(Default)]
struct Pipe {
    buf: Vec<u8>,
    start: usize,
}

#[derive(Clone)]
struct PipeWriter(Rc<RefCell<Pipe>>);

impl Write for PipeWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut p = self.0.borrow_mut();
        let mut n = 0;
        for b in bufs {
            p.buf.extend_from_slice(b);
            n += b.len();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decodes every complete record in the pipe, copying page payloads into `dst`.
fn drain(pipe: &RefCell<Pipe>, dec: &mut Option<Decoder>, dst: &mut [u8]) {
    let mut p = pipe.borrow_mut();
    if dec.is_none() {
        let start = p.start;
        *dec = Decoder::start(&p.buf[start..], Limits::default()).unwrap();
        p.start += livemig_stream::format::HEADER_LEN;
    }
    let d = dec.as_mut().unwrap();
    loop {
        let Pipe { buf, start } = &mut *p;
        let Some((rec, used)) = d.record(&buf[*start..]).unwrap() else {
            break;
        };
        if let Record::Pages(pg) = rec {
            let at = pg.gpa as usize;
            dst[at..at + pg.payload.len()].copy_from_slice(pg.payload);
        }
        *start += used;
    }
    if p.start == p.buf.len() {
        p.buf.clear();
        p.start = 0;
    }
}

fn transfer(src: &[u8], dst: &mut [u8], checksums: bool) {
    let pipe = Rc::new(RefCell::new(Pipe {
        buf: Vec::with_capacity(2 * CHUNK),
        start: 0,
    }));
    let opts = WriterOptions {
        checksums,
        producer: "bench".into(),
        detect_zero_pages: false,
        max_record: (CHUNK + 64) as u32,

        ..WriterOptions::default()
    };
    let mut w = Writer::new(PipeWriter(pipe.clone()), opts).unwrap();
    let mut dec = None;
    for (i, chunk) in src.chunks(CHUNK).enumerate() {
        w.pages((i * CHUNK) as u64, PAGE as u32, chunk).unwrap();
        drain(&pipe, &mut dec, dst);
    }
    w.finish().unwrap();
    drain(&pipe, &mut dec, dst);
    assert!(dec.unwrap().finished());
}

fn bench(c: &mut Criterion) {
    let mut src = vec![0u8; TOTAL];
    for (i, b) in src.iter_mut().enumerate().step_by(64) {
        *b = (i / 64) as u8 | 1;
    }
    let mut dst = vec![1u8; TOTAL];

    let mut g = c.benchmark_group("stream_1GiB_4K_pages");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(TOTAL as u64));
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            for (d, s) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
                d.copy_from_slice(s);
            }
            black_box(&dst);
        })
    });
    // A filter may skip the transfers (and leave `dst` as it was).
    let mut ran = false;
    g.bench_function("write_read_crc32c", |b| {
        ran = true;
        b.iter(|| transfer(&src, &mut dst, true))
    });
    g.bench_function("write_read_no_checksums", |b| {
        ran = true;
        b.iter(|| transfer(&src, &mut dst, false))
    });
    g.finish();
    if ran {
        assert!(src == dst, "the pipeline delivered every byte");
    }
}

/// Zero-page detection as a source round does it: 1 GiB of pages, a quarter non-zero (every
/// fourth 2 MiB run), through `Writer::pages` with zero detection into a sink that discards,
/// against a plain read of every byte in the same run. Detection reads a zero page whole and a
/// data page only up to its first non-zero byte (the data is read again when the transport
/// copies it), so it can beat the plain read.
fn zero_detection(c: &mut Criterion) {
    // Written whole, so zero pages are real memory (not the kernel's shared zero page).
    let mut src = vec![1u8; TOTAL];
    for (run, chunk) in src.chunks_mut(2 << 20).enumerate() {
        if run % 4 == 0 {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = (i as u8) | 1;
            }
        } else {
            chunk.fill(0);
        }
    }
    let mut g = c.benchmark_group("zero_detection_1GiB_25pct");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .throughput(Throughput::Bytes(TOTAL as u64));
    g.bench_function("plain_read", |b| {
        // Every byte read once (OR-reduced, which the compiler vectorizes).
        b.iter(|| black_box(src.iter().fold(0u8, |a, &x| a | x)))
    });
    g.bench_function("writer_pages_zero_detection_no_checksums", |b| {
        b.iter(|| {
            let opts = WriterOptions {
                checksums: false,
                producer: "bench".into(),
                detect_zero_pages: true,
                max_record: (CHUNK + 64) as u32,
                ..WriterOptions::default()
            };
            let mut w = Writer::new(io::sink(), opts).unwrap();
            for (i, chunk) in src.chunks(CHUNK).enumerate() {
                w.pages((i * CHUNK) as u64, PAGE as u32, chunk).unwrap();
            }
            black_box(w.finish().unwrap());
        })
    });
    g.finish();
}

criterion_group!(benches, bench, zero_detection);
criterion_main!(benches);
