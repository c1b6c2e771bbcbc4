//! What sysfs tells about a VFIO device cdev, read without opening any device file.
//!
//! Opening a VFIO device can reset it, so the default probe reads only sysfs attributes:
//! `/sys/class/vfio-dev/vfioN/device` leads to the PCI function or mdev; the PCI identity
//! (`vendor`, `device`, `subsystem_vendor`, `subsystem_device`, `revision`, `class`), the
//! bound driver, the BARs (`resource`, one `start end flags` line per resource,
//! `drivers/pci/pci-sysfs.c` `resource_show`), the IOMMU group and the IOMMU unit, whose
//! registers the IOMMU drivers publish: `intel-iommu/cap` and `intel-iommu/ecap` (`%llx`,
//! `drivers/iommu/intel/iommu.c`), `amd-iommu/features` (`efr:efr2`, both `%llx`,
//! `drivers/iommu/amd/init.c`). Those are decoded with `livemig-iommu-pt`.
//!
//! A missing, unreadable or malformed attribute is named in `problems` and the rest is still
//! read.

use std::path::{Path, PathBuf};

use livemig_iommu_pt::caps::{AmdCaps, VtdCaps};
use serde::Serialize;

/// `IORESOURCE_*` flags of a `resource` line (include/linux/ioport.h).
const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x10_0000;

/// A PCI function's identity, as its configuration space gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem_device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code (base, sub, programming interface).
    pub class: u32,
}

/// One BAR (or the ROM) with a non-empty range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bar {
    /// Resource index (0-5 BARs, 6 the expansion ROM).
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// `io`, `mem32` or `mem64`, with `prefetchable` where set.
    pub kind: String,
}

/// The IOMMU unit behind a device, from its registers in sysfs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IommuUnit {
    /// The unit's name in `/sys/class/iommu` (`dmar0`, `ivhd0`, ...).
    pub name: String,
    /// `intel-iommu`, `amd-iommu`, or `unknown` (no register file this probe reads).
    pub kind: String,
    /// Whether the unit can track DMA writes (`None`: the registers say nothing readable).
    pub dirty_tracking: Option<bool>,
    /// The decoder's answer (what it supports, or the capabilities missing).
    pub detail: Option<String>,
    /// Leaf page sizes of the dirty-tracking page table (bit n = 2^n bytes; 0 unknown).
    pub page_sizes: u64,
}

/// Everything sysfs says about one cdev.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SysfsDevice {
    /// `pci`, `mdev` or `unknown`.
    pub bus: String,
    /// The bound driver (a variant driver such as `hisi_acc_vfio_pci`, `vfio-pci`, `mtty`).
    pub driver: Option<String>,
    /// PCI identity (PCI functions only).
    pub pci: Option<PciIdentity>,
    /// BARs with a non-empty range (PCI functions only).
    pub bars: Vec<Bar>,
    /// The mdev type (`mtty-2`, ...), its `name` and `device_api` (mdevs only).
    pub mdev_type: Option<String>,
    /// The mdev type's human-readable name.
    pub mdev_type_name: Option<String>,
    /// The mdev type's `device_api` (`vfio-pci`, ...).
    pub device_api: Option<String>,
    /// The mdev's parent device.
    pub parent: Option<String>,
    /// IOMMU group number.
    pub iommu_group: Option<String>,
    /// The IOMMU unit (none for an mdev: its DMA is emulated).
    pub iommu_unit: Option<IommuUnit>,
    /// Attributes that could not be read or parsed, each with the file and the reason.
    pub problems: Vec<String>,
}

/// Where sysfs is (a fixture tree in tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
        }
    }
}

fn link_name(p: &Path) -> Option<String> {
    let t = std::fs::read_link(p).ok()?;
    Some(t.file_name()?.to_string_lossy().into_owned())
}

