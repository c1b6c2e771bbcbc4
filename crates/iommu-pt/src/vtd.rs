//! A VT-d remapping unit in scalable mode, for programs that drive it directly (firmware, lab
//! bring-up, a test guest without an IOMMU driver): the register map, the scalable-mode
//! structures from the root table down to the PASID entry, invalidation descriptors, and the
//! fault-record decoder.
//!
//! ```text
//!  RTADDR (TTM = 01b scalable) ─> root table: 256 × 128 bit, index = bus
//!     root entry  lo: LP | lower context table (devfn 0..127)   hi: UP | upper table (128..255)
//!       └─> context table: 128 × 256 bit, index = devfn & 0x7f
//!            context entry  val0: P | PDTS | PASID directory   val1: RID_PASID (DMA without PASID)
//!              └─> PASID directory: 2^(PDTS+7) × 64 bit, index = PASID[19:6]
//!                   entry: P | PASID table
//!                     └─> PASID table: 64 × 512 bit, index = PASID[5:0]
//!                          PASID entry ([`VtdPasidEntry`]): PGTT (first stage / second stage /
//!                          nested / pass-through), AW, DID, FLPTPTR + FLPM, SSPTPTR, SSADE, SRE
//!                            └─> first-stage table ([`X86FirstStage`](crate::format::X86FirstStage))
//!
//!  registers: 0x00 VER  0x08 CAP  0x10 ECAP  0x18 GCMD  0x1c GSTS  0x20 RTADDR  0x28 CCMD
//!             0x34 FSTS 0x38 FECTL ... 0x80 IQH 0x88 IQT 0x90 IQA 0x9c ICS
//!             CAP.FRO × 16: fault-recording registers (128 bit each, CAP.NFR + 1 of them)
//!             ECAP.IRO × 16: IVA, +8 IOTLB (register-based IOTLB invalidation)
//!  invalidation queue (IQA.DW = 1: 256-bit descriptors): context-cache (1), IOTLB (2),
//!             wait (5), PASID-based IOTLB (6), PASID-cache (7); IQT = index << 5
//! ```
//!
//! Sources. Register offsets, GCMD/GSTS, CCMD, FSTS, FECTL, IOTLB-register, fault-record and
//! invalidation-descriptor fields: Linux 6.12 `drivers/iommu/intel/iommu.h` (`DMAR_*_REG`,
//! `DMA_GCMD_*`, `DMA_GSTS_*`, `DMA_RTADDR_SMT`, `DMA_CCMD_*`, `DMA_FSTS_*`, `DMA_FECTL_IM`,
//! `DMA_TLB_*`, `DMA_FRCD_*`/`dma_frcd_*`, `QI_*`, `cap_fault_reg_offset`, `ecap_iotlb_offset`,
//! `qi_shift`), `drivers/iommu/intel/dmar.c` (`dmar_fault`: fault-record dword layout; the
//! fault-reason tables `dma_remap_fault_reasons`, `dma_remap_sm_fault_reasons`,
//! `irq_remap_fault_reasons`, whose meanings the descriptions here restate), `iommu.h`
//! (`context_set_sm_*`, `context_pdts`) and `pasid.h`/`pasid.c` (PASID directory and table
//! entries, `context_entry_set_pasid_table`). Reserved-bit masks of the descriptors and the
//! scalable-mode context entry, the TTM field width (bits 11:10) and IQH/IQT widths: QEMU 10.0
//! `hw/i386/intel_iommu_internal.h` (`VTD_INV_DESC_*_RSVD*`, `VTD_SM_CONTEXT_ENTRY_RSVD_VAL*`,
//! `VTD_IQH_QH_MASK`) and `shared/recipes/vtd-firmware.md` (values measured on QEMU 10.0). The
//! VT-d specification (Intel VT-d 4.x) chapters are cited as recalled, **unverified here** (no
//! copy was available): §9.1-9.6 (root, context, PASID directory and table entries), §6.5.2
//! (queued invalidation descriptors), §10.4 (register descriptions: GCMD §10.4.4, fault
//! recording §10.4.14). The fault record's EXE (bit 94), PRIV (93), T2 (92) and AT (125:124)
//! fields are likewise as recalled: Linux 6.12 does not use them.

use alloc::vec::Vec;
use core::fmt;
use core::mem::offset_of;

use tock_registers::LocalRegisterCopy;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

use crate::Error;
use crate::caps::VtdCaps;
use crate::config::Problem;

#[doc(no_inline)]
pub use crate::config::{Pgtt, VtdPasidEntry};

/// Bitfields of the VT-d registers and structures (tock-registers).
///
/// The generated marker types and per-field constants carry no documentation of their own.
#[allow(missing_docs)]
pub mod regs {
    use tock_registers::register_bitfields;

    register_bitfields![u32,
        /// VER (0x00).
        pub VER [
            /// Minor version.
            MIN OFFSET(0) NUMBITS(4) [],
            /// Major version.
            MAX OFFSET(4) NUMBITS(4) []
        ],
        /// GCMD (0x18, write-only) and GSTS (0x1c, read-only): a command bit in GCMD and the
        /// status bit at the same position in GSTS (`DMA_GCMD_*`, `DMA_GSTS_*`).
        pub GCMD [
            /// Compatibility format interrupt (persistent).
            CFI OFFSET(23) NUMBITS(1) [],
            /// Set interrupt remap table pointer (one-shot).
            SIRTP OFFSET(24) NUMBITS(1) [],
            /// Interrupt remapping enable (persistent).
            IRE OFFSET(25) NUMBITS(1) [],
            /// Queued invalidation enable (persistent).
            QIE OFFSET(26) NUMBITS(1) [],
            /// Write buffer flush (one-shot).
            WBF OFFSET(27) NUMBITS(1) [],
            /// Enable advanced fault logging (persistent; deprecated).
            EAFL OFFSET(28) NUMBITS(1) [],
            /// Set fault log (one-shot).
            SFL OFFSET(29) NUMBITS(1) [],
            /// Set root table pointer (one-shot): latch RTADDR.
            SRTP OFFSET(30) NUMBITS(1) [],
            /// Translation enable (persistent).
            TE OFFSET(31) NUMBITS(1) []
        ],
        /// FSTS (0x34): fault status; the status bits are write-1-to-clear.
        pub FSTS [
            /// Primary fault overflow.
            PFO OFFSET(0) NUMBITS(1) [],
            /// Primary pending fault: some fault-recording register has F set.
            PPF OFFSET(1) NUMBITS(1) [],
            /// Invalidation queue error.
            IQE OFFSET(4) NUMBITS(1) [],
            /// Invalidation completion error.
            ICE OFFSET(5) NUMBITS(1) [],
            /// Invalidation time-out error.
            ITE OFFSET(6) NUMBITS(1) [],
            /// Fault record index: the first recording register with F set.
            FRI OFFSET(8) NUMBITS(8) []
        ],
        /// FECTL (0x38): fault event control.
        pub FECTL [
            /// Interrupt pending.
            IP OFFSET(30) NUMBITS(1) [],
            /// Interrupt mask (set at reset: fault interrupts are masked).
            IM OFFSET(31) NUMBITS(1) []
        ],
        /// ICS (0x9c): invalidation completion status.
        pub ICS [
            /// Invalidation wait descriptor complete (write 1 to clear).
            IWC OFFSET(0) NUMBITS(1) []
        ]
    ];

