//! Linux's SMMUv3 dirty harvest replayed on the crate's IOMMU model (SMMUv3 stage 1, CD.HA/HD,
//! DBM leaves, an IOTLB that caches the writable-dirty state), for `docs/smmuv3-iotlb-sync.md`.
//!
//! The Linux 6.12 path (unchanged in 7.3.4): iommufd `iommu_read_and_clear_dirty` initialises an
//! `iommu_iotlb_gather` (page size 0), `arm_lpae_read_and_clear_dirty` records every dirty leaf
//! with `iommu_dirty_bitmap_record` → `iommu_iotlb_gather_add_range` (which never sets a page
//! size) and cleans it by setting AP\[2\]; then `iommu_iotlb_sync` → `arm_smmu_iotlb_sync`, which
//! returns at once when `gather->pgsize` is 0. No TLB invalidation follows the clean.
//!
//! The replay keeps the structure of that path: [`Gather`] is the gather, [`Recorder`] is
//! `iommu_dirty_bitmap_record`, the crate's `read_and_clear_dirty` with `NoFlush` is the
//! io-pgtable walk (it invalidates nothing itself), and [`iotlb_sync`] is `arm_smmu_iotlb_sync`
//! as Linux has it ([`Driver::Linux`]) or with the proposed fix ([`Driver::Fixed`]: a gathered
//! range without a page size is still invalidated).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use livemig_iommu_pt::config::{SmmuCd, SmmuSte};
use livemig_iommu_pt::format::ArmS1;
use livemig_iommu_pt::model::{DataMem, DeviceContext, GuestRam, Iommu, ModelOptions};
use livemig_iommu_pt::{
    DirtyBits, DirtySink, HarvestOptions, NoFlush, PageTable, PageTableFormat, Perm, PhysMem, Pte,
    TableArena,
};

const IOVA: u64 = 0x4000_0000;
const RAM: u64 = 0x8000_0000;
const SIZE: u64 = 2 << 20;
const SZ_4K: u64 = 4096;
const DEV: u32 = 3;

type Arena = Arc<TableArena>;

/// `struct iommu_iotlb_gather` (start, end, pgsize) as `iommu_iotlb_gather_init` and
/// `iommu_iotlb_gather_add_range` leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gather {
    start: u64,
    end: u64,
    pgsize: u64,
}

impl Gather {
    fn init() -> Self {
        Gather {
            start: u64::MAX,
            end: 0,
            pgsize: 0,
        }
    }

    /// Widens the range; the page size is left as it was (0).
    fn add_range(&mut self, iova: u64, size: u64) {
        self.start = self.start.min(iova);
        self.end = self.end.max(iova + size - 1);
    }
}

/// `iommu_dirty_bitmap_record`: set the bits (when there is a bitmap) and gather the range.
struct Recorder<'a> {
    bits: Option<&'a mut DirtyBits>,
    gather: &'a mut Gather,
}

impl DirtySink for Recorder<'_> {
    fn record(&mut self, iova: u64, len: u64) {
        if let Some(b) = self.bits.as_deref_mut() {
            b.record(iova, len);
        }
        self.gather.add_range(iova, len);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    /// `arm_smmu_iotlb_sync` of Linux 6.12 and 7.3.4: `if (!gather->pgsize) return;`.
    Linux,
    /// The proposed fix: skip only an empty gather; invalidate a gathered range even without a
    /// page size (no TTL hint, or the whole ASID when the range is large).
    Fixed,
}

/// `iommu_iotlb_sync` → `arm_smmu_iotlb_sync`; the model's `flush_range` is the TLBI (and waits
/// for in-flight DMA, as CMD_SYNC does). Returns whether an invalidation was issued.
fn iotlb_sync(driver: Driver, iommu: &Iommu<ArmS1, Arena>, g: &Gather) -> bool {
    let empty = g.start > g.end;
    let skip = match driver {
        Driver::Linux => g.pgsize == 0,
        Driver::Fixed => empty,
    };
    if !skip {
        iommu.flush_range(g.start, g.end - g.start + 1);
    }
    !skip
}

struct Rig {
    pt: PageTable<ArmS1, Arena>,
    iommu: Arc<Iommu<ArmS1, Arena>>,
    ram: Arc<GuestRam>,
    driver: Driver,
    syncs_issued: u32,
}

