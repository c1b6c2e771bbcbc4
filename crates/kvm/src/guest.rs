//! The self-verifying test VM: the guest image built from `guest/` (a flat multiboot image), its
//! loader, its port-I/O protocol, and [`TestVm`], which boots it (or prepares a VM to receive
//! it) and asks it to verify its working set.
//!
//! ```text
//!  port 0xe9 out8   text (QEMU's isa-debugcon takes the same port)
//!  port 0xea out32  event header: kind << 24 | cpu << 16 | data words
//!  port 0xec out32  event data words
//!  port 0xeb in32   command for this vCPU: 0 none, 1 verify, 2 halt (no device: all ones)
//!
//!  events  1 ready [pages, first page gpa]     2 progress [steps lo, hi, generation, next]
//!          3 verify done [pages, failures, steps lo, hi]
//!          4 verify failure [gpa, expected generation, found generation, log, reason]
//!          5 halted []                           6 bad configuration [cpus, pages]
//!          7 pass done [steps lo, hi]
//!          8 UART programmed [regs, fifo]        9 UART check [regs, fifo, regs read, fifo read]
//!                                                  (regs = lcr | mcr << 8 | scr << 16)
//!         10 exception [vector, error code, rip lo, hi, cr2 lo, hi] (then the vCPU halts)
//!
//!  guest memory: multiboot info 0x7000, command line 0x7100, image at 1 MiB,
//!                logs at 8 MiB (u32 generation per page), working sets from 16 MiB
//! ```
//!
//! Each vCPU writes its pages in order, stamping address, generation and checksum, logs the
//! generation, and advances its counter; on `verify` it checks every page against the log
//! and against its counter (pages before `next` hold the current generation, the others the
//! one before), so a page the migration lost is reported with its address. The same image boots
//! under QEMU (`-kernel`, `-append "cpus=1 pages=N period=T"`, `isa-debugcon` on 0xe9).
//!
//! With [`TestVmConfig::uart`] vCPU 0 also drives a 16550-style UART at that port base (the
//! VMM routes the ports, [`GuestMonitor::route`], e.g. to an assigned mtty's I/O BAR): it
//! programs LCR, MCR, SCR and four loop-back FIFO bytes of its own choosing at boot, and on
//! verify reads them back and reports what it found ([`GuestEvent::UartCheck`]), so device
//! state that did not migrate fails the guest's own check.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_segment;
use livemig::memory::GuestMemory;

use crate::Error;
use crate::memory::{Backing, VmMemory};
use crate::vm::{DirtyMode, PortIo, Vm, VmConfig, make_runnable, pause};

/// The guest image: a flat multiboot v1 image with address fields (built by `build.rs` from
/// `guest/`).
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

/// The guest's ports.
pub mod port {
    /// Text (8-bit writes).
    pub const TEXT: u16 = 0xe9;
    /// Event header.
    pub const EVENT: u16 = 0xea;
    /// Commands (32-bit reads).
    pub const COMMAND: u16 = 0xeb;
    /// Event data.
    pub const DATA: u16 = 0xec;
}

/// Commands.
pub mod command {
    /// Nothing to do.
    pub const NONE: u32 = 0;
    /// Verify the working set.
    pub const VERIFY: u32 = 1;
    /// Stop.
    pub const HALT: u32 = 2;
    /// Write the working set once (guests booted idle).
    pub const PASS: u32 = 3;
    /// Take an exception (`hlt` in ring 3: #GP), for the test of the exception reporter.
    pub const FAULT: u32 = 4;
    /// Triple-fault (the ring-0 handler of that #GP loads an empty IDT and executes `ud2`):
    /// the vCPU exits `KVM_EXIT_SHUTDOWN`, for the tests of a vCPU the VMM must report stopped.
    pub const SHUTDOWN: u32 = 5;
}

const MBI_ADDR: u64 = 0x7000;
/// The page tables livemig-kvm starts the vCPUs with: PML4, PDPT, four PDs mapping 4 GiB
/// identity in 2 MiB pages (as the image's own 32-bit entry builds them).
const PML4: u64 = 0x9000;
/// The GDT livemig-kvm gives the vCPUs (null, 64-bit code 0x08, data 0x10).
const GDT: u64 = 0x8000;
const CMDLINE_ADDR: u64 = 0x7100;
/// Each vCPU has its own TSS, `TSS_STRIDE * index` from GPA 0 (its RSP0 is its own exception
/// stack, which the guest's entry code sets), and all share one I/O permission bitmap at
/// `IOPB` that allows every port (Intel SDM vol. 1, 19.5.2; a TSS's bitmap offset may point
/// past its 104 bytes). The workload runs in ring 3 with IOPL 3, which allows port I/O without
/// the bitmap, but the KVM of the machines this was written on (a Linux 6.18 `-fc` host whose
/// guest user mode traps to the hypervisor) checks the bitmap for `in`/`out` through DX: with
/// a bare 0x68-byte TSS, ports past its limit (0x3f8 for one) made vCPU 0 triple-fault.
const TSS_STRIDE: u64 = 0x100;
/// The shared bitmap: 8 KiB (65536 ports), then the terminating all-ones byte.
const IOPB: u64 = 0x1000;
/// The TSS of vCPU `index`: (base, I/O map offset, limit).
fn tss_of(index: u32) -> (u64, u16, u32) {
    let base = TSS_STRIDE * u64::from(index);
    let iomap = (IOPB - base) as u16;
    (base, iomap, u32::from(iomap) + 8192)
}
const LOG_BASE: u64 = 8 << 20;
const WS_BASE: u64 = 16 << 20;
/// EAX for vCPUs other than the bootstrap one ("LMAP").
const AP_MAGIC: u64 = 0x4c4d_4150;
/// EAX of a multiboot v1 loader (Multiboot Specification 0.6.96, 3.2).
const MULTIBOOT_MAGIC: u64 = 0x2bad_b002;

