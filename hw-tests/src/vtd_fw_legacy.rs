//! Profile `vtd-fw-legacy`: the second-stage side of QEMU 10.0's VT-d, driven by this program.
//! The verified first-stage machine (`x-flts=on`) advertises no second stage; QEMU translates
//! with second-stage tables in legacy mode (`intel-iommu,intremap=off`, no scalable mode,
//! `aw-bits` 48 for 4-level tables). Structures (VT-d specification): the root entry, the legacy
//! context entry (TT = 00: untranslated requests through second-stage tables), second-stage
//! entries (R bit 0, W bit 1, PS bit 7, A bit 8 and D bit 9 only with ECAP.SLADS). Queued
//! invalidation with 128-bit descriptors (IQA.DW = 0).

use anyhow::{Context, Result, ensure};
use livemig_iommu_pt::format::VtdSecondStage;
use livemig_iommu_pt::vtd::{ContextScope, GlobalCommand, InvDesc, IotlbScope, Reg};
use livemig_iommu_pt::{PageTable, Perm};

use crate::check_eq;
use crate::fw::{
    DATA, DevMemTables, HUGE, IOVA_HUGE, RESERVED, SINK, SRC, Scratch, data_off, page,
};
use crate::harness::{Outcome, Runner};
use crate::trace;
use crate::vtd_fw::{QIES, RTPS, TES, VtdRegs};

const RTADDR: u64 = Reg::Rtaddr.offset() as u64;
const IQT: u64 = Reg::Iqt.offset() as u64;
const IQA: u64 = Reg::Iqa.offset() as u64;

const R: u64 = 1 << 0;
const W: u64 = 1 << 1;
const PS: u64 = 1 << 7;
const SL_A: u64 = 1 << 8;
const SL_D: u64 = 1 << 9;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

const ROOT: u64 = 0x0000;
const CONTEXT: u64 = 0x1000;
const QUEUE: u64 = 0x4000;
const IOVA_1G: u64 = 0x80_0000_0000;
const WAIT_STATUS: u64 = 0x5000;

struct Unit {
    v: VtdRegs,
    s: Scratch,
    tail: u64,
    /// The second-stage table, built by livemig-iommu-pt.
    pt: PageTable<VtdSecondStage, DevMemTables>,
    /// Its root, as an offset into the reserved range.
    root_table: u64,
}

impl Unit {
    /// One descriptor as 128 bits (the low half of livemig-iommu-pt's 256-bit encoding: the
    /// same fields), then a wait descriptor with a status write.
    fn qi(&mut self, d: Result<InvDesc, livemig_iommu_pt::Error>) -> Result<()> {
        let marker = 0x6b6b_0000 | (self.tail as u32 & 0xffff);
        self.s.mem.w32(WAIT_STATUS, 0);
        let wait = InvDesc::wait(Some((self.s.pa(WAIT_STATUS), marker)), false, false)?;
        for desc in [d?, wait] {
            let w = desc.words();
            ensure!(w[2] == 0 && w[3] == 0, "descriptor {w:x?} needs 256 bits");
            self.s.mem.w64(QUEUE + self.tail * 16, w[0]);
            self.s.mem.w64(QUEUE + self.tail * 16 + 8, w[1]);
            self.tail = (self.tail + 1) % 256;
        }
        self.v.regs.w64(IQT, self.tail << 4);
        crate::util::poll(
            "the invalidation wait descriptor",
            std::time::Duration::from_secs(2),
            || Ok((self.s.mem.r32(WAIT_STATUS) == marker).then_some(())),
        )
    }

    fn invalidate_all(&mut self) -> Result<()> {
        self.qi(InvDesc::context_cache(ContextScope::Global))?;
        self.qi(InvDesc::iotlb(IotlbScope::Global, true))
    }

