//! What a firmware-facing test program needs in the rig guest: physical memory and MMIO through
//! `/dev/mem`, ACPI tables from sysfs, and QEMU's `edu` device driven through sysfs (BAR0 mmap,
//! bus mastering through the config space) with no kernel driver bound.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::util::{poll, read_sysfs};

/// A mapping of physical memory (RAM or MMIO) through `/dev/mem` (or a sysfs resource file),
/// accessed only with volatile loads and stores.
pub struct Phys {
    ptr: *mut u8,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is plain shared memory accessed with volatile operations; moving the
// handle to another thread does not change that.
unsafe impl Send for Phys {}

impl Phys {
    fn map(file: File, offset: u64, len: usize) -> Result<Phys> {
        // SAFETY: a new shared mapping of the file; the result is checked; nothing else refers
        // to the address range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of {len:#x} bytes at {offset:#x}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Phys {
            ptr: ptr.cast(),
            len,
            _file: file,
        })
    }

    /// `len` bytes of physical memory at `phys` (uncached: O_SYNC).
    pub fn dev_mem(phys: u64, len: usize) -> Result<Phys> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .context("opening /dev/mem (CONFIG_DEVMEM, STRICT_DEVMEM off)")?;
        Phys::map(f, phys, len)
    }

    /// A PCI BAR through its sysfs resource file.
    pub fn resource(path: &Path, len: usize) -> Result<Phys> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Phys::map(f, 0, len)
    }

    pub(crate) fn at(&self, off: u64, size: usize) -> *mut u8 {
        assert!(
            off as usize + size <= self.len && (off as usize).is_multiple_of(size),
            "access at {off:#x} (+{size}) outside the {:#x}-byte mapping or misaligned",
            self.len
        );
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.add(off as usize) }
    }

    pub fn r32(&self, off: u64) -> u32 {
        // SAFETY: in bounds and aligned (`at`); device or shared memory, read volatile.
        unsafe { std::ptr::read_volatile(self.at(off, 4).cast::<u32>()) }
    }

    pub fn w32(&self, off: u64, v: u32) {
        // SAFETY: as `r32`.
        unsafe { std::ptr::write_volatile(self.at(off, 4).cast::<u32>(), v) }
    }

    pub fn r64(&self, off: u64) -> u64 {
        // SAFETY: as `r32`.
        unsafe { std::ptr::read_volatile(self.at(off, 8).cast::<u64>()) }
    }

    pub fn w64(&self, off: u64, v: u64) {
        // SAFETY: as `r32`.
        unsafe { std::ptr::write_volatile(self.at(off, 8).cast::<u64>(), v) }
    }

    /// Fills `[off, off + len)` with `byte` (8 bytes at a time).
    pub fn fill(&self, off: u64, len: u64, byte: u8) {
        let v = u64::from_ne_bytes([byte; 8]);
        for o in (off..off + len).step_by(8) {
            self.w64(o, v);
        }
    }

    /// Whether `[off, off + len)` holds only `byte`.
    pub fn all(&self, off: u64, len: u64, byte: u8) -> bool {
        let v = u64::from_ne_bytes([byte; 8]);
        (off..off + len).step_by(8).all(|o| self.r64(o) == v)
    }
}

