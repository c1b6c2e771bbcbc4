//! The virtio-iommu wire format (virtio 1.3 §5.13, "IOMMU Device"; Linux 6.12
//! `include/uapi/linux/virtio_iommu.h`). Everything little endian.
//!
//! ```text
//!  request  = readable part [ head: type u8, reserved[3] | body ]  +  writable part [ tail ]
//!  tail     = status u8, reserved[3]           (PROBE: properties[probe_size] precede it)
//!
//!  ATTACH  head | domain le32 | endpoint le32 | flags le32 | reserved[4]              20 B
//!  DETACH  head | domain le32 | endpoint le32 | reserved[8]                           20 B
//!  MAP     head | domain le32 | virt_start le64 | virt_end le64 | phys_start le64 | flags le32  36 B
//!  UNMAP   head | domain le32 | virt_start le64 | virt_end le64 | reserved[4]        28 B
//!  PROBE   head | endpoint le32 | reserved[64]                                       72 B
//!  config  page_size_mask le64 | input_range le64 x2 | domain_range le32 x2 | probe_size le32
//!          | bypass u8 | reserved[3]                                                 40 B
//! ```

use core::fmt;

/// Device ID of a virtio-iommu (§5.13.1).
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// `VIRTIO_IOMMU_F_INPUT_RANGE`: `input_range` is valid.
pub const F_INPUT_RANGE: u64 = 1 << 0;
/// `VIRTIO_IOMMU_F_DOMAIN_RANGE`: `domain_range` is valid.
pub const F_DOMAIN_RANGE: u64 = 1 << 1;
/// `VIRTIO_IOMMU_F_MAP_UNMAP`: MAP and UNMAP are available.
pub const F_MAP_UNMAP: u64 = 1 << 2;
/// `VIRTIO_IOMMU_F_BYPASS` (legacy): unattached endpoints bypass translation.
pub const F_BYPASS: u64 = 1 << 3;
/// `VIRTIO_IOMMU_F_PROBE`: PROBE is available, `probe_size` is valid.
pub const F_PROBE: u64 = 1 << 4;
/// `VIRTIO_IOMMU_F_MMIO`: `VIRTIO_IOMMU_MAP_F_MMIO` is available.
pub const F_MMIO: u64 = 1 << 5;
/// `VIRTIO_IOMMU_F_BYPASS_CONFIG`: the config field `bypass` and `ATTACH_F_BYPASS`.
pub const F_BYPASS_CONFIG: u64 = 1 << 6;

/// `VIRTIO_IOMMU_ATTACH_F_BYPASS`.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;
/// `VIRTIO_IOMMU_MAP_F_READ`.
pub const MAP_F_READ: u32 = 1 << 0;
/// `VIRTIO_IOMMU_MAP_F_WRITE`.
pub const MAP_F_WRITE: u32 = 1 << 1;
/// `VIRTIO_IOMMU_MAP_F_MMIO`.
pub const MAP_F_MMIO: u32 = 1 << 2;

/// `VIRTIO_IOMMU_PROBE_T_RESV_MEM`.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// `VIRTIO_IOMMU_PROBE_T_MASK`: the 12-bit `type` of a property header; the top four bits of
/// the le16 are `reserved` (virtio 1.3 §5.13.6.7, `struct virtio_iommu_probe_property`).
pub const PROBE_T_MASK: u16 = 0xfff;
/// `VIRTIO_IOMMU_RESV_MEM_T_RESERVED`.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// `VIRTIO_IOMMU_RESV_MEM_T_MSI`.
pub const RESV_MEM_T_MSI: u8 = 1;

/// Bytes of the request head and of the tail.
pub const HEAD_LEN: usize = 4;
/// Bytes of the tail.
pub const TAIL_LEN: usize = 4;
/// Bytes of the config space.
pub const CONFIG_LEN: usize = 40;

/// A request type (§5.13.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReqType {
    /// `VIRTIO_IOMMU_T_ATTACH`.
    Attach = 1,
    /// `VIRTIO_IOMMU_T_DETACH`.
    Detach = 2,
    /// `VIRTIO_IOMMU_T_MAP`.
    Map = 3,
    /// `VIRTIO_IOMMU_T_UNMAP`.
    Unmap = 4,
    /// `VIRTIO_IOMMU_T_PROBE`.
    Probe = 5,
}

impl TryFrom<u8> for ReqType {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            1 => ReqType::Attach,
            2 => ReqType::Detach,
            3 => ReqType::Map,
            4 => ReqType::Unmap,
            5 => ReqType::Probe,
            other => return Err(other),
        })
    }
}

