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
//!   authentication and per-phase deadlines plug in here) and the operator's
//!   [`CancelHandle`](transport::CancelHandle). Page channels beside the main one (QEMU's
//!   multifd layout): [`Source::migrate_channels`](engine::Source::migrate_channels) and
//!   [`Destination::receive_channels`](engine::Destination::receive_channels), with a barrier at
//!   each round's end so an older copy of a page never overwrites a newer one.
//! - The return path acknowledges each pre-copy round (negotiated: stream format 1.1 and a
//!   [`Capabilities`](control::Message::Capabilities) message): the source lets data in flight
//!   land before it stops the VM, and counts the destination's device load time against the
//!   downtime limit.
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
