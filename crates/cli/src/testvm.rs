//! The test VM as `livemig vm` and the soak peer share it: its options (`VmArgs`), a
//! migration's (`VmMigArgs`), what to do with an undecided handover (`Undecided`), and the
//! guest's own verification (`verify`).

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use livemig::engine::{AutoConverge, SourceConfig};
use livemig_kvm::{Backing, DirtyMode, GuestEvent, TestVm, TestVmConfig};
use serde::Serialize;

use crate::args::{parse_duration, parse_size};

#[derive(Args, Clone, Debug)]
pub struct VmArgs {
    /// vCPUs, each writing its own part of the working set.
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// Working-set pages per vCPU.
    #[arg(long, default_value_t = 4096)]
    pub(crate) pages: u32,
    /// Pages each vCPU writes per second (0: as fast as it can).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) rate: u64,
    /// Low RAM (from 0; the working sets live here), below the PCI hole.
    #[arg(long, default_value = "128MiB", value_parser = parse_size)]
    pub(crate) ram: u64,
    /// RAM above 4 GiB (after the PCI hole; 0 for none).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub(crate) high_ram: u64,
    /// vCPU dirty logging: auto, bitmap, ring or ring:ENTRIES.
    #[arg(long, default_value = "auto")]
    pub(crate) dirty: DirtyMode,
    /// Back guest RAM with a memfd instead of anonymous memory.
    #[arg(long, conflicts_with = "mem_file")]
    pub(crate) memfd: bool,
    /// Back guest RAM with this shared file (created sparse or grown; another VMM, e.g. QEMU
    /// with `memory-backend-file,share=on`, can map the same image).
    #[arg(long)]
    pub(crate) mem_file: Option<std::path::PathBuf>,
    /// Boot the guest idle: its vCPUs start, report ready and then write nothing (only its
    /// own boot wrote memory), as a benchmark's paused workload.
    #[arg(long)]
    pub(crate) idle: bool,
    /// How vCPUs 1.. start: `sipi` (they wait for vCPU 0's INIT-SIPI-SIPI through the
    /// in-kernel local APIC, as on a real machine and under QEMU) or `direct` (set up in
    /// 64-bit mode and made runnable by livemig-kvm).
    #[arg(long, value_enum, default_value_t = ApStartArg::Sipi)]
    pub(crate) ap_start: ApStartArg,
    /// Clear XSAVE (CPUID.1:ECX bit 26) from the VM's CPUID: another CPU model, for the rig's
    /// check that a destination without XSAVE refuses an XSAVE record at compat.
    #[arg(long, hide = true)]
    pub(crate) x_no_xsave: bool,
    /// Negative control (destination): the vCPU state record arrives and is dropped, never
    /// written into the vCPUs, so the guest's own check must fail on the destination.
    #[arg(long, hide = true)]
    pub(crate) x_drop_vcpu_state: bool,
}

/// `--ap-start` (see [`livemig_kvm::ApStart`]).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApStartArg {
    /// INIT-SIPI-SIPI from vCPU 0.
    Sipi,
    /// Runnable in 64-bit mode from the start.
    Direct,
}

