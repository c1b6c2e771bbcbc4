//! The source's settings: [`SourceConfig`] and its auto-converge steps, and the engine's fixed
//! bounds.

use std::time::Duration;

use crate::tracker::TrackingMode;

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
    /// stopped reading: a watchdog aborts the channel at the limit ([`Error::Deadline`](crate::Error::Deadline)).
    /// `None`: the downtime limit is a target only.
    pub hard_deadline: Option<Duration>,
    /// Connections that carry pages. 1: one connection carries everything. N ≥ 2: the main
    /// connection carries compat, device state and the round summaries, and N more carry the
    /// pages, each round's dirty pages split evenly over them (QEMU's multifd layout); see
    /// [`Source::migrate_channels`](super::Source::migrate_channels). 0 is refused.
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
