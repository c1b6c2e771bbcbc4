//! The queues against rust-vmm's `virtio-queue` mock driver (`MockSplitQueue`): it lays out
//! descriptor tables and rings in `vm-memory` guest memory the way a driver does, and reads the
//! used ring back; this crate wrote neither side of that.

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::device::DeviceConfig;
use crate::proto::{FAULT_F_ADDRESS, FAULT_F_WRITE, FAULT_R_MAPPING, MAP_F_READ, Request, Status};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const QSIZE: u16 = 16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn device() -> VirtioIommu {
    let mut dev = VirtioIommu::new(DeviceConfig::default()).unwrap();
    dev.add_endpoint(8, None, vec![]).unwrap();
    dev
}

fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = mock.used().idx().load();
    (0..n)
        .map(|i| {
            let e = mock.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

fn attach() -> Vec<u8> {
    Request::Attach {
        domain: 1,
        endpoint: 8,
        flags: 0,
        reserved: [0; 4],
    }
    .encode()
}

fn map(iova: u64) -> Vec<u8> {
    Request::Map {
        domain: 1,
        virt_start: iova,
        virt_end: iova + 0xfff,
        phys_start: 0x8000_0000,
        flags: MAP_F_READ,
    }
    .encode()
}

/// A request split at odd places (the 20-byte ATTACH as 3 + 17 bytes, the tail as 2 + 2), a
/// MAP through an indirect table, and a PROBE with its properties buffer: each is served, its
/// status lands at the end of its writable part, and the used ring says how much was written.
#[test]
fn chains_of_any_shape_are_served() {
    let m = mem();
    let mock = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut dev = device();

    let req = attach();
    m.write_slice(&req, GuestAddress(0x2_0000)).unwrap();
    m.write_slice(&[0xff; 4], GuestAddress(0x2_1000)).unwrap();
    mock.add_desc_chains(
        &[
            d(0x2_0000, 3, NEXT, 1),
            d(0x2_0003, 17, NEXT, 2),
            d(0x2_1000, 2, NEXT | WRITE, 3),
            d(0x2_1002, 2, WRITE, 0),
        ],
        0,
    )
    .unwrap();

    let req = map(0x40_0000);
    m.write_slice(&req, GuestAddress(0x3_0000)).unwrap();
    m.write_slice(&[0xff; 4], GuestAddress(0x3_1000)).unwrap();
    let table = [
        d(0x3_0000, 10, NEXT, 1),
        d(0x3_000a, (req.len() - 10) as u32, NEXT, 2),
        d(0x3_1000, 4, WRITE, 0),
    ];
    for (i, t) in table.iter().enumerate() {
        m.write_obj(*t, GuestAddress(0x4_0000 + 16 * i as u64))
            .unwrap();
    }
    mock.add_desc_chains(&[d(0x4_0000, 48, INDIRECT, 0)], 4)
        .unwrap();

    let probe = Request::Probe { endpoint: 8 }.encode();
    m.write_slice(&probe, GuestAddress(0x5_0000)).unwrap();
    mock.add_desc_chains(
        &[
            d(0x5_0000, probe.len() as u32, NEXT, 6),
            d(0x5_1000, 512 + 4, WRITE, 0),
        ],
        5,
    )
    .unwrap();

    let r = process_requests(&mut dev, &mut q, &m).unwrap();
    assert_eq!(r.completed, 3);
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert!(
        r.notify,
        "no EVENT_IDX and no NO_INTERRUPT: the driver must be notified"
    );
    assert_eq!(used(&mock), vec![(0, 4), (4, 4), (5, 516)]);
    let mut tail = [0u8; 4];
    m.read_slice(&mut tail[..2], GuestAddress(0x2_1000))
        .unwrap();
    m.read_slice(&mut tail[2..], GuestAddress(0x2_1002))
        .unwrap();
    assert_eq!(tail, [Status::Ok as u8, 0, 0, 0]);
    m.read_slice(&mut tail, GuestAddress(0x3_1000)).unwrap();
    assert_eq!(tail, [Status::Ok as u8, 0, 0, 0]);
    m.read_slice(&mut tail, GuestAddress(0x5_1000 + 512))
        .unwrap();
    assert_eq!(tail, [Status::Ok as u8, 0, 0, 0]);
    assert_eq!(dev.endpoint_domain(8), Some(1));
    assert_eq!(dev.mappings(1).len(), 1);

    // Nothing new: nothing completed, nobody notified.
    let r = process_requests(&mut dev, &mut q, &m).unwrap();
    assert_eq!((r.completed, r.notify), (0, false));
}

/// Each malformed chain comes back with used length 0 and its reason; none panics, and the
/// good request behind them is still served.
#[test]
fn malformed_chains_are_returned_unused_and_the_queue_goes_on() {
    let m = mem();
    let mock = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut dev = device();
    m.write_slice(&attach(), GuestAddress(0x2_0000)).unwrap();

    // readable after writable
    mock.add_desc_chains(&[d(0x2_1000, 4, NEXT | WRITE, 1), d(0x2_0000, 20, 0, 0)], 0)
        .unwrap();
    // outside guest memory
    mock.add_desc_chains(&[d(0x20_0000, 20, NEXT, 3), d(0x2_1000, 4, WRITE, 0)], 2)
        .unwrap();
    // a readable part over the cap
    mock.add_desc_chains(&[d(0x2_0000, 8192, NEXT, 5), d(0x2_1000, 4, WRITE, 0)], 4)
        .unwrap();
    // a writable part over the cap
    mock.add_desc_chains(
        &[d(0x2_0000, 20, NEXT, 7), d(0x3_0000, 0x2_0000, WRITE, 0)],
        6,
    )
    .unwrap();
    // an indirect table whose length is not a whole number of descriptors
    mock.add_desc_chains(&[d(0x4_0000, 20, INDIRECT, 0)], 8)
        .unwrap();
    // a good request
    mock.add_desc_chains(&[d(0x2_0000, 20, NEXT, 10), d(0x2_1000, 4, WRITE, 0)], 9)
        .unwrap();
    // a loop: 11 -> 12 -> 11 ... (added last: the mock starts no new chain after a NEXT)
    mock.add_desc_chains(&[d(0x2_0000, 20, NEXT, 12), d(0x2_0000, 20, NEXT, 11)], 11)
        .unwrap();

    let r = process_requests(&mut dev, &mut q, &m).unwrap();
    assert_eq!(r.completed, 7);
    let why: Vec<_> = r
        .refused
        .iter()
        .map(|e| match e {
            ChainError::ReadableAfterWritable { .. } => "order",
            ChainError::Memory { .. } => "memory",
            ChainError::TooLarge { part, .. } => part,
            ChainError::Empty { .. } => "empty",
            ChainError::Broken { .. } => "broken",
            ChainError::TooSmall { .. } => "small",
        })
        .collect();
    assert_eq!(
        why,
        vec!["order", "memory", "readable", "writable", "empty", "broken"]
    );
    assert_eq!(r.refused[5].head(), 11);
    assert!(
        r.refused[1].to_string().contains("head 2"),
        "{}",
        r.refused[1]
    );
    assert_eq!(
        used(&mock),
        vec![(0, 0), (2, 0), (4, 0), (6, 0), (8, 0), (9, 4), (11, 0)]
    );
    assert_eq!(
        dev.endpoint_domain(8),
        Some(1),
        "the good ATTACH was served"
    );
}

/// `VIRTIO_F_EVENT_IDX`: the driver asks to be interrupted only once the used index passes
/// its `used_event`; the device honours it. (Laid out by hand: `MockSplitQueue` places its used
/// ring over the avail ring's `used_event` field, so it cannot test this.)
#[test]
fn used_event_suppresses_the_notification() {
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    let m = mem();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q.set_event_idx(true);
    let mut dev = device();
    m.write_slice(&attach(), GuestAddress(0x2_0000)).unwrap();
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    let post = |head: u16, avail_idx: u16| {
        m.write_obj(
            d(0x2_0000, 20, NEXT, head + 1),
            GuestAddress(DESC + 16 * u64::from(head)),
        )
        .unwrap();
        m.write_obj(
            d(0x2_1000, 4, WRITE, 0),
            GuestAddress(DESC + 16 * u64::from(head + 1)),
        )
        .unwrap();
        m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(avail_idx)))
            .unwrap();
        m.write_obj(avail_idx + 1, GuestAddress(AVAIL + 2)).unwrap();
    };

    m.write_obj(5u16, used_event).unwrap();
    post(0, 0);
    let r = process_requests(&mut dev, &mut q, &m).unwrap();
    assert_eq!((r.completed, r.notify), (1, false));

    m.write_obj(1u16, used_event).unwrap();
    post(2, 1);
    let r = process_requests(&mut dev, &mut q, &m).unwrap();
    assert_eq!((r.completed, r.notify), (1, true));
    assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
    // With notifications re-enabled, the device asked to be kicked at the next avail index.
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    assert_eq!(m.read_obj::<u16>(avail_event).unwrap(), 2);
}

