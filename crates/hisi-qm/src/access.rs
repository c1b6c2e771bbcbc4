//! How the sequences reach the registers: two small traits, a real MMIO implementation, and the
//! BAR2 split that keeps the migration half away from the guest-facing side.
//!
//! ```text
//!   sequences (save / load / compat / PF pre-save)
//!        │  QmRegisters (VF)           PfRegisters (PF)
//!        ├──> MmioVf  (one unsafe constructor over a mapped BAR2)     MmioPf (same, PF BAR)
//!        ├──> MigrationWindow  (from Bar2::split; the guest half is a GuestWindow)
//!        ├──> MigrationRegs (open_migration_regs: QM_MIG_REGION_SEL picks one of)
//!        │       ├─ VfBar2(V)           old revisions: the VF's own BAR2, as above
//!        │       └─ PfBar2(PfWindow<B>) above QM_HW_V3 with QM_MIG_REGION_EN: 8 KiB of the
//!        │                              PF's BAR2 (PfBar2 trait) at 0x180000 + vf_id * 0x2000
//!        └──> model::QmVfModel / model::QmPfModel  (feature "model")
//! ```
//!
//! # Where the migration registers are (Linux 7.3.4)
//! `hisi_acc_vf_qm_init` (`hisi_acc_vfio_pci.c:1188-1242`) reads `QM_MIG_REGION_SEL` from the
//! PF's BAR2 (1196); if the QM is above `QM_HW_V3` and `QM_MIG_REGION_EN` is set (1197) the VF's
//! migration registers are the PF's BAR2 from `QM_MIG_REGION_OFFSET + vf_id *
//! QM_MIG_REGION_SIZE` (1208-1209), else the VF's whole BAR2 (1230-1232).
//! [`select_mig_region`] does the same, with one difference: where the driver accepts any
//! value, a value it cannot have meant is an error naming the register and the value —
//! reserved bits set, `QM_MIG_REGION_EN` on a revision at or below V3 (the driver would ignore
//! it), or a window that does not fit the PF's BAR2. There is no silent fallback to the VF's
//! BAR2.

use core::fmt;
use core::ptr::NonNull;

use crate::regs::{
    DOORBELL_EQ_AEQ_OFFSET, DOORBELL_SQ_CQ_OFFSET, MAILBOX_OFFSET, MigCtrl, PF_MAP_LEN,
    PF_WINDOW_DOORBELL_SQ_CQ_OFFSET, PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET, PF_WINDOW_MAILBOX_OFFSET,
    PfReg, QM_MIG_REGION_EN, QM_MIG_REGION_OFFSET, QM_MIG_REGION_SEL_DEFINED, QM_MIG_REGION_SIZE,
    QmRevision, VF_MAP_LEN, VfReg,
};

/// The VF registers, as the migration sequences use them.
pub trait QmRegisters {
    /// Read a 32-bit register.
    fn read(&self, reg: VfReg) -> u32;
    /// Write a 32-bit register.
    fn write(&self, reg: VfReg, value: u32);
    /// Store a 64-bit doorbell value; `sq_cq` selects the SQ/CQ window (0x1000), else EQ/AEQ
    /// (0x2000).
    fn doorbell(&self, sq_cq: bool, value: u64);
    /// Store the 16-byte mailbox command at 0x300 (one 128-bit store where the CPU has one).
    fn mailbox(&self, command: &[u8; 16]);
}

/// The PF registers the migration path reads (and the VFT configuration protocol writes).
pub trait PfRegisters {
    /// Read a 32-bit register.
    fn read(&self, reg: PfReg) -> u32;
    /// Write a 32-bit register.
    fn write(&self, reg: PfReg, value: u32);
}

impl<T: QmRegisters + ?Sized> QmRegisters for &T {
    fn read(&self, reg: VfReg) -> u32 {
        (**self).read(reg)
    }
    fn write(&self, reg: VfReg, value: u32) {
        (**self).write(reg, value)
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        (**self).doorbell(sq_cq, value)
    }
    fn mailbox(&self, command: &[u8; 16]) {
        (**self).mailbox(command)
    }
}

impl<T: QmRegisters + ?Sized> QmRegisters for alloc::sync::Arc<T> {
    fn read(&self, reg: VfReg) -> u32 {
        (**self).read(reg)
    }
    fn write(&self, reg: VfReg, value: u32) {
        (**self).write(reg, value)
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        (**self).doorbell(sq_cq, value)
    }
    fn mailbox(&self, command: &[u8; 16]) {
        (**self).mailbox(command)
    }
}

impl<T: PfRegisters + ?Sized> PfRegisters for alloc::sync::Arc<T> {
    fn read(&self, reg: PfReg) -> u32 {
        (**self).read(reg)
    }
    fn write(&self, reg: PfReg, value: u32) {
        (**self).write(reg, value)
    }
}

