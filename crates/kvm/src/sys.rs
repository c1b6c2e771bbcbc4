//! The KVM calls `kvm-ioctls` 0.25 does not wrap: `KVM_GET_DIRTY_LOG` into a caller's buffer,
//! `KVM_CLEAR_DIRTY_LOG`, `KVM_RESET_DIRTY_RINGS`, and the dirty ring's mapping.
//!
//! Numbers from `include/uapi/linux/kvm.h` (Linux 6.12): `KVMIO` 0xAE,
//! `KVM_GET_DIRTY_LOG _IOW(KVMIO, 0x42, struct kvm_dirty_log)`,
//! `KVM_CLEAR_DIRTY_LOG _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`,
//! `KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)`; the ring of a vCPU is mapped from its fd at
//! `KVM_DIRTY_LOG_PAGE_OFFSET` pages (64 on x86, `arch/x86/include/uapi/asm/kvm.h`), and its
//! entries are `struct kvm_dirty_gfn` (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING").

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// `_IOW(0xAE, 0x42, 16 bytes)`.
pub const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_ae42;
/// `_IOWR(0xAE, 0xc0, 24 bytes)`.
pub const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
/// `_IO(0xAE, 0xc7)`.
pub const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page for the VMM to collect.
pub const DIRTY_GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: the VMM collected it; the kernel may reuse the entry.
pub const DIRTY_GFN_F_RESET: u32 = 2;

#[repr(C)]
struct DirtyLog {
    slot: u32,
    padding1: u32,
    bitmap: u64,
}

#[repr(C)]
struct ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: u64,
}

const _: () = assert!(std::mem::size_of::<DirtyLog>() == 16);
const _: () = assert!(std::mem::size_of::<ClearDirtyLog>() == 24);

/// Runs a `kvm-ioctls` call, unless the fault layer (feature `fake-kernel`) fails it first.
pub(crate) fn kvm_call<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, kvm_ioctls::Error>,
) -> Result<T, kvm_ioctls::Error> {
    #[cfg(feature = "fake-kernel")]
    crate::fake_kernel::check(what).map_err(kvm_ioctls::Error::new)?;
    #[cfg(not(feature = "fake-kernel"))]
    let _ = what;
    f()
}