impl ReqType {
    /// Bytes of the readable part (head and body).
    pub const fn readable_len(self) -> usize {
        match self {
            ReqType::Attach | ReqType::Detach => 20,
            ReqType::Map => 36,
            ReqType::Unmap => 28,
            ReqType::Probe => 72,
        }
    }
}

/// A request status (§5.13.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// `S_OK`: success.
    Ok = 0,
    /// `S_IOERR`: virtio communication error.
    IoErr = 1,
    /// `S_UNSUPP`: unsupported request.
    Unsupp = 2,
    /// `S_DEVERR`: internal device error.
    DevErr = 3,
    /// `S_INVAL`: invalid parameters.
    Inval = 4,
    /// `S_RANGE`: out-of-range parameters.
    Range = 5,
    /// `S_NOENT`: entry not found.
    NoEnt = 6,
    /// `S_FAULT`: bad address.
    Fault = 7,
    /// `S_NOMEM`: insufficient resources.
    NoMem = 8,
}

impl TryFrom<u8> for Status {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::IoErr,
            2 => Status::Unsupp,
            3 => Status::DevErr,
            4 => Status::Inval,
            5 => Status::Range,
            6 => Status::NoEnt,
            7 => Status::Fault,
            8 => Status::NoMem,
            other => return Err(other),
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "VIRTIO_IOMMU_S_OK",
            Status::IoErr => "VIRTIO_IOMMU_S_IOERR",
            Status::Unsupp => "VIRTIO_IOMMU_S_UNSUPP",
            Status::DevErr => "VIRTIO_IOMMU_S_DEVERR",
            Status::Inval => "VIRTIO_IOMMU_S_INVAL",
            Status::Range => "VIRTIO_IOMMU_S_RANGE",
            Status::NoEnt => "VIRTIO_IOMMU_S_NOENT",
            Status::Fault => "VIRTIO_IOMMU_S_FAULT",
            Status::NoMem => "VIRTIO_IOMMU_S_NOMEM",
        })
    }
}

/// A decoded request. Reserved bytes are kept so the handler can apply the spec's rules about
/// them (ATTACH must reject non-zero reserved bytes, DETACH and PROBE must ignore them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// ATTACH (§5.13.6.3).
    Attach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
        /// `ATTACH_F_*`.
        flags: u32,
        /// The reserved bytes.
        reserved: [u8; 4],
    },
    /// DETACH (§5.13.6.4).
    Detach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
    },
    /// MAP (§5.13.6.5).
    Map {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// Guest-physical address of `virt_start`.
        phys_start: u64,
        /// `MAP_F_*`.
        flags: u32,
    },
    /// UNMAP (§5.13.6.6).
    Unmap {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// The reserved bytes.
        reserved: [u8; 4],
    },
    /// PROBE (§5.13.6.7).
    Probe {
        /// Endpoint ID.
        endpoint: u32,
    },
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from(le32(b, o)) | (u64::from(le32(b, o + 4)) << 32)
}

/// Why a readable part could not be parsed. The spec's answer to both is to return the
/// buffers without writing a status (used length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the request head.
    #[error("request of {0} bytes has no head")]
    NoHead(usize),
    /// An unknown request type.
    #[error("unknown virtio-iommu request type {0}")]
    UnknownType(u8),
    /// Shorter than its type needs.
    #[error("{ty:?} request is {len} bytes, needs {need}")]
    Short {
        /// The type.
        ty: ReqType,
        /// Bytes given.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
}

impl Request {
    /// Parse the readable part of a request (extra trailing bytes are ignored).
    pub fn decode(b: &[u8]) -> Result<Request, ParseError> {
        if b.len() < HEAD_LEN {
            return Err(ParseError::NoHead(b.len()));
        }
        let ty = ReqType::try_from(b[0]).map_err(ParseError::UnknownType)?;
        let need = ty.readable_len();
        if b.len() < need {
            return Err(ParseError::Short {
                ty,
                len: b.len(),
                need,
            });
        }
        Ok(match ty {
            ReqType::Attach => Request::Attach {
                domain: le32(b, 4),
                endpoint: le32(b, 8),
                flags: le32(b, 12),
                reserved: [b[16], b[17], b[18], b[19]],
            },
            ReqType::Detach => Request::Detach {
                domain: le32(b, 4),
                endpoint: le32(b, 8),
            },
            ReqType::Map => Request::Map {
                domain: le32(b, 4),
                virt_start: le64(b, 8),
                virt_end: le64(b, 16),
                phys_start: le64(b, 24),
                flags: le32(b, 32),
            },
            ReqType::Unmap => Request::Unmap {
                domain: le32(b, 4),
                virt_start: le64(b, 8),
                virt_end: le64(b, 16),
                reserved: [b[24], b[25], b[26], b[27]],
            },
            ReqType::Probe => Request::Probe {
                endpoint: le32(b, 4),
            },
        })
    }

