//! The migration engine: [`Source`] and [`Destination`].
//!
//! ```text
//!  source                                              destination
//!  plan dirty tracking (blocked? stop here)
//!  Compat x N, Round 0 ──────────────────────────────> check vs own devices
//!                      <──────────── CompatOk | CompatRefused(reasons)   (nothing moved yet)
//!  start trackers, devices -> PRE_COPY                 devices -> RESUMING
//!  round r: harvest (r = 1: all RAM), Pages/ZeroPages,
//!           device PRE_COPY data, Round r ───────────> write pages, load device data
//!  until remaining / bandwidth <= downtime limit (or round limit)
//!  pause vCPUs, devices -> STOP_COPY, final harvest,
//!  pages, device STOP_COPY data, End, close ─────────> End: devices RESUMING -> STOP (validate)
//!                      <──────────── Resumed | Failed     -> RUNNING
//!  devices stay STOP (the VM now runs there)
//! ```
//!
//! Any failure before the source has sent End returns the source to RUNNING (devices back to
//! RUNNING, resetting those that cannot, trackers stopped, vCPUs resumed) and the destination
//! discards. After End the destination decides: `Failed` from it also resumes the source; a
//! lost return path after End leaves the outcome unknown, so the source stays stopped with its
//! state intact and the error says so ([`Source::resume`] restarts it once an operator knows
//! the destination did not start). The destination never starts without the whole stream.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_stream::{
    Compat as StreamCompat, DirtyCaps, Limits, Phase as StreamPhase, Reader, Record, Round, Writer,
    WriterOptions,
};
use livemig_vfio::MigrationState;
use livemig_viommu::policy::MigrationGuard;
use serde::Serialize;

use crate::bitmap::PageBitmap;
use crate::compat::{self, DeviceDescriptor};
use crate::control::Message;
use crate::device::{DeviceCompat, MigDevice};
use crate::error::{Error, Phase, Result};
use crate::link::DataSink;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::tracker::{self, Chosen, DeviceDirtyCaps, DirtyTracker, TrackingMode};

/// Pauses and resumes the guest's vCPUs.
pub trait Vcpus: Send {
    /// Stops every vCPU (returns once none runs).
    fn pause(&mut self);
    /// Lets them run again.
    fn resume(&mut self);
}

/// A source device with what can track its DMA.
pub struct SourceDevice {
    /// The device.
    pub dev: Box<dyn MigDevice>,
    /// Whether its IOMMU domain tracks dirty pages (the auto-domain outcome), with the reason
    /// when not.
    pub iommu_dirty: std::result::Result<(), String>,
    /// Its DMA log, if it has one.
    pub dma_log: Option<Box<dyn DirtyTracker>>,
}

impl std::fmt::Debug for SourceDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceDevice")
            .field("name", &self.dev.name())
            .field("iommu_dirty", &self.iommu_dirty)
            .field("dma_log", &self.dma_log.as_ref().map(|t| t.name()))
            .finish()
    }
}

/// Everything the source side needs from the platform.
pub struct SourcePlatform {
    /// Guest RAM.
    pub memory: Arc<dyn GuestMemory>,
    /// Assigned devices, in migration order.
    pub devices: Vec<SourceDevice>,
    /// The IOMMU tracker covering devices whose domain tracks dirty pages.
    pub iommu: Option<Box<dyn DirtyTracker>>,
    /// The vCPU dirty log.
    pub cpu: Box<dyn DirtyTracker>,
    /// vCPU control.
    pub vcpus: Box<dyn Vcpus>,
    /// IOMMU page sizes in use (bit n = 2^n bytes).
    pub page_size_mask: u64,
    /// The vIOMMU migration guard, if the VM has a virtio-iommu: checked before the start and
    /// after every round.
    pub viommu: Option<(Arc<MigrationGuard>, livemig_viommu::policy::ViommuView)>,
}

impl std::fmt::Debug for SourcePlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourcePlatform")
            .field("memory", &self.memory.size())
            .field("devices", &self.devices)
            .field("iommu", &self.iommu.as_ref().map(|t| t.name()))
            .field("page_size_mask", &self.page_size_mask)
            .finish()
    }
}

