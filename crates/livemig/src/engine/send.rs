//! The source's send path: a round's dirty pages onto the main stream, or split evenly over
//! the page channels (one thread each), every page channel closing the round with a Sync.
//!
//! ```text
//!   dirty bitmap ── split(N) ──> part 1 ── thread ── Pages/ZeroPages ... Sync(r) ──> channel 1
//!                              ├ part 2 ── thread ── Pages/ZeroPages ... Sync(r) ──> channel 2
//!                              └ ...     (a round of at most INLINE_ROUND_PAGES: one thread)
//! ```

use std::io::Write;

use livemig_stream::Writer;

use crate::bitmap::PageBitmap;
use crate::cancel::CancelHandle;
use crate::error::{Error, Phase, Result};
use crate::memory::{GuestMemory, PAGE_SIZE};

use super::attempt::{Attempt, serr};
use super::progress::Progress;
use super::report::RoundReport;

/// Pages per Pages record batch.
const BATCH: u64 = 256;

/// A token pairing the connections of one migration: unpredictable enough that two
/// migrations to one destination never share it (it authenticates nothing; see the TLS
/// channel for that).
pub(crate) fn channel_token() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut t = [0u8; 16];
    for (i, half) in t.chunks_mut(8).enumerate() {
        // RandomState is seeded from the OS's randomness once per process and per-instance
        // keys after that.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    t
}

/// Rounds with at most this many dirty pages (2 MiB) are written to the page channels by the
/// engine's own thread instead of one thread per channel.
const INLINE_ROUND_PAGES: u64 = 512;

/// Sends the round's dirty pages: on the main stream, or split evenly over the page channels
/// (one thread each, or the calling thread for a small round), every page channel closing the
/// round with a Sync.
pub(crate) fn send_round<W: Write>(
    a: &mut Attempt<W>,
    mem: &dyn GuestMemory,
    r: &mut RoundReport,
    phase: Phase,
    cancel: &CancelHandle,
    round: u32,
) -> Result<()> {
    if a.pages.is_empty() {
        return send_pages(
            &mut a.w,
            mem,
            &a.dirty,
            (0, a.dirty.pages()),
            r,
            phase,
            cancel,
            &a.progress,
        );
    }
    let parts = a.dirty.split(a.pages.len() as u64);
    let (dirty, progress) = (&a.dirty, &a.progress);
    if dirty.count() <= INLINE_ROUND_PAGES {
        // A few pages (typically the stop-and-copy round of a converged migration): starting
        // a thread per channel would cost more downtime than the writes; one thread writes
        // every channel's share and Sync in turn.
        for (w, part) in a.pages.iter_mut().zip(parts) {
            send_pages(w, mem, dirty, part, r, phase, cancel, progress)?;
            w.sync(round).map_err(serr(phase))?;
            w.flush().map_err(serr(phase))?;
        }
        return Ok(());
    }
    let results: Vec<Result<RoundReport>> = std::thread::scope(|scope| {
        let threads: Vec<_> = a
            .pages
            .iter_mut()
            .zip(parts)
            .map(|(w, part)| {
                scope.spawn(move || {
                    let mut mine = RoundReport::default();
                    send_pages(w, mem, dirty, part, &mut mine, phase, cancel, progress)?;
                    w.sync(round).map_err(serr(phase))?;
                    w.flush().map_err(serr(phase))?;
                    Ok(mine)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(Error::Protocol {
                        phase,
                        reason: "a page channel's sender thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    // A cancel explains every other channel's failure.
    let mut first_err = None;
    for res in results {
        match res {
            Ok(mine) => {
                r.pages += mine.pages;
                r.zero_pages += mine.zero_pages;
            }
            Err(e) if matches!(e, Error::Cancelled { .. }) => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Sends the marked pages of `dirty` in pages `[range.0, range.1)` on `w`.
#[allow(clippy::too_many_arguments)]
fn send_pages<W: Write>(
    w: &mut Writer<W>,
    mem: &dyn GuestMemory,
    dirty: &PageBitmap,
    range: (u64, u64),
    r: &mut RoundReport,
    phase: Phase,
    cancel: &CancelHandle,
    progress: &Progress,
) -> Result<()> {
    // Allocated on the first page with data: an empty or all-zero share (the typical
    // stop-and-copy round) costs no 1 MiB allocation inside the downtime.
    let mut buf = Vec::new();
    let mut last = w.bytes_written();
    for (first, count) in dirty.runs_between(range.0, range.1) {
        let mut p = first;
        while p < first + count {
            if let Some(reason) = cancel.reason() {
                return Err(Error::Cancelled {
                    phase,
                    reason: format!("operator cancel: {reason}"),
                });
            }
            let now = w.bytes_written();
            progress.add(now - last);
            last = now;
            let n = (first + count - p).min(BATCH);
            let gpa = p * PAGE_SIZE;
            let len = n * PAGE_SIZE;
            if mem.known_zero(gpa, len) {
                w.zero_pages(gpa, PAGE_SIZE as u32, n)
                    .map_err(|source| Error::Stream { phase, source })?;
                r.zero_pages += n;
            } else {
                if buf.is_empty() {
                    buf = vec![0u8; (BATCH * PAGE_SIZE) as usize];
                }
                let b = &mut buf[..len as usize];
                mem.read(gpa, b).map_err(|e| Error::Memory {
                    phase,
                    gpa,
                    reason: e.to_string(),
                })?;
                let wr = w
                    .pages(gpa, PAGE_SIZE as u32, b)
                    .map_err(|source| Error::Stream { phase, source })?;
                r.pages += wr.pages;
                r.zero_pages += wr.zero_pages;
            }
            progress.pages(n);
            p += n;
        }
    }
    progress.add(w.bytes_written() - last);
    Ok(())
}