    /// The readable part as a driver writes it (reserved bytes of DETACH and PROBE zero).
    pub fn encode(&self) -> Vec<u8> {
        let (ty, len) = match self {
            Request::Attach { .. } => (ReqType::Attach, 20),
            Request::Detach { .. } => (ReqType::Detach, 20),
            Request::Map { .. } => (ReqType::Map, 36),
            Request::Unmap { .. } => (ReqType::Unmap, 28),
            Request::Probe { .. } => (ReqType::Probe, 72),
        };
        let mut b = vec![0u8; len];
        b[0] = ty as u8;
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        match *self {
            Request::Attach {
                domain,
                endpoint,
                flags,
                reserved,
            } => {
                put32(&mut b, 4, domain);
                put32(&mut b, 8, endpoint);
                put32(&mut b, 12, flags);
                b[16..20].copy_from_slice(&reserved);
            }
            Request::Detach { domain, endpoint } => {
                put32(&mut b, 4, domain);
                put32(&mut b, 8, endpoint);
            }
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => {
                put32(&mut b, 4, domain);
                b[8..16].copy_from_slice(&virt_start.to_le_bytes());
                b[16..24].copy_from_slice(&virt_end.to_le_bytes());
                b[24..32].copy_from_slice(&phys_start.to_le_bytes());
                put32(&mut b, 32, flags);
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
                reserved,
            } => {
                put32(&mut b, 4, domain);
                b[8..16].copy_from_slice(&virt_start.to_le_bytes());
                b[16..24].copy_from_slice(&virt_end.to_le_bytes());
                b[24..28].copy_from_slice(&reserved);
            }
            Request::Probe { endpoint } => put32(&mut b, 4, endpoint),
        }
        b
    }
}

/// The device configuration space (§5.13.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Supported page sizes; the lowest set bit is the mapping granule.
    pub page_size_mask: u64,
    /// First and last IOVA the device translates (`VIRTIO_IOMMU_F_INPUT_RANGE`).
    pub input_range: (u64, u64),
    /// First and last valid domain ID (`VIRTIO_IOMMU_F_DOMAIN_RANGE`).
    pub domain_range: (u32, u32),
    /// Bytes of the PROBE properties buffer (`VIRTIO_IOMMU_F_PROBE`).
    pub probe_size: u32,
    /// Unattached endpoints bypass translation (`VIRTIO_IOMMU_F_BYPASS_CONFIG`).
    pub bypass: bool,
}

impl Config {
    /// The 40 config-space bytes.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.page_size_mask.to_le_bytes());
        b[8..16].copy_from_slice(&self.input_range.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.input_range.1.to_le_bytes());
        b[24..28].copy_from_slice(&self.domain_range.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.domain_range.1.to_le_bytes());
        b[32..36].copy_from_slice(&self.probe_size.to_le_bytes());
        b[36] = u8::from(self.bypass);
        b
    }

    /// Decode config-space bytes; `bypass` is bit 0 of its byte.
    pub fn decode(b: &[u8; CONFIG_LEN]) -> Config {
        Config {
            page_size_mask: le64(b, 0),
            input_range: (le64(b, 8), le64(b, 16)),
            domain_range: (le32(b, 24), le32(b, 28)),
            probe_size: le32(b, 32),
            bypass: b[36] & 1 != 0,
        }
    }

    /// The mapping granule: the lowest bit of `page_size_mask` (0 if the mask is empty).
    pub fn granule(&self) -> u64 {
        if self.page_size_mask == 0 {
            0
        } else {
            1 << self.page_size_mask.trailing_zeros()
        }
    }
}

/// A reserved-memory region reported by PROBE (`VIRTIO_IOMMU_PROBE_T_RESV_MEM`, §5.13.6.8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResvMem {
    /// `RESV_MEM_T_RESERVED` or `RESV_MEM_T_MSI`.
    pub subtype: u8,
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

impl ResvMem {
    /// Bytes of the property including its header (`length` = 20).
    pub const LEN: usize = 24;

