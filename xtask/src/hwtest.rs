//! `cargo xtask hw-test`: hw-tests on a lab host, against the devices of a lab config.
//!
//! * Default: build hw-tests for the host and run `hw-tests --lab CONFIG` (as root).
//! * `--dry-run`: print the configuration, the cases and the command; run nothing.
//! * `--nested`: boot an L1 guest with the configured VF assigned to it (QEMU `vfio-pci` on the
//!   iommufd backend, behind a vIOMMU) and run the lab cases inside, against the VF at its guest
//!   address. The guest gets hw-tests as `/init` and a translated config as `/lab.toml`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hw_tests::lab_config::{LabConfig, Nested};

use crate::rig;

/// Options of `cargo xtask hw-test`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: PathBuf,
    pub dry_run: bool,
    pub nested: bool,
    pub filter: Option<String>,
}

/// The guest address the assigned VF gets in the L1 machine (slot 5 of the root bus).
pub const NESTED_GUEST_PCI: &str = "0000:00:05.0";

/// The cases hw-tests will run for `cfg`.
pub fn planned_cases(cfg: &LabConfig) -> Vec<String> {
    cfg.planned_cases()
}

/// The L1 guest's lab config: the VF at its guest address, behind the vIOMMU (which has no
/// dirty tracking, so it is not required).
pub fn nested_config(cfg: &LabConfig, n: &Nested) -> Result<String> {
    let dev = cfg
        .device(&n.device)
        .with_context(|| format!("nested.device {:?} is not configured", n.device))?;
    let iommu = match n.viommu.as_str() {
        "intel-iommu" => "intel-vtd",
        "amd-iommu" => "amd-vi",
        "smmuv3" => "arm-smmuv3",
        other => bail!("unknown vIOMMU {other:?}"),
    };
    let flags = dev
        .expect_flags
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!(
        "[host]\nexpected_iommu = \"{iommu}\"\nrequire_dirty_tracking = false\n\n[[device]]\nname = \"{}\"\npci = \"{NESTED_GUEST_PCI}\"\nkind = \"{}\"\nexpect_flags = [{flags}]\n",
        dev.name, dev.kind
    ))
}

/// The QEMU command line for the L1 guest.
pub fn nested_command_line(cfg: &LabConfig, n: &Nested, initrd: &Path) -> Result<Vec<String>> {
    let dev = cfg
        .device(&n.device)
        .with_context(|| format!("nested.device {:?} is not configured", n.device))?;
    let host = livemig_vfio::normalize_pci_address(&dev.pci)
        .with_context(|| format!("device {:?}", dev.name))?;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let mut c = vec![n.qemu.clone()];
    c.extend(s(&["-accel", "kvm", "-cpu", "host"]));
    let console = match n.viommu.as_str() {
        "intel-iommu" => {
            c.extend(s(&[
                "-machine",
                "q35,kernel-irqchip=split",
                "-device",
                "intel-iommu,intremap=on,caching-mode=on",
            ]));
            "ttyS0"
        }
        "amd-iommu" => {
            c.extend(s(&["-machine", "q35", "-device", "amd-iommu"]));
            "ttyS0"
        }
        "smmuv3" => {
            c.extend(s(&["-machine", "virt,iommu=smmuv3,gic-version=3"]));
            "ttyAMA0"
        }
        other => bail!("unknown vIOMMU {other:?}"),
    };
    c.extend(s(&["-object", "iommufd,id=iommufd0"]));
    c.push("-device".into());
    c.push(format!("vfio-pci,host={host},iommufd=iommufd0,addr=0x5"));
    c.extend([
        "-m".to_string(),
        n.memory_mib.to_string(),
        "-smp".into(),
        "2".into(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        n.kernel.clone(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        format!("console={console} panic=-1 oops=panic loglevel=4 livemig.profile=lab"),
    ]);
    Ok(c)
}

fn build_hw_tests(static_link: bool) -> Result<PathBuf> {
    if static_link {
        return rig::hw_tests_static();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(rig::workspace_root())
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "hw-tests",
            "--bin",
            "hw-tests",
        ])
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("building hw-tests failed ({status})");
    }
    Ok(rig::target_dir().join("release").join("hw-tests"))
}

