//! The fail-nth sweep (issue 19, item 3): one whole migration between two real-host platforms
//! (`livemig-host`: guest RAM in an IOAS, a VFIO device attached through the auto-domain
//! policy, HWPT dirty tracking, the engine on both sides) over the process-wide fake kernels of
//! `livemig-vfio` and `livemig-iommufd` (their `fake-kernel` feature; see `fail_nth/fake.rs`).
//!
//! A first run counts every call each host makes; then the migration runs once per counted
//! call and per errno the uAPI documents for it, failing exactly that call. After every run:
//! - nothing panicked;
//! - the source runs again (its device RUNNING, no HWPT left tracking, the engine not
//!   stopped), unless the failure came after the stream's End, where the source stays stopped
//!   with its state intact and its error says so;
//! - no fd leaked;
//! - the destination's device is back in RUNNING holding no state, unless the destination
//!   completed, in which case it holds exactly the source's state and RAM is identical.
//!
//! Negative controls: a dropped harvest (the fake reports no dirty bits) must break the RAM
//! comparison of the successful run, and a no-op `VFIO_DEVICE_RESET` must break the
//! destination's reset invariant.

#[path = "fail_nth/fake.rs"]
mod fake;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake::{Kernel, ST_RUNNING, Side, World, errnos, make_blob};
use livemig::engine::{Destination, MigrationReport, ReceiveReport, Source, SourceConfig};
use livemig::link::{Cut, LinkConfig, migrate_local};
use livemig::memory::GuestMemory;
use livemig_host::{Host, HostConfig, Workload};
use livemig_kvm::{Backing, DirtyMode, TestVm, TestVmConfig, VmMemory, platform};

/// Tests in this file share the process-wide fake kernels and count the process's fds.
static SERIAL: Mutex<()> = Mutex::new(());

const RAM: u64 = 2 << 20;
/// The page the fake device writes by DMA while it runs.
const DMA_PAGE: u64 = 0x10_0000;
const STATE: usize = 20 << 10;
/// The KVM test VM's RAM: the guest's 16 MiB layout plus its working set, and a spare page.
const KVM_RAM: u64 = 18 << 20;
const KVM_DMA_PAGE: u64 = 17 << 20;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// A fake sysfs where both cdevs are mdevs of one type (the destination checks identities).
fn sysfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for n in ["vfio0", "vfio1"] {
        let dev = dir.path().join("class/vfio-dev").join(n).join("device");
        std::fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink("../../mdev_supported_types/fake-mig", dev.join("mdev_type"))
            .unwrap();
    }
    dir
}

/// What one migration did.
struct Run {
    /// Where it stopped before the engine ran (a host or platform that failed to open).
    setup: Option<String>,
    source: Option<livemig::Result<MigrationReport>>,
    dest: Option<livemig::Result<ReceiveReport>>,
    source_stopped: bool,
    /// KVM: whether the source guest completed a pass after the migration.
    source_runs: Option<Result<(), String>>,
    ram_difference: Option<u64>,
}

/// What the VM is: writer threads over plain memory (`livemig-host`'s own platform), or a real
/// KVM test VM owning the device (`livemig_kvm::platform` given the host's device and HWPT
/// tracker, the composition a VMM with both makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vm {
    Host,
    Kvm,
}

impl Vm {
    /// The page the fake device writes by DMA: outside the test guest's image and working set.
    fn dma_page(self) -> u64 {
        match self {
            Vm::Host => DMA_PAGE,
            Vm::Kvm => KVM_DMA_PAGE,
        }
    }
}

/// An idle test guest (it writes only when asked) with one vCPU and the bitmap dirty log, so
/// the calls of a migration are the same every time.
fn kvm_config() -> TestVmConfig {
    TestVmConfig {
        vcpus: 1,
        pages: 64,
        ram: vec![(0, KVM_RAM)],
        dirty: DirtyMode::Bitmap,
        idle: true,
        ..TestVmConfig::default()
    }
}

