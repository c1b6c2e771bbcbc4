//! Dirty bitmaps: one bit per page of an IOVA range, in the kernel's layout.
//!
//! `IOMMU_HWPT_GET_DIRTY_BITMAP` (and VFIO's `DMA_LOGGING_REPORT`) fill an array of 64-bit words
//! in which bit `i` (word `i / 64`, bit `i % 64`) covers `[iova + i * page_size, +page_size)`,
//! relative to the request's `iova` (iommufd.h, and `iova_bitmap_set` in
//! drivers/iommu/iommufd/iova_bitmap.c). The kernel only ever *sets* bits. The start IOVA need only
//! be aligned to the page size, not to 64 pages.
//!
//! ```text
//!   iova                                  iova + length
//!    |<- page ->|                               |
//!    [ bit 0 ][ bit 1 ] ... [ bit 63 ][ bit 64 ] ...
//!    '------------ word 0 -----------''-- word 1 --
//! ```
//!
//! Words are kept in host order, as the kernel writes them; [`DirtyBitmap::to_le_bytes`] and
//! [`DirtyBitmap::from_le_bytes`] give the little-endian byte form for streams. Every
//! operation works a word (64 pages) at a time.

use crate::error::{Error, Op};

/// A run of dirty pages: `[iova, iova + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRun {
    /// First byte of the first dirty page.
    pub iova: u64,
    /// Bytes (a multiple of the page size).
    pub length: u64,
}

/// One bit per page over an IOVA range.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    iova: u64,
    length: u64,
    shift: u32,
    nbits: u64,
    words: Vec<u64>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("length", &format_args!("{:#x}", self.length))
            .field("page_size", &format_args!("{:#x}", self.page_size()))
            .field("dirty", &self.count())
            .finish()
    }
}

fn bad(rule: impl Into<String>) -> Error {
    Error::invalid(Op::Bitmap, rule)
}

/// Mask of the low `n` bits, `n` in `0..=64`.
#[inline]
fn low_mask(n: u64) -> u64 {
    if n >= 64 { !0 } else { (1u64 << n) - 1 }
}

/// Sets (or clears) bits `[first, first + n)`.
fn fill_bits(words: &mut [u64], first: u64, n: u64, set: bool) {
    if n == 0 {
        return;
    }
    let last = first + n - 1;
    let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
    let head = !0u64 << (first % 64);
    let tail = low_mask(last % 64 + 1);
    let apply = |w: &mut u64, m: u64| {
        if set { *w |= m } else { *w &= !m }
    };
    if fw == lw {
        apply(&mut words[fw], head & tail);
        return;
    }
    apply(&mut words[fw], head);
    for w in &mut words[fw + 1..lw] {
        *w = if set { !0 } else { 0 };
    }
    apply(&mut words[lw], tail);
}

/// ORs `src_nbits` bits of `src` into `dst` starting at bit `at`. The caller guarantees the
/// destination range exists.
fn or_shifted(dst: &mut [u64], at: u64, src: &[u64], src_nbits: u64) {
    let nwords = src_nbits.div_ceil(64) as usize;
    let base = (at / 64) as usize;
    let off = (at % 64) as u32;
    let tail = low_mask(src_nbits - (nwords as u64 - 1) * 64);
    if off == 0 {
        for (j, &w) in src[..nwords].iter().enumerate() {
            let w = if j + 1 == nwords { w & tail } else { w };
            dst[base + j] |= w;
        }
        return;
    }
    for (j, &w) in src[..nwords].iter().enumerate() {
        let w = if j + 1 == nwords { w & tail } else { w };
        dst[base + j] |= w << off;
        let hi = w >> (64 - off);
        if hi != 0 {
            dst[base + j + 1] |= hi;
        }
    }
}

/// Moves the bits at positions `0, k, 2k, ...` (k = 2^d, d ≤ 5) to `0, 1, 2, ...`.
#[inline]
fn compact_stride(mut x: u64, d: u32) -> u64 {
    for _ in 0..d {
        x &= 0x5555_5555_5555_5555;
        x = (x | (x >> 1)) & 0x3333_3333_3333_3333;
        x = (x | (x >> 2)) & 0x0f0f_0f0f_0f0f_0f0f;
        x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff;
        x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
        x = (x | (x >> 16)) & 0x0000_0000_ffff_ffff;
    }
    x
}

