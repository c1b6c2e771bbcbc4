//! An assigned device's I/O BAR in the guest's port space: [`RegionPorts`] forwards the
//! guest's `in`/`out` on a routed port range (`livemig_kvm::guest::GuestMonitor::route`) to
//! the VFIO region of that BAR, as a VMM does for a device whose BAR is I/O space (the mtty
//! sample's BAR0 is an 8-port 16550). It works on its own handle of the device (a duplicated
//! fd), so the engine can own the device meanwhile.

use std::sync::Mutex;

use livemig_kvm::vm::PortIo;
use livemig_vfio::{RegionInfo, VfioDevice};

use crate::Error;
use crate::device::HostDevice;

/// PCI config space region index (vfio.h: `VFIO_PCI_CONFIG_REGION_INDEX`).
const CONFIG_REGION: u32 = 7;
/// Offset of BAR0 in PCI config space; bit 0 of a BAR set means I/O space (PCI Local Bus
/// Specification 3.0, 6.2.5.1).
const BAR0: u64 = 0x10;

/// Failures kept for the report (the guest gets all ones on a failed read, as from a port
/// nobody answers).
const KEEP: usize = 16;

/// A device's I/O BAR as guest ports.
#[derive(Debug)]
pub struct RegionPorts {
    name: String,
    dev: VfioDevice,
    region: RegionInfo,
    errors: Mutex<(u64, Vec<String>)>,
}

impl RegionPorts {
    /// BAR `bar` (0..=5) of `dev`: it must be an I/O BAR (bit 0 of the BAR in config space)
    /// whose region can be read and written, at most 64 Ki ports.
    pub fn new(dev: &HostDevice, bar: u32) -> Result<RegionPorts, Error> {
        let vfio = |what: String| {
            let device = dev.name.clone();
            move |source| Error::Vfio {
                device,
                what,
                source,
            }
        };
        if bar > 5 {
            return Err(Error::Config(format!(
                "{}: BAR{bar} does not exist (BARs are 0..=5)",
                dev.name
            )));
        }
        let handle = dev.duplicate()?;
        let config = handle
            .region_info(CONFIG_REGION)
            .map_err(vfio("reading the config space region's info".into()))?;
        let mut raw = [0u8; 4];
        handle
            .read_region(&config, BAR0 + 4 * u64::from(bar), &mut raw)
            .map_err(vfio(format!("reading BAR{bar} from config space")))?;
        let value = u32::from_le_bytes(raw);
        if value & 1 == 0 {
            return Err(Error::Config(format!(
                "{}: BAR{bar} ({value:#x}) is a memory BAR; only I/O BARs are routed to guest \
                 ports",
                dev.name
            )));
        }
        let region = handle
            .region_info(bar)
            .map_err(vfio(format!("reading BAR{bar}'s region info")))?;
        if !region.readable() || !region.writable() || region.size == 0 || region.size > 0x1_0000 {
            return Err(Error::Config(format!(
                "{}: BAR{bar}'s region (flags {:#x}, {} bytes) is not a readable and writable \
                 I/O range of 1..=65536 ports",
                dev.name, region.flags, region.size
            )));
        }
        Ok(RegionPorts {
            name: format!("{} BAR{bar}", dev.name),
            dev: handle,
            region,
            errors: Mutex::new((0, Vec::new())),
        })
    }

    /// How many ports the BAR spans.
    pub fn len(&self) -> u16 {
        // At most 0x10000 (checked in `new`); a full 64 Ki range reads as 0xffff here.
        self.region.size.min(0xffff) as u16
    }

    /// Whether the BAR spans no port (never, after `new`).
    pub fn is_empty(&self) -> bool {
        self.region.size == 0
    }

    /// Accesses that failed so far: how many, and the first few.
    pub fn errors(&self) -> (u64, Vec<String>) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn failed(&self, what: String) {
        let mut g = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        if g.1.len() < KEEP {
            g.1.push(what);
        }
    }
}

impl PortIo for RegionPorts {
    fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) {
        if let Err(e) = self.dev.write_region(&self.region, u64::from(port), data) {
            self.failed(format!(
                "vCPU {vcpu}: out of {} bytes to {} port {port:#x}: {e}",
                data.len(),
                self.name
            ));
        }
    }

    fn io_in(&self, vcpu: u32, port: u16, data: &mut [u8]) {
        if let Err(e) = self.dev.read_region(&self.region, u64::from(port), data) {
            data.fill(0xff);
            self.failed(format!(
                "vCPU {vcpu}: in of {} bytes from {} port {port:#x}: {e}",
                data.len(),
                self.name
            ));
        }
    }
}
