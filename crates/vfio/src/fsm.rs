//! The VFIO migration v2 state machine: states, feature flags and the kernel's path planner.
//!
//! ```text
//!        RUNNING  <--------------------->  PRE_COPY          PRE_COPY, PRE_COPY_P2P and
//!         ^   |                             ^   |           STOP_COPY form the "saving
//!         |   v                             |   v           group": they share one data fd
//!      RUNNING_P2P  <--------------->  PRE_COPY_P2P         and are never passed through.
//!         ^   |                                 |
//!         |   v                                 v
//!         STOP  <------------------------  STOP_COPY
//!         ^   |   ------------------------>
//!         |   v
//!       RESUMING
//!
//!  Without P2P the middle row disappears: RUNNING <-> STOP and PRE_COPY -> STOP_COPY.
//!  Without PRE_COPY the right column above STOP_COPY disappears.
//!  STOP_COPY -> PRE_COPY[_P2P] is not permitted; this crate refuses it itself (see below).
//!  A failed arc may leave the device in ERROR, which only VFIO_DEVICE_RESET leaves (to RUNNING).
//! ```
//!
//! Facts, all from Linux 6.12 `include/uapi/linux/vfio.h` (`enum vfio_device_mig_state` and the
//! FSM description above it) and `drivers/vfio/vfio_main.c` (`vfio_mig_get_next_state`):
//!
//! * With `STOP_COPY` alone the states are RUNNING, STOP, STOP_COPY, RESUMING (and ERROR).
//!   `P2P` adds RUNNING_P2P, `PRE_COPY` adds PRE_COPY, and both add PRE_COPY_P2P.
//! * A driver implements single arcs only; any other request is a *combination transition* that
//!   the kernel performs as a sequence of arcs along the shortest path, never passing *through* a
//!   saving-group state. Arcs into states the device does not support are skipped over.
//! * STOP_COPY → PRE_COPY and STOP_COPY → PRE_COPY_P2P are not permitted: vfio.h (6.12,
//!   lines 1163-1168) says they "return error if requested". What the kernel actually does
//!   depends on the version:
//!   - **Linux 6.12** (checked in Debian's 6.12.95): the table maps both arcs to ERROR
//!     (`vfio_main.c` lines 778-779), ERROR's entry in `state_flags_table` is `~0U` (line 829)
//!     and `device->migration_flags` is an `unsigned int` (`include/linux/vfio.h` line 53), so
//!     on a device with `PRE_COPY` the skip loop (lines 848-850) never sees ERROR as supported
//!     and never leaves it: the ioctl spins forever holding the driver's state mutex. (Without
//!     `PRE_COPY` the target is refused earlier with EINVAL, because PRE_COPY is unsupported.)
//!   - **Linux 7.3.4**: the loop stops at ERROR (`vfio_main.c` line 891) and the function
//!     returns EINVAL (line 896). The fix was posted as "vfio: prevent infinite loop in
//!     vfio_mig_get_next_state() on blocked arc" (Junrui Luo, 2026-06-02, `Fixes: 4db52602a607`)
//!     and the maintainer's reply of 2026-06-05 says it was applied to the vfio next branch for
//!     v7.2; its upstream commit hash is unverified here (no kernel git history was available).
//!     The patch was sent with `Cc: stable`, so 6.12 stable releases after 6.12.95 may carry it;
//!     not checked.
//!
//!   This crate therefore never sends these requests: [`plan`] and [`next_step`] return
//!   [`Error::Blocked`], and [`VfioDevice`](crate::VfioDevice)'s `set_migration_state` reads the
//!   current state before asking for PRE_COPY or PRE_COPY_P2P and refuses from STOP_COPY without
//!   calling the kernel.
//! * ERROR cannot be requested; a device in ERROR needs `VFIO_DEVICE_RESET`.
//!
//! [`plan`] returns exactly the sequence of states the kernel steps through, so that a caller can
//! walk a combination transition one arc at a time and know which arc failed.

use core::fmt;

use crate::Error;
use crate::abi;

