//! A TLS connection over TCP that splits into independent directions, as the engine needs
//! them (the source writes the stream on one thread while it reads the return path on another;
//! the destination the other way round).
//!
//! rustls keeps one state machine per connection, so the halves share it behind a mutex that
//! is never held across a blocking socket call: the reader reads the socket unlocked, then
//! feeds the bytes in; a writer encrypts under the lock and sends after. Records leave in the
//! order they were made: whoever sends takes the socket's send lock first and drains
//! everything rustls has queued while holding it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use livemig::link::DataSink;
use livemig::transport::{Abort, Channel};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

use crate::{Fingerprint, TlsConfig, TlsError};

/// How long the handshake may take before the connection is dropped (the default of
/// [`AcceptPolicy::handshake_timeout`](crate::AcceptPolicy::handshake_timeout)).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes read from the socket at a time (about one TLS record).
const READ_CHUNK: usize = 17 * 1024;

struct Shared {
    conn: Mutex<Connection>,
    send: Mutex<TcpStream>,
    peer: String,
}

fn lock<T>(m: &Mutex<T>) -> io::Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| io::Error::other("TLS connection state poisoned by a panicked thread"))
}

impl Shared {
    /// Sends everything rustls has queued, in order.
    fn flush(&self) -> io::Result<()> {
        let mut send = lock(&self.send)?;
        let mut out = Vec::new();
        {
            let mut c = lock(&self.conn)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        send.write_all(&out)?;
        send.flush()
    }
}

/// An established, mutually authenticated TLS connection.
pub struct TlsStream {
    shared: Arc<Shared>,
    recv: TcpStream,
    peer_fingerprint: Option<Fingerprint>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.shared.peer)
            .field("peer_fingerprint", &self.peer_fingerprint)
            .finish()
    }
}

/// Completes the handshake of `conn` on `sock` within `timeout` (per socket read or write).
pub(crate) fn handshake(
    mut conn: Connection,
    mut sock: TcpStream,
    timeout: Duration,
) -> Result<TlsStream, TlsError> {
    let peer = sock
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let fail = |source: io::Error| TlsError::Handshake {
        peer: peer.clone(),
        // A socket timeout reads as EAGAIN: say what it means.
        source: if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer sent no handshake within {timeout:?}"),
            )
        } else {
            source
        },
    };
    // The handshake has its own deadline; the caller's socket timeouts apply again after.
    let (read_timeout, write_timeout) = (
        sock.read_timeout().map_err(fail)?,
        sock.write_timeout().map_err(fail)?,
    );
    sock.set_read_timeout(Some(timeout)).map_err(fail)?;
    sock.set_write_timeout(Some(timeout)).map_err(fail)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(fail)?;
    }
    // TLS 1.3: the client's last flight (its certificate) may still be queued.
    while conn.wants_write() {
        conn.write_tls(&mut sock).map_err(fail)?;
    }
    sock.set_read_timeout(read_timeout).map_err(fail)?;
    sock.set_write_timeout(write_timeout).map_err(fail)?;
    let peer_fingerprint = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(Fingerprint::of);
    let recv = sock.try_clone().map_err(fail)?;
    Ok(TlsStream {
        shared: Arc::new(Shared {
            conn: Mutex::new(conn),
            send: Mutex::new(sock),
            peer,
        }),
        recv,
        peer_fingerprint,
    })
}

/// The source's side: a TLS client on `sock`. `server_name` is the host the destination's
/// certificate must name under [`Trust::Ca`](crate::Trust::Ca) (ignored when pinned).
pub fn connect(sock: TcpStream, cfg: &TlsConfig, server_name: &str) -> Result<TlsStream, TlsError> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
        TlsError::Config(rustls::Error::General(format!(
            "server name {server_name:?}: {e}"
        )))
    })?;
    let conn = ClientConnection::new(cfg.client()?, name)?;
    handshake(Connection::Client(conn), sock, HANDSHAKE_TIMEOUT)
}

