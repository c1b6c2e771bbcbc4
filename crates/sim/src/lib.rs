//! # livemig-sim
//!
//! The simulated platform (the CLI's `simulate` and its TCP pair): sparse guest RAM, the IOMMU model of a
//! chosen vendor over it, HiSilicon QM VF models doing DMA through that IOMMU, optional
//! simulated devices that log their own DMA, a vCPU writer, and a device thread.
//!
//! ```text
//!  vCPU thread ──cpu_write (logged)──────────────> SparseRam <──DataMem── Iommu model (A/D bits)
//!    │  QM guest driver: SQEs, doorbells                                     ^
//!    │  logging devices: DMA + DMA log                                       │ DevicePort
//!  device thread: QM VF process() ──DMA (results, CQEs, EQEs)────────────────┘
//! ```
//!
//! Page tables map all of guest RAM identity (IOVA = GPA, no vIOMMU) with 4 KiB pages, so
//! IOMMU dirty tracking reports at the migration page size.

#![deny(missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_hisi_qm::mailbox::Vft;
use livemig_hisi_qm::migration::AccMigration;
use livemig_hisi_qm::model::{Dma, DmaError, GuestDriver, QmPfModel, QmVfModel};
use livemig_hisi_qm::{AccKind, AccVf, CompatBlock, MigrationRegs, NoDelay, QmRevision};
use livemig_iommu_pt::config::{AmdDte, SmmuCd, SmmuSte, VtdPasidEntry};
use livemig_iommu_pt::format::{AmdV1, ArmS1, VtdSecondStage};
use livemig_iommu_pt::model::{DataMem, DeviceContext, DmaPort, Iommu, ModelOptions};
use livemig_iommu_pt::{DirtyBits, HarvestOptions, PageTable, PageTableFormat, Perm, TableArena};
use livemig_vfio::sim::{SimConfig as SimDevConfig, SimDevice};
use livemig_vfio::{MigrationFlags, MigrationState};
use serde::Serialize;

use livemig::bitmap::PageBitmap;
use livemig::device::{DeviceCompat, MigDevice, VfioMigDevice};
use livemig::engine::{DestinationPlatform, SourceDevice, SourcePlatform, Vcpus};
use livemig::memory::{GuestMemory, PAGE_SIZE};
use livemig::tracker::{BoxError, DirtyTracker, DmaLogTracker, not_tracking};

pub mod ram;

pub use ram::{CpuDirtyLog, SparseRam};

/// The IOMMU vendor the model emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// AMD-Vi, v1 page table; dirty tracking through DTE.HAD.
    Amd,
    /// Intel VT-d scalable mode, second stage; dirty tracking through PASID-entry SSADE.
    Vtd,
    /// Arm SMMUv3 stage 1; dirty tracking through CD.HA/HD and DBM.
    Smmuv3,
}

impl Vendor {
    /// All three.
    pub const ALL: [Vendor; 3] = [Vendor::Amd, Vendor::Vtd, Vendor::Smmuv3];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Amd => "AMD-Vi",
            Vendor::Vtd => "Intel VT-d",
            Vendor::Smmuv3 => "Arm SMMUv3",
        }
    }
}

impl std::str::FromStr for Vendor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "amd" | "amd-vi" => Ok(Vendor::Amd),
            "vtd" | "vt-d" | "intel" => Ok(Vendor::Vtd),
            "smmuv3" | "smmu" | "arm" => Ok(Vendor::Smmuv3),
            other => Err(format!(
                "unknown IOMMU vendor {other:?} (expected amd, vtd or smmuv3)"
            )),
        }
    }
}

/// The simulated platform's shape and activity.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SimSpec {
    /// IOMMU vendor model.
    pub vendor: Vendor,
    /// Guest RAM bytes (sparse: only what is written is allocated).
    pub ram: u64,
    /// Bytes of RAM filled with data before the migration starts (from GPA 0).
    pub populated: u64,
    /// Whether the IOMMU supports dirty tracking.
    pub iommu_dirty: bool,
    /// HiSilicon SEC VF models (no DMA logging of their own).
    pub qm_vfs: u32,
    /// Simulated devices with DMA logging.
    pub logging_devices: u32,
    /// Pages per second the vCPUs dirty.
    pub cpu_dirty_rate: u64,
    /// Jobs (QM) or 4 KiB DMA writes (logging devices) per second, per device.
    pub dma_rate: u64,
    /// Seed for contents and activity.
    pub seed: u64,
}

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec {
            vendor: Vendor::Amd,
            ram: 16 << 30,
            populated: 256 << 20,
            iommu_dirty: true,
            qm_vfs: 2,
            logging_devices: 1,
            cpu_dirty_rate: 5_000,
            dma_rate: 2_000,
            seed: 1,
        }
    }
}

