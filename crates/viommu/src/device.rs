//! The virtio-iommu device: endpoints, domains, mappings, and the request handler.
//!
//! ```text
//!  endpoints ──attach──> domains ──> mappings (non-overlapping [iova, last] -> gpa)
//!     │                     │
//!     └ listener (VFIO)     └ every MAP/UNMAP is replayed to the listeners of its endpoints;
//!                             a listener failure undoes the request (status NOMEM/DEVERR)
//! ```
//!
//! Status codes follow the device requirements of virtio 1.3 §5.13.6.3-5.13.6.7, checked in
//! the order the spec lists them. Where the spec names no code this device chooses, and says
//! so: an IOVA outside `input_range` or a domain outside `domain_range` → `S_RANGE`;
//! `virt_end < virt_start` → `S_INVAL`; `MAP_F_MMIO` without `VIRTIO_IOMMU_F_MMIO` and
//! `ATTACH_F_BYPASS` without `VIRTIO_IOMMU_F_BYPASS_CONFIG` count as unrecognized flags
//! (`S_INVAL`); a MAP overlapping a RESV_MEM region → `S_RANGE`; UNMAP with non-zero reserved
//! bytes → `S_INVAL` without unmapping. An unknown request type gets no status at all (used
//! length 0), as §5.13.6.2 asks; this device treats a truncated request and a writable part too
//! small for the tail the same way (the spec names no rule for them). A PROBE whose writable
//! part cannot hold `probe_size` bytes of properties gets `S_INVAL`, as §5.13.6.7.2 asks.
//!
//! QEMU 10.0 (`hw/virtio/virtio-iommu.c` in Debian's 10.0.2, `virtio_iommu_handle_command`)
//! differs in each of these cases:
//! * readable part shorter than the 4-byte head, or writable part shorter than the 4-byte tail:
//!   `virtio_error(vdev, "virtio-iommu bad head/tail size")` (lines 1016-1021). No status is
//!   written and the buffer is detached without being returned; the device is marked broken and,
//!   with `VIRTIO_F_VERSION_1`, sets `NEEDS_RESET` (`hw/virtio/virtio.c` lines 3909-3923), and
//!   queue notifications are dropped while it is broken (lines 2481, 2498) until a device reset
//!   clears it (line 2350).
//! * unknown request type: `S_UNSUPP` in the tail (lines 1059-1060).
//! * request shorter than its type's structure: `S_INVAL` (`virtio_iommu_iov_to_req`, lines
//!   957-966).
//! * PROBE writable part too small for the properties: the full write comes up short, and a bare
//!   tail with `S_DEVERR` is written at the start of the writable part instead (lines
//!   1065-1082).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::listener::{MapListener, Mapping, Perm};
use crate::policy::{MigrationGuard, ViommuEvent, ViommuView};
use crate::proto::{
    ATTACH_F_BYPASS, Config, F_BYPASS, F_BYPASS_CONFIG, F_MAP_UNMAP, F_MMIO, F_PROBE,
    FAULT_F_ADDRESS, FAULT_F_EXEC, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING,
    FAULT_R_UNKNOWN, FaultEvent, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE, Request, ResvMem, Status,
    TAIL_LEN,
};

/// The access a faulting request asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// Read.
    pub read: bool,
    /// Write.
    pub write: bool,
    /// Execute.
    pub exec: bool,
}

/// Why a configuration or endpoint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// `page_size_mask` is empty (§5.13.4.2: at least one bit).
    #[error("page_size_mask must have at least one bit set")]
    EmptyPageSizeMask,
    /// A range with its end before its start.
    #[error("{0} ends before it starts")]
    BadRange(&'static str),
    /// The endpoint ID is taken.
    #[error("endpoint {0} already exists")]
    DuplicateEndpoint(u32),
    /// The endpoint ID is unknown.
    #[error("endpoint {0} does not exist")]
    NoEndpoint(u32),
    /// A listener refused the initial state.
    #[error("endpoint {endpoint}: {source}")]
    Listener {
        /// The endpoint.
        endpoint: u32,
        /// The listener's error.
        #[source]
        source: crate::listener::ListenerError,
    },
}

/// Features and configuration of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Offered features (`proto::F_*`).
    pub features: u64,
    /// The config space.
    pub config: Config,
}

