//! Dirty trackers and the choice between them.
//!
//! The pages to resend after a round are the union of every tracker's report: the vCPU dirty
//! log, the IOMMU's hardware dirty bits (iommufd HWPT on a real host, the `livemig-iommu-pt`
//! model in simulation) for devices whose domain tracks, and the DMA log of devices tracked on
//! their own. Which of the last two covers a device is [`plan`]'s decision.

use livemig_iommufd::{DirtyBitmap, Hwpt};
use livemig_vfio::{DmaLogSession, DmaLogger, DmaRange};

use crate::bitmap::PageBitmap;
use crate::memory::PAGE_SIZE;

#[cfg(feature = "testing")]
pub mod testing;

/// A tracker's error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A source of dirty pages, in guest-physical 4 KiB pages.
///
/// # Contract
///
/// Every implementation behaves like this, and runs [`testing::check`] in its own tests to
/// show it (the sim, KVM, VMM-log, HWPT and DMA-log trackers do):
///
/// ```text
///            start                 harvest: pages dirtied since start / the last harvest
///   idle ──────────────> tracking ──┐       (read and clear)
///    ^  stop: Ok, nothing    │  ^    └─ start again: Ok, restarts (what was dirty is forgotten)
///    │  harvest: Err         │  └── harvest Err part-way: still tracking, stop still ends it
///    └──────── stop ─────────┘
/// ```
///
/// - **Harvest** reports every page dirtied while tracking, once: the next harvest after the
///   write reports it (a tracker with a coarser granule may also report the rest of that
///   granule, nothing else), and a later one only if it was written again.
/// - **Double start** (start while tracking) is `Ok` and restarts tracking: pages dirtied
///   before it are forgotten, as at the first start.
/// - **Stop without start**, or a second stop, is `Ok` and does nothing. A start that failed
///   part-way counts as started: `stop` undoes whatever part of it took effect.
/// - **Harvest when not tracking** (never started, or stopped) is an `Err`: a tracker never
///   answers "nothing dirty" while it is not watching.
/// - **An error part-way through a harvest** is returned; `into` may hold pages read before
///   it. The tracker is still tracking, `stop` still ends it, and a later start tracks afresh.
///   The engine ends the attempt on such an error (the source runs again and the next attempt
///   sends all of RAM), so nothing relies on what the failed harvest cleared.
pub trait DirtyTracker: Send {
    /// A name for reports and errors.
    fn name(&self) -> String;
    /// Starts tracking (or restarts it); what was dirty before is forgotten.
    fn start(&mut self) -> Result<(), BoxError>;
    /// Reads and clears the pages dirtied since the last harvest (or start), ORing them into
    /// `into`; returns how many pages the tracker reported. An error when not tracking.
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError>;
    /// Stops tracking (nothing to do when not tracking).
    fn stop(&mut self) -> Result<(), BoxError>;
}

impl<T: DirtyTracker + ?Sized> DirtyTracker for Box<T> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        (**self).start()
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        (**self).harvest(into)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        (**self).stop()
    }
}

/// The error of a harvest while not tracking (see the [`DirtyTracker`] contract).
pub fn not_tracking(name: &str) -> BoxError {
    format!("{name}: harvest while not tracking (start it first)").into()
}

/// How dirty pages of device DMA are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackingMode {
    /// The IOMMU where the device's domain tracks, else the device's DMA log.
    #[default]
    Auto,
    /// The IOMMU only (device DMA logging disabled, as QEMU's option to rely on the IOMMU).
    Iommu,
    /// Device DMA logging only.
    Device,
}

impl std::str::FromStr for TrackingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TrackingMode::Auto),
            "iommu" => Ok(TrackingMode::Iommu),
            "device" => Ok(TrackingMode::Device),
            other => Err(format!(
                "unknown dirty tracking mode {other:?} (expected auto, iommu or device)"
            )),
        }
    }
}

/// What can track one device's DMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDirtyCaps {
    /// The device's name.
    pub name: String,
    /// Its IOMMU domain tracks dirty pages (the auto-domain outcome), with the reason.
    pub iommu: Result<(), String>,
    /// It can log its own DMA.
    pub dma_logging: bool,
    /// It does DMA at all (a vCPU state device does not: it needs no tracker).
    pub does_dma: bool,
}

