//! livemig-iommufd against the real kernel, with the selftest mock IOMMU for dirty tracking.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{Context, Result, bail, ensure};
use livemig_iommufd::{
    AutoDomains, DirtyBitmap, DmaAccess, DomainPath, HwptFlags, Ioas, Iommufd, IovaRange,
    Placement, Reason, VendorInfo, abi,
};

use crate::check_eq;
use crate::harness::{Outcome, Runner};
use crate::mock::*;
use crate::util::DmaBuf;

fn map_fixed(ioas: &Ioas, buf: &DmaBuf, iova: u64) -> Result<u64> {
    // SAFETY: `buf` is an anonymous mapping owned by the test that outlives the IOAS mapping
    // (every case unmaps or destroys the IOAS before dropping it) and is only accessed with
    // volatile reads and writes.
    let got = unsafe {
        ioas.map_user(
            buf.ptr(),
            buf.len() as u64,
            Placement::Fixed(iova),
            DmaAccess::READ | DmaAccess::WRITE,
        )
    }?;
    Ok(got)
}

pub fn run(r: &mut Runner) {
    r.case("iommufd.open", || {
        Iommufd::open()?;
        Ok(Outcome::Pass)
    });

    r.case("iommufd.ioas_map_unmap", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        let buf = DmaBuf::new(64 * 1024)?;
        check_eq!(
            map_fixed(&ioas, &buf, MOCK_APERTURE_START)?,
            MOCK_APERTURE_START
        );
        // SAFETY: as in map_fixed.
        let auto = unsafe { ioas.map_user(buf.ptr(), 4096, Placement::Anywhere, DmaAccess::READ) }?;
        ensure!(
            auto != MOCK_APERTURE_START,
            "kernel placed a second mapping on the first"
        );
        let e = map_fixed(&ioas, &buf, MOCK_APERTURE_START).unwrap_err();
        ensure!(
            e.downcast_ref::<livemig_iommufd::Error>()
                .and_then(|e| e.errno())
                == Some(libc::EEXIST),
            "fixed map over a used range: {e:#}"
        );
        check_eq!(ioas.unmap(MOCK_APERTURE_START, 64 * 1024)?, 64 * 1024);
        let e = ioas.unmap(MOCK_APERTURE_START, 64 * 1024).unwrap_err();
        check_eq!(e.reason(), Some(Reason::NotFound));
        check_eq!(ioas.unmap_all()?, 4096);
        Ok(Outcome::Pass)
    });

    r.case("iommufd.ioas_copy", || {
        let fd = Iommufd::open()?;
        let (a, b) = (fd.alloc_ioas()?, fd.alloc_ioas()?);
        let buf = DmaBuf::new(32 * 1024)?;
        map_fixed(&a, &buf, MOCK_APERTURE_START)?;
        let got = b.copy_from(
            &a,
            MOCK_APERTURE_START,
            32 * 1024,
            Placement::Fixed(0x4000_0000),
            DmaAccess::READ,
        )?;
        check_eq!(got, 0x4000_0000);
        // 6.12 copies any fully mapped sub-range (iopt_get_pages), despite the header's wording;
        // an unmapped source is ENOENT.
        let part = b.copy_from(
            &a,
            MOCK_APERTURE_START + 4096,
            4096,
            Placement::Anywhere,
            DmaAccess::READ,
        )?;
        check_eq!(b.unmap(part, 4096)?, 4096);
        let e = b
            .copy_from(
                &a,
                MOCK_APERTURE_START + (1 << 20),
                4096,
                Placement::Anywhere,
                DmaAccess::READ,
            )
            .unwrap_err();
        check_eq!(e.reason(), Some(Reason::NotFound));
        check_eq!(b.unmap_all()?, 32 * 1024);
        check_eq!(a.unmap_all()?, 32 * 1024);
        Ok(Outcome::Pass)
    });

    r.case("iommufd.iova_ranges_narrow_on_attach", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        let fresh = ioas.iova_ranges()?;
        check_eq!(
            fresh.ranges,
            vec![IovaRange {
                start: 0,
                last: u64::MAX
            }]
        );
        let dev = MockDevice::new(&fd, ioas.id(), 0)?;
        let narrowed = ioas.iova_ranges()?;
        check_eq!(
            narrowed.ranges,
            vec![IovaRange {
                start: MOCK_APERTURE_START,
                last: MOCK_APERTURE_LAST
            }]
        );
        check_eq!(narrowed.alignment, MOCK_PAGE_SIZE);
        drop(dev);
        check_eq!(
            ioas.iova_ranges()?.ranges,
            fresh.ranges,
            "detach widens again"
        );
        Ok(Outcome::Pass)
    });

    r.case("iommufd.allow_iovas", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        ioas.allow_iovas(&[IovaRange {
            start: MOCK_APERTURE_START,
            last: (32 << 20) - 1,
        }])?;
        drop(MockDevice::new(&fd, ioas.id(), 0).context("attach inside allowed ranges")?);
        // Requiring IOVAs the mock cannot map makes attach fail rather than narrow.
        ioas.allow_iovas(&[IovaRange {
            start: 0,
            last: 0xfff,
        }])?;
        ensure!(
            MockDevice::new(&fd, ioas.id(), 0).is_err(),
            "attach narrowed an allowed range"
        );
        ioas.allow_iovas(&[])?;
        Ok(Outcome::Pass)
    });

    r.case("iommufd.options", || {
        let fd = Iommufd::open()?;
        // RLIMIT_MODE only changes while the iommufd holds no objects.
        fd.set_rlimit_per_process(true)?;
        ensure!(fd.rlimit_per_process()?, "rlimit mode per process");
        let ioas = fd.alloc_ioas()?;
        let e = fd.set_rlimit_per_process(false).unwrap_err();
        check_eq!(e.reason(), Some(Reason::Busy));
        ensure!(ioas.huge_pages()?, "huge pages default to on");
        ioas.set_huge_pages(false)?;
        ensure!(!ioas.huge_pages()?, "huge pages off");
        Ok(Outcome::Pass)
    });

    r.case("iommufd.vfio_compat_ioas", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        fd.set_vfio_compat_ioas(&ioas)?;
        check_eq!(fd.vfio_compat_ioas()?, ioas.id());
        fd.clear_vfio_compat_ioas()?;
        Ok(Outcome::Pass)
    });

    r.case("iommufd.map_file_probe", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        // Linux 6.12 predates IOMMU_IOAS_MAP_FILE (6.13): the probe must say so, not guess.
        let has = ioas.supports_map_file()?;
        let release = crate::util::read_sysfs("/proc/sys/kernel/osrelease").unwrap_or_default();
        if release.starts_with("6.12") {
            ensure!(!has, "6.12 reports IOAS_MAP_FILE");
        }
        Ok(Outcome::Pass)
    });

    r.case("iommufd.hw_info_mock", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        let dev = MockDevice::new(&fd, ioas.id(), 0)?;
        ensure!(
            dev.hwpt_id != 0,
            "attaching to an IOAS creates a kernel-owned HWPT"
        );
        let info = fd.hw_info(dev.idev_id)?;
        ensure!(
            info.dirty_tracking(),
            "mock reports IOMMU_HW_CAP_DIRTY_TRACKING"
        );
        check_eq!(
            info.vendor,
            VendorInfo::Selftest {
                flags: 0,
                test_reg: abi::IOMMU_HW_INFO_SELFTEST_REGVAL
            }
        );
        let nodirty = MockDevice::new(&fd, ioas.id(), MOCK_FLAGS_DEVICE_NO_DIRTY)?;
        ensure!(
            !fd.hw_info(nodirty.idev_id)?.dirty_tracking(),
            "NO_DIRTY device lacks the cap"
        );
        Ok(Outcome::Pass)
    });

    r.case("iommufd.dirty_hwpt_alloc_enable_disable", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        let dev = MockDevice::new(&fd, ioas.id(), 0)?;
        let hwpt = ioas.alloc_hwpt(dev.idev_id, HwptFlags::DIRTY_TRACKING)?;
        let attached = MockDevice::new(&fd, hwpt.id(), 0)?;
        hwpt.set_dirty_tracking(true)?;
        hwpt.set_dirty_tracking(false)?;
        drop(attached);
        hwpt.destroy()?;
        Ok(Outcome::Pass)
    });

    r.case("iommufd.dirty_hwpt_refused_without_cap", || {
        let fd = Iommufd::open()?;
        let ioas = fd.alloc_ioas()?;
        let dev = MockDevice::new(&fd, ioas.id(), MOCK_FLAGS_DEVICE_NO_DIRTY)?;
        let e = ioas
            .alloc_hwpt(dev.idev_id, HwptFlags::DIRTY_TRACKING)
            .unwrap_err();
        check_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e}");
        // And a NO_DIRTY device cannot join a dirty-enforcing domain.
        let good = MockDevice::new(&fd, ioas.id(), 0)?;
        let hwpt = ioas.alloc_hwpt(good.idev_id, HwptFlags::DIRTY_TRACKING)?;
        let e = MockDevice::new(&fd, hwpt.id(), MOCK_FLAGS_DEVICE_NO_DIRTY).err();
        check_eq!(e.and_then(|e| e.raw_os_error()), Some(libc::EINVAL));
        Ok(Outcome::Pass)
    });

    for (name, size) in [
        ("8k", 8u64 << 10),
        ("16k", 16 << 10),
        ("64k", 64 << 10),
        ("128k", 128 << 10),
        ("320k", 320 << 10),
        ("64m", 64 << 20),
    ] {
        r.case(&format!("iommufd.dirty_bitmap_{name}"), || {
            dirty_bitmaps(size, false)
        });
    }
    // MOCK_FLAGS_DEVICE_HUGE_IOVA is gone in 7.3 (7.3.4 iommufd_test.h lines 63-66): its mock
    // picks the huge page table through HWPT driver data instead.
    if !crate::harness::kernel_at_least(7, 0) {
        r.case("iommufd.dirty_bitmap_64m_huge", || {
            dirty_bitmaps(64 << 20, true)
        });
    }

    r.case("iommufd.dirty_bitmap_unaligned_starts", unaligned_starts);
    r.case("iommufd.read_dirty_and_unmap", read_dirty_and_unmap);
    r.case("iommufd.hwpt_tracker_contract", || {
        hwpt_tracker_contract(false)
    });
    r.case("iommufd.hwpt_tracker_contract_negative_control", || {
        hwpt_tracker_contract(true)
    });
    r.case("iommufd.auto_domain_mock", auto_domain);
    if crate::harness::kernel_at_least(7, 0) {
        r.case("iommufd.viommu_vdevice_mock", viommu_vdevice);
    } else {
        r.case("iommufd.viommu_not_supported", || {
            let fd = Iommufd::open()?;
            match fd.viommu_support() {
                livemig_iommufd::Support::NotSupported(why) => {
                    ensure!(why.contains("ENOTTY"), "{why}")
                }
                livemig_iommufd::Support::Supported => bail!("6.12 reports vIOMMU support"),
            }
            Ok(Outcome::Pass)
        });
    }
}

