//! HiSilicon ACC (SEC/HPRE/ZIP VF) queue-manager HAL for live migration.
//!
//! ```text
//!   ids ── AccKind (0x19e5: SEC VF a256, HPRE VF a259, ZIP VF a251)
//!   regs ─ QmVfRegisters (BAR2) / QmPfRegisters: register_structs! maps, VfReg / PfReg names
//!   mailbox ─ 128-bit mailbox, V2 doorbells, SQC VFT             state ─ acc_vf_data:
//!   access ── QmRegisters / PfRegisters, MmioVf / MmioPf,              RFC v2, V1, V2
//!             Bar2::split -> GuestWindow | MigrationWindow
//!             QM_MIG_REGION_SEL -> MigrationRegs: VfBar2 | PfWindow (PF BAR2, new revisions)
//!   seq ───── VfQm / PfQm / AccVf: stop, save, check_match, load, start (bounded polls)
//!   migration (feature "vfio") ── AccMigration: a livemig-vfio MigrationDevice
//!   model (feature "model") ───── QmVfModel / QmPfModel, queues, DMA, faults, GuestDriver
//! ```
//!
//! HiSilicon's ACC VFs have no dirty-page tracker of their own: they migrate only with IOMMU
//! (SMMUv3 HTTU) dirty tracking. Their device state is small — the queue manager's interrupt
//! masks, event-queue contexts and the bases of its queue-context tables, 176 bytes — and moves
//! in `struct acc_vf_data`. The kernel's `hisi_acc_vfio_pci` driver is the reference for every
//! sequence here; seed 003 (its RFC v2 and the review) for the design, including the 40-byte
//! match block sent early so the destination can refuse an incompatible device before any state
//! moves.
//!
//! # QM revisions
//! Up to `QM_HW_V3`, and under Linux 6.12 on any revision, a VF's migration registers are in the
//! second half of its 64 KiB BAR2 and the guest gets the first 32 KiB. Linux 7.3.4 adds a
//! layout for QMs above V3 whose PF sets `QM_MIG_REGION_EN` in `QM_MIG_REGION_SEL`: the
//! migration registers move to an 8 KiB window of the PF's BAR2 and the guest gets all 64 KiB
//! of the VF's ([`regs::QmRevision`], [`regs::MigCtrl`], [`access::select_mig_region`],
//! [`AccVf::open`]). A guest cannot move between the two layouts; the driver's match block
//! cannot tell them apart, so [`CompatBlock`] carries the layout for the engine's compatibility
//! exchange, checked before any destination register is written
//! ([`AccVf::check_compat`]).
//!
//! # Example: decode a captured blob
//! ```
//! use livemig_hisi_qm::state::{AccVfData, Layout};
//! # let blob = {
//! #   let d = AccVfData { layout: Layout::V2, version: (1, 0), qp_num: 32, dev_id: 0xa256,
//! #       que_iso_cfg: 1, qp_base: 64, vf_state: livemig_hisi_qm::state::VfQmState::Ready,
//! #       regs: None, v1_fixup_applied: false };
//! #   d.encode()
//! # };
//! let data = AccVfData::decode(&blob)?;
//! assert_eq!(data.layout, Layout::V2);
//! assert!(data.is_match_only()); // 40 bytes: the match block sent in PRE_COPY
//! # Ok::<(), livemig_hisi_qm::state::StateError>(())
//! ```
//!
//! # Features
//! None by default: register maps, encodings, `acc_vf_data` layouts and the sequences are
//! `no_std` + `alloc` (CI links them into a `#![no_std]` binary for `x86_64-unknown-none`), and
//! the error types implement `core::error::Error`. `std` adds `StdDelay` (sleeps); `vfio`
//! (implies `std`) adds `MappedVf` and `migration::AccMigration`, a `livemig-vfio`
//! `MigrationDevice`; `model` (implies `std`) adds the QM VF/PF device model.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod access;
mod error;
pub mod ids;
pub mod mailbox;
#[cfg(feature = "vfio")]
pub mod migration;
#[cfg(feature = "model")]
pub mod model;
pub mod regs;
pub mod seq;
pub mod state;

#[cfg(feature = "vfio")]
pub use access::MappedVf;
#[cfg(feature = "std")]
pub use access::StdDelay;
pub use access::{
    Bar2, Delay, GuestWindow, MigRegion, MigrationRegs, MigrationWindow, MmioPf, MmioVf, NoDelay,
    PfBar2, PfRegisters, PfWindow, QmRegisters, RegionError, open_migration_regs,
    select_mig_region,
};
pub use error::Error;
pub use ids::AccKind;
pub use regs::{Bar2Layout, MigCtrl, QmRevision};
pub use seq::{AccVf, CompatBlock, LoadOutcome, PfQm, Timing, VfQm};
