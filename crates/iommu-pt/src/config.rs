//! Per-device translation contexts and the bits that switch hardware dirty tracking on.
//!
//! ```text
//!  AMD-Vi  Device Table Entry (256 bits)      word0: V(0) TV(1) HAD(8:7) Mode(11:9) Root(51:12)
//!                                                    GIOV(54) GV(55) GLX(57:56) GCR3[14:12](60:58)
//!                                             word1: DomainID(15:0) GCR3[30:15](31:16) I(32)
//!                                                    GCR3[51:31](63:43)
//!                                             word2: GuestPagingMode(55:54)
//!  VT-d    scalable-mode PASID entry (512b)   val0:  P(0) FPD(1) AW(4:2) PGTT(8:6) SSADE(9) SSPTPTR(63:12)
//!                                             val1:  DID(15:0) PWSNP(23) PGSNP(24)
//!                                             val2:  SRE(0) FLPM(3:2) WPE(4) EAFE(7) FLPTPTR(63:12)
//!  SMMUv3  Context Descriptor (512 bits)      word0: T0SZ(5:0) TG0(7:6) V(31) IPS(34:32) AA64(41) HD(42) HA(43) ASID(63:48)
//!                                             word1: TTB0(51:4)
//!          Stream Table Entry (512 bits)      word0: V(0) Config(3:1) S1ContextPtr(51:6)
//!                                             word2: S2VMID(15:0) VTCR(50:32) S2AA64(51) S2HD(55) S2HA(56)
//!                                             word3: S2TTB(51:4)
//! ```
//!
//! Every type holds the raw little-endian words, decodes any value without panicking, and its
//! `with_*` methods change only the named field. [`problems`](AmdDte::problems) lists every
//! reserved encoding or must-be-zero bit that is set.
//!
//! Sources: AMD-Vi — Linux 6.12 `drivers/iommu/amd/amd_iommu_types.h` (`DTE_FLAG_V`,
//! `DTE_FLAG_TV`, `DTE_FLAG_HAD` = 3 << 7, `DEV_ENTRY_MODE_SHIFT` = 9, `DTE_FLAG_IR`/`IW`,
//! `DEV_DOMID_MASK`, `DTE_FLAG_GIOV`, `DTE_FLAG_GV`, `DTE_GLX_SHIFT`, `DTE_GCR3_VAL_*` and
//! `DTE_GCR3_SHIFT_*`, `DTE_GPT_LEVEL_SHIFT`, `DTE_FLAG_IOTLB`, `GCR3_VALID`; their use in
//! `amd/iommu.c` `set_dte_entry` and `update_gcr3`). Reserved bits 6:2 and the HAD encodings other than 0b11 (0b01 access bits
//! only, 0b10 reserved) are from the AMD I/O Virtualization Technology (IOMMU) specification
//! (pub. 48882) DTE layout as this crate's authors recalled it: **unverified here** (no copy of
//! that specification was available; its Device Table Entry field table would settle it). Linux
//! 6.12 only ever writes 0b00 or 0b11 (`DTE_FLAG_HAD`). VT-d — `drivers/iommu/intel/pasid.h` (`pasid_set_*`: present bit 0, FPD bit 1, AW
//! bits 4:2, PGTT bits 8:6 with `PASID_ENTRY_PGTT_*`, SSADE bit 9, SSPTPTR bits 63:12, DID bits
//! 15:0 of val\[1\], PWSNP bit 87, PGSNP bit 88). SMMUv3 — `drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h`
//! (`CTXDESC_CD_0_*`, `CTXDESC_CD_1_TTB0_MASK`, `STRTAB_STE_0_*`, `STRTAB_STE_2_*`,
//! `STRTAB_STE_3_S2TTB_MASK`); STE.S2HD/S2HA (bits 183/184, i.e. word 2 bits 55/56) are not in
//! Linux 6.12 and come from the SMMUv3 specification (Arm IHI 0070 G.b) §5.2 "STE, Stream Table
//! Entry" (fields S2HD, bit \[183\] and S2HA, bit \[184\]), which also gives the {S2HA, S2HD}
//! encodings (0b10 access flag only, 0b01 reserved); the {HD, HA} encodings (0b01 access flag
//! only, 0b10 reserved) are in §5.4 "CD, Context Descriptor" (field HA, bit \[43\]). Both say a
//! reserved encoding behaves as both bits 0 *if the HD (S2HD) bit is not ILLEGAL*; HD is ILLEGAL
//! when `SMMU_IDR0.HTTU` is below 0b10, and such a CD or STE is rejected (C_BAD_CD / C_BAD_STE)
//! rather than treated as disabled, which this crate does not model.

use alloc::vec::Vec;
use core::fmt;

use tock_registers::LocalRegisterCopy;

/// Register layouts of the context structures (tock-registers).
///
/// As in [`crate::caps::regs`], the generated marker types and per-field constants carry no
/// documentation of their own.
#[allow(missing_docs)]
pub mod regs {
    use tock_registers::register_bitfields;

