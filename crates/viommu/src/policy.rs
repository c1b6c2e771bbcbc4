//! Whether a VM whose assigned devices sit behind the virtio-iommu may migrate (seed 002).
//!
//! ```text
//!  default:  VFIO endpoint behind the vIOMMU ──────────────> blocked (reason: vIOMMU present)
//!  relax:    no VFIO endpoint translated by the vIOMMU ────> allowed (vIOMMU used only for
//!                                                             interrupt remapping)
//!            VFIO endpoint in a translating domain ────────> blocked (reason: names them)
//!            ... appears while migrating (guest kexec'd
//!                with iommu=on, attached and mapped) ──────> cancelled, with that reason
//!  device dirty tracking: refused while any VFIO endpoint is translated — a device tracker
//!  tracks IOVAs, and its ranges come from the guest RAM map, not the vIOMMU's 39/48 bits
//! ```
//!
//! This is QEMU's `x-migration-iommu-pt` RFC (seed 002) as data: the blockers are values a VMM
//! shows, the cancellation is an event it polls, and [`tracking_ranges`] is the range set a
//! device tracker gets (RAM map plus hotplug window, merged down to its range budget).

use std::fmt;
use std::sync::Mutex;

use crate::listener::Mapping;

/// What the device reports to the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViommuView {
    /// Endpoints with a host (VFIO) listener.
    pub vfio_endpoints: Vec<u32>,
    /// VFIO endpoints attached to a translating (non-bypass) domain: (endpoint, domain,
    /// mappings in that domain).
    pub translated: Vec<(u32, u32, usize)>,
}

impl ViommuView {
    /// Mappings visible to VFIO endpoints.
    pub fn mappings(&self) -> usize {
        self.translated.iter().map(|t| t.2).sum()
    }
}

/// A guest action the device reports as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViommuEvent {
    /// A VFIO endpoint was attached to a translating domain.
    Attach {
        /// Domain.
        domain: u32,
        /// Endpoint.
        endpoint: u32,
    },
    /// A mapping was created in a domain with VFIO endpoints.
    Map {
        /// Domain.
        domain: u32,
        /// The mapping.
        mapping: Mapping,
    },
}

/// Why migration cannot start (or must stop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// Default policy: assigned devices behind a vIOMMU are not migrated.
    ViommuPresent {
        /// The VFIO endpoints behind it.
        endpoints: Vec<u32>,
    },
    /// Relaxed policy: the guest is using the vIOMMU for DMA of assigned devices.
    ViommuInUse {
        /// (endpoint, domain, mappings) translated by the vIOMMU.
        translated: Vec<(u32, u32, usize)>,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::ViommuPresent { endpoints } => write!(
                f,
                "migration with a vIOMMU is not supported: assigned endpoint(s) {endpoints:?} sit \
                 behind the virtio-iommu (enable the relaxed policy if the guest uses it only for \
                 interrupt remapping)"
            ),
            Blocker::ViommuInUse { translated } => {
                write!(f, "the guest uses the vIOMMU for DMA of assigned devices:")?;
                for (e, d, n) in translated {
                    write!(f, " endpoint {e} in domain {d} ({n} mappings);")?;
                }
                Ok(())
            }
        }
    }
}

/// A cancellation of a running migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancel {
    /// What the guest did.
    pub event: ViommuEvent,
    /// The blocker it created.
    pub reason: Blocker,
}

impl fmt::Display for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.event {
            ViommuEvent::Attach { domain, endpoint } => write!(
                f,
                "migration cancelled: the guest attached assigned endpoint {endpoint} to \
                 translating domain {domain} during migration ({})",
                self.reason
            ),
            ViommuEvent::Map { domain, mapping } => write!(
                f,
                "migration cancelled: the guest created vIOMMU mapping {mapping} in domain \
                 {domain} during migration ({})",
                self.reason
            ),
        }
    }
}

/// The policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigrationPolicy {
    /// Allow migration while the guest does not use the vIOMMU for DMA of assigned devices
    /// (QEMU's `x-migration-iommu-pt`); cancel it if the guest starts to.
    pub relax: bool,
}

impl MigrationPolicy {
    /// The blockers for starting a migration now; empty when it may start.
    pub fn blockers(&self, view: &ViommuView) -> Vec<Blocker> {
        if view.vfio_endpoints.is_empty() {
            return Vec::new();
        }
        if !self.relax {
            return vec![Blocker::ViommuPresent {
                endpoints: view.vfio_endpoints.clone(),
            }];
        }
        if view.translated.is_empty() {
            Vec::new()
        } else {
            vec![Blocker::ViommuInUse {
                translated: view.translated.clone(),
            }]
        }
    }

