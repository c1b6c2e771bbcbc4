//! A reader for the framing QEMU's VFIO migration code writes inside a device's migration
//! sections (QEMU 10.0 `hw/vfio/migration.c`; the marker values are its `VFIO_MIG_FLAG_*`), so
//! device state QEMU captured can be inspected and restored by livemig. Parsing is our own, from
//! the documented layout: a sequence of big-endian 64-bit markers, DEV_DATA_STATE followed by a
//! big-endian 64-bit size and that many bytes, DEV_CONFIG_STATE followed by the device's PCI
//! configuration vmstate ([`PciConfigState`]).
//!
//! ```text
//! section START  | DEV_SETUP_STATE | END_OF_STATE |                     vfio_save_setup()
//! section PART   | DEV_DATA_STATE | be64 n | n bytes | END_OF_STATE |   vfio_save_iterate()
//!                  (or DEV_INIT_DATA_SENT instead of END_OF_STATE, switchover-ack)
//! section END    | (DEV_DATA_STATE | be64 n | n bytes)* | END_OF_STATE | vfio_save_complete_precopy()
//! section FULL   | DEV_CONFIG_STATE | vmstate_vfio_pci_config | END_OF_STATE | vfio_save_state()
//! ```
//!
//! The configuration vmstate carries no length: its end is found by parsing its layout (see
//! [`PciConfigState`]), never by searching for the END_OF_STATE bytes, which may occur inside
//! PCI configuration space.

use alloc::vec::Vec;

/// `VFIO_MIG_FLAG_END_OF_STATE`.
pub const END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;
/// `VFIO_MIG_FLAG_DEV_CONFIG_STATE`.
pub const DEV_CONFIG_STATE: u64 = 0xffff_ffff_ef10_0002;
/// `VFIO_MIG_FLAG_DEV_SETUP_STATE`.
pub const DEV_SETUP_STATE: u64 = 0xffff_ffff_ef10_0003;
/// `VFIO_MIG_FLAG_DEV_DATA_STATE`.
pub const DEV_DATA_STATE: u64 = 0xffff_ffff_ef10_0004;
/// `VFIO_MIG_FLAG_DEV_INIT_DATA_SENT`.
pub const DEV_INIT_DATA_SENT: u64 = 0xffff_ffff_ef10_0005;
/// `VFIO_MIG_FLAG_DEV_CONFIG_LOAD_READY` (QEMU 10.1).
pub const DEV_CONFIG_LOAD_READY: u64 = 0xffff_ffff_ef10_0006;

/// Conventional PCI configuration space (`PCI_CONFIG_SPACE_SIZE`, QEMU `include/hw/pci/pci.h`).
pub const PCI_CONFIG_SPACE_SIZE: usize = 0x100;
/// PCI Express configuration space (`PCIE_CONFIG_SPACE_SIZE`, QEMU `include/hw/pci/pci.h`).
pub const PCIE_CONFIG_SPACE_SIZE: usize = 0x1000;
/// The vmstate subsection marker (`QEMU_VM_SUBSECTION`, QEMU `migration/savevm.h`).
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// Name of the optional display subsection of `vmstate_vfio_pci_config`
/// (`vmstate_vfio_display`, QEMU `hw/vfio/pci.c`).
pub const VFIO_DISPLAY_SUBSECTION: &str = "VFIOPCIDevice/VFIODisplay";
/// Bytes of the ramfb configuration the display subsection carries (`RAMFBCfg`, packed:
/// be64 addr, be32 fourcc, flags, width, height, stride; QEMU `hw/display/ramfb.c`
/// `ramfb_vmstate`).
pub const RAMFB_CFG_SIZE: usize = 28;
/// `PCI_NUM_PINS` (QEMU `include/hw/pci/pci.h`): the interrupt pin states that follow the
/// configuration space, one be32 each.
pub const PCI_NUM_PINS: usize = 4;
/// Bytes of one MSI-X table entry (`PCI_MSIX_ENTRY_SIZE`, PCI spec; Linux `pci_regs.h`).
pub const PCI_MSIX_ENTRY_SIZE: usize = 16;

