//! The page-table tree: map, unmap, translate, walk; and the two callbacks its operations take,
//! [`DirtySink`] (the dirty pages an unmap or a harvest finds) and [`IotlbFlush`].
//!
//! ```text
//!   root (level N) ──> table (N-1) ──> ... ──> table (1) ──> 4 KiB leaves
//!          │                 └──> block leaf (2 MiB, 1 GiB)
//!          └── every entry an AtomicU64 in a PhysMem frame; the IOMMU reads and
//!              A/D-updates entries concurrently with these operations
//! ```
//!
//! Structural changes (`map`, `unmap`, `split`, `collapse`, dirty harvesting) take `&mut self`:
//! one software owner at a time, as the kernel's io-pgtable callers hold their domain lock.
//! The IOMMU side needs no lock: new tables are fully written before the entry pointing at them
//! is published with a release store, entries it may be updating are changed with atomic
//! read-modify-writes, and frames are freed only after the caller's IOTLB flush.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::Ordering;

use crate::Error;
use crate::format::{ENTRIES, Leaf, PageTableFormat, Perm, Pte, level_shift, level_size};
use crate::mem::{Frame, PhysMem};

/// The result of a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Physical address the IOVA translates to.
    pub pa: u64,
    /// Level of the table holding the leaf.
    pub level: u8,
    /// IOVA of the start of the page.
    pub page_iova: u64,
    /// The leaf.
    pub leaf: Leaf,
}

/// One page visited by [`PageTable::walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// IOVA of the page.
    pub iova: u64,
    /// Level of the table holding it.
    pub level: u8,
    /// The decoded leaf.
    pub leaf: Leaf,
    /// The raw entry (the first replica, for replicated AMD-Vi pages).
    pub raw: u64,
}

/// Receives the dirty IOVA ranges a harvest finds.
pub trait DirtySink {
    /// `[iova, iova + len)` was written.
    fn record(&mut self, iova: u64, len: u64);

    /// Pages `iova + k * page` for every bit `k` set in `mask` were written. Implementations
    /// with a bitmap of granule `page` can OR the mask in directly.
    fn record_mask(&mut self, iova: u64, page: u64, mask: u64) {
        let mut m = mask;
        while m != 0 {
            let k = m.trailing_zeros();
            m &= m - 1;
            self.record(iova + u64::from(k) * page, page);
        }
    }
}

/// Discards everything (plain unmap).
impl DirtySink for () {
    fn record(&mut self, _iova: u64, _len: u64) {}
    fn record_mask(&mut self, _iova: u64, _page: u64, _mask: u64) {}
}

/// Any `FnMut(iova, len)` is a sink.
impl<F: FnMut(u64, u64)> DirtySink for F {
    fn record(&mut self, iova: u64, len: u64) {
        self(iova, len)
    }
}

/// Invalidates IOTLB entries for an IOVA range after entries were cleaned or removed.
///
/// For a real IOMMU this issues the invalidation (and waits for it); for the IOMMU model
/// (module `model`, feature "model") it drops cached translations and drains in-flight DMA.
pub trait IotlbFlush {
    /// Invalidate every cached translation of `[iova, iova + size)`.
    fn flush(&mut self, iova: u64, size: u64);
}

impl<F: FnMut(u64, u64)> IotlbFlush for F {
    fn flush(&mut self, iova: u64, size: u64) {
        self(iova, size)
    }
}

/// Skips invalidation. Correct only for tables no IOMMU is using; with a live IOMMU it loses
/// dirty pages (the `model` tests demonstrate exactly that).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFlush;

impl IotlbFlush for NoFlush {
    fn flush(&mut self, _iova: u64, _size: u64) {}
}

/// An IO page table in format `F` over table memory `M`.
///
/// Dropping it frees every table frame: detach the devices using it (and flush their IOTLBs)
/// first, as a driver frees a domain only after detaching it.
pub struct PageTable<F: PageTableFormat, M: PhysMem> {
    pub(crate) fmt: F,
    pub(crate) mem: M,
    pub(crate) root: u64,
    pub(crate) tracking: bool,
}

impl<F: PageTableFormat, M: PhysMem> core::fmt::Debug for PageTable<F, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageTable")
            .field("format", &self.fmt)
            .field("root", &format_args!("{:#x}", self.root))
            .field("tracking", &self.tracking)
            .finish()
    }
}

