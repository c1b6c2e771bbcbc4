//! The lab configuration (`fixtures/lab.example.toml`): which devices a lab host has and what
//! the hardware tests should expect of them. Shared by `hw-tests --lab` and `cargo xtask
//! hw-test` (which prints it with `--dry-run` and builds the `--nested` QEMU command line).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LabConfig {
    /// What the host's IOMMU must be.
    pub host: Host,
    /// Devices to test; each case skips with a reason when its device is absent.
    #[serde(default, rename = "device")]
    pub devices: Vec<Device>,
    /// The L1 guest for `cargo xtask hw-test --nested`.
    pub nested: Option<Nested>,
}

/// Host expectations.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// `intel-vtd`, `amd-vi`, `arm-smmuv3` or `any`.
    pub expected_iommu: String,
    /// Fail (rather than report) when the IOMMU cannot track dirty pages.
    #[serde(default)]
    pub require_dirty_tracking: bool,
}

/// One device under test.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// A short name for case names.
    pub name: String,
    /// PCI address, `DDDD:BB:DD.F` (every kind but `mdev`).
    #[serde(default)]
    pub pci: String,
    /// The mdev's UUID (kind `mdev`, e.g. an mtty the rig's kvm profile creates).
    #[serde(default)]
    pub mdev: Option<String>,
    /// `hisi-acc-vf` (hisi_acc_vfio_pci), `vfio-pci`, or `mdev` (a mediated device: no IOMMU
    /// of its own, so only the migration cases apply).
    pub kind: String,
    /// Migration flags the device must report (`STOP_COPY`, `P2P`, `PRE_COPY`); empty: the
    /// device is not expected to migrate.
    #[serde(default)]
    pub expect_flags: Vec<String>,
    /// Name of a second device of the same kind to resume this one's state into.
    pub resume_into: Option<String>,
}

/// The nested (L1 guest) setup.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Nested {
    /// The QEMU binary (`qemu-system-x86_64` or `qemu-system-aarch64`).
    pub qemu: String,
    /// L1 kernel image.
    pub kernel: String,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// `intel-iommu`, `amd-iommu` or `smmuv3`.
    pub viommu: String,
    /// The host VF to assign (by its `device` name).
    pub device: String,
}

fn default_memory() -> u32 {
    2048
}

const IOMMUS: [&str; 4] = ["intel-vtd", "amd-vi", "arm-smmuv3", "any"];
const KINDS: [&str; 3] = ["hisi-acc-vf", "vfio-pci", "mdev"];

/// Per-device cases, in the order `hw-tests --lab` runs them.
const DEVICE_CASES: [&str; 7] = [
    "iommufd_bind_hw_info",
    "qm_registers",
    "iommu_dirty_tracking",
    "migration_flags",
    "save_restore",
    "migrate_engine",
    "migrate_kvm_vm",
];

impl Device {
    /// How the host platform names the device: its PCI address or mdev UUID.
    pub fn spec(&self) -> &str {
        self.mdev.as_deref().unwrap_or(&self.pci)
    }
}
const FLAGS: [&str; 3] = ["STOP_COPY", "P2P", "PRE_COPY"];
const VIOMMUS: [&str; 3] = ["intel-iommu", "amd-iommu", "smmuv3"];

impl LabConfig {
    /// Reads and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<LabConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read lab config {}", path.display()))?;
        LabConfig::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<LabConfig> {
        let cfg: LabConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if !IOMMUS.contains(&self.host.expected_iommu.as_str()) {
            bail!(
                "host.expected_iommu {:?} is not one of {IOMMUS:?}",
                self.host.expected_iommu
            );
        }
        for d in &self.devices {
            match (&d.mdev, d.kind.as_str()) {
                (Some(u), "mdev") if d.pci.is_empty() => {
                    livemig_vfio::normalize_uuid(u)
                        .with_context(|| format!("device {:?}: mdev", d.name))?;
                }
                (None, "mdev") => bail!("device {:?}: kind mdev needs `mdev = UUID`", d.name),
                (Some(_), _) => bail!(
                    "device {:?}: `mdev` goes with kind \"mdev\" and no `pci`",
                    d.name
                ),
                (None, _) => {
                    livemig_vfio::normalize_pci_address(&d.pci)
                        .with_context(|| format!("device {:?}", d.name))?;
                }
            }
            if !KINDS.contains(&d.kind.as_str()) {
                bail!(
                    "device {:?}: kind {:?} is not one of {KINDS:?}",
                    d.name,
                    d.kind
                );
            }
            for f in &d.expect_flags {
                if !FLAGS.contains(&f.as_str()) {
                    bail!("device {:?}: flag {f:?} is not one of {FLAGS:?}", d.name);
                }
            }
            if let Some(other) = &d.resume_into
                && !self
                    .devices
                    .iter()
                    .any(|x| &x.name == other && x.name != d.name)
            {
                bail!(
                    "device {:?}: resume_into names no other device {other:?}",
                    d.name
                );
            }
        }
        if let Some(n) = &self.nested {
            if !VIOMMUS.contains(&n.viommu.as_str()) {
                bail!("nested.viommu {:?} is not one of {VIOMMUS:?}", n.viommu);
            }
            if self.device(&n.device).is_none() {
                bail!("nested.device {:?} names no [[device]]", n.device);
            }
        }
        Ok(())
    }

    /// Every case `hw-tests --lab` runs for this config, in order (each skips with a reason
    /// where its device or pair is absent); `cargo xtask hw-test --dry-run` prints it.
    pub fn planned_cases(&self) -> Vec<String> {
        let mut v = vec!["lab.host_iommu".to_string()];
        for d in &self.devices {
            for c in DEVICE_CASES {
                v.push(format!("lab.{}.{c}", d.name));
            }
        }
        v
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/lab.example.toml");
        let cfg = LabConfig::load(path).unwrap();
        assert_eq!(cfg.host.expected_iommu, "arm-smmuv3");
        assert!(cfg.devices.len() >= 2);
        assert!(cfg.nested.is_some());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = LabConfig::parse("[host]\nexpected_iommu = \"sparc\"\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("expected_iommu \"sparc\""),
            "{e:#}"
        );
        let e = LabConfig::parse(
            "[host]\nexpected_iommu = \"any\"\n[[device]]\nname = \"x\"\npci = \"zz\"\nkind = \"vfio-pci\"\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("invalid PCI address"), "{e:#}");
        let e = LabConfig::parse("[host]\nexpected_iommu = \"any\"\nbogus = 1\n").unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
    }
}