    register_bitfields![u64,
        /// RTADDR (0x20): root table address.
        pub RTADDR [
            /// Translation table mode (QEMU 10.0 and the VT-d specification: bits 11:10; Linux
            /// 6.12 writes bit 10 only, `DMA_RTADDR_SMT`).
            TTM OFFSET(10) NUMBITS(2) [
                Legacy = 0,
                Scalable = 1,
                AbortDma = 3
            ],
            /// Root table address, bits 63:12.
            RTA OFFSET(12) NUMBITS(52) []
        ],
        /// CCMD (0x28): register-based context-cache invalidation.
        pub CCMD [
            /// Domain ID.
            DID OFFSET(0) NUMBITS(16) [],
            /// Source ID (device-selective).
            SID OFFSET(16) NUMBITS(16) [],
            /// Function mask.
            FM OFFSET(32) NUMBITS(2) [],
            /// Actual invalidation granularity (reported).
            CAIG OFFSET(59) NUMBITS(2) [],
            /// Requested invalidation granularity.
            CIRG OFFSET(61) NUMBITS(2) [
                Global = 1,
                Domain = 2,
                Device = 3
            ],
            /// Invalidate context cache: set to start, cleared by hardware when done.
            ICC OFFSET(63) NUMBITS(1) []
        ],
        /// IQH (0x80): invalidation queue head (hardware's next descriptor).
        pub IQH [
            /// Queue head, in 16-byte units (bit 4 is 0 with 256-bit descriptors).
            QH OFFSET(4) NUMBITS(15) []
        ],
        /// IQT (0x88): invalidation queue tail (software's next free slot).
        pub IQT [
            /// Queue tail, in 16-byte units: index << 1 with 256-bit descriptors (the register
            /// value is index << 5).
            QT OFFSET(4) NUMBITS(15) []
        ],
        /// IQA (0x90): invalidation queue address.
        pub IQA [
            /// Queue size: 2^QS pages of 4 KiB.
            QS OFFSET(0) NUMBITS(3) [],
            /// Descriptor width: 1 = 256-bit descriptors (required in scalable mode).
            DW OFFSET(11) NUMBITS(1) [],
            /// Queue base address, bits 63:12.
            IQA OFFSET(12) NUMBITS(52) []
        ],
        /// IVA (ECAP.IRO × 16): invalidate address for a page-selective register invalidation.
        pub IVA [
            /// Address mask: 2^AM pages.
            AM OFFSET(0) NUMBITS(6) [],
            /// Invalidation hint: leaf entries only.
            IH OFFSET(6) NUMBITS(1) [],
            /// Address, bits 63:12.
            ADDR OFFSET(12) NUMBITS(52) []
        ],
        /// IOTLB (ECAP.IRO × 16 + 8): register-based IOTLB invalidation.
        pub IOTLB [
            /// Domain ID.
            DID OFFSET(32) NUMBITS(16) [],
            /// Drain writes.
            DW OFFSET(48) NUMBITS(1) [],
            /// Drain reads.
            DR OFFSET(49) NUMBITS(1) [],
            /// Actual invalidation granularity (reported).
            IAIG OFFSET(57) NUMBITS(2) [],
            /// Requested invalidation granularity.
            IIRG OFFSET(60) NUMBITS(2) [
                Global = 1,
                Domain = 2,
                Page = 3
            ],
            /// Invalidate IOTLB: set to start, cleared by hardware when done.
            IVT OFFSET(63) NUMBITS(1) []
        ],
        /// Scalable-mode root entry, either word: lower (devfn 0..127) or upper (128..255).
        pub ROOT [
            /// Present (LP / UP).
            P OFFSET(0) NUMBITS(1) [],
            /// Reserved, must be zero.
            RSVD OFFSET(1) NUMBITS(11) [],
            /// Context table pointer, bits 63:12 (LCTP / UCTP).
            CTP OFFSET(12) NUMBITS(52) []
        ],
        /// Scalable-mode context entry bits 63:0.
        pub SM_CTX0 [
            /// Present.
            P OFFSET(0) NUMBITS(1) [],
            /// Fault processing disable.
            FPD OFFSET(1) NUMBITS(1) [],
            /// Device-TLB enable (`context_set_sm_dte`).
            DTE OFFSET(2) NUMBITS(1) [],
            /// PASID enable: requests with PASID allowed (`CONTEXT_PASIDE`).
            PASIDE OFFSET(3) NUMBITS(1) [],
            /// Page request enable (`context_set_sm_pre`).
            PRE OFFSET(4) NUMBITS(1) [],
            /// Reserved (QEMU `VTD_SM_CONTEXT_ENTRY_RSVD_VAL0`: 0x1e0).
            RSVD OFFSET(5) NUMBITS(4) [],
            /// PASID directory size: 2^(PDTS + 7) entries (`context_pdts`).
            PDTS OFFSET(9) NUMBITS(3) [],
            /// PASID directory pointer, bits 63:12.
            PASIDDIRPTR OFFSET(12) NUMBITS(52) []
        ],
        /// Scalable-mode context entry bits 127:64.
        pub SM_CTX1 [
            /// PASID used for requests without PASID (`context_set_sm_rid2pasid`).
            RID_PASID OFFSET(0) NUMBITS(20) [],
            /// Privilege of requests without PASID (as recalled; QEMU leaves bit 20 unreserved).
            RID_PRIV OFFSET(20) NUMBITS(1) [],
            /// Reserved (QEMU `VTD_SM_CONTEXT_ENTRY_RSVD_VAL1`).
            RSVD OFFSET(21) NUMBITS(43) []
        ],
        /// Scalable-mode PASID directory entry.
        pub PASID_DIR [
            /// Present.
            P OFFSET(0) NUMBITS(1) [],
            /// Fault processing disable.
            FPD OFFSET(1) NUMBITS(1) [],
            /// Reserved.
            RSVD OFFSET(2) NUMBITS(10) [],
            /// PASID table pointer, bits 63:12.
            SMPTBLPTR OFFSET(12) NUMBITS(52) []
        ],
        /// Fault-recording register bits 63:0.
        pub FRCD_LO [
            /// Reserved.
            RSVD OFFSET(0) NUMBITS(12) [],
            /// Fault information: the page address of the faulting request (interrupt index in
            /// bits 63:48 for interrupt-remapping faults).
            FI OFFSET(12) NUMBITS(52) []
        ],
        /// Fault-recording register bits 127:64 (`dmar_fault`: dwords at +8 and +12).
        pub FRCD_HI [
            /// Source ID (bus/device/function) of the request.
            SID OFFSET(0) NUMBITS(16) [],
            /// Reserved (bits 91:80).
            RSVD OFFSET(16) NUMBITS(12) [],
            /// Type bit 2 (bit 92, as recalled).
            T2 OFFSET(28) NUMBITS(1) [],
            /// Privilege mode requested (bit 93, as recalled).
            PRIV OFFSET(29) NUMBITS(1) [],
            /// Execute permission requested (bit 94, as recalled).
            EXE OFFSET(30) NUMBITS(1) [],
            /// PASID present (bit 95).
            PP OFFSET(31) NUMBITS(1) [],
            /// Fault reason (bits 103:96).
            FR OFFSET(32) NUMBITS(8) [],
            /// PASID value (bits 123:104).
            PV OFFSET(40) NUMBITS(20) [],
            /// Address type (bits 125:124, as recalled).
            AT OFFSET(60) NUMBITS(2) [],
            /// Type: 1 = read, 0 = write (bit 126).
            T OFFSET(62) NUMBITS(1) [],
            /// Fault: the record is valid; write 1 to clear (bit 127).
            F OFFSET(63) NUMBITS(1) []
        ],
        /// Word 0 of every invalidation descriptor.
        pub INV0 [
            /// Descriptor type bits 3:0.
            TYPE_LO OFFSET(0) NUMBITS(4) [],
            /// Granularity.
            G OFFSET(4) NUMBITS(2) [],
            /// IOTLB: drain writes; wait: fence (FN).
            DW_FN OFFSET(6) NUMBITS(1) [],
            /// IOTLB: drain reads; wait: page-request drain (PD).
            DR_PD OFFSET(7) NUMBITS(1) [],
            /// Descriptor type bits 6:4.
            TYPE_HI OFFSET(9) NUMBITS(3) [],
            /// Domain ID (context-cache, IOTLB, PASID-based IOTLB, PASID-cache).
            DID OFFSET(16) NUMBITS(16) [],
            /// Context cache: source ID; PASID descriptors: PASID bits 15:0 (see `PASID`).
            SID OFFSET(32) NUMBITS(16) [],
            /// Context cache: function mask.
            FM OFFSET(48) NUMBITS(2) [],
            /// PASID-based IOTLB and PASID-cache: PASID.
            PASID OFFSET(32) NUMBITS(20) [],
            /// Wait: status data.
            STATUS_DATA OFFSET(32) NUMBITS(32) []
        ],
        /// Word 1 of the IOTLB and PASID-based IOTLB descriptors.
        pub INV1_ADDR [
            /// Address mask: 2^AM pages.
            AM OFFSET(0) NUMBITS(6) [],
            /// Invalidation hint: only leaf entries changed.
            IH OFFSET(6) NUMBITS(1) [],
            /// Reserved.
            RSVD OFFSET(7) NUMBITS(5) [],
            /// Address, bits 63:12.
            ADDR OFFSET(12) NUMBITS(52) []
        ]
    ];
}

