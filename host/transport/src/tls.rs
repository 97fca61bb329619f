//! Mutual TLS 1.3 for QUIC: loading a node's or client's files and building
//! quinn configurations from them.
//!
//! Choices, each for a reason:
//! - **ring**, passed explicitly as the crypto provider everywhere, so that
//!   nothing depends on a process-wide default and aws-lc-rs is never built.
//! - **TLS 1.3 only** (QUIC requires it anyway) and **no 0-RTT**: early data
//!   can be replayed, and a replayed Raft message or command is not harmless.
//! - **Both directions authenticate.** The server requires a client
//!   certificate signed by the cluster CA ([`WebPkiClientVerifier`]); the
//!   client verifies the server against the same CA under the fixed server
//!   name [`SERVER_NAME`], which every node certificate carries as a DNS SAN
//!   (see `pki`). Which node a server is, is then read from its identity URI.
//! - **ALPN picks the service**: [`Alpn::Peer`] (`kythira-peer/1`) for Raft
//!   traffic and [`Alpn::Client`] (`kythira-client/1`) for clients; a server
//!   offers both, a client config names one.

use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;

pub use crate::pki::SERVER_NAME;
use crate::pki::{Identity, PkiError};

/// ALPN of Raft peer connections.
pub const PEER_ALPN: &[u8] = b"kythira-peer/1";
/// ALPN of client connections.
pub const CLIENT_ALPN: &[u8] = b"kythira-client/1";

/// A connection idle this long is closed; keep-alives prevent that while the
/// peer is up, so it measures how fast a dead peer is noticed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of QUIC keep-alive pings, well under [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// The service a connection is for, negotiated by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// Raft messages between nodes.
    Peer,
    /// Client requests.
    Client,
}

impl Alpn {
    /// The protocol id on the wire.
    pub const fn as_bytes(self) -> &'static [u8] {
        match self {
            Alpn::Peer => PEER_ALPN,
            Alpn::Client => CLIENT_ALPN,
        }
    }

    /// The service of a negotiated protocol id.
    pub fn from_bytes(bytes: &[u8]) -> Option<Alpn> {
        match bytes {
            PEER_ALPN => Some(Alpn::Peer),
            CLIENT_ALPN => Some(Alpn::Client),
            _ => None,
        }
    }
}

impl fmt::Display for Alpn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Alpn::Peer => "kythira-peer/1",
            Alpn::Client => "kythira-client/1",
        })
    }
}

/// The three files of a TLS identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate(s), PEM.
    pub ca: PathBuf,
    /// This node's or client's certificate (then any intermediates), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Where PEM text came from, so that errors name the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PemSource {
    /// A file.
    File(PathBuf),
    /// Text passed in memory: which of the three it was.
    Inline(&'static str),
}

impl fmt::Display for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemSource::File(path) => write!(f, "{}", path.display()),
            PemSource::Inline(what) => write!(f, "<{what} PEM>"),
        }
    }
}