bitflags::bitflags! {
    /// The `VFIO_MIGRATION_*` flags a device reports through `VFIO_DEVICE_FEATURE_MIGRATION`.
    ///
    /// Unknown bits from a newer kernel are kept (see [`MigrationFlags::unknown_bits`]) but never
    /// interpreted.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MigrationFlags: u64 {
        /// STOP, STOP_COPY and RESUMING are supported. Every migratable device sets it.
        const STOP_COPY = abi::VFIO_MIGRATION_STOP_COPY;
        /// RUNNING_P2P (and PRE_COPY_P2P with `PRE_COPY`) is supported.
        const P2P = abi::VFIO_MIGRATION_P2P;
        /// PRE_COPY (and PRE_COPY_P2P with `P2P`) is supported.
        const PRE_COPY = abi::VFIO_MIGRATION_PRE_COPY;
        // Keep bits the kernel may add later; `unknown_bits` reports them.
        const _ = !0;
    }
}

impl MigrationFlags {
    /// The four flag combinations vfio.h defines behaviour for.
    pub const DEFINED_COMBINATIONS: [MigrationFlags; 4] = [
        MigrationFlags::STOP_COPY,
        MigrationFlags::STOP_COPY.union(MigrationFlags::P2P),
        MigrationFlags::STOP_COPY.union(MigrationFlags::PRE_COPY),
        MigrationFlags::STOP_COPY
            .union(MigrationFlags::P2P)
            .union(MigrationFlags::PRE_COPY),
    ];

    /// Bits this crate does not know.
    pub fn unknown_bits(self) -> u64 {
        self.bits() & !MigrationFlags::all_known().bits()
    }

    fn all_known() -> MigrationFlags {
        MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY
    }

    /// Checks a value reported by a device: `STOP_COPY` must be set (vfio.h: "at least
    /// VFIO_MIGRATION_STOP_COPY must be set").
    pub fn validate(self) -> Result<MigrationFlags, Error> {
        if !self.contains(MigrationFlags::STOP_COPY) {
            return Err(Error::InvalidFlags { flags: self.bits() });
        }
        Ok(self)
    }

    /// The states a device with these flags supports, ERROR excluded, in `vfio.h` value order.
    pub fn states(self) -> impl Iterator<Item = MigrationState> {
        MigrationState::ALL
            .into_iter()
            .filter(move |s| *s != MigrationState::Error && s.supported_by(self))
    }
}

impl fmt::Display for MigrationFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, flag) in [
            ("STOP_COPY", MigrationFlags::STOP_COPY),
            ("P2P", MigrationFlags::P2P),
            ("PRE_COPY", MigrationFlags::PRE_COPY),
        ] {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if self.unknown_bits() != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{:#x}", self.unknown_bits())?;
            first = false;
        }
        if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

/// A VFIO device migration state (`enum vfio_device_mig_state`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MigrationState {
    /// The device failed an arc and could not return to a valid state; only a reset leaves it.
    Error = abi::VFIO_DEVICE_STATE_ERROR,
    /// Stopped: no DMA, no interrupts, internal state frozen.
    Stop = abi::VFIO_DEVICE_STATE_STOP,
    /// Running normally.
    Running = abi::VFIO_DEVICE_STATE_RUNNING,
    /// Stopped, and the device state is streamed out through the data fd until EOF.
    StopCopy = abi::VFIO_DEVICE_STATE_STOP_COPY,
    /// Stopped, and loading a new device state written to the data fd.
    Resuming = abi::VFIO_DEVICE_STATE_RESUMING,
    /// Running, but initiating no peer-to-peer DMA (quiesced for multi-device migration).
    RunningP2p = abi::VFIO_DEVICE_STATE_RUNNING_P2P,
    /// Running and streaming pre-copy device state through the data fd.
    PreCopy = abi::VFIO_DEVICE_STATE_PRE_COPY,
    /// PRE_COPY with P2P quiesced.
    PreCopyP2p = abi::VFIO_DEVICE_STATE_PRE_COPY_P2P,
}

