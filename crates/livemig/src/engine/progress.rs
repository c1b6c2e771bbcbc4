//! Progress while a migration runs: the byte counter and timeline the sending threads share
//! ([`MigrationReport::timeline`](super::MigrationReport::timeline)), and the live view a
//! progress display reads from another thread ([`ProgressView`]).
//!
//! ```text
//!   send threads ── Progress::add / pages ──> Live (atomics) <── ProgressView::snapshot (any thread)
//!                                    └──> Timeline (a point every TIMELINE_STEP_US)
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The spacing of [`MigrationReport::timeline`](super::MigrationReport::timeline) points while pages move, microseconds.
pub const TIMELINE_STEP_US: u64 = 10_000;

/// Samples the stream's progress for [`MigrationReport::timeline`](super::MigrationReport::timeline).
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
pub(crate) struct Progress {
    timeline: Mutex<Timeline>,
    live: Arc<Live>,
}

impl Progress {
    pub(crate) fn new(live: Arc<Live>) -> Progress {
        live.bytes.store(0, Ordering::Relaxed);
        Progress {
            timeline: Mutex::new(Timeline::new()),
            live,
        }
    }

    /// `delta` more bytes went out; a timeline point if one is due (skipped while another
    /// thread holds the timeline).
    pub(crate) fn add(&self, delta: u64) {
        let now = self.live.bytes.fetch_add(delta, Ordering::Relaxed) + delta;
        if let Ok(mut t) = self.timeline.try_lock() {
            t.sample(now, false);
        }
    }

    /// `n` more of the round's dirty pages were sent (data or zero).
    pub(crate) fn pages(&self, n: u64) {
        self.live.round_done.fetch_add(n, Ordering::Relaxed);
    }

    /// The exact total (at a round's end); always a point.
    pub(crate) fn set(&self, total: u64) {
        self.live.bytes.store(total, Ordering::Relaxed);
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sample(total, true);
    }

    pub(crate) fn into_points(self) -> Vec<(u64, u64)> {
        self.timeline
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .points
    }
}

/// What a progress display reads, shared between the engine and [`ProgressView`]s.
#[derive(Debug, Default)]
pub(crate) struct Live {
    round: AtomicU32,
    round_pages: AtomicU64,
    round_done: AtomicU64,
    bytes: AtomicU64,
    pub(crate) dirty_rate: AtomicU64,
    pub(crate) downtime_us: AtomicU64,
}

impl Live {
    pub(crate) fn begin_round(&self, round: u32, pages: u64) {
        self.round_done.store(0, Ordering::Relaxed);
        self.round_pages.store(pages, Ordering::Relaxed);
        self.round.store(round, Ordering::Relaxed);
    }
}

/// A live view of a source's migration, for progress displays: [`Source::progress_view`](super::Source::progress_view)
/// hands one out, and another thread may read it at any time while the migration runs.
#[derive(Debug, Clone)]
pub struct ProgressView(pub(crate) Arc<Live>);

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
