//! Agreeing on the virtio-iommu `page_size_mask` with the host IOMMUs of the VFIO endpoints
//! (seed 004).
//!
//! ```text
//!  mask = default (the host page mask) AND every VFIO endpoint's host IOMMU mask
//!  granule = lowest set bit (virtio 1.3 §5.13.6); the other bits only hint block sizes
//!  cold plug (machine not started): the mask may change; an empty AND is an error
//!  hotplug (guest running):         a different granule is an error (the guest may already
//!                                   have mapped at the old one); a different mask with the
//!                                   same granule is only a warning (sub-optimal block sizes)
//!  guest: a granule above the guest's PAGE_SIZE cannot work (Linux's virtio-iommu driver
//!         refuses it): host 64K / guest 4K fails, host 4K / guest 64K works
//! ```

use std::fmt;

/// The granule of a mask (its lowest set bit), or 0 for an empty mask.
pub fn granule(mask: u64) -> u64 {
    if mask == 0 {
        0
    } else {
        1 << mask.trailing_zeros()
    }
}

/// Why a mask cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// A mask with no bit set.
    #[error("{who} has an empty page-size mask")]
    Empty {
        /// Which mask.
        who: String,
    },
    /// Cold plug: nothing in common.
    #[error(
        "endpoint {endpoint} page-size mask {endpoint_mask:#x} has no size in common with the virtio-iommu mask {current:#x}"
    )]
    Incompatible {
        /// The endpoint.
        endpoint: String,
        /// Its host IOMMU mask.
        endpoint_mask: u64,
        /// The mask before it.
        current: u64,
    },
    /// Hotplug: the granule would change under a running guest.
    #[error(
        "hotplugged endpoint {endpoint} needs granule {endpoint_granule:#x} (mask {endpoint_mask:#x}), but the running guest uses {granule:#x} (mask {current:#x})"
    )]
    GranuleChange {
        /// The endpoint.
        endpoint: String,
        /// Its host IOMMU mask.
        endpoint_mask: u64,
        /// Its granule.
        endpoint_granule: u64,
        /// The current mask.
        current: u64,
        /// The current granule.
        granule: u64,
    },
    /// The granule is larger than the guest's page size.
    #[error(
        "virtio-iommu granule {granule:#x} (mask {mask:#x}) is larger than the guest page size {guest_page:#x}; the guest driver cannot use it"
    )]
    GranuleTooLarge {
        /// The granule.
        granule: u64,
        /// The mask.
        mask: u64,
        /// The guest's PAGE_SIZE.
        guest_page: u64,
    },
}

/// A note that is not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The endpoint.
    pub endpoint: String,
    /// Its mask.
    pub endpoint_mask: u64,
    /// The mask in use.
    pub current: u64,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hotplugged endpoint {} page-size mask {:#x} differs from the virtio-iommu mask {:#x} (same granule): the guest may use block sizes it handles less well",
            self.endpoint, self.endpoint_mask, self.current
        )
    }
}

/// The negotiation state of one virtio-iommu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    mask: u64,
    started: bool,
}

impl Negotiation {
    /// Start from the VMM's default mask (the host page mask, as QEMU's
    /// `qemu_real_host_page_mask()` default).
    pub fn new(default_mask: u64) -> Result<Negotiation, NegotiationError> {
        if default_mask == 0 {
            return Err(NegotiationError::Empty {
                who: "the default".into(),
            });
        }
        Ok(Negotiation {
            mask: default_mask,
            started: false,
        })
    }

    /// A default mask for a host page size: every power of two from it up.
    pub fn host_page_mask(page: u64) -> u64 {
        !(page.max(1).next_power_of_two() - 1)
    }

    /// The mask to present.
    pub fn mask(&self) -> u64 {
        self.mask
    }

    /// The granule.
    pub fn granule(&self) -> u64 {
        granule(self.mask)
    }

    /// The machine started: from now on endpoints are hotplugged.
    pub fn machine_started(&mut self) {
        self.started = true;
    }

    /// Whether the machine has started.
    pub fn started(&self) -> bool {
        self.started
    }

    /// A VFIO endpoint whose host IOMMU supports `endpoint_mask` joins.
    pub fn add_endpoint(
        &mut self,
        endpoint: &str,
        endpoint_mask: u64,
    ) -> Result<Option<Warning>, NegotiationError> {
        if endpoint_mask == 0 {
            return Err(NegotiationError::Empty {
                who: format!("endpoint {endpoint}"),
            });
        }
        if self.started {
            if granule(endpoint_mask) != self.granule() {
                return Err(NegotiationError::GranuleChange {
                    endpoint: endpoint.into(),
                    endpoint_mask,
                    endpoint_granule: granule(endpoint_mask),
                    current: self.mask,
                    granule: self.granule(),
                });
            }
            if endpoint_mask != self.mask {
                return Ok(Some(Warning {
                    endpoint: endpoint.into(),
                    endpoint_mask,
                    current: self.mask,
                }));
            }
            return Ok(None);
        }
        let new = self.mask & endpoint_mask;
        if new == 0 {
            return Err(NegotiationError::Incompatible {
                endpoint: endpoint.into(),
                endpoint_mask,
                current: self.mask,
            });
        }
        self.mask = new;
        Ok(None)
    }

    /// Check the granule against the guest's page size.
    pub fn check_guest(&self, guest_page: u64) -> Result<(), NegotiationError> {
        if self.granule() > guest_page {
            return Err(NegotiationError::GranuleTooLarge {
                granule: self.granule(),
                mask: self.mask,
                guest_page,
            });
        }
        Ok(())
    }
}
