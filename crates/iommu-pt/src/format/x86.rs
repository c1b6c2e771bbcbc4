//! x86-64 paging entries as an IOMMU walks them: VT-d first-stage tables (scalable mode, PASID
//! entry PGTT = 001b) and AMD-Vi v2 (guest) page tables.
//!
//! ```text
//!  63  62..52  51.........12  11..9  8  7   6  5  4    3    2    1    0
//!  XD  (ign)   address        (ign)  G  PS  D  A  PCD  PWT  U/S  R/W  P
//!                                       (PAT at level 1; at levels 2/3 with PS=1 bit 12 is PAT
//!                                        and the address starts at bit 21 / 30)
//!  level 5 PML5E, 4 PML4E: table pointers only (PS reserved)   level 3 PDPE: table or 1 GiB leaf
//!  level 2 PDE: table or 2 MiB leaf                            level 1 PTE: 4 KiB leaf
//! ```
//!
//! An entry is present when P is set. The access a leaf grants is the AND of R/W and of U/S over
//! every level walked; DMA without a PASID (and with one, unless the request is privileged and
//! the PASID entry sets SRE) is a user-privilege access, so U/S must be 1 at every level. There
//! is no read permission bit: a present entry is readable, so the format cannot express
//! write-only mappings.
//!
//! Accessed and dirty flags, as the VT-d specification describes first-stage translation
//! (chapter 3.6, "First-Stage Translation", the accessed/dirty flag rules of §3.6.2): on a
//! translation that walks the tables (an IOTLB miss), the IOMMU sets A in **every** entry it
//! uses, and on a write it also sets D in the leaf, each with an atomic read-modify-write.
//! There is no enable bit: first-stage A/D updates cannot be switched off (unlike second-stage
//! SSADE or AMD-Vi DTE.HAD). A write that hits a cached translation whose D is clear must set D
//! in memory; a cached translation whose D is already set serves writes without touching memory,
//! so after software clears D it must invalidate the IOTLB (PASID-based IOTLB invalidation,
//! descriptor type 6, [`crate::vtd::InvDesc::pasid_iotlb`]).
//!
//! QEMU 10.0's intel-iommu (`x-flts=on`) deviates in two ways that both lose dirty state
//! (measured, `shared/recipes/vtd-firmware.md`): its A/D update does nothing when *any* flag it
//! would set is already set, so a leaf whose A is already 1 never gets D; and a write served by
//! an IOTLB entry filled by a read sets no D. Harvest with
//! [`HarvestOptions::clear_accessed`](crate::HarvestOptions::clear_accessed) (clear A with D)
//! and invalidate to stay correct there. The crate's model follows the specification, not QEMU.
//!
//! Values: Linux 6.12 `drivers/iommu/intel/iommu.h` (`DMA_FL_PTE_PRESENT` bit 0,
//! `DMA_PTE_WRITE` bit 1 used as R/W, `DMA_FL_PTE_US` 2, `DMA_FL_PTE_ACCESS` 5,
//! `DMA_FL_PTE_DIRTY` 6, `DMA_PTE_LARGE_PAGE` 7) as `__domain_mapping` and `pfn_to_dma_pte` in
//! `iommu.c` write them; `drivers/iommu/amd/io_pgtable_v2.c` (`IOMMU_PAGE_PRESENT` 0, `_RW` 1,
//! `_USER` 2, `_PWT` 3, `_PCD` 4, `_ACCESS` 5, `_DIRTY` 6, `_PSE` 7, `_NX` 63) for AMD-Vi v2
//! (AMD I/O Virtualization Technology specification, pub. 48882, "guest page tables" use the
//! x86-64 long-mode format). The G bit 8, PAT positions (bit 7 in a PTE, bit 12 in a large
//! leaf) and the reserved bits of large leaves are the x86-64 paging format (Intel SDM vol. 3A
//! §4.5) that VT-d §9 "first-stage paging entries" reuses; the section numbers of the VT-d
//! specification are cited as recalled (no copy was available here). Linux 6.12 maps every
//! first-stage leaf with A (and D when writable) already set (`__domain_mapping`), so it never
//! tracks dirty pages in first-stage tables; this crate maps leaves with A and D clear.
//!
//! Only the lower canonical half is used: 47 bits of IOVA with four levels, 56 with five (Linux
//! does the same: `paging_domain_alloc` sets the aperture end to `2^(gaw - 1) - 1` for
//! first-stage domains). Higher addresses are not canonical-low and fault (reason 0x80).

