//! A virtio-iommu device backend for VFIO endpoints, and the vIOMMU-aware migration policy.
//!
//! ```text
//!  guest driver ──virtqueue──> VirtioIommu::handle ──> domains / mappings (the model)
//!                                   │                        │
//!                                   │ MapListener per VFIO   └─> ViommuView ──> MigrationPolicy
//!                                   v endpoint                                  MigrationGuard
//!                          IommufdListener (IOAS map/unmap;       (block / cancel / allow)
//!                          read-dirty-then-unmap while tracking)
//!  pagesize::Negotiation: page_size_mask = AND of the host IOMMUs' masks, hotplug rules
//!
//!  requestq (virtio-queue Queue) ──queue::process_requests──> VirtioIommu::handle
//!  iommufd fault queue ──faults::FaultRelay──> SUCCESS/INVALID to the kernel
//!                                   └─ unrecoverable ─> queue::EventQueue ──eventq──> guest
//! ```
//!
//! A VMM that gives its guest a virtio-iommu with an assigned device must mirror every guest
//! MAP/UNMAP into the host IOMMU (seed 004), agree on a granule the host can honour, and
//! decide whether migration may run while the guest can change mappings (seed 002) — without
//! losing dirty pages when the guest unmaps during migration. The wire format and device rules
//! are virtio 1.3 §5.13 (`include/uapi/linux/virtio_iommu.h` for the values).
//!
//! # Example
//! ```
//! use livemig_viommu::device::{DeviceConfig, VirtioIommu};
//! use livemig_viommu::listener::RecordingListener;
//! use livemig_viommu::proto::{Request, Status, MAP_F_READ, MAP_F_WRITE};
//!
//! let mut dev = VirtioIommu::new(DeviceConfig::default()).unwrap();
//! dev.add_endpoint(8, Some(Box::new(RecordingListener::default())), vec![]).unwrap();
//! let attach = Request::Attach { domain: 1, endpoint: 8, flags: 0, reserved: [0; 4] };
//! assert_eq!(dev.request(&attach), Status::Ok);
//! let map = Request::Map {
//!     domain: 1, virt_start: 0x10000, virt_end: 0x1ffff, phys_start: 0x8000_0000,
//!     flags: MAP_F_READ | MAP_F_WRITE,
//! };
//! assert_eq!(dev.request(&map), Status::Ok);
//! assert_eq!(dev.mappings(1).len(), 1);
//! ```
//!
//! # Features
//! None by default: the protocol, the device model, page-size negotiation and the migration
//! policy build anywhere.
//! * `virtio-queue` adds `queue`: the request queue served from a rust-vmm `virtio-queue`
//!   `Queue` over `vm-memory` guest memory (chains of any shape, used ring, notification
//!   suppression), and the event queue that carries fault events to the guest.
//! * `iommufd` adds `listener::IommufdListener`, which mirrors mappings into a
//!   `livemig-iommufd` IOAS, and `faults::FaultRelay`, which answers the page requests of
//!   iommufd's fault queue for the guest's translation and turns the unrecoverable ones into
//!   fault events (Linux).
#![deny(missing_docs)]

pub mod device;
#[cfg(feature = "iommufd")]
pub mod faults;
pub mod listener;
pub mod pagesize;
pub mod policy;
pub mod proto;
#[cfg(feature = "virtio-queue")]
pub mod queue;
