//! The dirty-tracker contract (`livemig::tracker::testing`) over this crate's trackers: the
//! device DMA log (`DmaLogTracker`) over the simulated VFIO device, a reference tracker, and
//! the negative controls — trackers that break one rule each, which the check must catch.
//! The HWPT tracker runs it in `livemig-host` (over the fake iommufd kernel) and in the rig
//! (over the kernel's mock IOMMU); the sim, KVM and VMM-log trackers in their own crates.

use std::collections::BTreeSet;

use livemig::bitmap::PageBitmap;
use livemig::tracker::testing::{self, Dirtied, Subject};
use livemig::tracker::{BoxError, DirtyTracker, DmaLogTracker, not_tracking};
use livemig_vfio::MigrationFlags;
use livemig_vfio::sim::{Fault, SimConfig, SimDevice};

const PAGES: u64 = 1024;

/// What a reference tracker gets wrong on purpose (negative controls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bug {
    None,
    /// Harvests do not clear.
    NoClear,
    /// A harvest when not tracking answers "nothing dirty".
    HarvestWhenStopped,
    /// A restart keeps what was dirty before it.
    RestartRemembers,
    /// One page in 16 is never reported (a dropped harvest).
    DropsPages,
    /// A second start fails.
    DoubleStartFails,
    /// Stop without start fails.
    StopWithoutStartFails,
}

/// An exact in-memory tracker: writes go through `Reference::write`.
#[derive(Debug)]
struct Reference {
    bug: Bug,
    tracking: bool,
    dirty: BTreeSet<u64>,
    fail_next: bool,
}

impl Reference {
    fn write(&mut self, pfn: u64) {
        if self.tracking {
            self.dirty.insert(pfn);
        }
    }
}

impl DirtyTracker for Reference {
    fn name(&self) -> String {
        format!("reference ({:?})", self.bug)
    }
    fn start(&mut self) -> Result<(), BoxError> {
        if self.tracking && self.bug == Bug::DoubleStartFails {
            return Err("already started".into());
        }
        self.tracking = true;
        if self.bug != Bug::RestartRemembers {
            self.dirty.clear();
        }
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if !self.tracking {
            if self.bug == Bug::HarvestWhenStopped {
                return Ok(0);
            }
            return Err(not_tracking(&self.name()));
        }
        if std::mem::take(&mut self.fail_next) {
            return Err("injected".into());
        }
        let mut n = 0;
        for &p in &self.dirty {
            if self.bug == Bug::DropsPages && p % 16 == 3 {
                continue;
            }
            into.set(p);
            n += 1;
        }
        if self.bug != Bug::NoClear {
            self.dirty.clear();
        }
        Ok(n)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        if !self.tracking && self.bug == Bug::StopWithoutStartFails {
            return Err("not started".into());
        }
        self.tracking = false;
        Ok(())
    }
}

struct RefSubject;

impl Subject for RefSubject {
    type Tracker = Reference;
    fn pages(&self) -> u64 {
        PAGES
    }
    fn dirty(&mut self, t: &mut Reference, nth: u32) -> Dirtied {
        // Page 3 + 16k: the page DropsPages loses.
        let pfn = 3 + 16 * u64::from(nth);
        t.write(pfn);
        Dirtied::page(pfn, 1)
    }
    fn fail_next_harvest(&mut self, t: &mut Reference) -> bool {
        t.fail_next = true;
        true
    }
}

fn reference(bug: Bug) -> Reference {
    Reference {
        bug,
        tracking: false,
        dirty: BTreeSet::new(),
        fail_next: false,
    }
}

#[test]
fn the_reference_tracker_meets_the_contract() {
    let c = testing::check(&mut RefSubject, reference(Bug::None)).unwrap();
    assert!(c.harvest_error, "the fault rule ran");
    assert_eq!(c.rules, 10);
}

#[test]
fn negative_controls_each_broken_rule_is_caught() {
    for (bug, says) in [
        (
            Bug::NoClear,
            "a second harvest with no write: expected no page",
        ),
        (Bug::HarvestWhenStopped, "a harvest before start succeeded"),
        (
            Bug::RestartRemembers,
            "dirtied before a second start, was reported after it",
        ),
        (Bug::DropsPages, "page 0x3 was dirtied and not reported"),
        (Bug::DoubleStartFails, "a second start failed"),
        (Bug::StopWithoutStartFails, "stop before start failed"),
    ] {
        let e = testing::check(&mut RefSubject, reference(bug)).unwrap_err();
        assert!(e.contains(says), "{bug:?}: {e}");
    }
}

/// The device DMA log over the simulated VFIO device: its DMA writes are what the log sees.
struct DmaLogSubject {
    dev: SimDevice,
}

impl Subject for DmaLogSubject {
    type Tracker = DmaLogTracker<SimDevice>;
    fn pages(&self) -> u64 {
        PAGES
    }
    fn dirty(&mut self, _: &mut Self::Tracker, nth: u32) -> Dirtied {
        let pfn = 7 + 33 * u64::from(nth);
        self.dev.dma_write(pfn * 4096 + 100, 8);
        Dirtied::page(pfn, 1)
    }
    fn fail_next_harvest(&mut self, _: &mut Self::Tracker) -> bool {
        self.dev.inject(Fault::DmaLogReport);
        true
    }
}

#[test]
fn the_dma_log_tracker_meets_the_contract() {
    let mut cfg = SimConfig::new(MigrationFlags::STOP_COPY);
    cfg.dma_logging_max_ranges = Some(4);
    let dev = SimDevice::new(cfg);
    let t = DmaLogTracker::new("sim dev", dev.clone(), &[(0, PAGES * 4096)], None).unwrap();
    let c = testing::check(&mut DmaLogSubject { dev }, t).unwrap();
    assert!(c.harvest_error);
}

#[test]
fn negative_control_a_dma_log_whose_device_logs_nothing_fails() {
    // The same device, but its writes land outside the logged range: nothing is reported.
    struct Outside(SimDevice);
    impl Subject for Outside {
        type Tracker = DmaLogTracker<SimDevice>;
        fn pages(&self) -> u64 {
            PAGES
        }
        fn dirty(&mut self, _: &mut Self::Tracker, nth: u32) -> Dirtied {
            let pfn = 7 + u64::from(nth);
            self.0.dma_write((PAGES + pfn) * 4096, 8);
            Dirtied::page(pfn, 1)
        }
    }
    let mut cfg = SimConfig::new(MigrationFlags::STOP_COPY);
    cfg.dma_logging_max_ranges = Some(4);
    let dev = SimDevice::new(cfg);
    let t = DmaLogTracker::new("sim dev", dev.clone(), &[(0, PAGES * 4096)], None).unwrap();
    let e = testing::check(&mut Outside(dev), t).unwrap_err();
    assert!(e.contains("page 0x7 was dirtied and not reported"), "{e}");
}