use regs::{FRCD_HI, FRCD_LO, GCMD, INV0, INV1_ADDR, PASID_DIR, ROOT, SM_CTX0, SM_CTX1};

register_structs! {
    /// The fixed part of a VT-d unit's register set (Linux 6.12 `DMAR_*_REG`). 64-bit
    /// registers may be accessed as two 32-bit halves, low first. The fault-recording and IOTLB
    /// registers live at offsets the unit reports: [`FaultRecordRegisters`] at
    /// [`VtdCaps::fault_record_offset`], [`IotlbRegisters`] at [`VtdCaps::iotlb_offset`].
    pub VtdRegisters {
        /// Version.
        (0x00 => pub ver: ReadOnly<u32, regs::VER::Register>),
        (0x04 => _reserved0),
        /// Capabilities ([`VtdCaps`]).
        (0x08 => pub cap: ReadOnly<u64>),
        /// Extended capabilities ([`VtdCaps`]).
        (0x10 => pub ecap: ReadOnly<u64>),
        /// Global command: write [`gcmd_value`]'s result, then poll [`gsts`](Self::gsts).
        (0x18 => pub gcmd: WriteOnly<u32, GCMD::Register>),
        /// Global status.
        (0x1c => pub gsts: ReadOnly<u32, GCMD::Register>),
        /// Root table address and translation table mode.
        (0x20 => pub rtaddr: ReadWrite<u64, regs::RTADDR::Register>),
        /// Register-based context-cache invalidation (refused while queued invalidation is on).
        (0x28 => pub ccmd: ReadWrite<u64, regs::CCMD::Register>),
        (0x30 => _reserved1),
        /// Fault status.
        (0x34 => pub fsts: ReadWrite<u32, regs::FSTS::Register>),
        /// Fault event control.
        (0x38 => pub fectl: ReadWrite<u32, regs::FECTL::Register>),
        /// Fault event interrupt data.
        (0x3c => pub fedata: ReadWrite<u32>),
        /// Fault event interrupt address.
        (0x40 => pub feaddr: ReadWrite<u32>),
        /// Fault event interrupt upper address.
        (0x44 => pub feuaddr: ReadWrite<u32>),
        (0x48 => _reserved2),
        /// Advanced fault log.
        (0x58 => pub aflog: ReadWrite<u64>),
        (0x60 => _reserved3),
        /// Protected memory enable.
        (0x64 => pub pmen: ReadWrite<u32>),
        /// Protected low-memory base.
        (0x68 => pub plmbase: ReadWrite<u32>),
        /// Protected low-memory limit.
        (0x6c => pub plmlimit: ReadWrite<u32>),
        /// Protected high-memory base.
        (0x70 => pub phmbase: ReadWrite<u64>),
        /// Protected high-memory limit.
        (0x78 => pub phmlimit: ReadWrite<u64>),
        /// Invalidation queue head.
        (0x80 => pub iqh: ReadOnly<u64, regs::IQH::Register>),
        /// Invalidation queue tail.
        (0x88 => pub iqt: ReadWrite<u64, regs::IQT::Register>),
        /// Invalidation queue address.
        (0x90 => pub iqa: ReadWrite<u64, regs::IQA::Register>),
        (0x98 => _reserved4),
        /// Invalidation completion status.
        (0x9c => pub ics: ReadWrite<u32, regs::ICS::Register>),
        /// Invalidation event control.
        (0xa0 => pub iectl: ReadWrite<u32>),
        /// Invalidation event data.
        (0xa4 => pub iedata: ReadWrite<u32>),
        /// Invalidation event address.
        (0xa8 => pub ieaddr: ReadWrite<u32>),
        /// Invalidation event upper address.
        (0xac => pub ieuaddr: ReadWrite<u32>),
        /// Invalidation queue error record.
        (0xb0 => pub iqer: ReadOnly<u64>),
        /// Interrupt remapping table address.
        (0xb8 => pub irta: ReadWrite<u64>),
        (0xc0 => @END),
    }
}

register_structs! {
    /// The IOTLB registers at ECAP.IRO × 16 ([`VtdCaps::iotlb_offset`]).
    pub IotlbRegisters {
        /// Invalidate address.
        (0x0 => pub iva: ReadWrite<u64, regs::IVA::Register>),
        /// IOTLB invalidate.
        (0x8 => pub iotlb: ReadWrite<u64, regs::IOTLB::Register>),
        (0x10 => @END),
    }
}

register_structs! {
    /// One fault-recording register (128 bits) at CAP.FRO × 16 + 16 × index
    /// ([`VtdCaps::fault_record_offset`]); decode with [`FaultRecord::from_words`]; clear by
    /// writing [`FRCD_CLEAR`] to the high word.
    pub FaultRecordRegisters {
        /// Bits 63:0.
        (0x0 => pub lo: ReadWrite<u64, FRCD_LO::Register>),
        /// Bits 127:64.
        (0x8 => pub hi: ReadWrite<u64, FRCD_HI::Register>),
        (0x10 => @END),
    }
}

/// A register of the fixed part, by name, for code that reads and writes through an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reg {
    /// VER (32 bit).
    Ver,
    /// CAP (64 bit).
    Cap,
    /// ECAP (64 bit).
    Ecap,
    /// GCMD (32 bit).
    Gcmd,
    /// GSTS (32 bit).
    Gsts,
    /// RTADDR (64 bit).
    Rtaddr,
    /// CCMD (64 bit).
    Ccmd,
    /// FSTS (32 bit).
    Fsts,
    /// FECTL (32 bit).
    Fectl,
    /// IQH (64 bit).
    Iqh,
    /// IQT (64 bit).
    Iqt,
    /// IQA (64 bit).
    Iqa,
    /// ICS (32 bit).
    Ics,
}

impl Reg {
    /// Byte offset from the unit's base (taken from [`VtdRegisters`]).
    pub const fn offset(self) -> usize {
        match self {
            Reg::Ver => offset_of!(VtdRegisters, ver),
            Reg::Cap => offset_of!(VtdRegisters, cap),
            Reg::Ecap => offset_of!(VtdRegisters, ecap),
            Reg::Gcmd => offset_of!(VtdRegisters, gcmd),
            Reg::Gsts => offset_of!(VtdRegisters, gsts),
            Reg::Rtaddr => offset_of!(VtdRegisters, rtaddr),
            Reg::Ccmd => offset_of!(VtdRegisters, ccmd),
            Reg::Fsts => offset_of!(VtdRegisters, fsts),
            Reg::Fectl => offset_of!(VtdRegisters, fectl),
            Reg::Iqh => offset_of!(VtdRegisters, iqh),
            Reg::Iqt => offset_of!(VtdRegisters, iqt),
            Reg::Iqa => offset_of!(VtdRegisters, iqa),
            Reg::Ics => offset_of!(VtdRegisters, ics),
        }
    }

    /// Width in bytes (4 or 8).
    pub const fn width(self) -> usize {
        match self {
            Reg::Ver | Reg::Gcmd | Reg::Gsts | Reg::Fsts | Reg::Fectl | Reg::Ics => 4,
            _ => 8,
        }
    }
}

/// Offset of fault-recording register `index` (CAP.FRO × 16 + 16 × index); `None` past
/// CAP.NFR.
pub fn fault_record_offset(caps: &VtdCaps, index: u32) -> Option<u64> {
    (index < caps.fault_records()).then(|| caps.fault_record_offset() + 16 * u64::from(index))
}

/// The value that clears a fault record: F (bit 127) written to the high word (bit 63 of the
/// word at +8, i.e. bit 31 of the dword at +12, as `dmar_fault` does).
pub const FRCD_CLEAR: u64 = 1 << 63;

/// GSTS bits that reflect a persistent enable and must be repeated in every GCMD write: TE,
/// EAFL, QIE, IRE, CFI. The others (SRTP, SFL, WBF, SIRTP) are one-shot commands.
pub const GCMD_PERSISTENT: u32 = (1 << 31) | (1 << 28) | (1 << 26) | (1 << 25) | (1 << 23);

