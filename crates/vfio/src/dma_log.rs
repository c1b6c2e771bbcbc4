//! Device DMA logging: a device's own record of the pages its DMA wrote.
//!
//! vfio.h (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP/REPORT`): logging starts with a page size
//! hint and a list of IOVA ranges, page-aligned, non-overlapping; the kernel accepts at most
//! `PAGE_SIZE / 16` ranges (`LOG_MAX_RANGES` in vfio_main.c, E2BIG beyond) and a driver may
//! accept fewer. The device returns the page size it chose. A report reads *and clears* the log
//! of one range into a caller bitmap, bit `i` covering `[iova + i*page_size, +page_size)`; the
//! kernel only ever sets bits. Any report error means the log may be corrupt: treat everything
//! as dirty and restart tracking (vfio.h).
//!
//! Trackers with a fixed range budget must still cover all guest RAM plus the hotplug window
//! (seed 003's review, and QEMU's practice of one 32-bit and one 64-bit range): when a caller
//! gives more ranges than the device takes, [`merge_ranges`] closes the smallest gaps first
//! (the kernel's `vfio_combine_iova_ranges` policy) so the tracked set only ever grows — never
//! truncated.

use crate::error::{Access, Error, Feature, Op};

/// A range of IOVA space: `[iova, iova + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmaRange {
    /// First byte.
    pub iova: u64,
    /// Length in bytes (non-zero).
    pub length: u64,
}

impl DmaRange {
    /// `[iova, iova + length)`.
    pub fn new(iova: u64, length: u64) -> DmaRange {
        DmaRange { iova, length }
    }

    /// One past the last byte; `None` when the range ends exactly at 2^64.
    pub fn end(&self) -> Option<u64> {
        self.iova.checked_add(self.length)
    }

    /// The last byte.
    pub fn last(&self) -> u64 {
        self.iova.wrapping_add(self.length).wrapping_sub(1)
    }
}

/// The outcome of starting DMA logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaLogSession {
    /// The tracking granularity the device selected (it may differ from the hint).
    pub page_size: u64,
    /// The ranges actually handed to the device, after alignment and merging.
    pub ranges: Vec<DmaRange>,
}

/// The minimum report granularity the kernel accepts (`SZ_4K`, vfio_main.c).
pub const MIN_REPORT_PAGE_SIZE: u64 = 4096;

const START: Op = Op::Feature(Access::Set, Feature::DmaLoggingStart);
const REPORT: Op = Op::Feature(Access::Get, Feature::DmaLoggingReport);

fn invalid(op: Op, rule: impl Into<String>) -> Error {
    Error::InvalidArgument {
        op,
        rule: rule.into(),
    }
}

