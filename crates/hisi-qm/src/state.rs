//! `struct acc_vf_data`: the device state a HiSilicon ACC VF migrates, in all three layouts.
//!
//! ```text
//!  upstream V1/V2 (176 bytes; the first 40 are the match block sent early in PRE_COPY)
//!   0 acc_magic u64 | 8 qp_num | 12 dev_id | 16 que_iso_cfg | 20 qp_base | 24 vf_qm_state
//!  28 major u16 | 30 minor u16 (V2; V1: reserved) | 32 qm_rsv_state[2]            -> 40
//!  40 aeq_int_mask | 44 eq_int_mask | 48 ifc_int_source | 52 ifc_int_mask | 56 ifc_int_set
//!  60 page_size | 64 qm_eqc_dw[7] | 92 qm_aeqc_dw[7] | 120 qm_rsv_regs[5] | 140 padding
//! 144 eqe_dma u64 | 152 aeqe_dma | 160 sqc_dma | 168 cqc_dma                          -> 176
//!
//!  RFC v2 (seed 003; 168 bytes, no magic; 32-byte match block)
//!   0 qp_num | 4 dev_id | 8 que_iso_cfg | 12 qp_base | 16 qm_rsv_state[4]             -> 32
//!  32 aeq_int_mask .. 52 page_size | 56 vf_state | 60 qm_eqc_dw[7] | 88 qm_aeqc_dw[7]
//! 116 qm_rsv_regs[5] | 136 eqe_dma u64 | 144 aeqe_dma | 152 sqc_dma | 160 cqc_dma       -> 168
//! ```
//!
//! All fields little endian (the kernel copies the struct as it lies in memory; every ACC host
//! is a little-endian arm64 Kunpeng). The offsets are not hand-counted: each layout is a private
//! `#[repr(C)]` mirror of the C struct with native integer fields, its size and offsets checked at
//! compile time, and the byte codec reads and writes at the mirror's `offset_of!` — which also
//! proves the RFC v2 layout has no padding before `eqe_dma` (136 is 8-aligned) and is 168 bytes.
//!
//! Sources: Linux 6.12 `drivers/vfio/pci/hisilicon/hisi_acc_vfio_pci.h` (V2 struct,
//! `ACC_DEV_MAGIC_V1`/`_V2`, `ACC_DRV_MAJOR_VER`/`_MINOR_VER`, `QM_MATCH_SIZE`),
//! `hisi_acc_vfio_pci.c` (`vf_qm_version_check`: V2 needs major 1, V1 gets its EQE/AEQE DMA
//! addresses rebuilt from EQC/AEQC DW1 (low) and DW2 (high); `vf_qm_load_data`: a transfer is the
//! match block alone or the whole struct); V1 is the same struct with `u32 qm_rsv_state[3]` in
//! place of the version fields; RFC v2 from seed 003 (`struct acc_vf_data`, `QM_MATCH_SIZE 32`,
//! `enum vf_state`).

use alloc::vec::Vec;
use core::fmt;
use core::mem::{offset_of, size_of};

/// `ACC_DEV_MAGIC_V1`.
pub const ACC_DEV_MAGIC_V1: u64 = 0xCDCD_CDCD_FEED_AACC;
/// `ACC_DEV_MAGIC_V2`.
pub const ACC_DEV_MAGIC_V2: u64 = 0xAACC_FEED_DECA_DEDE;
/// `ACC_DRV_MAJOR_VER`: the only major version a V2 destination accepts.
pub const ACC_DRV_MAJOR_VER: u16 = 1;
/// `ACC_DRV_MINOR_VER`.
pub const ACC_DRV_MINOR_VER: u16 = 0;

/// The upstream struct as C lays it out (native integers; the wire is little endian).
#[repr(C)]
#[allow(dead_code)]
struct UpstreamC {
    acc_magic: u64,
    qp_num: u32,
    dev_id: u32,
    que_iso_cfg: u32,
    qp_base: u32,
    vf_qm_state: u32,
    major_ver: u16,
    minor_ver: u16,
    qm_rsv_state: [u32; 2],
    aeq_int_mask: u32,
    eq_int_mask: u32,
    ifc_int_source: u32,
    ifc_int_mask: u32,
    ifc_int_set: u32,
    page_size: u32,
    qm_eqc_dw: [u32; 7],
    qm_aeqc_dw: [u32; 7],
    qm_rsv_regs: [u32; 5],
    padding: u32,
    eqe_dma: u64,
    aeqe_dma: u64,
    sqc_dma: u64,
    cqc_dma: u64,
}

