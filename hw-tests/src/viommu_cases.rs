//! livemig-viommu against the real kernel:
//! * the iommufd listener: guest MAP/UNMAP requests through the virtio-iommu device model land in
//!   an IOAS whose mock device sits on a dirty-tracking HWPT, and a guest unmap during migration
//!   reports the pages the device dirtied;
//! * the fault path: the selftest mock's page requests, delivered by iommufd's fault queue on a
//!   nested HWPT, are answered to the kernel and the unrecoverable one reaches the guest's event
//!   queue (guest side: rust-vmm's `virtio-queue` mock driver).

use anyhow::{Result, ensure};
use std::time::Duration;

use livemig_iommufd::{AutoDomains, HwptFlags, Iommufd};
use livemig_viommu::device::{DeviceConfig, VirtioIommu};
use livemig_viommu::faults::FaultRelay;
use livemig_viommu::listener::{GuestMemory, IommufdListener};
use livemig_viommu::proto::{
    FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_MAPPING, FaultEvent, MAP_F_READ,
    MAP_F_WRITE, Request, Status,
};
use livemig_viommu::queue::{EventQueue, process_requests};

use crate::check_eq;
use crate::harness::{Outcome, Runner};
use crate::mock::*;
use crate::util::DmaBuf;

/// Guest RAM for the case: `buf` at guest-physical `base`.
struct Ram {
    base: u64,
    buf: DmaBuf,
}

// SAFETY: the buffer is plain anonymous memory, only its address is shared between threads.
unsafe impl Send for Ram {}

// SAFETY: `buf` stays mapped for as long as `Ram` lives, and the listener owning `Ram` removes
// its IOAS mappings before dropping it.
unsafe impl GuestMemory for Ram {
    fn host(&self, gpa: u64) -> Option<(*mut u8, u64)> {
        let off = gpa.checked_sub(self.base)?;
        let len = self.buf.len() as u64;
        // SAFETY: `off < len`, inside the buffer.
        (off < len).then(|| (unsafe { self.buf.ptr().add(off as usize) }, len - off))
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        vec![(self.base, self.buf.len() as u64)]
    }
}

const RAM_BASE: u64 = 0x4000_0000;
const RAM_SIZE: usize = 1 << 20;

fn map(iova: u64, len: u64, gpa: u64) -> Request {
    Request::Map {
        domain: 1,
        virt_start: iova,
        virt_end: iova + len - 1,
        phys_start: gpa,
        flags: MAP_F_READ | MAP_F_WRITE,
    }
}

fn unmap(iova: u64, len: u64) -> Request {
    Request::Unmap {
        domain: 1,
        virt_start: iova,
        virt_end: iova + len - 1,
        reserved: [0; 4],
    }
}

