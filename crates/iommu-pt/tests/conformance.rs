//! One conformance suite, run for every page-table format against the IOMMU model.
//!
//! Each generic test below is instantiated for AMD-Vi v1, VT-d second stage, the x86-64 first
//! stage (VT-d PGTT = first stage), Arm LPAE stage 1 and Arm LPAE stage 2 by the `suite!` macro
//! at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livemig_iommu_pt::config::{AmdDte, SmmuCd, SmmuSte, VtdPasidEntry};
use livemig_iommu_pt::format::{AmdV1, ArmS1, ArmS2, FaultKind, VtdSecondStage, X86FirstStage};
use livemig_iommu_pt::model::{
    DataMem, DeviceContext, DevicePort, DmaPort, GuestRam, Iommu, ModelOptions,
};
use livemig_iommu_pt::{
    DirtyBits, Error, HarvestOptions, NoFlush, PageTable, PageTableFormat, Perm, PhysMem,
    TableArena,
};

const IOVA: u64 = 0x4000_0000;
const RAM: u64 = 0x8000_0000;
const RAM_SIZE: u64 = 8 << 20;
const SZ_4K: u64 = 4096;
const SZ_2M: u64 = 2 << 20;
const DEV: u32 = 7;

/// What the suite needs to know about a format beyond the trait.
trait Fixture: PageTableFormat + Sized {
    fn make() -> Self;
    /// The device context pointing at `root`, with hardware dirty updates on or off.
    fn context(root: u64, dirty: bool) -> DeviceContext;
    /// Page sizes besides 4K/2M worth covering.
    fn odd_sizes() -> &'static [u64] {
        &[]
    }
    /// Whether the device context can switch hardware dirty updates off (x86-64 first stage:
    /// no, A/D updates are architectural).
    const AD_SWITCH: bool = true;
}

impl Fixture for AmdV1 {
    fn make() -> Self {
        AmdV1::new(4).unwrap()
    }
    fn context(root: u64, dirty: bool) -> DeviceContext {
        DeviceContext::Amd(AmdDte::translated(root, 4, 1).with_dirty_tracking(dirty))
    }
    fn odd_sizes() -> &'static [u64] {
        &[8192, 64 << 10, 4 << 20]
    }
}

impl Fixture for VtdSecondStage {
    fn make() -> Self {
        VtdSecondStage::new(48, 46).unwrap()
    }
    fn context(root: u64, dirty: bool) -> DeviceContext {
        DeviceContext::Vtd(VtdPasidEntry::second_stage(root, 48, 1).with_dirty_tracking(dirty))
    }
}

impl Fixture for X86FirstStage {
    fn make() -> Self {
        X86FirstStage::new(4, 46).unwrap()
    }
    fn context(root: u64, _dirty: bool) -> DeviceContext {
        DeviceContext::Vtd(VtdPasidEntry::first_stage(root, 4, 1))
    }
    const AD_SWITCH: bool = false;
}

impl Fixture for ArmS1 {
    fn make() -> Self {
        ArmS1::new(48, 48).unwrap()
    }
    fn context(root: u64, dirty: bool) -> DeviceContext {
        DeviceContext::SmmuS1 {
            ste: SmmuSte::stage1(0x7000_0000),
            cd: SmmuCd::stage1(root, 48, 1).with_dirty_tracking(dirty),
        }
    }
}

impl Fixture for ArmS2 {
    fn make() -> Self {
        ArmS2::new(48, 48).unwrap()
    }
    fn context(root: u64, dirty: bool) -> DeviceContext {
        DeviceContext::SmmuS2(SmmuSte::stage2(root, 48, 1).with_s2_dirty_tracking(dirty))
    }
}

type Arena = Arc<TableArena>;

struct Rig<F: Fixture> {
    arena: Arena,
    pt: PageTable<F, Arena>,
    iommu: Arc<Iommu<F, Arena>>,
    ram: Arc<GuestRam>,
    port: DevicePort<F, Arena>,
}

