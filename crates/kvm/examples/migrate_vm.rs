//! The worked example of `docs/integration.md`: a running KVM VM migrated live to a second VM
//! in this process over loopback TCP, with one main connection and two page channels.
//!
//! - guest memory: `VmMemory` (vm-memory regions; anonymous here, memfd or a shared file for a
//!   VMM that shares it) — the test VM's RAM, 64 MiB, one vCPU writing 2048 pages at 20000
//!   pages/s;
//! - the source platform: `livemig_kvm::platform::source` (the VM's memory, `KvmDirtyLog` over
//!   the dirty ring or bitmap, `KvmVcpus`, the vCPU state as the first device); assigned VFIO
//!   devices and their IOMMU tracker would be its `devices` and `iommu` arguments
//!   (`livemig_host::Host::source_devices` and `Host::iommu_tracker`);
//! - the destination platform: `livemig_kvm::platform::destination` of a VM built with the same
//!   layout, its vCPUs parked until the example starts them;
//! - `SourceConfig`: downtime limit, page channels, a hard deadline on the stop;
//! - a progress thread reading `Source::progress_view`, and a watchdog holding a
//!   `CancelHandle` (an operator's cancel: the source would run again).
//!
//! Checks: the migration succeeds and the source stays stopped; the destination's RAM equals
//! the stopped source's byte for byte; once started, the destination guest continues its step
//! counters where the source stopped and verifies every page of its working set itself.
//!
//! `cargo run -p livemig-kvm --example migrate_vm` (needs a usable /dev/kvm)

use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use livemig::engine::{Destination, Source, SourceConfig};
use livemig::link::DataSink;
use livemig::transport::{Abort, TcpChannel};
use livemig_kvm::vm::pause;
use livemig_kvm::{Backing, DirtyMode, TestVm, TestVmConfig, platform};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Page connections beside the main one.
const CHANNELS: u32 = 2;

fn main() -> ExitCode {
    if let Err(why) = livemig_kvm::kvm_usable() {
        eprintln!("migrate_vm example FAILED: /dev/kvm is not usable here: {why}");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => {
            println!("ok: the VM runs on the destination and its guest verified its memory");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("migrate_vm example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), BoxError> {
    // 1. The VMs. A VMM builds its own: `VmMemory::new(&ranges, backing)` and
    //    `Vm::new(memory, &VmConfig)`; the test VM does that and loads its guest.
    let cfg = TestVmConfig {
        vcpus: 1,
        pages: 2048,
        rate: 20_000,
        ram: vec![(0, 64 << 20)],
        backing: Backing::Anonymous,
        dirty: DirtyMode::Auto,
        ..TestVmConfig::default()
    };
    let src = TestVm::boot(&cfg)?;
    src.wait_progress(&[0], Duration::from_secs(10))?;
    println!("source VM running; {}", src.vm.dirty_choice().reason);
    let dst = TestVm::incoming(&cfg)?;

    // 2. The destination: its platform, a listener, and a thread that receives.
    let dplatform = platform::destination(&dst.vm, vec![], false)?;
    let mut dest = Destination::new(dplatform);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> Result<livemig::engine::ReceiveReport, String> {
        let (main, _) = listener.accept().map_err(|e| e.to_string())?;
        let back = main.try_clone().map_err(|e| e.to_string())?;
        let abort_main = main.try_clone().map_err(|e| e.to_string())?;
        let abort: Abort = Box::new(move || {
            let _ = abort_main.shutdown(std::net::Shutdown::Both);
        });
        // Page channels connect to the same port once the devices are accepted.
        let mut accept = || -> std::io::Result<(Box<dyn std::io::Read + Send>, Abort)> {
            let (s, _) = listener.accept()?;
            let a = s.try_clone()?;
            Ok((
                Box::new(s),
                Box::new(move || {
                    let _ = a.shutdown(std::net::Shutdown::Both);
                }),
            ))
        };
        dest.receive_channels(main, back, abort, &mut accept)
            .map_err(|e| e.chain())
    });

    // 3. The source: the running VM as a platform, and the migration's settings.
    let splatform = platform::source(&src.vm, vec![], None, None)?;
    let mut source = Source::new(
        splatform,
        SourceConfig {
            downtime_limit: Duration::from_millis(100),
            channels: CHANNELS,
            hard_deadline: Some(Duration::from_secs(5)),
            ..SourceConfig::default()
        },
    );
    let plan = source.check()?;
    println!("dirty tracking per device: {plan:?}");

    // Progress for a display, and an operator's watchdog.
    let view = source.progress_view();
    let cancel = source.cancel_handle();
    let finished = Arc::new(AtomicBool::new(false));
    let watcher = {
        let finished = finished.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut last_round = 0;
            while !finished.load(Ordering::SeqCst) {
                let p = view.snapshot();
                if p.round != last_round {
                    println!(
                        "  round {}: {} dirty pages, {} stream bytes so far, dirty rate {} \
                         pages/s, expected downtime {} us",
                        p.round, p.round_pages, p.bytes, p.dirty_rate, p.expected_downtime_us
                    );
                    last_round = p.round;
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    cancel.cancel("the migration took longer than 60 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // 4. Migrate: the main connection, and page channels opened on demand.
    let main = TcpStream::connect(addr)?;
    main.set_nodelay(true)?;
    let mut connect = |_index: u32| -> std::io::Result<(Box<dyn DataSink>, Abort)> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let a = s.try_clone()?;
        Ok((
            Box::new(s),
            Box::new(move || {
                let _ = a.shutdown(std::net::Shutdown::Both);
            }),
        ))
    };
    let result = source.migrate_channels(TcpChannel(main), &mut connect);
    finished.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let received = receiver.join().map_err(|_| "destination thread panicked")?;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            // Failure semantics: the source runs again, except when the handover's outcome
            // was lost (the destination may be running the VM): then it stays stopped.
            let state = if source.is_stopped() {
                "stays stopped with its state intact"
            } else {
                "runs again"
            };
            return Err(format!("migration failed: {}; the source VM {state}", e.chain()).into());
        }
    };
    let received = received.map_err(|e| format!("destination: {e}"))?;
    println!(
        "migrated: {} pre-copy rounds + stop-and-copy, {} bytes, downtime {:.2} ms (limit {} \
         ms), converged {}; destination loaded {} pages and {} zero pages",
        report.rounds.len(),
        report.bytes,
        report.downtime_us as f64 / 1e3,
        report.downtime_limit_us / 1000,
        report.converged,
        received.pages,
        received.zero_pages
    );

    // 5. Check: the source stays stopped, the memories are equal, the guest runs on.
    if !source.is_stopped() {
        return Err("after a successful migration the source VM must stay stopped".into());
    }
    if let Some(at) = src.vm.memory().first_difference(dst.vm.memory()) {
        return Err(format!("destination RAM differs from the source's at {at:#x}").into());
    }
    let steps = src.monitor.steps();
    dst.vm.unpause(pause::START);
    let now = dst.wait_progress(&steps, Duration::from_secs(20))?;
    println!("destination guest continues: steps {now:?} after {steps:?} at the stop");
    let failures = dst.verify(Duration::from_secs(30))?;
    if !failures.is_empty() {
        return Err(format!("the guest's own verification failed: {failures:?}").into());
    }
    Ok(())
}