fn iommufd_listener() -> Result<Outcome> {
    let fd = Iommufd::open()?;
    let ioas = fd.alloc_ioas()?;
    if crate::harness::kernel_at_least(7, 0) {
        ioas.set_huge_pages(false)?; // one leaf per host page (see `dirty_grain`)
    }
    let mock = MockDevice::new(&fd, ioas.id(), 0)?;
    let mut auto = AutoDomains::new(ioas.clone());
    let placed = auto.attach(&fd.probe_device(mock.idev_id), |pt| mock.replace(pt))?;
    ensure!(
        placed.dirty_tracking,
        "mock device without dirty tracking: {placed}"
    );
    let hwpt = auto.hwpts()[0].clone();
    let ram = Ram {
        base: RAM_BASE,
        buf: DmaBuf::new(RAM_SIZE)?,
    };
    let listener = IommufdListener::new(ioas.clone(), auto.hwpts().to_vec(), ram, MOCK_PAGE_SIZE);
    let mut dev = VirtioIommu::new(DeviceConfig::default())?;
    dev.add_endpoint(8, Some(Box::new(listener)), vec![])?;
    let attach = Request::Attach {
        domain: 1,
        endpoint: 8,
        flags: 0,
        reserved: [0; 4],
    };
    check_eq!(dev.request(&attach), Status::Ok);

    let iova = MOCK_APERTURE_START;
    let len = 256u64 << 10;
    let gpa = RAM_BASE + (64 << 10);
    check_eq!(dev.request(&map(iova, len, gpa)), Status::Ok);
    // The kernel holds the mapping: mapping it again behind the listener's back collides.
    let probe = DmaBuf::new(4096)?;
    // SAFETY: `probe` outlives the IOAS mapping should the kernel accept it (it is unmapped
    // with the IOAS when `ioas` is destroyed at the end of the case, before `probe` drops).
    let again = unsafe {
        ioas.map_user(
            probe.ptr(),
            4096,
            livemig_iommufd::Placement::Fixed(iova),
            livemig_iommufd::DmaAccess::READ,
        )
    };
    ensure!(
        again.is_err(),
        "IOVA {iova:#x} was not mapped by the listener"
    );

    // A MAP of guest-physical memory that is not RAM is refused with a status and leaves the
    // device model unchanged.
    let st = dev.request(&map(iova + len, 0x1000, 0x1000));
    check_eq!(st, Status::DevErr);
    check_eq!(dev.mappings(1).len(), 1);

    // Migration starts: HWPT tracking on, listeners switch to read-dirty-then-unmap.
    auto.set_dirty_tracking(true)?;
    dev.set_dirty_tracking(true);
    let page = MOCK_PAGE_SIZE;
    let mut marks = vec![0u64; (len / page).div_ceil(64) as usize];
    marks[0] = 0b1001; // pages 0 and 3 of the mapping
    check_eq!(mark_dirty(&fd, hwpt.id(), iova, len, page, &marks)?, 2);
    check_eq!(dev.request(&unmap(iova, len)), Status::Ok);
    // Pages 0 and 3 (6.12); their whole 4 KiB leaves on 7.3 (see `dirty_grain`), merged.
    let mut want: Vec<(u64, u64)> = Vec::new();
    for p in reported_dirty(&[0, 3]) {
        match want.last_mut() {
            Some((at, len)) if *at + *len == gpa + p * page => *len += page,
            _ => want.push((gpa + p * page, page)),
        }
    }
    check_eq!(
        dev.take_dirty(),
        want,
        "dirty guest-physical ranges from the unmap"
    );
    check_eq!(
        ioas.unmap_all()?,
        0,
        "the guest unmap removed the IOAS mapping"
    );

    // After tracking stops, an unmap reports nothing.
    dev.set_dirty_tracking(false);
    auto.set_dirty_tracking(false)?;
    check_eq!(dev.request(&map(iova, len, gpa)), Status::Ok);
    check_eq!(dev.request(&unmap(iova, len)), Status::Ok);
    ensure!(dev.take_dirty().is_empty());

    // Detach removes the domain's mappings from the host; dropping the device (and its
    // listener) leaves nothing behind.
    check_eq!(dev.request(&map(iova, len, gpa)), Status::Ok);
    let detach = Request::Detach {
        domain: 1,
        endpoint: 8,
    };
    check_eq!(dev.request(&detach), Status::Ok);
    check_eq!(ioas.unmap_all()?, 0, "detach removed the mappings");
    drop(dev);
    drop(mock);
    Ok(Outcome::Pass)
}

/// The guest's side of the two virtqueues, laid out by rust-vmm's `MockSplitQueue` (the
/// driver half nobody here wrote) in `vm-memory` guest memory.
mod guest {
    pub use virtio_queue::desc::RawDescriptor;
    pub use virtio_queue::desc::split::Descriptor;
    pub use virtio_queue::mock::MockSplitQueue;
    pub use virtio_queue::{Queue, QueueT};
    pub use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;

