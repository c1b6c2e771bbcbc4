//! IOMMU capability registers and a vendor-neutral dirty-tracking summary.
//!
//! ```text
//!  AMD-Vi  EFR (MMIO 0x30)        HDSup(52) HASup(49) ...      -> AmdCaps
//!  VT-d    CAP (0x08) ECAP (0x10) SLADS(45) SMTS(43) SMPWC(48) -> VtdCaps
//!  SMMUv3  IDR0 (0x0) IDR3 (0xc)  HTTU(7:6) COHACC(4) BBML     -> SmmuCaps
//!                                   |
//!                                   v
//!                       DirtySupport { supported, mechanism, missing, ... }
//! ```
//!
//! The register layouts are declared once, in [`regs`], with tock-registers'
//! `register_bitfields!`; every decoder reads a stored value through a
//! [`LocalRegisterCopy`]. The same decoders accept values read elsewhere — a lab register dump,
//! or the vendor data of iommufd's `IOMMU_GET_HW_INFO` (`struct iommu_hw_info_vtd` carries
//! `cap_reg`/`ecap_reg`, `struct iommu_hw_info_arm_smmuv3` carries `idr[6]`). Any value decodes;
//! fields this crate does not name are simply not interpreted.

use alloc::vec::Vec;
use core::fmt;

use tock_registers::LocalRegisterCopy;

/// Declarative register maps (tock-registers). Field names follow the specifications; the
/// source of every bit position is given on each register.
///
/// The items `register_bitfields!` generates for each register (the `Register` marker type and
/// each field's `SET`/`CLEAR`/`Value`) carry no documentation of their own; the field
/// documentation below is the reference.
#[allow(missing_docs)]
pub mod regs {
    use tock_registers::register_bitfields;

