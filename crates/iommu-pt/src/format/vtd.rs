//! VT-d second-stage page table (scalable mode).
//!
//! ```text
//!  63..52   51.............12  11   10  9  8  7   6..2   1  0
//!  (ign)    address (< HAW)    SNP  -   D  A  PS  -      W  R
//! ```
//!
//! An entry is present when R or W is set (`dma_pte_present`). PS marks a 2 MiB (level 2) or
//! 1 GiB (level 3) leaf; PS at level 4 or above is invalid. Non-leaf entries are written with
//! R and W set, as Linux does. With SSADE set in the PASID entry the IOMMU sets A on every
//! access and D on writes, atomically.
//!
//! Values: Linux 6.12 `drivers/iommu/intel/iommu.h` (`DMA_PTE_READ` bit 0, `DMA_PTE_WRITE` 1,
//! `DMA_PTE_LARGE_PAGE` 7, `DMA_PTE_SNP` 11, `DMA_SL_PTE_DIRTY_BIT` 9, `VTD_PAGE_MASK`); the
//! accessed bit 8 is from the VT-d specification's second-stage entry format (§9.8), which
//! Linux 6.12 does not use.

use super::{BitOp, HwAccess, Leaf, PageTableFormat, Perm, Pte, level_size};
use crate::config::AdUpdate;
use crate::format::{FaultKind, FormatKind, check_oa};

const R: u64 = 1 << 0;
const W: u64 = 1 << 1;
const PS: u64 = 1 << 7;
const A: u64 = 1 << 8;
const D: u64 = 1 << 9;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// VT-d second-stage format: 3, 4 or 5 levels (39-, 48- or 57-bit IOVA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdSecondStage {
    width: u8,
    oa_bits: u8,
    page_sizes: u64,
}

impl VtdSecondStage {
    /// A table covering `width` bits of IOVA (39, 48 or 57, CAP.SAGAW), mapping up to
    /// `oa_bits` of host physical address, with 4 KiB, 2 MiB and 1 GiB leaves.
    pub fn new(width: u8, oa_bits: u8) -> Result<Self, crate::Error> {
        Self::with_page_sizes(width, oa_bits, (1 << 12) | (1 << 21) | (1 << 30))
    }

    /// As [`new`](Self::new) with the leaf sizes CAP.SLLPS allows
    /// ([`VtdCaps::second_stage_page_sizes`](crate::caps::VtdCaps::second_stage_page_sizes)).
    pub fn with_page_sizes(width: u8, oa_bits: u8, page_sizes: u64) -> Result<Self, crate::Error> {
        if !matches!(width, 39 | 48 | 57) {
            return Err(crate::Error::Config(
                "VT-d second-stage width must be 39, 48 or 57 bits",
            ));
        }
        check_oa(oa_bits)?;
        let page_sizes = page_sizes & ((1 << 12) | (1 << 21) | (1 << 30));
        if page_sizes & (1 << 12) == 0 {
            return Err(crate::Error::Config(
                "VT-d second stage always has 4 KiB pages",
            ));
        }
        Ok(VtdSecondStage {
            width,
            oa_bits,
            page_sizes,
        })
    }

    fn oa_mask(&self) -> u64 {
        ADDR & ((1u64 << self.oa_bits) - 1)
    }
}

impl PageTableFormat for VtdSecondStage {
    fn kind(&self) -> FormatKind {
        FormatKind::VtdSecondStage
    }

    fn levels(&self) -> u8 {
        (self.width - 12) / 9
    }

    fn iova_bits(&self) -> u8 {
        self.width
    }

    fn oa_bits(&self) -> u8 {
        self.oa_bits
    }

    fn page_sizes(&self) -> u64 {
        self.page_sizes
    }