impl Sysfs {
    /// Sysfs mounted at `root`.
    #[cfg(test)]
    pub fn at(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    /// The device directory of cdev `name` (`vfio0`, ...) and its name (PCI address or mdev
    /// UUID).
    pub fn device_of(&self, name: &str) -> Option<(PathBuf, String)> {
        let link = self.root.join("class/vfio-dev").join(name).join("device");
        let dir = std::fs::canonicalize(&link).ok()?;
        let id = dir.file_name()?.to_string_lossy().into_owned();
        Some((dir, id))
    }

    /// Reads everything this module knows about cdev `name`.
    #[cfg(test)]
    pub fn describe(&self, name: &str) -> SysfsDevice {
        self.describe_at(name, self.device_of(name).map(|(dir, _)| dir).as_deref())
    }

    /// Reads everything this module knows about cdev `name`, whose device directory
    /// ([`device_of`](Sysfs::device_of)) the caller already looked up (`None`: it has none).
    pub fn describe_at(&self, name: &str, dir: Option<&Path>) -> SysfsDevice {
        let mut d = SysfsDevice {
            bus: "unknown".into(),
            ..Default::default()
        };
        let Some(dir) = dir else {
            d.problems.push(format!(
                "{}: missing (no sysfs device for {name})",
                self.root
                    .join("class/vfio-dev")
                    .join(name)
                    .join("device")
                    .display()
            ));
            return d;
        };
        d.driver = link_name(&dir.join("driver"));
        d.iommu_group = link_name(&dir.join("iommu_group"));
        if dir.join("mdev_type").exists() {
            d.bus = "mdev".into();
            d.mdev_type = link_name(&dir.join("mdev_type"));
            d.mdev_type_name = self.text(&dir.join("mdev_type/name"), &mut d.problems);
            d.device_api = self.text(&dir.join("mdev_type/device_api"), &mut d.problems);
            d.parent = dir
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned());
            return d;
        }
        if !dir.join("vendor").exists() {
            d.problems.push(format!(
                "{}: neither a PCI function (no vendor) nor an mdev (no mdev_type)",
                dir.display()
            ));
            return d;
        }
        d.bus = "pci".into();
        let mut p = PciIdentity::default();
        let mut ok = true;
        for (attr, bits) in [
            ("vendor", 16u32),
            ("device", 16),
            ("subsystem_vendor", 16),
            ("subsystem_device", 16),
            ("revision", 8),
            ("class", 24),
        ] {
            match self.hex(&dir.join(attr), bits, &mut d.problems) {
                Some(v) => match attr {
                    "vendor" => p.vendor = v as u16,
                    "device" => p.device = v as u16,
                    "subsystem_vendor" => p.subsystem_vendor = v as u16,
                    "subsystem_device" => p.subsystem_device = v as u16,
                    "revision" => p.revision = v as u8,
                    _ => p.class = v as u32,
                },
                None => ok = false,
            }
        }
        if ok {
            d.pci = Some(p);
        }
        d.bars = self.bars(&dir.join("resource"), &mut d.problems);
        d.iommu_unit = link_name(&dir.join("iommu")).map(|unit| self.unit(&unit, &mut d.problems));
        d
    }

    fn text(&self, p: &Path, problems: &mut Vec<String>) -> Option<String> {
        match std::fs::read(p) {
            Ok(b) => match String::from_utf8(b) {
                Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Ok(_) => {
                    problems.push(format!("{}: empty", p.display()));
                    None
                }
                Err(_) => {
                    problems.push(format!("{}: not UTF-8 text", p.display()));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("{}: {e}", p.display()));
                None
            }
        }
    }

    /// A `0x...` hexadecimal attribute of at most `bits` bits.
    fn hex(&self, p: &Path, bits: u32, problems: &mut Vec<String>) -> Option<u64> {
        let s = self.text(p, problems)?;
        let digits = s.strip_prefix("0x").unwrap_or(&s);
        match u64::from_str_radix(digits, 16) {
            Ok(v) if bits >= 64 || v >> bits == 0 => Some(v),
            Ok(v) => {
                problems.push(format!("{}: {v:#x} does not fit {bits} bits", p.display()));
                None
            }
            Err(_) => {
                problems.push(format!("{}: {s:?} is not hexadecimal", p.display()));
                None
            }
        }
    }