/// The tracker chosen for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Chosen {
    /// IOMMU hardware dirty tracking.
    Iommu,
    /// The device's DMA log.
    Device,
    /// Nothing: the device does no DMA.
    #[serde(rename = "none")]
    NoDma,
}

/// Chooses a tracker for every device, or says why migration is blocked (naming each device
/// that has none).
pub fn plan(mode: TrackingMode, devices: &[DeviceDirtyCaps]) -> Result<Vec<Chosen>, String> {
    let mut out = Vec::new();
    let mut blocked = Vec::new();
    for d in devices {
        let iommu = d.iommu.is_ok();
        let why_iommu = d.iommu.as_ref().err().cloned().unwrap_or_default();
        let pick = match mode {
            _ if !d.does_dma => Ok(Chosen::NoDma),
            TrackingMode::Auto if iommu => Ok(Chosen::Iommu),
            TrackingMode::Auto if d.dma_logging => Ok(Chosen::Device),
            TrackingMode::Auto => Err(format!(
                "{}: no IOMMU dirty tracking ({why_iommu}) and no device DMA logging",
                d.name
            )),
            TrackingMode::Iommu if iommu => Ok(Chosen::Iommu),
            TrackingMode::Iommu => Err(format!(
                "{}: IOMMU dirty tracking was required but is unavailable ({why_iommu})",
                d.name
            )),
            TrackingMode::Device if d.dma_logging => Ok(Chosen::Device),
            TrackingMode::Device => Err(format!(
                "{}: device DMA logging was required but the device has none",
                d.name
            )),
        };
        match pick {
            Ok(c) => out.push(c),
            Err(e) => blocked.push(e),
        }
    }
    if blocked.is_empty() {
        Ok(out)
    } else {
        Err(blocked.join("; "))
    }
}

/// IOMMU hardware dirty tracking through iommufd: every dirty-capable HWPT of the devices'
/// IOAS, over the guest RAM ranges (IOVA = GPA, the layout without a vIOMMU).
#[derive(Debug)]
pub struct HwptTracker {
    hwpts: Vec<Hwpt>,
    bitmaps: Vec<DirtyBitmap>,
    /// A start was attempted and no stop completed since.
    tracking: bool,
}

impl HwptTracker {
    /// Tracks `ranges` (guest-physical, 4 KiB aligned) in `hwpts` (those not dirty-capable are
    /// skipped: their devices were planned onto another tracker).
    pub fn new(hwpts: Vec<Hwpt>, ranges: &[(u64, u64)]) -> Result<HwptTracker, BoxError> {
        let bitmaps = ranges
            .iter()
            .map(|&(iova, len)| DirtyBitmap::new(iova, len, PAGE_SIZE))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HwptTracker {
            hwpts: hwpts.into_iter().filter(|h| h.dirty_capable()).collect(),
            bitmaps,
            tracking: false,
        })
    }
}

impl DirtyTracker for HwptTracker {
    fn name(&self) -> String {
        let ids: Vec<String> = self.hwpts.iter().map(|h| h.id().to_string()).collect();
        format!("iommufd HWPT {}", ids.join(","))
    }
    fn start(&mut self) -> Result<(), BoxError> {
        // Before the first ioctl: a start that fails part-way leaves `stop` to undo it.
        self.tracking = true;
        for h in &self.hwpts {
            h.set_dirty_tracking(true)?;
        }
        // Forget what was dirty before: the first round sends everything anyway.
        let mut sink = PageBitmap::new(0, PAGE_SIZE);
        self.harvest(&mut sink)?;
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if !self.tracking {
            return Err(not_tracking(&self.name()));
        }
        let mut n = 0;
        for h in &self.hwpts {
            for b in &mut self.bitmaps {
                b.clear_all();
                h.get_dirty_bitmap(b.iova(), b.length(), b, true)?;
                // Word-wise where the range is 64-page aligned (RAM ranges are).
                n += into.or_bits(b.iova() / PAGE_SIZE, b.words(), b.length() / PAGE_SIZE);
            }
        }
        Ok(n)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        if !self.tracking {
            return Ok(());
        }
        for h in &self.hwpts {
            h.set_dirty_tracking(false)?;
        }
        self.tracking = false;
        Ok(())
    }
}

