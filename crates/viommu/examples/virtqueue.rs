//! The virtio-iommu device on its virtqueues, as a VMM plugs it in: the guest (rust-vmm's
//! `virtio-queue` mock driver, laying out rings in `vm-memory` guest memory) queues an ATTACH
//! and a MAP split across descriptors on the request queue and posts event buffers; the VMM
//! serves the request queue with `queue::process_requests`; a DMA fault the VMM learns of
//! (here: an access to an unmapped IOVA, decided by `VirtioIommu::fault_for`; in a VMM, a page
//! request from iommufd's fault queue through `faults::FaultRelay`) reaches the guest as a
//! fault event through `queue::EventQueue`. Exits non-zero if any step's result is wrong.
//!
//! `cargo run -p livemig-viommu --features virtio-queue --example virtqueue`

use std::process::ExitCode;

use livemig_viommu::device::{Access, DeviceConfig, VirtioIommu};
use livemig_viommu::proto::{FAULT_R_MAPPING, FaultEvent, MAP_F_READ, Request, Status};
use livemig_viommu::queue::{EventQueue, process_requests};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type BoxError = Box<dyn std::error::Error>;

const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn run() -> Result<(), BoxError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    // The guest's two virtqueues: requests at 0, events at 0x1000.
    let req_driver = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let ev_driver = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    // The VMM's side, as its transport would have configured them.
    let mut requests: Queue = req_driver.create_queue()?;
    let mut events: Queue = ev_driver.create_queue()?;

    let mut dev = VirtioIommu::new(DeviceConfig::default())?;
    dev.add_endpoint(8, None, vec![])?;

    let attach = Request::Attach {
        domain: 1,
        endpoint: 8,
        flags: 0,
        reserved: [0; 4],
    }
    .encode();
    let map = Request::Map {
        domain: 1,
        virt_start: 0x10000,
        virt_end: 0x1ffff,
        phys_start: 0x8000_0000,
        flags: MAP_F_READ,
    }
    .encode();
    mem.write_slice(&attach, GuestAddress(0x2_0000))?;
    mem.write_slice(&map, GuestAddress(0x2_1000))?;
    // ATTACH: head and body in separate descriptors; MAP: in one; each with a 4-byte tail.
    req_driver.add_desc_chains(
        &[
            desc(0x2_0000, 4, NEXT, 1),
            desc(0x2_0004, 16, NEXT, 2),
            desc(0x2_0800, 4, WRITE, 0),
        ],
        0,
    )?;
    req_driver.add_desc_chains(
        &[
            desc(0x2_1000, map.len() as u32, NEXT, 4),
            desc(0x2_1800, 4, WRITE, 0),
        ],
        3,
    )?;

    let report = process_requests(&mut dev, &mut requests, &mem)?;
    println!(
        "request queue: {} served, {} refused, notify the guest: {}",
        report.completed,
        report.refused.len(),
        report.notify
    );
    for tail in [0x2_0800u64, 0x2_1800] {
        let status = mem.read_obj::<u8>(GuestAddress(tail))?;
        if status != Status::Ok as u8 {
            return Err(format!("status {status} at {tail:#x}, expected OK").into());
        }
    }
    if report.completed != 2 || dev.mappings(1).len() != 1 {
        return Err("the two requests were not both applied".into());
    }

    // The guest posts an event buffer; the device DMAs to an IOVA it never mapped.
    ev_driver.add_desc_chains(&[desc(0x3_0000, 24, WRITE, 0)], 0)?;
    let access = Access {
        write: true,
        ..Access::default()
    };
    let read = Access {
        read: true,
        ..Access::default()
    };
    if dev.fault_for(8, 0x10800, read).is_some() {
        return Err("a read of a mapped IOVA was reported as a fault".into());
    }
    let fault = dev
        .fault_for(8, 0x40000, access)
        .ok_or("an access to an unmapped IOVA was not a fault")?;
    let mut evq = EventQueue::new();
    evq.push(fault);
    let delivered = evq.deliver(&mut events, &mem)?;
    let mut b = [0u8; FaultEvent::LEN];
    mem.read_slice(&mut b, GuestAddress(0x3_0000))?;
    let seen = FaultEvent::decode(&b).ok_or("the event buffer holds no valid event")?;
    println!(
        "event queue: {} delivered; the guest reads reason {}, endpoint {}, address {:#x}",
        delivered.delivered, seen.reason, seen.endpoint, seen.address
    );
    if seen != fault || seen.reason != FAULT_R_MAPPING || seen.address != 0x40000 {
        return Err(format!("the guest read {seen:?}, expected {fault:?}").into());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtqueue example failed: {e}");
            ExitCode::FAILURE
        }
    }
}