impl SimSpec {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.ram < 64 << 20 || !self.ram.is_multiple_of(2 << 20) {
            return Err(format!(
                "RAM size {} must be at least 64 MiB and a multiple of 2 MiB",
                self.ram
            ));
        }
        if self.ram > 1 << 40 {
            return Err(format!(
                "RAM size {} is above the simulator's 1 TiB",
                self.ram
            ));
        }
        if self.qm_vfs > 8 || self.logging_devices > 8 {
            return Err("at most 8 devices of each kind".into());
        }
        if self.reserved() >= self.ram || self.populated > self.ram - self.reserved() {
            return Err(format!(
                "populated {} exceeds RAM {} minus the {} bytes device queues use",
                self.populated,
                self.ram,
                self.reserved()
            ));
        }
        Ok(())
    }

    /// RAM at the top used for device queues and buffers.
    fn reserved(&self) -> u64 {
        u64::from(self.qm_vfs + self.logging_devices) * DEV_WINDOW
    }

    fn window(&self, i: u32) -> u64 {
        self.ram - u64::from(i + 1) * DEV_WINDOW
    }
}

/// RAM per device for its queues, buffers and DMA target pages.
const DEV_WINDOW: u64 = 8 << 20;
const QM_QUEUES: u16 = 4;
const QM_DEPTH: u16 = 64;
const QM_QUE_ISO_CFG: u32 = 1;
const ARENA_BASE: u64 = 1 << 46;

/// A page-table format the simulation can build contexts for.
pub trait SimFormat: PageTableFormat + Copy {
    /// The format.
    fn make() -> Self;
    /// The device context for `root`, with hardware dirty updates on or off.
    fn context(root: u64, dirty: bool) -> DeviceContext;
}

impl SimFormat for AmdV1 {
    fn make() -> Self {
        AmdV1::new(4).expect("4-level AMD v1")
    }
    fn context(root: u64, dirty: bool) -> DeviceContext {
        DeviceContext::Amd(AmdDte::translated(root, 4, 1).with_dirty_tracking(dirty))
    }
}

impl SimFormat for VtdSecondStage {
    fn make() -> Self {
        VtdSecondStage::new(48, 46).expect("48-bit VT-d")
    }
    fn context(root: u64, dirty: bool) -> DeviceContext {
        DeviceContext::Vtd(VtdPasidEntry::second_stage(root, 48, 1).with_dirty_tracking(dirty))
    }
}

impl SimFormat for ArmS1 {
    fn make() -> Self {
        ArmS1::new(48, 48).expect("48-bit LPAE")
    }
    fn context(root: u64, dirty: bool) -> DeviceContext {
        DeviceContext::SmmuS1 {
            ste: SmmuSte::stage1(0x7000_0000),
            cd: SmmuCd::stage1(root, 48, 1).with_dirty_tracking(dirty),
        }
    }
}

type Arena = Arc<TableArena>;

/// The vendor-erased view of the IOMMU model the platform keeps.
trait ModelIommu: Send + Sync {
    fn port(&self, device: u32) -> Arc<dyn Dma>;
}

struct ModelHandle<F: SimFormat> {
    iommu: Arc<Iommu<F, Arena>>,
}

struct PortDma<P>(P);

impl<P: DmaPort> Dma for PortDma<P> {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.0
            .dma_read(iova, buf)
            .map_err(|_| DmaError { iova, write: false })
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.0
            .dma_write(iova, data)
            .map_err(|_| DmaError { iova, write: true })
    }
}

impl<F: SimFormat> ModelIommu for ModelHandle<F> {
    fn port(&self, device: u32) -> Arc<dyn Dma> {
        Arc::new(PortDma(self.iommu.port(device)))
    }
}

/// vCPU accesses: logged writes.
struct CpuDma(Arc<SparseRam>);

impl Dma for CpuDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        GuestMemory::read(&*self.0, iova, buf).map_err(|_| DmaError { iova, write: false })
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.0
            .cpu_write(iova, data)
            .map_err(|_| DmaError { iova, write: true })
    }
}

/// Untranslated device access (the destination, where nothing is tracked).
struct RawDma(Arc<SparseRam>);

impl Dma for RawDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        GuestMemory::read(&*self.0, iova, buf).map_err(|_| DmaError { iova, write: false })
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.0
            .write_raw(iova, data)
            .map_err(|_| DmaError { iova, write: true })
    }
}

