//! An emulated IOMMU: translates device DMA through the page tables of this crate and updates
//! their accessed/dirty state as the hardware does (feature `model`).
//!
//! ```text
//!  device ──DmaPort──> Iommu::access ──> IOTLB hit? ──yes──> entry allows it without an update?
//!                          │  (drain: read lock)  │                 │ yes: use it (no memory access)
//!                          │                      │                 └ no: CAS the PTE, else re-walk
//!                          │                      └─no──> walk root..leaf, CAS A/D (interlocked)
//!                          └──> DataMem (guest RAM) read/write        └> cache the leaf
//!  software ──IotlbFlush──> drain (write lock: waits for in-flight DMA) + drop cached entries
//! ```
//!
//! Per-vendor behaviour comes from [`PageTableFormat::hw_access`] (leaves) and
//! [`PageTableFormat::hw_walk`] (table pointers, on a walk): AMD-Vi sets A and D with an
//! interlocked 64-bit update when DTE.HAD enables them; VT-d second stage sets A and D when the
//! PASID entry's SSADE is set; the x86-64 first stage (VT-d PGTT = first stage) always sets A in
//! every entry it walks and D in the leaf on a write (VT-d §3.6); SMMUv3 sets AF and clears
//! AP\[2\] (sets S2AP\[1\]) of DBM entries when CD.HA/HD (STE.S2HA/S2HD) are set. Accesses the
//! leaf does not allow fault without touching the leaf. Only a walk (an IOTLB miss) updates
//! table pointers; an IOTLB hit touches at most the leaf it came from.
//!
//! The IOTLB caches leaf entries together with the state they had. A cached entry that already
//! records a write serves further writes without touching memory — so if software cleans the
//! dirty bit and does not flush, later writes are not recorded. That is the reason
//! [`PageTable::read_and_clear_dirty`](crate::PageTable::read_and_clear_dirty) flushes, and the
//! model makes the consequence testable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::config::{AdUpdate, AmdDte, Pgtt, SmmuCd, SmmuSte, SteConfig, VtdPasidEntry};
use crate::format::{FaultKind, FormatKind, HwAccess, PageTableFormat, Pte};
use crate::mem::PhysMem;
use crate::table::IotlbFlush;
use crate::table::index;

mod ram;

pub use ram::{DataMem, GuestRam};

/// A device's translation context, in the vendor's own structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceContext {
    /// AMD-Vi Device Table Entry.
    Amd(AmdDte),
    /// VT-d scalable-mode PASID entry: second-stage or nested translation for a
    /// [`VtdSecondStage`](crate::format::VtdSecondStage) table, first-stage translation
    /// (PGTT = 001b) for an [`X86FirstStage`](crate::format::X86FirstStage) table.
    Vtd(VtdPasidEntry),
    /// SMMUv3 stage 1: the STE and the context descriptor it selects.
    SmmuS1 {
        /// Stream table entry (Config = stage 1).
        ste: SmmuSte,
        /// Context descriptor.
        cd: SmmuCd,
    },
    /// SMMUv3 stage 2.
    SmmuS2(SmmuSte),
}

/// Why the model refused a context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The context is for another IOMMU family or stage than the model's format.
    #[error("a {context} context cannot drive a {format} table")]
    WrongFormat {
        /// What the context describes.
        context: &'static str,
        /// The model's format.
        format: FormatKind,
    },
    /// The context is not valid/present, or does not translate.
    #[error("context does not translate: {0}")]
    NotTranslating(&'static str),
    /// The context's geometry (levels, widths, root) does not match the model's table.
    #[error("context geometry mismatch: {0}")]
    Geometry(&'static str),
    /// A reserved encoding is set.
    #[error("reserved encoding in context: {0}")]
    Reserved(crate::config::Problem),
    /// No such device.
    #[error("device {0} is not attached")]
    NotAttached(u32),
}

/// A DMA the IOMMU refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    /// Requester.
    pub device: u32,
    /// IOVA of the first byte that could not be translated.
    pub iova: u64,
    /// Whether it was a write.
    pub write: bool,
    /// Why.
    pub kind: FaultKind,
}

impl fmt::Display for DmaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device {} DMA {} at IOVA {:#x}: {}",
            self.device,
            if self.write { "write" } else { "read" },
            self.iova,
            self.kind
        )
    }
}