impl Default for DeviceConfig {
    /// MAP/UNMAP, input and domain ranges, PROBE and BYPASS_CONFIG; 4 KiB granule with 2 MiB
    /// and 1 GiB hints; 48-bit IOVAs; 16-bit domain IDs; 512-byte probe buffer; bypass off.
    fn default() -> Self {
        DeviceConfig {
            features: crate::proto::F_INPUT_RANGE
                | crate::proto::F_DOMAIN_RANGE
                | F_MAP_UNMAP
                | F_PROBE
                | F_BYPASS_CONFIG,
            config: Config {
                page_size_mask: (1 << 12) | (1 << 21) | (1 << 30),
                input_range: (0, (1 << 48) - 1),
                domain_range: (0, u32::from(u16::MAX)),
                probe_size: 512,
                bypass: false,
            },
        }
    }
}

/// One endpoint.
struct Endpoint {
    domain: Option<u32>,
    listener: Option<Box<dyn MapListener + Send>>,
    resv: Vec<ResvMem>,
    vfio: bool,
    /// What the listener was last told about bypass.
    bypass: bool,
}

/// One domain.
#[derive(Debug, Default)]
struct Domain {
    bypass: bool,
    endpoints: BTreeSet<u32>,
    /// Mappings by first IOVA.
    maps: BTreeMap<u64, Mapping>,
}

impl Domain {
    /// Mappings overlapping `[start, last]`.
    fn overlapping(&self, start: u64, last: u64) -> Vec<Mapping> {
        let mut out: Vec<Mapping> = Vec::new();
        if let Some((_, m)) = self.maps.range(..start).next_back()
            && m.last >= start
        {
            out.push(*m);
        }
        out.extend(self.maps.range(start..=last).map(|(_, m)| *m));
        out
    }
}

/// The device.
pub struct VirtioIommu {
    cfg: DeviceConfig,
    endpoints: BTreeMap<u32, Endpoint>,
    domains: BTreeMap<u32, Domain>,
    guard: Option<Arc<MigrationGuard>>,
}

impl fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioIommu")
            .field("config", &self.cfg)
            .field("endpoints", &self.endpoints.keys().collect::<Vec<_>>())
            .field("domains", &self.domains.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What the device wrote for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// A status was written; the used length is the writable bytes filled.
    Status {
        /// The status.
        status: Status,
        /// Bytes written (tail, plus properties for PROBE).
        used: usize,
    },
    /// The request could not be parsed: nothing written, used length 0 (§5.13.6).
    NotWritten,
}