/// Moves bits `0, 1, 2, ...` (at most 64 / 2^d of them) to `0, k, 2k, ...` (k = 2^d, d ≤ 5).
#[inline]
fn spread_stride(mut x: u64, d: u32) -> u64 {
    for _ in 0..d {
        x &= 0x0000_0000_ffff_ffff;
        x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
        x = (x | (x << 2)) & 0x3333_3333_3333_3333;
        x = (x | (x << 1)) & 0x5555_5555_5555_5555;
    }
    x
}

impl DirtyBitmap {
    /// An all-clean bitmap over `[iova, iova + length)` at `page_size` bytes per bit.
    ///
    /// Rules (those of `iommufd_check_iova_range`): `page_size` a power of two; `iova` and
    /// `length` multiples of it; `length` non-zero; the range must not wrap.
    pub fn new(iova: u64, length: u64, page_size: u64) -> Result<DirtyBitmap, Error> {
        check_range(iova, length, page_size)?;
        let shift = page_size.trailing_zeros();
        let nbits = length >> shift;
        let nwords = usize::try_from(nbits.div_ceil(64))
            .map_err(|_| bad(format!("{nbits} pages do not fit in memory")))?;
        Ok(DirtyBitmap {
            iova,
            length,
            shift,
            nbits,
            words: vec![0; nwords],
        })
    }

    /// Builds a bitmap from kernel-layout words (host order). Bits beyond the range must be 0.
    pub fn from_words(
        iova: u64,
        length: u64,
        page_size: u64,
        words: Vec<u64>,
    ) -> Result<DirtyBitmap, Error> {
        let mut bm = DirtyBitmap::new(iova, length, page_size)?;
        if words.len() != bm.words.len() {
            return Err(bad(format!(
                "{} words given, the range needs {}",
                words.len(),
                bm.words.len()
            )));
        }
        bm.words = words;
        bm.check_tail()?;
        Ok(bm)
    }

