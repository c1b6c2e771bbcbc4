//! # livemig
//!
//! The live-migration engine a VMM imports for VMs that own assigned PCI devices, over small
//! platform traits, with the real-host backends for VFIO migration v2 devices
//! (`livemig-vfio`), iommufd HWPT dirty tracking (`livemig-iommufd`) and device DMA logging.
//!
//! - [`engine`]: [`Source`](engine::Source) and [`Destination`](engine::Destination) over
//!   [`GuestMemory`](memory::GuestMemory), [`DirtyTracker`](tracker::DirtyTracker),
//!   [`MigDevice`](device::MigDevice) and [`Vcpus`](engine::Vcpus); the protocol's phases
//!   (compat, start, pre-copy round, stop-and-copy, handover, recovery) are one method each.
//! - [`transport`]: the [`Channel`](transport::Channel) a migration runs over (TCP today;
//!   authentication, per-phase deadlines and several connections plug in here) and the
//!   operator's [`CancelHandle`](transport::CancelHandle).
//! - [`tracker`]: the dirty-tracker union, the per-device choice (`auto | iommu | device`), and
//!   the real-host trackers (iommufd HWPTs, device DMA logs).
//! - [`link`]: an in-process link with bandwidth and latency, pacing, failure injection.
//! - [`compat`]: compatibility descriptors and verdicts; [`control`]: the return path.
//!
//! The simulated platform is `livemig-sim`, the KVM backend `livemig-kvm`, and the `livemig`
//! command `livemig-cli`: none of them (nor JSON, a CLI parser or a device model) is a
//! dependency of this crate.
#![deny(missing_docs)]

pub mod bitmap;
pub mod compat;
pub mod control;
pub mod device;
pub mod engine;
pub mod error;
pub mod link;
pub mod memory;
pub mod tracker;
pub mod transport;

pub use error::{Error, Phase, Result};
