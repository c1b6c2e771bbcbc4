//! Physical memory holding page tables.
//!
//! A table is a 4 KiB frame of 512 64-bit entries, accessed only through atomics: the IOMMU
//! (real, or the [model](crate::model)) updates entries concurrently with software.
//!
//! ```text
//!  PhysMem::frame(pa) ──> &[AtomicU64; 512]      (None: pa is not a table frame)
//!  TableArena:  base ─┬─ frame 0 ─┬─ frame 1 ─┬─ ... ─┬─ frame n-1
//!                     used-bitmap: one bit per frame, claimed with fetch_or
//! ```

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One table frame.
pub type Frame = [AtomicU64; 512];

/// Bytes per table frame.
pub const FRAME_SIZE: u64 = 4096;

/// Physical memory that page tables live in.
///
/// Implement it over whatever memory the IOMMU walks: an mmap'd user-owned page-table region
/// (nested stage 1), a VMM's guest memory (emulated vIOMMU), or the [`TableArena`] this crate
/// provides. Frames handed out by [`alloc_frame`](Self::alloc_frame) must be zeroed.
pub trait PhysMem: Send + Sync {
    /// Allocate a zeroed frame and return its physical address, or `None` when out of memory.
    fn alloc_frame(&self) -> Option<u64>;
    /// Return a frame. The caller guarantees no IOMMU walk can reach it any more (the entry
    /// pointing at it was cleared and the IOTLB flushed).
    fn free_frame(&self, pa: u64);
    /// The frame at `pa`, or `None` if `pa` is not a frame of this memory.
    fn frame(&self, pa: u64) -> Option<&Frame>;
}

impl<T: PhysMem + ?Sized> PhysMem for &T {
    fn alloc_frame(&self) -> Option<u64> {
        (**self).alloc_frame()
    }
    fn free_frame(&self, pa: u64) {
        (**self).free_frame(pa)
    }
    fn frame(&self, pa: u64) -> Option<&Frame> {
        (**self).frame(pa)
    }
}

impl<T: PhysMem + ?Sized> PhysMem for alloc::sync::Arc<T> {
    fn alloc_frame(&self) -> Option<u64> {
        (**self).alloc_frame()
    }
    fn free_frame(&self, pa: u64) {
        (**self).free_frame(pa)
    }
    fn frame(&self, pa: u64) -> Option<&Frame> {
        (**self).frame(pa)
    }
}

/// `capacity` zeroed frames straight from the allocator (no page is touched, so a large,
/// sparsely used arena costs no resident memory).
fn zeroed_frames(capacity: usize) -> Result<Box<[Frame]>, crate::Error> {
    use alloc::alloc::{Layout, alloc_zeroed, handle_alloc_error};
    if capacity == 0 {
        return Ok(Box::new([]));
    }
    let layout = Layout::array::<Frame>(capacity)
        .map_err(|_| crate::Error::Config("arena too large for this machine"))?;
    // SAFETY: the layout has a non-zero size (capacity > 0, Frame is 4 KiB).
    let ptr = unsafe { alloc_zeroed(layout) }.cast::<Frame>();
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    let slice = core::ptr::slice_from_raw_parts_mut(ptr, capacity);
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `[Frame; capacity]`,
    // which is what `Box<[Frame]>` frees; all-zero bytes are a valid `Frame` (AtomicU64 has the
    // same in-memory representation as u64).
    Ok(unsafe { Box::from_raw(slice) })
}

/// A fixed pool of table frames at consecutive physical addresses.
///
/// Allocation is lock-free (a bitmap claimed with `fetch_or`); memory comes from the global
/// allocator zeroed, so untouched frames cost no resident memory on Linux.
pub struct TableArena {
    base: u64,
    frames: Box<[Frame]>,
    used: Box<[AtomicU64]>,
    hint: AtomicUsize,
    allocated: AtomicUsize,
}

impl core::fmt::Debug for TableArena {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TableArena")
            .field("base", &format_args!("{:#x}", self.base))
            .field("capacity", &self.frames.len())
            .field("allocated", &self.allocated())
            .finish()
    }
}

impl TableArena {
    /// An arena of `capacity` frames starting at physical address `base` (4 KiB-aligned,
    /// non-zero so that a zero pointer is never a valid table).
    pub fn new(base: u64, capacity: usize) -> Result<Self, crate::Error> {
        if base == 0 || !base.is_multiple_of(FRAME_SIZE) {
            return Err(crate::Error::Config(
                "arena base must be a non-zero multiple of 4 KiB",
            ));
        }
        let span = (capacity as u64).checked_mul(FRAME_SIZE);
        if span.and_then(|s| s.checked_add(base)).is_none() {
            return Err(crate::Error::Config("arena does not fit the address space"));
        }
        let frames = zeroed_frames(capacity)?;
        let words = capacity.div_ceil(64);
        let used: Box<[AtomicU64]> = (0..words)
            .map(|w| {
                // Frames beyond `capacity` in the last word are marked used forever.
                let valid = capacity - w * 64;
                AtomicU64::new(if valid >= 64 { 0 } else { !0u64 << valid })
            })
            .collect();
        Ok(TableArena {
            base,
            frames,
            used,
            hint: AtomicUsize::new(0),
            allocated: AtomicUsize::new(0),
        })
    }