    /// Maps one leaf of `size` with livemig-iommu-pt's VT-d second-stage `PageTable`.
    fn map(&mut self, iova: u64, pa: u64, size: u64, perm: Perm) -> Result<()> {
        self.pt
            .map_sizes(iova, pa, size, perm, size)
            .map_err(|e| anyhow::anyhow!("mapping {iova:#x}: {e}"))
    }

    fn leaf(&self, iova: u64) -> u64 {
        let mut table = self.root_table;
        for shift in [39u32, 30, 21, 12] {
            let e = self.s.mem.r64(table + ((iova >> shift) & 0x1ff) * 8);
            if e & (R | W) == 0 || shift == 12 || (shift < 39 && e & PS != 0) {
                return e;
            }
            table = (e & ADDR) - RESERVED;
        }
        0
    }
}

fn bring_up() -> Result<Unit> {
    let (pt, root_table) = crate::fw::page_table(VtdSecondStage::new(48, 46))?;
    let mut u = Unit {
        v: VtdRegs::open()?,
        s: Scratch::open()?,
        tail: 0,
        pt,
        root_table,
    };
    let sid = u.s.edu.source_id()?;
    // Root entry for bus 0 → context table; context entry: P, TT = 00, SL table pointer;
    // AW = 010 (48 bits, 4-level), DID 1.
    u.s.mem.w64(ROOT, u.s.pa(CONTEXT) | 1);
    let ctx = CONTEXT + u64::from(sid) * 16;
    u.s.mem.w64(ctx, u.s.pa(u.root_table) | 1);
    u.s.mem.w64(ctx + 8, 2 | (1 << 8));
    // RTADDR with TTM = 00 (legacy); IQA with DW = 0 (128-bit descriptors), one page.
    u.v.regs.w64(RTADDR, u.s.pa(ROOT));
    u.v.gcmd(GlobalCommand::SetRootTablePointer, RTPS)?;
    u.v.regs.w64(IQT, 0);
    u.v.regs.w64(IQA, u.s.pa(QUEUE));
    u.v.gcmd(GlobalCommand::QueuedInvalidation(true), QIES)?;
    u.invalidate_all()?;
    u.v.gcmd(GlobalCommand::Translation(true), TES)?;
    Ok(u)
}

const CASES: [&str; 8] = [
    "vtdfwl.dma_write_lands_at_the_translated_page",
    "vtdfwl.dma_read_from_the_translated_page",
    "vtdfwl.huge_2m_leaf_translates",
    "vtdfwl.qemu_sets_no_second_stage_a_d",
    "vtdfwl.unmapped_write_faults",
    "vtdfwl.read_only_write_faults",
    "vtdfwl.write_only_read_faults",
    "vtdfwl.huge_1g_leaf_translates",
];

