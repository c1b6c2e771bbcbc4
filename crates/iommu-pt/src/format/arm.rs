//! Arm VMSAv8-64 LPAE descriptors, 4 KiB granule, as SMMUv3 walks them.
//!
//! ```text
//!  stage 1:  54..53 XN  51 DBM  49..48 (RES0)  47..12 OA  11 nG  10 AF  9..8 SH  7 AP[2]  6 AP[1]  4..2 AttrIndx  1..0 type
//!  stage 2:  54..53 XN  51 DBM  49..48 (RES0)  47..12 OA          10 AF  9..8 SH  7 S2AP[1](W) 6 S2AP[0](R) 5..2 MemAttr  1..0 type
//!  type: 0b11 = table (levels 4..2) or page (level 1); 0b01 = block (levels 3 and 2 only)
//! ```
//!
//! Dirty state with HTTU (SMMUv3 HD, the Arm ARM's "dirty state" with DBM):
//!
//! ```text
//!  stage 1   DBM AP[2]          stage 2   DBM S2AP[1]
//!             0    1  read-only             0     0   read-only
//!             0    0  writable, untracked   0     1   writable, untracked
//!             1    1  writable-clean        1     0   writable-clean
//!             1    0  writable-dirty        1     1   writable-dirty
//! ```
//!
//! On a write to a writable-clean entry the SMMU clears AP\[2\] (sets S2AP\[1\]) atomically;
//! software cleans by setting AP\[2\] again (`iopte_set_writeable_clean`) and must then
//! invalidate the TLB. Turning tracking on or off rewrites every writable leaf.
//!
//! # Where this differs from Linux, and why
//!
//! This crate maps a writable leaf **writable-clean** (DBM, AP\[2\] set) while tracking is on
//! and **plainly writable** (no DBM) while it is off, and
//! [`set_dirty_tracking`](crate::PageTable::set_dirty_tracking) rewrites existing leaves.
//! Linux 6.12 does neither:
//! * a domain allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` gets `IO_PGTABLE_QUIRK_ARM_HD`
//!   (`arm-smmu-v3.c` lines 2450-2451), its CD gets HA and HD for its whole life (lines
//!   1402-1404), and `arm_lpae_prot_to_pte` gives every writable stage-1 leaf DBM with AP\[2\]
//!   clear, i.e. **writable-dirty** (`io-pgtable-arm.c` lines 453-456);
//! * `arm_smmu_set_dirty_tracking` does nothing, tracking being "always enabled" (`arm-smmu-v3.c`
//!   lines 3390-3398); iommufd instead reads and clears the whole IOVA range, discarding the
//!   result, before it reports tracking as enabled (`iommufd/io_pagetable.c` lines 602-606).
//!
//! The crate starts clean so that a page mapped while tracking is on is reported once written,
//! not merely because it was mapped — as on AMD-Vi and VT-d, whose D bit starts clear — which
//! lets one conformance suite hold for all four formats; and it drops DBM when tracking is off so
//! that no entry's permission then depends on HTTU. Both schemes lose no write.
//!
//! For a caller taking over a table that Linux built: every writable leaf decodes as dirty;
//! enabling tracking leaves those entries as they are (they already track), so the first harvest
//! reports every writable page once and cleans it. Harvest once and discard the result to get
//! Linux's clean start. Disabling tracking here strips DBM, which Linux never does: before giving
//! a table back to Linux's dirty tracking, enable tracking here again, because Linux reports only
//! leaves with DBM set (`iopte_writeable_dirty`, `io-pgtable-arm.c` lines 147-148, used by the
//! dirty walk at line 785) and would miss writes through leaves without it.
//!
//! Values: Linux 6.12 `drivers/iommu/io-pgtable-arm.c` (`ARM_LPAE_PTE_TYPE_*`,
//! `ARM_LPAE_PTE_ADDR_MASK` = bits 47:12, `ARM_LPAE_PTE_DBM` 51, `ARM_LPAE_PTE_AF` 10,
//! `ARM_LPAE_PTE_SH_IS`, `ARM_LPAE_PTE_nG` 11, `ARM_LPAE_PTE_AP_UNPRIV` 6,
//! `ARM_LPAE_PTE_AP_RDONLY_BIT` 7, `ARM_LPAE_PTE_HAP_READ`/`WRITE` bits 6/7,
//! `ARM_LPAE_PTE_MEMATTR_OIWB`, `ARM_LPAE_MAIR_ATTR_IDX_CACHE`, `iopte_writeable_dirty`,
//! `arm_lpae_prot_to_pte`). Stage-2 dirty state (DBM with S2AP\[1\]) is from the Arm ARM's
//! description of hardware dirty-state management; Linux 6.12 tracks dirty state at stage 1
//! only.