/// What the test VM owns besides its vCPUs and RAM (`vm migrate` and `vm incoming`; the two
/// sides name their own devices, in the same order).
#[derive(Args, Clone, Debug, Default)]
pub struct VmDeviceArgs {
    /// A VFIO device the VM owns: cdev path, PCI address or mdev UUID (repeat, in migration
    /// order). Guest RAM is mapped into an iommufd IOAS at IOVA = GPA and the device attached
    /// to it, as `livemig host` does.
    #[arg(long = "device", value_name = "SPEC")]
    pub(crate) devices: Vec<String>,
    /// vCPU 0 drives the first device's BAR0 (an I/O BAR, e.g. an mtty's 16550) as its UART
    /// at ports 0x3f8..: it programs registers and FIFO bytes of its own choosing at boot and
    /// checks them when asked to verify (on the destination: after the migration).
    #[arg(long, requires = "devices")]
    pub(crate) guest_uart: bool,
    /// Add the iommufd selftest's mock device as a DMA endpoint (needs CONFIG_IOMMUFD_TEST);
    /// on the source it writes guest RAM behind the VMM's back (`--dma-rate`), tracked only by
    /// its dirty HWPT.
    #[arg(long)]
    pub(crate) mock_dma: bool,
    /// Mock-device DMA writes per second (source), into the last quarter of low RAM, which
    /// must lie above the guest's working sets.
    #[arg(long, default_value_t = 2000, requires = "mock_dma")]
    pub(crate) dma_rate: u64,
    /// Write guest RAM to FILE: on the source once the migration completed (the VM stopped),
    /// on the destination the moment before its vCPUs start. Each region is a 16-byte header
    /// (GPA, size; little-endian u64) and its bytes, for a page-by-page comparison.
    #[arg(long, value_name = "FILE")]
    pub(crate) dump_ram: Option<std::path::PathBuf>,
    /// Write a digest of guest RAM to FILE: one CRC-64/NVME (little-endian u64) per 2 MiB,
    /// the regions in GPA order, as `cargo xtask bench-peer` compares. On the source once the
    /// migration completed (the VM stopped); on the destination after the migration: with
    /// `--idle` before the guest verifies (it writes nothing), otherwise after its
    /// verification, while it keeps running (only what the guest no longer writes compares).
    #[arg(long, value_name = "FILE")]
    pub(crate) ram_digest: Option<std::path::PathBuf>,
    /// Negative control (destination): the first device's record is dropped and the device
    /// reset instead, so it runs with its own fresh state.
    #[arg(long, hide = true)]
    pub(crate) x_drop_device_state: bool,
}

/// The port base the guest's UART is routed at (COM1's).
pub const GUEST_UART_PORT: u16 = 0x3f8;

impl VmDeviceArgs {
    /// Whether the VM owns anything that needs the host platform.
    pub(crate) fn any(&self) -> bool {
        !self.devices.is_empty() || self.mock_dma
    }
}