fn migrate(k: &Kernel, sysfs: &Path, vm: Vm) -> Run {
    let mut run = Run {
        setup: None,
        source: None,
        dest: None,
        source_stopped: false,
        source_runs: None,
        ram_difference: None,
    };
    let (vms, src_mem, dst_mem) = match vm {
        Vm::Host => {
            let src = Arc::new(VmMemory::new(&[(0, RAM)], Backing::Anonymous).unwrap());
            let dst = Arc::new(VmMemory::new(&[(0, RAM)], Backing::Anonymous).unwrap());
            for gpa in (0..RAM).step_by(64 << 10) {
                src.write(gpa, &gpa.to_le_bytes()).unwrap();
            }
            (None, src, dst)
        }
        Vm::Kvm => {
            let cfg = kvm_config();
            let src = TestVm::boot(&cfg).expect("boot the source test VM");
            let dst = TestVm::incoming(&cfg).expect("create the destination VM");
            let (sm, dm) = (src.vm.memory().clone(), dst.vm.memory().clone());
            (Some((src, dst)), sm, dm)
        }
    };
    let host = |side, dev: &str, mem: &Arc<VmMemory>| {
        k.world().opening = Some(side);
        let cfg = HostConfig {
            devices: vec![dev.to_string()],
            sysfs: Some(sysfs.to_path_buf()),
            ..Default::default()
        };
        let h = Host::open(&cfg, mem.clone())
            .map_err(|e| format!("{side:?} host: {}", livemig::error::chain(&e)));
        k.world().opening = None;
        h
    };
    let mut src_host = match host(Side::Source, "/dev/vfio/devices/vfio0", &src_mem) {
        Ok(h) => h,
        Err(e) => {
            run.setup = Some(e);
            return run;
        }
    };
    let mut dst_host = match host(Side::Destination, "/dev/vfio/devices/vfio1", &dst_mem) {
        Ok(h) => h,
        Err(e) => {
            run.setup = Some(e);
            return run;
        }
    };
    let workload = Workload::idle();
    let platforms = match &vms {
        None => src_host
            .source(&workload)
            .map_err(|e| format!("source platform: {e}"))
            .and_then(|sp| {
                let dp = dst_host
                    .destination()
                    .map_err(|e| format!("destination platform: {e}"))?;
                Ok((sp, dp))
            }),
        Some((src, dst)) => (|| {
            let devices = src_host.source_devices().map_err(|e| e.to_string())?;
            let iommu = src_host.iommu_tracker().map_err(|e| e.to_string())?;
            let sp = platform::source(&src.vm, devices, iommu, None).map_err(|e| e.to_string())?;
            let devices = dst_host.destination().map_err(|e| e.to_string())?.devices;
            let dp = platform::destination(&dst.vm, devices, false).map_err(|e| e.to_string())?;
            Ok((sp, dp))
        })(),
    };
    let (sp, dp) = match platforms {
        Ok(p) => p,
        Err(e) => {
            run.setup = Some(e);
            return run;
        }
    };
    let mut source = Source::new(sp, SourceConfig::default());
    let mut dest = Destination::new(dp);
    let link = LinkConfig {
        bandwidth: 0,
        latency: Duration::ZERO,
    };
    let (s, d) = migrate_local(&mut source, &mut dest, link, &Cut::new());
    run.source_stopped = source.is_stopped();
    run.source = Some(s);
    run.dest = Some(d);
    drop((source, dest, src_host, dst_host));
    if let (Some((src, _)), false) = (&vms, run.source_stopped) {
        // The guest itself shows whether its vCPUs run: one pass over its working set.
        run.source_runs = Some(src.pass(Duration::from_secs(5)).map_err(|e| e.to_string()));
    }
    run.ram_difference = src_mem.first_difference(&dst_mem);
    run
}

/// Runs one migration with `fail` armed and checks every invariant; returns whether the
/// migration completed.
fn check_one(
    k: &Kernel,
    sysfs: &Path,
    fail: Option<(Side, u64, i32)>,
    blob: &[u8],
) -> Result<bool, String> {
    check_with(k, sysfs, fail, blob, Vm::Host, |_| {})
}

