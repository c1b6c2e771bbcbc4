//! QM register maps: the VF's BAR2 window and the PF registers the migration path uses.
//!
//! ```text
//!  VF BAR2 (64 KiB on Kunpeng 920; the first half is what the guest may map)
//!  0x0000 ┬ 0x0004 QM_VF_AEQ_INT_MASK   0x000c QM_VF_EQ_INT_MASK
//!         │ 0x0020 QM_IFC_INT_SOURCE_V  0x0024 QM_IFC_INT_MASK  0x0028 QM_IFC_INT_STATUS
//!         │ 0x002c QM_IFC_INT_SET_V     0x0030 QM_QUE_ISO_CFG_V 0x0034 QM_PAGE_SIZE
//!         │ 0x0060 QM_VF_STATE          0x0204 QM_CACHE_WB_START 0x0208 QM_CACHE_WB_DONE
//!         │ 0x0300 mailbox (128 bit: w0|queue, DATA_ADDR_L, DATA_ADDR_H, rsvd)
//!         │ 0x1000 SQ/CQ doorbell (64 bit)   0x2000 EQ/AEQ doorbell (64 bit)
//!  0x8000 ┼ 0x8000 QM_EQC_DW0..6       0x8020 QM_AEQC_DW0..6      <- migration half
//!  0xffff ┘
//!  PF: 0x0030 QM_QUE_ISO_CFG_V, 0x100008 QM_ABNORMAL_INT_STATUS, 0x100054..0x10006c VFT_CFG
//!      protocol, 0x100198 QM_MIG_REGION_SEL, 0x301008 SEC / 0x301800 HPRE / 0x3010ac ZIP core
//!      interrupt status
//!  PF BAR2, above QM_HW_V3 with QM_MIG_REGION_EN (Linux 7.3.4): VF n's migration window at
//!      0x180000 + n * 0x2000, 8 KiB: the VF offsets above up to 0x1000, then
//!      0x1c00 QM_EQC_PF_DW0..6, 0x1c20 QM_AEQC_PF_DW0..6; the VF's whole BAR2 is the guest's
//! ```
//!
//! Offsets and names: Linux 6.12 `include/linux/hisi_acc_qm.h` (`QM_MB_CMD_SEND_BASE`,
//! `QM_MB_CMD_DATA_ADDR_L/H`, `QM_DOORBELL_SQ_CQ_BASE_V2`, `QM_DOORBELL_EQ_AEQ_BASE_V2`,
//! `QM_VF_STATE`) and `drivers/vfio/pci/hisilicon/hisi_acc_vfio_pci.h` (everything else). The maps
//! are `register_structs!` with explicit offsets and reserved gaps; [`VfReg`] and [`PfReg`] name
//! single registers for the [`QmRegisters`](crate::QmRegisters) interface, and take their offsets
//! from the maps (`offset_of!`), so each offset is written once. The new-revision additions
//! ([`QmRevision`], [`MigCtrl`], [`QmPfMigWindowRegisters`], `QM_MIG_REGION_*`) come from Linux
//! 7.3.4, cited where they are defined.

use core::fmt;
use core::mem::offset_of;

use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

/// Bitfields of the QM registers.
///
/// The generated marker types and per-field constants carry no documentation of their own.
#[allow(missing_docs)]
pub mod fields {
    use tock_registers::register_bitfields;

    register_bitfields![u32,
        /// `QM_VF_STATE` (0x60): bit 0 set while the VF is not ready (`qm_wait_dev_not_ready`).
        pub VF_STATE [
            /// 0 = `QM_READY`, 1 = `QM_NOT_READY` (`enum qm_vf_state`).
            NOT_READY OFFSET(0) NUMBITS(1) []
        ],
        /// The first 32 bits of the mailbox at 0x300, as `hisi_qm_wait_mb_ready` reads them:
        /// `w0` in the low half, `queue_num` in the high half (`struct qm_mailbox`).
        pub MB_W0 [
            /// Command (`QM_MB_CMD_*`).
            CMD OFFSET(0) NUMBITS(8) [],
            /// Completion status; non-zero means the command failed (`QM_MB_STATUS_MASK`).
            STATUS OFFSET(9) NUMBITS(4) [],
            /// Set by software to start a command, cleared by hardware when done
            /// (`QM_MB_BUSY_SHIFT`).
            BUSY OFFSET(13) NUMBITS(1) [],
            /// 1 = read from hardware, 0 = write to hardware (`QM_MB_OP_SHIFT`).
            OP OFFSET(14) NUMBITS(1) [],
            /// Queue number.
            QUEUE OFFSET(16) NUMBITS(16) []
        ],
        /// `QM_CACHE_WB_DONE` (0x208).
        pub CACHE_WB_DONE [
            /// Set when the write-back started by `QM_CACHE_WB_START` has finished.
            DONE OFFSET(0) NUMBITS(1) []
        ],
        /// `QM_MIG_REGION_SEL` (PF 0x100198, Linux 7.3.4 `include/linux/hisi_acc_qm.h:102`).
        /// Only bit 0 is defined; the other bits are reserved.
        pub MIG_REGION_SEL [
            /// `QM_MIG_REGION_EN` (`hisi_acc_qm.h:103`): on a QM above V3, the VF migration
            /// registers are in the PF's BAR2 (`hisi_acc_vf_qm_init`, `hisi_acc_vfio_pci.c:1196-1200`).
            EN OFFSET(0) NUMBITS(1) []
        ],
        /// `QM_VFT_CFG_RDY` (PF 0x10006c).
        pub VFT_CFG_RDY [
            /// Set when the VFT configuration interface is idle / the last operation finished.
            READY OFFSET(0) NUMBITS(1) []
        ]
    ];