impl SourcePlatform {
    /// The per-device descriptors the source sends.
    pub fn descriptors(&self) -> Vec<DeviceDescriptor> {
        self.devices
            .iter()
            .map(|d| DeviceDescriptor {
                device: d.dev.compat(),
                iommu_dirty_tracking: d.iommu_dirty.is_ok(),
                page_size_mask: self.page_size_mask,
            })
            .collect()
    }
}

/// Source settings.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// How device DMA is tracked.
    pub tracking: TrackingMode,
    /// Use device PRE_COPY where the device supports it.
    pub precopy: bool,
    /// The longest acceptable stop (vCPUs paused until the destination runs).
    pub downtime_limit: Duration,
    /// Stop-and-copy after this many rounds even if the estimate is above the limit.
    pub max_rounds: u32,
    /// CRC32C on every record.
    pub checksums: bool,
    /// Bound on one PRE_COPY read of one device per round.
    pub device_precopy_max: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            tracking: TrackingMode::Auto,
            precopy: true,
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            checksums: true,
            device_precopy_max: 64 << 20,
        }
    }
}

/// One round's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundReport {
    /// Round number (1-based; the stop-and-copy round is the last).
    pub round: u32,
    /// Pages the trackers reported dirty for this round (round 1: all RAM).
    pub dirty_pages: u64,
    /// Pages sent with payload.
    pub pages: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Device state bytes sent.
    pub device_bytes: u64,
    /// Stream bytes of the round.
    pub bytes: u64,
    /// Wall time of the round, microseconds.
    pub elapsed_us: u64,
    /// Measured throughput, bytes/s.
    pub bandwidth: u64,
    /// After the round: estimated bytes left for stop-and-copy.
    pub remaining_estimate: u64,
}

/// What a successful migration did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MigrationReport {
    /// The tracker chosen per device: (device, tracker).
    pub tracking: Vec<(String, Chosen)>,
    /// Pre-copy rounds.
    pub rounds: Vec<RoundReport>,
    /// The stop-and-copy round.
    pub stop_copy: RoundReport,
    /// Whether pre-copy converged (estimate within the limit) rather than hit the round limit.
    pub converged: bool,
    /// vCPU pause to destination RUNNING, microseconds.
    pub downtime_us: u64,
    /// The limit it was held to, microseconds.
    pub downtime_limit_us: u64,
    /// Whole migration, microseconds.
    pub total_us: u64,
    /// Stream bytes.
    pub bytes: u64,
    /// Dirty pages per second during pre-copy (trackers' reports / time).
    pub dirty_rate: u64,
    /// Destination load time after End, microseconds.
    pub destination_load_us: u64,
}

/// Progress as the engine goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A phase begins.
    Phase(Phase),
    /// A round ended.
    Round(&'a RoundReport),
}

