//! iommufd and the objects it holds: IOAS (I/O address spaces) and HWPT (hardware page tables).
//!
//! Objects are RAII handles: dropping the last handle issues `IOMMU_DESTROY`, so an id is never
//! leaked while this process holds the fd. A HWPT keeps its IOAS alive (the kernel refuses to
//! destroy an IOAS a HWPT still uses). The kernel also refuses to destroy an object a device is
//! still attached to (EBUSY); detach devices first, or use the explicit `destroy` methods to see
//! the error instead of it being swallowed by `Drop`.

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use crate::abi;
use crate::bitmap::{DirtyBitmap, check_range};
use crate::error::{Error, Op};
use crate::hw_info::{HwCaps, HwInfo, decode_vendor};
use crate::sys;

/// An open `/dev/iommu`. Cloning shares the fd.
#[derive(Debug, Clone)]
pub struct Iommufd {
    fd: Arc<OwnedFd>,
}

bitflags::bitflags! {
    /// DMA permissions of a mapping (`IOMMU_IOAS_MAP_READABLE` / `WRITEABLE`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct DmaAccess: u32 {
        /// The device may read.
        const READ = abi::IOMMU_IOAS_MAP_READABLE;
        /// The device may write.
        const WRITE = abi::IOMMU_IOAS_MAP_WRITEABLE;
    }
}

bitflags::bitflags! {
    /// `IOMMU_HWPT_ALLOC_*` flags this crate supports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HwptFlags: u32 {
        /// The HWPT can be the parent of a nested (user-managed stage-1) HWPT.
        const NEST_PARENT = abi::IOMMU_HWPT_ALLOC_NEST_PARENT;
        /// Dirty tracking is enforced: attaching a device whose IOMMU cannot track fails.
        const DIRTY_TRACKING = abi::IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
    }
}

/// Where a mapping goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// At exactly this IOVA (`IOMMU_IOAS_MAP_FIXED_IOVA`); the range must be unused.
    Fixed(u64),
    /// Wherever the kernel finds room in the allowed ranges.
    Anywhere,
}

/// An inclusive IOVA interval (`struct iommu_iova_range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA, inclusive.
    pub last: u64,
}

/// `IOMMU_IOAS_IOVA_RANGES`: where mappings may go, and their alignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IovaRanges {
    /// The allowed ranges, in order.
    pub ranges: Vec<IovaRange>,
    /// `out_iova_alignment`: IOVA and length of MAP/COPY must be multiples of this.
    pub alignment: u64,
}

impl Iommufd {
    /// Opens `/dev/iommu`.
    pub fn open() -> Result<Iommufd, Error> {
        Iommufd::open_path("/dev/iommu")
    }

