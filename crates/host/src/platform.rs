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
use livemig_iommufd::{AutoDomains, DmaAccess, Ioas, Iommufd, IovaRanges, Placement};
use livemig_kvm::{Backing, VmMemory};
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
    mapped: Vec<(u64, u64)>,
}

/// The parts of `[gpa, gpa + size)` inside `ranges` (inclusive ends), clipped to `align`.
fn clip(gpa: u64, size: u64, ranges: &IovaRanges) -> Vec<(u64, u64)> {
    let align = ranges.alignment.max(4096);
    let last = gpa + (size - 1);
    let mut out = Vec::new();
    for r in &ranges.ranges {
        let start = gpa.max(r.start).next_multiple_of(align);
        let end = last.min(r.last).saturating_add(1) / align * align;
        if start < end {
            out.push((start, end - start));
        }
    }
    out
}

/// Maps guest RAM into `ioas` at IOVA = GPA, each region clipped to the IOAS's IOVA ranges
/// (the attached devices' apertures and reserved regions); a memfd through
/// `IOMMU_IOAS_MAP_FILE` where the kernel has it (Linux 6.13+), else through the host mapping
/// (`IOMMU_IOAS_MAP`). Returns the mapped ranges and a line for each choice and each part left
/// out.
/// Ranges `(gpa, size)` and the lines describing them.
type Mapped = (Vec<(u64, u64)>, Vec<String>);