impl MigrationState {
    /// All eight states in `vfio.h` value order.
    pub const ALL: [MigrationState; 8] = [
        MigrationState::Error,
        MigrationState::Stop,
        MigrationState::Running,
        MigrationState::StopCopy,
        MigrationState::Resuming,
        MigrationState::RunningP2p,
        MigrationState::PreCopy,
        MigrationState::PreCopyP2p,
    ];

    /// The kernel's name without the `VFIO_DEVICE_STATE_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            MigrationState::Error => "ERROR",
            MigrationState::Stop => "STOP",
            MigrationState::Running => "RUNNING",
            MigrationState::StopCopy => "STOP_COPY",
            MigrationState::Resuming => "RESUMING",
            MigrationState::RunningP2p => "RUNNING_P2P",
            MigrationState::PreCopy => "PRE_COPY",
            MigrationState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// The flags a device must report for this state to exist (ERROR exists always).
    pub fn required_flags(self) -> MigrationFlags {
        match self {
            MigrationState::Error => MigrationFlags::empty(),
            MigrationState::Stop
            | MigrationState::Running
            | MigrationState::StopCopy
            | MigrationState::Resuming => MigrationFlags::STOP_COPY,
            MigrationState::RunningP2p => MigrationFlags::STOP_COPY | MigrationFlags::P2P,
            MigrationState::PreCopy => MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY,
            MigrationState::PreCopyP2p => {
                MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY
            }
        }
    }

    /// Whether a device with `flags` has this state.
    pub fn supported_by(self, flags: MigrationFlags) -> bool {
        flags.contains(self.required_flags())
    }

    /// PRE_COPY, PRE_COPY_P2P and STOP_COPY share one data transfer session (vfio.h).
    pub fn is_saving(self) -> bool {
        matches!(
            self,
            MigrationState::PreCopy | MigrationState::PreCopyP2p | MigrationState::StopCopy
        )
    }

