//! A guest-side QM driver for the model: sets up queues the way the crypto drivers do (queue
//! contexts and event-queue context through the mailbox), submits jobs, reaps completions.
//! It only uses what a guest can reach: the mailbox and the doorbells (the first half of BAR2).

use std::sync::Arc;

use super::{CQE_LEN, Dma, DmaError, EQE_LEN, XQC_LEN};
use crate::access::{NoDelay, QmRegisters};
use crate::error::Error;
use crate::mailbox::{DbCmd, Doorbell, Mailbox, MbCmd};
use crate::seq::VfQm;

/// Bytes of an SQE in the model.
pub const SQE_LEN: u64 = 128;

/// A queue pair as the guest driver tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestQueue {
    /// SQ base.
    pub sq_base: u64,
    /// CQ base.
    pub cq_base: u64,
    /// Entries per queue.
    pub depth: u16,
    /// Next SQ slot to fill.
    pub sq_tail: u16,
    /// Next CQ slot to read.
    pub cq_head: u16,
    /// Phase the next valid CQE carries.
    pub cq_phase: bool,
    /// Jobs submitted and not yet completed.
    pub in_flight: u16,
}

/// One completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Queue it came from.
    pub queue: u16,
    /// The job's tag.
    pub tag: u16,
    /// SQ head after the job.
    pub sq_head: u16,
}

/// The guest driver.
pub struct GuestDriver<R> {
    qm: VfQm<R, NoDelay>,
    mem: Arc<dyn Dma>,
    queues: Vec<GuestQueue>,
    eq_base: u64,
    eq_depth: u16,
    eq_head: u16,
    eq_phase: bool,
    /// EQEs consumed (CQ numbers), in order.
    pub events: Vec<u16>,
}

impl<R> std::fmt::Debug for GuestDriver<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDriver")
            .field("queues", &self.queues)
            .field("eq_head", &self.eq_head)
            .finish()
    }
}

fn put(mem: &dyn Dma, at: u64, bytes: &[u8]) -> Result<(), Error> {
    mem.write(at, bytes).map_err(dma)
}

fn dma(e: DmaError) -> Error {
    Error::Memory {
        iova: e.iova,
        write: e.write,
    }
}

impl<R: QmRegisters> GuestDriver<R> {
    /// Lay out `qp_num` queue pairs of `depth` entries and an event queue in guest memory
    /// from `base` (needs about `qp_num * depth * 144 + 16 KiB` bytes), and program the VF:
    /// SQC_BT/CQC_BT, one SQC and CQC per queue, the EQC and AEQC.
    pub fn init(
        regs: R,
        mem: Arc<dyn Dma>,
        base: u64,
        qp_num: u16,
        depth: u16,
    ) -> Result<Self, Error> {
        let depth = depth.clamp(2, 4096);
        let mut qm = VfQm::new(regs, NoDelay);
        let sqc_bt = base;
        let cqc_bt = sqc_bt + u64::from(qp_num) * XQC_LEN;
        let staging = cqc_bt + u64::from(qp_num) * XQC_LEN;
        let eq_base = (staging + 64 + 4095) & !4095;
        let eq_depth = 1024u16;
        let aeq_base = eq_base + u64::from(eq_depth) * EQE_LEN;
        let mut next = (aeq_base + 64 * EQE_LEN + 4095) & !4095;
        qm.set_table_base(MbCmd::SqcBt, sqc_bt)?;
        qm.set_table_base(MbCmd::CqcBt, cqc_bt)?;
        let mut queues = Vec::new();
        for q in 0..qp_num {
            let sq_base = next;
            let cq_base = sq_base + u64::from(depth) * SQE_LEN;
            next = (cq_base + u64::from(depth) * CQE_LEN + 4095) & !4095;
            // struct qm_sqc: head, tail, base_l, base_h, dw3 = depth - 1 | log2(sqe) << 12.
            let mut sqc = [0u8; 32];
            sqc[4..8].copy_from_slice(&(sq_base as u32).to_le_bytes());
            sqc[8..12].copy_from_slice(&((sq_base >> 32) as u32).to_le_bytes());
            let dw3 = u32::from(depth - 1) | (SQE_LEN.trailing_zeros() << 12);
            sqc[12..16].copy_from_slice(&dw3.to_le_bytes());
            put(&*mem, staging, &sqc)?;
            qm.mailbox(Mailbox {
                cmd: MbCmd::Sqc,
                read: false,
                queue: q,
                base: staging,
            })?;
            // struct qm_cqc: head, tail, base, dw3 = depth - 1, dw6 = phase 1.
            let mut cqc = [0u8; 32];
            cqc[4..8].copy_from_slice(&(cq_base as u32).to_le_bytes());
            cqc[8..12].copy_from_slice(&((cq_base >> 32) as u32).to_le_bytes());
            cqc[12..16].copy_from_slice(&u32::from(depth - 1).to_le_bytes());
            cqc[24..28].copy_from_slice(&1u32.to_le_bytes());
            put(&*mem, staging, &cqc)?;
            qm.mailbox(Mailbox {
                cmd: MbCmd::Cqc,
                read: false,
                queue: q,
                base: staging,
            })?;
            queues.push(GuestQueue {
                sq_base,
                cq_base,
                depth,
                sq_tail: 0,
                cq_head: 0,
                cq_phase: true,
                in_flight: 0,
            });
        }
        for (cmd, qbase, qdepth) in [(MbCmd::Eqc, eq_base, eq_depth), (MbCmd::Aeqc, aeq_base, 64)] {
            // struct qm_eqc: head | tail << 16, base_l, base_h, dw3 = depth - 1, rsvd, rsvd, dw6.
            let mut eqc = [0u8; 28];
            eqc[4..8].copy_from_slice(&(qbase as u32).to_le_bytes());
            eqc[8..12].copy_from_slice(&((qbase >> 32) as u32).to_le_bytes());
            eqc[12..16].copy_from_slice(&u32::from(qdepth - 1).to_le_bytes());
            eqc[24..28].copy_from_slice(&1u32.to_le_bytes());
            put(&*mem, staging, &eqc)?;
            qm.mailbox(Mailbox {
                cmd,
                read: false,
                queue: 0,
                base: staging,
            })?;
        }
        Ok(GuestDriver {
            qm,
            mem,
            queues,
            eq_base,
            eq_depth,
            eq_head: 0,
            eq_phase: true,
            events: Vec::new(),
        })
    }