    register_bitfields![u64,
        /// AMD-Vi DTE bits 63:0.
        pub AMD_DTE0 [
            /// Valid.
            V OFFSET(0) NUMBITS(1) [],
            /// Translation information valid.
            TV OFFSET(1) NUMBITS(1) [],
            /// Reserved, must be zero.
            RSVD OFFSET(2) NUMBITS(5) [],
            /// Host access/dirty update control.
            HAD OFFSET(7) NUMBITS(2) [],
            /// Paging mode: number of host page-table levels (0 = no translation).
            MODE OFFSET(9) NUMBITS(3) [],
            /// Host page-table root pointer, bits 51:12.
            ROOT OFFSET(12) NUMBITS(40) [],
            /// Peripheral page requests enabled.
            PPR OFFSET(52) NUMBITS(1) [],
            /// Guest I/O protection valid.
            GIOV OFFSET(54) NUMBITS(1) [],
            /// Guest translation valid.
            GV OFFSET(55) NUMBITS(1) [],
            /// Guest CR3 table levels minus one: 0 = one level, 1 = two levels (`DTE_GLX_SHIFT`).
            GLX OFFSET(56) NUMBITS(2) [],
            /// GCR3 table root bits 14:12 (`DTE_GCR3_SHIFT_A`).
            GCR3_A OFFSET(58) NUMBITS(3) [],
            /// I/O read permission.
            IR OFFSET(61) NUMBITS(1) [],
            /// I/O write permission.
            IW OFFSET(62) NUMBITS(1) []
        ],
        /// AMD-Vi DTE bits 127:64.
        pub AMD_DTE1 [
            /// Domain ID.
            DOMAIN_ID OFFSET(0) NUMBITS(16) [],
            /// GCR3 table root bits 30:15 (`DTE_GCR3_SHIFT_B`).
            GCR3_B OFFSET(16) NUMBITS(16) [],
            /// IOTLB (ATS) enable (`DTE_FLAG_IOTLB`).
            I OFFSET(32) NUMBITS(1) [],
            /// GCR3 table root bits 51:31 (`DTE_GCR3_SHIFT_C`).
            GCR3_C OFFSET(43) NUMBITS(21) []
        ],
        /// AMD-Vi DTE bits 191:128.
        pub AMD_DTE2 [
            /// Guest paging mode: 0 = 4-level, 1 = 5-level guest tables (`DTE_GPT_LEVEL_SHIFT`).
            GPM OFFSET(54) NUMBITS(2) []
        ],
        /// VT-d scalable-mode PASID table entry bits 63:0.
        pub VTD_PASID0 [
            /// Present.
            P OFFSET(0) NUMBITS(1) [],
            /// Fault processing disable.
            FPD OFFSET(1) NUMBITS(1) [],
            /// Second-stage address width: 1 = 39-bit, 2 = 48-bit, 3 = 57-bit.
            AW OFFSET(2) NUMBITS(3) [],
            /// PASID-granular translation type.
            PGTT OFFSET(6) NUMBITS(3) [
                FirstStage = 1,
                SecondStage = 2,
                Nested = 3,
                PassThrough = 4
            ],
            /// Second-stage accessed/dirty enable (Linux: `pasid_set_ssade`).
            SSADE OFFSET(9) NUMBITS(1) [],
            /// Second-stage page-table pointer, bits 63:12.
            SSPTPTR OFFSET(12) NUMBITS(52) []
        ],
        /// VT-d scalable-mode PASID table entry bits 127:64.
        pub VTD_PASID1 [
            /// Domain ID.
            DID OFFSET(0) NUMBITS(16) [],
            /// Page-walk snoop.
            PWSNP OFFSET(23) NUMBITS(1) [],
            /// Page snoop.
            PGSNP OFFSET(24) NUMBITS(1) []
        ],
        /// VT-d scalable-mode PASID table entry bits 191:128 (`pasid_set_sre`, `pasid_set_flpm`,
        /// `pasid_set_wpe`, `pasid_set_eafe`, `pasid_set_flptr` in Linux 6.12 `intel/pasid.h`).
        pub VTD_PASID2 [
            /// Supervisor request enable: privileged requests with PASID may use the first
            /// stage.
            SRE OFFSET(0) NUMBITS(1) [],
            /// First-stage paging mode: 0 = 4-level, 1 = 5-level (CAP.FS5LP); 2, 3 reserved.
            FLPM OFFSET(2) NUMBITS(2) [
                FourLevel = 0,
                FiveLevel = 1
            ],
            /// Write protect enable for supervisor requests.
            WPE OFFSET(4) NUMBITS(1) [],
            /// Extended accessed flag enable (ECAP.EAFS).
            EAFE OFFSET(7) NUMBITS(1) [],
            /// First-stage page-table pointer, bits 63:12.
            FLPTPTR OFFSET(12) NUMBITS(52) []
        ],
        /// SMMUv3 CD bits 63:0.
        pub SMMU_CD0 [
            /// Input address size is 64 - T0SZ.
            T0SZ OFFSET(0) NUMBITS(6) [],
            /// TTB0 granule: 0 = 4 KiB.
            TG0 OFFSET(6) NUMBITS(2) [],
            /// TTB0 walks disabled.
            EPD0 OFFSET(14) NUMBITS(1) [],
            /// Big-endian tables.
            ENDI OFFSET(15) NUMBITS(1) [],
            /// TTB1 walks disabled.
            EPD1 OFFSET(30) NUMBITS(1) [],
            /// Valid.
            V OFFSET(31) NUMBITS(1) [],
            /// Intermediate physical address size.
            IPS OFFSET(32) NUMBITS(3) [],
            /// AArch64 tables.
            AA64 OFFSET(41) NUMBITS(1) [],
            /// HTTU dirty state update.
            HD OFFSET(42) NUMBITS(1) [],
            /// HTTU access flag update.
            HA OFFSET(43) NUMBITS(1) [],
            /// Address space ID.
            ASID OFFSET(48) NUMBITS(16) []
        ],
        /// SMMUv3 CD bits 127:64.
        pub SMMU_CD1 [
            /// Translation table base 0, bits 51:4.
            TTB0 OFFSET(4) NUMBITS(48) []
        ],
        /// SMMUv3 STE bits 63:0.
        pub SMMU_STE0 [
            /// Valid.
            V OFFSET(0) NUMBITS(1) [],
            /// Stream configuration.
            CONFIG OFFSET(1) NUMBITS(3) [
                Abort = 0,
                Bypass = 4,
                Stage1 = 5,
                Stage2 = 6,
                Nested = 7
            ],
            /// Context-descriptor table format.
            S1FMT OFFSET(4) NUMBITS(2) [],
            /// Context-descriptor table pointer, bits 51:6.
            S1CTXPTR OFFSET(6) NUMBITS(46) [],
            /// log2 of the number of CDs.
            S1CDMAX OFFSET(59) NUMBITS(5) []
        ],
        /// SMMUv3 STE bits 191:128.
        pub SMMU_STE2 [
            /// Stage-2 VMID.
            S2VMID OFFSET(0) NUMBITS(16) [],
            /// Input size is 64 - S2T0SZ.
            S2T0SZ OFFSET(32) NUMBITS(6) [],
            /// Stage-2 starting level.
            S2SL0 OFFSET(38) NUMBITS(2) [],
            /// Stage-2 granule: 0 = 4 KiB.
            S2TG OFFSET(46) NUMBITS(2) [],
            /// Stage-2 physical address size.
            S2PS OFFSET(48) NUMBITS(3) [],
            /// AArch64 stage-2 tables.
            S2AA64 OFFSET(51) NUMBITS(1) [],
            /// Big-endian stage-2 tables.
            S2ENDI OFFSET(52) NUMBITS(1) [],
            /// Protected table walk.
            S2PTW OFFSET(54) NUMBITS(1) [],
            /// Stage-2 HTTU dirty state update (SMMUv3 spec: STE bit 183).
            S2HD OFFSET(55) NUMBITS(1) [],
            /// Stage-2 HTTU access flag update (SMMUv3 spec: STE bit 184).
            S2HA OFFSET(56) NUMBITS(1) [],
            /// Stage-2 fault stall.
            S2S OFFSET(57) NUMBITS(1) [],
            /// Stage-2 fault record.
            S2R OFFSET(58) NUMBITS(1) []
        ],
        /// SMMUv3 STE bits 255:192.
        pub SMMU_STE3 [
            /// Stage-2 translation table base, bits 51:4.
            S2TTB OFFSET(4) NUMBITS(48) []
        ]
    ];
}

