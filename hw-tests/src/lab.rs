//! Lab-host cases (`hw-tests --lab CONFIG`): real HiSilicon ACC VFs (or any VFIO device) behind
//! a dirty-capable IOMMU. Every case skips with the reason when its hardware is absent.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use livemig_hisi_qm::ids::PCI_VENDOR_ID_HUAWEI;
use livemig_hisi_qm::regs::VfReg;
use livemig_hisi_qm::{AccKind, Bar2, MappedVf, QmRegisters, StdDelay, VfQm};
use livemig_iommu_pt::caps::{AmdCaps, SmmuCaps, VtdCaps};
use livemig_iommufd::{AutoDomains, DirtyBitmap, DmaAccess, Iommufd, Placement, VendorInfo};
use livemig_vfio::{MigrationDevice, MigrationFlags, MigrationState, VfioDevice, data};

pub use hw_tests::lab_config::{Device, LabConfig};

use crate::check_eq;
use crate::harness::{Outcome, Runner};
use crate::util::DmaBuf;

fn skip(why: impl Into<String>) -> Result<Outcome> {
    Ok(Outcome::Skip(why.into()))
}

fn sysfs(pci: &str) -> std::path::PathBuf {
    Path::new("/sys/bus/pci/devices").join(pci)
}

/// Why `d` cannot be tested here, if it cannot.
fn absent(d: &Device) -> Option<String> {
    if let Some(u) = &d.mdev {
        let dir = Path::new("/sys/bus/mdev/devices").join(u);
        return (!dir.exists()).then(|| format!("mdev {u} is not present on this host"));
    }
    let pci = livemig_vfio::normalize_pci_address(&d.pci).ok()?;
    let dir = sysfs(&pci);
    if !dir.exists() {
        return Some(format!("{pci} is not present on this host"));
    }
    let driver = std::fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match driver.as_deref() {
        Some("vfio-pci") | Some("hisi_acc_vfio_pci") => None,
        Some(other) => Some(format!("{pci} is bound to {other}, not a VFIO driver")),
        None => Some(format!("{pci} is bound to no driver")),
    }
}

/// Opens the device's VFIO cdev (PCI or mdev).
fn open_dev(d: &Device) -> Result<VfioDevice> {
    Ok(match &d.mdev {
        Some(u) => VfioDevice::open(livemig_vfio::DeviceLocator::default().mdev_cdev(u)?)?,
        None => VfioDevice::open_pci(&d.pci)?,
    })
}

/// Why an IOMMU case does not apply to `d`: an mdev has no IOMMU of its own.
fn no_iommu(d: &Device) -> Option<Result<Outcome>> {
    d.mdev
        .as_ref()
        .map(|_| skip("an mdev has no IOMMU of its own (it reaches guest RAM through the IOAS)"))
}

fn iommu_class_prefix(expected: &str) -> Option<&'static str> {
    match expected {
        "intel-vtd" => Some("dmar"),
        "amd-vi" => Some("ivhd"),
        "arm-smmuv3" => Some("smmu3"),
        _ => None,
    }
}