use super::{BitOp, HwAccess, Leaf, PageTableFormat, Perm, Pte, level_size, levels_for_bits};
use crate::config::AdUpdate;
use crate::format::{FaultKind, FormatKind, check_oa};

const VALID: u64 = 1 << 0;
const TYPE_MASK: u64 = 0b11;
const TYPE_TABLE: u64 = 0b11;
const TYPE_BLOCK: u64 = 0b01;
const ATTR_IDX_CACHE: u64 = 1 << 2;
const MEMATTR_OIWB: u64 = 0xf << 2;
const AP_UNPRIV: u64 = 1 << 6;
const AP_RDONLY: u64 = 1 << 7;
const S2AP_R: u64 = 1 << 6;
const S2AP_W: u64 = 1 << 7;
const SH_IS: u64 = 3 << 8;
const AF: u64 = 1 << 10;
const NG: u64 = 1 << 11;
const ADDR: u64 = 0x0000_ffff_ffff_f000;
const RES0_OA: u64 = 0b11 << 48;
const DBM: u64 = 1 << 51;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lpae {
    ias: u8,
    oa_bits: u8,
    stage2: bool,
}

impl Lpae {
    fn new(ias: u8, oa_bits: u8, stage2: bool) -> Result<Self, crate::Error> {
        if !(25..=48).contains(&ias) {
            return Err(crate::Error::Config(
                "Arm LPAE 4K-granule input size must be 25..=48 bits",
            ));
        }
        check_oa(oa_bits)?;
        if oa_bits > 48 {
            return Err(crate::Error::Config(
                "Arm LPAE 4K-granule output size is at most 48 bits without FEAT_LPA2",
            ));
        }
        Ok(Lpae {
            ias,
            oa_bits,
            stage2,
        })
    }

    /// The bit that is clear (stage 1) or set (stage 2) in a writable entry.
    #[inline(always)]
    fn w_bit(&self) -> u64 {
        if self.stage2 { S2AP_W } else { AP_RDONLY }
    }

    /// "Write permission present" in the raw sense (AP\[2\] clear / S2AP\[1\] set).
    #[inline(always)]
    fn write_bit_open(&self, raw: u64) -> bool {
        if self.stage2 {
            raw & S2AP_W != 0
        } else {
            raw & AP_RDONLY == 0
        }
    }

    fn writable(&self, raw: u64) -> bool {
        self.write_bit_open(raw) || raw & DBM != 0
    }