/// Allocates a dirty-tracking HWPT over `size` bytes mapped at the mock aperture start, the way
/// the kernel selftest's `iommufd_dirty_tracking` fixture does.
struct DirtyEnv {
    fd: Iommufd,
    _buf: DmaBuf,
    _dev: MockDevice,
    hwpt: livemig_iommufd::Hwpt,
}

/// The kernel turns THP off by itself on machines under 512 MiB (`hugepage_init`); the huge
/// variant needs it, through madvise.
fn enable_thp() -> Result<()> {
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    let mode = crate::util::read_sysfs(path)?;
    if mode.contains("[never]") {
        crate::util::write_sysfs(path, "madvise")?;
    }
    Ok(())
}

fn dirty_env(size: u64, huge: bool) -> Result<DirtyEnv> {
    if huge {
        enable_thp()?;
    }
    let fd = Iommufd::open()?;
    let ioas = fd.alloc_ioas()?;
    let flags = if huge { MOCK_FLAGS_DEVICE_HUGE_IOVA } else { 0 };
    // One IOMMU leaf per host page where the mock's leaves follow the mapping (Linux 7.3, see
    // `dirty_grain`). That also makes iommufd require host-page-aligned IOVAs.
    if crate::harness::kernel_at_least(7, 0) && !huge {
        ioas.set_huge_pages(false)?;
    }
    let dev = MockDevice::new(&fd, ioas.id(), flags)?;
    let buf = DmaBuf::with_alignment(size as usize, 2 << 20, huge)?;
    map_fixed(&ioas, &buf, MOCK_APERTURE_START)?;
    let hwpt = ioas.alloc_hwpt(dev.idev_id, HwptFlags::DIRTY_TRACKING)?;
    hwpt.set_dirty_tracking(true)?;
    Ok(DirtyEnv {
        fd,
        _buf: buf,
        _dev: dev,
        hwpt,
    })
}