    /// Physical address of the first frame.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Number of frames.
    pub fn capacity(&self) -> usize {
        self.frames.len()
    }

    /// Frames currently allocated.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    fn index(&self, pa: u64) -> Option<usize> {
        let off = pa.checked_sub(self.base)?;
        if off % FRAME_SIZE != 0 {
            return None;
        }
        let i = usize::try_from(off / FRAME_SIZE).ok()?;
        (i < self.frames.len()).then_some(i)
    }

    /// Exclusive plain access to a frame's entries, e.g. to load a page-table image or to
    /// read it at full speed while nothing else can touch it.
    pub fn frame_mut(&mut self, pa: u64) -> Option<&mut [u64; 512]> {
        let i = self.index(pa)?;
        let frame: &mut Frame = &mut self.frames[i];
        // SAFETY: AtomicU64 has the same size, alignment (at least that of u64) and bit
        // validity as u64, so [AtomicU64; 512] and [u64; 512] have the same layout; the
        // `&mut` borrow of the arena rules out any concurrent atomic access for its lifetime.
        Some(unsafe { &mut *(frame as *mut Frame).cast::<[u64; 512]>() })
    }
}

impl PhysMem for TableArena {
    fn alloc_frame(&self) -> Option<u64> {
        let words = self.used.len();
        if words == 0 {
            return None;
        }
        let start = self.hint.load(Ordering::Relaxed) % words;
        for k in 0..words {
            let w = (start + k) % words;
            let mut cur = self.used[w].load(Ordering::Relaxed);
            while cur != u64::MAX {
                let bit = (!cur).trailing_zeros();
                let prev = self.used[w].fetch_or(1 << bit, Ordering::AcqRel);
                if prev & (1 << bit) == 0 {
                    self.hint.store(w, Ordering::Relaxed);
                    self.allocated.fetch_add(1, Ordering::Relaxed);
                    return Some(self.base + (w * 64 + bit as usize) as u64 * FRAME_SIZE);
                }
                cur = prev | (1 << bit);
            }
        }
        None
    }

    fn free_frame(&self, pa: u64) {
        let Some(i) = self.index(pa) else {
            return;
        };
        // Zero before releasing, so the next owner gets a clean table.
        for e in self.frames[i].iter() {
            e.store(0, Ordering::Relaxed);
        }
        let prev = self.used[i / 64].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        if prev & (1 << (i % 64)) != 0 {
            self.allocated.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn frame(&self, pa: u64) -> Option<&Frame> {
        self.index(pa).map(|i| &self.frames[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn alloc_free_reuse_and_zeroing() {
        let arena = TableArena::new(0x10_0000, 70).unwrap();
        let all: Vec<u64> = (0..70).map(|_| arena.alloc_frame().unwrap()).collect();
        assert_eq!(arena.alloc_frame(), None);
        assert_eq!(arena.allocated(), 70);
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 70);
        assert!(
            sorted
                .iter()
                .all(|&pa| (0x10_0000..0x10_0000 + 70 * 4096).contains(&pa))
        );
        arena.frame(all[5]).unwrap()[3].store(7, Ordering::Relaxed);
        arena.free_frame(all[5]);
        arena.free_frame(all[5]); // double free is ignored
        assert_eq!(arena.allocated(), 69);
        let again = arena.alloc_frame().unwrap();
        assert_eq!(again, all[5]);
        assert_eq!(arena.frame(again).unwrap()[3].load(Ordering::Relaxed), 0);
        assert!(arena.frame(0x10_0000 + 70 * 4096).is_none());
        assert!(arena.frame(0x10_0008).is_none());
        assert!(arena.frame(0).is_none());
    }

    #[test]
    fn bad_arenas() {
        assert!(TableArena::new(0, 1).is_err());
        assert!(TableArena::new(0x1234, 1).is_err());
        assert!(TableArena::new(!0xfff, 2).is_err());
        let empty = TableArena::new(0x1000, 0).unwrap();
        assert_eq!(empty.alloc_frame(), None);
    }

    #[test]
    fn frame_mut_is_the_same_memory() {
        let mut arena = TableArena::new(0x1000, 2).unwrap();
        let pa = arena.alloc_frame().unwrap();
        arena.frame_mut(pa).unwrap()[10] = 42;
        assert_eq!(arena.frame(pa).unwrap()[10].load(Ordering::Relaxed), 42);
    }
}
