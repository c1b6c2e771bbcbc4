//! The fail-nth sweep (issue 19, item 3): one whole migration between two real-host platforms
//! (`livemig-host`: guest RAM in an IOAS, a VFIO device attached through the auto-domain
//! policy, HWPT dirty tracking, the engine on both sides) over the process-wide fake kernels of
//! `livemig-vfio` and `livemig-iommufd` (their `fake-kernel` feature; see `fail_nth/fake.rs`).
//!
//! The KVM destination is built as the CLI builds it (`autostart`: the engine starts its vCPUs).
//!
//! A first run counts every call each host makes; then the migration runs once per counted
//! call and per errno the uAPI documents for it, failing exactly that call (the first pass).
//! The calls the failed runs made that the unfailed run never makes — error paths: resets,
//! arcs back to RUNNING, tracking turned off after a failure — are deduplicated by (side,
//! call, engine phase), and each is failed once per errno on top of the failure that led to
//! it (the second pass). After every run:
//! - nothing panicked, on any thread (a panic hook counts them);
//! - the VM runs on exactly one host, or on none with the reason said: a destination that did
//!   not complete has no vCPU that entered the guest (`KVM_RUN` entries stay 0) and a source
//!   that stays stopped says so; a destination that completed has its vCPUs running and the
//!   source stopped; both engines' outcomes agree with this;
//! - the source runs again (its device RUNNING, no HWPT left tracking, the engine not
//!   stopped), unless the failure came after the stream's End, where the source stays stopped
//!   with its state intact and its error says so;
//! - no fd leaked;
//! - the destination's device is back in RUNNING holding no state when the destination said
//!   `Failed`; when it said `Undecided` its reason names what failed; when it completed, it
//!   holds exactly the source's state and RAM is identical.
//!
//! Negative controls: a dropped harvest (the fake reports no dirty bits) must break the RAM
//! comparison of the successful run, a no-op `VFIO_DEVICE_RESET` must break the destination's
//! reset invariant, a no-op resume the source's, and a destination that starts its vCPUs before
//! its devices run (the old arc side effect) the one-host invariant.

#[path = "fail_nth/fake.rs"]
mod fake;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use fake::{Kernel, ST_RUNNING, Side, World, errnos, make_blob};
use livemig::device::MigDevice;
use livemig::engine::{
    Destination, DestinationEvent, Event, MigrationReport, Outcome, ReceiveReport, Runs, Source,
    SourceConfig,
};
use livemig::link::{Cut, LinkConfig, migrate_local};
use livemig::memory::GuestMemory;
use livemig_host::{Host, HostConfig, Workload};
use livemig_kvm::{Backing, DirtyMode, TestVm, TestVmConfig, VmMemory, platform};
use livemig_vfio::data::PrecopyRound;
use livemig_vfio::{Error as VfioError, MigrationState};

/// Tests in this file share the process-wide fake kernels and count the process's fds.
static SERIAL: Mutex<()> = Mutex::new(());

/// Panics on any thread of this process (the engine turns a page-channel thread's panic into an
/// ordinary error; the hook still sees it).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info)
        }));
    });
}

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
    /// KVM: the destination VM's guest entries per vCPU once the migration returned (and, if
    /// it completed, once its vCPUs had time to start).
    dest_entries: Option<Vec<u64>>,
    /// Both engines' decisions.
    outcomes: Option<(Outcome, Outcome)>,
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

/// A control: a destination whose vCPUs start as soon as its first device (the vCPU state)
/// runs, before the others — the side effect the handover removed — on a platform that cannot
/// count guest entries, so the engine cannot see it and answers `Failed`.
struct EarlyStart {
    inner: Box<dyn MigDevice>,
    start: livemig_kvm::KvmStart,
}

