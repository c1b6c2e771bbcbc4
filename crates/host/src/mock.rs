//! The iommufd selftest's mock device as a DMA endpoint (feature `selftest`; the kernel needs
//! `CONFIG_IOMMUFD_TEST`). It stands in for an assigned device's DMA in the rig, where no
//! device with a dirty-tracking IOMMU exists: it is attached through the auto-domain policy
//! (which allocates a dirty-tracking HWPT for it), and each emulated DMA write changes guest
//! RAM behind the VMM's back and then sets the dirty bits of those IOVAs in the mock domain
//! with `IOMMU_TEST_OP_DIRTY` — what an IOMMU with hardware dirty tracking does on a device
//! write. Only the HWPT harvest can find those pages.

use std::sync::Arc;

use livemig_iommufd::selftest::{MOCK_PAGE_SIZE, MockDevice, mark_dirty};
use livemig_iommufd::{AutoDomain, AutoDomains, Iommufd};
use livemig_kvm::VmMemory;

use crate::Error;
use crate::workload::WriteFn;

/// The mock DMA endpoint.
#[derive(Debug)]
pub struct MockDma {
    dev: Arc<MockDevice>,
    /// The auto-domain outcome (a dirty-tracking HWPT on a kernel with the selftest).
    pub domain: AutoDomain,
    iommufd: Iommufd,
}

impl MockDma {
    /// Creates the mock device on `auto`'s IOAS and attaches it through the policy.
    pub fn new(iommufd: &Iommufd, auto: &mut AutoDomains) -> Result<MockDma, Error> {
        let dev = Arc::new(
            MockDevice::new(iommufd, auto.ioas().id(), 0).map_err(|source| Error::Io {
                what: "IOMMU_TEST_OP_MOCK_DOMAIN (is CONFIG_IOMMUFD_TEST enabled?)".into(),
                source,
            })?,
        );
        let probed = iommufd.probe_device(dev.idev_id);
        let d = Arc::clone(&dev);
        let domain = auto
            .attach(&probed, move |pt| d.replace(pt))
            .map_err(|source| Error::Iommufd {
                what: "attaching the mock device through the auto-domain policy".into(),
                source,
            })?;
        Ok(MockDma {
            dev,
            domain,
            iommufd: iommufd.clone(),
        })
    }

    /// The iommufd device id of the mock device.
    pub fn dev_id(&self) -> u32 {
        self.dev.idev_id
    }

    /// The emulated DMA write: the bytes go to guest RAM through the host mapping (not
    /// through `vm-memory`, so the VMM's write log does not see them), then the page's IOVA
    /// (= GPA) is marked dirty in the mock domain. While dirty tracking is off the kernel
    /// refuses the mark (EINVAL), as hardware sets no dirty bit then; the write stands. A mark
    /// that finds no mock PTE is an error (the write would be invisible to the tracker).
    pub fn writer(&self, memory: Arc<VmMemory>) -> WriteFn {
        let fd = self.iommufd.clone();
        let hwpt = self.domain.pt_id;
        Box::new(move |gpa, bytes| {
            let region = memory
                .regions()
                .iter()
                .find(|r| gpa >= r.gpa && gpa + bytes.len() as u64 <= r.gpa + r.size)
                .ok_or_else(|| format!("DMA to {gpa:#x} outside guest RAM"))?;
            let host = (region.host + (gpa - region.gpa)) as *mut u8;
            // SAFETY: `host` is inside the mapping of a region of `memory`, which this closure
            // keeps alive; the range is in bounds (checked above). Guest RAM is shared with
            // devices and other threads by design and never referenced by Rust code, so a
            // volatile byte copy is the device's write.
            unsafe {
                for (i, b) in bytes.iter().enumerate() {
                    std::ptr::write_volatile(host.add(i), *b);
                }
            }
            // IOMMU_TEST_OP_DIRTY looks the mock PTE up by `iova / page_size`, while the mock
            // page table is indexed in its own 2 KiB pages (Linux 6.12
            // drivers/iommu/iommufd/selftest.c, iommufd_test_dirty): any other page size
            // marks the wrong IOVA, or none. So the 4 KiB page is marked as its two mock
            // pages, and the count the kernel returns must say both existed.
            let page = gpa & !(livemig::memory::PAGE_SIZE - 1);
            match mark_dirty(
                &fd,
                hwpt,
                page,
                livemig::memory::PAGE_SIZE,
                MOCK_PAGE_SIZE,
                &[0b11],
            ) {
                Ok(2) => Ok(()),
                Ok(n) => Err(format!(
                    "IOMMU_TEST_OP_DIRTY at {page:#x} in HWPT {hwpt} marked {n} of 2 mock pages \
                     (the IOVA is not mapped in the mock domain)"
                )),
                // While dirty tracking is off the kernel refuses the mark (EINVAL), as
                // hardware sets no dirty bit then; the write stands.
                // livemig_iommufd::selftest::mark_dirty keeps the errno's kind, not its number.
                Err(e)
                    if e.raw_os_error() == Some(libc::EINVAL)
                        || e.kind() == std::io::ErrorKind::InvalidInput =>
                {
                    Ok(())
                }
                Err(e) => Err(format!("marking {page:#x} dirty in HWPT {hwpt}: {e}")),
            }
        })
    }
}