/// Aligns `ranges` to `page_size`, merges overlapping and touching ranges, then — while more
/// than `max_ranges` remain — joins the neighbours separated by the smallest gap (lowest address
/// first on ties). The result is sorted and covers every input byte.
pub fn merge_ranges(
    ranges: &[DmaRange],
    page_size: u64,
    max_ranges: usize,
) -> Result<Vec<DmaRange>, Error> {
    if !page_size.is_power_of_two() {
        return Err(invalid(
            START,
            format!("page size {page_size:#x} is not a power of two"),
        ));
    }
    if ranges.is_empty() {
        return Err(invalid(START, "at least one range is required"));
    }
    if max_ranges == 0 {
        return Err(invalid(START, "the device accepts no ranges"));
    }
    let mask = page_size - 1;
    // Work on inclusive [first, last] pairs so a range may end at 2^64 - 1.
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.length == 0 {
            return Err(invalid(
                START,
                format!("range at {:#x} has length 0", r.iova),
            ));
        }
        let Some(end) = r.end() else {
            return Err(invalid(
                START,
                format!(
                    "range {:#x}+{:#x} overflows the 64-bit IOVA space",
                    r.iova, r.length
                ),
            ));
        };
        let first = r.iova & !mask;
        let last = (end - 1) | mask;
        if last == u64::MAX {
            // iova + length would be 2^64: the kernel's overflow check refuses it (EOVERFLOW).
            return Err(invalid(
                START,
                format!(
                    "range {:#x}+{:#x}, aligned to {page_size:#x}, reaches the end of the \
                     64-bit IOVA space (iova + length overflows)",
                    r.iova, r.length
                ),
            ));
        }
        spans.push((first, last));
    }
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (first, last) in spans {
        match merged.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    if merged.len() > max_ranges {
        // Close the (len - max) smallest gaps. gap[i] separates merged[i] and merged[i + 1].
        let mut order: Vec<usize> = (0..merged.len() - 1).collect();
        order.sort_unstable_by_key(|&i| (merged[i + 1].0 - merged[i].1, i));
        let mut join = vec![false; merged.len() - 1];
        for &i in &order[..merged.len() - max_ranges] {
            join[i] = true;
        }
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(max_ranges);
        for (i, span) in merged.iter().enumerate() {
            if i > 0 && join[i - 1] {
                if let Some(prev) = out.last_mut() {
                    prev.1 = span.1;
                }
            } else {
                out.push(*span);
            }
        }
        merged = out;
    }
    merged
        .into_iter()
        .map(|(first, last)| Ok(DmaRange::new(first, last - first + 1)))
        .collect()
}

/// Number of u64 words a report bitmap needs for `length` bytes at `page_size` per bit.
pub fn bitmap_words(length: u64, page_size: u64) -> u64 {
    length.div_ceil(page_size).div_ceil(64)
}

/// Checks a report request the way the kernel will (vfio_main.c and iova_bitmap.c): page size a
/// power of two and at least 4 KiB, non-zero length, no overflow, bitmap large enough.
pub fn check_report(iova: u64, length: u64, page_size: u64, bitmap: &[u64]) -> Result<(), Error> {
    if page_size < MIN_REPORT_PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(invalid(
            REPORT,
            format!("page size {page_size:#x} must be a power of two of at least 4 KiB"),
        ));
    }
    if length == 0 {
        return Err(invalid(REPORT, "length must be non-zero"));
    }
    if iova.checked_add(length).is_none() {
        return Err(invalid(
            REPORT,
            format!("range {iova:#x}+{length:#x} overflows the 64-bit IOVA space"),
        ));
    }
    let need = bitmap_words(length, page_size);
    if (bitmap.len() as u64) < need {
        return Err(invalid(
            REPORT,
            format!(
                "bitmap holds {} words, the range needs {need}",
                bitmap.len()
            ),
        ));
    }
    Ok(())
}

/// A device DMA tracker (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
///
/// Implementors provide the raw operations; [`DmaLogger::start`] adds alignment, merging down to
/// the device's range budget and an E2BIG retry with fewer ranges.
pub trait DmaLogger {
    /// The most ranges the device accepts in one start. For a kernel device this is the core's
    /// guarantee, `PAGE_SIZE / 16`, unless the caller lowered it.
    fn dma_logging_max_ranges(&self) -> usize;

    /// Starts logging on already valid ranges (aligned, sorted, disjoint, within the budget);
    /// returns the page size the device selected.
    fn dma_logging_start_raw(&mut self, page_size: u64, ranges: &[DmaRange]) -> Result<u64, Error>;