impl Drop for Phys {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this handle created.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The register base of every DMA remapping unit in the ACPI DMAR table (Intel VT-d spec 8.3:
/// DRHD structures, type 0, register base address at offset 8).
pub fn dmar_units() -> Result<Vec<u64>> {
    let t =
        std::fs::read("/sys/firmware/acpi/tables/DMAR").context("reading the ACPI DMAR table")?;
    ensure!(
        t.len() >= 48 && &t[..4] == b"DMAR",
        "not a DMAR table ({} bytes)",
        t.len()
    );
    let len = u32::from_le_bytes(t[4..8].try_into()?) as usize;
    ensure!(
        len <= t.len(),
        "DMAR length {len} exceeds the {} bytes read",
        t.len()
    );
    let mut out = Vec::new();
    let mut at = 48;
    while at + 4 <= len {
        let ty = u16::from_le_bytes(t[at..at + 2].try_into()?);
        let l = u16::from_le_bytes(t[at + 2..at + 4].try_into()?) as usize;
        ensure!(
            l >= 4 && at + l <= len,
            "DMAR structure at {at} has length {l}"
        );
        if ty == 0 {
            ensure!(l >= 16, "DRHD at {at} is {l} bytes");
            out.push(u64::from_le_bytes(t[at + 8..at + 16].try_into()?));
        }
        at += l;
    }
    Ok(out)
}

/// The MMIO base of every AMD IOMMU in the ACPI IVRS table (AMD IOMMU specification 48882,
/// IVRS: IVHD blocks of type 0x10, 0x11 or 0x40 after the 48-byte header; the IOMMU base
/// address at offset 8 of the block).
pub fn ivrs_units() -> Result<Vec<u64>> {
    let t =
        std::fs::read("/sys/firmware/acpi/tables/IVRS").context("reading the ACPI IVRS table")?;
    ensure!(
        t.len() >= 48 && &t[..4] == b"IVRS",
        "not an IVRS table ({} bytes)",
        t.len()
    );
    let len = u32::from_le_bytes(t[4..8].try_into()?) as usize;
    ensure!(
        len <= t.len(),
        "IVRS length {len} exceeds the {} bytes read",
        t.len()
    );
    let mut out = Vec::new();
    let mut at = 48;
    while at + 4 <= len {
        let ty = t[at];
        let l = u16::from_le_bytes(t[at + 2..at + 4].try_into()?) as usize;
        ensure!(
            l >= 4 && at + l <= len,
            "IVRS block at {at} (type {ty:#x}) has length {l}"
        );
        if matches!(ty, 0x10 | 0x11 | 0x40) {
            ensure!(l >= 16, "IVHD at {at} is {l} bytes");
            // The same IOMMU may be described by a type 10h and a type 11h block.
            let base = u64::from_le_bytes(t[at + 8..at + 16].try_into()?);
            if !out.contains(&base) {
                out.push(base);
            }
        }
        at += l;
    }
    Ok(out)
}

const EDU_VENDOR: &str = "0x1234";
const EDU_DEVICE: &str = "0x11e8";
/// edu (QEMU docs/specs/edu.rst): identification, DMA source, destination, count, command
/// (bit 0 start, bit 1 edu → RAM), and the 4 KiB buffer the DMA engine uses.
const EDU_ID: u64 = 0x00;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
pub const EDU_BUFFER: u64 = 0x40000;

/// The `edu` device with no driver: BAR0 through sysfs, bus mastering on.
pub struct Edu {
    pub addr: String,
    bar0: Phys,
}

impl Edu {
    pub fn open() -> Result<Edu> {
        let dir = Path::new("/sys/bus/pci/devices");
        let mut found = None;
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if read_sysfs(p.join("vendor")).ok().as_deref() == Some(EDU_VENDOR)
                && read_sysfs(p.join("device")).ok().as_deref() == Some(EDU_DEVICE)
            {
                found = Some(p);
            }
        }
        let p: PathBuf = found.context("no edu device (1234:11e8) on the PCI bus")?;
        let addr = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = std::fs::write(p.join("enable"), "1");
        // Command register (offset 4): memory space (bit 1) and bus master (bit 2).
        let cfg = OpenOptions::new()
            .read(true)
            .write(true)
            .open(p.join("config"))?;
        let mut cmd = [0u8; 2];
        cfg.read_exact_at(&mut cmd, 4)?;
        let v = u16::from_le_bytes(cmd) | 0x6;
        cfg.write_all_at(&v.to_le_bytes(), 4)?;
        let bar0 = Phys::resource(&p.join("resource0"), 1 << 20)?;
        let id = bar0.r32(EDU_ID);
        ensure!(
            id == 0x0100_00ed,
            "edu identification register reads {id:#x}"
        );
        Ok(Edu { addr, bar0 })
    }

    /// The requester id (bus 0): devfn.
    pub fn source_id(&self) -> Result<u16> {
        // 0000:00:DD.F
        let parts: Vec<&str> = self.addr.split([':', '.']).collect();
        ensure!(parts.len() == 4, "PCI address {}", self.addr);
        let dev = u16::from_str_radix(parts[2], 16)?;
        let func = u16::from_str_radix(parts[3], 16)?;
        Ok((dev << 3) | func)
    }

    /// One DMA of `len` bytes; `to_ram`: from edu's buffer to `dst`, else from `src` into it.
    /// Returns once the engine is idle again (a blocked DMA completes too: the IOMMU drops it).
    pub fn dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> Result<()> {
        self.bar0.w64(EDU_DMA_SRC, src);
        self.bar0.w64(EDU_DMA_DST, dst);
        self.bar0.w64(EDU_DMA_COUNT, len);
        self.bar0.w64(EDU_DMA_CMD, 1 | if to_ram { 2 } else { 0 });
        poll("the edu DMA engine", Duration::from_secs(10), || {
            Ok((self.bar0.r64(EDU_DMA_CMD) & 1 == 0).then_some(()))
        })
    }

    /// Copies `len` bytes from IOVA `src` to IOVA `dst` through edu's buffer (a device read,
    /// then a device write). edu's buffer is not reachable through BAR0, so every DMA test
    /// moves data between two IOVAs.
    pub fn copy(&self, src: u64, dst: u64, len: u64) -> Result<()> {
        self.dma(src, EDU_BUFFER, len, false)?;
        self.dma(EDU_BUFFER, dst, len, true)
    }
}

/// What every firmware-facing profile shares: the reserved RAM range (kernel command line
/// `memmap=16M$0x10000000`) holding the unit's tables and the DMA pages, and edu. Layout (offsets
/// into the range): the unit's own structures below `TABLES`, page tables from `TABLES`, 4 KiB
/// data pages from `DATA` (page `i` is mapped at IOVA `page(i)`), 2 MiB pages at `HUGE` and
/// `HUGE2`. Pages `SRC` and `SINK` carry written and read data through edu's buffer.
pub struct Scratch {
    pub mem: Phys,
    pub edu: Edu,
    next_table: u64,
}

pub const RESERVED: u64 = 0x1000_0000;
pub const RESERVED_LEN: usize = 16 << 20;
pub const TABLES: u64 = 0x10000;
pub const DATA: u64 = 0x10_0000;
pub const HUGE: u64 = 0x20_0000;
pub const HUGE2: u64 = 0x40_0000;
pub const IOVA: u64 = 0x4000_0000;
pub const IOVA_HUGE: u64 = 0x8000_0000;
/// Where `DevMemTables` frames (64 of them) live in the reserved range.
pub const PT_FRAMES: u64 = 0x8_0000;
pub const SRC: u64 = 30;
pub const SINK: u64 = 31;

/// The IOVA of data page `i`.
pub fn page(i: u64) -> u64 {
    IOVA + i * 0x1000
}

/// The offset of data page `i` in the reserved range.
pub fn data_off(i: u64) -> u64 {
    DATA + i * 0x1000
}

impl Scratch {
    pub fn open() -> Result<Scratch> {
        let mem = Phys::dev_mem(RESERVED, RESERVED_LEN)?;
        mem.fill(0, TABLES, 0);
        Ok(Scratch {
            mem,
            edu: Edu::open()?,
            next_table: TABLES,
        })
    }

