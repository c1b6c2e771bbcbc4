//! Profile `vtd-fw`: QEMU 10.0's emulated VT-d driven by this program, not by Linux
//! (`intel_iommu=off`): scalable mode, first-stage (x86-64 format) translation for `edu`, its
//! tables in a reserved RAM range (`memmap=16M$0x10000000`), registers through /dev/mem at the
//! base the ACPI DMAR table gives. Values and QEMU's measured behaviour:
//! ../shared/recipes/vtd-firmware.md. Register offsets and entry layouts: the Intel VT-d
//! specification (translation structures, queued invalidation, register descriptions).
//!
//! Two of the cases prove QEMU deviations from the specification that lose dirty state; they
//! are written to fail on a conforming implementation, so the day QEMU fixes them they say so.

use anyhow::{Context, Result, bail, ensure};
use livemig_iommu_pt::caps::VtdCaps;
use livemig_iommu_pt::config::VtdPasidEntry;
use livemig_iommu_pt::format::X86FirstStage as Fs;
use livemig_iommu_pt::vtd::{
    ContextEntry, ContextScope, FRCD_CLEAR, FaultAccess, FaultRecord, GlobalCommand, InvDesc,
    IotlbScope, PasidCacheScope, PasidDirEntry, PasidIotlbScope, Reg, RootEntry, gcmd_value,
    iq_offset_256, iqa_value, rtaddr_scalable,
};
use livemig_iommu_pt::{DirtyBits, HarvestOptions, PageTable, Perm};

use crate::check_eq;
use crate::fw::{
    DATA, DevMemTables, HUGE, IOVA, IOVA_HUGE, Phys, RESERVED, SINK, SRC, Scratch, data_off,
    dmar_units, page,
};
use crate::harness::{Outcome, Runner};
use crate::trace;

// Registers: offsets from livemig-iommu-pt's VT-d register map.
const CAP: u64 = Reg::Cap.offset() as u64;
const ECAP: u64 = Reg::Ecap.offset() as u64;
const GCMD: u64 = Reg::Gcmd.offset() as u64;
const GSTS: u64 = Reg::Gsts.offset() as u64;
const RTADDR: u64 = Reg::Rtaddr.offset() as u64;
const FSTS: u64 = Reg::Fsts.offset() as u64;
const IQH: u64 = Reg::Iqh.offset() as u64;
const IQT: u64 = Reg::Iqt.offset() as u64;
const IQA: u64 = Reg::Iqa.offset() as u64;
/// GSTS status bits: TES, RTPS, QIES.
pub(crate) const TES: u32 = 1 << 31;
pub(crate) const RTPS: u32 = 1 << 30;
pub(crate) const QIES: u32 = 1 << 26;
/// FSTS.PPF: a primary fault is pending.
const FSTS_PPF: u32 = 1 << 1;

// First-stage entry bits (livemig-iommu-pt's x86-64 first-stage format).
const P: u64 = Fs::P;
const US: u64 = Fs::US;
const A: u64 = Fs::A;
const D: u64 = Fs::D;
const PS: u64 = Fs::PS;
const ADDR: u64 = Fs::ADDR;

// Layout in it (offsets).
const ROOT: u64 = 0x0000;
const CONTEXT: u64 = 0x1000;
const PASID_DIR: u64 = 0x2000;
const PASID_TABLE: u64 = 0x3000;
const QUEUE: u64 = 0x4000;
const WAIT_STATUS: u64 = 0x5000;
const IOVA_1G: u64 = 0x80_0000_0000;
const DID: u16 = 1;

/// A VT-d unit's registers (base from the ACPI DMAR table), off at start: what both VT-d
/// profiles share.
pub(crate) struct VtdRegs {
    pub regs: Phys,
    pub caps: VtdCaps,
    fro: u64,
}

