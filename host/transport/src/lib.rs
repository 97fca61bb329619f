//! Kythira's network layer: QUIC (quinn) with mutual TLS 1.3 (rustls with
//! the ring provider, chosen explicitly).
//!
//! - [`pki`]: the cluster CA and the identities bound into certificates
//!   (`kythira://node/<id>`, `kythira://client/<name>?role=<admin|client>`).
//! - [`tls`]: loading certificate files; quinn server and client configs.
//! - [`frame`]: length-prefixed, versioned frames with a maximum size.
//! - [`wire`]: the binary encoding of Raft messages.
//! - [`endpoint`]: one QUIC endpoint per node, dispatching by ALPN.
//! - [`peer`]: the Raft peer mesh with per-peer queues and reconnection.
//! - [`snapshot`]: snapshot files sent to peers on streams of their own,
//!   resumable.
//! - [`rpc`]: multiplexed request/response for clients.
//!
//! A node in outline (error handling elided):
//!
//! ```no_run
//! # async fn node(files: kythira_transport::TlsFiles,
//! #               peers: std::collections::BTreeMap<u64, std::net::SocketAddr>)
//! #               -> Result<(), Box<dyn std::error::Error>> {
//! use kythira_transport::{Endpoint, Identity, PeerConfig, RpcServer, Tls};
//!
//! let tls = Tls::load(&files)?; // checks key, CA signature and identity
//! let endpoint = Endpoint::bind("0.0.0.0:7000".parse()?, &tls)?;
//! let (net, mut inbound) = endpoint.start_peers(PeerConfig::new(1, peers))?;
//! endpoint.serve_clients(RpcServer::new(|who: Identity, req: String| async move {
//!     format!("{who} asked {req}")
//! }))?;
//! while let Some(message) = inbound.recv().await {
//!     // step the core; send its messages with `net.send(m)`, which never waits
//! #   let _ = (&net, message);
//! }
//! # Ok(()) }
//! ```
//!
//! And a client:
//!
//! ```no_run
//! # async fn client(tls: kythira_transport::Tls) -> Result<(), kythira_transport::RpcError> {
//! use std::time::Duration;
//! let client = kythira_transport::RpcClient::connect("127.0.0.1:7000".parse().unwrap(), &tls).await?;
//! let answer: String = client.call("status", Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod endpoint;
pub mod frame;
pub mod peer;
pub mod pki;
pub mod rpc;
pub mod snapshot;
pub mod tls;
pub mod wire;

pub use endpoint::{ClientHandler, CloseCode, Endpoint, EndpointError};
pub use peer::{Backoff, NetStats, PeerConfig, PeerError, PeerNet, PeerStats, SendError};
pub use pki::{Ca, Identity, IssuedCert, PkiError, Role};
pub use rpc::{RpcClient, RpcClientConfig, RpcError, RpcServer, RpcServerConfig};
pub use snapshot::{SnapshotError, SnapshotSent};
pub use tls::{Alpn, Tls, TlsError, TlsFiles};
