//! The multi-device P2P quiesce order on real devices: a migration through the engine (in this
//! process, over loopback TCP) of two mtty devices (both report `VFIO_MIGRATION_P2P`), where
//! every transition the engine asks for is checked against the *kernel's* states of the other
//! devices on that side, read back at that moment:
//! - source: no device is stopped (STOP or STOP_COPY) while another still reads RUNNING or
//!   PRE_COPY (it could still issue peer-to-peer DMA into the stopped one);
//! - destination: no device runs (RUNNING) while another still reads a state below
//!   RUNNING_P2P (it could receive peer-to-peer DMA before it is ready).
//!
//! The negative control applies the same checker to the old device-by-device order and must
//! find the violation.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail, ensure};
use livemig::device::{DeviceCompat, MigDevice};
use livemig::engine::{Destination, Source, SourceConfig};
use livemig::transport::TcpChannel;
use livemig_host::{Host, HostConfig, Workload};
use livemig_kvm::{Backing, VmMemory};
use livemig_vfio::{Error as VfioError, MigrationDevice, MigrationState, VfioDevice};

use crate::harness::{Outcome, Runner};
use crate::trace;
use crate::util::{uuid, write_sysfs};

const MTTY_TYPE: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2";

struct Mdev(String);

impl Mdev {
    fn create() -> Result<Mdev> {
        let id = uuid()?;
        write_sysfs(Path::new(MTTY_TYPE).join("create"), &id)?;
        Ok(Mdev(id))
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        let _ = write_sysfs(format!("/sys/bus/mdev/devices/{}/remove", self.0), "1");
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Source,
    Destination,
}

/// The rule: may device `me` go to `target` while the others are in `others`?
fn violation(
    side: Side,
    me: usize,
    target: MigrationState,
    others: &[(usize, MigrationState)],
) -> Option<String> {
    use MigrationState as S;
    let bad: Vec<String> = match (side, target) {
        (Side::Source, S::Stop | S::StopCopy) => others
            .iter()
            .filter(|(_, s)| matches!(s, S::Running | S::PreCopy))
            .map(|(i, s)| format!("device {i} in {s}"))
            .collect(),
        (Side::Destination, S::Running) => others
            .iter()
            .filter(|(_, s)| !matches!(s, S::RunningP2p | S::Running))
            .map(|(i, s)| format!("device {i} in {s}"))
            .collect(),
        _ => Vec::new(),
    };
    (!bad.is_empty()).then(|| format!("{side:?}: device {me} to {target} while {}", bad.join(", ")))
}

type Log = Arc<Mutex<Vec<String>>>;

/// A device that checks the rule against the kernel's states of its peers before each arc.
struct Watched {
    inner: Box<dyn MigDevice>,
    me: usize,
    side: Side,
    peers: Arc<Vec<VfioDevice>>,
    log: Log,
    violations: Log,
}

impl Watched {
    fn check(&self, target: MigrationState) {
        let others: Vec<(usize, MigrationState)> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.me)
            .filter_map(|(i, d)| Some((i, d.migration_state().ok()?)))
            .collect();
        if let Ok(mut l) = self.log.lock() {
            l.push(format!(
                "{:?} dev{} -> {target} (others {others:?})",
                self.side, self.me
            ));
        }
        if let Some(v) = violation(self.side, self.me, target, &others)
            && let Ok(mut l) = self.violations.lock()
        {
            l.push(v);
        }
    }
}

impl MigDevice for Watched {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn compat(&self) -> DeviceCompat {
        self.inner.compat()
    }
    fn state(&self) -> Result<MigrationState, VfioError> {
        self.inner.state()
    }
    fn transition(&mut self, target: MigrationState) -> Result<(), VfioError> {
        self.check(target);
        self.inner.transition(target)
    }
    fn precopy(
        &mut self,
        sink: &mut Vec<u8>,
        max: u64,
    ) -> Result<livemig_vfio::data::PrecopyRound, VfioError> {
        self.inner.precopy(sink, max)
    }
    fn precopy_pending(&mut self) -> Result<u64, VfioError> {
        self.inner.precopy_pending()
    }
    fn precopy_info(&mut self) -> Result<livemig_vfio::data::PrecopyInfo, VfioError> {
        self.inner.precopy_info()
    }
    fn enable_precopy_info_v2(&mut self) -> Result<livemig_vfio::PrecopyInfoV2, VfioError> {
        self.inner.enable_precopy_info_v2()
    }
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        self.inner.stop_copy_size()
    }
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
        self.inner.save(sink)
    }
    fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError> {
        self.inner.load(bytes)
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        self.inner.reset()
    }
}

