//! `livemig vm`: the KVM test VM — run it, migrate it between two processes over TCP, and the
//! one-command demonstration (`vm demo`) that does both and verifies the guest.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use livemig::engine::{Destination, MigrationReport, ReceiveReport, Runs, Source};
use livemig_kvm::{TestVm, platform};
use serde::Serialize;

use crate::args::parse_duration;
use crate::host::{DestFaults, SourceFaults};
use crate::report::print_report;
use crate::testvm::{DropRecord, DumpThenStart, FlagOnPause, GUEST_UART_PORT};
pub use crate::testvm::{Undecided, Verification, VmArgs, VmDeviceArgs, VmMigArgs, verify};
use livemig_host::workload::{PauseTogether, WorkloadConfig};
use livemig_host::{Host, HostConfig, RegionPorts, Workload};
use std::sync::Arc;

#[derive(Subcommand)]
pub enum VmCmd {
    /// Boot the test VM, let it run, and have it verify its own memory.
    Run {
        #[command(flatten)]
        vm: VmArgs,
        /// How long the guest runs before it verifies.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        time: Duration,
        /// Throttle the vCPUs throughout as auto-converge does (each parked for PCT% of every
        /// 10 ms); the output gives the guest's write rate, measured from 0.5 s into the run
        /// to its end (`cargo xtask bench-peer` compares it with QEMU's throttle).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
        throttle: u8,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Receive a running test VM over TCP, start it, and have it verify its memory.
    Incoming {
        /// Address to listen on (host:port; port 0 picks one; the address is printed on the
        /// first line of standard output).
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        dev: VmDeviceArgs,
        #[command(flatten)]
        faults: DestFaults,
        #[command(flatten)]
        chan: crate::secure::ChannelArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Boot the test VM and migrate it, running, to `livemig vm incoming` over TCP.
    Migrate {
        /// Destination address (host:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        dev: VmDeviceArgs,
        #[command(flatten)]
        faults: SourceFaults,
        #[command(flatten)]
        mig: VmMigArgs,
        #[command(flatten)]
        chan: crate::secure::ChannelArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also draw the migration (bytes sent against time, downtime by phase) as an SVG chart.
        #[arg(long, value_name = "FILE")]
        chart: Option<std::path::PathBuf>,
    },
    /// Write the test guest's image (a flat multiboot image) for another VMM, e.g.
    /// `qemu-system-x86_64 -kernel FILE -append "cpus=1 pages=1024 period=0" -device
    /// isa-debugcon,iobase=0xe9,chardev=d -chardev stdio,id=d`.
    Image {
        /// Where to write it.
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// Also print the `-append` value that runs the workload of `vm run --vcpus VCPUS
        /// --pages PAGES --rate RATE` under QEMU with KVM (the guest paces itself in TSC ticks;
        /// the period comes from this host's KVM TSC frequency, which QEMU's vCPUs share when
        /// no `tsc-frequency` is set). QEMU's multiboot loader starts vCPU 0 only; with more
        /// than one vCPU (QEMU's `-smp` must match) vCPU 0 starts the others with
        /// INIT-SIPI-SIPI.
        #[arg(long)]
        print_append: bool,
        /// vCPUs for `--print-append`.
        #[arg(long, default_value_t = 1, requires = "print_append",
              value_parser = clap::value_parser!(u32).range(1..=8))]
        vcpus: u32,
        /// Working-set pages for `--print-append`.
        #[arg(long, default_value_t = 4096, requires = "print_append")]
        pages: u32,
        /// Pages per second for `--print-append` (0: as fast as it can).
        #[arg(long, default_value_t = 20_000, requires = "print_append")]
        rate: u64,
    },
    /// Both sides on this machine: a destination process, a running test VM migrated to it
    /// over loopback TCP, the guest's own verification on the destination.
    Demo {
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        mig: VmMigArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One end of the ping-pong soak: holds at most one test VM and obeys line commands on
    /// standard input (see `crates/cli/src/soak.rs`).
    #[command(hide = true)]
    SoakPeer(crate::soak::SoakPeerArgs),
}

/// Asks the operator whether to resume or discard, for at most `wait`; no answer (stdin
/// closed, or the time is up) is a discard: the VM must not run twice.
fn ask_operator(wait: Duration) -> (Undecided, String) {
    use std::io::BufRead;
    eprintln!(
        "the source VM is stopped here with its state intact, and the destination may be \
         running it. Type `resume` (only if the destination is known not to run it) or \
         `discard`, within {:.0} s:",
        wait.as_secs_f64()
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.trim() == "resume" => return (Undecided::Resume, "the operator".into()),
            Ok(l) if l.trim() == "discard" => return (Undecided::Discard, "the operator".into()),
            Ok(l) => eprintln!("{:?}: type `resume` or `discard`", l.trim()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return (
                    Undecided::Discard,
                    format!("no answer within {:.0} s", wait.as_secs_f64()),
                );
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return (Undecided::Discard, "no operator (stdin closed)".into());
            }
        }
    }
}