/// One global command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalCommand {
    /// SRTP: latch RTADDR (wait for GSTS.RTPS).
    SetRootTablePointer,
    /// TE: enable or disable DMA remapping (wait for GSTS.TES).
    Translation(bool),
    /// QIE: enable or disable the invalidation queue (wait for GSTS.QIES).
    QueuedInvalidation(bool),
    /// IRE: enable or disable interrupt remapping.
    InterruptRemapping(bool),
    /// SIRTP: latch IRTA.
    SetInterruptRemapTablePointer,
    /// WBF: flush the write buffer (CAP.RWBF).
    WriteBufferFlush,
}

/// The GCMD value that issues `cmd` given the current GSTS: the persistent enables GSTS reports
/// are repeated and the one-shot bits dropped (the VT-d specification's GCMD procedure; QEMU
/// 10.0 acts on `status XOR value`, so a write that omits an enabled bit turns it off).
pub fn gcmd_value(gsts: u32, cmd: GlobalCommand) -> u32 {
    let keep = gsts & GCMD_PERSISTENT;
    let bit = |f: tock_registers::fields::Field<u32, GCMD::Register>| f.mask << f.shift;
    let set_or_clear = |b: u32, on: bool| if on { keep | b } else { keep & !b };
    match cmd {
        GlobalCommand::SetRootTablePointer => keep | bit(GCMD::SRTP),
        GlobalCommand::Translation(on) => set_or_clear(bit(GCMD::TE), on),
        GlobalCommand::QueuedInvalidation(on) => set_or_clear(bit(GCMD::QIE), on),
        GlobalCommand::InterruptRemapping(on) => set_or_clear(bit(GCMD::IRE), on),
        GlobalCommand::SetInterruptRemapTablePointer => keep | bit(GCMD::SIRTP),
        GlobalCommand::WriteBufferFlush => keep | bit(GCMD::WBF),
    }
}

/// RTADDR for a scalable-mode root table at `root` (TTM = 01b, bits 11:10).
pub fn rtaddr_scalable(root: u64) -> Result<u64, Error> {
    check_page("root table address", root)?;
    let mut r = LocalRegisterCopy::<u64, regs::RTADDR::Register>::new(0);
    r.modify(regs::RTADDR::RTA.val(root >> 12) + regs::RTADDR::TTM::Scalable);
    Ok(r.get())
}

/// IQA for a queue of 2^`qs` pages at `base` with 256-bit descriptors (DW = 1).
pub fn iqa_value(base: u64, qs: u8) -> Result<u64, Error> {
    check_page("invalidation queue address", base)?;
    if qs > 7 {
        return Err(Error::Config("IQA.QS is 3 bits"));
    }
    let mut r = LocalRegisterCopy::<u64, regs::IQA::Register>::new(0);
    r.modify(
        regs::IQA::IQA.val(base >> 12) + regs::IQA::DW::SET + regs::IQA::QS.val(u64::from(qs)),
    );
    Ok(r.get())
}

/// IQT (or IQH) value for descriptor `index` of a queue of 256-bit descriptors: `index << 5`
/// (Linux `qi_shift` with ECAP.SMTS: `DMAR_IQ_SHIFT` + 1).
pub const fn iq_offset_256(index: u32) -> u64 {
    (index as u64) << 5
}

/// Descriptor index from an IQH/IQT value of a 256-bit queue.
pub const fn iq_index_256(reg: u64) -> u32 {
    ((reg >> 5) & 0x3fff) as u32
}

fn check_page(what: &'static str, pa: u64) -> Result<(), Error> {
    if pa & 0xfff != 0 {
        return Err(Error::Unaligned {
            what,
            value: pa,
            align: 4096,
        });
    }
    Ok(())
}

fn problem(field: &'static str, value: u64, rule: &'static str) -> Problem {
    Problem { field, value, rule }
}

fn decode_err(what: &'static str, field: &'static str, value: u64, rule: &'static str) -> Error {
    Error::Decode {
        what,
        problem: problem(field, value, rule),
    }
}

fn words_from_bytes<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u64; N], Error> {
    if bytes.len() < 8 * N {
        return Err(Error::Truncated {
            what,
            got: bytes.len(),
            need: 8 * N,
        });
    }
    let mut w = [0u64; N];
    for (i, chunk) in bytes.chunks_exact(8).take(N).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        w[i] = u64::from_le_bytes(b);
    }
    Ok(w)
}

/// A scalable-mode root entry (128 bits): context tables for devfn 0..127 (lower) and
/// 128..255 (upper) of one bus.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RootEntry {
    words: [u64; 2],
}

impl RootEntry {
    /// Size in bytes.
    pub const SIZE: usize = 16;

    /// Wrap raw words.
    pub const fn from_words(words: [u64; 2]) -> Self {
        RootEntry { words }
    }

    /// An entry pointing at a lower and/or upper context table (4 KiB aligned).
    pub fn scalable(lower: Option<u64>, upper: Option<u64>) -> Result<Self, Error> {
        let half = |t: Option<u64>| -> Result<u64, Error> {
            let Some(pa) = t else { return Ok(0) };
            check_page("context table address", pa)?;
            let mut r = LocalRegisterCopy::<u64, ROOT::Register>::new(0);
            r.modify(ROOT::P::SET + ROOT::CTP.val(pa >> 12));
            Ok(r.get())
        };
        Ok(RootEntry {
            words: [half(lower)?, half(upper)?],
        })
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 2] {
        self.words
    }

    /// The context table holding `devfn` and the entry index in it, if that half is present.
    pub fn context_table(&self, devfn: u8) -> Option<(u64, usize)> {
        let (w, index) = if devfn < 128 {
            (self.words[0], devfn as usize)
        } else {
            (self.words[1], devfn as usize - 128)
        };
        let r = LocalRegisterCopy::<u64, ROOT::Register>::new(w);
        r.is_set(ROOT::P).then(|| (r.read(ROOT::CTP) << 12, index))
    }

    /// Reserved bits that are set.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        for (w, field) in self.words.iter().zip(["ROOT.LO[11:1]", "ROOT.HI[11:1]"]) {
            let v = LocalRegisterCopy::<u64, ROOT::Register>::new(*w).read(ROOT::RSVD);
            if v != 0 {
                p.push(problem(field, v, "reserved, must be zero"));
            }
        }
        p
    }
}

impl fmt::Debug for RootEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootEntry")
            .field("lower", &self.context_table(0).map(|t| t.0))
            .field("upper", &self.context_table(128).map(|t| t.0))
            .finish()
    }
}

/// A scalable-mode context entry (256 bits).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContextEntry {
    words: [u64; 4],
}

impl ContextEntry {
    /// Size in bytes.
    pub const SIZE: usize = 32;

    /// Wrap raw words.
    pub const fn from_words(words: [u64; 4]) -> Self {
        ContextEntry { words }
    }

    /// A present entry: PASID directory at `dir` with 2^(`pdts` + 7) entries, `rid_pasid` for
    /// requests without PASID; faults reported, no device TLB, PASID or page requests.
    pub fn scalable(dir: u64, pdts: u8, rid_pasid: u32) -> Result<Self, Error> {
        check_page("PASID directory address", dir)?;
        if pdts > 7 {
            return Err(Error::Config("context entry PDTS is 3 bits"));
        }
        if rid_pasid >= 1 << 20 {
            return Err(Error::Config("RID_PASID is 20 bits"));
        }
        let mut w0 = LocalRegisterCopy::<u64, SM_CTX0::Register>::new(0);
        w0.modify(
            SM_CTX0::P::SET
                + SM_CTX0::PDTS.val(u64::from(pdts))
                + SM_CTX0::PASIDDIRPTR.val(dir >> 12),
        );
        Ok(ContextEntry {
            words: [w0.get(), u64::from(rid_pasid), 0, 0],
        })
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 4] {
        self.words
    }

    fn w0(&self) -> LocalRegisterCopy<u64, SM_CTX0::Register> {
        LocalRegisterCopy::new(self.words[0])
    }

    /// P.
    pub fn present(&self) -> bool {
        self.w0().is_set(SM_CTX0::P)
    }

    /// PASIDE: requests with PASID allowed.
    pub fn pasid_enabled(&self) -> bool {
        self.w0().is_set(SM_CTX0::PASIDE)
    }

    /// The PASID directory.
    pub fn pasid_dir(&self) -> u64 {
        self.w0().read(SM_CTX0::PASIDDIRPTR) << 12
    }

