//! The migration sequences of `hisi_acc_vfio_pci`, over [`QmRegisters`] and [`PfRegisters`].
//!
//! ```text
//!  source                                         destination
//!  ──────                                         ───────────
//!  match_data (PF VFT, PF QUE_ISO_CFG_V)  ──40 B──> check_match (magic/version, dev_id,
//!  stop: PAUSE_QM, interrupt states,                  VFT qp_num via mailbox, PF QUE_ISO_CFG_V)
//!        cache write-back                            (nothing written yet)
//!  save: VF_STATE ready? registers,       ─176 B──> load: VF_STATE, registers, SQC_BT/CQC_BT,
//!        EQC/AEQC, SQC_BT/CQC_BT;                     IFC init
//!        EQ/AEQ head doorbells                       start: IFC init, SQ doorbell (prio 1) per qp
//!  on a failed stop/save: restart the VF (IFC init + SQ doorbells), report the error
//! ```
//!
//! Bounds: the mailbox, VF_STATE, cache write-back and VFT polls wait 10 us between reads for at
//! most 1000 us (`MB_POLL_PERIOD_US`, `MB_POLL_TIMEOUT_US`, `POLL_PERIOD`, `POLL_TIMEOUT`);
//! interrupt states are read up to 101 times with 100 us between reads (`ERROR_CHECK_TIMEOUT`,
//! `CHECK_DELAY_TIME`). Time is whatever the [`Delay`] makes it, so the model runs instantly.
//! Sources: Linux 6.12 `drivers/vfio/pci/hisilicon/hisi_acc_vfio_pci.c` and
//! `drivers/crypto/hisilicon/qm.c` (`hisi_qm_mb`, `qm_mb_nolock`, `hisi_qm_wait_mb_ready`); the
//! restart on failure is the RFC v2 driver's (`vf_qm_state_save`, `state_error:`).

use crate::access::{Delay, MigrationRegs, PfBar2, PfRegisters, QmRegisters, open_migration_regs};
use crate::error::Error;
use crate::ids::AccKind;
use crate::mailbox::{DbCmd, Doorbell, Mailbox, MbCmd, MbStatus, Vft};
use crate::regs::{MigCtrl, PfReg, QmRevision, VfReg};
use crate::state::{
    ACC_DRV_MAJOR_VER, ACC_DRV_MINOR_VER, AccVfData, Layout, QmRegState, VfQmState,
};

/// Moved to [`crate::regs`]; this path is kept for one release.
#[doc(no_inline)]
pub use crate::regs::Bar2Layout;

/// Poll and check bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Microseconds between polls (`MB_POLL_PERIOD_US`, `POLL_PERIOD`).
    pub poll_period_us: u32,
    /// Microseconds of polling before giving up (`MB_POLL_TIMEOUT_US`, `POLL_TIMEOUT`).
    pub poll_timeout_us: u32,
    /// Microseconds between interrupt-state checks (`CHECK_DELAY_TIME`).
    pub check_delay_us: u32,
    /// Extra checks of an interrupt state (`ERROR_CHECK_TIMEOUT`).
    pub check_times: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            poll_period_us: 10,
            poll_timeout_us: 1000,
            check_delay_us: 100,
            check_times: 100,
        }
    }
}

/// The VF side of the sequences.
#[derive(Debug)]
pub struct VfQm<R, D> {
    regs: R,
    delay: D,
    timing: Timing,
}

/// Poll `read` until `done` holds, at most `timeout` microseconds of `period`-microsecond waits
/// (plus one last read after the timeout, as `read_poll_timeout` does).
fn poll(
    delay: &mut impl Delay,
    t: Timing,
    reg: &'static str,
    mut read: impl FnMut() -> u32,
    done: impl Fn(u32) -> bool,
) -> Result<u32, Error> {
    let mut waited = 0u32;
    loop {
        let v = read();
        if done(v) {
            return Ok(v);
        }
        if waited >= t.poll_timeout_us {
            return Err(Error::Timeout {
                reg,
                waited_us: waited,
            });
        }
        delay.delay_us(t.poll_period_us);
        waited = waited.saturating_add(t.poll_period_us.max(1));
    }
}

impl<R: QmRegisters, D: Delay> VfQm<R, D> {
    /// The sequences over `regs`, waiting with `delay`.
    pub fn new(regs: R, delay: D) -> Self {
        Self::with_timing(regs, delay, Timing::default())
    }

