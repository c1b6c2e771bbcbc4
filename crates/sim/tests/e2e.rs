//! End-to-end simulated migrations: every IOMMU vendor model, with and without device
//! PRE_COPY, each tracker choice; 0 lost pages and identical device state, checked bit for bit.

mod common;

use livemig::engine::SourceConfig;
use livemig::tracker::{Chosen, TrackingMode};
use livemig_sim::Vendor;
use serial_test::serial;

fn migrate(
    vendor: Vendor,
    precopy: bool,
    tracking: TrackingMode,
    iommu_dirty: bool,
) -> livemig::engine::MigrationReport {
    let mut s = common::spec(vendor);
    s.iommu_dirty = iommu_dirty;
    if !iommu_dirty {
        s.qm_vfs = 0;
        s.logging_devices = 2;
    }
    let cfg = SourceConfig {
        precopy,
        tracking,
        ..SourceConfig::default()
    };
    let mut run = common::setup(&s, &s, cfg);
    let (r, d) = run.go();
    let r = r.unwrap_or_else(|e| panic!("{vendor:?} precopy={precopy}: {}", e.chain()));
    let d = d.unwrap();
    // The source is stopped for good; its workload may be dropped before comparing.
    drop(run.src.workload);
    run.src
        .host
        .compare(&run.dst.host)
        .unwrap_or_else(|e| panic!("{vendor:?} precopy={precopy}: {e}"));
    assert_eq!(
        d.pages + d.zero_pages,
        r.rounds
            .iter()
            .chain([&r.stop_copy])
            .map(|x| x.pages + x.zero_pages)
            .sum::<u64>()
    );
    assert_eq!(
        r.rounds[0].dirty_pages,
        s.ram / 4096,
        "round 1 treats all RAM as dirty"
    );
    assert!(r.converged, "{r:?}");
    // Within the limit at the link's measured rate. (Wall-clock downtime is a benchmark
    // figure: on a loaded 2-core machine it measures the scheduler; see benches/migrate.rs.)
    let stop_copy_us =
        r.stop_copy.bytes as u128 * 1_000_000 / u128::from(r.stop_copy.bandwidth.max(1));
    assert!(
        stop_copy_us <= u128::from(r.downtime_limit_us),
        "stop-and-copy needs {stop_copy_us} us at {} B/s, over the limit {} us",
        r.stop_copy.bandwidth,
        r.downtime_limit_us
    );
    assert!(r.downtime_us > 0);
    // The downtime by phase: measured, each part within the whole.
    let p = &r.downtime_phases;
    let parts = p.stop_and_harvest_us
        + p.device_save_us
        + p.send_us
        + p.in_flight_us
        + p.destination_load_us
        + p.destination_run_us;
    assert!(
        parts <= r.downtime_us + 1000,
        "{p:?} vs {} us",
        r.downtime_us
    );
    assert!(p.device_save_us > 0 && p.destination_load_us > 0, "{p:?}");
    let device_precopy: u64 = r.rounds.iter().map(|x| x.device_bytes).sum();
    assert_eq!(
        device_precopy > 0,
        precopy,
        "PRE_COPY data only when used: {r:?}"
    );
    r
}

#[test]
#[serial]
fn amd_vi_with_precopy() {
    let r = migrate(Vendor::Amd, true, TrackingMode::Auto, true);
    assert!(r.tracking.iter().all(|(_, c)| *c == Chosen::Iommu));
}

#[test]
#[serial]
fn amd_vi_without_precopy() {
    migrate(Vendor::Amd, false, TrackingMode::Auto, true);
}

#[test]
#[serial]
fn vtd_with_precopy() {
    migrate(Vendor::Vtd, true, TrackingMode::Auto, true);
}

#[test]
#[serial]
fn vtd_without_precopy() {
    migrate(Vendor::Vtd, false, TrackingMode::Auto, true);
}

#[test]
#[serial]
fn smmuv3_with_precopy() {
    migrate(Vendor::Smmuv3, true, TrackingMode::Auto, true);
}

#[test]
#[serial]
fn smmuv3_without_precopy() {
    migrate(Vendor::Smmuv3, false, TrackingMode::Auto, true);
}

