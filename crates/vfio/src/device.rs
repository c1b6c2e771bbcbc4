//! A VFIO device opened through its character device (`/dev/vfio/devices/vfioN`).
//!
//! The cdev interface (Linux 6.6+, `CONFIG_VFIO_DEVICE_CDEV`) is the one iommufd uses: open the
//! node, `VFIO_DEVICE_BIND_IOMMUFD` to an iommufd (which returns the device id iommufd knows it
//! by), then `VFIO_DEVICE_ATTACH_IOMMUFD_PT` to an IOAS or HWPT. Nothing else works on the device
//! before the bind (vfio.h). sysfs links each VFIO device to its node:
//! `/sys/bus/pci/devices/<DDDD:BB:DD.F>/vfio-dev/vfioN` and
//! `/sys/bus/mdev/devices/<uuid>/vfio-dev/vfioN`.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::abi;
use crate::data::DataFile;
use crate::dma_log::{self, DmaLogger, DmaRange};
use crate::error::{Access, Error, Feature, Op};
use crate::fsm::{MigrationFlags, MigrationState};
use crate::migration::{MigrationDevice, PrecopyInfoV2};
use crate::sys;

/// Where to look for VFIO device nodes: the sysfs and /dev roots (overridable for tests and
/// containers that mount them elsewhere).
#[derive(Debug, Clone)]
pub struct DeviceLocator {
    sysfs: PathBuf,
    dev: PathBuf,
}