impl<T: PfRegisters + ?Sized> PfRegisters for &T {
    fn read(&self, reg: PfReg) -> u32 {
        (**self).read(reg)
    }
    fn write(&self, reg: PfReg, value: u32) {
        (**self).write(reg, value)
    }
}

/// Waiting between polls. Real hardware sleeps; the model needs no time to pass.
pub trait Delay {
    /// Wait about `us` microseconds.
    fn delay_us(&mut self, us: u32);
}

/// Does not wait (for the model and for tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDelay;

impl Delay for NoDelay {
    fn delay_us(&mut self, _us: u32) {}
}

/// Sleeps with `std::thread::sleep` (at least the requested time).
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy, Default)]
pub struct StdDelay;

#[cfg(feature = "std")]
impl Delay for StdDelay {
    fn delay_us(&mut self, us: u32) {
        std::thread::sleep(core::time::Duration::from_micros(u64::from(us)));
    }
}

/// A mapped register window: base pointer and length.
#[derive(Clone, Copy)]
struct Window {
    base: NonNull<u8>,
    len: usize,
}

impl Window {
    fn check(&self, off: usize, width: usize) {
        assert!(
            off.is_multiple_of(width) && off.checked_add(width).is_some_and(|e| e <= self.len),
            "register access at {off:#x} (+{width}) outside the {:#x}-byte window",
            self.len
        );
    }

    fn read32(&self, off: usize) -> u32 {
        self.check(off, 4);
        // SAFETY: `check` keeps the aligned 4-byte access inside the window, which the
        // constructor's caller guaranteed is mapped device memory for our lifetime.
        unsafe { self.base.as_ptr().add(off).cast::<u32>().read_volatile() }
    }

    fn write32(&self, off: usize, v: u32) {
        self.check(off, 4);
        // SAFETY: as in `read32`.
        unsafe { self.base.as_ptr().add(off).cast::<u32>().write_volatile(v) }
    }

    fn write64(&self, off: usize, v: u64) {
        self.check(off, 8);
        // SAFETY: as in `read32`, for an aligned 8-byte access.
        unsafe { self.base.as_ptr().add(off).cast::<u64>().write_volatile(v) }
    }

    fn write128(&self, off: usize, b: &[u8; 16]) {
        self.check(off, 16);
        let lo = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        #[cfg(target_arch = "aarch64")]
        {
            let p = self.base.as_ptr().wrapping_add(off);
            // SAFETY: `check` keeps the aligned 16-byte store inside the mapped window. The
            // `dmb oshst` orders earlier writes before the mailbox store and `stp` stores both
            // halves with one instruction, as the kernel's `qm_mb_write` does on arm64.
            unsafe {
                core::arch::asm!(
                    "dmb oshst",
                    "stp {lo}, {hi}, [{p}]",
                    lo = in(reg) lo,
                    hi = in(reg) hi,
                    p = in(reg) p,
                    options(nostack, preserves_flags)
                );
            }
        }
        #[cfg(not(target_arch = "aarch64"))]
        {
            // Low half first, as memcpy_toio does on other architectures.
            self.write64(off, lo);
            self.write64(off + 8, hi);
        }
    }
}

/// The VF's BAR2 through a mapping.
pub struct MmioVf {
    w: Window,
}

impl fmt::Debug for MmioVf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioVf")
            .field("base", &self.w.base)
            .field("len", &self.w.len)
            .finish()
    }
}

impl MmioVf {
    /// Registers in a mapped BAR2 of `len` bytes at `base`; `None` if `len` is shorter than the
    /// register map (0x8040 bytes) or `base` is not 16-byte aligned.
    ///
    /// # Safety
    /// `base..base + len` must be a mapping of the VF's BAR2 (device memory, uncached) that stays
    /// mapped and is not accessed as ordinary memory for the lifetime of the returned value.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Option<MmioVf> {
        (len >= VF_MAP_LEN && (base.as_ptr() as usize).is_multiple_of(16)).then_some(MmioVf {
            w: Window { base, len },
        })
    }
}

impl QmRegisters for MmioVf {
    fn read(&self, reg: VfReg) -> u32 {
        self.w.read32(reg.offset())
    }
    fn write(&self, reg: VfReg, value: u32) {
        self.w.write32(reg.offset(), value)
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        let off = if sq_cq {
            DOORBELL_SQ_CQ_OFFSET
        } else {
            DOORBELL_EQ_AEQ_OFFSET
        };
        self.w.write64(off, value)
    }
    fn mailbox(&self, command: &[u8; 16]) {
        self.w.write128(MAILBOX_OFFSET, command)
    }
}

