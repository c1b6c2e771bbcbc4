//! Page bitmaps over guest-physical address space.

/// One bit per page of `[0, pages * page_size)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    page_shift: u32,
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    /// An empty bitmap of `pages` pages of `page_size` (a power of two) bytes.
    pub fn new(pages: u64, page_size: u64) -> PageBitmap {
        assert!(
            page_size.is_power_of_two(),
            "page size must be a power of two"
        );
        PageBitmap {
            page_shift: page_size.trailing_zeros(),
            pages,
            words: vec![0; usize::try_from(pages.div_ceil(64)).expect("bitmap fits memory")],
        }
    }

    /// The page size.
    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words (bit `i % 64` of word `i / 64` is page `i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words, for trackers that fill them directly.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Marks page `page`; returns whether it was clear. Out-of-range pages are ignored.
    pub fn set(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, b) = ((page / 64) as usize, page % 64);
        let was = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        was
    }

    /// Whether page `page` is marked.
    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Marks every page intersecting `[addr, addr + len)`, clipped to the bitmap.
    pub fn set_bytes(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = addr >> self.page_shift;
        let last =
            (addr.saturating_add(len - 1) >> self.page_shift).min(self.pages.saturating_sub(1));
        if first > last || first >= self.pages {
            return;
        }
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

    /// Marks every page.
    pub fn set_all(&mut self) {
        self.words.fill(!0);
        let tail = self.pages % 64;
        if tail != 0
            && let Some(w) = self.words.last_mut()
        {
            *w = (1u64 << tail) - 1;
        }
    }

    /// ORs `pages` bits of `src` (bit `i` = page `first + i`) into this bitmap, a word at a
    /// time when `first` is 64-page aligned (every tracker's bitmap is, for RAM laid out on
    /// 256 KiB boundaries), bit by bit otherwise; bits past `pages` and past the end of this
    /// bitmap are ignored. Returns how many of the bits were set in `src`.
    pub fn or_bits(&mut self, first: u64, src: &[u64], pages: u64) -> u64 {
        let pages = pages.min(src.len() as u64 * 64);
        let mut n = 0;
        if first.is_multiple_of(64) {
            let start = (first / 64) as usize;
            let full = (pages / 64) as usize;
            let dst = self.words.get_mut(start..).unwrap_or_default();
            for (d, &w) in dst.iter_mut().zip(&src[..full]) {
                n += u64::from(w.count_ones());
                *d |= w;
            }
            let tail = pages % 64;
            if tail > 0 {
                let w = src[full] & (u64::MAX >> (64 - tail));
                n += u64::from(w.count_ones());
                if let Some(d) = self.words.get_mut(start + full) {
                    *d |= w;
                }
            }
            // Keep the unused high bits of the last word clear.
            if let Some(last) = self.words.last_mut() {
                let used = self.pages % 64;
                if used > 0 {
                    *last &= u64::MAX >> (64 - used);
                }
            }
        } else {
            for (wi, &w) in src.iter().enumerate() {
                let mut m = w;
                while m != 0 {
                    let bit = u64::from(m.trailing_zeros());
                    m &= m - 1;
                    if wi as u64 * 64 + bit < pages {
                        self.set(first + wi as u64 * 64 + bit);
                        n += 1;
                    }
                }
            }
        }
        n
    }

    /// ORs `other` (same geometry) into this bitmap.
    pub fn union(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of consecutive marked pages as `(first page, count)`, in order.
    pub fn runs(&self) -> Runs<'_> {
        self.runs_between(0, self.pages)
    }

    /// The runs of [`runs`](Self::runs) clipped to pages `[first, end)`.
    pub fn runs_between(&self, first: u64, end: u64) -> Runs<'_> {
        Runs {
            words: &self.words,
            pages: end.min(self.pages),
            at: first,
        }
    }

    /// Splits the marked pages into `parts` page ranges `[start, end)` holding nearly equal
    /// numbers of marked pages (the first ranges take one more when they do not divide); they
    /// cover all pages, in order.
    pub fn split(&self, parts: u64) -> Vec<(u64, u64)> {
        let parts = parts.max(1);
        let total = self.count();
        let mut cuts = Vec::with_capacity(parts as usize + 1);
        cuts.push(0);
        // Part k ends after `quota(k)` marked pages in all.
        let quota = |k: u64| total / parts * k + (total % parts).min(k);
        let mut seen = 0;
        let mut k = 1;
        for (first, count) in self.runs() {
            while k < parts && seen + count >= quota(k) {
                let cut = first + (quota(k) - seen);
                cuts.push(cut);
                k += 1;
            }
            seen += count;
        }
        while (cuts.len() as u64) < parts {
            cuts.push(self.pages);
        }
        cuts.push(self.pages);
        cuts.windows(2).map(|w| (w[0], w[1])).collect()
    }
}

/// Iterator over runs of marked pages; see [`PageBitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    words: &'a [u64],
    pages: u64,
    at: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        // Find the first set bit at or after `at`.
        let mut p = self.at;
        loop {
            if p >= self.pages {
                self.at = p;
                return None;
            }
            let w = self.words[(p / 64) as usize] >> (p % 64);
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            p += u64::from(w.trailing_zeros());
            break;
        }
        let start = p;
        // Find the first clear bit after it.
        loop {
            if p >= self.pages {
                break;
            }
            let w = !self.words[(p / 64) as usize] >> (p % 64);
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            p += u64::from(w.trailing_zeros());
            break;
        }
        let end = p.min(self.pages);
        self.at = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_balances_marked_pages_and_covers_everything() {
        let mut b = PageBitmap::new(1000, 4096);
        for p in [3u64, 4, 5, 6, 7, 100, 101, 500, 998, 999] {
            b.set(p);
        }
        for parts in 1..=12u64 {
            let s = b.split(parts);
            assert_eq!(s.len() as u64, parts);
            assert_eq!(s[0].0, 0);
            assert_eq!(s[s.len() - 1].1, 1000);
            let counts: Vec<u64> = s
                .iter()
                .map(|&(a, e)| b.runs_between(a, e).map(|(_, n)| n).sum())
                .collect();
            assert_eq!(counts.iter().sum::<u64>(), 10, "{parts}: {s:?}");
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(hi - lo <= 1, "{parts}: {counts:?}");
            for w in s.windows(2) {
                assert_eq!(w[0].1, w[1].0, "contiguous");
            }
        }
        assert_eq!(
            PageBitmap::new(64, 4096).split(3),
            vec![(0, 64), (64, 64), (64, 64)]
        );
        assert_eq!(
            b.runs_between(4, 101).collect::<Vec<_>>(),
            vec![(4, 4), (100, 1)]
        );
    }

    #[test]
    fn or_bits_word_wise_and_bit_wise_agree() {
        let src = [0b1011u64, u64::MAX, 0x8000_0000_0000_0001];
        for first in [0u64, 64, 3, 130] {
            for pages in [0u64, 1, 64, 70, 150, 192] {
                let mut a = PageBitmap::new(400, 4096);
                let n = a.or_bits(first, &src, pages);
                let mut b = PageBitmap::new(400, 4096);
                let mut m = 0;
                for i in 0..pages.min(192) {
                    if src[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                        b.set(first + i);
                        m += 1;
                    }
                }
                assert_eq!(a.words(), b.words(), "first {first} pages {pages}");
                assert_eq!(n, m, "first {first} pages {pages}");
            }
        }
        // Bits past the end of the bitmap are dropped, not written into the padding.
        let mut c = PageBitmap::new(70, 4096);
        c.or_bits(64, &[u64::MAX], 64);
        assert_eq!(c.count(), 6);
    }

    #[test]
    fn runs_and_ranges() {
        let mut b = PageBitmap::new(200, 4096);
        b.set_bytes(4096 * 3, 4096 * 2 + 1);
        b.set(63);
        b.set(64);
        b.set(199);
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![(3, 3), (63, 2), (199, 1)]
        );
        assert_eq!(b.count(), 6);
        b.set_all();
        assert_eq!(b.count(), 200);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, 200)]);
        b.clear();
        b.set_bytes(0, 200 * 4096 + 12345);
        assert_eq!(b.count(), 200, "clipped to the bitmap");
        assert!(!b.set(500));
    }
}
