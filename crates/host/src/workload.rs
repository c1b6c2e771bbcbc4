//! Threads standing in for a guest's vCPUs (and, in the rig, for device DMA): each writes
//! guest RAM at a set rate; pausing them all is the engine's vCPU pause.
//!
//! A write changes a 16-byte slot of a page (the write counter and the address), so every
//! write leaves a page different from what was sent before it. The page is picked by a
//! fixed-seed generator over the thread's range, so the run is repeatable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig::bitmap::PageBitmap;
use livemig::engine::Vcpus;
use livemig::memory::{GuestMemory, PAGE_SIZE};
use livemig::tracker::{BoxError, DirtyTracker, not_tracking};
use livemig_kvm::VmMemory;

use crate::Error;

/// One writer thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// A name for errors (`cpu`, `dma`).
    pub name: String,
    /// Guest-physical range written, `(gpa, len)`, inside guest RAM.
    pub range: (u64, u64),
    /// Page writes per second (0: the thread writes nothing).
    pub rate: u64,
    /// Seed of the page sequence.
    pub seed: u64,
}

/// Writes one 16-byte slot of the page at `gpa`; returns an error message when it cannot.
pub type WriteFn = Box<dyn FnMut(u64, &[u8; 16]) -> Result<(), String> + Send>;

#[derive(Debug, Default)]
struct Gate {
    paused: bool,
    parked: usize,
}

#[derive(Debug, Default)]
struct Shared {
    gate: Mutex<Gate>,
    cv: Condvar,
    stop: AtomicBool,
    writes: AtomicU64,
    error: Mutex<Option<String>>,
}

/// Running writer threads.
#[derive(Debug)]
pub struct Workload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// The write through `vm-memory` (a vCPU's write as the VMM's dirty log sees it).
pub fn vmm_writer(memory: Arc<VmMemory>) -> WriteFn {
    Box::new(move |gpa, bytes| GuestMemory::write(&*memory, gpa, bytes).map_err(|e| e.to_string()))
}

impl Workload {
    /// No threads (a destination, or a source with an idle guest).
    pub fn idle() -> Workload {
        Workload {
            shared: Arc::default(),
            threads: Vec::new(),
        }
    }

