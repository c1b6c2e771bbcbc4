//! [`SparseRam`], the simulated platform's guest RAM, and [`CpuDirtyLog`], its vCPU dirty log.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use livemig::bitmap::PageBitmap;
use livemig::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use livemig::tracker::{BoxError, DirtyTracker};

const CHUNK: u64 = 2 << 20;
const CHUNK_WORDS: usize = (CHUNK / 8) as usize;

/// Sparse guest RAM: 2 MiB chunks allocated (and populated) on the first non-zero write to
/// them, so a guest of tens of GiB costs only the chunks it touched. Words are atomics, so vCPU threads, device DMA and the migration
/// thread may access it concurrently without data races. It keeps a CPU dirty log (what KVM's
/// dirty log is to a real VMM) for writes made through [`SparseRam::cpu_write`]; device DMA
/// goes through [`DataMem`](livemig_iommu_pt::model::DataMem) (the IOMMU model's view) and is
/// not logged here.
pub struct SparseRam {
    size: u64,
    chunks: Box<[OnceLock<Chunk>]>,
    cpu_dirty: Box<[AtomicU64]>,
    logging: AtomicBool,
}

impl std::fmt::Debug for SparseRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseRam")
            .field("size", &self.size)
            .field("populated", &self.populated_bytes())
            .finish()
    }
}

/// One 2 MiB chunk of guest RAM: an anonymous mapping populated when it is made
/// (`MAP_POPULATE`), so its first write costs one system call that allocates and zeroes 512
/// pages instead of 512 page faults (what pre-allocated guest memory is to a production VMM;
/// the faults bounded the simulated destination well below a 10 Gbit/s link).
struct Chunk(std::ptr::NonNull<AtomicU64>);

// SAFETY: a Chunk owns its mapping exclusively and hands out only shared references to
// atomics, which are Sync.
unsafe impl Send for Chunk {}
// SAFETY: as above; all access goes through `&[AtomicU64]`.
unsafe impl Sync for Chunk {}

impl std::ops::Deref for Chunk {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: the pointer is the start of a live, CHUNK-byte mapping owned by self,
        // aligned for u64, and zero-initialised by the kernel (a valid AtomicU64 array).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), CHUNK_WORDS) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this chunk owns; no reference outlives self.
        unsafe { libc::munmap(self.0.as_ptr().cast(), CHUNK as usize) };
    }
}

fn zeroed_chunk() -> Chunk {
    let len = CHUNK as usize;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        // What the global allocator does when memory runs out.
        std::alloc::handle_alloc_error(
            std::alloc::Layout::from_size_align(len, 4096).expect("2 MiB layout"),
        );
    }
    Chunk(std::ptr::NonNull::new(raw.cast()).expect("mmap returned a non-null address"))
}

