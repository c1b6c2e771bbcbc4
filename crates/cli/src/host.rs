//! `livemig host`: migrate real VFIO devices and guest RAM mapped into an iommufd IOAS between
//! two processes over TCP (`livemig-host`), with writer threads standing in for vCPUs.
//!
//! Options starting with `--x-` inject faults for tests (the rig's fault and negative-control
//! cases) and are hidden from `--help`, like QEMU's `x-` properties: they are not an interface.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use livemig::Phase;
use livemig::bitmap::PageBitmap;
use livemig::device::MigDevice;
use livemig::engine::{
    Destination, DestinationEvent, Event, MigrationReport, ReceiveReport, Source, SourceConfig,
};
use livemig::tracker::{BoxError, DirtyTracker, TrackingMode};
use livemig_host::workload::{WorkloadConfig, vmm_writer};
use livemig_host::{Host, HostConfig, Workload};
use livemig_kvm::{Backing, VmMemory};
use livemig_vfio::MigrationState;
use serde::Serialize;

use crate::args::{parse_duration, parse_size};

#[derive(Subcommand)]
pub enum HostCmd {
    /// Receive guest RAM and device state into this host's devices (RESUMING → RUNNING).
    Incoming {
        /// Address to listen on (host:port; port 0 picks one; "listening on ADDR" is the
        /// first line of standard output).
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        chan: crate::secure::ChannelArgs,
        /// After RUNNING, save every device's state once more (RUNNING → STOP → STOP_COPY,
        /// read, → STOP → RUNNING) and put it in the report, to compare with the source's.
        #[arg(long)]
        save_again: bool,
        #[command(flatten)]
        faults: DestFaults,
    },
    /// Migrate guest RAM and the devices to `livemig host incoming` over TCP while writer
    /// threads dirty RAM.
    Migrate {
        /// Destination address (host:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        chan: crate::secure::ChannelArgs,
        #[command(flatten)]
        work: WorkArgs,
        /// How device DMA is tracked: auto, iommu or device.
        #[arg(long, default_value = "auto")]
        tracking: TrackingMode,
        /// Downtime limit.
        #[arg(long, default_value = "300ms", value_parser = parse_duration)]
        downtime: Duration,
        /// Stop-and-copy after this many rounds regardless.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// Do not use device PRE_COPY.
        #[arg(long)]
        no_precopy: bool,
        /// Connections that carry pages: 1, or 2 to 64 page channels beside the main one.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        channels: u32,
        /// After a successful migration, save every (stopped) device's state once more
        /// (STOP → STOP_COPY, read, → STOP) and put it in the report.
        #[arg(long)]
        save_again: bool,
        /// Print each phase and round on standard error as it happens.
        #[arg(long)]
        events: bool,
        #[command(flatten)]
        faults: SourceFaults,
    },
}

