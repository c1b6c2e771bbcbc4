//! A QM VF (and PF) device model: the register semantics the migration sequences rely on, queue
//! pairs that DMA their results and completions into guest memory, and fault injection.
//!
//! ```text
//!  guest driver ─ mailbox SQC_BT/CQC_BT/SQC/CQC/EQC/AEQC ─┐      QmPfModel: VFT per function,
//!               ─ SQ doorbell (tail) ─────────────────────┤        QUE_ISO_CFG_V, RAS/core
//!                                                         v        interrupt status, VFT_CFG
//!  QmVfModel  registers │ mailbox │ queue contexts (cached) │ EQ ──process()──> Dma
//!               PAUSE_QM stops processing; QM_CACHE_WB_START writes the cached SQC/CQC
//!               back to the tables in memory; an SQ doorbell with priority 1 restarts a queue
//!               (reloading its context from memory)
//! ```
//!
//! Real structures where the kernel defines them: the SQC/CQC contexts (`struct qm_sqc`,
//! `struct qm_cqc`: head, tail, base, dw3 = depth - 1 | log2(SQE size) << 12, CQC dw6 bit 0 =
//! phase), the CQE (`struct qm_cqe`: `sq_head`, `sq_num`, phase in `w7` bit 0), the EQE (CQ number
//! in bits 15:0, phase in bit 16), the EQC words (DW0 = head | tail << 16, DW2:DW1 = base,
//! DW3 = depth - 1, DW6 bit 0 = phase), the mailbox, doorbells and VFT. The work an SQE asks for
//! is the model's own: bytes 0..8 source IOVA, 8..16 destination IOVA, 16..20 length (at most
//! 4096), 20..22 a tag echoed in the CQE's `cmd_id`; the "accelerator" writes
//! `dst[i] = src[i] ^ 0x5a`. `QM_IFC_INT_SOURCE_V` is write-1-to-clear (the driver clears it by
//! writing 1 in `qm_dev_cmd_init`).
//!
//! # Revisions
//! [`QmPfModel::new`] is a `QM_HW_V3` PF: each VF's migration registers are in the second half
//! of its own 64 KiB BAR2 and the guest gets the first half. [`QmPfModel::with_revision`] makes
//! a PF of any revision; above V3 it sets `QM_MIG_REGION_EN` in `QM_MIG_REGION_SEL`, and then
//! its VFs' migration registers are reached through the PF's BAR2 ([`PfBar2`]) at
//! `0x180000 + vf_id * 0x2000` (Linux 7.3.4 `hisi_acc_vfio_pci.c:1196-1209`), with the
//! EQC/AEQC words at 0x1c00/0x1c20 of the window (`hisi_acc_vfio_pci.h:56-57`), while the
//! VF's own BAR2 is all the guest's: there, the old EQC/AEQC offsets read 0 and ignore
//! writes, so a migration that used the wrong path loses the event-queue state. The model's
//! PF BAR2 is [`PF_BAR2_LEN`] bytes (the real size is the hardware's; the model picks one
//! that holds 64 windows). A 64-bit store the driver aims at a VF's EQ/AEQ doorbell lands on
//! the next window's offset 0 (see [`PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET`](crate::regs::PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET)); what the hardware
//! does with it is not known, so the model counts it ([`PfStats::unrouted_stores`]) and does
//! nothing else.
//!
//! Both models count every register store, from any path ([`VfStats::register_writes`],
//! [`PfStats::register_writes`]), so a test can prove that a refusal wrote nothing.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::access::{PfBar2, PfRegisters, QmRegisters};
use crate::ids::AccKind;
use crate::mailbox::{DbCmd, Doorbell, Mailbox, MbCmd, Vft};
use crate::regs::{
    MigCtrl, PF_WINDOW_DOORBELL_SQ_CQ_OFFSET, PF_WINDOW_MAILBOX_OFFSET, PfReg, QM_MIG_REGION_EN,
    QM_MIG_REGION_OFFSET, QM_MIG_REGION_SIZE, QmRevision, VF_BAR2_LEN, VfReg,
};
use crate::state::QmRegState;

mod guest;
mod mem;

pub use guest::{Completion, GuestDriver, GuestQueue};
pub use mem::FlatMemory;

/// A DMA access the model could not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA {} at IOVA {iova:#x} failed", if *.write { "write" } else { "read" })]
pub struct DmaError {
    /// The IOVA.
    pub iova: u64,
    /// Whether it was a write.
    pub write: bool,
}

/// Where the model's DMA goes: guest memory directly ([`FlatMemory`]) or an IOMMU (for
/// example `livemig-iommu-pt`'s model, whose dirty tracking then sees the device's writes).
pub trait Dma: Send + Sync {
    /// Read `buf.len()` bytes at `iova`.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Write `data` at `iova`.
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;
}