impl<F: Fixture> Rig<F> {
    fn new(iotlb: bool, hw_dirty: bool) -> Self {
        let arena = Arc::new(TableArena::new(0x1000_0000, 4096).unwrap());
        let mut pt = PageTable::new(F::make(), Arc::clone(&arena)).unwrap();
        let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE));
        let iommu = Arc::new(Iommu::new(
            F::make(),
            Arc::clone(&arena),
            Arc::clone(&ram) as Arc<dyn DataMem>,
            ModelOptions {
                iotlb,
                ..ModelOptions::default()
            },
        ));
        iommu.attach(DEV, F::context(pt.root(), hw_dirty)).unwrap();
        let top = 1u64 << pt.format().iova_bits();
        pt.set_dirty_tracking(0, top, true, &mut NoFlush).unwrap();
        let port = iommu.port(DEV);
        Rig {
            arena,
            pt,
            iommu,
            ram,
            port,
        }
    }

    /// Read-and-clear (or not) over the test window; returns the dirty 4K IOVAs.
    fn harvest(&mut self, no_clear: bool) -> Vec<u64> {
        let mut bits = DirtyBits::new(IOVA, RAM_SIZE, SZ_4K).unwrap();
        let opts = HarvestOptions {
            no_clear,
            ..HarvestOptions::default()
        };
        self.pt
            .read_and_clear_dirty(IOVA, RAM_SIZE, &mut bits, opts, &mut &*self.iommu)
            .unwrap();
        bits.iter().collect()
    }

    fn harvest_noflush(&mut self) -> Vec<u64> {
        let mut bits = DirtyBits::new(IOVA, RAM_SIZE, SZ_4K).unwrap();
        self.pt
            .read_and_clear_dirty(
                IOVA,
                RAM_SIZE,
                &mut bits,
                HarvestOptions::default(),
                &mut NoFlush,
            )
            .unwrap();
        bits.iter().collect()
    }

    fn write(&self, iova: u64, v: u64) {
        self.port.dma_write(iova, &v.to_le_bytes()).unwrap();
    }

    fn pages(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        self.pt
            .walk(IOVA, RAM_SIZE, |m| v.push((m.iova, m.leaf.size)))
            .unwrap();
        v
    }
}

/// xorshift64*, deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn span(first: u64, count: u64) -> Vec<u64> {
    (0..count).map(|k| first + k * SZ_4K).collect()
}

