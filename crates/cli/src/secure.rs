//! The migration connections of the CLI: plain TCP, chosen explicitly with `--plain`, or
//! mutual TLS (`livemig-tls`) with this host's certificate and the peer's fingerprint or CA.
//! Every command that opens a migration connection takes these options; with neither it
//! refuses to start, so an unauthenticated channel is never the silent default.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use livemig::link::DataSink;
use livemig::transport::{Abort, Channel};
use livemig_tls::{AcceptPolicy, Fingerprint, Identity, PeerListener, TlsConfig, Trust};

/// How long a read on a migration connection may wait (a peer that stops sending).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a write may wait (a peer that stops reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// Channel security options.
#[derive(Args, Clone, Debug, Default)]
pub struct ChannelArgs {
    /// Use plain TCP: no authentication and no encryption, so any peer that reaches the port
    /// can write guest RAM and device state. Either this or the TLS options is required.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_peer", "tls_ca"])]
    pub plain: bool,
    /// This host's TLS certificate chain (PEM; `livemig tls keygen` makes a self-signed one).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Accept only a peer whose certificate has this SHA-256 fingerprint (repeatable; what
    /// `livemig tls keygen` printed on the other host).
    #[arg(long, value_name = "sha256:HEX")]
    pub tls_peer: Vec<String>,
    /// Accept peers whose certificates this CA bundle issued (PEM).
    #[arg(long, value_name = "FILE", conflicts_with = "tls_peer")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the destination's certificate must carry (default: the host
    /// part of --to).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Destination: the longest one phase (compat, receive, resume) may take before the
    /// connections are aborted, so a source that trickles bytes cannot hold this host; 0 for
    /// no limit.
    #[arg(long, value_name = "DURATION", default_value = "3600s", value_parser = crate::args::parse_duration)]
    pub phase_deadline: Duration,
    /// Destination under TLS: connections that may fail their handshake (a stranger's
    /// certificate, no TLS, no handshake within 30 s) before the incoming migration gives up;
    /// each is logged and the listener keeps waiting for the authenticated source until then
    /// (and, for the first connection, until the phase deadline).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshake_failures: u32,
}

impl ChannelArgs {
    /// The destination's phase deadline (`None`: no limit).
    pub fn phase_deadline(&self) -> Option<Duration> {
        (!self.phase_deadline.is_zero()).then_some(self.phase_deadline)
    }
}

/// What the options resolved to.
#[derive(Clone, Debug)]
pub enum Security {
    /// Plain TCP, asked for.
    Plain,
    /// Mutual TLS.
    Tls {
        /// This side's settings.
        cfg: Arc<TlsConfig>,
        /// The destination's name for the source's verification (CA mode).
        server_name: Option<String>,
        /// How the destination's listener takes its connections.
        accept: AcceptPolicy,
        /// How long the destination waits for its authenticated source (`None`: no limit).
        wait: Option<Duration>,
    },
}

impl ChannelArgs {
    /// Checks and loads the options.
    pub fn security(&self) -> Result<Security> {
        if self.plain {
            return Ok(Security::Plain);
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            bail!(
                "choose the channel's security: --tls-cert/--tls-key with --tls-peer or --tls-ca \
                 (mutual TLS), or --plain (no authentication: any peer can write guest memory)"
            );
        };
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let identity = Identity::from_pem(&read(cert)?, &read(key)?)
            .with_context(|| format!("{} / {}", cert.display(), key.display()))?;
        let trust = match (&self.tls_ca, self.tls_peer.is_empty()) {
            (Some(ca), _) => {
                Trust::ca_from_pem(&read(ca)?).with_context(|| format!("{}", ca.display()))?
            }
            (None, false) => Trust::Pinned(
                self.tls_peer
                    .iter()
                    .map(|f| f.parse::<Fingerprint>())
                    .collect::<Result<_, _>>()?,
            ),
            (None, true) => bail!("--tls-cert needs --tls-peer FINGERPRINT or --tls-ca FILE"),
        };
        Ok(Security::Tls {
            cfg: Arc::new(TlsConfig { identity, trust }),
            server_name: self.tls_server_name.clone(),
            accept: AcceptPolicy {
                max_failures: self.max_handshake_failures,
                ..AcceptPolicy::default()
            },
            wait: self.phase_deadline(),
        })
    }
}