impl std::error::Error for DmaFault {}

/// Where device models send their DMA. Implemented by [`DevicePort`]; other crates' device
/// models take any implementation.
pub trait DmaPort: Send + Sync {
    /// Write `data` at `iova`.
    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault>;
    /// Read `buf.len()` bytes at `iova`.
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault>;
}

/// Model options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelOptions {
    /// Cache translations (with their A/D state) in an IOTLB.
    pub iotlb: bool,
    /// How many faults to keep for [`Iommu::faults`].
    pub fault_log: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            iotlb: true,
            fault_log: 256,
        }
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelStats {
    /// Full table walks.
    pub walks: u64,
    /// Translations served by the IOTLB without touching the tables.
    pub iotlb_hits: u64,
    /// Accessed/dirty updates written to entries.
    pub ad_updates: u64,
    /// Faults.
    pub faults: u64,
    /// IOTLB flushes.
    pub flushes: u64,
}

#[derive(Default)]
struct Counters {
    walks: AtomicU64,
    hits: AtomicU64,
    ad_updates: AtomicU64,
    faults: AtomicU64,
    flushes: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Ctx {
    root: u64,
    ad: AdUpdate,
}

#[derive(Debug, Clone, Copy)]
struct TlbEntry {
    size: u64,
    level: u8,
    /// Physical address of the table frame and the slot walked.
    table: u64,
    slot: usize,
    /// The entry as the IOMMU last saw (or wrote) it.
    raw: u64,
    pa: u64,
}

/// The emulated IOMMU, for one page-table format.
pub struct Iommu<F: PageTableFormat, M: PhysMem> {
    fmt: F,
    mem: M,
    data: Arc<dyn DataMem>,
    opts: ModelOptions,
    devices: RwLock<HashMap<u32, Ctx>>,
    /// (device, page IOVA) -> cached leaf.
    iotlb: Mutex<BTreeMap<(u32, u64), TlbEntry>>,
    /// DMA holds it shared for the whole access; a flush takes it exclusively, so when a
    /// flush returns every DMA that used a stale translation has completed.
    drain: RwLock<()>,
    faults: Mutex<VecDeque<DmaFault>>,
    counters: Counters,
}

impl<F: PageTableFormat, M: PhysMem> fmt::Debug for Iommu<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iommu")
            .field("format", &self.fmt)
            .field("options", &self.opts)
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<F: PageTableFormat, M: PhysMem> Iommu<F, M> {
    /// An IOMMU walking tables of format `fmt` in `mem`, with devices' data in `data`.
    pub fn new(fmt: F, mem: M, data: Arc<dyn DataMem>, opts: ModelOptions) -> Self {
        Iommu {
            fmt,
            mem,
            data,
            opts,
            devices: RwLock::new(HashMap::new()),
            iotlb: Mutex::new(BTreeMap::new()),
            drain: RwLock::new(()),
            faults: Mutex::new(VecDeque::new()),
            counters: Counters::default(),
        }
    }

    /// The device-visible memory.
    pub fn data(&self) -> &Arc<dyn DataMem> {
        &self.data
    }

    /// Decode a context and check it can drive this model's tables.
    fn decode_context(&self, ctx: &DeviceContext) -> Result<Ctx, ModelError> {
        let kind = self.fmt.kind();
        let wrong = |context| ModelError::WrongFormat {
            context,
            format: kind,
        };
        let first_problem = |p: Vec<crate::config::Problem>| match p.into_iter().next() {
            Some(p) => Err(ModelError::Reserved(p)),
            None => Ok(()),
        };
        match *ctx {
            DeviceContext::Amd(dte) => {
                if kind != FormatKind::AmdV1 {
                    return Err(wrong("AMD-Vi DTE"));
                }
                first_problem(dte.problems())?;
                if !dte.valid() || !dte.translation_valid() {
                    return Err(ModelError::NotTranslating("DTE.V or DTE.TV clear"));
                }
                if dte.mode() != self.fmt.levels() {
                    return Err(ModelError::Geometry(
                        "DTE.Mode differs from the table's levels",
                    ));
                }
                Ok(Ctx {
                    root: dte.root(),
                    ad: dte.ad_update(),
                })
            }
            DeviceContext::Vtd(pe) if kind == FormatKind::X86FirstStage => {
                first_problem(pe.problems())?;
                if !pe.present() {
                    return Err(ModelError::NotTranslating("PASID entry not present"));
                }
                if pe.pgtt() != Pgtt::FirstStage {
                    return Err(ModelError::NotTranslating("PGTT selects no first stage"));
                }
                if pe.first_stage_levels() != Some(self.fmt.levels()) {
                    return Err(ModelError::Geometry(
                        "PASID.FLPM differs from the table's levels",
                    ));
                }
                Ok(Ctx {
                    root: pe.first_stage_root(),
                    ad: pe.ad_update(),
                })
            }
            DeviceContext::Vtd(pe) => {
                if kind != FormatKind::VtdSecondStage {
                    return Err(wrong("VT-d PASID entry"));
                }
                first_problem(pe.problems())?;
                if !pe.present() {
                    return Err(ModelError::NotTranslating("PASID entry not present"));
                }
                if !matches!(pe.pgtt(), Pgtt::SecondStage | Pgtt::Nested) {
                    return Err(ModelError::NotTranslating("PGTT selects no second stage"));
                }
                if pe.address_width() != Some(self.fmt.iova_bits()) {
                    return Err(ModelError::Geometry(
                        "PASID.AW differs from the table's width",
                    ));
                }
                Ok(Ctx {
                    root: pe.second_stage_root(),
                    ad: pe.ad_update(),
                })
            }
            DeviceContext::SmmuS1 { ste, cd } => {
                if kind != FormatKind::ArmS1 {
                    return Err(wrong("SMMUv3 stage-1 STE/CD"));
                }
                first_problem(ste.problems())?;
                first_problem(cd.problems())?;
                if !ste.valid() || ste.config() != SteConfig::Stage1 {
                    return Err(ModelError::NotTranslating("STE not valid or not stage 1"));
                }
                if !cd.valid() || !cd.aarch64() {
                    return Err(ModelError::NotTranslating("CD not valid or not AArch64"));
                }
                if cd.input_bits() != self.fmt.iova_bits() {
                    return Err(ModelError::Geometry(
                        "CD.T0SZ differs from the table's input size",
                    ));
                }
                Ok(Ctx {
                    root: cd.ttb0(),
                    ad: cd.ad_update(),
                })
            }
            DeviceContext::SmmuS2(ste) => {
                if kind != FormatKind::ArmS2 {
                    return Err(wrong("SMMUv3 stage-2 STE"));
                }
                first_problem(ste.problems())?;
                if !ste.valid() || ste.config() != SteConfig::Stage2 {
                    return Err(ModelError::NotTranslating("STE not valid or not stage 2"));
                }
                if ste.s2_input_bits() != self.fmt.iova_bits() {
                    return Err(ModelError::Geometry(
                        "STE.S2T0SZ differs from the table's input size",
                    ));
                }
                Ok(Ctx {
                    root: ste.s2ttb(),
                    ad: ste.s2_ad_update(),
                })
            }
        }
    }

    /// Attach (or re-attach with a new context) a device. Like a context-cache invalidation,
    /// this drops the device's cached translations.
    pub fn attach(&self, device: u32, ctx: DeviceContext) -> Result<(), ModelError> {
        let c = self.decode_context(&ctx)?;
        if self.mem.frame(c.root).is_none() {
            return Err(ModelError::Geometry("root pointer is not a table frame"));
        }
        let _g = self.drain.write().unwrap_or_else(PoisonError::into_inner);
        self.devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device, c);
        lock(&self.iotlb).retain(|&(d, _), _| d != device);
        Ok(())
    }