/// Why a page failed verification (the guest's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// Magic, address or owner in the page header wrong.
    Header,
    /// The page holds another generation than its vCPU's counter says.
    Generation,
    /// The log disagrees with the counter.
    Log,
    /// Body or checksum wrong (a torn or stale page).
    Body,
    /// A code this build does not know.
    Unknown(u32),
}

impl From<u32> for FailReason {
    fn from(v: u32) -> Self {
        match v {
            1 => FailReason::Header,
            2 => FailReason::Generation,
            3 => FailReason::Log,
            4 => FailReason::Body,
            o => FailReason::Unknown(o),
        }
    }
}

/// What the guest reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// A vCPU started its workload.
    Ready {
        /// vCPU.
        cpu: u32,
        /// Pages it owns.
        pages: u32,
        /// Its first page's address.
        base: u32,
    },
    /// Progress.
    Progress {
        /// vCPU.
        cpu: u32,
        /// Pages written since boot.
        steps: u64,
        /// Generation being written.
        generation: u32,
    },
    /// A verification ended.
    VerifyDone {
        /// vCPU.
        cpu: u32,
        /// Pages checked.
        pages: u32,
        /// Pages that failed.
        failures: u32,
        /// Steps at the time.
        steps: u64,
    },
    /// A page failed verification.
    VerifyFail {
        /// vCPU.
        cpu: u32,
        /// The page's guest-physical address.
        gpa: u32,
        /// The generation it should hold.
        expected: u32,
        /// The generation in its header.
        found: u32,
        /// The log's generation for it.
        log: u32,
        /// Why.
        reason: FailReason,
    },
    /// A vCPU halted on command.
    Halted {
        /// vCPU.
        cpu: u32,
    },
    /// A vCPU finished the pass it was asked for.
    PassDone {
        /// vCPU.
        cpu: u32,
        /// Steps at the time.
        steps: u64,
    },
    /// The guest refused its command line.
    BadConfig {
        /// cpus=
        cpus: u32,
        /// pages=
        pages: u32,
    },
    /// vCPU 0 programmed the UART: `[lcr | mcr << 8 | scr << 16, FIFO bytes]`.
    UartSet {
        /// The two words.
        programmed: [u32; 2],
    },
    /// vCPU 0 read the UART back.
    UartCheck {
        /// What it programmed.
        expected: [u32; 2],
        /// What the device returned.
        found: [u32; 2],
    },
    /// The VM has a UART but vCPU 0 reported no check of it on verify (its record of what it
    /// programmed is gone).
    UartUnchecked,
    /// A vCPU took an exception in the workload (the guest's IDT reports it and halts that
    /// vCPU): what a triple fault would otherwise hide.
    Exception {
        /// vCPU (0xff: not on a workload stack).
        cpu: u32,
        /// Vector.
        vector: u32,
        /// Error code (0 for vectors without one).
        error: u32,
        /// The faulting instruction.
        rip: u64,
        /// CR2 (the faulting address of a page fault).
        cr2: u64,
    },
    /// An event the protocol does not define (kind, cpu, words).
    Malformed(u32, u32, Vec<u32>),
}

#[derive(Debug, Default)]
struct Decoder {
    header: Option<(u32, u32, usize)>,
    words: Vec<u32>,
}

/// Events kept: a long-running guest reports progress hundreds of times a second, so the log
/// keeps the most recent ones (and the latest step count per vCPU apart).
const RETAIN: usize = 4096;

#[derive(Debug, Default)]
struct Log {
    events: VecDeque<GuestEvent>,
    /// Events dropped from the front (the sequence number of `events[0]`).
    dropped: usize,
    /// The latest step count each vCPU reported.
    steps: Vec<u64>,
    text: String,
}

impl Log {
    /// The sequence number the next event will get.
    fn seq(&self) -> usize {
        self.dropped + self.events.len()
    }

    /// The retained events from sequence number `seq` on.
    fn since(&mut self, seq: usize) -> &[GuestEvent] {
        let skip = seq.saturating_sub(self.dropped).min(self.events.len());
        &self.events.make_contiguous()[skip..]
    }
}

/// A port range routed to another handler (an assigned device's I/O BAR).
struct Route {
    base: u16,
    len: u16,
    to: Arc<dyn PortIo>,
}

#[derive(Default)]
struct Routes(std::sync::RwLock<Vec<Route>>);

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.0.read().unwrap_or_else(|p| p.into_inner());
        f.debug_list()
            .entries(g.iter().map(|r| format!("{:#x}+{}", r.base, r.len)))
            .finish()
    }
}

impl Routes {
    fn find(&self, port: u16) -> Option<(Arc<dyn PortIo>, u16)> {
        let g = self.0.read().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r.to.clone(), r.base))
    }
}