    /// Opens an iommufd node at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Iommufd, Error> {
        let path = path.as_ref();
        let fd = sys::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Iommufd::from_fd(fd))
    }

    /// Wraps an iommufd passed in by an orchestrator (e.g. libvirt hands VMMs an open fd).
    pub fn from_fd(fd: OwnedFd) -> Iommufd {
        Iommufd { fd: Arc::new(fd) }
    }

    /// # Safety
    /// `arg` must be the structure `request` takes, with any user pointers valid.
    pub(crate) unsafe fn ioctl<T>(&self, op: Op, request: u64, arg: &mut T) -> Result<(), Error> {
        // SAFETY: `arg` is a live exclusive reference; layout is the caller's guarantee.
        unsafe { sys::ioctl(self.fd.as_fd(), request, (arg as *mut T).cast::<c_void>()) }
            .map(drop)
            .map_err(|e| Error::kernel(op, e))
    }

    /// `IOMMU_DESTROY` of any object id. The RAII handles call this; it is public for ids
    /// created outside this crate (e.g. by the selftest commands).
    pub fn destroy(&self, id: u32) -> Result<(), Error> {
        let mut arg = abi::iommu_destroy {
            size: size_of::<abi::iommu_destroy>() as u32,
            id,
        };
        // SAFETY: `arg` is an iommu_destroy with size set.
        unsafe { self.ioctl(Op::Destroy, abi::IOMMU_DESTROY, &mut arg) }
    }

    /// `IOMMU_IOAS_ALLOC`: a new, empty I/O address space.
    pub fn alloc_ioas(&self) -> Result<Ioas, Error> {
        let mut arg = abi::iommu_ioas_alloc {
            size: size_of::<abi::iommu_ioas_alloc>() as u32,
            ..Default::default()
        };
        // SAFETY: `arg` is an iommu_ioas_alloc with size set.
        unsafe { self.ioctl(Op::IoasAlloc, abi::IOMMU_IOAS_ALLOC, &mut arg) }?;
        Ok(Ioas {
            obj: Arc::new(Object {
                iommufd: self.clone(),
                id: arg.out_ioas_id,
            }),
        })
    }

    /// `IOMMU_GET_HW_INFO` for a bound device: capabilities and vendor registers.
    pub fn hw_info(&self, dev_id: u32) -> Result<HwInfo, Error> {
        let mut buf = vec![0u8; 64];
        loop {
            let mut arg = abi::iommu_hw_info {
                size: size_of::<abi::iommu_hw_info>() as u32,
                dev_id,
                data_len: buf.len() as u32,
                data_uptr: buf.as_mut_ptr() as u64,
                ..Default::default()
            };
            // SAFETY: `arg` is an iommu_hw_info; `data_uptr` points to `data_len` writable bytes.
            unsafe { self.ioctl(Op::GetHwInfo, abi::IOMMU_GET_HW_INFO, &mut arg) }?;
            let len = arg.data_len as usize;
            if len > buf.len() {
                // The kernel's structure is larger than our buffer: ask again with room for it.
                if len > 1 << 16 {
                    return Err(Error::invalid(
                        Op::GetHwInfo,
                        format!("kernel reports {len} bytes of hardware info"),
                    ));
                }
                buf = vec![0u8; len];
                continue;
            }
            return Ok(HwInfo {
                capabilities: HwCaps::from_bits_retain(arg.out_capabilities),
                max_pasid_log2: arg.out_max_pasid_log2,
                vendor: decode_vendor(arg.out_data_type, &buf[..len])?,
            });
        }
    }

    /// Probes a bound device once and keeps the answer (seed 000's review: probe early, cache,
    /// avoid redundant kernel calls and error paths later). A failing probe — emulated devices
    /// such as mdevs have no IOMMU behind them — is kept as the reason.
    pub fn probe_device(&self, dev_id: u32) -> IommuDevice {
        match self.hw_info(dev_id) {
            Ok(info) => IommuDevice {
                dev_id,
                hw_info: Some(info),
                probe_error: None,
            },
            Err(e) => IommuDevice {
                dev_id,
                hw_info: None,
                probe_error: Some(describe(&e)),
            },
        }
    }

    fn option(&self, option_id: u32, object_id: u32, set: Option<u64>) -> Result<u64, Error> {
        let mut arg = abi::iommu_option {
            size: size_of::<abi::iommu_option>() as u32,
            option_id,
            op: if set.is_some() {
                abi::IOMMU_OPTION_OP_SET
            } else {
                abi::IOMMU_OPTION_OP_GET
            },
            __reserved: 0,
            object_id,
            val64: set.unwrap_or(0),
        };
        // SAFETY: `arg` is an iommu_option with size set.
        unsafe { self.ioctl(Op::Option, abi::IOMMU_OPTION, &mut arg) }?;
        Ok(arg.val64)
    }

    /// `IOMMU_OPTION_RLIMIT_MODE` SET: `true` accounts pinned memory per process, `false` per
    /// user (the default). Needs CAP_SYS_RESOURCE (EPERM), and only works while this iommufd
    /// holds no objects (EBUSY otherwise: `iommufd_option_rlimit_mode`), so set it first.
    pub fn set_rlimit_per_process(&self, per_process: bool) -> Result<(), Error> {
        self.option(
            abi::IOMMU_OPTION_RLIMIT_MODE,
            0,
            Some(u64::from(per_process)),
        )
        .map(drop)
    }

    /// `IOMMU_OPTION_RLIMIT_MODE` GET.
    pub fn rlimit_per_process(&self) -> Result<bool, Error> {
        Ok(self.option(abi::IOMMU_OPTION_RLIMIT_MODE, 0, None)? == 1)
    }

    /// `IOMMU_VFIO_IOAS` GET: the IOAS the legacy VFIO container interface uses.
    pub fn vfio_compat_ioas(&self) -> Result<u32, Error> {
        self.vfio_ioas(abi::IOMMU_VFIO_IOAS_GET, 0)
    }

    /// `IOMMU_VFIO_IOAS` SET: makes `ioas` the one the legacy VFIO container interface uses.
    pub fn set_vfio_compat_ioas(&self, ioas: &Ioas) -> Result<(), Error> {
        self.vfio_ioas(abi::IOMMU_VFIO_IOAS_SET, ioas.id())
            .map(drop)
    }

    /// `IOMMU_VFIO_IOAS` CLEAR: disables VFIO container compatibility.
    pub fn clear_vfio_compat_ioas(&self) -> Result<(), Error> {
        self.vfio_ioas(abi::IOMMU_VFIO_IOAS_CLEAR, 0).map(drop)
    }

    fn vfio_ioas(&self, op: u16, ioas_id: u32) -> Result<u32, Error> {
        let mut arg = abi::iommu_vfio_ioas {
            size: size_of::<abi::iommu_vfio_ioas>() as u32,
            ioas_id,
            op,
            __reserved: 0,
        };
        // SAFETY: `arg` is an iommu_vfio_ioas with size set.
        unsafe { self.ioctl(Op::VfioIoas, abi::IOMMU_VFIO_IOAS, &mut arg) }?;
        Ok(arg.ioas_id)
    }
}