/// Errors of loading TLS material and building configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file does not exist.
    #[error("{}: file not found", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The text holds no PEM block of the expected kind.
    #[error("{file}: not PEM: expected {expected} ({reason})")]
    NotPem {
        /// Where the text came from.
        file: PemSource,
        /// The kind of block expected.
        expected: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The CA certificate was refused as a trust anchor.
    #[error("{ca}: not a usable CA certificate: {reason}")]
    BadCa {
        /// Where it came from.
        ca: PemSource,
        /// Why.
        reason: rustls::Error,
    },
    /// The private key is of a kind the crypto provider cannot use.
    #[error("{key}: unsupported private key: {reason}")]
    UnsupportedKey {
        /// Where it came from.
        key: PemSource,
        /// Why.
        reason: rustls::Error,
    },
    /// The private key does not belong to the certificate.
    #[error("{key}: private key does not match the certificate {cert}")]
    KeyMismatch {
        /// The certificate.
        cert: PemSource,
        /// The key.
        key: PemSource,
    },
    /// The certificate does not verify against the CA.
    #[error("{cert}: certificate is not valid under the CA {ca}: {reason}")]
    NotSignedByCa {
        /// The certificate.
        cert: PemSource,
        /// The CA.
        ca: PemSource,
        /// Why (unknown issuer, expired, wrong usage, ...).
        reason: rustls::Error,
    },
    /// The certificate carries no valid Kythira identity.
    #[error("{cert}: {source}")]
    Identity {
        /// The certificate.
        cert: PemSource,
        /// Why.
        source: PkiError,
    },
    /// A server configuration was asked of a client identity.
    #[error("only a node certificate can serve; this one is {identity}")]
    NotANode {
        /// The identity held.
        identity: Identity,
    },
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The provider lacks the cipher suite QUIC's initial packets need.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

/// A verified TLS identity: CA, own certificate chain and key.
///
/// Construction checks that the key matches the certificate, that the
/// certificate verifies against the CA and that it names exactly one
/// identity, so a misconfigured node fails at start rather than at its first
/// handshake.
#[derive(Debug)]
pub struct Tls {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: Identity,
    ca_fingerprint: [u8; 32],
}

impl Clone for Tls {
    fn clone(&self) -> Self {
        Tls {
            provider: self.provider.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
            ca_fingerprint: self.ca_fingerprint,
        }
    }
}

/// The crypto provider of every configuration: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads and checks the three files.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let ca = read_file(&files.ca)?;
        let cert = read_file(&files.cert)?;
        let key = read_file(&files.key)?;
        Tls::build(
            (&ca, PemSource::File(files.ca.clone())),
            (&cert, PemSource::File(files.cert.clone())),
            (&key, PemSource::File(files.key.clone())),
        )
    }

    /// Checks PEM text held in memory.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Tls, TlsError> {
        Tls::build(
            (ca_pem.as_bytes(), PemSource::Inline("ca")),
            (cert_pem.as_bytes(), PemSource::Inline("certificate")),
            (key_pem.as_bytes(), PemSource::Inline("key")),
        )
    }

    fn build(
        (ca_pem, ca_src): (&[u8], PemSource),
        (cert_pem, cert_src): (&[u8], PemSource),
        (key_pem, key_src): (&[u8], PemSource),
    ) -> Result<Tls, TlsError> {
        let provider = provider();
        let ca_certs = parse_certs(ca_pem, &ca_src)?;
        let ca_fingerprint = {
            use sha2::Digest;
            // The first certificate only: adding another CA to the bundle
            // (rotation) must not rename the cluster.
            let mut h = sha2::Sha256::new();
            if let Some(first) = ca_certs.first() {
                h.update(first.as_ref());
            }
            h.finalize().into()
        };
        let mut roots = RootCertStore::empty();
        for cert in ca_certs {
            roots.add(cert).map_err(|reason| TlsError::BadCa {
                ca: ca_src.clone(),
                reason,
            })?;
        }
        let roots = Arc::new(roots);
        let chain = parse_certs(cert_pem, &cert_src)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::NotPem {
            file: key_src.clone(),
            expected: "a PRIVATE KEY block",
            reason: e.to_string(),
        })?;

        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|reason| TlsError::UnsupportedKey {
                key: key_src.clone(),
                reason,
            })?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|_| TlsError::KeyMismatch {
                cert: cert_src.clone(),
                key: key_src.clone(),
            })?;

        // Every identity, node or client, presents its certificate as a TLS
        // client at some point, so the client verifier is the check that
        // applies to all of them.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::BadCa {
                ca: ca_src.clone(),
                reason: rustls::Error::General(e.to_string()),
            })?;
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| TlsError::NotPem {
            file: cert_src.clone(),
            expected: "a CERTIFICATE block",
            reason: "none found".into(),
        })?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|reason| TlsError::NotSignedByCa {
                cert: cert_src.clone(),
                ca: ca_src.clone(),
                reason,
            })?;
        let identity = Identity::from_cert_der(leaf).map_err(|source| TlsError::Identity {
            cert: cert_src.clone(),
            source,
        })?;

        Ok(Tls {
            provider,
            roots,
            chain,
            key,
            identity,
            ca_fingerprint,
        })
    }

    /// sha256 of the first CA certificate (DER): names the cluster, whatever
    /// the PEM file's formatting or the certificates added after it.
    pub fn ca_fingerprint(&self) -> &[u8; 32] {
        &self.ca_fingerprint
    }

    /// The identity this certificate names.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A server configuration offering both ALPNs and requiring a client
    /// certificate signed by the CA. Only node identities may serve.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let mut config = self.rustls_server_config()?;
        config.alpn_protocols = vec![PEER_ALPN.to_vec(), CLIENT_ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(config)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        Ok(server)
    }

    /// The TLS half of [`Tls::server_config`], without ALPN: mutual TLS 1.3
    /// requiring a client certificate signed by the CA. Servers over TCP
    /// (the HTTP API) use it directly, so that every port of a node applies
    /// one policy. Only node identities may serve.
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        if self.identity.node_id().is_none() {
            return Err(TlsError::NotANode {
                identity: self.identity.clone(),
            });
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        // rustls' default is already 0; stated because replay safety depends on it.
        config.max_early_data_size = 0;
        Ok(config)
    }

    /// A client configuration for one service, verifying the server against
    /// the CA under [`SERVER_NAME`] and presenting this certificate.
    pub fn client_config(&self, alpn: Alpn) -> Result<quinn::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
        config.enable_early_data = false;
        let crypto = QuicClientConfig::try_from(config)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport_config());
        Ok(client)
    }
}