/// The kernel's view of transparent huge pages, for failure messages of the huge variant.
fn thp_report() -> String {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let anon = meminfo
        .lines()
        .find(|l| l.starts_with("AnonHugePages"))
        .unwrap_or("AnonHugePages: ?")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mode = crate::util::read_sysfs("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap_or_else(|e| format!("{e}"));
    format!("{anon}, THP {mode}")
}

/// Marks every `2 * npte`-th mock page dirty, then expects whole PTEs (npte bits) set per mark,
/// exact counts, cleared on read unless NO_CLEAR (selftest `_test_mock_dirty_bitmaps`).
fn dirty_bitmaps(size: u64, huge: bool) -> Result<Outcome> {
    let env = dirty_env(size, huge)?;
    let page = MOCK_PAGE_SIZE;
    let pte = if huge {
        MOCK_HUGE_PAGE_SIZE
    } else {
        dirty_grain()
    };
    let nbits = size / page;
    let npte = pte / page;
    let pteset = 2 * npte;
    for clear in [false, true] {
        let mut marks = vec![0u64; nbits.div_ceil(64) as usize];
        let mut i = 0;
        while i < nbits {
            marks[(i / 64) as usize] |= 1 << (i % 64);
            i += pteset;
        }
        let expected_marks = (nbits / pteset).max(1);
        let n = mark_dirty(
            &env.fd,
            env.hwpt.id(),
            MOCK_APERTURE_START,
            size,
            page,
            &marks,
        )?;
        check_eq!(n, expected_marks, "mock PTEs marked");
        for round in 0..2 {
            let mut bm = DirtyBitmap::new(MOCK_APERTURE_START, size, page)?;
            env.hwpt
                .get_dirty_bitmap(MOCK_APERTURE_START, size, &mut bm, clear)?;
            // After a clearing read, a second read finds nothing; NO_CLEAR keeps everything.
            let expect_set = round == 0 || !clear;
            let mut want = 0;
            let mut i = 0;
            while i < nbits {
                for j in 0..pteset.min(nbits - i) {
                    let dirty = bm.is_dirty(MOCK_APERTURE_START + (i + j) * page);
                    let should = expect_set && j < npte;
                    if dirty != should {
                        bail!(
                            "round {round} clear={clear}: page {} is {} (pte {pte:#x}); {}",
                            i + j,
                            if dirty { "dirty" } else { "clean" },
                            thp_report()
                        );
                    }
                    want += u64::from(should);
                }
                i += pteset;
            }
            check_eq!(bm.count(), want, "round {round} clear={clear}");
        }
        if !clear {
            // Leave the domain clean for the clearing pass.
            let mut bm = DirtyBitmap::new(MOCK_APERTURE_START, size, page)?;
            env.hwpt
                .get_dirty_bitmap(MOCK_APERTURE_START, size, &mut bm, true)?;
        }
    }
    Ok(Outcome::Pass)
}

/// Reads sub-ranges that start in the middle of a bitmap word (through livemig's scratch path)
/// and raw reads into byte-misaligned user buffers (the kernel's own unaligned handling, as the
/// selftest does with `bitmap + 0xff1`).
fn unaligned_starts() -> Result<Outcome> {
    let size = 1u64 << 20;
    let env = dirty_env(size, false)?;
    let page = MOCK_PAGE_SIZE;
    let nbits = size / page;
    let dirty_pages = [3u64, 64, 65, 130, 511];
    let mut marks = vec![0u64; (nbits / 64) as usize];
    for p in dirty_pages {
        marks[(p / 64) as usize] |= 1 << (p % 64);
    }
    // Starts inside a bitmap word; on 7.3 at host-page (two mock page) boundaries, which is
    // all iommufd accepts once pages are not combined.
    let ranges: &[(u64, u64)] = if crate::harness::kernel_at_least(7, 0) {
        &[(2, 200), (62, 70), (66, 400), (0, nbits)]
    } else {
        &[(1, 200), (63, 70), (65, 400), (0, nbits)]
    };
    for &(start, len) in ranges {
        mark_dirty(
            &env.fd,
            env.hwpt.id(),
            MOCK_APERTURE_START,
            size,
            page,
            &marks,
        )?;
        let mut bm = DirtyBitmap::new(MOCK_APERTURE_START, size, page)?;
        let iova = MOCK_APERTURE_START + start * page;
        env.hwpt.get_dirty_bitmap(iova, len * page, &mut bm, true)?;
        let want: Vec<u64> = reported_dirty(&dirty_pages)
            .into_iter()
            .filter(|&p| p >= start && p < start + len)
            .collect();
        let got: Vec<u64> = (0..nbits)
            .filter(|&p| bm.is_dirty(MOCK_APERTURE_START + p * page))
            .collect();
        check_eq!(got, want, "range start {start} len {len}");
        // Drain what the read did not cover.
        let mut rest = DirtyBitmap::new(MOCK_APERTURE_START, size, page)?;
        env.hwpt
            .get_dirty_bitmap(MOCK_APERTURE_START, size, &mut rest, true)?;
    }
    // Raw: the user bitmap pointer off by 0xff1 bytes.
    mark_dirty(
        &env.fd,
        env.hwpt.id(),
        MOCK_APERTURE_START,
        size,
        page,
        &marks,
    )?;
    let mut raw = vec![0u8; (nbits / 8) as usize + 0x1000 + 8];
    let off = 0xff1;
    let mut arg = abi::iommu_hwpt_get_dirty_bitmap {
        size: size_of::<abi::iommu_hwpt_get_dirty_bitmap>() as u32,
        hwpt_id: env.hwpt.id(),
        iova: MOCK_APERTURE_START,
        length: size,
        page_size: page,
        data: raw.as_mut_ptr() as u64 + off as u64,
        ..Default::default()
    };
    // SAFETY: `data` points inside `raw`, which has room for nbits bits after `off`.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&env.fd),
            abi::IOMMU_HWPT_GET_DIRTY_BITMAP as libc::Ioctl,
            &mut arg,
        )
    };
    ensure!(
        rc == 0,
        "raw GET_DIRTY_BITMAP: {}",
        std::io::Error::last_os_error()
    );
    let bytes = &raw[off..off + (nbits / 8) as usize];
    let got: Vec<u64> = (0..nbits)
        .filter(|&p| bytes[(p / 8) as usize] >> (p % 8) & 1 == 1)
        .collect();
    check_eq!(
        got,
        reported_dirty(&dirty_pages),
        "byte-misaligned user bitmap"
    );
    Ok(Outcome::Pass)
}

