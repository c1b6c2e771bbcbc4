//! Writes a migration stream with `Writer` (compat data, guest pages with a zero run, device
//! state) and reads it back twice: with the incremental `Reader` over
//! `io::Read`, and with the sans-IO `Decoder` fed in small pieces, as bytes arrive from a
//! socket. Both must return the records written, byte for byte, and the End totals must match.
//!
//! `cargo run -p livemig-stream --example roundtrip`

use std::process::ExitCode;

use livemig_stream::{
    Compat, Decoder, DirtyCaps, Limits, Phase, Reader, Record, Writer, WriterOptions,
};

const PAGE: u32 = 4096;
const GPA: u64 = 0x10_0000;

/// What a reader saw, in order.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Compat(String),
    Pages { gpa: u64, count: u32, first: u8 },
    Zero { gpa: u64, count: u32 },
    Device { device: u32, data: Vec<u8> },
    Round(u32),
    End,
}

fn seen(rec: &Record<'_>) -> Option<Seen> {
    Some(match rec {
        Record::Compat(c) => Seen::Compat(c.identity.to_string()),
        Record::Pages(p) => Seen::Pages {
            gpa: p.gpa,
            count: p.count,
            first: p.payload[0],
        },
        Record::ZeroPages(z) => Seen::Zero {
            gpa: z.gpa,
            count: z.count,
        },
        Record::DeviceState(d) => Seen::Device {
            device: d.device,
            data: d.data.to_vec(),
        },
        Record::Round(r) => Seen::Round(r.round),
        Record::End(_) => Seen::End,
        _ => return None,
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("ok: Reader and Decoder returned every record written");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roundtrip example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Four pages: two with data, then two zero pages (sent as one ZeroPages record).
    let mut pages = vec![0u8; 4 * PAGE as usize];
    pages[..PAGE as usize].fill(0x11);
    pages[PAGE as usize..2 * PAGE as usize].fill(0x22);

    let mut w = Writer::new(Vec::new(), WriterOptions::default())?;
    w.compat(&Compat {
        device: 0,
        identity: "example-device",
        compat: &[0xcc; 16],
        page_size_mask: 0x1000,
        dirty_caps: DirtyCaps(DirtyCaps::IOMMU),
        migration_flags: 0b101,
    })?;
    let sent = w.pages(GPA, PAGE, &pages)?;
    w.device_state(0, Phase::StopCopy, b"device state bytes")?;
    let totals = w.totals();
    let bytes = w.finish()?;
    println!(
        "wrote {} bytes: {} data pages, {} zero pages",
        bytes.len(),
        sent.pages,
        sent.zero_pages
    );
    if (sent.pages, sent.zero_pages) != (2, 2) {
        return Err(format!("expected 2 data and 2 zero pages, the writer sent {sent:?}").into());
    }
    let expected = vec![
        Seen::Compat("example-device".into()),
        Seen::Pages {
            gpa: GPA,
            count: 2,
            first: 0x11,
        },
        Seen::Zero {
            gpa: GPA + 2 * u64::from(PAGE),
            count: 2,
        },
        Seen::Device {
            device: 0,
            data: b"device state bytes".to_vec(),
        },
        Seen::End,
    ];

    // 1. Reader over io::Read.
    let mut r = Reader::new(&bytes[..], Limits::default())?;
    let mut got = Vec::new();
    while let Some(rec) = r.next()? {
        got.extend(seen(&rec));
    }
    if got != expected {
        return Err(format!("Reader: expected {expected:?}, read {got:?}").into());
    }
    if r.totals() != totals {
        return Err(format!(
            "Reader: totals {:?} differ from the writer's {totals:?}",
            r.totals()
        )
        .into());
    }
    println!("Reader: {} records, totals match", got.len());

    // 2. Decoder fed 100 bytes at a time (a socket's reads), parsing records in place.
    let mut buf = Vec::new();
    let mut input = bytes.chunks(100);
    let mut dec = loop {
        match Decoder::start(&buf, Limits::default())? {
            Some(d) => break d,
            None => buf.extend_from_slice(input.next().ok_or("stream ended in its header")?),
        }
    };
    buf.drain(..livemig_stream::format::HEADER_LEN);
    let mut got = Vec::new();
    while !dec.finished() {
        match dec.record(&buf)? {
            Some((rec, used)) => {
                got.extend(seen(&rec));
                buf.drain(..used);
            }
            None => buf.extend_from_slice(input.next().ok_or("stream ended inside a record")?),
        }
    }
    if got != expected {
        return Err(format!("Decoder: expected {expected:?}, decoded {got:?}").into());
    }
    println!("Decoder: {} records from 100-byte pieces", got.len());

    // 3. A flipped byte is caught (the CRC32C), never returned as data.
    let mut bad = bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    let mut r = Reader::new(&bad[..], Limits::default())?;
    match r.validate_all() {
        Err(e) => println!("a flipped byte at {at}: refused ({e})"),
        Ok(_) => return Err(format!("a flipped byte at {at} was accepted").into()),
    }
    Ok(())
}