/// The VMM side of the guest's ports: decodes events, keeps the console text, answers
/// commands, and hands routed port ranges to their handlers.
#[derive(Debug)]
pub struct GuestMonitor {
    routes: Routes,
    decoders: Mutex<Vec<Decoder>>,
    log: Mutex<Log>,
    cv: Condvar,
    commands: Vec<AtomicU32>,
}

impl GuestMonitor {
    /// A monitor for `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> GuestMonitor {
        GuestMonitor {
            routes: Routes::default(),
            decoders: Mutex::new((0..vcpus).map(|_| Decoder::default()).collect()),
            log: Mutex::new(Log {
                steps: vec![0; vcpus as usize],
                ..Log::default()
            }),
            cv: Condvar::new(),
            commands: (0..vcpus).map(|_| AtomicU32::new(command::NONE)).collect(),
        }
    }

    /// Routes ports `base..base + len` to `to`, which sees the port's offset from `base` as
    /// its port number (an I/O BAR is addressed from 0). Routes must not overlap the guest's
    /// own ports (0xe9..=0xec) or each other.
    pub fn route(&self, base: u16, len: u16, to: Arc<dyn PortIo>) -> Result<(), Error> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = |b: u32, e: u32| u32::from(base) < e && b < end;
        if len == 0 || end > 0x1_0000 || overlaps(u32::from(port::TEXT), u32::from(port::DATA) + 1)
        {
            return Err(Error::Config(format!(
                "port route {base:#x}+{len}: empty, past 0xffff or over the guest's ports                  0xe9..=0xec"
            )));
        }
        let mut g = self.routes.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = g
            .iter()
            .find(|r| overlaps(u32::from(r.base), u32::from(r.base) + u32::from(r.len)))
        {
            return Err(Error::Config(format!(
                "port route {base:#x}+{len} overlaps {:#x}+{}",
                r.base, r.len
            )));
        }
        g.push(Route { base, len, to });
        Ok(())
    }

    /// Removes every route (the routed ports then read as all ones), e.g. before the device
    /// behind them is closed.
    pub fn clear_routes(&self) {
        self.routes
            .0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recent events (at most 4096).
    pub fn events(&self) -> Vec<GuestEvent> {
        self.lock().events.iter().cloned().collect()
    }

    /// The console text so far.
    pub fn text(&self) -> String {
        self.lock().text.clone()
    }

    /// Queues `cmd` for every vCPU.
    pub fn command_all(&self, cmd: u32) {
        for c in &self.commands {
            c.store(cmd, Ordering::SeqCst);
        }
    }

    /// Waits until `pred` holds for the log, or `timeout`; on timeout, the retained events.
    fn wait_log(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&mut Log) -> bool,
    ) -> Result<(), Vec<GuestEvent>> {
        let end = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if pred(&mut g) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= end {
                return Err(g.events.iter().cloned().collect());
            }
            g = self
                .cv
                .wait_timeout(g, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until `pred` holds for the retained events, or `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[GuestEvent]) -> bool,
    ) -> Result<(), Vec<GuestEvent>> {
        self.wait_log(timeout, |l| pred(l.since(0)))
    }

    /// Sends `cmd` to every vCPU and waits until each has reported an event `done`; returns
    /// the events since the command.
    fn command_and_wait(
        &self,
        cmd: u32,
        done: fn(&GuestEvent) -> bool,
        timeout: Duration,
    ) -> Result<Vec<GuestEvent>, Vec<GuestEvent>> {
        let before = self.lock().seq();
        self.command_all(cmd);
        let n = self.commands.len();
        let mut out = Vec::new();
        self.wait_log(timeout, |l| {
            let ev = l.since(before);
            if ev.iter().filter(|e| done(e)).count() >= n {
                out = ev.to_vec();
                return true;
            }
            false
        })?;
        Ok(out)
    }

    /// The latest step count each vCPU reported (0 if none yet).
    pub fn steps(&self) -> Vec<u64> {
        self.lock().steps.clone()
    }

    fn push(&self, e: GuestEvent) {
        let mut g = self.lock();
        if let GuestEvent::Progress { cpu, steps, .. }
        | GuestEvent::VerifyDone { cpu, steps, .. }
        | GuestEvent::PassDone { cpu, steps } = &e
            && let Some(s) = g.steps.get_mut(*cpu as usize)
        {
            *s = (*s).max(*steps);
        }
        g.events.push_back(e);
        if g.events.len() > RETAIN {
            g.events.pop_front();
            g.dropped += 1;
        }
        drop(g);
        self.cv.notify_all();
    }

    fn decode(kind: u32, cpu: u32, w: Vec<u32>) -> GuestEvent {
        let q = |i: usize| u64::from(w[i]);
        match (kind, w.len()) {
            (1, 2) => GuestEvent::Ready {
                cpu,
                pages: w[0],
                base: w[1],
            },
            (2, 4) => GuestEvent::Progress {
                cpu,
                steps: q(0) | q(1) << 32,
                generation: w[2],
            },
            (3, 4) => GuestEvent::VerifyDone {
                cpu,
                pages: w[0],
                failures: w[1],
                steps: q(2) | q(3) << 32,
            },
            (4, 5) => GuestEvent::VerifyFail {
                cpu,
                gpa: w[0],
                expected: w[1],
                found: w[2],
                log: w[3],
                reason: w[4].into(),
            },
            (5, 0) => GuestEvent::Halted { cpu },
            (7, 2) => GuestEvent::PassDone {
                cpu,
                steps: q(0) | q(1) << 32,
            },
            (10, 6) => GuestEvent::Exception {
                cpu,
                vector: w[0],
                error: w[1],
                rip: q(2) | q(3) << 32,
                cr2: q(4) | q(5) << 32,
            },
            (8, 2) => GuestEvent::UartSet {
                programmed: [w[0], w[1]],
            },
            (9, 4) => GuestEvent::UartCheck {
                expected: [w[0], w[1]],
                found: [w[2], w[3]],
            },
            (6, 2) => GuestEvent::BadConfig {
                cpus: w[0],
                pages: w[1],
            },
            _ => GuestEvent::Malformed(kind, cpu, w),
        }
    }
}

impl PortIo for GuestMonitor {
    fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) {
        if let Some((to, base)) = self.routes.find(port) {
            return to.io_out(vcpu, port - base, data);
        }
        let word = |d: &[u8]| {
            let mut b = [0u8; 4];
            let n = d.len().min(4);
            b[..n].copy_from_slice(&d[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            port::TEXT => {
                let mut g = self.lock();
                g.text.push_str(&String::from_utf8_lossy(data));
                // Bounded: a chatty guest cannot grow the VMM without limit.
                if g.text.len() > 1 << 20 {
                    let cut = g.text.len() - (1 << 19);
                    let cut = (cut..g.text.len())
                        .find(|&i| g.text.is_char_boundary(i))
                        .unwrap_or(0);
                    g.text.drain(..cut);
                }
            }
            port::EVENT | port::DATA => {
                let done = {
                    let mut ds = self.decoders.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(d) = ds.get_mut(vcpu as usize) else {
                        return;
                    };
                    if port == port::EVENT {
                        let h = word(data);
                        d.header = Some((h >> 24, (h >> 16) & 0xff, (h & 0xffff) as usize));
                        d.words.clear();
                    } else if d.header.is_some() {
                        d.words.push(word(data));
                    }
                    match d.header {
                        Some((k, c, n)) if d.words.len() >= n && n <= 16 => {
                            d.header = None;
                            Some((k, c, std::mem::take(&mut d.words)))
                        }
                        Some((k, c, n)) if n > 16 => {
                            d.header = None;
                            Some((k, c, vec![n as u32]))
                        }
                        _ => None,
                    }
                };
                if let Some((k, c, w)) = done {
                    self.push(Self::decode(k, c, w));
                }
            }
            _ => {}
        }
    }

    fn io_in(&self, vcpu: u32, port: u16, data: &mut [u8]) {
        if let Some((to, base)) = self.routes.find(port) {
            return to.io_in(vcpu, port - base, data);
        }
        let v = match (port, self.commands.get(vcpu as usize)) {
            (port::COMMAND, Some(c)) => c.swap(command::NONE, Ordering::SeqCst),
            _ => u32::MAX,
        };
        let b = v.to_le_bytes();
        for (i, x) in data.iter_mut().enumerate() {
            *x = b.get(i).copied().unwrap_or(0xff);
        }
    }
}

/// Where the image wants to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageEntry {
    /// The multiboot entry (32-bit protected mode; QEMU `-kernel` enters here).
    pub entry32: u32,
    /// The 64-bit entry livemig-kvm starts vCPUs at.
    pub entry64: u32,
}

/// Finds the multiboot v1 header with address fields in the first 8 KiB of `img` (Multiboot
/// Specification 0.6.96, 3.1: magic 0x1BADB002, flags, checksum, then with flags bit 16
/// header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr), followed by this
/// image's "LM64" field (the 64-bit entry).
pub fn parse_image(img: &[u8]) -> Result<(usize, [u32; 5], ImageEntry), Error> {
    let bad = |what: String| Error::Image(what);
    let w = |o: usize| {
        img.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let at = (0..img.len().min(8192).saturating_sub(12))
        .step_by(4)
        .find(|&o| w(o) == Some(0x1bad_b002))
        .ok_or_else(|| bad("no multiboot header in the first 8 KiB".into()))?;
    let (flags, sum) = (w(at + 4).unwrap_or(0), w(at + 8).unwrap_or(1));
    if 0x1bad_b002u32.wrapping_add(flags).wrapping_add(sum) != 0 {
        return Err(bad(format!(
            "multiboot header at {at}: checksum does not sum to 0"
        )));
    }
    if flags & (1 << 16) == 0 {
        return Err(bad(
            "multiboot header without address fields (flags bit 16)".into(),
        ));
    }
    let mut f = [0u32; 5];
    for (i, x) in f.iter_mut().enumerate() {
        *x = w(at + 12 + 4 * i).ok_or_else(|| bad("truncated multiboot header".into()))?;
    }
    if img.get(at + 32..at + 36) != Some(b"LM64") {
        return Err(bad("no LM64 field after the multiboot header".into()));
    }
    let entry64 = w(at + 36).ok_or_else(|| bad("truncated LM64 field".into()))?;
    Ok((
        at,
        f,
        ImageEntry {
            entry32: f[4],
            entry64,
        },
    ))
}

/// Loads the flat image as a multiboot loader would (the file from the header's position
/// back to `load_addr`, up to `load_end_addr`, then zeroes up to `bss_end_addr`).
pub fn load_image(mem: &VmMemory, img: &[u8]) -> Result<ImageEntry, Error> {
    let (at, [header, load, load_end, bss_end, _], entry) = parse_image(img)?;
    let bad = |what: &str| Error::Image(format!("multiboot address fields: {what}"));
    let start = (at as u64)
        .checked_sub(u64::from(
            header
                .checked_sub(load)
                .ok_or_else(|| bad("header before load"))?,
        ))
        .ok_or_else(|| bad("load address before the file start"))? as usize;
    if load_end < load || bss_end < load_end {
        return Err(bad("ends before starts"));
    }
    let len = (load_end - load) as usize;
    let data = img
        .get(start..start + len)
        .ok_or_else(|| bad("the loaded part runs past the end of the file"))?;
    mem.write(u64::from(load), data)
        .map_err(|e| Error::Image(format!("loading at {load:#x}: {e}")))?;
    mem.zero(u64::from(load_end), u64::from(bss_end - load_end))
        .map_err(|e| Error::Image(format!("zeroing bss at {load_end:#x}: {e}")))?;
    for e in [entry.entry32, entry.entry64] {
        if e < load || e >= load_end {
            return Err(bad("an entry point outside the loaded part"));
        }
    }
    Ok(entry)
}

/// TSC ticks between two page writes of one vCPU writing `rate` pages per second on a TSC of
/// `tsc_khz` kHz: the guest's `period=` (0, as fast as it can, for a rate of 0).
pub fn period_ticks(tsc_khz: u32, rate: u64) -> u64 {
    (u64::from(tsc_khz) * 1000)
        .checked_div(rate)
        .map_or(0, |p| p.max(1))
}

/// The guest's command line (what livemig-kvm passes through the multiboot information, and
/// what QEMU's `-append` takes): `cpus=N pages=N period=TICKS idle=0|1`.
pub fn cmdline(vcpus: u32, pages: u32, period: u64, idle: bool) -> String {
    format!(
        "cpus={vcpus} pages={pages} period={period} idle={}",
        u8::from(idle)
    )
}

/// What the command line adds for vCPU 0 to start the others with INIT-SIPI-SIPI
/// ([`ApStart::Sipi`]; always so under QEMU, whose APs wait for it): ` sipi=1 tsc_khz=N`, the
/// TSC rate timing the waits between the IPIs.
pub fn cmdline_sipi(tsc_khz: u32) -> String {
    format!(" sipi=1 tsc_khz={tsc_khz}")
}

/// The TSC frequency (kHz) KVM gives a new vCPU on this host: what the test guest's `period`
/// counts in under livemig-kvm, and under QEMU with KVM when no `tsc-frequency` is set.
pub fn host_tsc_khz() -> Result<u32, Error> {
    let kerr = |what: &'static str| {
        move |e: kvm_ioctls::Error| Error::Kvm {
            what: what.into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    };
    let kvm = kvm_ioctls::Kvm::new().map_err(kerr("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
    let vcpu = vm.create_vcpu(0).map_err(kerr("KVM_CREATE_VCPU"))?;
    vcpu.get_tsc_khz().map_err(kerr("KVM_GET_TSC_KHZ"))
}

/// How the test VM is built.
#[derive(Debug, Clone)]
pub struct TestVmConfig {
    /// vCPUs, each running the workload.
    pub vcpus: u32,
    /// Working-set pages per vCPU.
    pub pages: u32,
    /// Pages per second per vCPU (0: as fast as it can).
    pub rate: u64,
    /// RAM ranges `(gpa, size)`; the first must hold the working sets.
    pub ram: Vec<(u64, u64)>,
    /// What backs RAM.
    pub backing: Backing,
    /// Dirty logging.
    pub dirty: DirtyMode,
    /// CPUID bits to clear (see [`VmConfig::cpuid_clear`]).
    pub cpuid_clear: Vec<(u32, u32, u8, u32)>,
    /// CPUID bits to set (see [`VmConfig::cpuid_set`]).
    pub cpuid_set: Vec<(u32, u32, u8, u32)>,
    /// Boot idle: the vCPUs write only when [`TestVm::pass`] asks (one pass each).
    pub idle: bool,
    /// The port base of a 16550-style UART vCPU 0 programs and checks (`None`: no UART).
    /// The VMM routes `base..base + 8` ([`GuestMonitor::route`]) before [`TestVm::start`].
    pub uart: Option<u16>,
    /// How the vCPUs other than vCPU 0 start.
    pub ap_start: ApStart,
}

/// How the test guest's application processors (every vCPU but 0) start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApStart {
    /// As on a real machine: they wait in KVM's wait-for-SIPI state until vCPU 0 sends
    /// INIT-SIPI-SIPI through its in-kernel local APIC; each starts in real mode at the guest's
    /// trampoline and makes its own way to long mode (what the guest does under QEMU).
    #[default]
    Sipi,
    /// livemig-kvm sets every vCPU up in 64-bit mode at the image's entry and makes it
    /// runnable directly.
    Direct,
}

impl Default for TestVmConfig {
    fn default() -> Self {
        TestVmConfig {
            vcpus: 2,
            pages: 4096,
            rate: 20_000,
            ram: vec![(0, 128 << 20), (4 << 30, 64 << 20)],
            backing: Backing::Anonymous,
            dirty: DirtyMode::Auto,
            cpuid_clear: Vec::new(),
            cpuid_set: Vec::new(),
            idle: false,
            uart: None,
            ap_start: ApStart::default(),
        }
    }
}

impl TestVmConfig {
    /// Checks the working sets fit the first RAM range and the guest's limits.
    pub fn validate(&self) -> Result<(), Error> {
        let need = WS_BASE + u64::from(self.vcpus) * u64::from(self.pages) * 4096;
        let logs = u64::from(self.vcpus) * u64::from(self.pages) * 4;
        if self.vcpus == 0 || self.vcpus > 8 || self.pages == 0 {
            return Err(Error::Config(format!(
                "test VM: {} vCPUs x {} pages (1..=8 vCPUs, at least one page)",
                self.vcpus, self.pages
            )));
        }
        if logs > WS_BASE - LOG_BASE {
            return Err(Error::Config(format!(
                "test VM: {} pages in all exceed the guest's log area (2 Mi pages)",
                u64::from(self.vcpus) * u64::from(self.pages)
            )));
        }
        match self.ram.first() {
            Some(&(0, size)) if size >= need && size <= 3 << 30 => Ok(()),
            _ => Err(Error::Config(format!(
                "test VM: the first RAM range must start at 0, hold {need:#x} bytes for the working \
                 sets and end below 3 GiB (got {:x?})",
                self.ram
            ))),
        }
    }
}

/// The test VM: a [`Vm`] running (or ready to receive) the guest, with its monitor.
#[derive(Debug)]
pub struct TestVm {
    /// The VM.
    pub vm: Vm,
    /// The guest's reports.
    pub monitor: Arc<GuestMonitor>,
    /// How it was built.
    pub cfg: TestVmConfig,
}

fn flat(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl TestVm {
    fn build(cfg: &TestVmConfig) -> Result<TestVm, Error> {
        cfg.validate()?;
        let memory = Arc::new(VmMemory::new(&cfg.ram, cfg.backing.clone())?);
        let vm = Vm::new(
            memory,
            &VmConfig {
                vcpus: cfg.vcpus,
                dirty: cfg.dirty,
                cpuid_clear: cfg.cpuid_clear.clone(),
                cpuid_set: cfg.cpuid_set.clone(),
            },
        )?;
        let monitor = Arc::new(GuestMonitor::new(cfg.vcpus));
        vm.set_io(monitor.clone());
        Ok(TestVm {
            vm,
            monitor,
            cfg: cfg.clone(),
        })
    }

    /// A VM that will receive a migrated test VM: same layout, vCPUs parked until the
    /// migration's vCPU state device starts them.
    pub fn incoming(cfg: &TestVmConfig) -> Result<TestVm, Error> {
        TestVm::build(cfg)
    }

    /// Boots the guest and waits until every vCPU reports its workload started.
    pub fn boot(cfg: &TestVmConfig) -> Result<TestVm, Error> {
        let t = TestVm::build(cfg)?;
        t.start()?;
        Ok(t)
    }

    /// The VM, built and not yet started: its memory can be mapped for devices and its ports
    /// routed ([`GuestMonitor::route`]) before [`TestVm::start`] boots the guest.
    pub fn prepare(cfg: &TestVmConfig) -> Result<TestVm, Error> {
        TestVm::build(cfg)
    }

    /// Loads and boots the guest of a [`TestVm::prepare`]d VM and waits until every vCPU
    /// reports its workload started (and vCPU 0 its UART programmed, with
    /// [`TestVmConfig::uart`]).
    pub fn start(&self) -> Result<(), Error> {
        let t = self;
        let cfg = &self.cfg;
        let mem = t.vm.memory();
        let entry = load_image(mem, IMAGE)?.entry64;
        let tsc_khz = t.vm.vcpus()[0].fd().get_tsc_khz().map_err(|e| Error::Kvm {
            what: "KVM_GET_TSC_KHZ".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let mut cmdline = cmdline(
            cfg.vcpus,
            cfg.pages,
            period_ticks(tsc_khz, cfg.rate),
            cfg.idle,
        );
        if let Some(base) = cfg.uart {
            cmdline += &format!(" uart={base}");
        }
        let sipi = cfg.ap_start == ApStart::Sipi && cfg.vcpus > 1;
        if sipi {
            cmdline += &cmdline_sipi(tsc_khz);
        }
        cmdline.push('\0');
        let mut mbi = [0u8; 32];
        mbi[0..4].copy_from_slice(&4u32.to_le_bytes()); // flags: cmdline valid
        mbi[16..20].copy_from_slice(&(CMDLINE_ADDR as u32).to_le_bytes());
        let werr = |e: livemig::memory::MemoryError| Error::Image(format!("boot data: {e}"));
        mem.write(MBI_ADDR, &mbi).map_err(werr)?;
        let mut tables = vec![0u8; 6 * 4096];
        // Present | writable | user at every level: the workload runs in ring 3.
        tables[0..8].copy_from_slice(&((PML4 + 0x1000) | 7).to_le_bytes());
        for k in 0..4u64 {
            let o = 4096 + 8 * k as usize;
            tables[o..o + 8].copy_from_slice(&((PML4 + 0x2000 + k * 0x1000) | 7).to_le_bytes());
        }
        for i in 0..2048u64 {
            let o = 2 * 4096 + 8 * i as usize;
            tables[o..o + 8].copy_from_slice(&((i << 21) | 0x87).to_le_bytes());
        }
        mem.write(PML4, &tables).map_err(werr)?;
        let gdt: [u64; 5] = [
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00af_fa00_0000_ffff,
            0x00cf_f200_0000_ffff,
        ];
        let gdt: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
        mem.write(GDT, &gdt).map_err(werr)?;
        mem.write(CMDLINE_ADDR, cmdline.as_bytes()).map_err(werr)?;
        let mut tss = vec![0u8; IOPB as usize + 8192 + 1];
        for i in 0..cfg.vcpus {
            let (base, iomap, _) = tss_of(i);
            let at = base as usize + 0x66;
            tss[at..at + 2].copy_from_slice(&iomap.to_le_bytes());
        }
        tss[IOPB as usize + 8192] = 0xff;
        mem.write(0, &tss).map_err(werr)?;
        for v in t.vm.vcpus() {
            let fd = v.fd();
            let kerr = |what: &'static str| {
                move |e: kvm_ioctls::Error| Error::Kvm {
                    what: format!("{what} on vCPU {}", v.index),
                    source: std::io::Error::from_raw_os_error(e.errno()),
                }
            };
            // MTRRs enabled with write-back as the default type (IA32_MTRR_DEF_TYPE, MSR 0x2ff:
            // bit 11 E, bits 7:0 type 6 = WB; Intel SDM vol. 3A, 12.11.2.1). At reset E is 0,
            // which makes all memory uncacheable, as firmware would otherwise fix. INIT keeps
            // the MTRRs (SDM vol. 3A, table 9-1), so an AP started by SIPI has them too.
            let mtrr = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: 0x2ff,
                data: (1 << 11) | 6,
                ..Default::default()
            }])
            .map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
            fd.set_msrs(&mtrr)
                .map_err(kerr("KVM_SET_MSRS (IA32_MTRR_DEF_TYPE)"))?;
            if sipi && v.index != 0 {
                // Left as KVM created it: an AP in wait-for-SIPI (KVM_MP_STATE_UNINITIALIZED),
                // which only the in-kernel local APIC's INIT and start-up IPIs move on.
                continue;
            }
            let mut s = fd.get_sregs().map_err(kerr("KVM_GET_SREGS"))?;
            s.gdt.base = GDT;
            s.gdt.limit = 39;
            s.cs = flat(0x08, true);
            s.cs.l = 1;
            s.cs.db = 0;
            s.ds = flat(0x10, false);
            s.es = s.ds;
            s.fs = s.ds;
            s.gs = s.ds;
            s.ss = s.ds;
            // A valid busy 32-bit TSS and an unusable LDT: without unrestricted-guest support
            // (nested VMX) KVM would otherwise emulate every instruction of a guest whose
            // segment state VM entry refuses (Intel SDM vol. 3C, 28.3.1.2). The TSS carries
            // the shared all-clear I/O permission bitmap (see `tss_of`).
            let (tss_base, _, tss_limit) = tss_of(v.index);
            s.tr = kvm_segment {
                base: tss_base,
                limit: tss_limit,
                selector: 0,
                type_: 11,
                present: 1,
                dpl: 0,
                db: 0,
                s: 0,
                l: 0,
                g: 0,
                avl: 0,
                unusable: 0,
                padding: 0,
            };
            s.ldt = kvm_segment {
                unusable: 1,
                ..s.ldt
            };
            // 64-bit mode with the identity tables above, as the image's 32-bit entry would leave
            // it: CR0 PG|PE|ET, CR4 PAE, EFER LME|LMA.
            s.cr0 = 0x8000_0011;
            s.cr3 = PML4;
            s.cr4 = 0x20;
            s.efer = 0x500;
            fd.set_sregs(&s).map_err(kerr("KVM_SET_SREGS"))?;
            let mut r = fd.get_regs().map_err(kerr("KVM_GET_REGS"))?;
            r.rip = u64::from(entry);
            r.rflags = 2;
            if v.index == 0 {
                r.rax = MULTIBOOT_MAGIC;
                r.rbx = MBI_ADDR;
            } else {
                r.rax = AP_MAGIC;
                r.rbx = u64::from(v.index);
            }
            fd.set_regs(&r).map_err(kerr("KVM_SET_REGS"))?;
            make_runnable(&fd).map_err(kerr("KVM_SET_MP_STATE"))?;
        }
        t.vm.unpause(pause::START);
        let n = cfg.vcpus as usize;
        t.monitor
            .wait_for(Duration::from_secs(20), |ev| {
                ev.iter()
                    .filter(|e| matches!(e, GuestEvent::Ready { .. }))
                    .count()
                    >= n
                    || ev.iter().any(|e| matches!(e, GuestEvent::BadConfig { .. }))
            })
            .map_err(|ev| {
                Error::Guest(format!(
                    "the guest did not start within 20 s (events {ev:?}, console {:?}, vCPU \
                     failures {:?})",
                    t.monitor.text(),
                    t.vm.failures()
                ))
            })?;
        if let Some(e) = t
            .monitor
            .events()
            .into_iter()
            .find(|e| matches!(e, GuestEvent::BadConfig { .. }))
        {
            return Err(Error::Guest(format!(
                "the guest refused its configuration: {e:?}"
            )));
        }
        Ok(())
    }

    /// What vCPU 0 programmed into its UART (`None`: no UART, or not reported).
    pub fn uart_programmed(&self) -> Option<[u32; 2]> {
        self.monitor.events().into_iter().find_map(|e| match e {
            GuestEvent::UartSet { programmed } => Some(programmed),
            _ => None,
        })
    }

    /// Asks every vCPU to verify its working set; returns the failures (empty: all good).
    pub fn verify(&self, timeout: Duration) -> Result<Vec<GuestEvent>, Error> {
        let ev = self
            .monitor
            .command_and_wait(
                command::VERIFY,
                |e| matches!(e, GuestEvent::VerifyDone { .. }),
                timeout,
            )
            .map_err(|_| {
                Error::Guest(format!(
                    "verification did not finish within {timeout:?} (vCPU failures {:?}; \
                     console {:?})",
                    self.vm.failures(),
                    self.monitor.text()
                ))
            })?;
        let uart_checked = ev.iter().any(|e| matches!(e, GuestEvent::UartCheck { .. }));
        let mut bad: Vec<GuestEvent> = ev
            .into_iter()
            .filter(|e| {
                matches!(e, GuestEvent::VerifyFail { .. })
                    || matches!(e, GuestEvent::VerifyDone { failures, .. } if *failures > 0)
                    || matches!(e, GuestEvent::UartCheck { expected, found } if expected != found)
            })
            .collect();
        if self.cfg.uart.is_some() && !uart_checked {
            bad.push(GuestEvent::UartUnchecked);
        }
        Ok(bad)
    }

    /// Has every vCPU write its working set once (a VM booted `idle`) and waits for all.
    pub fn pass(&self, timeout: Duration) -> Result<(), Error> {
        self.monitor
            .command_and_wait(
                command::PASS,
                |e| matches!(e, GuestEvent::PassDone { .. }),
                timeout,
            )
            .map(drop)
            .map_err(|_| {
                Error::Guest(format!(
                    "the pass did not finish within {timeout:?} (vCPU failures {:?})",
                    self.vm.failures()
                ))
            })
    }

    /// Waits until every vCPU reported more than `steps[cpu]` steps.
    pub fn wait_progress(&self, steps: &[u64], timeout: Duration) -> Result<Vec<u64>, Error> {
        self.monitor
            .wait_log(timeout, |l| {
                l.steps.len() == steps.len() && l.steps.iter().zip(steps).all(|(n, w)| n > w)
            })
            .map_err(|_| {
                Error::Guest(format!(
                    "the guest made no progress past {steps:?} within {timeout:?} (now {:?}; \
                     vCPU failures {:?})",
                    self.monitor.steps(),
                    self.vm.failures()
                ))
            })?;
        Ok(self.monitor.steps())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_a_multiboot_image_with_address_fields() {
        let (at, f, e) = parse_image(IMAGE).unwrap();
        assert!(at < 8192 && at % 4 == 0);
        assert_eq!(f[1], 0x10_0000, "loaded at 1 MiB");
        assert!(e.entry32 >= f[1] && e.entry64 > e.entry32);
        let mem = VmMemory::new(&[(0, 32 << 20)], Backing::Anonymous).unwrap();
        assert_eq!(load_image(&mem, IMAGE).unwrap(), e);
        let mut head = [0u8; 16];
        mem.read(0x10_0000, &mut head).unwrap();
        assert_eq!(&head[..], &IMAGE[..16]);
        assert!(load_image(&mem, &IMAGE[..40]).is_err());
        let mut wrong = IMAGE.to_vec();
        wrong[at + 8] ^= 1;
        assert!(
            load_image(&mem, &wrong)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
    }

    #[test]
    fn period_and_cmdline_match_the_guests_parser() {
        // 2.5 GHz: 20 000 pages/s is one page every 125 000 ticks.
        assert_eq!(period_ticks(2_500_000, 20_000), 125_000);
        assert_eq!(period_ticks(2_500_000, 0), 0, "0: as fast as it can");
        assert_eq!(
            period_ticks(1, u64::MAX),
            1,
            "never 0 (which would mean unpaced)"
        );
        assert_eq!(
            cmdline(1, 1024, 125_000, false),
            "cpus=1 pages=1024 period=125000 idle=0"
        );
        assert_eq!(cmdline(2, 8, 0, true), "cpus=2 pages=8 period=0 idle=1");
    }

    #[test]
    fn events_decode_and_malformed_ones_are_kept() {
        let m = GuestMonitor::new(2);
        m.io_out(
            1,
            port::EVENT,
            &((2u32 << 24) | (1 << 16) | 4).to_le_bytes(),
        );
        for w in [5u32, 1, 3, 7] {
            m.io_out(1, port::DATA, &w.to_le_bytes());
        }
        m.io_out(0, port::EVENT, &((9u32 << 24) | 1).to_le_bytes());
        m.io_out(0, port::DATA, &[1, 0, 0, 0]);
        m.io_out(0, port::TEXT, b"hi");
        assert_eq!(
            m.events(),
            [
                GuestEvent::Progress {
                    cpu: 1,
                    steps: (1 << 32) | 5,
                    generation: 3
                },
                GuestEvent::Malformed(9, 0, vec![1])
            ]
        );
        assert_eq!(m.text(), "hi");
        assert_eq!(m.steps(), [0, (1 << 32) | 5]);
        m.command_all(command::VERIFY);
        let mut b = [0u8; 4];
        m.io_in(1, port::COMMAND, &mut b);
        assert_eq!(u32::from_le_bytes(b), command::VERIFY);
        m.io_in(1, port::COMMAND, &mut b);
        assert_eq!(
            u32::from_le_bytes(b),
            command::NONE,
            "a command is taken once"
        );
        m.io_in(7, port::COMMAND, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