    /// The property bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
        b[2..4].copy_from_slice(&20u16.to_le_bytes());
        b[4] = self.subtype;
        b[8..16].copy_from_slice(&self.start.to_le_bytes());
        b[16..24].copy_from_slice(&self.end.to_le_bytes());
        b
    }

    /// Parse a property list as the driver side must (virtio 1.3 §5.13.6.7 and its driver
    /// requirements §5.13.6.7.1): stop at a property whose `type` is 0 or at the end of the
    /// buffer; skip properties of unknown type, and skip — ignore, then go on parsing — any
    /// property whose header `reserved` bits (15:12) are not zero ("The driver MUST ignore a
    /// property whose reserved field is not zero"). The `reserved[3]` bytes inside RESV_MEM are
    /// ignored (§5.13.6.8.1.1). Linux 6.12's driver masks the reserved bits off instead
    /// (`drivers/iommu/virtio-iommu.c` lines 546 and 568) and would use such a property.
    ///
    /// A property with `type` 0 ends the list even if its reserved bits are set: `type` alone
    /// marks the empty property that ends the list, and parsing past it would read bytes the
    /// device did not describe. [`encode`](Self::encode) never sets reserved bits, as the device
    /// requirements ask (§5.13.6.7.2).
    pub fn parse_list(props: &[u8]) -> Vec<ResvMem> {
        let mut out = Vec::new();
        let mut at = 0usize;
        while at + 4 <= props.len() {
            let head = u16::from_le_bytes([props[at], props[at + 1]]);
            let ty = head & PROBE_T_MASK;
            let len = usize::from(u16::from_le_bytes([props[at + 2], props[at + 3]]));
            if ty == 0 {
                break;
            }
            let body = at + 4;
            if body + len > props.len() {
                break;
            }
            if head & !PROBE_T_MASK == 0 && ty == PROBE_T_RESV_MEM && len >= 20 {
                out.push(ResvMem {
                    subtype: props[body],
                    start: le64(props, body + 4),
                    end: le64(props, body + 12),
                });
            }
            at = body + len;
        }
        out
    }
}

/// `VIRTIO_IOMMU_FAULT_R_UNKNOWN`.
pub const FAULT_R_UNKNOWN: u8 = 0;
/// `VIRTIO_IOMMU_FAULT_R_DOMAIN`: the endpoint is not attached to a domain.
pub const FAULT_R_DOMAIN: u8 = 1;
/// `VIRTIO_IOMMU_FAULT_R_MAPPING`: the address is not mapped, or not with that access.
pub const FAULT_R_MAPPING: u8 = 2;
/// `VIRTIO_IOMMU_FAULT_F_READ`.
pub const FAULT_F_READ: u32 = 1 << 0;
/// `VIRTIO_IOMMU_FAULT_F_WRITE`.
pub const FAULT_F_WRITE: u32 = 1 << 1;
/// `VIRTIO_IOMMU_FAULT_F_EXEC`.
pub const FAULT_F_EXEC: u32 = 1 << 2;
/// `VIRTIO_IOMMU_FAULT_F_ADDRESS`: `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// A fault event on the event queue (virtio 1.3 §5.13.6.9, `struct virtio_iommu_fault`):
/// `reason u8 | reserved[3] | flags le32 | endpoint le32 | reserved2[4] | address le64`, 24
/// bytes. It has no reply path: the driver only logs it (Linux's `viommu_fault_handler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultEvent {
    /// `FAULT_R_*`.
    pub reason: u8,
    /// `FAULT_F_*`.
    pub flags: u32,
    /// The endpoint that faulted.
    pub endpoint: u32,
    /// The faulting address, valid with `FAULT_F_ADDRESS`.
    pub address: u64,
}

impl FaultEvent {
    /// Bytes of the event.
    pub const LEN: usize = 24;

    /// The wire form.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }

