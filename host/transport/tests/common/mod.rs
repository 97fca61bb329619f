//! Shared test fixtures: a cluster CA, node and client TLS identities, raw
//! quinn connections for misbehaving peers, and bounded waits.
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kythira_transport::{Alpn, Ca, Identity, Role, Tls};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Safety net for every await that should complete; never a synchronization
/// device (tests wait on events, this only turns a hang into a failure).
pub const LIMIT: Duration = Duration::from_secs(20);

pub async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

pub fn any_port() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 0)
}

pub struct Pki {
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Self {
        Pki {
            ca: Ca::generate().unwrap(),
        }
    }

    pub fn node(&self, id: u64) -> Tls {
        let cert = self.ca.issue(&Identity::Node(id), &[LOCALHOST]).unwrap();
        Tls::from_pem(self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap()
    }

    pub fn client(&self, name: &str, role: Role) -> Tls {
        let cert = self
            .ca
            .issue(&Identity::client(name, role).unwrap(), &[])
            .unwrap();
        Tls::from_pem(self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap()
    }

    /// An identity whose certificate comes from `other`'s CA but which
    /// trusts both CAs, so that it accepts our servers and only the server
    /// can refuse it.
    pub fn foreign(&self, other: &Pki, identity: Identity) -> Tls {
        let cert = other.ca.issue(&identity, &[LOCALHOST]).unwrap();
        let both = format!("{}{}", other.ca.cert_pem(), self.ca.cert_pem());
        Tls::from_pem(&both, &cert.cert_pem, &cert.key_pem).unwrap()
    }

    /// A client configuration that trusts the CA but presents no certificate.
    pub fn anonymous(&self, alpn: Alpn) -> quinn::ClientConfig {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
        quinn::ClientConfig::new(Arc::new(crypto))
    }
}

/// A bare quinn client endpoint on loopback.
pub fn raw_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(any_port()).unwrap()
}

/// Connects with `tls`'s identity for `alpn`, bypassing the crate's clients.
pub async fn raw_connect(
    endpoint: &quinn::Endpoint,
    tls: &Tls,
    alpn: Alpn,
    addr: SocketAddr,
) -> quinn::Connection {
    let config = tls.client_config(alpn).unwrap();
    bounded(
        "raw handshake",
        endpoint.connect_with(config, addr, "kythira").unwrap(),
    )
    .await
    .unwrap()
}

/// Waits for the connection to close and returns the application close
/// code and reason the other side sent.
pub async fn closed_by_peer(conn: &quinn::Connection) -> (u64, String) {
    match bounded("connection close", conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => (
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other}"),
    }
}
