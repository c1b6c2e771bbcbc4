//! The mailbox command, doorbells and the SQC VFT entry: encoders and decoders.
//!
//! ```text
//!  mailbox (16 bytes, little endian, written to 0x300 in one 128-bit store)
//!   0      2          4        8        12      16
//!   | w0   | queue_num | base_l | base_h | rsvd  |
//!   w0: cmd 7:0 | status 12:9 | busy 13 | op 14 (1 = read from hardware)
//!
//!  doorbell (64 bits): qn 11:0 | cmd 15:12 | rand 31:16 | index 47:32 | priority 55:48
//!  SQC VFT (64 bits):  base 43:28 | valid 44 | (number - 1) 54:45
//! ```
//!
//! Values: Linux 6.12 `include/linux/hisi_acc_qm.h` (`QM_MB_CMD_*`, `QM_MB_BUSY_SHIFT`,
//! `QM_MB_OP_SHIFT`, `QM_DOORBELL_CMD_*`, `QM_DB_*_SHIFT_V2`), `drivers/crypto/hisilicon/qm.c`
//! (`struct qm_mailbox`, `qm_mb_pre_init`, `QM_MB_STATUS_MASK`, `QM_SQC_VFT_*`) and
//! `hisi_acc_vfio_pci.h` (`QM_MB_CMD_PAUSE_QM`, `QM_SQC_VFT_*_V2`).

use core::fmt;

use tock_registers::LocalRegisterCopy;

use crate::regs::fields::{DOORBELL, MB_W0, SQC_VFT};

/// A mailbox command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MbCmd {
    /// `QM_MB_CMD_SQC` (0x0).
    Sqc,
    /// `QM_MB_CMD_CQC` (0x1).
    Cqc,
    /// `QM_MB_CMD_EQC` (0x2).
    Eqc,
    /// `QM_MB_CMD_AEQC` (0x3).
    Aeqc,
    /// `QM_MB_CMD_SQC_BT` (0x4): the SQC table base address.
    SqcBt,
    /// `QM_MB_CMD_CQC_BT` (0x5): the CQC table base address.
    CqcBt,
    /// `QM_MB_CMD_SQC_VFT_V2` (0x6): the function's SQC VFT entry.
    SqcVftV2,
    /// `QM_MB_CMD_STOP_QP` (0x8).
    StopQp,
    /// `QM_MB_CMD_FLUSH_QM` (0x9).
    FlushQm,
    /// `QM_MB_CMD_PAUSE_QM` (0xe): stop the function's queues.
    PauseQm,
    /// Any other value.
    Other(u8),
}

impl MbCmd {
    /// The command code.
    pub const fn code(self) -> u8 {
        match self {
            MbCmd::Sqc => 0x0,
            MbCmd::Cqc => 0x1,
            MbCmd::Eqc => 0x2,
            MbCmd::Aeqc => 0x3,
            MbCmd::SqcBt => 0x4,
            MbCmd::CqcBt => 0x5,
            MbCmd::SqcVftV2 => 0x6,
            MbCmd::StopQp => 0x8,
            MbCmd::FlushQm => 0x9,
            MbCmd::PauseQm => 0xe,
            MbCmd::Other(c) => c,
        }
    }

    /// The command for a code.
    pub const fn from_code(code: u8) -> MbCmd {
        match code {
            0x0 => MbCmd::Sqc,
            0x1 => MbCmd::Cqc,
            0x2 => MbCmd::Eqc,
            0x3 => MbCmd::Aeqc,
            0x4 => MbCmd::SqcBt,
            0x5 => MbCmd::CqcBt,
            0x6 => MbCmd::SqcVftV2,
            0x8 => MbCmd::StopQp,
            0x9 => MbCmd::FlushQm,
            0xe => MbCmd::PauseQm,
            c => MbCmd::Other(c),
        }
    }
}

impl fmt::Display for MbCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MbCmd::Sqc => f.write_str("QM_MB_CMD_SQC"),
            MbCmd::Cqc => f.write_str("QM_MB_CMD_CQC"),
            MbCmd::Eqc => f.write_str("QM_MB_CMD_EQC"),
            MbCmd::Aeqc => f.write_str("QM_MB_CMD_AEQC"),
            MbCmd::SqcBt => f.write_str("QM_MB_CMD_SQC_BT"),
            MbCmd::CqcBt => f.write_str("QM_MB_CMD_CQC_BT"),
            MbCmd::SqcVftV2 => f.write_str("QM_MB_CMD_SQC_VFT_V2"),
            MbCmd::StopQp => f.write_str("QM_MB_CMD_STOP_QP"),
            MbCmd::FlushQm => f.write_str("QM_MB_CMD_FLUSH_QM"),
            MbCmd::PauseQm => f.write_str("QM_MB_CMD_PAUSE_QM"),
            MbCmd::Other(c) => write!(f, "mailbox command {c:#x}"),
        }
    }
}

