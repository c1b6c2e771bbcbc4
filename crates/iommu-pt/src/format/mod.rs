//! IO page-table formats behind one trait.
//!
//! All five formats are radix trees of 4 KiB tables holding 512 little-endian 64-bit entries.
//! This crate numbers levels from the leaf up, as the AMD-Vi and VT-d specifications do:
//!
//! ```text
//!  level  entry maps   AMD-Vi v1          VT-d second stage    x86-64 first stage   Arm LPAE 4K (S1/S2)
//!  ─────  ──────────   ─────────────────  ───────────────────  ───────────────────  ───────────────────
//!    5    256 TiB      PDE (NextLevel=4)  PDE                  PML5E                -
//!    4    512 GiB      PDE (NextLevel=3)  PDE                  PML4E                L0 table descriptor
//!    3    1 GiB        PDE / 1G leaf      PDE / 1G leaf (PS)   PDPE / 1G leaf (PS)  L1 table / block
//!    2    2 MiB        PDE / 2M leaf      PDE / 2M leaf (PS)   PDE / 2M leaf (PS)   L2 table / block
//!    1    4 KiB        4K leaf            4K leaf              PTE (4K leaf)        L3 page
//!         (AMD-Vi also maps 8K..1M, 4M..512M, ... with NextLevel=7 entries replicated
//!          across 2..256 consecutive slots of one table)
//! ```
//!
//! A [`PageTableFormat`] knows how to encode and decode one entry, where the dirty state
//! lives, how to clean it, and what the hardware does when a DMA goes through a leaf
//! ([`hw_access`](PageTableFormat::hw_access), used by the hardware model). The tree itself is
//! [`PageTable`](crate::PageTable).

mod amd;
mod arm;
mod vtd;
mod x86;

pub use amd::AmdV1;
pub use arm::{ArmS1, ArmS2};
pub use vtd::VtdSecondStage;
pub use x86::X86FirstStage;

use core::fmt;

use crate::config::AdUpdate;

/// Entries per table (4 KiB of 8-byte entries).
pub const ENTRIES: usize = 512;

/// log2 of the span of one entry of a table at `level` (1 = 4 KiB).
#[inline]
pub const fn level_shift(level: u8) -> u32 {
    12 + 9 * (level as u32 - 1)
}

/// The span in bytes of one entry of a table at `level`; saturates at 2^63 for level 7.
#[inline]
pub const fn level_size(level: u8) -> u64 {
    let s = level_shift(level);
    if s >= 64 { 1 << 63 } else { 1 << s }
}

/// Number of levels needed to translate `bits` of input address with 4 KiB tables.
pub const fn levels_for_bits(bits: u8) -> u8 {
    (bits.saturating_sub(12)).div_ceil(9)
}

/// Which format a [`PageTableFormat`] implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormatKind {
    /// AMD-Vi v1 host page table.
    AmdV1,
    /// VT-d second-stage (scalable mode) page table.
    VtdSecondStage,
    /// Arm VMSAv8-64 LPAE, 4 KiB granule, stage 1 (SMMUv3 CD).
    ArmS1,
    /// Arm VMSAv8-64 LPAE, 4 KiB granule, stage 2 (SMMUv3 STE).
    ArmS2,
    /// x86-64 paging: VT-d first stage (scalable mode) and AMD-Vi v2 guest page tables.
    X86FirstStage,
}

impl fmt::Display for FormatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FormatKind::AmdV1 => "AMD-Vi v1",
            FormatKind::VtdSecondStage => "VT-d second stage",
            FormatKind::ArmS1 => "Arm LPAE stage 1",
            FormatKind::ArmS2 => "Arm LPAE stage 2",
            FormatKind::X86FirstStage => "x86-64 first stage",
        })
    }
}

/// Access a mapping grants to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm {
    /// DMA reads allowed.
    pub read: bool,
    /// DMA writes allowed.
    pub write: bool,
}

impl Perm {
    /// Read-only.
    pub const R: Perm = Perm {
        read: true,
        write: false,
    };
    /// Write-only (AMD-Vi and VT-d only).
    pub const W: Perm = Perm {
        read: false,
        write: true,
    };
    /// Read and write.
    pub const RW: Perm = Perm {
        read: true,
        write: true,
    };
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}",
            if self.read { 'r' } else { '-' },
            if self.write { 'w' } else { '-' }
        )
    }
}

