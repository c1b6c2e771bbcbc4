//! Guest memory over `vm-memory`: regions with holes, backed by anonymous memory, a memfd or a
//! shared file, with the VMM's own writes tracked by `vm-memory`'s dirty bitmap.
//!
//! ```text
//!  GPA 0 ─────────── region 0 ────────── 3 GiB │ PCI hole │ 4 GiB ─── region 1 ─── 4 GiB + n
//!      host mapping A (KVM slot 0)                           host mapping B (KVM slot 1)
//! ```
//!
//! The engine reads and writes through [`GuestMemory`]; device emulation in the VMM writes
//! through [`VmMemory::guest_memory`] (a `GuestMemoryMmap<AtomicBitmap>`), which marks the
//! pages it touches so the vCPU dirty trackers report them too. What reads as zero is known,
//! not guessed: `SEEK_DATA` on a file or memfd, `/proc/self/pagemap` (neither present nor
//! swapped) for anonymous memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use livemig::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::Error;

/// What backs guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (zero knowledge from `/proc/self/pagemap`).
    Anonymous,
    /// One memfd holding every region back to back (zero knowledge from `SEEK_DATA`).
    Memfd,
    /// A shared file holding every region back to back, so another VMM (for example QEMU with
    /// `memory-backend-file,share=on`) can map the very same image. Created (sparse) or grown
    /// to the size needed; never truncated.
    File(PathBuf),
}

/// One RAM region as laid out for the guest and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host: u64,
    /// Offset in the backing file or memfd (0 for anonymous memory).
    pub file_offset: u64,
}

/// Guest RAM: `vm-memory` regions plus what the engine needs (ranges, zero knowledge).
#[derive(Debug)]
pub struct VmMemory {
    gm: GuestMemoryMmap<AtomicBitmap>,
    regions: Vec<Region>,
    file: Option<File>,
    pagemap: Option<File>,
    backing: Backing,
}