/// A fault waits until the driver posts a buffer; a buffer too small for an event is returned
/// unused and the fault takes the next; the event reads back as the driver decodes it; a
/// backlog that is never drained stays bounded.
#[test]
fn faults_wait_for_buffers_and_the_backlog_is_bounded() {
    let m = mem();
    let mock = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut evq = EventQueue::new();
    let fault = FaultEvent {
        reason: FAULT_R_MAPPING,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: 8,
        address: 0xdead_b000,
    };
    evq.push(fault);
    let r = evq.deliver(&mut q, &m).unwrap();
    assert_eq!((r.delivered, r.notify, evq.pending()), (0, false, 1));

    mock.add_desc_chains(&[d(0x6_0000, 10, WRITE, 0)], 0)
        .unwrap();
    mock.add_desc_chains(&[d(0x6_1000, 24, WRITE, 0)], 1)
        .unwrap();
    let r = evq.deliver(&mut q, &m).unwrap();
    assert_eq!((r.delivered, r.notify, evq.pending()), (1, true, 0));
    assert!(matches!(
        r.refused[..],
        [ChainError::TooSmall { len: 10, .. }]
    ));
    assert_eq!(used(&mock), vec![(0, 0), (1, 24)]);
    let mut b = [0u8; 24];
    m.read_slice(&mut b, GuestAddress(0x6_1000)).unwrap();
    assert_eq!(FaultEvent::decode(&b), Some(fault));

    for i in 0..=EVENT_BACKLOG as u64 {
        evq.push(FaultEvent {
            address: i,
            ..fault
        });
    }
    assert_eq!((evq.pending(), evq.dropped()), (EVENT_BACKLOG, 1));
}

/// A queue whose rings are not in guest memory is refused as a whole.
#[test]
fn a_queue_outside_guest_memory_is_refused() {
    let m = mem();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_ready(true);
    q.set_desc_table_address(Some(0x4000_0000), Some(0));
    let mut dev = device();
    let e = process_requests(&mut dev, &mut q, &m).unwrap_err();
    assert!(e.to_string().contains("request"), "{e}");
    let e = EventQueue::new().deliver(&mut q, &m).unwrap_err();
    assert!(e.to_string().contains("event"), "{e}");
}
