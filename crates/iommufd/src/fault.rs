//! I/O page-fault queues (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11+): how a VMM learns of the
//! page requests a device raised against a HWPT it manages, and answers them.
//!
//! ```text
//!  device DMA ─miss─> IOMMU driver ─iommu_report_device_fault─> HWPT with a fault queue
//!                                                                   │ read(): 40-byte records
//!      VMM: FaultQueue::read_requests ─> decide ─> FaultQueue::respond (8-byte records)
//!                                           └─> the guest (an unrecoverable fault, e.g. on
//!                                               virtio-iommu's event queue)
//! ```
//!
//! Facts from Linux 6.12 `drivers/iommu/iommufd/fault.c` and `include/uapi/linux/iommufd.h`:
//! a read returns whole `struct iommu_hwpt_pgfault` records only (a count that is not a multiple
//! of 40, or a file offset, is `ESPIPE`), and a group is delivered whole or not at all; every
//! record of a group carries the group's cookie, and the response echoes it once, for the
//! record flagged `IOMMU_PGFAULT_FLAGS_LAST_PAGE`. A write takes whole
//! `struct iommu_hwpt_page_response` records; an unknown cookie or code is `EINVAL`. Groups
//! still unanswered when the HWPT is detached or the queue is destroyed are answered
//! `INVALID` by the kernel. `poll` reports `EPOLLIN` while records wait.
//!
//! Linux 6.12 accepts a fault queue only on a nested HWPT ([`Hwpt::alloc_nested`]).
//!
//! [`Hwpt::alloc_nested`]: crate::Hwpt::alloc_nested

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use crate::abi;
use crate::error::{Error, Op};

/// Moved to `objects` with the other iommufd objects; this path is kept for one release.
#[doc(no_inline)]
pub use crate::objects::FaultQueue;

/// Bytes of one fault record.
pub const RECORD_LEN: usize = size_of::<abi::iommu_hwpt_pgfault>();

/// At most this many records are read per [`FaultQueue::read_requests`] call.
pub const MAX_RECORDS_PER_READ: usize = 64;

/// What access a page request asked for (`IOMMU_PGFAULT_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultPerm {
    /// Read.
    pub read: bool,
    /// Write.
    pub write: bool,
    /// Execute Requested (PCIe 10.4.1).
    pub exec: bool,
    /// Privileged Mode Requested (PCIe 10.4.1).
    pub privileged: bool,
}

impl FaultPerm {
    /// Decodes `IOMMU_PGFAULT_PERM_*` bits; `None` if a bit this crate does not know is set.
    pub fn from_bits(bits: u32) -> Option<FaultPerm> {
        let known = abi::IOMMU_PGFAULT_PERM_READ
            | abi::IOMMU_PGFAULT_PERM_WRITE
            | abi::IOMMU_PGFAULT_PERM_EXEC
            | abi::IOMMU_PGFAULT_PERM_PRIV;
        (bits & !known == 0).then_some(FaultPerm {
            read: bits & abi::IOMMU_PGFAULT_PERM_READ != 0,
            write: bits & abi::IOMMU_PGFAULT_PERM_WRITE != 0,
            exec: bits & abi::IOMMU_PGFAULT_PERM_EXEC != 0,
            privileged: bits & abi::IOMMU_PGFAULT_PERM_PRIV != 0,
        })
    }
}

/// One decoded page request record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// The iommufd device id of the requester (from `VFIO_DEVICE_BIND_IOMMUFD`).
    pub dev_id: u32,
    /// The PASID, when the request carried one.
    pub pasid: Option<u32>,
    /// Page Request Group Index.
    pub grpid: u32,
    /// The access asked for.
    pub perm: FaultPerm,
    /// The faulting address.
    pub addr: u64,
    /// How many bytes the requester hinted it wants (0: no hint).
    pub length: u32,
    /// The group's cookie.
    pub cookie: u32,
    /// The last record of its group: the one whose cookie the response echoes.
    pub last_page: bool,
}

/// The answer to a page request group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageResponse {
    /// Handled: the device retries the access (`IOMMUFD_PAGE_RESP_SUCCESS`).
    Success,
    /// Cannot be handled: the device does not retry (`IOMMUFD_PAGE_RESP_INVALID`).
    Invalid,
}

impl PageResponse {
    fn code(self) -> u32 {
        match self {
            PageResponse::Success => abi::IOMMUFD_PAGE_RESP_SUCCESS,
            PageResponse::Invalid => abi::IOMMUFD_PAGE_RESP_INVALID,
        }
    }
}

