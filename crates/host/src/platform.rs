//! The host: one iommufd, one IOAS holding guest RAM at IOVA = GPA, the devices attached to
//! it, and the engine's source and destination platforms built from them.
//!
//! Drop order matters to the kernel: devices must be closed before their HWPTs can be
//! destroyed. Drop the engine's `Source`/`Destination` (which own the devices) before the
//! [`Host`]; the host unmaps guest RAM from the IOAS, then destroys the mock device, the
//! HWPTs and the IOAS, then closes the iommufd.

use std::sync::Arc;

use livemig::device::{DeviceCompat, MigDevice, VfioMigDevice};
use livemig::engine::{DestinationPlatform, SourceDevice, SourcePlatform};
use livemig::memory::GuestMemory;
use livemig::tracker::{DirtyTracker, DmaLogTracker, HwptTracker};
use livemig_iommufd::{AutoDomains, DmaAccess, Iommufd, Placement};
use livemig_kvm::VmMemory;
use livemig_vfio::MigrationFlags;

use crate::Error;
use crate::device::HostDevice;
use crate::workload::{VmmDirtyLog, Workload};

/// What the host opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// VFIO devices, in migration order (cdev paths, PCI addresses or mdev UUIDs; the
    /// destination lists its devices in the same order).
    pub devices: Vec<String>,
    /// Add the iommufd selftest's mock device as a DMA endpoint (feature `selftest`).
    pub mock_dma: bool,
    /// Where sysfs is mounted, for the devices' identities (`None`: `/sys`; tests and
    /// containers that mount it elsewhere set it).
    pub sysfs: Option<std::path::PathBuf>,
}

/// The open host.
#[derive(Debug)]
pub struct Host {
    // Field order is drop order after `Drop::drop` unmapped RAM: devices not yet handed to the
    // engine, the mock device, the HWPTs and IOAS, the iommufd, then RAM.
    devices: Vec<HostDevice>,
    #[cfg(feature = "selftest")]
    mock: Option<crate::mock::MockDma>,
    auto: AutoDomains,
    iommufd: Iommufd,
    memory: Arc<VmMemory>,
    descriptions: Vec<String>,
}