impl Default for DeviceLocator {
    fn default() -> Self {
        DeviceLocator {
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

impl DeviceLocator {
    /// A locator with custom roots for `/sys` and `/dev`.
    pub fn new(sysfs: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> DeviceLocator {
        DeviceLocator {
            sysfs: sysfs.into(),
            dev: dev.into(),
        }
    }

    /// The cdev node of a PCI device bound to a VFIO driver. `addr` is `DDDD:BB:DD.F` (or
    /// `BB:DD.F`, domain 0), hex, either case.
    pub fn pci_cdev(&self, addr: &str) -> Result<PathBuf, Error> {
        let addr = normalize_pci_address(addr)?;
        let dir = self
            .sysfs
            .join("bus/pci/devices")
            .join(&addr)
            .join("vfio-dev");
        self.cdev_in(&dir, &addr)
    }

    /// The cdev node of a mediated device (e.g. an mtty instance).
    pub fn mdev_cdev(&self, uuid: &str) -> Result<PathBuf, Error> {
        let uuid = normalize_uuid(uuid)?;
        let dir = self
            .sysfs
            .join("bus/mdev/devices")
            .join(&uuid)
            .join("vfio-dev");
        self.cdev_in(&dir, &uuid)
    }

    fn cdev_in(&self, dir: &Path, device: &str) -> Result<PathBuf, Error> {
        let no_cdev = |source| Error::NoCdev {
            device: device.to_string(),
            dir: dir.to_path_buf(),
            source,
        };
        let entries = fs::read_dir(dir).map_err(|e| no_cdev(Some(e)))?;
        for entry in entries {
            let entry = entry.map_err(|e| no_cdev(Some(e)))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = name.strip_prefix("vfio")
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
            {
                return Ok(self.dev.join("vfio/devices").join(name));
            }
        }
        Err(no_cdev(None))
    }
}

/// Checks and canonicalises a PCI address to `dddd:bb:dd.f` (lower-case hex).
pub fn normalize_pci_address(addr: &str) -> Result<String, Error> {
    let bad = || Error::BadPciAddress(addr.to_string());
    let parts: Vec<&str> = addr.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (*d, *b, *df),
        [b, df] => ("0000", *b, *df),
        _ => return Err(bad()),
    };
    let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str, max_len: usize| -> Result<u32, Error> {
        if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        u32::from_str_radix(s, 16).map_err(|_| bad())
    };
    let domain = hex(domain, 8)?;
    let bus = hex(bus, 2)?;
    let dev = hex(dev, 2)?;
    let func = hex(func, 1)?;
    if dev > 0x1f || func > 7 {
        return Err(bad());
    }
    Ok(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// Checks and canonicalises an mdev UUID to lower case.
pub fn normalize_uuid(uuid: &str) -> Result<String, Error> {
    let groups: Vec<&str> = uuid.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(uuid.to_ascii_lowercase())
    } else {
        Err(Error::BadUuid(uuid.to_string()))
    }
}

/// `VFIO_DEVICE_GET_INFO`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Raw `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions (highest index + 1).
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// The device supports `VFIO_DEVICE_RESET`.
    pub fn can_reset(&self) -> bool {
        self.flags & abi::VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// A PCI device (vfio-pci, or a PCI-flavoured mdev such as mtty).
    pub fn is_pci(&self) -> bool {
        self.flags & abi::VFIO_DEVICE_FLAGS_PCI != 0
    }
}

/// `VFIO_DEVICE_GET_REGION_INFO`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index (for PCI: BAR0..BAR5 = 0..5, ROM = 6, config space = 7).
    pub index: u32,
    /// Raw `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes; 0 for an unimplemented region.
    pub size: u64,
    /// Offset of the region within the device fd.
    pub offset: u64,
}

impl RegionInfo {
    /// The region can be read with pread.
    pub fn readable(&self) -> bool {
        self.flags & abi::VFIO_REGION_INFO_FLAG_READ != 0
    }
    /// The region can be written with pwrite.
    pub fn writable(&self) -> bool {
        self.flags & abi::VFIO_REGION_INFO_FLAG_WRITE != 0
    }
    /// The region (or parts of it) can be mmapped.
    pub fn mappable(&self) -> bool {
        self.flags & abi::VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 { page as u64 } else { 4096 }
}

/// A mapping of (part of) a device region, unmapped on drop; it cannot outlive its device.
///
/// The memory is device memory (for BARs: registers): access it with volatile reads and writes
/// of the width the device expects, never as ordinary memory.
#[derive(Debug)]
pub struct MappedRegion<'a> {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    index: u32,
    offset: u64,
    _device: std::marker::PhantomData<&'a VfioDevice>,
}

impl MappedRegion<'_> {
    /// Start of the mapping.
    pub fn as_ptr(&self) -> std::ptr::NonNull<u8> {
        self.ptr
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a mapping is at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region index.
    pub fn region(&self) -> u32 {
        self.index
    }

    /// Offset of the mapping within the region.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Drop for MappedRegion<'_> {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the mapping `map_region` made; the borrow of `self` ends
        // here, so nothing can use it any more.
        unsafe { sys::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A VFIO device fd from the cdev interface.
#[derive(Debug)]
pub struct VfioDevice {
    fd: OwnedFd,
    path: Option<PathBuf>,
    flags: OnceLock<MigrationFlags>,
    dma_log_max_ranges: usize,
    /// Opted in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (the kernel clears it on close, so
    /// it lives as long as this fd).
    precopy_v2: bool,
}

/// The core's guaranteed DMA-logging range budget: one kernel page of 16-byte ranges
/// (`LOG_MAX_RANGES`, vfio_main.c).
fn kernel_log_max_ranges() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if page > 0 { page as usize } else { 4096 };
    page / core::mem::size_of::<abi::vfio_device_feature_dma_logging_range>()
}

impl VfioDevice {
    /// Opens a cdev node such as `/dev/vfio/devices/vfio0`.
    pub fn open(path: impl AsRef<Path>) -> Result<VfioDevice, Error> {
        let path = path.as_ref();
        let fd = sys::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut dev = VfioDevice::from_fd(fd);
        dev.path = Some(path.to_path_buf());
        Ok(dev)
    }

    /// Opens the cdev of a PCI device bound to vfio-pci (or a variant driver).
    pub fn open_pci(addr: &str) -> Result<VfioDevice, Error> {
        VfioDevice::open(DeviceLocator::default().pci_cdev(addr)?)
    }

    /// Opens the cdev of a mediated device by UUID.
    pub fn open_mdev(uuid: &str) -> Result<VfioDevice, Error> {
        VfioDevice::open(DeviceLocator::default().mdev_cdev(uuid)?)
    }

    /// Wraps a device fd passed in by an orchestrator. It must be a VFIO cdev fd.
    pub fn from_fd(fd: OwnedFd) -> VfioDevice {
        VfioDevice {
            fd,
            path: None,
            flags: OnceLock::new(),
            dma_log_max_ranges: kernel_log_max_ranges(),
            precopy_v2: false,
        }
    }

    /// The node this device was opened from, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Lowers the DMA-logging range budget below the kernel's `PAGE_SIZE / 16` (for drivers
    /// known to track fewer ranges).
    pub fn set_dma_logging_max_ranges(&mut self, max: usize) {
        self.dma_log_max_ranges = max.clamp(1, kernel_log_max_ranges());
    }

    /// # Safety
    /// `arg` must be valid for the structure `request` takes.
    unsafe fn ioctl_raw<T>(&self, op: Op, request: u64, arg: &mut T) -> Result<i32, Error> {
        // SAFETY: `arg` is a live, exclusive reference; the caller guarantees the layout.
        unsafe { sys::ioctl(self.fd.as_fd(), request, (arg as *mut T).cast()) }
            .map_err(|e| Error::ioctl(op, e))
    }

    /// One `VFIO_DEVICE_FEATURE` call with payload `data`; returns the payload as the kernel left
    /// it.
    ///
    /// # Safety
    /// `T` must be the payload layout of `feature`, and any user pointers inside it valid for
    /// what the kernel does with them.
    unsafe fn feature<T>(
        &self,
        access: Access,
        feature: Feature,
        op_flags: u32,
        data: T,
    ) -> Result<T, Error> {
        let mut arg = abi::FeatureArg::new(feature.index(), op_flags, data);
        // SAFETY: `arg` is a header followed by the payload, argsz covering both; the payload
        // layout is the caller's guarantee.
        unsafe {
            self.ioctl_raw(
                Op::Feature(access, feature),
                abi::VFIO_DEVICE_FEATURE,
                &mut arg,
            )
        }?;
        Ok(arg.data)
    }

    /// `VFIO_DEVICE_FEATURE_PROBE`: whether `feature` supports the GET and/or SET asked for.
    /// ENOTTY (no such feature) and EINVAL (access mode not supported) answer `false`.
    pub fn probe_feature(&self, feature: Feature, get: bool, set: bool) -> Result<bool, Error> {
        let mut flags = abi::VFIO_DEVICE_FEATURE_PROBE;
        if get {
            flags |= abi::VFIO_DEVICE_FEATURE_GET;
        }
        if set {
            flags |= abi::VFIO_DEVICE_FEATURE_SET;
        }
        // SAFETY: a probe carries no payload.
        match unsafe { self.feature(Access::Probe, feature, flags, ()) } {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.errno(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `VFIO_DEVICE_BIND_IOMMUFD`: binds this device to `iommufd`; returns the iommufd device id.
    pub fn bind_iommufd(&self, iommufd: BorrowedFd<'_>) -> Result<u32, Error> {
        let mut arg = abi::vfio_device_bind_iommufd {
            argsz: core::mem::size_of::<abi::vfio_device_bind_iommufd>() as u32,
            flags: 0,
            iommufd: iommufd.as_raw_fd(),
            out_devid: 0,
        };
        // SAFETY: `arg` is a vfio_device_bind_iommufd with argsz set.
        unsafe { self.ioctl_raw(Op::BindIommufd, abi::VFIO_DEVICE_BIND_IOMMUFD, &mut arg) }?;
        Ok(arg.out_devid)
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: attaches to an IOAS or HWPT; returns the id the kernel
    /// reports back (the IOAS id, or the HWPT actually attached).
    pub fn attach_pt(&self, pt_id: u32) -> Result<u32, Error> {
        let mut arg = abi::vfio_device_attach_iommufd_pt {
            argsz: core::mem::size_of::<abi::vfio_device_attach_iommufd_pt>() as u32,
            flags: 0,
            pt_id,
        };
        // SAFETY: `arg` is a vfio_device_attach_iommufd_pt with argsz set.
        unsafe {
            self.ioctl_raw(
                Op::AttachIommufdPt,
                abi::VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                &mut arg,
            )
        }?;
        Ok(arg.pt_id)
    }

    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT`: detaches; the device is left blocking DMA.
    pub fn detach_pt(&self) -> Result<(), Error> {
        let mut arg = abi::vfio_device_detach_iommufd_pt {
            argsz: core::mem::size_of::<abi::vfio_device_detach_iommufd_pt>() as u32,
            flags: 0,
        };
        // SAFETY: `arg` is a vfio_device_detach_iommufd_pt with argsz set.
        unsafe {
            self.ioctl_raw(
                Op::DetachIommufdPt,
                abi::VFIO_DEVICE_DETACH_IOMMUFD_PT,
                &mut arg,
            )
        }?;
        Ok(())
    }

    /// `VFIO_DEVICE_GET_INFO`.
    pub fn info(&self) -> Result<DeviceInfo, Error> {
        let mut arg = abi::vfio_device_info {
            argsz: core::mem::size_of::<abi::vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `arg` is a vfio_device_info with argsz set.
        unsafe { self.ioctl_raw(Op::GetInfo, abi::VFIO_DEVICE_GET_INFO, &mut arg) }?;
        Ok(DeviceInfo {
            flags: arg.flags,
            num_regions: arg.num_regions,
            num_irqs: arg.num_irqs,
        })
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Error> {
        let mut arg = abi::vfio_region_info {
            argsz: core::mem::size_of::<abi::vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: `arg` is a vfio_region_info with argsz set.
        unsafe {
            self.ioctl_raw(
                Op::GetRegionInfo,
                abi::VFIO_DEVICE_GET_REGION_INFO,
                &mut arg,
            )
        }?;
        Ok(RegionInfo {
            index,
            flags: arg.flags,
            size: arg.size,
            offset: arg.offset,
        })
    }

    fn check_region_access(
        region: &RegionInfo,
        offset: u64,
        len: usize,
        op: Op,
    ) -> Result<u64, Error> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > region.size) {
            return Err(Error::InvalidArgument {
                op,
                rule: format!(
                    "{len} bytes at {offset:#x} exceed region {} of {:#x} bytes",
                    region.index, region.size
                ),
            });
        }
        region
            .offset
            .checked_add(offset)
            .ok_or(Error::InvalidArgument {
                op,
                rule: "region offset overflows".into(),
            })
    }

    /// Reads `buf.len()` bytes at `offset` within `region` (pread on the device fd).
    pub fn read_region(
        &self,
        region: &RegionInfo,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Error> {
        let mut pos = Self::check_region_access(region, offset, buf.len(), Op::RegionRead)?;
        let mut done = 0;
        while done < buf.len() {
            match sys::pread(self.fd.as_fd(), &mut buf[done..], pos) {
                Ok(0) => {
                    return Err(Error::ioctl(
                        Op::RegionRead,
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Ok(n) => {
                    done += n;
                    pos += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::ioctl(Op::RegionRead, e)),
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset` within `region` (pwrite on the device fd).
    pub fn write_region(&self, region: &RegionInfo, offset: u64, buf: &[u8]) -> Result<(), Error> {
        let mut pos = Self::check_region_access(region, offset, buf.len(), Op::RegionWrite)?;
        let mut done = 0;
        while done < buf.len() {
            match sys::pwrite(self.fd.as_fd(), &buf[done..], pos) {
                Ok(0) => {
                    return Err(Error::ioctl(
                        Op::RegionWrite,
                        std::io::ErrorKind::WriteZero.into(),
                    ));
                }
                Ok(n) => {
                    done += n;
                    pos += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::ioctl(Op::RegionWrite, e)),
            }
        }
        Ok(())
    }

    /// Maps `len` bytes at `offset` within `region` (mmap of the device fd, shared, read and
    /// write): how BAR registers are reached without a syscall per access. The region must report
    /// `VFIO_REGION_INFO_FLAG_MMAP`; `offset` and `len` must be page-aligned and inside it. Drivers
    /// may restrict mmap to parts of a region (sparse mmap areas); the kernel refuses the rest
    /// with EINVAL, reported here as a failed [`Op::RegionMmap`].
    pub fn map_region(
        &self,
        region: &RegionInfo,
        offset: u64,
        len: usize,
    ) -> Result<MappedRegion<'_>, Error> {
        let op = Op::RegionMmap;
        if !region.mappable() {
            return Err(Error::InvalidArgument {
                op,
                rule: format!("region {} cannot be mmapped", region.index),
            });
        }
        let page = page_size();
        if len == 0 || !offset.is_multiple_of(page) || !(len as u64).is_multiple_of(page) {
            return Err(Error::InvalidArgument {
                op,
                rule: format!(
                    "offset {offset:#x} and length {len:#x} must be non-zero multiples of the {page:#x}-byte page"
                ),
            });
        }
        let at = Self::check_region_access(region, offset, len, op)?;
        let ptr = sys::mmap(self.fd.as_fd(), len, at).map_err(|e| Error::ioctl(op, e))?;
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>()).ok_or(Error::InvalidArgument {
            op,
            rule: "mmap returned NULL".into(),
        })?;
        Ok(MappedRegion {
            ptr,
            len,
            index: region.index,
            offset,
            _device: std::marker::PhantomData,
        })
    }

    /// Whether the device supports migration at all (`VFIO_DEVICE_FEATURE_MIGRATION` probe).
    pub fn supports_migration(&self) -> Result<bool, Error> {
        self.probe_feature(Feature::Migration, true, false)
    }

    /// Whether the device has a DMA-logging tracker (`DMA_LOGGING_START` probe with SET).
    pub fn supports_dma_logging(&self) -> Result<bool, Error> {
        self.probe_feature(Feature::DmaLoggingStart, false, true)
    }
}

impl AsFd for VfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for VfioDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl MigrationDevice for VfioDevice {
    type Data = DataFile;

    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` SET. ENOTTY (Linux 6.12: no such feature) and
    /// EINVAL (a device without PRE_COPY, 7.3.4 vfio_main.c line 1015) are "not supported";
    /// so is any other errno, with the errno named: an opt-in the kernel did not confirm is
    /// never assumed.
    fn enable_precopy_info_v2(&mut self) -> Result<PrecopyInfoV2, Error> {
        // SAFETY: the feature has no payload (7.3.4 vfio_main.c line 1017: argsz 0).
        match unsafe {
            self.feature(
                Access::Set,
                Feature::MigPrecopyInfoV2,
                abi::VFIO_DEVICE_FEATURE_SET,
                (),
            )
        } {
            Ok(()) => {
                self.precopy_v2 = true;
                Ok(PrecopyInfoV2::Enabled)
            }
            Err(e) => Ok(PrecopyInfoV2::NotSupported(match e.errno() {
                Some(libc::ENOTTY) => "the kernel has no VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 \
                                       (ENOTTY; Linux 7.3 has it)"
                    .into(),
                Some(libc::EINVAL) => {
                    "the kernel refused the opt-in (EINVAL: the device has no PRE_COPY)".into()
                }
                _ => format!("the kernel answered the opt-in unexpectedly: {e}"),
            })),
        }
    }

    /// Read once and cached: a device's migration flags never change.
    fn migration_flags(&self) -> Result<MigrationFlags, Error> {
        if let Some(f) = self.flags.get() {
            return Ok(*f);
        }
        // SAFETY: MIGRATION's payload is vfio_device_feature_migration.
        let mig = unsafe {
            self.feature(
                Access::Get,
                Feature::Migration,
                abi::VFIO_DEVICE_FEATURE_GET,
                abi::vfio_device_feature_migration::default(),
            )
        }?;
        let flags = MigrationFlags::from_bits_retain(mig.flags).validate()?;
        Ok(*self.flags.get_or_init(|| flags))
    }

    fn migration_state(&self) -> Result<MigrationState, Error> {
        // SAFETY: MIG_DEVICE_STATE's payload is vfio_device_feature_mig_state.
        let st = unsafe {
            self.feature(
                Access::Get,
                Feature::MigDeviceState,
                abi::VFIO_DEVICE_FEATURE_GET,
                abi::vfio_device_feature_mig_state {
                    device_state: 0,
                    data_fd: -1,
                },
            )
        }?;
        MigrationState::try_from(st.device_state)
    }

    /// One `MIG_DEVICE_STATE` SET.
    ///
    /// A request for PRE_COPY or PRE_COPY_P2P first reads the current state and refuses it
    /// from STOP_COPY ([`Error::Blocked`]) without calling the kernel: Linux 6.12 (checked in
    /// 6.12.95, `drivers/vfio/vfio_main.c` lines 778-779, 829, 848-850) spins forever in
    /// `vfio_mig_get_next_state()` on that blocked arc, holding the driver's state mutex (the
    /// skip loop never leaves ERROR). 7.3.4 returns EINVAL instead (lines 891-896); the fix was
    /// posted as "vfio: prevent infinite loop in vfio_mig_get_next_state() on blocked arc"
    /// (2026-06-02, `Fixes: 4db52602a607`) and applied for v7.2; its commit hash is unverified
    /// here. See [`crate::fsm`].
    fn set_migration_state(&mut self, target: MigrationState) -> Result<Option<DataFile>, Error> {
        if target == MigrationState::Error {
            return Err(Error::ErrorNotRequestable);
        }
        if matches!(target, MigrationState::PreCopy | MigrationState::PreCopyP2p) {
            let cur = self.migration_state()?;
            if cur == MigrationState::StopCopy {
                return Err(Error::Blocked {
                    from: cur,
                    to: target,
                });
            }
        }
        // SAFETY: MIG_DEVICE_STATE's payload is vfio_device_feature_mig_state.
        let st = unsafe {
            self.feature(
                Access::Set,
                Feature::MigDeviceState,
                abi::VFIO_DEVICE_FEATURE_SET,
                abi::vfio_device_feature_mig_state {
                    device_state: target.into(),
                    data_fd: -1,
                },
            )
        }?;
        if st.data_fd < 0 {
            return Ok(None);
        }
        // SAFETY: on success the kernel installed `data_fd` in our fd table for us to own
        // (vfio_ioct_mig_return_fd); nothing else refers to it.
        let fd = unsafe { OwnedFd::from_raw_fd(st.data_fd) };
        Ok(Some(
            DataFile::from_fd(fd).with_precopy_info_v2(self.precopy_v2),
        ))
    }

    fn stop_copy_size(&self) -> Result<u64, Error> {
        // SAFETY: MIG_DATA_SIZE's payload is vfio_device_feature_mig_data_size.
        let sz = unsafe {
            self.feature(
                Access::Get,
                Feature::MigDataSize,
                abi::VFIO_DEVICE_FEATURE_GET,
                abi::vfio_device_feature_mig_data_size::default(),
            )
        }?;
        Ok(sz.stop_copy_length)
    }

    fn reset(&mut self) -> Result<(), Error> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the kernel ignores the pointer.
        unsafe {
            sys::ioctl(
                self.fd.as_fd(),
                abi::VFIO_DEVICE_RESET,
                core::ptr::null_mut(),
            )
        }
        .map_err(|e| Error::ioctl(Op::Reset, e))?;
        Ok(())
    }
}

impl DmaLogger for VfioDevice {
    fn dma_logging_max_ranges(&self) -> usize {
        self.dma_log_max_ranges
    }

    fn dma_logging_start_raw(&mut self, page_size: u64, ranges: &[DmaRange]) -> Result<u64, Error> {
        let raw: Vec<abi::vfio_device_feature_dma_logging_range> = ranges
            .iter()
            .map(|r| abi::vfio_device_feature_dma_logging_range {
                iova: r.iova,
                length: r.length,
            })
            .collect();
        let num_ranges = u32::try_from(raw.len()).map_err(|_| Error::InvalidArgument {
            op: Op::Feature(Access::Set, Feature::DmaLoggingStart),
            rule: "too many ranges".into(),
        })?;
        // SAFETY: DMA_LOGGING_START's payload is the control structure; `ranges` points to
        // `num_ranges` range structures that outlive the call.
        let ctl = unsafe {
            self.feature(
                Access::Set,
                Feature::DmaLoggingStart,
                abi::VFIO_DEVICE_FEATURE_SET,
                abi::vfio_device_feature_dma_logging_control {
                    page_size,
                    num_ranges,
                    __reserved: 0,
                    ranges: raw.as_ptr() as u64,
                },
            )
        }?;
        Ok(ctl.page_size)
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), Error> {
        dma_log::check_report(iova, length, page_size, bitmap)?;
        // SAFETY: DMA_LOGGING_REPORT's payload is the report structure; `bitmap` is writable
        // for at least the words the range needs (checked above) for the whole call.
        unsafe {
            self.feature(
                Access::Get,
                Feature::DmaLoggingReport,
                abi::VFIO_DEVICE_FEATURE_GET,
                abi::vfio_device_feature_dma_logging_report {
                    iova,
                    length,
                    page_size,
                    bitmap: bitmap.as_mut_ptr() as u64,
                },
            )
        }?;
        Ok(())
    }

    fn dma_logging_stop(&mut self) -> Result<(), Error> {
        // SAFETY: DMA_LOGGING_STOP takes no payload.
        unsafe {
            self.feature(
                Access::Set,
                Feature::DmaLoggingStop,
                abi::VFIO_DEVICE_FEATURE_SET,
                (),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataChannel, save_stop_copy};
    use crate::fsm;
    use crate::sys::fake;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::io::{Seek, SeekFrom, Write};
    use std::rc::Rc;

    /// A fake VFIO cdev: validates arguments as vfio_main.c does and runs the FSM.
    struct FakeVfio {
        flags: u64,
        state: MigrationState,
        raw_state: Option<u32>,
        fail_arc: Option<(MigrationState, MigrationState, i32, bool)>,
        enotty: Vec<u32>,
        dev_fd: Option<RawFd>,
        data_fds: HashMap<RawFd, File>,
        region: Vec<u8>,
        log_limit: usize,
        log_ranges: Vec<DmaRange>,
        calls: Rc<RefCell<Vec<String>>>,
        /// Opted in to PRECOPY_INFOv2 (as 7.3.4 vfio_main.c line 1021).
        precopy_v2: bool,
    }

    use std::fs::File;

    impl FakeVfio {
        fn new(flags: u64) -> (FakeVfio, Rc<RefCell<Vec<String>>>) {
            let calls = Rc::new(RefCell::new(Vec::new()));
            (
                FakeVfio {
                    flags,
                    state: MigrationState::Running,
                    raw_state: None,
                    fail_arc: None,
                    enotty: Vec::new(),
                    dev_fd: None,
                    data_fds: HashMap::new(),
                    region: (0..=255u8).collect(),
                    log_limit: 256,
                    log_ranges: Vec::new(),
                    calls: Rc::clone(&calls),
                    precopy_v2: false,
                },
                calls,
            )
        }

        fn new_data_fd(&mut self, content: &[u8]) -> RawFd {
            let fd = fake::memfd();
            let mut f = File::from(fd);
            f.write_all(content).unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            let raw = f.try_clone().unwrap();
            let raw_fd = OwnedFd::from(raw).into_raw_fd_for_test();
            self.data_fds.insert(raw_fd, f);
            raw_fd
        }

        /// # Safety
        /// `arg` points to a vfio_device_feature header followed by `argsz - 8` bytes.
        unsafe fn feature(&mut self, arg: *mut c_void) -> std::io::Result<i32> {
            let einval = Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            // SAFETY: the caller passes a header at `arg`.
            let hdr = unsafe { *(arg as *const abi::vfio_device_feature) };
            let feature = hdr.flags & abi::VFIO_DEVICE_FEATURE_MASK;
            let get = hdr.flags & abi::VFIO_DEVICE_FEATURE_GET != 0;
            let set = hdr.flags & abi::VFIO_DEVICE_FEATURE_SET != 0;
            let probe = hdr.flags & abi::VFIO_DEVICE_FEATURE_PROBE != 0;
            let known = abi::VFIO_DEVICE_FEATURE_MASK
                | abi::VFIO_DEVICE_FEATURE_GET
                | abi::VFIO_DEVICE_FEATURE_SET
                | abi::VFIO_DEVICE_FEATURE_PROBE;
            if hdr.argsz < 8 || hdr.flags & !known != 0 || (!probe && get && set) {
                return einval;
            }
            self.calls.borrow_mut().push(format!(
                "FEATURE {feature} {}{}{}",
                if get { "G" } else { "" },
                if set { "S" } else { "" },
                if probe { "P" } else { "" }
            ));
            if self.enotty.contains(&feature) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOTTY));
            }
            if probe {
                return Ok(0);
            }
            // SAFETY: the payload follows the 8-byte header.
            let payload = unsafe { (arg as *mut u8).add(8) };
            let len = hdr.argsz as usize - 8;
            match feature {
                abi::VFIO_DEVICE_FEATURE_MIGRATION if get && len >= 8 => {
                    // SAFETY: argsz covers the 8-byte payload.
                    unsafe { *(payload as *mut u64) = self.flags };
                    Ok(0)
                }
                abi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if len >= 8 => {
                    let p = payload as *mut abi::vfio_device_feature_mig_state;
                    if get {
                        let v = self.raw_state.unwrap_or(self.state as u32);
                        // SAFETY: argsz covers the payload.
                        unsafe {
                            *p = abi::vfio_device_feature_mig_state {
                                device_state: v,
                                data_fd: -1,
                            }
                        };
                        return Ok(0);
                    }
                    // SAFETY: argsz covers the payload.
                    let want = unsafe { (*p).device_state };
                    let Ok(target) = MigrationState::try_from(want) else {
                        return einval;
                    };
                    let flags = MigrationFlags::from_bits_retain(self.flags);
                    let mut fd = -1;
                    while self.state != target {
                        let Ok(step) = fsm::next_step(self.state, target, flags) else {
                            return einval;
                        };
                        if let Some((a, b, errno, to_err)) = self.fail_arc
                            && (a, b) == (self.state, step)
                        {
                            if to_err {
                                self.state = MigrationState::Error;
                            }
                            // SAFETY: argsz covers the payload.
                            unsafe { (*p).data_fd = -1 };
                            return Err(std::io::Error::from_raw_os_error(errno));
                        }
                        if matches!(
                            step,
                            MigrationState::StopCopy
                                | MigrationState::PreCopy
                                | MigrationState::PreCopyP2p
                                | MigrationState::Resuming
                        ) && !self.state.is_saving()
                        {
                            fd = self.new_data_fd(b"mtty-like device state");
                        }
                        self.state = step;
                    }
                    // SAFETY: argsz covers the payload.
                    unsafe { (*p).data_fd = fd };
                    Ok(0)
                }
                abi::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE if get && len >= 8 => {
                    // SAFETY: argsz covers the payload.
                    unsafe { *(payload as *mut u64) = 96 };
                    Ok(0)
                }
                abi::VFIO_DEVICE_FEATURE_DMA_LOGGING_START if set && len >= 24 => {
                    // SAFETY: argsz covers the control structure.
                    let ctl = unsafe {
                        &mut *(payload as *mut abi::vfio_device_feature_dma_logging_control)
                    };
                    if ctl.num_ranges as usize > self.log_limit {
                        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
                    }
                    // SAFETY: the caller's `ranges` points to `num_ranges` entries.
                    let ranges = unsafe {
                        std::slice::from_raw_parts(
                            ctl.ranges as *const abi::vfio_device_feature_dma_logging_range,
                            ctl.num_ranges as usize,
                        )
                    };
                    self.log_ranges = ranges
                        .iter()
                        .map(|r| DmaRange::new(r.iova, r.length))
                        .collect();
                    ctl.page_size = ctl.page_size.max(8192);
                    Ok(0)
                }
                abi::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT if get && len >= 32 => {
                    // SAFETY: argsz covers the report structure.
                    let rep =
                        unsafe { *(payload as *const abi::vfio_device_feature_dma_logging_report) };
                    // SAFETY: the caller's bitmap has at least one word (checked by the API).
                    unsafe { *(rep.bitmap as *mut u64) |= 0b101 };
                    Ok(0)
                }
                abi::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP if set => Ok(0),
                abi::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2 if set && len == 0 => {
                    if self.flags & abi::VFIO_MIGRATION_PRE_COPY == 0 {
                        return einval;
                    }
                    self.precopy_v2 = true;
                    Ok(0)
                }
                _ => einval,
            }
        }
    }

    trait IntoRawForTest {
        fn into_raw_fd_for_test(self) -> RawFd;
    }
    impl IntoRawForTest for OwnedFd {
        fn into_raw_fd_for_test(self) -> RawFd {
            std::os::fd::IntoRawFd::into_raw_fd(self)
        }
    }

    impl fake::Kernel for FakeVfio {
        fn open(&mut self, path: &Path) -> std::io::Result<OwnedFd> {
            if !path.starts_with("/dev/vfio/devices") {
                return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
            }
            let fd = fake::memfd();
            self.dev_fd = Some(fd.as_raw_fd());
            Ok(fd)
        }

        unsafe fn ioctl(
            &mut self,
            fd: RawFd,
            request: u64,
            arg: *mut c_void,
        ) -> std::io::Result<i32> {
            if self.data_fds.contains_key(&fd) {
                assert_eq!(request, abi::VFIO_MIG_GET_PRECOPY_INFO);
                // SAFETY: the caller passes a vfio_precopy_info.
                let info = unsafe { &mut *(arg as *mut abi::vfio_precopy_info) };
                assert_eq!(info.argsz, 24);
                if !matches!(
                    self.state,
                    MigrationState::PreCopy | MigrationState::PreCopyP2p
                ) {
                    return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                }
                info.initial_bytes = 22;
                // 7.3.4 `vfio_check_precopy_ioctl` (include/linux/vfio.h lines 317-320): with
                // the opt-in the flags start at 0 and the driver sets REINIT (this fake
                // device always has new initial data); without it they stay as passed in.
                if self.precopy_v2 {
                    info.flags = abi::VFIO_PRECOPY_INFO_REINIT;
                }
                return Ok(0);
            }
            assert_eq!(Some(fd), self.dev_fd, "ioctl on an unknown fd");
            match request {
                // SAFETY: forwarded under the caller's guarantee.
                abi::VFIO_DEVICE_FEATURE => unsafe { self.feature(arg) },
                abi::VFIO_DEVICE_BIND_IOMMUFD => {
                    // SAFETY: the caller passes a vfio_device_bind_iommufd.
                    let b = unsafe { &mut *(arg as *mut abi::vfio_device_bind_iommufd) };
                    if b.argsz < 16 || b.flags != 0 || b.iommufd < 0 {
                        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                    }
                    self.calls.borrow_mut().push(format!("BIND {}", b.iommufd));
                    b.out_devid = 7;
                    Ok(0)
                }
                abi::VFIO_DEVICE_ATTACH_IOMMUFD_PT => {
                    // SAFETY: the caller passes a vfio_device_attach_iommufd_pt.
                    let a = unsafe { &mut *(arg as *mut abi::vfio_device_attach_iommufd_pt) };
                    assert_eq!((a.argsz, a.flags), (12, 0));
                    self.calls.borrow_mut().push(format!("ATTACH {}", a.pt_id));
                    a.pt_id += 100; // an auto-created HWPT id
                    Ok(0)
                }
                abi::VFIO_DEVICE_DETACH_IOMMUFD_PT => {
                    // SAFETY: the caller passes a vfio_device_detach_iommufd_pt.
                    let d = unsafe { &*(arg as *const abi::vfio_device_detach_iommufd_pt) };
                    assert_eq!((d.argsz, d.flags), (8, 0));
                    self.calls.borrow_mut().push("DETACH".into());
                    Ok(0)
                }
                abi::VFIO_DEVICE_RESET => {
                    self.state = MigrationState::Running;
                    Ok(0)
                }
                abi::VFIO_DEVICE_GET_INFO => {
                    // SAFETY: the caller passes a vfio_device_info.
                    let i = unsafe { &mut *(arg as *mut abi::vfio_device_info) };
                    i.flags = abi::VFIO_DEVICE_FLAGS_PCI | abi::VFIO_DEVICE_FLAGS_RESET;
                    i.num_regions = 9;
                    i.num_irqs = 5;
                    Ok(0)
                }
                abi::VFIO_DEVICE_GET_REGION_INFO => {
                    // SAFETY: the caller passes a vfio_region_info.
                    let r = unsafe { &mut *(arg as *mut abi::vfio_region_info) };
                    r.flags = abi::VFIO_REGION_INFO_FLAG_READ | abi::VFIO_REGION_INFO_FLAG_WRITE;
                    r.size = match r.index {
                        0 => 256,
                        2 => 0x10000,
                        _ => 0,
                    };
                    if r.index == 2 {
                        r.flags |= abi::VFIO_REGION_INFO_FLAG_MMAP;
                    }
                    r.offset = u64::from(r.index) << 40;
                    Ok(0)
                }
                _ => Err(std::io::Error::from_raw_os_error(libc::ENOTTY)),
            }
        }

        fn pread(&mut self, _fd: RawFd, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let n = buf.len().min(3); // short reads are continued by the API
            buf[..n].copy_from_slice(&self.region[offset as usize..offset as usize + n]);
            Ok(n)
        }

        fn pwrite(&mut self, _fd: RawFd, buf: &[u8], offset: u64) -> std::io::Result<usize> {
            self.region[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(buf.len())
        }

        fn mmap(&mut self, _fd: RawFd, len: usize, offset: u64) -> std::io::Result<()> {
            // Like a sparse-mmap BAR2 of hisi_acc_vfio_pci: only the first half maps.
            self.calls
                .borrow_mut()
                .push(format!("mmap {offset:#x}+{len:#x}"));
            if offset < (2 << 40) || offset + len as u64 > (2 << 40) + 0x8000 {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            Ok(())
        }

        fn munmap(&mut self, len: usize) {
            self.calls.borrow_mut().push(format!("munmap {len:#x}"));
        }
    }

    const ALL: u64 =
        abi::VFIO_MIGRATION_STOP_COPY | abi::VFIO_MIGRATION_P2P | abi::VFIO_MIGRATION_PRE_COPY;

    fn open_with(k: FakeVfio) -> (VfioDevice, fake::Guard) {
        let g = fake::install(Box::new(k));
        (VfioDevice::open("/dev/vfio/devices/vfio0").unwrap(), g)
    }

    #[test]
    fn locator_finds_cdevs_and_validates_names() {
        let root = tempfile::tempdir().unwrap();
        let pci = root
            .path()
            .join("sys/bus/pci/devices/0000:3b:00.1/vfio-dev/vfio3");
        std::fs::create_dir_all(&pci).unwrap();
        let mdev = root
            .path()
            .join("sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001/vfio-dev/vfio0");
        std::fs::create_dir_all(&mdev).unwrap();
        let loc = DeviceLocator::new(root.path().join("sys"), "/dev");
        assert_eq!(
            loc.pci_cdev("0000:3B:00.1").unwrap(),
            PathBuf::from("/dev/vfio/devices/vfio3")
        );
        assert_eq!(
            loc.pci_cdev("3b:00.1").unwrap(),
            PathBuf::from("/dev/vfio/devices/vfio3")
        );
        assert_eq!(
            loc.mdev_cdev("83B8F4F2-509F-382F-3C1E-E6BFE0FA1001")
                .unwrap(),
            PathBuf::from("/dev/vfio/devices/vfio0")
        );
        let e = loc.pci_cdev("0000:3b:00.2").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("0000:3b:00.2 has no VFIO character device in"),
            "{e}"
        );
        for bad in [
            "3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "zz:00.0",
            "0:0:0:0.0",
            "",
        ] {
            assert!(
                matches!(loc.pci_cdev(bad), Err(Error::BadPciAddress(_))),
                "{bad}"
            );
        }
        for bad in [
            "83b8f4f2-509f-382f-3c1e",
            "83b8f4f2509f382f3c1ee6bfe0fa1001",
            "g3b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
        ] {
            assert!(
                matches!(loc.mdev_cdev(bad), Err(Error::BadUuid(_))),
                "{bad}"
            );
        }
    }

    /// The PRECOPY_INFOv2 opt-in: without it the REINIT bit the device would set is not
    /// read (and the crate passes flags 0); after it REINIT is reported. A kernel without the
    /// feature (ENOTTY, Linux 6.12) or a device without PRE_COPY (EINVAL) is "not supported".
    #[test]
    fn precopy_info_v2_opt_in_and_reinit() {
        let (k, calls) = FakeVfio::new(ALL);
        let (mut dev, _g) = open_with(k);
        let mut t = dev.transition(MigrationState::PreCopy).unwrap();
        let info = t.data.as_mut().unwrap().precopy_info().unwrap();
        assert_eq!((info.initial_bytes, info.reinit), (22, false));
        assert_eq!(
            dev.enable_precopy_info_v2().unwrap(),
            PrecopyInfoV2::Enabled
        );
        assert!(calls.borrow().iter().any(|c| c == "FEATURE 12 S"));
        // The session opened before the opt-in still reads flags as reserved.
        assert!(!t.data.as_mut().unwrap().precopy_info().unwrap().reinit);
        dev.transition(MigrationState::Running).unwrap();
        let mut t = dev.transition(MigrationState::PreCopy).unwrap();
        assert!(t.data.as_mut().unwrap().precopy_info().unwrap().reinit);

        let (mut k, _) = FakeVfio::new(ALL);
        k.enotty.push(abi::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2);
        let (mut dev, _g) = open_with(k);
        match dev.enable_precopy_info_v2().unwrap() {
            PrecopyInfoV2::NotSupported(why) => assert!(why.contains("ENOTTY"), "{why}"),
            other => panic!("{other:?}"),
        }
        let (k, _) = FakeVfio::new(abi::VFIO_MIGRATION_STOP_COPY);
        let (mut dev, _g) = open_with(k);
        match dev.enable_precopy_info_v2().unwrap() {
            PrecopyInfoV2::NotSupported(why) => assert!(why.contains("no PRE_COPY"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn open_failure_names_the_node() {
        let (k, _) = FakeVfio::new(ALL);
        let _g = fake::install(Box::new(k));
        let e = VfioDevice::open("/nonexistent/vfio9").unwrap_err();
        assert_eq!(e.to_string(), "cannot open VFIO device /nonexistent/vfio9");
        assert_eq!(e.errno(), Some(libc::ENOENT));
    }

    #[test]
    fn bind_attach_detach_encode_arguments() {
        let (k, calls) = FakeVfio::new(ALL);
        let (dev, _g) = open_with(k);
        let iommufd = fake::memfd();
        assert_eq!(dev.bind_iommufd(iommufd.as_fd()).unwrap(), 7);
        assert_eq!(dev.attach_pt(3).unwrap(), 103);
        dev.detach_pt().unwrap();
        let c = calls.borrow();
        assert_eq!(c[0], format!("BIND {}", iommufd.as_raw_fd()));
        assert_eq!(&c[1..], ["ATTACH 3", "DETACH"]);
    }

    #[test]
    fn migration_flags_are_read_once_and_validated() {
        let (k, calls) = FakeVfio::new(ALL);
        let (dev, _g) = open_with(k);
        let f = dev.migration_flags().unwrap();
        assert_eq!(f, MigrationFlags::DEFINED_COMBINATIONS[3]);
        dev.migration_flags().unwrap();
        assert_eq!(
            calls
                .borrow()
                .iter()
                .filter(|c| c.starts_with("FEATURE 1 G"))
                .count(),
            1
        );

        let (k, _) = FakeVfio::new(abi::VFIO_MIGRATION_P2P);
        let (dev, _g) = open_with(k);
        assert!(matches!(
            dev.migration_flags(),
            Err(Error::InvalidFlags { flags: 2 })
        ));
    }

    #[test]
    fn unsupported_features_are_enotty_and_named() {
        let (mut k, _) = FakeVfio::new(ALL);
        k.enotty = vec![
            abi::VFIO_DEVICE_FEATURE_MIGRATION,
            abi::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        ];
        let (dev, _g) = open_with(k);
        let e = dev.migration_flags().unwrap_err();
        assert!(e.is_unsupported());
        assert_eq!(e.to_string(), "VFIO_DEVICE_FEATURE(GET MIGRATION) failed");
        assert!(!dev.supports_migration().unwrap());
        assert!(!dev.supports_dma_logging().unwrap());
    }

    #[test]
    fn unknown_state_from_the_kernel_is_a_typed_error() {
        let (mut k, _) = FakeVfio::new(ALL);
        k.raw_state = Some(42);
        let (dev, _g) = open_with(k);
        assert!(matches!(
            dev.migration_state(),
            Err(Error::UnknownState(42))
        ));
    }

    #[test]
    fn transition_walks_arcs_and_returns_the_data_file() {
        let (k, calls) = FakeVfio::new(ALL);
        let (mut dev, _g) = open_with(k);
        let t = dev.transition(MigrationState::StopCopy).unwrap();
        assert_eq!(
            t.path,
            [
                MigrationState::RunningP2p,
                MigrationState::Stop,
                MigrationState::StopCopy
            ]
        );
        let sets = calls
            .borrow()
            .iter()
            .filter(|c| c.starts_with("FEATURE 2 S"))
            .count();
        assert_eq!(sets, 3, "one SET per arc");
        let mut data = t.data.unwrap();
        let mut out = Vec::new();
        save_stop_copy(&mut data, &mut out).unwrap();
        assert_eq!(out, b"mtty-like device state");
        // PRECOPY_INFO outside PRE_COPY is EINVAL, named.
        let e = data.precopy_info().unwrap_err();
        assert_eq!(e.to_string(), "VFIO_MIG_GET_PRECOPY_INFO failed");
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert_eq!(dev.stop_copy_size().unwrap(), 96);
    }

    #[test]
    fn precopy_info_through_the_data_fd() {
        let (k, _) = FakeVfio::new(ALL);
        let (mut dev, _g) = open_with(k);
        let mut data = dev
            .transition(MigrationState::PreCopy)
            .unwrap()
            .data
            .unwrap();
        assert_eq!(data.precopy_info().unwrap().initial_bytes, 22);
        assert!(
            data.wait_readable(Some(std::time::Duration::from_millis(10)))
                .unwrap()
        );
    }

    #[test]
    fn failed_arc_reports_where_the_device_is() {
        let (mut k, _) = FakeVfio::new(ALL);
        k.fail_arc = Some((
            MigrationState::RunningP2p,
            MigrationState::Stop,
            libc::EBUSY,
            false,
        ));
        let (mut dev, _g) = open_with(k);
        let e = dev.transition(MigrationState::StopCopy).unwrap_err();
        assert_eq!(
            e.to_string(),
            "arc RUNNING_P2P -> STOP failed on the way to STOP_COPY; device left in RUNNING_P2P"
        );
        assert_eq!(e.errno(), Some(libc::EBUSY));
        assert!(!e.needs_reset());

        let (mut k, _) = FakeVfio::new(ALL);
        k.fail_arc = Some((
            MigrationState::Running,
            MigrationState::RunningP2p,
            libc::EIO,
            true,
        ));
        let (mut dev, _g) = open_with(k);
        let e = dev.transition(MigrationState::Stop).unwrap_err();
        assert!(e.needs_reset());
        dev.reset().unwrap();
        assert_eq!(dev.migration_state().unwrap(), MigrationState::Running);
    }

    #[test]
    fn stop_copy_to_pre_copy_never_reaches_the_kernel() {
        let (k, calls) = FakeVfio::new(ALL);
        let (mut dev, _g) = open_with(k);
        let _data = dev.transition(MigrationState::StopCopy).unwrap().data;
        calls.borrow_mut().clear();
        for target in [MigrationState::PreCopy, MigrationState::PreCopyP2p] {
            let e = dev.set_migration_state(target).unwrap_err();
            assert!(
                matches!(e, Error::Blocked { from: MigrationState::StopCopy, to } if to == target)
            );
        }
        assert!(
            calls.borrow().iter().all(|c| !c.starts_with("FEATURE 2 S")),
            "no SET was issued: {:?}",
            calls.borrow()
        );
        // From other states PRE_COPY requests go through.
        dev.transition(MigrationState::Running).unwrap();
        assert!(
            dev.set_migration_state(MigrationState::PreCopy)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn set_state_error_is_refused_before_the_kernel() {
        let (k, calls) = FakeVfio::new(ALL);
        let (mut dev, _g) = open_with(k);
        assert!(matches!(
            dev.set_migration_state(MigrationState::Error),
            Err(Error::ErrorNotRequestable)
        ));
        assert!(calls.borrow().is_empty());
    }

    #[test]
    fn dma_logging_start_report_stop() {
        let (mut k, _) = FakeVfio::new(ALL);
        k.log_limit = 3;
        let (mut dev, _g) = open_with(k);
        let ranges: Vec<_> = (0..10).map(|i| DmaRange::new(i << 30, 4096)).collect();
        let s = dev.start(4096, &ranges).unwrap();
        assert!(s.ranges.len() <= 3, "merged after E2BIG");
        assert_eq!(s.page_size, 8192, "the device's choice is returned");
        let mut bm = [0u64; 2];
        dev.dma_logging_report(0, 4096 * 100, 4096, &mut bm)
            .unwrap();
        assert_eq!(bm[0], 0b101);
        let e = dev
            .dma_logging_report(0, 4096 * 200, 4096, &mut bm)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("bitmap holds 2 words, the range needs 4"),
            "{e}"
        );
        dev.dma_logging_stop().unwrap();
    }

    #[test]
    fn regions_map_within_bounds_and_unmap_on_drop() {
        let (k, calls) = FakeVfio::new(ALL);
        let (dev, _g) = open_with(k);
        let bar2 = dev.region_info(2).unwrap();
        assert!(bar2.mappable());
        {
            let m = dev.map_region(&bar2, 0, 0x8000).unwrap();
            assert_eq!((m.len(), m.region(), m.offset()), (0x8000, 2, 0));
            // SAFETY: the (fake, anonymous) mapping is 0x8000 bytes long and alive.
            unsafe { m.as_ptr().as_ptr().add(0x300).write_volatile(7) };
        }
        let c = calls.borrow();
        assert!(c.iter().any(|l| l == "mmap 0x20000000000+0x8000"), "{c:?}");
        assert!(c.iter().any(|l| l == "munmap 0x8000"), "{c:?}");
        drop(c);
        let e = dev.map_region(&bar2, 0x8000, 0x8000).unwrap_err();
        assert_eq!(e.to_string(), "region mmap failed");
        assert_eq!(e.errno(), Some(libc::EINVAL));
        let e = dev.map_region(&bar2, 0x100, 0x1000).unwrap_err();
        assert!(e.to_string().contains("non-zero multiples of the"), "{e}");
        let e = dev.map_region(&bar2, 0, 0x20000).unwrap_err();
        assert!(e.to_string().contains("exceed region 2"), "{e}");
        let bar0 = dev.region_info(0).unwrap();
        let e = dev.map_region(&bar0, 0, 4096).unwrap_err();
        assert_eq!(e.to_string(), "region mmap: region 0 cannot be mmapped");
    }

    #[test]
    fn regions_are_bounds_checked_and_short_io_continued() {
        let (k, _) = FakeVfio::new(ALL);
        let (dev, _g) = open_with(k);
        let info = dev.info().unwrap();
        assert!(info.is_pci() && info.can_reset());
        let bar0 = dev.region_info(0).unwrap();
        assert_eq!(bar0.size, 256);
        let mut buf = [0u8; 8];
        dev.read_region(&RegionInfo { offset: 0, ..bar0 }, 10, &mut buf)
            .unwrap();
        assert_eq!(buf, [10, 11, 12, 13, 14, 15, 16, 17]);
        dev.write_region(&RegionInfo { offset: 0, ..bar0 }, 0, &[9, 9])
            .unwrap();
        let e = dev.read_region(&bar0, 250, &mut buf).unwrap_err();
        assert_eq!(
            e.to_string(),
            "region read: 8 bytes at 0xfa exceed region 0 of 0x100 bytes"
        );
    }
}