/// The destination's side: a TLS server on `sock` that requires the peer's certificate. When
/// this returns, the peer is authenticated; a peer that is not is refused here, before the
/// engine reads anything. (A listener that must not be given up by the first stranger takes
/// its connections through [`PeerListener`](crate::PeerListener).)
pub fn accept(sock: TcpStream, cfg: &TlsConfig) -> Result<TlsStream, TlsError> {
    let conn = ServerConnection::new(cfg.server()?)?;
    handshake(Connection::Server(conn), sock, HANDSHAKE_TIMEOUT)
}

impl TlsStream {
    /// The fingerprint of the certificate the peer authenticated with.
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.peer_fingerprint
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The two directions and a hook that aborts both (shuts the socket down).
    pub fn split(self) -> io::Result<(TlsWriter, TlsReader, Abort)> {
        let abort = self.recv.try_clone()?;
        Ok((
            TlsWriter {
                shared: Arc::clone(&self.shared),
            },
            TlsReader {
                shared: self.shared,
                sock: self.recv,
                buf: vec![0; READ_CHUNK],
                start: 0,
                end: 0,
                eof: false,
            },
            Box::new(move || {
                let _ = abort.shutdown(Shutdown::Both);
            }),
        ))
    }
}

/// The sending direction.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsWriter")
            .field("peer", &self.shared.peer)
            .finish()
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut send = lock(&self.shared.send)?;
        let mut out = Vec::new();
        let n = {
            let mut c = lock(&self.shared.conn)?;
            let n = c.writer().write(buf)?;
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
            n
        };
        send.write_all(&out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.shared.flush()
    }
}

impl DataSink for TlsWriter {
    /// Sends close_notify, then shuts the socket's write half.
    fn close(&mut self) -> io::Result<()> {
        lock(&self.shared.conn)?.send_close_notify();
        self.shared.flush()?;
        lock(&self.shared.send)?.shutdown(Shutdown::Write)
    }
}

/// The receiving direction.
pub struct TlsReader {
    shared: Arc<Shared>,
    sock: TcpStream,
    /// TLS bytes read from the socket; `start..end` not yet given to rustls.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The socket reached its end.
    eof: bool,
}

impl std::fmt::Debug for TlsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReader")
            .field("peer", &self.shared.peer)
            .finish()
    }
}

impl Read for TlsReader {
    /// Plaintext from the peer. The end of the stream is `Ok(0)` only after the peer's
    /// close_notify; a connection that just ends is `UnexpectedEof` (a cut stream must not
    /// look complete).
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match lock(&self.shared.conn)?.reader().read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // Nothing decrypted is waiting: feed rustls the next TLS bytes, one `read_tls` at
            // a time (it refuses more while decrypted data is unread), keeping the rest.
            if self.start == self.end {
                if self.eof {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection without close_notify",
                    ));
                }
                let n = self.sock.read(&mut self.buf)?;
                self.start = 0;
                self.end = n;
                self.eof = n == 0;
            }
            let wants_write = {
                let mut c = lock(&self.shared.conn)?;
                let mut rest = &self.buf[self.start..self.end];
                let took = c.read_tls(&mut rest)?;
                self.start += took;
                c.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                c.wants_write()
            };
            if wants_write {
                self.shared.flush()?;
            }
        }
    }
}

/// The source's channel over TLS (the engine's [`Channel`]).
#[derive(Debug)]
pub struct TlsChannel(pub TlsStream);

impl Channel for TlsChannel {
    type Data = TlsWriter;
    type Back = TlsReader;

    fn peer(&self) -> String {
        match self.0.peer_fingerprint {
            Some(f) => format!("tls {} ({f})", self.0.shared.peer),
            None => format!("tls {}", self.0.shared.peer),
        }
    }

    fn split(self) -> io::Result<(TlsWriter, TlsReader, Abort)> {
        self.0.split()
    }
}
