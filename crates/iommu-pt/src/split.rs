//! Splitting pages into smaller ones and collapsing them back, without losing a dirty bit.
//!
//! ```text
//!  split:     block B ──(build child table; every child inherits B's A/D state)──>
//!             compare-and-swap B -> table pointer   (fails if the IOMMU touched B: redo)
//!             ... one flush for the whole range at the end
//!
//!  collapse:  table T of 512 contiguous, identical leaves ──>
//!             compare-and-swap pointer -> block (dirty = OR of the children)
//!             flush, then re-read the children: a write that went through a stale
//!             IOTLB entry or walk before the flush is ORed into the block; free T
//! ```
//!
//! Neither operation passes through an invalid entry, so DMA to the range never faults. On
//! SMMUv3 the direct swap done here is allowed only with break-before-make level 2
//! ([`SmmuCaps::bbm_level`](crate::caps::SmmuCaps::bbm_level); IHI 0070 G.b §3.21.1.3). Level 1
//! allows a live change of size only through the nT bit (bit 16 of the block descriptor): set
//! nT, invalidate the block, replace, invalidate (§3.21.1.2); a direct swap may raise
//! F_TLB_CONFLICT. This crate does not implement that sequence, so
//! [`DirtySupport::live_split`](crate::caps::DirtySupport::live_split) is `false` at level 1.
//! At level 0 the architecture demands an invalid entry, which in-flight DMA would hit (seed 003).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::Error;
use crate::format::{BitOp, Leaf, PageTableFormat, Pte, level_size};
use crate::mem::{Frame, PhysMem};
use crate::table::IotlbFlush;
use crate::table::{PageTable, span};

/// What [`PageTable::split`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitStats {
    /// Pages that were split.
    pub split: u64,
    /// Tables allocated.
    pub tables: u64,
}

/// What [`PageTable::collapse`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CollapseStats {
    /// Tables replaced by a block.
    pub collapsed: u64,
    /// Of those, blocks that came out dirty.
    pub dirty: u64,
    /// Blocks whose dirty state came from a write seen only after the flush.
    pub late_dirty: u64,
}

fn apply_atomic(slot: &AtomicU64, op: BitOp) {
    match op {
        BitOp::Clear(m) => {
            slot.fetch_and(!m, Ordering::AcqRel);
        }
        BitOp::Set(m) => {
            slot.fetch_or(m, Ordering::AcqRel);
        }
    }
}

/// A collapsed table waiting for the flush.
struct Pending<'a> {
    block: &'a AtomicU64,
    block_level: u8,
    children: u64,
    dirty: bool,
}

impl<F: PageTableFormat, M: PhysMem> PageTable<F, M> {
    /// Split every page larger than `to_size` that intersects `[iova, iova + size)` into pages
    /// of `to_size`. Every new entry inherits the accessed/dirty state of the page it came
    /// from (for a replicated AMD-Vi page: dirty if any replica is). `flush` is called once
    /// for the range after the last replacement.
    ///
    /// If table memory runs out part-way, the pages already split stay split (the translation
    /// is unchanged either way) and [`Error::NoMemory`] is returned after the flush.
    pub fn split(
        &mut self,
        iova: u64,
        size: u64,
        to_size: u64,
        flush: &mut impl IotlbFlush,
    ) -> Result<SplitStats, Error> {
        let end = self.check_range(iova, size)?;
        let supported = self.fmt.page_sizes();
        if !to_size.is_power_of_two() || to_size & supported == 0 {
            return Err(Error::PageSize {
                format: self.fmt.kind(),
                size: to_size,
                supported,
            });
        }
        let mut stats = SplitStats::default();
        let r = self.split_in(
            self.root,
            self.fmt.levels(),
            0,
            iova,
            end,
            to_size,
            &mut stats,
        );
        if stats.split > 0 {
            flush.flush(iova, size);
        }
        r.map(|()| stats)
    }

    #[allow(clippy::too_many_arguments)]
    fn split_in(
        &self,
        table: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        to_size: u64,
        stats: &mut SplitStats,
    ) -> Result<(), Error> {
        let frame = self.frame(table, level, start)?;
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        let mut i = i0;
        while i < i1 {
            let raw = frame[i].load(Ordering::Acquire);
            let eb = base + i as u64 * esize;
            match self.fmt.decode(raw, level) {
                Pte::Absent => i += 1,
                Pte::Table { pa } => {
                    if esize > to_size {
                        self.split_in(pa, level - 1, eb, start, end, to_size, stats)?;
                    }
                    i += 1;
                }
                Pte::Leaf(leaf) if leaf.size > to_size => {
                    let n = (leaf.size / esize).max(1) as usize;
                    let g0 = i & !(n - 1);
                    self.split_group(frame, g0, n, level, leaf, to_size, stats)?;
                    i = g0 + n;
                }
                Pte::Leaf(_) => i += 1,
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
            }
        }
        Ok(())
    }

