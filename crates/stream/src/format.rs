//! The wire format (see `FORMAT.md`): constants, the stream and record headers, and each record
//! type's fixed layout, encoded and decoded with explicit little-endian fields.

use alloc::string::String;
use alloc::vec::Vec;

use crate::crc;
use crate::error::ErrorKind;

/// Stream magic.
pub const MAGIC: [u8; 8] = *b"LMIGSTRM";
/// Format major version written and read.
pub const VERSION_MAJOR: u16 = 1;
/// Format minor version written by default.
pub const VERSION_MINOR: u16 = 0;
/// A stream of this minor version or later comes from a source that reads round
/// acknowledgements on its return path (the stream's records are those of 1.0, plus Channel
/// and Sync where the migration uses page channels).
pub const MINOR_ROUND_ACKS: u16 = 1;
/// A stream of this minor version or later comes from a source that also reads the
/// destination's `Undecided` answer on its return path (the records are those of 1.1).
pub const MINOR_UNDECIDED: u16 = 2;
/// Stream header length.
pub const HEADER_LEN: usize = 48;
/// Record header length.
pub const RECORD_HEADER_LEN: usize = 16;
/// Producer field length.
pub const PRODUCER_LEN: usize = 24;
/// Stream flag: records carry CRC32Cs, End carries a digest.
pub const FLAG_CRC: u32 = 1;
/// Record flag: a reader that does not know the tag may skip the record.
pub const RFLAG_OPTIONAL: u16 = 1;
/// Smallest page size in Pages, ZeroPages and DirtyBitmap records.
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest page size.
pub const MAX_PAGE_SIZE: u32 = 1 << 30;

/// Record types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Tag {
    /// Device identity and compatibility data.
    Compat = 1,
    /// A chunk of VFIO device state.
    DeviceState = 2,
    /// Guest pages with payload.
    Pages = 3,
    /// Guest pages that are all zero.
    ZeroPages = 4,
    /// A dirty bitmap (optional).
    DirtyBitmap = 5,
    /// Pre-copy round statistics (optional).
    Round = 6,
    /// Totals and digest; the last record.
    End = 7,
    /// Which connection of a multi-channel migration this stream is; the first record.
    Channel = 8,
    /// A page channel's end of a round (the destination's ordering barrier).
    Sync = 9,
}

impl Tag {
    /// The record type's name.
    pub fn name(self) -> &'static str {
        match self {
            Tag::Compat => "Compat",
            Tag::DeviceState => "DeviceState",
            Tag::Pages => "Pages",
            Tag::ZeroPages => "ZeroPages",
            Tag::DirtyBitmap => "DirtyBitmap",
            Tag::Round => "Round",
            Tag::End => "End",
            Tag::Channel => "Channel",
            Tag::Sync => "Sync",
        }
    }
}

impl TryFrom<u16> for Tag {
    type Error = u16;
    /// Unknown values (including 0) are returned as the error.
    fn try_from(v: u16) -> Result<Tag, u16> {
        Ok(match v {
            1 => Tag::Compat,
            2 => Tag::DeviceState,
            3 => Tag::Pages,
            4 => Tag::ZeroPages,
            5 => Tag::DirtyBitmap,
            6 => Tag::Round,
            7 => Tag::End,
            8 => Tag::Channel,
            9 => Tag::Sync,
            other => return Err(other),
        })
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// `FLAG_*`.
    pub flags: u32,
    /// Who wrote the stream.
    pub producer: String,
}

impl StreamHeader {
    /// A version-1 header.
    pub fn new(checksums: bool, producer: &str) -> StreamHeader {
        StreamHeader {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            flags: if checksums { FLAG_CRC } else { 0 },
            producer: producer.into(),
        }
    }

    /// Whether records carry checksums.
    pub fn checksums(&self) -> bool {
        self.flags & FLAG_CRC != 0
    }

