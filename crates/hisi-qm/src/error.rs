//! The crate's error type.

use crate::access::RegionError;
use crate::mailbox::MbCmd;
use crate::state::StateError;

/// Everything the QM sequences can report. Every poll is bounded: a timeout names the register.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A register did not reach the expected value in time.
    #[error("{reg} did not become ready within {waited_us} us")]
    Timeout {
        /// The register polled.
        reg: &'static str,
        /// Microseconds of polling (sum of the requested delays).
        waited_us: u32,
    },
    /// The mailbox was still busy with an earlier command.
    #[error("QM mailbox is busy; cannot start {cmd}")]
    MailboxBusy {
        /// The command that could not start.
        cmd: MbCmd,
    },
    /// A mailbox command did not complete.
    #[error("{cmd} did not complete (mailbox busy bit stuck)")]
    MailboxTimeout {
        /// The command.
        cmd: MbCmd,
    },
    /// A mailbox command completed with an error status.
    #[error("{cmd} failed with mailbox status {status:#x}")]
    MailboxFailed {
        /// The command.
        cmd: MbCmd,
        /// The status field (bits 12:9 of word 0).
        status: u8,
    },
    /// An interrupt status register stayed non-zero through every check.
    #[error("{reg} stayed {value:#x} after {checks} checks: the function is not quiescent")]
    IntStateStuck {
        /// The register.
        reg: &'static str,
        /// Its last value.
        value: u32,
        /// How many times it was read.
        checks: u32,
    },
    /// The destination is not the device the state came from (on the data fd a resume write
    /// then fails with EFAULT, as `hisi_acc_vf_resume_write` does).
    #[error(
        "device state does not match this VF: {field} is {theirs:#x} in the stream, {ours:#x} here"
    )]
    Mismatch {
        /// The field compared.
        field: &'static str,
        /// The value in the migration data.
        theirs: u64,
        /// The value on this device.
        ours: u64,
    },
    /// The migration data is malformed.
    #[error("invalid device state")]
    State(#[from] StateError),
    /// The device ID is not a HiSilicon ACC VF.
    #[error("PCI device ID {0:#06x} is not a HiSilicon SEC/HPRE/ZIP VF")]
    UnknownDevice(u16),
    /// Too many bytes written into the resuming buffer (the driver answers ENOMEM).
    #[error("{len} bytes of device state exceed the {max}-byte acc_vf_data")]
    TooLong {
        /// Bytes that would be held.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A device-model DMA or guest-memory access failed.
    #[error("memory {} at {iova:#x} failed", if *.write { "write" } else { "read" })]
    Memory {
        /// The address.
        iova: u64,
        /// Whether it was a write.
        write: bool,
    },
    /// Where the VF's migration registers are could not be decided.
    #[error("cannot locate the VF's migration registers")]
    Region(#[from] RegionError),
    /// The source's VF BAR layout is not the destination's (old vs new QM revision or kernel):
    /// refused before any destination register is touched.
    #[error(
        "VF BAR2 layout differs: the source gives the guest {theirs}, this VF {ours}; a guest \
         cannot move between them"
    )]
    LayoutMismatch {
        /// The source's layout.
        theirs: crate::regs::Bar2Layout,
        /// This VF's layout.
        ours: crate::regs::Bar2Layout,
    },
    /// A transition the driver does not implement.
    #[error("no arc from {from} to {to}")]
    NoArc {
        /// Current state name.
        from: &'static str,
        /// Requested state name.
        to: &'static str,
    },
}