fn describe(e: &Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

impl AsFd for Iommufd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Iommufd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A device bound to this iommufd (by `VFIO_DEVICE_BIND_IOMMUFD`), with its hardware info
/// probed once.
#[derive(Debug, Clone)]
pub struct IommuDevice {
    dev_id: u32,
    hw_info: Option<HwInfo>,
    probe_error: Option<String>,
}

impl IommuDevice {
    /// The iommufd device id.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The hardware info, if the probe succeeded.
    pub fn hw_info(&self) -> Option<&HwInfo> {
        self.hw_info.as_ref()
    }

    /// Why the probe failed, if it did.
    pub fn probe_error(&self) -> Option<&str> {
        self.probe_error.as_deref()
    }

    /// The IOMMU behind this device reports dirty tracking.
    pub fn dirty_tracking(&self) -> bool {
        self.hw_info.as_ref().is_some_and(HwInfo::dirty_tracking)
    }
}

#[derive(Debug)]
pub(crate) struct Object {
    pub(crate) iommufd: Iommufd,
    pub(crate) id: u32,
}

impl Drop for Object {
    fn drop(&mut self) {
        // Errors cannot be reported from Drop; `destroy()` on the handles reports them.
        let _ = self.iommufd.destroy(self.id);
    }
}

fn destroy_object(obj: Arc<Object>) -> Result<(), Error> {
    match Arc::try_unwrap(obj) {
        Ok(obj) => {
            let res = obj.iommufd.destroy(obj.id);
            if res.is_ok() {
                std::mem::forget(obj);
            }
            res
        }
        Err(shared) => Err(Error::invalid(
            Op::Destroy,
            format!("object {} is still referenced by other handles", shared.id),
        )),
    }
}

/// An I/O address space (`IOMMU_IOAS_ALLOC`). Cloning shares the object.
#[derive(Debug, Clone)]
pub struct Ioas {
    obj: Arc<Object>,
}

impl Ioas {
    /// The IOAS id (for `VFIO_DEVICE_ATTACH_IOMMUFD_PT` and friends).
    pub fn id(&self) -> u32 {
        self.obj.id
    }

    /// The iommufd this IOAS lives in.
    pub fn iommufd(&self) -> &Iommufd {
        &self.obj.iommufd
    }

    /// Destroys the IOAS now and reports the kernel's answer (EBUSY while devices or HWPTs use
    /// it). Fails without a syscall if other handles still share it.
    pub fn destroy(self) -> Result<(), Error> {
        destroy_object(self.obj)
    }

    fn check_map(
        &self,
        op: Op,
        iova: Placement,
        length: u64,
        access: DmaAccess,
    ) -> Result<u32, Error> {
        if length == 0 {
            return Err(Error::invalid(op, "length must be non-zero"));
        }
        if access.is_empty() {
            return Err(Error::invalid(
                op,
                "a mapping needs READ and/or WRITE access",
            ));
        }
        let mut flags = access.bits();
        if let Placement::Fixed(iova) = iova {
            if iova.checked_add(length - 1).is_none() {
                return Err(Error::invalid(
                    op,
                    format!("range {iova:#x}+{length:#x} overflows the 64-bit IOVA space"),
                ));
            }
            flags |= abi::IOMMU_IOAS_MAP_FIXED_IOVA;
        }
        Ok(flags)
    }

    /// `IOMMU_IOAS_MAP`: maps `length` bytes of this process's memory at `va`; returns the IOVA.
    ///
    /// The kernel pins the pages until they are unmapped.
    ///
    /// # Safety
    /// `[va, va + length)` must be mapped memory of this process for as long as the mapping
    /// exists, and the caller must treat it as shared with the device: with `WRITE` access the
    /// device may change it at any time (never map memory Rust code holds references into).
    pub unsafe fn map_user(
        &self,
        va: *mut u8,
        length: u64,
        iova: Placement,
        access: DmaAccess,
    ) -> Result<u64, Error> {
        let flags = self.check_map(Op::IoasMap, iova, length, access)?;
        let mut arg = abi::iommu_ioas_map {
            size: size_of::<abi::iommu_ioas_map>() as u32,
            flags,
            ioas_id: self.id(),
            __reserved: 0,
            user_va: va as u64,
            length,
            iova: match iova {
                Placement::Fixed(a) => a,
                Placement::Anywhere => 0,
            },
        };
        // SAFETY: `arg` is an iommu_ioas_map; the memory is the caller's guarantee.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::IoasMap, abi::IOMMU_IOAS_MAP, &mut arg)
        }?;
        Ok(arg.iova)
    }

    /// `IOMMU_IOAS_MAP_FILE` (Linux 6.13+): maps `length` bytes of a memfd from offset `start`;
    /// returns the IOVA. On older kernels this fails with [`Reason::NotSupported`]
    /// (ENOTTY) — use [`Ioas::supports_map_file`] to probe.
    ///
    /// [`Reason::NotSupported`]: crate::Reason::NotSupported
    pub fn map_file(
        &self,
        file: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: Placement,
        access: DmaAccess,
    ) -> Result<u64, Error> {
        let flags = self.check_map(Op::IoasMapFile, iova, length, access)?;
        let mut arg = abi::iommu_ioas_map_file {
            size: size_of::<abi::iommu_ioas_map_file>() as u32,
            flags,
            ioas_id: self.id(),
            fd: file.as_raw_fd(),
            start,
            length,
            iova: match iova {
                Placement::Fixed(a) => a,
                Placement::Anywhere => 0,
            },
        };
        // SAFETY: `arg` is an iommu_ioas_map_file; it holds no user pointers.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::IoasMapFile, abi::IOMMU_IOAS_MAP_FILE, &mut arg)
        }?;
        Ok(arg.iova)
    }

    /// Whether the kernel implements `IOMMU_IOAS_MAP_FILE`: issues it with an invalid fd and
    /// tells ENOTTY (unknown ioctl) from any argument error.
    pub fn supports_map_file(&self) -> Result<bool, Error> {
        let mut arg = abi::iommu_ioas_map_file {
            size: size_of::<abi::iommu_ioas_map_file>() as u32,
            flags: abi::IOMMU_IOAS_MAP_READABLE,
            ioas_id: self.id(),
            fd: -1,
            start: 0,
            length: 4096,
            iova: 0,
        };
        // SAFETY: `arg` is an iommu_ioas_map_file; fd -1 cannot map anything.
        match unsafe {
            self.obj
                .iommufd
                .ioctl(Op::IoasMapFile, abi::IOMMU_IOAS_MAP_FILE, &mut arg)
        } {
            Err(e) if e.errno() == Some(libc::ENOTTY) => Ok(false),
            _ => Ok(true),
        }
    }

    /// `IOMMU_IOAS_UNMAP`: unmaps every mapping inside `[iova, iova + length)`; returns the bytes
    /// unmapped. The range must cover whole mappings (the kernel refuses to split them).
    pub fn unmap(&self, iova: u64, length: u64) -> Result<u64, Error> {
        if length == 0 {
            return Err(Error::invalid(Op::IoasUnmap, "length must be non-zero"));
        }
        if iova.checked_add(length - 1).is_none() {
            return Err(Error::invalid(
                Op::IoasUnmap,
                format!("range {iova:#x}+{length:#x} overflows the 64-bit IOVA space"),
            ));
        }
        self.unmap_raw(iova, length)
    }

    /// Unmaps everything (the kernel's documented `0..U64_MAX` form); returns the bytes unmapped,
    /// 0 if nothing was mapped (`iopt_unmap_all` succeeds on an empty IOAS).
    pub fn unmap_all(&self) -> Result<u64, Error> {
        self.unmap_raw(0, u64::MAX)
    }

    fn unmap_raw(&self, iova: u64, length: u64) -> Result<u64, Error> {
        let mut arg = abi::iommu_ioas_unmap {
            size: size_of::<abi::iommu_ioas_unmap>() as u32,
            ioas_id: self.id(),
            iova,
            length,
        };
        // SAFETY: `arg` is an iommu_ioas_unmap with size set.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::IoasUnmap, abi::IOMMU_IOAS_UNMAP, &mut arg)
        }?;
        Ok(arg.length)
    }

    /// `IOMMU_IOAS_COPY`: maps into this IOAS the pages `src` maps at `[src_iova, +length)`;
    /// returns the IOVA here. iommufd.h says the source must exactly match an earlier map;
    /// Linux 6.12 (`iopt_get_pages`) accepts any fully mapped sub-range, and ENOENT otherwise.
    pub fn copy_from(
        &self,
        src: &Ioas,
        src_iova: u64,
        length: u64,
        dst: Placement,
        access: DmaAccess,
    ) -> Result<u64, Error> {
        let flags = self.check_map(Op::IoasCopy, dst, length, access)?;
        let mut arg = abi::iommu_ioas_copy {
            size: size_of::<abi::iommu_ioas_copy>() as u32,
            flags,
            dst_ioas_id: self.id(),
            src_ioas_id: src.id(),
            length,
            dst_iova: match dst {
                Placement::Fixed(a) => a,
                Placement::Anywhere => 0,
            },
            src_iova,
        };
        // SAFETY: `arg` is an iommu_ioas_copy with size set.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::IoasCopy, abi::IOMMU_IOAS_COPY, &mut arg)
        }?;
        Ok(arg.dst_iova)
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: the allowed IOVA ranges and alignment. Query again after every
    /// attach or detach: devices narrow the ranges (iommufd.h).
    pub fn iova_ranges(&self) -> Result<IovaRanges, Error> {
        let mut ranges = vec![abi::iommu_iova_range::default(); 8];
        loop {
            let mut arg = abi::iommu_ioas_iova_ranges {
                size: size_of::<abi::iommu_ioas_iova_ranges>() as u32,
                ioas_id: self.id(),
                num_iovas: ranges.len() as u32,
                __reserved: 0,
                allowed_iovas: ranges.as_mut_ptr() as u64,
                out_iova_alignment: 0,
            };
            // SAFETY: `allowed_iovas` points to `num_iovas` writable ranges.
            match unsafe {
                self.obj
                    .iommufd
                    .ioctl(Op::IoasIovaRanges, abi::IOMMU_IOAS_IOVA_RANGES, &mut arg)
            } {
                Ok(()) => {
                    ranges.truncate(arg.num_iovas as usize);
                    return Ok(IovaRanges {
                        ranges: ranges
                            .iter()
                            .map(|r| IovaRange {
                                start: r.start,
                                last: r.last,
                            })
                            .collect(),
                        alignment: arg.out_iova_alignment,
                    });
                }
                // The kernel set num_iovas to what it needs (iommufd.h): grow and retry.
                Err(e)
                    if e.errno() == Some(libc::EMSGSIZE)
                        && (arg.num_iovas as usize) > ranges.len() =>
                {
                    ranges.resize(arg.num_iovas as usize, abi::iommu_iova_range::default());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replaces the list of ranges that must stay mappable (device
    /// attach that would narrow them then fails).
    pub fn allow_iovas(&self, ranges: &[IovaRange]) -> Result<(), Error> {
        for r in ranges {
            if r.last < r.start {
                return Err(Error::invalid(
                    Op::IoasAllowIovas,
                    format!("range {:#x}..={:#x} ends before it starts", r.start, r.last),
                ));
            }
        }
        let raw: Vec<abi::iommu_iova_range> = ranges
            .iter()
            .map(|r| abi::iommu_iova_range {
                start: r.start,
                last: r.last,
            })
            .collect();
        let mut arg = abi::iommu_ioas_allow_iovas {
            size: size_of::<abi::iommu_ioas_allow_iovas>() as u32,
            ioas_id: self.id(),
            num_iovas: raw.len() as u32,
            __reserved: 0,
            allowed_iovas: raw.as_ptr() as u64,
        };
        // SAFETY: `allowed_iovas` points to `num_iovas` ranges that outlive the call.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::IoasAllowIovas, abi::IOMMU_IOAS_ALLOW_IOVAS, &mut arg)
        }
    }

    /// `IOMMU_OPTION_HUGE_PAGES` SET on this IOAS: `false` maps everything at PAGE_SIZE.
    pub fn set_huge_pages(&self, enable: bool) -> Result<(), Error> {
        self.obj
            .iommufd
            .option(
                abi::IOMMU_OPTION_HUGE_PAGES,
                self.id(),
                Some(u64::from(enable)),
            )
            .map(drop)
    }

    /// `IOMMU_OPTION_HUGE_PAGES` GET.
    pub fn huge_pages(&self) -> Result<bool, Error> {
        Ok(self
            .obj
            .iommufd
            .option(abi::IOMMU_OPTION_HUGE_PAGES, self.id(), None)?
            == 1)
    }

    /// `IOMMU_HWPT_ALLOC`: a kernel-managed hardware page table for `dev_id`, mirroring this
    /// IOAS's mappings.
    pub fn alloc_hwpt(&self, dev_id: u32, flags: HwptFlags) -> Result<Hwpt, Error> {
        let mut arg = abi::iommu_hwpt_alloc {
            size: size_of::<abi::iommu_hwpt_alloc>() as u32,
            flags: flags.bits(),
            dev_id,
            pt_id: self.id(),
            data_type: abi::IOMMU_HWPT_DATA_NONE,
            ..Default::default()
        };
        // SAFETY: `arg` is an iommu_hwpt_alloc with no driver data.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::HwptAlloc, abi::IOMMU_HWPT_ALLOC, &mut arg)
        }?;
        Ok(Hwpt {
            obj: Arc::new(Object {
                iommufd: self.obj.iommufd.clone(),
                id: arg.out_hwpt_id,
            }),
            ioas: self.clone(),
            flags,
            holds: Vec::new(),
        })
    }
}

/// A hardware page table (`IOMMU_HWPT_ALLOC`): kernel-managed on an IOAS, or nested on a
/// parent HWPT ([`Hwpt::alloc_nested`]). Cloning shares it.
#[derive(Debug, Clone)]
pub struct Hwpt {
    obj: Arc<Object>,
    ioas: Ioas,
    flags: HwptFlags,
    /// A nested HWPT keeps its parent (and a fault queue it reports to) alive; declared after
    /// `obj`, so the nested object is destroyed first.
    holds: Vec<Arc<Object>>,
}

impl Hwpt {
    /// The HWPT id.
    pub fn id(&self) -> u32 {
        self.obj.id
    }

    /// The IOAS whose mappings this HWPT mirrors.
    pub fn ioas(&self) -> &Ioas {
        &self.ioas
    }

    /// The allocation flags.
    pub fn flags(&self) -> HwptFlags {
        self.flags
    }

    /// Allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: dirty tracking can be switched on.
    pub fn dirty_capable(&self) -> bool {
        self.flags.contains(HwptFlags::DIRTY_TRACKING)
    }

    /// Destroys the HWPT now and reports the kernel's answer (EBUSY while a device is attached).
    pub fn destroy(self) -> Result<(), Error> {
        destroy_object(self.obj)
    }

    pub(crate) fn object(&self) -> &Arc<Object> {
        &self.obj
    }

    /// Whether this is a nested HWPT ([`alloc_nested`](Self::alloc_nested)).
    pub fn is_nested(&self) -> bool {
        !self.holds.is_empty()
    }

    /// `IOMMU_HWPT_ALLOC` with this HWPT as the parent: a nested (user-managed stage-1) HWPT
    /// for `dev_id`, described by driver data `data` of type `data_type`
    /// (`IOMMU_HWPT_DATA_VTD_S1`, `_ARM_SMMUV3`, or the selftest's `0xdead`). With `fault`,
    /// the HWPT reports I/O page faults to that queue (`IOMMU_HWPT_FAULT_ID_VALID`); Linux 6.12
    /// accepts a fault queue only on a nested HWPT (`iommufd_hwpt_paging_alloc` refuses the
    /// flag with EOPNOTSUPP), so this is the one way to get page requests to user space there.
    ///
    /// This HWPT must have been allocated with [`HwptFlags::NEST_PARENT`]; it and `fault` stay
    /// alive as long as the nested HWPT does.
    pub fn alloc_nested(
        &self,
        dev_id: u32,
        data_type: u32,
        data: &[u8],
        fault: Option<&FaultQueue>,
    ) -> Result<Hwpt, Error> {
        if !self.flags.contains(HwptFlags::NEST_PARENT) {
            return Err(Error::invalid(
                Op::HwptAlloc,
                format!(
                    "HWPT {} was allocated without IOMMU_HWPT_ALLOC_NEST_PARENT and cannot be a parent",
                    self.id()
                ),
            ));
        }
        if data_type == abi::IOMMU_HWPT_DATA_NONE || data.is_empty() {
            return Err(Error::invalid(
                Op::HwptAlloc,
                "a nested HWPT needs driver data (a data type other than IOMMU_HWPT_DATA_NONE)",
            ));
        }
        let data_len = u32::try_from(data.len()).map_err(|_| {
            Error::invalid(
                Op::HwptAlloc,
                format!("{} bytes of driver data", data.len()),
            )
        })?;
        let mut arg = abi::iommu_hwpt_alloc {
            size: size_of::<abi::iommu_hwpt_alloc>() as u32,
            flags: if fault.is_some() {
                abi::IOMMU_HWPT_FAULT_ID_VALID
            } else {
                0
            },
            dev_id,
            pt_id: self.id(),
            data_type,
            data_len,
            data_uptr: data.as_ptr() as u64,
            fault_id: fault.map_or(0, |f| f.id()),
            ..Default::default()
        };
        // SAFETY: `arg` is an iommu_hwpt_alloc whose data pointer and length describe `data`,
        // which the kernel only reads during the call.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::HwptAlloc, abi::IOMMU_HWPT_ALLOC, &mut arg)
        }?;
        let mut holds = vec![Arc::clone(&self.obj)];
        holds.extend(fault.map(|f| Arc::clone(f.object())));
        Ok(Hwpt {
            obj: Arc::new(Object {
                iommufd: self.obj.iommufd.clone(),
                id: arg.out_hwpt_id,
            }),
            ioas: self.ioas.clone(),
            flags: HwptFlags::empty(),
            holds,
        })
    }

    fn require_dirty(&self, op: Op) -> Result<(), Error> {
        if self.dirty_capable() {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!(
                    "HWPT {} was allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING",
                    self.id()
                ),
            ))
        }
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`: switches IOMMU dirty tracking on or off.
    pub fn set_dirty_tracking(&self, enable: bool) -> Result<(), Error> {
        self.require_dirty(Op::HwptSetDirtyTracking)?;
        let mut arg = abi::iommu_hwpt_set_dirty_tracking {
            size: size_of::<abi::iommu_hwpt_set_dirty_tracking>() as u32,
            flags: if enable {
                abi::IOMMU_HWPT_DIRTY_TRACKING_ENABLE
            } else {
                0
            },
            hwpt_id: self.id(),
            __reserved: 0,
        };
        // SAFETY: `arg` is an iommu_hwpt_set_dirty_tracking with size set.
        unsafe {
            self.obj.iommufd.ioctl(
                Op::HwptSetDirtyTracking,
                abi::IOMMU_HWPT_SET_DIRTY_TRACKING,
                &mut arg,
            )
        }
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` for `[iova, iova + length)` at the bitmap's page size: ORs
    /// the dirty pages into `bitmap` (which must contain the range) and, unless `clear` is
    /// false (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`), clears them in the IOMMU.
    ///
    /// Checked before the syscall, as the kernel checks them: the range non-empty, not
    /// wrapping, aligned to the page size, inside the bitmap; the HWPT dirty-capable.
    pub fn get_dirty_bitmap(
        &self,
        iova: u64,
        length: u64,
        bitmap: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), Error> {
        let op = Op::HwptGetDirtyBitmap;
        self.require_dirty(op)?;
        let page = bitmap.page_size();
        check_range(iova, length, page).map_err(|e| match e {
            Error::InvalidArgument { rule, .. } => Error::invalid(op, rule),
            other => other,
        })?;
        if iova < bitmap.iova() || iova + (length - 1) > bitmap.iova() + (bitmap.length() - 1) {
            return Err(Error::invalid(
                op,
                format!(
                    "range {iova:#x}+{length:#x} is outside the bitmap's {:#x}+{:#x}",
                    bitmap.iova(),
                    bitmap.length()
                ),
            ));
        }
        let first_bit = (iova - bitmap.iova()) / page;
        if first_bit.is_multiple_of(64) {
            // The range starts on a word of the caller's bitmap: the kernel writes into it.
            let words = &mut bitmap.words_mut()[(first_bit / 64) as usize..];
            // SAFETY: `words` holds at least the range's bits (checked above) for the call.
            return unsafe { self.read_dirty_raw(iova, length, page, words.as_mut_ptr(), clear) };
        }
        // Otherwise read into a word-aligned scratch bitmap and merge it.
        let mut scratch = DirtyBitmap::new(iova, length, page)?;
        // SAFETY: `scratch` holds exactly the range's bits.
        unsafe {
            self.read_dirty_raw(iova, length, page, scratch.words_mut().as_mut_ptr(), clear)
        }?;
        bitmap.union(&scratch)
    }

    /// # Safety
    /// `data` must be writable for `ceil(length / page_size / 64)` words for the call.
    unsafe fn read_dirty_raw(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        data: *mut u64,
        clear: bool,
    ) -> Result<(), Error> {
        let mut arg = abi::iommu_hwpt_get_dirty_bitmap {
            size: size_of::<abi::iommu_hwpt_get_dirty_bitmap>() as u32,
            hwpt_id: self.id(),
            flags: if clear {
                0
            } else {
                abi::IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
            },
            __reserved: 0,
            iova,
            length,
            page_size,
            data: data as u64,
        };
        // SAFETY: `data` is the caller's guarantee; `arg` is an iommu_hwpt_get_dirty_bitmap.
        unsafe {
            self.obj.iommufd.ioctl(
                Op::HwptGetDirtyBitmap,
                abi::IOMMU_HWPT_GET_DIRTY_BITMAP,
                &mut arg,
            )
        }
    }

    /// Reads the dirty bits of `[iova, iova + length)` into `bitmap` without clearing them, then
    /// unmaps the range from the IOAS; returns the bytes unmapped. For unmaps during migration
    /// (a vIOMMU guest unmapping), so no page dirtied before the unmap is lost.
    ///
    /// Remaining race: a DMA write after the read but before the unmap completes is not
    /// reported. A guest that unmaps an IOVA while its device still writes there has a bug the
    /// hardware would also lose data on; a VMM that must close even that window quiesces the
    /// device first. This is the ordering iommufd.h prescribes for `NO_CLEAR`.
    pub fn read_dirty_and_unmap(
        &self,
        iova: u64,
        length: u64,
        bitmap: &mut DirtyBitmap,
    ) -> Result<u64, Error> {
        self.get_dirty_bitmap(iova, length, bitmap, false)?;
        self.ioas.unmap(iova, length)
    }
}