fn entries(o: &livemig::engine::Outcome) -> String {
    match &o.vcpu_entries {
        Some(e) => format!(" (guest entries per vCPU {e:?})"),
        None => String::new(),
    }
}

fn say_verification(v: &Verification, side: &str) {
    if v.ok {
        println!(
            "{side}: the guest verified all {} pages of its working set (steps per vCPU {:?})",
            v.pages, v.steps
        );
    } else {
        println!("{side}: GUEST VERIFICATION FAILED:");
        for f in &v.failures {
            println!("  {f}");
        }
    }
}

fn kvm_ok() -> Result<()> {
    livemig_kvm::kvm_usable().map_err(|why| anyhow::anyhow!("KVM is not usable here: {why}"))
}

/// What a test VM owns through the host platform (`--device`, `--mock-dma`). Drop it after
/// the engine's `Source`/`Destination` (which own the devices) and after
/// `GuestMonitor::clear_routes` (the routed ports hold a handle on the first device).
struct Owned {
    host: Host,
    uart: Option<Arc<RegionPorts>>,
}

impl Owned {
    /// Opens the host platform over `t`'s RAM and routes the guest's UART ports.
    fn open(t: &TestVm, dev: &VmDeviceArgs) -> Result<Option<Owned>> {
        if !dev.any() {
            return Ok(None);
        }
        let host = Host::open(
            &HostConfig {
                devices: dev.devices.clone(),
                mock_dma: dev.mock_dma,
                sysfs: None,
            },
            t.vm.memory().clone(),
        )
        .map_err(|e| anyhow::anyhow!("{}", livemig::error::chain(&e)))?;
        for l in host.describe() {
            eprintln!("host: {l}");
        }
        let uart = if dev.guest_uart {
            let d = host
                .devices()
                .first()
                .context("--guest-uart needs a --device")?;
            let p = Arc::new(RegionPorts::new(d, 0).map_err(|e| anyhow::anyhow!("{e}"))?);
            t.monitor
                .route(GUEST_UART_PORT, p.len(), p.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            eprintln!(
                "host: the guest's UART at ports {GUEST_UART_PORT:#x}+{} is {}'s BAR0",
                p.len(),
                d.name
            );
            Some(p)
        } else {
            None
        };
        Ok(Some(Owned { host, uart }))
    }

    /// Port accesses the device refused, as a line (none: `None`).
    fn uart_errors(&self) -> Option<String> {
        let (n, first) = self.uart.as_ref()?.errors();
        (n > 0).then(|| format!("{n} UART port accesses failed: {}", first.join("; ")))
    }
}

/// One line on the VM's CPU model as the migration sees it: what the vCPU record holds and
/// the CPUID digest of the compat identity.
fn say_cpu_model(t: &TestVm) {
    let entries = livemig_kvm::state::cpuid_entries(t.vm.cpuid());
    eprintln!(
        "test VM: vCPU state {}, CPUID digest {:016x} (from this host's KVM_GET_SUPPORTED_CPUID)",
        livemig_kvm::state::Holds::for_cpuid(&entries).describe(),
        livemig_kvm::state::cpuid_digest(&entries)
    );
}

/// The guest configuration for `dev` (the UART's port base).
fn guest_config(vm: &VmArgs, dev: &VmDeviceArgs) -> livemig_kvm::TestVmConfig {
    let mut cfg = vm.config();
    if dev.guest_uart {
        cfg.uart = Some(GUEST_UART_PORT);
    }
    cfg
}

/// The mock device's writer over the last quarter of low RAM, which must be above the guest's
/// working sets and mapped for DMA.
fn mock_dma_writer(t: &TestVm, o: &Owned, rate: u64) -> Result<Workload> {
    let mock = o
        .host
        .mock()
        .context("--mock-dma: the host has no mock device")?;
    let low = t.vm.memory().regions()[0];
    let quarter = (low.size / 4) & !0xfff;
    let start = low.gpa + low.size - quarter;
    let ws_end = (16u64 << 20) + u64::from(t.cfg.vcpus) * u64::from(t.cfg.pages) * 4096;
    if start < ws_end {
        bail!(
            "--mock-dma: the device's range {start:#x}+{quarter:#x} (the last quarter of low RAM)              overlaps the guest's working sets, which end at {ws_end:#x}; give more --ram"
        );
    }
    if !o
        .host
        .dma_ranges()
        .iter()
        .any(|&(g, s)| start >= g && start + quarter <= g + s)
    {
        bail!(
            "--mock-dma: the device's range {start:#x}+{quarter:#x} is not mapped for DMA              (mapped: {:x?})",
            o.host.dma_ranges()
        );
    }
    eprintln!(
        "host: the mock device writes {start:#x}+{quarter:#x} at {rate} writes/s, tracked by its          dirty HWPT only"
    );
    Workload::start(vec![(
        WorkloadConfig {
            name: "mock DMA".into(),
            range: (start, quarter),
            rate,
            seed: 0xd3a_d3a,
        },
        mock.writer(t.vm.memory().clone()),
    )])
    .map_err(|e| anyhow::anyhow!("{e}"))
}

#[derive(Serialize)]
struct RunJson {
    config: String,
    dirty_logging: String,
    /// The throttle held throughout (`--throttle`).
    throttle_percent: u8,
    /// Pages each vCPU wrote per second, from 0.5 s into the run to its end.
    pages_per_s: Vec<u64>,
    verification: Verification,
}

fn run(vm: &VmArgs, time: Duration, throttle: u8, json: bool) -> Result<()> {
    kvm_ok()?;
    let t = TestVm::boot(&vm.config()).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !json {
        eprintln!(
            "test VM running: {} vCPUs x {} pages at {} pages/s{}; {}",
            vm.vcpus,
            vm.pages,
            vm.rate,
            if throttle > 0 {
                format!(", throttled {throttle}%")
            } else {
                String::new()
            },
            t.vm.dirty_choice().reason
        );
    }
    t.vm.set_throttle(throttle);
    // The write rate: steps (from the guest's progress reports) from 0.5 s in to the end.
    let settle = Duration::from_millis(500).min(time / 2);
    std::thread::sleep(settle);
    let (t0, s0) = (Instant::now(), t.monitor.steps());
    std::thread::sleep(time - settle);
    let (dt, s1) = (t0.elapsed().as_secs_f64(), t.monitor.steps());
    t.vm.set_throttle(0);
    let pages_per_s: Vec<u64> = s1
        .iter()
        .zip(&s0)
        .map(|(b, a)| (b.saturating_sub(*a) as f64 / dt) as u64)
        .collect();
    let v = verify(&t)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&RunJson {
                config: format!("{vm:?}"),
                dirty_logging: t.vm.dirty_choice().reason.clone(),
                throttle_percent: throttle,
                pages_per_s,
                verification: v,
            })?
        );
    } else {
        eprintln!("write rate per vCPU (pages/s): {pages_per_s:?}");
        say_verification(&v, "test VM");
        if !v.ok {
            bail!("the guest's verification failed");
        }
    }
    Ok(())
}