fn map_unmap_translate<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    let size = SZ_2M + 2 * SZ_4K;
    r.pt.map(IOVA, RAM, size, Perm::RW).unwrap();
    // The largest fitting sizes: AMD-Vi has an 8 KiB page, the others use two 4 KiB ones.
    let expect: &[(u64, u64)] = if F::odd_sizes().contains(&8192) {
        &[(IOVA, SZ_2M), (IOVA + SZ_2M, 2 * SZ_4K)]
    } else {
        &[
            (IOVA, SZ_2M),
            (IOVA + SZ_2M, SZ_4K),
            (IOVA + SZ_2M + SZ_4K, SZ_4K),
        ]
    };
    assert_eq!(r.pages(), expect);
    let t = r.pt.translate(IOVA + 0x1234).unwrap().unwrap();
    assert_eq!((t.pa, t.level, t.page_iova), (RAM + 0x1234, 2, IOVA));
    let t = r.pt.translate(IOVA + SZ_2M + SZ_4K + 5).unwrap().unwrap();
    assert_eq!((t.pa, t.level), (RAM + SZ_2M + SZ_4K + 5, 1));
    assert_eq!(r.pt.translate(IOVA + size).unwrap(), None);
    assert_eq!(r.pt.translate(u64::MAX).unwrap(), None);

    // Every rule, named.
    let e = r.pt.map(IOVA + SZ_4K, RAM, SZ_4K, Perm::RW).unwrap_err();
    assert_eq!(e, Error::Overlap { iova: IOVA + SZ_4K });
    let e =
        r.pt.map(IOVA - 2 * SZ_4K, RAM, 4 * SZ_4K, Perm::RW)
            .unwrap_err();
    assert_eq!(e, Error::Overlap { iova: IOVA });
    assert!(matches!(
        r.pt.map(IOVA + 0x800, RAM, SZ_4K, Perm::RW),
        Err(Error::Unaligned { what: "IOVA", .. })
    ));
    assert!(matches!(
        r.pt.map(0, RAM + 8, SZ_4K, Perm::RW),
        Err(Error::Unaligned {
            what: "physical address",
            ..
        })
    ));
    assert!(matches!(
        r.pt.map(0, RAM, 0, Perm::RW),
        Err(Error::EmptyRange { .. })
    ));
    let top = 1u64 << r.pt.format().iova_bits();
    assert!(matches!(
        r.pt.map(top - SZ_4K, RAM, 2 * SZ_4K, Perm::RW),
        Err(Error::IovaOutOfRange { .. })
    ));
    assert!(matches!(
        r.pt.map(!0xfff, RAM, 2 * SZ_4K, Perm::RW),
        Err(Error::IovaOutOfRange { .. })
    ));
    let oa = 1u64 << r.pt.format().oa_bits();
    assert!(matches!(
        r.pt.map(0, oa - SZ_4K, 2 * SZ_4K, Perm::RW),
        Err(Error::PaOutOfRange { .. })
    ));
    assert!(matches!(
        r.pt.map(0, 0, SZ_4K, Perm::default()),
        Err(Error::NoAccess)
    ));
    if !r.pt.format().write_only() {
        assert!(matches!(
            r.pt.map(0, 0, SZ_4K, Perm::W),
            Err(Error::WriteOnly(_))
        ));
    }
    if r.pt.format().page_sizes() & (1 << 13) == 0 {
        assert!(matches!(
            r.pt.map_sizes(0, 0, 8192, Perm::RW, 1 << 13),
            Err(Error::PageSize { .. })
        ));
    }
    // Nothing was mapped by the failed requests.
    assert_eq!(r.pages(), expect);

    // Unmap may not cut a page.
    let e = r.pt.unmap(IOVA + SZ_4K, SZ_4K, &mut &*r.iommu).unwrap_err();
    assert_eq!(
        e,
        Error::PartialLeaf {
            iova: IOVA + SZ_4K,
            size: SZ_4K,
            leaf_iova: IOVA,
            leaf_size: SZ_2M
        }
    );
    assert_eq!(r.pages(), expect);
    let unmapped = r.pt.unmap(IOVA, size + SZ_2M, &mut &*r.iommu).unwrap();
    assert_eq!(unmapped, size);
    assert!(r.pages().is_empty());
    assert_eq!(r.pt.unmap(IOVA, size, &mut &*r.iommu).unwrap(), 0);

    // A table the unmap covers entirely is freed.
    let before = r.arena.allocated();
    r.pt.map_sizes(IOVA + SZ_2M * 2, RAM, SZ_2M, Perm::RW, SZ_4K)
        .unwrap();
    assert_eq!(r.arena.allocated(), before + 1);
    assert_eq!(r.pages().len(), 512);
    r.pt.unmap(IOVA + SZ_2M * 2, SZ_2M, &mut &*r.iommu).unwrap();
    assert_eq!(r.arena.allocated(), before);

    for &s in F::odd_sizes() {
        let at = IOVA + (64 << 20);
        r.pt.map_sizes(at, RAM, s, Perm::RW, s).unwrap();
        let mut seen = Vec::new();
        r.pt.walk(at, s, |m| seen.push((m.iova, m.leaf.size)))
            .unwrap();
        assert_eq!(seen, [(at, s)], "page size {s:#x}");
        let t = r.pt.translate(at + s - 1).unwrap().unwrap();
        assert_eq!(t.pa, RAM + s - 1);
        assert!(matches!(
            r.pt.unmap(at + SZ_4K, SZ_4K, &mut &*r.iommu),
            Err(Error::PartialLeaf { .. })
        ));
        assert_eq!(r.pt.unmap(at, s, &mut &*r.iommu).unwrap(), s);
    }
}

