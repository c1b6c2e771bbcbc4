//! Page-size negotiation tables and the seed 002 migration-policy scenarios.

use std::sync::Arc;

use livemig_viommu::device::{DeviceConfig, VirtioIommu};
use livemig_viommu::listener::RecordingListener;
use livemig_viommu::pagesize::{Negotiation, NegotiationError, granule};
use livemig_viommu::policy::{
    Blocker, MigrationGuard, MigrationPolicy, RangeError, ViommuEvent, tracking_ranges,
};
use livemig_viommu::proto::{MAP_F_READ, Request, Status};

const K4: u64 = 4 << 10;
const K16: u64 = 16 << 10;
const K64: u64 = 64 << 10;

/// A host IOMMU page-size bitmap for a host page size (the granule plus 2M/1G-style blocks).
fn host_mask(page: u64) -> u64 {
    match page {
        K4 => K4 | (2 << 20) | (1 << 30),
        K16 => K16 | (32 << 20),
        K64 => K64 | (512 << 20),
        _ => unreachable!(),
    }
}

#[test]
fn negotiation_table() {
    // (host page, guest page, cold-plug outcome, hotplug outcome)
    // The VMM's default mask is the host page mask; the endpoint brings the host IOMMU's.
    let table = [
        (K4, K4, true, true),
        (K4, K16, true, true),
        (K4, K64, true, true),
        (K16, K4, false, false),
        (K16, K16, true, true),
        (K16, K64, true, true),
        (K64, K4, false, false),
        (K64, K16, false, false),
        (K64, K64, true, true),
    ];
    for (host, guest, cold_ok, hot_ok) in table {
        for hot in [false, true] {
            let mut n = Negotiation::new(Negotiation::host_page_mask(host)).unwrap();
            if hot {
                n.machine_started();
            }
            let added = n.add_endpoint("vfio0", host_mask(host));
            let r = added.and_then(|w| n.check_guest(guest).map(|()| w));
            let want = if hot { hot_ok } else { cold_ok };
            assert_eq!(
                r.is_ok(),
                want,
                "host {host:#x} guest {guest:#x} {}: {r:?}",
                if hot { "hotplug" } else { "cold plug" }
            );
            if let Err(e) = r {
                assert!(
                    matches!(e, NegotiationError::GranuleTooLarge { granule, guest_page, .. }
                        if granule == host && guest_page == guest),
                    "{e}"
                );
                assert!(e.to_string().contains("larger than the guest page size"));
            } else {
                assert_eq!(n.granule(), host);
            }
        }
    }
}

#[test]
fn cold_plug_ands_masks_and_hotplug_keeps_the_granule() {
    // Cold plug: a 4K machine takes a 64K endpoint: the granule grows to 64K.
    let mut n = Negotiation::new(Negotiation::host_page_mask(K4)).unwrap();
    n.add_endpoint("a", host_mask(K4)).unwrap();
    assert_eq!(n.mask(), host_mask(K4));
    n.add_endpoint("b", K64 | (1 << 30)).unwrap();
    assert_eq!(n.mask(), 1 << 30, "only 1G is common to both");
    assert_eq!(granule(n.mask()), 1 << 30);
    // Nothing in common.
    let e = n.add_endpoint("c", K4).unwrap_err();
    assert_eq!(
        e.to_string(),
        "endpoint c page-size mask 0x1000 has no size in common with the virtio-iommu mask 0x40000000"
    );
    assert!(matches!(
        Negotiation::new(0),
        Err(NegotiationError::Empty { .. })
    ));
    assert!(matches!(
        n.add_endpoint("d", 0),
        Err(NegotiationError::Empty { .. })
    ));
    // Hotplug: same granule, different mask: a warning; different granule: refused.
    let mut n = Negotiation::new(host_mask(K4)).unwrap();
    n.machine_started();
    let w = n.add_endpoint("e", K4).unwrap().expect("warning");
    assert!(w.to_string().contains("same granule"), "{w}");
    assert_eq!(
        n.mask(),
        host_mask(K4),
        "a hotplug does not change the mask"
    );
    assert_eq!(n.add_endpoint("f", host_mask(K4)).unwrap(), None);
    let e = n.add_endpoint("g", host_mask(K64)).unwrap_err();
    assert!(matches!(e, NegotiationError::GranuleChange { .. }), "{e}");
    assert!(e.to_string().contains("needs granule 0x10000"), "{e}");
}

fn viommu(guard: &Arc<MigrationGuard>) -> VirtioIommu {
    let mut dev = VirtioIommu::new(DeviceConfig::default()).unwrap();
    dev.add_endpoint(1, Some(Box::new(RecordingListener::default())), vec![])
        .unwrap();
    dev.add_endpoint(2, None, vec![]).unwrap(); // emulated: never blocks
    dev.set_migration_guard(guard.clone());
    dev
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach {
        domain,
        endpoint,
        flags: 0,
        reserved: [0; 4],
    }
}