/// CPU time (user + system) this process has used so far, microseconds.
fn process_cpu_us() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

#[derive(Serialize)]
struct IncomingJson {
    received: ReceiveReport,
    /// CPU time this process used from listening to the migration's end (all threads, user +
    /// system), microseconds.
    cpu_us: u64,
    /// Steps per vCPU right after the destination started (the sequence continues).
    resumed_steps: Vec<u64>,
    /// When a vCPU first entered the guest after the start, CLOCK_REALTIME ns (the end of
    /// the downtime as `cargo xtask bench-peer` measures it).
    first_vcpu_entry_ns: Option<u64>,
    verification: Verification,
}

/// Wraps `devices[at]` so its record is dropped (a negative control).
fn drop_record(devices: &mut Vec<Box<dyn livemig::device::MigDevice>>, at: usize) -> Result<()> {
    if devices.len() <= at {
        bail!("there is no device {at} whose record could be dropped");
    }
    let inner = devices.remove(at);
    eprintln!(
        "negative control: the record of {} will be dropped",
        inner.name()
    );
    let state = inner.state().map_err(|e| anyhow::anyhow!("{e}"))?;
    devices.insert(at, Box::new(DropRecord { inner, state }));
    Ok(())
}

fn incoming(
    listen: &str,
    (vm, dev, faults): (&VmArgs, &VmDeviceArgs, &DestFaults),
    chan: &crate::secure::ChannelArgs,
    json: bool,
) -> Result<()> {
    let sec = &chan.security()?;
    faults.check()?;
    if faults.x_corrupt_stream_at.is_some() {
        bail!("--x-corrupt-stream-at is a `host incoming` control");
    }
    kvm_ok()?;
    let t = TestVm::prepare(&guest_config(vm, dev)).map_err(|e| anyhow::anyhow!("{e}"))?;
    say_cpu_model(&t);
    let mut owned = Owned::open(&t, dev)?;
    let devices = match owned.as_mut() {
        Some(o) => {
            o.host
                .destination()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .devices
        }
        None => Vec::new(),
    };
    let mut dp = platform::destination(&t.vm, devices, true).map_err(|e| anyhow::anyhow!("{e}"))?;
    if vm.x_drop_vcpu_state {
        drop_record(&mut dp.devices, 0)?;
    }
    if dev.x_drop_device_state {
        drop_record(&mut dp.devices, 1)?;
    }
    // Device 0 of `host incoming` is the VM's device 1 (after the vCPU state).
    faults.wrap(&mut dp.devices, 1)?;
    if let Some(path) = &dev.dump_ram {
        let inner = dp
            .vcpus
            .take()
            .context("the destination has no vCPU start")?;
        dp.vcpus = Some(Box::new(DumpThenStart {
            inner,
            memory: t.vm.memory().clone(),
            path: path.clone(),
        }));
    }
    let mut dest = Destination::new(dp);
    faults.arm(&mut dest);
    dest.set_phase_deadline(chan.phase_deadline());
    let cpu0 = process_cpu_us();
    let fds_before = livemig_host::open_fds().map_err(|e| anyhow::anyhow!("{e}"))?;
    let received = match crate::net::receive_one(
        listen,
        &mut dest,
        true,
        (!json).then_some("a running test VM "),
        sec,
    ) {
        Ok(r) => r,
        Err(e) => {
            // The engine's decision, not an inference.
            let o = dest.outcome();
            let said = match o.runs {
                Runs::Here => "the VM runs on the destination",
                Runs::NotHere => "the VM does not run on the destination",
                Runs::Undecided => {
                    "whether the VM runs on the destination is undecided (the source stays \
                     stopped until its operator decides)"
                }
            };
            // The attempt's connections and data fds are closed (the VM and its devices
            // stay open until this process ends).
            let fds = livemig_host::open_fds().map_err(|e| anyhow::anyhow!("{e}"))?;
            bail!(
                "{e:#}; {said}: {}{}; open fds {fds_before} before the attempt, {fds} after",
                o.why,
                entries(o)
            );
        }
    };
    let cpu_us = process_cpu_us() - cpu0;
    // The vCPUs run from here: the guest carries on where the source stopped (an idle guest
    // makes no progress to wait for; its verification below shows it runs).
    let resumed = if vm.idle {
        if let Some(path) = &dev.ram_digest {
            crate::testvm::ram_digest(t.vm.memory(), path)?;
        }
        t.monitor.steps()
    } else {
        t.wait_progress(&vec![0; vm.vcpus as usize], Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let mut v = verify(&t)?;
    if !vm.idle
        && let Some(path) = &dev.ram_digest
    {
        crate::testvm::ram_digest(t.vm.memory(), path)?;
    }
    if let Some(e) = owned.as_ref().and_then(Owned::uart_errors) {
        v.ok = false;
        v.failures.push(e);
    }
    drop(dest);
    t.monitor.clear_routes();
    drop(owned);
    let ok = v.ok;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&IncomingJson {
                received,
                cpu_us,
                resumed_steps: resumed,
                first_vcpu_entry_ns: t.vm.first_entry_after_start_ns(),
                verification: v,
            })?
        );
    } else {
        println!(
            "destination: {} pages and {} zero pages received, loaded in {:.1} ms; the VM runs \
             here ({}{}; steps per vCPU {:?})",
            received.pages,
            received.zero_pages,
            received.load_us as f64 / 1e3,
            received.outcome.why,
            entries(&received.outcome),
            resumed
        );
        say_verification(&v, "destination");
    }
    if !ok {
        bail!("the guest's verification failed on the destination");
    }
    Ok(())
}