fn garbage_never_panics<F: Fixture>() {
    let r = Rig::<F>::new(true, true);
    let levels = r.pt.format().levels();
    // A hostile root entry for the top of the IOVA space.
    let top = 1u64 << r.pt.format().iova_bits();
    let probe = top - SZ_4K;
    let slot = ((probe >> (12 + 9 * (u32::from(levels) - 1))) & 511) as usize;
    for garbage in [u64::MAX, 0xffff_ffff_ffff_f1ff, 0x8000_0000_0000_0fff, 3] {
        r.arena.frame(r.pt.root()).unwrap()[slot].store(garbage, Ordering::Relaxed);
        let _ = r.pt.translate(probe);
        let _ = r.pt.walk(probe, SZ_4K, |_| {});
        let _ = r.port.dma_write(probe, &[1]);
        let _ = r.pt.dump();
    }
    r.arena.frame(r.pt.root()).unwrap()[slot].store(0, Ordering::Relaxed);
}

fn dirty_exactly_once<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map_sizes(IOVA, RAM, 4 << 20, Perm::RW, SZ_4K).unwrap();
    assert!(r.harvest(false).is_empty(), "new mappings start clean");
    let mut rng = Rng(0x1234_5678 ^ r.pt.format().kind() as u64);
    let mut written = std::collections::BTreeSet::new();
    for _ in 0..80 {
        let p = rng.below(1024);
        r.write(IOVA + p * SZ_4K + rng.below(512) * 8, rng.next());
        written.insert(IOVA + p * SZ_4K);
    }
    let mut buf = [0u8; 64];
    for _ in 0..40 {
        let p = rng.below(1024);
        r.port.dma_read(IOVA + p * SZ_4K, &mut buf).unwrap();
    }
    let got = r.harvest(false);
    assert_eq!(got, written.iter().copied().collect::<Vec<_>>());
    assert!(r.harvest(false).is_empty(), "reported exactly once");
    // A write spanning two pages dirties both.
    r.port.dma_write(IOVA + SZ_4K - 4, &[0xaa; 8]).unwrap();
    assert_eq!(r.harvest(false), [IOVA, IOVA + SZ_4K]);
    // Again, after the clean: the IOTLB was flushed, so the walk records the write anew.
    r.write(IOVA + 10 * SZ_4K, 1);
    assert_eq!(r.harvest(false), [IOVA + 10 * SZ_4K]);
    assert!(r.iommu.stats().iotlb_hits > 0);
}

fn no_clear_preserves<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    let pages = [3u64, 4, 100, 511];
    for p in pages {
        r.write(IOVA + p * SZ_4K, p);
    }
    let want: Vec<u64> = pages.iter().map(|p| IOVA + p * SZ_4K).collect();
    assert_eq!(r.harvest(true), want);
    assert_eq!(r.harvest(true), want);
    assert_eq!(r.harvest(false), want);
    assert!(r.harvest(true).is_empty());
}

fn huge_page_reports_whole_range<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map(IOVA, RAM, SZ_2M, Perm::RW).unwrap();
    assert_eq!(r.pages(), [(IOVA, SZ_2M)]);
    r.write(IOVA + 12345 * 8, 9);
    assert_eq!(r.harvest(false), span(IOVA, 512));
    assert!(r.harvest(false).is_empty());
    for &s in F::odd_sizes() {
        let at = IOVA + (32 << 20);
        r.pt.map_sizes(at, RAM, s, Perm::RW, s).unwrap();
        r.write(at + s - 8, 1);
        let mut bits = DirtyBits::new(at, s, SZ_4K).unwrap();
        r.pt.read_and_clear_dirty(at, s, &mut bits, HarvestOptions::default(), &mut &*r.iommu)
            .unwrap();
        assert_eq!(bits.count(), s / SZ_4K, "page size {s:#x}");
        r.pt.unmap(at, s, &mut &*r.iommu).unwrap();
    }
}