    /// As [`new`](Self::new) with other bounds.
    pub fn with_timing(regs: R, delay: D, timing: Timing) -> Self {
        VfQm {
            regs,
            delay,
            timing,
        }
    }

    /// The register interface.
    pub fn regs(&self) -> &R {
        &self.regs
    }

    /// Whether the VF reports ready within the poll bound (`qm_wait_dev_not_ready` returns 0).
    pub fn wait_ready(&mut self) -> bool {
        let regs = &self.regs;
        poll(
            &mut self.delay,
            self.timing,
            "QM_VF_STATE",
            || regs.read(VfReg::VfState),
            |v| v & 1 == 0,
        )
        .is_ok()
    }

    fn wait_mb_ready(&mut self) -> Result<(), Error> {
        let regs = &self.regs;
        poll(
            &mut self.delay,
            self.timing,
            "QM_MB_CMD_SEND_BASE",
            || regs.read(VfReg::MbCmdSendBase),
            |v| !MbStatus::from_word(v).busy,
        )
        .map(|_| ())
    }

    /// Run one mailbox command (`hisi_qm_mb`): wait until idle, write the 128-bit command, wait
    /// until done, check the status.
    pub fn mailbox(&mut self, mb: Mailbox) -> Result<(), Error> {
        let cmd = mb.cmd;
        self.wait_mb_ready()
            .map_err(|_| Error::MailboxBusy { cmd })?;
        self.regs.mailbox(&mb.encode());
        self.wait_mb_ready()
            .map_err(|_| Error::MailboxTimeout { cmd })?;
        let st = MbStatus::from_word(self.regs.read(VfReg::MbCmdSendBase));
        if st.status != 0 {
            return Err(Error::MailboxFailed {
                cmd,
                status: st.status,
            });
        }
        Ok(())
    }

    /// A mailbox read command returning the 64-bit data (`DATA_ADDR_H:DATA_ADDR_L`).
    pub fn mailbox_read(&mut self, cmd: MbCmd) -> Result<u64, Error> {
        self.mailbox(Mailbox {
            cmd,
            read: true,
            queue: 0,
            base: 0,
        })?;
        Ok(u64::from(self.regs.read(VfReg::MbDataAddrL))
            | (u64::from(self.regs.read(VfReg::MbDataAddrH)) << 32))
    }

    /// The VF's queue range (`qm_get_vft`).
    pub fn vft(&mut self) -> Result<Vft, Error> {
        self.mailbox_read(MbCmd::SqcVftV2).map(Vft::decode)
    }

    /// Stop the VF's queues (`vf_qm_func_stop`: `QM_MB_CMD_PAUSE_QM`).
    pub fn pause(&mut self) -> Result<(), Error> {
        self.mailbox(Mailbox {
            cmd: MbCmd::PauseQm,
            read: false,
            queue: 0,
            base: 0,
        })
    }

    /// Write the SQC/CQC cache back to memory and wait for it (`vf_qm_cache_wb`).
    pub fn cache_writeback(&mut self) -> Result<(), Error> {
        self.regs.write(VfReg::CacheWbStart, 1);
        let regs = &self.regs;
        poll(
            &mut self.delay,
            self.timing,
            "QM_CACHE_WB_DONE",
            || regs.read(VfReg::CacheWbDone),
            |v| v & 1 != 0,
        )
        .map(|_| ())
    }

    /// Read `reg` until it is zero, up to `check_times` more times (`qm_check_reg_state`).
    pub fn check_reg_state(&mut self, reg: VfReg) -> Result<(), Error> {
        check_state(&mut self.delay, self.timing, reg.name(), || {
            self.regs.read(reg)
        })
    }

    /// Read the registers `acc_vf_data` carries (`qm_get_regs`); the DMA addresses are filled in
    /// from the EQC/AEQC words, SQC/CQC through the mailbox.
    pub fn read_state(&mut self) -> Result<QmRegState, Error> {
        let r = &self.regs;
        let mut s = QmRegState {
            aeq_int_mask: r.read(VfReg::AeqIntMask),
            eq_int_mask: r.read(VfReg::EqIntMask),
            ifc_int_source: r.read(VfReg::IfcIntSourceV),
            ifc_int_mask: r.read(VfReg::IfcIntMask),
            ifc_int_set: r.read(VfReg::IfcIntSetV),
            page_size: r.read(VfReg::PageSize),
            eqc_dw: core::array::from_fn(|i| r.read(VfReg::EqcDw(i as u8))),
            aeqc_dw: core::array::from_fn(|i| r.read(VfReg::AeqcDw(i as u8))),
            ..QmRegState::default()
        };
        s.eqe_dma = s.eqe_from_words();
        s.aeqe_dma = s.aeqe_from_words();
        s.sqc_dma = self.mailbox_read(MbCmd::SqcBt)?;
        s.cqc_dma = self.mailbox_read(MbCmd::CqcBt)?;
        Ok(s)
    }

