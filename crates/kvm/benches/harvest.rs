//! Harvest cost per dirty page: KVM's dirty bitmap against the dirty ring, at 1%, 10% and 50%
//! of 4 GiB of guest RAM dirty (`cargo bench -p livemig-kvm --bench harvest`; needs /dev/kvm).
//!
//! Each iteration: the idle test guest (8 vCPUs) writes exactly its working set once (not
//! timed), the vCPUs are paused, then one harvest is timed — collecting the pages already
//! dirtied and re-protecting them (bitmap: `KVM_GET_DIRTY_LOG` + chunked
//! `KVM_CLEAR_DIRTY_LOG`; ring: collect every vCPU's ring + `KVM_RESET_DIRTY_RINGS`). The
//! ring holds 65,536 entries per vCPU (KVM's 1 MiB maximum): at 50% the pass overflows it and
//! vCPU threads take entries at ring-full exits while the guest runs; those exits are counted
//! and reported apart, the entries they took are collected by the timed harvest from the
//! spill list. Baseline, measured in the same run: a plain read of the engine's bitmap of the
//! same 4 GiB (one bit per page). Figures are printed as ns per dirty page and as the ratio
//! to the baseline.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use livemig::bitmap::PageBitmap;
use livemig::memory::{GuestMemory, PAGE_SIZE};
use livemig::tracker::DirtyTracker;
use livemig_kvm::vm::pause;
use livemig_kvm::{DirtyMode, KvmDirtyLog, TestVm, TestVmConfig};

const VCPUS: u32 = 8;
const RAM: u64 = 4 << 30;

fn vm(dirty: DirtyMode, pages_per_vcpu: u32) -> TestVm {
    TestVm::boot(&TestVmConfig {
        vcpus: VCPUS,
        pages: pages_per_vcpu,
        rate: 0,
        // 4 GiB in all: 3 GiB below the PCI hole, 1 GiB above 4 GiB.
        ram: vec![(0, 3 << 30), (4 << 30, 1 << 30)],
        dirty,
        idle: true,
        ..TestVmConfig::default()
    })
    .expect("boot the test VM")
}

fn bench(c: &mut Criterion) {
    if let Err(why) = livemig_kvm::kvm_usable() {
        eprintln!("harvest benchmark skipped: {why}");
        return;
    }
    let total_pages = RAM / PAGE_SIZE;
    let mut g = c.benchmark_group("kvm_harvest");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(10));

    // Baseline: a plain read of the engine's bitmap of 4 GiB.
    let mut plain = PageBitmap::new(total_pages, PAGE_SIZE);
    plain.set_bytes(0, RAM / 2);
    let base = {
        let t0 = Instant::now();
        for _ in 0..1000 {
            black_box(black_box(&plain).words().iter().fold(0u64, |a, &w| a ^ w));
        }
        t0.elapsed() / 1000
    };
    let mut table = Vec::new();
    g.bench_function("plain_bitmap_read_4GiB", |b| {
        b.iter(|| black_box(plain.words().iter().fold(0u64, |a, &w| a ^ w)))
    });

    for pct in [1u64, 10, 50] {
        let dirty_pages = total_pages * pct / 100;
        let per_vcpu = (dirty_pages / u64::from(VCPUS)) as u32;
        for (name, mode) in [
            ("bitmap", DirtyMode::Bitmap),
            ("ring", DirtyMode::Ring(65536)),
        ] {
            let t = vm(mode, per_vcpu);
            let mut tracker = KvmDirtyLog::new(&t.vm);
            tracker.start().expect("start dirty logging");
            let span = t.vm.memory().size() / PAGE_SIZE;
            let mut into = PageBitmap::new(span, PAGE_SIZE);
            let mut found = 0;
            let mut full_before = t.vm.ring_full_exits();
            let mut full = 0;
            let (mut total, mut n) = (Duration::ZERO, 0u32);
            g.bench_function(format!("{name}_{pct}pct"), |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        t.vm.unpause(pause::ENGINE);
                        t.pass(Duration::from_secs(120)).expect("the guest's pass");
                        t.vm.pause(pause::ENGINE);
                        into.clear();
                        let t0 = Instant::now();
                        found = tracker.harvest(&mut into).expect("harvest");
                        let dt = t0.elapsed();
                        spent += dt;
                        total += dt;
                        n += 1;
                        let now = t.vm.ring_full_exits();
                        full += now - full_before;
                        full_before = now;
                    }
                    spent
                })
            });
            eprintln!(
                "kvm_harvest {name} {pct}%: {found} pages reported per harvest ({} of them \
                 the guest's working set); ring-full exits during the passes: {full}",
                u64::from(per_vcpu) * u64::from(VCPUS)
            );
            let mean = total / n.max(1);
            table.push((name, pct, found, mean, full));
            drop(tracker);
        }
    }
    g.finish();
    eprintln!("\nharvest of pages already dirtied, 4 GiB guest, 8 vCPUs (same run):");
    eprintln!("  plain read of the 4 GiB bitmap (baseline): {base:?}");
    eprintln!("  mechanism  dirty  pages      harvest     ns/page  x baseline  ring-full exits");
    for (name, pct, found, mean, full) in table {
        eprintln!(
            "  {name:<9} {pct:>4}%  {found:>8}  {:>10.3} ms  {:>7.1}  {:>10.1}  {full}",
            mean.as_secs_f64() * 1e3,
            mean.as_nanos() as f64 / found.max(1) as f64,
            mean.as_secs_f64() / base.as_secs_f64().max(1e-9)
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
