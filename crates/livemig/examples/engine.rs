//! The engine over the smallest platform a VMM could give it: guest RAM in a vector
//! (`GuestMemory`), a vCPU dirty log the example drives itself (`DirtyTracker`), and vCPUs
//! with nothing to pause (`Vcpus`), no devices. A "guest" writes pages between pre-copy rounds;
//! the source migrates over TCP on loopback (`TcpChannel` on one side, `Destination::receive`
//! on a socket on the other) while a thread watches `Source::progress_view`. Then a second
//! migration is cancelled with `CancelHandle` and the source must run again. Checks that the
//! destination's RAM equals the source's page for page, and that the cancelled source is not
//! stopped.
//!
//! `cargo run -p livemig --example engine`

use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::bitmap::PageBitmap;
use livemig::engine::{
    Destination, DestinationPlatform, Event, Source, SourceConfig, SourcePlatform, Vcpus,
};
use livemig::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use livemig::tracker::{BoxError, DirtyTracker};
use livemig::transport::TcpChannel;
use livemig::{Error, Phase};

const PAGES: u64 = 1024; // 4 MiB

/// Guest RAM in a vector.
struct Ram(Mutex<Vec<u8>>);

impl GuestMemory for Ram {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.0.lock().unwrap()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.0.lock().unwrap()[gpa as usize..(gpa + len) as usize].fill(0);
        Ok(())
    }
}

/// The vCPU dirty log of a scripted guest: at each harvest the guest has just written a few
/// pages (a new value each time), and the log reports exactly those. A real VMM reads KVM's
/// dirty log or ring here (`livemig_kvm::KvmDirtyLog`).
struct GuestLog {
    ram: Arc<Ram>,
    harvests: u64,
}

impl DirtyTracker for GuestLog {
    fn name(&self) -> String {
        "scripted guest".into()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        self.harvests += 1;
        // Fewer writes each round, so pre-copy converges.
        let n = 16u64.saturating_sub(self.harvests * 4);
        for k in 0..n {
            let page = (self.harvests * 37 + k * 101) % PAGES;
            let v = [(self.harvests as u8).wrapping_mul(7) ^ k as u8; PAGE_SIZE as usize];
            self.ram.write(page * PAGE_SIZE, &v)?;
            into.set(page);
        }
        Ok(n)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// vCPUs that only record whether they are paused.
struct Flag(Arc<AtomicBool>);

impl Vcpus for Flag {
    fn pause(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn resume(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn ram(fill: impl Fn(u64) -> u8) -> Arc<Ram> {
    let mut v = vec![0u8; (PAGES * PAGE_SIZE) as usize];
    for p in 0..PAGES {
        v[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize].fill(fill(p));
    }
    Arc::new(Ram(Mutex::new(v)))
}

fn source(ram: &Arc<Ram>, paused: &Arc<AtomicBool>) -> Source {
    let platform = SourcePlatform {
        memory: ram.clone(),
        devices: Vec::new(), // assigned devices go here (livemig::engine::SourceDevice)
        iommu: None,         // their IOMMU tracker (livemig::tracker::HwptTracker)
        cpu: Box::new(GuestLog {
            ram: ram.clone(),
            harvests: 0,
        }),
        vcpus: Box::new(Flag(paused.clone())),
        page_size_mask: 0x1000,
        viommu: None,
        dma_endpoints: Vec::new(),
    };
    let cfg = SourceConfig {
        downtime_limit: Duration::from_millis(50),
        max_rounds: 10,
        ..SourceConfig::default()
    };
    Source::new(platform, cfg)
}

/// A destination on a loopback port, receiving into `dst` on its own thread.
fn destination(
    dst: &Arc<Ram>,
) -> Result<(String, std::thread::JoinHandle<livemig::Result<u64>>), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let mut dest = Destination::new(DestinationPlatform {
        memory: dst.clone(),
        devices: Vec::new(),
        iommu_dirty: Vec::new(),
        page_size_mask: 0x1000,
        vcpus: None,
    });
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().map_err(|e| Error::Link {
            phase: Phase::Compat,
            what: "accepting",
            source: e,
        })?;
        let back = s.try_clone().map_err(|e| Error::Link {
            phase: Phase::Compat,
            what: "cloning the socket",
            source: e,
        })?;
        dest.receive(s, back).map(|r| r.pages + r.zero_pages)
    });
    Ok((addr, t))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("ok: destination RAM equals the source's; a cancelled source runs again");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("engine example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), BoxError> {
    // 1. A migration to completion.
    let src = ram(|p| (p % 251) as u8 + 1);
    let dst = ram(|_| 0);
    let paused = Arc::new(AtomicBool::new(false));
    let mut s = source(&src, &paused);
    let (addr, receiver) = destination(&dst)?;
    let view = s.progress_view();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = 0;
            while !done.load(Ordering::SeqCst) {
                seen = seen.max(view.snapshot().round);
                std::thread::sleep(Duration::from_millis(1));
            }
            seen.max(view.snapshot().round)
        })
    };
    let report = s.migrate_over(TcpChannel(TcpStream::connect(&addr)?));
    done.store(true, Ordering::SeqCst);
    let rounds_seen = watcher.join().map_err(|_| "progress thread panicked")?;
    let report = report.map_err(|e| e.chain())?;
    let pages = receiver.join().map_err(|_| "destination thread panicked")?;
    let pages = pages.map_err(|e| e.chain())?;
    println!(
        "migrated: {} pre-copy rounds, {} pages received, {} stream bytes, downtime {} us; \
         progress view saw round {rounds_seen}",
        report.rounds.len(),
        pages,
        report.bytes,
        report.downtime_us
    );
    let stale: Vec<u64> = (0..PAGES)
        .filter(|&p| {
            let (mut a, mut b) = ([0u8; PAGE_SIZE as usize], [0u8; PAGE_SIZE as usize]);
            src.read(p * PAGE_SIZE, &mut a).is_err()
                || dst.read(p * PAGE_SIZE, &mut b).is_err()
                || a != b
        })
        .collect();
    if !stale.is_empty() {
        return Err(format!("destination pages differ from the source's: {stale:?}").into());
    }
    if !s.is_stopped() || !paused.load(Ordering::SeqCst) {
        return Err("after a successful migration the source vCPUs must stay paused".into());
    }

    // 2. The operator cancels a migration as its first round begins: the source runs again.
    let src = ram(|p| p as u8);
    let dst = ram(|_| 0);
    let paused = Arc::new(AtomicBool::new(false));
    let mut s = source(&src, &paused);
    let cancel = s.cancel_handle();
    s.on_event(move |e| {
        if let Event::Phase(Phase::PreCopy(1)) = e {
            cancel.cancel("example: operator cancel");
        }
    });
    let (addr, receiver) = destination(&dst)?;
    match s.migrate_over(TcpChannel(TcpStream::connect(&addr)?)) {
        Err(e @ Error::Cancelled { .. }) => println!("cancelled as asked: {}", e.chain()),
        Err(e) => return Err(format!("expected a cancel, got: {}", e.chain()).into()),
        Ok(_) => return Err("the cancelled migration completed".into()),
    }
    if let Ok(Ok(_)) = receiver.join() {
        return Err("the destination completed a cancelled migration".into());
    }
    if s.is_stopped() || paused.load(Ordering::SeqCst) {
        return Err("after a cancel the source must run again".into());
    }
    Ok(())
}