// Configuration-space registers used to find the MSI-X capability (PCI Local Bus spec 3.0,
// 6.7 and 6.8.2; Linux `include/uapi/linux/pci_regs.h` names).
const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u8 = 0x10;
const PCI_CAPABILITY_LIST: usize = 0x34;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const PCI_MSIX_FLAGS_QSIZE: u16 = 0x07ff;
/// At most 48 standard capabilities fit in the 192 bytes after the header.
const MAX_CAPS: usize = 48;

/// One element of the framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// END_OF_STATE.
    EndOfState,
    /// DEV_SETUP_STATE.
    SetupState,
    /// DEV_DATA_STATE and its bytes (a chunk of the device's data fd).
    Data(&'a [u8]),
    /// DEV_CONFIG_STATE and the device's configuration vmstate that follows it (QEMU's
    /// `vmstate_vfio_pci_config`), its end found by parsing it: [`PciConfigState::parse`]
    /// decodes these bytes. The END_OF_STATE after it is the next item.
    Config(&'a [u8]),
    /// DEV_INIT_DATA_SENT.
    InitDataSent,
    /// DEV_CONFIG_LOAD_READY.
    ConfigLoadReady,
}

/// Why QEMU framing could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QemuError {
    /// Not a known marker.
    #[error("at byte {offset}: unknown marker {marker:#018x}")]
    UnknownMarker {
        /// Where.
        offset: u64,
        /// The value.
        marker: u64,
    },
    /// The input ends inside a marker, size or data.
    #[error("at byte {offset}: truncated ({needed} more bytes needed)")]
    Truncated {
        /// Where.
        offset: u64,
        /// Bytes missing.
        needed: u64,
    },
    /// A data size above the caller's limit.
    #[error("at byte {offset}: data block of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Where.
        offset: u64,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// DEV_CONFIG_STATE whose configuration vmstate is not followed by END_OF_STATE.
    #[error("at byte {offset}: config state not followed by END_OF_STATE")]
    UnterminatedConfig {
        /// Where END_OF_STATE was expected.
        offset: u64,
    },
    /// A configuration vmstate that does not have the `vmstate_vfio_pci_config` layout.
    #[error("at byte {offset}: config state: {reason}")]
    BadConfig {
        /// Where the offending field starts.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A configuration vmstate that parses both as conventional (256-byte) and as PCI Express
    /// (4096-byte) configuration space, with nothing to tell which.
    #[error("at byte {offset}: config state fits both the 256- and the 4096-byte layout")]
    AmbiguousConfig {
        /// Where the configuration vmstate starts.
        offset: u64,
    },
}

impl QemuError {
    /// The same error with its offset moved by `by` (for errors found in a slice of a file).
    pub fn shifted(self, by: u64) -> QemuError {
        let mut e = self;
        match &mut e {
            QemuError::UnknownMarker { offset, .. }
            | QemuError::Truncated { offset, .. }
            | QemuError::TooLarge { offset, .. }
            | QemuError::UnterminatedConfig { offset }
            | QemuError::BadConfig { offset, .. }
            | QemuError::AmbiguousConfig { offset } => *offset += by,
        }
        e
    }

    /// The byte offset the error names.
    pub fn offset(&self) -> u64 {
        match *self {
            QemuError::UnknownMarker { offset, .. }
            | QemuError::Truncated { offset, .. }
            | QemuError::TooLarge { offset, .. }
            | QemuError::UnterminatedConfig { offset }
            | QemuError::BadConfig { offset, .. }
            | QemuError::AmbiguousConfig { offset } => offset,
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// A bounds-checked cursor over `data` whose errors carry absolute offsets.
struct Cur<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], QemuError> {
        let have = self.data.len() - self.pos;
        if have < n {
            return Err(QemuError::Truncated {
                offset: self.pos as u64,
                needed: (n - have) as u64,
            });
        }
        let b = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }
}

/// MSI-X state of a device (`vmstate_msix`, QEMU `hw/pci/msix.c` `msix_save`): the vector
/// table then the pending-bit array, both as the guest sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixState<'a> {
    /// `PCI_MSIX_ENTRY_SIZE` bytes per vector.
    pub table: &'a [u8],
    /// One bit per vector, rounded up to whole bytes.
    pub pba: &'a [u8],
}

/// The DEV_CONFIG_STATE body of a vfio-pci device: QEMU 10.0's `vmstate_vfio_pci_config`
/// (`hw/vfio/pci.c`, written by `vfio_pci_save_config` with `vmstate_save_state`, no JSON
/// description). Layout, from `vmstate_pci_device` (`hw/pci/pci.c`), `vmstate_msix`
/// (`hw/pci/msix.c`) and `vmstate_vfio_display` (`hw/vfio/pci.c`, `hw/vfio/display.c`,
/// `hw/display/ramfb.c`):
///
/// ```text
/// be32 version_id                       PCIDevice.version_id, 0..=2 (VMSTATE_INT32_POSITIVE_LE)
/// config space                          256 bytes, or 4096 for a PCI Express device
/// be32 irq_state[4]                     each 0 or 1 (get_pci_irq_state)
/// [MSI-X table 16*n, PBA ceil(n/8)]     when configuration space has an MSI-X capability,
///                                       n = its Table Size + 1 (vfio_msix_present)
/// [0x05 len "VFIOPCIDevice/VFIODisplay" be32 version, RAMFBCfg 28 bytes]
///                                       only with ramfb migration (vfio_display_migration_needed)
/// ```
///
/// Whether the space is 256 or 4096 bytes is not in the stream (QEMU uses 4096 unless the VFIO
/// config region is exactly 256 bytes, `vfio_populate_device`): both layouts are tried and the
/// one followed by END_OF_STATE wins; a caller that knows the length (from the JSON
/// description) passes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciConfigState<'a> {
    /// `PCIDevice.version_id`.
    pub version_id: u32,
    /// The configuration space, 256 or 4096 bytes.
    pub config: &'a [u8],
    /// Interrupt pin states INTA..INTD.
    pub irq_state: [u32; PCI_NUM_PINS],
    /// MSI-X table and PBA, when the device has MSI-X.
    pub msix: Option<MsixState<'a>>,
    /// The ramfb configuration of the display subsection, when present.
    pub display: Option<&'a [u8]>,
    /// The display subsection's version.
    pub display_version: u32,
}

