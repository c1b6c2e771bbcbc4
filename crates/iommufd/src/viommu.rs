//! Virtual IOMMU objects (Linux 7.3 iommufd; `ENOTTY` on 6.12): a vIOMMU is a VM's slice of a
//! physical IOMMU, tied to a nesting-parent HWPT; a vDEVICE is a device as that VM's IOMMU
//! names it (its virtual ID: vSID, vDeviceID or vRID).
//!
//! ```text
//!  Ioas ─ Hwpt (NEST_PARENT) ─ Viommu (type, driver data) ─ Vdevice (dev_id, virt_id)
//! ```
//!
//! Facts from Linux 7.3.4: `include/uapi/linux/iommufd.h` lines 1152-1188 (the structures) and
//! `drivers/iommu/iommufd/viommu.c`: flags other than 0 or type DEFAULT → EOPNOTSUPP (line
//! 33), a device whose IOMMU driver has no vIOMMU of that type → EOPNOTSUPP (lines 40-55), a
//! HWPT that is not a nesting parent → EINVAL (lines 63-66). Whether the kernel has the
//! commands at all is [`Iommufd::viommu_support`], probed without creating anything.

use std::sync::Arc;

use crate::abi;
use crate::error::{Error, Op};
use crate::objects::{Hwpt, HwptFlags, Iommufd, Object};

/// Whether this kernel's iommufd has a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// It does.
    Supported,
    /// It does not; why (the kernel's answer).
    NotSupported(String),
}

/// A vIOMMU (`IOMMU_VIOMMU_ALLOC`). Destroyed on drop; keeps its parent HWPT alive.
#[derive(Debug, Clone)]
pub struct Viommu {
    obj: Arc<Object>,
    _parent: Arc<Object>,
    kind: u32,
}

/// A vDEVICE (`IOMMU_VDEVICE_ALLOC`). Destroyed on drop (before the device is closed, as
/// iommufd.h asks); keeps its vIOMMU alive.
#[derive(Debug, Clone)]
pub struct Vdevice {
    obj: Arc<Object>,
    _viommu: Arc<Object>,
    virt_id: u64,
}

impl Iommufd {
    /// Whether the kernel has `IOMMU_VIOMMU_ALLOC` and `IOMMU_VDEVICE_ALLOC`: each is called
    /// with a zero size, which a kernel that knows the command refuses as too short (EINVAL,
    /// `iommufd_fops_ioctl`'s `min_size` check) and one that does not as unknown (ENOTTY).
    /// Anything else is "not supported" with the answer named: never taken as support.
    pub fn viommu_support(&self) -> Support {
        for (name, request) in [
            ("IOMMU_VIOMMU_ALLOC", abi::IOMMU_VIOMMU_ALLOC),
            ("IOMMU_VDEVICE_ALLOC", abi::IOMMU_VDEVICE_ALLOC),
        ] {
            let mut arg = abi::iommu_vdevice_alloc::default(); // size 0
            // SAFETY: a zero `size` makes the kernel read no more than the size word, and
            // `arg` is larger than that.
            match unsafe { self.ioctl(Op::ViommuAlloc, request, &mut arg) } {
                Ok(()) => {
                    return Support::NotSupported(format!(
                        "{name} accepted a zero-size argument: not the command this crate knows"
                    ));
                }
                Err(e) if e.errno() == Some(libc::EINVAL) => {}
                Err(e) if e.errno() == Some(libc::ENOTTY) => {
                    return Support::NotSupported(format!(
                        "the kernel has no {name} (ENOTTY; Linux 7.3 has it)"
                    ));
                }
                Err(e) => {
                    return Support::NotSupported(format!(
                        "{name} answered a probe unexpectedly: {e}"
                    ));
                }
            }
        }
        Support::Supported
    }
}

impl Hwpt {
    /// `IOMMU_VIOMMU_ALLOC` on this nesting-parent HWPT, backed by `dev_id`'s IOMMU.
    /// `data` is the type's driver data, in and out (the kernel may write outputs into it,
    /// e.g. an mmap offset); empty for none.
    pub fn alloc_viommu(&self, dev_id: u32, kind: u32, data: &mut [u8]) -> Result<Viommu, Error> {
        if !self.flags().contains(HwptFlags::NEST_PARENT) {
            return Err(Error::invalid(
                Op::ViommuAlloc,
                format!(
                    "HWPT {} was allocated without IOMMU_HWPT_ALLOC_NEST_PARENT",
                    self.id()
                ),
            ));
        }
        if kind == abi::IOMMU_VIOMMU_TYPE_DEFAULT {
            return Err(Error::invalid(
                Op::ViommuAlloc,
                "IOMMU_VIOMMU_TYPE_DEFAULT is reserved",
            ));
        }
        let data_len = u32::try_from(data.len()).map_err(|_| {
            Error::invalid(
                Op::ViommuAlloc,
                format!("{} bytes of driver data", data.len()),
            )
        })?;
        let mut arg = abi::iommu_viommu_alloc {
            size: size_of::<abi::iommu_viommu_alloc>() as u32,
            r#type: kind,
            dev_id,
            hwpt_id: self.id(),
            data_len,
            data_uptr: if data.is_empty() {
                0
            } else {
                data.as_mut_ptr() as u64
            },
            ..Default::default()
        };
        // SAFETY: `arg` is an iommu_viommu_alloc; its data pointer and length describe `data`,
        // which is writable for the whole call.
        unsafe {
            self.object()
                .iommufd
                .ioctl(Op::ViommuAlloc, abi::IOMMU_VIOMMU_ALLOC, &mut arg)
        }?;
        Ok(Viommu {
            obj: Arc::new(Object {
                iommufd: self.object().iommufd.clone(),
                id: arg.out_viommu_id,
            }),
            _parent: Arc::clone(self.object()),
            kind,
        })
    }
}

impl Viommu {
    /// The vIOMMU id.
    pub fn id(&self) -> u32 {
        self.obj.id
    }

    /// Its `IOMMU_VIOMMU_TYPE_*`.
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// `IOMMU_VDEVICE_ALLOC`: device `dev_id` as this vIOMMU's guest names it, `virt_id`.
    pub fn alloc_vdevice(&self, dev_id: u32, virt_id: u64) -> Result<Vdevice, Error> {
        let mut arg = abi::iommu_vdevice_alloc {
            size: size_of::<abi::iommu_vdevice_alloc>() as u32,
            viommu_id: self.id(),
            dev_id,
            virt_id,
            ..Default::default()
        };
        // SAFETY: `arg` is an iommu_vdevice_alloc with size set.
        unsafe {
            self.obj
                .iommufd
                .ioctl(Op::VdeviceAlloc, abi::IOMMU_VDEVICE_ALLOC, &mut arg)
        }?;
        Ok(Vdevice {
            obj: Arc::new(Object {
                iommufd: self.obj.iommufd.clone(),
                id: arg.out_vdevice_id,
            }),
            _viommu: Arc::clone(&self.obj),
            virt_id,
        })
    }
}

impl Vdevice {
    /// The vDEVICE id.
    pub fn id(&self) -> u32 {
        self.obj.id
    }

    /// The virtual ID it was allocated with.
    pub fn virt_id(&self) -> u64 {
        self.virt_id
    }
}
