//! Errors of the engine: every one names what failed and in which phase.

use std::fmt;
use std::io;

/// Where in a migration something happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Checking that the platform can migrate at all (dirty tracking, vIOMMU policy).
    Setup,
    /// The compatibility exchange, before any state moves.
    Compat,
    /// Starting dirty tracking and device PRE_COPY.
    Start,
    /// A pre-copy round (1-based).
    PreCopy(u32),
    /// Stopping vCPUs and devices, the final harvest, STOP_COPY.
    StopCopy,
    /// Waiting for the destination to resume.
    Handover,
    /// Destination: receiving and loading.
    Receive,
    /// Destination: RESUMING → STOP → RUNNING.
    Resume,
    /// Returning the source to RUNNING after a failure.
    Recovery,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Setup => f.write_str("setup"),
            Phase::Compat => f.write_str("compat exchange"),
            Phase::Start => f.write_str("start of tracking"),
            Phase::PreCopy(r) => write!(f, "pre-copy round {r}"),
            Phase::StopCopy => f.write_str("stop-and-copy"),
            Phase::Handover => f.write_str("handover"),
            Phase::Receive => f.write_str("receive"),
            Phase::Resume => f.write_str("resume"),
            Phase::Recovery => f.write_str("recovery"),
        }
    }
}

/// An engine error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Migration cannot start; nothing was changed.
    #[error("migration blocked: {0}")]
    Blocked(String),
    /// A configuration value no migration could use.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The destination refused the source's compatibility descriptors.
    #[error("{phase}: the destination refused: {reason}")]
    Refused {
        /// Where.
        phase: Phase,
        /// The destination's reasons.
        reason: String,
    },
    /// The link (data stream or return path) failed.
    #[error("{phase}: link {what}: {source}")]
    Link {
        /// Where.
        phase: Phase,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The migration stream could not be written or was refused by the reader.
    #[error("{phase}: stream: {source}")]
    Stream {
        /// Where.
        phase: Phase,
        /// The stream error (it names the record and offset).
        #[source]
        source: livemig_stream::Error,
    },
    /// A device operation failed.
    #[error("{phase}: device {index} ({name}): {source}")]
    Device {
        /// Where.
        phase: Phase,
        /// The device's index in the migration.
        index: u32,
        /// The device's name.
        name: String,
        /// The VFIO error (it names the arc or ioctl).
        #[source]
        source: livemig_vfio::Error,
    },
    /// A dirty tracker failed.
    #[error("{phase}: dirty tracker {tracker}: {reason}")]
    Tracker {
        /// Where.
        phase: Phase,
        /// The tracker's name.
        tracker: String,
        /// What failed.
        reason: String,
    },
    /// Guest memory could not be read or written.
    #[error("{phase}: guest memory at {gpa:#x}: {reason}")]
    Memory {
        /// Where.
        phase: Phase,
        /// The guest-physical address.
        gpa: u64,
        /// What was wrong.
        reason: String,
    },
    /// The peer broke the protocol (an unexpected record or message).
    #[error("{phase}: protocol: {reason}")]
    Protocol {
        /// Where.
        phase: Phase,
        /// What was unexpected.
        reason: String,
    },
    /// The other side reported a failure.
    #[error("{phase}: the destination failed: {reason}")]
    Remote {
        /// Where (on this side).
        phase: Phase,
        /// The destination's error text.
        reason: String,
    },
    /// The destination failed but could not promise the VM does not run there (it answered
    /// `Undecided`, or the return path was lost after End): the source stays stopped with its
    /// state intact until the caller resumes it ([`Source::resume`](crate::engine::Source::resume),
    /// once the destination is known not to run) or discards it.
    #[error(
        "{phase}: the destination cannot say whether the VM runs there: {reason}; the source \
         stays stopped with its state intact (resume it only once the destination is known not \
         to run, or discard it)"
    )]
    Undecided {
        /// Where (on this side).
        phase: Phase,
        /// The destination's reason.
        reason: String,
    },
    /// The migration was cancelled (vIOMMU policy, or by the caller).
    #[error("{phase}: cancelled: {reason}")]
    Cancelled {
        /// Where.
        phase: Phase,
        /// Why.
        reason: String,
    },
    /// Stop-and-copy would not fit (or did not fit) the hard deadline; the source runs again.
    #[error("{phase}: hard deadline: {reason}")]
    Deadline {
        /// Where.
        phase: Phase,
        /// The estimate or the time spent, against the deadline.
        reason: String,
    },
    /// A page channel of a multi-channel migration failed.
    #[error("page channel {index}: {source}")]
    PageChannel {
        /// The channel's index (1-based).
        index: u32,
        /// What failed on it.
        #[source]
        source: Box<Error>,
    },
    /// The migration failed and returning the source to RUNNING failed too.
    #[error("{error}; then recovery failed: {recovery}")]
    RecoveryFailed {
        /// The original failure.
        error: Box<Error>,
        /// What could not be restored.
        recovery: String,
    },
}

impl Error {
    /// The phase the error happened in, if it names one.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Error::Blocked(_) => Some(Phase::Setup),
            Error::Config(_) => None,
            Error::Refused { phase, .. }
            | Error::Link { phase, .. }
            | Error::Stream { phase, .. }
            | Error::Device { phase, .. }
            | Error::Tracker { phase, .. }
            | Error::Memory { phase, .. }
            | Error::Protocol { phase, .. }
            | Error::Remote { phase, .. }
            | Error::Undecided { phase, .. }
            | Error::Cancelled { phase, .. }
            | Error::Deadline { phase, .. } => Some(*phase),
            Error::RecoveryFailed { error, .. } => error.phase(),
            Error::PageChannel { source, .. } => source.phase(),
        }
    }

    /// The error and its sources, joined with `: `.
    pub fn chain(&self) -> String {
        chain(self)
    }
}

/// `e` and its sources joined with `: `, skipping a source whose text is already included.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
