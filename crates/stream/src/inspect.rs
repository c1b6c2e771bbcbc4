//! Inspecting streams: a human-readable dump and a JSON summary, for livemig streams and for
//! QEMU VFIO device-section framing (detected from the first bytes). A damaged stream is
//! summarized up to the damage, and the error is part of the result.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::format;
use std::io::{self, Read};
use std::string::{String, ToString};
use std::vec::Vec;

use serde::Serialize;

use crate::format::{MAGIC, Phase, Record};
use crate::qemu;
use crate::read::Reader;
use crate::validate::Limits;

/// One device's part of a stream.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Device index.
    pub device: u32,
    /// Identity string.
    pub identity: String,
    /// Compatibility block, hex.
    pub compat: String,
    /// IOMMU page sizes (bit n = 2^n bytes).
    pub page_size_mask: u64,
    /// Dirty-tracking capabilities.
    pub dirty_caps: Vec<&'static str>,
    /// VFIO migration flags.
    pub migration_flags: Vec<&'static str>,
    /// DeviceState chunks.
    pub chunks: u64,
    /// PRE_COPY bytes.
    pub precopy_bytes: u64,
    /// STOP_COPY bytes.
    pub stopcopy_bytes: u64,
    /// Bytes of unspecified phase.
    pub unspecified_bytes: u64,
}

/// Totals of the End record.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EndSummary {
    /// Records before End.
    pub records: u32,
    /// Bytes before End.
    pub stream_bytes: u64,
    /// Pages.
    pub pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Device bytes.
    pub device_bytes: u64,
    /// Digest, hex.
    pub digest: String,
}

/// What a stream holds.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// `livemig` or `qemu-vfio`.
    pub format: &'static str,
    /// `major.minor` (livemig streams).
    pub version: Option<String>,
    /// Producer (livemig streams).
    pub producer: Option<String>,
    /// Whether records carry checksums (livemig streams).
    pub checksums: Option<bool>,
    /// Records (or QEMU items) read.
    pub records: u64,
    /// Devices.
    pub devices: Vec<DeviceSummary>,
    /// Pages with payload.
    pub pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Payload bytes of Pages records.
    pub page_bytes: u64,
    /// Pre-copy rounds.
    pub rounds: u64,
    /// DirtyBitmap records.
    pub dirty_bitmaps: u64,
    /// Optional records of unknown types that were skipped.
    pub skipped: u64,
    /// The End record.
    pub end: Option<EndSummary>,
    /// The whole stream was read and every check passed.
    pub valid: bool,
    /// The first error, if any.
    pub error: Option<String>,
}

