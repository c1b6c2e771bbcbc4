//! What this host offers for migration: `/dev/iommu`, every VFIO device cdev with its IOMMU
//! capabilities (`IOMMU_GET_HW_INFO`), migration flags, DMA logging and the auto-domain
//! outcome, and — on kernels built with `CONFIG_IOMMUFD_TEST` — the selftest mock IOMMU.
//!
//! Probing binds each device to a private iommufd and attaches it to a private IOAS, so a
//! device another process holds is reported as busy, not taken.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use livemig_iommufd::selftest::{MOCK_FLAGS_DEVICE_NO_DIRTY, MockDevice};
use livemig_iommufd::{AutoDomains, HwInfo, HwptFlags, Iommufd, VendorInfo};
use livemig_vfio::{MigrationDevice, VfioDevice};
use serde::Serialize;

use livemig::compat::flag_names;
use livemig::error::chain;

/// The IOMMU side of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IommuCaps {
    /// Hardware-info type (`IOMMU_HW_INFO_TYPE_*` name).
    pub hw_info_type: String,
    /// Capability names.
    pub capabilities: Vec<String>,
    /// `IOMMU_HW_CAP_DIRTY_TRACKING`.
    pub dirty_tracking: bool,
}

fn vendor_name(info: &HwInfo) -> String {
    match &info.vendor {
        VendorInfo::None => "none".into(),
        VendorInfo::IntelVtd { .. } => "intel_vtd".into(),
        VendorInfo::ArmSmmuV3 { .. } => "arm_smmuv3".into(),
        VendorInfo::Amd { .. } => "amd".into(),
        VendorInfo::Selftest { .. } => "selftest_mock".into(),
        _ => format!("type {}", info.data_type()),
    }
}

fn caps_of(info: &HwInfo) -> IommuCaps {
    IommuCaps {
        hw_info_type: vendor_name(info),
        capabilities: info
            .capabilities
            .iter_names()
            .map(|(n, _)| n.to_string())
            .collect(),
        dirty_tracking: info.dirty_tracking(),
    }
}

