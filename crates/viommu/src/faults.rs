//! I/O page faults from the host, answered for the guest's translation (feature `iommufd`).
//!
//! ```text
//!  VFIO device DMA misses ─> kernel ─> iommufd FaultQueue ─> FaultRelay::relay
//!      every group is answered to the kernel:  SUCCESS  the guest's domain permits the access
//!                                              INVALID  otherwise ─> FaultEvent for the guest
//!                                                                  (EventQueue, virtqueue 1)
//! ```
//!
//! A virtio-iommu fault event has no reply path (virtio 1.3 §5.13.6.9: the driver can only
//! log it), so a recoverable page request must be answered to the kernel by the VMM, never
//! left to the guest, and only a fault the guest's translation does not permit becomes an
//! event. The decision is [`VirtioIommu::fault_for`]. The kernel delivers a page request group
//! whole within one read, every record carrying the group's cookie; the relay answers each
//! cookie once per read, `INVALID` if any record of the group is refused.
//!
//! virtio-iommu 1.3 has no PASID in its requests, so a page request tagged with a PASID cannot
//! be resolved here: it is answered `INVALID` and reported with `FAULT_R_UNKNOWN`.

use std::collections::BTreeMap;
use std::time::Duration;

use livemig_iommufd::{FaultQueue, PageRequest, PageResponse};

use crate::device::{Access, VirtioIommu};
use crate::proto::{FAULT_F_ADDRESS, FAULT_R_UNKNOWN, FaultEvent};

/// What one batch of page requests came to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Triage {
    /// One answer per group (cookie), in the order the groups arrived.
    pub responses: Vec<(u32, PageResponse)>,
    /// Faults for the guest's event queue.
    pub events: Vec<FaultEvent>,
    /// Records from an iommufd device this relay was not told of (answered `INVALID`, no
    /// event: the guest has no endpoint to blame).
    pub unknown_device: u32,
}

/// Maps iommufd device ids to virtio-iommu endpoints and answers their page requests.
#[derive(Debug, Default, Clone)]
pub struct FaultRelay {
    endpoints: BTreeMap<u32, u32>,
}

impl FaultRelay {
    /// A relay that knows no device yet.
    pub fn new() -> FaultRelay {
        FaultRelay::default()
    }

    /// The VFIO device bound to iommufd as `dev_id` is the guest's endpoint `endpoint`.
    pub fn add_device(&mut self, dev_id: u32, endpoint: u32) {
        self.endpoints.insert(dev_id, endpoint);
    }

    /// Forgets a device (its requests are then refused).
    pub fn remove_device(&mut self, dev_id: u32) {
        self.endpoints.remove(&dev_id);
    }

    /// Decides a batch of page requests against `dev`'s current translation.
    pub fn triage(&self, dev: &VirtioIommu, requests: &[PageRequest]) -> Triage {
        let mut out = Triage::default();
        // cookie -> index into `responses`
        let mut groups: BTreeMap<u32, usize> = BTreeMap::new();
        for r in requests {
            let refused = match self.endpoints.get(&r.dev_id) {
                None => {
                    out.unknown_device += 1;
                    true
                }
                Some(&endpoint) if r.pasid.is_some() => {
                    out.events.push(FaultEvent {
                        reason: FAULT_R_UNKNOWN,
                        flags: FAULT_F_ADDRESS,
                        endpoint,
                        address: r.addr,
                    });
                    true
                }
                Some(&endpoint) => {
                    let access = Access {
                        read: r.perm.read,
                        write: r.perm.write,
                        exec: r.perm.exec,
                    };
                    match dev.fault_for(endpoint, r.addr, access) {
                        None => false,
                        Some(ev) => {
                            out.events.push(ev);
                            true
                        }
                    }
                }
            };
            let at = *groups.entry(r.cookie).or_insert_with(|| {
                out.responses.push((r.cookie, PageResponse::Success));
                out.responses.len() - 1
            });
            if refused {
                out.responses[at].1 = PageResponse::Invalid;
            }
        }
        out
    }