type Hook = Box<dyn FnMut(&Event<'_>) + Send>;

/// The source side.
pub struct Source {
    platform: SourcePlatform,
    cfg: SourceConfig,
    hook: Option<Hook>,
    paused: bool,
    /// The tracker plan while tracking runs (what was started is what gets stopped).
    tracking: Option<Vec<Chosen>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("platform", &self.platform)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// Where the source is after a failed attempt.
struct Failure {
    error: Error,
    /// False only for the handover ambiguity.
    resume: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure {
            error,
            resume: true,
        }
    }
}

impl Source {
    /// A source over `platform`.
    pub fn new(platform: SourcePlatform, cfg: SourceConfig) -> Source {
        Source {
            platform,
            cfg,
            hook: None,
            paused: false,
            tracking: None,
        }
    }

    /// Calls `hook` on every phase change and after every round.
    pub fn on_event(&mut self, hook: impl FnMut(&Event<'_>) + Send + 'static) {
        self.hook = Some(Box::new(hook));
    }

    /// The platform (for inspection after a migration).
    pub fn platform(&self) -> &SourcePlatform {
        &self.platform
    }

    /// The platform, mutably (for example to inject faults between attempts).
    pub fn platform_mut(&mut self) -> &mut SourcePlatform {
        &mut self.platform
    }

    fn emit(&mut self, e: Event<'_>) {
        if let Some(h) = self.hook.as_mut() {
            h(&e);
        }
    }

    fn device_caps(&self) -> Vec<DeviceDirtyCaps> {
        self.platform
            .devices
            .iter()
            .map(|d| DeviceDirtyCaps {
                name: d.dev.name().to_string(),
                iommu: d.iommu_dirty.clone(),
                dma_logging: d.dma_log.is_some(),
            })
            .collect()
    }

    /// Whether migration could start now; the reason if not.
    pub fn check(&self) -> Result<Vec<Chosen>> {
        let plan = tracker::plan(self.cfg.tracking, &self.device_caps()).map_err(Error::Blocked)?;
        if plan.contains(&Chosen::Iommu) && self.platform.iommu.is_none() {
            return Err(Error::Blocked(
                "a device is planned onto IOMMU dirty tracking but the platform has no IOMMU \
                 tracker"
                    .into(),
            ));
        }
        if let Some((guard, view)) = &self.platform.viommu {
            let blockers = guard.policy().blockers(view);
            if !blockers.is_empty() {
                let b: Vec<String> = blockers.iter().map(|b| b.to_string()).collect();
                return Err(Error::Blocked(b.join("; ")));
            }
        }
        Ok(plan)
    }

    /// Migrates over `data` (the stream) and `back` (the return path). On failure the source
    /// runs again (except after a lost handover, see the module documentation).
    pub fn migrate<W: DataSink, R: Read>(
        &mut self,
        data: W,
        mut back: R,
    ) -> Result<MigrationReport> {
        let plan = self.check()?;
        if let Some((guard, view)) = &self.platform.viommu {
            guard.begin(view).map_err(|b| {
                Error::Blocked(
                    b.iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
        }
        let t0 = Instant::now();
        let result = self.run(&plan, data, &mut back);
        if let Some((guard, _)) = &self.platform.viommu {
            guard.end();
        }
        match result {
            Ok(mut report) => {
                self.stop_trackers();
                report.total_us = t0.elapsed().as_micros() as u64;
                Ok(report)
            }
            Err(mut f) if f.resume => {
                // A write that failed because the destination gave up: its reason is on the
                // return path.
                if matches!(f.error, Error::Stream { .. } | Error::Link { .. }) {
                    if let (Some(phase), Ok(Message::Failed(reason))) =
                        (f.error.phase(), Message::read_from(&mut back))
                    {
                        f.error = Error::Remote {
                            phase,
                            reason: format!("{reason} (the source saw: {})", f.error),
                        };
                    }
                }
                match self.recover() {
                    Ok(()) => Err(f.error),
                    Err(recovery) => Err(Error::RecoveryFailed {
                        error: Box::new(f.error),
                        recovery,
                    }),
                }
            }
            Err(f) => {
                self.stop_trackers();
                Err(f.error)
            }
        }
    }

    /// Returns a stopped source to RUNNING (after a migration whose outcome was unknown, once
    /// the destination is known not to run).
    pub fn resume(&mut self) -> Result<()> {
        self.recover().map_err(|recovery| Error::RecoveryFailed {
            error: Box::new(Error::Cancelled {
                phase: Phase::Recovery,
                reason: "resume requested".into(),
            }),
            recovery,
        })
    }

    fn stop_trackers(&mut self) -> Vec<String> {
        let mut errs = Vec::new();
        let Some(plan) = self.tracking.take() else {
            return errs;
        };
        for t in active_trackers(&mut self.platform, &plan) {
            if let Err(e) = t.stop() {
                errs.push(format!("{}: {e}", t.name()));
            }
        }
        errs
    }

    fn recover(&mut self) -> std::result::Result<(), String> {
        self.emit(Event::Phase(Phase::Recovery));
        let mut errs = self.stop_trackers();
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if d.dev.state().ok() == Some(MigrationState::Running) {
                continue;
            }
            if let Err(e) = d.dev.transition(MigrationState::Running) {
                // The way out of ERROR (or of a refused arc) is a reset.
                if let Err(r) = d.dev.reset() {
                    errs.push(format!(
                        "device {i} ({}): back to RUNNING failed ({e}) and reset failed ({r})",
                        d.dev.name()
                    ));
                    continue;
                }
            }
            match d.dev.state() {
                Ok(MigrationState::Running) => {}
                other => errs.push(format!(
                    "device {i} ({}): left in {other:?} instead of RUNNING",
                    d.dev.name()
                )),
            }
        }
        if self.paused {
            self.platform.vcpus.resume();
            self.paused = false;
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    fn run<W: DataSink, R: Read>(
        &mut self,
        plan: &[Chosen],
        data: W,
        back: &mut R,
    ) -> std::result::Result<MigrationReport, Failure> {
        let mut report = MigrationReport {
            tracking: self
                .platform
                .devices
                .iter()
                .zip(plan)
                .map(|(d, &c)| (d.dev.name().to_string(), c))
                .collect(),
            downtime_limit_us: self.cfg.downtime_limit.as_micros() as u64,
            ..Default::default()
        };

        // Compat exchange: nothing has moved yet.
        let mut phase = Phase::Compat;
        self.emit(Event::Phase(phase));
        let opts = WriterOptions {
            checksums: self.cfg.checksums,
            producer: format!("livemig {}", env!("CARGO_PKG_VERSION")),
            ..WriterOptions::default()
        };
        let serr = |phase: Phase| move |source| Error::Stream { phase, source };
        let mut w = Writer::new(data, opts).map_err(serr(phase))?;
        let descriptors = self.platform.descriptors();
        for (i, d) in descriptors.iter().enumerate() {
            let c = &d.device;
            let caps = if d.iommu_dirty_tracking {
                DirtyCaps::IOMMU
            } else {
                0
            } | if c.dma_logging { DirtyCaps::DEVICE } else { 0 };
            w.compat(&StreamCompat {
                device: i as u32,
                identity: &c.identity,
                compat: &c.compat,
                page_size_mask: d.page_size_mask,
                dirty_caps: DirtyCaps(caps),
                migration_flags: c.migration_flags,
            })
            .map_err(serr(phase))?;
        }
        w.round(&Round::default()).map_err(serr(phase))?;
        w.flush().map_err(serr(phase))?;
        match read_reply(back, phase)? {
            Message::CompatOk => {}
            Message::CompatRefused(reason) => return Err(Error::Refused { phase, reason }.into()),
            Message::Failed(reason) => return Err(Error::Remote { phase, reason }.into()),
            other => {
                return Err(Error::Protocol {
                    phase,
                    reason: format!("expected the compat answer, got {other:?}"),
                }
                .into());
            }
        }

        // Start tracking, then PRE_COPY.
        phase = Phase::Start;
        self.emit(Event::Phase(phase));
        self.tracking = Some(plan.to_vec());
        for t in active_trackers(&mut self.platform, plan) {
            t.start().map_err(|e| Error::Tracker {
                phase,
                tracker: t.name(),
                reason: e.to_string(),
            })?;
        }
        let precopy: Vec<bool> = self
            .platform
            .devices
            .iter()
            .map(|d| self.cfg.precopy && d.dev.compat().migration_flags & 4 != 0)
            .collect();
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if precopy[i] {
                d.dev
                    .transition(MigrationState::PreCopy)
                    .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
            }
        }

        let mem = Arc::clone(&self.platform.memory);
        let pages = mem.size() / PAGE_SIZE;
        let mut dirty = PageBitmap::new(pages, PAGE_SIZE);
        let mut scratch = PageBitmap::new(pages, PAGE_SIZE);
        dirty.set_all();
        // The first harvest only clears what the trackers saw before the start.
        self.harvest(plan, &mut scratch, phase)?;
        let mut round = 0u32;
        let mut dirty_reported = 0u64;
        let precopy_t0 = Instant::now();
        let mut bandwidth = 0u64;
        loop {
            round += 1;
            phase = Phase::PreCopy(round);
            self.emit(Event::Phase(phase));
            let rt = Instant::now();
            let b0 = w.bytes_written();
            let mut r = RoundReport {
                round,
                dirty_pages: dirty.count(),
                ..Default::default()
            };
            send_pages(&mut w, &*mem, &dirty, &mut r, phase)?;
            dirty.clear();
            for (i, d) in self.platform.devices.iter_mut().enumerate() {
                if !precopy[i] {
                    continue;
                }
                let mut buf = Vec::new();
                d.dev
                    .precopy(&mut buf, self.cfg.device_precopy_max)
                    .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
                if !buf.is_empty() {
                    w.device_state(i as u32, StreamPhase::PreCopy, &buf)
                        .map_err(serr(phase))?;
                    r.device_bytes += buf.len() as u64;
                }
            }
            r.bytes = w.bytes_written() - b0;
            w.round(&Round {
                round,
                pages: r.pages,
                zero_pages: r.zero_pages,
                dirty_pages: r.dirty_pages,
                device_bytes: r.device_bytes,
                stream_bytes: r.bytes,
                elapsed_us: rt.elapsed().as_micros() as u64,
            })
            .map_err(serr(phase))?;
            w.flush().map_err(serr(phase))?;
            r.elapsed_us = rt.elapsed().as_micros().max(1) as u64;
            // Rounds too small to time say little about the link: keep the best estimate.
            let measured = r.bytes.saturating_mul(1_000_000) / r.elapsed_us;
            if r.bytes >= 256 << 10 || bandwidth == 0 {
                bandwidth = bandwidth.max(measured);
            }
            r.bandwidth = bandwidth;

            // The next round's pages, and what stop-and-copy would cost now.
            let found = self.harvest(plan, &mut dirty, phase)?;
            dirty_reported += found;
            let mut remaining = dirty.count() * PAGE_SIZE;
            for (i, d) in self.platform.devices.iter_mut().enumerate() {
                let pending = if precopy[i] {
                    d.dev
                        .precopy_pending()
                        .map_err(|source| dev_err(phase, i, &*d.dev, source))?
                } else {
                    0
                };
                let stop = d
                    .dev
                    .stop_copy_size()
                    .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
                remaining += pending + stop;
            }
            r.remaining_estimate = remaining;
            self.emit(Event::Round(&r));
            report.rounds.push(r);
            if let Some((guard, _)) = &self.platform.viommu {
                if let Some(c) = guard.cancelled() {
                    return Err(Error::Cancelled {
                        phase,
                        reason: c.to_string(),
                    }
                    .into());
                }
            }
            let budget =
                (bandwidth as u128 * self.cfg.downtime_limit.as_micros() / 1_000_000) as u64;
            if remaining <= budget {
                report.converged = true;
                break;
            }
            if round >= self.cfg.max_rounds {
                break;
            }
        }
        let precopy_us = precopy_t0.elapsed().as_micros().max(1) as u64;
        report.dirty_rate = dirty_reported * 1_000_000 / precopy_us;

        // Stop and copy.
        phase = Phase::StopCopy;
        self.emit(Event::Phase(phase));
        let down = Instant::now();
        self.platform.vcpus.pause();
        self.paused = true;
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.dev
                .transition(MigrationState::StopCopy)
                .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
        }
        // Devices are quiesced: the final harvest sees every write they made.
        self.harvest(plan, &mut dirty, phase)?;
        let rt = Instant::now();
        let b0 = w.bytes_written();
        let mut r = RoundReport {
            round: round + 1,
            dirty_pages: dirty.count(),
            bandwidth,
            ..Default::default()
        };
        send_pages(&mut w, &*mem, &dirty, &mut r, phase)?;
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            let mut buf = Vec::new();
            d.dev
                .save(&mut buf)
                .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
            w.device_state(i as u32, StreamPhase::StopCopy, &buf)
                .map_err(serr(phase))?;
            r.device_bytes += buf.len() as u64;
        }
        r.bytes = w.bytes_written() - b0;
        let total = w.bytes_written();
        let mut sink = w.finish().map_err(serr(phase))?;
        sink.close().map_err(|source| Error::Link {
            phase,
            what: "closing the stream",
            source,
        })?;
        drop(sink);
        r.elapsed_us = rt.elapsed().as_micros() as u64;
        report.bytes = total;

        // Handover: the destination decides.
        phase = Phase::Handover;
        self.emit(Event::Phase(phase));
        match Message::read_from(back) {
            Ok(Message::Resumed { load_us }) => {
                report.downtime_us = down.elapsed().as_micros() as u64;
                report.destination_load_us = load_us;
            }
            Ok(Message::Failed(reason)) => return Err(Error::Remote { phase, reason }.into()),
            Ok(other) => {
                return Err(Failure {
                    error: Error::Protocol {
                        phase,
                        reason: format!(
                            "expected Resumed or Failed, got {other:?}; the destination's outcome \
                             is unknown, so the source stays stopped with its state intact"
                        ),
                    },
                    resume: false,
                });
            }
            Err(source) => {
                return Err(Failure {
                    error: Error::Link {
                        phase,
                        what: "lost after the stream ended (the destination's outcome is \
                               unknown, so the source stays stopped with its state intact; \
                               resume it only once the destination is known not to run)",
                        source,
                    },
                    resume: false,
                });
            }
        }
        // The VM runs on the destination: the source's devices go to STOP and stay there.
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.dev
                .transition(MigrationState::Stop)
                .map_err(|source| Failure {
                    error: dev_err(phase, i, &*d.dev, source),
                    resume: false,
                })?;
        }
        self.emit(Event::Round(&r));
        report.stop_copy = r;
        Ok(report)
    }

    fn harvest(&mut self, plan: &[Chosen], into: &mut PageBitmap, phase: Phase) -> Result<u64> {
        let mut n = 0;
        for t in active_trackers(&mut self.platform, plan) {
            n += t.harvest(into).map_err(|e| Error::Tracker {
                phase,
                tracker: t.name(),
                reason: e.to_string(),
            })?;
        }
        Ok(n)
    }
}

/// The trackers `plan` uses: the vCPU log, the IOMMU tracker if any device is planned onto it,
/// and the DMA logs of devices planned onto their own.
fn active_trackers<'a>(
    p: &'a mut SourcePlatform,
    plan: &[Chosen],
) -> Vec<&'a mut Box<dyn DirtyTracker>> {
    let mut trackers: Vec<&mut Box<dyn DirtyTracker>> = vec![&mut p.cpu];
    if plan.contains(&Chosen::Iommu) {
        trackers.extend(p.iommu.iter_mut());
    }
    for (d, c) in p.devices.iter_mut().zip(plan) {
        if *c == Chosen::Device {
            trackers.extend(d.dma_log.iter_mut());
        }
    }
    trackers
}

