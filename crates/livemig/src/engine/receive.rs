//! The destination's receive path for pages: a page channel checked against the main one
//! (token, count, an index not yet claimed), pages written into guest RAM only where RAM is,
//! and the round barrier ([`Gate`]) that holds every channel at a round's end until all have
//! reached it, so an older copy of a page never overwrites a newer one.
//!
//! ```text
//!   channel i: Channel{i, N, token} (Pages | ZeroPages)* Sync(1) ─┐
//!                                                                 ├─ Gate: all N at round 1's end
//!   channel j: Channel{j, N, token} (Pages | ZeroPages)* Sync(1) ─┘   before any applies round 2
//!   ... End (then nothing) on every channel; the devices run only after all of them
//! ```

use std::io::{self, Read};
use std::sync::{Condvar, Mutex};

use livemig_stream::{Channel as StreamChannel, Limits, Reader, Record};

use crate::error::{Error, Phase, Result};
use crate::memory::{GuestMemory, MemoryError};

/// Where a record starts in its stream, for the engine's errors about it (as the stream
/// reader reports its own: "at byte N (record I)").
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordAt {
    offset: u64,
    index: u64,
}

impl RecordAt {
    /// The record `rd` reads next.
    pub(crate) fn next<R: Read>(rd: &Reader<R>) -> RecordAt {
        RecordAt {
            offset: rd.offset(),
            index: rd.totals().records,
        }
    }
}

impl std::fmt::Display for RecordAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at byte {} (record {})", self.offset, self.index)
    }
}

/// Writes a Pages or ZeroPages record (the one `at`) into guest RAM, refusing anything
/// outside RAM, and counts it in `t` (any other record is left alone).
pub(crate) fn apply_pages(
    rec: &Record<'_>,
    at: RecordAt,
    mem: &dyn GuestMemory,
    ranges: &[(u64, u64)],
    t: &mut PageTotals,
) -> Result<()> {
    let phase = Phase::Receive;
    let memerr = |gpa: u64| {
        move |e: MemoryError| Error::Memory {
            phase,
            gpa,
            reason: e.to_string(),
        }
    };
    match rec {
        Record::Pages(p) => {
            let len = u64::from(p.count) * u64::from(p.page_size);
            check_in_ram(ranges, at, "Pages", p.gpa, len, phase)?;
            mem.write(p.gpa, p.payload).map_err(memerr(p.gpa))?;
            t.pages += u64::from(p.count);
        }
        Record::ZeroPages(z) => {
            let len = u64::from(z.count) * u64::from(z.page_size);
            check_in_ram(ranges, at, "ZeroPages", z.gpa, len, phase)?;
            mem.zero(z.gpa, len).map_err(memerr(z.gpa))?;
            t.zero_pages += u64::from(z.count);
        }
        _ => {}
    }
    Ok(())
}

/// What one page channel delivered.
#[derive(Debug, Default)]
pub(crate) struct PageTotals {
    pub(crate) pages: u64,
    pub(crate) zero_pages: u64,
    pub(crate) bytes: u64,
    /// The channel's largest record buffer.
    pub(crate) buffer: u64,
}

/// The page channels' round barrier: a channel that has read round r's Sync applies nothing
/// more until every channel has. It can be failed (every waiter returns at once), and a
/// channel that ends while another waits fails the wait (their rounds disagree).
#[derive(Debug)]
pub(crate) struct Gate {
    channels: u32,
    skip: bool,
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    arrived: u32,
    generation: u64,
    ended: u32,
    /// The first to fail: 0 the main channel, i page channel i.
    failed: Option<u32>,
}

