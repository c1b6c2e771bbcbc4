//! Migration of an ACC VF between two device models through the VFIO v2 driver
//! (`AccMigration`), with a guest driver keeping work in flight; fault injection on every step;
//! corrupt streams; and the device's DMA going through livemig-iommu-pt's IOMMU model.

use std::io::{Read, Write};
use std::sync::Arc;

use livemig_hisi_qm::mailbox::{MbCmd, Vft};
use livemig_hisi_qm::migration::AccMigration;
use livemig_hisi_qm::model::{Dma, DmaError, Fault, FlatMemory, GuestDriver, QmPfModel, QmVfModel};
use livemig_hisi_qm::seq::dump_registers;
use livemig_hisi_qm::{
    AccKind, AccVf, Bar2Layout, LoadOutcome, MigCtrl, MigrationRegs, NoDelay, PfQm, QmRevision,
    VfQm,
};
use livemig_vfio::data::{save_precopy, save_stop_copy, write_resuming};
use livemig_vfio::{MigrationDevice, MigrationState};

const RAM: u64 = 0x1000_0000;
const RAM_SIZE: usize = 8 << 20;
const FUN: u32 = 1;
const VFT: Vft = Vft { base: 64, num: 4 };

type Mig = AccMigration<Arc<QmVfModel>, Arc<QmPfModel>, NoDelay>;
/// A driver whose VF migration registers are wherever QM_MIG_REGION_SEL puts them.
type NewMig = AccMigration<MigrationRegs<Arc<QmVfModel>, Arc<QmPfModel>>, Arc<QmPfModel>, NoDelay>;

struct Host<M = Mig> {
    mem: Arc<FlatMemory>,
    pf: Arc<QmPfModel>,
    vf: Arc<QmVfModel>,
    mig: M,
}

/// A host whose PF is of `revision`, its VF opened as the 7.3.4 driver opens it.
fn host_rev(kind: AccKind, iso: u32, vft: Vft, revision: QmRevision) -> Host<NewMig> {
    let mem = Arc::new(FlatMemory::new(RAM, RAM_SIZE));
    let pf = QmPfModel::with_revision(kind, iso, revision);
    let vf = pf.create_vf(FUN, vft, mem.clone() as Arc<dyn Dma>);
    let dev = AccVf::open(
        kind,
        FUN,
        revision,
        vf.clone(),
        vf.bar2_len(),
        pf.clone(),
        NoDelay,
    )
    .unwrap();
    Host {
        mem,
        pf,
        vf,
        mig: AccMigration::new(dev),
    }
}

fn host(kind: AccKind, iso: u32, vft: Vft) -> Host {
    let mem = Arc::new(FlatMemory::new(RAM, RAM_SIZE));
    let pf = QmPfModel::new(kind, iso);
    let vf = pf.create_vf(FUN, vft, mem.clone() as Arc<dyn Dma>);
    let dev = AccVf::new(
        kind,
        FUN,
        VfQm::new(vf.clone(), NoDelay),
        PfQm::new(pf.clone(), NoDelay),
    );
    Host {
        mem,
        pf,
        vf,
        mig: AccMigration::new(dev),
    }
}

/// A guest with four queues, some jobs done and some still queued in the SQs.
fn busy_guest<M>(h: &Host<M>) -> (GuestDriver<Arc<QmVfModel>>, u64, Vec<u16>) {
    let mut g = GuestDriver::init(h.vf.clone(), h.mem.clone(), RAM, VFT.num, 64).unwrap();
    let bufs = g.free_base();
    // Source data for 64 jobs.
    for j in 0..64u64 {
        let src: Vec<u8> = (0..256)
            .map(|i| (i as u8).wrapping_mul(j as u8 + 1))
            .collect();
        h.mem.write(bufs + j * 512, &src).unwrap();
    }
    let mut tags = Vec::new();
    for j in 0..40u16 {
        let q = j % VFT.num;
        let off = u64::from(j) * 512;
        assert!(g.submit(q, bufs + off, bufs + off + 256, 256, j).unwrap());
        tags.push(j);
    }
    assert_eq!(h.vf.process(25), 25);
    let mut done = Vec::new();
    for q in 0..VFT.num {
        done.extend(g.poll(q).unwrap().into_iter().map(|c| c.tag));
    }
    assert_eq!(done.len(), 25);
    (g, bufs, done)
}