/// The RFC v2 struct as C lays it out (`dma_addr_t` is 64 bits on arm64).
#[repr(C)]
#[allow(dead_code)]
struct RfcV2C {
    qp_num: u32,
    dev_id: u32,
    que_iso_cfg: u32,
    qp_base: u32,
    qm_rsv_state: [u32; 4],
    aeq_int_mask: u32,
    eq_int_mask: u32,
    ifc_int_source: u32,
    ifc_int_mask: u32,
    ifc_int_set: u32,
    page_size: u32,
    vf_state: u32,
    qm_eqc_dw: [u32; 7],
    qm_aeqc_dw: [u32; 7],
    qm_rsv_regs: [u32; 5],
    eqe_dma: u64,
    aeqe_dma: u64,
    sqc_dma: u64,
    cqc_dma: u64,
}

/// `sizeof(struct acc_vf_data)`, upstream V1 and V2.
pub const ACC_VF_DATA_LEN: usize = size_of::<UpstreamC>();
/// `QM_MATCH_SIZE`, upstream: `offsetofend(struct acc_vf_data, qm_rsv_state)`.
pub const QM_MATCH_SIZE: usize = offset_of!(UpstreamC, qm_rsv_state) + 8;
/// `sizeof(struct acc_vf_data)` of the RFC v2 driver.
pub const RFC_V2_LEN: usize = size_of::<RfcV2C>();
/// `QM_MATCH_SIZE` of the RFC v2 driver.
pub const RFC_V2_MATCH_SIZE: usize = offset_of!(RfcV2C, qm_rsv_state) + 16;

const _: () = {
    assert!(ACC_VF_DATA_LEN == 176);
    assert!(QM_MATCH_SIZE == 40);
    assert!(offset_of!(UpstreamC, qm_eqc_dw) == 64);
    assert!(offset_of!(UpstreamC, qm_aeqc_dw) == 92);
    assert!(offset_of!(UpstreamC, padding) == 140);
    assert!(offset_of!(UpstreamC, eqe_dma) == 144);
    assert!(RFC_V2_LEN == 168);
    assert!(RFC_V2_MATCH_SIZE == 32);
    assert!(offset_of!(RfcV2C, vf_state) == 56);
    assert!(offset_of!(RfcV2C, eqe_dma) == 136);
};

/// `QM_XQC_ADDR_LOW` / `QM_XQC_ADDR_HIGH`: the EQC/AEQC words holding the queue base address.
const XQC_ADDR_LOW: usize = 1;
const XQC_ADDR_HIGH: usize = 2;

/// Which `acc_vf_data` layout a blob uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The RFC v2 driver of seed 003 (never merged): no magic, 32-byte match block, 168 bytes.
    RfcV2,
    /// Upstream with `ACC_DEV_MAGIC_V1`: EQE/AEQE DMA addresses built from the wrong words.
    V1,
    /// Upstream with `ACC_DEV_MAGIC_V2` and a major/minor version.
    V2,
}

impl Layout {
    /// Bytes of the match block.
    pub const fn match_size(self) -> usize {
        match self {
            Layout::RfcV2 => RFC_V2_MATCH_SIZE,
            Layout::V1 | Layout::V2 => QM_MATCH_SIZE,
        }
    }

    /// Bytes of the whole struct.
    pub const fn full_size(self) -> usize {
        match self {
            Layout::RfcV2 => RFC_V2_LEN,
            Layout::V1 | Layout::V2 => ACC_VF_DATA_LEN,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::RfcV2 => "RFC v2",
            Layout::V1 => "upstream V1",
            Layout::V2 => "upstream V2",
        })
    }
}

/// Why a blob is not a valid `acc_vf_data`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Too short to hold even the magic.
    #[error("{len} bytes cannot hold an acc_vf_data magic (8 bytes)")]
    NoMagic {
        /// Bytes given.
        len: usize,
    },
    /// The first 8 bytes are neither magic.
    #[error(
        "unknown acc_vf_data magic {magic:#018x} (V1 is {ACC_DEV_MAGIC_V1:#018x}, V2 {ACC_DEV_MAGIC_V2:#018x}; RFC v2 blobs have none and need decode_rfc_v2)"
    )]
    UnknownMagic {
        /// The value found.
        magic: u64,
    },
    /// A length that is neither the match block nor the whole struct.
    #[error(
        "{layout} acc_vf_data must be {match_size} (match data only) or {full} bytes, not {len}"
    )]
    BadLength {
        /// The layout.
        layout: Layout,
        /// Bytes given.
        len: usize,
        /// The match block size.
        match_size: usize,
        /// The whole struct size.
        full: usize,
    },
    /// A V2 blob from another major version.
    #[error(
        "acc_vf_data version {major}.{minor} is not compatible with driver version {ACC_DRV_MAJOR_VER}.x"
    )]
    Version {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
    /// The VF state is not one the layout defines.
    #[error("{layout} VF state {value} is not defined (expected {max} at most)")]
    BadVfState {
        /// The layout.
        layout: Layout,
        /// The value found.
        value: u32,
        /// The largest defined value.
        max: u32,
    },
    /// A reserved field that every known sender leaves zero is not zero.
    #[error("{layout} reserved field {field} is {value:#x}, expected 0")]
    Reserved {
        /// The layout.
        layout: Layout,
        /// The field.
        field: &'static str,
        /// The first non-zero word.
        value: u32,
    },
    /// A DMA address disagrees with the EQC/AEQC words it was built from.
    #[error("{field} is {stored:#x} but {source_words} give {from_words:#x}: the state is corrupt")]
    Inconsistent {
        /// The field.
        field: &'static str,
        /// The words it is built from.
        source_words: &'static str,
        /// Stored value.
        stored: u64,
        /// Value from the words.
        from_words: u64,
    },
}