fn dev_err(phase: Phase, i: usize, d: &dyn MigDevice, source: livemig_vfio::Error) -> Error {
    Error::Device {
        phase,
        index: i as u32,
        name: d.name().to_string(),
        source,
    }
}

fn read_reply<R: Read>(back: &mut R, phase: Phase) -> Result<Message> {
    Message::read_from(back).map_err(|source| Error::Link {
        phase,
        what: "return path",
        source,
    })
}

/// Pages per Pages record batch.
const BATCH: u64 = 256;

fn send_pages<W: Write>(
    w: &mut Writer<W>,
    mem: &dyn GuestMemory,
    dirty: &PageBitmap,
    r: &mut RoundReport,
    phase: Phase,
) -> Result<()> {
    let mut buf = vec![0u8; (BATCH * PAGE_SIZE) as usize];
    for (first, count) in dirty.runs() {
        let mut p = first;
        while p < first + count {
            let n = (first + count - p).min(BATCH);
            let gpa = p * PAGE_SIZE;
            let len = n * PAGE_SIZE;
            if mem.known_zero(gpa, len) {
                w.zero_pages(gpa, PAGE_SIZE as u32, n)
                    .map_err(|source| Error::Stream { phase, source })?;
                r.zero_pages += n;
            } else {
                let b = &mut buf[..len as usize];
                mem.read(gpa, b).map_err(|e| Error::Memory {
                    phase,
                    gpa,
                    reason: e.to_string(),
                })?;
                let wr = w
                    .pages(gpa, PAGE_SIZE as u32, b)
                    .map_err(|source| Error::Stream { phase, source })?;
                r.pages += wr.pages;
                r.zero_pages += wr.zero_pages;
            }
            p += n;
        }
    }
    Ok(())
}