impl<T: Dma + ?Sized> Dma for Arc<T> {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        (**self).read(iova, buf)
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        (**self).write(iova, data)
    }
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The mailbox busy bit never clears; commands are not executed.
    MailboxStuckBusy,
    /// This mailbox command completes with a non-zero status.
    MailboxError(MbCmd),
    /// `QM_CACHE_WB_DONE` never sets.
    WritebackNeverDone,
    /// `QM_IFC_INT_STATUS` reads non-zero.
    IfcIntStatusStuck,
    /// `QM_IFC_INT_SET_V` reads non-zero.
    IfcIntSetStuck,
    /// `QM_VF_STATE` bit 0 stays set (the VF never becomes ready).
    VfNeverReady,
    /// The VF's own VFT (mailbox `SQC_VFT_V2`) reports one queue more than the PF configured.
    VftMismatch,
    /// PF `QM_ABNORMAL_INT_STATUS` reads non-zero.
    AbnormalIntStuck,
    /// The PF's accelerator-core interrupt status reads non-zero.
    CoreIntStuck,
    /// PF `QM_VFT_CFG_RDY` never sets.
    VftCfgNeverReady,
}

/// Bytes of an SQC or CQC context.
pub const XQC_LEN: u64 = 32;
/// Bytes of a CQE.
pub const CQE_LEN: u64 = 16;
/// Bytes of an EQE.
pub const EQE_LEN: u64 = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes of the model PF's BAR2: 4 MiB, room for the named registers (up to 0x301804) and
/// 64 migration windows (the real size is the hardware's).
pub const PF_BAR2_LEN: usize = 0x40_0000;

/// PF counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PfStats {
    /// Stores to the PF's own registers or, through its BAR2, to a VF's window.
    pub register_writes: u64,
    /// Stores into the window area that reach no VF register (see the module docs).
    pub unrouted_stores: u64,
}

/// The PF: per-function VFTs, isolation state, and the state registers the checks read.
pub struct QmPfModel {
    kind: AccKind,
    revision: QmRevision,
    inner: Mutex<PfInner>,
}

struct PfInner {
    vft: HashMap<u32, Vft>,
    que_iso_cfg: u32,
    regs: HashMap<usize, u32>,
    faults: Vec<Fault>,
    vfs: HashMap<u32, Weak<QmVfModel>>,
    stats: PfStats,
}

impl fmt::Debug for QmPfModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmPfModel")
            .field("kind", &self.kind)
            .field("revision", &self.revision)
            .finish()
    }
}

impl QmPfModel {
    /// A `QM_HW_V3` PF of `kind` with the given queue isolation configuration: its VFs keep
    /// their migration registers in their own BAR2.
    pub fn new(kind: AccKind, que_iso_cfg: u32) -> Arc<Self> {
        Self::with_revision(kind, que_iso_cfg, QmRevision::V3)
    }

    /// A PF of `revision`. Above `QM_HW_V3` it reports `QM_MIG_REGION_EN`, and its VFs'
    /// migration registers are in its BAR2; at or below, `QM_MIG_REGION_SEL` reads 0.
    pub fn with_revision(kind: AccKind, que_iso_cfg: u32, revision: QmRevision) -> Arc<Self> {
        let mut regs = HashMap::new();
        regs.insert(PfReg::VftCfgRdy.offset(), 1);
        if revision.is_new() {
            regs.insert(PfReg::MigRegionSel.offset(), QM_MIG_REGION_EN);
        }
        Arc::new(QmPfModel {
            kind,
            revision,
            inner: Mutex::new(PfInner {
                vft: HashMap::new(),
                que_iso_cfg,
                regs,
                faults: Vec::new(),
                vfs: HashMap::new(),
                stats: PfStats::default(),
            }),
        })
    }

    /// The accelerator kind.
    pub fn kind(&self) -> AccKind {
        self.kind
    }

    /// The QM revision (`qm->ver`).
    pub fn revision(&self) -> QmRevision {
        self.revision
    }

    /// Make `QM_MIG_REGION_SEL` read `value` (to test what the driver makes of it). VFs
    /// created afterwards follow it; the window routing follows it at once.
    pub fn set_mig_region_sel(&self, value: u32) {
        lock(&self.inner)
            .regs
            .insert(PfReg::MigRegionSel.offset(), value);
    }