/// One VFIO device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceProbe {
    /// The cdev.
    pub cdev: PathBuf,
    /// The device behind it (PCI address or mdev UUID), from sysfs.
    pub device: Option<String>,
    /// What failed first, if anything (the fields after it are then empty).
    pub error: Option<String>,
    /// IOMMU capabilities, if the device has an IOMMU behind it.
    pub iommu: Option<IommuCaps>,
    /// Why it has none (emulated devices such as mdevs).
    pub iommu_error: Option<String>,
    /// VFIO migration flags (`None`: not migratable).
    pub migration_flags: Option<Vec<String>>,
    /// Why the migration feature is absent.
    pub migration_error: Option<String>,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` supported.
    pub dma_logging: bool,
    /// The auto-domain outcome (HWPT with dirty tracking, HWPT without, or the IOAS).
    pub auto_domain: Option<String>,
    /// IOMMU dirty tracking is available for the device's domain.
    pub iommu_dirty_tracking: bool,
    /// How its DMA would be tracked in a migration, or why it cannot migrate.
    pub verdict: String,
}

/// The selftest mock IOMMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MockProbe {
    /// The mock device's IOMMU capabilities.
    pub iommu: Option<IommuCaps>,
    /// A dirty-tracking HWPT could be allocated for it.
    pub dirty_hwpt: bool,
    /// A mock device created without dirty tracking is refused a dirty-tracking HWPT.
    pub no_dirty_variant_refused: bool,
}

/// The whole report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    /// `/dev/iommu` opened.
    pub iommufd: bool,
    /// Why not.
    pub iommufd_error: Option<String>,
    /// VFIO device cdevs found.
    pub devices: Vec<DeviceProbe>,
    /// The selftest mock IOMMU, on kernels that have it.
    pub selftest_mock: Option<MockProbe>,
    /// One-line conclusions.
    pub summary: Vec<String>,
}

fn cdevs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vfio"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn sysfs_device(cdev: &Path) -> Option<String> {
    let name = cdev.file_name()?.to_str()?;
    let link = std::fs::read_link(format!("/sys/class/vfio-dev/{name}/device")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn probe_device(fd: &Iommufd, cdev: &Path) -> DeviceProbe {
    let mut p = DeviceProbe {
        cdev: cdev.to_path_buf(),
        device: sysfs_device(cdev),
        ..Default::default()
    };
    let dev = match VfioDevice::open(cdev) {
        Ok(d) => d,
        Err(e) => {
            p.error = Some(chain(&e));
            p.verdict = "cannot be opened (in use, or no permission)".into();
            return p;
        }
    };
    let dev_id = match dev.bind_iommufd(fd.as_fd()) {
        Ok(id) => id,
        Err(e) => {
            p.error = Some(chain(&e));
            p.verdict = "cannot be bound to iommufd".into();
            return p;
        }
    };
    let probed = fd.probe_device(dev_id);
    p.iommu = probed.hw_info().map(caps_of);
    p.iommu_error = probed.probe_error().map(str::to_string);
    match dev.migration_flags() {
        Ok(f) => {
            p.migration_flags = Some(
                flag_names((f.bits() & 0xffff_ffff) as u32)
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )
        }
        Err(e) => p.migration_error = Some(chain(&e)),
    }
    p.dma_logging = dev.supports_dma_logging().unwrap_or(false);
    match fd.alloc_ioas() {
        Ok(ioas) => {
            let mut auto = AutoDomains::new(ioas);
            match auto.attach(&probed, |pt| {
                dev.attach_pt(pt).map_err(std::io::Error::from)
            }) {
                Ok(a) => {
                    p.iommu_dirty_tracking = a.dirty_tracking;
                    p.auto_domain = Some(a.to_string());
                }
                Err(e) => p.auto_domain = Some(format!("attach failed: {}", chain(&e))),
            }
            let _ = dev.detach_pt();
        }
        Err(e) => p.auto_domain = Some(format!("IOAS allocation failed: {}", chain(&e))),
    }
    p.verdict = match (&p.migration_flags, p.iommu_dirty_tracking, p.dma_logging) {
        (None, _, _) => "not migratable (no VFIO migration support)".into(),
        (Some(_), true, _) => "migratable; DMA tracked by the IOMMU".into(),
        (Some(_), false, true) => "migratable; DMA tracked by the device's own log".into(),
        (Some(_), false, false) if p.iommu.is_none() => {
            "migratable; emulated device without DMA (no IOMMU behind it)".into()
        }
        (Some(_), false, false) => {
            "migration blocked: neither IOMMU dirty tracking nor device DMA logging".into()
        }
    };
    p
}

fn probe_mock(fd: &Iommufd) -> Option<MockProbe> {
    let ioas = fd.alloc_ioas().ok()?;
    // ENOTTY here: the kernel has no selftest; nothing to report.
    let mock = MockDevice::new(fd, ioas.id(), 0).ok()?;
    let probed = fd.probe_device(mock.idev_id);
    let dirty_hwpt = ioas
        .alloc_hwpt(mock.idev_id, HwptFlags::DIRTY_TRACKING)
        .is_ok();
    let no_dirty_variant_refused = MockDevice::new(fd, ioas.id(), MOCK_FLAGS_DEVICE_NO_DIRTY)
        .ok()
        .is_some_and(|d| {
            ioas.alloc_hwpt(d.idev_id, HwptFlags::DIRTY_TRACKING)
                .is_err()
        });
    Some(MockProbe {
        iommu: probed.hw_info().map(caps_of),
        dirty_hwpt,
        no_dirty_variant_refused,
    })
}

/// Probes `/dev/iommu` and `/dev/vfio/devices`.
pub fn probe() -> ProbeReport {
    probe_at(Path::new("/dev/iommu"), Path::new("/dev/vfio/devices"))
}

/// Probes the given nodes.
pub fn probe_at(iommu: &Path, vfio_dir: &Path) -> ProbeReport {
    let mut r = ProbeReport::default();
    let fd = match Iommufd::open_path(iommu) {
        Ok(fd) => {
            r.iommufd = true;
            Some(fd)
        }
        Err(e) => {
            r.iommufd_error = Some(chain(&e));
            None
        }
    };
    let nodes = cdevs(vfio_dir);
    if let Some(fd) = &fd {
        r.devices = nodes.iter().map(|c| probe_device(fd, c)).collect();
        r.selftest_mock = probe_mock(fd);
    }
    if fd.is_none() {
        r.summary.push(format!(
            "no iommufd ({}): this host cannot migrate assigned devices with livemig; \
             `livemig simulate` runs the whole migration on the simulated platform",
            r.iommufd_error.as_deref().unwrap_or("unavailable")
        ));
    }
    if nodes.is_empty() {
        r.summary.push(format!(
            "no VFIO device cdevs in {} (bind a device to vfio-pci with CONFIG_VFIO_DEVICE_CDEV)",
            vfio_dir.display()
        ));
    }
    for d in &r.devices {
        r.summary.push(format!(
            "{} ({}): {}",
            d.cdev.display(),
            d.device.as_deref().unwrap_or("?"),
            d.verdict
        ));
    }
    if let Some(m) = &r.selftest_mock {
        r.summary.push(format!(
            "selftest mock IOMMU: dirty tracking {}",
            if m.iommu.as_ref().is_some_and(|i| i.dirty_tracking) && m.dirty_hwpt {
                "available"
            } else {
                "unavailable"
            }
        ));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_iommufd_says_so() {
        let dir = std::env::temp_dir().join(format!("livemig-probe-{}", std::process::id()));
        let r = probe_at(&dir.join("no-iommu"), &dir.join("no-devices"));
        assert!(!r.iommufd);
        assert!(
            r.iommufd_error.as_deref().unwrap().contains("no-iommu"),
            "{r:?}"
        );
        assert!(r.summary[0].starts_with("no iommufd"), "{r:?}");
        assert!(r.summary[1].starts_with("no VFIO device cdevs"), "{r:?}");
    }
}
