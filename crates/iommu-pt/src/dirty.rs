//! Dirty harvesting: read-and-clear with batched IOTLB flushes, and PTE-level tracking toggles.
//!
//! ```text
//!  for each batch window [w, w + batch) of the range:
//!      scan leaves ── dirty? ──> record page in the sink
//!                      └──────> clean the entry (unless no_clear)
//!      if anything was cleaned: flush(w, batch)      <- once per window, never per entry
//! ```
//!
//! Why the flush: an IOMMU may keep a translation in its IOTLB together with the fact that the
//! entry is already dirty. Until that IOTLB entry is invalidated, further writes through it do
//! not set the (now clean) dirty bit again. Writes that land between the clean and the flush are
//! still caught, because the page was reported dirty in this very harvest and the caller copies
//! it only after `read_and_clear_dirty` returns (after the flush). See the `model` feature for
//! an IOTLB that behaves this way.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::Error;
use crate::format::{BitOp, PageTableFormat, Pte, level_size};
use crate::mem::PhysMem;
use crate::table::{DirtySink, IotlbFlush, PageTable, span};

/// A dirty bitmap over `[base, base + len)` with a power-of-two granule, one bit per granule,
/// little-endian 64-bit words (the layout of iommufd's `IOMMU_HWPT_GET_DIRTY_BITMAP`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBits {
    base: u64,
    len: u64,
    shift: u32,
    words: Vec<u64>,
}

impl DirtyBits {
    /// A clear bitmap. `granule` is a power of two of at least 4 KiB; `base` and `len` are
    /// multiples of it and `len` is not zero.
    pub fn new(base: u64, len: u64, granule: u64) -> Result<Self, Error> {
        if !granule.is_power_of_two() || granule < 4096 {
            return Err(Error::Config(
                "bitmap granule must be a power of two of at least 4 KiB",
            ));
        }
        if len == 0 {
            return Err(Error::EmptyRange { iova: base });
        }
        for (what, value) in [("bitmap base", base), ("bitmap length", len)] {
            if value % granule != 0 {
                return Err(Error::Unaligned {
                    what,
                    value,
                    align: granule,
                });
            }
        }
        if base.checked_add(len).is_none() {
            return Err(Error::Config("bitmap range wraps around 2^64"));
        }
        let bits = len / granule;
        let words = usize::try_from(bits.div_ceil(64))
            .map_err(|_| Error::Config("bitmap too large for this machine"))?;
        Ok(DirtyBits {
            base,
            len,
            shift: granule.trailing_zeros(),
            words: alloc::vec![0; words],
        })
    }

    /// First IOVA covered.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: a bitmap covers at least one granule.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes per bit.
    pub fn granule(&self) -> u64 {
        1 << self.shift
    }

    /// The bitmap words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether the granule holding `iova` is dirty (`false` outside the range).
    pub fn is_set(&self, iova: u64) -> bool {
        if iova < self.base || iova - self.base >= self.len {
            return false;
        }
        let b = (iova - self.base) >> self.shift;
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Number of dirty granules.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// IOVAs of the dirty granules, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(wi, &w)| {
            let mut m = w;
            core::iter::from_fn(move || {
                if m == 0 {
                    return None;
                }
                let k = m.trailing_zeros();
                m &= m - 1;
                Some(self.base + ((wi as u64 * 64 + u64::from(k)) << self.shift))
            })
        })
    }

    /// Clear every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    fn set_bits(&mut self, first: u64, last: u64) {
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        let lo = !0u64 << (first % 64);
        let hi = !0u64 >> (63 - last % 64);
        if fw == lw {
            self.words[fw] |= lo & hi;
        } else {
            self.words[fw] |= lo;
            self.words[fw + 1..lw].fill(!0);
            self.words[lw] |= hi;
        }
    }
}

impl DirtySink for DirtyBits {
    fn record(&mut self, iova: u64, len: u64) {
        let end = self.base + self.len;
        let s = iova.max(self.base);
        let e = iova.saturating_add(len).min(end);
        if s >= e {
            return;
        }
        self.set_bits(
            (s - self.base) >> self.shift,
            (e - 1 - self.base) >> self.shift,
        );
    }