/// A decoded leaf entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Physical address of the start of the page (of the whole page, for replicated entries).
    pub pa: u64,
    /// Page size in bytes.
    pub size: u64,
    /// Permissions (a writable-clean Arm entry counts as writable).
    pub perm: Perm,
    /// Accessed flag (AMD A, VT-d A, Arm AF).
    pub accessed: bool,
    /// Dirty state (AMD/VT-d D; Arm: DBM set and the write permission taken).
    pub dirty: bool,
    /// Arm only: DBM is set, so the dirty state is tracked in this entry.
    pub dbm: bool,
    /// Must-be-zero bits that are set (0 when none).
    pub reserved: u64,
}

/// One decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pte {
    /// Not present: a DMA through it faults.
    Absent,
    /// Points at the next-level table.
    Table {
        /// Physical address of the table.
        pa: u64,
    },
    /// Maps a page.
    Leaf(Leaf),
    /// A bit pattern the hardware rejects; names the rule.
    Malformed(&'static str),
}

/// Why the hardware refused an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// No valid translation.
    NotPresent,
    /// The leaf does not grant the access.
    Permission,
    /// Arm: AF is clear and hardware access-flag update is off.
    AccessFlag,
    /// The walk met a malformed entry.
    Malformed,
    /// The input address is beyond what the table translates (x86-64 first stage: not
    /// canonical-low).
    OutOfRange,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::NotPresent => "translation fault (not present)",
            FaultKind::Permission => "permission fault",
            FaultKind::AccessFlag => "access flag fault",
            FaultKind::Malformed => "malformed page-table entry",
            FaultKind::OutOfRange => "input address beyond the translated range",
        })
    }
}

/// What the IOMMU does when a DMA goes through a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwAccess {
    /// The access faults; the entry is not modified.
    Fault(FaultKind),
    /// The access proceeds.
    Allow {
        /// The value the IOMMU writes back atomically (A/D set, AP\[2\] cleared, ...), if
        /// any. `None` means the entry already records everything this access would record,
        /// so an IOTLB holding a copy of it serves the access without touching memory.
        update: Option<u64>,
    },
}

/// A single atomic bit operation on an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitOp {
    /// Clear these bits (`fetch_and(!mask)`).
    Clear(u64),
    /// Set these bits (`fetch_or(mask)`).
    Set(u64),
}

impl BitOp {
    /// Apply to a value.
    #[inline]
    pub const fn apply(self, raw: u64) -> u64 {
        match self {
            BitOp::Clear(m) => raw & !m,
            BitOp::Set(m) => raw | m,
        }
    }
}

