//! The x86 vCPU state record: every vCPU's registers, FPU/XSAVE, XCRs, the MSRs KVM reports as
//! saveable, LAPIC, MP state, events and debug registers, plus the VM's clock and interrupt
//! controllers, and the CPUID the vCPUs ran with. Carried in the livemig stream as the state of
//! the [`VcpuStateDevice`](crate::device::VcpuStateDevice).
//!
//! ```text
//!  "LMVS" | version u16 | holds u16 | vcpus u32 | xsave_size u32
//!  | cpuid_count u32 | cpuid_count x (function, index, flags, eax, ebx, ecx, edx: u32 LE)
//!  | sections: tag u16 | reserved u16 = 0 | length u32 | bytes[length]   (until the end)
//!      VM:    1 clock (kvm_clock_data)  2 PIC master  3 PIC slave  4 IOAPIC (kvm_irqchip)
//!      vCPU:  16 begin (u32 index, in order), then 17 regs 18 sregs
//!             19 xsave 20 xcrs (holds = 0)  or  26 fpu (kvm_fpu, holds = 1)
//!             21 debugregs 22 lapic 23 mp_state 24 events 25 msrs (count u32, reserved u32,
//!             count x (index u32, reserved u32, value u64))
//! ```
//!
//! **What the record holds follows the vCPU's CPUID** ([`Holds`]): with XSAVE (leaf 1 ECX bit
//! 26) the XSAVE area and the XCRs; without it there are no XCRs (`KVM_SET_XCRS` fails on a
//! host without XSAVE, arch/x86/kvm/x86.c `kvm_vcpu_ioctl_x86_set_xcrs`) and the legacy FPU
//! state travels through `KVM_GET_FPU`/`KVM_SET_FPU`. Version 1 (every record before this
//! field) always held XSAVE and had the `holds` field reserved as 0; a record holding XSAVE is
//! still written as version 1, byte for byte, so older destinations read it. Version 2 carries
//! `holds` = 1 (the legacy FPU); other values are refused.
//!
//! Fixed sections carry the kernel's struct bytes (`include/uapi/linux/kvm.h`,
//! `arch/x86/include/uapi/asm/kvm.h`) and must have exactly its size. Every section must
//! appear once per vCPU (once for the VM); unknown tags, reserved bits, short or trailing bytes
//! are errors naming the section and offset. What the record holds, the CPUID and the XSAVE
//! size are compared with the destination before anything is written to a vCPU.

use crate::sys::kvm_call;
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::Error;

const MAGIC: &[u8; 4] = b"LMVS";
/// The newest version written (2: a record holding the legacy FPU); a record holding XSAVE
/// is written as version 1, which every earlier livemig reads.
const VERSION: u16 = 2;

/// What a record's per-vCPU floating-point state is, chosen by the vCPU's CPUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// The XSAVE area (`KVM_GET_XSAVE`) and the XCRs (`KVM_GET_XCRS`): CPUID has XSAVE.
    Xsave,
    /// The legacy FPU/SSE state (`KVM_GET_FPU`): CPUID has no XSAVE, so there are no XCRs.
    Fpu,
}

impl Holds {
    /// What a VM with this CPUID saves: XSAVE when leaf 1 ECX bit 26 is set (Intel SDM vol. 2A
    /// CPUID, "XSAVE"; AMD APM vol. 3 appendix E, the same bit).
    pub fn for_cpuid(cpuid: &[CpuidEntry]) -> Holds {
        let xsave = cpuid
            .iter()
            .any(|e| e.function == 1 && e.index == 0 && e.regs[2] & (1 << 26) != 0);
        if xsave { Holds::Xsave } else { Holds::Fpu }
    }

    /// Words for messages: what the record holds and why.
    pub fn describe(self) -> &'static str {
        match self {
            Holds::Xsave => "XSAVE/XCR0 state (CPUID has XSAVE)",
            Holds::Fpu => "legacy FPU state, no XCRs (CPUID has no XSAVE)",
        }
    }
}

/// One vCPU's floating-point state, as [`Holds`] says.
#[derive(Clone)]
enum FpState {
    Xsave {
        xsave: Box<[u32; 1024]>,
        xcrs: Box<kvm_xcrs>,
    },
    Fpu(Box<kvm_fpu>),
}
/// The largest record accepted (8 vCPUs of ~11 KiB plus MSRs, with room).
pub const MAX_RECORD: usize = 1 << 20;

/// One CPUID entry as compared between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// `KVM_CPUID_FLAG_*`.
    pub flags: u32,
    /// Registers.
    pub regs: [u32; 4],
}

