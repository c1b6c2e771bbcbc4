//! The one module of this crate that talks to the kernel.
//!
//! Every ioctl, open and positioned read/write of a device fd goes through the functions here.
//! In `cfg(test)` builds they are replaced by a per-thread fake kernel (see [`fake`]), so unit
//! tests exercise the real argument encoding and errno handling without `/dev/vfio`. Reads and
//! writes of a migration data fd use the fd directly (`std::fs::File`): in tests the fake kernel
//! hands out real memfds for those.

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
    /// that size for the duration of the call; any user pointers inside it must be valid too.
    pub(crate) unsafe fn ioctl(
        fd: BorrowedFd<'_>,
        request: u64,
        arg: *mut c_void,
    ) -> io::Result<i32> {
        // SAFETY: `fd` is open for the lifetime of the borrow; the caller guarantees `arg`.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    pub(crate) fn open(path: &Path) -> io::Result<OwnedFd> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map(OwnedFd::from)
    }

    pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is open.
        let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub(crate) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes; `fd` is open.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// A shared read/write mapping of `len` bytes of `fd` at `offset`.
    pub(crate) fn mmap(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<*mut c_void> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new mapping chosen by the kernel (addr NULL) touches no existing memory;
        // `fd` is open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(p)
        }
    }

    /// # Safety
    /// `addr..addr + len` must be a mapping made by [`mmap`] that nothing uses any more.
    pub(crate) unsafe fn munmap(addr: *mut c_void, len: usize) {
        // SAFETY: the caller guarantees the range is an unused mapping of ours.
        unsafe { libc::munmap(addr, len) };
    }
}

#[cfg(test)]
mod imp {
    use super::*;
    use std::os::fd::AsRawFd;

    /// # Safety
    /// As the real `ioctl`: `arg` must be valid for the structure `request` names.
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

    pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        fake::with(|k| k.pread(fd.as_raw_fd(), buf, offset))
    }

    pub(crate) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
        fake::with(|k| k.pwrite(fd.as_raw_fd(), buf, offset))
    }

    pub(crate) fn mmap(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<*mut c_void> {
        fake::with(|k| k.mmap(fd.as_raw_fd(), len, offset))?;
        // The fake kernel accepted the request: back it with anonymous memory.
        // SAFETY: a new private anonymous mapping touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(p)
        }
    }

    /// # Safety
    /// As the real `munmap`.
    pub(crate) unsafe fn munmap(addr: *mut c_void, len: usize) {
        fake::with(|k| {
            k.munmap(len);
            Ok(())
        })
        .ok();
        // SAFETY: forwarded under the caller's guarantee.
        unsafe { libc::munmap(addr, len) };
    }
}

pub(crate) use imp::{ioctl, mmap, munmap, open, pread, pwrite};

/// The test double: a fake kernel installed per test thread.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;
    use std::ffi::c_void;
    use std::io;
    use std::os::fd::{OwnedFd, RawFd};
    use std::path::Path;

    /// What a fake kernel implements. Unimplemented calls fail with ENOSYS.
    pub(crate) trait Kernel {
        fn open(&mut self, path: &Path) -> io::Result<OwnedFd> {
            let _ = path;
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
        /// # Safety
        /// `arg` is valid for the structure `request` names (the real caller's guarantee).
        unsafe fn ioctl(&mut self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32>;
        fn pread(&mut self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let _ = (fd, buf, offset);
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        }
        fn pwrite(&mut self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<usize> {
            let _ = (fd, buf, offset);
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        }
        /// Accept or refuse an mmap of the device fd (the memory is anonymous).
        fn mmap(&mut self, fd: RawFd, len: usize, offset: u64) -> io::Result<()> {
            let _ = (fd, len, offset);
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        }
        /// A mapping of `len` bytes was released.
        fn munmap(&mut self, len: usize) {
            let _ = len;
        }
    }

    thread_local! {
        static KERNEL: RefCell<Option<Box<dyn Kernel>>> = RefCell::new(None);
    }

    /// Installs `k` as this thread's kernel until the guard drops.
    pub(crate) fn install(k: Box<dyn Kernel>) -> Guard {
        KERNEL.with(|slot| *slot.borrow_mut() = Some(k));
        Guard(())
    }

    /// Removes the fake kernel when dropped.
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

    /// A fresh anonymous in-memory file, used as a fake data fd.
    pub(crate) fn memfd() -> OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: the name is a valid NUL-terminated string; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(c"livemig-fake".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}
