//! An AMD-Vi unit programmed directly: the MMIO register map, the command encoders
//! (COMPLETION_WAIT, INVALIDATE_DEVTAB_ENTRY, INVALIDATE_IOMMU_PAGES) with their decoder, and
//! the event-log decoder. The device table entry is [`AmdDte`](crate::config::AmdDte).
//!
//! ```text
//!  MMIO  0x0000 device table base | size   0x0008 command buffer base | ComLen
//!        0x0010 event log base | EventLen  0x0018 control   0x0030 EFR ([`AmdCaps`](crate::caps::AmdCaps))
//!        0x2000 command head  0x2008 command tail  0x2010 event head  0x2018 event tail
//!        0x2020 status
//!  device table: 32-byte DTEs indexed by DeviceID (bus << 8 | devfn)
//!  command buffer: 16-byte commands, opcode in bits 63:60; software writes, advances the tail
//!  event log:      16-byte entries, EventCode in bits 63:60; software reads, advances the head
//!  head/tail registers hold byte offsets (entry index << 4)
//! ```
//!
//! Sources: Linux 6.12 `drivers/iommu/amd/amd_iommu_types.h` (`MMIO_*_OFFSET`,
//! `CONTROL_*`, `MMIO_STATUS_*`, `CMD_*`, `CMD_COMPL_WAIT_*_MASK`,
//! `CMD_INV_IOMMU_PAGES_*_MASK`, `CMD_INV_IOMMU_ALL_PAGES_ADDRESS`, `MMIO_CMD_SIZE_512`,
//! `EVT_LEN_MASK`, `EVENT_*`), `amd/iommu.c` (`CMD_SET_TYPE`, `build_completion_wait`,
//! `build_inv_dte`, `build_inv_iommu_pages` and `build_inv_address` for the S-bit range
//! encoding, `iommu_print_event` for the event-entry fields), `amd/init.c`
//! (`iommu_set_device_table`: size field = 4 KiB pages − 1; `iommu_enable_command_buffer`,
//! `iommu_enable_event_buffer`). The AMD I/O Virtualization Technology (IOMMU) Specification,
//! pub. 48882 — §3.3 "Commands" (COMPLETION_WAIT, INVALIDATE_DEVTAB_ENTRY,
//! INVALIDATE_IOMMU_PAGES), §2.5 "Event Logging" with its event-code table, §3.4 "MMIO
//! registers" — is cited as recalled, **unverified here** (no copy was available); the facts
//! taken only from that recollection are marked: COMPLETION_WAIT's F bit (2), the IO_PAGE_FAULT
//! flag names other than I and RW, event codes 0xA-0xC, the command-buffer length encoding
//! (2^ComLen entries).

use core::fmt;
use core::mem::offset_of;

use tock_registers::LocalRegisterCopy;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

use crate::Error;
use crate::config::Problem;

/// Bitfields of the AMD-Vi MMIO registers, commands and event-log entries (tock-registers).
///
/// The generated marker types and per-field constants carry no documentation of their own.
#[allow(missing_docs)]
pub mod regs {
    use tock_registers::register_bitfields;