    /// Where this PF's VFs have their migration registers: the PF's BAR2 when the revision
    /// is above V3 and `QM_MIG_REGION_EN` is set, else their own BAR2.
    pub fn mig_ctrl(&self) -> MigCtrl {
        let sel = lock(&self.inner)
            .regs
            .get(&PfReg::MigRegionSel.offset())
            .copied()
            .unwrap_or(0);
        if self.revision.is_new() && sel & QM_MIG_REGION_EN != 0 {
            MigCtrl::PfBar2
        } else {
            MigCtrl::VfBar2
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PfStats {
        lock(&self.inner).stats
    }

    /// The VF whose window holds PF BAR2 offset `off`, and the offset in the window.
    fn window(&self, off: usize) -> Option<(Arc<QmVfModel>, usize)> {
        if self.mig_ctrl() != MigCtrl::PfBar2 {
            return None;
        }
        let rel = off.checked_sub(QM_MIG_REGION_OFFSET)?;
        let fun = u32::try_from(rel / QM_MIG_REGION_SIZE).ok()?;
        let vf = lock(&self.inner).vfs.get(&fun)?.upgrade()?;
        Some((vf, rel % QM_MIG_REGION_SIZE))
    }

    /// Whether `off` lies in the window area (VF 1's window onwards, as far as 64 VFs reach).
    fn in_window_area(off: usize) -> bool {
        (QM_MIG_REGION_OFFSET + QM_MIG_REGION_SIZE..QM_MIG_REGION_OFFSET + 65 * QM_MIG_REGION_SIZE)
            .contains(&off)
    }

    fn count_store(&self, routed: bool) {
        let mut g = lock(&self.inner);
        g.stats.register_writes += 1;
        if !routed {
            g.stats.unrouted_stores += 1;
        }
    }

    /// Give function `fun` (1-based VF number) its queue range.
    pub fn set_vft(&self, fun: u32, vft: Vft) {
        lock(&self.inner).vft.insert(fun, vft);
    }

    /// Create VF `fun` of this PF: its VFT entry here, and a VF model whose
    /// `QM_QUE_ISO_CFG_V` mirrors the PF's (as the PF driver configures it).
    ///
    /// The VF's BAR2 layout follows the PF: in PF-control mode ([`mig_ctrl`](Self::mig_ctrl))
    /// its migration registers are reached only through this PF's BAR2 window.
    pub fn create_vf(&self, fun: u32, vft: Vft, dma: Arc<dyn Dma>) -> Arc<QmVfModel> {
        self.set_vft(fun, vft);
        let vf = QmVfModel::with_mode(self.kind, vft, dma, self.mig_ctrl());
        let mut g = lock(&self.inner);
        g.vfs.insert(fun, Arc::downgrade(&vf));
        let iso = g.que_iso_cfg;
        drop(g);
        lock(&vf.inner).regs.insert(VfReg::QueIsoCfgV.offset(), iso);
        vf
    }

    /// The queue range of function `fun`.
    pub fn vft(&self, fun: u32) -> Option<Vft> {
        lock(&self.inner).vft.get(&fun).copied()
    }

    /// Inject a fault (PF faults only take effect here).
    pub fn inject(&self, fault: Fault) {
        lock(&self.inner).faults.push(fault);
    }

    /// Remove every injected fault.
    pub fn clear_faults(&self) {
        lock(&self.inner).faults.clear();
    }
}

impl PfRegisters for QmPfModel {
    fn read(&self, reg: PfReg) -> u32 {
        let g = lock(&self.inner);
        let has = |f| g.faults.contains(&f);
        match reg {
            PfReg::QueIsoCfgV => g.que_iso_cfg,
            PfReg::AbnormalIntStatus => u32::from(has(Fault::AbnormalIntStuck)),
            r if r == self.kind.core_int_status() => {
                if has(Fault::CoreIntStuck) {
                    0x4
                } else {
                    0
                }
            }
            PfReg::VftCfgRdy if has(Fault::VftCfgNeverReady) => 0,
            r => g.regs.get(&r.offset()).copied().unwrap_or(0),
        }
    }

    fn write(&self, reg: PfReg, value: u32) {
        let mut g = lock(&self.inner);
        g.stats.register_writes += 1;
        if reg == PfReg::MigRegionSel {
            return; // read-only
        }
        g.regs.insert(reg.offset(), value);
        if reg == PfReg::VftCfgOpEnable && value & 1 != 0 {
            let read = g.regs.get(&PfReg::VftCfgOpWr.offset()).copied() == Some(1);
            let sqc = g
                .regs
                .get(&PfReg::VftCfgType.offset())
                .copied()
                .unwrap_or(0)
                == 0;
            let fun = g.regs.get(&PfReg::VftCfg.offset()).copied().unwrap_or(0);
            if read && sqc {
                let v = g.vft.get(&fun).map_or(0, Vft::encode);
                g.regs.insert(PfReg::VftCfgDataL.offset(), v as u32);
                g.regs.insert(PfReg::VftCfgDataH.offset(), (v >> 32) as u32);
            }
            g.regs.insert(PfReg::VftCfgRdy.offset(), 1);
        }
    }
}

impl PfBar2 for QmPfModel {
    fn len(&self) -> usize {
        PF_BAR2_LEN
    }

    fn read32(&self, off: usize) -> u32 {
        if let Some((vf, w)) = self.window(off) {
            return match VfReg::at(w, MigCtrl::PfBar2) {
                Some(reg) => vf.window_read(reg),
                None => 0,
            };
        }
        match PF_REGS.iter().find(|r| r.offset() == off) {
            Some(&reg) => PfRegisters::read(self, reg),
            None => 0,
        }
    }

    fn write32(&self, off: usize, value: u32) {
        if let Some((vf, w)) = self.window(off) {
            let reg = VfReg::at(w, MigCtrl::PfBar2);
            self.count_store(reg.is_some());
            if let Some(reg) = reg {
                vf.window_write(reg, value);
            }
            return;
        }
        match PF_REGS.iter().find(|r| r.offset() == off) {
            Some(&reg) => PfRegisters::write(self, reg, value),
            None => self.count_store(!Self::in_window_area(off)),
        }
    }

    fn write64(&self, off: usize, value: u64) {
        match self.window(off) {
            Some((vf, PF_WINDOW_DOORBELL_SQ_CQ_OFFSET)) => {
                self.count_store(true);
                vf.window_doorbell(value);
            }
            // Among others, a VF's EQ/AEQ doorbell: window + 0x2000 is the next window's 0.
            _ => self.count_store(false),
        }
    }

    fn write128(&self, off: usize, value: &[u8; 16]) {
        match self.window(off) {
            Some((vf, PF_WINDOW_MAILBOX_OFFSET)) => {
                self.count_store(true);
                vf.window_mailbox(value);
            }
            _ => self.count_store(false),
        }
    }
}

/// The PF registers the model answers by offset.
const PF_REGS: [PfReg; 13] = [
    PfReg::QueIsoCfgV,
    PfReg::AbnormalIntStatus,
    PfReg::VftCfgOpEnable,
    PfReg::VftCfgOpWr,
    PfReg::VftCfgType,
    PfReg::VftCfg,
    PfReg::VftCfgDataL,
    PfReg::VftCfgDataH,
    PfReg::VftCfgRdy,
    PfReg::MigRegionSel,
    PfReg::SecCoreIntStatus,
    PfReg::HpreHacIntStatus,
    PfReg::HzipCoreIntStatus,
];

/// Runtime state of one queue pair, as the device caches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct QueueRt {
    loaded: bool,
    sq_base: u64,
    sq_depth: u16,
    sqe_size: u64,
    sq_head: u16,
    sq_tail: u16,
    cq_base: u64,
    cq_depth: u16,
    cq_head: u16,
    cq_tail: u16,
    cq_phase: bool,
    /// Stopped by a DMA fault.
    broken: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VfStats {
    /// Jobs completed.
    pub completions: u64,
    /// Mailbox commands executed.
    pub mailbox_commands: u64,
    /// Doorbells received.
    pub doorbells: u64,
    /// Cache write-backs performed.
    pub writebacks: u64,
    /// DMA faults met while processing.
    pub dma_faults: u64,
    /// Register stores (writes, doorbells, mailbox commands) from either path.
    pub register_writes: u64,
    /// Register accesses (reads and stores) through the PF's BAR2 window.
    pub window_accesses: u64,
}

struct VfInner {
    regs: HashMap<usize, u32>,
    mb_busy: bool,
    mb_w0: u32,
    mb_data: u64,
    sqc_bt: u64,
    cqc_bt: u64,
    vft: Vft,
    paused: bool,
    queues: Vec<QueueRt>,
    wb_done: bool,
    faults: Vec<Fault>,
    stats: VfStats,
}

/// A QM VF.
pub struct QmVfModel {
    kind: AccKind,
    mode: MigCtrl,
    dma: Arc<dyn Dma>,
    inner: Mutex<VfInner>,
}

impl fmt::Debug for QmVfModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmVfModel")
            .field("kind", &self.kind)
            .field("stats", &self.stats())
            .finish()
    }
}