impl Gate {
    pub(crate) fn new(channels: u32, skip: bool) -> Gate {
        Gate {
            channels,
            skip,
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopped(st: &GateState, index: u32, round: u32) -> Option<Error> {
        let phase = Phase::Receive;
        if let Some(f) = st.failed {
            let who = if f == 0 {
                "the main channel".to_string()
            } else {
                format!("page channel {f}")
            };
            return Some(Error::Cancelled {
                phase,
                reason: format!("stopped at round {round}'s end: {who} failed"),
            });
        }
        if st.ended > 0 {
            return Some(Error::Protocol {
                phase,
                reason: format!(
                    "page channel {index} ended round {round} while another page channel had \
                     already sent End (the channels disagree on the rounds)"
                ),
            });
        }
        None
    }

    /// Page channel `index` read round `round`'s Sync.
    fn wait(&self, index: u32, round: u32) -> Result<()> {
        let mut st = self.lock();
        if self.skip {
            // Negative control: only a failure stops it.
            return match st.failed {
                Some(_) => Gate::stopped(&st, index, round).map_or(Ok(()), Err),
                None => Ok(()),
            };
        }
        if let Some(e) = Gate::stopped(&st, index, round) {
            return Err(e);
        }
        st.arrived += 1;
        if st.arrived == self.channels {
            st.arrived = 0;
            st.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = st.generation;
        while st.generation == generation {
            if let Some(e) = Gate::stopped(&st, index, round) {
                return Err(e);
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Waits until every page channel has passed round `round`'s Sync (at once with the
    /// barrier off: nothing to wait for).
    pub(crate) fn reached(&self, round: u32) -> Result<()> {
        let mut st = self.lock();
        while !self.skip && st.generation < u64::from(round) {
            if let Some(f) = st.failed {
                return Err(Error::Cancelled {
                    phase: Phase::Receive,
                    reason: format!("stopped waiting for round {round}: channel {f} failed"),
                });
            }
            if st.ended == self.channels {
                return Err(Error::Protocol {
                    phase: Phase::Receive,
                    reason: format!(
                        "the page channels ended before round {round} (the main channel's \
                         rounds and theirs disagree)"
                    ),
                });
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// A page channel read its End.
    fn end(&self) {
        self.lock().ended += 1;
        self.cv.notify_all();
    }

    /// `who` failed; `true` if it was the first.
    pub(crate) fn fail(&self, who: u32) -> bool {
        let mut st = self.lock();
        let first = st.failed.is_none();
        if first {
            st.failed = Some(who);
        }
        self.cv.notify_all();
        first
    }

    pub(crate) fn first_failure(&self) -> Option<u32> {
        self.lock().failed
    }
}

/// The destination's page-channel reader on `bytes`, as the one page channel of a migration
/// whose main channel carried `token`, loading into `mem`: the entry point of the
/// `page_channel` fuzz target (`fuzz/`), so the fuzzer drives exactly the code a connection
/// does. Not part of the API.
#[doc(hidden)]
pub fn x_receive_page_channel(
    bytes: Vec<u8>,
    token: [u8; 16],
    mem: &dyn GuestMemory,
) -> Result<()> {
    let main = StreamChannel {
        index: 0,
        count: 1,
        token,
    };
    let claimed = Mutex::new(vec![false]);
    let gate = Gate::new(1, false);
    let ranges = mem.ranges();
    receive_pages(
        Box::new(io::Cursor::new(bytes)),
        main,
        &claimed,
        Limits::default(),
        mem,
        &ranges,
        &gate,
    )
    .map(drop)
}

/// One page channel on the destination: its Channel record checked against the main one
/// (token, count, an index no other connection claimed), then pages into guest RAM (inside RAM
/// only), a Sync at each round's end (consecutive rounds from 1) through the gate, End, then
/// nothing. Errors after the check name the channel.
pub(crate) fn receive_pages(
    conn: Box<dyn Read + Send>,
    main: StreamChannel,
    claimed: &Mutex<Vec<bool>>,
    limits: Limits,
    mem: &dyn GuestMemory,
    ranges: &[(u64, u64)],
    gate: &Gate,
) -> Result<PageTotals> {
    let phase = Phase::Receive;
    let serr = |source| Error::Stream { phase, source };
    let mut rd = Reader::new(conn, limits).map_err(serr)?;
    let first = match rd.next().map_err(serr)? {
        Some(Record::Channel(c)) => Ok(c),
        Some(other) => Err(other.name()),
        None => Err("nothing"),
    };
    let c = first.map_err(|got| Error::Protocol {
        phase,
        reason: format!("a page channel began with {got}, not a Channel record"),
    })?;
    if c.token != main.token || c.count != main.count || c.index == 0 {
        return Err(Error::Protocol {
            phase,
            reason: format!(
                "a connection claiming page channel {} of {} does not belong to this migration \
                 (expected an index 1..={} and the main channel's token)",
                c.index, c.count, main.count
            ),
        });
    }
    {
        let mut claimed = claimed.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut claimed[(c.index - 1) as usize];
        if *slot {
            return Err(Error::Protocol {
                phase,
                reason: format!("page channel {} connected twice", c.index),
            });
        }
        *slot = true;
    }
    receive_checked_pages(rd, mem, ranges, gate, c.index).map_err(|e| Error::PageChannel {
        index: c.index,
        source: Box::new(e),
    })
}

fn receive_checked_pages(
    mut rd: Reader<Box<dyn Read + Send>>,
    mem: &dyn GuestMemory,
    ranges: &[(u64, u64)],
    gate: &Gate,
    index: u32,
) -> Result<PageTotals> {
    let phase = Phase::Receive;
    let serr = |source| Error::Stream { phase, source };
    let mut t = PageTotals::default();
    let mut round = 1u32;
    loop {
        let at = RecordAt::next(&rd);
        match rd.next().map_err(serr)? {
            Some(rec @ (Record::Pages(_) | Record::ZeroPages(_))) => {
                apply_pages(&rec, at, mem, ranges, &mut t)?;
            }
            Some(Record::Sync(y)) => {
                if y.round != round {
                    return Err(Error::Protocol {
                        phase,
                        reason: format!(
                            "{at}: Sync for round {} where round {round} ends",
                            y.round
                        ),
                    });
                }
                gate.wait(index, round)?;
                round = round.checked_add(1).ok_or_else(|| Error::Protocol {
                    phase,
                    reason: "more than 2^32 rounds".into(),
                })?;
            }
            Some(Record::End(_)) => break,
            // An optional record of a type this version does not know (the format's rule).
            Some(Record::Skipped { .. }) => {}
            Some(other) => {
                return Err(Error::Protocol {
                    phase,
                    reason: format!("{at}: unexpected {} record on a page channel", other.name()),
                });
            }
            None => {
                return Err(Error::Protocol {
                    phase,
                    reason: "the page channel ended without End".into(),
                });
            }
        }
    }
    gate.end();
    if rd.next().map_err(serr)?.is_some() {
        return Err(Error::Protocol {
            phase,
            reason: "records after End".into(),
        });
    }
    t.bytes = rd.offset();
    t.buffer = rd.buffer_capacity() as u64;
    Ok(t)
}

/// The most the compat descriptors of `devices` destination devices can hold: each one's text
/// is a Compat record's body, at most `max_record` bytes.
pub(crate) fn compat_bound(devices: usize, max_record: u64) -> u64 {
    (devices as u64).saturating_mul(max_record)
}

/// Refuses `[gpa, gpa + len)` unless one RAM range holds all of it (nothing is written
/// outside guest RAM, holes included).
pub(crate) fn check_in_ram(
    ranges: &[(u64, u64)],
    at: RecordAt,
    what: &str,
    gpa: u64,
    len: u64,
    phase: Phase,
) -> Result<()> {
    let inside = gpa.checked_add(len).is_some_and(|end| {
        ranges
            .iter()
            .any(|&(start, rlen)| gpa >= start && end <= start.saturating_add(rlen))
    });
    if inside {
        return Ok(());
    }
    let map: Vec<String> = ranges
        .iter()
        .map(|&(s, l)| format!("{s:#x}..{:#x}", s.saturating_add(l)))
        .collect();
    Err(Error::Protocol {
        phase,
        reason: format!(
            "{at}: {what} at {gpa:#x} (+{len:#x} bytes) outside guest RAM ({})",
            map.join(", ")
        ),
    })
}