    register_bitfields![u64,
        /// Device table base (0x0000).
        pub DEV_TAB_BASE [
            /// Table size in 4 KiB pages minus one.
            SIZE OFFSET(0) NUMBITS(9) [],
            /// Base address, bits 51:12.
            BASE OFFSET(12) NUMBITS(40) []
        ],
        /// Command buffer base (0x0008) and event log base (0x0010).
        pub RING_BASE [
            /// Base address, bits 51:12.
            BASE OFFSET(12) NUMBITS(40) [],
            /// Length: 2^LEN entries (Linux writes 9: 512 entries of 16 bytes).
            LEN OFFSET(56) NUMBITS(4) []
        ],
        /// Command buffer / event log head and tail pointers (0x2000..0x2018).
        pub RING_PTR [
            /// Byte offset of the entry (index << 4).
            PTR OFFSET(4) NUMBITS(15) []
        ],
        /// Control register (0x0018), `CONTROL_*`.
        pub CONTROL [
            /// IOMMU enable.
            IOMMU_EN OFFSET(0) NUMBITS(1) [],
            /// HyperTransport tunnel translation.
            HT_TUN_EN OFFSET(1) NUMBITS(1) [],
            /// Event log enable.
            EVT_LOG_EN OFFSET(2) NUMBITS(1) [],
            /// Event log interrupt enable.
            EVT_INT_EN OFFSET(3) NUMBITS(1) [],
            /// COMPLETION_WAIT interrupt enable.
            COMWAIT_INT_EN OFFSET(4) NUMBITS(1) [],
            /// Invalidation time-out (`CTRL_INV_TO_*`).
            INV_TIMEOUT OFFSET(5) NUMBITS(3) [
                None = 0,
                Ms1 = 1,
                Ms10 = 2,
                Ms100 = 3,
                S1 = 4,
                S10 = 5,
                S100 = 6
            ],
            /// Pass posted writes.
            PASSPW OFFSET(8) NUMBITS(1) [],
            /// Response pass posted writes.
            RESPASSPW OFFSET(9) NUMBITS(1) [],
            /// Coherent table walks.
            COHERENT OFFSET(10) NUMBITS(1) [],
            /// Isochronous.
            ISOC OFFSET(11) NUMBITS(1) [],
            /// Command buffer enable.
            CMDBUF_EN OFFSET(12) NUMBITS(1) [],
            /// PPR log enable.
            PPRLOG_EN OFFSET(13) NUMBITS(1) [],
            /// PPR interrupt enable.
            PPRINT_EN OFFSET(14) NUMBITS(1) [],
            /// PPR enable.
            PPR_EN OFFSET(15) NUMBITS(1) [],
            /// Guest translation (v2 tables) enable.
            GT_EN OFFSET(16) NUMBITS(1) [],
            /// Guest virtual APIC enable.
            GA_EN OFFSET(17) NUMBITS(1) [],
            /// Guest virtual APIC mode (`CONTROL_GAM_EN`).
            GAM_EN OFFSET(25) NUMBITS(1) [],
            /// Guest virtual APIC log enable.
            GALOG_EN OFFSET(28) NUMBITS(1) [],
            /// Guest virtual APIC log interrupt enable.
            GAINT_EN OFFSET(29) NUMBITS(1) [],
            /// Enhanced PPR handling.
            EPH_EN OFFSET(45) NUMBITS(1) [],
            /// x2APIC interrupt remapping.
            XT_EN OFFSET(50) NUMBITS(1) [],
            /// Interrupt capability for x2APIC.
            INTCAPXT_EN OFFSET(51) NUMBITS(1) [],
            /// Interrupt remapping table cache disable.
            IRTCACHEDIS OFFSET(59) NUMBITS(1) [],
            /// SNP virtual APIC.
            SNPAVIC_EN OFFSET(61) NUMBITS(1) []
        ],
        /// Status register (0x2020), `MMIO_STATUS_*`; the event/interrupt bits are
        /// write-1-to-clear.
        pub STATUS [
            /// Event log overflow.
            EVT_OVERFLOW OFFSET(0) NUMBITS(1) [],
            /// Event log interrupt.
            EVT_INT OFFSET(1) NUMBITS(1) [],
            /// COMPLETION_WAIT interrupt.
            COM_WAIT_INT OFFSET(2) NUMBITS(1) [],
            /// Event logging running.
            EVT_RUN OFFSET(3) NUMBITS(1) [],
            /// Command buffer running (QEMU `AMDVI_MMIO_STATUS_CMDBUF_RUN`).
            CMDBUF_RUN OFFSET(4) NUMBITS(1) [],
            /// PPR log overflow.
            PPR_OVERFLOW OFFSET(5) NUMBITS(1) [],
            /// PPR log interrupt.
            PPR_INT OFFSET(6) NUMBITS(1) [],
            /// PPR logging running.
            PPR_RUN OFFSET(7) NUMBITS(1) [],
            /// GA log running.
            GALOG_RUN OFFSET(8) NUMBITS(1) [],
            /// GA log overflow.
            GALOG_OVERFLOW OFFSET(9) NUMBITS(1) [],
            /// GA log interrupt.
            GALOG_INT OFFSET(10) NUMBITS(1) []
        ],
        /// Bits 63:0 of a command (dwords 0 and 1).
        pub CMD0 [
            /// COMPLETION_WAIT: store (S).
            S OFFSET(0) NUMBITS(1) [],
            /// COMPLETION_WAIT: interrupt (I).
            I OFFSET(1) NUMBITS(1) [],
            /// COMPLETION_WAIT: flush queue (F; as recalled).
            F OFFSET(2) NUMBITS(1) [],
            /// COMPLETION_WAIT: store address bits 51:3 (this field and `STORE_HI`).
            STORE_LO OFFSET(3) NUMBITS(29) [],
            /// INVALIDATE_DEVTAB_ENTRY: DeviceID; INVALIDATE_IOMMU_PAGES: PASID bits 15:0.
            DEVICE_ID OFFSET(0) NUMBITS(16) [],
            /// INVALIDATE_IOMMU_PAGES: PASID.
            PASID OFFSET(0) NUMBITS(20) [],
            /// COMPLETION_WAIT: store address bits 51:32.
            STORE_HI OFFSET(32) NUMBITS(20) [],
            /// INVALIDATE_IOMMU_PAGES: DomainID.
            DOMAIN_ID OFFSET(32) NUMBITS(16) [],
            /// Opcode (`CMD_SET_TYPE`: dword 1 bits 31:28).
            OPCODE OFFSET(60) NUMBITS(4) [
                CompletionWait = 1,
                InvalidateDevtabEntry = 2,
                InvalidateIommuPages = 3,
                InvalidateIotlbPages = 4,
                InvalidateInterruptTable = 5,
                PrefetchIommuPages = 6,
                CompletePpr = 7,
                InvalidateAll = 8
            ]
        ],
        /// Bits 127:64 of an INVALIDATE_IOMMU_PAGES command (dwords 2 and 3).
        pub INV_PAGES1 [
            /// Size: the address encodes a power-of-two range (`CMD_INV_IOMMU_PAGES_SIZE_MASK`).
            S OFFSET(0) NUMBITS(1) [],
            /// Invalidate page directory entries too (`..._PDE_MASK`).
            PDE OFFSET(1) NUMBITS(1) [],
            /// Guest: the PASID field is valid, guest (v2) translations (`..._GN_MASK`).
            GN OFFSET(2) NUMBITS(1) [],
            /// Reserved.
            RSVD OFFSET(3) NUMBITS(9) [],
            /// Address bits 63:12.
            ADDR OFFSET(12) NUMBITS(52) []
        ],
        /// Bits 63:0 of an event-log entry (`iommu_print_event`: event\[0\], event\[1\]).
        pub EVT0 [
            /// DeviceID of the requester.
            DEVICE_ID OFFSET(0) NUMBITS(16) [],
            /// PASID bits 19:16 (`EVENT_DOMID_MASK_HI`).
            PASID_HI OFFSET(16) NUMBITS(4) [],
            /// PASID bits 15:0, or the DomainID when GN is clear (`EVENT_DOMID_MASK_LO`).
            PASID_LO OFFSET(32) NUMBITS(16) [],
            /// Flags (`EVENT_FLAGS_SHIFT`, `EVENT_FLAGS_MASK`).
            FLAGS OFFSET(48) NUMBITS(12) [],
            /// EventCode (`EVENT_TYPE_SHIFT`).
            CODE OFFSET(60) NUMBITS(4) []
        ]
    ];
}