    /// Decodes the little-endian byte form ([`to_le_bytes`](Self::to_le_bytes)); the byte
    /// count must be exactly 8 per word and bits beyond the range must be 0.
    pub fn from_le_bytes(
        iova: u64,
        length: u64,
        page_size: u64,
        bytes: &[u8],
    ) -> Result<DirtyBitmap, Error> {
        let mut bm = DirtyBitmap::new(iova, length, page_size)?;
        if bytes.len() != bm.words.len() * 8 {
            return Err(bad(format!(
                "{} bytes given, the range needs {}",
                bytes.len(),
                bm.words.len() * 8
            )));
        }
        for (w, b) in bm.words.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(b.try_into().expect("chunks of 8"));
        }
        bm.check_tail()?;
        Ok(bm)
    }

    fn check_tail(&self) -> Result<(), Error> {
        let used = self.nbits % 64;
        if used != 0
            && let Some(&last) = self.words.last()
            && last & !low_mask(used) != 0
        {
            return Err(bad("bits beyond the end of the range are set"));
        }
        Ok(())
    }

    /// The little-endian byte form: 8 bytes per word.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// First IOVA covered.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Bytes covered.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Bytes per bit.
    pub fn page_size(&self) -> u64 {
        1 << self.shift
    }

    /// Number of pages (bits).
    pub fn pages(&self) -> u64 {
        self.nbits
    }

    /// The words, in the kernel's layout.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Mutable words for the kernel to fill (crate-internal: the tail invariant must hold).
    pub(crate) fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Dirty bytes (`count() * page_size()`).
    pub fn dirty_bytes(&self) -> u64 {
        self.count() << self.shift
    }

    /// No page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Whether the page containing `addr` is dirty; `false` outside the range.
    pub fn is_dirty(&self, addr: u64) -> bool {
        if addr < self.iova || addr - self.iova >= self.length {
            return false;
        }
        let bit = (addr - self.iova) >> self.shift;
        self.words[(bit / 64) as usize] >> (bit % 64) & 1 == 1
    }

    fn bit_span(&self, iova: u64, length: u64) -> Result<(u64, u64), Error> {
        let end = iova.checked_add(length);
        if length == 0 || iova < self.iova || end.is_none_or(|e| e > self.iova + self.length) {
            return Err(bad(format!(
                "range {iova:#x}+{length:#x} is not inside the bitmap's {:#x}+{:#x}",
                self.iova, self.length
            )));
        }
        let first = (iova - self.iova) >> self.shift;
        let last = (iova + length - 1 - self.iova) >> self.shift;
        Ok((first, last - first + 1))
    }

    /// Marks every page touching `[iova, iova + length)` dirty.
    pub fn set_range(&mut self, iova: u64, length: u64) -> Result<(), Error> {
        let (first, n) = self.bit_span(iova, length)?;
        fill_bits(&mut self.words, first, n, true);
        Ok(())
    }

    /// Marks every page touching `[iova, iova + length)` clean.
    pub fn clear_range(&mut self, iova: u64, length: u64) -> Result<(), Error> {
        let (first, n) = self.bit_span(iova, length)?;
        fill_bits(&mut self.words, first, n, false);
        Ok(())
    }

    /// Marks every page dirty (the first round of a migration: seed 001, "populate full dirty").
    pub fn set_all(&mut self) {
        let nbits = self.nbits;
        fill_bits(&mut self.words, 0, nbits, true);
    }

    /// Marks every page clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Iterates maximal runs of dirty pages in address order.
    pub fn runs(&self) -> Runs<'_> {
        Runs { bm: self, pos: 0 }
    }

    /// ORs `other` into `self` (e.g. IOMMU and device trackers). `other` may have another page
    /// size (it is re-grained to this one) and another start, but must lie inside this range.
    pub fn union(&mut self, other: &DirtyBitmap) -> Result<(), Error> {
        let regrained;
        let other = if other.shift == self.shift {
            other
        } else {
            regrained = other.regrain(self.page_size())?;
            &regrained
        };
        let inside =
            other.iova >= self.iova && other.iova + other.length <= self.iova + self.length;
        if !inside {
            return Err(bad(format!(
                "cannot merge {:#x}+{:#x} into {:#x}+{:#x}: not inside",
                other.iova, other.length, self.iova, self.length
            )));
        }
        let at = (other.iova - self.iova) >> self.shift;
        or_shifted(&mut self.words, at, &other.words, other.nbits);
        Ok(())
    }

    /// The same dirty state at another page size. Coarser: a bit is set if any page it covers
    /// is dirty, and the range widens to the coarser alignment. Finer: each bit is replicated.
    pub fn regrain(&self, page_size: u64) -> Result<DirtyBitmap, Error> {
        if !page_size.is_power_of_two() {
            return Err(bad(format!(
                "page size {page_size:#x} is not a power of two"
            )));
        }
        let shift = page_size.trailing_zeros();
        match shift.cmp(&self.shift) {
            std::cmp::Ordering::Equal => Ok(self.clone()),
            std::cmp::Ordering::Greater => self.coarsen(shift),
            std::cmp::Ordering::Less => self.refine(shift),
        }
    }

    fn coarsen(&self, shift: u32) -> Result<DirtyBitmap, Error> {
        let page = 1u64 << shift;
        let new_iova = self.iova & !(page - 1);
        let end = self.iova + self.length;
        let new_end = end
            .checked_next_multiple_of(page)
            .ok_or_else(|| bad("range end overflows after alignment"))?;
        let mut out = DirtyBitmap::new(new_iova, new_end - new_iova, page)?;
        // Re-base the source so its bit 0 is at `new_iova` (an offset below one coarse page).
        let offset = (self.iova - new_iova) >> self.shift;
        let src_bits = offset + self.nbits;
        let shifted_storage;
        let src: &[u64] = if offset == 0 {
            &self.words
        } else {
            let mut v = vec![0u64; src_bits.div_ceil(64) as usize];
            or_shifted(&mut v, offset, &self.words, self.nbits);
            shifted_storage = v;
            &shifted_storage
        };
        let d = shift - self.shift;
        if d >= 6 {
            // Each output bit covers 2^(d-6) whole words.
            let per = 1usize << (d - 6);
            for (i, group) in src.chunks(per).enumerate() {
                if group.iter().any(|&w| w != 0) {
                    out.words[i / 64] |= 1 << (i % 64);
                }
            }
        } else {
            // Each source word yields 64 >> d output bits.
            let k = 1u32 << d;
            let per_word = 64 >> d;
            let every_k = (0..per_word).fold(0u64, |m, i| m | 1 << (i * k));
            for (j, &w) in src.iter().enumerate() {
                if w == 0 {
                    continue;
                }
                let mut r = w;
                let mut s = 1;
                while s < k {
                    r |= r >> s;
                    s <<= 1;
                }
                let bits = compact_stride(r & every_k, d);
                let at = j as u64 * u64::from(per_word);
                out.words[(at / 64) as usize] |= bits << (at % 64);
            }
        }
        Ok(out)
    }

    fn refine(&self, shift: u32) -> Result<DirtyBitmap, Error> {
        let mut out = DirtyBitmap::new(self.iova, self.length, 1 << shift)?;
        let d = self.shift - shift;
        if d >= 6 {
            let per = 1usize << (d - 6);
            for (i, chunk) in out.words.chunks_mut(per).enumerate() {
                if self.words[i / 64] >> (i % 64) & 1 == 1 {
                    chunk.fill(!0);
                }
            }
        } else {
            let k = 1u32 << d;
            let per_word: u32 = 64 >> d; // source bits per output word
            let fill = low_mask(u64::from(k));
            for (o, w) in out.words.iter_mut().enumerate() {
                let src_bit = o as u64 * u64::from(per_word);
                let src = self.words[(src_bit / 64) as usize] >> (src_bit % 64);
                let bits = src & low_mask(u64::from(per_word));
                if bits != 0 {
                    // Spread bit p to p * k, then fill each to k bits (no carries: groups are
                    // k apart and each fill is below k bits).
                    *w = spread_stride(bits, d).wrapping_mul(fill);
                }
            }
        }
        Ok(out)
    }
}