/// The VF's state registers (the mailbox words are a command interface: the match check's
/// VFT query legitimately uses them).
fn state_regs(vf: &QmVfModel) -> String {
    dump_registers(vf)
        .lines()
        .filter(|l| !l.contains("QM_MB_CMD"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An error and all its sources, joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(" / ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn check_results(mem: &FlatMemory, bufs: u64, tags: &[u16]) {
    for &j in tags {
        let off = u64::from(j) * 512;
        let mut src = vec![0u8; 256];
        let mut dst = vec![0u8; 256];
        mem.read(bufs + off, &mut src).unwrap();
        mem.read(bufs + off + 256, &mut dst).unwrap();
        let want: Vec<u8> = src.iter().map(|b| b ^ 0x5a).collect();
        assert_eq!(dst, want, "job {j}");
    }
}

#[test]
fn save_on_a_resume_on_b_keeps_the_queues_running() {
    let mut a = host(AccKind::Sec, 1, VFT);
    let mut b = host(AccKind::Sec, 1, VFT);
    let (g, bufs, mut done) = busy_guest(&a);

    // Source PRE_COPY: the match block goes first; the destination checks it in RESUMING.
    let mut src = a
        .mig
        .transition(MigrationState::PreCopy)
        .unwrap()
        .data
        .unwrap();
    let mut dst = b
        .mig
        .transition(MigrationState::Resuming)
        .unwrap()
        .data
        .unwrap();
    let mut early = Vec::new();
    let round = save_precopy(&mut src, &mut early, u64::MAX).unwrap();
    assert_eq!((round.info.initial_bytes, round.bytes), (40, 40));
    assert_eq!(early.len(), 40);
    let again = save_precopy(&mut src, &mut early, u64::MAX).unwrap();
    assert!(again.drained && again.bytes == 0, "{again:?}");
    write_resuming(&mut dst, &early).unwrap();

    // Stop and copy: the queues stop; the rest of the state follows.
    a.mig.transition(MigrationState::StopCopy).unwrap();
    assert!(a.vf.is_paused());
    assert_eq!(a.vf.process(100), 0, "a paused VF does no work");
    let mut rest = Vec::new();
    save_stop_copy(&mut src, &mut rest).unwrap();
    assert_eq!(early.len() + rest.len(), 176);
    let saved = a.vf.migratable_state();
    write_resuming(&mut dst, &rest).unwrap();
    // Guest memory moves (with the queue contexts the cache write-back put there).
    assert!(b.mem.restore(&a.mem.snapshot()));
    b.mig.transition(MigrationState::Running).unwrap();
    assert_eq!(b.mig.last_load(), Some(LoadOutcome::Loaded));

    // Identical register state and contexts.
    assert_eq!(b.vf.migratable_state(), saved);
    insta::assert_snapshot!("destination_registers", dump_registers(&*b.vf));
    // The old revision never goes through a PF window.
    assert_eq!(
        a.vf.stats().window_accesses + b.vf.stats().window_accesses,
        0
    );

    // The guest carries on on B: the 15 queued jobs complete, new ones too.
    let mut g = g.migrate_to(b.vf.clone(), b.mem.clone());
    assert_eq!(b.vf.process(100), 15);
    for q in 0..VFT.num {
        done.extend(g.poll(q).unwrap().into_iter().map(|c| c.tag));
    }
    for j in 40..64u16 {
        let off = u64::from(j) * 512;
        assert!(
            g.submit(j % VFT.num, bufs + off, bufs + off + 256, 256, j)
                .unwrap()
        );
    }
    assert_eq!(b.vf.process(100), 24);
    for q in 0..VFT.num {
        done.extend(g.poll(q).unwrap().into_iter().map(|c| c.tag));
    }
    done.sort_unstable();
    assert_eq!(
        done,
        (0..64).collect::<Vec<u16>>(),
        "every job completed exactly once"
    );
    check_results(&b.mem, bufs, &done);
    assert_eq!(
        g.events.len(),
        64,
        "one event per completion, across the migration"
    );

    // The source can be resumed too (a cancelled migration).
    a.mig.transition(MigrationState::Running).unwrap();
    assert!(!a.vf.is_paused());
}

#[test]
fn a_vf_that_never_got_ready_sends_match_data_only() {
    let mut a = host(AccKind::Hpre, 0, VFT);
    let mut b = host(AccKind::Hpre, 0, VFT);
    a.vf.set_not_ready(true);
    let mut src = a
        .mig
        .transition(MigrationState::StopCopy)
        .unwrap()
        .data
        .unwrap();
    let mut blob = Vec::new();
    save_stop_copy(&mut src, &mut blob).unwrap();
    assert_eq!(blob.len(), 40);
    let mut dst = b
        .mig
        .transition(MigrationState::Resuming)
        .unwrap()
        .data
        .unwrap();
    write_resuming(&mut dst, &blob).unwrap();
    b.mig.transition(MigrationState::Stop).unwrap();
    assert_eq!(b.mig.last_load(), Some(LoadOutcome::MatchOnly));
}

/// One source-side fault: the transition fails with an error naming the step, the state stays
/// where it was (not ERROR), and once the fault is gone the VF still does work.
fn source_fault(fault: Fault, on_pf: bool, expect: &str) {
    let mut a = host(AccKind::Zip, 1, VFT);
    let (mut g, bufs, _) = busy_guest(&a);
    if on_pf {
        a.pf.inject(fault);
    } else {
        a.vf.inject(fault);
    }
    let e = a.mig.transition(MigrationState::StopCopy).unwrap_err();
    let msg = chain(&e);
    assert!(msg.contains(expect), "{fault:?}: {msg}");
    // A failed arc leaves the state where the last good arc put it (RUNNING -> STOP may have
    // succeeded before STOP -> STOP_COPY failed), never ERROR; the VMM then goes back to
    // RUNNING.
    let left = a.mig.migration_state().unwrap();
    assert!(
        matches!(left, MigrationState::Running | MigrationState::Stop),
        "{fault:?}: {left}"
    );
    a.vf.clear_faults();
    a.pf.clear_faults();
    a.mig.transition(MigrationState::Running).unwrap();
    // The VF is runnable: nothing paused, queued work completes.
    assert!(!a.vf.is_paused(), "{fault:?} left the VF paused");
    let off = 50 * 512;
    assert!(g.submit(0, bufs + off, bufs + off + 256, 256, 50).unwrap());
    assert!(a.vf.process(100) >= 1, "{fault:?}: the VF does no work");
}

#[test]
fn every_source_fault_is_reported_and_leaves_the_vf_running() {
    source_fault(Fault::MailboxStuckBusy, false, "QM mailbox is busy");
    source_fault(
        Fault::MailboxError(MbCmd::PauseQm),
        false,
        "QM_MB_CMD_PAUSE_QM failed with mailbox status",
    );
    source_fault(
        Fault::WritebackNeverDone,
        false,
        "QM_CACHE_WB_DONE did not become ready",
    );
    source_fault(
        Fault::IfcIntStatusStuck,
        false,
        "QM_IFC_INT_STATUS stayed 0x1",
    );
    source_fault(Fault::IfcIntSetStuck, false, "QM_IFC_INT_SET_V stayed 0x1");
    source_fault(
        Fault::AbnormalIntStuck,
        true,
        "QM_ABNORMAL_INT_STATUS stayed",
    );
    source_fault(Fault::CoreIntStuck, true, "HZIP_CORE_INT_STATUS stayed 0x4");
    source_fault(
        Fault::VftCfgNeverReady,
        true,
        "QM_VFT_CFG_RDY did not become ready",
    );
    source_fault(
        Fault::MailboxError(MbCmd::SqcBt),
        false,
        "QM_MB_CMD_SQC_BT failed with mailbox status",
    );
}

/// Destination-side refusals: the stream is refused before any destination register is
/// written, and the source goes back to RUNNING with its work intact.
fn destination_refuses(b: &mut Host, expect: &str) {
    let mut a = host(AccKind::Sec, 1, VFT);
    let (mut g, bufs, _) = busy_guest(&a);
    let mut src = a
        .mig
        .transition(MigrationState::StopCopy)
        .unwrap()
        .data
        .unwrap();
    let mut blob = Vec::new();
    save_stop_copy(&mut src, &mut blob).unwrap();
    let mut dst = b
        .mig
        .transition(MigrationState::Resuming)
        .unwrap()
        .data
        .unwrap();
    let untouched = state_regs(&b.vf);
    // hisi_acc_vf_resume_write answers a failed vf_qm_check_match with EFAULT; the cause is kept.
    let e = dst.write_all(&blob).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
    let why = chain(&b.mig.last_rejection().expect("the refusal's cause is kept"));
    assert!(why.contains(expect), "{why}");
    // Later writes are checked again and refused again, as in the driver.
    let e = dst.write(&[]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
    let e = b.mig.transition(MigrationState::Stop).unwrap_err();
    assert!(chain(&e).contains(expect), "{}", chain(&e));
    assert_eq!(
        b.mig.migration_state().unwrap(),
        MigrationState::Resuming,
        "{e}"
    );
    assert_eq!(
        state_regs(&b.vf),
        untouched,
        "destination registers were written"
    );
    // The source resumes.
    drop(src);
    a.mig.transition(MigrationState::Running).unwrap();
    let off = 50 * 512;
    assert!(g.submit(1, bufs + off, bufs + off + 256, 256, 50).unwrap());
    assert_eq!(a.vf.process(100), 16);
}

#[test]
fn destination_refuses_a_different_device() {
    destination_refuses(
        &mut host(AccKind::Zip, 1, VFT),
        "dev_id is 0xa256 in the stream, 0xa251 here",
    );
    destination_refuses(
        &mut host(AccKind::Sec, 0, VFT),
        "que_iso_cfg is 0x1 in the stream, 0x0 here",
    );
    destination_refuses(
        &mut host(AccKind::Sec, 1, Vft { base: 0, num: 8 }),
        "qp_num is 0x4 in the stream, 0x8 here",
    );
    let mut b = host(AccKind::Sec, 1, VFT);
    b.vf.inject(Fault::VftMismatch);
    destination_refuses(&mut b, "qp_num is 0x4 in the stream, 0x5 here");
}

#[test]
fn corrupt_streams_are_refused_before_loading() {
    let mut a = host(AccKind::Sec, 1, VFT);
    let _ = busy_guest(&a);
    let mut src = a
        .mig
        .transition(MigrationState::StopCopy)
        .unwrap()
        .data
        .unwrap();
    let mut blob = Vec::new();
    src.read_to_end(&mut blob).unwrap();
    assert_eq!(blob.len(), 176);
    for (i, why) in [
        (0, "unknown acc_vf_data magic"),
        (29, "not compatible with driver version"),
        (36, "reserved field qm_rsv_state"),
        (150, "eqe_dma is"),
    ] {
        let mut b = host(AccKind::Sec, 1, VFT);
        let mut bad = blob.clone();
        bad[i] ^= 0x40;
        let mut dst = b
            .mig
            .transition(MigrationState::Resuming)
            .unwrap()
            .data
            .unwrap();
        let untouched = state_regs(&b.vf);
        let w = dst.write_all(&bad);
        let r = b.mig.transition(MigrationState::Stop);
        let err = match (w, r) {
            // Inside the match block: the write fails with the driver's EFAULT.
            (Err(e), Err(_)) => {
                assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "byte {i}: {e}");
                chain(&b.mig.last_rejection().expect("cause kept"))
            }
            (Ok(()), Err(e)) => chain(&e),
            (_, Ok(_)) => panic!("byte {i}: corrupt stream accepted"),
        };
        assert!(err.contains(why), "byte {i}: {err}");
        assert_eq!(state_regs(&b.vf), untouched, "byte {i}");
    }
    // Too long: the driver's ENOMEM.
    let mut b = host(AccKind::Sec, 1, VFT);
    let mut dst = b
        .mig
        .transition(MigrationState::Resuming)
        .unwrap()
        .data
        .unwrap();
    let mut long = blob.clone();
    long.push(0);
    let e = dst.write_all(&long).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOMEM), "{e}");
    assert!(matches!(
        b.mig.last_rejection(),
        Some(livemig_hisi_qm::Error::TooLong { len: 177, max: 176 })
    ));
    // Nothing written at all: RESUMING -> STOP fails.
    let mut b = host(AccKind::Sec, 1, VFT);
    b.mig.transition(MigrationState::Resuming).unwrap();
    assert!(b.mig.transition(MigrationState::Stop).is_err());
}

/// Data-fd errors carry the errno of hisi_acc_vfio_pci.c (6.12), not just an error kind.
#[test]
fn data_fd_errors_carry_the_driver_errno() {
    use livemig_vfio::DataChannel;
    let errno = |e: &std::io::Error| e.raw_os_error();
    let mut a = host(AccKind::Sec, 1, VFT);
    let _ = busy_guest(&a);
    let mut pre = a
        .mig
        .transition(MigrationState::PreCopy)
        .unwrap()
        .data
        .unwrap();
    assert_eq!(pre.precopy_info().unwrap().initial_bytes, 40);
    // PRE_COPY -> RUNNING disables the file: reads are ENODEV (save_read), PRECOPY_INFO is
    // EINVAL because the device left PRE_COPY (checked before the file, precopy_ioctl).
    a.mig.transition(MigrationState::Running).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(errno(&pre.read(&mut buf).unwrap_err()), Some(libc::ENODEV));
    let e = pre.precopy_info().unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");

    let mut src = a
        .mig
        .transition(MigrationState::StopCopy)
        .unwrap()
        .data
        .unwrap();
    let mut blob = Vec::new();
    src.read_to_end(&mut blob).unwrap();
    let mut b = host(AccKind::Sec, 1, VFT);
    let mut dst = b
        .mig
        .transition(MigrationState::Resuming)
        .unwrap()
        .data
        .unwrap();
    dst.write_all(&blob).unwrap();
    assert_eq!(b.mig.last_rejection(), None);
    b.mig.transition(MigrationState::Stop).unwrap();
    // RESUMING -> STOP disabled the resuming file: resume_write answers ENODEV.
    assert_eq!(errno(&dst.write(&[0]).unwrap_err()), Some(libc::ENODEV));
}

/// The VF's DMA goes through livemig-iommu-pt's IOMMU model: the pages its completions and
/// results land in show up in the IOMMU's dirty bitmap.
#[test]
fn device_writes_dirty_pages_through_the_iommu_model() {
    use livemig_iommu_pt::config::VtdPasidEntry;
    use livemig_iommu_pt::format::VtdSecondStage;
    use livemig_iommu_pt::model::{
        DeviceContext, DevicePort, DmaPort, GuestRam, Iommu, ModelOptions,
    };
    use livemig_iommu_pt::{DirtyBits, HarvestOptions, PageTable, Perm, TableArena};

    struct ViaIommu(DevicePort<VtdSecondStage, Arc<TableArena>>);
    impl Dma for ViaIommu {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            self.0
                .dma_read(iova, buf)
                .map_err(|_| DmaError { iova, write: false })
        }
        fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            self.0
                .dma_write(iova, data)
                .map_err(|_| DmaError { iova, write: true })
        }
    }
    // The guest's view of its own memory (the CPU bypasses the IOMMU).
    struct Cpu(Arc<GuestRam>);
    impl Dma for Cpu {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            livemig_iommu_pt::model::DataMem::read(&*self.0, iova, buf)
                .then_some(())
                .ok_or(DmaError { iova, write: false })
        }
        fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            livemig_iommu_pt::model::DataMem::write(&*self.0, iova, data)
                .then_some(())
                .ok_or(DmaError { iova, write: true })
        }
    }

    let arena = Arc::new(TableArena::new(0x4000_0000, 512).unwrap());
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE as u64));
    let fmt = VtdSecondStage::new(48, 46).unwrap();
    let mut pt = PageTable::new(fmt, arena.clone()).unwrap();
    pt.map(RAM, RAM, RAM_SIZE as u64, Perm::RW).unwrap();
    pt.split(RAM, RAM_SIZE as u64, 4096, &mut |_: u64, _: u64| {})
        .unwrap();
    let iommu = Arc::new(Iommu::new(fmt, arena, ram.clone(), ModelOptions::default()));
    let ctx = VtdPasidEntry::second_stage(pt.root(), 48, 1).with_dirty_tracking(true);
    iommu.attach(9, DeviceContext::Vtd(ctx)).unwrap();

    let cpu: Arc<dyn Dma> = Arc::new(Cpu(ram.clone()));
    let vf = QmVfModel::new(AccKind::Sec, VFT, Arc::new(ViaIommu(iommu.port(9))));
    let mut g = GuestDriver::init(vf.clone(), cpu.clone(), RAM, VFT.num, 16).unwrap();
    let mut bits = DirtyBits::new(RAM, RAM_SIZE as u64, 4096).unwrap();
    pt.read_and_clear_dirty(
        RAM,
        RAM_SIZE as u64,
        &mut bits,
        HarvestOptions::default(),
        &mut &*iommu,
    )
    .unwrap();
    let bufs = g.free_base() + 0x10_0000;
    cpu.write(bufs, &[7u8; 256]).unwrap();
    assert!(g.submit(2, bufs, bufs + 0x3000, 256, 1).unwrap());
    assert_eq!(vf.process(10), 1);
    assert_eq!(g.poll(2).unwrap().len(), 1);
    bits.clear();
    pt.read_and_clear_dirty(
        RAM,
        RAM_SIZE as u64,
        &mut bits,
        HarvestOptions::default(),
        &mut &*iommu,
    )
    .unwrap();
    let dirty: Vec<u64> = bits.iter().collect();
    let cq = g.queues()[2].cq_base & !0xfff;
    assert!(dirty.contains(&(bufs + 0x3000)), "result page: {dirty:x?}");
    assert!(dirty.contains(&cq), "completion queue page: {dirty:x?}");
    assert!(!dirty.contains(&bufs), "the source page was only read");
}

