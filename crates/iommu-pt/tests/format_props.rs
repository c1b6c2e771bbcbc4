//! Properties every format must keep: decoders are total, and the fast paths the harvest loop
//! uses (`fast_dirty`, `dirty_hint`, `table_hint`, `is_table`, `is_dirty`) agree exactly with
//! the full decoder.

use livemig_iommu_pt::caps::{AmdCaps, SmmuCaps, VtdCaps};
use livemig_iommu_pt::config::{AdUpdate, AmdDte, SmmuCd, SmmuSte, VtdPasidEntry};
use livemig_iommu_pt::format::{AmdV1, ArmS1, ArmS2, HwAccess, VtdSecondStage, X86FirstStage};
use livemig_iommu_pt::{PageTableFormat, Perm, Pte};
use proptest::prelude::*;

/// Random entries biased towards the interesting bits (valid/present, A/D, DBM, AP, NL, PS).
fn raw_entry() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| a & (0x0008_0000_0000_0fff | b)),
        (any::<u64>(), 0u64..8).prop_map(|(a, nl)| (a & !(7 << 9)) | (nl << 9)),
        any::<u16>().prop_map(|b| u64::from(b) | 0x1234_5000 | (u64::from(b & 1) << 51)),
    ]
}

fn check<F: PageTableFormat>(f: &F, raw: u64) {
    let (flip, hint) = f.dirty_hint();
    let (tflip, thint) = f.table_hint();
    for level in 1..=f.levels() + 1 {
        let decoded = f.decode(raw, level);
        let dirty = f.is_dirty(raw, level);
        let table = f.is_table(raw, level);
        // is_table is exactly "decodes as a table".
        assert_eq!(
            table,
            matches!(decoded, Pte::Table { .. }) && level > 1,
            "{f:?} {raw:#x} L{level}"
        );
        if table {
            assert!((raw ^ tflip) & thint != 0, "table hint {f:?} {raw:#x}");
        }
        if dirty {
            // A dirty entry is a leaf that decodes dirty, and carries the hint bit.
            assert!((raw ^ flip) & hint != 0, "dirty hint {f:?} {raw:#x}");
            match decoded {
                Pte::Leaf(l) => assert!(l.dirty, "{f:?} {raw:#x} L{level}"),
                Pte::Malformed(_) => {} // e.g. an AMD replicated size that does not fit
                other => panic!("{f:?} {raw:#x} L{level}: dirty but {other:?}"),
            }
            // Cleaning removes the dirty state and nothing else of consequence.
            let clean = f.clean_op().apply(raw);
            assert!(!f.is_dirty(clean, level));
            assert_eq!(f.dirty_op().apply(clean), raw, "{f:?} {raw:#x}");
        }
        let (fm, fv, cx) = f.fast_dirty(level);
        if raw & fm == fv {
            assert!(dirty, "fast but not dirty: {f:?} {raw:#x} L{level}");
            assert!(f.settled(raw));
            assert!(!f.is_replica(raw));
            assert_eq!(raw ^ cx, f.clean_op().apply(raw));
        }
        // The hardware model never faults with an update, and never updates a settled entry.
        for write in [false, true] {
            let ad = AdUpdate {
                access: true,
                dirty: true,
            };
            if let HwAccess::Allow { update: Some(new) } = f.hw_access(raw, level, write, ad) {
                assert!(!f.settled(raw) || new == raw, "{f:?} {raw:#x}");
            }
        }
        let _ = f.set_tracking(raw, true);
        let _ = f.set_tracking(raw, false);
        let _ = f.leaf_size(raw, level);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn amd_v1_fast_paths_agree(raw in raw_entry()) {
        check(&AmdV1::new(4).unwrap(), raw);
        check(&AmdV1::new(6).unwrap(), raw);
    }

    #[test]
    fn vtd_fast_paths_agree(raw in raw_entry()) {
        check(&VtdSecondStage::new(48, 46).unwrap(), raw);
        check(&VtdSecondStage::new(57, 52).unwrap(), raw);
    }

    #[test]
    fn x86_first_stage_fast_paths_agree(raw in raw_entry()) {
        check(&X86FirstStage::new(4, 46).unwrap(), raw);
        check(&X86FirstStage::new(5, 52).unwrap(), raw);
        check(&X86FirstStage::with_page_sizes(4, 52, (1 << 12) | (1 << 21)).unwrap(), raw);
    }

    #[test]
    fn arm_fast_paths_agree(raw in raw_entry()) {
        check(&ArmS1::new(48, 48).unwrap(), raw);
        check(&ArmS2::new(39, 40).unwrap(), raw);
    }

    #[test]
    fn context_and_cap_decoders_are_total(words in any::<[u64; 8]>()) {
        let dte = AmdDte::from_words([words[0], words[1], words[2], words[3]]);
        let _ = (dte.problems(), dte.ad_update(), dte.with_dirty_tracking(true).problems());
        prop_assert_eq!(&dte.with_dirty_tracking(true).with_dirty_tracking(false).words()[1..], &dte.words()[1..]);
        let pe = VtdPasidEntry::from_words(words);
        let _ = (pe.problems(), pe.ad_update(), pe.address_width(), pe.pgtt());
        prop_assert_eq!(pe.with_dirty_tracking(pe.ssade()), pe);
        let cd = SmmuCd::from_words(words);
        let _ = (cd.problems(), cd.ad_update(), cd.input_bits());
        let ste = SmmuSte::from_words(words);
        let _ = (ste.problems(), ste.s2_ad_update(), ste.config(), ste.s2_input_bits());
        let _ = AmdCaps::from_efr(words[0]).dirty_support().to_string();
        let _ = VtdCaps::from_regs(words[0], words[1]).dirty_support().to_string();
        let _ = SmmuCaps::from_regs(words[0] as u32, words[1] as u32).dirty_support().to_string();
    }

    /// Every leaf the encoder produces decodes back to what was asked.
    #[test]
    fn leaves_round_trip(pfn in 1u64..(1 << 20), perm in 0u8..3, track in any::<bool>()) {
        let perm = [Perm::R, Perm::RW, Perm::W][usize::from(perm)];
        fn one<F: PageTableFormat>(f: &F, pfn: u64, perm: Perm, track: bool) {
            if !perm.read && !f.write_only() {
                return;
            }
            let mut sizes = f.page_sizes() & ((1 << 31) - 1);
            while sizes != 0 {
                let size = 1u64 << sizes.trailing_zeros();
                sizes &= sizes - 1;
                let pa = (pfn << 12) & !(size - 1);
                let (level, _) = f.leaf_slot(size);
                let raw = f.leaf(pa, size, level, perm, track);
                match f.decode(raw, level) {
                    Pte::Leaf(l) => {
                        assert_eq!((l.pa, l.size, l.perm), (pa, size, perm), "{f:?} {raw:#x}");
                        assert!(!l.dirty && l.reserved == 0, "{f:?} {raw:#x}");
                    }
                    other => panic!("{f:?}: {raw:#x} decodes as {other:?}"),
                }
                assert!(!f.is_dirty(raw, level));
                // What the IOMMU leaves after a write: the harvest's one-mask test must see it.
                let ad = AdUpdate { access: true, dirty: true };
                if let HwAccess::Allow { update: Some(w) } = f.hw_access(raw, level, true, ad) {
                    assert!(f.is_dirty(w, level), "{f:?} {raw:#x} -> {w:#x}");
                    assert!(f.settled(w));
                    let (fm, fv, cx) = f.fast_dirty(level);
                    if !f.is_replica(w) {
                        assert_eq!(w & fm, fv, "{f:?}: {w:#x} misses the fast path");
                        assert_eq!(w ^ cx, f.clean_op().apply(w));
                    }
                }
            }
        }
        one(&AmdV1::new(4).unwrap(), pfn, perm, track);
        one(&VtdSecondStage::new(48, 46).unwrap(), pfn, perm, track);
        one(&X86FirstStage::new(4, 46).unwrap(), pfn, perm, track);
        one(&ArmS1::new(48, 48).unwrap(), pfn, perm, track);
        one(&ArmS2::new(48, 48).unwrap(), pfn, perm, track);
    }
}