/// A VF's BAR2 mapped through VFIO (`VfioDevice::map_region`), borrowed for as long as the
/// mapping lives. On a lab host this needs the VF bound to plain `vfio-pci`:
/// `hisi_acc_vfio_pci` refuses to map the migration half.
#[cfg(feature = "vfio")]
#[derive(Debug)]
pub struct MappedVf<'a> {
    regs: MmioVf,
    _map: core::marker::PhantomData<&'a ()>,
}

#[cfg(feature = "vfio")]
impl<'a> MappedVf<'a> {
    /// The registers in `map`; `None` if the mapping is shorter than the register map.
    pub fn new(map: &'a livemig_vfio::MappedRegion<'_>) -> Option<MappedVf<'a>> {
        // SAFETY: `map` is a live shared mapping of a device region of `map.len()` bytes, kept
        // alive (and unmapped only on drop) for the borrow `'a` this value carries; it is device
        // memory the caller identified as the VF's BAR2, accessed here only volatilely.
        let regs = unsafe { MmioVf::new(map.as_ptr(), map.len()) }?;
        Some(MappedVf {
            regs,
            _map: core::marker::PhantomData,
        })
    }
}

#[cfg(feature = "vfio")]
impl QmRegisters for MappedVf<'_> {
    fn read(&self, reg: VfReg) -> u32 {
        self.regs.read(reg)
    }
    fn write(&self, reg: VfReg, value: u32) {
        self.regs.write(reg, value)
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        self.regs.doorbell(sq_cq, value)
    }
    fn mailbox(&self, command: &[u8; 16]) {
        self.regs.mailbox(command)
    }
}

/// The PF's register BAR through a mapping.
pub struct MmioPf {
    w: Window,
}

impl fmt::Debug for MmioPf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioPf")
            .field("base", &self.w.base)
            .field("len", &self.w.len)
            .finish()
    }
}

impl MmioPf {
    /// Registers in a mapped PF BAR of `len` bytes at `base`; `None` if `len` is shorter than
    /// the register map or `base` is not 8-byte aligned.
    ///
    /// # Safety
    /// As [`MmioVf::new`], for the PF's register BAR. The PF belongs to the host's crypto driver;
    /// reading these registers is harmless, and only the VFT read protocol writes any.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Option<MmioPf> {
        (len >= PF_MAP_LEN && (base.as_ptr() as usize).is_multiple_of(8)).then_some(MmioPf {
            w: Window { base, len },
        })
    }
}

impl PfRegisters for MmioPf {
    fn read(&self, reg: PfReg) -> u32 {
        self.w.read32(reg.offset())
    }
    fn write(&self, reg: PfReg, value: u32) {
        self.w.write32(reg.offset(), value)
    }
}

impl PfBar2 for MmioPf {
    fn len(&self) -> usize {
        self.w.len
    }
    fn read32(&self, off: usize) -> u32 {
        self.w.read32(off)
    }
    fn write32(&self, off: usize, value: u32) {
        self.w.write32(off, value)
    }
    fn write64(&self, off: usize, value: u64) {
        self.w.write64(off, value)
    }
    fn write128(&self, off: usize, value: &[u8; 16]) {
        self.w.write128(off, value)
    }
}

/// A VF's BAR2 before it is split (any [`QmRegisters`] plus the BAR length).
#[derive(Debug)]
pub struct Bar2<R> {
    regs: R,
    len: usize,
}

impl<R: QmRegisters> Bar2<R> {
    /// Wrap the whole BAR2 (`len` bytes, as the PCI resource reports it).
    pub fn new(regs: R, len: usize) -> Bar2<R> {
        Bar2 { regs, len }
    }

    /// The guest's window when the migration registers are where `mode` says: the first half
    /// of BAR2 for [`MigCtrl::VfBar2`], all of it for [`MigCtrl::PfBar2`]
    /// (`hisi_acc_get_resource_len`, Linux 7.3.4 `hisi_acc_vfio_pci.c:1274-1294`). In PF-control
    /// mode nothing of the VF's BAR2 is migration control, so there is no [`MigrationWindow`].
    pub fn guest_window(self, mode: MigCtrl) -> GuestWindow<R> {
        GuestWindow {
            len: mode.guest_bar2_len(self.len),
            regs: self.regs,
        }
    }

    /// Split into the half the guest may use and the half only migration may use, as
    /// `hisi_acc_vfio_pci` does (`pci_resource_len(BAR2) / 2`). The halves are different types:
    /// the guest window cannot reach the migration registers and cannot be turned into the
    /// migration window.
    pub fn split(self) -> (GuestWindow<R>, MigrationWindow<R>)
    where
        R: Clone,
    {
        let half = self.len / 2;
        (
            GuestWindow {
                regs: self.regs.clone(),
                len: half,
            },
            MigrationWindow {
                regs: self.regs,
                guest_len: half,
            },
        )
    }
}

/// The guest-visible first half of BAR2: register access by offset, refused at or above the
/// half (what `hisi_acc_pci_rw_access_check` and the mmap override enforce).
#[derive(Debug)]
pub struct GuestWindow<R> {
    regs: R,
    len: usize,
}