impl VirtioIommu {
    /// A device with `cfg`.
    pub fn new(cfg: DeviceConfig) -> Result<VirtioIommu, DeviceError> {
        let c = &cfg.config;
        if c.page_size_mask == 0 {
            return Err(DeviceError::EmptyPageSizeMask);
        }
        if c.input_range.1 < c.input_range.0 {
            return Err(DeviceError::BadRange("input_range"));
        }
        if c.domain_range.1 < c.domain_range.0 {
            return Err(DeviceError::BadRange("domain_range"));
        }
        Ok(VirtioIommu {
            cfg,
            endpoints: BTreeMap::new(),
            domains: BTreeMap::new(),
            guard: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// Change the page-size mask (before the guest reads it: see [`crate::pagesize`]).
    pub fn set_page_size_mask(&mut self, mask: u64) -> Result<(), DeviceError> {
        if mask == 0 {
            return Err(DeviceError::EmptyPageSizeMask);
        }
        self.cfg.config.page_size_mask = mask;
        Ok(())
    }

    /// Watch the guest's use of the vIOMMU for the migration policy.
    pub fn set_migration_guard(&mut self, guard: Arc<MigrationGuard>) {
        self.guard = Some(guard);
    }

    /// Add an endpoint. `listener` mirrors its mappings into the host (a VFIO endpoint);
    /// `None` for an emulated device. `resv` is what PROBE reports for it.
    pub fn add_endpoint(
        &mut self,
        id: u32,
        listener: Option<Box<dyn MapListener + Send>>,
        resv: Vec<ResvMem>,
    ) -> Result<(), DeviceError> {
        if self.endpoints.contains_key(&id) {
            return Err(DeviceError::DuplicateEndpoint(id));
        }
        let vfio = listener.is_some();
        let mut ep = Endpoint {
            domain: None,
            listener,
            resv,
            vfio,
            bypass: false,
        };
        let bypass = self.unattached_bypass();
        if let Some(l) = ep.listener.as_mut()
            && bypass
        {
            l.set_bypass(true).map_err(|source| DeviceError::Listener {
                endpoint: id,
                source,
            })?;
        }
        ep.bypass = bypass;
        self.endpoints.insert(id, ep);
        Ok(())
    }

    /// Remove an endpoint (hot-unplug): detached first, its listener dropped.
    pub fn remove_endpoint(&mut self, id: u32) -> Result<(), DeviceError> {
        let Some(dom) = self
            .endpoints
            .get(&id)
            .ok_or(DeviceError::NoEndpoint(id))?
            .domain
        else {
            self.endpoints.remove(&id);
            return Ok(());
        };
        let _ = self.detach(dom, id);
        self.endpoints.remove(&id);
        Ok(())
    }

    /// The guest writes the config `bypass` field (`VIRTIO_IOMMU_F_BYPASS_CONFIG`).
    pub fn write_bypass(&mut self, value: u8) {
        self.cfg.config.bypass = value & 1 != 0;
        let bypass = self.unattached_bypass();
        for ep in self.endpoints.values_mut().filter(|e| e.domain.is_none()) {
            if ep.bypass != bypass {
                if let Some(l) = ep.listener.as_mut() {
                    if l.set_bypass(bypass).is_ok() {
                        ep.bypass = bypass;
                    }
                } else {
                    ep.bypass = bypass;
                }
            }
        }
    }

    /// Device reset (§5.13.5): every endpoint detached.
    pub fn reset(&mut self) {
        let attached: Vec<(u32, u32)> = self
            .endpoints
            .iter()
            .filter_map(|(id, e)| e.domain.map(|d| (d, *id)))
            .collect();
        for (d, e) in attached {
            let _ = self.detach(d, e);
        }
        self.domains.clear();
    }

    fn unattached_bypass(&self) -> bool {
        (self.cfg.features & F_BYPASS_CONFIG != 0 && self.cfg.config.bypass)
            || self.cfg.features & F_BYPASS != 0
    }

    /// Handle one request: `readable` is the device-readable part, `writable` the
    /// device-writable part (the tail, preceded by the properties buffer for PROBE).
    pub fn handle(&mut self, readable: &[u8], writable: &mut [u8]) -> Completion {
        let Ok(req) = Request::decode(readable) else {
            return Completion::NotWritten;
        };
        if writable.len() < TAIL_LEN {
            return Completion::NotWritten;
        }
        if let Request::Probe { endpoint } = req {
            if self.cfg.features & F_PROBE == 0 {
                return Completion::NotWritten; // §5.13.6.7.2: used length 0
            }
            return self.probe(endpoint, writable);
        }
        let status = self.request(&req);
        let tail = writable.len() - TAIL_LEN;
        writable[tail] = status as u8;
        writable[tail + 1..].fill(0);
        Completion::Status {
            status,
            used: writable.len(),
        }
    }

    /// Handle a decoded request other than PROBE (whose result is a buffer, see
    /// [`handle`](Self::handle)); returns the status.
    pub fn request(&mut self, req: &Request) -> Status {
        match *req {
            Request::Attach {
                domain,
                endpoint,
                flags,
                reserved,
            } => self.attach(domain, endpoint, flags, reserved),
            Request::Detach { domain, endpoint } => self.detach(domain, endpoint),
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => self.map(domain, virt_start, virt_end, phys_start, flags),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
                reserved,
            } => self.unmap(domain, virt_start, virt_end, reserved),
            Request::Probe { endpoint } => {
                let mut buf = vec![0u8; self.cfg.config.probe_size as usize + TAIL_LEN];
                match self.probe(endpoint, &mut buf) {
                    Completion::Status { status, .. } => status,
                    Completion::NotWritten => Status::Unsupp,
                }
            }
        }
    }

    fn in_domain_range(&self, domain: u32) -> bool {
        let (lo, hi) = self.cfg.config.domain_range;
        self.cfg.features & crate::proto::F_DOMAIN_RANGE == 0 || (lo..=hi).contains(&domain)
    }

    fn attach(&mut self, domain: u32, endpoint: u32, flags: u32, reserved: [u8; 4]) -> Status {
        if reserved != [0; 4] {
            return Status::Inval;
        }
        let known = if self.cfg.features & F_BYPASS_CONFIG != 0 {
            ATTACH_F_BYPASS
        } else {
            0
        };
        if flags & !known != 0 {
            return Status::Inval;
        }
        if !self.endpoints.contains_key(&endpoint) {
            return Status::NoEnt;
        }
        if !self.in_domain_range(domain) {
            return Status::Range;
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if let Some(d) = self.domains.get(&domain)
            && d.bypass != bypass
        {
            return Status::Inval;
        }
        let current = self.endpoints[&endpoint].domain;
        if current == Some(domain) {
            return Status::Ok;
        }
        // Attached elsewhere: behave as DETACH then ATTACH.
        if let Some(old) = current {
            let st = self.detach(old, endpoint);
            if st != Status::Ok {
                return Status::Unsupp;
            }
        }
        let maps: Vec<Mapping> = self
            .domains
            .get(&domain)
            .map(|d| d.maps.values().copied().collect())
            .unwrap_or_default();
        let ep = self.endpoints.get_mut(&endpoint).expect("checked above");
        if let Some(l) = ep.listener.as_mut() {
            // Leave the unattached state, then replay the domain.
            if ep.bypass && !bypass {
                if let Err(e) = l.set_bypass(false) {
                    return listener_status(&e);
                }
                ep.bypass = false;
            }
            if bypass && !ep.bypass {
                if let Err(e) = l.set_bypass(true) {
                    return listener_status(&e);
                }
                ep.bypass = true;
            }
            let mut done: Vec<Mapping> = Vec::new();
            for m in maps.iter().flat_map(Mapping::pieces) {
                if let Err(e) = l.map(&m) {
                    for d in done.iter().rev() {
                        let _ = l.unmap(d);
                    }
                    return listener_status(&e);
                }
                done.push(m);
            }
        } else {
            ep.bypass = bypass;
        }
        ep.domain = Some(domain);
        let vfio = ep.vfio;
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            ..Domain::default()
        });
        d.endpoints.insert(endpoint);
        if vfio && !bypass {
            self.notify(ViommuEvent::Attach { domain, endpoint });
        }
        Status::Ok
    }

    fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        if ep.domain != Some(domain) {
            return Status::Inval;
        }
        let maps: Vec<Mapping> = self.domains[&domain].maps.values().copied().collect();
        let unattached_bypass = self.unattached_bypass();
        let ep = self.endpoints.get_mut(&endpoint).expect("checked above");
        if let Some(l) = ep.listener.as_mut() {
            for m in maps.iter().flat_map(Mapping::pieces) {
                // The endpoint must lose access whatever the listener says; a failure here
                // is the host's to report, not the guest's.
                let _ = l.unmap(&m);
            }
            if ep.bypass != unattached_bypass && l.set_bypass(unattached_bypass).is_ok() {
                ep.bypass = unattached_bypass;
            }
        } else {
            ep.bypass = unattached_bypass;
        }
        ep.domain = None;
        let d = self.domains.get_mut(&domain).expect("attached");
        d.endpoints.remove(&endpoint);
        if d.endpoints.is_empty() {
            // §5.13.6.4: a domain without endpoints ceases to exist.
            self.domains.remove(&domain);
        }
        Status::Ok
    }

