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
//!                      <──────── Resumed | Failed | Undecided -> RUNNING_P2P (all P2P
//!                                                             devices), then -> RUNNING,
//!                                                             then the vCPUs start
//!  devices stay STOP (the VM now runs there)
//! ```
//!
//! Any failure before the source has sent End returns the source to RUNNING (devices back to
//! RUNNING, resetting those that cannot, trackers stopped, vCPUs resumed) and the destination
//! discards. After End the destination decides ([`handover`], the written state machine):
//! `Failed` (no vCPU entered the guest there, every device reset) also resumes the source;
//! `Undecided`, or a lost return path, leaves the source stopped with its state intact and the
//! error says so ([`Source::resume`] restarts it once an operator knows the destination does
//! not run, [`Source::discard`] gives it up). The destination never starts without the whole
//! stream, and starts its vCPUs only once every device is RUNNING.
//!
//! One concept per file, each importing only what is below it (`cargo xtask cycles` keeps it
//! so):
//!
//! ```text
//!   source.rs       Source: compat, start, pre-copy rounds, stop-and-copy, handover, recovery
//!   destination.rs  Destination: compat check, receive, resume
//!   handover.rs     where the VM runs after a migration: the state machine, Outcome
//!   policy.rs       the round policy, a pure function (continue, settle, switch over, throttle)
//!   send.rs         a round's pages onto the main stream or the page channels
//!   receive.rs      page channels on the destination, the round barrier
//!   attempt.rs      one attempt's working state on the source, and how it fails
//!   progress.rs     bytes and rounds as they go, the live view for displays
//!   report.rs       what both sides report, and their events
//!   config.rs       SourceConfig, auto-converge steps, the engine's fixed bounds
//! ```
//!
//! Below the engine: [`crate::platform`] (what the VMM provides), [`crate::transport`] (what
//! it runs over), [`crate::cancel`] (cancel and deadlines), [`crate::tracker`],
//! [`crate::device`]; above it, [`crate::local`] (whole migrations in one process).

mod attempt;
mod config;
mod destination;
pub mod handover;
pub mod policy;
mod progress;
mod receive;
mod report;
mod send;
mod source;

pub use config::{AutoConverge, MAX_CHANNELS, SETTLE_ROUNDS, SourceConfig};
pub use destination::Destination;
pub use handover::{Outcome, Runs};
pub use progress::{ProgressSnapshot, ProgressView, TIMELINE_STEP_US};
#[doc(hidden)]
pub use receive::x_receive_page_channel;
pub use report::{
    DestinationEvent, DowntimeReport, Event, MigrationReport, ReceiveMemory, ReceiveReport,
    RoundReport,
};
pub use source::Source;

// Paths of the previous release (items that moved out of this module), kept for one release.
#[doc(no_inline)]
pub use crate::platform::{DestinationPlatform, DmaEndpoint, SourceDevice, SourcePlatform, Vcpus};
#[doc(no_inline)]
pub use crate::transport::{Accept, Connect};