/// One migration connection, plain or TLS, split into the engine's directions.
pub struct Conn {
    /// The sending direction.
    pub data: Box<dyn DataSink>,
    /// The receiving direction.
    pub back: Box<dyn Read + Send>,
    /// Aborts both.
    pub abort: Abort,
    /// The peer, with its certificate's fingerprint under TLS.
    pub peer: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish()
    }
}

impl Channel for Conn {
    type Data = Box<dyn DataSink>;
    type Back = Box<dyn Read + Send>;
    fn peer(&self) -> String {
        self.peer.clone()
    }
    fn split(self) -> std::io::Result<(Self::Data, Self::Back, Abort)> {
        Ok((self.data, self.back, self.abort))
    }
}

fn prepare(sock: &TcpStream) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(READ_TIMEOUT))?;
    sock.set_write_timeout(Some(WRITE_TIMEOUT))
}

fn host_of(to: &str) -> &str {
    let h = to.rsplit_once(':').map_or(to, |(h, _)| h);
    h.trim_start_matches('[').trim_end_matches(']')
}

fn finish(sock: TcpStream, tls: Option<livemig_tls::TlsStream>) -> Result<Conn> {
    match tls {
        None => {
            let peer = sock
                .peer_addr()
                .map_or_else(|e| format!("tcp (unknown: {e})"), |a| format!("tcp {a}"));
            let back = sock.try_clone()?;
            let abort = sock.try_clone()?;
            Ok(Conn {
                data: Box::new(sock),
                back: Box::new(back),
                abort: Box::new(move || {
                    let _ = abort.shutdown(std::net::Shutdown::Both);
                }),
                peer,
            })
        }
        Some(t) => finish_tls(t),
    }
}

/// Connects to `to` (the source's side).
pub fn dial(to: &str, sec: &Security) -> Result<Conn> {
    let sock = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    prepare(&sock)?;
    match sec {
        Security::Plain => finish(sock, None),
        Security::Tls {
            cfg, server_name, ..
        } => {
            let name = server_name.as_deref().unwrap_or_else(|| host_of(to));
            let name = if name.is_empty() { "localhost" } else { name };
            let t = livemig_tls::connect(sock.try_clone()?, cfg, name)?;
            finish(sock, Some(t))
        }
    }
}

/// The destination's listener for one incoming migration: its main connection, then its page
/// channels. Plain TCP takes each connection as it comes. Under TLS every connection is
/// authenticated before anything of the migration is read; one that fails its handshake (or
/// sends none within 30 s) is logged on stderr with its address and the reason, and the
/// listener keeps waiting, concurrently handshaking later connections, until the source is
/// authenticated, the wait ends, or `--max-handshake-failures` connections (for the whole
/// migration) have failed.
pub struct Incoming<'a> {
    l: &'a TcpListener,
    tls: Option<(PeerListener<'a>, Option<Duration>)>,
}

impl std::fmt::Debug for Incoming<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("listener", &self.l)
            .finish_non_exhaustive()
    }
}

fn log_refusal(r: &livemig_tls::Refusal<'_>) {
    eprintln!(
        "refused a connection from {} ({} of {} failed handshakes allowed): {}",
        r.peer, r.failures, r.max_failures, r.error
    );
}

impl<'a> Incoming<'a> {
    /// Takes connections from `l`, secured as `sec` says.
    pub fn new(l: &'a TcpListener, sec: &'a Security) -> Incoming<'a> {
        let tls = match sec {
            Security::Plain => None,
            Security::Tls {
                cfg, accept, wait, ..
            } => Some((
                PeerListener::new(l, cfg, *accept).with_prepare(prepare),
                *wait,
            )),
        };
        Incoming { l, tls }
    }

    /// The migration's main connection: under TLS the authenticated source, waiting at most
    /// the phase deadline.
    pub fn main(&mut self) -> Result<Conn> {
        match &mut self.tls {
            None => {
                let (sock, _) = self
                    .l
                    .accept()
                    .context("accepting the migration connection")?;
                prepare(&sock)?;
                finish(sock, None)
            }
            Some((pl, wait)) => {
                let until = wait.map(|w| Instant::now() + w);
                let t = pl.accept(until, &mut log_refusal).map_err(explain)?;
                finish_tls(t)
            }
        }
    }

    /// A page channel connection: the source that announced page channels must connect each
    /// within `within`.
    pub fn page(&mut self, within: Duration) -> std::io::Result<Conn> {
        let until = Instant::now() + within;
        match &mut self.tls {
            None => {
                self.l.set_nonblocking(true)?;
                let (s, _) = loop {
                    match self.l.accept() {
                        Ok(c) => break c,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if Instant::now() > until {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    format!("no page channel connected within {within:?}"),
                                ));
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => return Err(e),
                    }
                };
                self.l.set_nonblocking(false)?;
                s.set_nonblocking(false)?;
                prepare(&s)?;
                finish(s, None).map_err(std::io::Error::other)
            }
            Some((pl, _)) => {
                let t = pl.accept(Some(until), &mut log_refusal).map_err(|e| {
                    std::io::Error::other(format!("page channel: {:#}", explain(e)))
                })?;
                finish_tls(t).map_err(std::io::Error::other)
            }
        }
    }
}

