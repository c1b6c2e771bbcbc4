//! What a migration runs over, at the bottom of the engine: the [`DataSink`] the source writes
//! the stream to, a [`Channel`] (the stream one way, the return path the other) with the
//! [`Abort`] hook that unblocks both, plain TCP ([`TcpChannel`]), and the [`Connect`] /
//! [`Accept`] hooks that open page channels.
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
//! the plain one; the in-process link's channel is [`crate::link::LinkChannel`], and the
//! operator's cancel is [`crate::cancel::CancelHandle`]. This module imports nothing else of
//! the crate.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

/// Where the source writes the migration stream. `close` ends the stream for the reader (a
/// reader checks that nothing follows End, so the sink must be closed after it).
pub trait DataSink: Write + Send {
    /// Ends the data direction (TCP: shutdown of the write half).
    fn close(&mut self) -> io::Result<()>;
}

impl DataSink for TcpStream {
    fn close(&mut self) -> io::Result<()> {
        self.flush()?;
        self.shutdown(Shutdown::Write)
    }
}

impl DataSink for Vec<u8> {
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DataSink for std::fs::File {
    fn close(&mut self) -> io::Result<()> {
        self.flush()
    }
}

impl<T: DataSink + ?Sized> DataSink for Box<T> {
    fn close(&mut self) -> io::Result<()> {
        (**self).close()
    }
}

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

/// Opens page channel `index` (1-based) of a multi-channel migration: its data direction and a
/// hook that aborts it (see [`Source::migrate_channels`](crate::engine::Source::migrate_channels)).
pub type Connect<'a> = dyn FnMut(u32) -> io::Result<(Box<dyn DataSink>, Abort)> + 'a;

/// Accepts the next page channel of a multi-channel migration (in any order: each names its
/// index): its data direction and a hook that aborts it (see [`Destination::receive_channels`](crate::engine::Destination::receive_channels)).
pub type Accept<'a> = dyn FnMut() -> io::Result<(Box<dyn Read + Send>, Abort)> + 'a;

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

// Paths of the previous release (items that moved out of this module), kept for one release.
#[doc(no_inline)]
pub use crate::cancel::CancelHandle;
#[doc(no_inline)]
pub use crate::link::LinkChannel;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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