#[derive(Serialize)]
struct MigrateJson {
    dirty_logging: String,
    /// CPU time this process used from connecting to the migration's end (all threads, vCPUs
    /// included, user + system), microseconds.
    cpu_us: u64,
    /// The VM was migrated paused (`--paused`).
    paused: bool,
    ring_full_exits: u64,
    steps_at_stop: Vec<u64>,
    /// Pages per second the guest wrote (all vCPUs) over the warm-up's last half second.
    write_rate_before: u64,
    /// When the engine's stop had every vCPU parked, CLOCK_REALTIME ns (the start of the
    /// downtime as `cargo xtask bench-peer` measures it).
    vcpus_paused_at_ns: Option<u64>,
    report: MigrationReport,
}

/// After a failed migration that left the VM running on the source: the guest moves on and
/// still verifies, and the attempt left no descriptor behind (connections, data fds); as a
/// clause of the error message.
fn runs_here(t: &TestVm, paused: bool, e: &livemig::Error, fds_before: usize) -> Result<String> {
    let fds = livemig_host::open_fds().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = String::new();
    if !paused {
        let at = t.monitor.steps();
        let now = t
            .wait_progress(&at, Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let v = verify(t)?;
        if !v.ok {
            bail!(
                "migration failed: {}; the source resumed, but its guest's verification failed: \
                 {:?}",
                e.chain(),
                v.failures
            );
        }
        out = format!(
            "; its guest moved on (steps per vCPU {at:?} -> {now:?}) and verified {} pages",
            v.pages
        );
    }
    Ok(format!(
        "{out}; open fds {fds_before} before the attempt, {fds} after"
    ))
}

fn migrate(
    to: &str,
    (vm, dev, faults): (&VmArgs, &VmDeviceArgs, &SourceFaults),
    mig: &VmMigArgs,
    sec: &crate::secure::Security,
    decision_wait: Duration,
    json: bool,
) -> Result<MigrateJson> {
    kvm_ok()?;
    let t = TestVm::prepare(&guest_config(vm, dev)).map_err(|e| anyhow::anyhow!("{e}"))?;
    say_cpu_model(&t);
    let mut owned = Owned::open(&t, dev)?;
    t.start().map_err(|e| anyhow::anyhow!("{e}"))?;
    if !json {
        eprintln!("test VM running; {}", t.vm.dirty_choice().reason);
    }
    let dma = match &owned {
        Some(o) if dev.mock_dma => Some(mock_dma_writer(&t, o, dev.dma_rate)?),
        _ => None,
    };
    // The guest's write rate over the warm-up's last half second (at most half of it).
    let window = Duration::from_millis(500).min(mig.warmup / 2);
    std::thread::sleep(mig.warmup - window);
    let (t0, s0) = (Instant::now(), t.monitor.steps());
    std::thread::sleep(window);
    let write_rate = (t.monitor.steps().iter().sum::<u64>() - s0.iter().sum::<u64>()) as f64
        / t0.elapsed().as_secs_f64().max(1e-9);
    if mig.x_guest_shutdown {
        t.monitor.command_all(livemig_kvm::guest::command::SHUTDOWN);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        // The first vCPU's unexpected exit stops the whole VM (livemig-kvm parks every vCPU
        // for good), so the others may never reach their own triple fault.
        while t.vm.failures().is_empty() {
            if std::time::Instant::now() >= end {
                bail!("--x-guest-shutdown: no vCPU stopped within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if mig.paused {
        t.vm.pause(livemig_kvm::vm::pause::OPERATOR);
        if let Some(w) = &dma {
            w.pause();
        }
    }
    let (devices, iommu, endpoints) = match owned.as_mut() {
        Some(o) => (
            o.host
                .source_devices()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            o.host.iommu_tracker().map_err(|e| anyhow::anyhow!("{e}"))?,
            o.host.dma_endpoints(),
        ),
        None => (Vec::new(), None, Vec::new()),
    };
    let mut sp =
        platform::source(&t.vm, devices, iommu, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    sp.dma_endpoints = endpoints;
    if let Some(w) = &dma {
        // A stopped VM's devices do no DMA: the mock device pauses with the vCPUs.
        let kvm = std::mem::replace(&mut sp.vcpus, Box::new(PauseTogether(Vec::new())));
        sp.vcpus = Box::new(PauseTogether(vec![kvm, w.vcpus()]));
    }
    let stopping = faults.apply(&mut sp)?;
    if faults.x_drop_final_harvest.is_some() {
        // The engine pauses the vCPUs once, when stop-and-copy begins: that arms the fault.
        let inner = std::mem::replace(&mut sp.vcpus, Box::new(PauseTogether(Vec::new())));
        sp.vcpus = Box::new(FlagOnPause {
            inner,
            flag: stopping,
        });
    }
    let mut source = Source::new(sp, mig.config());
    // `--max-bandwidth` holds while the VM runs; with the VM stopped the rest goes unpaced,
    // as QEMU lifts max-bandwidth at its switchover (see `livemig::link::Unpace`).
    let unpace = livemig::link::Unpace::new();
    let lift = unpace.clone();
    let pb = crate::report::progress(json, &mut source, move |e| {
        if matches!(e, livemig::engine::Event::Phase(livemig::Phase::StopCopy)) {
            lift.lift();
        }
    });
    let cpu0 = process_cpu_us();
    let fds_before = livemig_host::open_fds().map_err(|e| anyhow::anyhow!("{e}"))?;
    let conn = crate::secure::dial(to, sec)?;
    // `--max-bandwidth`: the main connection paced to it, the page channels to their share.
    let bw = mig.max_bandwidth;
    let conn = crate::secure::Conn {
        data: Box::new(
            livemig::link::Paced::new(conn.data, bw, livemig::link::Cut::new())
                .unpaced_by(unpace.clone()),
        ),
        ..conn
    };
    let page_bw = bw / u64::from(mig.channels);
    let r = source.migrate_channels(
        conn,
        &mut crate::net::page_channels(to, page_bw, &unpace, sec),
    );
    let cpu_us = process_cpu_us() - cpu0;
    pb.finish_and_clear();
    let report = match r {
        Ok(r) => r,
        Err(e) => {
            // Where the VM runs is the engine's decision, not a guess from guest progress.
            let o = source.outcome().clone();
            match o.runs {
                Runs::Here => {
                    let runs = runs_here(&t, mig.paused, &e, fds_before)?;
                    bail!(
                        "migration failed: {}; the VM runs on the source{}{}{runs} (the \
                         destination discarded it)",
                        e.chain(),
                        if mig.paused {
                            ", paused by its operator"
                        } else {
                            ""
                        },
                        entries(&o)
                    )
                }
                Runs::NotHere => bail!(
                    "migration failed: {}; the VM does not run on the source: {}",
                    e.chain(),
                    o.why
                ),
                Runs::Undecided => {
                    eprintln!("migration failed: {}", e.chain());
                    let (choice, by) = match mig.undecided {
                        Undecided::Ask => ask_operator(decision_wait),
                        other => (other, "--undecided".into()),
                    };
                    if choice == Undecided::Resume {
                        source
                            .resume()
                            .map_err(|r| anyhow::anyhow!("resuming the source: {}", r.chain()))?;
                        let runs = runs_here(&t, mig.paused, &e, fds_before)?;
                        bail!(
                            "migration failed: {}; the VM runs on the source again, resumed by \
                             {by}{}{runs}",
                            e.chain(),
                            entries(source.outcome())
                        );
                    }
                    let cleanup = source
                        .discard()
                        .map_err(|r| anyhow::anyhow!("discarding the source: {}", r.chain()))?;
                    bail!(
                        "migration failed: {}; the source VM was discarded by {by}{}: it runs on \
                         the destination or nowhere (the destination's log says which){}",
                        e.chain(),
                        entries(source.outcome()),
                        if cleanup.is_empty() {
                            String::new()
                        } else {
                            format!("; cleanup: {}", cleanup.join("; "))
                        }
                    );
                }
            }
        }
    };
    if let Some(w) = &dma
        && let Some(e) = w.error()
    {
        bail!("the mock device's DMA failed: {e}");
    }
    // A vCPU that stopped on an exit this VMM does not handle (e.g. KVM_EXIT_SHUTDOWN after a
    // triple fault, when kvm_amd has already INIT-reset it) is migrated in that state: the
    // engine moves what KVM holds. Say so here rather than leave it to the destination.
    let failed = t.vm.failures();
    if !failed.is_empty() {
        bail!(
            "the migration completed and the VM runs on the destination, but on the source it \
             had stopped before the handover: {} (the destination received it in that state)",
            failed.join("; ")
        );
    }
    if let Some(path) = &dev.dump_ram {
        // The VM (vCPUs and DMA) is stopped: the engine does not resume a migrated source.
        crate::testvm::dump_ram(t.vm.memory(), path)?;
    }
    if let Some(path) = &dev.ram_digest {
        crate::testvm::ram_digest(t.vm.memory(), path)?;
    }
    let uart_errors = owned.as_ref().and_then(Owned::uart_errors);
    drop(source);
    t.monitor.clear_routes();
    drop(owned);
    if let Some(e) = uart_errors {
        bail!("the migration completed, but {e}");
    }
    let out = MigrateJson {
        dirty_logging: t.vm.dirty_choice().reason.clone(),
        cpu_us,
        paused: mig.paused,
        ring_full_exits: t.vm.ring_full_exits(),
        steps_at_stop: t.monitor.steps(),
        write_rate_before: write_rate as u64,
        vcpus_paused_at_ns: t.vm.engine_paused_at_ns(),
        report,
    };
    if !json {
        print_report(&out.report);
        println!(
            "source: {}; ring-full exits {}",
            out.dirty_logging, out.ring_full_exits
        );
    }
    Ok(out)
}

fn demo(vm: &VmArgs, mig: &VmMigArgs, json: bool, fallback: fn(bool) -> Result<()>) -> Result<()> {
    if let Err(e) = kvm_ok() {
        println!("{e}; running the simulated migration instead");
        return fallback(json);
    }
    // Mutual TLS between the two processes, with a self-signed certificate each made for
    // this run (each pins the other's): the demo runs the way a migration should.
    let dir = std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = |n: &str| dir.join(n);
    let names = ["livemig-demo".to_string()];
    let src_fp = crate::secure::keygen(&names, &file("src.pem"), &file("src.key"))?;
    let dst_fp = crate::secure::keygen(&names, &file("dst.pem"), &file("dst.key"))?;
    let sec = crate::secure::ChannelArgs {
        tls_cert: Some(file("src.pem")),
        tls_key: Some(file("src.key")),
        tls_peer: vec![dst_fp],
        ..Default::default()
    }
    .security();
    let exe = std::env::current_exe().context("finding the livemig binary")?;
    let mut child = Command::new(exe)
        .args(["vm", "incoming", "--listen", "127.0.0.1:0", "--json"])
        .arg("--tls-cert")
        .arg(file("dst.pem"))
        .arg("--tls-key")
        .arg(file("dst.key"))
        .args(["--tls-peer", &src_fp])
        .args(vm.to_flags())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the destination process")?;
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("the destination process said {line:?}"))?
        .to_string();
    if !json {
        eprintln!("destination process {} listening on {addr}", child.id());
    }
    let t0 = Instant::now();
    let none = (VmDeviceArgs::default(), SourceFaults::default());
    let src = sec.and_then(|sec| {
        migrate(
            &addr,
            (vm, &none.0, &none.1),
            mig,
            &sec,
            Duration::from_secs(60),
            json,
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest)?;
    let status = child.wait()?;
    let src = src?;
    let dest: serde_json::Value = serde_json::from_str(&rest)
        .with_context(|| format!("the destination process printed {rest:?} ({status})"))?;
    let ok = status.success() && dest["verification"]["ok"] == serde_json::Value::Bool(true);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "source": src,
                "destination": dest,
                "verified": ok,
                "seconds": t0.elapsed().as_secs_f64(),
            }))?
        );
    } else {
        let steps = &dest["resumed_steps"];
        println!(
            "destination process: the guest resumed (steps per vCPU {steps}, source stopped at {:?}) \
             and verified {} pages: {}",
            src.steps_at_stop,
            dest["verification"]["pages"],
            if ok { "all intact" } else { "FAILED" }
        );
        if let Some(f) = dest["verification"]["failures"].as_array() {
            for x in f {
                println!("  {x}");
            }
        }
    }
    if !ok {
        bail!("the migrated guest's verification failed ({status})");
    }
    Ok(())
}

/// Runs a `livemig vm` command. Where KVM is not usable, `vm demo` runs `fallback` instead
/// (`livemig simulate` with its defaults, which `main` passes).
pub fn main(cmd: VmCmd, fallback: fn(bool) -> Result<()>) -> Result<()> {
    match cmd {
        VmCmd::Run {
            vm,
            time,
            throttle,
            json,
        } => run(&vm, time, throttle, json),
        VmCmd::Incoming {
            listen,
            vm,
            dev,
            faults,
            chan,
            json,
        } => incoming(&listen, (&vm, &dev, &faults), &chan, json),
        VmCmd::Migrate {
            to,
            vm,
            dev,
            faults,
            mig,
            chan,
            json,
            chart,
        } => {
            let wait = chan.phase_deadline().unwrap_or(Duration::from_secs(3600));
            let out = migrate(
                &to,
                (&vm, &dev, &faults),
                &mig,
                &chan.security()?,
                wait,
                json,
            )?;
            if let Some(path) = chart {
                let title = format!(
                    "livemig vm migrate: {} vCPU(s) x {} pages at {} pages/s{}",
                    vm.vcpus,
                    vm.pages,
                    vm.rate,
                    if mig.paused { ", paused" } else { "" }
                );
                crate::chart::write_report(&path, &title, &out.report)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            Ok(())
        }
        VmCmd::Demo { vm, mig, json } => demo(&vm, &mig, json, fallback),
        VmCmd::SoakPeer(args) => crate::soak::peer(args),
        VmCmd::Image {
            output,
            print_append,
            pages,
            rate,
            vcpus,
        } => {
            std::fs::write(&output, livemig_kvm::guest::IMAGE)
                .with_context(|| format!("writing {}", output.display()))?;
            if print_append {
                kvm_ok()?;
                let khz = livemig_kvm::guest::host_tsc_khz().map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut append = livemig_kvm::guest::cmdline(
                    vcpus,
                    pages,
                    livemig_kvm::guest::period_ticks(khz, rate),
                    false,
                );
                if vcpus > 1 {
                    // QEMU's APs wait for INIT-SIPI-SIPI; vCPU 0 sends it.
                    append += &livemig_kvm::guest::cmdline_sipi(khz);
                }
                println!("{append}");
            }
            Ok(())
        }
    }
}