    /// Number of PASID directory entries (2^(PDTS + 7)).
    pub fn pasid_dir_entries(&self) -> u32 {
        1 << (self.w0().read(SM_CTX0::PDTS) + 7)
    }

    /// RID_PASID.
    pub fn rid_pasid(&self) -> u32 {
        LocalRegisterCopy::<u64, SM_CTX1::Register>::new(self.words[1]).read(SM_CTX1::RID_PASID)
            as u32
    }

    /// Reserved bits that are set.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let r0 = self.w0().read(SM_CTX0::RSVD);
        if r0 != 0 {
            p.push(problem("SM_CTX[8:5]", r0, "reserved, must be zero"));
        }
        let r1 =
            LocalRegisterCopy::<u64, SM_CTX1::Register>::new(self.words[1]).read(SM_CTX1::RSVD);
        if r1 != 0 {
            p.push(problem("SM_CTX[127:85]", r1, "reserved, must be zero"));
        }
        for (w, field) in [
            (self.words[2], "SM_CTX[191:128]"),
            (self.words[3], "SM_CTX[255:192]"),
        ] {
            if w != 0 {
                p.push(problem(field, w, "reserved, must be zero"));
            }
        }
        p
    }
}

impl fmt::Debug for ContextEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextEntry")
            .field("present", &self.present())
            .field("pasid_dir", &format_args!("{:#x}", self.pasid_dir()))
            .field("pasid_dir_entries", &self.pasid_dir_entries())
            .field("rid_pasid", &self.rid_pasid())
            .finish()
    }
}

/// A scalable-mode PASID directory entry (64 bits): the PASID table for PASID\[19:6\].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PasidDirEntry(pub u64);

impl PasidDirEntry {
    /// Size in bytes.
    pub const SIZE: usize = 8;

    /// A present entry pointing at the PASID table `table`.
    pub fn new(table: u64) -> Result<Self, Error> {
        check_page("PASID table address", table)?;
        let mut r = LocalRegisterCopy::<u64, PASID_DIR::Register>::new(0);
        r.modify(PASID_DIR::P::SET + PASID_DIR::SMPTBLPTR.val(table >> 12));
        Ok(PasidDirEntry(r.get()))
    }

    /// The PASID table, if present.
    pub fn table(&self) -> Option<u64> {
        let r = LocalRegisterCopy::<u64, PASID_DIR::Register>::new(self.0);
        r.is_set(PASID_DIR::P)
            .then(|| r.read(PASID_DIR::SMPTBLPTR) << 12)
    }

    /// Reserved bits that are set.
    pub fn problems(&self) -> Vec<Problem> {
        let v = LocalRegisterCopy::<u64, PASID_DIR::Register>::new(self.0).read(PASID_DIR::RSVD);
        if v == 0 {
            return Vec::new();
        }
        alloc::vec![problem("PASID_DIR[11:2]", v, "reserved, must be zero")]
    }
}

impl fmt::Debug for PasidDirEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PasidDirEntry({:#018x})", self.0)
    }
}

/// Index of `pasid` in the PASID directory (PASID\[19:6\]) and in its PASID table
/// (PASID\[5:0\]); the PASID entry is 64 bytes (`VTD_PASID_ENTRY_SIZE`).
pub const fn pasid_indices(pasid: u32) -> (usize, usize) {
    (((pasid >> 6) & 0x3fff) as usize, (pasid & 0x3f) as usize)
}

/// Size of a scalable-mode PASID table entry in bytes.
pub const PASID_ENTRY_SIZE: usize = 64;

/// Invalidation descriptor types (bits 3:0, with bits 11:9 as type bits 6:4; Linux `QI_*_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvType {
    /// 1: context-cache invalidation.
    ContextCache,
    /// 2: IOTLB invalidation (second stage, requests without PASID).
    Iotlb,
    /// 3: device-TLB invalidation.
    DeviceTlb,
    /// 4: interrupt-entry-cache invalidation.
    InterruptEntryCache,
    /// 5: invalidation wait.
    Wait,
    /// 6: PASID-based IOTLB invalidation (first stage, and any PASID).
    PasidIotlb,
    /// 7: PASID-cache invalidation.
    PasidCache,
    /// 8: PASID-based device-TLB invalidation.
    PasidDeviceTlb,
    /// 9: page-group response.
    PageGroupResponse,
}

impl InvType {
    /// The type code.
    pub const fn code(self) -> u8 {
        match self {
            InvType::ContextCache => 1,
            InvType::Iotlb => 2,
            InvType::DeviceTlb => 3,
            InvType::InterruptEntryCache => 4,
            InvType::Wait => 5,
            InvType::PasidIotlb => 6,
            InvType::PasidCache => 7,
            InvType::PasidDeviceTlb => 8,
            InvType::PageGroupResponse => 9,
        }
    }
}

impl TryFrom<u8> for InvType {
    type Error = Error;
    fn try_from(code: u8) -> Result<Self, Error> {
        Ok(match code {
            1 => InvType::ContextCache,
            2 => InvType::Iotlb,
            3 => InvType::DeviceTlb,
            4 => InvType::InterruptEntryCache,
            5 => InvType::Wait,
            6 => InvType::PasidIotlb,
            7 => InvType::PasidCache,
            8 => InvType::PasidDeviceTlb,
            9 => InvType::PageGroupResponse,
            _ => {
                return Err(decode_err(
                    "invalidation descriptor",
                    "INV.Type",
                    u64::from(code),
                    "unknown descriptor type",
                ));
            }
        })
    }
}

/// What a context-cache invalidation covers (G, bits 5:4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextScope {
    /// G = 1: every context entry.
    Global,
    /// G = 2: entries of one domain.
    Domain(u16),
    /// G = 3: one device (source ID, function mask) in a domain.
    Device {
        /// Domain ID.
        did: u16,
        /// Source ID (bus << 8 | devfn).
        sid: u16,
        /// Function mask (low bits of the function number ignored).
        fm: u8,
    },
}

/// What an IOTLB invalidation (type 2) covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbScope {
    /// G = 1: everything.
    Global,
    /// G = 2: one domain.
    Domain(u16),
    /// G = 3: 2^`am` pages at `addr` in a domain.
    Pages {
        /// Domain ID.
        did: u16,
        /// Address (aligned to 4 KiB << `am`).
        addr: u64,
        /// Address mask.
        am: u8,
        /// Invalidation hint: only leaves changed.
        ih: bool,
    },
}

/// What a PASID-based IOTLB invalidation (type 6) covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasidIotlbScope {
    /// G = 2: every non-global entry of a PASID in a domain (`QI_GRAN_NONG_PASID`).
    Pasid {
        /// Domain ID.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// G = 3: 2^`am` pages at `addr` of a PASID in a domain (`QI_GRAN_PSI_PASID`).
    Pages {
        /// Domain ID.
        did: u16,
        /// PASID.
        pasid: u32,
        /// Address (aligned to 4 KiB << `am`).
        addr: u64,
        /// Address mask.
        am: u8,
        /// Invalidation hint: only leaves changed.
        ih: bool,
    },
}

/// What a PASID-cache invalidation (type 7) covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasidCacheScope {
    /// G = 0: every PASID of a domain (`QI_PC_ALL_PASIDS`).
    Domain(u16),
    /// G = 1: one PASID of a domain (`QI_PC_PASID_SEL`).
    Pasid {
        /// Domain ID.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// G = 3: everything (`QI_PC_GLOBAL`).
    Global,
}

/// A decoded invalidation descriptor of the types this module builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Type 1.
    ContextCache(ContextScope),
    /// Type 2 (drain reads/writes as requested).
    Iotlb {
        /// Scope.
        scope: IotlbScope,
        /// Drain reads.
        drain_reads: bool,
        /// Drain writes.
        drain_writes: bool,
    },
    /// Type 5.
    Wait {
        /// Status write: (address, data).
        status: Option<(u64, u32)>,
        /// Raise the invalidation-completion interrupt.
        interrupt: bool,
        /// Fence: later descriptors wait for this one.
        fence: bool,
        /// Page-request drain.
        page_drain: bool,
    },
    /// Type 6.
    PasidIotlb(PasidIotlbScope),
    /// Type 7.
    PasidCache(PasidCacheScope),
}

