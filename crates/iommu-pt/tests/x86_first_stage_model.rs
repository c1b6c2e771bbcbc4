//! The IOMMU model walking x86-64 first-stage tables with the VT-d specification's semantics
//! (§3.6): A in every entry a walk uses, D in the leaf on a write, only on an IOTLB miss; a write
//! that hits a cached translation whose D is clear still sets D, one whose D is set sets
//! nothing. The two rows where QEMU 10.0 deviates (`shared/recipes/vtd-firmware.md`) are marked:
//! the model follows the specification there, and has no switch to do otherwise.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use livemig_iommu_pt::config::VtdPasidEntry;
use livemig_iommu_pt::format::{FaultKind, X86FirstStage};
use livemig_iommu_pt::model::{DataMem, DeviceContext, GuestRam, Iommu, ModelError, ModelOptions};
use livemig_iommu_pt::{
    DirtyBits, HarvestOptions, NoFlush, PageTable, PageTableFormat, Perm, PhysMem, TableArena,
};

const IOVA: u64 = 0x2000_0000;
const RAM: u64 = 0x8000_0000;
const SZ_4K: u64 = 4096;
const SZ_2M: u64 = 2 << 20;
const DEV: u32 = 0x20; // edu at 00:04.0 in the recipe
const A: u64 = X86FirstStage::A;
const D: u64 = X86FirstStage::D;

type Arena = Arc<TableArena>;

struct Rig {
    arena: Arena,
    pt: PageTable<X86FirstStage, Arena>,
    iommu: Arc<Iommu<X86FirstStage, Arena>>,
    ram: Arc<GuestRam>,
}

impl Rig {
    fn new() -> Self {
        let arena = Arc::new(TableArena::new(0x1000_0000, 256).unwrap());
        let fmt = X86FirstStage::new(4, 46).unwrap();
        let pt = PageTable::new(fmt, Arc::clone(&arena)).unwrap();
        let ram = Arc::new(GuestRam::new(RAM, 8 << 20));
        let iommu = Arc::new(Iommu::new(
            fmt,
            Arc::clone(&arena),
            Arc::clone(&ram) as Arc<dyn DataMem>,
            ModelOptions::default(),
        ));
        iommu
            .attach(
                DEV,
                DeviceContext::Vtd(VtdPasidEntry::first_stage(pt.root(), 4, 1)),
            )
            .unwrap();
        Rig {
            arena,
            pt,
            iommu,
            ram,
        }
    }

    /// The entries a walk of `iova` uses, root first (down to the leaf).
    fn path(&self, iova: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut table = self.pt.root();
        let mut level = 4u8;
        loop {
            let slot = ((iova >> (12 + 9 * u32::from(level - 1))) & 511) as usize;
            let raw = self.arena.frame(table).unwrap()[slot].load(Ordering::Relaxed);
            out.push(raw);
            if level == 1 || raw & X86FirstStage::PS != 0 || raw & X86FirstStage::P == 0 {
                return out;
            }
            table = raw & X86FirstStage::ADDR;
            level -= 1;
        }
    }

    fn leaf(&self, iova: u64) -> u64 {
        *self.path(iova).last().unwrap()
    }

    /// Change the leaf of `iova` as software would (plain read-modify-write).
    fn edit_leaf(&self, iova: u64, f: impl Fn(u64) -> u64) {
        let mut table = self.pt.root();
        for level in (1..=4u8).rev() {
            let slot = ((iova >> (12 + 9 * u32::from(level - 1))) & 511) as usize;
            let e = &self.arena.frame(table).unwrap()[slot];
            let raw = e.load(Ordering::Relaxed);
            if level == 1 || raw & X86FirstStage::PS != 0 {
                e.store(f(raw), Ordering::Relaxed);
                return;
            }
            table = raw & X86FirstStage::ADDR;
        }
    }

    fn write(&self, iova: u64) {
        self.iommu.dma_write(DEV, iova, &[0x5a; 8]).unwrap();
    }

    fn read(&self, iova: u64) {
        let mut b = [0u8; 8];
        self.iommu.dma_read(DEV, iova, &mut b).unwrap();
    }

    /// Page-selective invalidation of one 4 KiB page (PASID-based IOTLB, AM = 0).
    fn invalidate(&self, iova: u64) {
        self.iommu.flush_range(iova, SZ_4K);
    }
}

fn ad(raw: u64) -> (bool, bool) {
    (raw & A != 0, raw & D != 0)
}