impl VtdRegs {
    pub fn open() -> Result<VtdRegs> {
        let base = *dmar_units()?
            .first()
            .context("the DMAR table names no unit")?;
        let regs = Phys::dev_mem(base, 0x1000)?;
        let caps = VtdCaps::from_regs(regs.r64(CAP), regs.r64(ECAP));
        let fro = livemig_iommu_pt::vtd::fault_record_offset(&caps, 0)
            .context("CAP reports no fault recording register")?;
        ensure!(
            regs.r32(GSTS) == 0,
            "GSTS {:#x}: the unit is not off (did Linux take it?)",
            regs.r32(GSTS)
        );
        Ok(VtdRegs { regs, caps, fro })
    }

    /// Issues a global command (`gcmd_value` repeats the enables already on: QEMU acts on
    /// the XOR with GSTS) and waits for GSTS to show `status`.
    pub fn gcmd(&self, cmd: GlobalCommand, status: u32) -> Result<()> {
        self.regs.w32(GCMD, gcmd_value(self.regs.r32(GSTS), cmd));
        crate::util::poll("GSTS", std::time::Duration::from_secs(2), || {
            Ok((self.regs.r32(GSTS) & status != 0).then_some(()))
        })
    }

    /// The pending fault, decoded by livemig-iommu-pt's `FaultRecord`: (reason, is_read,
    /// source id, address); the record is cleared.
    pub fn take_fault(&self) -> Result<Option<(u8, bool, u16, u64)>> {
        if self.regs.r32(FSTS) & FSTS_PPF == 0 {
            return Ok(None);
        }
        let words = [self.regs.r64(self.fro), self.regs.r64(self.fro + 8)];
        let f = FaultRecord::from_words(words)?;
        // Clear F (write 1), then the status.
        self.regs.w64(self.fro + 8, FRCD_CLEAR);
        self.regs.w32(FSTS, self.regs.r32(FSTS));
        Ok(Some((
            f.reason.0,
            f.access == FaultAccess::Read,
            f.source_id,
            f.address & !0xfff,
        )))
    }
}

/// The unit, its tables and edu.
struct Unit {
    v: VtdRegs,
    s: Scratch,
    tail: u64,
    /// The first-stage table, built and harvested by livemig-iommu-pt.
    pt: PageTable<Fs, DevMemTables>,
    /// Its root, as an offset into the reserved range.
    pml4: u64,
}

impl Unit {
    /// Writes GCMD with the bits already on kept (QEMU acts on the XOR with GSTS) and waits
    /// for GSTS to show `bit`.
    fn put(&mut self, d: InvDesc) {
        for (i, w) in d.words().iter().enumerate() {
            self.s.mem.w64(QUEUE + self.tail * 32 + i as u64 * 8, *w);
        }
        self.tail = (self.tail + 1) % 128;
    }

    /// Submits one descriptor and a wait descriptor with a status write, and waits for it.
    fn qi(&mut self, d: Result<InvDesc, livemig_iommu_pt::Error>) -> Result<()> {
        let marker = 0x5a5a_0000 | (self.tail as u32 & 0xffff);
        self.s.mem.w32(WAIT_STATUS, 0);
        self.put(d?);
        self.put(InvDesc::wait(
            Some((self.s.pa(WAIT_STATUS), marker)),
            false,
            false,
        )?);
        self.v.regs.w64(IQT, iq_offset_256(self.tail as u32));
        crate::util::poll(
            "the invalidation wait descriptor",
            std::time::Duration::from_secs(2),
            || Ok((self.s.mem.r32(WAIT_STATUS) == marker).then_some(())),
        )
        .with_context(|| {
            format!(
                "IQH {:#x} IQT {:#x} FSTS {:#x}",
                self.v.regs.r64(IQH),
                self.v.regs.r64(IQT),
                self.v.regs.r32(FSTS)
            )
        })
    }

    fn invalidate_all(&mut self) -> Result<()> {
        self.qi(InvDesc::context_cache(ContextScope::Global))?;
        self.qi(InvDesc::pasid_cache(PasidCacheScope::Global))?;
        self.qi(InvDesc::iotlb(IotlbScope::Global, true))
    }

    /// PASID-based IOTLB invalidation of 2^am pages at `iova`, DID 1, PASID 0.
    fn invalidate_page(&mut self, iova: u64, am: u8) -> Result<()> {
        self.qi(InvDesc::pasid_iotlb(PasidIotlbScope::Pages {
            did: DID,
            pasid: 0,
            addr: iova,
            am,
            ih: false,
        }))
    }