use super::{BitOp, HwAccess, Leaf, PageTableFormat, Perm, Pte, level_size};
use crate::config::AdUpdate;
use crate::format::{FaultKind, FormatKind, check_oa};

const P: u64 = X86FirstStage::P;
const RW: u64 = X86FirstStage::RW;
const US: u64 = X86FirstStage::US;
const A: u64 = X86FirstStage::A;
const D: u64 = X86FirstStage::D;
const PS: u64 = X86FirstStage::PS;
const PAT_LARGE: u64 = X86FirstStage::PAT_LARGE;
const ADDR: u64 = X86FirstStage::ADDR;

const SIZES: u64 = (1 << 12) | (1 << 21) | (1 << 30);

/// x86-64 first-stage format (VT-d first stage, AMD-Vi v2): 4 levels (47-bit IOVA, the lower
/// canonical half of 48 bits) or 5 levels (56 bits of 57), with 4 KiB, 2 MiB and (if the IOMMU
/// supports them) 1 GiB leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X86FirstStage {
    levels: u8,
    oa_bits: u8,
    page_sizes: u64,
}

impl X86FirstStage {
    /// Bit 0, P: present.
    pub const P: u64 = 1 << 0;
    /// Bit 1, R/W: writes allowed when set (AND over the walk).
    pub const RW: u64 = 1 << 1;
    /// Bit 2, U/S: user-privilege accesses allowed when set (AND over the walk).
    pub const US: u64 = 1 << 2;
    /// Bit 3, PWT: page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// Bit 4, PCD: page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// Bit 5, A: accessed; set by the IOMMU in every entry a walk uses.
    pub const A: u64 = 1 << 5;
    /// Bit 6, D: dirty; set by the IOMMU in the leaf on a write (leaves only).
    pub const D: u64 = 1 << 6;
    /// Bit 7, PS: page size; a 2 MiB (level 2) or 1 GiB (level 3) leaf. In a PTE (level 1)
    /// this bit is PAT; in a PML4E/PML5E it is reserved.
    pub const PS: u64 = 1 << 7;
    /// Bit 8, G: global (leaves; ignored by the IOMMU).
    pub const G: u64 = 1 << 8;
    /// Bit 12 of a 2 MiB or 1 GiB leaf: PAT.
    pub const PAT_LARGE: u64 = 1 << 12;
    /// Bit 63, XD: execute disable.
    pub const XD: u64 = 1 << 63;
    /// Bits 51:12: the physical address of the next table or of the page.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

    /// A table of `levels` levels (4, or 5 with VT-d PASID-entry FLPM = 01b / AMD-Vi
    /// DTE GuestPagingMode = 5-level) mapping up to `oa_bits` of physical address, with 4 KiB,
    /// 2 MiB and 1 GiB leaves.
    pub fn new(levels: u8, oa_bits: u8) -> Result<Self, crate::Error> {
        Self::with_page_sizes(levels, oa_bits, SIZES)
    }

    /// As [`new`](Self::new) with the leaf sizes the IOMMU allows: 1 GiB only with VT-d
    /// CAP.FS1GP ([`VtdCaps::first_stage_page_sizes`](crate::caps::VtdCaps::first_stage_page_sizes)).
    pub fn with_page_sizes(levels: u8, oa_bits: u8, page_sizes: u64) -> Result<Self, crate::Error> {
        if !matches!(levels, 4 | 5) {
            return Err(crate::Error::Config(
                "x86-64 first-stage tables have 4 or 5 levels",
            ));
        }
        check_oa(oa_bits)?;
        let page_sizes = page_sizes & SIZES;
        if page_sizes & (1 << 12) == 0 {
            return Err(crate::Error::Config(
                "x86-64 first stage always has 4 KiB pages",
            ));
        }
        Ok(X86FirstStage {
            levels,
            oa_bits,
            page_sizes,
        })
    }

    fn oa_mask(&self) -> u64 {
        ADDR & ((1u64 << self.oa_bits) - 1)
    }

    #[inline(always)]
    fn is_leaf(raw: u64, level: u8) -> bool {
        level == 1 || (raw & PS != 0 && (level == 2 || level == 3))
    }
}

impl PageTableFormat for X86FirstStage {
    fn kind(&self) -> FormatKind {
        FormatKind::X86FirstStage
    }