/// `enum qm_vf_state` (upstream) / `enum vf_state` (RFC v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VfQmState {
    /// 0: `QM_READY` / `VF_READY`: the guest driver started the VF.
    Ready,
    /// 1: `QM_NOT_READY` / `VF_NOT_READY`: the VF was never started; only match data moves.
    NotReady,
    /// 2: RFC v2 `VF_PREPARE`.
    Prepare,
}

impl VfQmState {
    /// The raw value.
    pub const fn raw(self) -> u32 {
        match self {
            VfQmState::Ready => 0,
            VfQmState::NotReady => 1,
            VfQmState::Prepare => 2,
        }
    }
}

/// The registers and addresses of a full blob (absent when only match data was sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QmRegState {
    /// `QM_VF_AEQ_INT_MASK`.
    pub aeq_int_mask: u32,
    /// `QM_VF_EQ_INT_MASK`.
    pub eq_int_mask: u32,
    /// `QM_IFC_INT_SOURCE_V`.
    pub ifc_int_source: u32,
    /// `QM_IFC_INT_MASK`.
    pub ifc_int_mask: u32,
    /// `QM_IFC_INT_SET_V`.
    pub ifc_int_set: u32,
    /// `QM_PAGE_SIZE`.
    pub page_size: u32,
    /// `QM_EQC_DW0..6`.
    pub eqc_dw: [u32; 7],
    /// `QM_AEQC_DW0..6`.
    pub aeqc_dw: [u32; 7],
    /// Reserved register words (zero from every known sender).
    pub rsv_regs: [u32; 5],
    /// Event queue base (`eqe_dma`).
    pub eqe_dma: u64,
    /// Asynchronous event queue base (`aeqe_dma`).
    pub aeqe_dma: u64,
    /// SQC table base (`sqc_dma`, from `QM_MB_CMD_SQC_BT`).
    pub sqc_dma: u64,
    /// CQC table base (`cqc_dma`, from `QM_MB_CMD_CQC_BT`).
    pub cqc_dma: u64,
}

impl QmRegState {
    /// The EQE base as the EQC words hold it.
    pub fn eqe_from_words(&self) -> u64 {
        (u64::from(self.eqc_dw[XQC_ADDR_HIGH]) << 32) | u64::from(self.eqc_dw[XQC_ADDR_LOW])
    }

    /// The AEQE base as the AEQC words hold it.
    pub fn aeqe_from_words(&self) -> u64 {
        (u64::from(self.aeqc_dw[XQC_ADDR_HIGH]) << 32) | u64::from(self.aeqc_dw[XQC_ADDR_LOW])
    }

    /// Whether all four DMA addresses are set (`vf_qm_load_data` skips loading otherwise).
    pub fn addresses_present(&self) -> bool {
        self.eqe_dma != 0 && self.aeqe_dma != 0 && self.sqc_dma != 0 && self.cqc_dma != 0
    }
}

/// A decoded `acc_vf_data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccVfData {
    /// The layout it came in (or will be encoded in).
    pub layout: Layout,
    /// V2 major and minor version (0.0 for V1 and RFC v2).
    pub version: (u16, u16),
    /// `qp_num`: queues of the VF.
    pub qp_num: u32,
    /// `dev_id`: the VF's PCI device ID.
    pub dev_id: u32,
    /// `que_iso_cfg`: the PF's `QM_QUE_ISO_CFG_V`.
    pub que_iso_cfg: u32,
    /// `qp_base`: the VF's first queue.
    pub qp_base: u32,
    /// `vf_qm_state` (RFC v2: `vf_state`, which is not in its match block).
    pub vf_state: VfQmState,
    /// Registers and addresses; `None` when only the match block was transferred.
    pub regs: Option<QmRegState>,
    /// `true` when decoding rebuilt V1's EQE/AEQE addresses from the EQC/AEQC words.
    pub v1_fixup_applied: bool,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