use regs::{
    AMD_DTE0, AMD_DTE1, AMD_DTE2, SMMU_CD0, SMMU_CD1, SMMU_STE0, SMMU_STE2, SMMU_STE3, VTD_PASID0,
    VTD_PASID1, VTD_PASID2,
};

/// A reserved encoding or must-be-zero bit found in a context structure or page-table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field, e.g. `"DTE[6:2]"`.
    pub field: &'static str,
    /// The value found.
    pub value: u64,
    /// The rule it breaks.
    pub rule: &'static str,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {:#x}: {}", self.field, self.value, self.rule)
    }
}

/// What a context tells the IOMMU to do with the accessed/dirty state of its page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdUpdate {
    /// The IOMMU sets accessed flags.
    pub access: bool,
    /// The IOMMU records writes (dirty state).
    pub dirty: bool,
}

/// AMD-Vi Device Table Entry (four little-endian 64-bit words).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AmdDte {
    words: [u64; 4],
}

impl AmdDte {
    /// Wrap raw DTE words.
    pub const fn from_words(words: [u64; 4]) -> Self {
        AmdDte { words }
    }

    /// A valid, translating DTE for a v1 host page table: root, number of levels (1..=6),
    /// domain ID, read and write permission; HAD = 0.
    pub fn translated(root: u64, levels: u8, domain_id: u16) -> Self {
        let mut w0 = LocalRegisterCopy::<u64, AMD_DTE0::Register>::new(0);
        w0.modify(
            AMD_DTE0::V::SET
                + AMD_DTE0::TV::SET
                + AMD_DTE0::MODE.val(u64::from(levels & 7))
                + AMD_DTE0::ROOT.val(root >> 12)
                + AMD_DTE0::IR::SET
                + AMD_DTE0::IW::SET,
        );
        AmdDte {
            words: [w0.get(), u64::from(domain_id), 0, 0],
        }
    }

    /// Point the DTE at a GCR3 table (`glx` = 0 for one level, 1 for two) whose entries
    /// ([`amd_gcr3_entry`]) hold the roots of x86-64 guest (v2) tables with `levels` levels (4
    /// or 5); sets GV, and GIOV when requests without PASID should use PASID 0's table (as
    /// Linux does for its v2 page-table mode, `set_dte_entry`). Leaves the host-table fields as
    /// they were.
    pub fn with_guest_tables(
        mut self,
        gcr3_table: u64,
        glx: u8,
        levels: u8,
        giov: bool,
    ) -> Result<Self, crate::Error> {
        if gcr3_table & 0xfff != 0 || gcr3_table >> 52 != 0 {
            return Err(crate::Error::Unaligned {
                what: "GCR3 table address",
                value: gcr3_table,
                align: 4096,
            });
        }
        if glx > 1 || !matches!(levels, 4 | 5) {
            return Err(crate::Error::Config(
                "GLX is 0 or 1 and guest tables have 4 or 5 levels",
            ));
        }
        let mut w0 = self.w0();
        w0.modify(
            AMD_DTE0::GV::SET
                + AMD_DTE0::GIOV.val(u64::from(giov))
                + AMD_DTE0::GLX.val(u64::from(glx))
                + AMD_DTE0::GCR3_A.val((gcr3_table >> 12) & 0x7),
        );
        let mut w1 = LocalRegisterCopy::<u64, AMD_DTE1::Register>::new(self.words[1]);
        w1.modify(
            AMD_DTE1::GCR3_B.val((gcr3_table >> 15) & 0xffff)
                + AMD_DTE1::GCR3_C.val((gcr3_table >> 31) & 0x1f_ffff),
        );
        let mut w2 = LocalRegisterCopy::<u64, AMD_DTE2::Register>::new(self.words[2]);
        w2.modify(AMD_DTE2::GPM.val(u64::from(levels == 5)));
        self.words[0] = w0.get();
        self.words[1] = w1.get();
        self.words[2] = w2.get();
        Ok(self)
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 4] {
        self.words
    }

    fn w0(&self) -> LocalRegisterCopy<u64, AMD_DTE0::Register> {
        LocalRegisterCopy::new(self.words[0])
    }

    /// DTE.GV: guest (v2) translation valid.
    pub fn guest_translation(&self) -> bool {
        self.w0().is_set(AMD_DTE0::GV)
    }

    /// DTE.GIOV.
    pub fn guest_io_protection(&self) -> bool {
        self.w0().is_set(AMD_DTE0::GIOV)
    }