    fn levels(&self) -> u8 {
        self.levels
    }

    fn iova_bits(&self) -> u8 {
        // The lower canonical half: 2^47 (4 levels) or 2^56 (5 levels).
        12 + 9 * self.levels - 1
    }

    fn oa_bits(&self) -> u8 {
        self.oa_bits
    }

    fn page_sizes(&self) -> u64 {
        self.page_sizes
    }

    fn write_only(&self) -> bool {
        false
    }

    fn decode(&self, raw: u64, level: u8) -> Pte {
        if raw & P == 0 {
            return Pte::Absent;
        }
        if level > 1 && raw & PS == 0 {
            return Pte::Table { pa: raw & ADDR };
        }
        if level > 3 {
            return Pte::Malformed("PS set in a PML4E or PML5E (reserved)");
        }
        if level == 3 && self.page_sizes & (1 << 30) == 0 {
            return Pte::Malformed("1 GiB leaf without first-stage 1 GiB page support");
        }
        let size = level_size(level);
        // A large leaf's bit 12 is PAT; the bits between it and the page's alignment are
        // reserved.
        let low = if level > 1 {
            ADDR & (size - 1) & !PAT_LARGE
        } else {
            0
        };
        Pte::Leaf(Leaf {
            pa: raw & ADDR & !(size - 1),
            size,
            perm: Perm {
                read: true,
                write: raw & RW != 0,
            },
            accessed: raw & A != 0,
            dirty: raw & D != 0,
            dbm: false,
            reserved: (raw & ADDR & !self.oa_mask()) | (raw & low),
        })
    }

    fn table(&self, pa: u64, _level: u8) -> u64 {
        // Permissions are the AND over the walk: pointers grant everything, leaves restrict.
        (pa & ADDR) | P | RW | US
    }

    fn leaf(&self, pa: u64, _size: u64, level: u8, perm: Perm, _track: bool) -> u64 {
        let mut raw = (pa & ADDR) | P | US;
        if level > 1 {
            raw |= PS;
        }
        if perm.write {
            raw |= RW;
        }
        raw
    }

    fn resize_leaf(&self, raw: u64, pa: u64, _size: u64, level: u8) -> u64 {
        // The PAT bit moves between bit 7 (PTE) and bit 12 (large leaf); this crate never sets
        // it, and resizing drops it: bit 12 is an address bit of the new value, bit 7 is PS.
        let mut v = (raw & !(ADDR | PS)) | (pa & ADDR);
        if level > 1 {
            v |= PS;
        }
        v
    }

    #[inline(always)]
    fn is_dirty(&self, raw: u64, level: u8) -> bool {
        raw & (P | D) == (P | D) && Self::is_leaf(raw, level)
    }

    #[inline(always)]
    fn is_table(&self, raw: u64, level: u8) -> bool {
        level > 1 && raw & (P | PS) == P
    }

    fn dirty_hint(&self) -> (u64, u64) {
        (0, D)
    }

    fn table_hint(&self) -> (u64, u64) {
        // A pointer has PS clear.
        (PS, PS)
    }