    /// Encodes; the producer is truncated to 24 bytes on a character boundary.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&self.major.to_le_bytes());
        h[10..12].copy_from_slice(&self.minor.to_le_bytes());
        h[12..16].copy_from_slice(&self.flags.to_le_bytes());
        let mut n = self.producer.len().min(PRODUCER_LEN);
        while !self.producer.is_char_boundary(n) {
            n -= 1;
        }
        h[16..16 + n].copy_from_slice(&self.producer.as_bytes()[..n]);
        let crc = crc::crc32c(&h[..44]);
        h[44..48].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and validates (magic, CRC, version, flags, producer, reserved).
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<StreamHeader, ErrorKind> {
        if h[..8] != MAGIC {
            return Err(ErrorKind::BadMagic);
        }
        if crc::crc32c(&h[..44]) != u32_at(h, 44) {
            return Err(ErrorKind::HeaderChecksum);
        }
        let (major, minor) = (u16_at(h, 8), u16_at(h, 10));
        if major != VERSION_MAJOR {
            return Err(ErrorKind::UnsupportedVersion { major, minor });
        }
        let flags = u32_at(h, 12);
        if flags & !FLAG_CRC != 0 {
            return Err(ErrorKind::UnknownStreamFlags(flags & !FLAG_CRC));
        }
        let field = &h[16..16 + PRODUCER_LEN];
        let end = field.iter().position(|&b| b == 0).unwrap_or(PRODUCER_LEN);
        if field[end..].iter().any(|&b| b != 0) {
            return Err(ErrorKind::BadProducer);
        }
        let producer = core::str::from_utf8(&field[..end])
            .map_err(|_| ErrorKind::BadProducer)?
            .into();
        if u32_at(h, 40) != 0 {
            return Err(ErrorKind::Reserved("header reserved"));
        }
        Ok(StreamHeader {
            major,
            minor,
            flags,
            producer,
        })
    }
}

/// A record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Record type (raw; may be unknown).
    pub tag: u16,
    /// `RFLAG_*`.
    pub flags: u16,
    /// Body length.
    pub length: u32,
    /// Record index.
    pub seq: u32,
    /// CRC32C over bytes 0..12 and the body, or 0.
    pub crc: u32,
}

impl RecordHeader {
    /// Encodes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..2].copy_from_slice(&self.tag.to_le_bytes());
        h[2..4].copy_from_slice(&self.flags.to_le_bytes());
        h[4..8].copy_from_slice(&self.length.to_le_bytes());
        h[8..12].copy_from_slice(&self.seq.to_le_bytes());
        h[12..16].copy_from_slice(&self.crc.to_le_bytes());
        h
    }

    /// Decodes (no validation).
    pub fn decode(h: &[u8; RECORD_HEADER_LEN]) -> RecordHeader {
        RecordHeader {
            tag: u16_at(h, 0),
            flags: u16_at(h, 2),
            length: u32_at(h, 4),
            seq: u32_at(h, 8),
            crc: u32_at(h, 12),
        }
    }

    /// The CRC32C the record should carry for `body` (the pieces in order).
    pub fn compute_crc(&self, body: &[&[u8]]) -> u32 {
        let mut c = crc::Crc32c::new();
        c.update(&self.encode()[..12]);
        for part in body {
            c.update(part);
        }
        c.finish()
    }
}

/// How the source's IOMMU/device can track dirty pages (`Compat.dirty_caps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirtyCaps(pub u32);

impl DirtyCaps {
    /// IOMMU hardware dirty tracking.
    pub const IOMMU: u32 = 1 << 0;
    /// Device DMA logging.
    pub const DEVICE: u32 = 1 << 1;

    /// IOMMU hardware dirty tracking available.
    pub fn iommu(self) -> bool {
        self.0 & Self::IOMMU != 0
    }
    /// Device DMA logging available.
    pub fn device(self) -> bool {
        self.0 & Self::DEVICE != 0
    }
}

/// Compat: device identity and compatibility data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compat<'a> {
    /// Device index.
    pub device: u32,
    /// Identity, e.g. `19e5:a256 hisi_acc_vfio_pci`.
    pub identity: &'a str,
    /// Opaque compatibility block.
    pub compat: &'a [u8],
    /// IOMMU page sizes in use (bit n = 2^n bytes).
    pub page_size_mask: u64,
    /// Dirty-tracking capabilities.
    pub dirty_caps: DirtyCaps,
    /// VFIO migration flags.
    pub migration_flags: u32,
}

/// Device-state phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// Read in PRE_COPY.
    PreCopy = 1,
    /// Read in STOP_COPY.
    StopCopy = 2,
    /// Imported from a format that does not say.
    Unspecified = 3,
}