    /// livemig-iommu-pt's harvest over the pages and the 2 MiB page: read-and-clear of D
    /// (and A with it), then with `clean_a` the A of clean leaves too; the flushes it asks for
    /// become PASID-based IOTLB invalidations (a global one beyond CAP.MAMV). Returns the
    /// dirty IOVAs (4 KiB granules).
    fn harvest(&mut self, clean_a: bool) -> Result<Vec<u64>> {
        let mut bits = DirtyBits::new(IOVA, IOVA_HUGE + 0x20_0000 - IOVA, 0x1000)?;
        let mut flushes = Vec::new();
        let opts = HarvestOptions {
            clear_accessed: true,
            ..HarvestOptions::default()
        };
        self.pt.read_and_clear_dirty(
            IOVA,
            IOVA_HUGE + 0x20_0000 - IOVA,
            &mut bits,
            opts,
            &mut |iova: u64, len: u64| flushes.push((iova, len)),
        )?;
        // QEMU's deviation 1: a leaf left with A = 1 (a page only read) never gets D, so
        // A is cleared on the clean leaves too (PageTable::clear_accessed).
        if clean_a {
            self.pt.clear_accessed(
                IOVA,
                IOVA_HUGE + 0x20_0000 - IOVA,
                &mut |iova: u64, len: u64| flushes.push((iova, len)),
            )?;
        }
        let mamv = self.v.caps.max_address_mask();
        for (iova, len) in flushes {
            let am = (len.max(0x1000) / 0x1000)
                .next_power_of_two()
                .trailing_zeros() as u8;
            if am > mamv {
                self.invalidate_all()?;
            } else {
                self.invalidate_page(iova & !((0x1000u64 << am) - 1), am)?;
            }
        }
        Ok(bits.iter().collect())
    }

    /// Maps `iova` → `pa` as one leaf of `size` (4 KiB, 2 MiB or 1 GiB) with
    /// livemig-iommu-pt's x86-64 first-stage `PageTable`, writable or not; `user = false`
    /// then clears the leaf's U/S (first-stage DMA requires U/S = 1 at every level).
    fn map_leaf(
        &mut self,
        iova: u64,
        pa: u64,
        size: u64,
        writable: bool,
        user: bool,
    ) -> Result<()> {
        let perm = if writable { Perm::RW } else { Perm::R };
        self.pt
            .map_sizes(iova, pa, size, perm, size)
            .map_err(|e| anyhow::anyhow!("mapping {iova:#x}: {e}"))?;
        if !user {
            let (at, e) = self.leaf(iova)?;
            self.s.mem.w64(at, e & !US);
        }
        Ok(())
    }

    fn map(&mut self, iova: u64, pa: u64, huge: bool, writable: bool) -> Result<()> {
        self.map_leaf(
            iova,
            pa,
            if huge { 0x20_0000 } else { 0x1000 },
            writable,
            true,
        )
    }

    /// The entries on the walk to `iova`, top first (offsets into the reserved range).
    fn walk(&self, iova: u64) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut table = self.pml4;
        for shift in [39u32, 30, 21, 12] {
            let at = table + ((iova >> shift) & 0x1ff) * 8;
            let e = self.s.mem.r64(at);
            out.push((at, e));
            if e & P == 0 || (shift < 39 && shift > 12 && e & PS != 0) {
                break;
            }
            table = (e & ADDR) - RESERVED;
        }
        Ok(out)
    }

    fn leaf(&self, iova: u64) -> Result<(u64, u64)> {
        self.walk(iova)?.last().copied().context("empty walk")
    }

    fn clear_bits(&self, iova: u64, bits: u64) -> Result<()> {
        let (at, e) = self.leaf(iova)?;
        self.s.mem.w64(at, e & !bits);
        Ok(())
    }
}

