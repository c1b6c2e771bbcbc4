//! A KVM virtual machine: memory slots, vCPU threads that can be paused and throttled without
//! losing an exit, and the dirty-logging mechanism chosen at creation.
//!
//! ```text
//!  vCPU thread i:  loop { park while a pause reason is set ; KVM_RUN ; handle the exit }
//!  pause(reason):  set the reason, immediate_exit = 1, signal the thread, wait until parked
//!  parking:        one more KVM_RUN with immediate_exit = 1 completes a pending PIO/MMIO
//!                  (api.rst: "userspace should ensure that the operation is completed before
//!                  performing a live migration"), then the thread waits without the vCPU fd
//! ```

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_EXIT_DIRTY_RING_FULL, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE, kvm_enable_cap, kvm_mp_state, kvm_run,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::Error;
use crate::memory::VmMemory;
use crate::sys::{self, RingMap};

/// How vCPU writes are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyMode {
    /// The dirty ring where KVM has it, else the bitmap.
    #[default]
    Auto,
    /// `KVM_GET_DIRTY_LOG` (with manual protection where available).
    Bitmap,
    /// The dirty ring with this many entries per vCPU (a power of two).
    Ring(u32),
}

impl std::str::FromStr for DirtyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DirtyMode::Auto),
            "bitmap" => Ok(DirtyMode::Bitmap),
            "ring" => Ok(DirtyMode::Ring(DEFAULT_RING_ENTRIES)),
            other => match other.strip_prefix("ring:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(DirtyMode::Ring(n)),
                _ => Err(format!(
                    "unknown dirty logging mode {other:?} (expected auto, bitmap, ring or \
                     ring:ENTRIES)"
                )),
            },
        }
    }
}

/// Ring entries per vCPU when the mode does not say (64 KiB of ring).
pub const DEFAULT_RING_ENTRIES: u32 = 4096;

/// The mechanism in use, as probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// The dirty bitmap.
    Bitmap {
        /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is on: GET does not clear, CLEAR re-protects.
        manual_protect: bool,
        /// `KVM_DIRTY_LOG_INITIALLY_SET`: the log starts all-dirty, protection is lazy.
        initially_set: bool,
    },
    /// The per-vCPU dirty ring.
    Ring {
        /// Entries per vCPU.
        entries: u32,
        /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (else the x86 TSO variant).
        acq_rel: bool,
    },
}

/// The choice of mechanism and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyChoice {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// Why it was chosen.
    pub reason: String,
}

/// Handles port I/O of the guest (the VMM's devices).
pub trait PortIo: Send + Sync {
    /// `out` of `data` to `port` by vCPU `vcpu`.
    fn io_out(&self, vcpu: u32, port: u16, data: &[u8]);
    /// `in` from `port` into `data` by vCPU `vcpu` (unanswered ports read as all ones).
    fn io_in(&self, vcpu: u32, port: u16, data: &mut [u8]);
}

/// How a VM is built.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// vCPUs (1..=8).
    pub vcpus: u32,
    /// Dirty logging mechanism.
    pub dirty: DirtyMode,
    /// CPUID changes applied to every vCPU after KVM's supported set: (leaf, subleaf,
    /// register 0..=3 for eax..edx, bits to clear). For tests of a mismatched CPU model.
    pub cpuid_clear: Vec<(u32, u32, u8, u32)>,
    /// Bits to set, in the same form, applied after `cpuid_clear`: a CPU model with a feature
    /// KVM's supported set leaves out (this machine's KVM offers no XSAVE in leaf 1 although
    /// the host has it). KVM takes the bits as given (KVM_SET_CPUID2, api.rst).
    pub cpuid_set: Vec<(u32, u32, u8, u32)>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 2,
            dirty: DirtyMode::Auto,
            cpuid_clear: Vec::new(),
            cpuid_set: Vec::new(),
        }
    }
}