    /// DTE.GLX: GCR3 table levels minus one.
    pub fn glx(&self) -> u8 {
        self.w0().read(AMD_DTE0::GLX) as u8
    }

    /// The GCR3 table root, reassembled from its three fields.
    pub fn gcr3_table(&self) -> u64 {
        let w1 = LocalRegisterCopy::<u64, AMD_DTE1::Register>::new(self.words[1]);
        (self.w0().read(AMD_DTE0::GCR3_A) << 12)
            | (w1.read(AMD_DTE1::GCR3_B) << 15)
            | (w1.read(AMD_DTE1::GCR3_C) << 31)
    }

    /// Guest table levels from the guest paging mode: 4, 5, or `None` for a reserved value.
    pub fn guest_levels(&self) -> Option<u8> {
        match LocalRegisterCopy::<u64, AMD_DTE2::Register>::new(self.words[2]).read(AMD_DTE2::GPM) {
            0 => Some(4),
            1 => Some(5),
            _ => None,
        }
    }

    /// DTE.I: device IOTLB (ATS) enabled.
    pub fn iotlb_enabled(&self) -> bool {
        LocalRegisterCopy::<u64, AMD_DTE1::Register>::new(self.words[1]).is_set(AMD_DTE1::I)
    }

    /// DTE.V.
    pub fn valid(&self) -> bool {
        self.w0().is_set(AMD_DTE0::V)
    }

    /// DTE.TV.
    pub fn translation_valid(&self) -> bool {
        self.w0().is_set(AMD_DTE0::TV)
    }

    /// DTE.Mode: host page-table levels (0 = untranslated, 7 = reserved).
    pub fn mode(&self) -> u8 {
        self.w0().read(AMD_DTE0::MODE) as u8
    }

    /// Host page-table root (physical address).
    pub fn root(&self) -> u64 {
        self.w0().read(AMD_DTE0::ROOT) << 12
    }

    /// Domain ID.
    pub fn domain_id(&self) -> u16 {
        LocalRegisterCopy::<u64, AMD_DTE1::Register>::new(self.words[1]).read(AMD_DTE1::DOMAIN_ID)
            as u16
    }

    /// DTE.IR and DTE.IW.
    pub fn permissions(&self) -> (bool, bool) {
        let w = self.w0();
        (w.is_set(AMD_DTE0::IR), w.is_set(AMD_DTE0::IW))
    }

    /// The raw HAD field (bits 8:7).
    pub fn had(&self) -> u8 {
        self.w0().read(AMD_DTE0::HAD) as u8
    }

    /// What HAD asks the IOMMU to update: 0b00 nothing, 0b11 access and dirty bits (the value
    /// Linux writes, `DTE_FLAG_HAD`). 0b01 is taken as "access bits only" and 0b10 as reserved
    /// (treated as 0b00): both meanings are unverified here, see the module docs.
    pub fn ad_update(&self) -> AdUpdate {
        match self.had() {
            0b01 => AdUpdate {
                access: true,
                dirty: false,
            },
            0b11 => AdUpdate {
                access: true,
                dirty: true,
            },
            _ => AdUpdate::default(),
        }
    }

    /// Set HAD to 0b11 (dirty tracking on, as `amd_iommu_set_dirty_tracking` does) or 0b00,
    /// leaving every other bit as it was.
    #[must_use]
    pub fn with_dirty_tracking(self, enable: bool) -> Self {
        self.with_had(if enable { 0b11 } else { 0b00 })
    }

    /// Set the raw HAD field (only the low two bits of `had` are used).
    #[must_use]
    pub fn with_had(mut self, had: u8) -> Self {
        let mut w = self.w0();
        w.modify(AMD_DTE0::HAD.val(u64::from(had & 3)));
        self.words[0] = w.get();
        self
    }

    /// Reserved encodings and must-be-zero bits that are set.
    pub fn problems(&self) -> Vec<Problem> {
        let w = self.w0();
        let mut p = Vec::new();
        if w.read(AMD_DTE0::RSVD) != 0 {
            p.push(Problem {
                field: "DTE[6:2]",
                value: w.read(AMD_DTE0::RSVD),
                rule: "reserved, must be zero",
            });
        }
        if self.had() == 0b10 {
            p.push(Problem {
                field: "DTE.HAD",
                value: 0b10,
                rule: "reserved encoding",
            });
        }
        if self.mode() == 7 {
            p.push(Problem {
                field: "DTE.Mode",
                value: 7,
                rule: "reserved paging mode",
            });
        }
        if self.guest_translation() && self.glx() > 1 {
            p.push(Problem {
                field: "DTE.GLX",
                value: u64::from(self.glx()),
                rule: "reserved GCR3 table level count",
            });
        }
        if self.guest_translation() && self.guest_levels().is_none() {
            p.push(Problem {
                field: "DTE.GuestPagingMode",
                value: (self.words[2] >> 54) & 3,
                rule: "reserved guest paging mode",
            });
        }
        p
    }
}

impl fmt::Debug for AmdDte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmdDte")
            .field("valid", &self.valid())
            .field("tv", &self.translation_valid())
            .field("had", &self.had())
            .field("mode", &self.mode())
            .field("root", &format_args!("{:#x}", self.root()))
            .field("domain_id", &self.domain_id())
            .field("gv", &self.guest_translation())
            .field("gcr3_table", &format_args!("{:#x}", self.gcr3_table()))
            .finish()
    }
}

/// A GCR3 table entry: the root of one PASID's x86-64 guest (v2) table with the valid bit
/// (`update_gcr3`: `gcr3 & PAGE_MASK | GCR3_VALID`); index = PASID bits 8:0 of a one-level table.
pub fn amd_gcr3_entry(root: u64) -> u64 {
    (root & 0x000f_ffff_ffff_f000) | 1
}