fn bring_up() -> Result<Unit> {
    let (pt, pml4) = crate::fw::page_table(Fs::new(4, 46))?;
    let mut u = Unit {
        v: VtdRegs::open()?,
        s: Scratch::open()?,
        tail: 0,
        pt,
        pml4,
    };
    let sid = u.s.edu.source_id()?;
    ensure!(
        sid < 128,
        "edu at devfn {sid:#x}: the lower context table only"
    );
    // livemig-iommu-pt's structures: the root entry for bus 0 (lower context table), the
    // scalable-mode context entry for edu (PASID directory, PDTS 0, RID_PASID 0), PASID
    // directory entry 0, PASID table entry 0 (first stage, 4-level, DID 1).
    let root = RootEntry::scalable(Some(u.s.pa(CONTEXT)), None)?;
    for (i, w) in root.words().iter().enumerate() {
        u.s.mem.w64(ROOT + i as u64 * 8, *w);
    }
    let ctx = ContextEntry::scalable(u.s.pa(PASID_DIR), 0, 0)?;
    for (i, w) in ctx.words().iter().enumerate() {
        u.s.mem
            .w64(CONTEXT + u64::from(sid) * 32 + i as u64 * 8, *w);
    }
    let dir = PasidDirEntry::new(u.s.pa(PASID_TABLE))?;
    u.s.mem.w64(PASID_DIR, dir.0);
    let pe = VtdPasidEntry::first_stage(u.s.pa(u.pml4), 4, DID);
    for (i, w) in pe.words().iter().enumerate() {
        u.s.mem.w64(PASID_TABLE + i as u64 * 8, *w);
    }
    u.v.regs.w64(RTADDR, rtaddr_scalable(u.s.pa(ROOT))?);
    u.v.gcmd(GlobalCommand::SetRootTablePointer, RTPS)?;
    u.v.regs.w64(IQT, 0);
    u.v.regs.w64(IQA, iqa_value(u.s.pa(QUEUE), 0)?);
    u.v.gcmd(GlobalCommand::QueuedInvalidation(true), QIES)?;
    u.invalidate_all()?;
    u.v.gcmd(GlobalCommand::Translation(true), TES)?;
    Ok(u)
}

impl Unit {}