/// Why vCPUs are kept out of the guest (any reason set parks them).
pub mod pause {
    /// Not started yet (a destination before it resumes).
    pub const START: u32 = 1;
    /// The migration engine (stop-and-copy) or the VMM.
    pub const ENGINE: u32 = 2;
    /// Auto-converge throttling.
    pub const THROTTLE: u32 = 4;
    /// The VM is being torn down.
    pub const EXIT: u32 = 8;
    /// Paused by its operator (QEMU's `stop` or `-S`): the vCPUs stay parked through a
    /// migration, whose engine pauses and resumes only under [`ENGINE`].
    pub const OPERATOR: u32 = 16;
}

#[derive(Debug, Default)]
struct Park {
    reasons: u32,
    parked: Vec<bool>,
}

/// One vCPU as the other threads see it.
#[derive(Debug)]
pub struct Vcpu {
    /// Its index (and APIC ID).
    pub index: u32,
    fd: Mutex<VcpuFd>,
    run: *mut kvm_run,
    pthread: AtomicU64,
    ring: Option<Mutex<(RingMap, u32)>>,
    /// `KVM_RUN` calls made to run guest code (the parked thread's completion calls, made
    /// with `immediate_exit` set, are not counted).
    entries: AtomicU64,
}

// SAFETY: `run` points at the vCPU's kvm_run mapping, owned by `fd` for the life of this
// object; other threads only touch its `immediate_exit` byte, atomically.
unsafe impl Send for Vcpu {}
// SAFETY: as above.
unsafe impl Sync for Vcpu {}

impl Vcpu {
    /// The vCPU fd, for state access while the vCPU is parked.
    pub fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: `run` is valid while self lives (see the Send impl); immediate_exit is a
        // u8 field, so always aligned for AtomicU8; KVM reads it only on entry to KVM_RUN.
        unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*self.run).immediate_exit)) }
    }

    /// Collects this vCPU's dirty ring (see [`RingMap::collect`]).
    pub(crate) fn collect_ring(&self, f: impl FnMut(u32, u64)) -> u32 {
        match &self.ring {
            Some(r) => {
                let mut g = r.lock().unwrap_or_else(|p| p.into_inner());
                let (map, next) = &mut *g;
                map.collect(next, f)
            }
            None => 0,
        }
    }
}

/// State shared by the VM's threads.
pub(crate) struct Shared {
    pub(crate) vm: VmFd,
    pub(crate) memory: Arc<VmMemory>,
    pub(crate) vcpus: Vec<Arc<Vcpu>>,
    pub(crate) dirty: DirtyChoice,
    pub(crate) slots_logging: Mutex<bool>,
    park: Mutex<Park>,
    park_cv: Condvar,
    failures: Mutex<Vec<String>>,
    /// Exits to userspace (KVM_RUN returns).
    pub(crate) exits: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled.
    pub(crate) ring_full_exits: AtomicU64,
    /// Ring entries collected by vCPU threads at ring-full exits, waiting for the harvest.
    pub(crate) spilled: Mutex<Vec<(u32, u64)>>,
    io: Mutex<Option<Arc<dyn PortIo>>>,
    throttle: AtomicU8,
    /// CLOCK_REALTIME ns when the engine's last pause had every vCPU parked (0: never).
    pub(crate) engine_paused_at: AtomicU64,
    /// Set by the destination's start: the next guest entry of any vCPU stamps
    /// `first_entry_at`.
    pub(crate) stamp_entry: AtomicBool,
    /// CLOCK_REALTIME ns of the first guest entry after the start (0: none yet).
    pub(crate) first_entry_at: AtomicU64,
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME): one clock for every process on a host,
/// as QEMU's QMP event timestamps.
pub(crate) fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("vcpus", &self.vcpus.len())
            .field("dirty", &self.dirty)
            .finish()
    }
}