    pub fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// `(id, len)` of every used-ring entry.
    pub fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        (0..q.used().idx().load())
            .map(|i| {
                let e = q.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }
}

/// What a page request to the mock device came to, seen from the guest and from the kernel.
struct IopfRun {
    /// Answers the relay wrote to the kernel.
    answers: Vec<(u32, livemig_iommufd::PageResponse)>,
    /// Fault events the guest's event queue received, decoded from guest memory.
    events: Vec<FaultEvent>,
}

/// Sets up the mock device behind a nested HWPT (with the fault queue attached when
/// `with_queue`), a virtio-iommu whose guest (rust-vmm's mock driver) attached endpoint 8 and
/// mapped `[0x10000, 0x1ffff]` read/write through the request queue, then has the mock device
/// fault at each of `addrs` (read+write) and relays what the kernel delivers.
fn iopf_run(with_queue: bool, addrs: &[u64]) -> Result<IopfRun> {
    use guest::*;
    let fd = Iommufd::open()?;
    let ioas = fd.alloc_ioas()?;
    let mock = MockDevice::new(&fd, ioas.id(), 0)?;
    let parent = ioas.alloc_hwpt(mock.idev_id, HwptFlags::NEST_PARENT)?;
    let fq = fd.alloc_fault_queue()?;
    let nested = parent.alloc_nested(
        mock.idev_id,
        HWPT_DATA_SELFTEST,
        &nested_data(),
        with_queue.then_some(&fq),
    )?;
    check_eq!(mock.replace(nested.id())?, nested.id());

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let reqq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let evq_driver = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    let mut reqs: Queue = reqq.create_queue()?;
    let mut events: Queue = evq_driver.create_queue()?;
    let mut dev = VirtioIommu::new(DeviceConfig::default())?;
    dev.add_endpoint(8, None, vec![])?;
    let attach = Request::Attach {
        domain: 1,
        endpoint: 8,
        flags: 0,
        reserved: [0; 4],
    };
    for (i, req) in [attach, map(0x10000, 0x10000, RAM_BASE)].iter().enumerate() {
        let at = 0x2_0000 + 0x1000 * i as u64;
        let bytes = req.encode();
        mem.write_slice(&bytes, GuestAddress(at))?;
        let head = 2 * i as u16;
        reqq.add_desc_chains(
            &[
                d(at, bytes.len() as u32, NEXT, head + 1),
                d(at + 0x800, 4, WRITE, 0),
            ],
            head,
        )?;
    }
    let served = process_requests(&mut dev, &mut reqs, &mem)?;
    ensure!(served.refused.is_empty(), "{:?}", served.refused);
    check_eq!(used(&reqq), vec![(0, 4), (2, 4)]);
    for i in 0..2u64 {
        check_eq!(
            mem.read_obj::<u8>(GuestAddress(0x2_0800 + 0x1000 * i))?,
            Status::Ok as u8
        );
    }
    for i in 0..4u16 {
        evq_driver.add_desc_chains(&[d(0x3_0000 + 0x100 * u64::from(i), 24, WRITE, 0)], i)?;
    }

    let mut relay = FaultRelay::new();
    relay.add_device(mock.idev_id, 8);
    let mut evq = EventQueue::new();
    let mut answers = Vec::new();
    for (grp, &addr) in addrs.iter().enumerate() {
        let perm = livemig_iommufd::abi::IOMMU_PGFAULT_PERM_READ
            | livemig_iommufd::abi::IOMMU_PGFAULT_PERM_WRITE;
        trigger_iopf(&fd, mock.idev_id, 0, grp as u32, perm, addr)?;
        let t = relay.relay(&fq, &dev, Some(Duration::from_millis(500)))?;
        for &(cookie, answer) in &t.responses {
            // The kernel took the answer: the cookie is gone, a second answer is refused.
            let again = fq.respond(cookie, answer);
            ensure!(
                again
                    .as_ref()
                    .is_err_and(|e| e.errno() == Some(libc::EINVAL)),
                "a second answer to cookie {cookie} was not refused with EINVAL: {again:?}"
            );
        }
        answers.extend(t.responses);
        t.events.into_iter().for_each(|e| evq.push(e));
    }
    evq.deliver(&mut events, &mem)?;
    let mut got = Vec::new();
    for (id, len) in used(&evq_driver) {
        check_eq!(len, 24, "event buffer {id}");
        let mut b = [0u8; 24];
        mem.read_slice(&mut b, GuestAddress(0x3_0000 + 0x100 * u64::from(id)))?;
        got.push(FaultEvent::decode(&b).ok_or_else(|| anyhow::anyhow!("event {id} undecodable"))?);
    }
    check_eq!(mock.replace(parent.id())?, parent.id());
    drop(nested);
    Ok(IopfRun {
        answers,
        events: got,
    })
}

/// A page request the guest's translation permits is answered SUCCESS to the kernel and the
/// guest hears nothing; one it does not permit is answered INVALID and reaches the guest as a
/// `FAULT_R_MAPPING` event on the event queue. The kernel (Linux 6.12's iommufd fault queue
/// and the selftest mock's `IOMMU_TEST_OP_TRIGGER_IOPF`) is the other side throughout.
fn iopf_to_event_queue() -> Result<Outcome> {
    use livemig_iommufd::PageResponse;
    let run = iopf_run(true, &[0x10800, 0x30000])?;
    check_eq!(run.answers.len(), 2, "one answer per page request group");
    check_eq!(run.answers[0].1, PageResponse::Success);
    check_eq!(run.answers[1].1, PageResponse::Invalid);
    check_eq!(
        run.events,
        vec![FaultEvent {
            reason: FAULT_R_MAPPING,
            flags: FAULT_F_READ | FAULT_F_WRITE | FAULT_F_ADDRESS,
            endpoint: 8,
            address: 0x30000,
        }]
    );
    Ok(Outcome::Pass)
}

/// Negative control: with the fault queue not attached to the HWPT, the kernel answers the
/// page request itself and the relay reads nothing, so the positive case's check (one INVALID
/// answer and one event for the guest) would fail.
fn negative_control_no_fault_queue_no_event() -> Result<Outcome> {
    let run = iopf_run(false, &[0x10800, 0x30000])?;
    ensure!(
        run.answers.is_empty() && run.events.is_empty(),
        "page requests reached a fault queue the HWPT does not report to: {:?} {:?}",
        run.answers,
        run.events
    );
    Ok(Outcome::Pass)
}

pub fn run(r: &mut Runner) {
    r.case("viommu.iommufd_listener_mock", iommufd_listener);
    r.case("viommu.iopf_to_event_queue", iopf_to_event_queue);
    r.case(
        "viommu.negative_control_no_fault_queue_no_event",
        negative_control_no_fault_queue_no_event,
    );
}