pub fn run(r: &mut Runner, cfg: &LabConfig) {
    r.case("lab.host_iommu", || {
        let Ok(dir) = std::fs::read_dir("/sys/class/iommu") else {
            return skip("no /sys/class/iommu: no IOMMU is enabled on this host");
        };
        let names: Vec<String> = dir
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        if names.is_empty() {
            return skip("no IOMMU is enabled on this host");
        }
        if let Some(prefix) = iommu_class_prefix(&cfg.host.expected_iommu) {
            ensure!(
                names.iter().any(|n| n.starts_with(prefix)),
                "expected a {} IOMMU ({prefix}*), found {names:?}",
                cfg.host.expected_iommu
            );
        }
        Ok(Outcome::Pass)
    });

    for d in &cfg.devices {
        let n = &d.name;
        r.case(&format!("lab.{n}.iommufd_bind_hw_info"), || {
            if let Some(s) = no_iommu(d) {
                return s;
            }
            if let Some(why) = absent(d) {
                return skip(why);
            }
            let iommufd = Iommufd::open()?;
            let dev = open_dev(d)?;
            let dev_id = dev.bind_iommufd(iommufd.as_fd())?;
            let info = iommufd.hw_info(dev_id)?;
            let ok = match (cfg.host.expected_iommu.as_str(), &info.vendor) {
                ("intel-vtd", VendorInfo::IntelVtd { .. }) => true,
                ("arm-smmuv3", VendorInfo::ArmSmmuV3 { .. }) => true,
                // Kernels before 6.14 (SMMUv3) and the AMD driver before its hw_info report none.
                ("arm-smmuv3" | "amd-vi", VendorInfo::None) => true,
                ("amd-vi", VendorInfo::Amd { .. }) => true,
                ("any", _) => true,
                _ => false,
            };
            ensure!(
                ok,
                "expected {} hardware info, got {:?}",
                cfg.host.expected_iommu,
                info.vendor
            );
            // Decode the vendor registers; the decoded verdict must agree with the kernel's.
            let decoded = match &info.vendor {
                VendorInfo::IntelVtd {
                    cap_reg, ecap_reg, ..
                } => Some(VtdCaps::from_regs(*cap_reg, *ecap_reg).dirty_support()),
                VendorInfo::ArmSmmuV3 { idr, .. } => Some(SmmuCaps::from_idr(idr).dirty_support()),
                VendorInfo::Amd { efr, .. } => Some(AmdCaps::from_efr(*efr).dirty_support()),
                _ => None,
            };
            if let Some(support) = &decoded {
                crate::trace!("{}: {support}", d.pci);
                ensure!(
                    support.supported() == info.dirty_tracking(),
                    "decoded {support}, but the kernel says dirty tracking = {}",
                    info.dirty_tracking()
                );
            }
            if !info.dirty_tracking() {
                if cfg.host.require_dirty_tracking {
                    bail!("the IOMMU behind {} does not report dirty tracking", d.pci);
                }
                return skip(format!(
                    "the IOMMU behind {} does not report dirty tracking",
                    d.pci
                ));
            }
            Ok(Outcome::Pass)
        });

        r.case(&format!("lab.{n}.qm_registers"), || {
            if let Some(s) = no_iommu(d) {
                return s;
            }
            if let Some(why) = absent(d) {
                return skip(why);
            }
            let pci = livemig_vfio::normalize_pci_address(&d.pci)?;
            let dir = sysfs(&pci);
            let id = |f: &str| -> Result<u16> {
                let s = std::fs::read_to_string(dir.join(f))?;
                Ok(u16::from_str_radix(s.trim().trim_start_matches("0x"), 16)?)
            };
            let kind = match (id("vendor")?, id("device")?) {
                (PCI_VENDOR_ID_HUAWEI, dev) => match AccKind::from_vf_device_id(dev) {
                    Some(k) => k,
                    None => return skip(format!("{pci}: {dev:#06x} is not a HiSilicon ACC VF")),
                },
                (v, _) => return skip(format!("{pci}: vendor {v:#06x} is not HiSilicon")),
            };
            let driver = std::fs::read_link(dir.join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            if driver.as_deref() == Some("hisi_acc_vfio_pci") {
                return skip(
                    "hisi_acc_vfio_pci hides BAR2's migration half and drives the QM itself; \
                     bind the VF to vfio-pci for register-level bring-up",
                );
            }
            let dev = open_dev(d)?;
            let bar2 = dev.region_info(2)?;
            let len = usize::try_from(bar2.size)?;
            let map = dev.map_region(&bar2, 0, len)?;
            let regs = MappedVf::new(&map).context("BAR2 is smaller than the QM register map")?;
            let state = regs.read(VfReg::VfState);
            let mut qm = VfQm::new(&regs, StdDelay);
            let vft = qm.vft()?;
            crate::trace!("{pci} ({kind} VF): QM_VF_STATE {state:#x}, VFT {vft:?}");
            ensure!(vft.num >= 1, "the VF owns no queues: {vft:?}");
            let (guest, _migration) = Bar2::new(&regs, len).split();
            ensure!(
                guest.read(VfReg::EqcDw(0)).is_err() && guest.read(VfReg::VfState).is_ok(),
                "the guest half of BAR2 must end before QM_EQC_DW0"
            );
            Ok(Outcome::Pass)
        });

        r.case(&format!("lab.{n}.iommu_dirty_tracking"), || {
            if let Some(s) = no_iommu(d) {
                return s;
            }
            if let Some(why) = absent(d) {
                return skip(why);
            }
            dirty_tracking(d, cfg.host.require_dirty_tracking)
        });

        r.case(&format!("lab.{n}.migration_flags"), || {
            if let Some(why) = absent(d) {
                return skip(why);
            }
            if d.expect_flags.is_empty() {
                return skip(format!("{} is not expected to migrate", d.name));
            }
            let iommufd = Iommufd::open()?;
            let dev = open_dev(d)?;
            dev.bind_iommufd(iommufd.as_fd())?;
            let mut want = MigrationFlags::empty();
            for f in &d.expect_flags {
                want |= MigrationFlags::from_name(f).context("flag name")?;
            }
            check_eq!(dev.migration_flags()?, want);
            Ok(Outcome::Pass)
        });

        r.case(&format!("lab.{n}.save_restore"), || {
            if let Some(why) = absent(d) {
                return skip(why);
            }
            if d.expect_flags.is_empty() {
                return skip(format!("{} is not expected to migrate", d.name));
            }
            let target = match &d.resume_into {
                Some(t) => match cfg.device(t) {
                    Some(td) => match absent(td) {
                        Some(why) => return skip(format!("resume target: {why}")),
                        None => Some(td),
                    },
                    None => bail!("resume_into {t:?} is not configured"),
                },
                None => None,
            };
            save_restore(d, target)
        });

        for (case, f) in [
            (
                "migrate_engine",
                crate::lab_e2e::migrate_engine as fn(&Device, &Device) -> Result<Outcome>,
            ),
            ("migrate_kvm_vm", crate::lab_e2e::migrate_kvm_vm),
        ] {
            r.case(&format!("lab.{n}.{case}"), || {
                if let Some(why) = absent(d) {
                    return skip(why);
                }
                let Some(td) = crate::lab_e2e::target(cfg, d)? else {
                    return skip(format!("{} has no resume_into pair", d.name));
                };
                if let Some(why) = absent(td) {
                    return skip(format!("resume target: {why}"));
                }
                f(d, td)
            });
        }
    }
}

fn attach_auto(
    iommufd: &Iommufd,
    auto: &mut AutoDomains,
    dev: &VfioDevice,
) -> Result<livemig_iommufd::AutoDomain> {
    let dev_id = dev.bind_iommufd(iommufd.as_fd())?;
    let probed = iommufd.probe_device(dev_id);
    Ok(auto.attach(&probed, |pt| {
        dev.attach_pt(pt).map_err(std::io::Error::from)
    })?)
}

fn dirty_tracking(d: &Device, required: bool) -> Result<Outcome> {
    let iommufd = Iommufd::open()?;
    let dev = open_dev(d)?;
    let mut auto = AutoDomains::new(iommufd.alloc_ioas()?);
    let chosen = attach_auto(&iommufd, &mut auto, &dev)?;
    if !chosen.dirty_tracking {
        if required {
            bail!("no IOMMU dirty tracking for {}: {chosen}", d.pci);
        }
        return skip(format!("no IOMMU dirty tracking: {chosen}"));
    }
    let len = 64u64 << 20;
    let buf = DmaBuf::new(len as usize)?;
    let iova = 1u64 << 32;
    // SAFETY: `buf` outlives the mapping (unmapped below); the device is idle and only ever
    // sees it through this mapping.
    unsafe {
        auto.ioas().map_user(
            buf.ptr(),
            len,
            Placement::Fixed(iova),
            DmaAccess::READ | DmaAccess::WRITE,
        )
    }?;
    auto.set_dirty_tracking(true)?;
    let mut bm = DirtyBitmap::new(iova, len, 4096)?;
    auto.read_dirty(iova, len, &mut bm, true)?;
    // An idle device dirties nothing; the read must succeed and be clean.
    check_eq!(bm.count(), 0, "dirty pages from an idle device");
    auto.set_dirty_tracking(false)?;
    auto.ioas().unmap_all()?;
    dev.detach_pt()?;
    Ok(Outcome::Pass)
}

fn save_restore(d: &Device, into: Option<&Device>) -> Result<Outcome> {
    let iommufd = Iommufd::open()?;
    let mut auto = AutoDomains::new(iommufd.alloc_ioas()?);
    let mut src = open_dev(d)?;
    attach_auto(&iommufd, &mut auto, &src)?;
    let t = src.transition(MigrationState::StopCopy)?;
    let mut state = Vec::new();
    let saved = data::save_stop_copy(
        &mut t.data.context("STOP_COPY opened no data fd")?,
        &mut state,
    );
    // Whatever happened, the source goes back to RUNNING: nothing is lost.
    src.transition(MigrationState::Running)?;
    saved?;
    ensure!(!state.is_empty(), "empty device state");
    if let Some(td) = into {
        let mut dst = open_dev(td)?;
        attach_auto(&iommufd, &mut auto, &dst)?;
        let mut input = dst
            .transition(MigrationState::Resuming)?
            .data
            .context("no fd")?;
        data::write_resuming(&mut input, &state)?;
        dst.transition(MigrationState::Running)?;
    }
    Ok(Outcome::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dry_run_plan_lists_exactly_what_runs() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/lab.example.toml");
        let cfg = LabConfig::load(path).unwrap();
        let mut r = Runner::listing();
        run(&mut r, &cfg);
        assert_eq!(r.names(), cfg.planned_cases().as_slice());
        assert!(
            r.names()
                .contains(&"lab.sec-vf0.migrate_kvm_vm".to_string())
        );
    }

    #[test]
    fn an_mdev_device_is_configured_by_uuid() {
        let t = "[host]\nexpected_iommu = \"any\"\n[[device]]\nname = \"m\"\nkind = \"mdev\"\n\
                 mdev = \"83b8f4f2-509f-382f-3c1e-e6bfe0fa1001\"\n";
        let cfg = LabConfig::parse(t).unwrap();
        assert_eq!(
            cfg.devices[0].spec(),
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
        );
        let e = LabConfig::parse(&t.replace("mdev = ", "pci = ")).unwrap_err();
        assert!(format!("{e:#}").contains("kind mdev needs"), "{e:#}");
    }
}