#[test]
fn read_miss_sets_a_at_every_level_and_no_d() {
    let mut r = Rig::new();
    r.pt.map(IOVA, RAM, SZ_2M, Perm::RW).unwrap();
    r.pt.split(IOVA, SZ_2M, SZ_4K, &mut NoFlush).unwrap();
    assert!(r.path(IOVA).iter().all(|&e| e & (A | D) == 0));
    r.read(IOVA);
    let path = r.path(IOVA);
    assert_eq!(path.len(), 4);
    assert!(path.iter().all(|&e| e & A != 0), "{path:x?}");
    assert!(path.iter().all(|&e| e & D == 0), "{path:x?}");
}

#[test]
fn write_to_a_fresh_page_sets_leaf_a_and_d_upper_levels_a_only() {
    let mut r = Rig::new();
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    r.write(IOVA + 3 * SZ_4K);
    let path = r.path(IOVA + 3 * SZ_4K);
    assert_eq!(ad(path[3]), (true, true));
    for &upper in &path[..3] {
        assert_eq!(ad(upper), (true, false));
    }
    assert_eq!(r.ram.read_u64(RAM + 3 * SZ_4K), Some(0x5a5a_5a5a_5a5a_5a5a));
}

#[test]
fn accessed_flags_change_only_on_an_iotlb_miss() {
    let mut r = Rig::new();
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    r.read(IOVA);
    let walks = r.iommu.stats().walks;
    // Software clears every A; the cached translation serves the next read: nothing is set.
    let mut table = r.pt.root();
    for level in (1..=4u8).rev() {
        let slot = ((IOVA >> (12 + 9 * u32::from(level - 1))) & 511) as usize;
        let e = &r.arena.frame(table).unwrap()[slot];
        let raw = e.fetch_and(!A, Ordering::Relaxed);
        table = raw & X86FirstStage::ADDR;
    }
    r.read(IOVA);
    assert_eq!(r.iommu.stats().walks, walks, "served by the IOTLB");
    assert!(r.path(IOVA).iter().all(|&e| e & A == 0));
    // After an invalidation the next read walks and sets them again.
    r.invalidate(IOVA);
    r.read(IOVA);
    assert!(r.path(IOVA).iter().all(|&e| e & A != 0));
}

/// QEMU 10.0 deviates here: a write served by an IOTLB entry a read filled sets no D.
#[test]
fn write_hitting_a_cached_entry_with_d_clear_sets_d() {
    let mut r = Rig::new();
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    r.read(IOVA);
    assert_eq!(ad(r.leaf(IOVA)), (true, false));
    let before = r.iommu.stats();
    r.write(IOVA);
    let after = r.iommu.stats();
    assert_eq!(after.walks, before.walks, "an IOTLB hit");
    assert_eq!(after.ad_updates, before.ad_updates + 1);
    assert_eq!(ad(r.leaf(IOVA)), (true, true), "the specification sets D");
}

#[test]
fn write_hitting_a_cached_entry_with_d_set_sets_nothing() {
    // Stale IOTLB after a clear without invalidation: the write is not reported.
    let mut r = Rig::new();
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    r.write(IOVA);
    r.edit_leaf(IOVA, |e| e & !(A | D));
    assert!(r.ram.write(RAM, &[0; 8]));
    r.write(IOVA);
    assert_eq!(ad(r.leaf(IOVA)), (false, false), "nothing set: IOTLB hit");
    assert_eq!(
        r.ram.read_u64(RAM),
        Some(0x5a5a_5a5a_5a5a_5a5a),
        "data lands"
    );
    // With a page-selective invalidation in between, the write walks and sets A and D.
    r.invalidate(IOVA);
    r.write(IOVA);
    assert_eq!(ad(r.leaf(IOVA)), (true, true));
}

/// QEMU 10.0 deviates here: its A/D update stops when A is already set, so D stays 0.
#[test]
fn clearing_d_only_then_invalidating_records_the_next_write() {
    let mut r = Rig::new();
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    r.write(IOVA);
    r.edit_leaf(IOVA, |e| e & !D);
    r.invalidate(IOVA);
    r.write(IOVA);
    assert_eq!(ad(r.leaf(IOVA)), (true, true), "the specification sets D");
}

#[test]
fn two_mib_page_write_sets_pde_a_and_d() {
    let mut r = Rig::new();
    r.pt.map(IOVA, RAM, SZ_2M, Perm::RW).unwrap();
    r.write(IOVA + 0x1234 * 8);
    let path = r.path(IOVA);
    assert_eq!(path.len(), 3);
    assert_ne!(path[2] & X86FirstStage::PS, 0);
    assert_eq!(ad(path[2]), (true, true));
    assert_eq!(ad(path[1]), (true, false));
    assert_eq!(ad(path[0]), (true, false));
    // A page-selective invalidation covering the 2 MiB page (AM = 9) drops it.
    r.edit_leaf(IOVA, |e| e & !(A | D));
    r.iommu.flush_range(IOVA, SZ_2M);
    r.write(IOVA + SZ_2M - 8);
    assert_eq!(ad(r.path(IOVA)[2]), (true, true));
}