/// An invalidation descriptor (256 bits; a 128-bit queue uses the first two words).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InvDesc {
    words: [u64; 4],
}

const INV_WHAT: &str = "invalidation descriptor";

impl InvDesc {
    /// Size of a 256-bit descriptor in bytes.
    pub const SIZE: usize = 32;

    /// Wrap raw words.
    pub const fn from_words(words: [u64; 4]) -> Self {
        InvDesc { words }
    }

    /// Read a 256-bit descriptor from little-endian bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        Ok(InvDesc {
            words: words_from_bytes::<4>(INV_WHAT, bytes)?,
        })
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 4] {
        self.words
    }

    /// Little-endian bytes of the 256-bit descriptor.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, w) in self.words.iter().enumerate() {
            b[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    fn w0(ty: InvType, g: u64) -> LocalRegisterCopy<u64, INV0::Register> {
        let code = u64::from(ty.code());
        let mut r = LocalRegisterCopy::<u64, INV0::Register>::new(0);
        r.modify(INV0::TYPE_LO.val(code & 0xf) + INV0::TYPE_HI.val(code >> 4) + INV0::G.val(g));
        r
    }

    fn addr_word(addr: u64, am: u8, ih: bool) -> Result<u64, Error> {
        if am > 63 - 12 {
            return Err(Error::Config("address mask beyond the address width"));
        }
        let align = 4096u64 << am;
        if !addr.is_multiple_of(align) {
            return Err(Error::Unaligned {
                what: "invalidation address",
                value: addr,
                align,
            });
        }
        let mut r = LocalRegisterCopy::<u64, INV1_ADDR::Register>::new(0);
        r.modify(
            INV1_ADDR::ADDR.val(addr >> 12)
                + INV1_ADDR::AM.val(u64::from(am))
                + INV1_ADDR::IH.val(u64::from(ih)),
        );
        Ok(r.get())
    }

    fn check_pasid(pasid: u32) -> Result<(), Error> {
        if pasid >= 1 << 20 {
            return Err(Error::Config("a PASID is 20 bits"));
        }
        Ok(())
    }

    /// Context-cache invalidation (type 1).
    pub fn context_cache(scope: ContextScope) -> Result<Self, Error> {
        let w0 = match scope {
            ContextScope::Global => Self::w0(InvType::ContextCache, 1),
            ContextScope::Domain(did) => {
                let mut r = Self::w0(InvType::ContextCache, 2);
                r.modify(INV0::DID.val(u64::from(did)));
                r
            }
            ContextScope::Device { did, sid, fm } => {
                if fm > 3 {
                    return Err(Error::Config("context-cache function mask is 2 bits"));
                }
                let mut r = Self::w0(InvType::ContextCache, 3);
                r.modify(
                    INV0::DID.val(u64::from(did))
                        + INV0::SID.val(u64::from(sid))
                        + INV0::FM.val(u64::from(fm)),
                );
                r
            }
        };
        Ok(InvDesc {
            words: [w0.get(), 0, 0, 0],
        })
    }

    /// IOTLB invalidation (type 2); `drain` sets DR and DW (Linux sets them when CAP.DRD /
    /// CAP.DWD report draining, `qi_flush_iotlb`).
    pub fn iotlb(scope: IotlbScope, drain: bool) -> Result<Self, Error> {
        let (w0, w1) = match scope {
            IotlbScope::Global => (Self::w0(InvType::Iotlb, 1), 0),
            IotlbScope::Domain(did) => {
                let mut r = Self::w0(InvType::Iotlb, 2);
                r.modify(INV0::DID.val(u64::from(did)));
                (r, 0)
            }
            IotlbScope::Pages { did, addr, am, ih } => {
                let mut r = Self::w0(InvType::Iotlb, 3);
                r.modify(INV0::DID.val(u64::from(did)));
                (r, Self::addr_word(addr, am, ih)?)
            }
        };
        let mut w0 = w0;
        w0.modify(INV0::DW_FN.val(u64::from(drain)) + INV0::DR_PD.val(u64::from(drain)));
        Ok(InvDesc {
            words: [w0.get(), w1, 0, 0],
        })
    }

    /// PASID-based IOTLB invalidation (type 6): what a first-stage table needs after cleaning
    /// or changing entries.
    pub fn pasid_iotlb(scope: PasidIotlbScope) -> Result<Self, Error> {
        let (g, did, pasid, w1) = match scope {
            PasidIotlbScope::Pasid { did, pasid } => (2, did, pasid, 0),
            PasidIotlbScope::Pages {
                did,
                pasid,
                addr,
                am,
                ih,
            } => (3, did, pasid, Self::addr_word(addr, am, ih)?),
        };
        Self::check_pasid(pasid)?;
        let mut r = Self::w0(InvType::PasidIotlb, g);
        r.modify(INV0::DID.val(u64::from(did)) + INV0::PASID.val(u64::from(pasid)));
        Ok(InvDesc {
            words: [r.get(), w1, 0, 0],
        })
    }

    /// PASID-cache invalidation (type 7).
    pub fn pasid_cache(scope: PasidCacheScope) -> Result<Self, Error> {
        let r = match scope {
            PasidCacheScope::Domain(did) => {
                let mut r = Self::w0(InvType::PasidCache, 0);
                r.modify(INV0::DID.val(u64::from(did)));
                r
            }
            PasidCacheScope::Pasid { did, pasid } => {
                Self::check_pasid(pasid)?;
                let mut r = Self::w0(InvType::PasidCache, 1);
                r.modify(INV0::DID.val(u64::from(did)) + INV0::PASID.val(u64::from(pasid)));
                r
            }
            PasidCacheScope::Global => Self::w0(InvType::PasidCache, 3),
        };
        Ok(InvDesc {
            words: [r.get(), 0, 0, 0],
        })
    }

    /// Invalidation wait (type 5): optionally write `data` to `addr` (4-byte aligned) when
    /// every earlier descriptor has completed; `fence` holds later descriptors back.
    pub fn wait(status: Option<(u64, u32)>, interrupt: bool, fence: bool) -> Result<Self, Error> {
        let mut r = Self::w0(InvType::Wait, 0);
        r.modify(INV0::DW_FN.val(u64::from(fence)));
        let mut w0 = r.get();
        if interrupt {
            w0 |= 1 << 4; // IF
        }
        let mut w1 = 0;
        if let Some((addr, data)) = status {
            if addr % 4 != 0 {
                return Err(Error::Unaligned {
                    what: "wait status address",
                    value: addr,
                    align: 4,
                });
            }
            w0 |= 1 << 5; // SW
            w0 |= u64::from(data) << 32;
            w1 = addr;
        }
        Ok(InvDesc {
            words: [w0, w1, 0, 0],
        })
    }

    /// The descriptor type.
    pub fn kind(&self) -> Result<InvType, Error> {
        let r = LocalRegisterCopy::<u64, INV0::Register>::new(self.words[0]);
        InvType::try_from((r.read(INV0::TYPE_LO) | (r.read(INV0::TYPE_HI) << 4)) as u8)
    }

    /// Decode a descriptor of the types this module builds (1, 2, 5, 6, 7). Errors name the
    /// field: an unknown or unsupported type, a reserved granularity, reserved bits set (bits
    /// 255:128 of a 256-bit descriptor are reserved for all five types).
    pub fn decode(&self) -> Result<Invalidation, Error> {
        let [w0, w1, w2, w3] = self.words;
        let r = LocalRegisterCopy::<u64, INV0::Register>::new(w0);
        let ty = self.kind()?;
        if w2 != 0 {
            return Err(decode_err(
                INV_WHAT,
                "INV[191:128]",
                w2,
                "reserved, must be zero",
            ));
        }
        if w3 != 0 {
            return Err(decode_err(
                INV_WHAT,
                "INV[255:192]",
                w3,
                "reserved, must be zero",
            ));
        }
        let rsvd = |mask0: u64, mask1: u64| -> Result<(), Error> {
            if w0 & mask0 != 0 {
                return Err(decode_err(
                    INV_WHAT,
                    "INV[63:0]",
                    w0 & mask0,
                    "reserved, must be zero",
                ));
            }
            if w1 & mask1 != 0 {
                return Err(decode_err(
                    INV_WHAT,
                    "INV[127:64]",
                    w1 & mask1,
                    "reserved, must be zero",
                ));
            }
            Ok(())
        };
        let g = r.read(INV0::G);
        let did = r.read(INV0::DID) as u16;
        let bad_g = || decode_err(INV_WHAT, "INV.G", g, "reserved granularity for this type");
        let addr = || {
            let a = LocalRegisterCopy::<u64, INV1_ADDR::Register>::new(w1);
            (
                a.read(INV1_ADDR::ADDR) << 12,
                a.read(INV1_ADDR::AM) as u8,
                a.is_set(INV1_ADDR::IH),
            )
        };
        match ty {
            InvType::ContextCache => {
                // QEMU VTD_INV_DESC_CC_RSVD without the type bits.
                rsvd(0xfffc_0000_0000_f1c0, u64::MAX)?;
                Ok(Invalidation::ContextCache(match g {
                    1 => ContextScope::Global,
                    2 => ContextScope::Domain(did),
                    3 => ContextScope::Device {
                        did,
                        sid: r.read(INV0::SID) as u16,
                        fm: r.read(INV0::FM) as u8,
                    },
                    _ => return Err(bad_g()),
                }))
            }
            InvType::Iotlb => {
                rsvd(0xffff_ffff_0000_f100, 0xf80)?;
                let (a, am, ih) = addr();
                let scope = match g {
                    1 => IotlbScope::Global,
                    2 => IotlbScope::Domain(did),
                    3 => IotlbScope::Pages {
                        did,
                        addr: a,
                        am,
                        ih,
                    },
                    _ => return Err(bad_g()),
                };
                if g != 3 && w1 != 0 {
                    return Err(decode_err(
                        INV_WHAT,
                        "INV[127:64]",
                        w1,
                        "address given for a global or domain invalidation",
                    ));
                }
                Ok(Invalidation::Iotlb {
                    scope,
                    drain_reads: r.is_set(INV0::DR_PD),
                    drain_writes: r.is_set(INV0::DW_FN),
                })
            }
            InvType::Wait => {
                rsvd(0xffff_f100, 0x3)?;
                let sw = w0 & (1 << 5) != 0;
                if !sw && (w1 != 0 || r.read(INV0::STATUS_DATA) != 0) {
                    return Err(decode_err(
                        INV_WHAT,
                        "INV.SW",
                        0,
                        "status address or data given without a status write",
                    ));
                }
                Ok(Invalidation::Wait {
                    status: sw.then(|| (w1, r.read(INV0::STATUS_DATA) as u32)),
                    interrupt: w0 & (1 << 4) != 0,
                    fence: r.is_set(INV0::DW_FN),
                    page_drain: r.is_set(INV0::DR_PD),
                })
            }
            InvType::PasidIotlb => {
                // QEMU VTD_INV_DESC_PIOTLB_RSVD_VAL0 / VAL1.
                rsvd(0xfff0_0000_0000_f1c0, 0xf80)?;
                let pasid = r.read(INV0::PASID) as u32;
                let (a, am, ih) = addr();
                Ok(Invalidation::PasidIotlb(match g {
                    2 if w1 == 0 => PasidIotlbScope::Pasid { did, pasid },
                    2 => {
                        return Err(decode_err(
                            INV_WHAT,
                            "INV[127:64]",
                            w1,
                            "address given for a PASID-wide invalidation",
                        ));
                    }
                    3 => PasidIotlbScope::Pages {
                        did,
                        pasid,
                        addr: a,
                        am,
                        ih,
                    },
                    _ => return Err(bad_g()),
                }))
            }
            InvType::PasidCache => {
                rsvd(0xfff0_0000_0000_f1c0, u64::MAX)?;
                let pasid = r.read(INV0::PASID) as u32;
                Ok(Invalidation::PasidCache(match g {
                    0 => PasidCacheScope::Domain(did),
                    1 => PasidCacheScope::Pasid { did, pasid },
                    3 => PasidCacheScope::Global,
                    _ => return Err(bad_g()),
                }))
            }
            other => Err(decode_err(
                INV_WHAT,
                "INV.Type",
                u64::from(other.code()),
                "descriptor type not decoded here",
            )),
        }
    }
}