/// An IOMMU without dirty tracking: the devices' own DMA logs cover their writes.
#[test]
#[serial]
fn device_dma_logging_when_the_iommu_cannot_track() {
    let r = migrate(Vendor::Vtd, true, TrackingMode::Auto, false);
    assert!(
        r.tracking.iter().all(|(_, c)| *c == Chosen::Device),
        "{r:?}"
    );
}

/// Forcing device tracking on a platform where the IOMMU could track.
#[test]
#[serial]
fn forced_device_tracking_blocks_qm_vfs_and_names_them() {
    let s = common::spec(Vendor::Amd);
    let cfg = SourceConfig {
        tracking: TrackingMode::Device,
        ..SourceConfig::default()
    };
    let mut run = common::setup(&s, &s, cfg);
    let (r, d) = run.go();
    let e = r.unwrap_err().to_string();
    assert!(
        e.starts_with("migration blocked: qm0: device DMA logging was required"),
        "{e}"
    );
    assert!(e.contains("qm1:"), "{e}");
    assert!(d.is_err(), "the destination saw no stream");
    run.assert_source_running();
}

/// Neither tracker: blocked before anything happens, with the reason.
#[test]
#[serial]
fn no_tracker_at_all_is_blocked() {
    let mut s = common::spec(Vendor::Smmuv3);
    s.iommu_dirty = false;
    let mut run = common::setup(&s, &s, SourceConfig::default());
    let (r, _) = run.go();
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("qm0: no IOMMU dirty tracking (the Arm SMMUv3 model is configured without dirty tracking) and no device DMA logging"),
        "{e}"
    );
    run.assert_source_running();
}

#[test]
#[serial]
fn a_hard_deadline_that_cannot_be_met_keeps_the_source_running() {
    // After one round the guest and the devices have left about a megabyte to send over a
    // 1 GiB/s link: stop-and-copy cannot fit 50 µs, so the engine must not stop the VM, and
    // says why.
    let s = common::spec(Vendor::Amd);
    let cfg = SourceConfig {
        max_rounds: 1,
        hard_deadline: Some(std::time::Duration::from_micros(50)),
        ..SourceConfig::default()
    };
    let mut run = common::setup(&s, &s, cfg);
    let (r, d) = run.go();
    let e = r.expect_err("the deadline cannot be met");
    assert!(
        matches!(e, livemig::Error::Deadline { .. }),
        "{}",
        e.chain()
    );
    assert!(e.to_string().contains("hard deadline of 0.05 ms"), "{e}");
    assert!(d.is_err(), "the destination discards");
    assert!(
        livemig_sim::all_running(&run.src.host),
        "source devices run again"
    );
    drop(run.src.workload);

    let zero = SourceConfig {
        hard_deadline: Some(std::time::Duration::ZERO),
        ..SourceConfig::default()
    };
    let mut run = common::setup(&s, &s, zero);
    let (r, _) = run.go();
    let e = r.expect_err("refused before anything starts");
    assert!(e.to_string().contains("hard deadline of 0"), "{e}");
}

#[test]
#[serial]
fn three_page_channels_with_devices_and_a_running_guest_lose_nothing() {
    let s = common::spec(Vendor::Amd);
    let cfg = SourceConfig {
        channels: 3,
        ..SourceConfig::default()
    };
    let mut run = common::setup(&s, &s, cfg);
    let (r, d) = run.go_channels(3);
    let r = r.unwrap_or_else(|e| panic!("{}", e.chain()));
    let d = d.unwrap_or_else(|e| panic!("{}", e.chain()));
    drop(run.src.workload);
    run.src.host.compare(&run.dst.host).unwrap();
    assert_eq!(
        d.pages + d.zero_pages,
        r.rounds
            .iter()
            .chain([&r.stop_copy])
            .map(|x| x.pages + x.zero_pages)
            .sum::<u64>()
    );
    assert!(
        r.stop_copy.pages + r.stop_copy.zero_pages > 0,
        "the guest and the devices dirtied pages that the last round sent: {:?}",
        r.stop_copy
    );
}
