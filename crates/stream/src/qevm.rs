//! A reader for whole QEMU migration files (`migrate file:`, `savevm`-style streams): the
//! `QEVM` format QEMU 10.0 writes, walked by parsing from the first byte to the last, with the
//! VFIO device sections decoded down to their device-state chunks. Layouts are from QEMU 10.0
//! source (read in 10.0.2, the release of the binary that wrote `fixtures/qemu/`:
//! `migration/savevm.c`, `migration/vmstate.c`, `migration/ram.c`, `hw/vfio/migration.c`,
//! `hw/vfio/pci.c`, and `scripts/analyze-migration.py`, which reads the format the same way);
//! the code is our own.
//!
//! ```text
//! +------+----+---------------+----------------------------------------+-----+------+-----------+------+
//! | QEVM | 3  | CONFIGURATION | sections (START/PART/END/FULL) and     | EOF | 0x06 | be32 len  | JSON |
//! | be32 |be32| 0x07 vmstate  | commands, each section + footer        | 0x00|      |           |      |
//! +------+----+---------------+----------------------------------------+-----+------+-----------+------+
//!
//! START/FULL: | type u8 | section_id be32 | len u8 | idstr | instance_id be32 | version_id be32 | body | footer |
//! PART/END:   | type u8 | section_id be32 | body | footer |
//! footer:     | 0x7e | section_id be32 |                       (save_section_footer)
//! command:    | 0x08 | cmd be16 | len be16 | len bytes |      (qemu_savevm_command_send)
//! ```
//!
//! Section bodies carry no length, so each is walked by what its writer puts there:
//!
//! * `"ram"` (START/PART/END): be64 words whose low bits (below the target page size) are
//!   `RAM_SAVE_FLAG_*` flags: MEM_SIZE and the RAM block list, ZERO pages, PAGE data,
//!   MULTIFD_FLUSH, and EOS ending the body (`ram_save_setup`, `save_page_header`,
//!   `ram_load_precopy`).
//! * `…/vfio` (any type): QEMU's VFIO framing, [`crate::qemu`], the configuration vmstate
//!   parsed by layout ([`PciConfigState`]).
//! * every other FULL section: the vmstate field list of the JSON description QEMU appends
//!   after EOF (`vmstate_save_state_v` records each field's type and the bytes it wrote, and the
//!   subsections it sent; `vmstate_save_old_style` describes a legacy body as one buffer).
//!
//! The description is found by its frame, not by guessing: the file ends with the JSON text,
//! the be32 before the text equals the text's length exactly, and the byte before that is
//! `QEMU_VM_VMDESCRIPTION`; the forward walk must then arrive at that byte right after EOF.
//! Every error names the byte offset; no input makes the reader panic.
//!
//! ```
//! # fn demo(bytes: &[u8]) -> Result<(), livemig_stream::qevm::QevmError> {
//! use livemig_stream::qevm::{self, QevmLimits};
//! let file = qevm::read(bytes, QevmLimits::default())?;
//! for s in file.sections() {
//!     println!("{} {} {:?} @{}+{}", s.kind.name(), s.section_id, s.idstr, s.offset, s.length);
//! }
//! for dev in file.vfio_devices() {
//!     let state = qevm::vfio_device_state(&file, dev);
//!     println!("{dev}: {} bytes of device state", state.map_or(0, |s| s.len()));
//! }
//! # Ok(()) }
//! ```

mod json;

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

pub use json::Json;

use crate::qemu::{self, Item, PciConfigState, QemuError};

