//! The VFIO migration v2 driver of an ACC VF, as a `livemig-vfio` [`MigrationDevice`].
//!
//! ```text
//!   RUNNING ──> PRE_COPY      open the saving buffer with the 40-byte match block
//!   PRE_COPY ─> STOP_COPY     stop (PAUSE_QM, interrupt states, cache write-back), save: 176 B
//!   RUNNING ──> STOP          stop
//!   STOP ─────> STOP_COPY     open the saving buffer, save
//!   STOP_COPY > STOP          close the buffers
//!   STOP ─────> RESUMING      open the resuming buffer; every write is checked against this
//!                             VF (match block: magic, version, dev_id, qp_num, QUE_ISO_CFG)
//!   RESUMING ─> STOP          decode, load (VF_STATE, registers, SQC_BT/CQC_BT, IFC init)
//!   PRE_COPY ─> RUNNING       close the buffers
//!   STOP ─────> RUNNING       start (IFC init, restart every queue)
//!   flags: STOP_COPY | PRE_COPY (no P2P); a failed arc leaves the state where it was
//! ```
//!
//! This follows `hisi_acc_vf_set_device_state` (Linux 6.12) arc for arc, including its data
//! semantics: the saving buffer reads to EOF (0) at its current end, also in PRE_COPY where
//! vfio.h would have ENOMSG; `VFIO_MIG_GET_PRECOPY_INFO` reports the unread part as
//! `initial_bytes` and never dirty bytes; the resuming buffer refuses more than 176 bytes.
//!
//! Data-fd errors carry the errno the driver returns (`io::Error::raw_os_error`), because a VMM
//! may act on it; line numbers are from 6.12's `drivers/vfio/pci/hisilicon/hisi_acc_vfio_pci.c`:
//!
//! ```text
//!   resume write  more than 176 bytes in total       ENOMEM  (hisi_acc_vf_resume_write, 742-743)
//!                 file disabled (session closed)     ENODEV  (746-748)
//!                 match block does not match this VF EFAULT  (760-762: vf_qm_check_match fails)
//!   save read     position past the end              EINVAL  (hisi_acc_vf_save_read, 860-862)
//!                 file disabled                      ENODEV  (865-867)
//!   PRECOPY_INFO  device not in PRE_COPY             EINVAL  (hisi_acc_vf_precopy_ioctl, 819-822)
//!                 file disabled                      ENODEV  (826-829)
//!                 position past the end              EINVAL  (831-834)
//! ```
//!
//! On a match failure the driver keeps the bytes (`total_length` has grown) and checks again on
//! the next write; so does this model. EFAULT says nothing about the cause, so the reason is kept
//! for diagnostics ([`AccMigration::last_rejection`]), and RESUMING → STOP reports it again when
//! it re-checks the match block.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use livemig_vfio::fsm::{self, MigrationFlags, MigrationState};
use livemig_vfio::{Access, DataChannel, Feature, MigrationDevice, Op, PrecopyInfo};

use crate::access::{Delay, PfRegisters, QmRegisters};
use crate::error::Error;
use crate::seq::{AccVf, LoadOutcome};
use crate::state::{ACC_VF_DATA_LEN, AccVfData, QM_MATCH_SIZE};

/// A migration data buffer (the driver's `hisi_acc_vf_migration_file`).
#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    /// Valid bytes (`total_length`).
    total: usize,
    pos: usize,
    disabled: bool,
}

struct Inner<R, P, D> {
    dev: AccVf<R, P, D>,
    state: MigrationState,
    saving: Option<(u64, Buffer, AccVfData)>,
    resuming: Option<(u64, Buffer)>,
    match_done: bool,
    next_id: u64,
    last_load: Option<LoadOutcome>,
    last_rejection: Option<Error>,
}

/// An ACC VF's migration driver over any register interfaces (the model, or MMIO on a lab
/// host where the VF is bound to plain vfio-pci).
pub struct AccMigration<R, P, D> {
    inner: Arc<Mutex<Inner<R, P, D>>>,
}

/// A data session of [`AccMigration`] (the driver's migration file).
pub struct AccData<R, P, D> {
    inner: Arc<Mutex<Inner<R, P, D>>>,
    id: u64,
}

impl<R, P, D> std::fmt::Debug for AccMigration<R, P, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccMigration").finish_non_exhaustive()
    }
}

impl<R, P, D> std::fmt::Debug for AccData<R, P, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccData").field("id", &self.id).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const SET_STATE: Op = Op::Feature(Access::Set, Feature::MigDeviceState);

fn arc_error(e: Error) -> livemig_vfio::Error {
    livemig_vfio::Error::Ioctl {
        op: SET_STATE,
        source: io::Error::other(e),
    }
}