    fn record_mask(&mut self, iova: u64, page: u64, mask: u64) {
        let fits = page == 1 << self.shift
            && iova >= self.base
            && (iova - self.base).is_multiple_of(page)
            && iova.saturating_add(64 * page) <= self.base + self.len;
        if !fits {
            let mut m = mask;
            while m != 0 {
                let k = m.trailing_zeros();
                m &= m - 1;
                self.record(iova + u64::from(k) * page, page);
            }
            return;
        }
        let b = (iova - self.base) >> self.shift;
        let (w, o) = ((b / 64) as usize, b % 64);
        self.words[w] |= mask << o;
        if o != 0 {
            let rest = mask >> (64 - o);
            if rest != 0 {
                self.words[w + 1] |= rest;
            }
        }
    }
}

/// Options of [`PageTable::read_and_clear_dirty`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HarvestOptions {
    /// Report without cleaning (iommufd's `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`).
    pub no_clear: bool,
    /// IOVA bytes per batch: the IOTLB flush hook is called once per batch window in which
    /// something was cleaned. A non-zero multiple of 4 KiB; windows are aligned to it.
    pub batch: u64,
    /// Clear the accessed flag ([`PageTableFormat::accessed_bit`]) of every leaf that is
    /// cleaned, together with its dirty state.
    ///
    /// For the x86-64 first stage on QEMU 10.0's intel-iommu, whose A/D update does nothing
    /// when any flag it would set is already set: a leaf left with A = 1 never gets D again, so
    /// a harvest that clears only D loses every later write (`shared/recipes/vtd-firmware.md`,
    /// measured). Harmless on hardware that follows the VT-d specification (the next walk sets
    /// A again). Only for formats and contexts where the IOMMU sets the accessed flag: on Arm
    /// without HTTU access-flag updates a clear AF makes the next access fault.
    pub clear_accessed: bool,
}

impl Default for HarvestOptions {
    fn default() -> Self {
        HarvestOptions {
            no_clear: false,
            batch: 1 << 30,
            clear_accessed: false,
        }
    }
}

/// What a harvest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HarvestStats {
    /// Dirty pages found (a replicated AMD-Vi page counts once per dirty replica).
    pub dirty: u64,
    /// Entries cleaned.
    pub cleaned: u64,
    /// Entries cleaned with a plain store (their A/D state was final; see
    /// [`PageTableFormat::settled`]).
    pub plain_stores: u64,
    /// Flush hook calls.
    pub flushes: u64,
}

#[inline(always)]
fn atomic_apply(slot: &AtomicU64, op: BitOp) {
    match op {
        BitOp::Clear(m) => {
            slot.fetch_and(!m, Ordering::AcqRel);
        }
        BitOp::Set(m) => {
            slot.fetch_or(m, Ordering::AcqRel);
        }
    }
}

/// The OR and the AND of the entries of `chunk`, with four independent accumulators each
/// (one dependency chain per entry would cap the scan at one entry per cycle).
#[inline(always)]
fn or_and(chunk: &[AtomicU64]) -> (u64, u64) {
    let (mut o, mut a) = ([0u64; 4], [!0u64; 4]);
    let mut quads = chunk.chunks_exact(4);
    for q in &mut quads {
        for j in 0..4 {
            let raw = q[j].load(Ordering::Relaxed);
            o[j] |= raw;
            a[j] &= raw;
        }
    }
    for e in quads.remainder() {
        let raw = e.load(Ordering::Relaxed);
        o[0] |= raw;
        a[0] &= raw;
    }
    (o[0] | o[1] | o[2] | o[3], a[0] & a[1] & a[2] & a[3])
}

/// Whether some entry of a set whose OR is `or` and AND is `and` has `(raw ^ flip) & mask`
/// non-zero: a bit of `mask` that is clear in `flip` and set in some entry, or set in `flip`
/// and clear in some entry.
#[inline(always)]
fn differs(or: u64, and: u64, flip: u64, mask: u64) -> bool {
    ((or & !flip) | (!and & flip)) & mask != 0
}