/// Asks for transparent huge pages on anonymous guest RAM, as QEMU does for every RAM block it
/// allocates (`ram_block_add` in its `system/physmem.c` advises `QEMU_MADV_HUGEPAGE`): with
/// 4 KiB host pages KVM's second-level (EPT/NPT) mappings are 4 KiB too, so a guest sweeping
/// a large working set misses the TLB on every page, and on this project's machines the test
/// guest wrote its 256 MiB working sets 4-6x slower than with THP (`vm run --rate 0`: 58,000-
/// 85,000 pages/s per vCPU against about 360,000; `cargo xtask bench-peer`, issue 31). Advice
/// only: a kernel without THP, or with `transparent_hugepage=never`, leaves 4 KiB pages and the
/// VM works the same. Dirty logging still reports 4 KiB pages (KVM maps a logged slot at 4 KiB).
fn advise_huge_pages(host: u64, len: usize) {
    // SAFETY: madvise on a mapping this object just created and owns; MADV_HUGEPAGE changes
    // only how the kernel backs it, never its contents.
    let _ = unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

fn mem_err(gpa: u64, len: u64, reason: &'static str) -> MemoryError {
    MemoryError { gpa, len, reason }
}

impl VmMemory {
    /// Maps `ranges` (`(gpa, size)`, page-aligned, ascending, not overlapping) on `backing`.
    pub fn new(ranges: &[(u64, u64)], backing: Backing) -> Result<VmMemory, Error> {
        let bad = |why: String| Error::Config(format!("memory layout {ranges:x?}: {why}"));
        if ranges.is_empty() {
            return Err(bad("no region".into()));
        }
        let mut end = 0u64;
        for (i, &(gpa, size)) in ranges.iter().enumerate() {
            if size == 0 || gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
                return Err(bad(format!(
                    "region {i} must be non-empty and 4 KiB aligned"
                )));
            }
            if i > 0 && gpa < end {
                return Err(bad(format!(
                    "region {i} starts below the end of the one before"
                )));
            }
            end = gpa
                .checked_add(size)
                .ok_or_else(|| bad(format!("region {i} overflows")))?;
        }
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let file = match &backing {
            Backing::Anonymous => None,
            Backing::Memfd => {
                // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
                let fd =
                    unsafe { libc::memfd_create(c"livemig-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(Error::Io {
                        what: "memfd_create for guest RAM".into(),
                        source: io::Error::last_os_error(),
                    });
                }
                // SAFETY: fd is a new descriptor this function owns.
                let f = unsafe { File::from_raw_fd(fd) };
                f.set_len(total).map_err(|source| Error::Io {
                    what: "sizing the guest RAM memfd".into(),
                    source,
                })?;
                Some(f)
            }
            Backing::File(path) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|source| Error::Io {
                        what: format!("opening guest RAM file {}", path.display()),
                        source,
                    })?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < total {
                    f.set_len(total).map_err(|source| Error::Io {
                        what: format!("growing guest RAM file {}", path.display()),
                        source,
                    })?;
                }
                Some(f)
            }
        };
        let mut regions = Vec::new();
        let mut mapped = Vec::new();
        let mut offset = 0u64;
        for &(gpa, size) in ranges {
            let len = usize::try_from(size).map_err(|_| bad("region too large".into()))?;
            let mapping = match &file {
                Some(f) => {
                    let dup = f.try_clone().map_err(|source| Error::Io {
                        what: "duplicating the guest RAM fd".into(),
                        source,
                    })?;
                    MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(dup, offset), len)
                }
                None => MmapRegion::<AtomicBitmap>::new(len),
            }
            .map_err(|e| Error::Io {
                what: format!("mapping guest RAM at {gpa:#x}"),
                source: io::Error::other(e.to_string()),
            })?;
            let host = mapping.as_ptr() as u64;
            if file.is_none() {
                advise_huge_pages(host, len);
            }
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or_else(|| bad(format!("region at {gpa:#x} overflows")))?;
            mapped.push(region);
            regions.push(Region {
                gpa,
                size,
                host,
                file_offset: if file.is_some() { offset } else { 0 },
            });
            offset += size;
        }
        let gm = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| bad(format!("vm-memory refused the regions: {e}")))?;
        let pagemap = match backing {
            Backing::Anonymous => File::open("/proc/self/pagemap").ok(),
            _ => None,
        };
        Ok(VmMemory {
            gm,
            regions,
            file,
            pagemap,
            backing,
        })
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The file or memfd behind every region (regions sit back to back at
    /// [`Region::file_offset`]); `None` for anonymous memory. For `IOMMU_IOAS_MAP_FILE`.
    pub fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.file.as_ref().map(|f| f.as_fd())
    }

    /// What backs the memory.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The `vm-memory` view, for device emulation: writes through it are tracked.
    pub fn guest_memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.gm
    }

    /// The region holding all of `[gpa, gpa + len)`.
    fn region_of(&self, gpa: u64, len: u64) -> Option<&Region> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
    }

    /// Clears the VMM-write bitmaps (dirty tracking starts).
    pub fn reset_vmm_dirty(&self) {
        for r in self.gm.iter() {
            let m: &MmapRegion<AtomicBitmap> = r;
            m.bitmap().reset();
        }
    }

    /// Reads and clears the VMM-write bitmaps; calls `f(gpa_page)` for each page written.
    pub fn harvest_vmm_dirty(&self, mut f: impl FnMut(u64)) -> u64 {
        let mut n = 0;
        for r in self.gm.iter() {
            let base = r.start_addr().0 / PAGE_SIZE;
            let m: &MmapRegion<AtomicBitmap> = r;
            for (wi, w) in m.bitmap().get_and_reset().into_iter().enumerate() {
                let mut m = w;
                while m != 0 {
                    let bit = u64::from(m.trailing_zeros());
                    m &= m - 1;
                    f(base + wi as u64 * 64 + bit);
                    n += 1;
                }
            }
        }
        n
    }

    /// The first address in `[gpa, gpa + len)` where `self` and `other` differ (the layouts
    /// must match), comparing in 4 KiB pages.
    pub fn first_difference(&self, other: &VmMemory) -> Option<u64> {
        if self.ranges() != other.ranges() {
            return Some(0);
        }
        let mut a = vec![0u8; 1 << 20];
        let mut b = vec![0u8; 1 << 20];
        for (gpa, size) in self.ranges() {
            let mut at = gpa;
            while at < gpa + size {
                let n = (gpa + size - at).min(a.len() as u64) as usize;
                if GuestMemory::read(self, at, &mut a[..n]).is_err()
                    || GuestMemory::read(other, at, &mut b[..n]).is_err()
                {
                    return Some(at);
                }
                if a[..n] != b[..n] {
                    let i = a[..n]
                        .iter()
                        .zip(&b[..n])
                        .position(|(x, y)| x != y)
                        .unwrap_or(0);
                    return Some(at + i as u64);
                }
                at += n as u64;
            }
        }
        None
    }

    fn file_zero(&self, f: &File, offset: u64, len: u64) -> bool {
        // SAFETY: lseek on an fd this object owns; no memory is passed.
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
        if r < 0 {
            // ENXIO: no data at or after offset. Anything else: unsure.
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        r as u64 >= offset + len
    }

    fn anon_zero(&self, pagemap: &File, host: u64, len: u64) -> bool {
        // /proc/pid/pagemap (Documentation/admin-guide/mm/pagemap.rst): one u64 per virtual
        // page; bit 63 present, bit 62 swapped. Neither: never touched since mapped (or
        // discarded), which reads as zero in a private anonymous mapping.
        let pages = len.div_ceil(PAGE_SIZE) as usize;
        let mut buf = vec![0u8; pages * 8];
        if pagemap
            .read_exact_at(&mut buf, host / PAGE_SIZE * 8)
            .is_err()
        {
            return false;
        }
        buf.chunks_exact(8).all(|e| {
            let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            v & (3 << 62) == 0
        })
    }
}