fn split_preserves_dirty<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    // Two 2 MiB blocks (AMD-Vi would otherwise use one 4 MiB page).
    r.pt.map_sizes(IOVA, RAM, 2 * SZ_2M, Perm::RW, SZ_4K | SZ_2M)
        .unwrap();
    r.write(IOVA + 77, 1); // dirties the first block only
    let st = r.pt.split(IOVA, 2 * SZ_2M, SZ_4K, &mut &*r.iommu).unwrap();
    assert_eq!((st.split, st.tables), (2, 2));
    let pages = r.pages();
    assert_eq!(pages.len(), 1024);
    assert!(pages.iter().all(|&(_, s)| s == SZ_4K));
    // Every child of the dirty block is dirty; the clean block's children are clean.
    assert_eq!(r.harvest(false), span(IOVA, 512));
    r.write(IOVA + SZ_2M + 5 * SZ_4K, 1);
    assert_eq!(r.harvest(false), [IOVA + SZ_2M + 5 * SZ_4K]);
    // Translation is unchanged.
    let t = r.pt.translate(IOVA + SZ_2M + 0x1008).unwrap().unwrap();
    assert_eq!(t.pa, RAM + SZ_2M + 0x1008);
    for &s in F::odd_sizes().iter().filter(|&&s| s < SZ_2M) {
        let at = IOVA + (32 << 20);
        r.pt.map_sizes(at, RAM, s, Perm::RW, s).unwrap();
        r.write(at + s - 8, 1);
        let st = r.pt.split(at, s, SZ_4K, &mut &*r.iommu).unwrap();
        assert_eq!(st.split, 1);
        let mut bits = DirtyBits::new(at, s, SZ_4K).unwrap();
        r.pt.read_and_clear_dirty(at, s, &mut bits, HarvestOptions::default(), &mut &*r.iommu)
            .unwrap();
        assert_eq!(
            bits.count(),
            s / SZ_4K,
            "every 4K child of the {s:#x} page is dirty"
        );
        r.pt.unmap(at, s, &mut &*r.iommu).unwrap();
    }
}

fn collapse_ors_children<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map_sizes(IOVA, RAM, 2 * SZ_2M, Perm::RW, SZ_4K)
        .unwrap();
    let frames = r.arena.allocated();
    r.write(IOVA + 300 * SZ_4K, 1);
    let st = r.pt.collapse(IOVA, 2 * SZ_2M, &mut &*r.iommu).unwrap();
    assert_eq!((st.collapsed, st.dirty), (2, 1));
    assert_eq!(r.arena.allocated(), frames - 2);
    assert_eq!(r.pages(), [(IOVA, SZ_2M), (IOVA + SZ_2M, SZ_2M)]);
    assert_eq!(r.harvest(false), span(IOVA, 512));
    // Split and collapse round-trip to the same entries.
    let before = r.pt.dump();
    r.pt.split(IOVA, 2 * SZ_2M, SZ_4K, &mut &*r.iommu).unwrap();
    r.pt.collapse(IOVA, 2 * SZ_2M, &mut &*r.iommu).unwrap();
    assert_eq!(r.pt.dump(), before);
    // Children that differ are left alone.
    let at = IOVA + (64 << 20);
    r.pt.map_sizes(at, RAM, SZ_2M / 2, Perm::RW, SZ_4K).unwrap();
    r.pt.map_sizes(at + SZ_2M / 2, RAM + SZ_2M / 2, SZ_2M / 2, Perm::R, SZ_4K)
        .unwrap();
    r.pt.map_sizes(at + SZ_2M, RAM + SZ_2M, SZ_2M / 2, Perm::RW, SZ_4K)
        .unwrap();
    r.pt.map_sizes(at + 3 * SZ_2M / 2, RAM, SZ_2M / 2, Perm::RW, SZ_4K)
        .unwrap();
    let st = r.pt.collapse(at, 2 * SZ_2M, &mut &*r.iommu).unwrap();
    assert_eq!(st.collapsed, 0);
}

fn faulting_access_leaves_no_dirty<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map(IOVA, RAM, SZ_4K, Perm::R).unwrap();
    let e = r.port.dma_write(IOVA, &[1]).unwrap_err();
    assert_eq!(e.kind, FaultKind::Permission);
    let e = r.port.dma_write(IOVA + SZ_4K, &[1]).unwrap_err();
    assert_eq!(e.kind, FaultKind::NotPresent);
    let mut b = [0u8; 4];
    r.port.dma_read(IOVA, &mut b).unwrap();
    assert!(r.harvest(false).is_empty());
    let mut seen = Vec::new();
    r.pt.walk(IOVA, SZ_4K, |m| seen.push(m.leaf.dirty)).unwrap();
    assert_eq!(seen, [false]);
    assert_eq!(r.iommu.faults().len(), 2);
    if r.pt.format().write_only() {
        r.pt.map(IOVA + SZ_2M, RAM, SZ_4K, Perm::W).unwrap();
        assert_eq!(
            r.port.dma_read(IOVA + SZ_2M, &mut b).unwrap_err().kind,
            FaultKind::Permission
        );
    }
    // Detached: everything faults, nothing is recorded.
    r.pt.map(IOVA + 2 * SZ_4K, RAM, SZ_4K, Perm::RW).unwrap();
    r.iommu.detach(DEV).unwrap();
    assert!(r.port.dma_write(IOVA + 2 * SZ_4K, &[1]).is_err());
    assert!(r.harvest(false).is_empty());
}