/// One mailbox command as software writes it (`struct qm_mailbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox {
    /// The command.
    pub cmd: MbCmd,
    /// `true`: read from hardware (`op` = 1); `false`: write to hardware.
    pub read: bool,
    /// Queue number.
    pub queue: u16,
    /// DMA address (or data) for the command.
    pub base: u64,
}

impl Mailbox {
    /// Bytes of a mailbox command.
    pub const LEN: usize = 16;

    /// The command with the busy bit set, as 16 little-endian bytes (`qm_mb_pre_init`).
    pub fn encode(&self) -> [u8; 16] {
        let mut w0 = LocalRegisterCopy::<u32, MB_W0::Register>::new(0);
        w0.modify(
            MB_W0::CMD.val(u32::from(self.cmd.code()))
                + MB_W0::BUSY::SET
                + MB_W0::OP.val(u32::from(self.read))
                + MB_W0::QUEUE.val(u32::from(self.queue)),
        );
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&w0.get().to_le_bytes());
        b[4..8].copy_from_slice(&(self.base as u32).to_le_bytes());
        b[8..12].copy_from_slice(&((self.base >> 32) as u32).to_le_bytes());
        b
    }

    /// The command as four 32-bit words (0x300, 0x304, 0x308, 0x30c).
    pub fn words(&self) -> [u32; 4] {
        let b = self.encode();
        [0, 4, 8, 12].map(|i| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
    }

    /// Decode 16 bytes (any value decodes); also returns the busy bit and status field.
    pub fn decode(b: &[u8; 16]) -> (Mailbox, MbStatus) {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let w0 = LocalRegisterCopy::<u32, MB_W0::Register>::new(w(0));
        (
            Mailbox {
                cmd: MbCmd::from_code(w0.read(MB_W0::CMD) as u8),
                read: w0.is_set(MB_W0::OP),
                queue: w0.read(MB_W0::QUEUE) as u16,
                base: u64::from(w(4)) | (u64::from(w(8)) << 32),
            },
            MbStatus::from_word(w(0)),
        )
    }
}

/// What word 0 of the mailbox says about the last command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbStatus {
    /// The command is still running.
    pub busy: bool,
    /// Non-zero: the command failed (`QM_MB_STATUS_MASK`, bits 12:9).
    pub status: u8,
}

impl MbStatus {
    /// Decode word 0 as read from `QM_MB_CMD_SEND_BASE`.
    pub fn from_word(w0: u32) -> MbStatus {
        let r = LocalRegisterCopy::<u32, MB_W0::Register>::new(w0);
        MbStatus {
            busy: r.is_set(MB_W0::BUSY),
            status: r.read(MB_W0::STATUS) as u8,
        }
    }
}

/// Which doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DbCmd {
    /// `QM_DOORBELL_CMD_SQ` (0): submission queue tail.
    Sq,
    /// `QM_DOORBELL_CMD_CQ` (1): completion queue head.
    Cq,
    /// `QM_DOORBELL_CMD_EQ` (2): event queue head.
    Eq,
    /// `QM_DOORBELL_CMD_AEQ` (3): asynchronous event queue head.
    Aeq,
}

impl DbCmd {
    /// Whether the doorbell goes to the SQ/CQ window (0x1000) rather than EQ/AEQ (0x2000).
    pub const fn sq_cq_window(self) -> bool {
        matches!(self, DbCmd::Sq | DbCmd::Cq)
    }
}

/// A V2 doorbell (`qm_db`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doorbell {
    /// Queue number.
    pub qn: u16,
    /// Which doorbell.
    pub cmd: DbCmd,
    /// Index (new SQ tail, CQ/EQ/AEQ head).
    pub index: u16,
    /// Priority; the migration driver restarts queues with 1.
    pub priority: u8,
}

impl Doorbell {
    /// The 64-bit value (random data 0, as the driver writes it).
    pub fn encode(&self) -> u64 {
        let cmd = match self.cmd {
            DbCmd::Sq => DOORBELL::CMD::Sq,
            DbCmd::Cq => DOORBELL::CMD::Cq,
            DbCmd::Eq => DOORBELL::CMD::Eq,
            DbCmd::Aeq => DOORBELL::CMD::Aeq,
        };
        let mut v = LocalRegisterCopy::<u64, DOORBELL::Register>::new(0);
        v.modify(
            DOORBELL::QN.val(u64::from(self.qn))
                + cmd
                + DOORBELL::INDEX.val(u64::from(self.index))
                + DOORBELL::PRIORITY.val(u64::from(self.priority)),
        );
        v.get()
    }