    /// Write the registers back (`qm_set_regs`), after checking the mailbox is idle.
    pub fn write_state(&mut self, s: &QmRegState, que_iso_cfg: u32) -> Result<(), Error> {
        self.wait_mb_ready()
            .map_err(|_| Error::MailboxBusy { cmd: MbCmd::SqcBt })?;
        let r = &self.regs;
        r.write(VfReg::AeqIntMask, s.aeq_int_mask);
        r.write(VfReg::EqIntMask, s.eq_int_mask);
        r.write(VfReg::IfcIntSourceV, s.ifc_int_source);
        r.write(VfReg::IfcIntMask, s.ifc_int_mask);
        r.write(VfReg::IfcIntSetV, s.ifc_int_set);
        r.write(VfReg::QueIsoCfgV, que_iso_cfg);
        r.write(VfReg::PageSize, s.page_size);
        for (i, &w) in s.eqc_dw.iter().enumerate() {
            r.write(VfReg::EqcDw(i as u8), w);
        }
        for (i, &w) in s.aeqc_dw.iter().enumerate() {
            r.write(VfReg::AeqcDw(i as u8), w);
        }
        Ok(())
    }

    /// Set a queue-context table base (`QM_MB_CMD_SQC_BT` / `QM_MB_CMD_CQC_BT`, op = write).
    pub fn set_table_base(&mut self, cmd: MbCmd, base: u64) -> Result<(), Error> {
        self.mailbox(Mailbox {
            cmd,
            read: false,
            queue: 0,
            base,
        })
    }

    /// Clear the PF↔VF interrupt source and unmask it (`qm_dev_cmd_init`).
    pub fn dev_cmd_init(&mut self) {
        self.regs.write(VfReg::IfcIntSourceV, 1);
        self.regs.write(VfReg::IfcIntMask, 0);
    }

    /// Ring each queue's SQ doorbell with index 0 and priority 1 (`vf_qm_fun_reset`): the
    /// queues restart from their contexts.
    pub fn restart_queues(&mut self, qp_num: u32) {
        for qn in 0..qp_num.min(1024) {
            self.ring(Doorbell {
                qn: qn as u16,
                cmd: DbCmd::Sq,
                index: 0,
                priority: 1,
            });
        }
    }

    /// Ring a doorbell.
    pub fn ring(&mut self, db: Doorbell) {
        self.regs.doorbell(db.cmd.sq_cq_window(), db.encode());
    }

    /// Re-arm the event queues at the saved heads (`vf_qm_xeqc_save`).
    pub fn rearm_event_queues(&mut self, s: &QmRegState) {
        self.ring(Doorbell {
            qn: 0,
            cmd: DbCmd::Eq,
            index: (s.eqc_dw[0] & 0xffff) as u16,
            priority: 0,
        });
        self.ring(Doorbell {
            qn: 0,
            cmd: DbCmd::Aeq,
            index: (s.aeqc_dw[0] & 0xffff) as u16,
            priority: 0,
        });
    }
}

/// Every register [`VfReg::ALL`] names with its value, one per line (reads have no side effects
/// on the QM).
pub fn dump_registers(regs: &impl QmRegisters) -> alloc::string::String {
    use core::fmt::Write as _;
    let mut s = alloc::string::String::new();
    for r in VfReg::ALL {
        let name = match r {
            VfReg::EqcDw(n) | VfReg::AeqcDw(n) => alloc::format!("{}{n}", r.name()),
            _ => r.name().into(),
        };
        let _ = writeln!(s, "{:#06x} {name:<22} {:#010x}", r.offset(), regs.read(r));
    }
    s
}