fn tracking_off_records_nothing<F: Fixture>() {
    if !F::AD_SWITCH {
        // Nothing turns first-stage A/D updates off: a write is always recorded, and a harvest
        // that discards its result is the way to start clean.
        let mut r = Rig::<F>::new(true, false);
        r.pt.map(IOVA, RAM, SZ_2M, Perm::RW).unwrap();
        r.write(IOVA, 1);
        assert_eq!(r.harvest(false), span(IOVA, 512));
        assert_eq!(
            r.pt.set_dirty_tracking(IOVA, RAM_SIZE, false, &mut &*r.iommu)
                .unwrap(),
            0
        );
        r.write(IOVA + SZ_4K, 1);
        assert_eq!(r.harvest(false), span(IOVA, 512));
        return;
    }
    // Hardware dirty updates disabled in the device context.
    let mut r = Rig::<F>::new(true, false);
    r.pt.set_dirty_tracking(IOVA, RAM_SIZE, false, &mut &*r.iommu)
        .unwrap();
    r.pt.map(IOVA, RAM, SZ_2M, Perm::RW).unwrap();
    r.write(IOVA, 1);
    assert!(r.harvest(false).is_empty());
    // Turn it on: context first, then (Arm) the leaves.
    r.iommu.attach(DEV, F::context(r.pt.root(), true)).unwrap();
    let changed =
        r.pt.set_dirty_tracking(IOVA, RAM_SIZE, true, &mut &*r.iommu)
            .unwrap();
    assert_eq!(changed, u64::from(r.pt.format().tracking_in_pte()));
    r.write(IOVA + SZ_4K, 1);
    assert_eq!(r.harvest(false), span(IOVA, 512));
    // And off again: writes still succeed, nothing is recorded.
    r.iommu.attach(DEV, F::context(r.pt.root(), false)).unwrap();
    r.pt.set_dirty_tracking(IOVA, RAM_SIZE, false, &mut &*r.iommu)
        .unwrap();
    r.write(IOVA + 2 * SZ_4K, 1);
    assert!(r.harvest(false).is_empty());
    assert!(r.iommu.faults().is_empty());
}

fn flush_is_what_keeps_dirty_pages<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    let page = IOVA + 9 * SZ_4K;
    // Without the flush: the IOTLB still holds the entry marked dirty, so the second write does
    // not set the cleaned dirty bit again and the page is lost.
    r.write(page, 1);
    assert_eq!(r.harvest_noflush(), [page]);
    r.write(page, 2);
    assert!(
        r.harvest_noflush().is_empty(),
        "the model must lose the write"
    );
    assert_eq!(r.ram.read_u64(RAM + 9 * SZ_4K), Some(2));
    // The stale entry keeps losing writes until something flushes it (a harvest that cleans
    // nothing has nothing to flush).
    r.write(page, 3);
    assert!(
        r.harvest(false).is_empty(),
        "still served by the stale IOTLB entry"
    );
    r.iommu.flush_range(IOVA, RAM_SIZE);
    // From here on every harvest that cleans flushes, and the same sequence loses nothing.
    r.write(page, 4);
    assert_eq!(r.harvest(false), [page]);
    r.write(page, 5);
    assert_eq!(r.harvest(false), [page]);
    r.write(page, 6);
    assert_eq!(r.harvest(false), [page]);
    // Without an IOTLB there is nothing to lose.
    let mut r = Rig::<F>::new(false, true);
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    r.write(page, 1);
    assert_eq!(r.harvest_noflush(), [page]);
    r.write(page, 2);
    assert_eq!(r.harvest_noflush(), [page]);
}

