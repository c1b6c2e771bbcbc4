//! Stopping a migration: the operator's [`CancelHandle`], and the two deadline threads that
//! use the same hooks — the source's hard-deadline watchdog (stop-and-copy must send End in
//! time) and the destination's phase watch (no phase may run past its limit).
//!
//! ```text
//!   operator ── CancelHandle::cancel ──┐
//!   Watchdog (source, stop-and-copy) ──┼──> reason recorded, channel Abort hook run
//!                                      │    (a blocked read or write returns at once)
//!   PhaseWatch (destination) ──────────┴──> Abort hook run, the phase that ran out recorded
//! ```

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::Phase;
use crate::transport::Abort;

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

/// Aborts the channel if stop-and-copy is still running `limit` after it began (a write the
/// destination does not take blocks where no deadline check can run). Dropping it (End sent,
/// or the attempt over) stops it.
pub(crate) struct Watchdog {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub(crate) fn start(cancel: CancelHandle, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("livemig-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    cancel.expire(format!(
                        "stop-and-copy reached the hard deadline of {} ms with the stream not \
                         ended (the destination was not taking it); the channel was aborted and \
                         the source runs again",
                        limit.as_secs_f64() * 1000.0
                    ));
                }
            })
            .ok();
        Watchdog {
            stop: Some(tx),
            thread,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The destination's phase deadline: a thread that aborts the connections when the current
/// phase has run longer than the limit (a peer that trickles bytes just fast enough to beat
/// every per-read timeout holds nothing longer than that).
pub(crate) struct PhaseWatch {
    limit: Duration,
    state: Mutex<WatchState>,
    cv: Condvar,
    /// Joined by `finish`: the thread holds the abort hook, and with it a connection's fd.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct WatchState {
    phase: Phase,
    since: Instant,
    /// The phase that ran out, once one did.
    expired: Option<Phase>,
    done: bool,
}

impl PhaseWatch {
    pub(crate) fn start(limit: Duration, abort: Arc<Abort>) -> Arc<PhaseWatch> {
        let w = Arc::new(PhaseWatch {
            limit,
            state: Mutex::new(WatchState {
                phase: Phase::Compat,
                since: Instant::now(),
                expired: None,
                done: false,
            }),
            cv: Condvar::new(),
            thread: Mutex::new(None),
        });
        let watch = Arc::clone(&w);
        let thread = std::thread::Builder::new()
            .name("livemig-phase-deadline".into())
            .spawn(move || {
                let mut st = watch.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if st.done {
                        return;
                    }
                    let left = watch.limit.saturating_sub(st.since.elapsed());
                    if left.is_zero() {
                        st.expired = Some(st.phase);
                        drop(st);
                        abort();
                        return;
                    }
                    st = watch
                        .cv
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            })
            .ok();
        *w.thread.lock().unwrap_or_else(|p| p.into_inner()) = thread;
        w
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new phase: its own full limit.
    pub(crate) fn enter(&self, phase: Phase) {
        let mut st = self.lock();
        st.phase = phase;
        st.since = Instant::now();
        self.cv.notify_all();
    }

    pub(crate) fn expired(&self) -> Option<Phase> {
        self.lock().expired
    }

    /// Stops the watch and waits for its thread, so the abort hook (and the connection it
    /// holds) is gone when the receive returns.
    pub(crate) fn finish(&self) {
        self.lock().done = true;
        self.cv.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
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
}