fn read_dirty_and_unmap() -> Result<Outcome> {
    let size = 256u64 << 10;
    let env = dirty_env(size, false)?;
    let page = MOCK_PAGE_SIZE;
    let mut marks = vec![0u64; ((size / page) / 64) as usize];
    marks[0] = 0b1001;
    mark_dirty(
        &env.fd,
        env.hwpt.id(),
        MOCK_APERTURE_START,
        size,
        page,
        &marks,
    )?;
    let mut bm = DirtyBitmap::new(MOCK_APERTURE_START, size, page)?;
    let unmapped = env
        .hwpt
        .read_dirty_and_unmap(MOCK_APERTURE_START, size, &mut bm)?;
    check_eq!(unmapped, size);
    check_eq!(bm.count(), reported_dirty(&[0, 3]).len() as u64);
    check_eq!(env.hwpt.ioas().unmap_all()?, 0, "nothing left mapped");
    Ok(Outcome::Pass)
}

/// Seed 000's auto domains with mock devices: a dirty-capable device gets a dirty HWPT, a second
/// reuses it, a NO_DIRTY device is refused by the dirty domain (EINVAL), skips it and gets a
/// plain HWPT.
fn auto_domain() -> Result<Outcome> {
    let fd = Iommufd::open()?;
    let ioas = fd.alloc_ioas()?;
    let mut auto = AutoDomains::new(ioas.clone());
    let attach = |dev: Rc<MockDevice>| move |pt: u32| dev.replace(pt);
    let d1 = Rc::new(MockDevice::new(&fd, ioas.id(), 0)?);
    let c1 = auto.attach(&fd.probe_device(d1.idev_id), attach(Rc::clone(&d1)))?;
    check_eq!(c1.path, DomainPath::Allocated, "{c1}");
    ensure!(c1.dirty_tracking, "{c1}");
    let d2 = Rc::new(MockDevice::new(&fd, ioas.id(), 0)?);
    let c2 = auto.attach(&fd.probe_device(d2.idev_id), attach(Rc::clone(&d2)))?;
    check_eq!(c2.path, DomainPath::Reused, "{c2}");
    check_eq!(c2.pt_id, c1.pt_id);
    let d3 = Rc::new(MockDevice::new(&fd, ioas.id(), MOCK_FLAGS_DEVICE_NO_DIRTY)?);
    let tried = Rc::new(RefCell::new(Vec::new()));
    let log = Rc::clone(&tried);
    let d3c = Rc::clone(&d3);
    let c3 = auto.attach(&fd.probe_device(d3.idev_id), move |pt| {
        log.borrow_mut().push(pt);
        d3c.replace(pt)
    })?;
    check_eq!(c3.path, DomainPath::Allocated, "{c3}");
    ensure!(!c3.dirty_tracking, "{c3}");
    check_eq!(c3.skipped.len(), 1, "{:?}", c3.skipped);
    ensure!(c3.reason.contains("does not report dirty tracking"), "{c3}");
    check_eq!(tried.borrow()[0], c1.pt_id);
    auto.set_dirty_tracking(true)?;
    auto.set_dirty_tracking(false)?;
    // Devices go before their domains.
    drop((d1, d2, d3));
    Ok(Outcome::Pass)
}

