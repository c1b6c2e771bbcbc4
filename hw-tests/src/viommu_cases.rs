//! livemig-viommu's iommufd listener against the real kernel: guest MAP/UNMAP requests through
//! the virtio-iommu device model land in an IOAS whose mock device sits on a dirty-tracking
//! HWPT, and a guest unmap during migration reports the pages the device dirtied.

use anyhow::{Result, ensure};
use livemig_iommufd::{AutoDomains, Iommufd};
use livemig_viommu::device::{DeviceConfig, VirtioIommu};
use livemig_viommu::listener::{GuestMemory, IommufdListener};
use livemig_viommu::proto::{MAP_F_READ, MAP_F_WRITE, Request, Status};

use crate::check_eq;
use crate::harness::{Outcome, Runner};
use crate::mock::*;
use crate::util::DmaBuf;

/// Guest RAM for the case: `buf` at guest-physical `base`.
struct Ram {
    base: u64,
    buf: DmaBuf,
}

// SAFETY: the buffer is plain anonymous memory, only its address is shared between threads.
unsafe impl Send for Ram {}

// SAFETY: `buf` stays mapped for as long as `Ram` lives, and the listener owning `Ram` removes
// its IOAS mappings before dropping it.
unsafe impl GuestMemory for Ram {
    fn host(&self, gpa: u64) -> Option<(*mut u8, u64)> {
        let off = gpa.checked_sub(self.base)?;
        let len = self.buf.len() as u64;
        // SAFETY: `off < len`, inside the buffer.
        (off < len).then(|| (unsafe { self.buf.ptr().add(off as usize) }, len - off))
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        vec![(self.base, self.buf.len() as u64)]
    }
}

const RAM_BASE: u64 = 0x4000_0000;
const RAM_SIZE: usize = 1 << 20;

fn map(iova: u64, len: u64, gpa: u64) -> Request {
    Request::Map {
        domain: 1,
        virt_start: iova,
        virt_end: iova + len - 1,
        phys_start: gpa,
        flags: MAP_F_READ | MAP_F_WRITE,
    }
}

fn unmap(iova: u64, len: u64) -> Request {
    Request::Unmap {
        domain: 1,
        virt_start: iova,
        virt_end: iova + len - 1,
        reserved: [0; 4],
    }
}

fn iommufd_listener() -> Result<Outcome> {
    let fd = Iommufd::open()?;
    let ioas = fd.alloc_ioas()?;
    let mock = MockDevice::new(&fd, ioas.id(), 0)?;
    let mut auto = AutoDomains::new(ioas.clone());
    let placed = auto.attach(&fd.probe_device(mock.idev_id), |pt| mock.replace(pt))?;
    ensure!(
        placed.dirty_tracking,
        "mock device without dirty tracking: {placed}"
    );
    let hwpt = auto.hwpts()[0].clone();
    let ram = Ram {
        base: RAM_BASE,
        buf: DmaBuf::new(RAM_SIZE)?,
    };
    let listener = IommufdListener::new(ioas.clone(), auto.hwpts().to_vec(), ram, MOCK_PAGE_SIZE);
    let mut dev = VirtioIommu::new(DeviceConfig::default())?;
    dev.add_endpoint(8, Some(Box::new(listener)), vec![])?;
    let attach = Request::Attach {
        domain: 1,
        endpoint: 8,
        flags: 0,
        reserved: [0; 4],
    };
    check_eq!(dev.request(&attach), Status::Ok);

    let iova = MOCK_APERTURE_START;
    let len = 256u64 << 10;
    let gpa = RAM_BASE + (64 << 10);
    check_eq!(dev.request(&map(iova, len, gpa)), Status::Ok);
    // The kernel holds the mapping: mapping it again behind the listener's back collides.
    let probe = DmaBuf::new(4096)?;
    // SAFETY: `probe` outlives the IOAS mapping should the kernel accept it (it is unmapped
    // with the IOAS when `ioas` is destroyed at the end of the case, before `probe` drops).
    let again = unsafe {
        ioas.map_user(
            probe.ptr(),
            4096,
            livemig_iommufd::Placement::Fixed(iova),
            livemig_iommufd::DmaAccess::READ,
        )
    };
    ensure!(
        again.is_err(),
        "IOVA {iova:#x} was not mapped by the listener"
    );

    // A MAP of guest-physical memory that is not RAM is refused with a status and leaves the
    // device model unchanged.
    let st = dev.request(&map(iova + len, 0x1000, 0x1000));
    check_eq!(st, Status::DevErr);
    check_eq!(dev.mappings(1).len(), 1);

    // Migration starts: HWPT tracking on, listeners switch to read-dirty-then-unmap.
    auto.set_dirty_tracking(true)?;
    dev.set_dirty_tracking(true);
    let page = MOCK_PAGE_SIZE;
    let mut marks = vec![0u64; (len / page).div_ceil(64) as usize];
    marks[0] = 0b1001; // pages 0 and 3 of the mapping
    check_eq!(mark_dirty(&fd, hwpt.id(), iova, len, page, &marks)?, 2);
    check_eq!(dev.request(&unmap(iova, len)), Status::Ok);
    check_eq!(
        dev.take_dirty(),
        vec![(gpa, page), (gpa + 3 * page, page)],
        "dirty guest-physical ranges from the unmap"
    );
    check_eq!(
        ioas.unmap_all()?,
        0,
        "the guest unmap removed the IOAS mapping"
    );

    // After tracking stops, an unmap reports nothing.
    dev.set_dirty_tracking(false);
    auto.set_dirty_tracking(false)?;
    check_eq!(dev.request(&map(iova, len, gpa)), Status::Ok);
    check_eq!(dev.request(&unmap(iova, len)), Status::Ok);
    ensure!(dev.take_dirty().is_empty());

    // Detach removes the domain's mappings from the host; dropping the device (and its
    // listener) leaves nothing behind.
    check_eq!(dev.request(&map(iova, len, gpa)), Status::Ok);
    let detach = Request::Detach {
        domain: 1,
        endpoint: 8,
    };
    check_eq!(dev.request(&detach), Status::Ok);
    check_eq!(ioas.unmap_all()?, 0, "detach removed the mappings");
    drop(dev);
    drop(mock);
    Ok(Outcome::Pass)
}

pub fn run(r: &mut Runner) {
    r.case("viommu.iommufd_listener_mock", iommufd_listener);
}
