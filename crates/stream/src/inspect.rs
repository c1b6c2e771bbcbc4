//! Inspecting streams: a human-readable dump and a JSON summary, for livemig streams, whole QEMU
//! migration files (`QEVM`) and QEMU VFIO device-section framing (detected from the first
//! bytes). A damaged stream is summarized up to the damage, and the error is part of the result.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::format;
use std::io::{self, Read};
use std::string::{String, ToString};
use std::vec::Vec;

use serde::Serialize;

use crate::format::{MAGIC, Phase, Record};
use crate::qemu;
use crate::qevm::{self, Content, QevmLimits, SectionKind};
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

/// One VFIO framing item of a QEMU section.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VfioItemSummary {
    /// Offset of its marker.
    pub offset: u64,
    /// `DEV_SETUP_STATE`, `DEV_DATA_STATE`, ...
    pub item: &'static str,
    /// Bytes of data or configuration vmstate.
    pub bytes: u64,
}

/// One section record of a QEMU migration file.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SectionSummary {
    /// Position among the section records.
    pub index: usize,
    /// `START`, `PART`, `END` or `FULL`.
    pub kind: &'static str,
    /// Section id.
    pub section_id: u32,
    /// idstr.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// Section version.
    pub version_id: u32,
    /// Offset of the type byte.
    pub offset: u64,
    /// Length through the footer.
    pub length: u64,
    /// What the body holds, in words.
    pub content: String,
    /// VFIO framing items (VFIO sections only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vfio_items: Vec<VfioItemSummary>,
}

/// A RAM block of a QEMU migration file.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RamBlockSummary {
    /// Block idstr.
    pub name: String,
    /// Bytes.
    pub used_length: u64,
    /// ZERO pages.
    pub zero_pages: u64,
    /// PAGE records.
    pub normal_pages: u64,
}

/// A QEMU_VM_COMMAND record.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CommandSummary {
    /// Offset of its type byte.
    pub offset: u64,
    /// Its name.
    pub command: &'static str,
    /// Data bytes.
    pub len: u16,
}

/// What a QEMU migration file (`QEVM`) holds.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct QevmSummary {
    /// File version.
    pub version: u32,
    /// Machine type of the configuration section.
    pub machine: Option<String>,
    /// Capabilities of the configuration section.
    pub capabilities: Vec<String>,
    /// Target page size.
    pub page_size: u64,
    /// Every section record.
    pub sections: Vec<SectionSummary>,
    /// Commands.
    pub commands: Vec<CommandSummary>,
    /// RAM blocks.
    pub ram_blocks: Vec<RamBlockSummary>,
    /// Offset of QEMU_VM_EOF.
    pub eof_offset: Option<u64>,
    /// Offset of the JSON description's QEMU_VM_VMDESCRIPTION byte.
    pub description_offset: Option<u64>,
    /// Length of the JSON description.
    pub description_length: Option<u64>,
    /// Devices the description describes.
    pub described_devices: u64,
}

/// What a stream holds.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// `livemig`, `qevm` or `qemu-vfio`.
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
    /// Sections, RAM blocks and description of a QEMU migration file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qevm: Option<QevmSummary>,
    /// A non-livemig input longer than the cap of [`inspect_with`]: only this many bytes were
    /// read and inspected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only_first: Option<u64>,
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

/// Inspects a stream from `input`: a livemig stream (read incrementally), a QEMU migration file
/// or QEMU VFIO framing (read whole, up to `limits.max_total`).
pub fn inspect<R: Read>(input: R, limits: Limits) -> io::Result<Inspection> {
    inspect_with(input, limits, limits.max_total)
}