    register_bitfields![u64,
        /// A V2 doorbell (`qm_db`): written as one 64-bit store.
        pub DOORBELL [
            /// Queue number.
            QN OFFSET(0) NUMBITS(12) [],
            /// `QM_DOORBELL_CMD_*` (`QM_DB_CMD_SHIFT_V2`).
            CMD OFFSET(12) NUMBITS(4) [
                Sq = 0,
                Cq = 1,
                Eq = 2,
                Aeq = 3
            ],
            /// Random data (`QM_DB_RAND_SHIFT_V2`); the driver writes 0.
            RAND OFFSET(16) NUMBITS(16) [],
            /// Queue index (tail for SQ, head for CQ/EQ/AEQ) (`QM_DB_INDEX_SHIFT_V2`).
            INDEX OFFSET(32) NUMBITS(16) [],
            /// Priority (`QM_DB_PRIORITY_SHIFT_V2`); the migration driver restarts queues with 1.
            PRIORITY OFFSET(48) NUMBITS(8) []
        ],
        /// An SQC VFT entry as the V2 mailbox (`QM_MB_CMD_SQC_VFT_V2`) and the PF `VFT_CFG_DATA`
        /// registers return it (`qm_get_vft_v2`, `qm_set_vft_common`).
        pub SQC_VFT [
            /// First queue of the function (`QM_SQC_VFT_BASE_SHIFT_V2`, 16 bits).
            BASE OFFSET(28) NUMBITS(16) [],
            /// Entry valid (`QM_SQC_VFT_VALID`).
            VALID OFFSET(44) NUMBITS(1) [],
            /// Number of queues minus one (`QM_SQC_VFT_NUM_SHIFT_V2`, 10 bits).
            NUM_MINUS_1 OFFSET(45) NUMBITS(10) []
        ]
    ];
}

register_structs! {
    /// The QM registers of a VF's BAR2 that migration reads and writes.
    pub QmVfRegisters {
        (0x0000 => _reserved0),
        /// `QM_VF_AEQ_INT_MASK`.
        (0x0004 => pub qm_vf_aeq_int_mask: ReadWrite<u32>),
        (0x0008 => _reserved1),
        /// `QM_VF_EQ_INT_MASK`.
        (0x000c => pub qm_vf_eq_int_mask: ReadWrite<u32>),
        (0x0010 => _reserved2),
        /// `QM_IFC_INT_SOURCE_V`: PF↔VF communication interrupt source.
        (0x0020 => pub qm_ifc_int_source_v: ReadWrite<u32>),
        /// `QM_IFC_INT_MASK`.
        (0x0024 => pub qm_ifc_int_mask: ReadWrite<u32>),
        /// `QM_IFC_INT_STATUS`.
        (0x0028 => pub qm_ifc_int_status: ReadOnly<u32>),
        /// `QM_IFC_INT_SET_V`.
        (0x002c => pub qm_ifc_int_set_v: ReadWrite<u32>),
        /// `QM_QUE_ISO_CFG_V`: queue isolation configuration.
        (0x0030 => pub qm_que_iso_cfg_v: ReadWrite<u32>),
        /// `QM_PAGE_SIZE`.
        (0x0034 => pub qm_page_size: ReadWrite<u32>),
        (0x0038 => _reserved3),
        /// `QM_VF_STATE`.
        (0x0060 => pub qm_vf_state: ReadWrite<u32, fields::VF_STATE::Register>),
        (0x0064 => _reserved4),
        /// `QM_CACHE_WB_START`: write 1 to write the SQC/CQC cache back to memory.
        (0x0204 => pub qm_cache_wb_start: WriteOnly<u32>),
        /// `QM_CACHE_WB_DONE`.
        (0x0208 => pub qm_cache_wb_done: ReadOnly<u32, fields::CACHE_WB_DONE::Register>),
        (0x020c => _reserved5),
        /// `QM_MB_CMD_SEND_BASE`: mailbox word 0 (`w0` | `queue_num` << 16).
        (0x0300 => pub qm_mb_cmd_send_base: ReadWrite<u32, fields::MB_W0::Register>),
        /// `QM_MB_CMD_DATA_ADDR_L`: mailbox base address, low half (data out for reads).
        (0x0304 => pub qm_mb_cmd_data_addr_l: ReadWrite<u32>),
        /// `QM_MB_CMD_DATA_ADDR_H`: mailbox base address, high half.
        (0x0308 => pub qm_mb_cmd_data_addr_h: ReadWrite<u32>),
        /// Mailbox word 3 (reserved, written as 0).
        (0x030c => pub qm_mb_rsvd: ReadWrite<u32>),
        (0x0310 => _reserved6),
        /// `QM_DOORBELL_SQ_CQ_BASE_V2`.
        (0x1000 => pub qm_doorbell_sq_cq: WriteOnly<u64, fields::DOORBELL::Register>),
        (0x1008 => _reserved7),
        /// `QM_DOORBELL_EQ_AEQ_BASE_V2`.
        (0x2000 => pub qm_doorbell_eq_aeq: WriteOnly<u64, fields::DOORBELL::Register>),
        (0x2008 => _reserved8),
        /// `QM_EQC_DW0` .. `QM_EQC_DW6` (event queue context; DW1/DW2 hold the EQE base).
        (0x8000 => pub qm_eqc_dw: [ReadWrite<u32>; 7]),
        (0x801c => _reserved9),
        /// `QM_AEQC_DW0` .. `QM_AEQC_DW6` (asynchronous event queue context).
        (0x8020 => pub qm_aeqc_dw: [ReadWrite<u32>; 7]),
        (0x803c => @END),
    }
}