/// `QEMU_VM_FILE_MAGIC` (`migration/savevm.h`): "QEVM".
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION` (`migration/savevm.h`).
pub const QEMU_VM_FILE_VERSION: u32 = 3;
/// `QEMU_VM_EOF`.
pub const QEMU_VM_EOF: u8 = 0x00;
/// `QEMU_VM_SECTION_START`.
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// `QEMU_VM_SECTION_PART`.
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// `QEMU_VM_SECTION_END`.
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// `QEMU_VM_SECTION_FULL`.
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// `QEMU_VM_SUBSECTION`.
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// `QEMU_VM_VMDESCRIPTION`.
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// `QEMU_VM_CONFIGURATION`.
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// `QEMU_VM_COMMAND`.
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// `QEMU_VM_SECTION_FOOTER`.
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// `RAM_SAVE_FLAG_ZERO` (`migration/ram.h`): a page of zeros, one byte (0) follows.
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x002;
/// `RAM_SAVE_FLAG_MEM_SIZE`: the address bits hold the total RAM size; the block list follows.
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x004;
/// `RAM_SAVE_FLAG_PAGE`: a page of data follows.
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x008;
/// `RAM_SAVE_FLAG_EOS`: end of this section's RAM data.
pub const RAM_SAVE_FLAG_EOS: u64 = 0x010;
/// `RAM_SAVE_FLAG_CONTINUE`: same RAM block as the previous page (no block name).
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x020;
/// `RAM_SAVE_FLAG_XBZRLE` (not supported here).
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x040;
/// `RAM_SAVE_FLAG_HOOK` (RDMA; not supported here).
pub const RAM_SAVE_FLAG_HOOK: u64 = 0x080;
/// `RAM_SAVE_FLAG_MULTIFD_FLUSH`.
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// `MIG_CMD_POSTCOPY_ADVISE` (`enum qemu_vm_cmd`, `migration/savevm.c`).
pub const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
/// `MIG_CMD_PACKAGED`: a nested stream follows (not supported here).
pub const MIG_CMD_PACKAGED: u16 = 7;
/// `MIG_CMD_SWITCHOVER_START` (QEMU 10.0: sent before the final sections).
pub const MIG_CMD_SWITCHOVER_START: u16 = 11;
/// Names of `enum qemu_vm_cmd` values 1..=11.
const MIG_CMD_NAMES: [&str; 12] = [
    "INVALID",
    "OPEN_RETURN_PATH",
    "PING",
    "POSTCOPY_ADVISE",
    "POSTCOPY_LISTEN",
    "POSTCOPY_RUN",
    "POSTCOPY_RAM_DISCARD",
    "PACKAGED",
    "ENABLE_COLO",
    "POSTCOPY_RESUME",
    "RECV_BITMAP",
    "SWITCHOVER_START",
];

/// The `"ram"` section's version (`register_savevm_live("ram", 0, 4, …)`, `migration/ram.c`).
pub const RAM_SECTION_VERSION: u32 = 4;
/// Page size assumed when neither the description nor the configuration gives one
/// (`TARGET_PAGE_BITS` 12 of x86 and most targets).
pub const DEFAULT_PAGE_SIZE: u64 = 4096;
/// The description's length field must have a zero top byte (below 16 MiB) for the frame
/// search to be exact; see [`QevmLimits::max_description`].
const DESCRIPTION_CAP: u64 = 0x00ff_ffff;

/// Limits the reader enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QevmLimits {
    /// Largest JSON description (capped at 16 MiB − 1).
    pub max_description: u64,
    /// Deepest nesting of JSON values and of vmstate structs.
    pub max_depth: u32,
    /// Most section records (and commands).
    pub max_sections: u64,
    /// Largest VFIO DEV_DATA_STATE chunk.
    pub max_vfio_chunk: u64,
}

impl Default for QevmLimits {
    /// 16 MiB − 1 of description, depth 64, 2^20 sections, 64 MiB VFIO chunks (QEMU 10.0
    /// writes at most 1 MiB: `VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE`).
    fn default() -> QevmLimits {
        QevmLimits {
            max_description: DESCRIPTION_CAP,
            max_depth: 64,
            max_sections: 1 << 20,
            max_vfio_chunk: 64 << 20,
        }
    }
}

/// Why a QEMU migration file could not be read. Every variant names a byte offset
/// ([`QevmError::offset`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QevmError {
    /// The first four bytes are not "QEVM".
    #[error("at byte {offset}: not a QEMU migration file (magic {found:#010x})")]
    BadMagic {
        /// Where.
        offset: u64,
        /// The value read.
        found: u32,
    },
    /// A file version other than 3.
    #[error("at byte {offset}: QEMU file version {version} (this reader reads version 3)")]
    UnsupportedVersion {
        /// Where.
        offset: u64,
        /// The version read.
        version: u32,
    },
    /// The file ends inside a structure.
    #[error("at byte {offset}: truncated in {what} ({needed} more bytes needed)")]
    Truncated {
        /// Where the missing bytes start.
        offset: u64,
        /// Bytes missing.
        needed: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A section type byte QEMU does not define.
    #[error("at byte {offset}: unknown section type {byte:#04x}")]
    UnknownSectionType {
        /// Where.
        offset: u64,
        /// The byte.
        byte: u8,
    },
    /// A structure where it may not be.
    #[error("at byte {offset}: {reason}")]
    Unexpected {
        /// Where.
        offset: u64,
        /// What.
        reason: &'static str,
    },
    /// A PART or END for a section id no START opened.
    #[error("at byte {offset}: section id {section_id} was never started")]
    UnknownSectionId {
        /// Where.
        offset: u64,
        /// The id.
        section_id: u32,
    },
    /// A section footer naming another section.
    #[error("at byte {offset}: footer of section {found} after section {expected}")]
    Footer {
        /// Where.
        offset: u64,
        /// The section just read.
        expected: u32,
        /// The id in the footer.
        found: u32,
    },
    /// Text that is not UTF-8.
    #[error("at byte {offset}: {what} is not UTF-8")]
    BadText {
        /// Where.
        offset: u64,
        /// What.
        what: &'static str,
    },
    /// Above a [`QevmLimits`] value.
    #[error("at byte {offset}: more than {max} {what}")]
    Limit {
        /// Where.
        offset: u64,
        /// What.
        what: &'static str,
        /// The limit.
        max: u64,
    },
    /// A valid QEMU feature this reader does not walk.
    #[error("at byte {offset}: {what} is not supported")]
    Unsupported {
        /// Where.
        offset: u64,
        /// What.
        what: &'static str,
    },
    /// The configuration section is malformed.
    #[error("at byte {offset}: configuration section: {reason}")]
    Configuration {
        /// Where.
        offset: u64,
        /// What.
        reason: &'static str,
    },
    /// RAM section data that is not what `ram.c` writes.
    #[error("at byte {offset}: RAM section: {reason}")]
    Ram {
        /// Where.
        offset: u64,
        /// What.
        reason: &'static str,
    },
    /// RAM flags QEMU 10.0 never combines.
    #[error("at byte {offset}: RAM section: unknown flag combination {flags:#x}")]
    UnknownRamFlags {
        /// Where.
        offset: u64,
        /// The flag bits.
        flags: u64,
    },
    /// A section whose body can only be walked with the JSON description, in a file without one.
    #[error(
        "at byte {offset}: section {section:?} needs the JSON description, and the file has none"
    )]
    NoDescription {
        /// Where the section starts.
        offset: u64,
        /// Its idstr.
        section: String,
    },
    /// A section the JSON description does not describe.
    #[error(
        "at byte {offset}: section {section:?} instance {instance_id} has no JSON description and no known framing"
    )]
    Undescribed {
        /// Where the section starts.
        offset: u64,
        /// Its idstr.
        section: String,
        /// Its instance id.
        instance_id: u32,
    },
    /// A field that cannot be walked.
    #[error("at byte {offset}: section {section:?}, field {field:?}: {reason}")]
    Field {
        /// Where the field starts.
        offset: u64,
        /// The section's idstr.
        section: String,
        /// The field, as a path through structs and subsections.
        field: String,
        /// Why.
        reason: &'static str,
    },
    /// A struct field whose walked length differs from the length the description records.
    #[error(
        "at byte {offset}: section {section:?}, field {field:?}: described as {described} bytes, walked {walked}"
    )]
    FieldSize {
        /// Where the field starts.
        offset: u64,
        /// The section's idstr.
        section: String,
        /// The field path.
        field: String,
        /// Bytes the description records.
        described: u64,
        /// Bytes the walk consumed.
        walked: u64,
    },
    /// The JSON description is not JSON or not shaped as QEMU writes it.
    #[error("at byte {offset}: JSON description: {reason}")]
    Description {
        /// Where.
        offset: u64,
        /// What.
        reason: &'static str,
    },
    /// A VFIO section whose framing is wrong.
    #[error("in VFIO section {section:?}: {error}")]
    Vfio {
        /// The section's idstr.
        section: String,
        /// The framing error (with its offset).
        error: QemuError,
    },
    /// Bytes after QEMU_VM_EOF that are not the description.
    #[error("at byte {offset}: data after QEMU_VM_EOF that is not the JSON description")]
    TrailingData {
        /// Where.
        offset: u64,
    },
}

impl QevmError {
    /// The byte offset (in the file) the error names.
    pub fn offset(&self) -> u64 {
        use QevmError::*;
        match self {
            BadMagic { offset, .. }
            | UnsupportedVersion { offset, .. }
            | Truncated { offset, .. }
            | UnknownSectionType { offset, .. }
            | Unexpected { offset, .. }
            | UnknownSectionId { offset, .. }
            | Footer { offset, .. }
            | BadText { offset, .. }
            | Limit { offset, .. }
            | Unsupported { offset, .. }
            | Configuration { offset, .. }
            | Ram { offset, .. }
            | UnknownRamFlags { offset, .. }
            | NoDescription { offset, .. }
            | Undescribed { offset, .. }
            | Field { offset, .. }
            | FieldSize { offset, .. }
            | Description { offset, .. }
            | TrailingData { offset } => *offset,
            Vfio { error, .. } => error.offset(),
        }
    }
}

/// The type of a section record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SectionKind {
    /// QEMU_VM_SECTION_START: first part of an iterative section (with its header).
    Start,
    /// QEMU_VM_SECTION_PART: a pre-copy iteration.
    Part,
    /// QEMU_VM_SECTION_END: the last part (stop-and-copy).
    End,
    /// QEMU_VM_SECTION_FULL: a whole device state (with its header).
    Full,
}

impl SectionKind {
    /// `START`, `PART`, `END` or `FULL`.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Start => "START",
            SectionKind::Part => "PART",
            SectionKind::End => "END",
            SectionKind::Full => "FULL",
        }
    }
}

impl TryFrom<u8> for SectionKind {
    type Error = u8;

    fn try_from(b: u8) -> Result<SectionKind, u8> {
        match b {
            QEMU_VM_SECTION_START => Ok(SectionKind::Start),
            QEMU_VM_SECTION_PART => Ok(SectionKind::Part),
            QEMU_VM_SECTION_END => Ok(SectionKind::End),
            QEMU_VM_SECTION_FULL => Ok(SectionKind::Full),
            other => Err(other),
        }
    }
}

/// The configuration section (`vmstate_configuration`, `migration/savevm.c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration<'a> {
    /// Offset of its type byte.
    pub offset: u64,
    /// Its length, type byte included.
    pub length: u64,
    /// The machine type name, e.g. `pc-q35-10.0`.
    pub machine: &'a str,
    /// `configuration/target-page-bits`, sent when above the target's minimum.
    pub target_page_bits: Option<u32>,
    /// `configuration/capabilities`: the migration capabilities that must match.
    pub capabilities: Vec<&'a str>,
    /// `configuration/uuid`, sent with `validate-uuid`.
    pub uuid: Option<[u8; 16]>,
}