impl GuestMemory for VmMemory {
    fn size(&self) -> u64 {
        self.regions.last().map(|r| r.gpa + r.size).unwrap_or(0)
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.gpa, r.size)).collect()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if self.region_of(gpa, buf.len() as u64).is_none() {
            return Err(mem_err(gpa, buf.len() as u64, "outside guest RAM"));
        }
        self.gm
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| mem_err(gpa, buf.len() as u64, "vm-memory read failed"))
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        if self.region_of(gpa, data.len() as u64).is_none() {
            return Err(mem_err(gpa, data.len() as u64, "outside guest RAM"));
        }
        self.gm
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| mem_err(gpa, data.len() as u64, "vm-memory write failed"))
    }

    fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if self.region_of(gpa, len).is_none() {
            return Err(mem_err(gpa, len, "outside guest RAM"));
        }
        if self.known_zero(gpa, len) {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = gpa;
        while at < gpa + len {
            let n = (gpa + len - at).min(zeros.len() as u64) as usize;
            self.write(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn known_zero(&self, gpa: u64, len: u64) -> bool {
        let Some(r) = self.region_of(gpa, len) else {
            return false;
        };
        let off = gpa - r.gpa;
        match (&self.file, &self.pagemap) {
            (Some(f), _) => self.file_zero(f, r.file_offset + off, len),
            (None, Some(pm)) => self.anon_zero(pm, r.host + off, len),
            (None, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<(u64, u64)> {
        vec![(0, 16 << 20), (64 << 20, 8 << 20)]
    }

    fn exercise(m: &VmMemory) {
        assert_eq!(m.size(), 72 << 20);
        assert_eq!(m.ranges(), layout());
        assert!(m.known_zero(0, 16 << 20), "fresh memory is known zero");
        m.write(0x1000, b"hello").unwrap();
        assert!(!m.known_zero(0, 8192));
        assert!(
            m.known_zero(4 << 20, 2 << 20),
            "untouched pages stay known zero (in another 2 MiB: with THP the written block is \
             present as a whole)"
        );
        let mut b = [0u8; 5];
        m.read(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        let e = m.write(32 << 20, b"x").unwrap_err();
        assert_eq!(e.reason, "outside guest RAM", "the hole is not RAM");
        assert!(
            m.write((16 << 20) - 2, b"xyz").is_err(),
            "no write across a region end"
        );
        assert!(m.read((72 << 20) - 1, &mut b).is_err());
        m.reset_vmm_dirty();
        m.guest_memory()
            .write_slice(&[1, 2, 3], GuestAddress((64 << 20) + 0x3000))
            .unwrap();
        let mut pages = Vec::new();
        assert_eq!(m.harvest_vmm_dirty(|p| pages.push(p)), 1);
        assert_eq!(pages, [((64 << 20) + 0x3000) / PAGE_SIZE]);
        assert_eq!(m.harvest_vmm_dirty(|_| {}), 0, "read and clear");
        m.zero(0x1000, 4096).unwrap();
        m.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
    }

    /// The `VmFlags` line of the mapping that holds `host` (`/proc/self/smaps`; adjacent
    /// mappings with the same flags may have been merged into one).
    fn vm_flags(host: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut found = false;
        for l in smaps.lines() {
            if let Some((range, _)) = l.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                found = start <= host && host < end;
            }
            if found && let Some(f) = l.strip_prefix("VmFlags:") {
                return f.to_string();
            }
        }
        panic!("no mapping at {host:#x} in /proc/self/smaps")
    }

    #[test]
    fn anonymous_guest_ram_is_advised_huge_pages_and_a_shared_file_is_not() {
        let m = VmMemory::new(&layout(), Backing::Anonymous).unwrap();
        for r in m.regions() {
            assert!(vm_flags(r.host).contains(" hg"), "{:#x}", r.gpa);
        }
        // The control: the same layout on a memfd is not advised (its pages are shmem's).
        let m = VmMemory::new(&layout(), Backing::Memfd).unwrap();
        assert!(!vm_flags(m.regions()[0].host).contains(" hg"));
    }

    #[test]
    fn anonymous_memfd_and_file_backings_behave_alike() {
        exercise(&VmMemory::new(&layout(), Backing::Anonymous).unwrap());
        exercise(&VmMemory::new(&layout(), Backing::Memfd).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        exercise(&VmMemory::new(&layout(), Backing::File(path.clone())).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24 << 20);
        // A second mapping of the same file sees the first one's data.
        let again = VmMemory::new(&layout(), Backing::File(path)).unwrap();
        let a = VmMemory::new(&layout(), Backing::Anonymous).unwrap();
        a.write((64 << 20) + 0x3000, &[1, 2, 3]).unwrap();
        assert_eq!(
            again.first_difference(&a),
            None,
            "the file kept what was written"
        );
        a.write(0x5000, b"x").unwrap();
        assert_eq!(again.first_difference(&a), Some(0x5000));
    }

    #[test]
    fn bad_layouts_are_named() {
        let e = VmMemory::new(&[(0, 4096), (0, 4096)], Backing::Anonymous).unwrap_err();
        assert!(e.to_string().contains("region 1 starts below"), "{e}");
        let e = VmMemory::new(&[(0, 100)], Backing::Anonymous).unwrap_err();
        assert!(e.to_string().contains("4 KiB aligned"), "{e}");
        assert!(VmMemory::new(&[], Backing::Anonymous).is_err());
    }
}