/// The MSI-X vector count the capability list of `config` announces: `None` without an MSI-X
/// capability, an error for a list that leaves the header-plus-capabilities area or loops.
fn msix_vectors(config: &[u8]) -> Result<Option<u16>, &'static str> {
    if config.len() < PCI_CONFIG_SPACE_SIZE || config[PCI_STATUS] & PCI_STATUS_CAP_LIST == 0 {
        return Ok(None);
    }
    let mut ptr = usize::from(config[PCI_CAPABILITY_LIST] & 0xfc);
    for _ in 0..MAX_CAPS {
        if ptr == 0 {
            return Ok(None);
        }
        if ptr < 0x40 || ptr + 4 > PCI_CONFIG_SPACE_SIZE {
            return Err("capability pointer outside 0x40..0x100");
        }
        if config[ptr] == PCI_CAP_ID_MSIX {
            let ctrl = u16::from_le_bytes([config[ptr + 2], config[ptr + 3]]);
            return Ok(Some((ctrl & PCI_MSIX_FLAGS_QSIZE) + 1));
        }
        ptr = usize::from(config[ptr + 1] & 0xfc);
    }
    Err("capability list does not end")
}

impl<'a> PciConfigState<'a> {
    /// Parses the layout with a `config_size`-byte configuration space from `data[at..]`;
    /// returns the state and the position after it.
    fn parse_at(
        data: &'a [u8],
        at: usize,
        config_size: usize,
    ) -> Result<(PciConfigState<'a>, usize), QemuError> {
        let mut c = Cur { data, pos: at };
        let bad = |offset: usize, reason| QemuError::BadConfig {
            offset: offset as u64,
            reason,
        };
        let version_id = be32(c.take(4)?);
        if version_id > 2 {
            return Err(bad(at, "PCIDevice version_id above 2"));
        }
        let config_at = c.pos;
        let config = c.take(config_size)?;
        let mut irq_state = [0u32; PCI_NUM_PINS];
        for s in irq_state.iter_mut() {
            let p = c.pos;
            *s = be32(c.take(4)?);
            if *s > 1 {
                return Err(bad(p, "irq state is neither 0 nor 1"));
            }
        }
        let msix = match msix_vectors(config).map_err(|r| bad(config_at, r))? {
            None => None,
            Some(n) => {
                let n = usize::from(n);
                let table = c.take(n * PCI_MSIX_ENTRY_SIZE)?;
                let pba = c.take(n.div_ceil(8))?;
                Some(MsixState { table, pba })
            }
        };
        let (mut display, mut display_version) = (None, 0);
        if data.get(c.pos) == Some(&QEMU_VM_SUBSECTION) {
            let sub = c.pos;
            c.take(1)?;
            let len = usize::from(c.take(1)?[0]);
            if c.take(len)? != VFIO_DISPLAY_SUBSECTION.as_bytes() {
                return Err(bad(sub, "unknown subsection"));
            }
            display_version = be32(c.take(4)?);
            display = Some(c.take(RAMFB_CFG_SIZE)?);
        }
        Ok((
            PciConfigState {
                version_id,
                config,
                irq_state,
                msix,
                display,
                display_version,
            },
            c.pos,
        ))
    }