impl Shared {
    fn park(&self) -> MutexGuard<'_, Park> {
        self.park.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn fail(&self, msg: String) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
    }

    /// Sets a pause reason and kicks every vCPU; with `wait`, returns once all are parked.
    pub(crate) fn pause(&self, reason: u32, wait: bool) {
        {
            // Under the lock: a vCPU thread clears immediate_exit only under it, after seeing
            // no reason, so it either sees this reason or enters KVM_RUN with the flag set.
            let mut g = self.park();
            g.reasons |= reason;
            for v in &self.vcpus {
                v.immediate_exit().store(1, Ordering::SeqCst);
            }
        }
        for v in &self.vcpus {
            kick(v);
        }
        if wait {
            while self
                .parked_by(Instant::now() + Duration::from_millis(10))
                .is_none()
            {
                // A kick that raced with the thread's own checks: kick again.
                {
                    let _g = self.park();
                    for v in &self.vcpus {
                        v.immediate_exit().store(1, Ordering::SeqCst);
                    }
                }
                for v in &self.vcpus {
                    kick(v);
                }
            }
        }
    }

    /// Waits until every vCPU thread is parked, at most until `by`: when they were (`None`:
    /// not all by then).
    fn parked_by(&self, by: Instant) -> Option<Instant> {
        let mut g = self.park();
        loop {
            if g.parked.iter().all(|&p| p) {
                return Some(Instant::now());
            }
            let now = Instant::now();
            if now >= by {
                return None;
            }
            g = self
                .park_cv
                .wait_timeout(g, by - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Clears a pause reason; vCPUs run again when no reason is left.
    pub(crate) fn unpause(&self, reason: u32) {
        self.park().reasons &= !reason;
        self.park_cv.notify_all();
    }

    /// Guest entries per vCPU (see [`Vm::entries`]).
    pub(crate) fn entries(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|v| v.entries.load(Ordering::SeqCst))
            .collect()
    }

    /// Whether every vCPU thread is parked (no vCPU runs guest code).
    pub(crate) fn all_parked(&self) -> bool {
        self.park().parked.iter().all(|&p| p)
    }

    /// Pages of the guest-physical span (the engine's bitmap size).
    pub(crate) fn memory_pages(&self) -> u64 {
        use livemig::memory::GuestMemory;
        self.memory.size() / livemig::memory::PAGE_SIZE
    }

    /// The throttle the throttle thread applies (capped at 99%); 0 lets the vCPUs run.
    pub(crate) fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(99), Ordering::SeqCst);
        if percent == 0 {
            self.unpause(pause::THROTTLE);
        }
    }

    fn spill_ring(&self, v: &Vcpu) {
        let mut got = Vec::new();
        v.collect_ring(|slot, off| got.push((slot, off)));
        self.spilled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(got);
    }
}

const SIG_KICK_OFFSET: libc::c_int = 5;

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + SIG_KICK_OFFSET
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that does nothing (async-signal-safe) for a real-time
        // signal this crate reserves; without SA_RESTART so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

fn kick(v: &Vcpu) {
    let t = v.pthread.load(Ordering::SeqCst);
    if t != 0 {
        // SAFETY: `t` is the pthread_t of the vCPU's thread, which lives until the VM's
        // threads are joined (after EXIT is set and before `Shared` is dropped).
        unsafe {
            libc::pthread_kill(t as libc::pthread_t, kick_signal());
        }
    }
}

/// A running (or ready) KVM VM.
pub struct Vm {
    kvm: Kvm,
    pub(crate) shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    throttler: Option<JoinHandle<()>>,
    cpuid: CpuId,
    /// Size of a vCPU's XSAVE area (`KVM_CAP_XSAVE2`, at least 4096).
    pub xsave_size: u32,
    /// The MSRs a vCPU here can save, found before the vCPU threads start (a running vCPU
    /// thread holds its fd across `KVM_RUN`, so asking later waits for an exit).
    saveable_msrs: Vec<u32>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.shared.vcpus.len())
            .field("dirty", &self.shared.dirty)
            .field("memory", &self.shared.memory.regions())
            .finish()
    }
}