/// An error with the errno the driver returns on the data fd (see the module docs).
fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The migration flags of an ACC VF.
pub fn acc_flags() -> MigrationFlags {
    MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY
}

impl<R: QmRegisters, P: PfRegisters, D: Delay> AccMigration<R, P, D> {
    /// A driver for `dev`, in RUNNING.
    pub fn new(dev: AccVf<R, P, D>) -> Self {
        AccMigration {
            inner: Arc::new(Mutex::new(Inner {
                dev,
                state: MigrationState::Running,
                saving: None,
                resuming: None,
                match_done: false,
                next_id: 1,
                last_load: None,
                last_rejection: None,
            })),
        }
    }

    /// What the last RESUMING → STOP did.
    pub fn last_load(&self) -> Option<LoadOutcome> {
        lock(&self.inner).last_load
    }

    /// Why the last refused resume write was refused: the data fd reports only the driver's
    /// errno (EFAULT for a match failure, ENOMEM for too much data), this names the cause.
    pub fn last_rejection(&self) -> Option<Error> {
        lock(&self.inner).last_rejection.clone()
    }

    /// The device's compatibility block (device and BAR layout; see
    /// [`CompatBlock`](crate::seq::CompatBlock)): an engine exchanges it before any state moves.
    pub fn compat_block(&self) -> crate::seq::CompatBlock {
        lock(&self.inner).dev.compat_block()
    }

    /// Check a source's compatibility block against this (destination) device without
    /// touching a register: a different BAR layout is refused here, since the driver's match
    /// block cannot tell.
    pub fn check_compat(&self, source: &crate::seq::CompatBlock) -> Result<(), Error> {
        lock(&self.inner).dev.check_compat(source)
    }

    /// Run `f` on the device (for tests and diagnostics).
    pub fn with_device<T>(&self, f: impl FnOnce(&mut AccVf<R, P, D>) -> T) -> T {
        f(&mut lock(&self.inner).dev)
    }
}

impl<R: QmRegisters, P: PfRegisters, D: Delay> Inner<R, P, D> {
    fn disable_fds(&mut self) {
        self.saving = None;
        self.resuming = None;
    }

    fn open_saving(&mut self) -> Result<u64, Error> {
        let data = self.dev.match_data()?;
        let id = self.next_id;
        self.next_id += 1;
        let bytes = data.encode();
        let buf = Buffer {
            total: bytes.len(),
            bytes,
            pos: 0,
            disabled: false,
        };
        self.saving = Some((id, buf, data));
        Ok(id)
    }

    fn save_into_saving(&mut self) -> Result<(), Error> {
        let Some((_, buf, data)) = self.saving.as_mut() else {
            return Ok(());
        };
        self.dev.save(data)?;
        let bytes = data.encode();
        buf.total = bytes.len();
        buf.bytes = bytes;
        Ok(())
    }

    /// One arc of `hisi_acc_vf_set_device_state`; returns a new session id if the arc opened one.
    fn arc(&mut self, next: MigrationState) -> Result<Option<u64>, Error> {
        use MigrationState as S;
        let cur = self.state;
        match (cur, next) {
            (S::Running, S::PreCopy) => {
                let id = self.open_saving()?;
                // The PRE_COPY buffer holds only the match block.
                if let Some((_, buf, _)) = self.saving.as_mut() {
                    buf.total = QM_MATCH_SIZE;
                }
                Ok(Some(id))
            }
            (S::PreCopy, S::StopCopy) => {
                self.dev.stop()?;
                self.save_into_saving()?;
                Ok(None)
            }
            (S::Running, S::Stop) => {
                self.dev.stop()?;
                Ok(None)
            }
            (S::Stop, S::StopCopy) => {
                let id = self.open_saving()?;
                if let Err(e) = self.save_into_saving() {
                    self.saving = None;
                    return Err(e);
                }
                Ok(Some(id))
            }
            (S::StopCopy, S::Stop) | (S::PreCopy, S::Running) => {
                self.disable_fds();
                Ok(None)
            }
            (S::Stop, S::Resuming) => {
                let id = self.next_id;
                self.next_id += 1;
                self.match_done = false;
                self.last_rejection = None;
                self.resuming = Some((id, Buffer::default()));
                Ok(Some(id))
            }
            (S::Resuming, S::Stop) => {
                let bytes = self
                    .resuming
                    .as_ref()
                    .map(|(_, b)| b.bytes[..b.total].to_vec())
                    .unwrap_or_default();
                let data = AccVfData::decode(&bytes)?;
                if !self.match_done {
                    self.dev.check_match(&data)?;
                    self.match_done = true;
                }
                self.last_load = Some(self.dev.load(&data)?);
                self.disable_fds();
                Ok(None)
            }
            (S::Stop, S::Running) => {
                self.dev.start();
                Ok(None)
            }
            (from, to) => Err(Error::NoArc {
                from: from.name(),
                to: to.name(),
            }),
        }
    }
}

