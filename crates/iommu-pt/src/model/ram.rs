//! Device-visible memory for the model.

use std::sync::atomic::{AtomicU64, Ordering};

/// Memory that DMA reads and writes land in (guest RAM, in a VMM).
pub trait DataMem: Send + Sync {
    /// Copy `data` to physical address `pa`; `false` if any byte is outside the memory.
    fn write(&self, pa: u64, data: &[u8]) -> bool;
    /// Copy from physical address `pa` into `buf`; `false` if any byte is outside the memory.
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool;
}

/// RAM at `[base, base + size)`, safe to read and write from any number of threads at once
/// (64-bit atomic words; a byte access updates its word atomically).
pub struct GuestRam {
    base: u64,
    words: Box<[AtomicU64]>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("base", &format_args!("{:#x}", self.base))
            .field("size", &self.size())
            .finish()
    }
}

impl GuestRam {
    /// Zeroed RAM of `size` bytes (rounded up to 8) at `base`.
    pub fn new(base: u64, size: u64) -> Self {
        let words = usize::try_from(size.div_ceil(8)).expect("RAM size fits the host");
        GuestRam {
            base,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// First physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    fn range(&self, pa: u64, len: usize) -> Option<u64> {
        let off = pa.checked_sub(self.base)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.size()).then_some(off)
    }

    /// Read the aligned 64-bit word at `pa`.
    pub fn read_u64(&self, pa: u64) -> Option<u64> {
        let off = self.range(pa, 8)?;
        (off % 8 == 0).then(|| self.words[(off / 8) as usize].load(Ordering::Acquire))
    }

    /// Copy `len` bytes at `src` of `self` to the same addresses of `dst` (a migration copy).
    pub fn copy_to(&self, dst: &GuestRam, pa: u64, len: u64) -> bool {
        let (Some(off), Some(doff)) = (self.range(pa, len as usize), dst.range(pa, len as usize))
        else {
            return false;
        };
        if off % 8 == 0 && len.is_multiple_of(8) {
            let (s, d) = ((off / 8) as usize, (doff / 8) as usize);
            for k in 0..(len / 8) as usize {
                dst.words[d + k]
                    .store(self.words[s + k].load(Ordering::Acquire), Ordering::Release);
            }
            return true;
        }
        let mut buf = vec![0u8; len as usize];
        self.read(pa, &mut buf) && dst.write(pa, &buf)
    }

    /// Whether `[pa, pa + len)` holds the same bytes in `self` and `other`; the first
    /// differing word's address otherwise.
    pub fn first_difference(&self, other: &GuestRam) -> Option<u64> {
        self.words
            .iter()
            .zip(other.words.iter())
            .position(|(a, b)| a.load(Ordering::Acquire) != b.load(Ordering::Acquire))
            .map(|i| self.base + i as u64 * 8)
    }
}

impl DataMem for GuestRam {
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        let Some(off) = self.range(pa, data.len()) else {
            return false;
        };
        let mut i = 0usize;
        while i < data.len() {
            let at = off + i as u64;
            let w = (at / 8) as usize;
            let shift = (at % 8) as usize;
            let n = (8 - shift).min(data.len() - i);
            if n == 8 {
                let v = u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
                self.words[w].store(v, Ordering::Release);
            } else {
                let mut mask = 0u64;
                let mut val = 0u64;
                for k in 0..n {
                    mask |= 0xff << ((shift + k) * 8);
                    val |= u64::from(data[i + k]) << ((shift + k) * 8);
                }
                let _ = self.words[w].fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                    Some((old & !mask) | val)
                });
            }
            i += n;
        }
        true
    }

    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        let Some(off) = self.range(pa, buf.len()) else {
            return false;
        };
        for (i, b) in buf.iter_mut().enumerate() {
            let at = off + i as u64;
            let v = self.words[(at / 8) as usize].load(Ordering::Acquire);
            *b = (v >> ((at % 8) * 8)) as u8;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_bytes_round_trip() {
        let ram = GuestRam::new(0x1000, 64);
        assert!(ram.write(0x1003, b"hello, world"));
        let mut buf = [0u8; 12];
        assert!(ram.read(0x1003, &mut buf));
        assert_eq!(&buf, b"hello, world");
        assert!(!ram.write(0x1000 + 60, b"12345"));
        assert!(!ram.read(0xfff, &mut buf));
        let other = GuestRam::new(0x1000, 64);
        assert_eq!(other.first_difference(&ram), Some(0x1000));
        assert!(ram.copy_to(&other, 0x1000, 16));
        assert_eq!(other.first_difference(&ram), None);
    }
}