impl Host {
    /// Opens `/dev/iommu`, maps `memory` into a new IOAS (IOVA = GPA) and opens, binds and
    /// attaches every device.
    pub fn open(cfg: &HostConfig, memory: Arc<VmMemory>) -> Result<Host, Error> {
        let iofd = |what: &str| {
            let what = what.to_string();
            move |source| Error::Iommufd { what, source }
        };
        let iommufd = Iommufd::open().map_err(iofd("opening /dev/iommu"))?;
        let ioas = iommufd.alloc_ioas().map_err(iofd("IOMMU_IOAS_ALLOC"))?;
        let mut auto = AutoDomains::new(ioas);
        // The mock endpoint first: emulated devices attached after it take the path a real
        // host with mixed devices takes (an existing HWPT refused, the IOAS attached).
        let mut descriptions = Vec::new();
        #[cfg(feature = "selftest")]
        let mock = if cfg.mock_dma {
            let m = crate::mock::MockDma::new(&iommufd, &mut auto)?;
            descriptions.push(format!("selftest mock DMA endpoint: {}", m.domain));
            Some(m)
        } else {
            None
        };
        #[cfg(not(feature = "selftest"))]
        if cfg.mock_dma {
            return Err(Error::Config(
                "the mock DMA endpoint needs livemig-host's `selftest` feature".into(),
            ));
        }
        let mut devices = Vec::new();
        for spec in &cfg.devices {
            let sysfs = cfg.sysfs.as_deref().unwrap_or(std::path::Path::new("/sys"));
            let d = HostDevice::open_in(sysfs, spec, &iommufd, &mut auto)?;
            descriptions.push(format!(
                "{} ({}, {}): {}{}",
                d.name,
                d.path.display(),
                d.identity,
                d.domain,
                if d.dma_logging {
                    ", device DMA logging"
                } else {
                    ""
                }
            ));
            devices.push(d);
        }
        for r in memory.regions() {
            // SAFETY: the region is a mapping `memory` owns; the Host keeps `memory` alive and
            // unmaps the IOAS in Drop before releasing it. Guest RAM is never referenced by
            // Rust code (it is read and written by copies), so device writes are sound.
            unsafe {
                auto.ioas().map_user(
                    r.host as *mut u8,
                    r.size,
                    Placement::Fixed(r.gpa),
                    DmaAccess::READ | DmaAccess::WRITE,
                )
            }
            .map_err(iofd(&format!(
                "mapping guest RAM {:#x}+{:#x} into IOAS {} at IOVA = GPA",
                r.gpa,
                r.size,
                auto.ioas().id()
            )))?;
        }
        Ok(Host {
            devices,
            #[cfg(feature = "selftest")]
            mock,
            auto,
            iommufd,
            memory,
            descriptions,
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<VmMemory> {
        &self.memory
    }

    /// The devices not yet handed to a platform.
    pub fn devices(&self) -> &[HostDevice] {
        &self.devices
    }

    /// One line per device and endpoint: what it is and how its DMA is tracked.
    pub fn describe(&self) -> &[String] {
        &self.descriptions
    }

    /// The iommufd.
    pub fn iommufd(&self) -> &Iommufd {
        &self.iommufd
    }

    /// The mock DMA endpoint, if configured.
    #[cfg(feature = "selftest")]
    pub fn mock(&self) -> Option<&crate::mock::MockDma> {
        self.mock.as_ref()
    }

    /// Takes the devices for the engine: each wrapped as a [`MigDevice`] with its IOMMU
    /// outcome and, where it logs its own DMA, a DMA-log tracker over guest RAM on a second
    /// handle of the device (the composition point with `livemig_kvm::platform::source`).
    /// Whether PRE_COPY is used is the engine's `SourceConfig::precopy`.
    pub fn source_devices(&mut self) -> Result<Vec<SourceDevice>, Error> {
        let ram = self.memory.ranges();
        let mut out = Vec::new();
        for d in self.devices.drain(..) {
            let dma_log: Option<Box<dyn DirtyTracker>> = if d.dma_logging {
                let logger = d.duplicate()?;
                let t = DmaLogTracker::new(d.name.clone(), logger, &ram, None).map_err(|e| {
                    Error::Config(format!("{}: DMA log over guest RAM: {e}", d.name))
                })?;
                Some(Box::new(t))
            } else {
                None
            };
            let iommu_dirty = if d.domain.dirty_tracking {
                Ok(())
            } else {
                Err(d.domain.to_string())
            };
            let dev = wrap(d)?;
            out.push(SourceDevice {
                dev,
                iommu_dirty,
                dma_log,
                does_dma: true,
            });
        }
        Ok(out)
    }

    /// The IOMMU tracker: every dirty-capable HWPT of the IOAS over guest RAM, or `None` when
    /// no device got one.
    pub fn iommu_tracker(&self) -> Result<Option<Box<dyn DirtyTracker>>, Error> {
        let hwpts: Vec<_> = self.auto.dirty_hwpts().cloned().collect();
        if hwpts.is_empty() {
            return Ok(None);
        }
        let t = HwptTracker::new(hwpts, &self.memory.ranges())
            .map_err(|e| Error::Config(format!("HWPT tracker over guest RAM: {e}")))?;
        Ok(Some(Box::new(t)))
    }

    /// The source platform: the devices (taken from the host), the HWPT tracker, the VMM's
    /// write log as the vCPU log, and `workload` as the vCPUs.
    pub fn source(&mut self, workload: &Workload) -> Result<SourcePlatform, Error> {
        let devices = self.source_devices()?;
        let memory: Arc<dyn GuestMemory> = self.memory.clone();
        #[allow(unused_mut)]
        let mut dma_endpoints = Vec::new();
        #[cfg(feature = "selftest")]
        if let Some(m) = &self.mock {
            dma_endpoints.push(livemig::engine::DmaEndpoint {
                name: format!("selftest mock device {}", m.dev_id()),
                iommu_dirty: if m.domain.dirty_tracking {
                    Ok(())
                } else {
                    Err(m.domain.to_string())
                },
            });
        }
        Ok(SourcePlatform {
            memory,
            devices,
            iommu: self.iommu_tracker()?,
            cpu: Box::new(VmmDirtyLog::new(self.memory.clone())),
            vcpus: workload.vcpus(),
            page_size_mask: 0x1000,
            viommu: None,
            dma_endpoints,
        })
    }

    /// The destination platform: the devices (taken from the host), in the source's order.
    pub fn destination(&mut self) -> Result<DestinationPlatform, Error> {
        let mut devices = Vec::new();
        let mut iommu_dirty = Vec::new();
        for d in self.devices.drain(..) {
            iommu_dirty.push(d.domain.dirty_tracking);
            devices.push(wrap(d)?);
        }
        Ok(DestinationPlatform {
            memory: self.memory.clone(),
            devices,
            iommu_dirty,
            page_size_mask: 0x1000,
            vcpus: None,
        })
    }
}

fn wrap(d: HostDevice) -> Result<Box<dyn MigDevice>, Error> {
    let compat = DeviceCompat {
        identity: d.identity.clone(),
        compat: Vec::new(),
        migration_flags: 0,
        dma_logging: d.dma_logging,
    };
    let name = d.name.clone();
    let dev = VfioMigDevice::new(name.clone(), compat, d.dev, MigrationFlags::all()).map_err(
        |source| Error::Vfio {
            device: name,
            what: "reading the migration flags".into(),
            source,
        },
    )?;
    Ok(Box::new(dev))
}

impl Drop for Host {
    fn drop(&mut self) {
        // Devices may still be attached (the engine owns them); unmapping first means no
        // device can reach guest RAM once it is released.
        let _ = self.auto.ioas().unmap_all();
    }
}
