//! Sample `acc_vf_data` blobs shared by the golden tests and `examples/make_golden_qm.rs`.
#![allow(dead_code)]

use livemig_hisi_qm::state::{AccVfData, Layout, QmRegState, VfQmState};

/// Registers as a SEC VF with 32 queues from queue 64 might hold them after a guest started it.
pub fn regs() -> QmRegState {
    let eqc_dw = [
        0x0040_0012,
        0x8765_4000,
        0x0000_0012,
        0x0000_03ff,
        0,
        0,
        0x1,
    ];
    let aeqc_dw = [
        0x0003_0001,
        0x4444_0000,
        0x0000_0013,
        0x0000_003f,
        0,
        0,
        0x1,
    ];
    let mut r = QmRegState {
        aeq_int_mask: 0,
        eq_int_mask: 0,
        ifc_int_source: 0,
        ifc_int_mask: 0,
        ifc_int_set: 0,
        page_size: 0x1,
        eqc_dw,
        aeqc_dw,
        rsv_regs: [0; 5],
        eqe_dma: 0,
        aeqe_dma: 0,
        sqc_dma: 0x20_0000_0000,
        cqc_dma: 0x20_0000_1000,
    };
    r.eqe_dma = r.eqe_from_words();
    r.aeqe_dma = r.aeqe_from_words();
    r
}

fn base(layout: Layout, full: bool) -> AccVfData {
    AccVfData {
        layout,
        version: if layout == Layout::V2 { (1, 0) } else { (0, 0) },
        qp_num: 32,
        dev_id: 0xa256,
        que_iso_cfg: 1,
        qp_base: 64,
        vf_state: VfQmState::Ready,
        regs: full.then(regs),
        v1_fixup_applied: false,
    }
}

/// Upstream V2, whole struct.
pub fn v2() -> Vec<u8> {
    base(Layout::V2, true).encode()
}

/// Upstream V2, match block only (what PRE_COPY sends first).
pub fn v2_match() -> Vec<u8> {
    base(Layout::V2, false).encode()
}

/// Upstream V1 as the pre-fix driver wrote it: EQE/AEQE addresses combined from DW1:DW0
/// instead of DW2:DW1.
pub fn v1() -> Vec<u8> {
    let mut d = base(Layout::V1, true);
    let r = d.regs.as_mut().expect("full");
    r.eqe_dma = (u64::from(r.eqc_dw[1]) << 32) | u64::from(r.eqc_dw[0]);
    r.aeqe_dma = (u64::from(r.aeqc_dw[1]) << 32) | u64::from(r.aeqc_dw[0]);
    d.encode()
}

/// Upstream V1, match block only.
pub fn v1_match() -> Vec<u8> {
    base(Layout::V1, false).encode()
}

/// The RFC v2 driver's layout (seed 003), whole struct.
pub fn rfc_v2() -> Vec<u8> {
    base(Layout::RfcV2, true).encode()
}

/// Every golden: file name and bytes.
pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("v2.bin", v2()),
        ("v2-match.bin", v2_match()),
        ("v1.bin", v1()),
        ("v1-match.bin", v1_match()),
        ("rfc-v2.bin", rfc_v2()),
    ]
}
