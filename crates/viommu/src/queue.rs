//! The device's two virtqueues over rust-vmm's `virtio-queue` (feature `virtio-queue`): the
//! request queue (virtqueue 0) served by [`process_requests`], and the event queue
//! (virtqueue 1) that [`EventQueue`] fills with fault events.
//!
//! ```text
//!  requestq: avail ─> chain ─> shape check ─> Reader (readable part) ─> VirtioIommu::handle
//!                                           └> Writer (writable part) <─ status / properties
//!            used  <─ (head, bytes written; 0 for a chain the device could not use)
//!  eventq:   the driver posts write-only buffers; a fault takes the next one (24 bytes);
//!            faults wait in a bounded backlog while the driver has posted none
//! ```
//!
//! A chain may be split anywhere, across direct or indirect descriptors (`virtio-queue`'s
//! `Reader`/`Writer` gather it). What the device refuses, with used length 0 and a
//! [`ChainError`] in the returned report, never a panic (virtio 1.3 §2.7.4.2 and §2.7.5.3 are
//! the driver rules it checks):
//! * a chain that loops or is longer than the queue (the walk ends on a descriptor that still
//!   has `NEXT` set), or whose `next` index is outside the table;
//! * a device-readable descriptor after a device-writable one;
//! * a buffer outside guest memory;
//! * a readable part over [`MAX_READABLE`] or a writable part over [`MAX_WRITABLE`] bytes (no
//!   request is anywhere near; the caps keep a hostile driver from making the device allocate).
//!
//! A request that is too short, or of an unknown type, gets used length 0 as
//! [`VirtioIommu::handle`] decides (its docs compare QEMU's choices).
//!
//! Notification suppression: [`process_requests`] runs the usual loop (disable notifications,
//! drain, re-enable, drain again if the driver raced) and reports whether the driver must be
//! interrupted ([`Queue::needs_notification`], which honours `VIRTIO_F_EVENT_IDX` and
//! `VRING_AVAIL_F_NO_INTERRUPT`).

use std::collections::VecDeque;
use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemory;

use crate::device::{Completion, VirtioIommu};
use crate::proto::{FaultEvent, TAIL_LEN};

/// Largest device-readable part accepted (the largest request, PROBE, is 72 bytes).
pub const MAX_READABLE: usize = 4096;
/// Largest device-writable part accepted: 64 KiB of PROBE properties and the tail.
pub const MAX_WRITABLE: usize = 64 * 1024 + TAIL_LEN;
/// Fault events kept while the driver has posted no event buffer; older ones are dropped (and
/// counted) beyond this.
pub const EVENT_BACKLOG: usize = 256;

/// Why the device could not use a descriptor chain; it is returned with used length 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The walk ended on a descriptor that still chains on: a loop, a chain longer than the
    /// queue, a `next` outside the table, or an unreadable descriptor.
    #[error("descriptor chain at head {head} loops, is longer than the queue, or is cut short")]
    Broken {
        /// The chain's head index.
        head: u16,
    },
    /// No descriptor could be read at all (e.g. an invalid indirect table).
    #[error("descriptor chain at head {head} has no usable descriptor")]
    Empty {
        /// The chain's head index.
        head: u16,
    },
    /// A device-readable descriptor follows a device-writable one (§2.7.4.2).
    #[error(
        "descriptor chain at head {head}: a device-readable descriptor follows a device-writable one"
    )]
    ReadableAfterWritable {
        /// The chain's head index.
        head: u16,
    },
    /// A buffer is not in guest memory.
    #[error("descriptor chain at head {head}: {what}")]
    Memory {
        /// The chain's head index.
        head: u16,
        /// What `virtio-queue` reported.
        what: String,
    },
    /// A part is larger than the device accepts.
    #[error(
        "descriptor chain at head {head}: {part} part of {len} bytes is over the {max}-byte limit"
    )]
    TooLarge {
        /// The chain's head index.
        head: u16,
        /// "readable" or "writable".
        part: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An event buffer cannot hold a fault event.
    #[error("descriptor chain at head {head}: event buffer of {len} bytes, an event needs {need}")]
    TooSmall {
        /// The chain's head index.
        head: u16,
        /// Its writable length.
        len: usize,
        /// Bytes of an event.
        need: usize,
    },
}