/// What the migration moves, read back from a model for comparison: the registers
/// `acc_vf_data` carries, the queue-context table bases, and the contexts in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelState {
    /// The registers (DMA addresses filled in).
    pub regs: QmRegState,
    /// `QM_QUE_ISO_CFG_V` of the VF.
    pub que_iso_cfg: u32,
    /// `QM_VF_STATE`.
    pub vf_state: u32,
    /// SQC and CQC of each queue as they lie in memory.
    pub contexts: Vec<([u8; 32], [u8; 32])>,
}

impl QmVfModel {
    /// A VF of `kind` with queue range `vft`, doing DMA through `dma`. It starts ready
    /// (`QM_VF_STATE` = 0) with nothing configured; its migration registers are in its own
    /// BAR2 (old revision).
    pub fn new(kind: AccKind, vft: Vft, dma: Arc<dyn Dma>) -> Arc<Self> {
        Self::with_mode(kind, vft, dma, MigCtrl::VfBar2)
    }

    fn with_mode(kind: AccKind, vft: Vft, dma: Arc<dyn Dma>, mode: MigCtrl) -> Arc<Self> {
        Arc::new(QmVfModel {
            kind,
            mode,
            dma,
            inner: Mutex::new(VfInner {
                regs: HashMap::new(),
                mb_busy: false,
                mb_w0: 0,
                mb_data: 0,
                sqc_bt: 0,
                cqc_bt: 0,
                vft,
                paused: false,
                queues: vec![QueueRt::default(); usize::from(vft.num)],
                wb_done: false,
                faults: Vec::new(),
                stats: VfStats::default(),
            }),
        })
    }

