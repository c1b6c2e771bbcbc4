//! A safe API for iommufd (`/dev/iommu`): I/O address spaces, hardware info, hardware page
//! tables with IOMMU dirty tracking, dirty bitmaps, and automatic domain selection.
//!
//! iommufd is the kernel's IOMMU uAPI; since Linux 6.7 it exposes IOMMU hardware dirty tracking
//! (`IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, `IOMMU_HWPT_SET_DIRTY_TRACKING`,
//! `IOMMU_HWPT_GET_DIRTY_BITMAP`). Devices without a dirty tracker of their own can only be
//! live-migrated with it. This crate follows `include/uapi/linux/iommufd.h` of Linux 6.12.
//!
//! # Layers
//! * [`abi`]: kernel structures and ioctl numbers, pinned by layout tests.
//! * a private `sys` module: every ioctl goes through it; unit tests replace it with a fake,
//!   and with the `fake-kernel` feature (dev-dependencies only) other crates' whole-migration
//!   fault sweeps install a process-wide one (`fake_kernel`).
//! * typed RAII objects: [`Iommufd`], [`Ioas`], [`Hwpt`] (destroyed on drop), [`IommuDevice`]
//!   (hardware info probed once), [`DirtyBitmap`], and [`AutoDomains`].
//! * [`fault`]: I/O page-fault queues ([`FaultQueue`]): page requests a device raised on a
//!   nested HWPT, read and answered by the VMM.
//! * [`viommu`]: vIOMMU and vDEVICE objects (Linux 7.3), probed at run time
//!   ([`Iommufd::viommu_support`]).
//!
//! # Flow of a migration with IOMMU dirty tracking
//! ```no_run
//! use livemig_iommufd::{AutoDomains, DirtyBitmap, Iommufd};
//! # fn main() -> Result<(), livemig_iommufd::Error> {
//! let iommufd = Iommufd::open()?;
//! let ioas = iommufd.alloc_ioas()?;
//! # let dev_id = 1; let mut vfio_attach = |pt: u32| -> std::io::Result<u32> { Ok(pt) };
//! // dev_id comes from VFIO_DEVICE_BIND_IOMMUFD (livemig-vfio's `bind_iommufd`).
//! let dev = iommufd.probe_device(dev_id);
//! let mut domains = AutoDomains::new(ioas);
//! let chosen = domains.attach(&dev, &mut vfio_attach)?;
//! println!("{chosen}");
//! // ... map guest memory into the IOAS ...
//! if chosen.dirty_tracking {
//!     domains.set_dirty_tracking(true)?;
//!     let mut dirty = DirtyBitmap::new(0, 1 << 30, 4096)?;
//!     domains.read_dirty(0, 1 << 30, &mut dirty, true)?; // read and clear
//!     for run in dirty.runs() { /* send [run.iova, run.iova + run.length) */ }
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod abi;

mod auto;
mod bitmap;
mod error;
#[cfg(feature = "fake-kernel")]
pub mod fake_kernel;
pub mod fault;
mod hw_info;
mod objects;
#[cfg(feature = "selftest")]
pub mod selftest;
mod sys;
pub mod viommu;

pub use auto::{AutoDomain, AutoDomains, DomainPath};
pub use bitmap::{DirtyBitmap, DirtyRun, Runs};
pub use error::{Error, Op, Reason};
pub use fault::{FaultPerm, PageRequest, PageResponse};
pub use hw_info::{HwCaps, HwInfo, HwInfoType, VendorInfo, decode_vendor};
pub use objects::{
    DmaAccess, FaultQueue, Hwpt, HwptFlags, Ioas, IommuDevice, Iommufd, IovaRange, IovaRanges,
    Placement,
};
pub use viommu::{Support, Vdevice, Viommu};

#[cfg(test)]
mod fake_tests;
