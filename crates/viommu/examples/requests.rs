//! The virtio-iommu backend as a VMM drives it: the guest's request bytes (what a descriptor
//! chain holds) go through `VirtioIommu::handle`, which decodes them, applies them to the
//! domain model and calls the endpoint's `MapListener` — here a `RecordingListener` standing in
//! for the host IOMMU (`IommufdListener` with feature `iommufd`). Checks the status written to
//! each request's tail, the calls the listener received, the model's mappings, an invalid
//! request refused with the spec's status and no listener call, and a guest UNMAP during
//! migration reporting the removed writable range as dirty.
//!
//! `cargo run -p livemig-viommu --example requests`

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use livemig_viommu::device::{Completion, DeviceConfig, VirtioIommu};
use livemig_viommu::listener::{Call, ListenerError, MapListener, Mapping, RecordingListener};
use livemig_viommu::proto::{MAP_F_READ, MAP_F_WRITE, Request, Status};

type BoxError = Box<dyn std::error::Error>;

/// The endpoint ID of the assigned device (its PCI requester ID).
const EP: u32 = 8;

/// A recording listener the example can look into after the device took it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<RecordingListener>>);

impl MapListener for Shared {
    fn map(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.0.lock().unwrap().map(m)
    }
    fn unmap(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.0.lock().unwrap().unmap(m)
    }
    fn set_bypass(&mut self, bypass: bool) -> Result<(), ListenerError> {
        self.0.lock().unwrap().set_bypass(bypass)
    }
    fn set_tracking(&mut self, on: bool) {
        self.0.lock().unwrap().set_tracking(on)
    }
    fn take_dirty(&mut self) -> Vec<(u64, u64)> {
        self.0.lock().unwrap().take_dirty()
    }
}

/// One request as the guest queues it: the device-readable bytes, then a writable buffer for
/// the tail (status + reserved). Returns the status the device wrote.
fn submit(dev: &mut VirtioIommu, req: &Request) -> Result<Status, BoxError> {
    let readable = req.encode();
    // The bytes decode back to the request (what `handle` does first).
    if Request::decode(&readable)? != *req {
        return Err(format!("{req:?} does not survive encode/decode").into());
    }
    let mut writable = [0xffu8; 4];
    match dev.handle(&readable, &mut writable) {
        Completion::Status { status, used } => {
            if used != writable.len() || writable[0] != status as u8 || writable[1..] != [0; 3] {
                return Err(format!("tail {writable:?} (used {used}) for {status:?}").into());
            }
            Ok(status)
        }
        Completion::NotWritten => Err(format!("{req:?}: the device wrote no status").into()),
    }
}

fn expect(dev: &mut VirtioIommu, req: Request, want: Status) -> Result<(), BoxError> {
    let got = submit(dev, &req)?;
    println!("{req:?} -> {got:?}");
    if got != want {
        return Err(format!("{req:?}: status {got:?}, expected {want:?}").into());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("ok: every request got the expected status and listener calls");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("requests example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), BoxError> {
    let rec = Shared::default();
    let mut dev = VirtioIommu::new(DeviceConfig::default())?;
    dev.add_endpoint(EP, Some(Box::new(rec.clone())), vec![])?;

    let rw = MAP_F_READ | MAP_F_WRITE;
    expect(
        &mut dev,
        Request::Attach {
            domain: 1,
            endpoint: EP,
            flags: 0,
            reserved: [0; 4],
        },
        Status::Ok,
    )?;
    expect(
        &mut dev,
        Request::Map {
            domain: 1,
            virt_start: 0x10_0000,
            virt_end: 0x10_ffff,
            phys_start: 0x8000_0000,
            flags: rw,
        },
        Status::Ok,
    )?;
    expect(
        &mut dev,
        Request::Map {
            domain: 1,
            virt_start: 0x20_0000,
            virt_end: 0x20_0fff,
            phys_start: 0x9000_0000,
            flags: MAP_F_READ,
        },
        Status::Ok,
    )?;
    // Overlapping an existing mapping: S_INVAL (§5.13.6.5), and the host IOMMU never hears of it.
    let calls_before = rec.0.lock().unwrap().log.len();
    expect(
        &mut dev,
        Request::Map {
            domain: 1,
            virt_start: 0x10_8000,
            virt_end: 0x11_7fff,
            phys_start: 0xa000_0000,
            flags: rw,
        },
        Status::Inval,
    )?;
    if rec.0.lock().unwrap().log.len() != calls_before {
        return Err("the refused MAP reached the listener".into());
    }
    // A domain nobody attached: no entry.
    expect(
        &mut dev,
        Request::Unmap {
            domain: 7,
            virt_start: 0,
            virt_end: 0xfff,
            reserved: [0; 4],
        },
        Status::NoEnt,
    )?;

    let mappings = dev.mappings(1);
    if mappings.len() != 2 || rec.0.lock().unwrap().mappings.len() != 2 {
        return Err(
            format!("expected 2 mappings in the model and the host, got {mappings:?}").into(),
        );
    }

    // Migration starts: an UNMAP of a writable mapping must now report its pages dirty (an
    // iommufd listener reads the HWPT's dirty bits before it unmaps).
    dev.set_dirty_tracking(true);
    expect(
        &mut dev,
        Request::Unmap {
            domain: 1,
            virt_start: 0x10_0000,
            virt_end: 0x10_ffff,
            reserved: [0; 4],
        },
        Status::Ok,
    )?;
    let dirty = dev.take_dirty();
    println!("dirty after the unmap during migration: {dirty:x?}");
    if dirty != [(0x8000_0000, 0x1_0000)] {
        return Err(format!("expected [(0x80000000, 0x10000)] dirty, got {dirty:x?}").into());
    }
    dev.set_dirty_tracking(false);

    let log = rec.0.lock().unwrap().log.clone();
    let kinds: Vec<&str> = log
        .iter()
        .map(|c| match c {
            Call::Map(_) => "map",
            Call::Unmap(_) => "unmap",
            Call::Bypass(_) => "bypass",
        })
        .collect();
    println!("listener calls: {kinds:?}");
    if kinds.iter().filter(|k| **k == "map").count() != 2
        || kinds.iter().filter(|k| **k == "unmap").count() != 1
    {
        return Err(format!("expected 2 maps and 1 unmap at the listener, got {log:?}").into());
    }
    if dev.mappings(1).len() != 1 {
        return Err(format!("one mapping should be left: {:?}", dev.mappings(1)).into());
    }
    Ok(())
}