    fn fast_dirty(&self, level: u8) -> (u64, u64, u64) {
        // Present, writable (the IOMMU only sets D through R/W = 1), accessed, dirty, with PS as
        // the level needs; XD and memory-type bits are free.
        match level {
            1 => (P | RW | A | D, P | RW | A | D, D),
            2 | 3 => (P | RW | A | D | PS, P | RW | A | D | PS, D),
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

    fn hw_walk(&self, raw: u64, _level: u8, write: bool, ad: AdUpdate) -> HwAccess {
        if raw & P == 0 {
            return HwAccess::Fault(FaultKind::NotPresent);
        }
        if raw & US == 0 || (write && raw & RW == 0) {
            return HwAccess::Fault(FaultKind::Permission);
        }
        let new = if ad.access { raw | A } else { raw };
        HwAccess::Allow {
            update: (new != raw).then_some(new),
        }
    }

    fn hw_access(&self, raw: u64, _level: u8, write: bool, ad: AdUpdate) -> HwAccess {
        if raw & P == 0 {
            return HwAccess::Fault(FaultKind::NotPresent);
        }
        if raw & US == 0 || (write && raw & RW == 0) {
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

    const AD: AdUpdate = AdUpdate {
        access: true,
        dirty: true,
    };

    #[test]
    fn encodings_match_linux_and_the_recipe() {
        let f = X86FirstStage::new(4, 52).unwrap();
        assert_eq!(f.levels(), 4);
        assert_eq!(f.iova_bits(), 47);
        assert_eq!(X86FirstStage::new(5, 52).unwrap().iova_bits(), 56);
        // Pointers: address | P | R/W | U/S, what pfn_to_dma_pte writes without A (0x7, the
        // value that worked on QEMU).
        assert_eq!(f.table(0x7000, 4), 0x7007);
        // A 4 KiB RW leaf: 0x7; a 2 MiB leaf adds PS (0x87). Linux adds A and D.
        assert_eq!(f.leaf(0x5000, 4096, 1, Perm::RW, false), 0x5007);
        assert_eq!(f.leaf(0x20_0000, 2 << 20, 2, Perm::RW, false), 0x20_0087);
        assert_eq!(f.leaf(0x5000, 4096, 1, Perm::R, false), 0x5005);
        assert!(!f.write_only());
        assert!(X86FirstStage::new(3, 52).is_err());
        assert!(X86FirstStage::with_page_sizes(4, 52, 1 << 21).is_err());
    }

    #[test]
    fn decode_rules() {
        let f = X86FirstStage::new(5, 46).unwrap();
        assert_eq!(f.decode(RW | US | A | D, 1), Pte::Absent);
        assert_eq!(f.decode(0x1000 | P, 3), Pte::Table { pa: 0x1000 });
        assert_eq!(
            f.decode(0x4000_0000 | P | PS, 4),
            Pte::Malformed("PS set in a PML4E or PML5E (reserved)")
        );
        // A 2 MiB leaf: bit 12 is PAT, bits 20:13 are reserved, bits above 46 reserved here.
        let xd = X86FirstStage::XD;
        match f.decode(
            0x20_0000 | PAT_LARGE | (1 << 13) | (1 << 47) | P | PS | xd,
            2,
        ) {
            Pte::Leaf(l) => {
                assert_eq!(l.pa, 0x20_0000 | (1 << 47)); // reported in `reserved`
                assert_eq!(l.reserved, (1 << 13) | (1 << 47));
                assert_eq!(l.perm, Perm::R);
            }
            other => panic!("{other:?}"),
        }
        // At level 1 bit 7 is PAT, not PS: still a 4 KiB leaf.
        assert!(matches!(f.decode(0x3000 | P | PS, 1), Pte::Leaf(l) if l.size == 4096));
        let no1g = X86FirstStage::with_page_sizes(4, 46, (1 << 12) | (1 << 21)).unwrap();
        assert!(matches!(
            no1g.decode(0x4000_0000 | P | PS, 3),
            Pte::Malformed(_)
        ));
        assert!(no1g.is_dirty(0x4000_0000 | P | PS | D, 3)); // decode says why it is malformed
    }

    #[test]
    fn hardware_sets_a_everywhere_and_d_in_the_leaf() {
        let f = X86FirstStage::new(4, 52).unwrap();
        let ptr = f.table(0x1000, 2);
        assert_eq!(
            f.hw_walk(ptr, 2, true, AD),
            HwAccess::Allow {
                update: Some(ptr | A)
            }
        );
        assert_eq!(
            f.hw_walk(ptr | A, 2, true, AD),
            HwAccess::Allow { update: None }
        );
        assert_eq!(
            f.hw_walk(ptr & !US, 2, false, AD),
            HwAccess::Fault(FaultKind::Permission)
        );
        assert_eq!(
            f.hw_walk(ptr & !RW, 2, true, AD),
            HwAccess::Fault(FaultKind::Permission)
        );
        let rw = f.leaf(0x1000, 4096, 1, Perm::RW, false);
        assert_eq!(
            f.hw_access(rw, 1, false, AD),
            HwAccess::Allow {
                update: Some(rw | A)
            }
        );
        assert_eq!(
            f.hw_access(rw | A, 1, true, AD),
            HwAccess::Allow {
                update: Some(rw | A | D)
            }
        );
        assert_eq!(
            f.hw_access(rw | A | D, 1, true, AD),
            HwAccess::Allow { update: None }
        );
        let ro = f.leaf(0x1000, 4096, 1, Perm::R, false);
        assert_eq!(
            f.hw_access(ro, 1, true, AD),
            HwAccess::Fault(FaultKind::Permission)
        );
    }
}