/// The harvest option that clears the accessed flag with the dirty state: the cleaned leaf has
/// neither, and the next write (after the flush) records both again.
fn clear_accessed_rearms<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    let opts = HarvestOptions {
        clear_accessed: true,
        ..HarvestOptions::default()
    };
    let page = IOVA + 5 * SZ_4K;
    for v in 0..3 {
        r.write(page, v);
        let mut bits = DirtyBits::new(IOVA, SZ_2M, SZ_4K).unwrap();
        let st =
            r.pt.read_and_clear_dirty(IOVA, SZ_2M, &mut bits, opts, &mut &*r.iommu)
                .unwrap();
        assert_eq!(bits.iter().collect::<Vec<_>>(), [page]);
        assert_eq!(st.flushes, 1);
        let mut seen = Vec::new();
        r.pt.walk(page, SZ_4K, |m| seen.push((m.leaf.accessed, m.leaf.dirty)))
            .unwrap();
        assert_eq!(seen, [(false, false)], "round {v}");
    }
}

fn batches_flush_once_per_window<F: Fixture>() {
    let mut r = Rig::<F>::new(true, true);
    r.pt.map_sizes(IOVA, RAM, 4 << 20, Perm::RW, SZ_4K).unwrap();
    for p in [0u64, 1, 700, 1023] {
        r.write(IOVA + p * SZ_4K, 1);
    }
    let mut calls = Vec::new();
    let mut hook = |iova: u64, len: u64| calls.push((iova, len));
    let mut bits = DirtyBits::new(IOVA, 4 << 20, SZ_4K).unwrap();
    let opts = HarvestOptions {
        batch: SZ_2M,
        ..HarvestOptions::default()
    };
    let st =
        r.pt.read_and_clear_dirty(IOVA, 4 << 20, &mut bits, opts, &mut hook)
            .unwrap();
    assert_eq!(st.cleaned, 4);
    assert_eq!(calls, [(IOVA, SZ_2M), (IOVA + SZ_2M, SZ_2M)]);
    // Nothing cleaned: no flush.
    calls.clear();
    let mut hook = |iova: u64, len: u64| calls.push((iova, len));
    r.pt.read_and_clear_dirty(IOVA, 4 << 20, &mut bits, opts, &mut hook)
        .unwrap();
    assert!(calls.is_empty());
    assert!(matches!(
        r.pt.read_and_clear_dirty(
            IOVA,
            SZ_4K,
            &mut bits,
            HarvestOptions {
                batch: 100,
                ..HarvestOptions::default()
            },
            &mut NoFlush
        ),
        Err(Error::Unaligned { .. })
    ));
}