/// One RAM block of the `"ram"` section's block list, with the pages the file holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock<'a> {
    /// Its idstr, e.g. `pc.ram`.
    pub name: &'a str,
    /// `used_length` in bytes.
    pub used_length: u64,
    /// Where it is listed.
    pub offset: u64,
    /// Its guest-physical address (only with the `x-ignore-shared` capability).
    pub mr_addr: Option<u64>,
    /// ZERO pages for this block.
    pub zero_pages: u64,
    /// PAGE records for this block.
    pub normal_pages: u64,
}

/// What one `"ram"` section record holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamPart {
    /// The total RAM size of a MEM_SIZE list in this record.
    pub mem_size: Option<u64>,
    /// Blocks listed in this record.
    pub blocks_listed: u64,
    /// ZERO pages.
    pub zero_pages: u64,
    /// PAGE records.
    pub normal_pages: u64,
    /// MULTIFD_FLUSH markers.
    pub flushes: u64,
}

/// A VFIO framing item and its offset in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioItem<'a> {
    /// Offset of its marker.
    pub offset: u64,
    /// The item.
    pub item: Item<'a>,
}

/// What a section record's body holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a> {
    /// RAM pages and the block list.
    Ram(RamPart),
    /// A VFIO device's framing items; the configuration decoded when present.
    Vfio {
        /// Items in order, the terminating END_OF_STATE (or DEV_INIT_DATA_SENT) included.
        items: Vec<VfioItem<'a>>,
        /// The DEV_CONFIG_STATE vmstate, decoded.
        config: Option<PciConfigState<'a>>,
    },
    /// A vmstate walked with the JSON description.
    Vmstate {
        /// The description's `vmsd_name` (absent for legacy `save_state` bodies).
        vmsd_name: Option<String>,
        /// Fields walked (array elements and nested fields counted).
        fields: u64,
        /// Subsections walked.
        subsections: u64,
    },
}

/// One section record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section<'a> {
    /// Its position among the section records.
    pub index: usize,
    /// START, PART, END or FULL.
    pub kind: SectionKind,
    /// The section id.
    pub section_id: u32,
    /// The idstr (from the START record for PART and END).
    pub idstr: &'a str,
    /// The instance id.
    pub instance_id: u32,
    /// The section version.
    pub version_id: u32,
    /// Offset of the type byte.
    pub offset: u64,
    /// Length from the type byte through the footer.
    pub length: u64,
    /// Offset of the body.
    pub body_offset: u64,
    /// Length of the body.
    pub body_length: u64,
    /// Whether a footer follows (QEMU's default since 2.5: `send-section-footer`).
    pub footer: bool,
    /// The body.
    pub content: Content<'a>,
}

impl Section<'_> {
    /// Whether this is a VFIO device's section (idstr `vfio` or ending in `/vfio`,
    /// `vfio_migration_init`).
    pub fn is_vfio(&self) -> bool {
        is_vfio_idstr(self.idstr)
    }
}

/// A QEMU_VM_COMMAND record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// Offset of its type byte.
    pub offset: u64,
    /// The command (`enum qemu_vm_cmd`).
    pub command: u16,
    /// Length of its data.
    pub len: u16,
}

impl Command {
    /// The command's name, e.g. `SWITCHOVER_START`.
    pub fn name(&self) -> &'static str {
        MIG_CMD_NAMES
            .get(usize::from(self.command))
            .copied()
            .unwrap_or("UNKNOWN")
    }
}

/// The JSON description after QEMU_VM_EOF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// Offset of the QEMU_VM_VMDESCRIPTION byte.
    pub offset: u64,
    /// Offset of the JSON text.
    pub json_offset: u64,
    /// Length of the JSON text.
    pub json_length: u64,
    /// The parsed JSON.
    pub json: Json,
}

