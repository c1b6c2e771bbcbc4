//! Shared set-up for the KVM tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use livemig::bitmap::PageBitmap;
use livemig::engine::{Destination, Event, MigrationReport, ReceiveReport, Source, SourceConfig};
use livemig::link::{Cut, LinkConfig};
use livemig::tracker::{BoxError, DirtyTracker};
use livemig_kvm::vm::pause;
use livemig_kvm::{KvmDirtyLog, TestVm, TestVmConfig, platform};

/// Whether the KVM tests can run; if so, a guard that runs them one at a time (they measure
/// rates and rewrite times on a 2-core machine). Without a usable /dev/kvm they print one
/// line saying why; under CI=true that is a failure unless LIVEMIG_SKIP_KVM is set (an
/// explicit opt-out).
pub fn kvm() -> Option<std::sync::MutexGuard<'static, ()>> {
    static SAID: Once = Once::new();
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    match livemig_kvm::kvm_usable() {
        Ok(()) => Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())),
        Err(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            if ci && std::env::var_os("LIVEMIG_SKIP_KVM").is_none() {
                panic!(
                    "CI=true and /dev/kvm is unusable ({why}): the KVM tests must run in CI; set \
                     LIVEMIG_SKIP_KVM=1 to skip them explicitly"
                );
            }
            SAID.call_once(|| eprintln!("livemig-kvm tests did not run: {why}"));
            None
        }
    }
}

pub fn config() -> TestVmConfig {
    TestVmConfig::default()
}

/// A tracker that drops the harvest made while `armed` is set (the negative control).
pub struct DropHarvest {
    pub inner: KvmDirtyLog,
    pub armed: Arc<AtomicBool>,
    pub dropped: Arc<AtomicBool>,
}

impl DirtyTracker for DropHarvest {
    fn name(&self) -> String {
        format!("{} (dropping one harvest)", self.inner.name())
    }
    fn start(&mut self) -> Result<(), BoxError> {
        self.inner.start()
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let mut scratch = PageBitmap::new(into.pages(), into.page_size());
            let n = self.inner.harvest(&mut scratch)?;
            self.dropped.store(n > 0, Ordering::SeqCst);
            return Ok(0);
        }
        self.inner.harvest(into)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        self.inner.stop()
    }
}

/// An event hook for the source engine.
pub type Hook = Box<dyn FnMut(&Event<'_>) + Send>;

pub struct Outcome {
    pub source: Source,
    pub report: livemig::Result<MigrationReport>,
    pub received: livemig::Result<ReceiveReport>,
}

pub fn link() -> LinkConfig {
    LinkConfig {
        bandwidth: 0,
        latency: Duration::ZERO,
    }
}

/// Migrates `src` into `dst` in this process. The destination's vCPUs are left parked so the
/// caller can compare memory; `start_destination` starts them.
pub fn migrate(
    src: &TestVm,
    dst: &TestVm,
    cfg: SourceConfig,
    cpu: Option<Box<dyn DirtyTracker>>,
    link: LinkConfig,
    hook: Option<Hook>,
) -> Outcome {
    let sp = platform::source(&src.vm, vec![], None, cpu).expect("source platform");
    let dp = platform::destination(&dst.vm, vec![], false).expect("destination platform");
    let mut source = Source::new(sp, cfg);
    if let Some(mut h) = hook {
        source.on_event(move |e| h(e));
    }
    let mut dest = Destination::new(dp);
    let (report, received) =
        livemig::link::migrate_local(&mut source, &mut dest, link, &Cut::new());
    if let (Ok(r), Ok(_)) = (&report, &received) {
        eprintln!(
            "migrated: {} rounds, converged {}, {} bytes, downtime {} us; source exits {}, ring-full \
             exits {}; memory equal: {:?}",
            r.rounds.len(),
            r.converged,
            r.bytes,
            r.downtime_us,
            src.vm.exits(),
            src.vm.ring_full_exits(),
            src.vm.memory().first_difference(dst.vm.memory())
        );
    }
    Outcome {
        source,
        report,
        received,
    }
}

/// The VM runs on one host, or on none with the reason said (issue 29): the engines'
/// decisions agree with each other and with what the vCPUs did (a destination that does not
/// run the VM has no vCPU that entered the guest; a source that runs is not stopped).
pub fn assert_one_host(source: &Source, dest: &Destination, dst: &TestVm, what: &str) {
    let (s, d) = (source.outcome(), dest.outcome());
    let side = livemig::engine::handover::one_host(s, d)
        .unwrap_or_else(|e| panic!("{what}: {e}: source {s:?}, destination {d:?}"));
    assert_eq!(side == "source", !source.is_stopped(), "{what}: {s:?}");
    if d.runs != livemig::engine::Runs::Here {
        assert!(
            dst.vm.entries().iter().all(|&n| n == 0),
            "{what}: the destination does not run the VM, yet its vCPUs entered the guest: {:?}",
            dst.vm.entries()
        );
    }
}

pub fn start_destination(dst: &TestVm) {
    dst.vm.unpause(pause::START);
}

/// The guest's own check must pass.
pub fn verify_ok(vm: &TestVm, what: &str) {
    let f = vm
        .verify(Duration::from_secs(30))
        .expect("verification runs");
    assert!(
        f.is_empty(),
        "{what}: the guest's verification failed: {f:?}"
    );
}

/// The source VM runs again (its step counters move) and its guest verifies.
pub fn runs_again_and_verifies(vm: &TestVm, what: &str) {
    let steps = vm.monitor.steps();
    vm.wait_progress(&steps, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{what}: the source does not run again: {e}"));
    verify_ok(vm, what);
}
