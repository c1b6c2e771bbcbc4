//! What this host offers for migration: `/dev/iommu`, every VFIO device cdev with what sysfs
//! tells about it (identity, driver, BARs, the IOMMU unit and whether it tracks dirty pages),
//! and — on kernels built with `CONFIG_IOMMUFD_TEST` — the selftest mock IOMMU.
//!
//! By default no device file is opened: opening a VFIO device can reset it, and a probe must
//! not disturb a device a VMM is about to use. `/dev/iommu` is opened (an iommufd context
//! touches no device). With `open` (`livemig probe --open`) each device cdev is also opened,
//! bound to a private iommufd and attached to a private IOAS for the deep report: IOMMU
//! capabilities from `IOMMU_GET_HW_INFO`, migration flags, DMA logging and the auto-domain
//! outcome. A device another process holds is then reported as busy, not taken.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use livemig_iommufd::selftest::{MOCK_FLAGS_DEVICE_NO_DIRTY, MockDevice};
use livemig_iommufd::{AutoDomains, HwInfo, HwptFlags, Iommufd, VendorInfo};
use livemig_vfio::{DmaLogger, DmaRange, MigrationDevice, VfioDevice};
use serde::Serialize;

use livemig::compat::{DmaLoggingLimits, flag_names};
use livemig::error::chain;

use crate::sysfs::{Sysfs, SysfsDevice};

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
    /// What sysfs tells about it (read without opening anything).
    pub sysfs: SysfsDevice,
    /// The device file was opened (only with `--open`).
    pub opened: bool,
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
    /// The DMA log's limits: a START over one 2 MiB range with a 4 KiB hint, then STOP, gives
    /// the page size the device chose; the range budget is the kernel's (only with `--open`
    /// on a device with a DMA log).
    pub dma_logging_limits: Option<DmaLoggingLimits>,
    /// Why the limits could not be read.
    pub dma_logging_error: Option<String>,
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
    /// Device files were opened (`--open`); otherwise only sysfs and `/dev/iommu` were read.
    pub opened_devices: bool,
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

