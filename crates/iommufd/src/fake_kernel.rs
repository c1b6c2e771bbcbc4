//! A process-wide fake kernel for whole-migration fault sweeps (feature `fake-kernel`).
//!
//! With the feature on, every ioctl and every open of this crate's private `sys` module first
//! asks the [`Kernel`] installed here. While none is installed the calls reach the real kernel,
//! so a test build that unifies the feature into other crates still behaves as a real one.
//!
//! A test installs one kernel for the whole process (every thread of a migration reaches it)
//! and decides in it which call fails with which errno. The feature is meant for
//! dev-dependencies only: no production build should turn it on (decisions.md, "Fakes across
//! crates").

use std::ffi::c_void;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;

/// What a fake kernel implements.
pub trait Kernel: Send {
    /// `open(2)` of `/dev/iommu`.
    fn open(&mut self, path: &Path) -> io::Result<OwnedFd>;

    /// `ioctl(2)` on an iommufd (or a fault queue fd).
    ///
    /// # Safety
    /// `arg` points to the structure `request` names, valid for reads and writes of its size
    /// (the guarantee the crate's callers give the real `ioctl`).
    unsafe fn ioctl(&mut self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32>;
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