/// A device's own DMA log (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`) over guest RAM ranges merged
/// to the device's range budget (`livemig_viommu::policy::tracking_ranges`).
pub struct DmaLogTracker<L> {
    name: String,
    logger: L,
    ranges: Vec<(u64, u64)>,
    session: Option<DmaLogSession>,
    words: Vec<u64>,
}

impl<L> std::fmt::Debug for DmaLogTracker<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaLogTracker")
            .field("name", &self.name)
            .field("ranges", &self.ranges)
            .field("session", &self.session)
            .finish()
    }
}

impl<L: DmaLogger> DmaLogTracker<L> {
    /// Logs `ram` (plus an optional hotplug window) on `logger`.
    pub fn new(
        name: impl Into<String>,
        logger: L,
        ram: &[(u64, u64)],
        hotplug: Option<(u64, u64)>,
    ) -> Result<DmaLogTracker<L>, BoxError> {
        let budget = logger.dma_logging_max_ranges();
        let ranges = livemig_viommu::policy::tracking_ranges(ram, hotplug, budget)?;
        Ok(DmaLogTracker {
            name: name.into(),
            logger,
            ranges,
            session: None,
            words: Vec::new(),
        })
    }
}

impl<L: DmaLogger + Send> DirtyTracker for DmaLogTracker<L> {
    fn name(&self) -> String {
        format!("DMA log of {}", self.name)
    }
    fn start(&mut self) -> Result<(), BoxError> {
        // A restart: the device refuses a second START while logging.
        self.stop()?;
        let ranges: Vec<DmaRange> = self
            .ranges
            .iter()
            .map(|&(iova, len)| DmaRange::new(iova, len))
            .collect();
        self.session = Some(self.logger.start(PAGE_SIZE, &ranges)?);
        Ok(())
    }
    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        let Some(s) = self.session.as_ref() else {
            return Err(not_tracking(&self.name()));
        };
        let page = s.page_size;
        let mut n = 0;
        for r in s.ranges.clone() {
            let pages = r.length.div_ceil(page);
            self.words.clear();
            self.words.resize(usize::try_from(pages.div_ceil(64))?, 0);
            self.logger
                .dma_logging_report(r.iova, r.length, page, &mut self.words)?;
            if page == PAGE_SIZE {
                n += into.or_bits(r.iova / PAGE_SIZE, &self.words, pages);
                continue;
            }
            for (wi, &w) in self.words.iter().enumerate() {
                let mut m = w;
                while m != 0 {
                    let bit = u64::from(m.trailing_zeros());
                    m &= m - 1;
                    into.set_bytes(r.iova + (wi as u64 * 64 + bit) * page, page);
                    n += 1;
                }
            }
        }
        Ok(n)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        // A failed START leaves no log running (the device refused it whole).
        if self.session.is_none() {
            return Ok(());
        }
        self.logger.dma_logging_stop()?;
        self.session = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(name: &str, iommu: bool, log: bool) -> DeviceDirtyCaps {
        DeviceDirtyCaps {
            name: name.into(),
            iommu: if iommu {
                Ok(())
            } else {
                Err("domain without dirty tracking".into())
            },
            dma_logging: log,
            does_dma: true,
        }
    }

    #[test]
    fn plan_prefers_the_iommu_and_names_blocked_devices() {
        let devs = [caps("a", true, true), caps("b", false, true)];
        assert_eq!(
            plan(TrackingMode::Auto, &devs).unwrap(),
            vec![Chosen::Iommu, Chosen::Device]
        );
        assert_eq!(
            plan(TrackingMode::Device, &devs).unwrap(),
            vec![Chosen::Device, Chosen::Device]
        );
        let e = plan(TrackingMode::Iommu, &devs).unwrap_err();
        assert!(e.starts_with("b: IOMMU dirty tracking was required"), "{e}");
        let mut cpu_state = caps("vcpus", false, false);
        cpu_state.does_dma = false;
        assert_eq!(
            plan(TrackingMode::Iommu, &[cpu_state]).unwrap(),
            [Chosen::NoDma],
            "a device without DMA needs no tracker"
        );
        let e = plan(TrackingMode::Auto, &[caps("qm0", false, false)]).unwrap_err();
        assert!(e.contains("qm0: no IOMMU dirty tracking (domain without dirty tracking) and no device DMA logging"), "{e}");
    }
}
