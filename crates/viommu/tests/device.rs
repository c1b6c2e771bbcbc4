//! Every request type and every status the device can answer, through the byte-level
//! interface (readable part in, writable part out), plus listener replay and failure.

use std::sync::{Arc, Mutex};

use livemig_viommu::device::{Completion, DeviceConfig, VirtioIommu};
use livemig_viommu::listener::{
    Call, ListenerError, MapListener, Mapping, Perm, RecordingListener,
};
use livemig_viommu::proto::{
    ATTACH_F_BYPASS, F_BYPASS_CONFIG, F_MAP_UNMAP, F_MMIO, F_PROBE, MAP_F_MMIO, MAP_F_READ,
    MAP_F_WRITE, RESV_MEM_T_MSI, Request, ResvMem, Status,
};

/// A listener shared with the test so it can be inspected while the device owns a handle.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<RecordingListener>>);

impl MapListener for Shared {
    fn map(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.0.lock().unwrap().map(m)
    }
    fn unmap(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.0.lock().unwrap().unmap(m)
    }
    fn set_bypass(&mut self, b: bool) -> Result<(), ListenerError> {
        self.0.lock().unwrap().set_bypass(b)
    }
    fn set_tracking(&mut self, on: bool) {
        self.0.lock().unwrap().set_tracking(on)
    }
    fn take_dirty(&mut self) -> Vec<(u64, u64)> {
        self.0.lock().unwrap().take_dirty()
    }
}

const MSI: ResvMem = ResvMem {
    subtype: RESV_MEM_T_MSI,
    start: 0xfee0_0000,
    end: 0xfeef_ffff,
};

fn device() -> (VirtioIommu, Shared, Shared) {
    let mut dev = VirtioIommu::new(DeviceConfig::default()).unwrap();
    let a = Shared::default();
    let b = Shared::default();
    dev.add_endpoint(1, Some(Box::new(a.clone())), vec![MSI])
        .unwrap();
    dev.add_endpoint(2, Some(Box::new(b.clone())), vec![])
        .unwrap();
    dev.add_endpoint(3, None, vec![]).unwrap(); // an emulated device
    (dev, a, b)
}

fn send(dev: &mut VirtioIommu, req: &Request) -> Status {
    let mut tail = [0xffu8; 4];
    match dev.handle(&req.encode(), &mut tail) {
        Completion::Status { status, used } => {
            assert_eq!(used, 4);
            assert_eq!(tail[0], status as u8);
            assert_eq!(&tail[1..], &[0, 0, 0], "tail reserved bytes are zeroed");
            status
        }
        Completion::NotWritten => panic!("{req:?}: no status written"),
    }
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach {
        domain,
        endpoint,
        flags: 0,
        reserved: [0; 4],
    }
}

fn map(domain: u32, start: u64, last: u64, phys: u64) -> Request {
    Request::Map {
        domain,
        virt_start: start,
        virt_end: last,
        phys_start: phys,
        flags: MAP_F_READ | MAP_F_WRITE,
    }
}

fn unmap(domain: u32, start: u64, last: u64) -> Request {
    Request::Unmap {
        domain,
        virt_start: start,
        virt_end: last,
        reserved: [0; 4],
    }
}