impl SparseRam {
    /// `size` bytes (a non-zero multiple of 4 KiB) of zero RAM; nothing allocated yet.
    pub fn new(size: u64) -> Result<SparseRam, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError {
                gpa: 0,
                len: size,
                reason: "RAM size must be a non-zero multiple of 4 KiB",
            });
        }
        let chunks = usize::try_from(size.div_ceil(CHUNK)).map_err(|_| MemoryError {
            gpa: 0,
            len: size,
            reason: "RAM size does not fit this host's address space",
        })?;
        let pages = size / PAGE_SIZE;
        Ok(SparseRam {
            size,
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            cpu_dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
        })
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError {
                gpa,
                len,
                reason: "outside guest RAM",
            }),
        }
    }

    /// Bytes in allocated chunks.
    pub fn populated_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.get().is_some()).count() as u64 * CHUNK
    }

    /// Calls `f(word_index_in_chunk, chunk, byte_offset_in_word, bytes)` for each word piece of
    /// `[gpa, gpa + len)`, where `chunk` is `None` for an unallocated chunk unless `alloc`.
    fn for_words(
        &self,
        gpa: u64,
        len: u64,
        alloc: bool,
        mut f: impl FnMut(Option<&AtomicU64>, usize, usize, usize),
    ) {
        let mut at = gpa;
        let end = gpa + len;
        let mut pos = 0usize;
        while at < end {
            let ci = (at / CHUNK) as usize;
            let chunk_end = ((at / CHUNK) + 1) * CHUNK;
            let slot = &self.chunks[ci];
            let chunk = if alloc {
                Some(slot.get_or_init(zeroed_chunk))
            } else {
                slot.get()
            };
            while at < end.min(chunk_end) {
                let wi = ((at % CHUNK) / 8) as usize;
                let off = (at % 8) as usize;
                let n = (8 - off).min((end - at) as usize);
                f(chunk.map(|c| &c[wi]), off, n, pos);
                at += n as u64;
                pos += n;
            }
        }
    }

    /// Calls `f(chunk, first_word, range)` for each chunk piece of a word-aligned
    /// `[gpa, gpa + len)`, `range` being the piece's byte range within `[0, len)`; `chunk` is
    /// `None` for an unallocated chunk unless `alloc`. The fast path of page-sized accesses.
    fn for_chunks(
        &self,
        gpa: u64,
        len: u64,
        alloc: bool,
        mut f: impl FnMut(Option<&[AtomicU64]>, usize, std::ops::Range<usize>),
    ) {
        let mut at = gpa;
        let end = gpa + len;
        while at < end {
            let ci = (at / CHUNK) as usize;
            let piece_end = end.min((at / CHUNK + 1) * CHUNK);
            let slot = &self.chunks[ci];
            let chunk = if alloc {
                Some(&slot.get_or_init(zeroed_chunk)[..])
            } else {
                slot.get().map(|c| &c[..])
            };
            f(
                chunk,
                ((at % CHUNK) / 8) as usize,
                (at - gpa) as usize..(piece_end - gpa) as usize,
            );
            at = piece_end;
        }
    }

    /// Writes without logging (device DMA, the destination loading pages).
    pub fn write_raw(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check(gpa, data.len() as u64)?;
        let all_zero = data.iter().all(|&b| b == 0);
        if all_zero && self.known_zero(gpa, data.len() as u64) {
            return Ok(());
        }
        if gpa.is_multiple_of(8) && data.len().is_multiple_of(8) {
            // Whole words: one store each.
            self.for_chunks(gpa, data.len() as u64, true, |c, first, range| {
                let c = c.expect("allocated");
                for (w, b) in c[first..].iter().zip(data[range].chunks_exact(8)) {
                    w.store(
                        u64::from_le_bytes(b.try_into().expect("8 bytes")),
                        Ordering::Relaxed,
                    );
                }
            });
            return Ok(());
        }
        self.for_words(gpa, data.len() as u64, true, |w, off, n, pos| {
            let w = w.expect("allocated");
            let mut bytes = [0u8; 8];
            bytes[off..off + n].copy_from_slice(&data[pos..pos + n]);
            let val = u64::from_le_bytes(bytes);
            if n == 8 {
                w.store(val, Ordering::Relaxed);
            } else {
                let mask = (u64::MAX >> (64 - 8 * n as u32)) << (8 * off as u32);
                // Only the bytes of this piece change; other bytes of the word may be written
                // concurrently by someone else.
                w.fetch_and(!mask, Ordering::Relaxed);
                w.fetch_or(val & mask, Ordering::Relaxed);
            }
        });
        Ok(())
    }

    /// A vCPU write: the data, then the CPU dirty log (with release ordering, so a harvest that
    /// sees the bit also sees the data).
    pub fn cpu_write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.write_raw(gpa, data)?;
        if self.logging.load(Ordering::Relaxed) && !data.is_empty() {
            let first = gpa / PAGE_SIZE;
            let last = (gpa + data.len() as u64 - 1) / PAGE_SIZE;
            for p in first..=last {
                self.cpu_dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
            }
        }
        Ok(())
    }

    /// Starts (clearing it) or stops the CPU dirty log.
    pub fn set_cpu_logging(&self, on: bool) {
        for w in self.cpu_dirty.iter() {
            w.store(0, Ordering::Relaxed);
        }
        self.logging.store(on, Ordering::SeqCst);
    }

    /// Reads and clears the CPU dirty log into `into`; returns the pages found.
    pub fn harvest_cpu_dirty(&self, into: &mut PageBitmap) -> u64 {
        let mut n = 0;
        for (dst, w) in into.words_mut().iter_mut().zip(self.cpu_dirty.iter()) {
            if w.load(Ordering::Relaxed) != 0 {
                let v = w.swap(0, Ordering::Acquire);
                n += u64::from(v.count_ones());
                *dst |= v;
            }
        }
        n
    }

    /// The first 8-byte-aligned address at which `self` and `other` differ, if any (bit-for-bit
    /// comparison; an unallocated chunk equals an all-zero one).
    pub fn first_difference(&self, other: &SparseRam) -> Option<u64> {
        if self.size != other.size {
            return Some(self.size.min(other.size));
        }
        for (ci, (a, b)) in self.chunks.iter().zip(other.chunks.iter()).enumerate() {
            let base = ci as u64 * CHUNK;
            let words = ((self.size - base).min(CHUNK) / 8) as usize;
            match (a.get(), b.get()) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    if let Some(i) = (0..words)
                        .find(|&i| x[i].load(Ordering::Relaxed) != y[i].load(Ordering::Relaxed))
                    {
                        return Some(base + i as u64 * 8);
                    }
                }
                (Some(x), None) | (None, Some(x)) => {
                    if let Some(i) = (0..words).find(|&i| x[i].load(Ordering::Relaxed) != 0) {
                        return Some(base + i as u64 * 8);
                    }
                }
            }
        }
        None
    }

    /// Fills `[gpa, gpa + len)` with a deterministic non-zero pattern derived from `seed` (the
    /// simulated guest's initial memory). Not logged.
    pub fn fill_pattern(&self, gpa: u64, len: u64, seed: u64) -> Result<(), MemoryError> {
        self.check(gpa, len)?;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut at = gpa & !(PAGE_SIZE - 1);
        while at < gpa + len {
            let mut x = seed ^ at.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for w in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            self.write_raw(at, &page)?;
            at += PAGE_SIZE;
        }
        Ok(())
    }
}