pub(crate) fn check_range(iova: u64, length: u64, page_size: u64) -> Result<(), Error> {
    if !page_size.is_power_of_two() {
        return Err(bad(format!(
            "page size {page_size:#x} is not a power of two"
        )));
    }
    if length == 0 {
        return Err(bad("length must be non-zero"));
    }
    if !iova.is_multiple_of(page_size) || !length.is_multiple_of(page_size) {
        return Err(bad(format!(
            "range {iova:#x}+{length:#x} is not aligned to the page size {page_size:#x}"
        )));
    }
    if iova.checked_add(length - 1).is_none() {
        return Err(bad(format!(
            "range {iova:#x}+{length:#x} overflows the 64-bit IOVA space"
        )));
    }
    Ok(())
}

/// Iterator over [`DirtyRun`]s; see [`DirtyBitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    bm: &'a DirtyBitmap,
    pos: u64,
}

impl Iterator for Runs<'_> {
    type Item = DirtyRun;

    fn next(&mut self) -> Option<DirtyRun> {
        let words = &self.bm.words;
        let nbits = self.bm.nbits;
        if self.pos >= nbits {
            return None;
        }
        // Next set bit at or after pos: skip clean words, eight at a time where possible.
        let mut i = (self.pos / 64) as usize;
        let mut w = words[i] & (!0u64 << (self.pos % 64));
        while w == 0 {
            i += 1;
            while i + 8 <= words.len() && words[i..i + 8].iter().fold(0, |a, &x| a | x) == 0 {
                i += 8;
            }
            if i == words.len() {
                self.pos = nbits;
                return None;
            }
            w = words[i];
        }
        let start = i as u64 * 64 + u64::from(w.trailing_zeros());
        // Next clear bit after start: skip all-dirty words, eight at a time where possible.
        let mut c = !words[i] & (!0u64 << (start % 64));
        while c == 0 {
            i += 1;
            while i + 8 <= words.len() && words[i..i + 8].iter().fold(!0, |a, &x| a & x) == !0 {
                i += 8;
            }
            if i == words.len() {
                break;
            }
            c = !words[i];
        }
        let end = if i == words.len() {
            nbits
        } else {
            (i as u64 * 64 + u64::from(c.trailing_zeros())).min(nbits)
        };
        self.pos = end;
        let shift = self.bm.shift;
        Some(DirtyRun {
            iova: self.bm.iova + (start << shift),
            length: (end - start) << shift,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The naive reference: one bool per page.
    #[derive(Debug, Clone)]
    struct Naive {
        iova: u64,
        page: u64,
        bits: Vec<bool>,
    }

    impl Naive {
        fn of(bm: &DirtyBitmap) -> Naive {
            Naive {
                iova: bm.iova(),
                page: bm.page_size(),
                bits: (0..bm.pages())
                    .map(|i| bm.is_dirty(bm.iova() + i * bm.page_size()))
                    .collect(),
            }
        }
        fn runs(&self) -> Vec<DirtyRun> {
            let mut out: Vec<DirtyRun> = Vec::new();
            for (i, &b) in self.bits.iter().enumerate() {
                if !b {
                    continue;
                }
                let addr = self.iova + i as u64 * self.page;
                match out.last_mut() {
                    Some(r) if r.iova + r.length == addr => r.length += self.page,
                    _ => out.push(DirtyRun {
                        iova: addr,
                        length: self.page,
                    }),
                }
            }
            out
        }
        fn dirty_at(&self, addr: u64) -> bool {
            addr >= self.iova
                && ((addr - self.iova) / self.page) < self.bits.len() as u64
                && self.bits[((addr - self.iova) / self.page) as usize]
        }
    }

    fn build(iova_pages: u64, npages: u64, shift: u32, dirty: &[(u64, u64)]) -> DirtyBitmap {
        let page = 1u64 << shift;
        let mut bm = DirtyBitmap::new(iova_pages * page, npages * page, page).unwrap();
        for &(a, l) in dirty {
            let a = a % npages;
            let l = (l % (npages - a)).max(1);
            bm.set_range(bm.iova() + a * page, l * page).unwrap();
        }
        bm
    }

    #[test]
    fn kernel_layout_bit_i_is_iova_plus_i_pages() {
        let mut bm = DirtyBitmap::new(0x3000, 130 * 0x1000, 0x1000).unwrap();
        bm.set_range(0x3000 + 64 * 0x1000, 1).unwrap();
        bm.set_range(0x3000 + 129 * 0x1000, 0x1000).unwrap();
        assert_eq!(bm.words(), &[0, 1, 0b10]);
        assert_eq!(bm.count(), 2);
        assert_eq!(bm.to_le_bytes()[8], 1);
        let back =
            DirtyBitmap::from_le_bytes(0x3000, 130 * 0x1000, 0x1000, &bm.to_le_bytes()).unwrap();
        assert_eq!(back, bm);
    }

    #[test]
    fn construction_rules_are_named() {
        let e = DirtyBitmap::new(0x800, 0x1000, 0x1000).unwrap_err();
        assert!(
            e.to_string().contains("not aligned to the page size"),
            "{e}"
        );
        let e = DirtyBitmap::new(0, 0, 0x1000).unwrap_err();
        assert!(e.to_string().contains("non-zero"), "{e}");
        let e = DirtyBitmap::new(0, 0x3000, 0x3000).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = DirtyBitmap::new(u64::MAX - 0xfff, 0x2000, 0x1000).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        // The very top page is representable.
        DirtyBitmap::new(u64::MAX - 0xfff, 0x1000, 0x1000).unwrap();
        let e = DirtyBitmap::from_words(0, 3 * 0x1000, 0x1000, vec![0b1000]).unwrap_err();
        assert!(e.to_string().contains("beyond the end"), "{e}");
        let e = DirtyBitmap::from_le_bytes(0, 3 * 0x1000, 0x1000, &[0; 7]).unwrap_err();
        assert!(e.to_string().contains("7 bytes given"), "{e}");
    }

    #[test]
    fn runs_cross_words_and_stop_at_the_end() {
        let mut bm = DirtyBitmap::new(0, 128 * 4096, 4096).unwrap();
        bm.set_all();
        assert_eq!(
            bm.runs().collect::<Vec<_>>(),
            vec![DirtyRun {
                iova: 0,
                length: 128 * 4096
            }]
        );
        bm.clear_range(60 * 4096, 10 * 4096).unwrap();
        let runs: Vec<_> = bm.runs().collect();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].iova, 70 * 4096);
        assert_eq!(runs[1].length, 58 * 4096);
    }

    #[test]
    fn regrain_examples() {
        // 4K -> 2M: any dirty 4K page marks its 2M block.
        let mut bm = DirtyBitmap::new(0x20_0000 + 0x1000, 1023 * 0x1000, 0x1000).unwrap();
        bm.set_range(0x40_0000, 0x1000).unwrap();
        let c = bm.regrain(0x20_0000).unwrap();
        assert_eq!((c.iova(), c.length(), c.count()), (0x20_0000, 0x40_0000, 1));
        assert!(c.is_dirty(0x40_0000) && !c.is_dirty(0x20_0000));
        // 2M -> 4K: replicated.
        let f = c.regrain(0x1000).unwrap();
        assert_eq!(f.count(), 512);
        assert!(f.is_dirty(0x40_0000) && f.is_dirty(0x5f_f000) && !f.is_dirty(0x60_0000));
    }

    fn arb_bitmap() -> impl Strategy<Value = DirtyBitmap> {
        (
            0u64..200,
            1u64..700,
            9u32..14,
            proptest::collection::vec((0u64..700, 0u64..90), 0..12),
        )
            .prop_map(|(start, n, shift, dirty)| build(start, n, shift, &dirty))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn runs_and_count_match_naive(bm in arb_bitmap()) {
            let naive = Naive::of(&bm);
            prop_assert_eq!(bm.runs().collect::<Vec<_>>(), naive.runs());
            prop_assert_eq!(bm.count(), naive.bits.iter().filter(|&&b| b).count() as u64);
        }

        #[test]
        fn set_and_clear_ranges_match_naive(
            bm in arb_bitmap(),
            ops in proptest::collection::vec((any::<bool>(), 0u64..1000, 1u64..5000), 1..10)
        ) {
            let mut bm = bm;
            let mut naive = Naive::of(&bm);
            for (set, a, l) in ops {
                let page = bm.page_size();
                let start = bm.iova() + (a * 97) % bm.length();
                let len = l.min(bm.iova() + bm.length() - start);
                if set { bm.set_range(start, len).unwrap() } else { bm.clear_range(start, len).unwrap() }
                let first = ((start - naive.iova) / page) as usize;
                let last = ((start + len - 1 - naive.iova) / page) as usize;
                for b in &mut naive.bits[first..=last] { *b = set; }
            }
            prop_assert_eq!(bm.runs().collect::<Vec<_>>(), naive.runs());
        }

        #[test]
        fn regrain_up_and_down_matches_naive(bm in arb_bitmap(), to_shift in 9u32..24) {
            let out = bm.regrain(1 << to_shift).unwrap();
            let naive = Naive::of(&bm);
            // Every output page is dirty iff some input page overlapping it is dirty.
            for i in 0..out.pages() {
                let lo = out.iova() + i * out.page_size();
                let hi = lo + out.page_size();
                let any = (0..naive.bits.len() as u64).any(|j| {
                    let a = naive.iova + j * naive.page;
                    naive.bits[j as usize] && a < hi && a + naive.page > lo
                });
                prop_assert_eq!(out.is_dirty(lo), any, "output page {} of {:?}", i, out);
            }
            // The output covers the input range.
            prop_assert!(out.iova() <= bm.iova());
            prop_assert!(out.iova() + out.length() >= bm.iova() + bm.length());
        }

        #[test]
        fn union_matches_naive(
            a in arb_bitmap(),
            sub_start in 0u64..700,
            sub_len in 1u64..700,
            shift_delta in -3i32..4,
            dirty in proptest::collection::vec((0u64..700, 0u64..60), 0..8)
        ) {
            // `b` lies inside `a`, possibly at another page size.
            let shift = (a.page_size().trailing_zeros() as i32 + shift_delta).clamp(9, 20) as u32;
            let page = 1u64 << shift;
            let lo = a.iova().next_multiple_of(page.max(a.page_size()));
            let hi = (a.iova() + a.length()) / page.max(a.page_size()) * page.max(a.page_size());
            prop_assume!(hi > lo);
            let span_pages = (hi - lo) / page;
            let start = lo + (sub_start % span_pages) * page;
            let pages = (sub_len % ((hi - start) / page)).max(1);
            let mut b = DirtyBitmap::new(start, pages * page, page).unwrap();
            for (x, l) in dirty {
                let x = x % pages;
                let l = (l % (pages - x)).max(1);
                b.set_range(start + x * page, l * page).unwrap();
            }
            let mut u = a.clone();
            u.union(&b).unwrap();
            let na = Naive::of(&a);
            let nb = Naive::of(&b);
            for i in 0..u.pages() {
                let lo = u.iova() + i * u.page_size();
                let hi = lo + u.page_size();
                let from_b = (0..nb.bits.len() as u64).any(|j| {
                    let x = nb.iova + j * nb.page;
                    nb.bits[j as usize] && x < hi && x + nb.page > lo
                });
                prop_assert_eq!(u.is_dirty(lo), na.dirty_at(lo) || from_b, "page {}", i);
            }
        }
    }

    #[test]
    fn union_outside_is_refused() {
        let mut a = DirtyBitmap::new(0x10000, 0x10000, 0x1000).unwrap();
        let b = DirtyBitmap::new(0x1f000, 0x2000, 0x1000).unwrap();
        let e = a.union(&b).unwrap_err();
        assert!(e.to_string().contains("not inside"), "{e}");
    }
}
