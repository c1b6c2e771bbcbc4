//! The destination side: [`Destination`] checks the source's devices before anything moves,
//! loads pages and device state as they arrive (page channels through [`super::receive`]),
//! and after End takes the devices RESUMING → STOP → RUNNING_P2P → RUNNING, then starts the
//! vCPUs (the handover's last step, [`super::handover`]).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig_stream::{Channel as StreamChannel, Limits, Phase as StreamPhase, Reader, Record};
use livemig_vfio::MigrationState;

use crate::cancel::PhaseWatch;
use crate::compat::{self, DeviceDescriptor};
use crate::control::{CAP_ROUND_ACKS, Message};
use crate::device::{DeviceCompat, dev_err, has_p2p};
use crate::error::{Error, Phase, Result};
use crate::platform::DestinationPlatform;
use crate::transport::{Abort, Accept};

use super::config::MAX_CHANNELS;
use super::handover::{Outcome, Runs, entered, undecided_before_reset};
use super::receive::{Gate, PageTotals, RecordAt, apply_pages, compat_bound, receive_pages};
use super::report::{DestinationEvent, ReceiveMemory, ReceiveReport};

type DestinationHook = Box<dyn FnMut(DestinationEvent) + Send>;

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
    /// The last receive's decision of whether the VM runs here.
    outcome: Outcome,
    /// The stream minor version of the source being received.
    peer_minor: u16,
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
            outcome: Outcome::new(Runs::NotHere, "nothing received yet", None),
            peer_minor: 0,
        }
    }

    /// Whether the VM runs here after the last receive, as this engine decided it, and why
    /// (also in [`ReceiveReport::outcome`] after a success). After a failure it is
    /// [`Runs::NotHere`] when the destination answered `Failed`, and [`Runs::Undecided`] when a
    /// vCPU entered the guest here or a device could not be reset (see
    /// [`super::handover`]).
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
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

    /// Receives a migration from `data`, answering on `back`. On success every device is
    /// RUNNING, the platform's vCPUs were started and `Resumed` was sent. On failure the
    /// handover decides ([`super::handover`]): while no vCPU entered the guest here the devices
    /// are reset (the received state discarded) and `Failed` is sent if the return path still
    /// works; otherwise, or when a reset fails, `Undecided` is sent and the error is
    /// [`Error::Undecided`]. [`outcome`](Self::outcome) says which. A source with page channels is refused: see
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
        self.peer_minor = 0;
        let before = self.platform.vcpus.as_ref().and_then(|v| v.entries());
        self.outcome = Outcome::new(Runs::NotHere, "receiving", before.clone());
        let abort = abort.map(Arc::new);
        self.watch = match (self.phase_deadline, &abort) {
            (Some(limit), Some(a)) => Some(PhaseWatch::start(limit, Arc::clone(a))),
            _ => None,
        };
        let abort: Option<Abort> = abort.map(|a| Box::new(move || a()) as Abort);
        let mut started = false;
        let result = self
            .run(data, &mut back, &mut touched, abort, accept)
            .and_then(|ready| self.start_vcpus(ready, &mut started));
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
            Ok((mut report, resumed)) => {
                report.outcome = self.outcome.clone();
                // From here on the VM runs here: a lost reply must not undo that.
                let _ = resumed.write_to(&mut back);
                Ok(report)
            }
            Err(e) => self.fail(e, &mut back, touched, started, before),
        }
    }

    /// The handover's last step: every device is RUNNING; the vCPUs start. Returns the report
    /// and the answer to send.
    fn start_vcpus(
        &mut self,
        (mut report, end_at, loaded): (ReceiveReport, Instant, Instant),
        started: &mut bool,
    ) -> Result<(ReceiveReport, Message)> {
        if let Some(v) = self.platform.vcpus.as_mut() {
            *started = true;
            v.start().map_err(|reason| Error::Protocol {
                phase: Phase::Resume,
                reason: format!("starting the vCPUs: {reason}"),
            })?;
        }
        let entries = self.platform.vcpus.as_ref().and_then(|v| v.entries());
        self.outcome = Outcome::new(
            Runs::Here,
            if self.platform.vcpus.is_some() {
                "every device is RUNNING and the platform's vCPU start step ran"
            } else {
                "every device is RUNNING (the platform starts its own vCPUs)"
            },
            entries,
        );
        report.load_us = end_at.elapsed().as_micros() as u64;
        let resumed = Message::Resumed {
            load_us: loaded.duration_since(end_at).as_micros() as u64,
            run_us: loaded.elapsed().as_micros() as u64,
        };
        Ok((report, resumed))
    }

    /// A failed receive: decide (see [`super::handover`]), answer, report.
    fn fail<W: Write>(
        &mut self,
        e: Error,
        back: &mut W,
        touched: bool,
        started: bool,
        before: Option<Vec<u64>>,
    ) -> Result<ReceiveReport> {
        let phase = e.phase().unwrap_or(Phase::Resume);
        let has_vcpus = self.platform.vcpus.is_some();
        let after = self.platform.vcpus.as_ref().and_then(|v| v.entries());
        let ran = entered(before.as_deref(), after.as_deref());
        let mut undecided = undecided_before_reset(ran, started, has_vcpus).map(|why| match ran {
            Some(true) => format!("{why} (guest entries per vCPU {before:?} -> {after:?})"),
            _ => why.to_string(),
        });
        if undecided.is_none() && touched {
            // Failed promises the received state is gone: every device is reset, and a reset
            // that fails is reported, never dropped.
            let failed: Vec<String> = self
                .platform
                .devices
                .iter_mut()
                .enumerate()
                .filter_map(|(i, d)| {
                    d.reset()
                        .err()
                        .map(|r| format!("device {i} ({}): reset failed: {r}", d.name()))
                })
                .collect();
            if !failed.is_empty() {
                undecided = Some(format!(
                    "{} (no vCPU entered the guest here, but the device state received is not \
                     known to be gone)",
                    failed.join("; ")
                ));
            }
        }
        match undecided {
            None => {
                if !matches!(e, Error::Refused { .. }) {
                    let _ = Message::Failed(e.chain()).write_to(back);
                }
                self.outcome = Outcome::new(
                    Runs::NotHere,
                    format!("the migration failed and this side discarded it: {e}"),
                    after,
                );
                Err(e)
            }
            Some(why) => {
                let reason = format!("{}; {why}", e.chain());
                // An older source does not know Undecided; no answer tells it the same.
                if self.peer_minor >= livemig_stream::format::MINOR_UNDECIDED {
                    let _ = Message::Undecided(reason.clone()).write_to(back);
                }
                self.outcome = Outcome::new(Runs::Undecided, reason.clone(), after);
                Err(Error::Undecided { phase, reason })
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
    ) -> Result<(ReceiveReport, Instant, Instant)> {
        let mut phase = Phase::Compat;
        let serr = |phase: Phase| move |source| Error::Stream { phase, source };
        let mut rd = Reader::new(data, self.limits).map_err(serr(phase))?;
        self.peer_minor = rd.header().minor;
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
            answer(back, phase, Message::CompatRefused(reason.clone()))?;
            return Err(Error::Refused { phase, reason });
        }
        *touched = true;
        for (i, d) in self.platform.devices.iter_mut().enumerate() {
            d.transition(MigrationState::Resuming)
                .map_err(|source| dev_err(phase, i, &**d, source))?;
        }
        // Only a source that said it reads them gets acknowledgements.
        let round_acks =
            self.peer_minor >= livemig_stream::format::MINOR_ROUND_ACKS && !self.no_round_acks;
        if round_acks {
            answer(back, phase, Message::Capabilities(CAP_ROUND_ACKS))?;
        }
        answer(back, phase, Message::CompatOk)?;

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
                        if r.is_err()
                            && gate.fail(index)
                            && let Some(a) = abort
                        {
                            a();
                        }
                        r
                    })
                })
                .collect();
            let main_result =
                (|| -> Result<Instant> {
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
                                    if !stop_copy_seen.contains(&true)
                                        && let Some(h) = self.hook.as_mut()
                                    {
                                        h(DestinationEvent::StopCopy);
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
                                let expected = report.rounds.checked_add(1).ok_or_else(|| {
                                    Error::Protocol {
                                        phase,
                                        reason: "more than 2^32 rounds".into(),
                                    }
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
                                    let ack = Message::RoundAck {
                                        round: r.round,
                                        device_load_us,
                                        device_bytes,
                                    };
                                    answer(back, phase, ack)?;
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
        Ok((report, end_at, loaded))
    }
}

/// Writes `m` on the return path; a failure is the link's, in `phase`.
fn answer<W: Write>(back: &mut W, phase: Phase, m: Message) -> Result<()> {
    m.write_to(back).map_err(|source| Error::Link {
        phase,
        what: "return path",
        source,
    })
}