register_structs! {
    /// The PF registers migration reads (the PF is owned by the host's crypto driver).
    pub QmPfRegisters {
        (0x000000 => _reserved0),
        /// `QM_QUE_ISO_CFG_V` of the PF.
        (0x000030 => pub qm_que_iso_cfg_v: ReadOnly<u32>),
        (0x000034 => _reserved1),
        /// `QM_ABNORMAL_INT_STATUS` (RAS state).
        (0x100008 => pub qm_abnormal_int_status: ReadOnly<u32>),
        (0x10000c => _reserved2),
        /// `QM_VFT_CFG_OP_ENABLE`.
        (0x100054 => pub qm_vft_cfg_op_enable: ReadWrite<u32>),
        /// `QM_VFT_CFG_OP_WR`: 1 = read the VFT, 0 = write it.
        (0x100058 => pub qm_vft_cfg_op_wr: ReadWrite<u32>),
        /// `QM_VFT_CFG_TYPE`: 0 = SQC VFT, 1 = CQC VFT, 2 = shaper.
        (0x10005c => pub qm_vft_cfg_type: ReadWrite<u32>),
        /// `QM_VFT_CFG`: the function number.
        (0x100060 => pub qm_vft_cfg: ReadWrite<u32>),
        /// `QM_VFT_CFG_DATA_L`.
        (0x100064 => pub qm_vft_cfg_data_l: ReadWrite<u32>),
        /// `QM_VFT_CFG_DATA_H`.
        (0x100068 => pub qm_vft_cfg_data_h: ReadWrite<u32>),
        /// `QM_VFT_CFG_RDY`.
        (0x10006c => pub qm_vft_cfg_rdy: ReadWrite<u32, fields::VFT_CFG_RDY::Register>),
        (0x100070 => _reserved3),
        /// `QM_MIG_REGION_SEL` (Linux 7.3.4 `include/linux/hisi_acc_qm.h:102`): where a VF's
        /// migration registers are on a QM above V3.
        (0x100198 => pub qm_mig_region_sel: ReadOnly<u32, fields::MIG_REGION_SEL::Register>),
        (0x10019c => _reserved3a),
        /// `SEC_CORE_INT_STATUS`.
        (0x301008 => pub sec_core_int_status: ReadOnly<u32>),
        (0x30100c => _reserved4),
        /// `HZIP_CORE_INT_STATUS`.
        (0x3010ac => pub hzip_core_int_status: ReadOnly<u32>),
        (0x3010b0 => _reserved5),
        /// `HPRE_HAC_INT_STATUS`.
        (0x301800 => pub hpre_hac_int_status: ReadOnly<u32>),
        (0x301804 => @END),
    }
}

register_structs! {
    /// A VF's migration registers as a QM above V3 places them in the PF's BAR2: one
    /// [`QM_MIG_REGION_SIZE`]-byte window per VF at
    /// [`QM_MIG_REGION_OFFSET`]` + vf_id * `[`QM_MIG_REGION_SIZE`] (`hisi_acc_vf_qm_init`,
    /// Linux 7.3.4 `hisi_acc_vfio_pci.c:1202-1209`).
    ///
    /// The driver reaches every register at the same offset from the window base as from the
    /// VF's BAR2 (`qm_read_regs` / `qm_write_regs` / `hisi_qm_mb` use `io_base + offset`,
    /// `hisi_acc_vfio_pci.c:48-76`), except the event-queue contexts: `QM_EQC_PF_DW0` 0x1c00 and
    /// `QM_AEQC_PF_DW0` 0x1c20 instead of 0x8000 / 0x8020 (`hisi_acc_vfio_pci.h:54-57`,
    /// `qm_xqc_reg_offsets`, `hisi_acc_vfio_pci.c:95-108`). The EQ/AEQ doorbell the driver
    /// writes at `io_base + 0x2000` (`qm_db`, `hisi_acc_vfio_pci.c:245-263`) lies one byte past
    /// the window, at the start of the next VF's window; it is not part of this map (see
    /// [`PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET`]).
    pub QmPfMigWindowRegisters {
        (0x0000 => _reserved0),
        /// `QM_VF_AEQ_INT_MASK`.
        (0x0004 => pub qm_vf_aeq_int_mask: ReadWrite<u32>),
        (0x0008 => _reserved1),
        /// `QM_VF_EQ_INT_MASK`.
        (0x000c => pub qm_vf_eq_int_mask: ReadWrite<u32>),
        (0x0010 => _reserved2),
        /// `QM_IFC_INT_SOURCE_V`.
        (0x0020 => pub qm_ifc_int_source_v: ReadWrite<u32>),
        /// `QM_IFC_INT_MASK`.
        (0x0024 => pub qm_ifc_int_mask: ReadWrite<u32>),
        /// `QM_IFC_INT_STATUS`.
        (0x0028 => pub qm_ifc_int_status: ReadOnly<u32>),
        /// `QM_IFC_INT_SET_V`.
        (0x002c => pub qm_ifc_int_set_v: ReadWrite<u32>),
        /// `QM_QUE_ISO_CFG_V`.
        (0x0030 => pub qm_que_iso_cfg_v: ReadWrite<u32>),
        /// `QM_PAGE_SIZE`.
        (0x0034 => pub qm_page_size: ReadWrite<u32>),
        (0x0038 => _reserved3),
        /// `QM_VF_STATE`.
        (0x0060 => pub qm_vf_state: ReadWrite<u32, fields::VF_STATE::Register>),
        (0x0064 => _reserved4),
        /// `QM_CACHE_WB_START`.
        (0x0204 => pub qm_cache_wb_start: WriteOnly<u32>),
        /// `QM_CACHE_WB_DONE`.
        (0x0208 => pub qm_cache_wb_done: ReadOnly<u32, fields::CACHE_WB_DONE::Register>),
        (0x020c => _reserved5),
        /// `QM_MB_CMD_SEND_BASE`.
        (0x0300 => pub qm_mb_cmd_send_base: ReadWrite<u32, fields::MB_W0::Register>),
        /// `QM_MB_CMD_DATA_ADDR_L`.
        (0x0304 => pub qm_mb_cmd_data_addr_l: ReadWrite<u32>),
        /// `QM_MB_CMD_DATA_ADDR_H`.
        (0x0308 => pub qm_mb_cmd_data_addr_h: ReadWrite<u32>),
        /// Mailbox word 3.
        (0x030c => pub qm_mb_rsvd: ReadWrite<u32>),
        (0x0310 => _reserved6),
        /// `QM_DOORBELL_SQ_CQ_BASE_V2`.
        (0x1000 => pub qm_doorbell_sq_cq: WriteOnly<u64, fields::DOORBELL::Register>),
        (0x1008 => _reserved7),
        /// `QM_EQC_PF_DW0` .. + 6 (`hisi_acc_vfio_pci.h:56`).
        (0x1c00 => pub qm_eqc_dw: [ReadWrite<u32>; 7]),
        (0x1c1c => _reserved8),
        /// `QM_AEQC_PF_DW0` .. + 6 (`hisi_acc_vfio_pci.h:57`).
        (0x1c20 => pub qm_aeqc_dw: [ReadWrite<u32>; 7]),
        (0x1c3c => @END),
    }
}