impl Description {
    /// The `page_size` member.
    pub fn page_size(&self) -> Option<u64> {
        self.json
            .get("page_size")?
            .as_i64()
            .and_then(|v| u64::try_from(v).ok())
    }

    /// The described devices, as `(name, instance_id)`.
    pub fn devices(&self) -> Vec<(&str, i64)> {
        self.json
            .get("devices")
            .and_then(Json::as_array)
            .unwrap_or(&[])
            .iter()
            .filter_map(|d| Some((d.get("name")?.as_str()?, d.get("instance_id")?.as_i64()?)))
            .collect()
    }

    /// The entry for `(name, instance_id)`.
    pub fn device(&self, name: &str, instance_id: u32) -> Option<&Json> {
        self.json.get("devices")?.as_array()?.iter().find(|d| {
            d.get("name").and_then(Json::as_str) == Some(name)
                && d.get("instance_id").and_then(Json::as_i64) == Some(i64::from(instance_id))
        })
    }
}

/// A QEMU migration file, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QevmFile<'a> {
    /// The file version (3).
    pub version: u32,
    /// The configuration section.
    pub configuration: Option<Configuration<'a>>,
    /// The section records, in file order.
    pub sections: Vec<Section<'a>>,
    /// The commands, in file order.
    pub commands: Vec<Command>,
    /// The RAM blocks the `"ram"` section lists, with page counts.
    pub ram_blocks: Vec<RamBlock<'a>>,
    /// The target page size used for RAM.
    pub page_size: u64,
    /// Offset of QEMU_VM_EOF, once read.
    pub eof_offset: Option<u64>,
    /// The JSON description.
    pub description: Option<Description>,
    /// The file's length.
    pub len: u64,
}

impl<'a> QevmFile<'a> {
    /// The section records, in file order.
    pub fn sections(&self) -> &[Section<'a>] {
        &self.sections
    }

    /// The idstrs of the VFIO devices, in order of first appearance.
    pub fn vfio_devices(&self) -> Vec<&'a str> {
        let mut out: Vec<&'a str> = Vec::new();
        for s in &self.sections {
            if s.is_vfio() && !out.contains(&s.idstr) {
                out.push(s.idstr);
            }
        }
        out
    }

    /// The sections of VFIO device `device`.
    pub fn vfio_sections<'s>(
        &'s self,
        device: VfioDevice<'_>,
    ) -> impl Iterator<Item = &'s Section<'a>> + 's {
        let idstr = match device {
            VfioDevice::Idstr(s) => self.vfio_devices().into_iter().find(|d| *d == s),
            VfioDevice::Index(i) => self.vfio_devices().get(i).copied(),
        };
        self.sections
            .iter()
            .filter(move |s| s.is_vfio() && Some(s.idstr) == idstr)
    }

    /// ZERO and PAGE records over all RAM sections.
    pub fn ram_pages(&self) -> (u64, u64) {
        self.ram_blocks
            .iter()
            .fold((0, 0), |(z, n), b| (z + b.zero_pages, n + b.normal_pages))
    }
}

/// Which VFIO device: by idstr (`0000:00:01.0/vfio`) or by position in
/// [`QevmFile::vfio_devices`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioDevice<'s> {
    /// By idstr.
    Idstr(&'s str),
    /// By index.
    Index(usize),
}

impl<'s> From<&'s str> for VfioDevice<'s> {
    fn from(s: &'s str) -> VfioDevice<'s> {
        VfioDevice::Idstr(s)
    }
}

impl From<usize> for VfioDevice<'_> {
    fn from(i: usize) -> Self {
        VfioDevice::Index(i)
    }
}

/// The device state of a VFIO device: its DEV_DATA_STATE chunks concatenated in file order
/// (pre-copy chunks of PART sections, then stop-copy chunks of the END section), i.e. the bytes
/// a RESUMING device takes on its data fd. `None` if the file has no such device.
pub fn vfio_device_state<'s>(
    file: &QevmFile<'_>,
    device: impl Into<VfioDevice<'s>>,
) -> Option<Vec<u8>> {
    let device = device.into();
    let mut out = Vec::new();
    let mut found = false;
    for s in file.vfio_sections(device) {
        found = true;
        if let Content::Vfio { items, .. } = &s.content {
            for i in items {
                if let Item::Data(d) = i.item {
                    out.extend_from_slice(d);
                }
            }
        }
    }
    found.then_some(out)
}

/// The decoded DEV_CONFIG_STATE of a VFIO device, if the file has one.
pub fn vfio_config<'a, 's>(
    file: &QevmFile<'a>,
    device: impl Into<VfioDevice<'s>>,
) -> Option<PciConfigState<'a>> {
    file.vfio_sections(device.into())
        .find_map(|s| match &s.content {
            Content::Vfio { config, .. } => *config,
            _ => None,
        })
}

/// Whether `data` starts with the QEVM magic.
pub fn looks_like_qevm(data: &[u8]) -> bool {
    data.len() >= 4 && data[..4] == QEMU_VM_FILE_MAGIC.to_be_bytes()
}

/// Reads a whole QEMU migration file.
pub fn read(data: &[u8], limits: QevmLimits) -> Result<QevmFile<'_>, QevmError> {
    let (file, err) = read_partial(data, limits);
    match err {
        None => Ok(file),
        Some(e) => Err(e),
    }
}

/// Reads as much of a QEMU migration file as is valid: what was read up to the first error,
/// and that error (for inspecting damaged files).
pub fn read_partial(data: &[u8], limits: QevmLimits) -> (QevmFile<'_>, Option<QevmError>) {
    let mut w = Walker {
        data,
        pos: 0,
        limits,
        file: QevmFile {
            len: data.len() as u64,
            page_size: DEFAULT_PAGE_SIZE,
            ..Default::default()
        },
        open: BTreeMap::new(),
        blocks: BTreeMap::new(),
        devices: BTreeMap::new(),
        last_block: None,
        ignore_shared: false,
        records: 0,
    };
    let err = w.run().err();
    (w.file, err)
}

fn is_vfio_idstr(idstr: &str) -> bool {
    idstr == "vfio" || idstr.ends_with("/vfio")
}

/// Bytes that may occur in JSON text (no control characters but JSON whitespace).
fn is_json_text(b: u8) -> bool {
    b >= 0x20 || matches!(b, b'\t' | b'\n' | b'\r')
}

