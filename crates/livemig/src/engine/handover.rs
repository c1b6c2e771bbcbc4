//! The handover as a state machine: the one place each side decides whether the VM runs there.
//! libvirt's migration protocol v3 is the anchor (the destination decides in Finish whether the
//! guest runs; the source, in Confirm, resumes or stays down; each side records the outcome).
//!
//! ```text
//!  destination
//!    Receiving ──End; every device RESUMING -> STOP (-> RUNNING_P2P) -> RUNNING──> Ready
//!    Ready ──VcpuStart::start──> Running: answers Resumed (a lost answer changes nothing)
//!    a failure anywhere (Refused excepted: nothing was touched):
//!      a vCPU entered the guest here, or a start failed          ──> Undecided (never Failed;
//!        and the platform cannot count entries                        the vCPUs are left as
//!                                                                     they are)
//!      otherwise every device is reset: every reset succeeded     ──> Failed: the VM does not
//!                                                                     run here
//!                                       a reset failed             ──> Undecided (reported)
//!      Undecided goes only to a source whose stream is 1.2+; an older source gets no answer,
//!      which it reads as an unknown outcome too
//!  source
//!    before End is sent: any failure, any answer ──> recover: devices RUNNING, vCPUs resume
//!                                                     (the destination starts nothing
//!                                                     before End)
//!    after End: Resumed                           ──> devices STOP; the VM runs there
//!               Failed                            ──> recover; the VM runs here
//!               Undecided, another message, none  ──> stays stopped with its state intact;
//!                                                     the caller decides: Source::resume
//!                                                     (known not to run there) or
//!                                                     Source::discard
//! ```
//!
//! Both sides record the decision in an [`Outcome`] (in their reports, and from
//! `Source::outcome` / `Destination::outcome` after a failure), with the platform's count of
//! guest entries per vCPU where it keeps one, so a test can hold the decision against what the
//! vCPUs did.

use serde::Serialize;

/// Where the VM runs after a migration, as one side's engine decided it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runs {
    /// The VM runs on this side.
    Here,
    /// The VM does not run on this side (and will not, unless the caller starts it).
    NotHere,
    /// This side cannot say: the source is stopped awaiting the caller's decision, or the
    /// destination's guest may have run (see [`Outcome::why`]).
    #[default]
    Undecided,
}

impl std::fmt::Display for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Runs::Here => "runs here",
            Runs::NotHere => "does not run here",
            Runs::Undecided => "undecided",
        })
    }
}

/// One side's decision of where the VM runs, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The decision.
    pub runs: Runs,
    /// Why, in words an operator can act on.
    pub why: String,
    /// How many times each vCPU on this side has entered the guest (for KVM: `KVM_RUN` calls
    /// made to run guest code), as the platform counted when the decision was taken; `None`
    /// where the platform does not count.
    pub vcpu_entries: Option<Vec<u64>>,
}

impl Outcome {
    pub(crate) fn new(runs: Runs, why: impl Into<String>, vcpu_entries: Option<Vec<u64>>) -> Self {
        Outcome {
            runs,
            why: why.into(),
            vcpu_entries,
        }
    }
}

/// The promise every failure test holds the two sides to: the VM does not run on both, and
/// when it runs on neither, at least one side says why. Returns which side runs (`"source"`,
/// `"destination"` or `"neither"`), or what is wrong.
pub fn one_host(source: &Outcome, destination: &Outcome) -> Result<&'static str, String> {
    match (source.runs, destination.runs) {
        (Runs::Here, Runs::Here) => Err(format!(
            "the VM runs on both hosts (source: {}; destination: {})",
            source.why, destination.why
        )),
        (Runs::Here, _) => Ok("source"),
        (_, Runs::Here) => Ok("destination"),
        _ if source.why.is_empty() && destination.why.is_empty() => {
            Err("the VM runs on neither host and neither side says why".into())
        }
        _ => Ok("neither"),
    }
}

/// Whether a vCPU entered the guest between two counts: `Some(true)` if any count grew,
/// `Some(false)` if none did, `None` when either count is missing or the vCPU sets differ.
pub(crate) fn entered(before: Option<&[u64]>, after: Option<&[u64]>) -> Option<bool> {
    match (before, after) {
        (Some(b), Some(a)) if a.len() == b.len() => Some(a.iter().zip(b).any(|(a, b)| a > b)),
        _ => None,
    }
}

/// Why the destination cannot answer `Failed` after a failure, or `None` when it can (before
/// its devices are reset): a vCPU entered the guest, or a start was attempted and the entries
/// cannot be counted.
pub(crate) fn undecided_before_reset(
    entered: Option<bool>,
    started: bool,
    has_vcpus: bool,
) -> Option<&'static str> {
    match (has_vcpus, entered, started) {
        (false, _, _) => None,
        (true, Some(true), _) => Some("a vCPU entered the guest here"),
        (true, None, true) => Some(
            "the vCPU start failed and this platform does not count guest entries, so the guest \
             may have run here",
        ),
        (true, _, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decide_whether_the_guest_ran() {
        assert_eq!(entered(Some(&[3, 4]), Some(&[3, 4])), Some(false));
        assert_eq!(entered(Some(&[3, 4]), Some(&[3, 5])), Some(true));
        assert_eq!(entered(Some(&[3]), Some(&[3, 5])), None);
        assert_eq!(entered(None, Some(&[3])), None);
        assert_eq!(entered(Some(&[3]), None), None);
    }

    #[test]
    fn one_host_refuses_two_and_a_silent_none() {
        let o = |runs, why: &str| Outcome::new(runs, why, None);
        assert_eq!(
            one_host(&o(Runs::Here, "a"), &o(Runs::NotHere, "b")),
            Ok("source")
        );
        assert_eq!(
            one_host(&o(Runs::NotHere, "a"), &o(Runs::Here, "b")),
            Ok("destination")
        );
        assert_eq!(
            one_host(&o(Runs::Undecided, "lost"), &o(Runs::NotHere, "")),
            Ok("neither")
        );
        assert!(one_host(&o(Runs::Here, "a"), &o(Runs::Here, "b")).is_err());
        assert!(one_host(&o(Runs::Undecided, ""), &o(Runs::Undecided, "")).is_err());
    }

    #[test]
    fn failed_only_while_no_guest_may_have_run() {
        // (has vCPUs, entered, started) -> may the destination answer Failed (after resets)?
        let table = [
            (false, None, false, true),
            (false, None, true, true),
            (true, Some(false), false, true),
            (true, Some(false), true, true),
            (true, None, false, true),
            (true, Some(true), false, false),
            (true, Some(true), true, false),
            (true, None, true, false),
        ];
        for (has, ent, started, failed_ok) in table {
            assert_eq!(
                undecided_before_reset(ent, started, has).is_none(),
                failed_ok,
                "has vCPUs {has}, entered {ent:?}, started {started}"
            );
        }
    }
}