/// `QM_MIG_REGION_OFFSET` (Linux 7.3.4 `hisi_acc_vfio_pci.h:65`): the PF BAR2 offset of the
/// migration windows; VF `vf_id` (1-based) starts at this plus `vf_id * QM_MIG_REGION_SIZE`.
pub const QM_MIG_REGION_OFFSET: usize = 0x18_0000;
/// `QM_MIG_REGION_SIZE` (Linux 7.3.4 `hisi_acc_vfio_pci.h:66`): bytes per VF window, 8 KiB.
pub const QM_MIG_REGION_SIZE: usize = 0x2000;
/// `QM_MIG_REGION_EN` (Linux 7.3.4 `include/linux/hisi_acc_qm.h:103`), bit 0 of
/// `QM_MIG_REGION_SEL`.
pub const QM_MIG_REGION_EN: u32 = 1 << 0;
/// Every bit of `QM_MIG_REGION_SEL` the driver gives a meaning to; the others are reserved.
pub const QM_MIG_REGION_SEL_DEFINED: u32 = QM_MIG_REGION_EN;
/// Where, relative to a VF's PF-BAR2 window, the driver stores an EQ/AEQ doorbell:
/// `QM_DOORBELL_EQ_AEQ_BASE_V2` (0x2000, Linux 7.3.4 `include/linux/hisi_acc_qm.h:65`) from
/// `io_base` (`qm_db`, `hisi_acc_vfio_pci.c:252-262`), which in PF-control mode is the first
/// byte after the window. The access path reproduces this address; lab hardware has to say
/// what the QM does with it.
pub const PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET: usize = 0x2000;
/// The size of a Kunpeng 920 ACC VF's BAR2, 64 KiB: the old revision shows the guest its first
/// half (`pci_resource_len >> 1`), the new one all of it (`hisi_acc_get_resource_len`, Linux
/// 7.3.4 `hisi_acc_vfio_pci.c:1274-1294`).
pub const VF_BAR2_LEN: usize = 0x1_0000;

/// A QM hardware revision as the PF driver records it in `qm->ver`: the PF's PCI revision ID,
/// or for revision 0x30 a non-zero `QM_SUB_VERSION_ID` (`qm_get_version`, Linux 7.3.4
/// `drivers/crypto/hisilicon/qm.c:5788-5800`). The VF's QM takes the PF's
/// (`hisi_acc_vfio_pci.c:1237`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QmRevision(pub u32);

impl QmRevision {
    /// `QM_HW_V1` (Linux 7.3.4 `include/linux/hisi_acc_qm.h:147`).
    pub const V1: QmRevision = QmRevision(0x20);
    /// `QM_HW_V2` (`hisi_acc_qm.h:148`).
    pub const V2: QmRevision = QmRevision(0x21);
    /// `QM_HW_V3` (`hisi_acc_qm.h:149`): the first revision `hisi_acc_vfio_pci` migrates
    /// (`pf_qm->ver >= QM_HW_V3`, `hisi_acc_vfio_pci.c:1677`), and the last whose VF migration
    /// registers are always in the VF's own BAR2.
    pub const V3: QmRevision = QmRevision(0x30);
    /// `QM_HW_V4` (`hisi_acc_qm.h:150`): above V3, so it may have the PF-BAR2 windows.
    pub const V4: QmRevision = QmRevision(0x50);
    /// `QM_HW_V5` (`hisi_acc_qm.h:151`).
    pub const V5: QmRevision = QmRevision(0x51);

    /// Whether `hisi_acc_vfio_pci` offers migration on this revision (`ver >= QM_HW_V3`,
    /// Linux 7.3.4 `hisi_acc_vfio_pci.c:1677`).
    pub const fn migratable(self) -> bool {
        self.0 >= Self::V3.0
    }

    /// Whether this is a new revision, one the driver asks `QM_MIG_REGION_SEL` about
    /// (`pf_qm->ver > QM_HW_V3`, Linux 7.3.4 `hisi_acc_vfio_pci.c:1197`).
    pub const fn is_new(self) -> bool {
        self.0 > Self::V3.0
    }
}