/// Source PRE_COPY + STOP_COPY into destination RESUMING, memory copied, destination RUNNING;
/// returns the source's state as it stopped.
fn migrate<M: MigrationDevice>(
    a: &mut Host<M>,
    b: &mut Host<M>,
) -> Result<livemig_hisi_qm::model::ModelState, String> {
    let e = |e: &dyn std::error::Error| chain(e);
    let mut src = a
        .mig
        .transition(MigrationState::PreCopy)
        .map_err(|x| e(&x))?
        .data
        .unwrap();
    let mut dst = b
        .mig
        .transition(MigrationState::Resuming)
        .map_err(|x| e(&x))?
        .data
        .unwrap();
    let mut early = Vec::new();
    save_precopy(&mut src, &mut early, u64::MAX).map_err(|x| e(&x))?;
    write_resuming(&mut dst, &early).map_err(|x| e(&x))?;
    a.mig
        .transition(MigrationState::StopCopy)
        .map_err(|x| e(&x))?;
    let mut rest = Vec::new();
    save_stop_copy(&mut src, &mut rest).map_err(|x| e(&x))?;
    let saved = a.vf.migratable_state();
    write_resuming(&mut dst, &rest).map_err(|x| e(&x))?;
    assert!(b.mem.restore(&a.mem.snapshot()));
    b.mig
        .transition(MigrationState::Running)
        .map_err(|x| e(&x))?;
    Ok(saved)
}