fn host(devs: &[Mdev]) -> Result<(Host, Vec<VfioDevice>)> {
    let mem = Arc::new(
        VmMemory::new(&[(16 << 20, 8 << 20)], Backing::Memfd)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let cfg = HostConfig {
        devices: devs.iter().map(|m| m.0.clone()).collect(),
        mock_dma: false,
        ..Default::default()
    };
    let h = Host::open(&cfg, mem).map_err(|e| anyhow::anyhow!("{}", livemig::error::chain(&e)))?;
    let peers = h
        .devices()
        .iter()
        .map(|d| d.duplicate())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((h, peers))
}

fn migrate_watched() -> Result<(Vec<String>, Vec<String>)> {
    let (sd, dd) = (
        [Mdev::create()?, Mdev::create()?],
        [Mdev::create()?, Mdev::create()?],
    );
    let log: Log = Arc::default();
    let violations: Log = Arc::default();
    let (mut sh, speers) = host(&sd)?;
    let (mut dh, dpeers) = host(&dd)?;
    let (speers, dpeers) = (Arc::new(speers), Arc::new(dpeers));
    let workload = Workload::idle();
    let mut sp = sh.source(&workload).map_err(|e| anyhow::anyhow!("{e}"))?;
    sp.devices = std::mem::take(&mut sp.devices)
        .into_iter()
        .enumerate()
        .map(|(i, d)| livemig::engine::SourceDevice {
            dev: Box::new(Watched {
                inner: d.dev,
                me: i,
                side: Side::Source,
                peers: speers.clone(),
                log: log.clone(),
                violations: violations.clone(),
            }),
            ..d
        })
        .collect();
    let mut dp = dh.destination().map_err(|e| anyhow::anyhow!("{e}"))?;
    let devices = std::mem::take(&mut dp.devices);
    dp.devices = devices
        .into_iter()
        .enumerate()
        .map(|(i, inner)| -> Box<dyn MigDevice> {
            Box::new(Watched {
                inner,
                me: i,
                side: Side::Destination,
                peers: dpeers.clone(),
                log: log.clone(),
                violations: violations.clone(),
            })
        })
        .collect();
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let dest_thread = std::thread::spawn(move || -> Result<()> {
        let (s, _) = l.accept()?;
        let back = s.try_clone()?;
        let mut dest = Destination::new(dp);
        dest.receive(s, back)
            .map_err(|e| anyhow::anyhow!("destination: {}", e.chain()))?;
        Ok(())
    });
    let mut source = Source::new(sp, SourceConfig::default());
    let r = source.migrate_over(TcpChannel(TcpStream::connect(addr)?));
    let d = dest_thread
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
    r.map_err(|e| anyhow::anyhow!("source: {}", e.chain()))?;
    d?;
    drop(source);
    drop((sh, dh));
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    let v = violations.lock().map(|l| l.clone()).unwrap_or_default();
    Ok((log, v))
}

pub fn run(r: &mut Runner) {
    r.case("e2e.p2p_quiesce_order_mtty", || {
        let (log, violations) = migrate_watched()?;
        for l in &log {
            trace!("{l}");
        }
        ensure!(violations.is_empty(), "P2P order violated: {violations:?}");
        // The checker saw the arcs that matter on both sides.
        ensure!(
            log.iter()
                .any(|l| l.starts_with("Source") && l.contains("-> STOP_COPY")),
            "no source STOP_COPY arc was observed"
        );
        ensure!(
            log.iter()
                .any(|l| l.starts_with("Destination") && l.contains("-> RUNNING_P2P")),
            "no destination RUNNING_P2P arc was observed"
        );
        Ok(Outcome::Pass)
    });

    r.case("e2e.p2p_negative_control_device_by_device", || {
        // The old order on real devices: device 0 to STOP_COPY while device 1 still runs.
        let devs = [Mdev::create()?, Mdev::create()?];
        let (h, peers) = host(&devs)?;
        let mut d0 = h.devices()[0]
            .duplicate()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let others: Vec<(usize, MigrationState)> = vec![(1, peers[1].migration_state()?)];
        let v = violation(Side::Source, 0, MigrationState::StopCopy, &others);
        d0.set_migration_state(MigrationState::Stop)?;
        d0.set_migration_state(MigrationState::Running)?;
        drop((d0, peers, h));
        match v {
            Some(v) => {
                trace!("negative control failed as expected: {v}");
                Ok(Outcome::Pass)
            }
            None => bail!("the checker accepted a device stopped beside a running peer"),
        }
    });
}