impl core::fmt::Display for QmRevision {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match *self {
            Self::V1 => "QM_HW_V1",
            Self::V2 => "QM_HW_V2",
            Self::V3 => "QM_HW_V3",
            Self::V4 => "QM_HW_V4",
            Self::V5 => "QM_HW_V5",
            _ => return write!(f, "QM revision {:#04x}", self.0),
        };
        write!(f, "{name} ({:#04x})", self.0)
    }
}

/// Where a VF's migration registers are, the driver's `enum hw_drv_mode` (Linux 7.3.4
/// `hisi_acc_vfio_pci.h:68-79`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigCtrl {
    /// `HW_ACC_MIG_VF_CTRL`: in the second half of the VF's own BAR2 ([`QmVfRegisters`]); the
    /// guest gets the first half.
    VfBar2,
    /// `HW_ACC_MIG_PF_CTRL`: in an 8 KiB window of the PF's BAR2
    /// ([`QmPfMigWindowRegisters`]); the guest gets the whole VF BAR2.
    PfBar2,
}

impl MigCtrl {
    /// Bytes of a `vf_bar2_len`-byte VF BAR2 the guest is given (region info, mmap, read and
    /// write all use this bound: `hisi_acc_get_resource_len`, Linux 7.3.4
    /// `hisi_acc_vfio_pci.c:1274-1294`, used at 1308, 1331 and 1384).
    pub const fn guest_bar2_len(self, vf_bar2_len: usize) -> usize {
        match self {
            MigCtrl::VfBar2 => vf_bar2_len >> 1,
            MigCtrl::PfBar2 => vf_bar2_len,
        }
    }

    /// The driver's name for the mode.
    pub const fn name(self) -> &'static str {
        match self {
            MigCtrl::VfBar2 => "HW_ACC_MIG_VF_CTRL",
            MigCtrl::PfBar2 => "HW_ACC_MIG_PF_CTRL",
        }
    }
}

/// A VF's BAR2 as the migration driver arranges it: its size and where the migration
/// registers are, which together fix how much of it the guest is given.
///
/// Linux 6.12 and an old-revision QM under Linux 7.3.4 give the guest the first 32 KiB of the
/// 64 KiB BAR2; a new-revision QM with `QM_MIG_REGION_EN` under 7.3.4 gives it all 64 KiB
/// (`hisi_acc_get_resource_len`, Linux 7.3.4 `hisi_acc_vfio_pci.c:1274-1294`, which the region
/// info, mmap, read and write paths use: 1308, 1331, 1384). A guest that has seen one cannot
/// be moved to the other: the BAR is part of what it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bar2Layout {
    /// Where the migration registers are.
    pub mode: MigCtrl,
    /// Bytes of the VF's BAR2 (the PCI resource).
    pub vf_bar2_len: usize,
}

impl Bar2Layout {
    /// Migration registers in the VF's 64 KiB BAR2, guest gets 32 KiB (QM_HW_V3, or any
    /// revision under Linux 6.12).
    pub const VF_CTRL: Bar2Layout = Bar2Layout {
        mode: MigCtrl::VfBar2,
        vf_bar2_len: VF_BAR2_LEN,
    };
    /// Migration registers in the PF's BAR2, guest gets all 64 KiB of the VF's BAR2 (above
    /// QM_HW_V3 with `QM_MIG_REGION_EN`, Linux 7.3.4).
    pub const PF_CTRL: Bar2Layout = Bar2Layout {
        mode: MigCtrl::PfBar2,
        vf_bar2_len: VF_BAR2_LEN,
    };

    /// Bytes of BAR2 the guest is given.
    pub const fn guest_len(self) -> usize {
        self.mode.guest_bar2_len(self.vf_bar2_len)
    }
}

impl fmt::Display for Bar2Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} of a {:#x}-byte BAR2 ({})",
            self.guest_len(),
            self.vf_bar2_len,
            self.mode.name()
        )
    }
}

/// A 32-bit VF register the sequences use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VfReg {
    /// `QM_VF_AEQ_INT_MASK`.
    AeqIntMask,
    /// `QM_VF_EQ_INT_MASK`.
    EqIntMask,
    /// `QM_IFC_INT_SOURCE_V`.
    IfcIntSourceV,
    /// `QM_IFC_INT_MASK`.
    IfcIntMask,
    /// `QM_IFC_INT_STATUS`.
    IfcIntStatus,
    /// `QM_IFC_INT_SET_V`.
    IfcIntSetV,
    /// `QM_QUE_ISO_CFG_V`.
    QueIsoCfgV,
    /// `QM_PAGE_SIZE`.
    PageSize,
    /// `QM_VF_STATE`.
    VfState,
    /// `QM_CACHE_WB_START`.
    CacheWbStart,
    /// `QM_CACHE_WB_DONE`.
    CacheWbDone,
    /// `QM_MB_CMD_SEND_BASE` (mailbox word 0).
    MbCmdSendBase,
    /// `QM_MB_CMD_DATA_ADDR_L`.
    MbDataAddrL,
    /// `QM_MB_CMD_DATA_ADDR_H`.
    MbDataAddrH,
    /// `QM_EQC_DW0 + 4 * n`, n < 7.
    EqcDw(u8),
    /// `QM_AEQC_DW0 + 4 * n`, n < 7.
    AeqcDw(u8),
}