impl<R: QmRegisters, P: PfRegisters, D: Delay> MigrationDevice for AccMigration<R, P, D> {
    type Data = AccData<R, P, D>;

    fn migration_flags(&self) -> Result<MigrationFlags, livemig_vfio::Error> {
        Ok(acc_flags())
    }

    fn migration_state(&self) -> Result<MigrationState, livemig_vfio::Error> {
        Ok(lock(&self.inner).state)
    }

    fn set_migration_state(
        &mut self,
        target: MigrationState,
    ) -> Result<Option<Self::Data>, livemig_vfio::Error> {
        let mut g = lock(&self.inner);
        let mut opened = None;
        while g.state != target {
            let next = fsm::next_step(g.state, target, acc_flags())?;
            let id = g.arc(next).map_err(arc_error)?;
            g.state = next;
            if id.is_some() {
                opened = id;
            }
        }
        Ok(opened.map(|id| AccData {
            inner: Arc::clone(&self.inner),
            id,
        }))
    }

    fn stop_copy_size(&self) -> Result<u64, livemig_vfio::Error> {
        Ok(ACC_VF_DATA_LEN as u64)
    }

    fn reset(&mut self) -> Result<(), livemig_vfio::Error> {
        // hisi_acc_vf_reset: not ready, RUNNING, buffers closed.
        let mut g = lock(&self.inner);
        g.dev.set_ready(false);
        g.state = MigrationState::Running;
        g.disable_fds();
        Ok(())
    }
}

impl<R: QmRegisters, P: PfRegisters, D: Delay> Read for AccData<R, P, D> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut g = lock(&self.inner);
        // A closed session is the driver's disabled file.
        let Some((id, buf, _)) = g.saving.as_mut() else {
            return Err(errno(libc::ENODEV));
        };
        if *id != self.id {
            return Err(errno(libc::ENODEV));
        }
        if buf.pos > buf.total {
            return Err(errno(libc::EINVAL));
        }
        if buf.disabled {
            return Err(errno(libc::ENODEV));
        }
        let n = (buf.total - buf.pos).min(out.len());
        out[..n].copy_from_slice(&buf.bytes[buf.pos..buf.pos + n]);
        buf.pos += n;
        Ok(n)
    }
}

impl<R: QmRegisters, P: PfRegisters, D: Delay> Write for AccData<R, P, D> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut g = lock(&self.inner);
        let g = &mut *g;
        // A closed session is the driver's disabled file (its position is gone here, so the
        // size check cannot come first as in the driver).
        let Some((id, buf)) = g.resuming.as_mut() else {
            return Err(errno(libc::ENODEV));
        };
        if *id != self.id {
            return Err(errno(libc::ENODEV));
        }
        let end = buf.pos + data.len();
        if end > ACC_VF_DATA_LEN {
            g.last_rejection = Some(Error::TooLong {
                len: end,
                max: ACC_VF_DATA_LEN,
            });
            return Err(errno(libc::ENOMEM));
        }
        if buf.disabled {
            return Err(errno(libc::ENODEV));
        }
        buf.bytes.resize(end.max(buf.bytes.len()), 0);
        buf.bytes[buf.pos..end].copy_from_slice(data);
        buf.pos = end;
        buf.total += data.len();
        // vf_qm_check_match: once the match block is in, check it against this VF, once.
        if buf.total >= QM_MATCH_SIZE && !g.match_done {
            let head = buf.bytes[..QM_MATCH_SIZE].to_vec();
            let checked = AccVfData::decode(&head)
                .map_err(Error::from)
                .and_then(|d| g.dev.check_match(&d));
            match checked {
                Ok(()) => g.match_done = true,
                Err(e) => {
                    g.last_rejection = Some(e);
                    return Err(errno(libc::EFAULT));
                }
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R: QmRegisters, P: PfRegisters, D: Delay> DataChannel for AccData<R, P, D> {
    fn precopy_info(&mut self) -> Result<PrecopyInfo, livemig_vfio::Error> {
        let g = lock(&self.inner);
        let fail = |code| livemig_vfio::Error::Ioctl {
            op: Op::PrecopyInfo,
            source: errno(code),
        };
        if g.state != MigrationState::PreCopy {
            return Err(fail(libc::EINVAL));
        }
        let Some((id, buf, _)) = g.saving.as_ref() else {
            return Err(fail(libc::ENODEV));
        };
        if *id != self.id || buf.disabled {
            return Err(fail(libc::ENODEV));
        }
        if buf.pos > buf.total {
            return Err(fail(libc::EINVAL));
        }
        Ok(PrecopyInfo {
            reinit: false,
            initial_bytes: (buf.total - buf.pos) as u64,
            dirty_bytes: 0,
        })
    }
}