/// Everything the destination side needs from the platform.
pub struct DestinationPlatform {
    /// Guest RAM (zero, or whatever a previous attempt left: every page is written anyway).
    pub memory: Arc<dyn GuestMemory>,
    /// Devices, in the source's order.
    pub devices: Vec<Box<dyn MigDevice>>,
    /// Whether each device's domain tracks dirty pages here.
    pub iommu_dirty: Vec<bool>,
    /// IOMMU page sizes here.
    pub page_size_mask: u64,
}

impl std::fmt::Debug for DestinationPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationPlatform")
            .field("memory", &self.memory.size())
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl DestinationPlatform {
    /// The per-device descriptors of this side.
    pub fn descriptors(&self) -> Vec<DeviceDescriptor> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceDescriptor {
                device: d.compat(),
                iommu_dirty_tracking: self.iommu_dirty.get(i).copied().unwrap_or(false),
                page_size_mask: self.page_size_mask,
            })
            .collect()
    }
}

/// What the destination received.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReceiveReport {
    /// Pages written with payload.
    pub pages: u64,
    /// Pages zeroed.
    pub zero_pages: u64,
    /// Device bytes loaded, per device.
    pub device_bytes: Vec<u64>,
    /// Rounds seen.
    pub rounds: u32,
    /// Stream bytes.
    pub bytes: u64,
    /// End to RUNNING, microseconds.
    pub load_us: u64,
}