impl VfReg {
    /// Byte offset in BAR2, from [`QmVfRegisters`].
    pub const fn offset(self) -> usize {
        match self {
            VfReg::AeqIntMask => offset_of!(QmVfRegisters, qm_vf_aeq_int_mask),
            VfReg::EqIntMask => offset_of!(QmVfRegisters, qm_vf_eq_int_mask),
            VfReg::IfcIntSourceV => offset_of!(QmVfRegisters, qm_ifc_int_source_v),
            VfReg::IfcIntMask => offset_of!(QmVfRegisters, qm_ifc_int_mask),
            VfReg::IfcIntStatus => offset_of!(QmVfRegisters, qm_ifc_int_status),
            VfReg::IfcIntSetV => offset_of!(QmVfRegisters, qm_ifc_int_set_v),
            VfReg::QueIsoCfgV => offset_of!(QmVfRegisters, qm_que_iso_cfg_v),
            VfReg::PageSize => offset_of!(QmVfRegisters, qm_page_size),
            VfReg::VfState => offset_of!(QmVfRegisters, qm_vf_state),
            VfReg::CacheWbStart => offset_of!(QmVfRegisters, qm_cache_wb_start),
            VfReg::CacheWbDone => offset_of!(QmVfRegisters, qm_cache_wb_done),
            VfReg::MbCmdSendBase => offset_of!(QmVfRegisters, qm_mb_cmd_send_base),
            VfReg::MbDataAddrL => offset_of!(QmVfRegisters, qm_mb_cmd_data_addr_l),
            VfReg::MbDataAddrH => offset_of!(QmVfRegisters, qm_mb_cmd_data_addr_h),
            VfReg::EqcDw(n) => offset_of!(QmVfRegisters, qm_eqc_dw) + 4 * (n as usize % 7),
            VfReg::AeqcDw(n) => offset_of!(QmVfRegisters, qm_aeqc_dw) + 4 * (n as usize % 7),
        }
    }

    /// Byte offset from the start of the migration registers in `mode`: the VF's BAR2
    /// ([`offset`](Self::offset)), or the VF's window in the PF's BAR2
    /// ([`QmPfMigWindowRegisters`]), where only the EQC/AEQC words move.
    pub const fn offset_in(self, mode: MigCtrl) -> usize {
        match (mode, self) {
            (MigCtrl::VfBar2, r) => r.offset(),
            (MigCtrl::PfBar2, VfReg::EqcDw(n)) => {
                offset_of!(QmPfMigWindowRegisters, qm_eqc_dw) + 4 * (n as usize % 7)
            }
            (MigCtrl::PfBar2, VfReg::AeqcDw(n)) => {
                offset_of!(QmPfMigWindowRegisters, qm_aeqc_dw) + 4 * (n as usize % 7)
            }
            (MigCtrl::PfBar2, r) => r.offset(),
        }
    }

    /// The register at byte offset `off` of the migration registers in `mode`, if
    /// [`VfReg::ALL`] names one there.
    pub fn at(off: usize, mode: MigCtrl) -> Option<VfReg> {
        VfReg::ALL.into_iter().find(|r| r.offset_in(mode) == off)
    }

    /// The kernel's name for the register.
    pub const fn name(self) -> &'static str {
        match self {
            VfReg::AeqIntMask => "QM_VF_AEQ_INT_MASK",
            VfReg::EqIntMask => "QM_VF_EQ_INT_MASK",
            VfReg::IfcIntSourceV => "QM_IFC_INT_SOURCE_V",
            VfReg::IfcIntMask => "QM_IFC_INT_MASK",
            VfReg::IfcIntStatus => "QM_IFC_INT_STATUS",
            VfReg::IfcIntSetV => "QM_IFC_INT_SET_V",
            VfReg::QueIsoCfgV => "QM_QUE_ISO_CFG_V",
            VfReg::PageSize => "QM_PAGE_SIZE",
            VfReg::VfState => "QM_VF_STATE",
            VfReg::CacheWbStart => "QM_CACHE_WB_START",
            VfReg::CacheWbDone => "QM_CACHE_WB_DONE",
            VfReg::MbCmdSendBase => "QM_MB_CMD_SEND_BASE",
            VfReg::MbDataAddrL => "QM_MB_CMD_DATA_ADDR_L",
            VfReg::MbDataAddrH => "QM_MB_CMD_DATA_ADDR_H",
            VfReg::EqcDw(_) => "QM_EQC_DW",
            VfReg::AeqcDw(_) => "QM_AEQC_DW",
        }
    }

    /// Every register [`VfReg::offset`] can name, for dumps.
    pub const ALL: [VfReg; 28] = [
        VfReg::AeqIntMask,
        VfReg::EqIntMask,
        VfReg::IfcIntSourceV,
        VfReg::IfcIntMask,
        VfReg::IfcIntStatus,
        VfReg::IfcIntSetV,
        VfReg::QueIsoCfgV,
        VfReg::PageSize,
        VfReg::VfState,
        VfReg::CacheWbStart,
        VfReg::CacheWbDone,
        VfReg::MbCmdSendBase,
        VfReg::MbDataAddrL,
        VfReg::MbDataAddrH,
        VfReg::EqcDw(0),
        VfReg::EqcDw(1),
        VfReg::EqcDw(2),
        VfReg::EqcDw(3),
        VfReg::EqcDw(4),
        VfReg::EqcDw(5),
        VfReg::EqcDw(6),
        VfReg::AeqcDw(0),
        VfReg::AeqcDw(1),
        VfReg::AeqcDw(2),
        VfReg::AeqcDw(3),
        VfReg::AeqcDw(4),
        VfReg::AeqcDw(5),
        VfReg::AeqcDw(6),
    ];
}