/// Prefetch every cache line of a table frame (a hint; no architectural effect).
#[inline(always)]
fn prefetch_frame(f: &crate::mem::Frame) {
    #[cfg(target_arch = "x86_64")]
    for line in f.chunks_exact(8) {
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch never faults or changes
        // memory; the pointer is into a live frame anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = f;
}

impl<F: PageTableFormat, M: PhysMem> PageTable<F, M> {
    /// Report every dirty page in `[iova, iova + size)` to `sink` and, unless
    /// `opts.no_clear`, clean it; call `flush` once per batch window in which entries were
    /// cleaned.
    ///
    /// A page larger than 4 KiB reports its whole range; a replicated AMD-Vi page is dirty if
    /// any replica is, and all its replicas are cleaned together. Ranges are recorded with the
    /// sink's own granule (a [`DirtyBits`] of 4 KiB, 2 MiB, ...).
    ///
    /// Cleaning is atomic with respect to the IOMMU: an entry whose accessed/dirty state can
    /// still change is cleaned with one atomic read-modify-write (`fetch_and`/`fetch_or`, as
    /// Linux's `test_and_clear_bit`). An entry whose every hardware-updatable bit is already
    /// final ([`PageTableFormat::settled`] — e.g. AMD/VT-d A and D both set, Arm AF set and
    /// write permission taken) cannot be changed by the IOMMU before software cleans it, so a
    /// plain store of the cleaned value loses nothing and avoids a locked instruction per
    /// entry; this is what makes a fully dirty table cheap to harvest.
    ///
    /// On error (a malformed or dangling entry) the sink holds every page cleaned so far and
    /// the flush for them has been issued.
    pub fn read_and_clear_dirty(
        &mut self,
        iova: u64,
        size: u64,
        sink: &mut impl DirtySink,
        opts: HarvestOptions,
        flush: &mut impl IotlbFlush,
    ) -> Result<HarvestStats, Error> {
        let end = self.check_range(iova, size)?;
        if opts.batch == 0 || !opts.batch.is_multiple_of(4096) {
            return Err(Error::Unaligned {
                what: "batch size",
                value: opts.batch,
                align: 4096,
            });
        }
        let mut stats = HarvestStats::default();
        let acc = if opts.clear_accessed {
            self.fmt.accessed_bit()
        } else {
            0
        };
        let mut w = iova;
        while w < end {
            let next = (w / opts.batch)
                .checked_add(1)
                .and_then(|n| n.checked_mul(opts.batch))
                .map_or(end, |n| n.min(end));
            let before = stats.cleaned;
            let r = self.harvest_in(
                self.root,
                self.fmt.levels(),
                0,
                w,
                next,
                sink,
                opts.no_clear,
                acc,
                &mut stats,
            );
            if stats.cleaned != before {
                flush.flush(w, next - w);
                stats.flushes += 1;
            }
            r?;
            w = next;
        }
        Ok(stats)
    }

    #[allow(clippy::too_many_arguments)]
    fn harvest_in<S: DirtySink>(
        &self,
        table: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        sink: &mut S,
        no_clear: bool,
        acc: u64,
        stats: &mut HarvestStats,
    ) -> Result<(), Error> {
        let frame = self.frame(table, level, start)?;
        if level == 1 {
            self.scan::<S, false>(frame, 1, base, start, end, sink, no_clear, acc, stats)
        } else {
            self.scan::<S, true>(frame, level, base, start, end, sink, no_clear, acc, stats)
        }
    }

    /// The hot loop, over one table in chunks of 64 entries.
    ///
    /// Per entry it does one mask test ([`PageTableFormat::fast_dirty`]): a settled, dirty,
    /// single-entry leaf — the overwhelming case — is cleaned with a plain store whose target
    /// is chosen without a branch (the entry or a scratch word), and collected into a 64-bit
    /// mask recorded with one [`DirtySink::record_mask`]. Entries that only pass the one-bit
    /// [`dirty_hint`](PageTableFormat::dirty_hint) (not settled, replicated, unusual) take the
    /// exact path afterwards. A chunk that follows a chunk without any candidate is first
    /// OR- and AND-reduced (four independent accumulators each) and skipped whole if it has
    /// none either, so sparse tables cost one load and at most two ALU operations per entry.
    /// Upper-level tables also collect table pointers to descend, and prefetch the next leaf
    /// table before scanning the current one.
    /// `acc` is the accessed bit to clear with the dirty state (0 for none).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn scan<S: DirtySink, const TABLES: bool>(
        &self,
        frame: &crate::mem::Frame,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        sink: &mut S,
        no_clear: bool,
        acc: u64,
        stats: &mut HarvestStats,
    ) -> Result<(), Error> {
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        let (flip, hint) = self.fmt.dirty_hint();
        let (tflip, thint) = self.fmt.table_hint();
        let (fm, fv, cx) = self.fmt.fast_dirty(level);
        let (mut dense, mut all_fast) = (false, false);
        let mut i = i0;
        while i < i1 {
            let n = (i1 - i).min(64);
            let chunk = &frame[i..i + n];
            let full = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            if !dense {
                let (or, and) = or_and(chunk);
                if !differs(or, and, flip, hint) && (!TABLES || !differs(or, and, tflip, thint)) {
                    i += n;
                    continue;
                }
            }
            let (mut fmask, mut tmask, mut hmask) = (0u64, 0u64, 0u64);
            if all_fast {
                // The previous chunk was entirely settled dirty leaves: expect the same and
                // clean in the same pass, branching (predictably) on the mask test; only the
                // exceptions are recorded.
                let mut miss = 0u64;
                for (k, e) in chunk.iter().enumerate() {
                    let raw = e.load(Ordering::Relaxed);
                    if raw & fm == fv {
                        if !no_clear {
                            e.store((raw ^ cx) & !acc, Ordering::Relaxed);
                        }
                    } else {
                        miss |= 1 << k;
                        if TABLES && self.fmt.is_table(raw, level) {
                            tmask |= 1 << k;
                        } else if (raw ^ flip) & hint != 0 {
                            hmask |= 1 << k;
                        }
                    }
                }
                fmask = full & !miss;
            } else {
                // Pass A: classify. `fmask`: settled dirty leaves (the mask test); `tmask`: table
                // pointers; `nacc`: OR of the hint bits of every other entry.
                let mut nacc = 0u64;
                if n == 64 {
                    // Full chunk: groups of eight with constant shifts, fully unrolled.
                    for g in 0..8 {
                        let (mut bits, mut tbits) = (0u64, 0u64);
                        for k in 0..8 {
                            let raw = chunk[g * 8 + k].load(Ordering::Relaxed);
                            let fast = raw & fm == fv;
                            bits |= u64::from(fast) << k;
                            nacc |= (raw ^ flip) & (u64::from(fast)).wrapping_sub(1);
                            if TABLES {
                                tbits |= u64::from(self.fmt.is_table(raw, level)) << k;
                            }
                        }
                        fmask |= bits << (g * 8);
                        tmask |= tbits << (g * 8);
                    }
                } else {
                    for (k, e) in chunk.iter().enumerate() {
                        let raw = e.load(Ordering::Relaxed);
                        let fast = raw & fm == fv;
                        fmask |= u64::from(fast) << k;
                        nacc |= (raw ^ flip) & (u64::from(fast)).wrapping_sub(1);
                        if TABLES {
                            tmask |= u64::from(self.fmt.is_table(raw, level)) << k;
                        }
                    }
                }
                // Pass B: clean the settled dirty leaves with plain stores. They are settled, so
                // the IOMMU cannot have changed them since pass A: the reload sees the same value.
                if !no_clear && fmask != 0 {
                    if fmask == full {
                        for e in chunk {
                            e.store((e.load(Ordering::Relaxed) ^ cx) & !acc, Ordering::Relaxed);
                        }
                    } else {
                        let mut m = fmask;
                        while m != 0 {
                            let e = &chunk[m.trailing_zeros() as usize];
                            m &= m - 1;
                            e.store((e.load(Ordering::Relaxed) ^ cx) & !acc, Ordering::Relaxed);
                        }
                    }
                }
                // Other entries with the hint bit: candidates for the exact path below.
                if nacc & hint != 0 {
                    let mut rest = !fmask & !tmask & full;
                    while rest != 0 {
                        let k = rest.trailing_zeros() as usize;
                        rest &= rest - 1;
                        let raw = chunk[k].load(Ordering::Relaxed);
                        hmask |= u64::from((raw ^ flip) & hint != 0) << k;
                    }
                }
            }
            dense = (hmask | fmask) != 0;
            all_fast = fmask == full;
            if fmask != 0 {
                // Account before anything below can fail: the caller flushes if we cleaned.
                let c = u64::from(fmask.count_ones());
                stats.dirty += c;
                if !no_clear {
                    stats.cleaned += c;
                    stats.plain_stores += c;
                }
                sink.record_mask(base + i as u64 * esize, esize, fmask);
            }
            // Candidates the mask test did not settle: exact checks, atomic cleaning.
            let mut slow = hmask;
            let mut next = i;
            while slow != 0 {
                let k = slow.trailing_zeros() as usize;
                slow &= slow - 1;
                if i + k < next {
                    continue; // handled with its replica group
                }
                let raw = frame[i + k].load(Ordering::Acquire);
                if self.fmt.is_dirty(raw, level) {
                    next = self.harvest_entry(
                        frame,
                        i + k,
                        level,
                        base,
                        raw,
                        sink,
                        no_clear,
                        acc,
                        stats,
                    )?;
                }
            }
            while TABLES && tmask != 0 {
                let k = tmask.trailing_zeros() as usize;
                tmask &= tmask - 1;
                let raw = frame[i + k].load(Ordering::Acquire);
                let eb = base + (i + k) as u64 * esize;
                match self.fmt.decode(raw, level) {
                    Pte::Table { pa } => {
                        let child = self.frame(pa, level, eb)?;
                        if level == 2 {
                            // The hardware prefetcher stops at the 4 KiB page boundary and
                            // the next leaf table is anywhere: start fetching it now.
                            let nk = if tmask != 0 {
                                i + tmask.trailing_zeros() as usize
                            } else {
                                i + n
                            };
                            if nk < i1 {
                                self.prefetch_table(frame[nk].load(Ordering::Relaxed), level);
                            }
                            self.scan::<S, false>(
                                child, 1, eb, start, end, sink, no_clear, acc, stats,
                            )?;
                        } else {
                            self.harvest_in(
                                pa,
                                level - 1,
                                eb,
                                start,
                                end,
                                sink,
                                no_clear,
                                acc,
                                stats,
                            )?;
                        }
                    }
                    Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
                    _ => return Err(Self::malformed(raw, level, eb, "inconsistent table entry")),
                }
            }
            i += n;
        }
        Ok(())
    }

    /// Ask the CPU to start loading the table `raw` (an entry of a table at `level`) points
    /// to, if it is a table pointer into this memory. A hint only: nothing is read.
    #[inline(always)]
    fn prefetch_table(&self, raw: u64, level: u8) {
        // Nested, not a let chain: those need Rust 1.88, the workspace declares 1.85.
        if let Pte::Table { pa } = self.fmt.decode(raw, level)
            && let Some(f) = self.mem.frame(pa)
        {
            prefetch_frame(f);
        }
    }

    /// Clean one entry that was seen dirty with value `raw`, clearing the bits `acc` too; `true`
    /// if a plain store did it.
    #[inline(always)]
    fn clean(&self, slot: &AtomicU64, raw: u64, acc: u64) -> bool {
        let op = self.fmt.clean_op();
        if self.fmt.settled(raw) {
            slot.store(op.apply(raw) & !acc, Ordering::Relaxed);
            return true;
        }
        match (op, acc) {
            (_, 0) => atomic_apply(slot, op),
            (BitOp::Clear(m), _) => atomic_apply(slot, BitOp::Clear(m | acc)),
            (BitOp::Set(_), _) => {
                // Two bit operations in opposite directions: one compare-and-swap loop.
                let mut cur = raw;
                while let Err(now) = slot.compare_exchange_weak(
                    cur,
                    op.apply(cur) & !acc,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    cur = now;
                }
            }
        }
        false
    }

    /// Harvest the dirty leaf at `frame[i]` (value `raw`) of a table at `level` whose entry 0
    /// maps `base`; returns the next index to look at.
    #[allow(clippy::too_many_arguments)]
    fn harvest_entry<S: DirtySink>(
        &self,
        frame: &crate::mem::Frame,
        i: usize,
        level: u8,
        base: u64,
        raw: u64,
        sink: &mut S,
        no_clear: bool,
        acc: u64,
        stats: &mut HarvestStats,
    ) -> Result<usize, Error> {
        let esize = level_size(level);
        if F::REPLICATES && self.fmt.is_replica(raw) {
            let eb = base + i as u64 * esize;
            let page = match self.fmt.decode(raw, level) {
                Pte::Leaf(l) => l.size,
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
                _ => return Err(Self::malformed(raw, level, eb, "inconsistent leaf entry")),
            };
            // All replicas of the page, even those outside the range: they are one page.
            let n = (page / esize) as usize;
            let g0 = i & !(n - 1);
            let mut any = false;
            for slot in &frame[g0..g0 + n] {
                let r = slot.load(Ordering::Acquire);
                if self.fmt.is_dirty(r, level) {
                    any = true;
                    stats.dirty += 1;
                    if !no_clear {
                        stats.plain_stores += u64::from(self.clean(slot, r, acc));
                        stats.cleaned += 1;
                    }
                }
            }
            if any {
                sink.record(base + g0 as u64 * esize, page);
            }
            return Ok(g0 + n);
        }
        stats.dirty += 1;
        if !no_clear {
            stats.plain_stores += u64::from(self.clean(&frame[i], raw, acc));
            stats.cleaned += 1;
        }
        sink.record(base + i as u64 * esize, esize);
        Ok(i + 1)
    }

    /// Turn PTE-level dirty tracking on or off for every writable leaf intersecting
    /// `[iova, iova + size)` and for leaves mapped from now on; returns the number of entries
    /// rewritten.
    ///
    /// For Arm (SMMUv3) this flips DBM/AP\[2\] (stage 1) or DBM/S2AP\[1\] (stage 2): enabling
    /// makes writable leaves writable-clean (entries already tracking keep their dirty state),
    /// disabling makes them plainly writable. Each entry changes with a compare-and-swap, so
    /// a concurrent hardware update is never overwritten; `flush` is called once if anything
    /// changed. AMD-Vi and VT-d enable tracking in the device context instead
    /// ([`AmdDte`](crate::config::AmdDte), [`VtdPasidEntry`](crate::config::VtdPasidEntry));
    /// for them this only records the setting and returns 0.
    pub fn set_dirty_tracking(
        &mut self,
        iova: u64,
        size: u64,
        enable: bool,
        flush: &mut impl IotlbFlush,
    ) -> Result<u64, Error> {
        let end = self.check_range(iova, size)?;
        self.tracking = enable;
        if !self.fmt.tracking_in_pte() {
            return Ok(0);
        }
        let mut changed = 0;
        let r = self.track_in(
            self.root,
            self.fmt.levels(),
            0,
            iova,
            end,
            enable,
            &mut changed,
        );
        if changed > 0 {
            flush.flush(iova, size);
        }
        r.map(|()| changed)
    }

    /// Clears the accessed flag of every leaf in `[iova, iova + size)` that has it set but is
    /// not dirty (dirty leaves are [`read_and_clear_dirty`](Self::read_and_clear_dirty)'s),
    /// then flushes the range if anything changed; returns how many leaves changed.
    ///
    /// The specification needs no such pass. QEMU 10.0's VT-d does: it never sets D on a
    /// first-stage leaf whose A is already set, so a page a device only read keeps A = 1 and
    /// a later write to it would never be reported (docs/qemu-vtd-firmware.md, the rig case
    /// `vtdfw.harvest_reports_exactly_the_written_pages`). Run it with each harvest on such a
    /// unit. A no-op (0) for formats without an accessed flag.
    pub fn clear_accessed(
        &mut self,
        iova: u64,
        size: u64,
        flush: &mut impl IotlbFlush,
    ) -> Result<u64, Error> {
        let end = self.check_range(iova, size)?;
        let acc = self.fmt.accessed_bit();
        if acc == 0 {
            return Ok(0);
        }
        let mut changed = 0;
        let r = self.clear_accessed_in(
            self.root,
            self.fmt.levels(),
            0,
            iova,
            end,
            acc,
            &mut changed,
        );
        if changed > 0 {
            flush.flush(iova, size);
        }
        r.map(|()| changed)
    }

    #[allow(clippy::too_many_arguments)]
    fn clear_accessed_in(
        &self,
        table: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        acc: u64,
        changed: &mut u64,
    ) -> Result<(), Error> {
        let frame = self.frame(table, level, start)?;
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        for (i, slot) in frame.iter().enumerate().take(i1).skip(i0) {
            let eb = base + i as u64 * esize;
            let raw = slot.load(Ordering::Acquire);
            match self.fmt.decode(raw, level) {
                Pte::Absent => {}
                Pte::Table { pa } if level > 1 => {
                    self.clear_accessed_in(pa, level - 1, eb, start, end, acc, changed)?;
                }
                Pte::Leaf(_) => {
                    // Only A is cleared, atomically: a D the hardware sets meanwhile stays.
                    if raw & acc != 0 && !self.fmt.is_dirty(raw, level) {
                        let prev = slot.fetch_and(!acc, Ordering::AcqRel);
                        if prev & acc != 0 {
                            *changed += 1;
                        }
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

    #[allow(clippy::too_many_arguments)]
    fn track_in(
        &self,
        table: u64,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
        enable: bool,
        changed: &mut u64,
    ) -> Result<(), Error> {
        let frame = self.frame(table, level, start)?;
        let (i0, i1) = span(level, base, start, end);
        let esize = level_size(level);
        for (i, slot) in frame.iter().enumerate().take(i1).skip(i0) {
            let eb = base + i as u64 * esize;
            let mut raw = slot.load(Ordering::Acquire);
            match self.fmt.decode(raw, level) {
                Pte::Absent => {}
                Pte::Table { pa } if level > 1 => {
                    self.track_in(pa, level - 1, eb, start, end, enable, changed)?;
                }
                Pte::Leaf(_) => loop {
                    let new = self.fmt.set_tracking(raw, enable);
                    if new == raw {
                        break;
                    }
                    match slot.compare_exchange(raw, new, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => {
                            *changed += 1;
                            break;
                        }
                        Err(cur) => raw = cur,
                    }
                },
                Pte::Table { .. } => {
                    return Err(Self::malformed(raw, level, eb, "table pointer at level 1"));
                }
                Pte::Malformed(why) => return Err(Self::malformed(raw, level, eb, why)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_record_and_mask() {
        let mut b = DirtyBits::new(0x10_0000, 1 << 20, 4096).unwrap();
        b.record(0x10_0000, 4096);
        b.record(0x10_3000, 3 * 4096);
        b.record(0, 0x10_1000); // clipped to the first granule
        b.record(0x20_0000, 4096); // outside
        assert_eq!(b.count(), 4);
        assert!(b.is_set(0x10_5fff) && !b.is_set(0x10_6000));
        b.clear();
        // Mask straddling a word boundary.
        b.record_mask(0x10_0000 + 60 * 4096, 4096, 0b1_1111_1111);
        let got: Vec<u64> = b.iter().collect();
        let want: Vec<u64> = (60..69).map(|k| 0x10_0000 + k * 4096).collect();
        assert_eq!(got, want);
        // Mask at the end of the range falls back to clipping.
        b.clear();
        b.record_mask(0x10_0000 + 250 * 4096, 4096, u64::MAX);
        assert_eq!(b.count(), 6);
        // Coarser granule.
        let mut c = DirtyBits::new(0, 1 << 30, 2 << 20).unwrap();
        c.record_mask(0, 4096, 1 | (1 << 63));
        assert_eq!(c.count(), 1);
        c.record(4 << 20, 4 << 20);
        assert_eq!(c.iter().collect::<Vec<_>>(), [0, 4 << 20, 6 << 20]);
    }

    #[test]
    fn plain_store_only_for_settled_entries() {
        use crate::format::AmdV1;
        use crate::{NoFlush, PageTable, Perm, TableArena};
        let arena = TableArena::new(0x10_0000, 16).unwrap();
        let mut pt = PageTable::new(AmdV1::new(3).unwrap(), &arena).unwrap();
        pt.map_sizes(0x40_0000, 0x80_0000, 0x4000, Perm::RW, 4096)
            .unwrap();
        let (a, d) = (1u64 << 5, 1u64 << 6);
        let table = pt.tables().into_iter().find(|&(l, _)| l == 1).unwrap().1;
        let slot = |k: usize| &arena.frame(table).unwrap()[(0x40_0000 / 4096 + k) % 512];
        slot(0).fetch_or(d, Ordering::Relaxed); // D without A: the IOMMU may still set A
        slot(1).fetch_or(a | d, Ordering::Relaxed); // settled
        let mut bits = DirtyBits::new(0x40_0000, 0x4000, 4096).unwrap();
        let no_clear = HarvestOptions {
            no_clear: true,
            ..HarvestOptions::default()
        };
        let st = pt
            .read_and_clear_dirty(0x40_0000, 0x4000, &mut bits, no_clear, &mut NoFlush)
            .unwrap();
        assert_eq!((st.dirty, st.cleaned, st.flushes), (2, 0, 0));
        let mut flushes = 0;
        let st = pt
            .read_and_clear_dirty(
                0x40_0000,
                0x4000,
                &mut bits,
                HarvestOptions::default(),
                &mut |_: u64, _: u64| flushes += 1,
            )
            .unwrap();
        assert_eq!(
            (st.dirty, st.cleaned, st.plain_stores, st.flushes),
            (2, 2, 1, 1)
        );
        assert_eq!(flushes, 1);
        assert_eq!(bits.iter().collect::<Vec<_>>(), [0x40_0000, 0x40_1000]);
        assert_eq!(slot(0).load(Ordering::Relaxed) & (a | d), 0);
        assert_eq!(slot(1).load(Ordering::Relaxed) & (a | d), a);
    }

    #[test]
    fn bitmap_rules() {
        assert!(DirtyBits::new(0, 4096, 1000).is_err());
        assert!(DirtyBits::new(0, 4096, 2048).is_err());
        assert!(DirtyBits::new(0, 0, 4096).is_err());
        assert!(DirtyBits::new(4096, 8192, 8192).is_err());
        assert!(DirtyBits::new(!0xfff, 8192, 4096).is_err());
    }

    /// A xorshift64 generator seeded with `state`.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    #[test]
    fn bitmap_set_bits_matches_naive() {
        let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let mut b = DirtyBits::new(0, 300 * 4096, 4096).unwrap();
            let mut naive = [false; 300];
            for _ in 0..5 {
                let s = rnd() % 300;
                let l = 1 + rnd() % (300 - s);
                b.record(s * 4096, l * 4096);
                for k in s..s + l {
                    naive[k as usize] = true;
                }
            }
            for (k, &n) in naive.iter().enumerate() {
                assert_eq!(b.is_set(k as u64 * 4096), n);
            }
        }
    }

    #[test]
    fn chunk_skip_test_matches_naive() {
        let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
        let mut hits = 0;
        for round in 0..4000 {
            let n = 1 + (rnd() % 64) as usize;
            // Entries that mostly agree on the tested bits, so both answers occur.
            let common = rnd();
            let chunk: Vec<AtomicU64> = (0..n)
                .map(|_| {
                    let noise = if rnd().is_multiple_of(8) {
                        1 << (rnd() % 64)
                    } else {
                        0
                    };
                    AtomicU64::new(common ^ noise)
                })
                .collect();
            let (flip, mask) = (rnd(), 1u64 << (round % 64) | 1 << (rnd() % 64));
            let naive = chunk
                .iter()
                .any(|e| (e.load(Ordering::Relaxed) ^ flip) & mask != 0);
            let (or, and) = or_and(&chunk);
            assert_eq!(differs(or, and, flip, mask), naive, "round {round}");
            hits += usize::from(naive);
        }
        assert!(
            hits > 500 && hits < 3500,
            "both outcomes tested ({hits} hits)"
        );
    }
}