use regs::{CMD0, EVT0, INV_PAGES1, RING_BASE};

register_structs! {
    /// The AMD-Vi MMIO registers the driver programs (Linux 6.12 `MMIO_*_OFFSET`).
    pub AmdRegisters {
        /// Device table base and size.
        (0x0000 => pub dev_table_base: ReadWrite<u64, regs::DEV_TAB_BASE::Register>),
        /// Command buffer base and length.
        (0x0008 => pub cmd_buf_base: ReadWrite<u64, RING_BASE::Register>),
        /// Event log base and length.
        (0x0010 => pub event_log_base: ReadWrite<u64, RING_BASE::Register>),
        /// Control.
        (0x0018 => pub control: ReadWrite<u64, regs::CONTROL::Register>),
        /// Exclusion range base.
        (0x0020 => pub excl_base: ReadWrite<u64>),
        /// Exclusion range limit.
        (0x0028 => pub excl_limit: ReadWrite<u64>),
        /// Extended feature register ([`AmdCaps`](crate::caps::AmdCaps)).
        (0x0030 => pub efr: ReadOnly<u64>),
        /// PPR log base and length.
        (0x0038 => pub ppr_log_base: ReadWrite<u64, RING_BASE::Register>),
        (0x0040 => _reserved0),
        /// Command buffer head (advanced by the IOMMU).
        (0x2000 => pub cmd_buf_head: ReadWrite<u64, regs::RING_PTR::Register>),
        /// Command buffer tail (advanced by software).
        (0x2008 => pub cmd_buf_tail: ReadWrite<u64, regs::RING_PTR::Register>),
        /// Event log head (advanced by software).
        (0x2010 => pub event_log_head: ReadWrite<u64, regs::RING_PTR::Register>),
        /// Event log tail (advanced by the IOMMU).
        (0x2018 => pub event_log_tail: ReadWrite<u64, regs::RING_PTR::Register>),
        /// Status.
        (0x2020 => pub status: ReadWrite<u64, regs::STATUS::Register>),
        (0x2028 => _reserved1),
        /// PPR log head.
        (0x2030 => pub ppr_log_head: ReadWrite<u64, regs::RING_PTR::Register>),
        /// PPR log tail.
        (0x2038 => pub ppr_log_tail: ReadWrite<u64, regs::RING_PTR::Register>),
        (0x2040 => @END),
    }
}

/// A register by name, for code that reads and writes through an offset (all 64 bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reg {
    /// Device table base.
    DevTableBase,
    /// Command buffer base.
    CmdBufBase,
    /// Event log base.
    EventLogBase,
    /// Control.
    Control,
    /// Extended feature register.
    Efr,
    /// Command buffer head.
    CmdBufHead,
    /// Command buffer tail.
    CmdBufTail,
    /// Event log head.
    EventLogHead,
    /// Event log tail.
    EventLogTail,
    /// Status.
    Status,
}

impl Reg {
    /// Byte offset from the MMIO base (taken from [`AmdRegisters`]).
    pub const fn offset(self) -> usize {
        match self {
            Reg::DevTableBase => offset_of!(AmdRegisters, dev_table_base),
            Reg::CmdBufBase => offset_of!(AmdRegisters, cmd_buf_base),
            Reg::EventLogBase => offset_of!(AmdRegisters, event_log_base),
            Reg::Control => offset_of!(AmdRegisters, control),
            Reg::Efr => offset_of!(AmdRegisters, efr),
            Reg::CmdBufHead => offset_of!(AmdRegisters, cmd_buf_head),
            Reg::CmdBufTail => offset_of!(AmdRegisters, cmd_buf_tail),
            Reg::EventLogHead => offset_of!(AmdRegisters, event_log_head),
            Reg::EventLogTail => offset_of!(AmdRegisters, event_log_tail),
            Reg::Status => offset_of!(AmdRegisters, status),
        }
    }
}

/// Size of a device table entry, a command and an event-log entry.
pub const DTE_SIZE: usize = 32;
/// Size of a command.
pub const COMMAND_SIZE: usize = 16;
/// Size of an event-log entry.
pub const EVENT_SIZE: usize = 16;

fn check_page(what: &'static str, pa: u64) -> Result<(), Error> {
    if pa & 0xfff != 0 || pa >> 52 != 0 {
        return Err(Error::Unaligned {
            what,
            value: pa,
            align: 4096,
        });
    }
    Ok(())
}

