//! One fake kernel behind both `livemig-vfio` and `livemig-iommufd` (their `fake-kernel`
//! feature), shared by a source and a destination host in one process.
//!
//! Structure layouts come from rust-vmm's `vfio-bindings` and `iommufd-bindings`, not from the
//! crates under test; request numbers are `_IO(';', base + n)` from `include/uapi/linux/vfio.h`
//! (`VFIO_BASE` 100) and `include/uapi/linux/iommufd.h` (`IOMMUFD_CMD_BASE` 0x80). Behaviour
//! follows what those headers document: one arc per `MIG_DEVICE_STATE` SET, a data fd returned
//! on entering PRE_COPY, STOP_COPY and RESUMING, `VFIO_MIG_GET_PRECOPY_INFO` only in PRE_COPY,
//! a reset back to RUNNING, and dirty bits reported per IOVA page and cleared unless
//! `NO_CLEAR`.
//!
//! With [`World::full`] the devices are those of a Linux 7.3 driver with every optional part:
//! the P2P states (`RUNNING_P2P`, `PRE_COPY_P2P` and their arcs, vfio.h's FSM), device DMA
//! logging (`DMA_LOGGING_START`/`STOP`/`REPORT`: the device logs the pages it writes inside
//! the started ranges; a report sets bits per `page_size` and clears them) and the
//! `MIG_PRECOPY_INFOv2` opt-in (`flags` becomes an output, 0 here); with [`World::hwpt_dirty`]
//! off the IOMMU reports no dirty tracking, so the device's log is what tracks its DMA.
//! Without `full` they answer ENOTTY, as a Linux 6.12 device.
//!
//! Every call is counted per host side; [`World::fail`] makes exactly one of them fail with an
//! errno before the fake looks at it.

use std::collections::{BTreeSet, HashMap};
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_bindings::iommufd as iob;
use vfio_bindings::bindings::vfio as vb;

/// Which host a call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Source,
    Destination,
}

const fn io(nr: u64) -> u64 {
    (b';' as u64) << 8 | nr
}
const VFIO_DEVICE_GET_INFO: u64 = io(100 + 7);
const VFIO_DEVICE_GET_REGION_INFO: u64 = io(100 + 8);
const VFIO_DEVICE_RESET: u64 = io(100 + 11);
const VFIO_DEVICE_FEATURE: u64 = io(100 + 17);
const VFIO_DEVICE_BIND_IOMMUFD: u64 = io(100 + 18);
const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u64 = io(100 + 19);
const VFIO_DEVICE_DETACH_IOMMUFD_PT: u64 = io(100 + 20);
const VFIO_MIG_GET_PRECOPY_INFO: u64 = io(100 + 21);
/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (Linux 7.3 vfio.h; not in vfio-bindings 0.6).
const PRECOPY_INFO_V2: u32 = 12;
const IOMMU_DESTROY: u64 = io(0x80);
const IOMMU_IOAS_ALLOC: u64 = io(0x81);
const IOMMU_IOAS_IOVA_RANGES: u64 = io(0x84);
const IOMMU_IOAS_MAP: u64 = io(0x85);
const IOMMU_IOAS_UNMAP: u64 = io(0x86);
const IOMMU_HWPT_ALLOC: u64 = io(0x89);
const IOMMU_GET_HW_INFO: u64 = io(0x8a);
const IOMMU_HWPT_SET_DIRTY_TRACKING: u64 = io(0x8b);
const IOMMU_HWPT_GET_DIRTY_BITMAP: u64 = io(0x8c);

/// `vfio_device_mig_state` values (vfio.h).
pub const ST_ERROR: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR;
pub const ST_STOP: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP;
pub const ST_RUNNING: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING;
pub const ST_STOP_COPY: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY;
pub const ST_RESUMING: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING;
pub const ST_PRE_COPY: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY;
pub const ST_RUNNING_P2P: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P;
pub const ST_PRE_COPY_P2P: u32 = vb::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P;

/// The part of the device state offered as PRE_COPY initial data.
const INITIAL: usize = 12 << 10;
const PAGE: u64 = 4096;

/// A migratable device: its state bytes, where it is, and its open data session.
#[derive(Debug)]
pub struct Dev {
    pub side: Side,
    pub state: u32,
    /// Source: the state it saves. Destination: the state it loaded (after RESUMING → STOP).
    pub blob: Vec<u8>,
    pub loaded: Option<Vec<u8>>,
    pub resets: u32,
    /// Bytes of `blob` read in PRE_COPY (STOP_COPY offers the rest).
    consumed: usize,
    /// What the RESUMING session was given.
    incoming: Vec<u8>,
    data_fd: Option<RawFd>,
    attached: Option<u32>,
    /// GPA of the page this device writes by DMA while it runs.
    dma_page: u64,
    dma_count: u64,
    /// Device DMA logging: the started ranges (iova, length), its page size, the logged pages.
    log: Option<DmaLog>,
    /// The PRECOPY_INFOv2 opt-in was made.
    precopy_v2: bool,
}

/// A device's DMA log: the started ranges (iova, length), its page size, the logged pages.
type DmaLog = (Vec<(u64, u64)>, u64, BTreeSet<u64>);

#[derive(Debug)]
enum Obj {
    Ioas {
        maps: Vec<(u64, u64, u64)>, // (iova, length, user_va)
    },
    Hwpt {
        ioas: u32,
        dirty_cap: bool,
        tracking: bool,
        dirty: BTreeSet<u64>,
    },
}

