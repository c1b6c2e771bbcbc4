//! The iommufd selftest uAPI (`IOMMU_TEST_CMD`, kernels built with `CONFIG_IOMMUFD_TEST`): a
//! mock IOMMU with mock devices. It exists to exercise dirty tracking without dirty-capable
//! hardware — in the conformance rig, and in `livemig probe` on a test kernel. Feature
//! `selftest`; on a production kernel every command fails with `ENOTTY`.
//!
//! Facts from `drivers/iommu/iommufd/iommufd_test.h` and `selftest.c` (Linux 6.12):
//! `IOMMU_TEST_CMD = _IO(';', 0x80 + 32)`; the op is in the structure, not the ioctl number
//! (the selftests' `_IOMMU_TEST_CMD(op)` expands to plain `IOMMU_TEST_CMD`). The mock aperture
//! is `[1 << 24, (1 << 31) - 1]`; the mock IO page is `PAGE_SIZE / 2` and its huge page
//! `512 * PAGE_SIZE / 2`. `IOMMU_TEST_OP_DIRTY` indexes mock PTEs by `iova / page_size`, so it
//! must be given the mock IO page size — with 4 KiB it marks the wrong entries, usually none.

use std::io;
use std::os::fd::AsRawFd;

use crate::Iommufd;

/// `IOMMU_TEST_CMD`.
pub const IOMMU_TEST_CMD: u64 = crate::abi::IOMMU_TEST_CMD;

/// `IOMMU_TEST_OP_MOCK_DOMAIN`: create a mock device attached to a new or given domain.
pub const OP_MOCK_DOMAIN: u32 = 2;
/// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE`.
pub const OP_MOCK_DOMAIN_REPLACE: u32 = 10;
/// `IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS`: as MOCK_DOMAIN, with device flags.
pub const OP_MOCK_DOMAIN_FLAGS: u32 = 12;
/// `IOMMU_TEST_OP_DIRTY`: mark mock PTEs dirty.
pub const OP_DIRTY: u32 = 13;
/// `IOMMU_TEST_OP_TRIGGER_IOPF`: report a page request from a mock device, as if its DMA
/// missed (Linux 6.11+; `iommufd_test_trigger_iopf` flags it `LAST_PAGE`, so each call is a
/// group of one).
pub const OP_TRIGGER_IOPF: u32 = 15;

/// `IOMMU_VIOMMU_TYPE_SELFTEST`: the mock's vIOMMU type (Linux 7.3.4 iommufd_test.h line
/// 246); its driver data is `struct iommu_viommu_selftest` ([`viommu_data`]).
pub const VIOMMU_TYPE_SELFTEST: u32 = 0xdead_beef;

/// `struct iommu_viommu_selftest` (7.3.4 iommufd_test.h lines 258-263): `in_data u32`,
/// `out_data u32` (the mock copies `in_data` there), `out_mmap_offset u64`,
/// `out_mmap_length u64`; 24 bytes.
pub fn viommu_data(in_data: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(&in_data.to_le_bytes());
    b
}

/// `out_data` of a [`viommu_data`] buffer after the kernel wrote it.
pub fn viommu_out_data(b: &[u8; 24]) -> u32 {
    u32::from_le_bytes([b[4], b[5], b[6], b[7]])
}

/// `IOMMU_HWPT_DATA_SELFTEST`: driver data type of a mock nested HWPT.
pub const HWPT_DATA_SELFTEST: u32 = 0xdead;
/// `IOMMU_TEST_IOTLB_DEFAULT`: the mock nested HWPT's initial IOTLB value
/// (`struct iommu_hwpt_selftest { __u32 iotlb; }`).
pub const IOTLB_DEFAULT: u32 = 0xbadbeef;

/// `MOCK_FLAGS_DEVICE_NO_DIRTY`: the mock device's IOMMU has no dirty tracking.
pub const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1 << 0;
/// `MOCK_FLAGS_DEVICE_HUGE_IOVA`: the mock device's IOMMU uses the huge IO page.
pub const MOCK_FLAGS_DEVICE_HUGE_IOVA: u32 = 1 << 1;

/// The CPU page size the mock's geometry is derived from (x86-64 and the rig).
pub const PAGE_SIZE: u64 = 4096;
/// `MOCK_IO_PAGE_SIZE` (`PAGE_SIZE / 2`).
pub const MOCK_PAGE_SIZE: u64 = PAGE_SIZE / 2;
/// `MOCK_HUGE_PAGE_SIZE` (`512 * MOCK_IO_PAGE_SIZE`).
pub const MOCK_HUGE_PAGE_SIZE: u64 = 512 * MOCK_PAGE_SIZE;
/// `MOCK_APERTURE_START`.
pub const MOCK_APERTURE_START: u64 = 1 << 24;
/// `MOCK_APERTURE_LAST`.
pub const MOCK_APERTURE_LAST: u64 = (1 << 31) - 1;

/// `struct iommu_test_cmd`: a 16-byte header, a 48-byte union (its largest member is `dirty`)
/// and `last`; 72 bytes with tail padding.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TestCmd {
    /// `sizeof(struct iommu_test_cmd)`.
    pub size: u32,
    /// The operation.
    pub op: u32,
    /// The object the operation applies to.
    pub id: u32,
    /// Must be zero.
    pub reserved: u32,
    /// The operation's union member, as 64-bit words.
    pub u: [u64; 6],
    /// `last` (used by the access ops, zero otherwise).
    pub last: u32,
    /// Tail padding.
    pub pad: u32,
}

const _: () = assert!(core::mem::size_of::<TestCmd>() == 72);

impl TestCmd {
    /// A command for `op` on object `id`.
    pub fn new(op: u32, id: u32) -> TestCmd {
        TestCmd {
            size: core::mem::size_of::<TestCmd>() as u32,
            op,
            id,
            ..Default::default()
        }
    }