/// The device table base register for a table of `pages` 4 KiB pages at `base` (1..=512
/// pages; 512 pages hold all 65536 DeviceIDs).
pub fn dev_table_base(base: u64, pages: u32) -> Result<u64, Error> {
    check_page("device table address", base)?;
    if !(1..=512).contains(&pages) {
        return Err(Error::Config("a device table has 1 to 512 pages"));
    }
    let mut r = LocalRegisterCopy::<u64, regs::DEV_TAB_BASE::Register>::new(0);
    r.modify(
        regs::DEV_TAB_BASE::BASE.val(base >> 12)
            + regs::DEV_TAB_BASE::SIZE.val(u64::from(pages - 1)),
    );
    Ok(r.get())
}

/// The command buffer or event log base register for a ring of 2^`len_log2` 16-byte entries
/// at `base` (Linux: 9, 512 entries in 8 KiB; 8..=15).
pub fn ring_base(base: u64, len_log2: u8) -> Result<u64, Error> {
    check_page("ring buffer address", base)?;
    if !(8..=15).contains(&len_log2) {
        return Err(Error::Config("ring length must be 2^8 to 2^15 entries"));
    }
    let mut r = LocalRegisterCopy::<u64, RING_BASE::Register>::new(0);
    r.modify(RING_BASE::BASE.val(base >> 12) + RING_BASE::LEN.val(u64::from(len_log2)));
    Ok(r.get())
}

/// Head/tail register value for ring entry `index` (16-byte entries).
pub const fn ring_offset(index: u32) -> u64 {
    (index as u64) << 4
}

/// Ring entry index from a head/tail register value.
pub const fn ring_index(reg: u64) -> u32 {
    ((reg >> 4) & 0x7fff) as u32
}

/// What an INVALIDATE_IOMMU_PAGES command covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagesRange {
    /// One 4 KiB page (S = 0).
    Page(u64),
    /// The smallest naturally aligned power-of-two range that holds `[iova, iova + size)` (S =
    /// 1 when more than one page; `build_inv_address`).
    Range {
        /// Start.
        iova: u64,
        /// Length in bytes (non-zero).
        size: u64,
    },
    /// Every address (`CMD_INV_IOMMU_ALL_PAGES_ADDRESS` with S = 1).
    All,
}

/// A command as this module encodes and decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// COMPLETION_WAIT (opcode 1).
    CompletionWait {
        /// Store `data` at the 8-byte aligned address when every earlier command completed.
        store: Option<(u64, u64)>,
        /// Raise the completion-wait interrupt.
        interrupt: bool,
        /// F: wait for the queue to drain (as recalled).
        flush: bool,
    },
    /// INVALIDATE_DEVTAB_ENTRY (opcode 2).
    InvalidateDevtabEntry {
        /// DeviceID.
        device_id: u16,
    },
    /// INVALIDATE_IOMMU_PAGES (opcode 3).
    InvalidateIommuPages {
        /// DomainID.
        domain_id: u16,
        /// PASID for guest (v2) translations (GN = 1), `None` for host translations.
        pasid: Option<u32>,
        /// First byte of the naturally aligned range covered.
        base: u64,
        /// Bytes covered (a power of two, at least 4 KiB; 2^64 is reported as `u64::MAX`).
        size: u64,
        /// PDE: page directory entries are invalidated too.
        pde: bool,
    },
}

/// A 128-bit command (little-endian).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AmdCommand {
    words: [u64; 2],
}

const CMD_WHAT: &str = "AMD-Vi command";

fn decode_err(what: &'static str, field: &'static str, value: u64, rule: &'static str) -> Error {
    Error::Decode {
        what,
        problem: Problem { field, value, rule },
    }
}

fn words_from_bytes(what: &'static str, bytes: &[u8]) -> Result<[u64; 2], Error> {
    if bytes.len() < 16 {
        return Err(Error::Truncated {
            what,
            got: bytes.len(),
            need: 16,
        });
    }
    let mut w = [0u64; 2];
    for (i, chunk) in bytes.chunks_exact(8).take(2).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        w[i] = u64::from_le_bytes(b);
    }
    Ok(w)
}

/// The S-bit address encoding of a naturally aligned range of `size` bytes at `base` (size a
/// power of two ≥ 8 KiB): bits 12..log2(size) − 2 set, bit log2(size) − 1 clear.
fn encode_size(base: u64, size_log2: u32) -> u64 {
    (base | ((1u64 << (size_log2 - 1)) - 1)) & !0xfff
}

impl AmdCommand {
    /// Wrap raw words.
    pub const fn from_words(words: [u64; 2]) -> Self {
        AmdCommand { words }
    }