    fn overlaps_resv(&self, domain: &Domain, start: u64, last: u64) -> bool {
        domain.endpoints.iter().any(|e| {
            self.endpoints[e]
                .resv
                .iter()
                .any(|r| r.start <= last && start <= r.end)
        })
    }

    fn map(&mut self, domain: u32, start: u64, last: u64, phys: u64, flags: u32) -> Status {
        if self.cfg.features & F_MAP_UNMAP == 0 {
            return Status::Unsupp;
        }
        if last < start {
            return Status::Inval;
        }
        // The spec's rules, in its order (§5.13.6.5.2) ...
        let g = self.cfg.config.granule();
        let end_aligned = last.wrapping_add(1).is_multiple_of(g);
        if !start.is_multiple_of(g) || !phys.is_multiple_of(g) || !end_aligned {
            return Status::Range;
        }
        if let Some(d) = self.domains.get(&domain)
            && !d.overlapping(start, last).is_empty()
        {
            return Status::Inval;
        }
        let known = MAP_F_READ
            | MAP_F_WRITE
            | if self.cfg.features & F_MMIO != 0 {
                MAP_F_MMIO
            } else {
                0
            };
        if flags & !known != 0 {
            return Status::Inval;
        }
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        // ... then this device's: inside input_range, no wrap of the physical range, clear of
        // the endpoints' reserved regions.
        let (lo, hi) = self.cfg.config.input_range;
        if start < lo || last > hi || phys.checked_add(last - start).is_none() {
            return Status::Range;
        }
        if self.overlaps_resv(d, start, last) {
            return Status::Range;
        }
        let m = Mapping {
            iova: start,
            last,
            gpa: phys,
            perm: Perm {
                read: flags & MAP_F_READ != 0,
                write: flags & MAP_F_WRITE != 0,
                mmio: flags & MAP_F_MMIO != 0,
            },
        };
        let eps: Vec<u32> = d.endpoints.iter().copied().collect();
        // Mirror into every listener; undo everything on the first failure.
        let mut done: Vec<(u32, Mapping)> = Vec::new();
        for e in &eps {
            if let Some(l) = self
                .endpoints
                .get_mut(e)
                .and_then(|ep| ep.listener.as_mut())
            {
                for p in m.pieces() {
                    if let Err(err) = l.map(&p) {
                        for (de, dp) in done.iter().rev() {
                            if let Some(dl) = self
                                .endpoints
                                .get_mut(de)
                                .and_then(|ep| ep.listener.as_mut())
                            {
                                let _ = dl.unmap(dp);
                            }
                        }
                        return listener_status(&err);
                    }
                    done.push((*e, p));
                }
            }
        }
        let has_vfio = eps.iter().any(|e| self.endpoints[e].vfio);
        self.domains
            .get_mut(&domain)
            .expect("checked above")
            .maps
            .insert(start, m);
        if has_vfio {
            self.notify(ViommuEvent::Map { domain, mapping: m });
        }
        Status::Ok
    }

