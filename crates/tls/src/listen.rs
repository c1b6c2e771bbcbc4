//! The destination's listener: it waits for its authenticated peer, and a stranger or a
//! silent connection does not end the wait nor hold it up.
//!
//! ```text
//!  TcpListener ── accept ─┬─ conn 1 (stranger) ── handshake thread ── refused: reported, counted
//!  (PeerListener)         ├─ conn 2 (silent)   ── handshake thread ── times out, or is cut
//!                         │                                           when the peer wins
//!                         └─ conn 3 (peer)     ── handshake thread ── authenticated: returned
//! ```
//!
//! Every accepted connection is handshaked on its own thread, so one that never speaks holds
//! only its own thread, and only for [`AcceptPolicy::handshake_timeout`]. Each
//! [`PeerListener::accept`] returns the next connection that completes its handshake; the
//! others keep handshaking for the next call (a page channel dialed right behind the main
//! connection is not lost), and whatever is still handshaking when the listener is dropped,
//! or when a wait fails, is shut down. Each connection that fails (refused, broken, timed out)
//! is reported to the caller and counted; the count persists across calls (the main
//! connection and the page channels of one migration share it), and at
//! [`AcceptPolicy::max_failures`] the wait ends with [`TlsError::TooManyFailures`]. No more
//! connections are handshaking at once than failures left, so the threads are bounded too.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rustls::{Connection, ServerConnection};

use crate::stream::{HANDSHAKE_TIMEOUT, TlsStream, handshake};
use crate::{TlsConfig, TlsError};

/// How long the accept loop sleeps between looks at the listener and the handshakes.
const POLL: Duration = Duration::from_millis(2);

/// How a [`PeerListener`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptPolicy {
    /// Failed handshakes tolerated before the wait ends with an error (at least 1).
    pub max_failures: u32,
    /// How long one connection may take for its handshake.
    pub handshake_timeout: Duration,
}

impl Default for AcceptPolicy {
    /// 16 failed handshakes, [`HANDSHAKE_TIMEOUT`] each.
    fn default() -> AcceptPolicy {
        AcceptPolicy {
            max_failures: 16,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// A connection that did not become the peer.
#[derive(Debug)]
pub struct Refusal<'a> {
    /// The connection's address.
    pub peer: String,
    /// Why (its [`TlsError::Handshake`] names the reason).
    pub error: &'a TlsError,
    /// Failed handshakes so far, this one included.
    pub failures: u32,
    /// The bound ([`AcceptPolicy::max_failures`]).
    pub max_failures: u32,
}

/// One handshake's outcome: its connection's id, address, and result.
type Outcome = (u64, String, Result<TlsStream, TlsError>);

/// A listener that hands out only authenticated connections.
#[derive(Debug)]
pub struct PeerListener<'a> {
    listener: &'a TcpListener,
    cfg: &'a TlsConfig,
    policy: AcceptPolicy,
    prepare: fn(&TcpStream) -> io::Result<()>,
    failures: u32,
    /// The rustls server settings, built at the first accept.
    server: Option<Arc<rustls::ServerConfig>>,
    /// Connections handshaking: their id and a handle to cut them.
    pending: Vec<(u64, TcpStream)>,
    next_id: u64,
    tx: mpsc::Sender<Outcome>,
    rx: mpsc::Receiver<Outcome>,
}

impl Drop for PeerListener<'_> {
    /// Cuts the connections still handshaking (their threads end with it).
    fn drop(&mut self) {
        self.cut_all();
    }
}

fn no_preparation(_: &TcpStream) -> io::Result<()> {
    Ok(())
}

impl<'a> PeerListener<'a> {
    /// Waits on `listener` for peers `cfg` accepts.
    pub fn new(listener: &'a TcpListener, cfg: &'a TlsConfig, policy: AcceptPolicy) -> Self {
        let (tx, rx) = mpsc::channel();
        PeerListener {
            listener,
            cfg,
            policy,
            prepare: no_preparation,
            failures: 0,
            server: None,
            pending: Vec::new(),
            next_id: 0,
            tx,
            rx,
        }
    }

