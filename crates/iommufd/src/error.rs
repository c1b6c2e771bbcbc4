//! The crate's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The operation that failed, named as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `IOMMU_DESTROY`.
    Destroy,
    /// `IOMMU_IOAS_ALLOC`.
    IoasAlloc,
    /// `IOMMU_IOAS_ALLOW_IOVAS`.
    IoasAllowIovas,
    /// `IOMMU_IOAS_COPY`.
    IoasCopy,
    /// `IOMMU_IOAS_IOVA_RANGES`.
    IoasIovaRanges,
    /// `IOMMU_IOAS_MAP`.
    IoasMap,
    /// `IOMMU_IOAS_MAP_FILE`.
    IoasMapFile,
    /// `IOMMU_IOAS_UNMAP`.
    IoasUnmap,
    /// `IOMMU_OPTION`.
    Option,
    /// `IOMMU_VFIO_IOAS`.
    VfioIoas,
    /// `IOMMU_HWPT_ALLOC`.
    HwptAlloc,
    /// `IOMMU_GET_HW_INFO`.
    GetHwInfo,
    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`.
    HwptSetDirtyTracking,
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP`.
    HwptGetDirtyBitmap,
    /// A device attach done on behalf of automatic domain selection
    /// (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`).
    DeviceAttach,
    /// A [`DirtyBitmap`](crate::DirtyBitmap) operation.
    Bitmap,
    /// `IOMMU_FAULT_QUEUE_ALLOC`.
    FaultQueueAlloc,
    /// A read of page requests from a fault queue.
    FaultRead,
    /// A page response written to a fault queue.
    FaultRespond,
    /// `IOMMU_VIOMMU_ALLOC`.
    ViommuAlloc,
    /// `IOMMU_VDEVICE_ALLOC`.
    VdeviceAlloc,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Destroy => "IOMMU_DESTROY",
            Op::IoasAlloc => "IOMMU_IOAS_ALLOC",
            Op::IoasAllowIovas => "IOMMU_IOAS_ALLOW_IOVAS",
            Op::IoasCopy => "IOMMU_IOAS_COPY",
            Op::IoasIovaRanges => "IOMMU_IOAS_IOVA_RANGES",
            Op::IoasMap => "IOMMU_IOAS_MAP",
            Op::IoasMapFile => "IOMMU_IOAS_MAP_FILE",
            Op::IoasUnmap => "IOMMU_IOAS_UNMAP",
            Op::Option => "IOMMU_OPTION",
            Op::VfioIoas => "IOMMU_VFIO_IOAS",
            Op::HwptAlloc => "IOMMU_HWPT_ALLOC",
            Op::GetHwInfo => "IOMMU_GET_HW_INFO",
            Op::HwptSetDirtyTracking => "IOMMU_HWPT_SET_DIRTY_TRACKING",
            Op::HwptGetDirtyBitmap => "IOMMU_HWPT_GET_DIRTY_BITMAP",
            Op::DeviceAttach => "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            Op::Bitmap => "dirty bitmap",
            Op::FaultQueueAlloc => "IOMMU_FAULT_QUEUE_ALLOC",
            Op::FaultRead => "fault queue read",
            Op::FaultRespond => "fault queue page response",
            Op::ViommuAlloc => "IOMMU_VIOMMU_ALLOC",
            Op::VdeviceAlloc => "IOMMU_VDEVICE_ALLOC",
        })
    }
}

/// What an errno means for an iommufd ioctl (iommufd.h, "General ioctl format"), so callers can
/// act on it without matching raw numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// ENOTTY: the kernel does not know this ioctl at all (e.g. `IOAS_MAP_FILE` before 6.13).
    NotSupported,
    /// E2BIG: the structure has non-zero bytes in a part the kernel does not understand.
    UnknownFields,
    /// EOPNOTSUPP: a known field has a value the kernel does not understand or support (e.g.
    /// `DIRTY_TRACKING` on an IOMMU without it).
    UnsupportedValue,
    /// EINVAL: understood, but a field is not correct (alignment, an incompatible domain...).
    InvalidField,
    /// ENOENT: an ID or IOVA does not exist.
    NotFound,
    /// ENOMEM.
    OutOfMemory,
    /// EOVERFLOW: arithmetic overflowed.
    Overflow,
    /// EBUSY: the object is still in use (e.g. an IOAS with attached devices or HWPTs).
    Busy,
    /// EMSGSIZE: an output array was too small.
    BufferTooSmall,
    /// Any other errno.
    Other(i32),
}