#[test]
fn faults_leave_the_leaf_untouched() {
    let mut r = Rig::new();
    r.pt.map_sizes(IOVA, RAM, SZ_4K, Perm::R, SZ_4K).unwrap();
    // Write to a non-present entry.
    let e = r.iommu.dma_write(DEV, IOVA + SZ_4K, &[1]).unwrap_err();
    assert_eq!(e.kind, FaultKind::NotPresent);
    // Write to a read-only page: permission fault, leaf A not set.
    let e = r.iommu.dma_write(DEV, IOVA, &[1]).unwrap_err();
    assert_eq!(e.kind, FaultKind::Permission);
    assert_eq!(ad(r.leaf(IOVA)), (false, false));
    // U/S = 0 in an upper level: every user-privilege request faults.
    r.read(IOVA);
    let pml4e = r.path(IOVA)[0];
    let slot = ((IOVA >> 39) & 511) as usize;
    r.arena.frame(r.pt.root()).unwrap()[slot].store(pml4e & !X86FirstStage::US, Ordering::Relaxed);
    r.invalidate(IOVA);
    let mut b = [0u8; 1];
    let e = r.iommu.dma_read(DEV, IOVA, &mut b).unwrap_err();
    assert_eq!(e.kind, FaultKind::Permission);
    // Beyond the lower canonical half (2^47 with 4 levels).
    let e = r.iommu.dma_read(DEV, 1 << 47, &mut b).unwrap_err();
    assert_eq!(e.kind, FaultKind::OutOfRange);
}

#[test]
fn contexts_must_match_the_table() {
    let r = Rig::new();
    let five = VtdPasidEntry::first_stage(r.pt.root(), 5, 1);
    assert_eq!(
        r.iommu.attach(1, DeviceContext::Vtd(five)),
        Err(ModelError::Geometry(
            "PASID.FLPM differs from the table's levels"
        ))
    );
    let ss = VtdPasidEntry::second_stage(r.pt.root(), 48, 1);
    assert!(matches!(
        r.iommu.attach(1, DeviceContext::Vtd(ss)),
        Err(ModelError::NotTranslating(_))
    ));
    let mut w = VtdPasidEntry::first_stage(r.pt.root(), 4, 1).words();
    w[2] |= 2 << 2; // FLPM = 10b, reserved
    match r
        .iommu
        .attach(1, DeviceContext::Vtd(VtdPasidEntry::from_words(w)))
    {
        Err(ModelError::Reserved(p)) => assert_eq!(p.field, "PASID.FLPM"),
        other => panic!("{other:?}"),
    }
    // The entry that worked on QEMU 10.0.
    let qemu = VtdPasidEntry::first_stage(0x2000_3000, 4, 1).words();
    assert_eq!(qemu[..3], [0x49, 0x1, 0x2000_3000]);
}

/// The harvest that also clears A keeps working on an IOMMU that, like QEMU, would not set D
/// in a leaf whose A is set; on the specification's model both harvests lose nothing.
#[test]
fn harvest_clearing_a_with_d() {
    let mut r = Rig::new();
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    let opts = HarvestOptions {
        clear_accessed: true,
        ..HarvestOptions::default()
    };
    for round in 0..3u64 {
        let page = IOVA + (round % 2) * SZ_4K;
        r.write(page);
        r.read(IOVA + 100 * SZ_4K); // accessed, not dirty: not reported, A left alone
        let mut bits = DirtyBits::new(IOVA, SZ_2M, SZ_4K).unwrap();
        let st =
            r.pt.read_and_clear_dirty(IOVA, SZ_2M, &mut bits, opts, &mut &*r.iommu)
                .unwrap();
        assert_eq!(bits.iter().collect::<Vec<_>>(), [page]);
        assert_eq!((st.cleaned, st.plain_stores, st.flushes), (1, 1, 1));
        assert_eq!(ad(r.leaf(page)), (false, false), "A cleared with D");
        assert_eq!(ad(r.leaf(IOVA + 100 * SZ_4K)), (true, false));
    }
    // A dirty leaf whose A is clear (not settled) takes the atomic path and loses A too.
    r.edit_leaf(IOVA, |e| (e | D) & !A);
    let mut bits = DirtyBits::new(IOVA, SZ_2M, SZ_4K).unwrap();
    let st =
        r.pt.read_and_clear_dirty(IOVA, SZ_2M, &mut bits, opts, &mut &*r.iommu)
            .unwrap();
    assert_eq!((st.cleaned, st.plain_stores), (1, 0));
    assert_eq!(ad(r.leaf(IOVA)), (false, false));
    assert_eq!(r.pt.format().accessed_bit(), A);
}