fn cdev_name(cdev: &Path) -> String {
    cdev.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The read-only report of one cdev: sysfs only.
fn describe_device(sys: &Sysfs, cdev: &Path) -> DeviceProbe {
    let name = cdev_name(cdev);
    let found = sys.device_of(&name);
    let info = sys.describe_at(&name, found.as_ref().map(|(dir, _)| dir.as_path()));
    let verdict = match (info.bus.as_str(), &info.iommu_unit) {
        ("mdev", _) => "an mdev (emulated device, no IOMMU behind it); migration support needs \
                        `--open`"
            .to_string(),
        ("pci", Some(u)) => match u.dirty_tracking {
            Some(true) => format!(
                "IOMMU {} tracks dirty pages; migration support needs `--open`",
                u.name
            ),
            Some(false) => format!(
                "IOMMU {} cannot track dirty pages ({}): migration needs the device's own DMA \
                 logging; `--open` tells",
                u.name,
                u.detail.as_deref().unwrap_or("?")
            ),
            None => format!(
                "IOMMU {} ({}): dirty tracking unknown from sysfs; `--open` tells",
                u.name, u.kind
            ),
        },
        ("pci", None) => "no IOMMU unit in sysfs; `--open` tells more".to_string(),
        _ => "not described by sysfs".to_string(),
    };
    DeviceProbe {
        cdev: cdev.to_path_buf(),
        device: found.map(|(_, id)| id),
        sysfs: info,
        verdict,
        ..Default::default()
    }
}

fn probe_device(fd: &Iommufd, sys: &Sysfs, cdev: &Path) -> DeviceProbe {
    let mut p = describe_device(sys, cdev);
    p.opened = true;
    let mut dev = match VfioDevice::open(cdev) {
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
            if p.dma_logging {
                match dma_logging_limits(&mut dev) {
                    Ok(l) => p.dma_logging_limits = Some(l),
                    Err(e) => p.dma_logging_error = Some(chain(&e)),
                }
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

/// A device's identity for a compatibility descriptor, and its layout block: PCI IDs,
/// revision and driver (or the mdev type and driver), and the BARs' sizes and kinds, which a
/// guest sees and a destination must reproduce exactly. Falls back to the device name when
/// sysfs says nothing better.
pub fn identity(d: &DeviceProbe) -> (String, String) {
    let s = &d.sysfs;
    let driver = s.driver.as_deref().unwrap_or("no driver");
    let id = match (&s.pci, &s.mdev_type) {
        (Some(p), _) => format!(
            "pci {:04x}:{:04x} subsystem {:04x}:{:04x} rev {:02x} class {:06x} {driver}",
            p.vendor, p.device, p.subsystem_vendor, p.subsystem_device, p.revision, p.class
        ),
        (None, Some(t)) => format!(
            "mdev {t} ({}) {driver}",
            s.device_api.as_deref().unwrap_or("unknown api")
        ),
        (None, None) => d.device.clone().unwrap_or_default(),
    };
    let layout = s
        .bars
        .iter()
        .map(|b| format!("bar{} {:#x} {}", b.index, b.size, b.kind))
        .collect::<Vec<_>>()
        .join("; ");
    (id, layout)
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

/// Probes `/dev/iommu`, `/dev/vfio/devices` and `/sys`; opens the device files only if
/// `open`.
pub fn probe(open: bool) -> ProbeReport {
    probe_at(
        Path::new("/dev/iommu"),
        Path::new("/dev/vfio/devices"),
        &Sysfs::default(),
        open,
    )
}

/// Probes the given nodes.
pub fn probe_at(iommu: &Path, vfio_dir: &Path, sys: &Sysfs, open: bool) -> ProbeReport {
    let mut r = ProbeReport {
        opened_devices: open,
        ..Default::default()
    };
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
    // Listing the directory opens no device file.
    let nodes = cdevs(vfio_dir);
    r.devices = match (&fd, open) {
        (Some(fd), true) => nodes.iter().map(|c| probe_device(fd, sys, c)).collect(),
        _ => nodes.iter().map(|c| describe_device(sys, c)).collect(),
    };
    if let Some(fd) = &fd {
        r.selftest_mock = probe_mock(fd);
    }
    r.summary.push(if open {
        "--open: idle device files were opened, bound to a private iommufd and attached to a \
         private IOAS (opening a VFIO device can reset it)"
            .to_string()
    } else {
        "read-only: no device file was opened (sysfs and /dev/iommu only); `livemig probe \
         --open` adds migration flags, DMA logging and the auto-domain outcome"
            .to_string()
    });
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

/// Starts the device's DMA log over one 2 MiB range at IOVA 0 with a 4 KiB hint and stops it
/// again: the page size START returns is the granularity the device tracks at. The device is
/// attached to an empty IOAS at this point, so it can do no DMA while the log runs.
fn dma_logging_limits(dev: &mut impl DmaLogger) -> Result<DmaLoggingLimits, livemig_vfio::Error> {
    let session = dev.start(4096, &[DmaRange::new(0, 2 << 20)])?;
    let stopped = dev.dma_logging_stop();
    let limits = DmaLoggingLimits {
        page_size: session.page_size,
        max_ranges: u32::try_from(dev.dma_logging_max_ranges()).unwrap_or(u32::MAX),
    };
    stopped.map(|()| limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DMA log that rounds the hint up to its own granularity, as a driver may.
    struct Log {
        granule: u64,
        started: Vec<(u64, Vec<DmaRange>)>,
        stopped: u32,
        stop_fails: bool,
    }

    impl DmaLogger for Log {
        fn dma_logging_max_ranges(&self) -> usize {
            64
        }
        fn dma_logging_start_raw(
            &mut self,
            page_size: u64,
            ranges: &[DmaRange],
        ) -> Result<u64, livemig_vfio::Error> {
            self.started.push((page_size, ranges.to_vec()));
            Ok(page_size.max(self.granule))
        }
        fn dma_logging_report(
            &mut self,
            _: u64,
            _: u64,
            _: u64,
            _: &mut [u64],
        ) -> Result<(), livemig_vfio::Error> {
            unreachable!("the probe reads no report")
        }
        fn dma_logging_stop(&mut self) -> Result<(), livemig_vfio::Error> {
            self.stopped += 1;
            if self.stop_fails {
                Err(livemig_vfio::Error::InvalidArgument {
                    op: livemig_vfio::Op::Feature(
                        livemig_vfio::Access::Set,
                        livemig_vfio::Feature::DmaLoggingStop,
                    ),
                    rule: "stop refused".into(),
                })
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn dma_logging_limits_are_what_start_returns_and_the_log_is_stopped() {
        let mut log = Log {
            granule: 64 << 10,
            started: vec![],
            stopped: 0,
            stop_fails: false,
        };
        let l = dma_logging_limits(&mut log).unwrap();
        assert_eq!(l.page_size, 64 << 10);
        assert_eq!(l.max_ranges, 64);
        assert_eq!(log.started, vec![(4096, vec![DmaRange::new(0, 2 << 20)])]);
        assert_eq!(log.stopped, 1);
        log.stop_fails = true;
        let e = dma_logging_limits(&mut log).unwrap_err();
        assert!(e.to_string().contains("stop refused"), "{e}");
        assert_eq!(log.stopped, 2);
    }

    #[test]
    fn a_host_without_iommufd_says_so() {
        let dir = std::env::temp_dir().join(format!("livemig-probe-{}", std::process::id()));
        let r = probe_at(
            &dir.join("no-iommu"),
            &dir.join("no-devices"),
            &Sysfs::at(dir.join("sys")),
            true,
        );
        assert!(!r.iommufd);
        assert!(
            r.iommufd_error.as_deref().unwrap().contains("no-iommu"),
            "{r:?}"
        );
        assert!(r.summary[0].starts_with("--open"), "{r:?}");
        assert!(r.summary[1].starts_with("no iommufd"), "{r:?}");
        assert!(r.summary[2].starts_with("no VFIO device cdevs"), "{r:?}");
    }

    /// inotify `IN_OPEN` events on files in the watched directory since the last call.
    fn opens(fd: i32) -> usize {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a local buffer of the given length from an inotify fd we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return 0;
        }
        let (mut at, mut count) = (0usize, 0);
        while at + 16 <= n as usize {
            let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
            let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            // Events without a name are about the directory itself (listing it opens it).
            count += usize::from(mask & libc::IN_OPEN != 0 && len > 0);
            at += 16 + len;
        }
        count
    }

    /// The default probe describes every cdev from sysfs without opening it: the kernel's
    /// inotify reports no open of any cdev (and does report one made on purpose).
    #[test]
    fn the_default_probe_opens_no_device_file() {
        let dir = std::env::temp_dir().join(format!("livemig-probe-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::sysfs::tests::fixture(&dir.join("sys"));
        let dev = dir.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        for n in ["vfio0", "vfio1", "vfio2", "vfio3"] {
            std::fs::write(dev.join(n), b"").unwrap();
        }
        // SAFETY: plain system calls on a fresh fd and a valid NUL-terminated path.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let path = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
        // SAFETY: as above.
        assert!(unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_OPEN) } >= 0);
        let r = probe_at(
            &dir.join("no-iommu"),
            &dev,
            &Sysfs::at(dir.join("sys")),
            false,
        );
        assert!(!r.opened_devices);
        assert!(r.summary[0].starts_with("read-only"), "{r:?}");
        assert_eq!(r.devices.len(), 4);
        let d = |n: &str| r.devices.iter().find(|d| d.cdev.ends_with(n)).unwrap();
        assert!(
            r.devices
                .iter()
                .all(|d| !d.opened && d.migration_flags.is_none())
        );
        assert_eq!(d("vfio0").device.as_deref(), Some("0000:00:03.0"));
        assert!(
            d("vfio0")
                .verdict
                .starts_with("IOMMU dmar0 tracks dirty pages"),
            "{r:?}"
        );
        assert!(d("vfio1").verdict.starts_with("an mdev"), "{r:?}");
        assert_eq!(d("vfio2").sysfs.problems.len(), 5, "{r:?}");
        assert!(
            d("vfio3").verdict.contains("cannot track dirty pages"),
            "{r:?}"
        );
        assert_eq!(opens(fd), 0, "the read-only probe opened a device file");
        // The watch sees an open when there is one.
        drop(std::fs::File::open(dev.join("vfio0")).unwrap());
        assert_eq!(opens(fd), 1);
        // SAFETY: closes the inotify fd this test made.
        unsafe { libc::close(fd) };
        let _ = std::fs::remove_dir_all(&dir);
    }
}