    register_bitfields![u64,
        /// AMD-Vi Extended Feature Register, MMIO offset 0x30 (`MMIO_EXT_FEATURES`).
        /// Bit positions: Linux 6.12 `drivers/iommu/amd/amd_iommu_types.h` (`FEATURE_*`).
        pub AMD_EFR [
            /// Prefetch IOMMU pages command supported (`FEATURE_PREFETCH`).
            PREFSUP OFFSET(0) NUMBITS(1) [],
            /// Peripheral page request support (`FEATURE_PPR`).
            PPRSUP OFFSET(1) NUMBITS(1) [],
            /// x2APIC interrupt remapping support (`FEATURE_X2APIC`).
            XTSUP OFFSET(2) NUMBITS(1) [],
            /// No-execute protection support (`FEATURE_NX`).
            NXSUP OFFSET(3) NUMBITS(1) [],
            /// Guest translation support (`FEATURE_GT`).
            GTSUP OFFSET(4) NUMBITS(1) [],
            /// INVALIDATE_IOMMU_ALL command supported (`FEATURE_IA`).
            IASUP OFFSET(6) NUMBITS(1) [],
            /// Guest virtual APIC support (`FEATURE_GA`).
            GASUP OFFSET(7) NUMBITS(1) [],
            /// Hardware error registers supported (`FEATURE_HE`).
            HESUP OFFSET(8) NUMBITS(1) [],
            /// Performance counters supported (`FEATURE_PC`).
            PCSUP OFFSET(9) NUMBITS(1) [],
            /// Guest address translation size: 0 = 4-level, 1 = 5-level (`FEATURE_GATS`).
            GATS OFFSET(12) NUMBITS(2) [],
            /// Guest CR3 root table levels (`FEATURE_GLX`).
            GLX OFFSET(14) NUMBITS(2) [],
            /// Maximum PASID width minus one (`FEATURE_PASMAX`).
            PASMAX OFFSET(32) NUMBITS(5) [],
            /// Guest I/O protection support (`FEATURE_GIOSUP`).
            GIOSUP OFFSET(48) NUMBITS(1) [],
            /// Host access-bit update support (`FEATURE_HASUP`).
            HASUP OFFSET(49) NUMBITS(1) [],
            /// Enhanced PPR handling support (`FEATURE_EPHSUP`).
            EPHSUP OFFSET(50) NUMBITS(1) [],
            /// Host dirty-bit update support (`FEATURE_HDSUP`): IOMMU dirty tracking.
            HDSUP OFFSET(52) NUMBITS(1) [],
            /// SEV-SNP support (`FEATURE_SNP`).
            SNPSUP OFFSET(63) NUMBITS(1) []
        ],
        /// VT-d Capability Register, MMIO offset 0x08. Bit positions: Linux 6.12
        /// `drivers/iommu/intel/iommu.h` (`cap_*`), VT-d specification §11.4.2.
        pub VTD_CAP [
            /// Number of domains supported: 2^(4 + 2*ND) (`cap_ndoms`).
            ND OFFSET(0) NUMBITS(3) [],
            /// Advanced fault logging (`cap_afl`).
            AFL OFFSET(3) NUMBITS(1) [],
            /// Required write-buffer flushing (`cap_rwbf`).
            RWBF OFFSET(4) NUMBITS(1) [],
            /// Protected low-memory region (`cap_plmr`).
            PLMR OFFSET(5) NUMBITS(1) [],
            /// Protected high-memory region (`cap_phmr`).
            PHMR OFFSET(6) NUMBITS(1) [],
            /// Caching mode: not-present entries may be cached; set by emulated IOMMUs (`cap_caching_mode`).
            CM OFFSET(7) NUMBITS(1) [],
            /// Supported adjusted guest address widths; bit 1 = 39-bit (3-level), bit 2 = 48-bit
            /// (4-level), bit 3 = 57-bit (5-level) (`cap_sagaw`).
            SAGAW OFFSET(8) NUMBITS(5) [],
            /// Maximum guest address width minus one (`cap_mgaw`).
            MGAW OFFSET(16) NUMBITS(6) [],
            /// Zero-length read (`cap_zlr`).
            ZLR OFFSET(22) NUMBITS(1) [],
            /// Fault-recording register offset, in 16-byte units (`cap_fault_reg_offset`).
            FRO OFFSET(24) NUMBITS(10) [],
            /// Second-stage large page support: bit 0 = 2 MiB, bit 1 = 1 GiB (`cap_super_page_val`).
            SLLPS OFFSET(34) NUMBITS(4) [],
            /// Page-selective invalidation (`cap_pgsel_inv`).
            PSI OFFSET(39) NUMBITS(1) [],
            /// Number of fault-recording registers minus one (`cap_num_fault_regs`).
            NFR OFFSET(40) NUMBITS(8) [],
            /// Maximum address mask value for page-selective invalidation (`cap_max_amask_val`).
            MAMV OFFSET(48) NUMBITS(6) [],
            /// Write draining (`cap_write_drain`).
            DWD OFFSET(54) NUMBITS(1) [],
            /// Read draining (`cap_read_drain`).
            DRD OFFSET(55) NUMBITS(1) [],
            /// First-stage 1 GiB page support (`cap_fl1gp_support`).
            FL1GP OFFSET(56) NUMBITS(1) [],
            /// Posted interrupts (`cap_pi_support`).
            PI OFFSET(59) NUMBITS(1) [],
            /// First-stage 5-level paging (`cap_fl5lp_support`).
            FL5LP OFFSET(60) NUMBITS(1) [],
            /// Enhanced command support (`cap_ecmds`).
            ECMDS OFFSET(61) NUMBITS(1) [],
            /// Enhanced set interrupt remap table pointer support (`cap_esirtps`).
            ESIRTPS OFFSET(62) NUMBITS(1) [],
            /// Enhanced set root table pointer support (`cap_esrtps`).
            ESRTPS OFFSET(63) NUMBITS(1) []
        ],
        /// VT-d Extended Capability Register, MMIO offset 0x10. Bit positions: Linux 6.12
        /// `drivers/iommu/intel/iommu.h` (`ecap_*`), VT-d specification §11.4.3.
        pub VTD_ECAP [
            /// Page-walk coherency (`ecap_coherent`).
            C OFFSET(0) NUMBITS(1) [],
            /// Queued invalidation (`ecap_qis`).
            QI OFFSET(1) NUMBITS(1) [],
            /// Device-TLB (ATS) support (`ecap_dev_iotlb_support`).
            DT OFFSET(2) NUMBITS(1) [],
            /// Interrupt remapping (`ecap_ir_support`).
            IR OFFSET(3) NUMBITS(1) [],
            /// Extended interrupt mode, x2APIC (`ecap_eim_support`).
            EIM OFFSET(4) NUMBITS(1) [],
            /// Pass-through (`ecap_pass_through`).
            PT OFFSET(6) NUMBITS(1) [],
            /// Snoop control (`ecap_sc_support`).
            SC OFFSET(7) NUMBITS(1) [],
            /// IOTLB register offset, in 16-byte units (`ecap_iotlb_offset`).
            IRO OFFSET(8) NUMBITS(10) [],
            /// Maximum handle mask value (`ecap_max_handle_mask`).
            MHMV OFFSET(20) NUMBITS(4) [],
            /// Memory-type support (`ecap_mts`).
            MTS OFFSET(25) NUMBITS(1) [],
            /// Nested translation (`ecap_nest`).
            NEST OFFSET(26) NUMBITS(1) [],
            /// Deferred invalidate support (`ecap_dis`).
            DIS OFFSET(27) NUMBITS(1) [],
            /// Page request support (`ecap_prs`).
            PRS OFFSET(29) NUMBITS(1) [],
            /// Execute request support (`ecap_ers`).
            ERS OFFSET(30) NUMBITS(1) [],
            /// Supervisor request support (`ecap_srs`).
            SRS OFFSET(31) NUMBITS(1) [],
            /// No-write flag support (`ecap_nwfs`).
            NWFS OFFSET(33) NUMBITS(1) [],
            /// Extended accessed flag support (`ecap_eafs`).
            EAFS OFFSET(34) NUMBITS(1) [],
            /// PASID size supported minus one (`ecap_pss`).
            PSS OFFSET(35) NUMBITS(5) [],
            /// Process address space ID support (`ecap_pasid`).
            PASID OFFSET(40) NUMBITS(1) [],
            /// Device-TLB invalidation throttling (`ecap_dit`).
            DIT OFFSET(41) NUMBITS(1) [],
            /// Page-request drain support (`ecap_pds`).
            PDS OFFSET(42) NUMBITS(1) [],
            /// Scalable-mode translation support (`ecap_smts`).
            SMTS OFFSET(43) NUMBITS(1) [],
            /// Second-stage accessed/dirty support (`ecap_slads`): IOMMU dirty tracking.
            SLADS OFFSET(45) NUMBITS(1) [],
            /// Second-stage translation support (`ecap_slts`).
            SLTS OFFSET(46) NUMBITS(1) [],
            /// First-stage translation support (`ecap_flts`).
            FLTS OFFSET(47) NUMBITS(1) [],
            /// Scalable-mode page-walk coherency (`ecap_smpwc`).
            SMPWC OFFSET(48) NUMBITS(1) [],
            /// RID-PASID support (`ecap_rps`).
            RPS OFFSET(49) NUMBITS(1) [],
            /// Performance monitoring support (`ecap_pms`).
            PMS OFFSET(51) NUMBITS(1) []
        ]
    ];