/// What one call was, for the sweep's list of points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub side: Side,
    pub what: &'static str,
    /// The engine phase its side was in (from the engine's events; "setup" before any).
    pub phase: String,
}

/// The state of both fake kernels.
#[derive(Debug, Default)]
pub struct World {
    pub devs: Vec<Dev>,
    /// Device fd → device index; data fd → device index; iommufd fd → side.
    dev_fds: HashMap<RawFd, usize>,
    data_fds: HashMap<RawFd, usize>,
    iommufds: HashMap<RawFd, Side>,
    objs: HashMap<u32, (Side, Obj)>,
    next_id: u32,
    /// The side whose host is being opened (opens happen on the test's thread).
    pub opening: Option<Side>,
    /// Every call, in order per side.
    pub calls: Vec<Call>,
    counts: HashMap<Side, u64>,
    /// Fail call `n` of `side` with `errno`.
    pub fail: Option<(Side, u64, i32)>,
    /// Whether the armed failure happened.
    pub failed: bool,
    /// A second failure (the error-path pass: a call made only because `fail` happened).
    pub fail2: Option<(Side, u64, i32)>,
    /// Whether the second failure happened.
    pub failed2: bool,
    /// The engine phase each side is in, from the engines' events.
    pub phase: HashMap<Side, String>,
    /// Sides that destroyed an HWPT with dirty tracking still on.
    destroyed_tracking: BTreeSet<Side>,
    /// Negative control: harvests report nothing (a dropped harvest).
    pub drop_harvest: bool,
    /// Devices with P2P, DMA logging and PRECOPY_INFOv2 (a Linux 7.3 driver); off: ENOTTY.
    pub full: bool,
    /// The IOMMU offers dirty tracking (on by default; see [`World::new`]).
    pub hwpt_dirty: bool,
    /// Arcs into or out of a P2P state so far.
    pub p2p_arcs: u64,
    /// Negative control: the first call `what` of `side` panics (on whatever thread makes it).
    pub panic_on: Option<(Side, &'static str)>,
    /// Negative control: `VFIO_DEVICE_RESET` does nothing.
    pub noop_reset: bool,
    /// Negative control: an arc to RUNNING succeeds without the device moving (a no-op
    /// resume).
    pub noop_running: bool,
}

fn err<T>(n: i32) -> io::Result<T> {
    Err(io::Error::from_raw_os_error(n))
}

fn memfd(content: &[u8]) -> OwnedFd {
    // SAFETY: the name is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(c"fake-kernel".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    io::Write::write_all(&mut f, content).unwrap();
    // SAFETY: `fd` is open; rewinding it has no memory effects.
    unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_SET) };
    fd
}

impl World {
    /// A world with one device per side; the source's device holds `blob`.
    pub fn new(blob: Vec<u8>, dma_page: u64) -> World {
        let dev = |side, blob| Dev {
            side,
            state: ST_RUNNING,
            blob,
            loaded: None,
            resets: 0,
            consumed: 0,
            incoming: Vec::new(),
            data_fd: None,
            attached: None,
            dma_page,
            dma_count: 0,
            log: None,
            precopy_v2: false,
        };
        World {
            devs: vec![dev(Side::Source, blob), dev(Side::Destination, Vec::new())],
            next_id: 1,
            hwpt_dirty: true,
            ..World::default()
        }
    }

    /// Counts a call and decides whether it fails.
    fn enter(&mut self, side: Side, what: &'static str) -> io::Result<()> {
        let n = self.counts.entry(side).or_default();
        let at = *n;
        *n += 1;
        let phase = self
            .phase
            .get(&side)
            .cloned()
            .unwrap_or_else(|| "setup".into());
        self.calls.push(Call { side, what, phase });
        if self.panic_on == Some((side, what)) {
            self.panic_on = None;
            panic!("fake kernel: {side:?} {what} panics (the negative control)");
        }
        match (self.fail, self.fail2) {
            (Some((s, k, errno)), _) if s == side && k == at => {
                self.failed = true;
                err(errno)
            }
            (_, Some((s, k, errno))) if s == side && k == at => {
                self.failed2 = true;
                err(errno)
            }
            _ => Ok(()),
        }
    }

    /// Objects still allocated on `side` (the kernel frees them when the iommufd closes; the
    /// fake cannot see a close, so a test checks this after each run instead).
    #[allow(dead_code)]
    pub fn live_objects(&self, side: Side) -> usize {
        self.objs.values().filter(|(s, _)| *s == side).count()
    }

    /// Whether any HWPT of `side` still tracks dirty pages, or was destroyed while it did
    /// (nobody switched it off).
    pub fn tracking(&self, side: Side) -> bool {
        self.destroyed_tracking.contains(&side)
            || self
                .objs
                .values()
                .any(|(s, o)| *s == side && matches!(o, Obj::Hwpt { tracking: true, .. }))
    }

    /// A DMA write of `side`'s device to `gpa`, as the HWPTs that track see it (a dirty bit;
    /// the page itself is left alone).
    #[allow(dead_code)]
    pub fn mark_dirty(&mut self, side: Side, gpa: u64) {
        for (s, o) in self.objs.values_mut() {
            if let (
                true,
                Obj::Hwpt {
                    tracking: true,
                    dirty,
                    ..
                },
            ) = (*s == side, o)
            {
                dirty.insert(gpa & !(PAGE - 1));
            }
        }
    }

