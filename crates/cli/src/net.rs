//! Migration connections: the page channels a source opens and a destination accepts, and a
//! destination's listen, accept and receive.

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, Result};
use livemig::engine::Destination;
use livemig::link::{Cut, DataSink, Paced, Unpace};
use livemig::transport::Abort;

use crate::secure;

/// Opens page channel connections to `to` (each paced to `bandwidth`, 0 for none, until
/// `unpace` is thrown, and secured as `sec` says), for
/// [`Source::migrate_channels`](livemig::engine::Source::migrate_channels).
pub(crate) fn page_channels<'a>(
    to: &'a str,
    bandwidth: u64,
    unpace: &'a Unpace,
    sec: &'a secure::Security,
) -> impl FnMut(u32) -> std::io::Result<(Box<dyn DataSink>, Abort)> + 'a {
    move |_index| {
        let c = secure::dial(to, sec).map_err(std::io::Error::other)?;
        Ok((
            Box::new(Paced::new(c.data, bandwidth, Cut::new()).unpaced_by(unpace.clone()))
                as Box<dyn DataSink>,
            c.abort,
        ))
    }
}

/// How long a source that announced page channels has to connect each.
const PAGE_CHANNEL_WAIT: Duration = Duration::from_secs(30);

/// Accepts page channel connections from `incoming` (a source that announced page channels
/// and does not connect them within 30 s fails the migration, naming the wait), for
/// [`Destination::receive_channels`]. Under TLS a connection that fails its handshake is
/// logged and the wait goes on (see [`secure::Incoming`]).
pub(crate) fn accept_page_channels<'a>(
    incoming: &'a mut secure::Incoming<'_>,
) -> impl FnMut() -> std::io::Result<(Box<dyn std::io::Read + Send>, Abort)> + 'a {
    move || {
        let c = incoming.page(PAGE_CHANNEL_WAIT)?;
        Ok((c.back, c.abort))
    }
}

/// Listens on `listen`, announces the address ("listening on ADDR", on standard output when
/// `stdout`, else standard error), accepts one peer and receives its migration into `dest`.
/// With `what`, says "receiving {what}from PEER" on standard error.
pub(crate) fn receive_one(
    listen: &str,
    dest: &mut Destination,
    stdout: bool,
    what: Option<&str>,
    sec: &secure::Security,
) -> Result<livemig::engine::ReceiveReport> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    if stdout {
        println!("listening on {}", l.local_addr()?);
        std::io::stdout().flush()?;
    } else {
        eprintln!("listening on {}", l.local_addr()?);
        std::io::stderr().flush()?;
    }
    // Under TLS the peer is authenticated here, before anything of the migration is read;
    // connections that fail their handshake are logged and do not end the wait.
    let mut incoming = secure::Incoming::new(&l, sec);
    let conn = incoming.main()?;
    // On stderr whenever stdout is not the report's (the peer names its certificate's
    // fingerprint under TLS).
    if what.is_some() || !stdout {
        eprintln!("receiving {}from {}", what.unwrap_or(""), conn.peer);
    }
    // One connection, or the main one of several: the stream's first record says.
    dest.receive_channels(
        conn.back,
        conn.data,
        conn.abort,
        &mut accept_page_channels(&mut incoming),
    )
    .map_err(|e| anyhow::anyhow!("incoming migration failed: {}", e.chain()))
}
