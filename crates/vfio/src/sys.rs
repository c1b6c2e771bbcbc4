//! The one module of this crate that talks to the kernel.
//!
//! Every ioctl, open and positioned read/write of a device fd goes through the functions here.
//! In `cfg(test)` builds they are replaced by a per-thread fake kernel (see [`fake`]), so unit
//! tests exercise the real argument encoding and errno handling without `/dev/vfio`. Reads and
//! writes of a migration data fd go through here too ([`read`], [`write`]); the per-thread fakes
//! hand out real memfds for those and they are read directly. With the `fake-kernel` feature
//! every call first asks the process-wide fake ([`crate::fake_kernel`]), if one is installed.

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
        // SAFETY: `fd` is open for the lifetime of the borrow; the caller guarantees `arg`.
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

    pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        #[cfg(feature = "fake-kernel")]
        if let Some(r) = crate::fake_kernel::with(|k| k.pread(fd.as_raw_fd(), buf, offset)) {
            return r;
        }
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
        #[cfg(feature = "fake-kernel")]
        if let Some(r) = crate::fake_kernel::with(|k| k.pwrite(fd.as_raw_fd(), buf, offset)) {
            return r;
        }
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
        #[allow(unused_mut)]
        let (mut flags, mut fd) = (libc::MAP_SHARED, fd.as_raw_fd());
        #[cfg(feature = "fake-kernel")]
        if let Some(r) = crate::fake_kernel::with(|k| k.mmap(fd, len, offset)) {
            // The fake kernel accepted the request: anonymous memory stands in for the BAR.
            r?;
            (flags, fd) = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        }
        // SAFETY: a new mapping chosen by the kernel (addr NULL) touches no existing memory;
        // `fd` is open (or -1 for an anonymous mapping).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                if fd < 0 { 0 } else { off },
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(p)
        }
    }

    /// `read(2)` of a migration data fd.
    pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "fake-kernel")]
        if let Some(r) = crate::fake_kernel::with(|k| k.read(fd.as_raw_fd(), buf)) {
            return r;
        }
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is open.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// `write(2)` to a migration data fd.
    pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        #[cfg(feature = "fake-kernel")]
        if let Some(r) = crate::fake_kernel::with(|k| k.write(fd.as_raw_fd(), buf)) {
            return r;
        }
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes; `fd` is open.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
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
    use std::io::{Read, Write};
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

    /// Data fds are real memfds in the per-thread fakes: read them directly.
    pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        std::fs::File::from(fd.try_clone_to_owned()?).read(buf)
    }

    /// Data fds are real memfds in the per-thread fakes: write them directly.
    pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        std::fs::File::from(fd.try_clone_to_owned()?).write(buf)
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

pub(crate) use imp::{ioctl, mmap, munmap, open, pread, pwrite, read, write};

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