/// IOMMU hardware dirty tracking on the model: enabling sets the vendor's context bit (AMD
/// DTE.HAD, VT-d SSADE, SMMU CD.HD) and the PTE-level state (Arm DBM); harvesting is the
/// page table's read-and-clear with the IOTLB flush.
struct ModelTracker<F: SimFormat> {
    vendor: Vendor,
    pt: PageTable<F, Arena>,
    iommu: Arc<Iommu<F, Arena>>,
    devices: Vec<u32>,
    size: u64,
    bits: DirtyBits,
    /// A start was attempted and no stop completed since.
    tracking: bool,
}

impl<F: SimFormat> ModelTracker<F> {
    fn set(&mut self, on: bool) -> Result<(), BoxError> {
        for &d in &self.devices {
            self.iommu.attach(d, F::context(self.pt.root(), on))?;
        }
        self.pt
            .set_dirty_tracking(0, self.size, on, &mut &*self.iommu)?;
        self.iommu.flush_range(0, self.size);
        Ok(())
    }
}

impl<F: SimFormat> DirtyTracker for ModelTracker<F> {
    fn name(&self) -> String {
        format!("{} model dirty tracking", self.vendor.name())
    }
    fn start(&mut self) -> Result<(), BoxError> {
        self.tracking = true;
        self.set(true)?;
        let mut sink = PageBitmap::new(self.size / PAGE_SIZE, PAGE_SIZE);
        self.harvest(&mut sink)?;
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if !self.tracking {
            return Err(not_tracking(&self.name()));
        }
        self.bits.clear();
        self.pt.read_and_clear_dirty(
            0,
            self.size,
            &mut self.bits,
            HarvestOptions::default(),
            &mut &*self.iommu,
        )?;
        let mut n = 0;
        for iova in self.bits.iter() {
            into.set(iova / PAGE_SIZE);
            n += 1;
        }
        Ok(n)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        if !self.tracking {
            return Ok(());
        }
        self.set(false)?;
        self.tracking = false;
        Ok(())
    }
}

struct QmDev {
    vf: Arc<QmVfModel>,
    driver: Option<GuestDriver<Arc<QmVfModel>>>,
    bufs: u64,
    next_tag: u16,
}

/// Handles to what a simulated host runs, for verification.
#[derive(Clone)]
pub struct SimHost {
    /// Guest RAM.
    pub ram: Arc<SparseRam>,
    qm: Vec<Arc<QmVfModel>>,
    logging: Vec<SimDevice>,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("ram", &self.ram)
            .field("qm_vfs", &self.qm.len())
            .field("logging_devices", &self.logging.len())
            .finish()
    }
}

/// A digest of guest memory and device state, comparable across processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HostDigest {
    /// Order-independent sum of per-page FNV-1a hashes of every non-zero page.
    pub memory: String,
    /// Per device: a digest of its migratable state.
    pub devices: Vec<String>,
}