/// Reads every region of guest RAM in GPA order, in pieces of `piece` bytes (a region's last
/// piece may be shorter): `region(gpa, size)` before each region, `each(bytes)` per piece.
fn read_ram(
    memory: &livemig_kvm::VmMemory,
    piece: usize,
    mut region: impl FnMut(u64, u64) -> Result<()>,
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    use livemig::memory::GuestMemory;
    let mut buf = vec![0u8; piece];
    for r in memory.regions() {
        region(r.gpa, r.size)?;
        let mut at = 0;
        while at < r.size {
            let n = (r.size - at).min(piece as u64) as usize;
            memory
                .read(r.gpa + at, &mut buf[..n])
                .map_err(|e| anyhow::anyhow!("reading guest RAM at {:#x}: {e}", r.gpa + at))?;
            each(&buf[..n])?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Writes guest RAM to `path` (see `VmDeviceArgs::dump_ram`).
pub(crate) fn dump_ram(memory: &livemig_kvm::VmMemory, path: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let w = std::cell::RefCell::new(std::io::BufWriter::new(f));
    read_ram(
        memory,
        1 << 20,
        |gpa, size| {
            let mut w = w.borrow_mut();
            w.write_all(&gpa.to_le_bytes())?;
            Ok(w.write_all(&size.to_le_bytes())?)
        },
        |bytes| Ok(w.borrow_mut().write_all(bytes)?),
    )?;
    w.into_inner()
        .flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the digest of guest RAM to `path`: one CRC-64/NVME per 2 MiB (the last piece of a
/// region may be shorter), little-endian u64, the regions in GPA order (`vm incoming
/// --ram-digest`; `cargo xtask bench-peer` digests the source's RAM and QEMU's the same way).
pub(crate) fn ram_digest(memory: &livemig_kvm::VmMemory, path: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    let mut out = Vec::new();
    read_ram(
        memory,
        2 << 20,
        |_, _| Ok(()),
        |bytes| {
            let c = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes);
            out.extend_from_slice(&c.to_le_bytes());
            Ok(())
        },
    )?;
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// The destination's vCPU start with guest RAM written to a file first (`--dump-ram`).
pub(crate) struct DumpThenStart {
    pub(crate) inner: Box<dyn livemig::platform::VcpuStart>,
    pub(crate) memory: std::sync::Arc<livemig_kvm::VmMemory>,
    pub(crate) path: std::path::PathBuf,
}

impl livemig::platform::VcpuStart for DumpThenStart {
    fn start(&mut self) -> Result<(), String> {
        // No vCPU has entered yet; a failed dump leaves the VM stopped here (the engine then
        // answers Failed, so the source resumes).
        dump_ram(&self.memory, &self.path)
            .map_err(|e| format!("--dump-ram before the vCPUs start (none entered): {e:#}"))?;
        self.inner.start()
    }
    fn entries(&self) -> Option<Vec<u64>> {
        self.inner.entries()
    }
}

impl VmArgs {
    pub(crate) fn config(&self) -> TestVmConfig {
        let mut ram = vec![(0, self.ram)];
        if self.high_ram > 0 {
            ram.push((4 << 30, self.high_ram));
        }
        TestVmConfig {
            vcpus: self.vcpus,
            pages: self.pages,
            rate: self.rate,
            ram,
            backing: match (&self.mem_file, self.memfd) {
                (Some(p), _) => Backing::File(p.clone()),
                (None, true) => Backing::Memfd,
                (None, false) => Backing::Anonymous,
            },
            dirty: self.dirty,
            cpuid_clear: if self.x_no_xsave {
                vec![(1, 0, 2, 1 << 26)]
            } else {
                Vec::new()
            },
            cpuid_set: Vec::new(),
            idle: self.idle,
            uart: None,
            ap_start: match self.ap_start {
                ApStartArg::Sipi => livemig_kvm::ApStart::Sipi,
                ApStartArg::Direct => livemig_kvm::ApStart::Direct,
            },
        }
    }

    /// The same VM with the destination's flags (dirty logging is a source choice).
    pub(crate) fn to_flags(&self) -> Vec<String> {
        let mut f = vec![
            format!("--vcpus={}", self.vcpus),
            format!("--pages={}", self.pages),
            format!("--rate={}", self.rate),
            format!("--ram={}", self.ram),
            format!("--high-ram={}", self.high_ram),
        ];
        if self.idle {
            f.push("--idle".into());
        }
        if self.x_drop_vcpu_state {
            f.push("--x-drop-vcpu-state".into());
        }
        f
    }
}

#[derive(Args, Clone, Debug)]
pub struct VmMigArgs {
    /// Downtime limit.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    pub(crate) downtime: Duration,
    /// Stop-and-copy after this many rounds regardless.
    #[arg(long, default_value_t = 30)]
    pub(crate) max_rounds: u32,
    /// Throttle the vCPUs when pre-copy does not converge (QEMU's auto-converge steps).
    #[arg(long)]
    pub(crate) auto_converge: bool,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub(crate) warmup: Duration,
    /// Never stop the VM longer than this (see `livemig simulate --help`).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) hard_deadline: Option<Duration>,
    /// Connections that carry pages: 1 (one connection carries everything) or 2 to 64 page
    /// channels beside the main connection (QEMU's multifd layout).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) channels: u32,
    /// Pace the migration to this bandwidth (e.g. 100MiB/s; 0: as fast as TCP goes), as
    /// QEMU's `max-bandwidth`: the main connection is paced to it and each page channel to
    /// its share.
    #[arg(long, default_value = "0", value_parser = crate::args::parse_bandwidth)]
    pub(crate) max_bandwidth: u64,
    /// Negative control (source): after the warm-up the vCPUs are told to triple-fault (the
    /// guest's SHUTDOWN command); the first KVM_EXIT_SHUTDOWN stops the VM before it migrates,
    /// and `vm migrate` must report that rather than a clean migration.
    #[arg(long, hide = true)]
    pub(crate) x_guest_shutdown: bool,
    /// Pause the VM after the warm-up and migrate it paused (as QEMU's `-S` or `stop`): its
    /// vCPUs stay parked on the source throughout and start on the destination.
    #[arg(long)]
    pub(crate) paused: bool,
    /// What to do when the destination cannot say whether the VM runs there (it answered
    /// Undecided, or its answer was lost after End): `ask` the operator on stdin (`resume`
    /// or `discard`, within the phase deadline; no answer discards), `resume` the source
    /// (only when the destination is known never to start the VM), or `discard` it.
    #[arg(long, value_enum, default_value_t = Undecided::Ask)]
    pub(crate) undecided: Undecided,
}

/// The operator's choice for a source left stopped by an undecided handover.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undecided {
    /// Ask on stdin.
    Ask,
    /// Run the VM here again.
    Resume,
    /// Give the VM up here.
    Discard,
}

impl VmMigArgs {
    pub(crate) fn config(&self) -> SourceConfig {
        SourceConfig {
            downtime_limit: self.downtime,
            max_rounds: self.max_rounds,
            auto_converge: self.auto_converge.then(AutoConverge::default),
            hard_deadline: self.hard_deadline,
            channels: self.channels,
            ..SourceConfig::default()
        }
    }
}

/// What the guest said when asked to verify.
#[derive(Serialize, Debug)]
pub struct Verification {
    /// Every page of every vCPU's working set held what the guest last wrote.
    pub ok: bool,
    /// Pages checked.
    pub pages: u64,
    /// Failures the guest reported (lost pages, with their addresses).
    pub failures: Vec<String>,
    /// Steps (pages written since boot) per vCPU when it verified.
    pub steps: Vec<u64>,
}

pub fn verify(vm: &TestVm) -> Result<Verification> {
    let f = vm
        .verify(Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Verification {
        ok: f.is_empty(),
        pages: u64::from(vm.cfg.vcpus) * u64::from(vm.cfg.pages),
        failures: f
            .iter()
            .map(|e| match e {
                GuestEvent::VerifyFail {
                    cpu,
                    gpa,
                    expected,
                    found,
                    reason,
                    ..
                } => format!(
                    "vCPU {cpu}: page {gpa:#x} lost (holds generation {found}, expected {expected}: {reason:?})"
                ),
                other => format!("{other:?}"),
            })
            .collect(),
        steps: vm.monitor.steps(),
    })
}

/// The negative controls `--x-drop-vcpu-state` and `--x-drop-device-state`: a destination
/// device whose record is taken and dropped. It walks the states the engine asks for, but on
/// leaving RESUMING the inner device is reset instead of restoring, so it starts with whatever
/// it had: for the vCPU state device of a fresh destination VM the reset state, for a fresh
/// mtty its power-on registers and an empty FIFO (a VFIO reset moves an mtty in RESUMING back
/// to RUNNING without loading anything).
pub(crate) struct DropRecord {
    pub(crate) inner: Box<dyn livemig::device::MigDevice>,
    pub(crate) state: livemig_vfio::MigrationState,
}

impl livemig::device::MigDevice for DropRecord {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn compat(&self) -> livemig::device::DeviceCompat {
        self.inner.compat()
    }
    fn state(&self) -> Result<livemig_vfio::MigrationState, livemig_vfio::Error> {
        Ok(self.state)
    }
    fn transition(
        &mut self,
        target: livemig_vfio::MigrationState,
    ) -> Result<(), livemig_vfio::Error> {
        use livemig_vfio::MigrationState as S;
        if self.state == S::Resuming && target != S::Resuming {
            self.inner.reset()?;
        } else if target == S::Resuming {
            self.inner.transition(target)?;
        }
        self.state = target;
        Ok(())
    }
    fn precopy(
        &mut self,
        sink: &mut Vec<u8>,
        max: u64,
    ) -> Result<livemig_vfio::data::PrecopyRound, livemig_vfio::Error> {
        self.inner.precopy(sink, max)
    }
    fn precopy_pending(&mut self) -> Result<u64, livemig_vfio::Error> {
        self.inner.precopy_pending()
    }
    fn stop_copy_size(&self) -> Result<u64, livemig_vfio::Error> {
        self.inner.stop_copy_size()
    }
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, livemig_vfio::Error> {
        self.inner.save(sink)
    }
    fn load(&mut self, bytes: &[u8]) -> Result<(), livemig_vfio::Error> {
        self.inner.load(bytes)
    }
    fn reset(&mut self) -> Result<(), livemig_vfio::Error> {
        self.state = livemig_vfio::MigrationState::Running;
        self.inner.reset()
    }
}

/// The vCPUs with a flag set when the engine pauses them (stop-and-copy begins), for
/// `--x-drop-final-harvest` on `vm migrate`.
pub(crate) struct FlagOnPause {
    pub(crate) inner: Box<dyn livemig::engine::Vcpus>,
    pub(crate) flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl livemig::engine::Vcpus for FlagOnPause {
    fn pause(&mut self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.pause();
    }
    fn resume(&mut self) {
        self.inner.resume();
    }
    fn set_throttle(&mut self, percent: u8) -> bool {
        self.inner.set_throttle(percent)
    }
    fn entries(&self) -> Option<Vec<u64>> {
        self.inner.entries()
    }
}