    fn decode(&self, raw: u64, level: u8) -> Pte {
        if raw & VALID == 0 {
            return Pte::Absent;
        }
        let ty = raw & TYPE_MASK;
        if level == 1 && ty != TYPE_TABLE {
            return Pte::Malformed("descriptor type 0b01 is reserved at lookup level 3");
        }
        if level > 1 && ty == TYPE_TABLE {
            return Pte::Table { pa: raw & ADDR };
        }
        if level > 3 {
            return Pte::Malformed("block descriptor at lookup level 0 (4 KiB granule)");
        }
        let size = level_size(level);
        let read = if self.stage2 { raw & S2AP_R != 0 } else { true };
        let mut reserved = (raw & RES0_OA) | (raw & ADDR & (size - 1));
        reserved |= raw & ADDR & !((1u64 << self.oa_bits) - 1);
        Pte::Leaf(Leaf {
            pa: raw & ADDR & !(size - 1),
            size,
            perm: Perm {
                read,
                write: self.writable(raw),
            },
            accessed: raw & AF != 0,
            dirty: raw & DBM != 0 && self.write_bit_open(raw),
            dbm: raw & DBM != 0,
            reserved,
        })
    }

    fn leaf(&self, pa: u64, level: u8, perm: Perm, track: bool) -> u64 {
        let mut raw = (pa & ADDR) | AF | SH_IS;
        raw |= if level == 1 { TYPE_TABLE } else { TYPE_BLOCK };
        if self.stage2 {
            raw |= MEMATTR_OIWB;
            if perm.read {
                raw |= S2AP_R;
            }
            if perm.write {
                // Tracked: writable-clean (DBM, S2AP[1] clear); else plainly writable.
                raw |= if track { DBM } else { S2AP_W };
            }
        } else {
            raw |= NG | AP_UNPRIV | ATTR_IDX_CACHE;
            if perm.write {
                if track {
                    raw |= DBM | AP_RDONLY;
                }
            } else {
                raw |= AP_RDONLY;
            }
        }
        raw
    }

    #[inline(always)]
    fn is_dirty(&self, raw: u64, level: u8) -> bool {
        // Page at level 1 (type 0b11), block at levels 2 and 3 (type 0b01).
        let ty = if level == 1 { TYPE_TABLE } else { TYPE_BLOCK };
        let w = self.w_bit();
        let want = if self.stage2 { w } else { 0 };
        raw & (TYPE_MASK | w | DBM) == (ty | want | DBM) && level <= 3
    }

    fn set_tracking(&self, raw: u64, enable: bool) -> u64 {
        let w = self.w_bit();
        if enable {
            if raw & DBM != 0 || !self.write_bit_open(raw) {
                return raw; // already tracked, or read-only
            }
            // writable -> writable-clean
            if self.stage2 {
                (raw | DBM) & !w
            } else {
                raw | DBM | w
            }
        } else if raw & DBM != 0 {
            // writable-clean or -dirty -> plainly writable
            if self.stage2 {
                (raw | w) & !DBM
            } else {
                raw & !(DBM | w)
            }
        } else {
            raw
        }
    }

    fn hw_access(&self, raw: u64, write: bool, ad: AdUpdate) -> HwAccess {
        if raw & VALID == 0 {
            return HwAccess::Fault(FaultKind::NotPresent);
        }
        let mut new = raw;
        if raw & AF == 0 {
            if !ad.access {
                return HwAccess::Fault(FaultKind::AccessFlag);
            }
            new |= AF;
        }
        if write {
            if !self.write_bit_open(raw) {
                if raw & DBM == 0 || !ad.dirty {
                    return HwAccess::Fault(FaultKind::Permission);
                }
                new = if self.stage2 {
                    new | S2AP_W
                } else {
                    new & !AP_RDONLY
                };
            }
        } else if self.stage2 && raw & S2AP_R == 0 {
            return HwAccess::Fault(FaultKind::Permission);
        }
        HwAccess::Allow {
            update: (new != raw).then_some(new),
        }
    }
}

