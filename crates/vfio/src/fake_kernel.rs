//! A process-wide fake kernel for whole-migration fault sweeps (feature `fake-kernel`).
//!
//! With the feature on, every call of this crate's private `sys` module (open, ioctl,
//! `pread`/`pwrite` of regions, `read`/`write` of migration data fds, `mmap` of regions) first
//! asks the [`Kernel`] installed here. While none is installed the calls reach the real kernel,
//! so a test build that unifies the feature into other crates still behaves as a real one.
//!
//! A test installs one kernel for the whole process (all threads: a migration's source,
//! destination and device threads all reach it) and decides in it which call fails with which
//! errno. The feature is meant for dev-dependencies only: no production build should turn it
//! on (decisions.md, "Fakes across crates").

use std::ffi::c_void;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;

/// What a fake kernel implements. Calls it does not implement fail with ENOSYS.
pub trait Kernel: Send {
    /// `open(2)` of a device node.
    fn open(&mut self, path: &Path) -> io::Result<OwnedFd>;

    /// `ioctl(2)` on a device or data fd.
    ///
    /// # Safety
    /// `arg` points to the structure `request` names, valid for reads and writes of its size
    /// (the guarantee the crate's callers give the real `ioctl`).
    unsafe fn ioctl(&mut self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32>;

    /// `pread(2)` of a device region.
    fn pread(&mut self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let _ = (fd, buf, offset);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    /// `pwrite(2)` of a device region.
    fn pwrite(&mut self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<usize> {
        let _ = (fd, buf, offset);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    /// `read(2)` of a migration data fd.
    fn read(&mut self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        let _ = (fd, buf);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    /// `write(2)` to a migration data fd.
    fn write(&mut self, fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        let _ = (fd, buf);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    /// Accepts or refuses an `mmap(2)` of a region; an accepted mapping is anonymous memory.
    fn mmap(&mut self, fd: RawFd, len: usize, offset: u64) -> io::Result<()> {
        let _ = (fd, len, offset);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

static KERNEL: Mutex<Option<Box<dyn Kernel>>> = Mutex::new(None);

/// Installs `k` as the kernel of every thread of the process until the guard drops. Installing
/// while another fake is installed replaces it (tests that install one must not run in
/// parallel with each other).
pub fn install(k: Box<dyn Kernel>) -> Guard {
    *KERNEL.lock().unwrap_or_else(|p| p.into_inner()) = Some(k);
    Guard(())
}

/// Removes the process-wide fake kernel when dropped; calls reach the real kernel again.
#[derive(Debug)]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        KERNEL.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Runs `f` on the installed fake, or returns `None` when there is none.
/// (Unit tests use the per-thread fake instead, so there it has no caller.)
#[cfg_attr(test, allow(dead_code))]
pub(crate) fn with<R>(
    f: impl FnOnce(&mut (dyn Kernel + 'static)) -> io::Result<R>,
) -> Option<io::Result<R>> {
    let mut slot = KERNEL.lock().unwrap_or_else(|p| p.into_inner());
    slot.as_deref_mut().map(f)
}