/// An access the guest window refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "BAR2 offset {offset:#x} is in the migration-control half (guest window is {len:#x} bytes)"
)]
pub struct MigrationRegion {
    /// The offset asked for.
    pub offset: usize,
    /// Bytes the guest may reach.
    pub len: usize,
}

impl<R: QmRegisters> GuestWindow<R> {
    /// Bytes the guest may reach.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false` for a real BAR2.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `reg` lies in the guest half.
    pub fn contains(&self, reg: VfReg) -> bool {
        reg.offset() + 4 <= self.len
    }

    /// Read `reg` if it lies in the guest half.
    pub fn read(&self, reg: VfReg) -> Result<u32, MigrationRegion> {
        if self.contains(reg) {
            Ok(self.regs.read(reg))
        } else {
            Err(MigrationRegion {
                offset: reg.offset(),
                len: self.len,
            })
        }
    }

    /// Write `reg` if it lies in the guest half.
    pub fn write(&self, reg: VfReg, value: u32) -> Result<(), MigrationRegion> {
        if self.contains(reg) {
            self.regs.write(reg, value);
            Ok(())
        } else {
            Err(MigrationRegion {
                offset: reg.offset(),
                len: self.len,
            })
        }
    }
}

/// The whole BAR2 for the migration path, including the migration-control half (EQC/AEQC).
#[derive(Debug)]
pub struct MigrationWindow<R> {
    regs: R,
    guest_len: usize,
}

impl<R> MigrationWindow<R> {
    /// Bytes of BAR2 the guest sees (the rest is migration control).
    pub fn guest_len(&self) -> usize {
        self.guest_len
    }
}

impl<R: QmRegisters> QmRegisters for MigrationWindow<R> {
    fn read(&self, reg: VfReg) -> u32 {
        self.regs.read(reg)
    }
    fn write(&self, reg: VfReg, value: u32) {
        self.regs.write(reg, value)
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        self.regs.doorbell(sq_cq, value)
    }
    fn mailbox(&self, command: &[u8; 16]) {
        self.regs.mailbox(command)
    }
}

/// The PF's BAR2 by byte offset, as the VF migration windows of a new-revision QM need it
/// (the named [`PfRegisters`] cover only the PF's own registers).
pub trait PfBar2 {
    /// Bytes of the PF's BAR2.
    fn len(&self) -> usize;
    /// Whether the BAR is empty (never, for a real PF).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read 32 bits at `off`.
    fn read32(&self, off: usize) -> u32;
    /// Write 32 bits at `off`.
    fn write32(&self, off: usize, value: u32);
    /// Store 64 bits at `off` (a doorbell).
    fn write64(&self, off: usize, value: u64);
    /// Store a 16-byte mailbox command at `off`.
    fn write128(&self, off: usize, value: &[u8; 16]);
}

impl<T: PfBar2 + ?Sized> PfBar2 for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn read32(&self, off: usize) -> u32 {
        (**self).read32(off)
    }
    fn write32(&self, off: usize, value: u32) {
        (**self).write32(off, value)
    }
    fn write64(&self, off: usize, value: u64) {
        (**self).write64(off, value)
    }
    fn write128(&self, off: usize, value: &[u8; 16]) {
        (**self).write128(off, value)
    }
}

impl<T: PfBar2 + ?Sized> PfBar2 for alloc::sync::Arc<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn read32(&self, off: usize) -> u32 {
        (**self).read32(off)
    }
    fn write32(&self, off: usize, value: u32) {
        (**self).write32(off, value)
    }
    fn write64(&self, off: usize, value: u64) {
        (**self).write64(off, value)
    }
    fn write128(&self, off: usize, value: &[u8; 16]) {
        (**self).write128(off, value)
    }
}

/// Where one VF's migration registers are, as [`select_mig_region`] found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigRegion {
    /// `HW_ACC_MIG_VF_CTRL`: the VF's own BAR2.
    VfBar2,
    /// `HW_ACC_MIG_PF_CTRL`: the PF's BAR2 from `offset` ([`QM_MIG_REGION_OFFSET`]` + vf_id *
    /// `[`QM_MIG_REGION_SIZE`]).
    PfBar2 {
        /// Byte offset of the VF's window in the PF's BAR2.
        offset: usize,
    },
}

impl MigRegion {
    /// The driver's mode.
    pub fn mode(self) -> MigCtrl {
        match self {
            MigRegion::VfBar2 => MigCtrl::VfBar2,
            MigRegion::PfBar2 { .. } => MigCtrl::PfBar2,
        }
    }
}

