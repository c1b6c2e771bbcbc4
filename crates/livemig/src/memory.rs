//! Guest memory as the engine sees it.

/// The migration page size: 4 KiB, the granule of every dirty tracker here.
pub const PAGE_SIZE: u64 = 4096;

/// A guest-memory access the memory could not make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest memory access at {gpa:#x}+{len:#x}: {reason}")]
pub struct MemoryError {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length.
    pub len: u64,
    /// What was wrong.
    pub reason: &'static str,
}

/// Guest RAM: `[0, size)` guest-physical, in [`PAGE_SIZE`] pages.
///
/// The source reads pages while vCPUs and devices still write them (pre-copy); a read may see
/// a half-written page — the trackers report that page again and it is sent again.
pub trait GuestMemory: Send + Sync {
    /// The end of the guest-physical address space RAM spans (a multiple of [`PAGE_SIZE`]):
    /// the highest RAM address + 1.
    fn size(&self) -> u64;
    /// The RAM ranges `(gpa, len)`, page-aligned, ascending; what lies between them (a PCI hole)
    /// is not RAM: it is never sent, and the destination refuses pages there. The default is
    /// one range, `[0, size)`.
    fn ranges(&self) -> Vec<(u64, u64)> {
        vec![(0, self.size())]
    }
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Writes `data` at `gpa` (the destination loading pages; not a guest write).
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError>;
    /// Zeroes `[gpa, gpa + len)`.
    fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError>;
    /// Whether `[gpa, gpa + len)` is known to read as zero without reading it (for example,
    /// never populated). `false` when unsure.
    fn known_zero(&self, gpa: u64, len: u64) -> bool {
        let _ = (gpa, len);
        false
    }
}
