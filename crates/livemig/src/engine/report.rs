//! What a migration reports: per round ([`RoundReport`]), the downtime by phase
//! ([`DowntimeReport`]), the whole source side ([`MigrationReport`]) and the destination side
//! ([`ReceiveReport`], [`ReceiveMemory`]), and the events both sides emit as they go.

use serde::Serialize;

use crate::error::Phase;
use crate::tracker::Chosen;

use super::handover::Outcome;

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
    /// a point at least every [`TIMELINE_STEP_US`](super::TIMELINE_STEP_US) while data moves and at every round's end,
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
    /// Whether the VM runs here: after a success it does not (it runs on the destination),
    /// with the vCPUs' guest entries when the decision was taken.
    pub outcome: Outcome,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Progress as the engine goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A phase begins.
    Phase(Phase),
    /// A round ended.
    Round(&'a RoundReport),
}

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
    /// Whether the VM runs here (it does, after a success), with the vCPUs' guest entries.
    pub outcome: Outcome,
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