impl ChainError {
    /// The head index of the chain refused.
    pub fn head(&self) -> u16 {
        match *self {
            ChainError::Broken { head }
            | ChainError::Empty { head }
            | ChainError::ReadableAfterWritable { head }
            | ChainError::Memory { head, .. }
            | ChainError::TooLarge { head, .. }
            | ChainError::TooSmall { head, .. } => head,
        }
    }
}

/// A queue the device cannot serve at all; the VMM should set `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue is not ready, or its rings are not in guest memory.
    #[error("virtqueue {0} is not ready or its rings are not in guest memory")]
    NotReady(&'static str),
    /// `virtio-queue` could not read or write a ring (e.g. the driver advanced the available
    /// index by more than the queue size).
    #[error("virtqueue {queue}: {source}")]
    Ring {
        /// "request" or "event".
        queue: &'static str,
        /// The error.
        #[source]
        source: virtio_queue::Error,
    },
}

/// What one [`process_requests`] call did.
#[derive(Debug, Default)]
pub struct RequestReport {
    /// Chains returned to the driver (served or refused).
    pub completed: u32,
    /// The chains refused, with the reason.
    pub refused: Vec<ChainError>,
    /// Whether the driver must be notified (interrupt / irqfd).
    pub notify: bool,
}

fn ring(queue: &'static str) -> impl Fn(virtio_queue::Error) -> QueueError {
    move |source| QueueError::Ring { queue, source }
}

/// The next chain the driver made available, if any.
fn next_chain<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
    name: &'static str,
) -> Result<Option<DescriptorChain<&'m M>>, QueueError> {
    Ok(queue.iter(mem).map_err(ring(name))?.next())
}

/// Serves every request the driver made available on the request queue `queue` with `dev`,
/// and puts each chain on the used ring.
pub fn process_requests<M: GuestMemory>(
    dev: &mut VirtioIommu,
    queue: &mut Queue,
    mem: &M,
) -> Result<RequestReport, QueueError> {
    if !queue.is_valid(mem) {
        return Err(QueueError::NotReady("request"));
    }
    let mut report = RequestReport::default();
    loop {
        queue.disable_notification(mem).map_err(ring("request"))?;
        while let Some(chain) = next_chain(queue, mem, "request")? {
            let head = chain.head_index();
            let used = match serve(dev, chain, mem) {
                Ok(n) => n,
                Err(e) => {
                    report.refused.push(e);
                    0
                }
            };
            queue.add_used(mem, head, used).map_err(ring("request"))?;
            report.completed += 1;
        }
        if !queue.enable_notification(mem).map_err(ring("request"))? {
            break;
        }
    }
    report.notify =
        report.completed > 0 && queue.needs_notification(mem).map_err(ring("request"))?;
    Ok(report)
}

/// Checks the shape §2.7.4.2 asks of a driver: it ends (no loop, not cut short) and its
/// device-readable descriptors come first.
fn check_shape<M>(chain: &DescriptorChain<M>) -> Result<(), ChainError>
where
    M: Clone + std::ops::Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut last = None;
    let mut seen_writable = false;
    for d in chain.clone() {
        if d.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err(ChainError::ReadableAfterWritable { head });
        }
        last = Some(d);
    }
    match last {
        None => Err(ChainError::Empty { head }),
        Some(d) if d.has_next() => Err(ChainError::Broken { head }),
        Some(_) => Ok(()),
    }
}