    /// Makes the next call of `side` fail with `errno`.
    #[allow(dead_code)]
    pub fn fail_next(&mut self, side: Side, errno: i32) {
        let at = self.counts.get(&side).copied().unwrap_or(0);
        self.fail = Some((side, at, errno));
        self.failed = false;
    }

    fn alloc(&mut self, side: Side, o: Obj) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.objs.insert(id, (side, o));
        id
    }

    /// The device writes its DMA page through the IOAS its HWPT translates (IOVA = GPA) and
    /// the HWPTs that track mark it dirty: what an IOMMU with dirty tracking does.
    fn dma(&mut self, d: usize) {
        let Some(pt) = self.devs[d].attached else {
            return;
        };
        let gpa = self.devs[d].dma_page;
        self.devs[d].dma_count += 1;
        let value = self.devs[d].dma_count;
        let ioas = match self.objs.get(&pt) {
            Some((_, Obj::Hwpt { ioas, .. })) => *ioas,
            Some((_, Obj::Ioas { .. })) => pt,
            None => return,
        };
        let Some((_, Obj::Ioas { maps })) = self.objs.get(&ioas) else {
            return;
        };
        let Some(&(iova, _, va)) = maps
            .iter()
            .find(|(iova, len, _)| gpa >= *iova && gpa + 8 <= iova + len)
        else {
            return;
        };
        let p = (va + (gpa - iova)) as *mut u64;
        // SAFETY: the IOAS maps `va..va + len` of the test's guest RAM, which stays mapped
        // while any device is attached (the host unmaps the IOAS before releasing RAM); the
        // write is an aligned u64 inside it, as a device's DMA would be.
        unsafe { p.write_volatile(value) };
        // The device's own log, if it tracks this IOVA.
        if let Some((ranges, page, logged)) = &mut self.devs[d].log
            && ranges.iter().any(|&(i, l)| gpa >= i && gpa < i + l)
        {
            logged.insert(gpa & !(*page - 1));
        }
        for (_, o) in self.objs.values_mut() {
            if let Obj::Hwpt {
                ioas: i,
                tracking: true,
                dirty,
                ..
            } = o
                && *i == ioas
            {
                dirty.insert(gpa & !(PAGE - 1));
            }
        }
    }

    /// One `MIG_DEVICE_STATE` SET arc.
    fn set_state(&mut self, d: usize, to: u32) -> io::Result<Option<OwnedFd>> {
        let from = self.devs[d].state;
        let arc_ok = matches!(
            (from, to),
            (ST_RUNNING, ST_STOP)
                | (ST_RUNNING, ST_PRE_COPY)
                | (ST_PRE_COPY, ST_RUNNING)
                | (ST_PRE_COPY, ST_STOP_COPY)
                | (ST_STOP, ST_RUNNING)
                | (ST_STOP, ST_STOP_COPY)
                | (ST_STOP, ST_RESUMING)
                | (ST_STOP_COPY, ST_STOP)
                | (ST_RESUMING, ST_STOP)
        ) || (self.full
            && matches!(
                (from, to),
                (ST_RUNNING, ST_RUNNING_P2P)
                    | (ST_RUNNING_P2P, ST_RUNNING)
                    | (ST_RUNNING_P2P, ST_STOP)
                    | (ST_STOP, ST_RUNNING_P2P)
                    | (ST_PRE_COPY, ST_PRE_COPY_P2P)
                    | (ST_PRE_COPY_P2P, ST_PRE_COPY)
                    | (ST_PRE_COPY_P2P, ST_STOP_COPY)
            ));
        if !arc_ok {
            return err(libc::EINVAL);
        }
        if [from, to]
            .iter()
            .any(|s| matches!(*s, ST_RUNNING_P2P | ST_PRE_COPY_P2P))
        {
            self.p2p_arcs += 1;
        }
        // In-flight DMA lands before the device stops (the final harvest must find it); a
        // device that goes on running (RUNNING_P2P -> RUNNING, a destination starting) has
        // nothing to land.
        if matches!(
            from,
            ST_RUNNING | ST_PRE_COPY | ST_RUNNING_P2P | ST_PRE_COPY_P2P
        ) && (from, to) != (ST_RUNNING_P2P, ST_RUNNING)
        {
            self.dma(d);
        }
        let dev = &mut self.devs[d];
        let mut out = None;
        match (from, to) {
            (ST_RUNNING, ST_PRE_COPY) => {
                dev.consumed = 0;
                out = Some(memfd(&dev.blob[..INITIAL.min(dev.blob.len())]));
            }
            (ST_PRE_COPY, ST_STOP_COPY)
            | (ST_PRE_COPY_P2P, ST_STOP_COPY)
            | (ST_STOP, ST_STOP_COPY) => {
                if from == ST_STOP {
                    dev.consumed = 0;
                }
                out = Some(memfd(&dev.blob[dev.consumed..]));
            }
            (ST_STOP, ST_RESUMING) => {
                dev.incoming.clear();
                out = Some(memfd(&[]));
            }
            (ST_RESUMING, ST_STOP) => {
                // The driver validates what it was given: a short or corrupt state fails the
                // arc and leaves the device in ERROR.
                let bytes = std::mem::take(&mut dev.incoming);
                if !valid_blob(&bytes) {
                    dev.state = ST_ERROR;
                    return err(libc::EINVAL);
                }
                dev.loaded = Some(bytes);
            }
            _ => {}
        }
        // PRE_COPY <-> PRE_COPY_P2P keeps the session (vfio.h); every other arc ends it.
        if !matches!(
            (from, to),
            (ST_PRE_COPY, ST_PRE_COPY_P2P) | (ST_PRE_COPY_P2P, ST_PRE_COPY)
        ) {
            dev.data_fd = out.as_ref().map(|f| f.as_raw_fd());
        }
        if !(to == ST_RUNNING && self.noop_running) {
            dev.state = to;
        }
        if let Some(fd) = &out {
            self.data_fds.insert(fd.as_raw_fd(), d);
        }
        Ok(out)
    }

    /// The device whose fd `fd` duplicates (the same inode), if any.
    fn dup_of(&self, fd: RawFd) -> Option<usize> {
        let ino = |fd: RawFd| {
            // SAFETY: an all-zero stat is a valid value of this plain C struct.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat writes a stat for a valid fd, or fails for another.
            let rc = unsafe { libc::fstat(fd, &mut st) };
            (rc == 0).then_some((st.st_dev, st.st_ino))
        };
        let me = ino(fd)?;
        self.dev_fds
            .iter()
            .find(|(f, _)| ino(**f) == Some(me))
            .map(|(_, &d)| d)
    }

    fn side_of_fd(&self, fd: RawFd) -> Option<Side> {
        self.dev_fds
            .get(&fd)
            .or_else(|| self.data_fds.get(&fd))
            .map(|&d| self.devs[d].side)
            .or_else(|| self.iommufds.get(&fd).copied())
    }
}

