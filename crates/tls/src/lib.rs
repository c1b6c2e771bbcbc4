//! Mutual TLS for migration channels, on rustls with the ring provider.
//!
//! ```text
//!  source                                              destination
//!  TlsConfig (identity + trust) ─ connect(tcp) ──TLS 1.3, both sides authenticated── accept(tcp)
//!      └ TlsStream::split ─> TlsWriter (stream) ─────────────────────> TlsReader ─> Destination
//!                            TlsReader (return path) <───────────────── TlsWriter
//! ```
//!
//! Each side has an [`Identity`] (a certificate chain and its key, PEM) and a [`Trust`]: the
//! certificate authorities that may vouch for the peer ([`Trust::Ca`]), or for two hosts that
//! know each other the SHA-256 fingerprints of the peer certificates they accept
//! ([`Trust::Pinned`]; rustls has no external PSK, and no home-made scheme replaces it). The
//! handshake completes, both ways, in [`connect`] / [`accept`] before either returns, so a peer
//! without the credential is refused before the engine reads or writes one byte of the
//! migration: no guest RAM, no device state.
//!
//! A destination that listens for its source takes connections through a [`PeerListener`]:
//! a connection that fails its handshake (a stranger, a port scan) or says nothing is reported
//! and counted, not taken for the end of the wait, and handshakes run concurrently so a silent
//! connection holds up no other; the wait ends with the first authenticated peer, after
//! [`AcceptPolicy::max_failures`] failed handshakes, or at the caller's deadline.
//!
//! Only TLS 1.3 is offered. A pinned certificate is checked by its fingerprint and by the
//! handshake signature made with its key (rustls' signature verification), so holding the
//! certificate without the key does not pass.
#![deny(missing_docs)]

mod listen;
mod stream;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

pub use listen::{AcceptPolicy, PeerListener, Refusal};
pub use stream::{HANDSHAKE_TIMEOUT, TlsChannel, TlsReader, TlsStream, TlsWriter, accept, connect};

/// Why TLS could not be set up or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input held no usable item.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (certificate, key, CA bundle).
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A fingerprint string is malformed.
    #[error("fingerprint {0:?}: expected sha256: and 64 hex digits (colons allowed)")]
    Fingerprint(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The CA trust store could not be built.
    #[error("CA certificates: {0}")]
    Verifier(String),
    /// The handshake failed (the peer refused us, or we refused it).
    #[error("TLS handshake with {peer}: {source}")]
    Handshake {
        /// The peer, as far as known.
        peer: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The listener failed.
    #[error("accepting a connection")]
    Accept(#[source] std::io::Error),
    /// A [`PeerListener`] reached its bound of failed handshakes.
    #[error(
        "{bound} connection(s) failed the TLS handshake, the bound of failed attempts, in \
         {waited:.1?}; no authenticated peer"
    )]
    TooManyFailures {
        /// The bound ([`AcceptPolicy::max_failures`]).
        bound: u32,
        /// How long the wait lasted.
        waited: std::time::Duration,
    },
    /// A [`PeerListener`] reached its deadline.
    #[error("no authenticated peer within {waited:.1?} ({failures} failed handshake(s))")]
    NoPeer {
        /// How long the wait lasted.
        waited: std::time::Duration,
        /// Connections that failed their handshake meanwhile.
        failures: u32,
    },
}

/// A certificate chain (leaf first) and its private key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("chain", &self.chain.len())
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// From PEM: `certs` holds the chain (leaf first), `key` one private key (PKCS#8, PKCS#1
    /// or SEC1).
    pub fn from_pem(certs: &[u8], key: &[u8]) -> Result<Identity, TlsError> {
        let chain = parse_certs(certs, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(Identity { chain, key })
    }

    /// The leaf certificate's SHA-256 fingerprint (what the peer pins).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.chain[0])
    }
}

fn parse_certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A certificate's SHA-256 fingerprint; written `sha256:` and 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Fingerprint, TlsError> {
        let bad = || TlsError::Fingerprint(s.to_string());
        let hex: String = s
            .strip_prefix("sha256:")
            .ok_or_else(bad)?
            .chars()
            .filter(|&c| c != ':')
            .collect();
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// Whom a side accepts as its peer.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates issued by one of these CAs (PEM bundle, [`Trust::ca_from_pem`]). The
    /// destination's certificate must name the host the source connects to.
    Ca(Vec<CertificateDer<'static>>),
    /// Exactly these certificates, by fingerprint (self-signed certificates of two hosts that
    /// know each other).
    Pinned(Vec<Fingerprint>),
}

impl Trust {
    /// CA trust from a PEM bundle.
    pub fn ca_from_pem(pem: &[u8]) -> Result<Trust, TlsError> {
        Ok(Trust::Ca(parse_certs(pem, "CA bundle")?))
    }
}

/// One side's TLS settings.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Who this side is.
    pub identity: Identity,
    /// Whom it accepts.
    pub trust: Trust,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the pinned certificates, each proven by its handshake signature.
#[derive(Debug)]
struct Pinned {
    pins: Vec<Fingerprint>,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        if self.pins.contains(&fp) {
            Ok(())
        } else {
            Err(rustls::Error::General(format!(
                "peer certificate {fp} is not pinned"
            )))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in cas {
        store
            .add(c.clone())
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    }
    Ok(Arc::new(store))
}

impl TlsConfig {
    /// The source's (client's) rustls configuration.
    pub fn client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let p = provider();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&p))
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &self.trust {
            Trust::Ca(cas) => builder.with_webpki_verifier(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots(cas)?,
                    Arc::clone(&p),
                )
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?,
            ),
            Trust::Pinned(pins) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    pins: pins.clone(),
                    algs: p.signature_verification_algorithms,
                })),
        };
        let cfg = builder
            .with_client_auth_cert(self.identity.chain.clone(), self.identity.key.clone_key())?;
        Ok(Arc::new(cfg))
    }

    /// The destination's (server's) rustls configuration: client certificates are mandatory.
    pub fn server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let p = provider();
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&p))
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let verifier: Arc<dyn ClientCertVerifier> = match &self.trust {
            Trust::Ca(cas) => rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots(cas)?,
                Arc::clone(&p),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?,
            Trust::Pinned(pins) => Arc::new(Pinned {
                pins: pins.clone(),
                algs: p.signature_verification_algorithms,
            }),
        };
        let cfg = builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.identity.chain.clone(), self.identity.key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse_and_bad_ones_are_named() {
        let f = Fingerprint([0xab; 32]);
        let s = f.to_string();
        assert_eq!(s.len(), 7 + 64);
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        let colons = format!("sha256:{}", vec!["ab"; 32].join(":"));
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), f);
        for bad in [
            "ab",
            "sha256:ab",
            "sha1:00",
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            let e = bad.parse::<Fingerprint>().unwrap_err();
            assert!(e.to_string().contains("64 hex digits"), "{e}");
        }
    }

    #[test]
    fn pem_without_certificates_or_key_is_named() {
        let e = Identity::from_pem(b"nothing here", b"").unwrap_err();
        assert!(e.to_string().starts_with("certificate: "), "{e}");
        let e = Trust::ca_from_pem(b"").unwrap_err();
        assert!(e.to_string().starts_with("CA bundle: "), "{e}");
    }
}
