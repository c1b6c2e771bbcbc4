//! What a migration runs over: a [`Channel`] (the stream one way, the return path the other),
//! and the operator's [`CancelHandle`].
//!
//! ```text
//!   Source ── Channel::split ──> DataSink (stream) ───────────────> Destination
//!          <───────────────────  Read (return path: compat answer, Resumed | Failed)
//!   CancelHandle::cancel (any thread) ──> the engine stops at its next check, and the
//!          channel's abort hook unblocks a read or write in progress
//! ```
//!
//! The engine only needs the two directions and a way to abort them, so a channel can add
//! what it likes underneath: TLS or another authentication before [`Channel::split`] returns,
//! deadlines on its sockets, or several connections behind one `DataSink`. [`TcpChannel`] is
//! the plain one; [`LinkChannel`] is the in-process link of [`crate::link`].

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};

use crate::link::{Cut, DataSink, LinkReader, LinkWriter};

/// Aborts both directions of a channel (a cancel wakes the engine from a blocked read/write).
pub type Abort = Box<dyn Fn() + Send + Sync>;

/// A migration channel: the stream direction and the return path.
pub trait Channel {
    /// Where the source writes the stream.
    type Data: DataSink;
    /// Where the source reads the destination's answers.
    type Back: Read + Send;
    /// A description of the peer, for reports and errors.
    fn peer(&self) -> String;
    /// The two directions, and a hook that aborts both.
    fn split(self) -> io::Result<(Self::Data, Self::Back, Abort)>;
}

/// A plain TCP connection (no authentication: the caller chose it explicitly).
#[derive(Debug)]
pub struct TcpChannel(pub TcpStream);

impl Channel for TcpChannel {
    type Data = TcpStream;
    type Back = TcpStream;

    fn peer(&self) -> String {
        self.0
            .peer_addr()
            .map(|a| format!("tcp {a}"))
            .unwrap_or_else(|e| format!("tcp (peer address unknown: {e})"))
    }

    fn split(self) -> io::Result<(TcpStream, TcpStream, Abort)> {
        let back = self.0.try_clone()?;
        let abort = self.0.try_clone()?;
        Ok((
            self.0,
            back,
            Box::new(move || {
                let _ = abort.shutdown(Shutdown::Both);
            }),
        ))
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

#[derive(Default)]
struct CancelState {
    reason: Option<String>,
    /// The cancel came from the hard deadline's watchdog, not the operator.
    deadline: bool,
    /// After the stream's End a cancel is refused: the destination may already run.
    closed: bool,
    abort: Option<Arc<Abort>>,
}

/// Stops a running migration from another thread, like QEMU's `migrate_cancel`: the source
/// engine notices at its next check (every phase, every round, every batch of pages), aborts
/// the channel so no read or write stays blocked, and returns the source to RUNNING with
/// [`Error::Cancelled`](crate::Error::Cancelled). Once the source has sent the stream's End
/// the destination may already run, and a cancel is refused (`cancel` returns `false`).
/// Clones share the state.
#[derive(Clone, Default)]
pub struct CancelHandle(Arc<Mutex<CancelState>>);

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("CancelHandle")
            .field("reason", &s.reason)
            .field("closed", &s.closed)
            .finish()
    }
}

impl CancelHandle {
    /// A handle not cancelled.
    pub fn new() -> CancelHandle {
        CancelHandle::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests the cancel; `false` if it came too late (the stream has ended) or twice.
    pub fn cancel(&self, reason: impl Into<String>) -> bool {
        self.stop(reason.into(), false)
    }

    /// The hard deadline passed in stop-and-copy: as [`cancel`](Self::cancel), reported as
    /// [`Error::Deadline`](crate::Error::Deadline).
    pub(crate) fn expire(&self, reason: String) -> bool {
        self.stop(reason, true)
    }

    /// Whether the cancel came from the hard deadline.
    pub(crate) fn by_deadline(&self) -> bool {
        self.lock().deadline
    }

    fn stop(&self, reason: String, deadline: bool) -> bool {
        let abort = {
            let mut s = self.lock();
            if s.closed || s.reason.is_some() {
                return false;
            }
            s.reason = Some(reason);
            s.deadline = deadline;
            s.abort.clone()
        };
        if let Some(a) = abort {
            a();
        }
        true
    }

    /// The reason, if cancelled.
    pub fn reason(&self) -> Option<String> {
        self.lock().reason.clone()
    }

    /// Whether a cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.lock().reason.is_some()
    }

    /// Arms the handle for a new attempt over a channel aborted by `abort`.
    pub(crate) fn arm(&self, abort: Option<Abort>) {
        let mut s = self.lock();
        s.reason = None;
        s.deadline = false;
        s.closed = false;
        s.abort = abort.map(Arc::new);
    }

    /// The stream has ended: from now on a cancel is refused. `false` if a cancel came first
    /// (the caller must not send End then).
    pub(crate) fn close(&self) -> bool {
        let mut s = self.lock();
        if s.reason.is_some() {
            return false;
        }
        s.closed = true;
        s.abort = None;
        true
    }

    /// The attempt is over: drop the abort hook.
    pub(crate) fn disarm(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.abort = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn cancel_runs_the_abort_once_and_is_refused_after_close() {
        let h = CancelHandle::new();
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        h.arm(Some(Box::new(move || {
            n2.fetch_add(1, Ordering::SeqCst);
        })));
        assert!(!h.is_cancelled());
        assert!(h.clone().cancel("operator"));
        assert!(!h.cancel("again"), "a second cancel changes nothing");
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(h.reason().as_deref(), Some("operator"));
        assert!(!h.close(), "a cancelled attempt must not send End");

        h.arm(None);
        assert!(!h.is_cancelled(), "arming starts a new attempt");
        assert!(h.close());
        assert!(!h.cancel("too late"), "after End the destination may run");
        assert!(!h.is_cancelled());
    }

    #[test]
    fn tcp_channel_abort_unblocks_a_reader() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _peer = l.accept().unwrap();
        let ch = TcpChannel(c);
        assert!(ch.peer().starts_with("tcp 127.0.0.1:"));
        let (_data, mut back, abort) = ch.split().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            back.read(&mut b)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        abort();
        let r = t.join().unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
}