/// The CPUID the VM's vCPUs share (per-vCPU APIC IDs excluded).
pub fn cpuid_entries(cpuid: &kvm_bindings::CpuId) -> Vec<CpuidEntry> {
    cpuid
        .as_slice()
        .iter()
        .map(|e| {
            let mut regs = [e.eax, e.ebx, e.ecx, e.edx];
            if e.function == 1 {
                regs[1] &= 0x00ff_ffff;
            }
            if e.function == 0xb || e.function == 0x1f {
                regs[3] = 0;
            }
            CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                regs,
            }
        })
        .collect()
}

/// A short digest of a CPUID set (FNV-1a over the entries), for identities and messages.
pub fn cpuid_digest(entries: &[CpuidEntry]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for e in entries {
        for w in [
            e.function, e.index, e.flags, e.regs[0], e.regs[1], e.regs[2], e.regs[3],
        ] {
            for b in w.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    h
}

/// One vCPU's state.
#[derive(Clone)]
pub struct VcpuRecord {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fp: FpState,
    debugregs: kvm_debugregs,
    lapic: Box<kvm_lapic_state>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: Vec<(u32, u64)>,
}

impl std::fmt::Debug for VcpuRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRecord")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish()
    }
}

impl VcpuRecord {
    /// The instruction pointer.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// What the floating-point part holds.
    pub fn holds(&self) -> Holds {
        match self.fp {
            FpState::Xsave { .. } => Holds::Xsave,
            FpState::Fpu(_) => Holds::Fpu,
        }
    }
}

/// The whole record.
#[derive(Clone, Debug)]
pub struct VmState {
    /// The CPUID the vCPUs ran with.
    pub cpuid: Vec<CpuidEntry>,
    /// XSAVE area size.
    pub xsave_size: u32,
    /// What every vCPU's floating-point state is.
    pub holds: Holds,
    clock: kvm_clock_data,
    pics: [Box<kvm_irqchip>; 3],
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuRecord>,
}

/// Views a POD kernel struct as its bytes.
fn bytes_of<T: Copy>(t: &T) -> &[u8] {
    // SAFETY: T is one of the kvm-bindings structs of this module: repr(C), integer fields
    // only, filled by the kernel (or zero-initialised), so every byte is initialised; the
    // slice covers exactly the value and lives as long as the borrow.
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Builds a POD kernel struct from exactly its bytes.
fn from_bytes<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut t = T::default();
    // SAFETY: T is a repr(C) integer-only kvm-bindings struct, so any bytes form a valid
    // value; the copy writes exactly size_of::<T>() bytes into it.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut t as *mut T).cast::<u8>(), b.len());
    }
    Some(t)
}

fn zeroed_box<T: Copy>() -> Box<T> {
    // SAFETY: the kvm-bindings structs used here are integer-only; all-zero is valid.
    unsafe { Box::new(std::mem::zeroed()) }
}

fn kerr(what: String) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The MSRs of `kvm`'s index list that this vCPU can read (KVM_GET_MSR_INDEX_LIST, filtered
/// one by one: `KVM_GET_MSRS` stops at the first it cannot read).
pub fn saveable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<u32>, Error> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kerr("KVM_GET_MSR_INDEX_LIST".into()))?;
    let mut out = Vec::new();
    for &index in list.as_slice() {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
        if fd.get_msrs(&mut m).unwrap_or(0) == 1 {
            out.push(index);
        }
    }
    Ok(out)
}

/// Captures one paused vCPU; its floating-point state as `holds` says.
pub fn save_vcpu(fd: &VcpuFd, i: u32, msrs: &[u32], holds: Holds) -> Result<VcpuRecord, Error> {
    let at = |what: &str| format!("{what} on vCPU {i}");
    let regs = kvm_call("KVM_GET_REGS", || fd.get_regs()).map_err(kerr(at("KVM_GET_REGS")))?;
    let sregs = kvm_call("KVM_GET_SREGS", || fd.get_sregs()).map_err(kerr(at("KVM_GET_SREGS")))?;
    let fp = match holds {
        Holds::Xsave => FpState::Xsave {
            xsave: Box::new(
                kvm_call("KVM_GET_XSAVE", || fd.get_xsave())
                    .map_err(kerr(at("KVM_GET_XSAVE")))?
                    .region,
            ),
            xcrs: Box::new(
                kvm_call("KVM_GET_XCRS", || fd.get_xcrs()).map_err(kerr(at("KVM_GET_XCRS")))?,
            ),
        },
        Holds::Fpu => FpState::Fpu(Box::new(
            kvm_call("KVM_GET_FPU", || fd.get_fpu()).map_err(kerr(at("KVM_GET_FPU")))?,
        )),
    };
    let debugregs = kvm_call("KVM_GET_DEBUGREGS", || fd.get_debug_regs())
        .map_err(kerr(at("KVM_GET_DEBUGREGS")))?;
    let lapic =
        Box::new(kvm_call("KVM_GET_LAPIC", || fd.get_lapic()).map_err(kerr(at("KVM_GET_LAPIC")))?);
    let mp_state =
        kvm_call("KVM_GET_MP_STATE", || fd.get_mp_state()).map_err(kerr(at("KVM_GET_MP_STATE")))?;
    let events = kvm_call("KVM_GET_VCPU_EVENTS", || fd.get_vcpu_events())
        .map_err(kerr(at("KVM_GET_VCPU_EVENTS")))?;
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut m = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("{e:?}")))?;
    let n = kvm_call("KVM_GET_MSRS", || fd.get_msrs(&mut m)).map_err(kerr(at("KVM_GET_MSRS")))?;
    if n != entries.len() {
        return Err(Error::Vcpu(format!(
            "vCPU {i}: KVM_GET_MSRS read {n} of {} MSRs (stopped at {:#x})",
            entries.len(),
            entries[n].index
        )));
    }
    Ok(VcpuRecord {
        regs,
        sregs,
        fp,
        debugregs,
        lapic,
        mp_state,
        events,
        msrs: m.as_slice().iter().map(|e| (e.index, e.data)).collect(),
    })
}