    /// Detach a device; its DMA faults from now on.
    pub fn detach(&self, device: u32) -> Result<(), ModelError> {
        let _g = self.drain.write().unwrap_or_else(PoisonError::into_inner);
        self.devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&device)
            .ok_or(ModelError::NotAttached(device))?;
        lock(&self.iotlb).retain(|&(d, _), _| d != device);
        Ok(())
    }

    /// A DMA port for `device`.
    pub fn port(self: &Arc<Self>, device: u32) -> DevicePort<F, M> {
        DevicePort {
            iommu: Arc::clone(self),
            device,
        }
    }

    /// Invalidate every cached translation of `[iova, iova + size)` for all devices, after
    /// waiting for in-flight DMA.
    pub fn flush_range(&self, iova: u64, size: u64) {
        let _g = self.drain.write().unwrap_or_else(PoisonError::into_inner);
        let end = iova.saturating_add(size);
        lock(&self.iotlb)
            .retain(|&(_, page), e| page.saturating_add(e.size) <= iova || page >= end);
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counters so far.
    pub fn stats(&self) -> ModelStats {
        let c = &self.counters;
        ModelStats {
            walks: c.walks.load(Ordering::Relaxed),
            iotlb_hits: c.hits.load(Ordering::Relaxed),
            ad_updates: c.ad_updates.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
        }
    }

    /// The most recent faults (oldest first), up to [`ModelOptions::fault_log`].
    pub fn faults(&self) -> Vec<DmaFault> {
        lock(&self.faults).iter().copied().collect()
    }

    fn fault(&self, f: DmaFault) -> DmaFault {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let mut log = lock(&self.faults);
        if self.opts.fault_log > 0 {
            if log.len() == self.opts.fault_log {
                log.pop_front();
            }
            log.push_back(f);
        }
        f
    }

    /// Translate one access inside a single 4 KiB page; returns the physical address.
    fn translate(&self, device: u32, ctx: Ctx, iova: u64, write: bool) -> Result<u64, DmaFault> {
        let fault = |kind| DmaFault {
            device,
            iova,
            write,
            kind,
        };
        if self.opts.iotlb {
            let hit = {
                let tlb = lock(&self.iotlb);
                tlb.range(..=(device, iova))
                    .next_back()
                    .filter(|&(&(d, page), e)| d == device && iova - page < e.size)
                    .map(|(&(_, page), e)| (page, *e))
            };
            if let Some((page, e)) = hit {
                match self.fmt.hw_access(e.raw, e.level, write, ctx.ad) {
                    HwAccess::Allow { update: None } => {
                        self.counters.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(e.pa + (iova - page));
                    }
                    HwAccess::Allow { update: Some(new) } => {
                        // Update the entry the IOTLB came from, if it is still what we cached.
                        let done = self.mem.frame(e.table).is_some_and(|f| {
                            f[e.slot]
                                .compare_exchange(e.raw, new, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                        });
                        if done {
                            self.counters.ad_updates.fetch_add(1, Ordering::Relaxed);
                            self.counters.hits.fetch_add(1, Ordering::Relaxed);
                            if let Some(c) = lock(&self.iotlb).get_mut(&(device, page)) {
                                c.raw = new;
                            }
                            return Ok(e.pa + (iova - page));
                        }
                    }
                    HwAccess::Fault(_) => {}
                }
                // Stale or insufficient: forget it and walk.
                lock(&self.iotlb).remove(&(device, page));
            }
        }
        self.counters.walks.fetch_add(1, Ordering::Relaxed);
        let bits = self.fmt.iova_bits();
        if bits < 64 && iova >> bits != 0 {
            return Err(self.fault(fault(FaultKind::OutOfRange)));
        }
        'walk: loop {
            let mut level = self.fmt.levels();
            let mut table = ctx.root;
            loop {
                let Some(frame) = self.mem.frame(table) else {
                    return Err(self.fault(fault(FaultKind::Malformed)));
                };
                let slot = index(level, iova);
                let mut raw = frame[slot].load(Ordering::Acquire);
                match self.fmt.decode(raw, level) {
                    Pte::Absent => return Err(self.fault(fault(FaultKind::NotPresent))),
                    Pte::Malformed(_) => return Err(self.fault(fault(FaultKind::Malformed))),
                    Pte::Table { pa } if level > 1 => {
                        match self.fmt.hw_walk(raw, level, write, ctx.ad) {
                            HwAccess::Fault(kind) => return Err(self.fault(fault(kind))),
                            HwAccess::Allow { update: None } => {}
                            HwAccess::Allow { update: Some(new) } => {
                                // Interlocked, as for leaves; if software changed the pointer
                                // meanwhile, walk again from the root.
                                if frame[slot]
                                    .compare_exchange(raw, new, Ordering::AcqRel, Ordering::Acquire)
                                    .is_err()
                                {
                                    continue 'walk;
                                }
                                self.counters.ad_updates.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        table = pa;
                        level -= 1;
                    }
                    Pte::Table { .. } => return Err(self.fault(fault(FaultKind::Malformed))),
                    Pte::Leaf(leaf) => loop {
                        match self.fmt.hw_access(raw, level, write, ctx.ad) {
                            HwAccess::Fault(kind) => return Err(self.fault(fault(kind))),
                            HwAccess::Allow { update } => {
                                if let Some(new) = update {
                                    // The interlocked update: only if the entry is unchanged.
                                    if let Err(cur) = frame[slot].compare_exchange(
                                        raw,
                                        new,
                                        Ordering::AcqRel,
                                        Ordering::Acquire,
                                    ) {
                                        // Changed under us: retry on the new value if it still
                                        // maps the same page, else walk again.
                                        raw = cur;
                                        match self.fmt.decode(raw, level) {
                                            Pte::Leaf(l)
                                                if l.pa == leaf.pa && l.size == leaf.size =>
                                            {
                                                continue;
                                            }
                                            _ => continue 'walk,
                                        }
                                    }
                                    raw = new;
                                    self.counters.ad_updates.fetch_add(1, Ordering::Relaxed);
                                }
                                let page = iova & !(leaf.size - 1);
                                if self.opts.iotlb {
                                    lock(&self.iotlb).insert(
                                        (device, page),
                                        TlbEntry {
                                            size: leaf.size,
                                            level,
                                            table,
                                            slot,
                                            raw,
                                            pa: leaf.pa,
                                        },
                                    );
                                }
                                return Ok(leaf.pa + (iova - page));
                            }
                        }
                    },
                }
            }
        }
    }

    /// Perform a DMA: `write` copies `wbuf` to memory, else memory is copied into `rbuf`.
    fn access(
        &self,
        device: u32,
        iova: u64,
        len: usize,
        write: bool,
        wbuf: &[u8],
        rbuf: &mut [u8],
    ) -> Result<(), DmaFault> {
        let _in_flight = self.drain.read().unwrap_or_else(PoisonError::into_inner);
        let ctx = self
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&device)
            .copied();
        let Some(ctx) = ctx else {
            return Err(self.fault(DmaFault {
                device,
                iova,
                write,
                kind: FaultKind::NotPresent,
            }));
        };
        let mut done = 0usize;
        while done < len {
            let cur = iova.wrapping_add(done as u64);
            let chunk = ((4096 - (cur & 0xfff)) as usize).min(len - done);
            let pa = self.translate(device, ctx, cur, write)?;
            let ok = if write {
                self.data.write(pa, &wbuf[done..done + chunk])
            } else {
                self.data.read(pa, &mut rbuf[done..done + chunk])
            };
            if !ok {
                return Err(self.fault(DmaFault {
                    device,
                    iova: cur,
                    write,
                    kind: FaultKind::NotPresent,
                }));
            }
            done += chunk;
        }
        Ok(())
    }

    /// DMA write by `device`.
    pub fn dma_write(&self, device: u32, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.access(device, iova, data.len(), true, data, &mut [])
    }

    /// DMA read by `device`.
    pub fn dma_read(&self, device: u32, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let len = buf.len();
        self.access(device, iova, len, false, &[], buf)
    }

    /// Size of the IOTLB (cached pages).
    pub fn iotlb_len(&self) -> usize {
        lock(&self.iotlb).len()
    }
}

/// `&Iommu` is the flush hook of the tables it walks.
impl<F: PageTableFormat, M: PhysMem> IotlbFlush for &Iommu<F, M> {
    fn flush(&mut self, iova: u64, size: u64) {
        self.flush_range(iova, size);
    }
}

/// A device's view of the IOMMU.
pub struct DevicePort<F: PageTableFormat, M: PhysMem> {
    iommu: Arc<Iommu<F, M>>,
    device: u32,
}

impl<F: PageTableFormat, M: PhysMem> fmt::Debug for DevicePort<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePort")
            .field("device", &self.device)
            .finish()
    }
}

impl<F: PageTableFormat, M: PhysMem> Clone for DevicePort<F, M> {
    fn clone(&self) -> Self {
        DevicePort {
            iommu: Arc::clone(&self.iommu),
            device: self.device,
        }
    }
}

impl<F: PageTableFormat, M: PhysMem> DmaPort for DevicePort<F, M> {
    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.iommu.dma_write(self.device, iova, data)
    }

    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.iommu.dma_read(self.device, iova, buf)
    }
}
