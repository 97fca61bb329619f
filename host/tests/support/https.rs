//! A minimal HTTPS client for a node's HTTP API, with a client certificate
//! of the cluster, verifying the node by its IP address as curl does.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kythira::local::LocalCluster;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// A TLS connector presenting client `who`'s certificate (`admin` or `app`).
pub fn connector(cluster: &LocalCluster, who: &str) -> anyhow::Result<TlsConnector> {
    let files = cluster.client_files(who);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&files.cert)?.collect::<Result<Vec<_>, _>>()?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&files.key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `GET path` on a fresh connection; answers the status, the
/// `Content-Type` and the body as text.
pub async fn get(
    tls: &TlsConnector,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("TLS handshake")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await.context("request")?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, content_type, String::from_utf8(body.to_vec())?))
}