impl GuestMemory for SparseRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(gpa, buf.len() as u64)?;
        if gpa.is_multiple_of(8) && buf.len().is_multiple_of(8) {
            // Whole words: one load each; a chunk never written reads as zero.
            self.for_chunks(gpa, buf.len() as u64, false, |c, first, range| {
                let out = &mut buf[range];
                match c {
                    None => out.fill(0),
                    Some(c) => {
                        for (w, o) in c[first..].iter().zip(out.chunks_exact_mut(8)) {
                            o.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                        }
                    }
                }
            });
            return Ok(());
        }
        self.for_words(gpa, buf.len() as u64, false, |w, off, n, pos| {
            let v = w.map_or(0, |w| w.load(Ordering::Relaxed)).to_le_bytes();
            buf[pos..pos + n].copy_from_slice(&v[off..off + n]);
        });
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.write_raw(gpa, data)
    }

    fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.check(gpa, len)?;
        // Chunk by chunk: a chunk never written is zero already (skipped whole, so zeroing
        // gigabytes of untouched RAM costs nothing — a destination doing it word by word lagged
        // hundreds of milliseconds behind the source at the end of round 1); whole words of an
        // allocated chunk are stored, partial words masked.
        let end = gpa + len;
        let mut at = gpa;
        while at < end {
            let ci = (at / CHUNK) as usize;
            let piece_end = end.min((at / CHUNK + 1) * CHUNK);
            if self.chunks[ci].get().is_some() {
                self.for_words(at, piece_end - at, false, |w, off, n, _| {
                    let Some(w) = w else { return };
                    if n == 8 {
                        w.store(0, Ordering::Relaxed);
                    } else {
                        let mask = (u64::MAX >> (64 - 8 * n as u32)) << (8 * off as u32);
                        w.fetch_and(!mask, Ordering::Relaxed);
                    }
                });
            }
            at = piece_end;
        }
        Ok(())
    }

    fn known_zero(&self, gpa: u64, len: u64) -> bool {
        if len == 0 || self.check(gpa, len).is_err() {
            return len == 0;
        }
        let first = gpa / CHUNK;
        let last = (gpa + len - 1) / CHUNK;
        (first..=last).all(|c| self.chunks[c as usize].get().is_none())
    }
}

impl livemig_iommu_pt::model::DataMem for SparseRam {
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        self.write_raw(pa, data).is_ok()
    }

    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        GuestMemory::read(self, pa, buf).is_ok()
    }
}

/// The vCPU dirty log of [`SparseRam`].
#[derive(Debug)]
pub struct CpuDirtyLog(pub Arc<SparseRam>);

impl DirtyTracker for CpuDirtyLog {
    fn name(&self) -> String {
        "vCPU dirty log".into()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        self.0.set_cpu_logging(true);
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if !self.0.logging.load(Ordering::SeqCst) {
            return Err(livemig::tracker::not_tracking(&self.name()));
        }
        Ok(self.0.harvest_cpu_dirty(into))
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        self.0.set_cpu_logging(false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_ram_reads_back_and_logs_cpu_writes() {
        let ram = SparseRam::new(64 << 30).unwrap();
        assert_eq!(ram.populated_bytes(), 0);
        assert!(ram.known_zero(0, 64 << 30));
        ram.set_cpu_logging(true);
        ram.cpu_write(0x1000_0003, b"hello world").unwrap();
        ram.write_raw(0x2000_0000, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 16];
        GuestMemory::read(&ram, 0x1000_0000, &mut b).unwrap();
        assert_eq!(&b[3..14], b"hello world");
        assert_eq!(ram.populated_bytes(), 2 * CHUNK);
        let mut bits = PageBitmap::new((64 << 30) / PAGE_SIZE, PAGE_SIZE);
        assert_eq!(ram.harvest_cpu_dirty(&mut bits), 1);
        assert!(bits.get(0x1000_0000 / PAGE_SIZE));
        assert_eq!(ram.harvest_cpu_dirty(&mut bits), 0, "read and clear");
        let other = SparseRam::new(64 << 30).unwrap();
        assert_eq!(ram.first_difference(&other), Some(0x1000_0000));
        other.write_raw(0x1000_0003, b"hello world").unwrap();
        other.write_raw(0x2000_0000, &[1, 2, 3]).unwrap();
        assert_eq!(ram.first_difference(&other), None);
        ram.zero(0x1000_0000, 4096).unwrap();
        assert_eq!(ram.first_difference(&other), Some(0x1000_0000));
        assert!(ram.write_raw((64 << 30) - 2, &[0, 1, 2]).is_err());
    }
}