    register_bitfields![u32,
        /// SMMUv3 `SMMU_IDR0`, offset 0x0. Bit positions: Linux 6.12
        /// `drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h` (`IDR0_*`), SMMUv3 specification §6.3.1.
        pub SMMU_IDR0 [
            /// Stage-2 translation supported (`IDR0_S2P`).
            S2P OFFSET(0) NUMBITS(1) [],
            /// Stage-1 translation supported (`IDR0_S1P`).
            S1P OFFSET(1) NUMBITS(1) [],
            /// Translation table formats: 2 = AArch64, 3 = AArch32 and AArch64 (`IDR0_TTF`).
            TTF OFFSET(2) NUMBITS(2) [
                AArch32 = 1,
                AArch64 = 2,
                AArch32AndAArch64 = 3
            ],
            /// Coherent access to translation tables and queues (`IDR0_COHACC`).
            COHACC OFFSET(4) NUMBITS(1) [],
            /// Broadcast TLB maintenance.
            BTM OFFSET(5) NUMBITS(1) [],
            /// Hardware translation table update (`IDR0_HTTU`).
            HTTU OFFSET(6) NUMBITS(2) [
                None = 0,
                Access = 1,
                AccessDirty = 2
            ],
            /// Hypervisor stage-1 contexts (`IDR0_HYP`).
            HYP OFFSET(9) NUMBITS(1) [],
            /// PCIe ATS supported (`IDR0_ATS`).
            ATS OFFSET(10) NUMBITS(1) [],
            /// 16-bit ASIDs (`IDR0_ASID16`).
            ASID16 OFFSET(12) NUMBITS(1) [],
            /// MSIs supported (`IDR0_MSI`).
            MSI OFFSET(13) NUMBITS(1) [],
            /// Send-event mechanism (`IDR0_SEV`).
            SEV OFFSET(14) NUMBITS(1) [],
            /// PCIe PRI supported (`IDR0_PRI`).
            PRI OFFSET(16) NUMBITS(1) [],
            /// 16-bit VMIDs (`IDR0_VMID16`).
            VMID16 OFFSET(18) NUMBITS(1) [],
            /// Two-level context-descriptor tables (`IDR0_CD2L`).
            CD2L OFFSET(19) NUMBITS(1) [],
            /// Translation table endianness (`IDR0_TTENDIAN`).
            TTENDIAN OFFSET(21) NUMBITS(2) [],
            /// Stall model (`IDR0_STALL_MODEL`).
            STALL_MODEL OFFSET(24) NUMBITS(2) [],
            /// Two-level stream tables (`IDR0_ST_LVL`).
            ST_LVL OFFSET(27) NUMBITS(2) []
        ],
        /// SMMUv3 `SMMU_IDR3`, offset 0xc. Bit positions: SMMUv3 specification §6.3.4
        /// (not used by Linux 6.12's driver except RIL).
        pub SMMU_IDR3 [
            /// Range-based invalidation and level hints.
            RIL OFFSET(10) NUMBITS(1) [],
            /// Break-before-make behaviour level (SMMUv3.2+ report 1 or 2). Level 1 allows
            /// changing a block into a table (and back) without an invalid entry only through the
            /// nT bit (bit 16 of the block descriptor) and a TLB invalidation between steps;
            /// level 2 allows a direct replacement (IHI 0070 G.b §3.21.1.2, §3.21.1.3, §6.3.4).
            BBML OFFSET(11) NUMBITS(2) [
                Level0 = 0,
                Level1 = 1,
                Level2 = 2
            ]
        ]
    ];
}

use regs::{AMD_EFR, SMMU_IDR0, SMMU_IDR3, VTD_CAP, VTD_ECAP};