    fn unmap(&mut self, domain: u32, start: u64, last: u64, reserved: [u8; 4]) -> Status {
        if self.cfg.features & F_MAP_UNMAP == 0 {
            return Status::Unsupp;
        }
        if reserved != [0; 4] {
            return Status::Inval;
        }
        if last < start {
            return Status::Inval;
        }
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        let hit = d.overlapping(start, last);
        if hit.iter().any(|m| m.iova < start || m.last > last) {
            return Status::Range; // would split a mapping: remove nothing
        }
        let eps: Vec<u32> = d.endpoints.iter().copied().collect();
        let mut done: Vec<(u32, Mapping)> = Vec::new();
        for e in &eps {
            if let Some(l) = self
                .endpoints
                .get_mut(e)
                .and_then(|ep| ep.listener.as_mut())
            {
                for p in hit.iter().flat_map(Mapping::pieces) {
                    if let Err(err) = l.unmap(&p) {
                        for (de, dp) in done.iter().rev() {
                            if let Some(dl) = self
                                .endpoints
                                .get_mut(de)
                                .and_then(|ep| ep.listener.as_mut())
                            {
                                let _ = dl.map(dp);
                            }
                        }
                        return listener_status(&err);
                    }
                    done.push((*e, p));
                }
            }
        }
        let d = self.domains.get_mut(&domain).expect("checked above");
        for m in &hit {
            d.maps.remove(&m.iova);
        }
        Status::Ok
    }

    fn probe(&mut self, endpoint: u32, writable: &mut [u8]) -> Completion {
        let tail = writable.len() - TAIL_LEN;
        let size = self.cfg.config.probe_size as usize;
        let status = match self.endpoints.get(&endpoint) {
            None => Status::NoEnt,
            Some(_) if tail < size => Status::Inval,
            Some(ep) => {
                let props = &mut writable[..size];
                props.fill(0);
                let mut at = 0;
                for r in &ep.resv {
                    if at + ResvMem::LEN > size {
                        break;
                    }
                    props[at..at + ResvMem::LEN].copy_from_slice(&r.encode());
                    at += ResvMem::LEN;
                }
                Status::Ok
            }
        };
        writable[tail] = status as u8;
        writable[tail + 1..].fill(0);
        Completion::Status {
            status,
            used: writable.len(),
        }
    }

    fn notify(&self, ev: ViommuEvent) {
        if let Some(g) = &self.guard {
            g.on_event(&ev, &self.view());
        }
    }