    /// Reads and clears the log for `[iova, iova + length)`, setting (never clearing) bits in
    /// `bitmap`, one per `page_size`.
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), Error>;

    /// Stops logging.
    fn dma_logging_stop(&mut self) -> Result<(), Error>;

    /// Starts logging over `ranges` with `page_size` as the granularity hint. Ranges are aligned
    /// to the page size and merged until they fit the device's budget; if the device still
    /// refuses with E2BIG (a driver limit below the core's), the budget is halved and the start
    /// retried, down to a single range covering everything.
    fn start(&mut self, page_size: u64, ranges: &[DmaRange]) -> Result<DmaLogSession, Error> {
        let mut budget = self.dma_logging_max_ranges().max(1);
        loop {
            let merged = merge_ranges(ranges, page_size, budget)?;
            match self.dma_logging_start_raw(page_size, &merged) {
                Ok(page_size) => {
                    return Ok(DmaLogSession {
                        page_size,
                        ranges: merged,
                    });
                }
                Err(e) if e.errno() == Some(libc::E2BIG) && merged.len() > 1 => {
                    budget = merged.len() / 2;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A logger borrowed for a while (a tracker over a device its owner keeps).
impl<T: DmaLogger + ?Sized> DmaLogger for &mut T {
    fn dma_logging_max_ranges(&self) -> usize {
        (**self).dma_logging_max_ranges()
    }
    fn dma_logging_start_raw(&mut self, page_size: u64, ranges: &[DmaRange]) -> Result<u64, Error> {
        (**self).dma_logging_start_raw(page_size, ranges)
    }
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), Error> {
        (**self).dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&mut self) -> Result<(), Error> {
        (**self).dma_logging_stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K4: u64 = 4096;

    #[test]
    fn aligns_and_merges_touching_ranges() {
        let r = merge_ranges(
            &[
                DmaRange::new(0x2000, 0x1000),
                DmaRange::new(0x1800, 0x10), // inside page 0x1000 -> touches 0x2000
                DmaRange::new(0x10_0000, 1),
            ],
            K4,
            16,
        )
        .unwrap();
        assert_eq!(
            r,
            vec![
                DmaRange::new(0x1000, 0x2000),
                DmaRange::new(0x10_0000, 0x1000)
            ]
        );
    }

    #[test]
    fn closes_smallest_gaps_first() {
        // Gaps: 0x1000 (between a and b), 0x10000 (b..c), 0x2000 (c..d).
        let a = DmaRange::new(0x0, 0x1000);
        let b = DmaRange::new(0x2000, 0x1000);
        let c = DmaRange::new(0x13000, 0x1000);
        let d = DmaRange::new(0x16000, 0x1000);
        let r = merge_ranges(&[d, c, b, a], K4, 2).unwrap();
        assert_eq!(
            r,
            vec![DmaRange::new(0, 0x3000), DmaRange::new(0x13000, 0x4000)]
        );
        let r = merge_ranges(&[a, b, c, d], K4, 1).unwrap();
        assert_eq!(r, vec![DmaRange::new(0, 0x17000)]);
    }

    #[test]
    fn covers_ram_plus_hotplug_window_with_two_ranges() {
        // A typical x86 guest: low RAM below the 32-bit hole, high RAM above 4G, hotplug window.
        let low = DmaRange::new(0, 0x8000_0000);
        let high = DmaRange::new(0x1_0000_0000, 0x3_8000_0000);
        let hotplug = DmaRange::new(0x4_8000_0000, 0x4_0000_0000);
        let r = merge_ranges(&[low, high, hotplug], K4, 2).unwrap();
        assert_eq!(r, vec![low, DmaRange::new(0x1_0000_0000, 0x7_8000_0000)]);
    }

    #[test]
    fn rejects_bad_ranges_with_the_rule() {
        let e = merge_ranges(&[DmaRange::new(u64::MAX, 2)], K4, 4).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        let e = merge_ranges(&[DmaRange::new(0, 0)], K4, 4).unwrap_err();
        assert!(e.to_string().contains("length 0"), "{e}");
        let e = merge_ranges(&[DmaRange::new(0, 1)], 3000, 4).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = merge_ranges(&[], K4, 4).unwrap_err();
        assert!(e.to_string().contains("at least one"), "{e}");
        // Ending exactly at 2^64 overflows iova + length, which the kernel refuses; so does a
        // range that only reaches the top after alignment.
        let e = merge_ranges(&[DmaRange::new(u64::MAX - 0xfff, 0x1000)], K4, 4).unwrap_err();
        assert!(
            e.to_string().contains("overflows the 64-bit IOVA space"),
            "{e}"
        );
        let e = merge_ranges(&[DmaRange::new(u64::MAX - 0xfff, 0x10)], K4, 4).unwrap_err();
        assert!(e.to_string().contains("iova + length overflows"), "{e}");
    }

    #[test]
    fn report_checks_match_the_kernel() {
        let bm = [0u64; 1];
        assert!(check_report(0, 64 * K4, K4, &bm).is_ok());
        assert!(check_report(0, 65 * K4, K4, &bm).is_err());
        assert!(check_report(0, K4, 2048, &bm).is_err());
        assert!(check_report(0, 0, K4, &bm).is_err());
        assert!(check_report(u64::MAX, 2, K4, &bm).is_err());
        assert_eq!(bitmap_words(1, K4), 1);
        assert_eq!(bitmap_words(64 * K4 + 1, K4), 2);
    }

    struct Limited {
        kernel_limit: usize,
        driver_limit: usize,
        got: Vec<DmaRange>,
        attempts: usize,
    }

    impl DmaLogger for Limited {
        fn dma_logging_max_ranges(&self) -> usize {
            self.kernel_limit
        }
        fn dma_logging_start_raw(&mut self, page_size: u64, r: &[DmaRange]) -> Result<u64, Error> {
            self.attempts += 1;
            if r.len() > self.driver_limit {
                return Err(Error::ioctl(
                    START,
                    std::io::Error::from_raw_os_error(libc::E2BIG),
                ));
            }
            self.got = r.to_vec();
            Ok(page_size)
        }
        fn dma_logging_report(
            &mut self,
            _: u64,
            _: u64,
            _: u64,
            _: &mut [u64],
        ) -> Result<(), Error> {
            Ok(())
        }
        fn dma_logging_stop(&mut self) -> Result<(), Error> {
            Ok(())
        }
    }

    #[test]
    fn start_retries_with_fewer_ranges_on_e2big() {
        let ranges: Vec<_> = (0..40).map(|i| DmaRange::new(i * 0x10_0000, K4)).collect();
        let mut dev = Limited {
            kernel_limit: 32,
            driver_limit: 5,
            got: vec![],
            attempts: 0,
        };
        let s = dev.start(K4, &ranges).unwrap();
        assert!(s.ranges.len() <= 5);
        assert_eq!(s.ranges, dev.got);
        assert_eq!(dev.attempts, 4); // 32 -> 16 -> 8 -> 4
        // Still covers every input byte.
        for r in &ranges {
            assert!(
                s.ranges
                    .iter()
                    .any(|m| m.iova <= r.iova && r.last() <= m.last())
            );
        }
    }

    proptest! {
        #[test]
        fn merged_ranges_cover_inputs_and_respect_budget(
            raw in proptest::collection::vec((0u64..1 << 40, 1u64..1 << 24), 1..60),
            budget in 1usize..10,
            shift in 12u32..22,
        ) {
            let page = 1u64 << shift;
            let ranges: Vec<_> = raw.iter().map(|&(a, l)| DmaRange::new(a, l)).collect();
            let merged = merge_ranges(&ranges, page, budget).unwrap();
            prop_assert!(merged.len() <= budget);
            for w in merged.windows(2) {
                prop_assert!(w[0].last() + 1 < w[1].iova, "sorted, disjoint, not touching");
            }
            for m in &merged {
                prop_assert_eq!(m.iova % page, 0);
                prop_assert_eq!(m.length % page, 0);
            }
            for r in &ranges {
                prop_assert!(merged.iter().any(|m| m.iova <= r.iova && r.last() <= m.last()));
            }
        }
    }
}