/// The IOMMU family a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vendor {
    /// AMD-Vi (AMD I/O Virtualization Technology).
    Amd,
    /// Intel VT-d.
    Intel,
    /// Arm SMMUv3.
    Arm,
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vendor::Amd => "AMD-Vi",
            Vendor::Intel => "Intel VT-d",
            Vendor::Arm => "Arm SMMUv3",
        })
    }
}

/// How an IOMMU records DMA writes in its page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DirtyMechanism {
    /// AMD-Vi v1 host page tables: the IOMMU sets PTE bit 6 (D, `IOMMU_PTE_HD_BIT`) with an
    /// interlocked update; enabled per device by DTE bits 8:7 (`DTE_FLAG_HAD`).
    AmdHostDirty,
    /// VT-d scalable-mode second-stage tables: the IOMMU sets PTE bit 9 (D,
    /// `DMA_SL_PTE_DIRTY_BIT`) and bit 8 (A); enabled per PASID entry by SSADE (bit 9).
    VtdSecondStageAd,
    /// SMMUv3 HTTU: a writable leaf with DBM (bit 51) set and AP\[2\] (bit 7) set is
    /// writable-clean; the SMMU clears AP\[2\] on the first write. Enabled per context descriptor
    /// by CD.HD/HA (stage 1) or per STE by S2HD/S2HA (stage 2, where S2AP\[1\] plays AP\[2\]'s
    /// role inverted).
    SmmuHttuDbm,
}

impl fmt::Display for DirtyMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyMechanism::AmdHostDirty => "AMD-Vi host dirty bit (PTE bit 6, DTE.HAD)",
            DirtyMechanism::VtdSecondStageAd => {
                "VT-d second-stage A/D bits (PTE bit 9, PASID entry SSADE)"
            }
            DirtyMechanism::SmmuHttuDbm => "SMMUv3 HTTU dirty state (DBM + AP[2], CD.HD/HA)",
        })
    }
}

/// A capability a dirty-tracking configuration needs and the register does not report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// AMD EFR.HDSup (bit 52).
    AmdHdSup,
    /// VT-d ECAP.SMTS (bit 43): dirty tracking needs scalable mode.
    VtdSmts,
    /// VT-d ECAP.SLADS (bit 45).
    VtdSlads,
    /// VT-d ECAP.SMPWC (bit 48): Linux requires scalable-mode page-walk coherency
    /// (`ssads_supported`).
    VtdSmpwc,
    /// VT-d ECAP.SLTS (bit 46): second-stage translation itself.
    VtdSlts,
    /// SMMU_IDR0.HTTU == 2 (access and dirty).
    SmmuHttuDirty,
    /// SMMU_IDR0.COHACC (bit 4): Linux requires coherent table walks for HTTU
    /// (`arm_smmu_dbm_capable`).
    SmmuCohacc,
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Requirement::AmdHdSup => "EFR.HDSup (bit 52)",
            Requirement::VtdSmts => "ECAP.SMTS (bit 43, scalable mode)",
            Requirement::VtdSlads => "ECAP.SLADS (bit 45)",
            Requirement::VtdSmpwc => "ECAP.SMPWC (bit 48)",
            Requirement::VtdSlts => "ECAP.SLTS (bit 46)",
            Requirement::SmmuHttuDirty => "IDR0.HTTU = 0b10 (bits 7:6)",
            Requirement::SmmuCohacc => "IDR0.COHACC (bit 4)",
        })
    }
}

/// Vendor-neutral answer to "can this IOMMU track DMA writes, and how".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySupport {
    /// The IOMMU family.
    pub vendor: Vendor,
    /// Where the dirty state lives and what enables it.
    pub mechanism: DirtyMechanism,
    /// Whether the hardware can also maintain an accessed flag.
    pub access_flag: bool,
    /// Leaf page sizes (bitmap of sizes in bytes) the dirty-tracking page table may use.
    pub page_sizes: u64,
    /// Whether a block entry can be split into a table (and collapsed back) in place while DMA
    /// runs, the way [`PageTable::split`](crate::PageTable::split) and
    /// [`collapse`](crate::PageTable::collapse) do it (one compare-and-swap, one flush).
    /// `false` means this procedure is not allowed: break-before-make (in-flight DMA to the
    /// range would fault) or, for SMMUv3 BBML level 1, the nT sequence this crate does not
    /// implement.
    pub live_split: bool,
    /// Every capability that is missing; empty when dirty tracking is supported.
    pub missing: Vec<Requirement>,
}

impl DirtySupport {
    /// `true` when nothing is missing.
    pub fn supported(&self) -> bool {
        self.missing.is_empty()
    }
}

impl fmt::Display for DirtySupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.vendor)?;
        if self.supported() {
            write!(f, "dirty tracking supported via {}", self.mechanism)
        } else {
            f.write_str("no dirty tracking; missing ")?;
            for (i, m) in self.missing.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{m}")?;
            }
            Ok(())
        }
    }
}

