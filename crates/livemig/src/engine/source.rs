//! The source side: [`Source`] runs one migration attempt phase by phase — compat, start,
//! pre-copy rounds (their policy is [`super::policy`]), stop-and-copy, handover — and recovers
//! to RUNNING on any failure before End. After End the destination's answer decides
//! ([`super::handover`]). Its phases stay together in this file.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use livemig_stream::{
    Channel as StreamChannel, Compat as StreamCompat, DirtyCaps, Phase as StreamPhase, Round,
    Writer, WriterOptions,
};
use livemig_vfio::{MigrationFlags, MigrationState, PrecopyInfoV2};

use crate::bitmap::PageBitmap;
use crate::cancel::{CancelHandle, Watchdog};
use crate::control::{CAP_ROUND_ACKS, Message};
use crate::device::{dev_err, has_p2p};
use crate::error::{Error, Phase, Result};
use crate::memory::PAGE_SIZE;
use crate::platform::SourcePlatform;
use crate::tracker::{self, Chosen, DeviceDirtyCaps, DirtyTracker};
use crate::transport::{Abort, Channel, Connect, DataSink};

use super::attempt::{Attempt, Failure, serr};
use super::config::{MAX_CHANNELS, SourceConfig};
use super::handover::{Outcome, Runs};
use super::policy::{
    Convergence, DeviceLoad, Policy, PolicyConfig, RoundFacts, Step, send_time_us,
};
use super::progress::{Live, Progress, ProgressView};
use super::report::{Event, MigrationReport, RoundReport};
use super::send::{channel_token, send_round};