    /// Read a command from 16 little-endian bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        Ok(AmdCommand {
            words: words_from_bytes(CMD_WHAT, bytes)?,
        })
    }

    /// The raw words.
    pub const fn words(&self) -> [u64; 2] {
        self.words
    }

    /// The 16 little-endian bytes to copy into the command buffer.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.words[0].to_le_bytes());
        b[8..].copy_from_slice(&self.words[1].to_le_bytes());
        b
    }

    /// COMPLETION_WAIT: with `store`, write the 64-bit `data` to the 8-byte aligned address
    /// (`build_completion_wait`) once every earlier command has completed.
    pub fn completion_wait(
        store: Option<(u64, u64)>,
        interrupt: bool,
        flush: bool,
    ) -> Result<Self, Error> {
        let mut w0 = LocalRegisterCopy::<u64, CMD0::Register>::new(0);
        w0.modify(
            CMD0::OPCODE::CompletionWait
                + CMD0::I.val(u64::from(interrupt))
                + CMD0::F.val(u64::from(flush)),
        );
        let mut w1 = 0;
        if let Some((addr, data)) = store {
            if addr % 8 != 0 || addr >> 52 != 0 {
                return Err(Error::Unaligned {
                    what: "completion-wait store address",
                    value: addr,
                    align: 8,
                });
            }
            w0.modify(
                CMD0::S::SET
                    + CMD0::STORE_LO.val((addr & 0xffff_ffff) >> 3)
                    + CMD0::STORE_HI.val(addr >> 32),
            );
            w1 = data;
        }
        Ok(AmdCommand {
            words: [w0.get(), w1],
        })
    }

    /// INVALIDATE_DEVTAB_ENTRY for `device_id` (`build_inv_dte`).
    pub fn invalidate_devtab_entry(device_id: u16) -> Self {
        let mut w0 = LocalRegisterCopy::<u64, CMD0::Register>::new(0);
        w0.modify(CMD0::OPCODE::InvalidateDevtabEntry + CMD0::DEVICE_ID.val(u64::from(device_id)));
        AmdCommand {
            words: [w0.get(), 0],
        }
    }

    /// INVALIDATE_IOMMU_PAGES for `domain_id` (`build_inv_iommu_pages`): host translations, or
    /// with `pasid` the guest (v2) translations of that PASID (GN = 1); `pde` also drops cached
    /// page directory entries (Linux always sets it).
    pub fn invalidate_iommu_pages(
        domain_id: u16,
        pasid: Option<u32>,
        range: PagesRange,
        pde: bool,
    ) -> Result<Self, Error> {
        let (addr, s) = match range {
            PagesRange::Page(iova) => {
                if iova & 0xfff != 0 {
                    return Err(Error::Unaligned {
                        what: "invalidation address",
                        value: iova,
                        align: 4096,
                    });
                }
                (iova, false)
            }
            PagesRange::All => (0x7fff_ffff_ffff_f000, true),
            PagesRange::Range { iova, size } => {
                if size == 0 {
                    return Err(Error::EmptyRange { iova });
                }
                let end = iova
                    .checked_add(size - 1)
                    .ok_or(Error::Config("invalidation range wraps around 2^64"))?;
                if iova >> 12 == end >> 12 {
                    (iova & !0xfff, false)
                } else {
                    // The highest bit in which the first and last byte differ: the range is
                    // the aligned block of twice that bit's weight.
                    let k = 64 - (iova ^ end).leading_zeros();
                    if k > 52 {
                        (0x7fff_ffff_ffff_f000, true)
                    } else {
                        (encode_size(iova & !((1u64 << k) - 1), k), true)
                    }
                }
            }
        };
        let mut w0 = LocalRegisterCopy::<u64, CMD0::Register>::new(0);
        w0.modify(CMD0::OPCODE::InvalidateIommuPages + CMD0::DOMAIN_ID.val(u64::from(domain_id)));
        if let Some(p) = pasid {
            if p >= 1 << 20 {
                return Err(Error::Config("a PASID is 20 bits"));
            }
            w0.modify(CMD0::PASID.val(u64::from(p)));
        }
        let mut w1 = LocalRegisterCopy::<u64, INV_PAGES1::Register>::new(0);
        w1.modify(
            INV_PAGES1::ADDR.val(addr >> 12)
                + INV_PAGES1::S.val(u64::from(s))
                + INV_PAGES1::PDE.val(u64::from(pde))
                + INV_PAGES1::GN.val(u64::from(pasid.is_some())),
        );
        Ok(AmdCommand {
            words: [w0.get(), w1.get()],
        })
    }

    /// Decode one of the three commands this module builds. Errors name the field: another
    /// opcode (named when known), reserved bits set, a PASID without GN.
    pub fn decode(&self) -> Result<Command, Error> {
        let [w0, w1] = self.words;
        let r = LocalRegisterCopy::<u64, CMD0::Register>::new(w0);
        let op = r.read(CMD0::OPCODE);
        let rsvd = |field: &'static str, v: u64| -> Result<(), Error> {
            if v != 0 {
                return Err(decode_err(CMD_WHAT, field, v, "reserved, must be zero"));
            }
            Ok(())
        };
        match op {
            1 => {
                // Dword 1 bits 27:20 are reserved.
                rsvd("COMPLETION_WAIT[59:52]", (w0 >> 52) & 0xff)?;
                let s = r.is_set(CMD0::S);
                let addr = (r.read(CMD0::STORE_LO) << 3) | (r.read(CMD0::STORE_HI) << 32);
                if !s && (addr != 0 || w1 != 0) {
                    return Err(decode_err(
                        CMD_WHAT,
                        "COMPLETION_WAIT.S",
                        0,
                        "store address or data given without S",
                    ));
                }
                Ok(Command::CompletionWait {
                    store: s.then_some((addr, w1)),
                    interrupt: r.is_set(CMD0::I),
                    flush: r.is_set(CMD0::F),
                })
            }
            2 => {
                rsvd("INVALIDATE_DEVTAB_ENTRY[59:16]", w0 & 0x0fff_ffff_ffff_0000)?;
                rsvd("INVALIDATE_DEVTAB_ENTRY[127:64]", w1)?;
                Ok(Command::InvalidateDevtabEntry {
                    device_id: r.read(CMD0::DEVICE_ID) as u16,
                })
            }
            3 => {
                rsvd("INVALIDATE_IOMMU_PAGES[31:20]", w0 & 0xfff0_0000)?;
                rsvd("INVALIDATE_IOMMU_PAGES[59:48]", w0 & 0x0fff_0000_0000_0000)?;
                let a = LocalRegisterCopy::<u64, INV_PAGES1::Register>::new(w1);
                rsvd("INVALIDATE_IOMMU_PAGES[75:67]", a.read(INV_PAGES1::RSVD))?;
                let gn = a.is_set(INV_PAGES1::GN);
                let pasid = r.read(CMD0::PASID) as u32;
                if !gn && pasid != 0 {
                    return Err(decode_err(
                        CMD_WHAT,
                        "INVALIDATE_IOMMU_PAGES.PASID",
                        u64::from(pasid),
                        "PASID given while GN is clear",
                    ));
                }
                let addr = a.read(INV_PAGES1::ADDR) << 12;
                let (base, size) = if a.is_set(INV_PAGES1::S) {
                    // Size 2^(n + 1) where bit n is the lowest clear bit at or above 12.
                    let n = (addr | 0xfff).trailing_ones();
                    if n >= 63 {
                        (0, u64::MAX)
                    } else {
                        let size = 1u64 << (n + 1);
                        (addr & !(size - 1), size)
                    }
                } else {
                    (addr, 4096)
                };
                Ok(Command::InvalidateIommuPages {
                    domain_id: r.read(CMD0::DOMAIN_ID) as u16,
                    pasid: gn.then_some(pasid),
                    base,
                    size,
                    pde: a.is_set(INV_PAGES1::PDE),
                })
            }
            0 => Err(decode_err(CMD_WHAT, "Opcode", 0, "no command (opcode 0)")),
            4..=8 => Err(decode_err(
                CMD_WHAT,
                "Opcode",
                op,
                match op {
                    4 => "INVALIDATE_IOTLB_PAGES: not decoded here",
                    5 => "INVALIDATE_INTERRUPT_TABLE: not decoded here",
                    6 => "PREFETCH_IOMMU_PAGES: not decoded here",
                    7 => "COMPLETE_PPR_REQUEST: not decoded here",
                    _ => "INVALIDATE_IOMMU_ALL: not decoded here",
                },
            )),
            _ => Err(decode_err(CMD_WHAT, "Opcode", op, "unknown opcode")),
        }
    }
}

