//! One migration attempt's working state on the source, handed from phase to phase, and how
//! an attempt fails ([`Failure`]: whether the source may run again).

use std::io::Write;
use std::time::Instant;

use livemig_stream::Writer;

use crate::bitmap::PageBitmap;
use crate::error::{Error, Phase, Result};
use crate::tracker::Chosen;
use crate::transport::DataSink;

use super::progress::Progress;
use super::report::MigrationReport;

/// Where the source is after a failed attempt.
pub(crate) struct Failure {
    pub(crate) error: Error,
    /// False only for the handover ambiguity.
    pub(crate) resume: bool,
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
pub(crate) struct Attempt<W: Write> {
    pub(crate) plan: Vec<Chosen>,
    pub(crate) w: Writer<W>,
    /// The page channels (none: pages go on `w`).
    pub(crate) pages: Vec<Writer<Box<dyn DataSink>>>,
    pub(crate) report: MigrationReport,
    /// Pages to send in the next round.
    pub(crate) dirty: PageBitmap,
    /// Devices that use PRE_COPY.
    pub(crate) precopy: Vec<bool>,
    /// Per device: its initial PRE_COPY data was all read (it reported `initial_bytes` 0 since
    /// it last re-initialised). The switchover waits for every device (vfio.h recommends
    /// leaving PRE_COPY only then); a REINIT clears it again.
    pub(crate) initial_sent: Vec<bool>,
    /// Devices that support the P2P quiescent states.
    pub(crate) p2p: Vec<bool>,
    /// Best measured link rate, bytes/s.
    pub(crate) bandwidth: u64,
    /// Bytes against time.
    pub(crate) progress: Progress,
    /// The destination acknowledges rounds.
    pub(crate) round_acks: bool,
    /// The last round the destination acknowledged.
    pub(crate) acked: u32,
    /// The destination's device loads so far, from its acknowledgements: microseconds, bytes.
    pub(crate) dest_load: (u64, u64),
    /// When the compat exchange began (no destination figure can span more time than this).
    pub(crate) started: Instant,
}

impl<W: Write> Attempt<W> {
    /// How long the destination's devices would take to load `bytes` of device state, at the
    /// rate they loaded pre-copy state; `None` before they loaded any.
    pub(crate) fn device_load_estimate_us(&self, bytes: u64) -> Option<u64> {
        let (us, loaded) = self.dest_load;
        (loaded > 0).then(|| {
            (u128::from(bytes) * u128::from(us) / u128::from(loaded)).min(u128::from(u64::MAX))
                as u64
        })
    }

    /// Refuses a round acknowledgement whose figures cannot be true: more device state loaded
    /// than this source sent in the round, or more time spent loading it than the migration
    /// has lasted (the destination's figures steer convergence and the hard deadline).
    pub(crate) fn check_round_ack(
        &self,
        round: u32,
        load_us: u64,
        bytes: u64,
    ) -> Result<(), String> {
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
    pub(crate) fn bytes(&self) -> u64 {
        self.w.bytes_written() + self.pages.iter().map(|p| p.bytes_written()).sum::<u64>()
    }
}

pub(crate) fn serr(phase: Phase) -> impl Fn(livemig_stream::Error) -> Error {
    move |source| Error::Stream { phase, source }
}