    /// The `u32` at byte offset `byte` of the union.
    pub fn u32_at(&self, byte: usize) -> u32 {
        let w = self.u[byte / 8];
        (w >> ((byte % 8) * 8)) as u32
    }

    /// Sets the `u32` at byte offset `byte` of the union.
    pub fn set_u32_at(&mut self, byte: usize, v: u32) {
        let shift = (byte % 8) * 8;
        let w = &mut self.u[byte / 8];
        *w = (*w & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
    }
}

/// Issues one `IOMMU_TEST_CMD`.
pub fn test_cmd(fd: &Iommufd, cmd: &mut TestCmd) -> io::Result<()> {
    // SAFETY: `cmd` is a live iommu_test_cmd with its size set; any user pointer in it was set
    // by the caller to memory that outlives this call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            IOMMU_TEST_CMD as libc::Ioctl,
            cmd as *mut TestCmd,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A mock device bound to the mock IOMMU, attached to a domain at creation. Destroyed on drop.
#[derive(Debug)]
pub struct MockDevice {
    fd: Iommufd,
    /// The selftest device object.
    pub stdev_id: u32,
    /// The HWPT it is attached to.
    pub hwpt_id: u32,
    /// Its iommufd device id (for `IOMMU_GET_HW_INFO`, `IOMMU_HWPT_ALLOC`).
    pub idev_id: u32,
}

impl MockDevice {
    /// `IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS` (or plain MOCK_DOMAIN with no flags) on `pt_id` (an
    /// IOAS or a HWPT).
    pub fn new(fd: &Iommufd, pt_id: u32, dev_flags: u32) -> io::Result<MockDevice> {
        let mut cmd = TestCmd::new(
            if dev_flags == 0 {
                OP_MOCK_DOMAIN
            } else {
                OP_MOCK_DOMAIN_FLAGS
            },
            pt_id,
        );
        if dev_flags != 0 {
            cmd.set_u32_at(12, dev_flags);
        }
        test_cmd(fd, &mut cmd)?;
        Ok(MockDevice {
            fd: fd.clone(),
            stdev_id: cmd.u32_at(0),
            hwpt_id: cmd.u32_at(4),
            idev_id: cmd.u32_at(8),
        })
    }

    /// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE`: re-attaches the device to `pt_id` (the mock's
    /// equivalent of `VFIO_DEVICE_ATTACH_IOMMUFD_PT`); returns the attached id.
    pub fn replace(&self, pt_id: u32) -> io::Result<u32> {
        let mut cmd = TestCmd::new(OP_MOCK_DOMAIN_REPLACE, self.stdev_id);
        cmd.set_u32_at(0, pt_id);
        test_cmd(&self.fd, &mut cmd)?;
        Ok(cmd.u32_at(0))
    }
}

impl Drop for MockDevice {
    fn drop(&mut self) {
        let _ = self.fd.destroy(self.stdev_id);
    }
}

/// `IOMMU_TEST_OP_DIRTY`: marks dirty the mock PTEs at every set bit of `bitmap` (bit i =
/// `iova + i * page_size`); returns how many existed and were marked.
pub fn mark_dirty(
    fd: &Iommufd,
    hwpt_id: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &[u64],
) -> io::Result<u64> {
    if page_size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "IOMMU_TEST_OP_DIRTY: page size 0",
        ));
    }
    let bits = length / page_size;
    if (bitmap.len() as u64) * 64 < bits {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("IOMMU_TEST_OP_DIRTY: bitmap too small for {bits} pages"),
        ));
    }
    let mut cmd = TestCmd::new(OP_DIRTY, hwpt_id);
    // dirty: flags u32 @0 (+pad), iova @8, length @16, page_size @24, uptr @32, out_nr_dirty @40
    cmd.u[1] = iova;
    cmd.u[2] = length;
    cmd.u[3] = page_size;
    cmd.u[4] = bitmap.as_ptr() as u64;
    test_cmd(fd, &mut cmd)
        .map_err(|e| io::Error::new(e.kind(), format!("IOMMU_TEST_OP_DIRTY: {e}")))?;
    Ok(cmd.u[5])
}

/// `IOMMU_TEST_OP_TRIGGER_IOPF`: the mock device `dev_id` (its iommufd device id) reports a
/// page request for `addr` with `IOMMU_PGFAULT_PERM_*` bits `perm`; `pasid` 0 is
/// `IOMMU_NO_PASID` (no PASID in the request). The kernel routes it to the fault queue of the
/// HWPT the device is attached to; without one it answers the request itself.
pub fn trigger_iopf(
    fd: &Iommufd,
    dev_id: u32,
    pasid: u32,
    grpid: u32,
    perm: u32,
    addr: u64,
) -> io::Result<()> {
    let mut cmd = TestCmd::new(OP_TRIGGER_IOPF, 0);
    // trigger_iopf: dev_id u32 @0, pasid u32 @4, grpid u32 @8, perm u32 @12, addr u64 @16
    cmd.set_u32_at(0, dev_id);
    cmd.set_u32_at(4, pasid);
    cmd.set_u32_at(8, grpid);
    cmd.set_u32_at(12, perm);
    cmd.u[2] = addr;
    test_cmd(fd, &mut cmd)
        .map_err(|e| io::Error::new(e.kind(), format!("IOMMU_TEST_OP_TRIGGER_IOPF: {e}")))
}

/// Driver data for a mock nested HWPT ([`crate::Hwpt::alloc_nested`] with
/// [`HWPT_DATA_SELFTEST`]).
pub fn nested_data() -> [u8; 4] {
    IOTLB_DEFAULT.to_le_bytes()
}
