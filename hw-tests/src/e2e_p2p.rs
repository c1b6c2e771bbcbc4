//! The multi-device P2P quiesce order on real devices: a migration through the engine (in this
//! process, over loopback TCP) of two mtty devices (both report `VFIO_MIGRATION_P2P`), where
//! every transition the engine asks for is checked against the *kernel's* states of the other
//! devices on that side, read back at that moment:
//! - source: no device is stopped (STOP or STOP_COPY) while another still reads RUNNING or
//!   PRE_COPY (it could still issue peer-to-peer DMA into the stopped one);
//! - destination: no device runs (RUNNING) while another still reads a state below
//!   RUNNING_P2P (it could receive peer-to-peer DMA before it is ready).
//!
//! A peer whose state cannot be read is a violation (the rule cannot be checked), and the
//! positive case requires that comparisons happened on both sides. The negative control runs
//! the same migration with the last device's P2P flag hidden from the engine (a wrapper), so
//! the engine stops and starts the others beside it device by device, and the same watcher
//! must report the violation. The watcher's logic runs on the host too, in this file's unit
//! tests, over devices whose states live in memory.

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use anyhow::{Result, ensure};
use livemig::device::{DeviceCompat, MigDevice};
use livemig::engine::{Destination, Source, SourceConfig};
use livemig::transport::TcpChannel;
use livemig_host::{Host, HostConfig, Workload};
use livemig_kvm::{Backing, VmMemory};
use livemig_vfio::{
    Error as VfioError, MigrationDevice, MigrationFlags, MigrationState, VfioDevice,
};

use crate::harness::{Outcome, Runner};
use crate::trace;

use crate::util::Mdev;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Source,
    Destination,
}

