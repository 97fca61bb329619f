//! Kythira's network layer: QUIC (quinn) with mutual TLS 1.3 (rustls, ring).
//!
//! - [`pki`]: the cluster CA and the identities bound into certificates.
//! - [`tls`]: loading certificate files; quinn server and client configs.
//! - [`frame`]: length-prefixed, versioned frames with a maximum size.
//! - [`wire`]: the binary encoding of Raft messages.
//! - [`endpoint`]: one QUIC endpoint per node, dispatching by ALPN.
//! - [`peer`]: the Raft peer mesh with per-peer queues and reconnection.
//! - [`rpc`]: multiplexed request/response for clients.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod endpoint;
pub mod frame;
pub mod peer;
pub mod pki;
pub mod rpc;
pub mod tls;
pub mod wire;

pub use endpoint::{ClientHandler, CloseCode, Endpoint, EndpointError};
pub use peer::{Backoff, NetStats, PeerConfig, PeerError, PeerNet, PeerStats, SendError};
pub use pki::{Ca, Identity, IssuedCert, PkiError, Role};
pub use rpc::{RpcClient, RpcClientConfig, RpcError, RpcServer, RpcServerConfig};
pub use tls::{Alpn, Tls, TlsError, TlsFiles};
