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
//!                      <──────────── RoundAck r   (to a source whose stream is format 1.1+,
//!                                                  after Capabilities before CompatOk)
//!  until remaining / bandwidth <= downtime limit (or round limit);
//!  wait for the last round's RoundAck (the data in flight lands while the VM runs)
//!  pause vCPUs, P2P devices -> RUNNING_P2P | PRE_COPY_P2P
//!  (all of them), then devices -> STOP_COPY, final harvest,
//!  pages, device STOP_COPY data, End, close ─────────> End: devices RESUMING -> STOP (validate)
//!                      <──────────── Resumed | Failed     -> RUNNING_P2P (all P2P
//!                                                             devices), then -> RUNNING
//!  devices stay STOP (the VM now runs there)
//! ```
//!
//! Any failure before the source has sent End returns the source to RUNNING (devices back to
//! RUNNING, resetting those that cannot, trackers stopped, vCPUs resumed) and the destination
//! discards. After End the destination decides: `Failed` from it also resumes the source; a
//! lost return path after End leaves the outcome unknown, so the source stays stopped with its
//! state intact and the error says so ([`Source::resume`] restarts it once an operator knows
//! the destination did not start). The destination never starts without the whole stream.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use livemig_stream::{
    Channel as StreamChannel, Compat as StreamCompat, DirtyCaps, Limits, Phase as StreamPhase,
    Reader, Record, Round, Writer, WriterOptions,
};
use livemig_vfio::{MigrationFlags, MigrationState, PrecopyInfoV2};
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
use crate::transport::{Abort, CancelHandle, Channel};

/// Pauses and resumes the guest's vCPUs.
pub trait Vcpus: Send {
    /// Stops every vCPU (returns once none runs).
    fn pause(&mut self);
    /// Lets them run again.
    fn resume(&mut self);
    /// Keeps the vCPUs out of the guest for `percent` of the time (0: not at all), enforced by
    /// the host (auto-converge). Returns `false` when the platform cannot throttle.
    fn set_throttle(&mut self, percent: u8) -> bool {
        let _ = percent;
        false
    }
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
    /// Whether it does DMA (false for state-only devices such as vCPU state: no tracker).
    pub does_dma: bool,
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
    /// DMA sources with no migration state of their own (for example the iommufd selftest's
    /// mock device standing in for an assigned device's DMA in the rig): planned like devices
    /// (so an IOMMU-tracked endpoint makes the IOMMU tracker run, and an untracked one blocks
    /// migration), but they send no device section.
    pub dma_endpoints: Vec<DmaEndpoint>,
}

/// A DMA source without migration state (see [`SourcePlatform::dma_endpoints`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaEndpoint {
    /// A name for reports and errors.
    pub name: String,
    /// Whether its IOMMU domain tracks dirty pages, with the reason when not.
    pub iommu_dirty: std::result::Result<(), String>,
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
                migration_flags_known: true,
                dma_logging_limits: None,
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
    /// Throttle the vCPUs when pre-copy does not converge (off by default, as in QEMU).
    pub auto_converge: Option<AutoConverge>,
    /// A hard limit on the stop: stop-and-copy is not started when the estimate already
    /// exceeds it, and is abandoned (the source runs again, with the reason) if it has not
    /// sent End when the limit passes — also when a write is blocked on a destination that
    /// stopped reading: a watchdog aborts the channel at the limit ([`Error::Deadline`]).
    /// `None`: the downtime limit is a target only.
    pub hard_deadline: Option<Duration>,
    /// Connections that carry pages. 1: one connection carries everything. N ≥ 2: the main
    /// connection carries compat, device state and the round summaries, and N more carry the
    /// pages, each round's dirty pages split evenly over them (QEMU's multifd layout); see
    /// [`Source::migrate_channels`]. 0 is refused.
    pub channels: u32,
    /// The link's rate in bytes/s when the caller knows it (a paced or simulated link). With a
    /// hard deadline, a deadline shorter than the devices' STOP_COPY state takes at this rate
    /// is refused before anything starts. `None`: measured as the migration goes.
    pub link_rate: Option<u64>,
}

/// After the stop-and-copy estimate fits the limit, up to this many more pre-copy rounds run
/// while the pages left exceed what the link moves in 1 ms and the guest dirties pages at
/// less than half the link's rate (each such round shrinks the stop).
pub const SETTLE_ROUNDS: u32 = 3;

/// The most page channels a source opens or a destination accepts.
pub const MAX_CHANNELS: u32 = 64;

/// Opens page channel `index` (1-based) of a multi-channel migration: its data direction and a
/// hook that aborts it (see [`Source::migrate_channels`]).
pub type Connect<'a> = dyn FnMut(u32) -> io::Result<(Box<dyn DataSink>, Abort)> + 'a;

/// Accepts the next page channel of a multi-channel migration (in any order: each names its
/// index): its data direction and a hook that aborts it (see [`Destination::receive_channels`]).
pub type Accept<'a> = dyn FnMut() -> io::Result<(Box<dyn Read + Send>, Abort)> + 'a;

/// Auto-converge steps, in percent of vCPU time taken away (QEMU's `cpu-throttle-initial`,
/// `cpu-throttle-increment` and `max-cpu-throttle` defaults: 20, 10, 99).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoConverge {
    /// The first throttle.
    pub initial: u8,
    /// Added each time the dirty rate stays high.
    pub increment: u8,
    /// The most it takes.
    pub max: u8,
}

impl Default for AutoConverge {
    fn default() -> Self {
        AutoConverge {
            initial: 20,
            increment: 10,
            max: 99,
        }
    }
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
            auto_converge: None,
            hard_deadline: None,
            channels: 1,
            link_rate: None,
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
    /// The vCPU throttle in force during the round (percent).
    pub throttle_percent: u8,
    /// The devices' part of `remaining_estimate` (pending PRE_COPY data and STOP_COPY state).
    pub device_estimate: u64,
}

/// Where the downtime went, measured (microseconds). The source's vCPUs stop at the start of
/// `final_harvest_us`; the destination runs at the end of `destination_run_us`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DowntimeReport {
    /// Devices to STOP_COPY (P2P pass included) and the final dirty harvest.
    pub stop_and_harvest_us: u64,
    /// Reading the devices' STOP_COPY state.
    pub device_save_us: u64,
    /// Sending the last pages, the device state and End (into the channel), less any part
    /// the destination's load overlapped (it reads End while this side closes the stream).
    pub send_us: u64,
    /// The rest of the downtime: the data still in flight, the destination catching up with
    /// it, and the answer's way back. The phases add up to the downtime.
    pub in_flight_us: u64,
    /// On the destination: End to every device in STOP (validate and load).
    pub destination_load_us: u64,
    /// On the destination: STOP to RUNNING.
    pub destination_run_us: u64,
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
    /// Why pre-copy did not converge (the dirty rate against the link rate), when it did not.
    pub non_convergence: Option<String>,
    /// vCPU pause to destination RUNNING, microseconds.
    pub downtime_us: u64,
    /// The downtime by phase.
    pub downtime_phases: DowntimeReport,
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
    /// Before stopping the VM, microseconds spent waiting for the destination to acknowledge
    /// the last pre-copy round (data in flight landing while the VM still runs, instead of
    /// during the downtime); 0 with a destination that does not acknowledge rounds.
    pub drain_us: u64,
    /// Stream bytes sent over time: (microseconds since the migration began, bytes so far),
    /// a point at least every [`TIMELINE_STEP_US`] while data moves and at every round's end,
    /// for charts (bytes against time, QEMU's `query-migrate` polled the same way).
    pub timeline: Vec<(u64, u64)>,
    /// Times a device put new initial data on its PRE_COPY stream
    /// (`VFIO_PRECOPY_INFO_REINIT`, Linux 7.3 after the PRECOPY_INFOv2 opt-in); each one held
    /// the switchover back until that data was sent again.
    #[serde(skip_serializing_if = "is_zero")]
    pub device_reinits: u32,
    /// The devices that report re-initialisation (the PRECOPY_INFOv2 opt-in succeeded; not
    /// on Linux 6.12).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reinit_reporting: Vec<usize>,
    /// What went wrong on the source after the destination took over: a device that could not
    /// be moved from STOP_COPY to STOP, a dirty tracker that could not be stopped. The
    /// migration still completed (the VM runs on the destination and the source stays
    /// stopped); what is named needs attention before it is reused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_cleanup: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The spacing of [`MigrationReport::timeline`] points while pages move, microseconds.
pub const TIMELINE_STEP_US: u64 = 10_000;

/// Samples the stream's progress for [`MigrationReport::timeline`].
#[derive(Debug)]
struct Timeline {
    t0: Instant,
    last_us: u64,
    points: Vec<(u64, u64)>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline {
            t0: Instant::now(),
            last_us: 0,
            points: vec![(0, 0)],
        }
    }

    /// Records `bytes` if a step has passed since the last point (or always, if `force`).
    fn sample(&mut self, bytes: u64, force: bool) {
        let now = self.t0.elapsed().as_micros() as u64;
        if force || now >= self.last_us + TIMELINE_STEP_US {
            self.last_us = now;
            self.points.push((now, bytes));
        }
    }
}

/// Bytes sent so far over every channel, shared by the threads that send pages. The count is
/// the live view's (`Live::bytes`), so a progress display reads the same number.
#[derive(Debug)]
struct Progress {
    timeline: Mutex<Timeline>,
    live: Arc<Live>,
}

impl Progress {
    fn new(live: Arc<Live>) -> Progress {
        live.bytes.store(0, Ordering::Relaxed);
        Progress {
            timeline: Mutex::new(Timeline::new()),
            live,
        }
    }

    /// `delta` more bytes went out; a timeline point if one is due (skipped while another
    /// thread holds the timeline).
    fn add(&self, delta: u64) {
        let now = self.live.bytes.fetch_add(delta, Ordering::Relaxed) + delta;
        if let Ok(mut t) = self.timeline.try_lock() {
            t.sample(now, false);
        }
    }

    /// `n` more of the round's dirty pages were sent (data or zero).
    fn pages(&self, n: u64) {
        self.live.round_done.fetch_add(n, Ordering::Relaxed);
    }

    /// The exact total (at a round's end); always a point.
    fn set(&self, total: u64) {
        self.live.bytes.store(total, Ordering::Relaxed);
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sample(total, true);
    }

    fn into_points(self) -> Vec<(u64, u64)> {
        self.timeline
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .points
    }
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

/// What the destination sees as it goes (for progress displays, and for fault injection in
/// tests: a hook may stop the process at an exact point of the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationEvent {
    /// A phase begins: [`Phase::Compat`] once the source's descriptors arrived (before the
    /// verdict is sent), [`Phase::Receive`] after the verdict, [`Phase::Resume`] after End.
    Phase(Phase),
    /// The source's summary of a round arrived (its number; round 0 closes the compat section
    /// and is not reported).
    Round(u32),
    /// The first STOP_COPY device state arrived: the source is in stop-and-copy.
    StopCopy,
}