    /// Whether `endpoint` may access `iova` as `access` asks under the guest's current
    /// translation: `None` if it may (the access is recoverable: the host side can retry it),
    /// otherwise the fault event the guest is told of (virtio 1.3 §5.13.6.9):
    /// * an endpoint this device does not manage: `FAULT_R_UNKNOWN`;
    /// * an endpoint attached to no domain, while unattached endpoints do not bypass:
    ///   `FAULT_R_DOMAIN`;
    /// * an address no mapping of its (non-bypass) domain covers, or covers without the
    ///   access: `FAULT_R_MAPPING`.
    ///
    /// A virtio-iommu mapping has no execute permission (MAP flags are READ, WRITE and MMIO), so
    /// an execute request is checked as a read. The event carries the access flags and the
    /// address (`FAULT_F_ADDRESS`).
    pub fn fault_for(&self, endpoint: u32, iova: u64, access: Access) -> Option<FaultEvent> {
        let mut flags = FAULT_F_ADDRESS;
        if access.read {
            flags |= FAULT_F_READ;
        }
        if access.write {
            flags |= FAULT_F_WRITE;
        }
        if access.exec {
            flags |= FAULT_F_EXEC;
        }
        let event = |reason| {
            Some(FaultEvent {
                reason,
                flags,
                endpoint,
                address: iova,
            })
        };
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return event(FAULT_R_UNKNOWN);
        };
        let Some(domain) = ep.domain.and_then(|d| self.domains.get(&d)) else {
            return if self.unattached_bypass() {
                None
            } else {
                event(FAULT_R_DOMAIN)
            };
        };
        if domain.bypass {
            return None;
        }
        let permitted = domain.overlapping(iova, iova).first().is_some_and(|m| {
            (m.perm.read || !(access.read || access.exec)) && (m.perm.write || !access.write)
        });
        if permitted {
            None
        } else {
            event(FAULT_R_MAPPING)
        }
    }

    /// The domain an endpoint is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.endpoints.get(&endpoint).and_then(|e| e.domain)
    }

    /// The mappings of a domain, ordered by IOVA.
    pub fn mappings(&self, domain: u32) -> Vec<Mapping> {
        self.domains
            .get(&domain)
            .map(|d| d.maps.values().copied().collect())
            .unwrap_or_default()
    }

    /// Domains that exist.
    pub fn domains(&self) -> Vec<u32> {
        self.domains.keys().copied().collect()
    }

    /// Whether an endpoint currently bypasses translation.
    pub fn endpoint_bypass(&self, endpoint: u32) -> Option<bool> {
        self.endpoints.get(&endpoint).map(|e| e.bypass)
    }

    /// Tell every VFIO endpoint's listener that migration dirty tracking started or stopped
    /// ([`MapListener::set_tracking`]).
    pub fn set_dirty_tracking(&mut self, on: bool) {
        for l in self
            .endpoints
            .values_mut()
            .filter_map(|e| e.listener.as_mut())
        {
            l.set_tracking(on);
        }
    }

    /// The guest-physical ranges every listener found dirty while unmapping since the last
    /// call ([`MapListener::take_dirty`]), for the migration's next harvest.
    pub fn take_dirty(&mut self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for l in self
            .endpoints
            .values_mut()
            .filter_map(|e| e.listener.as_mut())
        {
            out.extend(l.take_dirty());
        }
        out
    }

    /// Borrow an endpoint's listener.
    pub fn listener_mut(
        &mut self,
        endpoint: u32,
    ) -> Option<&mut (dyn MapListener + Send + 'static)> {
        self.endpoints
            .get_mut(&endpoint)
            .and_then(|e| e.listener.as_deref_mut())
    }

    /// What the migration policy looks at: VFIO endpoints, which of them are translated by the
    /// vIOMMU, and how many mappings their domains hold.
    pub fn view(&self) -> ViommuView {
        let mut v = ViommuView::default();
        for (id, e) in &self.endpoints {
            if !e.vfio {
                continue;
            }
            v.vfio_endpoints.push(*id);
            if let Some(d) = e.domain.and_then(|d| self.domains.get(&d).map(|x| (d, x)))
                && !d.1.bypass
            {
                v.translated.push((*id, d.0, d.1.maps.len()));
            }
        }
        v
    }
}

fn listener_status(e: &crate::listener::ListenerError) -> Status {
    if e.no_memory {
        Status::NoMem
    } else {
        Status::DevErr
    }
}