/// Leaf page sizes of an AMD-Vi v1 host page table as Linux 6.12 advertises them:
/// every power of two from 4 KiB to 2^51 except 512 GiB (`AMD_IOMMU_PGSIZES`).
pub const AMD_V1_PAGE_SIZES: u64 = (((1u64 << 52) - 1) & !((1u64 << 12) - 1)) ^ (1u64 << 39);

/// Decoded AMD-Vi Extended Feature Register.
#[derive(Clone, Copy)]
pub struct AmdCaps {
    efr: LocalRegisterCopy<u64, AMD_EFR::Register>,
}

impl AmdCaps {
    /// Decode an EFR value (MMIO offset 0x30).
    pub const fn from_efr(efr: u64) -> Self {
        AmdCaps {
            efr: LocalRegisterCopy::new(efr),
        }
    }

    /// The raw register value.
    pub fn raw(&self) -> u64 {
        self.efr.get()
    }

    /// EFR.HDSup: host page-table dirty-bit updates.
    pub fn host_dirty(&self) -> bool {
        self.efr.is_set(AMD_EFR::HDSUP)
    }

    /// EFR.HASup: host page-table access-bit updates.
    pub fn host_access(&self) -> bool {
        self.efr.is_set(AMD_EFR::HASUP)
    }

    /// EFR.GTSup: guest (v2) page-table translation.
    pub fn guest_translation(&self) -> bool {
        self.efr.is_set(AMD_EFR::GTSUP)
    }

    /// EFR.GIoSup: guest I/O protection.
    pub fn guest_io_protection(&self) -> bool {
        self.efr.is_set(AMD_EFR::GIOSUP)
    }

    /// EFR.PPRSup: peripheral page requests.
    pub fn ppr(&self) -> bool {
        self.efr.is_set(AMD_EFR::PPRSUP)
    }

    /// EFR.XTSup: x2APIC interrupt remapping.
    pub fn x2apic(&self) -> bool {
        self.efr.is_set(AMD_EFR::XTSUP)
    }

    /// EFR.SNPSup.
    pub fn snp(&self) -> bool {
        self.efr.is_set(AMD_EFR::SNPSUP)
    }

    /// Guest page-table levels: 4 or 5 (EFR.GATS).
    pub fn guest_levels(&self) -> u8 {
        if self.efr.read(AMD_EFR::GATS) == 1 {
            5
        } else {
            4
        }
    }

    /// Maximum PASID width in bits (EFR.PASMAX + 1).
    pub fn pasid_bits(&self) -> u8 {
        self.efr.read(AMD_EFR::PASMAX) as u8 + 1
    }

    /// Dirty-tracking summary.
    pub fn dirty_support(&self) -> DirtySupport {
        let mut missing = Vec::new();
        if !self.host_dirty() {
            missing.push(Requirement::AmdHdSup);
        }
        DirtySupport {
            vendor: Vendor::Amd,
            mechanism: DirtyMechanism::AmdHostDirty,
            access_flag: self.host_access(),
            page_sizes: AMD_V1_PAGE_SIZES,
            // x86 PTE updates are 64-bit atomic; the kernel replaces entries in place.
            live_split: true,
            missing,
        }
    }
}

impl fmt::Debug for AmdCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmdCaps")
            .field("efr", &format_args!("{:#018x}", self.raw()))
            .field("host_dirty", &self.host_dirty())
            .field("host_access", &self.host_access())
            .field("guest_translation", &self.guest_translation())
            .field("ppr", &self.ppr())
            .finish()
    }
}

/// Decoded VT-d capability and extended capability registers.
#[derive(Clone, Copy)]
pub struct VtdCaps {
    cap: LocalRegisterCopy<u64, VTD_CAP::Register>,
    ecap: LocalRegisterCopy<u64, VTD_ECAP::Register>,
}

impl VtdCaps {
    /// Decode CAP (offset 0x08) and ECAP (offset 0x10).
    pub const fn from_regs(cap: u64, ecap: u64) -> Self {
        VtdCaps {
            cap: LocalRegisterCopy::new(cap),
            ecap: LocalRegisterCopy::new(ecap),
        }
    }

    /// The raw CAP value.
    pub fn cap(&self) -> u64 {
        self.cap.get()
    }

    /// The raw ECAP value.
    pub fn ecap(&self) -> u64 {
        self.ecap.get()
    }

    /// Supported second-stage address widths in bits (39, 48, 57), from CAP.SAGAW.
    pub fn address_widths(&self) -> Vec<u8> {
        let sagaw = self.cap.read(VTD_CAP::SAGAW);
        [(1u64, 39u8), (2, 48), (3, 57)]
            .into_iter()
            .filter(|&(bit, _)| sagaw & (1 << bit) != 0)
            .map(|(_, w)| w)
            .collect()
    }

    /// Maximum guest address width (CAP.MGAW + 1).
    pub fn mgaw(&self) -> u8 {
        self.cap.read(VTD_CAP::MGAW) as u8 + 1
    }

    /// Number of domain IDs (2^(4 + 2*ND)); ND values above 6 are reserved and saturate.
    pub fn domains(&self) -> u32 {
        1u32 << (4 + 2 * self.cap.read(VTD_CAP::ND).min(6) as u32)
    }