    /// The physical address of offset `off`.
    pub fn pa(&self, off: u64) -> u64 {
        RESERVED + off
    }

    /// A zeroed 4 KiB table; its offset.
    pub fn alloc_table(&mut self) -> u64 {
        let off = self.next_table;
        self.next_table += 0x1000;
        self.mem.fill(off, 0x1000, 0);
        off
    }

    /// The device writes `len` bytes of `byte` at `iova`: the CPU fills the source page, edu
    /// reads it and writes it to `iova`.
    pub fn write(&self, iova: u64, len: u64, byte: u8) -> Result<()> {
        self.mem.fill(data_off(SRC), len, byte);
        self.edu.copy(page(SRC), iova, len)
    }

    /// A device write through data page `i`'s IOVA lands in that page and not in its
    /// neighbours.
    pub fn write_lands(&self, i: u64) -> Result<()> {
        self.mem.fill(data_off(i - 1), 3 * 4096, 0);
        self.write(page(i), 4096, 0xa0 | i as u8)?;
        ensure!(
            self.mem.all(data_off(i), 4096, 0xa0 | i as u8),
            "the data is not at the translated page"
        );
        ensure!(
            self.mem.all(data_off(i - 1), 4096, 0) && self.mem.all(data_off(i + 1), 4096, 0),
            "a neighbour page changed"
        );
        Ok(())
    }