/// Serves one request chain; returns the used length.
fn serve<M>(dev: &mut VirtioIommu, chain: DescriptorChain<&M>, mem: &M) -> Result<u32, ChainError>
where
    M: GuestMemory,
{
    let head = chain.head_index();
    check_shape(&chain)?;
    let memerr = |e: virtio_queue::Error| ChainError::Memory {
        head,
        what: e.to_string(),
    };
    let mut reader = Reader::new(mem, chain.clone()).map_err(memerr)?;
    let mut writer = Writer::new(mem, chain).map_err(memerr)?;
    let rlen = reader.available_bytes();
    if rlen > MAX_READABLE {
        return Err(ChainError::TooLarge {
            head,
            part: "readable",
            len: rlen,
            max: MAX_READABLE,
        });
    }
    let wlen = writer.available_bytes();
    if wlen > MAX_WRITABLE {
        return Err(ChainError::TooLarge {
            head,
            part: "writable",
            len: wlen,
            max: MAX_WRITABLE,
        });
    }
    let mut req = vec![0u8; rlen];
    reader
        .read_exact(&mut req)
        .map_err(|e| ChainError::Memory {
            head,
            what: format!("reading the request: {e}"),
        })?;
    let mut out = vec![0u8; wlen];
    match dev.handle(&req, &mut out) {
        Completion::NotWritten => Ok(0),
        Completion::Status { used, .. } => {
            writer
                .write_all(&out[..used])
                .map_err(|e| ChainError::Memory {
                    head,
                    what: format!("writing the reply: {e}"),
                })?;
            // `used <= wlen <= MAX_WRITABLE`, far below u32::MAX.
            Ok(used as u32)
        }
    }
}

/// What one [`EventQueue::deliver`] call did.
#[derive(Debug, Default)]
pub struct EventReport {
    /// Fault events written to driver buffers.
    pub delivered: u32,
    /// Event buffers returned unused (with the reason): too short for an event, or broken.
    pub refused: Vec<ChainError>,
    /// Whether the driver must be notified.
    pub notify: bool,
}

/// The event queue's device side: faults to report, a bounded backlog for when the driver has
/// posted no buffer, and delivery into posted buffers.
#[derive(Debug, Default)]
pub struct EventQueue {
    backlog: VecDeque<FaultEvent>,
    dropped: u64,
}

impl EventQueue {
    /// An empty event queue state.
    pub fn new() -> EventQueue {
        EventQueue::default()
    }

    /// Queues a fault for the guest. Beyond [`EVENT_BACKLOG`] waiting faults the oldest is
    /// dropped and counted ([`dropped`](Self::dropped)): a guest that posts no event buffers
    /// cannot make the VMM hold memory without bound.
    pub fn push(&mut self, fault: FaultEvent) {
        if self.backlog.len() == EVENT_BACKLOG {
            self.backlog.pop_front();
            self.dropped += 1;
        }
        self.backlog.push_back(fault);
    }

    /// Faults waiting for a buffer.
    pub fn pending(&self) -> usize {
        self.backlog.len()
    }

    /// Faults dropped because the backlog was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes waiting faults into the buffers the driver posted on `queue`, oldest first. Call
    /// it after [`push`](Self::push) and whenever the driver notifies the event queue. A buffer
    /// too small for an event, or not usable, is returned with used length 0 and the fault
    /// stays queued for the next one.
    pub fn deliver<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<EventReport, QueueError> {
        if !queue.is_valid(mem) {
            return Err(QueueError::NotReady("event"));
        }
        let mut report = EventReport::default();
        while let Some(fault) = self.backlog.front().copied() {
            let Some(chain) = next_chain(queue, mem, "event")? else {
                break;
            };
            let head = chain.head_index();
            match write_event(&fault, chain, mem) {
                Ok(()) => {
                    queue
                        .add_used(mem, head, FaultEvent::LEN as u32)
                        .map_err(ring("event"))?;
                    self.backlog.pop_front();
                    report.delivered += 1;
                }
                Err(e) => {
                    queue.add_used(mem, head, 0).map_err(ring("event"))?;
                    report.refused.push(e);
                }
            }
        }
        let returned = report.delivered as usize + report.refused.len();
        report.notify = returned > 0 && queue.needs_notification(mem).map_err(ring("event"))?;
        Ok(report)
    }
}

fn write_event<M: GuestMemory>(
    fault: &FaultEvent,
    chain: DescriptorChain<&M>,
    mem: &M,
) -> Result<(), ChainError> {
    let head = chain.head_index();
    check_shape(&chain)?;
    let mut writer = Writer::new(mem, chain).map_err(|e| ChainError::Memory {
        head,
        what: e.to_string(),
    })?;
    if writer.available_bytes() < FaultEvent::LEN {
        return Err(ChainError::TooSmall {
            head,
            len: writer.available_bytes(),
            need: FaultEvent::LEN,
        });
    }
    writer
        .write_all(&fault.encode())
        .map_err(|e| ChainError::Memory {
            head,
            what: format!("writing the event: {e}"),
        })
}

#[cfg(test)]
mod tests;