    fn bars(&self, p: &Path, problems: &mut Vec<String>) -> Vec<Bar> {
        let Some(s) = self.text(p, problems) else {
            return Vec::new();
        };
        let mut bars = Vec::new();
        for (i, line) in s.lines().enumerate() {
            let v: Vec<Option<u64>> = line
                .split_whitespace()
                .map(|f| u64::from_str_radix(f.strip_prefix("0x").unwrap_or(f), 16).ok())
                .collect();
            let [Some(start), Some(end), Some(flags)] = v[..] else {
                problems.push(format!(
                    "{} line {}: {line:?} is not `start end flags` in hexadecimal",
                    p.display(),
                    i + 1
                ));
                continue;
            };
            // Only BARs 0-5 and the ROM (6); bridges list windows after them.
            if i > 6 || (start == 0 && end == 0) {
                continue;
            }
            if end < start {
                problems.push(format!(
                    "{} line {}: end {end:#x} below start {start:#x}",
                    p.display(),
                    i + 1
                ));
                continue;
            }
            let mut kind = if flags & IORESOURCE_IO != 0 {
                "io".to_string()
            } else if flags & IORESOURCE_MEM != 0 {
                if flags & IORESOURCE_MEM_64 != 0 {
                    "mem64".to_string()
                } else {
                    "mem32".to_string()
                }
            } else {
                format!("flags {flags:#x}")
            };
            if flags & IORESOURCE_PREFETCH != 0 {
                kind.push_str(" prefetchable");
            }
            bars.push(Bar {
                index: i as u32,
                size: end - start + 1,
                kind,
            });
        }
        bars
    }

