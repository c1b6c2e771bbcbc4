//! VFIO devices for live migration: the cdev interface, the migration v2 uAPI and its state
//! machine, migration data sessions, and device DMA logging.
//!
//! This crate is what a Rust VMM needs to migrate a device assigned with VFIO (Linux 6.6+ cdev
//! interface, iommufd-backed). It follows `include/uapi/linux/vfio.h` and
//! `drivers/vfio/vfio_main.c` of Linux 6.12.
//!
//! # Layers
//! * [`abi`]: the kernel structures and ioctl numbers, pinned by layout tests.
//! * a private `sys` module: every ioctl goes through it; unit tests replace it with a fake.
//! * the typed API: [`VfioDevice`], [`MigrationState`]/[`MigrationFlags`] and the planner
//!   [`fsm::plan`], the [`MigrationDevice`] trait with its arc-by-arc
//!   [`transition`](MigrationDevice::transition), data sessions ([`DataFile`], [`data`]) and
//!   DMA logging ([`DmaLogger`]).
//!
//! # Features
//! None by default. `sim` adds `sim::SimDevice`, which implements the same traits in memory,
//! with DMA logging and fault injection, so engines and tests run without hardware.
//! `fake-kernel` adds `fake_kernel`: a process-wide fake kernel behind the private `sys`
//! module, for other crates' whole-migration fault sweeps (dev-dependencies only; with no fake
//! installed every call still reaches the kernel).
//!
//! # Example: save a device's state
//! ```no_run
//! use livemig_vfio::{MigrationDevice, MigrationState, VfioDevice, data};
//! # fn main() -> Result<(), livemig_vfio::Error> {
//! let mut dev = VfioDevice::open("/dev/vfio/devices/vfio0")?;
//! // ... VFIO_DEVICE_BIND_IOMMUFD and ATTACH first (see livemig-iommufd) ...
//! let t = dev.transition(MigrationState::StopCopy)?;
//! let mut state = Vec::new();
//! data::save_stop_copy(&mut t.data.expect("STOP_COPY opens a session"), &mut state)?;
//! dev.transition(MigrationState::Running)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod abi;
pub mod data;
pub mod dma_log;
#[cfg(feature = "fake-kernel")]
pub mod fake_kernel;
pub mod fsm;
#[cfg(feature = "sim")]
pub mod sim;

mod device;
mod error;
mod migration;
mod sys;

pub use data::{DataChannel, DataFile, PrecopyInfo};
pub use device::{
    DeviceInfo, DeviceLocator, MappedRegion, RegionInfo, VfioDevice, normalize_pci_address,
    normalize_uuid,
};
pub use dma_log::{DmaLogSession, DmaLogger, DmaRange};
pub use error::{Access, Error, Feature, Op};
pub use fsm::{MigrationFlags, MigrationState};
pub use migration::{MigrationDevice, PrecopyInfoV2, Transition};
