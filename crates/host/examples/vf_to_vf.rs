//! The real-host platform: migrates one VFIO device's state and 256 MiB of guest RAM to a
//! second device of the same kind on this host, through the engine over loopback TCP. Guest
//! RAM (a memfd `VmMemory`) is mapped into an iommufd IOAS at IOVA = GPA; each device is opened
//! by its VFIO cdev, bound to the iommufd and attached through the auto-domain policy (a
//! dirty-tracking HWPT where the IOMMU has one, else the device's DMA log, else migration is
//! blocked with the reason); a writer thread stands in for the vCPUs. Checks that the
//! destination's RAM equals the source's and the destination device runs.
//!
//! ```text
//! cargo run -p livemig-host --example vf_to_vf -- SRC DST
//!   SRC, DST: VFIO cdevs (/dev/vfio/devices/vfioN), PCI addresses or mdev UUIDs
//! ```
//!
//! Needs `/dev/iommu` (Linux with `CONFIG_IOMMUFD`), VFIO cdevs
//! (`CONFIG_VFIO_DEVICE_CDEV`) and two migratable devices; `cargo xtask rig` has them (mtty).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use livemig::engine::{Destination, Source, SourceConfig};
use livemig::transport::TcpChannel;
use livemig_host::workload::{WorkloadConfig, vmm_writer};
use livemig_host::{Host, HostConfig, Workload};
use livemig_kvm::{Backing, VmMemory};
use livemig_vfio::MigrationState;

type BoxError = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, dst] = args.as_slice() else {
        eprintln!("usage: vf_to_vf SRC DST (VFIO cdev paths, PCI addresses or mdev UUIDs)");
        return ExitCode::from(2);
    };
    match run(src, dst) {
        Ok(()) => {
            println!("ok: destination RAM equals the source's and {dst} runs");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vf_to_vf example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn host(dev: &str, memory: Arc<VmMemory>) -> Result<Host, BoxError> {
    let cfg = HostConfig {
        devices: vec![dev.to_string()],
        mock_dma: false,
        ..Default::default()
    };
    let h = Host::open(&cfg, memory).map_err(|e| livemig::error::chain(&e))?;
    for line in h.describe() {
        println!("{line}");
    }
    Ok(h)
}

fn run(src: &str, dst: &str) -> Result<(), BoxError> {
    if !Path::new("/dev/iommu").exists() {
        return Err(
            "/dev/iommu does not exist: this kernel has no iommufd (CONFIG_IOMMUFD), \
                    which the real-host platform needs (run it in `cargo xtask rig`'s guest or \
                    on a lab host)"
                .into(),
        );
    }
    // RAM above 4 GiB: inside the IOVA ranges of every IOMMU.
    let ram = [(4u64 << 30, 256u64 << 20)];
    let smem = Arc::new(VmMemory::new(&ram, Backing::Memfd)?);
    let dmem = Arc::new(VmMemory::new(&ram, Backing::Memfd)?);
    let mut sh = host(src, smem.clone())?;
    let mut dh = host(dst, dmem.clone())?;
    // The "vCPU": a thread writing 64 MiB of guest RAM through vm-memory.
    let work = Workload::start(vec![(
        WorkloadConfig {
            name: "cpu".into(),
            range: (ram[0].0, 64 << 20),
            rate: 20_000,
            seed: 3,
        },
        vmm_writer(smem.clone()),
    )])?;
    let mut source = Source::new(sh.source(&work)?, SourceConfig::default());
    let mut dest = Destination::new(dh.destination()?);
    println!(
        "dirty tracking plan: {:?}",
        source.check().map_err(|e| e.chain())?
    );

    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let receiver = std::thread::spawn(move || -> Result<Destination, String> {
        let (s, _) = l.accept().map_err(|e| e.to_string())?;
        let back = s.try_clone().map_err(|e| e.to_string())?;
        dest.receive(s, back).map_err(|e| e.chain())?;
        Ok(dest)
    });
    let report = source.migrate_over(TcpChannel(TcpStream::connect(addr)?));
    let dest = receiver.join().map_err(|_| "destination thread panicked")?;
    let report = report.map_err(|e| format!("source: {}", e.chain()))?;
    let dest = dest.map_err(|e| format!("destination: {e}"))?;
    println!(
        "tracking {:?}, {} rounds, {} bytes, downtime {} us",
        report.tracking,
        report.rounds.len(),
        report.bytes,
        report.downtime_us
    );
    if let Some(e) = work.error() {
        return Err(format!("the writer thread failed: {e}").into());
    }
    work.pause();
    if let Some(at) = smem.first_difference(&dmem) {
        return Err(format!("destination RAM differs from the source's at {at:#x}").into());
    }
    for d in &dest.platform().devices {
        let state = d.state()?;
        if state != MigrationState::Running {
            return Err(format!("destination {} is {state}, not RUNNING", d.name()).into());
        }
    }
    Ok(())
}
