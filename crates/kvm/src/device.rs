//! The VM as the engine drives it: [`KvmVcpus`] (the engine's vCPU control, with host-enforced
//! throttling), [`KvmStart`] (the destination's vCPU start, the handover's last step) and
//! [`VcpuStateDevice`], which carries the vCPU state record in the stream as one more device.
//!
//! ```text
//!  source:       RUNNING ──(vCPUs paused by the engine)──> STOP_COPY: record captured
//!                STOP_COPY ──save──> the record;  STOP_COPY -> STOP after the handover
//!                any state -> RUNNING (recovery): the record is dropped, the engine resumes
//!  destination:  RUNNING -> STOP -> RESUMING: bytes buffered (bounded)
//!                RESUMING -> STOP: decoded, checked against this VM (vCPU count, CPUID,
//!                XSAVE), written into the parked vCPUs; STOP -> RUNNING: nothing runs yet
//!                (the engine starts the vCPUs through KvmStart once every device is RUNNING)
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;

use livemig::device::{DeviceCompat, MigDevice};
use livemig::engine::Vcpus;
use livemig_vfio::data::PrecopyRound;
use livemig_vfio::{Access, Error as VfioError, Feature, MigrationFlags, MigrationState, Op};

use crate::state::{self, CpuidEntry, VmState};
use crate::vm::{Shared, Vm, pause};

/// The engine's vCPU control over a [`Vm`].
#[derive(Debug)]
pub struct KvmVcpus(Arc<Shared>);

impl KvmVcpus {
    /// Controls `vm`'s vCPUs.
    pub fn new(vm: &Vm) -> KvmVcpus {
        KvmVcpus(Arc::clone(vm.shared()))
    }
}

impl Vcpus for KvmVcpus {
    fn pause(&mut self) {
        self.0.pause(pause::ENGINE, true);
        self.0
            .engine_paused_at
            .store(crate::vm::realtime_ns(), Ordering::SeqCst);
    }
    fn resume(&mut self) {
        self.0.unpause(pause::ENGINE);
    }
    fn set_throttle(&mut self, percent: u8) -> bool {
        self.0.set_throttle(percent);
        true
    }
    fn entries(&self) -> Option<Vec<u64>> {
        Some(self.0.entries())
    }
}

/// The destination's vCPU start over a [`Vm`] created parked (`pause::START`): the engine
/// calls it once every device is RUNNING. With `autostart` off the engine's start leaves them
/// parked and the caller starts them (`vm.unpause(pause::START)`), for example after comparing
/// memory; the entries it reports are counted either way.
#[derive(Debug)]
pub struct KvmStart {
    shared: Arc<Shared>,
    autostart: bool,
}

impl KvmStart {
    /// The start of `vm`'s vCPUs; `autostart` says whether the engine's start lets them run.
    pub fn new(vm: &Vm, autostart: bool) -> KvmStart {
        KvmStart {
            shared: Arc::clone(vm.shared()),
            autostart,
        }
    }
}

impl livemig::platform::VcpuStart for KvmStart {
    fn start(&mut self) -> Result<(), String> {
        // The first guest entry from here on is stamped (the end of the downtime).
        self.shared.first_entry_at.store(0, Ordering::SeqCst);
        self.shared.stamp_entry.store(true, Ordering::SeqCst);
        if self.autostart {
            self.shared.unpause(pause::START);
        }
        Ok(())
    }
    fn entries(&self) -> Option<Vec<u64>> {
        Some(self.shared.entries())
    }
}

/// The vCPU (and VM clock / interrupt controller) state as a migration device.
pub struct VcpuStateDevice {
    shared: Arc<Shared>,
    kvm_msrs: Vec<u32>,
    cpuid: Vec<CpuidEntry>,
    xsave_size: u32,
    state: MigrationState,
    saved: Option<Vec<u8>>,
    incoming: Vec<u8>,
    identity: String,
}

impl std::fmt::Debug for VcpuStateDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuStateDevice")
            .field("identity", &self.identity)
            .field("state", &self.state)
            .finish()
    }
}

fn invalid(msg: String) -> VfioError {
    VfioError::InvalidDeviceState(msg)
}

impl VcpuStateDevice {
    /// The state device of `vm`.
    pub fn new(vm: &Vm) -> Result<VcpuStateDevice, crate::Error> {
        let cpuid = state::cpuid_entries(vm.cpuid());
        // Found before the vCPU threads started: asking a running vCPU's fd now would wait
        // for its next exit (seconds, for a guest that rarely exits).
        let msrs = vm.saveable_msrs().to_vec();
        let identity = format!(
            "kvm-x86 vcpus={} cpuid={:016x} xsave={}",
            vm.vcpus().len(),
            state::cpuid_digest(&cpuid),
            vm.xsave_size
        );
        Ok(VcpuStateDevice {
            shared: Arc::clone(vm.shared()),
            kvm_msrs: msrs,
            cpuid,
            xsave_size: vm.xsave_size,
            state: MigrationState::Running,
            saved: None,
            incoming: Vec::new(),
            identity,
        })
    }

    fn all_parked(&self) -> bool {
        self.shared.all_parked()
    }

