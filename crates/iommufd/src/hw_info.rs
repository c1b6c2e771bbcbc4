//! `IOMMU_GET_HW_INFO`: the capabilities of the IOMMU behind a bound device.
//!
//! The generic part (`out_capabilities`, `out_max_pasid_log2`) says whether dirty tracking is
//! available. The vendor part is the raw registers of the IOMMU (VT-d CAP/ECAP, SMMUv3 IDR0..5,
//! AMD EFR/EFR2, or the selftest mock's test register); this crate returns them typed and leaves
//! field decoding to `livemig-iommu-pt`, which owns the register maps. Types this crate does not
//! know are kept raw.

use crate::abi;
use crate::error::Error;

bitflags::bitflags! {
    /// `IOMMU_HW_CAP_*` (`enum iommufd_hw_capabilities`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HwCaps: u64 {
        /// `IOMMU_HW_CAP_DIRTY_TRACKING`: HWPT dirty tracking and dirty bitmaps are supported.
        const DIRTY_TRACKING = abi::IOMMU_HW_CAP_DIRTY_TRACKING;
        /// `IOMMU_HW_CAP_PCI_PASID_EXEC`.
        const PCI_PASID_EXEC = abi::IOMMU_HW_CAP_PCI_PASID_EXEC;
        /// `IOMMU_HW_CAP_PCI_PASID_PRIV`.
        const PCI_PASID_PRIV = abi::IOMMU_HW_CAP_PCI_PASID_PRIV;
        // Keep bits from newer kernels.
        const _ = !0;
    }
}

/// `enum iommu_hw_info_type`, plus the selftest type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum HwInfoType {
    /// The driver reports no vendor data.
    None = abi::IOMMU_HW_INFO_TYPE_NONE,
    /// Intel VT-d.
    IntelVtd = abi::IOMMU_HW_INFO_TYPE_INTEL_VTD,
    /// ARM SMMUv3 (Linux 6.14+).
    ArmSmmuV3 = abi::IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
    /// NVIDIA Tegra241 CMDQV.
    Tegra241Cmdqv = abi::IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV,
    /// AMD IOMMU.
    Amd = abi::IOMMU_HW_INFO_TYPE_AMD,
    /// The iommufd selftest mock IOMMU (`CONFIG_IOMMUFD_TEST`).
    Selftest = abi::IOMMU_HW_INFO_TYPE_SELFTEST,
}

impl TryFrom<u32> for HwInfoType {
    type Error = u32;

    /// Rejects (returns) values this crate does not know.
    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            abi::IOMMU_HW_INFO_TYPE_NONE => HwInfoType::None,
            abi::IOMMU_HW_INFO_TYPE_INTEL_VTD => HwInfoType::IntelVtd,
            abi::IOMMU_HW_INFO_TYPE_ARM_SMMUV3 => HwInfoType::ArmSmmuV3,
            abi::IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV => HwInfoType::Tegra241Cmdqv,
            abi::IOMMU_HW_INFO_TYPE_AMD => HwInfoType::Amd,
            abi::IOMMU_HW_INFO_TYPE_SELFTEST => HwInfoType::Selftest,
            other => return Err(other),
        })
    }
}

/// The vendor registers from `IOMMU_GET_HW_INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VendorInfo {
    /// No vendor data.
    None,
    /// `struct iommu_hw_info_vtd`.
    IntelVtd {
        /// `IOMMU_HW_INFO_VTD_*` flags (errata).
        flags: u32,
        /// Capability Register (VT-d spec 11.4.2).
        cap_reg: u64,
        /// Extended Capability Register (VT-d spec 11.4.3).
        ecap_reg: u64,
    },
    /// `struct iommu_hw_info_arm_smmuv3`.
    ArmSmmuV3 {
        /// Flags (0 today).
        flags: u32,
        /// SMMU_IDR0..5.
        idr: [u32; 6],
        /// SMMU_IIDR.
        iidr: u32,
        /// SMMU_AIDR.
        aidr: u32,
    },
    /// `struct iommu_hw_info_amd`.
    Amd {
        /// Extended Feature Register.
        efr: u64,
        /// Extended Feature 2 Register.
        efr2: u64,
    },
    /// `struct iommu_test_hw_info` of the selftest mock.
    Selftest {
        /// Flags.
        flags: u32,
        /// `IOMMU_HW_INFO_SELFTEST_REGVAL` (0xdeadbeef) on a correct kernel.
        test_reg: u32,
    },
    /// A type this crate does not decode: its number and bytes.
    Raw {
        /// `out_data_type`.
        data_type: u32,
        /// The data.
        data: Vec<u8>,
    },
}

/// The decoded result of `IOMMU_GET_HW_INFO` for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwInfo {
    /// `out_capabilities`.
    pub capabilities: HwCaps,
    /// `out_max_pasid_log2` (0: no PASID).
    pub max_pasid_log2: u8,
    /// The vendor registers.
    pub vendor: VendorInfo,
}