/// As [`check_one`], with `control` applied to the fresh world (the negative controls).
fn check_with(
    k: &Kernel,
    sysfs: &Path,
    fail: Option<(Side, u64, i32)>,
    blob: &[u8],
    vm: Vm,
    control: impl Fn(&mut World),
) -> Result<bool, String> {
    {
        let mut w = k.world();
        *w = World::new(blob.to_vec(), vm.dma_page());
        w.fail = fail;
        control(&mut w);
    }
    let before = open_fds();
    let run = migrate(k, sysfs, vm);
    let after = open_fds();
    let w = k.world();
    let what = |s: &str| format!("{s} (fail {fail:?})");
    if fail.is_some() && !w.failed {
        return Err(what(
            "the armed call was never reached: the call sequence is not deterministic",
        ));
    }
    if after != before {
        return Err(what(&format!(
            "fd leak: {before} fds before the run, {after} after"
        )));
    }
    let (src, dst) = (&w.devs[0], &w.devs[1]);
    let chain = |r: &livemig::Error| livemig::error::chain(r);
    if let Some(Err(e)) = &run.dest
        && chain(e).contains("panicked")
    {
        return Err(what(&format!("the destination panicked: {}", chain(e))));
    }
    let dest_done = matches!(run.dest, Some(Ok(_)));
    if dest_done {
        if dst.loaded.as_deref() != Some(blob) || dst.state != ST_RUNNING {
            return Err(what(&format!(
                "the destination completed but its device is in state {} holding {:?} bytes",
                dst.state,
                dst.loaded.as_ref().map(Vec::len)
            )));
        }
        if let Some(gpa) = run.ram_difference {
            return Err(what(&format!(
                "the destination completed but RAM differs at {gpa:#x}"
            )));
        }
        if !run.source_stopped {
            return Err(what("the destination runs the VM and so does the source"));
        }
    } else if dst.state != ST_RUNNING || dst.loaded.is_some() {
        return Err(what(&format!(
            "destination device not reset: state {}, holding {:?} bytes, {} resets; destination: {}",
            dst.state,
            dst.loaded.as_ref().map(Vec::len),
            dst.resets,
            match &run.dest {
                Some(Err(e)) => chain(e),
                _ => "-".into(),
            }
        )));
    }
    match &run.source {
        Some(Ok(r)) => {
            if !dest_done {
                return Err(what(
                    "the source reports success but the destination did not complete",
                ));
            }
            // A source device that failed to reach STOP after the handover, or an HWPT left
            // tracking, is reported.
            if (src.state != fake::ST_STOP || w.tracking(Side::Source))
                && r.source_cleanup.is_empty()
            {
                return Err(what(&format!(
                    "the source's device is in state {} (tracking left on: {}) after the \
                     handover and the report does not say so",
                    src.state,
                    w.tracking(Side::Source)
                )));
            }
        }
        Some(Err(e)) => {
            let msg = chain(e);
            if run.source_stopped {
                if !msg.contains("stays stopped") {
                    return Err(what(&format!(
                        "the source stayed stopped without saying so: {msg}"
                    )));
                }
            } else if let Some(Err(why)) = &run.source_runs {
                return Err(what(&format!(
                    "the source's guest does not run again ({why}): {msg}"
                )));
            } else if src.state != ST_RUNNING || w.tracking(Side::Source) {
                return Err(what(&format!(
                    "the source runs again but its device is in state {} (tracking left on: {}): {msg}",
                    src.state,
                    w.tracking(Side::Source)
                )));
            }
        }
        None => {
            // Setup failed: the source's device was never moved.
            if src.state != ST_RUNNING {
                return Err(what(&format!(
                    "setup failed ({:?}) with the source device in state {}",
                    run.setup, src.state
                )));
            }
        }
    }
    Ok(matches!(run.source, Some(Ok(_))) && dest_done)
}

fn kernel() -> (
    Kernel,
    livemig_vfio::fake_kernel::Guard,
    livemig_iommufd::fake_kernel::Guard,
) {
    let k = Kernel(Arc::new(Mutex::new(World::default())));
    let g1 = livemig_vfio::fake_kernel::install(Box::new(k.clone()));
    let g2 = livemig_iommufd::fake_kernel::install(Box::new(k.clone()));
    (k, g1, g2)
}

/// Counts the calls of one migration (twice: they must be the same), then fails each with
/// each of its errnos; returns the report line.
fn sweep(k: &Kernel, sysfs: &Path, blob: &[u8], vm: Vm) -> String {
    let one = |fail| check_with(k, sysfs, fail, blob, vm, |_| {});
    assert_eq!(one(None), Ok(true), "the unfailed migration");
    let calls = k.world().calls.clone();
    one(None).unwrap();
    let again = k.world().calls.clone();
    if std::env::var_os("FAIL_NTH_LIST").is_some() {
        for c in &calls {
            println!("{:?} {}", c.side, c.what);
        }
    }
    let per_side = |c: &[fake::Call], s| {
        c.iter()
            .filter(|c| c.side == s)
            .map(|c| c.what)
            .collect::<Vec<_>>()
    };
    for s in [Side::Source, Side::Destination] {
        assert_eq!(
            per_side(&calls, s),
            per_side(&again, s),
            "{s:?} calls differ between two runs"
        );
    }
    let mut points = Vec::new();
    for s in [Side::Source, Side::Destination] {
        for (i, what) in per_side(&calls, s).into_iter().enumerate() {
            points.push((s, i as u64, what));
        }
    }
    let (mut runs, mut completed, mut failures) = (0, 0, Vec::new());
    for &(side, n, what) in &points {
        for &errno in errnos(what) {
            runs += 1;
            match one(Some((side, n, errno))) {
                Ok(true) => {
                    completed += 1;
                    if std::env::var_os("FAIL_NTH_LIST").is_some() {
                        println!("completed with {side:?} call {n} ({what}) errno {errno}");
                    }
                }
                Ok(false) => {}
                Err(e) => failures.push(format!("{side:?} call {n} ({what}) errno {errno}: {e}")),
            }
        }
    }
    assert_eq!(points.len(), calls.len(), "every counted call is a point");
    assert!(
        failures.is_empty(),
        "{} invariant violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let src = points.iter().filter(|p| p.0 == Side::Source).count();
    let kinds = |prefix: &str| points.iter().filter(|p| p.2.starts_with(prefix)).count();
    format!(
        "swept {} points ({src} source, {} destination calls; VFIO {}, iommufd {}, KVM {}) in \
         {runs} runs ({completed} migrations still completed)",
        points.len(),
        points.len() - src,
        points.len() - kinds("IOMMU") - kinds("open /dev/iommu") - kinds("KVM_"),
        kinds("IOMMU") + kinds("open /dev/iommu"),
        kinds("KVM_"),
    )
}

#[test]
fn fail_nth_sweep_every_vfio_and_iommufd_call_of_a_whole_migration() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let line = sweep(&k, dir.path(), &make_blob(STATE, 7), Vm::Host);
    println!("fail_nth (host platform): {line}");
}