    /// Waits up to `timeout` for page requests on `queue`, answers every group to the kernel,
    /// and returns what was decided; the caller queues `events` for the guest
    /// (`queue::EventQueue::push` with feature `virtio-queue`). An empty [`Triage`] means
    /// nothing arrived.
    pub fn relay(
        &self,
        queue: &FaultQueue,
        dev: &VirtioIommu,
        timeout: Option<Duration>,
    ) -> Result<Triage, livemig_iommufd::Error> {
        let requests = queue.read_requests(timeout)?;
        let triage = self.triage(dev, &requests);
        for &(cookie, answer) in &triage.responses {
            queue.respond(cookie, answer)?;
        }
        Ok(triage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceConfig;
    use crate::proto::{FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING};
    use crate::proto::{MAP_F_READ, Request, Status};
    use livemig_iommufd::FaultPerm;

    fn req(dev_id: u32, addr: u64, write: bool, cookie: u32) -> PageRequest {
        PageRequest {
            dev_id,
            pasid: None,
            grpid: 0,
            perm: FaultPerm {
                read: true,
                write,
                ..Default::default()
            },
            addr,
            length: 0,
            cookie,
            last_page: true,
        }
    }

    fn device() -> VirtioIommu {
        let mut dev = VirtioIommu::new(DeviceConfig::default()).unwrap();
        dev.add_endpoint(8, None, vec![]).unwrap();
        dev.add_endpoint(9, None, vec![]).unwrap();
        let attach = Request::Attach {
            domain: 1,
            endpoint: 8,
            flags: 0,
            reserved: [0; 4],
        };
        assert_eq!(dev.request(&attach), Status::Ok);
        let map = Request::Map {
            domain: 1,
            virt_start: 0x10000,
            virt_end: 0x1ffff,
            phys_start: 0x8000_0000,
            flags: MAP_F_READ,
        };
        assert_eq!(dev.request(&map), Status::Ok);
        dev
    }

    /// Each outcome of the decision, and its negative: a permitted access is answered SUCCESS
    /// and raises no event; each refusal is INVALID with the event the spec names.
    #[test]
    fn triage_answers_every_group_and_reports_only_refusals() {
        let dev = device();
        let mut relay = FaultRelay::new();
        relay.add_device(3, 8);
        relay.add_device(4, 9);
        let t = relay.triage(
            &dev,
            &[
                req(3, 0x10800, false, 1), // mapped, read: recoverable
                req(3, 0x10800, true, 2),  // mapped read-only, write asked
                req(3, 0x30000, false, 3), // not mapped
                req(4, 0x10800, false, 4), // endpoint 9 attached nowhere
                req(5, 0x10800, false, 5), // unknown device
            ],
        );
        assert_eq!(
            t.responses,
            vec![
                (1, PageResponse::Success),
                (2, PageResponse::Invalid),
                (3, PageResponse::Invalid),
                (4, PageResponse::Invalid),
                (5, PageResponse::Invalid),
            ]
        );
        assert_eq!(t.unknown_device, 1);
        let reasons: Vec<_> = t.events.iter().map(|e| (e.reason, e.endpoint)).collect();
        assert_eq!(
            reasons,
            vec![
                (FAULT_R_MAPPING, 8),
                (FAULT_R_MAPPING, 8),
                (FAULT_R_DOMAIN, 9)
            ]
        );
        assert_eq!(
            t.events[0].flags,
            FAULT_F_READ | FAULT_F_WRITE | FAULT_F_ADDRESS
        );
        assert_eq!(t.events[1].address, 0x30000);
    }

    /// A group is answered once; one refused record makes the whole group INVALID.
    #[test]
    fn a_group_is_answered_once_and_refused_if_any_page_is() {
        let dev = device();
        let mut relay = FaultRelay::new();
        relay.add_device(3, 8);
        let mut first = req(3, 0x10000, false, 7);
        first.last_page = false;
        let t = relay.triage(&dev, &[first, req(3, 0x40000, false, 7)]);
        assert_eq!(t.responses, vec![(7, PageResponse::Invalid)]);
        assert_eq!(t.events.len(), 1);
        let mut pasid = req(3, 0x10000, false, 8);
        pasid.pasid = Some(1);
        let t = relay.triage(&dev, &[pasid]);
        assert_eq!(t.responses, vec![(8, PageResponse::Invalid)]);
        assert_eq!(t.events[0].reason, FAULT_R_UNKNOWN);
    }
}