    /// A device read through data page `i`'s IOVA returns that page.
    pub fn read_comes_from(&self, i: u64) -> Result<()> {
        self.mem.fill(data_off(i), 4096, 0x3c);
        ensure!(
            self.read_is(page(i), 4096, 0x3c)?,
            "edu did not read the translated page"
        );
        Ok(())
    }

    /// A device write at `iova` lands at reserved-range offset `off`.
    pub fn write_lands_at(&self, iova: u64, off: u64, what: &str) -> Result<()> {
        self.mem.fill(off, 4096, 0);
        self.write(iova, 4096, 0xb2)?;
        ensure!(
            self.mem.all(off, 4096, 0xb2),
            "{what}: the data is not at {:#x}",
            RESERVED + off
        );
        Ok(())
    }

    /// The device reads `len` bytes at `iova` and writes them to the sink page; whether they
    /// all hold `byte` (the sink is first filled with the complement).
    pub fn read_is(&self, iova: u64, len: u64, byte: u8) -> Result<bool> {
        self.mem.fill(data_off(SINK), len, !byte);
        self.edu.copy(iova, page(SINK), len)?;
        Ok(self.mem.all(data_off(SINK), len, byte))
    }
}

/// Table frames for `livemig-iommu-pt`'s `PageTable` in the reserved range, through /dev/mem:
/// the crate builds and harvests the very tables the emulated IOMMU walks.
pub struct DevMemTables {
    map: Phys,
    base: u64,
    count: usize,
    used: std::sync::Mutex<Vec<bool>>,
}

// SAFETY: the frames are accessed only through atomics (`Frame` is `[AtomicU64; 512]`), and
// the allocation state is behind a mutex.
unsafe impl Sync for DevMemTables {}

impl DevMemTables {
    /// `count` frames at reserved-range offset `off`.
    pub fn open(off: u64, count: usize) -> Result<DevMemTables> {
        Ok(DevMemTables {
            map: Phys::dev_mem(RESERVED + off, count * 4096)?,
            base: RESERVED + off,
            count,
            used: std::sync::Mutex::new(vec![false; count]),
        })
    }
}

impl livemig_iommu_pt::PhysMem for DevMemTables {
    fn alloc_frame(&self) -> Option<u64> {
        let mut used = self.used.lock().ok()?;
        let i = used.iter().position(|u| !u)?;
        used[i] = true;
        self.map.fill(i as u64 * 4096, 4096, 0);
        Some(self.base + i as u64 * 4096)
    }

    fn free_frame(&self, pa: u64) {
        if let (Some(off), Ok(mut used)) = (pa.checked_sub(self.base), self.used.lock())
            && let Some(u) = used.get_mut((off / 4096) as usize)
        {
            *u = false;
        }
    }

    fn frame(&self, pa: u64) -> Option<&livemig_iommu_pt::Frame> {
        let off = pa.checked_sub(self.base)?;
        let i = (off / 4096) as usize;
        if off % 4096 != 0 || i >= self.count {
            return None;
        }
        let p = self.map.at(off, 8).cast::<livemig_iommu_pt::Frame>();
        // SAFETY: the frame lies inside the mapping (checked), which lives as long as `self`;
        // it is 4 KiB-aligned; all bit patterns are valid atomics; it is only ever accessed
        // through atomics (by the crate) and by the emulated IOMMU.
        Some(unsafe { &*p })
    }
}

/// The two DMA cases every firmware profile starts with: a device write through data page 1's
/// IOVA lands in that page only, and a read through page 3's comes from it.
pub fn dma_cases(r: &mut crate::harness::Runner, write: &str, read: &str, s: &Scratch) {
    use crate::harness::Outcome;
    r.case(write, || s.write_lands(1).map(|()| Outcome::Pass));
    r.case(read, || s.read_comes_from(3).map(|()| Outcome::Pass));
}

/// A `livemig-iommu-pt` page table in `format` whose frames are the reserved range's
/// `PT_FRAMES` (what the emulated IOMMU walks), and its root as an offset into that range.
pub fn page_table<F: livemig_iommu_pt::PageTableFormat>(
    format: Result<F, livemig_iommu_pt::Error>,
) -> Result<(livemig_iommu_pt::PageTable<F, DevMemTables>, u64)> {
    let pt = livemig_iommu_pt::PageTable::new(format?, DevMemTables::open(PT_FRAMES, 64)?)?;
    let root = pt.root() - RESERVED;
    Ok((pt, root))
}