pub fn hw_test(o: &Options) -> Result<()> {
    let path = if o.config.as_os_str().is_empty() {
        rig::workspace_root().join("fixtures/lab.example.toml")
    } else {
        o.config.clone()
    };
    let cfg = LabConfig::load(&path)?;
    if o.nested {
        let n = cfg
            .nested
            .clone()
            .with_context(|| format!("{} has no [nested] section", path.display()))?;
        let logs = rig::target_dir().join("rig").join("logs");
        let initrd = rig::target_dir().join("rig").join("nested-initramfs.cpio");
        let argv = nested_command_line(&cfg, &n, &initrd)?;
        let guest_cfg = nested_config(&cfg, &n)?;
        if o.dry_run {
            println!("would boot the L1 guest:\n  {}", argv.join(" "));
            println!("with /lab.toml:\n{guest_cfg}");
            return Ok(());
        }
        std::fs::create_dir_all(&logs)?;
        let init = std::fs::read(build_hw_tests(true)?)?;
        std::fs::write(
            &initrd,
            rig::initramfs(&init, &[("lab.toml", guest_cfg.as_bytes())]),
        )?;
        let run = crate::qemu::run(
            &argv,
            &logs.join("nested.log"),
            Duration::from_secs(900),
            |l| {
                if let Some(i) = l.find("[hw-tests] ") {
                    eprintln!("  nested: {}", &l[i + 11..]);
                }
            },
            |l| l.contains("[hw-tests] ") && l.ends_with(" failed") && l.contains(" passed, "),
        )?;
        let out = rig::parse(&run.lines);
        println!("{} passed, {} failed", out.passed, out.failed);
        if !out.complete || out.failed > 0 {
            bail!("nested hw-tests failed; console log {}", run.log.display());
        }
        return Ok(());
    }
    if o.dry_run {
        println!("lab config {}:", path.display());
        println!(
            "  host IOMMU {} (dirty tracking {})",
            cfg.host.expected_iommu,
            if cfg.host.require_dirty_tracking {
                "required"
            } else {
                "reported"
            }
        );
        for d in &cfg.devices {
            println!(
                "  device {} at {} ({}), flags {:?}{}",
                d.name,
                d.spec(),
                d.kind,
                d.expect_flags,
                d.resume_into
                    .as_ref()
                    .map(|t| format!(", resumes into {t}"))
                    .unwrap_or_default()
            );
        }
        println!("cases (each skips with a reason when its device is absent):");
        for c in planned_cases(&cfg) {
            if o.filter.as_ref().is_none_or(|f| c.contains(f.as_str())) {
                println!("  {c}");
            }
        }
        println!("would run: hw-tests --lab {}", path.display());
        return Ok(());
    }
    let bin = build_hw_tests(false)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--lab").arg(&path);
    if let Some(f) = &o.filter {
        cmd.args(["--filter", f]);
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !status.success() {
        bail!("hw-tests reported failures ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> LabConfig {
        LabConfig::load(rig::workspace_root().join("fixtures/lab.example.toml")).unwrap()
    }

    #[test]
    fn nested_smmuv3_command_line() {
        let cfg = example();
        let n = cfg.nested.clone().unwrap();
        let c = nested_command_line(&cfg, &n, Path::new("/tmp/i.cpio"))
            .unwrap()
            .join(" ");
        assert!(c.starts_with(
            "qemu-system-aarch64 -accel kvm -cpu host -machine virt,iommu=smmuv3,gic-version=3"
        ));
        assert!(c.contains("-object iommufd,id=iommufd0 -device vfio-pci,host=0000:76:00.1,iommufd=iommufd0,addr=0x5"));
        assert!(c.contains("-initrd /tmp/i.cpio"));
        assert!(c.ends_with("console=ttyAMA0 panic=-1 oops=panic loglevel=4 livemig.profile=lab"));
    }

    #[test]
    fn nested_x86_command_lines() {
        let mut cfg = example();
        let mut n = cfg.nested.clone().unwrap();
        n.qemu = "qemu-system-x86_64".into();
        n.viommu = "intel-iommu".into();
        cfg.nested = Some(n.clone());
        let c = nested_command_line(&cfg, &n, Path::new("i")).unwrap();
        let s = c.join(" ");
        assert!(s.contains(
            "-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on"
        ));
        assert!(s.contains("console=ttyS0"));
        let iommu = c.iter().position(|a| a.starts_with("intel-iommu")).unwrap();
        let vf = c.iter().position(|a| a.starts_with("vfio-pci")).unwrap();
        assert!(iommu < vf, "the vIOMMU precedes the assigned device");
        n.viommu = "amd-iommu".into();
        assert!(
            nested_command_line(&cfg, &n, Path::new("i"))
                .unwrap()
                .join(" ")
                .contains("-device amd-iommu")
        );
    }

    #[test]
    fn nested_guest_config_points_at_the_guest_address() {
        let cfg = example();
        let text = nested_config(&cfg, cfg.nested.as_ref().unwrap()).unwrap();
        let guest = LabConfig::parse(&text).unwrap();
        assert_eq!(guest.host.expected_iommu, "arm-smmuv3");
        assert!(!guest.host.require_dirty_tracking);
        assert_eq!(guest.devices[0].pci, NESTED_GUEST_PCI);
        assert_eq!(guest.devices[0].expect_flags, vec!["STOP_COPY", "PRE_COPY"]);
    }

    #[test]
    fn planned_cases_cover_every_device() {
        let cases = planned_cases(&example());
        assert!(cases.contains(&"lab.sec-vf0.save_restore".to_string()));
        assert!(cases.contains(&"lab.hpre-vf0.iommu_dirty_tracking".to_string()));
        // The device with a resume_into pair: the plan lists the migrations that will run.
        assert!(cases.contains(&"lab.sec-vf0.migrate_engine".to_string()));
        assert!(cases.contains(&"lab.sec-vf0.migrate_kvm_vm".to_string()));
    }
}