impl Rig {
    /// A stage-1 domain allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: CD.HA and CD.HD set
    /// for the domain's life, every writable leaf mapped writable-dirty (DBM with AP\[2\]
    /// clear, `arm_lpae_prot_to_pte` with `IO_PGTABLE_QUIRK_ARM_HD`).
    fn new(driver: Driver) -> Self {
        let arena = Arc::new(TableArena::new(0x1000_0000, 64).unwrap());
        let fmt = ArmS1::new(48, 48).unwrap();
        let mut pt = PageTable::new(fmt, Arc::clone(&arena)).unwrap();
        pt.set_dirty_tracking(0, 1 << 48, true, &mut NoFlush)
            .unwrap();
        pt.map_sizes(IOVA, RAM, SIZE, Perm::RW, SZ_4K).unwrap();
        // The crate maps writable-clean; Linux maps writable-dirty.
        let leaf_table = pt.tables().into_iter().find(|&(l, _)| l == 1).unwrap().1;
        for e in arena.frame(leaf_table).unwrap().iter() {
            let raw = e.load(Ordering::Relaxed);
            if let Pte::Leaf(_) = fmt.decode(raw, 1) {
                e.store(fmt.dirty_op().apply(raw), Ordering::Relaxed);
            }
        }
        let ram = Arc::new(GuestRam::new(RAM, SIZE));
        let iommu = Arc::new(Iommu::new(
            fmt,
            Arc::clone(&arena),
            Arc::clone(&ram) as Arc<dyn DataMem>,
            ModelOptions::default(),
        ));
        let ctx = DeviceContext::SmmuS1 {
            ste: SmmuSte::stage1(0x7000_0000),
            cd: SmmuCd::stage1(pt.root(), 48, 1).with_dirty_tracking(true),
        };
        iommu.attach(DEV, ctx).unwrap();
        Rig {
            pt,
            iommu,
            ram,
            driver,
            syncs_issued: 0,
        }
    }

    fn write(&self, page: u64, v: u64) {
        self.iommu
            .dma_write(DEV, IOVA + page * SZ_4K, &v.to_le_bytes())
            .unwrap();
    }