/// Restores one vCPU (parked, never run since its state was last set).
pub fn restore_vcpu(fd: &VcpuFd, i: u32, r: &VcpuRecord) -> Result<(), Error> {
    let at = |what: &str| format!("{what} on vCPU {i}");
    // Order after QEMU's kvm_arch_put_registers (target/i386/kvm/kvm.c): xsave/xcrs (or the
    // FPU)/sregs before MSRs (EFER), the LAPIC after the MSRs (APIC base), MP state and
    // events last.
    kvm_call("KVM_SET_REGS", || fd.set_regs(&r.regs)).map_err(kerr(at("KVM_SET_REGS")))?;
    match &r.fp {
        FpState::Xsave { xsave, xcrs } => {
            let xsave = kvm_xsave {
                region: **xsave,
                ..Default::default()
            };
            // SAFETY: the buffer is a whole 4096-byte kvm_xsave, the size this host's KVM
            // uses (KVM_CAP_XSAVE2 checked at VM creation, the record's size checked before
            // restore).
            kvm_call("KVM_SET_XSAVE", || unsafe { fd.set_xsave(&xsave) })
                .map_err(kerr(at("KVM_SET_XSAVE")))?;
            kvm_call("KVM_SET_XCRS", || fd.set_xcrs(xcrs)).map_err(kerr(at("KVM_SET_XCRS")))?;
        }
        FpState::Fpu(fpu) => {
            kvm_call("KVM_SET_FPU", || fd.set_fpu(fpu)).map_err(kerr(at("KVM_SET_FPU")))?;
        }
    }
    kvm_call("KVM_SET_SREGS", || fd.set_sregs(&r.sregs)).map_err(kerr(at("KVM_SET_SREGS")))?;
    let entries: Vec<kvm_msr_entry> = r
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let m = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("{e:?}")))?;
    let n = kvm_call("KVM_SET_MSRS", || fd.set_msrs(&m)).map_err(kerr(at("KVM_SET_MSRS")))?;
    if n != entries.len() {
        return Err(Error::Vcpu(format!(
            "vCPU {i}: KVM_SET_MSRS wrote {n} of {} MSRs (refused {:#x} = {:#x})",
            entries.len(),
            entries[n].index,
            entries[n].data
        )));
    }
    kvm_call("KVM_SET_LAPIC", || fd.set_lapic(&r.lapic)).map_err(kerr(at("KVM_SET_LAPIC")))?;
    kvm_call("KVM_SET_DEBUGREGS", || fd.set_debug_regs(&r.debugregs))
        .map_err(kerr(at("KVM_SET_DEBUGREGS")))?;
    kvm_call("KVM_SET_MP_STATE", || fd.set_mp_state(r.mp_state))
        .map_err(kerr(at("KVM_SET_MP_STATE")))?;
    kvm_call("KVM_SET_VCPU_EVENTS", || fd.set_vcpu_events(&r.events))
        .map_err(kerr(at("KVM_SET_VCPU_EVENTS")))?;
    Ok(())
}

fn irqchip(vm: &VmFd, id: u32) -> Result<Box<kvm_irqchip>, Error> {
    let mut c = zeroed_box::<kvm_irqchip>();
    c.chip_id = id;
    kvm_call("KVM_GET_IRQCHIP", || vm.get_irqchip(&mut c))
        .map_err(kerr(format!("KVM_GET_IRQCHIP {id}")))?;
    Ok(c)
}

