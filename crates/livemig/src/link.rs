//! The simulated link: an in-process pipe with bandwidth and latency ([`pipe`]), pacing for a
//! real connection that should behave like a slower network ([`Paced`]), a cut switch for
//! failure injection ([`Cut`]), and the [`LinkChannel`] that puts a pair of pipes behind the
//! engine's [`Channel`]. Whole in-process migrations over it are in [`crate::local`].
//!
//! ```text
//!   LinkWriter ──(frames, paced to `bandwidth`, delivered after `latency`)──> LinkReader
//!        └──────────── Cut::cut(): both ends fail (BrokenPipe / ConnectionReset)
//! ```

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use crate::transport::{Abort, Channel};

/// Bandwidth and latency of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Bytes per second; 0 = unlimited.
    pub bandwidth: u64,
    /// One-way latency.
    pub latency: Duration,
}

/// A switch that cuts links when thrown (failure injection). Clones share the switch.
#[derive(Debug, Clone, Default)]
pub struct Cut(Arc<AtomicBool>);

impl Cut {
    /// A switch not thrown.
    pub fn new() -> Cut {
        Cut::default()
    }
    /// Cuts every link using this switch.
    pub fn cut(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether it was thrown.
    pub fn is_cut(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A switch that lifts the pacing of [`Paced`] links when thrown; clones share it.
///
/// A bandwidth cap set as policy (QEMU's `max-bandwidth`) protects the network while the VM
/// runs; once the VM is stopped for the switchover, the downtime is the only cost, and QEMU
/// sends the rest unlimited (`migration_completion_precopy` sets `RATE_LIMIT_DISABLED` after
/// stopping the VM, QEMU 10.0 `migration/migration.c`). A VMM throws this when the source's
/// engine enters [`Phase::StopCopy`](crate::Phase::StopCopy). A link paced to emulate a slower
/// network keeps an unthrown one.
#[derive(Debug, Clone, Default)]
pub struct Unpace(Arc<AtomicBool>);

impl Unpace {
    /// A switch not thrown.
    pub fn new() -> Unpace {
        Unpace::default()
    }
    /// Lifts the pacing of every link using this switch.
    pub fn lift(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether it was thrown.
    pub fn is_lifted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn dropped() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "link dropped")
}

/// Serialisation pacing: when a burst of `len` bytes may be considered sent.
#[derive(Debug)]
struct Pacer {
    bandwidth: u64,
    free_at: Instant,
}

impl Pacer {
    fn new(bandwidth: u64) -> Pacer {
        Pacer {
            bandwidth,
            free_at: Instant::now(),
        }
    }

    /// Sleeps until `len` more bytes have left at the configured rate; returns when they have.
    ///
    /// A link that fell behind its schedule by up to [`PACE_CREDIT`] (a sleep that overslept,
    /// a writer that paused) catches up before the schedule restarts from now, and the writer
    /// sleeps only once it is [`PACE_SLACK`] ahead: sleeping for every 64 KiB burst (52 µs at
    /// 10 Gbit/s) would lose the scheduler's oversleep each time and hold a 10 Gbit/s link to
    /// a fraction of its rate.
    fn pace(&mut self, len: usize) -> Instant {
        let now = Instant::now();
        if self.bandwidth == 0 {
            return now;
        }
        let start = if self.free_at + PACE_CREDIT < now {
            now
        } else {
            self.free_at
        };
        let nanos =
            (len as u128 * 1_000_000_000 / u128::from(self.bandwidth)).min(u128::from(u64::MAX));
        self.free_at = start + Duration::from_nanos(nanos as u64);
        let now = Instant::now();
        if self.free_at > now + PACE_SLACK {
            std::thread::sleep(self.free_at - now);
        }
        self.free_at
    }
}

/// How far behind its schedule a paced link may catch up.
const PACE_CREDIT: Duration = Duration::from_millis(5);
/// How far ahead of its schedule a paced writer runs before it sleeps.
const PACE_SLACK: Duration = Duration::from_millis(1);

enum Frame {
    Data(Instant, Vec<u8>),
    Close,
}

const BURST: usize = 64 << 10;

/// The writing end of an in-process link.
pub struct LinkWriter {
    tx: Option<SyncSender<Frame>>,
    buf: Vec<u8>,
    pacer: Pacer,
    latency: Duration,
    cut: Cut,
}

impl std::fmt::Debug for LinkWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWriter")
            .field("buffered", &self.buf.len())
            .field("bandwidth", &self.pacer.bandwidth)
            .field("latency", &self.latency)
            .finish()
    }
}

/// The reading end of an in-process link.
pub struct LinkReader {
    rx: Receiver<Frame>,
    cur: Vec<u8>,
    pos: usize,
    closed: bool,
    cut: Cut,
}

impl std::fmt::Debug for LinkReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkReader")
            .field("closed", &self.closed)
            .finish()
    }
}