fn words<const N: usize>(b: &[u8], off: usize) -> [u32; N] {
    core::array::from_fn(|i| u32_at(b, off + 4 * i))
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn first_nonzero(ws: &[u32]) -> Option<u32> {
    ws.iter().copied().find(|&w| w != 0)
}

impl AccVfData {
    /// Decode an upstream blob (V1 or V2, told apart by the magic), as the destination driver
    /// validates it — and a little more:
    ///
    /// * the length must be exactly the match block (40) or the whole struct (176);
    /// * V2 needs major version 1 (`vf_qm_version_check`); any minor is accepted;
    /// * V1's `eqe_dma`/`aeqe_dma` are rebuilt from EQC/AEQC DW2:DW1, as the driver does;
    /// * beyond the kernel: the VF state must be 0 or 1, reserved words must be zero (every
    ///   kernel sender zeroes them; V2 blobs with a minor version above 0 may use them), and a V2
    ///   blob's `eqe_dma`/`aeqe_dma` must equal the EQC/AEQC words they were built from.
    ///
    /// Any byte string decodes to a value or a [`StateError`]; nothing panics.
    pub fn decode(bytes: &[u8]) -> Result<AccVfData, StateError> {
        if bytes.len() < 8 {
            return Err(StateError::NoMagic { len: bytes.len() });
        }
        let layout = match u64_at(bytes, offset_of!(UpstreamC, acc_magic)) {
            ACC_DEV_MAGIC_V1 => Layout::V1,
            ACC_DEV_MAGIC_V2 => Layout::V2,
            magic => return Err(StateError::UnknownMagic { magic }),
        };
        Self::check_len(layout, bytes.len())?;
        let b = bytes;
        let version_word = u32_at(b, offset_of!(UpstreamC, major_ver));
        let (major, minor) = (version_word as u16, (version_word >> 16) as u16);
        let mut version = (0, 0);
        let reserved_strict = match layout {
            Layout::V2 => {
                if major != ACC_DRV_MAJOR_VER {
                    return Err(StateError::Version { major, minor });
                }
                version = (major, minor);
                minor == 0
            }
            _ => true,
        };
        let rsv_state: [u32; 2] = words(b, offset_of!(UpstreamC, qm_rsv_state));
        if reserved_strict {
            // V1 has three reserved words here: the version word and the two V2 kept.
            let v1_word = if layout == Layout::V1 {
                version_word
            } else {
                0
            };
            if let Some(value) = first_nonzero(&[v1_word, rsv_state[0], rsv_state[1]]) {
                return Err(StateError::Reserved {
                    layout,
                    field: "qm_rsv_state",
                    value,
                });
            }
        }
        let vf_state = match u32_at(b, offset_of!(UpstreamC, vf_qm_state)) {
            0 => VfQmState::Ready,
            1 => VfQmState::NotReady,
            value => {
                return Err(StateError::BadVfState {
                    layout,
                    value,
                    max: 1,
                });
            }
        };
        let mut v1_fixup_applied = false;
        let regs = if b.len() == ACC_VF_DATA_LEN {
            let mut r = QmRegState {
                aeq_int_mask: u32_at(b, offset_of!(UpstreamC, aeq_int_mask)),
                eq_int_mask: u32_at(b, offset_of!(UpstreamC, eq_int_mask)),
                ifc_int_source: u32_at(b, offset_of!(UpstreamC, ifc_int_source)),
                ifc_int_mask: u32_at(b, offset_of!(UpstreamC, ifc_int_mask)),
                ifc_int_set: u32_at(b, offset_of!(UpstreamC, ifc_int_set)),
                page_size: u32_at(b, offset_of!(UpstreamC, page_size)),
                eqc_dw: words(b, offset_of!(UpstreamC, qm_eqc_dw)),
                aeqc_dw: words(b, offset_of!(UpstreamC, qm_aeqc_dw)),
                rsv_regs: words(b, offset_of!(UpstreamC, qm_rsv_regs)),
                eqe_dma: u64_at(b, offset_of!(UpstreamC, eqe_dma)),
                aeqe_dma: u64_at(b, offset_of!(UpstreamC, aeqe_dma)),
                sqc_dma: u64_at(b, offset_of!(UpstreamC, sqc_dma)),
                cqc_dma: u64_at(b, offset_of!(UpstreamC, cqc_dma)),
            };
            if reserved_strict {
                let padding = u32_at(b, offset_of!(UpstreamC, padding));
                let mut all = [0u32; 6];
                all[..5].copy_from_slice(&r.rsv_regs);
                all[5] = padding;
                if let Some(value) = first_nonzero(&all) {
                    return Err(StateError::Reserved {
                        layout,
                        field: "qm_rsv_regs/padding",
                        value,
                    });
                }
            }
            match layout {
                Layout::V1 => {
                    r.eqe_dma = r.eqe_from_words();
                    r.aeqe_dma = r.aeqe_from_words();
                    v1_fixup_applied = true;
                }
                _ => Self::check_consistent(&r)?,
            }
            Some(r)
        } else {
            None
        };
        Ok(AccVfData {
            layout,
            version,
            qp_num: u32_at(b, offset_of!(UpstreamC, qp_num)),
            dev_id: u32_at(b, offset_of!(UpstreamC, dev_id)),
            que_iso_cfg: u32_at(b, offset_of!(UpstreamC, que_iso_cfg)),
            qp_base: u32_at(b, offset_of!(UpstreamC, qp_base)),
            vf_state,
            regs,
            v1_fixup_applied,
        })
    }

    /// Decode a blob of the RFC v2 driver (seed 003), which has no magic to recognise it by:
    /// 32 (match block) or 168 bytes; `vf_state` 0..=2; the EQE/AEQE addresses must agree with
    /// the EQC/AEQC words (that driver built them correctly).
    pub fn decode_rfc_v2(bytes: &[u8]) -> Result<AccVfData, StateError> {
        let layout = Layout::RfcV2;
        Self::check_len(layout, bytes.len())?;
        let b = bytes;
        let (vf_state, regs) = if b.len() == RFC_V2_LEN {
            let vf_state = match u32_at(b, offset_of!(RfcV2C, vf_state)) {
                0 => VfQmState::Ready,
                1 => VfQmState::NotReady,
                2 => VfQmState::Prepare,
                value => {
                    return Err(StateError::BadVfState {
                        layout,
                        value,
                        max: 2,
                    });
                }
            };
            let r = QmRegState {
                aeq_int_mask: u32_at(b, offset_of!(RfcV2C, aeq_int_mask)),
                eq_int_mask: u32_at(b, offset_of!(RfcV2C, eq_int_mask)),
                ifc_int_source: u32_at(b, offset_of!(RfcV2C, ifc_int_source)),
                ifc_int_mask: u32_at(b, offset_of!(RfcV2C, ifc_int_mask)),
                ifc_int_set: u32_at(b, offset_of!(RfcV2C, ifc_int_set)),
                page_size: u32_at(b, offset_of!(RfcV2C, page_size)),
                eqc_dw: words(b, offset_of!(RfcV2C, qm_eqc_dw)),
                aeqc_dw: words(b, offset_of!(RfcV2C, qm_aeqc_dw)),
                rsv_regs: words(b, offset_of!(RfcV2C, qm_rsv_regs)),
                eqe_dma: u64_at(b, offset_of!(RfcV2C, eqe_dma)),
                aeqe_dma: u64_at(b, offset_of!(RfcV2C, aeqe_dma)),
                sqc_dma: u64_at(b, offset_of!(RfcV2C, sqc_dma)),
                cqc_dma: u64_at(b, offset_of!(RfcV2C, cqc_dma)),
            };
            Self::check_consistent(&r)?;
            (vf_state, Some(r))
        } else {
            // The RFC match block carries no state; a VF that sent only it was not ready.
            (VfQmState::NotReady, None)
        };
        Ok(AccVfData {
            layout,
            version: (0, 0),
            qp_num: u32_at(b, offset_of!(RfcV2C, qp_num)),
            dev_id: u32_at(b, offset_of!(RfcV2C, dev_id)),
            que_iso_cfg: u32_at(b, offset_of!(RfcV2C, que_iso_cfg)),
            qp_base: u32_at(b, offset_of!(RfcV2C, qp_base)),
            vf_state,
            regs,
            v1_fixup_applied: false,
        })
    }

    fn check_len(layout: Layout, len: usize) -> Result<(), StateError> {
        if len == layout.match_size() || len == layout.full_size() {
            Ok(())
        } else {
            Err(StateError::BadLength {
                layout,
                len,
                match_size: layout.match_size(),
                full: layout.full_size(),
            })
        }
    }

    fn check_consistent(r: &QmRegState) -> Result<(), StateError> {
        for (field, source_words, stored, from_words) in [
            ("eqe_dma", "QM_EQC_DW2:DW1", r.eqe_dma, r.eqe_from_words()),
            (
                "aeqe_dma",
                "QM_AEQC_DW2:DW1",
                r.aeqe_dma,
                r.aeqe_from_words(),
            ),
        ] {
            if stored != from_words {
                return Err(StateError::Inconsistent {
                    field,
                    source_words,
                    stored,
                    from_words,
                });
            }
        }
        Ok(())
    }

    /// Encode in `self.layout`: the match block alone when `regs` is `None`, else the whole
    /// struct. Reserved words are written as zero; V1 blobs get addresses exactly as stored (a
    /// V1 sender's wrong addresses can be reproduced by storing them).
    pub fn encode(&self) -> Vec<u8> {
        match self.layout {
            Layout::RfcV2 => self.encode_rfc_v2(),
            Layout::V1 | Layout::V2 => {
                let len = if self.regs.is_some() {
                    ACC_VF_DATA_LEN
                } else {
                    QM_MATCH_SIZE
                };
                let mut b = alloc::vec![0u8; len];
                let magic = if self.layout == Layout::V1 {
                    ACC_DEV_MAGIC_V1
                } else {
                    ACC_DEV_MAGIC_V2
                };
                put64(&mut b, offset_of!(UpstreamC, acc_magic), magic);
                put32(&mut b, offset_of!(UpstreamC, qp_num), self.qp_num);
                put32(&mut b, offset_of!(UpstreamC, dev_id), self.dev_id);
                put32(&mut b, offset_of!(UpstreamC, que_iso_cfg), self.que_iso_cfg);
                put32(&mut b, offset_of!(UpstreamC, qp_base), self.qp_base);
                put32(
                    &mut b,
                    offset_of!(UpstreamC, vf_qm_state),
                    self.vf_state.raw().min(1),
                );
                if self.layout == Layout::V2 {
                    let v = u32::from(self.version.0) | (u32::from(self.version.1) << 16);
                    put32(&mut b, offset_of!(UpstreamC, major_ver), v);
                }
                if let Some(r) = &self.regs {
                    put32(&mut b, offset_of!(UpstreamC, aeq_int_mask), r.aeq_int_mask);
                    put32(&mut b, offset_of!(UpstreamC, eq_int_mask), r.eq_int_mask);
                    put32(
                        &mut b,
                        offset_of!(UpstreamC, ifc_int_source),
                        r.ifc_int_source,
                    );
                    put32(&mut b, offset_of!(UpstreamC, ifc_int_mask), r.ifc_int_mask);
                    put32(&mut b, offset_of!(UpstreamC, ifc_int_set), r.ifc_int_set);
                    put32(&mut b, offset_of!(UpstreamC, page_size), r.page_size);
                    for (i, w) in r.eqc_dw.iter().enumerate() {
                        put32(&mut b, offset_of!(UpstreamC, qm_eqc_dw) + 4 * i, *w);
                    }
                    for (i, w) in r.aeqc_dw.iter().enumerate() {
                        put32(&mut b, offset_of!(UpstreamC, qm_aeqc_dw) + 4 * i, *w);
                    }
                    for (i, w) in r.rsv_regs.iter().enumerate() {
                        put32(&mut b, offset_of!(UpstreamC, qm_rsv_regs) + 4 * i, *w);
                    }
                    put64(&mut b, offset_of!(UpstreamC, eqe_dma), r.eqe_dma);
                    put64(&mut b, offset_of!(UpstreamC, aeqe_dma), r.aeqe_dma);
                    put64(&mut b, offset_of!(UpstreamC, sqc_dma), r.sqc_dma);
                    put64(&mut b, offset_of!(UpstreamC, cqc_dma), r.cqc_dma);
                }
                b
            }
        }
    }

    fn encode_rfc_v2(&self) -> Vec<u8> {
        let len = if self.regs.is_some() {
            RFC_V2_LEN
        } else {
            RFC_V2_MATCH_SIZE
        };
        let mut b = alloc::vec![0u8; len];
        put32(&mut b, offset_of!(RfcV2C, qp_num), self.qp_num);
        put32(&mut b, offset_of!(RfcV2C, dev_id), self.dev_id);
        put32(&mut b, offset_of!(RfcV2C, que_iso_cfg), self.que_iso_cfg);
        put32(&mut b, offset_of!(RfcV2C, qp_base), self.qp_base);
        if let Some(r) = &self.regs {
            put32(&mut b, offset_of!(RfcV2C, aeq_int_mask), r.aeq_int_mask);
            put32(&mut b, offset_of!(RfcV2C, eq_int_mask), r.eq_int_mask);
            put32(&mut b, offset_of!(RfcV2C, ifc_int_source), r.ifc_int_source);
            put32(&mut b, offset_of!(RfcV2C, ifc_int_mask), r.ifc_int_mask);
            put32(&mut b, offset_of!(RfcV2C, ifc_int_set), r.ifc_int_set);
            put32(&mut b, offset_of!(RfcV2C, page_size), r.page_size);
            put32(&mut b, offset_of!(RfcV2C, vf_state), self.vf_state.raw());
            for (i, w) in r.eqc_dw.iter().enumerate() {
                put32(&mut b, offset_of!(RfcV2C, qm_eqc_dw) + 4 * i, *w);
            }
            for (i, w) in r.aeqc_dw.iter().enumerate() {
                put32(&mut b, offset_of!(RfcV2C, qm_aeqc_dw) + 4 * i, *w);
            }
            for (i, w) in r.rsv_regs.iter().enumerate() {
                put32(&mut b, offset_of!(RfcV2C, qm_rsv_regs) + 4 * i, *w);
            }
            put64(&mut b, offset_of!(RfcV2C, eqe_dma), r.eqe_dma);
            put64(&mut b, offset_of!(RfcV2C, aeqe_dma), r.aeqe_dma);
            put64(&mut b, offset_of!(RfcV2C, sqc_dma), r.sqc_dma);
            put64(&mut b, offset_of!(RfcV2C, cqc_dma), r.cqc_dma);
        }
        b
    }

    /// The same state as an upstream V2 blob (what this crate's save path produces and its
    /// resume path loads). RFC v2's `VF_PREPARE` (a VF prepared but never started) becomes
    /// `QM_NOT_READY`.
    pub fn to_v2(&self) -> AccVfData {
        let mut v = self.clone();
        v.layout = Layout::V2;
        v.version = (ACC_DRV_MAJOR_VER, ACC_DRV_MINOR_VER);
        if v.vf_state == VfQmState::Prepare {
            v.vf_state = VfQmState::NotReady;
        }
        v.v1_fixup_applied = false;
        v
    }

    /// Whether this blob carries only the match block.
    pub fn is_match_only(&self) -> bool {
        self.regs.is_none()
    }
}

impl fmt::Display for VfQmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VfQmState::Ready => "QM_READY",
            VfQmState::NotReady => "QM_NOT_READY",
            VfQmState::Prepare => "VF_PREPARE",
        })
    }
}