/// Index of `iova` in a table at `level`.
#[inline]
pub(crate) fn index(level: u8, iova: u64) -> usize {
    ((iova >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize
}

/// The slice of entry indices of a table at `level` whose first entry maps `base` that overlap
/// `[start, end)`.
#[inline]
pub(crate) fn span(level: u8, base: u64, start: u64, end: u64) -> (usize, usize) {
    let shift = level_shift(level);
    let first = if start > base {
        ((start - base) >> shift) as usize
    } else {
        0
    };
    let last = ((end - 1 - base) >> shift).min(ENTRIES as u64 - 1) as usize;
    (first, last + 1)
}

impl<F: PageTableFormat, M: PhysMem> PageTable<F, M> {
    /// An empty table (one zeroed root frame).
    pub fn new(fmt: F, mem: M) -> Result<Self, Error> {
        let root = mem.alloc_frame().ok_or(Error::NoMemory)?;
        Ok(PageTable {
            fmt,
            mem,
            root,
            tracking: false,
        })
    }

    /// The format.
    pub fn format(&self) -> &F {
        &self.fmt
    }

    /// The table memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Physical address of the root table (for the DTE, PASID entry, CD or STE).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Whether new writable leaves carry PTE-level dirty tracking (Arm DBM); see
    /// [`set_dirty_tracking`](Self::set_dirty_tracking).
    pub fn dirty_tracking(&self) -> bool {
        self.tracking
    }

    pub(crate) fn frame(&self, pa: u64, level: u8, iova: u64) -> Result<&Frame, Error> {
        self.mem.frame(pa).ok_or(Error::BadTablePointer {
            iova,
            level: level + 1,
            pa,
        })
    }

    pub(crate) fn root_frame(&self) -> &Frame {
        // The root came from `mem.alloc_frame`, so it is always a frame of `mem`.
        self.mem
            .frame(self.root)
            .expect("the root table is a frame of its own memory")
    }

    /// Check `[iova, iova + size)` against the IOVA space; returns the exclusive end.
    pub(crate) fn check_range(&self, iova: u64, size: u64) -> Result<u64, Error> {
        if size == 0 {
            return Err(Error::EmptyRange { iova });
        }
        for (what, value) in [("IOVA", iova), ("size", size)] {
            if value % 4096 != 0 {
                return Err(Error::Unaligned {
                    what,
                    value,
                    align: 4096,
                });
            }
        }
        let bits = self.fmt.iova_bits();
        let end = iova.checked_add(size);
        match end {
            Some(end) if bits >= 64 || end <= 1u64 << bits => Ok(end),
            _ => Err(Error::IovaOutOfRange { iova, size, bits }),
        }
    }

    pub(crate) fn malformed(raw: u64, level: u8, iova: u64, why: &'static str) -> Error {
        Error::Malformed {
            iova,
            level,
            raw,
            why,
        }
    }

    /// Map `[iova, iova + size)` to `[pa, pa + size)` using the largest fitting page sizes.
    pub fn map(&mut self, iova: u64, pa: u64, size: u64, perm: Perm) -> Result<(), Error> {
        self.map_sizes(iova, pa, size, perm, self.fmt.page_sizes())
    }

    /// As [`map`](Self::map), choosing page sizes only from the bitmap `sizes`.
    ///
    /// Errors name the rule: empty, unaligned (to the smallest allowed size) or out-of-range
    /// requests, sizes the format lacks, permissions it cannot express, and overlap with an
    /// existing mapping. On error nothing is mapped.
    pub fn map_sizes(
        &mut self,
        iova: u64,
        pa: u64,
        size: u64,
        perm: Perm,
        sizes: u64,
    ) -> Result<(), Error> {
        let supported = self.fmt.page_sizes();
        if sizes == 0 || sizes & !supported != 0 {
            return Err(Error::PageSize {
                format: self.fmt.kind(),
                size: sizes & !supported,
                supported,
            });
        }
        if !perm.read && !perm.write {
            return Err(Error::NoAccess);
        }
        if !perm.read && !self.fmt.write_only() {
            return Err(Error::WriteOnly(self.fmt.kind()));
        }
        let end = self.check_range(iova, size)?;
        let min = 1u64 << sizes.trailing_zeros();
        for (what, value) in [("IOVA", iova), ("physical address", pa), ("size", size)] {
            if value % min != 0 {
                return Err(Error::Unaligned {
                    what,
                    value,
                    align: min,
                });
            }
        }
        let oa = self.fmt.oa_bits();
        if pa.checked_add(size).is_none_or(|e| e > 1u64 << oa) {
            return Err(Error::PaOutOfRange { pa, size, bits: oa });
        }
        if let Some(at) = self.first_mapped(iova, end)? {
            return Err(Error::Overlap { iova: at });
        }
        let mut done = 0u64;
        while done < size {
            let (cur, cpa, left) = (iova + done, pa + done, size - done);
            // Largest allowed size that fits what is left and both alignments.
            let mut pick = min;
            let mut cand = sizes;
            while cand != 0 {
                let s = 1u64 << (63 - cand.leading_zeros());
                cand &= !s;
                if s <= left && cur % s == 0 && cpa % s == 0 {
                    pick = s;
                    break;
                }
            }
            if let Err(e) = self.install_leaf(cur, cpa, pick, perm) {
                self.rollback_map(iova, done);
                return Err(e);
            }
            done += pick;
        }
        Ok(())
    }

    /// Clear the leaves of a partially completed map. Tables stay allocated: an IOMMU may have
    /// walked into them, and freeing would need an IOTLB flush the map path does not own.
    fn rollback_map(&mut self, iova: u64, len: u64) {
        let mut off = 0;
        while off < len {
            match self.slot_of(iova + off) {
                Some((frame, i, size)) => {
                    let (_, reps) = self.fmt.leaf_slot(size);
                    let first = i & !(reps - 1);
                    for slot in &frame[first..first + reps] {
                        slot.store(0, Ordering::Release);
                    }
                    off += size;
                }
                None => off += 4096,
            }
        }
    }

    /// The frame, index and page size of the leaf mapping `iova`.
    fn slot_of(&self, iova: u64) -> Option<(&Frame, usize, u64)> {
        let mut frame = self.root_frame();
        let mut level = self.fmt.levels();
        loop {
            let i = index(level, iova);
            let raw = frame[i].load(Ordering::Acquire);
            match self.fmt.decode(raw, level) {
                Pte::Table { pa } if level > 1 => {
                    frame = self.mem.frame(pa)?;
                    level -= 1;
                }
                Pte::Leaf(l) => return Some((frame, i, l.size)),
                _ => return None,
            }
        }
    }

    fn install_leaf(&mut self, iova: u64, pa: u64, size: u64, perm: Perm) -> Result<(), Error> {
        let (leaf_level, reps) = self.fmt.leaf_slot(size);
        let mut level = self.fmt.levels();
        let mut table = self.root;
        while level > leaf_level {
            let frame = self.frame(table, level, iova)?;
            let i = index(level, iova);
            let raw = frame[i].load(Ordering::Acquire);
            table = match self.fmt.decode(raw, level) {
                Pte::Table { pa } => pa,
                Pte::Absent => {
                    let new = self.mem.alloc_frame().ok_or(Error::NoMemory)?;
                    // The new frame is zeroed; publish it with release ordering so a walker
                    // that sees the pointer sees the zeroes.
                    frame[i].store(self.fmt.table(new, level), Ordering::Release);
                    new
                }
                Pte::Leaf(_) => return Err(Error::Overlap { iova }),
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, iova, why)),
            };
            level -= 1;
        }
        let frame = self.frame(table, level, iova)?;
        let raw = self.fmt.leaf(pa, size, level, perm, self.tracking);
        let i = index(level, iova);
        for slot in &frame[i..i + reps] {
            slot.store(raw, Ordering::Release);
        }
        Ok(())
    }

    /// The first IOVA in `[start, end)` covered by a present leaf.
    fn first_mapped(&self, start: u64, end: u64) -> Result<Option<u64>, Error> {
        self.first_mapped_in(self.root, self.fmt.levels(), 0, start, end)
    }

    fn first_mapped_in(
        &self,
        table: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<u64>, Error> {
        let frame = self.frame(table, level, start)?;
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        for (i, slot) in frame.iter().enumerate().take(i1).skip(i0) {
            let raw = slot.load(Ordering::Acquire);
            let eb = base + i as u64 * esize;
            match self.fmt.decode(raw, level) {
                Pte::Absent => {}
                Pte::Leaf(_) => return Ok(Some(eb.max(start))),
                Pte::Table { pa } if level > 1 => {
                    if let Some(at) = self.first_mapped_in(pa, level - 1, eb, start, end)? {
                        return Ok(Some(at));
                    }
                }
                Pte::Table { .. } => {
                    return Err(Self::malformed(raw, level, eb, "table pointer at level 1"));
                }
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
            }
        }
        Ok(None)
    }

    /// Translate one IOVA. `Ok(None)` when nothing maps it.
    pub fn translate(&self, iova: u64) -> Result<Option<Translation>, Error> {
        let bits = self.fmt.iova_bits();
        if bits < 64 && iova >> bits != 0 {
            return Ok(None);
        }
        let mut level = self.fmt.levels();
        let mut frame = self.root_frame();
        loop {
            let raw = frame[index(level, iova)].load(Ordering::Acquire);
            match self.fmt.decode(raw, level) {
                Pte::Absent => return Ok(None),
                Pte::Table { pa } if level > 1 => {
                    frame = self.frame(pa, level, iova)?;
                    level -= 1;
                }
                Pte::Table { .. } => {
                    return Err(Self::malformed(
                        raw,
                        level,
                        iova,
                        "table pointer at level 1",
                    ));
                }
                Pte::Leaf(leaf) => {
                    let off = iova & (leaf.size - 1);
                    return Ok(Some(Translation {
                        pa: leaf.pa + off,
                        level,
                        page_iova: iova - off,
                        leaf,
                    }));
                }
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, iova, why)),
            }
        }
    }

    /// Visit every page that intersects `[iova, iova + size)`, in IOVA order, once each
    /// (replicated AMD-Vi pages are visited once).
    pub fn walk(&self, iova: u64, size: u64, mut visit: impl FnMut(&Mapping)) -> Result<(), Error> {
        let end = self.check_range(iova, size)?;
        let mut last_page = None;
        self.walk_in(
            self.root,
            self.fmt.levels(),
            0,
            iova,
            end,
            &mut last_page,
            &mut visit,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_in(
        &self,
        table: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        last_page: &mut Option<u64>,
        visit: &mut dyn FnMut(&Mapping),
    ) -> Result<(), Error> {
        let frame = self.frame(table, level, start)?;
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        for (i, slot) in frame.iter().enumerate().take(i1).skip(i0) {
            let raw = slot.load(Ordering::Acquire);
            let eb = base + i as u64 * esize;
            match self.fmt.decode(raw, level) {
                Pte::Absent => {}
                Pte::Table { pa } if level > 1 => {
                    self.walk_in(pa, level - 1, eb, start, end, last_page, visit)?;
                }
                Pte::Table { .. } => {
                    return Err(Self::malformed(raw, level, eb, "table pointer at level 1"));
                }
                Pte::Leaf(leaf) => {
                    let page = eb & !(leaf.size - 1);
                    if *last_page != Some(page) {
                        *last_page = Some(page);
                        visit(&Mapping {
                            iova: page,
                            level,
                            leaf,
                            raw,
                        });
                    }
                }
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
            }
        }
        Ok(())
    }

    /// Unmap `[iova, iova + size)`; returns the number of bytes that were mapped.
    ///
    /// Holes are skipped; a page that the range would cut is an error (nothing is changed).
    /// Tables the range covers entirely are freed after `flush` is called for the range.
    pub fn unmap(
        &mut self,
        iova: u64,
        size: u64,
        flush: &mut impl IotlbFlush,
    ) -> Result<u64, Error> {
        self.unmap_read_dirty(iova, size, &mut (), flush)
    }

    /// [`unmap`](Self::unmap) that also reports the dirty state of every page it removes (the
    /// kernel's unmap path with `IOMMU_DIRTY_NO_CLEAR` semantics): the last value of each entry is
    /// taken with an atomic swap, so a write the IOMMU recorded up to that instant is reported.
    pub fn unmap_read_dirty(
        &mut self,
        iova: u64,
        size: u64,
        dirty: &mut impl DirtySink,
        flush: &mut impl IotlbFlush,
    ) -> Result<u64, Error> {
        let end = self.check_range(iova, size)?;
        // Refuse before changing anything if either end cuts a page.
        for probe in [iova, end - 1] {
            if let Some(t) = self.translate(probe)? {
                let (pi, ps) = (t.page_iova, t.leaf.size);
                if pi < iova || pi + (ps - 1) > end - 1 {
                    return Err(Error::PartialLeaf {
                        iova,
                        size,
                        leaf_iova: pi,
                        leaf_size: ps,
                    });
                }
            }
        }
        let mut freed = Vec::new();
        let mut bytes = 0;
        let r = self.unmap_in(
            self.root,
            self.fmt.levels(),
            0,
            iova,
            end,
            dirty,
            &mut freed,
            &mut bytes,
        );
        if bytes > 0 || !freed.is_empty() {
            flush.flush(iova, size);
        }
        for pa in freed {
            self.mem.free_frame(pa);
        }
        r.map(|()| bytes)
    }

    #[allow(clippy::too_many_arguments)]
    fn unmap_in(
        &self,
        table: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        dirty: &mut dyn DirtySink,
        freed: &mut Vec<u64>,
        bytes: &mut u64,
    ) -> Result<(), Error> {
        let frame = self.frame(table, level, start)?;
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        for (i, slot) in frame.iter().enumerate().take(i1).skip(i0) {
            let raw = slot.load(Ordering::Acquire);
            let eb = base + i as u64 * esize;
            match self.fmt.decode(raw, level) {
                Pte::Absent => {}
                Pte::Leaf(leaf) => {
                    let old = slot.swap(0, Ordering::AcqRel);
                    if self.fmt.is_dirty(old, level) {
                        dirty.record(eb & !(leaf.size - 1), leaf.size);
                    }
                    *bytes += esize;
                }
                Pte::Table { pa } if level > 1 => {
                    self.unmap_in(pa, level - 1, eb, start, end, dirty, freed, bytes)?;
                    if start <= eb && eb + (esize - 1) < end {
                        slot.store(0, Ordering::Release);
                        self.collect_tables(pa, level - 1, freed);
                    }
                }
                Pte::Table { .. } => {
                    return Err(Self::malformed(raw, level, eb, "table pointer at level 1"));
                }
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
            }
        }
        Ok(())
    }

    /// Push `table` and every table below it.
    pub(crate) fn collect_tables(&self, table: u64, level: u8, out: &mut Vec<u64>) {
        out.push(table);
        if level == 1 {
            return;
        }
        let Some(frame) = self.mem.frame(table) else {
            return;
        };
        for slot in frame.iter() {
            let raw = slot.load(Ordering::Acquire);
            if let Pte::Table { pa } = self.fmt.decode(raw, level)
                && self.mem.frame(pa).is_some()
            {
                self.collect_tables(pa, level - 1, out);
            }
        }
    }

    /// Every table frame with its level, root first.
    pub fn tables(&self) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        self.tables_in(self.root, self.fmt.levels(), &mut out);
        out
    }

    fn tables_in(&self, table: u64, level: u8, out: &mut Vec<(u8, u64)>) {
        out.push((level, table));
        if level == 1 {
            return;
        }
        let Some(frame) = self.mem.frame(table) else {
            return;
        };
        for slot in frame.iter() {
            if let Pte::Table { pa } = self.fmt.decode(slot.load(Ordering::Acquire), level)
                && self.mem.frame(pa).is_some()
            {
                self.tables_in(pa, level - 1, out);
            }
        }
    }

    /// A line per page (`iova+size -> pa perm flags raw`), for inspection and snapshots.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        let bits = self.fmt.iova_bits();
        let top = if bits >= 64 { !0xfff } else { 1u64 << bits };
        let _ = writeln!(
            s,
            "{} levels={} iova_bits={} tables={}",
            self.fmt.kind(),
            self.fmt.levels(),
            bits,
            self.tables().len()
        );
        let r = self.walk(0, top, |m| {
            let l = &m.leaf;
            let _ = writeln!(
                s,
                "{:#014x}+{:<9x} -> {:#014x} {} L{}{}{}{} {:#018x}",
                m.iova,
                l.size,
                l.pa,
                l.perm,
                m.level,
                if l.accessed { " A" } else { "" },
                if l.dirty { " D" } else { "" },
                if l.dbm { " DBM" } else { "" },
                m.raw
            );
        });
        if let Err(e) = r {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

impl<F: PageTableFormat, M: PhysMem> Drop for PageTable<F, M> {
    fn drop(&mut self) {
        let mut all = Vec::new();
        self.collect_tables(self.root, self.fmt.levels(), &mut all);
        for pa in all {
            self.mem.free_frame(pa);
        }
    }
}