macro_rules! lpae_format {
    ($name:ident, $kind:expr, $stage2:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name(Lpae);

        impl $name {
            /// A table for `ias` input bits (25..=48; 39 gives 3 levels, 48 gives 4) and
            /// `oa_bits` output bits (at most 48).
            pub fn new(ias: u8, oa_bits: u8) -> Result<Self, crate::Error> {
                Ok($name(Lpae::new(ias, oa_bits, $stage2)?))
            }
        }

        impl PageTableFormat for $name {
            fn kind(&self) -> FormatKind {
                $kind
            }

            fn levels(&self) -> u8 {
                levels_for_bits(self.0.ias)
            }

            fn iova_bits(&self) -> u8 {
                self.0.ias
            }

            fn oa_bits(&self) -> u8 {
                self.0.oa_bits
            }

            fn page_sizes(&self) -> u64 {
                (1 << 12) | (1 << 21) | (1 << 30)
            }

            fn write_only(&self) -> bool {
                $stage2
            }

            fn decode(&self, raw: u64, level: u8) -> Pte {
                self.0.decode(raw, level)
            }

            fn table(&self, pa: u64, _level: u8) -> u64 {
                (pa & ADDR) | TYPE_TABLE
            }

            fn leaf(&self, pa: u64, _size: u64, level: u8, perm: Perm, track: bool) -> u64 {
                self.0.leaf(pa, level, perm, track)
            }

            fn resize_leaf(&self, raw: u64, pa: u64, _size: u64, level: u8) -> u64 {
                let ty = if level == 1 { TYPE_TABLE } else { TYPE_BLOCK };
                (raw & !(ADDR | TYPE_MASK)) | (pa & ADDR) | ty
            }

            #[inline(always)]
            fn is_dirty(&self, raw: u64, level: u8) -> bool {
                self.0.is_dirty(raw, level)
            }

            #[inline(always)]
            fn is_table(&self, raw: u64, level: u8) -> bool {
                level > 1 && raw & TYPE_MASK == TYPE_TABLE
            }

            fn fast_dirty(&self, level: u8) -> (u64, u64, u64) {
                let ty = match level {
                    1 => TYPE_TABLE,
                    2 | 3 => TYPE_BLOCK,
                    _ => return (0, 1, 0), // never matches
                };
                let w = self.0.w_bit();
                // Stage 1: AF, DBM, AP[2] clear; stage 2: AF, DBM, S2AP[1] set.
                let want = if $stage2 { w } else { 0 };
                (TYPE_MASK | AF | DBM | w, ty | AF | DBM | want, w)
            }

            fn table_hint(&self) -> (u64, u64) {
                // Table descriptors have bit 1 set (blocks have it clear).
                (0, 0b10)
            }

            fn dirty_hint(&self) -> (u64, u64) {
                // Stage 1: dirty entries have AP[2] clear; stage 2: S2AP[1] set.
                if $stage2 {
                    (0, S2AP_W)
                } else {
                    (AP_RDONLY, AP_RDONLY)
                }
            }

            fn clean_op(&self) -> BitOp {
                if $stage2 {
                    BitOp::Clear(S2AP_W)
                } else {
                    BitOp::Set(AP_RDONLY)
                }
            }

            fn dirty_op(&self) -> BitOp {
                if $stage2 {
                    BitOp::Set(S2AP_W)
                } else {
                    BitOp::Clear(AP_RDONLY)
                }
            }

            fn accessed_bit(&self) -> u64 {
                AF
            }

            #[inline(always)]
            fn settled(&self, raw: u64) -> bool {
                raw & AF != 0 && self.0.write_bit_open(raw)
            }

            fn set_tracking(&self, raw: u64, enable: bool) -> u64 {
                self.0.set_tracking(raw, enable)
            }

            fn tracking_in_pte(&self) -> bool {
                true
            }

            fn hw_access(&self, raw: u64, _level: u8, write: bool, ad: AdUpdate) -> HwAccess {
                self.0.hw_access(raw, write, ad)
            }
        }
    };
}

lpae_format!(
    ArmS1,
    FormatKind::ArmS1,
    false,
    "Arm LPAE stage-1 format (SMMUv3 context descriptor TTB0), 4 KiB granule."
);
lpae_format!(
    ArmS2,
    FormatKind::ArmS2,
    true,
    "Arm LPAE stage-2 format (SMMUv3 STE S2TTB), 4 KiB granule."
);