impl TryFrom<u8> for Phase {
    type Error = u8;
    fn try_from(v: u8) -> Result<Phase, u8> {
        match v {
            1 => Ok(Phase::PreCopy),
            2 => Ok(Phase::StopCopy),
            3 => Ok(Phase::Unspecified),
            other => Err(other),
        }
    }
}

/// DeviceState: a chunk of VFIO data-fd bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// Device index.
    pub device: u32,
    /// Phase the bytes were read in.
    pub phase: Phase,
    /// Per-device chunk number.
    pub chunk: u32,
    /// The bytes.
    pub data: &'a [u8],
}

/// Pages: guest pages with payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pages<'a> {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Bytes per page.
    pub page_size: u32,
    /// Number of pages.
    pub count: u32,
    /// `count * page_size` bytes.
    pub payload: &'a [u8],
}

/// ZeroPages: guest pages that are all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroPages {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Bytes per page.
    pub page_size: u32,
    /// Number of pages.
    pub count: u32,
}

/// DirtyBitmap: a dirty bitmap in the kernel's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap<'a> {
    /// IOVA of bit 0.
    pub iova: u64,
    /// Bytes covered.
    pub span: u64,
    /// Bytes per bit.
    pub page_size: u32,
    /// The words, 8 little-endian bytes each.
    pub words_le: &'a [u8],
}

impl DirtyBitmap<'_> {
    /// The words.
    pub fn words(&self) -> impl Iterator<Item = u64> + '_ {
        self.words_le.chunks_exact(8).map(|w| u64_at(w, 0))
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Round: pre-copy iteration statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Round {
    /// Round number (0 = the first, full pass).
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Zero pages sent.
    pub zero_pages: u64,
    /// Pages found dirty.
    pub dirty_pages: u64,
    /// Device bytes sent.
    pub device_bytes: u64,
    /// Stream bytes written in the round.
    pub stream_bytes: u64,
    /// Elapsed microseconds.
    pub elapsed_us: u64,
}

/// End: totals and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct End {
    /// Records before End.
    pub records: u32,
    /// Bytes before End's record header.
    pub stream_bytes: u64,
    /// Pages in Pages records.
    pub pages: u64,
    /// Pages in ZeroPages records.
    pub zero_pages: u64,
    /// DeviceState data bytes.
    pub device_bytes: u64,
    /// Digest over the header CRC and the record CRCs (0 without checksums).
    pub digest: u32,
}

/// Channel: which connection of a multi-channel migration a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Channel {
    /// 0 for the main channel (compat, device state, rounds), 1..=`count` for page channels.
    pub index: u32,
    /// How many page channels the migration uses (≥ 1).
    pub count: u32,
    /// Chosen by the source for the migration, the same on every channel, so a destination
    /// pairs the connections of one migration (not an authentication).
    pub token: [u8; 16],
}

/// Sync: a page channel has sent everything of a round; the destination applies none of this
/// channel's later pages until every page channel has reached the same Sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sync {
    /// The round that ended (1-based, as in the engine's reports).
    pub round: u32,
}