/// Two writer threads DMA random values into random pages while the harvester reads and clears,
/// copies what it finds to a destination, and now and then splits and collapses a block under
/// their feet. Every write must be reported by a harvest that started after the write did
/// (or by the one running), and the destination must end up equal to the source.
fn concurrent_writers_lose_nothing<F: Fixture>() {
    const ROUNDS: u64 = 100_000;
    const PAGES: u64 = 1024; // 4 MiB: first half 4K pages, second half one 2M block
    let mut r = Rig::<F>::new(true, true);
    r.pt.map_sizes(IOVA, RAM, SZ_2M, Perm::RW, SZ_4K).unwrap();
    r.pt.map(IOVA + SZ_2M, RAM + SZ_2M, SZ_2M, Perm::RW)
        .unwrap();
    let dest = GuestRam::new(RAM, RAM_SIZE);
    let rounds_done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Per page: the number of harvests that had completed when the latest-starting write to it
    // began. Every write needs a report from a harvest at least that late, so the maximum is
    // the one to check.
    let started_after: Arc<Vec<AtomicU64>> =
        Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let port = r.port.clone();
            let (rounds_done, stop) = (rounds_done.clone(), stop.clone());
            let (started_after, writes) = (started_after.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                while !stop.load(Ordering::Relaxed) {
                    let p = rng.below(PAGES);
                    let h = rounds_done.load(Ordering::SeqCst);
                    let iova = IOVA + p * SZ_4K + rng.below(512) * 8;
                    port.dma_write(iova, &rng.next().to_le_bytes()).unwrap();
                    started_after[p as usize].fetch_max(h, Ordering::SeqCst);
                    writes.fetch_add(1, Ordering::Relaxed);
                    // Leave the harvester a share of the two cores CI machines have.
                    std::thread::yield_now();
                }
            })
        })
        .collect();

    let mut last_report = vec![None::<u32>; PAGES as usize];
    let mut bits = DirtyBits::new(IOVA, PAGES * SZ_4K, SZ_4K).unwrap();
    let mut harvest = |pt: &mut PageTable<F, Arena>, round: u64, last: &mut [Option<u32>]| {
        bits.clear();
        pt.read_and_clear_dirty(
            IOVA,
            PAGES * SZ_4K,
            &mut bits,
            HarvestOptions::default(),
            &mut &*r.iommu,
        )
        .unwrap();
        for iova in bits.iter() {
            let p = (iova - IOVA) / SZ_4K;
            assert!(r.ram.copy_to(&dest, RAM + p * SZ_4K, SZ_4K));
            last[p as usize] = Some(round as u32);
        }
    };
    let mut block_split = false;
    // At least ROUNDS harvests, and at least two writes per harvest on average.
    let mut round = 0;
    while round < ROUNDS || writes.load(Ordering::Relaxed) < 2 * ROUNDS {
        harvest(&mut r.pt, round, &mut last_report);
        rounds_done.store(round + 1, Ordering::SeqCst);
        if round % 997 == 996 {
            if block_split {
                let st = r.pt.collapse(IOVA + SZ_2M, SZ_2M, &mut &*r.iommu).unwrap();
                assert_eq!(st.collapsed, 1);
            } else {
                let st =
                    r.pt.split(IOVA + SZ_2M, SZ_2M, SZ_4K, &mut &*r.iommu)
                        .unwrap();
                assert_eq!(st.split, 1);
            }
            block_split = !block_split;
        }
        round += 1;
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    harvest(&mut r.pt, round, &mut last_report);
    assert!(writes.load(Ordering::SeqCst) >= 2 * ROUNDS);
    let lost: Vec<u64> = (0..PAGES)
        .filter(|&p| {
            let h = started_after[p as usize].load(Ordering::SeqCst);
            h > 0 && last_report[p as usize].is_none_or(|r| u64::from(r) < h)
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} pages written but not reported afterwards, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(8)]
    );
    assert_eq!(
        dest.first_difference(&r.ram),
        None,
        "destination differs from source"
    );
    assert!(r.iommu.stats().iotlb_hits > 0);
}

macro_rules! suite {
    ($($module:ident: $format:ty),* $(,)?) => {$(
        mod $module {
            use super::*;
            #[test] fn map_unmap_translate() { super::map_unmap_translate::<$format>() }
            #[test] fn garbage_never_panics() { super::garbage_never_panics::<$format>() }
            #[test] fn dirty_exactly_once() { super::dirty_exactly_once::<$format>() }
            #[test] fn no_clear_preserves() { super::no_clear_preserves::<$format>() }
            #[test] fn huge_page_reports_whole_range() { super::huge_page_reports_whole_range::<$format>() }
            #[test] fn split_preserves_dirty() { super::split_preserves_dirty::<$format>() }
            #[test] fn collapse_ors_children() { super::collapse_ors_children::<$format>() }
            #[test] fn faulting_access_leaves_no_dirty() { super::faulting_access_leaves_no_dirty::<$format>() }
            #[test] fn tracking_off_records_nothing() { super::tracking_off_records_nothing::<$format>() }
            #[test] fn flush_is_what_keeps_dirty_pages() { super::flush_is_what_keeps_dirty_pages::<$format>() }
            #[test] fn batches_flush_once_per_window() { super::batches_flush_once_per_window::<$format>() }
            #[test] fn clear_accessed_rearms() { super::clear_accessed_rearms::<$format>() }
            #[test] fn concurrent_writers_lose_nothing() { super::concurrent_writers_lose_nothing::<$format>() }
        }
    )*};
}

suite!(
    amd_v1: AmdV1,
    vtd_second_stage: VtdSecondStage,
    x86_first_stage: X86FirstStage,
    arm_stage1: ArmS1,
    arm_stage2: ArmS2,
);