/// An in-process one-way link: bytes written to the writer arrive at the reader no earlier
/// than `latency` after they were sent, and leave no faster than `bandwidth`. Writes block when
/// about 4 MiB are in flight. Throwing `cut` drops the link: the writer gets `BrokenPipe`, the
/// reader `ConnectionReset`.
pub fn pipe(cfg: LinkConfig, cut: Cut) -> (LinkWriter, LinkReader) {
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    (
        LinkWriter {
            tx: Some(tx),
            buf: Vec::with_capacity(BURST),
            pacer: Pacer::new(cfg.bandwidth),
            latency: cfg.latency,
            cut: cut.clone(),
        },
        LinkReader {
            rx,
            cur: Vec::new(),
            pos: 0,
            closed: false,
            cut,
        },
    )
}

impl LinkWriter {
    fn send(&mut self, frame: Frame) -> io::Result<()> {
        let mut frame = frame;
        loop {
            if self.cut.is_cut() {
                self.tx = None;
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "link dropped"));
            }
            let Some(tx) = self.tx.as_ref() else {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "link closed"));
            };
            match tx.try_send(frame) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(f)) => {
                    frame = f;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.tx = None;
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "link: reader gone",
                    ));
                }
            }
        }
    }

    fn push(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let sent = self.pacer.pace(self.buf.len());
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(BURST));
        self.send(Frame::Data(sent + self.latency, data))
    }
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cut.is_cut() {
            self.tx = None;
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "link dropped"));
        }
        let n = buf.len().min(BURST - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() >= BURST {
            self.push()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

impl DataSink for LinkWriter {
    fn close(&mut self) -> io::Result<()> {
        self.push()?;
        self.send(Frame::Close)?;
        self.tx = None;
        Ok(())
    }
}

impl Read for LinkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.cut.is_cut() {
                return Err(dropped());
            }
            if self.pos < self.cur.len() {
                let n = out.len().min(self.cur.len() - self.pos);
                out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.closed || out.is_empty() {
                return Ok(0);
            }
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Frame::Data(at, data)) => {
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    self.cur = data;
                    self.pos = 0;
                }
                Ok(Frame::Close) => self.closed = true,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(dropped()),
            }
        }
    }
}

/// A [`DataSink`] paced to a bandwidth (for TCP links that should behave like a slower
/// network), optionally cut by a [`Cut`].
#[derive(Debug)]
pub struct Paced<W> {
    inner: W,
    pacer: Pacer,
    cut: Cut,
    unpace: Unpace,
}

impl<W: DataSink> Paced<W> {
    /// Paces `inner` to `bandwidth` bytes/s (0 = unlimited).
    pub fn new(inner: W, bandwidth: u64, cut: Cut) -> Paced<W> {
        Paced {
            inner,
            pacer: Pacer::new(bandwidth),
            cut,
            unpace: Unpace::new(),
        }
    }

    /// The same link, unpaced from the moment `unpace` is thrown (see [`Unpace`]).
    pub fn unpaced_by(mut self, unpace: Unpace) -> Paced<W> {
        self.unpace = unpace;
        self
    }
}