    /// The accelerator kind.
    pub fn kind(&self) -> AccKind {
        self.kind
    }

    /// Inject a fault.
    pub fn inject(&self, fault: Fault) {
        lock(&self.inner).faults.push(fault);
    }

    /// Where the migration registers are.
    pub fn mig_ctrl(&self) -> MigCtrl {
        self.mode
    }

    /// Bytes of the VF's BAR2 (64 KiB).
    pub fn bar2_len(&self) -> usize {
        VF_BAR2_LEN
    }

    /// Bytes of BAR2 the guest is given: half in VF-control mode, all in PF-control mode.
    pub fn guest_bar2_len(&self) -> usize {
        self.mode.guest_bar2_len(VF_BAR2_LEN)
    }

    /// Whether `reg` is reachable through the VF's own BAR2: in PF-control mode the
    /// migration-only EQC/AEQC copies are not there.
    fn on_own_bar(&self, reg: VfReg) -> bool {
        self.mode == MigCtrl::VfBar2 || !matches!(reg, VfReg::EqcDw(_) | VfReg::AeqcDw(_))
    }

    fn window_read(&self, reg: VfReg) -> u32 {
        lock(&self.inner).stats.window_accesses += 1;
        self.reg_read(reg)
    }

    fn window_write(&self, reg: VfReg, value: u32) {
        lock(&self.inner).stats.window_accesses += 1;
        self.reg_write(reg, value)
    }

    fn window_doorbell(&self, value: u64) {
        lock(&self.inner).stats.window_accesses += 1;
        self.ring(true, value)
    }

    fn window_mailbox(&self, command: &[u8; 16]) {
        lock(&self.inner).stats.window_accesses += 1;
        self.command(command)
    }

    /// Remove every injected fault (a stuck mailbox becomes idle again).
    pub fn clear_faults(&self) {
        let mut g = lock(&self.inner);
        g.faults.clear();
        g.mb_busy = false;
    }

    /// Counters so far.
    pub fn stats(&self) -> VfStats {
        lock(&self.inner).stats
    }

    /// Whether `PAUSE_QM` has stopped the queues (and no restart has happened since).
    pub fn is_paused(&self) -> bool {
        lock(&self.inner).paused
    }

    /// Mark the VF not ready (as after a reset) or ready.
    pub fn set_not_ready(&self, not_ready: bool) {
        lock(&self.inner)
            .regs
            .insert(VfReg::VfState.offset(), u32::from(not_ready));
    }

    /// The migratable state as it stands (registers, table bases, contexts in memory).
    pub fn migratable_state(&self) -> ModelState {
        let g = lock(&self.inner);
        let reg = |r: VfReg| g.regs.get(&r.offset()).copied().unwrap_or(0);
        let mut regs = QmRegState {
            aeq_int_mask: reg(VfReg::AeqIntMask),
            eq_int_mask: reg(VfReg::EqIntMask),
            ifc_int_source: reg(VfReg::IfcIntSourceV),
            ifc_int_mask: reg(VfReg::IfcIntMask),
            ifc_int_set: reg(VfReg::IfcIntSetV),
            page_size: reg(VfReg::PageSize),
            eqc_dw: core::array::from_fn(|i| reg(VfReg::EqcDw(i as u8))),
            aeqc_dw: core::array::from_fn(|i| reg(VfReg::AeqcDw(i as u8))),
            rsv_regs: [0; 5],
            eqe_dma: 0,
            aeqe_dma: 0,
            sqc_dma: g.sqc_bt,
            cqc_dma: g.cqc_bt,
        };
        regs.eqe_dma = regs.eqe_from_words();
        regs.aeqe_dma = regs.aeqe_from_words();
        let contexts = (0..g.queues.len() as u64)
            .map(|q| {
                let mut s = [0u8; 32];
                let mut c = [0u8; 32];
                let _ = self.dma.read(g.sqc_bt + q * XQC_LEN, &mut s);
                let _ = self.dma.read(g.cqc_bt + q * XQC_LEN, &mut c);
                (s, c)
            })
            .collect();
        ModelState {
            regs,
            que_iso_cfg: reg(VfReg::QueIsoCfgV),
            vf_state: reg(VfReg::VfState),
            contexts,
        }
    }

    fn has(g: &VfInner, f: Fault) -> bool {
        g.faults.contains(&f)
    }

