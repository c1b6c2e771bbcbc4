//! The crate's error type.

use crate::config::Problem;
use crate::format::FormatKind;

/// Everything a page-table operation can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A parameter of a format, arena or bitmap is out of its range.
    #[error("invalid parameters: {0}")]
    Config(&'static str),
    /// An address or size is not aligned as the rule requires.
    #[error("{what} {value:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// Which value ("IOVA", "physical address", "size", ...).
        what: &'static str,
        /// The value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// A zero-length range.
    #[error("empty range at IOVA {iova:#x}")]
    EmptyRange {
        /// Start of the range.
        iova: u64,
    },
    /// The range leaves the format's IOVA space (or wraps around 2^64).
    #[error("IOVA range {iova:#x}+{size:#x} is outside the {bits}-bit input address space")]
    IovaOutOfRange {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        size: u64,
        /// The format's input address width.
        bits: u8,
    },
    /// The physical range leaves the format's output address space.
    #[error("physical range {pa:#x}+{size:#x} is outside the {bits}-bit output address space")]
    PaOutOfRange {
        /// Start of the physical range.
        pa: u64,
        /// Length of the range.
        size: u64,
        /// The format's output address width.
        bits: u8,
    },
    /// A map request overlaps an existing mapping.
    #[error("IOVA {iova:#x} is already mapped")]
    Overlap {
        /// The first mapped IOVA found in the requested range.
        iova: u64,
    },
    /// An unmap would cut a larger page in two.
    #[error(
        "range {iova:#x}+{size:#x} cuts the {leaf_size:#x}-byte page at IOVA {leaf_iova:#x}; split it first"
    )]
    PartialLeaf {
        /// Start of the requested range.
        iova: u64,
        /// Length of the requested range.
        size: u64,
        /// Start of the page that would be cut.
        leaf_iova: u64,
        /// Size of that page.
        leaf_size: u64,
    },
    /// The format cannot use this page size.
    #[error("{format} cannot use page size {size:#x} (supported sizes bitmap {supported:#x})")]
    PageSize {
        /// The format.
        format: FormatKind,
        /// The requested size.
        size: u64,
        /// The supported sizes.
        supported: u64,
    },
    /// A mapping must allow reads or writes.
    #[error("a mapping must allow DMA reads or writes")]
    NoAccess,
    /// The format has no write-only encoding.
    #[error("{0} cannot express write-only mappings")]
    WriteOnly(FormatKind),
    /// The physical memory holding tables is exhausted.
    #[error("out of page-table memory")]
    NoMemory,
    /// A table pointer leads outside the table memory.
    #[error(
        "entry for IOVA {iova:#x} at level {level} points to {pa:#x}, which is not a table frame"
    )]
    BadTablePointer {
        /// IOVA being translated.
        iova: u64,
        /// Level of the table holding the pointer.
        level: u8,
        /// The pointer.
        pa: u64,
    },
    /// A malformed entry was found in the table.
    #[error("malformed entry {raw:#018x} at level {level} for IOVA {iova:#x}: {why}")]
    Malformed {
        /// IOVA being translated.
        iova: u64,
        /// Level of the entry.
        level: u8,
        /// The entry.
        raw: u64,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A structure read from hardware or memory (register, descriptor, log entry) breaks a
    /// rule of its layout; names the field.
    #[error("{what}: {problem}")]
    Decode {
        /// The structure.
        what: &'static str,
        /// The field, the value found and the rule.
        problem: Problem,
    },
    /// A structure is shorter than its layout.
    #[error("{what}: {got} bytes, the layout has {need}")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Bytes given.
        got: usize,
        /// Bytes the layout needs.
        need: usize,
    },
}