/// Captures the VM (every vCPU parked).
pub fn save_vm(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    cpuid: Vec<CpuidEntry>,
    xsave_size: u32,
    msrs: &[u32],
) -> Result<VmState, Error> {
    let holds = Holds::for_cpuid(&cpuid);
    let clock =
        kvm_call("KVM_GET_CLOCK", || vm.get_clock()).map_err(kerr("KVM_GET_CLOCK".into()))?;
    let pics = [
        irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
    ];
    let vcpus = vcpus
        .iter()
        .enumerate()
        .map(|(i, fd)| save_vcpu(fd, i as u32, msrs, holds))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmState {
        cpuid,
        xsave_size,
        holds,
        clock,
        pics,
        vcpus,
    })
}

impl VmState {
    /// Checks the record fits a destination with `vcpus` vCPUs, this CPUID and XSAVE size;
    /// the reason names the first difference.
    pub fn check_fits(
        &self,
        vcpus: usize,
        cpuid: &[CpuidEntry],
        xsave_size: u32,
    ) -> Result<(), Error> {
        if self.vcpus.len() != vcpus {
            return Err(Error::Vcpu(format!(
                "the record holds {} vCPUs, the destination VM has {vcpus}",
                self.vcpus.len()
            )));
        }
        let theirs = Holds::for_cpuid(cpuid);
        if self.holds != theirs {
            return Err(Error::Vcpu(format!(
                "the record holds {}; the destination takes {}",
                self.holds.describe(),
                theirs.describe()
            )));
        }
        if self.holds == Holds::Xsave && self.xsave_size != xsave_size {
            return Err(Error::Vcpu(format!(
                "XSAVE layout differs: the record's area is {} bytes, the destination's {xsave_size}",
                self.xsave_size
            )));
        }
        if self.cpuid != cpuid {
            let names = ["eax", "ebx", "ecx", "edx"];
            for (a, b) in self.cpuid.iter().zip(cpuid) {
                if (a.function, a.index) != (b.function, b.index) {
                    return Err(Error::Vcpu(format!(
                        "CPUID differs: the source has leaf {:#x}.{:#x} where the destination \
                         has {:#x}.{:#x}",
                        a.function, a.index, b.function, b.index
                    )));
                }
                if let Some(r) = (0..4).find(|&r| a.regs[r] != b.regs[r]) {
                    return Err(Error::Vcpu(format!(
                        "CPUID differs (another CPU model): leaf {:#x} subleaf {:#x} {} is {:#x} \
                         on the source, {:#x} on the destination",
                        a.function, a.index, names[r], a.regs[r], b.regs[r]
                    )));
                }
                if a.flags != b.flags {
                    return Err(Error::Vcpu(format!(
                        "CPUID differs: leaf {:#x}.{:#x} flags {:#x} vs {:#x}",
                        a.function, a.index, a.flags, b.flags
                    )));
                }
            }
            return Err(Error::Vcpu(format!(
                "CPUID differs: {} leaves on the source, {} on the destination",
                self.cpuid.len(),
                cpuid.len()
            )));
        }
        Ok(())
    }