impl HwInfo {
    /// The IOMMU can track dirty pages for this device (`IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub fn dirty_tracking(&self) -> bool {
        self.capabilities.contains(HwCaps::DIRTY_TRACKING)
    }

    /// The vendor type.
    pub fn data_type(&self) -> u32 {
        match &self.vendor {
            VendorInfo::None => abi::IOMMU_HW_INFO_TYPE_NONE,
            VendorInfo::IntelVtd { .. } => abi::IOMMU_HW_INFO_TYPE_INTEL_VTD,
            VendorInfo::ArmSmmuV3 { .. } => abi::IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
            VendorInfo::Amd { .. } => abi::IOMMU_HW_INFO_TYPE_AMD,
            VendorInfo::Selftest { .. } => abi::IOMMU_HW_INFO_TYPE_SELFTEST,
            VendorInfo::Raw { data_type, .. } => *data_type,
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the vendor data of type `data_type` (host-endian, as the kernel copies it). Data
/// shorter than the type's structure is an error; longer data (a newer kernel's larger
/// structure) is accepted and the known prefix decoded.
pub fn decode_vendor(data_type: u32, data: &[u8]) -> Result<VendorInfo, Error> {
    let need = |n: usize| {
        if data.len() < n {
            Err(Error::ShortHwInfo {
                data_type,
                len: data.len(),
                need: n,
            })
        } else {
            Ok(())
        }
    };
    Ok(match HwInfoType::try_from(data_type) {
        Ok(HwInfoType::None) => VendorInfo::None,
        Ok(HwInfoType::IntelVtd) => {
            need(core::mem::size_of::<abi::iommu_hw_info_vtd>())?;
            VendorInfo::IntelVtd {
                flags: u32_at(data, 0),
                cap_reg: u64_at(data, 8),
                ecap_reg: u64_at(data, 16),
            }
        }
        Ok(HwInfoType::ArmSmmuV3) => {
            need(core::mem::size_of::<abi::iommu_hw_info_arm_smmuv3>())?;
            let mut idr = [0u32; 6];
            for (i, r) in idr.iter_mut().enumerate() {
                *r = u32_at(data, 8 + 4 * i);
            }
            VendorInfo::ArmSmmuV3 {
                flags: u32_at(data, 0),
                idr,
                iidr: u32_at(data, 32),
                aidr: u32_at(data, 36),
            }
        }
        Ok(HwInfoType::Amd) => {
            need(core::mem::size_of::<abi::iommu_hw_info_amd>())?;
            VendorInfo::Amd {
                efr: u64_at(data, 0),
                efr2: u64_at(data, 8),
            }
        }
        Ok(HwInfoType::Selftest) => {
            need(core::mem::size_of::<abi::iommu_test_hw_info>())?;
            VendorInfo::Selftest {
                flags: u32_at(data, 0),
                test_reg: u32_at(data, 4),
            }
        }
        Ok(HwInfoType::Tegra241Cmdqv) | Err(_) => VendorInfo::Raw {
            data_type,
            data: data.to_vec(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_known_type_and_keeps_unknown_raw() {
        let mut vtd = vec![0u8; 24];
        vtd[8..16].copy_from_slice(&0x00d2_0084_3c06_0462u64.to_ne_bytes());
        vtd[16..24].copy_from_slice(&0x0000_0000_00f0_50dau64.to_ne_bytes());
        assert_eq!(
            decode_vendor(1, &vtd).unwrap(),
            VendorInfo::IntelVtd {
                flags: 0,
                cap_reg: 0x00d2_0084_3c06_0462,
                ecap_reg: 0xf0_50da
            }
        );
        let mut smmu = vec![0u8; 40];
        smmu[8..12].copy_from_slice(&0x0e3b_ffffu32.to_ne_bytes());
        smmu[36..40].copy_from_slice(&2u32.to_ne_bytes());
        match decode_vendor(2, &smmu).unwrap() {
            VendorInfo::ArmSmmuV3 { idr, aidr, .. } => {
                assert_eq!(idr[0], 0x0e3b_ffff);
                assert_eq!(aidr, 2);
            }
            other => panic!("{other:?}"),
        }
        let mut st = vec![0u8; 8];
        st[4..8].copy_from_slice(&abi::IOMMU_HW_INFO_SELFTEST_REGVAL.to_ne_bytes());
        assert_eq!(
            decode_vendor(abi::IOMMU_HW_INFO_TYPE_SELFTEST, &st).unwrap(),
            VendorInfo::Selftest {
                flags: 0,
                test_reg: 0xdead_beef
            }
        );
        assert_eq!(
            decode_vendor(77, &[1, 2, 3]).unwrap(),
            VendorInfo::Raw {
                data_type: 77,
                data: vec![1, 2, 3]
            }
        );
        assert_eq!(decode_vendor(0, &[]).unwrap(), VendorInfo::None);
    }

    #[test]
    fn short_data_is_an_error_naming_the_sizes() {
        let e = decode_vendor(1, &[0; 16]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "IOMMU_GET_HW_INFO returned 16 bytes of type 0x1, which needs 24"
        );
        // Longer data from a newer kernel decodes its known prefix.
        assert!(matches!(
            decode_vendor(4, &[0; 32]).unwrap(),
            VendorInfo::Amd { .. }
        ));
    }

    #[test]
    fn hw_info_type_try_from() {
        assert_eq!(HwInfoType::try_from(0xfeed_beef), Ok(HwInfoType::Selftest));
        assert_eq!(HwInfoType::try_from(9), Err(9));
    }
}
