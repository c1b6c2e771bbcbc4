//! Migrates a HiSilicon ACC (SEC) VF between two QM device models (feature `model`) through the
//! VFIO migration v2 driver (`AccMigration`, feature `vfio`), with a guest driver keeping jobs
//! queued across the move: PRE_COPY sends the match data first (the destination checks it in
//! RESUMING), STOP_COPY the queue state, and on the destination the queued jobs complete and new
//! ones run. Checks that the register state is identical and every job completed exactly once
//! with the right result.
//!
//! `cargo run -p livemig-hisi-qm --features model,vfio --example vf_migrate`

use std::process::ExitCode;
use std::sync::Arc;

use livemig_hisi_qm::mailbox::Vft;
use livemig_hisi_qm::migration::AccMigration;
use livemig_hisi_qm::model::{Dma, FlatMemory, GuestDriver, QmPfModel, QmVfModel};
use livemig_hisi_qm::{AccKind, AccVf, LoadOutcome, NoDelay, PfQm, VfQm};
use livemig_vfio::data::{save_precopy, save_stop_copy, write_resuming};
use livemig_vfio::{MigrationDevice, MigrationState};

type BoxError = Box<dyn std::error::Error>;

const RAM: u64 = 0x1000_0000;
const RAM_SIZE: usize = 8 << 20;
/// The VF's function number on its PF.
const FUN: u32 = 1;
/// Its queues: 4 from queue 64.
const VFT: Vft = Vft { base: 64, num: 4 };
const JOBS: u16 = 64;

/// One host: guest memory, the PF and VF models, and the VF's migration driver.
struct Host {
    mem: Arc<FlatMemory>,
    vf: Arc<QmVfModel>,
    mig: AccMigration<Arc<QmVfModel>, Arc<QmPfModel>, NoDelay>,
}

fn host() -> Host {
    let mem = Arc::new(FlatMemory::new(RAM, RAM_SIZE));
    let pf = QmPfModel::new(AccKind::Sec, 1);
    let vf = pf.create_vf(FUN, VFT, mem.clone() as Arc<dyn Dma>);
    let dev = AccVf::new(
        AccKind::Sec,
        FUN,
        VfQm::new(vf.clone(), NoDelay),
        PfQm::new(pf.clone(), NoDelay),
    );
    Host {
        mem,
        vf,
        mig: AccMigration::new(dev),
    }
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), BoxError> {
    if ok { Ok(()) } else { Err(what().into()) }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("ok: the VF migrated with its queues; every job completed once, correctly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vf_migrate example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), BoxError> {
    let mut a = host();
    let mut b = host();

    // The guest driver on A: 40 jobs submitted (XOR 0x5a of 256 bytes each), 25 processed.
    let mut g = GuestDriver::init(a.vf.clone(), a.mem.clone(), RAM, VFT.num, 64)?;
    let bufs = g.free_base();
    for j in 0..u64::from(JOBS) {
        let src: Vec<u8> = (0..256)
            .map(|i| (i as u8).wrapping_mul(j as u8 + 1))
            .collect();
        a.mem.write(bufs + j * 512, &src)?;
    }
    for j in 0..40u16 {
        let off = u64::from(j) * 512;
        ensure(
            g.submit(j % VFT.num, bufs + off, bufs + off + 256, 256, j)?,
            || format!("job {j}: its queue is full"),
        )?;
    }
    let processed = a.vf.process(25);
    let mut done = Vec::new();
    for q in 0..VFT.num {
        done.extend(g.poll(q)?.into_iter().map(|c| c.tag));
    }
    println!("source: {processed} jobs done, {} queued", 40 - done.len());

    // PRE_COPY on A, RESUMING on B: the match data goes first.
    let mut src = a
        .mig
        .transition(MigrationState::PreCopy)?
        .data
        .ok_or("RUNNING -> PRE_COPY opened no data session")?;
    let mut dst = b
        .mig
        .transition(MigrationState::Resuming)?
        .data
        .ok_or("RUNNING -> RESUMING opened no data session")?;
    let mut early = Vec::new();
    save_precopy(&mut src, &mut early, u64::MAX)?;
    write_resuming(&mut dst, &early)?;

    // Stop and copy: the queues stop, the rest of the state follows.
    a.mig.transition(MigrationState::StopCopy)?;
    ensure(a.vf.is_paused() && a.vf.process(100) == 0, || {
        "a VF in STOP_COPY still processes jobs".into()
    })?;
    let mut rest = Vec::new();
    save_stop_copy(&mut src, &mut rest)?;
    println!(
        "device state: {} bytes in PRE_COPY, {} in STOP_COPY",
        early.len(),
        rest.len()
    );
    let saved = a.vf.migratable_state();
    write_resuming(&mut dst, &rest)?;
    // Guest memory moves too (the queue contexts live there).
    ensure(b.mem.restore(&a.mem.snapshot()), || {
        "guest memory snapshot did not fit".into()
    })?;
    b.mig.transition(MigrationState::Running)?;
    ensure(b.mig.last_load() == Some(LoadOutcome::Loaded), || {
        format!("destination load: {:?}", b.mig.last_load())
    })?;
    ensure(b.vf.migratable_state() == saved, || {
        "the destination VF's registers differ from the source's".into()
    })?;

    // The guest carries on on B: the queued jobs complete, new ones too.
    let mut g = g.migrate_to(b.vf.clone(), b.mem.clone());
    b.vf.process(100);
    for j in 40..JOBS {
        let off = u64::from(j) * 512;
        ensure(
            g.submit(j % VFT.num, bufs + off, bufs + off + 256, 256, j)?,
            || format!("job {j}: its queue is full on the destination"),
        )?;
    }
    b.vf.process(100);
    for q in 0..VFT.num {
        done.extend(g.poll(q)?.into_iter().map(|c| c.tag));
    }
    done.sort_unstable();
    ensure(done == (0..JOBS).collect::<Vec<u16>>(), || {
        format!("jobs completed: {done:?} (each of 0..{JOBS} exactly once expected)")
    })?;
    for &j in &done {
        let off = u64::from(j) * 512;
        let (mut src, mut dst) = (vec![0u8; 256], vec![0u8; 256]);
        b.mem.read(bufs + off, &mut src)?;
        b.mem.read(bufs + off + 256, &mut dst)?;
        ensure(src.iter().zip(&dst).all(|(s, d)| s ^ 0x5a == *d), || {
            format!("job {j}: wrong result")
        })?;
    }
    println!("destination: {} jobs completed in all", done.len());

    // The source could run again (what a cancelled migration does).
    a.mig.transition(MigrationState::Running)?;
    ensure(!a.vf.is_paused(), || {
        "the source VF did not run again".into()
    })
}