    /// Writes the record into the VM (vCPUs parked and never run since creation).
    pub fn restore(&self, vm: &VmFd, vcpus: &[&VcpuFd]) -> Result<(), Error> {
        for (i, (fd, r)) in vcpus.iter().zip(&self.vcpus).enumerate() {
            restore_vcpu(fd, i as u32, r)?;
        }
        for c in &self.pics {
            kvm_call("KVM_SET_IRQCHIP", || vm.set_irqchip(c))
                .map_err(kerr(format!("KVM_SET_IRQCHIP {}", c.chip_id)))?;
        }
        // KVM_SET_CLOCK: only `clock` (and the REALTIME flag) are inputs; let KVM take the
        // value as is (api.rst, KVM_SET_CLOCK).
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        kvm_call("KVM_SET_CLOCK", || vm.set_clock(&clock)).map_err(kerr("KVM_SET_CLOCK".into()))?;
        Ok(())
    }

    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 << 10);
        out.extend_from_slice(MAGIC);
        let (version, holds) = match self.holds {
            Holds::Xsave => (1u16, 0u16),
            Holds::Fpu => (VERSION, 1),
        };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&holds.to_le_bytes());
        out.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.xsave_size.to_le_bytes());
        out.extend_from_slice(&(self.cpuid.len() as u32).to_le_bytes());
        for e in &self.cpuid {
            for w in [
                e.function, e.index, e.flags, e.regs[0], e.regs[1], e.regs[2], e.regs[3],
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut sec = |tag: u16, b: &[u8]| {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        sec(tag::CLOCK, bytes_of(&self.clock));
        sec(tag::PIC_MASTER, bytes_of(&*self.pics[0]));
        sec(tag::PIC_SLAVE, bytes_of(&*self.pics[1]));
        sec(tag::IOAPIC, bytes_of(&*self.pics[2]));
        for (i, v) in self.vcpus.iter().enumerate() {
            sec(tag::VCPU, &(i as u32).to_le_bytes());
            sec(tag::REGS, bytes_of(&v.regs));
            sec(tag::SREGS, bytes_of(&v.sregs));
            match &v.fp {
                FpState::Xsave { xsave, xcrs } => {
                    sec(tag::XSAVE, bytes_of(&**xsave));
                    sec(tag::XCRS, bytes_of(&**xcrs));
                }
                FpState::Fpu(fpu) => sec(tag::FPU, bytes_of(&**fpu)),
            }
            sec(tag::DEBUGREGS, bytes_of(&v.debugregs));
            sec(tag::LAPIC, bytes_of(&*v.lapic));
            sec(tag::MP_STATE, bytes_of(&v.mp_state));
            sec(tag::EVENTS, bytes_of(&v.events));
            let mut m = Vec::with_capacity(8 + 16 * v.msrs.len());
            m.extend_from_slice(&(v.msrs.len() as u32).to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            for &(idx, val) in &v.msrs {
                m.extend_from_slice(&idx.to_le_bytes());
                m.extend_from_slice(&0u32.to_le_bytes());
                m.extend_from_slice(&val.to_le_bytes());
            }
            sec(tag::MSRS, &m);
        }
        out
    }

    /// Decodes a record; every problem is an error naming the section and byte offset.
    pub fn decode(b: &[u8]) -> Result<VmState, Error> {
        let bad = |at: usize, what: String| Error::Record { offset: at, what };
        if b.len() > MAX_RECORD {
            return Err(bad(
                0,
                format!("{} bytes exceed the {MAX_RECORD}-byte cap", b.len()),
            ));
        }
        let mut c = Cursor { b, at: 0 };
        if c.take(4).ok_or_else(|| bad(0, "truncated magic".into()))? != MAGIC {
            return Err(bad(
                0,
                "not a vCPU state record (magic is not \"LMVS\")".into(),
            ));
        }
        let version = c.u16().ok_or_else(|| bad(4, "truncated header".into()))?;
        if version == 0 || version > VERSION {
            return Err(bad(
                4,
                format!("version {version}; this build reads versions 1 to {VERSION}"),
            ));
        }
        let holds = match (
            version,
            c.u16().ok_or_else(|| bad(6, "truncated header".into()))?,
        ) {
            (_, 0) => Holds::Xsave,
            (2.., 1) => Holds::Fpu,
            (1, _) => return Err(bad(6, "reserved header bits set (version 1)".into())),
            (_, h) => {
                return Err(bad(
                    6,
                    format!("holds {h}: 0 (XSAVE) and 1 (legacy FPU) are defined"),
                ));
            }
        };
        let n = c.u32().ok_or_else(|| bad(8, "truncated header".into()))? as usize;
        if n == 0 || n > 8 {
            return Err(bad(8, format!("{n} vCPUs (1 to 8 expected)")));
        }
        let xsave_size = c.u32().ok_or_else(|| bad(12, "truncated header".into()))?;
        let count = c.u32().ok_or_else(|| bad(16, "truncated header".into()))? as usize;
        if count > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return Err(bad(16, format!("{count} CPUID entries (at most 256)")));
        }
        let mut cpuid = Vec::with_capacity(count);
        for _ in 0..count {
            let at = c.at;
            let mut w = [0u32; 7];
            for x in &mut w {
                *x = c
                    .u32()
                    .ok_or_else(|| bad(at, "truncated CPUID entry".into()))?;
            }
            cpuid.push(CpuidEntry {
                function: w[0],
                index: w[1],
                flags: w[2],
                regs: [w[3], w[4], w[5], w[6]],
            });
        }
        let mut clock = None;
        let mut pics: [Option<Box<kvm_irqchip>>; 3] = [None, None, None];
        let mut vcpus: Vec<Partial> = Vec::new();
        while c.at < b.len() {
            let at = c.at;
            let t = c
                .u16()
                .ok_or_else(|| bad(at, "truncated section header".into()))?;
            let r = c
                .u16()
                .ok_or_else(|| bad(at, "truncated section header".into()))?;
            let len = c
                .u32()
                .ok_or_else(|| bad(at, "truncated section header".into()))?
                as usize;
            if r != 0 {
                return Err(bad(at + 2, format!("section {t}: reserved bits set")));
            }
            let body = c
                .take(len)
                .ok_or_else(|| bad(at, format!("section {t}: {len} bytes run past the end")))?;
            let sized = |name: &str| bad(at, format!("section {t} ({name}): wrong size {len}"));
            let dup = |name: &str| bad(at, format!("section {t} ({name}) appears twice"));
            match t {
                tag::CLOCK => {
                    if clock.is_some() {
                        return Err(dup("clock"));
                    }
                    clock = Some(from_bytes::<kvm_clock_data>(body).ok_or_else(|| sized("clock"))?);
                }
                tag::PIC_MASTER | tag::PIC_SLAVE | tag::IOAPIC => {
                    let k = usize::from(t - tag::PIC_MASTER);
                    if pics[k].is_some() {
                        return Err(dup("irqchip"));
                    }
                    let chip = boxed::<kvm_irqchip>(body).ok_or_else(|| sized("irqchip"))?;
                    let want = [
                        KVM_IRQCHIP_PIC_MASTER,
                        KVM_IRQCHIP_PIC_SLAVE,
                        KVM_IRQCHIP_IOAPIC,
                    ][k];
                    if chip.chip_id != want {
                        return Err(bad(
                            at,
                            format!("section {t}: chip id {} is not {want}", chip.chip_id),
                        ));
                    }
                    pics[k] = Some(chip);
                }
                tag::VCPU => {
                    let idx = body
                        .try_into()
                        .map(u32::from_le_bytes)
                        .map_err(|_| sized("vCPU begin"))?;
                    if idx as usize != vcpus.len() || vcpus.len() == n {
                        return Err(bad(
                            at,
                            format!("vCPU {idx} out of order (expected {})", vcpus.len()),
                        ));
                    }
                    vcpus.push(Partial::default());
                }
                tag::REGS..=tag::FPU => {
                    let Some(v) = vcpus.last_mut() else {
                        return Err(bad(at, format!("section {t} before any vCPU")));
                    };
                    let fp = matches!(t, tag::XSAVE | tag::XCRS | tag::FPU);
                    if fp && (t == tag::FPU) != (holds == Holds::Fpu) {
                        return Err(bad(
                            at,
                            format!(
                                "section {t}: the header says the record holds {}",
                                holds.describe()
                            ),
                        ));
                    }
                    v.put(t, body).map_err(|what| bad(at, what))?;
                }
                other => return Err(bad(at, format!("unknown section tag {other}"))),
            }
        }
        let clock = clock.ok_or_else(|| bad(b.len(), "no clock section".into()))?;
        let [m, s, i] = pics;
        let pics = [
            m.ok_or_else(|| bad(b.len(), "no PIC master section".into()))?,
            s.ok_or_else(|| bad(b.len(), "no PIC slave section".into()))?,
            i.ok_or_else(|| bad(b.len(), "no IOAPIC section".into()))?,
        ];
        if vcpus.len() != n {
            return Err(bad(
                b.len(),
                format!("{} of {n} vCPUs present", vcpus.len()),
            ));
        }
        let vcpus = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.finish(holds)
                    .map_err(|what| bad(b.len(), format!("vCPU {i}: {what}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            cpuid,
            xsave_size,
            holds,
            clock,
            pics,
            vcpus,
        })
    }
}

mod tag {
    pub const CLOCK: u16 = 1;
    pub const PIC_MASTER: u16 = 2;
    pub const PIC_SLAVE: u16 = 3;
    pub const IOAPIC: u16 = 4;
    pub const VCPU: u16 = 16;
    pub const REGS: u16 = 17;
    pub const SREGS: u16 = 18;
    pub const XSAVE: u16 = 19;
    pub const XCRS: u16 = 20;
    pub const DEBUGREGS: u16 = 21;
    pub const LAPIC: u16 = 22;
    pub const MP_STATE: u16 = 23;
    pub const EVENTS: u16 = 24;
    pub const MSRS: u16 = 25;
    pub const FPU: u16 = 26;
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
}

#[derive(Default)]
struct Partial {
    regs: Option<kvm_regs>,
    sregs: Option<kvm_sregs>,
    xsave: Option<Box<[u32; 1024]>>,
    xcrs: Option<kvm_xcrs>,
    fpu: Option<Box<kvm_fpu>>,
    debugregs: Option<kvm_debugregs>,
    lapic: Option<Box<kvm_lapic_state>>,
    mp_state: Option<kvm_mp_state>,
    events: Option<kvm_vcpu_events>,
    msrs: Option<Vec<(u32, u64)>>,
}

fn once<T>(slot: &mut Option<T>, v: Option<T>, name: &str, len: usize) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{name} appears twice"));
    }
    *slot = Some(v.ok_or_else(|| format!("{name}: wrong size {len}"))?);
    Ok(())
}

