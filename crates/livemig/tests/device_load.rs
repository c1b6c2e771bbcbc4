//! The destination's device load time counts against the downtime limit: a destination that
//! acknowledges rounds reports how long its devices took to load pre-copy state, and the
//! source does not declare convergence while the remaining device state would take longer to
//! load than the limit allows. The negative control (a destination without acknowledgements)
//! converges on the transfer estimate alone and overruns the limit.

mod common;

use std::time::Duration;

use common::{NoVcpus, Quiet, Ram};
use livemig::device::{DeviceCompat, MigDevice};
use livemig::engine::{
    Destination, DestinationPlatform, Source, SourceConfig, SourceDevice, SourcePlatform,
};
use livemig::link::{Cut, LinkConfig, migrate_local};
use livemig_vfio::data::PrecopyRound;
use livemig_vfio::{Error as VfioError, MigrationFlags, MigrationState as S, PrecopyInfo};

/// Pre-copy data per round, and the STOP_COPY state.
const PRECOPY: usize = 64 << 10;
const STOP_COPY: usize = 1 << 20;
/// The destination device loads 1 KiB per 100 µs: 6.4 ms per round, 102 ms for STOP_COPY.
const LOAD_PER_KIB: Duration = Duration::from_micros(100);
const LIMIT: Duration = Duration::from_millis(50);

struct Blob {
    state: S,
    slow: bool,
}

impl MigDevice for Blob {
    fn name(&self) -> &str {
        "blob"
    }
    fn compat(&self) -> DeviceCompat {
        DeviceCompat {
            identity: "blob".into(),
            compat: Vec::new(),
            migration_flags: (MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY).bits() as u32,
            dma_logging: false,
        }
    }
    fn state(&self) -> Result<S, VfioError> {
        Ok(self.state)
    }
    fn transition(&mut self, target: S) -> Result<(), VfioError> {
        self.state = target;
        Ok(())
    }
    fn precopy(&mut self, sink: &mut Vec<u8>, _max: u64) -> Result<PrecopyRound, VfioError> {
        sink.extend_from_slice(&[0x11; PRECOPY]);
        Ok(PrecopyRound {
            info: PrecopyInfo::default(),
            bytes: PRECOPY as u64,
            drained: true,
        })
    }
    fn precopy_pending(&mut self) -> Result<u64, VfioError> {
        Ok(0)
    }
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        Ok(STOP_COPY as u64)
    }
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
        sink.extend_from_slice(&[0x22; STOP_COPY]);
        Ok(STOP_COPY as u64)
    }
    fn load(&mut self, bytes: &[u8]) -> Result<(), VfioError> {
        if self.slow {
            std::thread::sleep(LOAD_PER_KIB * (bytes.len() / 1024) as u32);
        }
        Ok(())
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        self.state = S::Running;
        Ok(())
    }
}

fn run(acks: bool) -> livemig::engine::MigrationReport {
    run_with(acks, None).expect("migrates")
}

/// The source: 64 KiB of RAM and one blob device; nothing dirties pages.
fn source_platform() -> SourcePlatform {
    SourcePlatform {
        memory: Ram::filled(64 << 10, 1),
        devices: vec![SourceDevice {
            dev: Box::new(Blob {
                state: S::Running,
                slow: false,
            }),
            iommu_dirty: Err("no DMA".into()),
            dma_log: None,
            does_dma: false,
        }],
        iommu: None,
        cpu: Box::new(Quiet),
        vcpus: Box::new(NoVcpus),
        page_size_mask: 0x1000,
        viommu: None,
        dma_endpoints: Vec::new(),
    }
}

fn run_with(
    acks: bool,
    hard_deadline: Option<Duration>,
) -> livemig::Result<livemig::engine::MigrationReport> {
    let sp = source_platform();
    let dp = DestinationPlatform {
        memory: Ram::filled(64 << 10, 0),
        devices: vec![Box::new(Blob {
            state: S::Running,
            slow: true,
        })],
        iommu_dirty: vec![false],
        page_size_mask: 0x1000,
        vcpus: None,
    };
    let mut s = Source::new(
        sp,
        SourceConfig {
            downtime_limit: LIMIT,
            max_rounds: 3,
            hard_deadline,
            ..SourceConfig::default()
        },
    );
    let mut d = Destination::new(dp);
    d.x_no_round_acks(!acks);
    let link = LinkConfig {
        bandwidth: 0,
        latency: Duration::ZERO,
    };
    let (r, dr) = migrate_local(&mut s, &mut d, link, &Cut::new());
    common::assert_one_host(&s, &d);
    if r.is_ok() {
        dr.expect("receives");
    }
    r
}

#[test]
fn a_hard_deadline_counts_the_destinations_device_load_time() {
    // 1 MiB of state goes over the in-process link in well under 60 ms; loading it takes 102.
    let e = run_with(true, Some(Duration::from_millis(60))).unwrap_err();
    assert!(
        e.to_string()
            .contains("ms for the destination's devices to load 1048576 bytes), over the hard deadline of 60 ms"),
        "{}",
        e.chain()
    );
}

#[test]
fn the_destinations_device_load_time_holds_back_convergence() {
    let r = run(true);
    assert!(!r.converged, "{r:?}");
    assert_eq!(r.rounds.len(), 3, "pre-copy went on to the round limit");
    let why = r.non_convergence.as_deref().unwrap_or_default();
    assert!(
        why.contains("the destination's devices would take about")
            && why.contains(&format!("the remaining {STOP_COPY} bytes of device state")),
        "{why}"
    );
    // The measured downtime includes the slow load: the estimate was right.
    assert!(r.downtime_us > LIMIT.as_micros() as u64, "{r:?}");
}

#[test]
fn negative_control_without_acknowledgements_the_source_converges_and_overruns() {
    let r = run(false);
    assert!(r.converged, "the transfer estimate alone fits the limit");
    assert_eq!(r.rounds.len(), 1);
    assert_eq!(r.drain_us, 0);
    assert!(
        r.downtime_us > LIMIT.as_micros() as u64,
        "the device load the estimate left out makes the downtime overrun: {} us",
        r.downtime_us
    );
}

#[test]
fn a_hard_deadline_shorter_than_the_device_state_at_a_known_link_rate_is_refused_up_front() {
    let sp = source_platform();
    // 1 MiB of STOP_COPY state at 10 MiB/s is 100 ms.
    let s = Source::new(
        sp,
        SourceConfig {
            hard_deadline: Some(Duration::from_millis(20)),
            link_rate: Some(10 << 20),
            ..SourceConfig::default()
        },
    );
    let e = s.check().unwrap_err();
    assert!(
        matches!(e, livemig::Error::Config(_))
            && e.to_string().contains(
                "hard deadline 20 ms: the devices' STOP_COPY state (1048576 bytes) alone takes \
                 100.0 ms"
            ),
        "{e}"
    );
}