    /// CAP.CM: caching mode (set by emulated IOMMUs such as QEMU's intel-iommu).
    pub fn caching_mode(&self) -> bool {
        self.cap.is_set(VTD_CAP::CM)
    }

    /// CAP.PSI: page-selective IOTLB invalidation.
    pub fn page_selective_invalidation(&self) -> bool {
        self.cap.is_set(VTD_CAP::PSI)
    }

    /// CAP.DWD / CAP.DRD: write and read draining on invalidation.
    pub fn draining(&self) -> (bool, bool) {
        (self.cap.is_set(VTD_CAP::DWD), self.cap.is_set(VTD_CAP::DRD))
    }

    /// Second-stage leaf sizes (bitmap of byte sizes): 4 KiB, plus 2 MiB and 1 GiB per SLLPS.
    pub fn second_stage_page_sizes(&self) -> u64 {
        let sllps = self.cap.read(VTD_CAP::SLLPS);
        let mut sizes = 1u64 << 12;
        if sllps & 1 != 0 {
            sizes |= 1 << 21;
        }
        if sllps & 2 != 0 {
            sizes |= 1 << 30;
        }
        sizes
    }

    /// First-stage leaf sizes (bitmap of byte sizes): 4 KiB and 2 MiB always, 1 GiB with
    /// CAP.FS1GP (bit 56).
    pub fn first_stage_page_sizes(&self) -> u64 {
        let mut sizes = (1u64 << 12) | (1 << 21);
        if self.cap.is_set(VTD_CAP::FL1GP) {
            sizes |= 1 << 30;
        }
        sizes
    }

    /// CAP.FS5LP (bit 60): first-stage 5-level paging (PASID entry FLPM = 01b).
    pub fn first_stage_5level(&self) -> bool {
        self.cap.is_set(VTD_CAP::FL5LP)
    }

    /// Byte offset of the first fault-recording register from the unit's base (CAP.FRO × 16).
    pub fn fault_record_offset(&self) -> u64 {
        self.cap.read(VTD_CAP::FRO) * 16
    }

    /// Number of fault-recording registers (CAP.NFR + 1).
    pub fn fault_records(&self) -> u32 {
        self.cap.read(VTD_CAP::NFR) as u32 + 1
    }

    /// CAP.MAMV: the largest address mask (AM) a page-selective invalidation accepts.
    pub fn max_address_mask(&self) -> u8 {
        self.cap.read(VTD_CAP::MAMV) as u8
    }

    /// Byte offset of the IOTLB registers (IVA, then IOTLB at +8) from the unit's base
    /// (ECAP.IRO × 16).
    pub fn iotlb_offset(&self) -> u64 {
        self.ecap.read(VTD_ECAP::IRO) * 16
    }

    /// ECAP.SMTS: scalable-mode translation.
    pub fn scalable_mode(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::SMTS)
    }

    /// ECAP.SLADS: second-stage accessed/dirty bits.
    pub fn second_stage_ad(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::SLADS)
    }

    /// ECAP.SLTS: second-stage translation.
    pub fn second_stage(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::SLTS)
    }

    /// ECAP.FLTS: first-stage translation.
    pub fn first_stage(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::FLTS)
    }

    /// ECAP.NEST: nested translation.
    pub fn nested(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::NEST)
    }

    /// ECAP.SMPWC: scalable-mode page-walk coherency.
    pub fn scalable_page_walk_coherent(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::SMPWC)
    }

    /// ECAP.C: page-walk coherency (legacy mode).
    pub fn coherent(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::C)
    }

    /// ECAP.QI: queued invalidation.
    pub fn queued_invalidation(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::QI)
    }

    /// ECAP.DT: device-TLB (ATS).
    pub fn device_tlb(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::DT)
    }

    /// ECAP.IR: interrupt remapping.
    pub fn interrupt_remapping(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::IR)
    }

    /// ECAP.PT: pass-through.
    pub fn pass_through(&self) -> bool {
        self.ecap.is_set(VTD_ECAP::PT)
    }

    /// ECAP.PASID with the PASID width (ECAP.PSS + 1), if supported.
    pub fn pasid_bits(&self) -> Option<u8> {
        self.ecap
            .is_set(VTD_ECAP::PASID)
            .then(|| self.ecap.read(VTD_ECAP::PSS) as u8 + 1)
    }

    /// Dirty-tracking summary, with Linux 6.12's rule (`ssads_supported`: SMTS, SLADS and
    /// SMPWC) plus second-stage translation itself.
    pub fn dirty_support(&self) -> DirtySupport {
        let mut missing = Vec::new();
        if !self.scalable_mode() {
            missing.push(Requirement::VtdSmts);
        }
        if !self.second_stage() {
            missing.push(Requirement::VtdSlts);
        }
        if !self.second_stage_ad() {
            missing.push(Requirement::VtdSlads);
        }
        if !self.scalable_page_walk_coherent() {
            missing.push(Requirement::VtdSmpwc);
        }
        DirtySupport {
            vendor: Vendor::Intel,
            mechanism: DirtyMechanism::VtdSecondStageAd,
            access_flag: self.second_stage_ad(),
            page_sizes: self.second_stage_page_sizes(),
            live_split: true,
            missing,
        }
    }
}