#[derive(Args, Clone, Debug)]
pub struct HostArgs {
    /// A VFIO device: cdev path, PCI address or mdev UUID (repeat, in migration order; the
    /// destination lists its devices in the same order).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Guest RAM as SIZE or SIZE@BASE (guest-physical; IOVA = GPA).
    #[arg(long, default_value = "64MiB@0")]
    ram: String,
    /// Back guest RAM with this shared file (created or grown, never truncated): another
    /// process can compare or prepare it.
    #[arg(long)]
    mem_file: Option<PathBuf>,
    /// Add the iommufd selftest's mock device as a DMA endpoint (needs CONFIG_IOMMUFD_TEST).
    #[arg(long)]
    mock_dma: bool,
    /// Write the JSON report here (also printed with --json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the JSON report on standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone, Debug)]
pub struct WorkArgs {
    /// Page writes per second by the vCPU stand-in (through vm-memory: the VMM's write log).
    #[arg(long, default_value_t = 2000)]
    cpu_rate: u64,
    /// Range the vCPU stand-in writes, SIZE@OFFSET into RAM (default: the first quarter).
    #[arg(long)]
    cpu_range: Option<String>,
    /// Emulated DMA writes per second by the mock device (IOMMU dirty bits only).
    #[arg(long, default_value_t = 0)]
    dma_rate: u64,
    /// Range the mock device writes, SIZE@OFFSET into RAM (default: the second quarter).
    #[arg(long)]
    dma_range: Option<String>,
    /// How long the writers run before the migration starts.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    warmup: Duration,
}

#[derive(Args, Clone, Debug, Default)]
pub struct SourceFaults {
    /// Negative control: discard one tracker's final (stop-and-copy) harvest, `iommu` (the
    /// pages the mock device dirtied last are never resent) or `cpu` (the writer's).
    #[arg(long, hide = true)]
    pub(crate) x_drop_final_harvest: Option<String>,
}

#[derive(Args, Clone, Debug, Default)]
pub struct DestFaults {
    /// Die (SIGKILL) on reaching: compat, receive, round:N, stop-copy or resume.
    #[arg(long, hide = true)]
    pub(crate) x_die_at: Option<String>,
    /// Flip one byte of the incoming stream at this offset.
    #[arg(long, hide = true)]
    pub(crate) x_corrupt_stream_at: Option<u64>,
    /// Hand device 0 a corrupted copy of its state (the kernel driver refuses it).
    #[arg(long, hide = true)]
    pub(crate) x_corrupt_device_state: bool,
    /// Negative control: device 0 ignores the state it is given (a no-op RESUMING).
    #[arg(long, hide = true)]
    pub(crate) x_noop_resume: bool,
}

impl DestFaults {
    /// Refuses an unknown `--x-die-at`.
    pub(crate) fn check(&self) -> Result<()> {
        if let Some(s) = &self.x_die_at {
            let known = ["compat", "receive", "stop-copy", "resume"].contains(&s.as_str())
                || s.strip_prefix("round:")
                    .is_some_and(|r| r.parse::<u32>().is_ok());
            if !known {
                bail!("--x-die-at {s:?}: expected compat, receive, round:N, stop-copy or resume");
            }
        }
        Ok(())
    }

    /// Wraps `devices[at]` for `--x-corrupt-device-state` / `--x-noop-resume`.
    pub(crate) fn wrap(&self, devices: &mut Vec<Box<dyn MigDevice>>, at: usize) -> Result<()> {
        if self.x_corrupt_device_state || self.x_noop_resume {
            if devices.len() <= at {
                bail!("device faults need at least one --device");
            }
            let inner = devices.remove(at);
            devices.insert(
                at,
                Box::new(Faulty {
                    inner,
                    corrupt: self.x_corrupt_device_state,
                    noop: self.x_noop_resume,
                }),
            );
        }
        Ok(())
    }

    /// Arms `--x-die-at` on `dest`: SIGKILL to this process at that point.
    pub(crate) fn arm(&self, dest: &mut Destination) {
        if let Some(spec) = self.x_die_at.clone() {
            dest.on_event(move |e| {
                if die_matches(&spec, e) {
                    eprintln!("x-die-at {spec}: killing this process");
                    // SAFETY: kill(2) on this process; no memory is involved.
                    unsafe {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                }
            });
        }
    }
}

impl SourceFaults {
    /// Applies `--x-drop-final-harvest` to `platform`; the flag returned must be set when
    /// stop-and-copy begins.
    pub(crate) fn apply(
        &self,
        platform: &mut livemig::engine::SourcePlatform,
    ) -> Result<Arc<std::sync::atomic::AtomicBool>> {
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        match self.x_drop_final_harvest.as_deref() {
            None => {}
            Some("iommu") => {
                let inner = platform
                    .iommu
                    .take()
                    .context("--x-drop-final-harvest iommu: there is no IOMMU tracker")?;
                platform.iommu = Some(Box::new(DropFinalHarvest {
                    inner,
                    stopping: stopping.clone(),
                }));
            }
            Some("cpu") => {
                let inner = std::mem::replace(&mut platform.cpu, Box::new(NoTracker));
                platform.cpu = Box::new(DropFinalHarvest {
                    inner,
                    stopping: stopping.clone(),
                });
            }
            Some(other) => bail!("--x-drop-final-harvest {other:?}: expected iommu or cpu"),
        }
        Ok(stopping)
    }
}

/// `SIZE` or `SIZE@BASE`.
fn parse_at(s: &str) -> Result<(u64, u64)> {
    let (size, base) = match s.split_once('@') {
        Some((a, b)) => (a, b),
        None => (s, "0"),
    };
    let size = parse_size(size).map_err(|e| anyhow::anyhow!("{s:?}: {e}"))?;
    let base = if let Some(h) = base.strip_prefix("0x") {
        u64::from_str_radix(h, 16).map_err(|e| anyhow::anyhow!("{s:?}: base: {e}"))?
    } else {
        parse_size(base).map_err(|e| anyhow::anyhow!("{s:?}: base: {e}"))?
    };
    if size == 0 || size % 4096 != 0 || base % 4096 != 0 {
        bail!("{s:?}: size and base must be non-zero multiples of 4 KiB");
    }
    Ok((base, size))
}

impl HostArgs {
    fn open(&self) -> Result<(Host, Arc<VmMemory>)> {
        let (base, size) = parse_at(&self.ram).context("--ram")?;
        let backing = match &self.mem_file {
            Some(p) => Backing::File(p.clone()),
            None => Backing::Memfd,
        };
        let memory =
            Arc::new(VmMemory::new(&[(base, size)], backing).map_err(|e| anyhow::anyhow!("{e}"))?);
        let cfg = HostConfig {
            devices: self.devices.clone(),
            mock_dma: self.mock_dma,
            ..Default::default()
        };
        let host = Host::open(&cfg, memory.clone())
            .map_err(|e| anyhow::anyhow!("{}", livemig::error::chain(&e)))?;
        Ok((host, memory))
    }