    fn decode(&self, raw: u64, level: u8) -> Pte {
        if raw & (R | W) == 0 {
            return Pte::Absent;
        }
        if level > 1 && raw & PS == 0 {
            return Pte::Table { pa: raw & ADDR };
        }
        if level > 3 {
            return Pte::Malformed("PS set at level 4 or above");
        }
        let size = level_size(level);
        Pte::Leaf(Leaf {
            pa: raw & ADDR & !(size - 1),
            size,
            perm: Perm {
                read: raw & R != 0,
                write: raw & W != 0,
            },
            accessed: raw & A != 0,
            dirty: raw & D != 0,
            dbm: false,
            reserved: (raw & ADDR & !self.oa_mask()) | (raw & ADDR & (size - 1)),
        })
    }

    fn table(&self, pa: u64, _level: u8) -> u64 {
        (pa & ADDR) | R | W
    }

    fn leaf(&self, pa: u64, _size: u64, level: u8, perm: Perm, _track: bool) -> u64 {
        let mut raw = pa & ADDR;
        if level > 1 {
            raw |= PS;
        }
        if perm.read {
            raw |= R;
        }
        if perm.write {
            raw |= W;
        }
        raw
    }

    fn resize_leaf(&self, raw: u64, pa: u64, _size: u64, level: u8) -> u64 {
        let mut v = (raw & !(ADDR | PS)) | (pa & ADDR);
        if level > 1 {
            v |= PS;
        }
        v
    }

    #[inline(always)]
    fn is_dirty(&self, raw: u64, level: u8) -> bool {
        let leaf = level == 1 || (raw & PS != 0 && level <= 3);
        raw & D != 0 && raw & (R | W) != 0 && leaf
    }

    #[inline(always)]
    fn is_table(&self, raw: u64, level: u8) -> bool {
        level > 1 && raw & (R | W) != 0 && raw & PS == 0
    }

    fn dirty_hint(&self) -> (u64, u64) {
        (0, D)
    }

    fn table_hint(&self) -> (u64, u64) {
        // A pointer has PS clear.
        (PS, PS)
    }

    fn fast_dirty(&self, level: u8) -> (u64, u64, u64) {
        // Writable (the IOMMU only sets D through W), accessed, dirty; PS as the level needs.
        match level {
            1 => (W | A | D, W | A | D, D),
            2 | 3 => (W | A | D | PS, W | A | D | PS, D),
            _ => (0, 1, 0), // never matches
        }
    }

    fn clean_op(&self) -> BitOp {
        BitOp::Clear(D)
    }

    fn dirty_op(&self) -> BitOp {
        BitOp::Set(D)
    }

    fn accessed_bit(&self) -> u64 {
        A
    }

    #[inline(always)]
    fn settled(&self, raw: u64) -> bool {
        raw & (A | D) == (A | D)
    }

    fn hw_access(&self, raw: u64, _level: u8, write: bool, ad: AdUpdate) -> HwAccess {
        if raw & (R | W) == 0 {
            return HwAccess::Fault(FaultKind::NotPresent);
        }
        if (write && raw & W == 0) || (!write && raw & R == 0) {
            return HwAccess::Fault(FaultKind::Permission);
        }
        let mut new = raw;
        if ad.access {
            new |= A;
        }
        if write && ad.dirty {
            new |= D;
        }
        HwAccess::Allow {
            update: (new != raw).then_some(new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_linux() {
        let f = VtdSecondStage::new(48, 46).unwrap();
        assert_eq!(f.levels(), 4);
        assert_eq!(f.table(0x7000, 2), 0x7000 | R | W);
        assert_eq!(
            f.leaf(0x20_0000, 2 << 20, 2, Perm::RW, false),
            0x20_0000 | PS | R | W
        );
        assert_eq!(f.leaf(0x3000, 4096, 1, Perm::W, false), 0x3000 | W);
        assert_eq!(f.decode(D, 1), Pte::Absent);
        assert!(!f.is_dirty(D, 1));
        assert!(f.is_dirty(D | R, 1));
        assert_eq!(
            f.decode(PS | R, 4),
            Pte::Malformed("PS set at level 4 or above")
        );
        match f.decode((1 << 47) | 0x1000 | R, 1) {
            Pte::Leaf(l) => assert_eq!(l.reserved, 1 << 47),
            other => panic!("{other:?}"),
        }
        assert!(VtdSecondStage::new(40, 46).is_err());
    }
}