impl fmt::Debug for VtdCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VtdCaps")
            .field("cap", &format_args!("{:#018x}", self.cap()))
            .field("ecap", &format_args!("{:#018x}", self.ecap()))
            .field("address_widths", &self.address_widths())
            .field("caching_mode", &self.caching_mode())
            .field("scalable_mode", &self.scalable_mode())
            .field("second_stage_ad", &self.second_stage_ad())
            .finish()
    }
}

/// SMMU_IDR0.HTTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Httu {
    /// No hardware table updates.
    None,
    /// Access flag updates only.
    Access,
    /// Access flag and dirty state updates.
    AccessDirty,
    /// 0b11, reserved.
    Reserved,
}

/// Decoded SMMUv3 ID registers.
#[derive(Clone, Copy)]
pub struct SmmuCaps {
    idr0: LocalRegisterCopy<u32, SMMU_IDR0::Register>,
    idr3: LocalRegisterCopy<u32, SMMU_IDR3::Register>,
}

impl SmmuCaps {
    /// Decode IDR0 and IDR3.
    pub const fn from_regs(idr0: u32, idr3: u32) -> Self {
        SmmuCaps {
            idr0: LocalRegisterCopy::new(idr0),
            idr3: LocalRegisterCopy::new(idr3),
        }
    }

    /// Decode the `idr[6]` array of iommufd's `struct iommu_hw_info_arm_smmuv3`.
    pub const fn from_idr(idr: &[u32; 6]) -> Self {
        Self::from_regs(idr[0], idr[3])
    }

    /// The raw IDR0 value.
    pub fn idr0(&self) -> u32 {
        self.idr0.get()
    }

    /// IDR0.HTTU.
    pub fn httu(&self) -> Httu {
        match self.idr0.read(SMMU_IDR0::HTTU) {
            0 => Httu::None,
            1 => Httu::Access,
            2 => Httu::AccessDirty,
            _ => Httu::Reserved,
        }
    }

    /// IDR0.COHACC.
    pub fn coherent(&self) -> bool {
        self.idr0.is_set(SMMU_IDR0::COHACC)
    }

    /// IDR0.S1P.
    pub fn stage1(&self) -> bool {
        self.idr0.is_set(SMMU_IDR0::S1P)
    }

    /// IDR0.S2P.
    pub fn stage2(&self) -> bool {
        self.idr0.is_set(SMMU_IDR0::S2P)
    }

    /// IDR0.TTF includes AArch64 tables.
    pub fn aarch64_tables(&self) -> bool {
        self.idr0.read(SMMU_IDR0::TTF) & 2 != 0
    }

    /// IDR0.ATS.
    pub fn ats(&self) -> bool {
        self.idr0.is_set(SMMU_IDR0::ATS)
    }

    /// IDR0.PRI.
    pub fn pri(&self) -> bool {
        self.idr0.is_set(SMMU_IDR0::PRI)
    }

    /// IDR3.BBML: 0, 1 or 2 (3 is reserved and reported as 3).
    pub fn bbm_level(&self) -> u8 {
        self.idr3.read(SMMU_IDR3::BBML) as u8
    }

    /// IDR3.RIL: range invalidation.
    pub fn range_invalidation(&self) -> bool {
        self.idr3.is_set(SMMU_IDR3::RIL)
    }

    /// Dirty-tracking summary with Linux 6.12's rule (`arm_smmu_dbm_capable`: HTTU dirty and
    /// coherent access).
    pub fn dirty_support(&self) -> DirtySupport {
        let mut missing = Vec::new();
        if self.httu() != Httu::AccessDirty {
            missing.push(Requirement::SmmuHttuDirty);
        }
        if !self.coherent() {
            missing.push(Requirement::SmmuCohacc);
        }
        DirtySupport {
            vendor: Vendor::Arm,
            mechanism: DirtyMechanism::SmmuHttuDbm,
            access_flag: matches!(self.httu(), Httu::Access | Httu::AccessDirty),
            page_sizes: (1 << 12) | (1 << 21) | (1 << 30),
            // Level 1 needs the nT sequence (IHI 0070 G.b §3.21.1.2): set nT in the block,
            // invalidate, then replace; a direct swap may raise F_TLB_CONFLICT. Only level 2
            // allows the crate's direct swap (§3.21.1.3).
            live_split: self.bbm_level() == 2,
            missing,
        }
    }
}