/// Finds the description frame at the end of `data`: `0x06 | be32 n | n bytes of JSON text`
/// ending the file. The text has no control bytes while the length's top byte is 0, so the text
/// starts at most 3 bytes after the last non-text byte; each candidate is checked against the
/// length field. Returns the offsets of the 0x06 byte and of the text.
fn locate_description(data: &[u8], max: u64) -> Option<(usize, usize)> {
    let end = data.len();
    let max = usize::try_from(max.min(DESCRIPTION_CAP)).unwrap_or(usize::MAX);
    let floor = end.saturating_sub(max);
    let mut t = end;
    while t > floor && is_json_text(data[t - 1]) {
        t -= 1;
    }
    (t..=(t + 3).min(end)).find_map(|s| {
        let frame = data.get(s.checked_sub(5)?..s)?;
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        (frame[0] == QEMU_VM_VMDESCRIPTION && data.get(s) == Some(&b'{') && len == end - s)
            .then_some((s - 5, s))
    })
}

/// A field path for error messages: names through structs and subsections.
struct Path<'p> {
    parent: Option<&'p Path<'p>>,
    name: &'p str,
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut names = Vec::new();
        let mut p = Some(self);
        while let Some(n) = p {
            if !n.name.is_empty() {
                names.push(n.name);
            }
            p = n.parent;
        }
        names.reverse();
        names.join(".")
    }
}

struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    limits: QevmLimits,
    file: QevmFile<'a>,
    /// Started sections not yet ended: id → index of the START record.
    open: BTreeMap<u32, usize>,
    /// RAM block name → index in `file.ram_blocks`.
    blocks: BTreeMap<&'a str, usize>,
    /// `(name, instance_id)` → index in the description's `devices`.
    devices: BTreeMap<(String, i64), usize>,
    /// The RAM block of the previous page (for RAM_SAVE_FLAG_CONTINUE).
    last_block: Option<usize>,
    ignore_shared: bool,
    records: u64,
}

