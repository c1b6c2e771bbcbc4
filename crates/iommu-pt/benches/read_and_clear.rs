//! Dirty harvest over 64 GiB of IOVA: read-and-clear vs a plain sequential read of the same
//! leaf-table bytes, measured in the same run.
//!
//! * 4 KiB pages: 16 Mi leaf entries in 32768 tables (128 MiB), 0.1 %, 10 % and 100 % dirty;
//! * 2 MiB pages: 32768 leaf entries in 64 tables (256 KiB), same percentages.
//!
//! Formats: AMD-Vi v1 (dirty = D bit, cleaned by clearing it), the x86-64 first stage (VT-d
//! first stage / AMD-Vi v2: D bit 6; once clearing D only, once clearing A with it, the
//! harvest QEMU's intel-iommu needs) and Arm LPAE stage 1 (dirty = AP\[2\] clear with DBM,
//! cleaned by setting AP\[2\]). Dirty state is planted before each measured iteration the way
//! the IOMMU would leave it (A and D set; AF set, AP\[2\] clear).
//! Two baselines: `sequential_read` XORs a contiguous copy of the leaf-table bytes (the compiler
//! vectorizes it), `sequential_read_atomic` reads the live tables with one relaxed atomic load
//! per entry, the only way a harvest may read entries the IOMMU writes concurrently.
//! Criterion reports time per iteration and elements (leaf entries) per second; ns/PTE and the
//! ratio to the baseline are derived from those (see the crate README).

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use livemig_iommu_pt::format::{AmdV1, ArmS1, X86FirstStage};
use livemig_iommu_pt::{
    DirtyBits, HarvestOptions, NoFlush, PageTable, PageTableFormat, Perm, PhysMem, TableArena,
};

const IOVA: u64 = 1 << 40;
const SPACE: u64 = 64 << 30;

struct Setup<F: PageTableFormat> {
    pt: PageTable<F, &'static TableArena>,
    arena: &'static TableArena,
    /// Physical addresses of the tables holding the leaves.
    leaf_tables: Vec<u64>,
    leaves: u64,
    /// A copy of the leaf tables' bytes, for the sequential-read baseline.
    copy: Vec<u64>,
}

fn setup<F: PageTableFormat>(fmt: F, page: u64) -> Setup<F> {
    let frames = (SPACE / page / 512 + 256) as usize;
    let arena: &'static TableArena = Box::leak(Box::new(TableArena::new(1 << 32, frames).unwrap()));
    let mut pt = PageTable::new(fmt, arena).unwrap();
    // Arm: writable leaves carry DBM (writable-clean) from the start.
    pt.set_dirty_tracking(IOVA, SPACE, true, &mut NoFlush)
        .unwrap();
    pt.map_sizes(IOVA, 1 << 34, SPACE, Perm::RW, page).unwrap();
    let leaf_level = if page == 4096 { 1 } else { 2 };
    let leaf_tables: Vec<u64> = pt
        .tables()
        .into_iter()
        .filter(|&(l, _)| l == leaf_level)
        .map(|(_, pa)| pa)
        .collect();
    let mut copy = Vec::with_capacity(leaf_tables.len() * 512);
    for &pa in &leaf_tables {
        copy.extend(
            arena
                .frame(pa)
                .unwrap()
                .iter()
                .map(|e| e.load(Ordering::Relaxed)),
        );
    }
    Setup {
        pt,
        arena,
        leaves: SPACE / page,
        leaf_tables,
        copy,
    }
}

/// Set the hardware's A/D state on every `stride`-th leaf, starting at a per-table offset.
fn plant<F: PageTableFormat>(s: &Setup<F>, dirty: impl Fn(u64) -> u64, permille: u64) {
    let mut k = 0u64;
    for &pa in &s.leaf_tables {
        for e in s.arena.frame(pa).unwrap() {
            // A fixed pseudo-random pattern with exactly `permille`/1000 of the leaves.
            let h = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54; // 0..1024
            if h * 1000 < permille * 1024 {
                e.store(dirty(e.load(Ordering::Relaxed)), Ordering::Relaxed);
            }
            k += 1;
        }
    }
}

