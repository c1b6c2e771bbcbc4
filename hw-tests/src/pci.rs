//! A real PCI device behind an emulated IOMMU (QEMU `intel-iommu` or `amd-iommu`): QEMU's
//! `edu` device, which has a DMA engine, bound to vfio-pci and driven through the cdev +
//! iommufd path, then through the legacy group/container path (iommufd's VFIO compatibility).
//!
//! edu facts (QEMU docs/specs/edu.rst): vendor 0x1234, device 0x11e8; BAR0 0x00 reads the
//! identification 0x010000ed; 0x04 is the liveness register (reads back inverted); the DMA
//! engine has source 0x80, destination 0x88, count 0x90 and command 0x98 (bit 0 start and
//! busy, bit 1 direction: set = device buffer to RAM); the device buffer is at 0x40000, 4 KiB.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use livemig_iommu_pt::caps::VtdCaps;
use livemig_iommufd::{
    AutoDomains, DmaAccess, DomainPath, HwptFlags, Ioas, Iommufd, Placement, VendorInfo,
};
use livemig_vfio::{RegionInfo, VfioDevice, abi as vabi};

use crate::check_eq;
use crate::harness::{Outcome, Runner};
use crate::util::{DmaBuf, poll, read_sysfs, write_sysfs};

/// Which emulated IOMMU the profile runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    IntelVtd,
    AmdVi,
}

const EDU_VENDOR: &str = "0x1234";
const EDU_DEVICE: &str = "0x11e8";
const EDU_ID: u32 = 0x0100_00ed;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
const EDU_BUFFER: u64 = 0x40000;
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;

const IOVA_SRC: u64 = 0x10_0000;
const IOVA_DST: u64 = 0x20_0000;

fn find_edu() -> Result<String> {
    for entry in std::fs::read_dir("/sys/bus/pci/devices")? {
        let p = entry?.path();
        if read_sysfs(p.join("vendor")).ok().as_deref() == Some(EDU_VENDOR)
            && read_sysfs(p.join("device")).ok().as_deref() == Some(EDU_DEVICE)
        {
            return Ok(p
                .file_name()
                .context("device dir")?
                .to_string_lossy()
                .into_owned());
        }
    }
    bail!("no edu device (1234:11e8) on the PCI bus")
}

fn sysfs_dev(addr: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(addr)
}

/// driver_override = vfio-pci, unbind any driver, re-probe; waits for the VFIO cdev.
fn bind_vfio_pci(addr: &str) -> Result<()> {
    let dev = sysfs_dev(addr);
    ensure!(
        dev.join("iommu_group").exists(),
        "{addr} has no IOMMU group: the emulated IOMMU is not active"
    );
    write_sysfs(dev.join("driver_override"), "vfio-pci")?;
    if dev.join("driver").exists() {
        write_sysfs(dev.join("driver/unbind"), addr)?;
    }
    write_sysfs("/sys/bus/pci/drivers_probe", addr)?;
    poll("the vfio-dev node", Duration::from_secs(5), || {
        Ok(dev.join("vfio-dev").exists().then_some(()))
    })
}

struct Edu {
    dev: VfioDevice,
    bar0: RegionInfo,
}

impl Edu {
    fn open(addr: &str) -> Result<Edu> {
        let dev = VfioDevice::open_pci(addr)?;
        Ok(Edu {
            bar0: RegionInfo {
                index: 0,
                flags: 0,
                size: 0,
                offset: 0,
            },
            dev,
        })
    }