    fn emit<T: Serialize>(&self, report: &T) -> Result<()> {
        let text = serde_json::to_string_pretty(report)?;
        if let Some(p) = &self.report {
            std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
        }
        if self.json {
            println!("{text}");
        }
        Ok(())
    }
}

/// A device as the report shows it.
#[derive(Serialize, Debug, Default)]
struct DeviceJson {
    name: String,
    /// The state the kernel reports at the end.
    state: String,
    /// Its state saved once more (hex), with `--save-again`.
    saved_again: Option<String>,
}

#[derive(Serialize, Debug, Default)]
struct SourceJson {
    role: &'static str,
    /// `migrated`, `recovered` (the source runs again) or `stopped` (after End: the
    /// destination's outcome is unknown, the source stays stopped with its state intact).
    outcome: &'static str,
    /// The engine's decision of whether the VM runs here, and why.
    runs: Option<livemig::engine::Outcome>,
    error: Option<String>,
    error_phase: Option<String>,
    setup: Vec<String>,
    report: Option<MigrationReport>,
    devices: Vec<DeviceJson>,
    cpu_writes: u64,
    /// Writes after the failure (the writers run again after recovery).
    writes_after_recovery: u64,
    /// A writer thread's failure (it stops writing).
    writer_error: Option<String>,
    fds_before: usize,
    fds_after: usize,
}

#[derive(Serialize, Debug, Default)]
struct DestinationJson {
    role: &'static str,
    /// `running` or `failed` (devices reset, memory released).
    outcome: &'static str,
    /// The engine's decision of whether the VM runs here, and why.
    runs: Option<livemig::engine::Outcome>,
    error: Option<String>,
    setup: Vec<String>,
    received: Option<ReceiveReport>,
    devices: Vec<DeviceJson>,
    fds_before: usize,
    fds_after: usize,
    /// The source that connected (with its certificate's fingerprint under TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fds() -> Result<usize> {
    livemig_host::open_fds().map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn run(cmd: HostCmd) -> Result<()> {
    match cmd {
        HostCmd::Incoming {
            listen,
            host,
            chan,
            save_again,
            faults,
        } => incoming(&listen, &host, save_again, &faults, &chan),
        HostCmd::Migrate {
            to,
            host,
            chan,
            work,
            tracking,
            downtime,
            max_rounds,
            no_precopy,
            channels,
            save_again,
            events,
            faults,
        } => {
            let cfg = SourceConfig {
                tracking,
                precopy: !no_precopy,
                downtime_limit: downtime,
                max_rounds,
                channels,
                ..SourceConfig::default()
            };
            migrate(
                (&to, &chan.security()?),
                &host,
                &work,
                cfg,
                save_again,
                events,
                &faults,
            )
        }
    }
}

/// Saves `d`'s state from `from` (STOP or RUNNING) through STOP_COPY and returns to `from`.
fn save_again(d: &mut dyn MigDevice, from: MigrationState) -> Result<Vec<u8>> {
    d.transition(MigrationState::StopCopy)
        .with_context(|| format!("{}: to STOP_COPY", d.name()))?;
    let mut out = Vec::new();
    d.save(&mut out)
        .with_context(|| format!("{}: reading the state", d.name()))?;
    d.transition(from)
        .with_context(|| format!("{}: back to {from}", d.name()))?;
    Ok(out)
}

fn device_json(d: &mut dyn MigDevice, again: Option<MigrationState>) -> Result<DeviceJson> {
    let saved_again = match again {
        Some(from) => Some(hex(&save_again(d, from)?)),
        None => None,
    };
    Ok(DeviceJson {
        name: d.name().to_string(),
        state: d
            .state()
            .map(|s| s.to_string())
            .unwrap_or_else(|e| format!("unknown ({e})")),
        saved_again,
    })
}

/// A placeholder while a tracker is being wrapped.
struct NoTracker;

impl DirtyTracker for NoTracker {
    fn name(&self) -> String {
        "none".into()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
    fn harvest(&mut self, _into: &mut PageBitmap) -> Result<u64, BoxError> {
        Ok(0)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A tracker with its final (stop-and-copy) harvest discarded: the negative control that the
/// end-to-end RAM comparison must catch.
struct DropFinalHarvest {
    inner: Box<dyn DirtyTracker>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl DirtyTracker for DropFinalHarvest {
    fn name(&self) -> String {
        format!("{} (final harvest dropped)", self.inner.name())
    }
    fn start(&mut self) -> Result<(), BoxError> {
        self.inner.start()
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            let mut sink = PageBitmap::new(into.pages(), livemig::memory::PAGE_SIZE);
            return self.inner.harvest(&mut sink).map(|_| 0);
        }
        self.inner.harvest(into)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        self.inner.stop()
    }
}

fn migrate(
    (to, sec): (&str, &crate::secure::Security),
    args: &HostArgs,
    work: &WorkArgs,
    cfg: SourceConfig,
    again: bool,
    events: bool,
    faults: &SourceFaults,
) -> Result<()> {
    let mut out = SourceJson {
        role: "source",
        fds_before: fds()?,
        ..Default::default()
    };
    {
        let (mut host, memory) = args.open()?;
        out.setup = host.describe().to_vec();
        let ram = memory.regions()[0];
        let quarter = (ram.size / 4) & !0xfff;
        let range = |spec: &Option<String>, default: u64| -> Result<(u64, u64)> {
            match spec {
                Some(s) => {
                    let (off, len) = parse_at(s)?;
                    if off + len > ram.size {
                        bail!(
                            "{s:?} runs past the end of guest RAM ({:#x} bytes)",
                            ram.size
                        );
                    }
                    Ok((ram.gpa + off, len))
                }
                None => Ok((ram.gpa + default, quarter)),
            }
        };
        let mut writers = vec![(
            WorkloadConfig {
                name: "cpu".into(),
                range: range(&work.cpu_range, 0).context("--cpu-range")?,
                rate: work.cpu_rate,
                seed: 0x5eed_c0de,
            },
            vmm_writer(memory.clone()),
        )];
        if work.dma_rate > 0 {
            let Some(mock) = host.mock() else {
                bail!("--dma-rate needs --mock-dma (the DMA comes from the mock device)");
            };
            writers.push((
                WorkloadConfig {
                    name: "dma".into(),
                    range: range(&work.dma_range, quarter).context("--dma-range")?,
                    rate: work.dma_rate,
                    seed: 0xd3a_d3a,
                },
                mock.writer(memory.clone()),
            ));
        }
        let workload = Workload::start(writers).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut platform = host.source(&workload).map_err(|e| anyhow::anyhow!("{e}"))?;
        let stopping = faults.apply(&mut platform)?;
        std::thread::sleep(work.warmup);
        let mut source = Source::new(platform, cfg);
        let flag = stopping.clone();
        source.on_event(move |e| {
            if let Event::Phase(Phase::StopCopy) = e {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if events {
                match e {
                    Event::Phase(p) => eprintln!("event: phase {p}"),
                    Event::Round(r) => eprintln!(
                        "event: round {} sent {} pages, {} dirty",
                        r.round, r.pages, r.dirty_pages
                    ),
                }
            }
        });
        let conn = crate::secure::dial(to, sec)?;
        let result = source.migrate_channels(
            conn,
            &mut crate::net::page_channels(to, 0, &livemig::link::Unpace::new(), sec),
        );
        let writes_then = workload.writes();
        out.cpu_writes = writes_then;
        match result {
            Ok(r) => {
                out.outcome = "migrated";
                out.report = Some(r);
            }
            Err(e) => {
                out.error = Some(e.chain());
                out.error_phase = e.phase().map(|p| p.to_string());
                // The engine's decision: stopped when the destination may run the VM (it
                // answered Undecided, or its answer was lost after End); otherwise the writers
                // run again.
                let stopped = source.is_stopped();
                out.outcome = if stopped { "stopped" } else { "recovered" };
                if !stopped {
                    std::thread::sleep(Duration::from_millis(300));
                    out.writes_after_recovery = workload.writes() - writes_then;
                }
            }
        }
        out.runs = Some(source.outcome().clone());
        let from = if out.outcome == "recovered" {
            MigrationState::Running
        } else {
            MigrationState::Stop
        };
        workload.pause();
        for d in &mut source.platform_mut().devices {
            let again = (again && out.outcome == "migrated").then_some(from);
            out.devices.push(device_json(&mut *d.dev, again)?);
        }
        out.writer_error = workload.error();
        // Devices first (they hold the domains), then the writers, the host and RAM.
        drop(source);
        drop(workload);
        drop(host);
        drop(memory);
    }
    out.fds_after = fds()?;
    args.emit(&out)?;
    if !args.json {
        match &out.report {
            Some(r) => crate::report::print_report(r),
            None => eprintln!(
                "migration failed: {}; the source {}",
                out.error.as_deref().unwrap_or("?"),
                if out.outcome == "stopped" {
                    "stays stopped with its state intact"
                } else {
                    "runs again"
                }
            ),
        }
    }
    if out.outcome != "migrated" {
        bail!("migration failed ({})", out.outcome);
    }
    if let Some(e) = &out.writer_error {
        bail!("the writers failed: {e}");
    }
    Ok(())
}

/// Flips one byte of the stream at `at`.
struct Corrupt<R> {
    inner: R,
    at: u64,
    pos: u64,
}

impl<R: Read> Read for Corrupt<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.at >= self.pos && self.at < self.pos + n as u64 {
            buf[(self.at - self.pos) as usize] ^= 0x5a;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A device wrapper for destination faults: a corrupted or ignored state.
struct Faulty {
    inner: Box<dyn MigDevice>,
    corrupt: bool,
    noop: bool,
}

impl MigDevice for Faulty {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn compat(&self) -> livemig::device::DeviceCompat {
        self.inner.compat()
    }
    fn state(&self) -> Result<MigrationState, livemig_vfio::Error> {
        self.inner.state()
    }
    fn transition(&mut self, t: MigrationState) -> Result<(), livemig_vfio::Error> {
        self.inner.transition(t)
    }
    fn precopy(
        &mut self,
        sink: &mut Vec<u8>,
        max: u64,
    ) -> Result<livemig_vfio::data::PrecopyRound, livemig_vfio::Error> {
        self.inner.precopy(sink, max)
    }
    fn precopy_pending(&mut self) -> Result<u64, livemig_vfio::Error> {
        self.inner.precopy_pending()
    }
    fn precopy_info(&mut self) -> Result<livemig_vfio::data::PrecopyInfo, livemig_vfio::Error> {
        self.inner.precopy_info()
    }
    fn enable_precopy_info_v2(
        &mut self,
    ) -> Result<livemig_vfio::PrecopyInfoV2, livemig_vfio::Error> {
        self.inner.enable_precopy_info_v2()
    }
    fn stop_copy_size(&self) -> Result<u64, livemig_vfio::Error> {
        self.inner.stop_copy_size()
    }
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, livemig_vfio::Error> {
        self.inner.save(sink)
    }
    fn load(&mut self, bytes: &[u8]) -> Result<(), livemig_vfio::Error> {
        if self.noop {
            return Ok(());
        }
        if self.corrupt {
            let mut b = bytes.to_vec();
            for x in b.iter_mut().take(8) {
                *x ^= 0xff;
            }
            return self.inner.load(&b);
        }
        self.inner.load(bytes)
    }
    fn reset(&mut self) -> Result<(), livemig_vfio::Error> {
        self.inner.reset()
    }
}

fn die_matches(spec: &str, e: DestinationEvent) -> bool {
    match (spec, e) {
        ("compat", DestinationEvent::Phase(Phase::Compat)) => true,
        ("receive", DestinationEvent::Phase(Phase::Receive)) => true,
        ("stop-copy", DestinationEvent::StopCopy) => true,
        ("resume", DestinationEvent::Phase(Phase::Resume)) => true,
        (s, DestinationEvent::Round(n)) => s
            .strip_prefix("round:")
            .and_then(|r| r.parse::<u32>().ok())
            .is_some_and(|r| r == n),
        _ => false,
    }
}

fn incoming(
    listen: &str,
    args: &HostArgs,
    again: bool,
    faults: &DestFaults,
    chan: &crate::secure::ChannelArgs,
) -> Result<()> {
    let sec = &chan.security()?;
    faults.check()?;
    let mut out = DestinationJson {
        role: "destination",
        fds_before: fds()?,
        ..Default::default()
    };
    {
        let (mut host, memory) = args.open()?;
        out.setup = host.describe().to_vec();
        let mut platform = host.destination().map_err(|e| anyhow::anyhow!("{e}"))?;
        faults.wrap(&mut platform.devices, 0)?;
        let mut dest = Destination::new(platform);
        dest.set_phase_deadline(chan.phase_deadline());
        faults.arm(&mut dest);
        let l = std::net::TcpListener::bind(listen)
            .with_context(|| format!("listening on {listen}"))?;
        println!("listening on {}", l.local_addr()?);
        std::io::stdout().flush()?;
        // Under TLS the peer is authenticated here, before anything of the migration is read;
        // connections that fail their handshake are logged and do not end the wait.
        let mut incoming = crate::secure::Incoming::new(&l, sec);
        let conn = incoming.main()?;
        out.peer = Some(conn.peer.clone());
        let (stream, back, abort) = (conn.back, conn.data, conn.abort);
        // One connection, or the main one of several: the stream's first record says.
        let mut accept = crate::net::accept_page_channels(&mut incoming);
        let result = match faults.x_corrupt_stream_at {
            Some(at) => dest.receive_channels(
                Corrupt {
                    inner: stream,
                    at,
                    pos: 0,
                },
                back,
                abort,
                &mut accept,
            ),
            None => dest.receive_channels(stream, back, abort, &mut accept),
        };
        let ok = match result {
            Ok(r) => {
                out.outcome = "running";
                out.received = Some(r);
                true
            }
            Err(e) => {
                out.outcome = "failed";
                out.error = Some(e.chain());
                false
            }
        };
        out.runs = Some(dest.outcome().clone());
        let platform = dest.platform_mut();
        for d in &mut platform.devices {
            let a = (again && ok).then_some(MigrationState::Running);
            out.devices.push(device_json(&mut **d, a)?);
        }
        drop(dest);
        drop(host);
        drop(memory);
    }
    out.fds_after = fds()?;
    args.emit(&out)?;
    if out.outcome != "running" {
        bail!(
            "incoming migration failed: {}",
            out.error.as_deref().unwrap_or("?")
        );
    }
    if !args.json {
        let r = out.received.as_ref().expect("running has a report");
        println!(
            "destination: {} pages and {} zero pages received; devices {}",
            r.pages,
            r.zero_pages,
            out.devices
                .iter()
                .map(|d| format!("{} {}", d.name, d.state))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