/// Offset of the mailbox (128 bits) in BAR2.
pub const MAILBOX_OFFSET: usize = offset_of!(QmVfRegisters, qm_mb_cmd_send_base);
/// Offset of the SQ/CQ doorbell in BAR2.
pub const DOORBELL_SQ_CQ_OFFSET: usize = offset_of!(QmVfRegisters, qm_doorbell_sq_cq);
/// Offset of the EQ/AEQ doorbell in BAR2.
pub const DOORBELL_EQ_AEQ_OFFSET: usize = offset_of!(QmVfRegisters, qm_doorbell_eq_aeq);
/// Bytes of BAR2 the register map covers.
pub const VF_MAP_LEN: usize = core::mem::size_of::<QmVfRegisters>();
/// Bytes of the PF register map.
pub const PF_MAP_LEN: usize = core::mem::size_of::<QmPfRegisters>();
/// Bytes of a VF's PF-BAR2 migration window the register map covers (0x1c3c, rounded up to
/// the doorbell's 8-byte alignment); at most [`QM_MIG_REGION_SIZE`].
pub const PF_WINDOW_MAP_LEN: usize = core::mem::size_of::<QmPfMigWindowRegisters>();
// The window's register map fits the window.
const _: () = assert!(PF_WINDOW_MAP_LEN <= QM_MIG_REGION_SIZE);
/// Offset of the mailbox in a PF-BAR2 window.
pub const PF_WINDOW_MAILBOX_OFFSET: usize = offset_of!(QmPfMigWindowRegisters, qm_mb_cmd_send_base);
/// Offset of the SQ/CQ doorbell in a PF-BAR2 window.
pub const PF_WINDOW_DOORBELL_SQ_CQ_OFFSET: usize =
    offset_of!(QmPfMigWindowRegisters, qm_doorbell_sq_cq);

/// A 32-bit PF register the migration path uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PfReg {
    /// `QM_QUE_ISO_CFG_V`.
    QueIsoCfgV,
    /// `QM_ABNORMAL_INT_STATUS`.
    AbnormalIntStatus,
    /// `QM_VFT_CFG_OP_ENABLE`.
    VftCfgOpEnable,
    /// `QM_VFT_CFG_OP_WR`.
    VftCfgOpWr,
    /// `QM_VFT_CFG_TYPE`.
    VftCfgType,
    /// `QM_VFT_CFG`.
    VftCfg,
    /// `QM_VFT_CFG_DATA_L`.
    VftCfgDataL,
    /// `QM_VFT_CFG_DATA_H`.
    VftCfgDataH,
    /// `QM_VFT_CFG_RDY`.
    VftCfgRdy,
    /// `QM_MIG_REGION_SEL` (new revisions).
    MigRegionSel,
    /// `SEC_CORE_INT_STATUS`.
    SecCoreIntStatus,
    /// `HPRE_HAC_INT_STATUS`.
    HpreHacIntStatus,
    /// `HZIP_CORE_INT_STATUS`.
    HzipCoreIntStatus,
}

impl PfReg {
    /// Byte offset in the PF BAR, from [`QmPfRegisters`].
    pub const fn offset(self) -> usize {
        match self {
            PfReg::QueIsoCfgV => offset_of!(QmPfRegisters, qm_que_iso_cfg_v),
            PfReg::AbnormalIntStatus => offset_of!(QmPfRegisters, qm_abnormal_int_status),
            PfReg::VftCfgOpEnable => offset_of!(QmPfRegisters, qm_vft_cfg_op_enable),
            PfReg::VftCfgOpWr => offset_of!(QmPfRegisters, qm_vft_cfg_op_wr),
            PfReg::VftCfgType => offset_of!(QmPfRegisters, qm_vft_cfg_type),
            PfReg::VftCfg => offset_of!(QmPfRegisters, qm_vft_cfg),
            PfReg::VftCfgDataL => offset_of!(QmPfRegisters, qm_vft_cfg_data_l),
            PfReg::VftCfgDataH => offset_of!(QmPfRegisters, qm_vft_cfg_data_h),
            PfReg::VftCfgRdy => offset_of!(QmPfRegisters, qm_vft_cfg_rdy),
            PfReg::MigRegionSel => offset_of!(QmPfRegisters, qm_mig_region_sel),
            PfReg::SecCoreIntStatus => offset_of!(QmPfRegisters, sec_core_int_status),
            PfReg::HpreHacIntStatus => offset_of!(QmPfRegisters, hpre_hac_int_status),
            PfReg::HzipCoreIntStatus => offset_of!(QmPfRegisters, hzip_core_int_status),
        }
    }

