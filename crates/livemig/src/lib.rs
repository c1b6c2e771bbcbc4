//! # livemig
//!
//! Live migration of VMs that own assigned PCI devices, composed from the livemig HAL crates:
//! VFIO migration v2 devices (`livemig-vfio`, `livemig-hisi-qm`), IOMMU hardware dirty
//! tracking (`livemig-iommufd` on real hosts, the `livemig-iommu-pt` model in simulation),
//! device DMA logging, the migration stream (`livemig-stream`) and the vIOMMU policy
//! (`livemig-viommu`).
//!
//! - [`engine`]: [`Source`](engine::Source) and [`Destination`](engine::Destination) over
//!   small platform traits — [`GuestMemory`](memory::GuestMemory),
//!   [`DirtyTracker`](tracker::DirtyTracker), [`MigDevice`](device::MigDevice),
//!   [`Vcpus`](engine::Vcpus) — and any transport ([`DataSink`](link::DataSink) + `Read`).
//! - [`tracker`]: the vCPU log, iommufd HWPTs, device DMA logs, and the per-device choice
//!   (`auto | iommu | device`).
//! - [`sim`]: the simulated platform — sparse RAM, the IOMMU model of AMD-Vi, VT-d or SMMUv3,
//!   HiSilicon QM VF models doing DMA through it, devices with DMA logging, a vCPU writer.
//! - [`link`]: an in-process link with bandwidth and latency, TCP, failure injection.
//! - [`compat`]: compatibility descriptors and verdicts; [`probe`]: what a host offers.
#![deny(missing_docs)]

pub mod bitmap;
pub mod compat;
pub mod control;
pub mod device;
pub mod engine;
pub mod error;
pub mod link;
pub mod memory;
pub mod probe;
pub mod sim;
pub mod tracker;

pub use error::{Error, Phase, Result};