/// `QM_MIG_REGION_SEL`, or the VF it is asked about, says something the driver cannot have
/// meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// Bits other than `QM_MIG_REGION_EN` are set (all-ones: the PF's BAR2 does not answer).
    #[error("{reg} reads {value:#010x}: reserved bits {reserved:#010x} are set")]
    ReservedBits {
        /// `QM_MIG_REGION_SEL`.
        reg: &'static str,
        /// The value read.
        value: u32,
        /// The reserved bits that were set.
        reserved: u32,
    },
    /// `QM_MIG_REGION_EN` on a QM that is not above V3, where the driver does not look at it.
    #[error(
        "{reg} reads {value:#010x}: QM_MIG_REGION_EN is set on {revision}, which keeps the \
         migration registers in the VF's BAR2"
    )]
    EnabledOnOldRevision {
        /// `QM_MIG_REGION_SEL`.
        reg: &'static str,
        /// The value read.
        value: u32,
        /// The PF's revision.
        revision: QmRevision,
    },
    /// The VF's window (and the EQ/AEQ doorbell the driver stores just past it) does not fit
    /// in the PF's BAR2.
    #[error(
        "{reg} reads {value:#010x}: VF {vf_id}'s migration window at PF BAR2 {start:#x} needs \
         bytes up to {end:#x} (the 8 KiB window and the EQ/AEQ doorbell at +0x2000), past the \
         {bar_len:#x}-byte BAR"
    )]
    WindowPastBar {
        /// `QM_MIG_REGION_SEL`.
        reg: &'static str,
        /// The value read.
        value: u32,
        /// The VF (1-based).
        vf_id: u32,
        /// Window start in the PF's BAR2 (saturated on overflow).
        start: usize,
        /// First byte after what the access path touches (saturated on overflow).
        end: usize,
        /// Bytes of the PF's BAR2.
        bar_len: usize,
    },
    /// `vf_id` 0 is the PF (the driver's `vf_id` is `pci_iov_vf_id() + 1`,
    /// `hisi_acc_vfio_pci.c:1568`).
    #[error("vf_id 0 names the PF, not a VF (VF numbers start at 1)")]
    NotAVf,
    /// The driver offers no migration below `QM_HW_V3` (`hisi_acc_vfio_pci.c:1677`).
    #[error("{revision} is below QM_HW_V3: hisi_acc_vfio_pci does not migrate its VFs")]
    NotMigratable {
        /// The PF's revision.
        revision: QmRevision,
    },
}

const SEL: &str = "QM_MIG_REGION_SEL";

/// Decide where VF `vf_id`'s (1-based) migration registers are, as `hisi_acc_vf_qm_init` does
/// (Linux 7.3.4 `hisi_acc_vfio_pci.c:1196-1209`): read `QM_MIG_REGION_SEL` from the PF's BAR2;
/// above `QM_HW_V3` with `QM_MIG_REGION_EN` set, the window in the PF's BAR2, else the VF's
/// BAR2. Values the driver cannot have meant are errors (see [`RegionError`]).
pub fn select_mig_region(
    pf: &impl PfBar2,
    revision: QmRevision,
    vf_id: u32,
) -> Result<MigRegion, RegionError> {
    if !revision.migratable() {
        return Err(RegionError::NotMigratable { revision });
    }
    if vf_id == 0 {
        return Err(RegionError::NotAVf);
    }
    let off = PfReg::MigRegionSel.offset();
    let value = if off + 4 <= pf.len() {
        pf.read32(off)
    } else {
        // A BAR too small to hold the register cannot hold a window either.
        return Err(RegionError::WindowPastBar {
            reg: SEL,
            value: 0,
            vf_id,
            start: off,
            end: off + 4,
            bar_len: pf.len(),
        });
    };
    let reserved = value & !QM_MIG_REGION_SEL_DEFINED;
    if reserved != 0 {
        return Err(RegionError::ReservedBits {
            reg: SEL,
            value,
            reserved,
        });
    }
    if value & QM_MIG_REGION_EN == 0 {
        return Ok(MigRegion::VfBar2);
    }
    if !revision.is_new() {
        return Err(RegionError::EnabledOnOldRevision {
            reg: SEL,
            value,
            revision,
        });
    }
    let start = (vf_id as usize)
        .checked_mul(QM_MIG_REGION_SIZE)
        .and_then(|o| o.checked_add(QM_MIG_REGION_OFFSET));
    // The window, and the 8-byte EQ/AEQ doorbell the driver stores at its end.
    let end = start.and_then(|s| s.checked_add(PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET + 8));
    match (start, end) {
        (Some(start), Some(end)) if end <= pf.len() => Ok(MigRegion::PfBar2 { offset: start }),
        _ => Err(RegionError::WindowPastBar {
            reg: SEL,
            value,
            vf_id,
            start: start.unwrap_or(usize::MAX),
            end: end.unwrap_or(usize::MAX),
            bar_len: pf.len(),
        }),
    }
}

