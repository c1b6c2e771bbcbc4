//! The P2P quiesce order: on the source every P2P-capable device reaches RUNNING_P2P (or
//! PRE_COPY_P2P) before any device leaves the P2P states for STOP_COPY; on the destination every
//! P2P-capable device reaches RUNNING_P2P before any reaches RUNNING; devices without P2P keep
//! the direct path. Recorded with devices that log every arc the engine asks for.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{NoVcpus, Quiet, Ram};
use livemig::bitmap::PageBitmap;
use livemig::device::{DeviceCompat, MigDevice};
use livemig::engine::{
    Destination, DestinationPlatform, Source, SourceConfig, SourceDevice, SourcePlatform,
};
use livemig::link::{Cut, LinkConfig, migrate_local};
use livemig::tracker::{BoxError, DirtyTracker};
use livemig_vfio::PrecopyInfo;
use livemig_vfio::data::PrecopyRound;
use livemig_vfio::{Error as VfioError, MigrationFlags, MigrationState as S};

type Arcs = Vec<(String, S)>;
type Log = Arc<Mutex<Arcs>>;

/// A device that accepts every arc and logs the targets it was asked for.
struct Recorder {
    name: String,
    flags: MigrationFlags,
    state: S,
    log: Log,
    saved: Vec<u8>,
}

impl Recorder {
    fn new(name: &str, flags: MigrationFlags, log: &Log) -> Recorder {
        Recorder {
            name: name.into(),
            flags,
            state: S::Running,
            log: log.clone(),
            saved: Vec::new(),
        }
    }
}

impl MigDevice for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn compat(&self) -> DeviceCompat {
        DeviceCompat {
            identity: format!("recorder {}", self.name),
            compat: Vec::new(),
            migration_flags: self.flags.bits() as u32,
            dma_logging: false,
        }
    }
    fn state(&self) -> Result<S, VfioError> {
        Ok(self.state)
    }
    fn transition(&mut self, target: S) -> Result<(), VfioError> {
        if matches!(target, S::RunningP2p | S::PreCopyP2p)
            && !self.flags.contains(MigrationFlags::P2P)
        {
            return Err(VfioError::StateNotSupported {
                state: target,
                missing: MigrationFlags::P2P,
            });
        }
        self.log.lock().unwrap().push((self.name.clone(), target));
        self.state = target;
        Ok(())
    }
    fn precopy(&mut self, _sink: &mut Vec<u8>, _max: u64) -> Result<PrecopyRound, VfioError> {
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
        self.state = S::Running;
        Ok(())
    }
}

const P2P: MigrationFlags = MigrationFlags::STOP_COPY.union(MigrationFlags::P2P);
const P2P_PRE: MigrationFlags = P2P.union(MigrationFlags::PRE_COPY);

fn devices(log: &Log) -> Vec<Box<dyn MigDevice>> {
    vec![
        Box::new(Recorder::new("a", P2P, log)),
        Box::new(Recorder::new("plain", MigrationFlags::STOP_COPY, log)),
        Box::new(Recorder::new("b", P2P_PRE, log)),
    ]
}