/// A device state the destination accepts: a length, then bytes derived from it.
pub fn make_blob(len: usize, seed: u8) -> Vec<u8> {
    let mut v = (len as u32).to_le_bytes().to_vec();
    v.extend((4..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

fn valid_blob(b: &[u8]) -> bool {
    b.len() >= 4 && u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize == b.len()
}

/// The handle installed in both crates.
#[derive(Clone)]
pub struct Kernel(pub Arc<Mutex<World>>);

impl Kernel {
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vfio_ioctl(&self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32> {
        let mut w = self.world();
        if let Some(&d) = w.data_fds.get(&fd) {
            let side = w.devs[d].side;
            w.enter(side, "VFIO_MIG_GET_PRECOPY_INFO")?;
            if request != VFIO_MIG_GET_PRECOPY_INFO {
                return err(libc::ENOTTY);
            }
            // SAFETY: the caller passes a vfio_precopy_info.
            let info = unsafe { &mut *(arg as *mut vb::vfio_precopy_info) };
            if info.argsz < 24
                || !matches!(w.devs[d].state, ST_PRE_COPY | ST_PRE_COPY_P2P)
                || w.devs[d].data_fd != Some(fd)
            {
                return err(libc::EINVAL);
            }
            // The device keeps writing its page while it runs in PRE_COPY.
            w.dma(d);
            let pos = w.devs[d].consumed as u64;
            info.initial_bytes = (INITIAL.min(w.devs[d].blob.len()) as u64).saturating_sub(pos);
            info.dirty_bytes = 0;
            info.flags = 0;
            return Ok(0);
        }
        // A duplicated device fd (the DMA log tracker's handle) is the same open file.
        let Some(d) = w.dev_fds.get(&fd).copied().or_else(|| w.dup_of(fd)) else {
            return err(libc::EBADF);
        };
        let side = w.devs[d].side;
        let what = match request {
            VFIO_DEVICE_FEATURE => {
                // SAFETY: the caller passes a vfio_device_feature header and its payload.
                let flags = unsafe { (*(arg as *const vb::vfio_device_feature)).flags };
                match (flags & vb::VFIO_DEVICE_FEATURE_MASK, flags >> 16) {
                    (1, _) => "FEATURE MIGRATION",
                    (2, 1) => "FEATURE GET MIG_DEVICE_STATE",
                    (2, _) => "FEATURE SET MIG_DEVICE_STATE",
                    (9, _) => "FEATURE MIG_DATA_SIZE",
                    (6, _) => "FEATURE DMA_LOGGING_START",
                    (7, _) => "FEATURE DMA_LOGGING_STOP",
                    (8, _) => "FEATURE DMA_LOGGING_REPORT",
                    (12, _) => "FEATURE MIG_PRECOPY_INFOv2",
                    _ => "FEATURE (other)",
                }
            }
            VFIO_DEVICE_BIND_IOMMUFD => "VFIO_DEVICE_BIND_IOMMUFD",
            VFIO_DEVICE_ATTACH_IOMMUFD_PT => "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            VFIO_DEVICE_DETACH_IOMMUFD_PT => "VFIO_DEVICE_DETACH_IOMMUFD_PT",
            VFIO_DEVICE_RESET => "VFIO_DEVICE_RESET",
            VFIO_DEVICE_GET_INFO => "VFIO_DEVICE_GET_INFO",
            VFIO_DEVICE_GET_REGION_INFO => "VFIO_DEVICE_GET_REGION_INFO",
            _ => "VFIO (unknown request)",
        };
        if let Err(e) = w.enter(side, what) {
            // A driver that fails an arc with EIO leaves the device in ERROR (vfio.h: "the
            // device has failed and must be reset").
            if what == "FEATURE SET MIG_DEVICE_STATE" && e.raw_os_error() == Some(libc::EIO) {
                w.devs[d].state = ST_ERROR;
            }
            return Err(e);
        }
        match request {
            VFIO_DEVICE_FEATURE => {
                // SAFETY: as above.
                let hdr = unsafe { &*(arg as *const vb::vfio_device_feature) };
                let (feature, access) = (hdr.flags & 0xffff, hdr.flags & !0xffff);
                // SAFETY: the payload follows the 8-byte header (vfio.h `data[]`).
                let payload = unsafe { (arg as *mut u8).add(8) };
                let get = access == vb::VFIO_DEVICE_FEATURE_GET;
                let set = access == vb::VFIO_DEVICE_FEATURE_SET;
                let probe = access & vb::VFIO_DEVICE_FEATURE_PROBE != 0;
                match feature {
                    vb::VFIO_DEVICE_FEATURE_MIGRATION if probe => Ok(0),
                    vb::VFIO_DEVICE_FEATURE_MIGRATION if get => {
                        let mut flags = vb::VFIO_MIGRATION_STOP_COPY | vb::VFIO_MIGRATION_PRE_COPY;
                        if w.full {
                            flags |= vb::VFIO_MIGRATION_P2P;
                        }
                        // SAFETY: the payload is a vfio_device_feature_migration.
                        unsafe {
                            (*(payload as *mut vb::vfio_device_feature_migration)).flags =
                                u64::from(flags)
                        };
                        Ok(0)
                    }
                    vb::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if get => {
                        // SAFETY: the payload is a vfio_device_feature_mig_state.
                        let st =
                            unsafe { &mut *(payload as *mut vb::vfio_device_feature_mig_state) };
                        st.device_state = w.devs[d].state;
                        Ok(0)
                    }
                    vb::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if set => {
                        // SAFETY: as above.
                        let st =
                            unsafe { &mut *(payload as *mut vb::vfio_device_feature_mig_state) };
                        let out = w.set_state(d, st.device_state)?;
                        st.data_fd = out.map_or(-1, std::os::fd::IntoRawFd::into_raw_fd);
                        Ok(0)
                    }
                    vb::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE if get => {
                        let dev = &w.devs[d];
                        if !matches!(dev.state, ST_PRE_COPY | ST_STOP_COPY | ST_RUNNING | ST_STOP) {
                            return err(libc::EINVAL);
                        }
                        // SAFETY: the payload is a vfio_device_feature_mig_data_size.
                        unsafe {
                            (*(payload as *mut vb::vfio_device_feature_mig_data_size))
                                .stop_copy_length = dev.blob.len() as u64
                        };
                        Ok(0)
                    }
                    // No DMA logging and no PRECOPY_INFOv2 (a Linux 6.12 device).
                    _ if !w.full => err(libc::ENOTTY),
                    vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_START if probe => Ok(0),
                    vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_START if set => {
                        // SAFETY: the payload is a vfio_device_feature_dma_logging_control.
                        let c = unsafe {
                            &mut *(payload as *mut vb::vfio_device_feature_dma_logging_control)
                        };
                        if c.num_ranges == 0 || c.num_ranges > 256 || w.devs[d].log.is_some() {
                            return err(libc::EINVAL);
                        }
                        c.page_size = c.page_size.max(PAGE).next_power_of_two();
                        // SAFETY: `ranges` points at `num_ranges` ranges (the caller's array).
                        let ranges = unsafe {
                            std::slice::from_raw_parts(
                                c.ranges as *const vb::vfio_device_feature_dma_logging_range,
                                c.num_ranges as usize,
                            )
                        };
                        let ranges = ranges.iter().map(|r| (r.iova, r.length)).collect();
                        w.devs[d].log = Some((ranges, c.page_size, BTreeSet::new()));
                        Ok(0)
                    }
                    vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP if set => {
                        w.devs[d].log = None;
                        Ok(0)
                    }
                    vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT if get => {
                        // SAFETY: the payload is a vfio_device_feature_dma_logging_report.
                        let r = unsafe {
                            &*(payload as *const vb::vfio_device_feature_dma_logging_report)
                        };
                        let Some((_, page, logged)) = &mut w.devs[d].log else {
                            return err(libc::EINVAL);
                        };
                        if r.page_size < *page || !r.page_size.is_power_of_two() {
                            return err(libc::EINVAL);
                        }
                        let end = r.iova.saturating_add(r.length);
                        let hits: Vec<u64> = logged.range(r.iova..end).copied().collect();
                        let drop_harvest = w.drop_harvest;
                        let Some((_, _, logged)) = &mut w.devs[d].log else {
                            return err(libc::EINVAL);
                        };
                        for gpa in hits {
                            logged.remove(&gpa);
                            if drop_harvest {
                                continue;
                            }
                            let bit = (gpa - r.iova) / r.page_size;
                            // SAFETY: the caller's bitmap covers `length / page_size` bits.
                            unsafe {
                                let word = (r.bitmap as *mut u64).add((bit / 64) as usize);
                                word.write(word.read() | 1 << (bit % 64));
                            }
                        }
                        Ok(0)
                    }
                    abi_precopy_v2 if abi_precopy_v2 == PRECOPY_INFO_V2 && set => {
                        w.devs[d].precopy_v2 = true;
                        Ok(0)
                    }
                    _ => err(libc::ENOTTY),
                }
            }
            VFIO_DEVICE_BIND_IOMMUFD => {
                // SAFETY: the caller passes a vfio_device_bind_iommufd.
                let b = unsafe { &mut *(arg as *mut vb::vfio_device_bind_iommufd) };
                if !w.iommufds.contains_key(&b.iommufd) {
                    return err(libc::EBADF);
                }
                b.out_devid = 100 + d as u32;
                Ok(0)
            }
            VFIO_DEVICE_ATTACH_IOMMUFD_PT => {
                // SAFETY: the caller passes a vfio_device_attach_iommufd_pt.
                let a = unsafe { &mut *(arg as *mut vb::vfio_device_attach_iommufd_pt) };
                match w.objs.get(&a.pt_id) {
                    Some((s, _)) if *s == side => {
                        w.devs[d].attached = Some(a.pt_id);
                        Ok(0)
                    }
                    _ => err(libc::ENOENT),
                }
            }
            VFIO_DEVICE_DETACH_IOMMUFD_PT => {
                w.devs[d].attached = None;
                Ok(0)
            }
            VFIO_DEVICE_RESET => {
                if !w.noop_reset {
                    let dev = &mut w.devs[d];
                    dev.state = ST_RUNNING;
                    dev.loaded = None;
                    dev.incoming.clear();
                    dev.consumed = 0;
                    dev.data_fd = None;
                    dev.resets += 1;
                }
                Ok(0)
            }
            _ => err(libc::ENOTTY),
        }
    }

    fn iommufd_ioctl(&self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32> {
        let mut w = self.world();
        let Some(&side) = w.iommufds.get(&fd) else {
            return err(libc::EBADF);
        };
        let what = match request {
            IOMMU_DESTROY => "IOMMU_DESTROY",
            IOMMU_IOAS_ALLOC => "IOMMU_IOAS_ALLOC",
            IOMMU_IOAS_IOVA_RANGES => "IOMMU_IOAS_IOVA_RANGES",
            IOMMU_IOAS_MAP => "IOMMU_IOAS_MAP",
            IOMMU_IOAS_UNMAP => "IOMMU_IOAS_UNMAP",
            IOMMU_HWPT_ALLOC => "IOMMU_HWPT_ALLOC",
            IOMMU_GET_HW_INFO => "IOMMU_GET_HW_INFO",
            IOMMU_HWPT_SET_DIRTY_TRACKING => "IOMMU_HWPT_SET_DIRTY_TRACKING",
            IOMMU_HWPT_GET_DIRTY_BITMAP => "IOMMU_HWPT_GET_DIRTY_BITMAP",
            _ => "IOMMU (unknown request)",
        };
        w.enter(side, what)?;
        match request {
            IOMMU_DESTROY => {
                // SAFETY: the caller passes an iommu_destroy.
                let a = unsafe { &*(arg as *const iob::iommu_destroy) };
                match w.objs.get(&a.id) {
                    Some((s, o)) if *s == side => {
                        if matches!(o, Obj::Hwpt { tracking: true, .. }) {
                            w.destroyed_tracking.insert(side);
                        }
                        w.objs.remove(&a.id);
                        Ok(0)
                    }
                    _ => err(libc::ENOENT),
                }
            }
            IOMMU_IOAS_ALLOC => {
                let id = w.alloc(side, Obj::Ioas { maps: Vec::new() });
                // SAFETY: the caller passes an iommu_ioas_alloc.
                unsafe { (*(arg as *mut iob::iommu_ioas_alloc)).out_ioas_id = id };
                Ok(0)
            }
            IOMMU_IOAS_IOVA_RANGES => {
                // SAFETY: the caller passes an iommu_ioas_iova_ranges whose `allowed_iovas`
                // holds `num_iovas` ranges.
                let a = unsafe { &mut *(arg as *mut iob::iommu_ioas_iova_ranges) };
                match w.objs.get(&a.ioas_id) {
                    Some((s, Obj::Ioas { .. })) if *s == side => {}
                    _ => return err(libc::ENOENT),
                }
                // No device narrows this fake's IOAS: all of IOVA space, 4 KiB alignment.
                let n = a.num_iovas;
                a.num_iovas = 1;
                a.out_iova_alignment = PAGE;
                if n < 1 {
                    return err(libc::EMSGSIZE);
                }
                // SAFETY: at least one range fits (checked above).
                unsafe {
                    *(a.allowed_iovas as *mut iob::iommu_iova_range) = iob::iommu_iova_range {
                        start: 0,
                        last: u64::MAX,
                    };
                }
                Ok(0)
            }
            IOMMU_IOAS_MAP => {
                // SAFETY: the caller passes an iommu_ioas_map.
                let a = unsafe { &*(arg as *const iob::iommu_ioas_map) };
                match w.objs.get_mut(&a.ioas_id) {
                    Some((s, Obj::Ioas { maps })) if *s == side => {
                        if a.iova % PAGE != 0 || a.length % PAGE != 0 || a.length == 0 {
                            return err(libc::EINVAL);
                        }
                        if maps
                            .iter()
                            .any(|(i, l, _)| a.iova < i + l && *i < a.iova + a.length)
                        {
                            return err(libc::EEXIST);
                        }
                        maps.push((a.iova, a.length, a.user_va));
                        Ok(0)
                    }
                    _ => err(libc::ENOENT),
                }
            }
            IOMMU_IOAS_UNMAP => {
                // SAFETY: the caller passes an iommu_ioas_unmap.
                let a = unsafe { &mut *(arg as *mut iob::iommu_ioas_unmap) };
                match w.objs.get_mut(&a.ioas_id) {
                    Some((s, Obj::Ioas { maps })) if *s == side => {
                        let (iova, len) = (a.iova, a.length);
                        let all = iova == 0 && len == u64::MAX;
                        let before: u64 = maps.iter().map(|m| m.1).sum();
                        maps.retain(|(i, l, _)| !(all || (*i >= iova && i + l <= iova + len)));
                        let after: u64 = maps.iter().map(|m| m.1).sum();
                        if before == after && !all {
                            return err(libc::ENOENT);
                        }
                        a.length = before - after;
                        Ok(0)
                    }
                    _ => err(libc::ENOENT),
                }
            }
            IOMMU_GET_HW_INFO => {
                // SAFETY: the caller passes an iommu_hw_info.
                let a = unsafe { &mut *(arg as *mut iob::iommu_hw_info) };
                // An IOMMU with dirty tracking and no vendor data (type NONE).
                a.data_len = 0;
                a.__bindgen_anon_1.out_data_type = 0;
                a.out_capabilities = if w.hwpt_dirty {
                    u64::from(iob::iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING)
                } else {
                    0
                };
                Ok(0)
            }
            IOMMU_HWPT_ALLOC => {
                // SAFETY: the caller passes an iommu_hwpt_alloc.
                let a = unsafe { &mut *(arg as *mut iob::iommu_hwpt_alloc) };
                match w.objs.get(&a.pt_id) {
                    Some((s, Obj::Ioas { .. })) if *s == side => {}
                    _ => return err(libc::ENOENT),
                }
                let dirty_cap =
                    a.flags & iob::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
                let id = w.alloc(
                    side,
                    Obj::Hwpt {
                        ioas: a.pt_id,
                        dirty_cap,
                        tracking: false,
                        dirty: BTreeSet::new(),
                    },
                );
                a.out_hwpt_id = id;
                Ok(0)
            }
            IOMMU_HWPT_SET_DIRTY_TRACKING => {
                // SAFETY: the caller passes an iommu_hwpt_set_dirty_tracking.
                let a = unsafe { &*(arg as *const iob::iommu_hwpt_set_dirty_tracking) };
                match w.objs.get_mut(&a.hwpt_id) {
                    Some((
                        s,
                        Obj::Hwpt {
                            dirty_cap: true,
                            tracking,
                            dirty,
                            ..
                        },
                    )) if *s == side => {
                        *tracking = a.flags & 1 != 0;
                        dirty.clear();
                        Ok(0)
                    }
                    Some(_) => err(libc::EOPNOTSUPP),
                    None => err(libc::ENOENT),
                }
            }
            IOMMU_HWPT_GET_DIRTY_BITMAP => {
                // SAFETY: the caller passes an iommu_hwpt_get_dirty_bitmap.
                let a = unsafe { &*(arg as *const iob::iommu_hwpt_get_dirty_bitmap) };
                let drop_harvest = w.drop_harvest;
                match w.objs.get_mut(&a.hwpt_id) {
                    Some((
                        s,
                        Obj::Hwpt {
                            tracking, dirty, ..
                        },
                    )) if *s == side => {
                        if !*tracking {
                            return err(libc::EINVAL);
                        }
                        if a.page_size != PAGE || a.iova % PAGE != 0 || a.length % PAGE != 0 {
                            return err(libc::EINVAL);
                        }
                        let pages: Vec<u64> =
                            dirty.range(a.iova..a.iova + a.length).copied().collect();
                        for p in pages {
                            let bit = (p - a.iova) / PAGE;
                            if !drop_harvest {
                                let word = (a.data as *mut u64).wrapping_add((bit / 64) as usize);
                                // SAFETY: the caller's bitmap covers `length / page_size`
                                // bits (the uAPI's contract for `data`).
                                unsafe { *word |= 1 << (bit % 64) };
                            }
                            if a.flags & 1 == 0 {
                                dirty.remove(&p);
                            }
                        }
                        Ok(0)
                    }
                    _ => err(libc::ENOENT),
                }
            }
            _ => err(libc::ENOTTY),
        }
    }
}

impl livemig_vfio::fake_kernel::Kernel for Kernel {
    fn open(&mut self, path: &Path) -> io::Result<OwnedFd> {
        let mut w = self.world();
        let side = w.opening.expect("a host is being opened");
        w.enter(side, "open /dev/vfio/devices/vfioN")?;
        let d = match (side, path.to_str()) {
            (Side::Source, Some("/dev/vfio/devices/vfio0")) => 0,
            (Side::Destination, Some("/dev/vfio/devices/vfio1")) => 1,
            _ => return err(libc::ENOENT),
        };
        let fd = memfd(&[]);
        w.dev_fds.insert(fd.as_raw_fd(), d);
        Ok(fd)
    }

    unsafe fn ioctl(&mut self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32> {
        self.vfio_ioctl(fd, request, arg)
    }

    fn read(&mut self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        let mut w = self.world();
        let side = w
            .side_of_fd(fd)
            .ok_or(io::Error::from_raw_os_error(libc::EBADF))?;
        w.enter(side, "read of a data fd")?;
        let d = w.data_fds[&fd];
        if w.devs[d].data_fd != Some(fd)
            || !matches!(
                w.devs[d].state,
                ST_PRE_COPY | ST_PRE_COPY_P2P | ST_STOP_COPY
            )
        {
            return err(libc::EINVAL);
        }
        // SAFETY: `buf` is writable for its length; `fd` is the session's memfd.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if matches!(w.devs[d].state, ST_PRE_COPY | ST_PRE_COPY_P2P) {
            w.devs[d].consumed += n as usize;
        }
        Ok(n as usize)
    }

    fn write(&mut self, fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        let mut w = self.world();
        let side = w
            .side_of_fd(fd)
            .ok_or(io::Error::from_raw_os_error(libc::EBADF))?;
        w.enter(side, "write to a data fd")?;
        let d = w.data_fds[&fd];
        if w.devs[d].state != ST_RESUMING || w.devs[d].data_fd != Some(fd) {
            return err(libc::EINVAL);
        }
        w.devs[d].incoming.extend_from_slice(buf);
        Ok(buf.len())
    }
}

impl livemig_iommufd::fake_kernel::Kernel for Kernel {
    fn open(&mut self, path: &Path) -> io::Result<OwnedFd> {
        let mut w = self.world();
        let side = w.opening.expect("a host is being opened");
        w.enter(side, "open /dev/iommu")?;
        if path != Path::new("/dev/iommu") {
            return err(libc::ENOENT);
        }
        let fd = memfd(&[]);
        w.iommufds.insert(fd.as_raw_fd(), side);
        Ok(fd)
    }

    unsafe fn ioctl(&mut self, fd: RawFd, request: u64, arg: *mut c_void) -> io::Result<i32> {
        self.iommufd_ioctl(fd, request, arg)
    }
}

/// The errnos the uAPI documents for each call (vfio.h, iommufd.h and the kernel functions
/// behind them): argument errors, missing objects, allocation failures, device I/O errors.
#[allow(dead_code)]
pub fn errnos(what: &str) -> &'static [i32] {
    use libc::*;
    match what {
        "open /dev/vfio/devices/vfioN" => &[ENOENT, EACCES, EBUSY],
        "open /dev/iommu" => &[ENOENT, EACCES],
        "VFIO_DEVICE_BIND_IOMMUFD" => &[EINVAL, EBUSY, ENOMEM],
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT" => &[EINVAL, ENOENT, ENOMEM],
        "VFIO_DEVICE_DETACH_IOMMUFD_PT" => &[EINVAL],
        "VFIO_DEVICE_RESET" => &[EIO, EINVAL],
        "FEATURE MIGRATION" => &[ENOTTY, EINVAL],
        "FEATURE GET MIG_DEVICE_STATE" => &[EINVAL, EIO],
        "FEATURE SET MIG_DEVICE_STATE" => &[EINVAL, EIO, ENOMEM],
        "FEATURE MIG_DATA_SIZE" => &[ENOTTY, EINVAL],
        "FEATURE DMA_LOGGING_START" => &[ENOTTY, EIO],
        "FEATURE DMA_LOGGING_STOP" => &[EINVAL, EIO],
        "FEATURE DMA_LOGGING_REPORT" => &[EINVAL, EIO, ENOMEM],
        "FEATURE MIG_PRECOPY_INFOv2" => &[ENOTTY, EINVAL],
        "VFIO_MIG_GET_PRECOPY_INFO" => &[EINVAL, ENOTTY],
        // EINTR: a signal during the read or write (the crate retries it).
        "read of a data fd" => &[EIO, EINVAL, ENOMEM, EINTR],
        "write to a data fd" => &[EIO, EINVAL, ENOMEM, EINTR],
        "IOMMU_IOAS_ALLOC" => &[ENOMEM],
        "IOMMU_IOAS_IOVA_RANGES" => &[ENOENT, EFAULT, EMSGSIZE],
        "IOMMU_IOAS_MAP" => &[ENOMEM, EINVAL, EEXIST, EFAULT],
        "IOMMU_IOAS_UNMAP" => &[ENOENT, EBUSY],
        "IOMMU_GET_HW_INFO" => &[EOPNOTSUPP, EINVAL, ENOENT],
        "IOMMU_HWPT_ALLOC" => &[EOPNOTSUPP, EINVAL, ENOMEM],
        "IOMMU_HWPT_SET_DIRTY_TRACKING" => &[EOPNOTSUPP, EINVAL, ENOMEM],
        "IOMMU_HWPT_GET_DIRTY_BITMAP" => &[EINVAL, EFAULT, ENOMEM],
        "IOMMU_DESTROY" => &[EBUSY, ENOENT],
        // KVM (Documentation/virt/kvm/api.rst): bad arguments and faulting buffers for the
        // state and dirty-log ioctls, and allocation failures for a memory slot change.
        "KVM_SET_USER_MEMORY_REGION" => &[EINVAL, EEXIST, ENOMEM],
        w if w.starts_with("KVM_") => &[EINVAL, EFAULT],
        other => panic!("no errno list for {other}"),
    }
}

impl livemig_kvm::fake_kernel::Kernel for Kernel {
    /// KVM stays real; the layer only counts and fails calls. A call's side follows from what
    /// it does: the destination only restores state (`KVM_SET_*` other than the slot flags),
    /// the source saves state and harvests its dirty log.
    fn call(&mut self, what: &'static str) -> Result<(), i32> {
        let side = if what.starts_with("KVM_SET_") && what != "KVM_SET_USER_MEMORY_REGION" {
            Side::Destination
        } else {
            Side::Source
        };
        self.world()
            .enter(side, what)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }
}
