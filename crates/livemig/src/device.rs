//! Devices as the engine drives them: [`MigDevice`], object-safe, and [`VfioMigDevice`], its
//! implementation over any `livemig-vfio` [`MigrationDevice`] (the kernel device, the simulated
//! device, the HiSilicon ACC driver over the QM model).

use livemig_vfio::data::{
    DataChannel, PrecopyInfo, PrecopyRound, save_precopy, save_stop_copy, write_resuming,
};
use livemig_vfio::{
    Error as VfioError, MigrationDevice, MigrationFlags, MigrationState, Op, PrecopyInfoV2,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Phase};

/// What a destination checks about a device before accepting its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCompat {
    /// Identity, e.g. `19e5:a256 hisi_acc_vfio_pci sec`: the destination's device must have
    /// the same.
    pub identity: String,
    /// The device's compatibility block (for example an ACC VF's match data), opaque to the
    /// engine and compared byte for byte.
    #[serde(with = "hex_bytes")]
    pub compat: Vec<u8>,
    /// `VFIO_DEVICE_FEATURE_MIGRATION` flags (STOP_COPY 1, P2P 2, PRE_COPY 4).
    pub migration_flags: u32,
    /// The device can log its own DMA (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
    pub dma_logging: bool,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("hex string of odd length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                s.get(i..i + 2)
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
                    .ok_or_else(|| serde::de::Error::custom(format!("invalid hex at {i}")))
            })
            .collect()
    }
}

/// A device taking part in a migration, driven one VFIO migration state at a time.
///
/// Data sessions are internal: an arc that creates one (into PRE_COPY, STOP_COPY, RESUMING)
/// keeps it for the data calls; an arc out of the saving/resuming group closes it.
pub trait MigDevice: Send {
    /// A short name for reports and errors.
    fn name(&self) -> &str;
    /// The compatibility descriptor.
    fn compat(&self) -> DeviceCompat;
    /// The current state.
    fn state(&self) -> Result<MigrationState, VfioError>;
    /// Walks to `target` arc by arc (the error names the failing arc and where it left the
    /// device).
    fn transition(&mut self, target: MigrationState) -> Result<(), VfioError>;
    /// One PRE_COPY round of device data into `sink`, at most `max` bytes.
    fn precopy(&mut self, sink: &mut Vec<u8>, max: u64) -> Result<PrecopyRound, VfioError>;
    /// Bytes the device still has queued in PRE_COPY (initial + dirty), 0 outside PRE_COPY.
    fn precopy_pending(&mut self) -> Result<u64, VfioError>;
    /// The device's PRE_COPY estimate split as the kernel reports it, with
    /// `VFIO_PRECOPY_INFO_REINIT`. The default knows only the total (as dirty bytes, so the
    /// engine never waits on initial data it cannot see).
    fn precopy_info(&mut self) -> Result<PrecopyInfo, VfioError> {
        Ok(PrecopyInfo {
            initial_bytes: 0,
            dirty_bytes: self.precopy_pending()?,
            reinit: false,
        })
    }
    /// Opts in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` before PRE_COPY begins; the
    /// default is not supported.
    fn enable_precopy_info_v2(&mut self) -> Result<PrecopyInfoV2, VfioError> {
        Ok(PrecopyInfoV2::NotSupported(
            "this device does not report re-initialisation".into(),
        ))
    }
    /// Estimated STOP_COPY size.
    fn stop_copy_size(&self) -> Result<u64, VfioError>;
    /// Reads the STOP_COPY data to its end into `sink`.
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError>;
    /// Writes RESUMING data.
    fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError>;
    /// `VFIO_DEVICE_RESET`: back to RUNNING from anywhere, ERROR included.
    fn reset(&mut self) -> Result<(), VfioError>;
}

/// [`MigDevice`] over a `livemig-vfio` [`MigrationDevice`].
pub struct VfioMigDevice<D: MigrationDevice> {
    name: String,
    compat: DeviceCompat,
    dev: D,
    data: Option<D::Data>,
}

impl<D: MigrationDevice> std::fmt::Debug for VfioMigDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioMigDevice")
            .field("name", &self.name)
            .field("compat", &self.compat)
            .field("session", &self.data.is_some())
            .finish()
    }
}

