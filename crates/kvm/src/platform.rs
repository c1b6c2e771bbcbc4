//! A KVM VM as the engine's platform: the source side of a running VM (its memory, the vCPU
//! dirty tracker, vCPU control, the vCPU state device, and any further devices), and the
//! destination side of a prepared one.

use std::sync::Arc;

use livemig::engine::{DestinationPlatform, SourceDevice, SourcePlatform};
use livemig::memory::GuestMemory;
use livemig::tracker::DirtyTracker;

use crate::Error;
use crate::device::{KvmStart, KvmVcpus, VcpuStateDevice};
use crate::dirty::KvmDirtyLog;
use crate::vm::Vm;

/// The source platform of `vm`: the vCPU state device first, then `devices` (assigned
/// devices, simulated ones). `cpu` replaces the vCPU tracker (tests wrap it); `None` uses
/// [`KvmDirtyLog`].
pub fn source(
    vm: &Vm,
    devices: Vec<SourceDevice>,
    iommu: Option<Box<dyn DirtyTracker>>,
    cpu: Option<Box<dyn DirtyTracker>>,
) -> Result<SourcePlatform, Error> {
    let mut all = vec![SourceDevice {
        dev: Box::new(VcpuStateDevice::new(vm)?),
        iommu_dirty: Err("the vCPU state is not DMA".into()),
        dma_log: None,
        does_dma: false,
    }];
    all.extend(devices);
    let memory: Arc<dyn GuestMemory> = vm.memory().clone();
    Ok(SourcePlatform {
        memory,
        devices: all,
        iommu,
        cpu: cpu.unwrap_or_else(|| Box::new(KvmDirtyLog::new(vm))),
        vcpus: Box::new(KvmVcpus::new(vm)),
        page_size_mask: 0x1000,
        viommu: None,
        dma_endpoints: Vec::new(),
    })
}

/// The destination platform of a prepared (not started) `vm`: its vCPU state device first,
/// then `devices`, and its vCPU start ([`KvmStart`]): with `autostart` the engine starts the
/// vCPUs once every device is RUNNING (the handover's last step); without it the caller starts
/// them (`vm.unpause(vm::pause::START)`).
pub fn destination(
    vm: &Vm,
    devices: Vec<Box<dyn livemig::device::MigDevice>>,
    autostart: bool,
) -> Result<DestinationPlatform, Error> {
    let mut all: Vec<Box<dyn livemig::device::MigDevice>> =
        vec![Box::new(VcpuStateDevice::new(vm)?)];
    all.extend(devices);
    let n = all.len();
    Ok(DestinationPlatform {
        memory: vm.memory().clone(),
        devices: all,
        iommu_dirty: vec![true; n],
        page_size_mask: 0x1000,
        vcpus: Some(Box::new(KvmStart::new(vm, autostart))),
    })
}