/// An IO page-table entry format.
///
/// Implementations are small `Copy` values holding the format's parameters (levels, address
/// widths, page sizes). Every method is total: any `u64` decodes, and encoders mask their
/// inputs to the fields they fill.
pub trait PageTableFormat: Clone + fmt::Debug + Send + Sync + 'static {
    /// Whether a page may be encoded as several identical entries (AMD-Vi NextLevel=7).
    const REPLICATES: bool = false;

    /// Which format this is.
    fn kind(&self) -> FormatKind;
    /// Number of table levels (the root table is at level `levels()`).
    fn levels(&self) -> u8;
    /// Input (IOVA) address width in bits.
    fn iova_bits(&self) -> u8;
    /// Output (physical) address width in bits.
    fn oa_bits(&self) -> u8;
    /// Bitmap of the leaf sizes this table may use.
    fn page_sizes(&self) -> u64;
    /// Whether a leaf may be write-only.
    fn write_only(&self) -> bool {
        true
    }

    /// The table level that holds a leaf of `size` and how many consecutive entries it fills.
    /// `size` must be one of [`page_sizes`](Self::page_sizes).
    fn leaf_slot(&self, size: u64) -> (u8, usize) {
        let log = size.trailing_zeros();
        (((log - 12) / 9 + 1) as u8, 1)
    }

    /// Decode an entry of a table at `level`.
    fn decode(&self, raw: u64, level: u8) -> Pte;
    /// Encode a pointer to a table at `level - 1`, held in a table at `level`.
    fn table(&self, pa: u64, level: u8) -> u64;
    /// Encode a clean leaf of `size` at `pa` held in a table at `level`. With `track` the
    /// leaf carries its dirty-tracking state in the entry (Arm: DBM), starting clean.
    fn leaf(&self, pa: u64, size: u64, level: u8, perm: Perm, track: bool) -> u64;

    /// The leaf `raw` re-encoded for a page of `size` at `pa`, held in a table at `level`,
    /// keeping every other attribute and the accessed/dirty state. Used to split a page into
    /// smaller ones (each child inherits the parent's dirty state) and to collapse pages into a
    /// block.
    fn resize_leaf(&self, raw: u64, pa: u64, size: u64, level: u8) -> u64;

    /// `true` if `raw` is a well-formed leaf for `level` that records a write. Exact and
    /// cheap (a few bit operations): the harvest loop calls it for every entry.
    fn is_dirty(&self, raw: u64, level: u8) -> bool;
    /// `true` if `raw` points at a next-level table (never at level 1). Cheap, like
    /// [`is_dirty`](Self::is_dirty).
    fn is_table(&self, raw: u64, level: u8) -> bool;
    /// `true` if `raw` is one replica of a page spanning several entries (AMD-Vi NextLevel=7).
    #[inline(always)]
    fn is_replica(&self, raw: u64) -> bool {
        let _ = raw;
        false
    }
    /// The common case of the harvest as one mask test: `(mask, value, xor)` such that a
    /// `raw` with `raw & mask == value` is a dirty, [settled](Self::settled), non-replicated
    /// leaf at `level`, and `raw ^ xor` is its cleaned value. Entries that fail the test go
    /// through the exact (slower) checks.
    fn fast_dirty(&self, level: u8) -> (u64, u64, u64);
    /// A necessary condition for [`is_dirty`](Self::is_dirty) as one bit: `(flip, bit)` such
    /// that a dirty `raw` has `(raw ^ flip) & bit != 0`. Lets the harvest reject eight clean
    /// entries with one test.
    fn dirty_hint(&self) -> (u64, u64);
    /// A necessary condition for [`is_table`](Self::is_table) as one bit, like
    /// [`dirty_hint`](Self::dirty_hint).
    fn table_hint(&self) -> (u64, u64);
    /// The page size of the present leaf `raw` at `level` (differs from the entry span only for
    /// replicated entries).
    fn leaf_size(&self, raw: u64, level: u8) -> u64 {
        let _ = raw;
        level_size(level)
    }
    /// The atomic operation that returns a dirty leaf to writable-clean.
    fn clean_op(&self) -> BitOp;
    /// The atomic operation that marks a writable, tracked leaf dirty.
    fn dirty_op(&self) -> BitOp;
    /// The accessed bit the hardware sets, if the format has one in the same word.
    fn accessed_bit(&self) -> u64;
    /// `true` if the hardware cannot change `raw` any further: every bit it may update
    /// (access and dirty state) is already in its final state. Such an entry may be cleaned
    /// with a plain store instead of an atomic read-modify-write; see
    /// [`PageTable::read_and_clear_dirty`](crate::PageTable::read_and_clear_dirty).
    fn settled(&self, raw: u64) -> bool;
    /// Turn dirty tracking on or off in a leaf (Arm: DBM/AP\[2\] or DBM/S2AP\[1\]); the
    /// identity for formats whose tracking is switched in the device context instead.
    fn set_tracking(&self, raw: u64, enable: bool) -> u64 {
        let _ = enable;
        raw
    }
    /// Whether [`set_tracking`](Self::set_tracking) rewrites leaves.
    fn tracking_in_pte(&self) -> bool {
        false
    }

    /// What the IOMMU does for a read or write through the present leaf `raw` at `level`,
    /// with the accessed/dirty updates `ad` the device context enables.
    fn hw_access(&self, raw: u64, level: u8, write: bool, ad: AdUpdate) -> HwAccess;

    /// What the IOMMU does to the table pointer `raw` at `level` it walks through on an IOTLB
    /// miss: check the permissions the pointer restricts and set its accessed flag where the
    /// architecture does (x86-64 first stage: A in every entry walked, VT-d §3.6). The default
    /// leaves pointers alone, which is what the model does for the other formats.
    fn hw_walk(&self, raw: u64, level: u8, write: bool, ad: AdUpdate) -> HwAccess {
        let _ = (raw, level, write, ad);
        HwAccess::Allow { update: None }
    }
}

/// Checks shared by the format constructors.
pub(crate) fn check_oa(bits: u8) -> Result<(), crate::Error> {
    if !(32..=52).contains(&bits) {
        return Err(crate::Error::Config(
            "output address width must be 32..=52 bits",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_geometry() {
        assert_eq!(level_size(1), 4096);
        assert_eq!(level_size(2), 2 << 20);
        assert_eq!(level_size(3), 1 << 30);
        assert_eq!(level_size(4), 512 << 30);
        assert_eq!(levels_for_bits(39), 3);
        assert_eq!(levels_for_bits(48), 4);
        assert_eq!(levels_for_bits(57), 5);
        assert_eq!(levels_for_bits(40), 4);
        assert_eq!(levels_for_bits(64), 6);
    }
}