pub fn run(r: &mut Runner) {
    r.case("vtdfw.dmar_table_names_the_unit", || {
        let units = dmar_units()?;
        check_eq!(units, vec![0xfed9_0000u64], "DRHD register bases");
        Ok(Outcome::Pass)
    });

    r.case("vtdfw.caps_first_stage_without_second_stage_ad", || {
        let c = VtdRegs::open()?.caps;
        trace!("CAP {:#x} ECAP {:#x}", c.cap(), c.ecap());
        ensure!(
            c.scalable_mode() && c.first_stage() && c.queued_invalidation(),
            "ECAP {:#x}",
            c.ecap()
        );
        ensure!(
            !c.second_stage() && !c.second_stage_ad(),
            "x-flts=on advertises no second stage: ECAP {:#x}",
            c.ecap()
        );
        ensure!(
            !c.dirty_support().supported(),
            "second-stage A/D is the only dirty tracking VT-d advertises: {:?}",
            c.dirty_support()
        );
        Ok(Outcome::Pass)
    });

    let unit = bring_up();
    let mut u = match unit {
        Ok(u) => {
            r.case("vtdfw.scalable_first_stage_enabled", || Ok(Outcome::Pass));
            u
        }
        Err(e) => {
            let why = format!("{e:#}");
            r.fail("vtdfw.scalable_first_stage_enabled", &why);
            r.fail_all(&CASES, "the unit could not be brought up");
            return;
        }
    };
    trace!("GSTS {:#x}", u.v.regs.r32(GSTS));

    // Pages 0..16 mapped read-write to DATA, page 16 read-only, page 17 unmapped; the 2 MiB page.
    let setup: Result<()> = (|| {
        for i in 0..16 {
            u.map(page(i), u.s.pa(data_off(i)), false, true)?;
        }
        u.map(page(16), u.s.pa(data_off(16)), false, false)?;
        u.map(page(SRC), u.s.pa(data_off(SRC)), false, true)?;
        // Page 18 without U/S; a 1 GiB leaf at IOVA_1G over guest-physical 0 (FS1GP).
        u.map_leaf(page(18), u.s.pa(data_off(18)), 0x1000, true, false)?;
        u.map_leaf(IOVA_1G, 0, 0x4000_0000, true, true)?;
        u.map(page(SINK), u.s.pa(data_off(SINK)), false, true)?;
        u.map(IOVA_HUGE, u.s.pa(HUGE), true, true)?;
        u.s.mem.fill(DATA, 32 * 0x1000, 0);
        u.invalidate_all()
    })();
    if let Err(e) = setup {
        r.fail_all(&CASES, &format!("mapping: {e:#}"));
        return;
    }

    crate::fw::dma_cases(r, CASES[0], CASES[1], &u.s);

    r.case(CASES[2], || {
        u.s.write(page(4), 4096, 0x44)?;
        let walk = u.walk(page(4))?;
        check_eq!(walk.len(), 4);
        for (lvl, (_, e)) in walk.iter().enumerate() {
            ensure!(e & A != 0, "level {} entry {e:#x} has no A", 4 - lvl);
            if lvl < 3 {
                ensure!(e & D == 0, "upper level {} entry {e:#x} has D", 4 - lvl);
            }
        }
        ensure!(
            walk[3].1 & D != 0,
            "the leaf {:#x} has no D after a write",
            walk[3].1
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[3], || {
        ensure!(u.s.read_is(page(5), 4096, 0)?, "read");
        let (_, e) = u.leaf(page(5))?;
        ensure!(
            e & A != 0 && e & D == 0,
            "after a read the leaf is {e:#x} (want A, not D)"
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[4], || {
        // Clear A and D together, invalidate the page, write: reported again.
        u.s.write(page(6), 4096, 0x61)?;
        u.clear_bits(page(6), A | D)?;
        u.invalidate_page(page(6), 0)?;
        u.s.write(page(6), 4096, 0x62)?;
        let (_, e) = u.leaf(page(6))?;
        ensure!(
            e & D != 0,
            "cleared, invalidated, written again: leaf {e:#x} has no D"
        );
        ensure!(u.s.mem.all(data_off(6), 4096, 0x62), "data");
        Ok(Outcome::Pass)
    });

    r.case(CASES[5], || {
        // Negative control: clear without invalidating — the IOTLB still holds the entry with
        // D set, so the next write sets nothing (as the specification allows and the crate's
        // model predicts for a stale IOTLB). A harvest that skips the flush loses this write.
        u.s.write(page(7), 4096, 0x71)?;
        u.clear_bits(page(7), A | D)?;
        u.s.write(page(7), 4096, 0x72)?;
        let (_, e) = u.leaf(page(7))?;
        ensure!(
            e & D == 0,
            "without an invalidation the write was still reported ({e:#x}): the control cannot fail"
        );
        ensure!(u.s.mem.all(data_off(7), 4096, 0x72), "the data still lands");
        u.invalidate_page(page(7), 0)?;
        Ok(Outcome::Pass)
    });

    r.case(CASES[6], || {
        // QEMU deviation 1: with A already set the leaf never gets D (QEMU's A/D update returns
        // when any wanted flag is set). A conforming unit sets D: this assertion then fails.
        u.s.write(page(8), 4096, 0x81)?;
        u.clear_bits(page(8), D)?;
        u.invalidate_page(page(8), 0)?;
        u.s.write(page(8), 4096, 0x82)?;
        let (_, e) = u.leaf(page(8))?;
        if e & D != 0 {
            bail!("D was set on a leaf with A = 1 (leaf {e:#x}): QEMU now conforms; update the recipe, the docs and this case");
        }
        Ok(Outcome::Pass)
    });

    r.case(CASES[7], || {
        // QEMU deviation 2: a write that hits an IOTLB entry a read filled sets no D (the spec
        // requires a walk to set D). On a conforming unit D is set and this fails.
        u.clear_bits(page(9), A | D)?;
        u.invalidate_page(page(9), 0)?;
        ensure!(u.s.read_is(page(9), 4096, 0)?, "read");
        u.s.write(page(9), 4096, 0x91)?;
        let (_, e) = u.leaf(page(9))?;
        ensure!(e & A != 0, "the read set no A ({e:#x})");
        if e & D != 0 {
            bail!("a write after a read set D (leaf {e:#x}): QEMU now conforms; update the recipe, the docs and this case");
        }
        Ok(Outcome::Pass)
    });

    r.case(CASES[8], || {
        // A 2 MiB leaf: the write sets its PDE's A and D; PSI with AM = 9 invalidates it.
        u.s.write(IOVA_HUGE, 4096, 0xb1)?;
        let (at, e) = u.leaf(IOVA_HUGE)?;
        ensure!(e & PS != 0 && e & A != 0 && e & D != 0, "2 MiB leaf {e:#x}");
        ensure!(
            u.s.mem.all(HUGE, 4096, 0xb1),
            "data at the 2 MiB page's start"
        );
        u.s.mem.w64(at, e & !(A | D));
        u.invalidate_page(IOVA_HUGE, 9)?;
        u.s.write(IOVA_HUGE + 0x10_0000, 4096, 0xb2)?;
        let (_, e) = u.leaf(IOVA_HUGE)?;
        ensure!(
            e & D != 0,
            "after AM = 9 invalidation the 2 MiB leaf {e:#x} has no D"
        );
        ensure!(
            u.s.mem.all(HUGE + 0x10_0000, 4096, 0xb2),
            "data 1 MiB into the 2 MiB page"
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[9], || {
        // A write to an unmapped IOVA: nothing lands, one fault record: reason 0x71, write,
        // edu's source id, the IOVA.
        let _ = u.v.take_fault()?;
        let canary = data_off(17);
        u.s.mem.fill(canary, 4096, 0xee);
        u.s.write(page(17), 4096, 0x17)?;
        let f =
            u.v.take_fault()?
                .context("no fault recorded for an unmapped write")?;
        let sid = u.s.edu.source_id()?;
        check_eq!(
            f,
            (0x71, false, sid, page(17)),
            "(reason, read, sid, address)"
        );
        ensure!(u.s.mem.all(canary, 4096, 0xee), "the canary changed");
        Ok(Outcome::Pass)
    });

    r.case(CASES[10], || {
        // A write to a read-only page: reason 0x85, the leaf's A not set, nothing lands.
        let _ = u.v.take_fault()?;
        u.s.mem.fill(data_off(16), 4096, 0x16);
        u.s.write(page(16), 4096, 0xff)?;
        let f =
            u.v.take_fault()?
                .context("no fault for a write to a read-only page")?;
        check_eq!(f.0, 0x85, "fault reason");
        check_eq!(f.1, false, "a write");
        let (_, e) = u.leaf(page(16))?;
        ensure!(e & A == 0, "the faulting write set A ({e:#x})");
        ensure!(
            u.s.mem.all(data_off(16), 4096, 0x16),
            "the read-only page changed"
        );
        // It is readable.
        ensure!(
            u.s.read_is(page(16), 4096, 0x16)?,
            "read of the read-only page"
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[11], || {
        // livemig-iommu-pt's harvest (read-and-clear of A and D, plus clearing A on clean
        // leaves: the QEMU workaround) over the tables QEMU walks. Page 3 was read by an
        // earlier case (its leaf has A = 1): without clear_accessed QEMU never reports it. edu writes chosen 4 KiB pages and the 2 MiB page; the harvest
        // reports exactly those, its flushes (PASID-based IOTLB invalidations) are issued,
        // and after one more write exactly that page is reported again.
        u.harvest(true)?;
        let chosen = [0u64, 2, 3, 10, 15];
        for &i in &chosen {
            u.s.write(page(i), 64, 0xc0 | i as u8)?;
        }
        u.s.write(IOVA_HUGE + 0x3000, 64, 0xcc)?;
        let got = u.harvest(true)?;
        let mut want: Vec<u64> = chosen.iter().map(|&i| page(i)).collect();
        // A 2 MiB leaf reports its whole range.
        want.extend((0..512).map(|i| IOVA_HUGE + i * 0x1000));
        check_eq!(got, want, "pages the harvest reported");
        u.s.write(page(10), 64, 0xd0)?;
        check_eq!(
            u.harvest(true)?,
            vec![page(10)],
            "after the harvest's flush, one more write"
        );
        check_eq!(u.harvest(true)?, Vec::<u64>::new(), "nothing written since");
        Ok(Outcome::Pass)
    });

    r.case(CASES[12], || {
        // A 1 GiB leaf over guest-physical 0: a write at IOVA_1G + x lands at physical x.
        let off = data_off(20);
        u.s.mem.fill(off, 4096, 0);
        u.s.write(IOVA_1G + RESERVED + off, 4096, 0x1e)?;
        ensure!(
            u.s.mem.all(off, 4096, 0x1e),
            "the data is not at the 1 GiB page's offset"
        );
        let walk = u.walk(IOVA_1G)?;
        check_eq!(walk.len(), 2, "a 1 GiB leaf is the second level");
        let e = walk[1].1;
        ensure!(e & PS != 0 && e & A != 0 && e & D != 0, "1 GiB leaf {e:#x}");
        Ok(Outcome::Pass)
    });

    r.case(CASES[13], || {
        // First-stage DMA is a user access: a leaf with U/S = 0 faults (reason 0x81) and
        // nothing lands.
        let _ = u.v.take_fault()?;
        u.s.mem.fill(data_off(18), 4096, 0x18);
        u.s.write(page(18), 4096, 0xff)?;
        let f =
            u.v.take_fault()?
                .context("no fault for a supervisor-only page")?;
        check_eq!(f.0, 0x81, "fault reason");
        ensure!(u.s.mem.all(data_off(18), 4096, 0x18), "the page changed");
        Ok(Outcome::Pass)
    });

    r.case(CASES[14], || {
        // A read of an unmapped IOVA: reason 0x71, recorded as a read (type bit set).
        let _ = u.v.take_fault()?;
        let _ = u.s.read_is(page(19), 4096, 0);
        let f = u.v.take_fault()?.context("no fault for an unmapped read")?;
        check_eq!(
            (f.0, f.1, f.3),
            (0x71, true, page(19)),
            "(reason, read, address)"
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[15], || {
        // Negative control for the harvest above: without clearing A on clean leaves, a page
        // the device read (A = 1) and then wrote after a flushed harvest is never reported on
        // QEMU (deviation 1); the model, which follows the specification, reports it
        // (crates/iommu-pt/tests/qemu_vtd_sequences.rs).
        u.harvest(true)?;
        ensure!(u.s.read_is(page(5), 64, 0)?, "read");
        u.harvest(false)?;
        // The read's IOTLB entry goes (so this is deviation 1, not 2): the write walks.
        u.invalidate_all()?;
        u.s.write(page(5), 64, 0x5e)?;
        let got = u.harvest(false)?;
        if got.contains(&page(5)) {
            bail!("the write to a page read before was reported without clearing A: QEMU now conforms; update the docs and these cases");
        }
        // With the workaround the next write is seen again.
        u.harvest(true)?;
        u.s.write(page(5), 64, 0x5f)?;
        check_eq!(u.harvest(true)?, vec![page(5)], "with clear_accessed");
        Ok(Outcome::Pass)
    });
}

const CASES: [&str; 16] = [
    "vtdfw.dma_write_lands_at_the_translated_page",
    "vtdfw.dma_read_from_the_translated_page",
    "vtdfw.write_sets_a_at_every_level_and_d_at_the_leaf",
    "vtdfw.read_sets_a_not_d",
    "vtdfw.clear_invalidate_write_reported_again",
    "vtdfw.negative_control_clear_without_invalidation_loses_the_write",
    "vtdfw.qemu_deviation_leaf_with_a_never_gets_d",
    "vtdfw.qemu_deviation_write_after_read_sets_no_d",
    "vtdfw.huge_2m_leaf_dirty_and_psi_am9",
    "vtdfw.unmapped_write_faults_0x71",
    "vtdfw.read_only_write_faults_0x85",
    "vtdfw.harvest_reports_exactly_the_written_pages",
    "vtdfw.huge_1g_leaf_translates_and_gets_d",
    "vtdfw.user_bit_clear_faults_0x81",
    "vtdfw.unmapped_read_faults_as_a_read",
    "vtdfw.negative_control_harvest_without_clearing_clean_a_misses_a_read_page",
];