    /// Sets up each accepted socket before its handshake (its options, e.g. timeouts that
    /// apply again after the handshake).
    pub fn with_prepare(mut self, prepare: fn(&TcpStream) -> io::Result<()>) -> Self {
        self.prepare = prepare;
        self
    }

    /// Failed handshakes so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The next authenticated peer. Waits until `until` (`None`: no time limit); each
    /// connection that fails its handshake goes to `refused` and counts against the bound.
    pub fn accept(
        &mut self,
        until: Option<Instant>,
        refused: &mut dyn FnMut(&Refusal<'_>),
    ) -> Result<TlsStream, TlsError> {
        self.listener
            .set_nonblocking(true)
            .map_err(TlsError::Accept)?;
        let r = self.wait(until, refused);
        let restored = self
            .listener
            .set_nonblocking(false)
            .map_err(TlsError::Accept);
        let t = r?;
        restored?;
        Ok(t)
    }

    fn wait(
        &mut self,
        until: Option<Instant>,
        refused: &mut dyn FnMut(&Refusal<'_>),
    ) -> Result<TlsStream, TlsError> {
        let start = Instant::now();
        let max = self.policy.max_failures.max(1);
        let server = match &self.server {
            Some(s) => Arc::clone(s),
            None => Arc::clone(self.server.insert(self.cfg.server()?)),
        };
        loop {
            // Handshakes that ended (since the last call too).
            while let Ok((id, peer, result)) = self.rx.try_recv() {
                self.pending.retain(|(p, _)| *p != id);
                match result {
                    Ok(t) => return Ok(t),
                    Err(e) => self.failed(peer, &e, refused),
                }
            }
            if self.failures >= max {
                self.cut_all();
                return Err(TlsError::TooManyFailures {
                    bound: max,
                    waited: start.elapsed(),
                });
            }
            // A new connection, while the failures left cover those in flight.
            if self.failures as usize + self.pending.len() < max as usize {
                match self.listener.accept() {
                    Ok((sock, addr)) => {
                        let id = self.next_id;
                        self.next_id += 1;
                        match self.start(sock, id, Arc::clone(&server)) {
                            Ok(cut) => self.pending.push((id, cut)),
                            Err(source) => {
                                let e = TlsError::Handshake {
                                    peer: addr.to_string(),
                                    source,
                                };
                                self.failed(addr.to_string(), &e, refused);
                            }
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.cut_all();
                        return Err(TlsError::Accept(e));
                    }
                }
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                self.cut_all();
                return Err(TlsError::NoPeer {
                    waited: start.elapsed(),
                    failures: self.failures,
                });
            }
            match self.rx.recv_timeout(POLL) {
                Ok((id, peer, result)) => {
                    self.pending.retain(|(p, _)| *p != id);
                    match result {
                        Ok(t) => return Ok(t),
                        Err(e) => self.failed(peer, &e, refused),
                    }
                }
                // Nothing ended yet (the sender lives in `self`: never disconnected).
                Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
            }
        }
    }

    /// Shuts down every connection still handshaking.
    fn cut_all(&mut self) {
        for (_, s) in self.pending.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn failed(&mut self, peer: String, error: &TlsError, refused: &mut dyn FnMut(&Refusal<'_>)) {
        self.failures += 1;
        refused(&Refusal {
            peer,
            error,
            failures: self.failures,
            max_failures: self.policy.max_failures.max(1),
        });
    }

    /// Starts `sock`'s handshake on a thread that reports to `tx`; returns a handle that cuts
    /// the connection.
    fn start(
        &self,
        sock: TcpStream,
        id: u64,
        server: Arc<rustls::ServerConfig>,
    ) -> io::Result<TcpStream> {
        sock.set_nonblocking(false)?;
        (self.prepare)(&sock)?;
        let cut = sock.try_clone()?;
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into());
        let timeout = self.policy.handshake_timeout;
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("livemig-tls-handshake".into())
            .spawn(move || {
                let r = ServerConnection::new(server)
                    .map_err(TlsError::from)
                    .and_then(|c| handshake(Connection::Server(c), sock, timeout));
                // The receiver is gone once the listener is; the connection drops with `r`.
                let _ = tx.send((id, peer, r));
            })?;
        Ok(cut)
    }
}
