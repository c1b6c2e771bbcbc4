//! The handover never leaves the VM running on two hosts (issue 29): a destination built as
//! the CLI builds it (`autostart`), with a simulated VFIO device after the vCPU state device
//! whose arc to RUNNING fails, on the real /dev/kvm.

mod common;

use std::time::Duration;

use common::*;
use livemig::Error;
use livemig::device::{DeviceCompat, MigDevice, VfioMigDevice};
use livemig::engine::{Destination, Runs, Source, SourceConfig, SourceDevice};
use livemig::link::{Cut, migrate_local};
use livemig::platform::VcpuStart;
use livemig_kvm::{TestVm, platform};
use livemig_vfio::MigrationFlags;
use livemig_vfio::MigrationState as S;
use livemig_vfio::sim::{Fault, SimConfig, SimDevice};

/// A state-only simulated VFIO device (the same identity on both sides).
fn device() -> (Box<dyn MigDevice>, SimDevice) {
    let mut c = SimConfig::new(MigrationFlags::STOP_COPY);
    c.state_size = 16 << 10;
    c.device_id = 0x4c4d_0029;
    let sim = SimDevice::new(c.clone());
    let dev = VfioMigDevice::new(
        "simdev",
        DeviceCompat {
            identity: "livemig simulated device".into(),
            compat: c.device_id.to_le_bytes().to_vec(),
            migration_flags: 0,
            dma_logging: false,
        },
        sim.clone(),
        MigrationFlags::STOP_COPY,
    )
    .expect("the simulated device");
    (Box::new(dev), sim)
}

/// Source and destination KVM platforms around one simulated device each (the destination's
/// with `fault`s injected), the destination built as the CLI builds it (`autostart`).
fn pair(src: &TestVm, dst: &TestVm, faults: &[Fault]) -> (Source, Destination, SimDevice) {
    let (sdev, ssim) = device();
    let (ddev, dsim) = device();
    for f in faults {
        dsim.inject(*f);
    }
    let sp = platform::source(
        &src.vm,
        vec![SourceDevice {
            dev: sdev,
            iommu_dirty: Err("state only".into()),
            dma_log: None,
            does_dma: false,
        }],
        None,
        None,
    )
    .unwrap();
    let dp = platform::destination(&dst.vm, vec![ddev], true).unwrap();
    (
        Source::new(sp, SourceConfig::default()),
        Destination::new(dp),
        ssim,
    )
}

const ARC_FAILS: Fault = Fault::Arc {
    from: S::Stop,
    to: S::Running,
    to_error: false,
};

/// A running source test VM (its workload started) and a destination ready to receive it.
fn running_pair() -> (TestVm, TestVm) {
    let src = TestVm::boot(&config()).unwrap();
    src.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    let dst = TestVm::incoming(&src.cfg).unwrap();
    (src, dst)
}

/// Which of the two VMs runs guest code over `window`: (source, destination).
fn who_runs(src: &TestVm, dst: &TestVm, window: Duration) -> (bool, bool) {
    let (a, b) = (src.monitor.steps(), dst.monitor.steps());
    std::thread::sleep(window);
    let moved = |before: &[u64], after: Vec<u64>| {
        after.len() == before.len() && after.iter().zip(before).any(|(n, o)| n > o)
            || (before.is_empty() && !after.is_empty())
    };
    (
        moved(&a, src.monitor.steps()),
        moved(&b, dst.monitor.steps()),
    )
}

#[test]
fn a_device_that_cannot_run_on_the_destination_leaves_the_vm_on_one_host() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let (src, dst) = running_pair();
    let (mut source, mut dest, _) = pair(&src, &dst, &[ARC_FAILS]);
    let (r, d) = migrate_local(&mut source, &mut dest, link(), &Cut::new());
    let de = d.expect_err("the destination's device cannot run");
    let se = r.expect_err("the migration failed");
    eprintln!("destination: {de}\nsource: {se}");
    let (s, d) = who_runs(&src, &dst, Duration::from_secs(2));
    eprintln!(
        "runs: source {s}, destination {d}; source stopped: {}",
        source.is_stopped()
    );
    assert!(!(s && d), "the VM runs on both hosts");
    assert!(
        s,
        "the destination said Failed before any vCPU ran, so the source runs again"
    );
    // The engines' decisions agree with what the vCPUs did.
    assert_eq!(dest.outcome().runs, Runs::NotHere, "{:?}", dest.outcome());
    assert_eq!(source.outcome().runs, Runs::Here, "{:?}", source.outcome());
    assert!(!source.is_stopped());
    assert_eq!(
        dst.vm.entries(),
        vec![0; dst.vm.vcpus().len()],
        "a destination vCPU ran"
    );
    assert!(
        de.to_string().contains("arc STOP -> RUNNING failed"),
        "{de}"
    );
    runs_again_and_verifies(&src, "source after the destination's device failed to run");
}

