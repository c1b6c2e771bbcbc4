//! What the engine needs from the VMM: guest memory, the devices and their dirty trackers,
//! and vCPU control on the source ([`SourcePlatform`], [`Vcpus`]); memory and devices on the
//! destination ([`DestinationPlatform`]). The engine owns a platform for one migration and
//! hands it back for inspection ([`Source::platform`](crate::engine::Source::platform)).
//!
//! ```text
//!   SourcePlatform ── memory: GuestMemory ── cpu: DirtyTracker (vCPU log)
//!                  ├─ devices: SourceDevice { MigDevice, iommu_dirty?, dma_log: DirtyTracker? }
//!                  ├─ iommu: DirtyTracker (HWPT dirty bits)   ── dma_endpoints (DMA, no state)
//!                  └─ vcpus: Vcpus (pause, resume, throttle)  ── viommu guard
//!   DestinationPlatform ── memory ── devices: MigDevice ── iommu_dirty, page_size_mask
//!                       └─ vcpus: VcpuStart (the handover's last step; KVM_RUN entries)
//! ```

use std::sync::Arc;

use livemig_viommu::policy::{MigrationGuard, ViommuView};

use crate::compat::DeviceDescriptor;
use crate::device::MigDevice;
use crate::memory::GuestMemory;
use crate::tracker::DirtyTracker;

/// Pauses and resumes the guest's vCPUs.
pub trait Vcpus: Send {
    /// Stops every vCPU (returns once none runs).
    fn pause(&mut self);
    /// Lets them run again.
    fn resume(&mut self);
    /// Keeps the vCPUs out of the guest for `percent` of the time (0: not at all), enforced by
    /// the host (auto-converge). Returns `false` when the platform cannot throttle.
    fn set_throttle(&mut self, percent: u8) -> bool {
        let _ = percent;
        false
    }
    /// How many times each vCPU has entered the guest so far (for KVM: `KVM_RUN` calls made
    /// to run guest code), or `None` when the platform cannot count. The engine reports it
    /// next to its own decision of where the VM runs, so a test (or an operator) can check
    /// the decision against what the vCPUs did.
    fn entries(&self) -> Option<Vec<u64>> {
        None
    }
}

/// The destination's vCPUs: parked from creation until the handover's last step starts them
/// ([`DestinationPlatform::vcpus`]). Starting them is the only way the engine lets the VM run
/// on the destination; no device arc may do it as a side effect.
pub trait VcpuStart: Send {
    /// Lets the vCPUs enter the guest. The engine calls it once, after every device reached
    /// RUNNING; from the moment any vCPU may have entered the guest the destination never
    /// answers `Failed` (see [`crate::engine::handover`]). An error must say whether any vCPU
    /// may have entered; the engine also asks [`entries`](Self::entries).
    fn start(&mut self) -> Result<(), String>;
    /// How many times each vCPU has entered the guest so far, or `None` when the platform
    /// cannot count (then a failed [`start`](Self::start) leaves the outcome undecided).
    fn entries(&self) -> Option<Vec<u64>>;
}

/// A source device with what can track its DMA.
pub struct SourceDevice {
    /// The device.
    pub dev: Box<dyn MigDevice>,
    /// Whether its IOMMU domain tracks dirty pages (the auto-domain outcome), with the reason
    /// when not.
    pub iommu_dirty: std::result::Result<(), String>,
    /// Its DMA log, if it has one.
    pub dma_log: Option<Box<dyn DirtyTracker>>,
    /// Whether it does DMA (false for state-only devices such as vCPU state: no tracker).
    pub does_dma: bool,
}

impl std::fmt::Debug for SourceDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceDevice")
            .field("name", &self.dev.name())
            .field("iommu_dirty", &self.iommu_dirty)
            .field("dma_log", &self.dma_log.as_ref().map(|t| t.name()))
            .finish()
    }
}

/// Everything the source side needs from the platform.
pub struct SourcePlatform {
    /// Guest RAM.
    pub memory: Arc<dyn GuestMemory>,
    /// Assigned devices, in migration order.
    pub devices: Vec<SourceDevice>,
    /// The IOMMU tracker covering devices whose domain tracks dirty pages.
    pub iommu: Option<Box<dyn DirtyTracker>>,
    /// The vCPU dirty log.
    pub cpu: Box<dyn DirtyTracker>,
    /// vCPU control.
    pub vcpus: Box<dyn Vcpus>,
    /// IOMMU page sizes in use (bit n = 2^n bytes).
    pub page_size_mask: u64,
    /// The vIOMMU migration guard, if the VM has a virtio-iommu: checked before the start and
    /// after every round.
    pub viommu: Option<(Arc<MigrationGuard>, ViommuView)>,
    /// DMA sources with no migration state of their own (for example the iommufd selftest's
    /// mock device standing in for an assigned device's DMA in the rig): planned like devices
    /// (so an IOMMU-tracked endpoint makes the IOMMU tracker run, and an untracked one blocks
    /// migration), but they send no device section.
    pub dma_endpoints: Vec<DmaEndpoint>,
}

/// A DMA source without migration state (see [`SourcePlatform::dma_endpoints`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaEndpoint {
    /// A name for reports and errors.
    pub name: String,
    /// Whether its IOMMU domain tracks dirty pages, with the reason when not.
    pub iommu_dirty: std::result::Result<(), String>,
}

impl std::fmt::Debug for SourcePlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourcePlatform")
            .field("memory", &self.memory.size())
            .field("devices", &self.devices)
            .field("iommu", &self.iommu.as_ref().map(|t| t.name()))
            .field("page_size_mask", &self.page_size_mask)
            .finish()
    }
}

impl SourcePlatform {
    /// The per-device descriptors the source sends.
    pub fn descriptors(&self) -> Vec<DeviceDescriptor> {
        self.devices
            .iter()
            .map(|d| DeviceDescriptor {
                device: d.dev.compat(),
                iommu_dirty_tracking: d.iommu_dirty.is_ok(),
                page_size_mask: self.page_size_mask,
                migration_flags_known: true,
                dma_logging_limits: None,
            })
            .collect()
    }
}

/// Everything the destination side needs from the platform.
pub struct DestinationPlatform {
    /// Guest RAM (zero, or whatever a previous attempt left: every page is written anyway).
    pub memory: Arc<dyn GuestMemory>,
    /// Devices, in the source's order.
    pub devices: Vec<Box<dyn MigDevice>>,
    /// Whether each device's domain tracks dirty pages here.
    pub iommu_dirty: Vec<bool>,
    /// IOMMU page sizes here.
    pub page_size_mask: u64,
    /// The vCPUs the handover starts once every device is RUNNING. `None`: the platform has
    /// none the engine starts (the VMM starts its guest itself once
    /// [`Destination::receive`](crate::engine::Destination::receive) returned `Ok`; the engine's
    /// decision is then about the devices alone).
    pub vcpus: Option<Box<dyn VcpuStart>>,
}

impl std::fmt::Debug for DestinationPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationPlatform")
            .field("memory", &self.memory.size())
            .field("devices", &self.devices.len())
            .field("vcpus", &self.vcpus.is_some())
            .finish()
    }
}

impl DestinationPlatform {
    /// The per-device descriptors of this side.
    pub fn descriptors(&self) -> Vec<DeviceDescriptor> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceDescriptor {
                device: d.compat(),
                iommu_dirty_tracking: self.iommu_dirty.get(i).copied().unwrap_or(false),
                page_size_mask: self.page_size_mask,
                migration_flags_known: true,
                dma_logging_limits: None,
            })
            .collect()
    }
}