/// The same sweep over a real KVM test VM that owns the device: every KVM call of the
/// migration (vCPU and VM state, dirty log, slot flags) goes through `livemig-kvm`'s fault
/// layer to the real /dev/kvm.
#[test]
fn fail_nth_sweep_a_kvm_vm_with_a_vfio_device() {
    // Before anything opens a file: the other tests count the process's fds.
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(why) = livemig_kvm::kvm_usable() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci || std::env::var_os("LIVEMIG_SKIP_KVM").is_some(),
            "CI=true and /dev/kvm is unusable ({why}); set LIVEMIG_SKIP_KVM=1 to skip"
        );
        eprintln!("the KVM fail_nth sweep did not run: {why}");
        return;
    }
    let (k, _g1, _g2) = kernel();
    let _g3 = livemig_kvm::fake_kernel::install(Box::new(k.clone()));
    let dir = sysfs();
    let line = sweep(&k, dir.path(), &make_blob(STATE, 7), Vm::Kvm);
    println!("fail_nth (KVM VM): {line}");
}

/// The index of the first `what` call of `side` in an unfailed migration.
fn first(k: &Kernel, sysfs: &Path, blob: &[u8], side: Side, what: &str) -> u64 {
    check_one(k, sysfs, None, blob).unwrap();
    let calls = k.world().calls.clone();
    calls
        .iter()
        .filter(|c| c.side == side)
        .position(|c| c.what == what)
        .unwrap_or_else(|| panic!("{side:?} makes no {what} call")) as u64
}

/// Negative control: without the harvest, the device's last DMA write is not migrated and the
/// checker sees RAM differ at that page.
#[test]
fn fail_nth_negative_control_dropped_harvest_is_caught() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let blob = make_blob(STATE, 7);
    let r = check_with(&k, dir.path(), None, &blob, Vm::Host, |w| {
        w.drop_harvest = true
    });
    let e = r.expect_err("a dropped harvest must fail the checks");
    assert!(e.contains(&format!("RAM differs at {DMA_PAGE:#x}")), "{e}");
}

/// Negative control: a destination failure with `VFIO_DEVICE_RESET` a no-op leaves the device
/// holding state, and the checker sees it; the same point with a working reset passes.
#[test]
fn fail_nth_negative_control_noop_reset_is_caught() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let blob = make_blob(STATE, 7);
    let n = first(
        &k,
        dir.path(),
        &blob,
        Side::Destination,
        "write to a data fd",
    );
    let fail = Some((Side::Destination, n, libc::EIO));
    let e = check_with(&k, dir.path(), fail, &blob, Vm::Host, |w| {
        w.noop_reset = true
    })
    .expect_err("a no-op reset must fail the checks");
    assert!(e.contains("destination device not reset"), "{e}");
    assert_eq!(check_one(&k, dir.path(), fail, &blob), Ok(false));
}

/// Negative control: a source failure with arcs to RUNNING ignored (a no-op resume) leaves the
/// source's device stopped, and the checker sees it; the same point with a working resume
/// passes.
#[test]
fn fail_nth_negative_control_noop_resume_is_caught() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let blob = make_blob(STATE, 7);
    let n = first(&k, dir.path(), &blob, Side::Source, "read of a data fd");
    let fail = Some((Side::Source, n, libc::EIO));
    let e = check_with(&k, dir.path(), fail, &blob, Vm::Host, |w| {
        w.noop_running = true
    })
    .expect_err("a no-op resume must fail the checks");
    assert!(
        e.contains("the source runs again but its device is in state"),
        "{e}"
    );
    assert_eq!(check_one(&k, dir.path(), fail, &blob), Ok(false));
}