    /// Replace the `n` slots `frame[g0..g0 + n]` holding one page.
    #[allow(clippy::too_many_arguments)]
    fn split_group(
        &self,
        frame: &Frame,
        g0: usize,
        n: usize,
        level: u8,
        leaf: Leaf,
        to_size: u64,
        stats: &mut SplitStats,
    ) -> Result<(), Error> {
        let esize = level_size(level);
        let (to_level, _) = self.fmt.leaf_slot(to_size);
        let slots = &frame[g0..g0 + n];
        // The page is dirty if any replica is (AMD-Vi §2.2.3.2); learn it before building.
        let mut any_dirty = slots
            .iter()
            .any(|s| self.fmt.is_dirty(s.load(Ordering::Acquire), level));
        // (slot index, value published) for the slots already replaced.
        let mut published: Vec<(usize, u64)> = Vec::with_capacity(n);
        for (k, slot) in slots.iter().enumerate() {
            let slot_pa = leaf.pa + k as u64 * esize;
            let mut old = slot.load(Ordering::Acquire);
            loop {
                if self.fmt.is_dirty(old, level) && !any_dirty {
                    // The IOMMU dirtied a replica while we were splitting its siblings.
                    any_dirty = true;
                    for &(pk, v) in &published {
                        if to_level == level {
                            apply_atomic(&slots[pk], self.fmt.dirty_op());
                        } else if let Pte::Table { pa } = self.fmt.decode(v, level) {
                            self.mark_subtree_dirty(pa, level - 1);
                        }
                    }
                }
                let mut src = old;
                if any_dirty {
                    src = self.fmt.dirty_op().apply(src);
                }
                let new = if to_level == level {
                    // AMD-Vi: a smaller replicated page in the same table, rewritten in place.
                    let child = (k as u64 * esize) / to_size * to_size;
                    self.fmt.resize_leaf(src, leaf.pa + child, to_size, level)
                } else {
                    let t = self.build(src, slot_pa, level - 1, to_size, stats)?;
                    self.fmt.table(t, level)
                };
                match slot.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        published.push((k, new));
                        break;
                    }
                    Err(cur) => {
                        // The IOMMU set A/D meanwhile; discard what we built and retry.
                        if to_level != level
                            && let Pte::Table { pa } = self.fmt.decode(new, level)
                        {
                            let mut v = Vec::new();
                            self.collect_tables(pa, level - 1, &mut v);
                            stats.tables -= v.len() as u64;
                            for t in v {
                                self.mem.free_frame(t);
                            }
                        }
                        old = cur;
                    }
                }
            }
        }
        stats.split += 1;
        Ok(())
    }

    /// Mark every writable leaf under `table` dirty (atomically: the IOMMU may be walking it).
    fn mark_subtree_dirty(&self, table: u64, level: u8) {
        let Some(frame) = self.mem.frame(table) else {
            return;
        };
        for slot in frame.iter() {
            let raw = slot.load(Ordering::Acquire);
            match self.fmt.decode(raw, level) {
                Pte::Table { pa } if level > 1 => self.mark_subtree_dirty(pa, level - 1),
                Pte::Leaf(l) if l.perm.write => apply_atomic(slot, self.fmt.dirty_op()),
                _ => {}
            }
        }
    }

    /// Build (unpublished) a table at `level` mapping `level_size(level + 1)` bytes at `pa`
    /// with pages of `to_size`, each a resized copy of `src`. Returns its address.
    fn build(
        &self,
        src: u64,
        pa: u64,
        level: u8,
        to_size: u64,
        stats: &mut SplitStats,
    ) -> Result<u64, Error> {
        let (to_level, _) = self.fmt.leaf_slot(to_size);
        let table = self.mem.alloc_frame().ok_or(Error::NoMemory)?;
        stats.tables += 1;
        let frame = self.mem.frame(table).ok_or(Error::NoMemory)?;
        let esize = level_size(level);
        for (j, slot) in frame.iter().enumerate() {
            let cpa = pa + j as u64 * esize;
            let v = if level == to_level {
                let page = if to_size > esize {
                    cpa & !(to_size - 1)
                } else {
                    cpa
                };
                self.fmt.resize_leaf(src, page, to_size, level)
            } else {
                match self.build(src, cpa, level - 1, to_size, stats) {
                    Ok(t) => self.fmt.table(t, level),
                    Err(e) => {
                        let mut v = Vec::new();
                        self.collect_tables(table, level, &mut v);
                        stats.tables -= v.len() as u64;
                        for t in v {
                            self.mem.free_frame(t);
                        }
                        return Err(e);
                    }
                }
            };
            slot.store(v, Ordering::Relaxed);
        }
        Ok(table)
    }

    /// Replace every table in `[iova, iova + size)` whose 512 leaves map one contiguous,
    /// aligned physical block with identical attributes by a single block entry, when the format
    /// supports that block size. The block is dirty (accessed) if any child was. Tables whose
    /// children differ are left alone. Works bottom-up, so 4 KiB pages can become a 1 GiB block
    /// in one call.
    pub fn collapse(
        &mut self,
        iova: u64,
        size: u64,
        flush: &mut impl IotlbFlush,
    ) -> Result<CollapseStats, Error> {
        let end = self.check_range(iova, size)?;
        let mut stats = CollapseStats::default();
        let mut pending = Vec::new();
        let r = self.collapse_in(
            self.root_frame(),
            self.fmt.levels(),
            0,
            iova,
            end,
            &mut pending,
        );
        if !pending.is_empty() {
            flush.flush(iova, size);
        }
        // In the order they were made (deepest first), so a late dirty bit found in a 4 KiB
        // table reaches its 2 MiB block before that block's table is re-read for the 1 GiB one.
        for p in &pending {
            stats.collapsed += 1;
            let late = !p.dirty && self.children_dirty(p.children, p.block_level - 1);
            if late {
                apply_atomic(p.block, self.fmt.dirty_op());
                stats.late_dirty += 1;
            }
            if p.dirty || late {
                stats.dirty += 1;
            }
        }
        for p in pending {
            self.mem.free_frame(p.children);
        }
        r.map(|()| stats)
    }

    fn children_dirty(&self, table: u64, level: u8) -> bool {
        self.mem.frame(table).is_some_and(|f| {
            f.iter()
                .any(|s| self.fmt.is_dirty(s.load(Ordering::Acquire), level))
        })
    }

    fn collapse_in<'a>(
        &'a self,
        frame: &'a Frame,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        pending: &mut Vec<Pending<'a>>,
    ) -> Result<(), Error> {
        if level == 1 {
            return Ok(());
        }
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        for (i, slot) in frame.iter().enumerate().take(i1).skip(i0) {
            let eb = base + i as u64 * esize;
            let raw = slot.load(Ordering::Acquire);
            let child = match self.fmt.decode(raw, level) {
                Pte::Table { pa } => pa,
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
                _ => continue,
            };
            let cframe = self.frame(child, level, eb)?;
            self.collapse_in(cframe, level - 1, eb, start, end, pending)?;
            let covered = start <= eb && eb + (esize - 1) < end;
            if !covered || self.fmt.page_sizes() & esize == 0 {
                continue;
            }
            let Some((block, dirty)) = self.collapsible(cframe, level - 1, esize) else {
                continue;
            };
            let mut cur = raw;
            loop {
                match slot.compare_exchange(cur, block, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        pending.push(Pending {
                            block: slot,
                            block_level: level,
                            children: child,
                            dirty,
                        });
                        break;
                    }
                    // The IOMMU may set an accessed bit in a pointer entry (VT-d); retry as
                    // long as it still points at the same table.
                    Err(now) if self.fmt.decode(now, level) == (Pte::Table { pa: child }) => {
                        cur = now;
                    }
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }

    /// If the 512 entries of `frame` (a table at `level`) are leaves of that level's size
    /// mapping one aligned block of `block_size` with identical attributes, the block entry
    /// (with the ORed accessed/dirty state) and whether it is dirty.
    fn collapsible(&self, frame: &Frame, level: u8, block_size: u64) -> Option<(u64, bool)> {
        let esize = level_size(level);
        let acc = self.fmt.accessed_bit();
        let norm = |raw: u64| {
            let r = if self.fmt.is_dirty(raw, level) {
                self.fmt.clean_op().apply(raw)
            } else {
                raw
            };
            r & !acc
        };
        let first = frame[0].load(Ordering::Acquire);
        let Pte::Leaf(l0) = self.fmt.decode(first, level) else {
            return None;
        };
        if l0.size != esize || l0.pa % block_size != 0 {
            return None;
        }
        let n0 = norm(first);
        let (mut any_dirty, mut any_acc) = (false, false);
        for (j, slot) in frame.iter().enumerate() {
            let raw = slot.load(Ordering::Acquire);
            if self.fmt.leaf_size(raw, level) != esize {
                return None;
            }
            let want = self
                .fmt
                .resize_leaf(n0, l0.pa + j as u64 * esize, esize, level);
            if norm(raw) != want {
                return None;
            }
            any_dirty |= self.fmt.is_dirty(raw, level);
            any_acc |= raw & acc != 0;
        }
        let mut block = self.fmt.resize_leaf(n0, l0.pa, block_size, level + 1);
        if any_acc {
            block |= acc;
        }
        if any_dirty {
            block = self.fmt.dirty_op().apply(block);
        }
        Some((block, any_dirty))
    }
}