/// The destination side.
pub struct Destination {
    platform: DestinationPlatform,
    limits: Limits,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("platform", &self.platform)
            .finish()
    }
}

impl Destination {
    /// A destination over `platform`, reading with the stream's default limits.
    pub fn new(platform: DestinationPlatform) -> Destination {
        Destination {
            platform,
            limits: Limits::default(),
        }
    }

    /// The platform.
    pub fn platform(&self) -> &DestinationPlatform {
        &self.platform
    }

    /// Receives a migration from `data`, answering on `back`. On failure the devices are reset
    /// (the received state discarded), `Failed` is sent if the return path still works, and
    /// the error is returned.
    pub fn receive<R: Read, W: Write>(&mut self, data: R, mut back: W) -> Result<ReceiveReport> {
        let mut touched = false;
        match self.run(data, &mut back, &mut touched) {
            Ok(r) => Ok(r),
            Err(e) => {
                if !matches!(e, Error::Refused { .. }) {
                    let _ = Message::Failed(e.chain()).write_to(&mut back);
                }
                if touched {
                    for d in &mut self.platform.devices {
                        let _ = d.reset();
                    }
                }
                Err(e)
            }
        }
    }

    fn run<R: Read, W: Write>(
        &mut self,
        data: R,
        back: &mut W,
        touched: &mut bool,
    ) -> Result<ReceiveReport> {
        let mut phase = Phase::Compat;
        let serr = |phase: Phase| move |source| Error::Stream { phase, source };
        let mut rd = Reader::new(data, self.limits).map_err(serr(phase))?;
        let mut seen: Vec<DeviceDescriptor> = Vec::new();
        loop {
            match rd.next().map_err(serr(phase))? {
                Some(Record::Compat(c)) => {
                    if c.device as usize != seen.len() {
                        return Err(Error::Protocol {
                            phase,
                            reason: format!(
                                "Compat for device {} where device {} was expected",
                                c.device,
                                seen.len()
                            ),
                        });
                    }
                    seen.push(DeviceDescriptor {
                        device: DeviceCompat {
                            identity: c.identity.to_string(),
                            compat: c.compat.to_vec(),
                            migration_flags: c.migration_flags,
                            dma_logging: c.dirty_caps.device(),
                        },
                        iommu_dirty_tracking: c.dirty_caps.iommu(),
                        page_size_mask: c.page_size_mask,
                    });
                }
                Some(Record::Round(r)) if r.round == 0 => break,
                Some(other) => {
                    return Err(Error::Protocol {
                        phase,
                        reason: format!("{} before the end of the compat section", other.name()),
                    });
                }
                None => {
                    return Err(Error::Protocol {
                        phase,
                        reason: "the stream ended in the compat section".into(),
                    });
                }
            }
        }
        let verdict = compat::check(&seen, &self.platform.descriptors());
        if !verdict.compatible {
            let reason = verdict.reasons.join("; ");
            Message::CompatRefused(reason.clone())
                .write_to(back)
                .map_err(|source| Error::Link {
                    phase,
                    what: "return path",
                    source,
                })?;
            return Err(Error::Refused { phase, reason });
        }
        *touched = true;
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.transition(MigrationState::Resuming)
                .map_err(|source| dev_err(phase, i, &**d, source))?;
        }
        Message::CompatOk
            .write_to(back)
            .map_err(|source| Error::Link {
                phase,
                what: "return path",
                source,
            })?;