/// Two QM_HW_V4 PFs with QM_MIG_REGION_EN: the driver reaches each VF's migration registers
/// through its PF's BAR2 window, the guest has all of the VF's BAR2, and a migration carries
/// the state and the queued jobs as on the old revision.
#[test]
fn new_revision_vfs_migrate_through_the_pf_window() {
    let mut a = host_rev(AccKind::Sec, 1, VFT, QmRevision::V4);
    let mut b = host_rev(AccKind::Sec, 1, VFT, QmRevision::V4);
    for h in [&a, &b] {
        assert_eq!(h.vf.mig_ctrl(), MigCtrl::PfBar2);
        assert_eq!((h.vf.bar2_len(), h.vf.guest_bar2_len()), (0x10000, 0x10000));
        assert_eq!(h.mig.compat_block().layout, Bar2Layout::PF_CTRL);
    }
    let (g, bufs, mut done) = busy_guest(&a);
    let before = a.vf.stats().window_accesses;
    let saved = migrate(&mut a, &mut b).unwrap();
    assert!(a.vf.is_paused());
    assert_eq!(b.mig.last_load(), Some(LoadOutcome::Loaded));
    // The event-queue contexts (only in the window on this revision) came across.
    assert_ne!(
        saved.regs.eqc_dw[1], 0,
        "the guest configured an event queue"
    );
    assert_eq!(b.vf.migratable_state(), saved);
    // Both drivers went through the PF window; the EQ/AEQ doorbells the driver aims just
    // past the window reach no register.
    assert!(a.vf.stats().window_accesses > before);
    assert!(b.vf.stats().window_accesses > 0);
    assert_eq!(a.pf.stats().unrouted_stores, 2, "{:?}", a.pf.stats());

    // The guest carries on on B: the 15 queued jobs complete, new ones too.
    let mut g = g.migrate_to(b.vf.clone(), b.mem.clone());
    assert_eq!(b.vf.process(100), 15);
    for j in 40..64u16 {
        let off = u64::from(j) * 512;
        assert!(
            g.submit(j % VFT.num, bufs + off, bufs + off + 256, 256, j)
                .unwrap()
        );
    }
    assert_eq!(b.vf.process(100), 24);
    for q in 0..VFT.num {
        done.extend(g.poll(q).unwrap().into_iter().map(|c| c.tag));
    }
    done.sort_unstable();
    assert_eq!(done, (0..64).collect::<Vec<u16>>());
    check_results(&b.mem, bufs, &done);
    assert_eq!(g.events.len(), 64, "one event per completion");
}

