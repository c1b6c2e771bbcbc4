//! The composition of the two backends: a running KVM test VM (real /dev/kvm) that owns a VFIO
//! device, as a lab host with both would run it — `livemig_kvm::platform::source` given the
//! device list a [`livemig_host::Host`] hands out (`Host::source_devices`: the device as a
//! `VfioMigDevice`, its DMA-log tracker, its IOMMU outcome). No machine here has KVM and VFIO
//! together, so the device is `livemig-vfio`'s simulated one; its DMA is a `livemig-host`
//! writer thread that writes guest RAM behind the VMM's back and logs the pages in the
//! device's DMA log, and that pauses with the vCPUs.
//!
//! After the migration the destination's RAM equals the stopped source's, the device's state
//! arrived, and the guest verifies its own memory. The negative control drops the DMA log's
//! final harvest and must leave a difference in the DMA range.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use livemig::Phase;
use livemig::bitmap::PageBitmap;
use livemig::device::{DeviceCompat, VfioMigDevice};
use livemig::engine::{Destination, Event, SourceConfig, SourceDevice, Vcpus};
use livemig::link::{Cut, LinkConfig, migrate_local};
use livemig::tracker::{BoxError, DirtyTracker, DmaLogTracker};
use livemig_host::Workload;
use livemig_host::workload::{WorkloadConfig, WriteFn};
use livemig_kvm::{TestVm, TestVmConfig, platform};
use livemig_vfio::MigrationFlags;
use livemig_vfio::sim::{SimConfig, SimDevice};

fn kvm() -> Option<std::sync::MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    match livemig_kvm::kvm_usable() {
        Ok(()) => Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())),
        Err(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci || std::env::var_os("LIVEMIG_SKIP_KVM").is_some(),
                "CI=true and /dev/kvm is unusable ({why}); set LIVEMIG_SKIP_KVM=1 to skip"
            );
            eprintln!("livemig-host KVM composition test did not run: {why}");
            None
        }
    }
}

/// The device's DMA range: the high RAM region (the guest's working set is in low RAM).
const DMA: (u64, u64) = (4 << 30, 16 << 20);

/// The device's DMA: 16 bytes into guest RAM through the host mapping (not vm-memory: the
/// VMM's log must not see it), then the page into the device's DMA log, as a device whose
/// logging hardware sees its own writes.
fn dma_writer(vm: &TestVm, dev: SimDevice) -> WriteFn {
    let mem = Arc::clone(vm.vm.memory());
    Box::new(move |gpa, bytes| {
        let r = mem
            .regions()
            .iter()
            .find(|r| gpa >= r.gpa && gpa + 16 <= r.gpa + r.size)
            .copied()
            .ok_or("DMA outside RAM")?;
        let host = (r.host + (gpa - r.gpa)) as *mut u8;
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside a region of `mem`, which this closure keeps alive; guest RAM is
            // shared memory that Rust code never holds references into.
            unsafe { std::ptr::write_volatile(host.add(i), *b) };
        }
        dev.dma_write(gpa & !0xfff, 4096);
        Ok(())
    })
}

/// vCPUs and the device's DMA pause together (a stopped VM's device does no DMA).
struct Both(Box<dyn Vcpus>, Box<dyn Vcpus>);

impl Vcpus for Both {
    fn pause(&mut self) {
        self.0.pause();
        self.1.pause();
    }
    fn resume(&mut self) {
        self.1.resume();
        self.0.resume();
    }
}

/// Drops the harvest made once `armed` is set.
struct DropFinal {
    inner: Box<dyn DirtyTracker>,
    armed: Arc<AtomicBool>,
}

impl DirtyTracker for DropFinal {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        self.inner.start()
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if self.armed.load(Ordering::SeqCst) {
            let mut sink = PageBitmap::new(into.pages(), into.page_size());
            return self.inner.harvest(&mut sink).map(|_| 0);
        }
        self.inner.harvest(into)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        self.inner.stop()
    }
}

fn sim_cfg() -> SimConfig {
    let mut c = SimConfig::new(MigrationFlags::all());
    c.dma_logging_max_ranges = Some(8);
    c
}

fn compat() -> DeviceCompat {
    DeviceCompat {
        identity: "sim vf".into(),
        compat: Vec::new(),
        migration_flags: 0,
        dma_logging: true,
    }
}

