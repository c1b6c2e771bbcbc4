//! Shared set-up for the simulated migrations.
#![allow(dead_code)]

use std::time::Duration;

use livemig::engine::{Destination, MigrationReport, ReceiveReport, Source, SourceConfig};
use livemig::link::{Cut, LinkConfig};
use livemig::{Phase, Result};
use livemig_sim::{self as sim, SimDestination, SimSource, SimSpec, Vendor};

pub fn spec(vendor: Vendor) -> SimSpec {
    SimSpec {
        vendor,
        ram: 1 << 30,
        populated: 32 << 20,
        cpu_dirty_rate: 3000,
        dma_rate: 1000,
        ..SimSpec::default()
    }
}

pub fn link() -> LinkConfig {
    LinkConfig {
        bandwidth: 1 << 30,
        latency: Duration::from_micros(200),
    }
}

pub struct Run {
    pub source: Source,
    pub src: SimSource,
    pub dst: SimDestination,
    pub dest: Destination,
    pub cut: Cut,
}

/// Builds both sides; the source's platform moves into the engine.
pub fn setup(s: &SimSpec, d: &SimSpec, cfg: SourceConfig) -> Run {
    let src = sim::source(s, cfg.precopy).unwrap();
    let dst = sim::destination(d, cfg.precopy).unwrap();
    setup_from(src, dst, cfg)
}

/// As [`setup`], from hosts already built.
#[allow(dead_code)]
pub fn setup_from(mut src: sim::SimSource, mut dst: sim::SimDestination, cfg: SourceConfig) -> Run {
    let platform = std::mem::replace(&mut src.platform, empty_source());
    let dplatform = std::mem::replace(&mut dst.platform, empty_destination());
    // Let the guest get work in flight.
    std::thread::sleep(Duration::from_millis(50));
    Run {
        source: Source::new(platform, cfg),
        src,
        dest: Destination::new(dplatform),
        dst,
        cut: Cut::new(),
    }
}

fn empty_source() -> livemig::engine::SourcePlatform {
    sim::source(
        &SimSpec {
            ram: 64 << 20,
            populated: 0,
            qm_vfs: 0,
            logging_devices: 0,
            cpu_dirty_rate: 0,
            dma_rate: 0,
            ..SimSpec::default()
        },
        true,
    )
    .unwrap()
    .platform
}

fn empty_destination() -> livemig::engine::DestinationPlatform {
    sim::destination(
        &SimSpec {
            ram: 64 << 20,
            populated: 0,
            qm_vfs: 0,
            logging_devices: 0,
            ..SimSpec::default()
        },
        true,
    )
    .unwrap()
    .platform
}

impl Run {
    pub fn go(&mut self) -> (Result<MigrationReport>, Result<ReceiveReport>) {
        let r = sim::migrate_local(&mut self.source, &mut self.dest, link(), &self.cut);
        self.assert_one_host();
        r
    }

    /// The VM runs on one host, or on none with the reason said (issue 29), by both engines'
    /// decisions and by the devices: a side that says it does not run has none RUNNING with
    /// the guest's state (the destination's were reset).
    pub fn assert_one_host(&self) {
        let (s, d) = (self.source.outcome(), self.dest.outcome());
        let side = livemig::engine::handover::one_host(s, d)
            .unwrap_or_else(|e| panic!("{e}: source {s:?}, destination {d:?}"));
        assert_eq!(
            side == "source",
            !self.source.is_stopped(),
            "source decision {s:?} against stopped = {}",
            self.source.is_stopped()
        );
    }

    /// As [`go`](Self::go) with `n` page channels (the source's config must say `n`).
    pub fn go_channels(&mut self, n: usize) -> (Result<MigrationReport>, Result<ReceiveReport>) {
        let pages = vec![link(); n];
        let r = livemig::link::migrate_local_channels(
            &mut self.source,
            &mut self.dest,
            link(),
            &pages,
            &self.cut,
        );
        self.assert_one_host();
        r
    }

    /// Throws the cut switch when `phase` begins.
    pub fn cut_at(&mut self, phase: Phase) {
        let cut = self.cut.clone();
        self.source.on_event(move |e| {
            if let livemig::engine::Event::Phase(p) = e
                && *p == phase
            {
                cut.cut();
            }
        });
    }

    /// The source guest keeps running: devices RUNNING, vCPUs writing, devices working.
    pub fn assert_source_running(&self) {
        assert!(
            sim::all_running(&self.src.host),
            "every source device is RUNNING"
        );
        let w = self
            .src
            .workload
            .cpu_writes
            .load(std::sync::atomic::Ordering::Relaxed);
        let t = std::time::Instant::now();
        while self
            .src
            .workload
            .cpu_writes
            .load(std::sync::atomic::Ordering::Relaxed)
            == w
        {
            assert!(t.elapsed() < Duration::from_secs(5), "the vCPUs run again");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