fn fnv64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl SimHost {
    /// The simulated devices with DMA logging (for fault injection).
    pub fn logging_devices(&self) -> &[SimDevice] {
        &self.logging
    }

    /// The QM VF models (for fault injection and state checks).
    pub fn qm_vfs(&self) -> &[Arc<QmVfModel>] {
        &self.qm
    }

    /// Digest of memory and device state.
    pub fn digest(&self) -> HostDigest {
        let mut sum = 0u64;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let size = self.ram.size();
        let mut gpa = 0;
        while gpa < size {
            if self.ram.known_zero(gpa, 2 << 20) {
                gpa += 2 << 20;
                continue;
            }
            GuestMemory::read(&*self.ram, gpa, &mut page).expect("inside RAM");
            if page.iter().any(|&b| b != 0) {
                sum = sum.wrapping_add(fnv64(gpa, &page));
            }
            gpa += PAGE_SIZE;
        }
        let mut devices: Vec<String> = self
            .qm
            .iter()
            .map(|vf| {
                format!(
                    "{:016x}",
                    fnv64(0, format!("{:?}", vf.migratable_state()).as_bytes())
                )
            })
            .collect();
        devices.extend(
            self.logging
                .iter()
                .map(|d| format!("{:016x}", d.state_digest())),
        );
        HostDigest {
            memory: format!("{sum:016x}"),
            devices,
        }
    }

    /// Bit-for-bit comparison with another host: memory, then every device's state. Returns
    /// what differs.
    pub fn compare(&self, other: &SimHost) -> Result<(), String> {
        let mut diffs = Vec::new();
        if let Some(at) = self.ram.first_difference(&other.ram) {
            diffs.push(format!("guest memory differs at {at:#x}"));
        }
        for (i, (a, b)) in self.qm.iter().zip(&other.qm).enumerate() {
            if a.migratable_state() != b.migratable_state() {
                diffs.push(format!(
                    "QM VF {i}: register state or queue contexts differ"
                ));
            }
        }
        for (i, (a, b)) in self.logging.iter().zip(&other.logging).enumerate() {
            if a.state_bytes() != b.state_bytes() {
                diffs.push(format!("logging device {i}: device state differs"));
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(diffs.join("; "))
        }
    }
}

/// The guest's activity, run on two threads until dropped.
pub struct Workload {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// vCPU writes made.
    pub cpu_writes: Arc<AtomicU64>,
    /// Device operations made.
    pub dma_ops: Arc<AtomicU64>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("cpu_writes", &self.cpu_writes.load(Ordering::Relaxed))
            .field("dma_ops", &self.dma_ops.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Pausing the simulated vCPUs.
#[derive(Debug, Clone)]
pub struct SimVcpus {
    paused: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Vcpus for SimVcpus {
    fn pause(&mut self) {
        self.paused.store(true, Ordering::SeqCst);
        while !self.parked.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    fn resume(&mut self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn sim_device_config(spec: &SimSpec, i: u32, seed: u64) -> SimDevConfig {
    let mut c = SimDevConfig::new(MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY);
    c.state_size = 64 << 10;
    c.chunk_size = 256;
    c.dma_logging_max_ranges = Some(8);
    c.device_id = 0x4c4d_0000 + i;
    c.seed = seed ^ spec.seed.rotate_left(7) ^ u64::from(i);
    c
}

/// A QM VF's compatibility descriptor: livemig-hisi-qm's block (device and BAR2 layout, so
/// a 32 KiB-guest-BAR2 VF and a 64 KiB one refuse each other before any state moves), then
/// the queue count and isolation state the simulated PF gives it.
fn qm_compat(block: CompatBlock, vft: Vft) -> DeviceCompat {
    let mut compat = block.encode();
    compat
        .extend_from_slice(format!(" qp_num {} que_iso_cfg {QM_QUE_ISO_CFG}", vft.num).as_bytes());
    let kind = block.kind;
    DeviceCompat {
        identity: format!("19e5:{:04x} hisi_acc_vfio_pci", kind.vf_device_id()),
        compat,
        migration_flags: 0,
        dma_logging: false,
    }
}

fn vft(i: u32) -> Vft {
    Vft {
        base: 64 * (i as u16 + 1),
        num: QM_QUEUES,
    }
}

fn flags_mask(precopy: bool) -> MigrationFlags {
    if precopy {
        MigrationFlags::all()
    } else {
        MigrationFlags::all() - MigrationFlags::PRE_COPY
    }
}

type QmMig = AccMigration<MigrationRegs<Arc<QmVfModel>, Arc<QmPfModel>>, Arc<QmPfModel>, NoDelay>;

/// QM VF `i` of `pf` with its DMA going to `dma`, wrapped for the engine.
fn qm_device(
    pf: &Arc<QmPfModel>,
    i: u32,
    dma: Arc<dyn Dma>,
    precopy: bool,
) -> Result<(VfioMigDevice<QmMig>, Arc<QmVfModel>), String> {
    let fun = i + 1;
    let v = vft(i);
    let vf = pf.create_vf(fun, v, dma);
    // Opened as hisi_acc_vfio_pci opens it: the migration registers are wherever the PF's
    // QM_MIG_REGION_SEL puts them.
    let acc = AccVf::open(
        AccKind::Sec,
        fun,
        pf.revision(),
        Arc::clone(&vf),
        vf.bar2_len(),
        Arc::clone(pf),
        NoDelay,
    )
    .map_err(|e| format!("QM VF {i}: {e}"))?;
    let compat = qm_compat(acc.compat_block(), v);
    let dev = VfioMigDevice::new(
        format!("qm{i}"),
        compat,
        AccMigration::new(acc),
        flags_mask(precopy),
    )
    .map_err(|e| e.to_string())?;
    Ok((dev, vf))
}

/// Simulated DMA-logging device `j`, its initial state from `seed`, wrapped for the engine.
fn logging_device(
    spec: &SimSpec,
    j: u32,
    seed: u64,
    precopy: bool,
) -> Result<(VfioMigDevice<SimDevice>, SimDevice), String> {
    let cfg = sim_device_config(spec, j, seed);
    let sim = SimDevice::new(cfg.clone());
    let dev = VfioMigDevice::new(
        format!("dev{j}"),
        DeviceCompat {
            identity: "livemig simulated device".into(),
            compat: cfg.device_id.to_le_bytes().to_vec(),
            migration_flags: 0,
            dma_logging: true,
        },
        sim.clone(),
        flags_mask(precopy),
    )
    .map_err(|e| e.to_string())?;
    Ok((dev, sim))
}

/// A simulated source host: platform for the engine, handles for checks, and the running
/// workload.
pub struct SimSource {
    /// The engine's view.
    pub platform: SourcePlatform,
    /// Handles for verification and fault injection.
    pub host: SimHost,
    /// The guest's activity (stops when dropped).
    pub workload: Workload,
}

impl std::fmt::Debug for SimSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSource")
            .field("host", &self.host)
            .finish()
    }
}

/// Builds the source host of `spec` and starts its guest. Its QM PF is a `QM_HW_V3`: each VF
/// keeps its migration registers in its own BAR2 and the guest has 32 KiB of it.
pub fn source(spec: &SimSpec, precopy: bool) -> Result<SimSource, String> {
    source_with_qm_revision(spec, precopy, QmRevision::V3)
}

/// As [`source`], with a QM PF of `revision`: above `QM_HW_V3` the VFs' migration registers
/// are in the PF's BAR2 and the guest has all 64 KiB of each VF's BAR2 (Linux 7.3.4).
pub fn source_with_qm_revision(
    spec: &SimSpec,
    precopy: bool,
    revision: QmRevision,
) -> Result<SimSource, String> {
    spec.validate()?;
    match spec.vendor {
        Vendor::Amd => source_with::<AmdV1>(spec, precopy, revision),
        Vendor::Vtd => source_with::<VtdSecondStage>(spec, precopy, revision),
        Vendor::Smmuv3 => source_with::<ArmS1>(spec, precopy, revision),
    }
}

/// A page table and the IOMMU model walking it.
type IdentityModel<F> = (PageTable<F, Arena>, Arc<Iommu<F, Arena>>);

/// The IOMMU model over `ram`: all of its `size` bytes mapped identity at 4 KiB, devices
/// `0..ndev` attached with dirty tracking off.
fn identity_model<F: SimFormat>(
    ram: &Arc<SparseRam>,
    size: u64,
    ndev: u32,
) -> Result<IdentityModel<F>, String> {
    // IOMMU: all RAM mapped identity at 4 KiB.
    let leaf_tables = size / (2 << 20);
    let frames =
        usize::try_from(leaf_tables + leaf_tables / 512 + 64).map_err(|e| e.to_string())?;
    let arena = Arc::new(TableArena::new(ARENA_BASE, frames).map_err(|e| e.to_string())?);
    let mut pt = PageTable::new(F::make(), Arc::clone(&arena)).map_err(|e| e.to_string())?;
    pt.map_sizes(0, 0, size, Perm::RW, PAGE_SIZE)
        .map_err(|e| format!("mapping guest RAM in the IOMMU model: {e}"))?;
    let iommu = Arc::new(Iommu::new(
        F::make(),
        Arc::clone(&arena),
        Arc::clone(ram) as Arc<dyn DataMem>,
        ModelOptions::default(),
    ));
    for d in 0..ndev {
        iommu
            .attach(d, F::context(pt.root(), false))
            .map_err(|e| e.to_string())?;
    }
    Ok((pt, iommu))
}

fn source_with<F: SimFormat>(
    spec: &SimSpec,
    precopy: bool,
    revision: QmRevision,
) -> Result<SimSource, String> {
    let ram = Arc::new(SparseRam::new(spec.ram).map_err(|e| e.to_string())?);
    ram.fill_pattern(0, spec.populated, spec.seed)
        .map_err(|e| e.to_string())?;

    let ndev = spec.qm_vfs + spec.logging_devices;
    let (pt, iommu) = identity_model::<F>(&ram, spec.ram, ndev)?;
    let handle = ModelHandle {
        iommu: Arc::clone(&iommu),
    };
    let iommu_dirty: Result<(), String> = if spec.iommu_dirty {
        Ok(())
    } else {
        Err(format!(
            "the {} model is configured without dirty tracking",
            spec.vendor.name()
        ))
    };
    let iommu_tracker: Option<Box<dyn DirtyTracker>> = if spec.iommu_dirty {
        Some(Box::new(ModelTracker {
            vendor: spec.vendor,
            pt,
            iommu: Arc::clone(&iommu),
            devices: (0..ndev).collect(),
            size: spec.ram,
            bits: DirtyBits::new(0, spec.ram, PAGE_SIZE).map_err(|e| e.to_string())?,
            tracking: false,
        }))
    } else {
        None
    };

    let mut devices = Vec::new();
    let mut qm = Vec::new();
    let mut qm_devs = Vec::new();
    let pf = QmPfModel::with_revision(AccKind::Sec, QM_QUE_ISO_CFG, revision);
    let cpu: Arc<dyn Dma> = Arc::new(CpuDma(Arc::clone(&ram)));
    for i in 0..spec.qm_vfs {
        let (dev, vf) = qm_device(&pf, i, handle.port(i), precopy)?;
        let base = spec.window(i);
        let driver =
            GuestDriver::init(Arc::clone(&vf), Arc::clone(&cpu), base, QM_QUEUES, QM_DEPTH)
                .map_err(|e| format!("QM VF {i}: guest driver init: {e}"))?;
        let bufs = driver.free_base();
        devices.push(SourceDevice {
            does_dma: true,
            dev: Box::new(dev),
            iommu_dirty: iommu_dirty.clone(),
            dma_log: None,
        });
        qm.push(Arc::clone(&vf));
        qm_devs.push(QmDev {
            vf,
            driver: Some(driver),
            bufs,
            next_tag: 0,
        });
    }
    let mut logging = Vec::new();
    let mut log_ports = Vec::new();
    for j in 0..spec.logging_devices {
        let d = spec.qm_vfs + j;
        let (dev, sim) = logging_device(spec, j, 0, precopy)?;
        let tracker = DmaLogTracker::new(format!("dev{j}"), sim.clone(), &[(0, spec.ram)], None)
            .map_err(|e| e.to_string())?;
        devices.push(SourceDevice {
            does_dma: true,
            dev: Box::new(dev),
            iommu_dirty: iommu_dirty.clone(),
            dma_log: Some(Box::new(tracker)),
        });
        log_ports.push((sim.clone(), handle.port(d), spec.window(d)));
        logging.push(sim);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicBool::new(false));
    let cpu_writes = Arc::new(AtomicU64::new(0));
    let dma_ops = Arc::new(AtomicU64::new(0));
    let qm_devs = Arc::new(Mutex::new(qm_devs));
    let mut threads = Vec::new();
    {
        // vCPUs: memory writes, QM job submission and completion polling, logging-device DMA.
        let (stop, paused, parked) = (stop.clone(), paused.clone(), parked.clone());
        let (ram, qm_devs, cpu_writes, dma_ops) = (
            ram.clone(),
            qm_devs.clone(),
            cpu_writes.clone(),
            dma_ops.clone(),
        );
        let spec = spec.clone();
        threads.push(std::thread::spawn(move || {
            vcpu_thread(
                &spec,
                &ram,
                &qm_devs,
                &log_ports,
                &stop,
                &paused,
                &parked,
                &cpu_writes,
                &dma_ops,
            );
        }));
    }
    {
        // The devices themselves: QM VFs work through their queues.
        let (stop, qm) = (stop.clone(), qm.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut any = 0;
                for vf in &qm {
                    any += vf.process(16);
                }
                if any == 0 {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
        }));
    }
    let vcpus = SimVcpus {
        paused: paused.clone(),
        parked: parked.clone(),
        stop: stop.clone(),
    };
    let platform = SourcePlatform {
        memory: ram.clone(),
        devices,
        iommu: iommu_tracker,
        cpu: Box::new(CpuDirtyLog(ram.clone())),
        vcpus: Box::new(vcpus),
        page_size_mask: F::make().page_sizes(),
        viommu: None,
        dma_endpoints: Vec::new(),
    };
    Ok(SimSource {
        platform,
        host: SimHost { ram, qm, logging },
        workload: Workload {
            stop,
            threads,
            cpu_writes,
            dma_ops,
        },
    })
}

#[allow(clippy::too_many_arguments)]
fn vcpu_thread(
    spec: &SimSpec,
    ram: &SparseRam,
    qm: &Mutex<Vec<QmDev>>,
    logs: &[(SimDevice, Arc<dyn Dma>, u64)],
    stop: &AtomicBool,
    paused: &AtomicBool,
    parked: &AtomicBool,
    cpu_writes: &AtomicU64,
    dma_ops: &AtomicU64,
) {
    let mut rng = spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let ws_pages = (spec.populated / PAGE_SIZE).max(1);
    let mut t = Instant::now();
    let (mut cpu_due, mut dma_due) = (0f64, 0f64);
    while !stop.load(Ordering::Relaxed) {
        if paused.load(Ordering::SeqCst) {
            parked.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            t = Instant::now();
            continue;
        }
        parked.store(false, Ordering::SeqCst);
        // Re-check after announcing we run: a pause request may have raced with us.
        if paused.load(Ordering::SeqCst) {
            continue;
        }
        let dt = t.elapsed().as_secs_f64();
        t = Instant::now();
        cpu_due += dt * spec.cpu_dirty_rate as f64;
        dma_due += dt * spec.dma_rate as f64;
        while cpu_due >= 1.0 {
            cpu_due -= 1.0;
            let r = xorshift(&mut rng);
            let gpa = (r % ws_pages) * PAGE_SIZE + ((r >> 40) % (PAGE_SIZE / 8)) * 8;
            let _ = ram.cpu_write(gpa, &r.to_le_bytes());
            cpu_writes.fetch_add(1, Ordering::Relaxed);
        }
        while dma_due >= 1.0 {
            dma_due -= 1.0;
            let mut devs = qm.lock().unwrap_or_else(|p| p.into_inner());
            for d in devs.iter_mut() {
                let Some(g) = d.driver.as_mut() else { continue };
                let r = xorshift(&mut rng);
                let q = (r % u64::from(QM_QUEUES)) as u16;
                let job = (r >> 8) % 1024;
                let src = d.bufs + job * 512;
                // Completions first, so the queue has room.
                for qq in 0..QM_QUEUES {
                    let _ = g.poll(qq);
                }
                if let Ok(true) = g.submit(q, src, src + 256, 256, d.next_tag) {
                    d.next_tag = d.next_tag.wrapping_add(1);
                    dma_ops.fetch_add(1, Ordering::Relaxed);
                }
                let _ = d.vf.stats();
            }
            drop(devs);
            for (sim, port, window) in logs {
                let r = xorshift(&mut rng);
                let iova = window + (r % (DEV_WINDOW / PAGE_SIZE)) * PAGE_SIZE;
                let data = [(r >> 3) as u8; PAGE_SIZE as usize];
                if port.write(iova, &data).is_ok() {
                    sim.dma_write(iova, PAGE_SIZE);
                }
                sim.tick(1);
                dma_ops.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A simulated destination host.
pub struct SimDestination {
    /// The engine's view.
    pub platform: DestinationPlatform,
    /// Handles for verification.
    pub host: SimHost,
}

impl std::fmt::Debug for SimDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDestination")
            .field("host", &self.host)
            .finish()
    }
}

/// Builds the destination host of `spec`: empty RAM, the same devices freshly created, on a
/// `QM_HW_V3` QM PF (as [`source`]).
pub fn destination(spec: &SimSpec, precopy: bool) -> Result<SimDestination, String> {
    destination_with_qm_revision(spec, precopy, QmRevision::V3)
}

/// As [`destination`], with a QM PF of `revision` (see [`source_with_qm_revision`]).
pub fn destination_with_qm_revision(
    spec: &SimSpec,
    precopy: bool,
    revision: QmRevision,
) -> Result<SimDestination, String> {
    spec.validate()?;
    let ram = Arc::new(SparseRam::new(spec.ram).map_err(|e| e.to_string())?);
    let pf = QmPfModel::with_revision(AccKind::Sec, QM_QUE_ISO_CFG, revision);
    let mut devices: Vec<Box<dyn MigDevice>> = Vec::new();
    let mut qm = Vec::new();
    for i in 0..spec.qm_vfs {
        let (dev, vf) = qm_device(&pf, i, Arc::new(RawDma(Arc::clone(&ram))), precopy)?;
        devices.push(Box::new(dev));
        qm.push(vf);
    }
    let mut logging = Vec::new();
    for j in 0..spec.logging_devices {
        let (dev, sim) = logging_device(spec, j, 0xdead, precopy)?;
        devices.push(Box::new(dev));
        logging.push(sim);
    }
    let n = devices.len();
    let page_size_mask = match spec.vendor {
        Vendor::Amd => AmdV1::make().page_sizes(),
        Vendor::Vtd => VtdSecondStage::make().page_sizes(),
        Vendor::Smmuv3 => ArmS1::make().page_sizes(),
    };
    Ok(SimDestination {
        platform: DestinationPlatform {
            memory: ram.clone(),
            devices,
            iommu_dirty: vec![spec.iommu_dirty; n],
            page_size_mask,
            vcpus: None,
        },
        host: SimHost { ram, qm, logging },
    })
}

/// Whether every simulated device is RUNNING (the source after a failed migration).
pub fn all_running(host: &SimHost) -> bool {
    host.logging.iter().all(|d| d.migration_state_running())
        && host.qm.iter().all(|vf| !vf.is_paused())
}

trait RunningExt {
    fn migration_state_running(&self) -> bool;
}

impl RunningExt for SimDevice {
    fn migration_state_running(&self) -> bool {
        use livemig_vfio::MigrationDevice;
        self.migration_state().ok() == Some(MigrationState::Running)
    }
}

pub use livemig::link::migrate_local;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_specs_are_named_not_panicked_on() {
        let tiny = SimSpec {
            ram: 64 << 20,
            populated: 0,
            qm_vfs: 8,
            logging_devices: 8,
            ..SimSpec::default()
        };
        let e = tiny.validate().unwrap_err();
        assert!(e.contains("device queues use"), "{e}");
        let odd = SimSpec {
            ram: (1 << 30) + 4096,
            ..SimSpec::default()
        };
        assert!(odd.validate().unwrap_err().contains("multiple of 2 MiB"));
        assert!(SimSpec::default().validate().is_ok());
        assert_eq!("SMMU".parse::<Vendor>(), Ok(Vendor::Smmuv3));
    }
}

#[cfg(test)]
mod tracker_contract {
    //! The dirty-tracker contract (`livemig::tracker::testing`) for the simulated platform's
    //! trackers: the vCPU dirty log and the IOMMU model's dirty bits, for all three formats.

    use super::*;
    use livemig::tracker::testing::{self, Dirtied, Subject};

    const RAM: u64 = 4 << 20;

    struct Model<F: SimFormat> {
        port: Arc<dyn Dma>,
        _f: std::marker::PhantomData<F>,
    }

    impl<F: SimFormat> Subject for Model<F> {
        type Tracker = ModelTracker<F>;
        fn pages(&self) -> u64 {
            RAM / PAGE_SIZE
        }
        fn dirty(&mut self, _: &mut ModelTracker<F>, nth: u32) -> Dirtied {
            let pfn = 5 + 97 * u64::from(nth);
            self.port.write(pfn * PAGE_SIZE + 8, &[0xa5; 8]).unwrap();
            Dirtied::page(pfn, 1)
        }
    }

    fn model<F: SimFormat>(vendor: Vendor) -> (Model<F>, ModelTracker<F>) {
        let ram = Arc::new(SparseRam::new(RAM).unwrap());
        let (pt, iommu) = identity_model::<F>(&ram, RAM, 1).unwrap();
        let handle = ModelHandle {
            iommu: Arc::clone(&iommu),
        };
        let tracker = ModelTracker {
            vendor,
            pt,
            iommu,
            devices: vec![0],
            size: RAM,
            bits: DirtyBits::new(0, RAM, PAGE_SIZE).unwrap(),
            tracking: false,
        };
        let subject = Model {
            port: handle.port(0),
            _f: std::marker::PhantomData,
        };
        (subject, tracker)
    }

    #[test]
    fn the_iommu_model_trackers_meet_the_contract() {
        let (mut s, t) = model::<AmdV1>(Vendor::Amd);
        testing::check(&mut s, t).unwrap();
        let (mut s, t) = model::<VtdSecondStage>(Vendor::Vtd);
        testing::check(&mut s, t).unwrap();
        let (mut s, t) = model::<ArmS1>(Vendor::Smmuv3);
        testing::check(&mut s, t).unwrap();
    }

    struct Cpu(Arc<SparseRam>);

    impl Subject for Cpu {
        type Tracker = CpuDirtyLog;
        fn pages(&self) -> u64 {
            RAM / PAGE_SIZE
        }
        fn dirty(&mut self, _: &mut CpuDirtyLog, nth: u32) -> Dirtied {
            let pfn = 9 + 61 * u64::from(nth);
            self.0.cpu_write(pfn * PAGE_SIZE + 1, b"dirty").unwrap();
            Dirtied::page(pfn, 1)
        }
    }

    #[test]
    fn the_vcpu_dirty_log_meets_the_contract() {
        let ram = Arc::new(SparseRam::new(RAM).unwrap());
        testing::check(&mut Cpu(Arc::clone(&ram)), CpuDirtyLog(ram)).unwrap();
    }

    #[test]
    fn negative_control_writes_the_model_does_not_see_fail_the_check() {
        // Raw writes bypass the IOMMU: no dirty bit, and the check must say so.
        struct Raw(Arc<SparseRam>);
        impl Subject for Raw {
            type Tracker = ModelTracker<AmdV1>;
            fn pages(&self) -> u64 {
                RAM / PAGE_SIZE
            }
            fn dirty(&mut self, _: &mut ModelTracker<AmdV1>, nth: u32) -> Dirtied {
                let pfn = 5 + u64::from(nth);
                self.0.write_raw(pfn * PAGE_SIZE, &[1]).unwrap();
                Dirtied::page(pfn, 1)
            }
        }
        let (s, t) = model::<AmdV1>(Vendor::Amd);
        let ram = Arc::new(SparseRam::new(RAM).unwrap());
        drop(s);
        let e = testing::check(&mut Raw(ram), t).unwrap_err();
        assert!(e.contains("page 0x5 was dirtied and not reported"), "{e}");
    }
}