    /// Finds where the configuration vmstate starting at `data[at..]` ends, by parsing it: of
    /// the 256- and 4096-byte layouts, the one that parses and is followed by END_OF_STATE.
    /// `expected_len` (the vmstate's length, when a description gives it) decides between
    /// layouts. Returns the state and the offset of the END_OF_STATE after it.
    pub fn parse_terminated(
        data: &'a [u8],
        at: usize,
        expected_len: Option<usize>,
    ) -> Result<(PciConfigState<'a>, usize), QemuError> {
        let mut found: Option<(PciConfigState<'a>, usize)> = None;
        let mut err = QemuError::BadConfig {
            offset: at as u64,
            reason: "fits neither layout",
        };
        for size in [PCIE_CONFIG_SPACE_SIZE, PCI_CONFIG_SPACE_SIZE] {
            let attempt = Self::parse_at(data, at, size).and_then(|(st, end)| {
                if expected_len.is_some_and(|l| l != end - at) {
                    return Err(QemuError::BadConfig {
                        offset: at as u64,
                        reason: "length differs from the description",
                    });
                }
                match data.get(end..end + 8) {
                    Some(m) if be64(m) == END_OF_STATE => Ok((st, end)),
                    Some(_) => Err(QemuError::UnterminatedConfig { offset: end as u64 }),
                    None => Err(QemuError::Truncated {
                        offset: end as u64,
                        needed: (end + 8 - data.len()) as u64,
                    }),
                }
            });
            match attempt {
                Ok(ok) => {
                    if found.is_some() {
                        return Err(QemuError::AmbiguousConfig { offset: at as u64 });
                    }
                    found = Some(ok);
                }
                // Report the failure that got furthest into the data.
                Err(e) if e.offset() >= err.offset() => err = e,
                Err(_) => {}
            }
        }
        found.ok_or(err)
    }

    /// Decodes a whole configuration vmstate (the bytes of [`Item::Config`]): exactly one
    /// layout must consume all of `blob`.
    pub fn parse(blob: &'a [u8]) -> Result<PciConfigState<'a>, QemuError> {
        let mut found = None;
        let mut err = QemuError::BadConfig {
            offset: 0,
            reason: "length fits neither layout",
        };
        for size in [PCIE_CONFIG_SPACE_SIZE, PCI_CONFIG_SPACE_SIZE] {
            match Self::parse_at(blob, 0, size) {
                Ok((st, end)) if end == blob.len() => {
                    if found.is_some() {
                        return Err(QemuError::AmbiguousConfig { offset: 0 });
                    }
                    found = Some(st);
                }
                Ok((_, end)) => {
                    err = QemuError::BadConfig {
                        offset: end as u64,
                        reason: "bytes after the configuration vmstate",
                    }
                }
                Err(e) => err = e,
            }
        }
        found.ok_or(err)
    }

    /// MSI-X vectors, from the configuration space's MSI-X capability.
    pub fn msix_vectors(&self) -> Option<u16> {
        msix_vectors(self.config).ok().flatten()
    }

    /// Vendor and device ID (configuration space bytes 0..4, little-endian).
    pub fn ids(&self) -> (u16, u16) {
        (
            u16::from_le_bytes([self.config[0], self.config[1]]),
            u16::from_le_bytes([self.config[2], self.config[3]]),
        )
    }

    /// The vmstate bytes QEMU would write for this state (for fixtures and tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.version_id.to_be_bytes());
        out.extend_from_slice(self.config);
        for s in self.irq_state {
            out.extend_from_slice(&s.to_be_bytes());
        }
        if let Some(m) = self.msix {
            out.extend_from_slice(m.table);
            out.extend_from_slice(m.pba);
        }
        if let Some(d) = self.display {
            out.push(QEMU_VM_SUBSECTION);
            out.push(VFIO_DISPLAY_SUBSECTION.len() as u8);
            out.extend_from_slice(VFIO_DISPLAY_SUBSECTION.as_bytes());
            out.extend_from_slice(&self.display_version.to_be_bytes());
            out.extend_from_slice(d);
        }
        out
    }
}

/// Iterates the framing of `data`; data blocks larger than `max_block` are refused.
#[derive(Debug, Clone)]
pub struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
    max_block: u64,
    config_len: Option<usize>,
    failed: bool,
}