/// [`inspect`], reading at most `max_whole` bytes of an input that must be read whole (a QEMU
/// migration file or VFIO framing; a livemig stream is read record by record and not capped
/// here). A longer input is inspected up to the cap, and the summary
/// ([`Summary::read_only_first`]) and the dump say so.
pub fn inspect_with<R: Read>(
    mut input: R,
    limits: Limits,
    max_whole: u64,
) -> io::Result<Inspection> {
    let mut first = [0u8; 8];
    let mut n = 0;
    while n < 8 {
        match input.read(&mut first[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let mut chained = io::Cursor::new(first[..n].to_vec()).chain(input);
    if n == 8 && first == MAGIC {
        Ok(inspect_livemig(chained, limits))
    } else {
        let mut all = Vec::new();
        (&mut chained).take(max_whole).read_to_end(&mut all)?;
        let longer = chained.read(&mut [0u8; 1])? > 0;
        let mut out = if qevm::looks_like_qevm(&all) {
            let ql = QevmLimits {
                max_vfio_chunk: limits.max_record,
                ..QevmLimits::default()
            };
            inspect_qevm(&all, ql)
        } else {
            inspect_qemu(&all, limits)
        };
        if longer {
            out.summary.read_only_first = Some(all.len() as u64);
            let _ = writeln!(
                out.dump,
                "note: only the first {} bytes were read; the input is longer (raise the cap to \
                 read more)",
                all.len()
            );
        }
        Ok(out)
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
            Record::Channel(c) => format!(
                "Channel {} of {} page channels token={}",
                c.index,
                c.count,
                hex(&c.token)
            ),
            Record::Sync(y) => format!("Sync round={}", y.round),
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

fn vfio_item(i: &qemu::Item<'_>) -> (&'static str, u64) {
    match i {
        qemu::Item::EndOfState => ("END_OF_STATE", 0),
        qemu::Item::SetupState => ("DEV_SETUP_STATE", 0),
        qemu::Item::Data(d) => ("DEV_DATA_STATE", d.len() as u64),
        qemu::Item::Config(c) => ("DEV_CONFIG_STATE", c.len() as u64),
        qemu::Item::InitDataSent => ("DEV_INIT_DATA_SENT", 0),
        qemu::Item::ConfigLoadReady => ("DEV_CONFIG_LOAD_READY", 0),
    }
}

fn section_content(s: &qevm::Section<'_>) -> String {
    match &s.content {
        Content::Ram(r) => {
            let mut t = String::new();
            if let Some(m) = r.mem_size {
                let _ = write!(
                    t,
                    "RAM block list, {m} bytes in {} blocks; ",
                    r.blocks_listed
                );
            }
            let _ = write!(t, "{} zero pages, {} pages", r.zero_pages, r.normal_pages);
            if r.flushes > 0 {
                let _ = write!(t, ", {} multifd flushes", r.flushes);
            }
            t
        }
        Content::Vfio { items, config } => {
            let data: u64 = items
                .iter()
                .filter_map(|i| match i.item {
                    qemu::Item::Data(d) => Some(d.len() as u64),
                    _ => None,
                })
                .sum();
            let mut t = format!("VFIO, {} items, {data} bytes of device state", items.len());
            if let Some(c) = config {
                let (v, d) = c.ids();
                let _ = write!(
                    t,
                    "; PCI config {} bytes, {v:04x}:{d:04x}, MSI-X vectors {}",
                    c.config.len(),
                    c.msix_vectors().unwrap_or(0)
                );
            }
            t
        }
        Content::Vmstate {
            vmsd_name,
            fields,
            subsections,
        } => match vmsd_name {
            Some(n) => format!("vmstate {n:?}, {fields} fields, {subsections} subsections"),
            None => format!("legacy state, {fields} fields"),
        },
    }
}

fn inspect_qevm(data: &[u8], limits: QevmLimits) -> Inspection {
    let (file, err) = qevm::read_partial(data, limits);
    let mut out = Inspection::default();
    let s = &mut out.summary;
    s.format = "qevm";
    let mut q = QevmSummary {
        version: file.version,
        page_size: file.page_size,
        eof_offset: file.eof_offset,
        ..Default::default()
    };
    let _ = writeln!(
        out.dump,
        "QEMU migration file (QEVM version {}), {} bytes, page size {}",
        file.version,
        data.len(),
        file.page_size
    );
    if let Some(c) = &file.configuration {
        q.machine = Some(c.machine.to_string());
        q.capabilities = c.capabilities.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            out.dump,
            "configuration @{}+{}: machine {:?}, capabilities {:?}",
            c.offset, c.length, c.machine, c.capabilities
        );
    }
    let mut commands = file.commands.iter().peekable();
    let mut devices: Vec<DeviceSummary> = Vec::new();
    for sec in &file.sections {
        while let Some(c) = commands.next_if(|c| c.offset < sec.offset) {
            let _ = writeln!(
                out.dump,
                "command @{}: {} ({} bytes)",
                c.offset,
                c.name(),
                c.len
            );
        }
        let content = section_content(sec);
        let _ = writeln!(
            out.dump,
            "section {} @{}+{}: {} id={} {:?} instance={} version={}: {content}",
            sec.index,
            sec.offset,
            sec.length,
            sec.kind.name(),
            sec.section_id,
            sec.idstr,
            sec.instance_id,
            sec.version_id
        );
        let mut vfio_items = Vec::new();
        if let Content::Vfio { items, .. } = &sec.content {
            let dev = match devices.iter().position(|d| d.identity == sec.idstr) {
                Some(i) => &mut devices[i],
                None => {
                    devices.push(DeviceSummary {
                        device: devices.len() as u32,
                        identity: sec.idstr.to_string(),
                        ..Default::default()
                    });
                    let last = devices.len() - 1;
                    &mut devices[last]
                }
            };
            for i in items {
                let (name, bytes) = vfio_item(&i.item);
                let _ = writeln!(out.dump, "  item @{}: {name} {bytes} bytes", i.offset);
                if let qemu::Item::Data(d) = i.item {
                    dev.chunks += 1;
                    let n = d.len() as u64;
                    match sec.kind {
                        SectionKind::Part => dev.precopy_bytes += n,
                        SectionKind::End => dev.stopcopy_bytes += n,
                        SectionKind::Start | SectionKind::Full => dev.unspecified_bytes += n,
                    }
                }
                vfio_items.push(VfioItemSummary {
                    offset: i.offset,
                    item: name,
                    bytes,
                });
            }
        }
        if sec.kind == SectionKind::Start && sec.idstr == "ram" {
            for b in &file.ram_blocks {
                let _ = writeln!(
                    out.dump,
                    "  RAM block {:?} @{}: {} bytes",
                    b.name, b.offset, b.used_length
                );
            }
        }
        q.sections.push(SectionSummary {
            index: sec.index,
            kind: sec.kind.name(),
            section_id: sec.section_id,
            idstr: sec.idstr.to_string(),
            instance_id: sec.instance_id,
            version_id: sec.version_id,
            offset: sec.offset,
            length: sec.length,
            content,
            vfio_items,
        });
    }
    for c in commands {
        let _ = writeln!(
            out.dump,
            "command @{}: {} ({} bytes)",
            c.offset,
            c.name(),
            c.len
        );
    }
    q.commands = file
        .commands
        .iter()
        .map(|c| CommandSummary {
            offset: c.offset,
            command: c.name(),
            len: c.len,
        })
        .collect();
    for b in &file.ram_blocks {
        let _ = writeln!(
            out.dump,
            "RAM block {:?}: {} zero pages, {} pages",
            b.name, b.zero_pages, b.normal_pages
        );
        q.ram_blocks.push(RamBlockSummary {
            name: b.name.to_string(),
            used_length: b.used_length,
            zero_pages: b.zero_pages,
            normal_pages: b.normal_pages,
        });
    }
    if let Some(e) = file.eof_offset {
        let _ = writeln!(out.dump, "EOF @{e}");
    }
    if let Some(d) = &file.description {
        q.description_offset = Some(d.offset);
        q.description_length = Some(d.json_length);
        q.described_devices = d.devices().len() as u64;
        let _ = writeln!(
            out.dump,
            "description @{}: {} bytes of JSON, {} devices",
            d.offset, d.json_length, q.described_devices
        );
    }
    let (zero, normal) = file.ram_pages();
    s.zero_pages = zero;
    s.pages = normal;
    s.page_bytes = normal * file.page_size;
    s.records = file.sections.len() as u64;
    s.devices = devices;
    match err {
        None => s.valid = true,
        Some(e) => {
            let _ = writeln!(out.dump, "error: {e}");
            s.error = Some(e.to_string());
        }
    }
    s.qevm = Some(q);
    out
}