#[cfg(test)]
mod tests {
    use super::*;

    const AD: AdUpdate = AdUpdate {
        access: true,
        dirty: true,
    };

    /// What Linux 6.12 writes for a cacheable, unprivileged stage-1 leaf: `arm_lpae_prot_to_pte`
    /// (`io-pgtable-arm.c` lines 450-458 permissions and DBM, 483-485 and 494-495 cacheable
    /// attribute index and inner-shareable, 505-506 AF) plus the page/block type from
    /// `__arm_lpae_init_pte` (lines 312-315). Written out as the reference the crate's encodings
    /// are compared with.
    fn linux_s1_leaf(pa: u64, level: u8, write: bool, quirk_arm_hd: bool) -> u64 {
        let mut pte = NG | AP_UNPRIV | ATTR_IDX_CACHE | SH_IS | AF;
        if !write {
            pte |= AP_RDONLY;
        } else if quirk_arm_hd {
            pte |= DBM;
        }
        pte | pa | if level == 1 { TYPE_TABLE } else { TYPE_BLOCK }
    }

    #[test]
    fn stage1_untracked_leaves_match_linux_prot_to_pte() {
        let f = ArmS1::new(48, 48).unwrap();
        assert_eq!(f.levels(), 4);
        // Read-only 4K page: the same bits Linux writes, with or without the HD quirk.
        let ro = f.leaf(0x1000, 4096, 1, Perm::R, false);
        assert_eq!(ro, linux_s1_leaf(0x1000, 1, false, false));
        assert_eq!(ro, linux_s1_leaf(0x1000, 1, false, true));
        assert_eq!(f.leaf(0x1000, 4096, 1, Perm::R, true), ro);
        assert!(!f.is_dirty(ro, 1));
        // Writable, tracking off: Linux without IO_PGTABLE_QUIRK_ARM_HD (no DBM, AP[2] clear).
        let w = f.leaf(0x20_0000, 2 << 20, 2, Perm::RW, false);
        assert_eq!(w, linux_s1_leaf(0x20_0000, 2, true, false));
        assert!(!f.is_dirty(w, 2));
    }

    #[test]
    fn stage1_tracked_writable_leaf_starts_clean_where_linux_starts_dirty() {
        let f = ArmS1::new(48, 48).unwrap();
        // The crate: writable-clean, DBM | AP[2].
        let wc = f.leaf(0x20_0000, 2 << 20, 2, Perm::RW, true);
        assert_eq!(
            wc & (DBM | AP_RDONLY | TYPE_MASK),
            DBM | AP_RDONLY | TYPE_BLOCK
        );
        assert!(!f.is_dirty(wc, 2));
        // Linux with the HD quirk: DBM, AP[2] clear, i.e. writable-dirty; otherwise identical.
        let linux = linux_s1_leaf(0x20_0000, 2, true, true);
        assert_ne!(wc, linux);
        assert_eq!(wc & !AP_RDONLY, linux);
        // iopte_writeable_dirty: (pte & (AP_RDONLY | DBM)) == DBM. The crate agrees.
        assert_eq!(linux & (AP_RDONLY | DBM), DBM);
        assert!(f.is_dirty(linux, 2));
        assert_eq!(f.dirty_op().apply(wc), linux);
        // Cleaning (iopte_set_writeable_clean: set AP[2]) gives the crate's encoding.
        assert_eq!(f.clean_op().apply(linux), wc);
        // Taking over a Linux-built table: enabling tracking keeps the dirty state, so the first
        // harvest reports the page; disabling strips DBM, which Linux never does.
        assert_eq!(f.set_tracking(linux, true), linux);
        assert_eq!(
            f.set_tracking(linux, false),
            linux_s1_leaf(0x20_0000, 2, true, false)
        );
    }