/// Migrates a running test VM owning one device; returns the first differing GPA.
fn migrate(drop_final_dma_harvest: bool) -> Option<u64> {
    let cfg = TestVmConfig::default();
    let src = TestVm::boot(&cfg).unwrap();
    src.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    let dst = TestVm::incoming(&cfg).unwrap();
    let dev = SimDevice::new(sim_cfg());
    let ram: Vec<(u64, u64)> = src
        .vm
        .memory()
        .regions()
        .iter()
        .map(|r| (r.gpa, r.size))
        .collect();
    // What Host::source_devices makes of a device: the wrapper, its DMA log, its IOMMU outcome.
    let armed = Arc::new(AtomicBool::new(false));
    let log: Box<dyn DirtyTracker> =
        Box::new(DmaLogTracker::new("sim vf", dev.clone(), &ram, None).unwrap());
    let log: Box<dyn DirtyTracker> = if drop_final_dma_harvest {
        Box::new(DropFinal {
            inner: log,
            armed: armed.clone(),
        })
    } else {
        log
    };
    let devices = vec![SourceDevice {
        dev: Box::new(
            VfioMigDevice::new("sim vf", compat(), dev.clone(), MigrationFlags::all()).unwrap(),
        ),
        iommu_dirty: Err("attached to the IOAS (no IOMMU dirty tracking)".into()),
        dma_log: Some(log),
        does_dma: true,
    }];
    let dma = Workload::start(vec![(
        WorkloadConfig {
            name: "dma".into(),
            range: DMA,
            rate: 20_000,
            seed: 7,
        },
        dma_writer(&src, dev.clone()),
    )])
    .unwrap();
    let mut sp = platform::source(&src.vm, devices, None, None).unwrap();
    sp.vcpus = Box::new(Both(
        std::mem::replace(&mut sp.vcpus, dma.vcpus()),
        dma.vcpus(),
    ));
    let target = SimDevice::new(sim_cfg());
    let dp = platform::destination(
        &dst.vm,
        vec![Box::new(
            VfioMigDevice::new("sim vf", compat(), target.clone(), MigrationFlags::all()).unwrap(),
        )],
        false,
    )
    .unwrap();
    let mut source = livemig::engine::Source::new(
        sp,
        SourceConfig {
            max_rounds: 4,
            ..SourceConfig::default()
        },
    );
    source.on_event(move |e| {
        if let Event::Phase(Phase::StopCopy) = e {
            armed.store(true, Ordering::SeqCst);
        }
    });
    let mut dest = Destination::new(dp);
    let link = LinkConfig {
        bandwidth: 0,
        latency: Duration::ZERO,
    };
    let (r, d) = migrate_local(&mut source, &mut dest, link, &Cut::new());
    let report = r.expect("migrates");
    d.expect("receives");
    assert!(dma.writes() > 0, "the device did DMA");
    assert_eq!(dma.error(), None);
    assert!(
        report
            .tracking
            .contains(&("sim vf".into(), livemig::tracker::Chosen::Device)),
        "{:?}",
        report.tracking
    );
    assert_eq!(
        target.state_digest(),
        dev.state_digest(),
        "the device state arrived"
    );
    let diff = src.vm.memory().first_difference(dst.vm.memory());
    if diff.is_none() {
        dst.vm.unpause(livemig_kvm::vm::pause::START);
        let f = dst.verify(Duration::from_secs(30)).unwrap();
        assert!(f.is_empty(), "the guest's verification failed: {f:?}");
    }
    drop(source);
    drop(dma);
    diff
}

#[test]
fn a_kvm_vm_owning_a_vfio_device_migrates_with_the_device_dma_log() {
    let Some(_one) = kvm() else {
        return;
    };
    assert_eq!(migrate(false), None, "destination RAM differs");
}

#[test]
fn negative_control_a_dropped_dma_log_harvest_is_caught() {
    let Some(_one) = kvm() else {
        return;
    };
    let at = migrate(true).expect("without the final DMA-log harvest the RAM must differ");
    assert!(
        (DMA.0..DMA.0 + DMA.1).contains(&at),
        "the difference {at:#x} is outside the device's DMA range"
    );
}