/// Linux 7.3's vIOMMU and vDEVICE objects on the mock: the probe says supported; a vIOMMU on a
/// nesting-parent HWPT of the mock device, whose driver data the mock echoes (`out_data` =
/// `in_data`: the kernel read and wrote our buffer); a vDEVICE with a virtual ID; a second
/// vDEVICE for the same device refused. Negative control: an unknown vIOMMU type is refused
/// by the kernel (EOPNOTSUPP), so the checks above are the kernel's and not the crate's.
fn viommu_vdevice() -> Result<Outcome> {
    let fd = Iommufd::open()?;
    check_eq!(fd.viommu_support(), livemig_iommufd::Support::Supported);
    let ioas = fd.alloc_ioas()?;
    let dev = MockDevice::new(&fd, ioas.id(), 0)?;
    let parent = ioas.alloc_hwpt(dev.idev_id, HwptFlags::NEST_PARENT)?;
    let mut data = viommu_data(0x5eed_1234);
    let v = parent.alloc_viommu(dev.idev_id, VIOMMU_TYPE_SELFTEST, &mut data)?;
    check_eq!(viommu_out_data(&data), 0x5eed_1234, "the mock's loopback");
    let vd = v.alloc_vdevice(dev.idev_id, 0x99)?;
    check_eq!(vd.virt_id(), 0x99);
    let again = v.alloc_vdevice(dev.idev_id, 0x9a);
    ensure!(
        again.is_err(),
        "a second vDEVICE for one device was accepted"
    );
    let e = parent
        .alloc_viommu(dev.idev_id, 0x1234, &mut [])
        .err()
        .context("an unknown vIOMMU type was accepted")?;
    check_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e}");
    drop(vd);
    drop(v);
    Ok(Outcome::Pass)
}