impl MigDevice for EarlyStart {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn compat(&self) -> livemig::device::DeviceCompat {
        self.inner.compat()
    }
    fn state(&self) -> Result<MigrationState, VfioError> {
        self.inner.state()
    }
    fn transition(&mut self, target: MigrationState) -> Result<(), VfioError> {
        self.inner.transition(target)?;
        if target == MigrationState::Running {
            let _ = livemig::platform::VcpuStart::start(&mut self.start);
        }
        Ok(())
    }
    fn precopy(&mut self, sink: &mut Vec<u8>, max: u64) -> Result<PrecopyRound, VfioError> {
        self.inner.precopy(sink, max)
    }
    fn precopy_pending(&mut self) -> Result<u64, VfioError> {
        self.inner.precopy_pending()
    }
    fn precopy_info(&mut self) -> Result<livemig_vfio::data::PrecopyInfo, VfioError> {
        self.inner.precopy_info()
    }
    fn enable_precopy_info_v2(&mut self) -> Result<livemig_vfio::PrecopyInfoV2, VfioError> {
        self.inner.enable_precopy_info_v2()
    }
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        self.inner.stop_copy_size()
    }
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
        self.inner.save(sink)
    }
    fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError> {
        self.inner.load(bytes)
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        self.inner.reset()
    }
}

/// Starts nothing and counts nothing (the control's platform).
struct Uncounted;