    /// Whether device dirty tracking (DMA logging) may start: not while the vIOMMU translates
    /// an assigned device's DMA (its tracker would need IOVA ranges the guest can change).
    pub fn device_dirty_tracking(&self, view: &ViommuView) -> Result<(), Blocker> {
        if view.translated.is_empty() {
            Ok(())
        } else {
            Err(Blocker::ViommuInUse {
                translated: view.translated.clone(),
            })
        }
    }
}

#[derive(Debug, Default)]
struct GuardState {
    active: bool,
    cancel: Option<Cancel>,
}

/// The policy plus the state of a migration, shared between the device (which reports guest
/// actions) and the migration (which starts, polls and ends).
#[derive(Debug)]
pub struct MigrationGuard {
    policy: MigrationPolicy,
    state: Mutex<GuardState>,
}

impl MigrationGuard {
    /// A guard applying `policy`.
    pub fn new(policy: MigrationPolicy) -> MigrationGuard {
        MigrationGuard {
            policy,
            state: Mutex::new(GuardState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy the guard enforces.
    pub fn policy(&self) -> MigrationPolicy {
        self.policy
    }

    /// Start a migration, unless something blocks it.
    pub fn begin(&self, view: &ViommuView) -> Result<(), Vec<Blocker>> {
        let blockers = self.policy.blockers(view);
        if !blockers.is_empty() {
            return Err(blockers);
        }
        let mut s = self.lock();
        s.active = true;
        s.cancel = None;
        Ok(())
    }

    /// The migration ended (completed or failed).
    pub fn end(&self) {
        self.lock().active = false;
    }

    /// Why the running migration must stop, if the guest made it so.
    pub fn cancelled(&self) -> Option<Cancel> {
        self.lock().cancel.clone()
    }

    /// Called by the device after a guest action (see [`ViommuEvent`]).
    pub fn on_event(&self, event: &ViommuEvent, view: &ViommuView) {
        let mut s = self.lock();
        if !s.active || s.cancel.is_some() {
            return;
        }
        if let Some(reason) = self.policy.blockers(view).into_iter().next() {
            s.cancel = Some(Cancel {
                event: *event,
                reason,
            });
        }
    }
}

/// Why tracking ranges cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// No RAM and no hotplug window.
    #[error("no guest memory to track")]
    Empty,
    /// The tracker takes no ranges.
    #[error("the device tracker accepts no ranges")]
    NoBudget,
    /// A region wraps around the 64-bit space.
    #[error("region {start:#x}+{len:#x} wraps around the 64-bit address space")]
    Wraps {
        /// Start.
        start: u64,
        /// Length.
        len: u64,
    },
}

/// The ranges a device dirty tracker (DMA logging) should cover: every RAM region of the guest
/// memory map plus the memory-hotplug window — not the vIOMMU's input range — sorted, with
/// touching ranges joined, then merged across the smallest gaps until at most `max_ranges`
/// remain (a merged range also covers its gap, which is harmless: nothing is DMA-mapped there).
/// Each result is `(start, length)`.
pub fn tracking_ranges(
    ram: &[(u64, u64)],
    hotplug: Option<(u64, u64)>,
    max_ranges: usize,
) -> Result<Vec<(u64, u64)>, RangeError> {
    if max_ranges == 0 {
        return Err(RangeError::NoBudget);
    }
    let mut r: Vec<(u64, u64)> = Vec::new(); // (start, last)
    for &(start, len) in ram.iter().chain(hotplug.iter()) {
        if len == 0 {
            continue;
        }
        let last = start
            .checked_add(len - 1)
            .ok_or(RangeError::Wraps { start, len })?;
        r.push((start, last));
    }
    if r.is_empty() {
        return Err(RangeError::Empty);
    }
    r.sort_unstable();
    let mut joined: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, l) in r {
        match joined.last_mut() {
            Some(prev) if s <= prev.1.saturating_add(1) => prev.1 = prev.1.max(l),
            _ => joined.push((s, l)),
        }
    }
    while joined.len() > max_ranges {
        // Close the smallest gap.
        let (i, _) = joined
            .windows(2)
            .enumerate()
            .min_by_key(|(_, w)| w[1].0 - w[0].1)
            .expect("at least two ranges");
        joined[i].1 = joined[i + 1].1;
        joined.remove(i + 1);
    }
    Ok(joined
        .into_iter()
        .map(|(s, l)| (s, (l - s).saturating_add(1)))
        .collect())
}