fn boxed<T: Copy + Default>(b: &[u8]) -> Option<Box<T>> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut x = zeroed_box::<T>();
    // SAFETY: T is an integer-only repr(C) struct; the sizes are equal (checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut *x as *mut T).cast::<u8>(), b.len());
    }
    Some(x)
}

impl Partial {
    fn put(&mut self, t: u16, b: &[u8]) -> Result<(), String> {
        let l = b.len();
        match t {
            tag::REGS => once(&mut self.regs, from_bytes(b), "regs", l),
            tag::SREGS => once(&mut self.sregs, from_bytes(b), "sregs", l),
            tag::XSAVE => once(&mut self.xsave, boxed_xsave(b), "xsave", l),
            tag::XCRS => once(&mut self.xcrs, from_bytes(b), "xcrs", l),
            tag::DEBUGREGS => once(&mut self.debugregs, from_bytes(b), "debugregs", l),
            tag::LAPIC => once(&mut self.lapic, boxed::<kvm_lapic_state>(b), "lapic", l),
            tag::MP_STATE => once(&mut self.mp_state, from_bytes(b), "mp_state", l),
            tag::EVENTS => once(&mut self.events, from_bytes(b), "events", l),
            tag::FPU => once(&mut self.fpu, boxed::<kvm_fpu>(b), "fpu", l),
            _ => once(&mut self.msrs, parse_msrs(b), "msrs", l),
        }
    }