/// One decoded record, borrowing variable-length parts from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// See [`Compat`].
    Compat(Compat<'a>),
    /// See [`DeviceState`].
    DeviceState(DeviceState<'a>),
    /// See [`Pages`].
    Pages(Pages<'a>),
    /// See [`ZeroPages`].
    ZeroPages(ZeroPages),
    /// See [`DirtyBitmap`].
    DirtyBitmap(DirtyBitmap<'a>),
    /// See [`Round`].
    Round(Round),
    /// See [`End`].
    End(End),
    /// See [`Channel`].
    Channel(Channel),
    /// See [`Sync`].
    Sync(Sync),
    /// An optional record of a type this reader does not know, skipped after its checks.
    Skipped {
        /// Its tag.
        tag: u16,
        /// Its body length.
        length: u32,
    },
}

impl Record<'_> {
    /// The record type's name.
    pub fn name(&self) -> &'static str {
        match self {
            Record::Compat(_) => "Compat",
            Record::DeviceState(_) => "DeviceState",
            Record::Pages(_) => "Pages",
            Record::ZeroPages(_) => "ZeroPages",
            Record::DirtyBitmap(_) => "DirtyBitmap",
            Record::Round(_) => "Round",
            Record::End(_) => "End",
            Record::Channel(_) => "Channel",
            Record::Sync(_) => "Sync",
            Record::Skipped { .. } => "(skipped)",
        }
    }
}

/// Fixed part sizes.
pub const COMPAT_FIXED: usize = 32;
/// DeviceState fixed part.
pub const DEVICE_STATE_FIXED: usize = 16;
/// Pages fixed part.
pub const PAGES_FIXED: usize = 16;
/// ZeroPages body.
pub const ZERO_PAGES_LEN: usize = 16;
/// DirtyBitmap fixed part.
pub const DIRTY_BITMAP_FIXED: usize = 24;
/// Round body.
pub const ROUND_LEN: usize = 56;
/// End body.
pub const END_LEN: usize = 48;
/// Channel body.
pub const CHANNEL_LEN: usize = 32;
/// Sync body.
pub const SYNC_LEN: usize = 8;

fn exact(record: &'static str, body: &[u8], expected: u64) -> Result<(), ErrorKind> {
    if body.len() as u64 != expected {
        return Err(ErrorKind::BodyLength {
            record,
            expected,
            got: body.len() as u64,
        });
    }
    Ok(())
}

fn at_least(record: &'static str, body: &[u8], min: usize) -> Result<(), ErrorKind> {
    if body.len() < min {
        return Err(ErrorKind::BodyLength {
            record,
            expected: min as u64,
            got: body.len() as u64,
        });
    }
    Ok(())
}

fn zero(field: &'static str, bytes: &[u8]) -> Result<(), ErrorKind> {
    if bytes.iter().any(|&b| b != 0) {
        return Err(ErrorKind::Reserved(field));
    }
    Ok(())
}

fn check_pages(gpa: u64, page_size: u32, count: u32) -> Result<u64, ErrorKind> {
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(ErrorKind::InvalidField {
            field: "page_size",
            value: u64::from(page_size),
        });
    }
    if !gpa.is_multiple_of(u64::from(page_size)) {
        return Err(ErrorKind::InvalidField {
            field: "gpa (not page aligned)",
            value: gpa,
        });
    }
    if count == 0 {
        return Err(ErrorKind::InvalidField {
            field: "count",
            value: 0,
        });
    }
    let bytes = u64::from(count) * u64::from(page_size);
    if gpa.checked_add(bytes - 1).is_none() {
        return Err(ErrorKind::InvalidField {
            field: "gpa + count * page_size (overflows)",
            value: gpa,
        });
    }
    Ok(bytes)
}