fn bench_format<F: PageTableFormat>(
    c: &mut Criterion,
    name: &str,
    fmt: F,
    hw_dirty: fn(u64) -> u64,
    opts: HarvestOptions,
) {
    for page in [4096u64, 2 << 20] {
        let mut s = setup(fmt.clone(), page);
        let group_name = format!("{name}/{}", if page == 4096 { "4K" } else { "2M" });
        let mut g = c.benchmark_group(&group_name);
        g.sample_size(10);
        g.throughput(Throughput::Elements(s.leaves));
        g.bench_function("sequential_read", |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for &w in black_box(&s.copy) {
                    acc ^= w;
                }
                black_box(acc)
            })
        });
        // The same read with the access a harvest is allowed: one relaxed atomic load per
        // entry of the live tables (the IOMMU writes them concurrently, and Rust has no atomic
        // vector load), table by table.
        g.bench_function("sequential_read_atomic", |b| {
            b.iter(|| {
                let (mut a0, mut a1, mut a2, mut a3) = (0u64, 0u64, 0u64, 0u64);
                for &pa in black_box(&s.leaf_tables) {
                    for q in s.arena.frame(pa).unwrap().chunks_exact(4) {
                        a0 ^= q[0].load(Ordering::Relaxed);
                        a1 ^= q[1].load(Ordering::Relaxed);
                        a2 ^= q[2].load(Ordering::Relaxed);
                        a3 ^= q[3].load(Ordering::Relaxed);
                    }
                }
                black_box(a0 ^ a1 ^ a2 ^ a3)
            })
        });
        // One bit per leaf: the 4K case at 4 KiB granule, the 2M case at 2 MiB granule (a 4 KiB
        // bitmap would make the 2M case measure filling 2 MiB of bitmap, not the table scan).
        let mut bits = DirtyBits::new(IOVA, SPACE, page).unwrap();
        for permille in [1u64, 100, 1000] {
            g.bench_with_input(
                BenchmarkId::new("read_and_clear", format!("{}%", permille as f64 / 10.0)),
                &permille,
                |b, &permille| {
                    // Only the harvest is timed; planting the dirty state is not.
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            plant(&s, hw_dirty, permille);
                            bits.clear();
                            let mut flushes = 0u32;
                            let t = Instant::now();
                            let st =
                                s.pt.read_and_clear_dirty(
                                    IOVA,
                                    SPACE,
                                    &mut bits,
                                    opts,
                                    &mut |_: u64, _: u64| flushes += 1,
                                )
                                .unwrap();
                            total += t.elapsed();
                            black_box((st, flushes));
                        }
                        total
                    })
                },
            );
        }
        g.finish();
    }
}

fn harvest(c: &mut Criterion) {
    // AMD-Vi: the IOMMU sets A (bit 5) and D (bit 6).
    let plain = HarvestOptions::default();
    bench_format(
        c,
        "amd_v1",
        AmdV1::new(4).unwrap(),
        |raw| raw | (1 << 5) | (1 << 6),
        plain,
    );
    // x86-64 first stage: the IOMMU sets A (bit 5) and D (bit 6); the harvest clears D, or A
    // and D.
    let x86 = X86FirstStage::new(4, 52).unwrap();
    let ad = |raw| raw | X86FirstStage::A | X86FirstStage::D;
    bench_format(c, "x86_fs", x86, ad, plain);
    let clear_a = HarvestOptions {
        clear_accessed: true,
        ..plain
    };
    bench_format(c, "x86_fs_clear_a", x86, ad, clear_a);
    // Arm stage 1 with DBM: the SMMU clears AP[2] (bit 7); AF is already set.
    let arm = ArmS1::new(48, 48).unwrap();
    bench_format(c, "arm_s1", arm, |raw| raw & !(1 << 7), plain);
}

criterion_group!(benches, harvest);
criterion_main!(benches);