    fn exec_mailbox(&self, g: &mut VfInner, mb: Mailbox) -> u8 {
        g.stats.mailbox_commands += 1;
        if Self::has(g, Fault::MailboxError(mb.cmd)) {
            return 0x1;
        }
        match (mb.cmd, mb.read) {
            (MbCmd::SqcVftV2, true) => {
                let mut v = g.vft;
                if Self::has(g, Fault::VftMismatch) {
                    v.num += 1;
                }
                g.mb_data = v.encode();
            }
            (MbCmd::SqcBt, true) => g.mb_data = g.sqc_bt,
            (MbCmd::CqcBt, true) => g.mb_data = g.cqc_bt,
            (MbCmd::SqcBt, false) => {
                g.sqc_bt = mb.base;
                g.queues.iter_mut().for_each(|q| q.loaded = false);
            }
            (MbCmd::CqcBt, false) => {
                g.cqc_bt = mb.base;
                g.queues.iter_mut().for_each(|q| q.loaded = false);
            }
            (MbCmd::Sqc | MbCmd::Cqc, false) => {
                let q = u64::from(mb.queue);
                if q >= g.queues.len() as u64 {
                    return 0x2;
                }
                let table = if mb.cmd == MbCmd::Sqc {
                    g.sqc_bt
                } else {
                    g.cqc_bt
                };
                let mut ctx = [0u8; 32];
                if self.dma.read(mb.base, &mut ctx).is_err()
                    || self.dma.write(table + q * XQC_LEN, &ctx).is_err()
                {
                    return 0x3;
                }
                g.queues[q as usize].loaded = false;
            }
            (MbCmd::Eqc | MbCmd::Aeqc, false) => {
                let mut ctx = [0u8; 28];
                if self.dma.read(mb.base, &mut ctx).is_err() {
                    return 0x3;
                }
                for i in 0..7u8 {
                    let w = u32::from_le_bytes(
                        ctx[4 * usize::from(i)..4 * usize::from(i) + 4]
                            .try_into()
                            .expect("4 bytes"),
                    );
                    let r = if mb.cmd == MbCmd::Eqc {
                        VfReg::EqcDw(i)
                    } else {
                        VfReg::AeqcDw(i)
                    };
                    g.regs.insert(r.offset(), w);
                }
            }
            (MbCmd::PauseQm, false) => g.paused = true,
            _ => return 0x4,
        }
        0
    }

    fn load_queue(&self, g: &mut VfInner, q: usize) -> bool {
        if g.queues[q].loaded {
            return true;
        }
        if g.sqc_bt == 0 || g.cqc_bt == 0 {
            return false;
        }
        let mut s = [0u8; 32];
        let mut c = [0u8; 32];
        let qi = q as u64;
        if self.dma.read(g.sqc_bt + qi * XQC_LEN, &mut s).is_err()
            || self.dma.read(g.cqc_bt + qi * XQC_LEN, &mut c).is_err()
        {
            g.stats.dma_faults += 1;
            return false;
        }
        let u16_at = |b: &[u8; 32], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at =
            |b: &[u8; 32], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let sq_dw3 = u32_at(&s, 12);
        let cq_dw3 = u32_at(&c, 12);
        let rt = QueueRt {
            loaded: true,
            sq_base: u64::from(u32_at(&s, 4)) | (u64::from(u32_at(&s, 8)) << 32),
            sq_depth: ((sq_dw3 & 0xfff) + 1) as u16,
            sqe_size: 1 << ((sq_dw3 >> 12) & 0xf),
            sq_head: u16_at(&s, 0),
            sq_tail: u16_at(&s, 2),
            cq_base: u64::from(u32_at(&c, 4)) | (u64::from(u32_at(&c, 8)) << 32),
            cq_depth: ((cq_dw3 & 0xfff) + 1) as u16,
            cq_head: u16_at(&c, 0),
            cq_tail: u16_at(&c, 2),
            cq_phase: u32_at(&c, 24) & 1 != 0,
            broken: false,
        };
        g.queues[q] = rt;
        true
    }

    fn writeback(&self, g: &mut VfInner) -> bool {
        g.stats.writebacks += 1;
        for (q, rt) in g.queues.iter().enumerate() {
            if !rt.loaded {
                continue;
            }
            let qi = q as u64;
            let mut sq = [0u8; 4];
            sq[0..2].copy_from_slice(&rt.sq_head.to_le_bytes());
            sq[2..4].copy_from_slice(&rt.sq_tail.to_le_bytes());
            let mut cq = [0u8; 4];
            cq[0..2].copy_from_slice(&rt.cq_head.to_le_bytes());
            cq[2..4].copy_from_slice(&rt.cq_tail.to_le_bytes());
            let mut dw6 = [0u8; 4];
            let mut old = [0u8; 4];
            if self
                .dma
                .read(g.cqc_bt + qi * XQC_LEN + 24, &mut old)
                .is_err()
            {
                return false;
            }
            let v = (u32::from_le_bytes(old) & !1) | u32::from(rt.cq_phase);
            dw6.copy_from_slice(&v.to_le_bytes());
            if self.dma.write(g.sqc_bt + qi * XQC_LEN, &sq).is_err()
                || self.dma.write(g.cqc_bt + qi * XQC_LEN, &cq).is_err()
                || self.dma.write(g.cqc_bt + qi * XQC_LEN + 24, &dw6).is_err()
            {
                return false;
            }
        }
        true
    }