/// Decodes and checks a body by tag. Optional unknown types decode to [`Record::Skipped`].
pub fn decode(tag: u16, flags: u16, body: &[u8]) -> Result<Record<'_>, ErrorKind> {
    let tag = match Tag::try_from(tag) {
        Ok(t) => t,
        Err(0) => return Err(ErrorKind::ZeroTag),
        Err(other) if flags & RFLAG_OPTIONAL != 0 => {
            return Ok(Record::Skipped {
                tag: other,
                length: body.len() as u32,
            });
        }
        Err(other) => return Err(ErrorKind::UnknownRecord(other)),
    };
    let name = tag.name();
    Ok(match tag {
        Tag::Compat => {
            at_least(name, body, COMPAT_FIXED)?;
            let id_len = usize::from(u16_at(body, 4));
            let compat_len = usize::from(u16_at(body, 6));
            exact(name, body, (COMPAT_FIXED + id_len + compat_len) as u64)?;
            let page_size_mask = u64_at(body, 8);
            if page_size_mask == 0 {
                return Err(ErrorKind::InvalidField {
                    field: "page_size_mask",
                    value: 0,
                });
            }
            let caps = u32_at(body, 16);
            if caps & !(DirtyCaps::IOMMU | DirtyCaps::DEVICE) != 0 {
                return Err(ErrorKind::Reserved("Compat dirty_caps"));
            }
            zero("Compat reserved", &body[24..32])?;
            let id = &body[COMPAT_FIXED..COMPAT_FIXED + id_len];
            Record::Compat(Compat {
                device: u32_at(body, 0),
                identity: core::str::from_utf8(id).map_err(|_| ErrorKind::BadText("identity"))?,
                compat: &body[COMPAT_FIXED + id_len..],
                page_size_mask,
                dirty_caps: DirtyCaps(caps),
                migration_flags: u32_at(body, 20),
            })
        }
        Tag::DeviceState => {
            at_least(name, body, DEVICE_STATE_FIXED)?;
            let phase = Phase::try_from(body[4]).map_err(|v| ErrorKind::InvalidField {
                field: "phase",
                value: u64::from(v),
            })?;
            zero("DeviceState reserved", &body[5..8])?;
            zero("DeviceState reserved", &body[12..16])?;
            Record::DeviceState(DeviceState {
                device: u32_at(body, 0),
                phase,
                chunk: u32_at(body, 8),
                data: &body[DEVICE_STATE_FIXED..],
            })
        }
        Tag::Pages => {
            at_least(name, body, PAGES_FIXED)?;
            let (gpa, page_size, count) = (u64_at(body, 0), u32_at(body, 8), u32_at(body, 12));
            let bytes = check_pages(gpa, page_size, count)?;
            exact(name, body, PAGES_FIXED as u64 + bytes)?;
            Record::Pages(Pages {
                gpa,
                page_size,
                count,
                payload: &body[PAGES_FIXED..],
            })
        }
        Tag::ZeroPages => {
            exact(name, body, ZERO_PAGES_LEN as u64)?;
            let (gpa, page_size, count) = (u64_at(body, 0), u32_at(body, 8), u32_at(body, 12));
            check_pages(gpa, page_size, count)?;
            Record::ZeroPages(ZeroPages {
                gpa,
                page_size,
                count,
            })
        }
        Tag::DirtyBitmap => {
            at_least(name, body, DIRTY_BITMAP_FIXED)?;
            let (iova, span, page_size) = (u64_at(body, 0), u64_at(body, 8), u32_at(body, 16));
            zero("DirtyBitmap reserved", &body[20..24])?;
            if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
            {
                return Err(ErrorKind::InvalidField {
                    field: "page_size",
                    value: u64::from(page_size),
                });
            }
            let ps = u64::from(page_size);
            if span == 0 || span % ps != 0 || iova % ps != 0 || iova.checked_add(span - 1).is_none()
            {
                return Err(ErrorKind::InvalidField {
                    field: "iova/span",
                    value: span,
                });
            }
            let pages = span / ps;
            let words = pages.div_ceil(64);
            exact(name, body, DIRTY_BITMAP_FIXED as u64 + words * 8)?;
            let words_le = &body[DIRTY_BITMAP_FIXED..];
            let used = pages % 64;
            if used != 0 && u64_at(words_le, words_le.len() - 8) >> used != 0 {
                return Err(ErrorKind::InvalidField {
                    field: "bitmap bits past the last page",
                    value: used,
                });
            }
            Record::DirtyBitmap(DirtyBitmap {
                iova,
                span,
                page_size,
                words_le,
            })
        }
        Tag::Round => {
            exact(name, body, ROUND_LEN as u64)?;
            zero("Round reserved", &body[4..8])?;
            Record::Round(Round {
                round: u32_at(body, 0),
                pages: u64_at(body, 8),
                zero_pages: u64_at(body, 16),
                dirty_pages: u64_at(body, 24),
                device_bytes: u64_at(body, 32),
                stream_bytes: u64_at(body, 40),
                elapsed_us: u64_at(body, 48),
            })
        }
        Tag::End => {
            exact(name, body, END_LEN as u64)?;
            zero("End reserved", &body[4..8])?;
            zero("End reserved", &body[44..48])?;
            Record::End(End {
                records: u32_at(body, 0),
                stream_bytes: u64_at(body, 8),
                pages: u64_at(body, 16),
                zero_pages: u64_at(body, 24),
                device_bytes: u64_at(body, 32),
                digest: u32_at(body, 40),
            })
        }
        Tag::Channel => {
            exact(name, body, CHANNEL_LEN as u64)?;
            zero("Channel reserved", &body[24..32])?;
            let (index, count) = (u32_at(body, 0), u32_at(body, 4));
            if count == 0 {
                return Err(ErrorKind::InvalidField {
                    field: "Channel count",
                    value: 0,
                });
            }
            if index > count {
                return Err(ErrorKind::InvalidField {
                    field: "Channel index",
                    value: u64::from(index),
                });
            }
            let mut token = [0u8; 16];
            token.copy_from_slice(&body[8..24]);
            Record::Channel(Channel {
                index,
                count,
                token,
            })
        }
        Tag::Sync => {
            exact(name, body, SYNC_LEN as u64)?;
            zero("Sync reserved", &body[4..8])?;
            Record::Sync(Sync {
                round: u32_at(body, 0),
            })
        }
    })
}