    fn capture(&self) -> Result<Vec<u8>, VfioError> {
        if !self.all_parked() {
            return Err(invalid("vCPU state requested while vCPUs still run".into()));
        }
        let fds: Vec<_> = self.shared.vcpus.iter().map(|v| v.fd()).collect();
        let refs: Vec<&kvm_ioctls::VcpuFd> = fds.iter().map(|g| &**g).collect();
        let st = state::save_vm(
            &self.shared.vm,
            &refs,
            self.cpuid.clone(),
            self.xsave_size,
            &self.kvm_msrs,
        )
        .map_err(|e| invalid(e.to_string()))?;
        Ok(st.encode())
    }

    /// One arc.
    fn step(&mut self, target: MigrationState) -> Result<(), VfioError> {
        use MigrationState as S;
        match (self.state, target) {
            (a, b) if a == b => {}
            (S::Stop, S::StopCopy) => self.saved = Some(self.capture()?),
            (S::StopCopy, S::Stop) => self.saved = None,
            (S::Running, S::Stop) => {}
            (S::Stop, S::Resuming) => self.incoming.clear(),
            (S::Resuming, S::Stop) => {
                self.restore()?;
                self.incoming = Vec::new();
            }
            (S::Stop, S::Running) => {
                // No vCPU starts here: on a destination the handover starts them once every
                // device is RUNNING (KvmStart); on a source the engine resumes them.
                self.saved = None;
                self.incoming = Vec::new();
            }
            (from, to) => {
                return Err(VfioError::InvalidArgument {
                    op: Op::Feature(Access::Set, Feature::MigDeviceState),
                    rule: format!("the vCPU state device does not take {from} -> {to}"),
                });
            }
        }
        self.state = target;
        Ok(())
    }

    fn restore(&mut self) -> Result<(), VfioError> {
        let st = VmState::decode(&self.incoming).map_err(|e| invalid(e.to_string()))?;
        st.check_fits(self.shared.vcpus.len(), &self.cpuid, self.xsave_size)
            .map_err(|e| invalid(e.to_string()))?;
        if !self.all_parked() {
            return Err(invalid("vCPU state load while vCPUs run".into()));
        }
        let fds: Vec<_> = self.shared.vcpus.iter().map(|v| v.fd()).collect();
        let refs: Vec<&kvm_ioctls::VcpuFd> = fds.iter().map(|g| &**g).collect();
        st.restore(&self.shared.vm, &refs)
            .map_err(|e| invalid(e.to_string()))
    }
}

impl MigDevice for VcpuStateDevice {
    fn name(&self) -> &str {
        "vcpus"
    }

    fn compat(&self) -> DeviceCompat {
        DeviceCompat {
            identity: self.identity.clone(),
            // What the record holds, in words: a destination whose CPUID differs in XSAVE is
            // refused at compat naming the feature, not only as two CPUID digests.
            compat: format!(
                "vCPU state: {}",
                state::Holds::for_cpuid(&self.cpuid).describe()
            )
            .into_bytes(),
            migration_flags: MigrationFlags::STOP_COPY.bits() as u32,
            dma_logging: false,
        }
    }

    fn state(&self) -> Result<MigrationState, VfioError> {
        Ok(self.state)
    }

    fn transition(&mut self, target: MigrationState) -> Result<(), VfioError> {
        use MigrationState as S;
        // Arc by arc, as VFIO devices walk (vfio.h: RESUMING and STOP_COPY reach RUNNING
        // through STOP, RUNNING reaches RESUMING through STOP).
        let path: &[MigrationState] = match (self.state, target) {
            (S::Running, S::Resuming) => &[S::Stop, S::Resuming],
            (S::Resuming, S::Running) | (S::StopCopy, S::Running) => &[S::Stop, S::Running],
            (S::Running, S::StopCopy) => &[S::Stop, S::StopCopy],
            _ => &[target],
        };
        for &next in path {
            self.step(next)?;
        }
        Ok(())
    }

    fn precopy(&mut self, _sink: &mut Vec<u8>, _max: u64) -> Result<PrecopyRound, VfioError> {
        Err(VfioError::StateNotSupported {
            state: MigrationState::PreCopy,
            missing: MigrationFlags::PRE_COPY,
        })
    }

    fn precopy_pending(&mut self) -> Result<u64, VfioError> {
        Ok(0)
    }

    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        // Per vCPU: xsave 4 KiB, LAPIC 1 KiB, registers and MSRs ~2 KiB; the VM: ~2 KiB.
        Ok(self.shared.vcpus.len() as u64 * (8 << 10) + (2 << 10))
    }

    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
        let saved = self
            .saved
            .as_ref()
            .ok_or_else(|| VfioError::InvalidArgument {
                op: Op::DataRead,
                rule: "no vCPU state captured (not in STOP_COPY)".into(),
            })?;
        sink.extend_from_slice(saved);
        Ok(saved.len() as u64)
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError> {
        if self.state != MigrationState::Resuming {
            return Err(VfioError::InvalidArgument {
                op: Op::DataWrite,
                rule: "vCPU state arrives only in RESUMING".into(),
            });
        }
        if self.incoming.len() + bytes.len() > state::MAX_RECORD {
            return Err(invalid(format!(
                "vCPU state larger than the {}-byte cap",
                state::MAX_RECORD
            )));
        }
        self.incoming.extend_from_slice(bytes);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), VfioError> {
        self.saved = None;
        self.incoming = Vec::new();
        self.state = MigrationState::Running;
        Ok(())
    }
}