/// PASID-granular translation type of a VT-d scalable-mode PASID entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pgtt {
    /// First-stage only (1).
    FirstStage,
    /// Second-stage only (2).
    SecondStage,
    /// Nested (3).
    Nested,
    /// Pass-through (4).
    PassThrough,
    /// A reserved value (0, 5, 6, 7).
    Reserved(u8),
}

/// VT-d scalable-mode PASID table entry (eight little-endian 64-bit words).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VtdPasidEntry {
    val: [u64; 8],
}

impl VtdPasidEntry {
    /// Wrap raw PASID-entry words.
    pub const fn from_words(val: [u64; 8]) -> Self {
        VtdPasidEntry { val }
    }

    /// A present second-stage-only entry: table root, address width (39, 48 or 57 bits),
    /// domain ID; SSADE clear, faults reported.
    pub fn second_stage(root: u64, width: u8, did: u16) -> Self {
        let aw = match width {
            39 => 1,
            48 => 2,
            57 => 3,
            _ => 0,
        };
        let mut v0 = LocalRegisterCopy::<u64, VTD_PASID0::Register>::new(0);
        v0.modify(
            VTD_PASID0::P::SET
                + VTD_PASID0::AW.val(aw)
                + VTD_PASID0::PGTT::SecondStage
                + VTD_PASID0::SSPTPTR.val(root >> 12),
        );
        let mut val = [0u64; 8];
        val[0] = v0.get();
        val[1] = u64::from(did);
        VtdPasidEntry { val }
    }

    /// A present first-stage-only entry (PGTT = 001b): table root, 4 or 5 levels (FLPM), domain
    /// ID; AW = 2 (48-bit) or 3 (57-bit) as Linux sets it from the unit's AGAW (QEMU 10.0 takes
    /// AW as the canonical limit 2^(30 + 9·AW) of first-stage input addresses); SRE clear.
    /// With 4 levels and DID 1 this is the entry that worked on QEMU 10.0 (`val[0]` = 0x49,
    /// `val[1]` = 1, `val[2]` = root; `shared/recipes/vtd-firmware.md`).
    pub fn first_stage(root: u64, levels: u8, did: u16) -> Self {
        let (aw, flpm) = if levels == 5 { (3, 1) } else { (2, 0) };
        let mut v0 = LocalRegisterCopy::<u64, VTD_PASID0::Register>::new(0);
        v0.modify(VTD_PASID0::P::SET + VTD_PASID0::AW.val(aw) + VTD_PASID0::PGTT::FirstStage);
        let mut v2 = LocalRegisterCopy::<u64, VTD_PASID2::Register>::new(0);
        v2.modify(VTD_PASID2::FLPM.val(flpm) + VTD_PASID2::FLPTPTR.val(root >> 12));
        let mut val = [0u64; 8];
        val[0] = v0.get();
        val[1] = u64::from(did);
        val[2] = v2.get();
        VtdPasidEntry { val }
    }

    /// A present pass-through entry (PGTT = 100b) with domain ID `did`.
    pub fn pass_through(did: u16) -> Self {
        let mut v0 = LocalRegisterCopy::<u64, VTD_PASID0::Register>::new(0);
        v0.modify(VTD_PASID0::P::SET + VTD_PASID0::PGTT::PassThrough);
        let mut val = [0u64; 8];
        val[0] = v0.get();
        val[1] = u64::from(did);
        VtdPasidEntry { val }
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 8] {
        self.val
    }

    fn v0(&self) -> LocalRegisterCopy<u64, VTD_PASID0::Register> {
        LocalRegisterCopy::new(self.val[0])
    }

    fn v2(&self) -> LocalRegisterCopy<u64, VTD_PASID2::Register> {
        LocalRegisterCopy::new(self.val[2])
    }

    /// First-stage table root (FLPTPTR).
    pub fn first_stage_root(&self) -> u64 {
        self.v2().read(VTD_PASID2::FLPTPTR) << 12
    }

    /// First-stage levels from FLPM: 4 or 5, `None` for a reserved FLPM value.
    pub fn first_stage_levels(&self) -> Option<u8> {
        match self.v2().read(VTD_PASID2::FLPM) {
            0 => Some(4),
            1 => Some(5),
            _ => None,
        }
    }

    /// SRE: supervisor requests enabled.
    pub fn supervisor_requests(&self) -> bool {
        self.v2().is_set(VTD_PASID2::SRE)
    }

    /// Set or clear SRE, leaving every other bit as it was.
    #[must_use]
    pub fn with_supervisor_requests(mut self, enable: bool) -> Self {
        let mut v = self.v2();
        v.modify(if enable {
            VTD_PASID2::SRE::SET
        } else {
            VTD_PASID2::SRE::CLEAR
        });
        self.val[2] = v.get();
        self
    }

    /// Present.
    pub fn present(&self) -> bool {
        self.v0().is_set(VTD_PASID0::P)
    }

    /// Fault processing disabled.
    pub fn fault_processing_disabled(&self) -> bool {
        self.v0().is_set(VTD_PASID0::FPD)
    }

    /// Translation type.
    pub fn pgtt(&self) -> Pgtt {
        match self.v0().read(VTD_PASID0::PGTT) as u8 {
            1 => Pgtt::FirstStage,
            2 => Pgtt::SecondStage,
            3 => Pgtt::Nested,
            4 => Pgtt::PassThrough,
            r => Pgtt::Reserved(r),
        }
    }

    /// Second-stage address width in bits (39, 48, 57), or `None` for a reserved AW value.
    pub fn address_width(&self) -> Option<u8> {
        match self.v0().read(VTD_PASID0::AW) {
            1 => Some(39),
            2 => Some(48),
            3 => Some(57),
            _ => None,
        }
    }

    /// Second-stage table root.
    pub fn second_stage_root(&self) -> u64 {
        self.v0().read(VTD_PASID0::SSPTPTR) << 12
    }

    /// Domain ID.
    pub fn domain_id(&self) -> u16 {
        LocalRegisterCopy::<u64, VTD_PASID1::Register>::new(self.val[1]).read(VTD_PASID1::DID)
            as u16
    }