    /// Starts one thread per `(config, write)`; each range must be page-aligned and non-empty.
    pub fn start(writers: Vec<(WorkloadConfig, WriteFn)>) -> Result<Workload, Error> {
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::new();
        for (cfg, write) in writers {
            let (gpa, len) = cfg.range;
            if len < PAGE_SIZE || gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(Error::Config(format!(
                    "writer {}: range {gpa:#x}+{len:#x} must be non-empty and 4 KiB aligned",
                    cfg.name
                )));
            }
            if cfg.rate == 0 {
                continue;
            }
            let s = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name(format!("livemig-{}", cfg.name))
                .spawn(move || run(&s, cfg, write))
                .map_err(|source| Error::Io {
                    what: "starting a writer thread".into(),
                    source,
                })?;
            threads.push(t);
        }
        Ok(Workload { shared, threads })
    }

    /// Pages written so far, all threads.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// The first write error, if a thread stopped on one.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().map(|e| e.clone()).unwrap_or(None)
    }

    /// Stops every thread and returns once none writes (they stay alive, parked).
    pub fn pause(&self) {
        self.vcpus().pause();
    }

    /// Lets the threads write again.
    pub fn resume(&self) {
        self.vcpus().resume();
    }

    /// The engine's vCPU control over these threads.
    pub fn vcpus(&self) -> Box<dyn Vcpus> {
        Box::new(WorkloadVcpus(Arc::clone(&self.shared), self.threads.len()))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.resume();
        self.shared.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(s: &Shared, cfg: WorkloadConfig, mut write: WriteFn) {
    let pages = cfg.range.1 / PAGE_SIZE;
    let mut x = cfg.seed | 1;
    let start = Instant::now();
    let mut done = 0u64;
    while !s.stop.load(Ordering::SeqCst) {
        // The gate: park while paused (the pause returns once every thread is parked).
        if let Ok(mut g) = s.gate.lock()
            && g.paused
        {
            g.parked += 1;
            s.cv.notify_all();
            while g.paused && !s.stop.load(Ordering::SeqCst) {
                g = match s.cv.wait(g) {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
            g.parked -= 1;
        }
        // Woken to stop: not one more write (the pause's promise outlives the workload).
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        // Pace: `rate` writes per second since the start, in bursts of up to 64.
        let due = (start.elapsed().as_micros() as u64).saturating_mul(cfg.rate) / 1_000_000;
        if done >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        for _ in 0..(due - done).min(64) {
            // xorshift64: a fixed sequence of pages.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = s.writes.fetch_add(1, Ordering::Relaxed) + 1;
            let page = x % pages;
            let gpa = cfg.range.0 + page * PAGE_SIZE;
            let slot = (n % (PAGE_SIZE / 16)) * 16;
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&n.to_le_bytes());
            bytes[8..].copy_from_slice(&gpa.to_le_bytes());
            if let Err(e) = write(gpa + slot, &bytes) {
                if let Ok(mut slot) = s.error.lock() {
                    slot.get_or_insert(format!("writer {}: {e}", cfg.name));
                }
                return;
            }
            done += 1;
        }
    }
}

struct WorkloadVcpus(Arc<Shared>, usize);

impl Vcpus for WorkloadVcpus {
    fn pause(&mut self) {
        let Ok(mut g) = self.0.gate.lock() else {
            return;
        };
        g.paused = true;
        // Threads that stopped on an error never park; the pause waits for the others (a
        // bounded wait per step so a dead thread cannot hang it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.parked < self.1 && Instant::now() < deadline {
            if self.0.error.lock().map(|e| e.is_some()).unwrap_or(true) {
                break;
            }
            g = match self.0.cv.wait_timeout(g, Duration::from_millis(10)) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }
    fn resume(&mut self) {
        if let Ok(mut g) = self.0.gate.lock() {
            g.paused = false;
        }
        self.0.cv.notify_all();
    }
}

/// The dirty log of writes made through `vm-memory` (the VMM's own tracking, standing in for
/// KVM's vCPU dirty log on a host without KVM).
#[derive(Debug)]
pub struct VmmDirtyLog {
    memory: Arc<VmMemory>,
    tracking: bool,
}

impl VmmDirtyLog {
    /// The log of writes into `memory` (not tracking until started).
    pub fn new(memory: Arc<VmMemory>) -> VmmDirtyLog {
        VmmDirtyLog {
            memory,
            tracking: false,
        }
    }
}

impl DirtyTracker for VmmDirtyLog {
    fn name(&self) -> String {
        "VMM write log".into()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        self.memory.reset_vmm_dirty();
        self.tracking = true;
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if !self.tracking {
            return Err(not_tracking(&self.name()));
        }
        Ok(self.memory.harvest_vmm_dirty(|pfn| {
            into.set(pfn);
        }))
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        self.tracking = false;
        Ok(())
    }
}

/// Several pausable sets as one: the engine's vCPU pause stops them in order and resumes them
/// in reverse (a VM's vCPUs, then the DMA writers of its devices: a stopped VM's devices do
/// no DMA). Throttling goes to every set; guest entries are the first set's that counts them
/// (put the VM's vCPUs first).
pub struct PauseTogether(pub Vec<Box<dyn Vcpus>>);

impl std::fmt::Debug for PauseTogether {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PauseTogether({} sets)", self.0.len())
    }
}

impl Vcpus for PauseTogether {
    fn pause(&mut self) {
        for v in &mut self.0 {
            v.pause();
        }
    }
    fn resume(&mut self) {
        for v in self.0.iter_mut().rev() {
            v.resume();
        }
    }
    fn set_throttle(&mut self, percent: u8) -> bool {
        self.0
            .iter_mut()
            .fold(false, |any, v| v.set_throttle(percent) | any)
    }
    fn entries(&self) -> Option<Vec<u64>> {
        self.0.iter().find_map(|v| v.entries())
    }
}