pub fn run(r: &mut Runner) {
    r.case("vtdfwl.caps_legacy_second_stage", || {
        let c = VtdRegs::open()?.caps;
        trace!("CAP {:#x} ECAP {:#x}", c.cap(), c.ecap());
        ensure!(
            !c.scalable_mode() && c.queued_invalidation(),
            "ECAP {:#x}",
            c.ecap()
        );
        ensure!(
            c.address_widths().contains(&48),
            "SAGAW {:?}",
            c.address_widths()
        );
        ensure!(
            c.second_stage_page_sizes() & (1 << 21) != 0,
            "no 2 MiB second-stage pages: {:#x}",
            c.second_stage_page_sizes()
        );
        ensure!(
            !c.second_stage_ad(),
            "QEMU 10.0 advertises no second-stage A/D: ECAP {:#x}",
            c.ecap()
        );
        Ok(Outcome::Pass)
    });
    let mut u = match bring_up() {
        Ok(u) => {
            r.case("vtdfwl.legacy_second_stage_enabled", || Ok(Outcome::Pass));
            u
        }
        Err(e) => {
            r.fail("vtdfwl.legacy_second_stage_enabled", &format!("{e:#}"));
            r.fail_all(&CASES, "the unit could not be brought up");
            return;
        }
    };
    let setup: Result<()> = (|| {
        for i in 0..8 {
            u.map(page(i), u.s.pa(data_off(i)), 0x1000, Perm::RW)?;
        }
        u.map(page(8), u.s.pa(data_off(8)), 0x1000, Perm::R)?;
        u.map(page(9), u.s.pa(data_off(9)), 0x1000, Perm::W)?;
        u.map(page(SRC), u.s.pa(data_off(SRC)), 0x1000, Perm::RW)?;
        u.map(page(SINK), u.s.pa(data_off(SINK)), 0x1000, Perm::RW)?;
        u.map(IOVA_HUGE, u.s.pa(HUGE), 0x20_0000, Perm::RW)?;
        // A 1 GiB leaf over guest-physical 0 (CAP.SLLPS).
        u.map(IOVA_1G, 0, 0x4000_0000, Perm::RW)?;
        u.s.mem.fill(DATA, 32 * 0x1000, 0);
        u.invalidate_all()
    })();
    if let Err(e) = setup {
        r.fail_all(&CASES, &format!("mapping: {e:#}"));
        return;
    }
    crate::fw::dma_cases(r, CASES[0], CASES[1], &u.s);
    r.case(CASES[2], || {
        u.s.write_lands_at(
            IOVA_HUGE + 0x18_0000,
            HUGE + 0x18_0000,
            "1.5 MiB into the 2 MiB page",
        )?;
        Ok(Outcome::Pass)
    });
    r.case(CASES[3], || {
        // Second-stage A/D exist only with ECAP.SLADS, which QEMU 10.0 does not advertise, and
        // its walk sets neither bit: a VMM cannot track dirty pages through QEMU's second stage.
        u.s.write(page(4), 4096, 0x44)?;
        let e = u.leaf(page(4));
        ensure!(
            e & (SL_A | SL_D) == 0,
            "second-stage leaf {e:#x} has A or D set: QEMU now implements them; update the docs"
        );
        Ok(Outcome::Pass)
    });
    r.case(CASES[4], || {
        let _ = u.v.take_fault()?;
        u.s.mem.fill(data_off(17), 4096, 0xee);
        u.s.write(page(17), 4096, 0x17)?;
        let f =
            u.v.take_fault()?
                .context("no fault for an unmapped write")?;
        trace!(
            "unmapped write: reason {:#x}, read {}, sid {:#x}, address {:#x}",
            f.0, f.1, f.2, f.3
        );
        check_eq!(
            (f.1, f.2, f.3),
            (false, u.s.edu.source_id()?, page(17)),
            "(read, sid, address)"
        );
        // VT-d fault reason 0x5: a write without write permission (a non-present entry grants none).
        check_eq!(f.0, 0x5, "fault reason");
        ensure!(u.s.mem.all(data_off(17), 4096, 0xee), "the canary changed");
        Ok(Outcome::Pass)
    });
    r.case(CASES[5], || {
        let _ = u.v.take_fault()?;
        u.s.mem.fill(data_off(8), 4096, 0x08);
        u.s.write(page(8), 4096, 0xff)?;
        let f =
            u.v.take_fault()?
                .context("no fault for a write to a read-only page")?;
        check_eq!((f.0, f.1), (0x5, false), "(reason, read)");
        ensure!(
            u.s.mem.all(data_off(8), 4096, 0x08),
            "the read-only page changed"
        );
        Ok(Outcome::Pass)
    });
    r.case(CASES[6], || {
        // VT-d fault reason 0x6: a read without read permission.
        let _ = u.v.take_fault()?;
        let _ = u.s.read_is(page(9), 4096, 0);
        let f =
            u.v.take_fault()?
                .context("no fault for a read of a write-only page")?;
        check_eq!(
            (f.0, f.1, f.3),
            (0x6, true, page(9)),
            "(reason, read, address)"
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[7], || {
        let off = data_off(20);
        u.s.write_lands_at(IOVA_1G + RESERVED + off, off, "a 1 GiB second-stage leaf")?;
        Ok(Outcome::Pass)
    });
}