fn check_state(
    delay: &mut impl Delay,
    t: Timing,
    reg: &'static str,
    mut read: impl FnMut() -> u32,
) -> Result<(), Error> {
    let mut value = read();
    let mut checks = 1;
    while value != 0 && checks <= t.check_times {
        delay.delay_us(t.check_delay_us);
        value = read();
        checks += 1;
    }
    if value == 0 {
        Ok(())
    } else {
        Err(Error::IntStateStuck { reg, value, checks })
    }
}

/// The PF side: VFT configuration reads and state checks.
#[derive(Debug)]
pub struct PfQm<P, D> {
    regs: P,
    delay: D,
    timing: Timing,
}

impl<P: PfRegisters, D: Delay> PfQm<P, D> {
    /// The PF sequences over `regs`.
    pub fn new(regs: P, delay: D) -> Self {
        PfQm {
            regs,
            delay,
            timing: Timing::default(),
        }
    }

    /// As [`new`](Self::new) with other bounds.
    pub fn with_timing(regs: P, delay: D, timing: Timing) -> Self {
        PfQm {
            regs,
            delay,
            timing,
        }
    }

    /// The register interface.
    pub fn regs(&self) -> &P {
        &self.regs
    }

    fn wait_vft_ready(&mut self) -> Result<(), Error> {
        let regs = &self.regs;
        poll(
            &mut self.delay,
            self.timing,
            "QM_VFT_CFG_RDY",
            || regs.read(PfReg::VftCfgRdy),
            |v| v & 1 != 0,
        )
        .map(|_| ())
    }

    /// The SQC VFT of function `fun` (`pf_qm_get_qp_num`): wait until the interface is ready,
    /// request a read of type SQC for the function, wait, read `DATA_H:DATA_L`.
    pub fn vft_of(&mut self, fun: u32) -> Result<Vft, Error> {
        self.wait_vft_ready()?;
        let r = &self.regs;
        r.write(PfReg::VftCfgOpWr, 1);
        r.write(PfReg::VftCfgType, 0);
        r.write(PfReg::VftCfg, fun);
        r.write(PfReg::VftCfgRdy, 0);
        r.write(PfReg::VftCfgOpEnable, 1);
        self.wait_vft_ready()?;
        let r = &self.regs;
        let v =
            u64::from(r.read(PfReg::VftCfgDataL)) | (u64::from(r.read(PfReg::VftCfgDataH)) << 32);
        Ok(Vft::decode(v))
    }

    /// The PF's queue isolation configuration (`QM_QUE_ISO_CFG_V`).
    pub fn que_iso_cfg(&self) -> u32 {
        self.regs.read(PfReg::QueIsoCfgV)
    }

    /// Read a PF state register until zero (`qm_check_reg_state`).
    pub fn check_reg_state(&mut self, reg: PfReg) -> Result<(), Error> {
        check_state(&mut self.delay, self.timing, reg.name(), || {
            self.regs.read(reg)
        })
    }
}

/// What [`AccVf::load`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Registers and queue tables were loaded; the VF is ready to start.
    Loaded,
    /// Only the match block was transferred: nothing to load (the source VF was not ready).
    MatchOnly,
    /// A full blob without its DMA addresses: the driver leaves the VF not ready.
    AddressesMissing,
}

/// What a destination must agree with before a QM VF's state may move to it, beyond what the
/// driver's match block carries: the device and the BAR layout the guest was given. The
/// match block (`acc_vf_data`, the same in 6.12 and 7.3.4) has no field for the layout, so it
/// cannot refuse an old-to-new migration; this block does, before anything is written.
///
/// [`encode`](Self::encode) gives the bytes an engine compares byte for byte (`livemig`'s
/// `DeviceCompat.compat`): printable text, e.g.
/// `hisi-qm/1 19e5:a256 bar2 guest 0x8000 of 0x10000 mig vf-bar2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompatBlock {
    /// The accelerator (its VF device ID).
    pub kind: AccKind,
    /// The VF's BAR2 layout.
    pub layout: Bar2Layout,
}

impl CompatBlock {
    /// The block as text.
    pub fn encode(&self) -> alloc::vec::Vec<u8> {
        let mig = match self.layout.mode {
            MigCtrl::VfBar2 => "vf-bar2",
            MigCtrl::PfBar2 => "pf-bar2",
        };
        alloc::format!(
            "hisi-qm/1 {:04x}:{:04x} bar2 guest {:#x} of {:#x} mig {mig}",
            crate::ids::PCI_VENDOR_ID_HUAWEI,
            self.kind.vf_device_id(),
            self.layout.guest_len(),
            self.layout.vf_bar2_len,
        )
        .into_bytes()
    }