/// A VF's migration registers in its window of the PF's BAR2 (`HW_ACC_MIG_PF_CTRL`), at the
/// offsets of [`QmPfMigWindowRegisters`](crate::regs::QmPfMigWindowRegisters). Made by
/// [`open_migration_regs`], which has checked that every access stays inside the BAR.
#[derive(Debug, Clone)]
pub struct PfWindow<B> {
    bar: B,
    base: usize,
}

impl<B> PfWindow<B> {
    /// Byte offset of the window in the PF's BAR2.
    pub fn base(&self) -> usize {
        self.base
    }
}

impl<B: PfBar2> QmRegisters for PfWindow<B> {
    fn read(&self, reg: VfReg) -> u32 {
        self.bar.read32(self.base + reg.offset_in(MigCtrl::PfBar2))
    }
    fn write(&self, reg: VfReg, value: u32) {
        self.bar
            .write32(self.base + reg.offset_in(MigCtrl::PfBar2), value)
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        // The driver's qm_db adds the same doorbell offsets to io_base in both modes
        // (hisi_acc_vfio_pci.c:252-262): the EQ/AEQ one lands just past the window.
        let off = if sq_cq {
            PF_WINDOW_DOORBELL_SQ_CQ_OFFSET
        } else {
            PF_WINDOW_EQ_AEQ_DOORBELL_OFFSET
        };
        self.bar.write64(self.base + off, value)
    }
    fn mailbox(&self, command: &[u8; 16]) {
        self.bar
            .write128(self.base + PF_WINDOW_MAILBOX_OFFSET, command)
    }
}

/// A VF's migration registers wherever [`select_mig_region`] found them.
#[derive(Debug, Clone)]
pub enum MigrationRegs<V, B> {
    /// The VF's own BAR2 (old revisions, or `QM_MIG_REGION_EN` clear).
    VfBar2(V),
    /// The VF's window in the PF's BAR2.
    PfBar2(PfWindow<B>),
}

impl<V, B> MigrationRegs<V, B> {
    /// The driver's mode.
    pub fn mode(&self) -> MigCtrl {
        match self {
            MigrationRegs::VfBar2(_) => MigCtrl::VfBar2,
            MigrationRegs::PfBar2(_) => MigCtrl::PfBar2,
        }
    }
}

/// Open VF `vf_id`'s migration registers as `hisi_acc_vf_qm_init` does: select the region on
/// `pf` ([`select_mig_region`]), then use `pf`'s window or `vf_bar2`.
pub fn open_migration_regs<V: QmRegisters, B: PfBar2>(
    pf: B,
    revision: QmRevision,
    vf_id: u32,
    vf_bar2: V,
) -> Result<MigrationRegs<V, B>, RegionError> {
    Ok(match select_mig_region(&pf, revision, vf_id)? {
        MigRegion::VfBar2 => MigrationRegs::VfBar2(vf_bar2),
        MigRegion::PfBar2 { offset } => MigrationRegs::PfBar2(PfWindow {
            bar: pf,
            base: offset,
        }),
    })
}