/// Whether the rule constrains a transition of one device to `target` on `side`.
fn rule_applies(side: Side, target: MigrationState) -> bool {
    use MigrationState as S;
    matches!(
        (side, target),
        (Side::Source, S::Stop | S::StopCopy) | (Side::Destination, S::Running)
    )
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

/// A device's migration state as its driver reports it now.
trait PeerState: Send + Sync {
    fn read_state(&self) -> Result<MigrationState, String>;
}

impl PeerState for VfioDevice {
    fn read_state(&self) -> Result<MigrationState, String> {
        self.migration_state().map_err(|e| e.to_string())
    }
}

/// What the watchers saw, both sides together.
#[derive(Debug, Default, Clone)]
struct Watch {
    /// Every transition asked for, with the peers' states.
    log: Vec<String>,
    /// Rule violations and peers that could not be read.
    violations: Vec<String>,
    /// Peer states compared under the rule, per side.
    source_comparisons: usize,
    destination_comparisons: usize,
}

type Shared = Arc<Mutex<Watch>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, Watch> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device that checks the rule against the driver's states of its peers before each arc.
struct Watched {
    inner: Box<dyn MigDevice>,
    me: usize,
    side: Side,
    peers: Arc<Vec<Box<dyn PeerState>>>,
    watch: Shared,
    /// Negative control: the engine is told this device has no P2P state, so it skips the
    /// quiescent step for it (the device-by-device order).
    hide_p2p: bool,
}

impl Watched {
    fn check(&self, target: MigrationState) {
        let mut others = Vec::new();
        let mut unreadable = Vec::new();
        for (i, d) in self.peers.iter().enumerate().filter(|(i, _)| *i != self.me) {
            match d.read_state() {
                Ok(s) => others.push((i, s)),
                Err(e) => unreadable.push(format!(
                    "{:?}: device {} to {target}: the state of device {i} could not be read ({e})",
                    self.side, self.me
                )),
            }
        }
        let mut w = lock(&self.watch);
        w.log.push(format!(
            "{:?} dev{} -> {target} (others {others:?})",
            self.side, self.me
        ));
        if rule_applies(self.side, target) {
            match self.side {
                Side::Source => w.source_comparisons += others.len(),
                Side::Destination => w.destination_comparisons += others.len(),
            }
        }
        w.violations.extend(unreadable);
        if let Some(v) = violation(self.side, self.me, target, &others) {
            w.violations.push(v);
        }
    }
}

impl MigDevice for Watched {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn compat(&self) -> DeviceCompat {
        let mut c = self.inner.compat();
        if self.hide_p2p {
            c.migration_flags &= !(MigrationFlags::P2P.bits() as u32);
        }
        c
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

/// Wraps one side's devices in watchers over `peers` (the same devices, read through the
/// driver), hiding P2P from the engine on device `hide_p2p`.
fn watch_all(
    devices: Vec<Box<dyn MigDevice>>,
    side: Side,
    peers: Arc<Vec<Box<dyn PeerState>>>,
    watch: &Shared,
    hide_p2p: Option<usize>,
) -> Vec<Box<dyn MigDevice>> {
    devices
        .into_iter()
        .enumerate()
        .map(|(i, inner)| -> Box<dyn MigDevice> {
            Box::new(Watched {
                inner,
                me: i,
                side,
                peers: Arc::clone(&peers),
                watch: Arc::clone(watch),
                hide_p2p: hide_p2p == Some(i),
            })
        })
        .collect()
}

/// The checks of the positive case: no violation, and the rule compared peers on both sides.
fn verify_order(w: &Watch) -> Result<()> {
    ensure!(
        w.violations.is_empty(),
        "P2P order violated: {:?}",
        w.violations
    );
    ensure!(
        w.source_comparisons > 0 && w.destination_comparisons > 0,
        "no peer state was compared (source {}, destination {}): the check saw nothing",
        w.source_comparisons,
        w.destination_comparisons
    );
    Ok(())
}

/// The checks of the negative control: the device-by-device order is reported on both sides.
fn verify_broken_order(w: &Watch) -> Result<()> {
    for side in ["Source: ", "Destination: "] {
        ensure!(
            w.violations
                .iter()
                .any(|v| v.starts_with(side) && v.contains(" while device ")),
            "the watcher missed the {side}device-by-device order: {:?}\n{:#?}",
            w.violations,
            w.log
        );
    }
    Ok(())
}

fn host(devs: &[Mdev]) -> Result<(Host, Vec<VfioDevice>)> {
    let mem = Arc::new(
        VmMemory::new(&[(16 << 20, 8 << 20)], Backing::Memfd)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let cfg = HostConfig {
        devices: devs.iter().map(|m| m.uuid.clone()).collect(),
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

fn peers_of(devs: Vec<VfioDevice>) -> Arc<Vec<Box<dyn PeerState>>> {
    Arc::new(
        devs.into_iter()
            .map(|d| Box::new(d) as Box<dyn PeerState>)
            .collect(),
    )
}

/// The migration of two mtty devices with every transition watched; `hide_p2p`: the device
/// whose P2P flag the engine does not see (the negative control).
fn migrate_watched(hide_p2p: Option<usize>) -> Result<Watch> {
    let (sd, dd) = (
        [Mdev::create("mtty-2")?, Mdev::create("mtty-2")?],
        [Mdev::create("mtty-2")?, Mdev::create("mtty-2")?],
    );
    let watch: Shared = Arc::default();
    let (mut sh, speers) = host(&sd)?;
    let (mut dh, dpeers) = host(&dd)?;
    let (speers, dpeers) = (peers_of(speers), peers_of(dpeers));
    let workload = Workload::idle();
    let mut sp = sh.source(&workload).map_err(|e| anyhow::anyhow!("{e}"))?;
    let devices = std::mem::take(&mut sp.devices);
    let (devs, rest): (Vec<_>, Vec<_>) = devices
        .into_iter()
        .map(|d| (d.dev, (d.iommu_dirty, d.dma_log, d.does_dma)))
        .unzip();
    sp.devices = watch_all(devs, Side::Source, speers, &watch, hide_p2p)
        .into_iter()
        .zip(rest)
        .map(
            |(dev, (iommu_dirty, dma_log, does_dma))| livemig::engine::SourceDevice {
                dev,
                iommu_dirty,
                dma_log,
                does_dma,
            },
        )
        .collect();
    let mut dp = dh.destination().map_err(|e| anyhow::anyhow!("{e}"))?;
    let devices = std::mem::take(&mut dp.devices);
    dp.devices = watch_all(devices, Side::Destination, dpeers, &watch, hide_p2p);
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
    let w = lock(&watch).clone();
    for l in &w.log {
        trace!("{l}");
    }
    Ok(w)
}

pub fn run(r: &mut Runner) {
    r.case("e2e.p2p_quiesce_order_mtty", || {
        let w = migrate_watched(None)?;
        verify_order(&w)?;
        // The checker saw the arcs that matter on both sides.
        ensure!(
            w.log
                .iter()
                .any(|l| l.starts_with("Source") && l.contains("-> STOP_COPY")),
            "no source STOP_COPY arc was observed"
        );
        ensure!(
            w.log
                .iter()
                .any(|l| l.starts_with("Destination") && l.contains("-> RUNNING_P2P")),
            "no destination RUNNING_P2P arc was observed"
        );
        trace!(
            "peer states compared: source {}, destination {}",
            w.source_comparisons, w.destination_comparisons
        );
        Ok(Outcome::Pass)
    });

    r.case("e2e.p2p_negative_control_device_by_device", || {
        // The engine running the old order on real devices: device 1's P2P flag hidden from
        // it, device 0 goes to STOP_COPY while device 1 still reads PRE_COPY (source) and to
        // RUNNING while device 1 still reads STOP (destination). The migration itself works.
        let w = migrate_watched(Some(1))?;
        verify_broken_order(&w)?;
        trace!("negative control failed as expected: {:?}", w.violations);
        Ok(Outcome::Pass)
    });
}

#[cfg(test)]
mod tests {
    //! The watcher on the host: the real engine migrates devices whose migration state lives
    //! in memory (read back by the watchers as the driver's would be).
    use super::*;
    use livemig::bitmap::PageBitmap;
    use livemig::engine::{DestinationPlatform, SourceDevice, SourcePlatform};
    use livemig::link::{Cut, LinkConfig, migrate_local};
    use livemig::platform::Vcpus;
    use livemig::tracker::{BoxError, DirtyTracker};
    use livemig_vfio::PrecopyInfo;
    use livemig_vfio::data::PrecopyRound;
    use std::time::Duration;

    type State = Arc<Mutex<MigrationState>>;

    /// A P2P-capable device (STOP_COPY, PRE_COPY, P2P) whose state is `state`.
    struct Fake {
        state: State,
        saved: Vec<u8>,
    }

    const FLAGS: MigrationFlags = MigrationFlags::STOP_COPY
        .union(MigrationFlags::PRE_COPY)
        .union(MigrationFlags::P2P);

    impl MigDevice for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn compat(&self) -> DeviceCompat {
            DeviceCompat {
                identity: "fake".into(),
                compat: Vec::new(),
                migration_flags: FLAGS.bits() as u32,
                dma_logging: false,
            }
        }
        fn state(&self) -> Result<MigrationState, VfioError> {
            Ok(*self.state.lock().unwrap())
        }
        fn transition(&mut self, target: MigrationState) -> Result<(), VfioError> {
            *self.state.lock().unwrap() = target;
            Ok(())
        }
        fn precopy(&mut self, _: &mut Vec<u8>, _: u64) -> Result<PrecopyRound, VfioError> {
            Ok(PrecopyRound {
                info: PrecopyInfo::default(),
                bytes: 0,
                drained: true,
            })
        }
        fn precopy_pending(&mut self) -> Result<u64, VfioError> {
            Ok(0)
        }
        fn stop_copy_size(&self) -> Result<u64, VfioError> {
            Ok(4)
        }
        fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
            sink.extend_from_slice(b"save");
            Ok(4)
        }
        fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError> {
            self.saved.extend_from_slice(bytes);
            Ok(())
        }
        fn reset(&mut self) -> Result<(), VfioError> {
            *self.state.lock().unwrap() = MigrationState::Running;
            Ok(())
        }
    }

    /// Reads a fake's state, or fails as a driver read can.
    struct Peer(State, bool);

    impl PeerState for Peer {
        fn read_state(&self) -> Result<MigrationState, String> {
            if self.1 {
                return Err("VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE) failed: EIO".into());
            }
            Ok(*self.0.lock().unwrap())
        }
    }

    struct Quiet;

    impl DirtyTracker for Quiet {
        fn name(&self) -> String {
            "quiet".into()
        }
        fn start(&mut self) -> Result<(), BoxError> {
            Ok(())
        }
        fn harvest(&mut self, _: &mut PageBitmap) -> Result<u64, BoxError> {
            Ok(0)
        }
        fn stop(&mut self) -> Result<(), BoxError> {
            Ok(())
        }
    }

    struct NoVcpus;

    impl Vcpus for NoVcpus {
        fn pause(&mut self) {}
        fn resume(&mut self) {}
    }

    /// Two fakes per side, watched; `unreadable`: the peer read of device 1 fails.
    fn side(
        side: Side,
        watch: &Shared,
        hide_p2p: Option<usize>,
        unreadable: bool,
    ) -> Vec<Box<dyn MigDevice>> {
        let states: Vec<State> = (0..2)
            .map(|_| Arc::new(Mutex::new(MigrationState::Running)))
            .collect();
        let peers: Vec<Box<dyn PeerState>> = states
            .iter()
            .enumerate()
            .map(|(i, s)| Box::new(Peer(Arc::clone(s), unreadable && i == 1)) as _)
            .collect();
        let devices = states
            .into_iter()
            .map(|state| {
                Box::new(Fake {
                    state,
                    saved: Vec::new(),
                }) as Box<dyn MigDevice>
            })
            .collect();
        watch_all(devices, side, Arc::new(peers), watch, hide_p2p)
    }

    fn memory() -> Arc<VmMemory> {
        Arc::new(VmMemory::new(&[(0, 64 << 10)], Backing::Memfd).expect("a memfd"))
    }

    fn migrate(hide_p2p: Option<usize>, unreadable: bool) -> Watch {
        let watch: Shared = Arc::default();
        let source = SourcePlatform {
            memory: memory(),
            devices: side(Side::Source, &watch, hide_p2p, unreadable)
                .into_iter()
                .map(|dev| SourceDevice {
                    dev,
                    iommu_dirty: Ok(()),
                    dma_log: None,
                    does_dma: true,
                })
                .collect(),
            iommu: Some(Box::new(Quiet)),
            cpu: Box::new(Quiet),
            vcpus: Box::new(NoVcpus),
            page_size_mask: 0x1000,
            viommu: None,
            dma_endpoints: Vec::new(),
        };
        let dest = DestinationPlatform {
            memory: memory(),
            devices: side(Side::Destination, &watch, hide_p2p, unreadable),
            iommu_dirty: vec![true; 2],
            page_size_mask: 0x1000,
            vcpus: None,
        };
        let mut s = Source::new(source, SourceConfig::default());
        let mut d = Destination::new(dest);
        let link = LinkConfig {
            bandwidth: 0,
            latency: Duration::ZERO,
        };
        let (r, dr) = migrate_local(&mut s, &mut d, link, &Cut::new());
        r.unwrap_or_else(|e| panic!("source: {}", e.chain()));
        dr.unwrap_or_else(|e| panic!("destination: {}", e.chain()));
        lock(&watch).clone()
    }

    #[test]
    fn the_engines_p2p_order_passes_and_peers_were_compared() {
        let w = migrate(None, false);
        verify_order(&w).unwrap();
        // Two devices, one peer each: every STOP_COPY and the final STOP (source) and every
        // RUNNING (destination) compared one peer state.
        assert_eq!(
            (w.source_comparisons, w.destination_comparisons),
            (4, 2),
            "{:#?}",
            w.log
        );
    }

    /// Negative control: the engine, told device 1 has no P2P, stops and starts device 0
    /// beside it; the watcher reports both sides, and the positive check fails on it.
    #[test]
    fn negative_control_the_device_by_device_order_through_the_engine_is_caught() {
        let w = migrate(Some(1), false);
        verify_broken_order(&w).unwrap();
        assert!(
            w.violations
                .contains(&"Source: device 0 to STOP_COPY while device 1 in PRE_COPY".into()),
            "{:?}",
            w.violations
        );
        assert!(
            w.violations
                .contains(&"Destination: device 0 to RUNNING while device 1 in STOP".into()),
            "{:?}",
            w.violations
        );
        let e = verify_order(&w).unwrap_err().to_string();
        assert!(e.contains("P2P order violated"), "{e}");
        // And the control's own check fails on the right order.
        let e = verify_broken_order(&migrate(None, false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the watcher missed"), "{e}");
    }

    /// A peer whose state cannot be read is a violation naming the reason, not skipped.
    #[test]
    fn an_unreadable_peer_state_is_a_violation() {
        let w = migrate(None, true);
        assert!(
            w.violations
                .iter()
                .any(|v| v.starts_with("Source: device 0 to ")
                    && v.contains("the state of device 1 could not be read")
                    && v.contains("EIO")),
            "{:?}",
            w.violations
        );
        let e = verify_order(&w).unwrap_err().to_string();
        assert!(e.contains("could not be read"), "{e}");
    }

    /// With no peer compared the positive check fails even without violations.
    #[test]
    fn no_comparison_fails_the_positive_check() {
        let e = verify_order(&Watch::default()).unwrap_err().to_string();
        assert!(e.contains("no peer state was compared"), "{e}");
    }
}