    /// Whether a VF described by `self` may take state from one described by `source`: the
    /// same device, the same BAR layout.
    pub fn accepts(&self, source: &CompatBlock) -> Result<(), Error> {
        if source.kind != self.kind {
            return Err(Error::Mismatch {
                field: "dev_id",
                theirs: u64::from(source.kind.vf_device_id()),
                ours: u64::from(self.kind.vf_device_id()),
            });
        }
        if source.layout != self.layout {
            return Err(Error::LayoutMismatch {
                theirs: source.layout,
                ours: self.layout,
            });
        }
        Ok(())
    }
}

/// One ACC VF with its PF: the operations the migration driver composes.
#[derive(Debug)]
pub struct AccVf<R, P, D> {
    /// The VF's registers.
    pub vf: VfQm<R, D>,
    /// The PF's registers.
    pub pf: PfQm<P, D>,
    kind: AccKind,
    /// The VF's function number at the PF (`vf_id`: 1-based, the PF is 0).
    fun: u32,
    /// Queues, learned from the VFT (save side) or the stream (load side).
    qp_num: u32,
    /// `QM_READY` as last established (`hisi_acc_vdev->vf_qm_state`).
    ready: bool,
    /// The VF's BAR2 layout.
    layout: Bar2Layout,
}

impl<V: QmRegisters, B: PfBar2 + PfRegisters + Clone, D: Delay + Clone>
    AccVf<MigrationRegs<V, B>, B, D>
{
    /// VF `fun` (1-based) of a PF of `revision`, with its migration registers wherever
    /// `QM_MIG_REGION_SEL` on `pf` puts them ([`open_migration_regs`]): the PF's BAR2 window
    /// on a new revision with `QM_MIG_REGION_EN`, else `vf_bar2` (`vf_bar2_len` bytes). The
    /// layout the compatibility block reports follows from the same selection.
    pub fn open(
        kind: AccKind,
        fun: u32,
        revision: QmRevision,
        vf_bar2: V,
        vf_bar2_len: usize,
        pf: B,
        delay: D,
    ) -> Result<Self, Error> {
        let regs = open_migration_regs(pf.clone(), revision, fun, vf_bar2)?;
        let layout = Bar2Layout {
            mode: regs.mode(),
            vf_bar2_len,
        };
        Ok(AccVf::new(
            kind,
            fun,
            VfQm::new(regs, delay.clone()),
            PfQm::new(pf, delay),
        )
        .with_layout(layout))
    }
}

impl<R: QmRegisters, P: PfRegisters, D: Delay> AccVf<R, P, D> {
    /// A VF of `kind`, function `fun` at its PF (1-based, as `pci_iov_vf_id() + 1`).
    pub fn new(kind: AccKind, fun: u32, vf: VfQm<R, D>, pf: PfQm<P, D>) -> Self {
        AccVf {
            vf,
            pf,
            kind,
            fun,
            qp_num: 0,
            ready: false,
            layout: Bar2Layout::VF_CTRL,
        }
    }

