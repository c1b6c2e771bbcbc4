//! The iommufd selftest uAPI (mock IOMMU and devices) lives in livemig-iommufd's `selftest`
//! module (feature `selftest`), shared with `livemig probe`.

pub use livemig_iommufd::selftest::*;

/// The granule at which the mock IOMMU reports dirty pages on the running kernel, in bytes.
///
/// Linux 6.12's mock keeps one PTE per `MOCK_PAGE_SIZE` (2 KiB) and `IOMMU_TEST_OP_DIRTY` marks
/// exactly that PTE. Linux 7.3's mock is the generic AMDv1 page table with a 2 KiB base page
/// (7.3.4 `drivers/iommu/iommufd/selftest.c` lines 440-466): a mapping of host pages gets one
/// leaf per host page (4 KiB; more where iommufd combines contiguous pages, which the cases
/// switch off with `IOMMU_OPTION_HUGE_PAGES` 0), the dirty bit is the leaf's, and marking one
/// 2 KiB page reports the whole leaf dirty — as a real AMD-Vi reports a large leaf.
pub fn dirty_grain() -> u64 {
    if crate::harness::kernel_at_least(7, 0) {
        PAGE_SIZE
    } else {
        MOCK_PAGE_SIZE
    }
}

/// The mock pages (indexes of `MOCK_PAGE_SIZE` pages) the kernel reports dirty once `marked`
/// were marked: each grows to its whole [`dirty_grain`].
pub fn reported_dirty(marked: &[u64]) -> Vec<u64> {
    let per = dirty_grain() / MOCK_PAGE_SIZE;
    let mut out: Vec<u64> = marked
        .iter()
        .flat_map(|&p| (p - p % per)..(p - p % per + per))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}