impl livemig::platform::VcpuStart for Uncounted {
    fn start(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn entries(&self) -> Option<Vec<u64>> {
        None
    }
}

fn migrate(k: &Kernel, sysfs: &Path, vm: Vm, early_start: bool) -> Run {
    let mut run = Run {
        setup: None,
        source: None,
        dest: None,
        source_stopped: false,
        source_runs: None,
        ram_difference: None,
        dest_entries: None,
        outcomes: None,
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
            // As the CLI builds it: the engine starts the vCPUs.
            let mut dp =
                platform::destination(&dst.vm, devices, true).map_err(|e| e.to_string())?;
            if early_start {
                let first = dp.devices.remove(0);
                dp.devices.insert(
                    0,
                    Box::new(EarlyStart {
                        inner: first,
                        start: livemig_kvm::KvmStart::new(&dst.vm, true),
                    }),
                );
                dp.vcpus = Some(Box::new(Uncounted));
            }
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
    // Each side's phase, for the error-path pass's deduplication.
    let kk = k.clone();
    source.on_event(move |e| {
        if let Event::Phase(p) = e {
            kk.world().phase.insert(Side::Source, p.to_string());
        }
    });
    let kk = k.clone();
    dest.on_event(move |e| {
        if let DestinationEvent::Phase(p) = e {
            kk.world().phase.insert(Side::Destination, p.to_string());
        }
    });
    let link = LinkConfig {
        bandwidth: 0,
        latency: Duration::ZERO,
    };
    let (s, d) = migrate_local(&mut source, &mut dest, link, &Cut::new());
    run.source_stopped = source.is_stopped();
    run.outcomes = Some((source.outcome().clone(), dest.outcome().clone()));
    let dest_done = d.is_ok();
    run.source = Some(s);
    run.dest = Some(d);
    drop((source, dest, src_host, dst_host));
    if let Some((src, dst)) = &vms {
        if dest_done {
            // The engine started the destination's vCPUs: they enter the guest.
            let t0 = std::time::Instant::now();
            while dst.vm.entries().iter().all(|&n| n == 0) && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            // Time for a wrongly started vCPU to show.
            std::thread::sleep(Duration::from_millis(20));
        }
        run.dest_entries = Some(dst.vm.entries());
        // The comparison below reads a quiet destination.
        dst.vm.pause(livemig_kvm::vm::pause::ENGINE);
        if !run.source_stopped {
            // The guest itself shows whether its vCPUs run: one pass over its working set.
            run.source_runs = Some(src.pass(Duration::from_secs(5)).map_err(|e| e.to_string()));
        }
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
    check_with(k, sysfs, Faults::one(fail), blob, Vm::Host, |_| {})
}

/// What a run fails, and how its destination is built.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    fail: Option<(Side, u64, i32)>,
    /// The error-path pass: a call made only because `fail` happened.
    fail2: Option<(Side, u64, i32)>,
    /// The control: vCPUs started by a device arc, uncounted.
    early_start: bool,
}

impl Faults {
    fn one(fail: Option<(Side, u64, i32)>) -> Faults {
        Faults {
            fail,
            ..Faults::default()
        }
    }
}

/// As [`check_one`], with `control` applied to the fresh world (the negative controls).
fn check_with(
    k: &Kernel,
    sysfs: &Path,
    faults: Faults,
    blob: &[u8],
    vm: Vm,
    control: impl Fn(&mut World),
) -> Result<bool, String> {
    count_panics();
    let fail = faults.fail;
    {
        let mut w = k.world();
        *w = World::new(blob.to_vec(), vm.dma_page());
        w.fail = fail;
        w.fail2 = faults.fail2;
        control(&mut w);
    }
    let before = open_fds();
    let panics = PANICS.load(Ordering::SeqCst);
    let run = migrate(k, sysfs, vm, faults.early_start);
    let panicked = PANICS.load(Ordering::SeqCst) - panics;
    let after = open_fds();
    let w = k.world();
    let what = |s: &str| match faults.fail2 {
        None => format!("{s} (fail {fail:?})"),
        Some(f2) => format!("{s} (fail {fail:?}, then {f2:?})"),
    };
    if fail.is_some() && !w.failed {
        return Err(what(
            "the armed call was never reached: the call sequence is not deterministic",
        ));
    }
    if faults.fail2.is_some() && !w.failed2 {
        return Err(what(
            "the second armed call was never reached: the error path is not deterministic",
        ));
    }
    if panicked > 0 {
        return Err(what(&format!(
            "{panicked} thread(s) panicked during the run"
        )));
    }
    // The VM runs on exactly one host, or on none with the reason said.
    let dest_done = matches!(run.dest, Some(Ok(_)));
    if let Some(entries) = &run.dest_entries {
        let entered = entries.iter().any(|&n| n > 0);
        if !dest_done && entered {
            return Err(what(&format!(
                "a destination vCPU entered the guest ({entries:?} KVM_RUN entries) but the \
                 destination did not complete{}",
                if run.source_stopped {
                    ""
                } else {
                    ", and the source runs again: the VM runs on both hosts"
                }
            )));
        }
        if dest_done && !entered {
            return Err(what(
                "the destination completed but its vCPUs never started",
            ));
        }
    }
    if let Some((so, d)) = &run.outcomes {
        let both = so.runs == Runs::Here && d.runs == Runs::Here;
        let here = |o: &Outcome| o.runs == Runs::Here;
        if both || here(d) != dest_done || (here(so) == run.source_stopped && run.source.is_some())
        {
            return Err(what(&format!(
                "the engines' decisions disagree with what ran: source {so:?} (stopped: {}), \
                 destination {d:?} (completed: {dest_done})",
                run.source_stopped
            )));
        }
        if (so.runs == Runs::Undecided || d.runs == Runs::Undecided) && so.why.is_empty() {
            return Err(what("undecided without a reason"));
        }
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
    let dest_undecided = matches!(&run.outcomes, Some((_, d)) if d.runs == Runs::Undecided);
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
    } else if dest_undecided {
        // Undecided: a reset failed (no vCPU entered, checked above); the reason says which.
        let msg = match &run.dest {
            Some(Err(e)) => chain(e),
            _ => String::new(),
        };
        if !msg.contains("reset failed") {
            return Err(what(&format!(
                "the destination is undecided without naming a failed reset: {msg}"
            )));
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
            } else if (src.state != ST_RUNNING
                && !(faults.fail2.is_some()
                    && msg.contains("recovery failed")
                    && msg.contains("reset failed")))
                || w.tracking(Side::Source)
            {
                // (A device whose arc back to RUNNING and whose reset both failed cannot run;
                // the error must say so, and the VM still runs on this host alone.)
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
    let completed = matches!(run.source, Some(Ok(_))) && dest_done;
    if !completed && fail.is_none() {
        // An unfailed run that does not complete: say why (the sweep then stops on it).
        eprintln!(
            "the unfailed run did not complete: setup {:?}; source {:?}; destination {:?}",
            run.setup,
            run.source.as_ref().map(|r| r.as_ref().map_err(chain).err()),
            run.dest.as_ref().map(|r| r.as_ref().map_err(chain).err())
        );
    }
    Ok(completed)
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
/// each of its errnos (the first pass); then fails, once per errno, each call that only the
/// failed runs made, keyed by (side, call, phase), on top of the failure that first led to it
/// (the second pass). Returns the report line.
fn sweep(k: &Kernel, sysfs: &Path, blob: &[u8], vm: Vm, world: fn(&mut World)) -> String {
    let run = |faults| check_with(k, sysfs, faults, blob, vm, world);
    let unfailed = run(Faults::default());
    let calls = k.world().calls.clone();
    if std::env::var_os("FAIL_NTH_LIST").is_some() {
        for c in &calls {
            println!("{:?} {} [{}]", c.side, c.what, c.phase);
        }
    }
    assert_eq!(unfailed, Ok(true), "the unfailed migration");
    run(Faults::default()).unwrap();
    let again = k.world().calls.clone();
    let per_side = |c: &[fake::Call], s| {
        c.iter()
            .filter(|c| c.side == s)
            .map(|c| (c.what, c.phase.clone()))
            .collect::<Vec<_>>()
    };
    for s in [Side::Source, Side::Destination] {
        assert_eq!(
            per_side(&calls, s),
            per_side(&again, s),
            "{s:?} calls differ between two runs"
        );
    }
    type Key = (Side, &'static str, String);
    let key = |c: &fake::Call| -> Key { (c.side, c.what, c.phase.clone()) };
    let success_path: std::collections::BTreeSet<Key> = calls.iter().map(key).collect();
    let mut points = Vec::new();
    for s in [Side::Source, Side::Destination] {
        for (i, (what, _)) in per_side(&calls, s).into_iter().enumerate() {
            points.push((s, i as u64, what));
        }
    }
    let (mut runs, mut completed, mut failures) = (0, 0, Vec::new());
    // Error-path calls: the first failed run that made each, and the call's index there.
    let mut error_path: BTreeMap<Key, ((Side, u64, i32), u64)> = BTreeMap::new();
    for &(side, n, what) in &points {
        for &errno in errnos(what) {
            runs += 1;
            let fail = (side, n, errno);
            match run(Faults::one(Some(fail))) {
                Ok(true) => {
                    completed += 1;
                    if std::env::var_os("FAIL_NTH_LIST").is_some() {
                        println!("completed with {side:?} call {n} ({what}) errno {errno}");
                    }
                }
                Ok(false) => {}
                Err(e) => failures.push(format!("{side:?} call {n} ({what}) errno {errno}: {e}")),
            }
            let made = k.world().calls.clone();
            let mut index: BTreeMap<Side, u64> = BTreeMap::new();
            for c in &made {
                let i = index.entry(c.side).or_default();
                let at = *i;
                *i += 1;
                let kk = key(c);
                if !success_path.contains(&kk) && !error_path.contains_key(&kk) {
                    error_path.insert(kk, (fail, at));
                }
            }
        }
    }
    let first_runs = runs;
    let (mut second_runs, mut second_completed) = (0, 0);
    for ((side, what, phase), (fail, at)) in &error_path {
        for &errno in errnos(what) {
            second_runs += 1;
            let f2 = (*side, *at, errno);
            let faults = Faults {
                fail: Some(*fail),
                fail2: Some(f2),
                early_start: false,
            };
            match run(faults) {
                Ok(true) => second_completed += 1,
                Ok(false) => {}
                Err(e) => failures.push(format!(
                    "error path {side:?} {what} [{phase}] errno {errno} after {fail:?}: {e}"
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} invariant violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let src = points.iter().filter(|p| p.0 == Side::Source).count();
    let kinds = |prefix: &str| points.iter().filter(|p| p.2.starts_with(prefix)).count();
    let listed: Vec<String> = error_path
        .keys()
        .map(|(s, w, p)| format!("{s:?} {w} [{p}]"))
        .collect();
    format!(
        "first pass: {} points ({src} source, {} destination calls; VFIO {}, iommufd {}, KVM {}) \
         in {first_runs} runs ({completed} migrations still completed); second pass: {} \
         error-path points in {second_runs} runs ({second_completed} completed): {}",
        points.len(),
        points.len() - src,
        points.len() - kinds("IOMMU") - kinds("open /dev/iommu") - kinds("KVM_"),
        kinds("IOMMU") + kinds("open /dev/iommu"),
        kinds("KVM_"),
        error_path.len(),
        listed.join(", "),
    )
}

#[test]
fn fail_nth_sweep_every_vfio_and_iommufd_call_of_a_whole_migration() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let line = sweep(&k, dir.path(), &make_blob(STATE, 7), Vm::Host, |_| {});
    println!("fail_nth (host platform): {line}");
}

/// The same sweep over a real KVM test VM that owns the device: every KVM call of the
/// migration (vCPU and VM state, dirty log, slot flags) goes through `livemig-kvm`'s fault
/// layer to the real /dev/kvm.
#[test]
fn fail_nth_sweep_a_kvm_vm_with_a_vfio_device() {
    // Before anything opens a file: the other tests count the process's fds.
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !kvm("the KVM fail_nth sweep") {
        return;
    }
    let (k, _g1, _g2) = kernel();
    let _g3 = livemig_kvm::fake_kernel::install(Box::new(k.clone()));
    let dir = sysfs();
    let line = sweep(&k, dir.path(), &make_blob(STATE, 7), Vm::Kvm, |_| {});
    println!("fail_nth (KVM VM): {line}");
}

/// A Linux 7.3 device with every optional part (P2P states, device DMA logging, the
/// PRECOPY_INFOv2 opt-in) behind an IOMMU without dirty tracking, so the device's own log is
/// what tracks its DMA: those paths' calls are swept too.
fn full_device(w: &mut World) {
    w.full = true;
    w.hwpt_dirty = false;
}

#[test]
fn fail_nth_sweep_a_device_with_p2p_dma_logging_and_precopy_info_v2() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let line = sweep(&k, dir.path(), &make_blob(STATE, 7), Vm::Host, full_device);
    // The optional paths were taken (their calls are among the points).
    let calls = k.world().calls.clone();
    for what in [
        "FEATURE DMA_LOGGING_START",
        "FEATURE DMA_LOGGING_REPORT",
        "FEATURE DMA_LOGGING_STOP",
        "FEATURE MIG_PRECOPY_INFOv2",
    ] {
        assert!(
            calls.iter().any(|c| c.what == what),
            "no {what} call: the sweep does not reach that path"
        );
    }
    assert!(
        k.world().p2p_arcs > 0,
        "no P2P arc: the sweep does not reach the P2P path"
    );
    println!("fail_nth (Linux 7.3 device: P2P, DMA logging, PRECOPY_INFOv2): {line}");
}

/// Whether /dev/kvm is usable; if not, `what` did not run, which under CI=true fails unless
/// LIVEMIG_SKIP_KVM is set (an explicit opt-out).
fn kvm(what: &str) -> bool {
    let Err(why) = livemig_kvm::kvm_usable() else {
        return true;
    };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !ci || std::env::var_os("LIVEMIG_SKIP_KVM").is_some(),
        "CI=true and /dev/kvm is unusable ({why}); set LIVEMIG_SKIP_KVM=1 to skip"
    );
    eprintln!("{what} did not run: {why}");
    false
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
    let r = check_with(&k, dir.path(), Faults::default(), &blob, Vm::Host, |w| {
        w.drop_harvest = true
    });
    let e = r.expect_err("a dropped harvest must fail the checks");
    assert!(e.contains(&format!("RAM differs at {DMA_PAGE:#x}")), "{e}");
}

/// Negative control: the same with the device's own DMA log tracking (a Linux 7.3 device
/// behind an IOMMU without dirty tracking): reports that drop their bits lose the last write.
#[test]
fn fail_nth_negative_control_dropped_dma_log_report_is_caught() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let blob = make_blob(STATE, 7);
    let r = check_with(&k, dir.path(), Faults::default(), &blob, Vm::Host, |w| {
        full_device(w);
        w.drop_harvest = true
    });
    let e = r.expect_err("a dropped DMA log report must fail the checks");
    assert!(e.contains(&format!("RAM differs at {DMA_PAGE:#x}")), "{e}");
    assert_eq!(
        check_with(
            &k,
            dir.path(),
            Faults::default(),
            &blob,
            Vm::Host,
            full_device
        ),
        Ok(true)
    );
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
    let e = check_with(&k, dir.path(), Faults::one(fail), &blob, Vm::Host, |w| {
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
    let e = check_with(&k, dir.path(), Faults::one(fail), &blob, Vm::Host, |w| {
        w.noop_running = true
    })
    .expect_err("a no-op resume must fail the checks");
    assert!(
        e.contains("the source runs again but its device is in state"),
        "{e}"
    );
    assert_eq!(check_one(&k, dir.path(), fail, &blob), Ok(false));
}

/// Negative control: a panic on the destination's thread (which `migrate_local` turns into an
/// ordinary error) fails the run through the panic hook.
#[test]
fn fail_nth_negative_control_a_panic_on_another_thread_is_caught() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (k, _g1, _g2) = kernel();
    let dir = sysfs();
    let blob = make_blob(STATE, 7);
    let e = check_with(&k, dir.path(), Faults::default(), &blob, Vm::Host, |w| {
        w.panic_on = Some((Side::Destination, "write to a data fd"))
    })
    .expect_err("a panic must fail the run");
    assert!(e.contains("1 thread(s) panicked"), "{e}");
}

/// Negative control: a destination whose vCPUs start on its first device's arc to RUNNING, on
/// a platform that does not count guest entries (the engine cannot see it and answers
/// `Failed`), with the next device's arc to RUNNING failing: the VM runs on both hosts, and
/// the one-host check says so. The same point on the real platform passes.
#[test]
fn fail_nth_negative_control_a_vm_running_twice_is_caught() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !kvm("the two-host negative control") {
        return;
    }
    let (k, _g1, _g2) = kernel();
    let _g3 = livemig_kvm::fake_kernel::install(Box::new(k.clone()));
    let dir = sysfs();
    let blob = make_blob(STATE, 7);
    let kvm = |faults| check_with(&k, dir.path(), faults, &blob, Vm::Kvm, |_| {});
    assert_eq!(kvm(Faults::default()), Ok(true));
    // The destination's last arc: its device's STOP -> RUNNING.
    let calls = k.world().calls.clone();
    let n = calls
        .iter()
        .filter(|c| c.side == Side::Destination)
        .enumerate()
        .filter(|(_, c)| c.what == "FEATURE SET MIG_DEVICE_STATE")
        .map(|(i, _)| i as u64)
        .last()
        .expect("the destination sets device states");
    let fail = Some((Side::Destination, n, libc::EIO));
    let e = kvm(Faults {
        fail,
        fail2: None,
        early_start: true,
    })
    .expect_err("a VM running twice must fail the checks");
    assert!(e.contains("the VM runs on both hosts"), "{e}");
    assert_eq!(kvm(Faults::one(fail)), Ok(false));
}
