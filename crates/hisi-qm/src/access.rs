//! How the sequences reach the registers: two small traits, a real MMIO implementation, and the
//! BAR2 split that keeps the migration half away from the guest-facing side.
//!
//! ```text
//!   sequences (save / load / compat / PF pre-save)
//!        │  QmRegisters (VF)           PfRegisters (PF)
//!        ├──> MmioVf  (one unsafe constructor over a mapped BAR2)     MmioPf (same, PF BAR)
//!        ├──> MigrationWindow  (from Bar2::split; the guest half is a GuestWindow)
//!        └──> model::QmVfModel / model::QmPfModel  (feature "model")
//! ```

use core::fmt;
use core::ptr::NonNull;

use crate::regs::{
    DOORBELL_EQ_AEQ_OFFSET, DOORBELL_SQ_CQ_OFFSET, MAILBOX_OFFSET, PF_MAP_LEN, PfReg, VF_MAP_LEN,
    VfReg,
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
            off % width == 0 && off.checked_add(width).is_some_and(|e| e <= self.len),
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
        (len >= VF_MAP_LEN && base.as_ptr() as usize % 16 == 0).then_some(MmioVf {
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
        (len >= PF_MAP_LEN && base.as_ptr() as usize % 8 == 0).then_some(MmioPf {
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
}