    /// SSADE.
    pub fn ssade(&self) -> bool {
        self.v0().is_set(VTD_PASID0::SSADE)
    }

    /// What the entry asks the IOMMU to update in the table it selects: for second-stage or
    /// nested translation SSADE enables both second-stage A and D bits; first-stage translation
    /// (PGTT = 001b) always updates first-stage A and D (VT-d §3.6; there is no enable bit), so
    /// both are reported on.
    pub fn ad_update(&self) -> AdUpdate {
        let on = match self.pgtt() {
            Pgtt::FirstStage => true,
            Pgtt::SecondStage | Pgtt::Nested => self.ssade(),
            _ => false,
        };
        AdUpdate {
            access: on,
            dirty: on,
        }
    }

    /// Set or clear SSADE (bit 9), as `intel_pasid_setup_dirty_tracking` does, leaving every
    /// other bit as it was.
    #[must_use]
    pub fn with_dirty_tracking(mut self, enable: bool) -> Self {
        let mut v = self.v0();
        v.modify(if enable {
            VTD_PASID0::SSADE::SET
        } else {
            VTD_PASID0::SSADE::CLEAR
        });
        self.val[0] = v.get();
        self
    }

    /// Reserved encodings that are set.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        if let Pgtt::Reserved(r) = self.pgtt() {
            p.push(Problem {
                field: "PASID.PGTT",
                value: u64::from(r),
                rule: "reserved translation type",
            });
        }
        if self.address_width().is_none() && matches!(self.pgtt(), Pgtt::SecondStage | Pgtt::Nested)
        {
            p.push(Problem {
                field: "PASID.AW",
                value: self.v0().read(VTD_PASID0::AW),
                rule: "reserved address width",
            });
        }
        if self.ssade() && !matches!(self.pgtt(), Pgtt::SecondStage | Pgtt::Nested) {
            p.push(Problem {
                field: "PASID.SSADE",
                value: 1,
                rule: "set without a second stage (PGTT must be 2 or 3)",
            });
        }
        if self.first_stage_levels().is_none()
            && matches!(self.pgtt(), Pgtt::FirstStage | Pgtt::Nested)
        {
            p.push(Problem {
                field: "PASID.FLPM",
                value: self.v2().read(VTD_PASID2::FLPM),
                rule: "reserved first-stage paging mode",
            });
        }
        p
    }
}

impl fmt::Debug for VtdPasidEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VtdPasidEntry")
            .field("present", &self.present())
            .field("pgtt", &self.pgtt())
            .field("aw", &self.address_width())
            .field("ssade", &self.ssade())
            .field("root", &format_args!("{:#x}", self.second_stage_root()))
            .field("fs_root", &format_args!("{:#x}", self.first_stage_root()))
            .field("fs_levels", &self.first_stage_levels())
            .field("did", &self.domain_id())
            .finish()
    }
}

/// SMMUv3 Context Descriptor (eight little-endian 64-bit words).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SmmuCd {
    words: [u64; 8],
}

impl SmmuCd {
    /// Wrap raw CD words.
    pub const fn from_words(words: [u64; 8]) -> Self {
        SmmuCd { words }
    }

    /// A valid AArch64 CD with a 4 KiB-granule TTB0 covering `ias` input bits and the given
    /// ASID; TTB1 walks disabled, HTTU off.
    pub fn stage1(ttb0: u64, ias: u8, asid: u16) -> Self {
        let mut w0 = LocalRegisterCopy::<u64, SMMU_CD0::Register>::new(0);
        w0.modify(
            SMMU_CD0::T0SZ.val(u64::from(64u8.saturating_sub(ias) & 0x3f))
                + SMMU_CD0::EPD1::SET
                + SMMU_CD0::V::SET
                + SMMU_CD0::IPS.val(5)
                + SMMU_CD0::AA64::SET
                + SMMU_CD0::ASID.val(u64::from(asid)),
        );
        let mut w1 = LocalRegisterCopy::<u64, SMMU_CD1::Register>::new(0);
        w1.modify(SMMU_CD1::TTB0.val(ttb0 >> 4));
        SmmuCd {
            words: [w0.get(), w1.get(), 0, 0, 0, 0, 0, 0],
        }
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 8] {
        self.words
    }

    fn w0(&self) -> LocalRegisterCopy<u64, SMMU_CD0::Register> {
        LocalRegisterCopy::new(self.words[0])
    }

    /// CD.V.
    pub fn valid(&self) -> bool {
        self.w0().is_set(SMMU_CD0::V)
    }

    /// CD.AA64.
    pub fn aarch64(&self) -> bool {
        self.w0().is_set(SMMU_CD0::AA64)
    }

    /// Input address size (64 - T0SZ).
    pub fn input_bits(&self) -> u8 {
        64 - self.w0().read(SMMU_CD0::T0SZ) as u8
    }

    /// CD.TG0 (0 = 4 KiB granule).
    pub fn granule(&self) -> u8 {
        self.w0().read(SMMU_CD0::TG0) as u8
    }

    /// TTB0 (physical address).
    pub fn ttb0(&self) -> u64 {
        LocalRegisterCopy::<u64, SMMU_CD1::Register>::new(self.words[1]).read(SMMU_CD1::TTB0) << 4
    }

    /// ASID.
    pub fn asid(&self) -> u16 {
        self.w0().read(SMMU_CD0::ASID) as u16
    }

    /// {HD, HA} decoded: 0b01 access only, 0b11 access and dirty; 0b10 is reserved and behaves
    /// as disabled; ignored for AArch32 tables (IHI 0070 G.b §5.4, field HA).
    pub fn ad_update(&self) -> AdUpdate {
        let w = self.w0();
        let (hd, ha) = (w.is_set(SMMU_CD0::HD), w.is_set(SMMU_CD0::HA));
        if !self.aarch64() || !ha {
            return AdUpdate::default();
        }
        AdUpdate {
            access: true,
            dirty: hd,
        }
    }

