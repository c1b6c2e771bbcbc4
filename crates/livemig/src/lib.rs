//! # livemig
//!
//! The live-migration engine a VMM imports for VMs that own assigned PCI devices, over small
//! platform traits, with the real-host backends for VFIO migration v2 devices
//! (`livemig-vfio`), iommufd HWPT dirty tracking (`livemig-iommufd`) and device DMA logging.
//!
//! The crate's layers, each importing only from those below it (`cargo xtask cycles` fails
//! on an import circle):
//!
//! ```text
//!   local       whole migrations in one process over the simulated link (tests, examples)
//!   engine/     Source and Destination; the round policy; send and receive paths; reports
//!   platform    what the VMM provides: SourcePlatform, DestinationPlatform, Vcpus
//!   tracker  device  compat  control  link  cancel
//!   transport   DataSink, Channel, Abort, TCP          bitmap  memory  error
//! ```
//!
//! - [`engine`]: [`Source`](engine::Source) and [`Destination`](engine::Destination) over a
//!   [`platform`]: [`GuestMemory`](memory::GuestMemory), [`DirtyTracker`](tracker::DirtyTracker),
//!   [`MigDevice`](device::MigDevice) and [`Vcpus`](platform::Vcpus); the protocol's phases
//!   (compat, start, pre-copy round, stop-and-copy, handover, recovery) are one method each,
//!   and what happens after a round is the pure [`engine::policy`].
//! - [`transport`]: the [`Channel`](transport::Channel) a migration runs over (TCP here; TLS
//!   in `livemig-tls`) and the [`DataSink`](transport::DataSink) it writes; [`cancel`]: the
//!   operator's [`CancelHandle`](cancel::CancelHandle) and the deadline threads. Page channels
//!   beside the main one (QEMU's multifd layout):
//!   [`Source::migrate_channels`](engine::Source::migrate_channels) and
//!   [`Destination::receive_channels`](engine::Destination::receive_channels), with a barrier at
//!   each round's end so an older copy of a page never overwrites a newer one.
//! - The return path acknowledges each pre-copy round (negotiated: stream format 1.1 and a
//!   [`Capabilities`](control::Message::Capabilities) message): the source lets data in flight
//!   land before it stops the VM, and counts the destination's device load time against the
//!   downtime limit.
//! - [`tracker`]: the dirty-tracker contract, the per-device choice (`auto | iommu | device`),
//!   and the real-host trackers (iommufd HWPTs, device DMA logs).
//! - [`link`]: an in-process link with bandwidth and latency, pacing, failure injection;
//!   [`local`]: whole migrations over it in one process.
//! - [`compat`]: compatibility descriptors and verdicts; [`control`]: the return path.
//!
//! Paths that moved in this release stay importable from where they were for one release:
//! `engine::{Vcpus, SourcePlatform, SourceDevice, DmaEndpoint, DestinationPlatform}` (now
//! [`platform`]), `engine::{Connect, Accept}` and `link::DataSink` (now [`transport`]),
//! `transport::CancelHandle` (now [`cancel`]), `transport::LinkChannel` (now [`link`]),
//! `link::{migrate_local, migrate_local_channels}` (now [`local`]).
//!
//! The simulated platform is `livemig-sim`, the KVM backend `livemig-kvm`, and the `livemig`
//! command `livemig-cli`: none of them (nor JSON, a CLI parser or a device model) is a
//! dependency of this crate.
#![deny(missing_docs)]

pub mod bitmap;
pub mod cancel;
pub mod compat;
pub mod control;
pub mod device;
pub mod engine;
pub mod error;
pub mod link;
pub mod local;
pub mod memory;
pub mod platform;
pub mod tracker;
pub mod transport;

pub use error::{Error, Phase, Result};
