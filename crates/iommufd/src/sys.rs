//! The one module of this crate that talks to the kernel.
//!
//! Every ioctl and every open of `/dev/iommu` goes through here. In `cfg(test)` builds the
//! functions dispatch to a per-thread fake kernel ([`fake`]) so unit tests exercise the real
//! argument encoding, validation and errno handling without `/dev/iommu`. With the
//! `fake-kernel` feature every call first asks the process-wide fake
//! ([`crate::fake_kernel`]), if one is installed.

use std::ffi::c_void;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

#[cfg(not(test))]
mod imp {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    /// # Safety
    /// `arg` must point to memory laid out as `request` expects, valid for reads and writes of
    /// that size for the whole call, and every user pointer inside it must be valid for what the
    /// kernel does with it.
    pub(crate) unsafe fn ioctl(
        fd: BorrowedFd<'_>,
        request: u64,
        arg: *mut c_void,
    ) -> io::Result<i32> {
        #[cfg(feature = "fake-kernel")]
        {
            let call = |k: &mut (dyn crate::fake_kernel::Kernel + 'static)| {
                // SAFETY: forwarded under the caller's guarantee about `arg`.
                unsafe { k.ioctl(fd.as_raw_fd(), request, arg) }
            };
            if let Some(r) = crate::fake_kernel::with(call) {
                return r;
            }
        }
        // SAFETY: `fd` is open for the borrow; the caller guarantees `arg`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    pub(crate) fn open(path: &Path) -> io::Result<OwnedFd> {
        #[cfg(feature = "fake-kernel")]
        if let Some(r) = crate::fake_kernel::with(|k| k.open(path)) {
            return r;
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map(OwnedFd::from)
    }
}

#[cfg(test)]
mod imp {
    use super::*;
    use std::os::fd::AsRawFd;

    /// # Safety
    /// As the real `ioctl`.
    pub(crate) unsafe fn ioctl(
        fd: BorrowedFd<'_>,
        request: u64,
        arg: *mut c_void,
    ) -> io::Result<i32> {
        // SAFETY: forwarded under the caller's guarantee about `arg`.
        fake::with(|k| unsafe { k.ioctl(fd.as_raw_fd(), request, arg) })
    }

    pub(crate) fn open(path: &Path) -> io::Result<OwnedFd> {
        fake::with(|k| k.open(path))
    }
}

pub(crate) use imp::{ioctl, open};

/// The test double: a fake kernel installed per test thread.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;
    use std::ffi::c_void;
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::path::Path;

    pub(crate) trait Kernel {
        fn open(&mut self, path: &Path) -> io::Result<OwnedFd>;
        /// # Safety
        /// `arg` is valid for the structure `request` names.
        unsafe fn ioctl(&mut self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32>;
    }

    thread_local! {
        static KERNEL: RefCell<Option<Box<dyn Kernel>>> = RefCell::new(None);
    }

    /// Installs `k` as this thread's kernel until the guard drops.
    pub(crate) fn install(k: Box<dyn Kernel>) -> Guard {
        KERNEL.with(|slot| *slot.borrow_mut() = Some(k));
        Guard(())
    }

    pub(crate) struct Guard(());

    impl Drop for Guard {
        fn drop(&mut self) {
            KERNEL.with(|slot| slot.borrow_mut().take());
        }
    }

    pub(crate) fn with<R>(f: impl FnOnce(&mut dyn Kernel) -> io::Result<R>) -> io::Result<R> {
        KERNEL.with(|slot| match slot.borrow_mut().as_deref_mut() {
            Some(k) => f(k),
            None => Err(io::Error::other(
                "no fake kernel installed on this test thread",
            )),
        })
    }

    /// A real fd (an anonymous memfd) for the fake to hand out.
    pub(crate) fn memfd() -> OwnedFd {
        // SAFETY: the name is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(c"livemig-fake".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}