/// The listener's error, naming the option behind a bound.
fn explain(e: livemig_tls::TlsError) -> anyhow::Error {
    match e {
        e @ livemig_tls::TlsError::TooManyFailures { bound, .. } => anyhow::Error::new(e).context(
            format!("giving up the incoming migration: --max-handshake-failures {bound} reached"),
        ),
        e => anyhow::Error::new(e).context("waiting for the migration connection"),
    }
}

fn finish_tls(t: livemig_tls::TlsStream) -> Result<Conn> {
    let peer = match t.peer_fingerprint() {
        Some(f) => format!("tls {} ({f})", t.peer()),
        None => format!("tls {}", t.peer()),
    };
    let (w, r, abort) = t.split()?;
    Ok(Conn {
        data: Box::new(w),
        back: Box::new(r),
        abort,
        peer,
    })
}

/// `livemig tls keygen`: a self-signed certificate and key for `names`, and its fingerprint
/// (what the other host passes as --tls-peer).
pub fn keygen(names: &[String], cert: &PathBuf, key: &PathBuf) -> Result<String> {
    let c =
        rcgen::generate_simple_self_signed(names.to_vec()).context("generating the certificate")?;
    let id = Identity::from_pem(
        c.cert.pem().as_bytes(),
        c.signing_key.serialize_pem().as_bytes(),
    )?;
    std::fs::write(cert, c.cert.pem()).with_context(|| format!("writing {}", cert.display()))?;
    write_private(key, c.signing_key.serialize_pem().as_bytes())?;
    Ok(id.fingerprint().to_string())
}

fn write_private(path: &PathBuf, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_plain_nor_tls_is_refused_with_both_choices_named() {
        let e = ChannelArgs::default().security().unwrap_err().to_string();
        assert!(e.contains("--plain") && e.contains("--tls-cert"), "{e}");
        let a = ChannelArgs {
            plain: true,
            ..Default::default()
        };
        assert!(matches!(a.security().unwrap(), Security::Plain));
    }

    #[test]
    fn the_phase_deadline_defaults_to_an_hour_and_0_turns_it_off() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            c: ChannelArgs,
        }
        let t = T::try_parse_from(["t", "--plain"]).unwrap();
        assert_eq!(t.c.phase_deadline(), Some(Duration::from_secs(3600)));
        let t = T::try_parse_from(["t", "--plain", "--phase-deadline", "0s"]).unwrap();
        assert_eq!(t.c.phase_deadline(), None);
        let e = T::try_parse_from(["t", "--plain", "--tls-cert", "x"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e = T::try_parse_from(["t", "--tls-cert", "x"]).err().unwrap();
        assert!(e.to_string().contains("--tls-key"), "{e}");
    }

    #[test]
    fn the_handshake_failure_bound_defaults_to_16_and_0_is_refused() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            c: ChannelArgs,
        }
        let t = T::try_parse_from(["t", "--plain"]).unwrap();
        assert_eq!(t.c.max_handshake_failures, 16);
        let t = T::try_parse_from(["t", "--plain", "--max-handshake-failures", "1"]).unwrap();
        assert_eq!(t.c.max_handshake_failures, 1);
        let e = T::try_parse_from(["t", "--plain", "--max-handshake-failures", "0"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--max-handshake-failures"), "{e}");
    }

    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(host_of("dest.example:4444"), "dest.example");
        assert_eq!(host_of("[::1]:4444"), "::1");
        assert_eq!(host_of("10.0.0.2:1"), "10.0.0.2");
    }
}