fn transport_config() -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    transport.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
        IDLE_TIMEOUT.as_millis() as u32,
    ))));
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    // Peers use one uni stream per direction (and a bidi stream per snapshot
    // transfer, one at a time per receiver) and clients one bidi stream; a
    // little headroom lets a reconnecting side open a fresh one while the old
    // is being torn down, and bounds what a misbehaving peer can open.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(8));
    transport.max_concurrent_uni_streams(VarInt::from_u32(8));
    // One long-lived stream carries all traffic of a connection, so its
    // window is the connection's throughput limit: give it room for a few
    // large append batches in flight.
    transport.stream_receive_window(VarInt::from_u32(8 << 20));
    transport.receive_window(VarInt::from_u32(16 << 20));
    transport.send_window(16 << 20);
    Arc::new(transport)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => TlsError::Missing {
            path: path.to_owned(),
        },
        _ => TlsError::Unreadable {
            path: path.to_owned(),
            source,
        },
    })
}

fn parse_certs(pem: &[u8], src: &PemSource) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let not_pem = |reason: String| TlsError::NotPem {
        file: src.clone(),
        expected: "a CERTIFICATE block",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(not_pem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Role};

    #[test]
    fn load_names_the_file_in_each_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        let node = ca.issue(&Identity::Node(1), &[]).unwrap();
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("node.pem"),
            key: dir.path().join("node.key"),
        };
        let err = Tls::load(&files).unwrap_err();
        assert!(matches!(err, TlsError::Missing { ref path } if path == &files.ca));
        assert!(err.to_string().contains("ca.pem"));

        fs::write(&files.ca, ca.cert_pem()).unwrap();
        fs::write(&files.cert, "hello").unwrap();
        fs::write(&files.key, &node.key_pem).unwrap();
        let err = Tls::load(&files).unwrap_err();
        assert!(matches!(err, TlsError::NotPem { .. }), "{err}");
        assert!(err.to_string().contains("node.pem"), "{err}");

        fs::write(&files.cert, &node.cert_pem).unwrap();
        fs::write(&files.key, &node.cert_pem).unwrap();
        let err = Tls::load(&files).unwrap_err();
        assert!(matches!(err, TlsError::NotPem { .. }), "{err}");
        assert!(err.to_string().contains("node.key"), "{err}");

        let other = ca.issue(&Identity::Node(2), &[]).unwrap();
        fs::write(&files.key, &other.key_pem).unwrap();
        let err = Tls::load(&files).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");

        let foreign = Ca::generate().unwrap();
        fs::write(&files.ca, foreign.cert_pem()).unwrap();
        fs::write(&files.key, &node.key_pem).unwrap();
        let err = Tls::load(&files).unwrap_err();
        assert!(matches!(err, TlsError::NotSignedByCa { .. }), "{err}");
        assert!(err.to_string().contains("node.pem"), "{err}");

        fs::write(&files.ca, ca.cert_pem()).unwrap();
        let tls = Tls::load(&files).unwrap();
        assert_eq!(tls.identity(), &Identity::Node(1));
        tls.server_config().unwrap();
        tls.client_config(Alpn::Peer).unwrap();
    }

    #[test]
    fn clients_cannot_serve() {
        let ca = Ca::generate().unwrap();
        let id = Identity::client("alice", Role::Client).unwrap();
        let cert = ca.issue(&id, &[]).unwrap();
        let tls = Tls::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
        assert!(matches!(
            tls.server_config(),
            Err(TlsError::NotANode { .. })
        ));
        tls.client_config(Alpn::Client).unwrap();
    }

    #[test]
    fn alpn_roundtrips() {
        for alpn in [Alpn::Peer, Alpn::Client] {
            assert_eq!(Alpn::from_bytes(alpn.as_bytes()), Some(alpn));
            assert_eq!(alpn.to_string().as_bytes(), alpn.as_bytes());
        }
        assert_eq!(Alpn::from_bytes(b"h3"), None);
    }
}