impl<'a> Walker<'a> {
    fn truncated(&self, n: usize, what: &'static str) -> QevmError {
        QevmError::Truncated {
            offset: self.pos as u64,
            needed: (n - (self.data.len() - self.pos)) as u64,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], QevmError> {
        if self.data.len() - self.pos < n {
            return Err(self.truncated(n, what));
        }
        let b = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, QevmError> {
        Ok(self.take(1, what)?[0])
    }

    fn be16(&mut self, what: &'static str) -> Result<u16, QevmError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn be32(&mut self, what: &'static str) -> Result<u32, QevmError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn be64(&mut self, what: &'static str) -> Result<u64, QevmError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A u8-length-prefixed string.
    fn name(&mut self, what: &'static str) -> Result<&'a str, QevmError> {
        let len = usize::from(self.u8(what)?);
        let at = self.pos;
        let b = self.take(len, what)?;
        core::str::from_utf8(b).map_err(|_| QevmError::BadText {
            offset: at as u64,
            what,
        })
    }

    fn run(&mut self) -> Result<(), QevmError> {
        let magic = self.be32("file magic")?;
        if magic != QEMU_VM_FILE_MAGIC {
            return Err(QevmError::BadMagic {
                offset: 0,
                found: magic,
            });
        }
        let version = self.be32("file version")?;
        if version != QEMU_VM_FILE_VERSION {
            return Err(QevmError::UnsupportedVersion { offset: 4, version });
        }
        self.file.version = version;
        let frame = locate_description(self.data, self.limits.max_description);
        if let Some((marker, text)) = frame {
            let json = json::parse(&self.data[text..], text as u64, self.limits.max_depth)
                .map_err(|e| QevmError::Description {
                    offset: e.offset,
                    reason: e.reason,
                })?;
            if json.get("devices").and_then(Json::as_array).is_none() {
                return Err(QevmError::Description {
                    offset: text as u64,
                    reason: "no \"devices\" array",
                });
            }
            let d = Description {
                offset: marker as u64,
                json_offset: text as u64,
                json_length: (self.data.len() - text) as u64,
                json,
            };
            if let Some(ps) = d.page_size() {
                if !(512..=65536).contains(&ps) || !ps.is_power_of_two() {
                    return Err(QevmError::Description {
                        offset: text as u64,
                        reason: "page_size is not a power of two in 512..=65536",
                    });
                }
                self.file.page_size = ps;
            }
            for (i, dev) in d
                .json
                .get("devices")
                .and_then(Json::as_array)
                .unwrap_or(&[])
                .iter()
                .enumerate()
            {
                if let (Some(n), Some(inst)) = (
                    dev.get("name").and_then(Json::as_str),
                    dev.get("instance_id").and_then(Json::as_i64),
                ) {
                    // The first entry wins, as in Description::device.
                    self.devices.entry((n.to_string(), inst)).or_insert(i);
                }
            }
            self.file.description = Some(d);
        }
        if self.data.get(self.pos) == Some(&QEMU_VM_CONFIGURATION) {
            self.configuration()?;
        }
        loop {
            let at = self.pos;
            let ty = self.u8("section type")?;
            if ty != QEMU_VM_EOF {
                self.records += 1;
                if self.records > self.limits.max_sections {
                    return Err(QevmError::Limit {
                        offset: at as u64,
                        what: "sections",
                        max: self.limits.max_sections,
                    });
                }
            }
            match ty {
                QEMU_VM_EOF => {
                    self.file.eof_offset = Some(at as u64);
                    break;
                }
                QEMU_VM_SECTION_START..=QEMU_VM_SECTION_FULL => self.section(at, ty)?,
                QEMU_VM_COMMAND => self.command(at)?,
                QEMU_VM_CONFIGURATION => {
                    return Err(QevmError::Unexpected {
                        offset: at as u64,
                        reason: "configuration section not right after the header",
                    });
                }
                QEMU_VM_SECTION_FOOTER => {
                    return Err(QevmError::Unexpected {
                        offset: at as u64,
                        reason: "section footer without a section",
                    });
                }
                QEMU_VM_SUBSECTION | QEMU_VM_VMDESCRIPTION => {
                    return Err(QevmError::Unexpected {
                        offset: at as u64,
                        reason: "subsection or description marker where a section starts",
                    });
                }
                byte => {
                    return Err(QevmError::UnknownSectionType {
                        offset: at as u64,
                        byte,
                    });
                }
            }
        }
        // After EOF: exactly the description frame found at the end, or nothing.
        let expected_end = match &self.file.description {
            Some(d) => d.offset as usize,
            None => self.data.len(),
        };
        if self.pos != expected_end {
            if frame.is_none() && self.data.get(self.pos) == Some(&QEMU_VM_VMDESCRIPTION) {
                return Err(QevmError::Description {
                    offset: self.pos as u64,
                    reason: "its length does not reach the end of the file exactly",
                });
            }
            return Err(QevmError::TrailingData {
                offset: self.pos as u64,
            });
        }
        Ok(())
    }

    /// The description entry of `(idstr, instance_id)`.
    fn device_desc<'d>(
        &self,
        d: &'d Description,
        idstr: &str,
        instance_id: u32,
    ) -> Option<&'d Json> {
        let i = *self
            .devices
            .get(&(idstr.to_string(), i64::from(instance_id)))?;
        d.json.get("devices")?.as_array()?.get(i)
    }

    fn configuration(&mut self) -> Result<(), QevmError> {
        let start = self.pos;
        self.pos += 1;
        let len = self.be32("configuration name length")? as usize;
        let at = self.pos;
        let name = self.take(len, "machine type name")?;
        let machine = core::str::from_utf8(name).map_err(|_| QevmError::BadText {
            offset: at as u64,
            what: "machine type name",
        })?;
        let mut cfg = Configuration {
            offset: start as u64,
            length: 0,
            machine,
            target_page_bits: None,
            capabilities: Vec::new(),
            uuid: None,
        };
        while self.data.get(self.pos) == Some(&QEMU_VM_SUBSECTION) {
            let sub_at = self.pos;
            self.pos += 1;
            let sub = self.name("configuration subsection name")?;
            let _version = self.be32("subsection version")?;
            match sub {
                "configuration/target-page-bits" => {
                    let bits_at = self.pos;
                    let bits = self.be32("target page bits")?;
                    if !(9..=16).contains(&bits) {
                        return Err(QevmError::Configuration {
                            offset: bits_at as u64,
                            reason: "target page bits outside 9..=16",
                        });
                    }
                    cfg.target_page_bits = Some(bits);
                }
                "configuration/capabilities" => {
                    let n = self.be32("capability count")?;
                    for _ in 0..n {
                        let cap_at = self.pos;
                        let cap = self.name("capability name")?;
                        match cap {
                            "x-ignore-shared" => self.ignore_shared = true,
                            "mapped-ram" => {
                                return Err(QevmError::Unsupported {
                                    offset: cap_at as u64,
                                    what: "the mapped-ram capability",
                                });
                            }
                            _ => {}
                        }
                        cfg.capabilities.push(cap);
                    }
                }
                "configuration/uuid" => {
                    let mut u = [0u8; 16];
                    u.copy_from_slice(self.take(16, "uuid")?);
                    cfg.uuid = Some(u);
                }
                _ => {
                    return Err(QevmError::Configuration {
                        offset: sub_at as u64,
                        reason: "unknown subsection",
                    });
                }
            }
        }
        cfg.length = (self.pos - start) as u64;
        if self
            .file
            .description
            .as_ref()
            .and_then(Description::page_size)
            .is_none()
            && let Some(bits) = cfg.target_page_bits
        {
            self.file.page_size = 1 << bits;
        }
        self.file.configuration = Some(cfg);
        Ok(())
    }

    fn command(&mut self, at: usize) -> Result<(), QevmError> {
        let command = self.be16("command")?;
        let len = self.be16("command length")?;
        match command {
            1..=11 => {}
            _ => {
                return Err(QevmError::Unexpected {
                    offset: at as u64,
                    reason: "unknown command",
                });
            }
        }
        if command == MIG_CMD_PACKAGED {
            return Err(QevmError::Unsupported {
                offset: at as u64,
                what: "MIG_CMD_PACKAGED (postcopy)",
            });
        }
        if command == MIG_CMD_POSTCOPY_ADVISE {
            // With postcopy advised, RAM block lists may carry page sizes this reader cannot
            // predict (parse_ramblock).
            return Err(QevmError::Unsupported {
                offset: at as u64,
                what: "MIG_CMD_POSTCOPY_ADVISE (postcopy)",
            });
        }
        self.take(usize::from(len), "command data")?;
        self.file.commands.push(Command {
            offset: at as u64,
            command,
            len,
        });
        Ok(())
    }

    fn section(&mut self, at: usize, ty: u8) -> Result<(), QevmError> {
        let kind = SectionKind::try_from(ty).map_err(|byte| QevmError::UnknownSectionType {
            offset: at as u64,
            byte,
        })?;
        let section_id = self.be32("section id")?;
        let (idstr, instance_id, version_id) = match kind {
            SectionKind::Start | SectionKind::Full => {
                let idstr = self.name("section idstr")?;
                let instance = self.be32("instance id")?;
                let version = self.be32("version id")?;
                (idstr, instance, version)
            }
            SectionKind::Part | SectionKind::End => {
                let Some(&i) = self.open.get(&section_id) else {
                    return Err(QevmError::UnknownSectionId {
                        offset: at as u64,
                        section_id,
                    });
                };
                let s = &self.file.sections[i];
                (s.idstr, s.instance_id, s.version_id)
            }
        };
        let body = self.pos;
        let content = if idstr == "ram" && instance_id == 0 && kind != SectionKind::Full {
            if version_id != RAM_SECTION_VERSION {
                return Err(QevmError::Unsupported {
                    offset: at as u64,
                    what: "a RAM section version other than 4",
                });
            }
            Content::Ram(self.ram()?)
        } else if is_vfio_idstr(idstr) {
            self.vfio(kind, idstr, instance_id)?
        } else if kind == SectionKind::Full {
            self.vmstate(at, idstr, instance_id)?
        } else {
            return Err(QevmError::Undescribed {
                offset: at as u64,
                section: idstr.to_string(),
                instance_id,
            });
        };
        let body_end = self.pos;
        let footer = self.data.get(self.pos) == Some(&QEMU_VM_SECTION_FOOTER);
        if footer {
            let f_at = self.pos;
            self.pos += 1;
            let found = self.be32("section footer")?;
            if found != section_id {
                return Err(QevmError::Footer {
                    offset: f_at as u64,
                    expected: section_id,
                    found,
                });
            }
        }
        let index = self.file.sections.len();
        match kind {
            SectionKind::Start => {
                if self.open.insert(section_id, index).is_some() {
                    return Err(QevmError::Unexpected {
                        offset: at as u64,
                        reason: "section id started twice",
                    });
                }
            }
            SectionKind::End => {
                self.open.remove(&section_id);
            }
            SectionKind::Part | SectionKind::Full => {}
        }
        self.file.sections.push(Section {
            index,
            kind,
            section_id,
            idstr,
            instance_id,
            version_id,
            offset: at as u64,
            length: (self.pos - at) as u64,
            body_offset: body as u64,
            body_length: (body_end - body) as u64,
            footer,
            content,
        });
        Ok(())
    }

    fn ram(&mut self) -> Result<RamPart, QevmError> {
        let mut part = RamPart::default();
        let page = self.file.page_size;
        loop {
            let at = self.pos;
            let word = self.be64("RAM address and flags")?;
            let flags = word & (page - 1);
            let addr = word & !(page - 1);
            let ram_err = |reason| QevmError::Ram {
                offset: at as u64,
                reason,
            };
            match flags & !RAM_SAVE_FLAG_CONTINUE {
                RAM_SAVE_FLAG_MEM_SIZE if flags & RAM_SAVE_FLAG_CONTINUE == 0 => {
                    if !self.file.ram_blocks.is_empty() {
                        return Err(ram_err("a second RAM block list"));
                    }
                    part.mem_size = Some(addr);
                    let mut remaining = addr;
                    while remaining > 0 {
                        let b_at = self.pos;
                        let name = self.name("RAM block name")?;
                        let used_length = self.be64("RAM block length")?;
                        let mr_addr = if self.ignore_shared {
                            Some(self.be64("RAM block address")?)
                        } else {
                            None
                        };
                        if used_length == 0 || used_length > remaining {
                            return Err(QevmError::Ram {
                                offset: b_at as u64,
                                reason: "RAM block lengths do not add up to the total",
                            });
                        }
                        if self
                            .blocks
                            .insert(name, self.file.ram_blocks.len())
                            .is_some()
                        {
                            return Err(QevmError::Ram {
                                offset: b_at as u64,
                                reason: "RAM block listed twice",
                            });
                        }
                        remaining -= used_length;
                        part.blocks_listed += 1;
                        self.file.ram_blocks.push(RamBlock {
                            name,
                            used_length,
                            offset: b_at as u64,
                            mr_addr,
                            zero_pages: 0,
                            normal_pages: 0,
                        });
                    }
                }
                f @ (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE) => {
                    let block = if flags & RAM_SAVE_FLAG_CONTINUE != 0 {
                        self.last_block
                            .ok_or_else(|| ram_err("CONTINUE before any page"))?
                    } else {
                        let n_at = self.pos;
                        let name = self.name("RAM block name")?;
                        let i = *self.blocks.get(name).ok_or(QevmError::Ram {
                            offset: n_at as u64,
                            reason: "page of a RAM block the list does not have",
                        })?;
                        self.last_block = Some(i);
                        i
                    };
                    if addr >= self.file.ram_blocks[block].used_length {
                        return Err(ram_err("page offset beyond its RAM block"));
                    }
                    if f == RAM_SAVE_FLAG_ZERO {
                        let v_at = self.pos;
                        if self.u8("zero page fill byte")? != 0 {
                            return Err(QevmError::Ram {
                                offset: v_at as u64,
                                reason: "zero page with a non-zero fill byte",
                            });
                        }
                        part.zero_pages += 1;
                        self.file.ram_blocks[block].zero_pages += 1;
                    } else {
                        self.take(page as usize, "RAM page")?;
                        part.normal_pages += 1;
                        self.file.ram_blocks[block].normal_pages += 1;
                    }
                }
                RAM_SAVE_FLAG_MULTIFD_FLUSH if flags & RAM_SAVE_FLAG_CONTINUE == 0 => {
                    part.flushes += 1;
                }
                RAM_SAVE_FLAG_EOS if flags & RAM_SAVE_FLAG_CONTINUE == 0 => return Ok(part),
                RAM_SAVE_FLAG_XBZRLE => {
                    return Err(QevmError::Unsupported {
                        offset: at as u64,
                        what: "XBZRLE-compressed RAM",
                    });
                }
                RAM_SAVE_FLAG_HOOK => {
                    return Err(QevmError::Unsupported {
                        offset: at as u64,
                        what: "RDMA RAM hooks",
                    });
                }
                _ => {
                    return Err(QevmError::UnknownRamFlags {
                        offset: at as u64,
                        flags,
                    });
                }
            }
        }
    }

    fn vfio(
        &mut self,
        kind: SectionKind,
        idstr: &'a str,
        instance_id: u32,
    ) -> Result<Content<'a>, QevmError> {
        // A FULL section is described as one buffer of `size` bytes (vmstate_save_old_style):
        // DEV_CONFIG_STATE, the vmstate, END_OF_STATE.
        let described = match kind {
            SectionKind::Full => self
                .file
                .description
                .as_ref()
                .and_then(|d| self.device_desc(d, idstr, instance_id))
                .and_then(|d| d.get("size")?.as_i64())
                .and_then(|s| usize::try_from(s).ok()),
            _ => None,
        };
        let body = self.pos;
        let mut p = qemu::Parser::at(self.data, body, self.limits.max_vfio_chunk);
        p.expect_config_len(described.and_then(|s| s.checked_sub(16)));
        let mut items = Vec::new();
        let mut config = None;
        let wrap = |error| QevmError::Vfio {
            section: idstr.to_string(),
            error,
        };
        loop {
            let i_at = p.offset();
            let item = match p.next_item().map_err(wrap)? {
                Some(i) => i,
                None => {
                    return Err(wrap(QemuError::Truncated {
                        offset: i_at,
                        needed: 8,
                    }));
                }
            };
            if let Item::Config(blob) = item {
                // The parser found the blob's end by this layout; decoding it whole again
                // cannot be ambiguous (no two layouts have the same length).
                config = Some(PciConfigState::parse(blob).map_err(|e| wrap(e.shifted(i_at + 8)))?);
            }
            items.push(VfioItem { offset: i_at, item });
            if matches!(item, Item::EndOfState | Item::InitDataSent) {
                break;
            }
        }
        self.pos = p.offset() as usize;
        if let Some(size) = described
            && self.pos - body != size
        {
            return Err(QevmError::FieldSize {
                offset: body as u64,
                section: idstr.to_string(),
                field: "data".to_string(),
                described: size as u64,
                walked: (self.pos - body) as u64,
            });
        }
        Ok(Content::Vfio { items, config })
    }

    fn vmstate(
        &mut self,
        at: usize,
        idstr: &'a str,
        instance_id: u32,
    ) -> Result<Content<'a>, QevmError> {
        let data = self.data;
        let Some(desc) = self.file.description.take() else {
            return Err(QevmError::NoDescription {
                offset: at as u64,
                section: idstr.to_string(),
            });
        };
        let result = match self.device_desc(&desc, idstr, instance_id) {
            None => Err(QevmError::Undescribed {
                offset: at as u64,
                section: idstr.to_string(),
                instance_id,
            }),
            Some(dev) => {
                let mut vw = VmstateWalk {
                    data,
                    pos: self.pos,
                    section: idstr,
                    max_depth: self.limits.max_depth,
                    fields: 0,
                    subsections: 0,
                };
                let root = Path {
                    parent: None,
                    name: "",
                };
                vw.walk(dev, &root, 0).map(|()| {
                    self.pos = vw.pos;
                    Content::Vmstate {
                        vmsd_name: dev
                            .get("vmsd_name")
                            .and_then(Json::as_str)
                            .map(String::from),
                        fields: vw.fields,
                        subsections: vw.subsections,
                    }
                })
            }
        };
        self.file.description = Some(desc);
        result
    }
}