impl<D: MigrationDevice> VfioMigDevice<D> {
    /// Wraps `dev`. `compat` is what the platform knows of it: identity and compat block;
    /// `migration_flags` is overwritten from the device (masked by `mask`, so a platform can
    /// refuse to use PRE_COPY).
    pub fn new(
        name: impl Into<String>,
        mut compat: DeviceCompat,
        dev: D,
        mask: MigrationFlags,
    ) -> Result<Self, VfioError> {
        let flags = dev.migration_flags()? & (mask | MigrationFlags::STOP_COPY);
        compat.migration_flags = (flags.bits() & 0xffff_ffff) as u32;
        Ok(VfioMigDevice {
            name: name.into(),
            compat,
            dev,
            data: None,
        })
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.dev
    }

    fn session(&mut self, op: Op) -> Result<&mut D::Data, VfioError> {
        self.data
            .as_mut()
            .ok_or_else(|| VfioError::InvalidArgument {
                op,
                rule: "no data session is open (the device is not in a saving or resuming state)"
                    .into(),
            })
    }
}

fn in_data_group(s: MigrationState) -> bool {
    matches!(
        s,
        MigrationState::PreCopy
            | MigrationState::PreCopyP2p
            | MigrationState::StopCopy
            | MigrationState::Resuming
    )
}

impl<D> MigDevice for VfioMigDevice<D>
where
    D: MigrationDevice + Send,
    D::Data: DataChannel + Send,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn compat(&self) -> DeviceCompat {
        self.compat.clone()
    }

    fn state(&self) -> Result<MigrationState, VfioError> {
        self.dev.migration_state()
    }

    fn transition(&mut self, target: MigrationState) -> Result<(), VfioError> {
        let flags = MigrationFlags::from_bits_truncate(u64::from(self.compat.migration_flags));
        if matches!(target, MigrationState::PreCopy | MigrationState::PreCopyP2p)
            && !flags.contains(MigrationFlags::PRE_COPY)
        {
            return Err(VfioError::StateNotSupported {
                state: target,
                missing: MigrationFlags::PRE_COPY,
            });
        }
        let result = self.dev.transition(target);
        match result {
            Ok(t) => {
                if t.data.is_some() {
                    self.data = t.data;
                } else if !in_data_group(target) {
                    self.data = None;
                }
                Ok(())
            }
            Err(e) => {
                if !self.dev.migration_state().is_ok_and(in_data_group) {
                    self.data = None;
                }
                Err(e)
            }
        }
    }

    fn precopy(&mut self, sink: &mut Vec<u8>, max: u64) -> Result<PrecopyRound, VfioError> {
        let data = self.session(Op::PrecopyInfo)?;
        save_precopy(data, sink, max)
    }

    fn precopy_pending(&mut self) -> Result<u64, VfioError> {
        Ok(self.precopy_info()?.total())
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo, VfioError> {
        if !matches!(
            self.dev.migration_state()?,
            MigrationState::PreCopy | MigrationState::PreCopyP2p
        ) {
            return Ok(PrecopyInfo::default());
        }
        self.session(Op::PrecopyInfo)?.precopy_info()
    }

    fn enable_precopy_info_v2(&mut self) -> Result<PrecopyInfoV2, VfioError> {
        self.dev.enable_precopy_info_v2()
    }

    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        self.dev.stop_copy_size()
    }

    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
        let data = self.session(Op::DataRead)?;
        save_stop_copy(data, sink)
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError> {
        let data = self.session(Op::DataWrite)?;
        write_resuming(data, bytes)
    }

    fn reset(&mut self) -> Result<(), VfioError> {
        self.data = None;
        self.dev.reset()
    }
}

/// Whether `d` reports `VFIO_MIGRATION_P2P`.
pub(crate) fn has_p2p(d: &dyn MigDevice) -> bool {
    MigrationFlags::from_bits_truncate(u64::from(d.compat().migration_flags))
        .contains(MigrationFlags::P2P)
}

/// The engine's error for device `i` failing in `phase`.
pub(crate) fn dev_err(phase: Phase, i: usize, d: &dyn MigDevice, source: VfioError) -> Error {
    Error::Device {
        phase,
        index: i as u32,
        name: d.name().to_string(),
        source,
    }
}