    fn finish(self, holds: Holds) -> Result<VcpuRecord, String> {
        let miss = |n: &str| format!("no {n} section");
        let fp = match holds {
            Holds::Xsave => FpState::Xsave {
                xsave: self.xsave.ok_or_else(|| miss("xsave"))?,
                xcrs: Box::new(self.xcrs.ok_or_else(|| miss("xcrs"))?),
            },
            Holds::Fpu => FpState::Fpu(self.fpu.ok_or_else(|| miss("fpu"))?),
        };
        Ok(VcpuRecord {
            regs: self.regs.ok_or_else(|| miss("regs"))?,
            sregs: self.sregs.ok_or_else(|| miss("sregs"))?,
            fp,
            debugregs: self.debugregs.ok_or_else(|| miss("debugregs"))?,
            lapic: self.lapic.ok_or_else(|| miss("lapic"))?,
            mp_state: self.mp_state.ok_or_else(|| miss("mp_state"))?,
            events: self.events.ok_or_else(|| miss("events"))?,
            msrs: self.msrs.ok_or_else(|| miss("msrs"))?,
        })
    }
}

fn boxed_xsave(b: &[u8]) -> Option<Box<[u32; 1024]>> {
    if b.len() != 4096 {
        return None;
    }
    let mut x = Box::new([0u32; 1024]);
    for (d, s) in x.iter_mut().zip(b.chunks_exact(4)) {
        *d = u32::from_ne_bytes(s.try_into().ok()?);
    }
    Some(x)
}

