//! A destination that stops reading during stop-and-copy: the source's write blocks where no
//! deadline check can run, so the hard deadline's watchdog aborts the channel and the source
//! runs again within the deadline (plus the abort's own time), with the reason named. The
//! negative control runs the same migration without a hard deadline: the source stays stopped
//! for as long as the destination stalls, so the positive test's time bound would fail.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Quiet, Ram};
use livemig::Error;
use livemig::device::{DeviceCompat, MigDevice};
use livemig::engine::{
    Destination, DestinationEvent, DestinationPlatform, Source, SourceConfig, SourceDevice,
    SourcePlatform, Vcpus,
};
use livemig::transport::TcpChannel;
use livemig_vfio::data::{PrecopyInfo, PrecopyRound};
use livemig_vfio::{Error as VfioError, MigrationFlags, MigrationState as S};

/// The destination stops reading this long once stop-and-copy data arrives.
const STALL: Duration = Duration::from_secs(4);
const DEADLINE: Duration = Duration::from_millis(600);

/// A device with `size` bytes of STOP_COPY state and no PRE_COPY.
struct Blob {
    state: S,
    size: usize,
}

impl MigDevice for Blob {
    fn name(&self) -> &str {
        "blob"
    }
    fn compat(&self) -> DeviceCompat {
        DeviceCompat {
            identity: format!("blob {}", self.size),
            compat: Vec::new(),
            migration_flags: MigrationFlags::STOP_COPY.bits() as u32,
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
        Ok(self.size as u64)
    }
    fn save(&mut self, sink: &mut Vec<u8>) -> Result<u64, VfioError> {
        sink.extend(std::iter::repeat_n(0x5au8, self.size));
        Ok(self.size as u64)
    }
    fn load(&mut self, _: &[u8]) -> Result<(), VfioError> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), VfioError> {
        self.state = S::Running;
        Ok(())
    }
}

/// vCPUs that count how often they were paused and resumed.
struct Counted(Arc<(AtomicU32, AtomicU32)>);

impl Vcpus for Counted {
    fn pause(&mut self) {
        self.0.0.fetch_add(1, Ordering::SeqCst);
    }
    fn resume(&mut self) {
        self.0.1.fetch_add(1, Ordering::SeqCst);
    }
}

fn devices() -> Vec<Box<dyn MigDevice>> {
    vec![
        Box::new(Blob {
            state: S::Running,
            size: 1 << 10,
        }),
        Box::new(Blob {
            state: S::Running,
            size: 48 << 20,
        }),
    ]
}

/// Migrates over loopback TCP to a destination that stalls at stop-and-copy. Returns the
/// source's result, how long its vCPUs stayed paused, and (pauses, resumes).
fn run(hard_deadline: Option<Duration>) -> (livemig::Result<()>, Duration, (u32, u32)) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let receiver = thread::spawn(move || {
        let mut d = Destination::new(DestinationPlatform {
            memory: Ram::filled(8 << 20, 0),
            devices: devices(),
            iommu_dirty: vec![false, false],
            page_size_mask: 0x1000,
            vcpus: None,
        });
        d.on_event(|e| {
            if e == DestinationEvent::StopCopy {
                thread::sleep(STALL);
            }
        });
        let s = l.accept().unwrap().0;
        let back = s.try_clone().unwrap();
        let _ = d.receive(s, back);
    });
    let counts = Arc::new((AtomicU32::new(0), AtomicU32::new(0)));
    let paused_at = Arc::new(Mutex::new(None::<Instant>));
    let platform = SourcePlatform {
        memory: Ram::filled(8 << 20, 3),
        devices: devices()
            .into_iter()
            .map(|dev| SourceDevice {
                dev,
                iommu_dirty: Err("no DMA".into()),
                dma_log: None,
                does_dma: false,
            })
            .collect(),
        iommu: None,
        cpu: Box::new(Quiet),
        vcpus: Box::new(Counted(Arc::clone(&counts))),
        page_size_mask: 0x1000,
        viommu: None,
        dma_endpoints: Vec::new(),
    };
    let mut s = Source::new(
        platform,
        SourceConfig {
            downtime_limit: Duration::from_secs(10),
            hard_deadline,
            ..SourceConfig::default()
        },
    );
    let at = Arc::clone(&paused_at);
    s.on_event(move |e| {
        if let livemig::engine::Event::Phase(livemig::error::Phase::StopCopy) = e {
            *at.lock().unwrap() = Some(Instant::now());
        }
    });
    let stream = TcpStream::connect(addr).unwrap();
    let r = s.migrate_channels(TcpChannel(stream), &mut |_| {
        Err(std::io::Error::other("one channel"))
    });
    let stopped_for = paused_at
        .lock()
        .unwrap()
        .map_or(Duration::ZERO, |t| t.elapsed());
    receiver.join().unwrap();
    let c = (
        counts.0.load(Ordering::SeqCst),
        counts.1.load(Ordering::SeqCst),
    );
    (r.map(drop), stopped_for, c)
}

#[test]
fn a_destination_that_stops_reading_is_cut_off_at_the_hard_deadline() {
    let (r, stopped_for, (pauses, resumes)) = run(Some(DEADLINE));
    match r {
        Err(Error::Deadline { reason, .. }) => {
            assert!(reason.contains("hard deadline of 600 ms"), "{reason}");
            assert!(reason.contains("runs again"), "{reason}");
        }
        other => panic!("expected the hard deadline, got {other:?}"),
    }
    assert_eq!((pauses, resumes), (1, 1), "the vCPUs run again");
    assert!(
        stopped_for < DEADLINE + Duration::from_millis(1500),
        "the source was stopped for {stopped_for:?}"
    );
}

/// Negative control: no hard deadline, the source waits out the destination's stall (and the
/// migration then completes), far past the positive test's bound.
#[test]
fn negative_control_without_a_deadline_the_source_waits_out_the_stall() {
    let (r, stopped_for, (pauses, _)) = run(None);
    r.expect("the migration completes once the destination reads again");
    assert_eq!(pauses, 1);
    assert!(
        stopped_for >= DEADLINE + Duration::from_millis(1500),
        "the positive test's bound would hold even without the watchdog: {stopped_for:?}"
    );
}