type DestinationHook = Box<dyn FnMut(DestinationEvent) + Send>;

/// The source side.
pub struct Source {
    platform: SourcePlatform,
    cfg: SourceConfig,
    hook: Option<Hook>,
    paused: bool,
    /// The tracker plan while tracking runs (what was started is what gets stopped).
    tracking: Option<Vec<Chosen>>,
    cancel: CancelHandle,
    /// The hard deadline's watchdog while stop-and-copy runs.
    watchdog: Option<Watchdog>,
    /// Where the current attempt is (for a cancel's error).
    phase: Phase,
    /// The vCPU throttle in force (percent), 0 when none.
    throttle: u8,
    /// What progress displays read.
    live: Arc<Live>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("platform", &self.platform)
            .field("cfg", &self.cfg)
            .field("phase", &self.phase)
            .finish()
    }
}

/// What a progress display reads, shared between the engine and [`ProgressView`]s.
#[derive(Debug, Default)]
struct Live {
    round: AtomicU32,
    round_pages: AtomicU64,
    round_done: AtomicU64,
    bytes: AtomicU64,
    dirty_rate: AtomicU64,
    downtime_us: AtomicU64,
}

impl Live {
    fn begin_round(&self, round: u32, pages: u64) {
        self.round_done.store(0, Ordering::Relaxed);
        self.round_pages.store(pages, Ordering::Relaxed);
        self.round.store(round, Ordering::Relaxed);
    }
}

/// A live view of a source's migration, for progress displays: [`Source::progress_view`]
/// hands one out, and another thread may read it at any time while the migration runs.
#[derive(Debug, Clone)]
pub struct ProgressView(Arc<Live>);

/// One reading of a [`ProgressView`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressSnapshot {
    /// The round under way: 1, 2, ... for pre-copy, then the stop-and-copy round; 0 before the
    /// first.
    pub round: u32,
    /// Dirty pages this round sends.
    pub round_pages: u64,
    /// Of those, pages sent so far (data or zero).
    pub round_done: u64,
    /// Stream bytes sent so far, every channel and round.
    pub bytes: u64,
    /// Pages the guest and its devices dirtied per second in the last round.
    pub dirty_rate: u64,
    /// The downtime stopping after the last round would cost, in microseconds (the remaining
    /// bytes at the measured rate plus the destination devices' load time); 0 before it is
    /// known.
    pub expected_downtime_us: u64,
}

impl ProgressView {
    /// The current values (each read atomically; together they may be a few pages apart).
    pub fn snapshot(&self) -> ProgressSnapshot {
        let l = &self.0;
        ProgressSnapshot {
            round: l.round.load(Ordering::Relaxed),
            round_pages: l.round_pages.load(Ordering::Relaxed),
            round_done: l.round_done.load(Ordering::Relaxed),
            bytes: l.bytes.load(Ordering::Relaxed),
            dirty_rate: l.dirty_rate.load(Ordering::Relaxed),
            expected_downtime_us: l.downtime_us.load(Ordering::Relaxed),
        }
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

/// One attempt's working state, handed from phase to phase.
struct Attempt<W: Write> {
    plan: Vec<Chosen>,
    w: Writer<W>,
    /// The page channels (none: pages go on `w`).
    pages: Vec<Writer<Box<dyn DataSink>>>,
    report: MigrationReport,
    /// Pages to send in the next round.
    dirty: PageBitmap,
    /// Devices that use PRE_COPY.
    precopy: Vec<bool>,
    /// Per device: its initial PRE_COPY data was all read (it reported `initial_bytes` 0 since
    /// it last re-initialised). The switchover waits for every device (vfio.h recommends
    /// leaving PRE_COPY only then); a REINIT clears it again.
    initial_sent: Vec<bool>,
    /// Devices that support the P2P quiescent states.
    p2p: Vec<bool>,
    /// Best measured link rate, bytes/s.
    bandwidth: u64,
    /// Rounds in a row in which the guest dirtied more than half of what the round sent.
    dirty_high: u32,
    /// Bytes against time.
    progress: Progress,
    /// The destination acknowledges rounds.
    round_acks: bool,
    /// The last round the destination acknowledged.
    acked: u32,
    /// The destination's device loads so far, from its acknowledgements: microseconds, bytes.
    dest_load: (u64, u64),
    /// When the compat exchange began (no destination figure can span more time than this).
    started: Instant,
}

impl<W: Write> Attempt<W> {
    /// How long the destination's devices would take to load `bytes` of device state, at the
    /// rate they loaded pre-copy state; `None` before they loaded any.
    fn device_load_estimate_us(&self, bytes: u64) -> Option<u64> {
        let (us, loaded) = self.dest_load;
        (loaded > 0).then(|| {
            (u128::from(bytes) * u128::from(us) / u128::from(loaded)).min(u128::from(u64::MAX))
                as u64
        })
    }

    /// Refuses a round acknowledgement whose figures cannot be true: more device state loaded
    /// than this source sent in the round, or more time spent loading it than the migration
    /// has lasted (the destination's figures steer convergence and the hard deadline).
    fn check_round_ack(&self, round: u32, load_us: u64, bytes: u64) -> Result<(), String> {
        let sent = self
            .report
            .rounds
            .iter()
            .find(|r| r.round == round)
            .map_or(0, |r| r.device_bytes);
        if bytes > sent {
            return Err(format!(
                "the destination says its devices loaded {bytes} bytes in round {round}; the \
                 source sent {sent} bytes of device state in that round"
            ));
        }
        let lasted = self.started.elapsed().as_micros();
        // The two hosts' clocks may run at slightly different rates: 1% and 1 ms of slack.
        if u128::from(load_us) > lasted + lasted / 100 + 1000 {
            return Err(format!(
                "the destination says its devices spent {load_us} us loading round {round}, \
                 longer than the migration has lasted ({lasted} us)"
            ));
        }
        Ok(())
    }
}

impl<W: Write> Attempt<W> {
    /// Stream bytes written on every channel.
    fn bytes(&self) -> u64 {
        self.w.bytes_written() + self.pages.iter().map(|p| p.bytes_written()).sum::<u64>()
    }
}

fn serr(phase: Phase) -> impl Fn(livemig_stream::Error) -> Error {
    move |source| Error::Stream { phase, source }
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
            cancel: CancelHandle::new(),
            watchdog: None,
            phase: Phase::Compat,
            throttle: 0,
            live: Arc::default(),
        }
    }

    /// A live view of the migration for a progress display (bytes and pages of the round
    /// under way, the dirty rate, the downtime stopping now would cost), readable from any
    /// thread.
    pub fn progress_view(&self) -> ProgressView {
        ProgressView(Arc::clone(&self.live))
    }

    /// Whether the source's vCPUs are stopped. After a successful migration they are (the VM
    /// runs at the destination). After a failed one this is `false` (the source runs again)
    /// except when the handover's outcome was lost after End: then the source stays stopped
    /// with its state intact, because the destination may be running the VM.
    pub fn is_stopped(&self) -> bool {
        self.paused
    }

    /// Calls `hook` on every phase change and after every round.
    pub fn on_event(&mut self, hook: impl FnMut(&Event<'_>) + Send + 'static) {
        self.hook = Some(Box::new(hook));
    }

    /// The handle that cancels this source's migration from another thread (or from the
    /// event hook). See [`CancelHandle`].
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// The platform (for inspection after a migration).
    pub fn platform(&self) -> &SourcePlatform {
        &self.platform
    }

    /// The platform, mutably (for example to inject faults between attempts).
    pub fn platform_mut(&mut self) -> &mut SourcePlatform {
        &mut self.platform
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.emit(Event::Phase(phase));
    }

    fn emit(&mut self, e: Event<'_>) {
        if let Some(h) = self.hook.as_mut() {
            h(&e);
        }
    }

    /// Returns the operator's cancel (or the hard deadline's) as an error if one was requested.
    fn check_cancel(&self) -> Result<()> {
        match self.cancel.reason() {
            Some(reason) => Err(self.cancel_error(reason)),
            None => Ok(()),
        }
    }

    fn cancel_error(&self, reason: String) -> Error {
        if self.cancel.by_deadline() {
            Error::Deadline {
                phase: self.phase,
                reason,
            }
        } else {
            Error::Cancelled {
                phase: self.phase,
                reason: format!("operator cancel: {reason}"),
            }
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
                does_dma: d.does_dma,
            })
            .chain(self.platform.dma_endpoints.iter().map(|e| DeviceDirtyCaps {
                name: e.name.clone(),
                iommu: e.iommu_dirty.clone(),
                dma_logging: false,
                does_dma: true,
            }))
            .collect()
    }

