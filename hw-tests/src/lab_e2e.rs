//! Lab-host end-to-end cases for configured device pairs (`resume_into`): a migration through
//! the engine, in this process over loopback TCP, from one VF to the other on the same host,
//! with the real-host platform (`livemig-host`): guest RAM in an IOAS at IOVA = GPA, each VF
//! attached through the auto-domain policy, IOMMU dirty tracking where the host has it, the
//! VF's DMA log otherwise, a writer thread as the vCPU. Afterwards the destination's RAM equals
//! the source's and the destination VF runs. Where the host also has /dev/kvm the same runs
//! with the KVM test VM owning the VF (its RAM in the IOAS, its vCPUs the writers), and the
//! guest verifies its own memory on the destination.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hw_tests::lab_config::{Device, LabConfig};
use livemig::engine::{Destination, MigrationReport, Source, SourceConfig};
use livemig::transport::TcpChannel;
use livemig_host::workload::{WorkloadConfig, vmm_writer};
use livemig_host::{Host, HostConfig, Workload};
use livemig_kvm::{Backing, TestVm, TestVmConfig, VmMemory, platform};
use livemig_vfio::MigrationState;

use crate::harness::Outcome;
use crate::trace;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn host(pci: &str, memory: Arc<VmMemory>) -> Result<Host> {
    let cfg = HostConfig {
        devices: vec![pci.to_string()],
        mock_dma: false,
        ..Default::default()
    };
    Host::open(&cfg, memory).map_err(|e| anyhow::anyhow!("{}", livemig::error::chain(&e)))
}

/// Runs `source` against `dest` over loopback TCP.
fn over_tcp(
    mut source: Source,
    dest: Destination,
) -> Result<(Source, Destination, MigrationReport)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let t = std::thread::spawn(move || -> Result<Destination> {
        let mut dest = dest;
        let (s, _) = l.accept()?;
        let back = s.try_clone()?;
        dest.receive(s, back)
            .map_err(|e| anyhow::anyhow!("destination: {}", e.chain()))?;
        Ok(dest)
    });
    let r = source.migrate_over(TcpChannel(TcpStream::connect(addr)?));
    let dest = t
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))??;
    let report = r.map_err(|e| anyhow::anyhow!("source: {}", e.chain()))?;
    Ok((source, dest, report))
}

fn dest_running(dest: &Destination) -> Result<()> {
    for d in &dest.platform().devices {
        ensure!(
            d.state().map_err(err)? == MigrationState::Running,
            "destination {} is not RUNNING",
            d.name()
        );
    }
    Ok(())
}

/// VF to VF with writer threads as the vCPU.
pub fn migrate_engine(d: &Device, into: &Device) -> Result<Outcome> {
    // RAM above 4 GiB: inside the IOVA ranges of every IOMMU the lab has.
    let ram = [(4u64 << 30, 256u64 << 20)];
    let smem = Arc::new(VmMemory::new(&ram, Backing::Memfd).map_err(err)?);
    let dmem = Arc::new(VmMemory::new(&ram, Backing::Memfd).map_err(err)?);
    let mut sh = host(d.spec(), smem.clone())?;
    let mut dh = host(into.spec(), dmem.clone())?;
    for line in sh.describe().iter().chain(dh.describe()) {
        trace!("{line}");
    }
    let work = Workload::start(vec![(
        WorkloadConfig {
            name: "cpu".into(),
            range: (ram[0].0, 64 << 20),
            rate: 20_000,
            seed: 3,
        },
        vmm_writer(smem.clone()),
    )])
    .map_err(err)?;
    let sp = sh.source(&work).map_err(err)?;
    let dp = dh.destination().map_err(err)?;
    let (source, dest, report) = over_tcp(
        Source::new(sp, SourceConfig::default()),
        Destination::new(dp),
    )?;
    trace!(
        "tracking {:?}, {} rounds, downtime {} us",
        report.tracking,
        report.rounds.len(),
        report.downtime_us
    );
    ensure!(work.error().is_none(), "{:?}", work.error());
    work.pause();
    if let Some(at) = smem.first_difference(&dmem) {
        anyhow::bail!("destination RAM differs from the source's at {at:#x}");
    }
    dest_running(&dest)?;
    drop((source, dest, work, sh, dh));
    Ok(Outcome::Pass)
}

/// The KVM test VM owning the VF: the two backends composed.
pub fn migrate_kvm_vm(d: &Device, into: &Device) -> Result<Outcome> {
    if let Err(why) = livemig_kvm::kvm_usable() {
        return Ok(Outcome::Skip(format!("no usable /dev/kvm: {why}")));
    }
    // 1024 pages per vCPU: the rig's nested KVM (kvm profile) runs this under TCG too.
    let cfg = TestVmConfig {
        pages: 1024,
        ..TestVmConfig::default()
    };
    let src = TestVm::boot(&cfg).map_err(err)?;
    src.wait_progress(&[0, 0], Duration::from_secs(10))
        .map_err(err)?;
    let dst = TestVm::incoming(&cfg).map_err(err)?;
    let mut sh = host(d.spec(), src.vm.memory().clone())?;
    let mut dh = host(into.spec(), dst.vm.memory().clone())?;
    let devices = sh.source_devices().map_err(err)?;
    let iommu = sh.iommu_tracker().map_err(err)?;
    let sp = platform::source(&src.vm, devices, iommu, None).map_err(err)?;
    let ddev = dh.destination().map_err(err)?.devices;
    let dp = platform::destination(&dst.vm, ddev, true).map_err(err)?;
    let (source, dest, report) = over_tcp(
        Source::new(sp, SourceConfig::default()),
        Destination::new(dp),
    )?;
    trace!(
        "tracking {:?}, downtime {} us",
        report.tracking, report.downtime_us
    );
    dest_running(&dest)?;
    let f = dst.verify(Duration::from_secs(60)).map_err(err)?;
    ensure!(
        f.is_empty(),
        "the guest's verification failed on the destination: {f:?}"
    );
    drop((source, dest, sh, dh));
    Ok(Outcome::Pass)
}

/// The pair's target, if configured and present.
pub fn target<'a>(cfg: &'a LabConfig, d: &Device) -> Result<Option<&'a Device>> {
    match &d.resume_into {
        None => Ok(None),
        Some(t) => cfg
            .device(t)
            .map(Some)
            .with_context(|| format!("resume_into {t:?} is not configured")),
    }
}