/// Walks a vmstate body with its JSON description (the struct object of
/// `vmstate_save_state_v`: `fields`, each with `name`, `type`, `size`, optional `array_len`
/// and, for `struct`, a nested `struct` object; then `subsections`).
struct VmstateWalk<'a, 's> {
    data: &'a [u8],
    pos: usize,
    section: &'s str,
    max_depth: u32,
    fields: u64,
    subsections: u64,
}

impl VmstateWalk<'_, '_> {
    fn field_err(&self, offset: usize, path: &Path<'_>, reason: &'static str) -> QevmError {
        QevmError::Field {
            offset: offset as u64,
            section: self.section.to_string(),
            field: path.render(),
            reason,
        }
    }

    /// Consumes `n` bytes; returns where they start.
    fn take(&mut self, n: u64, path: &Path<'_>) -> Result<usize, QevmError> {
        let start = self.pos;
        if n > (self.data.len() - self.pos) as u64 {
            return Err(self.field_err(start, path, "truncated"));
        }
        self.pos += n as usize;
        Ok(start)
    }

    fn walk(&mut self, desc: &Json, path: &Path<'_>, depth: u32) -> Result<(), QevmError> {
        if depth > self.max_depth {
            return Err(self.field_err(self.pos, path, "structs nest too deep"));
        }
        let Some(fields) = desc.get("fields").and_then(Json::as_array) else {
            return Err(self.field_err(self.pos, path, "the description has no field list"));
        };
        for f in fields {
            let name = f.get("name").and_then(Json::as_str).unwrap_or("?");
            let here = Path {
                parent: Some(path),
                name,
            };
            let Some(ty) = f.get("type").and_then(Json::as_str) else {
                return Err(self.field_err(self.pos, &here, "the description gives no type"));
            };
            let Some(size) = f
                .get("size")
                .and_then(Json::as_i64)
                .and_then(|s| u64::try_from(s).ok())
            else {
                return Err(self.field_err(self.pos, &here, "the description gives no size"));
            };
            let count = match f.get("array_len") {
                None => 1,
                Some(n) => n
                    .as_i64()
                    .and_then(|n| u64::try_from(n).ok())
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| self.field_err(self.pos, &here, "bad array_len"))?,
            };
            match ty {
                "struct" => {
                    let Some(inner) = f.get("struct") else {
                        return Err(self.field_err(
                            self.pos,
                            &here,
                            "struct without a description",
                        ));
                    };
                    // Each element consumes `size` bytes (checked), so a long array of
                    // non-empty elements is bounded by the input; empty ones are walked once.
                    let left = (self.data.len() - self.pos) as u64;
                    if size.checked_mul(count).is_none_or(|t| t > left) {
                        return Err(self.field_err(self.pos, &here, "truncated"));
                    }
                    let walks = if size == 0 { 1 } else { count };
                    for _ in 0..walks {
                        let start = self.pos;
                        self.walk(inner, &here, depth + 1)?;
                        let walked = (self.pos - start) as u64;
                        if walked != size {
                            return Err(QevmError::FieldSize {
                                offset: start as u64,
                                section: self.section.to_string(),
                                field: here.render(),
                                described: size,
                                walked,
                            });
                        }
                        self.fields += 1;
                    }
                }
                "nullptr" => {
                    for _ in 0..count {
                        let start = self.take(size, &here)?;
                        if &self.data[start..self.pos] != b"0" {
                            return Err(self.field_err(
                                start,
                                &here,
                                "null pointer marker is not '0'",
                            ));
                        }
                        self.fields += 1;
                    }
                }
                _ => {
                    let Some(total) = size.checked_mul(count) else {
                        return Err(self.field_err(self.pos, &here, "array size overflows"));
                    };
                    self.take(total, &here)?;
                    self.fields += count;
                }
            }
        }
        if let Some(subs) = desc.get("subsections") {
            let Some(subs) = subs.as_array() else {
                return Err(self.field_err(self.pos, path, "subsections is not an array"));
            };
            for sub in subs {
                let start = self.pos;
                let name = sub.get("vmsd_name").and_then(Json::as_str).unwrap_or("?");
                let here = Path {
                    parent: Some(path),
                    name,
                };
                let t = self.take(1, &here)?;
                if self.data[t] != QEMU_VM_SUBSECTION {
                    return Err(self.field_err(start, &here, "subsection marker missing"));
                }
                let len = self.data[self.take(1, &here)?];
                let n = self.take(u64::from(len), &here)?;
                if &self.data[n..self.pos] != name.as_bytes() {
                    return Err(self.field_err(
                        start,
                        &here,
                        "subsection name differs from the description",
                    ));
                }
                let v = self.take(4, &here)?;
                let version = u32::from_be_bytes([
                    self.data[v],
                    self.data[v + 1],
                    self.data[v + 2],
                    self.data[v + 3],
                ]);
                if sub.get("version").and_then(Json::as_i64) != Some(i64::from(version)) {
                    return Err(self.field_err(
                        v,
                        &here,
                        "subsection version differs from the description",
                    ));
                }
                self.walk(sub, &here, depth + 1)?;
                self.subsections += 1;
            }
        }
        Ok(())
    }
}