    /// Set or clear both CD.HA and CD.HD (dirty state needs the access flag too), leaving every
    /// other bit as it was.
    #[must_use]
    pub fn with_dirty_tracking(mut self, enable: bool) -> Self {
        let mut w = self.w0();
        w.modify(if enable {
            SMMU_CD0::HA::SET + SMMU_CD0::HD::SET
        } else {
            SMMU_CD0::HA::CLEAR + SMMU_CD0::HD::CLEAR
        });
        self.words[0] = w.get();
        self
    }

    /// Reserved encodings that are set.
    pub fn problems(&self) -> Vec<Problem> {
        let w = self.w0();
        let mut p = Vec::new();
        if w.is_set(SMMU_CD0::HD) && !w.is_set(SMMU_CD0::HA) {
            p.push(Problem {
                field: "CD.{HD,HA}",
                value: 0b10,
                rule: "reserved encoding, behaves as HTTU disabled",
            });
        }
        if self.granule() != 0 {
            p.push(Problem {
                field: "CD.TG0",
                value: u64::from(self.granule()),
                rule: "only the 4 KiB granule (0) is modelled",
            });
        }
        p
    }
}

impl fmt::Debug for SmmuCd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmmuCd")
            .field("valid", &self.valid())
            .field("aa64", &self.aarch64())
            .field("ias", &self.input_bits())
            .field("ad", &self.ad_update())
            .field("ttb0", &format_args!("{:#x}", self.ttb0()))
            .field("asid", &self.asid())
            .finish()
    }
}

/// STE.Config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteConfig {
    /// 0b000: abort all transactions.
    Abort,
    /// 0b100: bypass.
    Bypass,
    /// 0b101: stage 1 translates.
    Stage1,
    /// 0b110: stage 2 translates.
    Stage2,
    /// 0b111: both stages.
    Nested,
    /// A reserved value.
    Reserved(u8),
}

/// SMMUv3 Stream Table Entry (eight little-endian 64-bit words).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SmmuSte {
    words: [u64; 8],
}

impl SmmuSte {
    /// Wrap raw STE words.
    pub const fn from_words(words: [u64; 8]) -> Self {
        SmmuSte { words }
    }

    /// A valid stage-1 STE pointing at a linear CD table.
    pub fn stage1(cd_table: u64) -> Self {
        let mut w0 = LocalRegisterCopy::<u64, SMMU_STE0::Register>::new(0);
        w0.modify(
            SMMU_STE0::V::SET + SMMU_STE0::CONFIG::Stage1 + SMMU_STE0::S1CTXPTR.val(cd_table >> 6),
        );
        SmmuSte {
            words: [w0.get(), 0, 0, 0, 0, 0, 0, 0],
        }
    }

    /// A valid stage-2 STE: AArch64, 4 KiB granule, `ias` input bits, VMID; HTTU off.
    pub fn stage2(s2ttb: u64, ias: u8, vmid: u16) -> Self {
        let mut w0 = LocalRegisterCopy::<u64, SMMU_STE0::Register>::new(0);
        w0.modify(SMMU_STE0::V::SET + SMMU_STE0::CONFIG::Stage2);
        let mut w2 = LocalRegisterCopy::<u64, SMMU_STE2::Register>::new(0);
        w2.modify(
            SMMU_STE2::S2VMID.val(u64::from(vmid))
                + SMMU_STE2::S2T0SZ.val(u64::from(64u8.saturating_sub(ias) & 0x3f))
                + SMMU_STE2::S2PS.val(5)
                + SMMU_STE2::S2AA64::SET
                + SMMU_STE2::S2R::SET,
        );
        let mut w3 = LocalRegisterCopy::<u64, SMMU_STE3::Register>::new(0);
        w3.modify(SMMU_STE3::S2TTB.val(s2ttb >> 4));
        SmmuSte {
            words: [w0.get(), 0, w2.get(), w3.get(), 0, 0, 0, 0],
        }
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 8] {
        self.words
    }

    fn w0(&self) -> LocalRegisterCopy<u64, SMMU_STE0::Register> {
        LocalRegisterCopy::new(self.words[0])
    }

    fn w2(&self) -> LocalRegisterCopy<u64, SMMU_STE2::Register> {
        LocalRegisterCopy::new(self.words[2])
    }

    /// STE.V.
    pub fn valid(&self) -> bool {
        self.w0().is_set(SMMU_STE0::V)
    }

    /// STE.Config.
    pub fn config(&self) -> SteConfig {
        match self.w0().read(SMMU_STE0::CONFIG) as u8 {
            0 => SteConfig::Abort,
            4 => SteConfig::Bypass,
            5 => SteConfig::Stage1,
            6 => SteConfig::Stage2,
            7 => SteConfig::Nested,
            r => SteConfig::Reserved(r),
        }
    }

    /// The CD table pointer.
    pub fn cd_table(&self) -> u64 {
        self.w0().read(SMMU_STE0::S1CTXPTR) << 6
    }

    /// Stage-2 input size (64 - S2T0SZ).
    pub fn s2_input_bits(&self) -> u8 {
        64 - self.w2().read(SMMU_STE2::S2T0SZ) as u8
    }

    /// Stage-2 table base.
    pub fn s2ttb(&self) -> u64 {
        LocalRegisterCopy::<u64, SMMU_STE3::Register>::new(self.words[3]).read(SMMU_STE3::S2TTB)
            << 4
    }

    /// VMID.
    pub fn vmid(&self) -> u16 {
        self.w2().read(SMMU_STE2::S2VMID) as u16
    }

    /// {S2HA, S2HD} decoded: 0b10 access only, 0b11 access and dirty; 0b01 is reserved and
    /// behaves as disabled (IHI 0070 G.b §5.2, field S2HA). With AArch32 stage-2 tables setting
    /// either bit is ILLEGAL; this reports no update.
    pub fn s2_ad_update(&self) -> AdUpdate {
        let w = self.w2();
        let (ha, hd) = (w.is_set(SMMU_STE2::S2HA), w.is_set(SMMU_STE2::S2HD));
        if !ha || !w.is_set(SMMU_STE2::S2AA64) {
            return AdUpdate::default();
        }
        AdUpdate {
            access: true,
            dirty: hd,
        }
    }