/// An iommufd fault object and its file. Dropping it closes the file and destroys the object
/// (the kernel answers what is still pending with `INVALID`). Its page requests are read and
/// answered with the methods of [`crate::fault`].
#[derive(Debug)]
pub struct FaultQueue {
    obj: Arc<Object>,
    pub(crate) fd: OwnedFd,
}

impl FaultQueue {
    /// The fault object's id (what `IOMMU_HWPT_ALLOC` takes as `fault_id`).
    pub fn id(&self) -> u32 {
        self.obj.id
    }

    pub(crate) fn object(&self) -> &Arc<Object> {
        &self.obj
    }
}

impl Iommufd {
    /// `IOMMU_FAULT_QUEUE_ALLOC`: a new fault object and the file its records are read from.
    /// `ENOTTY` before Linux 6.11.
    pub fn alloc_fault_queue(&self) -> Result<FaultQueue, Error> {
        let mut arg = abi::iommu_fault_alloc {
            size: size_of::<abi::iommu_fault_alloc>() as u32,
            ..Default::default()
        };
        // SAFETY: `arg` is an iommu_fault_alloc with size set.
        unsafe { self.ioctl(Op::FaultQueueAlloc, abi::IOMMU_FAULT_QUEUE_ALLOC, &mut arg) }?;
        let obj = Arc::new(Object {
            iommufd: self.clone(),
            id: arg.out_fault_id,
        });
        // SAFETY: the kernel just installed this descriptor for us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(arg.out_fault_fd as i32) };
        Ok(FaultQueue { obj, fd })
    }
}