/// `livemig::tracker::HwptTracker` over a dirty-tracking HWPT of the mock IOMMU, checked
/// against the dirty-tracker contract (`livemig::tracker::testing`): the kernel's mock marks a
/// page dirty as a device write would (`IOMMU_TEST_OP_DIRTY`), the tracker reads and clears
/// it through `IOMMU_HWPT_GET_DIRTY_BITMAP`. With `lost` (the negative control) the marks go
/// to a second HWPT the tracker does not read, and the check must fail.
fn hwpt_tracker_contract(lost: bool) -> Result<Outcome> {
    use livemig::tracker::HwptTracker;
    use livemig::tracker::testing::{self, Dirtied, Subject};

    const SIZE: u64 = 1 << 20;
    let fd = Iommufd::open()?;
    let ioas = fd.alloc_ioas()?;
    if crate::harness::kernel_at_least(7, 0) {
        ioas.set_huge_pages(false)?;
    }
    let dev = MockDevice::new(&fd, ioas.id(), 0)?;
    let buf = DmaBuf::with_alignment(SIZE as usize, 2 << 20, false)?;
    map_fixed(&ioas, &buf, MOCK_APERTURE_START)?;
    let hwpt = ioas.alloc_hwpt(dev.idev_id, HwptFlags::DIRTY_TRACKING)?;
    let other = ioas.alloc_hwpt(dev.idev_id, HwptFlags::DIRTY_TRACKING)?;
    other.set_dirty_tracking(true)?;
    let marked = if lost { other.id() } else { hwpt.id() };
    let tracker = HwptTracker::new(vec![hwpt], &[(MOCK_APERTURE_START, SIZE)])
        .map_err(|e| anyhow::anyhow!("HwptTracker: {e}"))?;

    struct Mock<'a> {
        fd: &'a Iommufd,
        hwpt: u32,
    }
    impl Subject for Mock<'_> {
        type Tracker = HwptTracker;
        fn pages(&self) -> u64 {
            (MOCK_APERTURE_START + SIZE) / PAGE_SIZE
        }
        fn dirty(&mut self, _: &mut HwptTracker, nth: u32) -> Dirtied {
            let pfn = MOCK_APERTURE_START / PAGE_SIZE + 1 + 7 * u64::from(nth);
            // One mock page (2 KiB) of the 4 KiB page: the harvest reports the whole page.
            let marked = mark_dirty(
                self.fd,
                self.hwpt,
                pfn * PAGE_SIZE,
                PAGE_SIZE,
                MOCK_PAGE_SIZE,
                &[1],
            );
            // A failed mark shows up as the page not reported.
            if let Err(e) = marked {
                eprintln!("hwpt_tracker_contract: {e}");
            }
            Dirtied::page(pfn, 1)
        }
    }
    let result = testing::check(
        &mut Mock {
            fd: &fd,
            hwpt: marked,
        },
        tracker,
    );
    drop(other);
    drop(dev);
    match (lost, result) {
        (false, Ok(c)) => {
            ensure!(c.rules >= 9, "only {} rules ran", c.rules);
            Ok(Outcome::Pass)
        }
        (false, Err(e)) => bail!("{e}"),
        (true, Err(e)) if e.contains("was dirtied and not reported") => Ok(Outcome::Pass),
        (true, Err(e)) => bail!("the negative control failed for another reason: {e}"),
        (true, Ok(_)) => bail!("marks on another HWPT passed the contract check"),
    }
}