/// Negative control for the path: the same new-revision pair driven through the VFs' own
/// BAR2 (the 6.12 path) does not carry the event-queue state, so the test above would catch
/// a driver that ignored QM_MIG_REGION_SEL.
#[test]
fn new_revision_vfs_through_their_own_bar_lose_the_event_queues() {
    let old_path = |h: Host<NewMig>| -> Host<Mig> {
        let dev = AccVf::new(
            AccKind::Sec,
            FUN,
            VfQm::new(h.vf.clone(), NoDelay),
            PfQm::new(h.pf.clone(), NoDelay),
        );
        Host {
            mem: h.mem,
            pf: h.pf,
            vf: h.vf,
            mig: AccMigration::new(dev),
        }
    };
    let mut a = old_path(host_rev(AccKind::Sec, 1, VFT, QmRevision::V4));
    let mut b = old_path(host_rev(AccKind::Sec, 1, VFT, QmRevision::V4));
    let _ = busy_guest(&a);
    let wrong = match migrate(&mut a, &mut b) {
        Ok(saved) => b.vf.migratable_state() != saved,
        Err(_) => true,
    };
    assert!(wrong, "state moved without the PF window");
    assert_eq!(b.vf.stats().window_accesses, 0);
}

/// A 6.12 / QM_HW_V3 VF (guest BAR2 32 KiB) and a 7.3.4 new-revision VF (64 KiB) cannot trade
/// a guest: the destination refuses the source's compatibility block before any of its
/// registers is written, in both directions. The driver's own match block would not.
#[test]
fn a_bar_layout_difference_is_refused_before_any_destination_write() {
    let refuse = |src: livemig_hisi_qm::CompatBlock,
                  b_vf: &QmVfModel,
                  b_pf: &QmPfModel,
                  check: &dyn Fn() -> Result<(), livemig_hisi_qm::Error>| {
        let (vf0, pf0) = (b_vf.stats(), b_pf.stats());
        let e = check().unwrap_err();
        assert!(
            matches!(e, livemig_hisi_qm::Error::LayoutMismatch { theirs, .. } if theirs == src.layout),
            "{e}"
        );
        assert_eq!(
            b_vf.stats().register_writes,
            vf0.register_writes,
            "VF written"
        );
        assert_eq!(
            b_pf.stats().register_writes,
            pf0.register_writes,
            "PF written"
        );
        assert_eq!((vf0.register_writes, pf0.register_writes), (0, 0));
        e.to_string()
    };

    // New source, old destination.
    let a = host_rev(AccKind::Sec, 1, VFT, QmRevision::V4);
    let b = host(AccKind::Sec, 1, VFT);
    let _ = busy_guest(&a);
    let src = a.mig.compat_block();
    let msg = refuse(src, &b.vf, &b.pf, &|| b.mig.check_compat(&src));
    assert_eq!(
        msg,
        "VF BAR2 layout differs: the source gives the guest 0x10000 of a 0x10000-byte BAR2 \
         (HW_ACC_MIG_PF_CTRL), this VF 0x8000 of a 0x10000-byte BAR2 (HW_ACC_MIG_VF_CTRL); a \
         guest cannot move between them"
    );
    assert_eq!(b.mig.migration_state().unwrap(), MigrationState::Running);
    // The bytes an engine compares differ, and say why.
    assert_eq!(
        String::from_utf8(src.encode()).unwrap(),
        "hisi-qm/1 19e5:a256 bar2 guest 0x10000 of 0x10000 mig pf-bar2"
    );
    assert_eq!(
        String::from_utf8(b.mig.compat_block().encode()).unwrap(),
        "hisi-qm/1 19e5:a256 bar2 guest 0x8000 of 0x10000 mig vf-bar2"
    );

    // Old source, new destination.
    let a = host(AccKind::Sec, 1, VFT);
    let b = host_rev(AccKind::Sec, 1, VFT, QmRevision::V4);
    let src = a.mig.compat_block();
    refuse(src, &b.vf, &b.pf, &|| b.mig.check_compat(&src));

    // Why the block is needed: acc_vf_data has no layout field, so the driver's match check
    // accepts the old source's match block on the new destination.
    let mut a = host(AccKind::Sec, 1, VFT);
    let mut b = host_rev(AccKind::Sec, 1, VFT, QmRevision::V4);
    let mut s = a
        .mig
        .transition(MigrationState::PreCopy)
        .unwrap()
        .data
        .unwrap();
    let mut d = b
        .mig
        .transition(MigrationState::Resuming)
        .unwrap()
        .data
        .unwrap();
    let mut early = Vec::new();
    save_precopy(&mut s, &mut early, u64::MAX).unwrap();
    write_resuming(&mut d, &early).unwrap();
    assert_eq!(b.mig.last_rejection(), None);

    // Negative controls: the same layout on both sides is accepted.
    let (n1, n2) = (
        host_rev(AccKind::Sec, 1, VFT, QmRevision::V4),
        host_rev(AccKind::Sec, 1, VFT, QmRevision::V5),
    );
    n2.mig.check_compat(&n1.mig.compat_block()).unwrap();
    assert_eq!(
        n1.mig.compat_block().encode(),
        n2.mig.compat_block().encode()
    );
    let (o1, o2) = (host(AccKind::Sec, 1, VFT), host(AccKind::Sec, 1, VFT));
    o2.mig.check_compat(&o1.mig.compat_block()).unwrap();
    // A V3 PF is old whatever the model is asked for.
    let v3 = host_rev(AccKind::Sec, 1, VFT, QmRevision::V3);
    v3.mig.check_compat(&o1.mig.compat_block()).unwrap();
    // And a different device is still a different device.
    let zip = host_rev(AccKind::Zip, 1, VFT, QmRevision::V4);
    let e = zip.mig.check_compat(&n1.mig.compat_block()).unwrap_err();
    assert!(e.to_string().contains("dev_id is 0xa256"), "{e}");
}