/// Encoders of each record's fixed part; variable parts follow it on the wire.
pub mod encode {
    use super::*;

    /// Compat's fixed part.
    pub fn compat(c: &Compat<'_>) -> Result<[u8; COMPAT_FIXED], ErrorKind> {
        let id_len = u16::try_from(c.identity.len())
            .map_err(|_| ErrorKind::InvalidArgument("identity longer than 65535 bytes".into()))?;
        let compat_len = u16::try_from(c.compat.len()).map_err(|_| {
            ErrorKind::InvalidArgument("compat block longer than 65535 bytes".into())
        })?;
        let mut b = [0u8; COMPAT_FIXED];
        b[0..4].copy_from_slice(&c.device.to_le_bytes());
        b[4..6].copy_from_slice(&id_len.to_le_bytes());
        b[6..8].copy_from_slice(&compat_len.to_le_bytes());
        b[8..16].copy_from_slice(&c.page_size_mask.to_le_bytes());
        b[16..20].copy_from_slice(&c.dirty_caps.0.to_le_bytes());
        b[20..24].copy_from_slice(&c.migration_flags.to_le_bytes());
        Ok(b)
    }

    /// DeviceState's fixed part.
    pub fn device_state(device: u32, phase: Phase, chunk: u32) -> [u8; DEVICE_STATE_FIXED] {
        let mut b = [0u8; DEVICE_STATE_FIXED];
        b[0..4].copy_from_slice(&device.to_le_bytes());
        b[4] = phase as u8;
        b[8..12].copy_from_slice(&chunk.to_le_bytes());
        b
    }

    /// Pages' fixed part, or the whole ZeroPages body.
    pub fn pages(gpa: u64, page_size: u32, count: u32) -> [u8; PAGES_FIXED] {
        let mut b = [0u8; PAGES_FIXED];
        b[0..8].copy_from_slice(&gpa.to_le_bytes());
        b[8..12].copy_from_slice(&page_size.to_le_bytes());
        b[12..16].copy_from_slice(&count.to_le_bytes());
        b
    }

    /// DirtyBitmap's fixed part.
    pub fn dirty_bitmap(iova: u64, span: u64, page_size: u32) -> [u8; DIRTY_BITMAP_FIXED] {
        let mut b = [0u8; DIRTY_BITMAP_FIXED];
        b[0..8].copy_from_slice(&iova.to_le_bytes());
        b[8..16].copy_from_slice(&span.to_le_bytes());
        b[16..20].copy_from_slice(&page_size.to_le_bytes());
        b
    }

    /// Round's body.
    pub fn round(r: &Round) -> [u8; ROUND_LEN] {
        let mut b = [0u8; ROUND_LEN];
        b[0..4].copy_from_slice(&r.round.to_le_bytes());
        for (i, v) in [
            r.pages,
            r.zero_pages,
            r.dirty_pages,
            r.device_bytes,
            r.stream_bytes,
            r.elapsed_us,
        ]
        .iter()
        .enumerate()
        {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// End's body.
    pub fn end(e: &End) -> [u8; END_LEN] {
        let mut b = [0u8; END_LEN];
        b[0..4].copy_from_slice(&e.records.to_le_bytes());
        b[8..16].copy_from_slice(&e.stream_bytes.to_le_bytes());
        b[16..24].copy_from_slice(&e.pages.to_le_bytes());
        b[24..32].copy_from_slice(&e.zero_pages.to_le_bytes());
        b[32..40].copy_from_slice(&e.device_bytes.to_le_bytes());
        b[40..44].copy_from_slice(&e.digest.to_le_bytes());
        b
    }

    /// Channel's body.
    pub fn channel(c: &Channel) -> [u8; CHANNEL_LEN] {
        let mut b = [0u8; CHANNEL_LEN];
        b[0..4].copy_from_slice(&c.index.to_le_bytes());
        b[4..8].copy_from_slice(&c.count.to_le_bytes());
        b[8..24].copy_from_slice(&c.token);
        b
    }

    /// Sync's body.
    pub fn sync(s: &Sync) -> [u8; SYNC_LEN] {
        let mut b = [0u8; SYNC_LEN];
        b[0..4].copy_from_slice(&s.round.to_le_bytes());
        b
    }

    /// Words as little-endian bytes.
    pub fn words_le(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}