    fn init_regions(&mut self) -> Result<()> {
        self.bar0 = self.dev.region_info(vabi::VFIO_PCI_BAR0_REGION_INDEX)?;
        ensure!(
            self.bar0.size >= 1 << 20,
            "edu BAR0 is {} bytes",
            self.bar0.size
        );
        // Enable bus mastering (PCI command register bit 2) so the DMA engine may run.
        let cfg = self.dev.region_info(vabi::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cmd = [0u8; 2];
        self.dev.read_region(&cfg, 4, &mut cmd)?;
        let v = u16::from_le_bytes(cmd) | 1 << 2;
        self.dev.write_region(&cfg, 4, &v.to_le_bytes())?;
        Ok(())
    }

    fn r32(&self, off: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.dev.read_region(&self.bar0, off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn w32(&self, off: u64, v: u32) -> Result<()> {
        Ok(self.dev.write_region(&self.bar0, off, &v.to_le_bytes())?)
    }

    fn r64(&self, off: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.dev.read_region(&self.bar0, off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn w64(&self, off: u64, v: u64) -> Result<()> {
        Ok(self.dev.write_region(&self.bar0, off, &v.to_le_bytes())?)
    }

    /// Runs one DMA transfer and waits for the engine to go idle.
    fn dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> Result<()> {
        self.w64(EDU_DMA_SRC, src)?;
        self.w64(EDU_DMA_DST, dst)?;
        self.w64(EDU_DMA_COUNT, len)?;
        self.w64(EDU_DMA_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 })?;
        poll("the edu DMA engine", Duration::from_secs(10), || {
            Ok((self.r64(EDU_DMA_CMD)? & CMD_START == 0).then_some(()))
        })
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn map(ioas: &Ioas, buf: &DmaBuf, iova: u64, access: DmaAccess) -> Result<()> {
    // SAFETY: the buffers are anonymous mappings owned by the case, unmapped from the IOAS
    // before they are dropped, and only accessed with volatile copies.
    unsafe { ioas.map_user(buf.ptr(), buf.len() as u64, Placement::Fixed(iova), access) }?;
    Ok(())
}

/// Reads whatever the kernel log has accumulated (non-blocking /dev/kmsg).
fn kmsg() -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return String::new();
    };
    let mut out = String::new();
    let mut rec = vec![0u8; 8192];
    while let Ok(n) = f.read(&mut rec) {
        if n == 0 {
            break;
        }
        out.push_str(&String::from_utf8_lossy(&rec[..n]));
    }
    out
}

/// What the cdev cases share: the device bound to iommufd and attached by auto domains.
struct Ctx {
    edu: Edu,
    iommufd: Iommufd,
    info: livemig_iommufd::IommuDevice,
    ioas: Ioas,
    auto: Option<AutoDomains>,
    chosen: Option<livemig_iommufd::AutoDomain>,
}

fn need(ctx: &mut Option<Ctx>) -> Result<&mut Ctx> {
    ctx.as_mut()
        .context("the device could not be opened and bound (see the earlier case)")
}

/// `livemig probe --json` and `livemig compat export --host` on edu behind vfio-pci, neither
/// opening a device file: edu's identity and its one BAR (QEMU `hw/misc/edu.c`: BAR0, 1 MiB of
/// 32-bit MMIO), and the IOMMU unit's registers from sysfs decoded as "no dirty tracking" —
/// what the kernel says too (`dirty_hwpt_refused`, `hw_info`). `compat check` passes the
/// descriptor against itself and refuses it against one whose BAR0 is twice the size.
fn probe_edu(addr: &str, vendor: Vendor) -> Result<Outcome> {
    const LIVEMIG: &str = "/bin/livemig";
    let run = |args: &[&str]| -> Result<std::process::Output> {
        let o = std::process::Command::new(LIVEMIG)
            .args(args)
            .output()
            .with_context(|| format!("running livemig {args:?}"))?;
        Ok(o)
    };
    let out = run(&["probe", "--json"])?;
    ensure!(
        out.status.success(),
        "livemig probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).context("probe --json")?;
    let devs = j["devices"].as_array().context("devices array")?;
    let edu = devs
        .iter()
        .find(|d| d["device"] == addr)
        .with_context(|| format!("edu {addr} not among {devs:?}"))?;
    let sys = &edu["sysfs"];
    ensure!(edu["opened"] == false, "{edu}");
    ensure!(
        sys["bus"] == "pci"
            && sys["driver"] == "vfio-pci"
            && sys["pci"]["vendor"] == 0x1234
            && sys["pci"]["device"] == 0x11e8
            && sys["problems"] == serde_json::json!([]),
        "edu from sysfs: {sys}"
    );
    check_eq!(
        sys["bars"].clone(),
        serde_json::json!([{"index": 0, "size": 0x100000, "kind": "mem32"}]),
        "edu's BARs"
    );
    let unit = &sys["iommu_unit"];
    let kind = match vendor {
        Vendor::IntelVtd => "intel-iommu",
        Vendor::AmdVi => "amd-iommu",
    };
    ensure!(
        unit["kind"] == kind && unit["dirty_tracking"] == false,
        "the IOMMU unit from sysfs: {unit}"
    );
    let a = "/tmp/edu-compat-a.json";
    let out = run(&["compat", "export", "--host", "-o", a])?;
    ensure!(
        out.status.success(),
        "compat export --host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(a)?;
    let d: serde_json::Value = serde_json::from_str(&text)?;
    // The descriptor's JSON carries the compatibility block in hex.
    let hex = |t: &str| -> String { t.bytes().map(|b| format!("{b:02x}")).collect() };
    let layout = hex("bar0 0x100000 mem32");
    let dev = d["devices"]
        .as_array()
        .context("descriptor devices")?
        .iter()
        .find(|x| x["compat"] == layout.as_str())
        .with_context(|| format!("no device with edu's BAR layout in {d}"))?;
    ensure!(
        dev["identity"]
            .as_str()
            .is_some_and(|i| i.starts_with("pci 1234:11e8") && i.ends_with("vfio-pci"))
            && dev["migration_flags_known"] == false,
        "edu's descriptor: {dev}"
    );
    let out = run(&["compat", "check", a, a])?;
    ensure!(out.status.success(), "edu against itself refused");
    let b = "/tmp/edu-compat-b.json";
    let bigger = hex("bar0 0x200000 mem32");
    std::fs::write(b, text.replace(&layout, &bigger))?;
    let out = run(&["compat", "check", a, b])?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        !out.status.success() && said.contains("bar0 0x200000 mem32"),
        "a BAR layout difference was not refused by name: {said}"
    );
    Ok(Outcome::Pass)
}

pub fn run(r: &mut Runner, vendor: Vendor) {
    let p = match vendor {
        Vendor::IntelVtd => "vtd",
        Vendor::AmdVi => "amdvi",
    };
    let addr = match find_edu().and_then(|a| bind_vfio_pci(&a).map(|()| a)) {
        Ok(a) => {
            r.case(&format!("{p}.edu_bound_to_vfio_pci"), || Ok(Outcome::Pass));
            a
        }
        Err(e) => {
            r.fail(&format!("{p}.edu_bound_to_vfio_pci"), &format!("{e:#}"));
            return;
        }
    };

    r.case(&format!("{p}.iommu_present"), || {
        let n = std::fs::read_dir("/sys/class/iommu")?.count();
        ensure!(n > 0, "no IOMMU in /sys/class/iommu");
        Ok(Outcome::Pass)
    });

    // Before anything opens the device: the read-only probe describes edu from sysfs.
    r.case(&format!("{p}.probe_describes_edu_from_sysfs"), || {
        probe_edu(&addr, vendor)
    });

    let mut ctx: Option<Ctx> = None;
    r.case(&format!("{p}.cdev_open_bind_iommufd"), || {
        let iommufd = Iommufd::open()?;
        let edu = Edu::open(&addr)?;
        let dev_id = edu.dev.bind_iommufd(iommufd.as_fd())?;
        let info = iommufd.probe_device(dev_id);
        let ioas = iommufd.alloc_ioas()?;
        ctx = Some(Ctx {
            edu,
            iommufd,
            info,
            ioas,
            auto: None,
            chosen: None,
        });
        Ok(Outcome::Pass)
    });

    r.case(&format!("{p}.hw_info"), || {
        let c = need(&mut ctx)?;
        let hw = c
            .info
            .hw_info()
            .with_context(|| format!("GET_HW_INFO failed: {:?}", c.info.probe_error()))?;
        ensure!(
            !hw.dirty_tracking(),
            "QEMU's IOMMU emulation reports dirty tracking"
        );
        match (vendor, &hw.vendor) {
            (
                Vendor::IntelVtd,
                VendorInfo::IntelVtd {
                    cap_reg, ecap_reg, ..
                },
            ) => {
                ensure!(
                    *cap_reg != 0 && *ecap_reg != 0,
                    "VT-d registers read as zero"
                );
                // Decode them with livemig-iommu-pt's register map.
                let caps = VtdCaps::from_regs(*cap_reg, *ecap_reg);
                crate::trace!("{caps:?}");
                ensure!(
                    caps.caching_mode(),
                    "intel-iommu runs with caching-mode=on, but CAP.CM decodes clear: {caps:?}"
                );
                ensure!(
                    caps.address_widths().contains(&48),
                    "CAP.SAGAW lacks 48-bit second-stage tables: {caps:?}"
                );
                let support = caps.dirty_support();
                check_eq!(
                    support.supported(),
                    hw.dirty_tracking(),
                    "decoded dirty support ({support}) vs the kernel's IOMMU_HW_CAP_DIRTY_TRACKING"
                );
            }
            // Linux 6.12's AMD driver has no hw_info callback (IOMMU_HW_INFO_TYPE_AMD came
            // with 6.14): GET_HW_INFO answers IOMMU_HW_INFO_TYPE_NONE without data. Anything
            // else on this kernel is wrong.
            (Vendor::AmdVi, VendorInfo::None) => {}
            (v, other) => bail!("{v:?}: unexpected hardware info {other:?}"),
        }
        let _ = &c.iommufd;
        Ok(Outcome::Pass)
    });

    r.case(&format!("{p}.dirty_hwpt_refused"), || {
        let c = need(&mut ctx)?;
        // QEMU emulates neither VT-d SLADS nor AMD HDSup: a dirty-tracking HWPT is refused.
        let e = c
            .ioas
            .alloc_hwpt(c.info.dev_id(), HwptFlags::DIRTY_TRACKING)
            .unwrap_err();
        check_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e}");
        Ok(Outcome::Pass)
    });

    r.case(&format!("{p}.auto_domain_fallback"), || {
        let c = need(&mut ctx)?;
        let mut auto = AutoDomains::new(c.ioas.clone());
        let dev = &c.edu.dev;
        let chosen = auto.attach(&c.info, |pt| {
            dev.attach_pt(pt).map_err(std::io::Error::from)
        })?;
        check_eq!(chosen.path, DomainPath::Allocated, "{chosen}");
        ensure!(!chosen.dirty_tracking, "{chosen}");
        ensure!(
            chosen.reason.contains("does not report dirty tracking"),
            "auto-domain reason: {chosen}"
        );
        c.auto = Some(auto);
        c.chosen = Some(chosen);
        Ok(Outcome::Pass)
    });

    r.case(&format!("{p}.edu_registers_through_vfio"), || {
        let c = need(&mut ctx)?;
        c.edu.init_regions()?;
        check_eq!(c.edu.r32(0)?, EDU_ID, "edu identification register");
        c.edu.w32(4, 0x1234_5678)?;
        check_eq!(c.edu.r32(4)?, !0x1234_5678u32, "edu liveness register");
        Ok(Outcome::Pass)
    });

    let data = pattern(4096, 7);
    let bufs = DmaBuf::new(4096).and_then(|a| DmaBuf::new(4096).map(|b| (a, b)));
    r.case(&format!("{p}.dma_through_iommu"), || {
        let c = need(&mut ctx)?;
        ensure!(
            c.chosen.is_some(),
            "the device is not attached (see auto_domain_fallback)"
        );
        let (src, dst) = bufs.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        src.write(0, &data);
        map(&c.ioas, src, IOVA_SRC, DmaAccess::READ)?;
        map(&c.ioas, dst, IOVA_DST, DmaAccess::WRITE)?;
        // RAM -> device buffer -> RAM, both directions through the emulated IOMMU.
        c.edu.dma(IOVA_SRC, EDU_BUFFER, 4096, false)?;
        c.edu.dma(EDU_BUFFER, IOVA_DST, 4096, true)?;
        check_eq!(dst.read(0, 4096) == data, true, "the data arrived");
        Ok(Outcome::Pass)
    });

    r.case(&format!("{p}.unmapped_dma_blocked"), || {
        let c = need(&mut ctx)?;
        let (src, _) = bufs.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        // The DMA targets an IOVA equal to the *physical* address of a canary page that is not
        // mapped in the IOAS: were the IOMMU bypassed (identity or passthrough), the write
        // would land in the canary. The IOMMU blocks it and the canary keeps its bytes. On
        // VT-d the guest's DMAR driver also reports the fault with that address. (QEMU 10.0's
        // AMD-Vi blocks the write but logs no IO_PAGE_FAULT event, so the guest cannot observe
        // a report there.)
        let canary = DmaBuf::new(4096)?;
        let marks = vec![0xc3u8; 4096];
        canary.write(0, &marks);
        let iova = canary.phys(0)?;
        ensure!(
            ![IOVA_SRC, IOVA_DST].contains(&iova),
            "the canary's frame {iova:#x} is one of the mapped IOVAs"
        );
        let before = kmsg();
        c.edu.dma(EDU_BUFFER, iova, 4096, true)?;
        check_eq!(
            canary.read(0, 4096) == marks,
            true,
            "the canary at physical {iova:#x} was not written"
        );
        check_eq!(src.read(0, 4096) == data, true, "source untouched");
        if vendor == Vendor::IntelVtd {
            let want = format!("{iova:x}");
            let log = poll("the IOMMU fault report", Duration::from_secs(5), || {
                let now = kmsg();
                let fresh = now
                    .strip_prefix(before.as_str())
                    .unwrap_or(&now)
                    .to_string();
                Ok((fresh.contains("DMAR") && fresh.contains("fault")).then_some(fresh))
            })?;
            ensure!(
                log.contains(&want),
                "fault report does not name IOVA {want}: {log}"
            );
        }
        Ok(Outcome::Pass)
    });

    r.case(
        &format!("{p}.negative_control_bypass_changes_canary"),
        || {
            // Negative control for the case above: the same DMA with the canary's frame reachable
            // at that IOVA (mapped identity, as a bypassed IOMMU would behave) changes the canary,
            // so the canary check does tell a blocked write from a bypassed one.
            let c = need(&mut ctx)?;
            let canary = DmaBuf::new(4096)?;
            let marks = vec![0xc3u8; 4096];
            canary.write(0, &marks);
            let iova = canary.phys(0)?;
            map(&c.ioas, &canary, iova, DmaAccess::WRITE)?;
            c.edu.dma(EDU_BUFFER, iova, 4096, true)?;
            c.ioas.unmap(iova, 4096)?;
            ensure!(
                canary.read(0, 4096) != marks,
                "a DMA that reached the canary left it unchanged: the check could not fail"
            );
            Ok(Outcome::Pass)
        },
    );

    r.case(&format!("{p}.detach_and_release"), || {
        let c = ctx.take().context("nothing to release")?;
        c.ioas.unmap_all()?;
        c.edu.dev.detach_pt()?;
        drop(c.auto);
        drop(c.edu);
        Ok(Outcome::Pass)
    });
    drop(bufs);

    r.case(&format!("{p}.legacy_container_pci_driver"), || {
        legacy_path(&addr)
    });
}

/// The same device through `/dev/vfio/vfio` (provided by iommufd's VFIO container emulation)
/// and its group, with the `pci-driver` crate for config space, BAR access and type1 mappings.
fn legacy_path(addr: &str) -> Result<Outcome> {
    use pci_driver::backends::vfio::VfioPciDevice;
    use pci_driver::device::PciDevice;
    use pci_driver::regions::{PciRegion, Permissions};

    ensure!(
        Path::new("/dev/vfio/vfio").exists(),
        "/dev/vfio/vfio missing: CONFIG_IOMMUFD_VFIO_CONTAINER off?"
    );
    let dev = VfioPciDevice::open(sysfs_dev(addr)).context("pci-driver VfioPciDevice::open")?;
    let cfg = dev.config();
    check_eq!(cfg.vendor_id().read()?, 0x1234u16);
    check_eq!(cfg.device_id().read()?, 0x11e8u16);
    let command = cfg.read_le_u16(4)?;
    cfg.write_le_u16(4, command | 1 << 2)?;
    let bar0 = dev.bar(0).context("edu BAR0")?;
    check_eq!(bar0.read_le_u32(0)?, EDU_ID);

    let src = DmaBuf::new(4096)?;
    let dst = DmaBuf::new(4096)?;
    let data = pattern(4096, 99);
    src.write(0, &data);
    let iommu = dev.iommu();
    // SAFETY: the buffers outlive the mappings (unmapped below) and are only accessed with
    // volatile copies.
    unsafe {
        iommu.map(IOVA_SRC, 4096, src.ptr(), Permissions::Read)?;
        iommu.map(IOVA_DST, 4096, dst.ptr(), Permissions::Write)?;
    }
    let dma = |s: u64, d: u64, to_ram: bool| -> Result<()> {
        // A 4-byte write sets the whole 64-bit register in edu; these IOVAs are below 4 GiB.
        bar0.write_le_u32(EDU_DMA_SRC, u32::try_from(s)?)?;
        bar0.write_le_u32(EDU_DMA_DST, u32::try_from(d)?)?;
        bar0.write_le_u32(EDU_DMA_COUNT, 4096)?;
        bar0.write_le_u32(
            EDU_DMA_CMD,
            (CMD_START | if to_ram { CMD_TO_RAM } else { 0 }) as u32,
        )?;
        poll("the edu DMA engine", Duration::from_secs(10), || {
            Ok((u64::from(bar0.read_le_u32(EDU_DMA_CMD)?) & CMD_START == 0).then_some(()))
        })
    };
    dma(IOVA_SRC, EDU_BUFFER, false)?;
    dma(EDU_BUFFER, IOVA_DST, true)?;
    check_eq!(
        dst.read(0, 4096) == data,
        true,
        "DMA through the compat container"
    );
    iommu.unmap(IOVA_SRC, 4096)?;
    iommu.unmap(IOVA_DST, 4096)?;
    Ok(Outcome::Pass)
}