    /// The queues.
    pub fn queues(&self) -> &[GuestQueue] {
        &self.queues
    }

    /// The first guest address after the driver's structures, for job buffers.
    pub fn free_base(&self) -> u64 {
        self.queues
            .last()
            .map_or(self.eq_base, |q| q.cq_base + u64::from(q.depth) * CQE_LEN)
            .next_multiple_of(4096)
    }

    /// Submit a job on queue `q`: transform `len` bytes from `src` into `dst`. Fails with
    /// `Ok(false)` when the queue is full.
    pub fn submit(
        &mut self,
        q: u16,
        src: u64,
        dst: u64,
        len: u32,
        tag: u16,
    ) -> Result<bool, Error> {
        let Some(gq) = self.queues.get_mut(usize::from(q)) else {
            return Ok(false);
        };
        if gq.in_flight + 1 >= gq.depth {
            return Ok(false);
        }
        let mut sqe = [0u8; 24];
        sqe[0..8].copy_from_slice(&src.to_le_bytes());
        sqe[8..16].copy_from_slice(&dst.to_le_bytes());
        sqe[16..20].copy_from_slice(&len.to_le_bytes());
        sqe[20..22].copy_from_slice(&tag.to_le_bytes());
        put(
            &*self.mem,
            gq.sq_base + u64::from(gq.sq_tail) * SQE_LEN,
            &sqe,
        )?;
        gq.sq_tail = (gq.sq_tail + 1) % gq.depth;
        gq.in_flight += 1;
        let db = Doorbell {
            qn: q,
            cmd: DbCmd::Sq,
            index: gq.sq_tail,
            priority: 0,
        };
        self.qm.ring(db);
        Ok(true)
    }

    /// Reap the completions of queue `q` (CQEs whose phase matches), acknowledge them with a CQ
    /// doorbell, and consume the event queue.
    pub fn poll(&mut self, q: u16) -> Result<Vec<Completion>, Error> {
        let mut out = Vec::new();
        let Some(gq) = self.queues.get_mut(usize::from(q)) else {
            return Ok(out);
        };
        loop {
            let mut cqe = [0u8; 16];
            self.mem
                .read(gq.cq_base + u64::from(gq.cq_head) * CQE_LEN, &mut cqe)
                .map_err(dma)?;
            let w7 = u16::from_le_bytes([cqe[14], cqe[15]]);
            if (w7 & 1 != 0) != gq.cq_phase {
                break;
            }
            out.push(Completion {
                queue: u16::from_le_bytes([cqe[10], cqe[11]]),
                tag: u16::from_le_bytes([cqe[4], cqe[5]]),
                sq_head: u16::from_le_bytes([cqe[8], cqe[9]]),
            });
            gq.cq_head = (gq.cq_head + 1) % gq.depth;
            if gq.cq_head == 0 {
                gq.cq_phase = !gq.cq_phase;
            }
            gq.in_flight = gq.in_flight.saturating_sub(1);
        }
        if !out.is_empty() {
            let db = Doorbell {
                qn: q,
                cmd: DbCmd::Cq,
                index: gq.cq_head,
                priority: 0,
            };
            self.qm.ring(db);
        }
        loop {
            let mut eqe = [0u8; 4];
            self.mem
                .read(self.eq_base + u64::from(self.eq_head) * EQE_LEN, &mut eqe)
                .map_err(dma)?;
            let dw0 = u32::from_le_bytes(eqe);
            if ((dw0 >> 16) & 1 != 0) != self.eq_phase {
                break;
            }
            self.events.push(dw0 as u16);
            self.eq_head = (self.eq_head + 1) % self.eq_depth;
            if self.eq_head == 0 {
                self.eq_phase = !self.eq_phase;
            }
        }
        Ok(out)
    }

    /// The VM moved: keep the driver's state (it lives in guest memory) and talk to the new
    /// VF and the new copy of guest memory.
    pub fn migrate_to<S: QmRegisters>(self, regs: S, mem: Arc<dyn Dma>) -> GuestDriver<S> {
        GuestDriver {
            qm: VfQm::new(regs, NoDelay),
            mem,
            queues: self.queues,
            eq_base: self.eq_base,
            eq_depth: self.eq_depth,
            eq_head: self.eq_head,
            eq_phase: self.eq_phase,
            events: self.events,
        }
    }
}