    /// Set or clear both STE.S2HA and STE.S2HD, leaving every other bit as it was.
    #[must_use]
    pub fn with_s2_dirty_tracking(mut self, enable: bool) -> Self {
        let mut w = self.w2();
        w.modify(if enable {
            SMMU_STE2::S2HA::SET + SMMU_STE2::S2HD::SET
        } else {
            SMMU_STE2::S2HA::CLEAR + SMMU_STE2::S2HD::CLEAR
        });
        self.words[2] = w.get();
        self
    }

    /// Reserved encodings that are set.
    pub fn problems(&self) -> Vec<Problem> {
        let w = self.w2();
        let mut p = Vec::new();
        if let SteConfig::Reserved(r) = self.config() {
            p.push(Problem {
                field: "STE.Config",
                value: u64::from(r),
                rule: "reserved stream configuration",
            });
        }
        if w.is_set(SMMU_STE2::S2HD) && !w.is_set(SMMU_STE2::S2HA) {
            p.push(Problem {
                field: "STE.{S2HA,S2HD}",
                value: 0b01,
                rule: "reserved encoding, behaves as HTTU disabled",
            });
        }
        p
    }
}

impl fmt::Debug for SmmuSte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmmuSte")
            .field("valid", &self.valid())
            .field("config", &self.config())
            .field("cd_table", &format_args!("{:#x}", self.cd_table()))
            .field("s2ttb", &format_args!("{:#x}", self.s2ttb()))
            .field("s2_ad", &self.s2_ad_update())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_had_is_bits_8_7_and_preserves_the_rest() {
        let dte = AmdDte::translated(0x1234_5000, 4, 7);
        assert_eq!(dte.mode(), 4);
        assert_eq!(dte.root(), 0x1234_5000);
        assert_eq!(dte.domain_id(), 7);
        let on = dte.with_dirty_tracking(true);
        // DTE_FLAG_HAD = 3ULL << 7
        assert_eq!(on.words()[0] ^ dte.words()[0], 3 << 7);
        assert_eq!(
            on.ad_update(),
            AdUpdate {
                access: true,
                dirty: true
            }
        );
        assert_eq!(on.with_dirty_tracking(false), dte);
        assert!(dte.problems().is_empty());
        let odd = AmdDte::from_words([0x7c | (0b10 << 7) | (7 << 9), 0, 0, 0]);
        let fields: Vec<_> = odd.problems().iter().map(|p| p.field).collect();
        assert_eq!(fields, ["DTE[6:2]", "DTE.HAD", "DTE.Mode"]);
        assert_eq!(odd.ad_update(), AdUpdate::default());
    }

    #[test]
    fn vtd_ssade_is_bit_9() {
        let e = VtdPasidEntry::second_stage(0xabc000, 48, 3);
        assert_eq!(e.pgtt(), Pgtt::SecondStage);
        assert_eq!(e.address_width(), Some(48));
        assert_eq!(e.second_stage_root(), 0xabc000);
        let on = e.with_dirty_tracking(true);
        assert_eq!(on.words()[0] ^ e.words()[0], 1 << 9);
        assert!(on.ad_update().dirty);
        assert!(on.problems().is_empty());
        let pt = VtdPasidEntry::from_words([1 | (4 << 6) | (1 << 9), 0, 0, 0, 0, 0, 0, 0]);
        assert!(!pt.ad_update().dirty);
        assert_eq!(pt.problems()[0].field, "PASID.SSADE");
        let bad = VtdPasidEntry::from_words([u64::MAX; 8]);
        assert_eq!(bad.pgtt(), Pgtt::Reserved(7));
        assert!(!bad.problems().is_empty());
    }

    #[test]
    fn smmu_cd_ha_hd_are_bits_43_42() {
        let cd = SmmuCd::stage1(0x8000_0000, 48, 5);
        assert_eq!(cd.input_bits(), 48);
        assert_eq!(cd.ttb0(), 0x8000_0000);
        let on = cd.with_dirty_tracking(true);
        assert_eq!(on.words()[0] ^ cd.words()[0], (1 << 43) | (1 << 42));
        assert_eq!(
            on.ad_update(),
            AdUpdate {
                access: true,
                dirty: true
            }
        );
        let hd_only = SmmuCd::from_words([cd.words()[0] | (1 << 42), 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(hd_only.ad_update(), AdUpdate::default());
        assert_eq!(hd_only.problems()[0].field, "CD.{HD,HA}");
    }

    #[test]
    fn smmu_ste_s2hd_s2ha_are_bits_183_184() {
        let ste = SmmuSte::stage2(0x4000_0000, 48, 9);
        assert_eq!(ste.config(), SteConfig::Stage2);
        assert_eq!(ste.s2_input_bits(), 48);
        assert_eq!(ste.s2ttb(), 0x4000_0000);
        assert_eq!(ste.vmid(), 9);
        let on = ste.with_s2_dirty_tracking(true);
        assert_eq!(on.words()[2] ^ ste.words()[2], (1 << 55) | (1 << 56));
        assert!(on.s2_ad_update().dirty);
        let bad = SmmuSte::from_words([0b0110 | 1, 0, 1 << 55, 0, 0, 0, 0, 0]);
        assert_eq!(bad.config(), SteConfig::Reserved(3));
        assert_eq!(bad.problems().len(), 2);
    }

    #[test]
    fn any_words_decode() {
        for v in [0u64, u64::MAX, 0x5555_5555_5555_5555] {
            let _ = format!("{:?}", AmdDte::from_words([v; 4]).problems());
            let _ = format!("{:?}", VtdPasidEntry::from_words([v; 8]));
            let _ = format!("{:?}", SmmuCd::from_words([v; 8]).problems());
            let _ = format!("{:?}", SmmuSte::from_words([v; 8]).problems());
        }
    }
}