fn run() -> (Arcs, Arcs) {
    let (slog, dlog): (Log, Log) = (Default::default(), Default::default());
    let source = SourcePlatform {
        memory: Ram::filled(64 << 10, 7),
        devices: devices(&slog)
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
        memory: Ram::filled(64 << 10, 0),
        devices: devices(&dlog),
        iommu_dirty: vec![true; 3],
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
    common::assert_one_host(&s, &d);
    r.expect("migrates");
    dr.expect("receives");
    let s = slog.lock().unwrap().clone();
    let d = dlog.lock().unwrap().clone();
    (s, d)
}

fn first(log: &[(String, S)], pred: impl Fn(&(String, S)) -> bool) -> usize {
    log.iter().position(pred).expect("present")
}

fn last(log: &[(String, S)], pred: impl Fn(&(String, S)) -> bool) -> usize {
    log.iter().rposition(pred).expect("present")
}

#[test]
fn every_p2p_device_is_quiesced_before_any_device_stops_or_runs() {
    let (src, dst) = run();
    // Source: a -> RUNNING_P2P and b -> PRE_COPY_P2P, both before the first STOP_COPY.
    let quiesced = last(&src, |(_, s)| matches!(s, S::RunningP2p | S::PreCopyP2p));
    let stopped = first(&src, |(_, s)| *s == S::StopCopy);
    assert!(quiesced < stopped, "source arcs: {src:?}");
    assert!(src.contains(&("a".into(), S::RunningP2p)), "{src:?}");
    assert!(src.contains(&("b".into(), S::PreCopyP2p)), "{src:?}");
    assert!(
        !src.iter()
            .any(|(n, s)| n == "plain" && matches!(s, S::RunningP2p | S::PreCopyP2p)),
        "a device without P2P keeps the direct path: {src:?}"
    );
    // Destination: both P2P devices reach RUNNING_P2P before any reaches RUNNING.
    let ready = last(&dst, |(_, s)| *s == S::RunningP2p);
    let running = first(&dst, |(_, s)| *s == S::Running);
    assert!(ready < running, "destination arcs: {dst:?}");
    for n in ["a", "b"] {
        assert!(dst.contains(&(n.into(), S::RunningP2p)), "{dst:?}");
    }
    assert!(!dst.contains(&("plain".into(), S::RunningP2p)), "{dst:?}");
}

#[test]
fn the_order_check_fails_for_a_device_by_device_order() {
    // Negative control: the device-by-device order the engine used before (each device
    // quiesced and stopped before the next is touched) fails the check above.
    let old: Vec<(String, S)> = vec![
        ("a".into(), S::RunningP2p),
        ("a".into(), S::StopCopy),
        ("b".into(), S::PreCopyP2p),
        ("b".into(), S::StopCopy),
    ];
    let quiesced = last(&old, |(_, s)| matches!(s, S::RunningP2p | S::PreCopyP2p));
    let stopped = first(&old, |(_, s)| *s == S::StopCopy);
    assert!(quiesced > stopped);
}

/// Counts the harvests it serves.
struct Counting(Arc<std::sync::atomic::AtomicU64>);

impl DirtyTracker for Counting {
    fn name(&self) -> String {
        "counting".into()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
    fn harvest(&mut self, _into: &mut PageBitmap) -> Result<u64, BoxError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(0)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A platform whose only DMA comes from a DMA endpoint (no device does DMA), with an IOMMU
/// tracker counting its harvests.
fn endpoint_platform(
    endpoints: Vec<livemig::engine::DmaEndpoint>,
    harvests: &Arc<std::sync::atomic::AtomicU64>,
) -> (SourcePlatform, DestinationPlatform) {
    let log: Log = Default::default();
    let source = SourcePlatform {
        memory: Ram::filled(64 << 10, 7),
        devices: vec![SourceDevice {
            dev: Box::new(Recorder::new("state-only", MigrationFlags::STOP_COPY, &log)),
            iommu_dirty: Err("no DMA".into()),
            dma_log: None,
            does_dma: false,
        }],
        iommu: Some(Box::new(Counting(harvests.clone()))),
        cpu: Box::new(Quiet),
        vcpus: Box::new(NoVcpus),
        page_size_mask: 0x1000,
        viommu: None,
        dma_endpoints: endpoints,
    };
    let dest = DestinationPlatform {
        memory: Ram::filled(64 << 10, 0),
        devices: vec![Box::new(Recorder::new(
            "state-only",
            MigrationFlags::STOP_COPY,
            &log,
        ))],
        iommu_dirty: vec![false],
        page_size_mask: 0x1000,
        vcpus: None,
    };
    (source, dest)
}

fn migrate(sp: SourcePlatform, dp: DestinationPlatform) -> livemig::engine::MigrationReport {
    let mut s = Source::new(sp, SourceConfig::default());
    let mut d = Destination::new(dp);
    let link = LinkConfig {
        bandwidth: 0,
        latency: Duration::ZERO,
    };
    let (r, dr) = migrate_local(&mut s, &mut d, link, &Cut::new());
    common::assert_one_host(&s, &d);
    dr.expect("receives");
    r.expect("migrates")
}

#[test]
fn a_dma_endpoint_tracked_by_the_iommu_makes_the_iommu_tracker_run() {
    use livemig::engine::DmaEndpoint;
    use livemig::tracker::Chosen;
    use std::sync::atomic::{AtomicU64, Ordering};
    let harvests = Arc::new(AtomicU64::new(0));
    let (sp, dp) = endpoint_platform(
        vec![DmaEndpoint {
            name: "mock".into(),
            iommu_dirty: Ok(()),
        }],
        &harvests,
    );
    let report = migrate(sp, dp);
    assert!(
        report.tracking.contains(&("mock".into(), Chosen::Iommu)),
        "{:?}",
        report.tracking
    );
    // Start, every round, the final harvest.
    assert!(harvests.load(Ordering::SeqCst) >= 3);

    // Negative control: without the endpoint nothing needs the IOMMU and it is never read,
    // so the count above is the endpoint's doing.
    let harvests = Arc::new(AtomicU64::new(0));
    let (sp, dp) = endpoint_platform(Vec::new(), &harvests);
    migrate(sp, dp);
    assert_eq!(harvests.load(Ordering::SeqCst), 0);
}

#[test]
fn an_untracked_dma_endpoint_blocks_migration_and_is_named() {
    use livemig::engine::DmaEndpoint;
    let harvests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (sp, _) = endpoint_platform(
        vec![DmaEndpoint {
            name: "mock 7".into(),
            iommu_dirty: Err("attached to the IOAS".into()),
        }],
        &harvests,
    );
    let s = Source::new(sp, SourceConfig::default());
    let err = s.check().expect_err("blocked");
    let text = err.to_string();
    assert!(
        text.contains("mock 7") && text.contains("attached to the IOAS"),
        "{text}"
    );
}
