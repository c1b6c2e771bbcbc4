//! VFIO devices as the host platform opens them: a cdev, bound to the platform's iommufd,
//! attached through the auto-domain policy, with the identity the destination checks.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use livemig_iommufd::{AutoDomain, AutoDomains, Iommufd};
use livemig_vfio::{DeviceLocator, VfioDevice};

use crate::Error;

/// How a device was named: a cdev path, a PCI address or an mdev UUID.
pub fn resolve(spec: &str) -> Result<PathBuf, Error> {
    let vfio = |what: &str, source| Error::Vfio {
        device: spec.to_string(),
        what: what.to_string(),
        source,
    };
    if spec.starts_with('/') {
        return Ok(PathBuf::from(spec));
    }
    let loc = DeviceLocator::default();
    if livemig_vfio::normalize_uuid(spec).is_ok() {
        return loc
            .mdev_cdev(spec)
            .map_err(|e| vfio("finding the mdev's VFIO cdev", e));
    }
    if livemig_vfio::normalize_pci_address(spec).is_ok() {
        return loc
            .pci_cdev(spec)
            .map_err(|e| vfio("finding the PCI device's VFIO cdev", e));
    }
    Err(Error::Config(format!(
        "device {spec:?} is neither a cdev path (/dev/vfio/devices/vfioN), a PCI address \
         (0000:01:00.0) nor an mdev UUID"
    )))
}

/// The identity the destination's device must share: for an mdev its type
/// (`mdev mtty-2`), for a PCI device vendor, device and driver (`pci 8086:10ca igbvf`); read
/// from the cdev's sysfs node (`/sys/class/vfio-dev/vfioN/device`).
pub fn identity(cdev: &Path) -> Result<String, Error> {
    identity_in(Path::new("/sys"), cdev)
}

/// As [`identity`], with sysfs mounted at `sysfs`.
pub fn identity_in(sysfs: &Path, cdev: &Path) -> Result<String, Error> {
    let name = cdev
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Config(format!("{} is not a VFIO cdev path", cdev.display())))?;
    let dev = sysfs.join("class/vfio-dev").join(name).join("device");
    let io = |what: String| move |source| Error::Io { what, source };
    let link_name = |p: PathBuf| -> Option<String> {
        std::fs::read_link(&p)
            .ok()?
            .file_name()?
            .to_str()
            .map(str::to_string)
    };
    if let Some(t) = link_name(dev.join("mdev_type")) {
        return Ok(format!("mdev {t}"));
    }
    let read = |f: &str| -> Result<String, Error> {
        let p = dev.join(f);
        std::fs::read_to_string(&p)
            .map(|s| s.trim().trim_start_matches("0x").to_string())
            .map_err(io(format!("reading {}", p.display())))
    };
    let vendor = read("vendor")?;
    let device = read("device")?;
    let driver = link_name(dev.join("driver")).unwrap_or_else(|| "(no driver)".into());
    Ok(format!("pci {vendor}:{device} {driver}"))
}

/// An opened, bound and attached VFIO device.
#[derive(Debug)]
pub struct HostDevice {
    /// The name it was given by (path, PCI address or UUID).
    pub name: String,
    /// Its cdev.
    pub path: PathBuf,
    /// What the destination checks (see [`identity`]).
    pub identity: String,
    /// The iommufd device id.
    pub dev_id: u32,
    /// The auto-domain outcome (HWPT or IOAS, IOMMU dirty tracking or why not).
    pub domain: AutoDomain,
    /// The device logs its own DMA (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
    pub dma_logging: bool,
    pub(crate) dev: VfioDevice,
}

impl HostDevice {
    /// Opens `spec` (see [`resolve`]), binds it to `iommufd` and attaches it through `auto`.
    pub fn open(
        spec: &str,
        iommufd: &Iommufd,
        auto: &mut AutoDomains,
    ) -> Result<HostDevice, Error> {
        HostDevice::open_in(Path::new("/sys"), spec, iommufd, auto)
    }

    /// As [`HostDevice::open`], reading the identity from sysfs mounted at `sysfs`.
    pub fn open_in(
        sysfs: &Path,
        spec: &str,
        iommufd: &Iommufd,
        auto: &mut AutoDomains,
    ) -> Result<HostDevice, Error> {
        let vfio = |what: &str| {
            let device = spec.to_string();
            let what = what.to_string();
            move |source| Error::Vfio {
                device,
                what,
                source,
            }
        };
        let path = resolve(spec)?;
        let identity = identity_in(sysfs, &path)?;
        let dev = VfioDevice::open(&path).map_err(vfio("opening the cdev"))?;
        let dev_id = dev
            .bind_iommufd(iommufd.as_fd())
            .map_err(vfio("VFIO_DEVICE_BIND_IOMMUFD"))?;
        let probed = iommufd.probe_device(dev_id);
        let domain = auto
            .attach(&probed, |pt| {
                dev.attach_pt(pt).map_err(std::io::Error::from)
            })
            .map_err(|source| Error::Iommufd {
                what: format!("{spec}: attaching through the auto-domain policy"),
                source,
            })?;
        if !dev
            .supports_migration()
            .map_err(vfio("VFIO_DEVICE_FEATURE_MIGRATION"))?
        {
            return Err(Error::Config(format!(
                "{spec} ({identity}) does not support VFIO migration v2"
            )));
        }
        let dma_logging = dev
            .supports_dma_logging()
            .map_err(vfio("probing VFIO_DEVICE_FEATURE_DMA_LOGGING_START"))?;
        Ok(HostDevice {
            name: spec.to_string(),
            path,
            identity,
            dev_id,
            domain,
            dma_logging,
            dev,
        })
    }

    /// The device (region access, migration state).
    pub fn vfio(&self) -> &VfioDevice {
        &self.dev
    }

    /// A second handle on the same open device (a duplicated fd: same binding, same state),
    /// for the DMA log tracker while the engine owns the first.
    pub fn duplicate(&self) -> Result<VfioDevice, Error> {
        let fd = self
            .dev
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::Io {
                what: format!("{}: duplicating the device fd", self.name),
                source,
            })?;
        Ok(VfioDevice::from_fd(fd))
    }
}
