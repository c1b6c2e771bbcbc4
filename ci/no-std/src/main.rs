//! The proof of the workspace's `no_std` claims: a freestanding binary for
//! `x86_64-unknown-none` (a target that has `core` and `alloc` but no `std`) that links
//! `livemig-stream` (without `std`), `livemig-iommu-pt` and `livemig-hisi-qm` (default
//! features) and calls into each, so their code is compiled, monomorphized and linked.
//!
//! If any of them, or any of their dependencies, turns on `std` (an `extern crate std`, a
//! dependency's `std` feature), the build fails with "can't find crate for `std`": the target
//! has no `std` to find. A host-target `--no-default-features` build cannot show that, since
//! `std` is always there to link.
//!
//! Nothing runs this binary; building it (`cargo xtask ci`, step `no_std`) is the check. The
//! `leak-std` feature is the negative control: it turns on `livemig-hisi-qm/std` and the CI
//! step expects that build to fail.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::hint::black_box;
use core::sync::atomic::{AtomicUsize, Ordering};

/// A bump allocator over a static array: enough for the code paths to link (the binary is
/// never run, but it must be a complete program).
struct Bump {
    heap: UnsafeCell<[u8; HEAP]>,
    next: AtomicUsize,
}

const HEAP: usize = 1 << 20;

// SAFETY: `alloc` hands out disjoint ranges of `heap` (claimed with one atomic add each), so
// no two threads ever get the same bytes.
unsafe impl Sync for Bump {}

// SAFETY: every returned block lies inside `heap`, is aligned as `layout` asks, and is never
// handed out twice; null is returned when the heap is exhausted.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.heap.get() as usize;
        let mut start = self.next.load(Ordering::Relaxed);
        loop {
            let aligned = (base + start).next_multiple_of(layout.align()) - base;
            let Some(end) = aligned.checked_add(layout.size()).filter(|&e| e <= HEAP) else {
                return core::ptr::null_mut();
            };
            match self
                .next
                .compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (base + aligned) as *mut u8,
                Err(now) => start = now,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump {
    heap: UnsafeCell::new([0; HEAP]),
    next: AtomicUsize::new(0),
};

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The error types are `core::error::Error` without `std` (what a `?` into a boxed error or
/// `anyhow` needs on a hosted build too).
fn is_error<E: core::error::Error>() {}

/// livemig-stream without `std`: the zero-copy decoder, the QEMU VFIO framing parser, the
/// QEMU migration-file walker and the software CRC32C.
fn stream(bytes: &[u8]) -> usize {
    use livemig_stream::{Limits, SliceReader, crc, qemu, qevm};
    is_error::<livemig_stream::Error>();
    let mut n = crc::crc32c(bytes) as usize;
    if let Ok(mut r) = SliceReader::new(bytes, Limits::default()) {
        while let Ok(Some(rec)) = r.next() {
            black_box(&rec);
            n += 1;
        }
    }
    for item in qemu::Parser::new(bytes, 1 << 20) {
        black_box(&item);
        n += 1;
    }
    if let Ok(file) = qevm::read(bytes, qevm::QevmLimits::default()) {
        n += file.sections().len() + file.vfio_devices().len();
    }
    n
}

/// livemig-iommu-pt: a VT-d second-stage table mapped, split and harvested, and the three
/// vendors' capability verdicts.
fn iommu_pt(regs: u64) -> usize {
    use livemig_iommu_pt::caps::{AmdCaps, SmmuCaps, VtdCaps};
    use livemig_iommu_pt::format::{AmdV1, ArmS2, VtdSecondStage, X86FirstStage};
    use livemig_iommu_pt::{DirtyBits, HarvestOptions, PageTable, Perm, TableArena};
    is_error::<livemig_iommu_pt::Error>();
    black_box(AmdCaps::from_efr(regs).dirty_support());
    black_box(VtdCaps::from_regs(regs, !regs).dirty_support());
    black_box(SmmuCaps::from_regs(regs as u32, (regs >> 32) as u32).dirty_support());
    let run = || -> Result<u64, livemig_iommu_pt::Error> {
        let arena = TableArena::new(0x1000_0000, 64)?;
        let mut pt = PageTable::new(VtdSecondStage::new(48, 46)?, &arena)?;
        pt.map(0x4000_0000, 0x8000_0000, 4 << 20, Perm::RW)?;
        let mut flush = |iova: u64, len: u64| {
            black_box((iova, len));
        };
        pt.split(0x4000_0000, 4 << 20, 4096, &mut flush)?;
        let mut dirty = DirtyBits::new(0x4000_0000, 4 << 20, 4096)?;
        pt.read_and_clear_dirty(
            0x4000_0000,
            4 << 20,
            &mut dirty,
            HarvestOptions::default(),
            &mut flush,
        )?;
        black_box(PageTable::new(AmdV1::new(4)?, &arena)?);
        black_box(PageTable::new(X86FirstStage::new(4, 46)?, &arena)?);
        black_box(PageTable::new(ArmS2::new(48, 48)?, &arena)?);
        Ok(dirty.count())
    };
    run().map_or(0, |n| n as usize)
}

/// A register file that reads zeros: enough to drive the QM sequences through their polls.
struct ZeroRegs;

impl livemig_hisi_qm::QmRegisters for ZeroRegs {
    fn read(&self, reg: livemig_hisi_qm::regs::VfReg) -> u32 {
        black_box(reg);
        0
    }
    fn write(&self, reg: livemig_hisi_qm::regs::VfReg, value: u32) {
        black_box((reg, value));
    }
    fn doorbell(&self, sq_cq: bool, value: u64) {
        black_box((sq_cq, value));
    }
    fn mailbox(&self, command: &[u8; 16]) {
        black_box(command);
    }
}

/// livemig-hisi-qm: `acc_vf_data` in every layout, the mailbox and VFT encodings, and the VF
/// sequences over a register file.
fn hisi_qm(bytes: &[u8]) -> usize {
    use livemig_hisi_qm::mailbox::{Mailbox, Vft};
    use livemig_hisi_qm::state::AccVfData;
    use livemig_hisi_qm::{NoDelay, VfQm};
    is_error::<livemig_hisi_qm::Error>();
    is_error::<livemig_hisi_qm::state::StateError>();
    let mut n = 0;
    if let Ok(d) = AccVfData::decode(bytes) {
        n += d.encode().len();
    }
    if let Ok(d) = AccVfData::decode_rfc_v2(bytes) {
        n += d.encode().len();
    }
    if let Ok(mb) = <&[u8; 16]>::try_from(bytes.get(..16).unwrap_or(&[])) {
        let (m, status) = Mailbox::decode(mb);
        black_box(status);
        n += m.encode().len();
    }
    n += Vft::decode(bytes.len() as u64).encode() as usize;
    let mut qm = VfQm::new(ZeroRegs, NoDelay);
    n += usize::from(qm.wait_ready());
    if let Ok(s) = qm.read_state() {
        black_box(&s);
        n += 1;
    }
    n += qm.vft().map_or(0, |v| v.encode() as usize);
    n
}

/// The entry point of a freestanding x86-64 program (never run: linking it is the check).
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    let input: &[u8] = black_box(&[0u8; 256]);
    let n = stream(input) + iommu_pt(black_box(0x8000_0000_0000_0000)) + hisi_qm(input);
    black_box(n);
    loop {
        core::hint::spin_loop();
    }
}
