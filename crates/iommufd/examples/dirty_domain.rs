//! iommufd as a VMM uses it for one assigned device: open `/dev/iommu`, allocate an IOAS, open
//! the device's VFIO cdev, bind it to the iommufd and attach it through the auto-domain policy
//! (a dirty-tracking HWPT where the IOMMU can track, else the plain IOAS, with the reason), map
//! 2 MiB of this process's memory, and — when the domain tracks — switch dirty tracking on and
//! read-and-clear the dirty bitmap twice. Checks that the mapping lands in the IOAS (the unmap
//! removes exactly its bytes); the dirty counts are printed (what the device wrote is its own
//! business).
//!
//! ```text
//! cargo run -p livemig-iommufd --example dirty_domain -- /dev/vfio/devices/vfio0
//! ```
//!
//! Needs `/dev/iommu` (Linux with `CONFIG_IOMMUFD`) and a VFIO cdev
//! (`CONFIG_VFIO_DEVICE_CDEV`); `cargo xtask rig` has both.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;

use livemig_iommufd::{AutoDomains, DirtyBitmap, DmaAccess, Iommufd, Placement};
use livemig_vfio::VfioDevice;

type BoxError = Box<dyn std::error::Error>;

const LEN: u64 = 2 << 20;

fn main() -> ExitCode {
    let Some(cdev) = std::env::args().nth(1) else {
        eprintln!("usage: dirty_domain /dev/vfio/devices/vfioN");
        return ExitCode::from(2);
    };
    match run(&cdev) {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dirty_domain example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Page-aligned memory the device may DMA into (freed on drop, after the IOAS unmapped it).
struct DmaBuffer(*mut u8, Layout);

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `run` with this layout, freed once.
        unsafe { dealloc(self.0, self.1) }
    }
}

fn run(cdev: &str) -> Result<(), BoxError> {
    if !Path::new("/dev/iommu").exists() {
        return Err(
            "/dev/iommu does not exist: this kernel has no iommufd (CONFIG_IOMMUFD); \
                    run the example where it has one (`cargo xtask rig`'s guest, a lab host)"
                .into(),
        );
    }
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let dev = VfioDevice::open(cdev)?;
    let dev_id = dev.bind_iommufd(iommufd.as_fd())?;
    let probed = iommufd.probe_device(dev_id);
    let mut domains = AutoDomains::new(ioas);
    let chosen = domains.attach(&probed, |pt| {
        dev.attach_pt(pt).map_err(std::io::Error::from)
    })?;
    println!("{cdev}: device {dev_id}: {chosen}");

    let layout = Layout::from_size_align(LEN as usize, 4096)?;
    // SAFETY: a non-zero size.
    let buf = DmaBuffer(unsafe { alloc_zeroed(layout) }, layout);
    if buf.0.is_null() {
        return Err("out of memory for the DMA buffer".into());
    }
    // SAFETY: the buffer stays allocated until after the unmap below, and no Rust reference
    // into it exists while it is mapped.
    let iova = unsafe {
        domains.ioas().map_user(
            buf.0,
            LEN,
            Placement::Anywhere,
            DmaAccess::READ | DmaAccess::WRITE,
        )
    }?;
    println!("mapped {LEN:#x} bytes at IOVA {iova:#x}");

    if chosen.dirty_tracking {
        domains.set_dirty_tracking(true)?;
        let mut first = DirtyBitmap::new(iova, LEN, 4096)?;
        domains.read_dirty(iova, LEN, &mut first, true)?;
        let mut second = DirtyBitmap::new(iova, LEN, 4096)?;
        domains.read_dirty(iova, LEN, &mut second, true)?;
        println!(
            "dirty pages: {} in the first read, {} in the second (cleared in between)",
            first.count(),
            second.count()
        );
        domains.set_dirty_tracking(false)?;
    } else {
        println!(
            "no IOMMU dirty tracking for this device: the engine would use its DMA log \
             (livemig-vfio) or refuse to migrate"
        );
    }
    let unmapped = domains.ioas().unmap(iova, LEN)?;
    if unmapped != LEN {
        return Err(format!("unmap removed {unmapped:#x} bytes, {LEN:#x} were mapped").into());
    }
    Ok(())
}