    /// Decode a doorbell value; `None` if the command field is not one of the four doorbells.
    pub fn decode(v: u64) -> Option<Doorbell> {
        let r = LocalRegisterCopy::<u64, DOORBELL::Register>::new(v);
        let cmd = match r.read_as_enum(DOORBELL::CMD)? {
            DOORBELL::CMD::Value::Sq => DbCmd::Sq,
            DOORBELL::CMD::Value::Cq => DbCmd::Cq,
            DOORBELL::CMD::Value::Eq => DbCmd::Eq,
            DOORBELL::CMD::Value::Aeq => DbCmd::Aeq,
        };
        Some(Doorbell {
            qn: r.read(DOORBELL::QN) as u16,
            cmd,
            index: r.read(DOORBELL::INDEX) as u16,
            priority: r.read(DOORBELL::PRIORITY) as u8,
        })
    }
}

/// A function's queue range from its SQC VFT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vft {
    /// First queue.
    pub base: u16,
    /// Number of queues (1..=1024).
    pub num: u16,
}

impl Vft {
    /// Decode a 64-bit SQC VFT value (`qm_get_vft_v2`): any value decodes.
    pub fn decode(v: u64) -> Vft {
        let r = LocalRegisterCopy::<u64, SQC_VFT::Register>::new(v);
        Vft {
            base: r.read(SQC_VFT::BASE) as u16,
            num: r.read(SQC_VFT::NUM_MINUS_1) as u16 + 1,
        }
    }

    /// Whether the valid bit is set in a raw value.
    pub fn valid(v: u64) -> bool {
        LocalRegisterCopy::<u64, SQC_VFT::Register>::new(v).is_set(SQC_VFT::VALID)
    }

    /// The 64-bit value the PF driver programs (`qm_set_vft_common`, V2): base, valid,
    /// number - 1. `num` is clamped to 1..=1024.
    pub fn encode(&self) -> u64 {
        let mut r = LocalRegisterCopy::<u64, SQC_VFT::Register>::new(0);
        r.modify(
            SQC_VFT::BASE.val(u64::from(self.base))
                + SQC_VFT::VALID::SET
                + SQC_VFT::NUM_MINUS_1.val(u64::from(self.num.clamp(1, 1024) - 1)),
        );
        r.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_matches_qm_mb_pre_init() {
        let mb = Mailbox {
            cmd: MbCmd::SqcBt,
            read: false,
            queue: 0,
            base: 0x1_2345_6000,
        };
        // w0 = cmd | busy (1 << 13); op 0.
        assert_eq!(mb.words(), [0x4 | (1 << 13), 0x2345_6000, 0x1, 0]);
        let vft = Mailbox {
            cmd: MbCmd::SqcVftV2,
            read: true,
            queue: 0,
            base: 0,
        };
        assert_eq!(vft.words()[0], 0x6 | (1 << 13) | (1 << 14));
        assert_eq!(Mailbox::decode(&mb.encode()).0, mb);
        let st = MbStatus::from_word(0x6 | (0b1010 << 9));
        assert_eq!((st.busy, st.status), (false, 0b1010));
        assert_eq!(MbCmd::from_code(0xe), MbCmd::PauseQm);
        assert_eq!(MbCmd::from_code(0x7), MbCmd::Other(7));
    }

    #[test]
    fn doorbell_matches_qm_db() {
        // qm_db(qm, qn=3, QM_DOORBELL_CMD_SQ, index=0, priority=1)
        let d = Doorbell {
            qn: 3,
            cmd: DbCmd::Sq,
            index: 0,
            priority: 1,
        };
        assert_eq!(d.encode(), 3 | (1u64 << 48));
        let e = Doorbell {
            qn: 0,
            cmd: DbCmd::Aeq,
            index: 0x1234,
            priority: 0,
        };
        assert_eq!(e.encode(), (3 << 12) | (0x1234u64 << 32));
        assert_eq!(Doorbell::decode(e.encode()), Some(e));
        assert_eq!(Doorbell::decode(7 << 12), None);
        assert!(!e.cmd.sq_cq_window() && d.cmd.sq_cq_window());
    }

    #[test]
    fn vft_matches_qm_get_vft_v2() {
        let v = Vft { base: 64, num: 32 }.encode();
        assert_eq!(v, (64u64 << 28) | (1 << 44) | (31u64 << 45));
        assert_eq!(Vft::decode(v), Vft { base: 64, num: 32 });
        assert!(Vft::valid(v));
        assert_eq!(
            Vft::decode(u64::MAX),
            Vft {
                base: 0xffff,
                num: 1024
            }
        );
    }
}