impl fmt::Debug for InvDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Ok(d) => write!(f, "InvDesc({d:?})"),
            Err(_) => write!(f, "InvDesc({:#018x?})", self.words),
        }
    }
}

/// A fault reason code (bits 103:96 of a fault record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultReason(pub u8);

impl FaultReason {
    /// 0x71: the present bit of a first-stage paging entry is clear.
    pub const FS_NOT_PRESENT: FaultReason = FaultReason(0x71);
    /// 0x80: the first-stage input address is not canonical (beyond 2^(30 + 9·AW) on QEMU).
    pub const FS_NOT_CANONICAL: FaultReason = FaultReason(0x80);
    /// 0x81: U/S is 0 in a first-stage entry for a user-privilege request.
    pub const FS_USER_DENIED: FaultReason = FaultReason(0x81);
    /// 0x85: a write or atomic request to a page without write permission.
    pub const NO_WRITE: FaultReason = FaultReason(0x85);
    /// 0x86: a read or atomic request to a page without read permission.
    pub const NO_READ: FaultReason = FaultReason(0x86);
    /// 0x5b: the PASID table entry is invalid (QEMU 10.0 reports a 5-level FLPM this way).
    pub const PASID_ENTRY_INVALID: FaultReason = FaultReason(0x5b);

    /// What the code means, or `None` for a code this crate does not know (reported as
    /// unknown, never guessed). Wording is this crate's; the meanings are those of Linux 6.12
    /// `dmar.c`'s reason tables.
    pub fn description(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "root entry not present",
            0x02 => "context entry not present",
            0x03 => "context entry invalid",
            0x04 => "address beyond the guest address width",
            0x05 => "no write permission",
            0x06 => "no read permission",
            0x07 => "next-level table pointer invalid",
            0x08 => "root table address invalid",
            0x09 => "context table pointer invalid",
            0x0a => "reserved bits set in a root entry",
            0x0b => "reserved bits set in a context entry",
            0x0c => "reserved bits set in a paging entry",
            0x0d => "context entry blocks translation requests",
            0x20 => "interrupt request with reserved fields set",
            0x21 => "interrupt index beyond the remapping table",
            0x22 => "interrupt remapping entry not present",
            0x23 => "interrupt remapping table not accessible",
            0x24 => "reserved bits set in an interrupt remapping entry",
            0x25 => "compatibility-format interrupt blocked",
            0x26 => "interrupt blocked by source-ID verification",
            0x30 => "scalable mode: root table address invalid",
            0x31 => "scalable mode: TTM 0 for a request with PASID",
            0x32 => "scalable mode: TTM 0 for a page request",
            0x38 => "scalable mode: root entry not accessible",
            0x39 => "scalable mode: root entry not present",
            0x3a => "scalable mode: reserved bits set in a root entry",
            0x40 => "scalable mode: context entry not accessible",
            0x41 => "scalable mode: context entry not present",
            0x42 => "scalable mode: reserved bits set in a context entry",
            0x43 => "scalable mode: context entry invalid",
            0x44 => "scalable mode: DTE clear in the context entry",
            0x45 => "scalable mode: PASIDE clear in the context entry",
            0x46 => "scalable mode: PASID beyond the context entry's directory",
            0x47 => "scalable mode: PRE clear in the context entry",
            0x48 => "scalable mode: RID_PASID error in the context entry",
            0x50 => "scalable mode: PASID directory entry not accessible",
            0x51 => "scalable mode: PASID directory entry not present",
            0x52 => "scalable mode: reserved bits set in a PASID directory entry",
            0x58 => "scalable mode: PASID table entry not accessible",
            0x59 => "scalable mode: PASID table entry not present",
            0x5a => "scalable mode: reserved bits set in a PASID table entry",
            0x5b => "scalable mode: PASID table entry invalid",
            0x5c => "scalable mode: ERE clear in the PASID table entry",
            0x5d => "scalable mode: SRE clear in the PASID table entry",
            0x70 => "first stage: paging entry not accessible",
            0x71 => "first stage: paging entry not present",
            0x72 => "first stage: reserved bits set in a paging entry",
            0x73 => "first stage: PML4 entry not accessible",
            0x74 => "nested: first-stage entry address beyond the second stage's range",
            0x75 => "nested: no read permission for a first-stage PML4 entry",
            0x76 => "nested: no read permission for a first-stage paging entry",
            0x77 => "nested: no write permission for a first-stage paging entry",
            0x78 => "second stage: paging entry not accessible",
            0x79 => "second stage: read/write permission error",
            0x7a => "second stage: reserved bits set in a paging entry",
            0x7b => "second stage: table pointer invalid",
            0x7c => "second stage: A/D update needed with no-snoop paging",
            0x80 => "first stage: input address not canonical",
            0x81 => "first stage: U/S is 0 for a user-privilege request",
            0x82 => "no execute permission for a request with PASID and ER = 1",
            0x83 => "address beyond the remapping hardware's limit",
            0x84 => "second stage: entry address beyond the limit",
            0x85 => "no write permission for a write or atomic request",
            0x86 => "no read permission for a read or atomic request",
            0x87 => "address in the interrupt range",
            0x90 => "first stage: A/D update needed with no-snoop paging",
            _ => return None,
        })
    }

    /// Whether [`description`](Self::description) knows the code.
    pub fn is_known(self) -> bool {
        self.description().is_some()
    }

    /// Interrupt-remapping reasons (0x20..0x2f): the record's address bits 63:48 hold the
    /// interrupt index instead of a page address.
    pub fn is_interrupt_remapping(self) -> bool {
        (0x20..0x30).contains(&self.0)
    }
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.description() {
            Some(d) => write!(f, "{:#04x} ({d})", self.0),
            None => write!(f, "{:#04x} (unknown fault reason)", self.0),
        }
    }
}

