//! # livemig-host
//!
//! The real-host platform for the `livemig` engine: what a VMM that owns VFIO devices through
//! iommufd hands the engine, without KVM in between (the rig guest has VFIO and iommufd but no
//! KVM; the composition with `livemig-kvm` is [`platform::Host::source_devices`] and [`platform::Host::iommu_tracker`]).
//!
//! - Guest RAM is a [`livemig_kvm::VmMemory`] (memfd, shared file or anonymous) mapped into an
//!   iommufd IOAS at IOVA = GPA, the layout of a VM without a vIOMMU.
//! - Devices are VFIO cdevs ([`device::HostDevice`]): bound to the iommufd and attached through
//!   `livemig-iommufd`'s auto-domain policy, so a device behind a dirty-capable IOMMU gets a
//!   dirty-tracking HWPT and an emulated device (mdev) the IOAS.
//! - Dirty tracking is what the engine's plan chooses per device: the HWPTs of the IOAS
//!   ([`livemig::tracker::HwptTracker`]) or the device's own DMA log
//!   ([`livemig::tracker::DmaLogTracker`] over a second handle of the device fd).
//! - [`workload::Workload`] threads stand in for vCPUs: they write guest RAM through
//!   `vm-memory` (so [`workload::VmmDirtyLog`] sees every page), and pausing them is the
//!   engine's vCPU pause.
//! - A device's I/O BAR can be the guest's ports ([`ports::RegionPorts`]): the KVM test VM
//!   drives an assigned mtty's UART through it.
//! - Guest RAM goes into the IOAS through `IOMMU_IOAS_MAP_FILE` when it is a memfd and the
//!   kernel has it (6.13+), through the host mapping otherwise; parts outside the IOAS's IOVA
//!   ranges (an attached device's aperture) are left unmapped and said so
//!   ([`Host::describe`], [`Host::dma_ranges`]).
//! - With the `selftest` feature, [`mock::MockDma`] adds the iommufd selftest's mock device
//!   (`CONFIG_IOMMUFD_TEST`) as a DMA endpoint: it writes guest RAM behind the VMM's back and
//!   marks those IOVAs dirty in its HWPT with `IOMMU_TEST_OP_DIRTY`, the way hardware sets
//!   dirty bits, so the HWPT harvest is the only thing that can find those pages.
#![deny(missing_docs)]

pub mod device;
#[cfg(feature = "selftest")]
pub mod mock;
pub mod platform;
pub mod ports;
pub mod workload;

pub use device::HostDevice;
pub use platform::{Host, HostConfig};
pub use ports::RegionPorts;
pub use workload::{Workload, WorkloadConfig};

use std::io;

/// Errors of the host platform: each names the device, range or call that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bad configuration.
    #[error("{0}")]
    Config(String),
    /// A VFIO call on a device failed.
    #[error("{device}: {what}")]
    Vfio {
        /// The device (as given).
        device: String,
        /// What was being done.
        what: String,
        /// The VFIO error.
        #[source]
        source: livemig_vfio::Error,
    },
    /// An iommufd call failed.
    #[error("{what}")]
    Iommufd {
        /// What was being done.
        what: String,
        /// The iommufd error.
        #[source]
        source: livemig_iommufd::Error,
    },
    /// Guest memory could not be set up.
    #[error("guest memory")]
    Memory(#[source] livemig_kvm::Error),
    /// A system call or file access failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How many file descriptors this process has open (`/proc/self/fd`), for leak checks around
/// a migration.
pub fn open_fds() -> Result<usize, Error> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .map_err(|source| Error::Io {
            what: "listing /proc/self/fd".into(),
            source,
        })
}