impl Summary {
    /// The summary as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// A dump and a summary.
#[derive(Debug, Clone, Default)]
pub struct Inspection {
    /// One line per record.
    pub dump: String,
    /// The summary.
    pub summary: Summary,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn flag_names(bits: u32, names: &[(u32, &'static str)]) -> Vec<&'static str> {
    names
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Inspects a stream from `input`: a livemig stream (read incrementally) or QEMU VFIO framing
/// (read whole, up to `limits.max_total`).
pub fn inspect<R: Read>(mut input: R, limits: Limits) -> io::Result<Inspection> {
    let mut first = [0u8; 8];
    let mut n = 0;
    while n < 8 {
        match input.read(&mut first[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let chained = io::Cursor::new(first[..n].to_vec()).chain(input);
    if n == 8 && first == MAGIC {
        Ok(inspect_livemig(chained, limits))
    } else {
        let mut all = Vec::new();
        chained.take(limits.max_total).read_to_end(&mut all)?;
        Ok(inspect_qemu(&all, limits))
    }
}

fn inspect_livemig<R: Read>(input: R, limits: Limits) -> Inspection {
    let mut out = Inspection::default();
    let s = &mut out.summary;
    s.format = "livemig";
    let mut rd = match Reader::new(input, limits) {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(e.to_string());
            let _ = writeln!(out.dump, "error: {e}");
            return out;
        }
    };
    let h = rd.header().clone();
    s.version = Some(format!("{}.{}", h.major, h.minor));
    s.producer = Some(h.producer.clone());
    s.checksums = Some(h.checksums());
    let _ = writeln!(
        out.dump,
        "livemig stream {}.{} from {:?}, checksums {}",
        h.major,
        h.minor,
        h.producer,
        if h.checksums() { "on" } else { "off" }
    );
    let mut devices: BTreeMap<u32, DeviceSummary> = BTreeMap::new();
    let mut index = 0u64;
    loop {
        let at = rd.offset();
        let rec = match rd.next() {
            Ok(Some(r)) => r,
            Ok(None) => {
                s.valid = true;
                break;
            }
            Err(e) => {
                let _ = writeln!(out.dump, "error: {e}");
                s.error = Some(e.to_string());
                break;
            }
        };
        let line = match &rec {
            Record::Compat(c) => {
                devices.insert(
                    c.device,
                    DeviceSummary {
                        device: c.device,
                        identity: c.identity.to_string(),
                        compat: hex(c.compat),
                        page_size_mask: c.page_size_mask,
                        dirty_caps: flag_names(c.dirty_caps.0, &[(1, "iommu"), (2, "device")]),
                        migration_flags: flag_names(
                            c.migration_flags,
                            &[(1, "STOP_COPY"), (2, "P2P"), (4, "PRE_COPY")],
                        ),
                        ..Default::default()
                    },
                );
                format!(
                    "Compat device={} identity={:?} compat={} bytes page_size_mask={:#x} dirty_caps={:#x} migration_flags={:#x}",
                    c.device,
                    c.identity,
                    c.compat.len(),
                    c.page_size_mask,
                    c.dirty_caps.0,
                    c.migration_flags
                )
            }
            Record::DeviceState(d) => {
                if let Some(dev) = devices.get_mut(&d.device) {
                    dev.chunks += 1;
                    let n = d.data.len() as u64;
                    match d.phase {
                        Phase::PreCopy => dev.precopy_bytes += n,
                        Phase::StopCopy => dev.stopcopy_bytes += n,
                        Phase::Unspecified => dev.unspecified_bytes += n,
                    }
                }
                format!(
                    "DeviceState device={} phase={:?} chunk={} bytes={}",
                    d.device,
                    d.phase,
                    d.chunk,
                    d.data.len()
                )
            }
            Record::Pages(p) => {
                s.pages += u64::from(p.count);
                s.page_bytes += p.payload.len() as u64;
                format!(
                    "Pages gpa={:#x} page_size={} count={}",
                    p.gpa, p.page_size, p.count
                )
            }
            Record::ZeroPages(z) => {
                s.zero_pages += u64::from(z.count);
                format!(
                    "ZeroPages gpa={:#x} page_size={} count={}",
                    z.gpa, z.page_size, z.count
                )
            }
            Record::DirtyBitmap(b) => {
                s.dirty_bitmaps += 1;
                format!(
                    "DirtyBitmap iova={:#x} span={:#x} page_size={} dirty={}",
                    b.iova,
                    b.span,
                    b.page_size,
                    b.count()
                )
            }
            Record::Round(r) => {
                s.rounds += 1;
                format!(
                    "Round {} pages={} zero_pages={} dirty={} device_bytes={} stream_bytes={} elapsed_us={}",
                    r.round,
                    r.pages,
                    r.zero_pages,
                    r.dirty_pages,
                    r.device_bytes,
                    r.stream_bytes,
                    r.elapsed_us
                )
            }
            Record::End(e) => {
                s.end = Some(EndSummary {
                    records: e.records,
                    stream_bytes: e.stream_bytes,
                    pages: e.pages,
                    zero_pages: e.zero_pages,
                    device_bytes: e.device_bytes,
                    digest: format!("{:08x}", e.digest),
                });
                format!(
                    "End records={} stream_bytes={} pages={} zero_pages={} device_bytes={} digest={:08x}",
                    e.records, e.stream_bytes, e.pages, e.zero_pages, e.device_bytes, e.digest
                )
            }
            Record::Skipped { tag, length } => {
                s.skipped += 1;
                format!("(optional record type {tag}, {length} bytes, skipped)")
            }
        };
        let _ = writeln!(out.dump, "record {index} @{at}: {line}");
        index += 1;
    }
    s.records = index;
    s.devices = devices.into_values().collect();
    out
}

fn inspect_qemu(data: &[u8], limits: Limits) -> Inspection {
    let mut out = Inspection::default();
    let s = &mut out.summary;
    s.format = "qemu-vfio";
    let _ = writeln!(
        out.dump,
        "QEMU VFIO device-section framing, {} bytes",
        data.len()
    );
    let mut dev = DeviceSummary {
        identity: "(from QEMU VFIO framing)".into(),
        ..Default::default()
    };
    let mut parser = qemu::Parser::new(data, limits.max_record);
    loop {
        let at = parser.offset();
        let Some(item) = parser.next() else {
            s.valid = true;
            break;
        };
        let line = match item {
            Ok(qemu::Item::Data(d)) => {
                dev.chunks += 1;
                dev.unspecified_bytes += d.len() as u64;
                format!("DEV_DATA_STATE {} bytes", d.len())
            }
            Ok(qemu::Item::Config(c)) => match qemu::PciConfigState::parse(c) {
                Ok(st) => {
                    let (v, d) = st.ids();
                    format!(
                        "DEV_CONFIG_STATE {} bytes (PCI config {} bytes, {v:04x}:{d:04x}, MSI-X vectors {})",
                        c.len(),
                        st.config.len(),
                        st.msix_vectors().unwrap_or(0)
                    )
                }
                Err(_) => format!("DEV_CONFIG_STATE {} bytes", c.len()),
            },
            Ok(qemu::Item::EndOfState) => "END_OF_STATE".into(),
            Ok(qemu::Item::SetupState) => "DEV_SETUP_STATE".into(),
            Ok(qemu::Item::InitDataSent) => "DEV_INIT_DATA_SENT".into(),
            Ok(qemu::Item::ConfigLoadReady) => "DEV_CONFIG_LOAD_READY".into(),
            Err(e) => {
                let _ = writeln!(out.dump, "error: {e}");
                s.error = Some(e.to_string());
                break;
            }
        };
        let _ = writeln!(out.dump, "item {} @{at}: {line}", s.records);
        s.records += 1;
    }
    s.devices = std::vec![dev];
    out
}