/// Whether the faulting request read or wrote (T, bit 126: 1 = read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultAccess {
    /// T = 0.
    Write,
    /// T = 1.
    Read,
}

/// A decoded fault-recording register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    /// Fault reason.
    pub reason: FaultReason,
    /// Read or write (bit 126).
    pub access: FaultAccess,
    /// Source ID of the request (bus << 8 | devfn).
    pub source_id: u16,
    /// The request's PASID, when PP (bit 95) is set.
    pub pasid: Option<u32>,
    /// FI: the page address (bits 63:12 of the faulting address); for interrupt-remapping
    /// reasons the interrupt index is in bits 63:48.
    pub address: u64,
    /// EXE, PRIV and T2 (bits 94, 93, 92) as raw bits, `[exe, priv, t2]`.
    pub request_attrs: [bool; 3],
    /// AT (bits 125:124), address type of the request.
    pub address_type: u8,
}

const FRCD_WHAT: &str = "fault record";

impl FaultRecord {
    /// Decode a fault record from its two words (bits 63:0, 127:64). Errors name the field: F
    /// clear (no fault recorded), reserved bits set (11:0, 91:80), or a PASID value without PP.
    pub fn from_words(words: [u64; 2]) -> Result<Self, Error> {
        let lo = LocalRegisterCopy::<u64, FRCD_LO::Register>::new(words[0]);
        let hi = LocalRegisterCopy::<u64, FRCD_HI::Register>::new(words[1]);
        if !hi.is_set(FRCD_HI::F) {
            return Err(decode_err(
                FRCD_WHAT,
                "FRCD.F",
                0,
                "clear: no fault is recorded",
            ));
        }
        if lo.read(FRCD_LO::RSVD) != 0 {
            return Err(decode_err(
                FRCD_WHAT,
                "FRCD[11:0]",
                lo.read(FRCD_LO::RSVD),
                "reserved, must be zero",
            ));
        }
        if hi.read(FRCD_HI::RSVD) != 0 {
            return Err(decode_err(
                FRCD_WHAT,
                "FRCD[91:80]",
                hi.read(FRCD_HI::RSVD),
                "reserved, must be zero",
            ));
        }
        // PV means something only with PP set; without it the field is left as the unit
        // pleases (QEMU 10.0 in legacy mode writes all ones there: the rig's vtd-fw-legacy
        // profile), so it is ignored rather than refused.
        let pp = hi.is_set(FRCD_HI::PP);
        let pv = hi.read(FRCD_HI::PV) as u32;
        Ok(FaultRecord {
            reason: FaultReason(hi.read(FRCD_HI::FR) as u8),
            access: if hi.is_set(FRCD_HI::T) {
                FaultAccess::Read
            } else {
                FaultAccess::Write
            },
            source_id: hi.read(FRCD_HI::SID) as u16,
            pasid: pp.then_some(pv),
            address: lo.read(FRCD_LO::FI) << 12,
            request_attrs: [
                hi.is_set(FRCD_HI::EXE),
                hi.is_set(FRCD_HI::PRIV),
                hi.is_set(FRCD_HI::T2),
            ],
            address_type: hi.read(FRCD_HI::AT) as u8,
        })
    }

    /// Decode from the register's 16 little-endian bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        Self::from_words(words_from_bytes::<2>(FRCD_WHAT, bytes)?)
    }

    /// Encode (for tests and emulators): the record with F set.
    pub fn to_words(&self) -> [u64; 2] {
        let mut lo = LocalRegisterCopy::<u64, FRCD_LO::Register>::new(0);
        lo.modify(FRCD_LO::FI.val(self.address >> 12));
        let mut hi = LocalRegisterCopy::<u64, FRCD_HI::Register>::new(0);
        hi.modify(
            FRCD_HI::F::SET
                + FRCD_HI::T.val(u64::from(self.access == FaultAccess::Read))
                + FRCD_HI::FR.val(u64::from(self.reason.0))
                + FRCD_HI::SID.val(u64::from(self.source_id))
                + FRCD_HI::PP.val(u64::from(self.pasid.is_some()))
                + FRCD_HI::PV.val(u64::from(self.pasid.unwrap_or(0) & 0xf_ffff))
                + FRCD_HI::EXE.val(u64::from(self.request_attrs[0]))
                + FRCD_HI::PRIV.val(u64::from(self.request_attrs[1]))
                + FRCD_HI::T2.val(u64::from(self.request_attrs[2]))
                + FRCD_HI::AT.val(u64::from(self.address_type & 3)),
        );
        [lo.get(), hi.get()]
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} by {:02x}:{:02x}.{} at {:#x}",
            match self.access {
                FaultAccess::Read => "read",
                FaultAccess::Write => "write",
            },
            self.source_id >> 8,
            (self.source_id >> 3) & 0x1f,
            self.source_id & 7,
            self.address
        )?;
        if let Some(p) = self.pasid {
            write!(f, " PASID {p:#x}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_linux() {
        // DMAR_*_REG in Linux 6.12 intel/iommu.h.
        let want = [
            (Reg::Ver, 0x00),
            (Reg::Cap, 0x08),
            (Reg::Ecap, 0x10),
            (Reg::Gcmd, 0x18),
            (Reg::Gsts, 0x1c),
            (Reg::Rtaddr, 0x20),
            (Reg::Ccmd, 0x28),
            (Reg::Fsts, 0x34),
            (Reg::Fectl, 0x38),
            (Reg::Iqh, 0x80),
            (Reg::Iqt, 0x88),
            (Reg::Iqa, 0x90),
            (Reg::Ics, 0x9c),
        ];
        for (r, off) in want {
            assert_eq!(r.offset(), off, "{r:?}");
        }
        assert_eq!(offset_of!(VtdRegisters, irta), 0xb8);
        assert_eq!(core::mem::size_of::<VtdRegisters>(), 0xc0);
        assert_eq!(offset_of!(IotlbRegisters, iotlb), 8);
    }

    #[test]
    fn gcmd_repeats_persistent_enables() {
        // GSTS 0xc4000000 = TES | RTPS | QIES after the recipe's sequence.
        let gsts = 0xc400_0000;
        assert_eq!(
            gcmd_value(gsts, GlobalCommand::Translation(true)),
            0x8400_0000
        );
        assert_eq!(
            gcmd_value(gsts, GlobalCommand::SetRootTablePointer),
            0xc400_0000
        );
        assert_eq!(
            gcmd_value(gsts, GlobalCommand::QueuedInvalidation(false)),
            0x8000_0000
        );
        assert_eq!(
            gcmd_value(0, GlobalCommand::QueuedInvalidation(true)),
            1 << 26
        );
        assert_eq!(
            gcmd_value(0x4000_0000, GlobalCommand::WriteBufferFlush),
            1 << 27
        );
    }
}