impl<W: DataSink> Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cut.is_cut() {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "link dropped"));
        }
        let n = buf.len().min(BURST);
        if !self.unpace.is_lifted() {
            self.pacer.pace(n);
        }
        self.inner.write(&buf[..n])
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: DataSink> DataSink for Paced<W> {
    fn close(&mut self) -> io::Result<()> {
        if self.cut.is_cut() {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "link dropped"));
        }
        self.inner.close()
    }
}

/// The in-process link: a writer, the return path's reader, and the switch that cuts them.
#[derive(Debug)]
pub struct LinkChannel {
    /// The stream direction.
    pub data: LinkWriter,
    /// The return path.
    pub back: LinkReader,
    /// Cuts both (the links must have been made with this switch).
    pub cut: Cut,
}

impl Channel for LinkChannel {
    type Data = LinkWriter;
    type Back = LinkReader;

    fn peer(&self) -> String {
        "in-process link".into()
    }

    fn split(self) -> io::Result<(LinkWriter, LinkReader, Abort)> {
        let cut = self.cut;
        Ok((self.data, self.back, Box::new(move || cut.cut())))
    }
}

// Paths of the previous release (items that moved out of this module), kept for one release.
// `DataSink` is also what this module implements for its writers.
#[doc(no_inline)]
pub use crate::local::{migrate_local, migrate_local_channels};
#[doc(no_inline)]
pub use crate::transport::DataSink;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifted_unpace_ends_the_pacing_and_an_unthrown_one_keeps_it() {
        // 256 KiB at 1 MiB/s: a quarter second paced; the same bytes after the lift go at
        // once (the pacer's slack lets the first 64 KiB burst through either way).
        let data = vec![7u8; 256 << 10];
        let unpace = Unpace::new();
        let mut paced = Paced::new(Vec::new(), 1 << 20, Cut::new()).unpaced_by(unpace.clone());
        let t = Instant::now();
        paced.write_all(&data).unwrap();
        let held = t.elapsed();
        assert!(held >= Duration::from_millis(150), "paced: {held:?}");
        unpace.lift();
        assert!(unpace.is_lifted());
        let t = Instant::now();
        paced.write_all(&data).unwrap();
        paced.write_all(&data).unwrap();
        let free = t.elapsed();
        assert!(
            free < held,
            "512 KiB after the lift took {free:?}, 256 KiB before it {held:?}"
        );
        assert_eq!(paced.inner.len(), 3 * data.len());
    }

    #[test]
    fn pipe_delivers_in_order_with_latency_and_bandwidth() {
        let (mut w, mut r) = pipe(
            LinkConfig {
                bandwidth: 10 << 20,
                latency: Duration::from_millis(30),
            },
            Cut::new(),
        );
        let t = Instant::now();
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7) as u8).collect();
        let d2 = data.clone();
        let h = std::thread::spawn(move || {
            w.write_all(&d2).unwrap();
            w.close().unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        h.join().unwrap();
        assert_eq!(got, data);
        // 1 MiB at 10 MiB/s is 100 ms, plus 30 ms latency.
        assert!(
            t.elapsed() >= Duration::from_millis(120),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_cut_link_fails_both_ends() {
        let cut = Cut::new();
        let (mut w, mut r) = pipe(
            LinkConfig {
                bandwidth: 0,
                latency: Duration::ZERO,
            },
            cut.clone(),
        );
        w.write_all(b"abc").unwrap();
        w.flush().unwrap();
        let mut b = [0u8; 3];
        r.read_exact(&mut b).unwrap();
        cut.cut();
        assert_eq!(w.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(
            r.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        // A writer dropped without close is a dropped link, not an end of stream.
        let (w, mut r) = pipe(
            LinkConfig {
                bandwidth: 0,
                latency: Duration::ZERO,
            },
            Cut::new(),
        );
        drop(w);
        assert_eq!(
            r.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
    }
}