    /// `iopt_clear_dirty_data` (tracking enable): clean everything, no bitmap, then sync.
    fn enable_tracking(&mut self) {
        let mut gather = Gather::init();
        let mut sink = Recorder {
            bits: None,
            gather: &mut gather,
        };
        self.pt
            .read_and_clear_dirty(
                IOVA,
                SIZE,
                &mut sink,
                HarvestOptions::default(),
                &mut NoFlush,
            )
            .unwrap();
        self.syncs_issued += u32::from(iotlb_sync(self.driver, &self.iommu, &gather));
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` → `iommu_read_and_clear_dirty`: the dirty pages (4 KiB
    /// indices), with the gather as the sync saw it.
    fn get_dirty_bitmap(&mut self) -> (Vec<u64>, Gather) {
        let mut bits = DirtyBits::new(IOVA, SIZE, SZ_4K).unwrap();
        let mut gather = Gather::init();
        let mut sink = Recorder {
            bits: Some(&mut bits),
            gather: &mut gather,
        };
        self.pt
            .read_and_clear_dirty(
                IOVA,
                SIZE,
                &mut sink,
                HarvestOptions::default(),
                &mut NoFlush,
            )
            .unwrap();
        self.syncs_issued += u32::from(iotlb_sync(self.driver, &self.iommu, &gather));
        let pages = bits.iter().map(|i| (i - IOVA) / SZ_4K).collect();
        (pages, gather)
    }
}

/// The smallest case: one page written, harvested (reported, cleaned), written again.
fn write_harvest_write(driver: Driver) -> (Vec<u64>, Gather, Vec<u64>, u32) {
    let mut r = Rig::new(driver);
    r.enable_tracking();
    r.write(9, 1);
    let (first, gather) = r.get_dirty_bitmap();
    r.write(9, 2);
    let (second, _) = r.get_dirty_bitmap();
    assert_eq!(r.ram.read_u64(RAM + 9 * SZ_4K), Some(2), "the data lands");
    (first, gather, second, r.syncs_issued)
}

#[test]
fn linux_sync_skips_the_invalidation_and_the_next_write_is_lost() {
    let (first, gather, second, syncs) = write_harvest_write(Driver::Linux);
    assert_eq!(first, [9]);
    // What arm_smmu_iotlb_sync received: the page's range, and no page size.
    assert_eq!(
        gather,
        Gather {
            start: IOVA + 9 * SZ_4K,
            end: IOVA + 10 * SZ_4K - 1,
            pgsize: 0
        }
    );
    assert_eq!(syncs, 0, "no invalidation was issued");
    // The SMMU's TLB still holds the writable-dirty entry: the second write is served from it
    // and the cleaned descriptor is never made dirty again.
    assert!(second.is_empty(), "the second write is lost: {second:?}");
}

#[test]
fn invalidating_the_gathered_range_loses_nothing() {
    let (first, _, second, syncs) = write_harvest_write(Driver::Fixed);
    assert_eq!(first, [9]);
    assert_eq!(second, [9]);
    assert_eq!(syncs, 3, "enable, and both harvests");
}

/// The clean at tracking enable (`iopt_clear_dirty_data`) has the same hole: translations the
/// device used before (cached writable-dirty, as Linux maps them) keep absorbing writes.
#[test]
fn clean_at_enable_has_the_same_hole() {
    for driver in [Driver::Linux, Driver::Fixed] {
        let mut r = Rig::new(driver);
        r.write(4, 1); // before tracking is enabled: cached as writable-dirty
        r.enable_tracking();
        r.write(4, 2);
        let (pages, _) = r.get_dirty_bitmap();
        match driver {
            Driver::Linux => assert!(pages.is_empty(), "{pages:?}"),
            Driver::Fixed => assert_eq!(pages, [4]),
        }
    }
}

/// Pre-copy as a VMM runs it: every round the device writes, the VMM harvests and copies what
/// was reported; then the device stops, a final harvest, a final copy. With Linux's sync the
/// destination ends up with stale pages; with the fix it equals the source.
fn migrate(driver: Driver) -> (usize, Option<u64>) {
    let mut r = Rig::new(driver);
    // The device used its buffers before migration started (TLB warm).
    for p in 0..64 {
        r.write(p, 0xaaaa);
    }
    r.enable_tracking();
    let dest = GuestRam::new(RAM, SIZE);
    assert!(r.ram.copy_to(&dest, RAM, SIZE), "bulk copy of all memory");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut written = std::collections::BTreeSet::new();
    for round in 0..20u64 {
        for _ in 0..16 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let p = rng % 128;
            r.write(p, round << 32 | p);
            written.insert(p);
        }
        let (pages, _) = r.get_dirty_bitmap();
        for p in pages {
            assert!(r.ram.copy_to(&dest, RAM + p * SZ_4K, SZ_4K));
        }
    }
    // Device stopped: no more DMA. Final harvest.
    let (pages, _) = r.get_dirty_bitmap();
    for p in pages {
        assert!(r.ram.copy_to(&dest, RAM + p * SZ_4K, SZ_4K));
    }
    let stale = written
        .iter()
        .filter(|&&p| {
            let a = RAM + p * SZ_4K;
            r.ram.read_u64(a) != dest.read_u64(a)
        })
        .count();
    eprintln!(
        "{driver:?}: {stale} of {} written pages stale at the destination, {} invalidations",
        written.len(),
        r.syncs_issued
    );
    (stale, dest.first_difference(&r.ram))
}

#[test]
fn migration_destination_is_stale_without_the_invalidation() {
    let (stale, diff) = migrate(Driver::Linux);
    assert!(stale > 0, "the negative control must lose pages");
    assert!(diff.is_some());
    let (stale, diff) = migrate(Driver::Fixed);
    assert_eq!(stale, 0);
    assert_eq!(diff, None, "destination equals source");
}

/// The other two drivers' `iotlb_sync` ignore the page size (`intel_iommu_tlb_sync` flushes
/// `gather->start..end`, `amd_iommu_iotlb_sync` flushes `start..end`); the same gather makes them
/// invalidate. Only the SMMUv3 driver reads `pgsize` as "nothing gathered".
#[test]
fn the_gather_is_not_empty() {
    let (_, gather, _, _) = write_harvest_write(Driver::Linux);
    assert!(
        gather.start < gather.end,
        "iommu_iotlb_sync (7.3) forwards it"
    );
    assert_eq!(gather.pgsize, 0, "arm_smmu_iotlb_sync drops it");
}
