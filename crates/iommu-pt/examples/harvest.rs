//! Dirty tracking through an IO page table, as a VMM that owns the table does it: build an
//! x86-64 first-stage table (VT-d scalable mode), map 2 MiB and split it to 4 KiB leaves, let
//! the emulated IOMMU (feature `model`) translate device writes (it sets D in each leaf it
//! writes through), then harvest with `read_and_clear_dirty` into `DirtyBits`, invalidating the
//! IOTLB for what was cleaned. The second harvest proves the clear: only a page written again
//! is reported.
//!
//! `cargo run -p livemig-iommu-pt --features model --example harvest`

use std::process::ExitCode;
use std::sync::Arc;

use livemig_iommu_pt::config::VtdPasidEntry;
use livemig_iommu_pt::format::X86FirstStage;
use livemig_iommu_pt::model::{DataMem, DeviceContext, GuestRam, Iommu, ModelOptions};
use livemig_iommu_pt::{DirtyBits, HarvestOptions, NoFlush, PageTable, Perm, TableArena};

const IOVA: u64 = 0x2000_0000;
const RAM: u64 = 0x8000_0000;
const SZ_4K: u64 = 4096;
const SZ_2M: u64 = 2 << 20;
/// The device's requester ID (bus 0, device 4, function 0).
const DEV: u32 = 0x20;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("ok: every harvest reported exactly the pages the device wrote");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("harvest example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Harvests `[IOVA, IOVA + 2 MiB)` and returns the dirty page indexes.
fn harvest(
    pt: &mut PageTable<X86FirstStage, Arc<TableArena>>,
    iommu: &Iommu<X86FirstStage, Arc<TableArena>>,
) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let mut dirty = DirtyBits::new(IOVA, SZ_2M, SZ_4K)?;
    // Every cleaned batch is invalidated: a cached translation with D set would let the next
    // write through without setting D again.
    let mut flush = |iova: u64, len: u64| iommu.flush_range(iova, len);
    let stats = pt.read_and_clear_dirty(
        IOVA,
        SZ_2M,
        &mut dirty,
        HarvestOptions::default(),
        &mut flush,
    )?;
    let pages: Vec<u64> = dirty.iter().map(|iova| (iova - IOVA) / SZ_4K).collect();
    println!(
        "harvest: {} dirty, {} entries cleaned -> pages {pages:?}",
        stats.dirty, stats.cleaned
    );
    Ok(pages)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Page-table pages come from an arena at "physical" 0x1000_0000 (256 frames).
    let arena = Arc::new(TableArena::new(0x1000_0000, 256)?);
    let fmt = X86FirstStage::new(4, 46)?;
    let mut pt = PageTable::new(fmt, Arc::clone(&arena))?;
    pt.map(IOVA, RAM, SZ_2M, Perm::RW)?; // one 2 MiB leaf
    // Track at 4 KiB: a huge leaf would report its whole 2 MiB. No IOMMU uses the table yet,
    // so no invalidation is needed.
    pt.split(IOVA, SZ_2M, SZ_4K, &mut NoFlush)?;

    let ram = Arc::new(GuestRam::new(RAM, 8 << 20));
    let iommu = Iommu::new(
        fmt,
        Arc::clone(&arena),
        Arc::clone(&ram) as Arc<dyn DataMem>,
        ModelOptions::default(),
    );
    iommu.attach(
        DEV,
        DeviceContext::Vtd(VtdPasidEntry::first_stage(pt.root(), 4, 1)),
    )?;

    let first = harvest(&mut pt, &iommu)?;
    if !first.is_empty() {
        return Err(format!("nothing written yet, but pages {first:?} are dirty").into());
    }

    let written = [3u64, 17, 200, 511];
    for &p in &written {
        iommu.dma_write(DEV, IOVA + p * SZ_4K + 8, &[0xa5; 8])?;
        // The DMA landed at the translated address.
        if ram.read_u64(RAM + p * SZ_4K + 8) != Some(0xa5a5_a5a5_a5a5_a5a5) {
            return Err(format!("page {p}: the DMA write did not land at its RAM address").into());
        }
    }
    // A read dirties nothing.
    let mut buf = [0u8; 8];
    iommu.dma_read(DEV, IOVA + 100 * SZ_4K, &mut buf)?;

    let got = harvest(&mut pt, &iommu)?;
    if got != written {
        return Err(format!("expected pages {written:?}, harvested {got:?}").into());
    }

    iommu.dma_write(DEV, IOVA + 17 * SZ_4K, &[1; 8])?;
    let again = harvest(&mut pt, &iommu)?;
    if again != [17] {
        return Err(
            format!("after the clear only page 17 was written again, harvested {again:?}").into(),
        );
    }
    Ok(())
}