fn parse_msrs(b: &[u8]) -> Option<Vec<(u32, u64)>> {
    let n = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    if b.get(4..8)? != [0; 4] || n > 4096 || b.len() != 8 + 16 * n {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for e in b[8..].chunks_exact(16) {
        if e[4..8] != [0; 4] {
            return None;
        }
        out.push((
            u32::from_le_bytes(e[0..4].try_into().ok()?),
            u64::from_le_bytes(e[8..16].try_into().ok()?),
        ));
    }
    Some(out)
}

/// A record with zeroed state, for decoder tests and fuzzing seeds.
pub fn sample_record(vcpus: usize, cpuid: Vec<CpuidEntry>) -> VmState {
    let mut pics = [
        zeroed_box::<kvm_irqchip>(),
        zeroed_box::<kvm_irqchip>(),
        zeroed_box::<kvm_irqchip>(),
    ];
    pics[0].chip_id = KVM_IRQCHIP_PIC_MASTER;
    pics[1].chip_id = KVM_IRQCHIP_PIC_SLAVE;
    pics[2].chip_id = KVM_IRQCHIP_IOAPIC;
    let v = VcpuRecord {
        regs: kvm_regs {
            rip: 0x10_0000,
            ..Default::default()
        },
        sregs: Default::default(),
        fp: match Holds::for_cpuid(&cpuid) {
            Holds::Xsave => FpState::Xsave {
                xsave: Box::new([0; 1024]),
                xcrs: Box::default(),
            },
            Holds::Fpu => FpState::Fpu(zeroed_box()),
        },
        debugregs: Default::default(),
        lapic: zeroed_box(),
        mp_state: Default::default(),
        events: Default::default(),
        msrs: vec![(0x10, 12345), (0xc000_0080, 0)],
    };
    VmState {
        holds: Holds::for_cpuid(&cpuid),
        cpuid,
        xsave_size: 4096,
        clock: Default::default(),
        pics,
        vcpus: vec![v; vcpus],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                regs: [0xd, 1, 2, 3],
            },
            CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                regs: [0x906ea, 0, 0x7ffafbff, 0xbfebfbff],
            },
        ]
    }

    #[test]
    fn record_round_trips_and_every_truncation_is_named() {
        let s = sample_record(2, cpuid());
        let b = s.encode();
        let d = VmState::decode(&b).unwrap();
        assert_eq!(d.encode(), b);
        assert_eq!(d.vcpus.len(), 2);
        assert_eq!(d.vcpus[1].rip(), 0x10_0000);
        for cut in 0..b.len() {
            let e = VmState::decode(&b[..cut]).unwrap_err();
            assert!(matches!(e, Error::Record { .. }), "cut {cut}: {e}");
        }
        // Every byte flipped in the framing (header and section headers) is refused or
        // decodes to something that re-encodes differently; never a panic.
        for i in 0..b.len() {
            let mut m = b.clone();
            m[i] ^= 0xff;
            let _ = VmState::decode(&m);
        }
        let mut m = b.clone();
        m[4] = 9;
        assert!(
            VmState::decode(&m)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        let mut extra = b.clone();
        extra.extend_from_slice(&[99, 0, 0, 0, 0, 0, 0, 0]);
        assert!(
            VmState::decode(&extra)
                .unwrap_err()
                .to_string()
                .contains("unknown section tag 99")
        );
    }

    #[test]
    fn a_record_from_another_cpu_model_is_refused_naming_the_leaf() {
        let s = sample_record(2, cpuid());
        let mut other = cpuid();
        other[1].regs[2] &= !(1 << 28); // AVX off
        let e = s.check_fits(2, &other, 4096).unwrap_err().to_string();
        assert!(
            e.contains("leaf 0x1 subleaf 0x0 ecx is 0x7ffafbff on the source, 0x6ffafbff"),
            "{e}"
        );
        let e = s.check_fits(1, &cpuid(), 4096).unwrap_err().to_string();
        assert!(e.contains("2 vCPUs, the destination VM has 1"), "{e}");
        let e = s.check_fits(2, &cpuid(), 8192).unwrap_err().to_string();
        assert!(e.contains("XSAVE layout differs"), "{e}");
        assert!(s.check_fits(2, &cpuid(), 4096).is_ok());
        assert_ne!(cpuid_digest(&cpuid()), cpuid_digest(&other));
    }

    fn no_xsave(mut c: Vec<CpuidEntry>) -> Vec<CpuidEntry> {
        c[1].regs[2] &= !(1 << 26);
        c
    }

    #[test]
    fn a_vcpu_without_xsave_is_recorded_with_the_legacy_fpu_and_no_xcrs() {
        let s = sample_record(2, no_xsave(cpuid()));
        assert_eq!(s.holds, Holds::Fpu);
        let b = s.encode();
        assert_eq!(&b[4..8], &[2, 0, 1, 0], "version 2, holds 1");
        let d = VmState::decode(&b).unwrap();
        assert_eq!(d.holds, Holds::Fpu);
        assert!(d.vcpus.iter().all(|v| v.holds() == Holds::Fpu));
        assert_eq!(d.encode(), b);
        for cut in 0..b.len() {
            assert!(VmState::decode(&b[..cut]).is_err(), "cut {cut}");
        }
        // A header that claims XSAVE over FPU sections is refused at the first of them.
        let mut m = b.clone();
        m[6] = 0;
        let e = VmState::decode(&m).unwrap_err().to_string();
        assert!(
            e.contains("section 26: the header says the record holds XSAVE"),
            "{e}"
        );
        // Version 1 had the field reserved.
        let mut m = b.clone();
        m[4] = 1;
        let e = VmState::decode(&m).unwrap_err().to_string();
        assert!(e.contains("reserved header bits set (version 1)"), "{e}");
        m[4] = 2;
        m[6] = 7;
        let e = VmState::decode(&m).unwrap_err().to_string();
        assert!(e.contains("holds 7"), "{e}");
    }

    #[test]
    fn a_record_is_refused_by_a_destination_whose_cpuid_differs_in_xsave_naming_it() {
        let with = sample_record(2, cpuid());
        let e = with
            .check_fits(2, &no_xsave(cpuid()), 4096)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "vCPU state: the record holds XSAVE/XCR0 state (CPUID has XSAVE); the destination \
             takes legacy FPU state, no XCRs (CPUID has no XSAVE)"
        );
        let without = sample_record(2, no_xsave(cpuid()));
        let e = without
            .check_fits(2, &cpuid(), 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the record holds legacy FPU state"), "{e}");
        // The XSAVE size does not matter to a record without XSAVE.
        assert!(without.check_fits(2, &no_xsave(cpuid()), 8192).is_ok());
    }

    #[test]
    fn the_committed_version_1_record_still_decodes() {
        // fixtures/kvm/vcpu-state-2vcpu.bin: a version-1 record (also the fuzz seed). A format
        // change that breaks it must be deliberate (bump VERSION, keep reading version 1).
        let b = include_bytes!("../../../fixtures/kvm/vcpu-state-2vcpu.bin");
        let s = VmState::decode(b).expect("the committed record decodes");
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(s.encode(), b.to_vec(), "and re-encodes byte for byte");
        let c = vec![CpuidEntry {
            function: 1,
            index: 0,
            flags: 0,
            regs: [0x906ea, 0, 0x7ffafbff, 0xbfebfbff],
        }];
        assert_eq!(sample_record(2, c).encode(), b.to_vec());
    }
}