type Hook = Box<dyn FnMut(&Event<'_>) + Send>;

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
    /// Where the VM runs, as this side decided.
    outcome: Outcome,
    /// The caller gave the VM up on this side ([`Source::discard`]).
    discarded: bool,
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
            outcome: Outcome::new(Runs::Here, "no migration yet", None),
            discarded: false,
        }
    }

    /// Whether the VM runs here, as this engine decided it, and why (also in
    /// [`MigrationReport::outcome`] after a success): [`Runs::Here`] before a migration and
    /// after a failed one the source recovered from, [`Runs::NotHere`] after a success or a
    /// [`discard`](Self::discard), [`Runs::Undecided`] while the source is stopped after a
    /// handover whose outcome it does not know (see [`super::handover`]).
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    fn decide(&mut self, runs: Runs, why: impl Into<String>) {
        self.outcome = Outcome::new(runs, why, self.platform.vcpus.entries());
    }

    /// A live view of the migration for a progress display (bytes and pages of the round
    /// under way, the dirty rate, the downtime stopping now would cost), readable from any
    /// thread.
    pub fn progress_view(&self) -> ProgressView {
        ProgressView(Arc::clone(&self.live))
    }

    /// Whether the source's vCPUs are stopped. After a successful migration they are (the VM
    /// runs at the destination). After a failed one this is `false` (the source runs again)
    /// except when the destination answered `Undecided` or the handover's answer was lost
    /// after End: then the source stays stopped with its state intact, because the
    /// destination may be running the VM ([`outcome`](Self::outcome) says why).
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
        if self.discarded {
            return Err(Error::Config(
                "this source was discarded after an undecided handover; its VM cannot migrate \
                 again"
                    .into(),
            ));
        }
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
                self.decide(Runs::NotHere, "the destination resumed the VM");
                report.outcome = self.outcome.clone();
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
                    if let (Some(phase), Ok(Message::Failed(reason) | Message::Undecided(reason))) =
                        (f.error.phase(), read_past_acks(&mut back))
                    {
                        f.error = Error::Remote {
                            phase,
                            reason: format!("{reason} (the source saw: {})", f.error),
                        };
                    }
                }
                let recovered = self.recover();
                let why = match &recovered {
                    Ok(()) => format!(
                        "the migration failed and the source runs again: {}",
                        f.error
                    ),
                    Err(r) => format!(
                        "the migration failed and the source runs again, with recovery errors \
                         ({r}): {}",
                        f.error
                    ),
                };
                self.decide(Runs::Here, why);
                match recovered {
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
                self.decide(
                    Runs::Undecided,
                    format!(
                        "stopped with its state intact until the caller resumes it (once the \
                         destination is known not to run) or discards it: {}",
                        f.error
                    ),
                );
                Err(f.error)
            }
        }
    }

    /// Returns a stopped source to RUNNING (after a migration whose outcome was unknown, once
    /// the destination is known not to run). Refused after [`discard`](Self::discard).
    pub fn resume(&mut self) -> Result<()> {
        if self.discarded {
            return Err(Error::Config(
                "this source was discarded; its VM may run elsewhere and cannot resume here".into(),
            ));
        }
        let r = self.recover().map_err(|recovery| Error::RecoveryFailed {
            error: Box::new(Error::Cancelled {
                phase: Phase::Recovery,
                reason: "resume requested".into(),
            }),
            recovery,
        });
        self.decide(Runs::Here, "resumed by the caller");
        r
    }

    /// Gives the VM up on this side, for a source left stopped by an undecided handover once
    /// the caller knows (or decides) the VM runs on the destination: dirty tracking and the
    /// throttle end, the devices go to STOP as after a success, the vCPUs stay parked, and
    /// [`resume`](Self::resume) and further migrations are refused. Returns what could not be
    /// cleaned up (a device that would not stop). Refused while the VM runs here.
    pub fn discard(&mut self) -> Result<Vec<String>> {
        if !self.paused {
            return Err(Error::Config(
                "the VM runs on this source; only a stopped source can be discarded".into(),
            ));
        }
        let mut cleanup: Vec<String> = self
            .stop_trackers()
            .into_iter()
            .map(|e| format!("stopping dirty tracking: {e}"))
            .collect();
        self.set_throttle(0);
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            if let Err(source) = d.dev.transition(MigrationState::Stop) {
                cleanup.push(dev_err(Phase::Recovery, i, &*d.dev, source).to_string());
            }
        }
        self.discarded = true;
        self.decide(Runs::NotHere, "discarded by the caller");
        Ok(cleanup)
    }

    /// The round policy's settings.
    fn policy_config(&self) -> PolicyConfig {
        PolicyConfig {
            downtime_limit_us: self
                .cfg
                .downtime_limit
                .as_micros()
                .min(u128::from(u64::MAX)) as u64,
            max_rounds: self.cfg.max_rounds,
            auto_converge: self.cfg.auto_converge,
            hard_deadline_us: self
                .cfg
                .hard_deadline
                .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64),
        }
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
        let mut dirty_reported = 0u64;
        let mut policy = Policy::new(self.policy_config());
        loop {
            round += 1;
            let (r, found) = self.precopy_round(&mut a, round)?;
            dirty_reported = dirty_reported.saturating_add(found);
            self.emit(Event::Round(&r));
            let facts = RoundFacts {
                round,
                remaining: r.remaining_estimate,
                device_estimate: r.device_estimate,
                bandwidth: a.bandwidth,
                dirtied: found,
                sent: r.bytes,
                round_us: r.elapsed_us.max(1),
                initial_pending: (0..a.initial_sent.len())
                    .filter(|&i| !a.initial_sent[i])
                    .collect(),
                round_acks: a.round_acks,
                throttle: self.throttle,
                dirty_total: dirty_reported,
                precopy_us: precopy_t0.elapsed().as_micros().max(1) as u64,
            };
            a.report.rounds.push(r);
            self.live.dirty_rate.store(
                found.saturating_mul(1_000_000) / facts.round_us,
                Ordering::Relaxed,
            );
            let load = a.device_load_estimate_us(facts.device_estimate);
            self.live.downtime_us.store(
                send_time_us(facts.remaining, facts.bandwidth).saturating_add(load.unwrap_or(0)),
                Ordering::Relaxed,
            );
            let mut step = policy.after_round(&facts);
            if step == Step::AwaitAck {
                // The data in flight lands while the VM still runs; the acknowledgements say
                // how fast the destination's devices load their state.
                let t = Instant::now();
                self.wait_round_ack(back, &mut a, round)?;
                a.report.drain_us += t.elapsed().as_micros() as u64;
                step = policy.after_ack(
                    &facts,
                    DeviceLoad {
                        estimate_us: a.device_load_estimate_us(facts.device_estimate),
                        loaded_us: a.dest_load.0,
                        loaded_bytes: a.dest_load.1,
                    },
                );
            }
            match step {
                Step::Continue | Step::Settle | Step::AwaitAck => {}
                Step::Throttle(percent) => self.set_throttle(percent),
                Step::SwitchOver(Convergence::Converged) => {
                    a.report.converged = true;
                    break;
                }
                Step::SwitchOver(Convergence::RoundLimit(reason)) => {
                    a.report.non_convergence = Some(reason);
                    break;
                }
            }
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
        let (down, r) = self.stop_and_copy(&mut a, round + 1, &policy)?;
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
            // Says this source reads round acknowledgements and the Undecided answer.
            minor: livemig_stream::format::MINOR_UNDECIDED,
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
            round_acks = bits & CAP_ROUND_ACKS != 0;
            reply = read_reply(back, phase)?;
        }
        match reply {
            Message::CompatOk => {}
            Message::CompatRefused(reason) => return Err(Error::Refused { phase, reason }.into()),
            // Before End the destination starts nothing: either answer lets the source run on.
            Message::Failed(reason) | Message::Undecided(reason) => {
                return Err(Error::Remote { phase, reason }.into());
            }
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
        if let Some((guard, _)) = &self.platform.viommu
            && let Some(c) = guard.cancelled()
        {
            return Err(Error::Cancelled {
                phase,
                reason: c.to_string(),
            });
        }
        Ok((r, found))
    }

    /// Stop-and-copy: vCPUs paused, devices to STOP_COPY, the final harvest, the last pages
    /// and the devices' state, End. Returns when the downtime began and the round.
    fn stop_and_copy<W: DataSink>(
        &mut self,
        a: &mut Attempt<W>,
        round: u32,
        policy: &Policy,
    ) -> Result<(Instant, RoundReport)> {
        let phase = Phase::StopCopy;
        self.enter(phase);
        self.check_cancel()?;
        // Will it fit the hard deadline? The last estimate at the measured rate, and the
        // destination's devices loading their state at the rate they showed.
        let left = a.report.rounds.last().map_or(0, |r| r.remaining_estimate);
        let device = a.report.rounds.last().map_or(0, |r| r.device_estimate);
        policy
            .hard_deadline_check(left, a.bandwidth, device, a.device_load_estimate_us(device))
            .map_err(|reason| Error::Deadline { phase, reason })?;
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
        // From here End may reach the destination, which then decides: a failure to finish or
        // close the stream is no longer a reason to run here; only the answer can be.
        let ended =
            a.w.finish()
                .map_err(serr(phase))
                .and_then(|mut sink| {
                    sink.close().map_err(|source| Error::Link {
                        phase,
                        what: "closing the stream",
                        source,
                    })
                })
                .err();
        let sent = Instant::now();
        {
            let p = &mut report.downtime_phases;
            p.send_us = (sent.duration_since(down).as_micros() as u64)
                .saturating_sub(p.stop_and_harvest_us + p.device_save_us);
        }

        let phase = Phase::Handover;
        self.enter(phase);
        let seen = |e: &Option<Error>| match e {
            Some(e) => format!(" (the source saw, ending the stream: {e})"),
            None => String::new(),
        };
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
            Ok(Message::Failed(reason)) => {
                let reason = format!("{reason}{}", seen(&ended));
                return Err(Error::Remote { phase, reason }.into());
            }
            Ok(Message::Undecided(reason)) => {
                return Err(Failure {
                    error: Error::Undecided {
                        phase,
                        reason: format!("the destination says: {reason}"),
                    },
                    resume: false,
                });
            }
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
            Err(source) if ended.is_some() => {
                return Err(Failure {
                    error: Error::Undecided {
                        phase,
                        reason: format!(
                            "no answer came ({source}) after End may have reached the \
                             destination{}",
                            seen(&ended)
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
        if let Some(e) = ended {
            report.source_cleanup.push(format!(
                "ending the stream: {e} (the destination resumed the VM all the same)"
            ));
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
                // Before End the destination starts nothing: either answer lets the source
                // run on.
                Message::Failed(reason) | Message::Undecided(reason) => {
                    return Err(Error::Remote { phase, reason });
                }
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
