//! The exact bits each format writes, pinned by snapshots: a change in an encoder shows up as a
//! snapshot diff, not as a silent change in what the IOMMU is told.

use livemig_iommu_pt::format::{AmdV1, ArmS1, ArmS2, VtdSecondStage, X86FirstStage};
use livemig_iommu_pt::{NoFlush, PageTable, PageTableFormat, Perm, PhysMem, TableArena};

const IOVA: u64 = 0x10_0000_0000;
const PA: u64 = 0x2_0000_0000;

/// A small table: RW 4K, RO 4K, a 2M block, and (where the format has it) write-only and a
/// replicated 64K page; then the first page and the block are marked dirty as the IOMMU would.
fn image<F: PageTableFormat>(f: F) -> String {
    let arena = TableArena::new(0x100_0000, 64).unwrap();
    let mut pt = PageTable::new(f.clone(), &arena).unwrap();
    pt.set_dirty_tracking(0, 1 << f.iova_bits(), true, &mut NoFlush)
        .unwrap();
    pt.map(IOVA, PA, 4096, Perm::RW).unwrap();
    pt.map(IOVA + 0x1000, PA + 0x1000, 4096, Perm::R).unwrap();
    pt.map(IOVA + 0x20_0000, PA + 0x20_0000, 2 << 20, Perm::RW)
        .unwrap();
    if f.write_only() {
        pt.map(IOVA + 0x2000, PA + 0x2000, 4096, Perm::W).unwrap();
    }
    if f.page_sizes() & (64 << 10) != 0 {
        pt.map(IOVA + 0x1_0000, PA + 0x1_0000, 64 << 10, Perm::RW)
            .unwrap();
    }
    for iova in [IOVA, IOVA + 0x20_0000] {
        let t = pt.translate(iova).unwrap().unwrap();
        let mut done = false;
        for (level, table) in pt.tables() {
            if level != t.level || done {
                continue;
            }
            let frame = arena.frame(table).unwrap();
            let idx = ((iova >> (12 + 9 * (u32::from(level) - 1))) & 511) as usize;
            let raw = frame[idx].load(std::sync::atomic::Ordering::Relaxed);
            if let livemig_iommu_pt::Pte::Leaf(l) = f.decode(raw, level)
                && l.pa == t.leaf.pa
            {
                let dirty = f.dirty_op().apply(raw) | f.accessed_bit();
                frame[idx].store(dirty, std::sync::atomic::Ordering::Relaxed);
                done = true;
            }
        }
    }
    let mut out = pt.dump();
    for (level, table) in pt.tables() {
        let frame = arena.frame(table).unwrap();
        for (i, e) in frame.iter().enumerate() {
            let v = e.load(std::sync::atomic::Ordering::Relaxed);
            if v != 0 {
                out.push_str(&format!("L{level} [{i:3}] {v:#018x}\n"));
            }
        }
    }
    out
}

#[test]
fn amd_v1() {
    insta::assert_snapshot!(image(AmdV1::new(4).unwrap()));
}

#[test]
fn vtd_second_stage() {
    insta::assert_snapshot!(image(VtdSecondStage::new(48, 46).unwrap()));
}

#[test]
fn x86_first_stage() {
    insta::assert_snapshot!(image(X86FirstStage::new(4, 46).unwrap()));
}

#[test]
fn arm_stage1() {
    insta::assert_snapshot!(image(ArmS1::new(48, 48).unwrap()));
}

#[test]
fn arm_stage2() {
    insta::assert_snapshot!(image(ArmS2::new(48, 48).unwrap()));
}