/// A register-dump view: hex values under the kernel's names.
impl fmt::Display for AccVfData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = crate::ids::AccKind::from_vf_device_id(self.dev_id as u16)
            .filter(|_| self.dev_id <= 0xffff);
        writeln!(
            f,
            "acc_vf_data {} {}.{} ({} bytes)",
            self.layout,
            self.version.0,
            self.version.1,
            if self.regs.is_some() {
                self.layout.full_size()
            } else {
                self.layout.match_size()
            }
        )?;
        writeln!(
            f,
            "  dev_id {:#06x} ({})  qp_num {}  qp_base {}  que_iso_cfg {:#x}  vf_state {}",
            self.dev_id,
            kind.map_or_else(|| "unknown".into(), |k| alloc::format!("{k} VF")),
            self.qp_num,
            self.qp_base,
            self.que_iso_cfg,
            self.vf_state
        )?;
        let Some(r) = &self.regs else {
            return writeln!(f, "  (match data only)");
        };
        for (name, v) in [
            ("QM_VF_AEQ_INT_MASK", r.aeq_int_mask),
            ("QM_VF_EQ_INT_MASK", r.eq_int_mask),
            ("QM_IFC_INT_SOURCE_V", r.ifc_int_source),
            ("QM_IFC_INT_MASK", r.ifc_int_mask),
            ("QM_IFC_INT_SET_V", r.ifc_int_set),
            ("QM_PAGE_SIZE", r.page_size),
        ] {
            writeln!(f, "  {name:<20} {v:#010x}")?;
        }
        for (name, ws) in [("QM_EQC_DW0..6", &r.eqc_dw), ("QM_AEQC_DW0..6", &r.aeqc_dw)] {
            write!(f, "  {name:<20}")?;
            for w in ws.iter() {
                write!(f, " {w:#010x}")?;
            }
            writeln!(f)?;
        }
        for (name, v) in [
            ("eqe_dma", r.eqe_dma),
            ("aeqe_dma", r.aeqe_dma),
            ("sqc_dma", r.sqc_dma),
            ("cqc_dma", r.cqc_dma),
        ] {
            writeln!(f, "  {name:<20} {v:#018x}")?;
        }
        if self.v1_fixup_applied {
            writeln!(f, "  (V1: eqe_dma/aeqe_dma rebuilt from EQC/AEQC DW2:DW1)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(layout: Layout) -> AccVfData {
        let mut eqc_dw = [0x1000_0003, 0x8765_4000, 0x12, 0x3ff, 0, 0, 0x1];
        let mut aeqc_dw = [0x2000_0001, 0x4444_0000, 0x13, 0x3ff, 0, 0, 0x1];
        eqc_dw[0] = 0x0005_0007;
        aeqc_dw[0] = 0x0002_0009;
        let regs = QmRegState {
            aeq_int_mask: 0,
            eq_int_mask: 0,
            ifc_int_source: 0,
            ifc_int_mask: 0,
            ifc_int_set: 0,
            page_size: 0x1,
            eqc_dw,
            aeqc_dw,
            rsv_regs: [0; 5],
            eqe_dma: 0x12_8765_4000,
            aeqe_dma: 0x13_4444_0000,
            sqc_dma: 0x20_0000_0000,
            cqc_dma: 0x20_0001_0000,
        };
        AccVfData {
            layout,
            version: if layout == Layout::V2 { (1, 0) } else { (0, 0) },
            qp_num: 32,
            dev_id: 0xa256,
            que_iso_cfg: 1,
            qp_base: 64,
            vf_state: VfQmState::Ready,
            regs: Some(regs),
            v1_fixup_applied: false,
        }
    }

    #[test]
    fn round_trip_every_layout() {
        for layout in [Layout::RfcV2, Layout::V1, Layout::V2] {
            let d = sample(layout);
            let b = d.encode();
            assert_eq!(b.len(), layout.full_size());
            let back = match layout {
                Layout::RfcV2 => AccVfData::decode_rfc_v2(&b).unwrap(),
                _ => AccVfData::decode(&b).unwrap(),
            };
            let mut want = d.clone();
            want.v1_fixup_applied = layout == Layout::V1;
            assert_eq!(back, want, "{layout}");
            let mut m = d.clone();
            m.regs = None;
            let mb = m.encode();
            assert_eq!(mb.len(), layout.match_size());
        }
    }

    #[test]
    fn v1_addresses_are_rebuilt_like_the_driver() {
        let mut d = sample(Layout::V1);
        // A V1 sender built the addresses from the wrong words.
        let r = d.regs.as_mut().unwrap();
        r.eqe_dma = 0x8765_4000_0005_0007;
        r.aeqe_dma = 0x4444_0000_0002_0009;
        let back = AccVfData::decode(&d.encode()).unwrap();
        let r = back.regs.unwrap();
        assert_eq!(r.eqe_dma, 0x12_8765_4000);
        assert_eq!(r.aeqe_dma, 0x13_4444_0000);
        assert!(back.v1_fixup_applied);
    }

    #[test]
    fn v2_rules() {
        let good = sample(Layout::V2).encode();
        let mut b = good.clone();
        b[28] = 2; // major 2
        assert_eq!(
            AccVfData::decode(&b),
            Err(StateError::Version { major: 2, minor: 0 })
        );
        let mut b = good.clone();
        b[30] = 7; // minor 7: accepted, reserved words then not checked
        b[32] = 1;
        assert_eq!(AccVfData::decode(&b).unwrap().version, (1, 7));
        let mut b = good.clone();
        b[32] = 1;
        assert!(matches!(
            AccVfData::decode(&b),
            Err(StateError::Reserved { .. })
        ));
        let mut b = good.clone();
        b[144] ^= 0x10; // eqe_dma no longer matches EQC DW2:DW1
        assert!(matches!(
            AccVfData::decode(&b),
            Err(StateError::Inconsistent {
                field: "eqe_dma",
                ..
            })
        ));
        let mut b = good.clone();
        b[24] = 5;
        assert!(matches!(
            AccVfData::decode(&b),
            Err(StateError::BadVfState { value: 5, .. })
        ));
        assert!(matches!(
            AccVfData::decode(&good[..41]),
            Err(StateError::BadLength { len: 41, .. })
        ));
        assert!(matches!(
            AccVfData::decode(&[0; 40]),
            Err(StateError::UnknownMagic { magic: 0 })
        ));
        assert_eq!(
            AccVfData::decode(&[1, 2]),
            Err(StateError::NoMagic { len: 2 })
        );
        let m = AccVfData::decode(&good[..40]).unwrap();
        assert!(m.is_match_only());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for layout in [Layout::V1, Layout::V2, Layout::RfcV2] {
            let good = sample(layout).encode();
            for len in 0..good.len() {
                if len == layout.match_size() {
                    continue;
                }
                let r = match layout {
                    Layout::RfcV2 => AccVfData::decode_rfc_v2(&good[..len]),
                    _ => AccVfData::decode(&good[..len]),
                };
                assert!(r.is_err(), "{layout} truncated to {len}");
            }
        }
    }

    #[test]
    fn messages_name_the_problem() {
        let e = AccVfData::decode(&[0xff; 40]).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown acc_vf_data magic 0xffffffffffffffff"),
            "{e}"
        );
        let e = AccVfData::decode(&sample(Layout::V2).encode()[..100]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "upstream V2 acc_vf_data must be 40 (match data only) or 176 bytes, not 100"
        );
    }
}