    /// The kernel's name for the register.
    pub const fn name(self) -> &'static str {
        match self {
            PfReg::QueIsoCfgV => "QM_QUE_ISO_CFG_V (PF)",
            PfReg::AbnormalIntStatus => "QM_ABNORMAL_INT_STATUS",
            PfReg::VftCfgOpEnable => "QM_VFT_CFG_OP_ENABLE",
            PfReg::VftCfgOpWr => "QM_VFT_CFG_OP_WR",
            PfReg::VftCfgType => "QM_VFT_CFG_TYPE",
            PfReg::VftCfg => "QM_VFT_CFG",
            PfReg::VftCfgDataL => "QM_VFT_CFG_DATA_L",
            PfReg::VftCfgDataH => "QM_VFT_CFG_DATA_H",
            PfReg::VftCfgRdy => "QM_VFT_CFG_RDY",
            PfReg::MigRegionSel => "QM_MIG_REGION_SEL",
            PfReg::SecCoreIntStatus => "SEC_CORE_INT_STATUS",
            PfReg::HpreHacIntStatus => "HPRE_HAC_INT_STATUS",
            PfReg::HzipCoreIntStatus => "HZIP_CORE_INT_STATUS",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_kernel_headers() {
        for (reg, off) in [
            (VfReg::AeqIntMask, 0x4),
            (VfReg::EqIntMask, 0xc),
            (VfReg::IfcIntSourceV, 0x20),
            (VfReg::IfcIntMask, 0x24),
            (VfReg::IfcIntStatus, 0x28),
            (VfReg::IfcIntSetV, 0x2c),
            (VfReg::QueIsoCfgV, 0x30),
            (VfReg::PageSize, 0x34),
            (VfReg::VfState, 0x60),
            (VfReg::CacheWbStart, 0x204),
            (VfReg::CacheWbDone, 0x208),
            (VfReg::MbCmdSendBase, 0x300),
            (VfReg::MbDataAddrL, 0x304),
            (VfReg::MbDataAddrH, 0x308),
            (VfReg::EqcDw(0), 0x8000),
            (VfReg::EqcDw(6), 0x8018),
            (VfReg::AeqcDw(0), 0x8020),
            (VfReg::AeqcDw(6), 0x8038),
        ] {
            assert_eq!(reg.offset(), off, "{}", reg.name());
        }
        assert_eq!(DOORBELL_SQ_CQ_OFFSET, 0x1000);
        assert_eq!(DOORBELL_EQ_AEQ_OFFSET, 0x2000);
        // 0x803c rounded up to the 8-byte alignment of the doorbell registers.
        assert_eq!(VF_MAP_LEN, 0x8040);
        for (reg, off) in [
            (PfReg::QueIsoCfgV, 0x30),
            (PfReg::AbnormalIntStatus, 0x100008),
            (PfReg::VftCfgOpEnable, 0x100054),
            (PfReg::VftCfgOpWr, 0x100058),
            (PfReg::VftCfgType, 0x10005c),
            (PfReg::VftCfg, 0x100060),
            (PfReg::VftCfgDataL, 0x100064),
            (PfReg::VftCfgDataH, 0x100068),
            (PfReg::VftCfgRdy, 0x10006c),
            (PfReg::MigRegionSel, 0x100198),
            (PfReg::SecCoreIntStatus, 0x301008),
            (PfReg::HpreHacIntStatus, 0x301800),
            (PfReg::HzipCoreIntStatus, 0x3010ac),
        ] {
            assert_eq!(reg.offset(), off, "{}", reg.name());
        }
    }

    #[test]
    fn pf_window_offsets_match_linux_7_3_4() {
        // hisi_acc_vfio_pci.h:54-57, 65-66; hisi_acc_qm.h:64-65, 102-103.
        assert_eq!(
            (QM_MIG_REGION_OFFSET, QM_MIG_REGION_SIZE),
            (0x180000, 0x2000)
        );
        assert_eq!(QM_MIG_REGION_EN, 1);
        assert_eq!(VfReg::EqcDw(0).offset_in(MigCtrl::PfBar2), 0x1c00);
        assert_eq!(VfReg::EqcDw(6).offset_in(MigCtrl::PfBar2), 0x1c18);
        assert_eq!(VfReg::AeqcDw(0).offset_in(MigCtrl::PfBar2), 0x1c20);
        assert_eq!(VfReg::AeqcDw(6).offset_in(MigCtrl::PfBar2), 0x1c38);
        // Everything else keeps its VF-BAR2 offset; the old layout is unchanged.
        for r in VfReg::ALL {
            assert_eq!(r.offset_in(MigCtrl::VfBar2), r.offset(), "{}", r.name());
            if !matches!(r, VfReg::EqcDw(_) | VfReg::AeqcDw(_)) {
                assert_eq!(r.offset_in(MigCtrl::PfBar2), r.offset(), "{}", r.name());
            }
            assert!(
                r.offset_in(MigCtrl::PfBar2) + 4 <= QM_MIG_REGION_SIZE,
                "{}",
                r.name()
            );
            assert_eq!(
                VfReg::at(r.offset_in(MigCtrl::PfBar2), MigCtrl::PfBar2),
                Some(r)
            );
            assert_eq!(VfReg::at(r.offset(), MigCtrl::VfBar2), Some(r));
        }
        // Negative control: the old EQC offset names nothing in the window.
        assert_eq!(VfReg::at(0x8000, MigCtrl::PfBar2), None);
        assert_eq!(PF_WINDOW_MAP_LEN, 0x1c40);
        assert_eq!(PF_WINDOW_DOORBELL_SQ_CQ_OFFSET, 0x1000);
        assert_eq!(PF_WINDOW_MAILBOX_OFFSET, 0x300);
        assert_eq!(PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET, DOORBELL_EQ_AEQ_OFFSET);
    }

    #[test]
    fn revisions_split_old_from_new_where_the_driver_does() {
        assert!(!QmRevision::V2.migratable());
        assert!(QmRevision::V3.migratable() && !QmRevision::V3.is_new());
        assert!(QmRevision::V4.is_new() && QmRevision::V5.is_new());
        // A V3 whose QM_SUB_VERSION_ID says 0x31 is above V3 (qm.c:5795-5799).
        assert!(QmRevision(0x31).is_new());
        assert_eq!(QmRevision::V4.to_string(), "QM_HW_V4 (0x50)");
        assert_eq!(QmRevision(0x31).to_string(), "QM revision 0x31");
        assert_eq!(MigCtrl::VfBar2.guest_bar2_len(VF_BAR2_LEN), 0x8000);
        assert_eq!(MigCtrl::PfBar2.guest_bar2_len(VF_BAR2_LEN), 0x10000);
    }
}