impl<'a> Parser<'a> {
    /// A parser over `data`.
    pub fn new(data: &'a [u8], max_block: u64) -> Parser<'a> {
        Parser::at(data, 0, max_block)
    }

    /// A parser over `data` starting at `pos` (offsets in items and errors stay relative to the
    /// start of `data`).
    pub fn at(data: &'a [u8], pos: usize, max_block: u64) -> Parser<'a> {
        Parser {
            data,
            pos: pos.min(data.len()),
            max_block,
            config_len: None,
            failed: false,
        }
    }

    /// Tells the parser the length of the next configuration vmstate (known from QEMU's JSON
    /// description), which decides between the 256- and 4096-byte layouts.
    pub fn expect_config_len(&mut self, len: Option<usize>) {
        self.config_len = len;
    }

    /// Byte offset of the next item.
    pub fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn need(&self, n: usize) -> Result<(), QemuError> {
        let have = self.data.len() - self.pos;
        if have < n {
            return Err(QemuError::Truncated {
                offset: self.pos as u64,
                needed: (n - have) as u64,
            });
        }
        Ok(())
    }

    /// The next item; `Ok(None)` at the end of `data`.
    pub fn next_item(&mut self) -> Result<Option<Item<'a>>, QemuError> {
        if self.pos == self.data.len() {
            return Ok(None);
        }
        let start = self.pos;
        self.need(8)?;
        let marker = be64(&self.data[self.pos..]);
        self.pos += 8;
        Ok(Some(match marker {
            END_OF_STATE => Item::EndOfState,
            DEV_SETUP_STATE => Item::SetupState,
            DEV_INIT_DATA_SENT => Item::InitDataSent,
            DEV_CONFIG_LOAD_READY => Item::ConfigLoadReady,
            DEV_DATA_STATE => {
                self.need(8)?;
                let size = be64(&self.data[self.pos..]);
                self.pos += 8;
                if size > self.max_block {
                    return Err(QemuError::TooLarge {
                        offset: start as u64,
                        size,
                        max: self.max_block,
                    });
                }
                let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
                self.need(size_usize)?;
                let bytes = &self.data[self.pos..self.pos + size_usize];
                self.pos += size_usize;
                Item::Data(bytes)
            }
            DEV_CONFIG_STATE => {
                let at = self.pos;
                let expected = self.config_len.take();
                let (_, end) = PciConfigState::parse_terminated(self.data, at, expected)?;
                // The config bytes; the END_OF_STATE is left for the next call.
                self.pos = end;
                Item::Config(&self.data[at..end])
            }
            other => {
                return Err(QemuError::UnknownMarker {
                    offset: start as u64,
                    marker: other,
                });
            }
        }))
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = Result<Item<'a>, QemuError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_item() {
            Ok(Some(i)) => Some(Ok(i)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The device-state chunks (DEV_DATA_STATE payloads) of `data`, in order, ready to become
/// DeviceState records (phase UNSPECIFIED) or to be written to a RESUMING data fd.
pub fn data_chunks(data: &[u8], max_block: u64) -> Result<Vec<&[u8]>, QemuError> {
    let mut out = Vec::new();
    for item in Parser::new(data, max_block) {
        if let Item::Data(d) = item? {
            out.push(d);
        }
    }
    Ok(out)
}

/// Whether `data` starts like QEMU VFIO framing (a known marker).
pub fn looks_like_qemu(data: &[u8]) -> bool {
    data.len() >= 8
        && matches!(
            be64(data),
            END_OF_STATE
                | DEV_CONFIG_STATE
                | DEV_SETUP_STATE
                | DEV_DATA_STATE
                | DEV_INIT_DATA_SENT
                | DEV_CONFIG_LOAD_READY
        )
}

/// Encodes items in QEMU's framing (for fixtures and tests; QEMU itself is never needed).
pub fn encode(items: &[Item<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        let (marker, payload): (u64, Option<&[u8]>) = match item {
            Item::EndOfState => (END_OF_STATE, None),
            Item::SetupState => (DEV_SETUP_STATE, None),
            Item::InitDataSent => (DEV_INIT_DATA_SENT, None),
            Item::ConfigLoadReady => (DEV_CONFIG_LOAD_READY, None),
            Item::Data(d) => {
                out.extend_from_slice(&DEV_DATA_STATE.to_be_bytes());
                out.extend_from_slice(&(d.len() as u64).to_be_bytes());
                out.extend_from_slice(d);
                continue;
            }
            Item::Config(c) => (DEV_CONFIG_STATE, Some(*c)),
        };
        out.extend_from_slice(&marker.to_be_bytes());
        if let Some(p) = payload {
            out.extend_from_slice(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A 4096-byte PCI Express configuration space whose extended area holds the END_OF_STATE
    /// bytes, as a device's registers may.
    fn pcie_space() -> Vec<u8> {
        let mut c = vec![0u8; PCIE_CONFIG_SPACE_SIZE];
        c[..4].copy_from_slice(&[0x86, 0x80, 0x15, 0x10]);
        c[0x100..0x108].copy_from_slice(&END_OF_STATE.to_be_bytes());
        c[0x200..0x208].copy_from_slice(&END_OF_STATE.to_be_bytes());
        c
    }

    fn state(config: &[u8]) -> PciConfigState<'_> {
        PciConfigState {
            version_id: 2,
            config,
            irq_state: [0, 1, 0, 0],
            msix: None,
            display: None,
            display_version: 0,
        }
    }

    #[test]
    fn round_trip_and_chunks() {
        let space = pcie_space();
        let config = state(&space).encode();
        let items = [
            Item::SetupState,
            Item::EndOfState,
            Item::Data(b"first"),
            Item::InitDataSent,
            Item::EndOfState,
            Item::Data(b"second"),
            Item::Data(b""),
            Item::EndOfState,
            Item::Config(&config),
            Item::EndOfState,
            Item::ConfigLoadReady,
        ];
        let bytes = encode(&items);
        assert!(looks_like_qemu(&bytes));
        let parsed: Vec<Item<'_>> = Parser::new(&bytes, 1 << 20).map(|r| r.unwrap()).collect();
        assert_eq!(parsed, items);
        assert_eq!(
            data_chunks(&bytes, 1 << 20).unwrap(),
            alloc::vec![&b"first"[..], b"second", b""]
        );
    }

    #[test]
    fn config_containing_end_of_state_bytes_parses_by_layout() {
        let space = pcie_space();
        let blob = state(&space).encode();
        // The marker bytes occur inside the blob; a search would cut it at 4 + 0x100.
        let marker = END_OF_STATE.to_be_bytes();
        assert!(blob.windows(8).any(|w| w == marker));
        let bytes = encode(&[Item::Config(&blob), Item::EndOfState]);
        let items: Vec<_> = Parser::new(&bytes, 16).map(|r| r.unwrap()).collect();
        assert_eq!(items, [Item::Config(&blob), Item::EndOfState]);
        let st = PciConfigState::parse(&blob).unwrap();
        assert_eq!(st.config.len(), PCIE_CONFIG_SPACE_SIZE);
        assert_eq!(st.irq_state, [0, 1, 0, 0]);
        assert_eq!(st.ids(), (0x8086, 0x1015));
        // The 4,116 bytes the recipe saw from mtty: version, 4096 bytes, four pin states.
        assert_eq!(blob.len(), 4116);
    }

    #[test]
    fn conventional_space_msix_and_display_subsection() {
        let mut space = vec![0u8; PCI_CONFIG_SPACE_SIZE];
        space[PCI_STATUS] = PCI_STATUS_CAP_LIST;
        space[PCI_CAPABILITY_LIST] = 0x40;
        // 0x40: a power-management capability pointing at MSI-X at 0x50 with 5 vectors.
        space[0x40..0x42].copy_from_slice(&[0x01, 0x50]);
        space[0x50..0x54].copy_from_slice(&[PCI_CAP_ID_MSIX, 0x00, 0x04, 0x80]);
        let table = [0xabu8; 5 * PCI_MSIX_ENTRY_SIZE];
        let ramfb = [0x11u8; RAMFB_CFG_SIZE];
        let st = PciConfigState {
            msix: Some(MsixState {
                table: &table,
                pba: &[0b1_0000],
            }),
            display: Some(&ramfb),
            display_version: 1,
            ..state(&space)
        };
        let blob = st.encode();
        assert_eq!(blob.len(), 4 + 256 + 16 + 80 + 1 + 2 + 25 + 4 + 28);
        assert_eq!(PciConfigState::parse(&blob).unwrap(), st);
        assert_eq!(st.msix_vectors(), Some(5));
        let bytes = encode(&[Item::Config(&blob), Item::EndOfState]);
        assert_eq!(data_chunks(&bytes, 0).unwrap().len(), 0);
        assert!(Parser::new(&bytes, 0).all(|r| r.is_ok()));
    }

    #[test]
    fn bad_config_is_an_error_with_the_offset() {
        let space = pcie_space();
        let blob = state(&space).encode();
        // Not followed by END_OF_STATE (and too short for the other layout to fit).
        let mut bytes = encode(&[Item::Config(&blob)]);
        bytes.extend_from_slice(&DEV_SETUP_STATE.to_be_bytes());
        assert_eq!(
            data_chunks(&bytes, 10).unwrap_err(),
            QemuError::UnterminatedConfig {
                offset: 8 + blob.len() as u64
            }
        );
        // Ends before the END_OF_STATE.
        let unterminated = encode(&[Item::Config(&blob)]);
        assert!(matches!(
            data_chunks(&unterminated, 10),
            Err(QemuError::Truncated { .. })
        ));
        // An irq state of 2 is refused where it is.
        let mut bad = blob.clone();
        bad[4 + 4096 + 3] = 2;
        let bytes = encode(&[Item::Config(&bad), Item::EndOfState]);
        assert!(matches!(
            data_chunks(&bytes, 10),
            Err(QemuError::BadConfig { offset: 4108, .. })
        ));
        // Every truncation (but the empty input) is an error, never a panic.
        let bytes = encode(&[Item::Config(&blob), Item::EndOfState]);
        for cut in 1..bytes.len() {
            assert!(data_chunks(&bytes[..cut], 10).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn bad_input_is_an_error_with_the_offset() {
        let mut bad = encode(&[Item::Data(b"abc")]);
        bad.truncate(bad.len() - 1);
        assert_eq!(
            data_chunks(&bad, 1 << 20).unwrap_err(),
            QemuError::Truncated {
                offset: 16,
                needed: 1
            }
        );
        let huge = encode(&[Item::Data(&[0u8; 100])]);
        assert!(matches!(
            data_chunks(&huge, 10),
            Err(QemuError::TooLarge { size: 100, .. })
        ));
        let mut bogus = 0x1234u64.to_be_bytes().to_vec();
        bogus.extend_from_slice(&[0; 8]);
        assert!(matches!(
            data_chunks(&bogus, 10),
            Err(QemuError::UnknownMarker { offset: 0, .. })
        ));
        // A size field claiming 2^64-1 bytes is refused by the limit, not allocated.
        let mut liar = DEV_DATA_STATE.to_be_bytes().to_vec();
        liar.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            data_chunks(&liar, 1 << 20),
            Err(QemuError::TooLarge { .. })
        ));
    }
}