/// What the driver makes of QM_MIG_REGION_SEL on the model: garbage is an error naming the
/// register and the value, not a fallback to the VF's BAR2.
#[test]
fn garbage_in_qm_mig_region_sel_is_refused_on_the_model() {
    let mem = Arc::new(FlatMemory::new(RAM, RAM_SIZE));
    let pf = QmPfModel::with_revision(AccKind::Hpre, 0, QmRevision::V4);
    let vf = pf.create_vf(FUN, VFT, mem as Arc<dyn Dma>);
    let open = |rev| {
        AccVf::open(
            AccKind::Hpre,
            FUN,
            rev,
            vf.clone(),
            0x10000,
            pf.clone(),
            NoDelay,
        )
        .map(|_| ())
    };
    open(QmRevision::V4).unwrap();
    pf.set_mig_region_sel(0x0000_0101);
    let e = open(QmRevision::V4).unwrap_err();
    assert_eq!(
        chain(&e),
        "cannot locate the VF's migration registers / QM_MIG_REGION_SEL reads 0x00000101: \
         reserved bits 0x00000100 are set"
    );
    pf.set_mig_region_sel(1);
    let e = open(QmRevision::V3).unwrap_err();
    assert!(
        chain(&e).contains("QM_MIG_REGION_EN is set on QM_HW_V3 (0x30)"),
        "{e}"
    );
    // Negative control: EN clear on V4 is the VF's own BAR2, no error.
    pf.set_mig_region_sel(0);
    assert_eq!(
        AccVf::open(
            AccKind::Hpre,
            FUN,
            QmRevision::V4,
            vf.clone(),
            0x10000,
            pf.clone(),
            NoDelay
        )
        .unwrap()
        .layout(),
        Bar2Layout::VF_CTRL
    );
}