    /// The device may advance its own state (DMA, interrupts) in this state.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            MigrationState::Running
                | MigrationState::RunningP2p
                | MigrationState::PreCopy
                | MigrationState::PreCopyP2p
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<u32> for MigrationState {
    type Error = Error;

    /// Rejects values outside `enum vfio_device_mig_state` with [`Error::UnknownState`].
    fn try_from(value: u32) -> Result<Self, Error> {
        MigrationState::ALL
            .get(value as usize)
            .copied()
            .ok_or(Error::UnknownState(value))
    }
}

impl From<MigrationState> for u32 {
    fn from(s: MigrationState) -> u32 {
        s as u32
    }
}

/// The next state the kernel moves to on the way from `from` to `to`, assuming every optional
/// state exists. `None` marks a refused request.
///
/// This is the rule set of `vfio_mig_get_next_state()` (vfio_main.c, Linux 6.12) phrased per
/// source state:
/// * STOP goes straight to STOP_COPY and RESUMING; every running target via RUNNING_P2P.
/// * RUNNING goes straight to PRE_COPY; everything else via RUNNING_P2P.
/// * PRE_COPY reaches PRE_COPY_P2P and STOP_COPY via PRE_COPY_P2P; everything else via RUNNING.
/// * PRE_COPY_P2P goes straight to PRE_COPY and STOP_COPY; everything else via RUNNING_P2P.
/// * STOP_COPY and RESUMING leave via STOP; STOP_COPY → PRE_COPY(_P2P) is refused here
///   (`None`). The kernel's table has ERROR there (lines 778-779), which 6.12 turns into an
///   endless loop and 7.3.4 into EINVAL; see the module docs.
/// * RUNNING_P2P goes straight to STOP, RUNNING and PRE_COPY_P2P; PRE_COPY via RUNNING; the
///   stopped targets STOP_COPY and RESUMING via STOP.
/// * Nothing leaves ERROR, and ERROR is never a target.
fn next_hop(from: MigrationState, to: MigrationState) -> Option<MigrationState> {
    use MigrationState::*;
    if from == Error || to == Error {
        return None;
    }
    if from == to {
        return Some(to);
    }
    Some(match from {
        Stop => match to {
            StopCopy | Resuming => to,
            _ => RunningP2p,
        },
        Running => match to {
            PreCopy => PreCopy,
            _ => RunningP2p,
        },
        PreCopy => match to {
            PreCopyP2p | StopCopy => PreCopyP2p,
            _ => Running,
        },
        PreCopyP2p => match to {
            PreCopy | StopCopy => to,
            _ => RunningP2p,
        },
        StopCopy => match to {
            PreCopy | PreCopyP2p => return None,
            _ => Stop,
        },
        Resuming => Stop,
        RunningP2p => match to {
            Stop | Running | PreCopyP2p => to,
            PreCopy => Running,
            _ => Stop,
        },
        Error => return None,
    })
}

/// The single next arc the kernel takes from `cur` towards `target` on a device with `flags`,
/// skipping over states the device does not have (as `vfio_mig_get_next_state` does).
pub fn next_step(
    cur: MigrationState,
    target: MigrationState,
    flags: MigrationFlags,
) -> Result<MigrationState, Error> {
    check_endpoints(cur, target, flags)?;
    let mut hop = next_hop(cur, target).ok_or(Error::Blocked {
        from: cur,
        to: target,
    })?;
    // Each skip strictly follows the table from an intermediate state; the table has no cycles
    // through unsupported states, but bound the loop anyway so a bad table cannot hang.
    for _ in 0..MigrationState::ALL.len() {
        if hop.supported_by(flags) {
            return Ok(hop);
        }
        hop = next_hop(hop, target).ok_or(Error::Blocked {
            from: cur,
            to: target,
        })?;
    }
    Err(Error::Blocked {
        from: cur,
        to: target,
    })
}

fn check_endpoints(
    cur: MigrationState,
    target: MigrationState,
    flags: MigrationFlags,
) -> Result<(), Error> {
    if !flags.contains(MigrationFlags::STOP_COPY) {
        return Err(Error::InvalidFlags {
            flags: flags.bits(),
        });
    }
    if cur == MigrationState::Error {
        return Err(Error::NeedsReset);
    }
    if target == MigrationState::Error {
        return Err(Error::ErrorNotRequestable);
    }
    for state in [cur, target] {
        if !state.supported_by(flags) {
            return Err(Error::StateNotSupported {
                state,
                missing: state.required_flags().difference(flags),
            });
        }
    }
    Ok(())
}

/// The states the kernel passes through from `cur` to `target`: every arc's end state in order,
/// ending with `target`. Empty when `cur == target`.
///
/// Errors: a state the flags do not allow ([`Error::StateNotSupported`] naming the missing flag),
/// a refused transition ([`Error::Blocked`]), a device in ERROR ([`Error::NeedsReset`]), ERROR as
/// a target ([`Error::ErrorNotRequestable`]), flags without `STOP_COPY`
/// ([`Error::InvalidFlags`]).
pub fn plan(
    cur: MigrationState,
    target: MigrationState,
    flags: MigrationFlags,
) -> Result<Vec<MigrationState>, Error> {
    check_endpoints(cur, target, flags)?;
    let mut path = Vec::new();
    let mut at = cur;
    while at != target {
        let step = next_step(at, target, flags).map_err(|e| match e {
            // Report a refusal anywhere on the way as a refusal of the whole request.
            Error::Blocked { .. } => Error::Blocked {
                from: cur,
                to: target,
            },
            other => other,
        })?;
        path.push(step);
        at = step;
        if path.len() > MigrationState::ALL.len() {
            // Unreachable with the kernel's table; never loop forever on a bad one.
            return Err(Error::Blocked {
                from: cur,
                to: target,
            });
        }
    }
    Ok(path)
}

/// The single arcs a driver must implement for `flags` (the list at the top of
/// `vfio_mig_get_next_state`): every pair `(a, b)` such that some request makes the kernel
/// call the driver with exactly that arc.
pub fn required_arcs(flags: MigrationFlags) -> Vec<(MigrationState, MigrationState)> {
    let mut arcs = Vec::new();
    for from in flags.states() {
        for to in flags.states() {
            if from != to
                && let Ok(step) = next_step(from, to, flags)
                && !arcs.contains(&(from, step))
            {
                arcs.push((from, step));
            }
        }
    }
    arcs.sort();
    arcs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_from_rejects_unknown_values() {
        for v in 0..8u32 {
            assert_eq!(u32::from(MigrationState::try_from(v).unwrap()), v);
        }
        for v in [8u32, 9, 0x100, u32::MAX] {
            assert!(matches!(MigrationState::try_from(v), Err(Error::UnknownState(x)) if x == v));
        }
    }

    #[test]
    fn states_per_flag_set() {
        let names = |f: MigrationFlags| f.states().map(|s| s.name()).collect::<Vec<_>>().join(",");
        assert_eq!(
            names(MigrationFlags::STOP_COPY),
            "STOP,RUNNING,STOP_COPY,RESUMING"
        );
        assert_eq!(
            names(MigrationFlags::DEFINED_COMBINATIONS[3]),
            "STOP,RUNNING,STOP_COPY,RESUMING,RUNNING_P2P,PRE_COPY,PRE_COPY_P2P"
        );
    }

    #[test]
    fn flags_display_and_unknown_bits() {
        let f = MigrationFlags::from_bits_retain(0b1_0101);
        assert_eq!(f.to_string(), "STOP_COPY|PRE_COPY|0x10");
        assert_eq!(f.unknown_bits(), 0x10);
        assert_eq!(MigrationFlags::empty().to_string(), "(none)");
        assert!(matches!(
            MigrationFlags::P2P.validate(),
            Err(Error::InvalidFlags { flags: 2 })
        ));
    }

    #[test]
    fn missing_flag_is_named() {
        let err = plan(
            MigrationState::Running,
            MigrationState::PreCopy,
            MigrationFlags::STOP_COPY,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "state PRE_COPY needs migration flag PRE_COPY, which the device does not report"
        );
        let err = plan(
            MigrationState::Running,
            MigrationState::PreCopyP2p,
            MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("needs migration flag P2P"),
            "{err}"
        );
    }

    #[test]
    fn required_arcs_match_the_kernel_list() {
        use MigrationState::*;
        // vfio_main.c: without P2P and PRE_COPY.
        assert_eq!(required_arcs(MigrationFlags::STOP_COPY), {
            let mut v = vec![
                (Resuming, Stop),
                (Stop, Resuming),
                (Stop, StopCopy),
                (StopCopy, Stop),
                (Running, Stop),
                (Stop, Running),
            ];
            v.sort();
            v
        });
        // With every feature.
        let mut all = vec![
            (Resuming, Stop),
            (Stop, Resuming),
            (Stop, StopCopy),
            (StopCopy, Stop),
            (Running, RunningP2p),
            (RunningP2p, Running),
            (RunningP2p, Stop),
            (Stop, RunningP2p),
            (PreCopy, Running),
            (PreCopy, PreCopyP2p),
            (PreCopyP2p, PreCopy),
            (PreCopyP2p, RunningP2p),
            (PreCopyP2p, StopCopy),
            (Running, PreCopy),
            (RunningP2p, PreCopyP2p),
        ];
        all.sort();
        assert_eq!(required_arcs(MigrationFlags::DEFINED_COMBINATIONS[3]), all);
        // PRE_COPY without P2P: the STOP_COPY set plus RUNNING<->PRE_COPY and PRE_COPY->STOP_COPY.
        let mut pre = vec![
            (Resuming, Stop),
            (Stop, Resuming),
            (Stop, StopCopy),
            (StopCopy, Stop),
            (Running, Stop),
            (Stop, Running),
            (Running, PreCopy),
            (PreCopy, Running),
            (PreCopy, StopCopy),
        ];
        pre.sort();
        assert_eq!(
            required_arcs(MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY),
            pre
        );
    }
}
