//! Automatic domain selection ("auto domains", seed 000: QEMU's iommufd backend).
//!
//! For a device bound to this iommufd, attach it to an IOMMU domain that mirrors one IOAS:
//!
//! 1. **Reuse** a HWPT this selector already allocated, if the device can attach to it. The
//!    kernel answers EINVAL for an incompatible domain; that HWPT is skipped. Any other attach
//!    error is fatal: the device cannot attach anywhere.
//! 2. Otherwise **allocate** a HWPT — with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` whenever the
//!    device's IOMMU reports `IOMMU_HW_CAP_DIRTY_TRACKING`, even if tracking is never switched
//!    on (attaching later to a dirty-enforcing domain is impossible otherwise). If the kernel
//!    refuses the dirty flag, allocate without it.
//! 3. If HWPT allocation is refused altogether — mdevs and other emulated devices have no IOMMU
//!    (ENOENT: their id is not an iommufd device) — **attach the IOAS** directly.
//!
//! The outcome records the path, the reason and whether IOMMU dirty tracking is available.
//! Every failure is returned with what was tried, never only logged.

use std::fmt;
use std::io;

use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Op};
use crate::objects::{Hwpt, HwptFlags, Ioas, IommuDevice};

/// How a device was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainPath {
    /// Attached to a HWPT allocated earlier for another device.
    Reused,
    /// A new HWPT was allocated for this device.
    Allocated,
    /// Attached to the IOAS itself (the kernel chooses the domain; no IOMMU dirty tracking).
    Ioas,
}

/// The result of [`AutoDomains::attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoDomain {
    /// The path taken.
    pub path: DomainPath,
    /// What the device is attached to: a HWPT id, or the IOAS id.
    pub pt_id: u32,
    /// IOMMU dirty tracking is available for this device (its domain enforces it).
    pub dirty_tracking: bool,
    /// Why this path, in words.
    pub reason: String,
    /// HWPTs tried and found incompatible, with the kernel's answer.
    pub skipped: Vec<String>,
}

impl fmt::Display for AutoDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.path {
            DomainPath::Reused => "reused HWPT",
            DomainPath::Allocated => "allocated HWPT",
            DomainPath::Ioas => "attached to IOAS",
        };
        write!(
            f,
            "{what} {} (IOMMU dirty tracking {}): {}",
            self.pt_id,
            if self.dirty_tracking {
                "available"
            } else {
                "unavailable"
            },
            self.reason
        )?;
        if !self.skipped.is_empty() {
            write!(f, "; passed over: {}", self.skipped.join(", "))?;
        }
        Ok(())
    }
}