    fn unit(&self, name: &str, problems: &mut Vec<String>) -> IommuUnit {
        let dir = self.root.join("class/iommu").join(name);
        let mut u = IommuUnit {
            name: name.to_string(),
            kind: "unknown".into(),
            ..Default::default()
        };
        if dir.join("intel-iommu").is_dir() {
            u.kind = "intel-iommu".into();
            let cap = self.hex(&dir.join("intel-iommu/cap"), 64, problems);
            let ecap = self.hex(&dir.join("intel-iommu/ecap"), 64, problems);
            if let (Some(cap), Some(ecap)) = (cap, ecap) {
                let s = VtdCaps::from_regs(cap, ecap).dirty_support();
                u.dirty_tracking = Some(s.supported());
                u.detail = Some(s.to_string());
                u.page_sizes = s.page_sizes;
            }
        } else if dir.join("amd-iommu").is_dir() {
            u.kind = "amd-iommu".into();
            let f = dir.join("amd-iommu/features");
            if let Some(s) = self.text(&f, problems) {
                let efr = s.split(':').next().unwrap_or("");
                match u64::from_str_radix(efr, 16) {
                    Ok(efr) => {
                        let s = AmdCaps::from_efr(efr).dirty_support();
                        u.dirty_tracking = Some(s.supported());
                        u.detail = Some(s.to_string());
                        u.page_sizes = s.page_sizes;
                    }
                    Err(_) => problems.push(format!(
                        "{}: {s:?} is not `efr:efr2` in hexadecimal",
                        f.display()
                    )),
                }
            }
        }
        u
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sysfs tree: vfio0 a PCI function behind a VT-d unit with dirty tracking, vfio1 an
    /// mtty mdev, vfio2 a PCI function whose attributes are garbage or missing, vfio3 behind
    /// an AMD unit without HDSup.
    pub(crate) fn fixture(root: &Path) {
        let w = |p: &str, s: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, s).unwrap();
        };
        let l = |target: &str, p: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(root.join(target), p).unwrap();
        };
        let pci = "devices/pci0000:00/0000:00:03.0";
        for (a, v) in [
            ("vendor", "0x19e5\n"),
            ("device", "0xa251\n"),
            ("subsystem_vendor", "0x19e5\n"),
            ("subsystem_device", "0x0000\n"),
            ("revision", "0x21\n"),
            ("class", "0x120000\n"),
        ] {
            w(&format!("{pci}/{a}"), v);
        }
        w(
            &format!("{pci}/resource"),
            "0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000200000000000 0x000020000000ffff 0x000000000014220c\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n",
        );
        std::fs::create_dir_all(root.join("bus/pci/drivers/hisi_acc_vfio_pci")).unwrap();
        l(
            "bus/pci/drivers/hisi_acc_vfio_pci",
            &format!("{pci}/driver"),
        );
        std::fs::create_dir_all(root.join("kernel/iommu_groups/7")).unwrap();
        l("kernel/iommu_groups/7", &format!("{pci}/iommu_group"));
        // Scalable mode, SLTS, SLADS, SMPWC: ECAP bits 43, 46, 45, 48.
        let ecap: u64 = (1 << 43) | (1 << 45) | (1 << 46) | (1 << 48);
        w(
            "devices/virtual/iommu/dmar0/intel-iommu/cap",
            "d2008c40660462\n",
        );
        w(
            "devices/virtual/iommu/dmar0/intel-iommu/ecap",
            &format!("{ecap:x}\n"),
        );
        l("devices/virtual/iommu/dmar0", "class/iommu/dmar0");
        l("devices/virtual/iommu/dmar0", &format!("{pci}/iommu"));
        l(pci, "class/vfio-dev/vfio0/device");

        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        let parent = "devices/virtual/mtty/mtty";
        w(
            &format!("{parent}/mdev_supported_types/mtty-2/name"),
            "Dual-port serial\n",
        );
        w(
            &format!("{parent}/mdev_supported_types/mtty-2/device_api"),
            "vfio-pci\n",
        );
        l(
            &format!("{parent}/mdev_supported_types/mtty-2"),
            &format!("{parent}/{uuid}/mdev_type"),
        );
        std::fs::create_dir_all(root.join("bus/mdev/drivers/vfio_mdev")).unwrap();
        l(
            "bus/mdev/drivers/vfio_mdev",
            &format!("{parent}/{uuid}/driver"),
        );
        l(&format!("{parent}/{uuid}"), "class/vfio-dev/vfio1/device");

        let bad = "devices/pci0000:00/0000:00:04.0";
        w(&format!("{bad}/vendor"), "0xzz\n");
        w(&format!("{bad}/device"), "0x123456\n");
        w(&format!("{bad}/subsystem_vendor"), "\n");
        w(&format!("{bad}/revision"), "0x01\n");
        w(&format!("{bad}/class"), "0x020000\n");
        w(&format!("{bad}/resource"), "0x1000 0x1fff\n0x0 0x0 0x0\n");
        l(bad, "class/vfio-dev/vfio2/device");

        let amd = "devices/pci0000:00/0000:00:05.0";
        for (a, v) in [
            ("vendor", "0x1af4\n"),
            ("device", "0x1041\n"),
            ("subsystem_vendor", "0x1af4\n"),
            ("subsystem_device", "0x1100\n"),
            ("revision", "0x01\n"),
            ("class", "0x020000\n"),
        ] {
            w(&format!("{amd}/{a}"), v);
        }
        w(
            &format!("{amd}/resource"),
            "0x000000000000c000 0x000000000000c03f 0x0000000000040101\n",
        );
        // EFR with HASup (bit 49) but not HDSup (bit 52).
        w(
            "devices/virtual/iommu/ivhd0/amd-iommu/features",
            &format!("{:x}:0\n", 1u64 << 49),
        );
        l("devices/virtual/iommu/ivhd0", "class/iommu/ivhd0");
        l("devices/virtual/iommu/ivhd0", &format!("{amd}/iommu"));
        l(amd, "class/vfio-dev/vfio3/device");
    }

    fn tree(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("livemig-sysfs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        fixture(&root);
        root
    }

    #[test]
    fn a_pci_function_behind_vtd_is_described_from_its_attributes() {
        let root = tree("pci");
        let s = Sysfs::at(&root);
        assert_eq!(s.device_of("vfio0").unwrap().1, "0000:00:03.0");
        let d = s.describe("vfio0");
        assert_eq!(d.problems, Vec::<String>::new());
        assert_eq!(d.bus, "pci");
        assert_eq!(d.driver.as_deref(), Some("hisi_acc_vfio_pci"));
        assert_eq!(
            d.pci,
            Some(PciIdentity {
                vendor: 0x19e5,
                device: 0xa251,
                subsystem_vendor: 0x19e5,
                subsystem_device: 0,
                revision: 0x21,
                class: 0x120000,
            })
        );
        assert_eq!(
            d.bars,
            vec![Bar {
                index: 2,
                size: 0x10000,
                kind: "mem64 prefetchable".into()
            }]
        );
        assert_eq!(d.iommu_group.as_deref(), Some("7"));
        let u = d.iommu_unit.unwrap();
        assert_eq!((u.name.as_str(), u.kind.as_str()), ("dmar0", "intel-iommu"));
        assert_eq!(u.dirty_tracking, Some(true), "{u:?}");
        // CAP.SSPS (bits 37:34) = 0b0011 of d2008c40660462: 2 MiB and 1 GiB besides 4 KiB.
        assert_eq!(u.page_sizes, (1 << 12) | (1 << 21) | (1 << 30), "{u:?}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_mdev_is_described_by_its_type_and_parent() {
        let root = tree("mdev");
        let d = Sysfs::at(&root).describe("vfio1");
        assert_eq!(d.problems, Vec::<String>::new());
        assert_eq!(d.bus, "mdev");
        assert_eq!(d.mdev_type.as_deref(), Some("mtty-2"));
        assert_eq!(d.mdev_type_name.as_deref(), Some("Dual-port serial"));
        assert_eq!(d.device_api.as_deref(), Some("vfio-pci"));
        assert_eq!(d.parent.as_deref(), Some("mtty"));
        assert_eq!(d.driver.as_deref(), Some("vfio_mdev"));
        assert!(d.iommu_unit.is_none() && d.pci.is_none());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn garbage_and_missing_attributes_are_named_and_the_rest_is_read() {
        let root = tree("bad");
        let d = Sysfs::at(&root).describe("vfio2");
        assert_eq!(d.bus, "pci");
        assert!(
            d.pci.is_none(),
            "an incomplete identity is not reported: {d:?}"
        );
        let has = |file: &str, what: &str| {
            d.problems
                .iter()
                .any(|p| p.contains(&format!("0000:00:04.0/{file}")) && p.contains(what))
        };
        assert!(has("vendor", "not hexadecimal"), "{:?}", d.problems);
        assert!(has("device", "does not fit 16 bits"), "{:?}", d.problems);
        assert!(has("subsystem_vendor", "empty"), "{:?}", d.problems);
        assert!(has("subsystem_device", "No such file"), "{:?}", d.problems);
        assert!(
            has("resource line 1", "start end flags"),
            "{:?}",
            d.problems
        );
        assert_eq!(d.problems.len(), 5, "{:?}", d.problems);
        // A cdev without a sysfs device.
        let d = Sysfs::at(&root).describe("vfio9");
        assert!(d.problems[0].contains("vfio9"), "{d:?}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_amd_unit_without_hdsup_says_what_is_missing() {
        let root = tree("amd");
        let d = Sysfs::at(&root).describe("vfio3");
        assert_eq!(d.problems, Vec::<String>::new());
        assert_eq!(
            d.bars,
            vec![Bar {
                index: 0,
                size: 0x40,
                kind: "io".into()
            }]
        );
        let u = d.iommu_unit.unwrap();
        assert_eq!(u.kind, "amd-iommu");
        assert_eq!(u.dirty_tracking, Some(false));
        assert!(u.detail.unwrap().contains("HDSup"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