impl fmt::Debug for AmdCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Ok(c) => write!(f, "AmdCommand({c:?})"),
            Err(_) => write!(f, "AmdCommand({:#018x?})", self.words),
        }
    }
}

/// Event codes (EventCode, bits 63:60 of an event-log entry; Linux `EVENT_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventCode {
    /// 1: ILLEGAL_DEV_TABLE_ENTRY.
    IllegalDevTableEntry,
    /// 2: IO_PAGE_FAULT.
    IoPageFault,
    /// 3: DEV_TAB_HARDWARE_ERROR.
    DevTabHardwareError,
    /// 4: PAGE_TAB_HARDWARE_ERROR.
    PageTabHardwareError,
    /// 5: ILLEGAL_COMMAND_ERROR.
    IllegalCommandError,
    /// 6: COMMAND_HARDWARE_ERROR.
    CommandHardwareError,
    /// 7: IOTLB_INV_TIMEOUT.
    IotlbInvTimeout,
    /// 8: INVALID_DEVICE_REQUEST.
    InvalidDeviceRequest,
    /// 9: INVALID_PPR_REQUEST.
    InvalidPprRequest,
    /// 0xA: EVENT_COUNTER_ZERO (as recalled).
    EventCounterZero,
    /// 0xB: GUEST_EVENT_FAULT (as recalled).
    GuestEventFault,
    /// 0xC: VIOMMU_HARDWARE_ERROR (as recalled).
    ViommuHardwareError,
    /// 0xD: RMP_PAGE_FAULT (SNP).
    RmpPageFault,
    /// 0xE: RMP_HARDWARE_ERROR (SNP).
    RmpHardwareError,
    /// Any other code, named by its value.
    Unknown(u8),
}