/// The fault layer's answer for one of this module's own calls.
fn fault(what: &'static str) -> io::Result<()> {
    #[cfg(feature = "fake-kernel")]
    crate::fake_kernel::check(what).map_err(io::Error::from_raw_os_error)?;
    #[cfg(not(feature = "fake-kernel"))]
    let _ = what;
    Ok(())
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `KVM_GET_DIRTY_LOG` of `slot` into `bitmap` (one bit per page of the slot; the caller sizes
/// it to the slot, rounded up to 64 pages).
pub fn get_dirty_log(vm: &impl AsRawFd, slot: u32, bitmap: &mut [u64]) -> io::Result<()> {
    fault("KVM_GET_DIRTY_LOG")?;
    let arg = DirtyLog {
        slot,
        padding1: 0,
        bitmap: bitmap.as_mut_ptr() as u64,
    };
    // SAFETY: the argument is a valid kvm_dirty_log whose bitmap points at `bitmap`, which
    // the caller sized to the slot's pages (the kernel writes ALIGN(pages, 64) / 8 bytes).
    check(unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_DIRTY_LOG, &arg) })?;
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages of `bitmap` (bit i = page `first_page + i`)
/// in `slot`. `first_page` must be a multiple of 64; `num_pages` too, unless the range ends
/// at the end of the slot.
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    debug_assert!(bitmap.len() as u64 * 64 >= u64::from(num_pages));
    fault("KVM_CLEAR_DIRTY_LOG")?;
    let arg = ClearDirtyLog {
        slot,
        num_pages,
        first_page,
        bitmap: bitmap.as_ptr() as u64,
    };
    // SAFETY: a valid kvm_clear_dirty_log; the kernel reads num_pages bits from `bitmap`,
    // which holds at least that many.
    check(unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) })?;
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS` with every signal blocked in the calling thread: re-protects every
/// page whose ring entry the VMM collected. Returns how many entries the kernel reset.
///
/// Since Linux 6.17 the reset stops when the calling thread has a signal pending (commit
/// 49005a2a3d2a, "KVM: Bail from the dirty ring reset flow if a signal is pending"), and in
/// v6.17, v6.18 and mainline as of 2026 it returns without re-protecting the batch of up to 64
/// pages it had already consumed (virt/kvm/dirty_ring.c: the `-EINTR` return skips the final
/// `kvm_reset_dirty_gfn` for `mask`), while the ioctl still reports success. Those pages then
/// take guest writes without logging them: lost pages. With every signal blocked,
/// `signal_pending()` is false for the whole call. (Observed here first: with vCPU threads
/// kicked by signals, 3 of 5 migrations lost pages; with signals blocked, none.)
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<u32> {
    fault("KVM_RESET_DIRTY_RINGS")?;
    // SAFETY: fills a local signal set and swaps this thread's mask; `old` receives the
    // previous mask, restored below whatever the ioctl returned.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
    }
    // SAFETY: an ioctl without argument on a VM fd.
    let r = check(unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS, 0) });
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    Ok(r? as u32)
}

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
pub struct RingMap {
    ptr: *mut u8,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics on the
// entries' flags (the kernel's protocol) and plain reads of entries the flags publish.
unsafe impl Send for RingMap {}
// SAFETY: as above; `fetch` is serialised by the caller's lock.
unsafe impl Sync for RingMap {}

impl RingMap {
    /// Maps the ring of `entries` 16-byte entries of the vCPU fd `vcpu`.
    pub fn new(vcpu: RawFd, entries: u32, page_size: u64) -> io::Result<RingMap> {
        let len = entries as usize * 16;
        let offset = 64 * page_size;
        // SAFETY: maps `len` bytes of the vCPU fd at the dirty-ring offset, shared, read and
        // write (the VMM writes the RESET flag); the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RingMap {
            ptr: ptr.cast(),
            entries,
        })
    }

    /// Collects the entries from `*next` on that the kernel published (DIRTY), marking each
    /// RESET and calling `f(slot, page_offset)`; advances `*next`. Returns the number taken.
    pub fn collect(&self, next: &mut u32, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (*next % self.entries) as usize;
            // SAFETY: entry i lies within the mapping (i < entries); the flags word is 4-byte
            // aligned (entries are 16 bytes, the mapping page-aligned) and accessed atomically
            // as the kernel's protocol requires (acquire to see the entry, release to return
            // it).
            let (flags, slot, offset) = unsafe {
                let e = self.ptr.add(i * 16);
                let flags = AtomicU32::from_ptr(e.cast::<u32>());
                if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                let slot = e.add(4).cast::<u32>().read_volatile();
                let offset = e.add(8).cast::<u64>().read_volatile();
                (flags, slot, offset)
            };
            f(slot, offset);
            flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
            *next = next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe {
            libc::munmap(self.ptr.cast(), self.entries as usize * 16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_IOC(dir, type, nr, size)` from include/uapi/asm-generic/ioctl.h.
    fn ioc(dir: u64, nr: u64, size: u64) -> libc::c_ulong {
        ((dir << 30) | (size << 16) | (0xae << 8) | nr) as libc::c_ulong
    }

    #[test]
    fn ioctl_numbers_and_layouts_match_kvm_h() {
        assert_eq!(KVM_GET_DIRTY_LOG, ioc(1, 0x42, 16));
        assert_eq!(KVM_CLEAR_DIRTY_LOG, ioc(3, 0xc0, 24));
        assert_eq!(KVM_RESET_DIRTY_RINGS, ioc(0, 0xc7, 0));
        assert_eq!(
            std::mem::size_of::<kvm_bindings::kvm_clear_dirty_log>(),
            std::mem::size_of::<ClearDirtyLog>()
        );
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>(), 16);
        assert_eq!(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET, 64);
    }
}