/// Whether `/dev/kvm` can run a VM here; the reason when not.
pub fn kvm_usable() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
    kvm.create_vm()
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm opened but KVM_CREATE_VM failed: {e}"))
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let what = what.into();
    move |e| Error::Kvm {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The address KVM needs for the Intel real-mode TSS (three pages below the BIOS area);
/// guest RAM must not cover it.
const TSS_ADDR: u64 = 0xfffb_d000;

impl Vm {
    /// Creates the VM: memory slots over `memory`, `cfg.vcpus` vCPUs with KVM's supported
    /// CPUID, the dirty mechanism chosen, and one thread per vCPU, parked until
    /// [`unpause`](Self::unpause)`(pause::START)`.
    pub fn new(memory: Arc<VmMemory>, cfg: &VmConfig) -> Result<Vm, Error> {
        if cfg.vcpus == 0 || cfg.vcpus > 8 {
            return Err(Error::Config(format!(
                "{} vCPUs: this VMM runs 1 to 8",
                cfg.vcpus
            )));
        }
        if memory
            .regions()
            .iter()
            .any(|r| r.gpa < TSS_ADDR + 0x3000 && r.gpa + r.size > TSS_ADDR)
        {
            return Err(Error::Config(format!(
                "guest RAM covers {TSS_ADDR:#x}, which KVM needs for the real-mode TSS"
            )));
        }
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let dirty = choose_dirty(&vm, cfg.dirty)?;
        match dirty.mechanism {
            Mechanism::Bitmap {
                manual_protect: true,
                initially_set,
            } => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
                    | if initially_set {
                        u64::from(KVM_DIRTY_LOG_INITIALLY_SET)
                    } else {
                        0
                    };
                vm.enable_cap(&cap)
                    .map_err(kvm_err("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"))?;
            }
            Mechanism::Ring { entries, acq_rel } => {
                let mut cap = kvm_enable_cap {
                    cap: if acq_rel {
                        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
                    } else {
                        KVM_CAP_DIRTY_LOG_RING
                    },
                    ..Default::default()
                };
                cap.args[0] = u64::from(entries) * 16;
                vm.enable_cap(&cap)
                    .map_err(kvm_err("enabling the dirty ring (KVM_ENABLE_CAP)"))?;
            }
            Mechanism::Bitmap { .. } => {}
        }
        for (slot, r) in memory.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which the VM keeps
            // (Arc) for as long as the VM fd exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err(format!("KVM_SET_USER_MEMORY_REGION slot {slot}")))?;
        }
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let edits = cfg
            .cpuid_clear
            .iter()
            .map(|&(l, s, r, b)| (l, s, r, b, false))
            .chain(cfg.cpuid_set.iter().map(|&(l, s, r, b)| (l, s, r, b, true)));
        for (leaf, sub, reg, bits, set) in edits {
            for e in cpuid.as_mut_slice() {
                if e.function == leaf && e.index == sub {
                    let r = match reg {
                        0 => &mut e.eax,
                        1 => &mut e.ebx,
                        2 => &mut e.ecx,
                        _ => &mut e.edx,
                    };
                    if set {
                        *r |= bits;
                    } else {
                        *r &= !bits;
                    }
                }
            }
        }
        let xsave_size =
            (vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_XSAVE2) as _)).max(4096) as u32;
        if xsave_size > 4096 {
            return Err(Error::Config(format!(
                "this host's XSAVE area is {xsave_size} bytes (KVM_CAP_XSAVE2); the vCPU state \
                 record carries the 4096-byte KVM_GET_XSAVE area only"
            )));
        }
        install_kick_handler();
        let page = 4096;
        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let mut fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err(format!("KVM_CREATE_VCPU {i}")))?;
            let mut own = cpuid.clone();
            for e in own.as_mut_slice() {
                // Leaf 1 EBX[31:24]: initial APIC ID; leaf 0xb EDX: x2APIC ID.
                if e.function == 1 {
                    e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24);
                }
                if e.function == 0xb || e.function == 0x1f {
                    e.edx = i;
                }
            }
            fd.set_cpuid2(&own)
                .map_err(kvm_err(format!("KVM_SET_CPUID2 on vCPU {i}")))?;
            let run = fd.get_kvm_run() as *mut kvm_run;
            let ring = match dirty.mechanism {
                Mechanism::Ring { entries, .. } => {
                    use std::os::fd::AsRawFd;
                    Some(Mutex::new((
                        RingMap::new(fd.as_raw_fd(), entries, page).map_err(|source| {
                            Error::Kvm {
                                what: format!("mapping the dirty ring of vCPU {i}"),
                                source,
                            }
                        })?,
                        0,
                    )))
                }
                Mechanism::Bitmap { .. } => None,
            };
            vcpus.push(Arc::new(Vcpu {
                index: i,
                fd: Mutex::new(fd),
                run,
                pthread: AtomicU64::new(0),
                ring,
                entries: AtomicU64::new(0),
            }));
        }
        let shared = Arc::new(Shared {
            vm,
            memory,
            park: Mutex::new(Park {
                reasons: pause::START,
                parked: vec![false; vcpus.len()],
            }),
            vcpus,
            dirty,
            slots_logging: Mutex::new(false),
            park_cv: Condvar::new(),
            failures: Mutex::new(Vec::new()),
            exits: AtomicU64::new(0),
            ring_full_exits: AtomicU64::new(0),
            spilled: Mutex::new(Vec::new()),
            io: Mutex::new(None),
            throttle: AtomicU8::new(0),
            engine_paused_at: AtomicU64::new(0),
            stamp_entry: AtomicBool::new(false),
            first_entry_at: AtomicU64::new(0),
        });
        let saveable_msrs = match shared.vcpus.first() {
            Some(v) => {
                let fd = v.fd.lock().unwrap_or_else(|p| p.into_inner());
                crate::state::saveable_msrs(&kvm, &fd)?
            }
            None => Vec::new(),
        };
        let mut threads = Vec::new();
        for v in &shared.vcpus {
            let s = Arc::clone(&shared);
            let v2 = Arc::clone(v);
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", v.index))
                .spawn(move || vcpu_loop(&s, &v2))
                .map_err(|source| Error::Io {
                    what: "spawning a vCPU thread".into(),
                    source,
                })?;
            use std::os::unix::thread::JoinHandleExt;
            v.pthread.store(t.as_pthread_t() as u64, Ordering::SeqCst);
            threads.push(t);
        }
        let s = Arc::clone(&shared);
        let throttler = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || throttle_loop(&s))
            .map_err(|source| Error::Io {
                what: "spawning the throttle thread".into(),
                source,
            })?;
        Ok(Vm {
            kvm,
            shared,
            threads,
            throttler: Some(throttler),
            cpuid,
            xsave_size,
            saveable_msrs,
        })
    }

    /// The MSRs a vCPU here can save (`KVM_GET_MSR_INDEX_LIST` filtered by what a vCPU reads),
    /// found before the vCPU threads started.
    pub fn saveable_msrs(&self) -> &[u32] {
        &self.saveable_msrs
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<VmMemory> {
        &self.shared.memory
    }

    /// The dirty mechanism and why.
    pub fn dirty_choice(&self) -> &DirtyChoice {
        &self.shared.dirty
    }

    /// The CPUID every vCPU got (before per-vCPU APIC IDs).
    pub fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn vm_fd(&self) -> &VmFd {
        &self.shared.vm
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[Arc<Vcpu>] {
        &self.shared.vcpus
    }

    /// Sets the port-I/O handler (the VMM's devices).
    pub fn set_io(&self, io: Arc<dyn PortIo>) {
        *self.shared.io.lock().unwrap_or_else(|p| p.into_inner()) = Some(io);
    }

    /// Keeps the vCPUs out of the guest for `reason` (see [`pause`]); returns once none runs.
    pub fn pause(&self, reason: u32) {
        self.shared.pause(reason, true);
    }

    /// Clears `reason`; the vCPUs run when no reason is left.
    pub fn unpause(&self, reason: u32) {
        self.shared.unpause(reason);
    }

    /// Host-enforced throttle: vCPUs are parked for `percent` of the time, in periods of about
    /// 10 ms of running (0 = off).
    pub fn set_throttle(&self, percent: u8) {
        self.shared.set_throttle(percent);
    }

    /// Interrupts every vCPU thread with the kick signal (a vCPU in the guest exits with
    /// EINTR and re-enters at once), as a VMM's IPIs between its threads would.
    pub fn kick_all(&self) {
        for v in &self.shared.vcpus {
            kick(v);
        }
    }

    /// `KVM_EXIT_DIRTY_RING_FULL` exits so far.
    pub fn ring_full_exits(&self) -> u64 {
        self.shared.ring_full_exits.load(Ordering::SeqCst)
    }

    /// `KVM_RUN` calls made to run guest code so far, per vCPU (a call the vCPU thread makes
    /// while parked, with `immediate_exit` set to complete a pending exit, is not counted).
    pub fn entries(&self) -> Vec<u64> {
        self.shared.entries()
    }

    /// Exits from KVM_RUN to this VMM so far (all vCPUs).
    pub fn exits(&self) -> u64 {
        self.shared.exits.load(Ordering::Relaxed)
    }

    /// When the engine's last pause (stop-and-copy) had every vCPU parked, CLOCK_REALTIME
    /// nanoseconds; the start of the downtime `cargo xtask bench-peer` measures.
    pub fn engine_paused_at_ns(&self) -> Option<u64> {
        Some(self.shared.engine_paused_at.load(Ordering::SeqCst)).filter(|&t| t != 0)
    }

    /// When a vCPU first entered the guest after the destination's start
    /// ([`KvmStart`](crate::device::KvmStart)), CLOCK_REALTIME nanoseconds; the end of that
    /// downtime.
    pub fn first_entry_after_start_ns(&self) -> Option<u64> {
        Some(self.shared.first_entry_at.load(Ordering::SeqCst)).filter(|&t| t != 0)
    }

    /// What went wrong in vCPU threads (unexpected exits, failed ioctls).
    pub fn failures(&self) -> Vec<String> {
        self.shared
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Shared state for the trackers and the state device.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shared.park().reasons |= pause::EXIT;
        self.shared.park_cv.notify_all();
        for v in &self.shared.vcpus {
            v.immediate_exit().store(1, Ordering::SeqCst);
            kick(v);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for v in &self.shared.vcpus {
            v.pthread.store(0, Ordering::SeqCst);
        }
        if let Some(t) = self.throttler.take() {
            let _ = t.join();
        }
    }
}

/// Probes the dirty mechanisms and picks one.
fn choose_dirty(vm: &VmFd, mode: DirtyMode) -> Result<DirtyChoice, Error> {
    let ext = |c: u32| vm.check_extension_raw(c as libc::c_ulong);
    let ring_acq = ext(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
    let ring_tso = ext(KVM_CAP_DIRTY_LOG_RING);
    let max_bytes = ring_acq.max(ring_tso);
    let manual = ext(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as u32;
    let bitmap = |why: &str| DirtyChoice {
        mechanism: Mechanism::Bitmap {
            manual_protect: manual & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0,
            initially_set: manual & KVM_DIRTY_LOG_INITIALLY_SET != 0,
        },
        reason: format!(
            "{why}; KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {manual:#x} ({})",
            if manual & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
                "GET without clearing, KVM_CLEAR_DIRTY_LOG in chunks"
            } else {
                "GET clears and re-protects"
            }
        ),
    };
    let ring = |entries: u32| -> Result<DirtyChoice, Error> {
        if max_bytes <= 0 {
            return Err(Error::Config(
                "the dirty ring was asked for but KVM offers neither KVM_CAP_DIRTY_LOG_RING nor \
                 _ACQ_REL"
                    .into(),
            ));
        }
        let bytes = u64::from(entries) * 16;
        // virt/kvm/kvm_main.c kvm_vm_ioctl_enable_dirty_log_ring: a power of two, at least
        // one page, at most the capability's value.
        if !entries.is_power_of_two() || entries < 256 || bytes > max_bytes as u64 {
            return Err(Error::Config(format!(
                "dirty ring of {entries} entries: must be a power of two from 256 (one page) to \
                 {} (KVM's limit is {max_bytes} bytes per vCPU)",
                max_bytes / 16
            )));
        }
        Ok(DirtyChoice {
            mechanism: Mechanism::Ring {
                entries,
                acq_rel: ring_acq > 0,
            },
            reason: format!(
                "dirty ring, {entries} entries per vCPU (KVM allows up to {max_bytes} bytes; {})",
                if ring_acq > 0 {
                    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
                } else {
                    "KVM_CAP_DIRTY_LOG_RING"
                }
            ),
        })
    };
    match mode {
        DirtyMode::Bitmap => Ok(bitmap("dirty bitmap as asked")),
        DirtyMode::Ring(n) => ring(n),
        DirtyMode::Auto if max_bytes > 0 => {
            let mut c = ring(DEFAULT_RING_ENTRIES.min(max_bytes as u32 / 16))?;
            c.reason = format!("KVM offers the dirty ring: {}", c.reason);
            Ok(c)
        }
        DirtyMode::Auto => Ok(bitmap("KVM offers no dirty ring")),
    }
}

fn vcpu_loop(s: &Shared, v: &Vcpu) {
    let i = v.index as usize;
    let mut io = s.io.lock().unwrap_or_else(|p| p.into_inner()).clone();
    loop {
        // Park while any reason is set.
        {
            let g = s.park();
            if g.reasons == 0 {
                v.immediate_exit().store(0, Ordering::SeqCst);
            } else {
                drop(g);
                // Complete a pending PIO/MMIO without running guest code, so the state the
                // engine reads is consistent.
                {
                    let mut fd = v.fd();
                    fd.set_kvm_immediate_exit(1);
                    let _ = fd.run();
                }
                let mut g = s.park();
                g.parked[i] = true;
                s.park_cv.notify_all();
                while g.reasons != 0 && g.reasons & pause::EXIT == 0 {
                    g = s.park_cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                if g.reasons & pause::EXIT != 0 {
                    return;
                }
                g.parked[i] = false;
                drop(g);
                if io.is_none() {
                    io = s.io.lock().unwrap_or_else(|p| p.into_inner()).clone();
                }
                continue;
            }
        }
        let mut fd = v.fd();
        // Counted before the call: a call that may have run guest code is an entry.
        v.entries.fetch_add(1, Ordering::SeqCst);
        if s.stamp_entry.load(Ordering::Relaxed)
            && s.first_entry_at
                .compare_exchange(0, realtime_ns(), Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            s.stamp_entry.store(false, Ordering::Relaxed);
        }
        let r = fd.run();
        s.exits.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Some(h) = &io {
                    h.io_out(v.index, port, data);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => match &io {
                Some(h) => h.io_in(v.index, port, data),
                None => data.fill(0xff),
            },
            Ok(VcpuExit::Unsupported(r)) if r == KVM_EXIT_DIRTY_RING_FULL => {
                // Take this vCPU's entries (they wait in `spilled` for the harvest), then let
                // KVM reuse them: no entry is lost.
                drop(fd);
                s.spill_ring(v);
                // sys::reset_dirty_rings blocks signals around the ioctl: vCPU threads are
                // the threads that get kicked, and a reset interrupted by a pending signal
                // loses pages (see there).
                if let Err(e) = sys::reset_dirty_rings(&s.vm) {
                    s.fail(format!("vCPU {i}: KVM_RESET_DIRTY_RINGS: {e}"));
                    s.park().reasons |= pause::EXIT;
                }
                s.ring_full_exits.fetch_add(1, Ordering::SeqCst);
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::Hlt) => {}
            Ok(other) => {
                let internal = matches!(other, VcpuExit::InternalError);
                let mut msg = format!("vCPU {i}: unexpected exit {other:?}");
                if internal {
                    // KVM_EXIT_INTERNAL_ERROR says why in kvm_run.internal (suberror 1 is an
                    // emulation failure; include/uapi/linux/kvm.h).
                    let r = fd.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled
                    // the `internal` member of the union; reading integers is always valid.
                    let int = unsafe { r.__bindgen_anon_1.internal };
                    let n = (int.ndata as usize).min(int.data.len());
                    msg += &format!(" (suberror {}, data {:x?})", int.suberror, &int.data[..n]);
                }
                if let (Ok(r), Ok(sr)) = (fd.get_regs(), fd.get_sregs()) {
                    msg += &format!(
                        " at rip {:#x} (cr0 {:#x} cr3 {:#x} cr4 {:#x})",
                        r.rip, sr.cr0, sr.cr3, sr.cr4
                    );
                }
                // What KVM holds for the vCPU: how often it was entered, its MP state and
                // latched events (an INIT latched or delivered shows here).
                msg += &format!(", entry {}", v.entries.load(Ordering::SeqCst));
                if let Ok(mp) = fd.get_mp_state() {
                    msg += &format!(", mp_state {}", mp.mp_state);
                }
                if let Ok(ev) = fd.get_vcpu_events() {
                    msg += &format!(
                        ", events: exception {}/{} nmi {}/{} smi.latched_init {} flags {:#x}",
                        ev.exception.injected,
                        ev.exception.pending,
                        ev.nmi.injected,
                        ev.nmi.pending,
                        ev.smi.latched_init,
                        ev.flags
                    );
                }
                drop(fd);
                s.fail(msg);
                // A guest the VMM does not understand stays stopped.
                s.park().reasons |= pause::EXIT;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                drop(fd);
                s.fail(format!("vCPU {i}: KVM_RUN: {e}"));
                s.park().reasons |= pause::EXIT;
            }
        }
    }
}

/// Parks the vCPUs for `pct` percent of the time: they run for about 10 ms x (100 - pct)%, then
/// stay parked for `pct / (100 - pct)` times as long as they actually ran. Their actual run
/// lasts from the unpause until every vCPU thread has left `KVM_RUN`, which includes this
/// thread's late wake-up and the kick's latency: under nested KVM here a 2 ms sleep ended about
/// 1.7 ms late while a vCPU ran, and a fixed 8-of-10 ms park held an 80% throttle at 69%
/// (`cargo xtask bench-peer`, `vm run --throttle`); sized from the measured run, 20-90% hold
/// within 7 points. QEMU's vCPUs sleep `pct / (1 - pct)` times a nominal 10 ms slice
/// (`cpu_throttle_thread`, `system/cpu-throttle.c`).
fn throttle_loop(s: &Shared) {
    const SLICE: Duration = Duration::from_millis(10);
    // The longest park: a vCPU stalled by the host for long must not park the guest for longer.
    const MAX_PARK: Duration = Duration::from_secs(1);
    let sleep_until = |t: Instant| {
        let now = Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    };
    let mut running_since = None;
    loop {
        if s.park().reasons & pause::EXIT != 0 {
            return;
        }
        let pct = u32::from(s.throttle.load(Ordering::SeqCst));
        if pct == 0 {
            running_since = None;
            std::thread::sleep(SLICE);
            continue;
        }
        let since = *running_since.get_or_insert_with(Instant::now);
        sleep_until(since + SLICE * (100 - pct) / 100);
        let asked = Instant::now();
        s.pause(pause::THROTTLE, false);
        // Every vCPU parked, or a whole slice gone waiting (then they count as parked from
        // the request).
        let parked = s.parked_by(asked + SLICE).unwrap_or(asked);
        let ran = parked.saturating_duration_since(since);
        // In slices, so that an exit or a throttle set to 0 ends a long park within 10 ms.
        let until = parked + (ran * pct / (100 - pct)).min(MAX_PARK);
        while Instant::now() < until
            && s.park().reasons & pause::EXIT == 0
            && s.throttle.load(Ordering::SeqCst) != 0
        {
            sleep_until(until.min(Instant::now() + SLICE));
        }
        s.unpause(pause::THROTTLE);
        running_since = Some(Instant::now());
    }
}

/// Enables or disables `KVM_MEM_LOG_DIRTY_PAGES` on every slot.
pub(crate) fn set_slot_logging(s: &Shared, on: bool) -> Result<(), Error> {
    for (slot, r) in s.memory.regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: r.host,
        };
        // SAFETY: the same live mapping as at creation, only the flags change.
        sys::kvm_call("KVM_SET_USER_MEMORY_REGION", || unsafe {
            s.vm.set_user_memory_region(region)
        })
        .map_err(kvm_err(format!(
            "KVM_SET_USER_MEMORY_REGION slot {slot} (dirty logging {})",
            if on { "on" } else { "off" }
        )))?;
    }
    *s.slots_logging.lock().unwrap_or_else(|p| p.into_inner()) = on;
    Ok(())
}

/// Sets a vCPU runnable (an AP waits for INIT/SIPI otherwise).
pub(crate) fn make_runnable(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
}