impl EventCode {
    /// From the 4-bit code.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => EventCode::IllegalDevTableEntry,
            2 => EventCode::IoPageFault,
            3 => EventCode::DevTabHardwareError,
            4 => EventCode::PageTabHardwareError,
            5 => EventCode::IllegalCommandError,
            6 => EventCode::CommandHardwareError,
            7 => EventCode::IotlbInvTimeout,
            8 => EventCode::InvalidDeviceRequest,
            9 => EventCode::InvalidPprRequest,
            0xa => EventCode::EventCounterZero,
            0xb => EventCode::GuestEventFault,
            0xc => EventCode::ViommuHardwareError,
            0xd => EventCode::RmpPageFault,
            0xe => EventCode::RmpHardwareError,
            c => EventCode::Unknown(c),
        }
    }

    /// The specification's name (`UNKNOWN` for unknown codes).
    pub fn name(self) -> &'static str {
        match self {
            EventCode::IllegalDevTableEntry => "ILLEGAL_DEV_TABLE_ENTRY",
            EventCode::IoPageFault => "IO_PAGE_FAULT",
            EventCode::DevTabHardwareError => "DEV_TAB_HARDWARE_ERROR",
            EventCode::PageTabHardwareError => "PAGE_TAB_HARDWARE_ERROR",
            EventCode::IllegalCommandError => "ILLEGAL_COMMAND_ERROR",
            EventCode::CommandHardwareError => "COMMAND_HARDWARE_ERROR",
            EventCode::IotlbInvTimeout => "IOTLB_INV_TIMEOUT",
            EventCode::InvalidDeviceRequest => "INVALID_DEVICE_REQUEST",
            EventCode::InvalidPprRequest => "INVALID_PPR_REQUEST",
            EventCode::EventCounterZero => "EVENT_COUNTER_ZERO",
            EventCode::GuestEventFault => "GUEST_EVENT_FAULT",
            EventCode::ViommuHardwareError => "VIOMMU_HARDWARE_ERROR",
            EventCode::RmpPageFault => "RMP_PAGE_FAULT",
            EventCode::RmpHardwareError => "RMP_HARDWARE_ERROR",
            EventCode::Unknown(_) => "UNKNOWN",
        }
    }
}

impl fmt::Display for EventCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventCode::Unknown(c) => write!(f, "unknown event code {c:#x}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The flags of an IO_PAGE_FAULT (and the other device events), bits 59:48 of the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventFlags(pub u16);

impl EventFlags {
    /// GN (bit 0, as recalled): the request had a PASID; the PASID field holds it.
    pub const GN: u16 = 1 << 0;
    /// NX (bit 1, as recalled): execute request.
    pub const NX: u16 = 1 << 1;
    /// US (bit 2, as recalled): user privilege.
    pub const US: u16 = 1 << 2;
    /// I (bit 3, `EVENT_FLAG_I`): interrupt request, not a memory transaction.
    pub const I: u16 = 1 << 3;
    /// PR (bit 4, as recalled): the translation was present.
    pub const PR: u16 = 1 << 4;
    /// RW (bit 5, `EVENT_FLAG_RW`): a write.
    pub const RW: u16 = 1 << 5;
    /// PE (bit 6, as recalled): permission error.
    pub const PE: u16 = 1 << 6;
    /// RZ (bit 7, as recalled): reserved bit not zero in an entry.
    pub const RZ: u16 = 1 << 7;
    /// TR (bit 8, as recalled): translation request.
    pub const TR: u16 = 1 << 8;

    /// A write (`IS_WRITE_REQUEST`).
    pub fn write(self) -> bool {
        self.0 & Self::RW != 0
    }

    /// A memory transaction, not an interrupt (`IS_IOMMU_MEM_TRANSACTION`).
    pub fn memory(self) -> bool {
        self.0 & Self::I == 0
    }

    /// GN.
    pub fn guest(self) -> bool {
        self.0 & Self::GN != 0
    }
}

/// A decoded event-log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmdEvent {
    /// EventCode.
    pub code: EventCode,
    /// DeviceID of the requester (bits 15:0).
    pub device_id: u16,
    /// For IO_PAGE_FAULT with GN clear: the DomainID; otherwise the PASID (20 bits).
    pub domain_or_pasid: u32,
    /// Flags (meaningful for device events).
    pub flags: EventFlags,
    /// Address (bits 127:64): the faulting IOVA, or the command's address for
    /// ILLEGAL_COMMAND_ERROR.
    pub address: u64,
}

const EVT_WHAT: &str = "AMD-Vi event-log entry";

impl AmdEvent {
    /// Decode an entry from its words (bits 63:0, 127:64). Errors name the field: EventCode 0
    /// (an entry the IOMMU has not finished writing: Linux retries it, erratum 732), a 20-bit
    /// PASID on an IO_PAGE_FAULT whose GN says the field is a 16-bit DomainID, a misaligned
    /// command address. Unknown codes decode, named by [`EventCode::Unknown`].
    pub fn from_words(words: [u64; 2]) -> Result<Self, Error> {
        let r = LocalRegisterCopy::<u64, EVT0::Register>::new(words[0]);
        let code = r.read(EVT0::CODE) as u8;
        if code == 0 {
            return Err(decode_err(
                EVT_WHAT,
                "EventCode",
                0,
                "no event written yet (erratum 732: retry)",
            ));
        }
        let code = EventCode::from_code(code);
        let flags = EventFlags(r.read(EVT0::FLAGS) as u16);
        let pasid_hi = r.read(EVT0::PASID_HI);
        let domain_or_pasid = ((pasid_hi << 16) | r.read(EVT0::PASID_LO)) as u32;
        if code == EventCode::IoPageFault && !flags.guest() && pasid_hi != 0 {
            return Err(decode_err(
                EVT_WHAT,
                "IO_PAGE_FAULT.PASID[19:16]",
                pasid_hi,
                "set while GN is clear (the field is a 16-bit DomainID)",
            ));
        }
        if code == EventCode::IllegalCommandError && !words[1].is_multiple_of(16) {
            return Err(decode_err(
                EVT_WHAT,
                "ILLEGAL_COMMAND_ERROR.Address",
                words[1],
                "not the address of a 16-byte command",
            ));
        }
        Ok(AmdEvent {
            code,
            device_id: r.read(EVT0::DEVICE_ID) as u16,
            domain_or_pasid,
            flags,
            address: words[1],
        })
    }

