//! The [`MigrationDevice`] trait: what a migration engine needs from a device, implemented by
//! the kernel device ([`VfioDevice`](crate::VfioDevice)), the simulated device
//! (`sim::SimDevice`, feature `sim`) and device models in other crates.

use crate::data::DataChannel;
use crate::error::Error;
use crate::fsm::{self, MigrationFlags, MigrationState};

/// The result of a (possibly combined) transition.
#[derive(Debug)]
pub struct Transition<D> {
    /// The state the device was in before.
    pub from: MigrationState,
    /// The arcs' end states, in order; the last one is the target. Empty if already there.
    pub path: Vec<MigrationState>,
    /// The data transfer session created on the way (an arc into STOP_COPY, PRE_COPY,
    /// PRE_COPY_P2P or RESUMING). `None` when no arc created one — including
    /// PRE_COPY → STOP_COPY, which keeps using the session already open.
    pub data: Option<D>,
}

/// The outcome of [`MigrationDevice::enable_precopy_info_v2`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrecopyInfoV2 {
    /// The device reports `VFIO_PRECOPY_INFO_REINIT` from now on (until it is closed).
    Enabled,
    /// It does not; why (the kernel's answer).
    NotSupported(String),
}

/// A device that takes part in VFIO migration v2.
///
/// `set_migration_state` is one `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET: like the kernel it
/// accepts any target and performs combination transitions itself. [`transition`] instead walks
/// the kernel's path one arc at a time, so a failure names the arc and the state it left.
///
/// [`transition`]: MigrationDevice::transition
pub trait MigrationDevice {
    /// The data transfer session type.
    type Data: DataChannel;

    /// The device's migration flags (`VFIO_DEVICE_FEATURE_MIGRATION`), validated.
    fn migration_flags(&self) -> Result<MigrationFlags, Error>;

    /// The current state (`MIG_DEVICE_STATE` GET).
    fn migration_state(&self) -> Result<MigrationState, Error>;

    /// Requests `target` (`MIG_DEVICE_STATE` SET); returns the data session the arc created.
    fn set_migration_state(&mut self, target: MigrationState) -> Result<Option<Self::Data>, Error>;

    /// Estimated bytes STOP_COPY will produce (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
    fn stop_copy_size(&self) -> Result<u64, Error>;

    /// Resets the device (`VFIO_DEVICE_RESET`): the way out of ERROR, back to RUNNING.
    fn reset(&mut self) -> Result<(), Error>;

    /// Opts in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (Linux 7.3), after which data
    /// sessions report [`PrecopyInfo::reinit`](crate::PrecopyInfo::reinit). Probed at run
    /// time: a kernel or device without it is [`PrecopyInfoV2::NotSupported`] with the
    /// reason, never an error. The default (devices that cannot re-initialise) is not
    /// supported.
    fn enable_precopy_info_v2(&mut self) -> Result<PrecopyInfoV2, Error> {
        Ok(PrecopyInfoV2::NotSupported(
            "this device type has no PRECOPY_INFOv2".into(),
        ))
    }

    /// The arcs the kernel would take from the current state to `target`.
    fn plan(&self, target: MigrationState) -> Result<Vec<MigrationState>, Error> {
        fsm::plan(self.migration_state()?, target, self.migration_flags()?)
    }

    /// Moves to `target` one arc at a time along the kernel's path.
    ///
    /// On a failing arc the state is read back and [`Error::ArcFailed`] names the arc, the target
    /// and where the device was left (ERROR means [`reset`](MigrationDevice::reset) is needed).
    fn transition(&mut self, target: MigrationState) -> Result<Transition<Self::Data>, Error> {
        let flags = self.migration_flags()?;
        let from = self.migration_state()?;
        let path = fsm::plan(from, target, flags)?;
        let mut at = from;
        let mut data = None;
        for &step in &path {
            match self.set_migration_state(step) {
                Ok(created) => {
                    if created.is_some() {
                        data = created;
                    }
                    at = step;
                }
                Err(source) => {
                    let left_in = self.migration_state().ok();
                    return Err(Error::ArcFailed {
                        from: at,
                        to: step,
                        target,
                        left_in,
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(Transition { from, path, data })
    }
}