        phase = Phase::Receive;
        let mem = Arc::clone(&self.platform.memory);
        let n = self.platform.devices.len();
        let mut report = ReceiveReport {
            device_bytes: vec![0; n],
            ..Default::default()
        };
        let mut stop_copy_seen = vec![false; n];
        let memerr = |gpa: u64| {
            move |e: crate::memory::MemoryError| Error::Memory {
                phase: Phase::Receive,
                gpa,
                reason: e.to_string(),
            }
        };
        let end_at;
        loop {
            let rec = rd.next().map_err(serr(phase))?;
            match rec {
                Some(Record::Pages(p)) => {
                    let ps = u64::from(p.page_size);
                    let end = p.gpa.checked_add(u64::from(p.count) * ps);
                    if end.is_none_or(|e| e > mem.size()) {
                        return Err(Error::Protocol {
                            phase,
                            reason: format!(
                                "Pages at {:#x} ({} x {ps}) outside guest RAM of {:#x} bytes",
                                p.gpa,
                                p.count,
                                mem.size()
                            ),
                        });
                    }
                    mem.write(p.gpa, p.payload).map_err(memerr(p.gpa))?;
                    report.pages += u64::from(p.count);
                }
                Some(Record::ZeroPages(z)) => {
                    let len = u64::from(z.count) * u64::from(z.page_size);
                    mem.zero(z.gpa, len).map_err(memerr(z.gpa))?;
                    report.zero_pages += u64::from(z.count);
                }
                Some(Record::DeviceState(s)) => {
                    let i = s.device as usize;
                    let Some(d) = self.platform.devices.get_mut(i) else {
                        return Err(Error::Protocol {
                            phase,
                            reason: format!("DeviceState for unknown device {i}"),
                        });
                    };
                    if s.phase == StreamPhase::StopCopy {
                        stop_copy_seen[i] = true;
                    }
                    d.load(s.data)
                        .map_err(|source| dev_err(phase, i, &**d, source))?;
                    report.device_bytes[i] += s.data.len() as u64;
                }
                Some(Record::Round(_)) => report.rounds += 1,
                Some(Record::End(_)) => {
                    end_at = Instant::now();
                    break;
                }
                Some(other) => {
                    return Err(Error::Protocol {
                        phase,
                        reason: format!("unexpected {} record", other.name()),
                    });
                }
                None => {
                    return Err(Error::Protocol {
                        phase,
                        reason: "the stream ended without End".into(),
                    });
                }
            }
        }
        // Nothing may follow End.
        if rd.next().map_err(serr(phase))?.is_some() {
            return Err(Error::Protocol {
                phase,
                reason: "records after End".into(),
            });
        }
        report.bytes = rd.offset();
        phase = Phase::Resume;
        if let Some(i) = stop_copy_seen.iter().position(|s| !s) {
            return Err(Error::Protocol {
                phase,
                reason: format!("no STOP_COPY state for device {i}"),
            });
        }
        // RESUMING -> STOP validates and loads; then run.
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.transition(MigrationState::Stop)
                .map_err(|source| dev_err(phase, i, &**d, source))?;
        }
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.transition(MigrationState::Running)
                .map_err(|source| dev_err(phase, i, &**d, source))?;
        }
        report.load_us = end_at.elapsed().as_micros() as u64;
        // From here on the VM runs here: a lost reply must not undo that.
        let _ = Message::Resumed {
            load_us: report.load_us,
        }
        .write_to(back);
        Ok(report)
    }
}