    /// Run up to `budget` jobs across the queues; returns how many completed. Nothing runs
    /// while paused.
    pub fn process(&self, budget: usize) -> usize {
        let mut g = lock(&self.inner);
        if g.paused {
            return 0;
        }
        let mut done = 0;
        let nq = g.queues.len();
        let mut progress = true;
        while done < budget && progress {
            progress = false;
            for q in 0..nq {
                if done >= budget {
                    break;
                }
                let rt = g.queues[q];
                if !rt.loaded || rt.broken || rt.sq_head == rt.sq_tail || rt.sq_depth == 0 {
                    continue;
                }
                match self.run_one(&mut g, q) {
                    Ok(()) => {
                        done += 1;
                        progress = true;
                        g.stats.completions += 1;
                    }
                    Err(_) => {
                        g.queues[q].broken = true;
                        g.stats.dma_faults += 1;
                    }
                }
            }
        }
        done
    }

    fn run_one(&self, g: &mut VfInner, q: usize) -> Result<(), DmaError> {
        let rt = g.queues[q];
        let mut sqe = [0u8; 24];
        self.dma
            .read(rt.sq_base + u64::from(rt.sq_head) * rt.sqe_size, &mut sqe)?;
        let src = u64::from_le_bytes(sqe[0..8].try_into().expect("8"));
        let dst = u64::from_le_bytes(sqe[8..16].try_into().expect("8"));
        let len = u32::from_le_bytes(sqe[16..20].try_into().expect("4")).min(4096) as usize;
        let tag = u16::from_le_bytes([sqe[20], sqe[21]]);
        let mut buf = vec![0u8; len];
        self.dma.read(src, &mut buf)?;
        buf.iter_mut().for_each(|b| *b ^= 0x5a);
        self.dma.write(dst, &buf)?;
        let head = (rt.sq_head + 1) % rt.sq_depth;
        // CQE: rsvd0, cmd_id (tag), rsvd1, sq_head, sq_num, rsvd2, w7 (phase).
        let mut cqe = [0u8; 16];
        cqe[4..6].copy_from_slice(&tag.to_le_bytes());
        cqe[8..10].copy_from_slice(&head.to_le_bytes());
        cqe[10..12].copy_from_slice(&(q as u16).to_le_bytes());
        cqe[14..16].copy_from_slice(&u16::from(rt.cq_phase).to_le_bytes());
        self.dma
            .write(rt.cq_base + u64::from(rt.cq_tail) * CQE_LEN, &cqe)?;
        let mut nrt = rt;
        nrt.sq_head = head;
        nrt.cq_tail = (rt.cq_tail + 1) % rt.cq_depth;
        if nrt.cq_tail == 0 {
            nrt.cq_phase = !rt.cq_phase;
        }
        g.queues[q] = nrt;
        self.post_eqe(g, q as u16)
    }

    /// Append an EQE for CQ `cqn` to the event queue the EQC registers describe.
    fn post_eqe(&self, g: &mut VfInner, cqn: u16) -> Result<(), DmaError> {
        let reg = |g: &VfInner, r: VfReg| g.regs.get(&r.offset()).copied().unwrap_or(0);
        let dw0 = reg(g, VfReg::EqcDw(0));
        let base = u64::from(reg(g, VfReg::EqcDw(1))) | (u64::from(reg(g, VfReg::EqcDw(2))) << 32);
        if base == 0 {
            return Ok(()); // no event queue configured
        }
        let depth = (reg(g, VfReg::EqcDw(3)) & 0xffff) + 1;
        let dw6 = reg(g, VfReg::EqcDw(6));
        let phase = dw6 & 1;
        let tail = dw0 >> 16;
        let eqe = u32::from(cqn) | (phase << 16);
        self.dma
            .write(base + u64::from(tail) * EQE_LEN, &eqe.to_le_bytes())?;
        let ntail = (tail + 1) % depth;
        g.regs
            .insert(VfReg::EqcDw(0).offset(), (dw0 & 0xffff) | (ntail << 16));
        if ntail == 0 {
            g.regs.insert(VfReg::EqcDw(6).offset(), dw6 ^ 1);
        }
        Ok(())
    }
}