impl<V: QmRegisters, B: PfBar2> QmRegisters for MigrationRegs<V, B> {
    fn read(&self, reg: VfReg) -> u32 {
        match self {
            MigrationRegs::VfBar2(v) => v.read(reg),
            MigrationRegs::PfBar2(w) => w.read(reg),
        }
    }
    fn write(&self, reg: VfReg, value: u32) {
        match self {
            MigrationRegs::VfBar2(v) => v.write(reg, value),
            MigrationRegs::PfBar2(w) => w.write(reg, value),
        }
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        match self {
            MigrationRegs::VfBar2(v) => v.doorbell(sq_cq, value),
            MigrationRegs::PfBar2(w) => w.doorbell(sq_cq, value),
        }
    }
    fn mailbox(&self, command: &[u8; 16]) {
        match self {
            MigrationRegs::VfBar2(v) => v.mailbox(command),
            MigrationRegs::PfBar2(w) => w.mailbox(command),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;

    #[derive(Default)]
    struct Regs(RefCell<alloc::vec::Vec<(VfReg, u32)>>);

    impl QmRegisters for &Regs {
        fn read(&self, _reg: VfReg) -> u32 {
            7
        }
        fn write(&self, reg: VfReg, value: u32) {
            self.0.borrow_mut().push((reg, value));
        }
        fn doorbell(&self, _sq_cq: bool, _value: u64) {}
        fn mailbox(&self, _command: &[u8; 16]) {}
    }

    #[test]
    fn bar2_split_keeps_the_migration_half_from_the_guest() {
        let regs = Regs::default();
        let (guest, migration) = Bar2::new(&regs, 0x10000).split();
        assert_eq!((guest.len(), migration.guest_len()), (0x8000, 0x8000));
        assert_eq!(guest.read(VfReg::VfState), Ok(7));
        assert!(guest.contains(VfReg::MbCmdSendBase));
        let e = guest.write(VfReg::EqcDw(1), 5).unwrap_err();
        assert_eq!(
            e,
            MigrationRegion {
                offset: 0x8004,
                len: 0x8000
            }
        );
        assert_eq!(
            e.to_string(),
            "BAR2 offset 0x8004 is in the migration-control half (guest window is 0x8000 bytes)"
        );
        assert!(guest.read(VfReg::AeqcDw(6)).is_err());
        migration.write(VfReg::EqcDw(1), 5);
        assert_eq!(*regs.0.borrow(), [(VfReg::EqcDw(1), 5)]);
    }

    #[test]
    fn mmio_constructor_checks_length_and_alignment() {
        let mut mem = alloc::vec![0u64; 0x10000 / 8];
        let base = NonNull::new(mem.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `mem` is 64 KiB of ordinary memory standing in for a BAR; it outlives `vf`.
        let short = unsafe { MmioVf::new(base, 0x8000) };
        assert!(short.is_none());
        // SAFETY: as above.
        let vf = unsafe { MmioVf::new(base, 0x10000) }.unwrap();
        vf.write(VfReg::PageSize, 0x1234);
        assert_eq!(vf.read(VfReg::PageSize), 0x1234);
        vf.doorbell(true, 0xdead_beef);
        let mb = [1u8; 16];
        vf.mailbox(&mb);
        assert_eq!(mem[0x34 / 8] >> 32, 0x1234);
        assert_eq!(mem[0x1000 / 8], 0xdead_beef);
        assert_eq!(mem[0x300 / 8], u64::from_le_bytes([1; 8]));
    }

    /// A PF BAR2 of `len` bytes that answers `sel` at QM_MIG_REGION_SEL and records stores.
    struct FakePf {
        len: usize,
        sel: u32,
        stores: RefCell<alloc::vec::Vec<(usize, u64)>>,
    }

    impl FakePf {
        fn new(len: usize, sel: u32) -> FakePf {
            FakePf {
                len,
                sel,
                stores: RefCell::default(),
            }
        }
    }

    impl PfBar2 for FakePf {
        fn len(&self) -> usize {
            self.len
        }
        fn read32(&self, off: usize) -> u32 {
            if off == PfReg::MigRegionSel.offset() {
                self.sel
            } else {
                0x5a5a_0000 | off as u32 & 0xffff
            }
        }
        fn write32(&self, off: usize, value: u32) {
            self.stores.borrow_mut().push((off, u64::from(value)));
        }
        fn write64(&self, off: usize, value: u64) {
            self.stores.borrow_mut().push((off, value));
        }
        fn write128(&self, off: usize, value: &[u8; 16]) {
            self.stores.borrow_mut().push((off, u64::from(value[0])));
        }
    }

    const PF_LEN: usize = 0x40_0000;

    #[test]
    fn new_revision_with_en_puts_the_vf_window_in_pf_bar2() {
        let pf = FakePf::new(PF_LEN, QM_MIG_REGION_EN);
        let vf = Regs::default();
        let regs = open_migration_regs(&pf, QmRevision::V4, 3, &vf).unwrap();
        assert_eq!(regs.mode(), MigCtrl::PfBar2);
        let base = 0x18_0000 + 3 * 0x2000;
        assert!(matches!(&regs, MigrationRegs::PfBar2(w) if w.base() == base));
        assert_eq!(
            regs.read(VfReg::EqcDw(1)),
            0x5a5a_0000 | (base + 0x1c04) as u32 & 0xffff
        );
        regs.write(VfReg::EqcDw(1), 9);
        regs.write(VfReg::AeqcDw(0), 8);
        regs.write(VfReg::PageSize, 7);
        regs.doorbell(true, 6);
        regs.doorbell(false, 5);
        regs.mailbox(&[4; 16]);
        assert_eq!(
            *pf.stores.borrow(),
            [
                (base + 0x1c04, 9),
                (base + 0x1c20, 8),
                (base + 0x34, 7),
                (base + 0x1000, 6),
                (base + 0x2000, 5),
                (base + 0x300, 4)
            ]
        );
        assert!(vf.0.borrow().is_empty(), "the VF's own BAR2 was written");

        // Negative control: the same revision with EN clear keeps the VF's BAR2.
        let pf = FakePf::new(PF_LEN, 0);
        let regs = open_migration_regs(&pf, QmRevision::V4, 3, &vf).unwrap();
        assert_eq!(regs.mode(), MigCtrl::VfBar2);
        regs.write(VfReg::EqcDw(1), 9);
        assert!(pf.stores.borrow().is_empty());
        assert_eq!(*vf.0.borrow(), [(VfReg::EqcDw(1), 9)]);
        // And V3 with EN clear too.
        assert_eq!(
            select_mig_region(&pf, QmRevision::V3, 1),
            Ok(MigRegion::VfBar2)
        );
    }

    #[test]
    fn garbage_in_the_region_select_register_is_an_error_naming_it() {
        for value in [0x2, 0x8000_0001, u32::MAX] {
            let pf = FakePf::new(PF_LEN, value);
            let e = select_mig_region(&pf, QmRevision::V4, 1).unwrap_err();
            assert_eq!(
                e,
                RegionError::ReservedBits {
                    reg: "QM_MIG_REGION_SEL",
                    value,
                    reserved: value & !1
                }
            );
            assert!(
                e.to_string()
                    .starts_with(&alloc::format!("QM_MIG_REGION_SEL reads {value:#010x}")),
                "{e}"
            );
        }
        // EN on V3: the driver would ignore it; here it is an error.
        let pf = FakePf::new(PF_LEN, 1);
        let e = select_mig_region(&pf, QmRevision::V3, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "QM_MIG_REGION_SEL reads 0x00000001: QM_MIG_REGION_EN is set on QM_HW_V3 (0x30), \
             which keeps the migration registers in the VF's BAR2"
        );
        // Negative control: the same value above V3 is accepted.
        assert!(select_mig_region(&pf, QmRevision(0x31), 1).is_ok());
        // Below V3 nothing migrates; vf_id 0 is the PF.
        assert_eq!(
            select_mig_region(&pf, QmRevision::V2, 1),
            Err(RegionError::NotMigratable {
                revision: QmRevision::V2
            })
        );
        assert_eq!(
            select_mig_region(&pf, QmRevision::V4, 0),
            Err(RegionError::NotAVf)
        );
    }

    #[test]
    fn a_window_past_the_pf_bar_is_refused() {
        // 2 MiB: VF 62's window and the doorbell past it end at 0x1fe008; VF 63's at 0x200008.
        let pf = FakePf::new(0x20_0000, 1);
        assert_eq!(
            select_mig_region(&pf, QmRevision::V4, 62),
            Ok(MigRegion::PfBar2 { offset: 0x1fc000 })
        );
        let e = select_mig_region(&pf, QmRevision::V4, 63).unwrap_err();
        assert_eq!(
            e,
            RegionError::WindowPastBar {
                reg: "QM_MIG_REGION_SEL",
                value: 1,
                vf_id: 63,
                start: 0x1fe000,
                end: 0x200008,
                bar_len: 0x20_0000
            }
        );
        assert!(
            e.to_string()
                .contains("VF 63's migration window at PF BAR2 0x1fe000"),
            "{e}"
        );
        // Overflowing arithmetic is an error, not a panic.
        assert!(matches!(
            select_mig_region(&pf, QmRevision::V4, u32::MAX),
            Err(RegionError::WindowPastBar {
                vf_id: u32::MAX,
                ..
            })
        ));
        // A BAR too short to hold the register at all.
        let tiny = FakePf::new(0x1000, 1);
        assert!(matches!(
            select_mig_region(&tiny, QmRevision::V4, 1),
            Err(RegionError::WindowPastBar { .. })
        ));
    }

    #[test]
    fn pf_window_through_a_mapped_pf_bar() {
        let mut mem = alloc::vec![0u64; PF_LEN / 8];
        let base = NonNull::new(mem.as_mut_ptr().cast::<u8>()).unwrap();
        {
            // SAFETY: `mem` is 4 MiB of ordinary memory standing in for the PF's BAR2; it
            // outlives `pf`, which this block drops before `mem` is read again.
            let pf = unsafe { MmioPf::new(base, PF_LEN) }.unwrap();
            pf.write32(PfReg::MigRegionSel.offset(), 1);
            let vf = Regs::default();
            let regs = open_migration_regs(&pf, QmRevision::V5, 2, &vf).unwrap();
            regs.write(VfReg::AeqcDw(2), 0xabcd);
            regs.doorbell(true, 0x1234_5678_9abc);
        }
        let w = 0x18_0000 + 2 * 0x2000;
        assert_eq!(mem[(w + 0x1c28) / 8] & 0xffff_ffff, 0xabcd);
        assert_eq!(mem[(w + 0x1000) / 8], 0x1234_5678_9abc);
    }

    #[test]
    fn the_guest_gets_all_of_bar2_in_pf_control_mode() {
        let regs = Regs::default();
        let guest = Bar2::new(&regs, 0x10000).guest_window(MigCtrl::PfBar2);
        assert_eq!(guest.len(), 0x10000);
        assert!(guest.write(VfReg::EqcDw(1), 5).is_ok());
        // Negative control: the old layout keeps 0x8004 from the guest.
        let guest = Bar2::new(&regs, 0x10000).guest_window(MigCtrl::VfBar2);
        assert_eq!(guest.len(), 0x8000);
        assert!(guest.write(VfReg::EqcDw(1), 5).is_err());
    }
}