    /// The same VF with another BAR2 layout ([`new`](Self::new) assumes
    /// [`Bar2Layout::VF_CTRL`], the only one before Linux 7.3.4).
    pub fn with_layout(mut self, layout: Bar2Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The accelerator kind.
    pub fn kind(&self) -> AccKind {
        self.kind
    }

    /// The VF's BAR2 layout.
    pub fn layout(&self) -> Bar2Layout {
        self.layout
    }

    /// This VF's compatibility block (reads and writes no register).
    pub fn compat_block(&self) -> CompatBlock {
        CompatBlock {
            kind: self.kind,
            layout: self.layout,
        }
    }

    /// The destination's check of the source's compatibility block, before RESUMING: the
    /// same device and BAR layout ([`CompatBlock::accepts`]). Reads and writes no register.
    pub fn check_compat(&self, source: &CompatBlock) -> Result<(), Error> {
        self.compat_block().accepts(source)
    }

    /// Whether the VF is considered ready (started by its guest driver).
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Mark the VF ready or not (the driver sets it from the saved or loaded state; a VF that
    /// its guest has started is ready).
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }

    /// The match block (`vf_qm_get_match_data`): V2 magic and version, the VF's device ID, its
    /// queue range from the PF's VFT, and the PF's isolation state.
    pub fn match_data(&mut self) -> Result<AccVfData, Error> {
        let vft = self.pf.vft_of(self.fun)?;
        self.qp_num = u32::from(vft.num);
        Ok(AccVfData {
            layout: Layout::V2,
            version: (ACC_DRV_MAJOR_VER, ACC_DRV_MINOR_VER),
            qp_num: u32::from(vft.num),
            dev_id: u32::from(self.kind.vf_device_id()),
            que_iso_cfg: self.pf.que_iso_cfg(),
            qp_base: u32::from(vft.base),
            // The driver's buffer is zeroed: the match block sent in PRE_COPY says QM_READY (0)
            // until the save establishes the real state.
            vf_state: VfQmState::Ready,
            regs: None,
            v1_fixup_applied: false,
        })
    }

    /// Check the PF's RAS state, the PF↔VF communication state and the accelerator core's
    /// interrupt state (`hisi_acc_check_int_state`).
    pub fn check_int_state(&mut self) -> Result<(), Error> {
        self.pf.check_reg_state(PfReg::AbnormalIntStatus)?;
        self.vf.check_reg_state(VfReg::IfcIntStatus)?;
        self.vf.check_reg_state(VfReg::IfcIntSetV)?;
        self.pf.check_reg_state(self.kind.core_int_status())
    }

    /// Quiesce the VF (`hisi_acc_vf_stop_device`): pause its queues, check interrupt states,
    /// write the queue-context cache back to memory. If a step after the pause fails, the VF's
    /// queues are restarted before the error is returned, so the source keeps running.
    pub fn stop(&mut self) -> Result<(), Error> {
        let r = match self.vf.pause() {
            // Never started: the queues still run.
            Err(e @ Error::MailboxBusy { .. }) => return Err(e),
            // The command may have taken effect: restart below.
            Err(e) => Err(e),
            Ok(()) => self
                .check_int_state()
                .and_then(|()| self.vf.cache_writeback()),
        };
        if r.is_err() {
            self.restart();
        }
        r
    }

    /// Fill `data` with the VF's state (`vf_qm_state_save`). A VF that does not become ready
    /// gives match data only, as the driver does. On a failure the VF is restarted.
    pub fn save(&mut self, data: &mut AccVfData) -> Result<(), Error> {
        if !self.vf.wait_ready() {
            data.vf_state = VfQmState::NotReady;
            data.regs = None;
            self.ready = false;
            return Ok(());
        }
        data.vf_state = VfQmState::Ready;
        self.ready = true;
        match self.vf.read_state() {
            Ok(s) => {
                data.regs = Some(s);
                self.vf.rearm_event_queues(&s);
                Ok(())
            }
            Err(e) => {
                self.restart();
                Err(e)
            }
        }
    }

    /// The destination's compatibility check (`vf_qm_check_match`), done before any
    /// destination register is written: device ID, queue count from this VF's own VFT (through
    /// its mailbox) and the PF's isolation state must equal the source's. The magic and version
    /// were checked when `data` was decoded.
    pub fn check_match(&mut self, data: &AccVfData) -> Result<(), Error> {
        let ours = u32::from(self.kind.vf_device_id());
        if data.dev_id != ours {
            return Err(Error::Mismatch {
                field: "dev_id",
                theirs: u64::from(data.dev_id),
                ours: u64::from(ours),
            });
        }
        let vft = self.vf.vft()?;
        if u32::from(vft.num) != data.qp_num {
            return Err(Error::Mismatch {
                field: "qp_num",
                theirs: u64::from(data.qp_num),
                ours: u64::from(vft.num),
            });
        }
        self.qp_num = u32::from(vft.num);
        let iso = self.pf.que_iso_cfg();
        if data.que_iso_cfg != iso {
            return Err(Error::Mismatch {
                field: "que_iso_cfg",
                theirs: u64::from(data.que_iso_cfg),
                ours: u64::from(iso),
            });
        }
        Ok(())
    }

    /// Load a checked state (`vf_qm_load_data`): VF_STATE, registers, SQC/CQC table bases,
    /// IFC init.
    pub fn load(&mut self, data: &AccVfData) -> Result<LoadOutcome, Error> {
        let Some(s) = &data.regs else {
            return Ok(LoadOutcome::MatchOnly);
        };
        if !s.addresses_present() {
            self.ready = false;
            return Ok(LoadOutcome::AddressesMissing);
        }
        self.vf
            .regs
            .write(VfReg::VfState, data.vf_state.raw().min(1));
        self.ready = data.vf_state == VfQmState::Ready;
        self.qp_num = data.qp_num;
        self.vf.write_state(s, data.que_iso_cfg)?;
        self.vf.set_table_base(MbCmd::SqcBt, s.sqc_dma)?;
        self.vf.set_table_base(MbCmd::CqcBt, s.cqc_dma)?;
        self.vf.dev_cmd_init();
        Ok(LoadOutcome::Loaded)
    }

    /// Start the VF (`hisi_acc_vf_start_device`): if it is ready, IFC init and restart every
    /// queue.
    ///
    /// "Ready" is what a save or load established, as in the driver — or, unlike Linux 6.12,
    /// what `QM_VF_STATE` says now: the driver only restarts a VF whose state a STOP_COPY save
    /// or a load marked ready, so RUNNING → STOP → RUNNING (a migration cancelled before
    /// STOP_COPY) would leave a running guest's queues paused by `PAUSE_QM`.
    pub fn start(&mut self) {
        if !self.ready && self.vf.regs.read(VfReg::VfState) & 1 == 0 {
            self.ready = true;
        }
        if self.ready {
            self.restart();
        }
    }

    /// IFC init and an SQ doorbell per queue, whatever the ready state. The queue count comes
    /// from what is known, else the PF's VFT (which does not need the VF's mailbox), else the
    /// VF's own.
    fn restart(&mut self) {
        self.vf.dev_cmd_init();
        if self.qp_num == 0 {
            self.qp_num = self
                .pf
                .vft_of(self.fun)
                .or_else(|_| self.vf.vft())
                .map_or(0, |v| u32::from(v.num));
        }
        self.vf.restart_queues(self.qp_num);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    /// Registers that never become ready, counting reads.
    struct Stuck {
        reads: Cell<u32>,
        value: u32,
    }

    impl QmRegisters for Stuck {
        fn read(&self, _reg: VfReg) -> u32 {
            self.reads.set(self.reads.get() + 1);
            self.value
        }
        fn write(&self, _reg: VfReg, _value: u32) {}
        fn doorbell(&self, _sq_cq: bool, _value: u64) {}
        fn mailbox(&self, _command: &[u8; 16]) {}
    }

    /// Sums the requested delays.
    #[derive(Default)]
    struct Clock(u64);

    impl Delay for Clock {
        fn delay_us(&mut self, us: u32) {
            self.0 += u64::from(us);
        }
    }

    #[test]
    fn polls_are_bounded_like_the_driver() {
        // QM_CACHE_WB_DONE never sets: 1000 us of 10 us polls, 101 reads, then an error that
        // names the register.
        let mut qm = VfQm::new(
            Stuck {
                reads: Cell::new(0),
                value: 0,
            },
            Clock::default(),
        );
        let e = qm.cache_writeback().unwrap_err();
        assert_eq!(
            e,
            Error::Timeout {
                reg: "QM_CACHE_WB_DONE",
                waited_us: 1000
            }
        );
        assert_eq!(qm.regs().reads.get(), 101);
        assert_eq!(qm.delay.0, 1000);
        assert_eq!(
            e.to_string(),
            "QM_CACHE_WB_DONE did not become ready within 1000 us"
        );

        // An interrupt state that stays set: ERROR_CHECK_TIMEOUT (100) more reads 100 us apart.
        let mut qm = VfQm::new(
            Stuck {
                reads: Cell::new(0),
                value: 4,
            },
            Clock::default(),
        );
        let e = qm.check_reg_state(VfReg::IfcIntStatus).unwrap_err();
        assert_eq!(
            e,
            Error::IntStateStuck {
                reg: "QM_IFC_INT_STATUS",
                value: 4,
                checks: 101
            }
        );
        assert_eq!(qm.delay.0, 100 * 100);

        // A mailbox that stays busy: the command never starts.
        let mut qm = VfQm::new(
            Stuck {
                reads: Cell::new(0),
                value: 1 << 13,
            },
            Clock::default(),
        );
        assert_eq!(
            qm.pause(),
            Err(Error::MailboxBusy {
                cmd: MbCmd::PauseQm
            })
        );
    }
}