    /// Whether migration could start now; the reason if not.
    pub fn check(&self) -> Result<Vec<Chosen>> {
        if self.cfg.hard_deadline.is_some_and(|d| d.is_zero()) {
            return Err(Error::Config(
                "a hard deadline of 0 can never be met (no stop is instantaneous)".into(),
            ));
        }
        if self.cfg.max_rounds == 0 {
            return Err(Error::Config(
                "max_rounds 0: at least one pre-copy round sends RAM".into(),
            ));
        }
        if self.cfg.channels == 0 || self.cfg.channels > MAX_CHANNELS {
            return Err(Error::Config(format!(
                "channels {}: between 1 (one connection carries everything) and {MAX_CHANNELS} \
                 page channels",
                self.cfg.channels
            )));
        }
        if let (Some(deadline), Some(rate)) = (self.cfg.hard_deadline, self.cfg.link_rate) {
            let mut state = 0u64;
            for d in &self.platform.devices {
                // Device-supplied: saturate rather than wrap.
                state = state.saturating_add(d.dev.stop_copy_size().unwrap_or(0));
            }
            let need_us = (u128::from(state) * 1_000_000 / u128::from(rate.max(1))) as u64;
            if need_us > deadline.as_micros() as u64 {
                return Err(Error::Config(format!(
                    "hard deadline {} ms: the devices' STOP_COPY state ({state} bytes) alone \
                     takes {:.1} ms at the link's {rate} B/s",
                    deadline.as_secs_f64() * 1000.0,
                    need_us as f64 / 1000.0
                )));
            }
        }
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

    /// Migrates over `channel`; a [`cancel`](Self::cancel_handle) aborts the channel so no
    /// read or write stays blocked. On failure the source runs again (except after a lost
    /// handover, see the module documentation).
    pub fn migrate_over<C: Channel>(&mut self, channel: C) -> Result<MigrationReport> {
        self.migrate_channels(channel, &mut |_| {
            Err(io::Error::other(
                "no page channels can be opened (use Source::migrate_channels)",
            ))
        })
    }

    /// Migrates over `main` and, with [`SourceConfig::channels`] N ≥ 2, N page channels opened
    /// by `connect` once the destination has accepted the devices (so the destination has
    /// taken the main connection first). Each page channel is a stream of its own that starts
    /// with a Channel record (index, count, and a token the main stream carries too) and ends
    /// each round with a Sync record: the destination applies no page of round r + 1 before
    /// every channel's pages of round r, so an older copy of a page on a slow channel can never
    /// overwrite a newer one. A cancel aborts every channel.
    pub fn migrate_channels<C: Channel>(
        &mut self,
        main: C,
        connect: &mut Connect<'_>,
    ) -> Result<MigrationReport> {
        let (data, back, abort) = main.split().map_err(|source| Error::Link {
            phase: Phase::Compat,
            what: "setting up the channel",
            source,
        })?;
        self.attempt(data, back, Some(abort), Some(connect))
    }

    /// Migrates over `data` (the stream) and `back` (the return path), one channel. On failure
    /// the source runs again (except after a lost handover, see the module documentation). A
    /// cancel is noticed at the engine's next check; use [`migrate_over`](Self::migrate_over) so
    /// that it also unblocks a read or write in progress.
    pub fn migrate<W: DataSink, R: Read>(&mut self, data: W, back: R) -> Result<MigrationReport> {
        self.attempt(data, back, None, None)
    }

    fn attempt<W: DataSink, R: Read>(
        &mut self,
        data: W,
        mut back: R,
        abort: Option<Abort>,
        connect: Option<&mut Connect<'_>>,
    ) -> Result<MigrationReport> {
        if self.cfg.channels >= 2 && connect.is_none() {
            return Err(Error::Config(format!(
                "channels {}: page channels need Source::migrate_channels",
                self.cfg.channels
            )));
        }
        self.phase = Phase::Compat;
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
        // Every channel's abort hook, the page channels' added as they open.
        let aborts: Arc<Mutex<Vec<Abort>>> = Arc::new(Mutex::new(abort.into_iter().collect()));
        let all = Arc::clone(&aborts);
        self.cancel.arm(Some(Box::new(move || {
            for a in all.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                a();
            }
        })));
        let t0 = Instant::now();
        let result = self.run(plan, data, &mut back, connect, &aborts);
        self.watchdog = None;
        self.cancel.disarm();
        if let Some((guard, _)) = &self.platform.viommu {
            guard.end();
        }
        match result {
            Ok(mut report) => {
                // The VM runs on the destination; a tracker that cannot be stopped is the
                // source's to clean up, not a failed migration.
                for e in self.stop_trackers() {
                    report
                        .source_cleanup
                        .push(format!("stopping dirty tracking: {e}"));
                }
                self.set_throttle(0);
                report.total_us = t0.elapsed().as_micros() as u64;
                Ok(report)
            }
            Err(mut f) if f.resume => {
                if let Some(reason) = self.cancel.reason() {
                    // Whatever broke after the cancel broke because of it.
                    if !matches!(f.error, Error::Cancelled { .. } | Error::Deadline { .. }) {
                        f.error = self.cancel_error(reason);
                    }
                } else if matches!(f.error, Error::Stream { .. })
                    || matches!(f.error, Error::Link { what, .. } if what != RETURN_PATH)
                {
                    // A write that failed because the destination gave up: its reason is on
                    // the return path. (Not when the return path itself failed: after a frame
                    // refused there another read finds no reason, and a destination that went
                    // silent would hold the source here, stopped.)
                    if let (Some(phase), Ok(Message::Failed(reason))) =
                        (f.error.phase(), read_past_acks(&mut back))
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
                self.set_throttle(0);
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

    fn set_throttle(&mut self, percent: u8) {
        if self.throttle != percent && self.platform.vcpus.set_throttle(percent) {
            self.throttle = percent;
        }
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

    /// Recovery: trackers stopped, every device back to RUNNING (reset where an arc fails),
    /// the throttle lifted, vCPUs running.
    fn recover(&mut self) -> std::result::Result<(), String> {
        self.enter(Phase::Recovery);
        let mut errs = self.stop_trackers();
        // P2P-capable devices reach RUNNING_P2P before any runs (a failed arc here is left to
        // the pass below, which resets).
        for d in self.platform.devices.iter_mut() {
            let state = d.dev.state().ok();
            if has_p2p(&*d.dev)
                && state != Some(MigrationState::Running)
                && state != Some(MigrationState::RunningP2p)
            {
                let _ = d.dev.transition(MigrationState::RunningP2p);
            }
        }
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
        self.set_throttle(0);
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

    /// The protocol, phase by phase.
    fn run<W: DataSink, R: Read>(
        &mut self,
        plan: Vec<Chosen>,
        data: W,
        back: &mut R,
        connect: Option<&mut Connect<'_>>,
        aborts: &Mutex<Vec<Abort>>,
    ) -> std::result::Result<MigrationReport, Failure> {
        let mut a = self.compat_exchange(plan, data, back, connect, aborts)?;
        self.start(&mut a)?;
        let mut round = 0;
        let precopy_t0 = Instant::now();
        let mut dirty_reported = 0;
        // Rounds run after the estimate already fitted (see SETTLE_ROUNDS).
        let mut settle = 0;
        loop {
            round += 1;
            let (r, found) = self.precopy_round(&mut a, round)?;
            dirty_reported += found;
            let budget =
                (a.bandwidth as u128 * self.cfg.downtime_limit.as_micros() / 1_000_000) as u64;
            let remaining = r.remaining_estimate;
            self.emit(Event::Round(&r));
            let sent = r.bytes;
            let device_estimate = r.device_estimate;
            let round_us = r.elapsed_us.max(1);
            a.report.rounds.push(r);
            self.live.dirty_rate.store(
                found.saturating_mul(1_000_000) / round_us,
                Ordering::Relaxed,
            );
            let expected_us = (u128::from(remaining) * 1_000_000 / u128::from(a.bandwidth.max(1)))
                .min(u128::from(u64::MAX)) as u64;
            self.live.downtime_us.store(
                expected_us.saturating_add(a.device_load_estimate_us(device_estimate).unwrap_or(0)),
                Ordering::Relaxed,
            );
            let mut load_note = String::new();
            let initial_pending: Vec<usize> = (0..a.initial_sent.len())
                .filter(|&i| !a.initial_sent[i])
                .collect();
            // Fits the downtime, and every device's initial data has been read (after a
            // re-initialisation too).
            let fits = remaining <= budget && initial_pending.is_empty();
            if fits && round < self.cfg.max_rounds && settle < SETTLE_ROUNDS {
                // It fits, but while the guest dirties pages much slower than the link moves
                // them, one more short round shrinks what the stop must send (QEMU likewise
                // iterates while its pending estimate keeps falling).
                let pages_left = remaining.saturating_sub(device_estimate);
                let dirty_bps =
                    found.saturating_mul(PAGE_SIZE).saturating_mul(1_000_000) / round_us;
                let floor = a.bandwidth / 1000;
                if pages_left > floor && dirty_bps.saturating_mul(2) < a.bandwidth {
                    settle += 1;
                    continue;
                }
            }
            if fits {
                if !a.round_acks {
                    a.report.converged = true;
                    break;
                }
                // The data in flight lands while the VM still runs; the acknowledgements say
                // how fast the destination's devices load their state, and the STOP_COPY
                // state must load within the limit too (QEMU's estimate leaves that out).
                let t = Instant::now();
                self.wait_round_ack(back, &mut a, round)?;
                a.report.drain_us += t.elapsed().as_micros() as u64;
                let send_us =
                    (u128::from(remaining) * 1_000_000 / u128::from(a.bandwidth.max(1))) as u64;
                let limit_us = self.cfg.downtime_limit.as_micros() as u64;
                match a.device_load_estimate_us(device_estimate) {
                    Some(load_us) if send_us.saturating_add(load_us) > limit_us => {
                        load_note = format!(
                            "; the destination's devices would take about {} ms to load the \
                             remaining {device_estimate} bytes of device state (they loaded \
                             {} bytes in {} ms during pre-copy)",
                            load_us / 1000,
                            a.dest_load.1,
                            a.dest_load.0 / 1000
                        );
                    }
                    _ => {
                        a.report.converged = true;
                        break;
                    }
                }
            }
            if round >= self.cfg.max_rounds {
                let precopy_us = precopy_t0.elapsed().as_micros().max(1) as u64;
                let rate = dirty_reported * PAGE_SIZE * 1_000_000 / precopy_us;
                if !initial_pending.is_empty() {
                    load_note += &format!(
                        "; the initial PRE_COPY data of device(s) {initial_pending:?} was not all \
                         read yet"
                    );
                }
                a.report.non_convergence = Some(format!(
                    "pre-copy did not converge in {round} round(s): the guest dirtied {rate} \
                     B/s against a link rate of {} B/s; {remaining} bytes were left against a \
                     budget of {budget} for the {} ms downtime limit{}{load_note}",
                    a.bandwidth,
                    self.cfg.downtime_limit.as_millis(),
                    if self.cfg.auto_converge.is_some() {
                        format!(" (vCPU throttle at {}%)", self.throttle)
                    } else {
                        " (auto-converge is off)".into()
                    }
                ));
                break;
            }
            self.auto_converge(&mut a, found * PAGE_SIZE, sent);
        }
        let precopy_us = precopy_t0.elapsed().as_micros().max(1) as u64;
        a.report.dirty_rate = dirty_reported * 1_000_000 / precopy_us;
        if a.round_acks && a.acked < round {
            // Let the last round land while the VM still runs: what is in flight now would
            // otherwise be part of the downtime.
            let t = Instant::now();
            self.wait_round_ack(back, &mut a, round)?;
            a.report.drain_us += t.elapsed().as_micros() as u64;
        }
        let (down, r) = self.stop_and_copy(&mut a, round + 1)?;
        self.handover(a, back, down, r)
    }

    /// Compat: the destination checks every device before anything moves.
    fn compat_exchange<W: DataSink, R: Read>(
        &mut self,
        plan: Vec<Chosen>,
        data: W,
        back: &mut R,
        connect: Option<&mut Connect<'_>>,
        aborts: &Mutex<Vec<Abort>>,
    ) -> std::result::Result<Attempt<W>, Failure> {
        let phase = Phase::Compat;
        let started = Instant::now();
        self.enter(phase);
        self.check_cancel()?;
        let report = MigrationReport {
            tracking: self
                .platform
                .devices
                .iter()
                .map(|d| d.dev.name().to_string())
                .chain(self.platform.dma_endpoints.iter().map(|e| e.name.clone()))
                .zip(&plan)
                .map(|(name, &c)| (name, c))
                .collect(),
            downtime_limit_us: self.cfg.downtime_limit.as_micros() as u64,
            ..Default::default()
        };
        let opts = WriterOptions {
            checksums: self.cfg.checksums,
            producer: format!("livemig {}", env!("CARGO_PKG_VERSION")),
            // Says this source reads round acknowledgements.
            minor: livemig_stream::format::MINOR_ROUND_ACKS,
            ..WriterOptions::default()
        };
        let mut w = Writer::new(data, opts.clone()).map_err(serr(phase))?;
        let count = self.cfg.channels;
        let token = channel_token();
        if count >= 2 {
            w.channel(&StreamChannel {
                index: 0,
                count,
                token,
            })
            .map_err(serr(phase))?;
        }
        for (i, d) in self.platform.descriptors().iter().enumerate() {
            let c = &d.device;
            let mut caps = 0;
            if d.iommu_dirty_tracking {
                caps |= DirtyCaps::IOMMU;
            }
            if c.dma_logging {
                caps |= DirtyCaps::DEVICE;
            }
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
        let mut reply = read_reply(back, phase)?;
        let mut round_acks = false;
        if let Message::Capabilities(bits) = reply {
            round_acks = bits & crate::control::CAP_ROUND_ACKS != 0;
            reply = read_reply(back, phase)?;
        }
        match reply {
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
        // The destination took the main connection: open the page channels.
        let mut page_writers = Vec::new();
        if let (true, Some(connect)) = (count >= 2, connect) {
            for index in 1..=count {
                self.check_cancel()?;
                let (sink, abort) = connect(index).map_err(|source| Error::Link {
                    phase,
                    what: "opening a page channel",
                    source,
                })?;
                aborts.lock().unwrap_or_else(|p| p.into_inner()).push(abort);
                let mut pw = Writer::new(sink, opts.clone()).map_err(serr(phase))?;
                pw.channel(&StreamChannel {
                    index,
                    count,
                    token,
                })
                .map_err(serr(phase))?;
                pw.flush().map_err(serr(phase))?;
                page_writers.push(pw);
            }
        }
        let pages = self.platform.memory.size() / PAGE_SIZE;
        let p2p = self
            .platform
            .devices
            .iter()
            .map(|d| has_p2p(&*d.dev))
            .collect();
        let precopy: Vec<bool> = self
            .platform
            .devices
            .iter()
            .map(|d| {
                self.cfg.precopy
                    && MigrationFlags::from_bits_truncate(u64::from(d.dev.compat().migration_flags))
                        .contains(MigrationFlags::PRE_COPY)
            })
            .collect();
        let initial_sent = precopy.iter().map(|&p: &bool| !p).collect();
        Ok(Attempt {
            plan,
            w,
            pages: page_writers,
            report,
            dirty: PageBitmap::new(pages, PAGE_SIZE),
            initial_sent,
            precopy,
            p2p,
            bandwidth: 0,
            dirty_high: 0,
            progress: Progress::new(Arc::clone(&self.live)),
            round_acks,
            acked: 0,
            dest_load: (0, 0),
            started,
        })
    }

    /// Start: trackers on, PRE_COPY devices into PRE_COPY; round 1 will send all of RAM.
    fn start<W: DataSink>(&mut self, a: &mut Attempt<W>) -> Result<()> {
        let phase = Phase::Start;
        self.enter(phase);
        self.check_cancel()?;
        self.tracking = Some(a.plan.clone());
        for t in active_trackers(&mut self.platform, &a.plan) {
            t.start().map_err(|e| Error::Tracker {
                phase,
                tracker: t.name(),
                reason: e.to_string(),
            })?;
        }
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if a.precopy[i] {
                // Before the session opens: a device that can re-initialise its initial data
                // says so from then on. Not supported (Linux 6.12, most devices) changes
                // nothing: such a device's initial data is sent once.
                if d.dev
                    .enable_precopy_info_v2()
                    .map_err(|source| dev_err(phase, i, &*d.dev, source))?
                    == PrecopyInfoV2::Enabled
                {
                    a.report.reinit_reporting.push(i);
                }
                d.dev
                    .transition(MigrationState::PreCopy)
                    .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
            }
        }
        // The first harvest only clears what the trackers saw before the start.
        let mut scratch = PageBitmap::new(a.dirty.pages(), PAGE_SIZE);
        self.harvest(&a.plan, &mut scratch, phase)?;
        for (gpa, len) in self.platform.memory.ranges() {
            a.dirty.set_bytes(gpa, len);
        }
        Ok(())
    }

    /// One pre-copy round: the pages found dirty, the devices' PRE_COPY data, then the next
    /// harvest and the estimate of what stop-and-copy would cost. Returns the round and the
    /// pages the harvest found.
    fn precopy_round<W: DataSink>(
        &mut self,
        a: &mut Attempt<W>,
        round: u32,
    ) -> Result<(RoundReport, u64)> {
        let phase = Phase::PreCopy(round);
        self.enter(phase);
        self.check_cancel()?;
        let rt = Instant::now();
        let b0 = a.bytes();
        let mut r = RoundReport {
            round,
            dirty_pages: a.dirty.count(),
            throttle_percent: self.throttle,
            ..Default::default()
        };
        self.live.begin_round(round, r.dirty_pages);
        let mem = Arc::clone(&self.platform.memory);
        send_round(a, &*mem, &mut r, phase, &self.cancel, round)?;
        a.dirty.clear();
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if !a.precopy[i] {
                continue;
            }
            let mut buf = Vec::new();
            let pr = d
                .dev
                .precopy(&mut buf, self.cfg.device_precopy_max)
                .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
            if pr.info.reinit {
                a.initial_sent[i] = false;
                a.report.device_reinits += 1;
            }
            if !buf.is_empty() {
                a.w.device_state(i as u32, StreamPhase::PreCopy, &buf)
                    .map_err(serr(phase))?;
                r.device_bytes += buf.len() as u64;
            }
        }
        r.bytes = a.bytes() - b0;
        a.w.round(&Round {
            round,
            pages: r.pages,
            zero_pages: r.zero_pages,
            dirty_pages: r.dirty_pages,
            device_bytes: r.device_bytes,
            stream_bytes: r.bytes,
            elapsed_us: rt.elapsed().as_micros() as u64,
        })
        .map_err(serr(phase))?;
        a.w.flush().map_err(serr(phase))?;
        a.progress.set(a.bytes());
        r.elapsed_us = rt.elapsed().as_micros().max(1) as u64;
        // Rounds too small to time say little about the link: keep the best estimate.
        let measured = r.bytes.saturating_mul(1_000_000) / r.elapsed_us;
        if r.bytes >= 256 << 10 || a.bandwidth == 0 {
            a.bandwidth = a.bandwidth.max(measured);
        }
        r.bandwidth = a.bandwidth;

        // The next round's pages, and what stop-and-copy would cost now.
        let found = self.harvest(&a.plan, &mut a.dirty, phase)?;
        let mut device_estimate = 0u64;
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            let pending = if a.precopy[i] {
                let info = d
                    .dev
                    .precopy_info()
                    .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
                if info.reinit {
                    a.initial_sent[i] = false;
                    a.report.device_reinits += 1;
                }
                if info.initial_bytes == 0 && !info.reinit {
                    a.initial_sent[i] = true;
                }
                info.total()
            } else {
                0
            };
            let stop = d
                .dev
                .stop_copy_size()
                .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
            // Device-supplied sizes: saturate rather than wrap into a fake convergence.
            device_estimate = device_estimate.saturating_add(pending).saturating_add(stop);
        }
        r.device_estimate = device_estimate;
        r.remaining_estimate = (a.dirty.count() * PAGE_SIZE).saturating_add(device_estimate);
        if let Some((guard, _)) = &self.platform.viommu {
            if let Some(c) = guard.cancelled() {
                return Err(Error::Cancelled {
                    phase,
                    reason: c.to_string(),
                });
            }
        }
        Ok((r, found))
    }

    /// Auto-converge (QEMU's `auto-converge` rule, migration/ram.c
    /// `migration_trigger_throttle`): when in two rounds the guest dirtied more than half of
    /// what the round sent, throttle the vCPUs (initial step, then by the increment, up to the
    /// maximum). The host enforces it; the guest is never asked to slow itself.
    fn auto_converge<W: DataSink>(&mut self, a: &mut Attempt<W>, dirtied: u64, sent: u64) {
        let Some(ac) = self.cfg.auto_converge else {
            return;
        };
        if dirtied > sent / 2 {
            a.dirty_high += 1;
        }
        if a.dirty_high >= 2 {
            a.dirty_high = 0;
            let next = if self.throttle == 0 {
                ac.initial
            } else {
                self.throttle.saturating_add(ac.increment)
            };
            self.set_throttle(next.min(ac.max));
        }
    }

    /// Stop-and-copy: vCPUs paused, devices to STOP_COPY, the final harvest, the last pages
    /// and the devices' state, End. Returns when the downtime began and the round.
    fn stop_and_copy<W: DataSink>(
        &mut self,
        a: &mut Attempt<W>,
        round: u32,
    ) -> Result<(Instant, RoundReport)> {
        let phase = Phase::StopCopy;
        self.enter(phase);
        self.check_cancel()?;
        if let Some(limit) = self.cfg.hard_deadline {
            // Will it fit? The last estimate at the measured rate.
            let left = a.report.rounds.last().map_or(0, |r| r.remaining_estimate);
            let send_us = (left as u128 * 1_000_000 / u128::from(a.bandwidth.max(1))) as u64;
            // And the destination's devices loading their state, at the rate they showed.
            let device = a.report.rounds.last().map_or(0, |r| r.device_estimate);
            let load_us = a.device_load_estimate_us(device).unwrap_or(0);
            let need_us = send_us.saturating_add(load_us);
            if need_us > limit.as_micros() as u64 {
                return Err(Error::Deadline {
                    phase,
                    reason: format!(
                        "stop-and-copy would take about {:.1} ms ({left} bytes at {} B/s{}), \
                         over the hard deadline of {} ms; not stopping the VM",
                        need_us as f64 / 1000.0,
                        a.bandwidth,
                        if load_us > 0 {
                            format!(
                                ", and {:.1} ms for the destination's devices to load {device} \
                                 bytes",
                                load_us as f64 / 1000.0
                            )
                        } else {
                            String::new()
                        },
                        limit.as_secs_f64() * 1000.0
                    ),
                });
            }
        }
        let down = Instant::now();
        // A write blocked on a destination that stopped reading never returns to the checks
        // below: the watchdog aborts the channel at the deadline instead (until End).
        self.watchdog = self
            .cfg
            .hard_deadline
            .map(|limit| Watchdog::start(self.cancel.clone(), limit));
        self.platform.vcpus.pause();
        self.paused = true;
        // The P2P quiescent state first (vfio.h: RUNNING_P2P and PRE_COPY_P2P "must prevent
        // the device from initiating any new P2P DMA"): no device stops while another may
        // still write into it. Devices without P2P go straight on, as before.
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if a.p2p[i] {
                let quiet = if a.precopy[i] {
                    MigrationState::PreCopyP2p
                } else {
                    MigrationState::RunningP2p
                };
                d.dev
                    .transition(quiet)
                    .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
            }
        }
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.dev
                .transition(MigrationState::StopCopy)
                .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
        }
        // vCPUs and devices are quiesced: the final harvest sees every write they made.
        self.harvest(&a.plan, &mut a.dirty, phase)?;
        a.report.downtime_phases.stop_and_harvest_us = down.elapsed().as_micros() as u64;
        self.check_deadline(down, phase)?;
        let rt = Instant::now();
        let b0 = a.bytes();
        let mut r = RoundReport {
            round,
            dirty_pages: a.dirty.count(),
            bandwidth: a.bandwidth,
            throttle_percent: self.throttle,
            ..Default::default()
        };
        self.live.begin_round(round, r.dirty_pages);
        let mem = Arc::clone(&self.platform.memory);
        send_round(a, &*mem, &mut r, phase, &self.cancel, round)?;
        let mut save_us = 0u64;
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            let mut buf = Vec::new();
            let st = Instant::now();
            d.dev
                .save(&mut buf)
                .map_err(|source| dev_err(phase, i, &*d.dev, source))?;
            save_us += st.elapsed().as_micros() as u64;
            a.w.device_state(i as u32, StreamPhase::StopCopy, &buf)
                .map_err(serr(phase))?;
            r.device_bytes += buf.len() as u64;
        }
        r.bytes = a.bytes() - b0;
        r.elapsed_us = rt.elapsed().as_micros() as u64;
        a.report.downtime_phases.device_save_us = save_us;
        self.check_deadline(down, phase)?;
        Ok((down, r))
    }

    /// Handover: End, then the destination decides. From End on a cancel is refused and a
    /// lost answer leaves the source stopped (the destination may run).
    fn handover<W: DataSink, R: Read>(
        &mut self,
        a: Attempt<W>,
        back: &mut R,
        down: Instant,
        r: RoundReport,
    ) -> std::result::Result<MigrationReport, Failure> {
        let phase = Phase::StopCopy;
        let closed = self.cancel.close();
        self.watchdog = None;
        if !closed {
            self.check_cancel()?;
        }
        let mut report = a.report;
        // The page channels end first: the destination runs only once every one has.
        for pw in a.pages {
            report.bytes += pw.bytes_written();
            let mut sink = pw.finish().map_err(serr(phase))?;
            sink.close().map_err(|source| Error::Link {
                phase,
                what: "closing a page channel",
                source,
            })?;
        }
        report.bytes += a.w.bytes_written();
        a.progress.set(report.bytes);
        report.timeline = a.progress.into_points();
        let mut sink = a.w.finish().map_err(serr(phase))?;
        sink.close().map_err(|source| Error::Link {
            phase,
            what: "closing the stream",
            source,
        })?;
        drop(sink);
        let sent = Instant::now();
        {
            let p = &mut report.downtime_phases;
            p.send_us = (sent.duration_since(down).as_micros() as u64)
                .saturating_sub(p.stop_and_harvest_us + p.device_save_us);
        }

        let phase = Phase::Handover;
        self.enter(phase);
        match read_past_acks(back) {
            Ok(Message::Resumed { load_us, run_us }) => {
                report.downtime_us = down.elapsed().as_micros() as u64;
                report.destination_load_us = load_us + run_us;
                let p = &mut report.downtime_phases;
                p.destination_load_us = load_us;
                p.destination_run_us = run_us;
                // The destination starts loading when it reads End, which can be before this
                // side has closed the stream: that overlap is counted on the destination's
                // side, so the phases add up to the downtime.
                let dest = load_us.saturating_add(run_us);
                let before = p.stop_and_harvest_us + p.device_save_us;
                p.send_us = p.send_us.min(
                    report
                        .downtime_us
                        .saturating_sub(before.saturating_add(dest)),
                );
                p.in_flight_us = report
                    .downtime_us
                    .saturating_sub(before + p.send_us)
                    .saturating_sub(dest);
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
        // The VM runs on the destination: the source's devices go to STOP and stay there. A
        // device that cannot does not undo the migration (the destination already runs); it
        // is reported, and the source stays stopped either way.
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if let Err(source) = d.dev.transition(MigrationState::Stop) {
                report.source_cleanup.push(format!(
                    "{}; the VM runs on the destination and the source stays stopped",
                    dev_err(phase, i, &*d.dev, source)
                ));
            }
        }
        self.emit(Event::Round(&r));
        report.stop_copy = r;
        Ok(report)
    }

    /// Reads the return path until the destination acknowledges `round`, adding up what
    /// every acknowledgement says of the destination's device loads.
    fn wait_round_ack<R: Read, W: Write>(
        &mut self,
        back: &mut R,
        a: &mut Attempt<W>,
        round: u32,
    ) -> Result<()> {
        let phase = Phase::PreCopy(round);
        while a.acked < round {
            self.check_cancel()?;
            match read_reply(back, phase)? {
                Message::RoundAck {
                    round: r,
                    device_load_us,
                    device_bytes,
                } if r > a.acked && r <= round => {
                    a.check_round_ack(r, device_load_us, device_bytes)
                        .map_err(|reason| Error::Protocol { phase, reason })?;
                    a.acked = r;
                    a.dest_load.0 = a.dest_load.0.saturating_add(device_load_us);
                    a.dest_load.1 = a.dest_load.1.saturating_add(device_bytes);
                }
                Message::RoundAck { round: r, .. } => {
                    return Err(Error::Protocol {
                        phase,
                        reason: format!(
                            "the destination acknowledged round {r} after round {} (waiting \
                             for round {round})",
                            a.acked
                        ),
                    });
                }
                Message::Failed(reason) => return Err(Error::Remote { phase, reason }),
                other => {
                    return Err(Error::Protocol {
                        phase,
                        reason: format!("expected a round acknowledgement, got {other:?}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Abandons stop-and-copy (before End) once the hard deadline has passed.
    fn check_deadline(&self, down: Instant, phase: Phase) -> Result<()> {
        match self.cfg.hard_deadline {
            Some(limit) if down.elapsed() > limit => Err(Error::Deadline {
                phase,
                reason: format!(
                    "stop-and-copy passed the hard deadline of {} ms after {:.1} ms with the \
                     stream not yet ended; the source runs again",
                    limit.as_secs_f64() * 1000.0,
                    down.elapsed().as_secs_f64() * 1000.0
                ),
            }),
            _ => Ok(()),
        }
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

/// Aborts the channel if stop-and-copy is still running `limit` after it began (a write the
/// destination does not take blocks where no deadline check can run). Dropping it (End sent,
/// or the attempt over) stops it.
struct Watchdog {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(cancel: CancelHandle, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("livemig-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    cancel.expire(format!(
                        "stop-and-copy reached the hard deadline of {} ms with the stream not \
                         ended (the destination was not taking it); the channel was aborted and \
                         the source runs again",
                        limit.as_secs_f64() * 1000.0
                    ));
                }
            })
            .ok();
        Watchdog {
            stop: Some(tx),
            thread,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The trackers `plan` uses: the vCPU log, the IOMMU tracker if any device or DMA endpoint is
/// planned onto it, and the DMA logs of devices planned onto their own (the plan lists the
/// devices first, then the endpoints).
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

/// Whether `d` reports `VFIO_MIGRATION_P2P`.
fn has_p2p(d: &dyn MigDevice) -> bool {
    MigrationFlags::from_bits_truncate(u64::from(d.compat().migration_flags))
        .contains(MigrationFlags::P2P)
}

fn dev_err(phase: Phase, i: usize, d: &dyn MigDevice, source: livemig_vfio::Error) -> Error {
    Error::Device {
        phase,
        index: i as u32,
        name: d.name().to_string(),
        source,
    }
}

/// The next return-path message that is not a round acknowledgement.
fn read_past_acks<R: Read>(back: &mut R) -> io::Result<Message> {
    loop {
        match Message::read_from(back)? {
            Message::RoundAck { .. } => {}
            other => return Ok(other),
        }
    }
}

/// [`Error::Link`]'s `what` for a failed read of the return path.
const RETURN_PATH: &str = "return path";

fn read_reply<R: Read>(back: &mut R, phase: Phase) -> Result<Message> {
    Message::read_from(back).map_err(|source| Error::Link {
        phase,
        what: RETURN_PATH,
        source,
    })
}

/// Pages per Pages record batch.
const BATCH: u64 = 256;

/// A token pairing the connections of one migration: unpredictable enough that two
/// migrations to one destination never share it (it authenticates nothing; see the TLS
/// channel for that).
fn channel_token() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut t = [0u8; 16];
    for (i, half) in t.chunks_mut(8).enumerate() {
        // RandomState is seeded from the OS's randomness once per process and per-instance
        // keys after that.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    t
}

/// Rounds with at most this many dirty pages (2 MiB) are written to the page channels by the
/// engine's own thread instead of one thread per channel.
const INLINE_ROUND_PAGES: u64 = 512;

/// Sends the round's dirty pages: on the main stream, or split evenly over the page channels
/// (one thread each, or the calling thread for a small round), every page channel closing the
/// round with a Sync.
fn send_round<W: Write>(
    a: &mut Attempt<W>,
    mem: &dyn GuestMemory,
    r: &mut RoundReport,
    phase: Phase,
    cancel: &CancelHandle,
    round: u32,
) -> Result<()> {
    if a.pages.is_empty() {
        return send_pages(
            &mut a.w,
            mem,
            &a.dirty,
            (0, a.dirty.pages()),
            r,
            phase,
            cancel,
            &a.progress,
        );
    }
    let parts = a.dirty.split(a.pages.len() as u64);
    let (dirty, progress) = (&a.dirty, &a.progress);
    if dirty.count() <= INLINE_ROUND_PAGES {
        // A few pages (typically the stop-and-copy round of a converged migration): starting
        // a thread per channel would cost more downtime than the writes; one thread writes
        // every channel's share and Sync in turn.
        for (w, part) in a.pages.iter_mut().zip(parts) {
            send_pages(w, mem, dirty, part, r, phase, cancel, progress)?;
            w.sync(round).map_err(serr(phase))?;
            w.flush().map_err(serr(phase))?;
        }
        return Ok(());
    }
    let results: Vec<Result<RoundReport>> = std::thread::scope(|scope| {
        let threads: Vec<_> = a
            .pages
            .iter_mut()
            .zip(parts)
            .map(|(w, part)| {
                scope.spawn(move || {
                    let mut mine = RoundReport::default();
                    send_pages(w, mem, dirty, part, &mut mine, phase, cancel, progress)?;
                    w.sync(round).map_err(serr(phase))?;
                    w.flush().map_err(serr(phase))?;
                    Ok(mine)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(Error::Protocol {
                        phase,
                        reason: "a page channel's sender thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    // A cancel explains every other channel's failure.
    let mut first_err = None;
    for res in results {
        match res {
            Ok(mine) => {
                r.pages += mine.pages;
                r.zero_pages += mine.zero_pages;
            }
            Err(e) if matches!(e, Error::Cancelled { .. }) => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Sends the marked pages of `dirty` in pages `[range.0, range.1)` on `w`.
#[allow(clippy::too_many_arguments)]
fn send_pages<W: Write>(
    w: &mut Writer<W>,
    mem: &dyn GuestMemory,
    dirty: &PageBitmap,
    range: (u64, u64),
    r: &mut RoundReport,
    phase: Phase,
    cancel: &CancelHandle,
    progress: &Progress,
) -> Result<()> {
    // Allocated on the first page with data: an empty or all-zero share (the typical
    // stop-and-copy round) costs no 1 MiB allocation inside the downtime.
    let mut buf = Vec::new();
    let mut last = w.bytes_written();
    for (first, count) in dirty.runs_between(range.0, range.1) {
        let mut p = first;
        while p < first + count {
            if let Some(reason) = cancel.reason() {
                return Err(Error::Cancelled {
                    phase,
                    reason: format!("operator cancel: {reason}"),
                });
            }
            let now = w.bytes_written();
            progress.add(now - last);
            last = now;
            let n = (first + count - p).min(BATCH);
            let gpa = p * PAGE_SIZE;
            let len = n * PAGE_SIZE;
            if mem.known_zero(gpa, len) {
                w.zero_pages(gpa, PAGE_SIZE as u32, n)
                    .map_err(|source| Error::Stream { phase, source })?;
                r.zero_pages += n;
            } else {
                if buf.is_empty() {
                    buf = vec![0u8; (BATCH * PAGE_SIZE) as usize];
                }
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
            progress.pages(n);
            p += n;
        }
    }
    progress.add(w.bytes_written() - last);
    Ok(())
}

/// Where a record starts in its stream, for the engine's errors about it (as the stream
/// reader reports its own: "at byte N (record I)").
#[derive(Debug, Clone, Copy)]
struct RecordAt {
    offset: u64,
    index: u64,
}

impl RecordAt {
    /// The record `rd` reads next.
    fn next<R: Read>(rd: &Reader<R>) -> RecordAt {
        RecordAt {
            offset: rd.offset(),
            index: rd.totals().records,
        }
    }
}

impl std::fmt::Display for RecordAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at byte {} (record {})", self.offset, self.index)
    }
}

/// Writes a Pages or ZeroPages record (the one `at`) into guest RAM, refusing anything
/// outside RAM, and counts it in `t` (any other record is left alone).
fn apply_pages(
    rec: &Record<'_>,
    at: RecordAt,
    mem: &dyn GuestMemory,
    ranges: &[(u64, u64)],
    t: &mut PageTotals,
) -> Result<()> {
    let phase = Phase::Receive;
    let memerr = |gpa: u64| {
        move |e: crate::memory::MemoryError| Error::Memory {
            phase,
            gpa,
            reason: e.to_string(),
        }
    };
    match rec {
        Record::Pages(p) => {
            let len = u64::from(p.count) * u64::from(p.page_size);
            check_in_ram(ranges, at, "Pages", p.gpa, len, phase)?;
            mem.write(p.gpa, p.payload).map_err(memerr(p.gpa))?;
            t.pages += u64::from(p.count);
        }
        Record::ZeroPages(z) => {
            let len = u64::from(z.count) * u64::from(z.page_size);
            check_in_ram(ranges, at, "ZeroPages", z.gpa, len, phase)?;
            mem.zero(z.gpa, len).map_err(memerr(z.gpa))?;
            t.zero_pages += u64::from(z.count);
        }
        _ => {}
    }
    Ok(())
}

/// What one page channel delivered.
#[derive(Debug, Default)]
struct PageTotals {
    pages: u64,
    zero_pages: u64,
    bytes: u64,
    /// The channel's largest record buffer.
    buffer: u64,
}

/// The page channels' round barrier: a channel that has read round r's Sync applies nothing
/// more until every channel has. It can be failed (every waiter returns at once), and a
/// channel that ends while another waits fails the wait (their rounds disagree).
#[derive(Debug)]
struct Gate {
    channels: u32,
    skip: bool,
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    arrived: u32,
    generation: u64,
    ended: u32,
    /// The first to fail: 0 the main channel, i page channel i.
    failed: Option<u32>,
}

impl Gate {
    fn new(channels: u32, skip: bool) -> Gate {
        Gate {
            channels,
            skip,
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopped(st: &GateState, index: u32, round: u32) -> Option<Error> {
        let phase = Phase::Receive;
        if let Some(f) = st.failed {
            let who = if f == 0 {
                "the main channel".to_string()
            } else {
                format!("page channel {f}")
            };
            return Some(Error::Cancelled {
                phase,
                reason: format!("stopped at round {round}'s end: {who} failed"),
            });
        }
        if st.ended > 0 {
            return Some(Error::Protocol {
                phase,
                reason: format!(
                    "page channel {index} ended round {round} while another page channel had \
                     already sent End (the channels disagree on the rounds)"
                ),
            });
        }
        None
    }

    /// Page channel `index` read round `round`'s Sync.
    fn wait(&self, index: u32, round: u32) -> Result<()> {
        let mut st = self.lock();
        if self.skip {
            // Negative control: only a failure stops it.
            return match st.failed {
                Some(_) => Gate::stopped(&st, index, round).map_or(Ok(()), Err),
                None => Ok(()),
            };
        }
        if let Some(e) = Gate::stopped(&st, index, round) {
            return Err(e);
        }
        st.arrived += 1;
        if st.arrived == self.channels {
            st.arrived = 0;
            st.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = st.generation;
        while st.generation == generation {
            if let Some(e) = Gate::stopped(&st, index, round) {
                return Err(e);
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Waits until every page channel has passed round `round`'s Sync (at once with the
    /// barrier off: nothing to wait for).
    fn reached(&self, round: u32) -> Result<()> {
        let mut st = self.lock();
        while !self.skip && st.generation < u64::from(round) {
            if let Some(f) = st.failed {
                return Err(Error::Cancelled {
                    phase: Phase::Receive,
                    reason: format!("stopped waiting for round {round}: channel {f} failed"),
                });
            }
            if st.ended == self.channels {
                return Err(Error::Protocol {
                    phase: Phase::Receive,
                    reason: format!(
                        "the page channels ended before round {round} (the main channel's \
                         rounds and theirs disagree)"
                    ),
                });
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// A page channel read its End.
    fn end(&self) {
        self.lock().ended += 1;
        self.cv.notify_all();
    }

    /// `who` failed; `true` if it was the first.
    fn fail(&self, who: u32) -> bool {
        let mut st = self.lock();
        let first = st.failed.is_none();
        if first {
            st.failed = Some(who);
        }
        self.cv.notify_all();
        first
    }

    fn first_failure(&self) -> Option<u32> {
        self.lock().failed
    }
}

/// The destination's page-channel reader on `bytes`, as the one page channel of a migration
/// whose main channel carried `token`, loading into `mem`: the entry point of the
/// `page_channel` fuzz target (`fuzz/`), so the fuzzer drives exactly the code a connection
/// does. Not part of the API.
#[doc(hidden)]
pub fn x_receive_page_channel(
    bytes: Vec<u8>,
    token: [u8; 16],
    mem: &dyn GuestMemory,
) -> Result<()> {
    let main = StreamChannel {
        index: 0,
        count: 1,
        token,
    };
    let claimed = Mutex::new(vec![false]);
    let gate = Gate::new(1, false);
    let ranges = mem.ranges();
    receive_pages(
        Box::new(io::Cursor::new(bytes)),
        main,
        &claimed,
        Limits::default(),
        mem,
        &ranges,
        &gate,
    )
    .map(drop)
}

/// One page channel on the destination: its Channel record checked against the main one
/// (token, count, an index no other connection claimed), then pages into guest RAM (inside RAM
/// only), a Sync at each round's end (consecutive rounds from 1) through the gate, End, then
/// nothing. Errors after the check name the channel.
fn receive_pages(
    conn: Box<dyn Read + Send>,
    main: StreamChannel,
    claimed: &Mutex<Vec<bool>>,
    limits: Limits,
    mem: &dyn GuestMemory,
    ranges: &[(u64, u64)],
    gate: &Gate,
) -> Result<PageTotals> {
    let phase = Phase::Receive;
    let serr = |source| Error::Stream { phase, source };
    let mut rd = Reader::new(conn, limits).map_err(serr)?;
    let first = match rd.next().map_err(serr)? {
        Some(Record::Channel(c)) => Ok(c),
        Some(other) => Err(other.name()),
        None => Err("nothing"),
    };
    let c = first.map_err(|got| Error::Protocol {
        phase,
        reason: format!("a page channel began with {got}, not a Channel record"),
    })?;
    if c.token != main.token || c.count != main.count || c.index == 0 {
        return Err(Error::Protocol {
            phase,
            reason: format!(
                "a connection claiming page channel {} of {} does not belong to this migration \
                 (expected an index 1..={} and the main channel's token)",
                c.index, c.count, main.count
            ),
        });
    }
    {
        let mut claimed = claimed.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut claimed[(c.index - 1) as usize];
        if *slot {
            return Err(Error::Protocol {
                phase,
                reason: format!("page channel {} connected twice", c.index),
            });
        }
        *slot = true;
    }
    receive_checked_pages(rd, mem, ranges, gate, c.index).map_err(|e| Error::PageChannel {
        index: c.index,
        source: Box::new(e),
    })
}

fn receive_checked_pages(
    mut rd: Reader<Box<dyn Read + Send>>,
    mem: &dyn GuestMemory,
    ranges: &[(u64, u64)],
    gate: &Gate,
    index: u32,
) -> Result<PageTotals> {
    let phase = Phase::Receive;
    let serr = |source| Error::Stream { phase, source };
    let mut t = PageTotals::default();
    let mut round = 1u32;
    loop {
        let at = RecordAt::next(&rd);
        match rd.next().map_err(serr)? {
            Some(rec @ (Record::Pages(_) | Record::ZeroPages(_))) => {
                apply_pages(&rec, at, mem, ranges, &mut t)?;
            }
            Some(Record::Sync(y)) => {
                if y.round != round {
                    return Err(Error::Protocol {
                        phase,
                        reason: format!(
                            "{at}: Sync for round {} where round {round} ends",
                            y.round
                        ),
                    });
                }
                gate.wait(index, round)?;
                round = round.checked_add(1).ok_or_else(|| Error::Protocol {
                    phase,
                    reason: "more than 2^32 rounds".into(),
                })?;
            }
            Some(Record::End(_)) => break,
            // An optional record of a type this version does not know (the format's rule).
            Some(Record::Skipped { .. }) => {}
            Some(other) => {
                return Err(Error::Protocol {
                    phase,
                    reason: format!("{at}: unexpected {} record on a page channel", other.name()),
                });
            }
            None => {
                return Err(Error::Protocol {
                    phase,
                    reason: "the page channel ended without End".into(),
                });
            }
        }
    }
    gate.end();
    if rd.next().map_err(serr)?.is_some() {
        return Err(Error::Protocol {
            phase,
            reason: "records after End".into(),
        });
    }
    t.bytes = rd.offset();
    t.buffer = rd.buffer_capacity() as u64;
    Ok(t)
}

/// The most the compat descriptors of `devices` destination devices can hold: each one's text
/// is a Compat record's body, at most `max_record` bytes.
fn compat_bound(devices: usize, max_record: u64) -> u64 {
    (devices as u64).saturating_mul(max_record)
}

/// Refuses `[gpa, gpa + len)` unless one RAM range holds all of it (nothing is written
/// outside guest RAM, holes included).
fn check_in_ram(
    ranges: &[(u64, u64)],
    at: RecordAt,
    what: &str,
    gpa: u64,
    len: u64,
    phase: Phase,
) -> Result<()> {
    let inside = gpa.checked_add(len).is_some_and(|end| {
        ranges
            .iter()
            .any(|&(start, rlen)| gpa >= start && end <= start.saturating_add(rlen))
    });
    if inside {
        return Ok(());
    }
    let map: Vec<String> = ranges
        .iter()
        .map(|&(s, l)| format!("{s:#x}..{:#x}", s.saturating_add(l)))
        .collect();
    Err(Error::Protocol {
        phase,
        reason: format!(
            "{at}: {what} at {gpa:#x} (+{len:#x} bytes) outside guest RAM ({})",
            map.join(", ")
        ),
    })
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
                migration_flags_known: true,
                dma_logging_limits: None,
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
    /// What the destination held in memory to receive (guest RAM and what the devices keep
    /// are not counted: they are written in place).
    pub memory: ReceiveMemory,
}

/// The destination's own memory while receiving, and its bound.
///
/// Records are read one at a time into one buffer per connection, sized to the record
/// (`Limits::max_record` at most); pages are written into guest RAM and device state into the
/// device as each record arrives; the compat descriptors are kept until the verdict, at most
/// one per destination device with its text (a source that describes more devices is counted,
/// not stored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReceiveMemory {
    /// The largest record buffer of each connection, added up (main channel first).
    pub record_buffers: u64,
    /// The compat descriptors' bytes kept until the verdict.
    pub compat: u64,
    /// The bound for this migration's connections under the destination's limits:
    /// connections × `max_record` + one `max_record` per destination device for the
    /// descriptors.
    pub bound: u64,
}

/// The destination side.
pub struct Destination {
    platform: DestinationPlatform,
    limits: Limits,
    hook: Option<DestinationHook>,
    /// Test hook: page channels do not wait for each other at a round's end.
    skip_round_barrier: bool,
    /// Test hook: no round acknowledgements, as a destination from before them.
    no_round_acks: bool,
    /// The longest any one phase may take (see [`Destination::set_phase_deadline`]).
    phase_deadline: Option<Duration>,
    /// The running receive's phase watch.
    watch: Option<Arc<PhaseWatch>>,
}

/// The destination's phase deadline: a thread that aborts the connections when the current
/// phase has run longer than the limit (a peer that trickles bytes just fast enough to beat
/// every per-read timeout holds nothing longer than that).
struct PhaseWatch {
    limit: Duration,
    state: Mutex<WatchState>,
    cv: Condvar,
    /// Joined by `finish`: the thread holds the abort hook, and with it a connection's fd.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct WatchState {
    phase: Phase,
    since: Instant,
    /// The phase that ran out, once one did.
    expired: Option<Phase>,
    done: bool,
}

impl PhaseWatch {
    fn start(limit: Duration, abort: Arc<Abort>) -> Arc<PhaseWatch> {
        let w = Arc::new(PhaseWatch {
            limit,
            state: Mutex::new(WatchState {
                phase: Phase::Compat,
                since: Instant::now(),
                expired: None,
                done: false,
            }),
            cv: Condvar::new(),
            thread: Mutex::new(None),
        });
        let watch = Arc::clone(&w);
        let thread = std::thread::Builder::new()
            .name("livemig-phase-deadline".into())
            .spawn(move || {
                let mut st = watch.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if st.done {
                        return;
                    }
                    let left = watch.limit.saturating_sub(st.since.elapsed());
                    if left.is_zero() {
                        st.expired = Some(st.phase);
                        drop(st);
                        abort();
                        return;
                    }
                    st = watch
                        .cv
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            })
            .ok();
        *w.thread.lock().unwrap_or_else(|p| p.into_inner()) = thread;
        w
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new phase: its own full limit.
    fn enter(&self, phase: Phase) {
        let mut st = self.lock();
        st.phase = phase;
        st.since = Instant::now();
        self.cv.notify_all();
    }

    fn expired(&self) -> Option<Phase> {
        self.lock().expired
    }

    /// Stops the watch and waits for its thread, so the abort hook (and the connection it
    /// holds) is gone when the receive returns.
    fn finish(&self) {
        self.lock().done = true;
        self.cv.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
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
            hook: None,
            skip_round_barrier: false,
            no_round_acks: false,
            phase_deadline: None,
            watch: None,
        }
    }

    /// Ends a migration whose phase (compat exchange, receiving, resume) runs longer than
    /// `limit`: the connections are aborted and the error ([`Error::Deadline`]) names the phase
    /// and the limit, so a peer that trickles bytes just fast enough to beat every per-read
    /// timeout cannot hold the destination. It needs an abort hook, i.e.
    /// [`receive_channels`](Self::receive_channels). `None` (the default): no limit.
    pub fn set_phase_deadline(&mut self, limit: Option<Duration>) {
        self.phase_deadline = limit;
    }

    /// The stream limits the destination reads with (record size, device state, stream size,
    /// devices); [`Limits::default`] unless set. `max_record` bounds each connection's buffer,
    /// see [`ReceiveMemory`].
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Calls `hook` as the migration moves (see [`DestinationEvent`]).
    pub fn on_event(&mut self, hook: impl FnMut(DestinationEvent) + Send + 'static) {
        self.hook = Some(Box::new(hook));
    }

    fn emit(&mut self, e: DestinationEvent) {
        if let (DestinationEvent::Phase(p), Some(w)) = (e, &self.watch) {
            w.enter(p);
        }
        if let Some(h) = self.hook.as_mut() {
            h(e);
        }
    }

    /// The platform.
    pub fn platform(&self) -> &DestinationPlatform {
        &self.platform
    }

    /// The platform, mutable (to inspect or save the devices after a migration).
    pub fn platform_mut(&mut self) -> &mut DestinationPlatform {
        &mut self.platform
    }

    /// For negative controls only: page channels apply a round's pages without waiting for the
    /// other channels to finish the round before, which lets an older copy of a page overwrite
    /// a newer one. Never use it for a real migration.
    #[doc(hidden)]
    pub fn x_skip_round_barrier(&mut self, skip: bool) {
        self.skip_round_barrier = skip;
    }

    /// For negative controls only: behave as a destination from before round
    /// acknowledgements (never offer them).
    #[doc(hidden)]
    pub fn x_no_round_acks(&mut self, off: bool) {
        self.no_round_acks = off;
    }

    /// Receives a migration from `data`, answering on `back`. On failure the devices are reset
    /// (the received state discarded), `Failed` is sent if the return path still works, and
    /// the error is returned. A source with page channels is refused: see
    /// [`receive_channels`](Self::receive_channels).
    pub fn receive<R: Read, W: Write>(&mut self, data: R, back: W) -> Result<ReceiveReport> {
        self.receive_inner(data, back, None, None)
    }

    /// Receives a migration from `data` (the main channel), answering on `back`, and takes
    /// the page channels the source announces from `accept` once it has accepted the devices.
    /// Each is checked (its Channel record carries the main stream's token and count, and an
    /// index not seen yet) before any of its pages is written. `abort` unblocks a read of the
    /// main channel when a page channel fails. Page channels write guest memory in parallel;
    /// at each round's end every channel waits for the others (an older copy of a page can
    /// never overwrite a newer one), and the devices run only after the main channel's End and
    /// every page channel's End.
    pub fn receive_channels<R: Read, W: Write>(
        &mut self,
        data: R,
        back: W,
        abort: Abort,
        accept: &mut Accept<'_>,
    ) -> Result<ReceiveReport> {
        self.receive_inner(data, back, Some(abort), Some(accept))
    }

    fn receive_inner<R: Read, W: Write>(
        &mut self,
        data: R,
        mut back: W,
        abort: Option<Abort>,
        accept: Option<&mut Accept<'_>>,
    ) -> Result<ReceiveReport> {
        let mut touched = false;
        let abort = abort.map(Arc::new);
        self.watch = match (self.phase_deadline, &abort) {
            (Some(limit), Some(a)) => Some(PhaseWatch::start(limit, Arc::clone(a))),
            _ => None,
        };
        let abort: Option<Abort> = abort.map(|a| Box::new(move || a()) as Abort);
        let result = self.run(data, &mut back, &mut touched, abort, accept);
        let expired = self.watch.take().and_then(|w| {
            w.finish();
            w.expired()
        });
        let result = match (result, expired) {
            (Err(_), Some(phase)) => Err(Error::Deadline {
                phase,
                reason: format!(
                    "the {phase} phase ran past the destination's phase deadline of {:.1} s (the \
                     source sent too slowly); the connections were aborted",
                    self.phase_deadline.map_or(0.0, |d| d.as_secs_f64())
                ),
            }),
            (r, _) => r,
        };
        match result {
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
        abort: Option<Abort>,
        mut accept: Option<&mut Accept<'_>>,
    ) -> Result<ReceiveReport> {
        let mut phase = Phase::Compat;
        let serr = |phase: Phase| move |source| Error::Stream { phase, source };
        let mut rd = Reader::new(data, self.limits).map_err(serr(phase))?;
        let mut seen: Vec<DeviceDescriptor> = Vec::new();
        let mut compat_bytes = 0u64;
        let mut multi: Option<StreamChannel> = None;
        loop {
            let at = RecordAt::next(&rd);
            match rd.next().map_err(serr(phase))? {
                // The stream reader admits it only as the first record.
                Some(Record::Channel(c)) => {
                    if c.index != 0 {
                        return Err(Error::Protocol {
                            phase,
                            reason: format!(
                                "the first connection is page channel {} of {}; the main \
                                 channel (index 0) must connect first",
                                c.index, c.count
                            ),
                        });
                    }
                    if c.count < 2 || c.count > MAX_CHANNELS {
                        return Err(Error::Protocol {
                            phase,
                            reason: format!(
                                "Channel count {}: a multi-channel migration has 2 to \
                                 {MAX_CHANNELS} page channels",
                                c.count
                            ),
                        });
                    }
                    if accept.is_none() {
                        return Err(Error::Protocol {
                            phase,
                            reason: format!(
                                "the source uses {} page channels; this destination takes one \
                                 connection",
                                c.count
                            ),
                        });
                    }
                    multi = Some(c);
                }
                Some(Record::Compat(c)) => {
                    if c.device as usize != seen.len() {
                        return Err(Error::Protocol {
                            phase,
                            reason: format!(
                                "{at}: Compat for device {} where device {} was expected",
                                c.device,
                                seen.len()
                            ),
                        });
                    }
                    // Beyond this destination's devices only the count matters (the verdict
                    // refuses it): an empty descriptor keeps the memory bounded.
                    let keep = seen.len() < self.platform.devices.len();
                    let text = |b: &[u8]| if keep { b.to_vec() } else { Vec::new() };
                    if keep {
                        compat_bytes += (c.identity.len() + c.compat.len()) as u64;
                    }
                    seen.push(DeviceDescriptor {
                        device: DeviceCompat {
                            identity: if keep {
                                c.identity.to_string()
                            } else {
                                String::new()
                            },
                            compat: text(c.compat),
                            migration_flags: c.migration_flags,
                            dma_logging: c.dirty_caps.device(),
                        },
                        iommu_dirty_tracking: c.dirty_caps.iommu(),
                        page_size_mask: c.page_size_mask,
                        migration_flags_known: true,
                        dma_logging_limits: None,
                    });
                }
                Some(Record::Round(r)) if r.round == 0 => break,
                // An optional record of a type this version does not know (the format's rule).
                Some(Record::Skipped { .. }) => {}
                Some(other) => {
                    return Err(Error::Protocol {
                        phase,
                        reason: format!(
                            "{at}: {} before the end of the compat section",
                            other.name()
                        ),
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
        self.emit(DestinationEvent::Phase(Phase::Compat));
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
        // Only a source that said it reads them gets acknowledgements.
        let round_acks =
            rd.header().minor >= livemig_stream::format::MINOR_ROUND_ACKS && !self.no_round_acks;
        if round_acks {
            Message::Capabilities(crate::control::CAP_ROUND_ACKS)
                .write_to(back)
                .map_err(|source| Error::Link {
                    phase,
                    what: "return path",
                    source,
                })?;
        }
        Message::CompatOk
            .write_to(back)
            .map_err(|source| Error::Link {
                phase,
                what: "return path",
                source,
            })?;

        // The page channels: accepted now, each checked by its own thread before any of its
        // pages is read (so a slow one holds up no other).
        let mut page_conns: Vec<Box<dyn Read + Send>> = Vec::new();
        let mut page_aborts: Vec<Abort> = Vec::new();
        if let (Some(main), Some(accept)) = (multi, accept.as_mut()) {
            for _ in 0..main.count {
                let (conn, abort) = accept().map_err(|source| Error::Link {
                    phase,
                    what: "accepting a page channel",
                    source,
                })?;
                page_conns.push(conn);
                page_aborts.push(abort);
            }
        }
        let claimed = Mutex::new(vec![false; page_conns.len()]);

        phase = Phase::Receive;
        self.emit(DestinationEvent::Phase(phase));
        let mem = Arc::clone(&self.platform.memory);
        let n = self.platform.devices.len();
        let connections = 1 + page_conns.len() as u64;
        let mut report = ReceiveReport {
            device_bytes: vec![0; n],
            memory: ReceiveMemory {
                compat: compat_bytes,
                bound: connections
                    .saturating_mul(self.limits.max_record)
                    .saturating_add(compat_bound(n, self.limits.max_record)),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut stop_copy_seen = vec![false; n];
        let ranges = mem.ranges();
        // Pages on the main channel (one connection).
        let mut main_pages = PageTotals::default();
        let gate = Gate::new(page_conns.len() as u32, self.skip_round_barrier);
        let limits = self.limits;
        let (main_result, page_results) = std::thread::scope(|scope| {
            let threads: Vec<_> = page_conns
                .into_iter()
                .enumerate()
                .map(|(i, conn)| {
                    let (mem, ranges, gate, abort) = (&*mem, &ranges, &gate, &abort);
                    let (claimed, main) = (&claimed, multi.unwrap_or_default());
                    scope.spawn(move || {
                        let index = i as u32 + 1;
                        let r = receive_pages(conn, main, claimed, limits, mem, ranges, gate);
                        // The first failure stops the others, the main channel's read too.
                        if r.is_err() && gate.fail(index) {
                            if let Some(a) = abort {
                                a();
                            }
                        }
                        r
                    })
                })
                .collect();
            let main_result = (|| -> Result<Instant> {
                let end_at;
                // This round's device loads: microseconds, bytes (for the acknowledgement).
                let mut round_load = (0u64, 0u64);
                loop {
                    let at = RecordAt::next(&rd);
                    let rec = rd.next().map_err(serr(phase))?;
                    match rec {
                        Some(Record::Pages(_) | Record::ZeroPages(_)) if multi.is_some() => {
                            return Err(Error::Protocol {
                                phase,
                                reason: format!(
                                    "{at}: pages on the main channel of a multi-channel \
                                     migration (they travel on the page channels)"
                                ),
                            });
                        }
                        Some(rec @ (Record::Pages(_) | Record::ZeroPages(_))) => {
                            apply_pages(&rec, at, &*mem, &ranges, &mut main_pages)?;
                        }
                        Some(Record::DeviceState(s)) => {
                            let i = s.device as usize;
                            let Some(d) = self.platform.devices.get_mut(i) else {
                                return Err(Error::Protocol {
                                    phase,
                                    reason: format!("{at}: DeviceState for unknown device {i}"),
                                });
                            };
                            if s.phase == StreamPhase::StopCopy {
                                if !stop_copy_seen.contains(&true) {
                                    if let Some(h) = self.hook.as_mut() {
                                        h(DestinationEvent::StopCopy);
                                    }
                                }
                                stop_copy_seen[i] = true;
                            }
                            let t = Instant::now();
                            d.load(s.data)
                                .map_err(|source| dev_err(phase, i, &**d, source))?;
                            round_load.0 += t.elapsed().as_micros() as u64;
                            round_load.1 += s.data.len() as u64;
                            report.device_bytes[i] += s.data.len() as u64;
                        }
                        Some(Record::Round(r)) => {
                            // Rounds come in order from 1: an acknowledgement names a round
                            // the source sent, and the page channels' barrier waits for it.
                            let expected =
                                report
                                    .rounds
                                    .checked_add(1)
                                    .ok_or_else(|| Error::Protocol {
                                        phase,
                                        reason: "more than 2^32 rounds".into(),
                                    })?;
                            if r.round != expected {
                                return Err(Error::Protocol {
                                    phase,
                                    reason: format!(
                                        "{at}: Round {} where round {expected} was expected",
                                        r.round
                                    ),
                                });
                            }
                            report.rounds = expected;
                            if let Some(h) = self.hook.as_mut() {
                                h(DestinationEvent::Round(r.round));
                            }
                            if round_acks {
                                // With page channels the round is applied once all of them
                                // have passed its Sync.
                                if multi.is_some() {
                                    gate.reached(r.round)?;
                                }
                                let (device_load_us, device_bytes) =
                                    std::mem::take(&mut round_load);
                                Message::RoundAck {
                                    round: r.round,
                                    device_load_us,
                                    device_bytes,
                                }
                                .write_to(back)
                                .map_err(|source| Error::Link {
                                    phase,
                                    what: "return path",
                                    source,
                                })?;
                            }
                        }
                        Some(Record::End(_)) => {
                            end_at = Instant::now();
                            break;
                        }
                        // An optional record of a type this version does not know.
                        Some(Record::Skipped { .. }) => {}
                        Some(other) => {
                            return Err(Error::Protocol {
                                phase,
                                reason: format!("{at}: unexpected {} record", other.name()),
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
                Ok(end_at)
            })();
            if main_result.is_err() && gate.fail(0) {
                for a in &page_aborts {
                    a();
                }
            }
            let page_results: Vec<Result<PageTotals>> = threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(Error::Protocol {
                            phase,
                            reason: "a page channel's receiver thread panicked".into(),
                        })
                    })
                })
                .collect();
            (main_result, page_results)
        });
        report.pages += main_pages.pages;
        report.zero_pages += main_pages.zero_pages;
        // The failure that came first explains the others (an aborted read, a stopped wait).
        let first = gate.first_failure();
        let mut page_failure = None;
        for (i, r) in page_results.into_iter().enumerate() {
            let index = i as u32 + 1;
            match r {
                Ok(t) => {
                    report.pages += t.pages;
                    report.zero_pages += t.zero_pages;
                    report.bytes += t.bytes;
                    report.memory.record_buffers += t.buffer;
                }
                Err(e) if first == Some(index) || (first.is_none() && page_failure.is_none()) => {
                    page_failure = Some(e);
                }
                Err(_) => {}
            }
        }
        let end_at = match (first, page_failure) {
            (Some(i), Some(e)) if i != 0 => return Err(e),
            (_, failure) => {
                let end_at = main_result?;
                if let Some(e) = failure {
                    return Err(e);
                }
                end_at
            }
        };
        report.bytes += rd.offset();
        report.memory.record_buffers += rd.buffer_capacity() as u64;
        phase = Phase::Resume;
        self.emit(DestinationEvent::Phase(phase));
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
        let loaded = Instant::now();
        // Every P2P-capable device reaches RUNNING_P2P before any runs: no device may DMA
        // into a peer that is not yet ready for it.
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if has_p2p(&**d) {
                d.transition(MigrationState::RunningP2p)
                    .map_err(|source| dev_err(phase, i, &**d, source))?;
            }
        }
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.transition(MigrationState::Running)
                .map_err(|source| dev_err(phase, i, &**d, source))?;
        }
        report.load_us = end_at.elapsed().as_micros() as u64;
        // From here on the VM runs here: a lost reply must not undo that.
        let _ = Message::Resumed {
            load_us: loaded.duration_since(end_at).as_micros() as u64,
            run_us: loaded.elapsed().as_micros() as u64,
        }
        .write_to(back);
        Ok(report)
    }
}