    /// Decodes an event a device wrote (what a driver does); `None` if `b` is shorter than
    /// [`LEN`](Self::LEN) or a reserved byte is set (Linux ignores such an event).
    pub fn decode(b: &[u8]) -> Option<FaultEvent> {
        if b.len() < Self::LEN || b[1..4] != [0; 3] || b[12..16] != [0; 4] {
            return None;
        }
        Some(FaultEvent {
            reason: b[0],
            flags: le32(b, 4),
            endpoint: le32(b, 8),
            address: le64(b, 16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_event_round_trips_and_refuses_reserved_bytes() {
        let e = FaultEvent {
            reason: FAULT_R_MAPPING,
            flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
            endpoint: 8,
            address: 0xdead_b000,
        };
        let b = e.encode();
        assert_eq!(b[0], 2);
        assert_eq!(&b[4..8], &[2, 1, 0, 0]);
        assert_eq!(&b[16..24], &0xdead_b000u64.to_le_bytes());
        assert_eq!(FaultEvent::decode(&b), Some(e));
        assert_eq!(FaultEvent::decode(&b[..23]), None);
        let mut r = b;
        r[13] = 1;
        assert_eq!(FaultEvent::decode(&r), None);
    }

    #[test]
    fn layouts_match_the_uapi_header() {
        let map = Request::Map {
            domain: 3,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000_0000,
            flags: MAP_F_READ | MAP_F_WRITE,
        };
        let b = map.encode();
        assert_eq!(b.len(), 36);
        assert_eq!(b[0], 3);
        assert_eq!(&b[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&b[32..36], &3u32.to_le_bytes());
        assert_eq!(Request::decode(&b), Ok(map));
        for r in [
            Request::Attach {
                domain: 1,
                endpoint: 2,
                flags: 1,
                reserved: [0; 4],
            },
            Request::Detach {
                domain: 1,
                endpoint: 2,
            },
            Request::Unmap {
                domain: 9,
                virt_start: 0,
                virt_end: u64::MAX,
                reserved: [1, 0, 0, 0],
            },
            Request::Probe { endpoint: 77 },
        ] {
            let b = r.encode();
            assert_eq!(Request::decode(&b), Ok(r));
            assert_eq!(
                Request::decode(&b[..b.len() - 1]),
                Err(ParseError::Short {
                    ty: ReqType::try_from(b[0]).unwrap(),
                    len: b.len() - 1,
                    need: b.len()
                })
            );
        }
        assert_eq!(
            Request::decode(&[9, 0, 0, 0]),
            Err(ParseError::UnknownType(9))
        );
        assert_eq!(Request::decode(&[1]), Err(ParseError::NoHead(1)));
    }

    #[test]
    fn config_round_trips() {
        let c = Config {
            page_size_mask: !0xfff,
            input_range: (0, (1 << 48) - 1),
            domain_range: (0, 65535),
            probe_size: 512,
            bypass: true,
        };
        let b = c.encode();
        assert_eq!(b[36], 1);
        assert_eq!(Config::decode(&b), c);
        assert_eq!(c.granule(), 4096);
        let r = ResvMem {
            subtype: RESV_MEM_T_MSI,
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
        };
        let mut props = vec![0u8; 64];
        props[..24].copy_from_slice(&r.encode());
        assert_eq!(ResvMem::parse_list(&props), [r]);
    }

    #[test]
    fn probe_properties_with_reserved_bits_are_ignored() {
        let msi = ResvMem {
            subtype: RESV_MEM_T_MSI,
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
        };
        let resv = ResvMem {
            subtype: RESV_MEM_T_RESERVED,
            start: 0x1000,
            end: 0x1fff,
        };
        // The device side never sets them (§5.13.6.7.2).
        assert_eq!(msi.encode()[1] >> 4, 0);
        for bit in 12..16 {
            let mut props = vec![0u8; 3 * ResvMem::LEN];
            props[..24].copy_from_slice(&msi.encode());
            props[24..48].copy_from_slice(&resv.encode());
            // Set one reserved bit of the first property's header: it is skipped (its length
            // still says where the next one starts) and the list goes on.
            let head = u16::from_le_bytes([props[0], props[1]]) | (1 << bit);
            props[..2].copy_from_slice(&head.to_le_bytes());
            assert_eq!(ResvMem::parse_list(&props), [resv], "bit {bit}");
            // The same property without the reserved bit is used.
            props[..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
            assert_eq!(ResvMem::parse_list(&props), [msi, resv], "bit {bit}");
        }
        // Non-zero bytes in RESV_MEM's own reserved[3] are ignored, not a reason to skip.
        let mut props = msi.encode().to_vec();
        props[5..8].copy_from_slice(&[1, 2, 3]);
        assert_eq!(ResvMem::parse_list(&props), [msi]);
        // A type-0 header ends the list even with reserved bits set.
        let mut props = vec![0u8; 2 * ResvMem::LEN];
        props[..2].copy_from_slice(&0xf000u16.to_le_bytes());
        props[2..4].copy_from_slice(&20u16.to_le_bytes());
        props[24..48].copy_from_slice(&msi.encode());
        assert_eq!(ResvMem::parse_list(&props), []);
    }
}