fn map_ram(ioas: &Ioas, memory: &VmMemory) -> Result<Mapped, Error> {
    let iofd = |what: String| move |source| Error::Iommufd { what, source };
    let ranges = ioas
        .iova_ranges()
        .map_err(iofd("IOMMU_IOAS_IOVA_RANGES".into()))?;
    let file = match (memory.backing(), memory.file()) {
        (Backing::Memfd, Some(f)) => ioas
            .supports_map_file()
            .map_err(iofd("probing IOMMU_IOAS_MAP_FILE".into()))?
            .then_some(f),
        _ => None,
    };
    let mut lines = vec![format!(
        "guest RAM into IOAS {} at IOVA = GPA through {}",
        ioas.id(),
        match (file.is_some(), memory.backing()) {
            (true, _) => "IOMMU_IOAS_MAP_FILE (the memfd)",
            (false, Backing::Memfd) => "IOMMU_IOAS_MAP (this kernel has no IOMMU_IOAS_MAP_FILE)",
            (false, _) => "IOMMU_IOAS_MAP (the host mapping; RAM is not a memfd)",
        }
    )];
    let mut mapped = Vec::new();
    for r in memory.regions() {
        let parts = clip(r.gpa, r.size, &ranges);
        let mut at = r.gpa;
        for &(gpa, size) in &parts {
            if gpa > at {
                lines.push(format!(
                    "guest RAM {at:#x}+{:#x} is outside the IOAS's IOVA ranges: not mapped, no \
                     device can reach it",
                    gpa - at
                ));
            }
            at = gpa + size;
            let what = format!(
                "mapping guest RAM {gpa:#x}+{size:#x} into IOAS {} at IOVA = GPA",
                ioas.id()
            );
            let access = DmaAccess::READ | DmaAccess::WRITE;
            match file {
                Some(f) => ioas
                    .map_file(
                        f,
                        r.file_offset + (gpa - r.gpa),
                        size,
                        Placement::Fixed(gpa),
                        access,
                    )
                    .map_err(iofd(what))?,
                // SAFETY: the range is inside a mapping `memory` owns; the Host keeps `memory`
                // alive and unmaps the IOAS in Drop before releasing it. Guest RAM is never
                // referenced by Rust code (it is read and written by copies), so device writes
                // are sound.
                None => unsafe {
                    ioas.map_user(
                        (r.host + (gpa - r.gpa)) as *mut u8,
                        size,
                        Placement::Fixed(gpa),
                        access,
                    )
                }
                .map_err(iofd(what))?,
            };
            mapped.push((gpa, size));
        }
        if at < r.gpa + r.size {
            lines.push(format!(
                "guest RAM {at:#x}+{:#x} is outside the IOAS's IOVA ranges: not mapped, no \
                 device can reach it",
                r.gpa + r.size - at
            ));
        }
    }
    if mapped.is_empty() {
        return Err(Error::Config(format!(
            "no part of guest RAM {:x?} lies in the IOAS's IOVA ranges {:x?}",
            memory.ranges(),
            ranges.ranges
        )));
    }
    Ok((mapped, lines))
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
        let (mapped, lines) = map_ram(auto.ioas(), &memory)?;
        descriptions.extend(lines);
        Ok(Host {
            devices,
            #[cfg(feature = "selftest")]
            mock,
            auto,
            iommufd,
            memory,
            descriptions,
            mapped,
        })
    }

    /// The parts of guest RAM mapped into the IOAS, `(gpa, size)`: all of it unless the
    /// attached devices narrowed the IOAS's IOVA ranges (then no device can reach the rest).
    pub fn dma_ranges(&self) -> &[(u64, u64)] {
        &self.mapped
    }

    /// The DMA endpoints that are not migrated devices (the mock device), for
    /// [`SourcePlatform::dma_endpoints`].
    pub fn dma_endpoints(&self) -> Vec<livemig::engine::DmaEndpoint> {
        #[allow(unused_mut)]
        let mut out = Vec::new();
        #[cfg(feature = "selftest")]
        if let Some(m) = &self.mock {
            out.push(livemig::engine::DmaEndpoint {
                name: format!("selftest mock device {}", m.dev_id()),
                iommu_dirty: if m.domain.dirty_tracking {
                    Ok(())
                } else {
                    Err(m.domain.to_string())
                },
            });
        }
        out
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
        // Only mapped IOVAs can be written by a device.
        let ram = self.mapped.clone();
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
        let t = HwptTracker::new(hwpts, &self.mapped)
            .map_err(|e| Error::Config(format!("HWPT tracker over guest RAM: {e}")))?;
        Ok(Some(Box::new(t)))
    }

    /// The source platform: the devices (taken from the host), the HWPT tracker, the VMM's
    /// write log as the vCPU log, and `workload` as the vCPUs.
    pub fn source(&mut self, workload: &Workload) -> Result<SourcePlatform, Error> {
        let devices = self.source_devices()?;
        let memory: Arc<dyn GuestMemory> = self.memory.clone();
        let dma_endpoints = self.dma_endpoints();
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

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_iommufd::IovaRange;

    #[test]
    fn ram_is_clipped_to_the_iova_ranges_and_their_alignment() {
        // The iommufd selftest's mock aperture, [16 MiB, 2 GiB), as IOMMU_IOAS_IOVA_RANGES
        // reports it once the mock device is attached.
        let mock = IovaRanges {
            ranges: vec![IovaRange {
                start: 1 << 24,
                last: (1 << 31) - 1,
            }],
            alignment: 4096,
        };
        assert_eq!(clip(0, 32 << 20, &mock), [(16 << 20, 16 << 20)]);
        assert_eq!(clip(4 << 30, 64 << 20, &mock), []);
        assert_eq!(clip(1 << 24, 4096, &mock), [(1 << 24, 4096)]);
        let two = IovaRanges {
            ranges: vec![
                IovaRange {
                    start: 0,
                    last: 0xfedf_ffff,
                },
                IovaRange {
                    start: 0xfef0_0000,
                    last: u64::MAX,
                },
            ],
            alignment: 0x10000,
        };
        assert_eq!(
            clip(0xfe00_0000, 0x200_0000, &two),
            [(0xfe00_0000, 0xe0_0000), (0xfef0_0000, 0x110_0000)],
            "a hole in the middle; ends rounded to the 64 KiB alignment"
        );
        assert_eq!(clip(0x1000, 0x1000, &two), [], "smaller than the alignment");
    }
}