    #[test]
    fn stage1_hardware_clears_ap2_only_with_dbm_and_hd() {
        let f = ArmS1::new(39, 48).unwrap();
        let wc = f.leaf(0x1000, 4096, 1, Perm::RW, true);
        assert_eq!(
            f.hw_access(wc, 1, true, AD),
            HwAccess::Allow {
                update: Some(wc & !AP_RDONLY)
            }
        );
        let hd_off = AdUpdate {
            access: true,
            dirty: false,
        };
        assert_eq!(
            f.hw_access(wc, 1, true, hd_off),
            HwAccess::Fault(FaultKind::Permission)
        );
        let ro = f.leaf(0x1000, 4096, 1, Perm::R, false);
        assert_eq!(
            f.hw_access(ro, 1, true, AD),
            HwAccess::Fault(FaultKind::Permission)
        );
        assert_eq!(
            f.hw_access(ro, 1, false, AD),
            HwAccess::Allow { update: None }
        );
        let no_af = ro & !AF;
        assert_eq!(
            f.hw_access(no_af, 1, false, AdUpdate::default()),
            HwAccess::Fault(FaultKind::AccessFlag)
        );
        assert_eq!(
            f.hw_access(no_af, 1, false, AD),
            HwAccess::Allow { update: Some(ro) }
        );
    }

    #[test]
    fn tracking_toggle_rewrites_writable_leaves_only() {
        for stage2 in [false, true] {
            let l = Lpae::new(48, 48, stage2).unwrap();
            let w = l.leaf(0x1000, 1, Perm::RW, false);
            let ro = l.leaf(0x1000, 1, Perm::R, false);
            let on = l.set_tracking(w, true);
            assert_eq!(on, l.leaf(0x1000, 1, Perm::RW, true), "stage2={stage2}");
            assert!(!l.is_dirty(on, 1));
            assert_eq!(l.set_tracking(on, false), w);
            assert_eq!(l.set_tracking(ro, true), ro);
            assert_eq!(l.set_tracking(ro, false), ro);
            // Enabling again must not wipe recorded dirty state.
            let dirty = if stage2 { on | S2AP_W } else { on & !AP_RDONLY };
            assert!(l.is_dirty(dirty, 1));
            assert_eq!(l.set_tracking(dirty, true), dirty);
            // Disabling a dirty entry leaves it writable.
            assert!(l.decode(l.set_tracking(dirty, false), 1) != Pte::Absent);
        }
    }

    #[test]
    fn stage2_dirty_sets_s2ap_w() {
        let f = ArmS2::new(48, 48).unwrap();
        let wc = f.leaf(0x1000, 4096, 1, Perm::RW, true);
        assert_eq!(wc & (S2AP_R | S2AP_W | DBM), S2AP_R | DBM);
        assert_eq!(
            f.hw_access(wc, 1, true, AD),
            HwAccess::Allow {
                update: Some(wc | S2AP_W)
            }
        );
        let wo = f.leaf(0x1000, 4096, 1, Perm::W, false);
        assert_eq!(
            f.hw_access(wo, 1, false, AD),
            HwAccess::Fault(FaultKind::Permission)
        );
    }

    #[test]
    fn decode_rules() {
        let f = ArmS1::new(48, 48).unwrap();
        assert!(matches!(
            f.decode(0x1000 | TYPE_BLOCK, 1),
            Pte::Malformed(_)
        ));
        assert!(matches!(
            f.decode(0x1000 | TYPE_BLOCK, 4),
            Pte::Malformed(_)
        ));
        assert_eq!(f.decode(0x1000 | TYPE_TABLE, 2), Pte::Table { pa: 0x1000 });
        match f.decode((1 << 48) | 0x1000 | TYPE_TABLE, 1) {
            Pte::Leaf(l) => assert_eq!(l.reserved, 1 << 48),
            other => panic!("{other:?}"),
        }
    }
}