#[test]
fn attach_statuses() {
    let (mut dev, a, _) = device();
    let bad_reserved = Request::Attach {
        domain: 1,
        endpoint: 1,
        flags: 0,
        reserved: [0, 1, 0, 0],
    };
    assert_eq!(send(&mut dev, &bad_reserved), Status::Inval);
    let bad_flags = Request::Attach {
        domain: 1,
        endpoint: 1,
        flags: 1 << 5,
        reserved: [0; 4],
    };
    assert_eq!(send(&mut dev, &bad_flags), Status::Inval);
    assert_eq!(send(&mut dev, &attach(1, 99)), Status::NoEnt);
    assert_eq!(send(&mut dev, &attach(70_000, 1)), Status::Range);
    assert_eq!(send(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(send(&mut dev, &attach(1, 1)), Status::Ok, "idempotent");
    assert_eq!(
        send(&mut dev, &attach(1, 2)),
        Status::Ok,
        "domains are shared"
    );
    // Bypass flag inconsistent with an existing translating domain.
    let bypass = Request::Attach {
        domain: 1,
        endpoint: 3,
        flags: ATTACH_F_BYPASS,
        reserved: [0; 4],
    };
    assert_eq!(send(&mut dev, &bypass), Status::Inval);
    // Re-attach elsewhere behaves as DETACH + ATTACH: the old domain's mappings leave.
    assert_eq!(
        send(&mut dev, &map(1, 0x1000, 0x1fff, 0x10_0000)),
        Status::Ok
    );
    assert_eq!(a.0.lock().unwrap().mappings.len(), 1);
    assert_eq!(send(&mut dev, &attach(5, 1)), Status::Ok);
    assert!(a.0.lock().unwrap().mappings.is_empty());
    assert_eq!(dev.endpoint_domain(1), Some(5));
    // A bypass domain puts the listener in bypass.
    assert_eq!(
        send(
            &mut dev,
            &Request::Attach {
                domain: 9,
                endpoint: 1,
                flags: ATTACH_F_BYPASS,
                reserved: [0; 4]
            }
        ),
        Status::Ok
    );
    assert!(a.0.lock().unwrap().bypass);
    assert_eq!(dev.endpoint_bypass(1), Some(true));
    // Without BYPASS_CONFIG the flag is unrecognized.
    let cfg = DeviceConfig {
        features: F_MAP_UNMAP | F_PROBE,
        ..DeviceConfig::default()
    };
    let mut plain = VirtioIommu::new(cfg).unwrap();
    plain.add_endpoint(1, None, vec![]).unwrap();
    assert_eq!(send(&mut plain, &bypass), Status::Inval);
}

#[test]
fn detach_statuses() {
    let (mut dev, a, _) = device();
    assert_eq!(
        send(
            &mut dev,
            &Request::Detach {
                domain: 1,
                endpoint: 99
            }
        ),
        Status::NoEnt
    );
    assert_eq!(
        send(
            &mut dev,
            &Request::Detach {
                domain: 1,
                endpoint: 1
            }
        ),
        Status::Inval,
        "not attached"
    );
    send(&mut dev, &attach(1, 1));
    send(&mut dev, &map(1, 0x1000, 0x1fff, 0x10_0000));
    assert_eq!(
        send(
            &mut dev,
            &Request::Detach {
                domain: 2,
                endpoint: 1
            }
        ),
        Status::Inval,
        "attached to another domain"
    );
    // DETACH ignores its reserved bytes.
    let mut raw = Request::Detach {
        domain: 1,
        endpoint: 1,
    }
    .encode();
    raw[15] = 0xaa;
    let mut tail = [0u8; 4];
    assert_eq!(
        dev.handle(&raw, &mut tail),
        Completion::Status {
            status: Status::Ok,
            used: 4
        }
    );
    assert!(a.0.lock().unwrap().mappings.is_empty());
    // The last endpoint left: the domain and its mappings are gone.
    assert!(dev.domains().is_empty());
    send(&mut dev, &attach(1, 1));
    assert!(dev.mappings(1).is_empty());
}

#[test]
fn map_statuses() {
    let (mut dev, a, b) = device();
    send(&mut dev, &attach(1, 1));
    send(&mut dev, &attach(1, 2));
    // Unaligned start, end + 1, phys.
    assert_eq!(send(&mut dev, &map(1, 0x1100, 0x1fff, 0)), Status::Range);
    assert_eq!(send(&mut dev, &map(1, 0x1000, 0x1ffe, 0)), Status::Range);
    assert_eq!(send(&mut dev, &map(1, 0x1000, 0x1fff, 0x10)), Status::Range);
    assert_eq!(
        send(&mut dev, &map(1, 0x1000, 0x1fff, 0x10_0000)),
        Status::Ok
    );
    // Overlap.
    assert_eq!(
        send(&mut dev, &map(1, 0x0, 0x1fff, 0x20_0000)),
        Status::Inval
    );
    assert_eq!(
        send(&mut dev, &map(1, 0x1000, 0x1fff, 0x20_0000)),
        Status::Inval
    );
    // Unknown flags; MMIO without F_MMIO.
    let mut m = map(1, 0x4000, 0x4fff, 0);
    if let Request::Map { flags, .. } = &mut m {
        *flags = 1 << 7;
    }
    assert_eq!(send(&mut dev, &m), Status::Inval);
    if let Request::Map { flags, .. } = &mut m {
        *flags = MAP_F_MMIO;
    }
    assert_eq!(send(&mut dev, &m), Status::Inval);
    // No such domain.
    assert_eq!(send(&mut dev, &map(7, 0x4000, 0x4fff, 0)), Status::NoEnt);
    // Outside input_range (48 bits), end before start, over the MSI window.
    assert_eq!(
        send(&mut dev, &map(1, 1 << 48, (1 << 48) + 0xfff, 0)),
        Status::Range
    );
    let backwards = Request::Map {
        domain: 1,
        virt_start: 0x3000,
        virt_end: 0x2fff - 0x1000,
        phys_start: 0,
        flags: MAP_F_READ,
    };
    assert_eq!(send(&mut dev, &backwards), Status::Inval);
    assert_eq!(
        send(&mut dev, &map(1, 0xfee0_0000, 0xfee0_0fff, 0)),
        Status::Range
    );
    // Bypass domain.
    let bypass = Request::Attach {
        domain: 8,
        endpoint: 3,
        flags: ATTACH_F_BYPASS,
        reserved: [0; 4],
    };
    assert_eq!(send(&mut dev, &bypass), Status::Ok);
    assert_eq!(send(&mut dev, &map(8, 0x4000, 0x4fff, 0)), Status::Inval);
    // Both listeners saw the one successful mapping.
    for l in [&a, &b] {
        let m: Vec<Mapping> = l.0.lock().unwrap().mappings.values().copied().collect();
        assert_eq!(
            m,
            [Mapping {
                iova: 0x1000,
                last: 0x1fff,
                gpa: 0x10_0000,
                perm: Perm {
                    read: true,
                    write: true,
                    mmio: false
                }
            }]
        );
    }
    // With F_MMIO the flag is accepted.
    let cfg = DeviceConfig {
        features: DeviceConfig::default().features | F_MMIO,
        ..DeviceConfig::default()
    };
    let mut mmio = VirtioIommu::new(cfg).unwrap();
    mmio.add_endpoint(1, None, vec![]).unwrap();
    send(&mut mmio, &attach(1, 1));
    if let Request::Map { domain, .. } = &mut m {
        *domain = 1;
    }
    assert_eq!(send(&mut mmio, &m), Status::Ok);
}

#[test]
fn unmap_follows_the_spec_examples() {
    // virtio 1.3 §5.13.6.6's seven examples (addresses in pages of 4 KiB).
    let p = |n: u64| n * 0x1000;
    // (existing mappings, unmap range, expected status, mappings left)
    type Example = (&'static [(u64, u64)], (u64, u64), Status, usize);
    let cases: [Example; 7] = [
        (&[], (0, 4), Status::Ok, 0),
        (&[(0, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (5, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 9)], (0, 4), Status::Range, 1),
        (&[(0, 4), (5, 9)], (0, 4), Status::Ok, 1),
        (&[(0, 4)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (10, 14)], (0, 14), Status::Ok, 0),
    ];
    for (i, (maps, (s, e), want, left)) in cases.into_iter().enumerate() {
        let (mut dev, a, _) = device();
        send(&mut dev, &attach(1, 1));
        for &(ms, me) in maps {
            assert_eq!(
                send(&mut dev, &map(1, p(ms), p(me + 1) - 1, p(ms))),
                Status::Ok
            );
        }
        assert_eq!(
            send(&mut dev, &unmap(1, p(s), p(e + 1) - 1)),
            want,
            "example {}",
            i + 1
        );
        assert_eq!(dev.mappings(1).len(), left, "example {}", i + 1);
        assert_eq!(
            a.0.lock().unwrap().mappings.len(),
            left,
            "example {}",
            i + 1
        );
    }
    let (mut dev, _, _) = device();
    assert_eq!(send(&mut dev, &unmap(1, 0, 0xfff)), Status::NoEnt);
    send(&mut dev, &attach(1, 1));
    let reserved = Request::Unmap {
        domain: 1,
        virt_start: 0,
        virt_end: 0xfff,
        reserved: [1, 0, 0, 0],
    };
    assert_eq!(send(&mut dev, &reserved), Status::Inval);
    send(
        &mut dev,
        &Request::Attach {
            domain: 4,
            endpoint: 3,
            flags: ATTACH_F_BYPASS,
            reserved: [0; 4],
        },
    );
    assert_eq!(send(&mut dev, &unmap(4, 0, 0xfff)), Status::Inval);
}

#[test]
fn probe_reports_reserved_regions() {
    let (mut dev, _, _) = device();
    let size = dev.config().config.probe_size as usize;
    let mut out = vec![0xeeu8; size + 4];
    let c = dev.handle(&Request::Probe { endpoint: 1 }.encode(), &mut out);
    assert_eq!(
        c,
        Completion::Status {
            status: Status::Ok,
            used: size + 4
        }
    );
    assert_eq!(ResvMem::parse_list(&out[..size]), [MSI]);
    assert!(out[24..size].iter().all(|&b| b == 0), "rest zero-filled");
    let mut out = vec![0u8; size + 4];
    let c = dev.handle(&Request::Probe { endpoint: 9 }.encode(), &mut out);
    assert!(matches!(
        c,
        Completion::Status {
            status: Status::NoEnt,
            ..
        }
    ));
    // A properties buffer smaller than probe_size: INVAL.
    let mut small = vec![0u8; 32];
    let c = dev.handle(&Request::Probe { endpoint: 1 }.encode(), &mut small);
    assert!(matches!(
        c,
        Completion::Status {
            status: Status::Inval,
            ..
        }
    ));
    // Without F_PROBE: nothing written.
    let cfg = DeviceConfig {
        features: F_MAP_UNMAP | F_BYPASS_CONFIG,
        ..DeviceConfig::default()
    };
    let mut noprobe = VirtioIommu::new(cfg).unwrap();
    let mut out = vec![0x55u8; size + 4];
    assert_eq!(
        noprobe.handle(&Request::Probe { endpoint: 1 }.encode(), &mut out),
        Completion::NotWritten
    );
    assert!(out.iter().all(|&b| b == 0x55));
}

#[test]
fn unparsable_requests_get_no_status() {
    let (mut dev, _, _) = device();
    let mut tail = [0x77u8; 4];
    for raw in [
        vec![],
        vec![1, 0],
        vec![9, 0, 0, 0, 1, 2, 3, 4],
        attach(1, 1).encode()[..10].to_vec(),
    ] {
        assert_eq!(
            dev.handle(&raw, &mut tail),
            Completion::NotWritten,
            "{raw:?}"
        );
        assert_eq!(tail, [0x77; 4]);
    }
    // No room for the tail.
    assert_eq!(
        dev.handle(&attach(1, 1).encode(), &mut [0u8; 3]),
        Completion::NotWritten
    );
}

#[test]
fn listener_failures_undo_the_request() {
    let (mut dev, a, b) = device();
    send(&mut dev, &attach(1, 1));
    send(&mut dev, &attach(1, 2));
    // The second listener fails: the first is rolled back, the model unchanged.
    b.0.lock().unwrap().fail_maps = 1;
    assert_eq!(send(&mut dev, &map(1, 0x1000, 0x1fff, 0)), Status::NoMem);
    assert!(dev.mappings(1).is_empty());
    assert!(a.0.lock().unwrap().mappings.is_empty());
    assert_eq!(send(&mut dev, &map(1, 0x1000, 0x1fff, 0)), Status::Ok);
    b.0.lock().unwrap().fail_unmaps = 1;
    assert_eq!(send(&mut dev, &unmap(1, 0, 0xffff)), Status::DevErr);
    assert_eq!(dev.mappings(1).len(), 1);
    assert_eq!(
        a.0.lock().unwrap().mappings.len(),
        1,
        "re-mapped after the failure"
    );
    assert_eq!(b.0.lock().unwrap().mappings.len(), 1);
}

#[test]
fn whole_space_mappings_reach_listeners_in_halves() {
    let cfg = DeviceConfig {
        config: livemig_viommu::proto::Config {
            input_range: (0, u64::MAX),
            ..DeviceConfig::default().config
        },
        ..DeviceConfig::default()
    };
    let mut dev = VirtioIommu::new(cfg).unwrap();
    let l = Shared::default();
    dev.add_endpoint(1, Some(Box::new(l.clone())), vec![])
        .unwrap();
    send(&mut dev, &attach(1, 1));
    assert_eq!(send(&mut dev, &map(1, 0, u64::MAX, 0)), Status::Ok);
    assert_eq!(send(&mut dev, &unmap(1, 0, u64::MAX)), Status::Ok);
    let log = l.0.lock().unwrap().log.clone();
    assert_eq!(log.len(), 4);
    for c in log {
        let m = match c {
            Call::Map(m) | Call::Unmap(m) => m,
            Call::Bypass(_) => continue,
        };
        assert!(m.len().is_some(), "{m} covers 2^64");
    }
}

#[test]
fn config_bypass_applies_to_unattached_endpoints() {
    let (mut dev, a, _) = device();
    assert!(!a.0.lock().unwrap().bypass);
    dev.write_bypass(1);
    assert!(a.0.lock().unwrap().bypass);
    send(&mut dev, &attach(1, 1));
    assert!(
        !a.0.lock().unwrap().bypass,
        "attached to a translating domain"
    );
    send(
        &mut dev,
        &Request::Detach {
            domain: 1,
            endpoint: 1,
        },
    );
    assert!(a.0.lock().unwrap().bypass, "back to bypass when detached");
    dev.reset();
    assert_eq!(dev.endpoint_domain(1), None);
}

#[test]
fn unmaps_during_tracking_report_dirty_ranges() {
    let (mut dev, a, b) = device();
    send(&mut dev, &attach(1, 1));
    send(&mut dev, &attach(1, 2));
    assert_eq!(
        send(&mut dev, &map(1, 0x10000, 0x1ffff, 0x80000)),
        Status::Ok
    );
    // Before tracking: an unmap reports nothing.
    assert_eq!(send(&mut dev, &unmap(1, 0x10000, 0x1ffff)), Status::Ok);
    assert!(dev.take_dirty().is_empty());
    assert_eq!(
        send(&mut dev, &map(1, 0x10000, 0x1ffff, 0x80000)),
        Status::Ok
    );
    dev.set_dirty_tracking(true);
    assert!(a.0.lock().unwrap().tracking && b.0.lock().unwrap().tracking);
    assert_eq!(send(&mut dev, &unmap(1, 0x10000, 0x1ffff)), Status::Ok);
    // Both endpoints' listeners saw the unmap; each reports the guest-physical range.
    assert_eq!(dev.take_dirty(), [(0x80000, 0x10000), (0x80000, 0x10000)]);
    assert!(dev.take_dirty().is_empty(), "taken once");
    dev.set_dirty_tracking(false);
    assert!(!a.0.lock().unwrap().tracking);
}