impl QmVfModel {
    fn reg_read(&self, reg: VfReg) -> u32 {
        let g = lock(&self.inner);
        let plain = |r: VfReg| g.regs.get(&r.offset()).copied().unwrap_or(0);
        match reg {
            VfReg::VfState => plain(reg) | u32::from(Self::has(&g, Fault::VfNeverReady)),
            VfReg::MbCmdSendBase => {
                if Self::has(&g, Fault::MailboxStuckBusy) || g.mb_busy {
                    g.mb_w0 | (1 << 13)
                } else {
                    g.mb_w0 & !(1 << 13)
                }
            }
            VfReg::MbDataAddrL => g.mb_data as u32,
            VfReg::MbDataAddrH => (g.mb_data >> 32) as u32,
            VfReg::CacheWbDone => u32::from(g.wb_done && !Self::has(&g, Fault::WritebackNeverDone)),
            VfReg::IfcIntStatus => u32::from(Self::has(&g, Fault::IfcIntStatusStuck)),
            VfReg::IfcIntSetV if Self::has(&g, Fault::IfcIntSetStuck) => 1,
            r => plain(r),
        }
    }

    fn reg_write(&self, reg: VfReg, value: u32) {
        let mut g = lock(&self.inner);
        g.stats.register_writes += 1;
        match reg {
            VfReg::CacheWbStart => {
                g.wb_done = false;
                if value & 1 != 0 && !Self::has(&g, Fault::WritebackNeverDone) {
                    let ok = self.writeback(&mut g);
                    g.wb_done = ok;
                }
            }
            VfReg::CacheWbDone | VfReg::IfcIntStatus => {} // read-only
            VfReg::IfcIntSourceV => {
                // A status register: writing 1 clears a bit (qm_dev_cmd_init writes 1).
                let old = g.regs.get(&reg.offset()).copied().unwrap_or(0);
                g.regs.insert(reg.offset(), old & !value);
            }
            VfReg::MbCmdSendBase | VfReg::MbDataAddrL | VfReg::MbDataAddrH => {
                // Only a whole 128-bit command starts the mailbox.
            }
            r => {
                g.regs.insert(r.offset(), value);
            }
        }
    }

    fn ring(&self, sq_cq: bool, value: u64) {
        let mut g = lock(&self.inner);
        g.stats.doorbells += 1;
        g.stats.register_writes += 1;
        let Some(db) = Doorbell::decode(value) else {
            return;
        };
        if db.cmd.sq_cq_window() != sq_cq {
            return; // written to the wrong window: ignored
        }
        let q = usize::from(db.qn);
        match db.cmd {
            DbCmd::Sq if q < g.queues.len() => {
                if db.priority == 1 && db.index == 0 {
                    // vf_qm_fun_reset: restart the queue from its context in memory.
                    g.paused = false;
                    g.queues[q].loaded = false;
                    self.load_queue(&mut g, q);
                } else if self.load_queue(&mut g, q) {
                    g.queues[q].sq_tail = db.index % g.queues[q].sq_depth.max(1);
                }
            }
            DbCmd::Cq if q < g.queues.len() && self.load_queue(&mut g, q) => {
                g.queues[q].cq_head = db.index;
            }
            DbCmd::Eq => {
                let dw0 = g.regs.get(&VfReg::EqcDw(0).offset()).copied().unwrap_or(0);
                g.regs.insert(
                    VfReg::EqcDw(0).offset(),
                    (dw0 & 0xffff_0000) | u32::from(db.index),
                );
            }
            DbCmd::Aeq => {
                let dw0 = g.regs.get(&VfReg::AeqcDw(0).offset()).copied().unwrap_or(0);
                g.regs.insert(
                    VfReg::AeqcDw(0).offset(),
                    (dw0 & 0xffff_0000) | u32::from(db.index),
                );
            }
            _ => {}
        }
    }

    fn command(&self, command: &[u8; 16]) {
        let mut g = lock(&self.inner);
        g.stats.register_writes += 1;
        let (mb, _) = Mailbox::decode(command);
        let w0 = u32::from_le_bytes(command[0..4].try_into().expect("4 bytes"));
        if Self::has(&g, Fault::MailboxStuckBusy) {
            g.mb_busy = true;
            g.mb_w0 = w0;
            return;
        }
        if w0 & (1 << 13) == 0 {
            return; // no busy bit: not a command
        }
        let status = self.exec_mailbox(&mut g, mb);
        g.mb_busy = false;
        g.mb_w0 = (w0 & !(1 << 13) & !(0xf << 9)) | (u32::from(status & 0xf) << 9);
    }
}

/// Access through the VF's own BAR2.
impl QmRegisters for QmVfModel {
    fn read(&self, reg: VfReg) -> u32 {
        if self.on_own_bar(reg) {
            self.reg_read(reg)
        } else {
            0
        }
    }

    fn write(&self, reg: VfReg, value: u32) {
        if self.on_own_bar(reg) {
            self.reg_write(reg, value)
        }
    }

    fn doorbell(&self, sq_cq: bool, value: u64) {
        self.ring(sq_cq, value)
    }

    fn mailbox(&self, command: &[u8; 16]) {
        self.command(command)
    }
}
