//! The dirty-tracker contract (`livemig::tracker::testing`) for `livemig-host`'s trackers: the
//! HWPT tracker a host builds (`Host::iommu_tracker`) over the fake iommufd kernel of the
//! fail_nth sweep, with a failing `IOMMU_HWPT_GET_DIRTY_BITMAP` part-way through a harvest, and
//! the VMM write log. The rig runs the HWPT tracker over the kernel's mock IOMMU.

#[path = "fail_nth/fake.rs"]
mod fake;

use std::sync::{Arc, Mutex};

use fake::{Kernel, Side, World, make_blob};
use livemig::memory::GuestMemory;
use livemig::tracker::DirtyTracker;
use livemig::tracker::testing::{self, Dirtied, Subject};
use livemig_host::workload::VmmDirtyLog;
use livemig_host::{Host, HostConfig};
use livemig_kvm::{Backing, VmMemory};

const RAM: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// A fake sysfs where the cdev is an mdev.
fn sysfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("class/vfio-dev/vfio0/device");
    std::fs::create_dir_all(&dev).unwrap();
    std::os::unix::fs::symlink("../../mdev_supported_types/fake-mig", dev.join("mdev_type"))
        .unwrap();
    dir
}

struct Hwpt {
    k: Kernel,
    /// Negative control: the device's writes never reach a tracking HWPT.
    lost: bool,
}

impl Subject for Hwpt {
    type Tracker = Box<dyn DirtyTracker>;
    fn pages(&self) -> u64 {
        RAM / PAGE
    }
    fn dirty(&mut self, _: &mut Self::Tracker, nth: u32) -> Dirtied {
        let pfn = 3 + 41 * u64::from(nth);
        if !self.lost {
            self.k.world().mark_dirty(Side::Source, pfn * PAGE + 16);
        }
        Dirtied::page(pfn, 1)
    }
    fn fail_next_harvest(&mut self, _: &mut Self::Tracker) -> bool {
        self.k.world().fail_next(Side::Source, libc::EFAULT);
        true
    }
}

fn hwpt_check(lost: bool) -> Result<testing::Checked, String> {
    let k = Kernel(Arc::new(Mutex::new(World::new(make_blob(4096, 1), 0))));
    let _g1 = livemig_vfio::fake_kernel::install(Box::new(k.clone()));
    let _g2 = livemig_iommufd::fake_kernel::install(Box::new(k.clone()));
    let sysfs = sysfs();
    let mem = Arc::new(VmMemory::new(&[(0, RAM)], Backing::Anonymous).unwrap());
    k.world().opening = Some(Side::Source);
    let cfg = HostConfig {
        devices: vec!["/dev/vfio/devices/vfio0".into()],
        sysfs: Some(sysfs.path().to_path_buf()),
        ..Default::default()
    };
    let host = Host::open(&cfg, mem).unwrap();
    k.world().opening = None;
    let t = host
        .iommu_tracker()
        .unwrap()
        .expect("the fake IOMMU tracks dirty pages");
    let r = testing::check(&mut Hwpt { k: k.clone(), lost }, t);
    if r.is_ok() {
        assert!(!k.world().tracking(Side::Source), "tracking left on");
    }
    r
}

/// One test: the fake kernels are process-wide.
#[test]
fn the_hwpt_and_vmm_log_trackers_meet_the_contract() {
    let c = hwpt_check(false).unwrap();
    assert!(c.harvest_error, "the failing GET_DIRTY_BITMAP ran");
    // Negative control: writes the HWPT never sees.
    let e = hwpt_check(true).unwrap_err();
    assert!(e.contains("page 0x3 was dirtied and not reported"), "{e}");

    struct Vmm(Arc<VmMemory>);
    impl Subject for Vmm {
        type Tracker = VmmDirtyLog;
        fn pages(&self) -> u64 {
            RAM / PAGE
        }
        fn dirty(&mut self, _: &mut VmmDirtyLog, nth: u32) -> Dirtied {
            let pfn = 5 + 37 * u64::from(nth);
            self.0.write(pfn * PAGE + 3, b"vmm").unwrap();
            Dirtied::page(pfn, 1)
        }
    }
    let mem = Arc::new(VmMemory::new(&[(0, RAM)], Backing::Anonymous).unwrap());
    testing::check(&mut Vmm(mem.clone()), VmmDirtyLog::new(mem)).unwrap();
}
