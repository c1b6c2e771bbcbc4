//! PCI identities of the HiSilicon ACC functions.
//!
//! Vendor and VF device IDs: Linux 6.12 `include/linux/pci_ids.h` (`PCI_VENDOR_ID_HUAWEI`,
//! `PCI_DEVICE_ID_HUAWEI_{ZIP,SEC,HPRE}_VF`); PF IDs: `drivers/crypto/hisilicon/{zip/zip_main.c,
//! sec2/sec_main.c, hpre/hpre_main.c}`.

use core::fmt;

use crate::regs::PfReg;

/// `PCI_VENDOR_ID_HUAWEI`.
pub const PCI_VENDOR_ID_HUAWEI: u16 = 0x19e5;

/// The accelerator behind a QM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccKind {
    /// SEC: symmetric crypto.
    Sec,
    /// HPRE: public-key crypto.
    Hpre,
    /// ZIP: compression.
    Zip,
}

impl AccKind {
    /// All three.
    pub const ALL: [AccKind; 3] = [AccKind::Sec, AccKind::Hpre, AccKind::Zip];

    /// The VF's PCI device ID.
    pub const fn vf_device_id(self) -> u16 {
        match self {
            AccKind::Sec => 0xa256,
            AccKind::Hpre => 0xa259,
            AccKind::Zip => 0xa251,
        }
    }

    /// The PF's PCI device ID.
    pub const fn pf_device_id(self) -> u16 {
        match self {
            AccKind::Sec => 0xa255,
            AccKind::Hpre => 0xa258,
            AccKind::Zip => 0xa250,
        }
    }

    /// The kind of a VF device ID.
    pub const fn from_vf_device_id(id: u16) -> Option<AccKind> {
        match id {
            0xa256 => Some(AccKind::Sec),
            0xa259 => Some(AccKind::Hpre),
            0xa251 => Some(AccKind::Zip),
            _ => None,
        }
    }

    /// The PF register holding the accelerator core's interrupt status
    /// (`hisi_acc_check_int_state`).
    pub const fn core_int_status(self) -> PfReg {
        match self {
            AccKind::Sec => PfReg::SecCoreIntStatus,
            AccKind::Hpre => PfReg::HpreHacIntStatus,
            AccKind::Zip => PfReg::HzipCoreIntStatus,
        }
    }
}

impl fmt::Display for AccKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccKind::Sec => "SEC",
            AccKind::Hpre => "HPRE",
            AccKind::Zip => "ZIP",
        })
    }
}