/// Decodes records read from a fault queue. The kernel returns whole records; anything else
/// (a length that is not a multiple of [`RECORD_LEN`], unknown flag or permission bits, a
/// non-zero reserved field) is refused with a message naming it, never guessed at.
pub fn decode_requests(bytes: &[u8]) -> Result<Vec<PageRequest>, Error> {
    if !bytes.len().is_multiple_of(RECORD_LEN) {
        return Err(Error::invalid(
            Op::FaultRead,
            format!(
                "{} bytes read from a fault queue is not a whole number of {RECORD_LEN}-byte records",
                bytes.len()
            ),
        ));
    }
    let le32 = |r: &[u8], at: usize| u32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
    bytes
        .chunks_exact(RECORD_LEN)
        .enumerate()
        .map(|(i, r)| {
            let flags = le32(r, 0);
            let known = abi::IOMMU_PGFAULT_FLAGS_PASID_VALID | abi::IOMMU_PGFAULT_FLAGS_LAST_PAGE;
            if flags & !known != 0 {
                return Err(Error::invalid(
                    Op::FaultRead,
                    format!("fault record {i}: unknown flags {flags:#x}"),
                ));
            }
            let perm_bits = le32(r, 16);
            let perm = FaultPerm::from_bits(perm_bits).ok_or_else(|| {
                Error::invalid(
                    Op::FaultRead,
                    format!("fault record {i}: unknown permission bits {perm_bits:#x}"),
                )
            })?;
            if le32(r, 20) != 0 {
                return Err(Error::invalid(
                    Op::FaultRead,
                    format!("fault record {i}: reserved field is {:#x}", le32(r, 20)),
                ));
            }
            let mut addr = [0u8; 8];
            addr.copy_from_slice(&r[24..32]);
            Ok(PageRequest {
                dev_id: le32(r, 4),
                pasid: (flags & abi::IOMMU_PGFAULT_FLAGS_PASID_VALID != 0).then(|| le32(r, 8)),
                grpid: le32(r, 12),
                perm,
                addr: u64::from_le_bytes(addr),
                length: le32(r, 32),
                cookie: le32(r, 36),
                last_page: flags & abi::IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0,
            })
        })
        .collect()
}

impl FaultQueue {
    /// Waits up to `timeout` (`None`: no wait) for page requests and reads those waiting, at
    /// most [`MAX_RECORDS_PER_READ`] records. An empty list means none arrived in time.
    pub fn read_requests(&self, timeout: Option<Duration>) -> Result<Vec<PageRequest>, Error> {
        let ms = timeout.map_or(0, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            return Err(Error::kernel(
                Op::FaultRead,
                std::io::Error::last_os_error(),
            ));
        }
        if n == 0 || pfd.revents & libc::POLLIN == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; RECORD_LEN * MAX_RECORDS_PER_READ];
        // SAFETY: `buf` is valid for writes of its length; the fd is open for our borrow.
        let got = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            return Err(Error::kernel(
                Op::FaultRead,
                std::io::Error::last_os_error(),
            ));
        }
        decode_requests(&buf[..got as usize])
    }

    /// Answers the group whose last record carried `cookie`.
    pub fn respond(&self, cookie: u32, response: PageResponse) -> Result<(), Error> {
        let rec = abi::iommu_hwpt_page_response {
            cookie,
            code: response.code(),
        };
        let len = size_of::<abi::iommu_hwpt_page_response>();
        // SAFETY: `rec` is valid for reads of its size; the fd is open for our borrow.
        let put = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&rec as *const abi::iommu_hwpt_page_response).cast(),
                len,
            )
        };
        if put < 0 {
            return Err(Error::kernel(
                Op::FaultRespond,
                std::io::Error::last_os_error(),
            ));
        }
        if put as usize != len {
            return Err(Error::invalid(
                Op::FaultRespond,
                format!("the kernel took {put} of the response's {len} bytes"),
            ));
        }
        Ok(())
    }
}

impl AsFd for FaultQueue {
    /// The queue's file, for an event loop (`EPOLLIN` while requests wait).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(flags: u32, dev: u32, perm: u32, addr: u64, cookie: u32) -> Vec<u8> {
        let r = abi::iommu_hwpt_pgfault {
            flags,
            dev_id: dev,
            pasid: 7,
            grpid: 2,
            perm,
            addr,
            length: 0,
            cookie,
            ..Default::default()
        };
        let mut out = Vec::new();
        for w in [r.flags, r.dev_id, r.pasid, r.grpid, r.perm, r.__reserved] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&r.addr.to_le_bytes());
        out.extend_from_slice(&r.length.to_le_bytes());
        out.extend_from_slice(&r.cookie.to_le_bytes());
        out
    }

    #[test]
    fn decodes_whole_records_and_their_fields() {
        let mut b = record(
            abi::IOMMU_PGFAULT_FLAGS_LAST_PAGE,
            3,
            abi::IOMMU_PGFAULT_PERM_READ | abi::IOMMU_PGFAULT_PERM_WRITE,
            0xdead_b000,
            9,
        );
        b.extend(record(abi::IOMMU_PGFAULT_FLAGS_PASID_VALID, 4, 0, 1, 10));
        let r = decode_requests(&b).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].dev_id, 3);
        assert_eq!(r[0].pasid, None);
        assert!(r[0].last_page && r[0].perm.read && r[0].perm.write && !r[0].perm.exec);
        assert_eq!((r[0].addr, r[0].cookie, r[0].grpid), (0xdead_b000, 9, 2));
        assert_eq!(r[1].pasid, Some(7));
        assert!(!r[1].last_page);
    }

    #[test]
    fn garbage_records_are_refused_by_name() {
        let good = record(abi::IOMMU_PGFAULT_FLAGS_LAST_PAGE, 1, 1, 0, 1);
        assert_eq!(good.len(), RECORD_LEN);
        let e = decode_requests(&good[..39]).unwrap_err().to_string();
        assert!(e.contains("39 bytes"), "{e}");
        let e = decode_requests(&record(1 << 5, 1, 1, 0, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown flags 0x20"), "{e}");
        let e = decode_requests(&record(0, 1, 1 << 9, 0, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("permission bits 0x200"), "{e}");
        let mut reserved = good.clone();
        reserved[20] = 1;
        let e = decode_requests(&reserved).unwrap_err().to_string();
        assert!(e.contains("reserved"), "{e}");
        assert!(decode_requests(&[]).unwrap().is_empty());
    }
}