#[test]
fn a_reset_that_fails_leaves_the_source_stopped_until_the_caller_decides() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    // The arc fails and so does the reset that would discard the device's state: the
    // destination cannot promise, the source stays stopped, the VM runs nowhere.
    let (src, dst) = running_pair();
    let (mut source, mut dest, _) = pair(&src, &dst, &[ARC_FAILS, Fault::Reset]);
    let (r, d) = migrate_local(&mut source, &mut dest, link(), &Cut::new());
    let de = d.expect_err("the destination failed");
    let se = r.expect_err("the migration failed");
    assert!(matches!(de, Error::Undecided { .. }), "{de}");
    assert!(de.to_string().contains("reset failed"), "{de}");
    assert!(matches!(se, Error::Undecided { .. }), "{se}");
    assert!(
        se.to_string().contains("reset failed"),
        "the source names the reason: {se}"
    );
    assert!(source.is_stopped());
    assert_eq!(source.outcome().runs, Runs::Undecided);
    assert_eq!(dest.outcome().runs, Runs::Undecided);
    assert_eq!(who_runs(&src, &dst, Duration::from_secs(1)), (false, false));
    assert_eq!(dst.vm.entries(), vec![0; dst.vm.vcpus().len()]);
    // The caller knows the destination does not run (its vCPUs never entered): resume.
    source.resume().expect("resume");
    assert_eq!(source.outcome().runs, Runs::Here);
    runs_again_and_verifies(&src, "source resumed by its caller");

    // Again, and this time the caller gives the source up: it stays stopped for good.
    let dst = TestVm::incoming(&src.cfg).unwrap();
    let (mut source, mut dest, ssim) = pair(&src, &dst, &[ARC_FAILS, Fault::Reset]);
    let (r, _) = migrate_local(&mut source, &mut dest, link(), &Cut::new());
    assert!(matches!(r, Err(Error::Undecided { .. })));
    let cleanup = source.discard().expect("discard a stopped source");
    assert!(cleanup.is_empty(), "{cleanup:?}");
    assert_eq!(source.outcome().runs, Runs::NotHere);
    assert!(
        source.resume().is_err(),
        "a discarded source must not resume"
    );
    use livemig_vfio::MigrationDevice;
    assert_eq!(ssim.migration_state().unwrap(), S::Stop);
    assert_eq!(who_runs(&src, &dst, Duration::from_secs(1)), (false, false));
}

/// A vCPU start that lets the vCPUs run and then reports a failure.
struct StartsThenFails(livemig_kvm::KvmStart);

impl VcpuStart for StartsThenFails {
    fn start(&mut self) -> Result<(), String> {
        self.0.start()?;
        std::thread::sleep(Duration::from_millis(200));
        Err("the platform failed after starting the vCPUs".into())
    }
    fn entries(&self) -> Option<Vec<u64>> {
        self.0.entries()
    }
}

#[test]
fn once_a_destination_vcpu_entered_the_guest_the_destination_never_answers_failed() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let (src, dst) = running_pair();
    let (mut source, mut dest, _) = pair(&src, &dst, &[]);
    dest.platform_mut().vcpus = Some(Box::new(StartsThenFails(livemig_kvm::KvmStart::new(
        &dst.vm, true,
    ))));
    let (r, d) = migrate_local(&mut source, &mut dest, link(), &Cut::new());
    let de = d.expect_err("the start failed");
    assert!(matches!(de, Error::Undecided { .. }), "{de}");
    assert!(
        de.to_string().contains("a vCPU entered the guest here"),
        "{de}"
    );
    assert!(matches!(r, Err(Error::Undecided { .. })), "{r:?}");
    assert!(source.is_stopped());
    let entries = dest
        .outcome()
        .vcpu_entries
        .clone()
        .expect("KVM counts entries");
    assert!(entries.iter().any(|&n| n > 0), "{entries:?}");
    // Exactly one side runs: the destination, whose guest went on from the migrated state.
    assert_eq!(who_runs(&src, &dst, Duration::from_secs(2)), (false, true));
    verify_ok(&dst, "the destination's guest");
    let cleanup = source.discard().unwrap();
    assert!(cleanup.is_empty(), "{cleanup:?}");
}

#[test]
fn negative_control_the_two_host_check_sees_a_vm_running_twice() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    // The operator's mistake the library leaves to its caller: resuming a source whose VM
    // runs on the destination. The check must see both run.
    let (src, dst) = running_pair();
    let (mut source, mut dest, _) = pair(&src, &dst, &[]);
    let (r, d) = migrate_local(&mut source, &mut dest, link(), &Cut::new());
    r.expect("migrated");
    d.expect("received");
    assert_eq!(who_runs(&src, &dst, Duration::from_secs(1)), (false, true));
    source
        .resume()
        .expect("the library does what its caller says");
    assert_eq!(who_runs(&src, &dst, Duration::from_secs(1)), (true, true));
}