/// Errors of HWPT allocation that mean "this device cannot have a HWPT" rather than a failure.
fn alloc_refused(e: &Error) -> bool {
    matches!(
        e.errno(),
        Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

fn describe(e: &Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(s) => format!("{e} ({s})"),
        None => e.to_string(),
    }
}

/// Domain selection for the devices of one IOAS.
#[derive(Debug)]
pub struct AutoDomains {
    ioas: Ioas,
    hwpts: Vec<Hwpt>,
}

impl AutoDomains {
    /// A selector for devices that should see `ioas`'s mappings.
    pub fn new(ioas: Ioas) -> AutoDomains {
        AutoDomains {
            ioas,
            hwpts: Vec::new(),
        }
    }

    /// The IOAS.
    pub fn ioas(&self) -> &Ioas {
        &self.ioas
    }

    /// The HWPTs allocated so far.
    pub fn hwpts(&self) -> &[Hwpt] {
        &self.hwpts
    }

    /// Attaches `dev` following the policy in the module documentation. `attach` performs
    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` with the given IOAS or HWPT id and returns the kernel's
    /// errno on failure (e.g. `|pt| vfio_dev.attach_pt(pt).map_err(...)`).
    pub fn attach<F>(&mut self, dev: &IommuDevice, mut attach: F) -> Result<AutoDomain, Error>
    where
        F: FnMut(u32) -> io::Result<u32>,
    {
        let mut skipped = Vec::new();
        for hwpt in &self.hwpts {
            match attach(hwpt.id()) {
                Ok(_) => {
                    return Ok(AutoDomain {
                        path: DomainPath::Reused,
                        pt_id: hwpt.id(),
                        dirty_tracking: hwpt.dirty_capable(),
                        reason: format!("HWPT {} is compatible with the device", hwpt.id()),
                        skipped,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    skipped.push(format!("HWPT {}: incompatible (EINVAL)", hwpt.id()));
                }
                // An emulated device (mdev) attaches through an iommufd access, which takes an
                // IOAS id only: a HWPT id is "not found" for it (iommufd_access_attach).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && dev.hw_info().is_none() => {
                    skipped.push(format!(
                        "HWPT {}: the device has no IOMMU of its own (ENOENT)",
                        hwpt.id()
                    ));
                }
                Err(e) => {
                    let err = Error::kernel(Op::DeviceAttach, e);
                    let mut attempts = skipped;
                    attempts.push(format!("HWPT {}: {}", hwpt.id(), describe(&err)));
                    return Err(Error::NoDomain {
                        dev_id: dev.dev_id(),
                        attempts,
                        source: Box::new(err),
                    });
                }
            }
        }

        let mut attempts = skipped.clone();
        let wants_dirty = dev.dirty_tracking();
        let mut note = match (dev.hw_info(), dev.probe_error()) {
            (Some(_), _) if wants_dirty => "the IOMMU reports dirty tracking".to_string(),
            (Some(_), _) => "the IOMMU does not report dirty tracking".to_string(),
            (None, Some(why)) => format!("no IOMMU hardware info ({why})"),
            (None, None) => "no IOMMU hardware info".to_string(),
        };
        let mut tries = Vec::new();
        if wants_dirty {
            tries.push(HwptFlags::DIRTY_TRACKING);
        }
        tries.push(HwptFlags::empty());
        let mut last_err = None;
        for flags in tries {
            match self.ioas.alloc_hwpt(dev.dev_id(), flags) {
                Ok(hwpt) => {
                    return match attach(hwpt.id()) {
                        Ok(_) => {
                            let out = AutoDomain {
                                path: DomainPath::Allocated,
                                pt_id: hwpt.id(),
                                dirty_tracking: hwpt.dirty_capable(),
                                reason: note,
                                skipped,
                            };
                            self.hwpts.push(hwpt);
                            Ok(out)
                        }
                        Err(e) => {
                            let err = Error::kernel(Op::DeviceAttach, e);
                            attempts.push(format!(
                                "new HWPT {} ({flags:?}): {}",
                                hwpt.id(),
                                describe(&err)
                            ));
                            // `hwpt` is dropped here, destroying it.
                            Err(Error::NoDomain {
                                dev_id: dev.dev_id(),
                                attempts,
                                source: Box::new(err),
                            })
                        }
                    };
                }
                Err(e) if alloc_refused(&e) => {
                    attempts.push(format!("IOMMU_HWPT_ALLOC {flags:?}: {}", describe(&e)));
                    if flags.contains(HwptFlags::DIRTY_TRACKING) {
                        note = format!(
                            "{note}, but a dirty-tracking HWPT was refused: {}",
                            describe(&e)
                        );
                    }
                    last_err = Some(e);
                }
                Err(e) => {
                    attempts.push(format!("IOMMU_HWPT_ALLOC {flags:?}: {}", describe(&e)));
                    return Err(Error::NoDomain {
                        dev_id: dev.dev_id(),
                        attempts,
                        source: Box::new(e),
                    });
                }
            }
        }

        // No HWPT for this device: attach the IOAS (emulated devices, e.g. mdev).
        let refused = last_err.as_ref().map(describe).unwrap_or_default();
        match attach(self.ioas.id()) {
            Ok(_) => Ok(AutoDomain {
                path: DomainPath::Ioas,
                pt_id: self.ioas.id(),
                dirty_tracking: false,
                reason: format!("HWPT allocation refused ({refused}); {note}"),
                skipped,
            }),
            Err(e) => {
                let err = Error::kernel(Op::DeviceAttach, e);
                attempts.push(format!("IOAS {}: {}", self.ioas.id(), describe(&err)));
                Err(Error::NoDomain {
                    dev_id: dev.dev_id(),
                    attempts,
                    source: Box::new(err),
                })
            }
        }
    }

    /// The HWPTs that can track dirty pages.
    pub fn dirty_hwpts(&self) -> impl Iterator<Item = &Hwpt> {
        self.hwpts.iter().filter(|h| h.dirty_capable())
    }

    /// Switches dirty tracking on or off in every dirty-capable HWPT. On failure, the HWPTs
    /// already switched are switched back before the error is returned.
    pub fn set_dirty_tracking(&self, enable: bool) -> Result<(), Error> {
        let hwpts: Vec<&Hwpt> = self.dirty_hwpts().collect();
        for (i, h) in hwpts.iter().enumerate() {
            if let Err(e) = h.set_dirty_tracking(enable) {
                for done in &hwpts[..i] {
                    let _ = done.set_dirty_tracking(!enable);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// ORs the dirty pages of every dirty-capable HWPT in `[iova, iova + length)` into `bitmap`.
    pub fn read_dirty(
        &self,
        iova: u64,
        length: u64,
        bitmap: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), Error> {
        for h in self.dirty_hwpts() {
            h.get_dirty_bitmap(iova, length, bitmap, clear)?;
        }
        Ok(())
    }

    /// Reads (without clearing) the dirty pages of every dirty-capable HWPT in the range, then
    /// unmaps it from the IOAS; see [`Hwpt::read_dirty_and_unmap`] for the remaining race.
    pub fn read_dirty_and_unmap(
        &self,
        iova: u64,
        length: u64,
        bitmap: &mut DirtyBitmap,
    ) -> Result<u64, Error> {
        self.read_dirty(iova, length, bitmap, false)?;
        self.ioas.unmap(iova, length)
    }
}