impl Reason {
    /// Classifies an errno.
    pub fn from_errno(errno: i32) -> Reason {
        match errno {
            libc::ENOTTY => Reason::NotSupported,
            libc::E2BIG => Reason::UnknownFields,
            libc::EOPNOTSUPP => Reason::UnsupportedValue,
            libc::EINVAL => Reason::InvalidField,
            libc::ENOENT => Reason::NotFound,
            libc::ENOMEM => Reason::OutOfMemory,
            libc::EOVERFLOW => Reason::Overflow,
            libc::EBUSY => Reason::Busy,
            libc::EMSGSIZE => Reason::BufferTooSmall,
            other => Reason::Other(other),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::NotSupported => "this kernel does not implement the ioctl",
            Reason::UnknownFields => "the kernel does not understand trailing non-zero bytes",
            Reason::UnsupportedValue => "a field has a value the kernel does not support",
            Reason::InvalidField => "a field is not correct",
            Reason::NotFound => "an ID or IOVA does not exist",
            Reason::OutOfMemory => "out of memory",
            Reason::Overflow => "arithmetic overflow",
            Reason::Busy => "the object is in use",
            Reason::BufferTooSmall => "the output buffer is too small",
            Reason::Other(_) => "unexpected error",
        })
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening `/dev/iommu` failed.
    #[error("cannot open {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} failed: {reason}")]
    Kernel {
        /// The ioctl.
        op: Op,
        /// What the errno means for iommufd.
        reason: Reason,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// An argument the kernel would reject, caught before the syscall.
    #[error("{op}: {rule}")]
    InvalidArgument {
        /// The operation.
        op: Op,
        /// The rule that was broken.
        rule: String,
    },
    /// The kernel's hardware info is shorter than its type requires.
    #[error("IOMMU_GET_HW_INFO returned {len} bytes of type {data_type:#x}, which needs {need}")]
    ShortHwInfo {
        /// `out_data_type`.
        data_type: u32,
        /// Bytes returned.
        len: usize,
        /// Bytes the type's structure needs.
        need: usize,
    },
    /// Automatic domain selection could attach the device nowhere; every attempt is listed.
    #[error("device {dev_id} could not be attached: {}", .attempts.join("; "))]
    NoDomain {
        /// The device.
        dev_id: u32,
        /// Each attempt and why it failed.
        attempts: Vec<String>,
        /// The last failure.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    pub(crate) fn kernel(op: Op, source: io::Error) -> Error {
        let reason = Reason::from_errno(source.raw_os_error().unwrap_or(0));
        Error::Kernel { op, reason, source }
    }

    pub(crate) fn invalid(op: Op, rule: impl Into<String>) -> Error {
        Error::InvalidArgument {
            op,
            rule: rule.into(),
        }
    }

    /// The errno behind this error, if the kernel returned one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Open { source, .. } | Error::Kernel { source, .. } => source.raw_os_error(),
            Error::NoDomain { source, .. } => source.errno(),
            _ => None,
        }
    }

    /// The iommufd meaning of the errno, for kernel errors.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Error::Kernel { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_errors_name_the_ioctl_and_the_meaning() {
        let e = Error::kernel(
            Op::HwptAlloc,
            io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        );
        assert_eq!(
            e.to_string(),
            "IOMMU_HWPT_ALLOC failed: a field has a value the kernel does not support"
        );
        assert_eq!(e.reason(), Some(Reason::UnsupportedValue));
        assert_eq!(e.errno(), Some(libc::EOPNOTSUPP));
        for (errno, reason) in [
            (libc::ENOTTY, Reason::NotSupported),
            (libc::E2BIG, Reason::UnknownFields),
            (libc::EINVAL, Reason::InvalidField),
            (libc::ENOENT, Reason::NotFound),
            (libc::ENOMEM, Reason::OutOfMemory),
            (libc::EOVERFLOW, Reason::Overflow),
            (libc::EBUSY, Reason::Busy),
            (libc::EMSGSIZE, Reason::BufferTooSmall),
            (libc::EIO, Reason::Other(libc::EIO)),
        ] {
            assert_eq!(Reason::from_errno(errno), reason);
        }
    }
}