#[test]
fn default_policy_blocks_any_assigned_device_behind_the_viommu() {
    let guard = Arc::new(MigrationGuard::new(MigrationPolicy::default()));
    let dev = viommu(&guard);
    let blockers = guard.begin(&dev.view()).unwrap_err();
    assert_eq!(blockers, [Blocker::ViommuPresent { endpoints: vec![1] }]);
    assert!(
        blockers[0]
            .to_string()
            .contains("sit behind the virtio-iommu")
    );
    // Without VFIO endpoints the vIOMMU does not matter.
    let mut plain = VirtioIommu::new(DeviceConfig::default()).unwrap();
    plain.add_endpoint(2, None, vec![]).unwrap();
    assert!(guard.begin(&plain.view()).is_ok());
}

#[test]
fn relaxed_policy_seed_002_scenarios() {
    let relax = MigrationPolicy { relax: true };
    // 1. No vIOMMU mappings at start (interrupt remapping only): allowed.
    let guard = Arc::new(MigrationGuard::new(relax));
    let mut dev = viommu(&guard);
    // The emulated endpoint may use the vIOMMU freely.
    assert_eq!(dev.request(&attach(5, 2)), Status::Ok);
    guard.begin(&dev.view()).unwrap();
    assert!(relax.device_dirty_tracking(&dev.view()).is_ok());
    // 2. The guest kexecs with iommu=on during migration: attaches the assigned device and
    //    maps: the migration is cancelled with the reason.
    assert_eq!(guard.cancelled(), None);
    assert_eq!(dev.request(&attach(1, 1)), Status::Ok);
    let c = guard.cancelled().expect("cancelled");
    assert_eq!(
        c.event,
        ViommuEvent::Attach {
            domain: 1,
            endpoint: 1
        }
    );
    assert!(
        c.to_string()
            .contains("attached assigned endpoint 1 to translating domain 1 during migration"),
        "{c}"
    );
    let map = Request::Map {
        domain: 1,
        virt_start: 0,
        virt_end: 0xfff,
        phys_start: 0x1000,
        flags: MAP_F_READ,
    };
    assert_eq!(dev.request(&map), Status::Ok);
    assert_eq!(
        guard.cancelled().unwrap().event,
        c.event,
        "the first cause is kept"
    );
    guard.end();
    // 3. Mappings present at start: blocked, and device dirty tracking refused.
    let blockers = guard.begin(&dev.view()).unwrap_err();
    assert_eq!(
        blockers,
        [Blocker::ViommuInUse {
            translated: vec![(1, 1, 1)]
        }]
    );
    assert!(
        blockers[0]
            .to_string()
            .contains("endpoint 1 in domain 1 (1 mappings)"),
        "{}",
        blockers[0]
    );
    assert!(relax.device_dirty_tracking(&dev.view()).is_err());
    // The guest goes back to passthrough: allowed again.
    assert_eq!(
        dev.request(&Request::Detach {
            domain: 1,
            endpoint: 1
        }),
        Status::Ok
    );
    assert!(guard.begin(&dev.view()).is_ok());
    // A map in a domain without assigned devices does not cancel.
    let emulated_map = Request::Map {
        domain: 5,
        virt_start: 0,
        virt_end: 0xfff,
        phys_start: 0,
        flags: MAP_F_READ,
    };
    assert_eq!(dev.request(&emulated_map), Status::Ok);
    assert_eq!(guard.cancelled(), None);
}

#[test]
fn tracking_ranges_cover_ram_and_hotplug_not_the_viommu_width() {
    let gib = 1u64 << 30;
    // Below-4G RAM, the PCI hole, above-4G RAM, and a hotplug window further up.
    let ram = [(0, 3 * gib), (4 * gib, 12 * gib)];
    let hotplug = Some((32 * gib, 64 * gib));
    let r = tracking_ranges(&ram, hotplug, 8).unwrap();
    assert_eq!(r, [(0, 3 * gib), (4 * gib, 12 * gib), (32 * gib, 64 * gib)]);
    // Two ranges: the smallest gap (the 1 GiB PCI hole) is closed first.
    let r = tracking_ranges(&ram, hotplug, 2).unwrap();
    assert_eq!(r, [(0, 16 * gib), (32 * gib, 64 * gib)]);
    let r = tracking_ranges(&ram, hotplug, 1).unwrap();
    assert_eq!(r, [(0, 96 * gib)]);
    // Far below a 48-bit vIOMMU width.
    assert!(r[0].1 < 1 << 48);
    // Touching and unsorted input is joined.
    let r = tracking_ranges(&[(gib, gib), (0, gib)], None, 4).unwrap();
    assert_eq!(r, [(0, 2 * gib)]);
    assert_eq!(tracking_ranges(&[], None, 4), Err(RangeError::Empty));
    assert_eq!(tracking_ranges(&ram, None, 0), Err(RangeError::NoBudget));
    assert!(matches!(
        tracking_ranges(&[(u64::MAX, 2)], None, 1),
        Err(RangeError::Wraps { .. })
    ));
}