impl fmt::Debug for SmmuCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmmuCaps")
            .field("idr0", &format_args!("{:#010x}", self.idr0()))
            .field("httu", &self.httu())
            .field("coherent", &self.coherent())
            .field("stage1", &self.stage1())
            .field("stage2", &self.stage2())
            .field("bbm_level", &self.bbm_level())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_dirty_needs_hdsup() {
        let yes = AmdCaps::from_efr(1 << 52 | 1 << 49);
        assert!(yes.dirty_support().supported());
        assert!(yes.host_access());
        let no = AmdCaps::from_efr(!(1u64 << 52));
        let s = no.dirty_support();
        assert_eq!(s.missing, [Requirement::AmdHdSup]);
        assert!(s.to_string().contains("EFR.HDSup (bit 52)"), "{s}");
    }

    #[test]
    fn amd_page_sizes_match_linux() {
        // GENMASK_ULL(51, 12) ^ SZ_512G
        assert_eq!(AMD_V1_PAGE_SIZES, 0x000f_ff7f_ffff_f000);
    }

    #[test]
    fn vtd_rule_is_linux_ssads_supported() {
        let smts = 1u64 << 43;
        let slads = 1u64 << 45;
        let slts = 1u64 << 46;
        let smpwc = 1u64 << 48;
        let all = smts | slads | slts | smpwc;
        let caps = VtdCaps::from_regs(0, all);
        assert!(caps.dirty_support().supported());
        for (bit, req) in [
            (smts, Requirement::VtdSmts),
            (slads, Requirement::VtdSlads),
            (slts, Requirement::VtdSlts),
            (smpwc, Requirement::VtdSmpwc),
        ] {
            let s = VtdCaps::from_regs(0, all & !bit).dirty_support();
            assert_eq!(s.missing, [req]);
        }
    }

    #[test]
    fn vtd_cap_fields() {
        // SAGAW 39+48, MGAW 47, SLLPS 2M+1G, ND 6, CM.
        let cap = (0b0110u64 << 8) | (47 << 16) | (0b11 << 34) | 6 | (1 << 7);
        let c = VtdCaps::from_regs(cap, 0);
        assert_eq!(c.address_widths(), [39, 48]);
        assert_eq!(c.mgaw(), 48);
        assert_eq!(
            c.second_stage_page_sizes(),
            (1 << 12) | (1 << 21) | (1 << 30)
        );
        assert_eq!(c.domains(), 65536);
        assert!(c.caching_mode());
        assert_eq!(c.pasid_bits(), None);
    }

    #[test]
    fn vtd_values_qemu_10_reports() {
        // shared/recipes/vtd-firmware.md: CAP and ECAP of QEMU 10.0's intel-iommu with
        // x-scalable-mode=on,x-flts=on.
        let c = VtdCaps::from_regs(0x01d2_008c_222f_0606, 0x0000_8800_0000_0f42);
        assert_eq!(c.fault_record_offset(), 0x220);
        assert_eq!(c.fault_records(), 1);
        assert_eq!(c.iotlb_offset(), 0xf0);
        assert_eq!(c.max_address_mask(), 18);
        assert_eq!(c.mgaw(), 48);
        assert_eq!(c.address_widths(), [39, 48]);
        assert!(c.page_selective_invalidation());
        assert_eq!(
            c.first_stage_page_sizes(),
            (1 << 12) | (1 << 21) | (1 << 30)
        );
        assert!(!c.first_stage_5level());
        assert!(c.queued_invalidation() && c.pass_through() && c.scalable_mode());
        assert!(c.first_stage() && !c.second_stage() && c.pasid_bits().is_none());
        assert!(!c.interrupt_remapping());
    }

    #[test]
    fn smmu_httu_and_cohacc() {
        let idr0 = (2 << 6) | (1 << 4) | 0b11 | (2 << 2);
        let c = SmmuCaps::from_regs(idr0, 2 << 11);
        assert_eq!(c.httu(), Httu::AccessDirty);
        let s = c.dirty_support();
        assert!(s.supported());
        assert!(s.live_split);
        // BBML level 1: a live split needs the nT sequence, which the crate's split lacks.
        let c = SmmuCaps::from_regs(idr0, 1 << 11);
        assert_eq!(c.bbm_level(), 1);
        assert!(c.dirty_support().supported());
        assert!(!c.dirty_support().live_split);
        let c = SmmuCaps::from_regs(1 << 6, 0);
        let s = c.dirty_support();
        assert_eq!(
            s.missing,
            [Requirement::SmmuHttuDirty, Requirement::SmmuCohacc]
        );
        assert!(!s.live_split);
        assert_eq!(SmmuCaps::from_regs(3 << 6, 0).httu(), Httu::Reserved);
    }

    #[test]
    fn any_value_decodes() {
        for v in [0u64, u64::MAX, 0x5555_5555_5555_5555, 0xaaaa_aaaa_aaaa_aaaa] {
            let _ = AmdCaps::from_efr(v).dirty_support().to_string();
            let _ = VtdCaps::from_regs(v, !v).dirty_support().to_string();
            let c = VtdCaps::from_regs(v, v);
            let _ = (c.domains(), c.mgaw(), c.address_widths(), c.pasid_bits());
            let _ = SmmuCaps::from_regs(v as u32, (v >> 32) as u32)
                .dirty_support()
                .to_string();
        }
    }
}