    /// Decode from the entry's 16 little-endian bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        Self::from_words(words_from_bytes(EVT_WHAT, bytes)?)
    }

    /// Encode (for tests and emulators).
    pub fn to_words(&self) -> [u64; 2] {
        let code = match self.code {
            EventCode::Unknown(c) => c,
            EventCode::IllegalDevTableEntry => 1,
            EventCode::IoPageFault => 2,
            EventCode::DevTabHardwareError => 3,
            EventCode::PageTabHardwareError => 4,
            EventCode::IllegalCommandError => 5,
            EventCode::CommandHardwareError => 6,
            EventCode::IotlbInvTimeout => 7,
            EventCode::InvalidDeviceRequest => 8,
            EventCode::InvalidPprRequest => 9,
            EventCode::EventCounterZero => 0xa,
            EventCode::GuestEventFault => 0xb,
            EventCode::ViommuHardwareError => 0xc,
            EventCode::RmpPageFault => 0xd,
            EventCode::RmpHardwareError => 0xe,
        };
        let mut r = LocalRegisterCopy::<u64, EVT0::Register>::new(0);
        r.modify(
            EVT0::CODE.val(u64::from(code & 0xf))
                + EVT0::DEVICE_ID.val(u64::from(self.device_id))
                + EVT0::PASID_HI.val(u64::from(self.domain_or_pasid >> 16) & 0xf)
                + EVT0::PASID_LO.val(u64::from(self.domain_or_pasid & 0xffff))
                + EVT0::FLAGS.val(u64::from(self.flags.0 & 0xfff)),
        );
        [r.get(), self.address]
    }
}

impl fmt::Display for AmdEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} device={:02x}:{:02x}.{} {}={:#x} address={:#x} flags={:#05x}",
            self.code,
            self.device_id >> 8,
            (self.device_id >> 3) & 0x1f,
            self.device_id & 7,
            if self.code == EventCode::IoPageFault && !self.flags.guest() {
                "domain"
            } else {
                "pasid"
            },
            self.domain_or_pasid,
            self.address,
            self.flags.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_linux() {
        let want = [
            (Reg::DevTableBase, 0x0000),
            (Reg::CmdBufBase, 0x0008),
            (Reg::EventLogBase, 0x0010),
            (Reg::Control, 0x0018),
            (Reg::Efr, 0x0030),
            (Reg::CmdBufHead, 0x2000),
            (Reg::CmdBufTail, 0x2008),
            (Reg::EventLogHead, 0x2010),
            (Reg::EventLogTail, 0x2018),
            (Reg::Status, 0x2020),
        ];
        for (r, off) in want {
            assert_eq!(r.offset(), off, "{r:?}");
        }
        assert_eq!(core::mem::size_of::<AmdRegisters>(), 0x2040);
    }

    #[test]
    fn bases_match_linux_init() {
        // iommu_enable_command_buffer: phys | MMIO_CMD_SIZE_512 (9 << 56).
        assert_eq!(ring_base(0x1234_5000, 9).unwrap(), 0x1234_5000 | (9 << 56));
        // iommu_set_device_table: phys | (size >> 12) - 1, 2 MiB for 65536 DTEs.
        assert_eq!(dev_table_base(0x4000_0000, 512).unwrap(), 0x4000_0000 | 511);
        assert!(ring_base(0x1234_5008, 9).is_err());
    }

    #[test]
    fn commands_match_linux_builders() {
        // build_completion_wait: data[0] = lo(paddr) | S, data[1] = hi(paddr) | 1 << 28,
        // data[2..3] = data.
        let c = AmdCommand::completion_wait(Some((0x1_2345_6788, 0xabcd)), false, false).unwrap();
        assert_eq!(
            c.words(),
            [(0x1u64 << 32 | 1 << 60) | 0x2345_6788 | 1, 0xabcd]
        );
        // build_inv_dte: data[0] = devid, opcode 2.
        assert_eq!(
            AmdCommand::invalidate_devtab_entry(0x20).words(),
            [0x20 | (2 << 60), 0]
        );
        // build_inv_iommu_pages for one page with PDE, domain 5.
        let c = AmdCommand::invalidate_iommu_pages(5, None, PagesRange::Page(0x4000_0000), true)
            .unwrap();
        assert_eq!(c.words(), [(5u64 << 32) | (3 << 60), 0x4000_0000 | 2]);
        // build_inv_address for 0x4000_0000 + 8 KiB: msb_diff = 12, bits below set, S.
        let c = AmdCommand::invalidate_iommu_pages(
            5,
            None,
            PagesRange::Range {
                iova: 0x4000_0000,
                size: 0x2000,
            },
            true,
        )
        .unwrap();
        assert_eq!(c.words()[1], 0x4000_0000 | 3);
        // Everything: CMD_INV_IOMMU_ALL_PAGES_ADDRESS & PAGE_MASK | S.
        let c = AmdCommand::invalidate_iommu_pages(5, Some(3), PagesRange::All, true).unwrap();
        assert_eq!(c.words()[1], 0x7fff_ffff_ffff_f000 | 7);
        assert_eq!(c.words()[0] & 0xf_ffff, 3);
    }
}
