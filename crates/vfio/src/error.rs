//! The crate's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::fsm::{MigrationFlags, MigrationState};

/// Which VFIO feature a `VFIO_DEVICE_FEATURE` call addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Feature {
    /// `VFIO_DEVICE_FEATURE_MIGRATION`.
    Migration,
    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
    MigDeviceState,
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`.
    MigDataSize,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`.
    DmaLoggingStart,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    DmaLoggingStop,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`.
    DmaLoggingReport,
    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (Linux 7.3).
    MigPrecopyInfoV2,
    /// Any other feature index.
    Other(u32),
}

impl Feature {
    /// The feature index (`VFIO_DEVICE_FEATURE_*`).
    pub fn index(self) -> u32 {
        use crate::abi::*;
        match self {
            Feature::Migration => VFIO_DEVICE_FEATURE_MIGRATION,
            Feature::MigDeviceState => VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            Feature::MigDataSize => VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            Feature::DmaLoggingStart => VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            Feature::DmaLoggingStop => VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            Feature::DmaLoggingReport => VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            Feature::MigPrecopyInfoV2 => VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2,
            Feature::Other(n) => n,
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Feature::Migration => f.write_str("MIGRATION"),
            Feature::MigDeviceState => f.write_str("MIG_DEVICE_STATE"),
            Feature::MigDataSize => f.write_str("MIG_DATA_SIZE"),
            Feature::DmaLoggingStart => f.write_str("DMA_LOGGING_START"),
            Feature::DmaLoggingStop => f.write_str("DMA_LOGGING_STOP"),
            Feature::DmaLoggingReport => f.write_str("DMA_LOGGING_REPORT"),
            Feature::MigPrecopyInfoV2 => f.write_str("MIG_PRECOPY_INFOv2"),
            Feature::Other(n) => write!(f, "feature {n}"),
        }
    }
}

/// GET, SET or PROBE of a `VFIO_DEVICE_FEATURE` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `VFIO_DEVICE_FEATURE_GET`.
    Get,
    /// `VFIO_DEVICE_FEATURE_SET`.
    Set,
    /// `VFIO_DEVICE_FEATURE_PROBE` (possibly with GET and/or SET).
    Probe,
}

/// The operation that failed, named as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `VFIO_DEVICE_FEATURE` with an access mode and a feature.
    Feature(Access, Feature),
    /// `VFIO_DEVICE_BIND_IOMMUFD`.
    BindIommufd,
    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`.
    AttachIommufdPt,
    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT`.
    DetachIommufdPt,
    /// `VFIO_DEVICE_RESET`.
    Reset,
    /// `VFIO_DEVICE_GET_INFO`.
    GetInfo,
    /// `VFIO_DEVICE_GET_REGION_INFO`.
    GetRegionInfo,
    /// `VFIO_MIG_GET_PRECOPY_INFO` on a data fd.
    PrecopyInfo,
    /// pread() of a device region.
    RegionRead,
    /// pwrite() of a device region.
    RegionWrite,
    /// mmap() of a device region.
    RegionMmap,
    /// read() of a migration data fd.
    DataRead,
    /// write() of a migration data fd.
    DataWrite,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Feature(access, feature) => {
                let a = match access {
                    Access::Get => "GET",
                    Access::Set => "SET",
                    Access::Probe => "PROBE",
                };
                write!(f, "VFIO_DEVICE_FEATURE({a} {feature})")
            }
            Op::BindIommufd => f.write_str("VFIO_DEVICE_BIND_IOMMUFD"),
            Op::AttachIommufdPt => f.write_str("VFIO_DEVICE_ATTACH_IOMMUFD_PT"),
            Op::DetachIommufdPt => f.write_str("VFIO_DEVICE_DETACH_IOMMUFD_PT"),
            Op::Reset => f.write_str("VFIO_DEVICE_RESET"),
            Op::GetInfo => f.write_str("VFIO_DEVICE_GET_INFO"),
            Op::GetRegionInfo => f.write_str("VFIO_DEVICE_GET_REGION_INFO"),
            Op::PrecopyInfo => f.write_str("VFIO_MIG_GET_PRECOPY_INFO"),
            Op::RegionRead => f.write_str("region read"),
            Op::RegionWrite => f.write_str("region write"),
            Op::RegionMmap => f.write_str("region mmap"),
            Op::DataRead => f.write_str("migration data read"),
            Op::DataWrite => f.write_str("migration data write"),
        }
    }
}

/// Errors of this crate. Every kernel failure names the ioctl (and feature) and carries the
/// errno as its source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening a VFIO device node failed.
    #[error("cannot open VFIO device {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A PCI device or mdev has no VFIO cdev (not bound to a VFIO driver, or no
    /// `CONFIG_VFIO_DEVICE_CDEV`).
    #[error("{device} has no VFIO character device in {dir}")]
    NoCdev {
        /// The device as the caller named it.
        device: String,
        /// The sysfs directory searched.
        dir: PathBuf,
        /// Why the directory could not be read, if it could not.
        #[source]
        source: Option<io::Error>,
    },
    /// A PCI address that is not `DDDD:BB:DD.F`.
    #[error("invalid PCI address {0:?}: expected DDDD:BB:DD.F in hex, e.g. 0000:3b:00.1")]
    BadPciAddress(String),
    /// An mdev UUID that is not 8-4-4-4-12 hex digits.
    #[error("invalid mdev UUID {0:?}: expected 8-4-4-4-12 hex digits")]
    BadUuid(String),
    /// An ioctl (or read/write) failed.
    #[error("{op} failed")]
    Ioctl {
        /// The operation.
        op: Op,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The kernel (or a stream) reported a migration state value outside
    /// `enum vfio_device_mig_state`.
    #[error("unknown migration state value {0}")]
    UnknownState(u32),
    /// Migration flags without `VFIO_MIGRATION_STOP_COPY`.
    #[error("migration flags {flags:#x} lack STOP_COPY, which every migratable device reports")]
    InvalidFlags {
        /// The raw flags.
        flags: u64,
    },
    /// A state the device's flags do not provide.
    #[error("state {state} needs migration flag {missing}, which the device does not report")]
    StateNotSupported {
        /// The state asked for.
        state: MigrationState,
        /// The missing flag(s).
        missing: MigrationFlags,
    },
    /// A transition the protocol does not permit (STOP_COPY → PRE_COPY or PRE_COPY_P2P),
    /// refused by this crate before the kernel sees it: Linux 6.12 loops forever on it, 7.3.4
    /// answers EINVAL (see [`crate::fsm`]).
    #[error("transition {from} -> {to} is refused by the VFIO migration protocol")]
    Blocked {
        /// Current state.
        from: MigrationState,
        /// Requested state.
        to: MigrationState,
    },
    /// The device is in ERROR; only `VFIO_DEVICE_RESET` leaves it.
    #[error("device is in ERROR and must be reset (VFIO_DEVICE_RESET)")]
    NeedsReset,
    /// ERROR was requested as a target; it can only be entered by a failing arc.
    #[error("ERROR cannot be requested as a migration state")]
    ErrorNotRequestable,
    /// One arc of a (combination) transition failed.
    #[error(
        "arc {from} -> {to} failed on the way to {target}; {}",
        describe_left_in(*.left_in)
    )]
    ArcFailed {
        /// Where the arc started.
        from: MigrationState,
        /// Where the arc was going.
        to: MigrationState,
        /// The transition's final target.
        target: MigrationState,
        /// The state read back from the device after the failure; `None` if it could not be read.
        left_in: Option<MigrationState>,
        /// The failure of the arc itself.
        #[source]
        source: Box<Error>,
    },
    /// An argument the kernel would reject, caught before the syscall.
    #[error("{op}: {rule}")]
    InvalidArgument {
        /// The operation.
        op: Op,
        /// The rule that was broken.
        rule: String,
    },
    /// The data fd returned ENOMSG ("no data for now") outside PRE_COPY, which vfio.h forbids.
    #[error("migration data fd returned ENOMSG during STOP_COPY, which vfio.h does not allow")]
    UnexpectedEnomsg,
    /// The caller's writer failed while saved device state was copied into it.
    #[error("writing saved device state to the sink failed")]
    Sink {
        /// The writer's error.
        #[source]
        source: io::Error,
    },
    /// The caller's reader failed while device state was copied from it into RESUMING.
    #[error("reading device state from the source failed")]
    Source {
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// A device implemented in software (the `sim` feature's device, a model, a vCPU state
    /// record) refused the data it was given.
    #[error("invalid device state: {0}")]
    InvalidDeviceState(String),
}

fn describe_left_in(left: Option<MigrationState>) -> String {
    match left {
        Some(MigrationState::Error) => "device left in ERROR (reset required)".to_string(),
        Some(s) => format!("device left in {s}"),
        None => "device state could not be read back".to_string(),
    }
}

impl Error {
    pub(crate) fn ioctl(op: Op, source: io::Error) -> Error {
        Error::Ioctl { op, source }
    }

    /// The errno behind this error, if it came from the kernel (directly or via a failed arc).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Ioctl { source, .. } | Error::Open { source, .. } => source.raw_os_error(),
            Error::ArcFailed { source, .. } => source.errno(),
            _ => None,
        }
    }

    /// The device or kernel does not implement the operation at all (ENOTTY), e.g. a device
    /// without migration support, or DMA logging on a device without a tracker.
    pub fn is_unsupported(&self) -> bool {
        self.errno() == Some(libc::ENOTTY)
    }

    /// The failure left the device in ERROR: only [`reset`](crate::MigrationDevice::reset)
    /// recovers it.
    pub fn needs_reset(&self) -> bool {
        matches!(
            self,
            Error::NeedsReset
                | Error::ArcFailed {
                    left_in: Some(MigrationState::Error),
                    ..
                }
        )
    }
}

/// The kernel's errno where there is one (so callers such as iommufd's auto-domain attach can
/// match it), otherwise the error as text.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        match e.errno() {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::other(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_ioctl_and_feature_once() {
        let e = Error::ioctl(
            Op::Feature(Access::Set, Feature::MigDeviceState),
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert_eq!(
            e.to_string(),
            "VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE) failed"
        );
        assert_eq!(e.errno(), Some(libc::EINVAL));
        let arc = Error::ArcFailed {
            from: MigrationState::Running,
            to: MigrationState::RunningP2p,
            target: MigrationState::StopCopy,
            left_in: Some(MigrationState::Error),
            source: Box::new(e),
        };
        assert_eq!(
            arc.to_string(),
            "arc RUNNING -> RUNNING_P2P failed on the way to STOP_COPY; device left in ERROR (reset required)"
        );
        assert!(arc.needs_reset());
        assert_eq!(arc.errno(), Some(libc::EINVAL));
        let unsupported = Error::ioctl(
            Op::Feature(Access::Get, Feature::Migration),
            io::Error::from_raw_os_error(libc::ENOTTY),
        );
        assert!(unsupported.is_unsupported());
        assert_eq!(
            Op::Feature(Access::Probe, Feature::Other(42)).to_string(),
            "VFIO_DEVICE_FEATURE(PROBE feature 42)"
        );
    }
}
